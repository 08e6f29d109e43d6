#include "engine/optimizer.h"

#include <cmath>
#include <utility>
#include <vector>

namespace sinkscope {

double QueueAdamWStep(Model& model, const OptimizerConfig& c, int64_t step, double* scalars) {
  Backend& be = *model.backend();
  const double lr = LearningRate(c, step);
  std::vector<std::pair<const float*, size_t>> grads;
  std::vector<Backend::AdamWTensor> tensors;
  for (const ParamTensor& t : model.tensors()) {
    if (!t.trainable) continue;
    grads.emplace_back(model.grads() + t.offset, t.size);
    tensors.push_back({model.params() + t.offset, model.adam_m() + t.offset, model.adam_v() + t.offset,
                       model.grads() + t.offset, t.size,
                       t.weight_decay ? static_cast<float>(c.weight_decay) : 0.0f});
  }
  be.ZeroScalars(scalars + 1, 1);
  be.AccumulateGlobalSumSquares(scalars + 1, grads);
  Backend::AdamWHyper h;
  h.lr = static_cast<float>(lr);
  h.beta1 = static_cast<float>(c.beta1);
  h.beta2 = static_cast<float>(c.beta2);
  h.eps = static_cast<float>(c.eps);
  h.grad_clip = c.grad_clip;
  h.step = step + 1;
  be.MultiTensorAdamW(tensors, h, scalars);
  return lr;
}

UpdateResult AdamWStep(Model& model, const OptimizerConfig& c, int64_t step) {
  Backend& be = *model.backend();
  double* scalars = be.AllocScalars(2);  // the loss slot stays 0: finite
  UpdateResult r;
  r.lr = QueueAdamWStep(model, c, step, scalars);
  double host[2];
  be.ReadScalars(host, scalars, 2);
  be.Free(scalars);
  r.grad_norm = std::sqrt(host[1]);
  r.finite = std::isfinite(r.grad_norm);
  return r;
}

}  // namespace sinkscope

#include "engine/optimizer.h"

#include <cmath>

namespace sinkscope {

UpdateResult AdamWStep(Model& model, const OptimizerConfig& c, int64_t step) {
  Backend& be = *model.backend();
  UpdateResult r;
  r.lr = LearningRate(c, step);
  double sum_sq = 0;
  for (const ParamTensor& t : model.tensors()) {
    if (!t.trainable) continue;
    sum_sq += be.SumSquares(model.grads() + t.offset, t.size);
  }
  r.grad_norm = std::sqrt(sum_sq);
  if (!std::isfinite(r.grad_norm)) {
    r.finite = false;
    return r;
  }
  const float clip_scale =
      (c.grad_clip > 0 && r.grad_norm > c.grad_clip) ? static_cast<float>(c.grad_clip / r.grad_norm) : 1.0f;
  for (const ParamTensor& t : model.tensors()) {
    if (!t.trainable) continue;
    be.AdamW(model.params() + t.offset, model.grads() + t.offset, model.adam_m() + t.offset,
             model.adam_v() + t.offset, t.size, static_cast<float>(r.lr), static_cast<float>(c.beta1),
             static_cast<float>(c.beta2), static_cast<float>(c.eps), t.weight_decay ? static_cast<float>(c.weight_decay) : 0.0f,
             clip_scale, step + 1);
  }
  return r;
}

}  // namespace sinkscope

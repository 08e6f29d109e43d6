// AdamW with decoupled weight decay on 2-D weights, a linear warm-up then cosine decay
// learning-rate schedule, and global-norm gradient clipping.
#pragma once

#include <cstdint>

#include "engine/model.h"
#include "engine/schedule.h"

namespace sinkscope {

struct UpdateResult {
  double lr = 0;
  double grad_norm = 0;  // global ℓ2 norm of the gradient, before clipping
  bool finite = true;    // false if the gradient holds a NaN or Inf (no update is made)
};

// Queues one AdamW update of `model` from its accumulated gradients at 0-based `step`,
// without waiting: scalars[1] (a device double) is set to ‖g‖², and the update is made
// only if scalars[0] (the step's Σ token losses) and ‖g‖ are finite. Returns the
// learning rate used. `model` must be a training model (ModelOptions::training).
double QueueAdamWStep(Model& model, const OptimizerConfig& config, int64_t step, double* scalars);
// QueueAdamWStep, then waits and reads: for callers without a step's loss (tests).
UpdateResult AdamWStep(Model& model, const OptimizerConfig& config, int64_t step);

}  // namespace sinkscope

// AdamW with decoupled weight decay on 2-D weights, a linear warm-up then cosine decay
// learning-rate schedule, and global-norm gradient clipping.
#pragma once

#include <cstdint>

#include "worker/engine/model.h"

namespace sinkscope {

struct OptimizerConfig {
  double lr = 3e-4;          // peak learning rate
  double min_lr = 3e-5;      // floor of the cosine decay
  int64_t warmup_steps = 0;  // linear warm-up from lr/warmup to lr
  int64_t total_steps = 1;   // cosine reaches min_lr here
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;  // decoupled, 2-D weights only
  double grad_clip = 1.0;     // global-norm clip; ≤ 0 disables

  Status Validate() const;
};

// Learning rate at 0-based step `step`: linear warm-up ((step+1)/warmup·lr) for
// step < warmup, then cosine from lr to min_lr over the remaining steps.
double LearningRate(const OptimizerConfig& config, int64_t step);

struct UpdateResult {
  double lr = 0;
  double grad_norm = 0;  // global ℓ2 norm of the gradient, before clipping
  bool finite = true;    // false if the gradient holds a NaN or Inf (no update is made)
};

// Applies one AdamW update to `model` from its accumulated gradients at 0-based `step`.
// `model` must be a training model (ModelOptions::training).
UpdateResult AdamWStep(Model& model, const OptimizerConfig& config, int64_t step);

}  // namespace sinkscope

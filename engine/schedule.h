// The optimizer's settings and its learning-rate schedule: plain numbers, no backend.
// The schema validates experiments with them; the engine's AdamW (optimizer.h) runs them.
#pragma once

#include <cstdint>

#include "base/status.h"

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

}  // namespace sinkscope

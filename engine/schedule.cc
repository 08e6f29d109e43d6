#include "engine/schedule.h"

#include <algorithm>
#include <cmath>

namespace sinkscope {

Status OptimizerConfig::Validate() const {
  if (!(lr > 0)) return InvalidArgumentError("train.lr must be positive");
  if (!(min_lr >= 0) || min_lr > lr) return InvalidArgumentError("train.min_lr must be in [0, train.lr]");
  if (warmup_steps < 0) return InvalidArgumentError("train.warmup_steps must not be negative");
  if (total_steps <= 0) return InvalidArgumentError("train.steps must be positive");
  if (!(beta1 >= 0 && beta1 < 1)) return InvalidArgumentError("train.beta1 must be in [0, 1)");
  if (!(beta2 >= 0 && beta2 < 1)) return InvalidArgumentError("train.beta2 must be in [0, 1)");
  if (!(eps > 0)) return InvalidArgumentError("train.eps must be positive");
  if (!(weight_decay >= 0)) return InvalidArgumentError("train.weight_decay must not be negative");
  return OkStatus();
}

double LearningRate(const OptimizerConfig& c, int64_t step) {
  if (step < c.warmup_steps) return c.lr * static_cast<double>(step + 1) / static_cast<double>(c.warmup_steps);
  const int64_t decay_steps = c.total_steps - c.warmup_steps;
  if (decay_steps <= 1) return c.lr;
  const double progress =
      std::min(1.0, static_cast<double>(step - c.warmup_steps) / static_cast<double>(decay_steps - 1));
  return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1.0 + std::cos(M_PI * progress));
}

}  // namespace sinkscope

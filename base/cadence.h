// The cadence of a run, shared by every trainer front end and by the coordinator, which
// accepts a probe report only at a step the run loop probes. `step` is 1-based.
#pragma once

#include <cstdint>

namespace sinkscope {

// Training probes: the first step, every `every` steps, and the last; never when every ≤ 0.
inline bool IsProbeStep(int64_t step, int every, int64_t total) {
  return every > 0 && (step == 1 || step % every == 0 || step == total);
}
// Validation and checkpoints: every `every` steps (none when every ≤ 0) and the last.
inline bool IsEveryOrLast(int64_t step, int every, int64_t total) {
  return (every > 0 && step % every == 0) || step == total;
}

}  // namespace sinkscope

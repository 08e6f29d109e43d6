#include "base/clock.h"

namespace sinkscope {
namespace {

class SteadyClock final : public Clock {
 public:
  TimePoint Now() override { return std::chrono::steady_clock::now(); }
  void WaitUntil(std::condition_variable& cv, std::unique_lock<std::mutex>& lock, TimePoint deadline) override {
    cv.wait_until(lock, deadline);
  }
};

}  // namespace

Clock* Clock::Real() {
  static SteadyClock clock;
  return &clock;
}

Clock::TimePoint ManualClock::Now() {
  std::lock_guard<std::mutex> lock(mu_);
  return now_;
}

void ManualClock::WaitUntil(std::condition_variable& cv, std::unique_lock<std::mutex>& lock, TimePoint deadline) {
  if (Now() >= deadline) return;
  cv.wait_for(lock, std::chrono::milliseconds(1));
}

void ManualClock::Advance(std::chrono::nanoseconds d) {
  std::lock_guard<std::mutex> lock(mu_);
  now_ += std::chrono::duration_cast<TimePoint::duration>(d);
}

}  // namespace sinkscope

// The time the project schedules by: leases and heartbeats (coordinator and worker),
// reconnect back-off, checkpoint retries (the run loop). Tests substitute a ManualClock
// and move time themselves, so nothing of that waits in real time. Measurements of work
// (a step's seconds, tokens/s) use the steady clock directly: they are what they measure.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>

namespace sinkscope {

class Clock {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;
  virtual ~Clock() = default;
  virtual TimePoint Now() = 0;
  // Waits on `cv` (whose mutex `lock` holds) until it is notified or Now() reaches
  // `deadline`; may return early (callers re-check their condition).
  virtual void WaitUntil(std::condition_variable& cv, std::unique_lock<std::mutex>& lock, TimePoint deadline) = 0;
  // Sleeps until Now() reaches `deadline` or `stop()` is true (checked at least once a
  // millisecond of real time on a ManualClock, and on every notify of `cv`).
  template <typename Pred>
  void WaitUntilOr(std::condition_variable& cv, std::unique_lock<std::mutex>& lock, TimePoint deadline, Pred stop) {
    while (!stop() && Now() < deadline) WaitUntil(cv, lock, deadline);
  }
  // The steady clock of the process.
  static Clock* Real();
};

// A clock that moves only when Advance() is called (waiters notice within a
// millisecond of real time).
class ManualClock final : public Clock {
 public:
  TimePoint Now() override;
  void WaitUntil(std::condition_variable& cv, std::unique_lock<std::mutex>& lock, TimePoint deadline) override;
  void Advance(std::chrono::nanoseconds d);

 private:
  std::mutex mu_;
  TimePoint now_{};
};

}  // namespace sinkscope

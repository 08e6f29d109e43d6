// The worker's delivery bookkeeping, apart from any stream: what is queued to be
// written, what was written and waits for its ack, and when to write it all again.
//
// - Probe reports stay until acked (run_id, sequence) and are all written again on
//   every (re)connect and resend.
// - Progress messages wait in the queue while disconnected (the newest
//   max_buffered_progress are kept; the oldest are dropped and counted).
// - Progress and outcomes (RunFinished, RunFailed, RunReleased), once written, are kept
//   until acked when the coordinator acks them (Registered.acks_progress), and written
//   again on the next connection: a Write that succeeded may still be lost if the
//   coordinator dies before reading it.
// - While something is unacked and no ack has come for resend_after, everything
//   unacked is queued again on the same connection.
//
// Not thread-safe: the worker calls it under its own mutex.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <utility>

#include "base/clock.h"
#include "proto/sinkscope/v1/service.pb.h"

namespace sinkscope {

// RunFinished, RunFailed or RunReleased.
bool IsOutcome(const v1::WorkerMessage& message);
// The attempt an outcome belongs to.
int32_t OutcomeAttempt(const v1::WorkerMessage& message);

class Outbox {
 public:
  Outbox(size_t max_buffered_progress, std::chrono::nanoseconds resend_after)
      : max_buffered_progress_(max_buffered_progress), resend_after_(resend_after) {}

  // Queues a message of `run_id`; a Progress counts against max_buffered_progress.
  void Add(const std::string& run_id, v1::WorkerMessage message, bool is_progress);
  // Queues a probe report, kept until acked.
  void AddProbe(v1::ProbeUpload upload);

  // One message taken off the queue to be written. Hand it back with WriteFailed if the
  // Write fails.
  struct Pending {
    v1::WorkerMessage message;
    std::string run_id;
    bool probe = false, progress = false;
    int64_t sequence = 0;
    bool retained = false;  // kept as unacked (so requeued by the next connection anyway)
  };
  // The next message to write (a probe acked meanwhile is skipped); nullopt when the
  // queue is empty. A Progress or outcome is kept as unacked first (its ack may arrive
  // before the Write returns).
  std::optional<Pending> TakeNext();
  // The Write of `pending` failed: written again on the next connection.
  void WriteFailed(Pending pending);

  // A new connection at `now`: every unacked probe first, then written but unacked
  // Progress and outcomes (oldest first: each run's steps before its outcome), then the
  // rest of the queue. The resend timer starts again.
  void StartConnection(Clock::TimePoint now);
  // The coordinator's Registered: whether it acks Progress and outcomes. If not,
  // nothing written is kept.
  void SetAcksProgress(bool acks);
  bool acks_progress() const { return acks_progress_; }
  // An ack at `now`: removes what it names.
  void Ack(const v1::Ack& ack, Clock::TimePoint now);

  // When everything unacked is to be written again; nullopt when nothing is unacked
  // (or the coordinator does not ack).
  std::optional<Clock::TimePoint> ResendDue() const;
  // Queues everything unacked again (ResendDue has passed).
  void Resend(Clock::TimePoint now);

  bool Idle() const { return queue_.empty() && !HasUnacked(); }  // nothing to write or wait for
  bool HasUnacked() const { return !probes_.empty() || !progress_.empty() || !outcomes_.empty(); }
  size_t queued() const { return queue_.size(); }
  size_t unacked_probes() const { return probes_.size(); }
  size_t unacked_progress() const { return progress_.size() + outcomes_.size(); }
  size_t unacked_outcomes() const { return outcomes_.size(); }
  int64_t dropped_progress() const { return dropped_progress_; }
  // Progress dropped since the last call (for a warning).
  int64_t TakeNewlyDropped();
  // An outcome still to be written or acked, for a Register to name: (run_id, attempt).
  std::optional<std::pair<std::string, int32_t>> PendingOutcome() const;

 private:
  struct Queued {
    std::string run_id;
    bool probe = false;         // written from probes_[{run_id, sequence}] if still unacked
    bool progress = false;      // counts against max_buffered_progress
    int64_t sequence = 0;       // probe: the key
    v1::WorkerMessage message;  // otherwise: the message
  };
  void Requeue();

  const size_t max_buffered_progress_;
  const std::chrono::nanoseconds resend_after_;
  std::deque<Queued> queue_;
  size_t queued_progress_ = 0;
  int64_t dropped_progress_ = 0, dropped_reported_ = 0;
  std::map<std::pair<std::string, int64_t>, v1::ProbeUpload> probes_;      // unacked, by (run_id, sequence)
  std::map<std::pair<std::string, int64_t>, v1::WorkerMessage> progress_;  // written, unacked, by (run_id, step)
  std::map<std::string, v1::WorkerMessage> outcomes_;                      // written, unacked, by run_id
  bool acks_progress_ = true;  // assumed until a Registered says otherwise
  Clock::TimePoint last_ack_{}, last_resend_{};
};

}  // namespace sinkscope

#include "worker/outbox.h"

#include <algorithm>

namespace sinkscope {

bool IsOutcome(const v1::WorkerMessage& m) { return m.has_finished() || m.has_failed() || m.has_released(); }

int32_t OutcomeAttempt(const v1::WorkerMessage& m) {
  return m.has_finished() ? m.finished().attempt() : m.has_failed() ? m.failed().attempt() : m.released().attempt();
}

void Outbox::Add(const std::string& run_id, v1::WorkerMessage message, bool is_progress) {
  Queued q;
  q.run_id = run_id;
  q.progress = is_progress;
  q.message = std::move(message);
  queue_.push_back(std::move(q));
  if (is_progress && ++queued_progress_ > max_buffered_progress_) {
    for (auto it = queue_.begin(); it != queue_.end(); ++it) {
      if (it->progress) {
        queue_.erase(it);
        --queued_progress_;
        ++dropped_progress_;
        break;
      }
    }
  }
}

void Outbox::AddProbe(v1::ProbeUpload upload) {
  Queued q;
  q.run_id = upload.run_id();
  q.probe = true;
  q.sequence = upload.sequence();
  probes_[{q.run_id, q.sequence}] = std::move(upload);
  queue_.push_back(std::move(q));
}

std::optional<Outbox::Pending> Outbox::TakeNext() {
  while (!queue_.empty()) {
    Queued q = std::move(queue_.front());
    queue_.pop_front();
    if (q.progress) --queued_progress_;
    Pending p;
    p.run_id = q.run_id;
    p.probe = q.probe;
    p.progress = q.progress;
    p.sequence = q.sequence;
    if (q.probe) {
      auto it = probes_.find({q.run_id, q.sequence});
      if (it == probes_.end()) continue;  // acked meanwhile
      *p.message.mutable_probe() = it->second;
      return p;
    }
    p.message = std::move(q.message);
    p.retained = acks_progress_ && (p.message.has_progress() || IsOutcome(p.message));
    if (p.retained && p.message.has_progress()) {
      progress_[{q.run_id, p.message.progress().metrics().step()}] = p.message;
      if (progress_.size() > max_buffered_progress_) {  // never acked: keep the newest
        progress_.erase(progress_.begin());
        ++dropped_progress_;
      }
    } else if (p.retained) {
      outcomes_[q.run_id] = p.message;
    }
    return p;
  }
  return std::nullopt;
}

void Outbox::WriteFailed(Pending p) {
  if (p.probe || p.retained) return;  // the next connection requeues them
  Queued q;
  q.run_id = std::move(p.run_id);
  q.progress = p.progress;
  q.message = std::move(p.message);
  if (q.progress) ++queued_progress_;
  queue_.push_front(std::move(q));
}

void Outbox::Requeue() {
  std::deque<Queued> queue;
  for (const auto& [key, upload] : probes_) {
    Queued q;
    q.run_id = key.first;
    q.probe = true;
    q.sequence = key.second;
    queue.push_back(std::move(q));
  }
  for (auto& [key, message] : progress_) {
    Queued q;
    q.run_id = key.first;
    q.progress = true;
    q.message = std::move(message);
    queue.push_back(std::move(q));
    ++queued_progress_;
  }
  progress_.clear();
  for (auto& [run_id, message] : outcomes_) {
    Queued q;
    q.run_id = run_id;
    q.message = std::move(message);
    queue.push_back(std::move(q));
  }
  outcomes_.clear();
  for (Queued& q : queue_) {
    if (!q.probe) queue.push_back(std::move(q));
  }
  queue_ = std::move(queue);
}

void Outbox::StartConnection(Clock::TimePoint now) {
  Requeue();
  last_ack_ = now;
  last_resend_ = now;
}

void Outbox::SetAcksProgress(bool acks) {
  acks_progress_ = acks;
  if (!acks) {  // a coordinator that never acks them: keep nothing
    progress_.clear();
    outcomes_.clear();
  }
}

void Outbox::Ack(const v1::Ack& ack, Clock::TimePoint now) {
  last_ack_ = now;
  if (ack.sequence() != 0) probes_.erase({ack.run_id(), ack.sequence()});
  if (ack.progress_step() != 0) progress_.erase({ack.run_id(), ack.progress_step()});
  if (ack.outcome()) outcomes_.erase(ack.run_id());
}

std::optional<Clock::TimePoint> Outbox::ResendDue() const {
  if (!HasUnacked() || !acks_progress_) return std::nullopt;
  return std::max(last_ack_, last_resend_) + std::chrono::duration_cast<Clock::TimePoint::duration>(resend_after_);
}

void Outbox::Resend(Clock::TimePoint now) {
  last_resend_ = now;
  Requeue();
}

int64_t Outbox::TakeNewlyDropped() {
  const int64_t n = dropped_progress_ - dropped_reported_;
  dropped_reported_ = dropped_progress_;
  return n;
}

std::optional<std::pair<std::string, int32_t>> Outbox::PendingOutcome() const {
  std::optional<std::pair<std::string, int32_t>> found;
  for (const auto& [run_id, o] : outcomes_) found = {run_id, OutcomeAttempt(o)};
  for (const Queued& q : queue_) {
    if (!q.probe && IsOutcome(q.message)) found = {q.run_id, OutcomeAttempt(q.message)};
  }
  return found;
}

}  // namespace sinkscope

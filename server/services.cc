#include "server/services.h"

#include <pthread.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <algorithm>
#include <optional>
#include <thread>

#include "schema/grpc_status.h"
#include "schema/credentials.h"
#include "base/cadence.h"
#include "base/log.h"

namespace sinkscope {
namespace {

grpc::Status Invalid(const std::string& field, const std::string& why) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, field + ": " + why);
}

// Ids are at most ~200 bytes (a 100-character name, its number, arm and seed). A longer one
// is refused here, by its length, so it is never echoed into an error (an 8 KB id echoed
// into NOT_FOUND made the reply itself too large).
constexpr size_t kMaxIdBytes = 256;
grpc::Status CheckId(const char* field, const std::string& id) {
  if (id.empty()) return Invalid(field, "is required");
  if (id.size() > kMaxIdBytes) {
    return Invalid(field, "must be at most " + std::to_string(kMaxIdBytes) + " bytes, got " + std::to_string(id.size()));
  }
  return grpc::Status::OK;
}

}  // namespace

// --- WorkerService.Session on gRPC's completion-queue API -----------------------------
//
// Each Session is a SessionReactor whose operations complete on one queue, run by one
// thread (the sessions' thread). gRPC's callback API, used before, ran completions on two
// polling threads that handed the poll to each other on every event: a wake-up and a
// context switch per message on two cores. The sessions' thread reads the workers'
// messages and hands them to the Ingest thread, which gives them to the coordinator in
// batches (OnWorkerEvents: the Progress and probe reports of a batch are stored in one
// transaction, then acked). What the coordinator sends a worker goes through the
// session's bounded outbox, written one message at a time (StartWrite, the next on the
// write's completion). No thread is held per stream and no write ever blocks the
// scheduler.
//
// Flow control, both ways:
//   - to the worker: the outbox holds at most kMaxOutboxMessages / kMaxOutboxBytes; when
//     it is full the session is ended with that reason, as if the worker had disconnected
//     (its runs keep their lease until it lapses, as for any lost worker). The scheduler
//     also ends a session whose oldest unread message has waited a lease period
//     (UnreadSeconds), so a worker that stops reading loses its leases like a dead one.
//   - from the worker: a session with kMaxUnhandledMessages or kMaxUnhandledBytes read
//     but not yet handled, or every session together over kIngestBudgetBytes, is not read
//     further until the ingest thread catches up: the worker's writes then wait in gRPC's
//     flow control, and memory stays bounded whatever the peers send.

class SessionReactor;
class Ingest;
class DeferredReads;

// One Session's state, shared by its reactor (the sessions' thread), the ingest thread and
// the coordinator (as its SessionWriter). The reactor is deleted once its Finish has
// completed and gRPC has reported the call done; Finish is called once nothing runs on
// the reactor outside this object's mutex (holds_), no read or write is pending and the
// coordinator has closed the session.
class WorkerSession final : public SessionWriter, public std::enable_shared_from_this<WorkerSession> {
 public:
  static constexpr size_t kMaxOutboxMessages = 4096;
  static constexpr size_t kMaxOutboxBytes = 32 << 20;
  // After the coordinator closed the session, what is queued is written within this
  // time; then the stream is cancelled if the worker still does not take it.
  static constexpr double kFlushSeconds = 2;

  WorkerSession(SessionReactor* reactor, Ingest* ingest, std::string peer)
      : reactor_(reactor), ingest_(ingest), peer_(std::move(peer)) {}

  // --- SessionWriter (any thread) ---
  bool Send(const v1::CoordinatorMessage& m) override;
  double UnreadSeconds() const override;
  void End(const std::string& reason) override;
  void ExpectProbes(const std::string& run_id, int every, int64_t total_steps) override {
    std::lock_guard<std::mutex> lock(mu_);
    probed_run_ = run_id;
    probe_every_ = every;
    probe_total_steps_ = total_steps;
  }

  // --- the reactor ---
  void set_id(int64_t id) { id_ = id; }
  int64_t id() const { return id_; }
  const std::string& peer() const { return peer_; }
  // The next read waits (see kReadDeferral): for the write of an ack, or StartDeferredRead
  // with the number returned here.
  uint64_t DeferRead() {
    std::lock_guard<std::mutex> lock(mu_);
    read_deferred_ = true;
    return ++deferrals_;
  }
  // Starts deferral `n`'s read unless a write started it already, or it is an older one's
  // timer (the sessions' thread).
  void StartDeferredRead(uint64_t n);
  // Whether the worker sends a probe report right after this Progress: its step is a probe
  // step (base/cadence.h) of the run the coordinator last gave this session (ExpectProbes).
  bool ProbeFollows(const v1::Progress& p) const {
    std::lock_guard<std::mutex> lock(mu_);
    return p.run_id() == probed_run_ && IsProbeStep(p.metrics().step(), probe_every_, probe_total_steps_);
  }
  // A read may start (false: the session is closing and reads no more).
  bool BeginRead() {
    std::lock_guard<std::mutex> lock(mu_);
    if (close_enqueued_) return false;
    read_pending_ = true;
    return true;
  }
  // A read completed (on the sessions' thread: the reactor is alive). True when the session is closing
  // and what was read is to be dropped; the call is finished if it is ready.
  bool ReadDone();
  // The session reads no more: the worker closed or broke its stream, it sent what the
  // coordinator refuses (`status`), or the call was cancelled. The ingest thread closes it
  // in the coordinator after the messages read before.
  void StopReading(const grpc::Status& status);
  // The call was cancelled (by the worker or by End): closes unless a pending read will.
  void Cancelled();
  void WriteDone(bool ok);
  void Detach() {  // the call is over: the reactor is gone
    std::lock_guard<std::mutex> lock(mu_);
    reactor_ = nullptr;
  }

  // --- the ingest thread ---
  // The coordinator has closed the session: Finish once the outbox is written.
  void Closed();
  // Starts the next read if the session still reads (it was paused for flow control).
  void ResumeReading();
  // Cancels the call when the outbox was not written within kFlushSeconds of Closed.
  // True once the session is finished (nothing more to watch).
  bool CheckFlushDeadline(std::chrono::steady_clock::time_point now);

  // Guarded by the ingest's mutex: what was read and not yet handled (past the session's
  // budget its reading is paused: Ingest::paused_).
  size_t unhandled_messages = 0;
  size_t unhandled_bytes = 0;

 private:
  struct Queued {
    v1::CoordinatorMessage message;
    std::chrono::steady_clock::time_point queued;
  };
  // Runs `op` on the reactor outside mu_, keeping the reactor alive meanwhile; then
  // finishes the call if it is ready. False: no reactor.
  template <typename Op>
  bool WithReactor(Op op);
  void EndLocked(const std::string& reason);
  // Whether Finish may be called now (and is, by the caller, with `*status`); once only.
  bool ReadyToFinishLocked(grpc::Status* status);
  // Moves the outbox's next message in flight; the message to write, or null. `*options`:
  // how to write it (buffered when more messages follow, so a burst of acks goes out in
  // one socket write: the last of the burst flushes).
  const v1::CoordinatorMessage* NextWriteLocked(grpc::WriteOptions* options);
  void RequestCloseLocked(bool* enqueue);

  mutable std::mutex mu_;
  SessionReactor* reactor_;  // guarded by mu_: null once the call is over (Detach)
  Ingest* const ingest_;
  const std::string peer_;  // for the log: unknown once the call is cancelled
  int64_t id_ = 0;          // the coordinator's session id; set before the first read
  std::deque<Queued> outbox_;                   // guarded by mu_
  size_t outbox_bytes_ = 0;                     // guarded by mu_
  bool writing_ = false;                        // guarded by mu_: in_flight_ is being written
  v1::CoordinatorMessage in_flight_;            // guarded by mu_ (gRPC reads it while writing_)
  std::chrono::steady_clock::time_point in_flight_since_{};  // guarded by mu_: when it was queued
  bool read_pending_ = false;                   // guarded by mu_
  bool read_deferred_ = false;                  // guarded by mu_: DeferRead, not yet started
  uint64_t deferrals_ = 0;                      // guarded by mu_: DeferRead calls
  bool close_enqueued_ = false;                 // guarded by mu_: the ingest thread will close it
  bool closed_ = false;                         // guarded by mu_: the coordinator closed it
  std::chrono::steady_clock::time_point closed_at_{};  // guarded by mu_
  bool flush_cancelled_ = false;                // guarded by mu_
  // The probe cadence of the session's run (ExpectProbes, ProbeFollows), guarded by mu_.
  std::string probed_run_;
  int probe_every_ = 0;
  int64_t probe_total_steps_ = 0;
  int holds_ = 0;                               // guarded by mu_: WithReactor calls running
  bool finish_called_ = false;                  // guarded by mu_
  grpc::Status status_;                         // guarded by mu_: the call's status
  std::string ended_reason_;                    // guarded by mu_: why this side ended it, or ""
  bool stream_broke_ = false;                   // guarded by mu_: a write failed (the worker left)
};

// The thread that hands what sessions read to the coordinator, in batches and in order.
class Ingest {
 public:
  // Every session together: read and not yet handled.
  static constexpr size_t kIngestBudgetBytes = 64 << 20;
  static constexpr size_t kMaxUnhandledMessages = 256;
  static constexpr size_t kMaxUnhandledBytes = 8 << 20;
  static constexpr size_t kMaxBatchMessages = 4096;

  explicit Ingest(Coordinator* coordinator) : coordinator_(coordinator), thread_([this] { Loop(); }) {}
  ~Ingest() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    thread_.join();
  }

  // Queues a message the session read; false: the session must not read on until
  // ResumeReading (its share, or everyone's, is used up).
  bool Push(const std::shared_ptr<WorkerSession>& session, std::unique_ptr<v1::WorkerMessage> message) {
    const size_t bytes = message->ByteSizeLong();
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back({session, std::move(message), bytes});
    bytes_ += bytes;
    session->unhandled_messages += 1;
    session->unhandled_bytes += bytes;
    if (queue_.size() == 1) cv_.notify_one();
    if (session->unhandled_messages >= kMaxUnhandledMessages || session->unhandled_bytes >= kMaxUnhandledBytes ||
        bytes_ >= kIngestBudgetBytes) {
      paused_.push_back(session);
      return false;
    }
    return true;
  }

  // Queues the session's close, after what it read before.
  void PushClose(const std::shared_ptr<WorkerSession>& session) {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back({session, nullptr, 0});
    if (queue_.size() == 1) cv_.notify_one();
  }

 private:
  struct Item {
    std::shared_ptr<WorkerSession> session;
    std::unique_ptr<v1::WorkerMessage> message;  // null: the session's close
    size_t bytes;
  };

  void Loop() {
    pthread_setname_np(pthread_self(), "ingest");  // for top -H, perf and gdb
    std::vector<Item> batch;
    std::vector<Coordinator::WorkerEvent> events;
    std::vector<std::shared_ptr<WorkerSession>> closing;  // closed, maybe still flushing
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait_for(lock, std::chrono::milliseconds(100), [&] { return stop_ || !queue_.empty(); });
      if (stop_ && queue_.empty()) break;
      batch.clear();
      size_t batch_bytes = 0;
      while (!queue_.empty() && batch.size() < kMaxBatchMessages && batch_bytes < kMaxUnhandledBytes) {
        batch_bytes += queue_.front().bytes;
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      lock.unlock();
      events.clear();
      for (const Item& item : batch) events.push_back({item.session->id(), item.message.get()});
      if (!events.empty()) coordinator_->OnWorkerEvents(events);
      for (const Item& item : batch) {
        if (item.message == nullptr) {
          item.session->Closed();
          closing.push_back(item.session);
        }
      }
      const auto now = std::chrono::steady_clock::now();
      closing.erase(std::remove_if(closing.begin(), closing.end(),
                                   [&](const std::shared_ptr<WorkerSession>& s) { return s->CheckFlushDeadline(now); }),
                    closing.end());
      std::vector<std::shared_ptr<WorkerSession>> resume;
      lock.lock();
      for (const Item& item : batch) {
        bytes_ -= item.bytes;
        if (item.message != nullptr) {
          item.session->unhandled_messages -= 1;
          item.session->unhandled_bytes -= item.bytes;
        }
      }
      if (bytes_ < kIngestBudgetBytes) {
        auto still = std::partition(paused_.begin(), paused_.end(), [](const std::shared_ptr<WorkerSession>& s) {
          return s->unhandled_messages >= kMaxUnhandledMessages || s->unhandled_bytes >= kMaxUnhandledBytes;
        });
        for (auto it = still; it != paused_.end(); ++it) resume.push_back(std::move(*it));
        paused_.erase(still, paused_.end());
      }
      lock.unlock();
      batch.clear();  // the messages (and maybe a session's last reference), freed outside the lock
      for (const auto& s : resume) s->ResumeReading();
      resume.clear();
      lock.lock();
    }
  }

  Coordinator* const coordinator_;
  std::mutex mu_;
  std::condition_variable cv_;  // with mu_: something queued, or stop_
  std::deque<Item> queue_;      // guarded by mu_
  size_t bytes_ = 0;            // guarded by mu_: read and not yet handled, every session
  std::vector<std::shared_ptr<WorkerSession>> paused_;  // guarded by mu_
  bool stop_ = false;           // guarded by mu_
  std::thread thread_;          // last: starts once the members above exist
};

// Worker ids are logged, stored with every attempt and shown in status.
constexpr size_t kMaxWorkerIdBytes = 128;
// Bounds on the strings of a worker's messages, checked before the coordinator does any
// work with them (issue 28): run ids are at most ~200 bytes (a 100-character experiment
// name, its number, arm and seed), messages and reasons are for people.
constexpr size_t kMaxRunIdBytes = 256;
constexpr size_t kMaxVersionBytes = 128;
constexpr size_t kMaxReasonBytes = 4096;

// The field of `msg` over its bound and the bound, or "" (a message never echoes the value).
static std::string WorkerMessageBoundsError(const v1::WorkerMessage& msg) {
  auto over = [](const char* field, size_t size, size_t limit) {
    return size <= limit ? std::string()
                         : std::string(field) + " must be at most " + std::to_string(limit) + " bytes, got " +
                               std::to_string(size);
  };
  std::string e;
  switch (msg.message_case()) {
    case v1::WorkerMessage::kRegister:
      e = over("register.run_id", msg.register_().run_id().size(), kMaxRunIdBytes);
      if (e.empty()) e = over("register.capabilities.version", msg.register_().capabilities().version().size(), kMaxVersionBytes);
      break;
    case v1::WorkerMessage::kHeartbeat: e = over("heartbeat.run_id", msg.heartbeat().run_id().size(), kMaxRunIdBytes); break;
    case v1::WorkerMessage::kProgress: e = over("progress.run_id", msg.progress().run_id().size(), kMaxRunIdBytes); break;
    case v1::WorkerMessage::kProbe: e = over("probe.run_id", msg.probe().run_id().size(), kMaxRunIdBytes); break;
    case v1::WorkerMessage::kFinished: e = over("finished.run_id", msg.finished().run_id().size(), kMaxRunIdBytes); break;
    case v1::WorkerMessage::kFailed:
      e = over("failed.run_id", msg.failed().run_id().size(), kMaxRunIdBytes);
      if (e.empty()) e = over("failed.message", msg.failed().message().size(), kMaxReasonBytes);
      break;
    case v1::WorkerMessage::kReleased:
      e = over("released.run_id", msg.released().run_id().size(), kMaxRunIdBytes);
      if (e.empty()) e = over("released.reason", msg.released().reason().size(), kMaxReasonBytes);
      break;
    case v1::WorkerMessage::kRendezvousSet:
      e = over("rendezvous_set.run_id", msg.rendezvous_set().run_id().size(), kMaxRunIdBytes);
      break;
    default:
      break;
  }
  return e;
}


// Flow control: gRPC 1.51's HTTP/2 transport answers a message with a WINDOW_UPDATE frame
// of its own (a socket write here, a wake-up and a read at the worker) when the next read
// is started with nothing buffered; started after the message's ack was written, the
// update rides on the ack's write instead. So a read that had to wait for its message is
// followed by the next one once the ack is written, or kReadDeferral after the read at
// the latest (shorter than the gap between a worker's steps: a worker's next message
// seldom waits). A read that completed at once (within kBufferedRead) is followed at once:
// the worker sent a burst, and the rest is buffered.
constexpr auto kReadDeferral = std::chrono::milliseconds(4);
constexpr auto kBufferedRead = std::chrono::microseconds(500);

// The deferred reads (on the sessions' thread only), in the order they fall due.
class DeferredReads {
 public:
  void Add(std::shared_ptr<WorkerSession> session, uint64_t deferral, std::chrono::steady_clock::time_point due) {
    queue_.push_back({due, std::move(session), deferral});
  }
  // Starts those due by `now`; when the next falls due, if any.
  std::optional<std::chrono::steady_clock::time_point> StartDue(std::chrono::steady_clock::time_point now) {
    while (!queue_.empty() && queue_.front().due <= now) {
      Entry e = std::move(queue_.front());
      queue_.pop_front();
      e.session->StartDeferredRead(e.deferral);
    }
    if (queue_.empty()) return std::nullopt;
    return queue_.front().due;
  }

 private:
  struct Entry {
    std::chrono::steady_clock::time_point due;
    std::shared_ptr<WorkerSession> session;
    uint64_t deferral;  // WorkerSession::DeferRead's number
  };
  std::deque<Entry> queue_;
};

// One Session call on gRPC's completion-queue API. Its operations complete on the
// sessions' queue, whose one thread (WorkerServiceImpl::Loop) runs OnEvent; reads and
// writes are started from that thread, the ingest thread and the coordinator's (through
// WorkerSession, which keeps at most one of each in flight). The call is deleted once its
// Finish has completed and gRPC has reported it done: after Finish nothing starts on it.
class SessionReactor final {
 public:
  enum Op { kRequested, kRead, kWrote, kFinished, kDone };
  struct Tag {
    SessionReactor* call;
    Op op;
  };

  SessionReactor(Coordinator* coordinator, Ingest* ingest, const TokenCheck& auth, DeferredReads* deferred)
      : coordinator_(coordinator), ingest_(ingest), auth_(auth), deferred_(deferred) {}

  // Asks gRPC for the next Session call.
  void Request(v1::WorkerService::AsyncService* service, grpc::ServerCompletionQueue* cq) {
    context_.AsyncNotifyWhenDone(&tags_[kDone]);
    service->RequestSession(&context_, &stream_, cq, cq, &tags_[kRequested]);
  }

  // One of its operations completed (on the sessions' thread). False: the call is over,
  // to be deleted.
  bool OnEvent(Op op, bool ok) {
    switch (op) {
      case kRequested:
        if (!ok) return false;  // the server is shutting down: no call, and no kDone will come
        Start();
        break;
      case kRead:
        OnRead(ok);
        break;
      case kWrote:
        session_->WriteDone(ok);
        break;
      case kFinished:
        finished_ = true;
        break;
      case kDone:
        done_ = true;
        if (context_.IsCancelled() && session_ != nullptr) session_->Cancelled();
        break;
    }
    if (!finished_ || !done_) return true;
    if (session_ != nullptr) session_->Detach();
    return false;
  }

  grpc::ServerContext* context() { return &context_; }

  // Reads the next message unless the session is closing (a cancel from here on fails
  // the read, which then closes the session).
  void StartNextRead() {
    if (!session_->BeginRead()) return;
    read_started_ = std::chrono::steady_clock::now();
    stream_.Read(&incoming_, &tags_[kRead]);
  }
  void StartWrite(const v1::CoordinatorMessage* m, grpc::WriteOptions options) {
    stream_.Write(*m, options, &tags_[kWrote]);
  }
  void Finish(const grpc::Status& status) { stream_.Finish(status, &tags_[kFinished]); }

 private:
  void Start() {
    if (grpc::Status status = auth_.Check(context_, "Session"); !status.ok()) {
      Finish(status);
      return;
    }
    session_ = std::make_shared<WorkerSession>(this, ingest_, context_.peer());
    session_->set_id(coordinator_->OpenSession(session_));
    StartNextRead();
  }

  void OnRead(bool ok) {
    const bool closing = session_->ReadDone();
    if (!ok) {
      session_->StopReading(grpc::Status::OK);
      return;
    }
    if (closing) return;  // cancelled meanwhile: the session reads no more
    if (first_ && incoming_.message_case() != v1::WorkerMessage::kRegister) {
      session_->StopReading(
          grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "a session must start with register"));
      return;
    }
    if (incoming_.message_case() == v1::WorkerMessage::kRegister) {
      const std::string& id = incoming_.register_().worker_id();
      if (id.empty() || id.size() > kMaxWorkerIdBytes) {
        session_->StopReading(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                           "register.worker_id must be 1 to " + std::to_string(kMaxWorkerIdBytes) +
                                               " bytes, got " + std::to_string(id.size())));
        return;
      }
      const size_t name = incoming_.register_().capabilities().device_name().size();
      if (name > kMaxWorkerIdBytes) {
        session_->StopReading(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                           "register.capabilities.device_name must be at most " +
                                               std::to_string(kMaxWorkerIdBytes) + " bytes, got " +
                                               std::to_string(name)));
        return;
      }
    }
    if (std::string bound = WorkerMessageBoundsError(incoming_); !bound.empty()) {
      Log(LogLevel::kWarning, "worker_message_refused", {{"peer", session_->peer()}, {"reason", bound}});
      session_->StopReading(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, bound));
      return;
    }
    // A read that completed at once found the message buffered: more may follow. One that
    // waited for it leaves nothing buffered; it waits for this message's ack (kReadDeferral).
    // A probe step's Progress is followed at once: its probe report comes right behind, the
    // two are handled together and their acks go as one message (MergeAcks). Nothing comes
    // behind that report as a rule, so the read after it waits for the ack, though it found
    // the report buffered (a worker replaying its queue after a reconnect pays a deferral
    // per report: slower, never stuck).
    const auto now = std::chrono::steady_clock::now();
    const bool probe_follows = incoming_.has_progress() && session_->ProbeFollows(incoming_.progress());
    const bool expected_probe = probe_expected_ && incoming_.has_probe();
    probe_expected_ = probe_follows;
    const bool at_once = probe_follows || (!expected_probe && (first_ || now - read_started_ < kBufferedRead));
    first_ = false;
    auto message = std::make_unique<v1::WorkerMessage>();
    message->Swap(&incoming_);
    if (!ingest_->Push(session_, std::move(message))) return;  // paused: ResumeReading reads on
    if (at_once) {
      StartNextRead();
    } else {
      const uint64_t deferral = session_->DeferRead();
      deferred_->Add(session_, deferral, now + kReadDeferral);
    }
  }

  Coordinator* const coordinator_;
  Ingest* const ingest_;
  const TokenCheck& auth_;
  DeferredReads* const deferred_;  // the sessions' thread's
  // When the read in flight started: set by whichever thread starts it, before the Read
  // (gRPC orders it before the completion), read on the sessions' thread at the completion.
  std::chrono::steady_clock::time_point read_started_{};
  grpc::ServerContext context_;
  grpc::ServerAsyncReaderWriter<v1::CoordinatorMessage, v1::WorkerMessage> stream_{&context_};
  Tag tags_[5] = {{this, kRequested}, {this, kRead}, {this, kWrote}, {this, kFinished}, {this, kDone}};
  std::shared_ptr<WorkerSession> session_;  // null when the call was refused at its start
  v1::WorkerMessage incoming_;  // the read in progress
  bool first_ = true;
  bool probe_expected_ = false;  // the last read was a probe step's Progress
  bool finished_ = false, done_ = false;  // the sessions' thread's: Finish completed, gRPC said done
};

template <typename Op>
bool WorkerSession::WithReactor(Op op) {
  SessionReactor* reactor;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (reactor_ == nullptr || finish_called_) return false;
    reactor = reactor_;
    ++holds_;
  }
  op(reactor);
  grpc::Status status;
  bool finish;
  {
    std::lock_guard<std::mutex> lock(mu_);
    --holds_;
    finish = ReadyToFinishLocked(&status);
  }
  if (finish) reactor->Finish(status);
  return true;
}

bool WorkerSession::ReadyToFinishLocked(grpc::Status* status) {
  if (!closed_ || writing_ || read_pending_ || holds_ > 0 || finish_called_ || reactor_ == nullptr) return false;
  finish_called_ = true;
  *status = status_;
  if (!ended_reason_.empty()) {
    Log(LogLevel::kWarning, "worker_session_ended", {{"peer", peer_}, {"reason", ended_reason_}});
    *status = grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "session ended by the coordinator: " + ended_reason_);
  }
  return true;
}

const v1::CoordinatorMessage* WorkerSession::NextWriteLocked(grpc::WriteOptions* options) {
  if (writing_ || outbox_.empty() || !ended_reason_.empty() || stream_broke_) return nullptr;
  in_flight_ = std::move(outbox_.front().message);
  in_flight_since_ = outbox_.front().queued;
  outbox_.pop_front();
  *options = grpc::WriteOptions();
  if (!outbox_.empty()) options->set_buffer_hint();
  outbox_bytes_ -= std::min(outbox_bytes_, in_flight_.ByteSizeLong());
  writing_ = true;
  return &in_flight_;
}

bool WorkerSession::Send(const v1::CoordinatorMessage& m) {
  const size_t bytes = m.ByteSizeLong();
  const v1::CoordinatorMessage* next = nullptr;
  grpc::WriteOptions options;
  bool ended = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_ || reactor_ == nullptr || !ended_reason_.empty() || stream_broke_) return false;
    if (outbox_.size() >= kMaxOutboxMessages || outbox_bytes_ + bytes > kMaxOutboxBytes) {
      EndLocked("its outbox is full (" + std::to_string(outbox_.size()) + " messages, " +
                std::to_string(outbox_bytes_) + " bytes unsent): the worker does not read its stream");
      ended = true;
    } else {
      outbox_.push_back({m, std::chrono::steady_clock::now()});
      outbox_bytes_ += bytes;
      next = NextWriteLocked(&options);
    }
  }
  if (ended) {  // the session was ended above: cancel the call
    WithReactor([](SessionReactor* r) { r->context()->TryCancel(); });
    return false;
  }
  if (next != nullptr) WithReactor([next, options](SessionReactor* r) { r->StartWrite(next, options); });
  return true;
}

void WorkerSession::WriteDone(bool ok) {
  // On the sessions' thread: the reactor is alive throughout.
  const v1::CoordinatorMessage* next = nullptr;
  grpc::WriteOptions options;
  grpc::Status status;
  bool finish = false;
  bool start_read = false;
  SessionReactor* reactor;
  {
    std::lock_guard<std::mutex> lock(mu_);
    reactor = reactor_;
    writing_ = false;
    if (!ok) {
      stream_broke_ = true;  // the worker left or the call was cancelled: nothing more is written
      outbox_.clear();
      outbox_bytes_ = 0;
    }
    next = NextWriteLocked(&options);
    if (next == nullptr) finish = ReadyToFinishLocked(&status);
    start_read = read_deferred_ && !finish;
    read_deferred_ = false;
  }
  if (next != nullptr) reactor->StartWrite(next, options);
  // The ack is written (and with it the window update the last read left queued).
  if (start_read) reactor->StartNextRead();
  if (finish) reactor->Finish(status);
}

void WorkerSession::StartDeferredRead(uint64_t n) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!read_deferred_ || n != deferrals_) return;
    read_deferred_ = false;
  }
  WithReactor([](SessionReactor* r) { r->StartNextRead(); });
}

double WorkerSession::UnreadSeconds() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::optional<std::chrono::steady_clock::time_point> oldest;
  if (writing_) oldest = in_flight_since_;
  else if (!outbox_.empty()) oldest = outbox_.front().queued;
  if (!oldest) return 0;
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - *oldest).count();
}

void WorkerSession::EndLocked(const std::string& reason) {
  if (!ended_reason_.empty() || closed_) return;
  ended_reason_ = reason;
  outbox_.clear();
  outbox_bytes_ = 0;
}

void WorkerSession::End(const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!ended_reason_.empty() || closed_) return;
    EndLocked(reason);
  }
  // The worker's reads and writes fail; a pending read ends the session (StopReading),
  // and so does Cancelled when no read is pending.
  WithReactor([](SessionReactor* r) { r->context()->TryCancel(); });
}

void WorkerSession::RequestCloseLocked(bool* enqueue) {
  *enqueue = !close_enqueued_;
  close_enqueued_ = true;
}

void WorkerSession::StopReading(const grpc::Status& status) {
  bool enqueue;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (status_.ok()) status_ = status;
    RequestCloseLocked(&enqueue);
  }
  if (enqueue) ingest_->PushClose(shared_from_this());
}

void WorkerSession::Cancelled() {
  bool enqueue = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!read_pending_) RequestCloseLocked(&enqueue);  // else the read fails and closes it
  }
  if (enqueue) ingest_->PushClose(shared_from_this());
}

void WorkerSession::ResumeReading() {
  WithReactor([](SessionReactor* r) { r->StartNextRead(); });
}

bool WorkerSession::ReadDone() {
  grpc::Status status;
  bool finish;
  SessionReactor* reactor;
  bool closing;
  {
    std::lock_guard<std::mutex> lock(mu_);
    read_pending_ = false;
    closing = close_enqueued_;
    reactor = reactor_;
    finish = ReadyToFinishLocked(&status);
  }
  if (finish) reactor->Finish(status);
  return closing;
}

void WorkerSession::Closed() {
  grpc::Status status;
  bool finish;
  SessionReactor* reactor;
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    closed_at_ = std::chrono::steady_clock::now();
    reactor = reactor_;
    finish = ReadyToFinishLocked(&status);
  }
  if (finish) reactor->Finish(status);
}

bool WorkerSession::CheckFlushDeadline(std::chrono::steady_clock::time_point now) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (finish_called_ || reactor_ == nullptr) return true;
    if (flush_cancelled_ || now - closed_at_ < std::chrono::duration<double>(kFlushSeconds)) return false;
    flush_cancelled_ = true;
  }
  WithReactor([](SessionReactor* r) { r->context()->TryCancel(); });  // the pending write fails
  return false;
}

grpc::Status TokenCheck::Check(const grpc::ServerContextBase& context, const char* method) const {
  if (token_.empty()) return grpc::Status::OK;
  const auto& metadata = context.client_metadata();
  const auto it = metadata.find(kAuthorizationKey);
  const char* reason = "no authorization metadata";
  if (it != metadata.end()) {
    const std::string_view value(it->second.data(), it->second.size());
    const std::string_view presented = BearerToken(value);
    if (!presented.empty() && ConstantTimeEquals(presented, token_)) return grpc::Status::OK;
    reason = presented.empty() ? "authorization metadata is not a bearer token" : "wrong bearer token";
  }
  {
    // At most one line a second: a client retrying in a loop must not flood the log.
    std::lock_guard<std::mutex> lock(mu_);
    const auto now = std::chrono::steady_clock::now();
    if (now - last_log_ >= std::chrono::seconds(1)) {
      Log(LogLevel::kWarning, "auth_rejected",
          {{"service", service_},
           {"method", method},
           {"peer", context.peer()},
           {"reason", reason},
           {"unlogged_before", std::to_string(unlogged_)}});
      last_log_ = now;
      unlogged_ = 0;
    } else {
      ++unlogged_;
    }
  }
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "missing or invalid bearer token");
}

grpc::Status ExperimentServiceImpl::SubmitExperiment(grpc::ServerContext* ctx, const v1::SubmitExperimentRequest* req,
                                                     v1::SubmitExperimentResponse* resp) {
  if (grpc::Status auth = auth_.Check(*ctx, "SubmitExperiment"); !auth.ok()) return auth;
  if (!req->has_experiment()) return Invalid("experiment", "is required");
  auto r = coordinator_->Submit(req->experiment(), [ctx] { return ctx->IsCancelled(); });
  if (!r.ok()) return ToGrpcStatus(r.status());
  *resp = std::move(*r);
  return grpc::Status::OK;
}

grpc::Status ExperimentServiceImpl::GetExperiment(grpc::ServerContext* ctx, const v1::GetExperimentRequest* req,
                                                  v1::ExperimentSummary* resp) {
  if (grpc::Status auth = auth_.Check(*ctx, "GetExperiment"); !auth.ok()) return auth;
  if (grpc::Status id = CheckId("experiment_id", req->experiment_id()); !id.ok()) return id;
  auto r = coordinator_->GetExperiment(req->experiment_id(), true);
  if (!r.ok()) return ToGrpcStatus(r.status());
  *resp = std::move(*r);
  return grpc::Status::OK;
}

grpc::Status ExperimentServiceImpl::ListExperiments(grpc::ServerContext* ctx, const v1::ListExperimentsRequest* req,
                                                    v1::ListExperimentsResponse* resp) {
  if (grpc::Status auth = auth_.Check(*ctx, "ListExperiments"); !auth.ok()) return auth;
  if (req->limit() < 0) return Invalid("limit", "must not be negative");
  *resp = coordinator_->ListExperiments(req->limit());
  return grpc::Status::OK;
}

grpc::Status ExperimentServiceImpl::CancelExperiment(grpc::ServerContext* ctx, const v1::CancelExperimentRequest* req,
                                                     v1::ExperimentSummary* resp) {
  if (grpc::Status auth = auth_.Check(*ctx, "CancelExperiment"); !auth.ok()) return auth;
  if (grpc::Status id = CheckId("experiment_id", req->experiment_id()); !id.ok()) return id;
  auto r = coordinator_->Cancel(req->experiment_id());
  if (!r.ok()) return ToGrpcStatus(r.status());
  *resp = std::move(*r);
  return grpc::Status::OK;
}

grpc::Status ExperimentServiceImpl::WatchExperiment(grpc::ServerContext* ctx, const v1::WatchExperimentRequest* req,
                                                    grpc::ServerWriter<v1::WatchEvent>* writer) {
  if (grpc::Status auth = auth_.Check(*ctx, "WatchExperiment"); !auth.ok()) return auth;
  if (grpc::Status id = CheckId("experiment_id", req->experiment_id()); !id.ok()) return id;
  auto w = coordinator_->Watch(req->experiment_id(), req->include_probes());
  if (!w.ok()) return ToGrpcStatus(w.status());
  std::shared_ptr<Watcher> watcher = *w;
  grpc::Status result = grpc::Status::OK;
  while (true) {
    std::deque<v1::WatchEvent> batch;
    bool ended;
    {
      std::unique_lock<std::mutex> lock(watcher->mu);
      watcher->cv.wait_for(lock, std::chrono::milliseconds(250), [&] { return !watcher->events.empty(); });
      batch.swap(watcher->events);
      watcher->queued_bytes = 0;
      ended = watcher->ended;
    }
    bool ok = true;
    for (const auto& e : batch) ok = ok && writer->Write(e);
    if (!ok || ctx->IsCancelled()) {
      result = grpc::Status(grpc::StatusCode::CANCELLED, "the watcher went away");
      break;
    }
    if (ended && batch.empty()) break;  // the final snapshot has been written
    if (shutting_down_->load()) {
      result = grpc::Status(grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down");
      break;
    }
  }
  coordinator_->Unwatch(watcher);
  return result;
}

grpc::Status ExperimentServiceImpl::GetRunMetrics(grpc::ServerContext* ctx, const v1::GetRunMetricsRequest* req,
                                                  v1::GetRunMetricsResponse* resp) {
  if (grpc::Status auth = auth_.Check(*ctx, "GetRunMetrics"); !auth.ok()) return auth;
  if (grpc::Status id = CheckId("run_id", req->run_id()); !id.ok()) return id;
  auto r = coordinator_->GetRunMetrics(*req);
  if (!r.ok()) return ToGrpcStatus(r.status());
  *resp = std::move(*r);
  return grpc::Status::OK;
}

grpc::Status ExperimentServiceImpl::CompareArms(grpc::ServerContext* ctx, const v1::CompareArmsRequest* req,
                                                v1::CompareArmsResponse* resp) {
  if (grpc::Status auth = auth_.Check(*ctx, "CompareArms"); !auth.ok()) return auth;
  if (grpc::Status id = CheckId("experiment_id", req->experiment_id()); !id.ok()) return id;
  if (req->step() < 0) return Invalid("step", "must not be negative");
  auto r = coordinator_->CompareArms(*req);
  if (!r.ok()) return ToGrpcStatus(r.status());
  *resp = std::move(*r);
  return grpc::Status::OK;
}

grpc::health::v1::HealthCheckResponse::ServingStatus HealthServiceImpl::StatusOf(const std::string& service) const {
  using grpc::health::v1::HealthCheckResponse;
  if (!service.empty() && service != v1::ExperimentService::service_full_name() &&
      service != v1::WorkerService::service_full_name()) {
    return HealthCheckResponse::SERVICE_UNKNOWN;
  }
  return shutting_down_->load() ? HealthCheckResponse::NOT_SERVING : HealthCheckResponse::SERVING;
}

grpc::Status HealthServiceImpl::Check(grpc::ServerContext*, const grpc::health::v1::HealthCheckRequest* req,
                                      grpc::health::v1::HealthCheckResponse* resp) {
  const auto status = StatusOf(req->service());
  if (status == grpc::health::v1::HealthCheckResponse::SERVICE_UNKNOWN) {
    if (req->service().size() > kMaxIdBytes) return Invalid("service", "is not a service of this server");
    return grpc::Status(grpc::StatusCode::NOT_FOUND, "no service " + req->service() + " on this server");
  }
  resp->set_status(status);
  return grpc::Status::OK;
}

grpc::Status HealthServiceImpl::Watch(grpc::ServerContext* ctx, const grpc::health::v1::HealthCheckRequest* req,
                                      grpc::ServerWriter<grpc::health::v1::HealthCheckResponse>* writer) {
  if (watchers_.fetch_add(1) >= kMaxWatchers) {
    watchers_.fetch_sub(1);
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        "at most " + std::to_string(kMaxWatchers) + " health watchers at a time");
  }
  grpc::Status result = grpc::Status::OK;
  std::optional<grpc::health::v1::HealthCheckResponse::ServingStatus> sent;
  while (true) {
    const auto status = StatusOf(req->service());
    if (status != sent) {
      grpc::health::v1::HealthCheckResponse resp;
      resp.set_status(status);
      if (!writer->Write(resp)) break;
      sent = status;
    }
    if (shutting_down_->load()) {
      result = grpc::Status(grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down");
      break;
    }
    if (ctx->IsCancelled()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  watchers_.fetch_sub(1);
  return result;
}

WorkerServiceImpl::WorkerServiceImpl(Coordinator* coordinator, std::string worker_token)
    : coordinator_(coordinator), auth_("WorkerService", std::move(worker_token)),
      ingest_(std::make_unique<Ingest>(coordinator)), deferred_(std::make_unique<DeferredReads>()) {}

WorkerServiceImpl::~WorkerServiceImpl() { Stop(); }

void WorkerServiceImpl::Start(std::unique_ptr<grpc::ServerCompletionQueue> cq) {
  cq_ = std::move(cq);
  thread_ = std::thread([this] { Loop(); });
}

void WorkerServiceImpl::RequestCall() {
  auto* call = new SessionReactor(coordinator_, ingest_.get(), auth_, deferred_.get());
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++calls_;
  }
  call->Request(&service_, cq_.get());
}

void WorkerServiceImpl::Loop() {
  pthread_setname_np(pthread_self(), "sessions");  // for top -H, perf and gdb
  RequestCall();
  void* tag = nullptr;
  bool ok = false;
  while (true) {
    const auto now = std::chrono::steady_clock::now();
    const auto due = deferred_->StartDue(now);
    if (due) {
      // gRPC rounds the deadline up to its next millisecond.
      const auto wait = std::chrono::duration_cast<std::chrono::microseconds>(*due - now).count();
      const auto st = cq_->AsyncNext(&tag, &ok, gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                                             gpr_time_from_micros(wait, GPR_TIMESPAN)));
      if (st == grpc::CompletionQueue::SHUTDOWN) break;
      if (st == grpc::CompletionQueue::TIMEOUT) continue;
    } else if (!cq_->Next(&tag, &ok)) {
      break;
    }
    auto* t = static_cast<SessionReactor::Tag*>(tag);
    if (t->op == SessionReactor::kRequested && ok) RequestCall();  // one call is always requested
    if (!t->call->OnEvent(t->op, ok)) {
      delete t->call;
      std::lock_guard<std::mutex> lock(mu_);
      if (--calls_ == 0) calls_cv_.notify_all();
    }
  }
}

void WorkerServiceImpl::Stop() {
  if (!thread_.joinable()) return;
  // After the server's Shutdown: the requested call fails and the open ones are cancelled;
  // each is finished once the ingest thread has closed its session. Then the queue.
  // No time limit: a call still open may yet start a read, write or finish, which must not
  // find the queue shut down (the ingest thread, behind a slow store, closes sessions late).
  {
    std::unique_lock<std::mutex> lock(mu_);
    while (!calls_cv_.wait_for(lock, std::chrono::seconds(10), [this] { return calls_ == 0; })) {
      Log(LogLevel::kWarning, "worker_sessions_unfinished", {{"sessions", std::to_string(calls_)}});
    }
  }
  cq_->Shutdown();
  thread_.join();
}

}  // namespace sinkscope

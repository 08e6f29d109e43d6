#include "server/services.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <optional>
#include <thread>

#include "schema/grpc_status.h"
#include "schema/credentials.h"
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

// One worker's Session stream, written by its own thread from a bounded outbox: the
// scheduler only queues (Send never blocks), so a worker that stops reading holds up
// nobody but itself. Policy when the outbox is full (kMaxMessages or kMaxBytes): the
// session is ended with that reason, as if the worker had disconnected; its runs keep
// their lease until it lapses, as for any lost worker. The scheduler also ends a session
// whose oldest unread message has waited a lease period (UnreadSeconds), so a worker that
// stops reading loses its leases like a dead one even when it sends little.
class StreamWriter final : public SessionWriter {
 public:
  static constexpr size_t kMaxMessages = 4096;
  static constexpr size_t kMaxBytes = 32 << 20;

  StreamWriter(grpc::ServerContext* context,
               grpc::ServerReaderWriter<v1::CoordinatorMessage, v1::WorkerMessage>* stream)
      : context_(context), stream_(stream), thread_([this] { WriteLoop(); }) {}
  ~StreamWriter() override { Finish(); }

  bool Send(const v1::CoordinatorMessage& m) override {
    const size_t bytes = m.ByteSizeLong();
    std::lock_guard<std::mutex> lock(mu_);
    if (closing_ || !ended_reason_.empty()) return false;
    if (queue_.size() >= kMaxMessages || queued_bytes_ + bytes > kMaxBytes) {
      EndLocked("its outbox is full (" + std::to_string(queue_.size()) + " messages, " +
                std::to_string(queued_bytes_) + " bytes unsent): the worker does not read its stream");
      return false;
    }
    queue_.push_back({m, std::chrono::steady_clock::now()});
    queued_bytes_ += bytes;
    cv_.notify_one();
    return true;
  }

  double UnreadSeconds() const override {
    std::lock_guard<std::mutex> lock(mu_);
    std::optional<std::chrono::steady_clock::time_point> oldest = in_flight_since_;
    if (!oldest && !queue_.empty()) oldest = queue_.front().queued;
    if (!oldest) return 0;
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - *oldest).count();
  }

  void End(const std::string& reason) override {
    std::lock_guard<std::mutex> lock(mu_);
    EndLocked(reason);
  }

  // Why the session was ended by this side, or "".
  std::string ended_reason() const {
    std::lock_guard<std::mutex> lock(mu_);
    return ended_reason_;
  }

  // The reader is done: what is queued is written within kFlushSeconds, then the stream
  // is cancelled if the worker still does not take it; the writer thread is joined.
  void Finish() {
    {
      std::unique_lock<std::mutex> lock(mu_);
      closing_ = true;
      cv_.notify_all();
      if (!done_cv_.wait_for(lock, std::chrono::seconds(kFlushSeconds), [&] { return writer_done_; })) {
        context_->TryCancel();  // Write returns false once the call is cancelled
      }
    }
    if (thread_.joinable()) thread_.join();
    std::lock_guard<std::mutex> lock(mu_);
    finished_ = true;
  }

 private:
  static constexpr int kFlushSeconds = 2;
  struct Queued {
    v1::CoordinatorMessage message;
    std::chrono::steady_clock::time_point queued;
  };

  void EndLocked(const std::string& reason) {
    if (!ended_reason_.empty() || finished_) return;  // finished: the call (context_) may be gone
    ended_reason_ = reason;
    queue_.clear();
    queued_bytes_ = 0;
    context_->TryCancel();  // never blocks: the reader's Read and our Write fail
    cv_.notify_all();
  }

  void WriteLoop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [&] { return !queue_.empty() || closing_ || !ended_reason_.empty(); });
      if (!ended_reason_.empty() || queue_.empty()) break;  // ended, or closing with nothing left
      Queued next = std::move(queue_.front());
      queue_.pop_front();
      queued_bytes_ -= std::min(queued_bytes_, next.message.ByteSizeLong());
      in_flight_since_ = next.queued;
      lock.unlock();
      const bool ok = stream_->Write(next.message);
      lock.lock();
      in_flight_since_.reset();
      if (!ok) {
        if (ended_reason_.empty()) ended_reason_ = "the stream closed";
        queue_.clear();
        queued_bytes_ = 0;
        break;
      }
    }
    writer_done_ = true;
    done_cv_.notify_all();
  }

  grpc::ServerContext* const context_;
  grpc::ServerReaderWriter<v1::CoordinatorMessage, v1::WorkerMessage>* const stream_;  // written by thread_ only
  mutable std::mutex mu_;
  std::condition_variable cv_;       // with mu_: a message queued, or closing
  std::condition_variable done_cv_;  // with mu_: the writer thread ended
  std::deque<Queued> queue_;         // guarded by mu_
  size_t queued_bytes_ = 0;          // guarded by mu_
  std::optional<std::chrono::steady_clock::time_point> in_flight_since_;  // guarded by mu_: queued time of the message being written
  std::string ended_reason_;         // guarded by mu_
  bool closing_ = false;             // guarded by mu_
  bool writer_done_ = false;         // guarded by mu_
  bool finished_ = false;            // guarded by mu_: Finish returned; context_ and stream_ may be gone
  std::thread thread_;               // last: starts once the members above exist
};

}  // namespace

grpc::Status TokenCheck::Check(const grpc::ServerContext& context, const char* method) const {
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

// Worker ids are logged, stored with every attempt and shown in status.
constexpr size_t kMaxWorkerIdBytes = 128;
// Bounds on the strings of a worker's messages, checked before the coordinator does any
// work with them (issue 28): run ids are at most ~200 bytes (a 100-character experiment
// name, its number, arm and seed), messages and reasons are for people.
constexpr size_t kMaxRunIdBytes = 256;
constexpr size_t kMaxVersionBytes = 128;
constexpr size_t kMaxReasonBytes = 4096;

// The field of `msg` over its bound and the bound, or "" (a message never echoes the value).
std::string WorkerMessageBoundsError(const v1::WorkerMessage& msg) {
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

grpc::Status WorkerServiceImpl::Session(grpc::ServerContext* ctx,
                                        grpc::ServerReaderWriter<v1::CoordinatorMessage, v1::WorkerMessage>* stream) {
  if (grpc::Status auth = auth_.Check(*ctx, "Session"); !auth.ok()) return auth;
  const std::string peer = ctx->peer();  // for the log: unknown once the call is cancelled
  auto writer = std::make_shared<StreamWriter>(ctx, stream);
  const int64_t session = coordinator_->OpenSession(writer);
  v1::WorkerMessage msg;
  bool first = true;
  grpc::Status result = grpc::Status::OK;
  while (stream->Read(&msg)) {
    if (first && msg.message_case() != v1::WorkerMessage::kRegister) {
      result = grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "a session must start with register");
      break;
    }
    if (msg.message_case() == v1::WorkerMessage::kRegister) {
      const std::string& id = msg.register_().worker_id();
      if (id.empty() || id.size() > kMaxWorkerIdBytes) {
        result = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                              "register.worker_id must be 1 to " + std::to_string(kMaxWorkerIdBytes) +
                                  " bytes, got " + std::to_string(id.size()));
        break;
      }
      const size_t name = msg.register_().capabilities().device_name().size();
      if (name > kMaxWorkerIdBytes) {
        result = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                              "register.capabilities.device_name must be at most " +
                                  std::to_string(kMaxWorkerIdBytes) + " bytes, got " + std::to_string(name));
        break;
      }
    }
    if (std::string bound = WorkerMessageBoundsError(msg); !bound.empty()) {
      result = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, bound);
      Log(LogLevel::kWarning, "worker_message_refused", {{"peer", peer}, {"reason", bound}});
      break;
    }
    first = false;
    coordinator_->OnWorkerMessage(session, msg);
  }
  coordinator_->CloseSession(session);
  writer->Finish();  // the stream must outlive its writer thread
  if (const std::string why = writer->ended_reason(); !why.empty() && why != "the stream closed") {
    Log(LogLevel::kWarning, "worker_session_ended", {{"peer", peer}, {"reason", why}});
    result = grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "session ended by the coordinator: " + why);
  }
  return result;
}

}  // namespace sinkscope

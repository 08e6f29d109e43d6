#include "server/services.h"

#include <chrono>

#include "schema/grpc_status.h"
#include "schema/credentials.h"
#include "base/log.h"

namespace sinkscope {
namespace {

grpc::Status Invalid(const std::string& field, const std::string& why) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, field + ": " + why);
}

// Writes to one worker's stream; one writer at a time.
class StreamWriter final : public SessionWriter {
 public:
  explicit StreamWriter(grpc::ServerReaderWriter<v1::CoordinatorMessage, v1::WorkerMessage>* stream)
      : stream_(stream) {}
  bool Send(const v1::CoordinatorMessage& m) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return false;
    return stream_->Write(m);
  }
  void Close() {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
  }

 private:
  std::mutex mu_;
  grpc::ServerReaderWriter<v1::CoordinatorMessage, v1::WorkerMessage>* stream_;  // guarded by mu_
  bool closed_ = false;                                                         // guarded by mu_
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
  auto r = coordinator_->Submit(req->experiment());
  if (!r.ok()) return ToGrpcStatus(r.status());
  *resp = std::move(*r);
  return grpc::Status::OK;
}

grpc::Status ExperimentServiceImpl::GetExperiment(grpc::ServerContext* ctx, const v1::GetExperimentRequest* req,
                                                  v1::ExperimentSummary* resp) {
  if (grpc::Status auth = auth_.Check(*ctx, "GetExperiment"); !auth.ok()) return auth;
  if (req->experiment_id().empty()) return Invalid("experiment_id", "is required");
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
  if (req->experiment_id().empty()) return Invalid("experiment_id", "is required");
  auto r = coordinator_->Cancel(req->experiment_id());
  if (!r.ok()) return ToGrpcStatus(r.status());
  *resp = std::move(*r);
  return grpc::Status::OK;
}

grpc::Status ExperimentServiceImpl::WatchExperiment(grpc::ServerContext* ctx, const v1::WatchExperimentRequest* req,
                                                    grpc::ServerWriter<v1::WatchEvent>* writer) {
  if (grpc::Status auth = auth_.Check(*ctx, "WatchExperiment"); !auth.ok()) return auth;
  if (req->experiment_id().empty()) return Invalid("experiment_id", "is required");
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
  if (req->run_id().empty()) return Invalid("run_id", "is required");
  auto r = coordinator_->GetRunMetrics(*req);
  if (!r.ok()) return ToGrpcStatus(r.status());
  *resp = std::move(*r);
  return grpc::Status::OK;
}

grpc::Status ExperimentServiceImpl::CompareArms(grpc::ServerContext* ctx, const v1::CompareArmsRequest* req,
                                                v1::CompareArmsResponse* resp) {
  if (grpc::Status auth = auth_.Check(*ctx, "CompareArms"); !auth.ok()) return auth;
  if (req->experiment_id().empty()) return Invalid("experiment_id", "is required");
  if (req->step() < 0) return Invalid("step", "must not be negative");
  auto r = coordinator_->CompareArms(*req);
  if (!r.ok()) return ToGrpcStatus(r.status());
  *resp = std::move(*r);
  return grpc::Status::OK;
}

// Worker ids are logged, stored with every attempt and shown in status.
constexpr size_t kMaxWorkerIdBytes = 128;

grpc::Status WorkerServiceImpl::Session(grpc::ServerContext* ctx,
                                        grpc::ServerReaderWriter<v1::CoordinatorMessage, v1::WorkerMessage>* stream) {
  if (grpc::Status auth = auth_.Check(*ctx, "Session"); !auth.ok()) return auth;
  auto writer = std::make_shared<StreamWriter>(stream);
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
    first = false;
    coordinator_->OnWorkerMessage(session, msg);
  }
  coordinator_->CloseSession(session);
  writer->Close();
  return result;
}

}  // namespace sinkscope

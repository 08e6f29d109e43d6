// The gRPC face of the coordinator: thin handlers that check the caller's bearer token,
// validate, call the Coordinator, and convert its Status to a gRPC status.
//
// Authentication: each service may require its own bearer token (the CLI's on
// ExperimentService, the workers' on WorkerService), checked at the start of every
// handler, so it works over TLS and plaintext alike. The health service and reflection
// are not ours and stay open (probes use them). See docs/security.md.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "proto/grpc/health/v1/health.grpc.pb.h"
#include "proto/sinkscope/v1/service.grpc.pb.h"
#include "server/coordinator.h"

namespace sinkscope {

// The bearer-token check of one service: the call must carry the metadata
// `authorization: Bearer <token>` with exactly `token` (compared in constant time). An
// empty token lets every call through. A rejected call gets UNAUTHENTICATED "missing or
// invalid bearer token" and a warning in the log (the peer, the method and whether a
// token was missing or wrong; never the token), at most one a second, with the count
// of those left out.
class TokenCheck {
 public:
  TokenCheck(std::string service, std::string token) : service_(std::move(service)), token_(std::move(token)) {}
  grpc::Status Check(const grpc::ServerContextBase& context, const char* method) const;
  bool enabled() const { return !token_.empty(); }

 private:
  const std::string service_;
  const std::string token_;
  mutable std::mutex mu_;
  mutable std::chrono::steady_clock::time_point last_log_{};  // guarded by mu_
  mutable int64_t unlogged_ = 0;                               // guarded by mu_
};

class ExperimentServiceImpl final : public v1::ExperimentService::Service {
 public:
  // `client_token`: the bearer token every call must carry; empty: none required.
  explicit ExperimentServiceImpl(Coordinator* coordinator, const std::atomic<bool>* shutting_down,
                                 std::string client_token = {})
      : coordinator_(coordinator), shutting_down_(shutting_down), auth_("ExperimentService", std::move(client_token)) {}

  grpc::Status SubmitExperiment(grpc::ServerContext*, const v1::SubmitExperimentRequest*,
                                v1::SubmitExperimentResponse*) override;
  grpc::Status GetExperiment(grpc::ServerContext*, const v1::GetExperimentRequest*, v1::ExperimentSummary*) override;
  grpc::Status ListExperiments(grpc::ServerContext*, const v1::ListExperimentsRequest*,
                               v1::ListExperimentsResponse*) override;
  grpc::Status CancelExperiment(grpc::ServerContext*, const v1::CancelExperimentRequest*,
                                v1::ExperimentSummary*) override;
  grpc::Status WatchExperiment(grpc::ServerContext*, const v1::WatchExperimentRequest*,
                               grpc::ServerWriter<v1::WatchEvent>*) override;
  grpc::Status GetRunMetrics(grpc::ServerContext*, const v1::GetRunMetricsRequest*,
                             v1::GetRunMetricsResponse*) override;
  grpc::Status CompareArms(grpc::ServerContext*, const v1::CompareArmsRequest*, v1::CompareArmsResponse*) override;

 private:
  Coordinator* coordinator_;
  const std::atomic<bool>* shutting_down_;
  const TokenCheck auth_;
};

// grpc.health.v1.Health on the sync API (gRPC's built-in one runs on its callback
// threads, which would poll beside the sessions' thread and take its work by turns).
// "" and the coordinator's two services are SERVING until shutdown, then NOT_SERVING;
// another name is NOT_FOUND (Check) or SERVICE_UNKNOWN (Watch). Watch answers at once and
// again on each change; at most kMaxWatchers at a time, as each holds a thread.
class HealthServiceImpl final : public grpc::health::v1::Health::Service {
 public:
  static constexpr int kMaxWatchers = 16;
  explicit HealthServiceImpl(const std::atomic<bool>* shutting_down) : shutting_down_(shutting_down) {}
  grpc::Status Check(grpc::ServerContext*, const grpc::health::v1::HealthCheckRequest*,
                     grpc::health::v1::HealthCheckResponse*) override;
  grpc::Status Watch(grpc::ServerContext*, const grpc::health::v1::HealthCheckRequest*,
                     grpc::ServerWriter<grpc::health::v1::HealthCheckResponse>*) override;

 private:
  // The status of `service`; SERVICE_UNKNOWN for a name the server does not serve.
  grpc::health::v1::HealthCheckResponse::ServingStatus StatusOf(const std::string& service) const;
  const std::atomic<bool>* shutting_down_;
  std::atomic<int> watchers_{0};
};

class Ingest;         // services.cc
class DeferredReads;  // services.cc

// WorkerService on gRPC's completion-queue API: one thread runs every Session's
// operations (no thread per stream), and a single ingest thread hands what the sessions
// read to the coordinator in batches (services.cc says how each direction is bounded).
// Registered with the server through service(); Start once the server has started, with
// its completion queue (which it then owns); Stop (or destruction) after the server's
// Shutdown.
class WorkerServiceImpl final {
 public:
  // `worker_token`: the bearer token a Session must carry; empty: none required.
  explicit WorkerServiceImpl(Coordinator* coordinator, std::string worker_token = {});
  ~WorkerServiceImpl();
  grpc::Service* service() { return &service_; }
  void Start(std::unique_ptr<grpc::ServerCompletionQueue> cq);
  // Waits for every call to finish (the server's Shutdown cancels the open ones; each
  // finishes once the ingest thread has closed its session; a wait past 10 s is logged),
  // then shuts the queue down: nothing may start on it after that.
  void Stop();

 private:
  void RequestCall();
  void Loop();

  Coordinator* coordinator_;
  const TokenCheck auth_;
  v1::WorkerService::AsyncService service_;
  std::unique_ptr<grpc::ServerCompletionQueue> cq_;  // outlives the ingest thread (declared first)
  std::unique_ptr<Ingest> ingest_;
  std::unique_ptr<DeferredReads> deferred_;  // the sessions' thread's
  std::mutex mu_;
  std::condition_variable calls_cv_;  // with mu_: calls_ reached 0
  int calls_ = 0;                     // guarded by mu_: requested or open calls
  std::thread thread_;
};

}  // namespace sinkscope

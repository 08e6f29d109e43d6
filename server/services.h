// The gRPC face of the coordinator: thin handlers that validate, call the Coordinator,
// and convert its Status to a gRPC status.
#pragma once

#include <atomic>

#include "proto/sinkscope/v1/service.grpc.pb.h"
#include "server/coordinator.h"

namespace sinkscope {

class ExperimentServiceImpl final : public v1::ExperimentService::Service {
 public:
  explicit ExperimentServiceImpl(Coordinator* coordinator, const std::atomic<bool>* shutting_down)
      : coordinator_(coordinator), shutting_down_(shutting_down) {}

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
};

class WorkerServiceImpl final : public v1::WorkerService::Service {
 public:
  explicit WorkerServiceImpl(Coordinator* coordinator) : coordinator_(coordinator) {}
  grpc::Status Session(grpc::ServerContext*,
                       grpc::ServerReaderWriter<v1::CoordinatorMessage, v1::WorkerMessage>* stream) override;

 private:
  Coordinator* coordinator_;
};

}  // namespace sinkscope

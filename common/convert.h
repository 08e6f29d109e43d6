// Conversions between the engine's plain structs and the wire schema, and from the
// project's Status to gRPC's (the codes are the same canonical codes).
#pragma once

#include <grpcpp/support/status.h>

#include "proto/sinkscope/v1/experiment.pb.h"
#include "proto/sinkscope/v1/metrics.pb.h"
#include "worker/engine/probes.h"
#include "worker/engine/status.h"
#include "worker/trainer.h"

namespace sinkscope {

v1::ProbeReport ToProto(const ProbeReport& report);
ProbeSettings ToProbeSettings(const v1::ProbeSpec& spec);
ProbeBatchKind ToProbeBatchKind(const v1::ProbeSpec& spec);

inline grpc::Status ToGrpcStatus(const Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), s.message());
}
inline Status FromGrpcStatus(const grpc::Status& s) {
  if (s.ok()) return OkStatus();
  return Status(static_cast<StatusCode>(s.error_code()), s.error_message());
}

}  // namespace sinkscope

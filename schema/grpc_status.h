// The project's Status to gRPC's and back: the codes are the same canonical codes.
#pragma once

#include <grpcpp/support/status.h>

#include "base/status.h"

namespace sinkscope {

inline grpc::Status ToGrpcStatus(const Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), s.message());
}
inline Status FromGrpcStatus(const grpc::Status& s) {
  if (s.ok()) return OkStatus();
  return Status(static_cast<StatusCode>(s.error_code()), s.error_message());
}

}  // namespace sinkscope

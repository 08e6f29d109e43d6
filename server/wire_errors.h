// What a peer sees when its bytes are not a message of the method's request type.
//
// gRPC's protobuf deserializer answers such a request INTERNAL with an empty message
// (proto3 refuses a string field whose bytes are not UTF-8; any malformed payload fails the
// same way). The interceptor below turns that status into INVALID_ARGUMENT naming the
// method, the request type and, for a string that is not UTF-8, the field (protobuf's own
// parser names it in a log line, caught by the log handler on the thread that parsed).
// The peer's bytes are never echoed. The log handler also makes protobuf's log lines
// structured (event=protobuf) instead of its own format on stderr.
#pragma once

#include <memory>

#include <grpcpp/support/server_interceptor.h>

namespace sinkscope {

// Routes protobuf's log lines to base/log.h and remembers, per thread, the field a parse
// refused as not UTF-8. Call once, before the server starts.
void InstallProtobufLogHandler();

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeWireErrorInterceptorFactory();

}  // namespace sinkscope

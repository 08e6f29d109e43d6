#include "server/wire_errors.h"

#include <google/protobuf/stubs/logging.h>

#include <string>

#include "base/log.h"

namespace sinkscope {
namespace {

// The field protobuf's parser last refused as not UTF-8 on this thread (a sync server
// parses a request on the thread that then sends its status), taken once.
thread_local std::string bad_utf8_field;

void OnProtobufLog(google::protobuf::LogLevel level, const char* filename, int line, const std::string& message) {
  // "String field 'pkg.Msg.field' contains invalid UTF-8 data when parsing ...": the name
  // comes from our descriptors, never from the peer.
  const std::string marker = "String field '";
  if (const size_t at = message.find(marker); at != std::string::npos && message.find("UTF-8") != std::string::npos) {
    const size_t begin = at + marker.size(), end = message.find('\'', begin);
    if (end != std::string::npos) bad_utf8_field = message.substr(begin, end - begin);
    Log(LogLevel::kInfo, "protobuf", {{"message", "a string field that is not UTF-8 was refused"},
                                     {"field", bad_utf8_field}});
    return;
  }
  const LogLevel ours = level >= google::protobuf::LOGLEVEL_ERROR     ? LogLevel::kError
                        : level == google::protobuf::LOGLEVEL_WARNING ? LogLevel::kWarning
                                                                      : LogLevel::kInfo;
  Log(ours, "protobuf", {{"message", message}, {"at", std::string(filename) + ":" + std::to_string(line)}});
}

class WireErrorInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit WireErrorInterceptor(grpc::experimental::ServerRpcInfo* info) : method_(info->method()) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    using grpc::experimental::InterceptionHookPoints;
    // A request parsed: whatever an earlier parse on this thread left (a stream's message
    // refused mid-stream, whose call ends without an empty INTERNAL) is not this call's.
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_MESSAGE) &&
        methods->GetRecvMessage() != nullptr) {
      bad_utf8_field.clear();
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status status = methods->GetSendStatus();
      // Every handler of ours says what went wrong: an empty INTERNAL is the deserializer's.
      if (status.error_code() == grpc::StatusCode::INTERNAL && status.error_message().empty()) {
        std::string field;
        field.swap(bad_utf8_field);
        const std::string what =
            field.empty() ? "its bytes are not a valid protobuf message of the method's request type"
                          : "string field " + field + " holds bytes that are not UTF-8 (proto3 strings must be "
                            "valid UTF-8; send such data as bytes, or fix the encoding)";
        methods->ModifySendStatus(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                               "the request to " + method_ + " was refused: " + what +
                                                   "; nothing was done"));
        Log(LogLevel::kInfo, "request_refused", {{"method", method_}, {"reason", field.empty() ? "malformed" : field}});
      }
    }
    methods->Proceed();
  }

 private:
  const std::string method_;
};

class WireErrorInterceptorFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override {
    return new WireErrorInterceptor(info);
  }
};

}  // namespace

void InstallProtobufLogHandler() { google::protobuf::SetLogHandler(&OnProtobufLog); }

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeWireErrorInterceptorFactory() {
  return std::make_unique<WireErrorInterceptorFactory>();
}

}  // namespace sinkscope

// sinkscope-health: asks a gRPC server's standard health service (grpc.health.v1.Health/
// Check) whether it is SERVING, and says so in its exit status. It is the Docker
// HEALTHCHECK of the images (Kubernetes probes gRPC health natively).
//
// Over TLS (a coordinator started with --tls-cert) give --tls-ca, and for mutual TLS
// --tls-cert and --tls-key; the health service itself asks for no token.
//
// The two messages are tiny, so they are written and read by hand instead of linking
// generated code for health.proto (which Debian's libgrpc++ does not install):
//   HealthCheckRequest  { string service = 1; }
//   HealthCheckResponse { ServingStatus status = 1; }  // UNKNOWN 0, SERVING 1, NOT_SERVING 2, SERVICE_UNKNOWN 3
// so SERVING is the two bytes 0x08 0x01, and the empty request is zero bytes.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <iterator>
#include <memory>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "base/flags.h"

namespace sinkscope {
namespace {


constexpr int kExitServing = 0;
constexpr int kExitNotServing = 1;
constexpr int kExitUsage = 2;

// HealthCheckRequest{service}: field 1, wire type 2 (length-delimited).
std::string EncodeRequest(const std::string& service) {
  std::string out;
  if (service.empty()) return out;  // proto3: an empty string is not written
  out.push_back(static_cast<char>((1 << 3) | 2));
  for (uint64_t n = service.size(); ; n >>= 7) {  // varint length
    if (n < 0x80) {
      out.push_back(static_cast<char>(n));
      break;
    }
    out.push_back(static_cast<char>((n & 0x7f) | 0x80));
  }
  return out + service;
}

bool ReadVarint(const std::string& in, size_t& pos, uint64_t& value) {
  value = 0;
  for (int shift = 0; pos < in.size() && shift < 64; shift += 7) {
    const auto byte = static_cast<uint8_t>(in[pos++]);
    value |= static_cast<uint64_t>(byte & 0x7f) << shift;
    if ((byte & 0x80) == 0) return true;
  }
  return false;
}

// HealthCheckResponse.status (field 1, varint); absent means UNKNOWN (0). Fields we do
// not know are skipped, as protobuf would.
std::optional<uint64_t> DecodeStatus(const std::string& in) {
  uint64_t status = 0;
  for (size_t pos = 0; pos < in.size();) {
    uint64_t key = 0, value = 0;
    if (!ReadVarint(in, pos, key)) return std::nullopt;
    switch (key & 7) {
      case 0:  // varint
        if (!ReadVarint(in, pos, value)) return std::nullopt;
        if ((key >> 3) == 1) status = value;
        break;
      case 1:  // 64-bit
        pos += 8;
        break;
      case 2:  // length-delimited
        if (!ReadVarint(in, pos, value) || value > in.size() - pos) return std::nullopt;
        pos += value;
        break;
      case 5:  // 32-bit
        pos += 4;
        break;
      default:
        return std::nullopt;
    }
    if (pos > in.size()) return std::nullopt;
  }
  return status;
}

// Reads a whole PEM file; nullopt (and a message) when it cannot.
std::optional<std::string> ReadFile(const std::string& path, const char* flag) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream content;
  if (!in || !(content << in.rdbuf())) {
    std::fprintf(stderr, "sinkscope-health: %s %s: cannot read the file\n", flag, path.c_str());
    return std::nullopt;
  }
  return content.str();
}

const char* CodeName(grpc::StatusCode code) {
  static const char* const kNames[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                                       "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
                                       "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i < static_cast<int>(std::size(kNames)) ? kNames[i] : "UNKNOWN";
}

const char* StatusName(uint64_t status) {
  switch (status) {
    case 0: return "UNKNOWN";
    case 1: return "SERVING";
    case 2: return "NOT_SERVING";
    case 3: return "SERVICE_UNKNOWN";
    default: return "unrecognised status";
  }
}

int Main(int argc, char** argv) {
  std::string address = "127.0.0.1:50051", service, tls_ca, tls_cert, tls_key, tls_server_name;
  double timeout_seconds = 3;
  CLI::App app("Calls grpc.health.v1.Health/Check on the server and exits 0 when it answers SERVING; 1 for any "
               "other answer or none, 2 for a usage error.",
               "sinkscope-health");
  app.add_option("--address", address, "the server")->type_name("HOST:PORT")->default_val(address);
  app.add_option("--service", service, "the service to ask about (default \"\": the whole server)");
  app.add_option("--timeout", timeout_seconds, "deadline of the call, seconds")
      ->check(flags::Number(0.001, 3600))
      ->default_val(3);
  app.add_option("--tls-ca", tls_ca, "connect over TLS, trusting this CA (PEM)")->type_name("FILE");
  app.add_option("--tls-cert", tls_cert, "mutual TLS: this client certificate (PEM)...")->type_name("FILE");
  app.add_option("--tls-key", tls_key, "...and its private key (PEM)")->type_name("FILE");
  app.add_option("--tls-server-name", tls_server_name,
                 "the name the server's certificate must carry, when it is not the host of --address (e.g. "
                 "127.0.0.1 inside a container)")
      ->type_name("NAME");
  if (int exit = flags::Parse(app, argc, argv); exit >= 0) return exit;

  if (tls_cert.empty() != tls_key.empty()) {
    std::fprintf(stderr, "sinkscope-health: --tls-cert and --tls-key go together\n");
    return kExitUsage;
  }
  if (tls_ca.empty() && (!tls_cert.empty() || !tls_server_name.empty())) {
    std::fprintf(stderr, "sinkscope-health: --tls-cert, --tls-key and --tls-server-name need --tls-ca\n");
    return kExitUsage;
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  grpc::ChannelArguments channel_args;
  if (!tls_ca.empty()) {
    grpc::SslCredentialsOptions ssl;
    const auto ca = ReadFile(tls_ca, "--tls-ca");
    if (!ca) return kExitUsage;
    ssl.pem_root_certs = *ca;
    if (!tls_cert.empty()) {
      const auto cert = ReadFile(tls_cert, "--tls-cert"), key = ReadFile(tls_key, "--tls-key");
      if (!cert || !key) return kExitUsage;
      ssl.pem_cert_chain = *cert;
      ssl.pem_private_key = *key;
    }
    credentials = grpc::SslCredentials(ssl);
    if (!tls_server_name.empty()) channel_args.SetSslTargetNameOverride(tls_server_name);
  }
  auto channel = grpc::CreateCustomChannel(address, credentials, channel_args);
  grpc::GenericStub stub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000)));
  const std::string request_bytes = EncodeRequest(service);
  grpc::Slice slice(request_bytes);
  grpc::ByteBuffer request(&slice, 1), response;
  grpc::CompletionQueue cq;
  auto call = stub.PrepareUnaryCall(&context, "/grpc.health.v1.Health/Check", request, &cq);
  call->StartCall();
  grpc::Status status;
  call->Finish(&response, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  if (!cq.Next(&tag, &ok) || !ok) {
    std::fprintf(stderr, "sinkscope-health: %s: the call did not complete\n", address.c_str());
    return kExitNotServing;
  }
  if (!status.ok()) {
    std::fprintf(stderr, "sinkscope-health: %s: %s: %s\n", address.c_str(), CodeName(status.error_code()),
                 status.error_message().c_str());
    return kExitNotServing;
  }
  std::string response_bytes;
  if (std::vector<grpc::Slice> slices; response.Dump(&slices).ok()) {
    for (const grpc::Slice& s : slices) response_bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  const std::optional<uint64_t> serving = DecodeStatus(response_bytes);
  if (!serving) {
    std::fprintf(stderr, "sinkscope-health: %s: malformed HealthCheckResponse\n", address.c_str());
    return kExitNotServing;
  }
  std::printf("%s %s\n", address.c_str(), StatusName(*serving));
  return *serving == 1 ? kExitServing : kExitNotServing;
}

}  // namespace
}  // namespace sinkscope

int main(int argc, char** argv) { return sinkscope::Main(argc, argv); }

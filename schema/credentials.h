// Credentials shared by the coordinator, the worker and the CLI: secrets (bearer tokens,
// a basic-auth "user:password") read from files or the environment, never from argv;
// PEM files for TLS; gRPC channel and server credentials; a constant-time comparison.
// No function here puts a secret into a message, so their errors can be printed as is.
#pragma once

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/support/channel_arguments.h>

#include <memory>
#include <string>
#include <string_view>

#include "base/status.h"

namespace sinkscope {

// A bearer token travels as the call metadata `authorization: Bearer <token>`.
inline constexpr char kAuthorizationKey[] = "authorization";
inline constexpr char kBearerScheme[] = "Bearer ";

// Checks a secret taken from a file or an environment variable: not empty, printable
// ASCII without spaces (0x21-0x7e), at most 4096 bytes. `what` names its source in the
// error ("the token file /run/secrets/token"); the secret itself is never in it.
Status ValidateSecret(std::string_view secret, const std::string& what);

// Reads a secret from `path`: the whole file with leading and trailing whitespace
// (a final newline) removed, then ValidateSecret.
StatusOr<std::string> ReadSecretFile(const std::string& path, const std::string& what);

// Reads a secret from the first source that is set: the file `path` when not empty,
// else the environment variable `env` when set and not empty (its value is the secret).
// An empty result with OK: neither is set. `*source` (optional) says where it came from
// ("--token-file /x", "$SINKSCOPE_TOKEN"), for messages.
StatusOr<std::string> ReadSecret(const std::string& path, const std::string& flag, const char* env,
                                 std::string* source = nullptr);

// Reads a PEM file: a certificate (chain), a private key or a CA bundle. Fails on an
// unreadable file or one without a "-----BEGIN" block; the message has only the path.
StatusOr<std::string> ReadPemFile(const std::string& path, const std::string& what);

// Equality in time that depends on the lengths only, not on where the strings differ.
bool ConstantTimeEquals(std::string_view a, std::string_view b);

// The token of an `authorization: Bearer <token>` value (scheme case-insensitive);
// empty when the value is not a bearer token.
std::string_view BearerToken(std::string_view authorization);

// --- client side (worker, CLI) ---

// What the user asked for on the command line.
struct ClientTlsFiles {
  bool tls = false;          // TLS even without a file below (verify against the system roots)
  std::string ca_file;       // CA bundle that verifies the coordinator's certificate
  std::string cert_file;     // client certificate (chain), for mutual TLS; with key_file
  std::string key_file;      // its private key
  std::string server_name;   // the name to expect in the coordinator's certificate

  // TLS is on when asked for or implied by a file.
  bool enabled() const { return tls || !ca_file.empty() || !cert_file.empty() || !key_file.empty(); }
};

// A channel's credentials, ready to use.
struct ClientCredentials {
  bool tls = false;
  bool mutual = false;      // a client certificate is presented
  std::string server_name;  // SSL target name override; empty: the host of the address
  std::shared_ptr<grpc::ChannelCredentials> channel = grpc::InsecureChannelCredentials();

  // Sets the target name override, when there is one, on a channel's arguments.
  void Apply(grpc::ChannelArguments* args) const;
};

// Insecure credentials when TLS is off; otherwise SSL credentials from the PEM files.
// Fails (INVALID_ARGUMENT) on a certificate without its key or the reverse, or on a
// file that cannot be read; --tls-server-name without TLS is an error too.
StatusOr<ClientCredentials> LoadClientCredentials(const ClientTlsFiles& files);

// Whether a failed call's message looks like a TLS handshake failure (a certificate
// that does not verify, a missing client certificate, a name mismatch).
bool LooksLikeTlsFailure(std::string_view error_message);

// Whether it says the server closed or reset the connection while it was being set up
// ("failed to connect … Socket closed"): what a TLS client without a client certificate
// sees from a mutual-TLS server (and a plaintext client from a TLS server), since TLS 1.3
// refuses the certificate after the client's side of the handshake. A stream that broke
// later does not count.
bool LooksLikeClosedConnection(std::string_view error_message);

// --- server side (coordinator) ---

struct ServerTlsFiles {
  std::string cert_file;       // server certificate (chain)
  std::string key_file;        // its private key
  std::string client_ca_file;  // when set: require client certificates signed by this CA (mutual TLS)

  bool enabled() const { return !cert_file.empty() || !key_file.empty() || !client_ca_file.empty(); }
};

// Insecure credentials when no file is given; TLS (and mutual TLS with client_ca_file)
// otherwise. Fails (INVALID_ARGUMENT) on a certificate without its key or the reverse,
// a client CA without a server certificate, or a file that cannot be read.
StatusOr<std::shared_ptr<grpc::ServerCredentials>> LoadServerCredentials(const ServerTlsFiles& files);

}  // namespace sinkscope

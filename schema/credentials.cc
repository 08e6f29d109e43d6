#include "schema/credentials.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

namespace sinkscope {
namespace {

constexpr size_t kMaxSecretBytes = 4096;
constexpr size_t kMaxPemBytes = 1 << 20;

// The whole file, or an error naming the path (and never its content).
StatusOr<std::string> ReadWholeFile(const std::string& path, const std::string& what, size_t max_bytes) {
  if (path.empty()) return InvalidArgumentError(what + ": the path is empty");
  std::ifstream in(path, std::ios::binary);
  if (!in) return InvalidArgumentError(what + " " + path + ": cannot open: " + std::strerror(errno));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return InvalidArgumentError(what + " " + path + ": cannot read");
  std::string s = text.str();
  if (s.size() > max_bytes) {
    return InvalidArgumentError(what + " " + path + ": larger than " + std::to_string(max_bytes) + " bytes");
  }
  return s;
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

}  // namespace

Status ValidateSecret(std::string_view secret, const std::string& what) {
  if (secret.empty()) return InvalidArgumentError(what + " is empty");
  if (secret.size() > kMaxSecretBytes) {
    return InvalidArgumentError(what + " is longer than " + std::to_string(kMaxSecretBytes) + " bytes");
  }
  for (char c : secret) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (u < 0x21 || u > 0x7e) {
      return InvalidArgumentError(what +
                                  " holds a space, a control character or a non-ASCII byte; a secret must be "
                                  "printable ASCII without spaces (e.g. openssl rand -hex 32)");
    }
  }
  return OkStatus();
}

StatusOr<std::string> ReadSecretFile(const std::string& path, const std::string& what) {
  auto text = ReadWholeFile(path, what, kMaxSecretBytes + 64);
  if (!text.ok()) return text.status();
  std::string secret(Trim(*text));
  RETURN_IF_ERROR(ValidateSecret(secret, what + " " + path));
  return secret;
}

StatusOr<std::string> ReadSecret(const std::string& path, const std::string& flag, const char* env,
                                 std::string* source) {
  if (!path.empty()) {
    if (source) *source = flag + " " + path;
    return ReadSecretFile(path, flag);
  }
  if (env != nullptr) {
    const char* value = std::getenv(env);
    if (value != nullptr && *value != '\0') {
      if (source) *source = std::string("$") + env;
      std::string secret(Trim(value));
      RETURN_IF_ERROR(ValidateSecret(secret, std::string("$") + env));
      return secret;
    }
  }
  if (source) source->clear();
  return std::string();
}

StatusOr<std::string> ReadPemFile(const std::string& path, const std::string& what) {
  auto text = ReadWholeFile(path, what, kMaxPemBytes);
  if (!text.ok()) return text.status();
  if (text->find("-----BEGIN ") == std::string::npos) {
    return InvalidArgumentError(what + " " + path + ": not a PEM file (no -----BEGIN line)");
  }
  return std::move(*text);
}

bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  // Every byte of the longer string is visited whatever the content; the lengths are
  // the only thing the time depends on.
  const size_t n = std::max(a.size(), b.size());
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned char>(x ^ y);
  }
  // Keep the compiler from turning the loop into an early-exit comparison.
  volatile unsigned char result = diff;
  return result == 0;
}

std::string_view BearerToken(std::string_view authorization) {
  const size_t n = std::strlen(kBearerScheme);
  if (authorization.size() <= n) return {};
  for (size_t i = 0; i < n; ++i) {
    if (std::tolower(static_cast<unsigned char>(authorization[i])) !=
        std::tolower(static_cast<unsigned char>(kBearerScheme[i]))) {
      return {};
    }
  }
  return Trim(authorization.substr(n));
}

void ClientCredentials::Apply(grpc::ChannelArguments* args) const {
  if (tls && !server_name.empty()) args->SetSslTargetNameOverride(server_name);
}

StatusOr<ClientCredentials> LoadClientCredentials(const ClientTlsFiles& files) {
  ClientCredentials c;
  if (!files.enabled()) {
    if (!files.server_name.empty()) {
      return InvalidArgumentError("--tls-server-name needs TLS (--tls, --tls-ca, or --tls-cert with --tls-key)");
    }
    return c;
  }
  if (files.cert_file.empty() != files.key_file.empty()) {
    return InvalidArgumentError("--tls-cert and --tls-key go together (the client certificate and its private key)");
  }
  grpc::SslCredentialsOptions options;
  if (!files.ca_file.empty()) {
    auto ca = ReadPemFile(files.ca_file, "--tls-ca");
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = std::move(*ca);
  }
  if (!files.cert_file.empty()) {
    auto cert = ReadPemFile(files.cert_file, "--tls-cert");
    if (!cert.ok()) return cert.status();
    auto key = ReadPemFile(files.key_file, "--tls-key");
    if (!key.ok()) return key.status();
    options.pem_cert_chain = std::move(*cert);
    options.pem_private_key = std::move(*key);
    c.mutual = true;
  }
  c.tls = true;
  c.server_name = files.server_name;
  c.channel = grpc::SslCredentials(options);
  if (!c.channel) return InvalidArgumentError("TLS: gRPC could not build channel credentials from these files");
  return c;
}

bool LooksLikeTlsFailure(std::string_view error_message) {
  std::string m(error_message);
  std::transform(m.begin(), m.end(), m.begin(), [](unsigned char ch) { return std::tolower(ch); });
  for (const char* word : {"handshake", "ssl", "tls", "certificate", "x509", "tsi_", "alert"}) {
    if (m.find(word) != std::string::npos) return true;
  }
  return false;
}

bool LooksLikeClosedConnection(std::string_view error_message) {
  std::string m(error_message);
  std::transform(m.begin(), m.end(), m.begin(), [](unsigned char ch) { return std::tolower(ch); });
  if (m.find("failed to connect") == std::string::npos) return false;
  for (const char* words : {"socket closed", "connection reset", "end of tcp stream", "broken pipe"}) {
    if (m.find(words) != std::string::npos) return true;
  }
  return false;
}

StatusOr<std::shared_ptr<grpc::ServerCredentials>> LoadServerCredentials(const ServerTlsFiles& files) {
  if (!files.enabled()) return grpc::InsecureServerCredentials();
  if (files.cert_file.empty() || files.key_file.empty()) {
    return InvalidArgumentError("--tls-cert and --tls-key go together (the server certificate and its private key)" +
                                std::string(files.cert_file.empty() && files.key_file.empty()
                                                ? "; --tls-client-ca needs them too"
                                                : ""));
  }
  auto cert = ReadPemFile(files.cert_file, "--tls-cert");
  if (!cert.ok()) return cert.status();
  auto key = ReadPemFile(files.key_file, "--tls-key");
  if (!key.ok()) return key.status();
  grpc::SslServerCredentialsOptions options(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  if (!files.client_ca_file.empty()) {
    auto ca = ReadPemFile(files.client_ca_file, "--tls-client-ca");
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = std::move(*ca);
    options.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  options.pem_key_cert_pairs.push_back({std::move(*key), std::move(*cert)});
  auto credentials = grpc::SslServerCredentials(options);
  if (!credentials) return InvalidArgumentError("TLS: gRPC could not build server credentials from these files");
  return credentials;
}

}  // namespace sinkscope

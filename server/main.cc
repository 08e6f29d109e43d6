// sinkscope-coordinator: schedules runs onto workers, stores everything in SQLite,
// serves ExperimentService and WorkerService over gRPC (with the health service and
// reflection) and /metrics for Prometheus; optionally over TLS or mutual TLS, with bearer
// tokens on each service and basic auth on /metrics (docs/security.md).
#include <absl/synchronization/mutex.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <thread>
#include <vector>

#include "schema/credentials.h"
#include "base/log.h"
#include "server/coordinator.h"
#include "server/services.h"
#include "server/wire_errors.h"
#include "base/flags.h"
#include "base/numbers.h"

namespace sinkscope {
namespace {

// One coordinator per store: an exclusive flock on DB.lock, held for the life of the
// process (the kernel releases it when the process ends, SIGKILL included, so a crashed
// coordinator never leaves a stale lock). Two coordinators on one store would hand the
// same run to two workers writing into the same checkpoint folder. Returns the open
// descriptor, which the caller keeps open.
StatusOr<int> LockStore(const std::string& db) {
  // The lock sits beside the file itself: a URI's path, symlinks resolved, so two spellings
  // of one store share one lock.
  std::string file = db;
  if (file.rfind("file:", 0) == 0) {
    file = file.substr(5);
    file = file.substr(0, file.find('?'));
    if (file.rfind("//", 0) == 0 && file.find('/', 2) != std::string::npos) {
      file = file.substr(file.find('/', 2));  // file://host/path
    }
  }
  std::error_code ec;
  const std::filesystem::path canonical = std::filesystem::weakly_canonical(file, ec);
  const std::string path = (ec ? file : canonical.string()) + ".lock";
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    return Status(StatusCode::kUnavailable,
                  "store " + db + ": cannot open its lock file " + path + ": " + std::strerror(errno));
  }
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int error = errno;
    char holder[32] = {};
    const ssize_t n = pread(fd, holder, sizeof holder - 1, 0);
    close(fd);
    if (error == EWOULDBLOCK) {
      std::string pid = n > 0 ? std::string(holder, static_cast<size_t>(n)) : "";
      while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
      return Status(StatusCode::kFailedPrecondition,
                    "store " + db + " is in use by another sinkscope-coordinator" +
                        (pid.empty() ? "" : " (pid " + pid + ", holding " + path + ")") +
                        "; only one coordinator may serve a store");
    }
    return Status(StatusCode::kUnavailable, "store " + db + ": cannot lock " + path + ": " + std::strerror(error));
  }
  const std::string pid = std::to_string(getpid()) + "\n";
  if (ftruncate(fd, 0) != 0 || pwrite(fd, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    // The pid is only for the message above; the lock itself holds.
  }
  // The database file itself is locked too (created empty if missing, which SQLite opens
  // as a new database): a flock belongs to the file, so a hard link or a bind mount that
  // reaches the same store by another path meets this lock. (flock and SQLite's own
  // fcntl locks do not interact on local file systems.)
  if (file != ":memory:" && !file.empty()) {
    const int db_fd = open(file.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (db_fd >= 0 && flock(db_fd, LOCK_EX | LOCK_NB) != 0) {
      const int error = errno;
      close(db_fd);
      close(fd);
      if (error == EWOULDBLOCK) {
        return Status(StatusCode::kFailedPrecondition,
                      "store " + db + " is in use by another sinkscope-coordinator (the same database file, reached "
                      "by another path or a hard link); only one coordinator may serve a store");
      }
      return Status(StatusCode::kUnavailable, "store " + db + ": cannot lock it: " + std::strerror(error));
    }
    // db_fd stays open (and locked) for the life of the process, like fd; when it could not
    // be opened, Store::Open reports why.
  }
  return fd;
}


std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }

int Main(int argc, char** argv) {
  // gRPC's mutexes are Abseil's, whose deadlock detection (a graph of every lock order,
  // on by default in Debian's build) cost ~3% of the coordinator's CPU at ingest rates.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  std::string listen = "0.0.0.0:50051", metrics_listen = "0.0.0.0:9464", db = "sinkscope.db";
  Coordinator::Options options;
  double ttl = 600;
  ServerTlsFiles tls;
  std::string client_token_file, worker_token_file, metrics_auth_file;
  bool verbose = false, no_check_data_paths = false;
  double max_run_gib = 0;
  CLI::App app(
      "Schedules runs onto workers, stores everything in SQLite, serves ExperimentService and WorkerService over "
      "gRPC (with the health service and reflection, open to every caller) and /metrics for Prometheus. Secrets are "
      "read from files or the environment, never argv (docs/security.md).",
      "sinkscope-coordinator");
  app.add_option("--listen", listen, "gRPC address")->type_name("HOST:PORT")->envname("SINKSCOPE_LISTEN")
      ->default_val(listen);
  app.add_option("--metrics-listen", metrics_listen, "Prometheus /metrics address")
      ->type_name("HOST:PORT")
      ->envname("SINKSCOPE_METRICS_LISTEN")
      ->default_val(metrics_listen);
  app.add_option("--db", db, "SQLite store")->type_name("PATH")->envname("SINKSCOPE_DB")->check(flags::NonEmpty())
      ->default_val(db);
  app.add_option("--checkpoint-root", options.checkpoint_root, "run checkpoints, shared with every worker")
      ->type_name("DIR")
      ->envname("SINKSCOPE_CHECKPOINT_ROOT")
      ->check(flags::NonEmpty())
      ->default_val(options.checkpoint_root);
  app.add_option("--lease-seconds", options.lease_seconds, "a run's lease lapses S seconds after its worker's last message")
      ->check(flags::Number(0.001, 1e7))
      ->default_val(options.lease_seconds);
  app.add_option("--heartbeat-seconds", options.heartbeat_seconds, "heartbeat interval asked of workers")
      ->check(flags::Number(0.001, 1e7))
      ->default_val(options.heartbeat_seconds);
  app.add_option("--series-ttl-seconds", ttl, "drop Prometheus series of runs finished S seconds ago")
      ->check(flags::Number(0.001, 1e9))
      ->default_val(ttl);
  app.add_flag("--no-check-data-paths", no_check_data_paths, "do not require data paths to exist on this machine");
  app.add_option("--max-run-gib", max_run_gib,
                 "refuse experiments whose runs need more than G GiB each (estimated: parameters, gradients, AdamW "
                 "state, one micro-batch's activations; default: only what the connected workers report)")
      ->check(flags::Number(1e-9, 1e9));
  app.add_flag("--verbose", verbose, "log info events, not only warnings and errors");
  auto* security = app.add_option_group("security", "docs/security.md");
  security->add_option("--tls-cert", tls.cert_file, "serve gRPC over TLS with this certificate (chain, PEM)...")
      ->type_name("FILE");
  security->add_option("--tls-key", tls.key_file, "...and its private key (PEM)")->type_name("FILE");
  security->add_option("--tls-client-ca", tls.client_ca_file,
                       "mutual TLS: require client certificates signed by this CA")
      ->type_name("FILE");
  security->add_option("--client-token-file", client_token_file,
                       "ExperimentService (the CLI) requires `authorization: Bearer <token>` with the token in FILE "
                       "(default: $SINKSCOPE_CLIENT_TOKEN)")
      ->type_name("FILE");
  security->add_option("--worker-token-file", worker_token_file,
                       "WorkerService (the workers) requires its own, different token (default: "
                       "$SINKSCOPE_WORKER_TOKEN)")
      ->type_name("FILE");
  security->add_option("--metrics-basic-auth-file", metrics_auth_file,
                       "/metrics requires HTTP basic auth with the \"user:password\" in FILE (default: "
                       "$SINKSCOPE_METRICS_BASIC_AUTH)")
      ->type_name("FILE");
  app.add_option("--fault-store-read-only-when", options.fault_store_read_only_when,
                 "fault injection (tests): the store takes no writes while FILE exists")
      ->type_name("FILE")
      ->group("fault injection");
  if (int exit = flags::Parse(app, argc, argv); exit >= 0) return exit;
  if (verbose) MinLogLevel() = LogLevel::kInfo;
  if (no_check_data_paths) options.check_data_paths = false;
  if (max_run_gib > 0) options.max_run_bytes = static_cast<int64_t>(max_run_gib * 1024 * 1024 * 1024);
  if (!(options.lease_seconds > 0) || !(options.heartbeat_seconds > 0) || options.heartbeat_seconds >= options.lease_seconds) {
    std::fprintf(stderr, "sinkscope-coordinator: --heartbeat-seconds (%g) must be less than --lease-seconds (%g)\n",
                 options.heartbeat_seconds, options.lease_seconds);
    return 2;
  }
  // Credentials first: a mistake in them stops the coordinator before it opens anything.
  // The messages name files and variables, never their content.
  auto server_credentials = LoadServerCredentials(tls);
  auto client_token = ReadSecret(client_token_file, "--client-token-file", "SINKSCOPE_CLIENT_TOKEN");
  auto worker_token = ReadSecret(worker_token_file, "--worker-token-file", "SINKSCOPE_WORKER_TOKEN");
  auto metrics_auth = ReadSecret(metrics_auth_file, "--metrics-basic-auth-file", "SINKSCOPE_METRICS_BASIC_AUTH");
  for (const Status* s : {&server_credentials.status(), &client_token.status(), &worker_token.status(),
                          &metrics_auth.status()}) {
    if (!s->ok()) {
      std::fprintf(stderr, "sinkscope-coordinator: %s\n", s->message().c_str());
      return 2;
    }
  }
  if (!client_token->empty() && ConstantTimeEquals(*client_token, *worker_token)) {
    std::fprintf(stderr,
                 "sinkscope-coordinator: the client token and the worker token are the same; give the workers "
                 "their own token (--worker-token-file) so a CLI token cannot register a worker\n");
    return 2;
  }
  std::optional<MetricsBasicAuth> basic_auth;
  if (!metrics_auth->empty()) {
    const size_t colon = metrics_auth->find(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == metrics_auth->size()) {
      std::fprintf(stderr,
                   "sinkscope-coordinator: --metrics-basic-auth-file / $SINKSCOPE_METRICS_BASIC_AUTH must hold "
                   "one line user:password (both non-empty)\n");
      return 2;
    }
    basic_auth = MetricsBasicAuth{metrics_auth->substr(0, colon), metrics_auth->substr(colon + 1)};
  }
  const char* tls_mode = tls.client_ca_file.empty() ? (tls.enabled() ? "tls" : "off") : "mutual";
  if (!tls.enabled() && (!client_token->empty() || !worker_token->empty())) {
    Log(LogLevel::kWarning, "security",
        {{"detail", "bearer tokens are required but gRPC is not served over TLS (--tls-cert/--tls-key): tokens "
                    "cross the network in cleartext"}});
  }
  if (client_token->empty() != worker_token->empty()) {
    Log(LogLevel::kWarning, "security",
        {{"detail", client_token->empty()
                        ? "WorkerService requires a token but ExperimentService does not (--client-token-file)"
                        : "ExperimentService requires a token but WorkerService does not (--worker-token-file): "
                          "anyone who reaches the port can register as a worker"}});
  }

  options.checkpoint_root = std::filesystem::absolute(options.checkpoint_root).lexically_normal().string();
  auto store_lock = LockStore(db);
  if (!store_lock.ok()) {
    std::fprintf(stderr, "sinkscope-coordinator: %s\n", store_lock.status().message().c_str());
    return 1;
  }
  auto store = Store::Open(db);
  if (!store.ok()) {
    std::fprintf(stderr, "sinkscope-coordinator: %s\n", store.status().message().c_str());
    return 1;
  }
  auto exporter = Exporter::Start(metrics_listen, std::chrono::seconds(static_cast<int64_t>(ttl)), basic_auth);
  if (!exporter.ok()) {
    std::fprintf(stderr, "sinkscope-coordinator: %s\n", exporter.status().message().c_str());
    return 1;
  }
  auto coordinator = Coordinator::Create(store->get(), exporter->get(), options);
  if (!coordinator.ok()) {
    std::fprintf(stderr, "sinkscope-coordinator: %s\n", coordinator.status().message().c_str());
    return 1;
  }
  std::atomic<bool> shutting_down{false};
  ExperimentServiceImpl experiments(coordinator->get(), &shutting_down, *client_token);
  WorkerServiceImpl workers(coordinator->get(), *worker_token);
  HealthServiceImpl health(&shutting_down);
  grpc::EnableDefaultHealthCheckService(false);  // ours is `health` (server/services.h says why)
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  // No SO_REUSEPORT: a second coordinator on a port in use must fail, not share it and
  // answer half of the calls.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddListeningPort(listen, *server_credentials, &port);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 20000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 5000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.RegisterService(&experiments);
  builder.RegisterService(workers.service());
  builder.RegisterService(&health);
  std::unique_ptr<grpc::ServerCompletionQueue> sessions_cq = builder.AddCompletionQueue();
  // A request whose bytes are not its message (a string that is not UTF-8) is refused as
  // INVALID_ARGUMENT naming the field, not gRPC's empty INTERNAL (server/wire_errors.h).
  InstallProtobufLogHandler();
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(MakeWireErrorInterceptorFactory());
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "sinkscope-coordinator: cannot listen on %s%s\n", listen.c_str(),
                 tls.enabled() ? " with this TLS certificate and key (is the address in use? does --tls-key belong "
                                 "to --tls-cert? gRPC's error above says more)"
                               : " (is the address in use by another process? gRPC's error above says more)");
    return 1;
  }
  workers.Start(std::move(sessions_cq));
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  // One line on stdout for scripts and tests: where to connect.
  std::printf("sinkscope-coordinator listening grpc=%d metrics=%d db=%s\n", port, (*exporter)->port(), db.c_str());
  std::fflush(stdout);
  Log(LogLevel::kInfo, "coordinator_started",
      {{"grpc_port", std::to_string(port)},
       {"metrics_port", std::to_string((*exporter)->port())},
       {"db", db},
       {"tls", tls_mode},
       {"client_auth", client_token->empty() ? "none" : "token"},
       {"worker_auth", worker_token->empty() ? "none" : "token"},
       {"metrics_auth", basic_auth ? "basic" : "none"}});
  while (!g_stop) {
    (*coordinator)->Tick();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  shutting_down = true;
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  workers.Stop();  // its calls finished, then its completion queue
  Log(LogLevel::kInfo, "coordinator_stopped");
  return 0;
}

}  // namespace
}  // namespace sinkscope

int main(int argc, char** argv) { return sinkscope::Main(argc, argv); }

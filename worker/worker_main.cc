// sinkscope-worker: connects to the coordinator, registers, and trains the runs it is
// assigned on this machine until SIGTERM or SIGINT, which stop the current run after its
// step, checkpoint it and exit 0. A second signal a second or more later exits at once
// (status 1).
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "schema/credentials.h"
#include "base/log.h"
#include "base/numbers.h"
#include "worker/service_worker.h"

namespace sinkscope {
namespace {

const char kUsage[] = R"(usage: sinkscope-worker [options]

Connects to the sinkscope coordinator and trains the runs it assigns, one at a time,
reconnecting with back-off whenever the coordinator is unreachable. SIGTERM or SIGINT
stops the current run after its step, checkpoints it and exits 0; a second signal
(a second or more later) exits at once, without a checkpoint, with status 1.

options:
  --coordinator HOST:PORT  the coordinator's address (default 127.0.0.1:50051)
  --worker-id ID           stable id of this worker (default <hostname>-<pid>)
  --device cpu             the backend to train on; only cpu exists (default cpu)
  --verbose                log info events (default: warnings and errors only)
  -h, --help               this text

security (docs/security.md):
  --tls                    connect over TLS, verifying the coordinator against the system CAs
  --tls-ca FILE            connect over TLS, verifying the coordinator with this CA bundle (PEM)
  --tls-cert FILE          client certificate (PEM) for mutual TLS...
  --tls-key FILE           ...and its private key (PEM)
  --tls-server-name NAME   expect NAME in the coordinator's certificate (default: the host of
                           --coordinator)
  --token-file FILE        send the worker token in FILE as `authorization: Bearer <token>`
                           (default: $SINKSCOPE_WORKER_TOKEN, the token itself)
  --resend-seconds S       write everything unacknowledged again when no ack has come for S
                           seconds (default 10): a coordinator whose store failed and
                           recovered gets it without a reconnect
  A coordinator that rejects the token (UNAUTHENTICATED) or the TLS handshake is logged as
  an error (auth_rejected, tls_failed) on every attempt; the worker keeps retrying with
  back-off, so a corrected coordinator is picked up without a restart.

fault injection (tests):
  --fault-stall-after-step N  after completing step N of a run (and its checkpoint, if due),
                           stop training and wait for a cancel or shutdown while still
                           heartbeating, so a test can kill this worker at a known step
  --fault-step-delay-ms MS pause MS milliseconds before every step, so a run lasts at least
                           steps × MS however fast the machine is
)";

// SIGINT and SIGTERM: the handler writes a byte to a pipe (async-signal-safe) and a
// thread of ours acts on it. (Blocking the signals and sigwait-ing would miss threads
// that libraries start before main, e.g. OpenBLAS's pool, which would still take them.)
int g_signal_pipe[2] = {-1, -1};

void OnSignal(int sig) {
  const int saved = errno;
  const char c = static_cast<char>(sig);
  (void)!write(g_signal_pipe[1], &c, 1);
  errno = saved;
}

bool InstallSignalHandlers() {
  if (pipe(g_signal_pipe) != 0) return false;
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  return sigaction(SIGINT, &sa, nullptr) == 0 && sigaction(SIGTERM, &sa, nullptr) == 0;
}

int Usage(const std::string& error) {
  std::fprintf(stderr, "sinkscope-worker: %s\n%s", error.c_str(), kUsage);
  return 2;
}

int Main(int argc, char** argv) {
  WorkerOptions options;
  std::string device = "cpu";
  bool verbose = false;
  ClientTlsFiles tls;
  std::string token_file;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i], value;
    bool has_value = false;
    if (const size_t eq = a.find('='); a.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = a.substr(eq + 1);
      a = a.substr(0, eq);
      has_value = true;
    }
    auto take = [&](std::string* out) {
      if (has_value) {
        *out = value;
      } else if (i + 1 < argc) {
        *out = argv[++i];
      } else {
        return false;
      }
      return true;
    };
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a == "--coordinator") {
      if (!take(&options.coordinator)) return Usage("--coordinator needs HOST:PORT");
    } else if (a == "--worker-id") {
      if (!take(&options.worker_id) || options.worker_id.empty()) return Usage("--worker-id needs an id");
    } else if (a == "--device") {
      if (!take(&device)) return Usage("--device needs a value (cpu)");
    } else if (a == "--verbose" && !has_value) {
      verbose = true;
    } else if (a == "--tls" && !has_value) {
      tls.tls = true;
    } else if (a == "--tls-ca") {
      if (!take(&tls.ca_file) || tls.ca_file.empty()) return Usage("--tls-ca needs a FILE");
    } else if (a == "--tls-cert") {
      if (!take(&tls.cert_file) || tls.cert_file.empty()) return Usage("--tls-cert needs a FILE");
    } else if (a == "--tls-key") {
      if (!take(&tls.key_file) || tls.key_file.empty()) return Usage("--tls-key needs a FILE");
    } else if (a == "--tls-server-name") {
      if (!take(&tls.server_name) || tls.server_name.empty()) return Usage("--tls-server-name needs a NAME");
    } else if (a == "--fault-stall-after-step") {
      std::string n;
      if (!take(&n)) return Usage("--fault-stall-after-step needs a step");
      if (!ParseWholeInteger(n, &options.fault_stall_after_step) || options.fault_stall_after_step <= 0) {
        return Usage("--fault-stall-after-step: '" + n + "' is not a positive step");
      }
    } else if (a == "--fault-step-delay-ms") {
      std::string n;
      int64_t ms = 0;
      if (!take(&n)) return Usage("--fault-step-delay-ms needs milliseconds");
      if (!ParseWholeInteger(n, &ms) || ms < 0) {
        return Usage("--fault-step-delay-ms: '" + n + "' is not a count of milliseconds");
      }
      options.fault_step_delay = std::chrono::milliseconds(ms);
    } else if (a == "--resend-seconds") {
      std::string n;
      double seconds = 0;
      if (!take(&n)) return Usage("--resend-seconds needs seconds");
      if (!ParseWholeNumber(n, &seconds) || !(seconds > 0) || seconds > 86400) {
        return Usage("--resend-seconds: '" + n + "' is not a positive number of seconds");
      }
      options.resend_after = std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
    } else if (a == "--token-file") {
      if (!take(&token_file) || token_file.empty()) return Usage("--token-file needs a FILE");
    } else {
      return Usage("unknown argument " + std::string(argv[i]));
    }
  }
  if (device != "cpu") {
    std::fprintf(stderr,
                 "sinkscope-worker: --device %s: unsupported device; this build trains only on the CPU "
                 "(--device cpu)\n",
                 device.c_str());
    return 2;
  }
  options.device = v1::CPU;
  MinLogLevel() = verbose ? LogLevel::kInfo : LogLevel::kWarning;
  // Messages name the files and variables, never what they hold.
  auto credentials = LoadClientCredentials(tls);
  if (!credentials.ok()) {
    std::fprintf(stderr, "sinkscope-worker: %s\n", credentials.status().message().c_str());
    return 2;
  }
  options.credentials = std::move(*credentials);
  auto token = ReadSecret(token_file, "--token-file", "SINKSCOPE_WORKER_TOKEN");
  if (!token.ok()) {
    std::fprintf(stderr, "sinkscope-worker: %s\n", token.status().message().c_str());
    return 2;
  }
  options.bearer_token = std::move(*token);

  auto worker = Worker::Create(options, Clock::Real());
  if (!worker.ok()) {
    std::fprintf(stderr, "sinkscope-worker: %s\n", worker.status().message().c_str());
    return 2;
  }
  Worker* w = worker->get();
  if (!InstallSignalHandlers()) {
    std::fprintf(stderr, "sinkscope-worker: cannot install the SIGINT/SIGTERM handlers: %s\n", std::strerror(errno));
    return 1;
  }
  // The first signal asks for a graceful stop; a second one ends the process at once.
  std::thread([w] {
    char c = 0;
    ssize_t n;
    while ((n = read(g_signal_pipe[0], &c, 1)) < 0 && errno == EINTR) {
    }
    if (n != 1) return;
    Log(LogLevel::kWarning, "signal", {{"signal", c == SIGTERM ? "SIGTERM" : "SIGINT"}, {"action", "graceful stop"}});
    w->Shutdown();
    // The same signal often arrives twice at once (sent to the process and its group);
    // only one at least a second after the first means "now".
    const auto first = std::chrono::steady_clock::now();
    do {
      while ((n = read(g_signal_pipe[0], &c, 1)) < 0 && errno == EINTR) {
      }
      if (n != 1) return;
    } while (std::chrono::steady_clock::now() - first < std::chrono::seconds(1));
    static const char kMessage[] = "sinkscope-worker: second signal, exiting without a checkpoint\n";
    (void)!write(STDERR_FILENO, kMessage, sizeof kMessage - 1);
    _exit(1);
  }).detach();

  const Status s = (*worker)->Run();
  if (!s.ok()) {
    std::fprintf(stderr, "sinkscope-worker: stopping: %s\n", s.message().c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace sinkscope

int main(int argc, char** argv) { return sinkscope::Main(argc, argv); }

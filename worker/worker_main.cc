// sinkscope-worker: connects to the coordinator, registers, and trains the runs it is
// assigned on this machine until SIGTERM or SIGINT, which stop the current run after its
// step, checkpoint it and exit 0. A second signal a second or more later exits at once
// (status 1).
#include <absl/synchronization/mutex.h>
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
#include "base/flags.h"
#include "base/numbers.h"
#include "training/devices.h"
#include "worker/service_worker.h"

namespace sinkscope {
namespace {


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

int Main(int argc, char** argv) {
  // gRPC's mutexes are Abseil's, whose deadlock detection (a graph of every lock order, on
  // by default in Debian's build) is ~3% of a stream's CPU; off, as in the coordinator.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  WorkerOptions options;
  std::string device = "cpu";
  bool verbose = false;
  ClientTlsFiles tls;
  std::string token_file;
  int64_t stall_after = 0, step_delay_ms = 0;
  double resend_seconds = 10;
  CLI::App app(
      "Connects to the sinkscope coordinator and trains the runs it assigns, one at a time, reconnecting with "
      "back-off whenever the coordinator is unreachable. SIGTERM or SIGINT stops the current run after its step, "
      "checkpoints it and exits 0; a second signal (a second or more later) exits at once, without a checkpoint, "
      "with status 1. Security: docs/security.md.",
      "sinkscope-worker");
  app.add_option("--coordinator", options.coordinator, "the coordinator's address")
      ->envname("SINKSCOPE_COORDINATOR")
      ->check(flags::NonEmpty())
      ->type_name("HOST:PORT")
      ->default_val("127.0.0.1:50051");
  app.add_option("--worker-id", options.worker_id, "stable id of this worker (default <hostname>-<pid>)")
      ->envname("SINKSCOPE_WORKER_ID")
      ->check(flags::NonEmpty())
      ->type_name("ID");
  app.add_option("--device", device,
                 "what the runs train on: cpu, or cuda / cuda:N (GPU N, in a build with the CUDA backend); the "
                 "coordinator gives this worker only runs of that resources.device")
      ->envname("SINKSCOPE_DEVICE")
      ->type_name("cpu|cuda[:N]")
      ->default_val("cpu");
  app.add_flag("--verbose", verbose, "log info events (default: warnings and errors only)");
  auto* tls_group = app.add_option_group("security", "TLS and the worker token (docs/security.md)");
  tls_group->add_flag("--tls", tls.tls, "connect over TLS, verifying the coordinator against the system CAs");
  tls_group->add_option("--tls-ca", tls.ca_file, "connect over TLS, verifying the coordinator with this CA bundle (PEM)")
      ->check(flags::NonEmpty())
      ->type_name("FILE");
  tls_group->add_option("--tls-cert", tls.cert_file, "client certificate (PEM) for mutual TLS...")
      ->check(flags::NonEmpty())
      ->type_name("FILE");
  tls_group->add_option("--tls-key", tls.key_file, "...and its private key (PEM)")
      ->check(flags::NonEmpty())
      ->type_name("FILE");
  tls_group->add_option("--tls-server-name", tls.server_name,
                        "expect NAME in the coordinator's certificate (default: the host of --coordinator)")
      ->check(flags::NonEmpty())
      ->type_name("NAME");
  tls_group->add_option("--token-file", token_file,
                        "send the worker token in FILE as `authorization: Bearer <token>` (default: "
                        "$SINKSCOPE_WORKER_TOKEN, the token itself)")
      ->check(flags::NonEmpty())
      ->type_name("FILE");
  app.add_option("--resend-seconds", resend_seconds,
                 "write everything unacknowledged again when no ack has come for S seconds: a coordinator whose "
                 "store failed and recovered gets it without a reconnect")
      ->check(flags::Number(0.001, 86400))
      ->default_val(10);
  double collective_timeout = 60;
  auto* dp = app.add_option_group("data parallel", "runs of several ranks, one per worker (resources.devices_per_run)");
  dp->add_option("--gloo-host", options.gloo_host,
                 "the address this worker's rank listens on for the other ranks; they must reach it (a pod IP, "
                 "the host's cluster address)")
      ->envname("SINKSCOPE_GLOO_HOST")
      ->default_val("127.0.0.1");
  dp->add_option("--collective-timeout", collective_timeout,
                 "seconds a rendezvous or collective may wait for the other ranks before the gang is restarted")
      ->check(CLI::PositiveNumber)
      ->default_val(60);
  auto* faults = app.add_option_group("fault injection", "for tests");
  faults->add_option("--fault-stall-after-step", stall_after,
                     "after completing step N of a run (and its checkpoint, if due), stop training and wait for a "
                     "cancel or shutdown while still heartbeating")
      ->check(flags::Integer(1, INT64_MAX));
  faults->add_option("--fault-step-delay-ms", step_delay_ms, "pause MS milliseconds before every step")
      ->check(flags::Integer(0, 3600000));
  if (int exit = flags::Parse(app, argc, argv); exit >= 0) return exit;
  options.collective_timeout = std::chrono::milliseconds(static_cast<int64_t>(collective_timeout * 1000));
  options.fault_stall_after_step = stall_after;
  options.fault_step_delay = std::chrono::milliseconds(step_delay_ms);
  options.resend_after = std::chrono::milliseconds(static_cast<int64_t>(resend_seconds * 1000));
  auto chosen = ParseDevice(device);
  if (!chosen.ok()) {
    std::fprintf(stderr, "sinkscope-worker: --device: %s\n", chosen.status().message().c_str());
    return 2;
  }
  options.device = chosen->kind == DeviceChoice::kCuda ? v1::CUDA : v1::CPU;
  options.device_index = chosen->index;
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

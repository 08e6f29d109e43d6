#include "worker/service_worker.h"

#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <thread>
#include <vector>

#include "runspec/convert.h"
#include "schema/experiment.h"
#include "base/log.h"
#include "engine/gloo/gloo_communicator.h"
#ifdef SINKSCOPE_WITH_CUDA
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/nccl_communicator.h"
#endif
#include "training/devices.h"
#include "training/diagnostic.h"
#include "training/hf.h"
#include "training/run_loop.h"
#include "training/trainer.h"

namespace sinkscope {
namespace {

// Why a probe report cannot be sent: its size against the limit, and the setting to lower.
std::string OversizedReport(int64_t bytes) {
  return "a probe report of " + std::to_string(bytes) + " bytes is over the " + std::to_string(kMaxProbeReportBytes) +
         " bytes a report may take (the gRPC message limit); lower probe.profile_len";
}

constexpr char kWorkerVersion[] = "0.1.0";

int64_t PhysicalMemoryBytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page_size = sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page_size <= 0) return 0;
  return static_cast<int64_t>(pages) * page_size;
}

std::string Str(int64_t v) { return std::to_string(v); }
std::string Fmt(double v, const char* format = "%.6g") {
  char b[64];
  std::snprintf(b, sizeof b, format, v);
  return b;
}
std::string Ms(std::chrono::nanoseconds d) {
  return Str(std::chrono::duration_cast<std::chrono::milliseconds>(d).count());
}

// HOST:PORT with a numeric port in 1…65535 (IPv6 hosts in brackets), or a gRPC
// "unix:" / "dns:" style target taken as given.
Status ValidateAddress(const std::string& address) {
  if (address.rfind("unix:", 0) == 0 || address.rfind("dns:", 0) == 0 || address.rfind("ipv4:", 0) == 0 ||
      address.rfind("ipv6:", 0) == 0) {
    return OkStatus();
  }
  const size_t colon = address.rfind(':');
  const std::string bad = "coordinator address '" + address + "': ";
  if (colon == std::string::npos) return InvalidArgumentError(bad + "expected HOST:PORT");
  const std::string host = address.substr(0, colon), port = address.substr(colon + 1);
  if (host.empty()) return InvalidArgumentError(bad + "the host is empty (expected HOST:PORT)");
  if (port.empty() || port.size() > 5 || port.find_first_not_of("0123456789") != std::string::npos ||
      std::stoi(port) < 1 || std::stoi(port) > 65535) {
    return InvalidArgumentError(bad + "the port must be a number in 1-65535");
  }
  if (host.find(':') != std::string::npos && (host.front() != '[' || host.back() != ']')) {
    return InvalidArgumentError(bad + "write an IPv6 host in brackets, e.g. [::1]:50051");
  }
  return OkStatus();
}

// Where a run's tokens come from, for error messages.
std::string DataSource(const v1::Experiment& e) {
  if (e.data().has_shards()) return "shards " + e.data().shards().train();
  std::string s = "text";
  for (const auto& p : e.data().text().paths()) s += " " + p;
  return s;
}

constexpr char kReleasedUnstarted[] = "worker shutting down before starting the run";

}  // namespace

std::string DefaultWorkerId() {
  char host[256] = {0};
  if (gethostname(host, sizeof host - 1) != 0 || host[0] == '\0') std::snprintf(host, sizeof host, "worker");
  return std::string(host) + "-" + std::to_string(getpid());
}

// ---- lifetime ----------------------------------------------------------------------

StatusOr<std::unique_ptr<Worker>> Worker::Create(WorkerOptions options, Clock* clock) {
  DeviceChoice device;
  if (options.device == v1::CUDA) {
    device.kind = DeviceChoice::kCuda;
    device.index = options.device_index;
  } else if (options.device != v1::CPU) {
    return InvalidArgumentError("device " + v1::DeviceKind_Name(options.device) + ": expected CPU or CUDA");
  }
  RETURN_IF_ERROR(ValidateAddress(options.coordinator));
  if (options.worker_id.empty()) options.worker_id = DefaultWorkerId();
  if (options.initial_backoff.count() <= 0 || options.max_backoff < options.initial_backoff) {
    return InvalidArgumentError("back-off: need 0 < initial_backoff <= max_backoff");
  }
  if (options.default_heartbeat.count() <= 0) return InvalidArgumentError("default_heartbeat must be positive");
  if (options.max_buffered_progress == 0) return InvalidArgumentError("max_buffered_progress must be positive");
  if (clock == nullptr) clock = Clock::Real();
  auto described = DescribeDevice(device);
  if (!described.ok()) return described.status();
  auto backend = MakeBackendFor(device);
  if (!backend.ok()) return backend.status();
  // MFU's peak: the device table's where it knows the GPU (METRICS.md), else a GEMM rate
  // measured once on this backend.
  double peak = described->table_peak_flops;
  if (options.peak_flops.has_value()) peak = *options.peak_flops;
  if (peak <= 0) peak = MeasureGemmPeak(**backend);
  if (Status s = (*backend)->TakeError(); !s.ok()) return Status(s.code(), "device " + device.Name() + ": " + s.message());
  const std::string name = device.kind == DeviceChoice::kCpu ? "cpu" : described->name + " (" + device.Name() + ")";
  const int64_t memory = device.kind == DeviceChoice::kCpu ? PhysicalMemoryBytes() : described->memory_bytes;
  return std::unique_ptr<Worker>(
      new Worker(std::move(options), clock, std::move(*backend), peak, name.substr(0, 128), memory));
}

StatusOr<Backend*> Worker::Fp32Backend() {
  if (fp32_backend_ == nullptr) {
    DeviceChoice device;
    device.kind = DeviceChoice::kCuda;
    device.index = options_.device_index;
    ASSIGN_OR_RETURN(fp32_backend_, MakeBackendFor(device, GpuPrecision::kFp32));
  }
  return fp32_backend_.get();
}

Worker::Worker(WorkerOptions options, Clock* clock, std::unique_ptr<Backend> backend, double peak_flops,
               std::string device_name, int64_t memory_bytes)
    : options_(std::move(options)),
      clock_(clock),
      backend_(std::move(backend)),
      peak_flops_(peak_flops),
      device_name_(std::move(device_name)),
      memory_bytes_(memory_bytes),
      heartbeat_interval_(options_.default_heartbeat),
      outbox_(options_.max_buffered_progress, options_.resend_after),
      rng_(options_.jitter_seed != 0 ? options_.jitter_seed : std::random_device{}()) {}

Worker::~Worker() {
  Shutdown();
  std::thread t;
  {
    std::lock_guard<std::mutex> lock(mu_);
    t = std::move(training_thread_);
  }
  if (t.joinable()) t.join();
}

void Worker::Shutdown() {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) return;
  stopping_ = true;
  // A connection attempt may block (a host that does not answer); cancel it. An open
  // stream stays up to flush.
  if (connecting_context_ != nullptr) connecting_context_->TryCancel();
  cv_.notify_all();
  Log(LogLevel::kInfo, "shutdown_requested",
      {{"run_id", current_ ? current_->run_id : ""}, {"step", Str(current_ ? current_->step : 0)}});
}

WorkerSnapshot Worker::Snapshot() {
  std::lock_guard<std::mutex> lock(mu_);
  WorkerSnapshot s;
  s.connected = connected_;
  s.connections = connections_;
  s.registered = registered_;
  if (current_ && !current_->cancelled) {
    s.run_id = current_->run_id;
    s.attempt = current_->attempt;
    s.step = current_->step;
  }
  s.unacked_probes = outbox_.unacked_probes();
  s.unacked_progress = outbox_.unacked_progress();
  s.queued_messages = outbox_.queued();
  s.dropped_progress = outbox_.dropped_progress();
  s.heartbeat_seconds = std::chrono::duration<double>(heartbeat_interval_).count();
  s.runs_started = runs_started_;
  return s;
}

// ---- connection --------------------------------------------------------------------

Status Worker::Run() {
  Log(LogLevel::kInfo, "worker_start",
      {{"worker_id", options_.worker_id},
       {"coordinator", options_.coordinator},
       {"tls", options_.credentials.mutual ? "mutual" : options_.credentials.tls ? "tls" : "off"},
       {"token", options_.bearer_token.empty() ? "none" : "set"},
       {"device", device_name_},
       {"peak_gflops", Fmt(peak_flops_ / 1e9, "%.1f")},
       {"memory_bytes", Str(memory_bytes_)}});
  std::chrono::milliseconds backoff = options_.initial_backoff;
  int64_t failures = 0;  // consecutive connections that got no Registered
  while (true) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) break;
    }
    const bool registered = ServeConnection(failures);
    if (registered) {
      backoff = options_.initial_backoff;
      failures = 0;
    } else {
      ++failures;
    }
    std::unique_lock<std::mutex> lock(mu_);
    if (stopping_) break;
    const auto wait = JitteredBackoffLocked(backoff);
    backoff = std::min(backoff * 2, options_.max_backoff);
    Log(LogLevel::kInfo, "reconnect_wait", {{"ms", Ms(wait)}, {"failures", Str(failures)}});
    const auto deadline = clock_->Now() + wait;
    while (!stopping_ && clock_->Now() < deadline) clock_->WaitUntil(cv_, lock, deadline);
  }
  // Stopping: the training thread stops after its step and checkpoints.
  std::thread t;
  {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !training_thread_active_; });
    t = std::move(training_thread_);
  }
  if (t.joinable()) t.join();
  std::lock_guard<std::mutex> lock(mu_);
  Log(LogLevel::kInfo, "worker_stop",
      {{"unacked_probes", Str(static_cast<int64_t>(outbox_.unacked_probes()))},
       {"queued_messages", Str(static_cast<int64_t>(outbox_.queued()))},
       {"checkpoint", shutdown_status_.ok() ? "ok" : shutdown_status_.message()}});
  return shutdown_status_;
}

std::chrono::milliseconds Worker::JitteredBackoffLocked(std::chrono::milliseconds base) {
  std::uniform_real_distribution<double> jitter(0.8, 1.0);
  return std::chrono::milliseconds(
      std::max<int64_t>(1, static_cast<int64_t>(std::llround(static_cast<double>(base.count()) * jitter(rng_)))));
}

bool Worker::ServeConnection(int64_t failures) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  // Our own back-off paces the attempts: a fresh channel with its own subchannel makes
  // each attempt a real connection attempt, not a wait on gRPC's shared back-off.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, 64 << 20);
  options_.credentials.Apply(&args);
  auto channel = grpc::CreateCustomChannel(options_.coordinator, options_.credentials.channel, args);
  auto stub = v1::WorkerService::NewStub(channel);

  grpc::ClientContext context;
  if (!options_.bearer_token.empty()) {
    context.AddMetadata(kAuthorizationKey, std::string(kBearerScheme) + options_.bearer_token);
  }
  int64_t generation;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return false;
    connecting_context_ = &context;
    generation = ++generation_;
    broken_ = false;
  }
  std::unique_ptr<grpc::ClientReaderWriter<v1::WorkerMessage, v1::CoordinatorMessage>> stream = stub->Session(&context);
  v1::WorkerMessage reg;
  int64_t registered_before;
  {
    std::lock_guard<std::mutex> lock(mu_);
    reg = MakeRegisterLocked();
    registered_before = registered_;
  }
  const bool reg_ok = stream->Write(reg);
  {
    std::lock_guard<std::mutex> lock(mu_);
    connecting_context_ = nullptr;
    if (reg_ok) {
      connected_ = true;
      ++connections_;
      outbox_.StartConnection(clock_->Now());
      cv_.notify_all();
    }
  }
  if (!reg_ok) {
    const grpc::Status st = stream->Finish();
    if (LogCredentialFailure(st, failures + 1)) return false;
    Log(failures == 0 ? LogLevel::kWarning : LogLevel::kInfo, "connect_failed",
        {{"coordinator", options_.coordinator},
         {"code", Str(st.error_code())},
         {"error", st.error_message()},
         {"attempt", Str(failures + 1)}});
    return false;
  }
  Log(LogLevel::kInfo, "connected",
      {{"coordinator", options_.coordinator},
       {"run_id", reg.register_().run_id()},
       {"attempt", Str(reg.register_().attempt())}});

  std::thread reader([this, s = stream.get(), generation] { ReadLoop(s, generation); });

  // The writer: queued messages in order, then a heartbeat whenever one is due.
  std::unique_lock<std::mutex> lock(mu_);
  if (const int64_t dropped = outbox_.TakeNewlyDropped(); dropped > 0) {
    Log(LogLevel::kWarning, "progress_dropped", {{"count", Str(dropped)}});
  }
  Clock::TimePoint last_heartbeat = clock_->Now();
  std::optional<std::chrono::steady_clock::time_point> flush_deadline;  // real time, once stopping
  bool write_failed = false;
  while (!broken_) {
    if (stopping_ && !training_thread_active_) {
      if (!flush_deadline) flush_deadline = std::chrono::steady_clock::now() + options_.shutdown_flush;
      if (outbox_.Idle() || std::chrono::steady_clock::now() >= *flush_deadline) break;
    }
    if (std::optional<Outbox::Pending> out = outbox_.TakeNext()) {
      lock.unlock();
      const bool ok = stream->Write(out->message);
      lock.lock();
      if (!ok) {
        write_failed = true;
        broken_ = true;
        outbox_.WriteFailed(std::move(*out));  // written again on the next connection
      }
      continue;
    }
    if (!flush_deadline) {
      const std::optional<Clock::TimePoint> resend_due = outbox_.ResendDue();
      if (resend_due && clock_->Now() >= *resend_due) {
        Log(LogLevel::kWarning, "resending_unacked",
            {{"probes", Str(static_cast<int64_t>(outbox_.unacked_probes()))},
             {"progress", Str(static_cast<int64_t>(outbox_.unacked_progress() - outbox_.unacked_outcomes()))},
             {"outcomes", Str(static_cast<int64_t>(outbox_.unacked_outcomes()))}});
        outbox_.Resend(clock_->Now());
        continue;
      }
      Clock::TimePoint due = last_heartbeat + heartbeat_interval_;
      if (clock_->Now() >= due) {
        v1::WorkerMessage hb;
        if (current_ && !current_->cancelled) {
          hb.mutable_heartbeat()->set_run_id(current_->run_id);
          hb.mutable_heartbeat()->set_step(current_->step);
        } else {
          hb.mutable_heartbeat();
        }
        lock.unlock();
        const bool ok = stream->Write(hb);
        lock.lock();
        if (!ok) {
          write_failed = true;
          broken_ = true;
          continue;
        }
        last_heartbeat = clock_->Now();
        continue;
      }
      if (resend_due) due = std::min(due, *resend_due);
      clock_->WaitUntil(cv_, lock, due);
    } else {
      cv_.wait_until(lock, *flush_deadline);
    }
  }
  const bool leaving = stopping_ && !broken_;
  connected_ = false;
  const bool got_registered = registered_ > registered_before;
  lock.unlock();

  if (leaving) {
    // Half-close so the coordinator sees a clean end; give it a moment to finish the call.
    stream->WritesDone();
    std::unique_lock<std::mutex> wait_lock(mu_);
    cv_.wait_for(wait_lock, std::chrono::milliseconds(500), [&] { return broken_; });
  }
  // A stream the coordinator ended carries its status (UNAUTHENTICATED for a rejected
  // token); cancelling it first would turn that into CANCELLED.
  bool read_ended;
  {
    std::lock_guard<std::mutex> ended_lock(mu_);
    read_ended = read_ended_ >= generation;
  }
  if (!read_ended) context.TryCancel();
  reader.join();
  const grpc::Status st = stream->Finish();
  if (leaving) {
    Log(LogLevel::kInfo, "disconnected", {{"reason", "shutdown"}});
  } else if (got_registered || !LogCredentialFailure(st, failures + 1)) {  // credentials fail before Registered
    Log(LogLevel::kWarning, "disconnected",
        {{"coordinator", options_.coordinator},
         {"code", Str(st.error_code())},
         {"error", st.ok() ? "the coordinator ended the stream" : st.error_message()},
         {"write_failed", write_failed ? "true" : "false"}});
  }
  return got_registered;
}

bool Worker::LogCredentialFailure(const grpc::Status& st, int64_t attempt) const {
  // Neither the token nor key material is ever logged: the coordinator's message is a
  // fixed text, and a TLS error names what failed, not the secrets.
  if (st.error_code() == grpc::StatusCode::UNAUTHENTICATED) {
    Log(LogLevel::kError, "auth_rejected",
        {{"coordinator", options_.coordinator},
         {"code", "UNAUTHENTICATED"},
         {"error", st.error_message()},
         {"token", options_.bearer_token.empty() ? "none sent" : "sent"},
         {"hint", options_.bearer_token.empty()
                      ? "the coordinator requires a worker token: pass --token-file FILE (or $SINKSCOPE_WORKER_TOKEN)"
                      : "the coordinator did not accept this worker's token: --token-file (or $SINKSCOPE_WORKER_TOKEN) "
                        "must hold the coordinator's --worker-token-file token, not the client token"},
         {"attempt", Str(attempt)},
         {"action", "retrying with back-off"}});
    return true;
  }
  // Over TLS, a connection the coordinator closed is how mutual TLS refuses a client
  // certificate (or its absence).
  if (st.error_code() == grpc::StatusCode::UNAVAILABLE &&
      (LooksLikeTlsFailure(st.error_message()) ||
       (options_.credentials.tls && LooksLikeClosedConnection(st.error_message())))) {
    Log(LogLevel::kError, "tls_failed",
        {{"coordinator", options_.coordinator},
         {"code", "UNAVAILABLE"},
         {"error", st.error_message()},
         {"hint", !options_.credentials.tls
                      ? "the coordinator may serve TLS: pass --tls-ca FILE (and --tls-cert/--tls-key for mutual TLS)"
                  : options_.credentials.mutual
                      ? "check --tls-ca (the CA of the coordinator's certificate), --tls-server-name (a name in "
                        "that certificate), and that the coordinator trusts the CA of --tls-cert"
                      : "check --tls-ca (the CA of the coordinator's certificate) and --tls-server-name (a name in "
                        "that certificate); if the coordinator requires client certificates, pass "
                        "--tls-cert/--tls-key"},
         {"attempt", Str(attempt)},
         {"action", "retrying with back-off"}});
    return true;
  }
  return false;
}

v1::WorkerMessage Worker::MakeRegisterLocked() const {
  v1::WorkerMessage m;
  v1::Register* r = m.mutable_register_();
  r->set_worker_id(options_.worker_id);
  v1::Capabilities* c = r->mutable_capabilities();
  c->set_device(options_.device);
  c->set_device_count(1);
  c->set_device_name(device_name_);
  c->set_memory_bytes(memory_bytes_);
  c->set_version(kWorkerVersion);
  c->set_peak_flops(peak_flops_);
  if (current_ && !current_->cancelled) {
    r->set_run_id(current_->run_id);
    r->set_attempt(current_->attempt);
    r->set_rank(current_->rank);
  } else if (next_) {
    r->set_run_id(next_->run_id());
    r->set_attempt(next_->attempt());
    r->set_rank(next_->rank());
  } else {
    // A run that ended while disconnected: its outcome is still to be written or acked.
    if (auto outcome = outbox_.PendingOutcome()) {
      r->set_run_id(outcome->first);
      r->set_attempt(outcome->second);
    }
  }
  return m;
}

void Worker::ReadLoop(grpc::ClientReaderWriter<v1::WorkerMessage, v1::CoordinatorMessage>* stream, int64_t generation) {
  v1::CoordinatorMessage m;
  while (stream->Read(&m)) {
    std::lock_guard<std::mutex> lock(mu_);
    HandleMessageLocked(m);
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (generation == generation_) broken_ = true;
  read_ended_ = std::max(read_ended_, generation);
  cv_.notify_all();
}

void Worker::HandleMessageLocked(const v1::CoordinatorMessage& m) {
  switch (m.message_case()) {
    case v1::CoordinatorMessage::kRegistered: {
      const double hb = m.registered().heartbeat_seconds();
      heartbeat_interval_ =
          hb > 0 ? std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::duration<double>(hb))
                 : std::chrono::nanoseconds(options_.default_heartbeat);
      ++registered_;
      outbox_.SetAcksProgress(m.registered().acks_progress());
      Log(LogLevel::kInfo, "registered",
          {{"lease_seconds", Fmt(m.registered().lease_seconds())},
           {"heartbeat_seconds", Fmt(std::chrono::duration<double>(heartbeat_interval_).count())}});
      break;
    }
    case v1::CoordinatorMessage::kAssignment:
      HandleAssignmentLocked(m.assignment());
      break;
    case v1::CoordinatorMessage::kAck:
      outbox_.Ack(m.ack(), clock_->Now());
      if (!m.ack().refused().empty()) {
        Log(LogLevel::kWarning, "report_refused",
            {{"run_id", m.ack().run_id()}, {"step", Str(m.ack().progress_step())},
             {"sequence", Str(m.ack().sequence())}, {"reason", m.ack().refused()}});
      } else {
        Log(LogLevel::kDebug, "ack", {{"run_id", m.ack().run_id()}, {"sequence", Str(m.ack().sequence())}});
      }
      break;
    case v1::CoordinatorMessage::kCancel:
      HandleCancelLocked(m.cancel());
      break;
    case v1::CoordinatorMessage::kRendezvous: {
      const v1::RendezvousValue& v = m.rendezvous();
      const bool current = current_ && current_->run_id == v.run_id() && current_->attempt == v.attempt();
      const bool next = next_ && next_->run_id() == v.run_id() && next_->attempt() == v.attempt();
      if (current || next) rendezvous_[v.run_id() + "#" + Str(v.attempt())][v.key()] = v.value();
      break;
    }
    case v1::CoordinatorMessage::MESSAGE_NOT_SET:
      Log(LogLevel::kWarning, "unknown_message", {{"detail", "a coordinator message with no known field"}});
      break;
  }
  cv_.notify_all();
}

void Worker::EnqueueReleaseLocked(const std::string& run_id, int32_t attempt, int64_t step, int64_t checkpoint_step,
                                  const std::string& reason) {
  Log(LogLevel::kInfo, "run_released",
      {{"run_id", run_id}, {"step", Str(step)}, {"checkpoint_step", Str(checkpoint_step)}, {"reason", reason}});
  v1::WorkerMessage m;
  v1::RunReleased* r = m.mutable_released();
  r->set_run_id(run_id);
  r->set_attempt(attempt);
  r->set_step(step);
  r->set_checkpoint_step(checkpoint_step);
  r->set_reason(reason);
  EnqueueLocked(run_id, std::move(m), false);
}

void Worker::HandleAssignmentLocked(const v1::Assignment& a) {
  if (stopping_) {  // given back at once, so it is requeued without a lease lapse
    if (!a.run_id().empty()) EnqueueReleaseLocked(a.run_id(), a.attempt(), 0, 0, kReleasedUnstarted);
    return;
  }
  if (a.run_id().empty()) {
    Log(LogLevel::kWarning, "assignment_ignored", {{"reason", "empty run_id"}});
    return;
  }
  const bool busy = (current_ && !current_->cancelled) || next_.has_value();
  if (busy) {
    if (current_ && !current_->cancelled && current_->run_id == a.run_id() && current_->attempt != a.attempt() &&
        (current_->world_size > 1 || a.world_size() > 1)) {
      // A gang's new attempt meets anew (a new rendezvous, perhaps other ranks): the old
      // attempt stops and this one starts after it.
      Log(LogLevel::kInfo, "attempt_replaced",
          {{"run_id", a.run_id()}, {"from", Str(current_->attempt)}, {"to", Str(a.attempt())}});
      current_->cancelled = true;
      next_ = a;
    } else if (current_ && !current_->cancelled && current_->run_id == a.run_id()) {
      // The coordinator gave the run we are still training a new lease: carry on under it.
      if (current_->attempt != a.attempt()) {
        Log(LogLevel::kInfo, "attempt_renewed",
            {{"run_id", a.run_id()}, {"from", Str(current_->attempt)}, {"to", Str(a.attempt())}});
        current_->attempt = a.attempt();
      }
    } else if (next_ && next_->run_id() == a.run_id()) {
      next_ = a;
    } else {
      Log(LogLevel::kWarning, "assignment_ignored",
          {{"run_id", a.run_id()},
           {"reason", "busy with another run (one run at a time)"},
           {"current", current_ && !current_->cancelled ? current_->run_id : next_->run_id()}});
    }
    return;
  }
  Log(LogLevel::kInfo, "assignment",
      {{"run_id", a.run_id()}, {"attempt", Str(a.attempt())}, {"checkpoint_dir", a.checkpoint_dir()}});
  cancelled_runs_.erase(a.run_id());
  next_ = a;
  if (current_) return;  // a cancelled run is stopping; the training thread takes next_ after it
  current_ = CurrentRun{a.run_id(), a.attempt(), 0, false, a.rank(), std::max(1, a.world_size())};
  if (!training_thread_active_) {
    if (training_thread_.joinable()) training_thread_.join();  // it has returned or is about to
    training_thread_active_ = true;
    training_thread_ = std::thread(&Worker::TrainingLoop, this);
  }
}

void Worker::HandleCancelLocked(const v1::CancelRun& c) {
  Log(LogLevel::kInfo, "cancel", {{"run_id", c.run_id()}, {"reason", c.reason()}});
  // What the run measured up to the cancel (queued progress and probe reports, and the
  // step in flight, which its cancel checkpoint holds) is still sent and stored.
  cancelled_runs_.insert(c.run_id());
  if (next_ && next_->run_id() == c.run_id()) next_.reset();
  if (current_ && current_->run_id == c.run_id()) current_->cancelled = true;
}

// ---- queue -------------------------------------------------------------------------

void Worker::EnqueueLocked(const std::string& run_id, v1::WorkerMessage message, bool is_progress) {
  outbox_.Add(run_id, std::move(message), is_progress);
  cv_.notify_all();
}

void Worker::EnqueueProbeLocked(v1::ProbeUpload upload) {
  outbox_.AddProbe(std::move(upload));
  cv_.notify_all();
}

// ---- training ----------------------------------------------------------------------

void Worker::TrainingLoop() {
  while (true) {
    v1::Assignment a;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!next_ || stopping_) {
        if (next_) EnqueueReleaseLocked(next_->run_id(), next_->attempt(), 0, 0, kReleasedUnstarted);
        next_.reset();
        current_.reset();
        training_thread_active_ = false;
        cv_.notify_all();
        return;
      }
      a = std::move(*next_);
      next_.reset();
      current_ = CurrentRun{a.run_id(), a.attempt(), 0, false, a.rank(), std::max(1, a.world_size())};
      ++runs_started_;
      for (auto it = rendezvous_.begin(); it != rendezvous_.end();) {  // only this attempt's are needed now
        it = it->first == a.run_id() + "#" + Str(a.attempt()) ? std::next(it) : rendezvous_.erase(it);
      }
    }
    RunEnd end;
    bool device_ready = true;
#ifdef SINKSCOPE_WITH_CUDA
    // This thread trains on the worker's GPU (the current device is per thread); a device
    // that cannot be bound fails the run and ends the worker, as a device error does.
    if (Status bound = CudaBindThread(*backend_); !bound.ok()) {
      end = RunEnd{RunEnd::kFailed, v1::DEVICE_ERROR, device_name_ + ": " + bound.message(), 0};
      device_ready = false;
    }
#endif
    if (device_ready) {
      try {
        end = TrainRun(a);
      } catch (const std::exception& e) {  // e.g. std::bad_alloc: the engine itself does not throw
        end = RunEnd{RunEnd::kFailed, v1::INTERNAL_ERROR, std::string("unexpected exception: ") + e.what(), 0};
        std::lock_guard<std::mutex> lock(mu_);
        if (current_ && current_->run_id == a.run_id()) end.step = current_->step;
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    EndRunLocked(a, end);
    if (end.kind == RunEnd::kFailed && end.reason == v1::DEVICE_ERROR) {
      Log(LogLevel::kError, "device_error", {{"device", device_name_}, {"message", end.message}, {"action", "exit"}});
      shutdown_status_ = InternalError("device error: " + end.message);
      stopping_ = true;  // the failure above is flushed to the coordinator before Run returns
      cv_.notify_all();
    }
  }
}

void Worker::EndRunLocked(const v1::Assignment& a, const RunEnd& end) {
  const int32_t attempt = current_ && current_->run_id == a.run_id() ? current_->attempt : a.attempt();
  v1::WorkerMessage m;
  switch (end.kind) {
    case RunEnd::kFinished: {
      v1::RunFinished* f = m.mutable_finished();
      f->set_run_id(a.run_id());
      f->set_attempt(attempt);
      f->set_step(end.step);
      Log(LogLevel::kInfo, "run_finished",
          {{"run_id", a.run_id()}, {"attempt", Str(attempt)}, {"step", Str(end.step)}});
      EnqueueLocked(a.run_id(), std::move(m), false);
      break;
    }
    case RunEnd::kFailed: {
      v1::RunFailed* f = m.mutable_failed();
      f->set_run_id(a.run_id());
      f->set_attempt(attempt);
      f->set_reason(end.reason);
      f->set_message(end.message);
      f->set_step(end.step);
      Log(LogLevel::kWarning, "run_failed",
          {{"run_id", a.run_id()},
           {"attempt", Str(attempt)},
           {"reason", v1::FailureReason_Name(end.reason)},
           {"step", Str(end.step)},
           {"message", end.message}});
      EnqueueLocked(a.run_id(), std::move(m), false);
      break;
    }
    case RunEnd::kCancelled:
    case RunEnd::kShutdown:
      Log(LogLevel::kInfo, "run_stopped",
          {{"run_id", a.run_id()},
           {"reason", end.kind == RunEnd::kCancelled ? "cancelled" : "shutdown"},
           {"step", Str(end.step)},
           {"checkpoint", end.message.empty() ? "ok" : end.message}});
      if (end.kind == RunEnd::kShutdown) {
        // Given back at once, so the coordinator requeues it without waiting for the
        // lease to lapse and without counting a restart.
        EnqueueReleaseLocked(a.run_id(), attempt, end.step, end.checkpoint_step,
                             end.message.empty() ? "worker shutting down" : "worker shutting down; " + end.message);
      }
      break;
    case RunEnd::kGiveBack:
      Log(LogLevel::kError, "run_given_back",
          {{"run_id", a.run_id()}, {"step", Str(end.step)}, {"checkpoint_step", Str(end.checkpoint_step)},
           {"reason", end.message}});
      EnqueueReleaseLocked(a.run_id(), attempt, end.step, end.checkpoint_step, end.message);
      break;
  }
  current_.reset();
  cv_.notify_all();
}

std::optional<Worker::RunEnd::Kind> Worker::StopRequested(const std::string& run_id) {
  std::lock_guard<std::mutex> lock(mu_);
  return StopRequestedLocked(run_id);
}

std::optional<Worker::RunEnd::Kind> Worker::StopRequestedLocked(const std::string& run_id) const {
  if (cancelled_runs_.count(run_id) || (current_ && current_->run_id == run_id && current_->cancelled)) {
    return RunEnd::kCancelled;
  }
  if (stopping_) return RunEnd::kShutdown;
  return std::nullopt;
}

StatusOr<std::shared_ptr<const DataSplits>> Worker::LoadRunData(const v1::Experiment& e) {
  const std::string key = e.data().SerializeAsString() + "|context=" + std::to_string(e.model().context());
  std::lock_guard<std::mutex> lock(data_mu_);
  if (data_ && key == data_key_) return data_;
  data_.reset();  // free the previous run's tokens before loading new ones
  data_key_.clear();
  auto loaded = LoadData(ToDataSpec(e));
  if (!loaded.ok()) return loaded.status();
  data_ = std::make_shared<const DataSplits>(std::move(*loaded));
  data_key_ = key;
  return data_;
}

// A diagnostic probe job (Experiment.diagnostic): the model loaded, one pass on its batch,
// the report uploaded as the run's only probe (sequence 1) and its step as step 1.
Worker::RunEnd Worker::DiagnoseRun(const v1::Assignment& a, const v1::Experiment& e) {
  const v1::DiagnosticSpec& g = e.diagnostic();
  const std::string& run = a.run_id();
  if (StopRequested(run)) return RunEnd{RunEnd::kCancelled, v1::FAILURE_REASON_UNSPECIFIED, "", 0};
  DiagnosticJob job;
  if (options_.device == v1::CUDA) job.device_memory_bytes = static_cast<double>(memory_bytes_);
  job.checkpoint = g.model();
  job.tokens = g.tokens();
  job.text = g.text();
  job.separator = g.separator();
  job.tokenizer = g.tokenizer();
  job.batch = g.batch();
  job.seq = g.seq();
  job.micro_batch = g.micro_batch();
  if (g.arm() != v1::ARM_UNSPECIFIED) job.arm = ArmName(g.arm());
  job.settings = ToProbeSettings(e.probe());
  Log(LogLevel::kInfo, "diagnostic_start",
      {{"run_id", run}, {"model", g.model()}, {"batch", Str(g.batch())}, {"seq", Str(g.seq())}});
  // A diagnostic is held to METRICS.md in fp32 (as sinkscope-probe): on a GPU worker (bf16
  // for training) it runs on the fp32 backend of the same device.
  Backend* backend = backend_.get();
  if (options_.device == v1::CUDA) {
    auto fp32 = Fp32Backend();
    if (!fp32.ok()) {
      return RunEnd{RunEnd::kFailed, v1::UNSUPPORTED, "a diagnostic needs the fp32 backend: " + fp32.status().message(), 0};
    }
    backend = *fp32;
    backend_->ReleaseScratch();  // the bf16 backend's buffers, on the same GPU
  }
  auto result = RunDiagnosticJob(
      job, backend,
      [&](const std::string& line) {  // a warning about the model folder is shown at the default level
        const bool warning = line.rfind("warning: ", 0) == 0;
        Log(warning ? LogLevel::kWarning : LogLevel::kInfo, "diagnostic", {{"run_id", run}, {"note", line}});
      },
      [&](int done, int total, double tokens) {
        Log(LogLevel::kInfo, "diagnostic_progress",
            {{"run_id", run}, {"pass", Str(done) + "/" + Str(total)}, {"tokens", Fmt(tokens)}});
      },
      [&] { return StopRequested(run).has_value(); });  // a cancel or shutdown ends it between micro-batches
  if (!result.ok() && result.status().code() == StatusCode::kCancelled) {
    Log(LogLevel::kInfo, "diagnostic_stopped", {{"run_id", run}, {"detail", result.status().message()}});
    auto kind = StopRequested(run);
    // A shutdown gives the job back (it starts over elsewhere); a cancel reports nothing.
    return RunEnd{kind && *kind == RunEnd::kShutdown ? RunEnd::kShutdown : RunEnd::kCancelled,
                  v1::FAILURE_REASON_UNSPECIFIED, "", 0, 0};
  }
  if (!result.ok()) {
    // What a user named (a model folder, a file, a setting) is a data error; the rest internal.
    const StatusCode code = result.status().code();
    const bool theirs = code == StatusCode::kInvalidArgument || code == StatusCode::kNotFound ||
                        code == StatusCode::kDataLoss || code == StatusCode::kFailedPrecondition;
    return RunEnd{RunEnd::kFailed, theirs ? v1::DATA_ERROR : v1::INTERNAL_ERROR,
                  "diagnostic probe of " + g.model() + ": " + result.status().message(), 0};
  }
  std::lock_guard<std::mutex> lock(mu_);
  const int32_t attempt = current_ && current_->run_id == run ? current_->attempt : a.attempt();
  v1::WorkerMessage pm;
  v1::Progress* p = pm.mutable_progress();
  p->set_run_id(run);
  p->set_attempt(attempt);
  v1::StepMetrics* m = p->mutable_metrics();
  m->set_step(1);
  m->set_loss(result->report.loss);
  m->set_step_seconds(result->seconds);
  m->set_tokens_per_second(static_cast<double>(result->batch) * result->seq / std::max(result->seconds, 1e-9));
  EnqueueLocked(run, std::move(pm), true);
  v1::ProbeUpload u;
  u.set_run_id(run);
  u.set_attempt(attempt);
  u.set_sequence(1);
  *u.mutable_report() = ToProto(result->report);
  if (const int64_t bytes = static_cast<int64_t>(u.ByteSizeLong()); bytes > kMaxProbeReportBytes) {
    return RunEnd{RunEnd::kFailed, v1::DATA_ERROR, OversizedReport(bytes), 0};
  }
  EnqueueProbeLocked(std::move(u));
  if (current_ && current_->run_id == run) current_->step = 1;
  Log(LogLevel::kInfo, "diagnostic_done",
      {{"run_id", run}, {"arm", result->arm}, {"seconds", Fmt(result->seconds)}, {"loss", Fmt(result->report.loss)}});
  return RunEnd{RunEnd::kFinished, v1::FAILURE_REASON_UNSPECIFIED, "", 1};
}

// A gang's rendezvous through the coordinator: a key set here goes out as a
// RendezvousSet; the coordinator sends every key of the attempt to every rank
// (RendezvousValue, kept in current_). A wait ends early when the run is cancelled.
class Worker::ServiceRendezvous final : public Rendezvous {
 public:
  ServiceRendezvous(Worker* w, std::string run_id, int32_t attempt) : w_(*w), run_(std::move(run_id)), attempt_(attempt) {}
  Status Set(const std::string& key, const std::string& value) override {
    std::lock_guard<std::mutex> lock(w_.mu_);
    if (w_.StopRequestedLocked(run_)) return CancelledError("the run was stopped");
    w_.rendezvous_[run_ + "#" + Str(attempt_)][key] = value;
    v1::WorkerMessage m;
    v1::RendezvousSet* r = m.mutable_rendezvous_set();
    r->set_run_id(run_);
    r->set_attempt(attempt_);
    r->set_key(key);
    r->set_value(value);
    w_.EnqueueLocked(run_, std::move(m), false);
    return OkStatus();
  }
  StatusOr<std::string> Get(const std::string& key, std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(w_.mu_);
    const std::string* found = nullptr;
    bool stopped = false;
    w_.cv_.wait_for(lock, timeout, [&] {
      stopped = w_.StopRequestedLocked(run_).has_value();
      if (auto values = w_.rendezvous_.find(run_ + "#" + Str(attempt_)); values != w_.rendezvous_.end()) {
        auto it = values->second.find(key);
        if (it != values->second.end()) found = &it->second;
      }
      return found != nullptr || stopped;
    });
    if (found != nullptr) return *found;
    if (stopped) return CancelledError("the run was stopped during its rendezvous");
    return Status(StatusCode::kDeadlineExceeded, "no rank set " + key + " within the timeout");
  }

 private:
  Worker& w_;
  const std::string run_;
  const int32_t attempt_;
};

Worker::RunEnd Worker::TrainRun(const v1::Assignment& a) {
  const std::string& run = a.run_id();
  auto failed = [](v1::FailureReason reason, std::string message, int64_t step) {
    return RunEnd{RunEnd::kFailed, reason, std::move(message), step};
  };
  v1::Experiment e = a.experiment();
  ApplyDefaults(e);
  Log(LogLevel::kInfo, "run_start",
      {{"run_id", run},
       {"attempt", Str(a.attempt())},
       {"arm", v1::Arm_Name(a.arm())},
       {"seed", std::to_string(a.seed())},
       {"steps", Str(e.train().steps())}});

  if (e.resources().device() != options_.device) {
    return failed(v1::UNSUPPORTED,
                  "resources.device is " + v1::DeviceKind_Name(e.resources().device()) + "; this worker trains on " +
                      device_name_,
                  0);
  }
  const int W = std::max(1, a.world_size()), rank = a.rank();
  if (W != e.resources().devices_per_run() || rank < 0 || rank >= W) {
    return failed(v1::UNSUPPORTED,
                  "the assignment's rank " + Str(rank) + " of " + Str(W) + " does not fit resources.devices_per_run = " +
                      Str(e.resources().devices_per_run()) + " (one rank per worker)",
                  0);
  }
  if (a.arm() == v1::ARM_UNSPECIFIED) return failed(v1::UNSUPPORTED, "the assignment names no arm", 0);
  if (Status s = ValidateExperiment(e, /*check_paths=*/false); !s.ok()) {
    return failed(v1::UNSUPPORTED, "invalid experiment: " + s.message(), 0);
  }
  if (e.has_diagnostic()) return DiagnoseRun(a, e);
  if (a.checkpoint_dir().empty()) return failed(v1::INTERNAL_ERROR, "the assignment has no checkpoint_dir", 0);
  std::error_code ec;
  std::filesystem::create_directories(a.checkpoint_dir(), ec);
  if (ec) {
    return failed(v1::INTERNAL_ERROR, "cannot create checkpoint_dir " + a.checkpoint_dir() + ": " + ec.message(), 0);
  }

  auto data = LoadRunData(e);
  if (!data.ok()) return failed(v1::DATA_ERROR, "data: " + data.status().message(), 0);
  const int T = e.model().context();
  if ((*data)->train.size() < static_cast<size_t>(T) + 1) {
    return failed(v1::DATA_ERROR,
                  "data " + DataSource(e) + ": the training split has " + Str((*data)->train.size()) +
                      " tokens, fewer than model.context + 1 = " + Str(T + 1),
                  0);
  }
  if ((*data)->max_token >= e.model().vocab()) {
    return failed(v1::DATA_ERROR,
                  "data " + DataSource(e) + ": holds token " + Str((*data)->max_token) +
                      ", outside model.vocab = " + Str(e.model().vocab()),
                  0);
  }

  // The worker's side of the run loop: each step a Progress, each probe a ProbeUpload,
  // into the delivery queue; stop requests from cancels and shutdown; the fault hooks.
  class ServiceRun final : public RunObserver {
   public:
    ServiceRun(Worker* w, const v1::Assignment& a, int64_t total) : w_(*w), a_(a), total_(total) {}
    // Ranks > 0 train and heartbeat but report nothing: rank 0 reports the gang's steps
    // and probes (of the global batch).
    void OnStaleFileRemoved(const std::string& path) override {
      Log(LogLevel::kInfo, "stale_file_removed", {{"run_id", a_.run_id()}, {"path", path}});
    }
    Status OnStart(int64_t step, bool resumed) override {
      if (resumed) Log(LogLevel::kInfo, "run_resumed", {{"run_id", a_.run_id()}, {"step", Str(step)}});
      std::lock_guard<std::mutex> lock(w_.mu_);
      if (w_.current_ && w_.current_->run_id == a_.run_id()) w_.current_->step = step;
      return OkStatus();
    }
    void BeforeStep(int64_t) override {
      if (w_.options_.fault_step_delay.count() > 0) std::this_thread::sleep_for(w_.options_.fault_step_delay);
    }
    Status OnStep(const StepStats& s, double val_loss, const ProbeReport* report) override {
      const std::string& run = a_.run_id();
      if (a_.rank() > 0) {
        std::lock_guard<std::mutex> lock(w_.mu_);
        if (w_.current_ && w_.current_->run_id == run) w_.current_->step = s.step;
        return OkStatus();
      }
      // A progress line in the log every few seconds (and at the first and last step), so
      // a worker's log shows how a run goes without a client watching it. Throughput is
      // smoothed over the steps after the first (which pays one-time set-up).
      if (s.step > 1) {
        tokens_per_second_ =
            tokens_per_second_ > 0 ? 0.8 * tokens_per_second_ + 0.2 * s.tokens_per_second : s.tokens_per_second;
      }
      const auto now = std::chrono::steady_clock::now();
      if (s.step == 1 || s.step >= total_ || now - last_line_ >= std::chrono::seconds(5)) {
        last_line_ = now;
        const double tps = tokens_per_second_ > 0 ? tokens_per_second_ : s.tokens_per_second;
        const double tokens_per_step = s.tokens_per_second * s.seconds;
        const double eta = tps > 0 ? static_cast<double>(total_ - s.step) * tokens_per_step / tps : 0;
        char loss[32], rate[32], eta_s[32];
        std::snprintf(loss, sizeof loss, "%.4f", s.loss);
        std::snprintf(rate, sizeof rate, "%.0f", tps);
        std::snprintf(eta_s, sizeof eta_s, "%.0f", eta);
        Log(LogLevel::kInfo, "run_progress",
            {{"run_id", run}, {"step", Str(s.step)}, {"steps", Str(total_)}, {"loss", loss},
             {"tokens_per_second", rate}, {"eta_seconds", eta_s}});
      }
      v1::WorkerMessage pm;
      v1::Progress* p = pm.mutable_progress();
      p->set_run_id(run);
      v1::StepMetrics* m = p->mutable_metrics();
      m->set_step(s.step);
      m->set_loss(s.loss);
      m->set_learning_rate(s.lr);
      m->set_grad_norm(s.grad_norm);
      m->set_tokens_per_second(s.tokens_per_second);
      m->set_mfu(s.mfu);
      m->set_mfu_reference_flops(s.mfu_reference_flops);
      m->set_step_seconds(s.seconds);
      if (!std::isnan(val_loss)) m->set_val_loss(val_loss);
      std::lock_guard<std::mutex> lock(w_.mu_);
      int32_t attempt = a_.attempt();
      if (w_.current_ && w_.current_->run_id == run) {
        w_.current_->step = s.step;
        attempt = w_.current_->attempt;
      }
      p->set_attempt(attempt);
      w_.EnqueueLocked(run, std::move(pm), true);
      if (report != nullptr) {
        v1::ProbeUpload u;
        u.set_run_id(run);
        u.set_sequence(report->step);
        u.set_attempt(attempt);
        *u.mutable_report() = ToProto(*report);
        if (const int64_t bytes = static_cast<int64_t>(u.ByteSizeLong()); bytes > kMaxProbeReportBytes) {
          // It could never be delivered (the coordinator refuses what submission sized
          // wrong): the run fails, naming the setting, rather than resending forever.
          return InvalidArgumentError(OversizedReport(bytes));
        }
        w_.EnqueueProbeLocked(std::move(u));
      }
      return OkStatus();
    }
    void OnCheckpoint(int64_t step) override {
      Log(LogLevel::kDebug, "checkpoint", {{"run_id", a_.run_id()}, {"step", Str(step)}});
    }
    void OnCheckpointRetry(int64_t step, int, std::chrono::milliseconds wait, const Status& error) override {
      Log(LogLevel::kWarning, "checkpoint_failed",
          {{"run_id", a_.run_id()}, {"step", Str(step)}, {"retry_in_ms", Str(wait.count())}, {"error", error.message()}});
    }
    void AfterStep(int64_t step) override {
      if (step != w_.options_.fault_stall_after_step || step >= total_) return;
      Log(LogLevel::kWarning, "fault_stall", {{"run_id", a_.run_id()}, {"step", Str(step)}});
      std::unique_lock<std::mutex> lock(w_.mu_);
      w_.cv_.wait(lock, [&] { return w_.StopRequestedLocked(a_.run_id()).has_value(); });
    }
    std::optional<StopKind> StopRequested() override {
      auto kind = w_.StopRequested(a_.run_id());
      if (!kind) return std::nullopt;
      return *kind == RunEnd::kCancelled ? StopKind::kCancelled : StopKind::kShutdown;
    }

   private:
    Worker& w_;
    const v1::Assignment& a_;
    const int64_t total_;  // the run's steps (the defaulted experiment's)
    std::chrono::steady_clock::time_point last_line_;  // of the last run_progress log line
    double tokens_per_second_ = 0;                     // smoothed over the steps after the first
  };

  RunLoopOptions o = ToRunLoopOptions(e, a.arm(), a.seed(), peak_flops_, a.checkpoint_dir(), /*resume=*/true);
  // A GPU worker trains in bf16; the attention arms have no bf16 contract yet (ARMS.md),
  // so every run of an experiment with one (its baseline too: the arms compare at one
  // precision) trains on an fp32 backend of the same device, made when first needed.
  Backend* backend = backend_.get();
  if (options_.device == v1::CUDA && ExperimentHasAttentionArm(e)) {
    auto fp32 = Fp32Backend();
    if (!fp32.ok()) return failed(v1::UNSUPPORTED, "an attention arm needs the fp32 backend: " + fp32.status().message(), 0);
    backend = *fp32;
    Log(LogLevel::kInfo, "fp32_for_arms", {{"run_id", run}, {"backend", backend->Name()}});
  }
  for (Backend* other : {backend_.get(), fp32_backend_.get()}) {
    if (other != nullptr && other != backend) other->ReleaseScratch();  // its buffers, on the same GPU
  }
  o.checkpoint_retries = options_.checkpoint_retries;
  o.checkpoint_backoff = options_.checkpoint_backoff;
  // A gang's rank meets the others through the coordinator, then trains its share of
  // every batch with them over Gloo. A rendezvous or a collective that fails is the
  // gang's failure (RANK_LOST): the coordinator restarts every rank.
  std::unique_ptr<Communicator> comm;
  const std::string who = "rank " + Str(rank) + " of " + Str(W);
  auto rank_lost = [&](const Status& st, int64_t step) { return failed(v1::RANK_LOST, who + ": " + st.message(), step); };
  if (W > 1 && options_.device == v1::CUDA) {
#ifdef SINKSCOPE_WITH_CUDA
    // CUDA ranks: NCCL on this worker's device, its collectives on the backend's stream
    // (in order behind the backward that made the gradients); the id through the coordinator.
    NcclOptions n;
    n.rank = rank;
    n.world_size = W;
    n.device = options_.device_index;
    n.stream = CudaStreamOf(*backend);
    n.timeout = options_.collective_timeout;
    Log(LogLevel::kInfo, "rendezvous",
        {{"run_id", run}, {"rank", Str(rank)}, {"world_size", Str(W)}, {"collectives", "nccl"}});
    auto connected = ConnectNccl(n, std::make_shared<ServiceRendezvous>(this, run, a.attempt()));
    if (!connected.ok()) {
      if (StopRequested(run)) return RunEnd{RunEnd::kCancelled, v1::FAILURE_REASON_UNSPECIFIED, "", 0};
      return rank_lost(connected.status(), 0);
    }
    comm = std::move(*connected);
    o.trainer.comm = comm.get();
#else
    return failed(v1::UNSUPPORTED, "a CUDA gang needs NCCL, and this worker was built without CUDA", 0);
#endif
  } else if (W > 1) {
    GlooOptions g;
    g.rank = rank;
    g.world_size = W;
    g.hostname = options_.gloo_host;
    g.timeout = options_.collective_timeout;
    Log(LogLevel::kInfo, "rendezvous", {{"run_id", run}, {"rank", Str(rank)}, {"world_size", Str(W)}});
    auto connected = ConnectGloo(g, std::make_shared<ServiceRendezvous>(this, run, a.attempt()));
    if (!connected.ok()) {
      if (StopRequested(run)) return RunEnd{RunEnd::kCancelled, v1::FAILURE_REASON_UNSPECIFIED, "", 0};
      return rank_lost(connected.status(), 0);
    }
    comm = std::move(*connected);
    o.trainer.comm = comm.get();
  }
  ServiceRun service_run(this, a, o.total_steps);
  const RunResult r = RunLoop(o, data->get(), backend, &service_run, clock_);
  const int64_t saved = std::max<int64_t>(r.checkpoint_step, 0);
  const RunEnd quiet{RunEnd::kCancelled, v1::FAILURE_REASON_UNSPECIFIED, "", r.step, saved};  // nothing to report
  switch (r.kind) {
    case RunResult::kFinished:
      return RunEnd{RunEnd::kFinished, v1::FAILURE_REASON_UNSPECIFIED, "", r.step};
    case RunResult::kNonFinite:
      if (rank > 0) return quiet;  // the loss is the gang's: rank 0 reports it
      return failed(v1::NUMERICAL, r.Describe(), r.step);
    case RunResult::kStopped: {
      // Stopped because another rank of the gang was asked to: that rank reports it.
      if (r.stopped_by_peer) return quiet;
      const RunEnd::Kind kind = r.stop == StopKind::kCancelled ? RunEnd::kCancelled : RunEnd::kShutdown;
      RunEnd end{kind, v1::FAILURE_REASON_UNSPECIFIED, "", r.step, saved};
      if (!r.error.ok()) end.message = "checkpoint " + r.checkpoint_path + ": " + r.error.message();
      if (kind == RunEnd::kShutdown) {
        std::lock_guard<std::mutex> lock(mu_);
        shutdown_status_ = r.error.ok() ? OkStatus() : Status(r.error.code(), end.message);
      }
      return end;
    }
    case RunResult::kGiveBack:
      if (rank > 0) return quiet;  // rank 0's checkpoint failed: rank 0 gives the run back
      return RunEnd{RunEnd::kGiveBack, v1::FAILURE_REASON_UNSPECIFIED, r.error.message(), r.step, saved};
    case RunResult::kError:
      if (r.device_error) {
        // The device is unusable (a CUDA context survives no fault): the run fails with
        // the reason and the worker ends with it, so that a supervisor restarts it.
        return failed(v1::DEVICE_ERROR, device_name_ + ": " + r.error.message(), r.step);
      }
      if (W > 1 && (r.error.code() == StatusCode::kDeadlineExceeded || r.error.code() == StatusCode::kUnavailable)) {
        if (StopRequested(run)) return quiet;  // the gang was stopped: its peers are gone
        return rank_lost(r.error, r.step);
      }
      return failed(v1::INTERNAL_ERROR, r.error.message(), r.step);
  }
  return failed(v1::INTERNAL_ERROR, "unknown run end", r.step);
}

}  // namespace sinkscope

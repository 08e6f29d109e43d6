// sinkscope-load-test: a bounded load test of a running coordinator. It submits one
// experiment with a run per simulated worker, then N simulated workers (one Session
// stream each, like sinkscope-worker) register, take an assignment and stream Progress at
// --hz with a ProbeUpload every --probe-every steps (a realistic report: --layers layers
// with 64-entry profiles) for --seconds. One thread runs every worker on gRPC's
// completion-queue API, pacing the sends and draining the queue between them, so the
// generator costs little of the CPU it shares with the coordinator (and nothing per worker
// but its connection). The coordinator acknowledges a probe report and a Progress only
// once stored, so send→ack is send→stored.
//
// Prints the sustained ingest rate, send→stored latency (p50/p99/max), the coordinator's
// peak memory (VmHWM, with --coordinator-pid), the store's WAL at its largest (with --db;
// it must start over, not grow by all that is written) and what was lost: sent minus stored,
// counted in the SQLite store (--db) or through GetRunMetrics. Exits 1 if anything was
// lost. scripts/bench/load.sh starts a coordinator on loopback and runs this.
#include <absl/synchronization/mutex.h>
#include <grpcpp/grpcpp.h>
#include <sqlite3.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "base/flags.h"
#include "proto/sinkscope/v1/service.grpc.pb.h"

namespace sinkscope {
namespace {

using Clock = std::chrono::steady_clock;


struct Options {
  std::string coordinator, data, db, name = "load";
  int workers = 200, hz = 10, probe_every = 10, layers = 4, pid = 0;
  double seconds = 30;
};

struct Latencies {
  std::vector<double> progress_ms, probe_ms;
};

// What a completion-queue tag stands for: the worker's index and the operation, packed
// into the tag's pointer value (no allocation per operation).
enum Op : uintptr_t { kStarted = 0, kWrote = 1, kRead = 2, kFinished = 3 };
void* Tag(size_t worker, Op op) { return reinterpret_cast<void*>((worker << 2) | op); }

// One simulated worker: one Session stream on its own connection, like sinkscope-worker.
// It registers, takes an assignment, then streams Progress and probe reports. It has no
// thread: every worker's operations complete on one completion queue that the pacing
// thread drains between its sends (Main), so the generator makes no thread hand-offs of
// its own and leaves the CPU it shares to the coordinator. At most one write is in
// flight (gRPC's rule); later messages wait in the outbox as (kind, step) and are built
// when written (a write serialises its message at once, so one message object serves).
class SimWorker {
 public:
  SimWorker(size_t index, const Options& o, grpc::CompletionQueue* cq) : index_(index), o_(o), cq_(cq) {}

  void Start() {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // its own connection, like a real worker
    args.SetInt(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, 64 << 20);
    channel_ = grpc::CreateCustomChannel(o_.coordinator, grpc::InsecureChannelCredentials(), args);
    stub_ = v1::WorkerService::NewStub(channel_);
    ctx_.set_wait_for_ready(true);  // hundreds connect at once: wait for the connection, do not fail
    stream_ = stub_->PrepareAsyncSession(&ctx_, cq_);
    stream_->StartCall(Tag(index_, kStarted));
    ops_ = 1;
  }

  // A completion of one of this worker's operations.
  void OnEvent(Op op, bool ok, Clock::time_point now) {
    --ops_;
    switch (op) {
      case kStarted:
        if (!ok) return Break("the session did not start");
        Write(Register());
        Read();
        break;
      case kWrote:
        writing_ = false;
        if (!ok) return Break("a write failed");
        WriteNext();
        break;
      case kRead:
        reading_ = false;
        if (!ok) return Break("the coordinator ended the session");
        OnMessage(now);
        Read();
        break;
      case kFinished:
        if (!cancelled_ && error_.empty() && !status_.ok()) error_ = "session: " + status_.error_message();
        break;
    }
    MaybeFinish();
  }

  // Progress for `step`, and a probe report every probe_every steps, sent at `now`.
  void Tick(int64_t step, Clock::time_point now) {
    if (run_.empty() || broken_) return;
    Record(progress_sent_, step, now);
    ++progress_sent_n_;
    outbox_.push_back({false, step});
    if (step % o_.probe_every == 0) {
      Record(probe_sent_, step, now);
      ++probes_sent_n_;
      outbox_.push_back({true, step});
    }
    max_outbox_ = std::max(max_outbox_, outbox_.size());
    if (!writing_) WriteNext();
  }

  // Ends the stream (its pending operations fail; then Finish completes).
  void Cancel() {
    cancelled_ = true;
    broken_ = true;
    ctx_.TryCancel();
  }

  bool assigned() const { return !run_.empty(); }
  bool idle() const { return ops_ == 0; }  // nothing of it left on the queue
  bool settled() const {
    return broken_ || (progress_acked_n_ == progress_sent_n_ && probes_acked_n_ == probes_sent_n_);
  }
  const std::string& run_id() const { return run_; }
  const std::string& error() const { return error_; }
  const Latencies& latencies() const { return latencies_; }
  size_t max_outbox() const { return max_outbox_; }
  int64_t progress_sent() const { return progress_sent_n_; }
  int64_t progress_acked() const { return progress_acked_n_; }
  int64_t probes_sent() const { return probes_sent_n_; }
  int64_t probes_acked() const { return probes_acked_n_; }

 private:
  struct Queued {
    bool probe;
    int64_t step;
  };

  static void Record(std::vector<Clock::time_point>& sent, int64_t step, Clock::time_point now) {
    const size_t i = static_cast<size_t>(step);
    if (sent.size() <= i) sent.resize(std::max(2 * sent.size(), i + 1));
    sent[i] = now;
  }

  // The ack of `step` in `acked`, once: its latency in `ms`.
  static bool Acked(std::vector<Clock::time_point>& sent, int64_t step, Clock::time_point now,
                    std::vector<double>& ms) {
    const size_t i = static_cast<size_t>(step);
    if (step <= 0 || i >= sent.size() || sent[i] == Clock::time_point{}) return false;
    ms.push_back(std::chrono::duration<double, std::milli>(now - sent[i]).count());
    sent[i] = Clock::time_point{};  // acked: a second ack of it counts nothing
    return true;
  }

  v1::WorkerMessage Register() const {
    v1::WorkerMessage reg;
    reg.mutable_register_()->set_worker_id("load-worker-" + std::to_string(index_));
    reg.mutable_register_()->mutable_capabilities()->set_device(v1::CPU);
    reg.mutable_register_()->mutable_capabilities()->set_device_count(1);
    reg.mutable_register_()->mutable_capabilities()->set_version("load-test");
    return reg;
  }

  void OnMessage(Clock::time_point now) {
    if (in_.has_assignment() && run_.empty()) {
      run_ = in_.assignment().run_id();
      attempt_ = in_.assignment().attempt();
      BuildTemplates();
    } else if (in_.has_ack()) {
      const v1::Ack& a = in_.ack();
      if (a.sequence() != 0 && Acked(probe_sent_, a.sequence(), now, latencies_.probe_ms)) ++probes_acked_n_;
      if (a.progress_step() != 0 && Acked(progress_sent_, a.progress_step(), now, latencies_.progress_ms)) {
        ++progress_acked_n_;
      }
    } else if (in_.has_cancel()) {
      error_ = "cancelled: " + in_.cancel().reason();
    }
  }

  // The run's messages, built once: a write sets the step (and a report's sequence).
  void BuildTemplates() {
    v1::Progress* p = progress_.mutable_progress();
    p->set_run_id(run_);
    p->set_attempt(attempt_);
    v1::StepMetrics* s = p->mutable_metrics();
    s->set_learning_rate(3e-3);
    s->set_grad_norm(0.8);
    s->set_tokens_per_second(12345);
    s->set_mfu(0.1);
    s->set_step_seconds(1.0 / o_.hz);
    v1::ProbeUpload* u = probe_.mutable_probe();
    u->set_run_id(run_);
    u->set_attempt(attempt_);
    v1::ProbeReport& r = *u->mutable_report();
    r.set_version(1);
    r.set_loss(4.2);
    r.set_batch_sequences(8);
    r.set_seq_len(128);
    for (int l = 0; l < o_.layers; ++l) {
      v1::LayerProbe* lp = r.add_layers();
      lp->set_layer(l);
      lp->set_r_gs(1.5 + 0.1 * l);
      lp->set_r_gs_sum_then_norm(1.5);
      lp->set_r_gs_norm_then_mean(1.4);
      for (const char* name : {"h_out", "h_in", "v"}) {  // profile sites (METRICS.md): other keys are refused
        auto& series = (*lp->mutable_grad_profile())[name];
        for (int t = 0; t < 64; ++t) series.add_values(1.0 / (1 + t));
      }
      for (int t = 0; t < 64; ++t) {
        lp->add_attn_bloat(0.1 * t);
        lp->add_mlp_bloat(0.2 * t);
      }
      for (int h = 0; h < 4; ++h) {  // per head: the model has 4
        lp->add_alpha(0.25 * h);
        lp->add_column_mass(1.0 + h);
      }
      for (int h = 0; h < 2; ++h) lp->add_theta(0.5);
      for (const char* name : {"h_out", "r_mlp", "r_attn", "v"}) {
        (*lp->mutable_norm_ratio())[name] = 3.0;
        auto& series = (*lp->mutable_norms())[name];
        for (int t = 0; t < 64; ++t) series.add_values(1.0 + t);
      }
      lp->set_sink_rate(0.5);
      lp->mutable_massive()->add_top3(100);
      lp->mutable_massive()->set_median(1);
      lp->mutable_massive()->set_top1_over_median(100);
    }
    r.set_r_gs_median(1.6);
  }

  void WriteNext() {
    if (outbox_.empty() || broken_) return;
    const Queued q = outbox_.front();
    outbox_.pop_front();
    if (q.probe) {
      probe_.mutable_probe()->set_sequence(q.step);
      probe_.mutable_probe()->mutable_report()->set_step(q.step);
      Write(probe_);
    } else {
      v1::StepMetrics* s = progress_.mutable_progress()->mutable_metrics();
      s->set_step(q.step);
      s->set_loss(5.0 / (1.0 + 0.01 * static_cast<double>(q.step)));
      Write(progress_);
    }
  }

  void Write(const v1::WorkerMessage& m) {
    writing_ = true;
    ++ops_;
    stream_->Write(m, Tag(index_, kWrote));  // serialised here: `m` may change once this returns
  }

  void Read() {
    reading_ = true;
    ++ops_;
    stream_->Read(&in_, Tag(index_, kRead));
  }

  void Break(const char* why) {
    if (!cancelled_ && error_.empty() && !broken_) error_ = why;
    broken_ = true;
    MaybeFinish();
  }

  // Once the stream broke and no read or write is pending: Finish, for its status.
  void MaybeFinish() {
    if (!broken_ || reading_ || writing_ || finish_called_) return;
    finish_called_ = true;
    ++ops_;
    stream_->Finish(&status_, Tag(index_, kFinished));
  }

  const size_t index_;
  const Options& o_;
  grpc::CompletionQueue* const cq_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::WorkerService::Stub> stub_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientAsyncReaderWriter<v1::WorkerMessage, v1::CoordinatorMessage>> stream_;
  v1::CoordinatorMessage in_;
  v1::WorkerMessage progress_, probe_;
  std::deque<Queued> outbox_;
  size_t max_outbox_ = 0;
  int ops_ = 0;  // operations on the queue
  bool writing_ = false, reading_ = false, broken_ = false, cancelled_ = false;
  bool finish_called_ = false;
  grpc::Status status_;
  std::string run_;
  int attempt_ = 0;
  std::string error_;
  // Send times by step (a zero time: not sent, or acked), and the counts.
  std::vector<Clock::time_point> progress_sent_, probe_sent_;
  int64_t progress_sent_n_ = 0, progress_acked_n_ = 0, probes_sent_n_ = 0, probes_acked_n_ = 0;
  Latencies latencies_;
};

double Percentile(std::vector<double> xs, double q) {
  if (xs.empty()) return 0;
  std::sort(xs.begin(), xs.end());
  const size_t i = std::min(xs.size() - 1, static_cast<size_t>(q * static_cast<double>(xs.size())));
  return xs[i];
}

// A field of /proc/PID/status in kB ("VmHWM", "VmRSS"); -1 when unreadable.
int64_t ProcStatusKb(int pid, const std::string& field) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::atoll(line.c_str() + field.size() + 1);
  }
  return -1;
}

// utime + stime of a process, seconds; -1 when unreadable.
double ProcCpuSeconds(int pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t close = all.rfind(')');
  if (close == std::string::npos) return -1;
  std::istringstream rest(all.substr(close + 2));
  std::string field;
  long long utime = 0, stime = 0;
  for (int i = 3; i <= 15 && rest >> field; ++i) {
    if (i == 14) utime = std::atoll(field.c_str());
    if (i == 15) stime = std::atoll(field.c_str());
  }
  return static_cast<double>(utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// This process's CPU time (user + system), seconds.
double SelfCpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  auto s = [](const timeval& t) { return static_cast<double>(t.tv_sec) + 1e-6 * static_cast<double>(t.tv_usec); };
  return s(u.ru_utime) + s(u.ru_stime);
}

// Stored (steps, probes) of one run, from the SQLite file.
bool CountInDb(const std::string& db, const std::string& run_id, int64_t* steps, int64_t* probes) {
  sqlite3* h = nullptr;
  if (sqlite3_open_v2(db.c_str(), &h, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK) {
    sqlite3_close(h);
    return false;
  }
  sqlite3_busy_timeout(h, 5000);
  bool ok = true;
  // The distinct steps of the run, merged (step_rows) or still in the coordinator's step
  // inbox (schema version 2; the step_metrics view says the same, slower while the inbox
  // is full); an older store has the step_metrics table.
  sqlite3_stmt* probe = nullptr;
  const bool inbox = sqlite3_prepare_v2(h, "SELECT 1 FROM step_inbox LIMIT 0", -1, &probe, nullptr) == SQLITE_OK;
  sqlite3_finalize(probe);
  const std::string count_steps =
      inbox ? "SELECT COUNT(*) FROM (SELECT step FROM step_rows WHERE run_id = ?1 UNION SELECT step FROM step_inbox "
              "WHERE run_id = ?1)"
            : "SELECT COUNT(*) FROM step_metrics WHERE run_id = ?1";
  const std::string count_probes = "SELECT COUNT(*) FROM probe_reports WHERE run_id = ?1";
  for (auto [sql, out] : {std::pair{&count_steps, steps}, std::pair{&count_probes, probes}}) {
    sqlite3_stmt* q = nullptr;
    ok = ok && sqlite3_prepare_v2(h, sql->c_str(), -1, &q, nullptr) == SQLITE_OK;
    if (ok) {
      sqlite3_bind_text(q, 1, run_id.c_str(), -1, SQLITE_TRANSIENT);
      ok = sqlite3_step(q) == SQLITE_ROW;
      if (ok) *out = sqlite3_column_int64(q, 0);
    }
    sqlite3_finalize(q);
  }
  sqlite3_close(h);
  return ok;
}

int Main(int argc, char** argv) {
  // gRPC's mutexes are Abseil's, whose deadlock detection (on in Debian's build) cost the
  // generator ~3% of its CPU; the coordinator turns it off too (server/main.cc).
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  Options o;
  CLI::App app("Simulated workers streaming progress and probe reports into a coordinator; prints the ingest rate, "
               "send->stored latency, the coordinator's peak memory and the count lost.",
               "sinkscope-load-test");
  app.add_option("--coordinator", o.coordinator, "the coordinator")->required()->type_name("HOST:PORT");
  app.add_option("--data", o.data, "a text file the coordinator can read, for the experiment")->required();
  app.add_option("--workers", o.workers, "simulated workers, one run each")->check(flags::Integer(1, 100000))
      ->default_val(o.workers);
  app.add_option("--seconds", o.seconds, "how long they stream")->check(flags::Number(0.001, 86400))
      ->default_val(o.seconds);
  app.add_option("--hz", o.hz, "Progress messages per second per worker")->check(flags::Integer(1, 100000))
      ->default_val(o.hz);
  app.add_option("--probe-every", o.probe_every, "a probe report every K steps")->check(flags::Integer(1, 1 << 30))
      ->default_val(o.probe_every);
  app.add_option("--layers", o.layers, "layers per probe report")->check(flags::Integer(1, 64))
      ->default_val(o.layers);
  app.add_option("--db", o.db, "count what was stored in this SQLite file (default: ask GetRunMetrics)");
  app.add_option("--coordinator-pid", o.pid, "read the coordinator's peak memory and CPU time from /proc")
      ->check(flags::Integer(1, INT32_MAX));
  app.add_option("--name", o.name, "experiment name")->default_val(o.name);
  if (int exit = flags::Parse(app, argc, argv); exit >= 0) return exit;

  // One run per simulated worker: a single arm, one seed each, in experiments of at most
  // the coordinator's 256 runs.
  auto channel = grpc::CreateChannel(o.coordinator, grpc::InsecureChannelCredentials());
  auto experiments = v1::ExperimentService::NewStub(channel);
  for (int first = 0; first < o.workers; first += 256) {
    v1::SubmitExperimentRequest submit;
    v1::Experiment* e = submit.mutable_experiment();
    e->set_name(o.name);
    v1::ModelSpec* m = e->mutable_model();
    m->set_layers(o.layers);
    m->set_d_model(64);
    m->set_heads(4);
    m->set_kv_heads(2);
    m->set_context(128);
    e->mutable_data()->mutable_text()->add_paths(o.data);
    e->mutable_train()->set_steps(1000000);
    e->mutable_probe()->set_every(o.probe_every);
    e->add_arms(v1::BASELINE);
    for (int i = first; i < std::min(o.workers, first + 256); ++i) e->add_seeds(static_cast<uint64_t>(i));
    v1::SubmitExperimentResponse submitted;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    grpc::Status st = experiments->SubmitExperiment(&ctx, submit, &submitted);
    if (!st.ok()) {
      std::fprintf(stderr, "sinkscope-load-test: submit: %s\n", st.error_message().c_str());
      return 1;
    }
  }
  // Workers connect and register first; all stream over the same window, paced by this
  // thread: slot j = k * workers + i is worker i's step k + 1, due at
  // start + period * (k + i / workers), so sends are spread evenly over each period.
  // Between sends the thread drains the completion queue (every worker's reads, write
  // completions and connection work) until the next send is due.
  grpc::CompletionQueue cq;
  std::vector<std::unique_ptr<SimWorker>> workers;
  for (int i = 0; i < o.workers; ++i) workers.push_back(std::make_unique<SimWorker>(static_cast<size_t>(i), o, &cq));
  for (auto& w : workers) w->Start();
  // Handles completions until `deadline` (or the queue is shut down); false then.
  auto drain_until = [&](Clock::time_point deadline) {
    void* tag = nullptr;
    bool ok = false;
    // A deadline already passed polls without waiting (gRPC rounds a deadline up to its
    // next millisecond: "now" would wait up to a millisecond).
    const int64_t wait_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - Clock::now()).count();
    const gpr_timespec until =
        wait_ns <= 0 ? gpr_inf_past(GPR_CLOCK_MONOTONIC)
                     : gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_nanos(wait_ns, GPR_TIMESPAN));
    const auto r = cq.AsyncNext(&tag, &ok, until);
    if (r != grpc::CompletionQueue::GOT_EVENT) return false;
    const uintptr_t v = reinterpret_cast<uintptr_t>(tag);
    workers[v >> 2]->OnEvent(static_cast<Op>(v & 3), ok, Clock::now());
    return true;
  };
  // Takes everything that is ready without waiting. A poll handles at most one ready
  // connection and may complete nothing (a frame that is no message): polling stops after
  // a few in a row that complete nothing.
  auto poll_all = [&] {
    for (int idle = 0; idle < 4;) idle = drain_until(Clock::time_point{}) ? 0 : idle + 1;
  };
  auto every = [&](auto pred) {
    return std::all_of(workers.begin(), workers.end(), [&](const auto& w) { return pred(*w); });
  };
  const auto register_deadline = Clock::now() + std::chrono::seconds(60);
  while (Clock::now() < register_deadline && !every([](const SimWorker& w) { return w.assigned() || w.idle(); })) {
    drain_until(std::min(register_deadline, Clock::now() + std::chrono::milliseconds(50)));
  }
  const auto start = Clock::now() + std::chrono::milliseconds(500);
  const auto stop = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.seconds));
  const auto period = std::chrono::duration<double>(1.0 / o.hz);
  while (drain_until(start)) {
  }
  // The CPU time of the coordinator and of this process over the streaming window.
  const double cpu_before = o.pid > 0 ? ProcCpuSeconds(o.pid) : -1;
  const double self_cpu_before = SelfCpuSeconds();
  double behind_ms = 0;  // how late the pacing thread fell behind its schedule, at most
  auto last_poll = Clock::now();
  // The store's WAL, largest seen (every 100 ms): it must start over, not hold all written.
  int64_t wal_bytes = -1;
  auto last_wal = Clock::now();
  auto look_at_wal = [&] {
    struct stat st{};
    if (!o.db.empty() && stat((o.db + "-wal").c_str(), &st) == 0) wal_bytes = std::max<int64_t>(wal_bytes, st.st_size);
    last_wal = Clock::now();
  };
  for (int64_t j = 0;; ++j) {
    const int64_t k = j / o.workers, i = j % o.workers;
    const auto due = start + std::chrono::duration_cast<Clock::duration>(
                                 period * (static_cast<double>(k) + static_cast<double>(i) / o.workers));
    if (due >= stop) break;
    // gRPC's waits end up to a millisecond late: block while the send is more than a
    // millisecond away, then poll (poll_all; at most every 100 us, so an ack's time is
    // taken at most that late) and sleep the rest.
    while (due - Clock::now() > std::chrono::milliseconds(1)) {
      drain_until(due - std::chrono::milliseconds(1));
      last_poll = Clock::now();
    }
    if (Clock::now() - last_poll >= std::chrono::microseconds(100)) {
      poll_all();
      last_poll = Clock::now();
    }
    if (Clock::now() - last_wal >= std::chrono::milliseconds(100)) look_at_wal();
    if (due > Clock::now() + std::chrono::microseconds(200)) std::this_thread::sleep_until(due);
    const auto now = Clock::now();
    behind_ms = std::max(behind_ms, std::chrono::duration<double, std::milli>(now - due).count());
    workers[static_cast<size_t>(i)]->Tick(k + 1, now);
  }
  const double cpu_after = o.pid > 0 ? ProcCpuSeconds(o.pid) : -1;
  const double self_cpu_after = SelfCpuSeconds();
  const double wall = std::chrono::duration<double>(Clock::now() - start).count();
  // Wait (bounded) for the acks of everything sent, then end every stream and wait for
  // each to finish.
  const auto settle_deadline = Clock::now() + std::chrono::seconds(20);
  while (Clock::now() < settle_deadline && !every([](const SimWorker& w) { return w.settled(); })) {
    drain_until(std::min(settle_deadline, Clock::now() + std::chrono::milliseconds(20)));
  }
  for (auto& w : workers) w->Cancel();
  const auto end_deadline = Clock::now() + std::chrono::seconds(20);
  while (Clock::now() < end_deadline && !every([](const SimWorker& w) { return w.idle(); })) {
    drain_until(std::min(end_deadline, Clock::now() + std::chrono::milliseconds(20)));
  }
  size_t max_outbox = 0;
  for (auto& w : workers) max_outbox = std::max(max_outbox, w->max_outbox());
  const double window = o.seconds;
  // The queue is drained before it and the streams go (gRPC's rule); a stream that never
  // ended leaves the process to exit without tearing gRPC down.
  const bool ended = every([](const SimWorker& w) { return w.idle(); });
  if (ended) {
    cq.Shutdown();
    void* tag;
    bool ok;
    while (cq.Next(&tag, &ok)) {
    }
  }

  // Sent versus stored.
  int64_t progress_sent = 0, probes_sent = 0, progress_acked = 0, probes_acked = 0;
  int64_t steps_stored = 0, probes_stored = 0, unassigned = 0;
  Latencies all;
  std::vector<std::string> errors;
  for (auto& w : workers) {
    progress_sent += w->progress_sent();
    probes_sent += w->probes_sent();
    progress_acked += w->progress_acked();
    probes_acked += w->probes_acked();
    const Latencies& l = w->latencies();
    all.progress_ms.insert(all.progress_ms.end(), l.progress_ms.begin(), l.progress_ms.end());
    all.probe_ms.insert(all.probe_ms.end(), l.probe_ms.begin(), l.probe_ms.end());
    if (!w->error().empty() && errors.size() < 5) errors.push_back(w->error());
    if (w->run_id().empty()) {
      ++unassigned;
      continue;
    }
    int64_t steps = 0, probes = 0;
    if (!o.db.empty()) {
      if (!CountInDb(o.db, w->run_id(), &steps, &probes)) {
        std::fprintf(stderr, "sinkscope-load-test: cannot count rows in %s\n", o.db.c_str());
        return 1;
      }
    } else {
      v1::GetRunMetricsRequest req;
      req.set_run_id(w->run_id());
      v1::GetRunMetricsResponse resp;
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
      if (grpc::Status st = experiments->GetRunMetrics(&ctx, req, &resp); !st.ok()) {
        std::fprintf(stderr, "sinkscope-load-test: GetRunMetrics: %s\n", st.error_message().c_str());
        return 1;
      }
      steps = resp.steps_size();
      probes = resp.probes_size();
    }
    steps_stored += steps;
    probes_stored += probes;
  }
  const int64_t lost =
      std::max<int64_t>(0, progress_sent - steps_stored) + std::max<int64_t>(0, probes_sent - probes_stored);

  std::printf(
      "sinkscope load test: %d workers x %d Hz progress, a probe report (%d layers, 64-entry profiles) "
      "every %d steps, %.0f s, coordinator %s\n",
      o.workers, o.hz, o.layers, o.probe_every, o.seconds, o.coordinator.c_str());
  std::printf("  %-34s %12s\n", "metric", "value");
  std::printf("  %-34s %12lld\n", "progress sent", static_cast<long long>(progress_sent));
  std::printf("  %-34s %12lld\n", "progress stored", static_cast<long long>(steps_stored));
  std::printf("  %-34s %12lld\n", "probe reports sent", static_cast<long long>(probes_sent));
  std::printf("  %-34s %12lld\n", "probe reports stored", static_cast<long long>(probes_stored));
  std::printf("  %-34s %12.0f\n", "ingest rate, messages/s stored",
              static_cast<double>(steps_stored + probes_stored) / window);
  std::printf("  %-34s %12.0f\n", "  of which progress/s", static_cast<double>(steps_stored) / window);
  std::printf("  %-34s %12.0f\n", "  of which probe reports/s", static_cast<double>(probes_stored) / window);
  std::printf("  %-34s %12.1f\n", "progress send->stored p50, ms", Percentile(all.progress_ms, 0.50));
  std::printf("  %-34s %12.1f\n", "progress send->stored p99, ms", Percentile(all.progress_ms, 0.99));
  std::printf("  %-34s %12.1f\n", "progress send->stored max, ms", Percentile(all.progress_ms, 1.0));
  std::printf("  %-34s %12.1f\n", "probe send->stored p50, ms", Percentile(all.probe_ms, 0.50));
  std::printf("  %-34s %12.1f\n", "probe send->stored p99, ms", Percentile(all.probe_ms, 0.99));
  std::printf("  %-34s %12.1f\n", "probe send->stored max, ms", Percentile(all.probe_ms, 1.0));
  if (o.pid > 0) {
    std::printf("  %-34s %12.1f\n", "coordinator peak RSS (VmHWM), MiB",
                static_cast<double>(ProcStatusKb(o.pid, "VmHWM")) / 1024.0);
    if (cpu_before >= 0 && cpu_after >= 0) {
      std::printf("  %-34s %12.0f\n", "coordinator CPU, % of one core", 100.0 * (cpu_after - cpu_before) / wall);
    }
  }
  std::printf("  %-34s %12.0f\n", "generator CPU, % of one core", 100.0 * (self_cpu_after - self_cpu_before) / wall);
  std::printf("  %-34s %12lld\n", "unacked after the run",
              static_cast<long long>((progress_sent - progress_acked) + (probes_sent - probes_acked)));
  std::printf("  %-34s %12lld\n", "workers without a run", static_cast<long long>(unassigned));
  std::printf("  %-34s %12.1f\n", "generator behind schedule, max ms", behind_ms);
  if (wal_bytes >= 0) {
    std::printf("  %-34s %12.1f\n", "store WAL, largest seen, MiB", static_cast<double>(wal_bytes) / (1 << 20));
  }
  std::printf("  %-34s %12zu\n", "generator outbox, max messages", max_outbox);
  std::printf("  %-34s %12lld\n", "LOST (sent - stored)", static_cast<long long>(lost));
  for (const auto& err : errors) std::printf("  worker error: %s\n", err.c_str());
  const int code = lost == 0 && unassigned == 0 ? 0 : 1;
  if (!ended) {
    std::printf("  some streams did not end within 20 s of their cancel\n");
    std::fflush(stdout);
    std::_Exit(code);
  }
  return code;
}

}  // namespace
}  // namespace sinkscope

int main(int argc, char** argv) { return sinkscope::Main(argc, argv); }

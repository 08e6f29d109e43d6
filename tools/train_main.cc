// sinkscope-train: trains every arm × seed of an experiment file locally with the engine
// (no coordinator), with a live progress line, periodic validation and checkpoints,
// and prints the arms side by side. The service's workers run the same Trainer.
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <optional>
#include <thread>
#include <vector>

#include "runspec/convert.h"
#include "schema/experiment.h"
#include "engine/backend.h"
#include "base/flags.h"
#include "base/numbers.h"
#include "training/hf.h"
#include "engine/gloo/gloo_communicator.h"
#include "training/checkpoint.h"
#include "training/devices.h"
#include "training/probe_json.h"
#include "training/progress.h"
#include "training/safetensors.h"
#include "training/run_loop.h"
#include "training/trainer.h"

namespace sinkscope {
namespace {


struct RunSummary {
  std::string arm;
  uint64_t seed = 0;
  std::string point;    // a sweep's point, "train.lr=1e-3 data.bos=true"; empty without one
  int point_index = -1;  // its index (its runs are written to p<index>-<arm>-s<seed>/); −1 without one
  // "p3 baseline" with a sweep, else the arm.
  std::string Name() const { return point_index < 0 ? arm : "p" + std::to_string(point_index) + " " + arm; }
  // final_loss is the last step's loss, as the service's status and compare show it.
  double first_loss = NAN, final_loss = NAN, val_loss = NAN, tokens_per_second = 0;
  double mean_loss_last_10 = NAN;  // mean loss of the last (up to) 10 steps
  double allreduce_seconds = 0;    // per step, with --ranks > 1: waited for after the backward
  double allreduce_busy_seconds = 0;  // per step: the all-reduces' own time, overlapped or not
  int64_t steps = 0;
  std::string dir;
  bool probed = false;
  ProbeReport last_probe;  // the latest training-time probe
};

// An append-only JSONL file of a run (metrics.jsonl, probes.jsonl). Each record is written
// whole as it comes (one write of one line, so `tail -f` follows a run and a reader never
// sees half a line); Sync() makes every line appended so far durable. TrainRun syncs before
// each checkpoint is committed, so the records of every step up to a checkpoint are on
// disk whenever that checkpoint is, and a resume drops those of later steps (TrimJsonl).
class JsonlLog {
 public:
  JsonlLog() = default;
  JsonlLog(const JsonlLog&) = delete;
  JsonlLog& operator=(const JsonlLog&) = delete;
  ~JsonlLog() {
    if (fd_ >= 0) ::close(fd_);
  }

  Status Open(const std::string& path) {
    path_ = path;
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd_ < 0) return InternalError("cannot open " + path + ": " + std::strerror(errno));
    return OkStatus();
  }
  Status Append(const nlohmann::json& record) {
    buffer_ = record.dump();
    buffer_ += '\n';
    return Flush();
  }
  Status Sync() {
    // Never opened: the run ended before its start (a checkpoint that failed to load), and
    // that error, not an fsync of nothing, is what the user must see.
    if (fd_ < 0) return OkStatus();
    RETURN_IF_ERROR(Flush());
    if (::fsync(fd_) != 0) return InternalError("cannot fsync " + path_ + ": " + std::strerror(errno));
    return OkStatus();
  }

 private:
  Status Flush() {
    size_t written = 0;
    while (written < buffer_.size()) {
      const ssize_t n = ::write(fd_, buffer_.data() + written, buffer_.size() - written);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return InternalError("cannot write " + path_ + ": " + std::strerror(errno));
      written += static_cast<size_t>(n);
    }
    buffer_.clear();
    return OkStatus();
  }

  std::string path_;
  int fd_ = -1;
  std::string buffer_;
};

// Rewrites the JSONL file `path` (atomically) with only its complete records of steps
// 1…`last_step`, in increasing step order, each once: what a run resumed from the
// checkpoint at `last_step` keeps, since it trains the later steps again. A torn line, a
// record of a later step and a repeated step are dropped. `kept` sees each record kept.
// Returns the number kept; a missing file is an empty one.
StatusOr<int64_t> TrimJsonl(const std::string& path, int64_t last_step,
                            const std::function<void(const nlohmann::json&)>& kept) {
  std::string text;
  std::error_code ec;
  if (std::filesystem::exists(path, ec)) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    if (!in) return InternalError("cannot read " + path);
    text = ss.str();
  } else if (ec) {
    return InternalError("cannot read " + path + ": " + ec.message());
  }
  std::string out;
  int64_t count = 0, previous = 0;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("step") || !j["step"].is_number_integer()) continue;
    const int64_t step = j["step"].get<int64_t>();
    if (step <= previous || step > last_step) continue;
    previous = step;
    out += line;
    out += '\n';
    ++count;
    if (kept) kept(j);
  }
  RETURN_IF_ERROR(WriteFileAtomically(path, out));
  return count;
}

// The arms side by side per layer at their latest probe: the numbers behind the paper's
// Figures 1 and 7.
void PrintArmComparison(const std::vector<RunSummary>& runs) {
  std::vector<const RunSummary*> probed;
  for (const auto& r : runs) {
    if (r.probed) probed.push_back(&r);
  }
  if (probed.empty()) return;
  std::printf("\nper layer at the latest probe (step %lld): R_GS(0) | sink rate | ‖h_out‖ tok0/1-15 | top1/median\n",
              static_cast<long long>(probed[0]->last_probe.step));
  std::printf("%5s", "layer");
  for (const auto* r : probed) std::printf(" | %-34s", (r->Name() + " s" + std::to_string(r->seed)).c_str());
  std::printf("\n");
  const size_t layers = probed[0]->last_probe.layers.size();
  for (size_t l = 0; l < layers; ++l) {
    std::printf("%5zu", l);
    for (const auto* r : probed) {
      const LayerProbe& p = r->last_probe.layers[l];
      std::printf(" | %7.2f %6.2f %9.2f %9.1f", p.r_gs, p.sink_rate, p.norm_ratio.at("h_out"),
                  p.massive.top1_over_median);
    }
    std::printf("\n");
  }
  std::printf("%5s", "med");
  for (const auto* r : probed) {
    std::printf(" | %7.2f [IQR %6.2f-%-6.2f]          ", r->last_probe.r_gs_median, r->last_probe.r_gs_q1,
                r->last_probe.r_gs_q3);
  }
  std::printf("\n");
  // The attention arms' own observables (docs/design/ARMS.md "Probes"), means over heads.
  auto mean = [](const std::vector<double>& v) {
    double m = 0;
    for (double x : v) m += x / static_cast<double>(v.size());
    return m;
  };
  for (const auto* r : probed) {
    const auto& layers_of = r->last_probe.layers;
    if (layers_of.empty() || (layers_of[0].unassigned_mass.empty() && layers_of[0].gate_mean.empty())) continue;
    std::printf("%s s%llu per layer:", r->arm.c_str(), static_cast<unsigned long long>(r->seed));
    if (!layers_of[0].unassigned_mass.empty()) {
      std::printf(" unassigned mass");
      for (const LayerProbe& p : layers_of) std::printf(" %.4f", mean(p.unassigned_mass));
    }
    if (!layers_of[0].gate_mean.empty()) {
      std::printf(" gate mean");
      for (const LayerProbe& p : layers_of) std::printf(" %.3f", mean(p.gate_mean));
      std::printf(" | gate s / 1-15");
      for (const LayerProbe& p : layers_of) std::printf(" %.3f", mean(p.gate_sink) / mean(p.gate_rest));
    }
    std::printf("\n");
  }
}

// sinkscope-train's side of the run loop: metrics.jsonl and probes.jsonl (synced before
// each checkpoint), the progress bar, and the run's summary.
class LocalRun final : public RunObserver {
 public:
  LocalRun(RunSummary* summary, int64_t total, const std::atomic<int>* interrupted)
      : r_(*summary), bar_(r_.Name() + " seed " + std::to_string(r_.seed), total), interrupted_(interrupted) {}

  void OnStaleFileRemoved(const std::string& path) override {
    std::fprintf(stderr, "removed %s, left by a process that was killed while writing it\n", path.c_str());
  }
  Status OnStart(int64_t step, bool resumed) override {
    // The records of the steps up to the checkpoint (none on a fresh start) are kept:
    // they were made durable before the checkpoint was committed. Later steps are
    // trained again.
    ASSIGN_OR_RETURN(const int64_t kept_steps,
                     TrimJsonl(r_.dir + "/metrics.jsonl", step, [&](const nlohmann::json& j) {
                       if (j.contains("loss") && j["loss"].is_number()) NoteLoss(j["step"], j["loss"]);
                       if (j.contains("val_loss") && j["val_loss"].is_number()) r_.val_loss = j["val_loss"];
                     }));
    ASSIGN_OR_RETURN(const int64_t kept_probes, TrimJsonl(r_.dir + "/probes.jsonl", step, nullptr));
    if (resumed) {
      std::fprintf(stderr, "%s: resuming at step %lld; %lld metrics and %lld probe records kept\n", r_.dir.c_str(),
                   static_cast<long long>(step), static_cast<long long>(kept_steps),
                   static_cast<long long>(kept_probes));
    }
    RETURN_IF_ERROR(metrics_.Open(r_.dir + "/metrics.jsonl"));
    RETURN_IF_ERROR(probes_.Open(r_.dir + "/probes.jsonl"));
    r_.steps = step;
    return OkStatus();
  }
  Status OnStep(const StepStats& s, double val_loss, const ProbeReport* probe) override {
    if (probe != nullptr) {
      RETURN_IF_ERROR(probes_.Append(ProbeReportToJson(*probe)));
      r_.last_probe = *probe;
      r_.probed = true;
    }
    NoteLoss(s.step, s.loss);
    r_.steps = s.step;
    if (s.step > 1) {  // the first step pays one-time allocation
      tok_s_sum_ += s.tokens_per_second;
      comm_sum_ += s.comm_seconds;
      comm_busy_sum_ += s.comm_busy_seconds;
      ++timed_steps_;
    }
    nlohmann::json line = {{"step", s.step}, {"loss", s.loss}, {"lr", s.lr}, {"grad_norm", s.grad_norm},
                           {"tokens_per_second", s.tokens_per_second}, {"mfu", s.mfu},
                           {"mfu_reference_flops", s.mfu_reference_flops}};
    if (!std::isnan(val_loss)) {
      r_.val_loss = val_loss;
      line["val_loss"] = val_loss;
    }
    RETURN_IF_ERROR(metrics_.Append(line));
    bar_.Update(s.step, s.loss, s.tokens_per_second);
    return OkStatus();
  }
  Status BeforeCheckpoint(int64_t) override { return Sync(); }
  void OnCheckpointRetry(int64_t step, int retry, std::chrono::milliseconds wait, const Status& error) override {
    std::fprintf(stderr, "\ncheckpoint of step %lld failed (%s); retry %d in %lld ms\n", static_cast<long long>(step),
                 error.message().c_str(), retry, static_cast<long long>(wait.count()));
  }
  std::optional<StopKind> StopRequested() override {
    if (interrupted_->load() != 0) return StopKind::kShutdown;
    return std::nullopt;
  }

  Status Finish() {
    bar_.Finish();
    RETURN_IF_ERROR(Sync());
    if (!last_losses_.empty()) {
      r_.mean_loss_last_10 = 0;
      for (double l : last_losses_) r_.mean_loss_last_10 += l / last_losses_.size();
    }
    r_.tokens_per_second = timed_steps_ ? tok_s_sum_ / timed_steps_ : 0;
    r_.allreduce_seconds = timed_steps_ ? comm_sum_ / timed_steps_ : 0;
    r_.allreduce_busy_seconds = timed_steps_ ? comm_busy_sum_ / timed_steps_ : 0;
    return OkStatus();
  }

 private:
  Status Sync() {
    RETURN_IF_ERROR(probes_.Sync());
    return metrics_.Sync();
  }
  void NoteLoss(int64_t step, double loss) {
    if (step == 1) r_.first_loss = loss;
    r_.final_loss = loss;
    last_losses_.push_back(loss);
    if (last_losses_.size() > 10) last_losses_.pop_front();
  }

  RunSummary& r_;
  ProgressBar bar_;
  const std::atomic<int>* interrupted_;
  JsonlLog metrics_, probes_;
  std::deque<double> last_losses_;  // of the last (up to) 10 steps
  double tok_s_sum_ = 0, comm_sum_ = 0, comm_busy_sum_ = 0;
  int64_t timed_steps_ = 0;
};

// --bf16: every rank trains on the bf16 mode of the CPU backend.
bool g_bf16 = false;
// --fp32: a GPU trains in the CUDA backend's fp32 mode (bf16 is its default).
bool g_fp32 = false;
// --allreduce-bucket-mb: floats per gradient bucket all-reduced during the backward (0: after it).
size_t g_bucket_floats = size_t{1} << 20;

// Set by SIGINT/SIGTERM: the run stops after its step and checkpoints; --resume continues.
std::atomic<int> g_interrupted{0};
void OnSignal(int) { g_interrupted.store(1); }

// Ranks 1…N−1 of a data-parallel run: they train their share and write nothing; rank 0
// decides when to stop.
class QuietRank final : public RunObserver {
 public:
  Status OnStep(const StepStats&, double, const ProbeReport*) override { return OkStatus(); }
  std::optional<StopKind> StopRequested() override { return std::nullopt; }
};

StatusOr<RunSummary> TrainRun(const v1::Experiment& e, v1::Arm arm, uint64_t seed, const DataSplits& data,
                              const std::string& out, bool resume, Backend* backend, double peak_flops, int ranks,
                              int point_index, const std::string& point) {
  RunSummary r;
  r.arm = ArmName(arm);
  r.seed = seed;
  r.point = point;
  r.point_index = point_index;
  r.dir = out + "/" + (point_index >= 0 ? "p" + std::to_string(point_index) + "-" : "") + r.arm + "-s" +
          std::to_string(seed);
  RunLoopOptions o = ToRunLoopOptions(e, arm, seed, peak_flops, r.dir, resume);
  o.trainer.allreduce_bucket_floats = g_bucket_floats;
  LocalRun local(&r, o.total_steps, &g_interrupted);
  RunResult result;
  if (ranks == 1) {
    result = RunLoop(o, &data, backend, &local, Clock::Real());
  } else {
    // N ranks in this process, one thread and one CPU backend each, meeting over Gloo's
    // TCP transport on loopback; rank 0 (this thread) writes the run's files.
    auto store = MakeInProcessStore();
    std::vector<RunResult> others(ranks - 1);
    std::vector<std::thread> threads;
    for (int k = 1; k < ranks; ++k) {
      threads.emplace_back([&, k] {
        GlooOptions g;
        g.rank = k;
        g.world_size = ranks;
        auto comm = ConnectGloo(g, store);
        if (!comm.ok()) {
          others[k - 1].kind = RunResult::kError;
          others[k - 1].error = comm.status();
          return;
        }
        RunLoopOptions mine = o;
        mine.trainer.comm = comm->get();
        auto own_backend = g_bf16 ? MakeCpuBf16Backend() : MakeCpuBackend();
        QuietRank quiet;
        others[k - 1] = RunLoop(mine, &data, own_backend.get(), &quiet, Clock::Real());
      });
    }
    GlooOptions g;
    g.world_size = ranks;
    auto comm = ConnectGloo(g, store);
    if (comm.ok()) {
      o.trainer.comm = comm->get();
      result = RunLoop(o, &data, backend, &local, Clock::Real());
    } else {
      result.kind = RunResult::kError;
      result.error = comm.status();
    }
    for (auto& th : threads) th.join();
    for (const RunResult& other : others) {
      if (result.kind != RunResult::kError && other.kind == RunResult::kError) result = other;
    }
  }
  RETURN_IF_ERROR(local.Finish());
  const std::string run = "run " + r.arm + " seed " + std::to_string(seed) + ": ";
  switch (result.kind) {
    case RunResult::kFinished:
      break;
    case RunResult::kNonFinite:
      return Status(StatusCode::kAborted, run + "NUMERICAL: " + result.Describe());
    case RunResult::kStopped:
      return Status(StatusCode::kCancelled, run + result.Describe() + "; continue it with --resume");
    case RunResult::kGiveBack:
    case RunResult::kError:
      return Status(result.kind == RunResult::kError ? result.error.code() : StatusCode::kUnavailable,
                    run + result.Describe());
  }
  return r;
}

int Main(int argc, char** argv) {
  std::string file, out, device_text;
  int64_t steps = -1, ranks = 1;
  bool resume = false, json = false, print_model = false;
  CLI::App app("Trains every arm x seed of an experiment file on the CPU backend (or a CUDA device: --device) and prints the arms side by side.",
               "sinkscope-train");
  app.add_option("EXPERIMENT", file, "the experiment file (YAML or JSON)")->required();
  app.add_option("--out", out, "where runs are written (default runs/<experiment name>)")
      ->check(flags::NonEmpty())
      ->type_name("DIR");
  app.add_option("--steps", steps, "override train.steps")->check(flags::Integer(1, INT32_MAX));
  app.add_option("--ranks", ranks,
                 "train each run data-parallel over N ranks in this process (one thread and CPU backend each, Gloo "
                 "over loopback); train.micro_batch is the global micro-batch and must be a multiple of N")
      ->check(flags::Integer(1, 64))
      ->default_val(1);
  double bucket_mb = 4;
  app.add_option("--allreduce-bucket-mb", bucket_mb,
                 "with --ranks > 1: all-reduce the gradients in buckets of this many MB while the backward runs "
                 "(0: in one all-reduce after it)")
      ->check(CLI::Range(0.0, 4096.0))
      ->default_val(4);
  app.add_flag("--resume", resume,
               "continue each run from its latest checkpoint in --out; metrics.jsonl and probes.jsonl keep the "
               "records up to the checkpoint's step (Ctrl-C stops a run after its step with a checkpoint)");
  app.add_flag("--json", json, "print the summary as JSON instead of a table");
  app.add_flag("--bf16", g_bf16,
               "train in the CPU backend's bf16 mode: bf16 wherever a bf16 GPU backend stores bf16 (matmul operands, "
               "activations), fp32 accumulation, residual stream, weights and optimizer state (engine/cpu/bf16_mode.cc); "
               "on a GPU bf16 is the default");
  app.add_flag("--fp32", g_fp32,
               "on a GPU, train in the CUDA backend's fp32 mode (tight parity with the CPU) instead of bf16; the "
               "attention arms always train in fp32");
  app.add_option("--device", device_text,
                 "cpu, or cuda / cuda:N (a build with the CUDA backend: bf16 unless --fp32, one rank); default: the "
                 "file's resources.device (CUDA: cuda:0)")
      ->type_name("cpu|cuda[:N]");
  app.add_flag("--print-model", print_model,
               "print the baseline arm's model config (as a checkpoint header holds it) and exit");
  if (int exit = flags::Parse(app, argc, argv); exit >= 0) return exit;
  g_bucket_floats = static_cast<size_t>(bucket_mb * 1e6 / sizeof(float));
  auto e = LoadExperimentFile(file);
  if (!e.ok()) {
    std::fprintf(stderr, "sinkscope-train: %s\n", e.status().message().c_str());
    return 2;
  }
  const v1::Experiment submitted = *e;
  auto override_steps = [&](v1::Experiment& x) {
    if (steps > 0) {
      x.mutable_train()->set_steps(static_cast<int32_t>(steps));
      x.mutable_train()->set_warmup_steps(std::min<int32_t>(x.train().warmup_steps(), x.train().steps()));
    }
  };
  ApplyDefaults(*e);
  override_steps(*e);
  // --print-model needs no data: the paper's configs print on a machine without C4.
  if (Status s = ValidateExperiment(*e, /*check_paths=*/!print_model && e->sweep_size() == 0); !s.ok()) {
    std::fprintf(stderr, "sinkscope-train: %s: %s\n", file.c_str(), s.message().c_str());
    return 2;
  }
  // The sweep's points (one without a sweep), each checked whole before any is trained.
  struct Point {
    int index = -1;
    std::string label;
    v1::Experiment spec;
  };
  std::vector<Point> points;
  if (e->sweep_size() == 0) {
    points.push_back({-1, "", *e});
  } else {
    for (int64_t i = 0; i < SweepPointCount(*e); ++i) {
      Point p;
      p.index = static_cast<int>(i);
      auto pe = SweepPointExperiment(submitted, i, &p.label);
      if (!pe.ok()) {
        std::fprintf(stderr, "sinkscope-train: %s: %s\n", file.c_str(), pe.status().message().c_str());
        return 2;
      }
      p.spec = std::move(*pe);
      override_steps(p.spec);
      if (Status s = ValidateExperiment(p.spec, !print_model); !s.ok()) {
        std::fprintf(stderr, "sinkscope-train: %s: sweep point %lld (%s): %s\n", file.c_str(), static_cast<long long>(i),
                     p.label.c_str(), s.message().c_str());
        return 2;
      }
      points.push_back(std::move(p));
    }
  }
  if (print_model) {
    std::printf("%s\n", ModelConfigToJson(ToModelConfig(e->model(), v1::BASELINE)).dump().c_str());
    return 0;
  }
  DeviceChoice device;
  if (!device_text.empty()) {
    auto chosen = ParseDevice(device_text);
    if (!chosen.ok()) {
      std::fprintf(stderr, "sinkscope-train: --device: %s\n", chosen.status().message().c_str());
      return 2;
    }
    device = *chosen;
  } else if (e->resources().device() == v1::CUDA) {
    device.kind = DeviceChoice::kCuda;
  }
  if (device.kind == DeviceChoice::kCuda && ranks > 1) {
    std::fprintf(stderr, "sinkscope-train: --device %s: %s\n", device.Name().c_str(),
                 "local runs on CUDA have one rank (gangs of CUDA ranks run through the service, over NCCL)");
    return 2;
  }
  if (g_bf16 && g_fp32) {
    std::fprintf(stderr, "sinkscope-train: --bf16 and --fp32 exclude each other\n");
    return 2;
  }
  if (device.kind == DeviceChoice::kCpu && g_fp32) {
    std::fprintf(stderr, "sinkscope-train: --fp32 chooses the GPU's mode (the CPU trains in fp32 unless --bf16)\n");
    return 2;
  }
  if (out.empty()) out = "runs/" + e->name();
  {
    std::error_code ec;
    std::filesystem::create_directories(out, ec);
    if (ec) {
      std::fprintf(stderr, "sinkscope-train: --out %s: cannot create the folder: %s\n", out.c_str(),
                   ec.message().c_str());
      return 2;
    }
  }

  // The data of a point; loaded again only when a point's data section differs.
  std::optional<DataSplits> data;
  std::string data_key;
  double unigram = NAN;
  auto load_data = [&](const v1::Experiment& x) -> bool {
    const DataSpec spec = ToDataSpec(x);
    const std::string key = x.data().SerializeAsString() + "|" + std::to_string(x.model().context());
    if (data && key == data_key) return true;
    auto loaded = LoadData(spec);
    if (!loaded.ok()) {
      std::fprintf(stderr, "sinkscope-train: data: %s\n", loaded.status().message().c_str());
      return false;
    }
    data = std::move(*loaded);
    data_key = key;
    unigram = UnigramEntropy(data->val.size() > 0 ? data->val.tokens() : data->train.tokens());
    std::fprintf(stderr, "%s: %zu train / %zu validation tokens, unigram entropy %.4f nats/token\n",
                 x.name().c_str(), data->train.size(), data->val.size(), unigram);
    return true;
  };
  if (!load_data(points[0].spec)) return 2;

  // Ctrl-C (or SIGTERM): the current run stops after its step and is checkpointed.
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  std::unique_ptr<Backend> backend;
  double peak = 0;
  if (device.kind == DeviceChoice::kCpu) {
    backend = g_bf16 ? MakeCpuBf16Backend() : MakeCpuBackend();
    peak = MeasureGemmPeak(*backend);
    std::fprintf(stderr, "%s backend: sgemm peak %.1f GFLOP/s (the MFU reference)\n", backend->Name(), peak / 1e9);
  } else {
    auto described = DescribeDevice(device);
    StatusOr<std::unique_ptr<Backend>> made = described.status();
    // The attention arms have no bf16 contract yet (ARMS.md): an experiment with one trains
    // every run in fp32, so its arms and baseline compare at one precision.
    bool arms = false;
    for (const Point& point : points) arms = arms || ExperimentHasAttentionArm(point.spec);
    if (arms && !g_fp32) {
      std::fprintf(stderr, "%s: an attention arm: every run trains in the GPU's fp32 mode (the arms have no bf16 mode yet)\n",
                   e->name().c_str());
    }
    if (described.ok()) {
      made = MakeBackendFor(device, g_fp32 || arms ? GpuPrecision::kFp32 : GpuPrecision::kBf16);
    }
    if (!made.ok()) {
      std::fprintf(stderr, "sinkscope-train: %s\n", made.status().message().c_str());
      return 2;
    }
    backend = std::move(*made);
    peak = described->table_peak_flops > 0 ? described->table_peak_flops : MeasureGemmPeak(*backend);
    std::fprintf(stderr, "%s backend on %s (%s): peak %.1f TFLOP/s (the MFU reference)\n", backend->Name(),
                 described->name.c_str(), device.Name().c_str(), peak / 1e12);
  }
  std::vector<RunSummary> runs;
  for (const Point& point : points) {
    if (point.index >= 0) {
      std::fprintf(stderr, "sweep point p%d of %zu: %s\n", point.index, points.size(), point.label.c_str());
      if (!load_data(point.spec)) return 2;
    }
    for (uint64_t seed : e->seeds()) {
      for (int a : e->arms()) {
        auto r = TrainRun(point.spec, static_cast<v1::Arm>(a), seed, *data, out, resume, backend.get(), peak, ranks,
                          point.index, point.label);
        if (!r.ok()) {
          std::fprintf(stderr, "\nsinkscope-train: %s\n", r.status().message().c_str());
          return r.status().code() == StatusCode::kCancelled ? 130 : 1;
        }
        runs.push_back(*r);
      }
    }
  }
  if (json) {
    nlohmann::json j = {{"experiment", e->name()}, {"backend", backend->Name()}, {"unigram_entropy", unigram},
                        {"runs", nlohmann::json::array()}};
    for (const auto& r : runs) {
      j["runs"].push_back({{"arm", r.arm}, {"seed", r.seed}, {"point", r.point}, {"steps", r.steps}, {"first_loss", r.first_loss},
                           {"final_loss", r.final_loss}, {"mean_loss_last_10", r.mean_loss_last_10},
                           {"val_loss", r.val_loss},
                           {"tokens_per_second", r.tokens_per_second},
                           {"allreduce_seconds_per_step", r.allreduce_seconds},
                           {"allreduce_busy_seconds_per_step", r.allreduce_busy_seconds}, {"dir", r.dir}});
      if (r.probed) j["runs"].back()["last_probe"] = ProbeReportToJson(r.last_probe);
    }
    std::printf("%s\n", j.dump(1).c_str());
    return 0;
  }
  std::printf("\n%s: %lld steps of %d tokens; unigram entropy of the validation text %.4f nats/token\n",
              e->name().c_str(), static_cast<long long>(e->train().steps()),
              e->train().micro_batch() * e->train().grad_accum() * e->model().context(), unigram);
  std::printf("%-22s %6s %11s %11s %13s %9s %10s\n", "arm", "seed", "first loss", "final loss", "mean last 10",
              "val loss", "tok/s");
  for (const auto& r : runs) {
    std::printf("%-22s %6llu %11.4f %11.4f %13.4f %9.4f %10.0f\n", r.Name().c_str(),
                static_cast<unsigned long long>(r.seed), r.first_loss, r.final_loss, r.mean_loss_last_10, r.val_loss,
                r.tokens_per_second);
  }
  std::printf("(final loss: the last step's; mean last 10: the mean loss of the last 10 steps)\n");
  if (points.size() == 1) {
    PrintArmComparison(runs);
  } else {
    for (const Point& point : points) {
      std::printf("\npoint p%d: %s\n", point.index, point.label.c_str());
      std::vector<RunSummary> of_point;
      for (const auto& r : runs) {
        if (r.point_index == point.index) of_point.push_back(r);
      }
      PrintArmComparison(of_point);
    }
  }
  std::printf("runs written to %s (metrics.jsonl, probes.jsonl, checkpoint.bin, hf/)\n", out.c_str());
  return 0;
}

}  // namespace
}  // namespace sinkscope

int main(int argc, char** argv) { return sinkscope::Main(argc, argv); }

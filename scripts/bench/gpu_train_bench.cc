// sinkscope-bench-gpu: training throughput, MFU and probe overhead of a backend on a
// model given as JSON (what `sinkscope-train EXPERIMENT --print-model` prints, so the
// paper's configs come from examples/paper-*.yaml and are never copied here).
//
// Each arm (baseline, V-scale) trains with the real Trainer (forward, backward, AdamW;
// one micro-batch per step) on synthetic uniform random tokens of the model's vocabulary.
// A step ends when its loss and gradient norm are read back, so the wall time of a step
// includes everything the device queued for it.
//
// MFU (METRICS.md, training observables): TrainFlopsPerToken(T) · tokens/s divided by the
// device table's peak (H100/H200 dense bf16: 989.4 TFLOP/s), or, for a device not in the
// table (the CPU), by a GEMM rate measured on the backend.
// Probe overhead at `--probe-every N`: plain and probed steps interleaved, medians
// compared, (probed − plain) / (N · plain).
//
// scripts/bench/gpu.sh runs it beside PyTorch on the same GPU; CI runs it on the CPU with
// the quickstart model (bench_gpu_smoke) so that this code is exercised without a GPU.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "base/flags.h"
#include "base/rng.h"
#include "data/data.h"
#include "engine/backend.h"
#include "training/checkpoint.h"
#include "training/devices.h"
#include "training/trainer.h"

namespace sinkscope {
namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point since) { return std::chrono::duration<double>(Clock::now() - since).count(); }
double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

struct ArmResult {
  std::string arm;
  double ms_per_step = 0, tokens_per_second = 0, mfu = 0, final_loss = 0;
  double plain_median_ms = 0, probed_median_ms = 0, probe_overhead = 0;
};

StatusOr<ArmResult> RunArm(ModelConfig model, VScaleMode mode, const DataSplits& data, Backend& backend, int B,
                           int warmup, int steps, int probe_every, double peak) {
  model.vscale = mode;
  TrainerOptions options;
  options.model = model;
  options.micro_batch = B;
  options.grad_accum = 1;
  options.seed = 0;
  options.optimizer.lr = 6e-4;
  options.optimizer.min_lr = 6e-5;
  options.optimizer.warmup_steps = 10;
  options.optimizer.total_steps = 1000;
  ASSIGN_OR_RETURN(std::unique_ptr<Trainer> trainer, Trainer::Create(options, &data, &backend));
  trainer->Initialize();
  ArmResult r;
  r.arm = VScaleModeName(mode);
  for (int i = 0; i < warmup; ++i) {
    const StepStats s = trainer->Step();
    if (!s.error.ok()) return s.error;
  }
  const auto start = Clock::now();
  for (int i = 0; i < steps; ++i) {
    const StepStats s = trainer->Step();
    if (!s.error.ok()) return s.error;
    r.final_loss = s.loss;
  }
  const double wall = Seconds(start);
  r.ms_per_step = 1e3 * wall / steps;
  r.tokens_per_second = static_cast<double>(trainer->tokens_per_step()) * steps / wall;
  r.mfu = model.TrainFlopsPerToken(model.context) * r.tokens_per_second / peak;
  // Probe cost with the default settings (s 0, T_e 31, P 64, ε 0.3, T_ε 64) on the step's
  // own batch, as training probes.
  ProbeSettings probe;
  probe.ref_span = std::min(probe.ref_span, model.context - 1);
  probe.profile_len = std::min(probe.profile_len, model.context);
  probe.t_eps = std::min(probe.t_eps, model.context);
  ProbeReport report;
  std::vector<double> plain, probed;
  for (int i = 0; i < std::max(3, steps / 2); ++i) {
    auto t0 = Clock::now();
    StepStats s = trainer->Step();
    plain.push_back(Seconds(t0));
    t0 = Clock::now();
    s = trainer->ProbedStep(probe, ProbeBatchKind::kStepBatch, &report);
    probed.push_back(Seconds(t0));
    if (!s.error.ok()) return s.error;
  }
  r.plain_median_ms = 1e3 * Median(plain);
  r.probed_median_ms = 1e3 * Median(probed);
  r.probe_overhead = (r.probed_median_ms - r.plain_median_ms) / (probe_every * r.plain_median_ms);
  return r;
}

int Main(int argc, char** argv) {
  std::string model_file, device_text = "cuda:0", label;
  int B = 8, steps = 10, warmup = 2, probe_every = 100;
  bool json = false;
  CLI::App app("Training throughput, MFU and probe overhead of a backend on a model given as JSON "
               "(scripts/bench/README.md).",
               "sinkscope-bench-gpu");
  app.add_option("--model", model_file, "the model config as `sinkscope-train EXPERIMENT --print-model` prints it")
      ->required()
      ->check(CLI::ExistingFile);
  app.add_option("--device", device_text, "cpu, cuda or cuda:N")->default_val("cuda:0");
  app.add_option("--micro-batch", B, "sequences per step")->check(flags::Integer(1, 1 << 16))->default_val(8);
  app.add_option("--steps", steps, "timed steps per arm")->check(flags::Integer(1, 1 << 20))->default_val(10);
  app.add_option("--warmup", warmup, "untimed steps before them")->check(flags::Integer(0, 1 << 20))->default_val(2);
  app.add_option("--probe-every", probe_every, "probe.every the overhead is stated for")
      ->check(flags::Integer(1, 1 << 20))
      ->default_val(100);
  app.add_option("--label", label, "a name for the model in the output (default: the file name)");
  app.add_flag("--json", json, "one JSON object on stdout instead of the table");
  if (int exit = flags::Parse(app, argc, argv); exit >= 0) return exit;
  if (label.empty()) label = model_file.substr(model_file.find_last_of('/') + 1);

  auto fail = [](const std::string& m) {
    std::fprintf(stderr, "sinkscope-bench-gpu: %s\n", m.c_str());
    return 1;
  };
  nlohmann::json j;
  {
    std::ifstream in(model_file);
    j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return fail("--model " + model_file + ": not JSON");
  }
  auto model = ModelConfigFromJson(j);
  if (!model.ok()) return fail("--model " + model_file + ": " + model.status().message());
  auto device = ParseDevice(device_text);
  if (!device.ok()) return fail("--device: " + device.status().message());
  auto described = DescribeDevice(*device);
  if (!described.ok()) return fail(described.status().message());
  auto backend = MakeBackendFor(*device);
  if (!backend.ok()) return fail(backend.status().message());
  double peak = described->table_peak_flops;
  const bool table = peak > 0;
  if (!table) peak = MeasureGemmPeak(**backend);

  DataSplits data;
  {
    std::vector<int32_t> tokens(static_cast<size_t>(std::max(1 << 20, 4 * B * (model->context + 1))));
    Rng rng(7);
    for (int32_t& t : tokens) t = static_cast<int32_t>(rng.Below(static_cast<uint64_t>(model->vocab)));
    data.train = TokenStream(std::move(tokens));
    data.max_token = model->vocab - 1;
  }
  std::vector<ArmResult> arms;
  for (VScaleMode mode : {VScaleMode::kNone, VScaleMode::kVScale}) {
    auto r = RunArm(*model, mode, data, **backend, B, warmup, steps, probe_every, peak);
    if (!r.ok()) return fail(std::string(VScaleModeName(mode)) + ": " + r.status().message());
    arms.push_back(*r);
  }
  const double params = static_cast<double>(model->MatmulParams());
  if (json) {
    nlohmann::json out = {{"model", label},
                          {"matmul_params", params},
                          {"device", described->name},
                          {"backend", (*backend)->Name()},
                          {"peak_flops", peak},
                          {"peak_from", table ? "device table (dense bf16)" : "measured GEMM rate"},
                          {"micro_batch", B},
                          {"context", model->context},
                          {"probe_every", probe_every}};
    for (const ArmResult& a : arms) {
      out["arms"].push_back({{"arm", a.arm},
                             {"ms_per_step", a.ms_per_step},
                             {"tokens_per_second", a.tokens_per_second},
                             {"mfu", a.mfu},
                             {"final_loss", a.final_loss},
                             {"plain_median_ms", a.plain_median_ms},
                             {"probed_median_ms", a.probed_median_ms},
                             {"probe_overhead", a.probe_overhead}});
    }
    std::printf("%s\n", out.dump().c_str());
    return 0;
  }
  std::printf("%s (%.1fM matmul parameters) on %s, %s backend; peak %.1f TFLOP/s (%s); B %d x T %d\n", label.c_str(),
              params / 1e6, described->name.c_str(), (*backend)->Name(), peak / 1e12,
              table ? "device table, dense bf16" : "measured GEMM", B, model->context);
  std::printf("%-10s %10s %12s %8s %16s\n", "arm", "ms/step", "tokens/s", "MFU", "probe overhead");
  for (const ArmResult& a : arms) {
    std::printf("%-10s %10.2f %12.0f %7.2f%% %9.2f%% @%d\n", a.arm.c_str(), a.ms_per_step, a.tokens_per_second,
                100 * a.mfu, 100 * a.probe_overhead, probe_every);
  }
  return 0;
}

}  // namespace
}  // namespace sinkscope

int main(int argc, char** argv) { return sinkscope::Main(argc, argv); }

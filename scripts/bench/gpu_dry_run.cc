// sinkscope-gpu-dry-run: one training step (forward, backward, AdamW) of the CUDA backend
// at a paper shape, traced by the CUDA emulation in dry-run mode (engine/cuda/emu/
// runtime.h) and priced with a roofline: no GPU, and no kernel executed.
//
// In a dry run every kernel launch and cuBLASLt GEMM is recorded and validated (launch
// limits, device pointers, layouts) but not run; device memory is reserved, never touched;
// copies to the host read zeros. Each launch site declares the bytes it must at least move
// and the FLOPs it does (SINKSCOPE_COST beside SINKSCOPE_LAUNCH, kernels/launch.cuh); a
// GEMM's are 2·m·n·k·batch and its operands. Each record is priced at
//   max(bytes / HBM bandwidth, FLOPs / peak of the unit it runs on)
// with an H100 SXM's figures (below), and the step at the sum of its records: serial, no
// overlap, no launch latency, every byte moved once at full bandwidth. The result is an
// estimate of what the code as written could reach, not a measurement
// (scripts/bench/README.md, "The dry run").
//
// The model comes as JSON, as `sinkscope-train EXPERIMENT --print-model` prints it.
// scripts/bench/gpu.sh --dry-run runs this on examples/paper-0.1b.yaml and paper-0.3b.yaml.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "base/flags.h"
#include "engine/backend.h"
#include "engine/config.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/emu/runtime.h"
#include "engine/model.h"
#include "engine/optimizer.h"
#include "engine/probes.h"

namespace sinkscope {
namespace {

// The roofline's device: an H100 SXM (NVIDIA's datasheet, dense, no sparsity).
constexpr double kHbmBytesPerSecond = 3.35e12;
constexpr double kPeakBf16 = 989e12;  // bf16 (and fp16) tensor cores
constexpr double kPeakTf32 = 494e12;  // TF32 tensor cores
constexpr double kPeakFp32 = 67e12;   // CUDA cores: fp32 GEMMs without tensor cores, every kernel

const char* kAssumptions =
    "roofline on an H100 SXM: HBM 3.35 TB/s; bf16 tensor-core GEMMs 989 TFLOP/s, TF32 494 TFLOP/s, "
    "fp32 GEMMs (CUBLAS_COMPUTE_32F, no tensor cores) and kernels 67 TFLOP/s; each record takes "
    "max(bytes / HBM, FLOPs / peak) with its declared cost, records run one after another (no overlap, "
    "no launch latency); MFU = model FLOPs / (estimated s/step x 989 TFLOP/s). Copies and memsets are priced "
    "at their bytes";

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point since) { return std::chrono::duration<double>(Clock::now() - since).count(); }

// The model's fields as --print-model writes them (training/checkpoint.cc's
// ModelConfigToJson); a field that is absent keeps its default.
StatusOr<ModelConfig> ParseModel(const nlohmann::json& j) {
  ModelConfig c;
  try {
#define SINKSCOPE_DRY_FIELD(type, name, def, hf, required) c.name = j.value(#name, static_cast<type>(def));
    SINKSCOPE_MODEL_FIELDS(SINKSCOPE_DRY_FIELD)
#undef SINKSCOPE_DRY_FIELD
    if (j.contains("rope_scaling")) {
      const nlohmann::json& r = j.at("rope_scaling");
      RopeScaling& s = c.rope_scaling;
      const std::string type = r.value("type", "default");
      if (!ParseRopeType(type, &s.type)) return InvalidArgumentError("unknown rope_scaling type " + type);
      s.factor = r.value("factor", s.factor);
      s.low_freq_factor = r.value("low_freq_factor", s.low_freq_factor);
      s.high_freq_factor = r.value("high_freq_factor", s.high_freq_factor);
      s.original_max_position_embeddings =
          r.value("original_max_position_embeddings", s.original_max_position_embeddings);
      s.beta_fast = r.value("beta_fast", s.beta_fast);
      s.beta_slow = r.value("beta_slow", s.beta_slow);
      s.attention_factor = r.value("attention_factor", s.attention_factor);
      s.truncate = r.value("truncate", s.truncate);
    }
    const std::string arm = j.value("vscale", "baseline");
    if (!ParseVScaleMode(arm, &c.vscale)) return InvalidArgumentError("unknown vscale arm " + arm);
  } catch (const nlohmann::json::exception& e) {
    return InvalidArgumentError(std::string("model config: ") + e.what());
  }
  RETURN_IF_ERROR(c.Validate());
  return c;
}

// The peak a GEMM runs at, from its types ("A=16BF B=16BF D=32F compute=32F ...").
double GemmPeak(const std::string& types, const char** unit) {
  const bool half = types.find("A=16BF") != std::string::npos || types.find("A=16F") != std::string::npos ||
                    types.find("compute=32F_FAST_16BF") != std::string::npos ||
                    types.find("compute=32F_FAST_16F") != std::string::npos;
  if (half) {
    *unit = "bf16 TC";
    return kPeakBf16;
  }
  if (types.find("compute=32F_FAST_TF32") != std::string::npos) {
    *unit = "TF32 TC";
    return kPeakTf32;
  }
  *unit = "fp32";
  return kPeakFp32;
}

// A record's roofline time: max(bytes / HBM, FLOPs / its unit's peak) at its declared
// cost; −1 when it declared none. `unit` is what its FLOPs run on.
double RecordSeconds(const emu::TraceRecord& t, const char** unit) {
  *unit = "fp32";
  const double peak = t.kind == emu::TraceRecord::kGemm ? GemmPeak(t.types, unit) : kPeakFp32;
  if (t.cost.bytes < 0 || t.cost.flops < 0) return -1;
  return std::max(t.cost.bytes / kHbmBytesPerSecond, t.cost.flops / peak);
}

struct Op {
  std::string name;
  std::string unit;  // what the FLOPs run on
  int64_t launches = 0;
  int64_t min_blocks = 0;  // kernels: the smallest grid of its launches (0: not a kernel)
  double gemm_flops = 0, kernel_flops = 0, bytes = 0, seconds = 0;
};

struct Result {
  std::string label, arm;
  int B = 0, T = 0;
  double params = 0, model_flops = 0;
  int64_t launches = 0, kernel_launches = 0, gemms = 0, copies = 0;
  double gemm_flops = 0, kernel_flops = 0, bytes = 0, seconds = 0, mfu = 0;
  double create_s = 0, init_s = 0, trace_s = 0;
  // Device memory as cudaMalloc was asked: after Model::Create (parameters, gradients,
  // optimizer state), and the peak of the traced step (activations and scratch on top).
  double model_bytes = 0, peak_bytes = 0;
  // The same step probed (ProbeCollector with the default settings, and its Finish): what
  // the probes add to it, priced alike.
  int64_t warm_launches = 0, probed_launches = 0;
  double warm_seconds = 0, probed_seconds = 0, probed_peak_bytes = 0;
  std::vector<Op> ops;
  std::vector<std::string> uncosted;  // "kernel at site"
  std::string summary;
  std::string backend;  // "cuda" (fp32) or "cuda-bf16"
  // bf16 on a GPU runs attention through cuDNN, which the emulation cannot trace: the same
  // step with the tiled kernels' records priced as cuDNN's would be at best (their FLOPs at
  // the bf16 tensor-core peak, their bytes at HBM bandwidth) plus the bf16↔fp32 conversions
  // of dO, dq, dk and dv around cuDNN's backward. 0 in the fp32 mode.
  double cudnn_seconds = 0, cudnn_mfu = 0;
};

StatusOr<Result> DryRun(const std::string& label, ModelConfig model, int B, int T, CudaPrecision precision) {
  Result r;
  r.label = label;
  r.arm = VScaleModeName(model.vscale);
  r.B = B;
  r.T = T;
  emu::SetDryRun(true);
  auto since = Clock::now();
  ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, MakeCudaBackend(0, precision));
  r.backend = backend->Name();
  ASSIGN_OR_RETURN(std::unique_ptr<Model> m, Model::Create(model, backend.get()));
  r.create_s = Seconds(since);
  // Host work at full size: normal draws for every parameter, and their copy to the
  // device (a host→device copy is made even in a dry run).
  since = Clock::now();
  m->InitWeights(1);
  RETURN_IF_ERROR(backend->TakeError());
  r.init_s = Seconds(since);
  r.model_bytes = static_cast<double>(emu::LiveDeviceBytes());
  emu::ResetPeakDeviceBytes();

  std::vector<int32_t> tokens(static_cast<size_t>(B) * T), targets(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = static_cast<int32_t>((i * 7 + 3) % static_cast<size_t>(model.vocab));
    targets[i] = static_cast<int32_t>((i * 11 + 1) % static_cast<size_t>(model.vocab));
  }
  OptimizerConfig optimizer;
  int64_t step = 0;
  if (precision == CudaPrecision::kBf16) {
    // The parameters' bf16 copies are made by the first AdamW: the step traced is the
    // second, as every step of a run but the first is.
    m->ZeroGrad();
    m->ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / static_cast<float>(B * T));
    AdamWStep(*m, optimizer, step++);
    backend->Synchronize();
    emu::ResetPeakDeviceBytes();
  }
  const auto traced = Clock::now();
  emu::StartTrace();
  m->ZeroGrad();
  m->ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / static_cast<float>(B * T));
  AdamWStep(*m, optimizer, step++);
  backend->Synchronize();
  const std::vector<emu::TraceRecord> trace = emu::StopTrace();
  r.trace_s = Seconds(traced);
  r.peak_bytes = static_cast<double>(emu::PeakDeviceBytes());
  // A launch the emulation refused (a limit, a pointer, a layout) is an error of the step.
  RETURN_IF_ERROR(backend->TakeError());

  // The probed step (training probes at probe.every: the massive activations' kept values,
  // the column statistics, the gradient profiles, the radix select of Finish), against the
  // same step unprobed traced just before it (both warm: the first step above also pays
  // its scratch's first allocation and zeroing).
  auto price = [&](const std::vector<emu::TraceRecord>& trace, int64_t* launches) {
    double seconds = 0;
    for (const emu::TraceRecord& t : trace) {
      const char* unit;
      const double record = RecordSeconds(t, &unit);
      ++*launches;
      if (record < 0) {
        r.uncosted.push_back(t.name + " (launched at " + t.site + ", probed or warm step)");
        continue;
      }
      seconds += record;
    }
    return seconds;
  };
  {
    emu::StartTrace();
    m->ZeroGrad();
    m->ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / static_cast<float>(B * T));
    AdamWStep(*m, optimizer, step++);
    backend->Synchronize();
    r.warm_seconds = price(emu::StopTrace(), &r.warm_launches);
    RETURN_IF_ERROR(backend->TakeError());
  }
  {
    ProbeSettings settings;
    settings.t_eps = std::min(settings.t_eps, T);
    settings.profile_len = std::min(settings.profile_len, T);
    settings.ref_span = std::min(settings.ref_span, T - 1);
    emu::ResetPeakDeviceBytes();
    ProbeCollector collector(*m, settings, T);
    emu::StartTrace();
    m->ZeroGrad();
    m->ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / static_cast<float>(B * T), &collector);
    AdamWStep(*m, optimizer, step);
    (void)collector.Finish(step + 1, 0.0);
    backend->Synchronize();
    r.probed_seconds = price(emu::StopTrace(), &r.probed_launches);
    r.probed_peak_bytes = static_cast<double>(emu::PeakDeviceBytes());
    RETURN_IF_ERROR(backend->TakeError());
  }

  std::map<std::string, Op> ops;
  double attention_tiled = 0, attention_cudnn = 0;  // the attention records, priced as traced and as cuDNN's
  for (const emu::TraceRecord& t : trace) {
    std::string key = t.name;
    const char* unit;
    const double s = RecordSeconds(t, &unit);
    if (t.kind == emu::TraceRecord::kGemm) {
      key = "gemm " + std::to_string(t.m) + "x" + std::to_string(t.n) + "x" + std::to_string(t.k) +
            (t.batch > 1 ? " batch " + std::to_string(t.batch) : std::string()) + " [" + t.types + "]";
      ++r.gemms;
    } else if (t.kind == emu::TraceRecord::kCopy) {
      unit = "copy";
      ++r.copies;
    } else {
      // The kernel and its source file (two files may name a kernel alike).
      const std::string file = t.site.substr(0, t.site.rfind(':'));
      key = t.name + " (" + file.substr(file.find_last_of('/') + 1) + ")";
      ++r.kernel_launches;
    }
    Op& op = ops[key];
    if (t.kind == emu::TraceRecord::kKernel) {
      const int64_t blocks = static_cast<int64_t>(t.grid[0]) * t.grid[1] * t.grid[2];
      op.min_blocks = op.min_blocks == 0 ? blocks : std::min(op.min_blocks, blocks);
    }
    op.name = key;
    op.unit = unit;
    ++op.launches;
    ++r.launches;
    if (s < 0) {
      r.uncosted.push_back(t.name + " (launched at " + t.site + ")");
      continue;
    }
    (t.kind == emu::TraceRecord::kGemm ? op.gemm_flops : op.kernel_flops) += t.cost.flops;
    op.bytes += t.cost.bytes;
    op.seconds += s;
    (t.kind == emu::TraceRecord::kGemm ? r.gemm_flops : r.kernel_flops) += t.cost.flops;
    r.bytes += t.cost.bytes;
    r.seconds += s;
    if (t.kind == emu::TraceRecord::kKernel && t.name.rfind("Flash", 0) == 0 &&
        t.site.find("flash_attention.cu") != std::string::npos) {
      attention_tiled += s;
      attention_cudnn += std::max(t.cost.bytes / kHbmBytesPerSecond, t.cost.flops / kPeakBf16);
    }
  }
  if (precision == CudaPrecision::kBf16) {
    const double nq = static_cast<double>(B) * T * model.heads * model.head_dim,
                 nkv = static_cast<double>(B) * T * model.kv_heads * model.head_dim;
    const double conversions = model.layers * (2 * nq + 2 * nkv) * 6.0 / kHbmBytesPerSecond;  // 4 B + 2 B each
    r.cudnn_seconds = r.seconds - attention_tiled + attention_cudnn + conversions;
  }
  for (auto& [key, op] : ops) r.ops.push_back(op);
  std::sort(r.ops.begin(), r.ops.end(), [](const Op& a, const Op& b) {
    return a.seconds != b.seconds ? a.seconds > b.seconds : a.name < b.name;
  });
  r.params = model.ParameterCount();
  r.model_flops = model.TrainFlopsPerToken(T) * static_cast<double>(B) * T;
  r.mfu = r.seconds > 0 ? r.model_flops / (r.seconds * kPeakBf16) : 0;
  r.cudnn_mfu = r.cudnn_seconds > 0 ? r.model_flops / (r.cudnn_seconds * kPeakBf16) : 0;
  // Two decimals, or two significant digits below 0.1 s (the quickstart model).
  const int decimals = r.seconds >= 0.1 || r.seconds <= 0 ? 2 : 1 - static_cast<int>(std::floor(std::log10(r.seconds)));
  char line[256];
  std::snprintf(line, sizeof line, "%s: roofline estimate %.*f s/step, MFU %.0f%% (an estimate, not a measurement)",
                label.c_str(), decimals, r.seconds, 100 * r.mfu);
  r.summary = line;
  return r;
}

void PrintTable(const Result& r) {
  std::printf("== %s (%s arm, %.1fM parameters), B %d x T %d, backend %s: one training step, dry run (estimates)\n",
              r.label.c_str(), r.arm.c_str(), r.params / 1e6, r.B, r.T, r.backend.c_str());
  std::printf("%-92s %6s %8s %7s %10s %10s %10s %10s %6s\n", "op", "unit", "launches", "blocks", "GEMM GF",
              "kernel GF", "MB", "est ms", "share");
  for (const Op& op : r.ops) {
    std::string name = op.name;
    if (name.size() > 92) name = name.substr(0, 89) + "...";
    // printf pads bytes: pad by characters ("copy host→device").
    size_t chars = 0;
    for (unsigned char c : name) chars += (c & 0xC0) != 0x80;
    name.append(92 - std::min<size_t>(chars, 92), ' ');
    const std::string blocks = op.min_blocks > 0 ? std::to_string(op.min_blocks) : "-";
    std::printf("%s %6s %8lld %7s %10.1f %10.2f %10.1f %10.3f %5.1f%%\n", name.c_str(), op.unit.c_str(),
                static_cast<long long>(op.launches), blocks.c_str(), op.gemm_flops / 1e9, op.kernel_flops / 1e9, op.bytes / 1e6,
                1e3 * op.seconds, r.seconds > 0 ? 100 * op.seconds / r.seconds : 0.0);
  }
  std::printf("per step: %lld launches (%lld kernels, %lld GEMMs, %lld copies), GEMM %.2f TFLOP, kernels %.3f TFLOP, "
              "%.2f GB moved; model FLOPs %.2f TFLOP (TrainFlopsPerToken x B x T)\n",
              static_cast<long long>(r.launches), static_cast<long long>(r.kernel_launches),
              static_cast<long long>(r.gemms), static_cast<long long>(r.copies), r.gemm_flops / 1e12,
              r.kernel_flops / 1e12, r.bytes / 1e9, r.model_flops / 1e12);
  std::printf("estimate: %.4f s/step, %.0f tokens/s, MFU %.1f%%\n", r.seconds,
              r.seconds > 0 ? r.B * static_cast<double>(r.T) / r.seconds : 0.0, 100 * r.mfu);
  if (r.cudnn_seconds > 0) {
    std::printf("with cuDNN attention (the bf16 default on a GPU; not traced: the attention kernels' FLOPs priced at "
                "the bf16 tensor-core peak, plus the conversions around its backward): %.4f s/step, %.0f tokens/s, "
                "MFU %.1f%%\n",
                r.cudnn_seconds, r.B * static_cast<double>(r.T) / r.cudnn_seconds, 100 * r.cudnn_mfu);
  }
  std::printf("device memory: %.2f GB after the model is created (parameters, gradients, AdamW state), peak %.2f GB "
              "in the step: %.0f bytes per token of activations and scratch\n",
              r.model_bytes / 1e9, r.peak_bytes / 1e9,
              (r.peak_bytes - r.model_bytes) / (static_cast<double>(r.B) * r.T));
  const double extra = r.probed_seconds - r.warm_seconds;
  std::printf("probed step: %.4f s against %.4f s unprobed, both warm (+%.4f s, +%lld launches; probe overhead at "
              "probe.every 100: %.2f%%), peak %.2f GB\n",
              r.probed_seconds, r.warm_seconds, extra, static_cast<long long>(r.probed_launches - r.warm_launches),
              r.warm_seconds > 0 ? extra / r.warm_seconds : 0.0, r.probed_peak_bytes / 1e9);
  std::printf("blocks: the smallest grid of an op's launches (an H100 has 132 SMs)\n");
  std::printf("host time of the dry run: model created in %.1f s, InitWeights %.1f s, the traced step %.1f s\n",
              r.create_s, r.init_s, r.trace_s);
  for (const std::string& u : r.uncosted) std::printf("error: launch with no declared cost: %s\n", u.c_str());
}

nlohmann::json ToJson(const Result& r) {
  nlohmann::json out = {{"model", r.label},
                        {"arm", r.arm},
                        {"micro_batch", r.B},
                        {"seq", r.T},
                        {"parameters", r.params},
                        {"estimate", true},
                        {"assumptions", kAssumptions},
                        {"host_seconds", {{"create", r.create_s}, {"init_weights", r.init_s}, {"step", r.trace_s}}},
                        {"launches", r.launches},
                        {"kernel_launches", r.kernel_launches},
                        {"gemms", r.gemms},
                        {"copies", r.copies},
                        {"gemm_flops", r.gemm_flops},
                        {"kernel_flops", r.kernel_flops},
                        {"bytes", r.bytes},
                        {"model_flops", r.model_flops},
                        {"est_s_per_step", r.seconds},
                        {"est_tokens_per_second", r.seconds > 0 ? r.B * static_cast<double>(r.T) / r.seconds : 0.0},
                        {"est_mfu", r.mfu},
                        {"device_bytes_model", r.model_bytes},
                        {"device_bytes_peak", r.peak_bytes},
                        {"est_warm_step_s", r.warm_seconds},
                        {"est_probed_step_s", r.probed_seconds},
                        {"probed_step_launches", r.probed_launches},
                        {"device_bytes_peak_probed", r.probed_peak_bytes},
                        {"uncosted", r.uncosted},
                        {"summary", r.summary},
                        {"backend", r.backend},
                        {"est_cudnn_attention_step_s", r.cudnn_seconds},
                        {"est_cudnn_attention_mfu", r.cudnn_mfu}};
  out["ops"] = nlohmann::json::array();
  for (const Op& op : r.ops) {
    out["ops"].push_back({{"op", op.name},
                          {"unit", op.unit},
                          {"launches", op.launches},
                          {"min_blocks", op.min_blocks},
                          {"gemm_flops", op.gemm_flops},
                          {"kernel_flops", op.kernel_flops},
                          {"bytes", op.bytes},
                          {"est_s", op.seconds}});
  }
  return out;
}

int Main(int argc, char** argv) {
  std::vector<std::string> model_files, labels;
  int B = 16, T = 0;
  std::string arm;
  bool json = false;
  CLI::App app("One training step of the CUDA backend at a model's shape, traced by the CUDA emulation without "
               "executing, with a roofline estimate of its time on an H100 (scripts/bench/README.md).",
               "sinkscope-gpu-dry-run");
  app.add_option("--model", model_files,
                 "a model config as `sinkscope-train EXPERIMENT --print-model` prints it (repeatable)")
      ->required()
      ->check(CLI::ExistingFile);
  app.add_option("--label", labels, "a name per --model, in order (default: the file name without .json)");
  app.add_option("--micro-batch", B, "sequences per step")->check(flags::Integer(1, 1 << 16))->default_val(16);
  app.add_option("--seq", T, "tokens per sequence (default: the model's context)")->check(flags::Integer(1, 1 << 24));
  app.add_option("--arm", arm, "baseline, vscale or vscale_backward_only (default: the model's)");
  std::string precision = "bf16";
  app.add_option("--precision", precision, "the CUDA backend's mode: bf16 (the training default) or fp32")
      ->check(CLI::IsMember({"bf16", "fp32"}))
      ->default_val("bf16");
  app.add_flag("--json", json, "one JSON object per model on stdout instead of the tables");
  if (int exit = flags::Parse(app, argc, argv); exit >= 0) return exit;
  if (!labels.empty() && labels.size() != model_files.size()) {
    std::fprintf(stderr, "sinkscope-gpu-dry-run: %zu --label for %zu --model (see --help)\n", labels.size(),
                 model_files.size());
    return 2;
  }
  auto fail = [](const std::string& m) {
    std::fprintf(stderr, "sinkscope-gpu-dry-run: %s\n", m.c_str());
    return 1;
  };
  if (!json) std::printf("Dry run (CUDA emulation; nothing executed): %s.\n\n", kAssumptions);
  std::vector<Result> results;
  for (size_t i = 0; i < model_files.size(); ++i) {
    const std::string& file = model_files[i];
    std::string label = labels.empty() ? file.substr(file.find_last_of('/') + 1) : labels[i];
    if (labels.empty() && label.size() > 5 && label.substr(label.size() - 5) == ".json") label.resize(label.size() - 5);
    nlohmann::json j;
    {
      std::ifstream in(file);
      j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded()) return fail("--model " + file + ": not JSON");
    }
    auto model = ParseModel(j);
    if (!model.ok()) return fail("--model " + file + ": " + model.status().message());
    if (!arm.empty() && !ParseVScaleMode(arm, &model->vscale)) return fail("--arm: unknown arm " + arm);
    const int seq = T > 0 ? T : model->context;
    if (seq > model->context) {
      return fail("--seq " + std::to_string(seq) + " is over " + label + "'s context " + std::to_string(model->context));
    }
    auto r = DryRun(label, *model, B, seq, precision == "fp32" ? CudaPrecision::kFp32 : CudaPrecision::kBf16);
    if (!r.ok()) return fail(label + ": " + r.status().message());
    if (json) {
      std::printf("%s\n", ToJson(*r).dump().c_str());
    } else {
      PrintTable(*r);
      std::printf("\n");
    }
    std::fflush(stdout);
    results.push_back(std::move(*r));
  }
  bool uncosted = false;
  for (const Result& r : results) {
    if (!json) std::printf("%s\n", r.summary.c_str());
    if (!r.uncosted.empty()) {
      uncosted = true;
      std::fprintf(stderr, "sinkscope-gpu-dry-run: %s: %zu launches with no declared cost (SINKSCOPE_COST)\n",
                   r.label.c_str(), r.uncosted.size());
    }
  }
  return uncosted ? 1 : 0;
}

}  // namespace
}  // namespace sinkscope

int main(int argc, char** argv) { return sinkscope::Main(argc, argv); }

// sinkscope-bench-cpu: training throughput of the CPU reference backend on the quickstart
// model (examples/quickstart.yaml, hard-coded here so the benchmark needs no protobuf),
// beside this machine's own OpenBLAS sgemm rate.
//
// Each arm trains with the real Trainer (forward, backward, AdamW) on synthetic uniform
// random byte tokens. The backend is wrapped in a CountingBackend that forwards every
// call to the CPU backend and times it, so the table shows the matmul FLOPs actually
// issued per step, the time the matmuls took, and what share of the step they are.
//
// FLOPs of one training step's Gemm calls (N = B·T tokens), checked against the count:
//   forward, per linear (in → out):      2·N·in·out
//   backward, per linear: dX and dW, each 2·N·in·out, so 4·N·in·out
//   per layer the linears are q, k, v, o, gate, up, down; then the LM head (d → vocab).
//   Total = 6·N·ModelConfig::MatmulParams() (the embedding lookup is no matmul; dX of
//   layer 0's q/k/v is still computed, it feeds the embedding's gradient).
// Attention scores and the weighted sum are plain loops in the CPU backend, not Gemm
// calls, so they are outside the matmul count but inside the MFU convention.
//
// MFU (METRICS.md, training observables): TrainFlopsPerToken(T) · tokens/s divided by the
// peak, here the best measured cblas_sgemm rate on square matrices.
#include <cblas.h>
#include <omp.h>
#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "nlohmann/json.hpp"
#include "data/data.h"
#include "engine/backend.h"
#include "base/flags.h"
#include "base/rng.h"
#include "training/checkpoint.h"
#include "training/trainer.h"

namespace sinkscope {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) { return std::chrono::duration<double>(Clock::now() - since).count(); }

// --- the counting decorator -----------------------------------------------------------

// Every Backend op, for the per-op time table (--ops).
enum class Op {
  kMemory,
  kElementwise,
  kGemm,
  kEmbedding,
  kRmsNorm,
  kRope,
  kAttentionForward,
  kAttentionBackward,
  kColumnStats,
  kVScale,
  kSwiGlu,
  kCrossEntropy,
  kAdamW,
  kCount
};
constexpr const char* kOpNames[] = {"memory", "elementwise",   "gemm",     "embedding",    "rmsnorm",
                                    "rope",   "attn_fwd",      "attn_bwd", "column_stats", "vscale",
                                    "swiglu", "cross_entropy", "adamw"};
static_assert(sizeof(kOpNames) / sizeof(kOpNames[0]) == static_cast<size_t>(Op::kCount));

struct GemmShape {
  bool trans_a, trans_b;
  int m, n, k;
  double Flops() const { return 2.0 * m * n * k; }
  auto operator<=>(const GemmShape&) const = default;
};

struct ShapeStats {
  int64_t calls = 0;
  double seconds = 0;
};

// Runs f() and adds its wall time to `seconds`; returns what f returns.
template <typename F>
auto TimeInto(double& seconds, F&& f) {
  const auto start = Clock::now();
  if constexpr (std::is_void_v<decltype(f())>) {
    f();
    seconds += Seconds(start);
  } else {
    auto result = f();
    seconds += Seconds(start);
    return result;
  }
}

class CountingBackend final : public Backend {
 public:
  explicit CountingBackend(std::unique_ptr<Backend> inner) : inner_(std::move(inner)) {}

  void Reset() {
    std::fill(std::begin(op_seconds_), std::end(op_seconds_), 0.0);
    gemm_flops_ = 0;
    shapes_.clear();
  }
  double op_seconds(Op op) const { return op_seconds_[static_cast<int>(op)]; }
  double gemm_flops() const { return gemm_flops_; }
  const std::map<GemmShape, ShapeStats>& shapes() const { return shapes_; }

  const char* Name() const override { return inner_->Name(); }
  bool Supports(OptionalOp op) const override { return inner_->Supports(op); }

  float* Alloc(size_t n) override {
    return TimeInto(Slot(Op::kMemory), [&] { return inner_->Alloc(n); });
  }
  int32_t* AllocInt(size_t n) override {
    return TimeInto(Slot(Op::kMemory), [&] { return inner_->AllocInt(n); });
  }
  void Free(void* p) override {
    TimeInto(Slot(Op::kMemory), [&] { inner_->Free(p); });
  }
  void ToDevice(void* dst, const void* src, size_t bytes) override {
    TimeInto(Slot(Op::kMemory), [&] { inner_->ToDevice(dst, src, bytes); });
  }
  void ToHost(void* dst, const void* src, size_t bytes) override {
    TimeInto(Slot(Op::kMemory), [&] { inner_->ToHost(dst, src, bytes); });
  }
  void Copy(float* dst, const float* src, size_t n) override {
    TimeInto(Slot(Op::kMemory), [&] { inner_->Copy(dst, src, n); });
  }
  void Fill(float* x, float value, size_t n) override {
    TimeInto(Slot(Op::kMemory), [&] { inner_->Fill(x, value, n); });
  }

  void Axpy(float* y, float alpha, const float* x, size_t n) override {
    TimeInto(Slot(Op::kElementwise), [&] { inner_->Axpy(y, alpha, x, n); });
  }
  void Scale(float* x, float s, size_t n) override {
    TimeInto(Slot(Op::kElementwise), [&] { inner_->Scale(x, s, n); });
  }
  void AddRowBias(TensorView x, const float* b, int N, int n) override {
    TimeInto(Slot(Op::kElementwise), [&] { inner_->AddRowBias(x, b, N, n); });
  }
  void AccumulateColumnSums(float* acc, const float* x, int N, int n) override {
    TimeInto(Slot(Op::kElementwise), [&] { inner_->AccumulateColumnSums(acc, x, N, n); });
  }
  void AccumulateSumSquares(double* acc, const float* x, size_t n) override {
    TimeInto(Slot(Op::kElementwise), [&] { inner_->AccumulateSumSquares(acc, x, n); });
  }
  double* AllocScalars(size_t n) override {
    return TimeInto(Slot(Op::kMemory), [&] { return inner_->AllocScalars(n); });
  }
  void ZeroScalars(double* x, size_t n) override {
    TimeInto(Slot(Op::kMemory), [&] { inner_->ZeroScalars(x, n); });
  }
  void ReadScalars(double* host, const double* x, size_t n) override {
    TimeInto(Slot(Op::kMemory), [&] { inner_->ReadScalars(host, x, n); });
  }
  void AccumulateTokenSum(float* acc, const float* x, int B, int T, int C, int P) override {
    TimeInto(Slot(Op::kElementwise), [&] { inner_->AccumulateTokenSum(acc, x, B, T, C, P); });
  }
  void AccumulateTokenNormSum(float* acc, TensorView x, int B, int T, int G, int C, int P) override {
    TimeInto(Slot(Op::kElementwise), [&] { inner_->AccumulateTokenNormSum(acc, x, B, T, G, C, P); });
  }

  void Gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, TensorView a, TensorView b, float beta,
            TensorView c) override {
    const auto start = Clock::now();
    inner_->Gemm(trans_a, trans_b, m, n, k, alpha, a, b, beta, c);
    const double s = Seconds(start);
    op_seconds_[static_cast<int>(Op::kGemm)] += s;
    const GemmShape shape{trans_a, trans_b, m, n, k};
    gemm_flops_ += shape.Flops();
    ShapeStats& st = shapes_[shape];
    ++st.calls;
    st.seconds += s;
  }

  void EmbeddingForward(float* out, const int32_t* tokens, const float* table, int N, int d) override {
    TimeInto(Slot(Op::kEmbedding), [&] { inner_->EmbeddingForward(out, tokens, table, N, d); });
  }
  void EmbeddingBackward(float* dtable, const float* dout, const int32_t* tokens, int N, int d) override {
    TimeInto(Slot(Op::kEmbedding), [&] { inner_->EmbeddingBackward(dtable, dout, tokens, N, d); });
  }
  void RmsNormForward(TensorView out, float* rstd, TensorView x, const float* gamma, int N, int d, float eps) override {
    TimeInto(Slot(Op::kRmsNorm), [&] { inner_->RmsNormForward(out, rstd, x, gamma, N, d, eps); });
  }
  void RmsNormBackward(float* dx, float* dgamma, const float* dout, TensorView x, const float* gamma,
                       const float* rstd, int N, int d) override {
    TimeInto(Slot(Op::kRmsNorm), [&] { inner_->RmsNormBackward(dx, dgamma, dout, x, gamma, rstd, N, d); });
  }
  void RopeForward(TensorView x, int B, int T, int heads, int dh, const RotaryFrequencies& rope) override {
    TimeInto(Slot(Op::kRope), [&] { inner_->RopeForward(x, B, T, heads, dh, rope); });
  }
  void RopeBackward(float* dx, int B, int T, int heads, int dh, const RotaryFrequencies& rope) override {
    TimeInto(Slot(Op::kRope), [&] { inner_->RopeBackward(dx, B, T, heads, dh, rope); });
  }
  size_t AttentionWorkspaceFloats(int B, int T, int H) const override {
    return inner_->AttentionWorkspaceFloats(B, T, H);
  }
  void AttentionForward(TensorView y, float* lse, float* workspace, TensorView q, TensorView k, TensorView v, int B,
                        int T, int H, int KV, int dh) override {
    TimeInto(Slot(Op::kAttentionForward),
             [&] { inner_->AttentionForward(y, lse, workspace, q, k, v, B, T, H, KV, dh); });
  }
  void AttentionBackward(float* dq, float* dk, float* dv, const float* dy, TensorView y, const float* lse,
                         const float* workspace, TensorView q, TensorView k, TensorView v, int B, int T, int H,
                         int KV, int dh) override {
    TimeInto(Slot(Op::kAttentionBackward),
             [&] { inner_->AttentionBackward(dq, dk, dv, dy, y, lse, workspace, q, k, v, B, T, H, KV, dh); });
  }
  void AttentionColumnStats(float* alpha, float* mass, float* second_moment, float* per_sample_rate, TensorView q,
                            TensorView k, const float* lse, int B, int T, int H, int KV, int dh,
                            const ColumnStatsRequest& request) override {
    TimeInto(Slot(Op::kColumnStats), [&] {
      inner_->AttentionColumnStats(alpha, mass, second_moment, per_sample_rate, q, k, lse, B, T, H, KV, dh, request);
    });
  }
  void VScaleForward(TensorView vhat, TensorView v, const float* theta, int N, int KV, int dh, double c_base,
                     VScaleMode mode) override {
    TimeInto(Slot(Op::kVScale), [&] { inner_->VScaleForward(vhat, v, theta, N, KV, dh, c_base, mode); });
  }
  void VScaleBackward(float* dv, float* dtheta, const float* dvhat, TensorView v, const float* theta, int N, int KV,
                      int dh, double c_base, VScaleMode mode) override {
    TimeInto(Slot(Op::kVScale), [&] { inner_->VScaleBackward(dv, dtheta, dvhat, v, theta, N, KV, dh, c_base, mode); });
  }
  void SwiGluForward(TensorView h, TensorView gate, TensorView up, int N, int F) override {
    TimeInto(Slot(Op::kSwiGlu), [&] { inner_->SwiGluForward(h, gate, up, N, F); });
  }
  void SwiGluBackward(float* dgate, float* dup, const float* dh, TensorView gate, TensorView up, int N,
                      int F) override {
    TimeInto(Slot(Op::kSwiGlu), [&] { inner_->SwiGluBackward(dgate, dup, dh, gate, up, N, F); });
  }
  void CrossEntropyForwardBackward(float* logits, const int32_t* targets, int N, int V, float grad_scale,
                                   double* loss_acc) override {
    TimeInto(Slot(Op::kCrossEntropy),
             [&] { inner_->CrossEntropyForwardBackward(logits, targets, N, V, grad_scale, loss_acc); });
  }
  void CrossEntropyLoss(const float* logits, const int32_t* targets, int N, int V, double* loss_acc) override {
    TimeInto(Slot(Op::kCrossEntropy), [&] { inner_->CrossEntropyLoss(logits, targets, N, V, loss_acc); });
  }
  // The fused ops the CPU backend implements itself are timed as one (the others run
  // their default composition through this wrapper, so their GEMMs are counted).
  void ResidualRmsNormForward(float* sum, TensorView out, float* rstd, const float* x, const float* r, const float* gamma,
                              int N, int d, float eps) override {
    TimeInto(Slot(Op::kRmsNorm), [&] { inner_->ResidualRmsNormForward(sum, out, rstd, x, r, gamma, N, d, eps); });
  }
  void MultiTensorAdamW(const std::vector<AdamWTensor>& tensors, const AdamWHyper& h, const double* guard) override {
    TimeInto(Slot(Op::kAdamW), [&] { inner_->MultiTensorAdamW(tensors, h, guard); });
  }
  void AdamW(float* p, const float* g, float* m, float* v, size_t n, float lr, float beta1, float beta2, float eps,
             float weight_decay, float grad_scale, int64_t step) override {
    TimeInto(Slot(Op::kAdamW),
             [&] { inner_->AdamW(p, g, m, v, n, lr, beta1, beta2, eps, weight_decay, grad_scale, step); });
  }

 private:
  double& Slot(Op op) { return op_seconds_[static_cast<int>(op)]; }

  std::unique_ptr<Backend> inner_;
  double op_seconds_[static_cast<int>(Op::kCount)] = {};
  double gemm_flops_ = 0;
  std::map<GemmShape, ShapeStats> shapes_;
};

// --- the machine's own sgemm ------------------------------------------------------------

// cblas_sgemm rate in FLOP/s on one shape: one untimed call, then repeats until at least
// `min_seconds` have passed.
double SgemmRate(const GemmShape& s, double min_seconds = 0.25) {
  const int rows_a = s.trans_a ? s.k : s.m, cols_a = s.trans_a ? s.m : s.k;
  const int rows_b = s.trans_b ? s.n : s.k, cols_b = s.trans_b ? s.k : s.n;
  std::vector<float> a(static_cast<size_t>(rows_a) * cols_a), b(static_cast<size_t>(rows_b) * cols_b),
      c(static_cast<size_t>(s.m) * s.n);
  Rng rng(42);
  for (float& x : a) x = static_cast<float>(rng.Uniform() - 0.5);
  for (float& x : b) x = static_cast<float>(rng.Uniform() - 0.5);
  auto call = [&] {
    cblas_sgemm(CblasRowMajor, s.trans_a ? CblasTrans : CblasNoTrans, s.trans_b ? CblasTrans : CblasNoTrans, s.m, s.n,
                s.k, 1.0f, a.data(), cols_a, b.data(), cols_b, 0.0f, c.data(), s.n);
  };
  call();
  int64_t reps = 0;
  const auto start = Clock::now();
  double elapsed = 0;
  do {
    call();
    ++reps;
    elapsed = Seconds(start);
  } while (elapsed < min_seconds);
  return s.Flops() * static_cast<double>(reps) / elapsed;
}

// --- one arm -----------------------------------------------------------------------------

// examples/quickstart.yaml, after ApplyDefaults.
ModelConfig QuickstartModel(VScaleMode mode) {
  ModelConfig m;
  m.layers = 4;
  m.d_model = 128;
  m.heads = 4;
  m.kv_heads = 2;
  m.head_dim = 32;
  m.ffn = 352;
  m.vocab = 257;
  m.context = 128;
  m.vscale = mode;
  m.sigmoid_bias = -std::log(static_cast<double>(m.context));  // the schema's default, −ln T (unused by this arm)
  return m;
}

struct CpuTimes {
  double user = 0, sys = 0;
};
CpuTimes ProcessCpuTimes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  auto sec = [](const timeval& t) { return static_cast<double>(t.tv_sec) + 1e-6 * static_cast<double>(t.tv_usec); };
  return {sec(u.ru_utime), sec(u.ru_stime)};
}

struct ArmResult {
  std::string name;
  double wall_seconds = 0;
  double tokens_per_second = 0;
  double gemm_flops_per_step = 0;
  double gemm_seconds = 0;
  double op_seconds[static_cast<int>(Op::kCount)] = {};
  double user_seconds = 0, sys_seconds = 0;
  double final_loss = 0;
  std::map<GemmShape, ShapeStats> shapes;
  // Probe cost: seconds of one probed step (the step's own batch / a held-out batch).
  double plain_step_median_seconds = 0, probed_step_seconds = 0, held_out_probe_step_seconds = 0;
};

StatusOr<ArmResult> RunArm(VScaleMode mode, const DataSplits& data, int warmup, int steps) {
  TrainerOptions options;
  options.model = QuickstartModel(mode);
  options.micro_batch = 16;
  options.grad_accum = 1;
  options.seed = 0;
  options.optimizer.lr = 3e-3;  // the quickstart's schedule: 300 steps, 30 of warm-up
  options.optimizer.min_lr = 3e-4;
  options.optimizer.warmup_steps = 30;
  options.optimizer.total_steps = 300;
  CountingBackend backend(MakeCpuBackend());
  ASSIGN_OR_RETURN(std::unique_ptr<Trainer> trainer, Trainer::Create(options, &data, &backend));
  trainer->Initialize();
  ArmResult r;
  r.name = VScaleModeName(mode);
  for (int i = 0; i < warmup; ++i) trainer->Step();
  backend.Reset();
  const CpuTimes cpu0 = ProcessCpuTimes();
  const auto start = Clock::now();
  for (int i = 0; i < steps; ++i) r.final_loss = trainer->Step().loss;
  r.wall_seconds = Seconds(start);
  const CpuTimes cpu1 = ProcessCpuTimes();
  r.user_seconds = cpu1.user - cpu0.user;
  r.sys_seconds = cpu1.sys - cpu0.sys;
  r.tokens_per_second = static_cast<double>(trainer->tokens_per_step()) * steps / r.wall_seconds;
  r.gemm_flops_per_step = backend.gemm_flops() / steps;
  r.gemm_seconds = backend.op_seconds(Op::kGemm);
  for (int i = 0; i < static_cast<int>(Op::kCount); ++i) r.op_seconds[i] = backend.op_seconds(static_cast<Op>(i));
  r.shapes = backend.shapes();
  // Probe cost, quickstart probe settings (s 0, T_e 31, P 64, ε 0.3, T_ε 64): plain,
  // step-batch-probed and held-out-probed steps interleaved in rounds, medians compared,
  // so load elsewhere on the machine hits all three alike. Measured after the counters
  // above, which therefore see plain steps only.
  const ProbeSettings probe;
  ProbeReport report;
  std::vector<double> plain_s, probed_s, held_out_s;
  for (int i = 0; i < std::max(5, steps / 2); ++i) {
    auto t0 = Clock::now();
    trainer->Step();
    plain_s.push_back(Seconds(t0));
    t0 = Clock::now();
    trainer->ProbedStep(probe, ProbeBatchKind::kStepBatch, &report);
    probed_s.push_back(Seconds(t0));
    t0 = Clock::now();
    trainer->ProbedStep(probe, ProbeBatchKind::kHeldOut, &report);
    held_out_s.push_back(Seconds(t0));
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  r.plain_step_median_seconds = median(plain_s);
  r.probed_step_seconds = median(probed_s);
  r.held_out_probe_step_seconds = median(held_out_s);
  const double analytic = 6.0 * trainer->tokens_per_step() * static_cast<double>(options.model.MatmulParams());
  if (r.gemm_flops_per_step != analytic) {
    std::fprintf(stderr, "sinkscope-bench-cpu: %s: counted %.6g Gemm FLOPs per step, the analytic count is %.6g\n",
                 r.name.c_str(), r.gemm_flops_per_step, analytic);
  }
  return r;
}

int Main(int argc, char** argv) {
  int steps = 20, warmup = 3;
  bool json = false, show_ops = false, print_model = false;
  CLI::App app("Training throughput of the CPU backend on the quickstart model beside this machine's sgemm rate "
               "(scripts/bench/README.md).",
               "sinkscope-bench-cpu");
  app.add_option("--steps", steps, "timed training steps per arm")->check(flags::Integer(1, 1 << 20))->default_val(20);
  app.add_option("--warmup", warmup, "untimed steps before them")->check(flags::Integer(0, 1 << 20))->default_val(3);
  app.add_flag("--json", json, "one JSON object on stdout instead of the table");
  app.add_flag("--ops", show_ops, "also print time per backend op and per Gemm shape");
  app.add_flag("--print-model", print_model, "print the model config (as a checkpoint header holds it) and exit");
  if (int exit = flags::Parse(app, argc, argv); exit >= 0) return exit;
  if (print_model) {
    // The model this benchmark trains (engine/config.h's list): tests compare it with
    // examples/quickstart.yaml read by the schema.
    std::printf("%s\n", ModelConfigToJson(QuickstartModel(VScaleMode::kNone)).dump().c_str());
    return 0;
  }

  // Synthetic data: uniform random bytes (the loss stays near ln 256; speed does not care).
  DataSplits data;
  {
    std::vector<int32_t> tokens(1 << 20);
    Rng rng(7);
    for (int32_t& t : tokens) t = static_cast<int32_t>(rng.Below(256));
    data.train = TokenStream(std::move(tokens));
    data.max_token = 255;
  }

  // The machine's sgemm on square matrices, before the arms and again after them: the
  // better of the two is kept, so a moment of load elsewhere does not lower the peak.
  const int kSquares[] = {512, 1024};
  std::vector<std::pair<int, double>> squares;
  for (int n : kSquares) squares.emplace_back(n, SgemmRate({false, false, n, n, n}));

  std::vector<ArmResult> arms;
  for (VScaleMode mode : {VScaleMode::kNone, VScaleMode::kVScale}) {
    auto r = RunArm(mode, data, warmup, steps);
    if (!r.ok()) {
      std::fprintf(stderr, "sinkscope-bench-cpu: %s: %s\n", VScaleModeName(mode), r.status().message().c_str());
      return 1;
    }
    arms.push_back(std::move(*r));
  }

  double peak = 0;
  for (auto& [n, rate] : squares) {
    rate = std::max(rate, SgemmRate({false, false, n, n, n}));
    peak = std::max(peak, rate);
  }
  // Each Gemm shape the model issued, alone.
  std::map<GemmShape, double> shape_rate;
  for (const auto& [shape, st] : arms[0].shapes) shape_rate[shape] = SgemmRate(shape, 0.1);
  // The time the step's matmuls would take at the isolated rates, and the FLOP-weighted
  // isolated rate over the step's shapes.
  auto isolated_seconds = [&](const ArmResult& r) {
    double s = 0;
    for (const auto& [shape, st] : r.shapes) {
      auto it = shape_rate.find(shape);
      s += st.calls * shape.Flops() / (it != shape_rate.end() ? it->second : SgemmRate(shape, 0.1));
    }
    return s;
  };
  const double shapes_rate = arms[0].gemm_flops_per_step * steps / isolated_seconds(arms[0]);

  const ModelConfig model = QuickstartModel(VScaleMode::kNone);
  const double flops_per_token = model.TrainFlopsPerToken(model.context);
  const int openblas_threads = openblas_get_num_threads();
  const int omp_threads = omp_get_max_threads();
  const char* blas_parallel[] = {"sequential", "pthreads", "openmp"};
  const int parallel = openblas_get_parallel();
  const char* blas_mode = parallel >= 0 && parallel <= 2 ? blas_parallel[parallel] : "unknown";

  if (json) {
    nlohmann::json out;
    out["model"] = {
        {"layers", model.layers},     {"d_model", model.d_model}, {"heads", model.heads}, {"kv_heads", model.kv_heads},
        {"head_dim", model.head_dim}, {"ffn", model.ffn},         {"vocab", model.vocab}, {"context", model.context},
        {"micro_batch", 16},          {"grad_accum", 1}};
    out["steps"] = steps;
    out["warmup"] = warmup;
    out["threads"] = {{"openmp", omp_threads}, {"openblas", openblas_threads}, {"openblas_parallel", blas_mode}};
    out["train_flops_per_token"] = flops_per_token;
    for (const ArmResult& r : arms) {
      nlohmann::json a;
      a["arm"] = r.name;
      a["tokens_per_second"] = r.tokens_per_second;
      a["ms_per_step"] = 1e3 * r.wall_seconds / steps;
      a["gemm_flops_per_step"] = r.gemm_flops_per_step;
      a["gemm_gflops"] = r.gemm_flops_per_step * steps / r.gemm_seconds / 1e9;
      a["gemm_fraction_of_step"] = r.gemm_seconds / r.wall_seconds;
      a["gemm_vs_isolated_sgemm"] = isolated_seconds(r) / r.gemm_seconds;
      a["gemm_vs_peak"] = r.gemm_flops_per_step * steps / r.gemm_seconds / peak;
      a["mfu"] = flops_per_token * r.tokens_per_second / peak;
      a["user_seconds"] = r.user_seconds;
      a["sys_seconds"] = r.sys_seconds;
      a["wall_seconds"] = r.wall_seconds;
      a["final_loss"] = r.final_loss;
      a["probed_step_seconds"] = r.probed_step_seconds;
      a["held_out_probe_step_seconds"] = r.held_out_probe_step_seconds;
      a["plain_step_median_seconds"] = r.plain_step_median_seconds;
      a["probe_overhead_at_every_50"] = (r.probed_step_seconds / r.plain_step_median_seconds - 1) / 50;
      nlohmann::json ops;
      for (int i = 0; i < static_cast<int>(Op::kCount); ++i) ops[kOpNames[i]] = r.op_seconds[i] / steps;
      a["op_seconds_per_step"] = ops;
      out["arms"].push_back(a);
    }
    for (const auto& [n, rate] : squares) out["sgemm_gflops"]["square_" + std::to_string(n)] = rate / 1e9;
    out["sgemm_gflops"]["model_shapes"] = shapes_rate / 1e9;
    out["peak_gflops"] = peak / 1e9;
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }

  std::printf(
      "sinkscope-bench-cpu: quickstart model (4 layers, d_model 128, heads 4/2, head_dim 32, ffn 352, vocab 257)\n");
  std::printf("B=16 T=128 (2048 tokens/step), %d timed steps after %d warm-up; OpenMP %d threads, OpenBLAS %d (%s)\n\n",
              steps, warmup, omp_threads, openblas_threads, blas_mode);
  std::printf("%-9s %9s %8s %12s %8s %9s %8s %6s %8s\n", "arm", "tokens/s", "ms/step", "matmul GF/s", "matmul%",
              "vs shapes", "vs peak", "MFU", "sys/cpu");
  for (const ArmResult& r : arms) {
    const double cpu = r.user_seconds + r.sys_seconds;
    const double achieved = r.gemm_flops_per_step * steps / r.gemm_seconds;
    std::printf("%-9s %9.0f %8.1f %12.2f %7.1f%% %9.2f %8.2f %5.1f%% %7.1f%%\n", r.name.c_str(), r.tokens_per_second,
                1e3 * r.wall_seconds / steps, achieved / 1e9, 100 * r.gemm_seconds / r.wall_seconds,
                isolated_seconds(r) / r.gemm_seconds, achieved / peak,
                100 * flops_per_token * r.tokens_per_second / peak, cpu > 0 ? 100 * r.sys_seconds / cpu : 0.0);
  }
  std::printf("\nprobe cost (quickstart probe settings)   probed step / plain step   overhead at probe.every=50\n");
  for (const ArmResult& r : arms) {
    const double plain = r.plain_step_median_seconds;
    std::printf("%-9s plain      %6.1f ms  (median of the interleaved rounds)\n", r.name.c_str(), 1e3 * plain);
    std::printf("%-9s step batch %6.1f ms  %6.2fx                     %5.2f%%\n", "",
                1e3 * r.probed_step_seconds, r.probed_step_seconds / plain,
                100 * (r.probed_step_seconds / plain - 1) / 50);
    std::printf("%-9s held-out   %6.1f ms  %6.2fx                     %5.2f%%\n", "", 1e3 * r.held_out_probe_step_seconds,
                r.held_out_probe_step_seconds / plain, 100 * (r.held_out_probe_step_seconds / plain - 1) / 50);
  }
  std::printf("\nsgemm (cblas, alone)  GFLOP/s\n");
  for (const auto& [n, rate] : squares) std::printf("  square %-12d %8.2f\n", n, rate / 1e9);
  std::printf("  model shapes        %8.2f   (FLOP-weighted over the step's %zu Gemm shapes)\n", shapes_rate / 1e9,
              arms[0].shapes.size());
  std::printf("peak for MFU          %8.2f   (best square, before or after the arms)\n", peak / 1e9);
  std::printf("matmul FLOPs/step     %8.3f G  (6 N N_matmul); model FLOPs/token %.4g M (6 N_matmul + 6 L H dh T)\n",
              arms[0].gemm_flops_per_step / 1e9, flops_per_token / 1e6);

  if (show_ops) {
    for (const ArmResult& r : arms) {
      std::printf("\n%s: ms per step by backend op (%% of step)\n", r.name.c_str());
      double sum = 0;
      for (int i = 0; i < static_cast<int>(Op::kCount); ++i) {
        sum += r.op_seconds[i];
        if (r.op_seconds[i] == 0) continue;
        std::printf("  %-14s %8.2f  %5.1f%%\n", kOpNames[i], 1e3 * r.op_seconds[i] / steps,
                    100 * r.op_seconds[i] / r.wall_seconds);
      }
      std::printf("  %-14s %8.2f  %5.1f%%\n", "(outside ops)", 1e3 * (r.wall_seconds - sum) / steps,
                  100 * (r.wall_seconds - sum) / r.wall_seconds);
    }
    std::printf("\nGemm shapes (baseline): calls/step, GFLOP/s in training vs alone\n");
    std::printf("  %-2s %5s %5s %5s %6s %9s %9s\n", "op", "m", "n", "k", "calls", "training", "alone");
    for (const auto& [shape, st] : arms[0].shapes) {
      const std::string op = std::string(shape.trans_a ? "T" : "N") + (shape.trans_b ? "T" : "N");
      std::printf("  %-2s %5d %5d %5d %6.0f %9.2f %9.2f\n", op.c_str(), shape.m, shape.n, shape.k,
                  static_cast<double>(st.calls) / steps, st.calls * shape.Flops() / st.seconds / 1e9,
                  shape_rate[shape] / 1e9);
    }
  }
  return 0;
}

}  // namespace
}  // namespace sinkscope

int main(int argc, char** argv) { return sinkscope::Main(argc, argv); }

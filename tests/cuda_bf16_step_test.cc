// The CUDA backend's bf16 mode against the CPU backend's bf16 mode (the contract's
// reference, engine/cpu/bf16_mode.cc) on whole passes: one training step (loss and every
// gradient) for each V-scale arm, with Qwen2's biases, Qwen3's q/k norms and tied
// embeddings; every probe of a probed step; a 20-step AdamW curve, during which the GEMMs
// read each parameter through the bf16 copy the AdamW kernel writes, and a reload of the
// weights (the copies must follow it). Skips where no CUDA device is visible; under the
// CPU emulation (cuda_bf16_emu_test) it runs in CI.
//
// Tolerances, and why. Both sides round the same values to bf16 at the same points, so
// they differ only where an fp32 sum in another order (GEMM tiles, attention tiles,
// double-accumulated reductions) lands on the other side of a bf16 rounding boundary:
// one bf16 ulp (2⁻⁸ relative) on a few stored values, which the following layers carry.
// Measured on these shapes: loss ≤ 2e-5 relative, gradients ≤ 3e-3 normalised (max |Δ| /
// max |cpu|). Bounds: loss 2e-4, gradients 2e-2, probes 2e-2 relative (1e-4 absolute near 0), the
// 20-step curve 1e-3. Each test also shows that the bound can fail: the CUDA bf16 step is
// held much closer to the CPU bf16 mode than to the fp32 CPU backend (at least 3× in
// gradient error), which it would not be if it rounded anywhere else.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/model.h"
#include "engine/optimizer.h"
#include "engine/probes.h"
#include "tests/cuda_or_skip.h"
#include "tests/small_model.h"
#include "tests/step_compare.h"

#ifdef SINKSCOPE_CUDA_EMULATION
#include "engine/cuda/emu/runtime.h"
#endif

namespace sinkscope {
namespace {

// The bf16 backend with the tiled attention kernel (`tiled`: the contract's rounding
// points; cuDNN's flash attention also rounds P and its gradients to bf16) or, on a GPU,
// cuDNN's.
std::unique_ptr<Backend> CudaBf16OrSkip(std::string* why, bool tiled = true) {
  if (tiled) setenv("SINKSCOPE_ATTENTION", "tiled", 1);
  auto backend = MakeCudaOrSkipReason(why, CudaPrecision::kBf16);
  if (tiled) unsetenv("SINKSCOPE_ATTENTION");
  return backend;
}

#define CUDA_BF16_OR_SKIP(var)                   \
  std::string why_##var;                         \
  auto var = CudaBf16OrSkip(&why_##var);         \
  if (var == nullptr) GTEST_SKIP() << why_##var;

struct Variant {
  std::string name;
  ModelConfig config;
};

std::vector<Variant> Variants() {
  std::vector<Variant> out;
  for (VScaleMode m : {VScaleMode::kNone, VScaleMode::kVScale, VScaleMode::kBackwardOnly}) {
    ModelConfig c = SmallModel(61, 32, m);
    out.push_back({m == VScaleMode::kNone ? "baseline" : m == VScaleMode::kVScale ? "vscale" : "backward_only", c});
  }
  ModelConfig qwen2 = SmallModel(61, 32, VScaleMode::kVScale);
  qwen2.attention_bias = true;
  qwen2.tied_embeddings = true;
  out.push_back({"qwen2-like (biases, tied)", qwen2});
  ModelConfig qwen3 = SmallModel(61, 32, VScaleMode::kNone);
  qwen3.qk_norm = true;
  out.push_back({"qwen3-like (q/k norms)", qwen3});
  return out;
}

// Three models of one config with the same weights: CPU bf16 (the reference), CPU fp32
// and CUDA bf16.
struct Trio {
  std::unique_ptr<Backend> cpu_bf16 = MakeCpuBf16Backend(), cpu = MakeCpuBackend();
  std::unique_ptr<Model> ref, fp32, gpu;
  Status Make(const ModelConfig& c, Backend* cuda, uint64_t seed) {
    auto a = Model::Create(c, cpu_bf16.get());
    if (!a.ok()) return a.status();
    auto b = Model::Create(c, cpu.get());
    if (!b.ok()) return b.status();
    auto g = Model::Create(c, cuda);
    if (!g.ok()) return g.status();
    ref = std::move(*a), fp32 = std::move(*b), gpu = std::move(*g);
    for (Model* m : {ref.get(), fp32.get(), gpu.get()}) m->InitWeights(seed);
    return OkStatus();
  }
};

TEST(CudaBf16Step, TheModeStoresActivationsInBf16AndOffersNoArms) {
  CUDA_BF16_OR_SKIP(gpu);
  EXPECT_EQ(gpu->ActivationDType(), DType::kBF16);
  EXPECT_STREQ(gpu->Name(), "cuda-bf16");
  EXPECT_FALSE(gpu->Supports(OptionalOp::kAttentionArms)) << "the arms have no bf16 contract (ARMS.md)";
  ModelConfig c = SmallModel(61, 32);
  c.attention = AttentionKind::kSinkLogit;
  EXPECT_FALSE(Model::Create(c, gpu.get()).ok()) << "an arm is refused on the bf16 mode, not run wrongly";
}

TEST(CudaBf16Step, OneStepMatchesTheCpuBf16ModeForEveryVariant) {
  CUDA_BF16_OR_SKIP(gpu);
  for (const Variant& v : Variants()) {
    Trio t;
    ASSERT_TRUE(t.Make(v.config, gpu.get(), 11).ok()) << v.name;
    const int B = 3, T = 32;
    std::vector<int32_t> tokens, targets;
    Batch(B, T, v.config.vocab, 0, &tokens, &targets);
    double loss[3];
    std::vector<float> grads[3];
    Model* models[3] = {t.ref.get(), t.fp32.get(), t.gpu.get()};
    for (int i = 0; i < 3; ++i) {
      loss[i] = models[i]->ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T));
      grads[i] = models[i]->GradsToHost();
    }
    ASSERT_TRUE(gpu->TakeError().ok()) << v.name;
    EXPECT_NEAR(loss[2], loss[0], 2e-4 * loss[0]) << v.name;
    double worst_ref = 0, worst_fp32 = 0;
    for (const ParamTensor& p : t.ref->tensors()) {
      const double e_ref = NormError(grads[2], grads[0], p.offset, p.size);
      EXPECT_LE(e_ref, 2e-2) << v.name << " " << p.name;
      worst_ref = std::max(worst_ref, e_ref);
      worst_fp32 = std::max(worst_fp32, NormError(grads[2], grads[1], p.offset, p.size));
    }
    EXPECT_LT(3 * worst_ref, worst_fp32) << v.name << ": the CUDA bf16 step is no closer to the CPU bf16 mode ("
                                         << worst_ref << ") than to fp32 (" << worst_fp32 << ")";
    std::printf("%-28s loss %.8f (cpu bf16 %.8f, fp32 %.8f); gradients vs cpu bf16 %.2e, vs fp32 %.2e\n",
                v.name.c_str(), loss[2], loss[0], loss[1], worst_ref, worst_fp32);
  }
}

TEST(CudaBf16Step, EveryProbeOfAProbedStepMatchesTheCpuBf16Mode) {
  CUDA_BF16_OR_SKIP(gpu);
  Trio t;
  const ModelConfig c = SmallModel(61, 32, VScaleMode::kVScale);
  ASSERT_TRUE(t.Make(c, gpu.get(), 5).ok());
  ProbeSettings settings;
  settings.profile_len = 8;
  const int B = 3, T = 32;
  std::vector<int32_t> tokens, targets;
  Batch(B, T, c.vocab, 1, &tokens, &targets);
  ProbeCollector pa(*t.ref, settings, T), pb(*t.gpu, settings, T);
  const double la = t.ref->ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T), &pa);
  const double lb = t.gpu->ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T), &pb);
  ASSERT_TRUE(gpu->TakeError().ok());
  const ProbeReport ra = pa.Finish(1, la), rb = pb.Finish(1, lb);
  ASSERT_EQ(ra.layers.size(), rb.layers.size());
  int compared = 0;
  auto near = [&](double got, double want, const std::string& what) {
    ++compared;
    EXPECT_TRUE(std::isfinite(got)) << what;
    EXPECT_NEAR(got, want, std::max(2e-2 * std::abs(want), 1e-4)) << what;
  };
  near(rb.r_gs_median, ra.r_gs_median, "r_gs_median");
  for (size_t i = 0; i < ra.layers.size(); ++i) {
    const LayerProbe &a = ra.layers[i], &b = rb.layers[i];
    const std::string p = "layer " + std::to_string(i) + " ";
    near(b.r_gs, a.r_gs, p + "r_gs");
    for (size_t h = 0; h < a.alpha.size(); ++h) near(b.alpha[h], a.alpha[h], p + "alpha");
    for (size_t h = 0; h < a.column_mass.size(); ++h) near(b.column_mass[h], a.column_mass[h], p + "column_mass");
    for (int k = 0; k < 3; ++k) near(b.massive.top3[k], a.massive.top3[k], p + "massive top");
    near(b.massive.median, a.massive.median, p + "massive median");
    for (const auto& [name, v] : a.norms) {
      ASSERT_EQ(b.norms.count(name), 1u) << p << name;
      for (size_t k = 0; k < v.size(); ++k) near(b.norms.at(name)[k], v[k], p + "norm " + name);
    }
  }
  EXPECT_GT(compared, 50);
}

TEST(CudaBf16Step, ATwentyStepCurveThroughTheAdamWBf16CopiesAndAReload) {
  CUDA_BF16_OR_SKIP(gpu);
  Trio t;
  const ModelConfig c = SmallModel(61, 32, VScaleMode::kVScale);
  ASSERT_TRUE(t.Make(c, gpu.get(), 8).ok());
  OptimizerConfig o;
  o.lr = 3e-3;
  o.warmup_steps = 3;
  o.total_steps = 20;
  const int B = 4, T = 32;
  double first = 0, last = 0;
  for (int step = 1; step <= 20; ++step) {
    if (step == 11) {
      // New weights from the host (a checkpoint's restore): the GEMMs' bf16 copies must
      // follow them, not keep step 10's.
      auto other = Model::Create(c, t.cpu.get());
      ASSERT_TRUE(other.ok());
      (*other)->InitWeights(99);
      const std::vector<float> w = (*other)->ParamsToHost();
      t.ref->ParamsFromHost(w);
      t.gpu->ParamsFromHost(w);
    }
    std::vector<int32_t> tokens, targets;
    Batch(B, T, c.vocab, step % 2, &tokens, &targets);
    double l[2];
    Model* models[2] = {t.ref.get(), t.gpu.get()};
    for (int i = 0; i < 2; ++i) {
      models[i]->ZeroGrad();
      l[i] = models[i]->ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T));
      AdamWStep(*models[i], o, step - 1);
    }
    ASSERT_TRUE(gpu->TakeError().ok()) << "step " << step;
    EXPECT_NEAR(l[1], l[0], 1e-3 * l[0]) << "step " << step;
    if (step == 1) first = l[0];
    if (step == 10) last = l[0];
  }
  // (After the reload the AdamW moments belong to the old weights, so the later steps need
  // not fall; what they must do is agree with the CPU, checked at every step above.)
  EXPECT_LT(last, 0.95 * first) << "the first ten steps are a training curve";
  EXPECT_LE(NormError(t.gpu->ParamsToHost(), t.ref->ParamsToHost()), 1e-2);
}

// The bf16 step projects q|k|v with one GEMM on the adjacent W_q, W_k, W_v (RoPE, the copy
// of v and V-scale in one kernel after it) and gate|up with one GEMM (a strided batch of
// two), and their backward with one GEMM per product on packed gradients. Against the
// same backend with SINKSCOPE_CUDA_PACKED=0 (separate GEMMs). Under the emulation (each
// dot product summed in double, rounded once) the forward is the same bits — the same dot
// products, the same RoPE and V-scale arithmetic — so the loss is equal, and gradients
// differ only where ∂x̃ and ∂x̃_mlp are now one sum instead of fp32 partial sums added
// (measured ≤ 1.2e-7 normalised; bound 1e-5, room for an fp32 difference that moves a later
// bf16 rounding). The trace shows the packed kernels ran and fewer GEMMs did. On a GPU the
// packed and separate GEMMs are different cuBLASLt kernels summing in other orders: the
// loss within 1e-3 relative, gradients within 2e-2 (the bounds against the CPU bf16 mode).
// Biases, θ and gains get values of their own (InitWeights leaves them 0 or 1), and the
// compared step follows an AdamW update, so its GEMMs read the AdamW-written bf16 copies.
TEST(CudaBf16Step, PackedProjectionsMatchSeparateGemms) {
  const char* outer = std::getenv("SINKSCOPE_CUDA_PACKED");
  const std::string saved = outer != nullptr ? outer : "";
  unsetenv("SINKSCOPE_CUDA_PACKED");
  CUDA_BF16_OR_SKIP(packed);
  setenv("SINKSCOPE_CUDA_PACKED", "0", 1);
  std::string why;
  auto separate = CudaBf16OrSkip(&why);
  if (outer != nullptr) {
    setenv("SINKSCOPE_CUDA_PACKED", saved.c_str(), 1);
  } else {
    unsetenv("SINKSCOPE_CUDA_PACKED");
  }
  ASSERT_NE(separate, nullptr) << why;
  std::vector<Variant> variants = Variants();
  // Qwen2's biases are adjacent (and so in the packed GEMM's epilogue) when q_dim and
  // kv_dim are multiples of the slab's 64-float alignment, as in every Qwen2 checkpoint.
  ModelConfig wide = SmallModel(61, 32, VScaleMode::kVScale);
  wide.d_model = 64;
  wide.head_dim = 32;
  wide.ffn = 128;
  wide.attention_bias = true;
  variants.push_back({"qwen2-like, adjacent biases", wide});
  for (const Variant& v : variants) {
    auto a = Model::Create(v.config, packed.get()), b = Model::Create(v.config, separate.get());
    ASSERT_TRUE(a.ok() && b.ok()) << v.name;
    (*a)->InitWeights(17);
    // InitWeights leaves biases and θ at 0 and gains at 1: every 1-D tensor gets values of
    // its own, so a bias or θ read from the wrong place shows.
    std::vector<float> w = (*a)->ParamsToHost();
    for (const ParamTensor& p : (*a)->tensors()) {
      if (p.shape.size() != 1) continue;
      for (size_t i = 0; i < p.size; ++i) w[p.offset + i] += 0.3f * std::sin(0.7f * static_cast<float>(p.offset + i));
    }
    (*a)->ParamsFromHost(w);
    (*b)->ParamsFromHost(w);
    const int B = 2, T = 32;
    std::vector<int32_t> tokens, targets;
    // A first step and an AdamW update on both: the compared step then reads every weight
    // through the bf16 copies the AdamW kernel wrote (the packed GEMMs span adjacent ones).
    Batch(B, T, v.config.vocab, 4, &tokens, &targets);
    OptimizerConfig o;
    o.lr = 1e-2;
    o.warmup_steps = 0;
    o.total_steps = 10;
    for (Model* m : {a->get(), b->get()}) {
      m->ZeroGrad();
      m->ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T));
      AdamWStep(*m, o, 0);
      m->ZeroGrad();
    }
    Batch(B, T, v.config.vocab, 3, &tokens, &targets);
#ifdef SINKSCOPE_CUDA_EMULATION
    emu::StartTrace();
#endif
    const double la = (*a)->ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T));
#ifdef SINKSCOPE_CUDA_EMULATION
    int split = 0, pack = 0, pairs = 0, gemms_packed = 0;
    for (const emu::TraceRecord& r : emu::StopTrace()) {
      split += r.name.find("QkvSplitKernel") != std::string::npos;
      pack += r.name.find("QkvPackGradKernel") != std::string::npos;
      pairs += r.kind == emu::TraceRecord::kGemm && r.batch == 2;
      gemms_packed += r.kind == emu::TraceRecord::kGemm;
    }
    emu::StartTrace();
#endif
    const double lb = (*b)->ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T));
#ifdef SINKSCOPE_CUDA_EMULATION
    int gemms_separate = 0;
    for (const emu::TraceRecord& r : emu::StopTrace()) gemms_separate += r.kind == emu::TraceRecord::kGemm;
    const int qk_packed = v.config.qk_norm ? 0 : v.config.layers;  // q/k norms keep q, k, v apart
    const bool bias_apart = v.config.attention_bias && v.config.q_dim() % 64 != 0;
    EXPECT_EQ(split, bias_apart ? 0 : qk_packed) << v.name;
    EXPECT_EQ(pack, v.config.attention_bias ? 0 : qk_packed) << v.name;
    EXPECT_EQ(pairs, v.config.layers) << v.name << ": gate|up as one batched GEMM per block";
    EXPECT_LT(gemms_packed, gemms_separate) << v.name;
    std::printf("%-28s GEMMs per step packed %d, separate %d\n", v.name.c_str(), gemms_packed, gemms_separate);
#endif
    ASSERT_TRUE(packed->TakeError().ok()) << v.name;
    ASSERT_TRUE(separate->TakeError().ok()) << v.name;
#ifdef SINKSCOPE_CUDA_EMULATION
    EXPECT_EQ(la, lb) << v.name << ": the forward is the same bits";
    const double bound = 1e-5;
#else
    EXPECT_NEAR(la, lb, 1e-3 * lb) << v.name;
    const double bound = 2e-2;
#endif
    const std::vector<float> ga = (*a)->GradsToHost(), gb = (*b)->GradsToHost();
    double worst = 0;
    for (const ParamTensor& p : (*a)->tensors()) {
      const double e = NormError(ga, gb, p.offset, p.size);
      EXPECT_LE(e, bound) << v.name << " " << p.name;
      worst = std::max(worst, e);
    }
    std::printf("%-28s loss %.8f both; gradients packed vs separate %.2e\n", v.name.c_str(), la, worst);
  }
}

// On a GPU the bf16 step's attention is cuDNN's flash attention; SINKSCOPE_ATTENTION=tiled
// gives the project's tiled kernel instead. The two must agree on a step (the loss within
// 1e-3 relative; gradients within 2e-2 normalised: cuDNN's dq, dk, dv are bf16, the tiled
// kernel's fp32), and both steps must repeat bit for bit (cuDNN's deterministic backward).
TEST(CudaBf16Step, CudnnAttentionAgreesWithTheTiledKernelAndRepeats) {
#ifdef SINKSCOPE_CUDA_EMULATION
  GTEST_SKIP() << "cuDNN is not part of the CPU emulation: the tiled kernel is the only attention here";
#endif
  std::string why;
  auto gpu = CudaBf16OrSkip(&why, /*tiled=*/false);
  if (gpu == nullptr) GTEST_SKIP() << why;
  auto tiled = CudaBf16OrSkip(&why);
  ASSERT_NE(tiled, nullptr) << why;
  ModelConfig c = SmallModel(61, 64, VScaleMode::kVScale);
  c.head_dim = 64;  // a head width cuDNN's flash attention has engines for
  c.d_model = 256;
  auto a = Model::Create(c, gpu.get()), b = Model::Create(c, tiled.get());
  ASSERT_TRUE(a.ok() && b.ok());
  (*a)->InitWeights(3);
  (*b)->InitWeights(3);
  const int B = 2, T = 64;
  std::vector<int32_t> tokens, targets;
  Batch(B, T, c.vocab, 2, &tokens, &targets);
  double loss[2][2];
  std::vector<float> grads[2][2];
  for (int rep = 0; rep < 2; ++rep) {
    for (int i = 0; i < 2; ++i) {
      Model& m = i == 0 ? **a : **b;
      m.ZeroGrad();
      loss[i][rep] = m.ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T));
      grads[i][rep] = m.GradsToHost();
    }
  }
  ASSERT_TRUE(gpu->TakeError().ok());
  ASSERT_TRUE(tiled->TakeError().ok());
  if (!CudaAttentionRanThroughCudnn(*gpu)) {
    GTEST_SKIP() << "cuDNN refused this shape (its reason is on stderr): the tiled kernel ran both";
  }
  EXPECT_FALSE(CudaAttentionRanThroughCudnn(*tiled));
  EXPECT_NEAR(loss[0][0], loss[1][0], 1e-3 * loss[1][0]);
  EXPECT_LE(NormError(grads[0][0], grads[1][0]), 2e-2);
  EXPECT_EQ(grads[0][0], grads[0][1]) << "cuDNN's step repeats bit for bit";
  EXPECT_EQ(grads[1][0], grads[1][1]) << "the tiled kernel's step repeats bit for bit";
}

}  // namespace
}  // namespace sinkscope

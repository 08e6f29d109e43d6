// The CUDA backend's fp32 mode against the CPU reference backend on whole passes: one
// training step (the loss, every parameter's gradient, θ's included) for each arm, every
// probe of a probed step, and a 50-step loss curve with AdamW. Every test skips, saying
// why, where no CUDA device is visible (scripts/gpu/run.sh runs them on a GPU machine).
//
// Tolerances (fp32 both sides, different summation orders, no TF32): loss 1e-5 relative;
// a gradient tensor 2e-4 normalised error (max |Δ| / max |cpu|); a probe quantity 1e-4
// relative (or 1e-6 absolute near 0); the loss curve 1e-5 at step 1, 2e-3 by step 50 (an
// fp32 trajectory drifts with the step count).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
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

namespace sinkscope {
namespace {

#define CUDA_OR_SKIP(var)                              \
  std::string why_##var;                               \
  auto var = MakeCudaOrSkipReason(&why_##var);         \
  if (var == nullptr) GTEST_SKIP() << why_##var;

ModelConfig SmallConfig(VScaleMode mode) { return SmallModel(61, 32, mode); }

const char* ArmName(VScaleMode m) {
  return m == VScaleMode::kNone ? "baseline" : m == VScaleMode::kVScale ? "vscale" : "backward_only";
}

// One step of the same batch on the CPU model `a` and the CUDA model `b`: the loss within
// 1e-5 relative and every gradient tensor within 2e-4 normalised error. Returns the names
// of the tensors compared.
std::vector<std::string> ExpectStepsMatch(Model& a, Model& b, Backend& gpu, const std::vector<int32_t>& tokens,
                                          const std::vector<int32_t>& targets, int B, int T, const std::string& what) {
  const double la = a.ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T));
  const double lb = b.ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T));
  EXPECT_TRUE(gpu.TakeError().ok()) << what;
  EXPECT_NEAR(lb, la, 1e-5 * la) << what;
  const std::vector<float> ga = a.GradsToHost(), gb = b.GradsToHost();
  std::vector<std::string> names;
  for (const ParamTensor& t : a.tensors()) {
    const std::vector<float> wa(ga.begin() + t.offset, ga.begin() + t.offset + t.size),
        wb(gb.begin() + t.offset, gb.begin() + t.offset + t.size);
    EXPECT_LE(NormError(wb, wa), 2e-4) << what << " " << t.name;
    names.push_back(t.name);
  }
  return names;
}

TEST(CudaStep, OneStepLossAndEveryGradientMatchTheCpu) {
  CUDA_OR_SKIP(gpu);
  auto cpu = MakeCpuBackend();
  for (VScaleMode mode : {VScaleMode::kNone, VScaleMode::kVScale, VScaleMode::kBackwardOnly}) {
    const ModelConfig c = SmallConfig(mode);
    auto a = Model::Create(c, cpu.get()), b = Model::Create(c, gpu.get());
    ASSERT_TRUE(a.ok()) << a.status().message();
    ASSERT_TRUE(b.ok()) << b.status().message();
    (*a)->InitWeights(11);
    (*b)->InitWeights(11);
    ASSERT_EQ((*a)->ParamsToHost(), (*b)->ParamsToHost()) << "the same initial weights on both backends";
    const int B = 3, T = 32;
    std::vector<int32_t> tokens, targets;
    Batch(B, T, c.vocab, 0, &tokens, &targets);
    ExpectStepsMatch(**a, **b, *gpu, tokens, targets, B, T, ArmName(mode));
  }
}

// Every number of a probe report, flattened with its name.
std::map<std::string, double> Flatten(const ProbeReport& r) {
  std::map<std::string, double> out;
  auto vec = [&](const std::string& name, const std::vector<double>& v) {
    for (size_t i = 0; i < v.size(); ++i) out[name + "[" + std::to_string(i) + "]"] = v[i];
  };
  out["r_gs_median"] = r.r_gs_median;
  for (const LayerProbe& l : r.layers) {
    const std::string p = "layer" + std::to_string(l.layer) + ".";
    out[p + "r_gs"] = l.r_gs;
    out[p + "r_gs_norm_then_mean"] = l.r_gs_norm_then_mean;
    for (const auto& [site, v] : l.grad_profile) vec(p + "grad." + site, v);
    for (const auto& [name, v] : l.norms) vec(p + "norm." + name, v);
    for (const auto& [name, v] : l.norm_ratio) out[p + "norm_ratio." + name] = v;
    vec(p + "attn_bloat", l.attn_bloat);
    vec(p + "attn_change", l.attn_change);
    vec(p + "attn_compress", l.attn_compress);
    vec(p + "mlp_bloat", l.mlp_bloat);
    vec(p + "mlp_change", l.mlp_change);
    vec(p + "mlp_compress", l.mlp_compress);
    vec(p + "alpha", l.alpha);
    vec(p + "column_mass", l.column_mass);
    vec(p + "column_second_moment", l.column_second_moment);
    vec(p + "per_sample_sink_fraction", l.per_sample_sink_fraction);
    out[p + "sink_rate"] = l.sink_rate;
    for (size_t i = 0; i < 3; ++i) out[p + "massive.top" + std::to_string(i + 1)] = l.massive.top3[i];
    out[p + "massive.median"] = l.massive.median;
    // Discrete: the same (sequence, token, channel) must hold the largest |h_out|.
    out[p + "massive.top1_sequence"] = static_cast<double>(l.massive.top1_sequence);
    out[p + "massive.top1_token"] = l.massive.top1_token;
    out[p + "massive.top1_channel"] = l.massive.top1_channel;
    vec(p + "theta", l.theta);
    vec(p + "unassigned_mass", l.unassigned_mass);
    vec(p + "gate_mean", l.gate_mean);
    vec(p + "gate_sink", l.gate_sink);
    vec(p + "gate_rest", l.gate_rest);
  }
  return out;
}

// A probed step of the same batch on both models: every number of the CUDA report within
// 1e-4 relative (1e-6 absolute near 0) of the CPU's and finite (or NaN where the CPU's is
// NaN, when nan_where_cpu_nan). Returns the CPU report's numbers.
std::map<std::string, double> ExpectProbesMatch(Model& a, Model& b, Backend& gpu, const std::vector<int32_t>& tokens,
                                                const std::vector<int32_t>& targets, int B, int T,
                                                const ProbeSettings& settings, const std::string& what,
                                                bool nan_where_cpu_nan = false) {
  ProbeCollector pa(a, settings, T), pb(b, settings, T);
  const double la = a.ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T), &pa);
  const double lb = b.ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T), &pb);
  EXPECT_TRUE(gpu.TakeError().ok()) << what;
  const auto fa = Flatten(pa.Finish(1, la)), fb = Flatten(pb.Finish(1, lb));
  EXPECT_EQ(fa.size(), fb.size()) << what;
  for (const auto& [name, want] : fa) {
    if (fb.count(name) == 0) {
      ADD_FAILURE() << what << " " << name << " is missing from the CUDA report";
      continue;
    }
    const double got = fb.at(name);
    if (nan_where_cpu_nan && std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << what << " " << name;
      continue;
    }
    EXPECT_TRUE(std::isfinite(got)) << what << " " << name;
    EXPECT_NEAR(got, want, std::max(1e-4 * std::abs(want), 1e-6)) << what << " " << name;
  }
  return fa;
}

TEST(CudaStep, EveryProbeOfAProbedStepMatchesTheCpu) {
  CUDA_OR_SKIP(gpu);
  auto cpu = MakeCpuBackend();
  const ModelConfig c = SmallConfig(VScaleMode::kVScale);
  auto a = Model::Create(c, cpu.get()), b = Model::Create(c, gpu.get());
  ASSERT_TRUE(a.ok() && b.ok());
  (*a)->InitWeights(5);
  (*b)->InitWeights(5);
  const int B = 4, T = 32;
  std::vector<int32_t> tokens, targets;
  Batch(B, T, c.vocab, 3, &tokens, &targets);
  ProbeSettings settings;
  settings.profile_len = 16;
  settings.ref_span = 15;
  settings.t_eps = 16;
  for (int s : {0, 2}) {
    settings.sink_position = s;
    ExpectProbesMatch(**a, **b, *gpu, tokens, targets, B, T, settings, "s=" + std::to_string(s));
  }
}

// The attention arms (docs/design/ARMS.md): the CUDA backend keeps no attention matrix
// (its tiled kernel recomputes the weights from per-row numbers), the CPU reference keeps
// A. One step's loss and every gradient (the sink logits and gate weights included), and
// every probe of a probed step (the unassigned mass and the gates' means included), agree
// within the baseline's tolerances.
struct ArmConfig {
  const char* name;
  AttentionKind attention;
  GateKind gate;
  VScaleMode vscale;
};
const ArmConfig kArmConfigs[] = {
    {"sink_logit", AttentionKind::kSinkLogit, GateKind::kNone, VScaleMode::kNone},
    {"softmax_plus_one", AttentionKind::kSoftmaxPlusOne, GateKind::kNone, VScaleMode::kNone},
    {"sigmoid", AttentionKind::kSigmoid, GateKind::kNone, VScaleMode::kNone},
    {"softpick", AttentionKind::kSoftpick, GateKind::kNone, VScaleMode::kNone},
    {"gated_output", AttentionKind::kSoftmax, GateKind::kOutput, VScaleMode::kNone},
    {"gated_head", AttentionKind::kSoftmax, GateKind::kHead, VScaleMode::kNone},
    {"gated_value", AttentionKind::kSoftmax, GateKind::kValue, VScaleMode::kNone},
    {"sink_logit_vscale", AttentionKind::kSinkLogit, GateKind::kNone, VScaleMode::kVScale},
    {"softpick_vscale", AttentionKind::kSoftpick, GateKind::kNone, VScaleMode::kVScale},
};

ModelConfig ArmModel(const ArmConfig& arm) {
  ModelConfig c = SmallConfig(arm.vscale);
  c.attention = arm.attention;
  c.gate = arm.gate;
  c.sink_logit_init = 0.7;
  c.sigmoid_bias = -std::log(32.0);
  c.softpick_eps = 1e-3;
  return c;
}

TEST(CudaStep, EveryArmsStepAndProbesMatchTheCpu) {
  CUDA_OR_SKIP(gpu);
  auto cpu = MakeCpuBackend();
  EXPECT_FALSE(gpu->ArmAttentionKeepsWeights()) << "the CUDA arms keep no T×T matrix";
  for (const ArmConfig& arm : kArmConfigs) {
    SCOPED_TRACE(arm.name);
    const ModelConfig c = ArmModel(arm);
    auto a = Model::Create(c, cpu.get()), b = Model::Create(c, gpu.get());
    ASSERT_TRUE(a.ok()) << a.status().message();
    ASSERT_TRUE(b.ok()) << b.status().message();
    (*a)->InitWeights(13);
    (*b)->InitWeights(13);
    const int B = 3, T = 32;
    std::vector<int32_t> tokens, targets;
    Batch(B, T, c.vocab, 1, &tokens, &targets);
    bool arm_tensor = false;
    for (const std::string& name : ExpectStepsMatch(**a, **b, *gpu, tokens, targets, B, T, arm.name)) {
      arm_tensor |= name.find("self_attn.sinks") != std::string::npos || name.find("_gate.weight") != std::string::npos;
    }
    if (arm.attention == AttentionKind::kSinkLogit || arm.gate != GateKind::kNone) {
      EXPECT_TRUE(arm_tensor) << "the arm's own parameters are among the compared gradients";
    }
    ProbeSettings settings;
    settings.profile_len = 16;
    settings.ref_span = 15;
    settings.t_eps = 16;
    const auto fa = ExpectProbesMatch(**a, **b, *gpu, tokens, targets, B, T, settings, arm.name,
                                      /*nan_where_cpu_nan=*/true);
    const std::string unassigned = "layer0.unassigned_mass[0]", gate = "layer0.gate_mean[0]";
    EXPECT_EQ(fa.count(unassigned), arm.attention != AttentionKind::kSoftmax ? 1u : 0u) << "the arm's own probes";
    EXPECT_EQ(fa.count(gate), arm.gate != GateKind::kNone ? 1u : 0u) << "the arm's own probes";
  }
}

TEST(CudaStep, AFiftyStepLossCurveFollowsTheCpu) {
  CUDA_OR_SKIP(gpu);
  auto cpu = MakeCpuBackend();
  const ModelConfig c = SmallConfig(VScaleMode::kVScale);
  auto a = Model::Create(c, cpu.get()), b = Model::Create(c, gpu.get());
  ASSERT_TRUE(a.ok() && b.ok());
  (*a)->InitWeights(8);
  (*b)->InitWeights(8);
  OptimizerConfig o;
  o.lr = 3e-3;
  o.warmup_steps = 5;
  o.total_steps = 50;
  const int B = 4, T = 32;
  double first_a = 0, last_a = 0;
  for (int step = 1; step <= 50; ++step) {
    std::vector<int32_t> tokens, targets;
    Batch(B, T, c.vocab, step % 2, &tokens, &targets);  // two batches, learnable in 50 steps
    double l[2];
    for (int i = 0; i < 2; ++i) {
      Model& m = i == 0 ? **a : **b;
      m.ZeroGrad();
      l[i] = m.ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T));
      AdamWStep(m, o, step - 1);  // 0-based step
    }
    ASSERT_TRUE(gpu->TakeError().ok()) << "step " << step;
    const double tol = step == 1 ? 1e-5 : 1e-5 + 2e-3 * step / 50.0;
    EXPECT_NEAR(l[1], l[0], tol * l[0]) << "step " << step;
    if (step == 1) first_a = l[0];
    last_a = l[0];
  }
  EXPECT_LT(last_a, 0.9 * first_a) << "the curve is a training curve";
  EXPECT_LE(NormError((*b)->ParamsToHost(), (*a)->ParamsToHost()), 5e-3);
}

}  // namespace
}  // namespace sinkscope

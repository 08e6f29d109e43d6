// Probes against brute force written plainly here: an explicit attention matrix,
// per-sequence gradients taken one sequence at a time, R_GS from finite differences,
// the identities of METRICS.md on trained weights, and the guarantee that probing
// never perturbs training.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "engine/probes.h"
#include "base/rng.h"
#include "training/trainer.h"

namespace sinkscope {
namespace {

using ::testing::HasSubstr;
using Matrix = std::vector<double>;

// Copies every site's gradient and the block activations of one pass.
struct Capture : PassObserver {
  std::map<std::pair<int, Site>, std::vector<float>> grad;
  std::map<int, std::map<std::string, std::vector<float>>> act;
  size_t nd = 0, nq = 0, nkv = 0;
  void OnBlockForward(int layer, const BlockActivations& a, int B, int T) override {
    auto copy = [](TensorView v, size_t n) {
      const float* p = v.f32("the capture");
      return std::vector<float>(p, p + n);
    };
    act[layer] = {{"h_in", copy(a.h_in, nd)},  {"h_half", copy(a.h_half, nd)}, {"h_out", copy(a.h_out, nd)},
                  {"r_attn", copy(a.r_attn, nd)}, {"r_mlp", copy(a.r_mlp, nd)}, {"q", copy(a.q, nq)},
                  {"k", copy(a.k, nkv)},          {"v", copy(a.v, nkv)},         {"vh", copy(a.vhat, nkv)}};
  }
  void OnGradient(int layer, Site site, const float* g, const float*, int B, int T) override {
    const size_t n = site == Site::kQ ? nq : (site == Site::kK || site == Site::kV || site == Site::kVHat) ? nkv : nd;
    grad[{layer, site}] = std::vector<float>(g, g + n);
  }
};

ModelConfig TinyConfig(VScaleMode mode) {
  ModelConfig c;
  c.layers = 2;
  c.d_model = 16;
  c.heads = 4;
  c.kv_heads = 2;
  c.head_dim = 4;
  c.ffn = 24;
  c.vocab = 23;
  c.context = 20;
  c.init_std = 0.3;
  c.vscale_sigma = 0.3;
  c.vscale = mode;
  return c;
}

struct Batch {
  int B, T;
  std::vector<int32_t> inputs, targets;
};

Batch RandomBatch(int B, int T, int vocab, uint64_t seed) {
  Rng rng(seed);
  Batch b{B, T, std::vector<int32_t>(B * T), std::vector<int32_t>(B * T)};
  for (int i = 0; i < B * T; ++i) {
    b.inputs[i] = static_cast<int32_t>(rng.Below(vocab));
    b.targets[i] = static_cast<int32_t>(rng.Below(vocab));
  }
  return b;
}

// One sequence's pass with the gradient scale of the whole batch's mean loss: its
// activation gradients are that sequence's share of ∂L/∂(site).
Capture SequencePass(Model& m, const Batch& batch, int b) {
  Capture cap;
  const ModelConfig& c = m.config();
  cap.nd = static_cast<size_t>(batch.T) * c.d_model;
  cap.nq = static_cast<size_t>(batch.T) * c.q_dim();
  cap.nkv = static_cast<size_t>(batch.T) * c.kv_dim();
  m.ZeroGrad();
  m.ForwardBackward(batch.inputs.data() + b * batch.T, batch.targets.data() + b * batch.T, 1, batch.T,
                    1.0f / (batch.B * batch.T), &cap);
  m.ZeroGrad();
  return cap;
}

double RowNorm(const std::vector<double>& x) {
  double s = 0;
  for (double v : x) s += v * v;
  return std::sqrt(s);
}

// Token-wise norm of per-sequence gradients g[b] (each (T, C)) at token t.
double BruteTokenNorm(const std::vector<std::vector<float>>& g, int t, int C, ReduceMode mode) {
  if (mode == ReduceMode::kSumThenNorm) {
    std::vector<double> sum(C, 0.0);
    for (const auto& gb : g) {
      for (int j = 0; j < C; ++j) sum[j] += gb[static_cast<size_t>(t) * C + j];
    }
    return RowNorm(sum);
  }
  double mean = 0;
  for (const auto& gb : g) {
    std::vector<double> row(gb.begin() + static_cast<size_t>(t) * C, gb.begin() + static_cast<size_t>(t + 1) * C);
    mean += RowNorm(row) / g.size();
  }
  return mean;
}

// The explicit causal attention matrix a[t][u] of head h in one sequence.
Matrix AttentionMatrix(const std::vector<float>& q, const std::vector<float>& k, int T, int H, int KV, int dh, int h) {
  const int g = h / (H / KV);
  Matrix a(static_cast<size_t>(T) * T, 0.0);
  for (int t = 0; t < T; ++t) {
    std::vector<double> s(t + 1);
    double mx = -1e300, z = 0;
    for (int u = 0; u <= t; ++u) {
      double dot = 0;
      for (int c = 0; c < dh; ++c) dot += q[(t * H + h) * dh + c] * static_cast<double>(k[(u * KV + g) * dh + c]);
      s[u] = dot / std::sqrt(static_cast<double>(dh));
      mx = std::max(mx, s[u]);
    }
    for (int u = 0; u <= t; ++u) z += std::exp(s[u] - mx);
    for (int u = 0; u <= t; ++u) a[t * T + u] = std::exp(s[u] - mx) / z;
  }
  return a;
}

double RelErr(double got, double want) { return std::abs(got - want) / std::max(std::abs(want), 1e-12); }

// Batch-mean norm per token of activation `name` (h_in … r_mlp: (T, d); v, vh: (T, KV,
// dh), averaged over KV heads) of layer l, from the per-sequence captures.
std::vector<double> BruteActivationNorms(const std::vector<Capture>& seq, int l, const std::string& name, int T,
                                         const ModelConfig& c) {
  const bool kv = name == "v" || name == "vh";
  const int G = kv ? c.kv_heads : 1, C = kv ? c.head_dim : c.d_model;
  const int B = static_cast<int>(seq.size());
  std::vector<double> mean(T, 0.0);
  for (const Capture& cap : seq) {
    const auto& x = cap.act.at(l).at(name);
    for (int t = 0; t < T; ++t) {
      for (int g = 0; g < G; ++g) {
        std::vector<double> row(x.begin() + (t * G + g) * C, x.begin() + (t * G + g + 1) * C);
        mean[t] += RowNorm(row) / (B * G);
      }
    }
  }
  return mean;
}

// The Figure 7 reference of METRICS.md: the plain mean of the norms of tokens 1…15
// other than s (15 tokens when s = 0 or s > 15, 14 when 1 ≤ s ≤ 15).
double BruteReferenceMean(const std::vector<double>& norms, int s) {
  std::vector<double> window;
  for (int t = 1; t <= 15; ++t) {
    if (t != s) window.push_back(norms.at(t));
  }
  double sum = 0;
  for (double x : window) sum += x;
  return sum / static_cast<double>(window.size());
}

class ProbeBruteForceTest : public ::testing::TestWithParam<std::tuple<VScaleMode, ReduceMode>> {};

TEST_P(ProbeBruteForceTest, EveryQuantityMatchesPlainDefinitions) {
  const auto [mode, reduce] = GetParam();
  auto backend = MakeCpuBackend();
  auto model_or = Model::Create(TinyConfig(mode), backend.get());
  ASSERT_TRUE(model_or.ok());
  Model& m = **model_or;
  m.InitWeights(3);
  if (mode == VScaleMode::kVScale) {  // nonzero θ
    auto p = m.ParamsToHost();
    for (const auto& t : m.tensors()) {
      if (t.name.find("vscale_theta") != std::string::npos) {
        for (size_t i = 0; i < t.size; ++i) p[t.offset + i] = 0.4f * (i + 1) - 0.5f;
      }
    }
    m.ParamsFromHost(p);
  }
  const ModelConfig& c = m.config();
  const int B = 3, T = 20, H = c.heads, KV = c.kv_heads, dh = c.head_dim, d = c.d_model;
  const Batch batch = RandomBatch(B, T, c.vocab, 11);
  ProbeSettings st;
  st.sink_position = 1;
  st.ref_span = 9;
  st.profile_len = 12;
  st.t_eps = 6;
  st.eps = 0.2;
  st.reduce = reduce;
  auto report = RunDiagnosticPass(m, st, batch.inputs.data(), batch.targets.data(), B, T);
  ASSERT_TRUE(report.ok()) << report.status().ToString();

  std::vector<Capture> seq;
  for (int b = 0; b < B; ++b) seq.push_back(SequencePass(m, batch, b));
  const double tol = 1e-4;
  std::vector<double> rgs;
  for (int l = 0; l < c.layers; ++l) {
    const LayerProbe& lp = report->layers[l];
    auto site_grads = [&](Site s) {
      std::vector<std::vector<float>> g;
      for (auto& cap : seq) g.push_back(cap.grad.at({l, s}));
      return g;
    };
    auto channels = [&](Site s) { return s == Site::kQ ? c.q_dim() : (s == Site::kK || s == Site::kV || s == Site::kVHat) ? c.kv_dim() : d; };
    // Profiles at every site.
    for (Site s : kProfileSites) {
      const auto g = site_grads(s);
      for (int t = 0; t < st.profile_len; ++t) {
        EXPECT_LT(RelErr(lp.grad_profile.at(SiteName(s))[t], BruteTokenNorm(g, t, channels(s), reduce)), tol)
            << "layer " << l << " " << SiteName(s) << " t=" << t;
      }
    }
    // R_GS, Definition 1.
    const auto gxn = site_grads(Site::kXn);
    double ref = 0;
    for (int t = 0; t <= st.ref_span; ++t) {
      if (t != st.sink_position) ref += BruteTokenNorm(gxn, t, d, reduce);
    }
    const double want_rgs = BruteTokenNorm(gxn, st.sink_position, d, reduce) / (ref / st.ref_span);
    EXPECT_LT(RelErr(lp.r_gs, want_rgs), tol) << "layer " << l;
    rgs.push_back(want_rgs);
    // Bloat / Change / Compress, eq. (4).
    const auto g_in = site_grads(Site::kHIn), g_half = site_grads(Site::kHHalf), g_out = site_grads(Site::kHOut);
    const auto g_xm = site_grads(Site::kXm);
    std::vector<std::vector<float>> g3a(B), g3m(B);
    for (int b = 0; b < B; ++b) {
      for (size_t i = 0; i < g_in[b].size(); ++i) {
        g3a[b].push_back(g_in[b][i] - g_half[b][i]);
        g3m[b].push_back(g_half[b][i] - g_out[b][i]);
      }
    }
    for (int t = 0; t < st.profile_len; ++t) {
      auto N = [&](const std::vector<std::vector<float>>& g) { return BruteTokenNorm(g, t, d, reduce); };
      EXPECT_LT(RelErr(lp.attn_bloat[t], N(gxn) / N(g_half)), tol);
      EXPECT_LT(RelErr(lp.attn_change[t], N(g_in) / N(g_half)), tol);
      EXPECT_LT(RelErr(lp.attn_compress[t], N(g3a) / N(gxn)), 5 * tol);  // a difference of close vectors
      EXPECT_LT(RelErr(lp.mlp_bloat[t], N(g_xm) / N(g_out)), tol);
      EXPECT_LT(RelErr(lp.mlp_change[t], N(g_half) / N(g_out)), tol);
      EXPECT_LT(RelErr(lp.mlp_compress[t], N(g3m) / N(g_xm)), 5 * tol);
    }
    // Attention statistics from the explicit matrix.
    const int s = st.sink_position, window = std::min(st.t_eps, T - s);
    int sinks = 0;
    double per_sample = 0;
    for (int h = 0; h < H; ++h) {
      double alpha = 0, mass = 0, second = 0, above = 0;
      for (int b = 0; b < B; ++b) {
        const Matrix a = AttentionMatrix(seq[b].act[l]["q"], seq[b].act[l]["k"], T, H, KV, dh, h);
        double alpha_b = 0;
        for (int t = s; t < s + window; ++t) alpha_b += a[t * T + s] / window;
        for (int t = s; t < T; ++t) {
          mass += a[t * T + s] / B;
          second += a[t * T + s] * a[t * T + s] / B;
        }
        alpha += alpha_b / B;
        above += (alpha_b > st.eps) ? 1.0 / B : 0.0;
      }
      EXPECT_LT(RelErr(lp.alpha[h], alpha), tol);
      EXPECT_LT(RelErr(lp.column_mass[h], mass), tol);
      EXPECT_LT(RelErr(lp.column_second_moment[h], second), tol);
      EXPECT_DOUBLE_EQ(lp.per_sample_sink_fraction[h], above);
      sinks += alpha > st.eps;
      per_sample += above / H;
    }
    EXPECT_DOUBLE_EQ(lp.sink_rate, static_cast<double>(sinks) / H);
    EXPECT_NEAR(lp.sink_rate_per_sample, per_sample, 1e-12);
    // Activation norms (batch means; v, v̂ averaged over KV heads) and token-s ratios.
    for (const char* name : {"h_in", "h_half", "h_out", "r_attn", "r_mlp", "v", "vh"}) {
      const std::vector<double> mean = BruteActivationNorms(seq, l, name, T, c);
      for (int t = 0; t < st.profile_len; ++t) EXPECT_LT(RelErr(lp.norms.at(name)[t], mean[t]), tol) << name;
      EXPECT_LT(RelErr(lp.norm_ratio.at(name), mean[s] / BruteReferenceMean(mean, s)), tol) << name;
    }
    // Massive activations: sort every |h_out| value.
    std::vector<std::pair<double, size_t>> all;
    for (int b = 0; b < B; ++b) {
      const auto& x = seq[b].act[l]["h_out"];
      for (size_t i = 0; i < x.size(); ++i) all.push_back({std::abs(x[i]), b * x.size() + i});
    }
    std::sort(all.begin(), all.end(), [](auto& x, auto& y) { return x.first > y.first; });
    for (int i = 0; i < 3; ++i) EXPECT_LT(RelErr(lp.massive.top3[i], all[i].first), tol);
    const size_t top = all[0].second;
    EXPECT_EQ(lp.massive.top1_sequence, static_cast<int64_t>(top / (T * d)));
    EXPECT_EQ(lp.massive.top1_token, static_cast<int>((top / d) % T));
    EXPECT_EQ(lp.massive.top1_channel, static_cast<int>(top % d));
    std::vector<double> sorted;
    for (auto& p : all) sorted.push_back(p.first);
    std::sort(sorted.begin(), sorted.end());
    EXPECT_LT(RelErr(lp.massive.median, sorted[(sorted.size() - 1) / 2]), tol);
    // θ and C.
    for (int g = 0; g < KV; ++g) {
      const double theta = mode == VScaleMode::kVScale ? 0.4 * (g + 1) - 0.5 : 0.0;
      EXPECT_NEAR(lp.theta[g], theta, 1e-6);
      EXPECT_LT(RelErr(lp.c[g], d * dh * 0.3 * 0.3 * std::exp(theta)), 1e-6);
    }
  }
  EXPECT_LT(RelErr(report->r_gs_median, Quantile(rgs, 0.5)), tol);
}

INSTANTIATE_TEST_SUITE_P(
    ArmsAndModes, ProbeBruteForceTest,
    ::testing::Combine(::testing::Values(VScaleMode::kNone, VScaleMode::kVScale, VScaleMode::kBackwardOnly),
                       ::testing::Values(ReduceMode::kSumThenNorm, ReduceMode::kNormThenMean)),
    [](const auto& info) {
      return std::string(VScaleModeName(std::get<0>(info.param))) + "_" + ReduceModeName(std::get<1>(info.param));
    });

// A sink position past every token the collector keeps for the profiles (t < max(P,
// T_e + 1, 16)): R_GS in both modes, the token-s norm ratios and α_s still follow the
// plain definitions.
class ProbeSinkBeyondProfileTest : public ::testing::TestWithParam<ReduceMode> {};

TEST_P(ProbeSinkBeyondProfileTest, TokenSQuantitiesMatchPlainDefinitions) {
  const ReduceMode reduce = GetParam();
  auto backend = MakeCpuBackend();
  ModelConfig config = TinyConfig(VScaleMode::kVScale);
  config.context = 32;
  auto model_or = Model::Create(config, backend.get());
  ASSERT_TRUE(model_or.ok());
  Model& m = **model_or;
  m.InitWeights(5);
  const ModelConfig& c = m.config();
  const int B = 3, T = 32, H = c.heads, KV = c.kv_heads, dh = c.head_dim, d = c.d_model;
  const Batch batch = RandomBatch(B, T, c.vocab, 17);
  std::vector<Capture> seq;
  for (int b = 0; b < B; ++b) seq.push_back(SequencePass(m, batch, b));
  const double tol = 1e-4;
  // s past the profile length P (and past the 16 tokens of the norm reference), up to the
  // last token; Definition 1 takes 0 ≤ s ≤ T_e, so T_e spans the whole context.
  for (int s : {12, 16, 20, 31}) {
    ProbeSettings st;
    st.sink_position = s;
    st.ref_span = 31;
    st.profile_len = 8;
    st.t_eps = 8;
    st.reduce = reduce;
    auto report = RunDiagnosticPass(m, st, batch.inputs.data(), batch.targets.data(), B, T);
    ASSERT_TRUE(report.ok()) << report.status().ToString();
    std::vector<double> rgs;
    for (int l = 0; l < c.layers; ++l) {
      const LayerProbe& lp = report->layers[l];
      std::vector<std::vector<float>> gxn;
      for (auto& cap : seq) gxn.push_back(cap.grad.at({l, Site::kXn}));
      // R_GS, Definition 1, in both modes.
      std::map<ReduceMode, double> want_rgs;
      for (ReduceMode mode : {ReduceMode::kSumThenNorm, ReduceMode::kNormThenMean}) {
        double ref = 0;
        for (int t = 0; t <= st.ref_span; ++t) {
          if (t != s) ref += BruteTokenNorm(gxn, t, d, mode);
        }
        want_rgs[mode] = BruteTokenNorm(gxn, s, d, mode) / (ref / st.ref_span);
      }
      EXPECT_LT(RelErr(lp.r_gs_sum_then_norm, want_rgs[ReduceMode::kSumThenNorm]), tol) << "layer " << l << " s=" << s;
      EXPECT_LT(RelErr(lp.r_gs_norm_then_mean, want_rgs[ReduceMode::kNormThenMean]), tol)
          << "layer " << l << " s=" << s;
      EXPECT_TRUE(std::isfinite(lp.r_gs)) << "layer " << l << " s=" << s;
      EXPECT_LT(RelErr(lp.r_gs, want_rgs[reduce]), tol) << "layer " << l << " s=" << s;
      rgs.push_back(want_rgs[reduce]);
      // Profiles keep their length P.
      EXPECT_EQ(lp.grad_profile.at("xn").size(), static_cast<size_t>(st.profile_len));
      // Token s / mean over tokens 1…15 other than s of each activation norm (batch means).
      for (const char* name : {"h_in", "h_half", "h_out", "r_attn", "r_mlp", "v", "vh"}) {
        const std::vector<double> mean = BruteActivationNorms(seq, l, name, T, c);
        EXPECT_LT(RelErr(lp.norm_ratio.at(name), mean[s] / BruteReferenceMean(mean, s)), tol)
            << name << " layer " << l << " s=" << s;
        EXPECT_EQ(lp.norms.at(name).size(), static_cast<size_t>(st.profile_len)) << name;
      }
      // α_s from the explicit matrix, window clipped to T − s.
      const int window = std::min(st.t_eps, T - s);
      for (int h = 0; h < H; ++h) {
        double alpha = 0;
        for (int b = 0; b < B; ++b) {
          const Matrix a = AttentionMatrix(seq[b].act[l]["q"], seq[b].act[l]["k"], T, H, KV, dh, h);
          for (int t = s; t < s + window; ++t) alpha += a[t * T + s] / (window * B);
        }
        EXPECT_LT(RelErr(lp.alpha[h], alpha), tol) << "layer " << l << " head " << h << " s=" << s;
      }
    }
    EXPECT_LT(RelErr(report->r_gs_median, Quantile(rgs, 0.5)), tol) << "s=" << s;
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, ProbeSinkBeyondProfileTest,
                         ::testing::Values(ReduceMode::kSumThenNorm, ReduceMode::kNormThenMean),
                         [](const auto& info) { return std::string(ReduceModeName(info.param)); });

// Perturbs one entry of x̃ in one layer during the forward pass.
struct Nudge : PassObserver {
  int layer = -1;
  size_t index = 0;
  float delta = 0;
  void OnBlockForward(int, const BlockActivations&, int, int) override {}
  void OnGradient(int, Site, const float*, const float*, int, int) override {}
  void EditAttentionInput(int l, TensorView xn, int, int) override {
    if (l == layer) xn.f32("the x̃ nudge")[index] += delta;
  }
};

TEST(ProbeTest, GradientSinkRatioFromFiniteDifferences) {
  auto backend = MakeCpuBackend();
  ModelConfig c = TinyConfig(VScaleMode::kNone);
  c.d_model = 8;
  c.heads = 2;
  c.kv_heads = 2;
  c.head_dim = 4;
  auto model_or = Model::Create(c, backend.get());
  Model& m = **model_or;
  m.InitWeights(9);
  const int B = 2, T = 10;
  const Batch batch = RandomBatch(B, T, c.vocab, 4);
  ProbeSettings st;
  st.ref_span = 7;
  st.profile_len = 10;
  for (ReduceMode mode : {ReduceMode::kSumThenNorm, ReduceMode::kNormThenMean}) {
    st.reduce = mode;
    auto report = RunDiagnosticPass(m, st, batch.inputs.data(), batch.targets.data(), B, T);
    ASSERT_TRUE(report.ok());
    for (int l = 0; l < c.layers; ++l) {
      // ∂L/∂x̃[b,t,:] by central differences of the batch's mean loss.
      std::vector<std::vector<float>> g(B, std::vector<float>(T * c.d_model));
      Nudge nudge;
      nudge.layer = l;
      const float h = 1e-2f;
      for (int b = 0; b < B; ++b) {
        for (int i = 0; i < T * c.d_model; ++i) {
          nudge.index = static_cast<size_t>(b) * T * c.d_model + i;
          nudge.delta = h;
          const double up = m.Evaluate(batch.inputs.data(), batch.targets.data(), B, T, &nudge);
          nudge.delta = -h;
          const double down = m.Evaluate(batch.inputs.data(), batch.targets.data(), B, T, &nudge);
          g[b][i] = static_cast<float>((up - down) / (2 * h));
        }
      }
      std::vector<double> n(T);
      for (int t = 0; t < T; ++t) n[t] = BruteTokenNorm(g, t, c.d_model, mode);
      EXPECT_LT(RelErr(report->layers[l].r_gs, GradientSinkRatio(n, 0, st.ref_span)), 2e-2)
          << "layer " << l << " " << ReduceModeName(mode);
    }
  }
}

// Trains the tiny model a few dozen steps so the identities are checked on trained,
// not only initial, weights.
std::unique_ptr<Trainer> TrainedTrainer(VScaleMode mode, const DataSplits* data, Backend* be) {
  TrainerOptions o;
  o.model = TinyConfig(mode);
  o.model.init_std = 0.02;
  o.model.vscale_sigma = 0.02;
  o.model.vocab = 23;
  o.optimizer.lr = 1e-2;
  o.optimizer.min_lr = 1e-3;
  o.optimizer.total_steps = 40;
  o.micro_batch = 4;
  o.seed = 1;
  auto t = Trainer::Create(o, data, be);
  (*t)->Initialize();
  for (int i = 0; i < 40; ++i) (*t)->Step();
  return std::move(*t);
}

DataSplits PatternData() {
  std::vector<int32_t> tokens(6000);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * i + 3 * i) % 23);
  DataSplits d;
  d.train = TokenStream(tokens);
  d.val = TokenStream(std::vector<int32_t>(tokens.begin(), tokens.begin() + 500));
  d.max_token = 22;
  return d;
}

TEST(ProbeTest, IdentitiesHoldOnTrainedWeights) {
  auto backend = MakeCpuBackend();
  const DataSplits data = PatternData();
  for (VScaleMode mode : {VScaleMode::kNone, VScaleMode::kVScale}) {
    auto trainer = TrainedTrainer(mode, &data, backend.get());
    Model& m = trainer->model();
    const ModelConfig& c = m.config();
    const int T = 20, H = c.heads, KV = c.kv_heads, dh = c.head_dim, d = c.d_model, group = H / KV;
    const Batch batch = RandomBatch(1, T, c.vocab, 8);
    const Capture cap = SequencePass(m, batch, 0);
    const std::vector<float> params = m.ParamsToHost();
    for (int l = 0; l < c.layers; ++l) {
      auto act = cap.act.at(l);
      const auto& dq = cap.grad.at({l, Site::kQ});
      const auto& dvh = cap.grad.at({l, Site::kVHat});
      const auto& dv = cap.grad.at({l, Site::kV});
      const auto& dhalf = cap.grad.at({l, Site::kHHalf});
      // Proposition 4: ∂L/∂q_0 = 0 exactly.
      for (int i = 0; i < H * dh; ++i) EXPECT_EQ(dq[i], 0.0f);
      // ∂L/∂y = ∂L/∂h_half · W_O (r_attn = W_O y).
      const float* wo = params.data() + m.FindTensor("model.layers." + std::to_string(l) + ".self_attn.o_proj.weight")->offset;
      std::vector<double> dy(static_cast<size_t>(T) * H * dh, 0.0);
      for (int t = 0; t < T; ++t)
        for (int j = 0; j < H * dh; ++j)
          for (int i = 0; i < d; ++i) dy[t * H * dh + j] += dhalf[t * d + i] * static_cast<double>(wo[i * H * dh + j]);
      std::vector<Matrix> a;
      for (int h = 0; h < H; ++h) a.push_back(AttentionMatrix(act["q"], act["k"], T, H, KV, dh, h));
      for (int g = 0; g < KV; ++g) {
        for (int s = 0; s < T; ++s) {
          // Proposition 1: ∂L/∂v̂_s = Σ_{t≥s} a[t,s] ∂L/∂y_t, summed over the group's heads.
          std::vector<double> want(dh, 0.0);
          double bound = 0;
          for (int h = g * group; h < (g + 1) * group; ++h) {
            double mass = 0, max_dy = 0;
            for (int t = s; t < T; ++t) {
              mass += a[h][t * T + s];
              double n = 0;
              for (int c2 = 0; c2 < dh; ++c2) {
                want[c2] += a[h][t * T + s] * dy[(t * H + h) * dh + c2];
                n += dy[(t * H + h) * dh + c2] * dy[(t * H + h) * dh + c2];
              }
              max_dy = std::max(max_dy, std::sqrt(n));
            }
            bound += mass * max_dy;
          }
          double scale = 1e-12;
          for (double w : want) scale = std::max(scale, std::abs(w));
          for (int c2 = 0; c2 < dh; ++c2) {
            EXPECT_NEAR(dvh[(s * KV + g) * dh + c2], want[c2], 1e-4 * scale + 1e-9) << "Prop 1 layer " << l;
          }
          if (mode == VScaleMode::kNone) {
            // Corollary 1: ‖∂L/∂v_s‖ ≤ M_s · max_{t≥s} ‖∂L/∂y_t‖ (per head; summed over the group).
            double n = 0;
            for (int c2 = 0; c2 < dh; ++c2) n += static_cast<double>(dv[(s * KV + g) * dh + c2]) * dv[(s * KV + g) * dh + c2];
            EXPECT_LE(std::sqrt(n), bound * (1 + 1e-5) + 1e-9) << "Cor 1 layer " << l << " s=" << s;
          }
        }
      }
      // Theorem 2: ‖J_rms(x)‖_op ≤ ‖γ‖_∞ / rms(x), J from the backend's backward (Jᵀ e_i).
      const float* gamma = params.data() + m.FindTensor("model.layers." + std::to_string(l) + ".input_layernorm.weight")->offset;
      double gamma_max = 0;
      for (int i = 0; i < d; ++i) gamma_max = std::max(gamma_max, std::abs(static_cast<double>(gamma[i])));
      for (int t : {0, 1, 7}) {
        std::vector<float> x(act["h_in"].begin() + t * d, act["h_in"].begin() + (t + 1) * d), y(d);
        float rstd;
        backend->RmsNormForward(y.data(), &rstd, x.data(), gamma, 1, d, static_cast<float>(c.rms_eps));
        Matrix jt(d * d);  // row i = Jᵀ e_i
        for (int i = 0; i < d; ++i) {
          std::vector<float> e(d, 0.0f), dx(d, 0.0f), dgamma(d, 0.0f);
          e[i] = 1.0f;
          backend->RmsNormBackward(dx.data(), dgamma.data(), e.data(), x.data(), gamma, &rstd, 1, d);
          for (int j = 0; j < d; ++j) jt[i * d + j] = dx[j];
        }
        std::vector<double> u(d, 1.0);  // power iteration on J Jᵀ for the largest singular value
        double sigma = 0;
        for (int it = 0; it < 200; ++it) {
          std::vector<double> w(d, 0.0), z(d, 0.0);
          for (int i = 0; i < d; ++i)
            for (int j = 0; j < d; ++j) w[j] += jt[i * d + j] * u[i];
          for (int i = 0; i < d; ++i)
            for (int j = 0; j < d; ++j) z[i] += jt[i * d + j] * w[j];
          const double nz = RowNorm(z);
          sigma = std::sqrt(nz / RowNorm(u));
          for (int i = 0; i < d; ++i) u[i] = z[i] / nz;
        }
        double ms = 0;
        for (float v : x) ms += static_cast<double>(v) * v / d;
        EXPECT_LE(sigma, gamma_max / std::sqrt(ms) * (1 + 1e-4)) << "Thm 2 layer " << l << " t=" << t;
      }
      // Proposition 2: V-scale Jacobian eigenvalues on trained v and θ.
      const float* theta = params.data() + m.FindTensor("model.layers." + std::to_string(l) + ".self_attn.vscale_theta")->offset;
      for (int t : {0, 5}) {
        const int g = 1;
        std::vector<float> v(act["v"].begin() + (t * KV + g) * dh, act["v"].begin() + (t * KV + g + 1) * dh);
        const double C = m.VScaleCBase() * std::exp(mode == VScaleMode::kVScale ? theta[g] : 0.0);
        double r = 0;
        for (float x : v) r += static_cast<double>(x) * x;
        const float th = mode == VScaleMode::kVScale ? theta[g] : 0.0f;
        auto apply = [&](const std::vector<float>& in) {  // J·in (J is symmetric)
          std::vector<float> out(dh), th1 = {th};
          backend->VScaleBackward(out.data(), nullptr, in.data(), v.data(), th1.data(), 1, 1, dh, m.VScaleCBase(),
                                  VScaleMode::kVScale);
          return out;
        };
        const auto jv = apply(v);
        const double along = (r * r + 3 * C * r) / ((r + C) * (r + C));
        for (int i = 0; i < dh; ++i) EXPECT_NEAR(jv[i], along * v[i], 1e-5 * std::sqrt(r) + 1e-9);
        std::vector<float> u(dh, 0.0f);  // a vector orthogonal to v
        u[0] = v[1];
        u[1] = -v[0];
        const auto ju = apply(u);
        for (int i = 0; i < dh; ++i) EXPECT_NEAR(ju[i], r / (r + C) * u[i], 1e-5 * std::sqrt(r) + 1e-9);
      }
    }
  }
}

TEST(ProbeTest, ProbingNeverPerturbsTraining) {
  auto backend = MakeCpuBackend();
  const DataSplits data = PatternData();
  for (VScaleMode mode : {VScaleMode::kNone, VScaleMode::kVScale}) {
    TrainerOptions o;
    o.model = TinyConfig(mode);
    o.optimizer.total_steps = 8;
    o.micro_batch = 3;
    o.grad_accum = 2;
    auto plain = Trainer::Create(o, &data, backend.get());
    auto probed = Trainer::Create(o, &data, backend.get());
    (*plain)->Initialize();
    (*probed)->Initialize();
    ProbeSettings st;
    st.ref_span = 10;
    st.profile_len = 16;
    for (int i = 0; i < 8; ++i) {
      (*plain)->Step();
      ProbeReport r;
      (*probed)->ProbedStep(st, i % 2 ? ProbeBatchKind::kHeldOut : ProbeBatchKind::kStepBatch, &r);
      EXPECT_EQ(r.step, i + 1);
      EXPECT_EQ(r.batch_sequences, i % 2 ? 3 : 6);
    }
    const auto a = (*plain)->model().ParamsToHost(), b = (*probed)->model().ParamsToHost();
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << VScaleModeName(mode);
  }
}

// Every number of a probe report describes the weights the probed pass ran with: on the
// step's own batch, θ and C too, though the step then updates θ.
TEST(ProbeTest, StepBatchProbeReportsThetaBeforeTheUpdate) {
  auto backend = MakeCpuBackend();
  const DataSplits data = PatternData();
  TrainerOptions o;
  o.model = TinyConfig(VScaleMode::kVScale);
  o.optimizer.total_steps = 6;
  o.optimizer.lr = 1e-2;
  o.micro_batch = 3;
  auto trainer = Trainer::Create(o, &data, backend.get());
  ASSERT_TRUE(trainer.ok());
  (*trainer)->Initialize();
  ProbeSettings st;
  st.ref_span = 10;
  st.profile_len = 16;
  const Model& m = (*trainer)->model();
  const ModelConfig& c = m.config();
  for (int i = 0; i < 4; ++i) {
    const auto before = m.ParamsToHost();
    ProbeReport r;
    (*trainer)->ProbedStep(st, i % 2 ? ProbeBatchKind::kHeldOut : ProbeBatchKind::kStepBatch, &r);
    const auto after = m.ParamsToHost();
    for (int l = 0; l < c.layers; ++l) {
      const ParamTensor* t = m.FindTensor("model.layers." + std::to_string(l) + ".self_attn.vscale_theta");
      ASSERT_NE(t, nullptr);
      for (int g = 0; g < c.kv_heads; ++g) {
        EXPECT_EQ(r.layers[l].theta[g], before[t->offset + g]) << "step " << i + 1 << " layer " << l;
        EXPECT_DOUBLE_EQ(r.layers[l].c[g], m.VScaleCBase() * std::exp(static_cast<double>(before[t->offset + g])));
        if (i > 0) {
          EXPECT_NE(after[t->offset + g], before[t->offset + g]) << "θ must move for this test to bite";
        }
      }
    }
  }
}

TEST(ProbeTest, BadSettingsAreRejectedWithTheirName) {
  auto backend = MakeCpuBackend();
  auto m = Model::Create(TinyConfig(VScaleMode::kNone), backend.get());
  (*m)->InitWeights(1);
  const Batch batch = RandomBatch(1, 12, 23, 1);
  auto run = [&](ProbeSettings st) {
    return RunDiagnosticPass(**m, st, batch.inputs.data(), batch.targets.data(), 1, 12).status();
  };
  ProbeSettings ok;
  ok.ref_span = 11;
  ok.profile_len = 12;
  EXPECT_TRUE(run(ok).ok());
  ProbeSettings st = ok;
  st.ref_span = 12;  // T_e ≥ T
  EXPECT_THAT(run(st).message(), HasSubstr("probe.ref_span T_e = 12 must be in [1, T) = [1, 12)"));
  st = ok;
  st.profile_len = 13;  // P > T
  EXPECT_THAT(run(st).message(), HasSubstr("probe.profile_len P = 13"));
  st = ok;
  st.sink_position = 12;  // s outside the context
  EXPECT_THAT(run(st).message(), HasSubstr("probe.sink_position s = 12 lies outside the context [0, 12)"));
  st = ok;
  st.sink_position = -1;
  EXPECT_EQ(run(st).code(), StatusCode::kInvalidArgument);
  st = ok;
  st.ref_span = 5;
  st.sink_position = 6;  // Definition 1 takes 0 ≤ s ≤ T_e
  EXPECT_THAT(run(st).message(), HasSubstr("probe.sink_position s = 6 must lie within the reference span [0, T_e] = "
                                           "[0, 5] (Definition 1: 0 ≤ s ≤ T_e)"));
}

// The diagnostic mode's micro-batches: a batch probed in passes of M sequences gives the
// report of one pass over the whole batch (SUM_THEN_NORM sums over every sequence).
class MicroBatchedProbeTest : public ::testing::TestWithParam<ReduceMode> {};

TEST_P(MicroBatchedProbeTest, PassesOfAnySizeGiveTheReportOfOnePass) {
  auto backend = MakeCpuBackend();
  auto model_or = Model::Create(TinyConfig(VScaleMode::kVScale), backend.get());
  ASSERT_TRUE(model_or.ok());
  Model& m = **model_or;
  m.InitWeights(11);
  const int B = 5, T = 16;
  const Batch batch = RandomBatch(B, T, m.config().vocab, 23);
  ProbeSettings st;
  st.ref_span = 15;
  st.profile_len = 16;
  st.t_eps = 16;
  st.reduce = GetParam();
  auto whole = RunDiagnosticPass(m, st, batch.inputs.data(), batch.targets.data(), B, T);
  ASSERT_TRUE(whole.ok());
  auto close = [](double got, double want) { return std::abs(got - want) <= 2e-5 * std::max(1.0, std::abs(want)); };
  for (int M : {1, 2, 3}) {
    std::vector<std::pair<int, int>> progress;
    DiagnosticOptions o;
    o.micro_batch = M;
    o.progress = [&](int done, int total) { progress.push_back({done, total}); };
    auto parts = RunDiagnosticPass(m, st, batch.inputs.data(), batch.targets.data(), B, T, 0, o);
    ASSERT_TRUE(parts.ok());
    const int passes = (B + M - 1) / M;
    ASSERT_EQ(progress.size(), static_cast<size_t>(passes));
    EXPECT_EQ(progress.back(), std::make_pair(passes, passes));
    EXPECT_EQ(parts->batch_sequences, B);
    EXPECT_TRUE(close(parts->loss, whole->loss)) << parts->loss << " vs " << whole->loss;
    EXPECT_TRUE(close(parts->r_gs_median, whole->r_gs_median)) << "M=" << M;
    for (int l = 0; l < m.config().layers; ++l) {
      const LayerProbe& a = parts->layers[l];
      const LayerProbe& b = whole->layers[l];
      EXPECT_TRUE(close(a.r_gs, b.r_gs)) << "M=" << M << " layer " << l << ": " << a.r_gs << " vs " << b.r_gs;
      for (const auto& [site, profile] : b.grad_profile) {
        for (size_t t = 0; t < profile.size(); ++t) {
          EXPECT_TRUE(close(a.grad_profile.at(site)[t], profile[t])) << site << " t=" << t << " M=" << M;
        }
      }
      for (const auto& [name, norms] : b.norms) {
        for (size_t t = 0; t < norms.size(); ++t) EXPECT_TRUE(close(a.norms.at(name)[t], norms[t])) << name;
      }
      for (size_t h = 0; h < b.alpha.size(); ++h) {
        EXPECT_TRUE(close(a.alpha[h], b.alpha[h]));
        EXPECT_TRUE(close(a.column_second_moment[h], b.column_second_moment[h]));
      }
      for (size_t t = 0; t < b.attn_compress.size(); ++t) EXPECT_TRUE(close(a.attn_compress[t], b.attn_compress[t]));
      // The same values, found in any order: equal up to the roundings in which a pass of
      // fewer rows differs (OpenBLAS may take another kernel for a GEMM of fewer rows).
      for (int k = 0; k < 3; ++k) EXPECT_TRUE(close(a.massive.top3[k], b.massive.top3[k])) << "top-" << k + 1;
      EXPECT_TRUE(close(a.massive.median, b.massive.median));
      EXPECT_EQ(a.massive.top1_sequence, b.massive.top1_sequence);
      EXPECT_EQ(a.massive.top1_token, b.massive.top1_token);
    }
    // The median's values kept on the host past the device budget (none on the device,
    // then only the first micro-batch's first layer there): the same report, bit for bit.
    const size_t first_chunk = static_cast<size_t>(std::min(M, B)) * T * m.config().d_model * sizeof(float);
    for (size_t budget : {size_t{0}, first_chunk}) {
      o.device_keep_budget = budget;
      auto kept = RunDiagnosticPass(m, st, batch.inputs.data(), batch.targets.data(), B, T, 0, o);
      ASSERT_TRUE(kept.ok());
      for (int l = 0; l < m.config().layers; ++l) {
        const MassiveActivations& a = kept->layers[l].massive;
        const MassiveActivations& b = parts->layers[l].massive;
        EXPECT_EQ(a.median, b.median) << "budget " << budget << " layer " << l;
        EXPECT_EQ(a.top3, b.top3) << "budget " << budget << " layer " << l;
        EXPECT_EQ(a.top1_sequence, b.top1_sequence);
        EXPECT_EQ(a.top1_token, b.top1_token);
        EXPECT_EQ(a.top1_channel, b.top1_channel);
      }
    }
  }
  // A stop asked between micro-batches ends the pass, reporting nothing.
  DiagnosticOptions o;
  o.micro_batch = 2;
  int asked = 0;
  o.stop = [&] { return ++asked > 1; };
  auto stopped = RunDiagnosticPass(m, st, batch.inputs.data(), batch.targets.data(), B, T, 0, o);
  EXPECT_EQ(stopped.status().code(), StatusCode::kCancelled);
  EXPECT_THAT(stopped.status().message(), ::testing::HasSubstr("stopped after 1 of 3 micro-batches"));
}

TEST(ProbingModelTest, WithoutParameterGradientsTheReportIsBitIdentical) {
  // A model made for probing allocates no parameter gradients or AdamW state and skips
  // their GEMMs; every activation gradient, and so every probe, is exactly the same.
  auto backend = MakeCpuBackend();
  const ModelConfig c = TinyConfig(VScaleMode::kVScale);
  auto training = Model::Create(c, backend.get());
  auto probing = Model::Create(c, backend.get(), ModelOptions{.training = false});
  ASSERT_TRUE(training.ok() && probing.ok());
  (*training)->InitWeights(4);
  (*probing)->ParamsFromHost((*training)->ParamsToHost());
  EXPECT_FALSE((*probing)->training());
  EXPECT_TRUE((*probing)->GradsToHost().empty());
  const int B = 3, T = 16;
  const Batch batch = RandomBatch(B, T, c.vocab, 31);
  ProbeSettings st;
  st.ref_span = 15;
  st.profile_len = 16;
  st.t_eps = 16;
  auto a = RunDiagnosticPass(**training, st, batch.inputs.data(), batch.targets.data(), B, T);
  auto b = RunDiagnosticPass(**probing, st, batch.inputs.data(), batch.targets.data(), B, T);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->loss, b->loss);
  for (int l = 0; l < c.layers; ++l) {
    EXPECT_EQ(a->layers[l].r_gs, b->layers[l].r_gs);
    EXPECT_EQ(a->layers[l].grad_profile, b->layers[l].grad_profile);
    EXPECT_EQ(a->layers[l].attn_compress, b->layers[l].attn_compress);
    EXPECT_EQ(a->layers[l].norms, b->layers[l].norms);
    EXPECT_EQ(a->layers[l].theta, b->layers[l].theta);
  }
  EXPECT_LT(EstimateDiagnosticBytes(c, B, T, false), EstimateDiagnosticBytes(c, B, T, true));
}

INSTANTIATE_TEST_SUITE_P(Modes, MicroBatchedProbeTest,
                         ::testing::Values(ReduceMode::kSumThenNorm, ReduceMode::kNormThenMean));

}  // namespace
}  // namespace sinkscope

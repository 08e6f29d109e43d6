// The attention arms of docs/design/ARMS.md on the CPU backend: each op against finite
// differences (every new parameter included) and against a float64 brute-force forward
// written from the formulas; the whole model of every arm against finite differences
// and against a float64 forward of the whole model; the refusals.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <map>
#include <string>

#include "base/rng.h"
#include "engine/backend.h"
#include "engine/model.h"
#include "engine/probes.h"

namespace sinkscope {
namespace {

std::vector<float> RandomVector(size_t n, Rng& rng, double scale = 1.0) {
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(scale * rng.Normal());
  return v;
}

double Dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

double Sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// As tests/gradcheck_test.cc: central differences, error normalised by the largest
// analytic entry; NaN never passes.
void ExpectGradientMatches(const std::string& what, std::vector<float>& x, const std::vector<float>& analytic,
                           const std::function<double()>& loss, double step = 1e-2, double tolerance = 2e-3) {
  ASSERT_EQ(x.size(), analytic.size());
  double scale = 1e-12, worst = 0;
  for (float g : analytic) scale = std::max(scale, static_cast<double>(std::abs(g)));
  for (size_t i = 0; i < x.size(); ++i) {
    const float saved = x[i];
    x[i] = saved + static_cast<float>(step);
    const double up = loss(), x_up = x[i];
    x[i] = saved - static_cast<float>(step);
    const double down = loss(), x_down = x[i];
    x[i] = saved;
    const double fd = (up - down) / (x_up - x_down);  // the step fp32 could represent
    const double err = std::abs(fd - analytic[i]) / scale;
    ASSERT_TRUE(std::isfinite(err)) << what << "[" << i << "]";
    worst = std::max(worst, err);
  }
  EXPECT_LT(worst, tolerance) << what << ": worst normalised error over " << x.size() << " entries";
  EXPECT_GT(scale, 1e-6) << what << ": the gradient is zero, the check proves nothing";
}

// One causal row of weights by the arm's formula, in float64 (ARMS.md), and the mass
// the row gives no token.
std::vector<double> ReferenceRow(const std::vector<double>& z, AttentionKind kind, double sink, double bias,
                                 double eps, double* unassigned) {
  std::vector<double> a(z.size());
  double assigned = 0;
  switch (kind) {
    case AttentionKind::kSoftmax:
    case AttentionKind::kSinkLogit:
    case AttentionKind::kSoftmaxPlusOne: {
      const double s = kind == AttentionKind::kSinkLogit ? sink : 0.0;
      double den = kind == AttentionKind::kSoftmax ? 0.0 : std::exp(s);
      for (double zi : z) den += std::exp(zi);
      for (size_t u = 0; u < z.size(); ++u) a[u] = std::exp(z[u]) / den;
      *unassigned = kind == AttentionKind::kSoftmax ? 0.0 : std::exp(s) / den;
      return a;
    }
    case AttentionKind::kSigmoid:
      for (size_t u = 0; u < z.size(); ++u) a[u] = Sigmoid(z[u] + bias);
      break;
    case AttentionKind::kSoftpick: {
      double den = eps;
      for (double zi : z) den += std::abs(std::exp(zi) - 1.0);
      for (size_t u = 0; u < z.size(); ++u) a[u] = std::max(std::exp(z[u]) - 1.0, 0.0) / den;
      break;
    }
  }
  for (double x : a) assigned += x;
  *unassigned = 1.0 - assigned;
  return a;
}

struct ArmCase {
  AttentionKind kind;
  const char* name;
};
const ArmCase kArmKinds[] = {{AttentionKind::kSinkLogit, "sink_logit"},
                             {AttentionKind::kSoftmaxPlusOne, "softmax_plus_one"},
                             {AttentionKind::kSigmoid, "sigmoid"},
                             {AttentionKind::kSoftpick, "softpick"}};

class ArmOpTest : public ::testing::TestWithParam<ArmCase> {
 protected:
  std::unique_ptr<Backend> be_ = MakeCpuBackend();
  Rng rng_{4321};
};

// The op's y, A and unassigned mass against the float64 formula, GQA included.
TEST_P(ArmOpTest, ForwardMatchesFloat64BruteForce) {
  const AttentionKind kind = GetParam().kind;
  const int B = 2, T = 7, H = 4, KV = 2, dh = 4;
  AttentionArmParams arm;
  arm.kind = kind;
  arm.sigmoid_bias = -std::log(static_cast<float>(T));
  arm.softpick_eps = 1e-3f;
  auto q = RandomVector(B * T * H * dh, rng_), k = RandomVector(B * T * KV * dh, rng_),
       v = RandomVector(B * T * KV * dh, rng_), sink = RandomVector(H, rng_);
  std::vector<float> y(B * T * H * dh), att(B * H * T * T), un(B * H * T),
      ws(be_->ArmAttentionWorkspaceFloats(B, T, H));
  const float* sink_ptr = kind == AttentionKind::kSinkLogit ? sink.data() : nullptr;
  be_->ArmAttentionForward(y.data(), att.data(), un.data(), ws.data(), q.data(), k.data(), v.data(), sink_ptr, B, T,
                           H, KV, dh, arm);
  double worst = 0, negative_unassigned = 0;
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      const int g = h / (H / KV);
      for (int t = 0; t < T; ++t) {
        std::vector<double> z(t + 1);
        for (int u = 0; u <= t; ++u) {
          double dot = 0;
          for (int c = 0; c < dh; ++c) {
            dot += static_cast<double>(q[((b * T + t) * H + h) * dh + c]) * k[((b * T + u) * KV + g) * dh + c];
          }
          z[u] = dot / std::sqrt(static_cast<double>(dh));
        }
        double unassigned = 0;
        const std::vector<double> a =
            ReferenceRow(z, kind, sink[h], arm.sigmoid_bias, arm.softpick_eps, &unassigned);
        negative_unassigned = std::min(negative_unassigned, unassigned);
        const size_t row = ((static_cast<size_t>(b) * H + h) * T + t);
        worst = std::max(worst, std::abs(un[row] - unassigned));
        for (int u = 0; u < T; ++u) {
          const double ref = u <= t ? a[u] : 0.0;
          worst = std::max(worst, std::abs(att[row * T + u] - ref));
        }
        for (int c = 0; c < dh; ++c) {
          double ref = 0;
          for (int u = 0; u <= t; ++u) ref += a[u] * v[((b * T + u) * KV + g) * dh + c];
          worst = std::max(worst, std::abs(y[((b * T + t) * H + h) * dh + c] - ref));
        }
      }
    }
  }
  EXPECT_LT(worst, 2e-6) << GetParam().name;
  if (kind == AttentionKind::kSinkLogit || kind == AttentionKind::kSoftmaxPlusOne) {
    // Rows with the virtual sink: the keys and the sink share one.
    for (int r = 0; r < B * H * T; ++r) {
      double sum = un[r];
      for (int u = 0; u < T; ++u) sum += att[static_cast<size_t>(r) * T + u];
      EXPECT_NEAR(sum, 1.0, 1e-6);
      EXPECT_GT(un[r], 0.0f);
    }
  }
}

TEST_P(ArmOpTest, BackwardMatchesFiniteDifferencesIncludingSinkLogits) {
  const AttentionKind kind = GetParam().kind;
  const int B = 2, T = 6, H = 4, KV = 2, dh = 4;
  AttentionArmParams arm;
  arm.kind = kind;
  arm.sigmoid_bias = -1.5f;
  arm.softpick_eps = 1e-2f;
  auto q = RandomVector(B * T * H * dh, rng_), k = RandomVector(B * T * KV * dh, rng_),
       v = RandomVector(B * T * KV * dh, rng_), w = RandomVector(B * T * H * dh, rng_),
       sink = RandomVector(H, rng_);
  std::vector<float> y(w.size()), att(B * H * T * T), un(B * H * T), ws(be_->ArmAttentionWorkspaceFloats(B, T, H));
  const bool learned = kind == AttentionKind::kSinkLogit;
  auto loss = [&] {
    be_->ArmAttentionForward(y.data(), att.data(), un.data(), ws.data(), q.data(), k.data(), v.data(),
                             learned ? sink.data() : nullptr, B, T, H, KV, dh, arm);
    return Dot(y, w);
  };
  loss();
  std::vector<float> dq(q.size()), dk(k.size()), dv(v.size()), dsink(H, 0.0f);
  be_->ArmAttentionBackward(dq.data(), dk.data(), dv.data(), dsink.data(), w.data(), y.data(), att.data(), un.data(),
                            ws.data(), q.data(), k.data(), v.data(), learned ? sink.data() : nullptr, B, T, H, KV, dh,
                            arm);
  const std::string n = GetParam().name;
  // Softpick's ReLU and |·| have kinks at z = 0; a small step keeps differences off them.
  const double step = kind == AttentionKind::kSoftpick ? 1e-3 : 1e-2;
  ExpectGradientMatches(n + " dq", q, dq, loss, step);
  ExpectGradientMatches(n + " dk", k, dk, loss, step);
  ExpectGradientMatches(n + " dv", v, dv, loss, step);
  if (learned) {
    ExpectGradientMatches(n + " dsink", sink, dsink, loss, step);
  } else {
    for (float g : dsink) EXPECT_EQ(g, 0.0f) << n << ": no sink parameter, no gradient";
  }
  // Proposition 1 holds for any A: ∂L/∂v̂_u = Σ_t a[t,u] ∂L/∂y_t. (Proposition 4 does
  // not: a row of one key still depends on q_0 through the sink, σ or softpick.)
  loss();  // A at the unperturbed inputs again
  for (int b = 0; b < B; ++b) {
    for (int g = 0; g < KV; ++g) {
      for (int u = 0; u < T; ++u) {
        for (int c = 0; c < dh; ++c) {
          double ref = 0;
          for (int h = g * (H / KV); h < (g + 1) * (H / KV); ++h) {
            for (int t = u; t < T; ++t) {
              ref += static_cast<double>(att[((static_cast<size_t>(b) * H + h) * T + t) * T + u]) *
                     w[((b * T + t) * H + h) * dh + c];
            }
          }
          EXPECT_NEAR(dv[((b * T + u) * KV + g) * dh + c], ref, 1e-5);
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, ArmOpTest, ::testing::ValuesIn(kArmKinds),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(SigmoidGateOpTest, ForwardAndBackward) {
  auto be = MakeCpuBackend();
  Rng rng(77);
  for (int C : {1, 4}) {  // elementwise (gated_output, gated_value) and one gate per head
    const int N = 5, G = 3;
    auto x = RandomVector(N * G * C, rng), logits = RandomVector(N * G, rng), w = RandomVector(N * G * C, rng);
    std::vector<float> out(x.size());
    auto loss = [&] {
      be->SigmoidGateForward(out.data(), x.data(), logits.data(), N, G, C);
      return Dot(out, w);
    };
    loss();
    for (int i = 0; i < N * G * C; ++i) EXPECT_NEAR(out[i], x[i] * Sigmoid(logits[i / C]), 1e-6);
    std::vector<float> dx(x.size()), dl(logits.size());
    be->SigmoidGateBackward(dx.data(), dl.data(), w.data(), x.data(), logits.data(), N, G, C);
    ExpectGradientMatches("gate dx", x, dx, loss);
    ExpectGradientMatches("gate dlogits", logits, dl, loss);
  }
}

// --- the whole model ------------------------------------------------------------------

struct ModelArm {
  const char* name;
  AttentionKind attention;
  GateKind gate;
  VScaleMode vscale;
};
const ModelArm kModelArms[] = {
    {"sink_logit", AttentionKind::kSinkLogit, GateKind::kNone, VScaleMode::kNone},
    {"softmax_plus_one", AttentionKind::kSoftmaxPlusOne, GateKind::kNone, VScaleMode::kNone},
    {"gated_output", AttentionKind::kSoftmax, GateKind::kOutput, VScaleMode::kNone},
    {"gated_head", AttentionKind::kSoftmax, GateKind::kHead, VScaleMode::kNone},
    {"gated_value", AttentionKind::kSoftmax, GateKind::kValue, VScaleMode::kNone},
    {"sigmoid", AttentionKind::kSigmoid, GateKind::kNone, VScaleMode::kNone},
    {"softpick", AttentionKind::kSoftpick, GateKind::kNone, VScaleMode::kNone},
    {"sink_logit_vscale", AttentionKind::kSinkLogit, GateKind::kNone, VScaleMode::kVScale},
    {"gated_head_vscale", AttentionKind::kSoftmax, GateKind::kHead, VScaleMode::kVScale},
    {"sigmoid_vscale", AttentionKind::kSigmoid, GateKind::kNone, VScaleMode::kVScale},
};

ModelConfig TinyArmModel(const ModelArm& arm) {
  ModelConfig c;
  c.layers = 2;
  c.d_model = 8;
  c.heads = 4;
  c.kv_heads = 2;
  c.head_dim = 4;
  c.ffn = 12;
  c.vocab = 11;
  c.context = 6;
  c.init_std = 0.4;
  c.vscale_sigma = 0.4;
  c.attention = arm.attention;
  c.gate = arm.gate;
  c.vscale = arm.vscale;
  c.sink_logit_init = 0.7;
  c.sigmoid_bias = -std::log(6.0);
  c.softpick_eps = 1e-2;
  return c;
}

class ModelArmTest : public ::testing::TestWithParam<ModelArm> {
 protected:
  void SetUp() override {
    c_ = TinyArmModel(GetParam());
    auto model_or = Model::Create(c_, backend_.get());
    ASSERT_TRUE(model_or.ok()) << model_or.status().ToString();
    model_ = std::move(*model_or);
    model_->InitWeights(7);
    params_ = model_->ParamsToHost();
    Rng rng(99);
    for (const ParamTensor& t : model_->tensors()) {  // non-trivial norms, θ and sink logits
      if (t.shape.size() == 1) {
        for (size_t i = 0; i < t.size; ++i) params_[t.offset + i] += static_cast<float>(0.3 * rng.Normal());
      }
      if (c_.vscale == VScaleMode::kNone && t.name.find("vscale_theta") != std::string::npos) {
        for (size_t i = 0; i < t.size; ++i) params_[t.offset + i] = 0.0f;
      }
    }
    model_->ParamsFromHost(params_);
    tokens_.resize(B * T);
    targets_.resize(B * T);
    for (int i = 0; i < B * T; ++i) {
      tokens_[i] = static_cast<int32_t>(rng.Below(c_.vocab));
      targets_[i] = static_cast<int32_t>(rng.Below(c_.vocab));
    }
  }
  std::vector<double> Tensor(const std::string& name) const {
    const ParamTensor* t = model_->FindTensor(name);
    EXPECT_NE(t, nullptr) << name;
    if (t == nullptr) return {};
    return std::vector<double>(params_.begin() + t->offset, params_.begin() + t->offset + t->size);
  }

  // The mean token loss from the formulas of METRICS.md and ARMS.md in float64.
  double ReferenceLoss() const {
    const ModelConfig& c = c_;
    const int d = c.d_model, H = c.heads, KV = c.kv_heads, dh = c.head_dim, F = c.ffn, V = c.vocab;
    auto linear = [](const std::vector<double>& x, const std::vector<double>& W, int out, int in) {
      std::vector<double> y(out, 0.0);
      for (int o = 0; o < out; ++o) {
        for (int i = 0; i < in; ++i) y[o] += W[static_cast<size_t>(o) * in + i] * x[i];
      }
      return y;
    };
    auto rms = [&](const std::vector<double>& x, const std::vector<double>& gamma) {
      double ms = 0;
      for (double v : x) ms += v * v;
      const double r = 1.0 / std::sqrt(ms / x.size() + c.rms_eps);
      std::vector<double> y(x.size());
      for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * r * gamma[i];
      return y;
    };
    auto rope = [&](std::vector<double>& x, int heads, int t) {
      for (int h = 0; h < heads; ++h) {
        for (int i = 0; i < dh / 2; ++i) {
          const double angle = t * std::pow(c.rope_theta, -2.0 * i / dh);
          double& a = x[h * dh + i];
          double& b = x[h * dh + i + dh / 2];
          const double a0 = a, b0 = b;
          a = a0 * std::cos(angle) - b0 * std::sin(angle);
          b = b0 * std::cos(angle) + a0 * std::sin(angle);
        }
      }
    };
    const std::vector<double> embed = Tensor("model.embed_tokens.weight");
    double total = 0;
    for (int b = 0; b < B; ++b) {
      std::vector<std::vector<double>> h(T);
      for (int t = 0; t < T; ++t) {
        h[t].assign(embed.begin() + static_cast<size_t>(tokens_[b * T + t]) * d,
                    embed.begin() + static_cast<size_t>(tokens_[b * T + t] + 1) * d);
      }
      for (int l = 0; l < c.layers; ++l) {
        const std::string p = "model.layers." + std::to_string(l) + ".";
        const auto wq = Tensor(p + "self_attn.q_proj.weight"), wk = Tensor(p + "self_attn.k_proj.weight"),
                   wv = Tensor(p + "self_attn.v_proj.weight"), wo = Tensor(p + "self_attn.o_proj.weight"),
                   g_attn = Tensor(p + "input_layernorm.weight"), g_mlp = Tensor(p + "post_attention_layernorm.weight"),
                   theta = Tensor(p + "self_attn.vscale_theta");
        std::vector<double> sinks(H, 0.0), wg;
        if (c.attention == AttentionKind::kSinkLogit) sinks = Tensor(p + "self_attn.sinks");
        if (c.gate == GateKind::kValue) wg = Tensor(p + "self_attn.value_gate.weight");
        if (c.gate == GateKind::kOutput || c.gate == GateKind::kHead) wg = Tensor(p + "self_attn.output_gate.weight");
        std::vector<std::vector<double>> xn(T), q(T), k(T), v(T);
        for (int t = 0; t < T; ++t) {
          xn[t] = rms(h[t], g_attn);
          q[t] = linear(xn[t], wq, H * dh, d);
          k[t] = linear(xn[t], wk, KV * dh, d);
          v[t] = linear(xn[t], wv, KV * dh, d);
          rope(q[t], H, t);
          rope(k[t], KV, t);
          for (int g = 0; g < KV; ++g) {
            if (c.vscale == VScaleMode::kVScale) {  // v̂ = φ(‖v‖²)·v
              double r = 0;
              for (int i = 0; i < dh; ++i) r += v[t][g * dh + i] * v[t][g * dh + i];
              const double C = d * dh * c.VScaleSigma() * c.VScaleSigma() * std::exp(theta[g]);
              for (int i = 0; i < dh; ++i) v[t][g * dh + i] *= r / (r + C);
            }
          }
          if (c.gate == GateKind::kValue) {  // v' = v ⊙ σ(x̃ W_gᵀ)
            const auto gl = linear(xn[t], wg, KV * dh, d);
            for (int i = 0; i < KV * dh; ++i) v[t][i] *= Sigmoid(gl[i]);
          }
        }
        for (int t = 0; t < T; ++t) {
          std::vector<double> y(H * dh, 0.0);
          for (int hh = 0; hh < H; ++hh) {
            const int g = hh / (H / KV);
            std::vector<double> z(t + 1);
            for (int u = 0; u <= t; ++u) {
              double dot = 0;
              for (int i = 0; i < dh; ++i) dot += q[t][hh * dh + i] * k[u][g * dh + i];
              z[u] = dot / std::sqrt(static_cast<double>(dh));
            }
            double unassigned = 0;
            const auto a = ReferenceRow(z, c.attention, sinks[hh], c.sigmoid_bias, c.softpick_eps, &unassigned);
            for (int u = 0; u <= t; ++u) {
              for (int i = 0; i < dh; ++i) y[hh * dh + i] += a[u] * v[u][g * dh + i];
            }
          }
          if (c.gate == GateKind::kOutput) {
            const auto gl = linear(xn[t], wg, H * dh, d);
            for (int i = 0; i < H * dh; ++i) y[i] *= Sigmoid(gl[i]);
          } else if (c.gate == GateKind::kHead) {
            const auto gl = linear(xn[t], wg, H, d);
            for (int i = 0; i < H * dh; ++i) y[i] *= Sigmoid(gl[i / dh]);
          }
          const auto r_attn = linear(y, wo, d, H * dh);
          for (int i = 0; i < d; ++i) h[t][i] += r_attn[i];
        }
        const auto w_gate = Tensor(p + "mlp.gate_proj.weight"), w_up = Tensor(p + "mlp.up_proj.weight"),
                   w_down = Tensor(p + "mlp.down_proj.weight");
        for (int t = 0; t < T; ++t) {
          const auto xm = rms(h[t], g_mlp);
          auto gate = linear(xm, w_gate, F, d);
          const auto up = linear(xm, w_up, F, d);
          for (int i = 0; i < F; ++i) gate[i] = gate[i] * Sigmoid(gate[i]) * up[i];
          const auto r_mlp = linear(gate, w_down, d, F);
          for (int i = 0; i < d; ++i) h[t][i] += r_mlp[i];
        }
      }
      const auto head = Tensor("lm_head.weight"), gf = Tensor("model.norm.weight");
      for (int t = 0; t < T; ++t) {
        const auto logits = linear(rms(h[t], gf), head, V, d);
        double m = -INFINITY, s = 0;
        for (double z : logits) m = std::max(m, z);
        for (double z : logits) s += std::exp(z - m);
        total += m + std::log(s) - logits[targets_[b * T + t]];
      }
    }
    return total / (B * T);
  }

  static constexpr int B = 2, T = 6;
  std::unique_ptr<Backend> backend_ = MakeCpuBackend();
  ModelConfig c_;
  std::unique_ptr<Model> model_;
  std::vector<float> params_;
  std::vector<int32_t> tokens_, targets_;
};

TEST_P(ModelArmTest, ForwardMatchesFloat64BruteForce) {
  const double loss = model_->Evaluate(tokens_.data(), targets_.data(), B, T);
  const double ref = ReferenceLoss();
  EXPECT_NEAR(loss, ref, 2e-5 * std::abs(ref)) << GetParam().name;
}

TEST_P(ModelArmTest, EveryTensorAgainstFiniteDifferences) {
  model_->ZeroGrad();
  model_->ForwardBackward(tokens_.data(), targets_.data(), B, T, 1.0f / (B * T));
  const std::vector<float> grads = model_->GradsToHost();
  // Differences of the float64 forward (ReferenceLoss, itself held to the model above):
  // no fp32 rounding in the quotient, so a step small enough to stay off softpick's kinks
  // at z = 0 (ReLU and |·|) still resolves the gradient.
  const double step = 1e-4;
  int checked_new = 0;
  for (const ParamTensor& t : model_->tensors()) {
    if (!t.trainable) continue;
    checked_new += t.name.find("sinks") != std::string::npos || t.name.find("_gate.weight") != std::string::npos;
    std::vector<float> x(params_.begin() + t.offset, params_.begin() + t.offset + t.size);
    std::vector<float> analytic(grads.begin() + t.offset, grads.begin() + t.offset + t.size);
    const std::vector<float> saved = params_;
    auto loss = [&] {
      std::copy(x.begin(), x.end(), params_.begin() + t.offset);
      return ReferenceLoss();
    };
    ExpectGradientMatches(t.name, x, analytic, loss, step, 2e-3);
    params_ = saved;
  }
  const bool has_new = c_.attention == AttentionKind::kSinkLogit || c_.gate != GateKind::kNone;
  EXPECT_EQ(checked_new, has_new ? c_.layers : 0) << "every layer's new parameter is checked";
}

INSTANTIATE_TEST_SUITE_P(Arms, ModelArmTest, ::testing::ValuesIn(kModelArms),
                         [](const auto& info) { return std::string(info.param.name); });

// Forwards to the probe collector and keeps a copy of what the arms hand it.
class Recorder final : public PassObserver {
 public:
  explicit Recorder(PassObserver* inner) : inner_(inner) {}
  void OnBlockForward(int layer, const BlockActivations& x, int B, int T) override {
    const ModelConfig& c = config;
    if (x.att != nullptr) {
      att[layer].assign(x.att, x.att + static_cast<size_t>(B) * c.heads * T * T);
      unassigned[layer].assign(x.unassigned, x.unassigned + static_cast<size_t>(B) * c.heads * T);
    }
    if (x.gate_logits != nullptr) {
      gate_logits[layer].assign(x.gate_logits, x.gate_logits + static_cast<size_t>(B) * T * c.GateRows());
    }
    inner_->OnBlockForward(layer, x, B, T);
  }
  void OnGradient(int layer, Site site, const float* g, const float* down, int B, int T) override {
    inner_->OnGradient(layer, site, g, down, B, T);
  }
  ModelConfig config;
  std::map<int, std::vector<float>> att, unassigned, gate_logits;

 private:
  PassObserver* inner_;
};

// The probes of every arm against the definitions, recomputed in float64 from the A,
// unassigned mass and gate logits the pass produced: α_s, M_s, S_s, the sink rate, the
// unassigned mass and the gate statistics; R_GS is finite for every arm.
TEST_P(ModelArmTest, ProbesFollowTheDefinitionsOnTheArmsWeights) {
  ProbeSettings st;
  st.sink_position = 0;
  st.ref_span = T - 1;
  st.profile_len = T;
  st.t_eps = 4;
  st.eps = 0.3;
  ProbeCollector collector(*model_, st, T);
  Recorder rec(&collector);
  rec.config = c_;
  model_->ZeroGrad();
  const double loss = model_->ForwardBackward(tokens_.data(), targets_.data(), B, T, 1.0f / (B * T), &rec);
  const ProbeReport r = collector.Finish(1, loss);
  const int H = c_.heads, s = st.sink_position, window = std::min(st.t_eps, T - s);
  for (int l = 0; l < c_.layers; ++l) {
    const LayerProbe& lp = r.layers[l];
    EXPECT_TRUE(std::isfinite(lp.r_gs)) << "layer " << l;
    EXPECT_GT(lp.r_gs, 0.0);
    const bool arm_attention = c_.attention != AttentionKind::kSoftmax;
    ASSERT_EQ(lp.unassigned_mass.size(), arm_attention ? static_cast<size_t>(H) : 0u);
    if (arm_attention) {
      const std::vector<float>& a = rec.att.at(l);
      int sinks = 0;
      for (int h = 0; h < H; ++h) {
        double alpha = 0, mass = 0, second = 0, un = 0;
        for (int b = 0; b < B; ++b) {
          const size_t bh = static_cast<size_t>(b) * H + h;
          for (int t = s; t < T; ++t) {
            const double v = a[(bh * T + t) * T + s];
            mass += v / B;
            second += v * v / B;
            if (t < s + window) alpha += v / (window * B);
          }
          for (int t = 0; t < T; ++t) un += static_cast<double>(rec.unassigned.at(l)[bh * T + t]) / (T * B);
        }
        EXPECT_NEAR(lp.alpha[h], alpha, 1e-12) << "layer " << l << " head " << h;
        EXPECT_NEAR(lp.column_mass[h], mass, 1e-12);
        EXPECT_NEAR(lp.column_second_moment[h], second, 1e-12);
        EXPECT_NEAR(lp.unassigned_mass[h], un, 1e-12);
        sinks += alpha > st.eps;
      }
      EXPECT_DOUBLE_EQ(lp.sink_rate, static_cast<double>(sinks) / H);
    }
    const int groups = c_.gate == GateKind::kNone ? 0 : c_.gate == GateKind::kValue ? c_.kv_heads : H;
    ASSERT_EQ(lp.gate_mean.size(), static_cast<size_t>(groups));
    for (int g = 0; g < groups; ++g) {
      const int G = c_.GateRows(), per = G / groups;
      double mean = 0, sink = 0, rest = 0;
      for (int b = 0; b < B; ++b) {
        for (int t = 0; t < T; ++t) {
          for (int j = 0; j < per; ++j) {
            const double v = Sigmoid(rec.gate_logits.at(l)[(static_cast<size_t>(b) * T + t) * G + g * per + j]);
            mean += v / (B * T * per);
            if (t == s) sink += v / (B * per);
            if (t >= 1) rest += v / (B * per * (T - 1));  // tokens 1…min(15, T−1), T = 6
          }
        }
      }
      EXPECT_NEAR(lp.gate_mean[g], mean, 1e-12);
      EXPECT_NEAR(lp.gate_sink[g], sink, 1e-12);
      EXPECT_NEAR(lp.gate_rest[g], rest, 1e-12);
    }
  }
}

TEST(ModelArmParamsTest, NamesShapesAndInitialisation) {
  auto be = MakeCpuBackend();
  ModelArm sink{"sink_logit", AttentionKind::kSinkLogit, GateKind::kNone, VScaleMode::kNone};
  ModelConfig c = TinyArmModel(sink);
  c.sink_logit_init = -2.5;
  auto m = Model::Create(c, be.get());
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  (*m)->InitWeights(3);
  const ParamTensor* s = (*m)->FindTensor("model.layers.1.self_attn.sinks");
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->shape, (std::vector<int64_t>{c.heads}));
  EXPECT_FALSE(s->weight_decay);
  for (float x : (*m)->TensorToHost(*s)) EXPECT_EQ(x, -2.5f);
  EXPECT_EQ((*m)->num_params(), static_cast<size_t>(c.ParameterCount()));

  const std::map<GateKind, std::pair<std::string, int64_t>> gates = {
      {GateKind::kOutput, {"output_gate", c.heads * c.head_dim}},
      {GateKind::kHead, {"output_gate", c.heads}},
      {GateKind::kValue, {"value_gate", c.kv_heads * c.head_dim}}};
  for (const auto& [kind, expect] : gates) {
    ModelConfig gc = TinyArmModel({"gate", AttentionKind::kSoftmax, kind, VScaleMode::kNone});
    auto gm = Model::Create(gc, be.get());
    ASSERT_TRUE(gm.ok()) << gm.status().ToString();
    const ParamTensor* w = (*gm)->FindTensor("model.layers.0.self_attn." + expect.first + ".weight");
    ASSERT_NE(w, nullptr) << expect.first;
    EXPECT_EQ(w->shape, (std::vector<int64_t>{expect.second, gc.d_model}));
    EXPECT_TRUE(w->weight_decay);
    EXPECT_EQ((*gm)->num_params(), static_cast<size_t>(gc.ParameterCount()));
    EXPECT_EQ((*gm)->FindTensor("model.layers.0.self_attn.sinks"), nullptr);
  }
  // softmax_plus_one has no parameter: s_h is the constant 0.
  ModelConfig p1 = TinyArmModel({"p1", AttentionKind::kSoftmaxPlusOne, GateKind::kNone, VScaleMode::kNone});
  auto pm = Model::Create(p1, be.get());
  ASSERT_TRUE(pm.ok());
  EXPECT_EQ((*pm)->FindTensor("model.layers.0.self_attn.sinks"), nullptr);
}

TEST(ModelArmRefusalTest, RangesCombinationsAndBackends) {
  ModelConfig c = TinyArmModel({"x", AttentionKind::kSinkLogit, GateKind::kNone, VScaleMode::kNone});
  ASSERT_TRUE(c.Validate().ok());
  auto refused = [](const ModelConfig& bad, const std::string& needle) {
    const Status s = bad.Validate();
    EXPECT_FALSE(s.ok()) << needle;
    EXPECT_NE(s.message().find(needle), std::string::npos) << s.message();
  };
  ModelConfig bad = c;
  bad.sink_logit_init = 21;
  refused(bad, "model.sink_logit_init");
  bad = c;
  bad.sigmoid_bias = NAN;
  refused(bad, "model.sigmoid_bias");
  bad = c;
  bad.softpick_eps = 0;
  refused(bad, "model.softpick_eps");
  bad = TinyArmModel({"x", AttentionKind::kSoftmax, GateKind::kValue, VScaleMode::kVScale});
  refused(bad, "gated_value");
  bad = TinyArmModel({"x", AttentionKind::kSigmoid, GateKind::kNone, VScaleMode::kBackwardOnly});
  refused(bad, "vscale_backward_only");
  // A backend without the arms (the CPU bf16 mode) refuses, naming the backend.
  auto bf16 = MakeCpuBf16Backend();
  EXPECT_FALSE(bf16->Supports(OptionalOp::kAttentionArms));
  auto m = Model::Create(c, bf16.get());
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("does not implement them"), std::string::npos) << m.status().message();
  auto cpu = MakeCpuBackend();
  auto probing16 = Model::Create(c, cpu.get(), {.training = false, .matrices = WeightDtype::kBF16});
  EXPECT_FALSE(probing16.ok());
}

}  // namespace
}  // namespace sinkscope

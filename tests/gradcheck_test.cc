// Finite-difference checks of every op of the CPU backend and of the whole model for
// every arm, θ included. Each op case: random inputs, a random projection w of the
// output as the loss (L = Σ w ⊙ out), the op's backward against central differences.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "engine/backend.h"
#include "engine/model.h"
#include "base/rng.h"

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

// Compares an analytic gradient with central differences of `loss` with respect to
// `x`. The error is normalised by the largest gradient entry; NaN never passes.
void ExpectGradientMatches(const char* what, std::vector<float>& x, const std::vector<float>& analytic,
                           const std::function<double()>& loss, double step = 1e-2, double tolerance = 2e-3) {
  ASSERT_EQ(x.size(), analytic.size());
  double scale = 1e-12, worst = 0;
  for (float g : analytic) scale = std::max(scale, static_cast<double>(std::abs(g)));
  for (size_t i = 0; i < x.size(); ++i) {
    const float saved = x[i];
    x[i] = saved + static_cast<float>(step);
    const double up = loss();
    x[i] = saved - static_cast<float>(step);
    const double down = loss();
    x[i] = saved;
    const double fd = (up - down) / (2 * step);
    const double err = std::abs(fd - analytic[i]) / scale;
    ASSERT_TRUE(std::isfinite(err)) << what << "[" << i << "]";
    worst = std::max(worst, err);
  }
  EXPECT_LT(worst, tolerance) << what << ": worst normalised error over " << x.size() << " entries";
}

class OpGradTest : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be_ = MakeCpuBackend();
  Rng rng_{1234};
};

TEST_F(OpGradTest, RmsNorm) {
  const int N = 3, d = 8;
  auto x = RandomVector(N * d, rng_), gamma = RandomVector(d, rng_), w = RandomVector(N * d, rng_);
  std::vector<float> out(N * d), rstd(N);
  auto loss = [&] {
    be_->RmsNormForward(out.data(), rstd.data(), x.data(), gamma.data(), N, d, 1e-5f);
    return Dot(out, w);
  };
  loss();
  std::vector<float> dx(N * d, 0.0f), dgamma(d, 0.0f);
  be_->RmsNormBackward(dx.data(), dgamma.data(), w.data(), x.data(), gamma.data(), rstd.data(), N, d);
  ExpectGradientMatches("rmsnorm dx", x, dx, loss);
  ExpectGradientMatches("rmsnorm dgamma", gamma, dgamma, loss);
}

TEST_F(OpGradTest, Rope) {
  const int B = 2, T = 5, heads = 2, dh = 8;
  // Default RoPE and YaRN (its attention factor scales the rotation: not orthogonal).
  ModelConfig yarn;
  yarn.head_dim = dh;
  yarn.rope_scaling.type = RopeType::kYarn;
  yarn.rope_scaling.factor = 4.0;
  for (const RotaryFrequencies& rope : {ModelConfig{}.Rotary(), yarn.Rotary()}) {
    auto x = RandomVector(B * T * heads * dh, rng_), w = RandomVector(x.size(), rng_);
    auto loss = [&] {
      std::vector<float> y = x;
      be_->RopeForward(y.data(), B, T, heads, dh, rope);
      return Dot(y, w);
    };
    std::vector<float> dx = w;
    be_->RopeBackward(dx.data(), B, T, heads, dh, rope);
    ExpectGradientMatches("rope dx", x, dx, loss);
  }
}

TEST_F(OpGradTest, AttentionWithGqa) {
  const int B = 2, T = 6, H = 4, KV = 2, dh = 4;
  auto q = RandomVector(B * T * H * dh, rng_), k = RandomVector(B * T * KV * dh, rng_),
       v = RandomVector(B * T * KV * dh, rng_), w = RandomVector(B * T * H * dh, rng_);
  std::vector<float> y(w.size()), lse(B * H * T), ws(be_->AttentionWorkspaceFloats(B, T, H));
  auto loss = [&] {
    be_->AttentionForward(y.data(), lse.data(), ws.data(), q.data(), k.data(), v.data(), B, T, H, KV, dh);
    return Dot(y, w);
  };
  loss();
  std::vector<float> dq(q.size()), dk(k.size()), dv(v.size());
  be_->AttentionBackward(dq.data(), dk.data(), dv.data(), w.data(), y.data(), lse.data(), ws.data(), q.data(),
                         k.data(), v.data(), B, T, H, KV, dh);
  ExpectGradientMatches("attention dq", q, dq, loss);
  ExpectGradientMatches("attention dk", k, dk, loss);
  ExpectGradientMatches("attention dv", v, dv, loss);
  // Proposition 4: the first query only sees itself, so ∂L/∂q_0 = 0 exactly.
  for (int b = 0; b < B; ++b) {
    for (int i = 0; i < H * dh; ++i) EXPECT_EQ(dq[(b * T + 0) * H * dh + i], 0.0f);
  }
}

TEST_F(OpGradTest, VScaleIncludingTheta) {
  const int N = 5, KV = 2, dh = 4;
  const double c_base = 0.5;
  auto v = RandomVector(N * KV * dh, rng_, 0.7), theta = RandomVector(KV, rng_, 0.5),
       w = RandomVector(N * KV * dh, rng_);
  std::vector<float> vhat(v.size());
  auto loss = [&] {
    be_->VScaleForward(vhat.data(), v.data(), theta.data(), N, KV, dh, c_base, VScaleMode::kVScale);
    return Dot(vhat, w);
  };
  std::vector<float> dv(v.size()), dtheta(KV, 0.0f);
  be_->VScaleBackward(dv.data(), dtheta.data(), w.data(), v.data(), theta.data(), N, KV, dh, c_base,
                      VScaleMode::kVScale);
  ExpectGradientMatches("vscale dv", v, dv, loss, 1e-3);
  ExpectGradientMatches("vscale dtheta", theta, dtheta, loss, 1e-3);
}

TEST_F(OpGradTest, VScaleBackwardOnlyIsIdentityForwardAndVScaleJacobianAtThetaZero) {
  const int N = 4, KV = 2, dh = 4;
  auto v = RandomVector(N * KV * dh, rng_), g = RandomVector(N * KV * dh, rng_), theta = RandomVector(KV, rng_);
  std::vector<float> vhat(v.size()), zero_theta(KV, 0.0f);
  be_->VScaleForward(vhat.data(), v.data(), theta.data(), N, KV, dh, 0.3, VScaleMode::kBackwardOnly);
  EXPECT_EQ(vhat, v);
  std::vector<float> dv_control(v.size()), dv_vscale(v.size());
  be_->VScaleBackward(dv_control.data(), nullptr, g.data(), v.data(), theta.data(), N, KV, dh, 0.3,
                      VScaleMode::kBackwardOnly);
  be_->VScaleBackward(dv_vscale.data(), nullptr, g.data(), v.data(), zero_theta.data(), N, KV, dh, 0.3,
                      VScaleMode::kVScale);
  EXPECT_EQ(dv_control, dv_vscale);
}

TEST_F(OpGradTest, SwiGlu) {
  const int N = 3, F = 6;
  auto gate = RandomVector(N * F, rng_), up = RandomVector(N * F, rng_), w = RandomVector(N * F, rng_);
  std::vector<float> h(N * F);
  auto loss = [&] {
    be_->SwiGluForward(h.data(), gate.data(), up.data(), N, F);
    return Dot(h, w);
  };
  std::vector<float> dgate(N * F), dup(N * F);
  be_->SwiGluBackward(dgate.data(), dup.data(), w.data(), gate.data(), up.data(), N, F);
  ExpectGradientMatches("swiglu dgate", gate, dgate, loss);
  ExpectGradientMatches("swiglu dup", up, dup, loss);
}

TEST_F(OpGradTest, CrossEntropy) {
  const int N = 4, V = 7;
  auto logits = RandomVector(N * V, rng_);
  std::vector<int32_t> targets = {0, 3, 6, 2};
  auto loss = [&] {
    double acc = 0;
    be_->CrossEntropyLoss(logits.data(), targets.data(), N, V, &acc);
    return acc;
  };
  std::vector<float> grad = logits;
  double fused = 0;
  be_->CrossEntropyForwardBackward(grad.data(), targets.data(), N, V, 1.0f, &fused);
  EXPECT_NEAR(fused, loss(), 1e-9);
  ExpectGradientMatches("cross-entropy dlogits", logits, grad, loss);
}

TEST_F(OpGradTest, EmbeddingAndGemm) {
  const int N = 4, d = 3, V = 5;
  auto table = RandomVector(V * d, rng_), w = RandomVector(N * d, rng_);
  std::vector<int32_t> tokens = {1, 4, 1, 0};
  std::vector<float> out(N * d);
  auto loss = [&] {
    be_->EmbeddingForward(out.data(), tokens.data(), table.data(), N, d);
    return Dot(out, w);
  };
  std::vector<float> dtable(V * d, 0.0f);
  be_->EmbeddingBackward(dtable.data(), w.data(), tokens.data(), N, d);
  ExpectGradientMatches("embedding dtable", table, dtable, loss);

  // out(N,O) = x(N,I)·Wᵀ; ∂/∂x = dout·W, ∂/∂W = doutᵀ·x.
  const int I = 3, O = 2;
  auto x = RandomVector(N * I, rng_), W = RandomVector(O * I, rng_), wo = RandomVector(N * O, rng_);
  std::vector<float> y(N * O);
  auto lin = [&] {
    be_->Gemm(false, true, N, O, I, 1.0f, x.data(), W.data(), 0.0f, y.data());
    return Dot(y, wo);
  };
  std::vector<float> dx(N * I), dW(O * I, 0.0f);
  be_->Gemm(false, false, N, I, O, 1.0f, wo.data(), W.data(), 0.0f, dx.data());
  be_->Gemm(true, false, O, I, N, 1.0f, wo.data(), x.data(), 1.0f, dW.data());
  ExpectGradientMatches("gemm dx", x, dx, lin);
  ExpectGradientMatches("gemm dW", W, dW, lin);
}

// The whole model: gradients of the mean token loss against central differences of
// the loss, on a small model with a large init so the loss responds well above fp32
// rounding. GQA, untied and tied heads.
struct ModelCase {
  VScaleMode mode;
  bool tied;
  bool attention_bias = false;  // Qwen2
  bool qk_norm = false;         // Qwen3
};

class ModelGradTest : public ::testing::TestWithParam<ModelCase> {};

TEST_P(ModelGradTest, EveryTensorAgainstFiniteDifferences) {
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
  c.vscale_sigma = 0.4;  // keeps C comparable to ‖v‖² at this init
  c.tied_embeddings = GetParam().tied;
  c.vscale = GetParam().mode;
  c.attention_bias = GetParam().attention_bias;
  c.qk_norm = GetParam().qk_norm;
  auto backend = MakeCpuBackend();
  auto model_or = Model::Create(c, backend.get());
  ASSERT_TRUE(model_or.ok()) << model_or.status().ToString();
  Model& model = **model_or;
  model.InitWeights(7);
  std::vector<float> params = model.ParamsToHost();
  Rng rng(99);
  for (const ParamTensor& t : model.tensors()) {  // non-trivial norms and θ
    if (t.shape.size() == 1) {
      for (size_t i = 0; i < t.size; ++i) params[t.offset + i] += static_cast<float>(0.3 * rng.Normal());
    }
  }
  if (c.vscale != VScaleMode::kVScale) {  // θ is unused (baseline) or frozen at 0 (control)
    for (const ParamTensor& t : model.tensors()) {
      if (t.name.find("vscale_theta") != std::string::npos) {
        for (size_t i = 0; i < t.size; ++i) params[t.offset + i] = 0.0f;
      }
    }
  }
  model.ParamsFromHost(params);
  const int B = 2, T = 6;
  std::vector<int32_t> tokens(B * T), targets(B * T);
  for (int i = 0; i < B * T; ++i) {
    tokens[i] = static_cast<int32_t>(rng.Below(c.vocab));
    targets[i] = static_cast<int32_t>(rng.Below(c.vocab));
  }
  model.ZeroGrad();
  model.ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T));
  const std::vector<float> grads = model.GradsToHost();

  for (const ParamTensor& t : model.tensors()) {
    if (!t.trainable) continue;
    // The control arm's backward is not the gradient of its forward by design: only
    // tensors whose gradient never passes a value path (the head, the final norm, the
    // last block's MLP and output projection) can be checked against differences.
    if (c.vscale == VScaleMode::kBackwardOnly) {
      const std::string last = "model.layers." + std::to_string(c.layers - 1) + ".";
      const bool downstream = t.name == "lm_head.weight" || t.name == "model.norm.weight" ||
                              t.name == last + "mlp.down_proj.weight" || t.name == last + "mlp.up_proj.weight" ||
                              t.name == last + "mlp.gate_proj.weight" ||
                              t.name == last + "post_attention_layernorm.weight" ||
                              t.name == last + "self_attn.o_proj.weight";
      if (!downstream) continue;
    }
    std::vector<float> x(params.begin() + t.offset, params.begin() + t.offset + t.size);
    std::vector<float> analytic(grads.begin() + t.offset, grads.begin() + t.offset + t.size);
    auto loss = [&] {
      std::vector<float> p = params;
      std::copy(x.begin(), x.end(), p.begin() + t.offset);
      model.ParamsFromHost(p);
      return model.Evaluate(tokens.data(), targets.data(), B, T);
    };
    ExpectGradientMatches(t.name.c_str(), x, analytic, loss, 3e-3, 5e-3);
  }
}

INSTANTIATE_TEST_SUITE_P(Arms, ModelGradTest,
                         ::testing::Values(ModelCase{VScaleMode::kNone, false}, ModelCase{VScaleMode::kVScale, false},
                                           ModelCase{VScaleMode::kBackwardOnly, false},
                                           ModelCase{VScaleMode::kNone, true}, ModelCase{VScaleMode::kVScale, true},
                                           ModelCase{VScaleMode::kNone, false, /*attention_bias=*/true, false},
                                           ModelCase{VScaleMode::kNone, false, false, /*qk_norm=*/true},
                                           ModelCase{VScaleMode::kVScale, false, false, /*qk_norm=*/true}),
                         [](const auto& info) {
                           return std::string(VScaleModeName(info.param.mode)) + (info.param.tied ? "_tied" : "") +
                                  (info.param.attention_bias ? "_qkv_bias" : "") +
                                  (info.param.qk_norm ? "_qk_norm" : "");
                         });

}  // namespace
}  // namespace sinkscope

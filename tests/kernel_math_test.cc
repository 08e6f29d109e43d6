// The per-element math the CUDA kernels share with the host (engine/cuda/kernel_math.h),
// run on the CPU and held to the CPU backend's ops: each test composes the kmath functions
// the way the kernel does (one element, one row or one tensor at a time, as its loop does)
// and compares with the same op of MakeCpuBackend() on the same random inputs. A wrong
// formula in a kernel is caught here, without a GPU. Built wherever the engine is: the
// header needs no CUDA toolkit.
//
// Tolerance: the CPU backend and kmath evaluate the same formula with different exp
// implementations or summation orders, so a few float roundings apart: 1e-6 normalised
// error (max |got − want| / max(max |want|, 1e-3)); AdamW and the clip scale exactly.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "base/rng.h"
#include "engine/backend.h"
#include "engine/config.h"
#include "engine/cuda/kernel_math.h"

namespace sinkscope {
namespace {

constexpr double kTol = 1e-6;

std::vector<float> Random(size_t n, Rng& rng, double scale = 1.0) {
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(scale * rng.Normal());
  return v;
}

double NormError(const std::vector<float>& got, const std::vector<float>& want) {
  EXPECT_EQ(got.size(), want.size());
  double err = 0, scale = 1e-3;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    if (!std::isfinite(got[i]) || !std::isfinite(want[i])) return INFINITY;
    err = std::max(err, std::abs(static_cast<double>(got[i]) - want[i]));
    scale = std::max(scale, std::abs(static_cast<double>(want[i])));
  }
  return err / scale;
}

// The CPU backend works on host pointers: its "device" buffers are plain memory.
class KernelMathTest : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> cpu_ = MakeCpuBackend();
  Rng rng_{0x6B4D47ull};
  float* Upload(const std::vector<float>& h) {
    float* p = cpu_->Alloc(h.size());
    cpu_->ToDevice(p, h.data(), h.size() * sizeof(float));
    owned_.push_back(p);
    return p;
  }
  float* Zeros(size_t n) {
    float* p = cpu_->Alloc(n);
    owned_.push_back(p);
    return p;
  }
  std::vector<float> Get(const float* p, size_t n) {
    std::vector<float> h(n);
    cpu_->ToHost(h.data(), p, n * sizeof(float));
    return h;
  }
  void TearDown() override {
    for (float* p : owned_) cpu_->Free(p);
  }
  std::vector<float*> owned_;
};

TEST_F(KernelMathTest, SwiGluForwardAndBackward) {
  const int N = 7, F = 33;
  const size_t n = static_cast<size_t>(N) * F;
  auto gate = Random(n, rng_, 3.0), up = Random(n, rng_), dh = Random(n, rng_);
  gate[0] = -30.0f;  // saturated σ
  gate[1] = 30.0f;
  std::vector<float> h(n), dgate(n), dup(n);
  for (size_t i = 0; i < n; ++i) {
    h[i] = kmath::SwiGlu(gate[i], up[i]);
    kmath::SwiGluGrad(dh[i], gate[i], up[i], &dgate[i], &dup[i]);
  }
  float *g = Upload(gate), *u = Upload(up), *d = Upload(dh), *out = Zeros(n), *dg = Zeros(n), *du = Zeros(n);
  cpu_->SwiGluForward(out, g, u, N, F);
  cpu_->SwiGluBackward(dg, du, d, g, u, N, F);
  EXPECT_LE(NormError(h, Get(out, n)), kTol);
  EXPECT_LE(NormError(dgate, Get(dg, n)), kTol);
  EXPECT_LE(NormError(dup, Get(du, n)), kTol);
}

// V-scale as vscale.cu composes it: per (row, KV head) r and v·ĝ in double, φ, the
// gradient coefficient and the row's θ term; θ summed over rows in order.
TEST_F(KernelMathTest, VScaleForwardBackwardAndTheta) {
  const int N = 9, KV = 3, dh = 16;
  const double c_base = 2.5;
  const size_t n = static_cast<size_t>(N) * KV * dh;
  auto v = Random(n, rng_), dvhat = Random(n, rng_), theta = Random(KV, rng_, 0.5);
  for (VScaleMode mode : {VScaleMode::kVScale, VScaleMode::kBackwardOnly}) {
    std::vector<float> vhat(n), dv(n), dtheta(KV, 0.25f);
    std::vector<double> row_theta(static_cast<size_t>(N) * KV);
    for (int i = 0; i < N; ++i) {
      for (int g = 0; g < KV; ++g) {
        const size_t o = (static_cast<size_t>(i) * KV + g) * dh;
        double r = 0, vg = 0;
        for (int c = 0; c < dh; ++c) {
          r += static_cast<double>(v[o + c]) * v[o + c];
          vg += static_cast<double>(v[o + c]) * dvhat[o + c];
        }
        const double C = mode == VScaleMode::kVScale ? kmath::VScaleC(c_base, theta[g]) : c_base;
        const float phi_f = static_cast<float>(kmath::VScalePhi(r, C));
        const double phi = kmath::VScalePhi(r, C), coef = kmath::VScaleGradCoef(r, C, vg);
        for (int c = 0; c < dh; ++c) {
          vhat[o + c] = mode == VScaleMode::kVScale ? phi_f * v[o + c] : v[o + c];
          dv[o + c] = static_cast<float>(phi * dvhat[o + c] + coef * v[o + c]);
        }
        row_theta[static_cast<size_t>(i) * KV + g] = kmath::VScaleThetaGrad(r, C, vg);
      }
    }
    if (mode == VScaleMode::kVScale) {
      for (int g = 0; g < KV; ++g) {
        double s = 0;
        for (int i = 0; i < N; ++i) s += row_theta[static_cast<size_t>(i) * KV + g];
        dtheta[g] += static_cast<float>(s);
      }
    }
    float *dv_in = Upload(v), *dg = Upload(dvhat), *th = Upload(theta), *out = Zeros(n), *ddv = Zeros(n),
          *dth = Upload(std::vector<float>(KV, 0.25f));
    cpu_->VScaleForward(out, dv_in, th, N, KV, dh, c_base, mode);
    cpu_->VScaleBackward(ddv, dth, dg, dv_in, th, N, KV, dh, c_base, mode);
    EXPECT_LE(NormError(vhat, Get(out, n)), kTol) << static_cast<int>(mode);
    EXPECT_LE(NormError(dv, Get(ddv, n)), kTol) << static_cast<int>(mode);
    EXPECT_LE(NormError(dtheta, Get(dth, KV)), kTol) << static_cast<int>(mode);
  }
}

// RoPE as rope.cu applies it: the (f·cos, ±f·sin) table entry per (t, j), computed in
// double as the backend's host code does, then RotatePair on (x_j, x_{j+dh/2}).
TEST_F(KernelMathTest, RopeForwardAndBackward) {
  const int B = 2, T = 11, heads = 3, dh = 8, half = dh / 2;
  ModelConfig config;
  config.d_model = heads * dh;
  config.heads = heads;
  config.kv_heads = heads;
  config.head_dim = dh;
  config.rope_theta = 500.0;
  const RotaryFrequencies rope = config.Rotary();
  ASSERT_EQ(static_cast<int>(rope.inv_freq.size()), half);
  const size_t n = static_cast<size_t>(B) * T * heads * dh;
  const auto x = Random(n, rng_);
  for (double sign : {1.0, -1.0}) {
    std::vector<float> want = x;
    for (int b = 0; b < B; ++b) {
      for (int t = 0; t < T; ++t) {
        for (int h = 0; h < heads; ++h) {
          float* p = want.data() + ((static_cast<size_t>(b) * T + t) * heads + h) * dh;
          for (int j = 0; j < half; ++j) {
            const double ang = static_cast<double>(t) * rope.inv_freq[j];
            const float c = static_cast<float>(rope.attention_factor * std::cos(ang));
            const float s = static_cast<float>(sign * rope.attention_factor * std::sin(ang));
            kmath::RotatePair(p[j], p[j + half], c, s, &p[j], &p[j + half]);
          }
        }
      }
    }
    float* dx = Upload(x);
    if (sign > 0) {
      cpu_->RopeForward(dx, B, T, heads, dh, rope);
    } else {
      cpu_->RopeBackward(dx, B, T, heads, dh, rope);
    }
    EXPECT_LE(NormError(want, Get(dx, n)), kTol) << sign;
  }
}

// RMSNorm as rmsnorm.cu: rstd from the row's Σx², the backward's coefficient from the
// row's Σ γ g x, one element at a time; dγ over rows in order.
TEST_F(KernelMathTest, RmsNormForwardAndBackward) {
  const int N = 6, d = 40;
  const float eps = 1e-5f;
  const size_t n = static_cast<size_t>(N) * d;
  auto x = Random(n, rng_, 2.0), gamma = Random(d, rng_), dout = Random(n, rng_), base = Random(n, rng_);
  std::vector<float> out(n), rstd(N), dx(n), dgamma(d, 0.5f);
  for (int i = 0; i < N; ++i) {
    const float* xi = x.data() + static_cast<size_t>(i) * d;
    float ss = 0, dot = 0;
    for (int c = 0; c < d; ++c) ss += xi[c] * xi[c];
    rstd[i] = kmath::RmsNormRstd(ss, d, eps);
    for (int c = 0; c < d; ++c) out[static_cast<size_t>(i) * d + c] = xi[c] * rstd[i] * gamma[c];
    for (int c = 0; c < d; ++c) dot += gamma[c] * dout[static_cast<size_t>(i) * d + c] * xi[c];
    const float coef = kmath::RmsNormBackwardCoef(rstd[i], dot, d);
    for (int c = 0; c < d; ++c) {
      const size_t o = static_cast<size_t>(i) * d + c;
      dx[o] = kmath::RmsNormBackwardElement(base[o], rstd[i], gamma[c], dout[o], coef, x[o]);
    }
  }
  for (int c = 0; c < d; ++c) {
    for (int i = 0; i < N; ++i) dgamma[c] += dout[static_cast<size_t>(i) * d + c] * x[static_cast<size_t>(i) * d + c] * rstd[i];
  }
  float *dxin = Upload(x), *g = Upload(gamma), *o = Zeros(n), *r = Zeros(N), *dd = Upload(dout), *ddx = Zeros(n),
        *ddg = Upload(std::vector<float>(d, 0.5f)), *db = Upload(base);
  cpu_->RmsNormForward(o, r, dxin, g, N, d, eps);
  // RmsNormBackwardResidual: dx = base + J_rmsᵀ dout, the kernel's `base` argument.
  cpu_->RmsNormBackwardResidual(ddx, ddg, db, dd, dxin, g, r, N, d);
  EXPECT_LE(NormError(rstd, Get(r, N)), kTol);
  EXPECT_LE(NormError(out, Get(o, n)), kTol);
  EXPECT_LE(NormError(dx, Get(ddx, n)), 4 * kTol);  // Σ γ g x over d = 40 terms in another order
  EXPECT_LE(NormError(dgamma, Get(ddg, d)), kTol);
}

// AdamW as adamw.cu: bias corrections once in double, then the element; the clip scale
// from the guard's ‖g‖². The CPU backend's loop is the same arithmetic: bit-identical.
TEST_F(KernelMathTest, AdamWAndTheClipScaleAreBitIdentical) {
  const size_t n = 257;
  auto p = Random(n, rng_), g = Random(n, rng_, 3.0), m = Random(n, rng_, 0.1), v = Random(n, rng_, 0.1);
  for (auto& e : v) e = e * e;
  const float lr = 3e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f;
  double sum_squares = 0;
  for (float e : g) sum_squares += static_cast<double>(e) * e;
  for (double clip : {0.0, 1.0, 1e6}) {
    const float scale = kmath::ClipScale(sum_squares, clip);
    const double norm = std::sqrt(sum_squares);
    EXPECT_EQ(scale, (clip > 0 && norm > clip) ? static_cast<float>(clip / norm) : 1.0f) << clip;
    for (int64_t step : {int64_t{1}, int64_t{7}, int64_t{1000}}) {
      std::vector<float> wp = p, wm = m, wv = v;
      const double bc1 = 1.0 - std::pow(static_cast<double>(b1), static_cast<double>(step));
      const double bc2 = 1.0 - std::pow(static_cast<double>(b2), static_cast<double>(step));
      for (size_t i = 0; i < n; ++i) kmath::AdamWElement(&wp[i], g[i] * scale, &wm[i], &wv[i], lr, b1, b2, eps, wd, bc1, bc2);
      float *dp = Upload(p), *dg = Upload(g), *dm = Upload(m), *dv = Upload(v);
      double* guard = cpu_->AllocScalars(2);
      const double host_guard[2] = {1.0, sum_squares};
      cpu_->ToDevice(guard, host_guard, sizeof host_guard);
      Backend::AdamWHyper hyper;
      hyper.lr = lr;
      hyper.beta1 = b1;
      hyper.beta2 = b2;
      hyper.eps = eps;
      hyper.grad_clip = clip;
      hyper.step = step;
      cpu_->MultiTensorAdamW({{dp, dm, dv, dg, n, wd}}, hyper, guard);
      cpu_->Free(guard);
      EXPECT_EQ(wp, Get(dp, n)) << clip << " " << step;
      EXPECT_EQ(wm, Get(dm, n)) << clip << " " << step;
      EXPECT_EQ(wv, Get(dv, n)) << clip << " " << step;
    }
  }
}

// The formulas against their definitions in double (backend.h): the derivative of SiLU
// and of V-scale by central differences, so both the CPU backend and the kernels could
// not share one wrong derivative unnoticed.
TEST(KernelMathDefinitions, DerivativesMatchCentralDifferences) {
  for (double g : {-6.0, -1.5, -0.2, 0.0, 0.3, 2.0, 7.0}) {
    const double h = 1e-3;
    const auto silu = [](double x) { return x / (1.0 + std::exp(-x)); };
    const double fd = (silu(g + h) - silu(g - h)) / (2 * h);
    EXPECT_NEAR(kmath::Silu(static_cast<float>(g)).grad, fd, 1e-5) << g;
    EXPECT_NEAR(kmath::Silu(static_cast<float>(g)).silu, silu(g), 1e-6 * std::max(1.0, std::abs(g))) << g;
  }
  // L(v, θ) = Σ_c ĝ_c φ(‖v‖², C(θ)) v_c: ∂L/∂v_c = φ ĝ_c + coef·v_c, ∂L/∂θ = ThetaGrad.
  const std::vector<double> v = {0.3, -1.2, 0.7, 2.0}, gh = {0.5, 0.1, -0.8, 0.25};
  const double c_base = 1.7, theta = 0.4;
  const auto loss = [&](const std::vector<double>& x, double th) {
    double r = 0, s = 0;
    for (double e : x) r += e * e;
    const double phi = kmath::VScalePhi(r, kmath::VScaleC(c_base, static_cast<float>(th)));
    for (size_t c = 0; c < x.size(); ++c) s += gh[c] * phi * x[c];
    return s;
  };
  double r = 0, vg = 0;
  for (size_t c = 0; c < v.size(); ++c) {
    r += v[c] * v[c];
    vg += v[c] * gh[c];
  }
  const double C = kmath::VScaleC(c_base, static_cast<float>(theta));
  const double phi = kmath::VScalePhi(r, C), coef = kmath::VScaleGradCoef(r, C, vg);
  const double h = 1e-6;
  for (size_t c = 0; c < v.size(); ++c) {
    auto up = v, down = v;
    up[c] += h;
    down[c] -= h;
    EXPECT_NEAR(phi * gh[c] + coef * v[c], (loss(up, theta) - loss(down, theta)) / (2 * h), 1e-7) << c;
  }
  // θ is read as a float by VScaleC: difference over a float-representable step.
  const float th_up = static_cast<float>(theta) + 1e-3f, th_down = static_cast<float>(theta) - 1e-3f;
  EXPECT_NEAR(kmath::VScaleThetaGrad(r, C, vg), (loss(v, th_up) - loss(v, th_down)) / (th_up - th_down), 1e-6);
}

}  // namespace
}  // namespace sinkscope

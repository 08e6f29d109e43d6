// The parity harness, in the spirit of ggml's test-backend-ops: every op of the Backend
// interface, on every backend this build has, on fresh random inputs, against a
// float64 reference written here from the formulas (METRICS.md, backend.h); and every
// block-level fused op against its composition of the same backend's primitives.
//
// Backends: "cpu" (the reference backend, with its own fused ops) and "cpu-composed"
// (the CPU primitives with every fused op left to Backend's default composition), and
// "cpu_bf16" (the CPU backend's bf16 mode). Built a second time as cuda_parity_test
// (SINKSCOPE_PARITY_CUDA): the same tests over "cuda" (the CUDA backend's fp32 mode on
// device 0) and "cuda_composed"; every one of them skips, saying why, where this process
// sees no CUDA device.
//
// Error: max |got − want| / max(max |want|, 1e-3) over the output, "normalised error";
// NaN or Inf in an output never passes. Tolerances (fp32): 2e-6 where an op is a few
// roundings per element; 2e-5 where it sums d or T float terms (norms, attention,
// GEMMs with k up to 96); fused vs composed 0 (bit-identical) unless said. A bf16 mode
// will add its own column here.
#include <gtest/gtest.h>

#include <cstring>
#include <limits>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/rng.h"
#include "engine/backend.h"
#include "engine/bf16.h"
#include "engine/forwarding_backend.h"
#include "engine/model.h"
#include "engine/optimizer.h"
#include "tests/small_model.h"
#ifdef SINKSCOPE_PARITY_CUDA
#include "tests/cuda_or_skip.h"
#endif

namespace sinkscope {
namespace {

// ---- backends ---------------------------------------------------------------------

// The fused ops as Backend's default composition over inner's primitives.
class ComposedBackend final : public ForwardingBackend {
 public:
  using ForwardingBackend::ForwardingBackend;
  const char* Name() const override { return "composed"; }
};

struct Factory {
  std::string name;
  // Null when this backend cannot be made here (no device): its tests skip with `why`.
  std::function<std::unique_ptr<Backend>(std::string* why)> make;
  bool bf16 = false;  // rounds to bf16 where a bf16 GPU backend stores bf16: bf16 tolerances
};
void PrintTo(const Factory& f, std::ostream* os) { *os << f.name; }
#ifndef SINKSCOPE_PARITY_CUDA
std::vector<Factory> Fp32Factories() {
  return {
      {"cpu", [](std::string*) { return MakeCpuBackend(); }},
      {"cpu_composed", [](std::string*) { return std::make_unique<ComposedBackend>(MakeCpuBackend()); }},
  };
}
std::vector<Factory> Factories() {
  std::vector<Factory> all = Fp32Factories();
  all.push_back({"cpu_bf16", [](std::string*) { return MakeCpuBf16Backend(); }, true});
  return all;
}
#else
std::vector<Factory> Fp32Factories() {
  return {
      {"cuda", [](std::string* why) { return MakeCudaOrSkipReason(why); }},
      {"cuda_composed",
       [](std::string* why) -> std::unique_ptr<Backend> {
         auto inner = MakeCudaOrSkipReason(why);
         if (inner == nullptr) return nullptr;
         return std::make_unique<ComposedBackend>(std::move(inner));
       }},
  };
}
// The CUDA backend has only its fp32 mode so far: a bf16 factory joins when it exists.
std::vector<Factory> Factories() { return Fp32Factories(); }
#endif

// ---- helpers ----------------------------------------------------------------------

std::vector<float> Random(size_t n, Rng& rng, double scale = 1.0) {
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(scale * rng.Normal());
  return v;
}

// A device copy of a host vector that comes back with Get().
class Dev {
 public:
  Dev(Backend& be, const std::vector<float>& host) : be_(be), n_(host.size()) {
    p_ = be.Alloc(n_);
    be.ToDevice(p_, host.data(), n_ * sizeof(float));
  }
  Dev(Backend& be, size_t n) : be_(be), n_(n) { p_ = be.Alloc(n); }
  ~Dev() { be_.Free(p_); }
  Dev(const Dev&) = delete;
  float* p() { return p_; }
  std::vector<float> Get() {
    std::vector<float> h(n_);
    be_.ToHost(h.data(), p_, n_ * sizeof(float));
    return h;
  }

 private:
  Backend& be_;
  size_t n_;
  float* p_;
};
class DevInt {
 public:
  DevInt(Backend& be, const std::vector<int32_t>& host) : be_(be) {
    p_ = be.AllocInt(host.size());
    be.ToDevice(p_, host.data(), host.size() * sizeof(int32_t));
  }
  ~DevInt() { be_.Free(p_); }
  int32_t* p() { return p_; }

 private:
  Backend& be_;
  int32_t* p_;
};
class DevScalars {
 public:
  DevScalars(Backend& be, size_t n) : be_(be), n_(n) { p_ = be.AllocScalars(n); }
  ~DevScalars() { be_.Free(p_); }
  double* p() { return p_; }
  std::vector<double> Get() {
    std::vector<double> h(n_);
    be_.ReadScalars(h.data(), p_, n_);
    return h;
  }

 private:
  Backend& be_;
  size_t n_;
  double* p_;
};

// Normalised error of got against want; NaN/Inf is +inf.
template <typename G, typename W>
double NormError(const std::vector<G>& got, const std::vector<W>& want) {
  EXPECT_EQ(got.size(), want.size());
  double err = 0, scale = 1e-3;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    if (!std::isfinite(static_cast<double>(got[i]))) return INFINITY;
    err = std::max(err, std::abs(static_cast<double>(got[i]) - static_cast<double>(want[i])));
    scale = std::max(scale, std::abs(static_cast<double>(want[i])));
  }
  return err / scale;
}
#define EXPECT_CLOSE(got, want, tol) EXPECT_LE(NormError(got, want), tol) << #got " vs " #want

constexpr double kFew = 2e-6;  // a few roundings per element
constexpr double kSum = 2e-5;  // sums of up to ~100 float terms per element
// bf16 mode: one rounding to bf16 is 2^-9 relative; an output rounded once, or computed
// from rounded operands, is within 8e-3; a GEMM or attention over rounded operands and
// then rounded, within 3e-2.
constexpr double kBf16Few = 8e-3;
constexpr double kBf16Sum = 3e-2;

class ParityTest : public ::testing::TestWithParam<Factory> {
 protected:
  void SetUp() override {
    std::string why;
    be_ = GetParam().make(&why);
    if (be_ == nullptr) GTEST_SKIP() << GetParam().name << ": " << why;
    few_ = GetParam().bf16 ? kBf16Few : kFew;
    sum_ = GetParam().bf16 ? kBf16Sum : kSum;
  }
  double few_ = kFew, sum_ = kSum;
  Backend& be() { return *be_; }
  std::unique_ptr<Backend> be_;
  Rng rng_{0xBAC4E4Dull};
};

// ---- float64 references -------------------------------------------------------------

std::vector<double> RefGemm(bool ta, bool tb, int m, int n, int k, double alpha, const std::vector<float>& a,
                            const std::vector<float>& b, double beta, const std::vector<float>& c) {
  std::vector<double> out(static_cast<size_t>(m) * n);
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      double s = 0;
      for (int p = 0; p < k; ++p) {
        const double av = ta ? a[static_cast<size_t>(p) * m + i] : a[static_cast<size_t>(i) * k + p];
        const double bv = tb ? b[static_cast<size_t>(j) * k + p] : b[static_cast<size_t>(p) * n + j];
        s += av * bv;
      }
      out[static_cast<size_t>(i) * n + j] = alpha * s + beta * c[static_cast<size_t>(i) * n + j];
    }
  }
  return out;
}

// ---- primitive ops ----------------------------------------------------------------

TEST_P(ParityTest, Gemm) {
  const int m = 7, n = 5, k = 96;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      auto a = Random(static_cast<size_t>(m) * k, rng_), b = Random(static_cast<size_t>(k) * n, rng_),
           c = Random(static_cast<size_t>(m) * n, rng_);
      Dev da(be(), a), db(be(), b), dc(be(), c);
      be().Gemm(ta, tb, m, n, k, 0.75f, da.p(), db.p(), 0.5f, dc.p());
      EXPECT_CLOSE(dc.Get(), RefGemm(ta, tb, m, n, k, 0.75, a, b, 0.5, c), sum_) << ta << tb;
    }
  }
}

TEST_P(ParityTest, ElementwiseAndReductions) {
  const int N = 9, n = 13;
  auto x = Random(static_cast<size_t>(N) * n, rng_), y = Random(x.size(), rng_), b = Random(n, rng_),
       acc = Random(n, rng_);
  Dev dx(be(), x), dy(be(), y), db(be(), b), dacc(be(), acc);
  be().Axpy(dy.p(), -0.5f, dx.p(), x.size());
  be().AddRowBias(dx.p(), db.p(), N, n);
  be().AccumulateColumnSums(dacc.p(), dx.p(), N, n);
  DevScalars ss(be(), 1);
  be().AccumulateSumSquares(ss.p(), dx.p(), x.size());
  be().AccumulateSumSquares(ss.p(), dx.p(), x.size());  // accumulates
  std::vector<double> want_y(y.size()), want_x(x.size()), want_acc(acc.begin(), acc.end());
  double want_ss = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    want_y[i] = y[i] - 0.5 * x[i];
    want_x[i] = static_cast<double>(x[i]) + b[i % n];
    want_acc[i % n] += want_x[i];
  }
  const std::vector<float> x_dev = dx.Get();  // what was summed: x + b rounded to float
  for (float v : x_dev) want_ss += 2.0 * v * v;
  EXPECT_CLOSE(dy.Get(), want_y, few_);
  EXPECT_CLOSE(dx.Get(), want_x, few_);
  EXPECT_CLOSE(dacc.Get(), want_acc, sum_);
  EXPECT_NEAR(ss.Get()[0], want_ss, 1e-9 * want_ss);
}

TEST_P(ParityTest, TokenReductionsForProbes) {
  const int B = 3, T = 6, G = 2, C = 5, P = 4;
  auto x = Random(static_cast<size_t>(B) * T * G * C, rng_);
  Dev dx(be(), x), sum(be(), std::vector<float>(static_cast<size_t>(P) * G * C, 0.5f)),
      norms(be(), std::vector<float>(P, 1.0f));
  be().AccumulateTokenSum(sum.p(), dx.p(), B, T, G * C, P);
  be().AccumulateTokenNormSum(norms.p(), dx.p(), B, T, G, C, P);
  std::vector<double> want_sum(static_cast<size_t>(P) * G * C, 0.5), want_norm(P, 1.0);
  for (int t = 0; t < P; ++t) {
    for (int b = 0; b < B; ++b) {
      for (int g = 0; g < G; ++g) {
        double s = 0;
        for (int c = 0; c < C; ++c) {
          const double v = x[((static_cast<size_t>(b) * T + t) * G + g) * C + c];
          want_sum[(static_cast<size_t>(t) * G + g) * C + c] += v;
          s += v * v;
        }
        want_norm[t] += std::sqrt(s);
      }
    }
  }
  EXPECT_CLOSE(sum.Get(), want_sum, few_);
  EXPECT_CLOSE(norms.Get(), want_norm, few_);
}

// The massive-activation ops against a sort: |x| kept, the three largest with the first
// place of the largest, and a radix select's four counting passes giving the exact lower
// median. Values with many ties (a few distinct magnitudes, both signs, zeros) across
// more than one block's share; and empty and tiny inputs.
TEST_P(ParityTest, MassiveActivationTop3AndRadixMedian) {
  for (const size_t n : {size_t{0}, size_t{2}, size_t{5}, size_t{70001}}) {
    std::vector<float> x(n);
    for (size_t i = 0; i < n; ++i) {
      const int k = static_cast<int>(rng_.Below(10));
      x[i] = k == 0 ? 0.0f : (k % 2 ? 1.0f : -1.0f) * (k < 8 ? 0.25f * k + 1e-3f * (i % 7) : 40.0f);
    }
    if (n > 100) x[n / 3] = -41.5f, x[n / 2] = 41.5f;  // the largest twice: the first place wins
    Dev dx(be(), n > 0 ? x : std::vector<float>{7.0f}), keep(be(), std::max<size_t>(n, 1));
    DevScalars out(be(), 4), counts(be(), 256);
    be().AbsTop3(keep.p(), out.p(), dx.p(), n);
    std::vector<float> sorted(n);
    for (size_t i = 0; i < n; ++i) sorted[i] = std::fabs(x[i]);
    if (n > 0) {
      EXPECT_EQ(keep.Get(), std::vector<float>(sorted.begin(), sorted.end())) << n;
    }
    std::sort(sorted.begin(), sorted.end(), std::greater<float>());
    const std::vector<double> top = out.Get();
    for (size_t k = 0; k < 3; ++k) EXPECT_EQ(top[k], k < n ? sorted[k] : -1.0) << n << " " << k;
    if (n > 100) {
      EXPECT_EQ(top[3], static_cast<double>(n / 3));
    }
    if (n == 0) {
      EXPECT_EQ(top[3], -1.0);
    }
    // The radix select, as the probes run it.
    uint32_t prefix = 0;
    double rank = 0, total = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      be().RadixCount(counts.p(), keep.p(), n, shift, prefix);
      const std::vector<double> c = counts.Get();
      if (shift == 24) {
        for (double v : c) total += v;
        ASSERT_EQ(total, static_cast<double>(n));
        if (n == 0) break;
        rank = std::floor((total - 1) / 2);
      }
      uint32_t byte = 0;
      while (byte < 255 && rank >= c[byte]) rank -= c[byte++];
      prefix = (prefix << 8) | byte;
    }
    if (n == 0) continue;
    float median;
    std::memcpy(&median, &prefix, sizeof median);
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(median, sorted[(n - 1) / 2]) << n;
  }
}

TEST_P(ParityTest, Embedding) {
  const int N = 8, d = 6, V = 5;
  auto table = Random(static_cast<size_t>(V) * d, rng_), g = Random(static_cast<size_t>(N) * d, rng_);
  std::vector<int32_t> tokens = {0, 4, 4, 2, 1, 0, 3, 4};
  Dev dt(be(), table), dout(be(), static_cast<size_t>(N) * d), dg(be(), g), dtab(be(), table);
  DevInt tok(be(), tokens);
  be().EmbeddingForward(dout.p(), tok.p(), dt.p(), N, d);
  be().EmbeddingBackward(dtab.p(), dg.p(), tok.p(), N, d);
  std::vector<double> want_out(static_cast<size_t>(N) * d), want_tab(table.begin(), table.end());
  for (int i = 0; i < N; ++i) {
    for (int c = 0; c < d; ++c) {
      want_out[static_cast<size_t>(i) * d + c] = table[static_cast<size_t>(tokens[i]) * d + c];
      want_tab[static_cast<size_t>(tokens[i]) * d + c] += g[static_cast<size_t>(i) * d + c];
    }
  }
  EXPECT_CLOSE(dout.Get(), want_out, 0.0);
  EXPECT_CLOSE(dtab.Get(), want_tab, few_);
}

TEST_P(ParityTest, RmsNormForwardAndBackward) {
  const int N = 6, d = 48;
  const double eps = 1e-5;
  auto x = Random(static_cast<size_t>(N) * d, rng_), gamma = Random(d, rng_, 0.5), g = Random(x.size(), rng_),
       dx0 = Random(x.size(), rng_), dg0 = Random(d, rng_);
  for (auto& v : gamma) v += 1.0f;
  Dev dxv(be(), x), dgam(be(), gamma), out(be(), x.size()), rstd(be(), N), dgo(be(), g), dx(be(), dx0),
      dgamma(be(), dg0);
  be().RmsNormForward(out.p(), rstd.p(), dxv.p(), dgam.p(), N, d, static_cast<float>(eps));
  be().RmsNormBackward(dx.p(), dgamma.p(), dgo.p(), dxv.p(), dgam.p(), rstd.p(), N, d);
  std::vector<double> want_out(x.size()), want_rstd(N), want_dx(dx0.begin(), dx0.end()),
      want_dg(dg0.begin(), dg0.end());
  for (int i = 0; i < N; ++i) {
    const size_t o = static_cast<size_t>(i) * d;
    double ss = 0, dot = 0;
    for (int c = 0; c < d; ++c) ss += static_cast<double>(x[o + c]) * x[o + c];
    const double r = 1.0 / std::sqrt(ss / d + eps);
    want_rstd[i] = r;
    for (int c = 0; c < d; ++c) {
      want_out[o + c] = x[o + c] * r * gamma[c];
      dot += static_cast<double>(gamma[c]) * g[o + c] * x[o + c];
    }
    for (int c = 0; c < d; ++c) {
      want_dx[o + c] += r * gamma[c] * g[o + c] - r * r * r * x[o + c] * dot / d;
      want_dg[c] += g[o + c] * x[o + c] * r;
    }
  }
  EXPECT_CLOSE(out.Get(), want_out, few_);
  EXPECT_CLOSE(rstd.Get(), want_rstd, few_);
  EXPECT_CLOSE(dx.Get(), want_dx, sum_);
  EXPECT_CLOSE(dgamma.Get(), want_dg, sum_);
}

// The CUDA backend's reductions over rows run in two passes once N exceeds one chunk of
// 64 rows (kernels.h, RowChunks): column sums, RMSNorm's dγ, θ's gradient, and the
// embedding backward split by token class. N = 300 gives 5 chunks (the last one short),
// n = 40 and d = 150 partial column tiles and groups. (Not in the race check: the same
// kernels are race-checked at one chunk by *Reductions* and *RmsNorm*, and blocks share
// no shared memory, so the chunk count does not change what a race could be.)
TEST_P(ParityTest, GradientSumsOverRowChunks) {
  const int N = 300;
  {  // column sums, as the bias gradients use them
    const int n = 40;
    auto x = Random(static_cast<size_t>(N) * n, rng_), acc = Random(n, rng_);
    Dev dx(be(), x), dacc(be(), acc);
    be().AccumulateColumnSums(dacc.p(), dx.p(), N, n);
    std::vector<double> want(acc.begin(), acc.end());
    for (size_t i = 0; i < x.size(); ++i) want[i % n] += x[i];
    EXPECT_CLOSE(dacc.Get(), want, sum_) << "column sums";
  }
  {  // RMSNorm's dγ
    const int d = 40;
    auto x = Random(static_cast<size_t>(N) * d, rng_), gamma = Random(d, rng_, 0.5), g = Random(x.size(), rng_),
         dg0 = Random(d, rng_);
    Dev dxv(be(), x), dgam(be(), gamma), out(be(), x.size()), rstd(be(), N), dgo(be(), g), dx(be(), x.size()),
        dgamma(be(), dg0);
    be().RmsNormForward(out.p(), rstd.p(), dxv.p(), dgam.p(), N, d, 1e-5f);
    be().RmsNormBackward(dx.p(), dgamma.p(), dgo.p(), dxv.p(), dgam.p(), rstd.p(), N, d);
    std::vector<double> want(dg0.begin(), dg0.end());
    for (int i = 0; i < N; ++i) {
      const size_t o = static_cast<size_t>(i) * d;
      double ss = 0;
      for (int c = 0; c < d; ++c) ss += static_cast<double>(x[o + c]) * x[o + c];
      const double r = 1.0 / std::sqrt(ss / d + 1e-5);
      for (int c = 0; c < d; ++c) want[c] += g[o + c] * x[o + c] * r;
    }
    EXPECT_CLOSE(dgamma.Get(), want, sum_) << "RMSNorm dgamma";
  }
  for (int d : {40, 150}) {  // the embedding backward, ids repeated many times
    const int V = 37;
    auto table = Random(static_cast<size_t>(V) * d, rng_), g = Random(static_cast<size_t>(N) * d, rng_);
    std::vector<int32_t> tokens(N);
    for (int i = 0; i < N; ++i) tokens[i] = static_cast<int32_t>((i * 7 + i / 13) % V);
    Dev dg(be(), g), dtab(be(), table);
    DevInt tok(be(), tokens);
    be().EmbeddingBackward(dtab.p(), dg.p(), tok.p(), N, d);
    std::vector<double> want(table.begin(), table.end());
    for (int i = 0; i < N; ++i) {
      for (int c = 0; c < d; ++c) want[static_cast<size_t>(tokens[i]) * d + c] += g[static_cast<size_t>(i) * d + c];
    }
    EXPECT_CLOSE(dtab.Get(), want, sum_) << "embedding backward, d " << d;
  }
  {  // θ's gradient (V-scale)
    const int KV = 2, dh = 8;
    const double c_base = 4.0;
    auto v = Random(static_cast<size_t>(N) * KV * dh, rng_), theta = Random(KV, rng_, 0.3),
         g = Random(v.size(), rng_), dth0 = Random(KV, rng_);
    Dev dvv(be(), v), dth(be(), theta), dg(be(), g), dv(be(), v.size()), dtheta(be(), dth0);
    be().VScaleBackward(dv.p(), dtheta.p(), dg.p(), dvv.p(), dth.p(), N, KV, dh, c_base, VScaleMode::kVScale);
    std::vector<double> want(dth0.begin(), dth0.end());
    for (int i = 0; i < N; ++i) {
      for (int gi = 0; gi < KV; ++gi) {
        const size_t o = (static_cast<size_t>(i) * KV + gi) * dh;
        double r = 0, vg = 0;
        for (int c = 0; c < dh; ++c) {
          r += static_cast<double>(v[o + c]) * v[o + c];
          vg += static_cast<double>(v[o + c]) * g[o + c];
        }
        const double C = c_base * std::exp(theta[gi]);
        want[gi] += -C * r / ((r + C) * (r + C)) * vg;
      }
    }
    EXPECT_CLOSE(dtheta.Get(), want, sum_) << "theta";
  }
}

TEST_P(ParityTest, RopeForwardAndBackward) {
  const int B = 2, T = 7, heads = 3, dh = 8;
  ModelConfig c;
  c.head_dim = dh;
  c.context = T;
  c.rope_theta = 500.0;
  for (RopeType type : {RopeType::kDefault, RopeType::kLlama3}) {
    c.rope_scaling = RopeScaling{};
    c.rope_scaling.type = type;
    if (type == RopeType::kLlama3) {
      c.rope_scaling.factor = 8;
      c.rope_scaling.original_max_position_embeddings = 4;
    }
    const RotaryFrequencies rope = c.Rotary();
    auto x = Random(static_cast<size_t>(B) * T * heads * dh, rng_);
    Dev fwd(be(), x), bwd(be(), x);
    be().RopeForward(fwd.p(), B, T, heads, dh, rope);
    be().RopeBackward(bwd.p(), B, T, heads, dh, rope);
    std::vector<double> want_f(x.size()), want_b(x.size());
    const int half = dh / 2;
    for (int b = 0; b < B; ++b) {
      for (int t = 0; t < T; ++t) {
        for (int h = 0; h < heads; ++h) {
          const size_t o = ((static_cast<size_t>(b) * T + t) * heads + h) * dh;
          for (int i = 0; i < half; ++i) {
            const double ang = t * rope.inv_freq[i], cs = rope.attention_factor * std::cos(ang),
                         sn = rope.attention_factor * std::sin(ang);
            const double x1 = x[o + i], x2 = x[o + i + half];
            want_f[o + i] = x1 * cs - x2 * sn;
            want_f[o + i + half] = x2 * cs + x1 * sn;
            want_b[o + i] = x1 * cs + x2 * sn;  // the transpose: the opposite angle
            want_b[o + i + half] = x2 * cs - x1 * sn;
          }
        }
      }
    }
    EXPECT_CLOSE(fwd.Get(), want_f, few_) << RopeTypeName(type);
    EXPECT_CLOSE(bwd.Get(), want_b, few_) << RopeTypeName(type);
  }
}

// Causal GQA attention in float64: y, lse, and the gradients of Σ y ⊙ w.
struct RefAttention {
  std::vector<double> y, lse, dq, dk, dv;
};
RefAttention RefAttend(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                       const std::vector<float>& dy, int B, int T, int H, int KV, int dh) {
  RefAttention r;
  r.y.assign(q.size(), 0);
  r.lse.assign(static_cast<size_t>(B) * H * T, 0);
  r.dq.assign(q.size(), 0);
  r.dk.assign(k.size(), 0);
  r.dv.assign(v.size(), 0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(dh));
  auto Q = [&](int b, int t, int h, int c) { return static_cast<double>(q[((static_cast<size_t>(b) * T + t) * H + h) * dh + c]); };
  auto KI = [&](int b, int u, int g, int c) { return ((static_cast<size_t>(b) * T + u) * KV + g) * dh + c; };
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      const int g = h / (H / KV);
      for (int t = 0; t < T; ++t) {
        std::vector<double> s(t + 1), p(t + 1), dp(t + 1);
        double mx = -INFINITY;
        for (int u = 0; u <= t; ++u) {
          double dot = 0;
          for (int c = 0; c < dh; ++c) dot += Q(b, t, h, c) * k[KI(b, u, g, c)];
          s[u] = dot * scale;
          mx = std::max(mx, s[u]);
        }
        double z = 0;
        for (int u = 0; u <= t; ++u) z += std::exp(s[u] - mx);
        r.lse[(static_cast<size_t>(b) * H + h) * T + t] = mx + std::log(z);
        const size_t yo = ((static_cast<size_t>(b) * T + t) * H + h) * dh;
        double pdp = 0;
        for (int u = 0; u <= t; ++u) {
          p[u] = std::exp(s[u] - mx) / z;
          double d = 0;
          for (int c = 0; c < dh; ++c) {
            r.y[yo + c] += p[u] * v[KI(b, u, g, c)];
            d += dy[yo + c] * v[KI(b, u, g, c)];
            r.dv[KI(b, u, g, c)] += p[u] * dy[yo + c];
          }
          dp[u] = d;
          pdp += p[u] * d;
        }
        for (int u = 0; u <= t; ++u) {
          const double ds = p[u] * (dp[u] - pdp) * scale;
          for (int c = 0; c < dh; ++c) {
            r.dq[yo + c] += ds * k[KI(b, u, g, c)];
            r.dk[KI(b, u, g, c)] += ds * Q(b, t, h, c);
          }
        }
      }
    }
  }
  return r;
}

// One attention case: forward (y, lse) and backward (dq, dk, dv) against float64, and
// optionally the probes' column statistics from the forward's lse.
void CheckAttention(Backend& be, Rng& rng, int B, int T, int H, int KV, int dh, double sum_tol, double few_tol,
                    bool column_stats) {
  SCOPED_TRACE("B " + std::to_string(B) + " T " + std::to_string(T) + " H " + std::to_string(H) + " KV " +
               std::to_string(KV) + " dh " + std::to_string(dh));
  auto q = Random(static_cast<size_t>(B) * T * H * dh, rng), k = Random(static_cast<size_t>(B) * T * KV * dh, rng),
       v = Random(k.size(), rng), dy = Random(q.size(), rng);
  Dev dq_in(be, q), dk_in(be, k), dv_in(be, v), ddy(be, dy), y(be, q.size()),
      lse(be, static_cast<size_t>(B) * H * T), ws(be, be.AttentionWorkspaceFloats(B, T, H)), dq(be, q.size()),
      dk(be, k.size()), dv(be, v.size());
  be.AttentionForward(y.p(), lse.p(), ws.p(), dq_in.p(), dk_in.p(), dv_in.p(), B, T, H, KV, dh);
  be.AttentionBackward(dq.p(), dk.p(), dv.p(), ddy.p(), y.p(), lse.p(), ws.p(), dq_in.p(), dk_in.p(), dv_in.p(), B, T,
                       H, KV, dh);
  const RefAttention ref = RefAttend(q, k, v, dy, B, T, H, KV, dh);
  EXPECT_CLOSE(y.Get(), ref.y, sum_tol);
  EXPECT_CLOSE(lse.Get(), ref.lse, few_tol);
  EXPECT_CLOSE(dq.Get(), ref.dq, sum_tol);
  EXPECT_CLOSE(dk.Get(), ref.dk, sum_tol);
  EXPECT_CLOSE(dv.Get(), ref.dv, sum_tol);
  if (!column_stats) return;
  // Column statistics of key s from the forward's lse, against the brute-force matrix.
  for (int s : {0, 3}) {
    ColumnStatsRequest req;
    req.sink_position = s;
    req.window = 4;
    req.threshold = 0.2;
    Dev out(be, 4 * H);
    be.AttentionColumnStats(out.p(), out.p() + H, out.p() + 2 * H, out.p() + 3 * H, dq_in.p(), dk_in.p(), lse.p(), B,
                              T, H, KV, dh, req);
    std::vector<double> want(4 * H, 0);
    const double scale = 1.0 / std::sqrt(static_cast<double>(dh));
    for (int h = 0; h < H; ++h) {
      const int g = h / (H / KV);
      for (int b = 0; b < B; ++b) {
        double alpha_b = 0;
        for (int t = s; t < T; ++t) {
          double dot = 0;
          for (int c = 0; c < dh; ++c) {
            dot += static_cast<double>(q[((static_cast<size_t>(b) * T + t) * H + h) * dh + c]) *
                   k[((static_cast<size_t>(b) * T + s) * KV + g) * dh + c];
          }
          const double a = std::exp(dot * scale - ref.lse[(static_cast<size_t>(b) * H + h) * T + t]);
          want[H + h] += a / B;
          want[2 * H + h] += a * a / B;
          if (t < s + req.window) alpha_b += a / req.window;
        }
        want[h] += alpha_b / B;
        want[3 * H + h] += (alpha_b > req.threshold ? 1.0 : 0.0) / B;
      }
    }
    EXPECT_CLOSE(out.Get(), want, sum_tol) << "s = " << s;
  }
}


// T 11 fits one tile of the CUDA backend's flash attention; T 70 crosses a tile boundary
// (64 rows) with a partial tile, so the online softmax rescales and the backward loops
// over tiles (both race-checked: cuda_parity_racecheck runs *Attention*/cuda).
TEST_P(ParityTest, AttentionForwardBackwardAndColumnStats) {
  CheckAttention(be(), rng_, 2, 11, 4, 2, 8, sum_, few_, true);
  CheckAttention(be(), rng_, 1, 70, 2, 1, 8, sum_, few_, true);
}

// The paper's head dims and a wide one, over several tiles: dh 64 (tiles of 64 rows),
// 128 (its own instantiation) and 200 (the dh ≤ 256 one, 32-row tiles, columns partly
// used), GQA 2:1 and 1:1. The fp32 tolerance stays kSum (2e-5): dq and dk sum up to
// T = 150 products whose dS factor is a difference of dh-term dot products, an error of
// order √T·2^-24 relative to the largest output; the worst seen is 7.2e-7 (the emulated
// CUDA flash kernels, which sum in tile order) and 4.7e-7 (the CPU backend).
TEST_P(ParityTest, AttentionAcrossTilesAndHeadDims) {
  CheckAttention(be(), rng_, 1, 150, 4, 2, 64, sum_, few_, false);
  CheckAttention(be(), rng_, 1, 70, 2, 2, 128, sum_, few_, false);
  CheckAttention(be(), rng_, 1, 40, 2, 1, 200, sum_, few_, false);
}

// ---- attention arms (docs/design/ARMS.md) ----------------------------------------------

// The arms' attention in float64 from the formulas: y, each row's unassigned mass, the
// weights A (for the column statistics), and dq, dk, dv, ∂L/∂s_h for an upstream dy.
struct RefArmAttention {
  std::vector<double> y, un, att, dq, dk, dv, dsink;
};
RefArmAttention RefArmAttend(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                             const std::vector<float>& dy, const std::vector<float>& sink, int B, int T, int H, int KV,
                             int dh, const AttentionArmParams& arm) {
  RefArmAttention r;
  r.y.assign(q.size(), 0);
  r.un.assign(static_cast<size_t>(B) * H * T, 0);
  r.att.assign(static_cast<size_t>(B) * H * T * T, 0);
  r.dq.assign(q.size(), 0);
  r.dk.assign(k.size(), 0);
  r.dv.assign(v.size(), 0);
  r.dsink.assign(H, 0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(dh));
  auto QI = [&](int b, int t, int h) { return ((static_cast<size_t>(b) * T + t) * H + h) * dh; };
  auto KI = [&](int b, int u, int g) { return ((static_cast<size_t>(b) * T + u) * KV + g) * dh; };
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      const int g = h / (H / KV);
      const size_t bh = static_cast<size_t>(b) * H + h;
      for (int t = 0; t < T; ++t) {
        std::vector<double> z(t + 1), a(t + 1), dA(t + 1), dz(t + 1);
        for (int u = 0; u <= t; ++u) {
          double dot = 0, dav = 0;
          for (int c = 0; c < dh; ++c) {
            dot += static_cast<double>(q[QI(b, t, h) + c]) * k[KI(b, u, g) + c];
            dav += static_cast<double>(dy[QI(b, t, h) + c]) * v[KI(b, u, g) + c];
          }
          z[u] = dot * scale;
          dA[u] = dav;
        }
        double assigned = 0, weighted = 0;  // Σ a, Σ a·dA
        switch (arm.kind) {
          case AttentionKind::kSinkLogit:
          case AttentionKind::kSoftmaxPlusOne:
          case AttentionKind::kSoftmax: {
            const double s_h = arm.kind == AttentionKind::kSinkLogit ? sink[h] : 0.0;
            double den = arm.kind == AttentionKind::kSoftmax ? 0.0 : std::exp(s_h);
            for (double zu : z) den += std::exp(zu);
            for (int u = 0; u <= t; ++u) a[u] = std::exp(z[u]) / den;
            for (int u = 0; u <= t; ++u) weighted += a[u] * dA[u];
            for (int u = 0; u <= t; ++u) dz[u] = a[u] * (dA[u] - weighted);
            const double p_sink = arm.kind == AttentionKind::kSoftmax ? 0.0 : std::exp(s_h) / den;
            r.un[bh * T + t] = p_sink;
            r.dsink[h] -= p_sink * weighted;
            break;
          }
          case AttentionKind::kSigmoid:
            for (int u = 0; u <= t; ++u) {
              a[u] = 1.0 / (1.0 + std::exp(-(z[u] + arm.sigmoid_bias)));
              dz[u] = dA[u] * a[u] * (1.0 - a[u]);
              assigned += a[u];
            }
            r.un[bh * T + t] = 1.0 - assigned;
            break;
          case AttentionKind::kSoftpick: {
            double den = arm.softpick_eps;
            for (double zu : z) den += std::abs(std::exp(zu) - 1.0);
            for (int u = 0; u <= t; ++u) {
              a[u] = std::max(std::exp(z[u]) - 1.0, 0.0) / den;
              assigned += a[u];
              weighted += a[u] * dA[u];
            }
            for (int u = 0; u <= t; ++u) {
              const double sign = z[u] > 0 ? 1.0 : z[u] < 0 ? -1.0 : 0.0;
              dz[u] = std::exp(z[u]) / den * ((z[u] > 0 ? dA[u] : 0.0) - sign * weighted);
            }
            r.un[bh * T + t] = 1.0 - assigned;
            break;
          }
        }
        for (int u = 0; u <= t; ++u) {
          r.att[(bh * T + t) * T + u] = a[u];
          for (int c = 0; c < dh; ++c) {
            r.y[QI(b, t, h) + c] += a[u] * v[KI(b, u, g) + c];
            r.dv[KI(b, u, g) + c] += a[u] * dy[QI(b, t, h) + c];
            r.dq[QI(b, t, h) + c] += dz[u] * scale * k[KI(b, u, g) + c];
            r.dk[KI(b, u, g) + c] += dz[u] * scale * q[QI(b, t, h) + c];
          }
        }
      }
    }
  }
  return r;
}

// One arm case: the forward (y, unassigned), the backward (dq, dk, dv, ∂L/∂s_h) and the
// probes' column statistics, against float64. A backend that keeps A is read from A; one
// that keeps per-row numbers only (CUDA) answers ArmAttentionColumnStats from them.
void CheckArmAttention(Backend& be, Rng& rng, AttentionKind kind, int B, int T, int H, int KV, int dh, double tol) {
  SCOPED_TRACE(std::string(AttentionKindName(kind)) + " B " + std::to_string(B) + " T " + std::to_string(T) + " H " +
               std::to_string(H) + " KV " + std::to_string(KV) + " dh " + std::to_string(dh));
  AttentionArmParams arm;
  arm.kind = kind;
  arm.sigmoid_bias = -std::log(static_cast<float>(T));
  arm.softpick_eps = 1e-3f;
  auto q = Random(static_cast<size_t>(B) * T * H * dh, rng), k = Random(static_cast<size_t>(B) * T * KV * dh, rng),
       v = Random(k.size(), rng), dy = Random(q.size(), rng), sink = Random(H, rng, 2.0);
  const bool learned = kind == AttentionKind::kSinkLogit;
  const size_t rows = static_cast<size_t>(B) * H * T;
  Dev dq_in(be, q), dk_in(be, k), dv_in(be, v), ddy(be, dy), dsink_in(be, sink), y(be, q.size()), un(be, rows),
      ws(be, be.ArmAttentionWorkspaceFloats(B, T, H)), dq(be, q.size()), dk(be, k.size()), dv(be, v.size()),
      dsink(be, std::vector<float>(H, 0.5f));
  std::unique_ptr<Dev> att;
  if (be.ArmAttentionKeepsWeights()) att = std::make_unique<Dev>(be, rows * T);
  be.ArmAttentionForward(y.p(), att ? att->p() : nullptr, un.p(), ws.p(), dq_in.p(), dk_in.p(), dv_in.p(),
                         learned ? dsink_in.p() : nullptr, B, T, H, KV, dh, arm);
  be.ArmAttentionBackward(dq.p(), dk.p(), dv.p(), dsink.p(), ddy.p(), y.p(), att ? att->p() : nullptr, un.p(), ws.p(),
                          dq_in.p(), dk_in.p(), dv_in.p(), learned ? dsink_in.p() : nullptr, B, T, H, KV, dh, arm);
  const RefArmAttention ref = RefArmAttend(q, k, v, dy, sink, B, T, H, KV, dh, arm);
  EXPECT_CLOSE(y.Get(), ref.y, tol);
  EXPECT_CLOSE(un.Get(), ref.un, tol);
  EXPECT_CLOSE(dq.Get(), ref.dq, tol);
  EXPECT_CLOSE(dk.Get(), ref.dk, tol);
  EXPECT_CLOSE(dv.Get(), ref.dv, tol);
  std::vector<double> want_dsink(H);  // accumulated onto 0.5; untouched unless learned
  for (int h = 0; h < H; ++h) want_dsink[h] = 0.5 + (learned ? ref.dsink[h] : 0.0);
  EXPECT_CLOSE(dsink.Get(), want_dsink, tol);
  for (int s : {0, 3}) {
    ColumnStatsRequest req;
    req.sink_position = s;
    req.window = 4;
    req.threshold = 0.2;
    std::vector<double> want(4 * H, 0);
    for (int h = 0; h < H; ++h) {
      for (int b = 0; b < B; ++b) {
        double alpha_b = 0;
        for (int t = s; t < T; ++t) {
          const double a = ref.att[((static_cast<size_t>(b) * H + h) * T + t) * T + s];
          want[H + h] += a / B;
          want[2 * H + h] += a * a / B;
          if (t < s + req.window) alpha_b += a / req.window;
        }
        want[h] += alpha_b / B;
        want[3 * H + h] += (alpha_b > req.threshold ? 1.0 : 0.0) / B;
      }
    }
    std::vector<float> got(4 * H, 0.0f);
    if (att) {  // the reference backend: column s of the A it kept
      const std::vector<float> a = att->Get();
      for (int h = 0; h < H; ++h) {
        for (int b = 0; b < B; ++b) {
          double alpha_b = 0;
          for (int t = s; t < T; ++t) {
            const double a_ts = a[((static_cast<size_t>(b) * H + h) * T + t) * T + s];
            got[H + h] += static_cast<float>(a_ts / B);
            got[2 * H + h] += static_cast<float>(a_ts * a_ts / B);
            if (t < s + req.window) alpha_b += a_ts / req.window;
          }
          got[h] += static_cast<float>(alpha_b / B);
          got[3 * H + h] += static_cast<float>((alpha_b > req.threshold ? 1.0 : 0.0) / B);
        }
      }
    } else {
      Dev out(be, 4 * H);
      be.ArmAttentionColumnStats(out.p(), out.p() + H, out.p() + 2 * H, out.p() + 3 * H, dq_in.p(), dk_in.p(), ws.p(), B,
                                 T, H, KV, dh, arm, req);
      got = out.Get();
    }
    EXPECT_CLOSE(got, want, tol) << "s = " << s;
  }
}

// Every arm: T 11 within one tile, T 70 across a tile boundary with a partial tile (the
// online rescaling of the sink softmaxes and softpick), then dh 200 on the 32-row tiles.
// The fp32 tolerance is the softmax attention's (kSum): the same sums of up to T products.
// cuda_parity_racecheck runs *Attention*/cuda: of the arms, the smallest case that crosses
// a tile for the two shared-memory layouts (the sink softmax's, softpick's with its D'
// row), as the race check single-steps every shared access (minutes for the full set).
const AttentionKind kArmKinds[] = {AttentionKind::kSinkLogit, AttentionKind::kSoftmaxPlusOne, AttentionKind::kSigmoid,
                                   AttentionKind::kSoftpick};
TEST_P(ParityTest, AttentionArmsRaceCases) {
  if (!be().Supports(OptionalOp::kAttentionArms)) GTEST_SKIP() << be().Name() << " has no attention arms";
  for (AttentionKind kind : {AttentionKind::kSinkLogit, AttentionKind::kSoftpick}) {
    CheckArmAttention(be(), rng_, kind, 1, 66, 1, 1, 8, sum_);
  }
}
TEST_P(ParityTest, ArmsForwardBackwardAndColumnStats) {
  if (!be().Supports(OptionalOp::kAttentionArms)) GTEST_SKIP() << be().Name() << " has no attention arms";
  for (AttentionKind kind : kArmKinds) {
    CheckArmAttention(be(), rng_, kind, 2, 11, 4, 2, 8, sum_);
    CheckArmAttention(be(), rng_, kind, 1, 70, 2, 1, 8, sum_);
  }
}
TEST_P(ParityTest, AttentionAcrossTilesAndHeadDimsOfTheArms) {
  if (!be().Supports(OptionalOp::kAttentionArms)) GTEST_SKIP() << be().Name() << " has no attention arms";
  for (AttentionKind kind : kArmKinds) CheckArmAttention(be(), rng_, kind, 1, 40, 2, 2, 200, sum_);
}

// The gates: C = 1 (the elementwise output and value gates) and C = 40 (a head's channels,
// more than a warp's lanes).
TEST_P(ParityTest, SigmoidGateForwardAndBackward) {
  if (!be().Supports(OptionalOp::kAttentionArms)) GTEST_SKIP() << be().Name() << " has no attention arms";
  for (int C : {1, 40}) {
    const int N = 7, G = 6;
    auto x = Random(static_cast<size_t>(N) * G * C, rng_), logits = Random(static_cast<size_t>(N) * G, rng_, 2.0),
         dout = Random(x.size(), rng_);
    Dev dx_in(be(), x), dl(be(), logits), ddout(be(), dout), out(be(), x.size()), dx(be(), x.size()),
        dlogits(be(), logits.size());
    be().SigmoidGateForward(out.p(), dx_in.p(), dl.p(), N, G, C);
    be().SigmoidGateBackward(dx.p(), dlogits.p(), ddout.p(), dx_in.p(), dl.p(), N, G, C);
    std::vector<double> want_out(x.size()), want_dx(x.size()), want_dl(logits.size(), 0.0);
    for (size_t r = 0; r < logits.size(); ++r) {
      const double sig = 1.0 / (1.0 + std::exp(-static_cast<double>(logits[r])));
      double dot = 0;
      for (int c = 0; c < C; ++c) {
        want_out[r * C + c] = x[r * C + c] * sig;
        want_dx[r * C + c] = dout[r * C + c] * sig;
        dot += static_cast<double>(dout[r * C + c]) * x[r * C + c];
      }
      want_dl[r] = sig * (1 - sig) * dot;
    }
    EXPECT_CLOSE(out.Get(), want_out, few_) << "C " << C;
    EXPECT_CLOSE(dx.Get(), want_dx, few_) << "C " << C;
    EXPECT_CLOSE(dlogits.Get(), want_dl, sum_) << "C " << C;
  }
}

TEST_P(ParityTest, VScaleForwardAndBackward) {
  const int N = 10, KV = 3, dh = 8;
  const double c_base = 4.0;
  auto v = Random(static_cast<size_t>(N) * KV * dh, rng_), theta = Random(KV, rng_, 0.3),
       g = Random(v.size(), rng_), dth0 = Random(KV, rng_);
  for (VScaleMode mode : {VScaleMode::kNone, VScaleMode::kVScale, VScaleMode::kBackwardOnly}) {
    Dev dvv(be(), v), dth(be(), theta), vh(be(), v.size()), dg(be(), g), dv(be(), v.size()), dtheta(be(), dth0);
    be().VScaleForward(vh.p(), dvv.p(), dth.p(), N, KV, dh, c_base, mode);
    be().VScaleBackward(dv.p(), mode == VScaleMode::kVScale ? dtheta.p() : nullptr, dg.p(), dvv.p(), dth.p(), N, KV,
                        dh, c_base, mode);
    std::vector<double> want_vh(v.size()), want_dv(v.size()), want_dth(dth0.begin(), dth0.end());
    for (int i = 0; i < N; ++i) {
      for (int gi = 0; gi < KV; ++gi) {
        const size_t o = (static_cast<size_t>(i) * KV + gi) * dh;
        double r = 0, vg = 0;
        for (int c = 0; c < dh; ++c) {
          r += static_cast<double>(v[o + c]) * v[o + c];
          vg += static_cast<double>(v[o + c]) * g[o + c];
        }
        const double C = c_base * std::exp(mode == VScaleMode::kVScale ? theta[gi] : 0.0);
        const double phi = r / (r + C);
        for (int c = 0; c < dh; ++c) {
          want_vh[o + c] = mode == VScaleMode::kVScale ? phi * v[o + c] : v[o + c];
          want_dv[o + c] = mode == VScaleMode::kNone ? g[o + c]
                                                     : phi * g[o + c] + 2 * C / ((r + C) * (r + C)) * vg * v[o + c];
        }
        if (mode == VScaleMode::kVScale) want_dth[gi] += -C * r / ((r + C) * (r + C)) * vg;
      }
    }
    EXPECT_CLOSE(vh.Get(), want_vh, few_) << VScaleModeName(mode);
    EXPECT_CLOSE(dv.Get(), want_dv, sum_) << VScaleModeName(mode);
    EXPECT_CLOSE(dtheta.Get(), want_dth, sum_) << VScaleModeName(mode);
  }
}

TEST_P(ParityTest, SwiGluForwardAndBackward) {
  const int N = 5, F = 12;
  auto gate = Random(static_cast<size_t>(N) * F, rng_, 2.0), up = Random(gate.size(), rng_),
       dh = Random(gate.size(), rng_);
  Dev dgt(be(), gate), dup_in(be(), up), ddh(be(), dh), h(be(), gate.size()), dgate(be(), gate.size()),
      dup(be(), gate.size());
  be().SwiGluForward(h.p(), dgt.p(), dup_in.p(), N, F);
  be().SwiGluBackward(dgate.p(), dup.p(), ddh.p(), dgt.p(), dup_in.p(), N, F);
  std::vector<double> want_h(gate.size()), want_dg(gate.size()), want_du(gate.size());
  for (size_t i = 0; i < gate.size(); ++i) {
    const double gg = gate[i], sig = 1.0 / (1.0 + std::exp(-gg)), silu = gg * sig;
    want_h[i] = silu * up[i];
    want_du[i] = dh[i] * silu;
    want_dg[i] = dh[i] * up[i] * sig * (1 + gg * (1 - sig));
  }
  EXPECT_CLOSE(h.Get(), want_h, few_);
  EXPECT_CLOSE(dgate.Get(), want_dg, few_);
  EXPECT_CLOSE(dup.Get(), want_du, few_);
}

TEST_P(ParityTest, CrossEntropyForwardBackwardAndLoss) {
  const int N = 6, V = 37;
  auto logits = Random(static_cast<size_t>(N) * V, rng_, 3.0);
  std::vector<int32_t> targets = {0, 36, 5, 5, 17, 2};
  Dev grad(be(), logits), plain(be(), logits);
  DevInt tgt(be(), targets);
  DevScalars loss(be(), 2);
  be().CrossEntropyForwardBackward(grad.p(), tgt.p(), N, V, 0.25f, loss.p());
  be().CrossEntropyLoss(plain.p(), tgt.p(), N, V, loss.p() + 1);
  std::vector<double> want_grad(logits.size());
  double want_loss = 0;
  for (int i = 0; i < N; ++i) {
    const size_t o = static_cast<size_t>(i) * V;
    double mx = -INFINITY, z = 0;
    for (int c = 0; c < V; ++c) mx = std::max(mx, static_cast<double>(logits[o + c]));
    for (int c = 0; c < V; ++c) z += std::exp(logits[o + c] - mx);
    want_loss += std::log(z) + mx - logits[o + targets[i]];
    for (int c = 0; c < V; ++c) want_grad[o + c] = 0.25 * (std::exp(logits[o + c] - mx) / z - (c == targets[i]));
  }
  EXPECT_CLOSE(grad.Get(), want_grad, few_);
  EXPECT_CLOSE(plain.Get(), std::vector<double>(logits.begin(), logits.end()), 0.0);  // unchanged
  const std::vector<double> got = loss.Get();
  EXPECT_NEAR(got[0], want_loss, 1e-6 * want_loss);
  EXPECT_NEAR(got[1], want_loss, 1e-6 * want_loss);
}

TEST_P(ParityTest, AdamW) {
  const size_t n = 33;
  auto p = Random(n, rng_), g = Random(n, rng_), m = Random(n, rng_, 0.1), v = Random(n, rng_, 0.1);
  for (auto& x : v) x = x * x;
  Dev dp(be(), p), dg(be(), g), dm(be(), m), dv(be(), v);
  const float lr = 1e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, gs = 0.5f;
  const int64_t step = 3;
  be().AdamW(dp.p(), dg.p(), dm.p(), dv.p(), n, lr, b1, b2, eps, wd, gs, step);
  std::vector<double> want_p(n), want_m(n), want_v(n);
  const double bc1 = 1 - std::pow(static_cast<double>(b1), step), bc2 = 1 - std::pow(static_cast<double>(b2), step);
  for (size_t i = 0; i < n; ++i) {
    const double gi = static_cast<double>(g[i]) * gs;
    want_m[i] = b1 * static_cast<double>(m[i]) + (1 - static_cast<double>(b1)) * gi;
    want_v[i] = b2 * static_cast<double>(v[i]) + (1 - static_cast<double>(b2)) * gi * gi;
    want_p[i] = p[i] - lr * (want_m[i] / bc1 / (std::sqrt(want_v[i] / bc2) + eps) + wd * p[i]);
  }
  EXPECT_CLOSE(dm.Get(), want_m, few_);
  EXPECT_CLOSE(dv.Get(), want_v, few_);
  EXPECT_CLOSE(dp.Get(), want_p, few_);
}

// ---- fused ops against their composition over the same backend ----------------------

class FusedTest : public ParityTest {
 protected:
  void SetUp() override {
    ParityTest::SetUp();
    if (IsSkipped()) return;
    composed_ = std::make_unique<ComposedBackend>(be_.get());
  }
  Backend& composed() { return *composed_; }
  std::unique_ptr<Backend> composed_;
};

TEST_P(FusedTest, ResidualRmsNorm) {
  const int N = 7, d = 24;
  auto x = Random(static_cast<size_t>(N) * d, rng_), r = Random(x.size(), rng_), gamma = Random(d, rng_),
       dres = Random(x.size(), rng_), dout = Random(x.size(), rng_);
  std::vector<std::vector<float>> outs;
  for (Backend* b : {&be(), &composed()}) {
    Dev dx(*b, x), dr(*b, r), dgm(*b, gamma), sum(*b, x.size()), out(*b, x.size()), rstd(*b, N), ddres(*b, dres),
        ddout(*b, dout), dxo(*b, x.size()), dgam(*b, d);
    b->ResidualRmsNormForward(sum.p(), out.p(), rstd.p(), dx.p(), dr.p(), dgm.p(), N, d, 1e-5f);
    b->RmsNormBackwardResidual(dxo.p(), dgam.p(), ddres.p(), ddout.p(), sum.p(), dgm.p(), rstd.p(), N, d);
    for (Dev* o : {&sum, &out, &rstd, &dxo, &dgam}) outs.push_back(o->Get());
    // In place: sum aliasing x.
    b->ResidualRmsNormForward(dx.p(), out.p(), rstd.p(), dx.p(), dr.p(), dgm.p(), N, d, 1e-5f);
    outs.push_back(dx.Get());
  }
  const size_t k = outs.size() / 2;
  for (size_t i = 0; i < k; ++i) EXPECT_CLOSE(outs[i], outs[k + i], 0.0) << "output " << i;
  EXPECT_CLOSE(outs[k - 1], outs[0], 0.0) << "in place";
}

TEST_P(FusedTest, AttentionInputWithBiasesAndQkNorms) {
  const int B = 2, T = 5, d = 16, H = 4, KV = 2, dh = 4;
  const int N = B * T, qd = H * dh, kvd = KV * dh;
  ModelConfig cfg;
  cfg.head_dim = dh;
  cfg.context = T;
  const RotaryFrequencies rope = cfg.Rotary();
  for (bool extras : {false, true}) {
    auto xn = Random(static_cast<size_t>(N) * d, rng_), wq = Random(static_cast<size_t>(qd) * d, rng_, 0.3),
         wk = Random(static_cast<size_t>(kvd) * d, rng_, 0.3), wv = Random(static_cast<size_t>(kvd) * d, rng_, 0.3),
         bq = Random(qd, rng_), bk = Random(kvd, rng_), bv = Random(kvd, rng_), qn = Random(dh, rng_),
         kn = Random(dh, rng_), theta = Random(KV, rng_, 0.2), gq = Random(static_cast<size_t>(N) * qd, rng_),
         gk = Random(static_cast<size_t>(N) * kvd, rng_), gv = Random(static_cast<size_t>(N) * kvd, rng_);
    std::vector<std::vector<float>> outs;
    for (Backend* b : {&be(), &composed()}) {
      Dev dxn(*b, xn), dwq(*b, wq), dwk(*b, wk), dwv(*b, wv), dbq(*b, bq), dbk(*b, bk), dbv(*b, bv), dqn(*b, qn),
          dkn(*b, kn), dth(*b, theta), q(*b, gq.size()), k(*b, gk.size()), v(*b, gv.size()), vh(*b, gv.size()),
          qr(*b, gq.size()), kr(*b, gk.size()), rq(*b, static_cast<size_t>(N) * H), rk(*b, static_cast<size_t>(N) * KV),
          dq(*b, gq), dk(*b, gk), dv(*b, gv), dx(*b, xn.size()), g_wq(*b, wq.size()), g_wk(*b, wk.size()),
          g_wv(*b, wv.size()), g_bq(*b, qd), g_bk(*b, kvd), g_bv(*b, kvd), g_qn(*b, dh), g_kn(*b, dh),
          sq(*b, gq.size()), sk(*b, gk.size());
      Backend::AttentionShape s;
      s.B = B, s.T = T, s.d = d, s.H = H, s.KV = KV, s.dh = dh, s.rope = &rope, s.vscale = VScaleMode::kVScale;
      s.vscale_c_base = 2.0;
      Backend::AttentionInputWeights w{dwq.p(), dwk.p(), dwv.p(), nullptr, nullptr, nullptr, nullptr, nullptr, dth.p()};
      Backend::AttentionInputActs a{q.p(), k.p(), v.p(), vh.p(), nullptr, nullptr, nullptr, nullptr};
      Backend::AttentionInputGrads g{g_wq.p(), g_wk.p(), g_wv.p(), nullptr, nullptr, nullptr, nullptr, nullptr};
      if (extras) {
        w.bq = dbq.p(), w.bk = dbk.p(), w.bv = dbv.p(), w.q_norm = dqn.p(), w.k_norm = dkn.p();
        a.q_raw = qr.p(), a.k_raw = kr.p(), a.rstd_q = rq.p(), a.rstd_k = rk.p();
        g.bq = g_bq.p(), g.bk = g_bk.p(), g.bv = g_bv.p(), g.q_norm = g_qn.p(), g.k_norm = g_kn.p();
      }
      b->AttentionInputForward(s, dxn.p(), w, a);
      b->AttentionInputBackward(s, dx.p(), dq.p(), dk.p(), dv.p(), dxn.p(), w, a, g, sq.p(), sk.p());
      for (Dev* o : {&q, &k, &v, &vh, &dx, &g_wq, &g_wk, &g_wv, &g_bq, &g_bk, &g_bv, &g_qn, &g_kn}) {
        outs.push_back(o->Get());
      }
    }
    const size_t n = outs.size() / 2;
    for (size_t i = 0; i < n; ++i) EXPECT_CLOSE(outs[i], outs[n + i], 0.0) << "output " << i << " extras " << extras;
  }
}

TEST_P(FusedTest, GateUpSwiGlu) {
  const int N = 6, F = 20, d = 12;
  auto x = Random(static_cast<size_t>(N) * d, rng_), wg = Random(static_cast<size_t>(F) * d, rng_, 0.4),
       wu = Random(wg.size(), rng_, 0.4), da = Random(static_cast<size_t>(N) * F, rng_);
  std::vector<std::vector<float>> outs;
  for (Backend* b : {&be(), &composed()}) {
    Dev dx_in(*b, x), dwg(*b, wg), dwu(*b, wu), dda(*b, da), act(*b, da.size()), gate(*b, da.size()), up(*b, da.size()),
        dx(*b, x.size()), gwg(*b, wg.size()), gwu(*b, wu.size()), sg(*b, da.size()), su(*b, da.size());
    b->GateUpSwiGluForward(act.p(), gate.p(), up.p(), dx_in.p(), dwg.p(), dwu.p(), N, F, d);
    b->GateUpSwiGluBackward(dx.p(), gwg.p(), gwu.p(), sg.p(), su.p(), dda.p(), gate.p(), up.p(), dx_in.p(), dwg.p(),
                            dwu.p(), N, F, d);
    for (Dev* o : {&act, &gate, &up, &dx, &gwg, &gwu}) outs.push_back(o->Get());
  }
  for (size_t i = 0; i < outs.size() / 2; ++i) EXPECT_CLOSE(outs[i], outs[outs.size() / 2 + i], 0.0) << i;
}

TEST_P(FusedTest, LmHeadCrossEntropyInChunksEqualsOnePass) {
  const int N = 10, V = 29, d = 8;
  auto x = Random(static_cast<size_t>(N) * d, rng_), w = Random(static_cast<size_t>(V) * d, rng_);
  std::vector<int32_t> targets = {1, 28, 0, 4, 4, 9, 13, 27, 2, 6};
  // The one-pass reference: logits, then the cross-entropy primitive.
  std::vector<float> want_dx, want_dw;
  double want_loss = 0, want_eval = 0;
  {
    Dev dxx(be(), x), dww(be(), w), logits(be(), static_cast<size_t>(N) * V), dx(be(), x.size()), dw(be(), w.size());
    DevInt tgt(be(), targets);
    DevScalars loss(be(), 2);
    be().Gemm(false, true, N, V, d, 1.0f, dxx.p(), dww.p(), 0.0f, logits.p());
    be().CrossEntropyLoss(logits.p(), tgt.p(), N, V, loss.p() + 1);
    be().CrossEntropyForwardBackward(logits.p(), tgt.p(), N, V, 0.1f, loss.p());
    be().Gemm(false, false, N, d, V, 1.0f, logits.p(), dww.p(), 0.0f, dx.p());
    be().Gemm(true, false, V, d, N, 1.0f, logits.p(), dxx.p(), 1.0f, dw.p());
    want_dx = dx.Get();
    want_dw = dw.Get();
    want_loss = loss.Get()[0];
    want_eval = loss.Get()[1];
  }
  for (Backend* b : {&be(), &composed()}) {
    for (int rows : {N, 4, 1}) {
      Dev dxx(*b, x), dww(*b, w), logits(*b, static_cast<size_t>(rows) * V), dx(*b, x.size()), dw(*b, w.size());
      DevInt tgt(*b, targets);
      DevScalars loss(*b, 2);
      b->LmHeadCrossEntropy(dx.p(), dw.p(), logits.p(), rows, dxx.p(), dww.p(), tgt.p(), N, V, d, 0.1f, loss.p());
      b->LmHeadLoss(logits.p(), rows, dxx.p(), dww.p(), tgt.p(), N, V, d, loss.p() + 1);
      // One chunk is the one pass exactly; smaller chunks change the order in which dW's
      // rows and the loss are summed, and a GEMM of fewer rows may take another kernel
      // (OpenBLAS computes a one-row product as a GEMV: logits an ulp apart), so the
      // loss of a chunked pass is held to a few roundings, not to the last bit.
      const double tol = rows == N ? 0.0 : kFew;
      const double loss_tol = rows == N ? 1e-12 : kFew;
      EXPECT_CLOSE(dx.Get(), want_dx, tol) << rows;
      EXPECT_CLOSE(dw.Get(), want_dw, tol) << rows;
      EXPECT_NEAR(loss.Get()[0], want_loss, loss_tol * want_loss) << rows;
      EXPECT_NEAR(loss.Get()[1], want_eval, loss_tol * want_eval) << rows;
    }
  }
}

TEST_P(FusedTest, MultiTensorAdamWWithClippingAndTheNonFiniteGuard) {
  auto p1 = Random(17, rng_), g1 = Random(17, rng_, 3.0), p2 = Random(5, rng_), g2 = Random(5, rng_, 3.0);
  const std::vector<float> zeros17(17, 0.0f), zeros5(5, 0.0f);
  for (double loss : {1.5, static_cast<double>(NAN), static_cast<double>(INFINITY)}) {
    std::vector<std::vector<float>> outs;
    for (Backend* b : {&be(), &composed()}) {
      Dev a(*b, p1), ga(*b, g1), ma(*b, zeros17), va(*b, zeros17), c(*b, p2), gc(*b, g2), mc(*b, zeros5),
          vc(*b, zeros5);
      DevScalars guard(*b, 2);
      double host[2] = {loss, 0};
      b->ReadScalars(host + 1, guard.p(), 1);  // 0
      // Fill the guard: loss in [0], ‖g‖² in [1].
      b->AccumulateGlobalSumSquares(guard.p() + 1, {{ga.p(), 17}, {gc.p(), 5}});
      std::vector<double> g = guard.Get();
      // The loss slot through a cross-entropy of one row is awkward; write it as a sum
      // of squares of one value instead: √loss² = |loss| (NaN and Inf survive).
      std::vector<float> lv = {static_cast<float>(std::sqrt(std::abs(loss)))};
      if (!std::isfinite(loss)) lv[0] = static_cast<float>(loss);
      Dev l(*b, lv);
      b->AccumulateSumSquares(guard.p(), l.p(), 1);
      Backend::AdamWHyper h;
      h.lr = 1e-2f;
      h.grad_clip = 1.0;  // ‖g‖ ≈ 3·√22: clipped
      h.step = 2;
      b->MultiTensorAdamW({{a.p(), ma.p(), va.p(), ga.p(), 17, 0.1f}, {c.p(), mc.p(), vc.p(), gc.p(), 5, 0.0f}}, h,
                          guard.p());
      ASSERT_GT(g[1], 1.0);
      for (Dev* o : {&a, &ma, &va, &c, &mc, &vc}) outs.push_back(o->Get());
    }
    for (size_t i = 0; i < outs.size() / 2; ++i) EXPECT_CLOSE(outs[i], outs[outs.size() / 2 + i], 0.0) << i;
    if (std::isfinite(loss)) {
      EXPECT_GT(NormError(outs[0], p1), 0.0) << "a finite step updates";
    } else {
      EXPECT_EQ(NormError(outs[0], p1), 0.0) << "no update when the loss is " << loss;
      EXPECT_EQ(NormError(outs[1], zeros17), 0.0);
    }
  }
}

#ifndef SINKSCOPE_PARITY_CUDA  // the CPU bf16 mode's own tests, once
// ---- bf16 -----------------------------------------------------------------------------

TEST(Bf16Test, RoundsToNearestTiesToEvenAndKeepsNaNAndInf) {
  auto bits = [](float x) {
    uint32_t b;
    std::memcpy(&b, &x, 4);
    return b;
  };
  auto from = [](uint32_t b) {
    float x;
    std::memcpy(&x, &b, 4);
    return x;
  };
  EXPECT_EQ(RoundToBf16(1.0f), 1.0f);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1); just above it rounds up.
  EXPECT_EQ(RoundToBf16(1.0f + 0x1p-8f), 1.0f);
  EXPECT_EQ(RoundToBf16(from(bits(1.0f + 0x1p-8f) + 1)), 1.0f + 0x1p-7f);
  // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): up.
  EXPECT_EQ(RoundToBf16(1.0f + 3 * 0x1p-8f), 1.0f + 0x1p-6f);
  EXPECT_EQ(RoundToBf16(-2.5f), -2.5f);
  EXPECT_TRUE(std::isnan(RoundToBf16(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(std::isnan(RoundToBf16(from(0x7F800001u))));  // a signalling NaN stays a NaN
  EXPECT_EQ(RoundToBf16(INFINITY), INFINITY);
  EXPECT_EQ(RoundToBf16(-INFINITY), -INFINITY);
  EXPECT_EQ(RoundToBf16(std::numeric_limits<float>::max()), INFINITY);  // beyond bf16's largest
  Rng rng(9);
  for (int i = 0; i < 10000; ++i) {
    const float x = static_cast<float>(rng.Normal() * 100);
    const float r = RoundToBf16(x);
    EXPECT_EQ(bits(r) & 0xFFFFu, 0u);
    EXPECT_LE(std::abs(r - x), std::abs(x) * 0x1p-8f);  // half an ulp of 7 mantissa bits
  }
}

bool AllBf16(const std::vector<float>& v) {
  for (float x : v) {
    if (RoundToBf16(x) != x) return false;
  }
  return true;
}

// What the bf16 mode stores in bf16 is bf16-exact; what the contract keeps in fp32 is not
// rounded (cpu/bf16_mode.cc).
TEST(Bf16Test, TheModeRoundsExactlyWhereTheContractSays) {
  auto be = MakeCpuBf16Backend();
  Rng rng(5);
  const int N = 6, d = 16, F = 24, m = 5, n = 7, k = 33;
  auto x = Random(static_cast<size_t>(N) * d, rng), gamma = Random(d, rng);
  Dev dx(*be, x), dg(*be, gamma), out(*be, x.size()), rstd(*be, N);
  be->RmsNormForward(out.p(), rstd.p(), dx.p(), dg.p(), N, d, 1e-5f);
  EXPECT_TRUE(AllBf16(out.Get()));
  EXPECT_FALSE(AllBf16(rstd.Get()));  // fp32
  // GEMM: bf16 operands, fp32 output — the fp32 product of the rounded operands.
  auto a = Random(static_cast<size_t>(m) * k, rng), b = Random(static_cast<size_t>(k) * n, rng);
  Dev da(*be, a), db(*be, b), dc(*be, static_cast<size_t>(m) * n);
  be->Gemm(false, false, m, n, k, 1.0f, da.p(), db.p(), 0.0f, dc.p());
  std::vector<float> ra = a, rb = b;
  for (float& v : ra) v = RoundToBf16(v);
  for (float& v : rb) v = RoundToBf16(v);
  EXPECT_LE(NormError(dc.Get(), RefGemm(false, false, m, n, k, 1.0, ra, rb, 0.0, std::vector<float>(m * n))), kSum);
  EXPECT_GT(NormError(dc.Get(), RefGemm(false, false, m, n, k, 1.0, a, b, 0.0, std::vector<float>(m * n))), 1e-4);
  EXPECT_FALSE(AllBf16(dc.Get()));
  auto wg = Random(static_cast<size_t>(F) * d, rng), wu = Random(wg.size(), rng);
  Dev dwg(*be, wg), dwu(*be, wu), act(*be, static_cast<size_t>(N) * F), gate(*be, static_cast<size_t>(N) * F),
      up(*be, static_cast<size_t>(N) * F);
  be->GateUpSwiGluForward(act.p(), gate.p(), up.p(), dx.p(), dwg.p(), dwu.p(), N, F, d);
  EXPECT_TRUE(AllBf16(gate.Get()));
  EXPECT_TRUE(AllBf16(up.Get()));
  EXPECT_TRUE(AllBf16(act.Get()));
}

// A training step in the bf16 mode against fp32: the loss and every gradient to bf16's
// precision, and a short run learns as fp32 does.
TEST(Bf16Test, TheBf16ModeTrainsLikeFp32) {
  const ModelConfig c = SmallModel(50, 16, VScaleMode::kVScale);
  auto fp32 = MakeCpuBackend(), bf16 = MakeCpuBf16Backend();
  auto a = Model::Create(c, fp32.get()), b = Model::Create(c, bf16.get());
  ASSERT_TRUE(a.ok() && b.ok());
  (*a)->InitWeights(4);
  (*b)->InitWeights(4);
  const int B = 4, T = 16;
  std::vector<int32_t> tokens(B * T), targets(B * T);
  for (int i = 0; i < B * T; ++i) {
    tokens[i] = (i * 7 + i / 5) % 50;
    targets[i] = (i * 7 + i / 5 + 3) % 50;
  }
  const double la = (*a)->ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T));
  const double lb = (*b)->ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T));
  EXPECT_NEAR(lb, la, 1e-2 * la);
  EXPECT_LE(NormError((*b)->GradsToHost(), (*a)->GradsToHost()), 5e-2);
  // 40 AdamW steps on one batch: both fit it, the bf16 mode to within 5% of fp32's loss.
  OptimizerConfig o;
  o.lr = 3e-3;
  o.total_steps = 40;
  double last_a = 0, last_b = 0;
  for (int step = 0; step < 40; ++step) {
    for (auto* m : {a->get(), b->get()}) {
      m->ZeroGrad();
      const double l = m->ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T));
      (m == a->get() ? last_a : last_b) = l;
      AdamWStep(*m, o, step);
    }
  }
  EXPECT_LT(last_a, 0.7 * la);
  EXPECT_NEAR(last_b, last_a, 0.05 * last_a);
}

#endif

std::string FactoryName(const ::testing::TestParamInfo<Factory>& info) { return info.param.name; }
INSTANTIATE_TEST_SUITE_P(Backends, ParityTest, ::testing::ValuesIn(Factories()), FactoryName);
// Fused against composed is exact only for fp32 backends: the bf16 mode rounds where a
// fused kernel stores (gate and up before SwiGLU), which its composition does not.
INSTANTIATE_TEST_SUITE_P(Backends, FusedTest, ::testing::ValuesIn(Fp32Factories()), FactoryName);

}  // namespace
}  // namespace sinkscope

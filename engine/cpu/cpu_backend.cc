// The CPU reference backend: fp32, deterministic, OpenBLAS sgemm for the matmuls and
// plain loops for everything else. Each loop is written to be checked against the
// formula in METRICS.md; parallel loops split over independent outputs only, so results
// do not depend on the thread count or schedule.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "engine/backend.h"

namespace sinkscope {
namespace {

// e^x in float, written so that loops over it vectorise (libm's expf is a call per
// element): x = k·ln2 + r with |r| ≤ ln2/2 (Cody–Waite, two-part ln2), e^r by its Taylor
// polynomial to r⁷ (truncation < 1e-8 relative), 2^k from the exponent bits. Within 2 ulp
// of the true value on [−80, 88]; beyond, clamped (e^−80 ≈ 1.8e−35, far from subnormal
// numbers, which are slow; e^88 ≈ 1.7e38). NaN in, NaN out. The clamps are the
// comparisons MINPS/MAXPS implement (a NaN would become a bound there, so the input NaN
// is put back at the end); with -fno-trapping-math (engine/CMakeLists.txt) the loops
// around this vectorise. tests/backend_parity_test holds its users to float64.
inline float ExpF(float x0) {
  float x = x0 < 88.0f ? x0 : 88.0f;
  x = x > -80.0f ? x : -80.0f;
  // t's low mantissa bits hold k = round(x/ln2) (|k| < 2^22): read as an integer.
  const float t = x * 1.44269504088896341f + 12582912.0f;
  int32_t tbits;
  std::memcpy(&tbits, &t, sizeof tbits);
  const float kf = t - 12582912.0f;
  const float r = (x - kf * 0.693145751953125f) - kf * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (tbits - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float e = p * scale;
  return x0 == x0 ? e : x0;
}

class CpuBackend final : public Backend {
 public:
  const char* Name() const override { return "cpu"; }
  bool Supports(OptionalOp) const override { return true; }

  // 256-byte aligned, as cudaMalloc: a tensor's aligned offset is then aligned in memory too.
  float* Alloc(size_t n) override { return static_cast<float*>(AllocBytes(std::max<size_t>(n, 1) * sizeof(float))); }
  void* AllocBytes(size_t bytes) override {
    const size_t rounded = (std::max<size_t>(bytes, 1) + Arena::kAlign - 1) / Arena::kAlign * Arena::kAlign;
    void* p = std::aligned_alloc(Arena::kAlign, rounded);
    if (p != nullptr) std::memset(p, 0, rounded);
    return p;
  }
  int32_t* AllocInt(size_t n) override {
    return static_cast<int32_t*>(std::calloc(std::max<size_t>(n, 1), sizeof(int32_t)));
  }
  void Free(void* p) override { std::free(p); }
  void ToDevice(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void ToHost(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void Copy(float* dst, const float* src, size_t n) override { std::memcpy(dst, src, n * sizeof(float)); }
  void Fill(float* x, float value, size_t n) override { std::fill(x, x + n, value); }
  double* AllocScalars(size_t n) override {
    return static_cast<double*>(std::calloc(std::max<size_t>(n, 1), sizeof(double)));
  }
  void ZeroScalars(double* s, size_t n) override { std::fill(s, s + n, 0.0); }
  void ReadScalars(double* host, const double* s, size_t n) override { std::memcpy(host, s, n * sizeof(double)); }

  void Axpy(float* y, float alpha, const float* x, size_t n) override {
    for (size_t i = 0; i < n; ++i) y[i] += alpha * x[i];
  }
  void Scale(float* x, float s, size_t n) override {
    for (size_t i = 0; i < n; ++i) x[i] *= s;
  }
  void AddRowBias(TensorView x_v, const float* b, int N, int n) override {
    float* x = x_v.f32("cpu AddRowBias");
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; ++i) {
      float* row = x + static_cast<size_t>(i) * n;
      for (int j = 0; j < n; ++j) row[j] += b[j];
    }
  }
  void AccumulateColumnSums(float* acc, const float* x, int N, int n) override {
#pragma omp parallel for schedule(static)
    for (int j = 0; j < n; ++j) {  // each column in row order: a fixed summation order
      float s = 0;
      for (int i = 0; i < N; ++i) s += x[static_cast<size_t>(i) * n + j];
      acc[j] += s;
    }
  }
  void AccumulateSumSquares(double* acc, const float* x, size_t n) override {
    double s = 0;
    for (size_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * x[i];
    *acc += s;
  }

  void AccumulateTokenSum(float* acc, const float* x, int B, int T, int C, int P) override {
    for (int t = 0; t < P; ++t) {
      float* out = acc + static_cast<size_t>(t) * C;
      for (int b = 0; b < B; ++b) {
        const float* row = x + (static_cast<size_t>(b) * T + t) * C;
        for (int c = 0; c < C; ++c) out[c] += row[c];
      }
    }
  }

  void AccumulateTokenNormSum(float* acc, TensorView x_v, int B, int T, int G, int C, int P) override {
    const float* x = x_v.f32("cpu AccumulateTokenNormSum");
    for (int t = 0; t < P; ++t) {
      double total = 0;
      for (int b = 0; b < B; ++b) {
        for (int g = 0; g < G; ++g) {
          const float* row = x + ((static_cast<size_t>(b) * T + t) * G + g) * C;
          double s = 0;
          for (int c = 0; c < C; ++c) s += static_cast<double>(row[c]) * row[c];
          total += std::sqrt(s);
        }
      }
      acc[t] += static_cast<float>(total);
    }
  }

  void Gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, TensorView a_v, TensorView b_v, float beta,
            TensorView c_v) override {
    const float* a = a_v.f32("cpu Gemm");
    const float* b = b_v.f32("cpu Gemm");
    float* c = c_v.f32("cpu Gemm");
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, m, n, k,
                alpha, a, trans_a ? m : k, b, trans_b ? k : n, beta, c, n);
  }

  void EmbeddingForward(float* out, const int32_t* tokens, const float* table, int N, int d) override {
    for (int i = 0; i < N; ++i) std::memcpy(out + static_cast<size_t>(i) * d, table + static_cast<size_t>(tokens[i]) * d, d * sizeof(float));
  }
  void EmbeddingBackward(float* dtable, const float* dout, const int32_t* tokens, int N, int d) override {
    for (int i = 0; i < N; ++i) {  // serial: rows of one token add up in a fixed order
      float* row = dtable + static_cast<size_t>(tokens[i]) * d;
      const float* g = dout + static_cast<size_t>(i) * d;
      for (int c = 0; c < d; ++c) row[c] += g[c];
    }
  }

  // Sums in float with an OpenMP SIMD reduction: vectorised, and deterministic (the
  // vector width is fixed when this file is compiled, not by the thread count).
  static void RmsNormRow(float* oi, float* rstd_i, const float* xi, const float* gamma, int d, float eps) {
    float ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int c = 0; c < d; ++c) ss += xi[c] * xi[c];
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    *rstd_i = r;
#pragma omp simd
    for (int c = 0; c < d; ++c) oi[c] = xi[c] * r * gamma[c];
  }
  void RmsNormForward(TensorView out_v, float* rstd, TensorView x_v, const float* gamma, int N, int d,
                      float eps) override {
    float* out = out_v.f32("cpu RmsNormForward");
    const float* x = x_v.f32("cpu RmsNormForward");
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; ++i) {
      RmsNormRow(out + static_cast<size_t>(i) * d, rstd + i, x + static_cast<size_t>(i) * d, gamma, d, eps);
    }
  }
  // One pass per row: the residual sum, then its norm while the row is in cache.
  void ResidualRmsNormForward(float* sum, TensorView out_v, float* rstd, const float* x, const float* r,
                              const float* gamma, int N, int d, float eps) override {
    float* out = out_v.f32("cpu ResidualRmsNormForward");
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; ++i) {
      const size_t o = static_cast<size_t>(i) * d;
      for (int c = 0; c < d; ++c) sum[o + c] = x[o + c] + r[o + c];
      RmsNormRow(out + o, rstd + i, sum + o, gamma, d, eps);
    }
  }

  // dx = d_residual + J_rmsᵀ dout in one pass (the composition copies first).
  void RmsNormBackwardResidual(float* dx, float* dgamma, const float* d_residual, const float* dout, const float* x,
                               const float* gamma, const float* rstd, int N, int d) override {
    RmsNormBackwardRows(dx, d_residual, dout, x, gamma, rstd, N, d);
    RmsNormGammaGrad(dgamma, dout, x, rstd, N, d);
  }
  void RmsNormBackward(float* dx, float* dgamma, const float* dout, TensorView x_v, const float* gamma,
                       const float* rstd, int N, int d) override {
    const float* x = x_v.f32("cpu RmsNormBackward");
    RmsNormBackwardRows(dx, dx, dout, x, gamma, rstd, N, d);
    RmsNormGammaGrad(dgamma, dout, x, rstd, N, d);
  }
  // dx = base + J_rmsᵀ dout row by row (base may be dx itself: +=).
  static void RmsNormBackwardRows(float* dx, const float* base, const float* dout, const float* x, const float* gamma,
                                  const float* rstd, int N, int d) {
    // y_c = γ_c x_c r, r = (mean(x²)+eps)^(-1/2):
    // dx_c = r γ_c g_c − r³ x_c (1/d) Σ_j γ_j g_j x_j.
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; ++i) {
      const float* xi = x + static_cast<size_t>(i) * d;
      const float* gi = dout + static_cast<size_t>(i) * d;
      float* dxi = dx + static_cast<size_t>(i) * d;
      const float r = rstd[i];
      float dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int c = 0; c < d; ++c) dot += gamma[c] * gi[c] * xi[c];
      const float coef = r * r * r * dot / static_cast<float>(d);
      const float* bi = base + static_cast<size_t>(i) * d;
#pragma omp simd
      for (int c = 0; c < d; ++c) dxi[c] = bi[c] + (r * gamma[c] * gi[c] - coef * xi[c]);
    }
  }
  static void RmsNormGammaGrad(float* dgamma, const float* dout, const float* x, const float* rstd, int N, int d) {
    // Each column over the rows in order: a fixed summation order whatever the threads.
#pragma omp parallel for schedule(static)
    for (int c = 0; c < d; ++c) {
      float acc = dgamma[c];
      for (int i = 0; i < N; ++i) {
        const size_t o = static_cast<size_t>(i) * d + c;
        acc += dout[o] * x[o] * rstd[i];
      }
      dgamma[c] = acc;
    }
  }

  void Rope(float* x, int B, int T, int heads, int dh, const RotaryFrequencies& rope, double sign) {
    const int half = dh / 2;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; ++t) {
      std::vector<float> cs(half), sn(half);
      for (int i = 0; i < half; ++i) {
        const double ang = static_cast<double>(t) * rope.inv_freq[i];  // in double
        cs[i] = static_cast<float>(rope.attention_factor * std::cos(ang));
        sn[i] = static_cast<float>(sign * rope.attention_factor * std::sin(ang));
      }
      for (int b = 0; b < B; ++b) {
        for (int h = 0; h < heads; ++h) {
          float* p = x + ((static_cast<size_t>(b) * T + t) * heads + h) * dh;
          for (int i = 0; i < half; ++i) {
            // (x1, x2) → (x1 cos − x2 sin, x2 cos + x1 sin): x·cos + rotate_half(x)·sin.
            const float x1 = p[i], x2 = p[i + half];
            p[i] = x1 * cs[i] - x2 * sn[i];
            p[i + half] = x2 * cs[i] + x1 * sn[i];
          }
        }
      }
    }
  }
  void RopeForward(TensorView x_v, int B, int T, int heads, int dh, const RotaryFrequencies& rope) override {
    float* x = x_v.f32("cpu RopeForward");
    Rope(x, B, T, heads, dh, rope, 1.0);
  }
  void RopeBackward(float* dx, int B, int T, int heads, int dh, const RotaryFrequencies& rope) override {
    Rope(dx, B, T, heads, dh, rope, -1.0);  // a scaled rotation: its transpose is the opposite angle
  }

  // The workspace keeps the full causal attention matrix a (B,H,T,T), rows t, columns
  // u ≤ t; entries above the diagonal stay zero.
  size_t AttentionWorkspaceFloats(int B, int T, int H) const override {
    return static_cast<size_t>(B) * H * T * T;
  }

  // Per (b, h): S = Q Kᵀ/√dh as one sgemm over the (T, dh) slices (strided views of
  // q and k, GQA by pointing at KV head h/(H/KV)), the causal softmax row by row in
  // place (the matrix is kept for the backward), then Y = P V as one sgemm. The GEMMs do
  // the full T×T square; the masked half is zero. Each (b, h) is one OpenMP task;
  // OpenBLAS runs single-threaded inside a parallel region, so results do not depend on
  // the thread count.
  void AttentionForward(TensorView y_v, float* lse, float* att, TensorView q_v, TensorView k_v, TensorView v_v, int B,
                        int T, int H, int KV, int dh) override {
    float* y = y_v.f32("cpu AttentionForward");
    const float* q = q_v.f32("cpu AttentionForward");
    const float* k = k_v.f32("cpu AttentionForward");
    const float* v = v_v.f32("cpu AttentionForward");
    const int group = H / KV;
    const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
    const int ldq = H * dh, ldk = KV * dh;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; ++b) {
      for (int h = 0; h < H; ++h) {
        const int g = h / group;
        float* a = att + (static_cast<size_t>(b) * H + h) * T * T;
        const float* qb = q + static_cast<size_t>(b) * T * ldq + h * dh;
        const float* kb = k + static_cast<size_t>(b) * T * ldk + g * dh;
        const float* vb = v + static_cast<size_t>(b) * T * ldk + g * dh;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, dh, scale, qb, ldq, kb, ldk, 0.0f, a, T);
        for (int t = 0; t < T; ++t) {
          float* row = a + static_cast<size_t>(t) * T;
          float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
          for (int u = 0; u <= t; ++u) mx = row[u] > mx ? row[u] : mx;  // causal: keys u ≤ t
          float sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int u = 0; u <= t; ++u) {
            row[u] = ExpF(row[u] - mx);
            sum += row[u];
          }
          const float inv = 1.0f / sum;
          lse[(static_cast<size_t>(b) * H + h) * T + t] = mx + std::log(sum);
          for (int u = 0; u <= t; ++u) row[u] *= inv;
          for (int u = t + 1; u < T; ++u) row[u] = 0.0f;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, dh, T, 1.0f, a, T, vb, ldk, 0.0f,
                    y + static_cast<size_t>(b) * T * ldq + h * dh, ldq);
      }
    }
  }

  // Per (b, KV group): for each query head of the group, dP = dY Vᵀ (sgemm), the
  // softmax backward dS = P ⊙ (dP − rowsum(P ⊙ dP))/√dh in place, then dQ = dS K,
  // dK += dSᵀ Q and dV += Pᵀ dY (sgemms). The stored matrix makes y and lse unneeded
  // here; a flash backward recomputes P from them.
  void AttentionBackward(float* dq, float* dk, float* dv, const float* dy, TensorView /*y*/,
                         const float* /*lse*/, const float* att, TensorView q_v, TensorView k_v, TensorView v_v,
                         int B, int T, int H, int KV, int dh) override {
    const float* q = q_v.f32("cpu AttentionBackward");
    const float* k = k_v.f32("cpu AttentionBackward");
    const float* v = v_v.f32("cpu AttentionBackward");
    const int group = H / KV;
    const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
    const int ldq = H * dh, ldk = KV * dh;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; ++b) {
      for (int g = 0; g < KV; ++g) {
        std::vector<float> ds(static_cast<size_t>(T) * T);
        const float* kb = k + static_cast<size_t>(b) * T * ldk + g * dh;
        const float* vb = v + static_cast<size_t>(b) * T * ldk + g * dh;
        float* dkb = dk + static_cast<size_t>(b) * T * ldk + g * dh;
        float* dvb = dv + static_cast<size_t>(b) * T * ldk + g * dh;
        for (int h = g * group; h < (g + 1) * group; ++h) {
          const float* a = att + (static_cast<size_t>(b) * H + h) * T * T;
          const float* dyb = dy + static_cast<size_t>(b) * T * ldq + h * dh;
          const float* qb = q + static_cast<size_t>(b) * T * ldq + h * dh;
          const float beta = h == g * group ? 0.0f : 1.0f;  // the group's first head writes dK, dV
          // dV (+)= Pᵀ dY  (Proposition 1: ∂L/∂v̂_u = Σ_t a[t,u] ∂L/∂y_t)
          cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, dh, T, 1.0f, a, T, dyb, ldq, beta, dvb, ldk);
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, dh, 1.0f, dyb, ldq, vb, ldk, 0.0f, ds.data(), T);
          for (int t = 0; t < T; ++t) {
            const float* p = a + static_cast<size_t>(t) * T;
            float* d = ds.data() + static_cast<size_t>(t) * T;
            float dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int u = 0; u <= t; ++u) dot += p[u] * d[u];
#pragma omp simd
            for (int u = 0; u <= t; ++u) d[u] = p[u] * (d[u] - dot) * scale;
            for (int u = t + 1; u < T; ++u) d[u] = 0.0f;
          }
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, dh, T, 1.0f, ds.data(), T, kb, ldk, 0.0f,
                      dq + static_cast<size_t>(b) * T * ldq + h * dh, ldq);
          cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, dh, T, 1.0f, ds.data(), T, qb, ldq, beta, dkb, ldk);
        }
      }
    }
  }

  void AttentionColumnStats(float* alpha, float* mass, float* second_moment, float* per_sample_rate, TensorView q_v,
                            TensorView k_v, const float* lse, int B, int T, int H, int KV, int dh,
                            const ColumnStatsRequest& request) override {
    const float* q = q_v.f32("cpu AttentionColumnStats");
    const float* k = k_v.f32("cpu AttentionColumnStats");
    const int group = H / KV;
    const int s = request.sink_position;
    const int window = std::min(request.window, T - s);
    const double scale = 1.0 / std::sqrt(static_cast<double>(dh));
    for (int h = 0; h < H; ++h) {
      const int g = h / group;
      double alpha_sum = 0, mass_sum = 0, sq_sum = 0;
      int above = 0;
      for (int b = 0; b < B; ++b) {
        double alpha_b = 0;
        const float* ks = k + ((static_cast<size_t>(b) * T + s) * KV + g) * dh;
        for (int t = s; t < T; ++t) {
          // a[t,s] = exp(score(t,s) − lse_t): column s alone, from the forward's log-sum-exp.
          const float* qt = q + ((static_cast<size_t>(b) * T + t) * H + h) * dh;
          double dot = 0;
          for (int c = 0; c < dh; ++c) dot += static_cast<double>(qt[c]) * ks[c];
          const double a_ts = std::exp(dot * scale - lse[(static_cast<size_t>(b) * H + h) * T + t]);
          mass_sum += a_ts;
          sq_sum += a_ts * a_ts;
          if (t < s + window) alpha_b += a_ts;
        }
        alpha_b /= window;
        alpha_sum += alpha_b;
        if (alpha_b > request.threshold) ++above;
      }
      alpha[h] = static_cast<float>(alpha_sum / B);
      mass[h] = static_cast<float>(mass_sum / B);
      second_moment[h] = static_cast<float>(sq_sum / B);
      per_sample_rate[h] = static_cast<float>(static_cast<double>(above) / B);
    }
  }

  // --- attention arms (docs/design/ARMS.md) -------------------------------------------
  // The workspace keeps the scaled scores z (B,H,T,T) and two numbers per row (B,H,T,2):
  // softpick's shift m and its shifted denominator D' (unused by the other kinds).
  size_t ArmAttentionWorkspaceFloats(int B, int T, int H) const override {
    return static_cast<size_t>(B) * H * T * T + static_cast<size_t>(B) * H * T * 2;
  }

  // Per (b, h): Z = Q Kᵀ/√dh (sgemm), then each row t's weights over keys u ≤ t in
  // double by the arm's formula, then Y = A V (sgemm). Rows are written to be read
  // against ARMS.md.
  void ArmAttentionForward(TensorView y_v, float* att, float* unassigned, float* ws, TensorView q_v, TensorView k_v,
                           TensorView v_v, const float* sink, int B, int T, int H, int KV, int dh,
                           const AttentionArmParams& arm) override {
    float* y = y_v.f32("cpu ArmAttentionForward");
    const float* q = q_v.f32("cpu ArmAttentionForward");
    const float* k = k_v.f32("cpu ArmAttentionForward");
    const float* v = v_v.f32("cpu ArmAttentionForward");
    const int group = H / KV;
    const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
    const int ldq = H * dh, ldk = KV * dh;
    float* rows = ws + static_cast<size_t>(B) * H * T * T;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; ++b) {
      for (int h = 0; h < H; ++h) {
        const int g = h / group;
        const size_t bh = static_cast<size_t>(b) * H + h;
        float* z = ws + bh * T * T;
        float* a = att + bh * T * T;
        const float* qb = q + static_cast<size_t>(b) * T * ldq + h * dh;
        const float* kb = k + static_cast<size_t>(b) * T * ldk + g * dh;
        const float* vb = v + static_cast<size_t>(b) * T * ldk + g * dh;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, dh, scale, qb, ldq, kb, ldk, 0.0f, z, T);
        for (int t = 0; t < T; ++t) {
          const float* zt = z + static_cast<size_t>(t) * T;
          float* at = a + static_cast<size_t>(t) * T;
          double assigned = 0;
          switch (arm.kind) {
            case AttentionKind::kSinkLogit:
            case AttentionKind::kSoftmaxPlusOne: {
              // a = exp(z)/(exp(s_h) + Σ exp(z)); shifted by m = max(max z, s_h).
              const double s_h = sink != nullptr ? sink[h] : 0.0;
              double m = s_h;
              for (int u = 0; u <= t; ++u) m = std::max(m, static_cast<double>(zt[u]));
              double den = std::exp(s_h - m);
              for (int u = 0; u <= t; ++u) den += std::exp(zt[u] - m);
              for (int u = 0; u <= t; ++u) {
                at[u] = static_cast<float>(std::exp(zt[u] - m) / den);
                assigned += at[u];
              }
              unassigned[bh * T + t] = static_cast<float>(std::exp(s_h - m) / den);  // the virtual sink's share
              break;
            }
            case AttentionKind::kSigmoid:
              for (int u = 0; u <= t; ++u) {
                at[u] = static_cast<float>(1.0 / (1.0 + std::exp(-(zt[u] + static_cast<double>(arm.sigmoid_bias)))));
                assigned += at[u];
              }
              unassigned[bh * T + t] = static_cast<float>(1.0 - assigned);
              break;
            case AttentionKind::kSoftpick: {
              // ReLU(e^z − 1)/(Σ|e^z − 1| + ε), numerator and denominator times e^−m,
              // m = max(max z, 0): e^(z−m) ≤ 1 and e^−m ≤ 1 never overflow.
              double m = 0;
              for (int u = 0; u <= t; ++u) m = std::max(m, static_cast<double>(zt[u]));
              const double c = std::exp(-m);
              double den = arm.softpick_eps * c;
              for (int u = 0; u <= t; ++u) den += std::abs(std::exp(zt[u] - m) - c);
              for (int u = 0; u <= t; ++u) {
                at[u] = static_cast<float>(std::max(std::exp(zt[u] - m) - c, 0.0) / den);
                assigned += at[u];
              }
              rows[(bh * T + t) * 2] = static_cast<float>(m);
              rows[(bh * T + t) * 2 + 1] = static_cast<float>(den);
              unassigned[bh * T + t] = static_cast<float>(1.0 - assigned);
              break;
            }
            case AttentionKind::kSoftmax:
              std::fprintf(stderr, "sinkscope: ArmAttentionForward is not the softmax path\n");
              std::abort();
          }
          for (int u = t + 1; u < T; ++u) at[u] = 0.0f;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, dh, T, 1.0f, a, T, vb, ldk, 0.0f,
                    y + static_cast<size_t>(b) * T * ldq + h * dh, ldq);
      }
    }
  }

  // Per (b, KV group), as AttentionBackward: dV (+)= Aᵀ dY, dA = dY Vᵀ, then dZ row by
  // row by the arm's Jacobian (ARMS.md), then dQ = dZ K/√dh and dK (+)= dZᵀ Q/√dh.
  void ArmAttentionBackward(float* dq, float* dk, float* dv, float* dsink, const float* dy, TensorView /*y*/,
                            const float* att, const float* unassigned, const float* ws, TensorView q_v,
                            TensorView k_v, TensorView v_v,
                            const float* sink, int B, int T, int H, int KV, int dh,
                            const AttentionArmParams& arm) override {
    const float* q = q_v.f32("cpu ArmAttentionBackward");
    const float* k = k_v.f32("cpu ArmAttentionBackward");
    const float* v = v_v.f32("cpu ArmAttentionBackward");
    const int group = H / KV;
    const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
    const int ldq = H * dh, ldk = KV * dh;
    const float* rows = ws + static_cast<size_t>(B) * H * T * T;
    // ∂L/∂s_h per (b, h), summed over b afterwards in a fixed order (deterministic).
    std::vector<double> dsink_bh(static_cast<size_t>(B) * H, 0.0);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; ++b) {
      for (int g = 0; g < KV; ++g) {
        std::vector<float> dz(static_cast<size_t>(T) * T);
        const float* kb = k + static_cast<size_t>(b) * T * ldk + g * dh;
        const float* vb = v + static_cast<size_t>(b) * T * ldk + g * dh;
        float* dkb = dk + static_cast<size_t>(b) * T * ldk + g * dh;
        float* dvb = dv + static_cast<size_t>(b) * T * ldk + g * dh;
        for (int h = g * group; h < (g + 1) * group; ++h) {
          const size_t bh = static_cast<size_t>(b) * H + h;
          const float* a = att + bh * T * T;
          const float* z = ws + bh * T * T;
          const float* dyb = dy + static_cast<size_t>(b) * T * ldq + h * dh;
          const float* qb = q + static_cast<size_t>(b) * T * ldq + h * dh;
          const float beta = h == g * group ? 0.0f : 1.0f;
          // dV (+)= Aᵀ dY  (Proposition 1 holds for any A: ∂L/∂v̂_u = Σ_t a[t,u] ∂L/∂y_t)
          cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, dh, T, 1.0f, a, T, dyb, ldq, beta, dvb, ldk);
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, dh, 1.0f, dyb, ldq, vb, ldk, 0.0f, dz.data(), T);
          for (int t = 0; t < T; ++t) {
            const float* at = a + static_cast<size_t>(t) * T;
            const float* zt = z + static_cast<size_t>(t) * T;
            float* d = dz.data() + static_cast<size_t>(t) * T;  // holds dA[t,·] on entry
            double dot = 0;  // Σ_u a[t,u]·dA[t,u]
            for (int u = 0; u <= t; ++u) dot += static_cast<double>(at[u]) * d[u];
            switch (arm.kind) {
              case AttentionKind::kSinkLogit:
              case AttentionKind::kSoftmaxPlusOne:
                // Softmax over the keys and the sink column, whose value is zero (dA = 0):
                // dz = a(dA − dot), ds_h = p_sink·(0 − dot).
                for (int u = 0; u <= t; ++u) d[u] = static_cast<float>(at[u] * (d[u] - dot) * scale);
                dsink_bh[bh] -= static_cast<double>(unassigned[bh * T + t]) * dot;
                break;
              case AttentionKind::kSigmoid:
                for (int u = 0; u <= t; ++u) d[u] = static_cast<float>(d[u] * at[u] * (1.0 - at[u]) * scale);
                break;
              case AttentionKind::kSoftpick: {
                // dz_u = (e^(z_u−m)/D')·(1[e^z_u > 1]·dA_u − sign(e^z_u − 1)·dot).
                const double m = rows[(bh * T + t) * 2], den = rows[(bh * T + t) * 2 + 1], c = std::exp(-m);
                for (int u = 0; u <= t; ++u) {
                  const double e = std::exp(zt[u] - m), diff = e - c;
                  const double sign = diff > 0 ? 1.0 : diff < 0 ? -1.0 : 0.0;
                  d[u] = static_cast<float>(e / den * ((diff > 0 ? d[u] : 0.0) - sign * dot) * scale);
                }
                break;
              }
              case AttentionKind::kSoftmax:
                std::fprintf(stderr, "sinkscope: ArmAttentionBackward is not the softmax path\n");
                std::abort();
            }
            for (int u = t + 1; u < T; ++u) d[u] = 0.0f;
          }
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, dh, T, 1.0f, dz.data(), T, kb, ldk, 0.0f,
                      dq + static_cast<size_t>(b) * T * ldq + h * dh, ldq);
          cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, dh, T, 1.0f, dz.data(), T, qb, ldq, beta, dkb, ldk);
        }
      }
    }
    if (dsink != nullptr && arm.kind == AttentionKind::kSinkLogit) {
      for (int h = 0; h < H; ++h) {
        double sum = 0;
        for (int b = 0; b < B; ++b) sum += dsink_bh[static_cast<size_t>(b) * H + h];
        dsink[h] += static_cast<float>(sum);
      }
    }
  }

  void SigmoidGateForward(TensorView out_v, TensorView x_v, const float* logits, int N, int G, int C) override {
    float* out = out_v.f32("cpu SigmoidGateForward");
    const float* x = x_v.f32("cpu SigmoidGateForward");
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      for (int g = 0; g < G; ++g) {
        const size_t ng = static_cast<size_t>(n) * G + g;
        const float sigma = static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(logits[ng]))));
        for (int c = 0; c < C; ++c) out[ng * C + c] = x[ng * C + c] * sigma;
      }
    }
  }

  void SigmoidGateBackward(float* dx, float* dlogits, const float* dout, TensorView x_v, const float* logits, int N,
                           int G, int C) override {
    const float* x = x_v.f32("cpu SigmoidGateBackward");
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      for (int g = 0; g < G; ++g) {
        const size_t ng = static_cast<size_t>(n) * G + g;
        const double sigma = 1.0 / (1.0 + std::exp(-static_cast<double>(logits[ng])));
        double dot = 0;
        for (int c = 0; c < C; ++c) {
          dot += static_cast<double>(dout[ng * C + c]) * x[ng * C + c];
          dx[ng * C + c] = static_cast<float>(dout[ng * C + c] * sigma);
        }
        dlogits[ng] = static_cast<float>(sigma * (1.0 - sigma) * dot);
      }
    }
  }

  void VScaleForward(TensorView vhat_v, TensorView v_v, const float* theta, int N, int KV, int dh, double c_base,
                     VScaleMode mode) override {
    float* vhat = vhat_v.f32("cpu VScaleForward");
    const float* v = v_v.f32("cpu VScaleForward");
    if (mode != VScaleMode::kVScale) {
      std::memcpy(vhat, v, static_cast<size_t>(N) * KV * dh * sizeof(float));
      return;
    }
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; ++i) {
      for (int g = 0; g < KV; ++g) {
        const float* vi = v + (static_cast<size_t>(i) * KV + g) * dh;
        float* oi = vhat + (static_cast<size_t>(i) * KV + g) * dh;
        const double C = c_base * std::exp(static_cast<double>(theta[g]));
        double r = 0;
        for (int c = 0; c < dh; ++c) r += static_cast<double>(vi[c]) * vi[c];
        const float phi = static_cast<float>(r / (r + C));  // φ(r) = r/(r+C)
        for (int c = 0; c < dh; ++c) oi[c] = phi * vi[c];
      }
    }
  }

  void VScaleBackward(float* dv, float* dtheta, const float* dvhat, TensorView v_v, const float* theta, int N, int KV,
                      int dh, double c_base, VScaleMode mode) override {
    const float* v = v_v.f32("cpu VScaleBackward");
    if (mode == VScaleMode::kNone) {
      std::memcpy(dv, dvhat, static_cast<size_t>(N) * KV * dh * sizeof(float));
      return;
    }
    std::vector<double> row_dtheta(static_cast<size_t>(N) * KV);
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; ++i) {
      for (int g = 0; g < KV; ++g) {
        const size_t off = (static_cast<size_t>(i) * KV + g) * dh;
        const float* vi = v + off;
        const float* gi = dvhat + off;
        float* dvi = dv + off;
        const double C = c_base * (mode == VScaleMode::kVScale ? std::exp(static_cast<double>(theta[g])) : 1.0);
        double r = 0, vg = 0;
        for (int c = 0; c < dh; ++c) {
          r += static_cast<double>(vi[c]) * vi[c];
          vg += static_cast<double>(vi[c]) * gi[c];
        }
        const double rc = r + C;
        const double phi = r / rc;
        const double coef = 2.0 * C / (rc * rc) * vg;  // ∂L/∂v = φ ĝ + (2C/(r+C)²)(v·ĝ) v
        for (int c = 0; c < dh; ++c) dvi[c] = static_cast<float>(phi * gi[c] + coef * vi[c]);
        row_dtheta[static_cast<size_t>(i) * KV + g] = -C * r / (rc * rc) * vg;  // ∂L/∂θ contribution
      }
    }
    if (dtheta != nullptr && mode == VScaleMode::kVScale) {
      for (int g = 0; g < KV; ++g) {
        double s = 0;
        for (int i = 0; i < N; ++i) s += row_dtheta[static_cast<size_t>(i) * KV + g];
        dtheta[g] += static_cast<float>(s);
      }
    }
  }

  void SwiGluForward(TensorView h_v, TensorView gate_v, TensorView up_v, int N, int F) override {
    float* h = h_v.f32("cpu SwiGluForward");
    const float* gate = gate_v.f32("cpu SwiGluForward");
    const float* up = up_v.f32("cpu SwiGluForward");
    const size_t n = static_cast<size_t>(N) * F;
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; ++i) {
      const float g = gate[i];
      h[i] = g / (1.0f + ExpF(-g)) * up[i];  // silu(g)·u
    }
  }
  void SwiGluBackward(float* dgate, float* dup, const float* dh, TensorView gate_v, TensorView up_v, int N,
                      int F) override {
    const float* gate = gate_v.f32("cpu SwiGluBackward");
    const float* up = up_v.f32("cpu SwiGluBackward");
    const size_t n = static_cast<size_t>(N) * F;
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; ++i) {
      const float g = gate[i];
      const float sig = 1.0f / (1.0f + ExpF(-g));
      const float silu = g * sig;
      dup[i] = dh[i] * silu;
      dgate[i] = dh[i] * up[i] * sig * (1.0f + g * (1.0f - sig));  // silu'(g) = σ(1 + g(1−σ))
    }
  }

  void CrossEntropyForwardBackward(float* logits, const int32_t* targets, int N, int V, float grad_scale,
                                   double* loss_acc) override {
    std::vector<double> row_loss(N);
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; ++i) {
      float* row = logits + static_cast<size_t>(i) * V;
      float mx = -INFINITY;
      for (int c = 0; c < V; ++c) mx = std::max(mx, row[c]);
      double z = 0;
      for (int c = 0; c < V; ++c) z += std::exp(static_cast<double>(row[c] - mx));
      row_loss[i] = std::log(z) - (row[targets[i]] - mx);
      const double inv_z = 1.0 / z;
      for (int c = 0; c < V; ++c) {
        const double p = std::exp(static_cast<double>(row[c] - mx)) * inv_z;
        row[c] = static_cast<float>(grad_scale * (p - (c == targets[i] ? 1.0 : 0.0)));
      }
    }
    double total = 0;
    for (int i = 0; i < N; ++i) total += row_loss[i];
    *loss_acc += total;
  }

  void CrossEntropyLoss(const float* logits, const int32_t* targets, int N, int V, double* loss_acc) override {
    std::vector<double> row_loss(N);
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; ++i) {
      const float* row = logits + static_cast<size_t>(i) * V;
      float mx = -INFINITY;
      for (int c = 0; c < V; ++c) mx = std::max(mx, row[c]);
      double z = 0;
      for (int c = 0; c < V; ++c) z += std::exp(static_cast<double>(row[c] - mx));
      row_loss[i] = std::log(z) - (row[targets[i]] - mx);
    }
    double total = 0;
    for (int i = 0; i < N; ++i) total += row_loss[i];
    *loss_acc += total;
  }

  // The guard is in host memory: no copy. Each tensor's loop is AdamW's, element for element.
  void MultiTensorAdamW(const std::vector<AdamWTensor>& tensors, const AdamWHyper& h, const double* guard) override {
    const double norm = std::sqrt(guard[1]);
    if (!std::isfinite(guard[0]) || !std::isfinite(norm)) return;
    const float clip_scale = (h.grad_clip > 0 && norm > h.grad_clip) ? static_cast<float>(h.grad_clip / norm) : 1.0f;
    for (const AdamWTensor& t : tensors) {
      AdamW(t.p, t.g, t.m, t.v, t.n, h.lr, h.beta1, h.beta2, h.eps, t.weight_decay, clip_scale, h.step);
    }
  }

  void AdamW(float* p, const float* g, float* m, float* v, size_t n, float lr, float beta1, float beta2, float eps,
             float weight_decay, float grad_scale, int64_t step) override {
    const double bc1 = 1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step));
    const double bc2 = 1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step));
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) {
      const float gi = g[i] * grad_scale;
      m[i] = beta1 * m[i] + (1.0f - beta1) * gi;
      v[i] = beta2 * v[i] + (1.0f - beta2) * gi * gi;
      const float mhat = static_cast<float>(m[i] / bc1);
      const float vhat = static_cast<float>(v[i] / bc2);
      p[i] -= lr * (mhat / (std::sqrt(vhat) + eps) + weight_decay * p[i]);
    }
  }
};

}  // namespace

std::unique_ptr<Backend> MakeCpuBackend() { return std::make_unique<CpuBackend>(); }

}  // namespace sinkscope

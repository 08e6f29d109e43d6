// The reference causal attention of the CUDA backend's fp32 mode: the probability
// matrix P (B,H,T,T) is kept, as the CPU backend keeps it, so that GPU and CPU can be
// held to fp32 tolerances. Rows u > t of P are never read. (The bf16 training path uses
// cuDNN's flash attention instead: engine/cuda/cudnn_attention.h.) GQA: query head h
// reads KV head h / (H / KV). No atomics: each output is summed by one thread, in order.
#include <cfloat>

#include "engine/cuda/kernels/kernels.h"
#include "engine/cuda/kernels/launch.cuh"
#include "engine/cuda/kernels/reduce.cuh"

namespace sinkscope::cuda {
namespace {

constexpr int kBlock = 128;

struct Dims {
  int B, T, H, KV, dh;
  __device__ int group() const { return H / KV; }
  __device__ size_t q_at(int b, int t, int h) const { return ((static_cast<size_t>(b) * T + t) * H + h) * dh; }
  __device__ size_t kv_at(int b, int t, int g) const { return ((static_cast<size_t>(b) * T + t) * KV + g) * dh; }
  __device__ size_t row_at(int b, int h, int t) const { return ((static_cast<size_t>(b) * H + h) * T + t) * T; }
};

// One block per (b, h, t): scores of keys u ≤ t, softmax, lse, then y_t = Σ_u P[t,u] v_u.
__global__ void ForwardKernel(float* y, float* lse, float* att, const float* q, const float* k, const float* v,
                              Dims D) {
  SINKSCOPE_SHARED(float, shared, [33]);
  const int t = blockIdx.x % D.T, h = (blockIdx.x / D.T) % D.H, b = blockIdx.x / (D.T * D.H);
  const int g = h / D.group();
  const float scale = rsqrtf(static_cast<float>(D.dh));
  const float* qt = q + D.q_at(b, t, h);
  float* row = att + D.row_at(b, h, t);
  float mx = -FLT_MAX;
  for (int u = threadIdx.x; u <= t; u += blockDim.x) {
    const float* ku = k + D.kv_at(b, u, g);
    float dot = 0;
    for (int c = 0; c < D.dh; ++c) dot += qt[c] * ku[c];
    row[u] = dot * scale;
    mx = fmaxf(mx, row[u]);
  }
  mx = BlockMax(mx, shared, -FLT_MAX);
  float sum = 0;
  for (int u = threadIdx.x; u <= t; u += blockDim.x) {
    row[u] = expf(row[u] - mx);
    sum += row[u];
  }
  sum = BlockSum(sum, shared);
  const float inv = 1.0f / sum;
  for (int u = threadIdx.x; u <= t; u += blockDim.x) row[u] *= inv;
  if (threadIdx.x == 0) lse[(static_cast<size_t>(b) * D.H + h) * D.T + t] = mx + logf(sum);
  __syncthreads();  // P's row is read whole below
  for (int c = threadIdx.x; c < D.dh; c += blockDim.x) {
    float acc = 0;
    for (int u = 0; u <= t; ++u) acc += row[u] * v[D.kv_at(b, u, g) + c];
    y[D.q_at(b, t, h) + c] = acc;
  }
}

// One block per (b, h, t): dP[t,u] = dy_t·v_u, dS = P ⊙ (dP − Σ_u P dP)/√dh.
__global__ void SoftmaxBackwardKernel(float* ds, const float* att, const float* dy, const float* v, Dims D) {
  SINKSCOPE_SHARED(float, shared, [33]);
  const int t = blockIdx.x % D.T, h = (blockIdx.x / D.T) % D.H, b = blockIdx.x / (D.T * D.H);
  const int g = h / D.group();
  const float scale = rsqrtf(static_cast<float>(D.dh));
  const float* dyt = dy + D.q_at(b, t, h);
  const float* p = att + D.row_at(b, h, t);
  float* d = ds + D.row_at(b, h, t);
  float dot = 0;
  for (int u = threadIdx.x; u <= t; u += blockDim.x) {
    const float* vu = v + D.kv_at(b, u, g);
    float dp = 0;
    for (int c = 0; c < D.dh; ++c) dp += dyt[c] * vu[c];
    d[u] = dp;
    dot += p[u] * dp;
  }
  dot = BlockSum(dot, shared);
  for (int u = threadIdx.x; u <= t; u += blockDim.x) d[u] = p[u] * (d[u] - dot) * scale;
}

// One block per (b, h, t): dq_t = Σ_{u≤t} dS[t,u] k_u.
__global__ void DqKernel(float* dq, const float* ds, const float* k, Dims D) {
  const int t = blockIdx.x % D.T, h = (blockIdx.x / D.T) % D.H, b = blockIdx.x / (D.T * D.H);
  const int g = h / D.group();
  const float* d = ds + D.row_at(b, h, t);
  for (int c = threadIdx.x; c < D.dh; c += blockDim.x) {
    float acc = 0;
    for (int u = 0; u <= t; ++u) acc += d[u] * k[D.kv_at(b, u, g) + c];
    dq[D.q_at(b, t, h) + c] = acc;
  }
}

// One block per (b, g, u): dk_u = Σ_{h∈g} Σ_{t≥u} dS[t,u] q_t, dv_u = Σ_{h∈g} Σ_{t≥u} P[t,u] dy_t.
__global__ void DkDvKernel(float* dk, float* dv, const float* ds, const float* att, const float* q, const float* dy,
                           Dims D) {
  const int u = blockIdx.x % D.T, g = (blockIdx.x / D.T) % D.KV, b = blockIdx.x / (D.T * D.KV);
  const int group = D.group();
  for (int c = threadIdx.x; c < D.dh; c += blockDim.x) {
    float acc_k = 0, acc_v = 0;
    for (int h = g * group; h < (g + 1) * group; ++h) {
      for (int t = u; t < D.T; ++t) {
        const size_t at = D.row_at(b, h, t) + u;
        acc_k += ds[at] * q[D.q_at(b, t, h) + c];
        acc_v += att[at] * dy[D.q_at(b, t, h) + c];
      }
    }
    dk[D.kv_at(b, u, g) + c] = acc_k;
    dv[D.kv_at(b, u, g) + c] = acc_v;
  }
}

// One block per (h, b): column s of sequence b, from q, k and lse, in double.
__global__ void ColumnStatsPerSequenceKernel(double* per_b, const float* q, const float* k, const float* lse, Dims D,
                                             int s, int window) {
  SINKSCOPE_SHARED(double, shared, [33]);
  const int b = blockIdx.x % D.B, h = blockIdx.x / D.B;
  const int g = h / D.group();
  const double scale = 1.0 / sqrt(static_cast<double>(D.dh));
  const float* ks = k + D.kv_at(b, s, g);
  double mass = 0, sq = 0, alpha = 0;
  for (int t = s + threadIdx.x; t < D.T; t += blockDim.x) {
    const float* qt = q + D.q_at(b, t, h);
    double dot = 0;
    for (int c = 0; c < D.dh; ++c) dot += static_cast<double>(qt[c]) * ks[c];
    const double a = exp(dot * scale - lse[(static_cast<size_t>(b) * D.H + h) * D.T + t]);
    mass += a;
    sq += a * a;
    if (t < s + window) alpha += a;
  }
  mass = BlockSum(mass, shared);
  sq = BlockSum(sq, shared);
  alpha = BlockSum(alpha, shared);
  if (threadIdx.x == 0) {
    double* o = per_b + (static_cast<size_t>(h) * D.B + b) * 3;
    o[0] = alpha / window;
    o[1] = mass;
    o[2] = sq;
  }
}

// One thread per head: batch means over b in order, and the rate of α_b > threshold.
__global__ void ColumnStatsMeanKernel(float* alpha, float* mass, float* second_moment, float* rate,
                                      const double* per_b, int B, int H, double threshold) {
  const int h = blockIdx.x * blockDim.x + threadIdx.x;
  if (h >= H) return;
  double a = 0, m = 0, s2 = 0;
  int above = 0;
  for (int b = 0; b < B; ++b) {
    const double* o = per_b + (static_cast<size_t>(h) * B + b) * 3;
    a += o[0];
    m += o[1];
    s2 += o[2];
    if (o[0] > threshold) ++above;
  }
  alpha[h] = static_cast<float>(a / B);
  mass[h] = static_cast<float>(m / B);
  second_moment[h] = static_cast<float>(s2 / B);
  rate[h] = static_cast<float>(static_cast<double>(above) / B);
}

// The scores of the causal triangle, B·heads·T(T+1)/2, and the bytes of q_like (B,T,H,dh)
// plus kv_like (B,T,KV,dh) fp32 tensors: the launches' declared costs.
double Causal(const Dims& D, int heads) { return static_cast<double>(D.B) * heads * D.T * (D.T + 1) / 2.0; }
double Bytes(const Dims& D, int q_like, int kv_like) {
  return 4.0 * D.B * D.T * D.dh * (static_cast<double>(q_like) * D.H + static_cast<double>(kv_like) * D.KV);
}

unsigned Rows(int a, int b, int c) { return static_cast<unsigned>(static_cast<size_t>(a) * b * c); }

}  // namespace

void LaunchAttentionForward(cudaStream_t s, float* y, float* lse, float* att, const float* q, const float* k,
                            const float* v, int B, int T, int H, int KV, int dh) {
  const Dims D{B, T, H, KV, dh};
  SINKSCOPE_COST(Bytes(D, 2, 2) + 4.0 * Causal(D, D.H) + 4.0 * D.B * D.H * D.T, 4.0 * D.dh * Causal(D, D.H) + 5.0 * Causal(D, D.H));
  SINKSCOPE_LAUNCH(ForwardKernel, Rows(B, H, T), kBlock, 0, s)(y, lse, att, q, k, v, D);
}

void LaunchAttentionBackward(cudaStream_t s, float* dq, float* dk, float* dv, float* ds, const float* dy,
                             const float* att, const float* q, const float* k, const float* v, int B, int T, int H,
                             int KV, int dh) {
  const Dims D{B, T, H, KV, dh};
  SINKSCOPE_COST(Bytes(D, 1, 1) + 4.0 * 2 * Causal(D, D.H), 2.0 * D.dh * Causal(D, D.H) + 3.0 * Causal(D, D.H));
  SINKSCOPE_LAUNCH(SoftmaxBackwardKernel, Rows(B, H, T), kBlock, 0, s)(ds, att, dy, v, D);
  SINKSCOPE_COST(Bytes(D, 1, 1) + 4.0 * Causal(D, D.H), 2.0 * D.dh * Causal(D, D.H));
  SINKSCOPE_LAUNCH(DqKernel, Rows(B, H, T), 64, 0, s)(dq, ds, k, D);
  SINKSCOPE_COST(Bytes(D, 2, 2) + 4.0 * 2 * Causal(D, D.H), 4.0 * D.dh * Causal(D, D.H));
  SINKSCOPE_LAUNCH(DkDvKernel, Rows(B, KV, T), 64, 0, s)(dk, dv, ds, att, q, dy, D);
}

void LaunchColumnStats(cudaStream_t s, float* alpha, float* mass, float* second_moment, float* rate, double* per_b,
                       const float* q, const float* k, const float* lse, int B, int T, int H, int KV, int dh,
                       int sink, int window, double threshold) {
  const Dims D{B, T, H, KV, dh};
  SINKSCOPE_COST(4.0 * B * H * (T - sink) * (dh + 1) + 4.0 * B * KV * dh + 24.0 * H * B, (2.0 * dh + 6) * B * H * (T - sink));
  SINKSCOPE_LAUNCH(ColumnStatsPerSequenceKernel, Rows(H, B, 1), kBlock, 0, s)(per_b, q, k, lse, D, sink, window);
  SINKSCOPE_COST(24.0 * H * B + 16.0 * H, 3.0 * H * B);
  SINKSCOPE_LAUNCH(ColumnStatsMeanKernel, 1, 32 * ((H + 31) / 32), 0, s)(alpha, mass, second_moment, rate, per_b, B, H, threshold);
}

}  // namespace sinkscope::cuda

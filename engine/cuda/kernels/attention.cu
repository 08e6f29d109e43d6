// The probes' attention column statistics (backend.h, AttentionColumnStats and
// ArmAttentionColumnStats): column s of the attention matrix alone, recomputed in double
// from q, k and the forward's per-row numbers (the lse; softpick's m and D'; nothing for
// sigmoid) by the arm's formula (ARMS.md), so the T×T matrix is never stored (the step's attention is flash_attention.cu). GQA: query
// head h reads KV head h / (H / KV). No atomics: each output is summed in a fixed order.
#include "engine/cuda/kernels/act.cuh"
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
};

// One block per (h, b): column s of sequence b, from q, k and lse, in double.
__global__ void ColumnStatsPerSequenceKernel(double* per_b, Act q, Act k, const float* r0,
                                             const float* r1, Dims D, int s, int window, FlashFamily family,
                                             float bias) {
  SINKSCOPE_SHARED(double, shared, [33]);
  const int b = blockIdx.x % D.B, h = blockIdx.x / D.B;
  const int g = h / D.group();
  const double scale = 1.0 / sqrt(static_cast<double>(D.dh));
  const size_t ks = D.kv_at(b, s, g);
  double mass = 0, sq = 0, alpha = 0;
  for (int t = s + threadIdx.x; t < D.T; t += blockDim.x) {
    const size_t qt = D.q_at(b, t, h);
    double dot = 0;
    for (int c = 0; c < D.dh; ++c) dot += static_cast<double>(Ld(q, qt + c)) * Ld(k, ks + c);
    const size_t row = (static_cast<size_t>(b) * D.H + h) * D.T + t;
    const double z = dot * scale;
    double a;
    if (family == kFlashSigmoid) {
      a = 1.0 / (1.0 + exp(-(z + bias)));
    } else if (family == kFlashSoftpick) {
      a = fmax(exp(z - r0[row]) - exp(-static_cast<double>(r0[row])), 0.0) / r1[row];
    } else {
      a = exp(z - r0[row]);
    }
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

unsigned Rows(int a, int b, int c) { return static_cast<unsigned>(static_cast<size_t>(a) * b * c); }

}  // namespace

void LaunchColumnStats(cudaStream_t s, float* alpha, float* mass, float* second_moment, float* rate, double* per_b,
                       Act q, Act k, const float* r0, const float* r1, int B, int T, int H, int KV, int dh,
                       int sink, int window, double threshold, const FlashArm& arm) {
  const Dims D{B, T, H, KV, dh};
  SINKSCOPE_COST(q.bytes() * B * H * (T - sink) * dh + 4.0 * B * H * (T - sink) + k.bytes() * B * KV * dh + 24.0 * H * B, (2.0 * dh + 6) * B * H * (T - sink));
  SINKSCOPE_LAUNCH(ColumnStatsPerSequenceKernel, Rows(H, B, 1), kBlock, 0, s)(per_b, q, k, r0, r1, D, sink, window,
                                                                                 arm.family, arm.bias);
  SINKSCOPE_COST(24.0 * H * B + 16.0 * H, 3.0 * H * B);
  SINKSCOPE_LAUNCH(ColumnStatsMeanKernel, 1, 32 * ((H + 31) / 32), 0, s)(alpha, mass, second_moment, rate, per_b, B, H, threshold);
}

}  // namespace sinkscope::cuda

// The gated arms' sigmoid gates (docs/design/ARMS.md): a gate σ(logit) per (token, group)
// multiplies the group's C channels (C = 1 for the elementwise output and value gates,
// dh for the per-head gate). Elementwise forward; the backward's logit gradient is one
// warp per (token, group), summing its C products in a fixed order.
#include "engine/cuda/kernels/act.cuh"
#include "engine/cuda/kernels/kernels.h"
#include "engine/cuda/kernels/launch.cuh"
#include "engine/cuda/kernels/reduce.cuh"

namespace sinkscope::cuda {
namespace {

__device__ inline float Sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__global__ void SigmoidGateForwardKernel(Act out, Act x, const float* logits, size_t n, int C) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    St(out, i, Ld(x, i) * Sigmoid(logits[i / C]));
  }
}

// One warp per row (n, g) of C channels: dx written, dlogits[row] = σ(1−σ)·Σ_c dout·x.
__global__ void SigmoidGateBackwardKernel(float* dx, float* dlogits, const float* dout, Act x, const float* logits,
                                          size_t rows, int C) {
  const size_t row = (blockIdx.x * size_t{blockDim.x} + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  const float sigma = row < rows ? Sigmoid(logits[row]) : 0.0f;
  float dot = 0.0f;
  if (row < rows) {
    for (int c = lane; c < C; c += 32) {
      const size_t i = row * C + c;
      dot += dout[i] * Ld(x, i);
      dx[i] = dout[i] * sigma;
    }
  }
  dot = WarpSum(dot);  // every lane takes part: rows past the end add zeros
  if (row < rows && lane == 0) dlogits[row] = sigma * (1.0f - sigma) * dot;
}

}  // namespace

void LaunchSigmoidGateForward(cudaStream_t s, Act out, Act x, const float* logits, int N, int G, int C) {
  const size_t n = static_cast<size_t>(N) * G * C;
  if (n == 0) return;
  SINKSCOPE_COST((out.bytes() + x.bytes()) * n + 4.0 * N * G, 6.0 * n);
  SINKSCOPE_LAUNCH(SigmoidGateForwardKernel, GridFor(n, 256), 256, 0, s)(out, x, logits, n, C);
}

void LaunchSigmoidGateBackward(cudaStream_t s, float* dx, float* dlogits, const float* dout, Act x,
                               const float* logits, int N, int G, int C) {
  const size_t rows = static_cast<size_t>(N) * G;
  if (rows == 0) return;
  SINKSCOPE_COST((8.0 + x.bytes()) * rows * C + 8.0 * rows, 3.0 * rows * C + 8.0 * rows);
  SINKSCOPE_LAUNCH(SigmoidGateBackwardKernel, GridFor(rows * 32, 256), 256, 0, s)(dx, dlogits, dout, x, logits,
                                                                                 rows, C);
}

}  // namespace sinkscope::cuda

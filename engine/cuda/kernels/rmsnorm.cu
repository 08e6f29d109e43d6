// RMSNorm forward (with the residual add fused in front when asked) and backward. One
// block per row; γ's gradient a two-pass column sum (reduce.cuh, ColumnChunkSum): chunks
// of rows in parallel, then the chunks in order — deterministic, no atomics.
#include "engine/cuda/kernel_math.h"
#include "engine/cuda/kernels/act.cuh"
#include "engine/cuda/kernels/kernels.h"
#include "engine/cuda/kernels/launch.cuh"
#include "engine/cuda/kernels/reduce.cuh"

namespace sinkscope::cuda {
namespace {

constexpr int kBlock = 256;

__global__ void RmsNormForwardKernel(float* sum, Act out, float* rstd, Act x, const float* r, const float* gamma,
                                     int d, float eps) {
  SINKSCOPE_SHARED(float, shared, [33]);
  const size_t o = static_cast<size_t>(blockIdx.x) * d;
  float ss = 0;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float v = Ld(x, o + c);
    if (r != nullptr) {
      v += r[o + c];
      sum[o + c] = v;
    }
    ss += v * v;
  }
  const float rs = kmath::RmsNormRstd(BlockSum(ss, shared), d, eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = rs;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    const float v = r != nullptr ? sum[o + c] : Ld(x, o + c);
    St(out, o + c, v * rs * gamma[c]);
  }
}

__global__ void RmsNormBackwardRowsKernel(float* dx, const float* base, const float* dout, Act x, const float* gamma,
                                          const float* rstd, int d) {
  SINKSCOPE_SHARED(float, shared, [33]);
  const size_t o = static_cast<size_t>(blockIdx.x) * d;
  float dot = 0;
  for (int c = threadIdx.x; c < d; c += blockDim.x) dot += gamma[c] * dout[o + c] * Ld(x, o + c);
  const float rs = rstd[blockIdx.x];
  const float coef = kmath::RmsNormBackwardCoef(rs, BlockSum(dot, shared), d);
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    dx[o + c] = kmath::RmsNormBackwardElement(base[o + c], rs, gamma[c], dout[o + c], coef, Ld(x, o + c));
  }
}

// dγ's first pass: Σ over a chunk of rows of dout ⊙ x·rstd.
__global__ void RmsNormGammaPartialsKernel(float* partials, const float* dout, Act x, const float* rstd, int N, int d,
                                           int rows_per_chunk) {
  SINKSCOPE_SHARED(float, shared, [kColumnRowLanes * (kColumnTile + 1)]);
  ColumnChunkSum(partials, shared, N, d, rows_per_chunk, [&](int i, int c) {
    const size_t o = static_cast<size_t>(i) * d + c;
    return dout[o] * Ld(x, o) * rstd[i];
  });
}

}  // namespace

void LaunchRmsNormForward(cudaStream_t s, float* sum, Act out, float* rstd, Act x, const float* r,
                          const float* gamma, int N, int d, float eps) {
  if (N > 0) {
    SINKSCOPE_COST((x.bytes() + out.bytes() + (r != nullptr ? 8.0 : 0.0)) * N * d + 4.0 * d + 4.0 * N,
                   (r != nullptr ? 5.0 : 4.0) * N * d);
    SINKSCOPE_LAUNCH(RmsNormForwardKernel, N, kBlock, 0, s)(sum, out, rstd, x, r, gamma, d, eps);
  }
}

void LaunchRmsNormBackward(cudaStream_t s, float* dx, float* dgamma, const float* base, const float* dout, Act x,
                           const float* gamma, const float* rstd, int N, int d, float* partials) {
  if (N == 0) return;
  SINKSCOPE_COST((12.0 + x.bytes()) * N * d + 4.0 * d + 4.0 * N, 8.0 * N * d);
  SINKSCOPE_LAUNCH(RmsNormBackwardRowsKernel, N, kBlock, 0, s)(dx, base, dout, x, gamma, rstd, d);
  if (dgamma != nullptr) {
    int rows_per_chunk = 0;
    const dim3 grid = ColumnGrid(N, d, &rows_per_chunk);
    SINKSCOPE_COST((4.0 + x.bytes()) * N * d + 4.0 * N + 4.0 * grid.y * d, 3.0 * N * d);
    SINKSCOPE_LAUNCH(RmsNormGammaPartialsKernel, grid, ColumnBlock(), 0, s)(partials, dout, x, rstd, N, d,
                                                                            rows_per_chunk);
    LaunchColumnPartialsSum(s, dgamma, partials, static_cast<int>(grid.y), d);
  }
}

}  // namespace sinkscope::cuda

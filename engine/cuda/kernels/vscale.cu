// V-scale (METRICS.md): v̂ = φ(r)·v per (token, KV head) row, in double like the CPU
// backend; θ's gradient from per-row contributions summed in two passes (chunks of rows
// in parallel, each a fixed tree, then the chunks in order): deterministic, no atomics.
#include "engine/cuda/kernel_math.h"
#include "engine/cuda/kernels/act.cuh"
#include "engine/cuda/kernels/kernels.h"
#include "engine/cuda/kernels/launch.cuh"
#include "engine/cuda/kernels/reduce.cuh"

namespace sinkscope::cuda {
namespace {

__global__ void VScaleForwardKernel(Act vhat, Act v, const float* theta, int N, int KV, int dh, double c_base) {
  const size_t row = blockIdx.x * size_t{blockDim.x} + threadIdx.x;
  if (row >= static_cast<size_t>(N) * KV) return;
  const int g = static_cast<int>(row % KV);
  const size_t o = row * dh;
  double r = 0;
  for (int c = 0; c < dh; ++c) {
    const double x = Ld(v, o + c);
    r += x * x;
  }
  const float phi = static_cast<float>(kmath::VScalePhi(r, kmath::VScaleC(c_base, theta[g])));
  for (int c = 0; c < dh; ++c) St(vhat, o + c, phi * Ld(v, o + c));
}

__global__ void VScaleBackwardKernel(float* dv, double* row_dtheta, const float* dvhat, Act v, const float* theta,
                                     int N, int KV, int dh, double c_base) {
  const size_t row = blockIdx.x * size_t{blockDim.x} + threadIdx.x;
  if (row >= static_cast<size_t>(N) * KV) return;
  const int g = static_cast<int>(row % KV);
  const size_t o = row * dh;
  const float* gi = dvhat + o;
  const double C = theta != nullptr ? kmath::VScaleC(c_base, theta[g]) : c_base;
  double r = 0, vg = 0;
  for (int c = 0; c < dh; ++c) {
    const double x = Ld(v, o + c);
    r += x * x;
    vg += x * gi[c];
  }
  const double phi = kmath::VScalePhi(r, C);
  const double coef = kmath::VScaleGradCoef(r, C, vg);
  for (int c = 0; c < dh; ++c) dv[o + c] = static_cast<float>(phi * gi[c] + coef * Ld(v, o + c));
  row_dtheta[row] = kmath::VScaleThetaGrad(r, C, vg);
}

// θ's first pass: block (chunk, g) sums row_dtheta[i, g] over its chunk of rows.
__global__ void ThetaPartialsKernel(double* partials, const double* row_dtheta, int N, int KV, int rows_per_chunk) {
  SINKSCOPE_SHARED(double, shared, [33]);
  const int chunk = blockIdx.x, g = blockIdx.y;
  const int row0 = chunk * rows_per_chunk, row1 = N < row0 + rows_per_chunk ? N : row0 + rows_per_chunk;
  double s = 0;
  for (int i = row0 + threadIdx.x; i < row1; i += blockDim.x) s += row_dtheta[static_cast<size_t>(i) * KV + g];
  s = BlockSum(s, shared);
  if (threadIdx.x == 0) partials[static_cast<size_t>(chunk) * KV + g] = s;
}

// The second pass: dtheta[g] += Σ_chunks partials[chunk, g] in order (one thread per head).
__global__ void ThetaSumKernel(float* dtheta, const double* partials, int chunks, int KV) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= KV) return;
  double s = 0;
  for (int k = 0; k < chunks; ++k) s += partials[static_cast<size_t>(k) * KV + g];
  dtheta[g] += static_cast<float>(s);
}

}  // namespace

void LaunchVScaleForward(cudaStream_t s, Act vhat, Act v, const float* theta, int N, int KV, int dh, double c_base) {
  const size_t rows = static_cast<size_t>(N) * KV;
  SINKSCOPE_COST((vhat.bytes() + v.bytes()) * rows * dh + 4.0 * KV, 3.0 * rows * dh);
  SINKSCOPE_LAUNCH(VScaleForwardKernel, GridFor(rows, 128), 128, 0, s)(vhat, v, theta, N, KV, dh, c_base);
}

void LaunchVScaleBackward(cudaStream_t s, float* dv, float* dtheta, double* row_dtheta, const float* dvhat, Act v,
                          const float* theta, int N, int KV, int dh, double c_base) {
  const size_t rows = static_cast<size_t>(N) * KV;
  SINKSCOPE_COST((8.0 + v.bytes()) * rows * dh + 8.0 * rows + 4.0 * KV, 6.0 * rows * dh);
  SINKSCOPE_LAUNCH(VScaleBackwardKernel, GridFor(rows, 128), 128, 0, s)(dv, row_dtheta, dvhat, v, theta, N, KV, dh, c_base);
  if (dtheta != nullptr && N > 0) {
    const int chunks = ThetaChunks(N, KV), rows_per_chunk = (N + chunks - 1) / chunks;
    double* partials = row_dtheta + rows;  // after the per-row contributions (ThetaScratchDoubles)
    SINKSCOPE_COST(8.0 * rows + 8.0 * chunks * KV, 1.0 * rows);
    SINKSCOPE_LAUNCH(ThetaPartialsKernel, dim3(chunks, KV), 256, 0, s)(partials, row_dtheta, N, KV, rows_per_chunk);
    SINKSCOPE_COST(8.0 * chunks * KV + 8.0 * KV, 1.0 * chunks * KV);
    SINKSCOPE_LAUNCH(ThetaSumKernel, 1, 32 * ((KV + 31) / 32), 0, s)(dtheta, partials, chunks, KV);
  }
}

}  // namespace sinkscope::cuda

// V-scale (METRICS.md): v̂ = φ(r)·v per (token, KV head) row, in double like the CPU
// backend; θ's gradient from per-row contributions summed over the rows in order.
#include "engine/cuda/kernel_math.h"
#include "engine/cuda/kernels/kernels.h"
#include "engine/cuda/kernels/launch.cuh"
#include "engine/cuda/kernels/reduce.cuh"

namespace sinkscope::cuda {
namespace {

__global__ void VScaleForwardKernel(float* vhat, const float* v, const float* theta, int N, int KV, int dh,
                                    double c_base) {
  const size_t row = blockIdx.x * size_t{blockDim.x} + threadIdx.x;
  if (row >= static_cast<size_t>(N) * KV) return;
  const int g = static_cast<int>(row % KV);
  const float* vi = v + row * dh;
  float* oi = vhat + row * dh;
  double r = 0;
  for (int c = 0; c < dh; ++c) r += static_cast<double>(vi[c]) * vi[c];
  const float phi = static_cast<float>(kmath::VScalePhi(r, kmath::VScaleC(c_base, theta[g])));
  for (int c = 0; c < dh; ++c) oi[c] = phi * vi[c];
}

__global__ void VScaleBackwardKernel(float* dv, double* row_dtheta, const float* dvhat, const float* v,
                                     const float* theta, int N, int KV, int dh, double c_base) {
  const size_t row = blockIdx.x * size_t{blockDim.x} + threadIdx.x;
  if (row >= static_cast<size_t>(N) * KV) return;
  const int g = static_cast<int>(row % KV);
  const float* vi = v + row * dh;
  const float* gi = dvhat + row * dh;
  const double C = theta != nullptr ? kmath::VScaleC(c_base, theta[g]) : c_base;
  double r = 0, vg = 0;
  for (int c = 0; c < dh; ++c) {
    r += static_cast<double>(vi[c]) * vi[c];
    vg += static_cast<double>(vi[c]) * gi[c];
  }
  const double phi = kmath::VScalePhi(r, C);
  const double coef = kmath::VScaleGradCoef(r, C, vg);
  for (int c = 0; c < dh; ++c) dv[row * dh + c] = static_cast<float>(phi * gi[c] + coef * vi[c]);
  row_dtheta[row] = kmath::VScaleThetaGrad(r, C, vg);
}

// dtheta[g] += Σ_rows row_dtheta[i, g], rows in order (one thread per KV head).
__global__ void ThetaSumKernel(float* dtheta, const double* row_dtheta, int N, int KV) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= KV) return;
  double s = 0;
  for (int i = 0; i < N; ++i) s += row_dtheta[static_cast<size_t>(i) * KV + g];
  dtheta[g] += static_cast<float>(s);
}

}  // namespace

void LaunchVScaleForward(cudaStream_t s, float* vhat, const float* v, const float* theta, int N, int KV, int dh,
                         double c_base) {
  const size_t rows = static_cast<size_t>(N) * KV;
  SINKSCOPE_COST(8.0 * rows * dh + 4.0 * KV, 3.0 * rows * dh);
  SINKSCOPE_LAUNCH(VScaleForwardKernel, GridFor(rows, 128), 128, 0, s)(vhat, v, theta, N, KV, dh, c_base);
}

void LaunchVScaleBackward(cudaStream_t s, float* dv, float* dtheta, double* row_dtheta, const float* dvhat,
                          const float* v, const float* theta, int N, int KV, int dh, double c_base) {
  const size_t rows = static_cast<size_t>(N) * KV;
  SINKSCOPE_COST(12.0 * rows * dh + 8.0 * rows + 4.0 * KV, 6.0 * rows * dh);
  SINKSCOPE_LAUNCH(VScaleBackwardKernel, GridFor(rows, 128), 128, 0, s)(dv, row_dtheta, dvhat, v, theta, N, KV, dh, c_base);
  if (dtheta != nullptr) {
    SINKSCOPE_COST(8.0 * rows + 4.0 * KV, 1.0 * rows);
    SINKSCOPE_LAUNCH(ThetaSumKernel, 1, 32 * ((KV + 31) / 32), 0, s)(dtheta, row_dtheta, N, KV);
  }
}

}  // namespace sinkscope::cuda

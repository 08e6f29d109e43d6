// AdamW over many tensors in one launch: blockIdx.y picks the segment, a grid-stride
// loop its elements. With a guard the clip factor is computed on the device from
// ‖g‖², and a non-finite loss or norm leaves everything untouched (no host read).
#include "engine/cuda/kernel_math.h"
#include "engine/cuda/kernels/act.cuh"
#include "engine/cuda/kernels/kernels.h"
#include "engine/cuda/kernels/launch.cuh"
#include "engine/cuda/kernels/reduce.cuh"

namespace sinkscope::cuda {
namespace {

__global__ void AdamWKernel(const AdamWSegment* segs, const double* guard, double grad_clip, float grad_scale,
                            float lr, float beta1, float beta2, float eps, double bc1, double bc2) {
  float scale = grad_scale;
  if (guard != nullptr) {
    if (!isfinite(guard[0]) || !isfinite(sqrt(guard[1]))) return;
    scale = kmath::ClipScale(guard[1], grad_clip);
  }
  const AdamWSegment seg = segs[blockIdx.y];
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < seg.n; i += size_t{gridDim.x} * blockDim.x) {
    kmath::AdamWElement(&seg.p[i], seg.g[i] * scale, &seg.m[i], &seg.v[i], lr, beta1, beta2, eps, seg.weight_decay,
                        bc1, bc2);
    if (seg.p_bf16 != nullptr) St(Act(seg.p_bf16, true), i, seg.p[i]);
  }
}

}  // namespace

void LaunchAdamW(cudaStream_t s, const AdamWSegment* segs, int num_segments, size_t max_n, size_t total_n, const double* guard,
                 double grad_clip, float grad_scale, float lr, float beta1, float beta2, float eps, double bc1,
                 double bc2, size_t bf16_n) {
  if (num_segments == 0) return;
  unsigned gx = GridFor(max_n, 256);
  if (gx > 1024) gx = 1024;  // grid-stride beyond: the largest tensor sets the grid
  const dim3 grid(gx, static_cast<unsigned>(num_segments));
  SINKSCOPE_COST(28.0 * total_n + 2.0 * bf16_n, 12.0 * total_n);
  SINKSCOPE_LAUNCH(AdamWKernel, grid, 256, 0, s)(segs, guard, grad_clip, grad_scale, lr, beta1, beta2, eps, bc1, bc2);
}

}  // namespace sinkscope::cuda

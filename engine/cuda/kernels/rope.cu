// Rotary embedding in place on (B, T, heads, dh), half-split pairs (j, j + dh/2). The
// (cos, sin) table is computed on the host in double, as the CPU backend does, and
// cached on the device (cuda_backend.cc): the rotation is then the same arithmetic.
#include "engine/cuda/kernel_math.h"
#include "engine/cuda/kernels/act.cuh"
#include "engine/cuda/kernels/kernels.h"
#include "engine/cuda/kernels/launch.cuh"
#include "engine/cuda/kernels/reduce.cuh"

namespace sinkscope::cuda {
namespace {

__global__ void RopeKernel(Act dst, Act src, const float2* cs, int B, int T, int heads, int dh) {
  const int half = dh / 2;
  const size_t total = static_cast<size_t>(B) * T * heads * half;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < total; i += size_t{gridDim.x} * blockDim.x) {
    const int j = static_cast<int>(i % half);
    const size_t row = i / half;  // (b, t, h)
    const int t = static_cast<int>((row / heads) % T);
    const size_t p = row * dh;
    const float2 c = cs[static_cast<size_t>(t) * half + j];
    float o1, o2;
    kmath::RotatePair(Ld(src, p + j), Ld(src, p + j + half), c.x, c.y, &o1, &o2);
    St(dst, p + j, o1);
    St(dst, p + j + half, o2);
  }
}

}  // namespace

void LaunchRope(cudaStream_t s, Act dst, Act src, const float2* cs, int B, int T, int heads, int dh) {
  const size_t total = static_cast<size_t>(B) * T * heads * (dh / 2);
  SINKSCOPE_COST(2.0 * (dst.bytes() + src.bytes()) * total + 8.0 * T * (dh / 2), 6.0 * total);
  SINKSCOPE_LAUNCH(RopeKernel, GridFor(total, 256), 256, 0, s)(dst, src, cs, B, T, heads, dh);
}

}  // namespace sinkscope::cuda

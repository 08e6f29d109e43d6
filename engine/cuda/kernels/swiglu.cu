// SwiGLU forward and backward, elementwise (kernel_math.h holds the formulas).
#include "engine/cuda/kernel_math.h"
#include "engine/cuda/kernels/act.cuh"
#include "engine/cuda/kernels/kernels.h"
#include "engine/cuda/kernels/launch.cuh"
#include "engine/cuda/kernels/reduce.cuh"

namespace sinkscope::cuda {
namespace {

__global__ void SwiGluForwardKernel(Act h, Act gate, Act up, size_t n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    St(h, i, kmath::SwiGlu(Ld(gate, i), Ld(up, i)));
  }
}

__global__ void SwiGluBackwardKernel(Act dgate, Act dup, const float* dh, Act gate, Act up, size_t n, size_t F,
                                     size_t ld) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    float dg, du;
    kmath::SwiGluGrad(dh[i], Ld(gate, i), Ld(up, i), &dg, &du);
    const size_t o = i / F * ld + i % F;
    St(dgate, o, dg);
    St(dup, o, du);
  }
}

}  // namespace

void LaunchSwiGluForward(cudaStream_t s, Act h, Act gate, Act up, size_t n) {
  SINKSCOPE_COST((h.bytes() + gate.bytes() + up.bytes()) * n, 8.0 * n);
  SINKSCOPE_LAUNCH(SwiGluForwardKernel, GridFor(n, 256), 256, 0, s)(h, gate, up, n);
}
void LaunchSwiGluBackward(cudaStream_t s, Act dgate, Act dup, const float* dh, Act gate, Act up, size_t n, size_t F,
                          size_t ld) {
  SINKSCOPE_COST((4.0 + dgate.bytes() + dup.bytes() + gate.bytes() + up.bytes()) * n, 12.0 * n);
  SINKSCOPE_LAUNCH(SwiGluBackwardKernel, GridFor(n, 256), 256, 0, s)(dgate, dup, dh, gate, up, n, F, ld);
}

}  // namespace sinkscope::cuda

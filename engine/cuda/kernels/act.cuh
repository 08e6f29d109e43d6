// Reads and writes of an Act (kernels.h): an activation operand in fp32 or bf16. Every
// kernel computes in fp32 (or double) whatever its operands' storage; a bf16 store rounds
// to nearest, ties to even (__float2bfloat16_rn), as the CPU bf16 mode's RoundToBf16. The
// dtype is one flag per operand, the same for every thread of a launch: the branch never
// diverges within a warp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "engine/cuda/kernels/kernels.h"

namespace sinkscope::cuda {

__device__ inline float Ld(const Act& a, size_t i) {
  return a.bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(a.p)[i]) : static_cast<const float*>(a.p)[i];
}
__device__ inline void St(const Act& a, size_t i, float v) {
  if (a.bf16) {
    static_cast<__nv_bfloat16*>(a.p)[i] = __float2bfloat16_rn(v);
  } else {
    static_cast<float*>(a.p)[i] = v;
  }
}
// The operand from element i on.
__device__ inline Act Off(const Act& a, size_t i) {
  return Act(static_cast<char*>(a.p) + i * (a.bf16 ? 2 : 4), a.bf16);
}

}  // namespace sinkscope::cuda

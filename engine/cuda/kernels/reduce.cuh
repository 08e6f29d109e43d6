// Block-wide sums in a fixed order (warp shuffles down a fixed tree, then warp 0 over
// the warps' sums): the same inputs give the same bits on every run.
#pragma once

#include <cuda_runtime.h>

namespace sinkscope::cuda {

template <typename T>
__device__ inline T WarpSum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ inline T WarpMax(T v) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_down_sync(0xffffffffu, v, o));
  return v;
}

// The sum over the block of every thread's v, returned to every thread. blockDim.x is a
// multiple of 32, at most 1024. `shared` holds 33 values.
template <typename T>
__device__ inline T BlockSum(T v, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = WarpSum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? shared[lane] : T(0);
    w = WarpSum(w);
    if (lane == 0) shared[32] = w;
  }
  __syncthreads();
  const T total = shared[32];
  __syncthreads();  // shared may be reused by the caller right away
  return total;
}

template <typename T>
__device__ inline T BlockMax(T v, T* shared, T lowest) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = WarpMax(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? shared[lane] : lowest;
    w = WarpMax(w);
    if (lane == 0) shared[32] = w;
  }
  __syncthreads();
  const T total = shared[32];
  __syncthreads();
  return total;
}

inline unsigned GridFor(size_t n, int block) {
  const size_t g = (n + block - 1) / block;
  return static_cast<unsigned>(g < 65535u * 32u ? (g == 0 ? 1 : g) : 65535u * 32u);
}

}  // namespace sinkscope::cuda

// Block-wide sums in a fixed order (warp shuffles down a fixed tree, then warp 0 over
// the warps' sums): the same inputs give the same bits on every run.
#pragma once

#include <cuda_runtime.h>

#include "engine/cuda/kernels/kernels.h"

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

// The first pass of a column sum (kernels.h, ColumnChunks): block (blockIdx.x, blockIdx.y)
// of kColumnTile × kColumnRowLanes threads sums value(i, c) over the rows i of chunk
// blockIdx.y for its kColumnTile columns c. Row lane y takes rows row0 + y, row0 + y + 8, …
// in order (a warp reads 32 adjacent columns of one row); lane 0 then adds the 8 lanes in
// order: partials[chunk, c]. `shared` holds kColumnRowLanes·(kColumnTile + 1) floats.
template <typename Value>
__device__ inline void ColumnChunkSum(float* partials, float* shared, int N, int n, int rows_per_chunk,
                                      const Value& value) {
  const int c = blockIdx.x * kColumnTile + threadIdx.x;
  const int row0 = blockIdx.y * rows_per_chunk;
  const int row1 = N < row0 + rows_per_chunk ? N : row0 + rows_per_chunk;
  float s = 0;
  if (c < n) {
    for (int i = row0 + threadIdx.y; i < row1; i += kColumnRowLanes) s += value(i, c);
  }
  shared[threadIdx.y * (kColumnTile + 1) + threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
    float t = 0;
    for (int l = 0; l < kColumnRowLanes; ++l) t += shared[l * (kColumnTile + 1) + threadIdx.x];
    partials[static_cast<size_t>(blockIdx.y) * n + c] = t;
  }
}

// The grid and block of a first pass over (N, n); rows_per_chunk is set.
inline dim3 ColumnGrid(int N, int n, int* rows_per_chunk) {
  const int chunks = ColumnChunks(N, n);
  *rows_per_chunk = (N + chunks - 1) / chunks;
  return dim3((n + kColumnTile - 1) / kColumnTile, chunks);
}
inline dim3 ColumnBlock() { return dim3(kColumnTile, kColumnRowLanes); }

inline unsigned GridFor(size_t n, int block) {
  const size_t g = (n + block - 1) / block;
  return static_cast<unsigned>(g < 65535u * 32u ? (g == 0 ? 1 : g) : 65535u * 32u);
}

}  // namespace sinkscope::cuda

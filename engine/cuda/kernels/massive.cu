// Massive activations on the device (METRICS.md "Massive activations"): |h_out| kept for
// the probe batch, its three largest values with the place of the largest, and the
// counting passes of an exact radix select for the lower median. Both reductions run in
// two passes (block partials, then one block in block order), so the result does not
// depend on scheduling; the histogram's shared-memory counts are integers.
#include <cstring>

#include "engine/cuda/kernels/kernels.h"
#include "engine/cuda/kernels/launch.cuh"

namespace sinkscope::cuda {
namespace {

constexpr int kBlock = 256;

// A non-negative float's bits, which order as the values do.
__device__ inline uint32_t KeyOf(float v) {
#ifdef SINKSCOPE_CUDA_EMULATION
  uint32_t k;
  std::memcpy(&k, &v, sizeof k);
  return k;
#else
  return __float_as_uint(v);
#endif
}

// The three largest of a multiset, kept sorted (v[0] ≥ v[1] ≥ v[2]; −1 while unfilled),
// and the index of the largest: its first occurrence.
struct Top3 {
  double v[3];
  double index;
  __device__ void Clear() {
    v[0] = v[1] = v[2] = -1;
    index = -1;
  }
  __device__ void Insert(double x, double at) {
    if (x > v[0] || (x == v[0] && at >= 0 && at < index)) index = at;  // at < 0: not a largest
    if (x > v[0]) {
      v[2] = v[1];
      v[1] = v[0];
      v[0] = x;
    } else if (x > v[1]) {
      v[2] = v[1];
      v[1] = x;
    } else if (x > v[2]) {
      v[2] = x;
    }
  }
  // Adds another multiset's three (its largest with its index).
  __device__ void Merge(const Top3& o) {
    Insert(o.v[0], o.index);
    Insert(o.v[1], -1);
    Insert(o.v[2], -1);
  }
};

// Pass 1: keep = |x|; block b's top three of its grid-strided share into partials[b].
__global__ void AbsTop3PartialsKernel(float* keep, const float* x, size_t n, Top3* partials) {
  SINKSCOPE_SHARED(Top3, shared, [kBlock]);
  Top3 t;
  t.Clear();
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    const float a = fabsf(x[i]);
    keep[i] = a;
    t.Insert(a, static_cast<double>(i));
  }
  shared[threadIdx.x] = t;
  __syncthreads();
  if (threadIdx.x == 0) {
    Top3 b;
    b.Clear();
    for (unsigned k = 0; k < blockDim.x; ++k) b.Merge(shared[k]);
    partials[blockIdx.x] = b;
  }
}

// Pass 2: the blocks' partials in block order; out = {v0, v1, v2, index of v0}.
__global__ void Top3MergeKernel(double* out, const Top3* partials, int blocks) {
  if (threadIdx.x != 0) return;
  Top3 t;
  t.Clear();
  for (int b = 0; b < blocks; ++b) t.Merge(partials[b]);
  out[0] = t.v[0];
  out[1] = t.v[1];
  out[2] = t.v[2];
  out[3] = t.index;
}

// Radix pass 1: block b's histogram of byte `shift` of the keys under `prefix`.
__global__ void RadixCountPartialsKernel(uint32_t* partials, const float* x, size_t n, int shift, uint32_t prefix) {
  SINKSCOPE_SHARED(uint32_t, hist, [256]);
  for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
  __syncthreads();
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    const uint32_t key = KeyOf(x[i]);
    if (shift == 24 || (key >> (shift + 8)) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < 256; b += blockDim.x) partials[static_cast<size_t>(blockIdx.x) * 256 + b] = hist[b];
}

// Radix pass 2: counts[bin] = Σ over the blocks, in order.
__global__ void RadixCountSumKernel(double* counts, const uint32_t* partials, int blocks) {
  const int bin = threadIdx.x;
  double s = 0;
  for (int b = 0; b < blocks; ++b) s += partials[static_cast<size_t>(b) * 256 + bin];
  counts[bin] = s;
}

// At least one block, so an empty input still writes its (empty) result.
int Blocks(size_t n) {
  return static_cast<int>(std::max<size_t>(1, std::min<size_t>(kReduceBlocks, (n + kBlock - 1) / kBlock)));
}

}  // namespace

size_t MassiveScratchBytes() {
  return std::max(sizeof(Top3), size_t{256} * sizeof(uint32_t)) * kReduceBlocks;
}

void LaunchAbsTop3(cudaStream_t s, float* keep, double* out, const float* x, size_t n, void* scratch) {
  const int blocks = Blocks(n);
  auto* partials = static_cast<Top3*>(scratch);
  SINKSCOPE_COST(8.0 * n + 32.0 * blocks, 4.0 * n);
  SINKSCOPE_LAUNCH(AbsTop3PartialsKernel, blocks, kBlock, 0, s)(keep, x, n, partials);
  SINKSCOPE_COST(32.0 * blocks + 32, 3.0 * blocks);
  SINKSCOPE_LAUNCH(Top3MergeKernel, 1, 32, 0, s)(out, partials, blocks);
}

void LaunchRadixCount(cudaStream_t s, double* counts, const float* x, size_t n, int shift, uint32_t prefix,
                      void* scratch) {
  const int blocks = Blocks(n);
  auto* partials = static_cast<uint32_t*>(scratch);
  SINKSCOPE_COST(4.0 * n + 1024.0 * blocks, 2.0 * n);
  SINKSCOPE_LAUNCH(RadixCountPartialsKernel, blocks, kBlock, 0, s)(partials, x, n, shift, prefix);
  SINKSCOPE_COST(1024.0 * blocks + 2048, 256.0 * blocks);
  SINKSCOPE_LAUNCH(RadixCountSumKernel, 1, 256, 0, s)(counts, partials, blocks);
}

}  // namespace sinkscope::cuda

// Embedding lookup and its backward. The backward adds the rows of one token in token
// order (one thread per column walks the tokens), as the CPU backend does, so repeated
// tokens sum in a fixed order: deterministic, without atomics. It has only d-way
// parallelism; sorting tokens first would give more (not needed at d ≥ 512 yet).
#include "engine/cuda/kernels/kernels.h"
#include "engine/cuda/kernels/launch.cuh"
#include "engine/cuda/kernels/reduce.cuh"

namespace sinkscope::cuda {
namespace {

__global__ void EmbeddingForwardKernel(float* out, const int32_t* tokens, const float* table, int N, int d) {
  const size_t total = static_cast<size_t>(N) * d;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < total; i += size_t{gridDim.x} * blockDim.x) {
    const size_t row = i / d, c = i % d;
    out[i] = table[static_cast<size_t>(tokens[row]) * d + c];
  }
}

__global__ void EmbeddingBackwardKernel(float* dtable, const float* dout, const int32_t* tokens, int N, int d) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  for (int i = 0; i < N; ++i) dtable[static_cast<size_t>(tokens[i]) * d + c] += dout[static_cast<size_t>(i) * d + c];
}

}  // namespace

void LaunchEmbeddingForward(cudaStream_t s, float* out, const int32_t* tokens, const float* table, int N, int d) {
  SINKSCOPE_COST(8.0 * N * d + 4.0 * N, 0);
  SINKSCOPE_LAUNCH(EmbeddingForwardKernel, GridFor(static_cast<size_t>(N) * d, 256), 256, 0, s)(out, tokens, table, N, d);
}
void LaunchEmbeddingBackward(cudaStream_t s, float* dtable, const float* dout, const int32_t* tokens, int N, int d) {
  SINKSCOPE_COST(12.0 * N * d + 4.0 * N, 1.0 * N * d);
  SINKSCOPE_LAUNCH(EmbeddingBackwardKernel, GridFor(d, 128), 128, 0, s)(dtable, dout, tokens, N, d);
}

}  // namespace sinkscope::cuda

// Embedding lookup and its backward. The backward adds the rows of one token in position
// order, as the CPU backend does, so repeated tokens sum in a fixed order: deterministic,
// without atomics (and the same float sums as the CPU's). For parallelism, the table is
// split by columns (blocks of kEmbedColumns) and by token id (class r: id % classes == r):
// each block walks every position, a chunk of token ids staged in shared memory at a
// time, and adds only its class's rows, so no two blocks write one element.
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

constexpr int kEmbedColumns = 128;  // threads a block: one column each; also the chunk of positions

// Block (column group blockIdx.x, token class blockIdx.y of gridDim.y).
__global__ void EmbeddingBackwardKernel(float* dtable, const float* dout, const int32_t* tokens, int N, int d) {
  SINKSCOPE_SHARED(int32_t, mine, [kEmbedColumns]);  // the chunk's ids of this class, or −1
  const int c = blockIdx.x * kEmbedColumns + threadIdx.x;
  const int classes = gridDim.y, r = blockIdx.y;
  for (int i0 = 0; i0 < N; i0 += kEmbedColumns) {
    const int i = i0 + threadIdx.x;
    const int32_t id = i < N ? tokens[i] : -1;
    mine[threadIdx.x] = id >= 0 && id % classes == r ? id : -1;
    __syncthreads();
    const int n = N - i0 < kEmbedColumns ? N - i0 : kEmbedColumns;
    if (c < d) {
      for (int j = 0; j < n; ++j) {
        const int32_t tok = mine[j];
        if (tok >= 0) dtable[static_cast<size_t>(tok) * d + c] += dout[static_cast<size_t>(i0 + j) * d + c];
      }
    }
    __syncthreads();  // the chunk is read before the next overwrites it
  }
}

}  // namespace

void LaunchEmbeddingForward(cudaStream_t s, float* out, const int32_t* tokens, const float* table, int N, int d) {
  SINKSCOPE_COST(8.0 * N * d + 4.0 * N, 0);
  SINKSCOPE_LAUNCH(EmbeddingForwardKernel, GridFor(static_cast<size_t>(N) * d, 256), 256, 0, s)(out, tokens, table, N, d);
}
void LaunchEmbeddingBackward(cudaStream_t s, float* dtable, const float* dout, const int32_t* tokens, int N, int d) {
  if (N == 0 || d == 0) return;
  const int groups = (d + kEmbedColumns - 1) / kEmbedColumns, classes = RowChunks(N, groups);
  SINKSCOPE_COST(12.0 * N * d + 4.0 * N, 1.0 * N * d);  // every block re-reads the ids (L2)
  SINKSCOPE_LAUNCH(EmbeddingBackwardKernel, dim3(groups, classes), kEmbedColumns, 0, s)(dtable, dout, tokens, N, d);
}

}  // namespace sinkscope::cuda

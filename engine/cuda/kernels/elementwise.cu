// Elementwise ops and the reductions the step and the probes accumulate.
#include "engine/cuda/kernels/act.cuh"
#include "engine/cuda/kernels/kernels.h"
#include "engine/cuda/kernels/launch.cuh"
#include "engine/cuda/kernels/reduce.cuh"

namespace sinkscope::cuda {
namespace {

constexpr int kBlock = 256;

__global__ void FillKernel(float* x, float value, size_t n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    x[i] = value;
  }
}

__global__ void AxpyKernel(float* y, float alpha, const float* x, size_t n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    y[i] += alpha * x[i];
  }
}

__global__ void ScaleKernel(float* x, float alpha, size_t n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    x[i] *= alpha;
  }
}

__global__ void AddRowBiasKernel(Act x, const float* b, size_t total, int n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < total; i += size_t{gridDim.x} * blockDim.x) {
    St(x, i, Ld(x, i) + b[i % n]);
  }
}

__global__ void ConvertKernel(Act dst, Act src, size_t n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    St(dst, i, Ld(src, i));
  }
}

// The first pass of a column sum of x (reduce.cuh, ColumnChunkSum).
__global__ void ColumnSumsPartialsKernel(float* partials, const float* x, int N, int n, int rows_per_chunk) {
  SINKSCOPE_SHARED(float, shared, [kColumnRowLanes * (kColumnTile + 1)]);
  ColumnChunkSum(partials, shared, N, n, rows_per_chunk,
                 [&](int i, int c) { return x[static_cast<size_t>(i) * n + c]; });
}

// The second pass: one thread per column adds the chunks' partials in order.
__global__ void ColumnPartialsSumKernel(float* acc, const float* partials, int chunks, int n) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= n) return;
  float s = 0;
  for (int k = 0; k < chunks; ++k) s += partials[static_cast<size_t>(k) * n + c];
  acc[c] += s;
}

// Pass 1: block b sums x² over its grid-strided share of the concatenated segments.
__global__ void SumSquaresPartialKernel(const Segment* segs, int num_segs, size_t total, double* partials) {
  SINKSCOPE_SHARED(double, shared, [33]);
  double s = 0;
  int seg = 0;
  size_t seg_start = 0;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < total; i += size_t{gridDim.x} * blockDim.x) {
    while (seg < num_segs && i >= seg_start + segs[seg].n) {
      seg_start += segs[seg].n;
      ++seg;
    }
    const double v = segs[seg].p[i - seg_start];
    s += v * v;
  }
  s = BlockSum(s, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// One block adds n values (the partials of pass 1, or per-row sums) in a fixed tree.
__global__ void SumPartialsKernel(double* acc, const double* partials, int n) {
  SINKSCOPE_SHARED(double, shared, [33]);
  double s = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += partials[i];
  s = BlockSum(s, shared);
  if (threadIdx.x == 0) *acc += s;
}

// acc(P, C) += Σ_b x[b, t, :]: one thread per (t, c), b in order.
__global__ void TokenSumKernel(float* acc, const float* x, int B, int T, int C, int P) {
  const size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x;
  if (i >= static_cast<size_t>(P) * C) return;
  const int t = static_cast<int>(i / C), c = static_cast<int>(i % C);
  float s = acc[i];
  for (int b = 0; b < B; ++b) s += x[(static_cast<size_t>(b) * T + t) * C + c];
  acc[i] = s;
}

// acc(t) += Σ_b Σ_g ‖x[b,t,g,:]‖: one block per token t; a thread per (b, g) row.
__global__ void TokenNormSumKernel(float* acc, Act x, int B, int T, int G, int C) {
  SINKSCOPE_SHARED(double, shared, [33]);
  const int t = blockIdx.x;
  double total = 0;
  for (int r = threadIdx.x; r < B * G; r += blockDim.x) {
    const int b = r / G, g = r % G;
    const size_t row = ((static_cast<size_t>(b) * T + t) * G + g) * C;
    double s = 0;
    for (int c = 0; c < C; ++c) {
      const double v = Ld(x, row + c);
      s += v * v;
    }
    total += sqrt(s);
  }
  total = BlockSum(total, shared);
  if (threadIdx.x == 0) acc[t] += static_cast<float>(total);
}

}  // namespace

void LaunchFill(cudaStream_t s, float* x, float value, size_t n) {
  SINKSCOPE_COST(4.0 * n, 0);
  SINKSCOPE_LAUNCH(FillKernel, GridFor(n, kBlock), kBlock, 0, s)(x, value, n);
}
void LaunchAxpy(cudaStream_t s, float* y, float alpha, const float* x, size_t n) {
  SINKSCOPE_COST(12.0 * n, 2.0 * n);
  SINKSCOPE_LAUNCH(AxpyKernel, GridFor(n, kBlock), kBlock, 0, s)(y, alpha, x, n);
}
void LaunchScale(cudaStream_t s, float* x, float alpha, size_t n) {
  SINKSCOPE_COST(8.0 * n, 1.0 * n);
  SINKSCOPE_LAUNCH(ScaleKernel, GridFor(n, kBlock), kBlock, 0, s)(x, alpha, n);
}
void LaunchAddRowBias(cudaStream_t s, Act x, const float* b, int N, int n) {
  const size_t total = static_cast<size_t>(N) * n;
  SINKSCOPE_COST(2 * x.bytes() * total + 4.0 * n, 1.0 * total);
  SINKSCOPE_LAUNCH(AddRowBiasKernel, GridFor(total, kBlock), kBlock, 0, s)(x, b, total, n);
}
void LaunchColumnSums(cudaStream_t s, float* acc, const float* x, int N, int n, float* partials) {
  if (N == 0 || n == 0) return;
  int rows_per_chunk = 0;
  const dim3 grid = ColumnGrid(N, n, &rows_per_chunk);
  SINKSCOPE_COST(4.0 * N * n + 4.0 * grid.y * n, 1.0 * N * n);
  SINKSCOPE_LAUNCH(ColumnSumsPartialsKernel, grid, ColumnBlock(), 0, s)(partials, x, N, n, rows_per_chunk);
  LaunchColumnPartialsSum(s, acc, partials, static_cast<int>(grid.y), n);
}
void LaunchColumnPartialsSum(cudaStream_t s, float* acc, const float* partials, int chunks, int n) {
  SINKSCOPE_COST(4.0 * chunks * n + 8.0 * n, 1.0 * chunks * n);
  SINKSCOPE_LAUNCH(ColumnPartialsSumKernel, GridFor(n, 128), 128, 0, s)(acc, partials, chunks, n);
}
void LaunchSumSquares(cudaStream_t s, double* acc, const Segment* segs, int num_segs, size_t total,
                      double* partials) {
  SINKSCOPE_COST(4.0 * total + 8.0 * kReduceBlocks, 2.0 * total);
  SINKSCOPE_LAUNCH(SumSquaresPartialKernel, kReduceBlocks, kBlock, 0, s)(segs, num_segs, total, partials);
  LaunchSumInto(s, acc, partials, kReduceBlocks);
}
void LaunchSumInto(cudaStream_t s, double* acc, const double* values, int n) {
  SINKSCOPE_COST(8.0 * n + 8, 1.0 * n);
  SINKSCOPE_LAUNCH(SumPartialsKernel, 1, 1024, 0, s)(acc, values, n);
}
void LaunchTokenSum(cudaStream_t s, float* acc, const float* x, int B, int T, int C, int P) {
  const size_t n = static_cast<size_t>(P) * C;
  SINKSCOPE_COST(4.0 * B * n + 8.0 * n, 1.0 * B * n);
  SINKSCOPE_LAUNCH(TokenSumKernel, GridFor(n, kBlock), kBlock, 0, s)(acc, x, B, T, C, P);
}
void LaunchConvert(cudaStream_t s, Act dst, Act src, size_t n) {
  if (n == 0) return;
  SINKSCOPE_COST((dst.bytes() + src.bytes()) * n, 0);
  SINKSCOPE_LAUNCH(ConvertKernel, GridFor(n, kBlock), kBlock, 0, s)(dst, src, n);
}
void LaunchTokenNormSum(cudaStream_t s, float* acc, Act x, int B, int T, int G, int C, int P) {
  if (P > 0) {
    SINKSCOPE_COST(x.bytes() * B * P * G * C + 8.0 * P, 2.0 * B * P * G * C);
    SINKSCOPE_LAUNCH(TokenNormSumKernel, P, kBlock, 0, s)(acc, x, B, T, G, C);
  }
}

}  // namespace sinkscope::cuda

// Cross-entropy over logit rows, in place: one block per row (max in float, Σ exp in
// double as the CPU backend), then the rows' losses added in a fixed tree.
#include <cfloat>

#include "engine/cuda/kernels/act.cuh"
#include "engine/cuda/kernels/kernels.h"
#include "engine/cuda/kernels/launch.cuh"
#include "engine/cuda/kernels/reduce.cuh"

namespace sinkscope::cuda {
namespace {

constexpr int kBlock = 256;

__global__ void RowKernel(float* logits, Act grad_out, const int32_t* targets, int V, bool grad, float grad_scale,
                          double* row_loss) {
  SINKSCOPE_SHARED(float, fshared, [33]);
  SINKSCOPE_SHARED(double, dshared, [33]);
  float* row = logits + static_cast<size_t>(blockIdx.x) * V;
  const int target = targets[blockIdx.x];
  float mx = -FLT_MAX;
  for (int c = threadIdx.x; c < V; c += blockDim.x) mx = fmaxf(mx, row[c]);
  mx = BlockMax(mx, fshared, -FLT_MAX);
  double z = 0;
  for (int c = threadIdx.x; c < V; c += blockDim.x) z += exp(static_cast<double>(row[c] - mx));
  z = BlockSum(z, dshared);
  if (threadIdx.x == 0) row_loss[blockIdx.x] = log(z) - (row[target] - mx);
  __syncthreads();  // row[target] is read above before any thread overwrites it
  if (!grad) return;
  const double inv_z = 1.0 / z;
  const size_t o = static_cast<size_t>(blockIdx.x) * V;
  for (int c = threadIdx.x; c < V; c += blockDim.x) {
    const double p = exp(static_cast<double>(row[c] - mx)) * inv_z;
    St(grad_out, o + c, static_cast<float>(grad_scale * (p - (c == target ? 1.0 : 0.0))));
  }
}

}  // namespace

void LaunchCrossEntropy(cudaStream_t s, float* logits, const int32_t* targets, int N, int V, bool grad,
                        float grad_scale, double* row_loss, double* loss_acc, Act grad_out) {
  if (N == 0) return;
  if (grad_out.p == nullptr) grad_out = logits;
  SINKSCOPE_COST((4.0 + (grad ? grad_out.bytes() : 0.0)) * N * V + 4.0 * N + 8.0 * N, 5.0 * N * V);
  SINKSCOPE_LAUNCH(RowKernel, N, kBlock, 0, s)(logits, grad_out, targets, V, grad, grad_scale, row_loss);
  LaunchSumInto(s, loss_acc, row_loss, N);
}

}  // namespace sinkscope::cuda

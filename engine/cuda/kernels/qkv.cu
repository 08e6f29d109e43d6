// The packed attention input of the bf16 step (cuda_backend.cc): one GEMM writes
// P = x̃·[W_q; W_k; W_v]ᵀ (+ bias) as rows of qd + 2·kvd, and one kernel turns P into what
// attention reads: q and k rotated (RoPE), v as projected and v̂ = V-scale(v). Its
// backward packs [RoPE⁻¹(∂q) | RoPE⁻¹(∂k) | ∂v] into one bf16 operand of the two GEMMs
// that follow (∂x̃ and ∂W_qkv). The arithmetic of each element is that of the unfused
// kernels (rope.cu, vscale.cu), in the same order: packed and unpacked give the same bits.
#include "engine/cuda/kernel_math.h"
#include "engine/cuda/kernels/act.cuh"
#include "engine/cuda/kernels/kernels.h"
#include "engine/cuda/kernels/launch.cuh"
#include "engine/cuda/kernels/reduce.cuh"

namespace sinkscope::cuda {
namespace {

// Threads [0, pairs) rotate one (j, j + dh/2) pair of a q or k head; threads
// [pairs, pairs + N·KV) each take one (token, KV head) row of v.
__global__ void QkvSplitKernel(Act q, Act k, Act v, Act vhat, Act packed, const float2* cs, const float* theta,
                               int B, int T, int H, int KV, int dh, double c_base, int vscale) {
  const int half = dh / 2;
  const size_t N = static_cast<size_t>(B) * T;
  const size_t ld = static_cast<size_t>(H + 2 * KV) * dh;  // a row of P
  const size_t pairs = N * (H + KV) * half, rows = N * KV;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < pairs + rows; i += size_t{gridDim.x} * blockDim.x) {
    if (i < pairs) {
      const int j = static_cast<int>(i % half);
      const size_t slot_row = i / half;  // (n, slot): slot < H a q head, else a k head
      const int slot = static_cast<int>(slot_row % (H + KV));
      const size_t n = slot_row / (H + KV);
      const int t = static_cast<int>(n % T);
      const size_t src = n * ld + static_cast<size_t>(slot) * dh;
      const float2 c = cs[static_cast<size_t>(t) * half + j];
      float o1, o2;
      kmath::RotatePair(Ld(packed, src + j), Ld(packed, src + j + half), c.x, c.y, &o1, &o2);
      const Act dst = slot < H ? q : k;
      const size_t at = slot < H ? (n * H + slot) * dh : (n * KV + (slot - H)) * dh;
      St(dst, at + j, o1);
      St(dst, at + j + half, o2);
    } else {
      const size_t row = i - pairs;  // (n, g)
      const int g = static_cast<int>(row % KV);
      const size_t n = row / KV;
      const size_t src = n * ld + static_cast<size_t>(H + KV + g) * dh, o = row * dh;
      if (!vscale) {
        for (int c = 0; c < dh; ++c) {
          const float x = Ld(packed, src + c);
          St(v, o + c, x);
          St(vhat, o + c, x);
        }
        continue;
      }
      double r = 0;
      for (int c = 0; c < dh; ++c) {
        const double x = Ld(packed, src + c);
        r += x * x;
      }
      const float phi = static_cast<float>(kmath::VScalePhi(r, kmath::VScaleC(c_base, theta[g])));
      for (int c = 0; c < dh; ++c) {
        const float x = Ld(packed, src + c);
        St(v, o + c, x);
        St(vhat, o + c, phi * x);
      }
    }
  }
}

// Threads [0, pairs) un-rotate one pair of ∂q or ∂k into P's layout; threads
// [pairs, pairs + N·kvd) each store one element of ∂v.
__global__ void QkvPackGradKernel(Act packed, const float* dq, const float* dk, const float* dv, const float2* cs,
                                  int B, int T, int H, int KV, int dh) {
  const int half = dh / 2;
  const size_t N = static_cast<size_t>(B) * T;
  const size_t kvd = static_cast<size_t>(KV) * dh, ld = static_cast<size_t>(H) * dh + 2 * kvd;
  const size_t pairs = N * (H + KV) * half, vs = N * kvd;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < pairs + vs; i += size_t{gridDim.x} * blockDim.x) {
    if (i < pairs) {
      const int j = static_cast<int>(i % half);
      const size_t slot_row = i / half;
      const int slot = static_cast<int>(slot_row % (H + KV));
      const size_t n = slot_row / (H + KV);
      const int t = static_cast<int>(n % T);
      const float* src = slot < H ? dq + (n * H + slot) * dh : dk + (n * KV + (slot - H)) * dh;
      const size_t dst = n * ld + static_cast<size_t>(slot) * dh;
      const float2 c = cs[static_cast<size_t>(t) * half + j];
      float o1, o2;
      kmath::RotatePair(src[j], src[j + half], c.x, c.y, &o1, &o2);
      St(packed, dst + j, o1);
      St(packed, dst + j + half, o2);
    } else {
      const size_t e = i - pairs, n = e / kvd;
      St(packed, n * ld + static_cast<size_t>(H + KV) * dh + e % kvd, dv[e]);
    }
  }
}

}  // namespace

void LaunchQkvSplit(cudaStream_t s, Act q, Act k, Act v, Act vhat, Act packed, const float2* cs, const float* theta,
                    int B, int T, int H, int KV, int dh, double c_base, bool vscale) {
  const size_t N = static_cast<size_t>(B) * T, pairs = N * (H + KV) * (dh / 2), rows = N * KV;
  const size_t qk = N * (H + KV) * dh, vn = rows * dh;
  SINKSCOPE_COST(packed.bytes() * (qk + vn) + q.bytes() * (qk + 2 * vn) + 8.0 * T * (dh / 2) + 4.0 * KV,
                 6.0 * pairs + 3.0 * vn);
  SINKSCOPE_LAUNCH(QkvSplitKernel, GridFor(pairs + rows, 256), 256, 0, s)(q, k, v, vhat, packed, cs, theta, B, T, H,
                                                                           KV, dh, c_base, vscale ? 1 : 0);
}

void LaunchQkvPackGrad(cudaStream_t s, Act packed, const float* dq, const float* dk, const float* dv, const float2* cs,
                       int B, int T, int H, int KV, int dh) {
  const size_t N = static_cast<size_t>(B) * T, pairs = N * (H + KV) * (dh / 2), vs = N * KV * dh;
  const size_t all = N * (H + 2 * KV) * dh;
  SINKSCOPE_COST((4.0 + packed.bytes()) * all + 8.0 * T * (dh / 2), 6.0 * pairs);
  SINKSCOPE_LAUNCH(QkvPackGradKernel, GridFor(pairs + vs, 256), 256, 0, s)(packed, dq, dk, dv, cs, B, T, H, KV, dh);
}

}  // namespace sinkscope::cuda

// Causal GQA attention of the CUDA backend's fp32 mode as a tiled flash attention
// (Dao, FlashAttention-2): O(T) memory, no T×T buffer. It is also the fallback of the
// cuDNN path (engine/cuda/cudnn_attention.h) where cuDNN has no engine.
//
// The idea, per (b, h) and tile of kTile query rows: stream the key/value tiles u ≤ t
// through shared memory and keep, per query row, a running max m, a running sum l of
// exp(s − m) and an output accumulator rescaled by exp(m_old − m_new) whenever the max
// grows (the online softmax). The forward writes y = o / l and lse = m + log l.
//
// The backward recomputes P = exp(s − lse) from q, k and the lse instead of storing it:
//   D_t  = Σ_c dy_t,c · y_t,c                (first, its own kernel)
//   dS   = P ⊙ (dy·vᵀ − D) / √dh
//   dv_u = Σ_{h∈g} Σ_{t≥u} P[t,u] dy_t,   dk_u = Σ_{h∈g} Σ_{t≥u} dS[t,u] q_t
//   dq_t = Σ_{u≤t} dS[t,u] k_u.
// Deterministic without atomics: one block owns a key tile of one KV head and loops over
// the query tiles and the group's query heads in order (dK, dV); another kernel owns a
// query tile and loops over the key tiles (dQ). Each output element is summed by one
// thread in a fixed order, so the same inputs give the same bits.
//
// Threads: kLanes consecutive lanes of a warp share one row of the tile (a query row in
// the forward and dQ, a key row in dK/dV): lane ℓ scores the tile's columns ℓ, ℓ + kLanes, …
// and owns the output columns ℓ, ℓ + kLanes, … of its row. A row's probabilities go
// through shared memory between lanes of one warp, so a __syncwarp orders them. Shared
// tiles have a row stride of dh + 1 (odd for even dh): lanes reading different rows at
// one column hit different banks. GQA: query head h reads KV head h / (H / KV) in place.
// Only live scores are computed: the masked half of a diagonal tile and the rows past the
// end of the sequence are skipped (loops bounded per row), not computed and zeroed.
//
// The attention arms (docs/design/ARMS.md) run through the same kernels, one template
// instantiation per normalisation (FlashFamily): the sink softmaxes start the running max
// and sum at the sink logit (m = s_h, l = 1), so the sink column is the first "key" and
// lse includes it; sigmoid has no normalisation (p = σ(z + b), y = Σ p v, no running max);
// softpick keeps a running shift m = max(0, max z) and rescales Σ|e^(z−m) − e^(−m)| (and
// its positive part) by e^(m_old − m_new) as the online softmax does, so every arm keeps
// O(T) memory: per row, lse (or softpick's m and D') and the unassigned mass. Their
// backward recomputes the weights from those rows; D = Σ dy ⊙ y is Σ_u a·dA for every
// normalised arm, so the sink softmaxes and softpick use it as softmax does.
//
// On an H100 this is an fp32 CUDA-core kernel (no tensor cores): it exists for the fp32
// parity mode and as the cross-check of cuDNN, not as the bf16 fast path.
#include <cmath>

#include "engine/cuda/kernels/act.cuh"
#include "engine/cuda/kernels/kernels.h"
#include "engine/cuda/kernels/launch.cuh"
#include "engine/cuda/kernels/reduce.cuh"

namespace sinkscope::cuda {
namespace {

struct Shape {
  int B, T, H, KV, dh;
  __device__ int group() const { return H / KV; }
  // q, y, dy: (B,T,H,dh); k, v: (B,T,KV,dh); lse, D: (B,H,T).
  __device__ size_t QAt(int b, int t, int h) const { return ((static_cast<size_t>(b) * T + t) * H + h) * dh; }
  __device__ size_t KvAt(int b, int t, int g) const { return ((static_cast<size_t>(b) * T + t) * KV + g) * dh; }
  __device__ size_t RowAt(int b, int h, int t) const { return (static_cast<size_t>(b) * H + h) * T + t; }
};

// rows × dh of a (…, row_stride) tensor into a shared tile of stride dh + 1; rows past
// `valid` read as 0 (the tile's tail at the end of the sequence).
// src is fp32 or bf16 (Act); the tile is fp32.
__device__ inline void LoadTile(float* tile, Act src, size_t row_stride, int rows, int valid, int dh) {
  const int ld = dh + 1;
  for (int i = threadIdx.x; i < rows * dh; i += blockDim.x) {
    const int r = i / dh, c = i % dh;
    tile[r * ld + c] = r < valid ? Ld(src, r * row_stride + c) : 0.0f;
  }
}

__device__ inline int Min(int a, int b) { return a < b ? a : b; }

// The arm's sink logit s_h (kernels.h FlashArm): its tensor, or 0 for softmax_plus_one.
__device__ inline float SinkLogit(const FlashArm& A, int h) { return A.sink != nullptr ? A.sink[h] : 0.0f; }

// Softpick's weight and dz factor from a scaled score z and the row's shift m and D'
// (ARMS.md): a = max(e − c, 0)/D' with e = e^(z−m), c = e^(−m).
__device__ inline float SoftpickDiff(float z, float m, float* e) {
  *e = expf(z - m);
  return *e - expf(-m);
}
// ∂L/∂z of one score from the weight p (recomputed), dA = dp and the row's D (ARMS.md):
// softmax and the sink softmaxes p(dp − D); sigmoid dp·p(1 − p); softpick
// (e/D')·(1[diff > 0]·dp − sign(diff)·D).
template <int kFamily>
__device__ inline float ScoreGrad(float z, float dp, float r0, float r1, float d, const FlashArm& A, float* p) {
  if (kFamily == kFlashSigmoid) {
    *p = 1.0f / (1.0f + expf(-(z + A.bias)));
    return dp * *p * (1.0f - *p);
  } else if (kFamily == kFlashSoftpick) {
    float e;
    const float diff = SoftpickDiff(z, r0, &e);
    *p = fmaxf(diff, 0.0f) / r1;
    const float sign = diff > 0.0f ? 1.0f : diff < 0.0f ? -1.0f : 0.0f;
    return e / r1 * ((diff > 0.0f ? dp : 0.0f) - sign * d);
  } else {
    *p = expf(z - r0);
    return *p * (dp - d);
  }
}

__device__ inline float RowMax(float v, int lanes) {
  for (int o = lanes / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ inline float RowSum(float v, int lanes) {
  for (int o = lanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Grid (query tiles, B·H), the longest rows first; kTile·kLanes threads.
// Shared: q, k, v tiles (kTile, dh+1) and P (kTile, kTile+1).
// Writes y and, per row, r0 (lse; softpick: m), r1 (softpick: D') and the unassigned mass
// (the sink's share; 1 − Σ a for sigmoid and softpick); r1 and unassigned may be null.
template <int kDhMax, int kTile, int kLanes, int kFamily>
__global__ void __launch_bounds__(kTile* kLanes) FlashForwardKernel(Act y, float* r0, float* r1, float* unassigned,
                                                                     Act q, Act k, Act v,
                                                                     Shape S, FlashArm A) {
  constexpr int kCols = kDhMax / kLanes, kKeys = kTile / kLanes, ldp = kTile + 1;
  SINKSCOPE_DYNAMIC_SHARED(float, smem);
  const int ld = S.dh + 1;
  float* qs = smem;
  float* ks = qs + kTile * ld;
  float* vs = ks + kTile * ld;
  float* ps = vs + kTile * ld;
  const int t0 = (gridDim.x - 1 - blockIdx.x) * kTile;
  const int b = blockIdx.y / S.H, h = blockIdx.y % S.H, g = h / S.group();
  const int row = threadIdx.x / kLanes, lane = threadIdx.x % kLanes, t = t0 + row;
  const size_t q_stride = static_cast<size_t>(S.H) * S.dh, kv_stride = static_cast<size_t>(S.KV) * S.dh;
  const float scale = rsqrtf(static_cast<float>(S.dh));
  LoadTile(qs, Off(q, S.QAt(b, t0, h)), q_stride, kTile, Min(kTile, S.T - t0), S.dh);
  float o[kCols];
  for (int i = 0; i < kCols; ++i) o[i] = 0.0f;
  // The running max m and sum l before the first key: the sink column (m = s_h, l = 1),
  // softpick's floor m = 0 with ε·e^(−m) in l, or nothing. pos: softpick's Σ of weights' numerators.
  const float s_h = kFamily == kFlashExp && A.has_sink ? SinkLogit(A, h) : 0.0f;
  float m = kFamily == kFlashExp ? (A.has_sink ? s_h : -INFINITY) : 0.0f;
  float l = kFamily == kFlashExp ? (A.has_sink ? 1.0f : 0.0f) : kFamily == kFlashSoftpick ? A.eps : 0.0f;
  float pos = 0.0f;
  for (int u0 = 0; u0 <= t0; u0 += kTile) {  // key tiles up to the diagonal one
    __syncthreads();                          // the previous tile is read (and q is loaded)
    LoadTile(ks, Off(k, S.KvAt(b, u0, g)), kv_stride, kTile, Min(kTile, S.T - u0), S.dh);
    LoadTile(vs, Off(v, S.KvAt(b, u0, g)), kv_stride, kTile, Min(kTile, S.T - u0), S.dh);
    __syncthreads();
    // Keys u0 + j ≤ min(t, T − 1) are live; the rest of the tile (past the diagonal or the
    // sequence, and every key of a row past the sequence) is skipped, not computed.
    const int live = t < S.T ? Min(kTile, t - u0 + 1) : 0;
    float s[kKeys], tile_max = -INFINITY;
    for (int i = 0; i < kKeys; ++i) {
      const int j = lane + i * kLanes;
      s[i] = -INFINITY;
      if (j < live) {
        float dot = 0.0f;
        for (int c = 0; c < S.dh; ++c) dot += qs[row * ld + c] * ks[j * ld + c];
        s[i] = dot * scale;
      }
      tile_max = fmaxf(tile_max, s[i]);
    }
    float rescale = 1.0f, sum = 0.0f, pos_sum = 0.0f;
    if (kFamily == kFlashSigmoid) {  // unnormalised: no running max, nothing to rescale
      for (int i = 0; i < kKeys; ++i) {
        const int j = lane + i * kLanes;
        if (j < live) {
          const float p = 1.0f / (1.0f + expf(-(s[i] + A.bias)));
          ps[row * ldp + j] = p;
          sum += p;
        }
      }
      l += RowSum(sum, kLanes);
    } else {
      const float m_new = fmaxf(m, RowMax(tile_max, kLanes));
      // A live row's key u0 ≤ t makes m finite at its first tile; a dead row keeps −∞ and
      // exponentiates against 0 instead (no ∞ − ∞). Softpick's m never drops below 0.
      const float m_ref = m_new == -INFINITY ? 0.0f : m_new;
      rescale = expf(m - m_ref);  // 0 at a live row's first tile (m = −∞)
      for (int i = 0; i < kKeys; ++i) {
        const int j = lane + i * kLanes;
        if (j < live) {
          float p;
          if (kFamily == kFlashSoftpick) {
            float e;
            const float diff = SoftpickDiff(s[i], m_ref, &e);
            p = fmaxf(diff, 0.0f);
            sum += fabsf(diff);
            pos_sum += p;
          } else {
            p = expf(s[i] - m_ref);
            sum += p;
          }
          ps[row * ldp + j] = p;
        }
      }
      l = l * rescale + RowSum(sum, kLanes);
      if (kFamily == kFlashSoftpick) pos = pos * rescale + RowSum(pos_sum, kLanes);
      m = m_new;
    }
    __syncwarp();  // the row's P, written by its kLanes lanes of this warp
    for (int i = 0; i < kCols; ++i) o[i] *= rescale;
    for (int j = 0; j < live; ++j) {
      const float p = ps[row * ldp + j];
      for (int i = 0; i < kCols; ++i) {
        const int c = lane + i * kLanes;
        if (c < S.dh) o[i] += p * vs[j * ld + c];
      }
    }
  }
  if (t < S.T) {
    const float inv = kFamily == kFlashSigmoid ? 1.0f : 1.0f / l;
    for (int i = 0; i < kCols; ++i) {
      const int c = lane + i * kLanes;
      if (c < S.dh) St(y, S.QAt(b, t, h) + c, o[i] * inv);
    }
    if (lane == 0) {
      const size_t at = S.RowAt(b, h, t);
      if (kFamily == kFlashExp) {
        r0[at] = m + logf(l);
        if (unassigned != nullptr) unassigned[at] = A.has_sink ? expf(s_h - m) * inv : 0.0f;
      } else if (kFamily == kFlashSigmoid) {
        if (unassigned != nullptr) unassigned[at] = 1.0f - l;
      } else {
        r0[at] = m;
        r1[at] = l;
        if (unassigned != nullptr) unassigned[at] = 1.0f - pos * inv;
      }
    }
  }
}

// D (B,H,T) = Σ_c dy ⊙ y per row: one warp per (b, t, h) row.
__global__ void FlashBackwardDotKernel(float* D, const float* dy, Act y, Shape S) {
  const size_t rows = static_cast<size_t>(S.B) * S.T * S.H;
  const size_t r = (blockIdx.x * size_t{blockDim.x} + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  float s = 0.0f;
  if (r < rows) {
    for (int c = lane; c < S.dh; c += 32) s += dy[r * S.dh + c] * Ld(y, r * S.dh + c);
  }
  s = WarpSum(s);  // every lane takes part: rows past the end add zeros
  if (r < rows && lane == 0) {
    const int h = static_cast<int>(r % S.H), t = static_cast<int>((r / S.H) % S.T), b = static_cast<int>(r / S.H / S.T);
    D[S.RowAt(b, h, t)] = s;
  }
}

// Grid (key tiles, B·KV), the longest columns (the first keys) first. One block owns the
// dk, dv rows of its key tile and sums over the group's heads and the query tiles t0 ≥ u0
// in order. Shared: k, v, q, dy tiles (kTile, dh+1), P and dS as (key, query) tiles
// (kTile, kTile+1), the query tile's lse and D.
template <int kDhMax, int kTile, int kLanes, int kFamily>
__global__ void __launch_bounds__(kTile* kLanes) FlashBackwardKvKernel(float* dk, float* dv, const float* dy,
                                                                        const float* r0, const float* r1,
                                                                        const float* D, Act q,
                                                                        Act k, Act v, Shape S,
                                                                        FlashArm A) {
  constexpr int kCols = kDhMax / kLanes, kQueries = kTile / kLanes, ldp = kTile + 1;
  SINKSCOPE_DYNAMIC_SHARED(float, smem);
  const int ld = S.dh + 1;
  float* ks = smem;
  float* vs = ks + kTile * ld;
  float* qs = vs + kTile * ld;
  float* dys = qs + kTile * ld;
  float* ps = dys + kTile * ld;
  float* dss = ps + kTile * ldp;
  float* lse_s = dss + kTile * ldp;
  float* d_s = lse_s + kTile;
  float* r1_s = d_s + kTile;  // softpick's D' (only its instantiation has the room)
  const int u0 = blockIdx.x * kTile;
  const int b = blockIdx.y / S.KV, g = blockIdx.y % S.KV;
  const int key = threadIdx.x / kLanes, lane = threadIdx.x % kLanes, u = u0 + key;
  const size_t q_stride = static_cast<size_t>(S.H) * S.dh, kv_stride = static_cast<size_t>(S.KV) * S.dh;
  const float scale = rsqrtf(static_cast<float>(S.dh));
  LoadTile(ks, Off(k, S.KvAt(b, u0, g)), kv_stride, kTile, Min(kTile, S.T - u0), S.dh);
  LoadTile(vs, Off(v, S.KvAt(b, u0, g)), kv_stride, kTile, Min(kTile, S.T - u0), S.dh);
  float dk_acc[kCols], dv_acc[kCols];
  for (int i = 0; i < kCols; ++i) dk_acc[i] = dv_acc[i] = 0.0f;
  for (int h = g * S.group(); h < (g + 1) * S.group(); ++h) {
    for (int t0 = u0; t0 < S.T; t0 += kTile) {  // query tiles on or below the diagonal
      const int valid = Min(kTile, S.T - t0);
      __syncthreads();  // the previous query tile is read (and k, v are loaded)
      LoadTile(qs, Off(q, S.QAt(b, t0, h)), q_stride, kTile, valid, S.dh);
      LoadTile(dys, Off(dy, S.QAt(b, t0, h)), q_stride, kTile, valid, S.dh);
      for (int r = threadIdx.x; r < kTile; r += blockDim.x) {
        lse_s[r] = r < valid && kFamily != kFlashSigmoid ? r0[S.RowAt(b, h, t0 + r)] : 0.0f;
        d_s[r] = r < valid ? D[S.RowAt(b, h, t0 + r)] : 0.0f;
        if (kFamily == kFlashSoftpick) r1_s[r] = r < valid ? r1[S.RowAt(b, h, t0 + r)] : 1.0f;
      }
      __syncthreads();
      // Queries t0 + r with u ≤ t < T are live: r in [first, last); none for a key past T.
      const int first = u < S.T ? (u - t0 > 0 ? u - t0 : 0) : kTile, last = valid;
      for (int i = 0; i < kQueries; ++i) {
        const int r = lane + i * kLanes;
        if (r < first || r >= last) continue;
        float s = 0.0f, dp = 0.0f;
        for (int c = 0; c < S.dh; ++c) {
          s += ks[key * ld + c] * qs[r * ld + c];
          dp += vs[key * ld + c] * dys[r * ld + c];
        }
        float p;
        const float dz =
            ScoreGrad<kFamily>(s * scale, dp, lse_s[r], kFamily == kFlashSoftpick ? r1_s[r] : 1.0f, d_s[r], A, &p);
        ps[key * ldp + r] = p;
        dss[key * ldp + r] = dz * scale;
      }
      __syncwarp();  // the key row's P and dS, written by its lanes of this warp
      for (int r = first; r < last; ++r) {
        const float p = ps[key * ldp + r], ds = dss[key * ldp + r];
        for (int i = 0; i < kCols; ++i) {
          const int c = lane + i * kLanes;
          if (c < S.dh) {
            dv_acc[i] += p * dys[r * ld + c];
            dk_acc[i] += ds * qs[r * ld + c];
          }
        }
      }
    }
  }
  if (u < S.T) {
    for (int i = 0; i < kCols; ++i) {
      const int c = lane + i * kLanes;
      if (c < S.dh) {
        dk[S.KvAt(b, u, g) + c] = dk_acc[i];
        dv[S.KvAt(b, u, g) + c] = dv_acc[i];
      }
    }
  }
}

// Grid (query tiles, B·H), the longest rows first. One block owns the dq rows of its query
// tile and sums over the key tiles u0 ≤ t0 in order. Shared: q, dy, k, v tiles
// (kTile, dh+1) and dS (kTile, kTile+1).
template <int kDhMax, int kTile, int kLanes, int kFamily>
__global__ void __launch_bounds__(kTile* kLanes) FlashBackwardQKernel(float* dq, const float* dy, const float* r0,
                                                                       const float* r1, const float* D,
                                                                       Act q, Act k,
                                                                       Act v, Shape S, FlashArm A) {
  constexpr int kCols = kDhMax / kLanes, kKeys = kTile / kLanes, ldp = kTile + 1;
  SINKSCOPE_DYNAMIC_SHARED(float, smem);
  const int ld = S.dh + 1;
  float* qs = smem;
  float* dys = qs + kTile * ld;
  float* ks = dys + kTile * ld;
  float* vs = ks + kTile * ld;
  float* dss = vs + kTile * ld;
  const int t0 = (gridDim.x - 1 - blockIdx.x) * kTile;
  const int b = blockIdx.y / S.H, h = blockIdx.y % S.H, g = h / S.group();
  const int row = threadIdx.x / kLanes, lane = threadIdx.x % kLanes, t = t0 + row;
  const size_t q_stride = static_cast<size_t>(S.H) * S.dh, kv_stride = static_cast<size_t>(S.KV) * S.dh;
  const float scale = rsqrtf(static_cast<float>(S.dh));
  LoadTile(qs, Off(q, S.QAt(b, t0, h)), q_stride, kTile, Min(kTile, S.T - t0), S.dh);
  LoadTile(dys, Off(dy, S.QAt(b, t0, h)), q_stride, kTile, Min(kTile, S.T - t0), S.dh);
  const float lse_t = t < S.T && kFamily != kFlashSigmoid ? r0[S.RowAt(b, h, t)] : 0.0f;
  const float r1_t = t < S.T && kFamily == kFlashSoftpick ? r1[S.RowAt(b, h, t)] : 1.0f;
  const float d_t = t < S.T ? D[S.RowAt(b, h, t)] : 0.0f;
  float dq_acc[kCols];
  for (int i = 0; i < kCols; ++i) dq_acc[i] = 0.0f;
  for (int u0 = 0; u0 <= t0; u0 += kTile) {
    __syncthreads();  // the previous key tile is read (and q, dy are loaded)
    LoadTile(ks, Off(k, S.KvAt(b, u0, g)), kv_stride, kTile, Min(kTile, S.T - u0), S.dh);
    LoadTile(vs, Off(v, S.KvAt(b, u0, g)), kv_stride, kTile, Min(kTile, S.T - u0), S.dh);
    __syncthreads();
    const int live = t < S.T ? Min(kTile, t - u0 + 1) : 0;  // keys u0 + j ≤ t
    for (int i = 0; i < kKeys; ++i) {
      const int j = lane + i * kLanes;
      if (j >= live) continue;
      float s = 0.0f, dp = 0.0f;
      for (int c = 0; c < S.dh; ++c) {
        s += qs[row * ld + c] * ks[j * ld + c];
        dp += dys[row * ld + c] * vs[j * ld + c];
      }
      float p;
      dss[row * ldp + j] = ScoreGrad<kFamily>(s * scale, dp, lse_t, r1_t, d_t, A, &p) * scale;
    }
    __syncwarp();  // the query row's dS, written by its lanes of this warp
    for (int j = 0; j < live; ++j) {
      const float ds = dss[row * ldp + j];
      for (int i = 0; i < kCols; ++i) {
        const int c = lane + i * kLanes;
        if (c < S.dh) dq_acc[i] += ds * ks[j * ld + c];
      }
    }
  }
  if (t < S.T) {
    for (int i = 0; i < kCols; ++i) {
      const int c = lane + i * kLanes;
      if (c < S.dh) dq[S.QAt(b, t, h) + c] = dq_acc[i];
    }
  }
}

// The causal triangle's scores, B·heads·T(T+1)/2, and the bytes of q_like (B,T,H,dh) plus
// kv_like (B,T,KV,dh) fp32 tensors and `rows` (B,H,T) ones: the launches' declared costs.
// Bytes are what each kernel must move at least (every tensor once; the key/value tiles a
// block re-reads are L2 traffic); FLOPs are what it does, recomputation included.
double Causal(const Shape& S, int heads) { return static_cast<double>(S.B) * heads * S.T * (S.T + 1) / 2.0; }
// eb: bytes per element of the q_like and kv_like tensors (4, or 2 for bf16 activations).
double Bytes(const Shape& S, int q_like, int kv_like, int rows, double eb = 4.0) {
  return S.B * static_cast<double>(S.T) *
         (eb * S.dh * (static_cast<double>(q_like) * S.H + static_cast<double>(kv_like) * S.KV) + 4.0 * rows * S.H);
}

// ∂L/∂s_h += Σ_b Σ_t −unassigned[b,h,t]·D[b,h,t] (the sink column's value is zero, so
// dz_sink = p_sink·(0 − D)): one block per head, each thread's rows in order, then a
// fixed-shape block sum, so the same inputs give the same bits.
__global__ void SinkLogitGradKernel(float* dsink, const float* unassigned, const float* D, int B, int H, int T) {
  SINKSCOPE_SHARED(double, shared, [33]);
  const int h = blockIdx.x;
  double acc = 0;
  for (int i = threadIdx.x; i < B * T; i += blockDim.x) {
    const size_t at = (static_cast<size_t>(i / T) * H + h) * T + i % T;
    acc -= static_cast<double>(unassigned[at]) * D[at];
  }
  acc = BlockSum(acc, shared);
  if (threadIdx.x == 0) dsink[h] += static_cast<float>(acc);
}

// One tile configuration: kTile rows of kLanes threads, head dims up to kDhMax.
template <int kDhMax, int kTile, int kLanes>
struct Flash {
  static constexpr int kThreads = kTile * kLanes;
  static size_t Tiles(int dh, int n) { return sizeof(float) * static_cast<size_t>(n) * kTile * (dh + 1); }
  static size_t ProbTiles(int n) { return sizeof(float) * static_cast<size_t>(n) * kTile * (kTile + 1); }

  template <int kFamily>
  static void Forward(cudaStream_t s, Act y, float* r0, float* r1, float* unassigned, Act q,
                      Act k, Act v, const Shape& S, const FlashArm& A) {
    const auto FlashForward = FlashForwardKernel<kDhMax, kTile, kLanes, kFamily>;
    const size_t shared = Tiles(S.dh, 3) + ProbTiles(1);
    cudaFuncSetAttribute(reinterpret_cast<const void*>(FlashForward), cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(shared));
    const dim3 grid((S.T + kTile - 1) / kTile, S.B * S.H);
    // Rows written: the lse (softmax), with the unassigned mass (sink softmaxes), the
    // unassigned mass alone (sigmoid), or m, D' and the unassigned mass (softpick).
    const int rows = kFamily == kFlashSoftpick ? 3 : kFamily == kFlashSigmoid ? 1 : A.has_sink ? 2 : 1;
    SINKSCOPE_COST(Bytes(S, 2, 2, rows, q.bytes()), 4.0 * S.dh * Causal(S, S.H) + 5.0 * Causal(S, S.H));
    SINKSCOPE_LAUNCH(FlashForward, grid, kThreads, shared, s)(y, r0, r1, unassigned, q, k, v, S, A);
  }

  template <int kFamily>
  static void Backward(cudaStream_t s, float* dq, float* dk, float* dv, float* D, const float* dy, Act y,
                       const float* r0, const float* r1, Act q, Act k, Act v,
                       const Shape& S, const FlashArm& A) {
    const size_t rows = static_cast<size_t>(S.B) * S.T * S.H;
    SINKSCOPE_COST(Bytes(S, 1, 0, 1) + Bytes(S, 1, 0, 0, y.bytes()), 2.0 * rows * S.dh);
    SINKSCOPE_LAUNCH(FlashBackwardDotKernel, GridFor(rows * 32, 256), 256, 0, s)(D, dy, y, S);

    const int row_arrays = kFamily == kFlashSoftpick ? 3 : 2;  // the r0, D (and r1) tiles
    const auto FlashBackwardKv = FlashBackwardKvKernel<kDhMax, kTile, kLanes, kFamily>;
    const size_t kv_shared = Tiles(S.dh, 4) + ProbTiles(2) + row_arrays * sizeof(float) * kTile;
    cudaFuncSetAttribute(reinterpret_cast<const void*>(FlashBackwardKv), cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(kv_shared));
    // Per score: q·k and dy·v recomputed, then dv and dk: 8·dh FLOPs, and exp and dS.
    SINKSCOPE_COST(Bytes(S, 1, 2, row_arrays) + Bytes(S, 1, 2, 0, q.bytes()), 8.0 * S.dh * Causal(S, S.H) + 6.0 * Causal(S, S.H));
    SINKSCOPE_LAUNCH(FlashBackwardKv, dim3((S.T + kTile - 1) / kTile, S.B * S.KV), kThreads, kv_shared, s)(
        dk, dv, dy, r0, r1, D, q, k, v, S, A);

    const auto FlashBackwardQ = FlashBackwardQKernel<kDhMax, kTile, kLanes, kFamily>;
    const size_t q_shared = Tiles(S.dh, 4) + ProbTiles(1);
    cudaFuncSetAttribute(reinterpret_cast<const void*>(FlashBackwardQ), cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(q_shared));
    // Per score: q·k and dy·v recomputed, then dq: 6·dh FLOPs, and exp and dS.
    SINKSCOPE_COST(Bytes(S, 2, 0, row_arrays) + Bytes(S, 1, 2, 0, q.bytes()), 6.0 * S.dh * Causal(S, S.H) + 6.0 * Causal(S, S.H));
    SINKSCOPE_LAUNCH(FlashBackwardQ, dim3((S.T + kTile - 1) / kTile, S.B * S.H), kThreads, q_shared, s)(
        dq, dy, r0, r1, D, q, k, v, S, A);
  }
};

// Tiles of 64 rows for dh ≤ 128 (the dK/dV kernel's shared memory at dh 128: 165 KiB);
// 32 rows of 8 lanes for dh ≤ 256 (142 KiB), keeping 64 accumulators a thread.
using FlashDh64 = Flash<64, 64, 4>;
using FlashDh128 = Flash<128, 64, 4>;
using FlashDh256 = Flash<256, 32, 8>;

// The arm's normalisation picks the kernels' instantiation (one switch per direction).
template <typename Config>
void ForwardFor(FlashFamily family, cudaStream_t s, Act y, float* r0, float* r1, float* unassigned, Act q,
                Act k, Act v, const Shape& S, const FlashArm& A) {
  switch (family) {
    case kFlashExp: Config::template Forward<kFlashExp>(s, y, r0, r1, unassigned, q, k, v, S, A); break;
    case kFlashSigmoid: Config::template Forward<kFlashSigmoid>(s, y, r0, r1, unassigned, q, k, v, S, A); break;
    case kFlashSoftpick: Config::template Forward<kFlashSoftpick>(s, y, r0, r1, unassigned, q, k, v, S, A); break;
  }
}
template <typename Config>
void BackwardFor(FlashFamily family, cudaStream_t s, float* dq, float* dk, float* dv, float* D, const float* dy,
                 Act y, const float* r0, const float* r1, Act q, Act k, Act v,
                 const Shape& S, const FlashArm& A) {
  switch (family) {
    case kFlashExp: Config::template Backward<kFlashExp>(s, dq, dk, dv, D, dy, y, r0, r1, q, k, v, S, A); break;
    case kFlashSigmoid: Config::template Backward<kFlashSigmoid>(s, dq, dk, dv, D, dy, y, r0, r1, q, k, v, S, A); break;
    case kFlashSoftpick:
      Config::template Backward<kFlashSoftpick>(s, dq, dk, dv, D, dy, y, r0, r1, q, k, v, S, A);
      break;
  }
}

}  // namespace

bool FlashAttentionSupports(int dh) { return dh >= 1 && dh <= kFlashAttentionMaxHeadDim; }

void LaunchFlashArmForward(cudaStream_t s, Act y, float* r0, float* r1, float* unassigned, Act q,
                           Act k, Act v, int B, int T, int H, int KV, int dh, const FlashArm& arm) {
  const Shape S{B, T, H, KV, dh};
  if (B == 0 || T == 0) return;
  if (dh <= 64) {
    ForwardFor<FlashDh64>(arm.family, s, y, r0, r1, unassigned, q, k, v, S, arm);
  } else if (dh <= 128) {
    ForwardFor<FlashDh128>(arm.family, s, y, r0, r1, unassigned, q, k, v, S, arm);
  } else {
    ForwardFor<FlashDh256>(arm.family, s, y, r0, r1, unassigned, q, k, v, S, arm);
  }
}

void LaunchFlashArmBackward(cudaStream_t s, float* dq, float* dk, float* dv, float* D, float* dsink, const float* dy,
                            Act y, const float* r0, const float* r1, const float* unassigned,
                            Act q, Act k, Act v, int B, int T, int H, int KV, int dh,
                            const FlashArm& arm) {
  const Shape S{B, T, H, KV, dh};
  if (B == 0 || T == 0) return;
  if (dh <= 64) {
    BackwardFor<FlashDh64>(arm.family, s, dq, dk, dv, D, dy, y, r0, r1, q, k, v, S, arm);
  } else if (dh <= 128) {
    BackwardFor<FlashDh128>(arm.family, s, dq, dk, dv, D, dy, y, r0, r1, q, k, v, S, arm);
  } else {
    BackwardFor<FlashDh256>(arm.family, s, dq, dk, dv, D, dy, y, r0, r1, q, k, v, S, arm);
  }
  if (dsink != nullptr && arm.family == kFlashExp && arm.has_sink) {
    SINKSCOPE_COST(8.0 * B * H * T + 4.0 * H, 2.0 * B * H * T);
    SINKSCOPE_LAUNCH(SinkLogitGradKernel, H, 256, 0, s)(dsink, unassigned, D, B, H, T);
  }
}

void LaunchFlashAttentionForward(cudaStream_t s, Act y, float* lse, Act q, Act k, Act v,
                                 int B, int T, int H, int KV, int dh) {
  LaunchFlashArmForward(s, y, lse, nullptr, nullptr, q, k, v, B, T, H, KV, dh, FlashArm{});
}

void LaunchFlashAttentionBackward(cudaStream_t s, float* dq, float* dk, float* dv, float* D, const float* dy,
                                  Act y, const float* lse, Act q, Act k, Act v,
                                  int B, int T, int H, int KV, int dh) {
  LaunchFlashArmBackward(s, dq, dk, dv, D, nullptr, dy, y, lse, nullptr, nullptr, q, k, v, B, T, H, KV, dh,
                         FlashArm{});
}

}  // namespace sinkscope::cuda

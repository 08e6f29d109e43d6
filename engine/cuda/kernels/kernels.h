// Launchers of the CUDA backend's kernels (one file per op under kernels/). Plain
// types only, so the backend's host code (g++) and the kernels (nvcc) share this
// header. Every launcher queues work on `stream` and returns at once; the caller checks
// cudaGetLastError after it (cuda_backend.cc), which names the op.
//
// Determinism: no kernel uses floating-point atomics. Reductions run in a fixed order
// (a fixed grid, fixed trees within a block, partials summed in index order), so a
// result does not depend on scheduling: the same inputs give the same bits.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace sinkscope::cuda {

// An activation operand of a kernel: fp32, or bf16 where the backend stores the
// activation in 16 bits (the bf16 contract, engine/backend.h). Kernels read and write it
// through Ld/St/Off (act.cuh) and compute in fp32. An fp32 pointer converts to one.
struct Act {
  void* p = nullptr;
  bool bf16 = false;
  Act() = default;
  __host__ __device__ Act(float* f) : p(f) {}                             // NOLINT(google-explicit-constructor)
  __host__ __device__ Act(const float* f) : p(const_cast<float*>(f)) {}  // NOLINT(google-explicit-constructor)
  __host__ __device__ Act(void* data, bool is_bf16) : p(data), bf16(is_bf16) {}
  // Bytes per element (for the launches' declared costs).
  __host__ __device__ double bytes() const { return bf16 ? 2.0 : 4.0; }
};

// Blocks of the first pass of a two-pass reduction; the scratch it needs.
constexpr int kReduceBlocks = 256;

// Two-pass reductions over rows sized for an H100: at least kFillBlocks blocks in the
// first pass (two per SM of 132) where the rows allow it, at least kMinChunkRows rows a
// block, so small shapes (the tests) stay one block.
constexpr int kFillBlocks = 2 * 132;
constexpr int kMinChunkRows = 64;
inline int RowChunks(int N, int blocks_per_chunk) {
  const int want = (kFillBlocks + blocks_per_chunk - 1) / blocks_per_chunk;
  const int most = (N + kMinChunkRows - 1) / kMinChunkRows;
  return std::max(1, std::min(want, most));
}

// Column sums of an (N, n) matrix in two passes, deterministic without atomics: blocks of
// kColumnTile columns × kColumnRowLanes row lanes each sum one chunk of rows into
// partials (chunks, n); a second pass adds the chunks in order into the accumulator.
constexpr int kColumnTile = 32, kColumnRowLanes = 8;
inline int ColumnChunks(int N, int n) { return RowChunks(N, (n + kColumnTile - 1) / kColumnTile); }
inline size_t ColumnPartialsFloats(int N, int n) { return static_cast<size_t>(ColumnChunks(N, n)) * n; }
// acc[c] += Σ_k partials[k, c], k in order (the second pass).
void LaunchColumnPartialsSum(cudaStream_t s, float* acc, const float* partials, int chunks, int n);

// ---- massive activations (massive.cu) ----
// Scratch the two launchers below need (kReduceBlocks partials).
size_t MassiveScratchBytes();
// keep(n) = |x(n)|; out(4) = the three largest |x| (−1 while fewer) and the index of the
// largest (its first occurrence).
void LaunchAbsTop3(cudaStream_t s, float* keep, double* out, const float* x, size_t n, void* scratch);
// counts(256) = per value of byte `shift` (24, 16, 8, 0), how many keys (the bits of the
// non-negative x) have the higher bytes `prefix` (every key when shift is 24).
void LaunchRadixCount(cudaStream_t s, double* counts, const float* x, size_t n, int shift, uint32_t prefix,
                      void* scratch);

// ---- elementwise and reductions (elementwise.cu) ----
void LaunchFill(cudaStream_t s, float* x, float value, size_t n);
void LaunchAxpy(cudaStream_t s, float* y, float alpha, const float* x, size_t n);
void LaunchScale(cudaStream_t s, float* x, float alpha, size_t n);
void LaunchAddRowBias(cudaStream_t s, Act x, const float* b, int N, int n);
// dst(n) = src(n), converted between fp32 and bf16 (rounded to nearest even).
void LaunchConvert(cudaStream_t s, Act dst, Act src, size_t n);
// partials: ColumnPartialsFloats(N, n) floats of scratch.
void LaunchColumnSums(cudaStream_t s, float* acc, const float* x, int N, int n, float* partials);
// *acc += Σ over the segments of Σ x²; partials holds kReduceBlocks doubles.
struct Segment {
  const float* p;
  size_t n;
};
// *acc += Σ values[0..n) in a fixed tree (one block): the second pass of a reduction.
void LaunchSumInto(cudaStream_t s, double* acc, const double* values, int n);
void LaunchSumSquares(cudaStream_t s, double* acc, const Segment* segments_device, int num_segments,
                      size_t total, double* partials);
void LaunchTokenSum(cudaStream_t s, float* acc, const float* x, int B, int T, int C, int P);
void LaunchTokenNormSum(cudaStream_t s, float* acc, Act x, int B, int T, int G, int C, int P);

// ---- embedding.cu ----
void LaunchEmbeddingForward(cudaStream_t s, float* out, const int32_t* tokens, const float* table, int N, int d);
void LaunchEmbeddingBackward(cudaStream_t s, float* dtable, const float* dout, const int32_t* tokens, int N, int d);

// ---- rmsnorm.cu ----
// sum = x + r when r is non-null (sum may alias x), then out = norm(sum)·γ.
void LaunchRmsNormForward(cudaStream_t s, float* sum, Act out, float* rstd, Act x, const float* r,
                          const float* gamma, int N, int d, float eps);
// dx = base + J_rmsᵀ dout (base may be dx); dgamma += Σ_rows dout ⊙ x·rstd, in two
// passes through partials (ColumnPartialsFloats(N, d) floats of scratch).
void LaunchRmsNormBackward(cudaStream_t s, float* dx, float* dgamma, const float* base, const float* dout, Act x,
                           const float* gamma, const float* rstd, int N, int d, float* partials);

// ---- rope.cu ----
// cs holds (T, dh/2) pairs (cos, sin) already scaled and signed. dst = rotate(src); src
// may be dst (in place) or another buffer (the q/k norms' fp32 output, stored once).
void LaunchRope(cudaStream_t s, Act dst, Act src, const float2* cs, int B, int T, int heads, int dh);

// ---- qkv.cu: the packed attention input (bf16 step) ----
// packed (N, H·dh + 2·KV·dh): the rows of x̃·[W_q; W_k; W_v]ᵀ (+ bias). Writes q (N,H,dh)
// and k (N,KV,dh) rotated with cs (the forward table), v as it is in packed and
// v̂ = V-scale(v) (vscale with theta), or v̂ = v.
void LaunchQkvSplit(cudaStream_t s, Act q, Act k, Act v, Act vhat, Act packed, const float2* cs, const float* theta,
                    int B, int T, int H, int KV, int dh, double c_base, bool vscale);
// packed (N, H·dh + 2·KV·dh) = [rotate(dq) | rotate(dk) | dv] with cs (the backward table).
void LaunchQkvPackGrad(cudaStream_t s, Act packed, const float* dq, const float* dk, const float* dv, const float2* cs,
                       int B, int T, int H, int KV, int dh);

// ---- flash_attention.cu: tiled causal GQA attention, O(T) memory ----
// lse (B,H,T) is each row's log-sum-exp of the scaled scores; D (B,H,T) is scratch of
// the backward (Σ dy ⊙ y per row). Head dims 1..kFlashAttentionMaxHeadDim.
constexpr int kFlashAttentionMaxHeadDim = 256;
bool FlashAttentionSupports(int dh);
void LaunchFlashAttentionForward(cudaStream_t s, Act y, float* lse, Act q, Act k, Act v,
                                 int B, int T, int H, int KV, int dh);
void LaunchFlashAttentionBackward(cudaStream_t s, float* dq, float* dk, float* dv, float* D, const float* dy,
                                  Act y, const float* lse, Act q, Act k, Act v,
                                  int B, int T, int H, int KV, int dh);
// The attention arms (docs/design/ARMS.md) through the same tiled kernels: the family is
// the arm's normalisation. Per row (B,H,T): r0 is the lse (the sink column included) or
// softpick's shift m, r1 softpick's D' (null otherwise), unassigned the mass the row gives
// no token (null: not written). dsink (H) is accumulated (+=) for a sink logit.
enum FlashFamily : int { kFlashExp = 0, kFlashSigmoid = 1, kFlashSoftpick = 2 };
struct FlashArm {
  FlashFamily family = kFlashExp;
  bool has_sink = false;        // kFlashExp: sink_logit (sink non-null) or softmax_plus_one (null)
  const float* sink = nullptr;  // (H) device
  float bias = 0.0f;            // sigmoid's b
  float eps = 0.0f;             // softpick's ε
};
void LaunchFlashArmForward(cudaStream_t s, Act y, float* r0, float* r1, float* unassigned, Act q,
                           Act k, Act v, int B, int T, int H, int KV, int dh, const FlashArm& arm);
void LaunchFlashArmBackward(cudaStream_t s, float* dq, float* dk, float* dv, float* D, float* dsink, const float* dy,
                            Act y, const float* r0, const float* r1, const float* unassigned,
                            Act q, Act k, Act v, int B, int T, int H, int KV, int dh,
                            const FlashArm& arm);

// ---- attention.cu: the probes' column statistics from q, k and the lse ----
// per_b (H, B, 3) doubles of scratch: α_b, M_b, S_b per sequence; outputs H floats each.
// `arm`: the weights a[t,s] recomputed by the arm's formula from r0 (= lse for softmax), r1.
void LaunchColumnStats(cudaStream_t s, float* alpha, float* mass, float* second_moment, float* rate, double* per_b,
                       Act q, Act k, const float* r0, const float* r1, int B, int T, int H, int KV,
                       int dh, int sink, int window, double threshold, const FlashArm& arm);
// ---- attention_gate.cu: the gated arms' σ gates (ARMS.md) ----
// out[n,g,c] = x[n,g,c]·σ(logits[n,g]); backward dx = dout·σ, dlogits = σ(1−σ)·Σ_c dout·x.
void LaunchSigmoidGateForward(cudaStream_t s, Act out, Act x, const float* logits, int N, int G, int C);
void LaunchSigmoidGateBackward(cudaStream_t s, float* dx, float* dlogits, const float* dout, Act x,
                               const float* logits, int N, int G, int C);

// ---- vscale.cu ----
void LaunchVScaleForward(cudaStream_t s, Act vhat, Act v, const float* theta, int N, int KV, int dh, double c_base);
// row_dtheta: ThetaScratchDoubles(N, KV) doubles of scratch (per-row contributions, then
// the first pass's partials); theta null means θ = 0 (the backward-only arm).
inline int ThetaChunks(int N, int KV) { return RowChunks(N, KV); }
inline size_t ThetaScratchDoubles(int N, int KV) {
  return static_cast<size_t>(N) * KV + static_cast<size_t>(ThetaChunks(N, KV)) * KV;
}
void LaunchVScaleBackward(cudaStream_t s, float* dv, float* dtheta, double* row_dtheta, const float* dvhat, Act v,
                          const float* theta, int N, int KV, int dh, double c_base);

// ---- swiglu.cu ----
void LaunchSwiGluForward(cudaStream_t s, Act h, Act gate, Act up, size_t n);
// dgate, dup: fp32, or bf16 where they are only a bf16 GEMM's operands (the bf16 mode).
// F, ld: the outputs are rows of F elements ld apart (ld = F: contiguous; the bf16 step
// writes both halves of one packed (N, 2F) operand, dup = dgate + F, ld = 2F).
void LaunchSwiGluBackward(cudaStream_t s, Act dgate, Act dup, const float* dh, Act gate, Act up, size_t n,
                          size_t F, size_t ld);

// ---- cross_entropy.cu ----
// row_loss (N) doubles of scratch; grad true writes grad_scale·(p − onehot) into
// grad_out (N, V), by default the logits themselves (in place; a bf16 grad_out is the
// LM head's bf16 GEMM operand, written once instead of converted).
void LaunchCrossEntropy(cudaStream_t s, float* logits, const int32_t* targets, int N, int V, bool grad,
                        float grad_scale, double* row_loss, double* loss_acc, Act grad_out = Act());

// ---- adamw.cu ----
struct AdamWSegment {
  float *p, *m, *v;
  const float* g;
  size_t n;
  float weight_decay;
  void* p_bf16;  // the bf16 copy of p the GEMMs read (bf16 mode), written after the update; or null
};
// One launch over every segment. When guard (device [Σ loss, ‖g‖²]) is non-null, nothing
// is updated unless both are finite, and g is scaled by the clip factor first;
// otherwise grad_scale is used. bf16_n: the elements that have a bf16 copy (the cost).
void LaunchAdamW(cudaStream_t s, const AdamWSegment* segments_device, int num_segments, size_t max_n, size_t total_n,
                 const double* guard, double grad_clip, float grad_scale, float lr, float beta1, float beta2,
                 float eps, double bc1, double bc2, size_t bf16_n = 0);

}  // namespace sinkscope::cuda

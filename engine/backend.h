// The Backend: a small interface of ops over device buffers. The model (model.cc) is
// written once over it; the CPU backend (cpu/) is the readable reference and the CUDA
// backend (cuda/) the fast path. Every op on every backend is tested against the CPU
// reference, and the CPU reference against finite differences (tests/).
//
// Conventions: all tensors are row-major float32 buffers owned by the backend;
// (N, d) means N rows of d, N = B·T tokens. Parameter gradients are accumulated (+=)
// so micro-batches add up; activation gradients are written (=) unless the op says +=.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "engine/config.h"

namespace sinkscope {

// Optional ops, reported by Backend::Supports.
enum class OptionalOp {
  kAttentionColumnStats,  // probes: α_s, M_s, S_s recomputed from q and k
};

// Per-head column statistics of the causal attention matrix for one key position s,
// averaged over the batch (METRICS.md, "Forward observables").
struct ColumnStatsRequest {
  int sink_position = 0;   // s
  int window = 64;         // T_ε (clipped to T - s by the caller)
  double threshold = 0.3;  // ε, for the per-sample sink rate
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* Name() const = 0;
  virtual bool Supports(OptionalOp op) const = 0;

  // --- memory -------------------------------------------------------------------
  virtual float* Alloc(size_t n) = 0;  // n floats, zero-filled
  virtual int32_t* AllocInt(size_t n) = 0;
  virtual void Free(void* p) = 0;
  virtual void ToDevice(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void ToHost(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void Copy(float* dst, const float* src, size_t n) = 0;
  virtual void Fill(float* x, float value, size_t n) = 0;

  // --- elementwise and reductions -----------------------------------------------
  virtual void Axpy(float* y, float alpha, const float* x, size_t n) = 0;  // y += alpha·x
  virtual void Scale(float* x, float s, size_t n) = 0;                     // x *= s
  virtual double SumSquares(const float* x, size_t n) = 0;                 // Σ x², in double
  // Token-wise reductions for probes over x (B, T, G, C), tokens t < P:
  // acc(P, G·C) += Σ_b x[b,t]          (for N_t = ‖Σ_b g[b,t]‖, SUM_THEN_NORM)
  virtual void AccumulateTokenSum(float* acc, const float* x, int B, int T, int C, int P) = 0;
  // acc(P) += Σ_b Σ_g ‖x[b,t,g,:]‖₂    (for batch means of norms, NORM_THEN_MEAN)
  virtual void AccumulateTokenNormSum(float* acc, const float* x, int B, int T, int G, int C, int P) = 0;

  // --- matmul -------------------------------------------------------------------
  // C(m,n) = alpha·op(A)·op(B) + beta·C, row-major; op(A) is (m,k), op(B) is (k,n).
  virtual void Gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a,
                    const float* b, float beta, float* c) = 0;

  // --- model ops ----------------------------------------------------------------
  // out(N,d) = table[tokens]; dtable += scatter of dout.
  virtual void EmbeddingForward(float* out, const int32_t* tokens, const float* table, int N, int d) = 0;
  virtual void EmbeddingBackward(float* dtable, const float* dout, const int32_t* tokens, int N, int d) = 0;

  // out = x / rms(x) ⊙ γ with rms(x) = sqrt(mean(x²) + eps); rstd(N) saved for backward.
  virtual void RmsNormForward(float* out, float* rstd, const float* x, const float* gamma, int N, int d,
                              float eps) = 0;
  // dx += J_rmsᵀ dout; dgamma += Σ_rows dout ⊙ x·rstd.
  virtual void RmsNormBackward(float* dx, float* dgamma, const float* dout, const float* x, const float* gamma,
                               const float* rstd, int N, int d) = 0;

  // In-place rotary embedding of x (B,T,heads,dh), half-split pairing (j, j+dh/2) as
  // Hugging Face Llama; position = t, angle t·inv_freq[j], cos and sin scaled by the
  // attention factor. Backward applies the transpose (the opposite angle, same scale).
  virtual void RopeForward(float* x, int B, int T, int heads, int dh, const RotaryFrequencies& rope) = 0;
  virtual void RopeBackward(float* dx, int B, int T, int heads, int dh, const RotaryFrequencies& rope) = 0;

  // Causal softmax attention with GQA: query head h reads KV head h/(H/KV).
  // q (B,T,H,dh), k and v (B,T,KV,dh), y (B,T,H,dh). `workspace` holds what the
  // backward needs, AttentionWorkspaceFloats(...) floats.
  virtual size_t AttentionWorkspaceFloats(int B, int T, int H) const = 0;
  virtual void AttentionForward(float* y, float* workspace, const float* q, const float* k, const float* v, int B,
                                int T, int H, int KV, int dh) = 0;
  // dq, dk, dv are written (=).
  virtual void AttentionBackward(float* dq, float* dk, float* dv, const float* dy, const float* workspace,
                                 const float* q, const float* k, const float* v, int B, int T, int H, int KV,
                                 int dh) = 0;
  // Probes (optional op kAttentionColumnStats): for each head, batch means of
  // α_s = (1/window) Σ_{t=s}^{s+window-1} a[t,s], M_s = Σ_{t≥s} a[t,s], S_s = Σ_{t≥s} a[t,s]²,
  // and the fraction of sequences whose own α_s exceeds the threshold. Each output has H
  // entries. Recomputes the column from q and k; never materialises the matrix.
  virtual void AttentionColumnStats(float* alpha, float* mass, float* second_moment, float* per_sample_rate,
                                    const float* q, const float* k, int B, int T, int H, int KV, int dh,
                                    const ColumnStatsRequest& request) = 0;

  // V-scale (METRICS.md): v̂ = φ(r)·v, r = ‖v‖², φ = r/(r+C), C_g = c_base·exp(θ_g) per
  // KV head g. v and v̂ are (N, KV, dh); theta (KV). In kBackwardOnly the forward copies v.
  virtual void VScaleForward(float* vhat, const float* v, const float* theta, int N, int KV, int dh, double c_base,
                             VScaleMode mode) = 0;
  // dv = φ·ĝ + (2C/(r+C)²)(v·ĝ)v (written); if dtheta is non-null,
  // dtheta_g += Σ_rows −C·r/(r+C)² (v·ĝ). In kBackwardOnly θ is taken as 0.
  virtual void VScaleBackward(float* dv, float* dtheta, const float* dvhat, const float* v, const float* theta, int N,
                              int KV, int dh, double c_base, VScaleMode mode) = 0;

  // h(N,F) = silu(gate) ⊙ up.
  virtual void SwiGluForward(float* h, const float* gate, const float* up, int N, int F) = 0;
  virtual void SwiGluBackward(float* dgate, float* dup, const float* dh, const float* gate, const float* up, int N,
                              int F) = 0;

  // Cross-entropy over logits (N,V) in place: logits become grad_scale·(softmax − onehot).
  // Returns Σ_rows −log p[target] in double.
  virtual double CrossEntropyForwardBackward(float* logits, const int32_t* targets, int N, int V,
                                             float grad_scale) = 0;
  // Forward only (evaluation): Σ_rows −log p[target], logits left unchanged.
  virtual double CrossEntropyLoss(const float* logits, const int32_t* targets, int N, int V) = 0;

  // AdamW on n values: m, v updated; p -= lr·(m̂/(sqrt(v̂)+eps) + wd·p). grad_scale
  // multiplies g first (clipping). step is 1-based for bias correction.
  virtual void AdamW(float* p, const float* g, float* m, float* v, size_t n, float lr, float beta1, float beta2,
                     float eps, float weight_decay, float grad_scale, int64_t step) = 0;
};

// The CPU reference backend (cpu/cpu_backend.cc).
std::unique_ptr<Backend> MakeCpuBackend();

}  // namespace sinkscope

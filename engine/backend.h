// The Backend: a small interface of ops over device buffers. The model (model.cc) is
// written once over it; the CPU backend (cpu/) is the readable reference and the CUDA
// backend (cuda/) the fast path. Every op on every backend is tested against the CPU
// reference, and the CPU reference against finite differences (tests/).
//
// Conventions: all tensors are row-major buffers owned by the backend; (N, d) means N
// rows of d, N = B·T tokens. Arguments typed TensorView are activations a backend may
// store in its ActivationDType (16 bits on a bf16 backend; which ones, and which stay
// fp32, is the bf16 contract of MakeCpuBf16Backend below); a backend reads and writes them
// in the view's dtype. Every float* argument is fp32 (weights, gradients, rstd, lse,
// logits, the residual stream), and an fp32 pointer passes as a view of its own.
// Parameter gradients are accumulated (+=) so micro-batches add up; activation gradients
// are written (=) unless the op says +=.
//
// Ops may run asynchronously (a GPU stream): only ToHost, ReadScalars and Synchronize
// wait. Scalars a step produces (the loss, the squared gradient norm) are accumulated in
// device doubles (AllocScalars) and read once per step; a device error is sticky and
// taken once per step (TakeError).
//
// Two levels of ops. Primitive ops (memory, elementwise, Gemm, norms, RoPE, attention,
// V-scale, SwiGLU, cross-entropy, AdamW) each do one thing. Block-level fused ops
// (residual + RMSNorm, the attention input x̃ → q, k, v, v̂, gate|up + SwiGLU, the LM head
// with cross-entropy, one multi-tensor AdamW) are what the model calls; their default
// implementations (backend.cc) compose the primitives, and a fast backend overrides them
// with fused kernels. tests/backend_parity_test.cc holds every op of every backend
// against a float64 reference and every fused op against its composition.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>

#include <vector>

#include "base/status.h"
#include "engine/config.h"
#include "engine/tensor.h"

namespace sinkscope {

// Optional ops, reported by Backend::Supports.
enum class OptionalOp {
  kAttentionColumnStats,  // probes: α_s, M_s, S_s recomputed from q and k
  kAttentionArms,         // ArmAttention* and SigmoidGate* (docs/design/ARMS.md)
};

// The parameters of an attention arm other than softmax (engine/config.h AttentionKind).
struct AttentionArmParams {
  AttentionKind kind = AttentionKind::kSinkLogit;
  float sigmoid_bias = 0;  // b of kSigmoid
  float softpick_eps = 1e-6f;
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
  // `bytes` bytes, zero-filled, aligned to Arena::kAlign (256); null when it cannot.
  virtual void* AllocBytes(size_t bytes) { return Alloc((bytes + sizeof(float) - 1) / sizeof(float)); }
  // The element type this backend stores activations in (views from an Arena). fp32 on
  // the CPU, its bf16 mode included (fp32 buffers holding bf16-exact values).
  virtual DType ActivationDType() const { return DType::kF32; }
  virtual int32_t* AllocInt(size_t n) = 0;
  virtual void Free(void* p) = 0;
  virtual void ToDevice(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void ToHost(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void Copy(float* dst, const float* src, size_t n) = 0;
  virtual void Fill(float* x, float value, size_t n) = 0;
  // Device doubles, zero-filled: accumulators a step adds into (loss, ‖g‖²).
  virtual double* AllocScalars(size_t n) = 0;
  virtual void ZeroScalars(double* s, size_t n) = 0;
  // Copies n device doubles to the host, after every op queued before it.
  virtual void ReadScalars(double* host_dst, const double* s, size_t n) = 0;
  // Waits for every queued op.
  virtual void Synchronize() {}
  // The first device error since the last call (sticky until taken); OK when none.
  virtual Status TakeError() { return OkStatus(); }
  // Makes the calling thread use this backend's device (a thread other than the one that
  // created it: the gradient all-reduce's bucket thread). Nothing to do on the CPU.
  virtual Status BindThread() { return OkStatus(); }
  // Frees the scratch this backend keeps between ops (grown to the largest shape seen), so
  // another backend on the same device has the memory; it grows again when next needed.
  virtual void ReleaseScratch() {}

  // --- elementwise and reductions -----------------------------------------------
  virtual void Axpy(float* y, float alpha, const float* x, size_t n) = 0;  // y += alpha·x
  virtual void Scale(float* x, float s, size_t n) = 0;                     // x *= s
  virtual void AddRowBias(TensorView x, const float* b, int N, int n) = 0;      // x(N,n) += b(n) on every row
  virtual void AccumulateColumnSums(float* acc, const float* x, int N, int n) = 0;  // acc(n) += Σ_rows x(N,n)
  virtual void AccumulateSumSquares(double* acc, const float* x, size_t n) = 0;  // *acc += Σ x² (device double)
  // Token-wise reductions for probes over x (B, T, G, C), tokens t < P:
  // acc(P, G·C) += Σ_b x[b,t]          (for N_t = ‖Σ_b g[b,t]‖, SUM_THEN_NORM)
  virtual void AccumulateTokenSum(float* acc, const float* x, int B, int T, int C, int P) = 0;
  // acc(P) += Σ_b Σ_g ‖x[b,t,g,:]‖₂    (for batch means of norms, NORM_THEN_MEAN)
  virtual void AccumulateTokenNormSum(float* acc, TensorView x, int B, int T, int G, int C, int P) = 0;
  // Massive activations (probes), without copying activations to the host:
  // keep(n) = |x(n)|; out(4) (device doubles, AllocScalars) = the three largest |x| (−1
  // while fewer than three) and the index of the largest (its first occurrence).
  virtual void AbsTop3(float* keep, double* out, const float* x, size_t n);
  // One counting pass of a radix select over non-negative x(n) by their bits (which order
  // as the values): counts(256) (device doubles) = for each value of byte `shift` (24, 16,
  // 8, 0), how many keys whose higher bytes are `prefix` have it (every key at 24).
  virtual void RadixCount(double* counts, const float* x, size_t n, int shift, uint32_t prefix);

  // --- matmul -------------------------------------------------------------------
  // C(m,n) = alpha·op(A)·op(B) + beta·C, row-major; op(A) is (m,k), op(B) is (k,n).
  // Each operand in its view's dtype (a bf16 backend: activations as stored, fp32
  // weights and gradients read in bf16; accumulation in fp32).
  virtual void Gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, TensorView a, TensorView b,
                    float beta, TensorView c) = 0;

  // --- model ops ----------------------------------------------------------------
  // out(N,d) = table[tokens]; dtable += scatter of dout.
  virtual void EmbeddingForward(float* out, const int32_t* tokens, const float* table, int N, int d) = 0;
  virtual void EmbeddingBackward(float* dtable, const float* dout, const int32_t* tokens, int N, int d) = 0;

  // out = x / rms(x) ⊙ γ with rms(x) = sqrt(mean(x²) + eps); rstd(N) saved for backward.
  virtual void RmsNormForward(TensorView out, float* rstd, TensorView x, const float* gamma, int N, int d,
                              float eps) = 0;
  // dx += J_rmsᵀ dout; dgamma += Σ_rows dout ⊙ x·rstd.
  virtual void RmsNormBackward(float* dx, float* dgamma, const float* dout, TensorView x, const float* gamma,
                               const float* rstd, int N, int d) = 0;

  // In-place rotary embedding of x (B,T,heads,dh), half-split pairing (j, j+dh/2) as
  // Hugging Face Llama; position = t, angle t·inv_freq[j], cos and sin scaled by the
  // attention factor. Backward applies the transpose (the opposite angle, same scale).
  virtual void RopeForward(TensorView x, int B, int T, int heads, int dh, const RotaryFrequencies& rope) = 0;
  virtual void RopeBackward(float* dx, int B, int T, int heads, int dh, const RotaryFrequencies& rope) = 0;

  // Causal softmax attention with GQA: query head h reads KV head h/(H/KV).
  // q (B,T,H,dh), k and v (B,T,KV,dh), y (B,T,H,dh); lse (B,H,T) is each row's
  // log-sum-exp of the scaled scores, log Σ_{u≤t} exp(q_t·k_u/√dh), as a flash-attention
  // forward gives it. `workspace` holds whatever else this backend's backward needs,
  // AttentionWorkspaceFloats(...) floats (may be 0).
  virtual size_t AttentionWorkspaceFloats(int B, int T, int H) const = 0;
  virtual void AttentionForward(TensorView y, float* lse, float* workspace, TensorView q, TensorView k,
                                TensorView v, int B, int T, int H, int KV, int dh) = 0;
  // From dy and the forward's y and lse (and workspace); dq, dk, dv are written (=).
  virtual void AttentionBackward(float* dq, float* dk, float* dv, const float* dy, TensorView y, const float* lse,
                                 const float* workspace, TensorView q, TensorView k, TensorView v, int B, int T,
                                 int H, int KV, int dh) = 0;
  // Probes (optional op kAttentionColumnStats): for each head, batch means of
  // α_s = (1/window) Σ_{t=s}^{s+window-1} a[t,s], M_s = Σ_{t≥s} a[t,s], S_s = Σ_{t≥s} a[t,s]²,
  // and the fraction of sequences whose own α_s exceeds the threshold. Each output has H
  // entries. Column s only, from q, k and the forward's lse: a[t,s] = exp(q_t·k_s/√dh − lse_t);
  // the matrix is never materialised.
  virtual void AttentionColumnStats(float* alpha, float* mass, float* second_moment, float* per_sample_rate,
                                    TensorView q, TensorView k, const float* lse, int B, int T, int H, int KV,
                                    int dh, const ColumnStatsRequest& request) = 0;

  // --- attention arms (optional op kAttentionArms; docs/design/ARMS.md) ---------------
  // The arms' attention with GQA as above, keeping the weights A (B,H,T,T) (rows t,
  // columns u ≤ t, zero above the diagonal) for the backward and the probes, and
  // `unassigned` (B,H,T): the mass a row gives no token (the virtual sink's share for
  // kSinkLogit and kSoftmaxPlusOne; 1 − Σ_u a[t,u] for kSigmoid and kSoftpick).
  // `sink` (H): the learned logits s_h of kSinkLogit (null: 0, kSoftmaxPlusOne).
  // `workspace`: ArmAttentionWorkspaceFloats(...) floats the backward reads.
  // A backend whose ArmAttentionKeepsWeights() is false (CUDA: the tiled kernel of
  // flash_attention.cu) never writes A: `att` is null there, the workspace holds per-row
  // numbers (O(T) memory) and the probes read column s through ArmAttentionColumnStats.
  virtual bool ArmAttentionKeepsWeights() const { return true; }
  virtual size_t ArmAttentionWorkspaceFloats(int B, int T, int H) const;
  virtual void ArmAttentionForward(TensorView y, float* att, float* unassigned, float* workspace, TensorView q,
                                   TensorView k, TensorView v, const float* sink, int B, int T, int H, int KV, int dh,
                                   const AttentionArmParams& arm);
  // dq, dk, dv written (=); dsink (H) accumulated (+=) when non-null. y is the forward's
  // output (a backend that keeps no weights forms Σ_u a·dA = dy·y from it).
  virtual void ArmAttentionBackward(float* dq, float* dk, float* dv, float* dsink, const float* dy, TensorView y,
                                    const float* att, const float* unassigned, const float* workspace, TensorView q,
                                    TensorView k, TensorView v, const float* sink, int B, int T, int H, int KV, int dh,
                                    const AttentionArmParams& arm);
  // The probes' column statistics of A (as AttentionColumnStats) for a backend that keeps
  // no weights: column s recomputed from q, k and the forward's workspace.
  virtual void ArmAttentionColumnStats(float* alpha, float* mass, float* second_moment, float* per_sample_rate,
                                       TensorView q, TensorView k, const float* workspace, int B, int T, int H,
                                       int KV, int dh, const AttentionArmParams& arm,
                                       const ColumnStatsRequest& request);
  // out[n,g,c] = x[n,g,c]·σ(logits[n,g]), x and out (N,G,C), logits (N,G).
  virtual void SigmoidGateForward(TensorView out, TensorView x, const float* logits, int N, int G, int C);
  // dx = dout ⊙ σ (written); dlogits[n,g] = σ(1−σ)·Σ_c dout[n,g,c]·x[n,g,c] (written).
  virtual void SigmoidGateBackward(float* dx, float* dlogits, const float* dout, TensorView x, const float* logits,
                                   int N, int G, int C);

  // V-scale (METRICS.md): v̂ = φ(r)·v, r = ‖v‖², φ = r/(r+C), C_g = c_base·exp(θ_g) per
  // KV head g. v and v̂ are (N, KV, dh); theta (KV). In kBackwardOnly the forward copies v.
  virtual void VScaleForward(TensorView vhat, TensorView v, const float* theta, int N, int KV, int dh, double c_base,
                             VScaleMode mode) = 0;
  // dv = φ·ĝ + (2C/(r+C)²)(v·ĝ)v (written); if dtheta is non-null,
  // dtheta_g += Σ_rows −C·r/(r+C)² (v·ĝ). In kBackwardOnly θ is taken as 0.
  virtual void VScaleBackward(float* dv, float* dtheta, const float* dvhat, TensorView v, const float* theta, int N,
                              int KV, int dh, double c_base, VScaleMode mode) = 0;

  // h(N,F) = silu(gate) ⊙ up.
  virtual void SwiGluForward(TensorView h, TensorView gate, TensorView up, int N, int F) = 0;
  virtual void SwiGluBackward(float* dgate, float* dup, const float* dh, TensorView gate, TensorView up, int N,
                              int F) = 0;

  // Cross-entropy over logits (N,V) in place: logits become grad_scale·(softmax − onehot);
  // *loss_acc (a device double) += Σ_rows −log p[target].
  virtual void CrossEntropyForwardBackward(float* logits, const int32_t* targets, int N, int V, float grad_scale,
                                           double* loss_acc) = 0;
  // Forward only (evaluation): *loss_acc += Σ_rows −log p[target], logits left unchanged.
  virtual void CrossEntropyLoss(const float* logits, const int32_t* targets, int N, int V, double* loss_acc) = 0;

  // AdamW on n values: m, v updated; p -= lr·(m̂/(sqrt(v̂)+eps) + wd·p). grad_scale
  // multiplies g first (clipping). step is 1-based for bias correction.
  virtual void AdamW(float* p, const float* g, float* m, float* v, size_t n, float lr, float beta1, float beta2,
                     float eps, float weight_decay, float grad_scale, int64_t step) = 0;

  // --- block-level fused ops (defaults in backend.cc compose the primitives) -------

  // sum = x + r; out = sum / rms(sum) ⊙ γ, rstd(N) saved: the residual add of a block
  // branch and the norm that reads its result. sum may alias x.
  virtual void ResidualRmsNormForward(float* sum, TensorView out, float* rstd, const float* x, const float* r,
                                      const float* gamma, int N, int d, float eps);
  // dx = d_residual + J_rmsᵀ dout (written); dgamma += as RmsNormBackward. dx may alias
  // neither dout nor x; it may alias d_residual.
  virtual void RmsNormBackwardResidual(float* dx, float* dgamma, const float* d_residual, const float* dout,
                                       const float* x, const float* gamma, const float* rstd, int N, int d);

  // The attention input of a block: x̃ → q, k (projected, + bias, per-head RMSNorm, RoPE),
  // v (projected, + bias) and v̂ = V-scale(v).
  struct AttentionShape {
    int B = 0, T = 0, d = 0, H = 0, KV = 0, dh = 0;
    float eps = 1e-5f;            // of the per-head q/k norms
    const RotaryFrequencies* rope = nullptr;
    VScaleMode vscale = VScaleMode::kNone;
    double vscale_c_base = 0;
    int N() const { return B * T; }
  };
  // Weights (or, for the backward, their gradients; null entries are absent tensors or
  // gradients not wanted). bq/bk/bv: Qwen2's biases; q_norm/k_norm: Qwen3's gains.
  struct AttentionInputWeights {
    const float *wq = nullptr, *wk = nullptr, *wv = nullptr, *bq = nullptr, *bk = nullptr, *bv = nullptr,
                *q_norm = nullptr, *k_norm = nullptr, *theta = nullptr;
  };
  struct AttentionInputGrads {
    float *wq = nullptr, *wk = nullptr, *wv = nullptr, *bq = nullptr, *bk = nullptr, *bv = nullptr,
          *q_norm = nullptr, *k_norm = nullptr;
  };
  // Forward activations: q_raw, k_raw (the projections before the q/k norms), rstd_q
  // (N·H), rstd_k (N·KV) only with q/k norms.
  struct AttentionInputActs {
    TensorView q, k, v, vhat, q_raw, k_raw;
    float *rstd_q = nullptr, *rstd_k = nullptr;
  };
  virtual void AttentionInputForward(const AttentionShape& shape, TensorView xn, const AttentionInputWeights& w,
                                     const AttentionInputActs& a);
  // From ∂L/∂q, ∂L/∂k (after RoPE, as attention's backward gives them; overwritten) and
  // ∂L/∂v (before V-scale): dxn (N,d) written; weight gradients accumulated where non-null.
  // scratch_q (N·H·dh) and scratch_k (N·KV·dh) are needed with q/k norms.
  virtual void AttentionInputBackward(const AttentionShape& shape, float* dxn, float* dq, float* dk, const float* dv,
                                      TensorView xn, const AttentionInputWeights& w, const AttentionInputActs& a,
                                      const AttentionInputGrads& g, float* scratch_q, float* scratch_k);

  // gate = x·W_gateᵀ, up = x·W_upᵀ (N,F), act = silu(gate) ⊙ up.
  virtual void GateUpSwiGluForward(TensorView act, TensorView gate, TensorView up, TensorView x, const float* w_gate,
                                   const float* w_up, int N, int F, int d);
  // From ∂L/∂act: dx (N,d) written; dw_gate, dw_up accumulated when non-null; d_gate and
  // d_up (N,F) are scratch.
  virtual void GateUpSwiGluBackward(float* dx, float* dw_gate, float* dw_up, float* d_gate, float* d_up,
                                    const float* d_act, TensorView gate, TensorView up, TensorView x,
                                    const float* w_gate, const float* w_up, int N, int F, int d);

  // How many logits the model's LM-head buffer holds (its rows of V: the chunk of rows the
  // head and the loss work in). 2^24 (64 MB) keeps a CPU chunk near its caches; a GPU
  // takes larger chunks, so that W and ∂W are read and written fewer times a step.
  virtual size_t LmHeadChunkLogits() const { return size_t{1} << 24; }
  // The LM head and the loss: logits = x·Wᵀ (N,V); *loss_acc += Σ_rows −log p[target];
  // dx (N,d) = grad_scale·(softmax − onehot)·W (written); dw (V,d) += its transposed
  // product with x when non-null. `logits` has logits_rows·V floats: a backend may work
  // in row chunks of that size and never hold all N rows (logits_rows ≥ 1).
  virtual void LmHeadCrossEntropy(float* dx, float* dw, float* logits, int logits_rows, TensorView x,
                                  const float* w, const int32_t* targets, int N, int V, int d, float grad_scale,
                                  double* loss_acc);
  // Evaluation: *loss_acc += Σ_rows −log p[target].
  virtual void LmHeadLoss(float* logits, int logits_rows, TensorView x, const float* w, const int32_t* targets,
                          int N, int V, int d, double* loss_acc);

  // One AdamW step over many tensors. `guard` (device doubles) holds [Σ token losses,
  // ‖g‖²]: when either is not finite nothing is updated; otherwise g is clipped to
  // global norm grad_clip (> 0) with scale grad_clip/‖g‖ when ‖g‖ > grad_clip.
  struct AdamWTensor {
    float *p = nullptr, *m = nullptr, *v = nullptr;
    const float* g = nullptr;
    size_t n = 0;
    float weight_decay = 0;
  };
  struct AdamWHyper {
    float lr = 0, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
    double grad_clip = 0;
    int64_t step = 1;  // 1-based, for bias correction
  };
  virtual void MultiTensorAdamW(const std::vector<AdamWTensor>& tensors, const AdamWHyper& hyper,
                                const double* guard);
  // *acc += Σ over tensors of Σ x².
  virtual void AccumulateGlobalSumSquares(double* acc, const std::vector<std::pair<const float*, size_t>>& tensors);

 protected:
  // The GEMMs that end the fused backwards, for an override that forms their gradient
  // operands its own way (in another dtype, say): dxn = dq_proj·W_q + dk_proj·W_k + dv·W_v
  // and the three weight gradients (+=, when g.wq is non-null) ...
  void AttentionInputBackwardGemms(const AttentionShape& shape, float* dxn, TensorView dq_proj, TensorView dk_proj,
                                   TensorView dv, TensorView xn, const AttentionInputWeights& w,
                                   const AttentionInputGrads& g);
  // ... and dx = d_gate·W_gate + d_up·W_up with dw_gate, dw_up (+=, when non-null).
  void GateUpBackwardGemms(float* dx, float* dw_gate, float* dw_up, TensorView d_gate, TensorView d_up, TensorView x,
                           const float* w_gate, const float* w_up, int N, int F, int d);
};

// The host reference of Backend::AbsTop3 and RadixCount (their default implementations,
// and the probes' values kept on the host). InsertTop3 puts v into the three largest of a
// multiset (top3 descending, −1 while unfilled) and says whether v is the new largest.
bool InsertTop3(double* top3, double v);
void HostAbsTop3(float* x, size_t n, double top[4]);  // x becomes |x|; top as AbsTop3's out
void HostRadixCount(double* counts, const float* x, size_t n, int shift, uint32_t prefix);  // counts(256) +=

// The CPU reference backend (cpu/cpu_backend.cc).
std::unique_ptr<Backend> MakeCpuBackend();
// The CPU backend's bf16 mode (cpu/bf16_mode.cc): fp32 arithmetic with every value a bf16
// GPU backend stores in bf16 rounded to bf16 where it would be (the contract is written
// at the top of that file; a CUDA backend's bf16 path follows it).
//   kStored: ActivationDType() is bf16, and the activations the contract stores in bf16
//     live in 2-byte bf16 views (half their fp32 bytes), as on a bf16 GPU.
//   kRoundedInF32: ActivationDType() is fp32; the same values held in fp32 buffers.
// Both compute the same numbers bit for bit (tests/bf16_storage_test.cc): a model that
// put a tensor the contract keeps in fp32 into a bf16 view would differ.
enum class Bf16Activations { kStored, kRoundedInF32 };
std::unique_ptr<Backend> MakeCpuBf16Backend(Bf16Activations activations = Bf16Activations::kStored);

}  // namespace sinkscope

// A Llama-style decoder written once over the Backend interface: token embedding,
// pre-norm blocks (RMSNorm → causal GQA attention with RoPE and optional V-scale →
// residual; RMSNorm → SwiGLU MLP → residual), final RMSNorm, LM head, mean token
// cross-entropy. Parameters live in one contiguous buffer with named views whose names
// are those of Hugging Face's LlamaForCausalLM.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/config.h"
#include "base/status.h"

namespace sinkscope {

// Each tensor of the parameter buffer (and of the gradient and AdamW buffers, which share
// its layout) starts on a 256-byte boundary, so every GEMM operand a weight is meets the
// alignment cuBLASLt's fastest kernels need (16 bytes) and a slab of bf16 copies stays
// aligned too; the padding holds zeros that no op reads or writes.
constexpr size_t kParamAlignFloats = 64;

// One named tensor inside the parameter buffer.
struct ParamTensor {
  std::string name;            // Hugging Face name, e.g. "model.layers.0.self_attn.q_proj.weight"
  std::vector<int64_t> shape;  // [out, in] for linear weights, as Hugging Face stores them
  size_t offset = 0;           // in floats, into the parameter buffer (a multiple of kParamAlignFloats)
  size_t size = 0;             // in floats
  size_t packed_offset = 0;    // in floats, with the tensors back to back (the checkpoint's layout)
  bool weight_decay = false;   // 2-D weights only (METRICS.md training, the paper's recipe)
  bool trainable = true;       // θ is frozen in the baseline and backward-only arms
};

// Device pointers of one block's parameters (or of their gradients).
struct LayerParams {
  float* attn_norm;  // (d)
  float* wq;         // (H·dh, d)
  float* wk;         // (KV·dh, d)
  float* wv;         // (KV·dh, d)
  float* wo;         // (d, H·dh)
  float* theta;      // (KV) V-scale θ
  float* bq;         // (H·dh) q bias, or null (attention_bias)
  float* bk;         // (KV·dh)
  float* bv;         // (KV·dh)
  float* q_norm;     // (dh) per-head RMSNorm gain of q, or null (qk_norm)
  float* k_norm;     // (dh)
  float* mlp_norm;   // (d)
  float* w_gate;     // (F, d)
  float* w_up;       // (F, d)
  float* w_down;     // (d, F)
  float* sinks;      // (H) sink logits s_h (attention kSinkLogit), or null
  float* gate_w;     // (GateRows, d) W_g of the attention gate (ModelConfig::gate), or null
};

// Activation sites inside a block (METRICS.md "Sites inside one pre-norm block").
enum class Site { kXn, kXm, kHIn, kHHalf, kHOut, kQ, kK, kV, kVHat };

// Forward activations of one block at a probe, all device buffers of (B,T,·). q, k, v
// and v̂ are in the backend's ActivationDType (bf16 on a bf16 backend); the residual
// stream, the branch outputs and lse are fp32.
struct BlockActivations {
  const float* h_in;    // (B,T,d)
  const float* h_half;  // (B,T,d)
  const float* h_out;   // (B,T,d)
  const float* r_attn;  // (B,T,d)
  const float* r_mlp;   // (B,T,d)
  TensorView q;         // (B,T,H,dh) after RoPE
  TensorView k;         // (B,T,KV,dh) after RoPE
  TensorView v;         // (B,T,KV,dh)
  TensorView vhat;      // (B,T,KV,dh)
  const float* lse;     // (B,H,T) log-sum-exp of each attention row's scaled scores (softmax)
  // Attention arms (docs/design/ARMS.md); null in the softmax block.
  const float* att = nullptr;         // (B,H,T,T) the weights A that multiply v̂
  const float* unassigned = nullptr;  // (B,H,T) the mass each row gives no token
  const float* gate_logits = nullptr; // (B,T,GateRows) x̃ W_gᵀ of a gated arm (gate = σ of it)
  // The backend's arm workspace: where att is null (Backend::ArmAttentionKeepsWeights),
  // the per-row numbers ArmAttentionColumnStats recomputes column s from.
  const float* arm_workspace = nullptr;
};

// Observer of a forward and backward pass; probes implement it. Pointers are valid only
// during the call. The model never changes its arithmetic because an observer is set.
class PassObserver {
 public:
  virtual ~PassObserver() = default;
  virtual void OnBlockForward(int layer, const BlockActivations& acts, int B, int T) = 0;
  // ∂L/∂(site) of one micro-batch. For kHHalf, `downstream` is ∂L/∂h_out; for kHIn it
  // is ∂L/∂h_half (the residual gradient one step later); otherwise null.
  virtual void OnGradient(int layer, Site site, const float* grad, const float* downstream, int B, int T) = 0;
  // Optional intervention: may change x̃ (B,T,d) of `layer` in place before the
  // projections read it (ablations; finite differences at x̃ in tests). x̃ is in the
  // backend's ActivationDType.
  virtual void EditAttentionInput(int layer, TensorView xn, int B, int T) {}
};

// How a model holds its 2-D weights (ModelOptions::matrices).
enum class WeightDtype { kF32, kBF16, kF16 };
const char* WeightDtypeName(WeightDtype dtype);  // "f32", "bf16", "f16"

struct ModelOptions {
  // false: a model for probing only: no parameter gradients and no AdamW state are
  // allocated (4 B per parameter instead of 16), and a backward computes only the
  // gradients of activations, which is all a probe reads.
  bool training = true;
  // Probing only: the 2-D weights (embedding, projections, LM head) kept in bf16 or f16,
  // as a pretrained checkpoint ships them (2 B per parameter), and widened exactly to fp32
  // where the backend computes: one block's matrices at a time, and the embedding or LM
  // head when used. Norms, biases and θ stay fp32. The pass is the pass of the fp32 model
  // holding the same (widened) values, bit for bit.
  WeightDtype matrices = WeightDtype::kF32;
  // Keep every block's input (the residual stream) but the insides of one block only: the
  // backward recomputes each block's forward from its input first. Memory for long
  // sequences (one attention matrix instead of L) for a second forward's time; the
  // results are the same bit for bit (the recomputation runs the same code on the same
  // values).
  bool recompute_blocks = false;
};

class Model {
 public:
  // Validates the config and allocates parameters (and, for training, gradients and AdamW
  // state) on `backend`.
  static StatusOr<std::unique_ptr<Model>> Create(const ModelConfig& config, Backend* backend,
                                                 ModelOptions options = {});
  bool training() const { return grads_ != nullptr; }
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return config_; }
  // The parameters of the attention arm the backend ops take (ARMS.md); unused for softmax.
  AttentionArmParams ArmParams() const;
  Backend* backend() const { return backend_; }
  const std::vector<ParamTensor>& tensors() const { return tensors_; }
  const ParamTensor* FindTensor(const std::string& name) const;
  // The parameter count (Σ of the tensors' sizes, as a checkpoint stores them).
  size_t num_params() const { return num_params_; }
  // The length in floats of the parameter, gradient and AdamW buffers (the tensors with
  // their alignment padding): what collectives and whole-buffer copies span.
  size_t slab_floats() const { return slab_floats_; }
  // How the 2-D weights are held; for kBF16/kF16 params() is null and the tensors are
  // read and written through TensorToHost / SetTensor / SetTensor16.
  WeightDtype matrices() const { return matrices_; }
  // Whether `t` is held in 16 bits (a 2-D weight of a kBF16/kF16 model).
  bool Holds16(const ParamTensor& t) const { return matrices_ != WeightDtype::kF32 && t.shape.size() == 2; }
  // One tensor's values, as fp32 (widened when held in 16 bits).
  std::vector<float> TensorToHost(const ParamTensor& t) const;
  // Sets one tensor from fp32 values (rounded to nearest even when held in 16 bits).
  void SetTensor(const ParamTensor& t, const float* values);
  // Sets a tensor held in 16 bits from raw bf16/f16 values of the model's dtype.
  void SetTensor16(const ParamTensor& t, const void* raw);
  // Bytes the parameters take (16-bit weights counted at 2 B, and the fp32 scratch they
  // are widened into).
  double ParameterBytes() const;
  // Device buffers; a const Model still hands them out for reading (checkpoints, probes).
  float* params() const { return params_; }
  float* grads() const { return grads_; }
  float* adam_m() const { return adam_m_; }
  float* adam_v() const { return adam_v_; }
  // Block l's parameters. For a 16-bit model the matrices are null here (they are only
  // fp32 while widened for a pass); norms, biases and θ are set.
  LayerParams layer(int l) const;
  LayerParams layer_grad(int l) const { return View(grads_, l); }
  // C_{ℓ,g} base: d_model·d_head·σ² (multiplied by exp θ).
  double VScaleCBase() const;

  // normal(0, init_std) on 2-D weights, 1 on norms, 0 on θ; deterministic in `seed`.
  void InitWeights(uint64_t seed);
  void ZeroGrad();

  // One micro-batch: forward, loss, backward; gradients are accumulated with
  // `grad_scale` multiplying ∂(Σ token losses). For the mean over a global batch of
  // `accum` micro-batches use grad_scale = 1/(accum·B·T). Returns the micro-batch's
  // mean token loss. Host tokens and targets, B·T each.
  double ForwardBackward(const int32_t* tokens, const int32_t* targets, int B, int T, float grad_scale,
                         PassObserver* observer = nullptr);
  // Forward only; returns the mean token loss.
  double Evaluate(const int32_t* tokens, const int32_t* targets, int B, int T, PassObserver* observer = nullptr);
  // As ForwardBackward and Evaluate without waiting: the micro-batch's Σ token losses
  // are added to *loss_acc, a device double (Backend::AllocScalars), read when the caller
  // wants it — once per step.
  //
  // `ready`, when given, is called as ranges [begin, end) of the gradient buffer become
  // final in this backward — the LM head and final norm first, then each block from the
  // last down, the embedding last; together they cover every parameter once, highest
  // offsets first, each range adjacent to the one before. A range is final once the work
  // the backend has queued so far completes (on the CPU, at once). Data parallelism
  // all-reduces them while the backward goes on.
  using GradientsReady = std::function<void(size_t begin, size_t end)>;
  void ForwardBackwardInto(const int32_t* tokens, const int32_t* targets, int B, int T, float grad_scale,
                           double* loss_acc, PassObserver* observer = nullptr, const GradientsReady* ready = nullptr);
  void EvaluateInto(const int32_t* tokens, const int32_t* targets, int B, int T, double* loss_acc,
                    PassObserver* observer = nullptr);

  // Allocates the activations of micro-batches of B × T tokens (one arena: one
  // allocation, kept until the shape changes), or an error naming the bytes needed when
  // the backend cannot hold them. A pass of a new shape does this itself (and aborts,
  // saying why, if it cannot): callers that can fail cleanly call it first.
  Status PrepareActivations(int B, int T);
  // Bytes the current activations take (0 before the first pass).
  double ActivationBytes() const;
  // Host copies of parameters (for checkpoints, export, tests).
  std::vector<float> ParamsToHost() const;
  void ParamsFromHost(const std::vector<float>& host);
  std::vector<float> GradsToHost() const;

 private:
  Model(const ModelConfig& config, Backend* backend);
  LayerParams View(float* base, int l) const;
  // The fp32 pointer of a tensor held in fp32 (by its offset).
  float* Param(size_t offset) const;
  // Block l for a pass: a 16-bit model widens its matrices into the block scratch first.
  LayerParams Block(int l);
  // The activations of block l (the one shared set with recompute_blocks).
  struct LayerActs;
  // A block's forward from x̃ (in a.xn) to r_mlp; the residual add after it is the caller's.
  void ForwardBlock(int l, const LayerParams& w, LayerActs& a, PassObserver* observer, int B, int T);
  // The embedding or LM head (by offset) for a pass, widened for a 16-bit model.
  const float* Vocab(size_t offset);
  void Widen(const ParamTensor& t, float* out) const;
  size_t TensorIndex(size_t offset) const;
  Backend::AttentionShape Shape(int B, int T) const;
  static Backend::AttentionInputWeights AttentionWeights(const LayerParams& w);
  void EnsureActivations(int B, int T);
  void Forward(const int32_t* tokens, int B, int T, PassObserver* observer);
  void FreeActivations();

  ModelConfig config_;
  RotaryFrequencies rotary_;  // config_.Rotary(), computed once
  Backend* backend_;
  std::vector<ParamTensor> tensors_;
  size_t num_params_ = 0, slab_floats_ = 0;
  float* params_ = nullptr;
  // A 16-bit model: the matrices in store16_ (store_off_ per tensor, npos for fp32 ones),
  // the fp32 tensors in small_ (small_off_ per tensor), and the scratch they are widened into.
  WeightDtype matrices_ = WeightDtype::kF32;
  bool recompute_ = false;
  std::vector<uint16_t> store16_;
  std::vector<size_t> store_off_, small_off_;
  float* small_ = nullptr;
  float* block_scratch_ = nullptr;  // one block's seven matrices
  float* vocab_scratch_ = nullptr;  // V × d
  int scratch_block_ = -1;
  size_t vocab_holds_ = static_cast<size_t>(-1);
  float* grads_ = nullptr;
  float* adam_m_ = nullptr;
  float* adam_v_ = nullptr;
  // Offsets of the named views.
  size_t off_embed_ = 0, off_final_norm_ = 0, off_head_ = 0;
  struct LayerOffsets {
    size_t attn_norm, wq, wk, wv, wo, theta, mlp_norm, w_gate, w_up, w_down;
    size_t bq = kNone, bk = kNone, bv = kNone, q_norm = kNone, k_norm = kNone;  // optional tensors
    size_t sinks = kNone, gate_w = kNone;                                       // attention arms
    static constexpr size_t kNone = static_cast<size_t>(-1);
  };
  std::vector<LayerOffsets> layer_off_;

  // Activations, sized for (act_B_, act_T_).
  // The views are in the backend's ActivationDType (what a bf16 backend stores in bf16:
  // engine/backend.h, MakeCpuBf16Backend); the pointers are fp32.
  struct LayerActs {
    TensorView xn, q, k, v, vhat, y, xm, gate, up, act;
    float *rstd_attn, *att_ws, *lse, *r_attn, *h_half, *rstd_mlp, *r_mlp;
    TensorView q_raw, k_raw;                        // qk_norm: the projections before the norm
    float *rstd_q = nullptr, *rstd_k = nullptr;  // qk_norm
    // Attention arms: A, its unassigned mass, the backend's workspace; a gate's logits and,
    // for an output gate, the attention output before the gate (y is after it).
    float *att = nullptr, *unassigned = nullptr, *arm_ws = nullptr, *gate_logits = nullptr;
    TensorView y_raw;
  };
  int act_B_ = 0, act_T_ = 0;
  std::vector<float*> residual_;  // L+1 buffers (N,d): residual_[l] = h_in of block l
  std::vector<LayerActs> acts_;
  TensorView xf_;  // the final norm's output (ActivationDType)
  float *rstd_f_ = nullptr, *logits_ = nullptr;
  int logits_rows_ = 0;         // rows of logits_: the LM head's chunk
  double* scalars_ = nullptr;   // device doubles for ForwardBackward/Evaluate's own loss
  int32_t *tokens_dev_ = nullptr, *targets_dev_ = nullptr;
  // Backward scratch.
  float *d_res_a_ = nullptr, *d_res_b_ = nullptr, *d_norm_ = nullptr, *d_q_ = nullptr, *d_k_ = nullptr,
        *d_v_ = nullptr, *d_vhat_ = nullptr, *d_y_ = nullptr, *d_act_ = nullptr, *d_gate_ = nullptr,
        *d_up_ = nullptr;
  float *dgamma_sink_ = nullptr;  // probing only: RMSNorm gain gradients land here, unread
  float *d_q_raw_ = nullptr, *d_k_raw_ = nullptr;  // qk_norm: ∂L/∂ q, k before the norm
  float *d_gate_logits_ = nullptr, *d_y_raw_ = nullptr;  // attention gates
  std::unique_ptr<Arena> activations_;  // every activation buffer of the current shape, one allocation
};

}  // namespace sinkscope

// Model configuration of a Llama-style decoder (RMSNorm, RoPE, SwiGLU, causal MHA/GQA)
// with the V-scale value-path valve of the paper (section 5).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"

namespace sinkscope {

// Which value path a model uses. METRICS.md "V-scale".
enum class VScaleMode {
  kNone,          // baseline: v̂ = v
  kVScale,        // v̂ = φ(‖v‖²)·v with learned θ per layer and KV head
  kBackwardOnly,  // the paper's control: forward is the baseline, backward applies the
                  // V-scale Jacobian with θ frozen at 0
};

const char* VScaleModeName(VScaleMode mode);
// The inverse of VScaleModeName; false for an unknown name.
bool ParseVScaleMode(const std::string& name, VScaleMode* mode);

// How attention turns scores z_ij = q_i·k_j/√dh (j ≤ i) into the weights A that multiply
// the values. docs/design/ARMS.md gives each formula, gradient and paper.
enum class AttentionKind {
  kSoftmax,        // a_ij = exp(z_ij) / Σ_{k≤i} exp(z_ik)
  kSinkLogit,      // a_ij = exp(z_ij) / (exp(s_h) + Σ_{k≤i} exp(z_ik)), s_h learned per head
  kSoftmaxPlusOne, // kSinkLogit with s_h fixed at 0 (no parameter)
  kSigmoid,        // a_ij = σ(z_ij + b), b = sigmoid_bias, unnormalised
  kSoftpick,       // a_ij = ReLU(exp(z_ij) − 1) / (Σ_{k≤i} |exp(z_ik) − 1| + ε)
};
const char* AttentionKindName(AttentionKind kind);  // "softmax", "sink_logit", ...
bool ParseAttentionKind(const std::string& name, AttentionKind* kind);

// A sigmoid gate g = σ(x̃ W_gᵀ) computed from the attention input x̃ (ARMS.md).
enum class GateKind {
  kNone,
  kOutput,  // Y' = Y ⊙ g per channel of each head's attention output, W_g (H·dh, d)
  kHead,    // Y'_h = Y_h · g_h, one gate per head, W_g (H, d)
  kValue,   // v' = v ⊙ g on the value path, W_g (KV·dh, d)
};
const char* GateKindName(GateKind kind);  // "none", "output", "head", "value"
bool ParseGateKind(const std::string& name, GateKind* kind);

// Rotary position scaling as Hugging Face's `rope_scaling` / `rope_parameters` define it
// (modeling_rope_utils: default, linear, llama3, yarn). Training runs use kDefault; the
// other types come from pretrained configs.
enum class RopeType { kDefault, kLinear, kLlama3, kYarn };
const char* RopeTypeName(RopeType type);  // "default", "linear", "llama3", "yarn"
bool ParseRopeType(const std::string& name, RopeType* type);

struct RopeScaling {
  RopeType type = RopeType::kDefault;
  double factor = 1.0;                       // linear, llama3, yarn
  double low_freq_factor = 1.0;              // llama3
  double high_freq_factor = 4.0;             // llama3
  int original_max_position_embeddings = 0;  // llama3, yarn (0: model.context)
  double beta_fast = 32.0, beta_slow = 1.0;  // yarn
  double attention_factor = 0.0;             // yarn: scales cos and sin (0: 0.1·ln(factor) + 1)
  bool truncate = true;                      // yarn: round the correction range to integers
  bool operator==(const RopeScaling&) const = default;
};

// Per channel pair i < dh/2: the angle of position t is t·inv_freq[i]; cos and sin are
// multiplied by attention_factor (1 except for yarn). With a partial rotary_dim the pairs
// past it have inv_freq 0 (they do not turn).
struct RotaryFrequencies {
  std::vector<double> inv_freq;
  double attention_factor = 1.0;
};

// The model's plain fields, declared once: X(type, name, default, Hugging Face key,
// required in a checkpoint header). Every reader and writer follows from this list —
// the struct below, the checkpoint header (training/checkpoint.cc), the experiment
// schema's conversion (schema/experiment.cc: the proto field of the same name in
// ModelSpec), the Hugging Face config.json writer (training/hf.cc: the key; "" where
// Hugging Face encodes the field otherwise), the benchmark (--print-model).
// tests/config_fields_test.cc fails when a field is added to one of them only.
// rope_scaling, vscale, attention and gate are structured and written beside the list.
#define SINKSCOPE_MODEL_FIELDS(X)                                            \
  X(int, layers, 2, "num_hidden_layers", true)                               \
  X(int, d_model, 32, "hidden_size", true)                                   \
  X(int, heads, 4, "num_attention_heads", true)                              \
  X(int, kv_heads, 4, "num_key_value_heads", true)                           \
  X(int, head_dim, 8, "head_dim", true)                                      \
  X(int, ffn, 64, "intermediate_size", true)                                 \
  X(int, vocab, 257, "vocab_size", true)                                     \
  X(int, context, 16, "max_position_embeddings", true) /* maximum T */       \
  X(double, rope_theta, 10000.0, "rope_theta", true)                         \
  X(double, rms_eps, 1e-5, "rms_norm_eps", true)                             \
  X(double, init_std, 0.02, "initializer_range", true)                       \
  X(bool, tied_embeddings, false, "tie_word_embeddings", true)               \
  /* Pretrained architectures beyond Llama: q, k, v projections with biases  \
     (Qwen2/2.5), an RMSNorm over each head of q and k before RoPE (Qwen3);   \
     Hugging Face says so by model_type. */                                  \
  X(bool, attention_bias, false, "", false)                                  \
  X(bool, qk_norm, false, "", false)                                         \
  /* Channels of each head RoPE rotates (GLM's partial_rotary_factor · dh):   \
     pairs (i, i + dh/2) with i < rotary_dim/2 turn, the others keep their    \
     values. 0: all of them. */                                              \
  X(int, rotary_dim, 0, "", false)                                           \
  /* σ in C = d_model·d_head·σ²·exp(θ), the init std of W_V (METRICS.md,      \
     "V-scale"); 0: init_std, which is what it is unless a test says other. */ \
  X(double, vscale_sigma, 0.0, "", true)                                     \
  /* Attention arms (ARMS.md): the initial value of the learned per-head sink \
     logit s_h (sink_logit); the bias b of sigmoid attention (the schema's    \
     default is −ln(context)); softpick's ε. Each is read by its arm only. */ \
  X(double, sink_logit_init, 0.0, "", false)                                 \
  X(double, sigmoid_bias, 0.0, "", false)                                    \
  X(double, softpick_eps, 1e-6, "", false)

struct ModelConfig {
#define SINKSCOPE_DECLARE_FIELD(type, name, value, hf, required) type name = value;
  SINKSCOPE_MODEL_FIELDS(SINKSCOPE_DECLARE_FIELD)
#undef SINKSCOPE_DECLARE_FIELD
  RopeScaling rope_scaling;
  VScaleMode vscale = VScaleMode::kNone;
  AttentionKind attention = AttentionKind::kSoftmax;
  GateKind gate = GateKind::kNone;

  // Whether attention or the gate differ from the Llama block (the arms of ARMS.md, which
  // only the CPU backend runs today).
  bool HasAttentionArm() const { return attention != AttentionKind::kSoftmax || gate != GateKind::kNone; }
  // Rows of the gate's W_g (0 without a gate) and the channels one gate value multiplies.
  int GateRows() const;
  int GateWidth() const { return gate == GateKind::kHead ? head_dim : 1; }

  // σ of V-scale's C: vscale_sigma when set, else init_std.
  double VScaleSigma() const { return vscale_sigma > 0 ? vscale_sigma : init_std; }

  // Checks the shape rules; the message names the offending field.
  Status Validate() const;

  int q_dim() const { return heads * head_dim; }
  int kv_dim() const { return kv_heads * head_dim; }
  // RoPE frequencies with the scaling applied, as Hugging Face computes them.
  RotaryFrequencies Rotary() const;
  // Every parameter Model allocates (norms, θ, biases included), in double so that
  // absurd sizes cannot overflow.
  double ParameterCount() const;
  // Bytes of the activations one forward and backward of micro_batch × T tokens keeps on
  // the CPU backend (fp32; its attention keeps the (B,H,T,T) matrix; the logits).
  // With `recompute_blocks` (ModelOptions): every block's input, but one block's insides.
  double ActivationBytes(int micro_batch, int T, bool recompute_blocks = false) const;
  // Parameters that take part in matmuls (for the FLOPs convention of METRICS.md).
  int64_t MatmulParams() const;
  // FLOPs per trained token: 6·N_matmul + 6·L·H·dh·T (METRICS.md, training observables).
  double TrainFlopsPerToken(int seq_len) const;
};

}  // namespace sinkscope

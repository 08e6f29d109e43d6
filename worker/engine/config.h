// Model configuration of a Llama-style decoder (RMSNorm, RoPE, SwiGLU, causal MHA/GQA)
// with the V-scale value-path valve of the paper (section 5).
#pragma once

#include <cstdint>
#include <string>

#include "worker/engine/status.h"

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

struct ModelConfig {
  int layers = 2;
  int d_model = 32;
  int heads = 4;
  int kv_heads = 4;
  int head_dim = 8;
  int ffn = 64;
  int vocab = 257;
  int context = 16;  // maximum sequence length T
  double rope_theta = 10000.0;
  double rms_eps = 1e-5;
  double init_std = 0.02;
  bool tied_embeddings = false;
  VScaleMode vscale = VScaleMode::kNone;
  // σ in C = d_model·d_head·σ²·exp(θ): the init std of W_V (METRICS.md, "V-scale").
  double vscale_sigma = 0.02;

  // Checks the shape rules; the message names the offending field.
  Status Validate() const;

  int q_dim() const { return heads * head_dim; }
  int kv_dim() const { return kv_heads * head_dim; }
  // Parameters that take part in matmuls (for the FLOPs convention of METRICS.md).
  int64_t MatmulParams() const;
  // FLOPs per trained token: 6·N_matmul + 6·L·H·dh·T (METRICS.md, training observables).
  double TrainFlopsPerToken(int seq_len) const;
};

}  // namespace sinkscope

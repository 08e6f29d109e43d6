#include "worker/engine/config.h"

namespace sinkscope {

const char* VScaleModeName(VScaleMode mode) {
  switch (mode) {
    case VScaleMode::kNone: return "baseline";
    case VScaleMode::kVScale: return "vscale";
    case VScaleMode::kBackwardOnly: return "vscale_backward_only";
  }
  return "unknown";
}

bool ParseVScaleMode(const std::string& name, VScaleMode* mode) {
  for (VScaleMode m : {VScaleMode::kNone, VScaleMode::kVScale, VScaleMode::kBackwardOnly}) {
    if (name == VScaleModeName(m)) {
      *mode = m;
      return true;
    }
  }
  return false;
}

Status ModelConfig::Validate() const {
  auto positive = [](int v, const char* name) -> Status {
    if (v <= 0) return InvalidArgumentError(std::string("model.") + name + " must be positive, got " + std::to_string(v));
    return OkStatus();
  };
  RETURN_IF_ERROR(positive(layers, "layers"));
  RETURN_IF_ERROR(positive(d_model, "d_model"));
  RETURN_IF_ERROR(positive(heads, "heads"));
  RETURN_IF_ERROR(positive(kv_heads, "kv_heads"));
  RETURN_IF_ERROR(positive(head_dim, "head_dim"));
  RETURN_IF_ERROR(positive(ffn, "ffn"));
  RETURN_IF_ERROR(positive(vocab, "vocab"));
  RETURN_IF_ERROR(positive(context, "context"));
  if (heads % kv_heads != 0) {
    return InvalidArgumentError("model.kv_heads (" + std::to_string(kv_heads) + ") must divide model.heads (" +
                                std::to_string(heads) + ")");
  }
  if (head_dim % 2 != 0) {
    return InvalidArgumentError("model.head_dim must be even for RoPE, got " + std::to_string(head_dim));
  }
  if (!(rope_theta > 0)) return InvalidArgumentError("model.rope_theta must be positive");
  if (!(rms_eps > 0)) return InvalidArgumentError("model.rms_eps must be positive");
  if (!(init_std > 0)) return InvalidArgumentError("model.init_std must be positive");
  return OkStatus();
}

int64_t ModelConfig::MatmulParams() const {
  const int64_t d = d_model;
  const int64_t per_layer = d * q_dim() + 2 * d * kv_dim() + q_dim() * d + 3 * d * ffn;
  // The LM head is a matmul; the embedding lookup is not.
  return layers * per_layer + static_cast<int64_t>(vocab) * d;
}

double ModelConfig::TrainFlopsPerToken(int seq_len) const {
  return 6.0 * static_cast<double>(MatmulParams()) +
         6.0 * layers * heads * head_dim * static_cast<double>(seq_len);
}

}  // namespace sinkscope

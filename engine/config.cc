#include "engine/config.h"

#include <algorithm>
#include <cmath>

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

const char* AttentionKindName(AttentionKind kind) {
  switch (kind) {
    case AttentionKind::kSoftmax: return "softmax";
    case AttentionKind::kSinkLogit: return "sink_logit";
    case AttentionKind::kSoftmaxPlusOne: return "softmax_plus_one";
    case AttentionKind::kSigmoid: return "sigmoid";
    case AttentionKind::kSoftpick: return "softpick";
  }
  return "unknown";
}

bool ParseAttentionKind(const std::string& name, AttentionKind* kind) {
  for (AttentionKind k : {AttentionKind::kSoftmax, AttentionKind::kSinkLogit, AttentionKind::kSoftmaxPlusOne,
                          AttentionKind::kSigmoid, AttentionKind::kSoftpick}) {
    if (name == AttentionKindName(k)) {
      *kind = k;
      return true;
    }
  }
  return false;
}

const char* GateKindName(GateKind kind) {
  switch (kind) {
    case GateKind::kNone: return "none";
    case GateKind::kOutput: return "output";
    case GateKind::kHead: return "head";
    case GateKind::kValue: return "value";
  }
  return "unknown";
}

bool ParseGateKind(const std::string& name, GateKind* kind) {
  for (GateKind k : {GateKind::kNone, GateKind::kOutput, GateKind::kHead, GateKind::kValue}) {
    if (name == GateKindName(k)) {
      *kind = k;
      return true;
    }
  }
  return false;
}

int ModelConfig::GateRows() const {
  switch (gate) {
    case GateKind::kNone: return 0;
    case GateKind::kOutput: return heads * head_dim;
    case GateKind::kHead: return heads;
    case GateKind::kValue: return kv_heads * head_dim;
  }
  return 0;
}

const char* RopeTypeName(RopeType type) {
  switch (type) {
    case RopeType::kDefault: return "default";
    case RopeType::kLinear: return "linear";
    case RopeType::kLlama3: return "llama3";
    case RopeType::kYarn: return "yarn";
  }
  return "unknown";
}

bool ParseRopeType(const std::string& name, RopeType* type) {
  for (RopeType t : {RopeType::kDefault, RopeType::kLinear, RopeType::kLlama3, RopeType::kYarn}) {
    if (name == RopeTypeName(t)) {
      *type = t;
      return true;
    }
  }
  return false;
}

RotaryFrequencies ModelConfig::Rotary() const {
  // Frequencies over the rotated channels (Hugging Face: dim = head_dim · partial_rotary_factor).
  const int dh = rotary_dim > 0 ? rotary_dim : head_dim, half = dh / 2;
  const RopeScaling& s = rope_scaling;
  const double original = s.original_max_position_embeddings > 0 ? s.original_max_position_embeddings : context;
  RotaryFrequencies r;
  r.inv_freq.resize(half);
  for (int i = 0; i < half; ++i) r.inv_freq[i] = std::pow(rope_theta, -2.0 * i / dh);  // θ^(−2i/dh)
  switch (s.type) {
    case RopeType::kDefault: break;
    case RopeType::kLinear:
      for (double& f : r.inv_freq) f /= s.factor;  // positions divided by the factor
      break;
    case RopeType::kLlama3: {
      // Long wavelengths are interpolated by the factor, short ones kept, and the band
      // between blended smoothly (Llama 3.1).
      const double low_wavelen = original / s.low_freq_factor, high_wavelen = original / s.high_freq_factor;
      for (double& f : r.inv_freq) {
        const double wavelen = 2 * M_PI / f;
        if (wavelen > low_wavelen) {
          f /= s.factor;
        } else if (wavelen >= high_wavelen) {
          const double smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
          f = (1 - smooth) * f / s.factor + smooth * f;
        }
      }
      break;
    }
    case RopeType::kYarn: {
      // YaRN: extrapolate the fast dimensions, interpolate the slow ones, ramp between.
      auto correction_dim = [&](double rotations) {
        return dh * std::log(original / (rotations * 2 * M_PI)) / (2 * std::log(rope_theta));
      };
      double low = correction_dim(s.beta_fast), high = correction_dim(s.beta_slow);
      if (s.truncate) {
        low = std::floor(low);
        high = std::ceil(high);
      }
      low = std::max(low, 0.0);
      high = std::min(high, dh - 1.0);
      if (low == high) high += 0.001;  // avoids a zero-width ramp
      for (int i = 0; i < half; ++i) {
        const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
        const double extrapolation = 1 - ramp;
        r.inv_freq[i] = r.inv_freq[i] / s.factor * (1 - extrapolation) + r.inv_freq[i] * extrapolation;
      }
      r.attention_factor =
          s.attention_factor > 0 ? s.attention_factor : (s.factor <= 1 ? 1.0 : 0.1 * std::log(s.factor) + 1.0);
      break;
    }
  }
  r.inv_freq.resize(head_dim / 2, 0.0);  // the channels past rotary_dim keep their values
  return r;
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
  if (rotary_dim < 0 || rotary_dim > head_dim || rotary_dim % 2 != 0) {
    return InvalidArgumentError("model.rotary_dim must be even and in [0, head_dim = " + std::to_string(head_dim) +
                                "], got " + std::to_string(rotary_dim));
  }
  if (rotary_dim > 0 && rotary_dim < head_dim && rope_scaling.type == RopeType::kYarn) {
    return InvalidArgumentError("model.rotary_dim " + std::to_string(rotary_dim) +
                                " with yarn scaling is not supported (yarn scales every channel's cos and sin)");
  }
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
  if (rope_scaling.type != RopeType::kDefault && !(rope_scaling.factor > 0 && std::isfinite(rope_scaling.factor))) {
    return InvalidArgumentError("model.rope_scaling.factor must be positive and finite");
  }
  if (rope_scaling.type == RopeType::kLlama3 && !(rope_scaling.high_freq_factor > rope_scaling.low_freq_factor)) {
    return InvalidArgumentError("model.rope_scaling: high_freq_factor must exceed low_freq_factor (llama3)");
  }
  if (!(rms_eps > 0)) return InvalidArgumentError("model.rms_eps must be positive");
  if (!(init_std > 0)) return InvalidArgumentError("model.init_std must be positive");
  // The arms' parameters (ARMS.md "Ranges"): outside these a run is numerically meaningless.
  if (!(std::isfinite(sink_logit_init) && std::abs(sink_logit_init) <= 20)) {
    return InvalidArgumentError("model.sink_logit_init must be finite and in [-20, 20], got " +
                                std::to_string(sink_logit_init));
  }
  if (!(std::isfinite(sigmoid_bias) && std::abs(sigmoid_bias) <= 30)) {
    return InvalidArgumentError("model.sigmoid_bias must be finite and in [-30, 30], got " +
                                std::to_string(sigmoid_bias));
  }
  if (!(softpick_eps > 0 && softpick_eps <= 1)) {
    return InvalidArgumentError("model.softpick_eps must be in (0, 1], got " + std::to_string(softpick_eps));
  }
  if (gate == GateKind::kValue && vscale != VScaleMode::kNone) {
    // Both rewrite the value that enters aggregation; neither paper defines their order.
    return InvalidArgumentError(std::string("the value gate (gated_value) with ") + VScaleModeName(vscale) +
                                " is not defined: both rewrite the value path and no paper fixes their order");
  }
  if (vscale == VScaleMode::kBackwardOnly && HasAttentionArm()) {
    return InvalidArgumentError("vscale_backward_only is the control of the softmax baseline; it is not defined "
                                "with attention arm " + std::string(AttentionKindName(attention)) + " / gate " +
                                GateKindName(gate));
  }
  return OkStatus();
}

double ModelConfig::ParameterCount() const {
  const double d = d_model, q = static_cast<double>(heads) * head_dim, kv = static_cast<double>(kv_heads) * head_dim;
  const double per_layer = d * q + 2 * d * kv + q * d + 3 * d * ffn + 2 * d + kv_heads +
                           (attention_bias ? q + 2 * kv : 0) + (qk_norm ? 2.0 * head_dim : 0) +
                           (attention == AttentionKind::kSinkLogit ? heads : 0) + static_cast<double>(GateRows()) * d;
  return layers * per_layer + static_cast<double>(vocab) * d * (tied_embeddings ? 1 : 2) + d;
}

double ModelConfig::ActivationBytes(int micro_batch, int T, bool recompute_blocks) const {
  const double d = d_model, q = static_cast<double>(heads) * head_dim, kv = static_cast<double>(kv_heads) * head_dim;
  const double F = ffn, tokens = static_cast<double>(micro_batch) * T;
  // Per token and layer: h_in, x̃, r_attn, h_half, x̃_mlp, r_mlp (6d), q, y (2q), k, v, v̂
  // (3kv), gate, up, SwiGLU (3F); the attention matrix; then the logits and backward scratch.
  // An attention arm keeps A and its scores (two matrices), the gate's logits and the
  // ungated output.
  const double matrices = attention == AttentionKind::kSoftmax ? 1 : 2;
  const double per_layer = tokens * (6 * d + 2 * q + 3 * kv + 3 * F + GateRows() + (gate != GateKind::kNone ? q : 0)) +
                           matrices * micro_batch * heads * T * T;
  const double blocks = recompute_blocks ? layers * tokens * d + per_layer : layers * per_layer;
  return 4 * (blocks + tokens * (static_cast<double>(vocab) + 8 * d + 2 * F + 2 * q + 2 * kv));
}

int64_t ModelConfig::MatmulParams() const {
  const int64_t d = d_model;
  const int64_t per_layer = d * q_dim() + 2 * d * kv_dim() + q_dim() * d + 3 * d * ffn + d * GateRows();
  // The LM head is a matmul; the embedding lookup is not.
  return layers * per_layer + static_cast<int64_t>(vocab) * d;
}

double ModelConfig::TrainFlopsPerToken(int seq_len) const {
  return 6.0 * static_cast<double>(MatmulParams()) +
         6.0 * layers * heads * head_dim * static_cast<double>(seq_len);
}

}  // namespace sinkscope

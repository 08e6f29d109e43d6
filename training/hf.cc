#include "training/hf.h"

#include <xxhash.h>

#include <algorithm>
#include <cctype>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <utility>

#include "base/log.h"
#include "data/data.h"

namespace sinkscope {

namespace {

// config.json and the shard index are small; a larger file is not one of them.
constexpr int64_t kMaxJsonBytes = 64 << 20;

std::string Quoted(const nlohmann::json& v) { return v.dump(); }

// A number under `key` of `obj` as Hugging Face reads it: absent or null leaves *out as
// it is; anything but a number is refused naming the key and its value.
Status OptionalNumber(const nlohmann::json& obj, const std::string& where, const char* key, double* out) {
  if (!obj.contains(key) || obj[key].is_null()) return OkStatus();
  if (!obj[key].is_number()) {
    return InvalidArgumentError(where + key + " must be a number, got " + Quoted(obj[key]));
  }
  *out = obj[key].get<double>();
  return OkStatus();
}

Status OptionalInt(const nlohmann::json& obj, const std::string& where, const char* key, int* out) {
  if (!obj.contains(key) || obj[key].is_null()) return OkStatus();
  if (!obj[key].is_number_integer() || obj[key].get<int64_t>() > INT32_MAX || obj[key].get<int64_t>() < INT32_MIN) {
    return InvalidArgumentError(where + key + " must be an integer, got " + Quoted(obj[key]));
  }
  *out = obj[key].get<int>();
  return OkStatus();
}

Status OptionalBool(const nlohmann::json& obj, const std::string& where, const char* key, bool* out) {
  if (!obj.contains(key) || obj[key].is_null()) return OkStatus();
  if (!obj[key].is_boolean()) return InvalidArgumentError(where + key + " must be true or false, got " + Quoted(obj[key]));
  *out = obj[key].get<bool>();
  return OkStatus();
}

// ModelConfig::Validate names the engine's fields ("model.layers"); a config.json's
// reader names the file's keys ("num_hidden_layers") where the field has one.
std::string InHfTerms(std::string message) {
  static const std::pair<const char*, const char*> kKeys[] = {
#define SINKSCOPE_FIELD_KEY(type, name, value, hf, required) {"model." #name, hf},
      SINKSCOPE_MODEL_FIELDS(SINKSCOPE_FIELD_KEY)
#undef SINKSCOPE_FIELD_KEY
  };
  for (const auto& [field, key] : kKeys) {
    if (*key == '\0') continue;
    const size_t n = std::strlen(field);
    for (size_t at = message.find(field); at != std::string::npos; at = message.find(field, at)) {
      const char next = at + n < message.size() ? message[at + n] : ' ';
      if (std::isalnum(static_cast<unsigned char>(next)) || next == '_') {  // a longer name
        at += n;
        continue;
      }
      message.replace(at, n, key);
      at += std::strlen(key);
    }
  }
  return message;
}

std::string FormatNumber(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.10g", v);
  return b;
}

// Reads a RoPE parameter object: `rope_scaling` (Transformers 4) or `rope_parameters`
// (Transformers 5, which also carries rope_theta). `where` is "config.json: rope_scaling.".
Status ReadRopeObject(const nlohmann::json& r, const std::string& where, int max_position_embeddings,
                      ModelConfig* c, double* rope_theta_inside, double* partial_inside,
                      std::vector<std::string>* warnings) {
  if (!r.is_object()) return InvalidArgumentError(where.substr(0, where.size() - 1) + " must be an object, got " + Quoted(r));
  static const char* const kKnown[] = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
                                       "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                                       "attention_factor", "truncate", "mscale", "mscale_all_dim",
                                       "partial_rotary_factor"};
  for (auto it = r.begin(); it != r.end(); ++it) {
    bool known = false;
    for (const char* k : kKnown) known = known || it.key() == k;
    if (!known) {
      // A per-layer-type table ({"full_attention": {...}, ...}) lands here too.
      return InvalidArgumentError(where + it.key() + " = " + Quoted(it.value()) + " is not supported");
    }
  }
  std::string type = "default";
  for (const char* key : {"rope_type", "type"}) {
    if (r.contains(key) && !r[key].is_null()) {
      if (!r[key].is_string()) return InvalidArgumentError(where + key + " must be a string, got " + Quoted(r[key]));
      type = r[key].get<std::string>();
    }
  }
  RopeScaling& s = c->rope_scaling;
  if (!ParseRopeType(type, &s.type)) {
    return InvalidArgumentError(where + "rope_type = \"" + type +
                                "\" is not supported (supported: default, linear, llama3, yarn)");
  }
  if (r.contains("rope_theta")) {
    double theta = 0;
    RETURN_IF_ERROR(OptionalNumber(r, where, "rope_theta", &theta));
    *rope_theta_inside = theta;
  }
  RETURN_IF_ERROR(OptionalNumber(r, where, "partial_rotary_factor", partial_inside));
  // Keys that are present must belong to the type: a llama3 key under yarn is a mistake.
  auto only = [&](std::initializer_list<const char*> allowed) -> Status {
    static const char* const kTypeKeys[] = {"factor", "original_max_position_embeddings", "low_freq_factor",
                                            "high_freq_factor", "beta_fast", "beta_slow", "attention_factor",
                                            "truncate", "mscale", "mscale_all_dim"};
    for (const char* key : kTypeKeys) {
      bool ok = false;
      for (const char* a : allowed) ok = ok || std::string(a) == key;
      if (!ok && r.contains(key) && !r[key].is_null()) {
        return InvalidArgumentError(where + key + " = " + Quoted(r[key]) + " does not apply to rope_type \"" + type +
                                    "\"");
      }
    }
    return OkStatus();
  };
  auto required = [&](const char* key) -> Status {
    if (!r.contains(key) || r[key].is_null()) {
      return InvalidArgumentError(where + key + " is required for rope_type \"" + type + "\"");
    }
    return OkStatus();
  };
  switch (s.type) {
    case RopeType::kDefault: RETURN_IF_ERROR(only({})); break;
    case RopeType::kLinear:
      RETURN_IF_ERROR(only({"factor"}));
      RETURN_IF_ERROR(required("factor"));
      RETURN_IF_ERROR(OptionalNumber(r, where, "factor", &s.factor));
      break;
    case RopeType::kLlama3:
      RETURN_IF_ERROR(only({"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}));
      for (const char* key : {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}) {
        RETURN_IF_ERROR(required(key));
      }
      RETURN_IF_ERROR(OptionalNumber(r, where, "factor", &s.factor));
      RETURN_IF_ERROR(OptionalNumber(r, where, "low_freq_factor", &s.low_freq_factor));
      RETURN_IF_ERROR(OptionalNumber(r, where, "high_freq_factor", &s.high_freq_factor));
      RETURN_IF_ERROR(OptionalInt(r, where, "original_max_position_embeddings", &s.original_max_position_embeddings));
      break;
    case RopeType::kYarn: {
      RETURN_IF_ERROR(only({"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                            "truncate", "mscale", "mscale_all_dim"}));
      s.original_max_position_embeddings = max_position_embeddings;
      RETURN_IF_ERROR(OptionalInt(r, where, "original_max_position_embeddings", &s.original_max_position_embeddings));
      // Transformers 5: an explicit factor wins; without one it is the ratio of the
      // post-YaRN to the pre-YaRN context.
      const double ratio = static_cast<double>(max_position_embeddings) / std::max(s.original_max_position_embeddings, 1);
      s.factor = ratio;
      RETURN_IF_ERROR(OptionalNumber(r, where, "factor", &s.factor));
      // Transformers 4.5x read the ratio instead whenever original_max_position_embeddings
      // was given: the two readings give other frequencies and attention scaling.
      const bool explicit_original = r.contains("original_max_position_embeddings") &&
                                     !r["original_max_position_embeddings"].is_null();
      if (explicit_original && r.contains("factor") && !r["factor"].is_null() && s.factor != ratio) {
        warnings->push_back(where + "factor = " + FormatNumber(s.factor) +
                            " differs from max_position_embeddings / original_max_position_embeddings = " +
                            std::to_string(max_position_embeddings) + " / " +
                            std::to_string(s.original_max_position_embeddings) + " = " + FormatNumber(ratio) +
                            "; read as Transformers 5 reads it (the factor, " + FormatNumber(s.factor) +
                            "), where Transformers 4.5x used the ratio");
      }
      RETURN_IF_ERROR(OptionalNumber(r, where, "beta_fast", &s.beta_fast));
      RETURN_IF_ERROR(OptionalNumber(r, where, "beta_slow", &s.beta_slow));
      RETURN_IF_ERROR(OptionalBool(r, where, "truncate", &s.truncate));
      RETURN_IF_ERROR(OptionalNumber(r, where, "attention_factor", &s.attention_factor));
      double mscale = 0, mscale_all_dim = 0;
      RETURN_IF_ERROR(OptionalNumber(r, where, "mscale", &mscale));
      RETURN_IF_ERROR(OptionalNumber(r, where, "mscale_all_dim", &mscale_all_dim));
      if (s.attention_factor == 0 && mscale != 0 && mscale_all_dim != 0) {
        auto get_mscale = [](double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
        s.attention_factor = get_mscale(s.factor, mscale) / get_mscale(s.factor, mscale_all_dim);
      }
      break;
    }
  }
  return OkStatus();
}

}  // namespace

StatusOr<ModelConfig> ReadHfConfig(const std::string& path) {
  ASSIGN_OR_RETURN(HfConfig c, ReadHfConfigAndType(path));
  return c.config;
}

StatusOr<HfConfig> ReadHfConfigAndType(const std::string& path) {
  ASSIGN_OR_RETURN(const std::string text, ReadRegularFile(path, path, kMaxJsonBytes));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return InvalidArgumentError(path + ": not a JSON object");
  const std::string where = path + ": ";
  HfConfig hf;
  ModelConfig c;
  auto need_int = [&](const char* key, int* out) -> Status {
    if (!j.contains(key) || j[key].is_null()) return InvalidArgumentError(where + "missing integer " + key);
    return OptionalInt(j, where, key, out);
  };
  // The architectures of the paper's Figure 1 that share Llama's block: Llama, Mistral
  // (within its sliding window), Qwen2/2.5 (q, k, v biases), Qwen3 (q_norm, k_norm).
  // Without model_type there is no architecture to read the keys as (Transformers'
  // AutoConfig refuses such a config too): it is refused, not taken for Llama.
  if (!j.contains("model_type") || j["model_type"].is_null()) {
    return InvalidArgumentError(where + "model_type is missing (llama, mistral, qwen2, qwen3 or glm); the keys "
                                "cannot be read without the architecture they belong to");
  }
  std::string type;
  {
    const bool known = j["model_type"].is_string() &&
                       (j["model_type"] == "llama" || j["model_type"] == "mistral" || j["model_type"] == "qwen2" ||
                        j["model_type"] == "qwen3" || j["model_type"] == "glm");
    if (!known) {
      std::string why = " is not supported (llama, mistral, qwen2, qwen3, glm)";
      if (j["model_type"] == "glm4") {
        why = " is not supported: GLM-4-0414's blocks add post_self_attn_layernorm and post_mlp_layernorm, which the "
              "engine's block lacks (glm, GLM-4-9B's, is supported)";
      }
      return InvalidArgumentError(where + "model_type " + Quoted(j["model_type"]) + why);
    }
    type = j["model_type"].get<std::string>();
  }
  // Qwen2Attention: bias on q, k, v, none on o; GlmAttention: the same, by attention_bias
  // (GlmConfig's default true).
  c.attention_bias = type == "qwen2";
  if (type == "glm") {
    c.attention_bias = true;
    RETURN_IF_ERROR(OptionalBool(j, where, "attention_bias", &c.attention_bias));
  }
  c.qk_norm = type == "qwen3";
  RETURN_IF_ERROR(need_int("num_hidden_layers", &c.layers));
  RETURN_IF_ERROR(need_int("hidden_size", &c.d_model));
  RETURN_IF_ERROR(need_int("num_attention_heads", &c.heads));
  RETURN_IF_ERROR(need_int("intermediate_size", &c.ffn));
  RETURN_IF_ERROR(need_int("vocab_size", &c.vocab));
  c.kv_heads = c.heads;
  RETURN_IF_ERROR(OptionalInt(j, where, "num_key_value_heads", &c.kv_heads));
  if (c.heads <= 0) return InvalidArgumentError(where + "num_attention_heads must be positive");
  c.head_dim = type == "qwen3" || type == "glm" ? 128 : c.d_model / c.heads;  // Qwen3Config's and GlmConfig's default
  RETURN_IF_ERROR(OptionalInt(j, where, "head_dim", &c.head_dim));
  // Each config class's default max_position_embeddings.
  c.context = type == "llama" ? 2048 : type == "mistral" || type == "glm" ? 131072 : 32768;
  RETURN_IF_ERROR(OptionalInt(j, where, "max_position_embeddings", &c.context));
  // RoPE: rope_theta at the top (Transformers 4) or inside rope_parameters (5), and the
  // scaling in rope_scaling (4) or rope_parameters (5). Two values that disagree, or a
  // scaling given twice, are refused rather than one silently chosen.
  c.rope_theta = 10000.0;
  double partial_inside = NAN;  // a partial_rotary_factor inside rope_parameters
  bool have_theta = j.contains("rope_theta") && !j["rope_theta"].is_null();
  RETURN_IF_ERROR(OptionalNumber(j, where, "rope_theta", &c.rope_theta));
  const bool have_scaling = j.contains("rope_scaling") && !j["rope_scaling"].is_null();
  const bool have_parameters = j.contains("rope_parameters") && !j["rope_parameters"].is_null();
  if (have_scaling && have_parameters) {
    return InvalidArgumentError(where + "rope_scaling and rope_parameters are both given; keep one");
  }
  if (have_scaling || have_parameters) {
    const char* key = have_scaling ? "rope_scaling" : "rope_parameters";
    double inside = 0;
    RETURN_IF_ERROR(ReadRopeObject(j[key], where + key + ".", c.context, &c, &inside, &partial_inside, &hf.warnings));
    if (inside != 0) {
      if (have_theta && inside != c.rope_theta) {
        return InvalidArgumentError(where + "rope_theta " + Quoted(j["rope_theta"]) + " and " + key +
                                    ".rope_theta " + Quoted(j[key]["rope_theta"]) + " disagree");
      }
      c.rope_theta = inside;
      have_theta = true;
    }
  }
  // GLM rotates part of each head (GlmConfig's default half): rotary_dim channels.
  double partial = type == "glm" ? 0.5 : 1.0;
  if (!std::isnan(partial_inside)) partial = partial_inside;
  RETURN_IF_ERROR(OptionalNumber(j, where, "partial_rotary_factor", &partial));
  if (!std::isnan(partial_inside) && partial != partial_inside) {  // as rope_theta's two places
    const char* key = have_scaling ? "rope_scaling" : "rope_parameters";
    return InvalidArgumentError(where + "partial_rotary_factor " + Quoted(j["partial_rotary_factor"]) + " and " + key +
                                ".partial_rotary_factor " + Quoted(j[key]["partial_rotary_factor"]) + " disagree");
  }
  if (partial != 1.0 && type != "glm") {
    return InvalidArgumentError(where + "partial_rotary_factor = " + FormatNumber(partial) +
                                " is not supported for model_type " + type + " (the whole head is rotated)");
  }
  if (!(partial > 0 && partial <= 1)) {
    return InvalidArgumentError(where + "partial_rotary_factor = " + FormatNumber(partial) + " must be in (0, 1]");
  }
  c.rotary_dim = static_cast<int>(c.head_dim * partial);  // Hugging Face: int(head_dim · factor)
  if (c.rotary_dim % 2 != 0) {
    return InvalidArgumentError(where + "partial_rotary_factor = " + FormatNumber(partial) + " gives " +
                                std::to_string(c.rotary_dim) + " rotated channels of head_dim " +
                                std::to_string(c.head_dim) + "; RoPE needs an even number");
  }
  if (c.rotary_dim == c.head_dim) c.rotary_dim = 0;  // all: the default
  c.rms_eps = type == "glm" ? 1.5625e-07 : 1e-6;  // GlmConfig's and LlamaConfig's defaults
  RETURN_IF_ERROR(OptionalNumber(j, where, "rms_norm_eps", &c.rms_eps));
  c.init_std = 0.02;
  RETURN_IF_ERROR(OptionalNumber(j, where, "initializer_range", &c.init_std));
  // Named here by the file's keys, with the value (Validate would name the engine's field).
  for (const auto& [key, value] : {std::pair<const char*, double>{"rope_theta", c.rope_theta},
                                   {"rms_norm_eps", c.rms_eps},
                                   {"initializer_range", c.init_std}}) {
    if (!(value > 0)) return InvalidArgumentError(where + key + " must be positive, got " + FormatNumber(value));
  }
  c.tied_embeddings = false;
  RETURN_IF_ERROR(OptionalBool(j, where, "tie_word_embeddings", &c.tied_embeddings));
  if (j.contains("hidden_act") && !j["hidden_act"].is_null() &&
      (!j["hidden_act"].is_string() || j["hidden_act"].get<std::string>() != "silu")) {
    return InvalidArgumentError(where + "hidden_act " + Quoted(j["hidden_act"]) + " is not supported (silu only)");
  }
  // Llama's and Qwen3's attention_bias puts a bias on o_proj too, which the engine lacks.
  for (const char* key : {"attention_bias", "mlp_bias", "use_sliding_window"}) {
    if (type == "glm" && std::string(key) == "attention_bias") continue;  // GLM's has no o_proj bias
    bool on = false;
    RETURN_IF_ERROR(OptionalBool(j, where, key, &on));
    if (on) return InvalidArgumentError(where + key + " = true is not supported");
  }
  if (j.contains("layer_types") && j["layer_types"].is_array()) {
    for (const auto& t : j["layer_types"]) {
      if (t != "full_attention") {
        return InvalidArgumentError(where + "layer_types holds " + Quoted(t) + " (only full_attention is supported)");
      }
    }
  }
  if (type == "mistral") {
    // Within its sliding window Mistral's attention is plain causal attention: probes
    // longer than the window are refused through model.context.
    int window = 4096;  // MistralConfig's default
    if (j.contains("sliding_window") && j["sliding_window"].is_null()) window = 0;  // null: no window
    RETURN_IF_ERROR(OptionalInt(j, where, "sliding_window", &window));
    if (window > 0 && window < c.context) {
      c.context = window;
      hf.context_limit = "Mistral's sliding_window in " + path +
                         ": past it each token attends to a window only, which the engine does not compute";
    }
  }
  std::string arm = "baseline";
  if (j.contains("sinkscope_vscale") && !j["sinkscope_vscale"].is_null()) {
    if (!j["sinkscope_vscale"].is_string()) {
      return InvalidArgumentError(where + "sinkscope_vscale must be a string, got " + Quoted(j["sinkscope_vscale"]));
    }
    arm = j["sinkscope_vscale"].get<std::string>();
  }
  if (!ParseVScaleMode(arm, &c.vscale)) {
    return InvalidArgumentError(where + "sinkscope_vscale \"" + arm + "\" is not a known arm");
  }
  // The attention arm of a sinkscope export (docs/design/ARMS.md "Checkpoints and export").
  for (const auto& [key, fallback] : {std::pair<const char*, const char*>{"sinkscope_attention", "softmax"},
                                      {"sinkscope_gate", "none"}}) {
    std::string name = fallback;
    if (j.contains(key) && !j[key].is_null()) {
      if (!j[key].is_string()) return InvalidArgumentError(where + key + " must be a string, got " + Quoted(j[key]));
      name = j[key].get<std::string>();
    }
    const bool known = std::string(key) == "sinkscope_attention" ? ParseAttentionKind(name, &c.attention)
                                                                 : ParseGateKind(name, &c.gate);
    if (!known) return InvalidArgumentError(where + key + " \"" + name + "\" is not known");
  }
  RETURN_IF_ERROR(OptionalNumber(j, where, "sinkscope_sink_logit_init", &c.sink_logit_init));
  RETURN_IF_ERROR(OptionalNumber(j, where, "sinkscope_sigmoid_bias", &c.sigmoid_bias));
  RETURN_IF_ERROR(OptionalNumber(j, where, "sinkscope_softpick_eps", &c.softpick_eps));
  c.vscale_sigma = 0;  // σ = initializer_range unless the export says otherwise
  RETURN_IF_ERROR(OptionalNumber(j, where, "sinkscope_vscale_sigma", &c.vscale_sigma));
  if (c.vscale_sigma == c.init_std) c.vscale_sigma = 0;
  if (Status s = c.Validate(); !s.ok()) return InvalidArgumentError(where + InHfTerms(s.message()));
  hf.config = c;
  hf.model_type = type;
  return hf;
}

namespace {

// Copies the tensors of `file` that the model has into `host` (by offset); records the
// names found. A misshapen tensor is an error naming it and both shapes.
Status CopyHfTensors(const Model& model, const SafetensorsFile& file, std::vector<float>& host,
                     std::set<std::string>& found) {
  for (const ParamTensor& t : model.tensors()) {
    auto it = file.tensors.find(t.name);
    if (it == file.tensors.end()) continue;
    if (it->second.shape != t.shape) {
      std::ostringstream os;
      os << "tensor " << t.name << " has shape [";
      for (size_t i = 0; i < it->second.shape.size(); ++i) os << (i ? ", " : "") << it->second.shape[i];
      os << "], expected [";
      for (size_t i = 0; i < t.shape.size(); ++i) os << (i ? ", " : "") << t.shape[i];
      os << "]";
      return InvalidArgumentError(os.str());
    }
    for (size_t i = 0; i < t.size; ++i) host[t.offset + i] = static_cast<float>(it->second.values[i]);
    found.insert(t.name);
  }
  return OkStatus();
}

// GLM's layout in the engine's: its fused gate_up_proj ([gate; up] rows) split in two,
// and the rows of q_proj and k_proj (weights and biases) permuted within each head so
// that GLM's rotated pairs — interleaved, (2i, 2i + 1) for i < rotary_dim/2 — become the
// engine's pairs (i, i + dh/2), and the channels GLM does not rotate fill the pairs whose
// frequency is 0. q and k are permuted alike, so every score q·k, and so attention and
// every norm the probes measure, is GLM's.
// Done on the tensors as stored: the halves of gate_up_proj are views of it, the permuted
// q and k rows new buffers.
Status GlmToEngineLayoutRaw(const ModelConfig& c, RawSafetensors& file) {
  const int dh = c.head_dim, rd = c.rotary_dim > 0 ? c.rotary_dim : dh, half = dh / 2, pass_low = half - rd / 2;
  std::vector<int> to(dh);
  for (int i = 0; i < rd / 2; ++i) {
    to[2 * i] = i;
    to[2 * i + 1] = i + half;
  }
  for (int k = 0; k < dh - rd; ++k) to[rd + k] = k < pass_low ? rd / 2 + k : half + rd / 2 + (k - pass_low);
  std::map<std::string, RawTensor> out;
  const std::string fused = ".mlp.gate_up_proj.weight";
  for (auto& [name, t] : file.tensors) {
    if (name.size() > fused.size() && name.compare(name.size() - fused.size(), fused.size(), fused) == 0) {
      if (t.shape.size() != 2 || t.shape[0] != 2 * static_cast<int64_t>(c.ffn)) {
        return InvalidArgumentError("tensor " + name + " should have 2 · intermediate_size = " +
                                    std::to_string(2 * c.ffn) + " rows");
      }
      const std::string base = name.substr(0, name.size() - fused.size()) + ".mlp.";
      RawTensor gate = t, up = t;
      gate.shape[0] = up.shape[0] = c.ffn;
      gate.bytes = up.bytes = t.bytes / 2;
      up.data = t.data + t.bytes / 2;
      out[base + "gate_proj.weight"] = gate;
      out[base + "up_proj.weight"] = up;
      continue;
    }
    const bool qk = name.find(".self_attn.q_proj.") != std::string::npos ||
                    name.find(".self_attn.k_proj.") != std::string::npos;
    if (qk && !t.shape.empty() && t.shape[0] % dh == 0) {
      const size_t row = t.bytes / static_cast<size_t>(t.shape[0]);
      std::string& moved = file.owned.emplace_back(t.bytes, '\0');
      for (int64_t r = 0; r < t.shape[0]; ++r) {
        const int64_t dest = r / dh * dh + to[r % dh];
        std::memcpy(moved.data() + dest * row, t.data + r * row, row);
      }
      t.data = moved.data();
    }
    out[name] = t;
  }
  file.tensors = std::move(out);
  return OkStatus();
}

Status NonFiniteError(const std::string& tensor, size_t index, double stored, size_t numel) {
  const std::string what = std::isnan(stored)    ? "NaN"
                           : std::isinf(stored) ? (stored > 0 ? "+inf" : "-inf")
                                                : FormatNumber(stored) + " (beyond float32's range)";
  return InvalidArgumentError("tensor " + tensor + " holds " + what + " at element " + std::to_string(index) + " of " +
                              std::to_string(numel) + ": a model with weights that are not finite has no loss or "
                              "measurement to report");
}

// Copies the tensors of `file` the model has, each as it is held: 16-bit matrices of the
// model's dtype as they are, everything else through fp32.
Status CopyRawTensors(Model& model, const RawSafetensors& file, std::set<std::string>& found) {
  const std::string held = model.matrices() == WeightDtype::kBF16 ? "BF16" : "F16";
  for (const ParamTensor& t : model.tensors()) {
    auto it = file.tensors.find(t.name);
    if (it == file.tensors.end()) continue;
    const RawTensor& r = it->second;
    if (r.shape != t.shape) {
      std::ostringstream os;
      os << "tensor " << t.name << " has shape [";
      for (size_t i = 0; i < r.shape.size(); ++i) os << (i ? ", " : "") << r.shape[i];
      os << "], expected [";
      for (size_t i = 0; i < t.shape.size(); ++i) os << (i ? ", " : "") << t.shape[i];
      os << "]";
      return InvalidArgumentError(os.str());
    }
    // A weight that is NaN or ±inf makes every measurement NaN: refused before the pass.
    if (model.Holds16(t) && r.dtype == held) {
      if (const int64_t bad = FirstNonFinite(r); bad >= 0) return NonFiniteError(t.name, bad, RawValue(r, bad), t.size);
      model.SetTensor16(t, r.data);
    } else {
      std::vector<float> values(t.size);
      for (size_t i = 0; i < t.size; ++i) {
        values[i] = static_cast<float>(RawValue(r, i));
        if (!std::isfinite(values[i])) return NonFiniteError(t.name, i, RawValue(r, i), t.size);
      }
      model.SetTensor(t, values.data());
    }
    found.insert(t.name);
  }
  return OkStatus();
}

Status CheckAllFound(const Model& model, const std::set<std::string>& found) {
  for (const ParamTensor& t : model.tensors()) {
    if (found.count(t.name) || t.name.find("vscale_theta") != std::string::npos) continue;  // θ absent: 0
    return InvalidArgumentError("weights lack tensor " + t.name);
  }
  return OkStatus();
}

}  // namespace

Status LoadHfWeights(Model& model, const SafetensorsFile& file) {
  std::vector<float> host(model.slab_floats(), 0.0f);
  std::set<std::string> found;
  RETURN_IF_ERROR(CopyHfTensors(model, file, host, found));
  RETURN_IF_ERROR(CheckAllFound(model, found));
  model.ParamsFromHost(host);
  return OkStatus();
}

StatusOr<std::vector<std::string>> ReadHfShardIndex(const std::string& index_path) {
  ASSIGN_OR_RETURN(const std::string text, ReadRegularFile(index_path, index_path, kMaxJsonBytes));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
    return InvalidArgumentError(index_path + ": not a safetensors index (no \"weight_map\" object)");
  }
  std::vector<std::string> shards;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string()) {
      return InvalidArgumentError(index_path + ": weight_map." + it.key() + " must name a file, got " +
                                  it.value().dump());
    }
    const std::string shard = it.value().get<std::string>();
    if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
      return InvalidArgumentError(index_path + ": weight_map." + it.key() + " names \"" + shard +
                                  "\", not a file in the folder");
    }
    if (std::find(shards.begin(), shards.end(), shard) == shards.end()) shards.push_back(shard);
  }
  std::sort(shards.begin(), shards.end());
  if (shards.empty()) return InvalidArgumentError(index_path + ": weight_map is empty");
  return shards;
}

namespace {

// A tensor as stored, to tell whether two in different shards hold the same bytes.
struct StoredFingerprint {
  std::string file, dtype;
  std::vector<int64_t> shape;
  uint64_t hash = 0;
  bool seen = false;
  bool operator==(const StoredFingerprint& o) const { return dtype == o.dtype && shape == o.shape && hash == o.hash; }
};
StoredFingerprint Fingerprint(const std::string& file, const RawTensor& t) {
  return {file, t.dtype, t.shape, XXH3_64bits(t.data, t.bytes), true};
}

// A Hugging Face folder into a new model, one shard in memory at a time, as stored.
// `keep_16bit` (probing): the 2-D weights stay in the dtype the files hold them in.
StatusOr<std::unique_ptr<Model>> LoadHfFolder(const std::string& dir, Backend* backend, ModelOptions options,
                                              bool keep_16bit, std::vector<std::string>* warnings) {
  ASSIGN_OR_RETURN(HfConfig hf, ReadHfConfigAndType(dir + "/config.json"));
  const std::string single = dir + "/model.safetensors", index = dir + "/model.safetensors.index.json";
  std::error_code ec;
  std::vector<std::string> files = {single};
  const bool sharded = !std::filesystem::exists(single, ec) && std::filesystem::exists(index, ec);
  if (sharded) {  // as large models ship
    ASSIGN_OR_RETURN(std::vector<std::string> shards, ReadHfShardIndex(index));
    files.clear();
    for (const std::string& shard : shards) files.push_back(dir + "/" + shard);
  }
  // The first shard says how the weights are held (the embedding's dtype when present).
  ASSIGN_OR_RETURN(std::unique_ptr<RawSafetensors> first, ReadSafetensorsRaw(files[0]));
  if (keep_16bit && !options.training) {
    for (const auto& [name, t] : first->tensors) {
      if (t.shape.size() != 2) continue;
      options.matrices = t.dtype == "BF16" ? WeightDtype::kBF16 : t.dtype == "F16" ? WeightDtype::kF16 : WeightDtype::kF32;
      if (name == "model.embed_tokens.weight") break;
    }
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Create(hf.config, backend, options));
  std::set<std::string> found;
  StoredFingerprint head, embed;
  for (size_t i = 0; i < files.size(); ++i) {
    std::unique_ptr<RawSafetensors> file = std::move(first);
    if (i > 0) {
      ASSIGN_OR_RETURN(file, ReadSafetensorsRaw(files[i]));
    }
    Status s = hf.model_type == "glm" ? GlmToEngineLayoutRaw(hf.config, *file) : OkStatus();
    if (s.ok()) s = CopyRawTensors(*model, *file, found);
    if (!s.ok()) return Status(s.code(), files[i] + ": " + s.message());
    if (hf.config.tied_embeddings) {  // the model has no head of its own: the file's is not read
      for (auto [name, print] : {std::pair{"lm_head.weight", &head}, std::pair{"model.embed_tokens.weight", &embed}}) {
        auto it = file->tensors.find(name);
        if (it != file->tensors.end()) *print = Fingerprint(files[i], it->second);
      }
    }
  }
  if (head.seen && !(head == embed)) {
    hf.warnings.push_back(head.file + ": tie_word_embeddings is true, so tensor lm_head.weight is ignored: it differs "
                          "from model.embed_tokens.weight, which is the head (as Transformers' tie_weights makes it)");
  }
  if (Status s = CheckAllFound(*model, found); !s.ok()) {
    return Status(s.code(), (sharded ? index : single) + ": " + s.message());
  }
  for (const ParamTensor& t : model->tensors()) {  // θ, when the files have none, is 0
    if (!found.count(t.name)) model->SetTensor(t, std::vector<float>(t.size, 0.0f).data());
  }
  for (const std::string& w : hf.warnings) {
    if (warnings != nullptr) {
      warnings->push_back(w);
    } else {
      Log(LogLevel::kWarning, "hf_folder_read", {{"warning", w}});
    }
  }
  return model;
}

}  // namespace

StatusOr<std::unique_ptr<Model>> LoadHfModel(const std::string& dir, Backend* backend, ModelOptions options,
                                             std::vector<std::string>* warnings) {
  return LoadHfFolder(dir, backend, options, /*keep_16bit=*/false, warnings);
}

StatusOr<std::unique_ptr<Model>> LoadHfModelForProbing(const std::string& dir, Backend* backend, bool recompute_blocks,
                                                       std::vector<std::string>* warnings) {
  return LoadHfFolder(dir, backend, ModelOptions{.training = false, .recompute_blocks = recompute_blocks},
                      /*keep_16bit=*/true, warnings);
}

nlohmann::json RopeScalingToHf(const RopeScaling& s) {
  switch (s.type) {
    case RopeType::kDefault: return nullptr;
    case RopeType::kLinear: return {{"rope_type", "linear"}, {"factor", s.factor}};
    case RopeType::kLlama3:
      return {{"rope_type", "llama3"},
              {"factor", s.factor},
              {"low_freq_factor", s.low_freq_factor},
              {"high_freq_factor", s.high_freq_factor},
              {"original_max_position_embeddings", s.original_max_position_embeddings}};
    case RopeType::kYarn: {
      nlohmann::json j = {{"rope_type", "yarn"},
                          {"factor", s.factor},
                          {"original_max_position_embeddings", s.original_max_position_embeddings},
                          {"beta_fast", s.beta_fast},
                          {"beta_slow", s.beta_slow},
                          {"truncate", s.truncate}};
      if (s.attention_factor > 0) j["attention_factor"] = s.attention_factor;
      return j;
    }
  }
  return nullptr;
}

Status ExportHf(const Model& model, const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return InternalError("cannot create " + dir + ": " + ec.message());
  const ModelConfig& c = model.config();
  if (c.qk_norm && c.attention_bias) {
    return InvalidArgumentError("a model with both q/k/v biases and q/k norms has no Hugging Face architecture");
  }
  if (c.rotary_dim != 0 && c.rotary_dim != c.head_dim) {
    return InvalidArgumentError("a model with rotary_dim " + std::to_string(c.rotary_dim) + " of head_dim " +
                                std::to_string(c.head_dim) + " (GLM's partial RoPE) is not exported (the engine "
                                "holds GLM's q and k channels in its own order)");
  }
  const std::vector<float> host = model.ParamsToHost();
  std::vector<TensorToWrite> tensors;
  for (const ParamTensor& t : model.tensors()) {
    if (c.vscale == VScaleMode::kNone && t.name.find("vscale_theta") != std::string::npos) continue;
    tensors.push_back({t.name, t.shape, host.data() + t.offset});
  }
  RETURN_IF_ERROR(WriteSafetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}}));
  nlohmann::json j = {
      {"architectures", {c.qk_norm ? "Qwen3ForCausalLM" : c.attention_bias ? "Qwen2ForCausalLM" : "LlamaForCausalLM"}},
      {"model_type", c.qk_norm ? "qwen3" : c.attention_bias ? "qwen2" : "llama"},
      {"rope_scaling", RopeScalingToHf(c.rope_scaling)},
      {"hidden_act", "silu"},
      {"mlp_bias", false},
      {"torch_dtype", "float32"},
      {"sinkscope_vscale", VScaleModeName(c.vscale)},
  };
  // The plain fields under their Hugging Face keys (engine/config.h's list).
#define SINKSCOPE_FIELD_TO_HF(type, name, value, hf, required) \
  if (std::string(hf).size() > 0) j[hf] = c.name;
  SINKSCOPE_MODEL_FIELDS(SINKSCOPE_FIELD_TO_HF)
#undef SINKSCOPE_FIELD_TO_HF
  if (c.VScaleSigma() != c.init_std) j["sinkscope_vscale_sigma"] = c.VScaleSigma();
  if (c.HasAttentionArm()) {  // Hugging Face's Llama ignores these keys and cannot run these arms
    j["sinkscope_attention"] = AttentionKindName(c.attention);
    j["sinkscope_gate"] = GateKindName(c.gate);
    j["sinkscope_sink_logit_init"] = c.sink_logit_init;
    j["sinkscope_sigmoid_bias"] = c.sigmoid_bias;
    j["sinkscope_softpick_eps"] = c.softpick_eps;
  }
  if (!c.attention_bias) j["attention_bias"] = false;  // Qwen2 has no such key: its biases are always on
  return WriteFileAtomically(dir + "/config.json", j.dump(1) + "\n");
}

}  // namespace sinkscope

// Hugging Face LlamaForCausalLM interchange: config.json + model.safetensors.
// V-scale θ is stored per layer under `model.layers.{i}.self_attn.vscale_theta`
// (shape [kv_heads]) and the arm under config.json's "sinkscope_vscale"
// ("baseline" | "vscale" | "vscale_backward_only"); Hugging Face ignores both.
// The attention arms (docs/design/ARMS.md) add `self_attn.sinks` [heads],
// `self_attn.output_gate.weight` [heads·head_dim or heads, hidden] or
// `self_attn.value_gate.weight` [kv_heads·head_dim, hidden], and config.json's
// "sinkscope_attention", "sinkscope_gate", "sinkscope_sink_logit_init",
// "sinkscope_sigmoid_bias", "sinkscope_softpick_eps". Transformers' Llama would ignore
// them and compute another model: such an export is for sinkscope to read back.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/model.h"
#include "training/safetensors.h"

namespace sinkscope {

// Reads a config.json with Hugging Face's semantics (each model_type's defaults,
// rope_theta at the top or in rope_parameters, rope_scaling types default, linear, llama3
// and yarn); INVALID_ARGUMENT names an unsupported or inconsistent key and its value: no
// model_type, a value given at the top and in rope_parameters that disagree (rope_theta,
// partial_rotary_factor), a value out of range under the file's key (rms_norm_eps).
StatusOr<ModelConfig> ReadHfConfig(const std::string& config_json_path);
// The same with the model_type it was read as ("llama", "mistral", "qwen2", "qwen3",
// "glm"): the weights' layout follows it (GLM's fused gate_up_proj, interleaved RoPE).
struct HfConfig {
  ModelConfig config;
  std::string model_type;
  // What bounds config.context, for messages: "" for max_position_embeddings, or what
  // lowered it (Mistral's sliding window).
  std::string context_limit;
  // What was read one way where Transformers has read it two (yarn's factor against
  // the ratio of its context lengths), each naming the file, keys and values.
  std::vector<std::string> warnings;
};
StatusOr<HfConfig> ReadHfConfigAndType(const std::string& config_json_path);
// The rope_scaling object Hugging Face reads back (null for the default).
nlohmann::json RopeScalingToHf(const RopeScaling& scaling);
// The shard files named by a model.safetensors.index.json, sorted, each once.
StatusOr<std::vector<std::string>> ReadHfShardIndex(const std::string& index_path);
// Copies weights by Hugging Face name; a missing or misshapen tensor is an error naming
// it. θ may be absent (it is then 0).
Status LoadHfWeights(Model& model, const SafetensorsFile& file);
// Loads `dir`/config.json and `dir`/model.safetensors (or, when that is absent, the
// shards listed by `dir`/model.safetensors.index.json) into a new model. A weight that
// is NaN or ±inf is refused naming the file, the tensor and the element. `warnings`
// receives the config's (HfConfig::warnings) and the folder's (an lm_head.weight that
// tie_word_embeddings makes it ignore, when it differs from the embedding); without it
// they are logged (base/log.h, level warn).
StatusOr<std::unique_ptr<Model>> LoadHfModel(const std::string& dir, Backend* backend, ModelOptions options = {},
                                             std::vector<std::string>* warnings = nullptr);
// The same for probing (no gradients or optimizer state): the 2-D weights kept in the
// dtype the files store them in (bf16 or f16: 2 B per parameter, widened one block at a
// time), one shard in memory at a time, as stored. The pass equals LoadHfModel's.
StatusOr<std::unique_ptr<Model>> LoadHfModelForProbing(const std::string& dir, Backend* backend,
                                                       bool recompute_blocks = false,
                                                       std::vector<std::string>* warnings = nullptr);
// Writes `dir`/model.safetensors and `dir`/config.json (θ only for V-scale arms).
Status ExportHf(const Model& model, const std::string& dir);

}  // namespace sinkscope

#include "worker/hf.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace sinkscope {

StatusOr<ModelConfig> ReadHfConfig(const std::string& path) {
  std::ifstream in(path);
  if (!in) return NotFoundError(path + ": no such file");
  nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return InvalidArgumentError(path + ": not a JSON object");
  ModelConfig c;
  auto need_int = [&](const char* key, int* out) -> Status {
    if (!j.contains(key) || !j[key].is_number_integer()) return InvalidArgumentError(path + ": missing integer " + key);
    *out = j[key].get<int>();
    return OkStatus();
  };
  if (j.value("model_type", std::string("llama")) != "llama") {
    return InvalidArgumentError(path + ": model_type " + j["model_type"].dump() + " is not supported (llama only)");
  }
  RETURN_IF_ERROR(need_int("num_hidden_layers", &c.layers));
  RETURN_IF_ERROR(need_int("hidden_size", &c.d_model));
  RETURN_IF_ERROR(need_int("num_attention_heads", &c.heads));
  RETURN_IF_ERROR(need_int("intermediate_size", &c.ffn));
  RETURN_IF_ERROR(need_int("vocab_size", &c.vocab));
  c.kv_heads = j.value("num_key_value_heads", c.heads);
  c.head_dim = j.contains("head_dim") && j["head_dim"].is_number_integer() ? j["head_dim"].get<int>()
                                                                         : c.d_model / c.heads;
  c.context = j.value("max_position_embeddings", 1024);
  c.rope_theta = j.value("rope_theta", 10000.0);
  c.rms_eps = j.value("rms_norm_eps", 1e-6);
  c.init_std = j.value("initializer_range", 0.02);
  c.tied_embeddings = j.value("tie_word_embeddings", false);
  if (j.value("hidden_act", std::string("silu")) != "silu") {
    return InvalidArgumentError(path + ": hidden_act must be silu");
  }
  if (j.value("attention_bias", false) || j.value("mlp_bias", false)) {
    return InvalidArgumentError(path + ": attention_bias and mlp_bias are not supported");
  }
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    return InvalidArgumentError(path + ": rope_scaling is not supported");
  }
  const std::string arm = j.value("sinkscope_vscale", std::string("baseline"));
  if (!ParseVScaleMode(arm, &c.vscale)) {
    return InvalidArgumentError(path + ": sinkscope_vscale \"" + arm + "\" is not a known arm");
  }
  if (Status s = c.Validate(); !s.ok()) return InvalidArgumentError(path + ": " + s.message());
  return c;
}

Status LoadHfWeights(Model& model, const SafetensorsFile& file) {
  std::vector<float> host(model.num_params(), 0.0f);
  for (const ParamTensor& t : model.tensors()) {
    auto it = file.tensors.find(t.name);
    if (it == file.tensors.end()) {
      if (t.name.find("vscale_theta") != std::string::npos) continue;  // θ absent: 0
      return InvalidArgumentError("weights lack tensor " + t.name);
    }
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
  }
  model.ParamsFromHost(host);
  return OkStatus();
}

StatusOr<std::unique_ptr<Model>> LoadHfModel(const std::string& dir, Backend* backend) {
  ASSIGN_OR_RETURN(ModelConfig config, ReadHfConfig(dir + "/config.json"));
  ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Create(config, backend));
  ASSIGN_OR_RETURN(SafetensorsFile file, ReadSafetensors(dir + "/model.safetensors"));
  if (Status s = LoadHfWeights(*model, file); !s.ok()) {
    return Status(s.code(), dir + "/model.safetensors: " + s.message());
  }
  return model;
}

Status ExportHf(const Model& model, const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return InternalError("cannot create " + dir + ": " + ec.message());
  const ModelConfig& c = model.config();
  const std::vector<float> host = model.ParamsToHost();
  std::vector<TensorToWrite> tensors;
  for (const ParamTensor& t : model.tensors()) {
    if (c.vscale == VScaleMode::kNone && t.name.find("vscale_theta") != std::string::npos) continue;
    tensors.push_back({t.name, t.shape, host.data() + t.offset});
  }
  RETURN_IF_ERROR(WriteSafetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}}));
  nlohmann::json j = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"vocab_size", c.vocab},
      {"hidden_size", c.d_model},
      {"intermediate_size", c.ffn},
      {"num_hidden_layers", c.layers},
      {"num_attention_heads", c.heads},
      {"num_key_value_heads", c.kv_heads},
      {"head_dim", c.head_dim},
      {"rms_norm_eps", c.rms_eps},
      {"rope_theta", c.rope_theta},
      {"max_position_embeddings", c.context},
      {"tie_word_embeddings", c.tied_embeddings},
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"mlp_bias", false},
      {"initializer_range", c.init_std},
      {"torch_dtype", "float32"},
      {"sinkscope_vscale", VScaleModeName(c.vscale)},
  };
  return WriteFileAtomically(dir + "/config.json", j.dump(1) + "\n");
}

}  // namespace sinkscope

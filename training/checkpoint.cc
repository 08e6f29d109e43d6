#include "training/checkpoint.h"

#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "data/data.h"
#include "training/safetensors.h"

namespace sinkscope {
namespace {

constexpr char kMagic[8] = {'S', 'I', 'N', 'K', 'C', 'K', 'P', 'T'};

// Format 1's checksum: FNV-1a, one multiply per byte. Its offset basis is FNV's
// 14695981039346656037 short of the last digit, as format 1 was written; it still
// detects a changed byte, and must stay as it is to read those files.
uint64_t Fnv1a(const char* data, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) {
    h ^= static_cast<unsigned char>(data[i]);
    h *= 1099511628211ull;
  }
  return h;
}

// Whether the float32 at `p` (any alignment) is NaN or ±inf: all exponent bits set.
inline bool NonFiniteAt(const char* p) {
  constexpr uint32_t kExponent = 0x7f800000u;
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  return (bits & kExponent) == kExponent;
}

// The index of the first of `n` floats at `data` that is NaN or ±inf; n when every one is
// finite. Counted a fixed-size block at a time, which the compiler vectorizes (about
// 25 GB/s here, against 6 for the plain search), then searched one by one from the
// first block that has one.
size_t FirstNonFiniteFloat(const char* data, size_t n) {
  constexpr size_t kBlock = 4096;
  size_t start = 0;
  for (; start + kBlock <= n; start += kBlock) {
    const char* block = data + 4 * start;
    uint32_t found = 0;
    for (size_t i = 0; i < kBlock; ++i) found += NonFiniteAt(block + 4 * i);
    if (found != 0) break;
  }
  for (size_t i = start; i < n; ++i) {
    if (NonFiniteAt(data + 4 * i)) return i;
  }
  return n;
}

// A NaN or ±inf among the model's parameters (or one of AdamW's moments), as stored in
// the payload: an error naming `what` ("tensor", "AdamW's first moment (m) of tensor"),
// the tensor and the element.
Status CheckFinite(const std::string& path, const Model& model, const char* values, const std::string& what) {
  const size_t n = model.num_params();
  const size_t bad = FirstNonFiniteFloat(values, n);
  if (bad == n) return OkStatus();
  float v;
  std::memcpy(&v, values + 4 * bad, 4);
  const std::string value = std::isnan(v) ? "NaN" : v > 0 ? "+inf" : "-inf";
  for (const ParamTensor& t : model.tensors()) {
    if (bad < t.packed_offset || bad >= t.packed_offset + t.size) continue;
    return DataLossError("checkpoint " + path + ": " + what + " " + t.name + " holds " + value +
                         " at element " + std::to_string(bad - t.packed_offset) + " of " + std::to_string(t.size) +
                         " (a run does not save values that are not finite: the file was damaged or made elsewhere)");
  }
  return DataLossError("checkpoint " + path + ": " + value + " at parameter " + std::to_string(bad));  // past every tensor
}

// Every field of RopeScaling (a pretrained model's; training runs use the default).
nlohmann::json RopeScalingToJson(const RopeScaling& r) {
  return {{"type", RopeTypeName(r.type)},
          {"factor", r.factor},
          {"low_freq_factor", r.low_freq_factor},
          {"high_freq_factor", r.high_freq_factor},
          {"original_max_position_embeddings", r.original_max_position_embeddings},
          {"beta_fast", r.beta_fast},
          {"beta_slow", r.beta_slow},
          {"attention_factor", r.attention_factor},
          {"truncate", r.truncate}};
}

struct Parsed {
  nlohmann::json header;
  std::string bytes;
  size_t payload_offset = 0;
};

StatusOr<Parsed> ReadAndVerify(const std::string& path) {
  Parsed p;
  ASSIGN_OR_RETURN(p.bytes, ReadRegularFile(path, "checkpoint " + path));
  const std::string& b = p.bytes;
  if (b.size() < 24 + 8 || std::memcmp(b.data(), kMagic, 8) != 0) {
    return DataLossError("checkpoint " + path + ": not a sinkscope checkpoint (bad magic or too short)");
  }
  uint32_t version;
  std::memcpy(&version, b.data() + 8, 4);
  if (version != kCheckpointVersion && version != 1) {
    return DataLossError("checkpoint " + path + ": format version " + std::to_string(version) + ", this build reads 1 to " +
                         std::to_string(kCheckpointVersion));
  }
  uint64_t stored_sum;
  std::memcpy(&stored_sum, b.data() + b.size() - 8, 8);
  if (CheckpointChecksum(version, b.data(), b.size() - 8) != stored_sum) {
    return DataLossError("checkpoint " + path + ": checksum mismatch (the file is corrupt or truncated)");
  }
  uint64_t header_len;
  std::memcpy(&header_len, b.data() + 16, 8);
  if (24 + header_len > b.size() - 8) return DataLossError("checkpoint " + path + ": header length out of range");
  p.header = nlohmann::json::parse(b.substr(24, header_len), nullptr, false);
  if (p.header.is_discarded()) return DataLossError("checkpoint " + path + ": header is not JSON");
  p.payload_offset = 24 + header_len;
  return p;
}

}  // namespace

uint64_t CheckpointChecksum(uint32_t version, const char* data, size_t n) {
  return version == 1 ? Fnv1a(data, n) : XXH3_64bits(data, n);
}

nlohmann::json ModelConfigToJson(const ModelConfig& c) {
  nlohmann::json j;
#define SINKSCOPE_FIELD_TO_JSON(type, name, value, hf, required) j[#name] = c.name;
  SINKSCOPE_MODEL_FIELDS(SINKSCOPE_FIELD_TO_JSON)
#undef SINKSCOPE_FIELD_TO_JSON
  j["vscale"] = VScaleModeName(c.vscale);
  // The attention arm (docs/design/ARMS.md): part of the config a checkpoint must match,
  // so one arm's checkpoint never loads as another's.
  j["attention"] = AttentionKindName(c.attention);
  j["gate"] = GateKindName(c.gate);
  j["rope_scaling"] = RopeScalingToJson(c.rope_scaling);
  return j;
}

StatusOr<ModelConfig> ModelConfigFromJson(const nlohmann::json& j) {
  ModelConfig c;
  try {
    // A field that is not required may be absent from checkpoints written before it
    // existed: it takes its default (Llama's, for the architecture flags).
#define SINKSCOPE_FIELD_FROM_JSON(type, name, def, hf, required) \
  c.name = required ? j.at(#name).get<type>() : j.value(#name, static_cast<type>(def));
    SINKSCOPE_MODEL_FIELDS(SINKSCOPE_FIELD_FROM_JSON)
#undef SINKSCOPE_FIELD_FROM_JSON
    // Headers from before σ followed init_std by default hold σ itself: the same model
    // when the two agree.
    if (c.vscale_sigma == c.init_std) c.vscale_sigma = 0;
    if (j.contains("rope_scaling")) {  // absent in checkpoints written before it existed: default
      const nlohmann::json& r = j.at("rope_scaling");
      RopeScaling& s = c.rope_scaling;
      const std::string type = r.at("type");
      if (!ParseRopeType(type, &s.type)) return DataLossError("unknown rope_scaling type " + type);
      s.factor = r.at("factor");
      s.low_freq_factor = r.at("low_freq_factor");
      s.high_freq_factor = r.at("high_freq_factor");
      s.original_max_position_embeddings = r.at("original_max_position_embeddings");
      s.beta_fast = r.at("beta_fast");
      s.beta_slow = r.at("beta_slow");
      s.attention_factor = r.at("attention_factor");
      s.truncate = r.at("truncate");
    }
    const std::string arm = j.at("vscale");
    if (!ParseVScaleMode(arm, &c.vscale)) return DataLossError("unknown arm " + arm);
    // Absent in checkpoints written before the attention arms: softmax, no gate.
    const std::string attention = j.value("attention", std::string("softmax"));
    if (!ParseAttentionKind(attention, &c.attention)) return DataLossError("unknown attention " + attention);
    const std::string gate = j.value("gate", std::string("none"));
    if (!ParseGateKind(gate, &c.gate)) return DataLossError("unknown gate " + gate);
  } catch (const nlohmann::json::exception& e) {
    return DataLossError(std::string("model config: ") + e.what());
  }
  return c;
}


Status SaveCheckpoint(const std::string& path, const Model& model, const TrainingState& state) {
  if (!model.training()) {
    return FailedPreconditionError("checkpoint " + path + ": a model made for probing has no optimizer state to save");
  }
  const Model& m = model;
  const size_t n = model.num_params();
  nlohmann::json header = {{"model", ModelConfigToJson(model.config())},
                           {"step", state.step},
                           {"seed", state.seed},
                           {"data_counter", state.data_counter},
                           {"num_params", n}};
  const std::string h = header.dump();
  std::string bytes(kMagic, 8);
  const uint32_t version = kCheckpointVersion, zero = 0;
  const uint64_t len = h.size();
  bytes.append(reinterpret_cast<const char*>(&version), 4);
  bytes.append(reinterpret_cast<const char*>(&zero), 4);
  bytes.append(reinterpret_cast<const char*>(&len), 8);
  bytes += h;
  // The payload holds the tensors back to back (ParamTensor::packed_offset), not the
  // buffer's aligned layout, so a checkpoint does not depend on the alignment.
  std::vector<float> host(m.slab_floats());
  for (float* buf : {m.params(), m.adam_m(), m.adam_v()}) {
    m.backend()->ToHost(host.data(), buf, host.size() * sizeof(float));
    for (const ParamTensor& t : m.tensors()) {
      bytes.append(reinterpret_cast<const char*>(host.data() + t.offset), t.size * sizeof(float));
    }
  }
  const uint64_t sum = CheckpointChecksum(kCheckpointVersion, bytes.data(), bytes.size());
  bytes.append(reinterpret_cast<const char*>(&sum), 8);
  return WriteFileAtomically(path, bytes);
}

StatusOr<ModelConfig> ReadCheckpointConfig(const std::string& path) {
  ASSIGN_OR_RETURN(Parsed p, ReadAndVerify(path));
  auto c = ModelConfigFromJson(p.header["model"]);
  if (!c.ok()) return DataLossError("checkpoint " + path + ": " + c.status().message());
  return c;
}

StatusOr<TrainingState> LoadCheckpoint(const std::string& path, Model& model) {
  ASSIGN_OR_RETURN(Parsed p, ReadAndVerify(path));
  auto c = ModelConfigFromJson(p.header["model"]);
  if (!c.ok()) return DataLossError("checkpoint " + path + ": " + c.status().message());
  if (ModelConfigToJson(*c) != ModelConfigToJson(model.config())) {
    return FailedPreconditionError("checkpoint " + path + ": its model config " + ModelConfigToJson(*c).dump() +
                                   " differs from the run's " + ModelConfigToJson(model.config()).dump());
  }
  const size_t n = model.num_params();
  if (p.header.value("num_params", size_t{0}) != n || p.payload_offset + 3 * n * sizeof(float) + 8 != p.bytes.size()) {
    return DataLossError("checkpoint " + path + ": payload size does not match " + std::to_string(n) + " parameters");
  }
  const char* payload = p.bytes.data() + p.payload_offset;
  // Weights that are not finite would make every step and probe NaN: refused by name.
  RETURN_IF_ERROR(CheckFinite(path, model, payload, "tensor"));
  if (model.training()) {
    RETURN_IF_ERROR(CheckFinite(path, model, payload + n * sizeof(float), "AdamW's first moment (m) of tensor"));
    RETURN_IF_ERROR(CheckFinite(path, model, payload + 2 * n * sizeof(float), "AdamW's second moment (v) of tensor"));
  }
  Backend* be = model.backend();
  // Packed tensors (ParamTensor::packed_offset) into the buffer's aligned layout.
  std::vector<float> host(model.slab_floats(), 0.0f);
  auto unpack = [&](const char* packed) {
    for (const ParamTensor& t : model.tensors()) {
      std::memcpy(host.data() + t.offset, packed + t.packed_offset * sizeof(float), t.size * sizeof(float));
    }
  };
  unpack(payload);
  model.ParamsFromHost(host);
  if (model.training()) {  // a model made for probing keeps the parameters only
    unpack(payload + n * sizeof(float));
    be->ToDevice(model.adam_m(), host.data(), host.size() * sizeof(float));
    unpack(payload + 2 * n * sizeof(float));
    be->ToDevice(model.adam_v(), host.data(), host.size() * sizeof(float));
  }
  TrainingState s;
  s.step = p.header.value("step", int64_t{0});
  s.seed = p.header.value("seed", uint64_t{0});
  s.data_counter = p.header.value("data_counter", uint64_t{0});
  return s;
}

std::vector<std::string> RemoveStaleTempFiles(const std::string& dir) {
  static const char* const kOurs[] = {"checkpoint.bin", "metrics.jsonl", "probes.jsonl", "hf/config.json",
                                      "hf/model.safetensors"};
  std::vector<std::string> removed;
  for (const char* name : kOurs) {
    const std::filesystem::path file = std::filesystem::path(dir) / name;
    const std::string prefix = file.filename().string() + ".tmp.";
    std::error_code ec;
    for (std::filesystem::directory_iterator it(file.parent_path(), ec), end; !ec && it != end; it.increment(ec)) {
      if (it->path().filename().string().rfind(prefix, 0) != 0) continue;
      std::error_code rm;
      if (std::filesystem::remove(it->path(), rm)) removed.push_back(it->path().string());
    }
  }
  return removed;
}

}  // namespace sinkscope

// Training checkpoints: model, AdamW state, step, RNG and data position, in a versioned
// binary format written atomically. Layout (little-endian):
//   "SINKCKPT" | u32 format version | u32 0 | u64 header length | header JSON
//   | params (f32 × n) | adam m (f32 × n) | adam v (f32 × n) | u64 checksum of all before
// The checksum is XXH3-64 (xxHash) from format version 2 on, FNV-1a in version 1, which
// is still read. The header holds the model config, the step, the seed and the data
// position; loading checks all of it against the model it restores into, and refuses
// parameters (and, for training, AdamW moments) that are NaN or ±inf, naming the tensor.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/model.h"

namespace sinkscope {

// The version written; 1 (an FNV-1a checksum) is still read.
inline constexpr uint32_t kCheckpointVersion = 2;
// The checksum of format `version` over `n` bytes: FNV-1a for 1, XXH3-64 from 2 on.
uint64_t CheckpointChecksum(uint32_t version, const char* data, size_t n);

struct TrainingState {
  int64_t step = 0;           // optimisation steps completed
  uint64_t seed = 0;          // the run's seed
  uint64_t data_counter = 0;  // micro-batches drawn so far: the data position
};

Status SaveCheckpoint(const std::string& path, const Model& model, const TrainingState& state);
// Restores into `model` (whose config must match the file's) and returns the state.
StatusOr<TrainingState> LoadCheckpoint(const std::string& path, Model& model);
// The model config stored in a checkpoint, to build a model before loading it.
StatusOr<ModelConfig> ReadCheckpointConfig(const std::string& path);

// The model config as the checkpoint header holds it: every field of engine/config.h's
// list under its own name, the arm and the RoPE scaling; and back (DATA_LOSS naming what
// is missing or mistyped).
nlohmann::json ModelConfigToJson(const ModelConfig& config);
StatusOr<ModelConfig> ModelConfigFromJson(const nlohmann::json& json);

// Removes the temporary files that a process killed while writing one of a run's files
// leaves in the run folder `dir` (WriteFileAtomically's "<name>.tmp.<pid>.<thread>" of
// checkpoint.bin, metrics.jsonl, probes.jsonl, hf/config.json, hf/model.safetensors):
// ours, never others. Returns the paths removed.
std::vector<std::string> RemoveStaleTempFiles(const std::string& dir);

}  // namespace sinkscope

// Experiment files: YAML or JSON mapped onto sinkscope.v1.Experiment by the proto's
// own descriptors (the JSON mapping: proto or lowerCamelCase field names, enums by
// name), defaults filled in, and every rule checked. Errors name the file, the line,
// the field path and the rule, e.g. "quickstart.yaml:7: model.kv_heads: must divide
// model.heads (4), got 3".
#pragma once

#include <functional>

#include <string>

#include "proto/sinkscope/v1/experiment.pb.h"
#include "base/status.h"
#include "engine/config.h"
#include "engine/schedule.h"

namespace sinkscope {

// Parses YAML or JSON text onto an Experiment; `source` names it in errors.
StatusOr<v1::Experiment> ParseExperimentText(const std::string& text, const std::string& source);
// Reads and parses a file; relative data paths are resolved against its folder.
StatusOr<v1::Experiment> LoadExperimentFile(const std::string& path);
// Fills every optional field left out with its documented default.
void ApplyDefaults(v1::Experiment& experiment);
// Checks every rule on a defaulted experiment; the message names the field path.
// `check_paths` also requires data paths to exist on this machine; `stop` (when set) is
// asked while the data folders are listed, and a true answer (the client cancelled, its
// deadline passed) ends the check with CANCELLED.
Status ValidateExperiment(const v1::Experiment& experiment, bool check_paths,
                          const std::function<bool()>& stop = {});

// What one run of an experiment needs in memory on the CPU backend (fp32), computed in
// double so absurd sizes cannot overflow: parameters, gradients and AdamW's two moments
// (16 B per parameter) and the activations one micro-batch keeps for the backward (the
// CPU attention keeps its B·H·T² matrix; the logits B·T·V).
struct RunMemoryEstimate {
  double parameters = 0;
  double parameter_bytes = 0;   // 16 B per parameter
  double activation_bytes = 0;  // one micro-batch
  int64_t micro_batch = 0, context = 0;
  double total_bytes() const { return parameter_bytes + activation_bytes; }
  // "1.2B parameters need about 20.1 GB to train (...)".
  std::string Describe() const;
};
RunMemoryEstimate EstimateRunMemory(const v1::Experiment& experiment);
// 1536 → "1.5 KiB", in binary units.
std::string FormatBytes(double bytes);

// Bounds that keep one submission's work and storage bounded (ValidateExperiment).
inline constexpr int kMaxRunsPerExperiment = 256;  // arms × seeds
inline constexpr int kMaxDataPaths = 256;
inline constexpr size_t kMaxPathBytes = 4096;
// Bounds on the rest of what a client sends (issue 28): every repeated field and string of
// an experiment is bounded, so a submission's cost is too.
inline constexpr int kMaxExcludeSuffixes = 64;
inline constexpr size_t kMaxSuffixBytes = 255;     // a file name's length (NAME_MAX)
inline constexpr size_t kMaxSeparatorBytes = 1024;
// The largest probe report a run may produce: the gRPC message limit (4 MiB) less room
// for the upload's envelope. ProbeReportBoundBytes sizes a run's reports at submission.
inline constexpr int64_t kMaxProbeReportBytes = (int64_t{4} << 20) - (int64_t{64} << 10);
// An upper bound on the serialized size of one probe report of this (non-diagnostic)
// experiment, from its model and probe.profile_len: per layer, the per-token series (six
// Bloat/Change/Compress ratios, nine gradient profile sites, seven norms) of P doubles,
// the per-head statistics, θ and C per KV head, and the scalars and keys.
int64_t ProbeReportBoundBytes(const v1::Experiment& e);
// INVALID_ARGUMENT naming probe.profile_len when a (valid, probing, non-diagnostic)
// experiment's reports could exceed kMaxProbeReportBytes. The coordinator checks it at
// submission after the memory check, so a model too large for any worker is named as such.
Status CheckProbeReportFits(const v1::Experiment& e);

// Sweeps (the experiment's `sweep`): a grid over single-valued fields of model, train,
// data and probe. Axes and values are bounded; the grid × arms × seeds is at most
// kMaxRunsPerExperiment (ValidateExperiment checks both).
inline constexpr int kMaxSweepAxes = 8;
inline constexpr int kMaxSweepValues = 64;
// Points of the grid: the product of the axes' sizes; 1 without a sweep.
int64_t SweepPointCount(const v1::Experiment& e);
// Each axis names a field a sweep may set, once, and each value parses as that field's
// type; errors name "sweep.<path>[k]" and the rule.
Status ValidateSweep(const v1::Experiment& e);
// Point `index` (0-based, the first axis slowest) of `submitted`'s grid: the experiment
// as submitted (before defaults) with the point's values set, the sweep cleared, then
// the defaults applied (so defaults derived from a swept field follow it). `label` gets
// "train.lr=1e-3 data.bos=true". Validate the result like any experiment.
StatusOr<v1::Experiment> SweepPointExperiment(const v1::Experiment& submitted, int64_t index, std::string* label);

ModelConfig ToModelConfig(const v1::ModelSpec& spec, v1::Arm arm);
OptimizerConfig ToOptimizerConfig(const v1::TrainSpec& spec);
const char* ArmName(v1::Arm arm);  // "baseline", "vscale", "vscale_backward_only", "sink_logit", ...
// Whether an arm changes attention or adds a gate (docs/design/ARMS.md): CPU only for now.
bool IsAttentionArm(v1::Arm arm);

}  // namespace sinkscope

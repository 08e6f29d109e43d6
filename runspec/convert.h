// An experiment's run as the run loop's plain settings (schema → training), and the
// engine's probe reports as the wire's: the one bridge between the proto and the engine,
// used by the worker and by sinkscope-train. The coordinator and the CLI never link it.
#pragma once

#include "base/status.h"
#include "data/data.h"
#include "engine/probes.h"
#include "proto/sinkscope/v1/experiment.pb.h"
#include "proto/sinkscope/v1/metrics.pb.h"
#include "schema/experiment.h"
#include "training/run_loop.h"
#include "training/trainer.h"

namespace sinkscope {

// Where the run's tokens come from.
DataSpec ToDataSpec(const v1::Experiment& experiment);
// Everything the Trainer needs for one arm × seed of a defaulted experiment.
TrainerOptions ToTrainerOptions(const v1::Experiment& experiment, v1::Arm arm, uint64_t seed, double peak_flops);
// The run loop's settings for one arm × seed of a defaulted experiment, in folder `dir`.
RunLoopOptions ToRunLoopOptions(const v1::Experiment& experiment, v1::Arm arm, uint64_t seed, double peak_flops,
                                const std::string& dir, bool resume);

// Whether any arm of the experiment is an attention arm (ARMS.md). The arms have no bf16
// contract yet, so such an experiment trains every run in fp32 on a GPU: its arms and its
// baseline then compare at one precision.
bool ExperimentHasAttentionArm(const v1::Experiment& experiment);

v1::ProbeReport ToProto(const ProbeReport& report);
ProbeSettings ToProbeSettings(const v1::ProbeSpec& spec);
ProbeBatchKind ToProbeBatchKind(const v1::ProbeSpec& spec);

}  // namespace sinkscope

// The one run loop: a run from its folder's state to its last step, for the service's
// worker and for sinkscope-train alike. It owns what must behave the same everywhere —
// resume (or a fresh start that owns the folder), the probe / validation / checkpoint
// cadence, a non-finite loss, a stop request (cancel, shutdown, Ctrl-C), checkpoint
// retries, temporary files left by a killed process, the Hugging Face export — and hands
// every result to a RunObserver, which is all a front end writes (gRPC messages, JSONL
// files, a progress bar).
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "base/clock.h"
#include "base/status.h"
#include "training/trainer.h"

namespace sinkscope {

struct RunLoopOptions {
  TrainerOptions trainer;
  // The run folder: checkpoint.bin, hf/ (created if missing).
  std::string dir;
  int64_t total_steps = 1;
  // Training probes (IsProbeStep): none when probe_every ≤ 0.
  int probe_every = 0;
  ProbeSettings probe;
  ProbeBatchKind probe_batch = ProbeBatchKind::kStepBatch;
  // Validation and checkpoints: every N steps (none when ≤ 0) and the last step.
  int eval_every = 0;
  int checkpoint_every = 0;
  // true: continue from dir/checkpoint.bin when it exists. false: start fresh, removing
  // a checkpoint and export of an earlier run (a later resume would splice them in).
  bool resume = true;
  // Writes dir/hf (config.json + model.safetensors) after the last step.
  bool export_hf = false;
  // A checkpoint write that fails is tried again this many times, the wait doubling from
  // checkpoint_backoff (the folder is created again first); then the run gives up.
  int checkpoint_retries = 3;
  std::chrono::milliseconds checkpoint_backoff{500};
};

// Why a run stops before its last step.
enum class StopKind { kCancelled, kShutdown };

// What a front end does with a run's results. Called on the run loop's thread; a
// non-OK Status from a hook ends the run with that error (kError).
class RunObserver {
 public:
  virtual ~RunObserver() = default;
  // A temporary file a killed process left in the run folder, now removed.
  virtual void OnStaleFileRemoved(const std::string& path) {}
  // Once the trainer holds the run's state: `step` is the checkpoint's (0 on a fresh start).
  virtual Status OnStart(int64_t step, bool resumed) { return OkStatus(); }
  virtual void BeforeStep(int64_t next_step) {}
  // Every completed step. `val_loss` is NaN when the step was not evaluated; `probe` is
  // null when the step was not probed (or its probe pass gave no report).
  virtual Status OnStep(const StepStats& stats, double val_loss, const ProbeReport* probe) = 0;
  // Before a checkpoint of `step` is written: make durable what the steps up to it
  // produced, so whatever a resume keeps is on disk whenever the checkpoint is.
  virtual Status BeforeCheckpoint(int64_t step) { return OkStatus(); }
  virtual void OnCheckpoint(int64_t step) {}
  virtual void OnCheckpointRetry(int64_t step, int retry, std::chrono::milliseconds wait, const Status& error) {}
  // After a step and its checkpoint (if one was due), before the stop check.
  virtual void AfterStep(int64_t step) {}
  // Whether the run must stop: polled after every step and while a retry waits.
  virtual std::optional<StopKind> StopRequested() = 0;
};

struct RunResult {
  enum Kind {
    kFinished,   // every step trained (and exported, if asked)
    kNonFinite,  // a NaN/Inf loss or gradient: no update was made; the last good state is checkpointed
    kStopped,    // a stop request: the state after the last step is checkpointed
    kGiveBack,   // the checkpoint cannot be written here: the run may go on elsewhere from the last one
    kError,      // anything else (setup, resume, a hook, the export): `error` says what
  } kind = kFinished;
  StopKind stop = StopKind::kCancelled;  // kStopped: the gang's (a shutdown on any rank wins)
  // kStopped: this rank was not asked to stop; another rank of its gang was (its front end
  // reports nothing: the rank that was asked does).
  bool stopped_by_peer = false;
  Status error;                          // kError; kStopped/kNonFinite: a checkpoint that failed
  bool device_error = false;             // kError: the backend's sticky device error (the device is unusable)
  int64_t step = 0;                      // the last completed step
  int64_t checkpoint_step = -1;          // the step of the checkpoint on disk; -1 for none
  StepStats failed_step;                 // kNonFinite: the step that was not finite
  std::string checkpoint_path;
  // For a user: what happened, with the checkpoint kept ("... is kept at PATH").
  std::string Describe() const;
};

// Trains the run described by `options` on `data` with `backend`. `clock` times the
// checkpoint retries' waits (a ManualClock in tests).
RunResult RunLoop(const RunLoopOptions& options, const DataSplits* data, Backend* backend, RunObserver* observer,
                  Clock* clock);

}  // namespace sinkscope

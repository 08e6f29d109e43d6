// The training loop of one run: draws micro-batches, accumulates gradients, applies
// AdamW on the schedule, evaluates, checkpoints and resumes bit for bit.
#pragma once

#include <chrono>
#include <memory>

#include "base/cadence.h"
#include "training/checkpoint.h"
#include "data/data.h"
#include "engine/communicator.h"
#include "engine/model.h"
#include "engine/optimizer.h"
#include "engine/probes.h"

namespace sinkscope {

struct TrainerOptions {
  ModelConfig model;
  OptimizerConfig optimizer;  // total_steps is the run's length
  int micro_batch = 8;        // B
  int grad_accum = 1;         // micro-batches per step
  uint64_t seed = 0;
  int eval_batches = 8;
  // Peak matmul rate of the device in FLOP/s for MFU (METRICS.md); 0 leaves MFU at 0.
  // On the CPU: the sgemm rate measured at start-up (MeasureGemmPeak).
  double peak_flops = 0;
  // Data parallelism: this rank's communicator (null: one rank). micro_batch is the
  // global micro-batch; each rank trains micro_batch / world_size of its rows.
  Communicator* comm = nullptr;
  // With several ranks: the gradients of the step's last micro-batch are all-reduced in
  // buckets of at least this many floats on a communication thread as the backward
  // finishes each block (Model::GradientsReady), not all at once after it. 0: after it.
  // The buckets are the same on every rank and every step, so the sums are deterministic.
  size_t allreduce_bucket_floats = size_t{1} << 20;
};

// Which batch a training-time probe measures.
enum class ProbeBatchKind {
  kStepBatch,  // the step's own global batch: the gradients are the step's gradients
  kHeldOut,    // a fixed batch of micro_batch validation sequences, the same every probe
};

struct StepStats {
  int64_t step = 0;  // 1-based: the step just completed
  double loss = 0;   // mean token loss over the global batch
  double lr = 0;
  double grad_norm = 0;  // before clipping
  double tokens_per_second = 0;
  double seconds = 0;  // wall time of the step
  double comm_seconds = 0;  // of it, waiting for the gradient and loss all-reduce (data parallelism)
  double comm_busy_seconds = 0;  // time the all-reduces took, overlapped with the backward or not
  // Model FLOPs utilisation, TrainFlopsPerToken(T)·tokens/s ÷ mfu_reference_flops. The
  // reference is options.peak_flops, raised to the best rate a step has reached if one
  // ever beats it (a CPU's sgemm peak measured while the machine was busy reads low):
  // so mfu ≤ 1, and the record says what it was measured against.
  double mfu = 0;
  double mfu_reference_flops = 0;
  bool finite = true;  // false: NaN/Inf loss or gradient, or `error`; no update was made
  Status error;         // the backend's sticky error or a failed collective: the run cannot go on
  bool device_error = false;  // `error` is the backend's (TakeError), not a collective's
};

// Times a large Gemm on `backend` and returns its rate in FLOP/s: the peak against which
// the CPU backend's MFU is stated.
double MeasureGemmPeak(Backend& backend);

class Trainer {
 public:
  // `data` is shared between runs; it must outlive the trainer.
  static StatusOr<std::unique_ptr<Trainer>> Create(const TrainerOptions& options, const DataSplits* data,
                                                   Backend* backend);

  // Fresh weights from the seed.
  void Initialize();
  // Restores model, optimizer and data position; the run then continues exactly as the
  // uninterrupted one would (bit for bit on the CPU backend).
  Status Resume(const std::string& checkpoint_path);
  Status SaveCheckpoint(const std::string& path) const;

  // One optimisation step over grad_accum micro-batches. `observer` sees every
  // micro-batch's pass (probes); it does not change the arithmetic.
  StepStats Step(PassObserver* observer = nullptr);
  // A step that is also probed. Both kinds measure the weights the step starts from;
  // the update is bit-identical to Step()'s. The report's step is the step's number.
  StepStats ProbedStep(const ProbeSettings& settings, ProbeBatchKind kind, ProbeReport* report);
  // Mean token loss over eval_batches fixed validation batches (the same every call).
  double Evaluate();

  Model& model() { return *model_; }
  const TrainerOptions& options() const { return options_; }
  int64_t step() const { return state_.step; }
  const TrainingState& state() const { return state_; }
  int64_t tokens_per_step() const {
    return static_cast<int64_t>(options_.micro_batch) * options_.grad_accum * options_.model.context;
  }
  uint64_t data_seed() const;
  int world_size() const;
  int rank() const;

 private:
  Trainer(const TrainerOptions& options, const DataSplits* data) : options_(options), data_(data) {}

 public:
  ~Trainer();

 private:

  TrainerOptions options_;
  const DataSplits* data_;
  std::unique_ptr<Model> model_;
  TrainingState state_;
  double mfu_reference_ = 0;  // StepStats::mfu_reference_flops
  std::vector<int32_t> inputs_, targets_;
  double* scalars_ = nullptr;  // device doubles: [Σ token losses, ‖g‖²] of the current step
};

}  // namespace sinkscope

// A diagnostic probe job: load a checkpoint (sinkscope's checkpoint.bin or a Hugging Face
// folder), build its batch (a token shard, or text encoded with the model's tokenizer),
// and make the diagnostic pass of METRICS.md (no parameter gradients, no update), in
// micro-batches whose report equals one pass over the batch. For sinkscope-probe and for
// the service's workers (Experiment.diagnostic) alike.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "base/status.h"
#include "engine/backend.h"
#include "engine/probes.h"

namespace sinkscope {

struct DiagnosticJob {
  std::string checkpoint;  // a checkpoint.bin or a Hugging Face folder
  std::string tokens;      // an llm.c token shard, or
  std::string text;        // a text file or folder (documents split by `separator`)
  std::string separator = "%";
  std::string tokenizer;  // for text: "" → the model folder's own, else bytes
  int batch = 8;
  int seq = 0;          // 0: the model's context
  int micro_batch = 0;  // 0: the whole batch
  std::string arm;      // "" → the checkpoint's own value path
  ProbeSettings settings;
  // When false, ref_span and profile_len are clipped to T − 1 and T (their defaults may
  // exceed a short --seq); when true they are taken as given (and checked).
  bool ref_span_given = false, profile_len_given = false;
  // Recompute each block's forward in the backward (ModelOptions::recompute_blocks):
  // kAuto does when one pass's activations would not fit the memory available now.
  enum class Recompute { kAuto, kOn, kOff } recompute = Recompute::kAuto;
  // The memory kAuto plans against, bytes: a GPU's (the backend's device); 0: the host's
  // MemAvailable now (the CPU backend).
  double device_memory_bytes = 0;
};

struct DiagnosticResult {
  ProbeReport report;
  std::string arm;          // the value path it was probed under
  int64_t checkpoint_step = 0;  // 0 for a Hugging Face folder
  double seconds = 0;       // of the pass
  int batch = 0, seq = 0;
  bool recomputed = false;  // the blocks were recomputed in the backward
};

// `note` (optional) receives what people should see before the pass (the tokenizer, the
// memory estimate, and, each beginning "warning: ", what a Hugging Face folder holds that
// was read one way of two or ignored); `progress` is the pass's (micro-batches done,
// total, tokens done).
// Errors name the file or setting at fault.
// `stop` (optional) is asked between micro-batches: true ends the pass as CANCELLED.
StatusOr<DiagnosticResult> RunDiagnosticJob(const DiagnosticJob& job, Backend* backend,
                                            const std::function<void(const std::string&)>& note = nullptr,
                                            const std::function<void(int, int, double)>& progress = nullptr,
                                            const std::function<bool()>& stop = nullptr);

}  // namespace sinkscope

#include "training/probe_command.h"

#include <chrono>
#include <cstdio>
#include <string>

#include "base/flags.h"
#include "training/devices.h"
#include "training/diagnostic.h"
#include "training/probe_json.h"

namespace sinkscope {

int RunProbeCommand(int argc, char** argv) {
  const char* name = argv[0];
  std::string checkpoint, tokens_path, text_path, separator = "%", arm, reduce = "sum_then_norm", tokenizer_spec;
  int B = 8, T = 0, micro_batch = 0;
  ProbeSettings st;
  bool json = false;
  auto fail = [&](const std::string& msg) {
    std::fprintf(stderr, "%s: %s\n", name, msg.c_str());
    return 2;
  };
  CLI::App app(
      "Runs the diagnostic pass (forward and backward, no update) on a checkpoint and prints the paper's per-layer "
      "measurements (METRICS.md). The report's step is the checkpoint's (the optimisation steps it has completed); "
      "a Hugging Face folder stores none, and its report says step 0.",
      name);
  app.add_option("CHECKPOINT", checkpoint,
                 "a sinkscope checkpoint.bin, or a Hugging Face folder holding config.json and model.safetensors (or "
                 "shards listed by model.safetensors.index.json): model_type llama, mistral, qwen2, qwen3 or glm; V-scale "
                 "theta under model.layers.{i}.self_attn.vscale_theta")
      ->required();
  app.add_option("--tokens", tokens_path, "llm.c token shard; sequence b is tokens [b*T, b*T+T], targets shifted by one")
      ->type_name("SHARD");
  app.add_option("--text", text_path,
                 "a text file or folder, documents split by --separator, encoded with the model's tokenizer (a Hugging "
                 "Face folder's tokenizer.json), --tokenizer, or else as bytes")
      ->type_name("PATH");
  app.add_option("--tokenizer", tokenizer_spec,
                 "for --text: gpt2, a folder, tokenizer.json or tiktoken ranks .json (default: the model folder's own)")
      ->check(flags::NonEmpty());
  app.add_option("--separator", separator, "document separator line for --text")->default_val("%");
  app.add_option("--batch", B, "sequences")->check(flags::Integer(1, INT_MAX))->default_val(8);
  app.add_option("--micro-batch", micro_batch,
                 "sequences per forward and backward (default: all at once); the report equals that of one pass over "
                 "the batch. The pass prints its memory estimate, then its progress, on stderr")
      ->check(flags::Integer(1, INT_MAX));
  app.add_option("--seq", T, "tokens per sequence (default: the model's context)")->check(flags::Integer(1, INT_MAX));
  app.add_option("--arm", arm, "baseline | vscale | vscale_backward_only (default: the checkpoint's)");
  app.add_option("--s", st.sink_position, "sink position s, 0 <= s <= T_e")->check(flags::Integer(0, INT_MAX))
      ->default_val(0);
  auto* ref_span = app.add_option("--ref-span", st.ref_span, "T_e (default 31, clipped to T-1)")
                       ->check(flags::Integer(1, INT_MAX));
  auto* profile = app.add_option("--profile-len", st.profile_len, "P (default 64, clipped to T)")
                      ->check(flags::Integer(1, INT_MAX));
  app.add_option("--eps", st.eps, "sink threshold")->check(flags::Number(0, 1))->default_val(0.3);
  app.add_option("--t-eps", st.t_eps, "sink window T_eps")->check(flags::Integer(1, 1 << 24))->default_val(64);
  app.add_option("--reduce", reduce, "how per-sequence gradients are combined")
      ->check(CLI::IsMember({"sum_then_norm", "norm_then_mean"}))
      ->default_val("sum_then_norm");
  std::string recompute = "auto";
  app.add_option("--recompute", recompute,
                 "recompute each block's forward in the backward (one block's activations instead of all): auto "
                 "does when they would not fit the memory available")
      ->check(CLI::IsMember({"auto", "on", "off"}))
      ->default_val("auto");
  std::string device_text = "cpu";
  app.add_option("--device", device_text,
                 "cpu, or cuda / cuda:N (a build with the CUDA backend, its fp32 mode); --recompute auto then plans "
                 "against the GPU's memory")
      ->type_name("cpu|cuda[:N]")
      ->default_val("cpu");
  app.add_flag("--json", json, "write the full report as JSON to stdout");
  if (int exit = flags::Parse(app, argc, argv); exit >= 0) return exit;
  auto device = ParseDevice(device_text);
  if (!device.ok()) return fail("--device: " + device.status().message());
  st.reduce = reduce == "norm_then_mean" ? ReduceMode::kNormThenMean : ReduceMode::kSumThenNorm;
  const bool ref_span_set = ref_span->count() > 0, profile_set = profile->count() > 0;
  if (tokens_path.empty() == text_path.empty()) return fail("give exactly one of --tokens or --text");

  DiagnosticJob job;
  job.checkpoint = checkpoint;
  job.tokens = tokens_path;
  job.text = text_path;
  job.separator = separator;
  job.tokenizer = tokenizer_spec;
  job.batch = B;
  job.seq = T;
  job.micro_batch = micro_batch;
  job.arm = arm;
  job.settings = st;
  job.ref_span_given = ref_span_set;
  job.profile_len_given = profile_set;
  job.recompute = recompute == "on"    ? DiagnosticJob::Recompute::kOn
                  : recompute == "off" ? DiagnosticJob::Recompute::kOff
                                       : DiagnosticJob::Recompute::kAuto;
  auto described = DescribeDevice(*device);
  if (!described.ok()) return fail(described.status().message());
  job.device_memory_bytes = static_cast<double>(described->memory_bytes);
  // Probing a pretrained model is held to METRICS.md's definitions in fp32 (the weights
  // widened exactly from bf16): a GPU probes in the CUDA backend's fp32 mode, not bf16.
  auto made = MakeBackendFor(*device, GpuPrecision::kFp32);
  if (!made.ok()) return fail(made.status().message());
  std::unique_ptr<Backend> backend = std::move(*made);
  const auto start = std::chrono::steady_clock::now();
  auto result = RunDiagnosticJob(
      job, backend.get(), [&](const std::string& line) { std::fprintf(stderr, "%s: %s\n", name, line.c_str()); },
      [&](int done, int total, double tokens) {
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        std::fprintf(stderr, "%s: pass %d/%d, %.0f tok/s, %.1f s per 1000 tokens, ETA %.0f s\n", name, done, total,
                     tokens / s, 1000 * s / tokens, s / done * (total - done));
      });
  if (!result.ok()) return fail(result.status().message());
  const ProbeReport& report = result->report;
  if (json) {
    nlohmann::json j = ProbeReportToJson(report);
    j["arm"] = result->arm;
    j["checkpoint"] = checkpoint;
    std::printf("%s\n", j.dump(1).c_str());
  } else {
    std::printf("%s (%s)\n%s", checkpoint.c_str(), result->arm.c_str(), ProbeReportTable(report).c_str());
  }
  return 0;
}

}  // namespace sinkscope

#include "training/probe_command.h"

#include <algorithm>
#include <chrono>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <nlohmann/json.hpp>

#include "training/checkpoint.h"
#include "base/files.h"
#include "data/data.h"
#include "data/tokenizer.h"
#include "base/flags.h"
#include "base/numbers.h"
#include "training/hf.h"
#include "training/probe_json.h"

namespace sinkscope {
namespace {

}  // namespace

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
  app.add_flag("--json", json, "write the full report as JSON to stdout");
  if (int exit = flags::Parse(app, argc, argv); exit >= 0) return exit;
  st.reduce = reduce == "norm_then_mean" ? ReduceMode::kNormThenMean : ReduceMode::kSumThenNorm;
  const bool ref_span_set = ref_span->count() > 0, profile_set = profile->count() > 0;
  if (tokens_path.empty() == text_path.empty()) return fail("give exactly one of --tokens or --text");

  auto backend = MakeCpuBackend();
  // No parameter gradients or optimizer state: a probe reads activation gradients only.
  const ModelOptions kProbing{.training = false};
  std::unique_ptr<Model> model;
  int64_t step = 0;  // the checkpoint's; a Hugging Face folder stores none
  std::error_code ec;
  const bool is_folder = std::filesystem::is_directory(checkpoint, ec);
  if (ec && ec != std::errc::no_such_file_or_directory) return fail(checkpoint + ": " + ec.message());
  if (is_folder) {
    auto m = LoadHfModel(checkpoint, backend.get(), kProbing);
    if (!m.ok()) return fail(m.status().message());
    model = std::move(*m);
  } else {
    auto config = ReadCheckpointConfig(checkpoint);
    if (!config.ok()) return fail(config.status().message());
    auto m = Model::Create(*config, backend.get(), kProbing);
    if (!m.ok()) return fail(m.status().message());
    model = std::move(*m);
    auto s = LoadCheckpoint(checkpoint, *model);
    if (!s.ok()) return fail(s.status().message());
    step = s->step;
  }
  if (!arm.empty()) {  // the same weights under another arm's value path
    ModelConfig c = model->config();
    if (!ParseVScaleMode(arm, &c.vscale)) {
      return fail("--arm must be baseline, vscale or vscale_backward_only, got " + arm);
    }
    auto m = Model::Create(c, backend.get(), kProbing);
    (*m)->ParamsFromHost(model->ParamsToHost());
    model = std::move(*m);
  }
  const ModelConfig& c = model->config();
  if (T == 0) T = c.context;
  if (T <= 0 || T > c.context) return fail("--seq must be in [1, " + std::to_string(c.context) + "]");
  std::vector<int32_t> stream;
  if (!tokens_path.empty()) {
    auto t = ReadShard(tokens_path);
    if (!t.ok()) return fail(t.status().message());
    stream = std::move(*t);
  } else {
    TextSource src;
    src.paths = {text_path};
    src.separator = separator;
    auto docs = ReadDocuments(src);
    if (!docs.ok()) return fail(docs.status().message());
    std::string spec = tokenizer_spec;
    if (spec.empty() && is_folder &&
        (std::filesystem::exists(checkpoint + "/tokenizer.json", ec) ||
         std::filesystem::exists(checkpoint + "/encoder.json", ec))) {
      spec = checkpoint;
    }
    if (spec.empty()) {
      stream = PackDocuments(*docs);
    } else {
      auto tokenizer = Tokenizer::Open(spec);
      if (!tokenizer.ok()) return fail(tokenizer.status().message());
      // The model's own end-of-text, as its config.json says (the first of a list).
      if (is_folder) {
        auto text = ReadRegularFile(checkpoint + "/config.json", checkpoint + "/config.json", 1 << 24);
        const nlohmann::json j = text.ok() ? nlohmann::json::parse(*text, nullptr, false) : nlohmann::json();
        if (j.is_object() && j.contains("eos_token_id")) {
          const nlohmann::json& e = j["eos_token_id"];
          if (e.is_number_integer()) (*tokenizer)->SetEos(e.get<int32_t>());
          if (e.is_array() && !e.empty() && e[0].is_number_integer()) (*tokenizer)->SetEos(e[0].get<int32_t>());
        }
      }
      const Tokenizer& tok = **tokenizer;
      std::vector<std::string_view> texts(docs->begin(), docs->end());
      const auto encoded = EncodeInParallel(tok, texts, static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
      // Each document as the model was trained to see one: its BOS (Llama 3's
      // <|begin_of_text|>, from the tokenizer's post-processor) and its EOS after it.
      for (const auto& e : encoded) {
        if (tok.bos()) stream.push_back(*tok.bos());
        stream.insert(stream.end(), e.begin(), e.end());
        if (tok.eos()) stream.push_back(*tok.eos());
      }
      std::fprintf(stderr, "%s: %s; each document %s…%s\n", name, tok.description().c_str(),
                   tok.bos() ? ("begins with token " + std::to_string(*tok.bos()) + " ").c_str() : "",
                   tok.eos() ? (" ends with token " + std::to_string(*tok.eos())).c_str() : " has no end token");
    }
  }
  const size_t need = static_cast<size_t>(B) * T + 1;
  if (stream.size() < need) {
    return fail((tokens_path.empty() ? text_path : tokens_path) + " holds " + std::to_string(stream.size()) +
                " tokens; --batch " + std::to_string(B) + " x --seq " + std::to_string(T) + " needs " +
                std::to_string(need));
  }
  std::vector<int32_t> inputs(static_cast<size_t>(B) * T), targets(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (stream[i] >= c.vocab || stream[i + 1] >= c.vocab) {
      return fail("token " + std::to_string(std::max(stream[i], stream[i + 1])) + " is outside the model's vocab " +
                  std::to_string(c.vocab));
    }
    inputs[i] = stream[i];
    targets[i] = stream[i + 1];
  }
  if (!ref_span_set) st.ref_span = std::min(st.ref_span, T - 1);
  if (!profile_set) st.profile_len = std::min(st.profile_len, T);
  const int M = micro_batch == 0 ? B : std::min(micro_batch, B);
  const int passes = (B + M - 1) / M;
  std::fprintf(stderr, "%s: %d sequences of %d tokens in %d pass%s of %d; about %.2f GiB (parameters and one "
               "pass's activations)\n",
               name, B, T, passes, passes == 1 ? "" : "es", M, EstimateDiagnosticBytes(c, M, T, /*training=*/false) / (1 << 30));
  const auto start = std::chrono::steady_clock::now();
  DiagnosticOptions options;
  options.micro_batch = M;
  options.progress = [&](int done, int total) {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double tokens = static_cast<double>(std::min(done * M, B)) * T;
    std::fprintf(stderr, "%s: pass %d/%d, %.0f tok/s, %.1f s per 1000 tokens, ETA %.0f s\n", name, done, total,
                 tokens / s, 1000 * s / tokens, s / done * (total - done));
  };
  auto report = RunDiagnosticPass(*model, st, inputs.data(), targets.data(), B, T, step, options);
  if (!report.ok()) return fail(report.status().message());
  if (json) {
    nlohmann::json j = ProbeReportToJson(*report);
    j["arm"] = VScaleModeName(c.vscale);
    j["checkpoint"] = checkpoint;
    std::printf("%s\n", j.dump(1).c_str());
  } else {
    std::printf("%s (%s)\n%s", checkpoint.c_str(), VScaleModeName(c.vscale), ProbeReportTable(*report).c_str());
  }
  return 0;
}

}  // namespace sinkscope

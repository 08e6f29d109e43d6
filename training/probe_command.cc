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

#include "training/checkpoint.h"
#include "data/data.h"
#include "base/numbers.h"
#include "training/hf.h"
#include "training/probe_json.h"

namespace sinkscope {
namespace {

const char kUsage[] = R"(usage: %s CHECKPOINT (--tokens SHARD | --text PATH) [options]

Runs the diagnostic pass (forward and backward, no update) on a checkpoint and prints
the paper's per-layer measurements (METRICS.md).

CHECKPOINT        a sinkscope checkpoint.bin, or a Hugging Face folder holding
                  config.json and model.safetensors, or shards listed by
                  model.safetensors.index.json (LlamaForCausalLM; rope_scaling default,
                  linear, llama3 or yarn; V-scale theta under
                  model.layers.{i}.self_attn.vscale_theta)
--tokens SHARD    llm.c token shard; sequence b is tokens [b*T, b*T+T], targets shifted by one
--text PATH       a text file or folder, byte-level tokens, documents split by --separator
--separator S     document separator line for --text (default %%)
--batch B         sequences (default 8)
--micro-batch M   sequences per forward and backward (default: all B at once); the report
                  equals that of one pass over the batch. Before it starts the pass prints
                  its memory estimate, then its progress, on stderr
--seq T           tokens per sequence (default: the model's context)
--arm A           baseline | vscale | vscale_backward_only (default: the checkpoint's)
--s N             sink position s, 0 ≤ s ≤ T_e (default 0)
--ref-span N      T_e (default 31, clipped to T-1)
--profile-len N   P (default 64, clipped to T)
--eps X           sink threshold (default 0.3)
--t-eps N         sink window T_eps (default 64)
--reduce MODE     sum_then_norm (default) | norm_then_mean
--json            write the full report as JSON to stdout
-h, --help        this text

The report's step is the checkpoint's (the optimisation steps it has completed); a
Hugging Face folder stores none, and its report says step 0.
)";


}  // namespace

int RunProbeCommand(int argc, char** argv) {
  const char* name = argv[0];
  std::string checkpoint, tokens_path, text_path, separator = "%", arm;
  int B = 8, T = 0, micro_batch = 0;
  ProbeSettings st;
  bool ref_span_set = false, profile_set = false, json = false;
  auto fail = [&](const std::string& msg) {
    std::fprintf(stderr, "%s: %s\n", name, msg.c_str());
    return 2;
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    if (a == "-h" || a == "--help") {
      std::printf(kUsage, name);
      return 0;
    }
    if (a == "--json") {
      json = true;
      continue;
    }
    if (a.rfind("--", 0) == 0) {
      static const char* const kWithValue[] = {"--tokens", "--text",       "--separator", "--batch", "--micro-batch",
                                               "--seq",    "--arm",        "--s",         "--ref-span",
                                               "--profile-len", "--eps",   "--t-eps",     "--reduce"};
      if (std::find(std::begin(kWithValue), std::end(kWithValue), a) == std::end(kWithValue)) {
        return fail("unknown option " + a + " (see --help)");
      }
      const char* value_text = value();
      if (value_text == nullptr) return fail("option " + a + " needs a value");
      const std::string v = value_text;
      // Integer options: the whole value, in range; the ranges that depend on T are checked
      // by ProbeSettings::Validate.
      auto integer = [&](int min, int* out) -> std::string {
        int64_t n = 0;
        if (ParseWholeInteger(v, &n) && n >= min && n <= INT_MAX) {
          *out = static_cast<int>(n);
          return "";
        }
        return a + (min > 0 ? " must be a positive integer" : " must be a non-negative integer") + ", got '" + v + "'";
      };
      std::string bad;
      if (a == "--tokens") tokens_path = v;
      else if (a == "--text") text_path = v;
      else if (a == "--separator") separator = v;
      else if (a == "--batch") bad = integer(1, &B);
      else if (a == "--micro-batch") bad = integer(1, &micro_batch);
      else if (a == "--seq") bad = integer(1, &T);
      else if (a == "--arm") arm = v;
      else if (a == "--s") bad = integer(0, &st.sink_position);
      else if (a == "--ref-span") { bad = integer(1, &st.ref_span); ref_span_set = true; }
      else if (a == "--profile-len") { bad = integer(1, &st.profile_len); profile_set = true; }
      else if (a == "--eps") bad = ParseWholeNumber(v, &st.eps) ? "" : "--eps must be a number, got '" + v + "'";
      else if (a == "--t-eps") bad = integer(1, &st.t_eps);
      else if (a == "--reduce") {
        if (v == "sum_then_norm") st.reduce = ReduceMode::kSumThenNorm;
        else if (v == "norm_then_mean") st.reduce = ReduceMode::kNormThenMean;
        else return fail("--reduce must be sum_then_norm or norm_then_mean, got " + v);
      }
      if (!bad.empty()) return fail(bad);
    } else if (checkpoint.empty()) {
      checkpoint = a;
    } else {
      return fail("unexpected argument " + a + " (see --help)");
    }
  }
  if (checkpoint.empty()) return fail("a CHECKPOINT is required (see --help)");
  if (tokens_path.empty() == text_path.empty()) return fail("give exactly one of --tokens or --text");
  if (B <= 0) return fail("--batch must be positive");

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
    stream = PackDocuments(*docs);
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

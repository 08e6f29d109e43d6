#include "training/diagnostic.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string_view>
#include <thread>
#include <vector>

#include "base/files.h"
#include "data/data.h"
#include "data/tokenizer.h"
#include "training/checkpoint.h"
#include "training/hf.h"

namespace sinkscope {
namespace {

// MemAvailable of /proc/meminfo, bytes; 0 when unknown.
double AvailableMemoryBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  double kib = 0;
  std::string unit;
  while (in >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib * 1024;
  }
  return 0;
}

}  // namespace

StatusOr<DiagnosticResult> RunDiagnosticJob(const DiagnosticJob& job, Backend* backend,
                                            const std::function<void(const std::string&)>& note,
                                            const std::function<void(int, int, double)>& progress,
                                            const std::function<bool()>& stop) {
  auto say = [&](const std::string& s) {
    if (note) note(s);
  };
  if (job.tokens.empty() == job.text.empty()) return InvalidArgumentError("give exactly one of tokens and text");
  if (job.batch <= 0) return InvalidArgumentError("the batch must hold at least one sequence");
  // No parameter gradients or optimizer state: a probe reads activation gradients only.
  std::unique_ptr<Model> model;
  DiagnosticResult result;
  std::error_code ec;
  const std::string& checkpoint = job.checkpoint;
  const bool is_folder = std::filesystem::is_directory(checkpoint, ec);
  if (ec && ec != std::errc::no_such_file_or_directory) return InvalidArgumentError(checkpoint + ": " + ec.message());
  // The model's shape first: whether one pass's activations fit decides recomputation.
  ModelConfig shape;
  std::string context_limit = "the model's context";
  if (is_folder) {
    ASSIGN_OR_RETURN(HfConfig hf, ReadHfConfigAndType(checkpoint + "/config.json"));
    shape = hf.config;
    if (!hf.context_limit.empty()) context_limit = hf.context_limit;
  } else {
    ASSIGN_OR_RETURN(shape, ReadCheckpointConfig(checkpoint));
  }
  {
    const int T0 = job.seq == 0 ? shape.context : job.seq;
    const int M0 = job.micro_batch == 0 ? job.batch : std::min(job.micro_batch, job.batch);
    const double keep_all = shape.ActivationBytes(M0, T0), available = job.device_memory_bytes > 0 ? job.device_memory_bytes : AvailableMemoryBytes();
    result.recomputed = job.recompute == DiagnosticJob::Recompute::kOn ||
                        (job.recompute == DiagnosticJob::Recompute::kAuto && available > 0 &&
                         keep_all + 2.0 * shape.ParameterCount() > 0.8 * available);
  }
  if (is_folder) {
    std::vector<std::string> warnings;
    ASSIGN_OR_RETURN(model, LoadHfModelForProbing(checkpoint, backend, result.recomputed, &warnings));
    for (const std::string& w : warnings) say("warning: " + w);
  } else {
    ASSIGN_OR_RETURN(ModelConfig config, ReadCheckpointConfig(checkpoint));
    ASSIGN_OR_RETURN(model, Model::Create(config, backend,
                                          ModelOptions{.training = false, .recompute_blocks = result.recomputed}));
    ASSIGN_OR_RETURN(TrainingState state, LoadCheckpoint(checkpoint, *model));
    result.checkpoint_step = state.step;
  }
  if (!job.arm.empty()) {  // the same weights under another arm's value path, tensor by tensor
    ModelConfig c = model->config();
    if (!ParseVScaleMode(job.arm, &c.vscale)) {
      return InvalidArgumentError("the arm must be baseline, vscale or vscale_backward_only, got " + job.arm);
    }
    ASSIGN_OR_RETURN(std::unique_ptr<Model> m,
                     Model::Create(c, backend, ModelOptions{.training = false, .matrices = model->matrices(),
                                                            .recompute_blocks = result.recomputed}));
    for (size_t i = 0; i < m->tensors().size(); ++i) {
      m->SetTensor(m->tensors()[i], model->TensorToHost(model->tensors()[i]).data());  // exact: widened, rounded back
    }
    model = std::move(m);
  }
  const ModelConfig& c = model->config();
  result.arm = VScaleModeName(c.vscale);
  const int B = job.batch, T = job.seq == 0 ? c.context : job.seq;
  if (T <= 0 || T > c.context) {
    return InvalidArgumentError("the sequence length must be in [1, " + std::to_string(c.context) + "] (" +
                                context_limit + "), got " + std::to_string(T));
  }
  std::vector<int32_t> stream;
  if (!job.tokens.empty()) {
    ASSIGN_OR_RETURN(stream, ReadShard(job.tokens));
  } else {
    TextSource src;
    src.paths = {job.text};
    src.separator = job.separator;
    ASSIGN_OR_RETURN(std::vector<std::string> docs, ReadDocuments(src));
    std::string spec = job.tokenizer;
    if (spec.empty() && is_folder &&
        (std::filesystem::exists(checkpoint + "/tokenizer.json", ec) ||
         std::filesystem::exists(checkpoint + "/encoder.json", ec))) {
      spec = checkpoint;
    }
    if (spec.empty()) {
      stream = PackDocuments(docs);
    } else {
      ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::Open(spec));
      // The model's own end-of-text, as its config.json says (the first of a list).
      if (is_folder) {
        auto text = ReadRegularFile(checkpoint + "/config.json", checkpoint + "/config.json", 1 << 24);
        const nlohmann::json j = text.ok() ? nlohmann::json::parse(*text, nullptr, false) : nlohmann::json();
        if (j.is_object() && j.contains("eos_token_id")) {
          const nlohmann::json& e = j["eos_token_id"];
          if (e.is_number_integer()) tokenizer->SetEos(e.get<int32_t>());
          if (e.is_array() && !e.empty() && e[0].is_number_integer()) tokenizer->SetEos(e[0].get<int32_t>());
        }
      }
      std::vector<std::string_view> texts(docs.begin(), docs.end());
      const auto encoded =
          EncodeInParallel(*tokenizer, texts, static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
      // Each document as the model was trained to see one: its BOS (Llama 3's
      // <|begin_of_text|>, from the tokenizer's post-processor) and its EOS after it.
      for (const auto& e : encoded) {
        if (tokenizer->bos()) stream.push_back(*tokenizer->bos());
        stream.insert(stream.end(), e.begin(), e.end());
        if (tokenizer->eos()) stream.push_back(*tokenizer->eos());
      }
      say(tokenizer->description() + "; each document " +
          (tokenizer->bos() ? "begins with token " + std::to_string(*tokenizer->bos()) + " " : "") + "…" +
          (tokenizer->eos() ? " ends with token " + std::to_string(*tokenizer->eos()) : " has no end token"));
    }
  }
  const size_t need = static_cast<size_t>(B) * T + 1;
  if (stream.size() < need) {
    return InvalidArgumentError((job.tokens.empty() ? job.text : job.tokens) + " holds " +
                                std::to_string(stream.size()) + " tokens; a batch of " + std::to_string(B) + " x " +
                                std::to_string(T) + " needs " + std::to_string(need));
  }
  std::vector<int32_t> inputs(static_cast<size_t>(B) * T), targets(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (stream[i] >= c.vocab || stream[i + 1] >= c.vocab) {
      return InvalidArgumentError("token " + std::to_string(std::max(stream[i], stream[i + 1])) +
                                  " is outside the model's vocab " + std::to_string(c.vocab));
    }
    inputs[i] = stream[i];
    targets[i] = stream[i + 1];
  }
  ProbeSettings st = job.settings;
  if (!job.ref_span_given) st.ref_span = std::min(st.ref_span, T - 1);
  if (!job.profile_len_given) st.profile_len = std::min(st.profile_len, T);
  const int M = job.micro_batch == 0 ? B : std::min(job.micro_batch, B);
  const int passes = (B + M - 1) / M;
  char line[200];
  const double activations = c.ActivationBytes(M, T, result.recomputed);
  std::snprintf(line, sizeof line,
                "%d sequences of %d tokens in %d pass%s of %d; about %.2f GiB (%s weights %.2f GiB, one pass's "
                "activations %.2f GiB%s)",
                B, T, passes, passes == 1 ? "" : "es", M, (model->ParameterBytes() + activations) / (1 << 30),
                WeightDtypeName(model->matrices()), model->ParameterBytes() / (1 << 30), activations / (1 << 30),
                result.recomputed ? ", blocks recomputed in the backward" : "");
  say(line);
  DiagnosticOptions options;
  options.micro_batch = M;
  options.stop = stop;
  if (progress) {
    options.progress = [&](int done, int total) {
      progress(done, total, static_cast<double>(std::min(done * M, B)) * T);
    };
  }
  const auto start = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(result.report, RunDiagnosticPass(*model, st, inputs.data(), targets.data(), B, T,
                                                    result.checkpoint_step, options));
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.batch = B;
  result.seq = T;
  return result;
}

}  // namespace sinkscope

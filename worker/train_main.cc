// sinkscope-train: trains every arm × seed of an experiment file locally with the engine
// (no coordinator), with a live progress line, periodic validation and checkpoints,
// and prints the arms side by side. The service's workers run the same Trainer.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/convert.h"
#include "common/experiment.h"
#include "worker/engine/backend.h"
#include "worker/hf.h"
#include "worker/probe_json.h"
#include "worker/progress.h"
#include "worker/trainer.h"

namespace sinkscope {
namespace {

const char kUsage[] = R"(usage: sinkscope-train EXPERIMENT.yaml [options]

Trains every arm x seed of the experiment on the CPU backend and prints the arms side by side.

options:
  --out DIR        where runs are written (default runs/<experiment name>)
  --steps N        override train.steps
  --resume         continue each run from its latest checkpoint in --out
  --json           print the summary as JSON instead of a table
  -h, --help       this text
)";

struct RunSummary {
  std::string arm;
  uint64_t seed = 0;
  double first_loss = NAN, final_loss = NAN, val_loss = NAN, tokens_per_second = 0;
  int64_t steps = 0;
  std::string dir;
  bool probed = false;
  ProbeReport last_probe;  // the latest training-time probe
};


// The arms side by side per layer at their latest probe: the numbers behind the paper's
// Figures 1 and 7.
void PrintArmComparison(const std::vector<RunSummary>& runs) {
  std::vector<const RunSummary*> probed;
  for (const auto& r : runs) {
    if (r.probed) probed.push_back(&r);
  }
  if (probed.empty()) return;
  std::printf("\nper layer at the latest probe (step %lld): R_GS(0) | sink rate | ‖h_out‖ tok0/1-15 | top1/median\n",
              static_cast<long long>(probed[0]->last_probe.step));
  std::printf("%5s", "layer");
  for (const auto* r : probed) std::printf(" | %-34s", (r->arm + " s" + std::to_string(r->seed)).c_str());
  std::printf("\n");
  const size_t layers = probed[0]->last_probe.layers.size();
  for (size_t l = 0; l < layers; ++l) {
    std::printf("%5zu", l);
    for (const auto* r : probed) {
      const LayerProbe& p = r->last_probe.layers[l];
      std::printf(" | %7.2f %6.2f %9.2f %9.1f", p.r_gs, p.sink_rate, p.norm_ratio.at("h_out"),
                  p.massive.top1_over_median);
    }
    std::printf("\n");
  }
  std::printf("%5s", "med");
  for (const auto* r : probed) {
    std::printf(" | %7.2f [IQR %6.2f-%-6.2f]          ", r->last_probe.r_gs_median, r->last_probe.r_gs_q1,
                r->last_probe.r_gs_q3);
  }
  std::printf("\n");
}

StatusOr<RunSummary> TrainRun(const v1::Experiment& e, v1::Arm arm, uint64_t seed, const DataSplits& data,
                              const std::string& out, bool resume, Backend* backend, double peak_flops) {
  const TrainerOptions o = ToTrainerOptions(e, arm, seed, peak_flops);
  ASSIGN_OR_RETURN(auto trainer, Trainer::Create(o, &data, backend));
  RunSummary r;
  r.arm = ArmName(arm);
  r.seed = seed;
  r.dir = out + "/" + r.arm + "-s" + std::to_string(seed);
  std::filesystem::create_directories(r.dir);
  const std::string ckpt = r.dir + "/checkpoint.bin";
  if (resume && std::filesystem::exists(ckpt)) {
    RETURN_IF_ERROR(trainer->Resume(ckpt));
  } else {
    trainer->Initialize();
  }
  std::ofstream metrics(r.dir + "/metrics.jsonl", resume ? std::ios::app : std::ios::trunc);
  std::ofstream probes(r.dir + "/probes.jsonl", resume ? std::ios::app : std::ios::trunc);
  const ProbeSettings probe_settings = ToProbeSettings(e.probe());
  const ProbeBatchKind probe_batch = ToProbeBatchKind(e.probe());
  const int64_t total = e.train().steps();
  ProgressBar bar(r.arm + " seed " + std::to_string(seed), total);
  double tok_s_sum = 0, recent_loss = 0;
  int64_t timed_steps = 0, recent_count = 0;
  while (trainer->step() < total) {
    const bool probe_now = IsProbeStep(trainer->step() + 1, e.probe().every(), total);
    ProbeReport report;
    const StepStats s = probe_now ? trainer->ProbedStep(probe_settings, probe_batch, &report) : trainer->Step();
    if (probe_now && s.finite) {
      probes << ProbeReportToJson(report).dump() << "\n";
      r.last_probe = std::move(report);
      r.probed = true;
    }
    if (!s.finite) {
      RETURN_IF_ERROR(trainer->SaveCheckpoint(ckpt));  // unchanged weights: the last good state
      return Status(StatusCode::kAborted, "run " + r.arm + " seed " + std::to_string(seed) +
                                              ": NUMERICAL: loss or gradient is not finite at step " +
                                              std::to_string(s.step + 1) + "; last good checkpoint kept at " + ckpt);
    }
    if (std::isnan(r.first_loss)) r.first_loss = s.loss;
    if (s.step > 1) {  // the first step pays one-time allocation
      tok_s_sum += s.tokens_per_second;
      ++timed_steps;
    }
    if (s.step > total - 10) {
      recent_loss += s.loss;
      ++recent_count;
    }
    nlohmann::json line = {{"step", s.step}, {"loss", s.loss}, {"lr", s.lr}, {"grad_norm", s.grad_norm},
                           {"tokens_per_second", s.tokens_per_second}, {"mfu", s.mfu}};
    if (IsEveryOrLast(s.step, e.train().eval_every(), total)) {
      r.val_loss = trainer->Evaluate();
      line["val_loss"] = r.val_loss;
    }
    metrics << line.dump() << "\n";
    bar.Update(s.step, s.loss, s.tokens_per_second);
    if (IsEveryOrLast(s.step, e.checkpoint().every(), total)) RETURN_IF_ERROR(trainer->SaveCheckpoint(ckpt));
  }
  bar.Finish();
  if (std::isnan(r.val_loss)) r.val_loss = trainer->Evaluate();
  r.final_loss = recent_count ? recent_loss / recent_count : NAN;
  r.steps = trainer->step();
  r.tokens_per_second = timed_steps ? tok_s_sum / timed_steps : 0;
  if (e.checkpoint().export_hf()) RETURN_IF_ERROR(ExportHf(trainer->model(), r.dir + "/hf"));
  return r;
}

int Main(int argc, char** argv) {
  std::string file, out;
  int64_t steps = -1;
  bool resume = false, json = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a == "--out" && i + 1 < argc) {
      out = argv[++i];
    } else if (a == "--steps" && i + 1 < argc) {
      steps = std::atoll(argv[++i]);
    } else if (a == "--resume") {
      resume = true;
    } else if (a == "--json") {
      json = true;
    } else if (!a.empty() && a[0] != '-' && file.empty()) {
      file = a;
    } else {
      std::fprintf(stderr, "sinkscope-train: unknown argument %s\n%s", a.c_str(), kUsage);
      return 2;
    }
  }
  if (file.empty()) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  auto e = LoadExperimentFile(file);
  if (!e.ok()) {
    std::fprintf(stderr, "sinkscope-train: %s\n", e.status().message().c_str());
    return 2;
  }
  ApplyDefaults(*e);
  if (steps > 0) {
    e->mutable_train()->set_steps(static_cast<int32_t>(steps));
    e->mutable_train()->set_warmup_steps(std::min<int32_t>(e->train().warmup_steps(), e->train().steps()));
  }
  if (Status s = ValidateExperiment(*e, /*check_paths=*/true); !s.ok()) {
    std::fprintf(stderr, "sinkscope-train: %s: %s\n", file.c_str(), s.message().c_str());
    return 2;
  }
  if (e->resources().device() != v1::CPU) {
    std::fprintf(stderr, "sinkscope-train: resources.device: only CPU is built into this binary\n");
    return 2;
  }
  if (out.empty()) out = "runs/" + e->name();

  const DataSpec spec = ToDataSpec(*e);
  auto data = LoadData(spec);
  if (!data.ok()) {
    std::fprintf(stderr, "sinkscope-train: data: %s\n", data.status().message().c_str());
    return 2;
  }
  const double unigram = UnigramEntropy(data->val.size() > 0 ? data->val.tokens() : data->train.tokens());
  std::fprintf(stderr, "%s: %zu train / %zu validation tokens, unigram entropy %.4f nats/token\n", e->name().c_str(),
               data->train.size(), data->val.size(), unigram);

  auto backend = MakeCpuBackend();
  const double peak = MeasureGemmPeak(*backend);
  std::fprintf(stderr, "cpu backend: sgemm peak %.1f GFLOP/s (the MFU reference)\n", peak / 1e9);
  std::vector<RunSummary> runs;
  for (uint64_t seed : e->seeds()) {
    for (int a : e->arms()) {
      auto r = TrainRun(*e, static_cast<v1::Arm>(a), seed, *data, out, resume, backend.get(), peak);
      if (!r.ok()) {
        std::fprintf(stderr, "sinkscope-train: %s\n", r.status().message().c_str());
        return 1;
      }
      runs.push_back(*r);
    }
  }
  if (json) {
    nlohmann::json j = {{"experiment", e->name()}, {"unigram_entropy", unigram}, {"runs", nlohmann::json::array()}};
    for (const auto& r : runs) {
      j["runs"].push_back({{"arm", r.arm}, {"seed", r.seed}, {"steps", r.steps}, {"first_loss", r.first_loss},
                           {"final_loss", r.final_loss}, {"val_loss", r.val_loss},
                           {"tokens_per_second", r.tokens_per_second}, {"dir", r.dir}});
      if (r.probed) j["runs"].back()["last_probe"] = ProbeReportToJson(r.last_probe);
    }
    std::printf("%s\n", j.dump(1).c_str());
    return 0;
  }
  std::printf("\n%s: %lld steps of %d tokens; unigram entropy of the validation text %.4f nats/token\n",
              e->name().c_str(), static_cast<long long>(e->train().steps()),
              e->train().micro_batch() * e->train().grad_accum() * e->model().context(), unigram);
  std::printf("%-22s %6s %11s %11s %9s %10s\n", "arm", "seed", "first loss", "final loss", "val loss", "tok/s");
  for (const auto& r : runs) {
    std::printf("%-22s %6llu %11.4f %11.4f %9.4f %10.0f\n", r.arm.c_str(), static_cast<unsigned long long>(r.seed),
                r.first_loss, r.final_loss, r.val_loss, r.tokens_per_second);
  }
  PrintArmComparison(runs);
  std::printf("runs written to %s (metrics.jsonl, probes.jsonl, checkpoint.bin, hf/)\n", out.c_str());
  return 0;
}

}  // namespace
}  // namespace sinkscope

int main(int argc, char** argv) { return sinkscope::Main(argc, argv); }

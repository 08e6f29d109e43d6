// `sinkscope report`: the paper's figures from an experiment's stored steps and probe
// reports (Figures 1, 2, 3, 7, 12, 13 and the training curves), written as PNG, SVG and
// a data file each, with one index.html that shows them beside the experiment's settings.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "client/plot.h"
#include "proto/sinkscope/v1/service.pb.h"

namespace sinkscope::report {

struct ReportInput {
  v1::ExperimentSummary experiment;                          // runs and spec
  std::map<std::string, v1::GetRunMetricsResponse> metrics;  // by run id
  std::string label;  // set for a single probe (a pretrained model): shown instead of the arm
};

// A probe written by `sinkscope probe CHECKPOINT --json` (a sinkscope checkpoint or a
// Hugging Face model) as a one-run input labelled by `label`. Errors name the file and
// the key that is missing or mistyped.
StatusOr<ReportInput> ReadProbeJson(const std::string& path, const std::string& label);

// The runs sinkscope-train wrote: each dir is a run directory (holding probes.jsonl and
// metrics.jsonl, named [p<k>-]<arm>-s<seed>) or a folder of them (train's --out), all
// shown as one experiment named `label`. Errors name the file and line.
StatusOr<ReportInput> ReadTrainDirs(const std::vector<std::string>& dirs, const std::string& label);

struct ReportOptions {
  int64_t step = 0;               // probe step of the per-step figures; 0: latest probed in every run
  int layer = -1;                 // layer of Figures 2 and 12; −1: the middle layer (layers / 2)
  std::vector<std::string> arms;  // arms to show, by name ("baseline", "vscale", …); empty: all
};

struct Report {
  int64_t step = 0;  // the probe step shown
  int layer = 0;
  std::vector<std::string> arms;
  std::vector<Figure> figures;
  std::vector<std::string> notes;  // figures left out, and why
};

// Builds the figures. Errors name what is missing: an arm the experiment does not have
// (listing those it has), a run with no probe report, a step a run was not probed at
// (listing its probed steps), a layer out of range.
StatusOr<Report> BuildReport(const ReportInput& input, const ReportOptions& options);

// Writes every figure (PNG, SVG, TSV) and index.html into `dir` (created if missing).
Status WriteReport(const Report& report, const ReportInput& input, const std::string& dir);

// The lower-case name of an arm, as the CLI and experiment files write it.
std::string ArmName(v1::Arm arm);

}  // namespace sinkscope::report

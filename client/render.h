// What the `sinkscope` CLI prints, as pure functions from the service's messages to text,
// so every output format can be checked without a coordinator: tables for people, CSV
// and JSON lines for scripts, and the live view of `watch`.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "proto/sinkscope/v1/service.pb.h"

namespace sinkscope::cli {

// ---- small formatting helpers ---------------------------------------------------------

// Enum values as on the wire: "RUNNING", "FAILED_RUNS", "NUMERICAL".
std::string RunStateName(v1::RunState state);
std::string ExperimentStateName(v1::ExperimentState state);
std::string FailureReasonName(v1::FailureReason reason);
// "baseline s0": how a run is named beside its experiment.
std::string RunLabel(const v1::RunSummary& run);
// About four significant digits in a short width; "-" for NaN, "inf" for infinities.
std::string FormatNumber(double x);
// "12.34 ± 0.56" over seeds; the mean alone for one seed; "-" for none.
std::string FormatStat(const v1::Stat& stat);
// "h:mm:ss"; "-" when unknown (negative, NaN or 0 with `zero_unknown`).
std::string FormatDuration(double seconds, bool zero_unknown = true);
// "2025-11-22 15:11:02Z" (UTC); "-" for 0.
std::string FormatUnixMs(int64_t unix_ms);
// A protobuf message as JSON: proto field names, fields at their default printed too.
std::string MessageToJson(const google::protobuf::Message& message, bool pretty);

// Aligned columns separated by two spaces, a header row first; columns flagged in
// `right_aligned` (numbers) are right-aligned. Every line ends in '\n'.
std::string RenderTable(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows,
                        const std::vector<bool>& right_aligned = {});

// ---- unary commands ---------------------------------------------------------------------

// `submit`: the experiment id, its run ids and how to follow it.
std::string RenderSubmitted(const v1::SubmitExperimentResponse& response);
// `list`: one row per experiment, most recent first as the coordinator sends them.
std::string RenderExperimentList(const v1::ListExperimentsResponse& response);
// `status`, `cancel` and the end of `watch`: a header line, one row per run, then the
// failure reason and message (or cancellation message) of each run that has one.
std::string RenderExperimentStatus(const v1::ExperimentSummary& experiment);
// `compare`: per layer the arms one under the other with every probe quantity as
// mean ± std over seeds, then the summary block (median R_GS, losses, throughput).
std::string RenderComparison(const v1::CompareArmsResponse& response);

// `probe`: one report, a header (loss, batch, R_GS quartiles) and a row per layer: R_GS,
// sink rate, mean α over heads, the token-s norm ratios of h_out and v, the largest
// activation over the median and where it is.
std::string RenderProbeReport(const v1::ProbeReport& report);

// ---- export -------------------------------------------------------------------------------

// CSV of step metrics: experiment,run,arm,seed then the StepMetrics fields (val_loss
// empty where a step did not evaluate). Rows end in '\n'.
std::string StepCsvHeader();
std::string StepCsvRows(const std::string& experiment_id, const v1::GetRunMetricsResponse& metrics);
// CSV of probe reports, one row per report × layer: experiment,run,arm,seed,step, the
// report's loss and R_GS quartiles, then the layer's scalars (R_GS in both reduce modes,
// sink rates, token-s norm ratios of every site, massive activations, mean θ) and the
// per-head lists alpha and theta joined by ';'. Token-wise profiles are in JSON lines only.
std::string ProbeCsvHeader();
std::string ProbeCsvRows(const std::string& experiment_id, const v1::GetRunMetricsResponse& metrics);
// JSON lines: one object per stored step, {"experiment_id","run_id","arm","seed","step":
// StepMetrics}, then one per probe report, {..., "probe": ProbeReport}.
std::string JsonLines(const std::string& experiment_id, const v1::GetRunMetricsResponse& metrics);

// ---- watch -----------------------------------------------------------------------------------

// The state `watch` keeps from the event stream and the two ways it shows it: a frame
// redrawn in place on a terminal, or plain lines (every ~10% of a run's progress, on a
// state change, and the latest probe beside a progress line) for logs and pipes.
class WatchView {
 public:
  // Folds one event in and returns the plain lines it causes (possibly none).
  std::vector<std::string> Apply(const v1::WatchEvent& event);
  // The whole live view, one string per line: a header, then per run a progress bar
  // (step, loss, tokens/s, ETA, state) and its latest probe per layer.
  std::vector<std::string> Frame() const;
  // The last snapshot with the steps seen since folded in.
  const v1::ExperimentSummary& summary() const { return summary_; }
  bool has_snapshot() const { return has_snapshot_; }

 private:
  struct RunView {
    v1::RunSummary run;       // state as of the last snapshot, step/loss/tok/s as of the last step
    double step_seconds = 0;  // moving average of recent step times, for the ETA
    int last_decile = -1;     // plain mode: the last 10% mark printed
    bool has_probe = false;
    v1::ProbeReport probe;  // the latest probe report
    int64_t printed_probe_step = -1;
  };
  RunView& Run(const std::string& run_id);
  std::string ProgressLine(const RunView& view) const;
  std::vector<std::string> ProbeLines(const RunView& view) const;
  std::string ProbeLine(const RunView& view) const;
  double Eta(const RunView& view) const;

  bool has_snapshot_ = false;
  int64_t dropped_events_ = 0;  // the coordinator's count of events this watch lost
  v1::ExperimentSummary summary_;
  std::vector<std::string> order_;       // run ids in the coordinator's order
  std::map<std::string, RunView> runs_;  // by run id
};

}  // namespace sinkscope::cli

#include "client/render.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/type_resolver.h>
#include <google/protobuf/util/type_resolver_util.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <map>
#include <memory>

#include "schema/experiment.h"

namespace sinkscope::cli {
namespace {

// The run's worker, or the workers of its ranks in rank order ("w0,w1,…").
std::string WorkersOf(const v1::RunSummary& r) {
  if (r.rank_workers_size() <= 1) return r.worker_id();
  std::string out;
  for (const std::string& w : r.rank_workers()) out += (out.empty() ? "" : ",") + w;
  return out;
}

// The token-s norm ratios a probe reports, in the engine's order (METRICS.md).
constexpr const char* kNormRatioNames[] = {"h_in", "h_half", "h_out", "r_attn", "r_mlp", "v", "vh"};

std::string Printf(const char* format, auto... args) {
  char buf[512];
  std::snprintf(buf, sizeof buf, format, args...);
  return buf;
}

// Columns a string takes on a terminal: UTF-8 code points ("±", "θ" are one each).
size_t DisplayWidth(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

std::string Pad(const std::string& s, size_t width, bool right) {
  const size_t w = DisplayWidth(s);
  if (w >= width) return s;
  return right ? std::string(width - w, ' ') + s : s + std::string(width - w, ' ');
}

// Shortest text that reads back as the same double (CSV wants every digit).
std::string ExactNumber(double x) {
  if (std::isnan(x)) return "nan";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, x);
  return ec == std::errc() ? std::string(buf, end) : Printf("%.17g", x);
}

std::string CsvField(const std::string& s) {
  if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + "\"";
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          out += Printf("\\u%04x", c);
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

// "1 running, 1 queued" from the runs' states, in lifecycle order; zero counts left out.
std::string RunCounts(const google::protobuf::RepeatedPtrField<v1::RunSummary>& runs) {
  constexpr v1::RunState kOrder[] = {v1::RUNNING, v1::QUEUED, v1::SUCCEEDED, v1::FAILED, v1::CANCELLED};
  std::string out;
  for (v1::RunState state : kOrder) {
    const auto n = std::count_if(runs.begin(), runs.end(), [&](const v1::RunSummary& r) { return r.state() == state; });
    if (n == 0) continue;
    std::string name = RunStateName(state);
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
    out += (out.empty() ? "" : ", ") + std::to_string(n) + " " + name;
  }
  return out.empty() ? "no runs" : out;
}

double MeanTheta(const v1::LayerProbe& layer) {
  if (layer.theta().empty()) return NAN;
  double sum = 0;
  for (double t : layer.theta()) sum += t;
  return sum / layer.theta_size();
}

std::string JoinNumbers(const google::protobuf::RepeatedField<double>& values) {
  std::string out;
  for (int i = 0; i < values.size(); ++i) out += (i ? ";" : "") + ExactNumber(values[i]);
  return out;
}

double NormRatio(const v1::LayerProbe& layer, const char* name) {
  auto it = layer.norm_ratio().find(name);
  return it == layer.norm_ratio().end() ? NAN : it->second;
}

// The columns of a run that every exported row starts with.
std::string RunColumns(const std::string& experiment_id, const v1::RunSummary& run) {
  return CsvField(experiment_id) + "," + CsvField(run.run_id()) + "," + ArmName(run.arm()) + "," +
         std::to_string(run.seed()) + "," + CsvField(run.point());
}

}  // namespace

// ---- small formatting helpers ---------------------------------------------------------

std::string RunStateName(v1::RunState state) {
  const std::string& name = v1::RunState_Name(state);
  return name.empty() ? "STATE_" + std::to_string(static_cast<int>(state)) : name;
}

std::string ExperimentStateName(v1::ExperimentState state) {
  if (state == v1::EXPERIMENT_CANCELLED) return "CANCELLED";
  if (state == v1::FAILED_RUNS) return "FAILED";
  const std::string& name = v1::ExperimentState_Name(state);
  return name.empty() ? "STATE_" + std::to_string(static_cast<int>(state)) : name;
}

std::string FailureReasonName(v1::FailureReason reason) {
  const std::string& name = v1::FailureReason_Name(reason);
  return name.empty() ? "REASON_" + std::to_string(static_cast<int>(reason)) : name;
}

std::string RunLabel(const v1::RunSummary& run) {
  if (run.arm() == v1::ARM_UNSPECIFIED) return run.run_id();
  const std::string point = run.point().empty() ? "" : "p" + std::to_string(run.point_index()) + " ";
  return point + ArmName(run.arm()) + " s" + std::to_string(run.seed());
}

namespace {

// Decimals FormatNumber gives a fixed-point x; -1 where it uses another form.
int Decimals(double x) {
  const double a = std::fabs(x);
  if (!std::isfinite(x) || a == 0 || a >= 1e5 || a < 1e-3) return -1;
  return a >= 1000 ? 0 : a >= 100 ? 1 : a >= 10 ? 2 : 3;
}

}  // namespace

std::string FormatNumber(double x) {
  if (std::isnan(x)) return "-";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  if (x == 0) return "0";
  const int decimals = Decimals(x);
  return decimals < 0 ? Printf("%.3g", x) : Printf("%.*f", decimals, x);
}

std::string FormatStat(const v1::Stat& stat) {
  if (stat.n() <= 0) return "-";
  if (stat.n() == 1) return FormatNumber(stat.mean());
  // The spread to the mean's last digit, so "12.30 ± 1.56" reads as one number.
  const int decimals = Decimals(stat.mean());
  const bool fixed = decimals >= 0 && std::isfinite(stat.std()) && std::fabs(stat.std()) < 1e5;
  return FormatNumber(stat.mean()) + " ± " + (fixed ? Printf("%.*f", decimals, stat.std()) : FormatNumber(stat.std()));
}

std::string FormatDuration(double seconds, bool zero_unknown) {
  if (!(seconds >= 0) || std::isinf(seconds) || (zero_unknown && seconds == 0)) return "-";
  const long t = static_cast<long>(seconds + 0.5);
  return Printf("%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
}

std::string FormatUnixMs(int64_t unix_ms) {
  if (unix_ms <= 0) return "-";
  const std::time_t t = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm;
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%SZ", &tm);
  return buf;
}

std::string MessageToJson(const google::protobuf::Message& message, bool pretty) {
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = pretty;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  // Through a deterministic binary form, so maps (a probe report's profiles and norms)
  // come out in a fixed order and the same export twice gives the same bytes.
  static const std::unique_ptr<google::protobuf::util::TypeResolver> resolver(
      google::protobuf::util::NewTypeResolverForDescriptorPool("type.googleapis.com",
                                                               google::protobuf::DescriptorPool::generated_pool()));
  std::string binary;
  {
    google::protobuf::io::StringOutputStream stream(&binary);
    google::protobuf::io::CodedOutputStream coded(&stream);
    coded.SetSerializationDeterministic(true);
    if (!message.SerializeToCodedStream(&coded)) return "{}";
  }
  std::string out;
  if (!google::protobuf::util::BinaryToJsonString(resolver.get(),
                                                  "type.googleapis.com/" + message.GetDescriptor()->full_name(),
                                                  binary, &out, options)
           .ok()) {
    return "{}";
  }
  if (pretty && !out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

std::string RenderTable(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows,
                        const std::vector<bool>& right_aligned) {
  std::vector<size_t> width(header.size(), 0);
  for (size_t c = 0; c < header.size(); ++c) width[c] = DisplayWidth(header[c]);
  for (const auto& row : rows) {
    for (size_t c = 0; c < row.size() && c < width.size(); ++c) width[c] = std::max(width[c], DisplayWidth(row[c]));
  }
  auto line = [&](const std::vector<std::string>& cells) {
    std::string out;
    for (size_t c = 0; c < width.size(); ++c) {
      const std::string cell = c < cells.size() ? cells[c] : "";
      const bool right = c < right_aligned.size() && right_aligned[c];
      out += (c ? "  " : "") + (c + 1 == width.size() && !right ? cell : Pad(cell, width[c], right));
    }
    while (!out.empty() && out.back() == ' ') out.pop_back();
    return out + "\n";
  };
  std::string out = line(header);
  for (const auto& row : rows) out += line(row);
  return out;
}

// ---- unary commands ---------------------------------------------------------------------

std::string RenderSubmitted(const v1::SubmitExperimentResponse& response) {
  std::string out = "submitted " + response.experiment_id() + ": " + std::to_string(response.run_ids_size()) +
                    (response.run_ids_size() == 1 ? " run\n" : " runs\n");
  for (const std::string& id : response.run_ids()) out += "  " + id + "\n";
  return out;
}

std::string RenderExperimentList(const v1::ListExperimentsResponse& response) {
  if (response.experiments().empty()) return "no experiments\n";
  std::vector<std::vector<std::string>> rows;
  for (const v1::ExperimentSummary& e : response.experiments()) {
    int64_t done = 0, total = 0;
    for (const v1::RunSummary& r : e.runs()) {
      done += std::min(r.step(), r.total_steps());
      total += r.total_steps();
    }
    rows.push_back({e.experiment_id(), e.name(), ExperimentStateName(e.state()), FormatUnixMs(e.created_unix_ms()),
                    total > 0 ? Printf("%.0f%%", 100.0 * static_cast<double>(done) / static_cast<double>(total)) : "-",
                    std::to_string(e.runs_size()) + " (" + RunCounts(e.runs()) + ")"});
  }
  return RenderTable({"ID", "NAME", "STATE", "CREATED", "PROGRESS", "RUNS"}, rows,
                     {false, false, false, false, true, false});
}

std::string RenderExperimentStatus(const v1::ExperimentSummary& e) {
  std::string out = "experiment " + e.experiment_id() + (e.name().empty() ? "" : " (" + e.name() + ")") + "  " +
                    ExperimentStateName(e.state()) + "  created " + FormatUnixMs(e.created_unix_ms()) + "\n";
  out += std::to_string(e.runs_size()) + (e.runs_size() == 1 ? " run: " : " runs: ") + RunCounts(e.runs()) + "\n";
  if (e.runs().empty()) return out;
  std::vector<std::vector<std::string>> rows;
  std::string notes;
  // A large experiment is summarised: the running and failed runs first, then others, up
  // to kMaxRows rows and kMaxNotes notes (--json has every run).
  constexpr int kMaxRows = 32, kMaxNotes = 16;
  std::vector<const v1::RunSummary*> shown;
  for (const bool urgent : {true, false}) {
    for (const v1::RunSummary& r : e.runs()) {
      if ((r.state() == v1::RUNNING || r.state() == v1::FAILED) != urgent) continue;
      if (static_cast<int>(shown.size()) < kMaxRows) shown.push_back(&r);
    }
  }
  if (e.runs_size() <= kMaxRows) {  // all of them, in their own order
    shown.clear();
    for (const v1::RunSummary& r : e.runs()) shown.push_back(&r);
  }
  bool swept = false;
  for (const v1::RunSummary& r : e.runs()) swept |= !r.point().empty();
  int noted = 0, unnoted = 0;
  std::map<int, std::string> points_shown;
  for (const v1::RunSummary* run : shown) {
    const v1::RunSummary& r = *run;
    const bool started = r.step() > 0;
    if (swept) points_shown[r.point_index()] = r.point();
    rows.push_back({r.run_id(), ArmName(r.arm()), std::to_string(r.seed()), RunStateName(r.state()),
                    std::to_string(r.step()) + "/" + std::to_string(r.total_steps()),
                    started ? Printf("%.4f", r.loss()) : "-", r.has_val_loss() ? Printf("%.4f", r.val_loss()) : "-",
                    started && r.tokens_per_second() > 0 ? Printf("%.0f", r.tokens_per_second()) : "-",
                    r.state() == v1::RUNNING ? FormatDuration(r.eta_seconds()) : "-",
                    r.attempt() > 0 ? std::to_string(r.attempt()) : "-", r.worker_id().empty() ? "-" : WorkersOf(r)});
    if (r.state() != v1::FAILED && r.message().empty()) continue;
    if (noted == kMaxNotes) {
      ++unnoted;
      continue;
    }
    ++noted;
    if (r.state() == v1::FAILED) {
      notes += "  " + r.run_id() + ": FAILED (" + FailureReasonName(r.failure_reason()) + ")" +
               (r.message().empty() ? "" : ": " + r.message()) + "\n";
    } else {
      notes += "  " + r.run_id() + ": " + RunStateName(r.state()) + ": " + r.message() + "\n";
    }
  }
  if (unnoted > 0) notes += "  ... and " + std::to_string(unnoted) + " more notes\n";
  std::vector<std::string> header = {"RUN", "ARM", "SEED", "STATE", "STEP", "LOSS", "VAL LOSS", "TOK/S", "ETA",
                                     "ATTEMPT", "WORKER"};
  std::vector<bool> right = {false, false, true, false, true, true, true, true, true, true, false};
  if (swept) {  // the point's index beside the arm; its settings listed under the table
    header.insert(header.begin() + 1, "POINT");
    right.insert(right.begin() + 1, true);
    for (size_t i = 0; i < rows.size(); ++i) rows[i].insert(rows[i].begin() + 1, "p" + std::to_string(shown[i]->point_index()));
  }
  out += "\n" + RenderTable(header, rows, right);
  if (swept) {
    out += "\npoints of the sweep:\n";
    for (const auto& [index, label] : points_shown) out += "  p" + std::to_string(index) + ": " + label + "\n";
  }
  if (static_cast<int>(shown.size()) < e.runs_size()) {
    out += "... " + std::to_string(e.runs_size() - static_cast<int>(shown.size())) +
           " more runs not shown (running and failed runs come first; --json lists every run)\n";
  }
  if (!notes.empty()) out += "\n" + notes;
  return out;
}

std::string RenderOnePointComparison(const v1::CompareArmsResponse& response);

std::string RenderComparison(const v1::CompareArmsResponse& response) {
  bool swept = false;
  for (const v1::ArmComparison& a : response.arms()) swept |= !a.point().empty();
  if (!swept) return RenderOnePointComparison(response);
  // A sweep: each point's arms side by side, the points one after the other.
  std::string out;
  for (int i = 0; i < response.arms_size();) {
    v1::CompareArmsResponse one;
    one.set_experiment_id(response.experiment_id());
    const int point = response.arms(i).point_index();
    for (; i < response.arms_size() && response.arms(i).point_index() == point; ++i) *one.add_arms() = response.arms(i);
    out += (out.empty() ? "" : "\n") + std::string("==== point p") + std::to_string(point) + ": " +
           one.arms(0).point() + "\n" + RenderOnePointComparison(one);
  }
  return out;
}

std::string RenderOnePointComparison(const v1::CompareArmsResponse& response) {
  if (response.arms().empty()) return "experiment " + response.experiment_id() + ": no arms to compare\n";
  bool same_step = true;
  for (const v1::ArmComparison& a : response.arms()) same_step &= a.step() == response.arms(0).step();
  std::string out = "experiment " + response.experiment_id();
  if (same_step) {
    out += " at probe step " + std::to_string(response.arms(0).step());
  } else {
    out += " at probe steps";
    for (const v1::ArmComparison& a : response.arms())
      out += std::string(" ") + ArmName(a.arm()) + " " + std::to_string(a.step());
  }
  out += " (mean ± std over seeds)\n\n";

  // Per layer, the arms one under the other so each quantity reads down a column.
  std::vector<int> layers;
  for (const v1::ArmComparison& a : response.arms()) {
    for (const v1::LayerComparison& l : a.layers()) layers.push_back(l.layer());
  }
  std::sort(layers.begin(), layers.end());
  layers.erase(std::unique(layers.begin(), layers.end()), layers.end());
  if (layers.empty()) {
    out += "no probe reports to compare yet\n";
  } else {
    std::vector<std::vector<std::string>> rows;
    for (int layer : layers) {
      bool first = true;
      for (const v1::ArmComparison& a : response.arms()) {
        for (const v1::LayerComparison& l : a.layers()) {
          if (l.layer() != layer) continue;
          rows.push_back({first ? std::to_string(layer) : "", ArmName(a.arm()), std::to_string(l.r_gs().n()),
                          FormatStat(l.r_gs()), FormatStat(l.sink_rate()), FormatStat(l.h_out_ratio()),
                          FormatStat(l.r_mlp_ratio()), FormatStat(l.r_attn_ratio()), FormatStat(l.v_ratio()),
                          FormatStat(l.top1_over_median()), FormatStat(l.mean_theta())});
          first = false;
        }
      }
    }
    out += RenderTable({"LAYER", "ARM", "SEEDS", "R_GS", "SINK RATE", "H_OUT RATIO", "R_MLP RATIO", "R_ATTN RATIO",
                        "V RATIO", "TOP1/MEDIAN", "MEAN θ"},
                       rows, {true, false, true, true, true, true, true, true, true, true, true});
    // The attention arms' own observables (docs/design/ARMS.md "Probes"), for the arms that have them.
    std::vector<std::vector<std::string>> arm_rows;
    for (int layer : layers) {
      for (const v1::ArmComparison& a : response.arms()) {
        for (const v1::LayerComparison& l : a.layers()) {
          if (l.layer() != layer || (l.unassigned_mass().n() == 0 && l.gate_mean().n() == 0)) continue;
          auto stat = [](const v1::Stat& s) { return s.n() == 0 ? std::string("-") : FormatStat(s); };
          arm_rows.push_back({std::to_string(layer), ArmName(a.arm()), stat(l.unassigned_mass()), stat(l.gate_mean()),
                              stat(l.gate_sink()), stat(l.gate_rest())});
        }
      }
    }
    if (!arm_rows.empty()) {
      out += "\n" + RenderTable({"LAYER", "ARM", "UNASSIGNED MASS", "GATE MEAN", "GATE AT s", "GATE 1-15"}, arm_rows,
                                {true, false, true, true, true, true});
    }
  }

  std::vector<std::string> header = {"SUMMARY"};
  std::vector<bool> right = {false};
  for (const v1::ArmComparison& a : response.arms()) {
    const int n = std::max({a.r_gs_median().n(), a.final_loss().n(), a.val_loss().n()});
    header.push_back(std::string(ArmName(a.arm())) + " (" + std::to_string(n) + (n == 1 ? " seed)" : " seeds)"));
    right.push_back(true);
  }
  std::vector<std::vector<std::string>> rows(4);
  // R_GS at the probe step compared; the losses at each run's latest step, and the mean
  // tokens/s of its steps after step 1 (which pays one-time set-up).
  rows[0] = {"median R_GS"};
  rows[1] = {"final loss (latest step)"};
  rows[2] = {"val loss (latest eval)"};
  rows[3] = {"tok/s (mean, steps ≥ 2)"};
  for (const v1::ArmComparison& a : response.arms()) {
    rows[0].push_back(FormatStat(a.r_gs_median()));
    rows[1].push_back(FormatStat(a.final_loss()));
    rows[2].push_back(FormatStat(a.val_loss()));
    rows[3].push_back(FormatStat(a.tokens_per_second()));
  }
  out += "\n" + RenderTable(header, rows, right);
  return out;
}

// ---- export -------------------------------------------------------------------------------

std::string RenderProbeReport(const v1::ProbeReport& report) {
  std::string out = Printf("step %lld, %d sequences x %d tokens, loss %s; R_GS median %s (IQR %s to %s)\n",
                           static_cast<long long>(report.step()), report.batch_sequences(), report.seq_len(),
                           FormatNumber(report.loss()).c_str(), FormatNumber(report.r_gs_median()).c_str(),
                           FormatNumber(report.r_gs_q1()).c_str(), FormatNumber(report.r_gs_q3()).c_str());
  auto ratio = [](const v1::LayerProbe& l, const char* name) {
    auto it = l.norm_ratio().find(name);
    return it == l.norm_ratio().end() ? std::string("-") : FormatNumber(it->second);
  };
  std::vector<std::vector<std::string>> rows;
  for (const v1::LayerProbe& l : report.layers()) {
    double alpha = 0;
    for (double a : l.alpha()) alpha += a / std::max(1, l.alpha_size());
    const v1::MassiveActivations& m = l.massive();
    rows.push_back({std::to_string(l.layer()), FormatNumber(l.r_gs()), FormatNumber(l.sink_rate()),
                    l.alpha_size() ? FormatNumber(alpha) : "-", ratio(l, "h_out"), ratio(l, "v"),
                    FormatNumber(m.top1_over_median()),
                    Printf("seq %lld tok %d ch %d", static_cast<long long>(m.top1_sequence()), m.top1_token(),
                           m.top1_channel())});
  }
  out += RenderTable({"layer", "R_GS", "sink rate", "mean alpha_s", "h_out s/ref", "v s/ref", "top1/median",
                       "largest at"},
                      rows, {true, true, true, true, true, true, true, false});
  // The attention arms' own observables, means over heads (docs/design/ARMS.md "Probes").
  std::vector<std::vector<std::string>> arm_rows;
  auto mean = [](const auto& values) {
    double m = 0;
    for (double x : values) m += x / values.size();
    return FormatNumber(m);
  };
  for (const v1::LayerProbe& l : report.layers()) {
    if (l.unassigned_mass_size() == 0 && l.gate_mean_size() == 0) continue;
    arm_rows.push_back({std::to_string(l.layer()), l.unassigned_mass_size() ? mean(l.unassigned_mass()) : "-",
                        l.gate_mean_size() ? mean(l.gate_mean()) : "-", l.gate_sink_size() ? mean(l.gate_sink()) : "-",
                        l.gate_rest_size() ? mean(l.gate_rest()) : "-"});
  }
  if (!arm_rows.empty()) {
    out += RenderTable({"layer", "unassigned mass", "gate mean", "gate at s", "gate 1-15"}, arm_rows,
                       {true, true, true, true, true});
  }
  return out;
}

std::string StepCsvHeader() {
  return "experiment,run,arm,seed,point,step,loss,learning_rate,grad_norm,tokens_per_second,mfu,val_loss,step_seconds\n";
}

std::string StepCsvRows(const std::string& experiment_id, const v1::GetRunMetricsResponse& metrics) {
  const std::string prefix = RunColumns(experiment_id, metrics.run());
  std::string out;
  for (const v1::StepMetrics& s : metrics.steps()) {
    out += prefix + "," + std::to_string(s.step()) + "," + ExactNumber(s.loss()) + "," +
           ExactNumber(s.learning_rate()) + "," + ExactNumber(s.grad_norm()) + "," +
           ExactNumber(s.tokens_per_second()) + "," + ExactNumber(s.mfu()) + "," +
           (s.has_val_loss() ? ExactNumber(s.val_loss()) : "") + "," + ExactNumber(s.step_seconds()) + "\n";
  }
  return out;
}

std::string ProbeCsvHeader() {
  std::string out =
      "experiment,run,arm,seed,point,step,probe_loss,batch_sequences,seq_len,r_gs_median,r_gs_q1,r_gs_q3,layer,r_gs,"
      "r_gs_sum_then_norm,r_gs_norm_then_mean,sink_rate,sink_rate_per_sample";
  for (const char* name : kNormRatioNames) out += std::string(",norm_ratio_") + name;
  return out + ",massive_top1,massive_median,top1_over_median,mean_theta,alpha,theta\n";
}

std::string ProbeCsvRows(const std::string& experiment_id, const v1::GetRunMetricsResponse& metrics) {
  const std::string prefix = RunColumns(experiment_id, metrics.run());
  std::string out;
  for (const v1::ProbeReport& p : metrics.probes()) {
    const std::string report = prefix + "," + std::to_string(p.step()) + "," + ExactNumber(p.loss()) + "," +
                               std::to_string(p.batch_sequences()) + "," + std::to_string(p.seq_len()) + "," +
                               ExactNumber(p.r_gs_median()) + "," + ExactNumber(p.r_gs_q1()) + "," +
                               ExactNumber(p.r_gs_q3());
    for (const v1::LayerProbe& l : p.layers()) {
      out += report + "," + std::to_string(l.layer()) + "," + ExactNumber(l.r_gs()) + "," +
             ExactNumber(l.r_gs_sum_then_norm()) + "," + ExactNumber(l.r_gs_norm_then_mean()) + "," +
             ExactNumber(l.sink_rate()) + "," + ExactNumber(l.sink_rate_per_sample());
      for (const char* name : kNormRatioNames) {
        const double r = NormRatio(l, name);
        out += "," + (std::isnan(r) ? std::string() : ExactNumber(r));
      }
      const double top1 = l.massive().top3().empty() ? NAN : l.massive().top3(0);
      const double theta = MeanTheta(l);
      out += "," + (std::isnan(top1) ? std::string() : ExactNumber(top1)) + "," + ExactNumber(l.massive().median()) +
             "," + ExactNumber(l.massive().top1_over_median()) + "," +
             (std::isnan(theta) ? std::string() : ExactNumber(theta)) + "," + JoinNumbers(l.alpha()) + "," +
             JoinNumbers(l.theta()) + "\n";
    }
  }
  return out;
}

std::string JsonLines(const std::string& experiment_id, const v1::GetRunMetricsResponse& metrics) {
  const v1::RunSummary& run = metrics.run();
  const std::string prefix =
      "{\"experiment_id\":" + JsonString(experiment_id) + ",\"run_id\":" + JsonString(run.run_id()) +
      ",\"arm\":" + JsonString(v1::Arm_Name(run.arm())) + ",\"seed\":\"" + std::to_string(run.seed()) + "\"" +
      (run.point().empty() ? "" : ",\"point\":" + JsonString(run.point()));
  std::string out;
  for (const v1::StepMetrics& s : metrics.steps()) out += prefix + ",\"step\":" + MessageToJson(s, false) + "}\n";
  for (const v1::ProbeReport& p : metrics.probes()) out += prefix + ",\"probe\":" + MessageToJson(p, false) + "}\n";
  return out;
}

// ---- watch -----------------------------------------------------------------------------------

namespace {
// The mean of a per-head list (NaN when empty).
double HeadMean(const google::protobuf::RepeatedField<double>& values) {
  if (values.empty()) return NAN;
  double m = 0;
  for (double x : values) m += x / values.size();
  return m;
}
}  // namespace

WatchView::RunView& WatchView::Run(const std::string& run_id) {
  auto [it, fresh] = runs_.try_emplace(run_id);
  if (fresh) {
    it->second.run.set_run_id(run_id);
    order_.push_back(run_id);
  }
  return it->second;
}

double WatchView::Eta(const RunView& v) const {
  const int64_t left = v.run.total_steps() - v.run.step();
  if (v.run.state() != v1::RUNNING || left <= 0) return 0;
  if (v.step_seconds > 0) return v.step_seconds * static_cast<double>(left);
  return v.run.eta_seconds();
}

std::string WatchView::ProgressLine(const RunView& v) const {
  const v1::RunSummary& r = v.run;
  const int width = 24;
  const int64_t total = r.total_steps();
  const int64_t done = std::clamp<int64_t>(r.step(), 0, std::max<int64_t>(total, 0));
  const int filled = total > 0 ? static_cast<int>(width * done / total) : 0;
  std::string line =
      Printf("%-22s [%s%s] %6lld/%-6lld", RunLabel(r).c_str(), std::string(filled, '#').c_str(),
             std::string(width - filled, '.').c_str(), static_cast<long long>(r.step()), static_cast<long long>(total));
  if (r.step() > 0) {
    line += Printf(" loss %7.4f  %8.0f tok/s", r.loss(), r.tokens_per_second());
  } else {
    line += Printf(" loss %7s  %8s tok/s", "-", "-");
  }
  line += "  ETA " + Printf("%-7s", FormatDuration(Eta(v)).c_str()) + "  " + RunStateName(r.state());
  if (r.attempt() > 1) line += " (attempt " + std::to_string(r.attempt()) + ")";
  return line;
}

std::vector<std::string> WatchView::ProbeLines(const RunView& v) const {
  if (!v.has_probe) return {};
  const v1::ProbeReport& p = v.probe;
  std::vector<std::string> lines;
  lines.push_back(Printf("    probe @ step %lld: R_GS median %s (IQR %s-%s), probe loss %.4f",
                         static_cast<long long>(p.step()), FormatNumber(p.r_gs_median()).c_str(),
                         FormatNumber(p.r_gs_q1()).c_str(), FormatNumber(p.r_gs_q3()).c_str(), p.loss()));
  std::string header = Printf("    %-13s", "layer");
  std::string rgs = Printf("    %-13s", "R_GS"), sink = Printf("    %-13s", "sink rate");
  struct Ratio {
    const char* name;
    std::string line;
  };
  std::vector<Ratio> ratios = {{"h_out", ""}, {"r_attn", ""}, {"r_mlp", ""}, {"v", ""}};
  for (auto& r : ratios) r.line = Printf("    %-13s", (std::string(r.name) + " ratio").c_str());
  for (const v1::LayerProbe& l : p.layers()) {
    header += Printf(" %7d", l.layer());
    rgs += Printf(" %7s", FormatNumber(l.r_gs()).c_str());
    sink += Printf(" %7s", FormatNumber(l.sink_rate()).c_str());
    for (auto& r : ratios) r.line += Printf(" %7s", FormatNumber(NormRatio(l, r.name)).c_str());
  }
  lines.push_back(header);
  lines.push_back(rgs);
  lines.push_back(sink);
  for (auto& r : ratios) lines.push_back(r.line);
  // The attention arms' own observables, means over heads (docs/design/ARMS.md "Probes").
  std::string unassigned = Printf("    %-13s", "unassigned"), gate_sink = Printf("    %-13s", "gate s/1-15");
  bool any_unassigned = false, any_gate = false;
  for (const v1::LayerProbe& l : p.layers()) {
    any_unassigned |= l.unassigned_mass_size() > 0;
    any_gate |= l.gate_mean_size() > 0;
    unassigned += Printf(" %7s", l.unassigned_mass_size() ? FormatNumber(HeadMean(l.unassigned_mass())).c_str() : "-");
    gate_sink += Printf(" %7s", l.gate_sink_size() && l.gate_rest_size()
                                    ? FormatNumber(HeadMean(l.gate_sink()) / HeadMean(l.gate_rest())).c_str()
                                    : "-");
  }
  if (any_unassigned) lines.push_back(unassigned);
  if (any_gate) lines.push_back(gate_sink);
  return lines;
}

std::string WatchView::ProbeLine(const RunView& v) const {
  const v1::ProbeReport& p = v.probe;
  // The same numbers as the terminal view's probe block, on one line.
  std::string rgs, sink, ratios[4];
  static const char* const kRatios[4] = {"h_out", "r_attn", "r_mlp", "v"};
  for (const v1::LayerProbe& l : p.layers()) {
    rgs += " " + FormatNumber(l.r_gs());
    sink += " " + FormatNumber(l.sink_rate());
    for (int i = 0; i < 4; ++i) ratios[i] += " " + FormatNumber(NormRatio(l, kRatios[i]));
  }
  std::string line = Printf("%-22s probe step %lld: R_GS median %s; per layer R_GS", RunLabel(v.run).c_str(),
                            static_cast<long long>(p.step()), FormatNumber(p.r_gs_median()).c_str()) +
                     rgs + " | sink rate" + sink;
  for (int i = 0; i < 4; ++i) line += std::string(" | ") + kRatios[i] + " ratio" + ratios[i];
  std::string unassigned, gate;
  for (const v1::LayerProbe& l : p.layers()) {
    if (l.unassigned_mass_size() > 0) unassigned += " " + FormatNumber(HeadMean(l.unassigned_mass()));
    if (l.gate_sink_size() > 0 && l.gate_rest_size() > 0) {
      gate += " " + FormatNumber(HeadMean(l.gate_sink()) / HeadMean(l.gate_rest()));
    }
  }
  if (!unassigned.empty()) line += " | unassigned" + unassigned;
  if (!gate.empty()) line += " | gate s/1-15" + gate;
  return line;
}

std::vector<std::string> WatchView::Apply(const v1::WatchEvent& event) {
  std::vector<std::string> lines;
  // A progress line at each new 10% mark (and at the end), the latest unprinted probe beside it.
  auto progress = [&](RunView& v) {
    const int64_t total = v.run.total_steps();
    const int decile = total > 0 ? static_cast<int>(10 * std::clamp<int64_t>(v.run.step(), 0, total) / total) : 0;
    if (decile <= v.last_decile) return;
    v.last_decile = std::max(v.last_decile, decile);
    lines.push_back(ProgressLine(v));
    if (v.has_probe && v.probe.step() != v.printed_probe_step) {
      lines.push_back(ProbeLine(v));
      v.printed_probe_step = v.probe.step();
    }
  };
  switch (event.event_case()) {
    case v1::WatchEvent::kSnapshot: {
      const bool first = !has_snapshot_;
      summary_ = event.snapshot();
      has_snapshot_ = true;
      if (event.dropped_events() > dropped_events_) {
        lines.push_back("(this watch fell behind: the coordinator dropped " +
                        std::to_string(event.dropped_events() - dropped_events_) +
                        " events; showing the latest state)");
        dropped_events_ = event.dropped_events();
      }
      if (first) {
        lines.push_back("watching " + summary_.experiment_id() +
                        (summary_.name().empty() ? "" : " (" + summary_.name() + ")") + ": " +
                        ExperimentStateName(summary_.state()) + ", " + std::to_string(summary_.runs_size()) +
                        " runs: " + RunCounts(summary_.runs()));
      }
      for (const v1::RunSummary& r : summary_.runs()) {
        const bool known = runs_.count(r.run_id()) > 0;
        RunView& v = Run(r.run_id());
        const v1::RunSummary streamed = v.run;
        v.run = r;
        // Steps streamed since the snapshot was taken are newer, unless the run restarted
        // from a checkpoint (a new attempt), which takes it back.
        if (known && streamed.attempt() == r.attempt() && streamed.step() >= r.step() && streamed.step() > 0) {
          v.run.set_step(streamed.step());
          v.run.set_loss(streamed.loss());
          v.run.set_tokens_per_second(streamed.tokens_per_second());
          if (!r.has_val_loss() && streamed.has_val_loss()) v.run.set_val_loss(streamed.val_loss());
        }
        const v1::RunState before = streamed.state();
        if (!known || before != r.state()) {
          std::string line = Printf("%-22s %s", RunLabel(r).c_str(), RunStateName(r.state()).c_str());
          if (r.state() == v1::RUNNING) {
            line += " at step " + std::to_string(v.run.step()) + "/" + std::to_string(r.total_steps()) + " (attempt " +
                    std::to_string(r.attempt()) + (r.worker_id().empty() ? "" : (r.rank_workers_size() > 1 ? ", workers " : ", worker ") + WorkersOf(r)) + ")";
          } else if (r.state() == v1::FAILED) {
            line += " (" + FailureReasonName(r.failure_reason()) + ") at step " + std::to_string(v.run.step());
          } else if (r.state() == v1::SUCCEEDED) {
            line += Printf(": loss %.4f", v.run.loss());
            if (v.run.has_val_loss()) line += Printf(", val loss %.4f", v.run.val_loss());
          }
          if (!r.message().empty()) line += ": " + r.message();
          lines.push_back(line);
          if (r.state() == v1::SUCCEEDED) progress(v);
          if (r.state() != v1::RUNNING && r.state() != v1::QUEUED && v.has_probe &&
              v.probe.step() != v.printed_probe_step) {  // the run's last probe
            lines.push_back(ProbeLine(v));
            v.printed_probe_step = v.probe.step();
          }
        }
        // A run already under way when watching starts gets its 10% mark without a repeat.
        if (!known && v.run.total_steps() > 0) {
          v.last_decile =
              static_cast<int>(10 * std::clamp<int64_t>(v.run.step(), 0, v.run.total_steps()) / v.run.total_steps());
        }
      }
      break;
    }
    case v1::WatchEvent::kStep: {
      const v1::StepMetrics& m = event.step().metrics();
      RunView& v = Run(event.step().run_id());
      v.run.set_step(m.step());
      v.run.set_loss(m.loss());
      v.run.set_tokens_per_second(m.tokens_per_second());
      if (m.has_val_loss()) v.run.set_val_loss(m.val_loss());
      if (m.step_seconds() > 0) {
        v.step_seconds = v.step_seconds > 0 ? 0.9 * v.step_seconds + 0.1 * m.step_seconds() : m.step_seconds();
      }
      progress(v);
      break;
    }
    case v1::WatchEvent::kProbe: {
      RunView& v = Run(event.probe().run_id());
      v.probe = event.probe().report();
      v.has_probe = true;
      break;
    }
    default:
      break;
  }
  return lines;
}

std::vector<std::string> WatchView::Frame() const {
  std::vector<std::string> lines;
  if (!has_snapshot_) {
    lines.push_back("waiting for the first snapshot ...");
    return lines;
  }
  int running = 0, queued = 0, ended = 0;
  for (const auto& [id, v] : runs_) {
    running += v.run.state() == v1::RUNNING;
    queued += v.run.state() == v1::QUEUED;
    ended += v.run.state() == v1::SUCCEEDED || v.run.state() == v1::FAILED || v.run.state() == v1::CANCELLED;
  }
  lines.push_back(summary_.experiment_id() + (summary_.name().empty() ? "" : " (" + summary_.name() + ")") + "  " +
                  ExperimentStateName(summary_.state()) +
                  Printf("  %d running, %d queued, %d ended", running, queued, ended));
  for (const std::string& id : order_) {
    const RunView& v = runs_.at(id);
    lines.push_back(ProgressLine(v));
    if (v.run.state() == v1::FAILED) {
      lines.push_back("    " + FailureReasonName(v.run.failure_reason()) +
                      (v.run.message().empty() ? "" : ": " + v.run.message()));
    }
    for (std::string& l : ProbeLines(v)) lines.push_back(std::move(l));
  }
  return lines;
}

}  // namespace sinkscope::cli

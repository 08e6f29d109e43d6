#include "client/report.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>
#include <sstream>

#include "client/render.h"
#include "base/files.h"
#include "base/numbers.h"

namespace sinkscope::report {
namespace {

using cli::ExperimentStateName;
using cli::FormatUnixMs;
using cli::MessageToJson;
using cli::RunStateName;

std::string Num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

std::string JoinSteps(const std::vector<int64_t>& steps) {
  std::string s;
  for (int64_t v : steps) s += (s.empty() ? "" : ", ") + std::to_string(v);
  return s.empty() ? "none" : s;
}

int ArmColor(v1::Arm arm) {
  switch (arm) {
    case v1::BASELINE: return kBaseline;
    case v1::VSCALE: return kVScale;
    case v1::VSCALE_BACKWARD_ONLY: return kBackwardOnly;
    case v1::SINK_LOGIT:
    case v1::SINK_LOGIT_VSCALE: return kSinkLogit;
    case v1::SOFTMAX_PLUS_ONE:
    case v1::SOFTMAX_PLUS_ONE_VSCALE: return kSoftmaxPlusOne;
    case v1::GATED_OUTPUT:
    case v1::GATED_OUTPUT_VSCALE: return kGatedOutput;
    case v1::GATED_HEAD:
    case v1::GATED_HEAD_VSCALE: return kGatedHead;
    case v1::GATED_VALUE: return kGatedValue;
    case v1::SIGMOID:
    case v1::SIGMOID_VSCALE: return kSigmoid;
    case v1::SOFTPICK:
    case v1::SOFTPICK_VSCALE: return kSoftpick;
    default: return kPurple;
  }
}

// Mean and sample standard deviation (0 for one value).
std::pair<double, double> MeanStd(const std::vector<double>& v) {
  if (v.empty()) return {NAN, NAN};
  const double mean = std::accumulate(v.begin(), v.end(), 0.0) / v.size();
  if (v.size() < 2) return {mean, 0.0};
  double ss = 0;
  for (double x : v) ss += (x - mean) * (x - mean);
  return {mean, std::sqrt(ss / (v.size() - 1))};
}

const v1::ProbeReport* ProbeAt(const v1::GetRunMetricsResponse& m, int64_t step) {
  for (const v1::ProbeReport& p : m.probes()) {
    if (p.step() == step) return &p;
  }
  return nullptr;
}

std::vector<int64_t> ProbedSteps(const v1::GetRunMetricsResponse& m) {
  std::vector<int64_t> steps;
  for (const v1::ProbeReport& p : m.probes()) steps.push_back(p.step());
  return steps;
}

const std::vector<double> Values(const v1::LayerProbe& lp, const google::protobuf::Map<std::string, v1::Series>& map,
                                 const std::string& key) {
  auto it = map.find(key);
  if (it == map.end()) return {};
  return {it->second.values().begin(), it->second.values().end()};
}

// Tokens of Figure 7's reference window: 1…15 other than s, within the P tokens kept.
std::vector<int> ReferenceTokens(int s, int P) {
  std::vector<int> t;
  for (int i = 1; i <= std::min(15, P - 1); ++i) {
    if (i != s) t.push_back(i);
  }
  return t;
}

// Token groups of Figures 3 and 10: 0, 1, 2–3, 4–7, 8–15.
int TokenGroup(int t) { return t == 0 ? 0 : t == 1 ? 1 : t < 4 ? 2 : t < 8 ? 3 : 4; }
const char* const kGroupLabels[] = {"t = 0", "t = 1", "t = 2-3", "t = 4-7", "t = 8-15"};

// Appends the mean of one value per seed at x, ± its sample std when there are several
// seeds, tagged with how many seeds it has.
void AddMeanOverSeeds(Series& s, double x, const std::vector<double>& values, bool spread) {
  auto [mean, std] = MeanStd(values);
  s.x.push_back(x);
  s.y.push_back(mean);
  if (spread) s.err.push_back(std);
  s.tags.push_back("n=" + std::to_string(values.size()));
}

Series MakeSeries(std::string label, Style style, int color) {
  Series s;
  s.label = std::move(label);
  s.style = style;
  s.color = color;
  return s;
}

// One arm's runs, ordered by seed.
struct ArmRuns {
  v1::Arm arm;
  std::string name;
  std::vector<const v1::RunSummary*> runs;
};

class Builder {
 public:
  Builder(const ReportInput& in, const ReportOptions& opt) : in_(in), opt_(opt) {}

  StatusOr<Report> Build() {
    const v1::Experiment& spec = in_.experiment.spec();
    RETURN_IF_ERROR(SelectArms());
    layers_ = spec.model().layers();
    s_ = spec.probe().sink_position();
    RETURN_IF_ERROR(SelectStep());
    report_.layer = opt_.layer >= 0 ? opt_.layer : layers_ / 2;
    if (report_.layer >= layers_) {
      return InvalidArgumentError("--layer " + std::to_string(report_.layer) + " is out of range: the model has " +
                                  std::to_string(layers_) + " layers (0…" + std::to_string(layers_ - 1) + ")");
    }
    report_.step = step_;
    for (const ArmRuns& a : arms_) report_.arms.push_back(a.name);
    report_.figures.push_back(GradientSinks());
    report_.figures.push_back(PathProfiles());
    report_.figures.push_back(Reshaping());
    report_.figures.push_back(SinkRateAndNorms());
    if (std::optional<Figure> f = ArmObservables()) report_.figures.push_back(std::move(*f));
    report_.figures.push_back(ValueNorms());
    if (std::optional<Figure> f = Theta()) {
      report_.figures.push_back(std::move(*f));
    } else {
      report_.notes.push_back("Figure 13 (learned θ) is left out: no V-scale arm is shown.");
    }
    bool any_steps = false;
    for (const auto& [id, m] : in_.metrics) any_steps = any_steps || !m.steps().empty();
    if (any_steps) {
      report_.figures.push_back(TrainingCurves());
    } else {
      report_.notes.push_back("The training curves are left out: no training step is stored.");
    }
    return report_;
  }

 private:
  Status SelectArms() {
    const v1::Experiment& spec = in_.experiment.spec();
    std::vector<v1::Arm> order;
    for (int a : spec.arms()) order.push_back(static_cast<v1::Arm>(a));
    for (const v1::RunSummary& r : in_.experiment.runs()) {
      if (std::find(order.begin(), order.end(), r.arm()) == order.end()) order.push_back(r.arm());
    }
    std::string known;
    for (v1::Arm a : order) known += (known.empty() ? "" : ", ") + ArmName(a);
    std::vector<v1::Arm> chosen;
    if (opt_.arms.empty()) {
      chosen = order;
    } else {
      for (const std::string& name : opt_.arms) {
        auto it = std::find_if(order.begin(), order.end(), [&](v1::Arm a) { return ArmName(a) == name; });
        if (it == order.end()) {
          return NotFoundError("experiment " + in_.experiment.experiment_id() + " has no arm " + name +
                               " (its arms: " + known + ")");
        }
        if (std::find(chosen.begin(), chosen.end(), *it) == chosen.end()) chosen.push_back(*it);
      }
    }
    for (v1::Arm a : chosen) {
      ArmRuns ar{a, in_.label.empty() ? ArmName(a) : in_.label, {}};
      for (const v1::RunSummary& r : in_.experiment.runs()) {
        if (r.arm() == a) ar.runs.push_back(&r);
      }
      std::sort(ar.runs.begin(), ar.runs.end(), [](auto* x, auto* y) { return x->seed() < y->seed(); });
      if (ar.runs.empty()) return NotFoundError("arm " + ar.name + " has no runs");
      arms_.push_back(std::move(ar));
    }
    if (arms_.empty()) return NotFoundError("experiment " + in_.experiment.experiment_id() + " has no runs");
    return OkStatus();
  }

  const v1::GetRunMetricsResponse& Metrics(const v1::RunSummary* r) const { return in_.metrics.at(r->run_id()); }

  Status SelectStep() {
    std::optional<int64_t> common;
    for (const ArmRuns& a : arms_) {
      for (const v1::RunSummary* r : a.runs) {
        const auto& m = Metrics(r);
        if (m.probes().empty()) {
          return NotFoundError("run " + r->run_id() + " has no probe report (probe.every is " +
                               std::to_string(in_.experiment.spec().probe().every()) +
                               "; a run is probed at step 1 and every probe.every steps)");
        }
        if (opt_.step > 0) {
          if (ProbeAt(m, opt_.step) == nullptr) {
            return NotFoundError("run " + r->run_id() + " was not probed at step " + std::to_string(opt_.step) +
                                 "; probed steps: " + JoinSteps(ProbedSteps(m)));
          }
        } else {
          const int64_t latest = m.probes(m.probes_size() - 1).step();
          common = common ? std::min(*common, latest) : latest;
        }
      }
    }
    step_ = opt_.step > 0 ? opt_.step : *common;
    if (opt_.step == 0) {
      // The latest step every run was probed at: the minimum of the latest steps must be
      // a probed step of every run (it is when runs share probe.every).
      for (const ArmRuns& a : arms_) {
        for (const v1::RunSummary* r : a.runs) {
          if (ProbeAt(Metrics(r), step_) == nullptr) {
            return NotFoundError("no step is probed in every run: run " + r->run_id() + " was not probed at step " +
                                 std::to_string(step_) + "; give --step");
          }
        }
      }
    }
    return OkStatus();
  }

  // The first seed's probe at the report step.
  const v1::ProbeReport& FirstSeedProbe(const ArmRuns& a) const { return *ProbeAt(Metrics(a.runs[0]), step_); }
  // "baseline, seed 0" — or just the label of a single probe, which has no seed.
  std::string Who(const ArmRuns& a) const {
    return in_.label.empty() ? a.name + ", seed " + std::to_string(a.runs[0]->seed()) : a.name;
  }

  Figure GradientSinks() {
    Figure f;
    f.name = "fig01_gradient_sinks";
    f.title = "Gradient sinks (Figures 1, 6, 14): token-wise gradient norms at x̃ per layer";
    f.caption = "Each dot is N_t = ‖Σ_b ∂L/∂x̃[b,t]‖ (the probe's reduce mode) of one token t < P at the "
                "attention input after the block's RMSNorm; token s = " + std::to_string(s_) +
                " in red. R_GS(s) is Definition 1 over tokens 0…T_e. First seed of each arm, step " +
                std::to_string(step_) + ".";
    f.columns = static_cast<int>(arms_.size());
    f.width = 650 * f.columns;
    f.height = 560;
    for (const ArmRuns& a : arms_) {
      const v1::ProbeReport& p = FirstSeedProbe(a);
      Panel panel;
      panel.key = a.name;
      panel.title = Who(a) + ": median R#dGS#u " + Num(p.r_gs_median()) + ", IQR " +
                    Num(p.r_gs_q1()) + "-" + Num(p.r_gs_q3());
      panel.x_label = "layer ℓ";
      panel.y_label = "log#d10#u N#dt#u at x̃";
      panel.log_y = true;
      panel.integer_x = true;
      Series rest = MakeSeries("tokens t ≠ s", Style::kPoints, kGray);
      rest.symbol_size = 0.7;
      Series sink = MakeSeries("token s = " + std::to_string(s_), Style::kLinePoints, kHighlight);
      sink.symbol_size = 1.2;
      for (const v1::LayerProbe& lp : p.layers()) {
        const std::vector<double> n = Values(lp, lp.grad_profile(), "xn");
        for (int t = 0; t < static_cast<int>(n.size()); ++t) {
          Series& into = t == s_ ? sink : rest;
          into.x.push_back(lp.layer());
          into.y.push_back(n[t]);
          into.tags.push_back("t=" + std::to_string(t));
        }
      }
      panel.series = {std::move(rest), std::move(sink)};
      f.panels.push_back(std::move(panel));
    }
    return f;
  }

  Figure PathProfiles() {
    Figure f;
    f.name = "fig02_path_profiles";
    f.title = "Gradient paths (Figures 2, 8): token-wise ‖∂L/∂q‖, ‖∂L/∂k‖, ‖∂L/∂v‖ across probe steps";
    f.caption = "Layer " + std::to_string(report_.layer) +
                ", first seed of each arm, one line per probe step (dark: early, light: late). ∂L/∂q at t = 0 is "
                "exactly zero under the causal mask (Proposition 4) and is left out of the log scale.";
    f.columns = 3;
    f.rows = static_cast<int>(arms_.size());
    f.width = 1500;
    f.height = 460 * f.rows;
    for (const ArmRuns& a : arms_) {
      const auto& m = Metrics(a.runs[0]);
      for (const char* site : {"q", "k", "v"}) {
        Panel panel;
        panel.key = a.name + "/" + site;
        panel.title = a.name + ": ‖∂L/∂" + site + "‖, layer " + std::to_string(report_.layer);
        panel.x_label = "token t";
        panel.y_label = std::string("log#d10#u N#dt#u of ∂L/∂") + site;
        panel.log_y = true;
        const int n = m.probes_size();
        for (int i = 0; i < n; ++i) {
          const v1::ProbeReport& p = m.probes(i);
          if (report_.layer >= p.layers_size()) continue;
          const std::vector<double> v = Values(p.layers(report_.layer), p.layers(report_.layer).grad_profile(), site);
          Series s;
          const bool labelled = n <= 6 || i == 0 || i == n - 1 || i == n / 2;
          s.label = labelled ? "step " + std::to_string(p.step()) : "";
          s.ramp = n > 1 ? static_cast<double>(i) / (n - 1) : 0.0;
          s.tags.assign(v.size(), "step " + std::to_string(p.step()));
          for (size_t t = 0; t < v.size(); ++t) {
            s.x.push_back(static_cast<double>(t));
            s.y.push_back(v[t]);
          }
          panel.series.push_back(std::move(s));
        }
        f.panels.push_back(std::move(panel));
      }
    }
    return f;
  }

  Figure Reshaping() {
    Figure f;
    f.name = "fig03_reshaping";
    f.title = "Gradient reshaping (Figures 3, 10): Bloat, Change and Compress against the residual norm";
    f.caption = "Eq. (4) per token t < 16 of every layer: attention branch against ‖h_in‖, MLP branch against "
                "‖h_half‖, both log10, coloured by token group. First seed of each arm, step " +
                std::to_string(step_) + ".";
    f.columns = 3;
    f.rows = 2 * static_cast<int>(arms_.size());
    f.width = 1500;
    f.height = 420 * f.rows;
    using Field = const google::protobuf::RepeatedField<double>& (*)(const v1::LayerProbe&);
    struct Ratio {
      const char* name;
      Field field;
    };
    for (const ArmRuns& a : arms_) {
      const v1::ProbeReport& p = FirstSeedProbe(a);
      for (const bool attn : {true, false}) {
        const char* branch = attn ? "attn" : "mlp";
        const char* norm = attn ? "h_in" : "h_half";
        const Ratio attn_ratios[] = {
            {"Bloat", [](const v1::LayerProbe& l) -> const auto& { return l.attn_bloat(); }},
            {"Change", [](const v1::LayerProbe& l) -> const auto& { return l.attn_change(); }},
            {"Compress", [](const v1::LayerProbe& l) -> const auto& { return l.attn_compress(); }},
        };
        const Ratio mlp_ratios[] = {
            {"Bloat", [](const v1::LayerProbe& l) -> const auto& { return l.mlp_bloat(); }},
            {"Change", [](const v1::LayerProbe& l) -> const auto& { return l.mlp_change(); }},
            {"Compress", [](const v1::LayerProbe& l) -> const auto& { return l.mlp_compress(); }},
        };
        const Ratio* ratios = attn ? attn_ratios : mlp_ratios;
        for (int ri = 0; ri < 3; ++ri) {
          const Ratio& r = ratios[ri];
          Panel panel;
          panel.key = a.name + "/" + branch + "_" + r.name;
          panel.title = a.name + ": " + branch + " " + r.name;
          panel.x_label = std::string("log#d10#u ‖") + norm + "‖";
          panel.y_label = std::string("log#d10#u ") + r.name;
          panel.log_x = panel.log_y = true;
          std::vector<Series> groups(5);
          for (int g = 0; g < 5; ++g) {
            groups[g].label = kGroupLabels[g];
            groups[g].style = Style::kPoints;
            groups[g].color = kGroup0 + g;
            groups[g].symbol_size = 0.8;
          }
          for (const v1::LayerProbe& lp : p.layers()) {
            const std::vector<double> x = Values(lp, lp.norms(), norm);
            const auto& y = r.field(lp);
            const int n = std::min<int>({16, static_cast<int>(x.size()), y.size()});
            for (int t = 0; t < n; ++t) {
              Series& s = groups[TokenGroup(t)];
              s.x.push_back(x[t]);
              s.y.push_back(y[t]);
              s.tags.push_back("layer " + std::to_string(lp.layer()) + ", t=" + std::to_string(t));
            }
          }
          panel.series = std::move(groups);
          f.panels.push_back(std::move(panel));
        }
      }
    }
    return f;
  }

  Figure SinkRateAndNorms() {
    Figure f;
    f.name = "fig07_sink_rate_and_norms";
    f.title = "Attention sinks kept, massive activations removed (Figure 7): per layer, arms side by side";
    f.caption = "Sink rate: fraction of heads with α_s > ε (eq. 1). Norm ratios: the batch-mean norm of token s = " +
                std::to_string(s_) +
                " over the mean of tokens 1…15 other than s. Mean over seeds, bars ± sample std; step " +
                std::to_string(step_) + ".";
    f.columns = 2;
    f.rows = 2;
    f.width = 1300;
    f.height = 950;
    struct Quantity {
      const char* key;
      const char* title;
      const char* y_label;
    };
    const Quantity quantities[] = {
        {"sink_rate", "sink rate", "fraction of heads with α#ds#u > ε"},
        {"h_out", "‖h_out‖ token s / tokens 1-15", "‖h_out‖ ratio"},
        {"r_mlp", "‖r_mlp‖ token s / tokens 1-15", "‖r_mlp‖ ratio"},
        {"r_attn", "‖r_attn‖ token s / tokens 1-15", "‖r_attn‖ ratio"},
    };
    for (const Quantity& q : quantities) {
      Panel panel;
      panel.key = q.key;
      panel.title = q.title;
      panel.x_label = "layer ℓ";
      panel.y_label = q.y_label;
      panel.integer_x = true;
      if (std::string(q.key) == "sink_rate") {
        panel.fixed_y = true;  // a fraction of heads
      } else {
        panel.reference_y = true;  // 1: token s like the others
      }
      for (const ArmRuns& a : arms_) {
        Series s = MakeSeries(a.name, Style::kLinePoints, ArmColor(a.arm));
        s.err.clear();
        bool spread = a.runs.size() > 1;
        for (int l = 0; l < layers_; ++l) {
          std::vector<double> values;
          for (const v1::RunSummary* r : a.runs) {
            const v1::ProbeReport& p = *ProbeAt(Metrics(r), step_);
            if (l >= p.layers_size()) continue;
            const v1::LayerProbe& lp = p.layers(l);
            if (std::string(q.key) == "sink_rate") {
              values.push_back(lp.sink_rate());
            } else {
              auto it = lp.norm_ratio().find(q.key);
              if (it != lp.norm_ratio().end()) values.push_back(it->second);
            }
          }
          if (!values.empty()) AddMeanOverSeeds(s, l, values, spread);
        }
        panel.series.push_back(std::move(s));
      }
      f.panels.push_back(std::move(panel));
    }
    return f;
  }

  // The attention arms' own observables (docs/design/ARMS.md "Probes"), per layer, for the
  // arms that report them: the mass rows give no token, and the gate at token s over the
  // gate at tokens 1-15 (means over heads, then over seeds). None without such an arm.
  std::optional<Figure> ArmObservables() {
    Figure f;
    f.name = "fig07b_attention_arms";
    f.title = "Attention arms: mass given to no token, and the gate at the sink, per layer";
    f.caption = "Unassigned mass: batch mean of 1 − Σ_u a_tu per row (the virtual sink's share for sink_logit; "
                "signed for sigmoid). Gate ratio: mean gate at token s = " + std::to_string(s_) +
                " over the mean gate at tokens 1…15 other than s. Means over heads, then over seeds (± sample "
                "std); step " + std::to_string(step_) + ".";
    auto mean = [](const auto& values) {
      double m = 0;
      for (double x : values) m += x / values.size();
      return m;
    };
    for (int which = 0; which < 2; ++which) {
      Panel panel;
      panel.key = which == 0 ? "unassigned_mass" : "gate_sink_over_rest";
      panel.title = which == 0 ? "mass given to no token" : "gate at token s / tokens 1-15";
      panel.x_label = "layer ℓ";
      panel.y_label = which == 0 ? "1 − Σ#du#d a" : "gate ratio";
      panel.integer_x = true;
      panel.reference_y = which == 1;  // 1: the sink gated like the others
      for (const ArmRuns& a : arms_) {
        Series s = MakeSeries(a.name, Style::kLinePoints, ArmColor(a.arm));
        s.err.clear();
        const bool spread = a.runs.size() > 1;
        bool any = false;
        for (int l = 0; l < layers_; ++l) {
          std::vector<double> values;
          for (const v1::RunSummary* r : a.runs) {
            const v1::ProbeReport& p = *ProbeAt(Metrics(r), step_);
            if (l >= p.layers_size()) continue;
            const v1::LayerProbe& lp = p.layers(l);
            if (which == 0 && lp.unassigned_mass_size() > 0) values.push_back(mean(lp.unassigned_mass()));
            if (which == 1 && lp.gate_sink_size() > 0 && lp.gate_rest_size() > 0) {
              values.push_back(mean(lp.gate_sink()) / mean(lp.gate_rest()));
            }
          }
          if (!values.empty()) {
            AddMeanOverSeeds(s, l, values, spread);
            any = true;
          }
        }
        if (any) panel.series.push_back(std::move(s));
      }
      if (!panel.series.empty()) f.panels.push_back(std::move(panel));
    }
    if (f.panels.empty()) return std::nullopt;
    f.columns = static_cast<int>(f.panels.size());
    f.rows = 1;
    f.width = 650 * f.columns;
    f.height = 500;
    return f;
  }

  Figure ValueNorms() {
    Figure f;
    f.name = "fig12_value_norms";
    f.title = "Value norms at the sink (Figure 12): ‖v‖ of token s against tokens 1-15 over probe steps";
    f.caption = "Layer " + std::to_string(report_.layer) + ", batch-mean ‖v‖ (mean over KV heads) of token s = " +
                std::to_string(s_) + " and the mean and max over tokens 1…15 other than s; first seed of each arm.";
    f.columns = static_cast<int>(arms_.size());
    f.width = 600 * f.columns;
    f.height = 520;
    for (const ArmRuns& a : arms_) {
      Panel panel;
      panel.key = a.name;
      panel.title = Who(a) + ", layer " + std::to_string(report_.layer);
      panel.x_label = "training step";
      panel.y_label = "log#d10#u ‖v‖";
      panel.log_y = true;
      Series sink = MakeSeries("token s", Style::kLinePoints, kHighlight);
      Series mean = MakeSeries("mean of tokens 1-15", Style::kLinePoints, kBaseline);
      Series max = MakeSeries("max of tokens 1-15", Style::kDashedLine, kGray);
      for (const v1::ProbeReport& p : Metrics(a.runs[0]).probes()) {
        if (report_.layer >= p.layers_size()) continue;
        const std::vector<double> v = Values(p.layers(report_.layer), p.layers(report_.layer).norms(), "v");
        if (s_ >= static_cast<int>(v.size())) continue;
        const std::vector<int> ref = ReferenceTokens(s_, static_cast<int>(v.size()));
        if (ref.empty()) continue;
        double sum = 0, hi = -INFINITY;
        for (int t : ref) sum += v[t], hi = std::max(hi, v[t]);
        for (Series* s : {&sink, &mean, &max}) {
          s->x.push_back(static_cast<double>(p.step()));
          s->tags.push_back("step " + std::to_string(p.step()));
        }
        sink.y.push_back(v[s_]);
        mean.y.push_back(sum / ref.size());
        max.y.push_back(hi);
      }
      panel.series = {std::move(sink), std::move(mean), std::move(max)};
      f.panels.push_back(std::move(panel));
    }
    return f;
  }

  std::optional<Figure> Theta() {
    Figure f;
    f.name = "fig13_theta";
    f.title = "Learned V-scale θ (Figure 13): layer × KV head";
    f.caption = "θ per layer ℓ and KV head g at step " + std::to_string(step_) +
                " (C = d·d_h·σ²·exp θ); first seed of each V-scale arm. Blue below 0, red above.";
    for (const ArmRuns& a : arms_) {
      if (a.arm != v1::VSCALE) continue;
      const v1::ProbeReport& p = FirstSeedProbe(a);
      Panel panel;
      panel.key = a.name;
      panel.title = Who(a) + ": θ#dℓ,g#u";
      panel.x_label = "KV head g";
      panel.y_label = "layer ℓ";
      panel.heat_row_name = "layer";
      panel.heat_col_name = "KV head";
      for (const v1::LayerProbe& lp : p.layers()) panel.heat.emplace_back(lp.theta().begin(), lp.theta().end());
      f.panels.push_back(std::move(panel));
    }
    if (f.panels.empty()) return std::nullopt;
    f.columns = static_cast<int>(f.panels.size());
    f.width = 560 * f.columns;
    f.height = 100 + std::max(360, 40 * layers_);
    return f;
  }

  Figure TrainingCurves() {
    Figure f;
    f.name = "training_curves";
    f.title = "Training curves: loss and validation loss per arm";
    f.caption = "Mean over seeds (solid) ± sample std (dashed) at each step; nats per token.";
    f.columns = 2;
    f.width = 1400;
    f.height = 560;
    for (const bool validation : {false, true}) {
      Panel panel;
      panel.key = validation ? "val_loss" : "loss";
      panel.title = validation ? "validation loss" : "training loss";
      panel.x_label = "step";
      panel.y_label = "loss (nats/token)";
      for (const ArmRuns& a : arms_) {
        std::map<int64_t, std::vector<double>> by_step;
        for (const v1::RunSummary* r : a.runs) {
          for (const v1::StepMetrics& m : Metrics(r).steps()) {
            if (validation && !m.has_val_loss()) continue;
            by_step[m.step()].push_back(validation ? m.val_loss() : m.loss());
          }
        }
        Series s = MakeSeries(a.name + " (" + std::to_string(a.runs.size()) + (a.runs.size() == 1 ? " seed)" : " seeds)"),
                              validation ? Style::kLinePoints : Style::kLine, ArmColor(a.arm));
        s.symbol_size = 0.8;
        const bool spread = a.runs.size() > 1;
        for (const auto& [step, values] : by_step) AddMeanOverSeeds(s, static_cast<double>(step), values, spread);
        panel.series.push_back(std::move(s));
      }
      f.panels.push_back(std::move(panel));
    }
    return f;
  }

  const ReportInput& in_;
  const ReportOptions& opt_;
  Report report_;
  std::vector<ArmRuns> arms_;
  int layers_ = 0;
  int s_ = 0;
  int64_t step_ = 0;
};

std::string Html(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

// Figure titles for HTML: PLplot's sub/superscript escapes removed.
std::string PlainText(std::string s) {
  for (const char* code : {"#d", "#u"}) {
    for (size_t i; (i = s.find(code)) != std::string::npos;) s.erase(i, 2);
  }
  return s;
}

}  // namespace

namespace {

// Reads the value at `key` of `j` into a repeated field / scalar, naming what is wrong.
struct JsonReader {
  const std::string& path;
  Status status;

  const nlohmann::json* At(const nlohmann::json& j, const std::string& where, const char* key) {
    if (!status.ok()) return nullptr;
    if (!j.is_object() || !j.contains(key)) {
      status = InvalidArgumentError(path + ": " + where + key + " is missing");
      return nullptr;
    }
    return &j[key];
  }
  double Number(const nlohmann::json& j, const std::string& where, const char* key) {
    const nlohmann::json* v = At(j, where, key);
    if (v == nullptr) return 0;
    if (v->is_null()) return NAN;  // a NaN is written as null
    if (!v->is_number()) {
      status = InvalidArgumentError(path + ": " + where + key + " must be a number, got " + v->dump());
      return 0;
    }
    return v->get<double>();
  }
  void Numbers(const nlohmann::json& j, const std::string& where, const char* key,
               google::protobuf::RepeatedField<double>* out) {
    const nlohmann::json* v = At(j, where, key);
    if (v == nullptr) return;
    if (!v->is_array()) {
      status = InvalidArgumentError(path + ": " + where + key + " must be a list of numbers");
      return;
    }
    for (const nlohmann::json& x : *v) {
      if (!x.is_number() && !x.is_null()) {
        status = InvalidArgumentError(path + ": " + where + key + " must be a list of numbers, has " + x.dump());
        return;
      }
      out->Add(x.is_null() ? NAN : x.get<double>());
    }
  }
  void SeriesMap(const nlohmann::json& j, const std::string& where, const char* key,
                 google::protobuf::Map<std::string, v1::Series>* out) {
    const nlohmann::json* v = At(j, where, key);
    if (v == nullptr) return;
    if (!v->is_object()) {
      status = InvalidArgumentError(path + ": " + where + key + " must be an object of lists");
      return;
    }
    for (auto it = v->begin(); it != v->end(); ++it) {
      Numbers(*v, where + key + ".", it.key().c_str(), (*out)[it.key()].mutable_values());
    }
  }
};

}  // namespace

namespace {

// One probe record, as `sinkscope probe --json` and sinkscope-train's probes.jsonl write
// it, into a ProbeReport; `where` names the file (and line) in errors. *s is the probe's
// token s (probe_settings.s).
Status ParseProbeRecord(const nlohmann::json& j, const std::string& where, v1::ProbeReport* out, int* s) {
  JsonReader r{where, OkStatus()};
  v1::ProbeReport& p = *out;
  p.set_step(static_cast<int64_t>(r.Number(j, "", "step")));
  p.set_loss(r.Number(j, "", "loss"));
  p.set_r_gs_median(r.Number(j, "", "R_GS_median"));
  p.set_r_gs_q1(r.Number(j, "", "R_GS_q1"));
  p.set_r_gs_q3(r.Number(j, "", "R_GS_q3"));
  const nlohmann::json* settings = r.At(j, "", "probe_settings");
  *s = settings ? static_cast<int>(r.Number(*settings, "probe_settings.", "s")) : 0;
  const nlohmann::json* layers = r.At(j, "", "layers");
  if (layers != nullptr && (!layers->is_array() || layers->empty())) {
    return InvalidArgumentError(where + ": layers must be a non-empty list");
  }
  for (size_t i = 0; layers != nullptr && i < layers->size() && r.status.ok(); ++i) {
    const nlohmann::json& l = (*layers)[i];
    const std::string at = "layers[" + std::to_string(i) + "].";
    v1::LayerProbe* lp = p.add_layers();
    lp->set_layer(static_cast<int>(i));
    lp->set_r_gs(r.Number(l, at, "R_GS"));
    r.SeriesMap(l, at, "grad_profile", lp->mutable_grad_profile());
    r.SeriesMap(l, at, "norms", lp->mutable_norms());
    r.Numbers(l, at, "attn_bloat", lp->mutable_attn_bloat());
    r.Numbers(l, at, "attn_change", lp->mutable_attn_change());
    r.Numbers(l, at, "attn_compress", lp->mutable_attn_compress());
    r.Numbers(l, at, "mlp_bloat", lp->mutable_mlp_bloat());
    r.Numbers(l, at, "mlp_change", lp->mutable_mlp_change());
    r.Numbers(l, at, "mlp_compress", lp->mutable_mlp_compress());
    r.Numbers(l, at, "theta", lp->mutable_theta());
    // The attention arms' observables, present only in their reports.
    for (const auto& [key, field] :
         {std::pair<const char*, google::protobuf::RepeatedField<double>*>{"unassigned_mass",
                                                                           lp->mutable_unassigned_mass()},
          {"gate_mean", lp->mutable_gate_mean()}, {"gate_sink", lp->mutable_gate_sink()},
          {"gate_rest", lp->mutable_gate_rest()}}) {
      if (l.contains(key)) r.Numbers(l, at, key, field);
    }
    lp->set_sink_rate(r.Number(l, at, "sink_rate"));
    if (const nlohmann::json* ratio = r.At(l, at, "norm_ratio"); ratio != nullptr && ratio->is_object()) {
      for (auto it = ratio->begin(); it != ratio->end(); ++it) {
        (*lp->mutable_norm_ratio())[it.key()] = r.Number(*ratio, at + "norm_ratio.", it.key().c_str());
      }
    }
    // Figure 7's massive-activation panel and the summaries read these when present.
    if (const auto m = l.find("massive"); m != l.end() && m->is_object()) {
      v1::MassiveActivations* ma = lp->mutable_massive();
      const std::string in = at + "massive.";
      ma->set_top1_over_median(r.Number(*m, in, "top1_over_median"));
      ma->set_median(r.Number(*m, in, "median"));
      r.Numbers(*m, in, "top3", ma->mutable_top3());
      ma->set_top1_sequence(static_cast<int64_t>(r.Number(*m, in, "top1_sequence")));
      ma->set_top1_token(static_cast<int>(r.Number(*m, in, "top1_token")));
      ma->set_top1_channel(static_cast<int>(r.Number(*m, in, "top1_channel")));
    }
  }
  return r.status;
}

// The run directory's name as sinkscope-train writes it: [p<k>-]<arm>-s<seed>.
bool ParseRunDirName(const std::string& name, int* point, v1::Arm* arm, int64_t* seed) {
  std::string rest = name;
  *point = -1;
  if (rest.size() > 1 && rest[0] == 'p' && std::isdigit(static_cast<unsigned char>(rest[1]))) {
    const size_t dash = rest.find('-');
    int64_t k = 0;
    if (dash == std::string::npos || !ParseWholeInteger(rest.substr(1, dash - 1), &k) || k > INT32_MAX) return false;
    *point = static_cast<int>(k);
    rest = rest.substr(dash + 1);
  }
  const size_t s = rest.rfind("-s");
  if (s == std::string::npos || !ParseWholeInteger(rest.substr(s + 2), seed)) return false;
  std::string upper = rest.substr(0, s);
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return v1::Arm_Parse(upper, arm) && *arm != v1::ARM_UNSPECIFIED;
}

}  // namespace

StatusOr<ReportInput> ReadProbeJson(const std::string& path, const std::string& label) {
  ASSIGN_OR_RETURN(const std::string text, ReadRegularFile(path, path, int64_t{1} << 30));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return InvalidArgumentError(path + ": not a JSON object (write it with sinkscope probe --local CHECKPOINT --json)");
  }
  v1::ProbeReport p;
  int s = 0;
  RETURN_IF_ERROR(ParseProbeRecord(j, path, &p, &s));
  ReportInput input;
  input.label = label;
  v1::ExperimentSummary& e = input.experiment;
  e.set_experiment_id(label);
  e.set_name("probe of " + label);
  e.set_state(v1::COMPLETED);
  e.mutable_spec()->mutable_model()->set_layers(p.layers_size());
  e.mutable_spec()->mutable_probe()->set_sink_position(s);
  // θ is reported by V-scale models only: that decides whether Figure 13 is drawn.
  bool vscale = false;
  for (const v1::LayerProbe& lp : p.layers()) {
    for (double t : lp.theta()) vscale = vscale || t != 0;
  }
  const v1::Arm arm = vscale ? v1::VSCALE : v1::BASELINE;
  e.mutable_spec()->add_arms(arm);
  v1::RunSummary* run = e.add_runs();
  run->set_run_id(label);
  run->set_experiment_id(label);
  run->set_arm(arm);
  run->set_state(v1::SUCCEEDED);
  run->set_step(p.step());
  run->set_probe_reports(1);
  v1::GetRunMetricsResponse& m = input.metrics[label];
  *m.mutable_run() = *run;
  *m.add_probes() = std::move(p);
  return input;
}

StatusOr<ReportInput> ReadTrainDirs(const std::vector<std::string>& dirs, const std::string& label) {
  namespace fs = std::filesystem;
  struct Found {
    std::string dir, name;
    int point;
    v1::Arm arm;
    int64_t seed;
  };
  std::vector<Found> runs;
  for (const std::string& dir : dirs) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) return NotFoundError(dir + ": not a directory (give sinkscope-train's --out)");
    std::vector<fs::path> candidates;
    if (fs::exists(fs::path(dir) / "probes.jsonl", ec)) {
      candidates.push_back(fs::path(dir));
    } else {
      for (const fs::directory_entry& d : fs::directory_iterator(dir, ec)) {
        if (d.is_directory(ec) && fs::exists(d.path() / "probes.jsonl", ec)) candidates.push_back(d.path());
      }
      if (ec) return InvalidArgumentError(dir + ": cannot list it: " + ec.message());
    }
    std::sort(candidates.begin(), candidates.end());
    for (const fs::path& c : candidates) {
      Found f{c.string(), c.filename().string(), -1, v1::ARM_UNSPECIFIED, 0};
      if (f.name.empty()) f.name = c.parent_path().filename().string();
      if (!ParseRunDirName(f.name, &f.point, &f.arm, &f.seed)) {
        return InvalidArgumentError(c.string() + ": a run directory is named [p<k>-]<arm>-s<seed> as sinkscope-train "
                                                 "writes it (baseline-s0, p1-vscale-s2), got " + f.name);
      }
      runs.push_back(f);
    }
    if (candidates.empty()) {
      return NotFoundError(dir + ": no run in it (a run directory holds the probes.jsonl sinkscope-train writes)");
    }
  }
  std::set<std::string> names;
  std::set<int> points;
  for (const Found& f : runs) {
    if (!names.insert(f.name).second) {
      return InvalidArgumentError("two runs are named " + f.name + " (give directories of one experiment)");
    }
    points.insert(f.point < 0 ? 0 : f.point);
  }
  ReportInput input;
  v1::ExperimentSummary& e = input.experiment;
  e.set_experiment_id(label);
  e.set_name(label);
  e.set_state(v1::COMPLETED);
  std::set<int> arms;
  int layers = 0, s = 0;
  for (const Found& f : runs) {
    const std::string run_id = label + "-" + f.name;
    v1::GetRunMetricsResponse& m = input.metrics[run_id];
    // probes.jsonl: one probe record a line.
    const std::string probes_path = f.dir + "/probes.jsonl";
    ASSIGN_OR_RETURN(const std::string probes, ReadRegularFile(probes_path, probes_path, int64_t{1} << 32));
    std::istringstream lines(probes);
    int line_no = 0;
    for (std::string line; std::getline(lines, line);) {
      ++line_no;
      if (line.empty()) continue;
      const std::string where = probes_path + ":" + std::to_string(line_no);
      nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded() || !j.is_object()) return InvalidArgumentError(where + ": not a JSON object");
      v1::ProbeReport* p = m.add_probes();
      RETURN_IF_ERROR(ParseProbeRecord(j, where, p, &s));
      layers = std::max(layers, p->layers_size());
    }
    // metrics.jsonl: one step a line (absent: no training curve for this run).
    const std::string metrics_path = f.dir + "/metrics.jsonl";
    std::error_code ec;
    if (fs::exists(metrics_path, ec)) {
      ASSIGN_OR_RETURN(const std::string steps, ReadRegularFile(metrics_path, metrics_path, int64_t{1} << 32));
      std::istringstream step_lines(steps);
      line_no = 0;
      for (std::string line; std::getline(step_lines, line);) {
        ++line_no;
        if (line.empty()) continue;
        const std::string where = metrics_path + ":" + std::to_string(line_no);
        nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
        if (j.is_discarded() || !j.is_object()) return InvalidArgumentError(where + ": not a JSON object");
        JsonReader r{where, OkStatus()};
        v1::StepMetrics* st = m.add_steps();
        st->set_step(static_cast<int64_t>(r.Number(j, "", "step")));
        st->set_loss(r.Number(j, "", "loss"));
        if (j.contains("lr")) st->set_learning_rate(r.Number(j, "", "lr"));
        if (j.contains("grad_norm")) st->set_grad_norm(r.Number(j, "", "grad_norm"));
        if (j.contains("tokens_per_second")) st->set_tokens_per_second(r.Number(j, "", "tokens_per_second"));
        if (j.contains("mfu")) st->set_mfu(r.Number(j, "", "mfu"));
        if (j.contains("val_loss") && !j["val_loss"].is_null()) st->set_val_loss(r.Number(j, "", "val_loss"));
        RETURN_IF_ERROR(r.status);
      }
    }
    v1::RunSummary* run = e.add_runs();
    run->set_run_id(run_id);
    run->set_experiment_id(label);
    run->set_arm(f.arm);
    run->set_seed(f.seed);
    run->set_state(v1::SUCCEEDED);
    if (points.size() > 1) {  // a sweep's points apart; one point needs no label
      run->set_point_index(f.point < 0 ? 0 : f.point);
      run->set_point("p" + std::to_string(run->point_index()));
    }
    run->set_probe_reports(m.probes_size());
    if (m.steps_size() > 0) {
      run->set_step(m.steps(m.steps_size() - 1).step());
      run->set_loss(m.steps(m.steps_size() - 1).loss());
    } else if (m.probes_size() > 0) {
      run->set_step(m.probes(m.probes_size() - 1).step());
    }
    *m.mutable_run() = *run;
    arms.insert(f.arm);
  }
  for (int a : arms) e.mutable_spec()->add_arms(static_cast<v1::Arm>(a));
  e.mutable_spec()->mutable_model()->set_layers(layers);
  e.mutable_spec()->mutable_probe()->set_sink_position(s);
  return input;
}

std::string ArmName(v1::Arm arm) {
  std::string name = v1::Arm_Name(arm);
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return name;
}

StatusOr<Report> BuildReport(const ReportInput& input, const ReportOptions& options) {
  for (const v1::RunSummary& r : input.experiment.runs()) {
    if (!input.metrics.count(r.run_id())) return NotFoundError("no metrics were read for run " + r.run_id());
  }
  return Builder(input, options).Build();
}

Status WriteReport(const Report& report, const ReportInput& input, const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return InvalidArgumentError("cannot create --out " + dir + ": " + ec.message());
  for (const Figure& f : report.figures) RETURN_IF_ERROR(WriteFigure(f, dir));
  const v1::ExperimentSummary& e = input.experiment;
  std::ostringstream html;
  std::string arms;
  for (const std::string& a : report.arms) arms += (arms.empty() ? "" : ", ") + a;
  html << "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>sinkscope report: "
       << Html(e.name()) << " (" << Html(e.experiment_id()) << ")</title>\n"
       << "<style>body{font-family:sans-serif;max-width:1500px;margin:2em auto;padding:0 1em}"
          "img{max-width:100%;border:1px solid #ddd}pre{background:#f6f6f6;padding:1em;overflow:auto}"
          "figure{margin:2em 0}figcaption{color:#333;max-width:60em}</style></head><body>\n"
       << "<h1>" << Html(e.name()) << " <small>" << Html(e.experiment_id()) << "</small></h1>\n"
       << "<p>State " << Html(ExperimentStateName(e.state())) << ", created " << Html(FormatUnixMs(e.created_unix_ms()))
       << ". Arms shown: " << Html(arms) << ". Probe step " << report.step << ", layer " << report.layer
       << " for the per-layer-choice figures. Definitions: docs/design/METRICS.md.</p>\n<ul>\n";
  for (const v1::RunSummary& r : e.runs()) {
    html << "<li>" << Html(r.run_id()) << ": " << Html(ArmName(r.arm())) << ", seed " << r.seed() << ", "
         << Html(RunStateName(r.state())) << ", step " << r.step() << "/" << r.total_steps() << ", "
         << r.probe_reports() << " probe reports</li>\n";
  }
  html << "</ul>\n";
  for (const std::string& note : report.notes) html << "<p><em>" << Html(note) << "</em></p>\n";
  for (const Figure& f : report.figures) {
    html << "<figure id=\"" << f.name << "\"><h2>" << Html(PlainText(f.title)) << "</h2>\n<img src=\"" << f.name
         << ".png\" alt=\"" << Html(PlainText(f.title)) << "\">\n<figcaption>" << Html(f.caption) << " <a href=\""
         << f.name << ".svg\">SVG</a> · <a href=\"" << f.name << ".tsv\">data</a></figcaption></figure>\n";
  }
  html << "<h2>Settings</h2>\n<pre>" << Html(MessageToJson(e.spec(), /*pretty=*/true)) << "</pre>\n</body></html>\n";
  const std::string path = dir + "/index.html";
  errno = 0;
  std::ofstream out(path, std::ios::trunc);
  out << html.str();
  out.close();
  if (!out) return InvalidArgumentError("cannot write " + path + ": " + std::strerror(errno ? errno : EIO));
  return OkStatus();
}

}  // namespace sinkscope::report

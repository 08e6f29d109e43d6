#include "training/probe_json.h"

#include <cstdio>

namespace sinkscope {

nlohmann::json ProbeReportToJson(const ProbeReport& r) {
  nlohmann::json j;
  j["version"] = r.version;
  j["step"] = r.step;
  j["loss"] = r.loss;
  j["batch_sequences"] = r.batch_sequences;
  j["seq_len"] = r.seq_len;
  j["probe_settings"] = {{"s", r.settings.sink_position},  {"T_e", r.settings.ref_span},
                         {"P", r.settings.profile_len},    {"eps", r.settings.eps},
                         {"T_eps", r.settings.t_eps},      {"reduce", ReduceModeName(r.settings.reduce)}};
  j["R_GS_median"] = r.r_gs_median;
  j["R_GS_q1"] = r.r_gs_q1;
  j["R_GS_q3"] = r.r_gs_q3;
  j["layers"] = nlohmann::json::array();
  for (const LayerProbe& l : r.layers) {
    nlohmann::json x;
    x["layer"] = l.layer;
    x["R_GS"] = l.r_gs;
    x["R_GS_sum_then_norm"] = l.r_gs_sum_then_norm;
    x["R_GS_norm_then_mean"] = l.r_gs_norm_then_mean;
    x["grad_profile"] = l.grad_profile;
    x["attn_bloat"] = l.attn_bloat;
    x["attn_change"] = l.attn_change;
    x["attn_compress"] = l.attn_compress;
    x["mlp_bloat"] = l.mlp_bloat;
    x["mlp_change"] = l.mlp_change;
    x["mlp_compress"] = l.mlp_compress;
    x["alpha"] = l.alpha;
    x["sink_rate"] = l.sink_rate;
    x["sink_rate_per_sample"] = l.sink_rate_per_sample;
    x["per_sample_sink_fraction"] = l.per_sample_sink_fraction;
    x["M"] = l.column_mass;
    x["S"] = l.column_second_moment;
    x["norms"] = l.norms;
    x["norm_ratio"] = l.norm_ratio;
    x["massive"] = {{"top3", l.massive.top3},
                    {"median", l.massive.median},
                    {"top1_over_median", l.massive.top1_over_median},
                    {"top1_sequence", l.massive.top1_sequence},
                    {"top1_token", l.massive.top1_token},
                    {"top1_channel", l.massive.top1_channel}};
    x["theta"] = l.theta;
    x["C"] = l.c;
    // Attention arms (docs/design/ARMS.md "Probes"): only where the arm has them.
    if (!l.unassigned_mass.empty()) x["unassigned_mass"] = l.unassigned_mass;
    if (!l.gate_mean.empty()) {
      x["gate_mean"] = l.gate_mean;
      x["gate_sink"] = l.gate_sink;
      x["gate_rest"] = l.gate_rest;
    }
    j["layers"].push_back(std::move(x));
  }
  return j;
}

std::string ProbeReportTable(const ProbeReport& r) {
  std::string out;
  char line[256];
  std::snprintf(line, sizeof line,
                "probe at step %lld: loss %.4f, %d sequences of %d tokens, s=%d T_e=%d %s\n"
                "R_GS(s) over layers: median %.3f, IQR [%.3f, %.3f]\n",
                static_cast<long long>(r.step), r.loss, r.batch_sequences, r.seq_len, r.settings.sink_position,
                r.settings.ref_span, ReduceModeName(r.settings.reduce), r.r_gs_median, r.r_gs_q1, r.r_gs_q3);
  out += line;
  std::snprintf(line, sizeof line, "%5s %9s %6s %6s %9s %9s %9s %9s %10s %8s\n", "layer", "R_GS", "sink", "sink/s",
                "h_out s/", "r_mlp s/", "r_attn s/", "v s/", "top1/med", "mean θ");
  out += line;
  for (const LayerProbe& l : r.layers) {
    double theta = 0;
    for (double t : l.theta) theta += t / std::max<size_t>(l.theta.size(), 1);
    std::snprintf(line, sizeof line, "%5d %9.3f %6.2f %6.2f %9.2f %9.2f %9.2f %9.2f %10.1f %8.3f\n", l.layer, l.r_gs,
                  l.sink_rate, l.sink_rate_per_sample, l.norm_ratio.at("h_out"), l.norm_ratio.at("r_mlp"),
                  l.norm_ratio.at("r_attn"), l.norm_ratio.at("v"), l.massive.top1_over_median, theta);
    out += line;
  }
  out += "(x s/ = norm at token s over the mean norm of tokens 1-15; sink/s = per-sample sink rate)\n";
  auto mean = [](const std::vector<double>& v) {
    double m = 0;
    for (double x : v) m += x / static_cast<double>(v.size());
    return m;
  };
  if (!r.layers.empty() && !r.layers[0].unassigned_mass.empty()) {
    out += "unassigned mass per layer (mean over heads; the virtual sink or 1 - row sum, signed):";
    for (const LayerProbe& l : r.layers) {
      std::snprintf(line, sizeof line, " %.4f", mean(l.unassigned_mass));
      out += line;
    }
    out += "\n";
  }
  if (!r.layers.empty() && !r.layers[0].gate_mean.empty()) {
    out += "gate per layer (mean over heads), all tokens / token s / tokens 1-15:";
    for (const LayerProbe& l : r.layers) {
      std::snprintf(line, sizeof line, " %.3f/%.3f/%.3f", mean(l.gate_mean), mean(l.gate_sink), mean(l.gate_rest));
      out += line;
    }
    out += "\n";
  }
  return out;
}

}  // namespace sinkscope

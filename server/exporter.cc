#include "server/exporter.h"

#include <prometheus/text_serializer.h>

#include <sstream>

#include "base/log.h"
#include "schema/credentials.h"

namespace sinkscope {

StatusOr<std::unique_ptr<Exporter>> Exporter::Start(const std::string& listen, std::chrono::seconds series_ttl,
                                                    std::optional<MetricsBasicAuth> basic_auth) {
  std::unique_ptr<Exporter> e(new Exporter());
  e->series_ttl_ = series_ttl;
  e->registry_ = std::make_shared<prometheus::Registry>();
  auto& r = *e->registry_;
  using prometheus::BuildCounter;
  using prometheus::BuildGauge;
  auto gauge = [&](const char* name, const char* help) { return &BuildGauge().Name(name).Help(help).Register(r); };
  e->step_ = gauge("sinkscope_run_step", "Optimisation steps completed by the run.");
  e->loss_ = gauge("sinkscope_run_loss", "Mean token cross-entropy of the last step's global batch, nats per token.");
  e->val_loss_ = gauge("sinkscope_run_validation_loss", "Latest validation loss, nats per token.");
  e->lr_ = gauge("sinkscope_run_learning_rate", "Learning rate of the last step.");
  e->grad_norm_ = gauge("sinkscope_run_gradient_norm", "Global gradient L2 norm of the last step, before clipping.");
  e->tokens_per_second_ = gauge("sinkscope_run_tokens_per_second", "Training throughput of the last step.");
  e->mfu_ = gauge("sinkscope_run_mfu_ratio", "Model FLOPs utilisation of the last step (METRICS.md convention).");
  e->r_gs_ = gauge("sinkscope_probe_gradient_sink_ratio",
                   "R_GS(s; T_e) at the post-RMSNorm attention input (Definition 1), per layer.");
  e->r_gs_median_ = gauge("sinkscope_probe_gradient_sink_ratio_median", "Median over layers of R_GS.");
  e->sink_rate_ = gauge("sinkscope_probe_sink_rate_ratio", "Fraction of heads whose alpha_s exceeds epsilon, per layer.");
  e->h_out_ratio_ = gauge("sinkscope_probe_residual_out_token_norm_ratio",
                          "Norm of h_out at token s over the mean of tokens 1-15 other than s, per layer.");
  e->r_mlp_ratio_ = gauge("sinkscope_probe_r_mlp_token_norm_ratio",
                          "Norm of the MLP output at token s over the mean of tokens 1-15 other than s, per layer.");
  e->r_attn_ratio_ = gauge("sinkscope_probe_r_attn_token_norm_ratio",
                           "Norm of the attention output at token s over the mean of tokens 1-15 other than s, per layer.");
  e->v_ratio_ = gauge("sinkscope_probe_v_token_norm_ratio",
                      "Norm of v at token s over the mean of tokens 1-15 other than s, per layer.");
  e->massive_top1_ = gauge("sinkscope_probe_massive_activation_top1", "Largest |h_out| value of the probe batch.");
  e->massive_ratio_ = gauge("sinkscope_probe_massive_activation_top1_over_median_ratio",
                            "Largest |h_out| over the median |h_out|, per layer.");
  e->alpha_ = gauge("sinkscope_probe_attention_sink_alpha",
                    "Mean attention weight alpha_s on the sink position over T_eps queries, per layer and head.");
  e->theta_ = gauge("sinkscope_probe_vscale_theta", "Learned V-scale theta, per layer and KV head.");
  e->unassigned_ = gauge("sinkscope_probe_attention_unassigned_mass",
                         "Mean mass an attention row gives no token (the virtual sink's share, or 1 - row sum for "
                         "sigmoid and softpick, signed), per layer and head.");
  e->gate_mean_ = gauge("sinkscope_probe_attention_gate_mean", "Mean attention gate over all tokens, per layer and head.");
  e->gate_sink_ = gauge("sinkscope_probe_attention_gate_sink", "Mean attention gate at token s, per layer and head.");
  e->gate_rest_ = gauge("sinkscope_probe_attention_gate_rest",
                        "Mean attention gate over tokens 1-15 other than s, per layer and head.");
  e->probe_step_ = gauge("sinkscope_probe_step", "Training step of the run's latest probe report.");
  e->workers_ = &BuildGauge().Name("sinkscope_workers_connected").Help("Workers with an open session.").Register(r).Add({});
  e->queued_ = &BuildGauge().Name("sinkscope_runs_queued").Help("Runs waiting for a worker.").Register(r).Add({});
  e->running_ = &BuildGauge().Name("sinkscope_runs_running").Help("Runs leased to a worker.").Register(r).Add({});
  e->restarts_ = &BuildCounter().Name("sinkscope_run_restarts_total").Help("Runs requeued after a lease lapsed.").Register(r).Add({});
  e->steps_ingested_ = &BuildCounter().Name("sinkscope_step_reports_total").Help("Step reports stored.").Register(r).Add({});
  e->probes_ingested_ = &BuildCounter().Name("sinkscope_probe_reports_stored_total").Help("Probe reports stored.").Register(r).Add({});
  e->probes_duplicate_ = &BuildCounter()
                              .Name("sinkscope_probe_reports_duplicate_total")
                              .Help("Probe reports received again and not stored twice.")
                              .Register(r)
                              .Add({});
  if (!listen.empty()) {
    try {
      // Idle or slow connections must not starve scrapes (issue 28, finding 8): CivetWeb
      // gives each connection a thread until its request is read, so there are
      // kMetricsThreads of them and a request must arrive within kMetricsRequestTimeoutMs;
      // a connection left idle after a response is closed as soon.
      e->exposer_ = std::make_unique<prometheus::Exposer>(std::vector<std::string>{
          "listening_ports", listen, "num_threads", std::to_string(kMetricsThreads), "request_timeout_ms",
          std::to_string(kMetricsRequestTimeoutMs), "keep_alive_timeout_ms", std::to_string(kMetricsRequestTimeoutMs),
          "enable_keep_alive", "no"});
    } catch (const std::exception& ex) {
      return Status(StatusCode::kUnavailable, "metrics: cannot listen on " + listen + ": " + ex.what());
    }
    if (basic_auth) {
      // Registered before the collectable, so /metrics never serves the registry unguarded.
      e->exposer_->RegisterAuth(
          [auth = std::move(*basic_auth)](const std::string& user, const std::string& password) {
            // Both compared, always: the time does not tell which one was wrong.
            const bool user_ok = ConstantTimeEquals(user, auth.user);
            const bool password_ok = ConstantTimeEquals(password, auth.password);
            return user_ok && password_ok;
          },
          "sinkscope");
    }
    e->exposer_->RegisterCollectable(e->registry_);
  }
  return e;
}

int Exporter::port() const {
  if (!exposer_) return 0;
  auto ports = exposer_->GetListeningPorts();
  return ports.empty() ? 0 : ports[0];
}

prometheus::Gauge* Exporter::SetRunGauge(const v1::RunSummary& run, RunSeries& series,
                                         std::optional<Labels>& run_labels,
                                         prometheus::Family<prometheus::Gauge>& family, int layer, int head,
                                         double value) {
  const auto key = std::make_tuple(&family, layer, head);
  if (auto it = series.gauges.find(key); it != series.gauges.end()) {
    it->second->Set(value);
    return it->second;
  }
  if (series.gauges.size() >= kMaxSeriesPerRun) {
    // A run at its cap gets no new series (its reports are stored whole all the same).
    if (!series.capped) {
      series.capped = true;
      Log(LogLevel::kWarning, "run_series_capped",
          {{"run_id", run.run_id()}, {"series", std::to_string(series.gauges.size())},
           {"reason", "a run exports at most " + std::to_string(kMaxSeriesPerRun) +
                          " Prometheus series; later layers and heads are in the store only"}});
    }
    return nullptr;
  }
  if (!run_labels) run_labels = RunLabels(run);
  Labels labels = *run_labels;
  if (layer >= 0) labels["layer"] = std::to_string(layer);
  if (head >= 0) labels["head"] = std::to_string(head);
  prometheus::Gauge& g = family.Add(labels);
  series.gauges.emplace(key, &g);
  g.Set(value);
  return &g;
}

Exporter::Labels Exporter::RunLabels(const v1::RunSummary& run) {
  Labels labels = {{"experiment", run.experiment_id()},
                   {"arm", v1::Arm_Name(run.arm())},
                   {"seed", std::to_string(run.seed())},
                   {"run", run.run_id()}};
  // A sweep's point: its settings when short, else its index; one value per run, so the
  // label adds no series (absent without a sweep).
  if (!run.point().empty()) {
    labels["point"] = run.point().size() <= kMaxPointLabel ? run.point() : "p" + std::to_string(run.point_index());
  }
  return labels;
}

void Exporter::RecordStep(const v1::RunSummary& run, const v1::StepMetrics& m) {
  std::lock_guard<std::mutex> lock(mu_);
  // Progress is ingest's hot path: a run's series are found by (family, layer, head) in the
  // run's own map, and the label maps are built only for a series not yet there.
  RunSeries& series = run_series_[run.run_id()];
  std::optional<Labels> labels;
  const std::array<std::pair<prometheus::Family<prometheus::Gauge>*, double>, kStepSeries> values = {{
      {step_, static_cast<double>(m.step())},
      {loss_, m.loss()},
      {lr_, m.learning_rate()},
      {grad_norm_, m.grad_norm()},
      {tokens_per_second_, m.tokens_per_second()},
      {mfu_, m.mfu()},
      {val_loss_, m.val_loss()},
  }};
  for (size_t i = 0; i < kStepSeries; ++i) {
    if (values[i].first == val_loss_ && !m.has_val_loss()) continue;
    if (prometheus::Gauge* g = series.step[i]) {
      g->Set(values[i].second);
    } else {
      series.step[i] = SetRunGauge(run, series, labels, *values[i].first, -1, -1, values[i].second);
    }
  }
  steps_ingested_->Increment();
}

void Exporter::RecordProbe(const v1::RunSummary& run, const v1::ProbeReport& p) {
  std::lock_guard<std::mutex> lock(mu_);
  RunSeries& series = run_series_[run.run_id()];
  std::optional<Labels> labels;
  SetRunGauge(run, series, labels, *r_gs_median_, -1, -1, p.r_gs_median());
  SetRunGauge(run, series, labels, *probe_step_, -1, -1, static_cast<double>(p.step()));
  for (const v1::LayerProbe& l : p.layers()) {
    const int layer = l.layer();
    SetRunGauge(run, series, labels, *r_gs_, layer, -1, l.r_gs());
    SetRunGauge(run, series, labels, *sink_rate_, layer, -1, l.sink_rate());
    auto ratio = [&](const char* name) {
      auto it = l.norm_ratio().find(name);
      return it == l.norm_ratio().end() ? 0.0 : it->second;
    };
    SetRunGauge(run, series, labels, *h_out_ratio_, layer, -1, ratio("h_out"));
    SetRunGauge(run, series, labels, *r_mlp_ratio_, layer, -1, ratio("r_mlp"));
    SetRunGauge(run, series, labels, *r_attn_ratio_, layer, -1, ratio("r_attn"));
    SetRunGauge(run, series, labels, *v_ratio_, layer, -1, ratio("v"));
    if (l.massive().top3_size() > 0) SetRunGauge(run, series, labels, *massive_top1_, layer, -1, l.massive().top3(0));
    SetRunGauge(run, series, labels, *massive_ratio_, layer, -1, l.massive().top1_over_median());
    for (int h = 0; h < l.alpha_size(); ++h) SetRunGauge(run, series, labels, *alpha_, layer, h, l.alpha(h));
    for (int g = 0; g < l.theta_size(); ++g) SetRunGauge(run, series, labels, *theta_, layer, g, l.theta(g));
    for (int h = 0; h < l.unassigned_mass_size(); ++h) {
      SetRunGauge(run, series, labels, *unassigned_, layer, h, l.unassigned_mass(h));
    }
    for (int h = 0; h < l.gate_mean_size(); ++h) {
      SetRunGauge(run, series, labels, *gate_mean_, layer, h, l.gate_mean(h));
      if (h < l.gate_sink_size()) SetRunGauge(run, series, labels, *gate_sink_, layer, h, l.gate_sink(h));
      if (h < l.gate_rest_size()) SetRunGauge(run, series, labels, *gate_rest_, layer, h, l.gate_rest(h));
    }
  }
}

void Exporter::RunEnded(const std::string& run_id) {
  std::lock_guard<std::mutex> lock(mu_);
  ended_[run_id] = std::chrono::steady_clock::now();
}

void Exporter::RunRestarted() { restarts_->Increment(); }

void Exporter::SetFleet(int workers, int queued, int running) {
  workers_->Set(workers);
  queued_->Set(queued);
  running_->Set(running);
}

void Exporter::ProbeIngested(bool stored) { (stored ? probes_ingested_ : probes_duplicate_)->Increment(); }

void Exporter::ExpireSeries() {
  std::lock_guard<std::mutex> lock(mu_);
  const auto now = std::chrono::steady_clock::now();
  for (auto it = ended_.begin(); it != ended_.end();) {
    if (now - it->second < series_ttl_) {
      ++it;
      continue;
    }
    if (auto run = run_series_.find(it->first); run != run_series_.end()) {
      for (const auto& [key, gauge] : run->second.gauges) std::get<0>(key)->Remove(gauge);
      run_series_.erase(run);
    }
    it = ended_.erase(it);
  }
}

std::string Exporter::Scrape() const {
  std::ostringstream os;
  prometheus::TextSerializer().Serialize(os, registry_->Collect());
  return os.str();
}

}  // namespace sinkscope

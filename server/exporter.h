// Prometheus exposition of what the coordinator stores, through prometheus-cpp on its own
// port. Names follow Prometheus conventions: prefix sinkscope_, base units, _total for
// counters; labels are limited to experiment, arm, seed, run, point (a sweep's), layer
// and head. Series of
// a finished run are removed `series_ttl` after it finishes.
#pragma once

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>

#include <array>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "proto/sinkscope/v1/service.pb.h"
#include "base/status.h"

namespace sinkscope {

// HTTP basic authentication of /metrics: a scrape without these credentials gets 401.
struct MetricsBasicAuth {
  std::string user;
  std::string password;
};

class Exporter {
 public:
  // A sweep point's settings longer than this are labelled by the point's index instead.
  static constexpr size_t kMaxPointLabel = 128;
  // Series one run may add. A training run's reports are bounded by its model, a diagnostic
  // job's only by the schema (4,096 layers and heads): this caps both. It holds the
  // largest models probed in full (126 layers x (8 + 128 heads + 8 KV heads) = 18,144).
  static constexpr size_t kMaxSeriesPerRun = 32768;
  // The /metrics server: threads, and how long a connection may take to send its request.
  static constexpr int kMetricsThreads = 8;
  static constexpr int kMetricsRequestTimeoutMs = 2000;
  // Serves /metrics on `listen` ("host:port"); an empty `listen` keeps the registry
  // without serving it (tests). With `basic_auth`, /metrics answers 401 Unauthorized
  // unless the request carries those credentials (compared in constant time).
  static StatusOr<std::unique_ptr<Exporter>> Start(const std::string& listen, std::chrono::seconds series_ttl,
                                                   std::optional<MetricsBasicAuth> basic_auth = std::nullopt);

  // Per-run series.
  void RecordStep(const v1::RunSummary& run, const v1::StepMetrics& m);
  void RecordProbe(const v1::RunSummary& run, const v1::ProbeReport& report);
  // The run ended: its series are removed once `series_ttl` has passed.
  void RunEnded(const std::string& run_id);
  void RunRestarted();
  // Fleet gauges.
  void SetFleet(int workers, int queued, int running);
  void ProbeIngested(bool stored);
  // Removes the series of runs that ended more than series_ttl ago.
  void ExpireSeries();

  // The text exposition (for tests without a server).
  std::string Scrape() const;
  // The port actually bound (when `listen` asked for port 0).
  int port() const;

 private:
  Exporter() = default;
  using Labels = std::map<std::string, std::string>;
  static Labels RunLabels(const v1::RunSummary& run);  // experiment, arm, seed, run
  // Sets a run's series of `family` at `layer` and `head` (-1: no such label), adding it
  // unless the run has kMaxSeriesPerRun series already (then it is left out, and the first
  // time logged). `run_labels` is the run's labels, built on first need. Under mu_.
  struct RunSeries;
  // Returns the series, or null when it was left out.
  prometheus::Gauge* SetRunGauge(const v1::RunSummary& run, RunSeries& series, std::optional<Labels>& run_labels,
                                 prometheus::Family<prometheus::Gauge>& family, int layer, int head, double value);
  static constexpr size_t kStepSeries = 7;

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::chrono::seconds series_ttl_{600};

  mutable std::mutex mu_;
  // run id → its gauges, each with its family. How many series /metrics holds, by design:
  // 7 fleet and counter series, plus for each run that reported and has not been expired
  // (running, or ended less than series_ttl ago): 7 step series (val_loss once there is
  // one), 2 per probe report (r_gs median, step), and per layer L: 8 (r_gs, sink rate,
  // four norm ratios, massive top-1 and its ratio) + H (α per head) + K (θ per KV head).
  // So series ≤ 7 + Σ_runs min(kMaxSeriesPerRun, 9 + L·(8 + H + K)), with L, H, K bounded
  // by the run's model (an attention arm adds up to 4 per head), over the runs running or
  // ended less than series_ttl ago.
  struct RunSeries {
    // Every series of the run by (family, layer, head), -1 where the label is absent.
    std::map<std::tuple<prometheus::Family<prometheus::Gauge>*, int, int>, prometheus::Gauge*> gauges;
    // Its step series (kStepSeries of them, in RecordStep's order), once made: a Progress
    // sets them on ingest's hot path without a lookup.
    std::array<prometheus::Gauge*, kStepSeries> step{};
    bool capped = false;  // at kMaxSeriesPerRun (logged once)
  };
  std::unordered_map<std::string, RunSeries> run_series_;
  std::map<std::string, std::chrono::steady_clock::time_point> ended_;

  // Families (owned by the registry).
  prometheus::Family<prometheus::Gauge>* step_ = nullptr;
  prometheus::Family<prometheus::Gauge>* loss_ = nullptr;
  prometheus::Family<prometheus::Gauge>* val_loss_ = nullptr;
  prometheus::Family<prometheus::Gauge>* lr_ = nullptr;
  prometheus::Family<prometheus::Gauge>* grad_norm_ = nullptr;
  prometheus::Family<prometheus::Gauge>* tokens_per_second_ = nullptr;
  prometheus::Family<prometheus::Gauge>* mfu_ = nullptr;
  prometheus::Family<prometheus::Gauge>* r_gs_ = nullptr;
  prometheus::Family<prometheus::Gauge>* r_gs_median_ = nullptr;
  prometheus::Family<prometheus::Gauge>* sink_rate_ = nullptr;
  prometheus::Family<prometheus::Gauge>* h_out_ratio_ = nullptr;
  prometheus::Family<prometheus::Gauge>* r_mlp_ratio_ = nullptr;
  prometheus::Family<prometheus::Gauge>* r_attn_ratio_ = nullptr;
  prometheus::Family<prometheus::Gauge>* v_ratio_ = nullptr;
  prometheus::Family<prometheus::Gauge>* massive_top1_ = nullptr;
  prometheus::Family<prometheus::Gauge>* massive_ratio_ = nullptr;
  prometheus::Family<prometheus::Gauge>* alpha_ = nullptr;
  prometheus::Family<prometheus::Gauge>* theta_ = nullptr;
  // Attention arms (docs/design/ARMS.md "Probes"): per layer and head, only for arms with them.
  prometheus::Family<prometheus::Gauge>* unassigned_ = nullptr;
  prometheus::Family<prometheus::Gauge>* gate_mean_ = nullptr;
  prometheus::Family<prometheus::Gauge>* gate_sink_ = nullptr;
  prometheus::Family<prometheus::Gauge>* gate_rest_ = nullptr;
  prometheus::Family<prometheus::Gauge>* probe_step_ = nullptr;
  prometheus::Gauge* workers_ = nullptr;
  prometheus::Gauge* queued_ = nullptr;
  prometheus::Gauge* running_ = nullptr;
  prometheus::Counter* restarts_ = nullptr;
  prometheus::Counter* steps_ingested_ = nullptr;
  prometheus::Counter* probes_ingested_ = nullptr;
  prometheus::Counter* probes_duplicate_ = nullptr;
};

}  // namespace sinkscope

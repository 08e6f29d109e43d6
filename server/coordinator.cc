#include "server/coordinator.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <limits>
#include <set>
#include <unordered_map>

#include "base/cadence.h"
#include "base/log.h"
#include "schema/experiment.h"

namespace sinkscope {
namespace {

bool Active(v1::RunState s) { return s == v1::QUEUED || s == v1::RUNNING; }

v1::Stat MakeStat(const std::vector<double>& xs) {
  v1::Stat s;
  s.set_n(static_cast<int32_t>(xs.size()));
  if (xs.empty()) return s;
  double mean = 0;
  for (double x : xs) mean += x / xs.size();
  double var = 0;
  for (double x : xs) var += (x - mean) * (x - mean);
  s.set_mean(mean);
  s.set_std(xs.size() > 1 ? std::sqrt(var / (xs.size() - 1)) : 0.0);
  s.set_min(*std::min_element(xs.begin(), xs.end()));
  s.set_max(*std::max_element(xs.begin(), xs.end()));
  return s;
}

double Ratio(const v1::LayerProbe& l, const char* name) {
  auto it = l.norm_ratio().find(name);
  return it == l.norm_ratio().end() ? NAN : it->second;
}

std::string RunStateLabel(v1::RunState state) {
  std::string s = v1::RunState_Name(state);
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// What is structurally wrong with a probe report for this model and P, or "": layers
// once each in order, per-head and per-token sizes within what the model implies, and
// finite where METRICS.md's definitions are finite (norms, attention weights, θ, C).
std::string ProbeStructureError(const v1::ProbeReport& r, const v1::ModelSpec& m, int P) {
  auto finite = [](const auto& values) {
    return std::all_of(values.begin(), values.end(), [](double v) { return std::isfinite(v); });
  };
  for (int i = 0; i < r.layers_size(); ++i) {
    const v1::LayerProbe& l = r.layers(i);
    const std::string at = "layers[" + std::to_string(i) + "]";
    if (l.layer() != i) return at + " has layer " + std::to_string(l.layer()) + " (layers come once each, in order)";
    for (const auto* per_head : {&l.alpha(), &l.column_mass(), &l.column_second_moment(),
                                 &l.per_sample_sink_fraction()}) {
      if (per_head->size() > m.heads()) return at + ": more heads than model.heads";
      if (!finite(*per_head)) return at + ": a non-finite attention statistic";
    }
    if (l.theta_size() > m.kv_heads() || l.c_size() > m.kv_heads()) return at + ": more KV heads than model.kv_heads";
    for (const auto* per_head : {&l.unassigned_mass(), &l.gate_mean(), &l.gate_sink()}) {
      if (per_head->size() > m.heads()) return at + ": more heads than model.heads";
      if (!finite(*per_head)) return at + ": a non-finite attention-arm statistic";
    }
    if (l.gate_rest_size() > m.heads()) return at + ": more heads than model.heads";
    if (!finite(l.theta()) || !finite(l.c())) return at + ": a non-finite θ or C";
    if (!(l.sink_rate() >= 0 && l.sink_rate() <= 1)) return at + ": sink_rate outside [0, 1]";
    for (const auto* per_token : {&l.attn_bloat(), &l.attn_change(), &l.attn_compress(), &l.mlp_bloat(),
                                  &l.mlp_change(), &l.mlp_compress()}) {
      if (per_token->size() > P) return at + ": a per-token ratio longer than probe.profile_len";
    }
    // Only the keys METRICS.md defines: the gradient profile's sites and the norms' names.
    static const std::set<std::string> kSites = {"xn", "xm", "h_in", "h_half", "h_out", "q", "k", "v", "vh"};
    static const std::set<std::string> kNorms = {"h_in", "h_half", "h_out", "r_attn", "r_mlp", "v", "vh"};
    for (const auto& [name, series] : l.grad_profile()) {
      if (!kSites.count(name)) return at + ".grad_profile: a key that is not a profile site";
    }
    for (const auto* map : {&l.norms()}) {
      for (const auto& [name, series] : *map) {
        if (!kNorms.count(name)) return at + ".norms: a key that is not a norm's name";
      }
    }
    for (const auto& [name, value] : l.norm_ratio()) {
      if (!kNorms.count(name)) return at + ".norm_ratio: a key that is not a norm's name";
      if (!std::isfinite(value)) return at + ".norm_ratio: a non-finite ratio";
    }
    // Ratios of norms with positive denominators (Definition 1; Figure 7): finite.
    if (!std::isfinite(l.r_gs()) || !std::isfinite(l.r_gs_sum_then_norm()) || !std::isfinite(l.r_gs_norm_then_mean())) {
      return at + ": a non-finite r_gs";
    }
    if (!std::isfinite(l.massive().top1_over_median()) || !std::isfinite(l.massive().median()) ||
        !finite(l.massive().top3())) {
      return at + ".massive: a non-finite value";
    }
    if (l.massive().top3_size() > 3) return at + ".massive.top3: more than 3 values";
    for (const auto* map : {&l.grad_profile(), &l.norms()}) {
      for (const auto& [name, series] : *map) {
        if (series.values_size() > P) return at + "." + name + ": longer than probe.profile_len";
        if (!finite(series.values())) return at + "." + name + ": a non-finite norm";
      }
    }
  }
  if (!std::isfinite(r.r_gs_median()) || !std::isfinite(r.r_gs_q1()) || !std::isfinite(r.r_gs_q3())) {
    return "a non-finite r_gs median or quartile";
  }
  return "";
}

}  // namespace

void Coordinator::BindSessionLocked(Session& session, const Run& run) {
  const v1::RunSummary& summary = run.record.summary;
  session.run_id = summary.run_id();
  session.writer->ExpectProbes(summary.run_id(), run.spec->probe().every(), run.spec->train().steps());
}

std::string Coordinator::WaitReasonLocked(const v1::Experiment& spec) const {
  const std::string kind = v1::DeviceKind_Name(spec.resources().device());
  int of_kind = 0, busy = 0, big_enough = 0;
  int64_t largest = 0;
  const double need = spec.has_diagnostic() ? 0 : EstimateRunMemory(spec).total_bytes();
  for (const auto& [id, s] : sessions_) {
    if (!s.registered || s.capabilities.device() != spec.resources().device()) continue;
    ++of_kind;
    largest = std::max(largest, s.capabilities.memory_bytes());
    if (s.capabilities.memory_bytes() == 0 || s.capabilities.memory_bytes() >= need) ++big_enough;
    busy += !s.run_id.empty() || s.draining || s.lapsed;
  }
  if (of_kind == 0) return "waiting: no " + kind + " worker is connected";
  const int W = spec.resources().devices_per_run();
  if (W > 1 && big_enough < W) {
    return "waiting: a run needs " + std::to_string(W) + " " + kind +
           " workers at once (resources.devices_per_run, one rank each) and " + std::to_string(big_enough) +
           (big_enough == of_kind ? "" : " big enough") + " are connected";
  }
  if (big_enough == 0) {
    return "waiting: a run needs about " + FormatBytes(need) + " and the largest connected " + kind + " worker has " +
           FormatBytes(static_cast<double>(largest));
  }
  if (W > 1) {
    return "waiting: a run needs " + std::to_string(W) + " idle " + kind + " workers at once; " +
           std::to_string(of_kind - busy) + " of " + std::to_string(of_kind) + " are idle";
  }
  return "waiting: all " + std::to_string(of_kind) + " " + kind + " worker(s) are busy";
}

Status Coordinator::CheckFitsLocked(const v1::Experiment& spec) const {
  if (spec.has_diagnostic()) return OkStatus();  // the model is read by the worker: the coordinator cannot size it
  const RunMemoryEstimate need = EstimateRunMemory(spec);
  const std::string kind = v1::DeviceKind_Name(spec.resources().device());
  auto refuse = [&](const std::string& against) {
    return InvalidArgumentError("model: " + need.Describe() + "; " + against);
  };
  if (options_.max_run_bytes > 0 && need.total_bytes() > static_cast<double>(options_.max_run_bytes)) {
    return refuse("the coordinator's limit is " + FormatBytes(static_cast<double>(options_.max_run_bytes)) +
                  " per run (--max-run-gib)");
  }
  int64_t largest = 0;
  for (const auto& [id, s] : sessions_) {
    if (s.registered && s.capabilities.device() == spec.resources().device()) {
      largest = std::max(largest, s.capabilities.memory_bytes());
    }
  }
  if (largest > 0 && need.total_bytes() > static_cast<double>(largest)) {
    return refuse("the largest connected " + kind + " worker has " + FormatBytes(static_cast<double>(largest)));
  }
  return OkStatus();
}

int64_t Coordinator::RefusalLogAllowed(const char* event) {
  // Per event, at most kRefusalLogsPerSecond lines in each second (real time: a log's
  // pace, not the scheduler's clock); what is left out is counted into the next line.
  RefusalLog& log = refusal_logs_[event];
  const auto now = std::chrono::steady_clock::now();
  if (now - log.window_start >= std::chrono::seconds(1)) {
    log.window_start = now;
    log.in_window = 0;
  }
  if (log.in_window >= kRefusalLogsPerSecond) {
    ++log.unlogged;
    return -1;
  }
  ++log.in_window;
  const int64_t unlogged = log.unlogged;
  log.unlogged = 0;
  return unlogged;
}

int64_t Coordinator::NowMs() const {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Clock::TimePoint Coordinator::LeaseEnd(double seconds) const {
  if (seconds <= 0) seconds = options_.lease_seconds;
  return clock_->Now() + std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
}

void Coordinator::Renew(Run& run, double seconds) { run.lease_deadline = LeaseEnd(seconds); }

StatusOr<std::unique_ptr<Coordinator>> Coordinator::Create(Store* store, Exporter* exporter, const Options& options) {
  std::unique_ptr<Coordinator> c(new Coordinator(store, exporter, options));
  ASSIGN_OR_RETURN(std::vector<ExperimentRecord> experiments, store->LoadExperiments());
  for (auto& e : experiments) {
    const std::string id = e.summary.experiment_id();
    c->experiment_order_.push_back(id);
    c->experiments_[id] = std::move(e);
  }
  ASSIGN_OR_RETURN(std::vector<RunRecord> runs, store->LoadRuns());
  // Each run's experiment: its sweep point's, derived again from the experiment as submitted.
  std::map<std::pair<std::string, int>, std::shared_ptr<const v1::Experiment>> specs;
  for (auto& r : runs) {
    Run run;
    run.record = std::move(r);
    const std::string id = run.record.summary.run_id();
    {
      const std::string& experiment_id = run.record.summary.experiment_id();
      auto e = c->experiments_.find(experiment_id);
      if (e == c->experiments_.end()) {
        return DataLossError("store: run " + id + " belongs to experiment " + experiment_id + ", which is not stored");
      }
      const int point = run.record.summary.point_index();
      auto& spec = specs[{experiment_id, point}];
      if (spec == nullptr) {
        const v1::ExperimentSummary& es = e->second.summary;
        if (es.submitted().sweep_size() > 0) {
          auto pe = SweepPointExperiment(es.submitted(), point, nullptr);
          if (!pe.ok()) return DataLossError("store: run " + id + ": " + pe.status().message());
          spec = std::make_shared<const v1::Experiment>(std::move(*pe));
        } else {
          spec = std::make_shared<const v1::Experiment>(es.spec());
        }
      }
      run.spec = spec;
    }
    c->experiment_runs_[run.record.summary.experiment_id()].push_back(id);
    if (run.record.summary.state() == v1::QUEUED) c->queue_.push_back(id);
    if (run.record.summary.state() == v1::RUNNING) {  // grace for its workers to reconnect
      c->Renew(run, std::max(options.lease_seconds, options.recovery_grace_seconds));
      for (int k = 1; k < run.record.summary.rank_workers_size(); ++k) {
        run.peers.push_back({run.record.summary.rank_workers(k), 0, run.lease_deadline, false});
      }
    }
    auto count = store->CountProbes(id);
    run.probe_reports = count.ok() ? *count : 0;
    // Steps are stored as step rows only (group commit): the run's progress follows from them.
    ASSIGN_OR_RETURN(Store::Progress progress, store->LatestProgress(id));
    v1::RunSummary& s = run.record.summary;
    if (progress.latest && progress.latest->step() >= s.step()) {
      s.set_step(progress.latest->step());
      s.set_loss(progress.latest->loss());
      s.set_tokens_per_second(progress.latest->tokens_per_second());
    }
    if (progress.val_loss) s.set_val_loss(*progress.val_loss);
    c->runs_[id] = std::move(run);
  }
  Log(LogLevel::kInfo, "coordinator_recovered",
      {{"experiments", std::to_string(c->experiments_.size())}, {"runs", std::to_string(c->runs_.size())},
       {"queued", std::to_string(c->queue_.size())}});
  return c;
}

StatusOr<v1::SubmitExperimentResponse> Coordinator::Submit(v1::Experiment e, const std::function<bool()>& stop) {
  const v1::Experiment submitted = e;
  ApplyDefaults(e);
  RETURN_IF_ERROR(ValidateExperiment(e, options_.check_data_paths && e.sweep_size() == 0, stop));
  // The points of a sweep (one without): each is an experiment of its own, checked whole.
  struct Point {
    std::string label;
    std::shared_ptr<const v1::Experiment> spec;
  };
  std::vector<Point> points;
  if (e.sweep_size() == 0) {
    points.push_back({"", std::make_shared<const v1::Experiment>(e)});
  } else {
    const int64_t n = SweepPointCount(e);
    for (int64_t i = 0; i < n; ++i) {
      Point p;
      ASSIGN_OR_RETURN(v1::Experiment pe, SweepPointExperiment(submitted, i, &p.label));
      if (Status st = ValidateExperiment(pe, options_.check_data_paths, stop); !st.ok()) {
        if (st.code() == StatusCode::kCancelled) return st;
        return InvalidArgumentError("sweep point " + std::to_string(i) + " (" + p.label + "): " + st.message());
      }
      p.spec = std::make_shared<const v1::Experiment>(std::move(pe));
      points.push_back(std::move(p));
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < points.size(); ++i) {
    Status st = CheckFitsLocked(*points[i].spec);
    if (st.ok()) st = CheckProbeReportFits(*points[i].spec);  // after memory: a model too big is named as such
    if (!st.ok()) {
      if (points.size() == 1) return st;
      return Status(st.code(), "sweep point " + std::to_string(i) + " (" + points[i].label + "): " + st.message());
    }
  }
  ASSIGN_OR_RETURN(int64_t last, store_->LastExperimentNumber(e.name()));
  const std::string id = e.name() + "-" + std::to_string(last + 1);
  ExperimentRecord rec;
  rec.summary.set_experiment_id(id);
  rec.summary.set_name(e.name());
  rec.summary.set_state(v1::ACTIVE);
  rec.summary.set_created_unix_ms(NowMs());
  *rec.summary.mutable_spec() = e;
  if (e.sweep_size() > 0) *rec.summary.mutable_submitted() = submitted;
  std::vector<RunRecord> runs;
  std::vector<std::shared_ptr<const v1::Experiment>> run_specs;
  v1::SubmitExperimentResponse response;
  response.set_experiment_id(id);
  for (size_t p = 0; p < points.size(); ++p) {
    for (int a : e.arms()) {
      for (uint64_t seed : e.seeds()) {
        RunRecord r;
        v1::RunSummary& s = r.summary;
        const std::string point = points.size() > 1 ? "-p" + std::to_string(p) : "";
        s.set_run_id(id + point + "-" + ArmName(static_cast<v1::Arm>(a)) + "-s" + std::to_string(seed));
        s.set_experiment_id(id);
        s.set_arm(static_cast<v1::Arm>(a));
        s.set_seed(seed);
        s.set_state(v1::QUEUED);
        s.set_total_steps(points[p].spec->train().steps());
        s.set_point(points[p].label);
        s.set_point_index(static_cast<int32_t>(p));
        runs.push_back(r);
        run_specs.push_back(points[p].spec);
        response.add_run_ids(s.run_id());
      }
    }
  }
  RETURN_IF_ERROR(store_->InsertExperiment(rec, runs));
  experiments_[id] = rec;
  experiment_order_.push_back(id);
  for (size_t i = 0; i < runs.size(); ++i) {
    const std::string run_id = runs[i].summary.run_id();
    experiment_runs_[id].push_back(run_id);
    queue_.push_back(run_id);
    Run& run = runs_[run_id];
    run.record = std::move(runs[i]);
    run.spec = run_specs[i];
  }
  Log(LogLevel::kInfo, "experiment_submitted", {{"experiment", id}, {"runs", std::to_string(runs.size())}});
  return response;
}

v1::ExperimentSummary Coordinator::SummaryLocked(const std::string& id, bool with_spec) {
  v1::ExperimentSummary s = experiments_.at(id).summary;
  if (!with_spec) s.clear_spec();
  for (const std::string& run_id : experiment_runs_[id]) {
    const Run& run = runs_.at(run_id);
    v1::RunSummary* r = s.add_runs();
    *r = run.record.summary;
    r->set_probe_reports(run.probe_reports);
    if (r->state() == v1::RUNNING && run.step_seconds > 0) {
      r->set_eta_seconds(run.step_seconds * static_cast<double>(r->total_steps() - r->step()));
    }
  }
  return s;
}

StatusOr<v1::ExperimentSummary> Coordinator::GetExperiment(const std::string& id, bool with_spec) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!experiments_.count(id)) return NotFoundError("experiment " + id + " does not exist");
  return SummaryLocked(id, with_spec);
}

v1::ListExperimentsResponse Coordinator::ListExperiments(int limit) {
  std::lock_guard<std::mutex> lock(mu_);
  v1::ListExperimentsResponse out;
  if (limit <= 0) limit = 50;
  for (auto it = experiment_order_.rbegin(); it != experiment_order_.rend() && out.experiments_size() < limit; ++it) {
    *out.add_experiments() = SummaryLocked(*it, false);
  }
  return out;
}

void Coordinator::EnqueueWatchEventLocked(Watcher& w, const v1::WatchEvent& event) {
  const size_t bytes = event.ByteSizeLong();
  std::lock_guard<std::mutex> lock(w.mu);
  if (event.has_snapshot()) w.ended = event.snapshot().state() != v1::ACTIVE;
  if (!w.events.empty() && (w.events.size() >= Watcher::kMaxEvents || w.queued_bytes + bytes > Watcher::kMaxBytes)) {
    // The watcher fell behind: what it has not read is dropped for one snapshot of the
    // latest state, which says how many events it lost.
    const int64_t dropped = static_cast<int64_t>(w.events.size()) + (event.has_snapshot() ? 0 : 1);
    Log(LogLevel::kWarning, "watch_events_dropped",
        {{"experiment", w.experiment_id}, {"dropped", std::to_string(dropped)},
         {"queued_bytes", std::to_string(w.queued_bytes)},
         {"reason", "the watcher did not read its stream; it gets the latest state instead"}});
    w.dropped += dropped;
    w.events.clear();
    v1::WatchEvent latest;
    if (event.has_snapshot()) {
      latest = event;
    } else {
      *latest.mutable_snapshot() = SummaryLocked(w.experiment_id, false);
    }
    latest.set_dropped_events(w.dropped);
    w.queued_bytes = latest.ByteSizeLong();
    w.events.push_back(std::move(latest));
  } else {
    w.queued_bytes += bytes;
    w.events.push_back(event);
  }
  w.cv.notify_all();
}

bool Coordinator::WatchedLocked(const std::string& experiment_id, bool is_probe) const {
  return std::any_of(watchers_.begin(), watchers_.end(), [&](const std::shared_ptr<Watcher>& w) {
    return w->experiment_id == experiment_id && (!is_probe || w->include_probes);
  });
}

void Coordinator::PublishLocked(const std::string& experiment_id, const v1::WatchEvent& event, bool is_probe) {
  for (const auto& w : watchers_) {
    if (w->experiment_id != experiment_id || (is_probe && !w->include_probes)) continue;
    EnqueueWatchEventLocked(*w, event);
  }
}

void Coordinator::PublishSnapshotLocked(const std::string& experiment_id) {
  // A snapshot costs a summary of every run: only when someone watches this experiment.
  if (std::none_of(watchers_.begin(), watchers_.end(),
                   [&](const std::shared_ptr<Watcher>& w) { return w->experiment_id == experiment_id; })) {
    return;
  }
  v1::WatchEvent event;
  *event.mutable_snapshot() = SummaryLocked(experiment_id, false);
  for (const auto& w : watchers_) {
    if (w->experiment_id == experiment_id) EnqueueWatchEventLocked(*w, event);
  }
}

StatusOr<std::shared_ptr<Watcher>> Coordinator::Watch(const std::string& id, bool include_probes) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!experiments_.count(id)) return NotFoundError("experiment " + id + " does not exist");
  auto w = std::make_shared<Watcher>();
  w->experiment_id = id;
  w->include_probes = include_probes;
  v1::WatchEvent event;
  *event.mutable_snapshot() = SummaryLocked(id, false);
  EnqueueWatchEventLocked(*w, event);
  watchers_.push_back(w);
  return w;
}

void Coordinator::Unwatch(const std::shared_ptr<Watcher>& watcher) {
  std::lock_guard<std::mutex> lock(mu_);
  watchers_.erase(std::remove(watchers_.begin(), watchers_.end(), watcher), watchers_.end());
}

void Coordinator::DetachSessionLocked(Run& run, bool keep_running_peers) {
  const std::string& id = run.record.summary.run_id();
  auto free = [&](int64_t session) {
    auto it = sessions_.find(session);
    if (it != sessions_.end() && it->second.run_id == id) it->second.run_id.clear();
  };
  if (run.session != 0) free(run.session);
  run.session = 0;
  for (Run::Peer& peer : run.peers) {
    if (peer.session == 0 || (keep_running_peers && !peer.done)) continue;
    free(peer.session);
    peer.session = 0;
  }
}

int Coordinator::RankOfLocked(const Run& run, int64_t session) const {
  if (session == 0) return -1;
  if (run.session == session) return 0;
  for (size_t k = 0; k < run.peers.size(); ++k) {
    if (run.peers[k].session == session) return static_cast<int>(k) + 1;
  }
  return -1;
}

std::vector<std::shared_ptr<SessionWriter>> Coordinator::GangWritersLocked(const Run& run, int64_t except) const {
  std::vector<std::shared_ptr<SessionWriter>> writers;
  auto add = [&](int64_t session) {
    if (session == 0 || session == except) return;
    if (auto it = sessions_.find(session); it != sessions_.end()) writers.push_back(it->second.writer);
  };
  add(run.session);
  for (const Run::Peer& peer : run.peers) add(peer.session);
  return writers;
}

v1::CoordinatorMessage Coordinator::RendezvousMessage(const Run& run, const std::string& key,
                                                      const std::string& value) {
  v1::CoordinatorMessage m;
  v1::RendezvousValue* v = m.mutable_rendezvous();
  v->set_run_id(run.record.summary.run_id());
  v->set_attempt(run.record.summary.attempt());
  v->set_key(key);
  v->set_value(value);
  return m;
}

void Coordinator::SendRendezvousLocked(const Run& run, const std::string& key, const std::string& value,
                                       Outbox& out) const {
  const v1::CoordinatorMessage m = RendezvousMessage(run, key, value);
  for (const auto& writer : GangWritersLocked(run, 0)) out.push_back({writer, m});
}

Status Coordinator::RestartGangLocked(Run& run, const std::string& why, int64_t except_session, Outbox& out) {
  const v1::RunSummary& s = run.record.summary;
  const std::string id = s.run_id();
  const int restarts = run.record.restarts + 1;
  const int max_restarts = experiments_.at(s.experiment_id()).summary.spec().max_restarts();
  const std::vector<std::shared_ptr<SessionWriter>> others = GangWritersLocked(run, except_session);
  const std::string step = std::to_string(s.step());
  RETURN_IF_ERROR(restarts > max_restarts
                      ? EndRunLocked(run, v1::FAILED, v1::RESTARTS_EXHAUSTED,
                                     why + "; the gang was restarted " + std::to_string(restarts) +
                                         " times (max_restarts " + std::to_string(max_restarts) + ")",
                                     "rank lost", /*restart=*/true)
                      : RequeueLocked(run, "rank lost", "requeued at step " + step + ": " + why, /*restart=*/true));
  Log(LogLevel::kWarning, "gang_restarted",
      {{"run", id}, {"step", step}, {"restarts", std::to_string(restarts)}, {"reason", why}});
  v1::CoordinatorMessage cancel;
  cancel.mutable_cancel()->set_run_id(id);
  cancel.mutable_cancel()->set_reason("the gang's attempt ended: " + why);
  for (const auto& writer : others) out.push_back({writer, cancel});
  return OkStatus();
}

Status Coordinator::CommitRunChangesLocked(const std::string& experiment_id, std::vector<Store::RunChange> changes,
                                           bool cancel_experiment) {
  // The experiment's state once these changes are made.
  ExperimentRecord experiment = experiments_.at(experiment_id);
  if (cancel_experiment) experiment.cancelled = true;
  std::map<std::string, v1::RunState> after;
  for (const Store::RunChange& c : changes) after[c.run.summary.run_id()] = c.run.summary.state();
  bool active = false, failed = false;
  for (const std::string& run_id : experiment_runs_[experiment_id]) {
    auto it = after.find(run_id);
    const v1::RunState s = it != after.end() ? it->second : runs_.at(run_id).record.summary.state();
    active |= Active(s);
    failed |= s == v1::FAILED;
  }
  const v1::ExperimentState state = active                ? v1::ACTIVE
                                    : experiment.cancelled ? v1::EXPERIMENT_CANCELLED
                                    : failed               ? v1::FAILED_RUNS
                                                           : v1::COMPLETED;
  const bool experiment_changes = cancel_experiment || state != experiment.summary.state();
  experiment.summary.set_state(state);
  if (Status st = store_->ApplyRunChanges(changes, experiment_changes ? &experiment : nullptr, NowMs()); !st.ok()) {
    Log(LogLevel::kError, "store_write_failed",
        {{"what", "run state"}, {"experiment", experiment_id}, {"runs", std::to_string(changes.size())},
         {"error", st.message()}});
    return st;
  }
  for (Store::RunChange& c : changes) {
    Run& run = runs_.at(c.run.summary.run_id());
    const v1::RunState was = run.record.summary.state(), now = c.run.summary.state();
    if (was == v1::RUNNING && now != v1::RUNNING) DetachSessionLocked(run, /*keep_running_peers=*/now == v1::SUCCEEDED);
    if (was == v1::QUEUED && now != v1::QUEUED) {
      queue_.erase(std::remove(queue_.begin(), queue_.end(), c.run.summary.run_id()), queue_.end());
    }
    if (now == v1::QUEUED && was != v1::QUEUED) queue_.push_back(c.run.summary.run_id());
    if (c.run.restarts > run.record.restarts) exporter_->RunRestarted();
    run.record = std::move(c.run);
    const v1::RunSummary& s = run.record.summary;
    if (!Active(now)) {
      exporter_->RunEnded(s.run_id());
      Log(now == v1::FAILED ? LogLevel::kWarning : LogLevel::kInfo, "run_ended",
          {{"run", s.run_id()}, {"state", v1::RunState_Name(now)},
           {"reason", v1::FailureReason_Name(s.failure_reason())}, {"message", s.message()}});
    }
  }
  experiments_[experiment_id] = std::move(experiment);
  PublishSnapshotLocked(experiment_id);
  return OkStatus();
}

Status Coordinator::RequeueLocked(Run& run, const std::string& outcome, const std::string& message, bool restart,
                                  int64_t step) {
  Store::RunChange c{run.record, run.record.summary.state() == v1::RUNNING ? run.record.summary.attempt() : 0,
                     outcome};
  if (step >= 0) c.run.summary.set_step(step);
  c.run.summary.set_state(v1::QUEUED);
  c.run.summary.set_message(message);
  if (restart) ++c.run.restarts;
  return CommitRunChangesLocked(run.record.summary.experiment_id(), {std::move(c)}, false);
}

Status Coordinator::EndRunLocked(Run& run, v1::RunState state, v1::FailureReason reason, const std::string& message,
                                 const std::string& outcome, bool restart, int64_t step) {
  Store::RunChange c{run.record, run.record.summary.state() == v1::RUNNING ? run.record.summary.attempt() : 0,
                     outcome};
  if (step >= 0) c.run.summary.set_step(step);
  c.run.summary.set_state(state);
  c.run.summary.set_failure_reason(reason);
  c.run.summary.set_message(message);
  c.run.finished_unix_ms = NowMs();
  if (restart) ++c.run.restarts;
  return CommitRunChangesLocked(run.record.summary.experiment_id(), {std::move(c)}, false);
}

StatusOr<v1::ExperimentSummary> Coordinator::Cancel(const std::string& id) {
  Outbox out;
  v1::ExperimentSummary summary;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = experiments_.find(id);
    if (it == experiments_.end()) return NotFoundError("experiment " + id + " does not exist");
    if (it->second.summary.state() != v1::ACTIVE) {
      return FailedPreconditionError("experiment " + id + " already ended (" +
                                     v1::ExperimentState_Name(it->second.summary.state()) + ")");
    }
    // Every active run and the experiment, in one transaction: whole or not at all.
    std::vector<Store::RunChange> changes;
    std::vector<std::shared_ptr<SessionWriter>> holders;
    std::vector<std::string> cancelled;
    for (const std::string& run_id : experiment_runs_[id]) {
      Run& run = runs_.at(run_id);
      if (!Active(run.record.summary.state())) continue;
      Store::RunChange c{run.record,
                         run.record.summary.state() == v1::RUNNING ? run.record.summary.attempt() : 0, "cancelled"};
      c.run.summary.set_state(v1::CANCELLED);
      c.run.summary.set_failure_reason(v1::FAILURE_REASON_UNSPECIFIED);
      c.run.summary.set_message("cancelled by a user");
      c.run.finished_unix_ms = NowMs();
      changes.push_back(std::move(c));
      for (const auto& writer : GangWritersLocked(run, 0)) {  // every rank
        holders.push_back(writer);
        cancelled.push_back(run_id);
      }
    }
    RETURN_IF_ERROR(CommitRunChangesLocked(id, std::move(changes), /*cancel_experiment=*/true));  // nothing changed
    for (size_t i = 0; i < holders.size(); ++i) {
      v1::CoordinatorMessage m;
      m.mutable_cancel()->set_run_id(cancelled[i]);
      m.mutable_cancel()->set_reason("the experiment was cancelled");
      out.push_back({holders[i], m});
    }
    summary = SummaryLocked(id, false);
  }
  for (auto& [writer, m] : out) writer->Send(m);
  return summary;
}

StatusOr<v1::GetRunMetricsResponse> Coordinator::GetRunMetrics(const v1::GetRunMetricsRequest& request) {
  v1::GetRunMetricsResponse out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = runs_.find(request.run_id());
    if (it == runs_.end()) return NotFoundError("run " + request.run_id() + " does not exist");
    *out.mutable_run() = it->second.record.summary;
    out.mutable_run()->set_probe_reports(it->second.probe_reports);
  }
  if (request.probes_only() && request.steps_only()) {
    return InvalidArgumentError("probes_only and steps_only: at most one of them");
  }
  if (request.max_bytes() < 0) {
    return InvalidArgumentError("max_bytes: must not be negative, got " + std::to_string(request.max_bytes()));
  }
  const std::string& run = request.run_id();
  if (request.max_bytes() == 0) {  // the whole run from from_step at once
    if (!request.probes_only()) {
      ASSIGN_OR_RETURN(auto steps, store_->Steps(run, request.from_step()));
      for (auto& s : steps) *out.add_steps() = std::move(s);
    }
    if (!request.steps_only()) {
      ASSIGN_OR_RETURN(auto probes, store_->Probes(run, request.from_step()));
      for (auto& p : probes) *out.add_probes() = std::move(p);
    }
    return out;
  }
  // A page (issue 28: reads that stream): the steps first, as many as fit the budget at
  // a step row's usual size, then probe reports one at a time below the steps' cut, until
  // the budget is spent; the page ends at a step boundary, so the next from_step is where
  // the first item left out begins. Memory follows the page, not the run.
  const int64_t budget = request.max_bytes(), from = request.from_step();
  int64_t cut = std::numeric_limits<int64_t>::max(), bytes = 0;
  if (!request.probes_only()) {
    constexpr int64_t kStepRowBytes = 96;  // a StepMetrics message, about
    const int64_t rows = std::max<int64_t>(1, budget / kStepRowBytes);
    ASSIGN_OR_RETURN(auto steps, store_->Steps(run, from, rows + 1));
    if (static_cast<int64_t>(steps.size()) > rows) {
      cut = steps.back().step();
      steps.pop_back();
    }
    for (auto& s : steps) {
      bytes += static_cast<int64_t>(s.ByteSizeLong());
      *out.add_steps() = std::move(s);
    }
  }
  if (!request.steps_only()) {
    ASSIGN_OR_RETURN(std::vector<int64_t> probed, store_->ProbeSteps(run));
    for (int64_t at : probed) {
      if (at < from) continue;
      if (at >= cut) break;
      ASSIGN_OR_RETURN(std::optional<v1::ProbeReport> report, store_->ProbeAt(run, at));
      if (!report) continue;  // gone since the listing (never expected: reports are not deleted)
      const int64_t size = static_cast<int64_t>(report->ByteSizeLong());
      if (out.probes_size() > 0 && bytes + size > budget) {
        cut = at;
        break;
      }
      bytes += size;
      *out.add_probes() = std::move(*report);
    }
    // Steps at or past the probes' cut belong to the next page.
    while (out.steps_size() > 0 && out.steps(out.steps_size() - 1).step() >= cut) out.mutable_steps()->RemoveLast();
  }
  if (cut != std::numeric_limits<int64_t>::max()) out.set_next_from_step(cut);
  return out;
}

StatusOr<v1::CompareArmsResponse> Coordinator::CompareArms(const v1::CompareArmsRequest& request) {
  v1::Experiment spec;
  std::vector<v1::RunSummary> runs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = experiments_.find(request.experiment_id());
    if (it == experiments_.end()) return NotFoundError("experiment " + request.experiment_id() + " does not exist");
    spec = it->second.summary.spec();
    if (request.has_point() && (request.point() < 0 || request.point() >= SweepPointCount(spec))) {
      return InvalidArgumentError("point " + std::to_string(request.point()) + ": experiment " +
                                  request.experiment_id() + " has " + std::to_string(SweepPointCount(spec)) +
                                  " point" + (SweepPointCount(spec) == 1 ? "" : "s") + " (0-based)");
    }
    for (const std::string& run_id : experiment_runs_[request.experiment_id()]) {
      const v1::RunSummary& r = runs_.at(run_id).record.summary;
      if (!request.has_point() || r.point_index() == request.point()) runs.push_back(r);
    }
  }
  // Reads stream (issue 28, finding 7): the probed steps of every run first (numbers only),
  // then one report at a time, folded into per-layer values, so memory follows the number
  // of runs and layers, never the experiment's stored reports.
  std::map<std::string, std::vector<int64_t>> probed_steps;  // run → its probed steps, ascending
  std::map<std::string, double> mean_tps;
  for (const auto& r : runs) {
    ASSIGN_OR_RETURN(probed_steps[r.run_id()], store_->ProbeSteps(r.run_id()));
    ASSIGN_OR_RETURN(auto steps, store_->Steps(r.run_id(), 2));  // step 1 pays one-time set-up
    double sum = 0;
    for (const auto& s : steps) sum += s.tokens_per_second() / steps.size();
    mean_tps[r.run_id()] = steps.empty() ? r.tokens_per_second() : sum;
  }
  int64_t step = request.step();
  if (step == 0) {  // the latest step probed in every run that has probes
    std::set<int64_t> common;
    bool first = true;
    for (const auto& [run_id, steps] : probed_steps) {
      if (steps.empty()) continue;
      const std::set<int64_t> these(steps.begin(), steps.end());
      if (first) {
        common = these;
        first = false;
      } else {
        std::set<int64_t> both;
        std::set_intersection(common.begin(), common.end(), these.begin(), these.end(),
                              std::inserter(both, both.begin()));
        common = both;
      }
    }
    step = common.empty() ? -1 : *common.rbegin();
  } else {  // a step asked for: some run must have been probed there
    std::set<int64_t> probed;
    for (const auto& [run_id, steps] : probed_steps) probed.insert(steps.begin(), steps.end());
    if (!probed.count(step)) {
      std::string list;
      int shown = 0;
      for (int64_t s : probed) {
        if (shown++ == 20) {
          list += ", … " + std::to_string(*probed.rbegin());
          break;
        }
        list += (list.empty() ? "" : ", ") + std::to_string(s);
      }
      return NotFoundError("no run of experiment " + request.experiment_id() + " was probed at step " +
                           std::to_string(step) +
                           (probed.empty() ? "; nothing was probed yet" : "; probed steps: " + list));
    }
  }
  struct LayerValues {
    std::vector<double> rgs, sink, hout, rmlp, rattn, v, top1, theta, unassigned, gate_mean, gate_sink, gate_rest;
  };
  v1::CompareArmsResponse out;
  out.set_experiment_id(request.experiment_id());
  std::map<int, std::string> points;  // index → label, of the runs compared
  for (const auto& r : runs) {
    if (!request.has_point() || r.point_index() == request.point()) points[r.point_index()] = r.point();
  }
  for (const auto& [point, label] : points)
  for (int a : spec.arms()) {
    v1::ArmComparison* arm = out.add_arms();
    arm->set_arm(static_cast<v1::Arm>(a));
    arm->set_point(label);
    arm->set_point_index(point);
    std::vector<double> final_loss, val_loss, tps, medians;
    std::vector<LayerValues> layers;  // sized by the arm's first report
    bool any_report = false;
    for (const auto& r : runs) {
      if (r.arm() != a || r.point_index() != point) continue;
      if (r.step() > 0) final_loss.push_back(r.loss());
      if (r.has_val_loss()) val_loss.push_back(r.val_loss());
      if (mean_tps[r.run_id()] > 0) tps.push_back(mean_tps[r.run_id()]);
      const std::vector<int64_t>& steps = probed_steps[r.run_id()];
      if (steps.empty()) continue;
      const int64_t at = step >= 0 ? step : steps.back();  // no common step: each run's latest
      if (!std::binary_search(steps.begin(), steps.end(), at)) continue;
      ASSIGN_OR_RETURN(std::optional<v1::ProbeReport> report, store_->ProbeAt(r.run_id(), at));
      if (!report) continue;  // removed meanwhile
      const v1::ProbeReport& p = *report;
      if (!any_report) {
        arm->set_step(p.step());
        layers.resize(p.layers_size());
        any_report = true;
      }
      medians.push_back(p.r_gs_median());
      for (size_t l = 0; l < layers.size() && static_cast<int>(l) < p.layers_size(); ++l) {
        const v1::LayerProbe& x = p.layers(static_cast<int>(l));
        LayerValues& lv = layers[l];
        lv.rgs.push_back(x.r_gs());
        lv.sink.push_back(x.sink_rate());
        lv.hout.push_back(Ratio(x, "h_out"));
        lv.rmlp.push_back(Ratio(x, "r_mlp"));
        lv.rattn.push_back(Ratio(x, "r_attn"));
        lv.v.push_back(Ratio(x, "v"));
        lv.top1.push_back(x.massive().top1_over_median());
        double t = 0;
        for (double th : x.theta()) t += th / std::max(1, x.theta_size());
        lv.theta.push_back(t);
        auto head_mean = [](const auto& values) {
          double m = 0;
          for (double x : values) m += x / values.size();
          return m;
        };
        if (x.unassigned_mass_size() > 0) lv.unassigned.push_back(head_mean(x.unassigned_mass()));
        if (x.gate_mean_size() > 0) {
          lv.gate_mean.push_back(head_mean(x.gate_mean()));
          lv.gate_sink.push_back(head_mean(x.gate_sink()));
          lv.gate_rest.push_back(head_mean(x.gate_rest()));
        }
      }
    }
    *arm->mutable_final_loss() = MakeStat(final_loss);
    *arm->mutable_val_loss() = MakeStat(val_loss);
    *arm->mutable_tokens_per_second() = MakeStat(tps);
    if (!any_report) continue;
    *arm->mutable_r_gs_median() = MakeStat(medians);
    for (size_t l = 0; l < layers.size(); ++l) {
      v1::LayerComparison* lc = arm->add_layers();
      lc->set_layer(static_cast<int>(l));
      const LayerValues& lv = layers[l];
      *lc->mutable_r_gs() = MakeStat(lv.rgs);
      *lc->mutable_sink_rate() = MakeStat(lv.sink);
      *lc->mutable_h_out_ratio() = MakeStat(lv.hout);
      *lc->mutable_r_mlp_ratio() = MakeStat(lv.rmlp);
      *lc->mutable_r_attn_ratio() = MakeStat(lv.rattn);
      *lc->mutable_v_ratio() = MakeStat(lv.v);
      *lc->mutable_top1_over_median() = MakeStat(lv.top1);
      *lc->mutable_mean_theta() = MakeStat(lv.theta);
      if (!lv.unassigned.empty()) *lc->mutable_unassigned_mass() = MakeStat(lv.unassigned);
      if (!lv.gate_mean.empty()) {
        *lc->mutable_gate_mean() = MakeStat(lv.gate_mean);
        *lc->mutable_gate_sink() = MakeStat(lv.gate_sink);
        *lc->mutable_gate_rest() = MakeStat(lv.gate_rest);
      }
    }
  }
  return out;
}

int64_t Coordinator::OpenSession(std::shared_ptr<SessionWriter> writer) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t id = next_session_++;
  sessions_[id].writer = std::move(writer);
  return id;
}

void Coordinator::CloseSessionLocked(int64_t session) {
  auto it = sessions_.find(session);
  if (it == sessions_.end()) return;
  Log(LogLevel::kInfo, "worker_disconnected", {{"worker", it->second.worker_id}, {"run", it->second.run_id}});
  // The run keeps its lease until it lapses: the worker may reconnect in time.
  for (auto& [id, run] : runs_) {
    if (run.session == session) run.session = 0;
    for (Run::Peer& peer : run.peers) {
      if (peer.session == session) peer.session = 0;
    }
  }
  sessions_.erase(it);
  ExportFleetLocked();
}

void Coordinator::ExportFleetLocked() {
  int workers = 0, queued = static_cast<int>(queue_.size()), running = 0;
  for (const auto& [id, session] : sessions_) workers += session.registered;
  for (const auto& [id, run] : runs_) running += run.record.summary.state() == v1::RUNNING;
  exporter_->SetFleet(workers, queued, running);
}

void Coordinator::FlushReportsLocked(std::unique_lock<std::mutex>& lock, std::vector<DeferredReport>& deferred) {
  if (deferred.empty()) return;
  std::vector<Store::ReportWrite> writes;
  writes.reserve(deferred.size());
  for (const DeferredReport& d : deferred) writes.push_back(d.write);
  lock.unlock();
  StatusOr<std::vector<bool>> fresh = store_->WriteReports(writes);
  lock.lock();
  for (size_t i = 0; i < deferred.size(); ++i) {
    deferred[i].then(fresh.ok() ? OkStatus() : fresh.status(), fresh.ok() && (*fresh)[i]);
  }
  deferred.clear();
}

void Coordinator::OnWorkerEvents(const std::vector<WorkerEvent>& events) {
  Outbox out;
  // Prometheus series updates, made once mu_ is released: a report's many series must not
  // hold up the scheduler and every other call (the exporter has its own lock).
  Exports exports;
  {
    std::unique_lock<std::mutex> lock(mu_);
    std::vector<DeferredReport> deferred;
    bool place = false;
    for (const WorkerEvent& e : events) {
      const v1::WorkerMessage::MessageCase kind =
          e.message == nullptr ? v1::WorkerMessage::MESSAGE_NOT_SET : e.message->message_case();
      // Only Progress, probe reports and heartbeats may pass a write of the batch: any
      // other message (a finish, a release, a close) sees the session's earlier writes done.
      if (kind != v1::WorkerMessage::kProgress && kind != v1::WorkerMessage::kProbe &&
          kind != v1::WorkerMessage::kHeartbeat) {
        FlushReportsLocked(lock, deferred);
      }
      if (e.message == nullptr) {
        CloseSessionLocked(e.session);
        continue;
      }
      place = HandleWorkerMessageLocked(e.session, *e.message, out, exports, deferred) || place;
    }
    FlushReportsLocked(lock, deferred);
    if (place) PlaceLocked(out);
  }
  for (const auto& record : exports) record();
  MergeAcks(out);
  for (auto& [writer, m] : out) writer->Send(m);
}

void MergeAcks(SessionOutbox& out) {
  // A plain ack: a Progress's (1) or a probe report's (2), with no outcome or refusal; else 0.
  auto plain = [](const v1::CoordinatorMessage& m) {
    if (!m.has_ack() || m.ack().outcome() || !m.ack().refused().empty()) return 0;
    const v1::Ack& a = m.ack();
    return a.sequence() == 0 && a.progress_step() != 0 ? 1 : a.progress_step() == 0 && a.sequence() != 0 ? 2 : 0;
  };
  std::unordered_map<const SessionWriter*, size_t> last;  // a session's latest message in `out`
  size_t kept = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const SessionWriter* writer = out[i].first.get();
    if (auto it = last.find(writer); it != last.end()) {
      v1::CoordinatorMessage& prev = out[it->second].second;
      const v1::CoordinatorMessage& m = out[i].second;
      const int a = plain(prev), b = plain(m);
      if (a != 0 && b != 0 && a != b && prev.ack().run_id() == m.ack().run_id()) {
        if (b == 2) prev.mutable_ack()->set_sequence(m.ack().sequence());
        else prev.mutable_ack()->set_progress_step(m.ack().progress_step());
        continue;
      }
    }
    if (kept != i) out[kept] = std::move(out[i]);
    last[writer] = kept++;
  }
  out.resize(kept);
}

bool Coordinator::HandleWorkerMessageLocked(int64_t session_id, const v1::WorkerMessage& msg, Outbox& out,
                                            Exports& exports, std::vector<DeferredReport>& deferred) {
  {
    auto sit = sessions_.find(session_id);
    if (sit == sessions_.end()) return false;
    Session& session = sit->second;
    // Ended for not reading: what it sent before its close is read from the ingest queue
    // still (up to a session's read budget), but renews nothing and is stored nowhere; the
    // worker sends it again, unacknowledged, on its next session.
    if (session.ended) return false;
    session.lapsed = false;  // heard from: it may be given work again
    auto run_of = [&](const std::string& run_id, int attempt) -> Run* {
      auto it = runs_.find(run_id);
      if (it == runs_.end()) return nullptr;
      Run& run = it->second;
      // Only the current attempt, running, may change a run.
      if (run.record.summary.state() != v1::RUNNING || run.record.summary.attempt() != attempt) return nullptr;
      return &run;
    };
    // The run, when this session holds its current lease and attempt; otherwise nullptr
    // and why. Only the holder may report for a run: worker tokens are shared, so a buggy
    // or hostile worker must not write into, finish, fail or release another's run.
    auto held = [&](const std::string& run_id, int attempt, std::string* why) -> Run* {
      auto it = runs_.find(run_id);
      if (it == runs_.end()) {
        *why = "no such run";
        return nullptr;
      }
      Run& run = it->second;
      const v1::RunSummary& s = run.record.summary;
      if (s.state() != v1::RUNNING) {
        *why = "the run is " + RunStateLabel(s.state()) + ", not running";
      } else if (s.attempt() != attempt) {
        *why = "attempt " + std::to_string(attempt) + " is not the run's current attempt " +
               std::to_string(s.attempt());
      } else if (run.session != session_id) {
        *why = "this session does not hold the run's lease (held by worker " + s.worker_id() + ")";
      } else {
        return &run;
      }
      return nullptr;
    };
    // The final attempt of a run that has ended (succeeded, failed, cancelled) may still
    // deliver what it measured before the end: steps and reports written again after a
    // reconnect, the steps a cancel's checkpoint holds. Only its own worker, that attempt.
    auto final_attempt = [&](const std::string& run_id, int attempt) -> Run* {
      auto it = runs_.find(run_id);
      if (it == runs_.end()) return nullptr;
      const v1::RunSummary& s = it->second.record.summary;
      const bool ended = s.state() == v1::SUCCEEDED || s.state() == v1::FAILED || s.state() == v1::CANCELLED;
      if (!ended || s.attempt() != attempt || s.worker_id() != session.worker_id) return nullptr;
      return &it->second;
    };
    auto refuse = [&](const char* event, const std::string& run_id, const std::string& why,
                      const std::function<void(v1::Ack*)>& fill) {
      if (const int64_t unlogged = RefusalLogAllowed(event); unlogged >= 0) {
        Log(LogLevel::kWarning, event,
            {{"run", run_id}, {"worker", session.worker_id}, {"reason", why},
             {"unlogged_before", std::to_string(unlogged)}});
      }
      v1::CoordinatorMessage a;
      a.mutable_ack()->set_run_id(run_id);
      a.mutable_ack()->set_refused(why);
      fill(a.mutable_ack());
      out.push_back({session.writer, std::move(a)});
    };
    // An outcome or release for a run that runs, but not under this session, or for no
    // run at all, is refused; one for a run that has ended or moved on is acked as done.
    auto someone_elses = [&](const std::string& run_id, int attempt) {
      return run_of(run_id, attempt) != nullptr || !runs_.count(run_id);
    };
    auto ack_outcome = [&](const std::string& run_id) {
      v1::CoordinatorMessage a;
      a.mutable_ack()->set_run_id(run_id);
      a.mutable_ack()->set_outcome(true);
      out.push_back({session.writer, std::move(a)});
    };
    // The running run and the rank > 0 this session holds in `attempt` of it.
    auto peer_rank = [&](const std::string& run_id, int attempt) -> std::pair<Run*, int> {
      Run* run = run_of(run_id, attempt);
      const int rank = run != nullptr ? RankOfLocked(*run, session_id) : -1;
      if (rank <= 0) return {nullptr, -1};
      return {run, rank};
    };
    // A rank of a run that has ended (its gang succeeded before this rank said so) is
    // free once it reports its own end.
    auto release_ended = [&](const std::string& run_id) {
      auto it = runs_.find(run_id);
      if (session.run_id == run_id && (it == runs_.end() || it->second.record.summary.state() != v1::RUNNING)) {
        session.run_id.clear();
        if (it != runs_.end()) {
          for (Run::Peer& peer : it->second.peers) {
            if (peer.session == session_id) peer.session = 0;
          }
        }
      }
    };
    switch (msg.message_case()) {
      case v1::WorkerMessage::kRegister: {
        const v1::Register& r = msg.register_();
        session.worker_id = r.worker_id();
        session.capabilities = r.capabilities();
        session.registered = true;
        ExportFleetLocked();  // a scrape right after sees it, not only after the next tick
        v1::CoordinatorMessage reply;
        reply.mutable_registered()->set_lease_seconds(options_.lease_seconds);
        reply.mutable_registered()->set_heartbeat_seconds(options_.heartbeat_seconds);
        reply.mutable_registered()->set_acks_progress(true);
        out.push_back({session.writer, reply});
        Log(LogLevel::kInfo, "worker_registered",
            {{"worker", r.worker_id()},
             {"device", v1::DeviceKind_Name(r.capabilities().device())},
             {"device_name", r.capabilities().device_name()},
             {"run", r.run_id()}});
        if (!r.run_id().empty() && r.rank() != 0) {
          // A rank of a gang carries on under the same attempt if it is still that
          // rank's worker; the rendezvous so far is sent again (it may be meeting now).
          Run* run = run_of(r.run_id(), r.attempt());
          std::string refusal = run == nullptr ? "the lease of this attempt lapsed" : "";
          if (run != nullptr && (r.rank() < 0 || r.rank() > static_cast<int>(run->peers.size()))) {
            refusal = "the run has no rank " + std::to_string(r.rank());
          } else if (run != nullptr && run->peers[r.rank() - 1].worker_id != r.worker_id()) {
            refusal = "rank " + std::to_string(r.rank()) + " of the run belongs to worker " +
                      run->peers[r.rank() - 1].worker_id;
          }
          if (refusal.empty()) {
            Run::Peer& peer = run->peers[r.rank() - 1];
            if (peer.session != 0 && peer.session != session_id && sessions_.count(peer.session)) {
              sessions_.at(peer.session).run_id.clear();
            }
            peer.session = session_id;
            BindSessionLocked(session, *run);
            peer.lease_deadline = LeaseEnd();
            for (const auto& [key, value] : run->rendezvous) {
              out.push_back({session.writer, RendezvousMessage(*run, key, value)});
            }
          } else {
            Log(LogLevel::kWarning, "register_refused", {{"worker", r.worker_id()}, {"run", r.run_id()}, {"reason", refusal}});
            v1::CoordinatorMessage cancel;
            cancel.mutable_cancel()->set_run_id(r.run_id());
            cancel.mutable_cancel()->set_reason(refusal);
            out.push_back({session.writer, cancel});
          }
        } else if (!r.run_id().empty()) {
          Run* run = run_of(r.run_id(), r.attempt());
          std::string refusal = run == nullptr ? "the lease of this attempt lapsed" : "";
          if (run != nullptr && run->record.summary.worker_id() != r.worker_id()) {
            // A Register cannot take another worker's lease, live or waiting for its
            // holder to reconnect.
            refusal = "the run's lease belongs to worker " + run->record.summary.worker_id();
            Log(LogLevel::kWarning, "register_refused",
                {{"worker", r.worker_id()}, {"run", r.run_id()}, {"reason", refusal}});
          }
          if (refusal.empty()) {  // the same attempt carries on
            if (run->session != 0 && run->session != session_id && sessions_.count(run->session)) {
              // The same worker reconnected before its old stream was seen to close.
              sessions_.at(run->session).run_id.clear();
            }
            run->session = session_id;
            BindSessionLocked(session, *run);
            Renew(*run);
          } else {
            v1::CoordinatorMessage cancel;
            cancel.mutable_cancel()->set_run_id(r.run_id());
            cancel.mutable_cancel()->set_reason(refusal);
            out.push_back({session.writer, cancel});
          }
        }
        break;
      }
      case v1::WorkerMessage::kHeartbeat: {
        if (Run* run = runs_.count(msg.heartbeat().run_id()) ? &runs_.at(msg.heartbeat().run_id()) : nullptr) {
          if (run->session == session_id) Renew(*run);
          for (Run::Peer& peer : run->peers) {
            if (peer.session == session_id) peer.lease_deadline = LeaseEnd();
          }
        }
        break;
      }
      case v1::WorkerMessage::kProgress: {
        // Acked once stored, or once refused for good, so the worker can forget it; a
        // failed write is not acked and the worker writes it again on its next connection.
        const v1::Progress& p = msg.progress();
        const int64_t step = p.metrics().step();
        const std::shared_ptr<SessionWriter> writer = session.writer;  // `session` may go while writing
        auto it = runs_.find(p.run_id());
        if (it == runs_.end() || step < 1 || step > it->second.record.summary.total_steps()) {
          // Refused for good, with the ack saying why (a step ≤ 0 too: the worker's outbox
          // forgets it by its step, so it is not sent again forever).
          const std::string why =
              it == runs_.end() ? "no such run"
                                : "progress.metrics.step " + std::to_string(step) + " is outside [1, train.steps] = [1, " +
                                      std::to_string(it->second.record.summary.total_steps()) + "]";
          refuse("progress_refused", p.run_id().substr(0, 256), why, [&](v1::Ack* a) { a->set_progress_step(step); });
          break;
        }
        std::string why;
        Run* run = held(p.run_id(), p.attempt(), &why);
        const bool late = run == nullptr && final_attempt(p.run_id(), p.attempt()) != nullptr;
        if (run == nullptr && !late) {
          // Another session's or another attempt's step (a stale attempt written again
          // after the run moved on): stored nowhere; the current attempt produces its own.
          refuse("progress_refused", p.run_id(), why, [&](v1::Ack* a) { a->set_progress_step(step); });
          break;
        }
        if (run != nullptr) {
          Renew(*run);
          if (run->attempt_first_step == 0 || step < run->attempt_first_step) run->attempt_first_step = step;
        }
        // A step of the run's last attempt delivered after the run ended only fills the
        // step if it is missing; the holder's step replaces (a resumed run repeats steps).
        deferred.push_back(
            {{late ? Store::ReportWrite::kStepIfAbsent : Store::ReportWrite::kStep, &p.run_id(), &p.metrics(), nullptr},
             [this, &p, &out, &exports, writer, step, late](const Status& status, bool) {
               // mu_ was released for the write: the run is looked up again.
               if (!status.ok()) {
                 Log(LogLevel::kError, "store_write_failed",
                     {{"what", "step"}, {"run", p.run_id()}, {"error", status.message()}});
                 return;  // no ack: the worker writes it again
               }
               v1::CoordinatorMessage a;
               a.mutable_ack()->set_run_id(p.run_id());
               a.mutable_ack()->set_progress_step(step);
               out.push_back({writer, std::move(a)});
               auto rit = runs_.find(p.run_id());
               if (late || rit == runs_.end()) return;
               Run& stored = rit->second;
               v1::RunSummary& s = stored.record.summary;
               // Steps written again after a reconnect may arrive after newer ones: the run's
               // summary only moves forward. (Its stored row is derived from the step rows.)
               if (step >= s.step()) {
                 s.set_step(step);
                 s.set_loss(p.metrics().loss());
                 s.set_tokens_per_second(p.metrics().tokens_per_second());
                 if (p.metrics().has_val_loss()) s.set_val_loss(p.metrics().val_loss());
               }
               stored.step_seconds = stored.step_seconds == 0
                                         ? p.metrics().step_seconds()
                                         : 0.9 * stored.step_seconds + 0.1 * p.metrics().step_seconds();
               if (s.state() == v1::RUNNING) exports.push_back([this, s, &p] { exporter_->RecordStep(s, p.metrics()); });
               if (WatchedLocked(s.experiment_id(), false)) {  // the event is built only for a watcher
                 v1::WatchEvent event;
                 event.mutable_step()->set_run_id(s.run_id());
                 *event.mutable_step()->mutable_metrics() = p.metrics();
                 PublishLocked(s.experiment_id(), event, false);
               }
             }});
        break;
      }
      case v1::WorkerMessage::kProbe: {
        const v1::ProbeUpload& p = msg.probe();
        const std::shared_ptr<SessionWriter> writer = session.writer;  // `session` may go while writing
        auto it = runs_.find(p.run_id());
        // A report that can never be stored is refused for good (acked, so the worker
        // forgets it): an unknown run, a step outside the run, or more layers or heads
        // than the model has.
        std::string refused;
        if (it == runs_.end()) {
          refused = "no such run";
        } else {
          const v1::Experiment& spec = *it->second.spec;
          v1::ModelSpec m = spec.model();
          if (spec.has_diagnostic()) {  // a pretrained model's size is known to its worker only: the schema's bounds
            m.set_layers(4096);
            m.set_heads(4096);
            m.set_kv_heads(4096);
          }
          const v1::ProbeReport& r = p.report();
          if (spec.has_diagnostic() ? p.sequence() != 1 || r.step() < 0
                                    : r.step() < 1 || r.step() > it->second.record.summary.total_steps() ||
                                          p.sequence() != r.step()) {
            refused = spec.has_diagnostic() ? "a diagnostic probe job's report has sequence 1 and a step >= 0"
                                            : "step outside [1, train.steps] or not equal to the sequence number";
          } else if (!spec.has_diagnostic() &&
                     !IsProbeStep(r.step(), spec.probe().every(), it->second.record.summary.total_steps())) {
            // A report at a step the run loop does not probe is refused, so one run holds at
            // most train.steps / probe.every + 2 reports.
            refused = "step is not a probe step (1, every probe.every steps, the last)";
          } else if (r.layers_size() > m.layers()) {
            refused = "more layers than model.layers";
          } else {
            const int P = spec.probe().profile_len();
            refused = ProbeStructureError(r, m, P);
          }
        }
        std::string why;
        const bool holder = refused.empty() && held(p.run_id(), p.attempt(), &why) != nullptr;
        if (refused.empty() && !holder && final_attempt(p.run_id(), p.attempt()) == nullptr) refused = why;
        if (!refused.empty()) {
          if (p.sequence() != 0) {
            refuse("probe_refused", p.run_id(), refused, [&](v1::Ack* a) { a->set_sequence(p.sequence()); });
          } else {
            if (const int64_t unlogged = RefusalLogAllowed("probe_refused"); unlogged >= 0) {
              Log(LogLevel::kWarning, "probe_refused",
                  {{"run", p.run_id()}, {"reason", refused}, {"unlogged_before", std::to_string(unlogged)}});
            }
          }
          break;
        }
        if (holder) Renew(it->second);
        // Reports are deterministic per (run, step): stored once (a copy written again
        // after a reconnect is a duplicate); the ack follows the write.
        deferred.push_back({{Store::ReportWrite::kProbe, &p.run_id(), nullptr, &p.report()},
                            [this, &p, &out, &exports, writer](const Status& status, bool fresh) {
                              // mu_ was released for the write: the run is looked up again.
                              if (!status.ok()) {
                                Log(LogLevel::kError, "store_write_failed",
                                    {{"what", "probe"}, {"run", p.run_id()}, {"error", status.message()}});
                                return;  // no ack: the worker resends
                              }
                              exporter_->ProbeIngested(fresh);
                              auto rit = runs_.find(p.run_id());
                              if (fresh && rit != runs_.end()) {
                                Run& run = rit->second;
                                ++run.probe_reports;
                                const v1::RunSummary& s = run.record.summary;
                                // Exported while running, as steps are: a late report of an ended
                                // run must not make series after the run's expired (they would
                                // never expire again). It is stored all the same.
                                if (s.state() == v1::RUNNING) {
                                  exports.push_back([this, s, &p] { exporter_->RecordProbe(s, p.report()); });
                                }
                                if (WatchedLocked(s.experiment_id(), true)) {  // a report's copy only for a watcher
                                  v1::WatchEvent event;
                                  event.mutable_probe()->set_run_id(s.run_id());
                                  *event.mutable_probe()->mutable_report() = p.report();
                                  PublishLocked(s.experiment_id(), event, true);
                                }
                              }
                              v1::CoordinatorMessage a;
                              a.mutable_ack()->set_run_id(p.run_id());
                              a.mutable_ack()->set_sequence(p.sequence());
                              out.push_back({writer, std::move(a)});
                            }});
        break;
      }
      case v1::WorkerMessage::kFinished: {
        // Acked once the run's end is stored, or when this attempt no longer holds the run
        // (it ended already: an outcome written again after a reconnect).
        const v1::RunFinished& f = msg.finished();
        if (auto [peer_run, rank] = peer_rank(f.run_id(), f.attempt()); peer_run != nullptr) {
          // A rank > 0 is done with the attempt; rank 0's finish ends the run.
          peer_run->peers[rank - 1].done = true;
          peer_run->peers[rank - 1].session = 0;
          session.run_id.clear();
          ack_outcome(f.run_id());
          break;
        }
        std::string why;
        Run* run = held(f.run_id(), f.attempt(), &why);
        if (run == nullptr) {
          if (someone_elses(f.run_id(), f.attempt())) {
            refuse("outcome_refused", f.run_id(), why, [](v1::Ack* a) { a->set_outcome(true); });
            break;
          }
        } else {
          // Not ended while steps of this attempt are missing (their writes failed and the
          // worker is writing them again): no ack, so the worker writes the finish again
          // after them, and what is shown as SUCCEEDED holds every step.
          const int64_t first = run->attempt_first_step, total = run->record.summary.total_steps();
          if (first > 0) {
            StatusOr<int64_t> stored = store_->CountSteps(f.run_id(), first, total);
            if (!stored.ok() || *stored < total - first + 1) {
              Log(LogLevel::kWarning, "finish_deferred",
                  {{"run", f.run_id()},
                   {"steps_stored", stored.ok() ? std::to_string(*stored) : stored.status().message()},
                   {"steps_expected", std::to_string(total - first + 1)}});
              break;
            }
          }
          const bool valid_step = f.step() >= 0 && f.step() <= run->record.summary.total_steps();
          if (!EndRunLocked(*run, v1::SUCCEEDED, v1::FAILURE_REASON_UNSPECIFIED, "", "succeeded", false,
                            valid_step ? f.step() : -1)
                   .ok()) {
            break;  // not stored: no ack, the worker writes it again
          }
        }
        release_ended(f.run_id());
        ack_outcome(f.run_id());  // stored, or the run had ended already
        break;
      }
      case v1::WorkerMessage::kFailed: {
        const v1::RunFailed& f = msg.failed();
        const v1::FailureReason reason =
            v1::FailureReason_IsValid(f.reason()) && f.reason() != v1::FAILURE_REASON_UNSPECIFIED ? f.reason()
                                                                                                   : v1::INTERNAL_ERROR;
        std::string why;
        auto [peer_run, rank] = peer_rank(f.run_id(), f.attempt());
        Run* run = peer_run != nullptr ? peer_run : held(f.run_id(), f.attempt(), &why);
        if (run == nullptr && someone_elses(f.run_id(), f.attempt())) {
          refuse("outcome_refused", f.run_id(), why, [](v1::Ack* a) { a->set_outcome(true); });
          break;
        }
        if (run != nullptr) {
          const bool gang = !run->peers.empty();
          const std::string who =
              gang ? "rank " + std::to_string(rank < 0 ? 0 : rank) + " (worker " + session.worker_id + "): " : "";
          if (reason == v1::RANK_LOST) {
            // A rank saw the gang break (a peer gone, a collective past its timeout, a
            // rendezvous a rank never reached): the whole gang restarts.
            if (!RestartGangLocked(*run, who + f.message(), session_id, out).ok()) break;
          } else {
            const std::vector<std::shared_ptr<SessionWriter>> others = GangWritersLocked(*run, session_id);
            if (!EndRunLocked(*run, v1::FAILED, reason, who + f.message(), "failed: " + v1::FailureReason_Name(reason))
                     .ok()) {
              break;  // not stored: no ack, the worker writes it again
            }
            v1::CoordinatorMessage cancel;
            cancel.mutable_cancel()->set_run_id(f.run_id());
            cancel.mutable_cancel()->set_reason("the run failed on " + (who.empty() ? "its worker" : who));
            for (const auto& writer : others) out.push_back({writer, cancel});
          }
        }
        release_ended(f.run_id());
        ack_outcome(f.run_id());
        break;
      }
      case v1::WorkerMessage::kReleased: {
        // The worker is shutting down and gave the run back after checkpointing it:
        // requeued at once, no restart counted; the worker gets no new run. Any rank of a
        // gang may give it back (a drained node); the other ranks are told to stop.
        const v1::RunReleased& r = msg.released();
        session.draining = true;
        std::string why;
        auto [peer_run, rank] = peer_rank(r.run_id(), r.attempt());
        Run* run = peer_run != nullptr ? peer_run : held(r.run_id(), r.attempt(), &why);
        if (run == nullptr && someone_elses(r.run_id(), r.attempt())) {
          refuse("release_refused", r.run_id(), why, [](v1::Ack* a) { a->set_outcome(true); });
          break;
        }
        if (run != nullptr) {
          const v1::RunSummary& s = run->record.summary;
          const int64_t step = r.step() >= 0 && r.step() <= s.total_steps() ? std::max(s.step(), r.step()) : -1;
          const std::string worker = session.worker_id;
          Log(LogLevel::kInfo, "run_released",
              {{"run", s.run_id()}, {"worker", worker}, {"rank", std::to_string(std::max(rank, 0))},
               {"step", std::to_string(r.step())}, {"checkpoint_step", std::to_string(r.checkpoint_step())},
               {"reason", r.reason()}});
          const std::vector<std::shared_ptr<SessionWriter>> others = GangWritersLocked(*run, session_id);
          if (!RequeueLocked(*run, "released",
                             "requeued: worker " + worker + " stopped at step " + std::to_string(r.step()) +
                                 " and gave the run back (" + r.reason() + "); resumes from the checkpoint at step " +
                                 std::to_string(r.checkpoint_step()),
                             false, step)
                   .ok()) {
            break;  // not stored: no ack, the worker writes it again
          }
          v1::CoordinatorMessage cancel;
          cancel.mutable_cancel()->set_run_id(r.run_id());
          cancel.mutable_cancel()->set_reason("worker " + worker + " gave the run back");
          for (const auto& writer : others) out.push_back({writer, cancel});
        }
        release_ended(r.run_id());
        ack_outcome(r.run_id());
        break;
      }
      case v1::WorkerMessage::kRendezvousSet: {
        // Only a rank of the gang's current attempt sets its keys, within bounds: a key is
        // sent to every rank, so a hostile or buggy worker must not flood the gang.
        const v1::RendezvousSet& r = msg.rendezvous_set();
        auto it = runs_.find(r.run_id());
        Run* run = it != runs_.end() ? &it->second : nullptr;
        std::string refused;
        if (run == nullptr || run->record.summary.state() != v1::RUNNING ||
            run->record.summary.attempt() != r.attempt() || RankOfLocked(*run, session_id) < 0 || run->peers.empty()) {
          refused = "this session holds no rank of the run's current attempt";
        } else if (r.key().empty() || r.key().size() > kMaxRendezvousKey || r.value().size() > kMaxRendezvousValue) {
          refused = "key of " + std::to_string(r.key().size()) + " bytes or value of " +
                    std::to_string(r.value().size()) + " bytes is out of bounds";
        } else if (!run->rendezvous.count(r.key()) &&
                   run->rendezvous.size() >= kRendezvousKeysPerRank * (run->peers.size() + 1)) {
          refused = "too many keys";
        }
        if (!refused.empty()) {
          if (const int64_t unlogged = RefusalLogAllowed("rendezvous_refused"); unlogged >= 0) {
            Log(LogLevel::kWarning, "rendezvous_refused",
                {{"run", r.run_id()}, {"worker", session.worker_id}, {"key", r.key().substr(0, 64)}, {"reason", refused},
                 {"unlogged_before", std::to_string(unlogged)}});
          }
          break;
        }
        run->rendezvous[r.key()] = r.value();
        SendRendezvousLocked(*run, r.key(), r.value(), out);
        break;
      }
      default:
        break;
    }
  }
  return msg.message_case() != v1::WorkerMessage::kHeartbeat && msg.message_case() != v1::WorkerMessage::kProgress;
}

void Coordinator::PlaceLocked(Outbox& out) {
  // A gang waiting for workers its kind has holds back the runs of that kind behind it
  // (no backfill), or small runs would keep the workers it needs busy forever.
  std::set<int> held_back;
  for (auto it = queue_.begin(); it != queue_.end();) {
    Run& run = runs_.at(*it);
    v1::RunSummary& s = run.record.summary;
    const v1::Experiment& spec = *run.spec;
    const int W = std::max(1, spec.resources().devices_per_run());
    const double need = spec.has_diagnostic() ? 0 : EstimateRunMemory(spec).total_bytes();
    std::vector<int64_t> chosen;  // one worker per rank, rank 0 first
    int could_hold = 0;           // workers of its kind that could take a rank, busy or not
    if (!held_back.count(spec.resources().device())) {
      for (auto& [id, session] : sessions_) {
        if (!session.registered || session.draining || session.ended) continue;
        if (session.capabilities.device() != spec.resources().device()) continue;
        if (session.capabilities.device_count() < 1) continue;
        const int64_t memory = session.capabilities.memory_bytes();
        if (memory > 0 && need > static_cast<double>(memory)) continue;
        ++could_hold;
        if (session.lapsed || !session.run_id.empty()) continue;
        if (static_cast<int>(chosen.size()) < W) chosen.push_back(id);
      }
    }
    if (static_cast<int>(chosen.size()) < W) {
      if (W > 1 && could_hold >= W) held_back.insert(spec.resources().device());
      // Say why in status and watch (after why it was requeued, if it was), once per change.
      std::string base = s.message();
      if (const size_t w = base.find("waiting: "); w != std::string::npos) base.resize(w >= 2 ? w - 2 : 0);
      const std::string why = WaitReasonLocked(spec);
      if (const std::string message = base.empty() ? why : base + "; " + why; s.message() != message) {
        s.set_message(message);
        PublishSnapshotLocked(s.experiment_id());
      }
      ++it;
      continue;
    }
    // The attempt and the run's new state are stored together, before anything changes or
    // is sent: no Assignment goes out that the store does not hold.
    RunRecord updated = run.record;
    v1::RunSummary& u = updated.summary;
    u.set_state(v1::RUNNING);
    u.set_attempt(u.attempt() + 1);
    u.set_worker_id(sessions_.at(chosen[0]).worker_id);
    u.clear_rank_workers();
    if (W > 1) {
      for (int64_t id : chosen) u.add_rank_workers(sessions_.at(id).worker_id);
    }
    u.set_failure_reason(v1::FAILURE_REASON_UNSPECIFIED);
    u.set_message("");
    if (Status st = store_->StartAttempt(updated, NowMs()); !st.ok()) {
      Log(LogLevel::kError, "store_write_failed", {{"what", "assignment"}, {"run", u.run_id()}, {"error", st.message()}});
      break;  // the store is failing: leave the queue as it is and try on the next tick
    }
    run.record = std::move(updated);
    run.attempt_first_step = 0;
    run.session = chosen[0];
    run.peers.clear();
    run.rendezvous.clear();
    Renew(run);
    for (int k = 1; k < W; ++k) {
      run.peers.push_back({sessions_.at(chosen[k]).worker_id, chosen[k], run.lease_deadline, false});
    }
    const std::string dir =
        (std::filesystem::path(options_.checkpoint_root) / s.experiment_id() / s.run_id()).lexically_normal().string();
    for (int k = 0; k < W; ++k) {
      Session& session = sessions_.at(chosen[k]);
      BindSessionLocked(session, run);
      v1::CoordinatorMessage m;
      v1::Assignment* a = m.mutable_assignment();
      a->set_run_id(s.run_id());
      a->set_experiment_id(s.experiment_id());
      *a->mutable_experiment() = spec;
      a->set_arm(s.arm());
      a->set_seed(s.seed());
      a->set_attempt(s.attempt());
      a->set_checkpoint_dir(dir);
      a->set_rank(k);
      a->set_world_size(W);
      out.push_back({session.writer, m});
      Log(LogLevel::kInfo, "run_assigned",
          {{"run", s.run_id()}, {"worker", session.worker_id}, {"attempt", std::to_string(s.attempt())},
           {"rank", std::to_string(k)}, {"world_size", std::to_string(W)}});
    }
    PublishSnapshotLocked(s.experiment_id());
    it = queue_.erase(it);
  }
}

void Coordinator::Tick() {
  Outbox out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!options_.fault_store_read_only_when.empty()) {
      std::error_code ec;
      const bool read_only = std::filesystem::exists(options_.fault_store_read_only_when, ec);
      if (read_only != store_read_only_) {
        store_->ExecForTesting(read_only ? "PRAGMA query_only = 1" : "PRAGMA query_only = 0").ok();
        store_read_only_ = read_only;
        Log(LogLevel::kWarning, "fault_store_read_only", {{"on", read_only ? "true" : "false"}});
      }
    }
    const auto now = clock_->Now();
    const double stall = std::min(kStallSeconds, options_.lease_seconds / 2);
    if (last_tick_ && now - *last_tick_ > std::chrono::duration<double>(stall)) {
      const auto gap = now - *last_tick_;
      int extended = 0;
      for (auto& [id, run] : runs_) {
        if (run.record.summary.state() != v1::RUNNING) continue;
        run.lease_deadline += gap;
        for (Run::Peer& peer : run.peers) peer.lease_deadline += gap;
        ++extended;
      }
      Log(LogLevel::kWarning, "coordinator_stalled",
          {{"seconds", std::to_string(std::chrono::duration<double>(gap).count())},
           {"leases_extended", std::to_string(extended)}});
    }
    // A worker that has not taken a message for a lease period (it stopped reading its
    // stream) is treated as lost: its session is ended, so its heartbeats no longer renew
    // anything and its runs' leases lapse below like a dead worker's.
    for (auto& [id, session] : sessions_) {
      const double unread = session.writer->UnreadSeconds();
      if (session.ended || unread <= options_.lease_seconds) continue;
      session.ended = true;
      char reason[160];
      std::snprintf(reason, sizeof reason, "the worker has not read its stream for %.1f s (lease %g s)", unread,
                    options_.lease_seconds);
      Log(LogLevel::kWarning, "worker_not_reading",
          {{"worker", session.worker_id}, {"run", session.run_id}, {"reason", reason}});
      session.writer->End(reason);
    }
    for (auto& [id, run] : runs_) {
      v1::RunSummary& s = run.record.summary;
      if (s.state() != v1::RUNNING) continue;
      // The rank whose lease lapsed (rank 0's is the run's): its worker is gone or stuck.
      int lapsed = now >= run.lease_deadline ? 0 : -1;
      for (size_t k = 0; lapsed < 0 && k < run.peers.size(); ++k) {
        if (!run.peers[k].done && now >= run.peers[k].lease_deadline) lapsed = static_cast<int>(k) + 1;
      }
      if (lapsed < 0) continue;
      const int64_t holder = lapsed == 0 ? run.session : run.peers[lapsed - 1].session;
      const std::string worker = lapsed == 0 ? s.worker_id() : run.peers[lapsed - 1].worker_id;
      if (!run.peers.empty()) {
        // One rank lost stops the gang: every other rank is told to stop, the run restarts.
        if (!RestartGangLocked(run, "rank " + std::to_string(lapsed) + " (worker " + worker + ") was lost",
                               holder, out)
                 .ok()) {
          continue;
        }
      } else {
        // Stored first; when the store fails, nothing changes and the next tick tries again.
        const int restarts = run.record.restarts + 1;
        const int max_restarts = experiments_.at(s.experiment_id()).summary.spec().max_restarts();
        Status stored =
            restarts > max_restarts
                ? EndRunLocked(run, v1::FAILED, v1::RESTARTS_EXHAUSTED,
                               "the worker's lease lapsed " + std::to_string(restarts) + " times (max_restarts " +
                                   std::to_string(max_restarts) + ")",
                               "lease lapsed", /*restart=*/true)
                : RequeueLocked(run, "lease lapsed",
                                "requeued after worker " + worker + " was lost at step " + std::to_string(s.step()),
                                /*restart=*/true);
        if (!stored.ok()) continue;
        if (restarts <= max_restarts) {
          Log(LogLevel::kWarning, "lease_lapsed",
              {{"run", id}, {"worker", worker}, {"step", std::to_string(s.step())},
               {"restarts", std::to_string(restarts)}});
        }
      }
      if (holder != 0 && sessions_.count(holder)) {
        Session& old = sessions_.at(holder);
        old.lapsed = true;  // no new work for it until it is heard from again
        v1::CoordinatorMessage cancel;
        cancel.mutable_cancel()->set_run_id(id);
        cancel.mutable_cancel()->set_reason("the lease lapsed; the run was given to another worker");
        out.push_back({old.writer, cancel});
      }
    }
    PlaceLocked(out);
    ExportFleetLocked();
  }
  exporter_->ExpireSeries();
  for (auto& [writer, m] : out) writer->Send(m);
  // The gap to the next call counts from here: time spent above outside the lock (sends to
  // a slow worker, series expiry) is not the coordinator stalling its message handling.
  std::lock_guard<std::mutex> lock(mu_);
  last_tick_ = clock_->Now();
}

}  // namespace sinkscope

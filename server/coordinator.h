// The coordinator's core, free of gRPC plumbing: experiments and runs, the scheduler
// (queue, placement by device kind and count, leases with a grace period, restarts from
// the latest checkpoint, distinct failure reasons), watchers and comparisons. Every
// change is written to the Store before it is acknowledged or shown.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "base/clock.h"
#include "proto/sinkscope/v1/service.pb.h"
#include "server/exporter.h"
#include "server/store.h"

namespace sinkscope {

// Where the coordinator sends messages to one worker (the Session stream). Send never
// blocks: it queues the message in the stream's bounded outbox, written by the stream's own
// writer (server/services.cc), so a worker that stops reading cannot stall the scheduler.
class SessionWriter {
 public:
  virtual ~SessionWriter() = default;
  // Queues the message; false when the stream is gone or was ended (its outbox was full:
  // the session is ended with a reason, as if the worker had disconnected).
  virtual bool Send(const v1::CoordinatorMessage& message) = 0;
  // How long the oldest message not yet taken by the worker has waited, seconds (0: none
  // waits). The scheduler ends a session whose worker has not read for a lease period.
  virtual double UnreadSeconds() const { return 0; }
  // Ends the session (the stream is cancelled; the worker's reads and writes fail), with
  // `reason` logged. Never blocks.
  virtual void End(const std::string& reason) { (void)reason; }
  // The run whose Progress this session's worker sends, and its probe cadence (probe.every,
  // train.steps): at a probe step (base/cadence.h) the worker sends the report right behind
  // the step's Progress. A hint for reading the stream; never blocks.
  virtual void ExpectProbes(const std::string& run_id, int every, int64_t total_steps) {
    (void)run_id, (void)every, (void)total_steps;
  }
};

// What a batch of worker messages makes the coordinator send, in order, to each session.
using SessionOutbox = std::vector<std::pair<std::shared_ptr<SessionWriter>, v1::CoordinatorMessage>>;

// Merges each plain probe-report ack (sequence only) into a plain Progress ack
// (progress_step only) of the same run that is the same session's latest message in `out`,
// or the other way round: one Ack with both fields, which the worker reads as the two.
// A worker sends a probe report right after its step's Progress, so a batch holds both
// acks; one message per ack is a write, a wake-up and a read on either side. Every
// session's messages keep their order.
void MergeAcks(SessionOutbox& out);

// Events for one WatchExperiment call: a bounded queue. When a watcher falls behind by more
// than kMaxEvents events or kMaxBytes bytes, what it has not read is dropped and replaced
// by one snapshot of the latest state carrying the number of events dropped
// (WatchEvent.dropped_events): a watcher sees every run's latest state, never unbounded memory.
struct Watcher {
  static constexpr size_t kMaxEvents = 1024;
  static constexpr size_t kMaxBytes = 8 << 20;
  std::string experiment_id;
  bool include_probes = false;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<v1::WatchEvent> events;  // guarded by mu
  size_t queued_bytes = 0;            // guarded by mu: the events' serialized size
  int64_t dropped = 0;                // guarded by mu: events dropped in all
  bool ended = false;                 // guarded by mu: the experiment ended (last event queued)
};

class Coordinator {
 public:
  struct Options {
    double lease_seconds = 10;      // a run's lease lapses this long after its worker's last message
    double heartbeat_seconds = 1;   // asked of workers
    std::string checkpoint_root = "checkpoints";  // shared by all workers
    bool check_data_paths = true;   // data paths must exist on the coordinator's machine
    // After a restart, runs that were RUNNING keep their lease this long (at least one
    // lease period) so their workers, retrying with back-off (at most 5 s by default),
    // can come back and carry on under the same attempt.
    double recovery_grace_seconds = 15;
    // The most memory one run may need (bytes; 0: no limit beyond what the connected
    // workers report). Submission refuses an experiment whose estimate exceeds it.
    int64_t max_run_bytes = 0;
    // Fault injection for tests: while this file exists, the store takes no writes (as a
    // full disk or a read-only remount would). Empty: off.
    std::string fault_store_read_only_when;
    // What leases, the stall check and recovery grace are timed by (base/clock.h); null:
    // the process's steady clock. Tests give a ManualClock and move it themselves.
    Clock* clock = nullptr;
  };

  // Loads the store's state: queued runs are queued again, running runs keep their lease
  // for max(lease, recovery grace) so their workers can reconnect.
  static StatusOr<std::unique_ptr<Coordinator>> Create(Store* store, Exporter* exporter, const Options& options);

  // --- ExperimentService ---------------------------------------------------------
  // `stop` (optional) says the client has gone: the data check ends early with CANCELLED.
  StatusOr<v1::SubmitExperimentResponse> Submit(v1::Experiment experiment, const std::function<bool()>& stop = {});
  StatusOr<v1::ExperimentSummary> GetExperiment(const std::string& id, bool with_spec);
  v1::ListExperimentsResponse ListExperiments(int limit);
  StatusOr<v1::ExperimentSummary> Cancel(const std::string& id);
  StatusOr<v1::GetRunMetricsResponse> GetRunMetrics(const v1::GetRunMetricsRequest& request);
  StatusOr<v1::CompareArmsResponse> CompareArms(const v1::CompareArmsRequest& request);
  // Subscribes to an experiment: the first event is a snapshot.
  StatusOr<std::shared_ptr<Watcher>> Watch(const std::string& id, bool include_probes);
  void Unwatch(const std::shared_ptr<Watcher>& watcher);

  // --- WorkerService -------------------------------------------------------------
  int64_t OpenSession(std::shared_ptr<SessionWriter> writer);
  // One thing a session did: a message it sent, or (message null) that it closed.
  struct WorkerEvent {
    int64_t session;
    const v1::WorkerMessage* message;  // null: the session closed (CloseSession)
  };
  // Handles the events in order, as one batch: the Progress and probe reports among them
  // are written to the store in one transaction (outside mu_, so other calls go on), and
  // each is acked once stored. Any other message first waits for the writes before it,
  // so a session's messages take effect in the order it sent them. The messages must
  // outlive the call.
  void OnWorkerEvents(const std::vector<WorkerEvent>& events);
  void OnWorkerMessage(int64_t session, const v1::WorkerMessage& message) { OnWorkerEvents({{session, &message}}); }
  void CloseSession(int64_t session) { OnWorkerEvents({{session, nullptr}}); }

  // --- scheduler -----------------------------------------------------------------
  // Lapses leases, places queued runs, refreshes fleet gauges, expires old series.
  // Called every fraction of a second; when the previous call ended more than
  // min(kStallSeconds, lease / 2) ago (the coordinator was stalled: a slow store write holding the lock,
  // the process paused), every running lease is extended by the gap first, so the
  // workers' heartbeats that queued up meanwhile are not blamed for the coordinator's
  // own delay.
  void Tick();
  static constexpr double kStallSeconds = 1.0;
  // Bounds of a gang's rendezvous (RendezvousSet): key and value sizes, keys per rank.
  static constexpr size_t kMaxRendezvousKey = 256;
  static constexpr size_t kMaxRendezvousValue = 1 << 20;
  static constexpr size_t kRendezvousKeysPerRank = 8;

  const Options& options() const { return options_; }

 private:
  struct Run {
    RunRecord record;
    Clock::TimePoint lease_deadline;
    int64_t session = 0;        // holder of the lease; 0 for none
    double step_seconds = 0;    // smoothed, for the ETA
    int64_t probe_reports = 0;  // stored
    // The first step the current attempt reported (0: none yet, or not since a restart of
    // the coordinator): a finish is taken only once every step from it on is stored.
    int64_t attempt_first_step = 0;
    // A data-parallel run (resources.devices_per_run = W > 1): ranks 1 … W−1 of the
    // current attempt, each on its own worker; rank 0 is `session`, `lease_deadline` and
    // the record's worker_id. The gang is one attempt: a rank lost, stalled or failing in
    // a collective stops every rank and restarts the run from its checkpoint.
    struct Peer {
      std::string worker_id;
      int64_t session = 0;  // 0 while its worker is disconnected
      Clock::TimePoint lease_deadline;
      bool done = false;  // it reported the attempt's finish
    };
    std::vector<Peer> peers;
    // The current attempt's rendezvous keys (RendezvousSet), sent to every rank.
    std::map<std::string, std::string> rendezvous;
    // What the run trains, defaults applied: the experiment's spec, or with a sweep its
    // point's (SweepPointExperiment). Shared by the runs of one point; never null.
    std::shared_ptr<const v1::Experiment> spec;
  };
  struct Session {
    std::shared_ptr<SessionWriter> writer;
    std::string worker_id;
    v1::Capabilities capabilities;
    bool registered = false;
    std::string run_id;  // the run it trains; empty when idle
    bool draining = false;  // it released its run while shutting down: no new run for it
    // A run's lease lapsed while this session held it (a frozen or cut-off worker): it is
    // given no work until it is heard from again.
    bool lapsed = false;
    // Ended for not reading its stream (Tick): it is closing, nothing more is sent to it.
    bool ended = false;
  };
  using Outbox = SessionOutbox;

  Coordinator(Store* store, Exporter* exporter, const Options& options)
      : store_(store), exporter_(exporter), options_(options), clock_(options.clock ? options.clock : Clock::Real()) {}

  // All below require mu_.
  v1::ExperimentSummary SummaryLocked(const std::string& id, bool with_spec);
  // The session trains the run from now on (assigned, or its worker back on a new stream);
  // its stream is told the run's probe cadence (SessionWriter::ExpectProbes).
  static void BindSessionLocked(Session& session, const Run& run);
  // Frees the run's worker sessions (every rank's) for another run; with
  // `keep_running_peers`, a rank that has not reported its finish stays busy until it does.
  void DetachSessionLocked(Run& run, bool keep_running_peers = false);
  // The rank `session` holds in the run's current attempt; -1 for none.
  int RankOfLocked(const Run& run, int64_t session) const;
  // The streams of every rank of the run's current attempt but `except`'s.
  std::vector<std::shared_ptr<SessionWriter>> GangWritersLocked(const Run& run, int64_t except) const;
  // The gang's attempt ends because a rank was lost or a collective failed: requeued from
  // its checkpoint with a restart counted (failed RESTARTS_EXHAUSTED past max_restarts),
  // and every other rank is told to stop. Stored first; nothing changes on a store error.
  Status RestartGangLocked(Run& run, const std::string& why, int64_t except_session, Outbox& out);
  // The RendezvousValue of one key of the run's current attempt.
  static v1::CoordinatorMessage RendezvousMessage(const Run& run, const std::string& key, const std::string& value);
  // Sends every rank of the run's attempt the key's value.
  void SendRendezvousLocked(const Run& run, const std::string& key, const std::string& value, Outbox& out) const;
  // Ends the run's current attempt with `outcome` and queues it again (to resume from its
  // latest checkpoint), with `message` for people; `restart` counts a restart. Stored
  // first: on a store failure nothing changes, in memory or on disk, and the error is
  // returned (the caller withholds its ack, or retries on the next tick).
  // `step` ≥ 0 sets the run's step with it (the step a worker reports it stopped at).
  Status RequeueLocked(Run& run, const std::string& outcome, const std::string& message, bool restart = false,
                       int64_t step = -1);
  // Stores the run changes, and their experiment's new state (cancelled, ended) with them,
  // in one transaction; then applies them in memory: queue, sessions, experiment state,
  // gauges, watchers. Nothing changes when the store fails.
  Status CommitRunChangesLocked(const std::string& experiment_id, std::vector<Store::RunChange> changes,
                                bool cancel_experiment);
  // Queues `event` for one watcher within its bounds (struct Watcher).
  void EnqueueWatchEventLocked(Watcher& watcher, const v1::WatchEvent& event);
  // Whether anyone watches the experiment (its probe reports, when is_probe).
  bool WatchedLocked(const std::string& experiment_id, bool is_probe) const;
  void PublishLocked(const std::string& experiment_id, const v1::WatchEvent& event, bool is_probe);
  void PublishSnapshotLocked(const std::string& experiment_id);
  Status EndRunLocked(Run& run, v1::RunState state, v1::FailureReason reason, const std::string& message,
                      const std::string& outcome, bool restart = false, int64_t step = -1);
  // A Progress or probe report of a batch (OnWorkerEvents) waiting for its write, and
  // what follows the write (the ack, the summary, watchers, series), run with mu_ held.
  struct DeferredReport {
    Store::ReportWrite write;
    std::function<void(const Status& status, bool fresh)> then;
  };
  using Exports = std::vector<std::function<void()>>;
  // One message of a session (OnWorkerEvents); true when the scheduler should place runs
  // after it (a worker may have become idle).
  bool HandleWorkerMessageLocked(int64_t session_id, const v1::WorkerMessage& msg, Outbox& out, Exports& exports,
                                 std::vector<DeferredReport>& deferred);
  void CloseSessionLocked(int64_t session);
  // Writes the deferred reports in one transaction, `lock` (on mu_) released meanwhile,
  // then runs what follows each write. Callers must look runs and sessions up again.
  void FlushReportsLocked(std::unique_lock<std::mutex>& lock, std::vector<DeferredReport>& deferred);
  void PlaceLocked(Outbox& out);
  // The fleet gauges (workers registered, runs queued and running): on every tick, and
  // when a worker registers or disconnects.
  void ExportFleetLocked();
  // Why a queued run waits, for people: no worker of its kind is connected, or all are busy.
  std::string WaitReasonLocked(const v1::Experiment& spec) const;
  // Refuses an experiment no worker could hold, naming the estimate and the largest worker.
  Status CheckFitsLocked(const v1::Experiment& spec) const;
  void Renew(Run& run, double seconds = 0);  // 0: the lease period
  Clock::TimePoint LeaseEnd(double seconds = 0) const;  // now + seconds (0: the lease period)
  int64_t NowMs() const;
  // Whether a refusal of kind `event` may be logged now (a worker sending refused messages
  // in a loop must not flood the log): the count left out since the last line, or -1.
  int64_t RefusalLogAllowed(const char* event);
  static constexpr int kRefusalLogsPerSecond = 10;
  struct RefusalLog {
    std::chrono::steady_clock::time_point window_start{};
    int in_window = 0;
    int64_t unlogged = 0;
  };

  Store* store_;
  Exporter* exporter_;
  Options options_;
  Clock* const clock_;

  std::mutex mu_;
  std::map<std::string, ExperimentRecord> experiments_;   // guarded by mu_
  std::vector<std::string> experiment_order_;             // guarded by mu_: submission order
  std::map<std::string, Run> runs_;                       // guarded by mu_
  std::optional<Clock::TimePoint> last_tick_;  // guarded by mu_
  std::map<std::string, std::vector<std::string>> experiment_runs_;  // guarded by mu_
  std::deque<std::string> queue_;                         // guarded by mu_: QUEUED run ids, FIFO
  std::map<int64_t, Session> sessions_;                   // guarded by mu_
  int64_t next_session_ = 1;                              // guarded by mu_
  bool store_read_only_ = false;                          // guarded by mu_: fault injection
  std::vector<std::shared_ptr<Watcher>> watchers_;        // guarded by mu_
  std::map<std::string, RefusalLog> refusal_logs_;        // guarded by mu_
};

}  // namespace sinkscope

// The coordinator's durable state in SQLite: experiments, runs, attempts, step metrics
// and probe reports. WAL journal; a versioned schema with migrations. Records are the
// wire messages serialised into BLOBs beside the columns that are queried. The
// coordinator is the only writer.
#pragma once

#include <sqlite3.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "proto/sinkscope/v1/service.pb.h"
#include "base/status.h"

namespace sinkscope {

struct ExperimentRecord {
  v1::ExperimentSummary summary;  // runs left empty; spec filled in
  bool cancelled = false;
};

struct RunRecord {
  v1::RunSummary summary;
  int32_t restarts = 0;  // lease lapses so far
  int64_t finished_unix_ms = 0;
};

class Store {
 public:
  // Opens (creating or migrating) the database at `path` (a file name, or a "file:" URI).
  // A database that cannot be written (a read-only file or folder) is refused here, with
  // the reason, rather than at the first write.
  //
  // Errors name the store and SQLite's reason, e.g. "store /srv/s.db: put step: database
  // or disk is full"; a failed write changes nothing (each write is one transaction,
  // rolled back on failure). UNAVAILABLE when the database cannot take writes now (disk
  // full, read-only, I/O error, locked), DATA_LOSS when it is corrupt, INTERNAL otherwise.
  static StatusOr<std::unique_ptr<Store>> Open(const std::string& path);
  ~Store();
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // Schema version this build writes.
  static constexpr int kSchemaVersion = 2;
  int schema_version() const { return schema_version_; }

  // Inserts an experiment and its runs in one transaction.
  Status InsertExperiment(const ExperimentRecord& experiment, const std::vector<RunRecord>& runs);
  // Every experiment, oldest first.
  StatusOr<std::vector<ExperimentRecord>> LoadExperiments();
  // The largest numeric suffix used for experiment ids of `name` (0 if none).
  StatusOr<int64_t> LastExperimentNumber(const std::string& name);

  // Every run, in insertion order.
  StatusOr<std::vector<RunRecord>> LoadRuns();

  // A run's new attempt begins: its row (RUNNING, the attempt number, the worker) and the
  // attempt's start, in one transaction.
  Status StartAttempt(const RunRecord& run, int64_t now_ms);
  // A run's row replaced, and the attempt it leaves (requeued, ended) ended with `outcome`
  // at the run's step; ended_attempt 0 when it was not running.
  struct RunChange {
    RunRecord run;
    int ended_attempt = 0;
    std::string outcome;
  };
  // Runs leave RUNNING or QUEUED (requeued, finished, failed, cancelled), and optionally
  // their experiment's row changes with them: all in one transaction, so a cancel is whole
  // or not at all, even across a SIGKILL.
  Status ApplyRunChanges(const std::vector<RunChange>& runs, const ExperimentRecord* experiment, int64_t now_ms);

  // Stores a step's metrics together with the run's updated row (one transaction);
  // a step stored again replaces the earlier row (a resumed run repeats steps).
  Status PutStep(const RunRecord& run, const v1::StepMetrics& metrics);
  // Stores a probe report unless one for (run, step) exists; returns whether it was new.
  StatusOr<bool> PutProbe(const std::string& run_id, const v1::ProbeReport& report);

  // One report of a group commit; the pointed-to message outlives the call.
  struct ReportWrite {
    enum Kind { kStep, kStepIfAbsent, kProbe } kind = kStep;
    const std::string* run_id = nullptr;
    const v1::StepMetrics* step = nullptr;     // kStep (replaces), kStepIfAbsent
    const v1::ProbeReport* probe = nullptr;    // kProbe (once per (run, step))
  };
  // Writes every report in one transaction (all or none, as a group commit) and returns,
  // per write, whether it stored something new: for a probe report whether it was not
  // stored yet; a step is queued in the step inbox (store.cc, schema version 2), true (a
  // step-if-absent that finds its step stored changes nothing when the inbox is merged).
  // Step rows only: a run's progress in its row is derived from them (LatestProgress), so
  // reports never race a run's state changes.
  StatusOr<std::vector<bool>> WriteReports(const std::vector<ReportWrite>& writes);
  // The run's latest stored step and its latest validation loss, for recovery.
  struct Progress {
    std::optional<v1::StepMetrics> latest;
    std::optional<double> val_loss;
  };
  StatusOr<Progress> LatestProgress(const std::string& run_id);
  // The run's steps ≥ from_step, ascending; at most `limit` of them when limit > 0.
  StatusOr<std::vector<v1::StepMetrics>> Steps(const std::string& run_id, int64_t from_step, int64_t limit = 0);
  StatusOr<std::vector<v1::ProbeReport>> Probes(const std::string& run_id, int64_t from_step);
  StatusOr<int64_t> CountProbes(const std::string& run_id);
  // The steps a run has probe reports for, in order (the reports are not read).
  StatusOr<std::vector<int64_t>> ProbeSteps(const std::string& run_id);
  // The run's report at `step`; nullopt when there is none.
  StatusOr<std::optional<v1::ProbeReport>> ProbeAt(const std::string& run_id, int64_t step);
  // Stored steps of the run with first ≤ step ≤ last.
  StatusOr<int64_t> CountSteps(const std::string& run_id, int64_t first, int64_t last);

  // PRAGMA integrity_check; OK when the database is sound.
  Status IntegrityCheck();

  // Runs SQL on the store's own connection, for tests that simulate failures
  // (PRAGMA max_page_count: a full disk; PRAGMA query_only: a read-only database).
  Status ExecForTesting(const std::string& sql);
  const std::string& path() const { return path_; }

 private:
  Store(sqlite3* db, std::string path) : db_(db), path_(std::move(path)) {}
  // WAL checkpoints on their own thread and connection (see StartCheckpointer in store.cc).
  void StartCheckpointer();
  void CheckpointLoop();
  // One checkpoint on checkpoint_db_ that leaves the WAL to restart at the next write.
  void Checkpoint();
  // Syncs the database file (SQLite syncs it only after a copy that ends with the whole WAL).
  void SyncDatabaseFile();
  static int OnWalCommit(void* self, sqlite3* db, const char* name, int pages);
  // Moves the steps of step_inbox into step_rows (see the schema's version 2 in store.cc);
  // on failure they stay in the inbox, where the step_metrics view still shows them.
  Status MergeInboxLocked();
  // The store thread's merge: the inbox read without mu_, moved in transactions of whole
  // runs, so that a writer waits for one of them, not for the whole merge.
  void MergeInboxInChunks();
  // Merges, then names what a read of steps queries: step_rows, or the step_metrics view
  // when the merge failed (the inbox still holds steps).
  const char* StepTableLocked();
  Status Exec(const std::string& sql, const char* what);
  Status Migrate();
  // The connection's last error, naming the store and `what` was being done.
  Status Error(const char* what) const;
  // Runs `body` (which returns the first failed step's Status) in one IMMEDIATE
  // transaction: committed when it succeeds, rolled back otherwise.
  template <typename Body>
  Status Transaction(const char* what, Body body);

  std::mutex mu_;  // serialises use of db_
  sqlite3* db_;
  const std::string path_;
  int schema_version_ = 0;
  // The checkpointer: its connection, woken each second and when the WAL has grown past
  // kCheckpointPages (OnWalCommit); null/unstarted when the store is not in WAL mode.
  sqlite3* checkpoint_db_ = nullptr;
  int64_t inbox_rows_ = -1;  // guarded by mu_: steps in step_inbox (-1: unknown, merge to find out)
  uint64_t merge_generation_ = 0;  // guarded by mu_: whole merges so far
  std::atomic<int> writers_waiting_{0};  // WriteReports calls waiting for mu_
  bool merge_failed_ = false;  // guarded by mu_: the last merge failed, at merge_failed_at_
  std::chrono::steady_clock::time_point merge_failed_at_{};
  bool opened_ = false;  // Open succeeded: the destructor may write (merge)
  // Frames in the WAL after the last commit (OnWalCommit): what a checkpoint has to copy.
  std::atomic<int> wal_frames_{0};
  std::mutex checkpoint_mu_;
  std::condition_variable checkpoint_cv_;  // with checkpoint_mu_
  bool checkpoint_due_ = false;           // guarded by checkpoint_mu_
  bool checkpoint_stop_ = false;          // guarded by checkpoint_mu_
  std::thread checkpointer_;
};

}  // namespace sinkscope

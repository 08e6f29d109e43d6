#include "server/store.h"

#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <string>

namespace sinkscope {
namespace {

// Each migration brings the schema from version i to i+1.
const char* const kMigrations[] = {
    // 0 → 1
    R"sql(
    CREATE TABLE experiments (
      id TEXT PRIMARY KEY,
      name TEXT NOT NULL,
      number INTEGER NOT NULL,
      created_ms INTEGER NOT NULL,
      cancelled INTEGER NOT NULL DEFAULT 0,
      summary BLOB NOT NULL
    );
    CREATE TABLE runs (
      id TEXT PRIMARY KEY,
      experiment_id TEXT NOT NULL REFERENCES experiments(id),
      state INTEGER NOT NULL,
      restarts INTEGER NOT NULL DEFAULT 0,
      finished_ms INTEGER NOT NULL DEFAULT 0,
      summary BLOB NOT NULL
    );
    CREATE INDEX runs_by_experiment ON runs(experiment_id);
    CREATE TABLE attempts (
      run_id TEXT NOT NULL REFERENCES runs(id),
      attempt INTEGER NOT NULL,
      worker_id TEXT NOT NULL,
      started_ms INTEGER NOT NULL,
      start_step INTEGER NOT NULL,
      ended_ms INTEGER,
      end_step INTEGER,
      outcome TEXT,
      PRIMARY KEY (run_id, attempt)
    );
    CREATE TABLE step_metrics (
      run_id TEXT NOT NULL REFERENCES runs(id),
      step INTEGER NOT NULL,
      metrics BLOB NOT NULL,
      PRIMARY KEY (run_id, step)
    );
    CREATE TABLE probe_reports (
      run_id TEXT NOT NULL REFERENCES runs(id),
      step INTEGER NOT NULL,
      report BLOB NOT NULL,
      PRIMARY KEY (run_id, step)
    );
    )sql",
    // 1 → 2: steps arrive in an append-only inbox. Each ingest batch used to insert its
    // rows straight into step_metrics' (run_id, step) key, touching one B-tree page per
    // running run per transaction: under load ~200 pages (800 KB of WAL) for ~100 rows.
    // The inbox is keyed by arrival (its rows fill pages in order: a few pages a batch);
    // the store's thread moves it into step_rows every 250 ms in one transaction, which
    // touches each run's page once for hundreds of rows. step_metrics is now a view of
    // both with the semantics of the writes in arrival order (the last if_absent = 0 row
    // replaces; an if_absent = 1 row only fills a missing step), so every reader sees
    // what was written the moment it is committed.
    R"sql(
    ALTER TABLE step_metrics RENAME TO step_rows;
    CREATE TABLE step_inbox (
      seq INTEGER PRIMARY KEY,
      run_id TEXT NOT NULL REFERENCES runs(id),
      step INTEGER NOT NULL,
      metrics BLOB NOT NULL,
      if_absent INTEGER NOT NULL
    );
    CREATE VIEW step_metrics AS
      SELECT run_id, step, metrics FROM step_rows r
       WHERE NOT EXISTS (SELECT 1 FROM step_inbox i
                          WHERE i.run_id = r.run_id AND i.step = r.step AND i.if_absent = 0)
      UNION ALL
      SELECT i.run_id, i.step, i.metrics FROM step_inbox i
       WHERE i.seq = (SELECT j.seq FROM step_inbox j WHERE j.run_id = i.run_id AND j.step = i.step
                       ORDER BY j.if_absent, CASE WHEN j.if_absent = 0 THEN -j.seq ELSE j.seq END LIMIT 1)
         AND (i.if_absent = 0 OR NOT EXISTS (SELECT 1 FROM step_rows r
                                              WHERE r.run_id = i.run_id AND r.step = i.step));
    )sql",
};

// A prepared statement that finalises itself.
class Stmt {
 public:
  Stmt(sqlite3* db, const char* sql) { rc_ = sqlite3_prepare_v2(db, sql, -1, &s_, nullptr); }
  ~Stmt() { sqlite3_finalize(s_); }
  bool ok() const { return rc_ == SQLITE_OK; }
  Stmt& Text(int i, const std::string& v) {
    sqlite3_bind_text(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& Blob(int i, const std::string& v) {
    sqlite3_bind_blob(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  // Bound without a copy: `v` must stay as it is until the statement is stepped and reset.
  Stmt& BlobInPlace(int i, const std::string& v) {
    sqlite3_bind_blob(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_STATIC);
    return *this;
  }
  Stmt& Int(int i, int64_t v) {
    sqlite3_bind_int64(s_, i, v);
    return *this;
  }
  int Step() { return sqlite3_step(s_); }
  // Ready to bind and step again (bindings cleared).
  void Reset() {
    sqlite3_reset(s_);
    sqlite3_clear_bindings(s_);
  }
  std::string ColumnBlob(int i) const {
    const void* p = sqlite3_column_blob(s_, i);
    return std::string(static_cast<const char*>(p), sqlite3_column_bytes(s_, i));
  }
  int64_t ColumnInt(int i) const { return sqlite3_column_int64(s_, i); }

 private:
  sqlite3_stmt* s_ = nullptr;
  int rc_;
};

}  // namespace

Status Store::Error(const char* what) const {
  const int code = sqlite3_extended_errcode(db_);
  StatusCode status_code = StatusCode::kInternal;
  switch (code & 0xff) {
    case SQLITE_FULL:  // disk full, or PRAGMA max_page_count reached
      status_code = StatusCode::kResourceExhausted;
      break;
    case SQLITE_READONLY:  // read-only file, folder or file system
    case SQLITE_IOERR:
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_CANTOPEN:
    case SQLITE_PERM:
      status_code = StatusCode::kUnavailable;
      break;
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
      status_code = StatusCode::kDataLoss;
      break;
    default:
      break;
  }
  const std::string message = sqlite3_errmsg(db_);
  const std::string generic = sqlite3_errstr(code);
  return Status(status_code, "store " + path_ + ": " + what + ": " + message +
                                 (generic != message ? " (" + generic + ")" : ""));
}

template <typename Body>
Status Store::Transaction(const char* what, Body body) {
  RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE", what));
  Status s = body();
  if (s.ok()) s = Exec("COMMIT", what);
  // SQLite rolls some failures (SQLITE_FULL, SQLITE_IOERR, ...) back by itself; roll back
  // whatever is left, so a failed write leaves nothing behind.
  if (!s.ok() && !sqlite3_get_autocommit(db_)) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
  return s;
}

StatusOr<std::unique_ptr<Store>> Store::Open(const std::string& path) {
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX | SQLITE_OPEN_URI,
                      nullptr) != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return Status(StatusCode::kUnavailable, "store " + path + ": cannot open: " + msg);
  }
  std::unique_ptr<Store> store(new Store(db, path));
  sqlite3_busy_timeout(db, 5000);
  // SQLite opens a file it may not write read-only, and would fail only at the first
  // write; the coordinator must write, so say so now.
  if (sqlite3_db_readonly(db, "main") == 1) {
    return Status(StatusCode::kUnavailable, "store " + path +
                                                ": cannot open for writing: attempt to write a readonly database "
                                                "(the file, its folder or its file system is read-only)");
  }
  RETURN_IF_ERROR(store->Exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;", "open"));
  RETURN_IF_ERROR(store->Migrate());
  {
    std::lock_guard<std::mutex> lock(store->mu_);
    // Steps a crash left in the inbox; if the merge fails they stay there, shown by the view.
    (void)store->MergeInboxLocked();
  }
  store->opened_ = true;
  store->StartCheckpointer();
  return store;
}

// The store's thread. Every 250 ms it moves the step inbox into step_rows (MergeInboxInChunks:
// read on its own connection, written a few runs a transaction under mu_ on the writer's
// connection), and every second, or when a commit leaves more
// than kCheckpointPages in the WAL (then at most every 250 ms), it runs a PASSIVE
// checkpoint on a connection of its own.
// SQLite's automatic checkpoint (which it replaces) runs inside the COMMIT that crosses
// 1,000 WAL pages: the ingest thread would copy the WAL's pages into the database and
// fdatasync in the middle of a batch, every few hundred milliseconds under load, while
// every report waits. A PASSIVE checkpoint does not block the writer (but for a last short
// round once the WAL is past 128 MB, see Checkpoint), and copies a page once however often it
// was rewritten since the last one. Durability is unchanged:
// synchronous=NORMAL in WAL mode syncs the WAL at checkpoints, and a committed transaction
// survives a crash of the process either way. The WAL is truncated to journal_size_limit
// when it restarts.
namespace {
constexpr int kCheckpointPages = 16384;  // 64 MB of 4 KB pages
constexpr auto kMergePeriod = std::chrono::milliseconds(250);
constexpr auto kCheckpointPeriod = std::chrono::seconds(1);
constexpr auto kMinCheckpointGap = std::chrono::milliseconds(250);
constexpr int64_t kInboxRows = 16384;    // steps the inbox holds before a write merges it
constexpr size_t kMergeChunkRows = 512;  // a merge's transactions: whole runs, about this many steps
// Checkpoint: copy rounds while the writer appends, until it appended at most
// kCatchUpFrames during one; the rest is copied with the writer held off once the WAL
// holds kRestartFrames, so that the next write restarts it.
constexpr int kCheckpointRounds = 3;
constexpr int kCatchUpFrames = 1024;   // 4 MB of 4 KB pages
constexpr int kRestartFrames = 2 * kCheckpointPages;  // 128 MB: a restart stops the writer ~10 ms
constexpr int64_t kWalBytesKept = int64_t{kRestartFrames} * 4096;  // journal_size_limit

// Whether the connection sees the database in WAL mode (the statement is finalized on
// return, so the connection may be closed right after).
bool InWalMode(sqlite3* db) {
  Stmt mode(db, "PRAGMA journal_mode");
  return mode.ok() && mode.Step() == SQLITE_ROW && mode.ColumnBlob(0) == "wal";
}
}  // namespace

void Store::StartCheckpointer() {
  // Not in WAL mode (an in-memory database): SQLite's own handling is all there is.
  if (!InWalMode(db_)) return;
  // A connection learns the database is in WAL mode when it first reads it (until then a
  // checkpoint does nothing): the checkpointer's reads it once. Without it SQLite's
  // automatic checkpoints stay on.
  const bool opened =
      sqlite3_open_v2(path_.c_str(), &checkpoint_db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_URI, nullptr) == SQLITE_OK;
  if (opened) sqlite3_busy_timeout(checkpoint_db_, 0);
  if (!opened || !InWalMode(checkpoint_db_)) {
    sqlite3_close(checkpoint_db_);
    checkpoint_db_ = nullptr;
  }
  if (checkpoint_db_ != nullptr) {
    // A restarted WAL keeps its file (no truncate and regrow each time), up to this.
    sqlite3_exec(db_, ("PRAGMA journal_size_limit=" + std::to_string(kWalBytesKept)).c_str(), nullptr, nullptr, nullptr);
    sqlite3_wal_hook(db_, &Store::OnWalCommit, this);  // replaces the automatic checkpoint
  }
  checkpointer_ = std::thread([this] { CheckpointLoop(); });
}

int Store::OnWalCommit(void* self, sqlite3*, const char*, int pages) {
  auto* store = static_cast<Store*>(self);
  store->wal_frames_.store(pages, std::memory_order_relaxed);
  if (pages >= kCheckpointPages) {
    std::lock_guard<std::mutex> lock(store->checkpoint_mu_);
    if (!store->checkpoint_due_) {  // the thread is woken once, not on every commit
      store->checkpoint_due_ = true;
      store->checkpoint_cv_.notify_one();
    }
  }
  return SQLITE_OK;
}

void Store::CheckpointLoop() {
  pthread_setname_np(pthread_self(), "store");  // for top -H, perf and gdb
  using Clock = std::chrono::steady_clock;
  auto next_merge = Clock::now() + kMergePeriod;
  auto next_checkpoint = Clock::now() + kCheckpointPeriod;
  auto last_checkpoint = Clock::time_point{};
  std::unique_lock<std::mutex> lock(checkpoint_mu_);
  while (!checkpoint_stop_) {
    // Merges on their own period only: a merge rewrites each running run's step_rows page
    // however few rows it moves, so merging on every wake (a WAL past kCheckpointPages
    // wakes this thread) multiplied the pages written. Checkpoints: each second, or when the
    // WAL is past kCheckpointPages, at most every kMinCheckpointGap.
    const auto now = Clock::now();
    auto wake = std::min(next_merge, next_checkpoint);
    if (checkpoint_due_) wake = std::min(wake, last_checkpoint + kMinCheckpointGap);
    if (now < wake) {
      const bool was_due = checkpoint_due_;
      checkpoint_cv_.wait_until(lock, wake, [&] { return checkpoint_stop_ || (checkpoint_due_ && !was_due); });
      continue;
    }
    const bool merge = now >= next_merge;
    const bool checkpoint = now >= next_checkpoint || (checkpoint_due_ && now >= last_checkpoint + kMinCheckpointGap);
    if (checkpoint) checkpoint_due_ = false;
    lock.unlock();
    if (merge) {
      MergeInboxInChunks();
      next_merge = Clock::now() + kMergePeriod;
    }
    if (checkpoint) {
      // BUSY (another checkpoint, or a reader in the way) and I/O errors are left to the
      // next round: the writer's own commits report a full disk or a failing device.
      if (checkpoint_db_ != nullptr) Checkpoint();
      last_checkpoint = Clock::now();
      next_checkpoint = last_checkpoint + kCheckpointPeriod;
    }
    lock.lock();
  }
}

void Store::Checkpoint() {
  // A PASSIVE checkpoint copies the WAL into the database while the writer goes on
  // appending, and SQLite starts the WAL over only at a write that finds every frame
  // copied. Under steady load the copy never caught up: the WAL grew without end (600 MB in
  // the load test's first 10 s; every append extended the file). So what was appended
  // during a copy is copied in further rounds while they shrink, the database is synced
  // (SQLite syncs it only after a copy it ends with the whole WAL), and once the WAL is past
  // kRestartFrames the last few frames are copied with the writer held off (mu_): the next
  // write then starts the WAL over, and SQLite truncates it to journal_size_limit. Held
  // off means ~10 ms here (the copy's two syncs under load), and the restarting commit syncs
  // the WAL's header: 128 MB between restarts, about every two seconds at 60 MB/s.
  int log = 0, copied = 0;
  // One round while the writer goes on; false: BUSY or an I/O error (left to the next
  // checkpoint). `*caught_up`: at most kCatchUpFrames were appended meanwhile.
  auto round = [&](bool* caught_up) {
    if (sqlite3_wal_checkpoint_v2(checkpoint_db_, nullptr, SQLITE_CHECKPOINT_PASSIVE, &log, &copied) != SQLITE_OK) {
      return false;
    }
    *caught_up = wal_frames_.load(std::memory_order_relaxed) - copied <= kCatchUpFrames;
    return true;
  };
  bool caught_up = false;
  for (int i = 0; i < kCheckpointRounds && !caught_up; ++i) {
    if (!round(&caught_up)) return;
  }
  // Not caught up (the disk copies slower than the writer appends): holding the writer
  // off would stall it for the whole backlog; left to the next checkpoint.
  if (log < kRestartFrames || !caught_up) return;
  SyncDatabaseFile();
  // The frames appended during the sync, copied while the writer goes on: what is left
  // for the writer to wait for is what it appends in this short round.
  if (!round(&caught_up) || !caught_up) return;
  std::lock_guard<std::mutex> lock(mu_);
  sqlite3_wal_checkpoint_v2(checkpoint_db_, nullptr, SQLITE_CHECKPOINT_PASSIVE, nullptr, nullptr);
}

void Store::SyncDatabaseFile() {
  // Through SQLite's own file: a descriptor of our own, closed, would drop every POSIX lock
  // this process holds on the database (SQLite's connections included).
  sqlite3_file* file = nullptr;
  if (sqlite3_file_control(checkpoint_db_, "main", SQLITE_FCNTL_FILE_POINTER, &file) != SQLITE_OK || file == nullptr ||
      file->pMethods == nullptr) {
    return;
  }
  (void)file->pMethods->xSync(file, SQLITE_SYNC_NORMAL);  // an error shows again at SQLite's own sync
}

// The whole merge moved ~5,000 steps of 200 runs in one transaction under mu_ at 20,000
// steps/s: 15-40 ms, four times a second, while every ingest batch waited for it (the tail
// of the load test). Here the inbox is read without mu_ (on checkpoint_db_, which sees every
// committed step) and moved in transactions of whole runs of about kMergeChunkRows steps,
// a waiting writer going first between them (in the load test at 20,000/s each held mu_
// 1.6 ms at the median, 3 ms at p90, 8 ms at most). Each run's rows are still in one
// transaction (its step_rows page written once a merge, as before; smaller chunks of the
// inbox in arrival order touched every run's page in each and cost 6% of a core more).
// The inbox rows are deleted with the last transaction; until then a merged step is in both
// (the view shows it once). A whole merge in between (a reader's, the backstop's) takes the
// inbox: what was read is stale (the inbox's seq starts over once it is empty) and dropped.
void Store::MergeInboxInChunks() {
  using Clock = std::chrono::steady_clock;
  uint64_t generation = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (inbox_rows_ == 0) return;
    // A failure (a full disk) leaves the steps in the inbox: retried, less often, whole.
    if (merge_failed_) {
      if (Clock::now() - merge_failed_at_ >= std::chrono::seconds(2)) (void)MergeInboxLocked();
      return;
    }
    // Not in WAL mode (an in-memory database): no second connection to read the inbox on.
    if (checkpoint_db_ == nullptr) {
      (void)MergeInboxLocked();
      return;
    }
    generation = merge_generation_;
  }
  // The inbox as committed, read on the store's own connection while ingest writes on.
  struct Row {
    int64_t seq;
    std::string run_id;
    int64_t step;
    std::string metrics;
    bool if_absent;
  };
  std::vector<Row> rows;
  int rc = SQLITE_ERROR;
  {
    Stmt q(checkpoint_db_, "SELECT seq, run_id, step, metrics, if_absent FROM step_inbox ORDER BY seq");
    while (q.ok() && (rc = q.Step()) == SQLITE_ROW) {
      rows.push_back(Row{q.ColumnInt(0), q.ColumnBlob(1), q.ColumnInt(2), q.ColumnBlob(3), q.ColumnInt(4) != 0});
    }
  }
  if (rc != SQLITE_DONE) {  // BUSY or an I/O error: the whole merge, as before
    std::lock_guard<std::mutex> lock(mu_);
    (void)MergeInboxLocked();
    return;
  }
  if (rows.empty()) return;
  const int64_t last_seq = rows.back().seq;
  // Grouped by run, in arrival order within each: a chunk is whole runs, so each run's
  // step_rows page is written once a merge, as by the whole merge.
  std::vector<size_t> order(rows.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return rows[a].run_id < rows[b].run_id; });
  size_t begin = 0;
  while (begin < order.size()) {
    size_t end = begin;
    while (end < order.size() && (end - begin < kMergeChunkRows || rows[order[end]].run_id == rows[order[end - 1]].run_id)) {
      ++end;
    }
    const bool last = end == order.size();
    if (begin > 0) {
      // The lock was just released: a writer waiting for it goes first (std::mutex would let
      // this thread take it straight back).
      const auto give_up = Clock::now() + std::chrono::milliseconds(5);
      while (writers_waiting_.load(std::memory_order_relaxed) > 0 && Clock::now() < give_up) std::this_thread::yield();
    }
    std::lock_guard<std::mutex> lock(mu_);
    // A whole merge (a reader's, the backstop's) took these rows since they were read.
    if (merge_generation_ != generation) return;
    Status s = Transaction("merge the step inbox", [&]() -> Status {
      Stmt ignore(db_, "INSERT OR IGNORE INTO step_rows (run_id, step, metrics) VALUES (?,?,?)");
      Stmt replace(db_, "INSERT OR REPLACE INTO step_rows (run_id, step, metrics) VALUES (?,?,?)");
      if (!ignore.ok() || !replace.ok()) return Error("merge the step inbox");
      // Per run, as the whole merge: the first if-absent step fills a missing one, then the
      // last replacing step wins.
      for (size_t run = begin; run < end;) {
        size_t run_end = run;
        while (run_end < end && rows[order[run_end]].run_id == rows[order[run]].run_id) ++run_end;
        for (const bool if_absent : {true, false}) {
          Stmt& q = if_absent ? ignore : replace;
          for (size_t i = run; i < run_end; ++i) {
            const Row& r = rows[order[i]];
            if (r.if_absent != if_absent) continue;
            q.Reset();
            q.Text(1, r.run_id).Int(2, r.step).BlobInPlace(3, r.metrics);
            if (q.Step() != SQLITE_DONE) return Error("merge the step inbox");
          }
        }
        run = run_end;
      }
      if (last) {
        Stmt del(db_, "DELETE FROM step_inbox WHERE seq <= ?");
        if (!del.ok()) return Error("merge the step inbox");
        del.Int(1, last_seq);
        if (del.Step() != SQLITE_DONE) return Error("merge the step inbox");
      }
      return OkStatus();
    });
    if (!s.ok()) {
      // What is merged is also still in the inbox (the view shows each step once); the
      // whole merge retries it all.
      merge_failed_ = true;
      merge_failed_at_ = Clock::now();
      return;
    }
    if (last && inbox_rows_ >= 0) inbox_rows_ = std::max<int64_t>(0, inbox_rows_ - static_cast<int64_t>(rows.size()));
    begin = end;
  }
}

Status Store::MergeInboxLocked() {
  if (inbox_rows_ == 0) return OkStatus();
  ++merge_generation_;  // a chunked merge under way drops what it read (see MergeInboxInChunks)
  // In arrival order: the first if-absent step fills a missing one, then the last
  // replacing step wins (the writes' semantics, one at a time). Inbox rows reference their
  // run as step_rows do (checked when they are written), so the merge drops nothing.
  Status s = Transaction("merge the step inbox", [&]() -> Status {
    return Exec("INSERT OR IGNORE INTO step_rows (run_id, step, metrics) SELECT run_id, step, metrics "
                "FROM step_inbox WHERE if_absent = 1 ORDER BY seq;"
                "INSERT OR REPLACE INTO step_rows (run_id, step, metrics) SELECT run_id, step, metrics "
                "FROM step_inbox WHERE if_absent = 0 ORDER BY seq;"
                "DELETE FROM step_inbox;",
                "merge the step inbox");
  });
  if (s.ok()) {
    inbox_rows_ = 0;
    merge_failed_ = false;
  } else {
    // Left in the inbox (the view shows them): counted, so that writes do not retry the
    // merge on every commit; the store's thread retries it (every 2 s after a failure).
    merge_failed_ = true;
    merge_failed_at_ = std::chrono::steady_clock::now();
    Stmt q(db_, "SELECT COUNT(*) FROM step_inbox");
    inbox_rows_ = q.ok() && q.Step() == SQLITE_ROW ? q.ColumnInt(0) : -1;
  }
  return s;
}

const char* Store::StepTableLocked() {
  // step_rows once the inbox is merged (its key in order); the view when the merge failed.
  return MergeInboxLocked().ok() ? "step_rows" : "step_metrics";
}

Store::~Store() {
  if (checkpointer_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(checkpoint_mu_);
      checkpoint_stop_ = true;
      checkpoint_cv_.notify_one();
    }
    checkpointer_.join();
  }
  if (opened_) {  // not a store whose Open failed (e.g. a newer schema): it is left as found
    std::lock_guard<std::mutex> lock(mu_);
    (void)MergeInboxLocked();  // what it cannot merge stays in the inbox for the next open
  }
  sqlite3_close(checkpoint_db_);  // before the writer's: the last connection checkpoints the WAL away
  sqlite3_close(db_);
}

Status Store::Exec(const std::string& sql, const char* what) {
  if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, nullptr) != SQLITE_OK) return Error(what);
  return OkStatus();
}

Status Store::ExecForTesting(const std::string& sql) {
  std::lock_guard<std::mutex> lock(mu_);
  return Exec(sql, "exec");
}

Status Store::Migrate() {
  RETURN_IF_ERROR(Exec("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);", "schema version"));
  {
    Stmt q(db_, "SELECT version FROM schema_version");
    schema_version_ = q.Step() == SQLITE_ROW ? static_cast<int>(q.ColumnInt(0)) : 0;
  }
  if (schema_version_ > kSchemaVersion) {
    return FailedPreconditionError("store " + path_ + ": schema version " + std::to_string(schema_version_) +
                                   " is newer than this coordinator's " + std::to_string(kSchemaVersion));
  }
  while (schema_version_ < kSchemaVersion) {
    const std::string what = "migration to schema version " + std::to_string(schema_version_ + 1);
    RETURN_IF_ERROR(Transaction(what.c_str(), [&]() -> Status {
      RETURN_IF_ERROR(Exec(kMigrations[schema_version_], what.c_str()));
      return Exec("DELETE FROM schema_version; INSERT INTO schema_version VALUES (" +
                      std::to_string(schema_version_ + 1) + ");",
                  what.c_str());
    }));
    ++schema_version_;
  }
  return OkStatus();
}

Status Store::InsertExperiment(const ExperimentRecord& e, const std::vector<RunRecord>& runs) {
  std::lock_guard<std::mutex> lock(mu_);
  const std::string& id = e.summary.experiment_id();
  const size_t dash = id.rfind('-');
  const std::string digits = dash == std::string::npos ? "" : id.substr(dash + 1);
  if (digits.empty() || digits.size() > 18 || digits.find_first_not_of("0123456789") != std::string::npos) {
    return InvalidArgumentError("store " + path_ + ": experiment id \"" + id + "\" does not end in -<number>");
  }
  const int64_t number = std::stoll(digits);
  return Transaction("insert experiment", [&]() -> Status {
    {
      Stmt q(db_, "INSERT INTO experiments (id, name, number, created_ms, cancelled, summary) VALUES (?,?,?,?,?,?)");
      q.Text(1, id).Text(2, e.summary.name()).Int(3, number).Int(4, e.summary.created_unix_ms()).Int(5, e.cancelled);
      q.Blob(6, e.summary.SerializeAsString());
      if (q.Step() != SQLITE_DONE) return Error("insert experiment");
    }
    for (const RunRecord& r : runs) {
      Stmt q(db_, "INSERT INTO runs (id, experiment_id, state, restarts, finished_ms, summary) VALUES (?,?,?,?,?,?)");
      q.Text(1, r.summary.run_id()).Text(2, id).Int(3, r.summary.state()).Int(4, r.restarts).Int(5, r.finished_unix_ms);
      q.Blob(6, r.summary.SerializeAsString());
      if (q.Step() != SQLITE_DONE) return Error("insert run");
    }
    return OkStatus();
  });
}

StatusOr<std::vector<ExperimentRecord>> Store::LoadExperiments() {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt q(db_, "SELECT summary, cancelled FROM experiments ORDER BY created_ms, number");
  std::vector<ExperimentRecord> out;
  int rc;
  while ((rc = q.Step()) == SQLITE_ROW) {
    ExperimentRecord e;
    if (!e.summary.ParseFromString(q.ColumnBlob(0))) {
      return DataLossError("store " + path_ + ": an experiment row does not parse");
    }
    e.cancelled = q.ColumnInt(1) != 0;
    out.push_back(std::move(e));
  }
  if (rc != SQLITE_DONE) return Error("load experiments");
  return out;
}

StatusOr<int64_t> Store::LastExperimentNumber(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt q(db_, "SELECT COALESCE(MAX(number), 0) FROM experiments WHERE name = ?");
  q.Text(1, name);
  if (q.Step() != SQLITE_ROW) return Error("experiment number");
  return q.ColumnInt(0);
}

StatusOr<std::vector<RunRecord>> Store::LoadRuns() {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt q(db_, "SELECT summary, restarts, finished_ms FROM runs ORDER BY rowid");
  std::vector<RunRecord> out;
  int rc;
  while ((rc = q.Step()) == SQLITE_ROW) {
    RunRecord r;
    if (!r.summary.ParseFromString(q.ColumnBlob(0))) {
      return DataLossError("store " + path_ + ": a run row does not parse");
    }
    r.restarts = static_cast<int32_t>(q.ColumnInt(1));
    r.finished_unix_ms = q.ColumnInt(2);
    out.push_back(std::move(r));
  }
  if (rc != SQLITE_DONE) return Error("load runs");
  return out;
}

Status Store::StartAttempt(const RunRecord& r, int64_t now_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  return Transaction("start attempt", [&]() -> Status {
    {
      Stmt q(db_, "UPDATE runs SET state = ?, restarts = ?, finished_ms = ?, summary = ? WHERE id = ?");
      q.Int(1, r.summary.state()).Int(2, r.restarts).Int(3, r.finished_unix_ms);
      q.Blob(4, r.summary.SerializeAsString()).Text(5, r.summary.run_id());
      if (q.Step() != SQLITE_DONE) return Error("start attempt: update run");
    }
    Stmt q(db_,
           "INSERT OR REPLACE INTO attempts (run_id, attempt, worker_id, started_ms, start_step) VALUES (?,?,?,?,?)");
    q.Text(1, r.summary.run_id()).Int(2, r.summary.attempt()).Text(3, r.summary.worker_id()).Int(4, now_ms);
    q.Int(5, r.summary.step());
    if (q.Step() != SQLITE_DONE) return Error("start attempt");
    return OkStatus();
  });
}

Status Store::ApplyRunChanges(const std::vector<RunChange>& runs, const ExperimentRecord* e, int64_t now_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  return Transaction("update runs", [&]() -> Status {
    for (const RunChange& c : runs) {
      const RunRecord& r = c.run;
      if (c.ended_attempt > 0) {
        Stmt q(db_, "UPDATE attempts SET ended_ms = ?, end_step = ?, outcome = ? WHERE run_id = ? AND attempt = ?");
        q.Int(1, now_ms).Int(2, r.summary.step()).Text(3, c.outcome).Text(4, r.summary.run_id());
        q.Int(5, c.ended_attempt);
        if (q.Step() != SQLITE_DONE) return Error("end attempt");
      }
      Stmt q(db_, "UPDATE runs SET state = ?, restarts = ?, finished_ms = ?, summary = ? WHERE id = ?");
      q.Int(1, r.summary.state()).Int(2, r.restarts).Int(3, r.finished_unix_ms);
      q.Blob(4, r.summary.SerializeAsString()).Text(5, r.summary.run_id());
      if (q.Step() != SQLITE_DONE) return Error("update run");
    }
    if (e != nullptr) {
      Stmt q(db_, "UPDATE experiments SET cancelled = ?, summary = ? WHERE id = ?");
      q.Int(1, e->cancelled).Blob(2, e->summary.SerializeAsString()).Text(3, e->summary.experiment_id());
      if (q.Step() != SQLITE_DONE) return Error("update experiment");
    }
    return OkStatus();
  });
}

Status Store::PutStep(const RunRecord& r, const v1::StepMetrics& m) {
  std::lock_guard<std::mutex> lock(mu_);
  return Transaction("put step", [&]() -> Status {
    {
      // Through the inbox like every step, so the writes keep their order.
      Stmt q(db_, "INSERT INTO step_inbox (run_id, step, metrics, if_absent) VALUES (?,?,?,0)");
      q.Text(1, r.summary.run_id()).Int(2, m.step()).Blob(3, m.SerializeAsString());
      if (q.Step() != SQLITE_DONE) return Error("put step");
    }
    Stmt q(db_, "UPDATE runs SET state = ?, summary = ? WHERE id = ?");
    q.Int(1, r.summary.state()).Blob(2, r.summary.SerializeAsString()).Text(3, r.summary.run_id());
    if (q.Step() != SQLITE_DONE) return Error("put step: update run");
    if (inbox_rows_ >= 0) ++inbox_rows_;
    return OkStatus();
  });
}

StatusOr<bool> Store::PutProbe(const std::string& run_id, const v1::ProbeReport& report) {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt q(db_, "INSERT OR IGNORE INTO probe_reports (run_id, step, report) VALUES (?,?,?)");
  q.Text(1, run_id).Int(2, report.step()).Blob(3, report.SerializeAsString());
  if (q.Step() != SQLITE_DONE) return Error("put probe report");
  return sqlite3_changes(db_) > 0;
}

StatusOr<std::vector<bool>> Store::WriteReports(const std::vector<ReportWrite>& writes) {
  writers_waiting_.fetch_add(1, std::memory_order_relaxed);
  std::unique_lock<std::mutex> lock(mu_);
  writers_waiting_.fetch_sub(1, std::memory_order_relaxed);
  std::vector<bool> fresh(writes.size(), false);
  int64_t steps = 0;
  Status s = Transaction("write reports", [&]() -> Status {
    // Prepared once a batch, not once a row: ingest writes thousands of rows a second.
    // Each checked as it is made: a later prepare would reset SQLite's error.
    // Each statement's blob is serialized into a buffer of its own, bound in place (a probe
    // report is tens of kilobytes: copied once fewer, allocated once a batch). A buffer
    // changes only after its statement's Reset, and outlives the statement.
    std::string step_blob, probe_blob;
    Stmt put_step(db_, "INSERT INTO step_inbox (run_id, step, metrics, if_absent) VALUES (?,?,?,?)");
    if (!put_step.ok()) return Error("prepare report writes");
    Stmt put_probe(db_, "INSERT OR IGNORE INTO probe_reports (run_id, step, report) VALUES (?,?,?)");
    if (!put_probe.ok()) return Error("prepare report writes");
    for (size_t i = 0; i < writes.size(); ++i) {
      const ReportWrite& w = writes[i];
      Stmt& q = w.kind == ReportWrite::kProbe ? put_probe : put_step;
      q.Reset();
      if (w.kind == ReportWrite::kProbe) {
        w.probe->SerializeToString(&probe_blob);
        q.Text(1, *w.run_id).Int(2, w.probe->step()).BlobInPlace(3, probe_blob);
      } else {
        w.step->SerializeToString(&step_blob);
        q.Text(1, *w.run_id).Int(2, w.step->step()).BlobInPlace(3, step_blob);
        q.Int(4, w.kind == ReportWrite::kStepIfAbsent ? 1 : 0);
      }
      if (q.Step() != SQLITE_DONE) return Error(w.kind == ReportWrite::kProbe ? "put probe report" : "put step");
      // A probe report is new when its row was inserted. A step is queued in the inbox:
      // whether it was new is not known until the merge (the coordinator reads
      // freshness for probe reports only).
      fresh[i] = w.kind == ReportWrite::kProbe ? sqlite3_changes(db_) > 0 : true;
      steps += w.kind != ReportWrite::kProbe;
    }
    return OkStatus();
  });
  if (!s.ok()) return s;
  if (inbox_rows_ >= 0) inbox_rows_ += steps;
  // A backstop for a starved store thread: the inbox never holds more than kInboxRows.
  // The steps are committed either way: a failed merge leaves them in the inbox (the view).
  if (inbox_rows_ >= kInboxRows) (void)MergeInboxLocked();
  return fresh;
}

StatusOr<Store::Progress> Store::LatestProgress(const std::string& run_id) {
  std::lock_guard<std::mutex> lock(mu_);
  const std::string table = StepTableLocked();
  Stmt q(db_, ("SELECT metrics FROM " + table + " WHERE run_id = ? ORDER BY step DESC").c_str());
  q.Text(1, run_id);
  Progress p;
  int rc;
  while ((rc = q.Step()) == SQLITE_ROW) {
    v1::StepMetrics m;
    if (!m.ParseFromString(q.ColumnBlob(0))) return DataLossError("store " + path_ + ": a step row does not parse");
    if (!p.latest) p.latest = m;
    if (m.has_val_loss()) {
      p.val_loss = m.val_loss();
      break;
    }
  }
  if (rc != SQLITE_DONE && rc != SQLITE_ROW) return Error("read progress");
  return p;
}

StatusOr<std::vector<v1::StepMetrics>> Store::Steps(const std::string& run_id, int64_t from_step, int64_t limit) {
  std::lock_guard<std::mutex> lock(mu_);
  const std::string table = StepTableLocked();
  Stmt q(db_, ("SELECT metrics FROM " + table + " WHERE run_id = ? AND step >= ? ORDER BY step LIMIT ?").c_str());
  q.Text(1, run_id).Int(2, from_step).Int(3, limit > 0 ? limit : -1);
  std::vector<v1::StepMetrics> out;
  int rc;
  while ((rc = q.Step()) == SQLITE_ROW) {
    out.emplace_back();
    if (!out.back().ParseFromString(q.ColumnBlob(0))) {
      return DataLossError("store " + path_ + ": a step row does not parse");
    }
  }
  if (rc != SQLITE_DONE) return Error("read steps");
  return out;
}

StatusOr<std::vector<v1::ProbeReport>> Store::Probes(const std::string& run_id, int64_t from_step) {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt q(db_, "SELECT report FROM probe_reports WHERE run_id = ? AND step >= ? ORDER BY step");
  q.Text(1, run_id).Int(2, from_step);
  std::vector<v1::ProbeReport> out;
  int rc;
  while ((rc = q.Step()) == SQLITE_ROW) {
    out.emplace_back();
    if (!out.back().ParseFromString(q.ColumnBlob(0))) {
      return DataLossError("store " + path_ + ": a probe row does not parse");
    }
  }
  if (rc != SQLITE_DONE) return Error("read probes");
  return out;
}

StatusOr<std::vector<int64_t>> Store::ProbeSteps(const std::string& run_id) {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt q(db_, "SELECT step FROM probe_reports WHERE run_id = ? ORDER BY step");
  q.Text(1, run_id);
  std::vector<int64_t> out;
  int rc;
  while ((rc = q.Step()) == SQLITE_ROW) out.push_back(q.ColumnInt(0));
  if (rc != SQLITE_DONE) return Error("read probe steps");
  return out;
}

StatusOr<std::optional<v1::ProbeReport>> Store::ProbeAt(const std::string& run_id, int64_t step) {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt q(db_, "SELECT report FROM probe_reports WHERE run_id = ? AND step = ?");
  q.Text(1, run_id).Int(2, step);
  const int rc = q.Step();
  if (rc == SQLITE_DONE) return std::optional<v1::ProbeReport>();
  if (rc != SQLITE_ROW) return Error("read a probe");
  v1::ProbeReport report;
  if (!report.ParseFromString(q.ColumnBlob(0))) return DataLossError("store " + path_ + ": a probe row does not parse");
  return std::optional<v1::ProbeReport>(std::move(report));
}

StatusOr<int64_t> Store::CountProbes(const std::string& run_id) {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt q(db_, "SELECT COUNT(*) FROM probe_reports WHERE run_id = ?");
  q.Text(1, run_id);
  if (q.Step() != SQLITE_ROW) return Error("count probes");
  return q.ColumnInt(0);
}

StatusOr<int64_t> Store::CountSteps(const std::string& run_id, int64_t first, int64_t last) {
  std::lock_guard<std::mutex> lock(mu_);
  const std::string table = StepTableLocked();
  Stmt q(db_, ("SELECT COUNT(*) FROM " + table + " WHERE run_id = ? AND step >= ? AND step <= ?").c_str());
  q.Text(1, run_id).Int(2, first).Int(3, last);
  if (q.Step() != SQLITE_ROW) return Error("count steps");
  return q.ColumnInt(0);
}

Status Store::IntegrityCheck() {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt q(db_, "PRAGMA integrity_check");
  if (q.Step() != SQLITE_ROW) return Error("integrity check");
  const std::string result = q.ColumnBlob(0);
  if (result != "ok") return DataLossError("store " + path_ + ": integrity check: " + result);
  return OkStatus();
}

}  // namespace sinkscope

// The store under failures (server/store.cc) and how the coordinator surfaces them
// (server/coordinator.cc): a full disk (PRAGMA max_page_count) and a read-only database
// (PRAGMA query_only while open; a read-only file at open) give errors naming the store
// and SQLite's reason, change nothing (each write is one transaction) and leave a sound
// database (PRAGMA integrity_check); the coordinator does not acknowledge what it could
// not store, so the worker writes it again, and it is stored once. Also: the coordinator
// restarted on the same store carries a running run on under the same attempt.
#include "server/store.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "schema/experiment.h"
#include "server/coordinator.h"
#include "server/exporter.h"

namespace sinkscope {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using ::testing::SizeIs;

constexpr char kDiskFull[] = "database or disk is full";
constexpr char kReadOnly[] = "attempt to write a readonly database";

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/sinkscope-store-test-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::permissions(path_, std::filesystem::perms::owner_all, ec);
    std::filesystem::remove_all(path_, ec);
  }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

ExperimentRecord MakeExperiment(const std::string& id) {
  ExperimentRecord e;
  e.summary.set_experiment_id(id);
  e.summary.set_name(id.substr(0, id.rfind('-')));
  e.summary.set_state(v1::ACTIVE);
  e.summary.set_created_unix_ms(1000);
  return e;
}

RunRecord MakeRun(const std::string& experiment_id, const std::string& suffix, size_t padding = 0) {
  RunRecord r;
  r.summary.set_run_id(experiment_id + "-" + suffix);
  r.summary.set_experiment_id(experiment_id);
  r.summary.set_state(v1::QUEUED);
  r.summary.set_total_steps(100);
  // A run row as large as asked (the message is free text): it needs new pages.
  r.summary.set_message(std::string(padding, 'x'));
  return r;
}

v1::StepMetrics MakeStep(int64_t step) {
  v1::StepMetrics m;
  m.set_step(step);
  m.set_loss(5.0 - 0.01 * static_cast<double>(step));
  return m;
}

v1::ProbeReport MakeProbe(int64_t step, int layers = 2, int profile = 64) {
  v1::ProbeReport p;
  p.set_step(step);
  p.set_loss(4.0);
  for (int l = 0; l < layers; ++l) {
    v1::LayerProbe* layer = p.add_layers();
    layer->set_layer(l);
    layer->set_r_gs(1.5 + l);
    for (int i = 0; i < profile; ++i) layer->add_attn_bloat(0.25 * i);
    for (const char* name : {"h_out", "r_mlp", "r_attn", "v"}) {
      (*layer->mutable_norm_ratio())[name] = 1.0 + l;
      auto& series = (*layer->mutable_norms())[name];
      for (int i = 0; i < profile; ++i) series.add_values(0.5 * i);
    }
  }
  return p;
}

std::unique_ptr<Store> OpenStore(const std::string& path) {
  auto store = Store::Open(path);
  EXPECT_TRUE(store.ok()) << store.status().ToString();
  return store.ok() ? std::move(*store) : nullptr;
}

// A store with one experiment and one run, which has stored step 1.
std::unique_ptr<Store> SeededStore(const std::string& path, RunRecord* run) {
  auto store = OpenStore(path);
  if (!store) return nullptr;
  *run = MakeRun("exp-1", "baseline-s0");
  EXPECT_TRUE(store->InsertExperiment(MakeExperiment("exp-1"), {*run}).ok());
  run->summary.set_state(v1::RUNNING);
  run->summary.set_step(1);
  EXPECT_TRUE(store->PutStep(*run, MakeStep(1)).ok());
  return store;
}

// The file's size in bytes; -1 when there is none.
int64_t FileBytes(const std::string& path) {
  struct stat st{};
  return stat(path.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_size) : int64_t{-1};
}

// Every step stored for `run_id`.
std::vector<int64_t> StoredSteps(Store& store, const std::string& run_id) {
  std::vector<int64_t> out;
  auto steps = store.Steps(run_id, 0);
  EXPECT_TRUE(steps.ok()) << steps.status().ToString();
  if (steps.ok()) {
    for (const auto& s : *steps) out.push_back(s.step());
  }
  return out;
}

// --- the store alone -------------------------------------------------------------------

TEST(StoreFailures, DiskFullFailsWithTheReasonAndChangesNothing) {
  TempDir dir;
  const std::string path = dir.File("store.db");
  RunRecord run;
  auto store = SeededStore(path, &run);
  ASSERT_TRUE(store);
  // The database may not grow past its present size: the next page it needs fails the
  // write as a full disk does (SQLITE_FULL).
  ASSERT_TRUE(store->ExecForTesting("PRAGMA max_page_count = 1").ok());

  // A step whose run row no longer fits: the step row (written first, into a page with
  // room) is rolled back with it.
  RunRecord grown = run;
  grown.summary.set_step(2);
  grown.summary.set_message(std::string(64 << 10, 'y'));
  Status s = store->PutStep(grown, MakeStep(2));
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.ToString();
  EXPECT_THAT(s.message(), AllOf(HasSubstr("store " + path), HasSubstr("put step: update run"), HasSubstr(kDiskFull)));
  EXPECT_EQ(StoredSteps(*store, run.summary.run_id()), std::vector<int64_t>{1});
  auto runs = store->LoadRuns();
  ASSERT_TRUE(runs.ok());
  ASSERT_THAT(*runs, SizeIs(1));
  EXPECT_EQ((*runs)[0].summary.step(), 1);
  EXPECT_THAT((*runs)[0].summary.message(), IsEmpty());

  // An experiment whose runs do not fit: the experiment row goes with them.
  std::vector<RunRecord> runs2;
  for (int i = 0; i < 8; ++i) runs2.push_back(MakeRun("exp-2", "vscale-s" + std::to_string(i), 16 << 10));
  s = store->InsertExperiment(MakeExperiment("exp-2"), runs2);
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_THAT(s.message(), AllOf(HasSubstr("store " + path), HasSubstr("insert"), HasSubstr(kDiskFull)));
  auto experiments = store->LoadExperiments();
  ASSERT_TRUE(experiments.ok());
  EXPECT_THAT(*experiments, SizeIs(1));
  runs = store->LoadRuns();
  ASSERT_TRUE(runs.ok());
  EXPECT_THAT(*runs, SizeIs(1));
  auto last = store->LastExperimentNumber("exp");
  ASSERT_TRUE(last.ok());
  EXPECT_EQ(*last, 1);

  // A probe report that does not fit.
  auto probe = store->PutProbe(run.summary.run_id(), MakeProbe(1, 64, 256));
  ASSERT_FALSE(probe.ok());
  EXPECT_THAT(probe.status().message(), AllOf(HasSubstr("store " + path), HasSubstr(kDiskFull)));
  auto count = store->CountProbes(run.summary.run_id());
  ASSERT_TRUE(count.ok());
  EXPECT_EQ(*count, 0);

  EXPECT_TRUE(store->IntegrityCheck().ok()) << store->IntegrityCheck().ToString();

  // Room again: the same writes succeed.
  ASSERT_TRUE(store->ExecForTesting("PRAGMA max_page_count = 1073741823").ok());
  EXPECT_TRUE(store->PutStep(grown, MakeStep(2)).ok());
  EXPECT_TRUE(store->InsertExperiment(MakeExperiment("exp-2"), runs2).ok());
  auto stored = store->PutProbe(run.summary.run_id(), MakeProbe(1, 64, 256));
  ASSERT_TRUE(stored.ok());
  EXPECT_TRUE(*stored);
  store.reset();

  // Reopened: sound, and holding exactly what was acknowledged.
  store = OpenStore(path);
  ASSERT_TRUE(store);
  EXPECT_TRUE(store->IntegrityCheck().ok());
  EXPECT_EQ(StoredSteps(*store, run.summary.run_id()), (std::vector<int64_t>{1, 2}));
  runs = store->LoadRuns();
  ASSERT_TRUE(runs.ok());
  EXPECT_THAT(*runs, SizeIs(9));
}

TEST(StoreFailures, ReadOnlyDatabaseFailsWithTheReasonAndChangesNothing) {
  TempDir dir;
  const std::string path = dir.File("store.db");
  RunRecord run;
  auto store = SeededStore(path, &run);
  ASSERT_TRUE(store);
  // The database stops taking writes while open (as a file system remounted read-only).
  ASSERT_TRUE(store->ExecForTesting("PRAGMA query_only = 1").ok());

  RunRecord next = run;
  next.summary.set_step(2);
  Status s = store->PutStep(next, MakeStep(2));
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_THAT(s.message(), AllOf(HasSubstr("store " + path), HasSubstr("put step"), HasSubstr(kReadOnly)));
  s = store->InsertExperiment(MakeExperiment("exp-2"), {MakeRun("exp-2", "baseline-s0")});
  EXPECT_THAT(s.message(), AllOf(HasSubstr("store " + path), HasSubstr(kReadOnly)));
  auto probe = store->PutProbe(run.summary.run_id(), MakeProbe(1));
  ASSERT_FALSE(probe.ok());
  EXPECT_THAT(probe.status().message(), AllOf(HasSubstr("store " + path), HasSubstr(kReadOnly)));
  EXPECT_THAT(store->StartAttempt(next, 1).message(), HasSubstr(kReadOnly));
  EXPECT_THAT(store->ApplyRunChanges({{next, 1, "lost"}}, nullptr, 1).message(), HasSubstr(kReadOnly));

  // Reads go on; nothing changed.
  EXPECT_EQ(StoredSteps(*store, run.summary.run_id()), std::vector<int64_t>{1});
  auto experiments = store->LoadExperiments();
  ASSERT_TRUE(experiments.ok());
  EXPECT_THAT(*experiments, SizeIs(1));
  EXPECT_TRUE(store->IntegrityCheck().ok());

  ASSERT_TRUE(store->ExecForTesting("PRAGMA query_only = 0").ok());
  EXPECT_TRUE(store->PutStep(next, MakeStep(2)).ok());
  EXPECT_EQ(StoredSteps(*store, run.summary.run_id()), (std::vector<int64_t>{1, 2}));
  store.reset();

  // A database that can only be opened read-only is refused at open, with the reason,
  // not at the first write. Read-only access as SQLite gets it for a 0444 file (as root,
  // file modes do not stop writes, so the URI asks for it explicitly).
  auto ro = Store::Open("file:" + path + "?mode=ro");
  ASSERT_FALSE(ro.ok());
  EXPECT_EQ(ro.status().code(), StatusCode::kUnavailable);
  EXPECT_THAT(ro.status().message(), AllOf(HasSubstr("store file:" + path), HasSubstr(kReadOnly)));
  if (geteuid() != 0) {
    ASSERT_EQ(chmod(path.c_str(), 0444), 0);
    auto opened = Store::Open(path);
    ASSERT_FALSE(opened.ok());
    EXPECT_THAT(opened.status().message(), AllOf(HasSubstr("store " + path), HasSubstr(kReadOnly)));
    ASSERT_EQ(chmod(path.c_str(), 0644), 0);
  }
  store = OpenStore(path);
  ASSERT_TRUE(store);
  EXPECT_TRUE(store->IntegrityCheck().ok());
  EXPECT_EQ(StoredSteps(*store, run.summary.run_id()), (std::vector<int64_t>{1, 2}));
}

TEST(StoreFailures, NotADatabaseIsDataLossNamingTheStore) {
  TempDir dir;
  const std::string path = dir.File("garbage.db");
  {
    std::ofstream f(path);
    f << std::string(4096, 'g');
  }
  auto store = Store::Open(path);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), StatusCode::kDataLoss);
  EXPECT_THAT(store.status().message(), AllOf(HasSubstr("store " + path), HasSubstr("file is not a database")));
  auto missing = Store::Open(dir.File("no/such/folder/store.db"));
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.status().message(), AllOf(HasSubstr("store "), HasSubstr("cannot open")));
}

TEST(Store, AStepWrittenIfAbsentKeepsTheStoredStep) {
  TempDir dir;
  RunRecord run;
  auto store = SeededStore(dir.File("store.db"), &run);
  ASSERT_TRUE(store);
  v1::StepMetrics other = MakeStep(1);
  other.set_loss(123);
  const v1::StepMetrics second = MakeStep(2);
  auto fresh = store->WriteReports({{Store::ReportWrite::kStepIfAbsent, &run.summary.run_id(), &other, nullptr},
                                    {Store::ReportWrite::kStepIfAbsent, &run.summary.run_id(), &second, nullptr}});
  ASSERT_TRUE(fresh.ok());
  auto steps = store->Steps(run.summary.run_id(), 0);
  ASSERT_TRUE(steps.ok());
  ASSERT_THAT(*steps, SizeIs(2));
  EXPECT_DOUBLE_EQ((*steps)[0].loss(), MakeStep(1).loss());
  auto runs = store->LoadRuns();
  ASSERT_TRUE(runs.ok());
  EXPECT_EQ((*runs)[0].summary.step(), 1);  // the run's row is left as it was
}

// WAL checkpoints run on the store's own thread, not inside the writer's COMMIT: a few
// hundred pages of steps (below SQLite's automatic 1,000-page checkpoint, which the store
// replaces) reach the database file within its one-second period, while the writer only
// appends to the WAL; reopened, everything written is there.
TEST(Store, CheckpointsRunOnTheStoresThreadNotInTheWritersCommit) {
  TempDir dir;
  const std::string path = dir.File("store.db");
  RunRecord run;
  auto store = SeededStore(path, &run);
  ASSERT_TRUE(store);
  // Settle the seed's own pages first.
  for (int i = 0; i < 50 && FileBytes(path + "-wal") > 0 && FileBytes(path) < 8192; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const int64_t before = FileBytes(path);
  std::vector<v1::StepMetrics> steps;
  for (int64_t s = 2; s < 12002; ++s) steps.push_back(MakeStep(s));  // ~0.9 MB of rows and index: 214 pages
  std::vector<Store::ReportWrite> writes;
  for (const v1::StepMetrics& m : steps) writes.push_back({Store::ReportWrite::kStep, &run.summary.run_id(), &m, nullptr});
  ASSERT_TRUE(store->WriteReports(writes).ok());
  EXPECT_GT(FileBytes(path + "-wal"), 1 << 18) << "the commit appended its pages to the WAL";
  EXPECT_LT(FileBytes(path), before + (1 << 18)) << "and did not checkpoint them itself";
  int64_t grown = 0;
  for (int i = 0; i < 40 && grown < (1 << 18); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    grown = FileBytes(path) - before;
  }
  EXPECT_GE(grown, 1 << 18) << "the checkpointer copied the pages into the database within its period";
  store.reset();
  store = OpenStore(path);
  ASSERT_TRUE(store);
  EXPECT_EQ(StoredSteps(*store, run.summary.run_id()).size(), 12001u);
  EXPECT_TRUE(store->IntegrityCheck().ok());
}

// A writer that commits without pause (ingest under load) never lets a checkpoint that runs
// beside it copy the whole WAL, and SQLite starts the WAL over only after such a copy: the
// WAL grew by everything written (600 MB in ten seconds of the load test). The store's
// thread copies what was appended during its copy again, and the last few frames with the
// writer held off, so the WAL starts over once past 128 MB. 384 MB of probe reports here,
// two to a commit, at 64 MB/s (the load test's 20,000 messages a second write about
// 60 MB/s): the WAL stays under 256 MB (it reached ~470 MB before).
TEST(Store, AWriterThatNeverPausesStillLetsTheWalStartOver) {
  TempDir dir;
  const std::string path = dir.File("store.db");
  RunRecord run;
  auto store = SeededStore(path, &run);
  ASSERT_TRUE(store);
  std::atomic<bool> done{false};
  std::atomic<int64_t> largest{0};
  std::thread watch([&] {
    while (!done.load()) {
      largest = std::max(largest.load(), FileBytes(path + "-wal"));
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  });
  const v1::ProbeReport probe = MakeProbe(0, 4, 256);
  const int64_t total = (int64_t{384} << 20) / static_cast<int64_t>(probe.ByteSizeLong());
  v1::ProbeReport a = probe, b = probe;
  const auto start = std::chrono::steady_clock::now();
  const auto per_commit = std::chrono::duration<double>(2.0 * static_cast<double>(probe.ByteSizeLong()) / (64 << 20));
  for (int64_t step = 1; step + 1 <= total; step += 2) {
    std::this_thread::sleep_until(start + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                              per_commit * static_cast<double>(step / 2)));
    a.set_step(step);
    b.set_step(step + 1);
    auto fresh = store->WriteReports({{Store::ReportWrite::kProbe, &run.summary.run_id(), nullptr, &a},
                                      {Store::ReportWrite::kProbe, &run.summary.run_id(), nullptr, &b}});
    ASSERT_TRUE(fresh.ok()) << fresh.status().ToString();
  }
  done = true;
  watch.join();
  EXPECT_LT(largest.load(), int64_t{256} << 20) << "the WAL started over instead of holding all "
                                                  << (total * probe.ByteSizeLong() >> 20) << " MB written";
  store.reset();
  store = OpenStore(path);
  ASSERT_TRUE(store);
  auto count = store->CountProbes(run.summary.run_id());
  ASSERT_TRUE(count.ok());
  EXPECT_EQ(*count, total / 2 * 2);
  EXPECT_TRUE(store->IntegrityCheck().ok());
}

// Steps go through an append-only inbox that the store's thread merges into step_rows;
// step_metrics is a view of both. Whatever is merged when, every reader — the store's
// own reads, and SQL on the view from another connection — sees the writes' semantics in
// arrival order: the last replacing write of a step wins, an if-absent write only fills
// a missing step. Checked on the view with the inbox unmerged (rows put there by hand),
// then after the merge a reopen does.
TEST(Store, StepsThroughTheInboxKeepTheOrderOfTheWrites) {
  TempDir dir;
  const std::string path = dir.File("store.db");
  RunRecord run;
  ASSERT_TRUE(SeededStore(path, &run));  // step 1 stored; closed (merged)
  const std::string& id = run.summary.run_id();
  auto metrics = [](int64_t step, double loss) {
    v1::StepMetrics m = MakeStep(step);
    m.set_loss(loss);
    return m.SerializeAsString();
  };
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  struct Row {
    int64_t step;
    double loss;
    int if_absent;
  };
  // Step 1 is stored (loss from MakeStep); in arrival order:
  const std::vector<Row> inbox = {
      {1, 11, 1},             // if absent: step 1 exists, no change
      {2, 21, 1}, {2, 22, 1}, // fills step 2 (the first); the second changes nothing
      {3, 31, 0}, {3, 32, 1}, // replaces, then if-absent: 31
      {4, 41, 1}, {4, 42, 0}, {4, 43, 0},  // fills, then two replacements: 43
      {5, 51, 0},             // a new step: 51
  };
  for (const Row& r : inbox) {
    sqlite3_stmt* q = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(db, "INSERT INTO step_inbox (run_id, step, metrics, if_absent) VALUES (?,?,?,?)", -1,
                                 &q, nullptr),
              SQLITE_OK);
    const std::string blob = metrics(r.step, r.loss);
    sqlite3_bind_text(q, 1, id.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(q, 2, r.step);
    sqlite3_bind_blob(q, 3, blob.data(), static_cast<int>(blob.size()), SQLITE_TRANSIENT);
    sqlite3_bind_int(q, 4, r.if_absent);
    ASSERT_EQ(sqlite3_step(q), SQLITE_DONE);
    sqlite3_finalize(q);
  }
  const std::vector<std::pair<int64_t, double>> want = {{1, MakeStep(1).loss()}, {2, 21}, {3, 31}, {4, 43}, {5, 51}};
  std::vector<std::pair<int64_t, double>> view;
  sqlite3_stmt* q = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT step, metrics FROM step_metrics WHERE run_id = ? ORDER BY step", -1, &q,
                               nullptr),
            SQLITE_OK);
  sqlite3_bind_text(q, 1, id.c_str(), -1, SQLITE_TRANSIENT);
  while (sqlite3_step(q) == SQLITE_ROW) {
    v1::StepMetrics m;
    ASSERT_TRUE(m.ParseFromArray(sqlite3_column_blob(q, 1), sqlite3_column_bytes(q, 1)));
    view.emplace_back(sqlite3_column_int64(q, 0), m.loss());
  }
  sqlite3_finalize(q);
  sqlite3_close(db);
  EXPECT_EQ(view, want) << "the view, inbox unmerged";

  auto store = OpenStore(path);  // merges the inbox
  ASSERT_TRUE(store);
  auto steps = store->Steps(id, 0);
  ASSERT_TRUE(steps.ok());
  std::vector<std::pair<int64_t, double>> merged;
  for (const v1::StepMetrics& m : *steps) merged.emplace_back(m.step(), m.loss());
  EXPECT_EQ(merged, want) << "after the merge";
  // More writes through the store, read at once (merged or not: the same answer).
  v1::StepMetrics again = MakeStep(5);
  again.set_loss(52);
  v1::StepMetrics late = MakeStep(6);
  late.set_loss(61);
  ASSERT_TRUE(store->WriteReports({{Store::ReportWrite::kStepIfAbsent, &id, &again, nullptr},
                                   {Store::ReportWrite::kStep, &id, &late, nullptr}})
                  .ok());
  steps = store->Steps(id, 5);
  ASSERT_TRUE(steps.ok());
  ASSERT_THAT(*steps, SizeIs(2));
  EXPECT_DOUBLE_EQ((*steps)[0].loss(), 51);
  EXPECT_DOUBLE_EQ((*steps)[1].loss(), 61);
  EXPECT_TRUE(store->IntegrityCheck().ok());
}

// What step_rows holds, read on a connection of the test's own: (run, step) -> loss.
std::map<std::pair<std::string, int64_t>, double> StepRows(const std::string& path) {
  std::map<std::pair<std::string, int64_t>, double> out;
  sqlite3* db = nullptr;
  EXPECT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* q = nullptr;
  EXPECT_EQ(sqlite3_prepare_v2(db, "SELECT run_id, step, metrics FROM step_rows", -1, &q, nullptr), SQLITE_OK);
  while (sqlite3_step(q) == SQLITE_ROW) {
    v1::StepMetrics m;
    EXPECT_TRUE(m.ParseFromArray(sqlite3_column_blob(q, 2), sqlite3_column_bytes(q, 2)));
    out[{reinterpret_cast<const char*>(sqlite3_column_text(q, 0)), sqlite3_column_int64(q, 1)}] = m.loss();
  }
  sqlite3_finalize(q);
  sqlite3_close(db);
  return out;
}

// Rows in step_inbox, on a connection of the test's own; -1 when it cannot be read.
int64_t InboxRows(const std::string& path) {
  sqlite3* db = nullptr;
  int64_t n = -1;
  if (sqlite3_open(path.c_str(), &db) == SQLITE_OK) {
    sqlite3_stmt* q = nullptr;
    if (sqlite3_prepare_v2(db, "SELECT COUNT(*) FROM step_inbox", -1, &q, nullptr) == SQLITE_OK &&
        sqlite3_step(q) == SQLITE_ROW) {
      n = sqlite3_column_int64(q, 0);
    }
    sqlite3_finalize(q);
  }
  sqlite3_close(db);
  return n;
}

// The store's thread merges the inbox a few runs at a time (so that a writer waits for one
// transaction, not the whole merge), with the writes' semantics: per (run, step) the first
// if-absent step fills a missing one, and the last replacing one wins.
TEST(Store, TheStoresThreadMergesRunByRunWithTheWritesSemantics) {
  TempDir dir;
  const std::string path = dir.File("store.db");
  auto store = OpenStore(path);
  ASSERT_TRUE(store);
  std::vector<RunRecord> runs;
  for (int r = 0; r < 30; ++r) runs.push_back(MakeRun("exp-1", "run-" + std::to_string(r)));
  ASSERT_TRUE(store->InsertExperiment(MakeExperiment("exp-1"), runs).ok());
  std::map<std::pair<std::string, int64_t>, double> want;
  // 30 runs x 40 steps x 3 writes: 3,600 rows, several of the merge's transactions. Each
  // step is written in one of four orders; `round` is the loss a write carries.
  for (int round = 0; round < 3; ++round) {
    std::vector<v1::StepMetrics> steps;
    std::vector<Store::ReportWrite> writes;
    steps.reserve(runs.size() * 40);
    for (const RunRecord& run : runs) {
      for (int64_t step = 1; step <= 40; ++step) {
        v1::StepMetrics m = MakeStep(step);
        m.set_loss(round);
        steps.push_back(m);
        // step % 4: 0 replace always (last wins: 2); 1 if-absent always (first: 0);
        // 2 replace then if-absent (0); 3 if-absent then replace (1, 2).
        const int order = static_cast<int>(step % 4);
        const bool if_absent = order == 1 || (order == 2 && round > 0) || (order == 3 && round == 0);
        writes.push_back({if_absent ? Store::ReportWrite::kStepIfAbsent : Store::ReportWrite::kStep,
                          &run.summary.run_id(), &steps.back(), nullptr});
        want[{run.summary.run_id(), step}] = order == 1 || order == 2 ? 0 : 2;
      }
    }
    ASSERT_TRUE(store->WriteReports(writes).ok());
  }
  // Merged by the store's thread (nothing here reads through the store).
  for (int i = 0; i < 100 && InboxRows(path) != 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ASSERT_EQ(InboxRows(path), 0) << "the store's thread merged the inbox";
  EXPECT_EQ(StepRows(path), want);
  EXPECT_TRUE(store->IntegrityCheck().ok());
}

// The store's merge runs out of room partway (a full disk: PRAGMA max_page_count): the
// runs it moved are in step_rows and still in the inbox, the rest only in the inbox. Reads
// show every step once with its last value meanwhile; with room again the merge is retried
// and loses nothing.
TEST(StoreFailures, AMergeThatFailsPartwayLosesNothingAndIsRetried) {
  TempDir dir;
  const std::string path = dir.File("store.db");
  auto store = OpenStore(path);
  ASSERT_TRUE(store);
  std::vector<RunRecord> runs;
  for (int r = 0; r < 30; ++r) runs.push_back(MakeRun("exp-1", "run-" + std::to_string(r)));
  ASSERT_TRUE(store->InsertExperiment(MakeExperiment("exp-1"), runs).ok());
  std::map<std::pair<std::string, int64_t>, double> want;
  auto write = [&](int64_t first, int64_t last, double loss) {
    std::vector<v1::StepMetrics> steps;
    std::vector<Store::ReportWrite> writes;
    steps.reserve(runs.size() * static_cast<size_t>(last - first + 1));
    for (const RunRecord& run : runs) {
      for (int64_t step = first; step <= last; ++step) {
        steps.push_back(MakeStep(step));
        steps.back().set_loss(loss);
        writes.push_back({Store::ReportWrite::kStep, &run.summary.run_id(), &steps.back(), nullptr});
        want[{run.summary.run_id(), step}] = loss;
      }
    }
    return store->WriteReports(writes).ok();
  };
  auto page_count = [&] {
    sqlite3* db = nullptr;
    int64_t n = -1;
    if (sqlite3_open(path.c_str(), &db) == SQLITE_OK) {
      sqlite3_stmt* q = nullptr;
      if (sqlite3_prepare_v2(db, "PRAGMA page_count", -1, &q, nullptr) == SQLITE_OK && sqlite3_step(q) == SQLITE_ROW) {
        n = sqlite3_column_int64(q, 0);
      }
      sqlite3_finalize(q);
    }
    sqlite3_close(db);
    return n;
  };
  auto wait_merged = [&](int tries) {
    for (int i = 0; i < tries && InboxRows(path) != 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    return InboxRows(path) == 0;
  };
  ASSERT_TRUE(write(1, 100, 1));  // 3,000 steps, merged: the inbox's pages are then free
  ASSERT_TRUE(wait_merged(100));
  // Room for the next steps in the inbox, not for all of them in step_rows as well.
  const int64_t pages = page_count();
  ASSERT_GT(pages, 0);
  ASSERT_TRUE(store->ExecForTesting("PRAGMA max_page_count = " + std::to_string(pages + 8)).ok());
  ASSERT_TRUE(write(50, 149, 2));  // 50..100 replaced, 101..149 new
  std::this_thread::sleep_for(std::chrono::milliseconds(800));
  ASSERT_GT(InboxRows(path), 0) << "the merge ran out of room (else the test's room is too large)";
  const auto partial = StepRows(path);
  int moved = 0;
  for (const auto& [key, loss] : partial) moved += loss == 2;
  EXPECT_GT(moved, 0) << "the merge's first transactions fit (else it did not fail partway)";
  // Meanwhile reads show each step once, with its last value (the view).
  for (const RunRecord& run : {runs.front(), runs.back()}) {
    auto steps = store->Steps(run.summary.run_id(), 0);
    ASSERT_TRUE(steps.ok()) << steps.status().ToString();
    ASSERT_THAT(*steps, SizeIs(149));
    for (const v1::StepMetrics& m : *steps) EXPECT_EQ(m.loss(), m.step() < 50 ? 1 : 2) << "step " << m.step();
  }
  // Room again: the store's thread retries (every 2 s after a failure) and loses nothing.
  ASSERT_TRUE(store->ExecForTesting("PRAGMA max_page_count = 1073741823").ok());
  ASSERT_TRUE(wait_merged(100)) << "the merge was retried";
  EXPECT_EQ(StepRows(path), want);
  EXPECT_TRUE(store->IntegrityCheck().ok());
}

// A whole merge (a reader's) can take the inbox while the store's thread is between two of
// its transactions: what that thread read is then stale, and must be neither applied (it
// would undo later steps) nor deleted by its sequence numbers (the inbox's numbers start
// over once it is empty: it would delete later steps). A writer writes without pause, each
// batch a new step per run and a replacement of one of 20 steps rewritten in turn, while a
// reader merges and checks that no replaced step goes back to an earlier value; every step
// ends as last written.
TEST(Store, AReadersMergeDuringTheStoresMergeLosesNoWrite) {
  TempDir dir;
  const std::string path = dir.File("store.db");
  auto store = OpenStore(path);
  ASSERT_TRUE(store);
  std::vector<RunRecord> runs;
  for (int r = 0; r < 64; ++r) runs.push_back(MakeRun("exp-1", "run-" + std::to_string(r)));
  ASSERT_TRUE(store->InsertExperiment(MakeExperiment("exp-1"), runs).ok());
  constexpr int64_t kRewritten = 20;  // steps 1..20 are replaced in turn; 1000+ are new ones
  std::atomic<bool> stop{false};
  std::map<std::pair<std::string, int64_t>, double> want;
  std::thread writer([&] {
    for (int batch = 0; !stop.load(); ++batch) {
      std::vector<v1::StepMetrics> steps;
      std::vector<Store::ReportWrite> writes;
      steps.reserve(2 * runs.size());
      for (const RunRecord& run : runs) {
        for (const int64_t step : {batch % kRewritten + 1, 1000 + int64_t{batch}}) {
          steps.push_back(MakeStep(step));
          steps.back().set_loss(batch);
          writes.push_back({Store::ReportWrite::kStep, &run.summary.run_id(), &steps.back(), nullptr});
          want[{run.summary.run_id(), step}] = batch;
        }
      }
      ASSERT_TRUE(store->WriteReports(writes).ok());
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  int went_back = 0;
  std::thread reader([&] {
    std::map<std::pair<std::string, int64_t>, double> seen;
    for (int i = 0; !stop.load(); ++i) {
      const std::string& run = runs[i % 4].summary.run_id();
      auto steps = store->Steps(run, 1, kRewritten);  // merges the inbox
      ASSERT_TRUE(steps.ok()) << steps.status().ToString();
      for (const v1::StepMetrics& m : *steps) {
        double& last = seen[{run, m.step()}];
        if (m.loss() < last) ++went_back;
        last = m.loss();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(40 + 13 * (i % 7)));
    }
  });
  std::this_thread::sleep_for(std::chrono::seconds(3));
  stop = true;
  writer.join();
  reader.join();
  EXPECT_EQ(went_back, 0) << "reads of a step that went back to an earlier value";
  for (int i = 0; i < 100 && InboxRows(path) != 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ASSERT_EQ(InboxRows(path), 0) << "the store's thread merged the inbox";
  const auto stored = StepRows(path);
  int wrong = 0;
  for (const auto& [key, loss] : want) {
    auto it = stored.find(key);
    if (it == stored.end() || it->second != loss) ++wrong;
  }
  EXPECT_EQ(wrong, 0) << "of " << want.size() << " steps, not as last written";
  EXPECT_EQ(stored.size(), want.size());
  EXPECT_TRUE(store->IntegrityCheck().ok());
}

// A version-1 store (step_metrics a table) as an earlier coordinator left it: opened, it is
// migrated with its steps, which read as before and take new ones; a store of a newer
// version is refused and left byte for byte as it was.
TEST(Store, AVersionOneStoreMigratesWithItsStepsAndANewerOneIsLeftAlone) {
  TempDir dir;
  const std::string path = dir.File("v1.db");
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  const char* v1 = R"sql(
    PRAGMA journal_mode=WAL;
    CREATE TABLE experiments (id TEXT PRIMARY KEY, name TEXT NOT NULL, number INTEGER NOT NULL,
      created_ms INTEGER NOT NULL, cancelled INTEGER NOT NULL DEFAULT 0, summary BLOB NOT NULL);
    CREATE TABLE runs (id TEXT PRIMARY KEY, experiment_id TEXT NOT NULL REFERENCES experiments(id),
      state INTEGER NOT NULL, restarts INTEGER NOT NULL DEFAULT 0, finished_ms INTEGER NOT NULL DEFAULT 0,
      summary BLOB NOT NULL);
    CREATE INDEX runs_by_experiment ON runs(experiment_id);
    CREATE TABLE attempts (run_id TEXT NOT NULL REFERENCES runs(id), attempt INTEGER NOT NULL,
      worker_id TEXT NOT NULL, started_ms INTEGER NOT NULL, start_step INTEGER NOT NULL, ended_ms INTEGER,
      end_step INTEGER, outcome TEXT, PRIMARY KEY (run_id, attempt));
    CREATE TABLE step_metrics (run_id TEXT NOT NULL REFERENCES runs(id), step INTEGER NOT NULL,
      metrics BLOB NOT NULL, PRIMARY KEY (run_id, step));
    CREATE TABLE probe_reports (run_id TEXT NOT NULL REFERENCES runs(id), step INTEGER NOT NULL,
      report BLOB NOT NULL, PRIMARY KEY (run_id, step));
    CREATE TABLE schema_version (version INTEGER NOT NULL);
    INSERT INTO schema_version VALUES (1);
    INSERT INTO experiments VALUES ('old-1', 'old', 1, 0, 0, x'');
    INSERT INTO runs VALUES ('old-1-baseline-s0', 'old-1', 2, 0, 0, x'');
  )sql";
  ASSERT_EQ(sqlite3_exec(db, v1, nullptr, nullptr, nullptr), SQLITE_OK) << sqlite3_errmsg(db);
  for (int64_t s = 1; s <= 3; ++s) {
    sqlite3_stmt* q = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(db, "INSERT INTO step_metrics VALUES ('old-1-baseline-s0', ?, ?)", -1, &q, nullptr),
              SQLITE_OK);
    const std::string blob = MakeStep(s).SerializeAsString();
    sqlite3_bind_int64(q, 1, s);
    sqlite3_bind_blob(q, 2, blob.data(), static_cast<int>(blob.size()), SQLITE_TRANSIENT);
    ASSERT_EQ(sqlite3_step(q), SQLITE_DONE);
    sqlite3_finalize(q);
  }
  sqlite3_close(db);
  {
    auto store = OpenStore(path);
    ASSERT_TRUE(store);
    EXPECT_EQ(store->schema_version(), Store::kSchemaVersion);
    const std::string id = "old-1-baseline-s0";
    EXPECT_EQ(StoredSteps(*store, id), (std::vector<int64_t>{1, 2, 3}));
    const v1::StepMetrics four = MakeStep(4);
    ASSERT_TRUE(store->WriteReports({{Store::ReportWrite::kStep, &id, &four, nullptr}}).ok());
    EXPECT_EQ(StoredSteps(*store, id), (std::vector<int64_t>{1, 2, 3, 4}));
    // A step of a run the store does not hold is refused, as it was before the inbox.
    const std::string nobody = "nobody-1-baseline-s0";
    EXPECT_FALSE(store->WriteReports({{Store::ReportWrite::kStep, &nobody, &four, nullptr}}).ok());
    EXPECT_TRUE(store->IntegrityCheck().ok());
  }

  // A newer schema: refused, and nothing written (no merge, no migration, no checkpoint).
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "UPDATE schema_version SET version = 99", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);  // the last connection: the WAL is checkpointed away
  auto read_all = [](const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };
  const std::string before = read_all(path);
  auto newer = Store::Open(path);
  ASSERT_FALSE(newer.ok());
  EXPECT_EQ(newer.status().code(), StatusCode::kFailedPrecondition) << newer.status().ToString();
  EXPECT_EQ(read_all(path), before) << "the newer store's file is left as it was";
}

// --- the coordinator over a failing store ------------------------------------------------

// Records what the coordinator sends to one worker.
class FakeWriter final : public SessionWriter {
 public:
  bool Send(const v1::CoordinatorMessage& m) override {
    std::lock_guard<std::mutex> lock(mu_);
    sent_.push_back(m);
    return true;
  }
  std::vector<v1::CoordinatorMessage> Take() {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<v1::CoordinatorMessage> out;
    out.swap(sent_);
    return out;
  }
  void ExpectProbes(const std::string& run_id, int every, int64_t total_steps) override {
    std::lock_guard<std::mutex> lock(mu_);
    cadence_ = run_id + " every " + std::to_string(every) + " of " + std::to_string(total_steps);
  }
  // What ExpectProbes said last ("" until it is called); cleared.
  std::string TakeCadence() {
    std::lock_guard<std::mutex> lock(mu_);
    std::string out;
    out.swap(cadence_);
    return out;
  }

 private:
  std::mutex mu_;
  std::vector<v1::CoordinatorMessage> sent_;
  std::string cadence_;
};

v1::Experiment TinyExperiment(const std::string& name) {
  auto e = ParseExperimentText("name: " + name +
                                   "\n"
                                   "model: {layers: 2, d_model: 32, heads: 2, kv_heads: 1, context: 32}\n"
                                   "data: {text: {paths: [/nonexistent/corpus]}}\n"
                                   "train: {steps: 20}\n"
                                   "probe: {every: 5, ref_span: 15, profile_len: 16, t_eps: 16}\n"
                                   "arms: [baseline]\n",
                               "t.yaml");
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return *e;
}

v1::WorkerMessage Register(const std::string& run_id = "", int attempt = 0) {
  v1::WorkerMessage m;
  m.mutable_register_()->set_worker_id("worker-a");
  m.mutable_register_()->mutable_capabilities()->set_device(v1::CPU);
  m.mutable_register_()->mutable_capabilities()->set_device_count(1);
  m.mutable_register_()->set_run_id(run_id);
  m.mutable_register_()->set_attempt(attempt);
  return m;
}

v1::WorkerMessage Progress(const std::string& run_id, int64_t step) {
  v1::WorkerMessage m;
  m.mutable_progress()->set_run_id(run_id);
  m.mutable_progress()->set_attempt(1);
  *m.mutable_progress()->mutable_metrics() = MakeStep(step);
  return m;
}

v1::WorkerMessage Probe(const std::string& run_id, int64_t step) {
  v1::WorkerMessage m;
  m.mutable_probe()->set_run_id(run_id);
  m.mutable_probe()->set_attempt(1);
  m.mutable_probe()->set_sequence(step);
  *m.mutable_probe()->mutable_report() = MakeProbe(step, 2, 16);  // TinyExperiment: 2 layers, P = 16
  return m;
}

struct Acks {
  std::vector<int64_t> probes, progress;
  int outcomes = 0, assignments = 0, cancels = 0;
};
Acks Sorted(const std::vector<v1::CoordinatorMessage>& sent) {
  Acks a;
  for (const auto& m : sent) {
    if (m.has_ack() && m.ack().sequence() != 0) a.probes.push_back(m.ack().sequence());
    if (m.has_ack() && m.ack().progress_step() != 0) a.progress.push_back(m.ack().progress_step());
    if (m.has_ack() && m.ack().outcome()) ++a.outcomes;
    a.assignments += m.has_assignment();
    a.cancels += m.has_cancel();
  }
  return a;
}

class CoordinatorOverStore : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_.File("store.db");
    store_ = OpenStore(path_);
    ASSERT_TRUE(store_);
    auto exporter = Exporter::Start("", std::chrono::seconds(600));
    ASSERT_TRUE(exporter.ok());
    exporter_ = std::move(*exporter);
    StartCoordinator();
  }
  void StartCoordinator(double lease_seconds = 10) {
    Coordinator::Options options;
    options.lease_seconds = lease_seconds;
    options.check_data_paths = false;
    options.checkpoint_root = dir_.File("checkpoints");
    options.clock = &clock_;  // leases move only when a test advances it
    auto c = Coordinator::Create(store_.get(), exporter_.get(), options);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    coordinator_ = std::move(*c);
  }
  // Submits the tiny experiment and registers a worker, which is assigned its run.
  std::string SubmitAndAssign() {
    auto r = coordinator_->Submit(TinyExperiment("tiny"));
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    session_ = coordinator_->OpenSession(writer_);
    coordinator_->OnWorkerMessage(session_, Register());
    const auto sent = writer_->Take();
    EXPECT_EQ(Sorted(sent).assignments, 1);
    EXPECT_TRUE(sent.at(0).registered().acks_progress());
    return r.ok() ? r->run_ids(0) : "";
  }

  TempDir dir_;
  std::string path_;
  std::unique_ptr<Store> store_;
  std::unique_ptr<Exporter> exporter_;
  ManualClock clock_;  // before coordinator_, which uses it
  std::unique_ptr<Coordinator> coordinator_;
  std::shared_ptr<FakeWriter> writer_ = std::make_shared<FakeWriter>();
  int64_t session_ = 0;
};

TEST_F(CoordinatorOverStore, AcksOnlyWhatIsStoredSoTheWorkerWritesTheRestAgain) {
  const std::string run = SubmitAndAssign();
  coordinator_->OnWorkerMessage(session_, Progress(run, 1));
  coordinator_->OnWorkerMessage(session_, Probe(run, 1));
  Acks a = Sorted(writer_->Take());
  EXPECT_EQ(a.progress, std::vector<int64_t>{1});
  EXPECT_EQ(a.probes, std::vector<int64_t>{1});

  // The store stops taking writes: neither the step nor the probe report is acked.
  ASSERT_TRUE(store_->ExecForTesting("PRAGMA query_only = 1").ok());
  coordinator_->OnWorkerMessage(session_, Progress(run, 2));
  coordinator_->OnWorkerMessage(session_, Probe(run, 5));
  a = Sorted(writer_->Take());
  EXPECT_THAT(a.progress, IsEmpty());
  EXPECT_THAT(a.probes, IsEmpty());

  // Writes work again; the worker writes both again (on its next connection), twice even:
  // each is stored once and acked each time.
  ASSERT_TRUE(store_->ExecForTesting("PRAGMA query_only = 0").ok());
  for (int i = 0; i < 2; ++i) {
    coordinator_->OnWorkerMessage(session_, Progress(run, 2));
    coordinator_->OnWorkerMessage(session_, Probe(run, 5));
  }
  a = Sorted(writer_->Take());
  EXPECT_EQ(a.progress, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(a.probes, (std::vector<int64_t>{5, 5}));
  EXPECT_EQ(StoredSteps(*store_, run), (std::vector<int64_t>{1, 2}));
  auto probes = store_->Probes(run, 0);
  ASSERT_TRUE(probes.ok());
  ASSERT_THAT(*probes, SizeIs(2));
  EXPECT_EQ((*probes)[1].step(), 5);
  auto summary = coordinator_->GetExperiment("tiny-1", false);
  ASSERT_TRUE(summary.ok());
  EXPECT_EQ(summary->runs(0).probe_reports(), 2);
  EXPECT_EQ(summary->runs(0).step(), 2);
  EXPECT_TRUE(store_->IntegrityCheck().ok());
}

TEST_F(CoordinatorOverStore, SubmitAndCancelOnAFailingStoreChangeNothing) {
  ASSERT_TRUE(store_->ExecForTesting("PRAGMA query_only = 1").ok());
  auto r = coordinator_->Submit(TinyExperiment("tiny"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kUnavailable);
  EXPECT_THAT(r.status().message(), AllOf(HasSubstr("store " + path_), HasSubstr(kReadOnly)));
  EXPECT_EQ(coordinator_->ListExperiments(0).experiments_size(), 0);
  ASSERT_TRUE(store_->ExecForTesting("PRAGMA query_only = 0").ok());

  r = coordinator_->Submit(TinyExperiment("tiny"));
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(store_->ExecForTesting("PRAGMA max_page_count = 1").ok());
  auto big = TinyExperiment("big");
  for (int i = 1; i < kMaxRunsPerExperiment; ++i) big.add_seeds(i);  // 256 runs do not fit
  auto full = coordinator_->Submit(big);
  ASSERT_FALSE(full.ok());
  EXPECT_EQ(full.status().code(), StatusCode::kResourceExhausted);
  EXPECT_THAT(full.status().message(), AllOf(HasSubstr("store " + path_), HasSubstr(kDiskFull)));
  EXPECT_EQ(coordinator_->ListExperiments(0).experiments_size(), 1);
  ASSERT_TRUE(store_->ExecForTesting("PRAGMA max_page_count = 1073741823").ok());

  // A cancel that cannot be stored is refused and leaves the experiment active.
  ASSERT_TRUE(store_->ExecForTesting("PRAGMA query_only = 1").ok());
  auto cancelled = coordinator_->Cancel(r->experiment_id());
  ASSERT_FALSE(cancelled.ok());
  EXPECT_THAT(cancelled.status().message(), HasSubstr(kReadOnly));
  ASSERT_TRUE(store_->ExecForTesting("PRAGMA query_only = 0").ok());
  auto summary = coordinator_->GetExperiment(r->experiment_id(), false);
  ASSERT_TRUE(summary.ok());
  EXPECT_EQ(summary->state(), v1::ACTIVE);
  EXPECT_EQ(summary->runs(0).state(), v1::QUEUED);
  cancelled = coordinator_->Cancel(r->experiment_id());
  ASSERT_TRUE(cancelled.ok()) << cancelled.status().ToString();
  EXPECT_EQ(cancelled->state(), v1::EXPERIMENT_CANCELLED);
  EXPECT_TRUE(store_->IntegrityCheck().ok());
}

// A session reads on at once after a probe step's Progress (its report follows right
// behind), so it must know its run's probe cadence: from the coordinator, when the run is
// assigned and when its worker comes back on a new session.
TEST_F(CoordinatorOverStore, ASessionLearnsItsRunsProbeCadenceWhenAssignedAndWhenItsWorkerReturns) {
  const std::string run = SubmitAndAssign();
  EXPECT_EQ(writer_->TakeCadence(), run + " every 5 of 20");  // TinyExperiment
  coordinator_->OnWorkerMessage(session_, Progress(run, 1));
  coordinator_->CloseSession(session_);
  // The worker comes back on a new stream: that session is told, the closed one is not.
  auto returned = std::make_shared<FakeWriter>();
  session_ = coordinator_->OpenSession(returned);
  EXPECT_EQ(returned->TakeCadence(), "");
  coordinator_->OnWorkerMessage(session_, Register(run, 1));
  EXPECT_EQ(returned->TakeCadence(), run + " every 5 of 20");
  EXPECT_EQ(writer_->TakeCadence(), "");
}

TEST_F(CoordinatorOverStore, RestartedOnTheSameStoreTheRunCarriesOnUnderItsAttempt) {
  const std::string run = SubmitAndAssign();
  for (int step = 1; step <= 5; ++step) coordinator_->OnWorkerMessage(session_, Progress(run, step));
  coordinator_->OnWorkerMessage(session_, Probe(run, 5));
  writer_->Take();
  // The coordinator dies (no goodbye to anyone) and starts again on the same store.
  coordinator_.reset();
  StartCoordinator();
  auto summary = coordinator_->GetExperiment("tiny-1", false);
  ASSERT_TRUE(summary.ok());
  EXPECT_EQ(summary->runs(0).state(), v1::RUNNING);
  EXPECT_EQ(summary->runs(0).step(), 5);
  EXPECT_EQ(summary->runs(0).probe_reports(), 1);
  // The worker comes back mid-run; the messages lost in flight (steps 6 and 7) and the
  // unacked ones are written again, older steps after newer ones included.
  session_ = coordinator_->OpenSession(writer_);
  coordinator_->OnWorkerMessage(session_, Register(run, 1));
  coordinator_->Tick();  // the recovered lease is still held: no requeue
  for (int64_t step : {7, 6, 8}) coordinator_->OnWorkerMessage(session_, Progress(run, step));
  coordinator_->OnWorkerMessage(session_, Probe(run, 5));  // stored before, not acked: once
  for (int64_t step = 9; step <= 20; ++step) coordinator_->OnWorkerMessage(session_, Progress(run, step));
  v1::WorkerMessage finished;
  finished.mutable_finished()->set_run_id(run);
  finished.mutable_finished()->set_attempt(1);
  finished.mutable_finished()->set_step(20);
  coordinator_->OnWorkerMessage(session_, finished);
  coordinator_->OnWorkerMessage(session_, finished);  // written again: acked, nothing else
  Acks a = Sorted(writer_->Take());
  EXPECT_EQ(a.cancels, 0);
  EXPECT_EQ(a.assignments, 0);
  std::vector<int64_t> acked = {7, 6, 8}, all;
  for (int64_t step = 9; step <= 20; ++step) acked.push_back(step);
  for (int64_t step = 1; step <= 20; ++step) all.push_back(step);
  EXPECT_EQ(a.progress, acked);
  EXPECT_EQ(a.probes, std::vector<int64_t>{5});
  EXPECT_EQ(a.outcomes, 2);
  EXPECT_EQ(StoredSteps(*store_, run), all);
  summary = coordinator_->GetExperiment("tiny-1", false);
  ASSERT_TRUE(summary.ok());
  EXPECT_EQ(summary->state(), v1::COMPLETED);
  EXPECT_EQ(summary->runs(0).attempt(), 1);
  EXPECT_EQ(summary->runs(0).probe_reports(), 1);
  auto count = store_->CountProbes(run);
  ASSERT_TRUE(count.ok());
  EXPECT_EQ(*count, 1);
}

TEST_F(CoordinatorOverStore, AStalledCoordinatorExtendsLeasesInsteadOfBlamingTheWorker) {
  StartCoordinator(/*lease_seconds=*/1.2);
  const std::string run = SubmitAndAssign();
  coordinator_->Tick();
  // The coordinator itself stalls (a slow store write, a paused process) past the lease;
  // the worker's heartbeats would be queued behind it.
  clock_.Advance(std::chrono::milliseconds(1500));
  coordinator_->Tick();
  auto summary = coordinator_->GetExperiment("tiny-1", false);
  ASSERT_TRUE(summary.ok());
  EXPECT_EQ(summary->runs(0).state(), v1::RUNNING);
  EXPECT_EQ(summary->runs(0).attempt(), 1);
  EXPECT_EQ(Sorted(writer_->Take()).cancels, 0);
  // Ticking on time with no word from the worker, the extended lease still lapses.
  for (int tick = 0; tick < 30 && Sorted(writer_->Take()).cancels == 0; ++tick) {
    clock_.Advance(std::chrono::milliseconds(100));
    coordinator_->Tick();
  }
  summary = coordinator_->GetExperiment("tiny-1", false);
  ASSERT_TRUE(summary.ok());
  // The lapsed run is queued again, not handed straight back to the worker that lost it:
  // that worker gets work only once it is heard from again.
  EXPECT_EQ(summary->runs(0).state(), v1::QUEUED) << "the lease never lapsed";
  EXPECT_EQ(summary->runs(0).message(),
            "requeued after worker worker-a was lost at step 0; waiting: all 1 CPU worker(s) are busy");
  coordinator_->Tick();
  EXPECT_EQ(Sorted(writer_->Take()).assignments, 0);
  v1::WorkerMessage heartbeat;
  heartbeat.mutable_heartbeat()->set_run_id(run);
  coordinator_->OnWorkerMessage(session_, heartbeat);
  coordinator_->Tick();
  EXPECT_EQ(Sorted(writer_->Take()).assignments, 1);
  summary = coordinator_->GetExperiment("tiny-1", false);
  ASSERT_TRUE(summary.ok());
  EXPECT_EQ(summary->runs(0).attempt(), 2);
}

TEST_F(CoordinatorOverStore, RefusesWorkerMessagesOutsideTheRun) {
  const std::string run = SubmitAndAssign();
  coordinator_->OnWorkerMessage(session_, Progress(run, 0));
  coordinator_->OnWorkerMessage(session_, Progress(run, 21));  // train.steps is 20
  coordinator_->OnWorkerMessage(session_, Progress("no-such-run", 3));
  v1::WorkerMessage probe = Probe(run, 5);
  probe.mutable_probe()->mutable_report()->add_layers();  // 3 layers, the model has 2
  coordinator_->OnWorkerMessage(session_, probe);
  coordinator_->OnWorkerMessage(session_, Probe(run, 25));
  Acks a = Sorted(writer_->Take());
  EXPECT_EQ(a.progress, (std::vector<int64_t>{21, 3}));  // refused for good: the worker may forget them
  EXPECT_EQ(a.probes, (std::vector<int64_t>{5, 25}));
  EXPECT_THAT(StoredSteps(*store_, run), IsEmpty());
  auto count = store_->CountProbes(run);
  ASSERT_TRUE(count.ok());
  EXPECT_EQ(*count, 0);
}

// --- only the lease holder reports ----------------------------------------------------------

// Refusals sent to one session: reason per kind of message.
std::vector<std::string> Refusals(const std::vector<v1::CoordinatorMessage>& sent) {
  std::vector<std::string> out;
  for (const auto& m : sent) {
    if (m.has_ack() && !m.ack().refused().empty()) out.push_back(m.ack().refused());
  }
  return out;
}

TEST_F(CoordinatorOverStore, OnlyTheSessionHoldingTheLeaseMayReport) {
  const std::string run = SubmitAndAssign();  // worker-a holds attempt 1
  auto intruder_writer = std::make_shared<FakeWriter>();
  const int64_t intruder = coordinator_->OpenSession(intruder_writer);
  v1::WorkerMessage reg = Register();
  reg.mutable_register_()->set_worker_id("worker-b");
  coordinator_->OnWorkerMessage(intruder, reg);
  intruder_writer->Take();
  // Everything another session says about worker-a's run, with the right attempt number.
  coordinator_->OnWorkerMessage(intruder, Progress(run, 1));
  coordinator_->OnWorkerMessage(intruder, Probe(run, 1));
  v1::WorkerMessage finished;
  finished.mutable_finished()->set_run_id(run);
  finished.mutable_finished()->set_attempt(1);
  finished.mutable_finished()->set_step(20);
  coordinator_->OnWorkerMessage(intruder, finished);
  v1::WorkerMessage failed;
  failed.mutable_failed()->set_run_id(run);
  failed.mutable_failed()->set_attempt(1);
  failed.mutable_failed()->set_reason(v1::NUMERICAL);
  failed.mutable_failed()->set_message("made up");
  coordinator_->OnWorkerMessage(intruder, failed);
  v1::WorkerMessage released;
  released.mutable_released()->set_run_id(run);
  released.mutable_released()->set_attempt(1);
  coordinator_->OnWorkerMessage(intruder, released);
  const auto refusals = Refusals(intruder_writer->Take());
  ASSERT_EQ(refusals.size(), 5u);
  for (const std::string& why : refusals) {
    EXPECT_EQ(why, "this session does not hold the run's lease (held by worker worker-a)");
  }
  EXPECT_THAT(StoredSteps(*store_, run), IsEmpty());
  auto count = store_->CountProbes(run);
  ASSERT_TRUE(count.ok());
  EXPECT_EQ(*count, 0);
  auto summary = coordinator_->GetExperiment("tiny-1", false);
  ASSERT_TRUE(summary.ok());
  EXPECT_EQ(summary->runs(0).state(), v1::RUNNING);
  EXPECT_EQ(summary->runs(0).worker_id(), "worker-a");

  // A Register naming the run cannot take its lease; the holder carries on.
  v1::WorkerMessage take = Register(run, 1);
  take.mutable_register_()->set_worker_id("worker-b");
  coordinator_->OnWorkerMessage(intruder, take);
  const auto sent = intruder_writer->Take();
  ASSERT_EQ(Sorted(sent).cancels, 1);
  for (const auto& m : sent) {
    if (m.has_cancel()) {
      EXPECT_EQ(m.cancel().reason(), "the run's lease belongs to worker worker-a");
    }
  }
  coordinator_->OnWorkerMessage(session_, Progress(run, 1));
  EXPECT_EQ(Sorted(writer_->Take()).progress, std::vector<int64_t>{1});
  EXPECT_THAT(StoredSteps(*store_, run), SizeIs(1));
}

TEST_F(CoordinatorOverStore, AStaleAttemptStoresNothing) {
  StartCoordinator(/*lease_seconds=*/0.3);
  const std::string run = SubmitAndAssign();
  coordinator_->OnWorkerMessage(session_, Progress(run, 1));
  writer_->Take();
  // The lease lapses; a second worker gets attempt 2.
  clock_.Advance(std::chrono::milliseconds(400));
  auto other_writer = std::make_shared<FakeWriter>();
  const int64_t other = coordinator_->OpenSession(other_writer);
  v1::WorkerMessage reg = Register();
  reg.mutable_register_()->set_worker_id("worker-b");
  coordinator_->OnWorkerMessage(other, reg);
  coordinator_->Tick();
  EXPECT_EQ(Sorted(other_writer->Take()).assignments, 1) << "the lapsed run goes to the healthy worker";
  EXPECT_EQ(Sorted(writer_->Take()).assignments, 0) << "not back to the worker that lost it";
  // The first worker, late, reports steps 2 and 3 of attempt 1: refused, nothing stored.
  coordinator_->OnWorkerMessage(session_, Progress(run, 2));
  coordinator_->OnWorkerMessage(session_, Probe(run, 5));
  const auto refusals = Refusals(writer_->Take());
  ASSERT_EQ(refusals.size(), 2u);
  EXPECT_EQ(refusals[0], "attempt 1 is not the run's current attempt 2");
  EXPECT_THAT(StoredSteps(*store_, run), SizeIs(1));
}

TEST_F(CoordinatorOverStore, WorkTooBigForEveryWorkerIsRefusedAtSubmission) {
  session_ = coordinator_->OpenSession(writer_);
  v1::WorkerMessage reg = Register();
  reg.mutable_register_()->mutable_capabilities()->set_memory_bytes(int64_t{8} << 30);  // 8 GiB
  coordinator_->OnWorkerMessage(session_, reg);
  v1::Experiment huge = TinyExperiment("huge");
  huge.mutable_model()->set_layers(200);
  huge.mutable_model()->set_d_model(65536);
  huge.mutable_model()->set_ffn(262144);
  huge.mutable_model()->set_heads(512);
  huge.mutable_model()->set_kv_heads(512);
  huge.mutable_model()->set_head_dim(128);
  auto r = coordinator_->Submit(huge);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(),
              AllOf(HasSubstr("model: 13.7T parameters need about"), HasSubstr("16 B per parameter"),
                    HasSubstr("the largest connected CPU worker has 8.0 GiB")));
  EXPECT_EQ(coordinator_->ListExperiments(0).experiments_size(), 0);

  // The coordinator's own limit applies with no worker connected too.
  coordinator_->CloseSession(session_);
  Coordinator::Options options;
  options.check_data_paths = false;
  options.max_run_bytes = int64_t{1} << 20;
  auto limited = Coordinator::Create(store_.get(), exporter_.get(), options);
  ASSERT_TRUE(limited.ok());
  auto small = (*limited)->Submit(TinyExperiment("small"));
  ASSERT_FALSE(small.ok());
  EXPECT_THAT(small.status().message(), HasSubstr("the coordinator's limit is 1.0 MiB per run (--max-run-gib)"));
}

TEST_F(CoordinatorOverStore, ARunWaitingForAKindOfWorkerSaysSo) {
  v1::Experiment gpu = TinyExperiment("gpu");
  gpu.mutable_resources()->set_device(v1::CUDA);
  auto r = coordinator_->Submit(gpu);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  session_ = coordinator_->OpenSession(writer_);
  coordinator_->OnWorkerMessage(session_, Register());  // a CPU worker
  coordinator_->Tick();
  auto summary = coordinator_->GetExperiment(r->experiment_id(), false);
  ASSERT_TRUE(summary.ok());
  EXPECT_EQ(summary->runs(0).state(), v1::QUEUED);
  EXPECT_EQ(summary->runs(0).message(), "waiting: no CUDA worker is connected");
}

TEST_F(CoordinatorOverStore, WhatIsShownIsWhatIsStored) {
  // No worker is told to start a run the store does not hold as started.
  auto r = coordinator_->Submit(TinyExperiment("tiny"));
  ASSERT_TRUE(r.ok());
  const std::string run = r->run_ids(0);
  ASSERT_TRUE(store_->ExecForTesting("PRAGMA query_only = 1").ok());
  session_ = coordinator_->OpenSession(writer_);
  coordinator_->OnWorkerMessage(session_, Register());
  coordinator_->Tick();
  EXPECT_EQ(Sorted(writer_->Take()).assignments, 0);
  auto summary = coordinator_->GetExperiment("tiny-1", false);
  ASSERT_TRUE(summary.ok());
  EXPECT_EQ(summary->runs(0).state(), v1::QUEUED);
  EXPECT_EQ(summary->runs(0).attempt(), 0);
  ASSERT_TRUE(store_->ExecForTesting("PRAGMA query_only = 0").ok());
  coordinator_->Tick();
  EXPECT_EQ(Sorted(writer_->Take()).assignments, 1);

  // A finish that cannot be stored is not acked and changes nothing shown.
  ASSERT_TRUE(store_->ExecForTesting("PRAGMA query_only = 1").ok());
  v1::WorkerMessage finished;
  finished.mutable_finished()->set_run_id(run);
  finished.mutable_finished()->set_attempt(1);
  finished.mutable_finished()->set_step(20);
  coordinator_->OnWorkerMessage(session_, finished);
  EXPECT_EQ(Sorted(writer_->Take()).outcomes, 0);
  summary = coordinator_->GetExperiment("tiny-1", false);
  ASSERT_TRUE(summary.ok());
  EXPECT_EQ(summary->runs(0).state(), v1::RUNNING);
  EXPECT_EQ(summary->state(), v1::ACTIVE);
  EXPECT_EQ(summary->runs(0).step(), 0);
  // Written again once the store takes writes: stored, acked, shown.
  ASSERT_TRUE(store_->ExecForTesting("PRAGMA query_only = 0").ok());
  coordinator_->OnWorkerMessage(session_, finished);
  EXPECT_EQ(Sorted(writer_->Take()).outcomes, 1);
  summary = coordinator_->GetExperiment("tiny-1", false);
  ASSERT_TRUE(summary.ok());
  EXPECT_EQ(summary->runs(0).state(), v1::SUCCEEDED);
  EXPECT_EQ(summary->state(), v1::COMPLETED);
  auto runs = store_->LoadRuns();
  ASSERT_TRUE(runs.ok());
  EXPECT_EQ((*runs)[0].summary.state(), v1::SUCCEEDED);
}

TEST_F(CoordinatorOverStore, ALapseTheStoreCannotTakeIsRetriedNotCounted) {
  StartCoordinator(/*lease_seconds=*/0.3);
  const std::string run = SubmitAndAssign();
  ASSERT_TRUE(store_->ExecForTesting("PRAGMA query_only = 1").ok());
  clock_.Advance(std::chrono::milliseconds(400));
  coordinator_->Tick();
  auto summary = coordinator_->GetExperiment("tiny-1", false);
  ASSERT_TRUE(summary.ok());
  EXPECT_EQ(summary->runs(0).state(), v1::RUNNING);  // not requeued in memory only
  EXPECT_EQ(Sorted(writer_->Take()).cancels, 0);
  ASSERT_TRUE(store_->ExecForTesting("PRAGMA query_only = 0").ok());
  coordinator_->Tick();
  summary = coordinator_->GetExperiment("tiny-1", false);
  ASSERT_TRUE(summary.ok());
  EXPECT_EQ(summary->runs(0).state(), v1::QUEUED);
  auto runs = store_->LoadRuns();
  ASSERT_TRUE(runs.ok());
  EXPECT_EQ((*runs)[0].restarts, 1);  // one lapse, one restart, however many ticks it took
  EXPECT_EQ((*runs)[0].summary.state(), v1::QUEUED);
}

TEST_F(CoordinatorOverStore, AFinishWaitsForTheAttemptsMissingSteps) {
  const std::string run = SubmitAndAssign();
  for (int64_t step = 1; step <= 20; ++step) {
    if (step == 12) {  // steps 12–14 fail
      ASSERT_TRUE(store_->ExecForTesting("PRAGMA query_only = 1").ok());
    }
    if (step == 15) {
      ASSERT_TRUE(store_->ExecForTesting("PRAGMA query_only = 0").ok());
    }
    coordinator_->OnWorkerMessage(session_, Progress(run, step));
  }
  v1::WorkerMessage finished;
  finished.mutable_finished()->set_run_id(run);
  finished.mutable_finished()->set_attempt(1);
  finished.mutable_finished()->set_step(20);
  coordinator_->OnWorkerMessage(session_, finished);
  EXPECT_EQ(Sorted(writer_->Take()).outcomes, 0);  // not taken: 17 of 20 steps stored
  auto summary = coordinator_->GetExperiment("tiny-1", false);
  ASSERT_TRUE(summary.ok());
  EXPECT_EQ(summary->runs(0).state(), v1::RUNNING);
  // The worker writes the unacked steps again, then the finish: taken.
  for (int64_t step : {12, 13, 14}) coordinator_->OnWorkerMessage(session_, Progress(run, step));
  coordinator_->OnWorkerMessage(session_, finished);
  EXPECT_EQ(Sorted(writer_->Take()).outcomes, 1);
  summary = coordinator_->GetExperiment("tiny-1", false);
  ASSERT_TRUE(summary.ok());
  EXPECT_EQ(summary->runs(0).state(), v1::SUCCEEDED);
  EXPECT_THAT(StoredSteps(*store_, run), SizeIs(20));
}

// --- Prometheus series are bounded per run -----------------------------------------------

// Series of `run` in the exposition (lines that carry its label, not comments).
size_t SeriesOf(const Exporter& e, const std::string& run) {
  std::istringstream in(e.Scrape());
  size_t n = 0;
  for (std::string line; std::getline(in, line);) n += line[0] != '#' && line.find("run=\"" + run + "\"") != std::string::npos;
  return n;
}

TEST(ExporterBounds, ARunsSeriesAreCappedAndExpire) {
  auto exporter = Exporter::Start("", std::chrono::seconds(0));
  ASSERT_TRUE(exporter.ok());
  Exporter& e = **exporter;
  v1::RunSummary run;
  run.set_run_id("diag-1");
  run.set_experiment_id("diag");
  // A diagnostic job's report at the schema's bounds of layers and far more heads than
  // any model has: 4,096 layers x (8 + 64 + 64) series would be 557,056.
  v1::ProbeReport r;
  r.set_step(0);
  for (int l = 0; l < 4096; ++l) {
    v1::LayerProbe* lp = r.add_layers();
    lp->set_layer(l);
    for (int h = 0; h < 64; ++h) {
      lp->add_alpha(0.5);
      lp->add_theta(0.25);
    }
  }
  e.RecordProbe(run, r);
  const size_t first = SeriesOf(e, "diag-1");
  EXPECT_LE(first, Exporter::kMaxSeriesPerRun);
  EXPECT_GT(first, Exporter::kMaxSeriesPerRun - 200);  // the cap, not far below it
  // Layer 0's series are all there; the last layer's are not.
  EXPECT_THAT(e.Scrape(), HasSubstr("head=\"63\",layer=\"0\",run=\"diag-1\""));
  EXPECT_THAT(e.Scrape(), Not(HasSubstr("layer=\"4095\"")));
  // The next report updates what exists and adds nothing.
  e.RecordProbe(run, r);
  EXPECT_EQ(SeriesOf(e, "diag-1"), first);
  // Another run has its own budget; the capped run's series go when it has ended.
  v1::RunSummary small = run;
  small.set_run_id("small-1");
  v1::ProbeReport two;
  two.add_layers()->set_layer(0);
  two.add_layers()->set_layer(1);
  e.RecordProbe(small, two);
  EXPECT_EQ(SeriesOf(e, "small-1"), 2u + 2u * 7u);  // r_gs median and step; per layer 7 (no top-1 without top3)
  e.RunEnded("diag-1");
  e.ExpireSeries();
  EXPECT_EQ(SeriesOf(e, "diag-1"), 0u);
  EXPECT_EQ(SeriesOf(e, "small-1"), 2u + 2u * 7u);
}

}  // namespace
}  // namespace sinkscope

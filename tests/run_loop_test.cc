// The one run loop (training/run_loop.h) without gRPC: the cadence of probes, validation
// and checkpoints; a stop and a resume reproduce the uninterrupted run bit for bit; a
// non-finite loss keeps the last good state; checkpoint retries wait on a ManualClock
// (no real sleeping), recover, give up, or yield to a stop; stale temporary files, a
// checkpoint past train.steps and a fresh start that owns its folder.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <vector>

#include "training/checkpoint.h"
#include "training/run_loop.h"
#include "tests/synthetic_data.h"

namespace sinkscope {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

const DataSplits& Data() {
  static const DataSplits d = Synthetic(6000);
  return d;
}

std::string FreshDir(const std::string& name) {
  const std::string dir = ::testing::TempDir() + "/run_loop_" + std::to_string(::getpid()) + "_" + name;
  fs::remove_all(dir);
  return dir;
}

RunLoopOptions Options(const std::string& dir, int64_t steps) {
  RunLoopOptions o;
  o.trainer.model.layers = 2;
  o.trainer.model.d_model = 32;
  o.trainer.model.heads = 4;
  o.trainer.model.kv_heads = 2;
  o.trainer.model.head_dim = 8;
  o.trainer.model.ffn = 64;
  o.trainer.model.vocab = 64;
  o.trainer.model.context = 16;
  o.trainer.model.vscale = VScaleMode::kVScale;
  o.trainer.optimizer.lr = 3e-3;
  o.trainer.optimizer.min_lr = 3e-4;
  o.trainer.optimizer.warmup_steps = 2;
  o.trainer.optimizer.total_steps = steps;
  o.trainer.micro_batch = 4;
  o.trainer.grad_accum = 2;
  o.trainer.eval_batches = 2;
  o.trainer.seed = 11;
  o.dir = dir;
  o.total_steps = steps;
  o.probe_every = 3;
  o.probe.ref_span = 7;  // within the context of 16
  o.probe.profile_len = 16;
  o.eval_every = 4;
  o.checkpoint_every = 5;
  return o;
}

// Records what the loop hands out; stops, fails or advances a ManualClock on request.
class Recorder : public RunObserver {
 public:
  std::vector<int64_t> steps, probes, evaluated, checkpoints, retries;
  std::vector<std::chrono::milliseconds> waits;
  std::vector<std::string> stale;
  std::vector<double> losses;
  int64_t started_at = -1;
  bool resumed = false;
  int64_t stop_after = 0;                  // StopRequested() from this step on (0: never)
  StopKind stop_kind = StopKind::kCancelled;
  ManualClock* clock = nullptr;            // advanced by each retry's wait
  std::function<void(int64_t)> on_start;   // after OnStart's bookkeeping
  std::function<void(int)> on_retry;       // the retry number

  void OnStaleFileRemoved(const std::string& path) override { stale.push_back(path); }
  Status OnStart(int64_t step, bool r) override {
    started_at = step;
    resumed = r;
    if (on_start) on_start(step);
    return OkStatus();
  }
  Status OnStep(const StepStats& s, double val, const ProbeReport* probe) override {
    steps.push_back(s.step);
    losses.push_back(s.loss);
    if (probe != nullptr) {
      EXPECT_EQ(probe->step, s.step);
      probes.push_back(s.step);
    }
    if (!std::isnan(val)) evaluated.push_back(s.step);
    last_ = s.step;
    return OkStatus();
  }
  void OnCheckpoint(int64_t step) override { checkpoints.push_back(step); }
  void OnCheckpointRetry(int64_t step, int retry, std::chrono::milliseconds wait, const Status&) override {
    retries.push_back(retry);
    waits.push_back(wait);
    if (on_retry) on_retry(retry);
    if (clock != nullptr) clock->Advance(wait);
  }
  std::optional<StopKind> StopRequested() override {
    if (stop_after > 0 && last_ >= stop_after) return stop_kind;
    return std::nullopt;
  }

 private:
  int64_t last_ = 0;
};

std::string FileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(RunLoopTest, CadenceOfProbesValidationCheckpointsAndExport) {
  const std::string dir = FreshDir("cadence");
  RunLoopOptions o = Options(dir, 11);
  o.export_hf = true;
  auto backend = MakeCpuBackend();
  Recorder rec;
  ManualClock clock;
  const RunResult r = RunLoop(o, &Data(), backend.get(), &rec, &clock);
  ASSERT_EQ(r.kind, RunResult::kFinished) << r.Describe();
  EXPECT_EQ(r.step, 11);
  EXPECT_EQ(rec.started_at, 0);
  EXPECT_FALSE(rec.resumed);
  EXPECT_THAT(rec.steps, ElementsAreArray({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}));
  EXPECT_THAT(rec.probes, ElementsAre(1, 3, 6, 9, 11));  // the first, every 3rd, the last
  EXPECT_THAT(rec.evaluated, ElementsAre(4, 8, 11));
  EXPECT_THAT(rec.checkpoints, ElementsAre(5, 10, 11));
  EXPECT_EQ(r.checkpoint_step, 11);
  EXPECT_TRUE(fs::exists(dir + "/hf/config.json"));
  EXPECT_TRUE(fs::exists(dir + "/hf/model.safetensors"));
}

TEST(RunLoopTest, StopThenResumeIsBitIdenticalToTheUninterruptedRun) {
  auto backend = MakeCpuBackend();
  ManualClock clock;
  const std::string whole = FreshDir("whole"), parts = FreshDir("parts");
  Recorder a;
  ASSERT_EQ(RunLoop(Options(whole, 9), &Data(), backend.get(), &a, &clock).kind, RunResult::kFinished);

  Recorder b1;
  b1.stop_after = 7;  // between checkpoints: the stop writes its own
  const RunResult stopped = RunLoop(Options(parts, 9), &Data(), backend.get(), &b1, &clock);
  ASSERT_EQ(stopped.kind, RunResult::kStopped);
  EXPECT_EQ(stopped.stop, StopKind::kCancelled);
  EXPECT_EQ(stopped.step, 7);
  EXPECT_EQ(stopped.checkpoint_step, 7);
  EXPECT_TRUE(stopped.error.ok()) << stopped.error.message();
  EXPECT_THAT(b1.checkpoints, ElementsAre(5, 7));

  Recorder b2;
  const RunResult resumed = RunLoop(Options(parts, 9), &Data(), backend.get(), &b2, &clock);
  ASSERT_EQ(resumed.kind, RunResult::kFinished) << resumed.Describe();
  EXPECT_TRUE(b2.resumed);
  EXPECT_EQ(b2.started_at, 7);
  EXPECT_THAT(b2.steps, ElementsAre(8, 9));
  EXPECT_THAT(b2.probes, ElementsAre(9));
  // The losses of the resumed steps and the final checkpoint equal the uninterrupted run's.
  ASSERT_EQ(a.losses.size(), 9u);
  EXPECT_EQ(b2.losses[0], a.losses[7]);
  EXPECT_EQ(b2.losses[1], a.losses[8]);
  EXPECT_EQ(FileBytes(whole + "/checkpoint.bin"), FileBytes(parts + "/checkpoint.bin"));
}

TEST(RunLoopTest, ShutdownBeforeTheFirstStepCheckpointsTheFreshState) {
  auto backend = MakeCpuBackend();
  ManualClock clock;
  const std::string dir = FreshDir("early");
  class StopAtOnce : public Recorder {
    std::optional<StopKind> StopRequested() override { return StopKind::kShutdown; }
  } now;
  const RunResult r = RunLoop(Options(dir, 5), &Data(), backend.get(), &now, &clock);
  ASSERT_EQ(r.kind, RunResult::kStopped);
  EXPECT_EQ(r.stop, StopKind::kShutdown);
  EXPECT_EQ(r.step, 0);
  EXPECT_TRUE(now.steps.empty());
  // Step 0 is a state too (fresh weights from the seed): it is checkpointed so the run
  // continues from it; it is the same state a fresh start would make.
  EXPECT_EQ(r.checkpoint_step, 0);
  EXPECT_TRUE(fs::exists(dir + "/checkpoint.bin"));
}

TEST(RunLoopTest, NonFiniteLossKeepsTheLastGoodStateAndSaysWhere) {
  auto backend = MakeCpuBackend();
  ManualClock clock;
  const std::string dir = FreshDir("nan");
  RunLoopOptions o = Options(dir, 20);
  o.checkpoint_every = 0;  // only the last step: the failure must checkpoint on its own
  o.trainer.optimizer.lr = 1e30;  // step 1 is finite (weights ~1e30), step 2 is not
  o.trainer.optimizer.min_lr = 0;
  o.trainer.optimizer.warmup_steps = 0;
  Recorder rec;
  const RunResult r = RunLoop(o, &Data(), backend.get(), &rec, &clock);
  ASSERT_EQ(r.kind, RunResult::kNonFinite) << r.Describe();
  ASSERT_GE(r.step, 1);
  EXPECT_EQ(r.checkpoint_step, r.step);
  EXPECT_FALSE(r.failed_step.finite);
  EXPECT_EQ(static_cast<int64_t>(rec.steps.size()), r.step);  // the failed step is not reported
  EXPECT_THAT(r.Describe(), HasSubstr("not finite at step " + std::to_string(r.step + 1)));
  EXPECT_THAT(r.Describe(), HasSubstr("the last good checkpoint (step " + std::to_string(r.step) + ") is kept at " +
                                      dir + "/checkpoint.bin"));
  auto header = ReadCheckpointConfig(dir + "/checkpoint.bin");
  EXPECT_TRUE(header.ok()) << header.status().message();
  EXPECT_FALSE(fs::exists(dir + "/hf"));
}

// A directory where checkpoint.bin should be: the rename onto it fails every time.
void BlockCheckpoint(const std::string& dir) {
  fs::create_directories(dir + "/checkpoint.bin/blocker");
}

TEST(RunLoopTest, CheckpointRetriesWaitOnTheClockAndRecover) {
  auto backend = MakeCpuBackend();
  ManualClock clock;
  const std::string dir = FreshDir("retry");
  Recorder rec;
  rec.clock = &clock;
  rec.on_start = [&](int64_t) { BlockCheckpoint(dir); };
  rec.on_retry = [&](int retry) {
    if (retry == 2) fs::remove_all(dir + "/checkpoint.bin");
  };
  const auto t0 = clock.Now();
  const auto real0 = std::chrono::steady_clock::now();
  const RunResult r = RunLoop(Options(dir, 5), &Data(), backend.get(), &rec, &clock);
  ASSERT_EQ(r.kind, RunResult::kFinished) << r.Describe();
  EXPECT_THAT(rec.retries, ElementsAre(1, 2));
  EXPECT_THAT(rec.waits, ElementsAre(std::chrono::milliseconds(500), std::chrono::milliseconds(1000)));
  EXPECT_EQ(clock.Now() - t0, std::chrono::milliseconds(1500));
  EXPECT_THAT(rec.checkpoints, ElementsAre(5));
  // Well under the 1.5 s the clock moved: the waits were the ManualClock's.
  EXPECT_LT(std::chrono::steady_clock::now() - real0, std::chrono::seconds(30));
}

TEST(RunLoopTest, CheckpointThatCannotBeWrittenGivesTheRunBack) {
  auto backend = MakeCpuBackend();
  ManualClock clock;
  const std::string dir = FreshDir("giveback");
  RunLoopOptions o = Options(dir, 6);
  o.checkpoint_every = 2;
  Recorder rec;
  rec.clock = &clock;
  rec.on_start = [&](int64_t) { BlockCheckpoint(dir); };
  const RunResult r = RunLoop(o, &Data(), backend.get(), &rec, &clock);
  ASSERT_EQ(r.kind, RunResult::kGiveBack);
  EXPECT_EQ(r.step, 2);
  EXPECT_EQ(r.checkpoint_step, -1);
  EXPECT_THAT(rec.retries, ElementsAre(1, 2, 3));
  EXPECT_THAT(r.error.message(), HasSubstr("checkpoint " + dir + "/checkpoint.bin cannot be written (4 tries)"));
  EXPECT_THAT(r.Describe(), HasSubstr("no checkpoint was written yet"));
}

TEST(RunLoopTest, StopDuringARetryWaitEndsTheRun) {
  auto backend = MakeCpuBackend();
  ManualClock clock;
  const std::string dir = FreshDir("stopwait");
  RunLoopOptions o = Options(dir, 6);
  o.checkpoint_every = 2;
  Recorder rec;  // no clock: the wait would last forever on the ManualClock
  rec.stop_after = 2;
  rec.stop_kind = StopKind::kShutdown;
  rec.on_start = [&](int64_t) { BlockCheckpoint(dir); };
  const RunResult r = RunLoop(o, &Data(), backend.get(), &rec, &clock);
  ASSERT_EQ(r.kind, RunResult::kStopped);
  EXPECT_EQ(r.stop, StopKind::kShutdown);
  EXPECT_EQ(r.step, 2);
  EXPECT_FALSE(r.error.ok());  // the stop's own checkpoint could not be written either
  EXPECT_THAT(rec.retries, ElementsAre(1));
}

TEST(RunLoopTest, StaleTemporaryFilesGoAndOthersStay) {
  auto backend = MakeCpuBackend();
  ManualClock clock;
  const std::string dir = FreshDir("stale");
  fs::create_directories(dir);
  std::ofstream(dir + "/checkpoint.bin.tmp.123.456") << "torn";
  std::ofstream(dir + "/notes.txt.tmp.1.2") << "not ours";
  Recorder rec;
  ASSERT_EQ(RunLoop(Options(dir, 2), &Data(), backend.get(), &rec, &clock).kind, RunResult::kFinished);
  EXPECT_THAT(rec.stale, ElementsAre(dir + "/checkpoint.bin.tmp.123.456"));
  EXPECT_FALSE(fs::exists(dir + "/checkpoint.bin.tmp.123.456"));
  EXPECT_TRUE(fs::exists(dir + "/notes.txt.tmp.1.2"));
}

TEST(RunLoopTest, ProbeSettingsBeyondTheContextAreRefusedBeforeTraining) {
  auto backend = MakeCpuBackend();
  ManualClock clock;
  RunLoopOptions o = Options(FreshDir("badprobe"), 3);
  o.probe.profile_len = 64;  // > context 16
  Recorder rec;
  const RunResult r = RunLoop(o, &Data(), backend.get(), &rec, &clock);
  ASSERT_EQ(r.kind, RunResult::kError);
  EXPECT_THAT(r.error.message(), HasSubstr("probe.profile_len"));
  EXPECT_TRUE(rec.steps.empty());
}

TEST(RunLoopTest, CheckpointPastTheRunsStepsIsRefused) {
  auto backend = MakeCpuBackend();
  ManualClock clock;
  const std::string dir = FreshDir("past");
  Recorder a;
  ASSERT_EQ(RunLoop(Options(dir, 6), &Data(), backend.get(), &a, &clock).kind, RunResult::kFinished);
  Recorder b;
  RunLoopOptions shorter = Options(dir, 4);
  const RunResult r = RunLoop(shorter, &Data(), backend.get(), &b, &clock);
  ASSERT_EQ(r.kind, RunResult::kError);
  EXPECT_THAT(r.error.message(), HasSubstr("is at step 6, past train.steps = 4"));
  EXPECT_TRUE(b.steps.empty());
}

TEST(RunLoopTest, FreshStartOwnsItsFolder) {
  auto backend = MakeCpuBackend();
  ManualClock clock;
  const std::string dir = FreshDir("fresh");
  RunLoopOptions o = Options(dir, 3);
  o.export_hf = true;
  Recorder a;
  ASSERT_EQ(RunLoop(o, &Data(), backend.get(), &a, &clock).kind, RunResult::kFinished);
  o.resume = false;
  o.export_hf = false;
  Recorder b;
  b.stop_after = 1;
  ASSERT_EQ(RunLoop(o, &Data(), backend.get(), &b, &clock).kind, RunResult::kStopped);
  EXPECT_EQ(b.started_at, 0);
  EXPECT_FALSE(fs::exists(dir + "/hf"));  // the earlier run's export went with its checkpoint
  auto again = Options(dir, 3);
  Recorder c;
  ASSERT_EQ(RunLoop(again, &Data(), backend.get(), &c, &clock).kind, RunResult::kFinished);
  EXPECT_EQ(c.started_at, 1);  // the fresh run's stop checkpoint, not the earlier run's step 3
}

}  // namespace
}  // namespace sinkscope

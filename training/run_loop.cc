#include "training/run_loop.h"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <mutex>

#include "training/checkpoint.h"
#include "engine/communicator.h"
#include "training/hf.h"

namespace sinkscope {
namespace {

constexpr char kCheckpointFile[] = "checkpoint.bin";

std::string Num(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.6g", v);
  return b;
}

// Waits until `deadline` on `clock` unless a stop is requested first (polled every 20 ms of real
// time, and at once on a ManualClock's every tick). Returns the stop, if any.
std::optional<StopKind> WaitOrStop(Clock* clock, Clock::TimePoint deadline, RunObserver* observer) {
  std::mutex mu;
  std::condition_variable cv;
  std::unique_lock<std::mutex> lock(mu);
  while (true) {
    if (auto stop = observer->StopRequested()) return stop;
    const Clock::TimePoint now = clock->Now();
    if (now >= deadline) return std::nullopt;
    clock->WaitUntil(cv, lock, std::min(deadline, now + std::chrono::milliseconds(20)));
  }
}

}  // namespace

std::string RunResult::Describe() const {
  const std::string kept = checkpoint_step >= 0 ? "the last good checkpoint (step " + std::to_string(checkpoint_step) +
                                                      ") is kept at " + checkpoint_path
                                                : "no checkpoint was written yet";
  switch (kind) {
    case kFinished:
      return "finished at step " + std::to_string(step);
    case kNonFinite:
      return "loss or gradient is not finite at step " + std::to_string(step + 1) + " (loss " +
             Num(failed_step.loss) + ", grad norm " + Num(failed_step.grad_norm) + "); " + kept +
             (error.ok() ? "" : " (" + error.message() + ")");
    case kStopped:
      return std::string(stop == StopKind::kCancelled ? "cancelled" : "stopped") + " after step " +
             std::to_string(step) + "; " +
             (error.ok() ? kept : "the checkpoint could not be written: " + error.message());
    case kGiveBack:
      return error.message() + "; " + kept;
    case kError:
      return error.message();
  }
  return "";
}

RunResult RunLoop(const RunLoopOptions& o, const DataSplits* data, Backend* backend, RunObserver* observer,
                  Clock* clock) {
  RunResult r;
  r.checkpoint_path = o.dir + "/" + kCheckpointFile;
  const std::string& ckpt = r.checkpoint_path;
  auto fail = [&r](Status s) {
    r.kind = RunResult::kError;
    r.error = std::move(s);
    return r;
  };
  if (o.total_steps <= 0) return fail(InvalidArgumentError("train.steps must be positive"));
  // Data parallelism: every rank runs this loop; rank 0 alone owns the folder (checkpoints,
  // export) and decides what all do (resume, stop, give back), broadcasting it.
  Communicator* comm = o.trainer.comm;
  const int W = comm != nullptr ? comm->world_size() : 1;
  const bool owner = comm == nullptr || comm->rank() == 0;
  HostStaging staged(*backend);  // the decisions below are host values; NCCL wants device buffers
  auto share = [&](int32_t* value) -> Status {
    if (W == 1) return OkStatus();
    return staged.Broadcast(*comm, value, sizeof *value, 0);
  };
  if (o.probe_every > 0) {
    if (Status st = o.probe.Validate(o.trainer.model.context); !st.ok()) return fail(st);
  }
  std::error_code ec;
  if (owner) {
    std::filesystem::create_directories(o.dir, ec);
    if (ec) return fail(InternalError("cannot create the run folder " + o.dir + ": " + ec.message()));
    for (const std::string& stale : RemoveStaleTempFiles(o.dir)) observer->OnStaleFileRemoved(stale);
  }

  auto created = Trainer::Create(o.trainer, data, backend);
  if (!created.ok()) return fail(created.status());
  std::unique_ptr<Trainer> trainer = std::move(*created);
  int32_t resume_flag = 0;
  if (owner) {
    resume_flag = o.resume && std::filesystem::exists(ckpt, ec);
    if (ec) return fail(InternalError("cannot read " + ckpt + ": " + ec.message()));
    if (!resume_flag) {
      // A fresh start owns the folder: a checkpoint and export of an earlier run would
      // otherwise be picked up by a later resume and spliced with this run's records.
      for (const std::string& stale : {ckpt, o.dir + "/hf"}) {
        std::filesystem::remove_all(stale, ec);
        if (ec) return fail(InternalError("cannot remove " + stale + " of an earlier run: " + ec.message()));
      }
    }
  }
  if (Status st = share(&resume_flag); !st.ok()) return fail(st);
  const bool have_checkpoint = resume_flag != 0;
  if (have_checkpoint) {
    if (Status s = trainer->Resume(ckpt); !s.ok()) return fail(Status(s.code(), "resume from " + ckpt + ": " + s.message()));
    if (trainer->step() > o.total_steps) {
      return fail(InvalidArgumentError(ckpt + " is at step " + std::to_string(trainer->step()) +
                                       ", past train.steps = " + std::to_string(o.total_steps) +
                                       "; resume with the steps it was trained with"));
    }
    r.checkpoint_step = trainer->step();
  } else {
    trainer->Initialize();  // the same weights on every rank: the same seed
  }
  r.step = trainer->step();
  if (Status s = observer->OnStart(trainer->step(), have_checkpoint); !s.ok()) return fail(s);

  // Writes the checkpoint of the trainer's state (the hook first). Tried again with
  // back-off; a stop request during a wait is returned.
  struct Saved {
    Status status;
    std::optional<StopKind> stop;
  };
  auto save_here = [&](bool retry) -> Saved {
    const int64_t step = trainer->step();
    if (Status s = observer->BeforeCheckpoint(step); !s.ok()) return {s, std::nullopt};
    Status st = trainer->SaveCheckpoint(ckpt);
    auto wait = o.checkpoint_backoff;
    for (int attempt = 1; retry && !st.ok() && attempt <= o.checkpoint_retries; ++attempt) {
      const Clock::TimePoint deadline = clock->Now() + wait;
      observer->OnCheckpointRetry(step, attempt, wait, st);
      if (auto stop = WaitOrStop(clock, deadline, observer)) return {st, stop};
      std::filesystem::create_directories(o.dir, ec);
      st = trainer->SaveCheckpoint(ckpt);
      wait *= 2;
    }
    if (st.ok()) {
      r.checkpoint_step = step;
      observer->OnCheckpoint(step);
    }
    return {st, std::nullopt};
  };
  // Rank 0 writes; every rank learns the outcome (0 written, 1 failed, 2 failed and a
  // stop came meanwhile: 2 + the StopKind).
  auto save = [&](bool retry) -> Saved {
    Saved saved;
    int32_t outcome = 0;
    if (owner) {
      saved = save_here(retry);
      outcome = saved.status.ok() ? 0 : saved.stop ? 2 + static_cast<int32_t>(*saved.stop) : 1;
    }
    if (Status st = share(&outcome); !st.ok()) return {st, std::nullopt};
    if (!owner) {
      if (outcome == 0) r.checkpoint_step = trainer->step();
      saved.status = outcome == 0 ? OkStatus() : Status(StatusCode::kUnavailable, "rank 0 could not write the checkpoint");
      if (outcome >= 2) saved.stop = static_cast<StopKind>(outcome - 2);
    }
    return saved;
  };
  // Any rank's stop request stops every rank after the same step (a cancel reaches the
  // ranks at different moments; a drained worker may hold any rank): summed over the
  // ranks, a shutdown anywhere makes the gang's stop a shutdown.
  bool asked_here = false;
  auto stop_requested = [&]() -> StatusOr<std::optional<StopKind>> {
    double asked[2] = {0, 0};  // cancelled, shut down
    const std::optional<StopKind> mine = observer->StopRequested();
    if (mine) asked[*mine == StopKind::kShutdown] = 1;
    if (W > 1) RETURN_IF_ERROR(staged.AllReduceSum(*comm, asked, 2));
    asked_here = mine.has_value();
    if (asked[0] + asked[1] == 0) return std::optional<StopKind>();
    return std::optional<StopKind>(asked[1] > 0 ? StopKind::kShutdown : StopKind::kCancelled);
  };
  // A stop after a step: the state is checkpointed (once) and the run ends.
  auto stopped = [&](StopKind kind) {
    r.kind = RunResult::kStopped;
    r.stop = kind;
    r.stopped_by_peer = !asked_here;
    r.step = trainer->step();
    if (r.checkpoint_step != trainer->step()) r.error = save(/*retry=*/false).status;
    return r;
  };
  {
    auto stop = stop_requested();
    if (!stop.ok()) return fail(stop.status());
    if (*stop) return stopped(**stop);
  }

  while (trainer->step() < o.total_steps) {
    const int64_t next = trainer->step() + 1;
    observer->BeforeStep(next);
    const bool probe_now = IsProbeStep(next, o.probe_every, o.total_steps);
    ProbeReport report;
    const StepStats s = probe_now ? trainer->ProbedStep(o.probe, o.probe_batch, &report) : trainer->Step();
    if (!s.error.ok()) {  // a device error or a failed collective
      r.device_error = s.device_error;
      return fail(s.error);
    }
    if (!s.finite) {
      // No update was made: the trainer holds the state after the last good step, and
      // that is what is checkpointed (if the disk has an older one) for a look or a
      // resume with other settings.
      r.kind = RunResult::kNonFinite;
      r.failed_step = s;
      r.step = trainer->step();
      if (r.checkpoint_step != trainer->step()) r.error = save(/*retry=*/false).status;
      return r;
    }
    r.step = s.step;
    const double val = IsEveryOrLast(s.step, o.eval_every, o.total_steps) ? trainer->Evaluate() : NAN;
    const bool probed = probe_now && report.step == s.step;
    if (Status st = observer->OnStep(s, val, probed ? &report : nullptr); !st.ok()) return fail(st);
    if (IsEveryOrLast(s.step, o.checkpoint_every, o.total_steps)) {
      Saved saved = save(/*retry=*/true);
      if (saved.stop) {
        asked_here = owner;  // rank 0's own request, seen while its retry waited
        return stopped(*saved.stop);
      }
      if (!saved.status.ok()) {
        r.kind = RunResult::kGiveBack;
        r.error = Status(saved.status.code(), "checkpoint " + ckpt + " cannot be written (" +
                                                  std::to_string(o.checkpoint_retries + 1) +
                                                  " tries): " + saved.status.message());
        return r;
      }
    }
    observer->AfterStep(s.step);
    if (s.step < o.total_steps) {
      auto stop = stop_requested();
      if (!stop.ok()) return fail(stop.status());
      if (*stop) return stopped(**stop);
    }
  }
  if (o.export_hf && owner) {
    const std::string hf = o.dir + "/hf";
    if (Status st = ExportHf(trainer->model(), hf); !st.ok()) {
      return fail(Status(st.code(), "export to " + hf + ": " + st.message()));
    }
  }
  r.kind = RunResult::kFinished;
  r.step = trainer->step();
  return r;
}

}  // namespace sinkscope

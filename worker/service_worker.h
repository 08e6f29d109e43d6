// The service's worker: one Session stream to the coordinator (WorkerService), over
// which it registers, heartbeats, and trains the runs it is assigned with the engine,
// one at a time, streaming a Progress per step and a ProbeUpload per probe.
//
// Threads: Run()'s caller is the connection loop and the stream's only writer; each
// connection has one reader thread; each assigned run trains on a training thread. The
// stream may break at any time: training goes on, messages wait in a queue, and the
// connection loop reconnects with exponential back-off and jitter.
//
// Delivery (worker/outbox.h): probe reports are kept until acked and resent on every
// (re)connect; Progress is queued while disconnected (the newest max_buffered_progress
// kept); written Progress and outcomes are kept until acked by a coordinator that acks
// them, and everything unacked is written again when no ack has come for a while.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <utility>

#include "base/clock.h"
#include "schema/credentials.h"
#include "worker/outbox.h"
#include "proto/sinkscope/v1/service.grpc.pb.h"
#include "data/data.h"
#include "engine/backend.h"
#include "base/status.h"

namespace sinkscope {

struct WorkerOptions {
  // Coordinator address, HOST:PORT.
  std::string coordinator = "127.0.0.1:50051";
  // The channel's credentials: plaintext by default; TLS (with a client certificate for
  // mutual TLS) from LoadClientCredentials.
  ClientCredentials credentials;
  // Sent as `authorization: Bearer <token>` on every Session call; empty: none. A
  // coordinator that rejects it (UNAUTHENTICATED) is logged as an error on every
  // attempt, and the worker keeps retrying with back-off.
  std::string bearer_token;
  // Stable id; empty: DefaultWorkerId().
  std::string worker_id;
  // The device the runs train on: the CPU, or CUDA device `device_index` (a build with
  // the CUDA backend; Create fails naming why when there is none).
  v1::DeviceKind device = v1::CPU;
  int device_index = 0;
  // Peak matmul rate for MFU, FLOP/s; unset: Create measures it once (MeasureGemmPeak).
  std::optional<double> peak_flops;
  // Reconnect back-off: starts at initial, doubles to max; each wait is 80-100% of it;
  // back to initial once a connection got its Registered.
  std::chrono::milliseconds initial_backoff{100};
  std::chrono::milliseconds max_backoff{5000};
  // Heartbeat interval until the coordinator's Registered gives one.
  std::chrono::milliseconds default_heartbeat{1000};
  // Progress messages kept while disconnected (oldest dropped first).
  size_t max_buffered_progress = 100000;
  // After Shutdown, how long to keep the stream to flush queued messages and wait for
  // the acks of outstanding probe reports.
  std::chrono::milliseconds shutdown_flush{2000};
  // While something is unacknowledged and no ack has come for this long (the coordinator's
  // store is failing, say), everything unacknowledged is written again on the same
  // connection: no reconnect or restart is needed once the store recovers.
  std::chrono::milliseconds resend_after{10000};
  // A checkpoint write that fails is tried again this many times, the wait doubling from
  // checkpoint_backoff (its folder is created again first); then the run is given back.
  int checkpoint_retries = 3;
  std::chrono::milliseconds checkpoint_backoff{500};
  // Seed of the back-off jitter; 0: random.
  uint64_t jitter_seed = 0;
  // Data-parallel runs (Assignment.world_size > 1, CPU ranks over Gloo's TCP transport):
  // the address this worker's rank listens on for its peers, which they must reach (a pod
  // IP, a host's address on the cluster network; 127.0.0.1 when every worker is on one
  // machine), and the timeout of the rendezvous and of every collective: a rank lost or
  // stuck makes the others fail within it, and the coordinator restarts the gang.
  std::string gloo_host = "127.0.0.1";
  std::chrono::milliseconds collective_timeout{60000};
  // Fault injection for tests: once a run of this worker completes this step (and its
  // checkpoint, if due), training stops and waits for a cancel or shutdown while the
  // worker keeps heartbeating, so a test can kill a worker at a known step. 0: off.
  int64_t fault_stall_after_step = 0;
  // Fault injection for tests: a pause before every step, so a run lasts at least
  // steps × this however fast the machine is. 0: off.
  std::chrono::milliseconds fault_step_delay{0};
};

// What the worker is doing, for tests and logs.
struct WorkerSnapshot {
  bool connected = false;   // a stream is open and Register was written
  int64_t connections = 0;  // streams opened so far (Register written)
  int64_t registered = 0;   // Registered messages received so far
  std::string run_id;       // the run training now; empty when idle
  int32_t attempt = 0;
  int64_t step = 0;  // its completed steps
  size_t unacked_probes = 0;
  size_t unacked_progress = 0;  // written, not yet acked (Progress, RunFinished, RunFailed)
  size_t queued_messages = 0;    // waiting to be written (probes included)
  int64_t dropped_progress = 0;  // Progress dropped past max_buffered_progress
  double heartbeat_seconds = 0;  // the interval in use
  int64_t runs_started = 0;
};

// "<hostname>-<pid>".
std::string DefaultWorkerId();

class Worker {
 public:
  // Checks the options (device, address), builds the backend and measures its peak
  // unless given. `clock` must outlive the worker.
  static StatusOr<std::unique_ptr<Worker>> Create(WorkerOptions options, Clock* clock);
  ~Worker();  // Shutdown(), then waits for every thread
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Connects, registers and serves assignments until Shutdown(); call it once. OK after a graceful
  // stop: the current run (if any) stopped after its step and was checkpointed; an error
  // when that checkpoint could not be written.
  Status Run();
  // Asks Run() to stop: the current run stops after its current step and checkpoints,
  // queued messages are flushed for up to shutdown_flush, then Run() returns. Any
  // thread; idempotent; not async-signal-safe.
  void Shutdown();

  WorkerSnapshot Snapshot();
  const WorkerOptions& options() const { return options_; }
  double peak_flops() const { return peak_flops_; }

 private:
  // The run of the training thread (or just assigned to it).
  struct CurrentRun {
    std::string run_id;
    int32_t attempt = 0;
    int64_t step = 0;        // completed steps, for heartbeats
    bool cancelled = false;  // CancelRun received: stop after the step, send nothing else
    int32_t rank = 0;        // in a gang of world_size ranks
    int32_t world_size = 1;
  };
  class ServiceRendezvous;
  // How a run's training ended.
  struct RunEnd {
    // kGiveBack: the run cannot go on here (its checkpoint cannot be written) but can
    // elsewhere: released, so it is requeued, not failed.
    enum Kind { kFinished, kFailed, kCancelled, kShutdown, kGiveBack } kind = kFinished;
    v1::FailureReason reason = v1::FAILURE_REASON_UNSPECIFIED;  // kFailed
    std::string message;  // kFailed: what went wrong; kCancelled/kShutdown: a failed checkpoint
    int64_t step = 0;     // the last completed step
    int64_t checkpoint_step = 0;  // kCancelled/kShutdown: the step of the checkpoint on disk, 0 for none
  };

  Worker(WorkerOptions options, Clock* clock, std::unique_ptr<Backend> backend, double peak_flops,
         std::string device_name, int64_t memory_bytes);

  // --- connection (Run's thread is the only writer) ---
  // One stream's lifetime; returns whether a Registered arrived on it. `failures`:
  // consecutive failed connections before this one (for log levels).
  bool ServeConnection(int64_t failures);
  v1::WorkerMessage MakeRegisterLocked() const;
  void ReadLoop(grpc::ClientReaderWriter<v1::WorkerMessage, v1::CoordinatorMessage>* stream, int64_t generation);
  void HandleMessageLocked(const v1::CoordinatorMessage& message);
  void HandleAssignmentLocked(const v1::Assignment& assignment);
  // Queues a RunReleased: the run is given back (the worker is shutting down) so the
  // coordinator requeues it at once, without a lease lapse or a restart counted. Also for
  // an assignment that arrived, or was waiting, when the shutdown began (steps 0).
  void EnqueueReleaseLocked(const std::string& run_id, int32_t attempt, int64_t step, int64_t checkpoint_step,
                            const std::string& reason);
  void HandleCancelLocked(const v1::CancelRun& cancel);
  std::chrono::milliseconds JitteredBackoffLocked(std::chrono::milliseconds base);
  // Logs a stream that failed because of the credentials: rejected token (UNAUTHENTICATED)
  // or a TLS handshake that failed. Returns false (and logs nothing) for other failures.
  bool LogCredentialFailure(const grpc::Status& status, int64_t attempt) const;

  // --- queue ---
  // Queues a message of `run_id` (a cancelled run's too: what it measured is still
  // stored); past the bound, drops the oldest queued Progress.
  void EnqueueLocked(const std::string& run_id, v1::WorkerMessage message, bool is_progress);
  void EnqueueProbeLocked(v1::ProbeUpload upload);

  // --- training (the training thread) ---
  // Trains next_, then whatever was assigned meanwhile, until none is left.
  void TrainingLoop();
  // One run, from data loading to the final checkpoint and export.
  RunEnd TrainRun(const v1::Assignment& assignment);
  // A diagnostic probe job: one pass, its report and its step.
  RunEnd DiagnoseRun(const v1::Assignment& assignment, const v1::Experiment& experiment);
  // Queues the run's outcome message (none for a stopped run) and clears current_.
  void EndRunLocked(const v1::Assignment& assignment, const RunEnd& end);
  // Whether the run must stop after its step: cancelled, or the worker is shutting down.
  std::optional<RunEnd::Kind> StopRequested(const std::string& run_id);
  std::optional<RunEnd::Kind> StopRequestedLocked(const std::string& run_id) const;
  StatusOr<std::shared_ptr<const DataSplits>> LoadRunData(const v1::Experiment& experiment);

  const WorkerOptions options_;
  Clock* const clock_;
  const std::unique_ptr<Backend> backend_;
  // An fp32 backend on the GPU for the attention arms' runs (the bf16 mode has no arms),
  // made on the run thread when first needed.
  std::unique_ptr<Backend> fp32_backend_;
  StatusOr<Backend*> Fp32Backend();
  const double peak_flops_;
  const std::string device_name_;  // "cpu" or "NVIDIA H200 (cuda:0)"
  const int64_t memory_bytes_;

  std::mutex mu_;
  std::condition_variable cv_;  // notified on any change a waiter on mu_ may care about
  bool stopping_ = false;
  bool connected_ = false;
  bool broken_ = false;     // the current stream failed (reader or writer) or ended
  int64_t generation_ = 0;  // connection counter; a stale reader does not mark a newer stream broken
  int64_t read_ended_ = 0;  // the last generation whose reader saw the stream end (its status is then final)
  grpc::ClientContext* connecting_context_ = nullptr;  // while a connection attempt may block
  int64_t connections_ = 0, registered_ = 0, runs_started_ = 0;
  std::chrono::nanoseconds heartbeat_interval_;
  Outbox outbox_;  // what is queued, written and unacked (worker/outbox.h)
  std::set<std::string> cancelled_runs_;
  std::optional<CurrentRun> current_;
  std::optional<v1::Assignment> next_;  // for the training thread to take
  // The rendezvous keys of the current or next run's attempt (RendezvousValue), by
  // "<run_id>#<attempt>": a peer may set them before this worker's training thread has
  // finished the previous attempt.
  std::map<std::string, std::map<std::string, std::string>> rendezvous_;
  bool training_thread_active_ = false;
  std::thread training_thread_;
  Status shutdown_status_;  // the checkpoint written because of Shutdown
  std::mt19937_64 rng_;     // back-off jitter

  // The last run's data, reused when the next run reads the same data.
  std::mutex data_mu_;
  std::string data_key_;
  std::shared_ptr<const DataSplits> data_;
};

}  // namespace sinkscope

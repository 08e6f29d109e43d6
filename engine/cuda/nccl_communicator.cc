#include "engine/cuda/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdio>
#include <cstring>
#include <thread>

namespace sinkscope {
namespace {

using SteadyClock = std::chrono::steady_clock;

std::string Seconds(std::chrono::milliseconds t) {
  char b[32];
  std::snprintf(b, sizeof b, "%.3g s", t.count() / 1000.0);
  return b;
}

std::string NcclError(ncclResult_t r, ncclComm_t comm) {
  std::string s = ncclGetErrorString(r);
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && last[0] != '\0') s += ": " + std::string(last);
  return s;
}

// Polls a non-blocking communicator until its state leaves ncclInProgress (and, when
// `done` is given, until that event has completed: the collective's end on the
// communicator's stream), or the deadline. On a timeout or an error the communicator is
// aborted: after a failure it is not used again.
Status Await(ncclComm_t comm, cudaEvent_t done_event, SteadyClock::time_point deadline, const std::string& what,
             const std::string& who, std::chrono::milliseconds timeout) {
  auto sleep = std::chrono::microseconds(20);
  while (true) {
    ncclResult_t state = ncclSuccess;
    if (ncclResult_t r = ncclCommGetAsyncError(comm, &state); r != ncclSuccess) state = r;
    if (state != ncclSuccess && state != ncclInProgress) {
      const std::string why = NcclError(state, comm);
      ncclCommAbort(comm);
      return Status(StatusCode::kUnavailable, what + " on " + who + " failed: a rank is gone (nccl: " + why + ")");
    }
    bool done = state == ncclSuccess;
    if (done && done_event != nullptr) {
      const cudaError_t q = cudaEventQuery(done_event);
      if (q != cudaSuccess && q != cudaErrorNotReady) {
        ncclCommAbort(comm);
        return Status(StatusCode::kInternal, what + " on " + who + ": CUDA error " + cudaGetErrorString(q));
      }
      done = q == cudaSuccess;
    }
    if (done) return OkStatus();
    if (SteadyClock::now() >= deadline) {
      ncclCommAbort(comm);
      return Status(StatusCode::kDeadlineExceeded,
                    what + " on " + who + " timed out after " + Seconds(timeout) + ": a rank is dead or stuck");
    }
    std::this_thread::sleep_for(sleep);
    if (sleep < std::chrono::milliseconds(1)) sleep *= 2;
  }
}

// An event that only orders work (no timing), or null with the CUDA error.
cudaEvent_t NewEvent(cudaError_t* error) {
  cudaEvent_t e = nullptr;
  *error = cudaEventCreateWithFlags(&e, cudaEventDisableTiming);
  return *error == cudaSuccess ? e : nullptr;
}

// Collectives run on the communicator's own stream. Each first waits (on the device) for
// an event of the compute stream: the point the caller marked (MarkReady: a gradient
// bucket as the backward produced it), or the compute stream's work queued so far; its
// end is an event the call polls. So a bucket's all-reduce overlaps the backward of the
// blocks after it, and no call waits for the whole compute stream to drain.
class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, const NcclOptions& o, float* scratch, cudaStream_t comm_stream,
                   cudaEvent_t ready, cudaEvent_t done)
      : comm_(comm), options_(o), stream_(static_cast<cudaStream_t>(o.stream)), comm_stream_(comm_stream),
        ready_(ready), done_(done), scratch_(scratch),
        who_("rank " + std::to_string(o.rank) + " of " + std::to_string(o.world_size)) {}
  ~NcclCommunicator() override {
    if (broken_.ok()) {
      // Flush what was issued, then free; a peer that is gone cannot hold this up past
      // the timeout (the communicator is aborted instead, which frees it).
      const ncclResult_t r = ncclCommFinalize(comm_);
      bool aborted = true;
      if (r == ncclSuccess || r == ncclInProgress) {
        aborted = !Await(comm_, nullptr, SteadyClock::now() + options_.timeout, "finalize", who_, options_.timeout).ok();
      } else {
        ncclCommAbort(comm_);
      }
      if (!aborted) ncclCommDestroy(comm_);
    }
    cudaStreamSynchronize(comm_stream_);
    cudaEventDestroy(ready_);
    cudaEventDestroy(done_);
    cudaStreamDestroy(comm_stream_);
    cudaFree(scratch_);
  }
  int rank() const override { return options_.rank; }
  int world_size() const override { return options_.world_size; }
  const char* Name() const override { return "nccl"; }

  std::shared_ptr<void> MarkReady() override {
    cudaError_t error;
    cudaEvent_t e = NewEvent(&error);
    if (e == nullptr) return nullptr;  // the collective then waits for all queued work
    if (cudaEventRecord(e, stream_) != cudaSuccess) {
      cudaEventDestroy(e);
      return nullptr;
    }
    return std::shared_ptr<void>(e, [](void* p) { cudaEventDestroy(static_cast<cudaEvent_t>(p)); });
  }
  Status AllReduceSumAfter(const std::shared_ptr<void>& ready, float* data, size_t n) override {
    return Run("all-reduce of " + std::to_string(n) + " floats", static_cast<cudaEvent_t>(ready.get()),
               [&] { return ncclAllReduce(data, data, n, ncclFloat32, ncclSum, comm_, comm_stream_); });
  }
  Status AllReduceSum(float* data, size_t n) override { return AllReduceSumAfter(nullptr, data, n); }
  Status AllReduceSum(double* data, size_t n) override {
    return Run("all-reduce of " + std::to_string(n) + " doubles", nullptr,
               [&] { return ncclAllReduce(data, data, n, ncclFloat64, ncclSum, comm_, comm_stream_); });
  }
  Status Broadcast(void* data, size_t bytes, int root) override {
    return Run("broadcast of " + std::to_string(bytes) + " bytes from rank " + std::to_string(root), nullptr,
               [&] { return ncclBroadcast(data, data, bytes, ncclChar, root, comm_, comm_stream_); });
  }
  Status AllGather(const void* send, void* recv, size_t bytes) override {
    return Run("all-gather of " + std::to_string(bytes) + " bytes", nullptr,
               [&] { return ncclAllGather(send, recv, bytes, ncclChar, comm_, comm_stream_); });
  }
  Status Barrier() override {
    return Run("barrier", nullptr,
               [&] { return ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, comm_stream_); });
  }

 private:
  // `ready`: the compute stream's event to follow; null: its work queued so far.
  template <typename Issue>
  Status Run(const std::string& what, cudaEvent_t ready, Issue issue) {
    if (!broken_.ok()) return Status(broken_.code(), "the communicator failed earlier: " + broken_.message());
    const auto deadline = SteadyClock::now() + options_.timeout;
    cudaError_t e = cudaSuccess;
    if (ready == nullptr) {
      ready = ready_;
      e = cudaEventRecord(ready_, stream_);
    }
    if (e == cudaSuccess) e = cudaStreamWaitEvent(comm_stream_, ready, 0);
    if (e != cudaSuccess) {
      broken_ = Status(StatusCode::kInternal, what + " on " + who_ + ": CUDA error " + cudaGetErrorString(e));
      ncclCommAbort(comm_);
      return broken_;
    }
    const ncclResult_t r = issue();
    if (r != ncclSuccess && r != ncclInProgress) {
      broken_ = Status(StatusCode::kUnavailable, what + " on " + who_ + ": " + NcclError(r, comm_));
      ncclCommAbort(comm_);
      return broken_;
    }
    // Recorded once NCCL has queued the collective (a non-blocking communicator may still
    // be enqueuing it: wait for that first).
    broken_ = Await(comm_, nullptr, deadline, what, who_, options_.timeout);
    if (!broken_.ok()) return broken_;
    if (cudaError_t d = cudaEventRecord(done_, comm_stream_); d != cudaSuccess) {
      broken_ = Status(StatusCode::kInternal, what + " on " + who_ + ": CUDA error " + cudaGetErrorString(d));
      ncclCommAbort(comm_);
      return broken_;
    }
    broken_ = Await(comm_, done_, deadline, what, who_, options_.timeout);
    return broken_;
  }

  ncclComm_t comm_;
  const NcclOptions options_;
  cudaStream_t stream_;       // the compute stream (the backend's)
  cudaStream_t comm_stream_;  // the collectives'
  cudaEvent_t ready_, done_;  // reused by every call (calls do not overlap)
  float* scratch_;            // one device float for the barrier
  const std::string who_;
  Status broken_;
};

}  // namespace

std::string NcclVersion() {
  int v = 0;
  if (ncclGetVersion(&v) != ncclSuccess) return "unknown";
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

StatusOr<std::unique_ptr<Communicator>> ConnectNccl(const NcclOptions& o, std::shared_ptr<Rendezvous> rendezvous) {
  if (o.world_size < 1 || o.rank < 0 || o.rank >= o.world_size) {
    return InvalidArgumentError("rank " + std::to_string(o.rank) + " is not in a world of " +
                                std::to_string(o.world_size));
  }
  const std::string who = "rank " + std::to_string(o.rank) + " of " + std::to_string(o.world_size);
  const auto deadline = SteadyClock::now() + o.timeout;
  auto set_device = [&]() -> Status {
    if (cudaError_t e = cudaSetDevice(o.device); e != cudaSuccess) {
      return FailedPreconditionError(who + ": CUDA device " + std::to_string(o.device) + ": " + cudaGetErrorString(e));
    }
    return OkStatus();
  };
  // Rank 0 checks its device before it publishes the id (a rank 0 without a GPU must not
  // leave the others waiting for a communicator that cannot form); the others take the id
  // first, so a missing rank 0 is reported as such.
  ncclUniqueId id;
  if (o.rank == 0) {
    RETURN_IF_ERROR(set_device());
    if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess) {
      return Status(StatusCode::kUnavailable, who + ": ncclGetUniqueId: " + ncclGetErrorString(r));
    }
    RETURN_IF_ERROR(rendezvous->Set(kNcclIdKey, std::string(id.internal, sizeof id.internal)));
  } else {
    StatusOr<std::string> got = rendezvous->Get(kNcclIdKey, o.timeout);
    if (!got.ok()) {
      const bool timeout = got.status().code() == StatusCode::kDeadlineExceeded;
      return Status(got.status().code(), "rendezvous of " + who +
                                             (timeout ? " timed out after " + Seconds(o.timeout) + ": rank 0 did not arrive"
                                                      : " failed") +
                                             " (" + got.status().message() + ")");
    }
    if (got->size() != sizeof id.internal) {
      return InvalidArgumentError(who + ": the rendezvous's " + std::string(kNcclIdKey) + " has " +
                                  std::to_string(got->size()) + " bytes, not " + std::to_string(sizeof id.internal));
    }
    std::memcpy(id.internal, got->data(), sizeof id.internal);
    RETURN_IF_ERROR(set_device());
  }
  float* scratch = nullptr;
  if (cudaError_t e = cudaMalloc(&scratch, sizeof(float)); e != cudaSuccess) {
    return Status(StatusCode::kResourceExhausted, who + ": cudaMalloc: " + cudaGetErrorString(e));
  }
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // every wait is ours, with the timeout
  ncclComm_t comm = nullptr;
  ncclResult_t r = ncclCommInitRankConfig(&comm, o.world_size, id, o.rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    const std::string why = NcclError(r, comm);
    if (comm != nullptr) ncclCommAbort(comm);
    cudaFree(scratch);
    return Status(StatusCode::kUnavailable, "communicator setup of " + who + " failed (nccl: " + why + ")");
  }
  if (Status st = Await(comm, nullptr, deadline, "communicator setup", who, o.timeout); !st.ok()) {
    cudaFree(scratch);
    return st;
  }
  cudaStream_t comm_stream = nullptr;
  cudaError_t e = cudaStreamCreateWithFlags(&comm_stream, cudaStreamNonBlocking);
  cudaEvent_t ready = e == cudaSuccess ? NewEvent(&e) : nullptr;
  cudaEvent_t done = e == cudaSuccess ? NewEvent(&e) : nullptr;
  if (e != cudaSuccess) {
    if (ready != nullptr) cudaEventDestroy(ready);
    if (comm_stream != nullptr) cudaStreamDestroy(comm_stream);
    ncclCommAbort(comm);
    cudaFree(scratch);
    return Status(StatusCode::kResourceExhausted, who + ": the collectives' stream and events: " + cudaGetErrorString(e));
  }
  return std::unique_ptr<Communicator>(new NcclCommunicator(comm, o, scratch, comm_stream, ready, done));
}

}  // namespace sinkscope

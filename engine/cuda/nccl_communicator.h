// The CUDA ranks' communicator over NCCL: one rank per GPU (NCCL refuses two ranks on
// one device). Buffers are device memory of the rank's device. Rank 0 makes the
// ncclUniqueId and hands it to the others through a Rendezvous (the coordinator in the
// service). The communicator is non-blocking (ncclConfig_t.blocking = 0): its setup and
// every collective are polled with ncclCommGetAsyncError and an event query against
// the timeout, and a peer that died or hangs makes the call abort the communicator
// (ncclCommAbort) and return DEADLINE_EXCEEDED or UNAVAILABLE naming the collective,
// never wait forever. Each collective runs on the communicator's own stream after an
// event of `stream` (the compute stream): the caller's MarkReady point, or everything
// queued so far; it has completed on return.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "engine/communicator.h"

namespace sinkscope {

struct NcclOptions {
  int rank = 0;
  int world_size = 1;
  int device = 0;                  // the CUDA device of this rank
  void* stream = nullptr;          // the compute stream (cudaStream_t) collectives follow; null: the default stream
  std::chrono::milliseconds timeout{60000};  // of the setup and of every collective
};

// The ncclUniqueId as bytes (rank 0 makes it; it needs no GPU), under this key.
inline constexpr const char* kNcclIdKey = "nccl/unique_id";

// Joins the gang: rank 0 sets kNcclIdKey, every rank waits for it (up to the timeout) and
// initialises its communicator. Errors name the rank, the device and NCCL's reason.
StatusOr<std::unique_ptr<Communicator>> ConnectNccl(const NcclOptions& options, std::shared_ptr<Rendezvous> rendezvous);

// NCCL's version as "2.28.9" (from the library, not the header).
std::string NcclVersion();

}  // namespace sinkscope

// Collectives between the ranks of one data-parallel run, over buffers of the rank's
// own backend (host memory on the CPU; device memory for a CUDA communicator). Every
// call is collective: all ranks make it, in the same order, with the same sizes. Each
// has the communicator's timeout: a rank that does not arrive, or hangs, makes the
// others fail with DEADLINE_EXCEEDED or UNAVAILABLE naming the collective, never wait
// forever. After a failure the communicator is unusable (the run restarts the gang).
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>

#include "base/status.h"

namespace sinkscope {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual const char* Name() const = 0;
  // data (n values, the same n on every rank) becomes the sum over the ranks, the same
  // bits on every rank.
  virtual Status AllReduceSum(float* data, size_t n) = 0;
  virtual Status AllReduceSum(double* data, size_t n) = 0;
  // root's `bytes` bytes of data into every rank's data.
  virtual Status Broadcast(void* data, size_t bytes, int root) = 0;
  // Every rank's `bytes` bytes of send, in rank order, into recv (world_size × bytes).
  virtual Status AllGather(const void* send, void* recv, size_t bytes) = 0;
  virtual Status Barrier() = 0;
  // Marks the point of the caller's device work that a later collective must follow (a
  // gradient bucket just produced by the backward): on NCCL an event recorded on the
  // compute stream, so the bucket's all-reduce waits for that work only, not for what the
  // backward queues after it. Null where a collective follows the caller's work anyway
  // (Gloo and one rank: host memory, written when the op returned).
  virtual std::shared_ptr<void> MarkReady() { return nullptr; }
  // AllReduceSum once the work before `ready` (from MarkReady; null: everything the
  // caller queued so far) is done.
  virtual Status AllReduceSumAfter(const std::shared_ptr<void>& ready, float* data, size_t n) {
    (void)ready;
    return AllReduceSum(data, n);
  }
};

// Where the ranks of a gang meet before they connect (Gloo's addresses, an ncclUniqueId):
// keys any rank sets and every rank may wait for. The service's is the coordinator; tests
// and one process use an in-memory one.
class Rendezvous {
 public:
  virtual ~Rendezvous() = default;
  virtual Status Set(const std::string& key, const std::string& value) = 0;
  // The key's value once a rank has set it; DEADLINE_EXCEEDED after `timeout`, or another
  // error when the rendezvous cannot go on (the attempt was cancelled, say).
  virtual StatusOr<std::string> Get(const std::string& key, std::chrono::milliseconds timeout) = 0;
};

// The communicator of a run of one rank: every collective is the identity.
std::unique_ptr<Communicator> MakeSingleRankCommunicator();

class Backend;

// Collectives over host values (a stop flag, the probes' per-head sums, a top-3): the
// communicator works on buffers of the rank's backend (device memory for NCCL, where a
// host pointer faults), so each value goes through one buffer of the backend, grown as
// needed and freed with this object. On the CPU that buffer is host memory too.
class HostStaging {
 public:
  explicit HostStaging(Backend& backend) : be_(backend) {}
  ~HostStaging();
  HostStaging(const HostStaging&) = delete;
  HostStaging& operator=(const HostStaging&) = delete;
  Status AllReduceSum(Communicator& comm, double* host, size_t n);
  Status Broadcast(Communicator& comm, void* host, size_t bytes, int root);
  // Every rank's `bytes` of send into recv (world_size × bytes), as Communicator::AllGather.
  Status AllGather(Communicator& comm, const void* send, void* recv, size_t bytes);

 private:
  StatusOr<char*> Buffer(size_t bytes);
  Backend& be_;
  void* buf_ = nullptr;
  size_t size_ = 0;
};

}  // namespace sinkscope

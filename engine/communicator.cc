#include "engine/communicator.h"

#include <cstring>
#include <string>

#include "engine/backend.h"

namespace sinkscope {
namespace {

class SingleRank final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  const char* Name() const override { return "single"; }
  Status AllReduceSum(float*, size_t) override { return OkStatus(); }
  Status AllReduceSum(double*, size_t) override { return OkStatus(); }
  Status Broadcast(void*, size_t, int) override { return OkStatus(); }
  Status AllGather(const void* send, void* recv, size_t bytes) override {
    if (send != recv) std::memmove(recv, send, bytes);
    return OkStatus();
  }
  Status Barrier() override { return OkStatus(); }
};

}  // namespace

std::unique_ptr<Communicator> MakeSingleRankCommunicator() { return std::make_unique<SingleRank>(); }

HostStaging::~HostStaging() {
  if (buf_ != nullptr) be_.Free(buf_);
}

StatusOr<char*> HostStaging::Buffer(size_t bytes) {
  if (bytes > size_) {
    if (buf_ != nullptr) be_.Free(buf_);
    buf_ = be_.AllocBytes(bytes);
    size_ = buf_ != nullptr ? bytes : 0;
  }
  if (buf_ == nullptr) {
    return InternalError("cannot allocate " + std::to_string(bytes) + " bytes on backend " + be_.Name() +
                         " to stage a collective of host values");
  }
  return static_cast<char*>(buf_);
}

Status HostStaging::AllReduceSum(Communicator& comm, double* host, size_t n) {
  if (n == 0) return OkStatus();
  ASSIGN_OR_RETURN(char* dev, Buffer(n * sizeof(double)));
  be_.ToDevice(dev, host, n * sizeof(double));
  RETURN_IF_ERROR(comm.AllReduceSum(reinterpret_cast<double*>(dev), n));
  be_.ToHost(host, dev, n * sizeof(double));
  return OkStatus();
}

Status HostStaging::Broadcast(Communicator& comm, void* host, size_t bytes, int root) {
  if (bytes == 0) return OkStatus();
  ASSIGN_OR_RETURN(char* dev, Buffer(bytes));
  be_.ToDevice(dev, host, bytes);
  RETURN_IF_ERROR(comm.Broadcast(dev, bytes, root));
  be_.ToHost(host, dev, bytes);
  return OkStatus();
}

Status HostStaging::AllGather(Communicator& comm, const void* send, void* recv, size_t bytes) {
  if (bytes == 0) return OkStatus();
  const size_t gathered = bytes * comm.world_size(), send_at = (gathered + 255) / 256 * 256;
  ASSIGN_OR_RETURN(char* dev, Buffer(send_at + bytes));
  be_.ToDevice(dev + send_at, send, bytes);
  RETURN_IF_ERROR(comm.AllGather(dev + send_at, dev, bytes));
  be_.ToHost(recv, dev, gathered);
  return OkStatus();
}

}  // namespace sinkscope

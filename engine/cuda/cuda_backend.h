// The CUDA backend. Today it is the fp32 mode of issue 11: every op of backend.h on the
// device in fp32 (cuBLASLt GEMMs with fp32 compute, no TF32; a tiled flash attention of
// our own, O(T) memory), deterministic (no floating-point atomics), so a GPU step can be held to
// the CPU backend at fp32 tolerances. The bf16 training path (bf16 activations, cuDNN
// flash attention, fused kernels) builds on this one; see docs/design/CUDA.md.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "base/status.h"
#include "engine/backend.h"

namespace sinkscope {

struct CudaDeviceInfo {
  int index = 0;
  std::string name;          // e.g. "NVIDIA H200"
  size_t total_memory = 0;   // bytes
  int compute_major = 0, compute_minor = 0;
  int multiprocessors = 0;
};

// How many CUDA devices this process sees (0 without a driver or a device; never fails).
int CudaDeviceCount();
// The device's description, or an error naming why there is none.
StatusOr<CudaDeviceInfo> DescribeCudaDevice(int index);
// A backend on device `index` (its own stream, cuBLASLt handle and workspace), or an
// error naming what is missing (no driver, no such device, out of memory).
StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int index = 0);
// The cudaStream_t a backend made by MakeCudaBackend queues its work on (so NCCL's
// collectives run in order behind it), or null for any other backend.
void* CudaStreamOf(Backend& backend);
// Makes the backend's device current on the calling thread (the CUDA runtime's current
// device is per thread: a backend made on one thread and used on another needs this);
// OK for any other backend.
Status CudaBindThread(Backend& backend);

}  // namespace sinkscope

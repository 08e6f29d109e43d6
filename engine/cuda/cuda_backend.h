// The CUDA backend: every op of backend.h on the device (cuBLASLt GEMMs; a tiled flash
// attention of our own, O(T) memory), deterministic (no floating-point atomics), in two
// modes (CudaPrecision below): fp32, held to the CPU backend at fp32 tolerances, and
// bf16, held to the CPU backend's bf16 mode. See docs/design/CUDA.md.
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
// The CUDA backend's two modes.
//   kFp32: every activation fp32, fp32 GEMMs (no TF32): held to the CPU backend at fp32
//     tolerances (the parity mode).
//   kBf16: the training default. Activations in bf16 exactly where the bf16 contract
//     stores them (engine/backend.h, MakeCpuBf16Backend, whose numbers it is held to);
//     GEMMs on bf16 operands with fp32 accumulation, each parameter read through a bf16
//     copy the AdamW kernel writes; fp32 master weights, gradients, optimizer state and
//     residual stream. The attention arms stay fp32-only (Supports(kAttentionArms) false).
enum class CudaPrecision { kFp32, kBf16 };
// A backend on device `index` (its own stream, cuBLASLt handle and workspace), or an
// error naming what is missing (no driver, no such device, out of memory).
StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int index = 0, CudaPrecision precision = CudaPrecision::kFp32);
// Whether a backend made by MakeCudaBackend has run attention through cuDNN (the bf16
// mode on a GPU, unless SINKSCOPE_ATTENTION=tiled or cuDNN refused every shape); false for
// any other backend and under the CPU emulation (which has no cuDNN).
bool CudaAttentionRanThroughCudnn(Backend& backend);
// The cudaStream_t a backend made by MakeCudaBackend queues its work on (so NCCL's
// collectives run in order behind it), or null for any other backend.
void* CudaStreamOf(Backend& backend);
// Makes the backend's device current on the calling thread (the CUDA runtime's current
// device is per thread: a backend made on one thread and used on another needs this);
// OK for any other backend.
Status CudaBindThread(Backend& backend);

}  // namespace sinkscope

// The CUDA backend on device 0 for a test, or why there is none (no device visible, or
// the backend's own error): the CUDA tests skip with that reason on a machine without a
// GPU (scripts/gpu/run.sh runs them on one).
#pragma once

#include <memory>
#include <string>

#include "engine/backend.h"
#include "engine/cuda/cuda_backend.h"

namespace sinkscope {

inline std::unique_ptr<Backend> MakeCudaOrSkipReason(std::string* why,
                                                     CudaPrecision precision = CudaPrecision::kFp32) {
  if (CudaDeviceCount() == 0) {
    *why = "no CUDA device is visible to this process (the CUDA tests run on a GPU machine: scripts/gpu/run.sh)";
    return nullptr;
  }
  auto backend = MakeCudaBackend(0, precision);
  if (!backend.ok()) {
    *why = backend.status().message();
    return nullptr;
  }
  return std::move(*backend);
}

}  // namespace sinkscope

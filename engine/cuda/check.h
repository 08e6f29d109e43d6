// Error text for CUDA runtime and cuBLAS calls: the call as written, the file and line,
// and the library's own name for the error, so a device error read in a log says where.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>

namespace sinkscope::cuda {

inline std::string DescribeCudaError(cudaError_t e, const char* call, const char* file, int line) {
  return std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " + cudaGetErrorName(e) + " (" +
         cudaGetErrorString(e) + ")";
}

inline std::string DescribeCublasError(cublasStatus_t e, const char* call, const char* file, int line) {
  return std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " + cublasGetStatusName(e) + " (" +
         cublasGetStatusString(e) + ")";
}

}  // namespace sinkscope::cuda

// Where a worker or a local tool trains: the device named on its command line
// ("cpu", "cuda", "cuda:N"), the backend for it, and what the device is (for a worker's
// capabilities and for MFU). The CUDA backend is linked in only where this build has it
// (SINKSCOPE_HAVE_CUDA); elsewhere "cuda" is refused saying so.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "base/status.h"
#include "engine/backend.h"

namespace sinkscope {

struct DeviceChoice {
  enum Kind { kCpu, kCuda } kind = kCpu;
  int index = 0;  // kCuda: the device ordinal
  std::string Name() const;  // "cpu", "cuda:0"
};

// "cpu", "cuda" (device 0) or "cuda:N"; anything else is an error naming the text and
// what is accepted.
StatusOr<DeviceChoice> ParseDevice(std::string_view text);

// Whether this build has the CUDA backend.
bool CudaBackendBuilt();

struct DeviceDescription {
  std::string name;          // "cpu" or e.g. "NVIDIA H200"
  int64_t memory_bytes = 0;  // the device's memory (CUDA) or 0 (the caller measures host memory)
  // Dense bf16 tensor-core peak from the device table (METRICS.md, MFU), FLOP/s; 0 when
  // the device is not in the table (the caller measures a GEMM rate instead).
  double table_peak_flops = 0;
};

// A GPU backend's arithmetic: bf16 (the default for training on a GPU: bf16 activations
// and GEMM operands, fp32 master weights and accumulation) or fp32 (tight parity with the
// CPU backend; the attention arms, which have no bf16 contract yet).
enum class GpuPrecision { kBf16, kFp32 };
// The backend on the chosen device, or an error naming what is missing (a build without
// CUDA, no driver, no such device). The CPU backend is fp32 whatever `gpu_precision`.
StatusOr<std::unique_ptr<Backend>> MakeBackendFor(const DeviceChoice& device,
                                                  GpuPrecision gpu_precision = GpuPrecision::kBf16);
StatusOr<DeviceDescription> DescribeDevice(const DeviceChoice& device);

// The device table: dense bf16 peak of a GPU by its name (H100, H200: 989 TFLOP/s;
// A100: 312 TFLOP/s), 0 when unknown.
double TablePeakFlops(std::string_view device_name);

}  // namespace sinkscope

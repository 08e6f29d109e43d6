// The CUDA emulation's host side, as the stand-ins for the CUDA runtime and cuBLASLt
// (runtime.cc, cublaslt.cc) and the tools that read a dry run see it. The emulation runs
// the CUDA backend's kernels on the CPU, from the same sources nvcc builds
// (docs/design/CUDA_EMULATION.md): device memory is host memory with guard pages and a
// poison fill, every stream executes in call order, and the device is the committed
// description in engine/cuda/devices/.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace sinkscope::emu {

// ---- device memory -------------------------------------------------------------------
// True when [p, p + bytes) lies inside one live device allocation (cudaMalloc).
bool IsDeviceRange(const void* p, size_t bytes);
// OK, or a message naming `what`, the pointer and the allocation it falls outside of (or
// that it is not device memory at all). bytes 0 checks the pointer alone.
std::string CheckDeviceRange(const void* p, size_t bytes, const std::string& what);

// Bytes of the live device allocations (as cudaMalloc was asked), and their peak since the
// last reset: the dry run's device-memory figures.
size_t LiveDeviceBytes();
size_t PeakDeviceBytes();
void ResetPeakDeviceBytes();

// ---- errors ----------------------------------------------------------------------------
// Records a failure of the current call: `code` becomes the last error (cudaGetLastError)
// and, for a fault, the sticky error of the context; `detail` (kernel, launch site, limit)
// is printed once to stderr and added to cudaGetErrorString's text for that code.
void RecordError(cudaError_t code, const std::string& detail, bool sticky);
// The context's sticky error (cudaSuccess when none).
cudaError_t StickyError();

// ---- the device --------------------------------------------------------------------------
// The properties of the emulated device (engine/cuda/devices/h200.json's figures).
const cudaDeviceProp& DeviceProperties();

// ---- dry runs ---------------------------------------------------------------------------------
// In a dry run kernels and GEMMs are recorded and not executed, device memory is reserved
// but not touched, and copies to the host read zeros: one training step at a paper shape
// is traced without the hours it would take on a CPU.
void SetDryRun(bool on);
bool DryRun();

// What a launch site declares it must at least move (bytes to and from device memory) and
// compute (FLOPs), for the dry run's roofline (SINKSCOPE_COST beside the launch).
struct Cost {
  double bytes = -1, flops = -1;  // -1: not declared
};

struct TraceRecord {
  enum Kind { kKernel, kGemm, kCopy } kind = kKernel;
  std::string name;  // kernel name, or "gemm"
  std::string site;  // file:line of the launch or the cuBLASLt call
  // Kernels: grid, block and dynamic shared bytes.
  unsigned grid[3] = {1, 1, 1}, block[3] = {1, 1, 1};
  size_t dynamic_shared = 0;
  // GEMMs: m, n, k as cuBLASLt sees them (column-major), batch count and the types.
  int64_t m = 0, n = 0, k = 0, batch = 1;
  std::string types;  // e.g. "A=32F B=32F C=32F compute=32F"
  Cost cost;          // GEMMs: 2·m·n·k·batch FLOPs, operand and result bytes
};
// Starts recording every launch, GEMM and copy (cleared); StopTrace returns them.
void StartTrace();
std::vector<TraceRecord> StopTrace();
// Adds a record when a trace is on (the cuBLASLt stand-in's GEMMs).
void Trace(TraceRecord record);

}  // namespace sinkscope::emu

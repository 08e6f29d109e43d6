#include "training/devices.h"

#include <charconv>

#ifdef SINKSCOPE_WITH_CUDA
#include "engine/cuda/cuda_backend.h"
#endif

namespace sinkscope {

std::string DeviceChoice::Name() const { return kind == kCpu ? "cpu" : "cuda:" + std::to_string(index); }

StatusOr<DeviceChoice> ParseDevice(std::string_view text) {
  DeviceChoice d;
  if (text == "cpu") return d;
  const std::string bad = "device \"" + std::string(text) + "\": ";
  if (text.substr(0, 4) != "cuda") return InvalidArgumentError(bad + "expected cpu, cuda or cuda:N");
  d.kind = DeviceChoice::kCuda;
  if (text.size() == 4) return d;
  if (text[4] != ':' || text.size() == 5) return InvalidArgumentError(bad + "expected cpu, cuda or cuda:N");
  const char* first = text.data() + 5;
  const char* last = text.data() + text.size();
  auto [end, ec] = std::from_chars(first, last, d.index);
  if (ec != std::errc() || end != last || d.index < 0 || d.index > 1023) {
    return InvalidArgumentError(bad + "N in cuda:N must be a device ordinal 0…1023");
  }
  return d;
}

bool CudaBackendBuilt() {
#ifdef SINKSCOPE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

double TablePeakFlops(std::string_view name) {
  if (name.find("H100") != std::string_view::npos || name.find("H200") != std::string_view::npos) return 989.4e12;
  if (name.find("A100") != std::string_view::npos) return 312e12;
  return 0;
}

#ifndef SINKSCOPE_WITH_CUDA
namespace {
Status NoCudaBuilt(const DeviceChoice& d) {
  return FailedPreconditionError("device " + d.Name() +
                                 ": this build has no CUDA backend (configure with -DSINKSCOPE_CUDA=ON on a "
                                 "machine with the CUDA toolkit, or use the CUDA worker image)");
}
}  // namespace
#endif

StatusOr<std::unique_ptr<Backend>> MakeBackendFor(const DeviceChoice& d, GpuPrecision gpu_precision) {
  if (d.kind == DeviceChoice::kCpu) return MakeCpuBackend();
#ifdef SINKSCOPE_WITH_CUDA
  auto b = MakeCudaBackend(d.index, gpu_precision == GpuPrecision::kBf16 ? CudaPrecision::kBf16 : CudaPrecision::kFp32);
  if (!b.ok()) return Status(b.status().code(), "device " + d.Name() + ": " + b.status().message());
  return std::move(*b);
#else
  (void)gpu_precision;
  return NoCudaBuilt(d);
#endif
}

StatusOr<DeviceDescription> DescribeDevice(const DeviceChoice& d) {
  DeviceDescription out;
  if (d.kind == DeviceChoice::kCpu) {
    out.name = "cpu";
    return out;
  }
#ifdef SINKSCOPE_WITH_CUDA
  auto info = DescribeCudaDevice(d.index);
  if (!info.ok()) return Status(info.status().code(), "device " + d.Name() + ": " + info.status().message());
  out.name = info->name;
  out.memory_bytes = static_cast<int64_t>(info->total_memory);
  out.table_peak_flops = TablePeakFlops(info->name);
  return out;
#else
  return NoCudaBuilt(d);
#endif
}

}  // namespace sinkscope

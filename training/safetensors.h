// Hugging Face safetensors files: an 8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the raw data.
// Reading accepts F32, F64, BF16 and F16; writing produces F32.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "base/files.h"
#include "base/status.h"

namespace sinkscope {

struct HostTensor {
  std::vector<int64_t> shape;
  std::vector<double> values;  // converted from the stored dtype
  size_t numel() const { return values.size(); }
};

struct SafetensorsFile {
  std::map<std::string, HostTensor> tensors;
  std::map<std::string, std::string> metadata;
};

// Errors name the file and what is wrong (missing, truncated, bad header, offsets). The
// tensors' byte ranges must tile the data section as the format requires: in the order
// of their offsets, from 0 to its end, no overlap and no gap (the error names the tensors
// and their ranges).
StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path);

// The same tensors as stored, not converted: the file is held once (a shard of a large
// model in bf16 costs its own size, not four times it). `data` points into `buffer` or
// into `owned` (tensors rewritten after reading, e.g. GLM's split gate_up_proj).
struct RawTensor {
  std::string dtype;  // F32, F64, BF16, F16
  std::vector<int64_t> shape;
  const char* data = nullptr;
  size_t bytes = 0;
  size_t width = 0;  // bytes per element
  size_t numel() const { return width ? bytes / width : 0; }
};
struct RawSafetensors {
  std::string buffer;
  std::map<std::string, RawTensor> tensors;
  std::map<std::string, std::string> metadata;
  std::deque<std::string> owned;
};
StatusOr<std::unique_ptr<RawSafetensors>> ReadSafetensorsRaw(const std::string& path);
// Element i as a double.
double RawValue(const RawTensor& tensor, size_t i);
// The index of the first element that is NaN or ±inf as stored; -1 when every one is finite.
int64_t FirstNonFinite(const RawTensor& tensor);

struct TensorToWrite {
  std::string name;
  std::vector<int64_t> shape;
  const float* data;  // host, numel floats
};
// Writes F32 tensors atomically (temporary file, fsync, rename).
Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                        const std::map<std::string, std::string>& metadata);


}  // namespace sinkscope

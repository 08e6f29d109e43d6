// Hugging Face safetensors files: an 8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the raw data.
// Reading accepts F32, F64, BF16 and F16; writing produces F32.
#pragma once

#include <cstdint>
#include <map>
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

// Errors name the file and what is wrong (missing, truncated, bad header, offsets).
StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path);

struct TensorToWrite {
  std::string name;
  std::vector<int64_t> shape;
  const float* data;  // host, numel floats
};
// Writes F32 tensors atomically (temporary file, fsync, rename).
Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                        const std::map<std::string, std::string>& metadata);


}  // namespace sinkscope

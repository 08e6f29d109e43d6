#include "training/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "base/files.h"
#include "data/data.h"

namespace sinkscope {
namespace {

double Bf16ToDouble(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

double F16ToDouble(uint16_t h) {
  const int sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  double v;
  if (exp == 0) {
    v = std::ldexp(mant, -24);
  } else if (exp == 31) {
    v = mant ? NAN : INFINITY;
  } else {
    v = std::ldexp(mant + 1024, exp - 25);
  }
  return sign ? -v : v;
}

}  // namespace

StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path) {
  ASSIGN_OR_RETURN(const std::string bytes, ReadRegularFile(path, path));
  if (bytes.size() < 8) return DataLossError(path + ": truncated (shorter than the 8-byte header length)");
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  if (header_len > bytes.size() - 8) {
    return DataLossError(path + ": header length " + std::to_string(header_len) + " exceeds the file size");
  }
  nlohmann::json header = nlohmann::json::parse(bytes.substr(8, header_len), nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) return DataLossError(path + ": header is not a JSON object");
  const size_t data_start = 8 + header_len;
  const size_t data_len = bytes.size() - data_start;
  SafetensorsFile file;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      for (auto m = it.value().begin(); m != it.value().end(); ++m) {
        if (m.value().is_string()) file.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const auto& e = it.value();
    if (!e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets")) {
      return DataLossError(path + ": tensor " + it.key() + " lacks dtype, shape or data_offsets");
    }
    const std::string dtype = e["dtype"].get<std::string>();
    HostTensor t;
    size_t numel = 1;
    for (const auto& s : e["shape"]) {
      t.shape.push_back(s.get<int64_t>());
      numel *= static_cast<size_t>(t.shape.back());
    }
    const size_t begin = e["data_offsets"][0].get<size_t>(), end = e["data_offsets"][1].get<size_t>();
    size_t width = 0;
    if (dtype == "F32") width = 4;
    else if (dtype == "F64") width = 8;
    else if (dtype == "BF16" || dtype == "F16") width = 2;
    else return InvalidArgumentError(path + ": tensor " + it.key() + " has unsupported dtype " + dtype);
    if (end < begin || end > data_len || end - begin != numel * width) {
      return DataLossError(path + ": tensor " + it.key() + " has data_offsets [" + std::to_string(begin) + ", " +
                           std::to_string(end) + ") inconsistent with its shape or the file size");
    }
    const char* p = bytes.data() + data_start + begin;
    t.values.resize(numel);
    for (size_t i = 0; i < numel; ++i) {
      if (width == 4) {
        float f;
        std::memcpy(&f, p + 4 * i, 4);
        t.values[i] = f;
      } else if (width == 8) {
        std::memcpy(&t.values[i], p + 8 * i, 8);
      } else {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        t.values[i] = dtype == "BF16" ? Bf16ToDouble(h) : F16ToDouble(h);
      }
    }
    file.tensors.emplace(it.key(), std::move(t));
  }
  return file;
}

Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0;
  for (const auto& t : tensors) {
    size_t numel = 1;
    for (int64_t s : t.shape) numel *= static_cast<size_t>(s);
    header[t.name] = {{"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + 4 * numel}}};
    offset += 4 * numel;
  }
  std::string h = header.dump();
  while ((8 + h.size()) % 8 != 0) h.push_back(' ');  // align the data to 8 bytes
  std::string bytes(8, '\0');
  const uint64_t len = h.size();
  std::memcpy(bytes.data(), &len, 8);
  bytes += h;
  // nlohmann orders keys alphabetically, so data follows the order of `tensors` by offset.
  for (const auto& t : tensors) {
    size_t numel = 1;
    for (int64_t s : t.shape) numel *= static_cast<size_t>(s);
    bytes.append(reinterpret_cast<const char*>(t.data), 4 * numel);
  }
  return WriteFileAtomically(path, bytes);
}

}  // namespace sinkscope

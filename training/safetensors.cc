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

StatusOr<std::unique_ptr<RawSafetensors>> ReadSafetensorsRaw(const std::string& path) {
  auto file = std::make_unique<RawSafetensors>();
  ASSIGN_OR_RETURN(file->buffer, ReadRegularFile(path, path));
  const std::string& bytes = file->buffer;
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
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      for (auto m = it.value().begin(); m != it.value().end(); ++m) {
        if (m.value().is_string()) file->metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const auto& e = it.value();
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets") ||
        !e["dtype"].is_string() || !e["shape"].is_array() || !e["data_offsets"].is_array() ||
        e["data_offsets"].size() != 2) {
      return DataLossError(path + ": tensor " + it.key() + " lacks dtype, shape or data_offsets");
    }
    RawTensor t;
    t.dtype = e["dtype"].get<std::string>();
    size_t numel = 1;
    for (const auto& dim : e["shape"]) {
      if (!dim.is_number_integer() || dim.get<int64_t>() < 0) return DataLossError(path + ": tensor " + it.key() + " has a bad shape");
      t.shape.push_back(dim.get<int64_t>());
      numel *= static_cast<size_t>(t.shape.back());
    }
    const size_t begin = e["data_offsets"][0].get<size_t>(), end = e["data_offsets"][1].get<size_t>();
    if (t.dtype == "F32") t.width = 4;
    else if (t.dtype == "F64") t.width = 8;
    else if (t.dtype == "BF16" || t.dtype == "F16") t.width = 2;
    else return InvalidArgumentError(path + ": tensor " + it.key() + " has unsupported dtype " + t.dtype);
    if (end < begin || end > data_len || end - begin != numel * t.width) {
      return DataLossError(path + ": tensor " + it.key() + " has data_offsets [" + std::to_string(begin) + ", " +
                           std::to_string(end) + ") inconsistent with its shape or the file size");
    }
    t.data = bytes.data() + data_start + begin;
    t.bytes = end - begin;
    file->tensors.emplace(it.key(), std::move(t));
  }
  return file;
}

double RawValue(const RawTensor& t, size_t i) {
  if (t.width == 4) {
    float f;
    std::memcpy(&f, t.data + 4 * i, 4);
    return f;
  }
  if (t.width == 8) {
    double d;
    std::memcpy(&d, t.data + 8 * i, 8);
    return d;
  }
  uint16_t h;
  std::memcpy(&h, t.data + 2 * i, 2);
  return t.dtype == "BF16" ? Bf16ToDouble(h) : F16ToDouble(h);
}

StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path) {
  ASSIGN_OR_RETURN(std::unique_ptr<RawSafetensors> raw, ReadSafetensorsRaw(path));
  SafetensorsFile file;
  file.metadata = raw->metadata;
  for (const auto& [name, r] : raw->tensors) {
    HostTensor t;
    t.shape = r.shape;
    t.values.resize(r.numel());
    for (size_t i = 0; i < t.values.size(); ++i) t.values[i] = RawValue(r, i);
    file.tensors.emplace(name, std::move(t));
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

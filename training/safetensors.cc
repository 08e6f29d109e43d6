#include "training/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <tuple>

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

// The format's rule (its reference implementation's `validate`, which refuses with
// InvalidOffset or MetadataIncompleteBuffer): the tensors' byte ranges, in the order of
// their offsets, follow one another from 0 to the end of the data section, with no
// overlap and no gap. Two tensors sharing bytes (v_proj pointing at k_proj's) would
// otherwise load as the same weights.
Status CheckRangesTileTheData(const std::string& path, const RawSafetensors& file, size_t data_len) {
  struct Range {
    size_t begin, end;
    const std::string* name;
  };
  std::vector<Range> ranges;
  const char* const data = file.buffer.data() + (file.buffer.size() - data_len);
  for (const auto& [name, t] : file.tensors) {
    const size_t begin = static_cast<size_t>(t.data - data);
    ranges.push_back({begin, begin + t.bytes, &name});
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return std::tie(a.begin, a.end, *a.name) < std::tie(b.begin, b.end, *b.name); });
  auto span = [](const Range& r) {
    return "[" + std::to_string(r.begin) + ", " + std::to_string(r.end) + ")";
  };
  size_t covered = 0;
  const Range* previous = nullptr;
  for (const Range& r : ranges) {
    if (r.begin < covered) {
      return DataLossError(path + ": tensor " + *r.name + "'s data_offsets " + span(r) + " overlap tensor " +
                           *previous->name + "'s " + span(*previous) +
                           " (each tensor must have bytes of its own)");
    }
    if (r.begin > covered) {
      return DataLossError(path + ": bytes [" + std::to_string(covered) + ", " + std::to_string(r.begin) +
                           ") of the data section belong to no tensor (" +
                           (previous ? "between tensor " + *previous->name + "'s " + span(*previous) + " and" : "before") +
                           " tensor " + *r.name + "'s " + span(r) + ")");
    }
    covered = r.end;
    previous = &r;
  }
  if (covered != data_len) {
    return DataLossError(path + ": the data section holds " + std::to_string(data_len) + " bytes; the tensors cover [0, " +
                         std::to_string(covered) + ")" + (previous ? ", ending with tensor " + *previous->name : ""));
  }
  return OkStatus();
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
    if (!e["data_offsets"][0].is_number_unsigned() || !e["data_offsets"][1].is_number_unsigned()) {
      return DataLossError(path + ": tensor " + it.key() + " has data_offsets " + e["data_offsets"].dump() +
                           ", not two byte offsets");
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
  RETURN_IF_ERROR(CheckRangesTileTheData(path, *file, data_len));
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

int64_t FirstNonFinite(const RawTensor& t) {
  const size_t n = t.numel();
  if (t.width == 2) {  // all exponent bits set: ±inf or NaN
    const uint16_t mask = t.dtype == "BF16" ? 0x7f80 : 0x7c00;
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, t.data + 2 * i, 2);
      if ((h & mask) == mask) return static_cast<int64_t>(i);
    }
    return -1;
  }
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(RawValue(t, i))) return static_cast<int64_t>(i);
  }
  return -1;
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

#include "engine/tensor.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "engine/backend.h"

namespace sinkscope {

size_t DTypeBytes(DType dtype) {
  switch (dtype) {
    case DType::kF32: return 4;
    case DType::kBF16: return 2;
    case DType::kF16: return 2;
    case DType::kI32: return 4;
    case DType::kF64: return 8;
  }
  return 0;
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "f32";
    case DType::kBF16: return "bf16";
    case DType::kF16: return "f16";
    case DType::kI32: return "i32";
    case DType::kF64: return "f64";
  }
  return "?";
}

float* TensorView::f32(const char* where) const {
  if (dtype != DType::kF32 && data != nullptr) {
    std::fprintf(stderr, "sinkscope: a %s tensor view reached %s, which reads fp32 only\n", DTypeName(dtype), where);
    std::abort();
  }
  return static_cast<float*>(data);
}

size_t Arena::Reserve(DType dtype, int64_t rows, int64_t cols) {
  const size_t bytes = static_cast<size_t>(rows) * static_cast<size_t>(cols) * DTypeBytes(dtype);
  plan_.push_back({dtype, rows, cols, total_});
  total_ += (bytes + kAlign - 1) / kAlign * kAlign;
  return plan_.size() - 1;
}

Status Arena::Commit(const std::string& what) {
  if (base_ != nullptr) return FailedPreconditionError(what + ": the arena is already allocated");
  base_ = backend_->AllocBytes(std::max<size_t>(total_, kAlign));
  if (base_ == nullptr) {
    char size[64];
    std::snprintf(size, sizeof size, "%.3f GiB", static_cast<double>(total_) / (1u << 30));
    return Status(StatusCode::kResourceExhausted,
                  what + " need " + size + " in one buffer, and the " + backend_->Name() + " backend cannot allocate it");
  }
  return OkStatus();
}

TensorView Arena::View(size_t handle) const {
  const Planned& p = plan_.at(handle);
  TensorView v;
  v.data = base_ == nullptr ? nullptr : static_cast<char*>(base_) + p.offset;
  v.dtype = p.dtype;
  v.rows = p.rows;
  v.cols = p.cols;
  v.ld = p.cols;
  return v;
}

void Arena::Release() {
  if (base_ != nullptr) backend_->Free(base_);
  base_ = nullptr;
  plan_.clear();
  total_ = 0;
}

}  // namespace sinkscope

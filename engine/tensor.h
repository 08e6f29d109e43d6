// Typed views of backend memory and the arenas they come from.
//
// A TensorView is a row-major matrix in a backend buffer: its element type, rows, columns
// and leading dimension (elements between the starts of two rows, ≥ cols). An Arena is
// one aligned backend allocation carved into views: a model plans every activation of a
// batch shape (Reserve), allocates them at once (Commit: one allocation, one clear error
// naming the bytes when the device cannot hold them), and releases them together. Each
// view starts on a kAlign-byte boundary of the buffer, which the backends allocate
// kAlign-aligned (CPU: aligned_alloc; CUDA: cudaMalloc), as vectorised loads and
// cuBLASLt/cuDNN want.
//
// The Backend's ops take the activations a backend may store in 16 bits as views (their
// dtype is the backend's ActivationDType, or fp32 where the bf16 contract keeps fp32:
// engine/backend.h); weights, gradients and scalars stay fp32 pointers. An fp32 pointer
// converts to a view of unknown shape (rows = cols = 0), the shape being the op's own
// arguments: that is how weights and tests pass fp32 buffers to a view argument.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"

namespace sinkscope {

class Backend;

enum class DType : uint8_t { kF32, kBF16, kF16, kI32, kF64 };
size_t DTypeBytes(DType dtype);
const char* DTypeName(DType dtype);  // "f32", "bf16", "f16", "i32", "f64"

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t rows = 0, cols = 0, ld = 0;  // ld in elements, ≥ cols; all 0 when the op's arguments give the shape

  TensorView() = default;
  TensorView(std::nullptr_t) {}  // NOLINT(google-explicit-constructor): an absent tensor
  // An fp32 buffer whose shape the op's arguments give. Views do not carry constness:
  // the op's documentation says which arguments it reads and which it writes.
  TensorView(float* p) : data(p) {}                             // NOLINT(google-explicit-constructor)
  TensorView(const float* p) : data(const_cast<float*>(p)) {}  // NOLINT(google-explicit-constructor)
  TensorView(void* p, DType t, int64_t r, int64_t c, int64_t l) : data(p), dtype(t), rows(r), cols(c), ld(l) {}

  size_t elements() const { return static_cast<size_t>(rows) * static_cast<size_t>(ld); }
  size_t bytes() const { return elements() * DTypeBytes(dtype); }
  bool is_f32() const { return dtype == DType::kF32; }
  explicit operator bool() const { return data != nullptr; }
  // The data as fp32. A view of another dtype reaching code written for fp32 is a bug in
  // the caller: it aborts, naming the dtype and `where`, rather than read bytes wrongly.
  float* f32(const char* where = "an fp32 op") const;
  // The view from element `offset` on (row-major, counted in elements of its dtype): the
  // rows of a chunk. Its shape is left to the op's arguments.
  TensorView From(size_t offset) const {
    return {data == nullptr ? nullptr : static_cast<char*>(data) + offset * DTypeBytes(dtype), dtype, 0, 0, 0};
  }
};

class Arena {
 public:
  static constexpr size_t kAlign = 256;
  explicit Arena(Backend* backend) : backend_(backend) {}
  ~Arena() { Release(); }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // Plans a rows × cols view (ld = cols; a 0-sized view is allowed and gets no bytes);
  // returns its handle. Only before Commit.
  size_t Reserve(DType dtype, int64_t rows, int64_t cols);
  // One zero-filled backend allocation of bytes() for every planned view. `what` names
  // the memory in the error (e.g. "activations for 8 × 1024 tokens").
  Status Commit(const std::string& what);
  // A committed view.
  TensorView View(size_t handle) const;
  size_t bytes() const { return total_; }
  size_t views() const { return plan_.size(); }
  bool committed() const { return base_ != nullptr; }
  // Frees the buffer and forgets the plan.
  void Release();

 private:
  struct Planned {
    DType dtype;
    int64_t rows, cols;
    size_t offset;
  };
  Backend* backend_;
  std::vector<Planned> plan_;
  size_t total_ = 0;
  void* base_ = nullptr;
};

}  // namespace sinkscope

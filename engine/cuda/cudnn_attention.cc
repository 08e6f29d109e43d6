#include "engine/cuda/cudnn_attention.h"

#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <source_location>
#include <utility>

namespace sinkscope::cuda {
namespace {

// ---------------------------------------------------------------------------------------
// Errors: every cuDNN call names itself, the descriptor and attribute, where it was made,
// and cuDNN's own last message (which says far more than the status code).

std::string SourceFile(const std::source_location& where) {
  std::string file = where.file_name();
  const size_t engine = file.rfind("engine/");
  return engine == std::string::npos ? file : file.substr(engine);
}

// cuDNN's last message on this thread; reading it clears it. Warnings of calls that
// succeeded leave text there too (the heuristics explain every engine config they drop), so
// it is cleared before each call whose failure will quote it.
std::string LastCudnnError() {
  std::string message(1 << 16, '\0');
  cudnnGetLastErrorString(message.data(), message.size());
  message.resize(std::strlen(message.c_str()));
  while (!message.empty() && (message.back() == '\n' || message.back() == ' ')) message.pop_back();
  return message;
}
void ClearLastCudnnError() {
  char none[1];  // a read of any length clears the message
  cudnnGetLastErrorString(none, sizeof none);
}

StatusCode CodeOf(cudnnStatus_t status) {
  switch (CUDNN_STATUS_CATEGORY(status)) {
    case CUDNN_STATUS_BAD_PARAM:
      return StatusCode::kInvalidArgument;
    case CUDNN_STATUS_NOT_SUPPORTED:
      return StatusCode::kUnimplemented;
    case CUDNN_STATUS_NOT_INITIALIZED:  // 1000s: no library, version mismatch
      return StatusCode::kFailedPrecondition;
    default:
      return StatusCode::kInternal;
  }
}

Status CudnnFailure(cudnnStatus_t status, const std::string& call, const std::source_location& where) {
  std::string message = call + " failed at " + SourceFile(where) + ":" + std::to_string(where.line()) + ": " +
                        cudnnGetErrorString(status) + " (" + std::to_string(static_cast<int>(status)) + ")";
  const std::string last = LastCudnnError();
  if (!last.empty()) message += ": " + last;
  return Status(CodeOf(status), message);
}

Status CheckCudnn(cudnnStatus_t status, const std::string& call,
                  const std::source_location& where = std::source_location::current()) {
  return status == CUDNN_STATUS_SUCCESS ? OkStatus() : CudnnFailure(status, call, where);
}

Status CheckCuda(cudaError_t error, const std::string& call,
                 const std::source_location& where = std::source_location::current()) {
  if (error == cudaSuccess) return OkStatus();
  return InternalError(call + " failed at " + SourceFile(where) + ":" + std::to_string(where.line()) + ": " +
                       cudaGetErrorName(error) + ": " + cudaGetErrorString(error));
}

// An attribute with its name, for the errors: ATTR(CUDNN_ATTR_TENSOR_STRIDES).
struct Attr {
  cudnnBackendAttributeName_t id;
  const char* name;
};
#define ATTR(x) (Attr{x, #x})

// ---------------------------------------------------------------------------------------
// A backend descriptor, owned: destroyed with its owner. `name` says which one it is in
// errors ("forward tensor Q", "backward matmul dS·K").

class Descriptor {
 public:
  Descriptor() = default;
  Descriptor(Descriptor&& other) noexcept
      : descriptor_(std::exchange(other.descriptor_, nullptr)), name_(std::move(other.name_)) {}
  Descriptor& operator=(Descriptor&& other) noexcept {
    if (this != &other) {
      Reset();
      descriptor_ = std::exchange(other.descriptor_, nullptr);
      name_ = std::move(other.name_);
    }
    return *this;
  }
  Descriptor(const Descriptor&) = delete;
  Descriptor& operator=(const Descriptor&) = delete;
  ~Descriptor() { Reset(); }

  static StatusOr<Descriptor> Create(cudnnBackendDescriptorType_t type, std::string name,
                                     const std::source_location& where = std::source_location::current()) {
    Descriptor d;
    d.name_ = std::move(name);
    ClearLastCudnnError();
    RETURN_IF_ERROR(CheckCudnn(cudnnBackendCreateDescriptor(type, &d.descriptor_),
                               "cudnnBackendCreateDescriptor(" + d.name_ + ")", where));
    return d;
  }

  cudnnBackendDescriptor_t get() const { return descriptor_; }
  const std::string& name() const { return name_; }

  Status Set(Attr attr, cudnnBackendAttributeType_t type, int64_t count, const void* values,
             const std::source_location& where = std::source_location::current()) {
    ClearLastCudnnError();
    return CheckCudnn(cudnnBackendSetAttribute(descriptor_, attr.id, type, count, values),
                      "cudnnBackendSetAttribute(" + name_ + ", " + attr.name + ")", where);
  }
  template <typename T>
  Status SetOne(Attr attr, cudnnBackendAttributeType_t type, T value,
                const std::source_location& where = std::source_location::current()) {
    return Set(attr, type, 1, &value, where);
  }
  Status SetInt64s(Attr attr, const std::vector<int64_t>& values,
                   const std::source_location& where = std::source_location::current()) {
    return Set(attr, CUDNN_TYPE_INT64, static_cast<int64_t>(values.size()), values.data(), where);
  }
  Status SetDescriptor(Attr attr, cudnnBackendDescriptor_t value,
                       const std::source_location& where = std::source_location::current()) {
    return Set(attr, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &value, where);
  }
  Status Finalize(const std::source_location& where = std::source_location::current()) {
    ClearLastCudnnError();
    return CheckCudnn(cudnnBackendFinalize(descriptor_), "cudnnBackendFinalize(" + name_ + ")", where);
  }
  Status Get(Attr attr, cudnnBackendAttributeType_t type, int64_t requested, int64_t* count, void* values,
             const std::source_location& where = std::source_location::current()) const {
    ClearLastCudnnError();
    return CheckCudnn(cudnnBackendGetAttribute(descriptor_, attr.id, type, requested, count, values),
                      "cudnnBackendGetAttribute(" + name_ + ", " + attr.name + ")", where);
  }
  StatusOr<int64_t> GetInt64(Attr attr, const std::source_location& where = std::source_location::current()) const {
    int64_t value = 0, count = 0;
    RETURN_IF_ERROR(Get(attr, CUDNN_TYPE_INT64, 1, &count, &value, where));
    return value;
  }

 private:
  void Reset() {
    if (descriptor_ != nullptr) cudnnBackendDestroyDescriptor(descriptor_);
    descriptor_ = nullptr;
  }

  cudnnBackendDescriptor_t descriptor_ = nullptr;
  std::string name_;
};

// The operation graph's and the execution plan's handle attributes are deprecated in cuDNN 9
// (a device description can stand in for the device when planning), but they remain how a
// graph and a plan are bound to the handle they execute on, as the frontend still does it.
// With a description instead (no GPU), neither is set: the heuristics and the plan take the
// description (CUDNN_ATTR_ENGINE_DEVICEPROP cannot be used: the engines come finalized inside
// the heuristics' configs).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
constexpr cudnnBackendAttributeName_t kOperationGraphHandle = CUDNN_ATTR_OPERATIONGRAPH_HANDLE;
constexpr cudnnBackendAttributeName_t kExecutionPlanHandle = CUDNN_ATTR_EXECUTION_PLAN_HANDLE;
#pragma GCC diagnostic pop

StatusOr<std::string> JsonOf(const Descriptor& properties) {
  // The length first (a null array asks for the count), then the text.
  int64_t length = 0;
  RETURN_IF_ERROR(
      properties.Get(ATTR(CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION), CUDNN_TYPE_CHAR, 0, &length, nullptr));
  std::string json(static_cast<size_t>(length) + 1, '\0');
  RETURN_IF_ERROR(properties.Get(ATTR(CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION), CUDNN_TYPE_CHAR,
                                 static_cast<int64_t>(json.size()), &length, json.data()));
  json.resize(std::strlen(json.c_str()));
  return json;
}

// ---------------------------------------------------------------------------------------
// Version gates (CUDA.md §2). The GPU machine's cuDNN comes from a pip wheel, so the
// version at run time is what counts, not the header's.

constexpr int64_t kDevicePropertiesVersion = 90800;        // CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR
constexpr int64_t kNegativeInfinityVersion = 91000;        // −inf accepted as the masked score
constexpr int64_t kDeterministicReductionVersion = 91100;  // CUDNN_ATTR_REDUCTION_IS_DETERMINISTIC

Status CheckVersion(const AttentionLayout& layout, bool description) {
  const int64_t version = CudnnVersion();
  if (version < 90000) {
    return FailedPreconditionError("cuDNN " + CudnnVersionString() +
                                   " is older than 9.0, the first with this graph API");
  }
  if (description && version < kDevicePropertiesVersion) {
    return FailedPreconditionError("cuDNN " + CudnnVersionString() +
                                   " cannot plan for a device description (CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR "
                                   "needs cuDNN 9.8 or later)");
  }
  if (version == 91000 || version == 91001) {
    return FailedPreconditionError("cuDNN " + CudnnVersionString() +
                                   " is blacklisted for bf16 flash attention (a known bug in 9.10.0 and 9.10.1); "
                                   "use 9.10.2 or later");
  }
  if (layout.deterministic && version < kDeterministicReductionVersion) {
    return FailedPreconditionError("cuDNN " + CudnnVersionString() +
                                   " has no deterministic reductions (CUDNN_ATTR_REDUCTION_IS_DETERMINISTIC needs "
                                   "cuDNN 9.11 or later): a deterministic backward is not available");
  }
  return OkStatus();
}

// The score a masked position takes. Before 9.10 cuDNN's softmax wants the lowest finite
// float there (as the frontend does); from 9.10 on, −inf.
float MaskedScore() {
  return CudnnVersion() < kNegativeInfinityVersion ? std::numeric_limits<float>::lowest()
                                                   : -std::numeric_limits<float>::infinity();
}

// ---------------------------------------------------------------------------------------
// Graph construction.

using Dims = std::array<int64_t, 4>;

// Non-virtual tensors' unique ids (the variant pack names them); virtual ones count from
// kFirstVirtualUid.
enum Uid : int64_t {
  kQ = 1,
  kK,
  kV,
  kO,
  kStats,
  kScale,
  kMaskedScore,
  kOne,
  kDO,
  kDQ,
  kDK,
  kDV,
  kSoftmaxSum,
  kDQAccumulator,
  kFirstVirtualUid = 100,
};

Dims Contiguous(const Dims& dims) { return {dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1}; }

// (B, heads, T, dh) of a token-major buffer: element (b,t,h,j) at b·T·rs + t·rs + h·dh + j.
Dims TokenMajor(const AttentionLayout& l, int64_t row_stride) {
  return {l.tokens * row_stride, l.head_dim, row_stride, 1};
}
// The same buffer seen as (B, heads, dh, T): the matrix transposed by swapping the last two
// dimensions and their strides (no copy).
Dims TokenMajorTransposed(const AttentionLayout& l, int64_t row_stride) {
  return {l.tokens * row_stride, l.head_dim, 1, row_stride};
}

class GraphBuilder {
 public:
  explicit GraphBuilder(std::string pass) : pass_(std::move(pass)) {}

  StatusOr<cudnnBackendDescriptor_t> Tensor(const std::string& name, int64_t uid, cudnnDataType_t type,
                                            const Dims& dims, const Dims& strides, bool is_virtual = false,
                                            bool by_value = false) {
    ASSIGN_OR_RETURN(Descriptor t, Descriptor::Create(CUDNN_BACKEND_TENSOR_DESCRIPTOR, pass_ + " tensor " + name));
    const std::vector<int64_t> d(dims.begin(), dims.end()), s(strides.begin(), strides.end());
    RETURN_IF_ERROR(t.SetOne(ATTR(CUDNN_ATTR_TENSOR_DATA_TYPE), CUDNN_TYPE_DATA_TYPE, type));
    RETURN_IF_ERROR(t.SetInt64s(ATTR(CUDNN_ATTR_TENSOR_DIMENSIONS), d));
    RETURN_IF_ERROR(t.SetInt64s(ATTR(CUDNN_ATTR_TENSOR_STRIDES), s));
    RETURN_IF_ERROR(t.SetOne(ATTR(CUDNN_ATTR_TENSOR_UNIQUE_ID), CUDNN_TYPE_INT64, uid));
    RETURN_IF_ERROR(t.SetOne(ATTR(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT), CUDNN_TYPE_INT64, int64_t{16}));
    if (is_virtual) RETURN_IF_ERROR(t.SetOne(ATTR(CUDNN_ATTR_TENSOR_IS_VIRTUAL), CUDNN_TYPE_BOOLEAN, true));
    if (by_value) RETURN_IF_ERROR(t.SetOne(ATTR(CUDNN_ATTR_TENSOR_IS_BY_VALUE), CUDNN_TYPE_BOOLEAN, true));
    RETURN_IF_ERROR(t.Finalize());
    return Keep(std::move(t));
  }
  // An fp32 scalar passed by value (a host pointer in the variant pack).
  StatusOr<cudnnBackendDescriptor_t> Scalar(const std::string& name, int64_t uid) {
    return Tensor(name, uid, CUDNN_DATA_FLOAT, {1, 1, 1, 1}, {1, 1, 1, 1}, false, true);
  }
  StatusOr<cudnnBackendDescriptor_t> Virtual(const std::string& name, cudnnDataType_t type, const Dims& dims) {
    return Tensor(name, next_virtual_uid_++, type, dims, Contiguous(dims), true);
  }
  StatusOr<cudnnBackendDescriptor_t> Virtual(const std::string& name, cudnnDataType_t type, const Dims& dims,
                                             const Dims& strides) {
    return Tensor(name, next_virtual_uid_++, type, dims, strides, true);
  }

  // y = mode(x[, b[, t]]) computed in `math`; `axis` only for GEN_INDEX.
  Status Pointwise(const std::string& name, cudnnPointwiseMode_t mode, cudnnDataType_t math, cudnnBackendDescriptor_t x,
                   cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t t, cudnnBackendDescriptor_t y,
                   int64_t axis = -1) {
    ASSIGN_OR_RETURN(Descriptor pw,
                     Descriptor::Create(CUDNN_BACKEND_POINTWISE_DESCRIPTOR, pass_ + " pointwise " + name));
    RETURN_IF_ERROR(pw.SetOne(ATTR(CUDNN_ATTR_POINTWISE_MODE), CUDNN_TYPE_POINTWISE_MODE, mode));
    RETURN_IF_ERROR(pw.SetOne(ATTR(CUDNN_ATTR_POINTWISE_MATH_PREC), CUDNN_TYPE_DATA_TYPE, math));
    if (axis >= 0) RETURN_IF_ERROR(pw.SetOne(ATTR(CUDNN_ATTR_POINTWISE_AXIS), CUDNN_TYPE_INT64, axis));
    RETURN_IF_ERROR(pw.Finalize());
    ASSIGN_OR_RETURN(Descriptor op, Descriptor::Create(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR,
                                                       pass_ + " pointwise operation " + name));
    RETURN_IF_ERROR(op.SetDescriptor(ATTR(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR), pw.get()));
    RETURN_IF_ERROR(op.SetDescriptor(ATTR(CUDNN_ATTR_OPERATION_POINTWISE_XDESC), x));
    if (b != nullptr) RETURN_IF_ERROR(op.SetDescriptor(ATTR(CUDNN_ATTR_OPERATION_POINTWISE_BDESC), b));
    if (t != nullptr) RETURN_IF_ERROR(op.SetDescriptor(ATTR(CUDNN_ATTR_OPERATION_POINTWISE_TDESC), t));
    RETURN_IF_ERROR(op.SetDescriptor(ATTR(CUDNN_ATTR_OPERATION_POINTWISE_YDESC), y));
    RETURN_IF_ERROR(op.Finalize());
    Keep(std::move(pw));
    ops_.push_back(Keep(std::move(op)));
    return OkStatus();
  }
  Status Unary(const std::string& name, cudnnPointwiseMode_t mode, cudnnBackendDescriptor_t x,
               cudnnBackendDescriptor_t y) {
    return Pointwise(name, mode, CUDNN_DATA_FLOAT, x, nullptr, nullptr, y);
  }
  Status Binary(const std::string& name, cudnnPointwiseMode_t mode, cudnnBackendDescriptor_t x,
                cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t y) {
    return Pointwise(name, mode, CUDNN_DATA_FLOAT, x, b, nullptr, y);
  }

  // c = a·b over the last two dimensions, batched over the first two (b's heads broadcast
  // to a's when fewer: GQA), accumulated in fp32.
  Status Matmul(const std::string& name, cudnnBackendDescriptor_t a, cudnnBackendDescriptor_t b,
                cudnnBackendDescriptor_t c) {
    ASSIGN_OR_RETURN(Descriptor mm, Descriptor::Create(CUDNN_BACKEND_MATMUL_DESCRIPTOR, pass_ + " matmul " + name));
    RETURN_IF_ERROR(mm.SetOne(ATTR(CUDNN_ATTR_MATMUL_COMP_TYPE), CUDNN_TYPE_DATA_TYPE, CUDNN_DATA_FLOAT));
    RETURN_IF_ERROR(mm.Finalize());
    ASSIGN_OR_RETURN(Descriptor op, Descriptor::Create(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR,
                                                       pass_ + " matmul operation " + name));
    RETURN_IF_ERROR(op.SetDescriptor(ATTR(CUDNN_ATTR_OPERATION_MATMUL_ADESC), a));
    RETURN_IF_ERROR(op.SetDescriptor(ATTR(CUDNN_ATTR_OPERATION_MATMUL_BDESC), b));
    RETURN_IF_ERROR(op.SetDescriptor(ATTR(CUDNN_ATTR_OPERATION_MATMUL_CDESC), c));
    RETURN_IF_ERROR(op.SetDescriptor(ATTR(CUDNN_ATTR_OPERATION_MATMUL_DESC), mm.get()));
    RETURN_IF_ERROR(op.Finalize());
    Keep(std::move(mm));
    ops_.push_back(Keep(std::move(op)));
    return OkStatus();
  }

  // y = op over the dimensions where y has extent 1 and x does not (cuDNN infers the axes).
  Status Reduction(const std::string& name, cudnnReduceTensorOp_t reduce, cudnnBackendDescriptor_t x,
                   cudnnBackendDescriptor_t y, bool deterministic = false) {
    ASSIGN_OR_RETURN(Descriptor red,
                     Descriptor::Create(CUDNN_BACKEND_REDUCTION_DESCRIPTOR, pass_ + " reduction " + name));
    RETURN_IF_ERROR(red.SetOne(ATTR(CUDNN_ATTR_REDUCTION_OPERATOR), CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, reduce));
    RETURN_IF_ERROR(red.SetOne(ATTR(CUDNN_ATTR_REDUCTION_COMP_TYPE), CUDNN_TYPE_DATA_TYPE, CUDNN_DATA_FLOAT));
    if (deterministic) {
      RETURN_IF_ERROR(red.SetOne(ATTR(CUDNN_ATTR_REDUCTION_IS_DETERMINISTIC), CUDNN_TYPE_BOOLEAN, true));
    }
    RETURN_IF_ERROR(red.Finalize());
    ASSIGN_OR_RETURN(Descriptor op, Descriptor::Create(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR,
                                                       pass_ + " reduction operation " + name));
    RETURN_IF_ERROR(op.SetDescriptor(ATTR(CUDNN_ATTR_OPERATION_REDUCTION_XDESC), x));
    RETURN_IF_ERROR(op.SetDescriptor(ATTR(CUDNN_ATTR_OPERATION_REDUCTION_YDESC), y));
    RETURN_IF_ERROR(op.SetDescriptor(ATTR(CUDNN_ATTR_OPERATION_REDUCTION_DESC), red.get()));
    RETURN_IF_ERROR(op.Finalize());
    Keep(std::move(red));
    ops_.push_back(Keep(std::move(op)));
    return OkStatus();
  }

  // y is x with other dimensions and strides (here: a transposed view).
  Status Reshape(const std::string& name, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    ASSIGN_OR_RETURN(Descriptor op, Descriptor::Create(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR,
                                                       pass_ + " reshape operation " + name));
    RETURN_IF_ERROR(op.SetDescriptor(ATTR(CUDNN_ATTR_OPERATION_RESHAPE_XDESC), x));
    RETURN_IF_ERROR(op.SetDescriptor(ATTR(CUDNN_ATTR_OPERATION_RESHAPE_YDESC), y));
    RETURN_IF_ERROR(op.Finalize());
    ops_.push_back(Keep(std::move(op)));
    return OkStatus();
  }

  // The operation graph of every operation added, finalized.
  StatusOr<Descriptor> Finalize(cudnnHandle_t handle) {
    ASSIGN_OR_RETURN(Descriptor graph,
                     Descriptor::Create(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, pass_ + " operation graph"));
    RETURN_IF_ERROR(graph.Set(ATTR(CUDNN_ATTR_OPERATIONGRAPH_OPS), CUDNN_TYPE_BACKEND_DESCRIPTOR,
                              static_cast<int64_t>(ops_.size()), ops_.data()));
    if (handle != nullptr) {
      RETURN_IF_ERROR(
          graph.SetOne(Attr{kOperationGraphHandle, "CUDNN_ATTR_OPERATIONGRAPH_HANDLE"}, CUDNN_TYPE_HANDLE, handle));
    }
    RETURN_IF_ERROR(graph.Finalize());
    return graph;
  }

  // Tensors and operations, which the graph refers to: kept as long as its plan.
  std::vector<Descriptor> TakeDescriptors() { return std::move(owned_); }

 private:
  cudnnBackendDescriptor_t Keep(Descriptor d) {
    owned_.push_back(std::move(d));
    return owned_.back().get();
  }

  const std::string pass_;
  std::vector<Descriptor> owned_;
  std::vector<cudnnBackendDescriptor_t> ops_;
  int64_t next_virtual_uid_ = kFirstVirtualUid;
};

// One pass's graph: the operation graph and every descriptor it was made of.
struct PassGraph {
  std::vector<Descriptor> parts;
  Descriptor graph;
};

// The causal mask on (B,H,T,T) scores: keep key u ≤ query t (top-left aligned, T_q = T_kv),
// else the masked score. GEN_INDEX makes each element's row (axis 2) and column (axis 3).
StatusOr<cudnnBackendDescriptor_t> CausalMask(GraphBuilder& g, const Dims& scores, cudnnBackendDescriptor_t s,
                                              cudnnBackendDescriptor_t masked_score) {
  ASSIGN_OR_RETURN(auto row, g.Virtual("row index", CUDNN_DATA_INT32, scores));
  ASSIGN_OR_RETURN(auto col, g.Virtual("column index", CUDNN_DATA_INT32, scores));
  ASSIGN_OR_RETURN(auto keep, g.Virtual("causal keep", CUDNN_DATA_BOOLEAN, scores));
  ASSIGN_OR_RETURN(auto masked, g.Virtual("masked scores", CUDNN_DATA_FLOAT, scores));
  RETURN_IF_ERROR(g.Pointwise("row index", CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_INT32, s, nullptr, nullptr, row, 2));
  RETURN_IF_ERROR(
      g.Pointwise("column index", CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_INT32, s, nullptr, nullptr, col, 3));
  RETURN_IF_ERROR(g.Pointwise("row >= column", CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, row, col, nullptr, keep));
  // BINARY_SELECT: y = t ? x : b.
  RETURN_IF_ERROR(
      g.Pointwise("causal select", CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, s, masked_score, keep, masked));
  return masked;
}

// Forward, in the order cuDNN's fusion engine matches (CUDA.md §2):
//   S = Q·Kᵀ·scale, causal mask, M = rowmax S, E = exp(S − M), Z = Σ E,
//   Stats = M + log Z, P = E / Z (bf16), O = P·V.
StatusOr<PassGraph> BuildForwardGraph(const AttentionLayout& l, cudnnHandle_t handle) {
  GraphBuilder g("forward");
  const int64_t B = l.batch, T = l.tokens, H = l.heads, KV = l.kv_heads, dh = l.head_dim;
  const Dims scores = {B, H, T, T}, rows = {B, H, T, 1};
  ASSIGN_OR_RETURN(auto q, g.Tensor("Q", kQ, CUDNN_DATA_BFLOAT16, {B, H, T, dh}, TokenMajor(l, l.q_row_stride)));
  ASSIGN_OR_RETURN(auto kt,
                   g.Tensor("K^T", kK, CUDNN_DATA_BFLOAT16, {B, KV, dh, T}, TokenMajorTransposed(l, l.k_row_stride)));
  ASSIGN_OR_RETURN(auto v, g.Tensor("V", kV, CUDNN_DATA_BFLOAT16, {B, KV, T, dh}, TokenMajor(l, l.v_row_stride)));
  ASSIGN_OR_RETURN(auto o, g.Tensor("O", kO, CUDNN_DATA_BFLOAT16, {B, H, T, dh}, TokenMajor(l, l.o_row_stride)));
  ASSIGN_OR_RETURN(auto stats, g.Tensor("Stats", kStats, CUDNN_DATA_FLOAT, rows, Contiguous(rows)));
  ASSIGN_OR_RETURN(auto scale, g.Scalar("scale", kScale));
  ASSIGN_OR_RETURN(auto masked_score, g.Scalar("masked score", kMaskedScore));

  ASSIGN_OR_RETURN(auto s, g.Virtual("Q·K^T", CUDNN_DATA_FLOAT, scores));
  RETURN_IF_ERROR(g.Matmul("Q·K^T", q, kt, s));
  ASSIGN_OR_RETURN(auto scaled, g.Virtual("scaled scores", CUDNN_DATA_FLOAT, scores));
  RETURN_IF_ERROR(g.Binary("scale", CUDNN_POINTWISE_MUL, s, scale, scaled));
  ASSIGN_OR_RETURN(auto masked, CausalMask(g, scores, scaled, masked_score));
  ASSIGN_OR_RETURN(auto row_max, g.Virtual("row max", CUDNN_DATA_FLOAT, rows));
  RETURN_IF_ERROR(g.Reduction("row max", CUDNN_REDUCE_TENSOR_MAX, masked, row_max));
  ASSIGN_OR_RETURN(auto shifted, g.Virtual("scores - max", CUDNN_DATA_FLOAT, scores));
  RETURN_IF_ERROR(g.Binary("scores - max", CUDNN_POINTWISE_SUB, masked, row_max, shifted));
  ASSIGN_OR_RETURN(auto e, g.Virtual("exp", CUDNN_DATA_FLOAT, scores));
  RETURN_IF_ERROR(g.Unary("exp", CUDNN_POINTWISE_EXP, shifted, e));
  ASSIGN_OR_RETURN(auto z, g.Virtual("row sum", CUDNN_DATA_FLOAT, rows));
  RETURN_IF_ERROR(g.Reduction("row sum", CUDNN_REDUCE_TENSOR_ADD, e, z));
  ASSIGN_OR_RETURN(auto log_z, g.Virtual("log row sum", CUDNN_DATA_FLOAT, rows));
  RETURN_IF_ERROR(g.Unary("log row sum", CUDNN_POINTWISE_LOG, z, log_z));
  RETURN_IF_ERROR(g.Binary("stats", CUDNN_POINTWISE_ADD, row_max, log_z, stats));
  ASSIGN_OR_RETURN(auto p, g.Virtual("P", CUDNN_DATA_BFLOAT16, scores));
  RETURN_IF_ERROR(g.Binary("P", CUDNN_POINTWISE_DIV, e, z, p));
  RETURN_IF_ERROR(g.Matmul("P·V", p, v, o));

  ASSIGN_OR_RETURN(Descriptor graph, g.Finalize(handle));
  return PassGraph{g.TakeDescriptors(), std::move(graph)};
}

// Backward (CUDA.md §2):
//   softmax_sum = Σ_j dO∘O (·1)                       fp32 (B,H,T,1), scratch
//   P = exp(mask(Q·Kᵀ·scale) − Stats)                  recomputed
//   dV = Σ_group Pᵀ·dO
//   dS = P∘(dO·Vᵀ − softmax_sum)·scale
//   dK = Σ_group dSᵀ·Q
//   dQ = dS·K                   through an fp32 accumulator (atomics) unless deterministic
StatusOr<PassGraph> BuildBackwardGraph(const AttentionLayout& l, cudnnHandle_t handle) {
  GraphBuilder g("backward");
  const int64_t B = l.batch, T = l.tokens, H = l.heads, KV = l.kv_heads, dh = l.head_dim;
  const Dims scores = {B, H, T, T}, rows = {B, H, T, 1};
  const Dims transposed_scores = {B, H, T, T}, transposed_strides = {H * T * T, T * T, 1, T};
  const bool deterministic_reductions = l.deterministic && CudnnVersion() >= kDeterministicReductionVersion;
  ASSIGN_OR_RETURN(auto q, g.Tensor("Q", kQ, CUDNN_DATA_BFLOAT16, {B, H, T, dh}, TokenMajor(l, l.q_row_stride)));
  ASSIGN_OR_RETURN(auto kt,
                   g.Tensor("K^T", kK, CUDNN_DATA_BFLOAT16, {B, KV, dh, T}, TokenMajorTransposed(l, l.k_row_stride)));
  ASSIGN_OR_RETURN(auto vt,
                   g.Tensor("V^T", kV, CUDNN_DATA_BFLOAT16, {B, KV, dh, T}, TokenMajorTransposed(l, l.v_row_stride)));
  ASSIGN_OR_RETURN(auto o, g.Tensor("O", kO, CUDNN_DATA_BFLOAT16, {B, H, T, dh}, TokenMajor(l, l.o_row_stride)));
  ASSIGN_OR_RETURN(auto d_o, g.Tensor("dO", kDO, CUDNN_DATA_BFLOAT16, {B, H, T, dh}, TokenMajor(l, l.do_row_stride)));
  ASSIGN_OR_RETURN(auto stats, g.Tensor("Stats", kStats, CUDNN_DATA_FLOAT, rows, Contiguous(rows)));
  ASSIGN_OR_RETURN(auto dq, g.Tensor("dQ", kDQ, CUDNN_DATA_BFLOAT16, {B, H, T, dh}, TokenMajor(l, l.dq_row_stride)));
  ASSIGN_OR_RETURN(auto dk, g.Tensor("dK", kDK, CUDNN_DATA_BFLOAT16, {B, KV, T, dh}, TokenMajor(l, l.dk_row_stride)));
  ASSIGN_OR_RETURN(auto dv, g.Tensor("dV", kDV, CUDNN_DATA_BFLOAT16, {B, KV, T, dh}, TokenMajor(l, l.dv_row_stride)));
  ASSIGN_OR_RETURN(auto softmax_sum, g.Tensor("softmax_sum", kSoftmaxSum, CUDNN_DATA_FLOAT, rows, Contiguous(rows)));
  ASSIGN_OR_RETURN(auto scale, g.Scalar("scale", kScale));
  ASSIGN_OR_RETURN(auto masked_score, g.Scalar("masked score", kMaskedScore));
  ASSIGN_OR_RETURN(auto one, g.Scalar("one", kOne));

  // softmax_sum[t] = Σ_j dO[t,j]·O[t,j] (the ×1 is where dropout's scale would go; the
  // fusion engine's pattern has it).
  ASSIGN_OR_RETURN(auto do_o, g.Virtual("dO*O", CUDNN_DATA_FLOAT, {B, H, T, dh}));
  RETURN_IF_ERROR(g.Binary("dO*O", CUDNN_POINTWISE_MUL, d_o, o, do_o));
  ASSIGN_OR_RETURN(auto row_dot, g.Virtual("sum dO*O", CUDNN_DATA_FLOAT, rows));
  RETURN_IF_ERROR(g.Reduction("sum dO*O", CUDNN_REDUCE_TENSOR_ADD, do_o, row_dot, deterministic_reductions));
  RETURN_IF_ERROR(g.Binary("softmax_sum", CUDNN_POINTWISE_MUL, row_dot, one, softmax_sum));

  // P recomputed from the forward's Stats.
  ASSIGN_OR_RETURN(auto s, g.Virtual("Q·K^T", CUDNN_DATA_FLOAT, scores));
  RETURN_IF_ERROR(g.Matmul("Q·K^T", q, kt, s));
  ASSIGN_OR_RETURN(auto scaled, g.Virtual("scaled scores", CUDNN_DATA_FLOAT, scores));
  RETURN_IF_ERROR(g.Binary("scale", CUDNN_POINTWISE_MUL, s, scale, scaled));
  ASSIGN_OR_RETURN(auto shifted, g.Virtual("scores - stats", CUDNN_DATA_FLOAT, scores));
  RETURN_IF_ERROR(g.Binary("scores - stats", CUDNN_POINTWISE_SUB, scaled, stats, shifted));
  ASSIGN_OR_RETURN(auto masked, CausalMask(g, scores, shifted, masked_score));
  ASSIGN_OR_RETURN(auto p, g.Virtual("P", CUDNN_DATA_FLOAT, scores));
  RETURN_IF_ERROR(g.Unary("P", CUDNN_POINTWISE_EXP, masked, p));

  // dV = Pᵀ·dO per query head, then summed over each KV head's group.
  ASSIGN_OR_RETURN(auto pt, g.Virtual("P^T", CUDNN_DATA_BFLOAT16, transposed_scores, transposed_strides));
  RETURN_IF_ERROR(g.Reshape("P^T", p, pt));
  if (H == KV) {
    RETURN_IF_ERROR(g.Matmul("P^T·dO", pt, d_o, dv));
  } else {
    ASSIGN_OR_RETURN(auto dv_heads, g.Virtual("dV per query head", CUDNN_DATA_BFLOAT16, {B, H, T, dh}));
    RETURN_IF_ERROR(g.Matmul("P^T·dO", pt, d_o, dv_heads));
    RETURN_IF_ERROR(g.Reduction("dV group sum", CUDNN_REDUCE_TENSOR_ADD, dv_heads, dv, deterministic_reductions));
  }

  // dS = P∘(dO·Vᵀ − softmax_sum)·scale.
  ASSIGN_OR_RETURN(auto dp, g.Virtual("dO·V^T", CUDNN_DATA_FLOAT, scores));
  RETURN_IF_ERROR(g.Matmul("dO·V^T", d_o, vt, dp));
  ASSIGN_OR_RETURN(auto dp_centered, g.Virtual("dP - softmax_sum", CUDNN_DATA_FLOAT, scores));
  RETURN_IF_ERROR(g.Binary("dP - softmax_sum", CUDNN_POINTWISE_SUB, dp, softmax_sum, dp_centered));
  ASSIGN_OR_RETURN(auto ds_unscaled, g.Virtual("P*(dP - softmax_sum)", CUDNN_DATA_FLOAT, scores));
  RETURN_IF_ERROR(g.Binary("P*(dP - softmax_sum)", CUDNN_POINTWISE_MUL, dp_centered, p, ds_unscaled));
  ASSIGN_OR_RETURN(auto ds, g.Virtual("dS", CUDNN_DATA_FLOAT, scores));
  RETURN_IF_ERROR(g.Binary("dS", CUDNN_POINTWISE_MUL, ds_unscaled, scale, ds));

  // dK = dSᵀ·Q per query head, then summed over the group.
  ASSIGN_OR_RETURN(auto dst, g.Virtual("dS^T", CUDNN_DATA_BFLOAT16, transposed_scores, transposed_strides));
  RETURN_IF_ERROR(g.Reshape("dS^T", ds, dst));
  if (H == KV) {
    RETURN_IF_ERROR(g.Matmul("dS^T·Q", dst, q, dk));
  } else {
    ASSIGN_OR_RETURN(auto dk_heads, g.Virtual("dK per query head", CUDNN_DATA_BFLOAT16, {B, H, T, dh}));
    RETURN_IF_ERROR(g.Matmul("dS^T·Q", dst, q, dk_heads));
    RETURN_IF_ERROR(g.Reduction("dK group sum", CUDNN_REDUCE_TENSOR_ADD, dk_heads, dk, deterministic_reductions));
  }

  // dQ = dS·K, K being Kᵀ seen untransposed.
  ASSIGN_OR_RETURN(auto k, g.Virtual("K", CUDNN_DATA_BFLOAT16, {B, KV, T, dh}, TokenMajor(l, l.k_row_stride)));
  RETURN_IF_ERROR(g.Reshape("K", kt, k));
  if (l.deterministic) {
    RETURN_IF_ERROR(g.Matmul("dS·K", ds, k, dq));
  } else {
    ASSIGN_OR_RETURN(auto dq_accumulator, g.Tensor("dQ accumulator", kDQAccumulator, CUDNN_DATA_FLOAT, {B, H, T, dh},
                                                   Contiguous({B, H, T, dh})));
    RETURN_IF_ERROR(g.Matmul("dS·K", ds, k, dq_accumulator));
    RETURN_IF_ERROR(g.Unary("dQ", CUDNN_POINTWISE_IDENTITY, dq_accumulator, dq));
  }

  ASSIGN_OR_RETURN(Descriptor graph, g.Finalize(handle));
  return PassGraph{g.TakeDescriptors(), std::move(graph)};
}

// ---------------------------------------------------------------------------------------
// Heuristics and plans.

struct EngineConfig {
  Descriptor config;
  int64_t engine = -1;
  int64_t workspace_bytes = 0;
};

const char* HeuristicModeName(cudnnBackendHeurMode_t mode) {
  return mode == CUDNN_HEUR_MODE_A ? "CUDNN_HEUR_MODE_A" : "CUDNN_HEUR_MODE_FALLBACK";
}

// The heuristics drop the engine configs that cannot take the graph and say why only in
// cuDNN's last message: one block per config, its JSON ({"engineId":6,...}) and then the
// reasons innermost first ("...; Reason: Embedding dim per head for q and k is not less than
// equal to 256 at: d_qk > 256", then the call stack). The innermost reason of each engine.
std::string SummariseDroppedConfigs(const std::string& message) {
  std::vector<std::pair<std::string, std::string>> reasons;  // (engine, reason), first seen order
  std::string engine;
  bool have_reason = false;
  size_t start = 0;
  while (start <= message.size()) {
    size_t end = message.find('\n', start);
    if (end == std::string::npos) end = message.size();
    const std::string line = message.substr(start, end - start);
    start = end + 1;
    if (const size_t id = line.find("\"engineId\":"); id != std::string::npos) {
      engine = line.substr(id + 11, line.find_first_not_of("0123456789", id + 11) - (id + 11));
      have_reason = false;
      continue;
    }
    const size_t reason = line.find("Reason: ");
    if (reason == std::string::npos || have_reason || engine.empty()) continue;
    have_reason = true;
    std::pair<std::string, std::string> entry{engine, line.substr(reason + 8)};
    if (std::find(reasons.begin(), reasons.end(), entry) == reasons.end()) reasons.push_back(std::move(entry));
  }
  std::string summary;
  for (const auto& [id, why] : reasons) summary += (summary.empty() ? "" : "; ") + ("engine " + id + ": " + why);
  return summary;
}

struct Heuristic {
  std::vector<EngineConfig> configs;
  std::string dropped;  // why the other engines cannot take the graph (SummariseDroppedConfigs)
};

StatusOr<Heuristic> Heuristics(const std::string& pass, const Descriptor& graph, cudnnBackendHeurMode_t mode,
                               const DeviceTarget& target) {
  const std::string name = pass + " heuristics " + HeuristicModeName(mode);
  ASSIGN_OR_RETURN(Descriptor heur, Descriptor::Create(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, name));
  RETURN_IF_ERROR(heur.SetDescriptor(ATTR(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH), graph.get()));
  RETURN_IF_ERROR(heur.SetOne(ATTR(CUDNN_ATTR_ENGINEHEUR_MODE), CUDNN_TYPE_HEUR_MODE, mode));
  if (!target.has_device()) {
    RETURN_IF_ERROR(heur.SetDescriptor(ATTR(CUDNN_ATTR_ENGINEHEUR_DEVICEPROP), target.device_properties()));
  }
  RETURN_IF_ERROR(heur.Finalize());
  // The count first (a null array asks for it); it includes the configs the support checks
  // then drop, so fewer may come back.
  int64_t count = 0;
  RETURN_IF_ERROR(heur.Get(ATTR(CUDNN_ATTR_ENGINEHEUR_RESULTS), CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr));
  Heuristic result;
  std::string dropped = LastCudnnError();
  std::vector<cudnnBackendDescriptor_t> raw;
  for (int64_t i = 0; i < count; ++i) {
    ASSIGN_OR_RETURN(Descriptor c,
                     Descriptor::Create(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, name + " config " + std::to_string(i)));
    raw.push_back(c.get());
    EngineConfig config;
    config.config = std::move(c);
    result.configs.push_back(std::move(config));
  }
  if (count > 0) {
    int64_t returned = 0;
    RETURN_IF_ERROR(
        heur.Get(ATTR(CUDNN_ATTR_ENGINEHEUR_RESULTS), CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &returned, raw.data()));
    dropped += "\n" + LastCudnnError();
    result.configs.resize(static_cast<size_t>(std::clamp<int64_t>(returned, 0, count)));
  }
  result.dropped = SummariseDroppedConfigs(dropped);
  for (EngineConfig& c : result.configs) {
    ASSIGN_OR_RETURN(Descriptor engine,
                     Descriptor::Create(CUDNN_BACKEND_ENGINE_DESCRIPTOR, c.config.name() + " engine"));
    cudnnBackendDescriptor_t engine_raw = engine.get();
    int64_t n = 0;
    RETURN_IF_ERROR(c.config.Get(ATTR(CUDNN_ATTR_ENGINECFG_ENGINE), CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n, &engine_raw));
    ASSIGN_OR_RETURN(c.engine, engine.GetInt64(ATTR(CUDNN_ATTR_ENGINE_GLOBAL_INDEX)));
    ASSIGN_OR_RETURN(c.workspace_bytes, c.config.GetInt64(ATTR(CUDNN_ATTR_ENGINECFG_WORKSPACE_SIZE)));
  }
  return result;
}

// What a plan's finalize reports on a machine whose libcuda is the toolkit's stub, once
// NVRTC has compiled the kernels and the module is to be loaded (cuDNN 9.19):
//   CUDNN_STATUS_EXECUTION_FAILED_CUDA_DRIVER (5001),
//   "cuLibraryLoadData returned error  (34) at: CUDA_SUCCESS != result"
// where 34 is CUDA_ERROR_STUB_LIBRARY. Matched on all three (status, driver call, stub's
// error), so a graph or shape cuDNN rejects (a 3000s NOT_SUPPORTED status, or a real driver's
// load failure) is never taken for it.
bool IsCompiledButNoDriver(cudnnStatus_t status, const std::string& last_error) {
  return status == CUDNN_STATUS_EXECUTION_FAILED_CUDA_DRIVER &&
         last_error.find("cuLibraryLoadData returned error") != std::string::npos &&
         last_error.find("(34)") != std::string::npos;
}

// Whether a CUDA driver library (a real one or the toolkit's stub) can be loaded.
bool CudaDriverLoadable() {
  void* driver = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
  if (driver == nullptr) driver = dlopen("libcuda.so.1", RTLD_LAZY);
  if (driver == nullptr) return false;
  dlclose(driver);
  return true;
}

struct PlanChoice {
  Descriptor plan;  // null when the plan compiled but no driver could load it
  int64_t engine = -1;
  int64_t workspace_bytes = 0;
  PlanOutcome outcome = PlanOutcome::kFinalized;
  std::string detail;
};

// Finalizes plans in the configs' order; the first that finalizes (or, without a device,
// compiles) wins. Every other failure is kept for the error when none does.
StatusOr<PlanChoice> ChoosePlan(const std::string& pass, std::vector<EngineConfig>& configs,
                                const DeviceTarget& target) {
  std::string failures;
  for (EngineConfig& c : configs) {
    const std::string name = pass + " execution plan (engine " + std::to_string(c.engine) + ")";
    ASSIGN_OR_RETURN(Descriptor plan, Descriptor::Create(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, name));
    RETURN_IF_ERROR(plan.SetDescriptor(ATTR(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG), c.config.get()));
    if (target.has_device()) {
      RETURN_IF_ERROR(plan.SetOne(Attr{kExecutionPlanHandle, "CUDNN_ATTR_EXECUTION_PLAN_HANDLE"}, CUDNN_TYPE_HANDLE,
                                  target.handle()));
    } else {
      RETURN_IF_ERROR(plan.SetDescriptor(ATTR(CUDNN_ATTR_EXECUTION_PLAN_DEVICEPROP), target.device_properties()));
    }
    ClearLastCudnnError();
    const cudnnStatus_t status = cudnnBackendFinalize(plan.get());
    if (status == CUDNN_STATUS_SUCCESS) {
      PlanChoice choice{std::move(plan), c.engine, 0, PlanOutcome::kFinalized, ""};
      ASSIGN_OR_RETURN(choice.workspace_bytes, choice.plan.GetInt64(ATTR(CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE)));
      return choice;
    }
    const std::string last = LastCudnnError();
    if (!target.has_device() && IsCompiledButNoDriver(status, last)) {
      return PlanChoice{Descriptor(), c.engine, c.workspace_bytes, PlanOutcome::kCompiledButNoDriver,
                        std::string(cudnnGetErrorString(status)) + ": " + last};
    }
    failures += "; engine " + std::to_string(c.engine) + ": " + cudnnGetErrorString(status) + " (" +
                std::to_string(static_cast<int>(status)) + ")" + (last.empty() ? "" : ": " + last);
  }
  return UnimplementedError(pass + ": no execution plan of the " + std::to_string(configs.size()) +
                            " engine configs offered finalized" + failures);
}

struct PassPlan {
  PassGraph graph;
  std::vector<EngineConfig> configs;
  PassCheck check;
  Descriptor plan;
};

StatusOr<PassPlan> PlanPass(const std::string& pass, StatusOr<PassGraph> graph, const DeviceTarget& target) {
  if (!graph.ok()) return graph.status();
  PassPlan p;
  p.graph = std::move(graph).value();
  std::string why_none;
  for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
    StatusOr<Heuristic> heuristic = Heuristics(pass, p.graph.graph, mode, target);
    if (!heuristic.ok()) {
      why_none += std::string("; ") + HeuristicModeName(mode) + ": " + heuristic.status().message();
      continue;
    }
    if (!heuristic->dropped.empty()) {
      const std::string dropped = std::string(HeuristicModeName(mode)) + " dropped " + heuristic->dropped;
      why_none += "; " + dropped;
      p.check.dropped += (p.check.dropped.empty() ? "" : "; ") + dropped;
    }
    for (EngineConfig& c : heuristic->configs) {
      (mode == CUDNN_HEUR_MODE_A ? p.check.mode_a_engines : p.check.fallback_engines).push_back(c.engine);
      p.configs.push_back(std::move(c));
    }
  }
  if (p.configs.empty()) {
    if (!target.has_device() && !CudaDriverLoadable()) {
      why_none +=
          "; no libcuda.so.1 could be loaded, and cuDNN needs one to judge engines even without a GPU (the "
          "toolkit's stubs/libcuda.so will do)";
    }
    return UnimplementedError(pass + ": the heuristics offered no engine for this graph" + why_none);
  }
  ASSIGN_OR_RETURN(PlanChoice choice, ChoosePlan(pass, p.configs, target));
  p.plan = std::move(choice.plan);
  p.check.engine = choice.engine;
  p.check.workspace_bytes = choice.workspace_bytes;
  p.check.outcome = choice.outcome;
  p.check.detail = std::move(choice.detail);
  return p;
}

std::string Engines(const std::vector<int64_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
  return s + "]";
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

Status CheckPointers(const char* pass, std::initializer_list<std::pair<const char*, const void*>> pointers) {
  for (const auto& [name, p] : pointers) {
    if (p == nullptr) return InvalidArgumentError(std::string(pass) + ": " + name + " is null");
    if (!Aligned16(p)) {
      return InvalidArgumentError(std::string(pass) + ": " + name + " is not 16-byte aligned (the graph says it is)");
    }
  }
  return OkStatus();
}

constexpr size_t kScratchAlignFloats = 64;  // 256 bytes

size_t RoundUp(size_t n, size_t to) { return (n + to - 1) / to * to; }

// cuDNN refuses a description with a key missing ("!json_object.HasMember(key)") or a value
// of the wrong type ("!json_object.Is<T>()") without naming the key, so after a refusal the
// keys are looked for here. The list is what cuDNN 9.19 requires (engine/cuda/devices/h200.json
// has every one); it only explains a refusal, never causes one.
std::string DiagnoseDeviceJson(const std::string& json, const std::string& cudnn_message) {
  static constexpr const char* kKeys[] = {"deviceName",
                                          "cudaDeviceId",
                                          "deviceVer",
                                          "driverVer",
                                          "isTccDriver",
                                          "l2CacheSize",
                                          "maxCtasPerSM",
                                          "maxRegistersPerSM",
                                          "maxSharedMemoryPerBlock",
                                          "maxSharedMemoryPerBlockOptin",
                                          "maxThreadsPerBlock",
                                          "maxThreadsPerSM",
                                          "memClockRateKHz",
                                          "multiProcessorCount",
                                          "pciDeviceId",
                                          "regsPerBlock",
                                          "reservedSharedMemoryPerBlock",
                                          "smClockRateKHz",
                                          "supportCoopLaunch",
                                          "totalGlobalMem",
                                          "warpSize",
                                          "maxGridSize",
                                          "maxBlockSize"};
  auto has_key = [&](const std::string& key) {
    const std::string quoted = "\"" + key + "\"";
    for (size_t at = json.find(quoted); at != std::string::npos; at = json.find(quoted, at + 1)) {
      const size_t next = json.find_first_not_of(" \t\r\n", at + quoted.size());
      if (next != std::string::npos && json[next] == ':') return true;
    }
    return false;
  };
  if (cudnn_message.find("IsObject()") != std::string::npos) return " (not a JSON object)";
  std::string missing;
  int missing_count = 0;
  for (const char* key : kKeys) {
    if (has_key(key)) continue;
    missing += std::string(missing.empty() ? "" : ", ") + "\"" + key + "\"";
    ++missing_count;
  }
  if (missing_count > 0) {
    return std::string(missing_count == 1 ? " (missing key " : " (missing keys ") + missing + "; cuDNN " +
           CudnnVersionString() + " needs every key)";
  }
  if (cudnn_message.find("Is<T>()") != std::string::npos) {
    return " (a value has the wrong type; booleans must be the integers 0 or 1)";
  }
  return "";
}

}  // namespace

// ---------------------------------------------------------------------------------------

AttentionLayout AttentionLayout::Separate(int64_t batch, int64_t tokens, int64_t heads, int64_t kv_heads,
                                          int64_t head_dim, bool deterministic) {
  AttentionLayout l;
  l.batch = batch, l.tokens = tokens, l.heads = heads, l.kv_heads = kv_heads, l.head_dim = head_dim;
  l.q_row_stride = l.o_row_stride = l.dq_row_stride = l.do_row_stride = heads * head_dim;
  l.k_row_stride = l.v_row_stride = l.dk_row_stride = l.dv_row_stride = kv_heads * head_dim;
  l.deterministic = deterministic;
  return l;
}

AttentionLayout AttentionLayout::PackedQkv(int64_t batch, int64_t tokens, int64_t heads, int64_t kv_heads,
                                           int64_t head_dim, bool deterministic) {
  AttentionLayout l = Separate(batch, tokens, heads, kv_heads, head_dim, deterministic);
  const int64_t width = (heads + 2 * kv_heads) * head_dim;
  l.q_row_stride = l.k_row_stride = l.v_row_stride = width;
  l.dq_row_stride = l.dk_row_stride = l.dv_row_stride = width;
  return l;
}

std::string AttentionLayout::ToString() const {
  auto n = [](int64_t v) { return std::to_string(v); };
  return "B" + n(batch) + " T" + n(tokens) + " H" + n(heads) + " KV" + n(kv_heads) + " dh" + n(head_dim) +
         " strides q" + n(q_row_stride) + " k" + n(k_row_stride) + " v" + n(v_row_stride) + " o" + n(o_row_stride) +
         " dq" + n(dq_row_stride) + " dk" + n(dk_row_stride) + " dv" + n(dv_row_stride) + " do" + n(do_row_stride) +
         (deterministic ? " deterministic" : "");
}

Status Validate(const AttentionLayout& l, AttentionPass pass) {
  auto error = [&](const std::string& why) {
    return InvalidArgumentError("attention layout " + l.ToString() + ": " + why);
  };
  for (const auto& [name, value] : {std::pair{"batch", l.batch},
                                    {"tokens", l.tokens},
                                    {"heads", l.heads},
                                    {"kv_heads", l.kv_heads},
                                    {"head_dim", l.head_dim}}) {
    if (value < 1) return error(std::string(name) + " = " + std::to_string(value) + " must be at least 1");
  }
  if (l.heads % l.kv_heads != 0) {
    return error("heads (" + std::to_string(l.heads) + ") must be a multiple of kv_heads (" +
                 std::to_string(l.kv_heads) + ")");
  }
  if (l.head_dim % 8 != 0) {
    return error("head_dim = " + std::to_string(l.head_dim) +
                 " must be a multiple of 8 (each head's row of bf16 must be whole 16-byte units)");
  }
  if (l.head_dim > 256) {
    return error("head_dim = " + std::to_string(l.head_dim) + " exceeds 256, cuDNN's flash attention limit");
  }
  if (pass == AttentionPass::kBackward && l.tokens < 2) {
    return error("tokens = " + std::to_string(l.tokens) + ": cuDNN's attention backward needs at least 2");
  }
  const int64_t q_width = l.heads * l.head_dim, kv_width = l.kv_heads * l.head_dim;
  std::vector<std::tuple<const char*, int64_t, int64_t>> strides = {{"q_row_stride", l.q_row_stride, q_width},
                                                                    {"k_row_stride", l.k_row_stride, kv_width},
                                                                    {"v_row_stride", l.v_row_stride, kv_width},
                                                                    {"o_row_stride", l.o_row_stride, q_width}};
  if (pass == AttentionPass::kBackward) {
    strides.insert(strides.end(), {{"dq_row_stride", l.dq_row_stride, q_width},
                                   {"dk_row_stride", l.dk_row_stride, kv_width},
                                   {"dv_row_stride", l.dv_row_stride, kv_width},
                                   {"do_row_stride", l.do_row_stride, q_width}});
  }
  for (const auto& [name, stride, width] : strides) {
    if (stride < width) {
      return error(std::string(name) + " = " + std::to_string(stride) + " is less than the tensor's width " +
                   std::to_string(width) + " (heads × head_dim)");
    }
    if (stride % 8 != 0) {
      return error(std::string(name) + " = " + std::to_string(stride) +
                   " is not a multiple of 8: rows would not start 16-byte aligned");
    }
  }
  return OkStatus();
}

int64_t CudnnVersion() { return static_cast<int64_t>(cudnnGetVersion()); }

std::string CudnnVersionString() {
  const int64_t v = CudnnVersion();
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

// ---------------------------------------------------------------------------------------

struct DeviceTarget::Properties {
  Descriptor descriptor;
};

StatusOr<DeviceTarget> DeviceTarget::FromHandle(cudnnHandle_t handle) {
  if (handle == nullptr) return InvalidArgumentError("DeviceTarget::FromHandle: the cuDNN handle is null");
  DeviceTarget target;
  target.handle_ = handle;
  return target;
}

StatusOr<DeviceTarget> DeviceTarget::FromJson(const std::string& json) {
  if (CudnnVersion() < kDevicePropertiesVersion) {
    return FailedPreconditionError("cuDNN " + CudnnVersionString() +
                                   " cannot read a device description (needs cuDNN 9.8 or later)");
  }
  ASSIGN_OR_RETURN(Descriptor d, Descriptor::Create(CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR, "device description"));
  RETURN_IF_ERROR(d.Set(ATTR(CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION), CUDNN_TYPE_CHAR,
                        static_cast<int64_t>(json.size()), json.data()));
  if (Status st = d.Finalize(); !st.ok()) {
    return Status(st.code(),
                  "device description refused" + DiagnoseDeviceJson(json, st.message()) + ": " + st.message());
  }
  DeviceTarget target;
  target.properties_ = std::make_shared<Properties>(Properties{std::move(d)});
  return target;
}

cudnnBackendDescriptor_t DeviceTarget::device_properties() const {
  return properties_ ? properties_->descriptor.get() : nullptr;
}

StatusOr<std::string> DeviceTarget::DescriptionJson() const {
  if (!properties_) return FailedPreconditionError("this device target is a handle, not a description");
  return JsonOf(properties_->descriptor);
}

StatusOr<std::string> DescribeDevice(cudnnHandle_t handle) {
  if (handle == nullptr) return InvalidArgumentError("DescribeDevice: the cuDNN handle is null");
  if (CudnnVersion() < kDevicePropertiesVersion) {
    return FailedPreconditionError("cuDNN " + CudnnVersionString() + " cannot describe a device (needs 9.8 or later)");
  }
  ASSIGN_OR_RETURN(Descriptor d, Descriptor::Create(CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR, "device properties"));
  // The handle's device is the current one (a handle belongs to the device current at
  // cudnnCreate); the frontend sets the id beside the handle too.
  int device = 0;
  RETURN_IF_ERROR(CheckCuda(cudaGetDevice(&device), "cudaGetDevice"));
  RETURN_IF_ERROR(d.SetOne(ATTR(CUDNN_ATTR_DEVICEPROP_HANDLE), CUDNN_TYPE_HANDLE, handle));
  RETURN_IF_ERROR(d.SetOne(ATTR(CUDNN_ATTR_DEVICEPROP_DEVICE_ID), CUDNN_TYPE_INT32, static_cast<int32_t>(device)));
  RETURN_IF_ERROR(d.Finalize());
  return JsonOf(d);
}

const char* PlanOutcomeName(PlanOutcome outcome) {
  switch (outcome) {
    case PlanOutcome::kFinalized:
      return "plan_finalized";
    case PlanOutcome::kCompiledButNoDriver:
      return "plan_compiled_but_no_driver";
  }
  return "unknown";
}

std::string GraphCheck::ToString() const {
  auto pass = [](const char* name, const PassCheck& p) {
    return std::string(name) + ": mode A engines " + Engines(p.mode_a_engines) + ", fallback engines " +
           Engines(p.fallback_engines) + ", engine " + std::to_string(p.engine) + " " + PlanOutcomeName(p.outcome) +
           ", workspace " + std::to_string(p.workspace_bytes) + " B";
  };
  return pass("forward", forward) + "; " + pass("backward", backward);
}

StatusOr<GraphCheck> CheckAttentionGraphs(const AttentionLayout& layout, const DeviceTarget& target, bool validate) {
  if (validate) RETURN_IF_ERROR(Validate(layout, AttentionPass::kBackward));
  RETURN_IF_ERROR(CheckVersion(layout, !target.has_device()));
  GraphCheck check;
  ASSIGN_OR_RETURN(PassPlan forward, PlanPass("forward", BuildForwardGraph(layout, target.handle()), target));
  check.forward = std::move(forward.check);
  ASSIGN_OR_RETURN(PassPlan backward, PlanPass("backward", BuildBackwardGraph(layout, target.handle()), target));
  check.backward = std::move(backward.check);
  return check;
}

StatusOr<GraphCheck> CheckAttentionGraphs(const AttentionLayout& layout, const std::string& device_json) {
  ASSIGN_OR_RETURN(DeviceTarget target, DeviceTarget::FromJson(device_json));
  return CheckAttentionGraphs(layout, target);
}

// ---------------------------------------------------------------------------------------

struct CudnnAttention::Plans {
  PassPlan forward;
  PassPlan backward;
  // The by-value scalars: cuDNN reads them through these host addresses at each execution.
  float scale = 0;
  float masked_score = 0;
  float one = 1;
};

CudnnAttention::CudnnAttention(AttentionLayout layout, cudnnHandle_t handle, std::unique_ptr<Plans> plans)
    : layout_(layout), handle_(handle), plans_(std::move(plans)) {}

CudnnAttention::~CudnnAttention() = default;

StatusOr<std::shared_ptr<const CudnnAttention>> CudnnAttention::Build(const DeviceTarget& target,
                                                                      const AttentionLayout& layout) {
  if (!target.has_device()) {
    return FailedPreconditionError(
        "CudnnAttention::Build needs a device (a cuDNN handle); a description can only be "
        "checked (CheckAttentionGraphs)");
  }
  RETURN_IF_ERROR(Validate(layout, AttentionPass::kBackward));
  RETURN_IF_ERROR(CheckVersion(layout, false));
  auto plans = std::make_unique<Plans>();
  ASSIGN_OR_RETURN(plans->forward, PlanPass("forward", BuildForwardGraph(layout, target.handle()), target));
  ASSIGN_OR_RETURN(plans->backward, PlanPass("backward", BuildBackwardGraph(layout, target.handle()), target));
  plans->scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(layout.head_dim)));
  plans->masked_score = MaskedScore();
  return std::shared_ptr<const CudnnAttention>(new CudnnAttention(layout, target.handle(), std::move(plans)));
}

int64_t CudnnAttention::forward_engine() const { return plans_->forward.check.engine; }
int64_t CudnnAttention::backward_engine() const { return plans_->backward.check.engine; }

size_t CudnnAttention::forward_workspace_bytes() const {
  return static_cast<size_t>(plans_->forward.check.workspace_bytes);
}
size_t CudnnAttention::backward_workspace_bytes() const {
  return static_cast<size_t>(plans_->backward.check.workspace_bytes);
}

size_t CudnnAttention::backward_scratch_floats() const {
  const auto& l = layout_;
  const size_t softmax_sum = static_cast<size_t>(l.batch * l.heads * l.tokens);
  if (l.deterministic) return softmax_sum;
  return RoundUp(softmax_sum, kScratchAlignFloats) + static_cast<size_t>(l.batch * l.heads * l.tokens * l.head_dim);
}

namespace {

Status Execute(cudnnHandle_t handle, cudaStream_t stream, const std::string& pass, const Descriptor& plan,
               const std::vector<int64_t>& uids, const std::vector<void*>& pointers, void* workspace) {
  ASSIGN_OR_RETURN(Descriptor pack, Descriptor::Create(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, pass + " variant pack"));
  RETURN_IF_ERROR(pack.SetInt64s(ATTR(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS), uids));
  RETURN_IF_ERROR(pack.Set(ATTR(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS), CUDNN_TYPE_VOID_PTR,
                           static_cast<int64_t>(pointers.size()), pointers.data()));
  RETURN_IF_ERROR(pack.Set(ATTR(CUDNN_ATTR_VARIANT_PACK_WORKSPACE), CUDNN_TYPE_VOID_PTR, 1, &workspace));
  RETURN_IF_ERROR(pack.Finalize());
  ClearLastCudnnError();
  RETURN_IF_ERROR(CheckCudnn(cudnnSetStream(handle, stream), "cudnnSetStream(" + pass + ")"));
  ClearLastCudnnError();
  return CheckCudnn(cudnnBackendExecute(handle, plan.get(), pack.get()), "cudnnBackendExecute(" + pass + ")");
}

Status CheckWorkspace(const char* pass, void* workspace, int64_t bytes) {
  if (bytes > 0 && workspace == nullptr) {
    return InvalidArgumentError(std::string(pass) + ": the plan needs " + std::to_string(bytes) +
                                " bytes of workspace and none was given");
  }
  if (!Aligned16(workspace)) return InvalidArgumentError(std::string(pass) + ": the workspace is not 16-byte aligned");
  return OkStatus();
}

}  // namespace

Status CudnnAttention::Forward(cudaStream_t stream, const void* q, const void* k, const void* v, void* o, float* stats,
                               void* workspace) const {
  RETURN_IF_ERROR(CheckPointers("attention forward", {{"q", q}, {"k", k}, {"v", v}, {"o", o}, {"stats", stats}}));
  RETURN_IF_ERROR(CheckWorkspace("attention forward", workspace, plans_->forward.check.workspace_bytes));
  auto in = [](const void* p) { return const_cast<void*>(p); };  // cuDNN's variant pack takes void*
  return Execute(handle_, stream, "attention forward", plans_->forward.plan,
                 {kQ, kK, kV, kO, kStats, kScale, kMaskedScore},
                 {in(q), in(k), in(v), o, stats, &plans_->scale, &plans_->masked_score}, workspace);
}

Status CudnnAttention::Backward(cudaStream_t stream, const void* q, const void* k, const void* v, const void* o,
                                const void* d_o, const float* stats, void* dq, void* dk, void* dv, void* workspace,
                                float* scratch) const {
  RETURN_IF_ERROR(CheckPointers("attention backward", {{"q", q},
                                                       {"k", k},
                                                       {"v", v},
                                                       {"o", o},
                                                       {"dO", d_o},
                                                       {"stats", stats},
                                                       {"dq", dq},
                                                       {"dk", dk},
                                                       {"dv", dv},
                                                       {"scratch", scratch}}));
  RETURN_IF_ERROR(CheckWorkspace("attention backward", workspace, plans_->backward.check.workspace_bytes));
  const auto& l = layout_;
  auto in = [](const void* p) { return const_cast<void*>(p); };
  std::vector<int64_t> uids = {kQ, kK, kV, kO, kDO, kStats, kDQ, kDK, kDV, kSoftmaxSum, kScale, kMaskedScore, kOne};
  std::vector<void*> pointers = {in(q),       in(k), in(v), in(o),   in(d_o),        in(stats),
                                 dq,          dk,    dv,    scratch, &plans_->scale, &plans_->masked_score,
                                 &plans_->one};
  if (!l.deterministic) {
    // The accumulator takes dS·K with atomics, so it starts from zero on every call.
    float* accumulator = scratch + RoundUp(static_cast<size_t>(l.batch * l.heads * l.tokens), kScratchAlignFloats);
    const size_t bytes = static_cast<size_t>(l.batch * l.heads * l.tokens * l.head_dim) * sizeof(float);
    RETURN_IF_ERROR(CheckCuda(cudaMemsetAsync(accumulator, 0, bytes, stream), "cudaMemsetAsync(dQ accumulator)"));
    uids.push_back(kDQAccumulator);
    pointers.push_back(accumulator);
  }
  return Execute(handle_, stream, "attention backward", plans_->backward.plan, uids, pointers, workspace);
}

// ---------------------------------------------------------------------------------------

StatusOr<std::shared_ptr<const CudnnAttention>> CudnnAttentionCache::Get(const AttentionLayout& layout) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = plans_.find(layout.Key());
  if (it != plans_.end()) return it->second;
  ASSIGN_OR_RETURN(std::shared_ptr<const CudnnAttention> plans, CudnnAttention::Build(target_, layout));
  plans_.emplace(layout.Key(), plans);
  return plans;
}

size_t CudnnAttentionCache::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return plans_.size();
}

}  // namespace sinkscope::cuda

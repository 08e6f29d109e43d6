// Causal grouped-query flash attention through cuDNN's C backend graph API (cudnn_graph.h),
// without the C++ frontend: the composite graph of matmul, pointwise, reduction and reshape
// nodes that cuDNN's runtime fusion engine recognises as flash attention
// (../shared/design/CUDA.md §2), one forward and one backward graph per problem layout.
//
// Tensors are bf16 (Q, K, V, O, dO, dQ, dK, dV), laid out token-major as the engine keeps
// them: element (b, t, h, j) of a tensor with `heads` heads lies at
//   b·T·row_stride + t·row_stride + h·dh + j
// so one packed q|k|v buffer (row stride W = H·dh + 2·KV·dh, k at offset H·dh, v at
// (H + KV)·dh) and separate buffers are both expressible. Stats is fp32 (B, H, T) contiguous:
// Stats[b,h,t] = log Σ_{u≤t} exp(q_t·k_u/√dh), the natural log of the sum of the
// exponentiated scaled scores, computed by the graph as max + log(Σ exp(s − max)); this is
// exactly the lse of the CPU backend (engine/backend.h), so either side's lse serves.
//
// Two targets: a real device (a cudnnHandle_t, for execution) or a device-properties
// description in JSON (cuDNN ≥ 9.8), which is enough to finalize the graphs, run the engine
// heuristics and compile plans on a machine without a GPU (CheckAttentionGraphs).
#pragma once

#include <cuda_runtime.h>
#include <cudnn_graph.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "base/status.h"

namespace sinkscope::cuda {

// One attention problem. Row strides are in elements (bf16), per token, of each tensor.
struct AttentionLayout {
  int64_t batch = 0;     // B
  int64_t tokens = 0;    // T (queries and keys alike: self-attention)
  int64_t heads = 0;     // H, query heads
  int64_t kv_heads = 0;  // KV, key/value heads; H % KV == 0 (GQA; KV == H is plain multi-head)
  int64_t head_dim = 0;  // dh

  int64_t q_row_stride = 0;
  int64_t k_row_stride = 0;
  int64_t v_row_stride = 0;
  int64_t o_row_stride = 0;
  int64_t dq_row_stride = 0;
  int64_t dk_row_stride = 0;
  int64_t dv_row_stride = 0;
  int64_t do_row_stride = 0;

  // Deterministic backward: dQ is written by its own pass instead of being accumulated with
  // atomics into an fp32 buffer, so two runs give the same bits (costs B·H·T²·2 B workspace).
  bool deterministic = false;

  // Q, K, V, O and their gradients each in its own packed (B, T, heads, dh) buffer.
  static AttentionLayout Separate(int64_t batch, int64_t tokens, int64_t heads, int64_t kv_heads, int64_t head_dim,
                                  bool deterministic = false);
  // q|k|v in one buffer of row stride W = (H + 2·KV)·dh (the packed QKV GEMM's output), and
  // dq|dk|dv likewise in one buffer (one GEMM then gives dx); O and dO packed (row stride H·dh).
  // The caller passes k = qkv + H·dh and v = qkv + (H + KV)·dh (elements), the same for dq|dk|dv.
  static AttentionLayout PackedQkv(int64_t batch, int64_t tokens, int64_t heads, int64_t kv_heads, int64_t head_dim,
                                   bool deterministic = false);

  bool operator==(const AttentionLayout&) const = default;
  // "B4 T1024 H8 KV2 dh64 strides q192 k192 v192 o64 dq192 dk192 dv192 do64 deterministic".
  std::string ToString() const;
  // Every field, for the plan cache's key.
  auto Key() const {
    return std::make_tuple(batch, tokens, heads, kv_heads, head_dim, q_row_stride, k_row_stride, v_row_stride,
                           o_row_stride, dq_row_stride, dk_row_stride, dv_row_stride, do_row_stride, deterministic);
  }
};

enum class AttentionPass { kForward, kBackward };

// INVALID_ARGUMENT naming the field when cuDNN's fused flash attention cannot take the
// layout: positive sizes, H % KV, dh % 8 (16-byte rows of bf16) and dh ≤ 256, each row
// stride at least its tensor's width and a multiple of 8 elements (every row start then
// stays 16-byte aligned, which the graph declares), and for the backward T ≥ 2.
Status Validate(const AttentionLayout& layout, AttentionPass pass = AttentionPass::kBackward);

// cuDNN's version at run time as "9.19.0" (from the library, not the header), and the
// number cudnnGetVersion() gives (major·10000 + minor·100 + patch from 9.0 on).
std::string CudnnVersionString();
int64_t CudnnVersion();

// Where graphs are planned: a real device (a cuDNN handle, not owned, which must outlive the
// target and everything built on it) or a device-properties description (JSON). Copies
// share the description.
class DeviceTarget {
 public:
  static StatusOr<DeviceTarget> FromHandle(cudnnHandle_t handle);
  // `json` as CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION takes it (engine/cuda/devices/):
  // every key present, booleans as 0/1. A missing key is named in the error.
  static StatusOr<DeviceTarget> FromJson(const std::string& json);

  cudnnHandle_t handle() const { return handle_; }  // null for a description
  bool has_device() const { return handle_ != nullptr; }
  // The description's finalized CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR (null with a handle).
  cudnnBackendDescriptor_t device_properties() const;
  // The JSON cuDNN reads back from the description (its own rendering of it).
  StatusOr<std::string> DescriptionJson() const;

 private:
  struct Properties;
  cudnnHandle_t handle_ = nullptr;
  std::shared_ptr<Properties> properties_;
};

// The device-properties JSON of the device behind `handle`, as cuDNN describes it
// (CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION of a descriptor made with the handle): what a
// GPU run writes to engine/cuda/devices/ so device-less checks use the real figures.
StatusOr<std::string> DescribeDevice(cudnnHandle_t handle);

// The device-less check of one pass's graph.
enum class PlanOutcome {
  kFinalized,            // a plan finalized (a real device, or a driver was present)
  kCompiledButNoDriver,  // NVRTC compiled the plan's kernels; loading them needs a real
                         // driver (libcuda is the toolkit's stub): everything short of
                         // running was accepted
};
const char* PlanOutcomeName(PlanOutcome outcome);  // "plan_finalized", "plan_compiled_but_no_driver"

struct PassCheck {
  std::vector<int64_t> mode_a_engines;    // engine global indices CUDNN_HEUR_MODE_A offered, in order
  std::vector<int64_t> fallback_engines;  // those CUDNN_HEUR_MODE_FALLBACK offered
  int64_t engine = -1;                    // the engine whose plan finalized or compiled
  int64_t workspace_bytes = 0;            // its workspace (the engine config's figure without a driver)
  PlanOutcome outcome = PlanOutcome::kFinalized;
  std::string detail;   // for kCompiledButNoDriver: cuDNN's message, as matched
  std::string dropped;  // why the heuristics left other engine configs out ("engine 7: ... d_qk > 128")
};

struct GraphCheck {
  PassCheck forward;
  PassCheck backward;
  std::string ToString() const;
};

// Builds and finalizes the forward and backward graphs of `layout` for `target`, runs the
// heuristics (mode A, then fallback) and finalizes plans in the heuristics' order until one
// finalizes or compiles. A graph cuDNN rejects, no engine offered, or no plan that compiles
// is an error naming the pass, the engines tried and cuDNN's reasons. `validate` false
// leaves the layout to cuDNN alone (to see what cuDNN itself refuses).
StatusOr<GraphCheck> CheckAttentionGraphs(const AttentionLayout& layout, const DeviceTarget& target,
                                          bool validate = true);
StatusOr<GraphCheck> CheckAttentionGraphs(const AttentionLayout& layout, const std::string& device_json);

// The forward and backward plans of one layout on one device, ready to execute. Immutable
// after Build, so concurrent calls are safe as far as cuDNN allows: each call sets the
// handle's stream, so threads sharing a handle must not call at once.
class CudnnAttention {
 public:
  // Validates the layout, checks the cuDNN version, builds both graphs and keeps the first
  // plan of each that finalizes. `target` must hold a handle.
  static StatusOr<std::shared_ptr<const CudnnAttention>> Build(const DeviceTarget& target,
                                                               const AttentionLayout& layout);
  ~CudnnAttention();

  const AttentionLayout& layout() const { return layout_; }
  int64_t forward_engine() const;
  int64_t backward_engine() const;
  // Bytes of device workspace each call needs (16-byte aligned; may be null when 0).
  size_t forward_workspace_bytes() const;
  size_t backward_workspace_bytes() const;
  // Floats of device scratch the backward needs: softmax_sum (B·H·T), then, unless
  // deterministic, the fp32 dQ accumulator (B·H·T·dh) at a 256-byte-aligned offset.
  size_t backward_scratch_floats() const;

  // O and Stats from Q, K, V, asynchronously on `stream`. Pointers are device memory,
  // 16-byte aligned, laid out as the layout says.
  Status Forward(cudaStream_t stream, const void* q, const void* k, const void* v, void* o, float* stats,
                 void* workspace) const;
  // dQ, dK, dV (overwritten) from Q, K, V, the forward's O and Stats, and dO. `scratch`
  // holds backward_scratch_floats() floats; the dQ accumulator in it is zeroed here.
  Status Backward(cudaStream_t stream, const void* q, const void* k, const void* v, const void* o, const void* d_o,
                  const float* stats, void* dq, void* dk, void* dv, void* workspace, float* scratch) const;

 private:
  struct Plans;
  CudnnAttention(AttentionLayout layout, cudnnHandle_t handle, std::unique_ptr<Plans> plans);
  AttentionLayout layout_;
  cudnnHandle_t handle_;
  std::unique_ptr<Plans> plans_;
};

// Plans by layout (every field of it) for one device: building a graph and compiling its
// plan takes from tens of milliseconds to seconds, and every layer of a model shares one.
class CudnnAttentionCache {
 public:
  explicit CudnnAttentionCache(DeviceTarget target) : target_(std::move(target)) {}
  // The layout's plans, built on first use. A failed build is not cached.
  StatusOr<std::shared_ptr<const CudnnAttention>> Get(const AttentionLayout& layout);
  size_t size() const;

 private:
  using Key = decltype(AttentionLayout().Key());
  const DeviceTarget target_;
  mutable std::mutex mu_;
  std::map<Key, std::shared_ptr<const CudnnAttention>> plans_;  // guarded by mu_; built under it too
};

}  // namespace sinkscope::cuda

// The device side of the CUDA emulation: what a kernel sees when g++ compiles a .cu file
// of engine/cuda/kernels/ (through launch.cuh). A block's threads run as fibers on one
// CPU thread and switch only at the synchronisation points below, so between two of them
// a thread runs alone: atomics are plain read-modify-writes, and `__syncthreads` and the
// warp intrinsics are where the runtime (runtime.cc) checks that every thread that must
// meet there does. docs/design/CUDA_EMULATION.md says what this proves and what it cannot.
#pragma once

// Before the toolkit's headers: they keep a definition made first.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
// A plain `__shared__` would be a per-thread local here: shared memory is declared with
// SINKSCOPE_SHARED / SINKSCOPE_DYNAMIC_SHARED (launch.cuh) so both builds agree.
#define __shared__ static_assert(false, "declare shared memory with SINKSCOPE_SHARED (engine/cuda/kernels/launch.cuh)");

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "engine/cuda/emu/runtime.h"

namespace sinkscope::emu {

// The running fiber's coordinates (set by the scheduler before it resumes a thread).
extern thread_local uint3 tls_thread_idx, tls_block_idx;
extern thread_local dim3 tls_block_dim, tls_grid_dim;

// ---- synchronisation (runtime.cc) ----
void SyncThreads(const char* file, int line);
// A warp collective: the calling lane deposits `size` bytes and waits until every lane of
// `mask` has arrived at a collective of the same kind; returns the 32 lanes' deposits
// (16 bytes each; only the mask's lanes are meaningful).
const unsigned char* WarpCollective(unsigned mask, const void* value, size_t size, const char* what);
int LaneId();
unsigned ActiveMask();
// Ends the kernel with a launch failure naming `what` (the running kernel, block and
// thread are added).
[[noreturn]] void KernelFault(const std::string& what);

// ---- shared memory (runtime.cc) ----
int NewSharedSite(const char* name);
void* StaticShared(int site, size_t bytes, size_t align);
void* DynamicShared();

// ---- launches ----
void DeclareCost(double bytes, double flops);
struct LaunchSite {
  const char* kernel;
  const char* file;
  int line;
};
// Validates the configuration, then runs body(ctx) as every thread of every block (blocks
// in a seeded shuffled order); records any failure as the launch's error.
void RunGrid(const LaunchSite& site, const void* kernel_id, dim3 grid, dim3 block, size_t dynamic_shared,
             cudaStream_t stream, void (*body)(void*), void* ctx);
// False (with the launch's error recorded) for a non-null pointer argument that is not in
// a live device allocation.
bool CheckPointerArgument(const LaunchSite& site, int index, const void* p);

template <typename T>
bool CheckArgument(const LaunchSite& site, int index, const T& value) {
  if constexpr (std::is_pointer_v<T>) {
    return CheckPointerArgument(site, index, static_cast<const void*>(value));
  } else {
    return true;
  }
}

template <typename... Params>
struct Launcher {
  LaunchSite site;
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t shared;
  cudaStream_t stream;

  // The arguments become the kernel's parameters as a real launch converts them; every
  // thread gets its own copy when the parameters are passed.
  template <typename... Args>
  void operator()(Args&&... args) const {
    std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    bool ok = true;
    int index = 0;
    std::apply([&](const auto&... p) { ((ok = CheckArgument(site, index++, p) && ok), ...); }, params);
    if (!ok) return;
    struct Context {
      void (*kernel)(Params...);
      std::tuple<std::decay_t<Params>...>* params;
    } context{kernel, &params};
    RunGrid(
        site, reinterpret_cast<const void*>(kernel), grid, block, shared, stream,
        [](void* c) {
          auto* x = static_cast<Context*>(c);
          std::apply(x->kernel, *x->params);
        },
        &context);
  }
};

template <typename... Params>
Launcher<Params...> MakeLauncher(const char* name, const char* file, int line, void (*kernel)(Params...), dim3 grid,
                                 dim3 block, size_t shared, cudaStream_t stream) {
  return Launcher<Params...>{{name, file, line}, kernel, grid, block, shared, stream};
}

// ---- warp intrinsics ----
template <typename T>
T FromLane(const unsigned char* slots, int lane) {
  T out;
  std::memcpy(&out, slots + 16 * lane, sizeof(T));
  return out;
}
void CheckSourceLane(unsigned mask, int source, const char* what);

template <typename T>
T Shuffle(unsigned mask, T v, int source, const char* what) {
  static_assert(sizeof(T) <= 16, "a shuffled value holds at most 16 bytes");
  const unsigned char* slots = WarpCollective(mask, &v, sizeof v, what);
  CheckSourceLane(mask, source, what);
  return FromLane<T>(slots, source);
}

}  // namespace sinkscope::emu

#define threadIdx (::sinkscope::emu::tls_thread_idx)
#define blockIdx (::sinkscope::emu::tls_block_idx)
#define blockDim (::sinkscope::emu::tls_block_dim)
#define gridDim (::sinkscope::emu::tls_grid_dim)
constexpr int warpSize = 32;

#define __syncthreads() ::sinkscope::emu::SyncThreads(__FILE__, __LINE__)

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  const int zero = 0;
  ::sinkscope::emu::WarpCollective(mask, &zero, sizeof zero, "__syncwarp");
}
inline unsigned __activemask() { return ::sinkscope::emu::ActiveMask(); }

// Width w splits the warp into w-lane segments; a source outside the caller's segment
// leaves the caller's own value, as the CUDA programming guide specifies.
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const int lane = ::sinkscope::emu::LaneId();
  const int source = (lane / width) * width + (src_lane % width);
  return ::sinkscope::emu::Shuffle(mask, v, source, "__shfl_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::sinkscope::emu::LaneId();
  const int source = (lane % width) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  return ::sinkscope::emu::Shuffle(mask, v, source, "__shfl_down_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::sinkscope::emu::LaneId();
  const int source = (lane % width) >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return ::sinkscope::emu::Shuffle(mask, v, source, "__shfl_up_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::sinkscope::emu::LaneId();
  const int other = lane ^ lane_mask;
  const int source = (other / width) == (lane / width) ? other : lane;
  return ::sinkscope::emu::Shuffle(mask, v, source, "__shfl_xor_sync");
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const int p = predicate != 0;
  const unsigned char* slots = ::sinkscope::emu::WarpCollective(mask, &p, sizeof p, "__ballot_sync");
  unsigned out = 0;
  for (int lane = 0; lane < 32; ++lane) {
    if ((mask >> lane & 1u) && ::sinkscope::emu::FromLane<int>(slots, lane)) out |= 1u << lane;
  }
  return out;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }

// ---- atomics: a thread runs alone between synchronisation points ----
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
T atomicMax(T* address, T value) {
  const T old = *address;
  if (value > old) *address = value;
  return old;
}
template <typename T>
T atomicMin(T* address, T value) {
  const T old = *address;
  if (value < old) *address = value;
  return old;
}
template <typename T>
T atomicExch(T* address, T value) {
  const T old = *address;
  *address = value;
  return old;
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}

// ---- device math the kernels call that the host library lacks ----
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}
inline int __float_as_int(float f) {
  int x;
  std::memcpy(&x, &f, sizeof x);
  return x;
}
template <typename T>
T __ldg(const T* p) {
  return *p;
}

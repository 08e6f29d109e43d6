// What nvcc and the CPU emulation (engine/cuda/emu/) build from the same kernel source:
// every launch, every shared-memory declaration and every launch's declared cost goes
// through these macros, so the two builds share each line of it.
//
//   SINKSCOPE_COST(bytes, flops);   // beside a launch: what it must at least move and do
//   SINKSCOPE_LAUNCH(Kernel, grid, block, shared_bytes, stream)(args...);
//   SINKSCOPE_SHARED(float, tile, [64][65]);   // __shared__ float tile[64][65];
//   SINKSCOPE_DYNAMIC_SHARED(float, smem);     // extern __shared__ float smem[];
//
// A kernel name with a template argument list holding a comma needs an alias first
// (macro arguments split on commas).
#pragma once

#ifdef SINKSCOPE_CUDA_EMULATION
#include "engine/cuda/emu/device.h"

#define SINKSCOPE_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  ::sinkscope::emu::MakeLauncher(#kernel, __FILE__, __LINE__, kernel, grid, block, shared_bytes, stream)
#define SINKSCOPE_COST(bytes, flops) ::sinkscope::emu::DeclareCost((bytes), (flops))
#define SINKSCOPE_SHARED(type, name, dims)                                                          \
  static const int name##_emu_site = ::sinkscope::emu::NewSharedSite(#name);                        \
  type(&name) dims = *static_cast<type(*) dims>(                                                    \
      ::sinkscope::emu::StaticShared(name##_emu_site, sizeof(type dims), alignof(type)))
#define SINKSCOPE_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::sinkscope::emu::DynamicShared())

#else  // nvcc

#define SINKSCOPE_LAUNCH(kernel, grid, block, shared_bytes, stream) kernel<<<grid, block, shared_bytes, stream>>>
// The costs are read by the emulation's dry run (scripts/bench/gpu.sh --dry-run); a GPU
// build only evaluates them (host arithmetic beside the launch).
#define SINKSCOPE_COST(bytes, flops) ((void)(bytes), (void)(flops))
#define SINKSCOPE_SHARED(type, name, dims) __shared__ type name dims
#define SINKSCOPE_DYNAMIC_SHARED(type, name) extern __shared__ type name[]

#endif

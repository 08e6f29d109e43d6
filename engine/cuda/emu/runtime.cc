// The CUDA emulation's runtime: the SIMT scheduler that runs a grid's threads as fibers,
// shared memory, device memory with guard pages and a poison fill, and host stand-ins for
// the CUDA runtime entry points the backend calls, written from the CUDA Runtime API
// documentation. One context, one device (engine/cuda/devices/h200.json's figures); every
// stream and event executes in call order. docs/design/CUDA_EMULATION.md.
// device.h first: it defines what the toolkit's headers must not.
#include "engine/cuda/emu/device.h"
#include "engine/cuda/emu/runtime.h"

#include <signal.h>
#include <sys/ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace sinkscope::emu {

thread_local uint3 tls_thread_idx, tls_block_idx;
thread_local dim3 tls_block_dim, tls_grid_dim;

namespace {

constexpr unsigned char kPoison = 0xFF;     // NaN as float or double, -1 as an integer
constexpr unsigned char kCanary = 0xA5;     // the slack between an allocation and its guards
constexpr size_t kDeviceAlignment = 256;    // cudaMalloc's documented alignment
constexpr size_t kStackBytes = 256 << 10;   // per fiber, a guard page below
constexpr size_t kSharedArenaBytes = 256 << 10;

size_t PageSize() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}
size_t RoundUp(size_t n, size_t a) { return (n + a - 1) / a * a; }

std::string Hex(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}

// ---- the device ---------------------------------------------------------------------

cudaDeviceProp LoadDevice() {
  cudaDeviceProp prop{};
  std::ifstream in(SINKSCOPE_EMU_DEVICE_JSON);
  nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    std::fprintf(stderr, "CUDA emulation: cannot read the device description %s\n", SINKSCOPE_EMU_DEVICE_JSON);
    std::abort();
  }
  const std::string name = j.value("deviceName", "emulated device");
  std::snprintf(prop.name, sizeof prop.name, "%s (CUDA emulation)", name.c_str());
  prop.totalGlobalMem = j.value("totalGlobalMem", size_t{0});
  prop.sharedMemPerBlock = j.value("maxSharedMemoryPerBlock", size_t{49152});
  prop.sharedMemPerBlockOptin = j.value("maxSharedMemoryPerBlockOptin", size_t{232448});
  prop.reservedSharedMemPerBlock = j.value("reservedSharedMemoryPerBlock", size_t{1024});
  prop.regsPerBlock = j.value("regsPerBlock", 65536);
  prop.warpSize = j.value("warpSize", 32);
  prop.maxThreadsPerBlock = j.value("maxThreadsPerBlock", 1024);
  prop.maxThreadsPerMultiProcessor = j.value("maxThreadsPerSM", 2048);
  prop.multiProcessorCount = j.value("multiProcessorCount", 132);
  prop.l2CacheSize = j.value("l2CacheSize", 0);
  const int ver = j.value("deviceVer", 900);
  prop.major = ver / 100;
  prop.minor = (ver % 100) / 10;
  for (int i = 0; i < 3; ++i) {
    prop.maxGridSize[i] = j["maxGridSize"][i].get<int>();
    prop.maxThreadsDim[i] = j["maxBlockSize"][i].get<int>();
  }
  return prop;
}

// ---- errors ----------------------------------------------------------------------------

std::mutex error_mu;
cudaError_t last_error = cudaSuccess;
cudaError_t sticky_error = cudaSuccess;
std::map<int, std::string> error_detail;  // the latest detail per code, for cudaGetErrorString

cudaError_t Fail(cudaError_t code, const std::string& detail, bool sticky = false) {
  RecordError(code, detail, sticky);
  return code;
}

// ---- device memory ---------------------------------------------------------------------
// [guard page][canary pad][data, 256-aligned][canary slack < 256][guard page]

struct Allocation {
  unsigned char* region;
  size_t region_bytes;
  unsigned char* data;
  size_t bytes;
};
std::mutex memory_mu;
std::map<uintptr_t, Allocation> allocations;  // by data address
size_t live_bytes = 0, peak_bytes = 0;        // as cudaMalloc was asked, guarded by memory_mu

const Allocation* FindAllocation(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  auto it = allocations.upper_bound(a);
  if (it == allocations.begin()) return nullptr;
  --it;
  const Allocation& x = it->second;
  return a < it->first + std::max<size_t>(x.bytes, 1) ? &x : nullptr;
}

bool CanariesIntact(const Allocation& a, std::string* where) {
  const size_t page = PageSize();
  // The 256 bytes before the data: a kernel's underflow lands there first (the rest of
  // the pad up to the guard page is as far from it as the guard page is).
  const size_t pad = std::min<size_t>(a.data - (a.region + page), kDeviceAlignment);
  for (unsigned char* p = a.data - pad; p < a.data; ++p) {
    if (*p != kCanary) {
      *where = std::to_string(a.data - p) + " bytes before";
      return false;
    }
  }
  unsigned char* end = a.region + a.region_bytes - page;
  for (unsigned char* p = a.data + a.bytes; p < end; ++p) {
    if (*p != kCanary) {
      *where = std::to_string(p - (a.data + a.bytes)) + " bytes past the end of";
      return false;
    }
  }
  return true;
}

std::string DescribeAddress(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  std::lock_guard<std::mutex> lock(memory_mu);
  for (const auto& [start, x] : allocations) {
    const auto lo = reinterpret_cast<uintptr_t>(x.region), hi = lo + x.region_bytes;
    if (a >= lo && a < hi) {
      if (a < start) return std::to_string(start - a) + " bytes before the device allocation of " +
                            std::to_string(x.bytes) + " bytes at " + Hex(x.data);
      return std::to_string(a - (start + x.bytes)) + " bytes past the end of the device allocation of " +
             std::to_string(x.bytes) + " bytes at " + Hex(x.data);
    }
  }
  return "not in or beside any device allocation";
}

// ---- streams, events ---------------------------------------------------------------------

struct Stream {
  unsigned flags;
};
struct Event {
  bool recorded = false;
  std::chrono::steady_clock::time_point at;
};
std::mutex handles_mu;
std::vector<Stream*> streams;
std::vector<Event*> events;

bool LiveStream(cudaStream_t s) {
  if (s == nullptr) return true;
  std::lock_guard<std::mutex> lock(handles_mu);
  return std::find(streams.begin(), streams.end(), reinterpret_cast<Stream*>(s)) != streams.end();
}
bool LiveEvent(cudaEvent_t e) {
  std::lock_guard<std::mutex> lock(handles_mu);
  return std::find(events.begin(), events.end(), reinterpret_cast<Event*>(e)) != events.end();
}

// ---- dry run and trace -----------------------------------------------------------------

std::atomic<bool> dry_run{false};
std::mutex trace_mu;
bool tracing = false;
std::vector<TraceRecord> trace;
thread_local Cost pending_cost;

// ---- the scheduler -------------------------------------------------------------------------

enum class State { kRunnable, kBarrier, kWarp, kDone };

// A fiber switch saves the callee-saved registers on the current stack and moves to the
// other's (x86-64 System V): no signal mask is saved, unlike swapcontext, whose system
// call per switch made the emulated suite twenty times slower.
extern "C" void sinkscope_emu_switch(void** save_sp, void* to_sp);
asm(R"(
.text
.globl sinkscope_emu_switch
.type sinkscope_emu_switch,@function
sinkscope_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size sinkscope_emu_switch, .-sinkscope_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
  unsigned char* stack = nullptr;
  uint3 idx{};
  int linear = 0;
  State state = State::kRunnable;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  unsigned warp_mask = 0;
  const char* warp_what = nullptr;
  const unsigned char* warp_result = nullptr;
};

struct Warp {
  unsigned arrived = 0, mask = 0;
  const char* what = nullptr;
  uint64_t generation = 0;
  unsigned char slots[4][32 * 16];  // a ring: a lane reads its generation's deposits
};

struct SharedSite {
  std::string name;
};

// The state of the launch running on this thread (one at a time per thread).
struct Grid {
  const LaunchSite* site = nullptr;
  dim3 grid, block;
  uint3 block_idx{};
  size_t dynamic_shared = 0, shared_limit = 0, static_shared = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<size_t> site_offset;     // per shared site: offset + 1 in this block, 0 if none
  unsigned char* arena = nullptr;      // shared memory
  void* scheduler_sp = nullptr;
  Fiber* current = nullptr;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  bool failed = false;
  std::string failure;
  // The race check's clock: one tick per block start and per barrier released.
  uint32_t epoch = 0;
};
thread_local Grid* grid_state = nullptr;

std::mutex sites_mu;
std::vector<SharedSite> shared_sites;
std::map<const void*, int> max_dynamic_shared;  // cudaFuncAttributeMaxDynamicSharedMemorySize

std::string Coordinates(const uint3& v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

#if defined(__SANITIZE_ADDRESS__)
// AddressSanitizer is told of every switch, so that it checks each fiber against its own
// stack.
}  // namespace
}  // namespace sinkscope::emu
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
namespace sinkscope::emu {
namespace {
thread_local const void* scheduler_stack_bottom = nullptr;
thread_local size_t scheduler_stack_size = 0;
#endif

void FiberEntry();

// From the running fiber to the scheduler, to be resumed.
void SwitchToScheduler() {
  Grid& g = *grid_state;
  Fiber* f = g.current;
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, scheduler_stack_bottom, scheduler_stack_size);
  sinkscope_emu_switch(&f->sp, g.scheduler_sp);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  sinkscope_emu_switch(&f->sp, g.scheduler_sp);
#endif
}

// A fiber's last switch (it finished, or faulted). Under AddressSanitizer the frames on its
// stack never return, so their redzones are unpoisoned here, and this frame has no
// address-taken local (so no redzone of its own): the next launch's fibers reuse the
// stack and must find no stale poison on it.
[[noreturn]] __attribute__((noinline)) void ExitToScheduler() {
  Grid& g = *grid_state;
#if defined(__SANITIZE_ADDRESS__)
  __asan_handle_no_return();
  __sanitizer_start_switch_fiber(nullptr, scheduler_stack_bottom, scheduler_stack_size);
#endif
  sinkscope_emu_switch(&g.current->sp, g.scheduler_sp);
  std::abort();  // a finished fiber is never resumed
}

void Resume(Grid& g, Fiber& f) {
  g.current = &f;
  tls_thread_idx = f.idx;
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack + PageSize(), kStackBytes - PageSize());
  sinkscope_emu_switch(&g.scheduler_sp, f.sp);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  sinkscope_emu_switch(&g.scheduler_sp, f.sp);
#endif
  g.current = nullptr;
}

void FiberEntry() {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &scheduler_stack_bottom, &scheduler_stack_size);
#endif
  Grid& g = *grid_state;
  g.body(g.ctx);
  g.current->state = State::kDone;
  ExitToScheduler();
}

// A fresh fiber's stack: the registers sinkscope_emu_switch pops (zeros), then FiberEntry
// as the address it returns to, aligned as a call would leave it.
void* InitialStack(unsigned char* stack) {
  auto* top = reinterpret_cast<uintptr_t*>(stack + kStackBytes);
  *--top = 0;                                           // FiberEntry's own return address
  *--top = reinterpret_cast<uintptr_t>(&FiberEntry);    // where the first switch returns
  for (int i = 0; i < 6; ++i) *--top = 0;               // rbp, rbx, r12–r15
  return top;
}

// Stacks are reused from launch to launch: a pool with a guard page under each.
std::vector<unsigned char*>& StackPool() {
  static thread_local std::vector<unsigned char*> pool;
  return pool;
}
unsigned char* StackFor(size_t i) {
  auto& pool = StackPool();
  while (pool.size() <= i) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::perror("CUDA emulation: mmap of a fiber stack");
      std::abort();
    }
    mprotect(p, PageSize(), PROT_NONE);
    pool.push_back(static_cast<unsigned char*>(p));
  }
  return pool[i];
}

unsigned char* SharedArena() {
  static thread_local unsigned char* arena = [] {
    void* p = mmap(nullptr, kSharedArenaBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    return static_cast<unsigned char*>(p);
  }();
  return arena;
}

// A fault inside a kernel (a guard page, an unmapped address): the launch fails with
// cudaErrorIllegalAddress, sticky, as on a GPU, and the process goes on.
thread_local sigjmp_buf fault_jump;
thread_local volatile sig_atomic_t in_kernel = 0;
thread_local const void* fault_address = nullptr;
struct sigaction previous_segv, previous_bus;

// ---- the shared-memory race check (SINKSCOPE_EMU_RACECHECK=1) ----
// As compute-sanitizer's racecheck: two threads touching the same 4-byte word of shared
// memory, one of them writing, with no __syncthreads between (nor, for two lanes of one
// warp, a warp collective) is a hazard. While a block runs, its shared memory is kept
// inaccessible; each access faults, is recorded against the word's shadow, and is then
// single-stepped with the page opened (x86-64: the fault's error code says read or write,
// the trap flag stops after the one instruction). Slow, so a test turns it on where it
// is wanted. The word at the faulting address is the one recorded: a vector access of
// several words is checked on its first.
bool RaceCheckOn() {
  static const bool on = [] {
    const char* s = std::getenv("SINKSCOPE_EMU_RACECHECK");
    return s != nullptr && std::strcmp(s, "1") == 0;
  }();
  return on;
}
struct Shadow {
  uint32_t epoch;       // the Grid::epoch of the entries below
  int16_t writer;       // thread (linear), -1 none
  int16_t reader;       // thread, -1 none, -2 several
  uint32_t writer_sync, reader_sync;  // their warp's collective count at the access
};
thread_local std::vector<Shadow> shadow;
thread_local unsigned char* open_page = nullptr;
struct Race {
  bool found = false;
  int first, second;  // threads
  bool first_writes, second_writes;
  size_t offset;
};
thread_local Race race;

// Are two accesses by threads a (earlier) and b ordered? Only by a barrier (a new epoch)
// or, within one warp, by a warp collective since a's access.
bool Ordered(const Grid& g, int a, uint32_t a_sync, int b) {
  if (a == b) return true;
  if (a / 32 != b / 32) return false;
  return g.warps[b / 32].generation != a_sync;
}

void RecordSharedAccess(Grid& g, size_t offset, bool write) {
  Shadow& s = shadow[offset / 4];
  const int t = g.current->linear;
  const uint32_t sync = static_cast<uint32_t>(g.warps[t / 32].generation);
  if (s.epoch != g.epoch) s = Shadow{g.epoch, -1, -1, 0, 0};
  auto hazard = [&](int other, bool other_writes) {
    if (!race.found) race = Race{true, other, t, other_writes, write, offset};
  };
  if (s.writer >= 0 && !Ordered(g, s.writer, s.writer_sync, t)) hazard(s.writer, true);
  if (write) {
    if (s.reader == -2) hazard(-1, false);
    else if (s.reader >= 0 && !Ordered(g, s.reader, s.reader_sync, t)) hazard(s.reader, false);
    s.writer = static_cast<int16_t>(t);
    s.writer_sync = sync;
    s.reader = -1;
  } else if (s.reader == -1 || s.reader == t) {
    s.reader = static_cast<int16_t>(t);
    s.reader_sync = sync;
  } else {
    s.reader = -2;
  }
}

void ProtectArena(Grid& g, int prot) {
  mprotect(g.arena, kSharedArenaBytes, prot);
}

void OnTrap(int, siginfo_t*, void* uc) {
  auto* context = static_cast<ucontext_t*>(uc);
  context->uc_mcontext.gregs[REG_EFL] &= ~0x100LL;  // the trap flag: one step was enough
  if (open_page != nullptr) {
    mprotect(open_page, PageSize(), PROT_NONE);
    open_page = nullptr;
  }
}

void OnFault(int sig, siginfo_t* info, void* uc) {
  Grid* g = grid_state;
  auto* addr = static_cast<unsigned char*>(info->si_addr);
  if (in_kernel && RaceCheckOn() && g != nullptr && g->current != nullptr && addr >= g->arena &&
      addr < g->arena + kSharedArenaBytes) {
    auto* context = static_cast<ucontext_t*>(uc);
    const bool write = (context->uc_mcontext.gregs[REG_ERR] & 2) != 0;
    RecordSharedAccess(*g, static_cast<size_t>(addr - g->arena), write);
    open_page = g->arena + (addr - g->arena) / PageSize() * PageSize();
    mprotect(open_page, PageSize(), PROT_READ | PROT_WRITE);
    context->uc_mcontext.gregs[REG_EFL] |= 0x100LL;
    return;
  }
  if (in_kernel) {
    fault_address = info->si_addr;
    in_kernel = 0;
    siglongjmp(fault_jump, 1);
  }
  const struct sigaction& prev = sig == SIGSEGV ? previous_segv : previous_bus;
  if (prev.sa_flags & SA_SIGINFO) {
    prev.sa_sigaction(sig, info, uc);
  } else if (prev.sa_handler != SIG_IGN && prev.sa_handler != SIG_DFL) {
    prev.sa_handler(sig);
  } else {
    signal(sig, SIG_DFL);
    raise(sig);
  }
}

void InstallFaultHandler() {
  static std::once_flag once;
  std::call_once(once, [] {
    static std::vector<unsigned char> alt(1 << 16);
    stack_t ss{};
    ss.ss_sp = alt.data();
    ss.ss_size = alt.size();
    sigaltstack(&ss, nullptr);
    struct sigaction sa{};
    sa.sa_sigaction = OnFault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &previous_segv);
    sigaction(SIGBUS, &sa, &previous_bus);
    if (RaceCheckOn()) {
      struct sigaction trap{};
      trap.sa_sigaction = OnTrap;
      trap.sa_flags = SA_SIGINFO | SA_ONSTACK;
      sigemptyset(&trap.sa_mask);
      sigaction(SIGTRAP, &trap, nullptr);
    }
  });
  // Each thread that runs kernels needs its own alternate stack (a fiber's stack may be
  // the one that overflowed).
  static thread_local std::vector<unsigned char> alt_stack(1 << 16);
  static thread_local bool set = [] {
    stack_t ss{};
    ss.ss_sp = alt_stack.data();
    ss.ss_size = alt_stack.size();
    return sigaltstack(&ss, nullptr) == 0;
  }();
  (void)set;
}

std::string CheckLaunch(const LaunchSite& site, const void* kernel_id, dim3 grid, dim3 block, size_t dynamic_shared,
                        size_t* limit) {
  const cudaDeviceProp& d = DeviceProperties();
  const unsigned long long threads = static_cast<unsigned long long>(block.x) * block.y * block.z;
  const unsigned bd[3] = {block.x, block.y, block.z}, gd[3] = {grid.x, grid.y, grid.z};
  for (int i = 0; i < 3; ++i) {
    if (bd[i] == 0 || gd[i] == 0) return "a grid or block dimension of 0";
    if (bd[i] > static_cast<unsigned>(d.maxThreadsDim[i])) {
      return "block dimension " + std::to_string(i) + " of " + std::to_string(bd[i]) + " threads, limit " +
             std::to_string(d.maxThreadsDim[i]);
    }
    if (gd[i] > static_cast<unsigned>(d.maxGridSize[i])) {
      return "grid dimension " + std::to_string(i) + " of " + std::to_string(gd[i]) + " blocks, limit " +
             std::to_string(d.maxGridSize[i]);
    }
  }
  if (threads > static_cast<unsigned long long>(d.maxThreadsPerBlock)) {
    return std::to_string(threads) + " threads per block, limit " + std::to_string(d.maxThreadsPerBlock);
  }
  size_t allowed = d.sharedMemPerBlock;
  {
    std::lock_guard<std::mutex> lock(sites_mu);
    auto it = max_dynamic_shared.find(kernel_id);
    if (it != max_dynamic_shared.end()) allowed = std::max<size_t>(allowed, it->second);
  }
  *limit = allowed;
  if (dynamic_shared > allowed) {
    return std::to_string(dynamic_shared) + " bytes of dynamic shared memory, limit " + std::to_string(allowed) +
           (allowed == d.sharedMemPerBlock ? " (more needs cudaFuncAttributeMaxDynamicSharedMemorySize, up to " +
                                                 std::to_string(d.sharedMemPerBlockOptin) + ")"
                                           : "");
  }
  return "";
}

void Abort(Grid& g, const std::string& what) {
  if (!g.failed) {
    g.failed = true;
    g.failure = what;
  }
}

// Releases a __syncthreads when every live thread waits at it; names the threads that
// cannot meet otherwise.
bool ReleaseBarrier(Grid& g) {
  const char* file = nullptr;
  int line = 0;
  int waiting = 0, at_warp = 0;
  const Fiber* first_other = nullptr;
  for (Fiber& f : g.fibers) {
    if (f.state == State::kBarrier) {
      if (file == nullptr) {
        file = f.barrier_file;
        line = f.barrier_line;
      } else if ((f.barrier_line != line || std::strcmp(f.barrier_file, file) != 0) && first_other == nullptr) {
        first_other = &f;
      }
      ++waiting;
    } else if (f.state == State::kWarp) {
      ++at_warp;
    }
  }
  if (waiting == 0 && at_warp == 0) return false;
  std::string why;
  if (first_other != nullptr) {
    why = "__syncthreads divergence: threads wait at " + std::string(file) + ":" + std::to_string(line) +
          " and thread " + Coordinates(first_other->idx) + " at " + first_other->barrier_file + ":" +
          std::to_string(first_other->barrier_line);
  } else if (at_warp > 0) {
    for (const Fiber& f : g.fibers) {
      if (f.state != State::kWarp) continue;
      unsigned missing = 0;
      const int warp = f.linear / 32;
      for (int lane = 0; lane < 32; ++lane) {
        if (!(f.warp_mask >> lane & 1u)) continue;
        const int t = warp * 32 + lane;
        if (t >= static_cast<int>(g.fibers.size()) || g.fibers[t].state != State::kWarp) missing |= 1u << lane;
      }
      char mask[16];
      std::snprintf(mask, sizeof mask, "0x%08x", missing);
      why = std::string(f.warp_what) + " in warp " + std::to_string(warp) + " (thread " + Coordinates(f.idx) +
            "): lanes " + mask + " of its mask never arrive (exited, or waiting elsewhere)";
      break;
    }
  } else {
    for (Fiber& f : g.fibers) {
      if (f.state == State::kBarrier) f.state = State::kRunnable;
    }
    ++g.epoch;
    return true;
  }
  Abort(g, why);
  return false;
}

void RunBlock(Grid& g) {
  const size_t n = g.fibers.size();
  // Shared memory: poisoned at each block start, so a read before a write shows.
  if (g.dynamic_shared + g.static_shared > 0) std::memset(g.arena, kPoison, g.dynamic_shared + g.static_shared);
  std::fill(g.site_offset.begin(), g.site_offset.end(), 0);
  g.static_shared = 0;
  ++g.epoch;
  for (Warp& w : g.warps) {
    w.arrived = 0;
    w.mask = 0;
    w.generation = 0;
  }
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = g.fibers[i];
    f.state = State::kRunnable;
    f.stack = StackFor(i);
    f.sp = InitialStack(f.stack);
  }
  const bool racecheck = RaceCheckOn();
  if (racecheck) ProtectArena(g, PROT_NONE);
  while (!g.failed) {
    bool ran = false;
    for (size_t i = 0; i < n && !g.failed; ++i) {
      if (g.fibers[i].state != State::kRunnable) continue;
      ran = true;
      Resume(g, g.fibers[i]);
      if (race.found) {
        const Race r = race;
        race = Race{};
        Abort(g, "shared-memory race at shared byte " + std::to_string(r.offset) + ": thread " +
                     (r.first >= 0 ? std::to_string(r.first) : std::string("(several)")) +
                     (r.first_writes ? " wrote" : " read") + " it and thread " + std::to_string(r.second) +
                     (r.second_writes ? " wrote" : " read") +
                     " it with no __syncthreads between (block " + Coordinates(g.block_idx) + ")");
      }
    }
    if (racecheck && g.failed) ProtectArena(g, PROT_READ | PROT_WRITE);
    if (g.failed) return;
    if (ran) continue;
    if (!ReleaseBarrier(g)) break;
  }
  if (racecheck) ProtectArena(g, PROT_READ | PROT_WRITE);
}

void RunBlocks(Grid& g, const std::vector<uint32_t>& order) {
  for (uint32_t b : order) {
    g.block_idx = uint3{static_cast<unsigned>(b % g.grid.x), static_cast<unsigned>(b / g.grid.x % g.grid.y),
                        static_cast<unsigned>(b / (static_cast<size_t>(g.grid.x) * g.grid.y))};
    tls_block_idx = g.block_idx;
    RunBlock(g);
    if (g.failed) return;
  }
}

// Runs the blocks; true when a thread faulted (the handler jumps back here). Nothing of
// this frame is touched between the jump's two sides.
bool RunGuarded(Grid& g, const std::vector<uint32_t>& order) {
  if (sigsetjmp(fault_jump, 1) != 0) return true;
  in_kernel = 1;
  RunBlocks(g, order);
  in_kernel = 0;
  return false;
}

}  // namespace

// ---- runtime.h ------------------------------------------------------------------------

const cudaDeviceProp& DeviceProperties() {
  static const cudaDeviceProp prop = LoadDevice();
  return prop;
}

bool IsDeviceRange(const void* p, size_t bytes) {
  std::lock_guard<std::mutex> lock(memory_mu);
  const Allocation* a = FindAllocation(p);
  return a != nullptr && static_cast<const unsigned char*>(p) + bytes <= a->data + a->bytes;
}

std::string CheckDeviceRange(const void* p, size_t bytes, const std::string& what) {
  if (p == nullptr) return what + " is a null pointer";
  {
    std::lock_guard<std::mutex> lock(memory_mu);
    const Allocation* a = FindAllocation(p);
    if (a != nullptr) {
      const size_t offset = static_cast<const unsigned char*>(p) - a->data;
      if (offset + bytes <= a->bytes) return "";
      return what + " (" + Hex(p) + ", " + std::to_string(bytes) + " bytes) runs " +
             std::to_string(offset + bytes - a->bytes) + " bytes past the end of its device allocation of " +
             std::to_string(a->bytes) + " bytes";
    }
  }
  return what + " (" + Hex(p) + ") is not a live device allocation: " + DescribeAddress(p);
}

void RecordError(cudaError_t code, const std::string& detail, bool sticky) {
  std::lock_guard<std::mutex> lock(error_mu);
  if (sticky_error == cudaSuccess) {
    last_error = code;
    if (sticky) sticky_error = code;
  }
  error_detail[code] = detail;
  std::fprintf(stderr, "CUDA emulation: %s: %s\n", cudaGetErrorName(code), detail.c_str());
}

cudaError_t StickyError() {
  std::lock_guard<std::mutex> lock(error_mu);
  return sticky_error;
}

void SetDryRun(bool on) { dry_run = on; }
bool DryRun() { return dry_run; }

size_t LiveDeviceBytes() {
  std::lock_guard<std::mutex> lock(memory_mu);
  return live_bytes;
}
size_t PeakDeviceBytes() {
  std::lock_guard<std::mutex> lock(memory_mu);
  return peak_bytes;
}
void ResetPeakDeviceBytes() {
  std::lock_guard<std::mutex> lock(memory_mu);
  peak_bytes = live_bytes;
}

void StartTrace() {
  std::lock_guard<std::mutex> lock(trace_mu);
  tracing = true;
  trace.clear();
}
std::vector<TraceRecord> StopTrace() {
  std::lock_guard<std::mutex> lock(trace_mu);
  tracing = false;
  return std::move(trace);
}
void Trace(TraceRecord record) {
  std::lock_guard<std::mutex> lock(trace_mu);
  if (tracing) trace.push_back(std::move(record));
}

// ---- device.h: the kernel's side ----------------------------------------------------------

void DeclareCost(double bytes, double flops) { pending_cost = {bytes, flops}; }

void SyncThreads(const char* file, int line) {
  Grid& g = *grid_state;
  Fiber& f = *g.current;
  f.state = State::kBarrier;
  f.barrier_file = file;
  f.barrier_line = line;
  SwitchToScheduler();
}

int LaneId() { return grid_state->current->linear % 32; }

unsigned ActiveMask() {
  // The lanes of this warp that have not exited: the emulation runs a warp's lanes one
  // after another, so "active" is every lane that can still reach a collective.
  Grid& g = *grid_state;
  const int warp = g.current->linear / 32;
  unsigned mask = 0;
  for (int lane = 0; lane < 32; ++lane) {
    const size_t t = static_cast<size_t>(warp) * 32 + lane;
    if (t < g.fibers.size() && g.fibers[t].state != State::kDone) mask |= 1u << lane;
  }
  return mask;
}

void KernelFault(const std::string& what) {
  Grid& g = *grid_state;
  Abort(g, what + " (block " + Coordinates(g.block_idx) + ", thread " + Coordinates(g.current->idx) + ")");
  g.current->state = State::kDone;
  ExitToScheduler();
}

const unsigned char* WarpCollective(unsigned mask, const void* value, size_t size, const char* what) {
  Grid& g = *grid_state;
  Fiber& f = *g.current;
  const int lane = f.linear % 32;
  if (!(mask >> lane & 1u)) {
    char m[16];
    std::snprintf(m, sizeof m, "0x%08x", mask);
    KernelFault(std::string(what) + " called by lane " + std::to_string(lane) + " with mask " + m +
                ", which leaves it out");
  }
  const int warp_base = f.linear / 32 * 32;
  for (int l = 0; l < 32; ++l) {
    if ((mask >> l & 1u) && warp_base + l >= static_cast<int>(g.fibers.size())) {
      char m[16];
      std::snprintf(m, sizeof m, "0x%08x", mask);
      KernelFault(std::string(what) + " with mask " + m + " names lane " + std::to_string(l) +
                  ", which this block of " + std::to_string(g.fibers.size()) + " threads does not have");
    }
  }
  Warp& w = g.warps[f.linear / 32];
  if (w.arrived != 0 && (w.mask != mask || std::strcmp(w.what, what) != 0)) {
    char a[16], b[16];
    std::snprintf(a, sizeof a, "0x%08x", w.mask);
    std::snprintf(b, sizeof b, "0x%08x", mask);
    KernelFault("warp " + std::to_string(f.linear / 32) + ": lane " + std::to_string(lane) + " reaches " + what +
                " with mask " + b + " while other lanes wait at " + w.what + " with mask " + a);
  }
  unsigned char* slots = w.slots[w.generation % 4];
  std::memset(slots + 16 * lane, 0, 16);
  std::memcpy(slots + 16 * lane, value, size);
  w.mask = mask;
  w.what = what;
  w.arrived |= 1u << lane;
  f.warp_result = slots;
  if (w.arrived == mask) {  // the last lane in: everyone goes on
    w.arrived = 0;
    ++w.generation;
    for (int l = 0; l < 32; ++l) {
      if ((mask >> l & 1u) && l != lane) g.fibers[warp_base + l].state = State::kRunnable;
    }
    return slots;
  }
  f.state = State::kWarp;
  f.warp_mask = mask;
  f.warp_what = what;
  SwitchToScheduler();
  return f.warp_result;
}

void CheckSourceLane(unsigned mask, int source, const char* what) {
  if (!(mask >> source & 1u)) {
    char m[16];
    std::snprintf(m, sizeof m, "0x%08x", mask);
    KernelFault(std::string(what) + " reads lane " + std::to_string(source) + ", outside its mask " + m +
                " (an undefined value on a GPU)");
  }
}

int NewSharedSite(const char* name) {
  std::lock_guard<std::mutex> lock(sites_mu);
  shared_sites.push_back({name});
  return static_cast<int>(shared_sites.size()) - 1;
}

void* StaticShared(int site, size_t bytes, size_t align) {
  Grid& g = *grid_state;
  if (g.site_offset.size() <= static_cast<size_t>(site)) g.site_offset.resize(site + 1, 0);
  if (g.site_offset[site] == 0) {
    const size_t start = RoundUp(RoundUp(g.dynamic_shared, 16) + g.static_shared, std::max<size_t>(align, 4));
    const size_t end = start + bytes;
    const size_t used = end;  // dynamic + static, as the block's shared memory
    if (used > g.shared_limit) {
      KernelFault("shared memory: " + std::to_string(end - RoundUp(g.dynamic_shared, 16)) + " bytes static (`" +
                  shared_sites[site].name + "` the last) + " + std::to_string(g.dynamic_shared) +
                  " dynamic exceed the per-block limit of " + std::to_string(g.shared_limit));
    }
    if (RaceCheckOn()) ProtectArena(g, PROT_READ | PROT_WRITE);
    std::memset(g.arena + start, kPoison, bytes);
    if (RaceCheckOn()) ProtectArena(g, PROT_NONE);
    g.static_shared = end - RoundUp(g.dynamic_shared, 16);
    g.site_offset[site] = start + 1;
  }
  return g.arena + (g.site_offset[site] - 1);
}

void* DynamicShared() { return grid_state->arena; }

bool CheckPointerArgument(const LaunchSite& site, int index, const void* p) {
  if (p == nullptr) return true;
  std::string why = CheckDeviceRange(p, 0, "argument " + std::to_string(index));
  if (why.empty()) return true;
  RecordError(cudaErrorInvalidValue,
              "kernel " + std::string(site.kernel) + " (launched at " + site.file + ":" + std::to_string(site.line) +
                  "): " + why,
              false);
  return false;
}

void RunGrid(const LaunchSite& site, const void* kernel_id, dim3 grid, dim3 block, size_t dynamic_shared,
             cudaStream_t stream, void (*body)(void*), void* ctx) {
  const Cost cost = pending_cost;
  pending_cost = Cost{};
  const std::string where =
      "kernel " + std::string(site.kernel) + " (launched at " + site.file + ":" + std::to_string(site.line) + ")";
  {
    std::lock_guard<std::mutex> lock(trace_mu);
    if (tracing) {
      TraceRecord r;
      r.kind = TraceRecord::kKernel;
      r.name = site.kernel;
      r.site = std::string(site.file) + ":" + std::to_string(site.line);
      r.grid[0] = grid.x, r.grid[1] = grid.y, r.grid[2] = grid.z;
      r.block[0] = block.x, r.block[1] = block.y, r.block[2] = block.z;
      r.dynamic_shared = dynamic_shared;
      r.cost = cost;
      trace.push_back(std::move(r));
    }
  }
  if (StickyError() != cudaSuccess) {
    RecordError(StickyError(), where + " not run: the context has a sticky error", false);
    return;
  }
  if (!LiveStream(stream)) {
    RecordError(cudaErrorInvalidResourceHandle, where + ": the stream is not a live stream", false);
    return;
  }
  size_t limit = 0;
  if (std::string why = CheckLaunch(site, kernel_id, grid, block, dynamic_shared, &limit); !why.empty()) {
    RecordError(cudaErrorInvalidConfiguration, where + ": " + why, false);
    return;
  }
  if (dry_run) return;

  InstallFaultHandler();
  Grid g;
  g.site = &site;
  g.grid = grid;
  g.block = block;
  g.dynamic_shared = dynamic_shared;
  g.shared_limit = limit;
  g.body = body;
  g.ctx = ctx;
  g.arena = SharedArena();
  // A clean shadow for every launch: g.epoch restarts here, so an entry the previous kernel
  // left could otherwise carry this launch's epoch and pair with its accesses as a race.
  if (RaceCheckOn()) shadow.assign(kSharedArenaBytes / 4, Shadow{0, -1, -1, 0, 0});
  const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
  g.fibers.resize(threads);
  g.warps.resize((threads + 31) / 32);
  for (size_t t = 0; t < threads; ++t) {
    Fiber& f = g.fibers[t];
    f.linear = static_cast<int>(t);
    f.idx = uint3{static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                  static_cast<unsigned>(t / (static_cast<size_t>(block.x) * block.y))};
  }
  // Blocks in a seeded shuffled order: a kernel that depends on the order of its blocks
  // gives different results from run to run of a seed and from seed to seed.
  static std::atomic<uint64_t> launches{0};
  static const uint64_t seed = [] {
    const char* s = std::getenv("SINKSCOPE_EMU_SEED");
    return s != nullptr ? std::strtoull(s, nullptr, 10) : uint64_t{20260305};
  }();
  const size_t blocks = static_cast<size_t>(grid.x) * grid.y * grid.z;
  std::vector<uint32_t> order(blocks);
  for (size_t i = 0; i < blocks; ++i) order[i] = static_cast<uint32_t>(i);
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + launches++);
  std::shuffle(order.begin(), order.end(), rng);

  Grid* outer = grid_state;
  grid_state = &g;
  tls_block_dim = block;
  tls_grid_dim = grid;
  const bool faulted = RunGuarded(g, order);
  if (RaceCheckOn()) ProtectArena(g, PROT_READ | PROT_WRITE);
  grid_state = outer;
  if (faulted) {
    std::string who = g.current != nullptr ? ", thread " + Coordinates(g.current->idx) : "";
    RecordError(cudaErrorIllegalAddress,
                where + ", block " + Coordinates(g.block_idx) + who + ": invalid access at " + Hex(fault_address) +
                    ": " + DescribeAddress(fault_address),
                true);
    return;
  }
  if (g.failed) {
    RecordError(cudaErrorLaunchFailure, where + ": " + g.failure, true);
    return;
  }
  // A write into the canary slack beside an allocation is out of range too.
  std::lock_guard<std::mutex> lock(memory_mu);
  for (const auto& [start, a] : allocations) {
    std::string side;
    if (!CanariesIntact(a, &side)) {
      const std::string detail = where + ": wrote " + side + " the device allocation of " + std::to_string(a.bytes) +
                                 " bytes at " + Hex(a.data);
      RecordError(cudaErrorIllegalAddress, detail, true);  // takes error_mu only
      break;
    }
  }
}

}  // namespace sinkscope::emu

// ---- the CUDA runtime entry points the backend calls ---------------------------------------

using sinkscope::emu::Fail;

namespace {

cudaError_t Sticky() { return sinkscope::emu::StickyError(); }

cudaError_t Copy(void* dst, const void* src, size_t count, cudaMemcpyKind kind, const char* call) {
  using namespace sinkscope::emu;
  if (cudaError_t e = Sticky(); e != cudaSuccess) return e;
  if (count == 0) return cudaSuccess;
  const bool dst_device = IsDeviceRange(dst, 0), src_device = IsDeviceRange(src, 0);
  if (kind == cudaMemcpyDefault) {
    kind = dst_device ? (src_device ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                      : (src_device ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
  }
  const bool want_dst = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool want_src = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (want_dst) {
    if (std::string why = CheckDeviceRange(dst, count, std::string(call) + " destination"); !why.empty()) {
      return Fail(cudaErrorInvalidValue, why);
    }
  } else if (dst_device) {
    return Fail(cudaErrorInvalidValue, std::string(call) + ": the destination is device memory but the kind says host");
  }
  if (want_src) {
    if (std::string why = CheckDeviceRange(src, count, std::string(call) + " source"); !why.empty()) {
      return Fail(cudaErrorInvalidValue, why);
    }
  } else if (src_device) {
    return Fail(cudaErrorInvalidValue, std::string(call) + ": the source is device memory but the kind says host");
  }
  // A dry run reads zeros to the host and leaves device memory untouched, but uploads
  // what the host sends (the weights, the tables the backend keeps on the device).
  if (!DryRun() || kind == cudaMemcpyHostToDevice) {
    std::memmove(dst, src, count);
  } else if (kind == cudaMemcpyDeviceToHost) {
    std::memset(dst, 0, count);
  }
  TraceRecord r;
  r.kind = TraceRecord::kCopy;
  r.name = kind == cudaMemcpyHostToDevice   ? "copy host→device"
           : kind == cudaMemcpyDeviceToHost ? "copy device→host"
                                            : "copy device→device";
  r.cost.bytes = static_cast<double>(count) * (kind == cudaMemcpyDeviceToDevice ? 2 : 1);
  r.cost.flops = 0;
  Trace(std::move(r));
  return cudaSuccess;
}

cudaError_t Set(void* p, int value, size_t count, const char* call) {
  using namespace sinkscope::emu;
  if (cudaError_t e = Sticky(); e != cudaSuccess) return e;
  if (count == 0) return cudaSuccess;
  if (std::string why = CheckDeviceRange(p, count, call); !why.empty()) return Fail(cudaErrorInvalidValue, why);
  if (!DryRun()) std::memset(p, value, count);
  TraceRecord r;
  r.kind = TraceRecord::kCopy;
  r.name = "memset";
  r.cost.bytes = static_cast<double>(count);
  r.cost.flops = 0;
  Trace(std::move(r));
  return cudaSuccess;
}

}  // namespace

extern "C" {

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device != 0) {
    return Fail(cudaErrorInvalidDevice, "cudaSetDevice(" + std::to_string(device) + "): the emulation has one device");
  }
  return Sticky();
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return Fail(cudaErrorInvalidDevice, "cudaGetDeviceProperties: no device " + std::to_string(device));
  *prop = sinkscope::emu::DeviceProperties();
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() { return Sticky(); }

// Destroys the context as the documentation says: every allocation is freed and the
// errors, sticky ones included, are cleared (the emulation's tests start each case so).
cudaError_t cudaDeviceReset() {
  using namespace sinkscope::emu;
  {
    std::lock_guard<std::mutex> lock(memory_mu);
    for (auto& [start, a] : allocations) munmap(a.region, a.region_bytes);
    allocations.clear();
    live_bytes = peak_bytes = 0;
  }
  std::lock_guard<std::mutex> lock(error_mu);
  last_error = sticky_error = cudaSuccess;
  error_detail.clear();
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> lock(sinkscope::emu::error_mu);
  const cudaError_t e = sinkscope::emu::last_error;
  if (sinkscope::emu::sticky_error == cudaSuccess) sinkscope::emu::last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() {
  std::lock_guard<std::mutex> lock(sinkscope::emu::error_mu);
  return sinkscope::emu::last_error;
}

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    default: return "cudaErrorUnknown";
  }
}

// The documented text, and the emulation's detail of the latest error with that code
// (the kernel, its launch site, the limit or the address), so that a message built from
// cudaGetErrorString names them.
const char* cudaGetErrorString(cudaError_t e) {
  static thread_local std::string text;
  switch (e) {
    case cudaSuccess: text = "no error"; break;
    case cudaErrorInvalidValue: text = "invalid argument"; break;
    case cudaErrorMemoryAllocation: text = "out of memory"; break;
    case cudaErrorInvalidConfiguration: text = "invalid configuration argument"; break;
    case cudaErrorInvalidDevice: text = "invalid device ordinal"; break;
    case cudaErrorInvalidResourceHandle: text = "invalid resource handle"; break;
    case cudaErrorNotReady: text = "device not ready"; break;
    case cudaErrorIllegalAddress: text = "an illegal memory access was encountered"; break;
    case cudaErrorMisalignedAddress: text = "misaligned address"; break;
    case cudaErrorLaunchFailure: text = "unspecified launch failure"; break;
    case cudaErrorNoDevice: text = "no CUDA-capable device is detected"; break;
    default: text = "unknown error"; break;
  }
  std::lock_guard<std::mutex> lock(sinkscope::emu::error_mu);
  auto it = sinkscope::emu::error_detail.find(e);
  if (it != sinkscope::emu::error_detail.end()) text += " [emulation: " + it->second + "]";
  return text.c_str();
}

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  using namespace sinkscope::emu;
  *ptr = nullptr;
  if (cudaError_t e = Sticky(); e != cudaSuccess) return e;
  const size_t page = PageSize();
  const size_t data_bytes = RoundUp(std::max<size_t>(bytes, 1), kDeviceAlignment);
  const size_t region_bytes = page + RoundUp(data_bytes, page) + page;
  if (bytes > DeviceProperties().totalGlobalMem) {
    return Fail(cudaErrorMemoryAllocation,
                "cudaMalloc of " + std::to_string(bytes) + " bytes: more than the device's " +
                    std::to_string(DeviceProperties().totalGlobalMem));
  }
  void* region = mmap(nullptr, region_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (region == MAP_FAILED) {
    return Fail(cudaErrorMemoryAllocation, "cudaMalloc of " + std::to_string(bytes) + " bytes: host mmap failed");
  }
  auto* r = static_cast<unsigned char*>(region);
  mprotect(r, page, PROT_NONE);
  mprotect(r + region_bytes - page, page, PROT_NONE);
  Allocation a{r, region_bytes, r + region_bytes - page - data_bytes, bytes};
  if (!DryRun()) {
    // cudaMalloc's memory is uninitialised: poison, so a read before a write shows.
    std::memset(r + page, kCanary, a.data - (r + page));
    std::memset(a.data, kPoison, bytes);
    std::memset(a.data + bytes, kCanary, data_bytes - bytes);
  }
  std::lock_guard<std::mutex> lock(memory_mu);
  allocations[reinterpret_cast<uintptr_t>(a.data)] = a;
  live_bytes += bytes;
  peak_bytes = std::max(peak_bytes, live_bytes);
  *ptr = a.data;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  using namespace sinkscope::emu;
  if (ptr == nullptr) return cudaSuccess;
  Allocation a;
  {
    std::lock_guard<std::mutex> lock(memory_mu);
    auto it = allocations.find(reinterpret_cast<uintptr_t>(ptr));
    if (it == allocations.end()) {
      return Fail(cudaErrorInvalidDevicePointer,
                  "cudaFree(" + Hex(ptr) + "): not the start of a live device allocation");
    }
    a = it->second;
    live_bytes -= a.bytes;
    allocations.erase(it);
  }
  std::string side;
  const bool intact = DryRun() || CanariesIntact(a, &side);
  munmap(a.region, a.region_bytes);
  if (!intact) {
    return Fail(cudaErrorIllegalAddress,
                "cudaFree: something wrote " + side + " the device allocation of " + std::to_string(a.bytes) +
                    " bytes at " + Hex(a.data),
                true);
  }
  return Sticky();
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  return Copy(dst, src, count, kind, "cudaMemcpy");
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind, cudaStream_t stream) {
  if (!sinkscope::emu::LiveStream(stream)) return Fail(cudaErrorInvalidResourceHandle, "cudaMemcpyAsync: dead stream");
  return Copy(dst, src, count, kind, "cudaMemcpyAsync");
}
cudaError_t cudaMemset(void* p, int value, size_t count) { return Set(p, value, count, "cudaMemset"); }
cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t stream) {
  if (!sinkscope::emu::LiveStream(stream)) return Fail(cudaErrorInvalidResourceHandle, "cudaMemsetAsync: dead stream");
  return Set(p, value, count, "cudaMemsetAsync");
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  using namespace sinkscope::emu;
  auto* s = new Stream{flags};
  std::lock_guard<std::mutex> lock(handles_mu);
  streams.push_back(s);
  *stream = reinterpret_cast<cudaStream_t>(s);
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, cudaStreamDefault); }
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  using namespace sinkscope::emu;
  std::lock_guard<std::mutex> lock(handles_mu);
  auto it = std::find(streams.begin(), streams.end(), reinterpret_cast<Stream*>(stream));
  if (it == streams.end()) return cudaErrorInvalidResourceHandle;
  delete *it;
  streams.erase(it);
  return cudaSuccess;
}
// Work runs when it is queued: a stream is always drained, so its state is the context's.
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  if (!sinkscope::emu::LiveStream(stream)) return Fail(cudaErrorInvalidResourceHandle, "cudaStreamSynchronize: dead stream");
  return Sticky();
}
cudaError_t cudaStreamQuery(cudaStream_t stream) {
  if (!sinkscope::emu::LiveStream(stream)) return Fail(cudaErrorInvalidResourceHandle, "cudaStreamQuery: dead stream");
  return Sticky();
}
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int) {
  if (!sinkscope::emu::LiveStream(stream) || !sinkscope::emu::LiveEvent(event)) return cudaErrorInvalidResourceHandle;
  return Sticky();
}

cudaError_t cudaEventCreate(cudaEvent_t* event) {
  using namespace sinkscope::emu;
  auto* e = new Event;
  std::lock_guard<std::mutex> lock(handles_mu);
  events.push_back(e);
  *event = reinterpret_cast<cudaEvent_t>(e);
  return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) { return cudaEventCreate(event); }
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  using namespace sinkscope::emu;
  std::lock_guard<std::mutex> lock(handles_mu);
  auto it = std::find(events.begin(), events.end(), reinterpret_cast<Event*>(event));
  if (it == events.end()) return cudaErrorInvalidResourceHandle;
  delete *it;
  events.erase(it);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  using namespace sinkscope::emu;
  if (!LiveEvent(event) || !LiveStream(stream)) return cudaErrorInvalidResourceHandle;
  auto* e = reinterpret_cast<Event*>(event);
  e->recorded = true;
  e->at = std::chrono::steady_clock::now();
  return Sticky();
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  if (!sinkscope::emu::LiveEvent(event)) return cudaErrorInvalidResourceHandle;
  return Sticky();
}
cudaError_t cudaEventQuery(cudaEvent_t event) {
  if (!sinkscope::emu::LiveEvent(event)) return cudaErrorInvalidResourceHandle;
  return Sticky();
}
// Host time between the records: the emulation's, not a GPU's.
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  using namespace sinkscope::emu;
  if (!LiveEvent(start) || !LiveEvent(end)) return cudaErrorInvalidResourceHandle;
  auto *a = reinterpret_cast<Event*>(start), *b = reinterpret_cast<Event*>(end);
  if (!a->recorded || !b->recorded) return Fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: an event was never recorded");
  *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  using namespace sinkscope::emu;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  const cudaDeviceProp& d = DeviceProperties();
  if (value < 0 || static_cast<size_t>(value) > d.sharedMemPerBlockOptin) {
    return Fail(cudaErrorInvalidValue, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " + std::to_string(value) +
                                           "): the device allows at most " + std::to_string(d.sharedMemPerBlockOptin));
  }
  std::lock_guard<std::mutex> lock(sites_mu);
  max_dynamic_shared[func] = value;
  return cudaSuccess;
}

}  // extern "C"

// The CUDA emulation's own contract (engine/cuda/emu/, docs/design/CUDA_EMULATION.md):
// each limit a real launch hits is an error naming the kernel, its launch site and the
// limit; barriers, warp collectives, shared memory, device memory and block order behave
// as the CUDA programming guide says or fail saying why; and kernels broken on purpose
// the way kernels break (a missing barrier, an index one past the end, a host pointer)
// are caught. The kernels here are written as the backend's are (kernels/launch.cuh).
#include "engine/cuda/emu/device.h"  // first, as for every kernel source

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "engine/cuda/kernels/launch.cuh"
#include "engine/cuda/kernels/reduce.cuh"

namespace sinkscope {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using cuda::BlockSum;
using cuda::WarpSum;

// Each case starts on a fresh context: a fault is sticky, as on a GPU.
class Emulation : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(cudaDeviceReset(), cudaSuccess); }
  void TearDown() override { cudaDeviceReset(); }

  template <typename T>
  T* Device(size_t n) {
    void* p = nullptr;
    EXPECT_EQ(cudaMalloc(&p, n * sizeof(T)), cudaSuccess);
    return static_cast<T*>(p);
  }
  template <typename T>
  std::vector<T> Host(const T* d, size_t n) {
    std::vector<T> h(n);
    EXPECT_EQ(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
  // The last error and its text (the emulation's detail included).
  std::pair<cudaError_t, std::string> LastError() {
    const cudaError_t e = cudaGetLastError();
    return {e, cudaGetErrorString(e)};
  }
};

__global__ void WriteIndex(int* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = i;
}

TEST_F(Emulation, ALaunchOverTheDeviceLimitsIsRefusedNamingKernelSiteAndLimit) {
  int* out = Device<int>(4096);
  SINKSCOPE_COST(0, 0);
  SINKSCOPE_LAUNCH(WriteIndex, 1, 2048, 0, 0)(out, 4096);
  auto [e, text] = LastError();
  EXPECT_EQ(e, cudaErrorInvalidConfiguration);
  EXPECT_THAT(text, AllOf(HasSubstr("WriteIndex"), HasSubstr("cuda_emulation_test.cc:"), HasSubstr("block dimension 0 of 2048 threads, limit 1024")));

  SINKSCOPE_LAUNCH(WriteIndex, dim3(1, 70000), 32, 0, 0)(out, 4096);
  std::tie(e, text) = LastError();
  EXPECT_EQ(e, cudaErrorInvalidConfiguration);
  EXPECT_THAT(text, HasSubstr("grid dimension 1 of 70000 blocks, limit 65535"));

  SINKSCOPE_LAUNCH(WriteIndex, 1, dim3(32, 1, 65), 0, 0)(out, 4096);
  EXPECT_THAT(LastError().second, HasSubstr("block dimension 2 of 65 threads, limit 64"));

  SINKSCOPE_LAUNCH(WriteIndex, 4, 1024, 0, 0)(out, 4096);  // within the limits: runs
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  const std::vector<int> h = Host(out, 4096);
  for (int i = 0; i < 4096; ++i) ASSERT_EQ(h[i], i);
}

__global__ void DynamicSharedCopy(float* out, int n) {
  SINKSCOPE_DYNAMIC_SHARED(float, smem);
  for (int i = threadIdx.x; i < n; i += blockDim.x) smem[i] = static_cast<float>(i);
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = smem[n - 1 - i];
}

TEST_F(Emulation, DynamicSharedMemoryOver48KiBNeedsTheOptInAttribute) {
  const int n = 16384;  // 64 KiB
  float* out = Device<float>(n);
  SINKSCOPE_LAUNCH(DynamicSharedCopy, 1, 256, n * sizeof(float), 0)(out, n);
  auto [e, text] = LastError();
  EXPECT_EQ(e, cudaErrorInvalidConfiguration);
  EXPECT_THAT(text, AllOf(HasSubstr("DynamicSharedCopy"), HasSubstr("65536 bytes of dynamic shared memory, limit 49152"),
                          HasSubstr("cudaFuncAttributeMaxDynamicSharedMemorySize")));
  EXPECT_EQ(cudaFuncSetAttribute(reinterpret_cast<const void*>(DynamicSharedCopy),
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, 300 << 10),
            cudaErrorInvalidValue)
      << "over the device's opt-in maximum (227 KiB)";
  cudaGetLastError();
  ASSERT_EQ(cudaFuncSetAttribute(reinterpret_cast<const void*>(DynamicSharedCopy),
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, n * sizeof(float)),
            cudaSuccess);
  SINKSCOPE_LAUNCH(DynamicSharedCopy, 1, 256, n * sizeof(float), 0)(out, n);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  const std::vector<float> h = Host(out, n);
  for (int i = 0; i < n; ++i) ASSERT_EQ(h[i], n - 1 - i);
}

__global__ void TooMuchStaticShared(float* out) {
  SINKSCOPE_SHARED(float, big, [13000]);  // 52,000 bytes
  big[threadIdx.x] = 1.0f;
  out[threadIdx.x] = big[threadIdx.x];
}

TEST_F(Emulation, StaticSharedMemoryOverTheLimitFailsTheLaunch) {
  float* out = Device<float>(32);
  SINKSCOPE_LAUNCH(TooMuchStaticShared, 1, 32, 0, 0)(out);
  auto [e, text] = LastError();
  EXPECT_EQ(e, cudaErrorLaunchFailure);
  EXPECT_THAT(text, AllOf(HasSubstr("TooMuchStaticShared"), HasSubstr("52000 bytes static (`big`"),
                          HasSubstr("limit of 49152")));
  EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorLaunchFailure) << "a failed launch is sticky, as on a GPU";
}

__global__ void DivergentBarrier(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void BarrierAfterEarlyExit(float* out) {
  if (threadIdx.x >= 40) return;  // exited threads do not count at a barrier
  SINKSCOPE_SHARED(float, s, [64]);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[39 - threadIdx.x];
}

TEST_F(Emulation, ABarrierNotEveryLiveThreadReachesFailsNamingTheKernel) {
  float* out = Device<float>(64);
  SINKSCOPE_LAUNCH(BarrierAfterEarlyExit, 1, 64, 0, 0)(out);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(Host(out, 64)[0], 39.0f);

  SINKSCOPE_LAUNCH(DivergentBarrier, 1, 64, 0, 0)(out);
  auto [e, text] = LastError();
  EXPECT_EQ(e, cudaErrorLaunchFailure);
  EXPECT_THAT(text, AllOf(HasSubstr("DivergentBarrier"), HasSubstr("__syncthreads divergence")));
}

__global__ void WarpOps(int* out) {
  const int lane = threadIdx.x & 31;
  out[threadIdx.x * 5 + 0] = WarpSum(lane);  // lane 0 holds the warp's sum
  out[threadIdx.x * 5 + 1] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  out[threadIdx.x * 5 + 2] = __any_sync(0xffffffffu, lane == 7);
  out[threadIdx.x * 5 + 3] = __all_sync(0xffffffffu, lane < 31);
  out[threadIdx.x * 5 + 4] = __shfl_xor_sync(0xffffffffu, lane, 1) + 100 * __shfl_sync(0xffffffffu, lane, 5, 8);
}

TEST_F(Emulation, WarpIntrinsicsFollowTheProgrammingGuide) {
  int* out = Device<int>(64 * 5);
  SINKSCOPE_LAUNCH(WarpOps, 1, 64, 0, 0)(out);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  const std::vector<int> h = Host(out, 64 * 5);
  unsigned every_third = 0;
  for (int l = 0; l < 32; l += 3) every_third |= 1u << l;
  for (int t = 0; t < 64; ++t) {
    const int lane = t & 31;
    if (lane == 0) {
      EXPECT_EQ(h[t * 5 + 0], 496);
    }
    EXPECT_EQ(static_cast<unsigned>(h[t * 5 + 1]), every_third);
    EXPECT_EQ(h[t * 5 + 2], 1);
    EXPECT_EQ(h[t * 5 + 3], 0);
    EXPECT_EQ(h[t * 5 + 4], (lane ^ 1) + 100 * ((lane / 8) * 8 + 5)) << "lane " << lane;
  }
}

__global__ void ShuffleAfterALaneLeft(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = WarpSum(1.0f);  // full mask, lane 5 gone
}

__global__ void ShuffleOutsideTheMask(float* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, 1.0f, 8);  // lanes 8..15 read 16..23
}

TEST_F(Emulation, AWarpCollectiveMissingALaneFailsNamingIt) {
  float* out = Device<float>(32);
  SINKSCOPE_LAUNCH(ShuffleAfterALaneLeft, 1, 32, 0, 0)(out);
  auto [e, text] = LastError();
  EXPECT_EQ(e, cudaErrorLaunchFailure);
  EXPECT_THAT(text, AllOf(HasSubstr("ShuffleAfterALaneLeft"), HasSubstr("__shfl_down_sync"),
                          HasSubstr("lanes 0x00000020 of its mask never arrive")));
  ASSERT_EQ(cudaDeviceReset(), cudaSuccess);
  out = Device<float>(32);
  SINKSCOPE_LAUNCH(ShuffleOutsideTheMask, 1, 32, 0, 0)(out);
  std::tie(e, text) = LastError();
  EXPECT_EQ(e, cudaErrorLaunchFailure);
  EXPECT_THAT(text, HasSubstr("outside its mask 0x0000ffff"));
}

// BlockSum (reduce.cuh) with its first barrier removed: warp 0 reads the other warps'
// partial sums before they are written. Fibers run in thread order between barriers, so
// it reads the shared memory's poison and the sum is NaN.
__global__ void BlockSumWithoutTheFirstBarrier(float* out) {
  SINKSCOPE_SHARED(float, shared, [33]);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  float v = WarpSum(1.0f);
  if (lane == 0) shared[warp] = v;
  if (warp == 0) {
    float w = lane < warps ? shared[lane] : 0.0f;
    w = WarpSum(w);
    if (lane == 0) out[0] = w;
  }
}

__global__ void BlockSumKernel(float* out) {
  SINKSCOPE_SHARED(float, shared, [33]);
  const float total = BlockSum(1.0f, shared);
  if (threadIdx.x == 0) out[0] = total;
}

TEST_F(Emulation, SharedMemoryIsPoisonedSoAMissingBarrierShows) {
  float* out = Device<float>(1);
  SINKSCOPE_LAUNCH(BlockSumKernel, 1, 256, 0, 0)(out);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(Host(out, 1)[0], 256.0f);
  SINKSCOPE_LAUNCH(BlockSumWithoutTheFirstBarrier, 1, 256, 0, 0)(out);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_TRUE(std::isnan(Host(out, 1)[0])) << "the unwritten partial sums read as poison";
}

__global__ void OnePastTheEnd(float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = 1.0f;  // off by one
}
__global__ void FarPastTheEnd(float* out, int n) { out[n + 256 + threadIdx.x] = 1.0f; }  // 1 KiB on

TEST_F(Emulation, AnOutOfRangeAccessIsAnIllegalAddressNamingTheKernel) {
  const int n = 1000;
  float* out = Device<float>(n);
  SINKSCOPE_LAUNCH(OnePastTheEnd, 4, 256, 0, 0)(out, n);
  auto [e, text] = LastError();
  EXPECT_EQ(e, cudaErrorIllegalAddress);
  EXPECT_THAT(text, AllOf(HasSubstr("OnePastTheEnd"), HasSubstr("0 bytes past the end of the device allocation of 4000 bytes")));
  EXPECT_EQ(cudaStreamSynchronize(0), cudaErrorIllegalAddress) << "sticky";

  ASSERT_EQ(cudaDeviceReset(), cudaSuccess);
  out = Device<float>(n);
  SINKSCOPE_LAUNCH(FarPastTheEnd, 1, 32, 0, 0)(out, n);  // into the guard page: a fault
  std::tie(e, text) = LastError();
  EXPECT_EQ(e, cudaErrorIllegalAddress);
  EXPECT_THAT(text, AllOf(HasSubstr("FarPastTheEnd"), HasSubstr("invalid access at"),
                          HasSubstr("past the end of the device allocation of 4000 bytes")));
}

__global__ void ReadInput(float* out, const float* in) { out[threadIdx.x] = in[threadIdx.x] + 1.0f; }

TEST_F(Emulation, HostPointersAndUninitialisedDeviceMemoryShow) {
  float* out = Device<float>(32);
  std::vector<float> host(32, 1.0f);
  SINKSCOPE_LAUNCH(ReadInput, 1, 32, 0, 0)(out, host.data());
  auto [e, text] = LastError();
  EXPECT_EQ(e, cudaErrorInvalidValue);
  EXPECT_THAT(text, AllOf(HasSubstr("ReadInput"), HasSubstr("argument 1"), HasSubstr("is not a live device allocation")));

  float* in = Device<float>(32);  // never written: cudaMalloc's memory is undefined
  SINKSCOPE_LAUNCH(ReadInput, 1, 32, 0, 0)(out, in);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_TRUE(std::isnan(Host(out, 32)[7]));

  EXPECT_EQ(cudaMemcpy(host.data(), out, 64 * sizeof(float), cudaMemcpyDeviceToHost), cudaErrorInvalidValue);
  EXPECT_THAT(std::string(cudaGetErrorString(cudaErrorInvalidValue)), HasSubstr("runs 128 bytes past the end"));
  EXPECT_EQ(cudaMemcpy(out, host.data(), 4, cudaMemcpyDeviceToHost), cudaErrorInvalidValue) << "kind says the source is device";
  EXPECT_EQ(cudaFree(host.data()), cudaErrorInvalidDevicePointer);
}

__global__ void LastBlockWins(int* out) {
  if (threadIdx.x == 0) out[0] = blockIdx.x;
}
__global__ void CountWithAtomics(int* out) { atomicAdd(out, 1); }

TEST_F(Emulation, BlocksRunInAShuffledOrderSoOrderDependenceShows) {
  int* out = Device<int>(1);
  std::vector<int> winners;
  for (int i = 0; i < 6; ++i) {
    SINKSCOPE_LAUNCH(LastBlockWins, 64, 32, 0, 0)(out);
    winners.push_back(Host(out, 1)[0]);
  }
  std::sort(winners.begin(), winners.end());
  EXPECT_GT(std::unique(winners.begin(), winners.end()) - winners.begin(), 1)
      << "a kernel whose result depends on the order of its blocks gives different results";
  ASSERT_EQ(cudaMemset(out, 0, sizeof(int)), cudaSuccess);
  SINKSCOPE_LAUNCH(CountWithAtomics, 100, 128, 0, 0)(out);
  EXPECT_EQ(Host(out, 1)[0], 12800);
}

// Thread 0 publishes a value that the others read with no barrier between: a race a GPU
// may or may not show, and the race check always does.
__global__ void PublishWithoutABarrier(float* out) {
  SINKSCOPE_SHARED(float, flag, [1]);
  if (threadIdx.x == 0) flag[0] = 1.0f;
  out[threadIdx.x] = flag[0];
}

// Thread i writes word i of shared memory and exits: no race within the launch. Two
// launches in a row, the second with its threads reversed, touch each word from two
// different threads in their first epochs; being different launches, that is no race.
__global__ void WriteOwnWord(float* out, int reversed) {
  SINKSCOPE_SHARED(float, words, [64]);
  const int i = reversed ? 63 - threadIdx.x : threadIdx.x;
  words[i] = 1.0f;
  out[threadIdx.x] = words[i];
}

TEST_F(Emulation, TheRaceCheckFindsUnorderedSharedAccessesAndPassesOrderedOnes) {
  const char* on = std::getenv("SINKSCOPE_EMU_RACECHECK");
  if (on == nullptr || std::string(on) != "1") GTEST_SKIP() << "run with SINKSCOPE_EMU_RACECHECK=1 (ctest: cuda_emulation_racecheck)";
  float* out = Device<float>(256);
  SINKSCOPE_LAUNCH(BlockSumKernel, 3, 256, 0, 0)(out);  // barriers and warp shuffles: ordered
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(Host(out, 1)[0], 256.0f);
  SINKSCOPE_LAUNCH(WriteOwnWord, 1, 64, 0, 0)(out, 0);
  SINKSCOPE_LAUNCH(WriteOwnWord, 1, 64, 0, 0)(out, 1);  // a new launch: its shadow starts clean
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  SINKSCOPE_LAUNCH(PublishWithoutABarrier, 1, 64, 0, 0)(out);
  auto [e, text] = LastError();
  EXPECT_EQ(e, cudaErrorLaunchFailure);
  EXPECT_THAT(text, AllOf(HasSubstr("PublishWithoutABarrier"), HasSubstr("shared-memory race at shared byte 0"),
                          HasSubstr("thread 0 wrote it and thread 1 read it")));
}

TEST_F(Emulation, TheDeviceIsTheCommittedDescription) {
  int n = 0;
  ASSERT_EQ(cudaGetDeviceCount(&n), cudaSuccess);
  EXPECT_EQ(n, 1);
  cudaDeviceProp p{};
  ASSERT_EQ(cudaGetDeviceProperties(&p, 0), cudaSuccess);
  EXPECT_THAT(std::string(p.name), HasSubstr("(CUDA emulation)"));
  EXPECT_EQ(p.major, 9);
  EXPECT_EQ(p.sharedMemPerBlock, 49152u);
  EXPECT_EQ(p.sharedMemPerBlockOptin, 232448u);
  EXPECT_EQ(p.multiProcessorCount, 132);
  EXPECT_EQ(cudaSetDevice(1), cudaErrorInvalidDevice);
}

}  // namespace
}  // namespace sinkscope

// The NCCL communicator. Here (no GPU) its paths before a device is needed: the version,
// the rendezvous of the ncclUniqueId (rank 0 refuses to publish one without a device, a
// rank whose rank 0 never comes times out naming it, a malformed id is refused) and the
// clear error of a machine without a GPU. On a machine with one GPU the one-rank gang
// initialises and every collective gives the sum on device memory (NCCL refuses two ranks
// on one device, so more ranks need more GPUs).
#include <cuda_runtime.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nccl.h>

#include <condition_variable>
#include <map>
#include <mutex>
#include <vector>

#include "engine/cuda/nccl_communicator.h"
#include "tests/memory_rendezvous.h"

namespace sinkscope {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;


int Devices() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

TEST(NcclTest, VersionIsTheLibrarys) { EXPECT_THAT(NcclVersion(), StartsWith("2.")); }

TEST(NcclTest, ARankWhoseRankZeroNeverComesTimesOutNamingIt) {
  NcclOptions o;
  o.rank = 1;
  o.world_size = 2;
  o.timeout = std::chrono::milliseconds(300);
  const Status s = ConnectNccl(o, std::make_shared<MemoryRendezvous>()).status();
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
  EXPECT_THAT(s.message(), HasSubstr("rendezvous of rank 1 of 2 timed out after 0.3 s: rank 0 did not arrive"));
}

TEST(NcclTest, AMalformedIdIsRefused) {
  auto rendezvous = std::make_shared<MemoryRendezvous>();
  ASSERT_TRUE(rendezvous->Set(kNcclIdKey, "short").ok());
  NcclOptions o;
  o.rank = 1;
  o.world_size = 2;
  const Status s = ConnectNccl(o, rendezvous).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("rank 1 of 2: the rendezvous's nccl/unique_id has 5 bytes, not 128"));
}

TEST(NcclTest, ABadRankIsRefused) {
  NcclOptions o;
  o.rank = 2;
  o.world_size = 2;
  EXPECT_THAT(ConnectNccl(o, std::make_shared<MemoryRendezvous>()).status().message(),
              HasSubstr("rank 2 is not in a world of 2"));
}

TEST(NcclTest, TheUniqueIdNeedsNoGpu) {
  ncclUniqueId id;
  ASSERT_EQ(ncclGetUniqueId(&id), ncclSuccess);
}

TEST(NcclTest, WithoutAGpuRankZeroSaysSoAndPublishesNothing) {
  if (Devices() > 0) GTEST_SKIP() << "this machine has a GPU (the one-rank test below runs instead)";
  auto rendezvous = std::make_shared<MemoryRendezvous>();
  NcclOptions o;
  const Status s = ConnectNccl(o, rendezvous).status();
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
  EXPECT_THAT(s.message(), HasSubstr("rank 0 of 1: CUDA device 0: "));
  EXPECT_FALSE(rendezvous->Has(kNcclIdKey));
}

TEST(NcclTest, OneRankOnAGpuSumsOnTheDevice) {
  if (Devices() == 0) GTEST_SKIP() << "no CUDA device here (cudaGetDeviceCount reports none): GPU-only test";
  auto rendezvous = std::make_shared<MemoryRendezvous>();
  NcclOptions o;
  o.timeout = std::chrono::seconds(60);
  auto comm = ConnectNccl(o, rendezvous);
  ASSERT_TRUE(comm.ok()) << comm.status().ToString();
  EXPECT_TRUE(rendezvous->Has(kNcclIdKey));
  const std::vector<float> host = {1, 2, 3, 4};
  float* device = nullptr;
  ASSERT_EQ(cudaMalloc(&device, host.size() * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(device, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_TRUE((*comm)->AllReduceSum(device, host.size()).ok());
  ASSERT_TRUE((*comm)->Broadcast(device, host.size() * sizeof(float), 0).ok());
  ASSERT_TRUE((*comm)->Barrier().ok());
  std::vector<float> back(host.size());
  ASSERT_EQ(cudaMemcpy(back.data(), device, host.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(back, host);  // the sum over one rank
  cudaFree(device);
}

}  // namespace
}  // namespace sinkscope

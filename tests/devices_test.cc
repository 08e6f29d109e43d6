// The device a tool or worker trains on (training/devices.h): parsing --device, the
// device table for MFU, and the errors where a CUDA device is asked for and there is none
// (this machine and CI have no GPU: these are the paths they can check).
#include <gtest/gtest.h>

#include "training/devices.h"

namespace sinkscope {
namespace {

TEST(Devices, ParsesCpuCudaAndCudaN) {
  auto cpu = ParseDevice("cpu");
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ(cpu->kind, DeviceChoice::kCpu);
  EXPECT_EQ(cpu->Name(), "cpu");
  auto cuda = ParseDevice("cuda");
  ASSERT_TRUE(cuda.ok());
  EXPECT_EQ(cuda->kind, DeviceChoice::kCuda);
  EXPECT_EQ(cuda->index, 0);
  auto three = ParseDevice("cuda:3");
  ASSERT_TRUE(three.ok());
  EXPECT_EQ(three->index, 3);
  EXPECT_EQ(three->Name(), "cuda:3");
}

TEST(Devices, RefusesAnythingElseNamingTheText) {
  for (const char* bad : {"", "gpu", "CUDA", "cuda:", "cuda:-1", "cuda:x", "cuda:1x", "cuda:99999", "cuda0", "cpu:0"}) {
    auto d = ParseDevice(bad);
    ASSERT_FALSE(d.ok()) << bad;
    EXPECT_EQ(d.status().code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(d.status().message().find(std::string("\"") + bad + "\""), std::string::npos) << d.status().message();
  }
}

TEST(Devices, TheTableKnowsHopperAndAmpere) {
  EXPECT_DOUBLE_EQ(TablePeakFlops("NVIDIA H200"), 989.4e12);
  EXPECT_DOUBLE_EQ(TablePeakFlops("NVIDIA H100 80GB HBM3"), 989.4e12);
  EXPECT_DOUBLE_EQ(TablePeakFlops("NVIDIA A100-SXM4-80GB"), 312e12);
  EXPECT_EQ(TablePeakFlops("NVIDIA GeForce RTX 4090"), 0);
  EXPECT_EQ(TablePeakFlops("cpu"), 0);
}

TEST(Devices, TheCpuIsAlwaysThere) {
  auto d = DescribeDevice(DeviceChoice{});
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->name, "cpu");
  auto b = MakeBackendFor(DeviceChoice{});
  ASSERT_TRUE(b.ok());
  EXPECT_STREQ((*b)->Name(), "cpu");
}

// Without a GPU (this machine, CI) a CUDA device is an error that names the device and
// why; with one (scripts/gpu/run.sh) the device is described.
TEST(Devices, ACudaDeviceThatIsNotThereIsAClearError) {
  DeviceChoice d;
  d.kind = DeviceChoice::kCuda;
  d.index = 7;
  auto described = DescribeDevice(d);
  auto made = MakeBackendFor(d);
  if (described.ok()) GTEST_SKIP() << "this machine has a CUDA device 7: " << described->name;
  EXPECT_NE(described.status().message().find("cuda:7"), std::string::npos) << described.status().message();
  ASSERT_FALSE(made.ok());
  EXPECT_NE(made.status().message().find("cuda:7"), std::string::npos) << made.status().message();
  if (!CudaBackendBuilt()) {
    EXPECT_NE(made.status().message().find("no CUDA backend"), std::string::npos) << made.status().message();
  }
}

}  // namespace
}  // namespace sinkscope

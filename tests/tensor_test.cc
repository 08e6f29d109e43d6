// Typed views and arenas (engine/tensor.h), and the model's activations in one arena: the
// views' alignment, sizes and zero fill; a device that cannot hold a batch shape is an
// error naming the bytes, the model staying usable for a shape that fits.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "engine/backend.h"
#include "engine/forwarding_backend.h"
#include "engine/model.h"
#include "engine/tensor.h"
#include "tests/small_model.h"

namespace sinkscope {
namespace {

TEST(DType, SizesAndNames) {
  EXPECT_EQ(DTypeBytes(DType::kF32), 4u);
  EXPECT_EQ(DTypeBytes(DType::kBF16), 2u);
  EXPECT_EQ(DTypeBytes(DType::kF16), 2u);
  EXPECT_EQ(DTypeBytes(DType::kI32), 4u);
  EXPECT_EQ(DTypeBytes(DType::kF64), 8u);
  EXPECT_STREQ(DTypeName(DType::kBF16), "bf16");
}

TEST(ArenaTest, ViewsAreAlignedDisjointZeroedAndTyped) {
  auto be = MakeCpuBackend();
  Arena arena(be.get());
  const size_t a = arena.Reserve(DType::kF32, 3, 5), b = arena.Reserve(DType::kBF16, 7, 9),
               empty = arena.Reserve(DType::kF32, 0, 4), c = arena.Reserve(DType::kF64, 1, 1);
  EXPECT_EQ(arena.bytes(), 256u * 3);  // 60, 126 and 8 bytes, each rounded up; the empty view takes none
  ASSERT_TRUE(arena.Commit("test views").ok());
  EXPECT_FALSE(arena.Commit("again").ok());
  const TensorView va = arena.View(a), vb = arena.View(b), ve = arena.View(empty), vc = arena.View(c);
  for (const TensorView& v : {va, vb, vc}) {
    EXPECT_EQ(reinterpret_cast<uintptr_t>(v.data) % Arena::kAlign, 0u);
    std::vector<unsigned char> host(v.bytes(), 0xFF);
    be->ToHost(host.data(), v.data, host.size());
    EXPECT_EQ(host, std::vector<unsigned char>(v.bytes(), 0)) << "zero-filled";
  }
  EXPECT_EQ(static_cast<char*>(vb.data) - static_cast<char*>(va.data), 256);
  EXPECT_EQ(ve.bytes(), 0u);
  EXPECT_EQ(vb.bytes(), 7u * 9 * 2);
  EXPECT_EQ(vb.ld, 9);
  EXPECT_NE(va.f32(), nullptr);
  // A bf16 view reaching code written for fp32 is the caller's bug: it aborts, naming both.
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(vb.f32("the test's fp32 reader"), "a bf16 tensor view reached the test's fp32 reader");
  arena.Release();
  EXPECT_EQ(arena.bytes(), 0u);
  EXPECT_FALSE(arena.committed());
}

// A device of `cap` bytes: one allocation larger than that fails, as cudaMalloc would.
class SmallDevice final : public ForwardingBackend {
 public:
  SmallDevice(std::unique_ptr<Backend> inner, size_t cap) : ForwardingBackend(std::move(inner)), cap_(cap) {}
  const char* Name() const override { return "small"; }
  void* AllocBytes(size_t bytes) override { return bytes > cap_ ? nullptr : ForwardingBackend::AllocBytes(bytes); }

 private:
  size_t cap_;
};

ModelConfig Tiny() { return SmallModel(50, 64); }

TEST(ModelActivations, AShapeTheDeviceCannotHoldIsAnErrorNamingItAndTheModelGoesOn) {
  SmallDevice small(MakeCpuBackend(), 1 << 20);  // 1 MiB in one buffer
  auto m = Model::Create(Tiny(), &small);
  ASSERT_TRUE(m.ok()) << m.status().message();
  (*m)->InitWeights(3);
  const Status s = (*m)->PrepareActivations(16, 64);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("the activations of 16 × 64 tokens (2 layers)"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("GiB"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("small backend"), std::string::npos) << s.message();
  // A shape that fits works, with the same loss as on a device without the limit.
  ASSERT_TRUE((*m)->PrepareActivations(1, 16).ok());
  EXPECT_GT((*m)->ActivationBytes(), 0);
  EXPECT_LE((*m)->ActivationBytes(), 1 << 20);
  auto cpu = MakeCpuBackend();
  auto ref = Model::Create(Tiny(), cpu.get());
  ASSERT_TRUE(ref.ok());
  (*ref)->InitWeights(3);
  std::vector<int32_t> tokens(16), targets(16);
  for (int t = 0; t < 16; ++t) tokens[t] = (t * 7) % 50, targets[t] = (t * 3 + 1) % 50;
  EXPECT_EQ((*m)->ForwardBackward(tokens.data(), targets.data(), 1, 16, 1.0f / 16),
            (*ref)->ForwardBackward(tokens.data(), targets.data(), 1, 16, 1.0f / 16));
  EXPECT_EQ((*m)->GradsToHost(), (*ref)->GradsToHost());
}

}  // namespace
}  // namespace sinkscope

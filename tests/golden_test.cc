// The end-to-end check against an independent float64 implementation
// (tests/golden/): same weights, same batch; compare the loss and every gradient.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "data/data.h"
#include "training/hf.h"

namespace sinkscope {
namespace {

// The reference lives in the repository (tests/golden/tiny) so every clone can run this.
std::string GoldenDir() { return SINKSCOPE_SOURCE_DIR "/tests/golden/tiny"; }

// max |a−b| / max(|b|, tiny): error normalised by the reference's scale.
double NormalisedError(const float* a, const std::vector<double>& b) {
  double diff = 0, scale = 1e-30;
  for (size_t i = 0; i < b.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;  // NaN never passes
    diff = std::max(diff, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return diff / scale;
}

class GoldenTest : public ::testing::TestWithParam<VScaleMode> {};

TEST_P(GoldenTest, LossAndEveryGradientMatchFloat64Reference) {
  const std::string dir = GoldenDir();
  const VScaleMode mode = GetParam();
  auto backend = MakeCpuBackend();
  auto config = ReadHfConfig(dir + "/config.json");
  ASSERT_TRUE(config.ok()) << config.status().ToString();
  config->vscale = mode;
  auto model = Model::Create(*config, backend.get());
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  auto weights = ReadSafetensors(dir + "/model.safetensors");
  ASSERT_TRUE(weights.ok()) << weights.status().ToString();
  ASSERT_TRUE(LoadHfWeights(**model, *weights).ok());
  auto tokens = ReadShard(dir + "/tokens.bin");
  ASSERT_TRUE(tokens.ok()) << tokens.status().ToString();
  const int B = 2, T = 16;
  ASSERT_EQ(tokens->size(), static_cast<size_t>(B * T + 1));
  std::vector<int32_t> inputs(B * T), targets(B * T);
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) {
      inputs[b * T + t] = (*tokens)[b * T + t];
      targets[b * T + t] = (*tokens)[b * T + t + 1];
    }
  }
  const std::string arm = mode == VScaleMode::kNone ? "baseline" : "vscale";
  auto expected_grads = ReadSafetensors(dir + "/grads_" + arm + ".safetensors");
  ASSERT_TRUE(expected_grads.ok());

  (*model)->ZeroGrad();
  const double loss = (*model)->ForwardBackward(inputs.data(), targets.data(), B, T, 1.0f / (B * T));
  std::ifstream expected_json(dir + "/expected_" + arm + ".json");
  std::string text((std::istreambuf_iterator<char>(expected_json)), std::istreambuf_iterator<char>());
  const size_t at = text.find("\"loss\":");
  ASSERT_NE(at, std::string::npos);
  const double expected_loss = std::stod(text.substr(at + 7));
  EXPECT_NEAR(loss, expected_loss, 1e-5 * expected_loss);

  const std::vector<float> grads = (*model)->GradsToHost();
  int compared = 0;
  double worst = 0;
  std::string worst_name;
  for (const ParamTensor& t : (*model)->tensors()) {
    auto it = expected_grads->tensors.find(t.name);
    if (it == expected_grads->tensors.end()) {
      EXPECT_TRUE(mode == VScaleMode::kNone && t.name.find("vscale_theta") != std::string::npos)
          << "reference lacks " << t.name;
      continue;
    }
    ASSERT_EQ(it->second.numel(), t.size) << t.name;
    // fp32 against float64: ~1e-5 is rounding; 1e-3 would be a bug (golden README).
    const double err = NormalisedError(grads.data() + t.offset, it->second.values);
    EXPECT_LT(err, 2e-4) << t.name;
    if (err > worst) {
      worst = err;
      worst_name = t.name;
    }
    ++compared;
  }
  EXPECT_EQ(compared, static_cast<int>(expected_grads->tensors.size()));
  std::printf("%s: loss %.10f vs %.10f (rel %.2e); worst normalised gradient error %.2e (%s) over %d tensors\n",
              arm.c_str(), loss, expected_loss, std::abs(loss - expected_loss) / expected_loss, worst,
              worst_name.c_str(), compared);
}

INSTANTIATE_TEST_SUITE_P(Arms, GoldenTest, ::testing::Values(VScaleMode::kNone, VScaleMode::kVScale),
                         [](const auto& info) { return std::string(VScaleModeName(info.param)); });

}  // namespace
}  // namespace sinkscope

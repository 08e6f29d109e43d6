// Every probe of METRICS.md against the independent float64 reference in
// tests/golden/tiny (s = 0, T_e = 15, P = 16, ε = 0.3, T_ε = 16, SUM_THEN_NORM).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "data/data.h"
#include "training/hf.h"
#include "training/probe_json.h"

namespace sinkscope {
namespace {

std::string GoldenDir() { return SINKSCOPE_SOURCE_DIR "/tests/golden/tiny"; }

// Relative agreement of two numbers or lists, scaled by the reference's magnitude.
void ExpectClose(const nlohmann::json& got, const nlohmann::json& want, const std::string& what, double tol) {
  if (want.is_array()) {
    ASSERT_TRUE(got.is_array()) << what;
    ASSERT_EQ(got.size(), want.size()) << what;
    double scale = 1e-30;
    for (const auto& w : want) scale = std::max(scale, std::abs(w.get<double>()));
    for (size_t i = 0; i < want.size(); ++i) {
      const double g = got[i].get<double>(), w = want[i].get<double>();
      ASSERT_TRUE(std::isfinite(g)) << what << "[" << i << "]";
      EXPECT_LE(std::abs(g - w), tol * scale) << what << "[" << i << "]: " << g << " vs " << w;
    }
  } else {
    const double g = got.get<double>(), w = want.get<double>();
    ASSERT_TRUE(std::isfinite(g)) << what;
    EXPECT_LE(std::abs(g - w), tol * std::max(std::abs(w), 1e-12)) << what << ": " << g << " vs " << w;
  }
}

class ProbeGoldenTest : public ::testing::TestWithParam<VScaleMode> {};

TEST_P(ProbeGoldenTest, EveryQuantityMatchesTheFloat64Reference) {
  const std::string dir = GoldenDir();
  auto backend = MakeCpuBackend();
  auto config = ReadHfConfig(dir + "/config.json");
  ASSERT_TRUE(config.ok());
  config->vscale = GetParam();
  auto model = Model::Create(*config, backend.get());
  auto weights = ReadSafetensors(dir + "/model.safetensors");
  ASSERT_TRUE(weights.ok());
  ASSERT_TRUE(LoadHfWeights(**model, *weights).ok());
  auto tokens = ReadShard(dir + "/tokens.bin");
  ASSERT_TRUE(tokens.ok());
  const int B = 2, T = 16;
  std::vector<int32_t> inputs(B * T), targets(B * T);
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) {
      inputs[b * T + t] = (*tokens)[b * T + t];
      targets[b * T + t] = (*tokens)[b * T + t + 1];
    }
  }
  const std::string arm = GetParam() == VScaleMode::kNone ? "baseline" : "vscale";
  std::ifstream in(dir + "/expected_" + arm + ".json");
  const nlohmann::json want = nlohmann::json::parse(in);
  ProbeSettings st;
  st.sink_position = want["probe_settings"]["s"];
  st.ref_span = want["probe_settings"]["T_e"];
  st.profile_len = want["probe_settings"]["P"];
  st.eps = want["probe_settings"]["eps"];
  st.t_eps = want["probe_settings"]["T_eps"];
  auto report = RunDiagnosticPass(**model, st, inputs.data(), targets.data(), B, T);
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  const nlohmann::json got = ProbeReportToJson(*report);
  ExpectClose(got["loss"], want["loss"], "loss", 1e-5);
  ASSERT_EQ(got["layers"].size(), want["layers"].size());
  // fp32 against float64; 1e-3 would be a bug (golden README). Ratios of small
  // gradient norms carry a little more rounding than the loss.
  const double tol = 2e-4;
  for (size_t l = 0; l < want["layers"].size(); ++l) {
    const auto& w = want["layers"][l];
    const auto& g = got["layers"][l];
    const std::string at = "layer " + std::to_string(l) + " ";
    for (const char* key : {"R_GS", "attn_bloat", "attn_change", "attn_compress", "mlp_bloat", "mlp_change",
                            "mlp_compress", "alpha", "sink_rate", "sink_rate_per_sample", "M", "S"}) {
      ExpectClose(g[key], w[key], at + key, tol);
    }
    for (auto it = w["grad_profile"].begin(); it != w["grad_profile"].end(); ++it) {
      ExpectClose(g["grad_profile"][it.key()], it.value(), at + "grad_profile." + it.key(), tol);
    }
    for (auto it = w["norms"].begin(); it != w["norms"].end(); ++it) {
      ExpectClose(g["norms"][it.key()], it.value(), at + "norms." + it.key(), tol);
    }
    ExpectClose(g["massive"]["top3"], w["massive"]["top3"], at + "massive.top3", tol);
    ExpectClose(g["massive"]["median"], w["massive"]["median"], at + "massive.median", tol);
  }
}

INSTANTIATE_TEST_SUITE_P(Arms, ProbeGoldenTest, ::testing::Values(VScaleMode::kNone, VScaleMode::kVScale),
                         [](const auto& info) { return std::string(VScaleModeName(info.param)); });

}  // namespace
}  // namespace sinkscope

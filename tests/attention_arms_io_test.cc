// The attention arms' parameters in checkpoints and Hugging Face exports
// (docs/design/ARMS.md "Checkpoints and export"): they round-trip under their documented
// names, and one arm's checkpoint never loads as another arm's model.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "engine/model.h"
#include "training/checkpoint.h"
#include "training/hf.h"

namespace sinkscope {
namespace {

ModelConfig Arm(AttentionKind attention, GateKind gate) {
  ModelConfig c;
  c.layers = 2;
  c.d_model = 16;
  c.heads = 4;
  c.kv_heads = 2;
  c.head_dim = 4;
  c.ffn = 24;
  c.vocab = 19;
  c.context = 8;
  c.attention = attention;
  c.gate = gate;
  c.sink_logit_init = -1.25;
  c.sigmoid_bias = -2.0;
  c.softpick_eps = 1e-4;
  return c;
}

std::string TempDir(const std::string& name) {
  return ::testing::TempDir() + "/arms_io_" + name + "_" + std::to_string(::getpid());
}

struct IoCase {
  const char* name;
  AttentionKind attention;
  GateKind gate;
  const char* tensor;  // the arm's own tensor in layer 1, "" for none
};

class ArmIoTest : public ::testing::TestWithParam<IoCase> {};

TEST_P(ArmIoTest, CheckpointAndHuggingFaceRoundTrip) {
  const IoCase& p = GetParam();
  const ModelConfig c = Arm(p.attention, p.gate);
  auto be = MakeCpuBackend();
  auto m = Model::Create(c, be.get());
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  (*m)->InitWeights(5);
  std::vector<float> params = (*m)->ParamsToHost();
  for (const ParamTensor& t : (*m)->tensors()) {  // sinks not at init (the alignment padding stays 0)
    for (size_t i = t.offset; i < t.offset + t.size; ++i) params[i] += 1e-3f * static_cast<float>(i % 7);
  }
  (*m)->ParamsFromHost(params);
  if (*p.tensor) {
    ASSERT_NE((*m)->FindTensor(std::string("model.layers.1.self_attn.") + p.tensor), nullptr);
  }

  // Checkpoint: same config and parameters back.
  const std::string dir = TempDir(p.name);
  std::filesystem::create_directories(dir);
  ASSERT_TRUE(SaveCheckpoint(dir + "/checkpoint.bin", **m, {3, 1, 2}).ok());
  auto read = ReadCheckpointConfig(dir + "/checkpoint.bin");
  ASSERT_TRUE(read.ok()) << read.status().ToString();
  EXPECT_EQ(ModelConfigToJson(*read), ModelConfigToJson(c));
  auto back = Model::Create(*read, be.get());
  ASSERT_TRUE(back.ok());
  ASSERT_TRUE(LoadCheckpoint(dir + "/checkpoint.bin", **back).ok());
  EXPECT_EQ((*back)->ParamsToHost(), params);

  // Hugging Face: the tensors by name, the arm and its parameters in config.json.
  ASSERT_TRUE(ExportHf(**m, dir + "/hf").ok());
  std::ifstream in(dir + "/hf/config.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  EXPECT_EQ(j.at("sinkscope_attention"), AttentionKindName(c.attention));
  EXPECT_EQ(j.at("sinkscope_gate"), GateKindName(c.gate));
  auto hf = LoadHfModel(dir + "/hf", be.get());
  ASSERT_TRUE(hf.ok()) << hf.status().ToString();
  EXPECT_EQ(ModelConfigToJson((*hf)->config()), ModelConfigToJson(c));
  for (const ParamTensor& t : (*m)->tensors()) {
    if (t.name.find("vscale_theta") != std::string::npos) continue;  // not exported without V-scale
    const ParamTensor* u = (*hf)->FindTensor(t.name);
    ASSERT_NE(u, nullptr) << t.name;
    EXPECT_EQ((*hf)->TensorToHost(*u), (*m)->TensorToHost(t)) << t.name;
  }

  // Every other arm refuses this checkpoint.
  for (const IoCase& other : {IoCase{"softmax", AttentionKind::kSoftmax, GateKind::kNone, ""},
                              IoCase{"sink_logit", AttentionKind::kSinkLogit, GateKind::kNone, ""},
                              IoCase{"softmax_plus_one", AttentionKind::kSoftmaxPlusOne, GateKind::kNone, ""},
                              IoCase{"sigmoid", AttentionKind::kSigmoid, GateKind::kNone, ""},
                              IoCase{"gated_head", AttentionKind::kSoftmax, GateKind::kHead, ""},
                              IoCase{"gated_value", AttentionKind::kSoftmax, GateKind::kValue, ""}}) {
    if (other.attention == p.attention && other.gate == p.gate) continue;
    auto wrong = Model::Create(Arm(other.attention, other.gate), be.get());
    ASSERT_TRUE(wrong.ok());
    const auto loaded = LoadCheckpoint(dir + "/checkpoint.bin", **wrong);
    EXPECT_FALSE(loaded.ok()) << p.name << " loaded as " << other.name;
    EXPECT_NE(loaded.status().message().find("differs from the run's"), std::string::npos)
        << loaded.status().message();
  }
  std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(
    Arms, ArmIoTest,
    ::testing::Values(IoCase{"sink_logit", AttentionKind::kSinkLogit, GateKind::kNone, "sinks"},
                      IoCase{"softmax_plus_one", AttentionKind::kSoftmaxPlusOne, GateKind::kNone, ""},
                      IoCase{"gated_output", AttentionKind::kSoftmax, GateKind::kOutput, "output_gate.weight"},
                      IoCase{"gated_head", AttentionKind::kSoftmax, GateKind::kHead, "output_gate.weight"},
                      IoCase{"gated_value", AttentionKind::kSoftmax, GateKind::kValue, "value_gate.weight"},
                      IoCase{"sigmoid", AttentionKind::kSigmoid, GateKind::kNone, ""},
                      IoCase{"softpick", AttentionKind::kSoftpick, GateKind::kNone, ""}),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace sinkscope

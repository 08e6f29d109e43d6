// One source for the model's fields (engine/config.h's SINKSCOPE_MODEL_FIELDS): the
// experiment schema's ModelSpec, the checkpoint header and the Hugging Face config.json
// all follow the list, so a field added in one place only fails here. (The benchmark's
// model is compared with examples/quickstart.yaml in tests/integration/test_local_tools.py.)
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>

#include "schema/experiment.h"
#include "training/checkpoint.h"
#include "training/hf.h"

namespace sinkscope {
namespace {

namespace pb = google::protobuf;

enum class Kind { kInt, kDouble, kBool };
struct Field {
  std::string name;
  Kind kind;
  std::string hf_key;
};
template <typename T>
constexpr Kind KindOf() {
  return std::is_same_v<T, bool> ? Kind::kBool : std::is_same_v<T, int> ? Kind::kInt : Kind::kDouble;
}
std::vector<Field> ListedFields() {
  std::vector<Field> out;
#define SINKSCOPE_LIST_FIELD(type, name, def, hf, required) out.push_back({#name, KindOf<type>(), hf});
  SINKSCOPE_MODEL_FIELDS(SINKSCOPE_LIST_FIELD)
#undef SINKSCOPE_LIST_FIELD
  return out;
}

// Fields of the list the experiment schema does not carry, each for a reason.
const std::map<std::string, std::string> kNotInSchema = {
    {"attention_bias", "pretrained Qwen2 only: set from a Hugging Face model_type, not trained from scratch"},
    {"qk_norm", "pretrained Qwen3 only: set from a Hugging Face model_type"},
    {"rotary_dim", "pretrained GLM only: set from partial_rotary_factor"},
    {"vscale_sigma", "follows init_std (0); tests alone set it apart"},
};

Kind ProtoKind(const pb::FieldDescriptor* f) {
  switch (f->cpp_type()) {
    case pb::FieldDescriptor::CPPTYPE_INT32: return Kind::kInt;
    case pb::FieldDescriptor::CPPTYPE_BOOL: return Kind::kBool;
    default: return Kind::kDouble;
  }
}

TEST(ConfigFieldsTest, EveryModelSpecFieldIsInTheListWithItsType) {
  const pb::Descriptor* d = v1::ModelSpec::descriptor();
  std::map<std::string, Kind> listed;
  for (const Field& f : ListedFields()) listed[f.name] = f.kind;
  for (int i = 0; i < d->field_count(); ++i) {
    const pb::FieldDescriptor* f = d->field(i);
    ASSERT_TRUE(listed.count(f->name())) << "ModelSpec." << f->name() << " is not in SINKSCOPE_MODEL_FIELDS";
    EXPECT_EQ(ProtoKind(f), listed[f->name()]) << "ModelSpec." << f->name() << " and the list disagree on its type";
  }
}

TEST(ConfigFieldsTest, EveryListedFieldIsInTheSchemaOrSaysWhyNot) {
  const pb::Descriptor* d = v1::ModelSpec::descriptor();
  for (const Field& f : ListedFields()) {
    const bool in_schema = d->FindFieldByName(f.name) != nullptr;
    EXPECT_NE(in_schema, kNotInSchema.count(f.name) > 0)
        << f.name << (in_schema ? " is in ModelSpec but listed as not in the schema"
                                : " is in neither ModelSpec nor kNotInSchema");
  }
}

// A config whose every listed field differs from its default (and stays valid).
ModelConfig Perturbed() {
  ModelConfig c;
  c.layers = 3;
  c.d_model = 48;
  c.heads = 6;
  c.kv_heads = 3;
  c.head_dim = 10;
  c.ffn = 72;
  c.vocab = 301;
  c.context = 40;
  c.rope_theta = 5e5;
  c.rms_eps = 3e-6;
  c.init_std = 0.03;
  c.tied_embeddings = true;
  c.attention_bias = true;
  c.qk_norm = false;  // a model has biases or q/k norms, not both (Hugging Face has no such architecture)
  c.vscale_sigma = 0.05;
  c.rotary_dim = 6;
  c.vscale = VScaleMode::kVScale;
  c.sink_logit_init = 1.5;
  c.sigmoid_bias = -2.25;
  c.softpick_eps = 1e-3;
  c.attention = AttentionKind::kSinkLogit;
  return c;
}

TEST(ConfigFieldsTest, TheSchemaReadsEveryFieldItHas) {
  // Each ModelSpec field set by reflection to the perturbed value comes back from
  // ToModelConfig: no conversion is written by hand.
  const ModelConfig want = Perturbed();
  const nlohmann::json want_json = ModelConfigToJson(want);
  v1::ModelSpec spec;
  const pb::Descriptor* d = spec.GetDescriptor();
  const pb::Reflection* r = spec.GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const pb::FieldDescriptor* f = d->field(i);
    const nlohmann::json& v = want_json.at(f->name());
    switch (ProtoKind(f)) {
      case Kind::kInt: r->SetInt32(&spec, f, v.get<int>()); break;
      case Kind::kDouble: r->SetDouble(&spec, f, v.get<double>()); break;
      case Kind::kBool: r->SetBool(&spec, f, v.get<bool>()); break;
    }
  }
  const nlohmann::json got = ModelConfigToJson(ToModelConfig(spec, v1::VSCALE));
  for (int i = 0; i < d->field_count(); ++i) {
    EXPECT_EQ(got.at(d->field(i)->name()), want_json.at(d->field(i)->name())) << d->field(i)->name();
  }
}

TEST(ConfigFieldsTest, TheCheckpointHeaderHoldsEveryFieldAndReadsItBack) {
  const ModelConfig c = Perturbed();
  const nlohmann::json j = ModelConfigToJson(c);
  std::set<std::string> keys;
  for (auto it = j.begin(); it != j.end(); ++it) keys.insert(it.key());
  std::set<std::string> want = {"vscale", "attention", "gate", "rope_scaling"};
  for (const Field& f : ListedFields()) want.insert(f.name);
  EXPECT_EQ(keys, want);
  auto back = ModelConfigFromJson(j);
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(ModelConfigToJson(*back), j);
  // A required field that is missing is named.
  nlohmann::json without = j;
  without.erase("ffn");
  auto bad = ModelConfigFromJson(without);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), ::testing::HasSubstr("ffn"));
}

TEST(ConfigFieldsTest, HuggingFaceConfigJsonCarriesEveryFieldWithAKey) {
  ModelConfig c = Perturbed();
  c.rotary_dim = 0;  // GLM's partial RoPE is read from Hugging Face, never written (ExportHf refuses it)
  auto backend = MakeCpuBackend();
  auto model = Model::Create(c, backend.get());
  ASSERT_TRUE(model.ok()) << model.status().message();
  const std::string dir = ::testing::TempDir() + "/config_fields_" + std::to_string(::getpid());
  ASSERT_TRUE(ExportHf(**model, dir).ok());
  std::ifstream in(dir + "/config.json");
  const nlohmann::json written = nlohmann::json::parse(in);
  for (const Field& f : ListedFields()) {
    if (f.hf_key.empty()) continue;
    EXPECT_TRUE(written.contains(f.hf_key)) << f.name << " is not written as " << f.hf_key;
  }
  auto read = ReadHfConfig(dir + "/config.json");
  ASSERT_TRUE(read.ok()) << read.status().message();
  EXPECT_EQ(ModelConfigToJson(*read), ModelConfigToJson(c));
  std::filesystem::remove_all(dir);
}

TEST(ConfigFieldsTest, VScaleSigmaFollowsInitStd) {
  ModelConfig c;
  c.init_std = 0.01;
  EXPECT_EQ(c.VScaleSigma(), 0.01);  // the drift of an unset σ is gone
  c.vscale_sigma = 0.3;
  EXPECT_EQ(c.VScaleSigma(), 0.3);
  v1::ModelSpec spec;
  spec.set_init_std(0.005);
  EXPECT_EQ(ToModelConfig(spec, v1::VSCALE).VScaleSigma(), 0.005);
}

}  // namespace
}  // namespace sinkscope

// Experiment files (common/experiment.cc): the quickstart loads, defaults fill what is
// left out, YAML and JSON give the same message, proto and lowerCamelCase names and
// enum values in any case are accepted, and every mistake is reported with the field
// path and the reason — with file:line when the mistake is in the text itself (parse
// errors), and as "path: rule" from ValidateExperiment (the caller names the file).
#include "data/data.h"
#include "schema/experiment.h"

#include <gmock/gmock.h>
#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/message_differencer.h>
#include <gtest/gtest.h>

#include <climits>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace sinkscope {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::MatchesRegex;
using ::testing::Not;
using ::testing::StartsWith;

const std::string kQuickstart = std::string(SINKSCOPE_SOURCE_DIR) + "/examples/quickstart.yaml";
constexpr const char* kFortunes = "/usr/share/games/fortunes";

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool SameMessage(const google::protobuf::Message& a, const google::protobuf::Message& b) {
  return google::protobuf::util::MessageDifferencer::Equals(a, b);
}

// Parses `text` as "bad.yaml" and returns the error (OK if it parsed).
Status ParseError(const std::string& text) {
  auto e = ParseExperimentText(text, "bad.yaml");
  return e.ok() ? OkStatus() : e.status();
}

// A valid minimal experiment (text data, paths not checked) with `extra` appended.
const char* kMinimal =
    "name: t\n"
    "data:\n"
    "  text:\n"
    "    paths: [/nonexistent/corpus]\n";

// Parses kMinimal followed by `extra` (which may add top-level sections), applies the
// defaults and validates without checking paths.
Status ValidateWith(const std::string& extra) {
  auto e = ParseExperimentText(std::string(kMinimal) + extra, "t.yaml");
  if (!e.ok()) return e.status();
  ApplyDefaults(*e);
  return ValidateExperiment(*e, /*check_paths=*/false);
}

// --- the quickstart ---------------------------------------------------------------------

TEST(ExperimentFile, QuickstartLoadsAsWritten) {
  auto e = LoadExperimentFile(kQuickstart);
  ASSERT_TRUE(e.ok()) << e.status().message();
  EXPECT_EQ(e->name(), "quickstart");
  const v1::ModelSpec& m = e->model();
  EXPECT_EQ(m.layers(), 4);
  EXPECT_EQ(m.d_model(), 128);
  EXPECT_EQ(m.heads(), 4);
  EXPECT_EQ(m.kv_heads(), 2);
  EXPECT_EQ(m.head_dim(), 32);
  EXPECT_EQ(m.ffn(), 352);
  EXPECT_EQ(m.vocab(), 257);
  EXPECT_EQ(m.context(), 128);
  EXPECT_FALSE(m.has_rope_theta());  // left out: ApplyDefaults fills it
  ASSERT_TRUE(e->data().has_text());
  EXPECT_THAT(e->data().text().paths(), ElementsAre(kFortunes));
  EXPECT_EQ(e->data().text().separator(), "%");
  EXPECT_DOUBLE_EQ(e->data().val_fraction(), 0.05);
  EXPECT_EQ(e->train().steps(), 300);
  EXPECT_EQ(e->train().micro_batch(), 16);
  EXPECT_EQ(e->train().grad_accum(), 1);
  EXPECT_DOUBLE_EQ(e->train().lr(), 3e-3);
  EXPECT_EQ(e->train().warmup_steps(), 30);
  EXPECT_EQ(e->train().eval_every(), 100);
  EXPECT_EQ(e->probe().every(), 50);
  EXPECT_EQ(e->probe().ref_span(), 31);
  EXPECT_EQ(e->probe().profile_len(), 64);
  EXPECT_THAT(e->arms(), ElementsAre(v1::BASELINE, v1::VSCALE));
  EXPECT_THAT(e->seeds(), ElementsAre(0u));
  EXPECT_EQ(e->checkpoint().every(), 100);
}

TEST(ExperimentFile, QuickstartDefaultsAndValidates) {
  auto e = LoadExperimentFile(kQuickstart);
  ASSERT_TRUE(e.ok()) << e.status().message();
  ApplyDefaults(*e);
  const v1::ModelSpec& m = e->model();
  EXPECT_DOUBLE_EQ(m.rope_theta(), 10000.0);
  EXPECT_DOUBLE_EQ(m.rms_eps(), 1e-5);
  EXPECT_DOUBLE_EQ(m.init_std(), 0.02);
  EXPECT_FALSE(m.tied_embeddings());
  EXPECT_THAT(e->data().text().exclude_suffixes(), ElementsAre(".dat", ".u8"));
  const v1::TrainSpec& t = e->train();
  EXPECT_DOUBLE_EQ(t.min_lr(), 3e-4);  // lr / 10
  EXPECT_DOUBLE_EQ(t.beta1(), 0.9);
  EXPECT_DOUBLE_EQ(t.beta2(), 0.95);
  EXPECT_DOUBLE_EQ(t.eps(), 1e-8);
  EXPECT_DOUBLE_EQ(t.weight_decay(), 0.1);
  EXPECT_DOUBLE_EQ(t.grad_clip(), 1.0);
  EXPECT_EQ(t.eval_batches(), 8);
  EXPECT_EQ(t.warmup_steps(), 30);  // given: not replaced by steps / 10
  const v1::ProbeSpec& p = e->probe();
  EXPECT_EQ(p.sink_position(), 0);
  EXPECT_DOUBLE_EQ(p.eps(), 0.3);
  EXPECT_EQ(p.t_eps(), 64);
  EXPECT_EQ(p.reduce(), v1::SUM_THEN_NORM);
  EXPECT_EQ(p.batch(), v1::STEP_BATCH);
  EXPECT_EQ(e->resources().device(), v1::CPU);
  EXPECT_EQ(e->resources().devices_per_run(), 1);
  EXPECT_EQ(e->max_restarts(), 2);
  EXPECT_TRUE(e->checkpoint().export_hf());

  const bool have_fortunes = std::filesystem::exists(kFortunes);
  Status s = ValidateExperiment(*e, /*check_paths=*/have_fortunes);
  EXPECT_TRUE(s.ok()) << s.message();

  const ModelConfig c = ToModelConfig(e->model(), v1::VSCALE);
  EXPECT_EQ(c.layers, 4);
  EXPECT_EQ(c.kv_heads, 2);
  EXPECT_EQ(c.ffn, 352);
  EXPECT_EQ(c.context, 128);
  EXPECT_EQ(c.vscale, VScaleMode::kVScale);
  EXPECT_EQ(ToModelConfig(e->model(), v1::BASELINE).vscale, VScaleMode::kNone);
  EXPECT_EQ(ToModelConfig(e->model(), v1::VSCALE_BACKWARD_ONLY).vscale, VScaleMode::kBackwardOnly);
  EXPECT_TRUE(c.Validate().ok());
  const OptimizerConfig o = ToOptimizerConfig(e->train());
  EXPECT_DOUBLE_EQ(o.lr, 3e-3);
  EXPECT_EQ(o.warmup_steps, 30);
  EXPECT_EQ(o.total_steps, 300);
  EXPECT_STREQ(ArmName(v1::VSCALE_BACKWARD_ONLY), "vscale_backward_only");
}

TEST(ExperimentFile, DefaultsOfAMinimalFile) {
  auto e = ParseExperimentText(kMinimal, "t.yaml");
  ASSERT_TRUE(e.ok()) << e.status().message();
  ApplyDefaults(*e);
  const v1::ModelSpec& m = e->model();
  EXPECT_EQ(m.layers(), 4);
  EXPECT_EQ(m.d_model(), 128);
  EXPECT_EQ(m.heads(), 4);
  EXPECT_EQ(m.kv_heads(), 4);   // = heads
  EXPECT_EQ(m.head_dim(), 32);  // d_model / heads
  EXPECT_EQ(m.ffn(), 352);      // 8·128/3 = 341 rounded up to a multiple of 32
  EXPECT_EQ(m.vocab(), 257);
  EXPECT_EQ(m.context(), 128);
  EXPECT_EQ(e->data().text().separator(), "%");
  EXPECT_DOUBLE_EQ(e->data().val_fraction(), 0.05);
  EXPECT_EQ(e->train().steps(), 200);
  EXPECT_EQ(e->train().micro_batch(), 8);
  EXPECT_EQ(e->train().warmup_steps(), 20);  // steps / 10
  EXPECT_DOUBLE_EQ(e->train().lr(), 3e-3);
  EXPECT_EQ(e->train().eval_every(), 50);
  EXPECT_EQ(e->probe().every(), 50);
  EXPECT_EQ(e->probe().ref_span(), 31);
  EXPECT_EQ(e->probe().profile_len(), 64);
  EXPECT_THAT(e->arms(), ElementsAre(v1::BASELINE, v1::VSCALE));
  EXPECT_THAT(e->seeds(), ElementsAre(0u));
  EXPECT_EQ(e->checkpoint().every(), 100);
  Status s = ValidateExperiment(*e, /*check_paths=*/false);
  EXPECT_TRUE(s.ok()) << s.message();
}

TEST(ExperimentFile, DefaultsFollowTheFieldsGiven) {
  auto e = ParseExperimentText(std::string(kMinimal) +
                                   "model: {d_model: 256, heads: 8, context: 16}\n"
                                   "train: {steps: 50, lr: 1.0e-2, warmup_steps: 0}\n",
                               "t.yaml");
  ASSERT_TRUE(e.ok()) << e.status().message();
  ApplyDefaults(*e);
  EXPECT_EQ(e->model().kv_heads(), 8);
  EXPECT_EQ(e->model().head_dim(), 32);
  EXPECT_EQ(e->model().ffn(), 704);         // 8·256/3 = 682 → 704
  EXPECT_EQ(e->probe().ref_span(), 15);     // clipped to context − 1
  EXPECT_EQ(e->probe().profile_len(), 16);  // clipped to context
  EXPECT_DOUBLE_EQ(e->train().min_lr(), 1e-3);
  EXPECT_EQ(e->train().warmup_steps(), 0);  // an explicit 0 is kept
  Status s = ValidateExperiment(*e, /*check_paths=*/false);
  EXPECT_TRUE(s.ok()) << s.message();
}

TEST(ExperimentFile, RelativeDataPathsResolveAgainstTheFile) {
  const auto dir = std::filesystem::temp_directory_path() / "sinkscope_experiment_test";
  std::filesystem::create_directories(dir / "corpus");
  {
    std::ofstream(dir / "corpus" / "a.txt") << "hello\n%\nworld\n";
    std::ofstream(dir / "e.yaml") << "name: rel\ndata:\n  text:\n    paths: [corpus/a.txt, ../x]\n";
  }
  auto e = LoadExperimentFile((dir / "e.yaml").string());
  ASSERT_TRUE(e.ok()) << e.status().message();
  EXPECT_THAT(e->data().text().paths(),
              ElementsAre((dir / "corpus/a.txt").string(), (dir.parent_path() / "x").string()));
  std::filesystem::remove_all(dir);
}

// --- YAML and JSON, names and enums -------------------------------------------------------

const char* kQuickstartJson = R"({
  "name": "quickstart",
  "model": {"layers": 4, "d_model": 128, "heads": 4, "kv_heads": 2, "head_dim": 32, "ffn": 352,
            "vocab": 257, "context": 128},
  "data": {"text": {"paths": ["/usr/share/games/fortunes"], "separator": "%"}, "val_fraction": 0.05},
  "train": {"steps": 300, "micro_batch": 16, "grad_accum": 1, "lr": 3.0e-3, "warmup_steps": 30,
            "eval_every": 100},
  "probe": {"every": 50, "ref_span": 31, "profile_len": 64},
  "arms": ["baseline", "vscale"],
  "seeds": [0],
  "checkpoint": {"every": 100}
})";

TEST(ExperimentFile, JsonParsesLikeYaml) {
  auto yaml = ParseExperimentText(ReadText(kQuickstart), "quickstart.yaml");
  ASSERT_TRUE(yaml.ok()) << yaml.status().message();
  auto json = ParseExperimentText(kQuickstartJson, "quickstart.json");
  ASSERT_TRUE(json.ok()) << json.status().message();
  EXPECT_TRUE(SameMessage(*yaml, *json)) << yaml->DebugString() << "\nvs\n" << json->DebugString();
}

TEST(ExperimentFile, ProtobufsOwnJsonParsesBack) {
  // protobuf's JSON printer writes lowerCamelCase names, enum names in upper case and
  // uint64 seeds as strings: all of it must read back to the same message.
  auto e = LoadExperimentFile(kQuickstart);
  ASSERT_TRUE(e.ok()) << e.status().message();
  ApplyDefaults(*e);
  std::string json;
  ASSERT_TRUE(google::protobuf::util::MessageToJsonString(*e, &json).ok());
  EXPECT_THAT(json, HasSubstr("\"dModel\""));
  auto back = ParseExperimentText(json, "printed.json");
  ASSERT_TRUE(back.ok()) << back.status().message() << "\n" << json;
  EXPECT_TRUE(SameMessage(*e, *back)) << json;
}

TEST(ExperimentFile, AcceptsLowerCamelCaseNames) {
  auto e = ParseExperimentText(std::string(kMinimal) +
                                   "model: {dModel: 64, kvHeads: 2, headDim: 16, tiedEmbeddings: true}\n"
                                   "train: {microBatch: 4, gradAccum: 2, warmupSteps: 3, minLr: 1.0e-4}\n"
                                   "probe: {refSpan: 7, profileLen: 9, sinkPosition: 1, tEps: 5}\n"
                                   "checkpoint: {exportHf: false}\n"
                                   "maxRestarts: 0\n",
                               "camel.yaml");
  ASSERT_TRUE(e.ok()) << e.status().message();
  EXPECT_EQ(e->model().d_model(), 64);
  EXPECT_EQ(e->model().kv_heads(), 2);
  EXPECT_EQ(e->model().head_dim(), 16);
  EXPECT_TRUE(e->model().tied_embeddings());
  EXPECT_EQ(e->train().micro_batch(), 4);
  EXPECT_EQ(e->train().grad_accum(), 2);
  EXPECT_EQ(e->train().warmup_steps(), 3);
  EXPECT_DOUBLE_EQ(e->train().min_lr(), 1e-4);
  EXPECT_EQ(e->probe().ref_span(), 7);
  EXPECT_EQ(e->probe().profile_len(), 9);
  EXPECT_EQ(e->probe().sink_position(), 1);
  EXPECT_EQ(e->probe().t_eps(), 5);
  EXPECT_FALSE(e->checkpoint().export_hf());
  ASSERT_TRUE(e->has_max_restarts());
  EXPECT_EQ(e->max_restarts(), 0);
}

TEST(ExperimentFile, EnumsInAnyCase) {
  auto e = ParseExperimentText(std::string(kMinimal) +
                                   "arms: [baseline, VSCALE, Vscale_Backward_Only]\n"
                                   "probe: {reduce: norm_then_mean, batch: Held_Out}\n"
                                   "resources: {device: cuda}\n",
                               "enums.yaml");
  ASSERT_TRUE(e.ok()) << e.status().message();
  EXPECT_THAT(e->arms(), ElementsAre(v1::BASELINE, v1::VSCALE, v1::VSCALE_BACKWARD_ONLY));
  EXPECT_EQ(e->probe().reduce(), v1::NORM_THEN_MEAN);
  EXPECT_EQ(e->probe().batch(), v1::HELD_OUT);
  EXPECT_EQ(e->resources().device(), v1::CUDA);
}

TEST(ExperimentFile, EmptyValueMeansTheDefault) {
  auto e = ParseExperimentText(std::string(kMinimal) + "model:\n  layers:\narms:\n", "t.yaml");
  ASSERT_TRUE(e.ok()) << e.status().message();
  EXPECT_FALSE(e->model().has_layers());
  ApplyDefaults(*e);
  EXPECT_EQ(e->model().layers(), 4);
  EXPECT_THAT(e->arms(), ElementsAre(v1::BASELINE, v1::VSCALE));
}

// --- mistakes in the text: file:line, field path, reason ---------------------------------

TEST(ExperimentFileErrors, UnknownFieldListsTheKnownOnes) {
  Status s = ParseError("name: t\nmodel:\n  layers: 2\n  kv_hedas: 2\n");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), StartsWith("bad.yaml:4: model.kv_hedas: unknown field"));
  EXPECT_THAT(s.message(), HasSubstr("known: layers, d_model, heads, kv_heads, head_dim"));
  // Top level too.
  EXPECT_THAT(ParseError("name: t\nsteps: 10\n").message(),
              AllOf(StartsWith("bad.yaml:2: steps: unknown field"), HasSubstr("known: name, model, data, train")));
  // Names match exactly: neither another case nor a near miss.
  EXPECT_THAT(ParseError("Name: t\n").message(), StartsWith("bad.yaml:1: Name: unknown field"));
}

TEST(ExperimentFileErrors, WrongType) {
  EXPECT_EQ(ParseError("model:\n  layers: four\n").message(),
            "bad.yaml:2: model.layers: expected an integer, got \"four\"");
  EXPECT_THAT(ParseError("model:\n  layers: 1.5\n").message(),
              StartsWith("bad.yaml:2: model.layers: expected an integer"));
  EXPECT_THAT(ParseError("model:\n  layers: 3000000000\n").message(),  // beyond int32
              StartsWith("bad.yaml:2: model.layers: expected an integer"));
  EXPECT_THAT(ParseError("train:\n  lr: fast\n").message(), StartsWith("bad.yaml:2: train.lr: expected a number"));
  EXPECT_THAT(ParseError("model:\n  tied_embeddings: maybe\n").message(),
              StartsWith("bad.yaml:2: model.tied_embeddings: expected true or false"));
  EXPECT_THAT(ParseError("seeds: [1, -2]\n").message(),
              StartsWith("bad.yaml:1: seeds[1]: expected a non-negative integer, got \"-2\""));
}

TEST(ExperimentFileErrors, UnknownEnumValue) {
  Status s = ParseError("name: t\narms: [baseline, vscael]\n");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(),
            "bad.yaml:2: arms[1]: unknown value \"vscael\" (expected one of: baseline, vscale, vscale_backward_only, "
            "sink_logit, softmax_plus_one, gated_output, gated_head, gated_value, sigmoid, softpick, "
            "sink_logit_vscale, softmax_plus_one_vscale, gated_output_vscale, gated_head_vscale, sigmoid_vscale, "
            "softpick_vscale)");
  // The proto's zero value is no value a file may name.
  EXPECT_THAT(ParseError("arms: [arm_unspecified]\n").message(),
              StartsWith("bad.yaml:1: arms[0]: unknown value \"arm_unspecified\""));
  EXPECT_THAT(ParseError("probe:\n  reduce: mean\n").message(),
              AllOf(StartsWith("bad.yaml:2: probe.reduce: unknown value \"mean\""),
                    HasSubstr("sum_then_norm, norm_then_mean")));
}

TEST(ExperimentFileErrors, ShapeOfTheValue) {
  EXPECT_EQ(ParseError("model:\n  layers: [1, 2]\n").message(), "bad.yaml:2: model.layers: expected a single value");
  EXPECT_THAT(ParseError("name: {first: a}\n").message(), StartsWith("bad.yaml:1: name: expected a single value"));
  EXPECT_THAT(ParseError("arms: baseline\n").message(), StartsWith("bad.yaml:1: arms: expected a list"));
  EXPECT_THAT(ParseError("name: t\nmodel: 4\n").message(),
              StartsWith("bad.yaml:2: model: expected a mapping of fields"));
  EXPECT_THAT(ParseError("- name: t\n").message(), HasSubstr("(top level): expected a mapping of fields"));
}

TEST(ExperimentFileErrors, TextAndShardsTogether) {
  Status s = ParseError(
      "name: t\n"
      "data:\n"
      "  text:\n"
      "    paths: [a.txt]\n"
      "  shards:\n"
      "    train: 'x_*.bin'\n");
  EXPECT_EQ(s.message(), "bad.yaml:5: data.shards: conflicts with data.text (only one of them may be given)");
}

TEST(ExperimentFileErrors, MalformedYamlNamesTheLine) {
  Status s = ParseError("name: t\nmodel:\n  layers: 4\n  heads: [4, 2\n");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), AllOf(StartsWith("bad.yaml:"), HasSubstr("not valid YAML or JSON")));
  s = ParseError("name: t\nmodel:\n  layers: 4\n bad indent: 1\n");
  EXPECT_THAT(s.message(), AllOf(StartsWith("bad.yaml:4:"), HasSubstr("not valid YAML or JSON")));
  // JSON with a missing comma: yaml-cpp notices at the closing brace of the line after.
  s = ParseError("{\"name\": \"t\",\n \"model\": {\"layers\": 4 \"heads\": 2}\n}\n");
  EXPECT_THAT(s.message(), MatchesRegex("bad\\.yaml:[23]: not valid YAML or JSON: .*"));
  s = ParseError("name: t\nmodel: *undefined_anchor\n");
  EXPECT_THAT(s.message(), AllOf(StartsWith("bad.yaml:"), HasSubstr("not valid YAML or JSON")));
}

TEST(ExperimentFileErrors, DeepNestingIsNamedNotABadFile) {
  // yaml-cpp's depth guard used to surface as "bad file"; flow and block style alike.
  std::string flow = "name: t\nmodel: ";
  for (int i = 0; i < 1200; ++i) flow += "{a: ";
  flow += "1";
  for (int i = 0; i < 1200; ++i) flow += "}";
  Status s = ParseError(flow + "\n");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), AllOf(StartsWith("bad.yaml:2: nested too deeply"), Not(HasSubstr("bad file"))));
  std::string block = "name: t\nmodel:\n";
  for (int i = 0; i < 1200; ++i) block += std::string(2 * (i + 1), ' ') + "a:\n";
  s = ParseError(block);
  EXPECT_THAT(s.message(), AllOf(StartsWith("bad.yaml:"), HasSubstr("nested too deeply")));
}

TEST(ExperimentFileErrors, FieldGivenTwice) {
  // yaml-cpp keeps both keys; the loader must not let the second silently win or merge.
  EXPECT_EQ(ParseError("name: t\nmodel:\n  layers: 2\n  layers: 3\n").message(),
            "bad.yaml:4: model.layers: given twice (first as \"layers\" on line 3)");
  EXPECT_EQ(ParseError("name: t\nmodel: {d_model: 64,\n  dModel: 32}\n").message(),
            "bad.yaml:3: model.dModel: given twice (first as \"d_model\" on line 2)");
  EXPECT_THAT(ParseError("seeds: [0]\nname: t\nseeds: [1]\n").message(), StartsWith("bad.yaml:3: seeds: given twice"));
  EXPECT_THAT(ParseError("model: {layers: 2}\nmodel: {heads: 2}\n").message(),
              StartsWith("bad.yaml:2: model: given twice"));
}

TEST(ExperimentFileErrors, EmptyKey) {
  // yaml-cpp reads `,,` in a flow mapping as an entry with an empty key.
  EXPECT_EQ(ParseError("{\"name\": \"t\",\n \"model\": {\"layers\": 4,, }\n}\n").message(),
            "bad.yaml:2: model: expected a field name");
}

TEST(ExperimentFileErrors, EmptyFile) {
  EXPECT_EQ(ParseError("").message(), "bad.yaml: the file is empty");
  EXPECT_EQ(ParseError("# only a comment\n\n").message(), "bad.yaml: the file is empty");
}

TEST(ExperimentFileErrors, MissingFileIsNotFound) {
  auto e = LoadExperimentFile("/nonexistent/dir/experiment.yaml");
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(e.status().message(), HasSubstr("/nonexistent/dir/experiment.yaml"));
}

TEST(ExperimentFileErrors, LoadNamesTheFileAndLine) {
  const auto path = std::filesystem::temp_directory_path() / "sinkscope_experiment_test_bad.yaml";
  std::ofstream(path) << "name: t\nmodel:\n  layers: [2]\n";
  auto e = LoadExperimentFile(path.string());
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().message(), path.string() + ":3: model.layers: expected a single value");
  std::filesystem::remove(path);
}

// --- rules checked after defaults: field path and the rule ---------------------------------

TEST(ExperimentRules, MissingName) {
  auto e = ParseExperimentText("data:\n  text:\n    paths: [a]\n", "t.yaml");
  ASSERT_TRUE(e.ok());
  ApplyDefaults(*e);
  EXPECT_EQ(ValidateExperiment(*e, false).message(), "name: is required");
  e->set_name("a b");
  EXPECT_THAT(ValidateExperiment(*e, false).message(), StartsWith("name: may hold only letters"));
}

TEST(ExperimentRules, MissingData) {
  auto e = ParseExperimentText("name: t\n", "t.yaml");
  ASSERT_TRUE(e.ok());
  ApplyDefaults(*e);
  EXPECT_THAT(ValidateExperiment(*e, false).message(), StartsWith("data: needs data.text or data.shards"));
}

TEST(ExperimentRules, ModelShape) {
  EXPECT_EQ(ValidateWith("model: {heads: 4, kv_heads: 3}\n").message(),
            "model.kv_heads: must divide model.heads (4), got 3");
  EXPECT_EQ(ValidateWith("model: {head_dim: 33}\n").message(), "model.head_dim: must be even for RoPE, got 33");
  EXPECT_EQ(ValidateWith("model: {layers: 0}\n").message(), "model.layers: must be positive, got 0");
  EXPECT_THAT(ValidateWith("model: {vocab: 100}\n").message(), StartsWith("model.vocab: must be at least 257"));
  EXPECT_THAT(ValidateWith("model: {rms_eps: 0}\n").message(), StartsWith("model.rms_eps: must be positive"));
}

TEST(ExperimentRules, ProbeAgainstContext) {
  EXPECT_EQ(ValidateWith("model: {context: 32}\nprobe: {ref_span: 32}\n").message(),
            "probe.ref_span: T_e must be in [1, model.context) = [1, 32), got 32");
  EXPECT_THAT(ValidateWith("probe: {ref_span: 0}\n").message(), StartsWith("probe.ref_span: "));
  EXPECT_TRUE(ValidateWith("model: {context: 32}\nprobe: {ref_span: 31, profile_len: 32}\n").ok());
  EXPECT_EQ(ValidateWith("model: {context: 32}\nprobe: {profile_len: 33}\n").message(),
            "probe.profile_len: P must be in [1, model.context] = [1, 32], got 33");
  EXPECT_EQ(ValidateWith("model: {context: 32}\nprobe: {sink_position: 32}\n").message(),
            "probe.sink_position: must be in [0, model.context) = [0, 32), got 32");
  EXPECT_THAT(ValidateWith("probe: {sink_position: -1}\n").message(),
              AllOf(StartsWith("probe.sink_position: must be in [0, model.context)"), HasSubstr("got -1")));
  // Definition 1: 0 ≤ s ≤ T_e.
  EXPECT_EQ(ValidateWith("model: {context: 32}\nprobe: {sink_position: 20, ref_span: 15}\n").message(),
            "probe.sink_position: must lie within the reference span [0, probe.ref_span] = [0, 15] (Definition 1: "
            "0 ≤ s ≤ T_e), got 20; raise probe.ref_span");
  EXPECT_TRUE(ValidateWith("model: {context: 32}\nprobe: {sink_position: 20, ref_span: 20}\n").ok());
  EXPECT_THAT(ValidateWith("probe: {eps: 1.5}\n").message(), StartsWith("probe.eps: must be in (0, 1)"));
}

TEST(ExperimentRules, Training) {
  EXPECT_THAT(ValidateWith("train: {lr: -1.0e-3}\n").message(),
              AllOf(HasSubstr("train.lr"), HasSubstr("must be positive")));
  EXPECT_EQ(ValidateWith("train: {steps: 10, warmup_steps: 11}\n").message(),
            "train.warmup_steps: must not exceed train.steps");
  EXPECT_TRUE(ValidateWith("train: {steps: 10, warmup_steps: 10}\n").ok());
  EXPECT_EQ(ValidateWith("train: {micro_batch: 0}\n").message(), "train.micro_batch: must be positive, got 0");
  EXPECT_THAT(ValidateWith("train: {min_lr: 1.0}\n").message(), HasSubstr("train.min_lr"));
  auto e = ParseExperimentText("name: t\ndata:\n  text: {paths: [a]}\n  val_fraction: 0.7\n", "t.yaml");
  ASSERT_TRUE(e.ok()) << e.status().message();
  ApplyDefaults(*e);
  EXPECT_THAT(ValidateExperiment(*e, false).message(), StartsWith("data.val_fraction: must be in [0, 0.5]"));
}

TEST(ExperimentRules, RepeatedArm) {
  EXPECT_EQ(ValidateWith("arms: [baseline, vscale, BASELINE]\n").message(), "arms[2]: repeats arms[0]");
}

TEST(ExperimentRules, RepeatedSeed) {
  // Runs are named <arm>-s<seed>: a repeated seed would train the same run twice into
  // the same folder.
  EXPECT_EQ(ValidateWith("seeds: [0, 1, 1]\n").message(), "seeds[2]: repeats seeds[1]");
  EXPECT_TRUE(ValidateWith("seeds: [0, 1, 2]\n").ok());
}

TEST(ExperimentRules, DataPathsWhenChecked) {
  auto e = ParseExperimentText(kMinimal, "t.yaml");
  ASSERT_TRUE(e.ok());
  ApplyDefaults(*e);
  EXPECT_TRUE(ValidateExperiment(*e, /*check_paths=*/false).ok());
  EXPECT_EQ(ValidateExperiment(*e, /*check_paths=*/true).message(),
            "data.text.paths[0]: no such file or folder: /nonexistent/corpus");

  auto shards = ParseExperimentText("name: t\ndata:\n  shards:\n    train: /nonexistent/shard_*.bin\n", "t.yaml");
  ASSERT_TRUE(shards.ok()) << shards.status().message();
  ApplyDefaults(*shards);
  EXPECT_TRUE(ValidateExperiment(*shards, /*check_paths=*/false).ok());
  EXPECT_THAT(ValidateExperiment(*shards, /*check_paths=*/true).message(),
              AllOf(StartsWith("data.shards.train: "), HasSubstr("/nonexistent/shard_*.bin")));
}

// Every rate and size: positive (or not negative) and finite, named with the rule and
// the value given.
TEST(ExperimentRules, RatesAndSizes) {
  struct Case {
    const char* extra;
    const char* message;
  };
  for (const Case& c : {
           Case{"train: {lr: 0}\n", "train.lr: must be positive and finite, got 0"},
           Case{"train: {lr: .inf}\n", "train.lr: must be positive and finite, got inf"},
           Case{"train: {lr: .nan}\n", "train.lr: must be positive and finite, got nan"},
           Case{"train: {lr: 1.0e-3, min_lr: 2.0e-3}\n",
                "train.min_lr: must be in [0, train.lr] = [0, 0.001], got 0.002"},
           Case{"train: {min_lr: -1.0e-3}\n", "train.min_lr: must be in [0, train.lr] = [0, 0.003], got -0.001"},
           Case{"train: {grad_clip: -1}\n", "train.grad_clip: must be finite and not negative, got -1"},
           Case{"train: {grad_clip: .inf}\n", "train.grad_clip: must be finite and not negative, got inf"},
           Case{"train: {weight_decay: -0.1}\n", "train.weight_decay: must be finite and not negative, got -0.1"},
           Case{"train: {eps: 0}\n", "train.eps: must be positive and finite, got 0"},
           Case{"train: {beta1: 1.0}\n", "train.beta1: must be in [0, 1), got 1"},
           Case{"train: {beta2: -0.5}\n", "train.beta2: must be in [0, 1), got -0.5"},
           Case{"train: {warmup_steps: -1}\n", "train.warmup_steps: must not be negative"},
           Case{"train: {eval_every: -1}\n", "train.eval_every: must not be negative"},
           Case{"train: {eval_batches: 0}\n", "train.eval_batches: must be positive, got 0"},
           Case{"train: {grad_accum: -2}\n", "train.grad_accum: must be positive, got -2"},
           Case{"train: {steps: 0, warmup_steps: 0}\n", "train.steps: must be positive, got 0"},
           Case{"resources: {devices_per_run: 0}\n", "resources.devices_per_run: must be positive, got 0"},
           Case{"resources: {devices_per_run: 3}\n",
                "train.micro_batch: (8) must be a multiple of resources.devices_per_run (3): each rank trains an "
                "equal share of every micro-batch"},
           Case{"resources: {devices_per_run: 2048}\ntrain: {micro_batch: 2048}\n",
                "resources.devices_per_run: must be at most 1024, got 2048"},
           Case{"max_restarts: -1\n", "max_restarts: must not be negative, got -1"},
           Case{"checkpoint: {every: -5}\n", "checkpoint.every: must not be negative, got -5"},
           Case{"probe: {every: -1}\n", "probe.every: must not be negative"},
           Case{"probe: {t_eps: 0}\n", "probe.t_eps: must be positive, got 0"},
           Case{"probe: {eps: 0}\n", "probe.eps: must be in (0, 1), got 0"},
           Case{"model: {rope_theta: .inf}\n", "model.rope_theta: must be positive and finite, got inf"},
           Case{"model: {init_std: -0.02}\n", "model.init_std: must be positive and finite, got -0.02"},
           Case{"model: {d_model: -8, head_dim: 2, ffn: 8}\n", "model.d_model: must be positive, got -8"},
           Case{"model: {context: 0}\n", "model.context: must be positive, got 0"},
       }) {
    EXPECT_EQ(ValidateWith(c.extra).message(), c.message) << c.extra;
  }
  // Zero is allowed where it means "off".
  EXPECT_TRUE(ValidateWith("train: {grad_clip: 0, weight_decay: 0, eval_every: 0, min_lr: 0}\n"
                           "probe: {every: 0}\ncheckpoint: {every: 0}\nmax_restarts: 0\n")
                  .ok());
  // A huge learning rate is valid: it fails the run as NUMERICAL, not the submission.
  EXPECT_TRUE(ValidateWith("train: {lr: 1.0e30}\n").ok());
}

TEST(ExperimentRules, NameLength) {
  EXPECT_TRUE(ValidateWith("").ok());
  auto e = ParseExperimentText(kMinimal, "t.yaml");
  ASSERT_TRUE(e.ok());
  ApplyDefaults(*e);
  e->set_name(std::string(101, 'n'));
  EXPECT_EQ(ValidateExperiment(*e, false).message(), "name: must be at most 100 characters, got 101");
}

// Binary protobuf keeps enum numbers it does not know: a client may send any.
TEST(ExperimentRules, UnknownEnumNumbers) {
  auto e = ParseExperimentText(kMinimal, "t.yaml");
  ASSERT_TRUE(e.ok());
  ApplyDefaults(*e);
  v1::Experiment x = *e;
  x.set_arms(1, static_cast<v1::Arm>(99));
  EXPECT_EQ(ValidateExperiment(x, false).message(),
            "arms[1]: unknown arm 99 (expected one of: baseline, vscale, vscale_backward_only, sink_logit, "
            "softmax_plus_one, gated_output, gated_head, gated_value, sigmoid, softpick, sink_logit_vscale, "
            "softmax_plus_one_vscale, gated_output_vscale, gated_head_vscale, sigmoid_vscale, softpick_vscale)");
  x = *e;
  x.set_arms(0, v1::ARM_UNSPECIFIED);
  EXPECT_THAT(ValidateExperiment(x, false).message(), StartsWith("arms[0]: unknown arm 0"));
  x = *e;
  x.mutable_resources()->set_device(static_cast<v1::DeviceKind>(9));
  EXPECT_EQ(ValidateExperiment(x, false).message(), "resources.device: unknown value 9 (expected one of: cpu, cuda)");
  x = *e;
  x.mutable_probe()->set_reduce(static_cast<v1::Reduce>(-3));
  EXPECT_THAT(ValidateExperiment(x, false).message(), StartsWith("probe.reduce: unknown value -3 (expected one of: "));
  x = *e;
  x.mutable_probe()->set_batch(static_cast<v1::ProbeBatch>(12));
  EXPECT_THAT(ValidateExperiment(x, false).message(), StartsWith("probe.batch: unknown value 12"));
  x = *e;
  x.mutable_data()->mutable_text()->add_paths("");
  EXPECT_EQ(ValidateExperiment(x, false).message(), "data.text.paths[1]: is empty");
}

// proto3 strings must be UTF-8, or the experiment can be neither sent nor stored.
TEST(ExperimentRules, StringsMustBeUtf8) {
  EXPECT_EQ(ParseError("name: t\ndata:\n  shards: {train: \"/data/\xa7.bin\"}\n").message(),
            "bad.yaml:3: data.shards.train: is not valid UTF-8");
  EXPECT_EQ(ParseError("name: t\ndata:\n  text: {paths: [ok, \"\xc0\xaf\"]}\n").message(),
            "bad.yaml:3: data.text.paths[1]: is not valid UTF-8");  // an overlong '/'
  EXPECT_TRUE(ParseError("name: t\ndata:\n  text: {paths: [\"caf\xc3\xa9/\xf0\x9f\x98\x80\"]}\n").ok());
  auto e = ParseExperimentText(kMinimal, "t.yaml");
  ASSERT_TRUE(e.ok());
  ApplyDefaults(*e);
  e->mutable_data()->mutable_text()->set_separator("\xed\xa0\x80");  // a surrogate
  EXPECT_EQ(ValidateExperiment(*e, false).message(), "data.text.separator: is not valid UTF-8");
}

// Defaults computed from absurd values neither overflow nor trap; validation names them.
TEST(ExperimentRules, ExtremeValuesDoNotOverflowDefaults) {
  auto e = ParseExperimentText(std::string(kMinimal) + "model: {d_model: 2147483647, context: -2147483648}\n",
                               "t.yaml");
  ASSERT_TRUE(e.ok());
  ApplyDefaults(*e);
  EXPECT_EQ(e->model().ffn(), INT32_MAX);
  EXPECT_EQ(e->probe().ref_span(), INT32_MIN);  // context - 1, clamped
  EXPECT_EQ(ValidateExperiment(*e, false).message(), "model.context: must be positive, got -2147483648");
  auto neg = ParseExperimentText(std::string(kMinimal) + "model: {d_model: -2147483648, heads: -1}\n", "t.yaml");
  ASSERT_TRUE(neg.ok());
  ApplyDefaults(*neg);  // no INT_MIN / -1
  EXPECT_EQ(ValidateExperiment(*neg, false).message(), "model.d_model: must be positive, got -2147483648");
}

TEST(ExperimentRules, BoundedWork) {
  // Sizes no worker could hold, and submissions whose bookkeeping alone would be unbounded.
  EXPECT_EQ(ValidateWith("model: {vocab: 1000000000}\n").message(), "model.vocab: must be at most 16777216, got 1000000000");
  EXPECT_EQ(ValidateWith("train: {micro_batch: 1000000000}\n").message(),
            "train.micro_batch: must be at most 65536, got 1000000000");
  std::string seeds = "seeds: [";
  for (int i = 0; i < 129; ++i) seeds += (i ? ", " : "") + std::to_string(i);
  EXPECT_EQ(ValidateWith(seeds + "]\narms: [baseline, vscale]\n").message(),
            "seeds: 2 arms x 129 seeds make 258 runs, at most 256 per experiment");
  EXPECT_TRUE(ValidateWith(seeds.substr(0, seeds.rfind(',')) + "]\narms: [baseline, vscale]\n").ok());
  auto e = ParseExperimentText(kMinimal, "t.yaml");
  ASSERT_TRUE(e.ok());
  ApplyDefaults(*e);
  v1::Experiment copies = *e;
  copies.mutable_data()->mutable_text()->add_paths("/nonexistent/./corpus");  // the same file
  EXPECT_EQ(ValidateExperiment(copies, false).message(),
            "data.text.paths[1]: repeats data.text.paths[0] (/nonexistent/./corpus)");
  v1::Experiment many = *e;
  for (int i = 0; i < 10000; ++i) many.mutable_data()->mutable_text()->add_paths("/data/part-" + std::to_string(i));
  EXPECT_EQ(ValidateExperiment(many, false).message(),
            "data.text.paths: lists 10001 paths, at most 256 (name folders instead of their files)");
}

class ContextAgainstData : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("sinkscope-exp-" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  // kMinimal with its text path replaced and `extra` appended, defaulted.
  v1::Experiment Text(const std::string& path, const std::string& extra) {
    auto e = ParseExperimentText("name: t\ndata:\n  text:\n    paths: [" + path + "]\n" + extra, "t.yaml");
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    ApplyDefaults(*e);
    return *e;
  }
  v1::Experiment Shards(const std::string& train, const std::string& val, const std::string& extra) {
    auto e = ParseExperimentText("name: t\ndata:\n  shards:\n    train: " + train + "\n" +
                                     (val.empty() ? "" : "    val: " + val + "\n") + extra,
                                 "t.yaml");
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    ApplyDefaults(*e);
    return *e;
  }
  std::filesystem::path dir_;
};

TEST_F(ContextAgainstData, TextMustHoldOneWindow) {
  const std::string file = (dir_ / "small.txt").string();
  std::ofstream(file) << "twenty bytes of text";  // 20 bytes: at most 21 tokens
  const v1::Experiment e = Text(file, "model: {context: 32}\nprobe: {ref_span: 15, profile_len: 16}\n");
  EXPECT_TRUE(ValidateExperiment(e, /*check_paths=*/false).ok());  // the worker would report DATA_ERROR
  EXPECT_EQ(ValidateExperiment(e, /*check_paths=*/true).message(),
            "model.context: 32 needs windows of model.context + 1 = 33 tokens, but data.text.paths hold at most 21 "
            "byte-level tokens");
  EXPECT_TRUE(ValidateExperiment(Text(file, "model: {context: 16}\nprobe: {ref_span: 15, profile_len: 16}\n"), true)
                  .ok());
  // In a folder, excluded files do not count.
  std::ofstream((dir_ / "big.dat").string()) << std::string(1000, 'x');
  EXPECT_THAT(ValidateExperiment(Text(dir_.string(), "model: {context: 32}\nprobe: {ref_span: 15}\n"), true).message(),
              HasSubstr("hold at most 21 byte-level tokens"));
  std::ofstream((dir_ / "more.txt").string()) << std::string(100, 'y');
  EXPECT_TRUE(ValidateExperiment(Text(dir_.string(), "model: {context: 32}\nprobe: {ref_span: 15}\n"), true).ok());
}

TEST_F(ContextAgainstData, ListingAFolderStopsWhenTheClientHasGone) {
  // Issue 28, finding 3: the check over a large data folder used to run on after the client
  // gave up. Here 2,000 excluded files; `stop` answers true from its first question on.
  for (int i = 0; i < 2000; ++i) std::ofstream((dir_ / ("f" + std::to_string(i) + ".dat")).string()) << "x";
  const v1::Experiment e = Text(dir_.string(), "model: {context: 32}\nprobe: {ref_span: 15}\n");
  int asked = 0;
  const Status s = ValidateExperiment(e, /*check_paths=*/true, [&] { return ++asked > 0; });
  EXPECT_EQ(s.code(), StatusCode::kCancelled);
  EXPECT_THAT(s.message(), AllOf(StartsWith("data.text.paths[0]: the check stopped after 256 entries of "),
                                 HasSubstr("the client cancelled or its deadline passed")));
  EXPECT_EQ(asked, 1);
  // Never stopped: the whole folder is listed and the rule decides.
  EXPECT_THAT(ValidateExperiment(e, true, [] { return false; }).message(), HasSubstr("hold at most 0 byte-level"));
}

TEST_F(ContextAgainstData, ShardsMustHoldOneWindowInEachSplit) {
  std::vector<int32_t> tokens(100, 7);
  ASSERT_TRUE(WriteShard((dir_ / "train_000.bin").string(), tokens).ok());
  ASSERT_TRUE(WriteShard((dir_ / "train_001.bin").string(), tokens).ok());
  ASSERT_TRUE(WriteShard((dir_ / "val_000.bin").string(), std::vector<int32_t>(20, 3)).ok());
  const std::string train = (dir_ / "train_*.bin").string(), val = (dir_ / "val_*.bin").string();
  const std::string model = "model: {context: 32}\nprobe: {ref_span: 15, profile_len: 16}\n";
  // 200 tokens, 5% (10) held out for validation: too few for one window of 33.
  EXPECT_EQ(ValidateExperiment(Shards(train, "", model), true).message(),
            "model.context: 32 needs windows of model.context + 1 = 33 tokens, but the validation split "
            "(data.val_fraction 0.05 of data.shards.train) holds 10");
  EXPECT_TRUE(ValidateExperiment(Shards(train, "", model), /*check_paths=*/false).ok());
  auto no_val = Shards(train, "", model);
  no_val.mutable_data()->set_val_fraction(0);
  EXPECT_TRUE(ValidateExperiment(no_val, true).ok());
  no_val.mutable_model()->set_context(256);
  EXPECT_EQ(ValidateExperiment(no_val, true).message(),
            "model.context: 256 needs windows of model.context + 1 = 257 tokens, but the training split of "
            "data.shards.train (" + train + ") holds 200");
  EXPECT_EQ(ValidateExperiment(Shards(train, val, model), true).message(),
            "model.context: 32 needs windows of model.context + 1 = 33 tokens, but data.shards.val (" + val +
                ") holds 20");
  // Not a shard at all.
  std::ofstream((dir_ / "train_002.bin").string()) << std::string(2000, 'z');
  EXPECT_THAT(ValidateExperiment(Shards(train, val, model), true).message(),
              AllOf(StartsWith("data.shards.train: "), HasSubstr("train_002.bin: not an llm.c shard")));
}

}  // namespace
}  // namespace sinkscope

namespace sinkscope {
namespace {

// The paper's configurations (Table 3) load, validate and have the paper's sizes.
TEST(PaperExamplesTest, LoadValidateAndMatchTable3ParameterCounts) {
  struct Case {
    const char* file;
    double params;  // total parameters, Table 3
  };
  for (const Case& c : {Case{"paper-0.1b.yaml", 101e6}, Case{"paper-0.3b.yaml", 304e6}, Case{"paper-1b.yaml", 1.04e9}}) {
    auto e = LoadExperimentFile(std::string(SINKSCOPE_SOURCE_DIR) + "/examples/" + c.file);
    ASSERT_TRUE(e.ok()) << c.file << ": " << e.status().ToString();
    ApplyDefaults(*e);
    ASSERT_TRUE(ValidateExperiment(*e, /*check_paths=*/false).ok()) << c.file;
    const ModelConfig m = ToModelConfig(e->model(), v1::BASELINE);
    const double total = static_cast<double>(m.MatmulParams()) + static_cast<double>(m.vocab) * m.d_model +
                         static_cast<double>(m.layers) * 2 * m.d_model + m.d_model;  // + embedding + norms
    EXPECT_NEAR(total / c.params, 1.0, 0.02) << c.file << ": " << total;
    EXPECT_EQ(e->train().micro_batch() * e->train().grad_accum(), 512) << c.file << ": global batch";
  }
}

}  // namespace
}  // namespace sinkscope

namespace sinkscope {
namespace {

// ---- data.bos and sweeps ---------------------------------------------------------------

v1::Experiment Defaulted(const std::string& text) {
  auto e = ParseExperimentText(text, "s.yaml");
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  ApplyDefaults(*e);
  return *e;
}

TEST(PaperExamplesTest, CpuExamplesLoadAndValidate) {
  for (const char* file : {"quickstart.yaml", "sinks-cpu.yaml"}) {
    auto e = LoadExperimentFile(std::string(SINKSCOPE_SOURCE_DIR) + "/examples/" + file);
    ASSERT_TRUE(e.ok()) << file << ": " << e.status().ToString();
    ApplyDefaults(*e);
    EXPECT_TRUE(ValidateExperiment(*e, /*check_paths=*/false).ok()) << file;
  }
  auto e = LoadExperimentFile(std::string(SINKSCOPE_SOURCE_DIR) + "/examples/sinks-cpu.yaml");
  ASSERT_TRUE(e.ok());
  EXPECT_TRUE(e->data().bos());
}

TEST(DataBos, DefaultsOffWithTheEndOfTextToken) {
  v1::Experiment e = Defaulted(std::string(kMinimal));
  EXPECT_FALSE(e.data().bos());
  EXPECT_EQ(e.data().bos_token(), kEndOfText);
  v1::Experiment shards = Defaulted("name: t\ndata:\n  shards: {train: /x/*.bin}\n  bos: true\nmodel: {vocab: 50304}\n");
  EXPECT_TRUE(shards.data().bos());
  EXPECT_EQ(shards.data().bos_token(), kGpt2EndOfText);
  EXPECT_TRUE(ValidateExperiment(shards, false).ok());
  // On, with a token the model cannot embed: refused naming the field and the bound.
  v1::Experiment small = Defaulted("name: t\ndata:\n  shards: {train: /x/*.bin}\n  bos: true\n");
  EXPECT_EQ(ValidateExperiment(small, false).message(),
            "data.bos_token: must be a token of the vocabulary, in [0, model.vocab 257), got 50256");
  // Off, the token is not used and not checked.
  small.mutable_data()->set_bos(false);
  EXPECT_TRUE(ValidateExperiment(small, false).ok());
}

const char kSweep[] =
    "name: s\n"
    "data:\n"
    "  text: {paths: [/nonexistent/corpus]}\n"
    "train: {steps: 100}\n"
    "arms: [baseline, vscale]\n"
    "seeds: [0, 1]\n"
    "sweep:\n"
    "  train.lr: [1e-3, 3e-3, 1e-2]\n"
    "  data.bos: [false, true]\n";

TEST(Sweep, ParsesInFileOrderAndCountsTheGrid) {
  auto e = ParseExperimentText(kSweep, "s.yaml");
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  ASSERT_EQ(e->sweep_size(), 2);
  EXPECT_EQ(e->sweep(0).path(), "train.lr");
  EXPECT_THAT(e->sweep(0).values(), ElementsAre("1e-3", "3e-3", "1e-2"));
  EXPECT_EQ(e->sweep(1).path(), "data.bos");
  EXPECT_EQ(SweepPointCount(*e), 6);
  v1::Experiment d = *e;
  ApplyDefaults(d);
  EXPECT_TRUE(ValidateExperiment(d, false).ok());
}

TEST(Sweep, PointsSetTheirValuesBeforeTheDefaults) {
  auto e = ParseExperimentText(kSweep, "s.yaml");
  ASSERT_TRUE(e.ok());
  // The first axis slowest: point 3 = lr index 1, bos index 1.
  std::string label;
  auto p = SweepPointExperiment(*e, 3, &label);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(label, "train.lr=3e-3 data.bos=true");
  EXPECT_DOUBLE_EQ(p->train().lr(), 3e-3);
  EXPECT_DOUBLE_EQ(p->train().min_lr(), 3e-4);  // derived from the point's lr, not the base's
  EXPECT_TRUE(p->data().bos());
  EXPECT_EQ(p->sweep_size(), 0);
  EXPECT_EQ(p->train().steps(), 100);
  auto first = SweepPointExperiment(*e, 0, &label);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(label, "train.lr=1e-3 data.bos=false");
  EXPECT_FALSE(first->data().bos());
  EXPECT_FALSE(SweepPointExperiment(*e, 6, &label).ok());
  EXPECT_FALSE(SweepPointExperiment(*e, -1, &label).ok());
  // Model fields too, with the derived defaults following them.
  auto m = ParseExperimentText(std::string(kMinimal) + "sweep: {model.d_model: [64, 256]}\n", "s.yaml");
  ASSERT_TRUE(m.ok());
  auto big = SweepPointExperiment(*m, 1, &label);
  ASSERT_TRUE(big.ok());
  EXPECT_EQ(big->model().d_model(), 256);
  EXPECT_EQ(big->model().head_dim(), 64);  // d_model / heads, of the point
  EXPECT_TRUE(ValidateExperiment(*big, false).ok());
}

TEST(Sweep, BadAxesAreRefusedWithTheLineAndTheRule) {
  auto err = [](const std::string& sweep) { return ParseError(std::string(kMinimal) + "sweep:\n" + sweep).message(); };
  EXPECT_THAT(err("  train.lrr: [1]\n"),
              AllOf(StartsWith("bad.yaml:6: sweep.train.lrr: unknown field \"lrr\""), HasSubstr("known in TrainSpec")));
  EXPECT_THAT(err("  name: [a, b]\n"), HasSubstr("sweep.name: a sweep sets fields of model, train, data or probe"));
  EXPECT_THAT(err("  data.text.paths: [a, b]\n"), HasSubstr("sweep.data.text.paths: is a list"));
  EXPECT_THAT(err("  train: [1]\n"), HasSubstr("sweep.train: is a section"));
  EXPECT_EQ(err("  train.lr: [1e-3, fast]\n"), "bad.yaml:6: sweep.train.lr[1]: expected a number, got \"fast\"");
  EXPECT_EQ(err("  train.steps: [10, 2.5]\n"), "bad.yaml:6: sweep.train.steps[1]: expected an integer, got \"2.5\"");
  EXPECT_EQ(err("  data.bos: [yes please]\n"),
            "bad.yaml:6: sweep.data.bos[0]: expected true or false, got \"yes please\"");
  EXPECT_THAT(err("  train.lr: []\n"), HasSubstr("sweep.train.lr: expected a non-empty list of values"));
  EXPECT_THAT(err("  train.lr: 1e-3\n"), HasSubstr("sweep.train.lr: expected a non-empty list of values"));
  EXPECT_THAT(err("  train.lr: [1]\n  train.lr: [2]\n"), HasSubstr("sweep.train.lr: given twice"));
  EXPECT_THAT(ParseError(std::string(kMinimal) + "sweep: [train.lr]\n").message(),
              HasSubstr("sweep: expected a mapping of field paths to lists of values"));
}

TEST(Sweep, TheGridCountsAgainstTheRunCapAndEachPointIsAnExperiment) {
  std::string values;
  for (int i = 0; i < 65; ++i) values += (i ? ", " : "") + std::to_string(i + 1);
  EXPECT_EQ(ValidateWith("sweep:\n  train.steps: [" + values + "]\n").message(),
            "sweep.train.steps: 65 values, at most 64");
  // 8 × 8 × 2 points × 2 arms = 256: at the cap; one more value is over it.
  EXPECT_TRUE(ValidateWith("arms: [baseline, vscale]\nsweep:\n  train.steps: [1, 2, 3, 4, 5, 6, 7, 8]\n"
                           "  train.lr: [1, 2, 3, 4, 5, 6, 7, 8]\n  probe.eps: [0.1, 0.2]\n")
                  .ok());
  EXPECT_EQ(ValidateWith("arms: [baseline, vscale]\nsweep:\n  train.steps: [1, 2, 3, 4, 5, 6, 7, 8, 9]\n"
                         "  train.lr: [1, 2, 3, 4, 5, 6, 7, 8]\n  probe.eps: [0.1, 0.2]\n")
                .message(),
            "sweep: a grid of 144 points x 2 arms x 1 seeds makes 288 runs, at most 256 per experiment");
  EXPECT_EQ(ValidateWith("sweep:\n  train.lr: [1e-3, 1e-3]\n").message(), "sweep.train.lr[1]: repeats value 0 (1e-3)");
  // A point that breaks a rule of its own is not caught by the base's validation: each
  // point is validated as an experiment by whoever expands the grid.
  auto e = ParseExperimentText(std::string(kMinimal) + "sweep: {model.kv_heads: [2, 3]}\n", "s.yaml");
  ASSERT_TRUE(e.ok());
  std::string label;
  auto bad = SweepPointExperiment(*e, 1, &label);
  ASSERT_TRUE(bad.ok());
  EXPECT_EQ(ValidateExperiment(*bad, false).message(), "model.kv_heads: must divide model.heads (4), got 3");
  // Over the wire (no file): the same rules, without a line.
  v1::Experiment wire = Defaulted(kMinimal);
  v1::SweepAxis* axis = wire.add_sweep();
  axis->set_path("probe.every");
  axis->add_values("ten");
  EXPECT_EQ(ValidateExperiment(wire, false).message(), "sweep.probe.every[0]: expected an integer, got \"ten\"");
  axis->set_path("data.shards.train");  // the experiment has text, not shards
  axis->set_values(0, "/x/*.bin");
  EXPECT_TRUE(ValidateExperiment(wire, false).ok());  // the path and value are well formed …
  v1::Experiment raw = *ParseExperimentText(kMinimal, "s.yaml");
  *raw.add_sweep() = *axis;
  auto conflict = SweepPointExperiment(raw, 0, &label);  // … but no point can set it
  ASSERT_FALSE(conflict.ok());
  EXPECT_EQ(conflict.status().message(), "sweep.data.shards.train: the experiment's data has text, not shards");
  // A diagnostic job is one run.
  EXPECT_EQ(ValidateWith("diagnostic: {model: /m, text: /t}\nsweep: {probe.eps: [0.1, 0.2]}\n").message(),
            "sweep: a diagnostic probe job is one run: it takes no sweep");
}

}  // namespace
}  // namespace sinkscope

namespace sinkscope {
namespace {

// The attention arms (docs/design/ARMS.md): names, the engine config each maps to, the
// parameters' defaults, and every refusal naming its field and rule.
TEST(AttentionArms, NamesMapToTheEngineConfig) {
  auto e = ParseExperimentText(std::string(kMinimal) +
                                   "arms: [sink_logit, softmax_plus_one, gated_output, gated_head, gated_value, "
                                   "sigmoid, softpick, sink_logit_vscale, sigmoid_vscale]\n"
                                   "model: {context: 64}\n",
                               "t.yaml");
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  ApplyDefaults(*e);
  ASSERT_TRUE(ValidateExperiment(*e, false).ok()) << ValidateExperiment(*e, false).ToString();
  EXPECT_DOUBLE_EQ(e->model().sigmoid_bias(), -std::log(64.0));  // b = −ln(context)
  EXPECT_DOUBLE_EQ(e->model().softpick_eps(), 1e-6);
  EXPECT_DOUBLE_EQ(e->model().sink_logit_init(), 0.0);
  struct Expect {
    v1::Arm arm;
    const char* name;
    AttentionKind attention;
    GateKind gate;
    VScaleMode vscale;
  };
  for (const Expect& x : {Expect{v1::SINK_LOGIT, "sink_logit", AttentionKind::kSinkLogit, GateKind::kNone,
                                 VScaleMode::kNone},
                          Expect{v1::SOFTMAX_PLUS_ONE, "softmax_plus_one", AttentionKind::kSoftmaxPlusOne,
                                 GateKind::kNone, VScaleMode::kNone},
                          Expect{v1::GATED_OUTPUT, "gated_output", AttentionKind::kSoftmax, GateKind::kOutput,
                                 VScaleMode::kNone},
                          Expect{v1::GATED_HEAD, "gated_head", AttentionKind::kSoftmax, GateKind::kHead,
                                 VScaleMode::kNone},
                          Expect{v1::GATED_VALUE, "gated_value", AttentionKind::kSoftmax, GateKind::kValue,
                                 VScaleMode::kNone},
                          Expect{v1::SIGMOID, "sigmoid", AttentionKind::kSigmoid, GateKind::kNone, VScaleMode::kNone},
                          Expect{v1::SOFTPICK, "softpick", AttentionKind::kSoftpick, GateKind::kNone,
                                 VScaleMode::kNone},
                          Expect{v1::GATED_HEAD_VSCALE, "gated_head_vscale", AttentionKind::kSoftmax,
                                 GateKind::kHead, VScaleMode::kVScale},
                          Expect{v1::SOFTPICK_VSCALE, "softpick_vscale", AttentionKind::kSoftpick, GateKind::kNone,
                                 VScaleMode::kVScale}}) {
    const ModelConfig c = ToModelConfig(e->model(), x.arm);
    EXPECT_STREQ(ArmName(x.arm), x.name);
    EXPECT_EQ(c.attention, x.attention) << x.name;
    EXPECT_EQ(c.gate, x.gate) << x.name;
    EXPECT_EQ(c.vscale, x.vscale) << x.name;
    EXPECT_TRUE(IsAttentionArm(x.arm)) << x.name;
    EXPECT_TRUE(c.Validate().ok()) << x.name << ": " << c.Validate().ToString();
  }
  EXPECT_FALSE(IsAttentionArm(v1::VSCALE));
  EXPECT_FALSE(IsAttentionArm(v1::BASELINE));
}

TEST(AttentionArms, BadInputIsRefusedNamingFieldAndRule) {
  // The CUDA backend runs every arm (its tiled attention kernel), so cuda is no refusal.
  EXPECT_TRUE(ValidateWith("arms: [baseline, sigmoid, sink_logit, gated_output, softpick_vscale]\n"
                           "resources: {device: cuda}\n").ok());
  EXPECT_TRUE(ValidateWith("arms: [baseline, vscale]\nresources: {device: cuda}\n").ok());
  EXPECT_EQ(ValidateWith("model: {sink_logit_init: 25}\narms: [sink_logit]\n").message(),
            "model.sink_logit_init: must be finite and in [-20, 20], got 25");
  EXPECT_EQ(ValidateWith("model: {sigmoid_bias: -31}\narms: [sigmoid]\n").message(),
            "model.sigmoid_bias: must be finite and in [-30, 30], got -31");
  EXPECT_EQ(ValidateWith("model: {softpick_eps: 0}\narms: [softpick]\n").message(),
            "model.softpick_eps: must be in (0, 1], got 0");
  EXPECT_THAT(ValidateWith("model: {softpick_eps: 2}\n").message(), StartsWith("model.softpick_eps"));
  // Names the engine does not define: an unknown arm, and combinations it refuses.
  EXPECT_THAT(ParseError(std::string(kMinimal) + "arms: [sinkhorn]\n").message(),
              AllOf(HasSubstr("arms"), HasSubstr("unknown value \"sinkhorn\""), HasSubstr("softpick_vscale")));
  EXPECT_THAT(ParseError(std::string(kMinimal) + "arms: [gated_value_vscale]\n").message(),
              AllOf(HasSubstr("arms"), HasSubstr("gated_value with vscale is not defined")));
  EXPECT_THAT(ParseError(std::string(kMinimal) + "arms: [sigmoid+vscale_backward_only]\n").message(),
              HasSubstr("sigmoid with vscale_backward_only is not defined"));
  EXPECT_THAT(ParseError(std::string(kMinimal) + "arms: [vscale+softpick]\n").message(),
              HasSubstr("spelt softpick_vscale"));
  // A diagnostic job probes a checkpoint's own architecture.
  EXPECT_THAT(ValidateWith("diagnostic: {model: /m/checkpoint.bin, text: /t, arm: sigmoid}\n").message(),
              StartsWith("diagnostic.arm: sigmoid changes the architecture"));
}

}  // namespace
}  // namespace sinkscope

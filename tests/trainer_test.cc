// Training end to end on the CPU backend: the loss falls below the corpus's unigram
// entropy on real text, a resumed run is bit-identical to the uninterrupted one,
// checkpoints reject corruption, and the Hugging Face export round-trips.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "training/hf.h"
#include "training/probe_command.h"
#include "training/trainer.h"
#include "tests/synthetic_data.h"

namespace sinkscope {
namespace {

using ::testing::HasSubstr;
using ::testing::internal::CaptureStderr;
using ::testing::internal::CaptureStdout;
using ::testing::internal::GetCapturedStderr;
using ::testing::internal::GetCapturedStdout;

TrainerOptions SmallOptions(VScaleMode mode) {
  TrainerOptions o;
  o.model.layers = 2;
  o.model.d_model = 64;
  o.model.heads = 4;
  o.model.kv_heads = 2;
  o.model.head_dim = 16;
  o.model.ffn = 160;
  o.model.vocab = kByteVocab;
  o.model.context = 64;
  o.model.vscale = mode;
  o.optimizer.lr = 3e-3;
  o.optimizer.min_lr = 3e-4;
  o.optimizer.warmup_steps = 10;
  o.optimizer.total_steps = 150;
  o.micro_batch = 8;
  o.grad_accum = 2;
  o.seed = 5;
  return o;
}

const DataSplits& Fortunes() {
  static DataSplits* data = [] {
    DataSpec spec;
    spec.text.paths = {"/usr/share/games/fortunes"};
    auto d = LoadData(spec);
    return d.ok() ? new DataSplits(std::move(*d)) : nullptr;
  }();
  if (data == nullptr) {
    ADD_FAILURE() << "/usr/share/games/fortunes is missing: run scripts/setup.sh";
    static DataSplits empty;
    return empty;
  }
  return *data;
}

TEST(TrainerTest, ValidationLossFallsWellBelowUnigramEntropyOnFortunes) {
  const DataSplits& data = Fortunes();
  auto backend = MakeCpuBackend();
  for (VScaleMode mode : {VScaleMode::kNone, VScaleMode::kVScale}) {
    TrainerOptions o = SmallOptions(mode);
    o.optimizer.lr = 5e-3;
    o.optimizer.min_lr = 5e-4;
    o.optimizer.total_steps = 300;
    o.grad_accum = 1;
    o.micro_batch = 16;
    auto t = Trainer::Create(o, &data, backend.get());
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    (*t)->Initialize();
    const double initial = (*t)->Evaluate();
    for (int i = 0; i < 300; ++i) ASSERT_TRUE((*t)->Step().finite);
    const double final_val = (*t)->Evaluate();
    const double unigram = UnigramEntropy(data.val.tokens());
    EXPECT_NEAR(initial, std::log(kByteVocab), 0.1);  // uniform predictions at init
    // "Well below": at least 0.5 nats/token under the best context-free model.
    EXPECT_LT(final_val, unigram - 0.5) << VScaleModeName(mode) << ": unigram " << unigram;
    std::printf("%s: validation loss %.4f -> %.4f, unigram entropy %.4f\n", VScaleModeName(mode), initial, final_val,
                unigram);
  }
}

TEST(TrainerTest, ResumeReproducesTheUninterruptedRunBitForBit) {
  const DataSplits data = Synthetic(20000);
  auto backend = MakeCpuBackend();
  for (VScaleMode mode : {VScaleMode::kNone, VScaleMode::kVScale, VScaleMode::kBackwardOnly}) {
    TrainerOptions o = SmallOptions(mode);
    o.model.vocab = 64;
    o.model.context = 32;
    o.optimizer.total_steps = 12;
    auto straight = Trainer::Create(o, &data, backend.get());
    ASSERT_TRUE(straight.ok());
    (*straight)->Initialize();
    for (int i = 0; i < 12; ++i) (*straight)->Step();

    const std::string path = ::testing::TempDir() + "/resume_" + VScaleModeName(mode) + ".ckpt";
    auto first = Trainer::Create(o, &data, backend.get());
    (*first)->Initialize();
    for (int i = 0; i < 5; ++i) (*first)->Step();
    ASSERT_TRUE((*first)->SaveCheckpoint(path).ok());
    first->reset();  // the process that trained the first half is gone

    auto second = Trainer::Create(o, &data, backend.get());
    ASSERT_TRUE((*second)->Resume(path).ok());
    EXPECT_EQ((*second)->step(), 5);
    for (int i = 0; i < 7; ++i) (*second)->Step();
    const auto a = (*straight)->model().ParamsToHost();
    const auto b = (*second)->model().ParamsToHost();
    ASSERT_EQ(a.size(), b.size());
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << VScaleModeName(mode);
  }
}

TEST(TrainerTest, CheckpointRejectsCorruptionTruncationAndAnotherModel) {
  const DataSplits data = Synthetic(5000);
  auto backend = MakeCpuBackend();
  TrainerOptions o = SmallOptions(VScaleMode::kVScale);
  o.model.vocab = 64;
  o.model.context = 16;
  auto t = Trainer::Create(o, &data, backend.get());
  (*t)->Initialize();
  (*t)->Step();
  const std::string path = ::testing::TempDir() + "/corrupt.ckpt";
  ASSERT_TRUE((*t)->SaveCheckpoint(path).ok());
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  {  // one flipped byte in the weights
    std::string flipped = bytes;
    flipped[flipped.size() / 2] ^= 0x40;
    std::ofstream(path, std::ios::binary) << flipped;
    auto s = (*t)->Resume(path);
    EXPECT_THAT(s.message(), HasSubstr(path));
    EXPECT_THAT(s.message(), HasSubstr("checksum mismatch"));
  }
  {  // truncated
    std::ofstream(path, std::ios::binary) << bytes.substr(0, bytes.size() / 3);
    auto s = (*t)->Resume(path);
    EXPECT_FALSE(s.ok());
    EXPECT_THAT(s.message(), HasSubstr(path));
  }
  {  // a checkpoint of another model shape
    std::ofstream(path, std::ios::binary) << bytes;
    TrainerOptions other = o;
    other.model.layers = 3;
    auto u = Trainer::Create(other, &data, backend.get());
    auto s = (*u)->Resume(path);
    EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
    EXPECT_THAT(s.message(), HasSubstr("differs from the run's"));
  }
  EXPECT_THAT((*t)->Resume("/nonexistent/x.ckpt").message(), HasSubstr("/nonexistent/x.ckpt: no such file"));
}

TEST(TrainerTest, HuggingFaceExportRoundTripsWithTheta) {
  const DataSplits data = Synthetic(5000);
  auto backend = MakeCpuBackend();
  TrainerOptions o = SmallOptions(VScaleMode::kVScale);
  o.model.vocab = 64;
  o.model.context = 16;
  auto t = Trainer::Create(o, &data, backend.get());
  (*t)->Initialize();
  for (int i = 0; i < 3; ++i) (*t)->Step();
  const std::string dir = ::testing::TempDir() + "/hf_export";
  ASSERT_TRUE(ExportHf((*t)->model(), dir).ok());
  auto file = ReadSafetensors(dir + "/model.safetensors");
  ASSERT_TRUE(file.ok());
  ASSERT_TRUE(file->tensors.count("model.layers.1.self_attn.vscale_theta"));
  EXPECT_EQ(file->tensors.at("model.layers.0.self_attn.q_proj.weight").shape, (std::vector<int64_t>{64, 64}));
  EXPECT_EQ(file->tensors.at("model.layers.0.self_attn.k_proj.weight").shape, (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(file->tensors.at("lm_head.weight").shape, (std::vector<int64_t>{64, 64}));
  auto loaded = LoadHfModel(dir, backend.get());
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  EXPECT_EQ((*loaded)->config().vscale, VScaleMode::kVScale);
  EXPECT_EQ((*loaded)->ParamsToHost(), (*t)->model().ParamsToHost());
}

TEST(TrainerTest, NonFiniteLossMakesNoUpdate) {
  const DataSplits data = Synthetic(5000);
  auto backend = MakeCpuBackend();
  TrainerOptions o = SmallOptions(VScaleMode::kNone);
  o.model.vocab = 64;
  o.model.context = 16;
  auto t = Trainer::Create(o, &data, backend.get());
  (*t)->Initialize();
  std::vector<float> params = (*t)->model().ParamsToHost();
  params[(*t)->model().FindTensor("model.norm.weight")->offset] = NAN;
  (*t)->model().ParamsFromHost(params);
  const StepStats s = (*t)->Step();
  EXPECT_FALSE(s.finite);
  EXPECT_EQ((*t)->step(), 0);  // nothing counted, data position unchanged
}

// sinkscope-probe (and `sinkscope probe`) with `args`: exit code, stdout, stderr.
struct CommandResult {
  int code;
  std::string out, err;
};
CommandResult RunProbe(std::vector<std::string> args) {
  args.insert(args.begin(), "sinkscope-probe");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  CaptureStdout();
  CaptureStderr();
  const int code = RunProbeCommand(static_cast<int>(argv.size()), argv.data());
  std::fflush(stdout);
  CommandResult r{code, GetCapturedStdout(), GetCapturedStderr()};
  return r;
}

// A byte-level model trained 3 steps, its checkpoint, its Hugging Face export and a text.
struct ProbeFixture {
  std::string checkpoint, hf, text;
};
const ProbeFixture& ProbeFiles() {
  static const ProbeFixture* f = [] {
    static const DataSplits data = Synthetic(5000);
    static auto backend = MakeCpuBackend();
    TrainerOptions o = SmallOptions(VScaleMode::kVScale);
    o.model.context = 16;
    auto t = Trainer::Create(o, &data, backend.get());
    (*t)->Initialize();
    for (int i = 0; i < 3; ++i) (*t)->Step();
    auto* p = new ProbeFixture;
    const std::string stem = ::testing::TempDir() + "/probe_cmd_" + std::to_string(::getpid());  // ctest -j
    p->checkpoint = stem + ".ckpt";
    p->hf = stem + "_hf";
    p->text = stem + ".txt";
    EXPECT_TRUE((*t)->SaveCheckpoint(p->checkpoint).ok());
    EXPECT_TRUE(ExportHf((*t)->model(), p->hf).ok());
    std::ofstream(p->text) << "the first token takes the attention that the others do not want\n%\n"
                              "and the gradient follows it there, step after step, layer after layer\n";
    return p;
  }();
  return *f;
}

TEST(ProbeCommandTest, ReportsTheCheckpointsStep) {
  const ProbeFixture& f = ProbeFiles();
  CommandResult r = RunProbe({f.checkpoint, "--text", f.text, "--batch", "2", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["step"], 3);
  r = RunProbe({f.checkpoint, "--text", f.text, "--batch", "2"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("probe at step 3:"));
  r = RunProbe({f.hf, "--text", f.text, "--batch", "2", "--json"});  // a Hugging Face folder stores no step
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["step"], 0);
}

TEST(ProbeCommandTest, UnknownOptionsAndBadValuesAreUsageErrors) {
  const ProbeFixture& f = ProbeFiles();
  CommandResult r = RunProbe({f.checkpoint, "--bogus"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("not expected: --bogus"));
  r = RunProbe({f.checkpoint, "--text", f.text, "--batch"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("--batch: 1 required INT missing"));
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"--batch", "abc"},
      {"--batch", "0"},
      {"--batch", "-3"},
      {"--batch", "2x"},
      {"--seq", "0"},
      {"--seq", "1e3"},
      {"--s", "-1"},
      {"--s", "one"},
      {"--ref-span", "3.5"},
      {"--ref-span", ""},
      {"--profile-len", "99999999999"},
      {"--t-eps", "abc"},
      {"--eps", "abc"},
      {"--eps", "nan"},
      {"--eps", "0.3x"},
  };
  for (const auto& [option, value] : bad) {
    r = RunProbe({f.checkpoint, "--text", f.text, option, value});
    EXPECT_EQ(r.code, 2) << option << " " << value;
    EXPECT_THAT(r.err, HasSubstr(option + ": must be a")) << value;
    EXPECT_THAT(r.err, HasSubstr("'" + value + "'")) << option;
    EXPECT_EQ(r.out, "");
  }
}

}  // namespace
}  // namespace sinkscope

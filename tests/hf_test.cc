// Hugging Face config.json and weight folders read as Hugging Face reads them: RoPE base
// and scaling in either generation of the format (rope_theta / rope_scaling and
// rope_parameters), sharded safetensors with their index, and every refusal naming the
// key and its value.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <map>
#include <random>
#include <tuple>

#include "engine/bf16.h"
#include "engine/probes.h"
#include "training/hf.h"

namespace sinkscope {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class HfTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("sinkscope_hf_test_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A small Llama config; `extra` is merged over it (a null value removes the key).
  static nlohmann::json Base() {
    return {{"model_type", "llama"},     {"vocab_size", 64},          {"hidden_size", 32},
            {"intermediate_size", 48},   {"num_hidden_layers", 2},    {"num_attention_heads", 4},
            {"num_key_value_heads", 2},  {"head_dim", 8},             {"max_position_embeddings", 16},
            {"rms_norm_eps", 1e-5},      {"hidden_act", "silu"},      {"tie_word_embeddings", false}};
  }
  StatusOr<ModelConfig> Read(const nlohmann::json& config) {
    const std::string path = (dir_ / "config.json").string();
    std::ofstream(path) << config.dump(1);
    return ReadHfConfig(path);
  }
  // The mean loss of a model built from `config` with weights of `seed` on 16 fixed tokens
  // (NaN, and a failure, when the config does not read).
  double LossOf(const nlohmann::json& config, uint64_t seed, int mul, int add) {
    auto c = Read(config);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    if (!c.ok()) return NAN;
    auto m = Model::Create(*c, backend_.get());
    EXPECT_TRUE(m.ok());
    if (!m.ok()) return NAN;
    (*m)->InitWeights(seed);
    std::vector<int32_t> tokens(16), targets(16);
    for (int t = 0; t < 16; ++t) tokens[t] = (t * mul) % 64, targets[t] = (t * add + 1) % 64;
    return (*m)->Evaluate(tokens.data(), targets.data(), 1, 16);
  }
  std::string ReadError(const nlohmann::json& config) {
    auto c = Read(config);
    EXPECT_FALSE(c.ok()) << config.dump();
    return c.ok() ? "" : c.status().message();
  }

  fs::path dir_;
  std::unique_ptr<Backend> backend_ = MakeCpuBackend();
};

// Independent float64 references of Hugging Face's inverse frequencies
// (modeling_rope_utils), written per channel pair from the formulas.
std::vector<double> DefaultInvFreq(double base, int dim) {
  std::vector<double> f;
  for (int i = 0; i < dim; i += 2) f.push_back(1.0 / std::pow(base, static_cast<double>(i) / dim));
  return f;
}

std::vector<double> Llama3InvFreq(double base, int dim, double factor, double low, double high, double old_len) {
  std::vector<double> out;
  for (double f : DefaultInvFreq(base, dim)) {
    const double wavelen = 2 * M_PI / f;
    double g = wavelen > old_len / low ? f / factor : f;  // low frequencies: interpolated
    const bool medium = !(wavelen < old_len / high) && !(wavelen > old_len / low);
    if (medium) {
      const double smooth = (old_len / wavelen - low) / (high - low);
      g = (1 - smooth) * g / factor + smooth * g;
    }
    out.push_back(g);
  }
  return out;
}

std::vector<double> YarnInvFreq(double base, int dim, double factor, double original, double beta_fast,
                                double beta_slow) {
  auto dim_of = [&](double rot) { return dim * std::log(original / (rot * 2 * M_PI)) / (2 * std::log(base)); };
  double lo = std::max(std::floor(dim_of(beta_fast)), 0.0), hi = std::min(std::ceil(dim_of(beta_slow)), dim - 1.0);
  if (lo == hi) hi += 0.001;
  std::vector<double> out;
  for (int i = 0; i < dim / 2; ++i) {
    const double pos = std::pow(base, 2.0 * i / dim);
    const double ramp = std::min(std::max((i - lo) / (hi - lo), 0.0), 1.0);
    const double keep = 1 - ramp;  // extrapolation weight
    out.push_back(1.0 / (factor * pos) * (1 - keep) + 1.0 / pos * keep);
  }
  return out;
}

void ExpectFrequencies(const RotaryFrequencies& got, const std::vector<double>& want) {
  ASSERT_EQ(got.inv_freq.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_NEAR(got.inv_freq[i], want[i], 1e-12 * std::abs(want[i])) << "pair " << i;
  }
}

TEST_F(HfTest, RopeThetaFromEitherPlace) {
  nlohmann::json top = Base();
  top["rope_theta"] = 500000.0;
  auto a = Read(top);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_DOUBLE_EQ(a->rope_theta, 500000.0);

  // Transformers 5: the base only inside rope_parameters. It used to be read as 10000.
  nlohmann::json v5 = Base();
  v5["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 500000.0}};
  auto b = Read(v5);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_DOUBLE_EQ(b->rope_theta, 500000.0);
  EXPECT_EQ(b->rope_scaling.type, RopeType::kDefault);
  ExpectFrequencies(b->Rotary(), DefaultInvFreq(500000.0, 8));

  // Neither given: LlamaConfig's default base.
  auto c = Read(Base());
  ASSERT_TRUE(c.ok());
  EXPECT_DOUBLE_EQ(c->rope_theta, 10000.0);
  // The harmless default scaling, in either spelling, is accepted.
  for (const char* key : {"rope_type", "type"}) {
    nlohmann::json d = Base();
    d["rope_scaling"] = {{key, "default"}};
    auto r = Read(d);
    ASSERT_TRUE(r.ok()) << key << ": " << r.status().ToString();
    EXPECT_EQ(r->rope_scaling.type, RopeType::kDefault);
  }
}

TEST_F(HfTest, TheSameBaseGivesTheSameModelWhereverItIsWritten) {
  nlohmann::json top = Base(), v5 = Base();
  top["rope_theta"] = 123456.0;
  v5["rope_parameters"] = {{"rope_theta", 123456.0}};
  std::vector<double> losses;
  for (const auto& config : {top, v5, Base()}) losses.push_back(LossOf(config, 3, 7, 5));
  EXPECT_EQ(losses[0], losses[1]);  // bit-identical
  EXPECT_NE(losses[0], losses[2]);  // and the base matters: 10000 differs
}

TEST_F(HfTest, RopeScalingTypesMatchHuggingFaceFormulas) {
  {  // linear
    nlohmann::json j = Base();
    j["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}};
    auto c = Read(j);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    std::vector<double> want = DefaultInvFreq(10000.0, 8);
    for (double& f : want) f /= 4.0;
    ExpectFrequencies(c->Rotary(), want);
    EXPECT_EQ(c->Rotary().attention_factor, 1.0);
  }
  // One head of 128 channels and a long context: every band of the scalings occurs.
  auto one_long_head = [](double rope_theta) {
    nlohmann::json j = Base();
    j["hidden_size"] = 128;
    j["num_attention_heads"] = 1;
    j["num_key_value_heads"] = 1;
    j["head_dim"] = 128;
    j["max_position_embeddings"] = 131072;
    j["rope_theta"] = rope_theta;
    return j;
  };
  {  // llama3, Llama-3.1-8B's values
    nlohmann::json j = one_long_head(500000.0);
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", 8.0},
                         {"low_freq_factor", 1.0},
                         {"high_freq_factor", 4.0},
                         {"original_max_position_embeddings", 8192}};
    auto c = Read(j);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    const std::vector<double> want = Llama3InvFreq(500000.0, 128, 8.0, 1.0, 4.0, 8192);
    ExpectFrequencies(c->Rotary(), want);
    // All three bands are exercised: kept, interpolated, and smoothed between.
    const std::vector<double> plain = DefaultInvFreq(500000.0, 128);
    int kept = 0, divided = 0, smoothed = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      kept += want[i] == plain[i];
      divided += std::abs(want[i] - plain[i] / 8) < 1e-18;
      smoothed += want[i] != plain[i] && std::abs(want[i] - plain[i] / 8) >= 1e-18;
    }
    EXPECT_GT(kept, 0);
    EXPECT_GT(divided, 0);
    EXPECT_GT(smoothed, 0);
  }
  {  // yarn as Qwen's model cards set it, Transformers 5's reading (explicit factor wins)
    nlohmann::json j = one_long_head(1000000.0);
    j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 32768}};
    auto c = Read(j);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    ExpectFrequencies(c->Rotary(), YarnInvFreq(1000000.0, 128, 4.0, 32768, 32, 1));
    EXPECT_NEAR(c->Rotary().attention_factor, 0.1 * std::log(4.0) + 1.0, 1e-15);
    // The factor, when left out, is the post-YaRN over the pre-YaRN context.
    j["rope_scaling"].erase("factor");
    auto d = Read(j);
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    EXPECT_DOUBLE_EQ(d->rope_scaling.factor, 4.0);
    // An explicit attention factor is used as given.
    j["rope_scaling"]["attention_factor"] = 1.5;
    auto e = Read(j);
    ASSERT_TRUE(e.ok());
    EXPECT_EQ(e->Rotary().attention_factor, 1.5);
  }
}

TEST_F(HfTest, ScaledRopeChangesTheModelAsItsFrequenciesSay) {
  // Linear scaling by 2 at position t is default RoPE at position t/2: a model with
  // linear factor 2 must differ from the default one, and two configs that give the
  // same frequencies must agree bit for bit.
  nlohmann::json linear = Base(), v5 = Base();
  linear["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2.0}};
  v5["rope_parameters"] = {{"rope_type", "linear"}, {"factor", 2.0}, {"rope_theta", 10000.0}};
  std::vector<double> losses;
  for (const auto& config : {linear, v5, Base()}) losses.push_back(LossOf(config, 9, 11, 3));
  EXPECT_EQ(losses[0], losses[1]);
  EXPECT_NE(losses[0], losses[2]);
}

TEST_F(HfTest, RefusalsNameTheKeyAndItsValue) {
  auto with = [](const char* key, nlohmann::json value) {
    nlohmann::json j = Base();
    j[key] = std::move(value);
    return j;
  };
  EXPECT_THAT(ReadError(with("rope_scaling", {{"rope_type", "dynamic"}, {"factor", 2.0}})),
              HasSubstr("rope_scaling.rope_type = \"dynamic\" is not supported"));
  EXPECT_THAT(ReadError(with("rope_scaling", {{"rope_type", "linear"}, {"factor", 2.0}, {"fudge", 1}})),
              HasSubstr("rope_scaling.fudge = 1 is not supported"));
  EXPECT_THAT(ReadError(with("rope_scaling", {{"rope_type", "linear"}})),
              HasSubstr("rope_scaling.factor is required for rope_type \"linear\""));
  EXPECT_THAT(ReadError(with("rope_scaling", {{"rope_type", "llama3"},
                                                   {"factor", 8.0},
                                                   {"low_freq_factor", 1.0},
                                                   {"original_max_position_embeddings", 8192}})),
              HasSubstr("rope_scaling.high_freq_factor is required for rope_type \"llama3\""));
  EXPECT_THAT(ReadError(with("rope_scaling", {{"rope_type", "yarn"}, {"factor", 2.0}, {"low_freq_factor", 1.0}})),
              HasSubstr("rope_scaling.low_freq_factor = 1.0 does not apply to rope_type \"yarn\""));
  EXPECT_THAT(ReadError(with("rope_scaling", {{"rope_type", "linear"}, {"factor", "two"}})),
              HasSubstr("rope_scaling.factor must be a number, got \"two\""));
  EXPECT_THAT(ReadError(with("rope_scaling", "yes")), HasSubstr("rope_scaling must be an object, got \"yes\""));
  // Per-layer-type tables (Gemma-style) are refused, not half read.
  EXPECT_THAT(ReadError(with("rope_parameters", {{"full_attention", {{"rope_theta", 1e6}}}})),
              HasSubstr("rope_parameters.full_attention = "));
  nlohmann::json both = with("rope_theta", 10000.0);
  both["rope_parameters"] = {{"rope_theta", 500000.0}};
  EXPECT_THAT(ReadError(both), HasSubstr("rope_theta 10000.0 and rope_parameters.rope_theta 500000.0 disagree"));
  nlohmann::json twice = with("rope_scaling", {{"rope_type", "default"}});
  twice["rope_parameters"] = {{"rope_theta", 10000.0}};
  EXPECT_THAT(ReadError(twice), HasSubstr("rope_scaling and rope_parameters are both given"));
  EXPECT_THAT(ReadError(with("partial_rotary_factor", 0.5)), HasSubstr("partial_rotary_factor = 0.5 is not supported"));
  EXPECT_THAT(ReadError(with("attention_bias", true)), HasSubstr("attention_bias = true is not supported"));
  EXPECT_THAT(ReadError(with("hidden_act", "gelu")), HasSubstr("hidden_act \"gelu\" is not supported"));
  EXPECT_THAT(ReadError(with("model_type", "gemma")), HasSubstr("model_type \"gemma\" is not supported"));
  EXPECT_THAT(ReadError(with("rope_theta", "big")), HasSubstr("rope_theta must be a number, got \"big\""));
  EXPECT_THAT(ReadError(with("head_dim", 7.5)), HasSubstr("head_dim must be an integer, got 7.5"));
  // Nulls are Hugging Face's "not set": defaults apply.
  nlohmann::json nulls = Base();
  nulls["rope_scaling"] = nullptr;
  nulls["head_dim"] = nullptr;
  nulls["num_key_value_heads"] = nullptr;
  auto c = Read(nulls);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->head_dim, 8);
  EXPECT_EQ(c->kv_heads, 4);
}

TEST_F(HfTest, ExportedScalingReadsBack) {
  nlohmann::json j = Base();
  j["max_position_embeddings"] = 64;
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 16},
                       {"beta_fast", 16.0}};
  auto c = Read(j);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto backend = MakeCpuBackend();
  auto m = Model::Create(*c, backend.get());
  ASSERT_TRUE(m.ok());
  (*m)->InitWeights(1);
  ASSERT_TRUE(ExportHf(**m, (dir_ / "out").string()).ok());
  auto back = ReadHfConfig((dir_ / "out" / "config.json").string());
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_TRUE(back->rope_scaling == c->rope_scaling);
}

// Splits an exported model.safetensors into shards with an index, as large models ship.
void Shard(const fs::path& dir, int shards, bool drop_one) {
  auto file = ReadSafetensors((dir / "model.safetensors").string());
  ASSERT_TRUE(file.ok());
  std::vector<std::vector<TensorToWrite>> parts(shards);
  std::vector<std::vector<std::vector<float>>> keep(shards);
  nlohmann::json map = nlohmann::json::object();
  int i = 0;
  for (const auto& [name, t] : file->tensors) {
    if (drop_one && name == "model.norm.weight") continue;
    const int s = i++ % shards;
    keep[s].emplace_back(t.values.begin(), t.values.end());
  }
  i = 0;
  for (const auto& [name, t] : file->tensors) {
    if (drop_one && name == "model.norm.weight") continue;
    const int s = i % shards;
    const size_t k = parts[s].size();
    parts[s].push_back({name, t.shape, keep[s][k].data()});
    char shard_name[64];
    std::snprintf(shard_name, sizeof shard_name, "model-%05d-of-%05d.safetensors", s + 1, shards);
    map[name] = shard_name;
    ++i;
  }
  for (int s = 0; s < shards; ++s) {
    char shard_name[64];
    std::snprintf(shard_name, sizeof shard_name, "model-%05d-of-%05d.safetensors", s + 1, shards);
    ASSERT_TRUE(WriteSafetensors((dir / shard_name).string(), parts[s], {{"format", "pt"}}).ok());
  }
  std::ofstream(dir / "model.safetensors.index.json") << nlohmann::json{{"metadata", {}}, {"weight_map", map}}.dump();
  fs::remove(dir / "model.safetensors");
}

TEST_F(HfTest, ShardedFolderLoadsTheSameWeights) {
  auto c = Read(Base());
  ASSERT_TRUE(c.ok());
  auto backend = MakeCpuBackend();
  auto m = Model::Create(*c, backend.get());
  ASSERT_TRUE(m.ok());
  (*m)->InitWeights(4);
  const fs::path out = dir_ / "sharded";
  ASSERT_TRUE(ExportHf(**m, out.string()).ok());
  Shard(out, 3, /*drop_one=*/false);
  ASSERT_FALSE(fs::exists(out / "model.safetensors"));
  auto loaded = LoadHfModel(out.string(), backend.get());
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  EXPECT_EQ((*loaded)->ParamsToHost(), (*m)->ParamsToHost());

  // A tensor the index does not list is named, with the index.
  const fs::path partial = dir_ / "partial";
  ASSERT_TRUE(ExportHf(**m, partial.string()).ok());
  Shard(partial, 2, /*drop_one=*/true);
  auto missing = LoadHfModel(partial.string(), backend.get());
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.status().message(), HasSubstr("model.safetensors.index.json: weights lack tensor model.norm.weight"));

  // An index naming a file outside the folder, or a shard that is not there.
  std::ofstream(partial / "model.safetensors.index.json")
      << R"({"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}})";
  auto outside = LoadHfModel(partial.string(), backend.get());
  ASSERT_FALSE(outside.ok());
  EXPECT_THAT(outside.status().message(), HasSubstr("weight_map.model.norm.weight names \"../elsewhere.safetensors\""));
  std::ofstream(partial / "model.safetensors.index.json")
      << R"({"weight_map": {"model.norm.weight": "model-00009-of-00009.safetensors"}})";
  auto absent = LoadHfModel(partial.string(), backend.get());
  ASSERT_FALSE(absent.ok());
  EXPECT_THAT(absent.status().message(), HasSubstr("model-00009-of-00009.safetensors"));
}

// --- the architectures of the paper's Figure 1, against a float64 reference --------------

// An independent float64 forward of a Hugging Face decoder (LlamaForCausalLM and its
// Mistral, Qwen2 and Qwen3 variants as their modelling code writes it), reading weights by
// their Hugging Face names: mean token cross-entropy of one sequence.
// x̃ (the attention input) of one layer, token and channel moved by `delta`, for finite
// differences of the loss at x̃.
// Where: x̃ (the attention input), h_in (the residual stream entering the block; layer L
// is the stream entering the final norm, i.e. the last block's h_out), h_half (after the
// attention residual add), x̃_mlp (the MLP input).
struct Nudge {
  int layer = -1, token = 0, channel = 0;
  double delta = 0;
  enum Where { kXn, kHIn, kHHalf, kXm } where = kXn;
};

// One layer's forward activations of the last Loss call, [token][channel].
struct ReferenceActs {
  std::vector<std::vector<double>> h_in, h_half, h_out, r_attn, r_mlp, v;
};

class ReferenceDecoder {
 public:
  ReferenceDecoder(const Model& m) : c_(m.config()), host_(m.ParamsToHost()), model_(m) {}

  // The attention weights of the last Loss call: [layer][head][t · T + u].
  mutable std::vector<std::vector<std::vector<double>>> attention;
  // Its activations per layer.
  mutable std::vector<ReferenceActs> acts;

  double Loss(const std::vector<int32_t>& tokens, const std::vector<int32_t>& targets) const {
    return Loss(tokens, targets, Nudge{});
  }
  double Loss(const std::vector<int32_t>& tokens, const std::vector<int32_t>& targets, Nudge nudge) const {
    const int T = static_cast<int>(tokens.size()), d = c_.d_model, H = c_.heads, KV = c_.kv_heads, dh = c_.head_dim;
    const RotaryFrequencies rope = c_.Rotary();
    std::vector<std::vector<double>> h(T);
    for (int t = 0; t < T; ++t) h[t] = Row("model.embed_tokens.weight", tokens[t]);
    acts.assign(c_.layers, ReferenceActs{});
    auto nudged = [&](Nudge::Where w, int l, int t) { return nudge.where == w && nudge.layer == l && nudge.token == t; };
    for (int l = 0; l < c_.layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      for (int t = 0; t < T; ++t) {
        if (nudged(Nudge::kHIn, l, t)) h[t][nudge.channel] += nudge.delta;
      }
      ReferenceActs& ra = acts[l];
      ra.h_in = h;
      ra.h_half.resize(T);
      ra.h_out.resize(T);
      ra.r_attn.resize(T);
      ra.r_mlp.resize(T);
      std::vector<std::vector<double>> q(T), k(T), v(T);
      attention.resize(c_.layers);
      attention[l].assign(H, std::vector<double>(static_cast<size_t>(T) * T, 0.0));
      for (int t = 0; t < T; ++t) {
        std::vector<double> x = Norm(h[t], Vec(p + "input_layernorm.weight"));
        if (nudged(Nudge::kXn, l, t)) x[nudge.channel] += nudge.delta;
        q[t] = Linear(p + "self_attn.q_proj", x, c_.attention_bias);
        k[t] = Linear(p + "self_attn.k_proj", x, c_.attention_bias);
        v[t] = Linear(p + "self_attn.v_proj", x, c_.attention_bias);
        for (auto [vec, heads, norm] : {std::tuple{&q[t], H, "q_norm"}, std::tuple{&k[t], KV, "k_norm"}}) {
          for (int g = 0; g < heads; ++g) {
            std::vector<double> head(vec->begin() + g * dh, vec->begin() + (g + 1) * dh);
            if (c_.qk_norm) head = Norm(head, Vec(p + "self_attn." + norm + ".weight"));
            for (int i = 0; i < dh / 2; ++i) {  // rotate_half
              const double a = t * rope.inv_freq[i], cs = std::cos(a) * rope.attention_factor,
                           sn = std::sin(a) * rope.attention_factor;
              const double x1 = head[i], x2 = head[i + dh / 2];
              head[i] = x1 * cs - x2 * sn;
              head[i + dh / 2] = x2 * cs + x1 * sn;
            }
            std::copy(head.begin(), head.end(), vec->begin() + g * dh);
          }
        }
      }
      for (int t = 0; t < T; ++t) {
        std::vector<double> y(H * dh, 0.0);
        for (int hh = 0; hh < H; ++hh) {
          const int g = hh / (H / KV);
          std::vector<double> score(t + 1);
          double mx = -INFINITY;
          for (int u = 0; u <= t; ++u) {
            double dot = 0;
            for (int i = 0; i < dh; ++i) dot += q[t][hh * dh + i] * k[u][g * dh + i];
            score[u] = dot / std::sqrt(static_cast<double>(dh));
            mx = std::max(mx, score[u]);
          }
          double z = 0;
          for (double& sc : score) z += (sc = std::exp(sc - mx));
          for (int u = 0; u <= t; ++u) {
            attention[l][hh][static_cast<size_t>(t) * T + u] = score[u] / z;
            for (int i = 0; i < dh; ++i) y[hh * dh + i] += score[u] / z * v[u][g * dh + i];
          }
        }
        const std::vector<double> o = Linear(p + "self_attn.o_proj", y, false);
        for (int i = 0; i < d; ++i) h[t][i] += o[i];
        if (nudged(Nudge::kHHalf, l, t)) h[t][nudge.channel] += nudge.delta;
        std::vector<double> x2 = Norm(h[t], Vec(p + "post_attention_layernorm.weight"));
        if (nudged(Nudge::kXm, l, t)) x2[nudge.channel] += nudge.delta;
        std::vector<double> gate = Linear(p + "mlp.gate_proj", x2, false), up = Linear(p + "mlp.up_proj", x2, false);
        for (size_t i = 0; i < gate.size(); ++i) gate[i] = gate[i] / (1 + std::exp(-gate[i])) * up[i];
        const std::vector<double> mlp = Linear(p + "mlp.down_proj", gate, false);
        ra.r_attn[t] = o;
        ra.h_half[t] = h[t];
        ra.r_mlp[t] = mlp;
        for (int i = 0; i < d; ++i) h[t][i] += mlp[i];
        ra.h_out[t] = h[t];
      }
      ra.v = v;
    }
    for (int t = 0; t < T; ++t) {
      if (nudged(Nudge::kHIn, c_.layers, t)) h[t][nudge.channel] += nudge.delta;
    }
    double loss = 0;
    const std::string head = c_.tied_embeddings ? "model.embed_tokens" : "lm_head";
    for (int t = 0; t < T; ++t) {
      const std::vector<double> logits = Linear(head, Norm(h[t], Vec("model.norm.weight")), false);
      double mx = -INFINITY, z = 0;
      for (double x : logits) mx = std::max(mx, x);
      for (double x : logits) z += std::exp(x - mx);
      loss += std::log(z) + mx - logits[targets[t]];
    }
    return loss / T;
  }

 private:
  std::vector<double> Vec(const std::string& name) const {
    const ParamTensor* t = model_.FindTensor(name);
    EXPECT_NE(t, nullptr) << name;
    return t ? std::vector<double>(host_.begin() + t->offset, host_.begin() + t->offset + t->size)
             : std::vector<double>();
  }
  std::vector<double> Row(const std::string& name, int r) const {
    const ParamTensor* t = model_.FindTensor(name);
    const size_t cols = t->shape[1];
    return std::vector<double>(host_.begin() + t->offset + r * cols, host_.begin() + t->offset + (r + 1) * cols);
  }
  std::vector<double> Linear(const std::string& prefix, const std::vector<double>& x, bool bias) const {
    const ParamTensor* w = model_.FindTensor(prefix + ".weight");
    const size_t out = w->shape[0], in = w->shape[1];
    std::vector<double> y(out, 0.0), b = bias ? Vec(prefix + ".bias") : std::vector<double>(out, 0.0);
    for (size_t o = 0; o < out; ++o) {
      double s = b[o];
      for (size_t i = 0; i < in; ++i) s += host_[w->offset + o * in + i] * x[i];
      y[o] = s;
    }
    return y;
  }
  std::vector<double> Norm(const std::vector<double>& x, const std::vector<double>& gamma) const {
    double ms = 0;
    for (double v : x) ms += v * v / x.size();
    const double r = 1 / std::sqrt(ms + c_.rms_eps);
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * r * gamma[i];
    return y;
  }

  ModelConfig c_;
  std::vector<float> host_;
  const Model& model_;
};

struct ArchitectureCase {
  const char* name;
  nlohmann::json overrides;
  bool attention_bias, qk_norm;
};

// Every METRICS.md quantity of a one-sequence probe report against the float64
// reference (the quantities N_t at x̃, R_GS and α_0 are checked by the callers):
// gradient profiles at h_in, h_half, x̃_mlp and h_out and the reshaping ratios of eq. (4)
// from central differences of the reference's loss at those sites; the token-wise norms
// of h_in, h_half, h_out, r_attn, r_mlp, v, v̂ and their token-0 ratios; M_0, S_0, the
// sink rates; the massive activations of h_out. ≤ 1e-4 relative (1e-8 absolute near 0).
// `loss` is the reference's loss with a nudge; `attention` [layer][head][t·T+u] and `acts`
// are those of its pass without one.
using ReferenceAttention = std::vector<std::vector<std::vector<double>>>;
void ExpectEveryProbeMatches(const std::string& name, const ModelConfig& c, const std::function<double(Nudge)>& loss,
                             const ReferenceAttention& attention, const std::vector<ReferenceActs>& acts, int T,
                             const ProbeSettings& st, const ProbeReport& report) {
  const int d = c.d_model, P = st.profile_len;
  auto near = [](double got, double want) { return std::abs(got - want) <= 1e-4 * std::abs(want) + 1e-8; };
  auto norm = [](const std::vector<double>& x) {
    double s = 0;
    for (double v : x) s += v * v;
    return std::sqrt(s);
  };
  // ∂L/∂(site) [token][channel] by central differences.
  auto grad = [&](int l, Nudge::Where where) {
    std::vector<std::vector<double>> g(T, std::vector<double>(d));
    for (int t = 0; t < T; ++t) {
      for (int i = 0; i < d; ++i) {
        const double h = 1e-5;
        const double up = loss(Nudge{l, t, i, h, where});
        const double down = loss(Nudge{l, t, i, -h, where});
        g[t][i] = (up - down) / (2 * h);
      }
    }
    return g;
  };
  std::vector<std::vector<double>> g_in_next = grad(0, Nudge::kHIn);
  for (int l = 0; l < c.layers; ++l) {
    const LayerProbe& lp = report.layers[l];
    const std::string at = name + " layer " + std::to_string(l) + " ";
    const auto g_in = g_in_next, g_xn = grad(l, Nudge::kXn), g_half = grad(l, Nudge::kHHalf),
               g_xm = grad(l, Nudge::kXm);
    g_in_next = grad(l + 1, Nudge::kHIn);  // ∂L/∂h_out of this layer
    const auto& g_out = g_in_next;
    for (int t = 0; t < P; ++t) {
      const std::string tt = "t=" + std::to_string(t);
      std::vector<double> attn_g3(d), mlp_g3(d);
      for (int i = 0; i < d; ++i) {
        attn_g3[i] = g_in[t][i] - g_half[t][i];
        mlp_g3[i] = g_half[t][i] - g_out[t][i];
      }
      const std::pair<const char*, double> sites[] = {
          {"h_in", norm(g_in[t])}, {"h_half", norm(g_half[t])}, {"xm", norm(g_xm[t])}, {"h_out", norm(g_out[t])}};
      for (const auto& [site, want] : sites) {
        EXPECT_PRED2(near, lp.grad_profile.at(site)[t], want) << at << "N_t at " << site << " " << tt;
      }
      EXPECT_PRED2(near, lp.attn_bloat[t], norm(g_xn[t]) / norm(g_half[t])) << at << "attention Bloat " << tt;
      EXPECT_PRED2(near, lp.attn_change[t], norm(g_in[t]) / norm(g_half[t])) << at << "attention Change " << tt;
      EXPECT_PRED2(near, lp.attn_compress[t], norm(attn_g3) / norm(g_xn[t])) << at << "attention Compress " << tt;
      EXPECT_PRED2(near, lp.mlp_bloat[t], norm(g_xm[t]) / norm(g_out[t])) << at << "MLP Bloat " << tt;
      EXPECT_PRED2(near, lp.mlp_change[t], norm(g_half[t]) / norm(g_out[t])) << at << "MLP Change " << tt;
      EXPECT_PRED2(near, lp.mlp_compress[t], norm(mlp_g3) / norm(g_xm[t])) << at << "MLP Compress " << tt;
    }
    // Forward norms and their token-0 ratios (tokens 1…15 other than s = 0).
    const ReferenceActs& ra = acts[l];
    auto kv_mean = [&](const std::vector<double>& v) {
      double s = 0;
      for (int g = 0; g < c.kv_heads; ++g) {
        s += norm(std::vector<double>(v.begin() + g * c.head_dim, v.begin() + (g + 1) * c.head_dim));
      }
      return s / c.kv_heads;
    };
    const std::pair<const char*, const std::vector<std::vector<double>>*> fwd[] = {
        {"h_in", &ra.h_in}, {"h_half", &ra.h_half}, {"h_out", &ra.h_out}, {"r_attn", &ra.r_attn},
        {"r_mlp", &ra.r_mlp}, {"v", &ra.v}, {"vh", &ra.v}};  // baseline: v̂ = v
    for (const auto& [key, rows] : fwd) {
      std::vector<double> want(P);
      for (int t = 0; t < P; ++t) {
        want[t] = std::string(key) == "v" || std::string(key) == "vh" ? kv_mean((*rows)[t]) : norm((*rows)[t]);
        EXPECT_PRED2(near, lp.norms.at(key)[t], want[t]) << at << "‖" << key << "‖ t=" << t;
      }
      double rest = 0;
      const int last = std::min(15, P - 1);
      for (int t = 1; t <= last; ++t) rest += want[t];
      EXPECT_PRED2(near, lp.norm_ratio.at(key), want[0] / (rest / last)) << at << key << " token-0 ratio";
    }
    // Column 0 of every head: mass, second moment, sink rates (α_0 > ε).
    int sinks = 0;
    for (int h = 0; h < c.heads; ++h) {
      double mass = 0, sq = 0, alpha = 0;
      for (int t = 0; t < T; ++t) {
        const double a = attention[l][h][static_cast<size_t>(t) * T];
        mass += a;
        sq += a * a;
        if (t < std::min(st.t_eps, T)) alpha += a / std::min(st.t_eps, T);
      }
      EXPECT_PRED2(near, lp.column_mass[h], mass) << at << "M_0 head " << h;
      EXPECT_PRED2(near, lp.column_second_moment[h], sq) << at << "S_0 head " << h;
      EXPECT_EQ(lp.per_sample_sink_fraction[h], alpha > st.eps ? 1.0 : 0.0) << at << "head " << h;
      sinks += alpha > st.eps;
    }
    EXPECT_DOUBLE_EQ(lp.sink_rate, static_cast<double>(sinks) / c.heads) << at << "sink rate";
    EXPECT_DOUBLE_EQ(lp.sink_rate_per_sample, static_cast<double>(sinks) / c.heads) << at << "per-sample sink rate";
    // Massive activations: |h_out| over (t, channel): top 3, top-1's place, lower median.
    std::vector<std::tuple<double, int, int>> all;
    for (int t = 0; t < T; ++t) {
      for (int i = 0; i < d; ++i) all.emplace_back(std::abs(ra.h_out[t][i]), t, i);
    }
    std::sort(all.begin(), all.end(), [](const auto& x, const auto& y) { return std::get<0>(x) > std::get<0>(y); });
    for (int k = 0; k < 3; ++k) EXPECT_PRED2(near, lp.massive.top3[k], std::get<0>(all[k])) << at << "top-" << k + 1;
    EXPECT_EQ(lp.massive.top1_token, std::get<1>(all[0])) << at;
    EXPECT_EQ(lp.massive.top1_channel, std::get<2>(all[0])) << at;
    std::vector<double> values;
    for (const auto& e : all) values.push_back(std::get<0>(e));
    std::sort(values.begin(), values.end());
    const double median = values[(values.size() - 1) / 2];
    EXPECT_PRED2(near, lp.massive.median, median) << at << "median |h_out|";
    EXPECT_PRED2(near, lp.massive.top1_over_median, std::get<0>(all[0]) / median) << at << "top-1 / median";
  }
}

class ArchitectureTest : public HfTest, public ::testing::WithParamInterface<ArchitectureCase> {};

TEST_P(ArchitectureTest, ReadsLoadsAndMatchesTheFloat64Reference) {
  const ArchitectureCase& a = GetParam();
  nlohmann::json j = Base();
  for (auto it = a.overrides.begin(); it != a.overrides.end(); ++it) {
    if (it.value().is_null()) {
      j.erase(it.key());
    } else {
      j[it.key()] = it.value();
    }
  }
  auto c = Read(j);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->attention_bias, a.attention_bias);
  EXPECT_EQ(c->qk_norm, a.qk_norm);
  auto backend = MakeCpuBackend();
  auto m = Model::Create(*c, backend.get());
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  (*m)->InitWeights(21);
  std::vector<float> p = (*m)->ParamsToHost();
  std::mt19937 rng(5);
  std::normal_distribution<float> noise(0.0f, 0.3f);
  for (const ParamTensor& t : (*m)->tensors()) {  // biases and gains away from 0 and 1
    if (t.name.find("vscale_theta") != std::string::npos) continue;  // baseline: θ is not exported
    if (t.shape.size() == 1) {
      for (size_t i = 0; i < t.size; ++i) p[t.offset + i] += noise(rng);
    } else {
      for (size_t i = 0; i < t.size; ++i) p[t.offset + i] *= 10;  // 0.2 std: a loss that responds
    }
  }
  (*m)->ParamsFromHost(p);
  // Hugging Face's names round-trip: export, then load the folder as a user would.
  const fs::path out = dir_ / a.name;
  ASSERT_TRUE(ExportHf(**m, out.string()).ok());
  auto loaded = LoadHfModel(out.string(), backend.get());
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  EXPECT_EQ((*loaded)->ParamsToHost(), p);
  const int T = std::min(12, c->context);
  std::vector<int32_t> tokens(T), targets(T);
  for (int t = 0; t < T; ++t) tokens[t] = (t * 13 + 5) % 64, targets[t] = (t * 7 + 3) % 64;
  const double engine = (*loaded)->Evaluate(tokens.data(), targets.data(), 1, T);
  const ReferenceDecoder ref(**loaded);
  const double reference = ref.Loss(tokens, targets);
  EXPECT_NEAR(engine, reference, 1e-5 * std::abs(reference)) << a.name;

  // The probes of this architecture against the float64 reference: N_t at x̃ (the
  // gradient by central differences of the reference's loss), R_GS(0; T_e) from them, and
  // α_0 from the reference's attention weights (METRICS.md, one sequence).
  ProbeSettings st;
  st.ref_span = 7;
  st.profile_len = T;
  st.t_eps = T;
  auto probed = LoadHfModel(out.string(), backend_.get(), ModelOptions{.training = false});
  ASSERT_TRUE(probed.ok());
  auto report = RunDiagnosticPass(**probed, st, tokens.data(), targets.data(), 1, T);
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  EXPECT_NEAR(report->loss, reference, 1e-5 * std::abs(reference));
  ref.Loss(tokens, targets);
  const auto attention = ref.attention;
  for (int l = 0; l < c->layers; ++l) {
    std::vector<double> norms(T);
    for (int t = 0; t < T; ++t) {
      double sq = 0;
      for (int i = 0; i < c->d_model; ++i) {
        const double h = 1e-5;
        const double up = ref.Loss(tokens, targets, Nudge{l, t, i, h});
        const double down = ref.Loss(tokens, targets, Nudge{l, t, i, -h});
        sq += std::pow((up - down) / (2 * h), 2);
      }
      norms[t] = std::sqrt(sq);
      const double got = report->layers[l].grad_profile.at("xn")[t];
      EXPECT_NEAR(got, norms[t], 1e-4 * norms[t] + 1e-8) << a.name << " layer " << l << " N_" << t << " at x̃";
    }
    double rest = 0;
    for (int t = 1; t <= st.ref_span; ++t) rest += norms[t];
    const double r_gs = norms[0] / (rest / st.ref_span);
    EXPECT_NEAR(report->layers[l].r_gs, r_gs, 1e-4 * r_gs) << a.name << " layer " << l << " R_GS";
    for (int h = 0; h < c->heads; ++h) {
      double alpha = 0;
      for (int t = 0; t < T; ++t) alpha += attention[l][h][static_cast<size_t>(t) * T] / T;
      EXPECT_NEAR(report->layers[l].alpha[h], alpha, 1e-5) << a.name << " layer " << l << " head " << h;
    }
  }
  ref.Loss(tokens, targets);
  ExpectEveryProbeMatches(
      a.name, *c, [&](Nudge n) { return ref.Loss(tokens, targets, n); }, ref.attention, ref.acts, T, st, *report);
}

INSTANTIATE_TEST_SUITE_P(
    Figure1, ArchitectureTest,
    ::testing::Values(
        ArchitectureCase{"llama31", {{"rope_theta", 500000.0}, {"max_position_embeddings", 64},
                                     {"rope_scaling", {{"rope_type", "llama3"}, {"factor", 8.0},
                                                       {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                                                       {"original_max_position_embeddings", 8}}}},
                         false, false},
        ArchitectureCase{"qwen2", {{"model_type", "qwen2"}, {"rope_theta", 1000000.0}}, true, false},
        ArchitectureCase{"qwen3", {{"model_type", "qwen3"}, {"head_dim", 12}, {"tie_word_embeddings", true}}, false,
                         true},
        ArchitectureCase{"mistral", {{"model_type", "mistral"}, {"sliding_window", 12}, {"max_position_embeddings", 64}},
                         false, false}),
    [](const auto& info) { return std::string(info.param.name); });

TEST_F(HfTest, ArchitectureSpecificRules) {
  // Mistral: probes stay within the sliding window (model.context is the window).
  nlohmann::json mistral = Base();
  mistral["model_type"] = "mistral";
  mistral["max_position_embeddings"] = 32768;
  mistral["sliding_window"] = 4096;
  auto m = Read(mistral);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->context, 4096);
  mistral["sliding_window"] = nullptr;  // no window
  EXPECT_EQ(Read(mistral)->context, 32768);
  // Qwen3's head_dim defaults to 128 (its config class), not d_model / heads.
  nlohmann::json qwen3 = Base();
  qwen3["model_type"] = "qwen3";
  qwen3.erase("head_dim");
  qwen3["hidden_size"] = 256;
  qwen3["num_attention_heads"] = 4;
  qwen3["num_key_value_heads"] = 2;
  EXPECT_EQ(Read(qwen3)->head_dim, 128);
  // What the engine cannot do is refused by name.
  nlohmann::json q = Base();
  q["model_type"] = "qwen2";
  q["use_sliding_window"] = true;
  EXPECT_THAT(ReadError(q), HasSubstr("use_sliding_window = true is not supported"));
  q = Base();
  q["model_type"] = "qwen3";
  q["attention_bias"] = true;  // Qwen3 would put a bias on o_proj too
  EXPECT_THAT(ReadError(q), HasSubstr("attention_bias = true is not supported"));
  q = Base();
  q["layer_types"] = {"full_attention", "sliding_attention"};
  EXPECT_THAT(ReadError(q), HasSubstr("layer_types holds \"sliding_attention\""));
  q = Base();
  q["model_type"] = "glm4";
  EXPECT_THAT(ReadError(q), HasSubstr("model_type \"glm4\" is not supported: GLM-4-0414's blocks add "
                                      "post_self_attn_layernorm and post_mlp_layernorm"));
  q = Base();
  q["model_type"] = "gemma";
  EXPECT_THAT(ReadError(q), HasSubstr("model_type \"gemma\" is not supported (llama, mistral, qwen2, qwen3, glm)"));
  q = Base();
  q["partial_rotary_factor"] = 0.5;  // only GLM rotates part of each head
  EXPECT_THAT(ReadError(q), HasSubstr("partial_rotary_factor = 0.5 is not supported for model_type llama"));
  // GLM's defaults: half of each head rotated, q/k/v biases, head_dim 128.
  q = Base();
  q["model_type"] = "glm";
  q.erase("head_dim");
  q["hidden_size"] = 512;
  auto g = Read(q);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(g->head_dim, 128);
  EXPECT_EQ(g->rotary_dim, 64);
  EXPECT_TRUE(g->attention_bias);
  q["partial_rotary_factor"] = 0.3;  // 38.4 → 38 channels: even, accepted as Hugging Face truncates
  EXPECT_EQ(Read(q)->rotary_dim, 38);
  q["partial_rotary_factor"] = 0.31;  // 39.68 → 39: odd
  EXPECT_THAT(ReadError(q), HasSubstr("gives 39 rotated channels of head_dim 128; RoPE needs an even number"));
}

// GLM (model_type glm, GLM-4-9B's) written in its own layout — a fused gate_up_proj and
// RoPE on interleaved pairs of the first half of each head — by this test, and a float64
// forward written from Hugging Face's modeling_glm (not from the engine) on those tensors:
// the engine, which holds q and k permuted, gives the same loss.
TEST_F(HfTest, GlmInItsOwnLayoutMatchesAFloat64ReferenceOfItsFormulas) {
  const int L = 2, d = 32, H = 4, KV = 2, dh = 8, F = 48, V = 64, rd = 4;
  nlohmann::json config = {{"model_type", "glm"}, {"vocab_size", V}, {"hidden_size", d}, {"intermediate_size", F},
                           {"num_hidden_layers", L}, {"num_attention_heads", H}, {"num_key_value_heads", KV},
                           {"head_dim", dh}, {"max_position_embeddings", 64}, {"partial_rotary_factor", 0.5},
                           {"rope_theta", 10000.0}, {"rms_norm_eps", 1e-5}, {"attention_bias", true},
                           {"hidden_act", "silu"}, {"tie_word_embeddings", false},
                           {"eos_token_id", {3, 4}}};
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>> w;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float scale, float offset) {
    size_t n = 1;
    for (int64_t x : shape) n *= static_cast<size_t>(x);
    std::vector<float> v(n);
    for (float& x : v) x = offset + scale * normal(rng);
    w[name] = {shape, v};
  };
  add("model.embed_tokens.weight", {V, d}, 0.5f, 0);
  for (int l = 0; l < L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {d}, 0.2f, 1);
    add(p + "self_attn.q_proj.weight", {H * dh, d}, 0.3f, 0);
    add(p + "self_attn.q_proj.bias", {H * dh}, 0.3f, 0);
    add(p + "self_attn.k_proj.weight", {KV * dh, d}, 0.3f, 0);
    add(p + "self_attn.k_proj.bias", {KV * dh}, 0.3f, 0);
    add(p + "self_attn.v_proj.weight", {KV * dh, d}, 0.3f, 0);
    add(p + "self_attn.v_proj.bias", {KV * dh}, 0.3f, 0);
    add(p + "self_attn.o_proj.weight", {d, H * dh}, 0.2f, 0);
    add(p + "post_attention_layernorm.weight", {d}, 0.2f, 1);
    add(p + "mlp.gate_up_proj.weight", {2 * F, d}, 0.2f, 0);
    add(p + "mlp.down_proj.weight", {d, F}, 0.2f, 0);
  }
  add("model.norm.weight", {d}, 0.2f, 1);
  add("lm_head.weight", {V, d}, 0.2f, 0);
  const fs::path folder = dir_ / "glm";
  fs::create_directories(folder);
  std::ofstream(folder / "config.json") << config.dump(1);
  std::vector<TensorToWrite> tensors;
  for (const auto& [name, t] : w) tensors.push_back({name, t.first, t.second.data()});
  ASSERT_TRUE(WriteSafetensors((folder / "model.safetensors").string(), tensors, {}).ok());

  auto model = LoadHfModel(folder.string(), backend_.get());
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  EXPECT_EQ((*model)->config().rotary_dim, rd);
  const int T = 12;
  std::vector<int32_t> tokens(T), targets(T);
  for (int t = 0; t < T; ++t) tokens[t] = (t * 13 + 5) % V, targets[t] = (t * 7 + 3) % V;
  const double engine = (*model)->Evaluate(tokens.data(), targets.data(), 1, T);

  // modeling_glm in float64: GlmRotaryEmbedding over dim = head_dim · 0.5, cos/sin of
  // each frequency repeated for an interleaved pair, rotate_half = (−x[2i+1], x[2i]).
  auto vec = [&](const std::string& n) { return std::vector<double>(w[n].second.begin(), w[n].second.end()); };
  auto linear = [&](const std::string& n, const std::vector<double>& x, bool bias) {
    const auto& [shape, v] = w[n + ".weight"];
    std::vector<double> y(shape[0], 0.0);
    for (int64_t o = 0; o < shape[0]; ++o) {
      double acc = bias ? w[n + ".bias"].second[o] : 0.0;
      for (int64_t i = 0; i < shape[1]; ++i) acc += static_cast<double>(v[o * shape[1] + i]) * x[i];
      y[o] = acc;
    }
    return y;
  };
  auto norm = [&](const std::vector<double>& x, const std::vector<double>& g) {
    double ms = 0;
    for (double v : x) ms += v * v / x.size();
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] / std::sqrt(ms + 1e-5) * g[i];
    return y;
  };
  using Attention = std::vector<std::vector<std::vector<double>>>;  // [layer][head][t · T + u]
  auto glm_loss = [&](Nudge nudge, Attention* attention, std::vector<ReferenceActs>* acts = nullptr) {
    if (attention != nullptr) attention->assign(L, std::vector<std::vector<double>>(H, std::vector<double>(T * T, 0.0)));
    if (acts != nullptr) acts->assign(L, ReferenceActs{});
    auto nudged = [&](Nudge::Where where, int l, int t) {
      return nudge.where == where && nudge.layer == l && nudge.token == t;
    };
    std::vector<std::vector<double>> h(T);
    for (int t = 0; t < T; ++t) h[t] = std::vector<double>(w["model.embed_tokens.weight"].second.begin() + tokens[t] * d,
                                                           w["model.embed_tokens.weight"].second.begin() + (tokens[t] + 1) * d);
    for (int l = 0; l < L; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      for (int t = 0; t < T; ++t) {
        if (nudged(Nudge::kHIn, l, t)) h[t][nudge.channel] += nudge.delta;
      }
      ReferenceActs ra;
      ra.h_in = h;
      ra.h_half.resize(T);
      ra.h_out.resize(T);
      ra.r_attn.resize(T);
      ra.r_mlp.resize(T);
      std::vector<std::vector<double>> q(T), k(T), v(T);
      for (int t = 0; t < T; ++t) {
        auto x = norm(h[t], vec(p + "input_layernorm.weight"));
        if (nudged(Nudge::kXn, l, t)) x[nudge.channel] += nudge.delta;
        q[t] = linear(p + "self_attn.q_proj", x, true);
        k[t] = linear(p + "self_attn.k_proj", x, true);
        v[t] = linear(p + "self_attn.v_proj", x, true);
        for (auto* y : {&q[t], &k[t]}) {
          for (size_t base = 0; base < y->size(); base += dh) {
            for (int i = 0; i < rd / 2; ++i) {
              const double freq = std::pow(10000.0, -2.0 * i / rd), c = std::cos(t * freq), s = std::sin(t * freq);
              const double a = (*y)[base + 2 * i], b = (*y)[base + 2 * i + 1];
              (*y)[base + 2 * i] = a * c - b * s;
              (*y)[base + 2 * i + 1] = b * c + a * s;
            }
          }
        }
      }
      for (int t = 0; t < T; ++t) {
        std::vector<double> att(H * dh, 0.0);
        for (int hh = 0; hh < H; ++hh) {
          const int g = hh / (H / KV);
          std::vector<double> sc(t + 1);
          double mx = -INFINITY, z = 0;
          for (int u = 0; u <= t; ++u) {
            double dot = 0;
            for (int i = 0; i < dh; ++i) dot += q[t][hh * dh + i] * k[u][g * dh + i];
            mx = std::max(mx, sc[u] = dot / std::sqrt(static_cast<double>(dh)));
          }
          for (double& x : sc) z += (x = std::exp(x - mx));
          for (int u = 0; u <= t; ++u) {
            if (attention != nullptr) (*attention)[l][hh][static_cast<size_t>(t) * T + u] = sc[u] / z;
            for (int i = 0; i < dh; ++i) att[hh * dh + i] += sc[u] / z * v[u][g * dh + i];
          }
        }
        const auto o = linear(p + "self_attn.o_proj", att, false);
        for (int i = 0; i < d; ++i) h[t][i] += o[i];
        if (nudged(Nudge::kHHalf, l, t)) h[t][nudge.channel] += nudge.delta;
        auto xm = norm(h[t], vec(p + "post_attention_layernorm.weight"));
        if (nudged(Nudge::kXm, l, t)) xm[nudge.channel] += nudge.delta;
        const auto gu = linear(p + "mlp.gate_up_proj", xm, false);
        std::vector<double> act(F);  // gate, up = chunk(2): up · silu(gate)
        for (int i = 0; i < F; ++i) act[i] = gu[F + i] * (gu[i] / (1 + std::exp(-gu[i])));
        const auto down = linear(p + "mlp.down_proj", act, false);
        ra.r_attn[t] = o;
        ra.h_half[t] = h[t];
        ra.r_mlp[t] = down;
        for (int i = 0; i < d; ++i) h[t][i] += down[i];
        ra.h_out[t] = h[t];
      }
      ra.v = v;
      if (acts != nullptr) (*acts)[l] = std::move(ra);
    }
    for (int t = 0; t < T; ++t) {
      if (nudged(Nudge::kHIn, L, t)) h[t][nudge.channel] += nudge.delta;
    }
    double loss = 0;
    for (int t = 0; t < T; ++t) {
      const auto logits = linear("lm_head", norm(h[t], vec("model.norm.weight")), false);
      double mx = -INFINITY, z = 0;
      for (double x : logits) mx = std::max(mx, x);
      for (double x : logits) z += std::exp(x - mx);
      loss += (std::log(z) + mx - logits[targets[t]]) / T;
    }
    return loss;
  };
  Attention attention;
  const double reference = glm_loss(Nudge{}, &attention);
  EXPECT_NEAR(engine, reference, 1e-5 * std::abs(reference));
  // The probing loader (tensors as stored, one shard at a time) lays GLM out the same way.
  auto probing = LoadHfModelForProbing(folder.string(), backend_.get());
  ASSERT_TRUE(probing.ok()) << probing.status().ToString();
  EXPECT_EQ((*probing)->Evaluate(tokens.data(), targets.data(), 1, T), engine);
  // GLM's probes against its float64 reference: N_t at x̃ by central differences, R_GS, α_0.
  ProbeSettings st;
  st.ref_span = 7;
  st.profile_len = T;
  st.t_eps = T;
  auto report = RunDiagnosticPass(**probing, st, tokens.data(), targets.data(), 1, T);
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  for (int l = 0; l < L; ++l) {
    std::vector<double> norms(T);
    for (int t = 0; t < T; ++t) {
      double sq = 0;
      for (int i = 0; i < d; ++i) {
        const double step = 1e-5;
        const double diff = glm_loss(Nudge{l, t, i, step}, nullptr) - glm_loss(Nudge{l, t, i, -step}, nullptr);
        sq += std::pow(diff / (2 * step), 2);
      }
      norms[t] = std::sqrt(sq);
      EXPECT_NEAR(report->layers[l].grad_profile.at("xn")[t], norms[t], 1e-4 * norms[t] + 1e-8) << "layer " << l << " t " << t;
    }
    double rest = 0;
    for (int t = 1; t <= st.ref_span; ++t) rest += norms[t];
    EXPECT_NEAR(report->layers[l].r_gs, norms[0] / (rest / st.ref_span), 1e-4 * norms[0] / (rest / st.ref_span));
    for (int hh = 0; hh < H; ++hh) {
      double alpha = 0;
      for (int t = 0; t < T; ++t) alpha += attention[l][hh][static_cast<size_t>(t) * T] / T;
      EXPECT_NEAR(report->layers[l].alpha[hh], alpha, 1e-5) << "layer " << l << " head " << hh;
    }
  }
  // Every other METRICS.md quantity of GLM against the same reference.
  std::vector<ReferenceActs> acts;
  glm_loss(Nudge{}, &attention, &acts);
  auto c = (*probing)->config();
  ExpectEveryProbeMatches(
      "glm", c, [&](Nudge n) { return glm_loss(n, nullptr); }, attention, acts, T, st, *report);
  // A partial-RoPE model is not exported as Llama.
  EXPECT_THAT(ExportHf(**model, (dir_ / "out").string()).message(), HasSubstr("(GLM's partial RoPE) is not exported"));
}

// A safetensors file of 16-bit tensors, written by hand (the project's writer writes F32).
void WriteHalfSafetensors(const fs::path& path, const std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>& w,
                          bool bf16) {
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  for (const auto& [name, t] : w) {
    const size_t begin = data.size();
    for (float x : t.second) {
      const uint16_t h = bf16 ? FloatToBf16Bits(x) : FloatToF16Bits(x);
      data.append(reinterpret_cast<const char*>(&h), 2);
    }
    header[name] = {{"dtype", bf16 ? "BF16" : "F16"}, {"shape", t.first}, {"data_offsets", {begin, data.size()}}};
  }
  std::string h = header.dump();
  while ((8 + h.size()) % 8 != 0) h.push_back(' ');
  const uint64_t n = h.size();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << h << data;
}

// A Qwen2-shaped model stored in bf16 and in f16: probing keeps its matrices in 16 bits
// (about half the memory) and its pass is the fp32 pass over the same values, bit for bit.
TEST_F(HfTest, SixteenBitWeightsStayInSixteenBitsAndProbeAsTheirFp32Values) {
  for (bool bf16 : {true, false}) {
    nlohmann::json config = Base();
    config["model_type"] = "qwen2";
    config["vocab_size"] = 96;
    config["num_hidden_layers"] = 12;  // enough blocks that the one block's fp32 scratch is small beside them
    auto c = Read(config);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    auto reference = Model::Create(*c, backend_.get());
    ASSERT_TRUE(reference.ok());
    (*reference)->InitWeights(3);
    std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>> w;
    const std::vector<float> p = (*reference)->ParamsToHost();
    std::mt19937 rng(9);
    std::normal_distribution<float> noise(0.0f, 0.2f);
    for (const ParamTensor& t : (*reference)->tensors()) {
      if (t.name.find("vscale_theta") != std::string::npos) continue;
      std::vector<float> v(p.begin() + t.offset, p.begin() + t.offset + t.size);
      for (float& x : v) x = t.shape.size() == 2 ? 10 * x : x + noise(rng);
      w[t.name] = {t.shape, v};
    }
    const fs::path folder = dir_ / (bf16 ? "bf16" : "f16");
    fs::create_directories(folder);
    std::ofstream(folder / "config.json") << config.dump(1);
    WriteHalfSafetensors(folder / "model.safetensors", w, bf16);

    auto held = LoadHfModelForProbing(folder.string(), backend_.get());
    ASSERT_TRUE(held.ok()) << held.status().ToString();
    EXPECT_EQ((*held)->matrices(), bf16 ? WeightDtype::kBF16 : WeightDtype::kF16);
    auto widened = LoadHfModel(folder.string(), backend_.get(), ModelOptions{.training = false});
    ASSERT_TRUE(widened.ok()) << widened.status().ToString();
    EXPECT_EQ((*held)->ParamsToHost(), (*widened)->ParamsToHost());
    EXPECT_LT((*held)->ParameterBytes(), 0.75 * (*widened)->ParameterBytes());
    const int B = 2, T = 12;
    std::vector<int32_t> tokens(B * T), targets(B * T);
    for (int i = 0; i < B * T; ++i) tokens[i] = (i * 17 + 3) % 96, targets[i] = (i * 5 + 1) % 96;
    ProbeSettings st;
    st.ref_span = 7;
    st.profile_len = 12;
    st.t_eps = 12;
    auto a = RunDiagnosticPass(**held, st, tokens.data(), targets.data(), B, T);
    auto b = RunDiagnosticPass(**widened, st, tokens.data(), targets.data(), B, T);
    ASSERT_TRUE(a.ok() && b.ok());
    // Recomputing each block in the backward (one block's activations) changes nothing.
    auto recomputing = LoadHfModelForProbing(folder.string(), backend_.get(), /*recompute_blocks=*/true);
    ASSERT_TRUE(recomputing.ok());
    auto r = RunDiagnosticPass(**recomputing, st, tokens.data(), targets.data(), B, T);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->loss, a->loss);
    for (size_t l = 0; l < a->layers.size(); ++l) {
      EXPECT_EQ(r->layers[l].r_gs, a->layers[l].r_gs) << "layer " << l;
      EXPECT_EQ(r->layers[l].grad_profile, a->layers[l].grad_profile) << "layer " << l;
      EXPECT_EQ(r->layers[l].alpha, a->layers[l].alpha);
      EXPECT_EQ(r->layers[l].norms, a->layers[l].norms);
    }
    EXPECT_EQ(a->loss, b->loss);
    EXPECT_EQ(a->r_gs_median, b->r_gs_median);
    for (size_t l = 0; l < b->layers.size(); ++l) {
      EXPECT_EQ(a->layers[l].r_gs, b->layers[l].r_gs);
      EXPECT_EQ(a->layers[l].alpha, b->layers[l].alpha);
      EXPECT_EQ(a->layers[l].grad_profile, b->layers[l].grad_profile);
      EXPECT_EQ(a->layers[l].norms, b->layers[l].norms);
    }
    // And in training: the same parameter gradients with the blocks recomputed.
    if (bf16) {
      auto plain = Model::Create(*c, backend_.get());
      auto again = Model::Create(*c, backend_.get(), ModelOptions{.recompute_blocks = true});
      ASSERT_TRUE(plain.ok() && again.ok());
      (*plain)->InitWeights(5);
      (*again)->InitWeights(5);
      const double la = (*plain)->ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T));
      const double lb = (*again)->ForwardBackward(tokens.data(), targets.data(), B, T, 1.0f / (B * T));
      EXPECT_EQ(la, lb);
      EXPECT_EQ((*plain)->GradsToHost(), (*again)->GradsToHost());
    }
    // The values are the file's, exactly: a bf16 value widens to itself.
    const ParamTensor* embed = (*held)->FindTensor("model.embed_tokens.weight");
    const std::vector<float> e = (*held)->TensorToHost(*embed);
    const float first = w["model.embed_tokens.weight"].second[0];
    EXPECT_EQ(e[0], bf16 ? RoundToBf16(first) : F16BitsToFloat(FloatToF16Bits(first)));
  }
}

// --- what a damaged or unusual folder used to get through without a word --------------

// Rewrites the JSON header of a safetensors file with `edit`, keeping its data section
// (followed by `extra` bytes).
void EditSafetensorsHeader(const fs::path& path, const std::function<void(nlohmann::json&)>& edit,
                           const std::string& extra = "") {
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  nlohmann::json header = nlohmann::json::parse(bytes.substr(8, n));
  const std::string data = bytes.substr(8 + n) + extra;
  edit(header);
  std::string h = header.dump();
  while ((8 + h.size()) % 8 != 0) h.push_back(' ');
  n = h.size();
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << h << data;
}

std::string Range(const nlohmann::json& header, const std::string& name) {
  const auto& o = header.at(name).at("data_offsets");
  return "[" + std::to_string(o[0].get<size_t>()) + ", " + std::to_string(o[1].get<size_t>()) + ")";
}

// The safetensors format's rule, as its reference implementation enforces it: the
// tensors' byte ranges tile the data section (no overlap, no gap, nothing after).
TEST_F(HfTest, SafetensorsRangesMustTileTheDataSection) {
  auto c = Read(Base());
  ASSERT_TRUE(c.ok());
  auto m = Model::Create(*c, backend_.get());
  ASSERT_TRUE(m.ok());
  (*m)->InitWeights(2);
  const fs::path good = dir_ / "good";
  ASSERT_TRUE(ExportHf(**m, good.string()).ok());
  ASSERT_TRUE(LoadHfModel(good.string(), backend_.get()).ok());
  nlohmann::json header;
  EditSafetensorsHeader(good / "model.safetensors", [&](nlohmann::json& h) { header = h; });
  const std::string k = "model.layers.0.self_attn.k_proj.weight", v = "model.layers.0.self_attn.v_proj.weight";
  auto variant = [&](const std::string& name, const std::function<void(nlohmann::json&)>& edit,
                     const std::string& extra = "") {
    const fs::path folder = dir_ / name;
    fs::copy(good, folder, fs::copy_options::recursive);
    EditSafetensorsHeader(folder / "model.safetensors", edit, extra);
    auto loaded = LoadHfModel(folder.string(), backend_.get());
    EXPECT_FALSE(loaded.ok()) << name;
    auto probing = LoadHfModelForProbing(folder.string(), backend_.get());
    EXPECT_FALSE(probing.ok()) << name;
    return loaded.ok() ? std::string() : (folder / "model.safetensors").string() + " | " + loaded.status().message();
  };
  // v_proj pointing at k_proj's bytes (both [kv_dim, d]): it used to load as a copy of k.
  std::string e = variant("overlap", [&](nlohmann::json& h) { h[v]["data_offsets"] = h[k]["data_offsets"]; });
  EXPECT_THAT(e, HasSubstr("model.safetensors: tensor " + v + "'s data_offsets " + Range(header, k) +
                           " overlap tensor " + k + "'s " + Range(header, k)));
  // A tensor dropped from the header leaves its bytes to no one.
  e = variant("gap", [&](nlohmann::json& h) { h.erase(v); });
  EXPECT_THAT(e, HasSubstr("bytes " + Range(header, v) + " of the data section belong to no tensor"));
  // Bytes after the last tensor.
  size_t data_len = 0;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() != "__metadata__") data_len = std::max(data_len, it.value()["data_offsets"][1].get<size_t>());
  }
  e = variant("trailing", [](nlohmann::json&) {}, std::string(8, '\0'));
  EXPECT_THAT(e, HasSubstr("the data section holds " + std::to_string(data_len + 8) + " bytes; the tensors cover [0, " +
                           std::to_string(data_len) + ")"));
  // An offset that is not a byte count.
  e = variant("text", [&](nlohmann::json& h) { h[v]["data_offsets"][0] = "zero"; });
  EXPECT_THAT(e, HasSubstr("tensor " + v + " has data_offsets [\"zero\","));
}

// A NaN or ±inf weight used to probe with exit 0 and print null for the loss: refused
// before the pass, naming the file, the tensor and the element, in fp32 and as held in
// 16 bits.
TEST_F(HfTest, NonFiniteWeightsAreRefusedNamingTheTensor) {
  auto c = Read(Base());
  ASSERT_TRUE(c.ok());
  auto m = Model::Create(*c, backend_.get());
  ASSERT_TRUE(m.ok());
  (*m)->InitWeights(6);
  for (const auto& [name, value, shown] : {std::tuple{"model.layers.1.mlp.up_proj.weight", NAN, "NaN"},
                                           std::tuple{"model.norm.weight", INFINITY, "+inf"}}) {
    std::vector<float> p = (*m)->ParamsToHost();
    const ParamTensor* t = (*m)->FindTensor(name);
    ASSERT_NE(t, nullptr);
    p[t->offset + 5] = value;
    (*m)->ParamsFromHost(p);
    const fs::path folder = dir_ / shown;
    ASSERT_TRUE(ExportHf(**m, folder.string()).ok());
    const std::string want = (folder / "model.safetensors").string() + ": tensor " + name + " holds " + shown +
                             " at element 5 of " + std::to_string(t->size);
    auto loaded = LoadHfModel(folder.string(), backend_.get());
    ASSERT_FALSE(loaded.ok());
    EXPECT_THAT(loaded.status().message(), HasSubstr(want));
    auto probing = LoadHfModelForProbing(folder.string(), backend_.get());
    ASSERT_FALSE(probing.ok());
    EXPECT_THAT(probing.status().message(), HasSubstr(want));
    (*m)->InitWeights(6);
  }
  for (bool bf16 : {true, false}) {  // kept in 16 bits: the stored bits are checked
    std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>> w;
    const std::vector<float> p = (*m)->ParamsToHost();
    for (const ParamTensor& t : (*m)->tensors()) {
      if (t.name.find("vscale_theta") != std::string::npos) continue;
      w[t.name] = {t.shape, std::vector<float>(p.begin() + t.offset, p.begin() + t.offset + t.size)};
    }
    w["model.layers.0.self_attn.o_proj.weight"].second[3] = -INFINITY;
    const fs::path folder = dir_ / (bf16 ? "bf16" : "f16");
    fs::create_directories(folder);
    std::ofstream(folder / "config.json") << Base().dump(1);
    WriteHalfSafetensors(folder / "model.safetensors", w, bf16);
    auto held = LoadHfModelForProbing(folder.string(), backend_.get());
    ASSERT_FALSE(held.ok());
    EXPECT_THAT(held.status().message(), HasSubstr("tensor model.layers.0.self_attn.o_proj.weight holds -inf at element 3"));
  }
}

// tie_word_embeddings: the head is the embedding (Transformers' tie_weights), so a
// different lm_head.weight in the file is ignored, and now said so.
TEST_F(HfTest, TiedEmbeddingsWarnOfAnLmHeadTheyIgnore) {
  nlohmann::json config = Base();
  config["tie_word_embeddings"] = true;
  auto c = Read(config);
  ASSERT_TRUE(c.ok());
  auto m = Model::Create(*c, backend_.get());
  ASSERT_TRUE(m.ok());
  (*m)->InitWeights(8);
  const fs::path tied = dir_ / "tied";
  ASSERT_TRUE(ExportHf(**m, tied.string()).ok());
  auto file = ReadSafetensors((tied / "model.safetensors").string());
  ASSERT_TRUE(file.ok());
  ASSERT_FALSE(file->tensors.count("lm_head.weight"));
  for (bool same : {true, false}) {
    std::vector<std::vector<float>> keep;
    keep.reserve(file->tensors.size() + 1);  // the tensors point into it
    std::vector<TensorToWrite> tensors;
    for (const auto& [name, t] : file->tensors) {
      keep.emplace_back(t.values.begin(), t.values.end());
      tensors.push_back({name, t.shape, keep.back().data()});
    }
    const HostTensor& embed = file->tensors.at("model.embed_tokens.weight");
    keep.emplace_back(embed.values.begin(), embed.values.end());
    if (!same) keep.back()[7] += 0.5f;
    tensors.push_back({"lm_head.weight", embed.shape, keep.back().data()});
    ASSERT_TRUE(WriteSafetensors((tied / "model.safetensors").string(), tensors, {}).ok());
    std::vector<std::string> warnings;
    auto loaded = LoadHfModel(tied.string(), backend_.get(), {}, &warnings);
    ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
    EXPECT_EQ((*loaded)->ParamsToHost(), (*m)->ParamsToHost());  // the head is the embedding either way
    if (same) {
      EXPECT_TRUE(warnings.empty()) << warnings[0];
    } else {
      ASSERT_EQ(warnings.size(), 1u);
      EXPECT_THAT(warnings[0], HasSubstr((tied / "model.safetensors").string() +
                                         ": tie_word_embeddings is true, so tensor lm_head.weight is ignored: it "
                                         "differs from model.embed_tokens.weight"));
    }
  }
}

// Configs that Hugging Face reads two ways, or that were read without a word: refused
// like rope_theta's two places, or read as Transformers 5 does with a warning; and the
// file's keys named in range errors.
TEST_F(HfTest, ConfigsReadTwoWaysAreRefusedOrSaid) {
  // No model_type: AutoConfig refuses it; it used to be read as llama.
  nlohmann::json j = Base();
  j.erase("model_type");
  EXPECT_THAT(ReadError(j), HasSubstr("config.json: model_type is missing (llama, mistral, qwen2, qwen3 or glm)"));
  j["model_type"] = nullptr;
  EXPECT_THAT(ReadError(j), HasSubstr("model_type is missing"));
  // GLM's partial_rotary_factor at the top and in rope_parameters: the same value reads,
  // two values are refused (it used to take the top level's).
  j = Base();
  j["model_type"] = "glm";
  j["partial_rotary_factor"] = 0.5;
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 10000.0}, {"partial_rotary_factor", 0.5}};
  auto g = Read(j);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(g->rotary_dim, 4);
  j["rope_parameters"]["partial_rotary_factor"] = 0.25;
  EXPECT_THAT(ReadError(j), HasSubstr("config.json: partial_rotary_factor 0.5 and "
                                      "rope_parameters.partial_rotary_factor 0.25 disagree"));
  j.erase("partial_rotary_factor");  // one place: read from there
  g = Read(j);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(g->rotary_dim, 2);
  // Range errors name the file's key and the value, not the engine's field.
  j = Base();
  j["rms_norm_eps"] = -1e-6;
  EXPECT_THAT(ReadError(j), HasSubstr("config.json: rms_norm_eps must be positive, got -1e-06"));
  j = Base();
  j["num_hidden_layers"] = 0;
  EXPECT_THAT(ReadError(j), HasSubstr("config.json: num_hidden_layers must be positive, got 0"));
  j = Base();
  j["max_position_embeddings"] = -4;
  EXPECT_THAT(ReadError(j), HasSubstr("config.json: max_position_embeddings must be positive, got -4"));
  // yarn's factor against max_position_embeddings / original_max_position_embeddings:
  // Transformers 5 reads the factor, 4.5x read the ratio. The factor, with a warning.
  const std::string path = (dir_ / "config.json").string();
  j = Base();
  j["max_position_embeddings"] = 64;
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 8.0}, {"original_max_position_embeddings", 16}};
  std::ofstream(path) << j.dump(1);
  auto yarn = ReadHfConfigAndType(path);
  ASSERT_TRUE(yarn.ok()) << yarn.status().ToString();
  EXPECT_EQ(yarn->config.rope_scaling.factor, 8.0);
  ASSERT_EQ(yarn->warnings.size(), 1u);
  EXPECT_THAT(yarn->warnings[0],
              HasSubstr(path + ": rope_scaling.factor = 8 differs from max_position_embeddings / "
                               "original_max_position_embeddings = 64 / 16 = 4; read as Transformers 5 reads it "
                               "(the factor, 8), where Transformers 4.5x used the ratio"));
  j["rope_scaling"]["factor"] = 4.0;  // agreeing, or either absent: nothing to say
  std::ofstream(path) << j.dump(1);
  EXPECT_TRUE(ReadHfConfigAndType(path)->warnings.empty());
  j["rope_scaling"].erase("original_max_position_embeddings");
  std::ofstream(path) << j.dump(1);
  EXPECT_TRUE(ReadHfConfigAndType(path)->warnings.empty());
  // Mistral's sliding window bounds the context, and says so.
  j = Base();
  j["model_type"] = "mistral";
  j["sliding_window"] = 8;
  std::ofstream(path) << j.dump(1);
  auto mistral = ReadHfConfigAndType(path);
  ASSERT_TRUE(mistral.ok());
  EXPECT_EQ(mistral->config.context, 8);
  EXPECT_THAT(mistral->context_limit, HasSubstr("Mistral's sliding_window in " + path));
  j["sliding_window"] = 4096;  // beyond max_position_embeddings: the context bounds it
  std::ofstream(path) << j.dump(1);
  EXPECT_EQ(ReadHfConfigAndType(path)->context_limit, "");
}

}  // namespace
}  // namespace sinkscope

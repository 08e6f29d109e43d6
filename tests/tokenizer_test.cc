// The byte-level BPE tokenizers on hand-made vocabularies, where every expected token is
// worked out by hand: merges by rank, leftmost on ties, the pre-tokenizer's pieces,
// ignore_merges, special tokens, NFC, invalid UTF-8, decode(encode(x)) = x, and every
// refusal with its message. (Parity with other implementations on real vocabularies and
// a megabyte of text: tests/integration/test_tokenizers.py.)
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "data/tokenizer.h"

namespace sinkscope {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Json = nlohmann::json;

// GPT-2's printable alphabet: byte b as a UTF-8 string.
std::string ByteChar(int b) {
  static std::vector<int> map = [] {
    std::vector<int> t(256);
    int next = 256;
    for (int c = 0; c < 256; ++c) {
      const bool printable = (c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF);
      t[c] = printable ? c : next++;
    }
    return t;
  }();
  const int cp = map[b];
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

std::string Alphabet(const std::string& bytes) {
  std::string s;
  for (unsigned char c : bytes) s += ByteChar(c);
  return s;
}

// A tokenizer.json: the 256 byte tokens (ids 0–255) and merges of `merges` ("a b" in
// raw text; the merged tokens get ids 256…), GPT-2's pre-tokenizer by default.
Json HfTokenizer(const std::vector<std::pair<std::string, std::string>>& merges) {
  Json vocab = Json::object();
  for (int b = 0; b < 256; ++b) vocab[ByteChar(b)] = b;
  Json m = Json::array();
  int next = 256;
  for (const auto& [a, b] : merges) {
    if (!vocab.contains(Alphabet(a + b))) vocab[Alphabet(a + b)] = next++;
    m.push_back(Alphabet(a) + " " + Alphabet(b));
  }
  return {{"version", "1.0"},
          {"normalizer", nullptr},
          {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", m}}},
          {"added_tokens", Json::array()}};
}

std::string Write(const std::string& name, const std::string& text) {
  const std::string path = ::testing::TempDir() + "/tok_" + std::to_string(::getpid()) + "_" + name;
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

std::unique_ptr<Tokenizer> Load(const Json& j, const std::string& name = "tokenizer.json") {
  auto t = Tokenizer::FromHuggingFace(Write(name, j.dump()));
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return t.ok() ? std::move(*t) : nullptr;
}

Status LoadError(const Json& j) {
  auto t = Tokenizer::FromHuggingFace(Write("bad.json", j.dump()));
  return t.ok() ? OkStatus() : t.status();
}

TEST(TokenizerTest, MergesApplyLowestRankFirstAndLeftmostOnTies) {
  // Ranks: "b c" 0, "a b" 1, "a bc" 2. "abc": (a,b) rank 1 and (b,c) rank 0 → b+c first,
  // then a+bc. "abab": (a,b) twice at rank 1 → the left one first, then the right.
  auto t = Load(HfTokenizer({{"b", "c"}, {"a", "b"}, {"a", "bc"}}));
  ASSERT_TRUE(t);
  EXPECT_THAT(t->Encode("abc"), ElementsAre(258));        // a + bc
  EXPECT_THAT(t->Encode("abab"), ElementsAre(257, 257));  // ab ab
  EXPECT_THAT(t->Encode("cab"), ElementsAre('c', 257));
  EXPECT_EQ(t->vocab_size(), 259);
  EXPECT_EQ(t->Decode({258, 257}), "abcab");
}

TEST(TokenizerTest, GptTwosPiecesAreMergedApart) {
  // " ab" is one piece (" ?\p{L}+"), "12" another; merges never cross pieces: "a" "1"
  // would merge if they met, but a letter run and a digit run are different pieces.
  auto t = Load(HfTokenizer({{"a", "1"}, {" ", "a"}, {" a", "b"}}));
  ASSERT_TRUE(t);
  EXPECT_THAT(t->Encode(" ab"), ElementsAre(258));
  EXPECT_THAT(t->Encode("a1"), ElementsAre('a', '1'));
  // Contractions and whitespace: "it's" → "it", "'s"; "  x" → " ", " x".
  EXPECT_THAT(t->Encode("it's"), ElementsAre('i', 't', '\'', 's'));
  EXPECT_EQ(t->Decode(t->Encode("  x\n\n\ty")), "  x\n\n\ty");
}

TEST(TokenizerTest, IgnoreMergesTakesAPieceThatIsATokenWhole) {
  // "abc" is in the vocabulary but no merge makes it from "ab" + "c": with ignore_merges
  // the piece is taken whole (Llama 3), without it the merges decide.
  Json j = HfTokenizer({{"a", "b"}});
  j["model"]["vocab"][Alphabet("abc")] = 300;
  EXPECT_THAT(Load(j)->Encode("abc"), ElementsAre(256, 'c'));
  j["model"]["ignore_merges"] = true;
  EXPECT_THAT(Load(j)->Encode("abc"), ElementsAre(300));
}

TEST(TokenizerTest, SpecialTokensOnlyWhenAskedAndBosFromThePostProcessor) {
  Json j = HfTokenizer({});
  j["added_tokens"] = Json::array({{{"id", 400}, {"content", "<|begin_of_text|>"}, {"special", true}},
                                   {{"id", 401}, {"content", "<|end_of_text|>"}, {"special", true}},
                                   {{"id", 402}, {"content", "<|end"}, {"special", true}}});
  j["post_processor"] = {{"type", "TemplateProcessing"},
                         {"single", Json::array({{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
                                                 {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})}};
  auto t = Load(j);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->bos(), 400);
  EXPECT_EQ(t->eos(), 401);
  EXPECT_EQ(t->vocab_size(), 403);
  // Longest special first; ordinary text when not asked.
  EXPECT_THAT(t->Encode("x<|end_of_text|>y", true), ElementsAre('x', 401, 'y'));
  EXPECT_THAT(t->Encode("x<|endy", true), ElementsAre('x', 402, 'y'));
  EXPECT_EQ(t->Encode("<|end_of_text|>", false).size(), 15u);
  EXPECT_EQ(t->Decode(t->Encode("a<|end_of_text|>b", true)), "a<|end_of_text|>b");
}

TEST(TokenizerTest, SplitThenByteLevelUsesTheSplitsRegex) {
  Json j = HfTokenizer({{"1", "2"}, {"12", "3"}});
  // Digits in threes (cl100k's \p{N}{1,3}) instead of GPT-2's runs.
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers", Json::array({{{"type", "Split"},
                                                        {"pattern", {{"Regex", "\\p{N}{1,3}|[^\\p{N}]+"}}},
                                                        {"behavior", "Isolated"},
                                                        {"invert", false}},
                                                       {{"type", "ByteLevel"}, {"add_prefix_space", false},
                                                        {"use_regex", false}}})}};
  auto t = Load(j);
  ASSERT_TRUE(t);
  EXPECT_THAT(t->Encode("123123"), ElementsAre(257, 257));
  EXPECT_THAT(t->Encode("1231"), ElementsAre(257, '1'));
}

TEST(TokenizerTest, NfcNormalisesDecomposedText) {
  Json j = HfTokenizer({{"\xC3", "\xA9"}});  // é precomposed: C3 A9
  j["normalizer"] = {{"type", "NFC"}};
  auto t = Load(j);
  ASSERT_TRUE(t);
  EXPECT_THAT(t->Encode("e\xCC\x81"), ElementsAre(256));  // e + U+0301 → é
}

TEST(TokenizerTest, InvalidUtf8AndEveryByteRoundTrip) {
  auto t = Load(HfTokenizer({{"a", "b"}, {" ", "ab"}}));
  ASSERT_TRUE(t);
  std::mt19937 rng(7);
  for (int trial = 0; trial < 50; ++trial) {
    std::string s(1 + rng() % 300, '\0');
    for (char& c : s) c = static_cast<char>(rng() % 256);
    if (trial % 2) s += " ab\xff\xfe ab\xc3";  // invalid sequences among valid text
    EXPECT_EQ(t->Decode(t->Encode(s)), s) << "trial " << trial;
  }
}

TEST(TokenizerTest, ParallelEncodingAndPackingPutEosBetweenDocuments) {
  Json j = HfTokenizer({{"a", "b"}});
  j["added_tokens"] = Json::array({{{"id", 300}, {"content", "<|endoftext|>"}, {"special", true}}});
  auto t = Load(j);
  ASSERT_TRUE(t);
  auto packed = PackDocuments({"ab", "x", "abab"}, *t, 2);
  ASSERT_TRUE(packed.ok());
  EXPECT_THAT(*packed, ElementsAre(256, 300, 'x', 300, 256, 256));
  auto no_eos = PackDocuments({"ab"}, *Load(HfTokenizer({})), 1);
  EXPECT_THAT(no_eos.status().message(), HasSubstr("no end-of-text token is known"));
}

TEST(TokenizerTest, Gpt2FilesAndTiktokenRanks) {
  // The same tiny vocabulary as GPT-2's two files and as tiktoken ranks.
  Json encoder = Json::object();
  for (int b = 0; b < 256; ++b) encoder[ByteChar(b)] = b;
  encoder[Alphabet("ab")] = 256;
  encoder["<|endoftext|>"] = 257;
  const std::string dir = ::testing::TempDir() + "/tok_gpt2_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/encoder.json") << encoder.dump();
  std::ofstream(dir + "/vocab.bpe") << "#version: 0.2\n" << Alphabet("a") << " " << Alphabet("b") << "\n";
  auto g = Tokenizer::Open(dir);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_THAT((*g)->Encode("abc"), ElementsAre(256, 'c'));
  EXPECT_EQ((*g)->eos(), 257);

  std::string lines = "! 0";
  static const char* b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  auto encode64 = [&](const std::string& in) {
    std::string out;
    int val = 0, bits = -6;
    for (unsigned char c : in) {
      val = (val << 8) + c;
      bits += 8;
      while (bits >= 0) {
        out.push_back(b64[(val >> bits) & 0x3F]);
        bits -= 6;
      }
    }
    if (bits > -6) out.push_back(b64[((val << 8) >> (bits + 8)) & 0x3F]);
    while (out.size() % 4) out.push_back('=');
    return out;
  };
  for (int b = 0; b < 256; ++b) lines += " " + encode64(std::string(1, static_cast<char>(b)));
  lines += "\n! 256 " + encode64("ab");
  Json ranks = {{"pat_str", "\\p{L}+|[^\\p{L}]+"}, {"special_tokens", {{"<|endoftext|>", 257}}}, {"bpe_ranks", lines}};
  auto k = Tokenizer::Open(Write("ranks.json", ranks.dump()));
  ASSERT_TRUE(k.ok()) << k.status().ToString();
  EXPECT_THAT((*k)->Encode("abc"), ElementsAre(256, 'c'));
  EXPECT_EQ((*k)->eos(), 257);
}

TEST(TokenizerTest, UnsupportedSettingsAreRefusedNamingTheKeyAndValue) {
  auto expect = [](Json j, const std::string& message) {
    const Status s = LoadError(j);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_THAT(s.message(), HasSubstr(message));
  };
  Json j = HfTokenizer({{"a", "b"}});
  Json bad = j;
  bad["model"]["type"] = "Unigram";
  expect(bad, "model.type = \"Unigram\" is not supported (byte-level BPE only)");
  bad = j;
  bad["model"]["byte_fallback"] = true;
  expect(bad, "model.byte_fallback = true is not supported");
  bad = j;
  bad["model"]["continuing_subword_prefix"] = "##";
  expect(bad, "model.continuing_subword_prefix = \"##\" is not supported");
  bad = j;
  bad["normalizer"] = {{"type", "Lowercase"}};
  expect(bad, "normalizer = {\"type\":\"Lowercase\"} is not supported (none or NFC)");
  bad = j;
  bad["pre_tokenizer"] = {{"type", "Whitespace"}};
  expect(bad, "pre_tokenizer.type = \"Whitespace\" is not supported");
  bad = j;
  bad["model"]["merges"].push_back(Alphabet("x") + " " + Alphabet("y"));
  expect(bad, "model.merges[1] = \"x y\" names a token model.vocab does not have");
  bad = j;
  bad["model"]["vocab"].erase(ByteChar(7));
  expect(bad, "the vocabulary has no token for byte 0x07 (not a byte-level BPE)");
  bad = j;
  bad["added_tokens"] = Json::array({{{"id", 300}, {"content", "<x>"}, {"lstrip", true}}});
  expect(bad, "added_tokens[0].lstrip = true is not supported");
  bad = j;
  bad["pre_tokenizer"] = {{"type", "Sequence"},
                          {"pretokenizers", Json::array({{{"type", "Split"},
                                                          {"pattern", {{"Regex", "(unclosed"}}},
                                                          {"behavior", "Isolated"}},
                                                         {{"type", "ByteLevel"}, {"use_regex", false}}})}};
  expect(bad, "the pre-tokenizer's regex does not compile at offset");
  EXPECT_THAT(Tokenizer::Open("/no/such/tokenizer").status().message(),
              HasSubstr("tokenizer /no/such/tokenizer: no such file or folder"));
  EXPECT_THAT(Tokenizer::FromHuggingFace(Write("notjson.json", "{")).status().message(), HasSubstr("not valid JSON"));
}

}  // namespace
}  // namespace sinkscope

#include "data/data.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

namespace sinkscope {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kFortunes[] = "/usr/share/games/fortunes";

// A fresh folder under the test temp dir, removed at the end of the test.
class TempDir {
 public:
  TempDir() {
    std::string templ = ::testing::TempDir() + "sinkscope_data_test_XXXXXX";
    char* made = ::mkdtemp(templ.data());
    EXPECT_NE(made, nullptr) << "mkdtemp " << templ;
    path_ = templ;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string Path(const std::string& name) const { return (fs::path(path_) / name).string(); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void WriteBytes(const std::string& path, const std::string& bytes) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// A raw shard: header (magic, version, count) then `payload` bytes.
std::string RawShard(int32_t magic, int32_t version, int32_t count, size_t payload_bytes) {
  std::vector<int32_t> header(256, 0);
  header[0] = magic;
  header[1] = version;
  header[2] = count;
  std::string bytes(reinterpret_cast<const char*>(header.data()), header.size() * sizeof(int32_t));
  bytes.append(payload_bytes, '\x01');
  return bytes;
}

int32_t HeaderInt(const std::string& bytes, int i) {
  int32_t v;
  std::memcpy(&v, bytes.data() + i * sizeof(int32_t), sizeof(v));
  return v;
}

// ---------------------------------------------------------------------------- shards

TEST(ShardTest, RoundTripUint16) {
  TempDir dir;
  const std::string path = dir.Path("a.bin");
  const std::vector<int32_t> tokens = {0, 1, 256, 50256, 65535, 7};
  ASSERT_TRUE(WriteShard(path, tokens).ok());
  const std::string bytes = ReadBytes(path);
  EXPECT_EQ(bytes.size(), 1024u + 2 * tokens.size());
  EXPECT_EQ(HeaderInt(bytes, 0), kShardMagicV1);
  EXPECT_EQ(HeaderInt(bytes, 1), 1);
  EXPECT_EQ(HeaderInt(bytes, 2), 6);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  auto read = ReadShard(path);
  ASSERT_TRUE(read.ok()) << read.status().ToString();
  EXPECT_EQ(*read, tokens);
}

TEST(ShardTest, RoundTripUint32) {
  TempDir dir;
  const std::string path = dir.Path("b.bin");
  const std::vector<int32_t> tokens = {0, 65536, 3, 2147483647, 100000};
  ASSERT_TRUE(WriteShard(path, tokens).ok());
  const std::string bytes = ReadBytes(path);
  EXPECT_EQ(bytes.size(), 1024u + 4 * tokens.size());
  EXPECT_EQ(HeaderInt(bytes, 0), kShardMagicV7);
  EXPECT_EQ(HeaderInt(bytes, 1), 7);
  EXPECT_EQ(HeaderInt(bytes, 2), 5);
  auto read = ReadShard(path);
  ASSERT_TRUE(read.ok()) << read.status().ToString();
  EXPECT_EQ(*read, tokens);
}

TEST(ShardTest, RoundTripEmptyAndOverwrite) {
  TempDir dir;
  const std::string path = dir.Path("c.bin");
  ASSERT_TRUE(WriteShard(path, {}).ok());
  auto read = ReadShard(path);
  ASSERT_TRUE(read.ok()) << read.status().ToString();
  EXPECT_TRUE(read->empty());
  ASSERT_TRUE(WriteShard(path, {4, 5}).ok());  // replaces the old file atomically
  read = ReadShard(path);
  ASSERT_TRUE(read.ok());
  EXPECT_THAT(*read, ElementsAre(4, 5));
}

TEST(ShardTest, WriteRejectsNegativeTokenAndMissingFolder) {
  TempDir dir;
  const std::string path = dir.Path("neg.bin");
  Status s = WriteShard(path, {1, -2});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr(path));
  EXPECT_THAT(s.message(), HasSubstr("token 1 is negative (-2)"));
  EXPECT_FALSE(fs::exists(path));

  const std::string nested = dir.Path("no/such/folder/x.bin");
  s = WriteShard(nested, {1});
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr(nested));
  EXPECT_THAT(s.message(), HasSubstr("no such file or directory"));
}

TEST(ShardTest, MissingFile) {
  TempDir dir;
  const std::string path = dir.Path("missing.bin");
  auto r = ReadShard(path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("shard " + path));
  EXPECT_THAT(r.status().message(), HasSubstr("no such file or directory"));
}

TEST(ShardTest, DirectoryIsNotAShard) {
  TempDir dir;
  auto r = ReadShard(dir.path());
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr(dir.path()));
  EXPECT_THAT(r.status().message(), HasSubstr("is a directory"));
}

TEST(ShardTest, TruncatedHeader) {
  TempDir dir;
  const std::string path = dir.Path("short.bin");
  WriteBytes(path, RawShard(kShardMagicV1, 1, 0, 0).substr(0, 100));
  auto r = ReadShard(path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
  EXPECT_THAT(r.status().message(), HasSubstr("shard " + path));
  EXPECT_THAT(r.status().message(), HasSubstr("truncated header: file is 100 bytes, the header alone needs 1024"));

  WriteBytes(path, "");
  r = ReadShard(path);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("truncated header: file is 0 bytes"));
}

TEST(ShardTest, BadMagic) {
  TempDir dir;
  const std::string path = dir.Path("magic.bin");
  WriteBytes(path, RawShard(123, 1, 0, 0));
  auto r = ReadShard(path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
  EXPECT_THAT(
      r.status().message(),
      HasSubstr("shard " + path + ": bad magic 123 (expected 20240520 for uint16 or 20240801 for uint32 tokens)"));
}

TEST(ShardTest, BadVersion) {
  TempDir dir;
  const std::string path = dir.Path("version.bin");
  WriteBytes(path, RawShard(kShardMagicV1, 3, 0, 0));
  auto r = ReadShard(path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
  EXPECT_THAT(r.status().message(),
              HasSubstr("shard " + path + ": header declares version 3, expected 1 for magic 20240520"));

  // The uint32 magic with the uint16 version is just as wrong.
  WriteBytes(path, RawShard(kShardMagicV7, 1, 0, 0));
  r = ReadShard(path);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(),
              HasSubstr("shard " + path + ": header declares version 1, expected 7 for magic 20240801"));
}

TEST(ShardTest, SizeMismatchFileTooShort) {
  TempDir dir;
  const std::string path = dir.Path("short_payload.bin");
  WriteBytes(path, RawShard(kShardMagicV1, 1, 500, 976));  // 2000 bytes, 500 uint16 need 2024
  auto r = ReadShard(path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
  EXPECT_THAT(r.status().message(),
              HasSubstr("shard " + path + ": file is 2000 bytes but the header's 500 uint16 tokens need 2024"));
}

TEST(ShardTest, SizeMismatchFileTooLong) {
  TempDir dir;
  const std::string path = dir.Path("long_payload.bin");
  WriteBytes(path, RawShard(kShardMagicV7, 7, 10, 44));  // 1068 bytes, 10 uint32 need 1064
  auto r = ReadShard(path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
  EXPECT_THAT(r.status().message(),
              HasSubstr("shard " + path + ": file is 1068 bytes but the header's 10 uint32 tokens need 1064"));
}

TEST(ShardTest, NegativeCount) {
  TempDir dir;
  const std::string path = dir.Path("negative.bin");
  WriteBytes(path, RawShard(kShardMagicV1, 1, -5, 0));
  auto r = ReadShard(path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
  EXPECT_THAT(r.status().message(), HasSubstr("shard " + path + ": header declares a negative token count -5"));
}

// ------------------------------------------------------------------------------ glob

TEST(GlobTest, SortedMatches) {
  TempDir dir;
  for (const char* name :
       {"train_000002.bin", "train_000000.bin", "train_000010.bin", "val_000000.bin", "train_000001.bin"}) {
    WriteBytes(dir.Path(name), "x");
  }
  auto r = ExpandGlob(dir.Path("train_*.bin"));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_THAT(*r, ElementsAre(dir.Path("train_000000.bin"), dir.Path("train_000001.bin"), dir.Path("train_000002.bin"),
                              dir.Path("train_000010.bin")));
}

TEST(GlobTest, NoMatchNamesThePattern) {
  TempDir dir;
  const std::string pattern = dir.Path("nothing_*.bin");
  auto r = ExpandGlob(pattern);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("no files match the pattern " + pattern));
}

// ------------------------------------------------------------------------- documents

TEST(ReadDocumentsTest, SeparatorsSuffixesAndOrder) {
  TempDir dir;
  // Sorted order: a.txt, b, sub/c.txt. The excluded suffixes are skipped.
  WriteBytes(dir.Path("b"), "second file\n%\n\n%\n  \t\n%\nlast doc, no newline");
  WriteBytes(dir.Path("a.txt"), "one\ntwo\n%\nthree\r\n%\r\n%\nfour %\n%%\n%\n");
  WriteBytes(dir.Path("sub/c.txt"), "%\nnested\n\n");
  WriteBytes(dir.Path("a.dat"), "binary index, must be skipped");
  WriteBytes(dir.Path("a.u8"), "a copy, must be skipped");
  TextSource source;
  source.paths = {dir.path()};
  auto docs = ReadDocuments(source);
  ASSERT_TRUE(docs.ok()) << docs.status().ToString();
  EXPECT_THAT(*docs, ElementsAre("one\ntwo", "three", "four %\n%%", "second file", "last doc, no newline", "nested\n"));
}

TEST(ReadDocumentsTest, ExplicitFileIsAlwaysReadAndCustomSeparator) {
  TempDir dir;
  WriteBytes(dir.Path("x.dat"), "alpha\n<|sep|>\nbeta\n%\ngamma\n");
  TextSource source;
  source.paths = {dir.Path("x.dat")};
  source.separator = "<|sep|>";
  auto docs = ReadDocuments(source);
  ASSERT_TRUE(docs.ok()) << docs.status().ToString();
  EXPECT_THAT(*docs, ElementsAre("alpha", "beta\n%\ngamma"));
}

TEST(ReadDocumentsTest, PathArgumentsKeepTheirOrder) {
  TempDir dir;
  WriteBytes(dir.Path("z"), "zed");
  WriteBytes(dir.Path("y/a"), "ay");
  TextSource source;
  source.paths = {dir.Path("z"), dir.Path("y")};
  auto docs = ReadDocuments(source);
  ASSERT_TRUE(docs.ok()) << docs.status().ToString();
  EXPECT_THAT(*docs, ElementsAre("zed", "ay"));
}

TEST(ReadDocumentsTest, MissingPath) {
  TempDir dir;
  WriteBytes(dir.Path("present"), "text");
  const std::string missing = dir.Path("absent");
  TextSource source;
  source.paths = {dir.Path("present"), missing};
  auto docs = ReadDocuments(source);
  ASSERT_FALSE(docs.ok());
  EXPECT_EQ(docs.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(docs.status().message(), HasSubstr("text source " + missing + ": no such file or directory"));
}

TEST(ReadDocumentsTest, NoDocuments) {
  TempDir dir;
  WriteBytes(dir.Path("blank"), "\n  \n%\n%\n");
  WriteBytes(dir.Path("only.dat"), "skipped");
  TextSource source;
  source.paths = {dir.path()};
  auto docs = ReadDocuments(source);
  ASSERT_FALSE(docs.ok());
  EXPECT_EQ(docs.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(docs.status().message(), HasSubstr(dir.path()));
  EXPECT_THAT(docs.status().message(), HasSubstr("no documents"));

  source.paths = {};
  docs = ReadDocuments(source);
  ASSERT_FALSE(docs.ok());
  EXPECT_EQ(docs.status().code(), StatusCode::kInvalidArgument);
}

TEST(PackDocumentsTest, OneEndOfTextBetweenDocuments) {
  const std::vector<int32_t> tokens = PackDocuments({"ab", "\xff", "c"});
  EXPECT_THAT(tokens, ElementsAre('a', 'b', kEndOfText, 255, kEndOfText, 'c'));
  EXPECT_THAT(PackDocuments({"hi"}), ElementsAre('h', 'i'));
  EXPECT_TRUE(PackDocuments({}).empty());

  const std::vector<std::string> docs = {"first", "second doc", "3"};
  const std::vector<int32_t> packed = PackDocuments(docs);
  EXPECT_NE(packed.front(), kEndOfText);
  EXPECT_NE(packed.back(), kEndOfText);
  EXPECT_EQ(std::count(packed.begin(), packed.end(), kEndOfText), 2);
  EXPECT_EQ(packed.size(), 5u + 10u + 1u + 2u);
}

// ---------------------------------------------------------------------------- stream

TEST(TokenStreamTest, SampleIsDeterministicAndShifted) {
  std::vector<int32_t> tokens(1000);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i);  // token = position
  const TokenStream stream(tokens);
  constexpr int B = 4, T = 16;
  std::vector<int32_t> in1(B * T), tg1(B * T), in2(B * T), tg2(B * T), in3(B * T), tg3(B * T);
  stream.Sample(42, 7, B, T, in1.data(), tg1.data());
  stream.Sample(42, 7, B, T, in2.data(), tg2.data());
  EXPECT_EQ(in1, in2);
  EXPECT_EQ(tg1, tg2);
  stream.Sample(42, 8, B, T, in3.data(), tg3.data());
  EXPECT_NE(in1, in3);  // the next draw moves on
  for (int b = 0; b < B; ++b) {
    const int32_t start = in1[b * T];
    ASSERT_GE(start, 0);
    ASSERT_LE(start + T, 999);  // the whole T+1 window lies in the stream
    for (int t = 0; t < T; ++t) {
      EXPECT_EQ(in1[b * T + t], start + t);      // a contiguous run of the stream
      EXPECT_EQ(tg1[b * T + t], start + t + 1);  // shifted by one
    }
  }
}

TEST(TokenStreamTest, SampleCoversEveryStartOfAShortStream) {
  // size = T+2: the only starts are 0 and 1; both show up and nothing reads past the end.
  const TokenStream stream({10, 11, 12, 13, 14});
  constexpr int T = 3;
  std::set<int32_t> starts;
  for (uint64_t counter = 0; counter < 64; ++counter) {
    int32_t in[T], tg[T];
    stream.Sample(1, counter, 1, T, in, tg);
    starts.insert(in[0]);
    EXPECT_EQ(tg[T - 1], in[0] + T);
  }
  EXPECT_THAT(starts, ElementsAre(10, 11));
}

TEST(TokenStreamTest, BosTakesTheFirstPositionAndTargetsStartAtTheWindow) {
  std::vector<int32_t> tokens(500);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i);
  TokenStream plain(tokens), with_bos(tokens);
  with_bos.set_bos(7777);
  constexpr int B = 3, T = 8;
  std::vector<int32_t> in(B * T), tg(B * T), in0(B * T), tg0(B * T);
  with_bos.Sample(5, 2, B, T, in.data(), tg.data());
  plain.Sample(5, 2, B, T, in0.data(), tg0.data());
  for (int b = 0; b < B; ++b) {
    const int32_t start = in0[b * T];  // the same draw: the same window start
    EXPECT_EQ(in[b * T], 7777) << "row " << b;
    for (int t = 1; t < T; ++t) EXPECT_EQ(in[b * T + t], start + t - 1) << "row " << b << " t " << t;
    for (int t = 0; t < T; ++t) EXPECT_EQ(tg[b * T + t], start + t) << "row " << b << " t " << t;
  }
}

TEST(LoadDataTest, BosIsSetOnBothSplitsAndCountsAsAToken) {
  TempDir dir;
  std::string text;
  for (int i = 0; i < 40; ++i) text += "document number " + std::to_string(i) + " of the corpus\n%\n";
  WriteBytes(dir.Path("corpus"), text);
  DataSpec spec;
  spec.text.paths = {dir.Path("corpus")};
  spec.val_fraction = 0.1;
  spec.seq_len = 16;
  spec.bos = kEndOfText;
  auto data = LoadData(spec);
  ASSERT_TRUE(data.ok()) << data.status().ToString();
  EXPECT_EQ(data->train.bos(), kEndOfText);
  EXPECT_EQ(data->val.bos(), kEndOfText);
  EXPECT_EQ(data->max_token, kEndOfText);
  int32_t in[16], tg[16];
  data->val.Sample(1, 0, 1, 16, in, tg);
  EXPECT_EQ(in[0], kEndOfText);
  EXPECT_EQ(in[1], tg[0]);
}

// ------------------------------------------------------------------------------ load

TEST(HeldOutCountTest, RoundsKeepsOneAndLeavesTraining) {
  EXPECT_EQ(*HeldOutCount(100, 0.05, "x", "documents"), 5u);
  EXPECT_EQ(*HeldOutCount(10, 0.05, "x", "documents"), 1u);  // at least one when > 0
  EXPECT_EQ(*HeldOutCount(10, 0.0, "x", "documents"), 0u);
  EXPECT_EQ(*HeldOutCount(2, 0.5, "x", "documents"), 1u);
  auto r = HeldOutCount(1, 0.05, "text source /a", "documents");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("text source /a: only 1 documents to split"));
  r = HeldOutCount(100, 0.51, "x", "tokens");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("data.val_fraction is 0.51"));
  EXPECT_FALSE(HeldOutCount(100, std::nan(""), "x", "tokens").ok());
}

TEST(LoadDataTest, TextSplitKeepsDocumentsWhole) {
  TempDir dir;
  std::string text;
  for (int i = 0; i < 20; ++i) text += "document " + std::to_string(i) + "\n%\n";
  WriteBytes(dir.Path("corpus"), text);
  DataSpec spec;
  spec.text.paths = {dir.path()};
  spec.val_fraction = 0.1;
  auto splits = LoadData(spec);
  ASSERT_TRUE(splits.ok()) << splits.status().ToString();
  std::vector<std::string> train_docs, val_docs;
  for (int i = 0; i < 18; ++i) train_docs.push_back("document " + std::to_string(i));
  for (int i = 18; i < 20; ++i) val_docs.push_back("document " + std::to_string(i));
  EXPECT_EQ(splits->train.tokens(), PackDocuments(train_docs));
  EXPECT_EQ(splits->val.tokens(), PackDocuments(val_docs));
  EXPECT_EQ(splits->max_token, kEndOfText);
}

TEST(LoadDataTest, ShardsWithHeldOutTail) {
  TempDir dir;
  std::vector<int32_t> a(60), b(40);
  for (int i = 0; i < 60; ++i) a[i] = i;
  for (int i = 0; i < 40; ++i) b[i] = 60 + i;
  ASSERT_TRUE(WriteShard(dir.Path("train_000001.bin"), b).ok());
  ASSERT_TRUE(WriteShard(dir.Path("train_000000.bin"), a).ok());
  DataSpec spec;
  spec.train_shards = dir.Path("train_*.bin");
  spec.val_fraction = 0.2;
  auto splits = LoadData(spec);
  ASSERT_TRUE(splits.ok()) << splits.status().ToString();
  ASSERT_EQ(splits->train.size(), 80u);
  ASSERT_EQ(splits->val.size(), 20u);
  for (int i = 0; i < 80; ++i) EXPECT_EQ(splits->train.tokens()[i], i);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(splits->val.tokens()[i], 80 + i);
  EXPECT_EQ(splits->max_token, 99);

  // With val shards, the train shards are used whole.
  ASSERT_TRUE(WriteShard(dir.Path("val_000000.bin"), {70000, 1}).ok());
  spec.val_shards = dir.Path("val_*.bin");
  splits = LoadData(spec);
  ASSERT_TRUE(splits.ok()) << splits.status().ToString();
  EXPECT_EQ(splits->train.size(), 100u);
  EXPECT_THAT(splits->val.tokens(), ElementsAre(70000, 1));
  EXPECT_EQ(splits->max_token, 70000);

  // No validation at all only with val_fraction 0.
  spec.val_shards.clear();
  spec.val_fraction = 0;
  splits = LoadData(spec);
  ASSERT_TRUE(splits.ok()) << splits.status().ToString();
  EXPECT_EQ(splits->train.size(), 100u);
  EXPECT_EQ(splits->val.size(), 0u);
}

TEST(LoadDataTest, Errors) {
  TempDir dir;
  DataSpec spec;
  spec.val_fraction = 0.6;
  spec.text.paths = {dir.path()};
  auto r = LoadData(spec);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("data.val_fraction is 0.6; it must be in [0, 0.5]"));
  spec.val_fraction = -0.1;
  EXPECT_FALSE(LoadData(spec).ok());

  // One document cannot be split into train and validation.
  WriteBytes(dir.Path("one"), "just one document\n");
  spec.val_fraction = 0.05;
  r = LoadData(spec);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr(dir.path()));
  EXPECT_THAT(r.status().message(), HasSubstr("only 1 documents to split"));
  spec.val_fraction = 0;
  EXPECT_TRUE(LoadData(spec).ok());

  // Too short for one window of seq_len+1 tokens.
  spec.seq_len = 64;
  r = LoadData(spec);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("fewer than one window"));

  // A corrupt shard is reported with its path.
  WriteBytes(dir.Path("bad_000000.bin"), RawShard(99, 1, 0, 0));
  DataSpec shards;
  shards.train_shards = dir.Path("bad_*.bin");
  r = LoadData(shards);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr(dir.Path("bad_000000.bin") + ": bad magic 99"));
  shards.train_shards = dir.Path("none_*.bin");
  r = LoadData(shards);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);

  DataSpec empty;
  r = LoadData(empty);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
}

TEST(LoadDataTest, Fortunes) {
  if (!fs::is_directory(kFortunes)) GTEST_SKIP() << kFortunes << " is missing (Debian package `fortunes`)";
  DataSpec spec;
  spec.text.paths = {kFortunes};
  spec.seq_len = 256;
  auto splits = LoadData(spec);
  ASSERT_TRUE(splits.ok()) << splits.status().ToString();
  EXPECT_GT(splits->train.size(), 1'000'000u);
  EXPECT_GT(splits->val.size(), 0u);
  EXPECT_LE(splits->max_token, 256);
  EXPECT_LT(splits->max_token, kByteVocab);
  EXPECT_NE(splits->train.tokens().front(), kEndOfText);
  EXPECT_NE(splits->val.tokens().front(), kEndOfText);
  // Roughly 5% of the documents, so roughly 5% of the tokens.
  const double frac = static_cast<double>(splits->val.size()) / (splits->train.size() + splits->val.size());
  EXPECT_GT(frac, 0.01);
  EXPECT_LT(frac, 0.15);
  // English text: well below uniform over bytes, well above zero.
  const double h = UnigramEntropy(splits->train.tokens());
  EXPECT_GT(h, 2.0);
  EXPECT_LT(h, std::log(256.0));
}

// ------------------------------------------------------------------------- entropy

TEST(UnigramEntropyTest, UniformFourSymbols) {
  std::vector<int32_t> tokens;
  for (int i = 0; i < 1000; ++i) tokens.push_back(i % 4);
  EXPECT_NEAR(UnigramEntropy(tokens), std::log(4.0), 1e-12);
  EXPECT_DOUBLE_EQ(UnigramEntropy({7, 7, 7}), 0.0);
  EXPECT_DOUBLE_EQ(UnigramEntropy({}), 0.0);
  // Large ids take the sparse path and give the same answer.
  EXPECT_NEAR(UnigramEntropy({2000000000, 1, 2000000000, 1}), std::log(2.0), 1e-12);
}

}  // namespace
}  // namespace sinkscope

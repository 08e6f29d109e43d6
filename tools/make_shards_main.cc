// sinkscope-make-shards: raw text → llm.c token shards, byte-level (the default) or with a
// BPE tokenizer (--tokenizer gpt2|PATH, data/tokenizer.h).
//
//   sinkscope-make-shards --out DIR [--tokenizer gpt2|PATH] [--threads N] [--separator %]
//                         [--val-fraction 0.05] [--shard-tokens N] PATH...
//
// Reads the documents of PATH... exactly as a `text` data source does (files or folders,
// a line equal to the separator ends a document), holds out the last val-fraction of the
// documents for validation, packs each split with one end-of-text token between
// documents (no begin token: as the paper's C4 data) and writes DIR/train_000000.bin …
// and DIR/val_000000.bin … of at most N tokens each: uint16 tokens when the vocabulary
// fits, uint32 otherwise.
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <thread>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <regex>
#include <string>
#include <system_error>
#include <vector>

#include "data/data.h"
#include "data/tokenizer.h"
#include "training/progress.h"
#include "base/flags.h"
#include "base/numbers.h"

namespace {

constexpr char kTool[] = "sinkscope-make-shards";
constexpr long long kDefaultShardTokens = 100'000'000;  // as llm.c's data scripts

int Fail(const sinkscope::Status& status) {
  std::fprintf(stderr, "%s: %s\n", kTool, status.ToString().c_str());
  return 1;
}

std::string ShardName(const std::string& split, size_t index) {
  char name[64];
  std::snprintf(name, sizeof(name), "%s_%06zu.bin", split.c_str(), index);
  return name;
}

// Writes `tokens` as split_000000.bin, split_000001.bin, … of at most `per_shard` tokens.
sinkscope::StatusOr<size_t> WriteSplit(const std::filesystem::path& dir, const std::string& split,
                                       const std::vector<int32_t>& tokens, size_t per_shard) {
  size_t files = 0;
  for (size_t begin = 0; begin < tokens.size(); begin += per_shard, ++files) {
    const size_t end = std::min(tokens.size(), begin + per_shard);
    const std::vector<int32_t> part(tokens.begin() + static_cast<std::ptrdiff_t>(begin),
                                    tokens.begin() + static_cast<std::ptrdiff_t>(end));
    RETURN_IF_ERROR(sinkscope::WriteShard((dir / ShardName(split, files)).string(), part));
  }
  return files;
}

// Removes shards a previous run left behind (e.g. train_000007.bin when this run wrote
// only 3 train shards), so that a glob over DIR sees exactly this run's output.
void RemoveStaleShards(const std::filesystem::path& dir, const std::string& split, size_t written) {
  static const std::regex kShard("(train|val)_([0-9]{6,})\\.bin");
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    std::smatch m;
    const std::string name = entry.path().filename().string();
    if (!std::regex_match(name, m, kShard) || m[1] != split) continue;
    if (std::stoull(m[2]) < written) continue;
    std::error_code rm_ec;
    if (std::filesystem::remove(entry.path(), rm_ec)) {
      std::fprintf(stderr, "%s: removed stale shard %s\n", kTool, entry.path().c_str());
    } else if (rm_ec) {
      std::fprintf(stderr, "%s: warning: cannot remove stale shard %s: %s\n", kTool, entry.path().c_str(),
                   rm_ec.message().c_str());
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  namespace flags = sinkscope::flags;
  std::string out_dir;
  sinkscope::TextSource source;
  double val_fraction = 0.05;
  int64_t shard_tokens = kDefaultShardTokens;
  std::string tokenizer_spec;
  int64_t threads = std::max(1u, std::thread::hardware_concurrency());
  CLI::App app("Turns raw text into llm.c token shards: byte-level tokens 0..255 with end-of-text 256 between "
               "documents, or a BPE tokenizer's tokens with its end-of-text between them; no begin token.",
               kTool);
  app.add_option("--tokenizer", tokenizer_spec,
                 "gpt2 (GPT-2's files in the tokenizer cache), a model folder with tokenizer.json, a tokenizer.json, "
                 "GPT-2's folder (encoder.json + vocab.bpe) or a tiktoken ranks .json; default: bytes")
      ->check(flags::NonEmpty());
  app.add_option("--threads", threads, "encode documents on N threads (default: every core)")
      ->check(flags::Integer(1, 256));
  app.add_option("PATH", source.paths,
                 "text files or folders (folders are read recursively in sorted order, skipping files ending in .dat "
                 "or .u8)")
      ->required();
  app.add_option("--out", out_dir, "output folder, created if missing; gets train_000000.bin ... and val_000000.bin ...")
      ->required()
      ->check(flags::NonEmpty())
      ->type_name("DIR");
  app.add_option("--separator", source.separator, "a line equal to SEP ends a document")->default_val("%");
  app.add_option("--val-fraction", val_fraction,
                 "fraction of the documents, taken from the end, held out for validation (0 writes no val shard)")
      ->check(flags::Number(0, 0.5))
      ->default_val(0.05);
  app.add_option("--shard-tokens", shard_tokens, "at most N tokens per shard")
      ->check(flags::Integer(1, std::numeric_limits<int32_t>::max()))
      ->default_val(kDefaultShardTokens);
  if (int exit = flags::Parse(app, argc, argv); exit >= 0) return exit;

  auto docs = sinkscope::ReadDocuments(source);
  if (!docs.ok()) return Fail(docs.status());
  const size_t n_docs = docs->size();
  std::string inputs;
  for (const std::string& p : source.paths) inputs += (inputs.empty() ? "" : ", ") + p;
  auto held = sinkscope::HeldOutCount(n_docs, val_fraction, "text source " + inputs, "documents");
  if (!held.ok()) return Fail(held.status());
  const std::vector<std::string> val_docs(docs->end() - static_cast<std::ptrdiff_t>(*held), docs->end());
  docs->resize(n_docs - *held);
  std::vector<int32_t> train, val;
  if (tokenizer_spec.empty()) {
    train = sinkscope::PackDocuments(*docs);
    val = sinkscope::PackDocuments(val_docs);
  } else {
    auto tokenizer = sinkscope::Tokenizer::Open(tokenizer_spec);
    if (!tokenizer.ok()) return Fail(tokenizer.status());
    std::fprintf(stderr, "%s: %s\n", kTool, (*tokenizer)->description().c_str());
    size_t total_bytes = 0;
    for (const auto& d : *docs) total_bytes += d.size();
    for (const auto& d : val_docs) total_bytes += d.size();
    sinkscope::ProgressBar bar("encoding", static_cast<int64_t>(docs->size() + val_docs.size()));
    const auto start = std::chrono::steady_clock::now();
    size_t before = 0, before_bytes = 0;  // the train split's, while the val split encodes
    auto progress = [&](size_t done, size_t bytes) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      char detail[96];
      std::snprintf(detail, sizeof detail, "docs  %7.2f MB/s  %6.1f of %.1f MB", (before_bytes + bytes) / 1e6 / std::max(s, 1e-9),
                    (before_bytes + bytes) / 1e6, total_bytes / 1e6);
      bar.Update(static_cast<int64_t>(before + done), detail);
    };
    auto packed = sinkscope::PackDocuments(*docs, **tokenizer, static_cast<int>(threads), progress);
    if (!packed.ok()) return Fail(packed.status());
    train = std::move(*packed);
    before = docs->size();
    for (const auto& d : *docs) before_bytes += d.size();
    packed = sinkscope::PackDocuments(val_docs, **tokenizer, static_cast<int>(threads), progress);
    if (!packed.ok()) return Fail(packed.status());
    val = std::move(*packed);
    bar.Finish();
  }

  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) return Fail(sinkscope::InvalidArgumentError("--out " + out_dir + ": cannot create folder: " + ec.message()));
  if (!std::filesystem::is_directory(out_dir, ec)) {
    return Fail(sinkscope::InvalidArgumentError("--out " + out_dir + ": not a folder"));
  }
  const std::filesystem::path dir(out_dir);
  const auto train_files = WriteSplit(dir, "train", train, static_cast<size_t>(shard_tokens));
  if (!train_files.ok()) return Fail(train_files.status());
  const auto val_files = WriteSplit(dir, "val", val, static_cast<size_t>(shard_tokens));
  if (!val_files.ok()) return Fail(val_files.status());
  RemoveStaleShards(dir, "train", *train_files);
  RemoveStaleShards(dir, "val", *val_files);

  std::printf(
      "%s: %zu documents (%zu train, %zu val), %zu tokens (%zu train, %zu val), %zu shard files (%zu train, %zu val) "
      "in %s\n",
      kTool, n_docs, docs->size(), val_docs.size(), train.size() + val.size(), train.size(), val.size(),
      *train_files + *val_files, *train_files, *val_files, out_dir.c_str());
  return 0;
}

// Training data: llm.c token shards and raw text, packed into one token stream per
// split, sampled as deterministic B×T+1 windows.
//
// llm.c shard format: a header of 256 int32 — [0] magic, [1] version, [2] token count —
// then the tokens: magic 20240520 / version 1 with uint16 tokens, or magic 20240801 /
// version 7 with uint32 tokens. The file size must be exactly 1024 + count·width.
//
// Raw text: documents split by a separator line, encoded with the byte-level tokenizer
// (token = byte value, vocabulary 257, end-of-text = 256) and packed with one
// end-of-text token between documents and no begin token, as the paper does.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/files.h"
#include "base/status.h"

namespace sinkscope {

inline constexpr int32_t kShardMagicV1 = 20240520;  // uint16 tokens
inline constexpr int32_t kShardMagicV7 = 20240801;  // uint32 tokens
inline constexpr int32_t kEndOfText = 256;
// GPT-2's <|endoftext|>, which llm.c's shards put between documents.
inline constexpr int32_t kGpt2EndOfText = 50256;
inline constexpr int32_t kByteVocab = 257;

// Reads one shard; errors name the file and what is wrong (missing, short header, bad
// magic or version, size mismatch, token count).
StatusOr<std::vector<int32_t>> ReadShard(const std::string& path);
// Writes tokens as a shard, uint16 (version 1) when every token fits, else uint32
// (version 7). Atomic: temporary file, fsync, rename.
Status WriteShard(const std::string& path, const std::vector<int32_t>& tokens);

// Paths matching a glob pattern, sorted; NOT_FOUND naming the pattern if none match.
StatusOr<std::vector<std::string>> ExpandGlob(const std::string& pattern);

struct TextSource {
  std::vector<std::string> paths;  // files or folders (folders are walked recursively, sorted)
  std::string separator = "%";     // a line equal to this ends a document
  std::vector<std::string> exclude_suffixes = {".dat", ".u8"};  // files skipped in folders
};
// Documents of the source in a deterministic order (sorted paths); empty documents are
// dropped. NOT_FOUND names a missing path; INVALID_ARGUMENT a source with no text.
StatusOr<std::vector<std::string>> ReadDocuments(const TextSource& source);
// Byte-level packing: doc0 EOT doc1 EOT … docN (one end-of-text token between
// documents, no begin token).
std::vector<int32_t> PackDocuments(const std::vector<std::string>& documents);

// One split's token stream and how windows are drawn from it.
class TokenStream {
 public:
  TokenStream() = default;
  explicit TokenStream(std::vector<int32_t> tokens) : tokens_(std::move(tokens)) {}
  // A begin-of-sequence token at the first position of every window (data.bos): a window
  // is then T tokens w[0..T) of the stream, inputs = [bos, w[0..T−1)), targets = w[0..T).
  // Negative (the default): none.
  void set_bos(int32_t bos) { bos_ = bos; }
  int32_t bos() const { return bos_; }
  size_t size() const { return tokens_.size(); }
  const std::vector<int32_t>& tokens() const { return tokens_; }
  // Fills inputs and targets (B·T each) from B windows of T+1 tokens: inputs = w[0..T),
  // targets = w[1..T]. Window b of draw `counter` starts at
  // Mix64(seed ^ Mix64(counter·B + b)) mod (size − T): deterministic, and the data
  // position is just `counter`, which checkpoints store. Precondition: size() ≥ T+1
  // (LoadData checks it when DataSpec::seq_len is set); violating it aborts.
  void Sample(uint64_t seed, uint64_t counter, int B, int T, int32_t* inputs, int32_t* targets) const;
  // Windows first … first+rows−1 of that same draw of B: a data-parallel rank's share of
  // the batch a single rank would read.
  void SampleRows(uint64_t seed, uint64_t counter, int B, int first, int rows, int T, int32_t* inputs,
                  int32_t* targets) const;

 private:
  std::vector<int32_t> tokens_;
  int32_t bos_ = -1;
};

struct DataSplits {
  TokenStream train;
  TokenStream val;
  int32_t max_token = 0;  // largest token id seen: must be < vocab
};

// Where the tokens come from (mirrors the experiment file's `data` section).
struct DataSpec {
  std::string train_shards;    // glob of llm.c shards; or
  std::string val_shards;      // optional glob for validation shards
  TextSource text;             // used when train_shards is empty
  double val_fraction = 0.05;  // held out from the end of the stream when no val_shards
  // Not part of the `data` section: the model's context length T, set by the caller. When
  // > 0, LoadData checks that the training split (and a nonempty validation split) holds
  // at least one window of T+1 tokens, so TokenStream::Sample's precondition holds.
  int seq_len = 0;
  // data.bos: the token put first in every window of both splits; negative: none.
  int32_t bos = -1;
};

// Loads, tokenises and splits. Errors name the file or field and the reason.
// val_fraction must be in [0, 0.5]. Shards: the validation split is val_shards, or else
// the last val_fraction of the concatenated train tokens. Text: the last val_fraction of
// the documents (whole documents, so none straddles the splits), each split packed on
// its own. The validation split is empty only when val_fraction is 0 (and no val_shards).
StatusOr<DataSplits> LoadData(const DataSpec& spec);

// How many of n items (documents or tokens) to hold out from the end for validation:
// round(n·val_fraction), at least 1 when val_fraction > 0, 0 when it is 0.
// INVALID_ARGUMENT (naming `what`, e.g. "text source /x", and `unit`, e.g. "documents")
// when val_fraction is outside [0, 0.5] or when nothing would be left for training.
StatusOr<size_t> HeldOutCount(size_t n, double val_fraction, const std::string& what, const std::string& unit);

// Unigram entropy (nats/token) of a token stream: the loss of the best model that
// ignores context, which a trained model must beat.
double UnigramEntropy(const std::vector<int32_t>& tokens);

}  // namespace sinkscope

// Byte-level BPE tokenizers, as GPT-2, Llama 3, Qwen2/3 and GLM-4 ship them, written for
// sinkscope (no tokenizer library exists in Debian):
//
// - a Hugging Face `tokenizer.json` (model BPE over the byte-level alphabet; pre-tokenizer
//   ByteLevel, or Split(regex) then ByteLevel; normalizer none or NFC; added and special
//   tokens; `ignore_merges`); anything else in it is refused, naming the key and value;
// - GPT-2's `encoder.json` + `vocab.bpe`;
// - a tiktoken ranks file as npm's `tiktoken` ships them (`encoders/*.json`: pat_str,
//   special_tokens, bpe_ranks), where the pair to merge is the one whose concatenation has
//   the lowest rank.
//
// Encoding: the text is split into pieces by the pre-tokenizer's regex (PCRE2, UTF and
// Unicode properties, JIT), each piece is merged by rank from its bytes, lowest rank
// first, leftmost on ties. Invalid UTF-8 is encoded byte for byte (its bytes are pieces of
// their own) rather than refused. A TokenEncoder keeps a cache of pieces and is for one
// thread; the Tokenizer itself is immutable and shared.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "base/status.h"

namespace sinkscope {

class Tokenizer {
 public:
  // `spec`: "gpt2" (GPT-2's encoder.json + vocab.bpe in the tokenizer cache:
  // $SINKSCOPE_TOKENIZERS/gpt2, else ~/.cache/sinkscope/tokenizers/gpt2; filled by
  // scripts/fetch-tokenizers.sh), a folder holding tokenizer.json or encoder.json +
  // vocab.bpe, or a file: tokenizer.json or a tiktoken ranks .json.
  static StatusOr<std::unique_ptr<Tokenizer>> Open(const std::string& spec);
  static StatusOr<std::unique_ptr<Tokenizer>> FromHuggingFace(const std::string& tokenizer_json);
  static StatusOr<std::unique_ptr<Tokenizer>> FromGpt2(const std::string& encoder_json, const std::string& vocab_bpe);
  static StatusOr<std::unique_ptr<Tokenizer>> FromTiktoken(const std::string& ranks_json);
  ~Tokenizer();

  // Where it came from and what it is, e.g. "tokenizer.json (BPE, 128256 tokens)".
  const std::string& description() const { return description_; }
  // 1 + the largest id (added and special tokens included).
  int32_t vocab_size() const { return vocab_size_; }
  // The end-of-text token: GPT-2's and tiktoken's <|endoftext|>; for tokenizer.json, the
  // first special token named like an end of text (<|endoftext|>, <|end_of_text|>, </s>,
  // <|end|>) unless set by SetEos (from the model's config.json). nullopt: none known.
  std::optional<int32_t> eos() const { return eos_; }
  void SetEos(int32_t id) { eos_ = id; }
  // The token a document starts with, from tokenizer.json's post-processor
  // (TemplateProcessing that puts a special token before $A: Llama 3's
  // <|begin_of_text|>); nullopt for GPT-2, tiktoken and Qwen.
  std::optional<int32_t> bos() const { return bos_; }
  // The id of an added or special token by its text.
  std::optional<int32_t> SpecialId(const std::string& text) const;

  // The bytes a token stands for ("" for an unknown id).
  std::string_view TokenBytes(int32_t id) const;
  std::string Decode(const std::vector<int32_t>& ids) const;
  // Convenience for one call: a fresh TokenEncoder each time.
  std::vector<int32_t> Encode(std::string_view text, bool specials = false) const;

 private:
  friend class TokenEncoder;
  Tokenizer() = default;
  Status Finish();  // compiles the regex, checks the byte alphabet is complete

  struct Merge {
    uint32_t rank;
    int32_t merged;
  };
  std::string description_;
  int32_t vocab_size_ = 0;
  std::vector<std::string> token_bytes_;                 // by id
  std::unordered_map<std::string, int32_t> by_bytes_;    // whole tokens, for ignore_merges
  int32_t byte_token_[256] = {};                         // the token of each single byte
  std::unordered_map<uint64_t, Merge> merges_;           // (left id, right id) → rank, result
  std::string pattern_;                                  // the pre-tokenizer's regex ("" : whole text)
  bool add_prefix_space_ = false;
  bool ignore_merges_ = false;
  bool nfc_ = false;                                     // normalizer NFC
  std::vector<std::pair<std::string, int32_t>> specials_;  // added tokens, longest first
  std::optional<int32_t> eos_, bos_;
  struct Regex;
  std::unique_ptr<Regex> regex_;
};

// Encodes with one Tokenizer on one thread, caching the tokens of pieces seen before.
class TokenEncoder {
 public:
  explicit TokenEncoder(const Tokenizer& tokenizer);
  ~TokenEncoder();
  TokenEncoder(const TokenEncoder&) = delete;
  TokenEncoder& operator=(const TokenEncoder&) = delete;
  // Appends the tokens of `text` to *out. `specials`: added and special tokens written in
  // the text become their ids (Hugging Face's default); otherwise they are ordinary text
  // (tiktoken's encode_ordinary, what training data wants).
  void Encode(std::string_view text, std::vector<int32_t>* out, bool specials = false);

 private:
  void EncodeOrdinary(std::string_view text, std::vector<int32_t>* out);
  void EncodePiece(std::string_view piece, std::vector<int32_t>* out);
  const Tokenizer& t_;
  void* match_data_ = nullptr;  // pcre2_match_data*
  std::unordered_map<std::string, std::vector<int32_t>> cache_;
  std::vector<int32_t> parts_;
  std::vector<uint32_t> ranks_;
};

// Encodes every text on `threads` threads (each with its own TokenEncoder), the texts
// taken in turn; `progress` (optional) is called on the calling thread about every 200 ms
// and at the end with the texts and bytes done so far.
std::vector<std::vector<int32_t>> EncodeInParallel(
    const Tokenizer& tokenizer, const std::vector<std::string_view>& texts, int threads, bool specials = false,
    const std::function<void(size_t texts_done, size_t bytes_done)>& progress = nullptr);

// Packs documents as the paper's training data: each encoded as ordinary text, one
// end-of-text token (tokenizer.eos()) between documents, no begin token.
StatusOr<std::vector<int32_t>> PackDocuments(const std::vector<std::string>& documents, const Tokenizer& tokenizer,
                                             int threads,
                                             const std::function<void(size_t docs_done, size_t bytes_done)>& progress = nullptr);

}  // namespace sinkscope

#include "data/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <thread>
#include <climits>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>

#include "base/files.h"

namespace sinkscope {

struct Tokenizer::Regex {
  pcre2_code* code = nullptr;
  ~Regex() { pcre2_code_free(code); }
};

namespace {

using Json = nlohmann::json;
namespace fs = std::filesystem;

// GPT-2's pre-tokenizer (and Hugging Face ByteLevel's with use_regex).
constexpr char kGpt2Pattern[] = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// GPT-2's byte ↔ printable-character alphabet: byte b is written as code point
// kByteChar[b]; the printable Latin-1 bytes stand for themselves, the other 68 are
// shifted to 256…323.
const std::array<uint32_t, 256>& ByteChars() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t[b] = printable ? b : next++;
    }
    return t;
  }();
  return table;
}

// Code point → byte of the alphabet, -1 outside it.
int CharByte(uint32_t cp) {
  static const std::vector<int> table = [] {
    std::vector<int> t(324, -1);
    for (int b = 0; b < 256; ++b) t[ByteChars()[b]] = b;
    return t;
  }();
  return cp < table.size() ? table[cp] : -1;
}

// The bytes a byte-level token string stands for; false when it holds a character
// outside the alphabet (or invalid UTF-8).
bool AlphabetToBytes(const std::string& s, std::string* out) {
  out->clear();
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    uint32_t cp;
    int n;
    if (c < 0x80) cp = c, n = 1;
    else if ((c & 0xE0) == 0xC0) cp = c & 0x1F, n = 2;
    else if ((c & 0xF0) == 0xE0) cp = c & 0x0F, n = 3;
    else return false;
    if (i + n > s.size()) return false;
    for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    const int b = CharByte(cp);
    if (b < 0) return false;
    out->push_back(static_cast<char>(b));
    i += n;
  }
  return true;
}

std::string Quoted(const Json& j) {
  std::string s = j.dump();
  return s.size() > 80 ? s.substr(0, 77) + "..." : s;
}

StatusOr<Json> ReadJson(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadRegularFile(path, path, int64_t{1} << 32));
  Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return InvalidArgumentError(path + ": not valid JSON");
  return j;
}

uint64_t PairKey(int32_t a, int32_t b) { return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b); }

// Standard base64 (tiktoken's ranks).
bool Base64Decode(std::string_view in, std::string* out) {
  static const std::array<int, 256> table = [] {
    std::array<int, 256> t;
    t.fill(-1);
    const char* a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (int i = 0; i < 64; ++i) t[static_cast<unsigned char>(a[i])] = i;
    return t;
  }();
  out->clear();
  uint32_t acc = 0;
  int bits = 0;
  for (char ch : in) {
    if (ch == '=') break;
    const int v = table[static_cast<unsigned char>(ch)];
    if (v < 0) return false;
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out->push_back(static_cast<char>((acc >> bits) & 0xFF));
    }
  }
  return true;
}

}  // namespace

Tokenizer::~Tokenizer() = default;

std::optional<int32_t> Tokenizer::SpecialId(const std::string& text) const {
  for (const auto& [s, id] : specials_) {
    if (s == text) return id;
  }
  return std::nullopt;
}

std::string_view Tokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= token_bytes_.size()) return {};
  return token_bytes_[id];
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) out += TokenBytes(id);
  return out;
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool specials) const {
  std::vector<int32_t> out;
  TokenEncoder(*this).Encode(text, &out, specials);
  return out;
}

Status Tokenizer::Finish() {
  for (const auto& [text, id] : specials_) vocab_size_ = std::max(vocab_size_, id + 1);
  for (size_t id = 0; id < token_bytes_.size(); ++id) {
    if (!token_bytes_[id].empty()) vocab_size_ = std::max(vocab_size_, static_cast<int32_t>(id) + 1);
  }
  std::fill(std::begin(byte_token_), std::end(byte_token_), -1);
  by_bytes_.clear();
  for (size_t id = 0; id < token_bytes_.size(); ++id) {
    const std::string& b = token_bytes_[id];
    if (b.empty()) continue;
    bool special = false;
    for (const auto& s : specials_) special |= s.second == static_cast<int32_t>(id);
    if (special) continue;  // a special token's text is not a merge result
    by_bytes_.emplace(b, static_cast<int32_t>(id));
    if (b.size() == 1 && byte_token_[static_cast<unsigned char>(b[0])] < 0) {
      byte_token_[static_cast<unsigned char>(b[0])] = static_cast<int32_t>(id);
    }
  }
  for (int b = 0; b < 256; ++b) {
    if (byte_token_[b] < 0) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "0x%02x", b);
      return InvalidArgumentError(description_ + ": the vocabulary has no token for byte " + hex +
                                  " (not a byte-level BPE)");
    }
  }
  std::sort(specials_.begin(), specials_.end(),
            [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  if (!pattern_.empty()) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    regex_ = std::make_unique<Regex>();
    regex_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern_.data()), pattern_.size(),
                                 PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error, &offset, nullptr);
    if (regex_->code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof message);
      return InvalidArgumentError(description_ + ": the pre-tokenizer's regex does not compile at offset " +
                                  std::to_string(offset) + ": " + reinterpret_cast<const char*>(message));
    }
    pcre2_jit_compile(regex_->code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter if JIT is unavailable
  }
  description_ += " (" + std::to_string(vocab_size_) + " tokens)";
  return OkStatus();
}

StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGpt2(const std::string& encoder_json, const std::string& vocab_bpe) {
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  t->description_ = "GPT-2 " + encoder_json + " + " + vocab_bpe;
  ASSIGN_OR_RETURN(Json encoder, ReadJson(encoder_json));
  if (!encoder.is_object()) return InvalidArgumentError(encoder_json + ": not an object of token → id");
  std::unordered_map<std::string, int32_t> ids;
  std::string bytes;
  for (auto it = encoder.begin(); it != encoder.end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() > INT32_MAX) {
      return InvalidArgumentError(encoder_json + ": " + Quoted(it.key()) + " maps to " + Quoted(it.value()) +
                                  ", not a token id");
    }
    const int32_t id = it.value().get<int32_t>();
    if (!AlphabetToBytes(it.key(), &bytes)) {
      return InvalidArgumentError(encoder_json + ": token " + Quoted(it.key()) + " is not in the byte-level alphabet");
    }
    if (static_cast<size_t>(id) >= t->token_bytes_.size()) t->token_bytes_.resize(static_cast<size_t>(id) + 1);
    t->token_bytes_[id] = bytes;
    ids[it.key()] = id;
  }
  ASSIGN_OR_RETURN(std::string merges, ReadRegularFile(vocab_bpe, vocab_bpe, int64_t{1} << 30));
  size_t line_no = 0, rank = 0;
  for (size_t pos = 0; pos < merges.size();) {
    size_t end = merges.find('\n', pos);
    if (end == std::string::npos) end = merges.size();
    std::string line = merges.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line.rfind("#version", 0) == 0) continue;
    const size_t space = line.find(' ');
    auto a = ids.find(line.substr(0, space));
    auto b = space == std::string::npos ? ids.end() : ids.find(line.substr(space + 1));
    auto m = space == std::string::npos ? ids.end() : ids.find(line.substr(0, space) + line.substr(space + 1));
    if (a == ids.end() || b == ids.end() || m == ids.end()) {
      return InvalidArgumentError(vocab_bpe + ":" + std::to_string(line_no) + ": merge \"" + line +
                                  "\" names a token encoder.json does not have");
    }
    t->merges_.emplace(PairKey(a->second, b->second), Merge{static_cast<uint32_t>(rank++), m->second});
  }
  t->pattern_ = kGpt2Pattern;
  if (auto eot = ids.find("<|endoftext|>"); eot != ids.end()) {
    t->specials_.push_back({"<|endoftext|>", eot->second});
    t->eos_ = eot->second;
  }
  RETURN_IF_ERROR(t->Finish());
  return t;
}

StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromTiktoken(const std::string& ranks_json) {
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  t->description_ = "tiktoken " + ranks_json;
  ASSIGN_OR_RETURN(Json j, ReadJson(ranks_json));
  for (const char* key : {"pat_str", "bpe_ranks"}) {
    if (!j.is_object() || !j.contains(key) || !j[key].is_string()) {
      return InvalidArgumentError(ranks_json + ": needs the string " + key + " (npm tiktoken's encoders/*.json)");
    }
  }
  const std::string ranks = j["bpe_ranks"].get<std::string>();
  // Lines "<label> <first rank> <base64 token> <base64 token> …", ranks consecutive.
  size_t line_no = 0;
  std::string bytes;
  for (size_t pos = 0; pos < ranks.size();) {
    size_t end = ranks.find('\n', pos);
    if (end == std::string::npos) end = ranks.size();
    std::string_view line(ranks.data() + pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (line.empty()) continue;
    std::vector<std::string_view> fields;
    for (size_t f = 0; f <= line.size();) {
      size_t s = line.find(' ', f);
      if (s == std::string_view::npos) s = line.size();
      if (s > f) fields.push_back(line.substr(f, s - f));
      f = s + 1;
    }
    char* stop = nullptr;
    const std::string first(fields.size() > 1 ? fields[1] : std::string_view());
    const long long start = std::strtoll(first.c_str(), &stop, 10);
    if (fields.size() < 2 || stop == first.c_str() || *stop != '\0' || start < 0) {
      return InvalidArgumentError(ranks_json + ": bpe_ranks line " + std::to_string(line_no) +
                                  " does not start with a label and a rank");
    }
    for (size_t k = 2; k < fields.size(); ++k) {
      if (!Base64Decode(fields[k], &bytes) || bytes.empty()) {
        return InvalidArgumentError(ranks_json + ": bpe_ranks line " + std::to_string(line_no) + ": \"" +
                                    std::string(fields[k]) + "\" is not base64");
      }
      const size_t id = static_cast<size_t>(start) + (k - 2);
      if (id > INT32_MAX) return InvalidArgumentError(ranks_json + ": a rank past 2^31");
      if (id >= t->token_bytes_.size()) t->token_bytes_.resize(id + 1);
      t->token_bytes_[id] = bytes;
    }
  }
  std::unordered_map<std::string, int32_t> ids;
  for (size_t id = 0; id < t->token_bytes_.size(); ++id) {
    if (!t->token_bytes_[id].empty()) ids.emplace(t->token_bytes_[id], static_cast<int32_t>(id));
  }
  // The pair to merge is the one whose concatenation has the lowest rank: every split of
  // a token into two tokens is such a pair.
  for (const auto& [token, id] : ids) {
    for (size_t k = 1; k < token.size(); ++k) {
      auto a = ids.find(token.substr(0, k));
      if (a == ids.end()) continue;
      auto b = ids.find(token.substr(k));
      if (b == ids.end()) continue;
      t->merges_.emplace(PairKey(a->second, b->second), Merge{static_cast<uint32_t>(id), id});
    }
  }
  if (j.contains("special_tokens") && j["special_tokens"].is_object()) {
    for (auto it = j["special_tokens"].begin(); it != j["special_tokens"].end(); ++it) {
      if (!it.value().is_number_integer()) {
        return InvalidArgumentError(ranks_json + ": special_tokens." + it.key() + " is not an id");
      }
      const int32_t id = it.value().get<int32_t>();
      t->specials_.push_back({it.key(), id});
      if (static_cast<size_t>(id) >= t->token_bytes_.size()) t->token_bytes_.resize(static_cast<size_t>(id) + 1);
      t->token_bytes_[id] = it.key();
      if (it.key() == "<|endoftext|>") t->eos_ = id;
    }
  }
  t->pattern_ = j["pat_str"].get<std::string>();
  t->ignore_merges_ = true;  // tiktoken takes a piece that is a token as it is
  RETURN_IF_ERROR(t->Finish());
  return t;
}

StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromHuggingFace(const std::string& path) {
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  t->description_ = path;
  ASSIGN_OR_RETURN(Json j, ReadJson(path));
  const std::string where = path + ": ";
  auto refuse = [&](const std::string& key, const Json& value, const std::string& why) {
    return InvalidArgumentError(where + key + " = " + Quoted(value) + " is not supported" +
                                (why.empty() ? "" : " (" + why + ")"));
  };
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object()) {
    return InvalidArgumentError(where + "no \"model\" object (not a Hugging Face tokenizer.json)");
  }
  const Json& model = j["model"];
  if (model.value("type", std::string()) != "BPE") {
    return refuse("model.type", model.contains("type") ? model["type"] : Json(), "byte-level BPE only");
  }
  for (const char* key : {"dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(key) && !model[key].is_null() && !(model[key].is_string() && model[key].get<std::string>().empty())) {
      return refuse(std::string("model.") + key, model[key], "");
    }
  }
  if (model.value("byte_fallback", false)) return refuse("model.byte_fallback", model["byte_fallback"], "");
  t->ignore_merges_ = model.value("ignore_merges", false);

  // The normalizer: none, or NFC (Qwen2).
  if (j.contains("normalizer") && !j["normalizer"].is_null()) {
    const Json& n = j["normalizer"];
    const std::string type = n.is_object() ? n.value("type", std::string()) : std::string();
    const bool empty_sequence = type == "Sequence" && n.contains("normalizers") && n["normalizers"].empty();
    if (type == "NFC") {
      t->nfc_ = true;
    } else if (!empty_sequence) {
      return refuse("normalizer", n, "none or NFC");
    }
  }
  // The pre-tokenizer: ByteLevel (its own regex unless use_regex is false), or a
  // Sequence of Split(regex, Isolated) and ByteLevel(use_regex false).
  bool byte_level = false;
  auto byte_level_step = [&](const Json& p, const std::string& key) -> Status {
    t->add_prefix_space_ = p.value("add_prefix_space", false);
    if (p.value("use_regex", true)) {
      if (!t->pattern_.empty()) return refuse(key + ".use_regex", p["use_regex"], "a second regex after Split");
      t->pattern_ = kGpt2Pattern;
    }
    byte_level = true;
    return OkStatus();
  };
  auto split_step = [&](const Json& p, const std::string& key) -> Status {
    if (!p.contains("pattern") || !p["pattern"].is_object() || !p["pattern"].contains("Regex") ||
        !p["pattern"]["Regex"].is_string()) {
      return refuse(key + ".pattern", p.contains("pattern") ? p["pattern"] : Json(), "a {\"Regex\": ...} pattern");
    }
    if (p.value("behavior", std::string()) != "Isolated") {
      return refuse(key + ".behavior", p.contains("behavior") ? p["behavior"] : Json(), "Isolated only");
    }
    if (p.value("invert", false)) return refuse(key + ".invert", p["invert"], "");
    if (!t->pattern_.empty()) return refuse(key, p, "one regex only");
    t->pattern_ = p["pattern"]["Regex"].get<std::string>();
    return OkStatus();
  };
  if (!j.contains("pre_tokenizer") || !j["pre_tokenizer"].is_object()) {
    return refuse("pre_tokenizer", j.contains("pre_tokenizer") ? j["pre_tokenizer"] : Json(), "ByteLevel expected");
  }
  {
    const Json& p = j["pre_tokenizer"];
    const std::string type = p.value("type", std::string());
    if (type == "ByteLevel") {
      RETURN_IF_ERROR(byte_level_step(p, "pre_tokenizer"));
    } else if (type == "Sequence" && p.contains("pretokenizers") && p["pretokenizers"].is_array()) {
      for (size_t i = 0; i < p["pretokenizers"].size(); ++i) {
        const Json& step = p["pretokenizers"][i];
        const std::string key = "pre_tokenizer.pretokenizers[" + std::to_string(i) + "]";
        const std::string step_type = step.is_object() ? step.value("type", std::string()) : std::string();
        if (step_type == "Split") {
          RETURN_IF_ERROR(split_step(step, key));
        } else if (step_type == "ByteLevel") {
          RETURN_IF_ERROR(byte_level_step(step, key));
        } else {
          return refuse(key + ".type", step.is_object() && step.contains("type") ? step["type"] : step,
                        "Split and ByteLevel only");
        }
      }
    } else {
      return refuse("pre_tokenizer.type", p.contains("type") ? p["type"] : p, "ByteLevel or a Sequence of Split, ByteLevel");
    }
  }
  if (!byte_level) return refuse("pre_tokenizer", j["pre_tokenizer"], "no ByteLevel step: not a byte-level BPE");

  // Vocabulary and merges.
  if (!model.contains("vocab") || !model["vocab"].is_object()) return InvalidArgumentError(where + "model.vocab is not an object");
  std::unordered_map<std::string, int32_t> ids;
  std::string bytes;
  for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() > INT32_MAX) {
      return InvalidArgumentError(where + "model.vocab." + it.key() + " = " + Quoted(it.value()) + " is not a token id");
    }
    if (!AlphabetToBytes(it.key(), &bytes)) {
      return InvalidArgumentError(where + "model.vocab holds " + Quoted(it.key()) +
                                  ", not in the byte-level alphabet");
    }
    const int32_t id = it.value().get<int32_t>();
    if (static_cast<size_t>(id) >= t->token_bytes_.size()) t->token_bytes_.resize(static_cast<size_t>(id) + 1);
    t->token_bytes_[id] = bytes;
    ids[it.key()] = id;
  }
  if (!model.contains("merges") || !model["merges"].is_array()) return InvalidArgumentError(where + "model.merges is not a list");
  const Json& merges = model["merges"];
  for (size_t i = 0; i < merges.size(); ++i) {
    std::string a, b;
    if (merges[i].is_string()) {
      const std::string s = merges[i].get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos) return InvalidArgumentError(where + "model.merges[" + std::to_string(i) + "] = " + Quoted(merges[i]) + " is not \"a b\"");
      a = s.substr(0, space);
      b = s.substr(space + 1);
    } else if (merges[i].is_array() && merges[i].size() == 2 && merges[i][0].is_string() && merges[i][1].is_string()) {
      a = merges[i][0].get<std::string>();
      b = merges[i][1].get<std::string>();
    } else {
      return InvalidArgumentError(where + "model.merges[" + std::to_string(i) + "] = " + Quoted(merges[i]) + " is not a pair");
    }
    auto ia = ids.find(a), ib = ids.find(b), im = ids.find(a + b);
    if (ia == ids.end() || ib == ids.end() || im == ids.end()) {
      return InvalidArgumentError(where + "model.merges[" + std::to_string(i) + "] = " + Quoted(merges[i]) +
                                  " names a token model.vocab does not have");
    }
    t->merges_.emplace(PairKey(ia->second, ib->second), Merge{static_cast<uint32_t>(i), im->second});
  }
  // Added tokens (their text is plain, not in the byte alphabet).
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    for (size_t i = 0; i < j["added_tokens"].size(); ++i) {
      const Json& a = j["added_tokens"][i];
      const std::string key = "added_tokens[" + std::to_string(i) + "]";
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() || !a.contains("content") ||
          !a["content"].is_string() || a["content"].get<std::string>().empty()) {
        return InvalidArgumentError(where + key + " needs an integer id and a non-empty content");
      }
      for (const char* flag : {"lstrip", "rstrip", "single_word"}) {
        if (a.value(flag, false)) return refuse(key + "." + flag, a[flag], "");
      }
      const int32_t id = a["id"].get<int32_t>();
      const std::string content = a["content"].get<std::string>();
      if (static_cast<size_t>(id) >= t->token_bytes_.size()) t->token_bytes_.resize(static_cast<size_t>(id) + 1);
      t->token_bytes_[id] = content;
      t->specials_.push_back({content, id});
      if (!t->eos_ && a.value("special", false) &&
          (content == "<|endoftext|>" || content == "<|end_of_text|>" || content == "</s>" || content == "<|end|>")) {
        t->eos_ = id;
      }
    }
  }
  // A special token the post-processor puts before every sequence: the model's BOS.
  std::function<void(const Json&)> find_bos = [&](const Json& p) {
    if (!p.is_object()) return;
    const std::string type = p.value("type", std::string());
    if (type == "Sequence" && p.contains("processors") && p["processors"].is_array()) {
      for (const Json& q : p["processors"]) find_bos(q);
    } else if (type == "TemplateProcessing" && p.contains("single") && p["single"].is_array() && !p["single"].empty()) {
      const Json& first = p["single"][0];
      if (first.is_object() && first.contains("SpecialToken") && first["SpecialToken"].contains("id") &&
          first["SpecialToken"]["id"].is_string()) {
        t->bos_ = t->SpecialId(first["SpecialToken"]["id"].get<std::string>());
      }
    }
  };
  if (j.contains("post_processor")) find_bos(j["post_processor"]);
  RETURN_IF_ERROR(t->Finish());
  return t;
}

StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Open(const std::string& spec) {
  std::error_code ec;
  std::string path = spec;
  if (spec == "gpt2") {
    const char* env = std::getenv("SINKSCOPE_TOKENIZERS");
    const char* home = std::getenv("HOME");
    const std::string root = env != nullptr && env[0] != '\0' ? env
                             : home != nullptr          ? std::string(home) + "/.cache/sinkscope/tokenizers"
                                                        : std::string(".cache/sinkscope/tokenizers");
    path = root + "/gpt2";
    if (!fs::exists(path + "/encoder.json", ec)) {
      return NotFoundError("tokenizer gpt2: " + path +
                           "/encoder.json does not exist (fetch GPT-2's files with scripts/fetch-tokenizers.sh, or "
                           "set SINKSCOPE_TOKENIZERS)");
    }
  }
  if (fs::is_directory(path, ec)) {
    if (fs::exists(path + "/tokenizer.json", ec)) return FromHuggingFace(path + "/tokenizer.json");
    if (fs::exists(path + "/encoder.json", ec) && fs::exists(path + "/vocab.bpe", ec)) {
      return FromGpt2(path + "/encoder.json", path + "/vocab.bpe");
    }
    return NotFoundError("tokenizer " + spec + ": the folder holds neither tokenizer.json nor encoder.json + vocab.bpe");
  }
  if (!fs::exists(path, ec)) {
    return NotFoundError("tokenizer " + spec + ": no such file or folder (expected gpt2, a folder, tokenizer.json or "
                         "a tiktoken ranks .json)");
  }
  // A file: tokenizer.json has "model", tiktoken's ranks have "bpe_ranks".
  ASSIGN_OR_RETURN(Json j, ReadJson(path));
  if (j.is_object() && j.contains("bpe_ranks")) return FromTiktoken(path);
  return FromHuggingFace(path);
}

// ---- encoding --------------------------------------------------------------------

TokenEncoder::TokenEncoder(const Tokenizer& t) : t_(t) {
  if (t.regex_) match_data_ = pcre2_match_data_create_from_pattern(t.regex_->code, nullptr);
}

TokenEncoder::~TokenEncoder() { pcre2_match_data_free(static_cast<pcre2_match_data*>(match_data_)); }

void TokenEncoder::Encode(std::string_view text, std::vector<int32_t>* out, bool specials) {
  if (!specials || t_.specials_.empty()) {
    EncodeOrdinary(text, out);
    return;
  }
  // The first bytes any special token starts with: only there can one begin.
  std::array<bool, 256> starts{};
  for (const auto& [s, id] : t_.specials_) starts[static_cast<unsigned char>(s[0])] = true;
  size_t begin = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    if (!starts[static_cast<unsigned char>(text[i])]) continue;
    for (const auto& [s, id] : t_.specials_) {  // longest first
      if (text.compare(i, s.size(), s) != 0) continue;
      EncodeOrdinary(text.substr(begin, i - begin), out);
      out->push_back(id);
      begin = i + s.size();
      i = begin - 1;
      break;
    }
  }
  EncodeOrdinary(text.substr(begin), out);
}

void TokenEncoder::EncodeOrdinary(std::string_view text, std::vector<int32_t>* out) {
  if (text.empty()) return;
  std::string normalized;
  if (t_.nfc_) {
    UErrorCode err = U_ZERO_ERROR;
    const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(err);
    const icu::StringPiece piece(text.data(), static_cast<int32_t>(text.size()));
    if (U_SUCCESS(err) && !nfc->isNormalizedUTF8(piece, err) && U_SUCCESS(err)) {
      icu::StringByteSink<std::string> sink(&normalized);
      nfc->normalizeUTF8(0, piece, sink, nullptr, err);
      if (U_SUCCESS(err)) text = normalized;
    }
  }
  std::string prefixed;
  if (t_.add_prefix_space_ && text[0] != ' ') {
    prefixed = " " + std::string(text);
    text = prefixed;
  }
  if (!t_.regex_) {
    EncodePiece(text, out);
    return;
  }
  auto* md = static_cast<pcre2_match_data*>(match_data_);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t pos = 0;
  while (pos < text.size()) {
    const int rc = pcre2_match(t_.regex_->code, subject, text.size(), pos, PCRE2_NOTEMPTY, md, nullptr);
    if (rc < 0) {  // no further match (only invalid UTF-8 or text no alternative takes is left)
      EncodePiece(text.substr(pos), out);
      return;
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    if (ov[0] > pos) EncodePiece(text.substr(pos, ov[0] - pos), out);  // a gap: a piece of its own
    EncodePiece(text.substr(ov[0], ov[1] - ov[0]), out);
    pos = ov[1];
  }
}

void TokenEncoder::EncodePiece(std::string_view piece, std::vector<int32_t>* out) {
  if (piece.empty()) return;
  if (piece.size() == 1) {
    out->push_back(t_.byte_token_[static_cast<unsigned char>(piece[0])]);
    return;
  }
  constexpr size_t kCachedBytes = 128;
  std::string key;
  if (piece.size() <= kCachedBytes) {
    key.assign(piece);
    if (auto it = cache_.find(key); it != cache_.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = out->size();
  auto whole = t_.ignore_merges_ ? t_.by_bytes_.find(std::string(piece)) : t_.by_bytes_.end();
  if (whole != t_.by_bytes_.end()) {
    out->push_back(whole->second);
  } else {
    // Merge the adjacent pair of lowest rank until none is left (leftmost on ties).
    parts_.resize(piece.size());
    for (size_t i = 0; i < piece.size(); ++i) parts_[i] = t_.byte_token_[static_cast<unsigned char>(piece[i])];
    auto rank_of = [&](size_t i) -> uint32_t {
      auto it = t_.merges_.find(PairKey(parts_[i], parts_[i + 1]));
      return it == t_.merges_.end() ? UINT32_MAX : it->second.rank;
    };
    ranks_.resize(parts_.size() - 1);
    for (size_t i = 0; i + 1 < parts_.size(); ++i) ranks_[i] = rank_of(i);
    while (!ranks_.empty()) {
      const size_t i = static_cast<size_t>(std::min_element(ranks_.begin(), ranks_.end()) - ranks_.begin());
      if (ranks_[i] == UINT32_MAX) break;
      parts_[i] = t_.merges_.at(PairKey(parts_[i], parts_[i + 1])).merged;
      parts_.erase(parts_.begin() + static_cast<std::ptrdiff_t>(i) + 1);
      ranks_.erase(ranks_.begin() + static_cast<std::ptrdiff_t>(i));
      if (i + 1 < parts_.size()) ranks_[i] = rank_of(i);
      if (i > 0) ranks_[i - 1] = rank_of(i - 1);
    }
    out->insert(out->end(), parts_.begin(), parts_.end());
  }
  if (!key.empty()) {
    if (cache_.size() >= (size_t{1} << 20)) cache_.clear();
    cache_.emplace(std::move(key), std::vector<int32_t>(out->begin() + static_cast<std::ptrdiff_t>(first), out->end()));
  }
}

std::vector<std::vector<int32_t>> EncodeInParallel(const Tokenizer& tokenizer, const std::vector<std::string_view>& texts,
                                                   int threads, bool specials,
                                                   const std::function<void(size_t, size_t)>& progress) {
  std::vector<std::vector<int32_t>> out(texts.size());
  std::atomic<size_t> next{0}, done{0}, bytes{0};
  auto work = [&] {
    TokenEncoder encoder(tokenizer);
    for (size_t i = next++; i < texts.size(); i = next++) {
      encoder.Encode(texts[i], &out[i], specials);
      bytes += texts[i].size();
      ++done;
    }
  };
  threads = std::max(1, std::min<int>(threads, static_cast<int>(std::max<size_t>(texts.size(), 1))));
  std::vector<std::thread> pool;
  for (int k = 0; k < threads; ++k) pool.emplace_back(work);
  if (progress) {
    while (done.load() < texts.size()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      progress(done.load(), bytes.load());
    }
  }
  for (auto& th : pool) th.join();
  if (progress) progress(done.load(), bytes.load());
  return out;
}

StatusOr<std::vector<int32_t>> PackDocuments(const std::vector<std::string>& documents, const Tokenizer& tokenizer,
                                             int threads, const std::function<void(size_t, size_t)>& progress) {
  if (!tokenizer.eos()) {
    return InvalidArgumentError(tokenizer.description() + ": no end-of-text token is known to put between documents");
  }
  std::vector<std::string_view> texts(documents.begin(), documents.end());
  const std::vector<std::vector<int32_t>> encoded = EncodeInParallel(tokenizer, texts, threads, false, progress);
  size_t total = documents.empty() ? 0 : documents.size() - 1;
  for (const auto& e : encoded) total += e.size();
  std::vector<int32_t> tokens;
  tokens.reserve(total);
  for (size_t i = 0; i < encoded.size(); ++i) {
    if (i > 0) tokens.push_back(*tokenizer.eos());
    tokens.insert(tokens.end(), encoded[i].begin(), encoded[i].end());
  }
  return tokens;
}

}  // namespace sinkscope

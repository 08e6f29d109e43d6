// sinkscope-tokenize: encodes text files with a byte-level BPE tokenizer (data/tokenizer.h)
// and says how fast; with --out, the tokens of each file as JSON lines, for comparisons
// with other tokenizers; --check-decode verifies decode(encode(x)) = x.
//
//   sinkscope-tokenize --tokenizer gpt2|PATH [--threads N] [--specials] [--out FILE]
//                      [--repeat K] [--check-decode] FILE...
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "base/files.h"
#include "base/flags.h"
#include "data/tokenizer.h"

namespace {

constexpr char kTool[] = "sinkscope-tokenize";

int Fail(const sinkscope::Status& status) {
  std::fprintf(stderr, "%s: %s\n", kTool, status.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  namespace flags = sinkscope::flags;
  std::string spec, out_path;
  std::vector<std::string> files;
  int64_t threads = 1, repeat = 1;
  bool specials = false, check_decode = false, json = false;
  CLI::App app("Encodes text files with a byte-level BPE tokenizer and reports the rate (MB/s of text).", kTool);
  app.add_option("FILE", files, "text files")->required();
  app.add_option("--tokenizer", spec,
                 "gpt2 (GPT-2's files in the tokenizer cache), a model folder with tokenizer.json, tokenizer.json, "
                 "GPT-2's folder (encoder.json + vocab.bpe) or a tiktoken ranks .json")
      ->required()
      ->check(flags::NonEmpty());
  app.add_option("--threads", threads, "encode the files on N threads (one file at a time each)")
      ->check(flags::Integer(1, 256))
      ->default_val(1);
  app.add_option("--repeat", repeat, "encode everything K times (for a steadier rate); the output is of the first")
      ->check(flags::Integer(1, 1000))
      ->default_val(1);
  app.add_flag("--specials", specials, "special and added tokens written in the text become their ids");
  app.add_option("--out", out_path, "write {\"file\": ..., \"tokens\": [...]} per file as JSON lines")
      ->check(flags::NonEmpty());
  app.add_flag("--check-decode", check_decode, "fail unless decoding every file's tokens gives its bytes back");
  app.add_flag("--json", json, "print the summary as JSON");
  if (int exit = flags::Parse(app, argc, argv); exit >= 0) return exit;

  const auto load_start = std::chrono::steady_clock::now();
  auto tokenizer = sinkscope::Tokenizer::Open(spec);
  if (!tokenizer.ok()) return Fail(tokenizer.status());
  const double load_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();
  std::vector<std::string> texts;
  size_t bytes = 0;
  for (const std::string& f : files) {
    auto text = sinkscope::ReadRegularFile(f, f, int64_t{1} << 34);
    if (!text.ok()) return Fail(text.status());
    bytes += text->size();
    texts.push_back(std::move(*text));
  }
  std::vector<std::string_view> views(texts.begin(), texts.end());
  std::vector<std::vector<int32_t>> first;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < repeat; ++r) {
    auto tokens = sinkscope::EncodeInParallel(**tokenizer, views, static_cast<int>(threads), specials);
    if (r == 0) first = std::move(tokens);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  size_t count = 0;
  for (const auto& t : first) count += t.size();
  if (check_decode) {
    for (size_t i = 0; i < files.size(); ++i) {
      if ((*tokenizer)->Decode(first[i]) != texts[i]) {
        return Fail(sinkscope::DataLossError(files[i] + ": decoding its tokens does not give its bytes back"));
      }
    }
  }
  if (!out_path.empty()) {
    std::ofstream out(out_path, std::ios::binary | std::ios::trunc);
    for (size_t i = 0; i < files.size(); ++i) out << nlohmann::json{{"file", files[i]}, {"tokens", first[i]}}.dump() << "\n";
    out.flush();
    if (!out) return Fail(sinkscope::InternalError("--out " + out_path + ": cannot write"));
  }
  const double mb_per_s = static_cast<double>(bytes) * static_cast<double>(repeat) / 1e6 / std::max(seconds, 1e-9);
  if (json) {
    std::printf("%s\n", nlohmann::json{{"tokenizer", (*tokenizer)->description()},
                                       {"files", files.size()},
                                       {"bytes", bytes},
                                       {"tokens", count},
                                       {"threads", threads},
                                       {"repeat", repeat},
                                       {"seconds", seconds},
                                       {"load_seconds", load_seconds},
                                       {"mb_per_second", mb_per_s}}
                            .dump()
                            .c_str());
  } else {
    std::printf("%s: %s: %zu files, %.2f MB, %zu tokens (%.2f bytes/token); %.2f MB/s on %lld thread(s) (loaded in %.2f s)\n",
                kTool, (*tokenizer)->description().c_str(), files.size(), bytes / 1e6, count,
                count ? static_cast<double>(bytes) / count : 0.0, mb_per_s, static_cast<long long>(threads),
                load_seconds);
  }
  return 0;
}

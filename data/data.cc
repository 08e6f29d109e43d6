#include "data/data.h"

#include <fcntl.h>
#include <glob.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <system_error>
#include <unordered_map>

#include "base/files.h"
#include "base/rng.h"

namespace sinkscope {
namespace {

namespace fs = std::filesystem;

constexpr int kHeaderInts = 256;
constexpr int64_t kHeaderBytes = kHeaderInts * sizeof(int32_t);

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool IsBlank(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isspace(c) != 0; });
}

// Removes one trailing line terminator ("\n" or "\r\n").
void StripTrailingNewline(std::string& s) {
  if (!s.empty() && s.back() == '\n') {
    s.pop_back();
    if (!s.empty() && s.back() == '\r') s.pop_back();
  }
}

// Splits one file's text into documents, appending the non-blank ones.
void SplitFileText(const std::string& text, const std::string& separator, std::vector<std::string>& out) {
  std::string doc;
  auto finish = [&]() {
    StripTrailingNewline(doc);
    if (!IsBlank(doc)) out.push_back(std::move(doc));
    doc.clear();
  };
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    const bool has_newline = end != std::string::npos;
    if (!has_newline) end = text.size();
    size_t content_end = end;
    if (content_end > pos && text[content_end - 1] == '\r') --content_end;
    if (text.compare(pos, content_end - pos, separator) == 0) {
      finish();
    } else {
      doc.append(text, pos, (has_newline ? end + 1 : end) - pos);
    }
    pos = has_newline ? end + 1 : end;
  }
  finish();  // the end of a file ends a document
}

// Collects the files of one source path: the path itself, or the sorted regular files
// under a folder minus the excluded suffixes.
Status CollectFiles(const std::string& path, const TextSource& source, std::vector<std::string>& files) {
  const std::string what = "text source " + path;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec && (ec.category() == std::generic_category() || ec.category() == std::system_category())) {
    return ErrnoStatus(ec.value(), what);
  }
  if (ec) return InvalidArgumentError(what + ": " + ec.message());
  if (!fs::exists(st)) return NotFoundError(what + ": no such file or directory");
  if (!fs::is_directory(st)) {
    files.push_back(path);  // an explicitly named file is always read
    return OkStatus();
  }
  std::vector<std::string> found;
  std::string last = path;
  fs::recursive_directory_iterator it(path, fs::directory_options::none, ec);
  if (ec) return ErrnoStatus(ec.value(), what, "cannot list folder");
  for (; it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (ec) break;
    std::error_code type_ec;
    last = it->path().string();
    if (!it->is_regular_file(type_ec)) continue;  // folders, broken links, devices
    const std::string name = it->path().filename().string();
    const bool excluded = std::any_of(source.exclude_suffixes.begin(), source.exclude_suffixes.end(),
                                      [&](const std::string& s) { return !s.empty() && EndsWith(name, s); });
    if (!excluded) found.push_back(it->path().string());
  }
  if (ec) return ErrnoStatus(ec.value(), what, "cannot list folder (after " + last + ")");
  std::sort(found.begin(), found.end());
  files.insert(files.end(), found.begin(), found.end());
  return OkStatus();
}

// 0.05 rather than std::to_string's 0.050000.
std::string FormatFraction(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

std::string JoinPaths(const std::vector<std::string>& paths) {
  std::string out;
  for (const std::string& p : paths) out += (out.empty() ? "" : ", ") + p;
  return out;
}

// Reads and concatenates every shard matching a glob.
StatusOr<std::vector<int32_t>> ReadShardGlob(const std::string& pattern) {
  ASSIGN_OR_RETURN(std::vector<std::string> paths, ExpandGlob(pattern));
  std::vector<int32_t> tokens;
  for (const std::string& path : paths) {
    ASSIGN_OR_RETURN(std::vector<int32_t> part, ReadShard(path));
    if (tokens.empty()) {
      tokens = std::move(part);
    } else {
      tokens.insert(tokens.end(), part.begin(), part.end());
    }
  }
  return tokens;
}

int32_t MaxToken(const std::vector<int32_t>& tokens) {
  return tokens.empty() ? 0 : *std::max_element(tokens.begin(), tokens.end());
}

}  // namespace

StatusOr<std::vector<int32_t>> ReadShard(const std::string& path) {
  const std::string what = "shard " + path;
  int64_t size = 0;
  ASSIGN_OR_RETURN(FilePtr f, OpenForRead(path, what, &size));
  if (size < kHeaderBytes) {
    return DataLossError(what + ": truncated header: file is " + std::to_string(size) +
                         " bytes, the header alone needs " + std::to_string(kHeaderBytes));
  }
  int32_t header[kHeaderInts];
  if (std::fread(header, sizeof(int32_t), kHeaderInts, f.get()) != kHeaderInts) {
    return DataLossError(what + ": could not read the " + std::to_string(kHeaderBytes) + "-byte header");
  }
  const int32_t magic = header[0], version = header[1], count = header[2];
  int width = 0, expected_version = 0;
  if (magic == kShardMagicV1) {
    width = 2;
    expected_version = 1;
  } else if (magic == kShardMagicV7) {
    width = 4;
    expected_version = 7;
  } else {
    return DataLossError(what + ": bad magic " + std::to_string(magic) + " (expected " + std::to_string(kShardMagicV1) +
                         " for uint16 or " + std::to_string(kShardMagicV7) + " for uint32 tokens)");
  }
  if (version != expected_version) {
    return DataLossError(what + ": header declares version " + std::to_string(version) + ", expected " +
                         std::to_string(expected_version) + " for magic " + std::to_string(magic));
  }
  const std::string type = width == 2 ? "uint16" : "uint32";
  if (count < 0) return DataLossError(what + ": header declares a negative token count " + std::to_string(count));
  const int64_t need = kHeaderBytes + static_cast<int64_t>(count) * width;
  if (size != need) {
    return DataLossError(what + ": file is " + std::to_string(size) + " bytes but the header's " +
                         std::to_string(count) + " " + type + " tokens need " + std::to_string(need));
  }
  std::vector<int32_t> tokens(static_cast<size_t>(count));
  if (width == 2) {
    std::vector<uint16_t> raw(tokens.size());
    if (!raw.empty() && std::fread(raw.data(), 2, raw.size(), f.get()) != raw.size()) {
      return DataLossError(what + ": short read of " + std::to_string(count) + " uint16 tokens");
    }
    std::copy(raw.begin(), raw.end(), tokens.begin());
  } else {
    std::vector<uint32_t> raw(tokens.size());
    if (!raw.empty() && std::fread(raw.data(), 4, raw.size(), f.get()) != raw.size()) {
      return DataLossError(what + ": short read of " + std::to_string(count) + " uint32 tokens");
    }
    for (size_t i = 0; i < raw.size(); ++i) {
      if (raw[i] > static_cast<uint32_t>(std::numeric_limits<int32_t>::max())) {
        return DataLossError(what + ": token " + std::to_string(i) + " is " + std::to_string(raw[i]) +
                             ", above the largest supported id " + std::to_string(std::numeric_limits<int32_t>::max()));
      }
      tokens[i] = static_cast<int32_t>(raw[i]);
    }
  }
  return tokens;
}

Status WriteShard(const std::string& path, const std::vector<int32_t>& tokens) {
  const std::string what = "shard " + path;
  if (tokens.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return InvalidArgumentError(what + ": " + std::to_string(tokens.size()) +
                                " tokens do not fit the header's int32 count; split them into several shards");
  }
  bool narrow = true;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0) {
      return InvalidArgumentError(what + ": token " + std::to_string(i) + " is negative (" + std::to_string(tokens[i]) +
                                  ")");
    }
    if (tokens[i] > 0xFFFF) narrow = false;
  }
  int32_t header[kHeaderInts] = {};
  header[0] = narrow ? kShardMagicV1 : kShardMagicV7;
  header[1] = narrow ? 1 : 7;
  header[2] = static_cast<int32_t>(tokens.size());

  const std::string tmp = path + ".tmp";
  FilePtr f(std::fopen(tmp.c_str(), "wb"));
  if (f == nullptr) return ErrnoStatus(errno, what, "cannot create " + tmp);
  auto fail = [&](const std::string& action) {
    const int err = errno;
    f.reset();
    std::remove(tmp.c_str());
    return ErrnoStatus(err, what, action + " " + tmp);
  };
  if (std::fwrite(header, sizeof(int32_t), kHeaderInts, f.get()) != kHeaderInts) return fail("cannot write");
  size_t written = 0;
  if (narrow) {
    std::vector<uint16_t> raw(tokens.begin(), tokens.end());
    if (!raw.empty()) written = std::fwrite(raw.data(), 2, raw.size(), f.get());
  } else {
    std::vector<uint32_t> raw(tokens.begin(), tokens.end());
    if (!raw.empty()) written = std::fwrite(raw.data(), 4, raw.size(), f.get());
  }
  if (written != tokens.size()) return fail("cannot write");
  if (std::fflush(f.get()) != 0) return fail("cannot flush");
  if (::fsync(fileno(f.get())) != 0) return fail("cannot fsync");
  if (std::fclose(f.release()) != 0) return fail("cannot close");
  if (std::rename(tmp.c_str(), path.c_str()) != 0) return fail("cannot rename");
  // Make the rename itself durable.
  std::string dir = fs::path(path).parent_path().string();
  if (dir.empty()) dir = ".";
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd < 0) return ErrnoStatus(errno, what, "cannot open folder " + dir + " to fsync it");
  const int rc = ::fsync(dfd);
  const int err = errno;
  ::close(dfd);
  if (rc != 0) return ErrnoStatus(err, what, "cannot fsync folder " + dir);
  return OkStatus();
}

StatusOr<std::vector<std::string>> ExpandGlob(const std::string& pattern) {
  glob_t g;
  const int rc = ::glob(pattern.c_str(), 0, nullptr, &g);
  std::vector<std::string> paths;
  if (rc == 0) {
    for (size_t i = 0; i < g.gl_pathc; ++i) paths.emplace_back(g.gl_pathv[i]);
  }
  ::globfree(&g);
  if (rc == GLOB_NOMATCH || (rc == 0 && paths.empty())) return NotFoundError("no files match the pattern " + pattern);
  if (rc == GLOB_NOSPACE) return InternalError("glob " + pattern + ": out of memory");
  if (rc != 0) return InvalidArgumentError("glob " + pattern + ": read error while matching");
  std::sort(paths.begin(), paths.end());  // byte order, whatever the locale
  return paths;
}

StatusOr<std::vector<std::string>> ReadDocuments(const TextSource& source) {
  if (source.paths.empty()) return InvalidArgumentError("text source: no paths given");
  std::vector<std::string> files;
  for (const std::string& path : source.paths) RETURN_IF_ERROR(CollectFiles(path, source, files));
  std::vector<std::string> documents;
  for (const std::string& file : files) {
    ASSIGN_OR_RETURN(std::string text, ReadRegularFile(file, "text file " + file));
    SplitFileText(text, source.separator, documents);
  }
  if (documents.empty()) {
    return InvalidArgumentError("text source " + JoinPaths(source.paths) + ": no documents in " +
                                std::to_string(files.size()) + " file(s) (every document is empty or blank" +
                                (files.empty() ? ", or every file was excluded by suffix" : "") + ")");
  }
  return documents;
}

std::vector<int32_t> PackDocuments(const std::vector<std::string>& documents) {
  size_t total = documents.empty() ? 0 : documents.size() - 1;
  for (const std::string& d : documents) total += d.size();
  std::vector<int32_t> tokens;
  tokens.reserve(total);
  for (size_t i = 0; i < documents.size(); ++i) {
    if (i > 0) tokens.push_back(kEndOfText);
    for (const char c : documents[i]) tokens.push_back(static_cast<unsigned char>(c));
  }
  return tokens;
}

void TokenStream::Sample(uint64_t seed, uint64_t counter, int B, int T, int32_t* inputs, int32_t* targets) const {
  SampleRows(seed, counter, B, 0, B, T, inputs, targets);
}

void TokenStream::SampleRows(uint64_t seed, uint64_t counter, int B, int first, int rows, int T, int32_t* inputs,
                             int32_t* targets) const {
  if (B <= 0 || T <= 0 || tokens_.size() <= static_cast<size_t>(T) || first < 0 || rows < 0 || first + rows > B) {
    std::fprintf(stderr,
                 "TokenStream::Sample: a stream of %zu tokens cannot give windows %d..%d of B=%d windows of T+1=%d "
                 "tokens\n",
                 tokens_.size(), first, first + rows - 1, B, T + 1);
    std::abort();
  }
  const uint64_t starts = tokens_.size() - static_cast<size_t>(T);  // window starts 0 .. size-T-1
  for (int i = 0; i < rows; ++i) {
    const int b = first + i;
    const uint64_t start = Mix64(seed ^ Mix64(counter * static_cast<uint64_t>(B) + static_cast<uint64_t>(b))) % starts;
    const int32_t* w = tokens_.data() + start;
    int32_t* in = inputs + static_cast<size_t>(i) * T;
    if (bos_ >= 0) {  // [bos, w0 … w(T−2)] → [w0 … w(T−1)]
      in[0] = bos_;
      std::copy(w, w + T - 1, in + 1);
      std::copy(w, w + T, targets + static_cast<size_t>(i) * T);
    } else {
      std::copy(w, w + T, in);
      std::copy(w + 1, w + T + 1, targets + static_cast<size_t>(i) * T);
    }
  }
}

StatusOr<size_t> HeldOutCount(size_t n, double val_fraction, const std::string& what, const std::string& unit) {
  if (!(val_fraction >= 0.0 && val_fraction <= 0.5)) {
    return InvalidArgumentError("data.val_fraction is " + FormatFraction(val_fraction) + "; it must be in [0, 0.5]");
  }
  if (val_fraction == 0.0) return size_t{0};
  size_t held = static_cast<size_t>(std::llround(static_cast<double>(n) * val_fraction));
  if (held == 0) held = 1;
  if (held >= n) {
    return InvalidArgumentError(what + ": only " + std::to_string(n) + " " + unit +
                                " to split, too few to hold out a validation fraction of " +
                                FormatFraction(val_fraction) + " and keep any for training");
  }
  return held;
}

StatusOr<DataSplits> LoadData(const DataSpec& spec) {
  if (!(spec.val_fraction >= 0.0 && spec.val_fraction <= 0.5)) {
    return InvalidArgumentError("data.val_fraction is " + FormatFraction(spec.val_fraction) +
                                "; it must be in [0, 0.5]");
  }
  DataSplits splits;
  std::string train_what, val_what;
  if (!spec.train_shards.empty()) {
    train_what = "train shards " + spec.train_shards;
    ASSIGN_OR_RETURN(std::vector<int32_t> train, ReadShardGlob(spec.train_shards));
    if (train.empty()) return InvalidArgumentError(train_what + ": the shards hold no tokens");
    std::vector<int32_t> val;
    if (!spec.val_shards.empty()) {
      val_what = "validation shards " + spec.val_shards;
      ASSIGN_OR_RETURN(val, ReadShardGlob(spec.val_shards));
      if (val.empty()) return InvalidArgumentError(val_what + ": the shards hold no tokens");
    } else {
      val_what = "validation tokens held out of " + train_what;
      ASSIGN_OR_RETURN(const size_t held, HeldOutCount(train.size(), spec.val_fraction, train_what, "tokens"));
      val.assign(train.end() - static_cast<std::ptrdiff_t>(held), train.end());
      train.resize(train.size() - held);
    }
    splits.train = TokenStream(std::move(train));
    splits.val = TokenStream(std::move(val));
  } else {
    if (spec.text.paths.empty()) {
      return InvalidArgumentError("data: neither train_shards nor text paths are given");
    }
    train_what = "text source " + JoinPaths(spec.text.paths);
    val_what = "validation documents of " + train_what;
    ASSIGN_OR_RETURN(std::vector<std::string> docs, ReadDocuments(spec.text));
    // Whole documents are held out, so none straddles the two splits.
    ASSIGN_OR_RETURN(const size_t held, HeldOutCount(docs.size(), spec.val_fraction, train_what, "documents"));
    const std::vector<std::string> val_docs(std::make_move_iterator(docs.end() - static_cast<std::ptrdiff_t>(held)),
                                            std::make_move_iterator(docs.end()));
    docs.resize(docs.size() - held);
    splits.train = TokenStream(PackDocuments(docs));
    splits.val = TokenStream(PackDocuments(val_docs));
  }
  if (spec.seq_len > 0) {
    const size_t need = static_cast<size_t>(spec.seq_len) + 1;
    if (splits.train.size() < need) {
      return InvalidArgumentError(train_what + ": the training split has " + std::to_string(splits.train.size()) +
                                  " tokens, fewer than one window of model.context + 1 = " + std::to_string(need));
    }
    if (splits.val.size() > 0 && splits.val.size() < need) {
      return InvalidArgumentError(val_what + ": the validation split has " + std::to_string(splits.val.size()) +
                                  " tokens, fewer than one window of model.context + 1 = " + std::to_string(need));
    }
  }
  splits.max_token = std::max(MaxToken(splits.train.tokens()), MaxToken(splits.val.tokens()));
  if (spec.bos >= 0) {
    splits.train.set_bos(spec.bos);
    splits.val.set_bos(spec.bos);
    splits.max_token = std::max(splits.max_token, spec.bos);
  }
  return splits;
}

double UnigramEntropy(const std::vector<int32_t>& tokens) {
  if (tokens.empty()) return 0.0;
  const auto [lo, hi] = std::minmax_element(tokens.begin(), tokens.end());
  std::vector<double> counts;
  if (*lo >= 0 && *hi < (1 << 24)) {
    std::vector<uint64_t> dense(static_cast<size_t>(*hi) + 1, 0);
    for (const int32_t t : tokens) ++dense[static_cast<size_t>(t)];
    for (const uint64_t c : dense) {
      if (c > 0) counts.push_back(static_cast<double>(c));
    }
  } else {
    std::unordered_map<int32_t, uint64_t> sparse;
    for (const int32_t t : tokens) ++sparse[t];
    for (const auto& [t, c] : sparse) counts.push_back(static_cast<double>(c));
  }
  const double n = static_cast<double>(tokens.size());
  double h = 0.0;
  for (const double c : counts) {
    const double p = c / n;
    h -= p * std::log(p);
  }
  return h;
}

}  // namespace sinkscope

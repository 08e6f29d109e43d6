// Structured logs: one line per event, `ts=… level=… event=… key=value…`, to stderr.
// Quiet by default (warnings and errors); --verbose turns on info.
#pragma once

#include <chrono>
#include <cstdio>
#include <ctime>
#include <initializer_list>
#include <mutex>
#include <string>
#include <utility>

namespace sinkscope {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

inline LogLevel& MinLogLevel() {
  static LogLevel level = LogLevel::kWarning;
  return level;
}

// Longest value written whole; a longer one (a hostile worker id, a huge message) is cut
// and says how long it was.
inline constexpr size_t kMaxLogValueBytes = 1024;

// A value as logfmt writes it: bare when it is a plain word, otherwise quoted with `"` and
// `\` escaped and every control character (newline, NUL, ESC, …) written as \n, \r, \t or
// \xHH, so one event is always one line and a value cannot forge another field or event.
inline std::string LogValue(const std::string& value) {
  std::string v = value.size() > kMaxLogValueBytes ? value.substr(0, kMaxLogValueBytes) : value;
  bool quote = v.empty();
  for (unsigned char c : v) quote = quote || c <= ' ' || c == '"' || c == '=' || c == '\\' || c == 0x7f;
  if (value.size() > kMaxLogValueBytes) quote = true;
  if (!quote) return v;
  std::string out = "\"";
  for (unsigned char c : v) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < ' ' || c == 0x7f) {
          static const char kHex[] = "0123456789abcdef";
          out += "\\x";
          out += kHex[c >> 4];
          out += kHex[c & 15];
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  if (value.size() > kMaxLogValueBytes) out += "...(" + std::to_string(value.size()) + " bytes)";
  return out + "\"";
}

inline void Log(LogLevel level, const char* event,
                std::initializer_list<std::pair<const char*, std::string>> fields = {}) {
  if (level < MinLogLevel()) return;
  static std::mutex mu;
  static const char* kNames[] = {"debug", "info", "warn", "error"};
  const auto now = std::chrono::system_clock::now();
  const std::time_t t = std::chrono::system_clock::to_time_t(now);
  const int ms = static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000);
  std::tm tm;
  gmtime_r(&t, &tm);
  char ts[32];
  std::strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
  std::string line = std::string("ts=") + ts + "." + std::to_string(1000 + ms).substr(1) + "Z level=" +
                     kNames[static_cast<int>(level)] + " event=" + event;
  for (const auto& [key, value] : fields) line += std::string(" ") + key + "=" + LogValue(value);
  std::lock_guard<std::mutex> lock(mu);
  std::fprintf(stderr, "%s\n", line.c_str());
}

}  // namespace sinkscope

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

// Values containing spaces, quotes or '=' are quoted.
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
  for (const auto& [key, value] : fields) {
    const bool quote = value.empty() || value.find_first_of(" \"=") != std::string::npos;
    std::string v = value;
    if (quote) {
      std::string escaped;
      for (char c : v) {
        if (c == '"' || c == '\\') escaped += '\\';
        escaped += c;
      }
      v = "\"" + escaped + "\"";
    }
    line += std::string(" ") + key + "=" + v;
  }
  std::lock_guard<std::mutex> lock(mu);
  std::fprintf(stderr, "%s\n", line.c_str());
}

}  // namespace sinkscope

// A live progress line for long work: step, loss, tokens/s and ETA. On a terminal it
// redraws in place; elsewhere (CI, pipes) it prints a plain line every 10%.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>

namespace sinkscope {

class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total, FILE* out = stderr)
      : label_(std::move(label)), total_(total), out_(out), tty_(isatty(fileno(out))),
        start_(std::chrono::steady_clock::now()) {}

  void Update(int64_t done, double loss, double tokens_per_second) {
    char detail[96];
    std::snprintf(detail, sizeof detail, "loss %7.4f  %8.0f tok/s", loss, tokens_per_second);
    Update(done, detail);
  }
  // Any other work: `detail` (a rate, say) between the count and the ETA.
  void Update(int64_t done, const std::string& detail) {
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const double eta = done > 0 ? elapsed * static_cast<double>(total_ - done) / done : 0;
    const int width = 24;
    const int filled = total_ > 0 ? static_cast<int>(width * std::min(done, total_) / total_) : width;
    char line[320];
    std::snprintf(line, sizeof line, "%-22s [%s%s] %6lld/%-6lld %s  ETA %s", label_.c_str(),
                  std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(),
                  static_cast<long long>(done), static_cast<long long>(total_), detail.c_str(),
                  FormatSeconds(eta).c_str());
    if (tty_) {
      std::fprintf(out_, "\r%s\033[K", line);
      std::fflush(out_);
    } else {
      const int decile = total_ > 0 ? static_cast<int>(10 * done / total_) : 10;
      if (decile > last_decile_ || done == total_) {
        last_decile_ = decile;
        std::fprintf(out_, "%s\n", line);
      }
    }
  }

  void Finish() {
    if (tty_) std::fprintf(out_, "\n");
    std::fflush(out_);
  }

  static std::string FormatSeconds(double s) {
    const long t = static_cast<long>(s + 0.5);
    char buf[32];
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    return buf;
  }

 private:
  std::string label_;
  int64_t total_;
  FILE* out_;
  bool tty_;
  int last_decile_ = 0;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace sinkscope

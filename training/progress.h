// A live progress line for long work: step, loss, tokens/s and ETA. On a terminal it
// redraws in place; elsewhere (CI, pipes, a log file) it prints a plain line at the
// first update, then whenever `interval` has passed since the last line or another 10%
// is done, and at the end, so `tail -f` of a log follows the work.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>

namespace sinkscope {

class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total, FILE* out = stderr,
              std::chrono::duration<double> interval = std::chrono::seconds(5))
      : label_(std::move(label)), total_(total), out_(out), tty_(isatty(fileno(out))), interval_(interval),
        start_(std::chrono::steady_clock::now()) {}

  void Update(int64_t done, double loss, double tokens_per_second) {
    char detail[96];
    std::snprintf(detail, sizeof detail, "loss %7.4f  %8.0f tok/s", loss, tokens_per_second);
    Update(done, detail);
  }
  // Any other work: `detail` (a rate, say) between the count and the ETA.
  void Update(int64_t done, const std::string& detail) {
    const auto now = std::chrono::steady_clock::now();
    const double elapsed = std::chrono::duration<double>(now - start_).count();
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
      if (!printed_ || decile > last_decile_ || done == total_ || now - last_line_ >= interval_) {
        last_decile_ = decile;
        last_line_ = now;
        printed_ = true;
        std::fprintf(out_, "%s\n", line);
        std::fflush(out_);
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
  std::chrono::duration<double> interval_;
  int last_decile_ = 0;
  bool printed_ = false;
  std::chrono::steady_clock::time_point start_, last_line_;
};

}  // namespace sinkscope

// Numbers from command-line text, for every tool's flags: the whole text is the number,
// with nothing before or after it (no spaces, no "+", no trailing junk), so "12abc",
// " 5" and "" are rejected rather than read as 12, 5 or 0. Callers check the range.
#pragma once

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace sinkscope {

// A decimal integer, optionally negative, within int64.
inline bool ParseWholeInteger(const std::string& text, int64_t* out) {
  const size_t digits = !text.empty() && text[0] == '-' ? 1 : 0;
  if (text.size() <= digits || !std::isdigit(static_cast<unsigned char>(text[digits]))) return false;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (*end != '\0' || errno != 0) return false;
  *out = v;
  return true;
}

// A finite number (decimal or exponent form).
inline bool ParseWholeNumber(const std::string& text, double* out) {
  if (text.empty() || std::isspace(static_cast<unsigned char>(text[0])) || text[0] == '+') return false;
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text.c_str(), &end);
  if (*end != '\0' || errno != 0 || !std::isfinite(v)) return false;
  *out = v;
  return true;
}

}  // namespace sinkscope

#include "base/flags.h"

#include <cmath>
#include <cstdio>

#include "base/numbers.h"

namespace sinkscope::flags {

CLI::Validator Integer(int64_t min, int64_t max) {
  std::string rule = min == 1 && max >= INT32_MAX   ? "a positive integer"
                     : min == 0 && max >= INT32_MAX ? "a non-negative integer"
                                                    : "an integer in " + std::to_string(min) + "-" +
                                                          std::to_string(max);
  return CLI::Validator(
      [min, max, rule](std::string& v) -> std::string {
        int64_t n = 0;
        if (ParseWholeInteger(v, &n) && n >= min && n <= max) return "";
        return "must be " + rule + ", got '" + v + "'";
      },
      "");
}

CLI::Validator Number(double min, double max) {
  return CLI::Validator(
      [min, max](std::string& v) -> std::string {
        double x = 0;
        if (ParseWholeNumber(v, &x) && std::isfinite(x) && x >= min && x <= max) return "";
        char range[96];
        std::snprintf(range, sizeof range, "a number in [%g, %g]", min, max);
        return std::string("must be ") + range + ", got '" + v + "'";
      },
      "");
}

CLI::Validator NonEmpty() {
  return CLI::Validator([](std::string& v) -> std::string { return v.empty() ? "must not be empty" : ""; }, "");
}

int Parse(CLI::App& app, int argc, char** argv) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::fputs(app.help().c_str(), stdout);
    return 0;
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "%s: %s (see --help)\n", app.get_name().c_str(), e.what());
    return 2;
  }
  return -1;
}

}  // namespace sinkscope::flags

// Command-line flags through CLI11 (Debian libcli11-dev, header-only), the project's way:
// generated --help, environment fallbacks where a flag names one, values checked with
// messages that name the flag, the rule and the value ("--steps: must be a positive
// integer, got 'x'"), and one exit convention: 0 after --help, 2 after a usage error,
// printed as "PROGRAM: MESSAGE (see --help)".
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>

namespace sinkscope::flags {

// An integer in [min, max], the whole value ("12abc" and "1e3" are refused).
CLI::Validator Integer(int64_t min, int64_t max);
// A finite number in [min, max].
CLI::Validator Number(double min, double max);
// A non-empty value.
CLI::Validator NonEmpty();

// Parses argv into `app`. Returns -1 when the program should go on, else its exit code.
int Parse(CLI::App& app, int argc, char** argv);

}  // namespace sinkscope::flags

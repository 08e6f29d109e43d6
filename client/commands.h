// The commands of the `sinkscope` CLI. Each takes the global options and its own
// arguments (global flags already removed), prints its result to stdout and errors to
// stderr, and returns the process exit code.
#pragma once

#include <map>
#include <set>
#include <string>
#include <vector>

#include "schema/credentials.h"

namespace sinkscope::cli {

// Exit codes of every command.
enum ExitCode : int {
  kExitOk = 0,
  kExitServerError = 1,  // the coordinator answered with an error status
  kExitUsage = 2,        // bad arguments, or an experiment file that does not validate
  kExitUnreachable = 3,  // no coordinator at the address
  kExitAuth = 4,         // the coordinator rejected the credentials (UNAUTHENTICATED) or TLS failed
  kExitJobFailed = 5,    // probe: the job failed, or did not end within --wait-seconds
};

// Flags every command shares.
struct GlobalOptions {
  std::string coordinator = "127.0.0.1:50051";  // HOST:PORT
  double timeout_seconds = 10;                  // deadline of every unary call
  bool json = false;                            // print the response messages as JSON
  // Security (docs/security.md): what the flags name...
  ClientTlsFiles tls;      // --tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name
  std::string token_file;  // --token-file, else $SINKSCOPE_TOKEN_FILE
  // ...and what main loads from them before a command talks to the coordinator.
  ClientCredentials credentials;
  std::string token;         // sent as `authorization: Bearer <token>`; empty: none
  std::string token_source;  // where it came from, for messages ("--token-file /x"); never the token
};

// A command's own arguments as main parsed them (CLI11, from the Command's table entry).
struct Args {
  std::vector<std::string> positional;
  std::map<std::string, std::string> values;  // flags with a value: "--step" → "3"
  std::set<std::string> switches;             // flags without one: "--watch"
};

struct Command {
  const char* name;
  const char* synopsis;  // arguments after the name, for the overview
  const char* summary;   // one line, for the overview
  const char* usage;     // the longer text of `sinkscope NAME --help`; nullptr for probe
  // nullptr for probe, whose arguments are RunProbeCommand's (ProbeCommand below).
  int (*run)(const GlobalOptions& options, const Args& args);
  std::vector<std::string> value_flags = {}, switches = {};
  // Positionals: at least min, at most max; `what` names them when missing.
  size_t min_positionals = 0, max_positionals = 0;
  const char* what = "";
};

// Every command, in the order the overview lists them, and one by name (nullptr if none).
const std::vector<Command>& Commands();
const Command* FindCommand(const std::string& name);

// `probe` takes its own arguments (RunProbeCommand's), so it is not in the table's
// calling convention: argv[0] names it, the rest are its arguments.
int ProbeCommand(const GlobalOptions& options, int argc, char** argv);

// Gives a message of ValidateExperiment ("model.kv_heads: must divide …") the file and
// the line of the field it names, when the file spells that field out (or of its nearest
// enclosing section): "quickstart.yaml:7: model.kv_heads: must divide …".
std::string LocateInExperimentFile(const std::string& file, const std::string& text, const std::string& message);

}  // namespace sinkscope::cli

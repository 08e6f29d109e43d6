// sinkscope: the researcher's CLI. Submits experiment files to the coordinator, follows
// and compares their runs, exports what they measured (ExperimentService), and runs the
// diagnostic probe on a checkpoint locally. `main` parses the global flags and hands the
// rest to the command (client/commands.h).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "base/flags.h"
#include "client/commands.h"

namespace sinkscope::cli {
namespace {

const char kFooter[] = R"(
Global options go before or after the command (for probe, before it). Security
(docs/security.md): the token comes from --token-file, else the file $SINKSCOPE_TOKEN_FILE,
else $SINKSCOPE_TOKEN. sinkscope COMMAND --help describes a command.

exit status: 0 ok, 1 the coordinator answered with an error, 2 usage or validation
error, 3 the coordinator cannot be reached, 4 the coordinator rejected the credentials
(UNAUTHENTICATED: a missing or wrong token) or the TLS handshake failed.)";

// Reads the token and the TLS files the options name into `options`; the messages name
// files and variables, never their content.
int LoadCredentials(GlobalOptions* options) {
  auto credentials = LoadClientCredentials(options->tls);
  if (!credentials.ok()) {
    std::fprintf(stderr, "sinkscope: %s\n", credentials.status().message().c_str());
    return kExitUsage;
  }
  options->credentials = std::move(*credentials);
  std::string path = options->token_file, flag = "--token-file";
  if (path.empty()) {
    if (const char* env = std::getenv("SINKSCOPE_TOKEN_FILE"); env != nullptr && *env != '\0') {
      path = env;
      flag = "$SINKSCOPE_TOKEN_FILE";
    }
  }
  auto token = ReadSecret(path, flag, "SINKSCOPE_TOKEN", &options->token_source);
  if (!token.ok()) {
    std::fprintf(stderr, "sinkscope: %s\n", token.status().message().c_str());
    return kExitUsage;
  }
  options->token = std::move(*token);
  return kExitOk;
}

int Main(int argc, char** argv) {
  GlobalOptions options;
  CLI::App app("Submit, follow, compare and export sinkscope experiments on the coordinator.", "sinkscope");
  app.footer(kFooter);
  app.require_subcommand(1);
  app.add_option("--coordinator", options.coordinator, "the coordinator")
      ->envname("SINKSCOPE_COORDINATOR")
      ->check(flags::NonEmpty())
      ->type_name("HOST:PORT")
      ->default_val(options.coordinator);
  app.add_option("--timeout", options.timeout_seconds, "deadline of every unary call, seconds")
      ->check(flags::Number(0.001, 1e7))
      ->default_val(options.timeout_seconds);
  app.add_flag("--json", options.json, "print the response messages as JSON (protobuf's JSON mapping)");
  app.add_flag("--tls", options.tls.tls, "connect over TLS, verifying the coordinator against the system CAs");
  app.add_option("--tls-ca", options.tls.ca_file, "connect over TLS, verifying the coordinator with this CA (PEM)")
      ->check(flags::NonEmpty())
      ->type_name("FILE");
  app.add_option("--tls-cert", options.tls.cert_file, "client certificate (PEM) for mutual TLS, with --tls-key")
      ->check(flags::NonEmpty())
      ->type_name("FILE");
  app.add_option("--tls-key", options.tls.key_file, "its private key (PEM)")->check(flags::NonEmpty())->type_name("FILE");
  app.add_option("--tls-server-name", options.tls.server_name, "expect NAME in the coordinator's certificate")
      ->check(flags::NonEmpty())
      ->type_name("NAME");
  app.add_option("--token-file", options.token_file, "send the client token in FILE as `authorization: Bearer`")
      ->check(flags::NonEmpty())
      ->type_name("FILE");
  // Each command from its table entry; global options may follow it (fallthrough).
  std::map<std::string, Args> parsed;
  for (const Command& c : Commands()) {
    CLI::App* sub = app.add_subcommand(c.name, c.summary);
    if (c.run == nullptr) {  // probe: everything after it is sinkscope-probe's, --help included
      sub->prefix_command();
      sub->set_help_flag();
      continue;
    }
    sub->fallthrough();
    if (c.usage != nullptr) sub->footer(std::string("\n") + c.usage);
    Args& args = parsed[c.name];
    for (const std::string& f : c.value_flags) {
      sub->add_option_function<std::string>(f, [&args, f](const std::string& v) { args.values[f] = v; });
    }
    for (const std::string& f : c.switches) sub->add_flag_callback(f, [&args, f] { args.switches.insert(f); });
    if (c.max_positionals > 0) {
      sub->add_option("ARGS", args.positional, c.what)->expected(0, static_cast<int>(c.max_positionals));
    }
  }
  if (int exit = flags::Parse(app, argc, argv); exit >= 0) return exit;
  CLI::App* chosen = app.get_subcommands().front();
  const Command* c = FindCommand(chosen->get_name());
  if (c->run == nullptr) {
    std::vector<std::string> rest = chosen->remaining();
    std::vector<char*> probe_argv = {argv[0]};
    for (std::string& a : rest) probe_argv.push_back(a.data());
    const bool local = std::find(rest.begin(), rest.end(), "--local") != rest.end();
    const bool help = std::find(rest.begin(), rest.end(), "--help") != rest.end() ||
                      std::find(rest.begin(), rest.end(), "-h") != rest.end();
    if (!local && !help) {  // the job goes to the coordinator
      if (int exit = LoadCredentials(&options); exit != kExitOk) return exit;
    }
    return ProbeCommand(options, static_cast<int>(probe_argv.size()), probe_argv.data());
  }
  const Args& args = parsed[c->name];
  if (args.positional.size() < c->min_positionals) {
    std::fprintf(stderr, "sinkscope %s: %s is required (see sinkscope %s --help)\n", c->name, c->what, c->name);
    return kExitUsage;
  }
  if (int exit = LoadCredentials(&options); exit != kExitOk) return exit;
  return c->run(options, args);
}

}  // namespace
}  // namespace sinkscope::cli

int main(int argc, char** argv) { return sinkscope::cli::Main(argc, argv); }

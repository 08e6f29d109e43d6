// sinkscope: the researcher's CLI. Submits experiment files to the coordinator, follows
// and compares their runs, exports what they measured (ExperimentService), and runs the
// diagnostic probe on a checkpoint locally. `main` parses the global flags and hands the
// rest to the command (client/commands.h).
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "client/commands.h"

namespace sinkscope::cli {
namespace {

void PrintOverview(FILE* out) {
  std::fputs(
      "usage: sinkscope [--coordinator HOST:PORT] [--timeout SECONDS] [--json] [security options] COMMAND [ARGS]\n"
      "\n"
      "Submit, follow, compare and export sinkscope experiments on the coordinator.\n"
      "\n"
      "commands:\n",
      out);
  for (const Command& c : Commands()) {
    const std::string call = std::string(c.name) + " " + c.synopsis;
    std::fprintf(out, "  %-44s %s\n", call.c_str(), c.summary);
  }
  std::fputs(
      "\n"
      "global options (before or after the command; for probe, before it):\n"
      "  --coordinator HOST:PORT   the coordinator (default $SINKSCOPE_COORDINATOR, else 127.0.0.1:50051)\n"
      "  --timeout SECONDS         deadline of every unary call (default 10)\n"
      "  --json                    print the response messages as JSON (protobuf's JSON mapping)\n"
      "  -h, --help                this text; sinkscope COMMAND --help for a command's own\n"
      "\n"
      "security options (docs/security.md):\n"
      "  --tls                     connect over TLS, verifying the coordinator against the system CAs\n"
      "  --tls-ca FILE             connect over TLS, verifying the coordinator with this CA bundle (PEM)\n"
      "  --tls-cert FILE           client certificate (PEM) for mutual TLS, with --tls-key FILE\n"
      "  --tls-key FILE            its private key (PEM)\n"
      "  --tls-server-name NAME    expect NAME in the coordinator's certificate (default: the host)\n"
      "  --token-file FILE         send the client token in FILE as `authorization: Bearer <token>`\n"
      "                            (default: the file $SINKSCOPE_TOKEN_FILE, else $SINKSCOPE_TOKEN)\n"
      "\n"
      "exit status: 0 ok, 1 the coordinator answered with an error, 2 usage or validation\n"
      "error, 3 the coordinator cannot be reached, 4 the coordinator rejected the credentials\n"
      "(UNAUTHENTICATED: a missing or wrong token) or the TLS handshake failed.\n",
      out);
}

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
  if (const char* env = std::getenv("SINKSCOPE_COORDINATOR"); env != nullptr && *env != '\0') {
    options.coordinator = env;
  }
  std::string command;
  std::vector<std::string> args;
  bool help = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (command == "probe") {  // every argument after `probe` is its own
      args.push_back(a);
      continue;
    }
    const size_t eq = a.find('=');
    const std::string flag = a.rfind("--", 0) == 0 ? a.substr(0, eq) : a;
    if (flag == "--coordinator" || flag == "--timeout" || flag == "--tls-ca" || flag == "--tls-cert" ||
        flag == "--tls-key" || flag == "--tls-server-name" || flag == "--token-file") {
      std::string value;
      if (eq != std::string::npos) {
        value = a.substr(eq + 1);
      } else if (i + 1 < argc) {
        value = argv[++i];
      } else {
        std::fprintf(stderr, "sinkscope: option %s needs a value (see sinkscope --help)\n", flag.c_str());
        return kExitUsage;
      }
      if (flag == "--coordinator" && value.empty()) {
        std::fprintf(stderr, "sinkscope: --coordinator needs HOST:PORT\n");
        return kExitUsage;
      }
      if (flag != "--timeout" && value.empty()) {
        std::fprintf(stderr, "sinkscope: %s needs a value (see sinkscope --help)\n", flag.c_str());
        return kExitUsage;
      }
      if (flag == "--coordinator") {
        options.coordinator = value;
      } else if (flag == "--tls-ca") {
        options.tls.ca_file = value;
      } else if (flag == "--tls-cert") {
        options.tls.cert_file = value;
      } else if (flag == "--tls-key") {
        options.tls.key_file = value;
      } else if (flag == "--tls-server-name") {
        options.tls.server_name = value;
      } else if (flag == "--token-file") {
        options.token_file = value;
      } else {
        char* end = nullptr;
        options.timeout_seconds = std::strtod(value.c_str(), &end);
        if (value.empty() || *end != '\0' || !(options.timeout_seconds > 0)) {
          std::fprintf(stderr, "sinkscope: --timeout must be a positive number of seconds, got %s\n", value.c_str());
          return kExitUsage;
        }
      }
    } else if (a == "--json") {
      options.json = true;
    } else if (a == "--tls") {
      options.tls.tls = true;
    } else if (command.empty() && (a == "-h" || a == "--help")) {
      help = true;
    } else if (command.empty() && !a.empty() && a[0] != '-') {
      command = a;
    } else if (command.empty()) {
      std::fprintf(stderr, "sinkscope: unknown option %s (see sinkscope --help)\n", a.c_str());
      return kExitUsage;
    } else {
      args.push_back(a);
    }
  }

  if (command.empty()) {
    PrintOverview(help ? stdout : stderr);
    return help ? kExitOk : kExitUsage;
  }
  if (help) args.insert(args.begin(), "--help");  // `sinkscope --help submit`
  if (command == "help") {                        // `sinkscope help [COMMAND]`
    if (args.empty()) {
      PrintOverview(stdout);
      return kExitOk;
    }
    command = args[0];
    args = {"--help"};
  }
  if (command == "probe") {
    std::vector<char*> probe_argv = {argv[0]};
    for (std::string& a : args) probe_argv.push_back(a.data());
    return ProbeCommand(options, static_cast<int>(probe_argv.size()), probe_argv.data());
  }
  const Command* c = FindCommand(command);
  if (c == nullptr) {
    std::fprintf(stderr, "sinkscope: unknown command \"%s\" (see sinkscope --help)\n", command.c_str());
    return kExitUsage;
  }
  if (int exit = LoadCredentials(&options); exit != kExitOk) return exit;
  return c->run(options, args);
}

}  // namespace
}  // namespace sinkscope::cli

int main(int argc, char** argv) { return sinkscope::cli::Main(argc, argv); }

#include "client/commands.h"

#include <grpcpp/grpcpp.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include "base/flags.h"
#include "client/render.h"
#include "client/report.h"
#include "schema/experiment.h"
#include "proto/sinkscope/v1/service.grpc.pb.h"
#include "base/numbers.h"

namespace sinkscope::cli {
namespace {

using Stub = v1::ExperimentService::Stub;

// ---- arguments ------------------------------------------------------------------------------

int UsageError(const char* command, const std::string& message) {
  std::fprintf(stderr, "sinkscope %s: %s (see sinkscope %s --help)\n", command, message.c_str(), command);
  return kExitUsage;
}


// ---- the coordinator --------------------------------------------------------------------------

// gRPC's canonical code names, indexed by code.
const char* GrpcCodeName(grpc::StatusCode code) {
  static const char* const kNames[] = {
      "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
      "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
      "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
      "DATA_LOSS", "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i < static_cast<int>(std::size(kNames)) ? kNames[i] : "UNKNOWN";
}

std::string Seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", s);
  return buf;
}

// The channel and stub of one command, and how its failures are told.
class Coordinator {
 public:
  explicit Coordinator(const GlobalOptions& options) : options_(options) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);  // probe reports of a long run exceed the 4 MB default
    options.credentials.Apply(&args);
    channel_ = grpc::CreateCustomChannel(options.coordinator, options.credentials.channel, args);
    stub_ = v1::ExperimentService::NewStub(channel_);
  }

  Stub& stub() { return *stub_; }

  // A context for one unary call, with the --timeout deadline and the token.
  std::unique_ptr<grpc::ClientContext> UnaryContext() const {
    auto context = StreamContext();
    context->set_deadline(std::chrono::system_clock::now() +
                          std::chrono::microseconds(static_cast<int64_t>(options_.timeout_seconds * 1e6)));
    return context;
  }

  // A context for a stream (no deadline), with the token.
  std::unique_ptr<grpc::ClientContext> StreamContext() const {
    auto context = std::make_unique<grpc::ClientContext>();
    if (!options_.token.empty()) context->AddMetadata(kAuthorizationKey, std::string(kBearerScheme) + options_.token);
    return context;
  }

  // Prints a failed call's status and returns the exit code: an unreachable coordinator
  // (UNAVAILABLE, or a deadline passed without ever connecting) is told apart from an
  // error the coordinator answered with.
  int Fail(const grpc::Status& status) const {
    const grpc::StatusCode code = status.error_code();
    const bool connected = channel_->GetState(/*try_to_connect=*/false) == GRPC_CHANNEL_READY;
    // Credentials: never the token itself, only where it came from.
    if (code == grpc::StatusCode::UNAUTHENTICATED) {
      const std::string hint =
          options_.token.empty()
              ? "no token was sent; pass the coordinator's client token with --token-file FILE (or "
                "$SINKSCOPE_TOKEN_FILE, or $SINKSCOPE_TOKEN)"
              : "the token from " + options_.token_source +
                    " was not accepted; it must be the coordinator's client token (its --client-token-file)";
      std::fprintf(stderr, "sinkscope: the coordinator rejected the credentials: UNAUTHENTICATED: %s (%s)\n",
                   status.error_message().c_str(), hint.c_str());
      return kExitAuth;
    }
    // A TLS handshake that failed: an error that says so, or, over TLS, a connection the
    // coordinator closed (how a mutual-TLS server refuses a client without a certificate).
    const bool tls_failed = LooksLikeTlsFailure(status.error_message());
    if (code == grpc::StatusCode::UNAVAILABLE &&
        (tls_failed || (options_.credentials.tls && LooksLikeClosedConnection(status.error_message())))) {
      const char* hint =
          !options_.credentials.tls
              ? "the coordinator may serve TLS: pass --tls-ca FILE (and --tls-cert/--tls-key for mutual TLS)"
          : options_.credentials.mutual
              ? "check --tls-ca (the CA that signed the coordinator's certificate), --tls-server-name (a name in "
                "that certificate), and that the coordinator trusts the CA of --tls-cert"
              : "check --tls-ca (the CA that signed the coordinator's certificate) and --tls-server-name (a name in "
                "that certificate); if the coordinator requires client certificates (mutual TLS), pass --tls-cert "
                "and --tls-key";
      std::fprintf(stderr, "sinkscope: the TLS handshake with the coordinator at %s failed (%s): %s — %s\n",
                   options_.coordinator.c_str(), GrpcCodeName(code), status.error_message().c_str(), hint);
      return kExitAuth;
    }
    // UNAVAILABLE over a connected channel is the coordinator's own answer (its store
    // cannot be written, it is shutting down), not an unreachable coordinator.
    const bool answered = connected && status.error_message().rfind("store ", 0) == 0;
    if ((code == grpc::StatusCode::UNAVAILABLE && !answered) ||
        (code == grpc::StatusCode::DEADLINE_EXCEEDED && !connected)) {
      std::string detail = status.error_message();
      if (code == grpc::StatusCode::DEADLINE_EXCEEDED) {
        detail = "no connection within the " + Seconds(options_.timeout_seconds) + " s deadline (--timeout)";
      }
      std::fprintf(stderr,
                   "sinkscope: cannot reach the coordinator at %s (%s): %s — is sinkscope-coordinator running?%s\n",
                   options_.coordinator.c_str(), GrpcCodeName(code), detail.c_str(),
                   options_.credentials.tls ? "" : " (if it serves TLS, pass --tls-ca FILE)");
      return kExitUnreachable;
    }
    std::string message = status.error_message();
    if (code == grpc::StatusCode::DEADLINE_EXCEEDED) {
      message += " (no answer within " + Seconds(options_.timeout_seconds) + " s; raise --timeout)";
    }
    std::fprintf(stderr, "sinkscope: %s: %s\n", GrpcCodeName(code), message.c_str());
    return kExitServerError;
  }

 private:
  const GlobalOptions& options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<Stub> stub_;
};

void PrintJson(const google::protobuf::Message& message) {
  std::printf("%s\n", MessageToJson(message, /*pretty=*/true).c_str());
}

// ---- watch ----------------------------------------------------------------------------------

// Cuts a line to `columns` terminal columns (UTF-8 aware) so a redraw never wraps.
std::string Clip(const std::string& line, int columns) {
  int seen = 0;
  for (size_t i = 0; i < line.size(); ++i) {
    if ((static_cast<unsigned char>(line[i]) & 0xC0) == 0x80) continue;
    if (seen++ == columns) return line.substr(0, i);
  }
  return line;
}

// Redraws a frame in place: up to the first line of the previous frame, every line
// cleared and rewritten, and what the previous frame left below cleared too.
class TerminalFrame {
 public:
  void Draw(std::vector<std::string> lines) {
    winsize ws{};
    int columns = 100, rows = 40;
    if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) {
      columns = ws.ws_col;
      rows = ws.ws_row;
    }
    // A frame taller than the screen would scroll, and the cursor could not get back up.
    if (rows > 2 && static_cast<int>(lines.size()) > rows - 1) {
      const size_t hidden = lines.size() - (rows - 2);
      lines.resize(rows - 2);
      lines.push_back("... " + std::to_string(hidden) + " more lines (a taller terminal shows them)");
    }
    std::string out;
    if (drawn_ > 0) out += "\033[" + std::to_string(drawn_) + "A\r";
    for (const std::string& line : lines) out += Clip(line, columns - 1) + "\033[K\n";
    out += "\033[J";
    std::fwrite(out.data(), 1, out.size(), stdout);
    std::fflush(stdout);
    drawn_ = static_cast<int>(lines.size());
  }

 private:
  int drawn_ = 0;  // lines of the frame on screen
};

int Watch(const GlobalOptions& options, Coordinator& coordinator, const std::string& experiment_id) {
  // A unary call first: an unknown id or an unreachable coordinator fails fast, with a deadline.
  v1::GetExperimentRequest get;
  get.set_experiment_id(experiment_id);
  v1::ExperimentSummary summary;
  if (grpc::Status s = coordinator.stub().GetExperiment(coordinator.UnaryContext().get(), get, &summary); !s.ok()) {
    return coordinator.Fail(s);
  }

  v1::WatchExperimentRequest request;
  request.set_experiment_id(experiment_id);
  request.set_include_probes(true);
  const bool terminal = !options.json && isatty(STDOUT_FILENO);
  WatchView view;
  TerminalFrame frame;
  auto last_draw = std::chrono::steady_clock::time_point();
  // A coordinator that goes away (restarted, SIGKILLed and brought back on its store) is
  // waited for: the watch reconnects with back-off and carries on from a fresh snapshot,
  // giving up only after kWatchPatience without an answer.
  constexpr auto kWatchPatience = std::chrono::minutes(5);
  auto backoff = std::chrono::milliseconds(500);
  auto give_up_at = std::chrono::steady_clock::now() + kWatchPatience;
  grpc::Status status;
  for (;;) {
    auto context = coordinator.StreamContext();  // no deadline: the stream lasts as long as the experiment
    auto reader = coordinator.stub().WatchExperiment(context.get(), request);
    v1::WatchEvent event;
    while (reader->Read(&event)) {
      backoff = std::chrono::milliseconds(500);
      give_up_at = std::chrono::steady_clock::now() + kWatchPatience;
      if (options.json) {
        std::printf("%s\n", MessageToJson(event, /*pretty=*/false).c_str());
        std::fflush(stdout);
        continue;
      }
      std::vector<std::string> lines = view.Apply(event);
      if (terminal) {
        // Steps can arrive faster than a terminal is worth redrawing; state changes and
        // probes are drawn at once.
        const auto now = std::chrono::steady_clock::now();
        if (event.event_case() != v1::WatchEvent::kStep || now - last_draw >= std::chrono::milliseconds(100)) {
          frame.Draw(view.Frame());
          last_draw = now;
        }
      } else {
        for (const std::string& line : lines) std::printf("%s\n", line.c_str());
        std::fflush(stdout);
      }
    }
    status = reader->Finish();
    if (status.ok() || status.error_code() != grpc::StatusCode::UNAVAILABLE ||
        std::chrono::steady_clock::now() + backoff > give_up_at) {
      break;
    }
    std::fprintf(stderr, "sinkscope watch: the coordinator is unavailable (%s); reconnecting in %.1f s\n",
                 status.error_message().c_str(), std::chrono::duration<double>(backoff).count());
    std::this_thread::sleep_for(backoff);
    backoff = std::min<std::chrono::milliseconds>(2 * backoff, std::chrono::seconds(5));
  }
  if (terminal && view.has_snapshot()) frame.Draw(view.Frame());
  if (!status.ok()) return coordinator.Fail(status);

  // The stream ends with the experiment: the final state of every run.
  if (grpc::Status s = coordinator.stub().GetExperiment(coordinator.UnaryContext().get(), get, &summary); !s.ok()) {
    if (!view.has_snapshot()) return coordinator.Fail(s);
    summary = view.summary();  // the last snapshot is the next best thing
  }
  if (options.json) {
    std::printf("%s\n", MessageToJson(summary, /*pretty=*/false).c_str());
  } else {
    std::printf("\n%s", RenderExperimentStatus(summary).c_str());
  }
  return kExitOk;
}

// ---- commands -------------------------------------------------------------------------------

// Relative data paths were resolved against the experiment file's folder; the workers
// resolve them from wherever they run, so send them absolute.
void MakeDataPathsAbsolute(v1::Experiment& e) {
  auto absolute = [](std::string* p) {
    if (!p->empty() && (*p)[0] != '/') *p = std::filesystem::absolute(*p).lexically_normal().string();
  };
  if (e.data().has_text()) {
    for (auto& p : *e.mutable_data()->mutable_text()->mutable_paths()) absolute(&p);
  }
  if (e.data().has_shards()) {
    absolute(e.mutable_data()->mutable_shards()->mutable_train());
    if (!e.data().shards().val().empty()) absolute(e.mutable_data()->mutable_shards()->mutable_val());
  }
}

int Submit(const GlobalOptions& options, const Args& args) {
  const std::string& file = args.positional[0];
  auto experiment = LoadExperimentFile(file);
  if (!experiment.ok()) {
    std::fprintf(stderr, "sinkscope: %s\n", experiment.status().message().c_str());
    return kExitUsage;
  }
  // Validated locally on a defaulted copy; the coordinator fills in the defaults itself
  // and validates again (data paths are checked where the runs will read them).
  v1::Experiment defaulted = *experiment;
  ApplyDefaults(defaulted);
  if (Status s = ValidateExperiment(defaulted, /*check_paths=*/false); !s.ok()) {
    std::ifstream in(file);
    std::stringstream text;
    text << in.rdbuf();
    std::fprintf(stderr, "sinkscope: %s\n", LocateInExperimentFile(file, text.str(), s.message()).c_str());
    return kExitUsage;
  }
  MakeDataPathsAbsolute(*experiment);

  Coordinator coordinator(options);
  v1::SubmitExperimentRequest request;
  *request.mutable_experiment() = *experiment;
  v1::SubmitExperimentResponse response;
  if (grpc::Status s = coordinator.stub().SubmitExperiment(coordinator.UnaryContext().get(), request, &response);
      !s.ok()) {
    return coordinator.Fail(s);
  }
  if (options.json) {
    // With --watch the stream's JSON lines follow, so keep this one to a line as well.
    std::printf("%s\n", MessageToJson(response, /*pretty=*/!args.switches.count("--watch")).c_str());
  } else {
    std::printf("%s", RenderSubmitted(response).c_str());
    if (!args.switches.count("--watch")) {
      std::printf("follow it with: sinkscope watch %s\n", response.experiment_id().c_str());
    }
  }
  std::fflush(stdout);
  if (args.switches.count("--watch")) {
    if (!options.json) std::printf("\n");
    return Watch(options, coordinator, response.experiment_id());
  }
  return kExitOk;
}

int List(const GlobalOptions& options, const Args& args) {
  v1::ListExperimentsRequest request;
  if (args.values.count("--limit")) {
    int64_t limit = 0;
    if (!ParseWholeInteger(args.values.at("--limit"), &limit) || limit <= 0 || limit > INT32_MAX) {
      return UsageError("list", "--limit must be a positive integer, got " + args.values.at("--limit"));
    }
    request.set_limit(static_cast<int32_t>(limit));
  }
  Coordinator coordinator(options);
  v1::ListExperimentsResponse response;
  if (grpc::Status s = coordinator.stub().ListExperiments(coordinator.UnaryContext().get(), request, &response);
      !s.ok()) {
    return coordinator.Fail(s);
  }
  if (options.json) {
    PrintJson(response);
  } else {
    std::printf("%s", RenderExperimentList(response).c_str());
  }
  return kExitOk;
}

int StatusCommand(const GlobalOptions& options, const Args& args) {
  Coordinator coordinator(options);
  v1::GetExperimentRequest request;
  request.set_experiment_id(args.positional[0]);
  v1::ExperimentSummary response;
  if (grpc::Status s = coordinator.stub().GetExperiment(coordinator.UnaryContext().get(), request, &response);
      !s.ok()) {
    return coordinator.Fail(s);
  }
  if (options.json) {
    PrintJson(response);
  } else {
    std::printf("%s", RenderExperimentStatus(response).c_str());
  }
  return kExitOk;
}

int WatchCommand(const GlobalOptions& options, const Args& args) {
  Coordinator coordinator(options);
  return Watch(options, coordinator, args.positional[0]);
}

int Cancel(const GlobalOptions& options, const Args& args) {
  Coordinator coordinator(options);
  v1::CancelExperimentRequest request;
  request.set_experiment_id(args.positional[0]);
  v1::ExperimentSummary response;
  if (grpc::Status s = coordinator.stub().CancelExperiment(coordinator.UnaryContext().get(), request, &response);
      !s.ok()) {
    return coordinator.Fail(s);
  }
  if (options.json) {
    PrintJson(response);
  } else {
    std::printf("cancelled %s\n\n%s", response.experiment_id().c_str(), RenderExperimentStatus(response).c_str());
  }
  return kExitOk;
}

int Compare(const GlobalOptions& options, const Args& args) {
  v1::CompareArmsRequest request;
  request.set_experiment_id(args.positional[0]);
  if (args.values.count("--step")) {
    int64_t step = 0;
    if (!ParseWholeInteger(args.values.at("--step"), &step) || step < 0) {
      return UsageError("compare", "--step must be a non-negative integer, got " + args.values.at("--step"));
    }
    request.set_step(step);
  }
  if (args.values.count("--point")) {
    int64_t point = 0;
    std::string text = args.values.at("--point");
    if (!text.empty() && text[0] == 'p') text.erase(0, 1);  // "p3" as status shows it, or "3"
    if (!ParseWholeInteger(text, &point) || point < 0 || point > INT32_MAX) {
      return UsageError("compare", "--point must be a point of the sweep as status lists it (p0, p1, ... or 0, 1, ...), got " +
                                       args.values.at("--point"));
    }
    request.set_point(static_cast<int32_t>(point));
  }
  Coordinator coordinator(options);
  v1::CompareArmsResponse response;
  if (grpc::Status s = coordinator.stub().CompareArms(coordinator.UnaryContext().get(), request, &response); !s.ok()) {
    return coordinator.Fail(s);
  }
  if (options.json) {
    PrintJson(response);
  } else {
    std::printf("%s", RenderComparison(response).c_str());
  }
  return kExitOk;
}

// "runs.csv" → "runs.probes.csv"; "runs" → "runs.probes.csv".
std::string ProbeCsvPath(const std::string& steps_path) {
  std::filesystem::path p(steps_path);
  if (p.extension() == ".csv") p.replace_extension();
  return p.string() + ".probes.csv";
}

// An output of `export`: stdout, or a file written under a temporary name and renamed
// into place when complete (a failed export never leaves a half file under --out).
class ExportSink {
 public:
  explicit ExportSink(std::string path) : path_(std::move(path)) {}
  ~ExportSink() {
    if (file_ != nullptr && file_ != stdout) {
      std::fclose(file_);
      std::remove(temp_.c_str());
    }
  }
  bool Open() {
    if (path_.empty()) {
      file_ = stdout;
      return true;
    }
    temp_ = path_ + ".partial";
    errno = 0;
    file_ = std::fopen(temp_.c_str(), "wb");
    return file_ != nullptr || Fail(errno);
  }
  bool Write(const std::string& text) {
    if (text.empty()) return true;
    return std::fwrite(text.data(), 1, text.size(), file_) == text.size() || Fail(errno);
  }
  bool Close() {
    if (file_ == stdout) return std::fflush(stdout) == 0;
    FILE* f = file_;
    file_ = nullptr;
    if (std::fclose(f) != 0) return Fail(errno);
    if (std::rename(temp_.c_str(), path_.c_str()) != 0) return Fail(errno);
    return true;
  }

 private:
  bool Fail(int error) {
    std::fprintf(stderr, "sinkscope export: cannot write --out %s: %s\n", path_.c_str(),
                 error != 0 ? std::strerror(error) : "write failed");
    return false;
  }
  std::string path_, temp_;
  FILE* file_ = nullptr;
};

// Every page of one run's steps (or probe reports), in order, each handed to `page` as it
// arrives: the export holds one page at a time, whatever the run's length.
constexpr int64_t kExportPageBytes = int64_t{1} << 20;
grpc::Status ForEachPage(Coordinator& coordinator, const v1::RunSummary& run, bool steps,
                         const std::function<bool(const v1::GetRunMetricsResponse&)>& page) {
  int64_t from = 0;
  do {
    v1::GetRunMetricsRequest request;
    request.set_run_id(run.run_id());
    request.set_from_step(from);
    request.set_max_bytes(kExportPageBytes);
    if (steps) {
      request.set_steps_only(true);
    } else {
      request.set_probes_only(true);
    }
    v1::GetRunMetricsResponse metrics;
    if (grpc::Status s = coordinator.stub().GetRunMetrics(coordinator.UnaryContext().get(), request, &metrics);
        !s.ok()) {
      return s;
    }
    if (!metrics.has_run()) *metrics.mutable_run() = run;
    if (!page(metrics)) return grpc::Status(grpc::StatusCode::CANCELLED, "the export's output failed (said above)");
    if (metrics.next_from_step() != 0 && metrics.next_from_step() <= from) {
      return grpc::Status(grpc::StatusCode::INTERNAL, "the coordinator's page of run " + run.run_id() +
                                                          " did not advance past step " + std::to_string(from));
    }
    from = metrics.next_from_step();
  } while (from != 0);
  return grpc::Status::OK;
}

int Export(const GlobalOptions& options, const Args& args) {
  if (args.positional.size() != 1) return UsageError("export", "takes one experiment ID");
  const std::string format = args.values.count("--format") ? args.values.at("--format") : "csv";
  if (format != "csv" && format != "jsonl") return UsageError("export", "--format must be csv or jsonl, got " + format);
  const std::string out_path = args.values.count("--out") ? args.values.at("--out") : "";

  Coordinator coordinator(options);
  v1::GetExperimentRequest get;
  get.set_experiment_id(args.positional[0]);
  v1::ExperimentSummary experiment;
  if (grpc::Status s = coordinator.stub().GetExperiment(coordinator.UnaryContext().get(), get, &experiment); !s.ok()) {
    return coordinator.Fail(s);
  }
  const std::string& id = experiment.experiment_id();
  // Read a page at a time and written as read (issue 28: reads that stream). CSV: the
  // step table (every run), then the probe table, to --out and its .probes.csv, or on
  // stdout separated by an empty line. jsonl: per run, its steps then its reports.
  int64_t step_rows = 0, probe_reports = 0;
  bool write_failed = false;  // the sink printed why
  ExportSink steps_out(out_path);
  if (!steps_out.Open()) return kExitUsage;
  // One run's steps (or reports), page by page, each formatted and written as it comes.
  auto write_run = [&](ExportSink& sink, const v1::RunSummary& run, bool steps) -> int {
    grpc::Status s = ForEachPage(coordinator, run, steps, [&](const v1::GetRunMetricsResponse& page) {
      step_rows += page.steps_size();
      probe_reports += page.probes_size();
      write_failed = !sink.Write(format == "jsonl" ? JsonLines(id, page)
                                 : steps         ? StepCsvRows(id, page)
                                                 : ProbeCsvRows(id, page));
      return !write_failed;
    });
    if (write_failed) return kExitUsage;
    return s.ok() ? kExitOk : coordinator.Fail(s);
  };
  auto pass = [&](ExportSink& sink, bool steps) -> int {  // every run's steps (or reports)
    for (const v1::RunSummary& run : experiment.runs()) {
      if (int rc = write_run(sink, run, steps); rc != kExitOk) return rc;
    }
    return kExitOk;
  };
  if (format == "jsonl") {  // per run, its steps then its reports
    for (const v1::RunSummary& run : experiment.runs()) {
      for (bool steps : {true, false}) {
        if (int rc = write_run(steps_out, run, steps); rc != kExitOk) return rc;
      }
    }
    if (!steps_out.Close()) return kExitUsage;
    if (!out_path.empty()) {
      std::fprintf(stderr, "%s: %lld steps and %lld probe reports of %d runs to %s\n", id.c_str(),
                   static_cast<long long>(step_rows), static_cast<long long>(probe_reports), experiment.runs_size(),
                   out_path.c_str());
    }
    return kExitOk;
  }
  if (!steps_out.Write(StepCsvHeader())) return kExitUsage;
  if (int rc = pass(steps_out, true); rc != kExitOk) return rc;
  if (out_path.empty()) {  // stdout: the step table, a blank line, then the probe table
    if (!steps_out.Write("\n" + ProbeCsvHeader())) return kExitUsage;
    if (int rc = pass(steps_out, false); rc != kExitOk) return rc;
    return steps_out.Close() ? kExitOk : kExitUsage;
  }
  const std::string probe_path = ProbeCsvPath(out_path);
  ExportSink probes_out(probe_path);
  if (!probes_out.Open() || !probes_out.Write(ProbeCsvHeader())) return kExitUsage;
  if (int rc = pass(probes_out, false); rc != kExitOk) return rc;
  if (!steps_out.Close() || !probes_out.Close()) return kExitUsage;
  std::fprintf(stderr, "%s: %lld step rows of %d runs to %s, %lld probe reports to %s\n", id.c_str(),
               static_cast<long long>(step_rows), experiment.runs_size(), out_path.c_str(),
               static_cast<long long>(probe_reports), probe_path.c_str());
  return kExitOk;
}

int FetchExperiment(const GlobalOptions& options, const std::string& id, report::ReportInput* out);
int WriteReportOf(const std::string& id, const report::ReportInput& input, const report::ReportOptions& ro,
                  const std::string& out);

int ReportCommand(const GlobalOptions& options, const Args& args) {
  // With --probe FILE the figures come from one probe written by `sinkscope probe --local --json`
  // (a pretrained model, say), not from a coordinator: no experiment ID then.
  // With --train-dir they come from the runs sinkscope-train wrote (metrics.jsonl, probes.jsonl).
  const bool from_probe = args.values.count("--probe") > 0;
  const bool from_train = args.values.count("--train-dir") > 0;
  if (from_probe && from_train) return UsageError("report", "--probe and --train-dir exclude each other");
  if (!from_probe && !from_train && args.positional.empty()) {
    return UsageError("report", "an experiment ID is required (or --probe FILE, or --train-dir DIR)");
  }
  if ((from_probe || from_train) && !args.positional.empty()) {
    return UsageError("report", std::string("nothing but ") + (from_probe ? "--probe FILE" : "--train-dir DIR") +
                                    ", got " + args.positional[0]);
  }
  report::ReportOptions ro;
  if (args.values.count("--step")) {
    if (!ParseWholeInteger(args.values.at("--step"), &ro.step) || ro.step <= 0) {
      return UsageError("report", "--step must be a positive integer, got " + args.values.at("--step"));
    }
  }
  if (args.values.count("--layer")) {
    int64_t layer = 0;
    if (!ParseWholeInteger(args.values.at("--layer"), &layer) || layer < 0 || layer > INT32_MAX) {
      return UsageError("report", "--layer must be a non-negative integer, got " + args.values.at("--layer"));
    }
    ro.layer = static_cast<int>(layer);
  }
  if (args.values.count("--arms")) {
    std::stringstream list(args.values.at("--arms"));
    for (std::string arm; std::getline(list, arm, ',');) {
      if (!arm.empty()) ro.arms.push_back(arm);
    }
    if (ro.arms.empty()) return UsageError("report", "--arms names no arm");
  }
  report::ReportInput input;
  std::string id;
  if (from_probe) {
    const std::string file = args.values.at("--probe");
    id = args.values.count("--label") ? args.values.at("--label") : std::filesystem::path(file).stem().string();
    StatusOr<report::ReportInput> read = report::ReadProbeJson(file, id);
    if (!read.ok()) {
      std::fprintf(stderr, "sinkscope report: %s\n", read.status().message().c_str());
      return kExitUsage;
    }
    input = std::move(*read);
  } else if (from_train) {
    std::vector<std::string> dirs;
    std::stringstream list(args.values.at("--train-dir"));
    for (std::string dir; std::getline(list, dir, ',');) {
      if (!dir.empty()) dirs.push_back(dir);
    }
    if (dirs.empty()) return UsageError("report", "--train-dir names no directory");
    id = args.values.count("--label") ? args.values.at("--label")
                                      : std::filesystem::path(dirs[0]).lexically_normal().filename().string();
    if (id.empty()) id = "train";
    StatusOr<report::ReportInput> read = report::ReadTrainDirs(dirs, id);
    if (!read.ok()) {
      std::fprintf(stderr, "sinkscope report: %s\n", read.status().message().c_str());
      return kExitUsage;
    }
    input = std::move(*read);
  } else {
    id = args.positional[0];
  }
  const std::string out = args.values.count("--out") ? args.values.at("--out") : "report-" + id;
  int64_t only_point = -1;
  if (args.values.count("--point")) {
    std::string text = args.values.at("--point");
    if (!text.empty() && text[0] == 'p') text.erase(0, 1);
    if (from_probe || !ParseWholeInteger(text, &only_point) || only_point < 0 || only_point > INT32_MAX) {
      return UsageError("report", from_probe ? "--point is for an experiment's sweep, not --probe"
                                             : "--point must be a point of the sweep as status lists it (p0, p1, ... "
                                               "or 0, 1, ...), got " + args.values.at("--point"));
    }
  }
  if (!from_probe && !from_train) {
    if (int exit = FetchExperiment(options, id, &input); exit != kExitOk) return exit;
  }
  // A sweep: one report per point (its runs only, arms side by side), in out/p<k>/, or
  // only the point asked for, in out/.
  std::map<int, std::string> points;
  for (const v1::RunSummary& r : input.experiment.runs()) {
    if (!r.point().empty()) points[r.point_index()] = r.point();
  }
  if (points.empty()) {
    if (only_point > 0) return UsageError("report", "experiment " + id + " has no sweep: its only point is p0");
    return WriteReportOf(id, input, ro, out);
  }
  auto of_point = [&](int point) {
    report::ReportInput one = input;
    one.experiment.clear_runs();
    for (const v1::RunSummary& r : input.experiment.runs()) {
      if (r.point_index() == point) *one.experiment.add_runs() = r;
    }
    return one;
  };
  if (only_point >= 0) {
    if (!points.count(static_cast<int>(only_point))) {
      return UsageError("report", "experiment " + id + " has points p0 ... p" + std::to_string(points.rbegin()->first) +
                                      ", not p" + std::to_string(only_point));
    }
    std::printf("point p%lld: %s\n", static_cast<long long>(only_point), points.at(only_point).c_str());
    return WriteReportOf(id, of_point(static_cast<int>(only_point)), ro, out);
  }
  for (const auto& [point, label] : points) {
    std::printf("point p%d: %s\n", point, label.c_str());
    if (int exit = WriteReportOf(id, of_point(point), ro, out + "/p" + std::to_string(point)); exit != kExitOk) {
      return exit;
    }
  }
  return kExitOk;
}

// The experiment with every run's steps and probes, for the report.
int FetchExperiment(const GlobalOptions& options, const std::string& id, report::ReportInput* out) {
  report::ReportInput& input = *out;
  Coordinator coordinator(options);
  v1::GetExperimentRequest get;
  get.set_experiment_id(id);
  if (grpc::Status s = coordinator.stub().GetExperiment(coordinator.UnaryContext().get(), get, &input.experiment);
      !s.ok()) {
    return coordinator.Fail(s);
  }
  // Page by page (each answer at most about 1 MiB, whatever the run's length); the report
  // keeps what its figures draw, every step and report of every run.
  for (const v1::RunSummary& run : input.experiment.runs()) {
    v1::GetRunMetricsResponse& metrics = input.metrics[run.run_id()];
    *metrics.mutable_run() = run;
    for (bool steps : {true, false}) {
      grpc::Status s = ForEachPage(coordinator, run, steps, [&](const v1::GetRunMetricsResponse& page) {
        for (const v1::StepMetrics& m : page.steps()) *metrics.add_steps() = m;
        for (const v1::ProbeReport& p : page.probes()) *metrics.add_probes() = p;
        if (page.has_run()) *metrics.mutable_run() = page.run();
        return true;
      });
      if (!s.ok()) return coordinator.Fail(s);
    }
  }
  return kExitOk;
}

int WriteReportOf(const std::string& id, const report::ReportInput& input, const report::ReportOptions& ro,
                  const std::string& out) {
  StatusOr<report::Report> built = report::BuildReport(input, ro);
  if (!built.ok()) {
    std::fprintf(stderr, "sinkscope report: %s: %s\n", StatusCodeName(built.status().code()),
                 built.status().message().c_str());
    return kExitServerError;
  }
  if (Status s = report::WriteReport(*built, input, out); !s.ok()) {
    std::fprintf(stderr, "sinkscope report: %s\n", s.message().c_str());
    return kExitUsage;
  }
  std::printf(
      "report of %s at step %lld (%zu figures, arms %s): %s/index.html\n", id.c_str(),
      static_cast<long long>(built->step), built->figures.size(),
      [&] {
        std::string a;
        for (const std::string& x : built->arms) a += (a.empty() ? "" : ", ") + x;
        return a;
      }()
          .c_str(),
      out.c_str());
  return kExitOk;
}

// ---- usage texts ------------------------------------------------------------------------------

const char kSubmitUsage[] = R"(usage: sinkscope submit FILE [--watch]

Validates an experiment file (YAML or JSON mapped onto sinkscope.v1.Experiment, see
proto/sinkscope/v1/experiment.proto) with its defaults filled in, then submits it to the
coordinator, which queues one run per arm x seed. Prints the experiment id and its run ids.
A mistake in the file is reported with the file, the line, the field path and the rule,
before anything is sent (exit status 2). Relative data paths are taken relative to the
file and sent as absolute paths.

  --watch      follow the experiment right away (see sinkscope watch --help)
  -h, --help   this text
)";

const char kListUsage[] = R"(usage: sinkscope list [--limit N]

Experiments on the coordinator, most recent first: id, name, state, creation time (UTC),
progress (steps done over steps of all runs) and the runs by state.

  --limit N    at most N experiments (default: the coordinator's, 50)
  -h, --help   this text
)";

const char kStatusUsage[] = R"(usage: sinkscope status ID

One experiment and every run of it: state, step/total, loss, validation loss, tokens/s,
ETA, attempt and worker; below the table, each failed run's reason and message.
With --json: the ExperimentSummary, the submitted experiment (defaults filled in) included.

  -h, --help   this text
)";

const char kWatchUsage[] = R"(usage: sinkscope watch ID

Follows an experiment until it ends: per run a progress bar with step, loss, tokens/s and
ETA, and the latest probe report per layer (R_GS, sink rate, and the token-s norm ratios
of h_out, r_attn, r_mlp and v). On a terminal the view is redrawn in place; otherwise a
line is printed per run at every 10% of its progress (with its latest probe) and on every
state change. When the experiment ends, prints its final status. Ctrl-C stops watching;
the experiment goes on. With --json: one WatchEvent per line, then the final
ExperimentSummary.

  -h, --help   this text
)";

const char kCancelUsage[] = R"(usage: sinkscope cancel ID

Cancels every queued or running run of an experiment (FAILED_PRECONDITION if it has
already ended) and prints its status.

  -h, --help   this text
)";

const char kCompareUsage[] = R"(usage: sinkscope compare ID [--step N] [--point P]

The arms of an experiment side by side, as mean ± std over seeds (the numbers behind the
paper's Figures 1 and 7). Per layer, one row per arm: R_GS at the sink position, sink
rate, the token-s norm ratios of h_out, r_mlp, r_attn and v (token s over the mean of
tokens 1..15), massive activations (top-1 |h_out| over the median) and the mean V-scale
theta. Then a summary: median R_GS over layers, final loss, validation loss, tokens/s.

  --step N     compare the probes of step N (default: the latest step probed in every run)
  --point P    with a sweep, only its point P (p0, p1, ... as status lists them); by default
               every point, one after the other, each with its arms side by side
  -h, --help   this text
)";

const char kReportUsage[] = R"(usage: sinkscope report ID [--step N] [--layer L] [--arms A,B] [--point P] [--out DIR]
       sinkscope report --probe FILE [--label NAME] [--layer L] [--out DIR]
       sinkscope report --train-dir DIR[,DIR...] [--label NAME] [--step N] [--layer L] [--arms A,B] [--out DIR]

The paper's figures from an experiment's stored steps and probe reports, as PNG and SVG
(drawn with PLplot) with the data behind each figure as a tab-separated file beside it,
and DIR/index.html showing them with the experiment's settings:

  fig01_gradient_sinks       per layer, log10 N_t at x~ of every token t < P, token s
                             highlighted, median and IQR of R_GS (Figures 1, 6, 14)
  fig02_path_profiles        token-wise |dL/dq|, |dL/dk|, |dL/dv| at layer L, one line
                             per probe step (Figures 2, 8)
  fig03_reshaping            Bloat, Change, Compress against |h_in| (attention) and
                             |h_half| (MLP), log10, by token group (Figures 3, 10)
  fig07_sink_rate_and_norms  sink rate and the token-s norm ratios of h_out, r_mlp,
                             r_attn per layer, arms side by side, mean +- std over seeds
  fig12_value_norms          |v| of token s against the mean and max of tokens 1..15
                             over probe steps at layer L (Figure 12)
  fig13_theta                learned theta, layer x KV head (Figure 13; V-scale arms)
  training_curves            loss and validation loss per arm, mean +- std over seeds

Per-run figures show each arm's first seed. A name that does not exist is an error naming
it: an arm the experiment lacks, a run with no probe report, a step a run was not probed
at (with its probed steps), a layer past the model's.

  --step N     the probe step (default: the latest step probed in every run)
  --layer L    the layer of fig02 and fig12 (default: layers / 2)
  --arms A,B   only these arms, in this order (default: every arm of the experiment)
  --point P    with a sweep, only its point P (p0, p1, ...) into DIR; by default one report
               per point, each in DIR/pK/
  --out DIR    where to write (default: report-ID); created if missing
  --probe FILE the figures of one probe written by `sinkscope probe --local CHECKPOINT --json`
               (a sinkscope checkpoint or a Hugging Face model), without a coordinator
  --train-dir DIR[,DIR...]  the figures of runs sinkscope-train wrote, without a coordinator:
               each DIR is a run directory ([p<k>-]<arm>-s<seed>/ with probes.jsonl and
               metrics.jsonl) or train's --out folder of them; all shown as one experiment
  --label NAME its name in the figures (default: FILE's name without .json; DIR's name)
)";

const char kExportUsage[] = R"(usage: sinkscope export ID [--format csv|jsonl] [--out FILE]

Every stored step metric and probe report of every run of an experiment.

csv (the default): two tables.
  steps:  experiment,run,arm,seed,step,loss,learning_rate,grad_norm,tokens_per_second,
          mfu,val_loss,step_seconds (val_loss empty on steps that did not evaluate)
  probes: one row per probe report x layer: experiment,run,arm,seed,step,probe_loss,
          batch_sequences,seq_len,r_gs_median,r_gs_q1,r_gs_q3,layer,r_gs,
          r_gs_sum_then_norm,r_gs_norm_then_mean,sink_rate,sink_rate_per_sample,
          norm_ratio_{h_in,h_half,h_out,r_attn,r_mlp,v,vh},massive_top1,massive_median,
          top1_over_median,mean_theta, and the per-head lists alpha and theta joined by ';'
  With --out FILE the steps go to FILE and the probes to FILE with .csv replaced by
  .probes.csv (runs.csv -> runs.probes.csv); on stdout the two tables follow each other,
  separated by an empty line. Token-wise profiles are in the jsonl export only.
jsonl: one JSON object per line, protobuf's JSON mapping (proto field names; 64-bit
  integers as strings): {"experiment_id","run_id","arm","seed","step":{StepMetrics}} for
  every step, then {..., "probe":{ProbeReport}} for every probe report, run by run.

  --format F   csv or jsonl
  --out FILE   write to FILE instead of stdout
  -h, --help   this text
)";

// Steps of a YAML node's children: a key of a mapping or an index of a list.
struct PathStep {
  std::string key;
  int index = -1;
};

std::vector<PathStep> SplitFieldPath(const std::string& path) {
  std::vector<PathStep> steps;
  std::string current;
  for (size_t i = 0; i <= path.size(); ++i) {
    const char c = i < path.size() ? path[i] : '.';
    if (c == '.' || c == '[') {
      if (!current.empty()) steps.push_back({current, -1});
      current.clear();
      if (c == '[') {
        const size_t close = path.find(']', i);
        if (close == std::string::npos) break;
        steps.push_back({"", std::atoi(path.substr(i + 1, close - i - 1).c_str())});
        i = close;
      }
    } else {
      current += c;
    }
  }
  return steps;
}

std::string LowerCamel(const std::string& name) {
  std::string out;
  bool upper = false;
  for (char c : name) {
    if (c == '_') {
      upper = true;
    } else {
      out += upper ? static_cast<char>(std::toupper(static_cast<unsigned char>(c))) : c;
      upper = false;
    }
  }
  return out;
}

}  // namespace

const std::vector<Command>& Commands() {
  static const std::vector<Command> commands = {
      {"submit", "FILE [--watch]", "validate an experiment file and queue its runs", kSubmitUsage, Submit, {},
       {"--watch"}, 1, 1, "an experiment FILE"},
      {"list", "[--limit N]", "experiments, most recent first", kListUsage, List, {"--limit"}, {}, 0, 0, ""},
      {"status", "ID", "an experiment's runs: state, step, losses, tok/s, worker, failures", kStatusUsage,
       StatusCommand, {}, {}, 1, 1, "an experiment ID"},
      {"watch", "ID", "follow an experiment live until it ends: progress, ETA, probes", kWatchUsage, WatchCommand, {},
       {}, 1, 1, "an experiment ID"},
      {"cancel", "ID", "cancel every queued or running run", kCancelUsage, Cancel, {}, {}, 1, 1, "an experiment ID"},
      {"compare", "ID [--step N] [--point P]", "the arms side by side per layer, mean ± std over seeds", kCompareUsage,
       Compare, {"--step", "--point"}, {}, 1, 1, "an experiment ID"},
      {"export", "ID [--format csv|jsonl] [--out FILE]", "every stored step metric and probe report", kExportUsage,
       Export, {"--format", "--out"}, {}, 1, 1, "an experiment ID"},
      {"report", "ID | --probe FILE | --train-dir DIR [--out DIR]", "the paper's figures (PNG, SVG, data, index.html)", kReportUsage,
       ReportCommand, {"--step", "--layer", "--arms", "--out", "--probe", "--label", "--point", "--train-dir"}, {}, 0, 1, "an experiment ID"},
      // Dispatched by main to ProbeCommand: every argument after it is sinkscope-probe's.
      {"probe", "CHECKPOINT ...", "a diagnostic probe of a checkpoint on a worker, stored like any probe (--local: here)",
       nullptr, nullptr},
  };
  return commands;
}

const Command* FindCommand(const std::string& name) {
  for (const Command& c : Commands()) {
    if (name == c.name) return &c;
  }
  return nullptr;
}

namespace {

// `sinkscope probe --local ...`: the pass on this machine, by sinkscope-probe.
int ProbeLocally(const GlobalOptions& options, int argc, char** argv) {
  // The diagnostic pass is the engine's work: it runs in sinkscope-probe (beside this
  // binary, else on PATH), so the CLI links no engine, BLAS or OpenMP.
  std::string tool = "sinkscope-probe";
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    // Installed side by side, or in a build tree (client/ beside tools/).
    for (const std::filesystem::path& p : {self.parent_path() / "sinkscope-probe",
                                           self.parent_path().parent_path() / "tools" / "sinkscope-probe"}) {
      if (::access(p.c_str(), X_OK) == 0) {
        tool = p.string();
        break;
      }
    }
  }
  std::string name = "sinkscope probe";
  std::string json = "--json";
  std::vector<char*> args = {name.data()};
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--local") != 0) args.push_back(argv[i]);
  }
  if (options.json) args.push_back(json.data());
  args.push_back(nullptr);
  if (tool.find('/') != std::string::npos) {
    ::execv(tool.c_str(), args.data());
  } else {
    ::execvp(tool.c_str(), args.data());
  }
  std::fprintf(stderr, "sinkscope probe: cannot run %s (%s): install sinkscope-probe beside sinkscope or on PATH\n",
               tool.c_str(), std::strerror(errno));
  return kExitUsage;
}

}  // namespace

int ProbeCommand(const GlobalOptions& options, int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--local") == 0) return ProbeLocally(options, argc, argv);
  }
  // A diagnostic probe job through the coordinator: submitted, run on a worker, stored
  // and shown like any probe report.
  v1::Experiment e;
  e.set_name("probe");
  v1::DiagnosticSpec& g = *e.mutable_diagnostic();
  v1::ProbeSpec& p = *e.mutable_probe();
  std::string model, tokens, text, separator = "%", tokenizer, arm, reduce = "sum_then_norm", device = "cpu", name;
  int64_t batch = 8, seq = 0, micro_batch = 0, s = 0, ref_span = 0, profile_len = 0, t_eps = 64;
  double eps = 0.3, wait_seconds = 0;
  bool no_wait = false;
  CLI::App app(
      "Submits a diagnostic probe of a checkpoint (a Hugging Face folder or a checkpoint.bin, at a path the workers "
      "see) to the coordinator: a worker of --device makes the pass (METRICS.md), the report is stored and shown like "
      "any probe report (status, export, report, Prometheus), and printed here when it is done. --local makes the "
      "pass on this machine instead (sinkscope-probe; its flags are these).",
      "sinkscope probe");
  app.add_option("CHECKPOINT", model, "the model as the workers see it")->required();
  app.add_option("--tokens", tokens, "llm.c token shard (at a path the workers see)");
  app.add_option("--text", text, "text file or folder (documents split by --separator), the model's tokenizer");
  app.add_option("--separator", separator, "document separator line for --text")->default_val("%");
  app.add_option("--tokenizer", tokenizer, "for --text: gpt2, a folder, tokenizer.json or tiktoken ranks");
  app.add_option("--batch", batch, "sequences")->check(flags::Integer(1, 1 << 20))->default_val(8);
  app.add_option("--micro-batch", micro_batch, "sequences per forward and backward (default: all)")
      ->check(flags::Integer(1, 1 << 20));
  app.add_option("--seq", seq, "tokens per sequence (default: the model's context)")->check(flags::Integer(1, INT32_MAX));
  app.add_option("--arm", arm, "baseline | vscale | vscale_backward_only (default: the checkpoint's)")
      ->check(CLI::IsMember({"baseline", "vscale", "vscale_backward_only"}));
  app.add_option("--s", s, "sink position s")->check(flags::Integer(0, INT32_MAX))->default_val(0);
  app.add_option("--ref-span", ref_span, "T_e (default 31, clipped to T-1)")->check(flags::Integer(1, INT32_MAX));
  app.add_option("--profile-len", profile_len, "P (default 64, clipped to T)")->check(flags::Integer(1, INT32_MAX));
  app.add_option("--eps", eps, "sink threshold")->check(flags::Number(0, 1))->default_val(0.3);
  app.add_option("--t-eps", t_eps, "sink window T_eps")->check(flags::Integer(1, 1 << 24))->default_val(64);
  app.add_option("--reduce", reduce, "how per-sequence gradients are combined")
      ->check(CLI::IsMember({"sum_then_norm", "norm_then_mean"}))
      ->default_val("sum_then_norm");
  app.add_option("--device", device, "the workers to run it on")->check(CLI::IsMember({"cpu", "cuda"}))->default_val("cpu");
  app.add_option("--name", name, "the job's experiment name (default probe)");
  app.add_flag("--no-wait", no_wait, "print the experiment id and return at once");
  app.add_option("--wait-seconds", wait_seconds, "give up waiting after S seconds (default: no limit)")
      ->check(flags::Number(0, 1e9));
  bool local_unused = false;  // handled above; listed for --help
  app.add_flag("--local", local_unused, "make the pass here instead (sinkscope-probe)");
  if (int exit = flags::Parse(app, argc, argv); exit >= 0) return exit;
  if (tokens.empty() == text.empty()) return UsageError("probe", "give exactly one of --tokens or --text");
  auto absolute = [](const std::string& path) {
    std::error_code ec;
    const std::filesystem::path a = std::filesystem::absolute(path, ec);
    return ec ? path : a.lexically_normal().string();
  };
  if (!name.empty()) e.set_name(name);
  g.set_model(absolute(model));
  if (!tokens.empty()) g.set_tokens(absolute(tokens));
  if (!text.empty()) g.set_text(absolute(text));
  g.set_separator(separator);
  // gpt2 names the workers' tokenizer cache; anything else is a path.
  if (!tokenizer.empty()) g.set_tokenizer(tokenizer == "gpt2" ? tokenizer : absolute(tokenizer));
  g.set_batch(static_cast<int32_t>(batch));
  g.set_seq(static_cast<int32_t>(seq));
  g.set_micro_batch(static_cast<int32_t>(micro_batch));
  if (!arm.empty()) {
    g.set_arm(arm == "baseline" ? v1::BASELINE : arm == "vscale" ? v1::VSCALE : v1::VSCALE_BACKWARD_ONLY);
  }
  p.set_sink_position(static_cast<int32_t>(s));
  p.set_ref_span(static_cast<int32_t>(ref_span > 0 ? ref_span : 31));
  p.set_profile_len(static_cast<int32_t>(profile_len > 0 ? profile_len : 64));
  p.set_eps(eps);
  p.set_t_eps(static_cast<int32_t>(t_eps));
  p.set_reduce(reduce == "norm_then_mean" ? v1::NORM_THEN_MEAN : v1::SUM_THEN_NORM);
  e.mutable_resources()->set_device(device == "cuda" ? v1::CUDA : v1::CPU);
  {
    v1::Experiment defaulted = e;
    ApplyDefaults(defaulted);
    if (Status st = ValidateExperiment(defaulted, /*check_paths=*/false); !st.ok()) {
      return UsageError("probe", st.message());
    }
  }

  Coordinator coordinator(options);
  v1::SubmitExperimentRequest request;
  *request.mutable_experiment() = e;
  v1::SubmitExperimentResponse submitted;
  if (grpc::Status st = coordinator.stub().SubmitExperiment(coordinator.UnaryContext().get(), request, &submitted);
      !st.ok()) {
    return coordinator.Fail(st);
  }
  const std::string& id = submitted.experiment_id();
  const std::string run_id = submitted.run_ids_size() > 0 ? submitted.run_ids(0) : "";
  std::fprintf(stderr, "sinkscope probe: submitted %s (run %s)\n", id.c_str(), run_id.c_str());
  if (no_wait) {
    if (options.json) PrintJson(submitted);
    else std::printf("%s\n", id.c_str());
    return kExitOk;
  }
  // Wait for the job's end, saying when its state changes (queued and why, running where).
  const auto start = std::chrono::steady_clock::now();
  std::string said;
  v1::ExperimentSummary summary;
  while (true) {
    v1::GetExperimentRequest get;
    get.set_experiment_id(id);
    if (grpc::Status st = coordinator.stub().GetExperiment(coordinator.UnaryContext().get(), get, &summary); !st.ok()) {
      return coordinator.Fail(st);
    }
    if (summary.state() != v1::ACTIVE) break;
    if (summary.runs_size() > 0) {
      const v1::RunSummary& r = summary.runs(0);
      const std::string now = RunStateName(r.state()) + (r.state() == v1::RUNNING ? " on worker " + r.worker_id() : "") +
                              (r.message().empty() ? "" : " (" + r.message() + ")");
      if (now != said) {
        std::fprintf(stderr, "sinkscope probe: %s %s\n", id.c_str(), now.c_str());
        said = now;
      }
    }
    if (wait_seconds > 0 &&
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > wait_seconds) {
      std::fprintf(stderr, "sinkscope probe: %s is still %s after %g s; follow it with: sinkscope watch %s\n",
                   id.c_str(), said.c_str(), wait_seconds, id.c_str());
      return kExitJobFailed;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  }
  if (summary.state() != v1::COMPLETED || summary.runs_size() == 0) {
    std::printf("%s", RenderExperimentStatus(summary).c_str());
    return kExitJobFailed;
  }
  v1::GetRunMetricsRequest metrics_request;
  metrics_request.set_run_id(run_id);
  metrics_request.set_probes_only(true);
  v1::GetRunMetricsResponse metrics;
  if (grpc::Status st = coordinator.stub().GetRunMetrics(coordinator.UnaryContext().get(), metrics_request, &metrics);
      !st.ok()) {
    return coordinator.Fail(st);
  }
  if (metrics.probes_size() == 0) {
    std::fprintf(stderr, "sinkscope probe: %s succeeded but stored no report\n", id.c_str());
    return kExitJobFailed;
  }
  const v1::ProbeReport& report = metrics.probes(0);
  if (options.json) {
    std::printf("%s\n", MessageToJson(report, /*pretty=*/true).c_str());
  } else {
    std::printf("%s (%s, run %s)\n%s", model.c_str(), id.c_str(), run_id.c_str(), RenderProbeReport(report).c_str());
  }
  return kExitOk;
}

std::string LocateInExperimentFile(const std::string& file, const std::string& text, const std::string& message) {
  // The message starts with the field path: "model.kv_heads: …" or "train.lr must …".
  const std::string path = message.substr(0, message.find_first_of(": "));
  int line = -1;
  try {
    YAML::Node node = YAML::Load(text);
    for (const PathStep& step : SplitFieldPath(path)) {
      YAML::Node next;
      if (step.index >= 0) {
        if (!node.IsSequence() || step.index >= static_cast<int>(node.size())) break;
        const YAML::Node& list = node;
        next.reset(list[step.index]);
        line = next.Mark().line;
      } else {
        if (!node.IsMap()) break;
        bool found = false;
        for (auto it = node.begin(); it != node.end(); ++it) {
          const std::string key = it->first.IsScalar() ? it->first.Scalar() : "";
          if (key == step.key || key == LowerCamel(step.key)) {
            next.reset(it->second);
            line = it->first.Mark().line;
            found = true;
            break;
          }
        }
        if (!found) break;
      }
      node.reset(next);
    }
  } catch (const YAML::Exception&) {
    line = -1;
  }
  return line >= 0 ? file + ":" + std::to_string(line + 1) + ": " + message : file + ": " + message;
}

}  // namespace sinkscope::cli

// libFuzzer target: worker-message handling. A sequence of operations on a Coordinator
// over a fresh in-memory SQLite store, with two worker sessions (fake stream writers):
// arbitrary bytes parsed as WorkerMessages, scheduler ticks, reconnects, submissions,
// cancels and queries. Nothing may crash, hang or leak, and the store must stay sound.
//
// Input: operations of [op: 1 byte][length: 2 bytes, little-endian][payload], to the end.
//   op % 8 = 0, 1, 2  payload as a WorkerMessage, on session (op / 8) % 2
//            3        Tick()
//            4        session (op / 8) % 2 disconnects and reconnects
//            5        payload as an Experiment, submitted
//            6        cancel the experiment "fuzz-1"
//            7        queries: GetExperiment, GetRunMetrics, CompareArms, ListExperiments
// Before the operations, an experiment "fuzz" (runs fuzz-1-baseline-s0 and
// fuzz-1-vscale-s0) is submitted; fuzz/make_corpus.py writes seeds in this format.
#include <google/protobuf/stubs/logging.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "schema/experiment.h"
#include "base/log.h"
#include "server/coordinator.h"
#include "server/exporter.h"
#include "server/store.h"

namespace sinkscope {
namespace {

class NullWriter final : public SessionWriter {
 public:
  bool Send(const v1::CoordinatorMessage& m) override {
    // The coordinator's messages must serialise (they go on the wire).
    if (!m.IsInitialized()) __builtin_trap();
    ++sent;
    return sent % 97 != 0;  // now and then the stream is gone
  }
  int64_t sent = 0;
};

v1::Experiment BaseExperiment() {
  v1::Experiment e;
  e.set_name("fuzz");
  v1::ModelSpec* m = e.mutable_model();
  m->set_layers(2);
  m->set_d_model(32);
  m->set_heads(2);
  m->set_kv_heads(1);
  m->set_context(32);
  e.mutable_data()->mutable_text()->add_paths("/nonexistent/corpus");
  e.mutable_train()->set_steps(20);
  e.mutable_probe()->set_every(5);
  e.mutable_probe()->set_ref_span(15);
  e.mutable_probe()->set_profile_len(16);
  e.mutable_probe()->set_t_eps(16);
  e.add_arms(v1::BASELINE);
  e.add_arms(v1::VSCALE);
  return e;
}

}  // namespace
}  // namespace sinkscope

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  sinkscope::MinLogLevel() = static_cast<sinkscope::LogLevel>(99);  // quiet
  google::protobuf::SetLogHandler(nullptr);                         // e.g. "invalid UTF-8" for every such input
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace sinkscope;
  if (size > (256 << 10)) return -1;
  auto store = Store::Open(":memory:");
  if (!store.ok()) __builtin_trap();
  auto exporter = Exporter::Start("", std::chrono::seconds(600));
  if (!exporter.ok()) __builtin_trap();
  Coordinator::Options options;
  options.check_data_paths = false;
  options.lease_seconds = 0.001;  // leases lapse at the first tick: requeues and restarts get exercised
  options.checkpoint_root = "/nonexistent/checkpoints";
  auto created = Coordinator::Create(store->get(), exporter->get(), options);
  if (!created.ok()) __builtin_trap();
  Coordinator& c = **created;
  if (!c.Submit(BaseExperiment()).ok()) __builtin_trap();

  std::shared_ptr<NullWriter> writers[2] = {std::make_shared<NullWriter>(), std::make_shared<NullWriter>()};
  int64_t sessions[2] = {c.OpenSession(writers[0]), c.OpenSession(writers[1])};
  size_t pos = 0;
  while (pos + 3 <= size) {
    const uint8_t op = data[pos];
    const size_t len = std::min<size_t>(data[pos + 1] | (size_t{data[pos + 2]} << 8), size - pos - 3);
    const std::string payload(reinterpret_cast<const char*>(data + pos + 3), len);
    pos += 3 + len;
    const int who = (op / 8) % 2;
    switch (op % 8) {
      case 0:
      case 1:
      case 2: {
        v1::WorkerMessage m;
        if (m.ParseFromString(payload)) c.OnWorkerMessage(sessions[who], m);
        break;
      }
      case 3:
        c.Tick();
        break;
      case 4:
        c.CloseSession(sessions[who]);
        sessions[who] = c.OpenSession(writers[who]);
        break;
      case 5: {
        v1::Experiment e;
        if (e.ParseFromString(payload)) (void)c.Submit(e);
        break;
      }
      case 6:
        (void)c.Cancel("fuzz-1");
        break;
      case 7: {
        (void)c.GetExperiment("fuzz-1", true);
        v1::GetRunMetricsRequest metrics;
        metrics.set_run_id(who == 0 ? "fuzz-1-baseline-s0" : "fuzz-1-vscale-s0");
        (void)c.GetRunMetrics(metrics);
        v1::CompareArmsRequest compare;
        compare.set_experiment_id("fuzz-1");
        (void)c.CompareArms(compare);
        (void)c.ListExperiments(0);
        (void)(*exporter)->Scrape();
        break;
      }
    }
  }
  c.CloseSession(sessions[0]);
  c.CloseSession(sessions[1]);
  if (!(*store)->IntegrityCheck().ok()) __builtin_trap();
  return 0;
}

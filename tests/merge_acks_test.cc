// MergeAcks (server/coordinator.h): a probe report's ack and its step's Progress ack to
// one session go as one Ack; nothing else merges, and every session's order holds.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "server/coordinator.h"

namespace sinkscope {
namespace {

struct Writer : SessionWriter {
  bool Send(const v1::CoordinatorMessage&) override { return true; }
};

v1::CoordinatorMessage Ack(const std::string& run, int64_t progress_step, int64_t sequence) {
  v1::CoordinatorMessage m;
  m.mutable_ack()->set_run_id(run);
  m.mutable_ack()->set_progress_step(progress_step);
  m.mutable_ack()->set_sequence(sequence);
  return m;
}

// (writer index, progress_step, sequence) of each message; -1 for a message that is no ack.
using Row = std::tuple<int, int64_t, int64_t>;
std::vector<Row> Rows(const SessionOutbox& out, const std::vector<std::shared_ptr<SessionWriter>>& writers) {
  std::vector<Row> rows;
  for (const auto& [w, m] : out) {
    const int i = static_cast<int>(std::find(writers.begin(), writers.end(), w) - writers.begin());
    rows.emplace_back(i, m.has_ack() ? m.ack().progress_step() : -1, m.has_ack() ? m.ack().sequence() : -1);
  }
  return rows;
}

TEST(MergeAcks, AProbeAckJoinsItsProgressAckAcrossOtherSessions) {
  std::vector<std::shared_ptr<SessionWriter>> w = {std::make_shared<Writer>(), std::make_shared<Writer>()};
  SessionOutbox out = {{w[0], Ack("r0", 10, 0)}, {w[1], Ack("r1", 7, 0)}, {w[0], Ack("r0", 0, 10)},
                       {w[1], Ack("r1", 0, 5)},  {w[1], Ack("r1", 8, 0)}};
  MergeAcks(out);
  EXPECT_EQ(Rows(out, w), (std::vector<Row>{{0, 10, 10}, {1, 7, 5}, {1, 8, 0}}));
  for (const auto& [writer, m] : out) EXPECT_EQ(m.ack().run_id(), writer == w[0] ? "r0" : "r1");
}

TEST(MergeAcks, OnlyPlainAcksOfOneRunMergeAndOrderHolds) {
  std::vector<std::shared_ptr<SessionWriter>> w = {std::make_shared<Writer>()};
  v1::CoordinatorMessage refused = Ack("r", 0, 5);
  refused.mutable_ack()->set_refused("step is not a probe step");
  v1::CoordinatorMessage outcome;
  outcome.mutable_ack()->set_run_id("r");
  outcome.mutable_ack()->set_outcome(true);
  v1::CoordinatorMessage assignment;
  assignment.mutable_assignment()->set_run_id("r2");
  SessionOutbox out = {
      {w[0], Ack("r", 1, 0)},  {w[0], refused},          // a refusal stays on its own
      {w[0], Ack("r", 2, 0)},  {w[0], Ack("other", 0, 2)},  // another run's ack stays apart
      {w[0], Ack("r", 3, 0)},  {w[0], Ack("r", 4, 0)},      // two Progress acks stay two
      {w[0], assignment},      {w[0], Ack("r", 0, 4)},      // the latest message is not an ack: no merge past it
      {w[0], Ack("r", 5, 0)},                               // a Progress ack joins a probe ack before it
      {w[0], Ack("r", 0, 5)},  {w[0], Ack("r", 0, 6)},      // a merged ack takes no third; two probe acks stay two
      {w[0], outcome}};
  MergeAcks(out);
  ASSERT_EQ(out.size(), 11u);
  EXPECT_EQ(out[1].second.ack().refused(), "step is not a probe step");
  EXPECT_EQ(out[3].second.ack().run_id(), "other");
  EXPECT_TRUE(out[6].second.has_assignment());
  EXPECT_EQ(Rows(out, w), (std::vector<Row>{{0, 1, 0},
                                            {0, 0, 5},
                                            {0, 2, 0},
                                            {0, 0, 2},
                                            {0, 3, 0},
                                            {0, 4, 0},
                                            {0, -1, -1},
                                            {0, 5, 4},
                                            {0, 0, 5},
                                            {0, 0, 6},
                                            {0, 0, 0}}));
  EXPECT_TRUE(out[10].second.ack().outcome());
}

}  // namespace
}  // namespace sinkscope

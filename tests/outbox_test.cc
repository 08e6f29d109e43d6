// The worker's delivery bookkeeping (worker/outbox.h) without a stream: what is written,
// kept, requeued, dropped and resent, on a ManualClock.
#include "worker/outbox.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace sinkscope {
namespace {

using ::testing::ElementsAre;
using std::chrono::seconds;

v1::WorkerMessage Progress(const std::string& run, int64_t step) {
  v1::WorkerMessage m;
  m.mutable_progress()->set_run_id(run);
  m.mutable_progress()->mutable_metrics()->set_step(step);
  return m;
}
v1::WorkerMessage Finished(const std::string& run, int32_t attempt) {
  v1::WorkerMessage m;
  m.mutable_finished()->set_run_id(run);
  m.mutable_finished()->set_attempt(attempt);
  return m;
}
v1::ProbeUpload Probe(const std::string& run, int64_t sequence) {
  v1::ProbeUpload u;
  u.set_run_id(run);
  u.set_sequence(sequence);
  return u;
}
v1::Ack AckOf(const std::string& run, int64_t sequence, int64_t step, bool outcome) {
  v1::Ack a;
  a.set_run_id(run);
  a.set_sequence(sequence);
  a.set_progress_step(step);
  a.set_outcome(outcome);
  return a;
}

// "p:run:step", "probe:run:seq", "finished:run" for each message TakeNext gives.
std::vector<std::string> Drain(Outbox& box) {
  std::vector<std::string> out;
  while (auto p = box.TakeNext()) {
    const auto& m = p->message;
    if (m.has_progress()) {
      out.push_back("p:" + m.progress().run_id() + ":" + std::to_string(m.progress().metrics().step()));
    } else if (m.has_probe()) {
      out.push_back("probe:" + m.probe().run_id() + ":" + std::to_string(m.probe().sequence()));
    } else if (m.has_finished()) {
      out.push_back("finished:" + m.finished().run_id());
    }
  }
  return out;
}

TEST(OutboxTest, ProbesStayUntilAckedAndComeFirstOnEveryConnection) {
  ManualClock clock;
  Outbox box(100, seconds(10));
  box.Add("r", Progress("r", 1), true);
  box.AddProbe(Probe("r", 1));
  box.Add("r", Progress("r", 2), true);
  EXPECT_THAT(Drain(box), ElementsAre("p:r:1", "probe:r:1", "p:r:2"));
  EXPECT_EQ(box.unacked_probes(), 1u);
  EXPECT_EQ(box.unacked_progress(), 2u);
  box.Ack(AckOf("r", 0, 1, false), clock.Now());
  box.StartConnection(clock.Now());  // a new stream: the probe, then what is unacked
  EXPECT_THAT(Drain(box), ElementsAre("probe:r:1", "p:r:2"));
  box.Ack(AckOf("r", 1, 0, false), clock.Now());
  box.Ack(AckOf("r", 0, 2, false), clock.Now());
  EXPECT_TRUE(box.Idle());
}

TEST(OutboxTest, AnAckedProbeStillQueuedIsNotWritten) {
  ManualClock clock;
  Outbox box(100, seconds(10));
  box.AddProbe(Probe("r", 5));
  box.Ack(AckOf("r", 5, 0, false), clock.Now());  // acked from an earlier write
  EXPECT_THAT(Drain(box), ElementsAre());
}

TEST(OutboxTest, RequeueOrderIsProbesThenEachRunsStepsBeforeItsOutcomeThenTheRest) {
  ManualClock clock;
  Outbox box(100, seconds(10));
  box.Add("a", Progress("a", 1), true);
  box.Add("a", Progress("a", 2), true);
  box.Add("a", Finished("a", 3), false);
  EXPECT_EQ(Drain(box).size(), 3u);  // written, none acked
  box.Add("b", Progress("b", 1), true);  // queued after the stream broke
  box.AddProbe(Probe("b", 1));
  box.StartConnection(clock.Now());
  EXPECT_THAT(Drain(box), ElementsAre("probe:b:1", "p:a:1", "p:a:2", "finished:a", "p:b:1"));
  ASSERT_TRUE(box.PendingOutcome().has_value());
  EXPECT_EQ(box.PendingOutcome()->first, "a");
  EXPECT_EQ(box.PendingOutcome()->second, 3);
  box.Ack(AckOf("a", 0, 0, true), clock.Now());
  EXPECT_FALSE(box.PendingOutcome().has_value());
}

TEST(OutboxTest, ProgressBeyondTheBoundDropsTheOldestAndCountsIt) {
  Outbox box(3, seconds(10));
  for (int step = 1; step <= 5; ++step) box.Add("r", Progress("r", step), true);
  EXPECT_EQ(box.dropped_progress(), 2);
  EXPECT_EQ(box.TakeNewlyDropped(), 2);
  EXPECT_EQ(box.TakeNewlyDropped(), 0);
  box.AddProbe(Probe("r", 1));  // probes are never dropped
  EXPECT_THAT(Drain(box), ElementsAre("p:r:3", "p:r:4", "p:r:5", "probe:r:1"));
}

TEST(OutboxTest, ACoordinatorThatDoesNotAckGetsNothingKept) {
  ManualClock clock;
  Outbox box(100, seconds(10));
  box.Add("r", Progress("r", 1), true);
  EXPECT_EQ(Drain(box).size(), 1u);
  EXPECT_EQ(box.unacked_progress(), 1u);
  box.SetAcksProgress(false);
  EXPECT_EQ(box.unacked_progress(), 0u);
  box.Add("r", Progress("r", 2), true);
  auto p = box.TakeNext();
  ASSERT_TRUE(p.has_value());
  EXPECT_FALSE(p->retained);
  EXPECT_TRUE(box.Idle());
  EXPECT_FALSE(box.ResendDue().has_value());
}

TEST(OutboxTest, AFailedWriteIsWrittenAgainOnceNotTwice) {
  ManualClock clock;
  Outbox box(100, seconds(10));
  box.SetAcksProgress(false);
  box.Add("r", Progress("r", 1), true);
  box.Add("r", Progress("r", 2), true);
  auto p = box.TakeNext();
  box.WriteFailed(std::move(*p));  // not retained: back at the head of the queue
  box.StartConnection(clock.Now());
  EXPECT_THAT(Drain(box), ElementsAre("p:r:1", "p:r:2"));

  Outbox acking(100, seconds(10));
  acking.Add("r", Progress("r", 1), true);
  auto q = acking.TakeNext();
  ASSERT_TRUE(q->retained);
  acking.WriteFailed(std::move(*q));  // retained: the next connection requeues it
  acking.StartConnection(clock.Now());
  EXPECT_THAT(Drain(acking), ElementsAre("p:r:1"));
}

TEST(OutboxTest, UnackedIsResentWhenNoAckHasComeForResendAfter) {
  ManualClock clock;
  Outbox box(100, seconds(10));
  box.StartConnection(clock.Now());
  EXPECT_FALSE(box.ResendDue().has_value());  // nothing unacked
  box.Add("r", Progress("r", 1), true);
  box.AddProbe(Probe("r", 1));
  EXPECT_EQ(Drain(box).size(), 2u);
  ASSERT_TRUE(box.ResendDue().has_value());
  EXPECT_EQ(*box.ResendDue(), clock.Now() + seconds(10));
  clock.Advance(seconds(4));
  box.Ack(AckOf("x", 0, 0, false), clock.Now());  // any ack shows the store is answering
  EXPECT_EQ(*box.ResendDue(), clock.Now() + seconds(10));
  clock.Advance(seconds(10));
  box.Resend(clock.Now());
  EXPECT_THAT(Drain(box), ElementsAre("probe:r:1", "p:r:1"));
  EXPECT_EQ(*box.ResendDue(), clock.Now() + seconds(10));
}

}  // namespace
}  // namespace sinkscope

// The structured log: one event is one line whatever its values hold.
#include "base/log.h"
#include "training/progress.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>

namespace sinkscope {
namespace {

TEST(LogValue, PlainWordsStayBare) {
  EXPECT_EQ(LogValue("worker-a"), "worker-a");
  EXPECT_EQ(LogValue("/tmp/x/checkpoint.bin"), "/tmp/x/checkpoint.bin");
  EXPECT_EQ(LogValue("θ"), "θ");  // UTF-8 passes as it is
}

TEST(LogValue, QuotesAndEscapesWhatCouldBreakTheLine) {
  EXPECT_EQ(LogValue(""), "\"\"");
  EXPECT_EQ(LogValue("two words"), "\"two words\"");
  EXPECT_EQ(LogValue("a=b"), "\"a=b\"");
  EXPECT_EQ(LogValue("say \"hi\""), "\"say \\\"hi\\\"\"");
  EXPECT_EQ(LogValue("back\\slash"), "\"back\\\\slash\"");
  // A newline would start a forged event: it is written as \n.
  EXPECT_EQ(LogValue("x\nts=0 level=error event=forged"), "\"x\\nts=0 level=error event=forged\"");
  EXPECT_EQ(LogValue("cr\rtab\t"), "\"cr\\rtab\\t\"");
  EXPECT_EQ(LogValue(std::string("nul\0end", 7)), "\"nul\\x00end\"");
  EXPECT_EQ(LogValue("esc\x1b[31m"), "\"esc\\x1b[31m\"");
  EXPECT_EQ(LogValue("del\x7f"), "\"del\\x7f\"");
}

TEST(LogValue, LongValuesAreCutAndSaySo) {
  const std::string huge(100000, 'w');
  const std::string v = LogValue(huge);
  EXPECT_LT(v.size(), kMaxLogValueBytes + 64);
  EXPECT_EQ(v.substr(0, 1 + 10), "\"" + std::string(10, 'w'));
  EXPECT_NE(v.find("...(100000 bytes)\""), std::string::npos);
  EXPECT_EQ(v.find('\n'), std::string::npos);
}

}  // namespace
}  // namespace sinkscope

namespace sinkscope {
namespace {

// Off a terminal (a file here), the progress line is written at the first update, when
// the interval has passed, at each further 10%, and at the end — and flushed, so that
// `tail -f` of a log follows the work.
std::string Lines(std::chrono::duration<double> interval, int total) {
  FILE* f = std::tmpfile();
  {
    ProgressBar bar("run", total, f, interval);
    for (int i = 1; i <= total; ++i) bar.Update(i, 1.0, 100.0);
  }
  std::rewind(f);
  std::string text;
  for (int c; (c = std::fgetc(f)) != EOF;) text += static_cast<char>(c);
  std::fclose(f);
  return text;
}

int CountLines(const std::string& s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); }

TEST(ProgressBarOffATerminal, FirstEveryTenthAndLast) {
  // 1000 updates at once, a long interval: the first, each 10%, the last (= the 10th 10%).
  EXPECT_EQ(CountLines(Lines(std::chrono::hours(1), 1000)), 11);
  // An interval of zero: every update is a line.
  EXPECT_EQ(CountLines(Lines(std::chrono::seconds(0), 50)), 50);
  EXPECT_NE(Lines(std::chrono::hours(1), 3).find("     1/3      loss  1.0000"), std::string::npos);
}

}  // namespace
}  // namespace sinkscope

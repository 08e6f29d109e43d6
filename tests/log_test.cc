// The structured log: one event is one line whatever its values hold.
#include "base/log.h"

#include <gtest/gtest.h>

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

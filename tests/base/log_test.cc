// base/log.h: text lines are the message as it is; JSON lines are one object each with the
// message escaped; levels filter; bad flags are refused by name and change nothing.
#include "base/log.h"

#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <string>
#include <thread>

namespace splitq::base {
namespace {

std::string Logged(const std::function<void()>& log) {
  testing::internal::CaptureStderr();
  log();
  return testing::internal::GetCapturedStderr();
}

TEST(Logging, TextIsTheMessageAsItIs) {
  ASSERT_TRUE(ConfigureLogging("info", "text").ok());
  EXPECT_FALSE(LoggingAsJson());
  EXPECT_EQ(Logged([] { spdlog::info("worker {} listening on {}", "w0", "127.0.0.1:5"); }),
            "worker w0 listening on 127.0.0.1:5\n");
  EXPECT_EQ(Logged([] { spdlog::debug("hidden at info"); }), "");
}

TEST(Logging, JsonIsOneEscapedObjectPerLine) {
  ASSERT_TRUE(ConfigureLogging("warn", "json").ok());
  EXPECT_TRUE(LoggingAsJson());
  EXPECT_EQ(Logged([] { spdlog::info("below the level"); }), "");
  const std::string line = Logged(
      [] { spdlog::warn("a \"quoted\" path C:\\x\nand a tab\t{}", std::string(1, '\x01')); });
  EXPECT_EQ(line.rfind("{\"time\":\"", 0), 0u) << line;
  EXPECT_NE(line.find("\"level\":\"warning\""), std::string::npos) << line;
  EXPECT_NE(line.find(R"("msg":"a \"quoted\" path C:\\x\nand a tab\t\u0001"})"), std::string::npos)
      << line;
  EXPECT_EQ(line.back(), '\n');
  EXPECT_EQ(line.find('\n'), line.size() - 1) << "one line";
  ASSERT_TRUE(ConfigureLogging("info", "text").ok());
}

TEST(Logging, BadFlagsAreRefusedByName) {
  EXPECT_NE(ConfigureLogging("loud", "text").message().find("--log-level 'loud'"),
            std::string::npos);
  EXPECT_NE(ConfigureLogging("info", "xml").message().find("--log-format 'xml'"),
            std::string::npos);
}

// A burst goes out whole, then lines are refused until the budget refills; the first line out
// after that is told how many were refused.
TEST(LineBudget, BurstsThenRefusesAndCountsWhatItLeftOut) {
  LineBudget budget(10, 5);
  int64_t suppressed = -1;
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(budget.Take(&suppressed)) << i;
    EXPECT_EQ(suppressed, 0);
  }
  for (int i = 0; i < 7; ++i) EXPECT_FALSE(budget.Take(&suppressed)) << i;
  std::this_thread::sleep_for(std::chrono::milliseconds(250));  // 2.5 lines at 10 a second
  ASSERT_TRUE(budget.Take(&suppressed));
  EXPECT_EQ(suppressed, 7);
  ASSERT_TRUE(budget.Take(&suppressed));
  EXPECT_EQ(suppressed, 0);
}

}  // namespace
}  // namespace splitq::base

// tools/coordinator_bench.h end to end against a real `splitq coordinator` child: every phase
// runs without an error, each member's calls are counted, and the expiry phase ends with every
// member dead and its record forgotten. Rates and latencies are printed by
// `splitq bench coordinator`, never asserted.
#include "tools/coordinator_bench.h"

#include <gtest/gtest.h>

#include <map>
#include <string>

namespace splitq::tools {
namespace {

TEST(CoordinatorBench, EveryPhaseRunsAndExpiryForgetsEveryone) {
  CoordinatorBenchOptions o;
  o.splitq = SPLITQ_BINARY;
  o.members = 300;
  o.workers = 4;
  o.seconds = 1;
  o.rate = 2000;
  o.window = 32;
  o.channels = 2;
  o.heartbeat_ms = 1000;  // dead 2 s after the last word; the phases speak for everyone
  o.forget_after_s = 1;
  o.churn_pool = 50;
  o.connections = 20;
  o.generator_threads = 2;
  auto rows = RunCoordinatorBench(o);
  ASSERT_TRUE(rows.ok()) << rows.status();
  std::map<std::string, CoordinatorBenchRow> by_phase;
  for (const CoordinatorBenchRow& r : *rows) {
    EXPECT_EQ(r.errors, 0u) << r.phase << ": " << r.first_error;
    by_phase[r.phase] = r;
  }
  uint64_t registered = 0;
  for (const auto& [phase, r] : by_phase) {
    if (phase.rfind("register ", 0) == 0) registered += r.calls;
  }
  EXPECT_EQ(registered, 300u);
  EXPECT_EQ(by_phase.at("register 270-300").live, 300u);
  EXPECT_EQ(by_phase.at("assign (pick)").calls, 296u);
  EXPECT_GT(by_phase.at("heartbeat").calls, 300u);
  EXPECT_GT(by_phase.at("mix@2000 assign (move)").calls, 0u);
  EXPECT_GT(by_phase.at("status listing").calls, 0u);
  EXPECT_GT(by_phase.at("churn 2/2 join+leave").calls, 0u);
  EXPECT_GT(by_phase.at("heartbeat").server_cpu_us_per_call, 0.0);
  EXPECT_EQ(by_phase.at("connections 20 open").calls, 20u);
  EXPECT_GT(by_phase.at("connections 20 closed").rss_mb, 0.0);
  const CoordinatorBenchRow& expire = by_phase.at("expire (silent)");
  EXPECT_EQ(expire.live, 0u);
  EXPECT_EQ(expire.records, 0u);
  EXPECT_NE(FormatCoordinatorBench(*rows).find("churn 1/2 heartbeat"), std::string::npos);
  EXPECT_NE(CoordinatorBenchJson(*rows, o).find("\"phase\": \"expire (silent)\""),
            std::string::npos);
}

TEST(CoordinatorBench, RefusesAShapeWithoutClients) {
  CoordinatorBenchOptions o;
  o.splitq = SPLITQ_BINARY;
  o.members = 4;
  o.workers = 4;
  EXPECT_EQ(RunCoordinatorBench(o).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace splitq::tools

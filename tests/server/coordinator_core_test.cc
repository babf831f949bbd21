// server/coordinator_core.h driven directly, with made-up clocks: balanced assignment,
// protocol-version refusal, duplicate names, a dead worker's clients moved within two
// heartbeat periods, a dead client's slot freed, a restarted client's resume step, and worker
// groups (generations, ranks, the store, failed generations, no mixing).
#include "server/coordinator_core.h"

#include <gtest/gtest.h>

namespace splitq::server {
namespace {

using std::chrono::milliseconds;

class CoordinatorCoreTest : public ::testing::Test {
 protected:
  Clock::time_point At(int ms) const { return t0_ + milliseconds(ms); }
  uint64_t Worker(const std::string& name, uint32_t max_sessions = 0, int at = 0) {
    auto id = core_.Register(Role::kWorker, name, kProtocolVersion, {"10.0.0.1", 7000},
                             max_sessions, At(at));
    EXPECT_TRUE(id.ok()) << id.status();
    return id.ok() ? *id : 0;
  }
  uint64_t Client(const std::string& name, int at = 0) {
    auto id = core_.Register(Role::kClient, name, kProtocolVersion, {}, 0, At(at));
    EXPECT_TRUE(id.ok()) << id.status();
    return id.ok() ? *id : 0;
  }
  uint64_t GroupWorker(const std::string& name, uint32_t store_port, int at = 0) {
    auto id = core_.Register(Role::kWorker, name, kProtocolVersion, {"10.0.0.1", 7000}, 0, At(at),
                             "", {"10.0.0.1", store_port});
    EXPECT_TRUE(id.ok()) << id.status();
    return id.ok() ? *id : 0;
  }
  rpc::GroupView View(uint64_t member, int at = 0, int64_t failed = 0) {
    auto v = core_.Group(member, failed, At(at));
    EXPECT_TRUE(v.ok()) << v.status();
    return v.ok() ? *v : rpc::GroupView{};
  }
  std::string WorkerOf(uint64_t client, int at = 0) {
    auto a = core_.Assign(client, At(at));
    return a.ok() ? a->worker_name : std::string(a.status().message());
  }

  const Clock::time_point t0_ = Clock::now();
  CoordinatorCore core_{CoordinatorOptions{milliseconds(1000), milliseconds(2000), 64}};
};

TEST_F(CoordinatorCoreTest, AssignsTheLeastLoadedLiveWorker) {
  Worker("w1");
  Worker("w2");
  const uint64_t a = Client("a"), b = Client("b"), c = Client("c");
  EXPECT_EQ(WorkerOf(a), "w1");
  EXPECT_EQ(WorkerOf(b), "w2");
  EXPECT_EQ(WorkerOf(c), "w1");
  // Asking again gives the same worker and the same assignment.
  const auto first = core_.Assign(a, At(1));
  const auto again = core_.Assign(a, At(2));
  ASSERT_TRUE(first.ok() && again.ok());
  EXPECT_EQ(first->assignment_id, again->assignment_id);
  EXPECT_EQ(again->worker.host, "10.0.0.1");
  EXPECT_EQ(again->worker.port, 7000u);
}

TEST_F(CoordinatorCoreTest, RefusesOtherProtocolVersionsAndBadNames) {
  auto old = core_.Register(Role::kClient, "old", kProtocolVersion + 1, {}, 0, At(0));
  EXPECT_EQ(old.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(old.status().message().find("version"), std::string::npos);
  // Names are folders too (--out runs/<id>): "." and ".." are not names; "..." is.
  for (const char* bad : {"a b", ".", "..", "", "a/b"}) {
    EXPECT_EQ(core_.Register(Role::kClient, bad, kProtocolVersion, {}, 0, At(0)).status().code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
  EXPECT_TRUE(core_.Register(Role::kClient, "...", kProtocolVersion, {}, 0, At(0)).ok());
  EXPECT_EQ(core_.Register(Role::kWorker, "w", kProtocolVersion, {}, 0, At(0)).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A client cannot be assigned before a worker exists; the answer says to retry.
  EXPECT_EQ(core_.Assign(Client("early"), At(0)).status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(CoordinatorCoreTest, LiveDuplicateNamesAreRefusedDeadOnesMayReturn) {
  const uint64_t a = Client("a");
  EXPECT_EQ(core_.Register(Role::kClient, "a", kProtocolVersion, {}, 0, At(10)).status().code(),
            absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(core_.Leave(a).ok());
  for (int i = 0; i < 3; ++i) {  // each return replaces the dead record: one record per name
    auto again = core_.Register(Role::kClient, "a", kProtocolVersion, {}, 0, At(20 + i));
    ASSERT_TRUE(again.ok());
    ASSERT_TRUE(core_.Leave(*again).ok());
  }
  EXPECT_EQ(core_.Status(At(30)).size(), 1u);
}

// A client that cannot reach its worker says so, and moves to another live worker with room;
// when there is none, it keeps its worker (which may come back).
TEST_F(CoordinatorCoreTest, AClientThatCannotReachItsWorkerMoves) {
  Worker("w1", 1);
  const uint64_t a = Client("a");
  auto first = core_.Assign(a, At(0));
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->worker_name, "w1");
  auto again = core_.Assign(a, At(1), "", "w1");  // no other worker: w1 again, same assignment
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->worker_name, "w1");
  EXPECT_EQ(again->assignment_id, first->assignment_id);
  Worker("w2", 1);
  const uint64_t b = Client("b");
  EXPECT_EQ(WorkerOf(b), "w2");                                    // w1 is full
  EXPECT_EQ(core_.Assign(a, At(2), "", "w1")->worker_name, "w1");  // w2 is full too
  Worker("w3", 1);
  auto moved = core_.Assign(a, At(3), "", "w1");
  ASSERT_TRUE(moved.ok());
  EXPECT_EQ(moved->worker_name, "w3");
  EXPECT_NE(moved->assignment_id, first->assignment_id);
  EXPECT_EQ(WorkerOf(Client("c")), "w1");  // a's place on w1 is free again
  EXPECT_EQ(WorkerOf(a, 4), "w3");         // and a stays where it went
}

// After a coordinator restart a worker's clients keep training on it without being assigned
// again: the sessions it reports count towards its load, so a new client is not sent to a worker
// that is full.
TEST_F(CoordinatorCoreTest, AWorkersReportedSessionsCountTowardsItsLoad) {
  const uint64_t w1 = Worker("w1", 2);
  ASSERT_TRUE(core_.Heartbeat(w1, 10, At(1), "", 2).ok());  // two clients that we did not assign
  EXPECT_EQ(core_.Assign(Client("a"), At(1)).status().code(), absl::StatusCode::kUnavailable);
  Worker("w2", 2);
  EXPECT_EQ(WorkerOf(Client("b"), 2), "w2");
  ASSERT_TRUE(core_.Heartbeat(w1, 11, At(3), "", 0).ok());  // they left
  EXPECT_EQ(WorkerOf(Client("c"), 3), "w1");
}

// After a coordinator restart, an id handed out before it is unknown (NOT_FOUND: register
// again), not the id of whoever registered first afterwards.
TEST_F(CoordinatorCoreTest, IdsFromBeforeARestartAreUnknownAfterIt) {
  Worker("w");
  const uint64_t old_client = Client("a");
  CoordinatorCore restarted{CoordinatorOptions{milliseconds(1000), milliseconds(2000), 64}};
  auto fresh = restarted.Register(Role::kClient, "b", kProtocolVersion, {}, 0, At(0));
  ASSERT_TRUE(fresh.ok());
  EXPECT_NE(*fresh, old_client);
  EXPECT_EQ(restarted.Heartbeat(old_client, 999, At(1)).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(restarted.Status(At(1))[0].step, 0u);
}

// With tokens, a member registers only under its token's id, and only that token speaks for it.
TEST_F(CoordinatorCoreTest, ACallerSpeaksOnlyForItself) {
  EXPECT_EQ(core_.Register(Role::kWorker, "w", kProtocolVersion, {"h", 1}, 0, At(0), "alice")
                .status()
                .code(),
            absl::StatusCode::kPermissionDenied);
  auto w = core_.Register(Role::kWorker, "w", kProtocolVersion, {"h", 1}, 0, At(0), "w");
  auto alice = core_.Register(Role::kClient, "alice", kProtocolVersion, {}, 0, At(0), "alice");
  ASSERT_TRUE(w.ok() && alice.ok());
  EXPECT_EQ(core_.Heartbeat(*w, 5, At(1), "alice").code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(core_.Leave(*w, "alice").code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(core_.Assign(*alice, At(1), "w").status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(core_.Assign(*alice, At(1), "alice").ok());
  EXPECT_TRUE(core_.Heartbeat(*w, 5, At(1), "w").ok());
  EXPECT_TRUE(core_.Leave(*w, "w").ok());
}

TEST_F(CoordinatorCoreTest, ADeadWorkersClientsMoveWithinTwoHeartbeatPeriods) {
  const uint64_t w1 = Worker("w1"), w2 = Worker("w2");
  const uint64_t a = Client("a"), b = Client("b");
  ASSERT_EQ(WorkerOf(a), "w1");
  ASSERT_EQ(WorkerOf(b), "w2");
  const uint64_t first_assignment = core_.Assign(a, At(0))->assignment_id;
  // Everyone but w1 keeps heartbeating every period.
  for (int t = 1000; t <= 2000; t += 1000) {
    for (const uint64_t id : {w2, a, b}) ASSERT_TRUE(core_.Heartbeat(id, 0, At(t)).ok());
    EXPECT_TRUE(core_.Expire(At(t)).empty()) << t;
  }
  const auto dead = core_.Expire(At(2001));  // two periods and a bit after w1's last word
  ASSERT_EQ(dead, std::vector<std::string>{"w1"});
  EXPECT_EQ(core_.Heartbeat(w1, 0, At(2002)).code(), absl::StatusCode::kNotFound);
  const auto moved = core_.Assign(a, At(2003));
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_EQ(moved->worker_name, "w2");
  EXPECT_NE(moved->assignment_id, first_assignment);
  EXPECT_EQ(WorkerOf(b, 2003), "w2");
}

TEST_F(CoordinatorCoreTest, ADeadClientsSlotIsFreed) {
  const uint64_t w = Worker("w", /*max_sessions=*/1);
  const uint64_t a = Client("a"), b = Client("b");
  ASSERT_EQ(WorkerOf(a), "w");
  EXPECT_EQ(core_.Assign(b, At(0)).status().code(), absl::StatusCode::kUnavailable);
  for (const uint64_t id : {w, b}) ASSERT_TRUE(core_.Heartbeat(id, 0, At(1500)).ok());
  EXPECT_EQ(core_.Expire(At(2500)), std::vector<std::string>{"a"});
  EXPECT_EQ(WorkerOf(b, 2500), "w");
}

TEST_F(CoordinatorCoreTest, ARestartedClientResumesFromItsLastReportedStep) {
  Worker("w");
  const uint64_t a = Client("a");
  ASSERT_EQ(WorkerOf(a), "w");
  ASSERT_TRUE(core_.Heartbeat(a, 42, At(500)).ok());
  EXPECT_EQ(core_.Expire(At(5000)).size(), 2u);  // both went silent
  Worker("w", 0, 5001);
  auto again = core_.Register(Role::kClient, "a", kProtocolVersion, {}, 0, At(5002));
  ASSERT_TRUE(again.ok());
  const auto assignment = core_.Assign(*again, At(5003));
  ASSERT_TRUE(assignment.ok()) << assignment.status();
  EXPECT_EQ(assignment->resume_step, 42u);
  const auto status = core_.Status(At(5004));
  int alive = 0;
  for (const MemberView& m : status) alive += m.alive;
  EXPECT_EQ(alive, 2);
}

TEST_F(CoordinatorCoreTest, GroupMembersGetRanksAndANewGenerationOnEveryChange) {
  const uint64_t w1 = GroupWorker("w1", 9001);
  const rpc::GroupView alone = View(w1);
  EXPECT_EQ(alone.world, 1u);
  EXPECT_EQ(alone.rank, 0u);
  EXPECT_EQ(alone.store.port, 9001u);
  const uint64_t w2 = GroupWorker("w2", 9002);
  const rpc::GroupView two = View(w2);
  EXPECT_GT(two.generation, alone.generation);
  EXPECT_EQ(two.world, 2u);
  EXPECT_EQ(two.rank, 1u);
  EXPECT_EQ(two.store.port, 9001u);  // rank 0's
  EXPECT_EQ(two.members, (std::vector<std::string>{"w1", "w2"}));
  EXPECT_EQ(View(w1).generation, two.generation);
  // w1 dies: w2 becomes rank 0 of a new generation, at its own store.
  ASSERT_TRUE(core_.Heartbeat(w2, 0, At(2000)).ok());
  ASSERT_EQ(core_.Expire(At(2500)), std::vector<std::string>{"w1"});
  const rpc::GroupView after = View(w2, 2500);
  EXPECT_GT(after.generation, two.generation);
  EXPECT_EQ(after.world, 1u);
  EXPECT_EQ(after.rank, 0u);
  EXPECT_EQ(after.store.port, 9002u);
  EXPECT_EQ(core_.Group(w1, 0, At(2500)).status().code(), absl::StatusCode::kNotFound);
  // w1 comes back: the next generation, ranked after w2; a clean goodbye changes it again.
  const uint64_t back = GroupWorker("w1", 9003, 2600);
  const rpc::GroupView rejoined = View(back, 2600);
  EXPECT_GT(rejoined.generation, after.generation);
  EXPECT_EQ(rejoined.rank, 1u);
  ASSERT_TRUE(core_.Leave(back).ok());
  EXPECT_GT(View(w2, 2700).generation, rejoined.generation);
}

TEST_F(CoordinatorCoreTest, AFailedGenerationIsReplacedAfterTwoDeadlines) {
  const uint64_t w1 = GroupWorker("w1", 9001), w2 = GroupWorker("w2", 9002);
  const int64_t g = View(w1).generation;
  // Both alive (they ask, which counts as a heartbeat), but one says the generation failed:
  // nothing changes until two deadlines (4 s) have passed since the first report.
  EXPECT_EQ(View(w1, 100, g).generation, g);
  EXPECT_EQ(View(w2, 2000, g).generation, g);
  EXPECT_EQ(View(w1, 4100, g).generation, g);
  const rpc::GroupView next = View(w1, 4101, g);
  EXPECT_GT(next.generation, g);
  EXPECT_EQ(next.world, 2u);
  // A report about an older generation changes nothing.
  EXPECT_EQ(View(w2, 9000, g).generation, next.generation);
  EXPECT_EQ(View(w2, 9100, g).generation, next.generation);
}

TEST_F(CoordinatorCoreTest, GroupAndLoneWorkersDoNotMix) {
  GroupWorker("w1", 9001);
  auto lone = core_.Register(Role::kWorker, "w2", kProtocolVersion, {"10.0.0.1", 7000}, 0, At(0));
  EXPECT_EQ(lone.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(lone.status().message().find("--group-size"), std::string::npos) << lone.status();
  const uint64_t client = Client("c");
  EXPECT_EQ(core_.Group(client, 0, At(0)).status().code(), absl::StatusCode::kNotFound);
  auto bad =
      core_.Register(Role::kClient, "c2", kProtocolVersion, {}, 0, At(0), "", {"10.0.0.1", 9002});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace splitq::server

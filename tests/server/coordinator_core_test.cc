// server/coordinator_core.h driven directly, with made-up clocks: balanced assignment,
// protocol-version refusal, duplicate names, a dead worker's clients moved within two
// heartbeat periods, a dead client's slot freed, a restarted client's resume step, and worker
// groups (generations, ranks, the store, failed generations, no mixing); the indexes (issue 21)
// against a recount after random joins, leaves, reports, expiry and restarts, and records
// forgotten after forget_after; rebalancing of a worker group's clients through heartbeats.
#include "server/coordinator_core.h"

#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>

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

// A worker's host is dialled and printed by clients: control bytes, spaces, a megabyte name
// and unspecified addresses are refused (the sixth outside probe registered all of them).
TEST_F(CoordinatorCoreTest, WorkerHostsAreNamesOrAddresses) {
  for (const std::string& host :
       {std::string("evil\n\x1b[31mclient alice: fake line"), std::string(1000000, 'a'),
        std::string("0.0.0.0"), std::string("::"), std::string("a b"), std::string("h/x")}) {
    const auto r = core_.Register(Role::kWorker, "w", kProtocolVersion, {host, 50051}, 1, At(0));
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << host.substr(0, 20);
    EXPECT_LT(r.status().message().size(), 400u);
    EXPECT_EQ(r.status().message().find('\n'), std::string::npos);
  }
  int i = 0;
  for (const char* host : {"worker-0.example.com", "10.1.2.3", "fe80::1%eth0", "splitq_worker_1"}) {
    auto r = core_.Register(Role::kWorker, absl::StrCat("w", i++), kProtocolVersion, {host, 50051},
                            1, At(0));
    EXPECT_TRUE(r.ok()) << host << ": " << r.status();
  }
}

TEST_F(CoordinatorCoreTest, LiveDuplicateNamesAreRefusedDeadOnesMayReturn) {
  const uint64_t a = Client("a");
  EXPECT_EQ(core_.Register(Role::kClient, "a", kProtocolVersion, {}, 0, At(10)).status().code(),
            absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(core_.Leave(a, At(15)).ok());
  for (int i = 0; i < 3; ++i) {  // each return replaces the dead record: one record per name
    auto again = core_.Register(Role::kClient, "a", kProtocolVersion, {}, 0, At(20 + i));
    ASSERT_TRUE(again.ok());
    ASSERT_TRUE(core_.Leave(*again, At(20 + i)).ok());
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
  EXPECT_EQ(core_.Leave(*w, At(1), "alice").code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(core_.Assign(*alice, At(1), "w").status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(core_.Assign(*alice, At(1), "alice").ok());
  EXPECT_TRUE(core_.Heartbeat(*w, 5, At(1), "w").ok());
  EXPECT_TRUE(core_.Leave(*w, At(1), "w").ok());
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
  ASSERT_TRUE(core_.Leave(back, At(2650)).ok());
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

// Dead and departed records go forget_after after their death: churn (names joining and leaving
// forever) keeps the registry's size flat. Within that time a returning client keeps its
// progress.
// Rebalancing: six clients on the only member of a group; a second member joins; the clients'
// heartbeats move one client each until the members hold three each. A moved client hears
// `move` until it Assigns again (which names the new member), and is not moved twice. Nothing
// moves before the new member says it formed the current generation.
TEST_F(CoordinatorCoreTest, AJoiningGroupMemberTakesClientsThroughHeartbeats) {
  GroupWorker("w1", 7001);
  std::vector<uint64_t> clients;
  std::map<uint64_t, uint64_t> assignment;  // as each client trains under it
  for (int i = 0; i < 6; ++i) {
    clients.push_back(Client("c" + std::to_string(i)));
    auto a = core_.Assign(clients.back(), At(0));
    ASSERT_TRUE(a.ok()) << a.status();
    EXPECT_EQ(a->worker_name, "w1");
    assignment[clients.back()] = a->assignment_id;
  }
  const uint64_t w2 = GroupWorker("w2", 7002, 100);
  // No move before w2 says it formed the current generation.
  bool early = false;
  ASSERT_TRUE(core_.Heartbeat(clients[0], 1, At(110), "", 0, assignment[clients[0]], &early).ok());
  EXPECT_FALSE(early);
  ASSERT_TRUE(core_.Heartbeat(w2, 0, At(120), "", 0, 0, nullptr, View(w2, 120).generation).ok());
  int moved = 0;
  for (int round = 0; round < 3; ++round) {
    for (const uint64_t c : clients) {
      bool move = false;
      ASSERT_TRUE(core_.Heartbeat(c, 1, At(200 + round), "", 0, assignment[c], &move).ok());
      if (!move) continue;
      ++moved;
      // Told again (a lost reply loses no move), and not moved a second time meanwhile.
      bool again = false;
      ASSERT_TRUE(core_.Heartbeat(c, 1, At(200 + round), "", 0, assignment[c], &again).ok());
      EXPECT_TRUE(again);
      auto a = core_.Assign(c, At(200 + round));
      ASSERT_TRUE(a.ok()) << a.status();
      EXPECT_EQ(a->worker_name, "w2");
      EXPECT_NE(a->assignment_id, assignment[c]);
      assignment[c] = a->assignment_id;
      ASSERT_TRUE(core_.Heartbeat(c, 1, At(200 + round), "", 0, assignment[c], &again).ok());
      EXPECT_FALSE(again);
    }
  }
  EXPECT_EQ(moved, 3);
  std::map<std::string, uint32_t> load;
  for (const MemberView& m : core_.Status(At(300))) {
    if (m.role == Role::kWorker) load[m.name] = m.clients;
  }
  EXPECT_EQ(load["w1"], 3u);
  EXPECT_EQ(load["w2"], 3u);
}

// A client that named a member unreachable is never moved there (it would come back at once);
// the others still even the load.
TEST_F(CoordinatorCoreTest, RebalancingAvoidsTheMemberAClientCouldNotReach) {
  GroupWorker("w1", 7001);
  std::vector<uint64_t> clients;
  std::map<uint64_t, uint64_t> assignment;
  for (int i = 0; i < 6; ++i) {
    clients.push_back(Client("c" + std::to_string(i)));
    auto a = core_.Assign(clients.back(), At(0));
    ASSERT_TRUE(a.ok()) << a.status();
    assignment[clients.back()] = a->assignment_id;
  }
  const uint64_t w2 = GroupWorker("w2", 7002, 100);
  ASSERT_TRUE(core_.Heartbeat(w2, 0, At(120), "", 0, 0, nullptr, View(w2, 120).generation).ok());
  auto stay = core_.Assign(clients[0], At(130), "", "w2");  // c0 cannot reach w2
  ASSERT_TRUE(stay.ok()) << stay.status();
  EXPECT_EQ(stay->worker_name, "w1");
  assignment[clients[0]] = stay->assignment_id;
  int moved = 0;
  for (int round = 0; round < 3; ++round) {
    for (const uint64_t c : clients) {
      bool move = false;
      ASSERT_TRUE(core_.Heartbeat(c, 1, At(200 + round), "", 0, assignment[c], &move).ok());
      if (!move) continue;
      EXPECT_NE(c, clients[0]);
      ++moved;
      auto a = core_.Assign(c, At(200 + round));
      ASSERT_TRUE(a.ok()) << a.status();
      EXPECT_EQ(a->worker_name, "w2");
      assignment[c] = a->assignment_id;
    }
  }
  EXPECT_EQ(moved, 3);
}

// Assign prefers a group member that has formed the current generation over a less loaded one
// that has not (it would report a returning client's applied steps as lost).
TEST_F(CoordinatorCoreTest, AssignPrefersMembersThatFormedTheGeneration) {
  const uint64_t w1 = GroupWorker("w1", 7001);
  const uint64_t a = Client("a");
  EXPECT_EQ(WorkerOf(a, 10), "w1");
  const uint64_t w2 = GroupWorker("w2", 7002, 100);
  ASSERT_TRUE(core_.Heartbeat(w1, 0, At(110), "", 0, 0, nullptr, View(w1, 110).generation).ok());
  const uint64_t b = Client("b", 120);
  EXPECT_EQ(WorkerOf(b, 120), "w1");  // w2 is emptier but has not formed the generation
  ASSERT_TRUE(core_.Heartbeat(w2, 0, At(130), "", 0, 0, nullptr, View(w2, 130).generation).ok());
  const uint64_t c = Client("c", 140);
  EXPECT_EQ(WorkerOf(c, 140), "w2");
  // A generation just bumped (w3 registered): no member has formed it. One that formed an
  // earlier generation (w2: 1 client, w1: 2) goes before the fresh w3 (0 clients).
  GroupWorker("w3", 7003, 200);
  const uint64_t d = Client("d", 210);
  EXPECT_EQ(WorkerOf(d, 210), "w2");
  // With no member that ever formed one, the least loaded takes it.
  CoordinatorCore fresh(CoordinatorOptions{milliseconds(1000), milliseconds(2000), 64});
  for (const char* name : {"x1", "x2"}) {
    ASSERT_TRUE(fresh
                    .Register(Role::kWorker, name, kProtocolVersion, {"10.0.0.1", 7000}, 0, At(0),
                              "", {"10.0.0.1", 7100})
                    .ok());
  }
  auto e = fresh.Register(Role::kClient, "e", kProtocolVersion, {}, 0, At(0));
  ASSERT_TRUE(e.ok());
  auto picked = fresh.Assign(*e, At(1));
  ASSERT_TRUE(picked.ok()) << picked.status();
  EXPECT_EQ(picked->worker_name, "x1");
}

// A heartbeat's step above 2^53 is refused (Assign would hand it back as a resume step that
// every worker refuses); 2^53 itself is fine.
TEST_F(CoordinatorCoreTest, AHeartbeatStepAboveTwoToThe53IsRefused) {
  const uint64_t c = Client("c");
  EXPECT_TRUE(core_.Heartbeat(c, kMaxHeartbeatStep, At(1)).ok());
  const absl::Status s = core_.Heartbeat(c, ~uint64_t{0}, At(2));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("2^53"), std::string::npos) << s;
  auto a = core_.Assign(c, At(3));
  ASSERT_FALSE(a.ok());  // no worker: but the step stays the last one accepted
  const std::vector<MemberView> members = core_.Status(At(3));
  ASSERT_EQ(members.size(), 1u);
  EXPECT_EQ(members[0].step, kMaxHeartbeatStep);
}

// A client registered again (a fresh record, no assignment yet) is not told to move by a
// heartbeat that names its old assignment.
TEST_F(CoordinatorCoreTest, AFreshRecordHearsNoMove) {
  GroupWorker("w1", 7001);
  const uint64_t c = Client("c0");
  auto a = core_.Assign(c, At(0));
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(core_.Leave(c, At(5)).ok());
  auto again = core_.Register(Role::kClient, "c0", kProtocolVersion, {}, 0, At(10));
  ASSERT_TRUE(again.ok()) << again.status();
  bool move = true;
  ASSERT_TRUE(core_.Heartbeat(*again, 1, At(20), "", 0, a->assignment_id, &move).ok());
  EXPECT_FALSE(move);
}

// No moves among workers on their own (each holds its own model), with rebalancing off, or for
// a client that does not name its assignment.
TEST_F(CoordinatorCoreTest, OnlyGroupMembersTradeClientsAndOnlyWhenAsked) {
  const auto moves = [this](CoordinatorCore& core, bool grouped, bool name_assignment) {
    const auto worker = [&](const std::string& name, uint32_t port) {
      auto id = core.Register(Role::kWorker, name, kProtocolVersion, {"10.0.0.1", 7000}, 0, At(0),
                              "", grouped ? WorkerAddress{"10.0.0.1", port} : WorkerAddress{});
      EXPECT_TRUE(id.ok()) << id.status();
    };
    worker("w1", 7001);
    std::vector<std::pair<uint64_t, uint64_t>> clients;
    for (int i = 0; i < 4; ++i) {
      auto id =
          core.Register(Role::kClient, "c" + std::to_string(i), kProtocolVersion, {}, 0, At(0));
      EXPECT_TRUE(id.ok());
      auto a = core.Assign(*id, At(0));
      EXPECT_TRUE(a.ok());
      clients.emplace_back(*id, a->assignment_id);
    }
    worker("w2", 7002);
    for (const MemberView& m : core.Status(At(5))) {  // every worker formed the generation
      if (m.role != Role::kWorker) continue;
      auto view = core.Group(m.id, 0, At(5));
      EXPECT_TRUE(
          core.Heartbeat(m.id, 0, At(5), "", 0, 0, nullptr, view.ok() ? view->generation : 0).ok());
    }
    int n = 0;
    for (const auto& [id, assignment] : clients) {
      bool move = false;
      EXPECT_TRUE(
          core.Heartbeat(id, 1, At(10), "", 0, name_assignment ? assignment : 0, &move).ok());
      n += move;
    }
    return n;
  };
  const CoordinatorOptions on{milliseconds(1000), milliseconds(2000), 64};
  CoordinatorOptions off = on;
  off.rebalance_groups = false;
  CoordinatorCore a(on), b(on), c(off), d(on);
  EXPECT_EQ(moves(a, /*grouped=*/true, /*name_assignment=*/true), 2);
  EXPECT_EQ(moves(b, false, true), 0);
  EXPECT_EQ(moves(c, true, true), 0);
  EXPECT_EQ(moves(d, true, false), 0);
}

TEST_F(CoordinatorCoreTest, DeadRecordsAreForgottenAfterTheGracePeriod) {
  CoordinatorCore core{
      CoordinatorOptions{milliseconds(1000), milliseconds(2000), 64, milliseconds(60000)}};
  for (int round = 0; round < 4; ++round) {
    for (int i = 0; i < 500; ++i) {
      const std::string name = "r" + std::to_string(round) + "-" + std::to_string(i);
      auto id = core.Register(Role::kClient, name, kProtocolVersion, {}, 0, At(round * 70000));
      ASSERT_TRUE(id.ok()) << id.status();
      ASSERT_TRUE(core.Heartbeat(*id, 7, At(round * 70000 + 1)).ok());
      ASSERT_TRUE(core.Leave(*id, At(round * 70000 + 2)).ok());
    }
    core.Expire(At(round * 70000 + 3));
    // Only this round's departed are still listed; earlier rounds' are forgotten.
    EXPECT_EQ(core.Status(At(round * 70000 + 3)).size(), 500u) << round;
    EXPECT_EQ(core.Totals().records, 500u);
    EXPECT_EQ(core.Totals().clients, 0u);
  }
  // Within the grace period a returning client gets its progress back; after it, not.
  auto back = core.Register(Role::kClient, "r3-0", kProtocolVersion, {}, 0, At(210010));
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(core.Status(At(210010), 0, 0).back().step, 7u);
  EXPECT_EQ(core.Totals().client_steps, 7u);
  core.Expire(At(300000));
  auto late = core.Register(Role::kClient, "r3-1", kProtocolVersion, {}, 0, At(300001));
  ASSERT_TRUE(late.ok());
  EXPECT_EQ(core.Status(At(300001), *back).at(0).step, 0u);
}

// A mass death is handled in chunks of the lock, and none is missed.
TEST_F(CoordinatorCoreTest, AMassExpiryTakesEveryoneAndForgetsThem) {
  const size_t n = 3 * CoordinatorCore::kExpireChunk + 5;
  for (size_t i = 0; i < n; ++i) Client("m" + std::to_string(i));
  for (size_t i = 0; i < 10; ++i) {  // more queue entries than members
    ASSERT_TRUE(core_.Heartbeat(core_.Status(At(1), 0, 1)[0].id, i, At(1)).ok());
  }
  EXPECT_EQ(core_.Expire(At(2002)).size(), n);
  EXPECT_EQ(core_.Totals().clients, 0u);
  EXPECT_EQ(core_.Totals().records, n);
  core_.Expire(At(2002) + CoordinatorOptions().forget_after + milliseconds(1));
  EXPECT_EQ(core_.Totals().records, 0u);
  EXPECT_TRUE(core_.Status(At(1)).empty());
}

// Status pages through the registry in registration order.
TEST_F(CoordinatorCoreTest, StatusPages) {
  std::vector<uint64_t> ids;
  for (int i = 0; i < 5000; ++i) ids.push_back(Client("c" + std::to_string(i)));
  std::vector<uint64_t> seen;
  uint64_t after = 0;
  for (;;) {
    const std::vector<MemberView> page = core_.Status(At(1), after, 777);
    for (const MemberView& m : page) seen.push_back(m.id);
    if (page.size() < 777) break;
    after = page.back().id;
  }
  EXPECT_EQ(seen, ids);
  EXPECT_EQ(core_.Status(At(1)).size(), 5000u);  // all at once, in chunks of the lock
  // A member heard from after the listing's clock was read (between two chunks) is 0 ms old,
  // not 2^64 - 1.
  ASSERT_TRUE(core_.Heartbeat(ids.back(), 1, At(50)).ok());
  EXPECT_EQ(core_.Status(At(1)).back().since_heartbeat.count(), 0);
}

// The indexes (by name, clients by worker, open workers by load, the totals, the expiry queue)
// against a recount from Status after many random operations, and every Assign that picks a
// worker against a brute-force choice.
TEST_F(CoordinatorCoreTest, IndexesAgreeWithARecountUnderRandomChurn) {
  CoordinatorCore core{
      CoordinatorOptions{milliseconds(1000), milliseconds(2000), 64, milliseconds(5000)}};
  std::mt19937 rng(1234);
  const auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<unsigned>(n)); };
  struct Known {
    uint64_t id = 0;
    bool worker = false;
    uint32_t max_sessions = 0, reported = 0;
    uint64_t step = 0;
    int last = 0;  // its last word (register, heartbeat, assign)
  };
  std::map<std::string, Known> live;  // what the test believes is alive
  int t = 0;
  int picks_checked = 0, full = 0, expiries = 0;
  for (int op = 0; op < 20000; ++op) {
    t += pick(3);
    const int kind = pick(100);
    const bool as_worker = pick(10) == 0;
    const std::string name =
        as_worker ? "w" + std::to_string(pick(6)) : "c" + std::to_string(pick(60));
    const auto it = live.find(name);
    if (kind < 30 && it == live.end()) {  // join
      const uint32_t max_sessions = as_worker ? 1 + pick(12) : 0;
      auto id = core.Register(as_worker ? Role::kWorker : Role::kClient, name, kProtocolVersion,
                              {"h", 1}, max_sessions, At(t));
      ASSERT_TRUE(id.ok()) << id.status();
      live[name] = Known{*id, as_worker, max_sessions, 0, 0, t};
    } else if (kind < 40 && it != live.end()) {  // leave
      ASSERT_TRUE(core.Leave(it->second.id, At(t)).ok());
      live.erase(it);
    } else if (kind < 75 && it != live.end()) {  // heartbeat (a worker reports sessions)
      Known& k = it->second;
      k.step += pick(5);
      k.reported = k.worker ? pick(10) : 0;
      k.last = t;
      ASSERT_TRUE(core.Heartbeat(k.id, k.step, At(t), "", k.reported).ok());
    } else if (kind < 95 && it != live.end() && !it->second.worker) {  // assign
      // Brute force before: the workers' loads from a recount.
      std::map<std::string, uint32_t> assigned;
      std::string current;
      for (const MemberView& m : core.Status(At(t))) {
        if (m.alive && m.role == Role::kClient && !m.worker_name.empty()) {
          ++assigned[m.worker_name];
          if (m.name == name) current = m.worker_name;
        }
      }
      auto a = core.Assign(it->second.id, At(t));
      it->second.last = t;
      if (!current.empty()) {
        ASSERT_TRUE(a.ok());
        EXPECT_EQ(a->worker_name, current);  // a client keeps its live worker
        continue;
      }
      // The least loaded live worker with room; ties: the earlier registration (lower id).
      const Known* best = nullptr;
      uint32_t best_load = 0;
      std::string best_name;
      for (const auto& [n, k] : live) {
        if (!k.worker) continue;
        const uint32_t load = std::max(assigned[n], k.reported);
        if (load >= k.max_sessions) continue;
        if (best == nullptr || load < best_load || (load == best_load && k.id < best->id)) {
          best = &k;
          best_load = load;
          best_name = n;
        }
      }
      if (best == nullptr) {
        EXPECT_EQ(a.status().code(), absl::StatusCode::kUnavailable);
        ++full;
      } else {
        ASSERT_TRUE(a.ok()) << a.status();
        EXPECT_EQ(a->worker_name, best_name);
        ++picks_checked;
      }
    } else if (kind >= 99) {  // time passes; the silent die
      t += 700;
      std::set<std::string> dead;
      for (const std::string& name : core.Expire(At(t))) dead.insert(name);
      for (auto k = live.begin(); k != live.end();) {  // exactly the silent die
        EXPECT_EQ(dead.count(k->first), t - k->second.last > 2000 ? 1u : 0u) << k->first;
        k = dead.count(k->first) ? live.erase(k) : std::next(k);
      }
      ++expiries;
    }
    if (op % 500 == 0) {
      uint64_t workers = 0, clients = 0, steps = 0;
      std::map<std::string, uint32_t> assigned;
      const std::vector<MemberView> all = core.Status(At(t));
      for (const MemberView& m : all) {
        if (!m.alive) continue;
        ASSERT_EQ(live.count(m.name), 1u) << m.name;
        if (m.role == Role::kWorker) {
          ++workers;
        } else {
          ++clients;
          steps += m.step;
          if (!m.worker_name.empty()) {
            ASSERT_TRUE(live.count(m.worker_name) && live[m.worker_name].worker) << m.worker_name;
            ++assigned[m.worker_name];
          }
        }
      }
      for (const MemberView& m : all) {
        if (m.alive && m.role == Role::kWorker) EXPECT_EQ(m.clients, assigned[m.name]) << m.name;
      }
      const CoordinatorTotals totals = core.Totals();
      EXPECT_EQ(totals.workers, workers);
      EXPECT_EQ(totals.clients, clients);
      EXPECT_EQ(totals.client_steps, steps);
      EXPECT_EQ(totals.records, all.size());
      EXPECT_EQ(live.size(), workers + clients);
    }
  }
  EXPECT_GT(picks_checked, 500);  // every branch was taken many times
  EXPECT_GT(full, 50);
  EXPECT_GT(expiries, 100);
}

}  // namespace
}  // namespace splitq::server

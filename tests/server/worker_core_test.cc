// server/worker_core.h driven directly with a fake server part: worker checkpoints keep, per
// client, the first step not yet applied and its run, so after a restart a replay is still
// applied once and the steps the checkpoint missed are reported; a new run under an old client
// id is applied in full; a damaged progress list and a load after serving has begun are refused.
#include "server/worker_core.h"

#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "server/coordinator_core.h"  // kProtocolVersion

namespace splitq::server {
namespace {

// Answers every step; remembers which steps it applied. Its "checkpoint" is a map in memory
// keyed by path: the updates and the caller's extra bytes.
class FakeServer : public trainer::ServerHandler {
 public:
  struct Saved {
    int64_t updates = 0;
    std::string extra;
  };
  explicit FakeServer(std::map<std::string, Saved>* disk) : disk_(disk) {}

  uint64_t OpenSession() override { return next_++; }
  int64_t CloseSession(uint64_t) override { return 0; }
  absl::StatusOr<trainer::DownFrame> Train(uint64_t, const trainer::UpFrame& up,
                                           bool update) override {
    if (update) {
      ++updates_;
      applied.push_back(up.step);
    }
    trainer::DownFrame down;
    down.step = up.step;
    down.frame = "g";
    return down;
  }
  // One update for the merge; a frame "bad" fails its own step.
  std::vector<absl::StatusOr<trainer::DownFrame>> TrainMerged(
      const std::vector<std::pair<uint64_t, const trainer::UpFrame*>>& steps) override {
    std::vector<absl::StatusOr<trainer::DownFrame>> out;
    merges.push_back(steps.size());
    bool any = false;
    for (const auto& [session, up] : steps) {
      if (*up->frame == "bad") {
        out.push_back(absl::InvalidArgumentError("bad frame"));
        continue;
      }
      any = true;
      applied.push_back(up->step);
      trainer::DownFrame down;
      down.step = up->step;
      out.push_back(down);
    }
    if (any) ++updates_;
    return out;
  }
  absl::StatusOr<trainer::EvalPiece> Evaluate(uint64_t, const trainer::UpFrame&) override {
    return trainer::EvalPiece{};
  }
  int64_t updates() const override { return updates_; }
  absl::Status SaveCheckpoint(const std::string& path, const std::string& extra) const override {
    (*disk_)[path] = Saved{updates_, extra};
    return absl::OkStatus();
  }
  absl::Status LoadCheckpoint(const std::string& path, std::string* extra) override {
    auto it = disk_->find(path);
    if (it == disk_->end()) return absl::NotFoundError(path);
    updates_ = it->second.updates;
    *extra = it->second.extra;
    return absl::OkStatus();
  }

  std::vector<int64_t> applied;
  std::vector<size_t> merges;  // steps per TrainMerged call

 private:
  std::map<std::string, Saved>* disk_;
  uint64_t next_ = 1;
  int64_t updates_ = 0;
};

Hello HelloFrom(const std::string& id, uint64_t resume_step, const std::string& run = "") {
  Hello h;
  h.protocol_version = kProtocolVersion;
  h.client_id = id;
  h.resume_step = resume_step;
  h.run_id = run;
  return h;
}

// Sends steps [from, to) of `session` through the core.
void RunSteps(WorkerCore& core, uint64_t session, uint64_t from, uint64_t to) {
  const std::string frame = "frame";
  for (uint64_t step = from; step < to; ++step) {
    ASSERT_TRUE(core.AddLabels(session, step, {1}, {}).ok());
    auto done = core.AddChunk(session, rpc::Chunk{step, 0, 1, frame.size(), frame, {}});
    ASSERT_TRUE(done.ok()) << done.status();
    ASSERT_TRUE(*done);
    auto down = core.RunStep(session);
    ASSERT_TRUE(down.ok()) << down.status();
  }
}

TEST(WorkerCoreCheckpoint, ProgressSurvivesARestart) {
  std::map<std::string, FakeServer::Saved> disk;
  FakeServer before_server(&disk);
  WorkerCore before(before_server);
  auto alice = before.Open(HelloFrom("alice", 0), "");
  auto bob = before.Open(HelloFrom("bob", 0), "");
  ASSERT_TRUE(alice.ok() && bob.ok());
  EXPECT_EQ(alice->next_applied, -1);  // not known yet
  RunSteps(before, alice->session_id, 0, 5);
  RunSteps(before, bob->session_id, 0, 2);
  auto saved = before.SaveCheckpoint("w.pt");
  ASSERT_TRUE(saved.ok()) << saved.status();
  EXPECT_EQ(*saved, 7);
  RunSteps(before, alice->session_id, 5, 8);  // applied, then lost with the worker

  FakeServer after_server(&disk);
  WorkerCore after(after_server);
  auto clients = after.LoadCheckpoint("w.pt");
  ASSERT_TRUE(clients.ok()) << clients.status();
  EXPECT_EQ(*clients, 2u);
  EXPECT_EQ(after.stats().updates, 7);
  // Alice restarts from her checkpoint at step 3: steps 3 and 4 are replays, 5 on are applied.
  auto again = after.Open(HelloFrom("alice", 3), "");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->next_applied, 5);
  RunSteps(after, again->session_id, 3, 7);
  EXPECT_EQ(after_server.applied, (std::vector<int64_t>{5, 6}));
  // Bob kept running while the worker was down: it comes back at step 4, and the worker knows
  // it had applied his steps before 2 only (2 and 3 were lost).
  auto bob_again = after.Open(HelloFrom("bob", 4), "");
  ASSERT_TRUE(bob_again.ok());
  EXPECT_EQ(bob_again->next_applied, 2);
  // Carol is new here.
  auto carol = after.Open(HelloFrom("carol", 10), "");
  ASSERT_TRUE(carol.ok());
  EXPECT_EQ(carol->next_applied, -1);
}

// A session may start at any step up to kMaxStep (2^53), and no further: above it a step would
// not stay exact, and from 2^63 on it would be negative as int64.
TEST(WorkerCoreOpen, ResumeStepsAboveTheLargestAreRefused) {
  std::map<std::string, FakeServer::Saved> disk;
  FakeServer server(&disk);
  WorkerCore core(server);
  auto last = core.Open(HelloFrom("alice", kMaxStep), "");
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_EQ(last->expected_step, kMaxStep);
  for (const uint64_t step : {kMaxStep + 1, uint64_t{1} << 63, ~uint64_t{0}}) {
    EXPECT_EQ(core.Open(HelloFrom("bob", step), "").status().code(),
              absl::StatusCode::kInvalidArgument)
        << step;
  }
  EXPECT_EQ(core.stats().sessions, 1u);
}

// A new run under a known client id (another run id) starts afresh: all its steps are applied,
// and the old run's sessions no longer step the server. The run ids survive a checkpoint.
TEST(WorkerCoreCheckpoint, ANewRunUnderAnOldIdIsAppliedInFull) {
  std::map<std::string, FakeServer::Saved> disk;
  FakeServer server(&disk);
  WorkerCore core(server);
  auto first = core.Open(HelloFrom("alice", 0, "run1"), "");
  ASSERT_TRUE(first.ok());
  RunSteps(core, first->session_id, 0, 4);
  auto restart = core.Open(HelloFrom("alice", 2, "run1"), "");  // same run: replays
  ASSERT_TRUE(restart.ok());
  EXPECT_EQ(restart->next_applied, 4);
  EXPECT_FALSE(restart->new_run);
  auto second = core.Open(HelloFrom("alice", 0, "run2"), "");
  ASSERT_TRUE(second.ok());
  EXPECT_TRUE(second->new_run);
  EXPECT_EQ(second->next_applied, -1);
  RunSteps(core, second->session_id, 0, 3);
  EXPECT_EQ(server.applied, (std::vector<int64_t>{0, 1, 2, 3, 0, 1, 2}));
  ASSERT_TRUE(core.SaveCheckpoint("w.pt").ok());

  FakeServer after_server(&disk);
  WorkerCore after(after_server);
  ASSERT_TRUE(after.LoadCheckpoint("w.pt").ok());
  auto back = after.Open(HelloFrom("alice", 1, "run2"), "");
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->next_applied, 3);
  EXPECT_FALSE(back->new_run);
  auto old = after.Open(HelloFrom("alice", 4, "run1"), "");
  ASSERT_TRUE(old.ok());
  EXPECT_TRUE(old->new_run);
  EXPECT_EQ(after.Open(HelloFrom("alice", 0, "bad id!"), "").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(WorkerCoreCheckpoint, LoadIsRefusedOnceServingAndForDamagedProgress) {
  std::map<std::string, FakeServer::Saved> disk;
  FakeServer server(&disk);
  WorkerCore core(server);
  EXPECT_EQ(core.LoadCheckpoint("missing.pt").status().code(), absl::StatusCode::kNotFound);
  disk["bad.pt"] = FakeServer::Saved{3, "alice 2\nnot a line\n"};
  auto bad = core.LoadCheckpoint("bad.pt");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(bad.status().message().find("line 2"), std::string::npos) << bad.status();
  for (const char* bad : {"alice x\n", "alice 2 run/1\n", "alice 2 run1 extra\n"}) {
    disk["bad.pt"] = FakeServer::Saved{3, bad};
    EXPECT_EQ(core.LoadCheckpoint("bad.pt").status().code(), absl::StatusCode::kFailedPrecondition)
        << bad;
  }
  disk["good.pt"] = FakeServer::Saved{3, "alice 2\n"};
  ASSERT_TRUE(core.Open(HelloFrom("alice", 0), "").ok());
  EXPECT_EQ(core.LoadCheckpoint("good.pt").status().code(), absl::StatusCode::kFailedPrecondition);
}

// A handler without checkpoints says so.
TEST(WorkerCoreCheckpoint, AHandlerWithoutCheckpointsIsUnimplemented) {
  class Plain : public trainer::ServerHandler {
   public:
    uint64_t OpenSession() override { return 1; }
    int64_t CloseSession(uint64_t) override { return 0; }
    absl::StatusOr<trainer::DownFrame> Train(uint64_t, const trainer::UpFrame&, bool) override {
      return trainer::DownFrame{};
    }
    absl::StatusOr<trainer::EvalPiece> Evaluate(uint64_t, const trainer::UpFrame&) override {
      return trainer::EvalPiece{};
    }
    int64_t updates() const override { return 0; }
  } plain;
  WorkerCore core(plain);
  EXPECT_EQ(core.SaveCheckpoint("x").status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(core.LoadCheckpoint("x").status().code(), absl::StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace splitq::server

namespace splitq::server {
namespace {

// Makes `session`'s step `step` ready (its labels and a one-chunk frame).
void MakeReady(WorkerCore& core, uint64_t session, uint64_t step,
               const std::string& frame = "frame") {
  ASSERT_TRUE(core.AddLabels(session, step, {1, 2}, {}).ok());
  auto done = core.AddChunk(session, rpc::Chunk{step, 0, 1, frame.size(), frame, {}});
  ASSERT_TRUE(done.ok()) << done.status();
  ASSERT_TRUE(*done);
}

// Three clients' ready steps become one TrainMerged call and one update; a bad frame fails
// alone; a session without a complete frame fails alone; the stats count applied steps.
TEST(WorkerCoreMerge, ReadyStepsBecomeOneUpdate) {
  std::map<std::string, FakeServer::Saved> disk;
  FakeServer server(&disk);
  WorkerCore core(server);
  std::vector<uint64_t> ids;
  for (const char* name : {"a", "b", "c", "d"}) {
    auto w = core.Open(HelloFrom(name, 0), "");
    ASSERT_TRUE(w.ok());
    ids.push_back(w->session_id);
  }
  for (int i = 0; i < 3; ++i) MakeReady(core, ids[i], 0);
  EXPECT_EQ(core.ready_targets(ids[0]), 2);
  EXPECT_EQ(core.ready_targets(ids[3]), 0);
  auto results = core.RunSteps({ids[0], ids[1], ids[2], ids[3]});
  ASSERT_EQ(results.size(), 4u);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(results[i].ok()) << results[i].status();
  EXPECT_EQ(results[3].status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(server.merges, (std::vector<size_t>{3}));
  EXPECT_EQ(core.stats().updates, 1);
  EXPECT_EQ(core.stats().steps_applied, 3);
  EXPECT_EQ(core.stats().steps_served, 3);

  MakeReady(core, ids[0], 1, "bad");
  MakeReady(core, ids[1], 1);
  results = core.RunSteps({ids[0], ids[1]});
  EXPECT_EQ(results[0].status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(results[1].ok());
  EXPECT_EQ(core.stats().updates, 2);
  EXPECT_EQ(core.stats().steps_applied, 4);
}

// A replayed step in a merge (a client back from an older checkpoint) is answered alone and
// applied no second time.
TEST(WorkerCoreMerge, ReplaysAreNotAppliedTwice) {
  std::map<std::string, FakeServer::Saved> disk;
  FakeServer server(&disk);
  WorkerCore core(server);
  auto a = core.Open(HelloFrom("a", 0), "");
  auto b = core.Open(HelloFrom("b", 0), "");
  ASSERT_TRUE(a.ok() && b.ok());
  for (uint64_t step = 0; step < 3; ++step) {
    MakeReady(core, a->session_id, step);
    MakeReady(core, b->session_id, step);
    auto r = core.RunSteps({a->session_id, b->session_id});
    ASSERT_TRUE(r[0].ok() && r[1].ok());
  }
  EXPECT_EQ(core.stats().updates, 3);
  // Client a restarts from step 1: steps 1 and 2 are replays.
  auto a2 = core.Open(HelloFrom("a", 1), "");
  ASSERT_TRUE(a2.ok());
  EXPECT_EQ(a2->next_applied, 3);
  MakeReady(core, a2->session_id, 1);
  MakeReady(core, b->session_id, 3);
  server.merges.clear();
  server.applied.clear();
  auto r = core.RunSteps({a2->session_id, b->session_id});
  ASSERT_TRUE(r[0].ok() && r[1].ok());
  EXPECT_EQ(server.applied, (std::vector<int64_t>{3}));  // b's step 3 only
  EXPECT_EQ(core.stats().updates, 4);
  EXPECT_EQ(core.stats().steps_served, 8);
  EXPECT_EQ(core.stats().steps_applied, 7);
}

}  // namespace
}  // namespace splitq::server

// client/client_session.h against real services with a fake server part: ReconnectingLink fails
// over to the coordinator's next worker when its worker goes away, reports a worker it cannot
// reach so that the coordinator picks another, gives up after its reconnect timeout, and passes
// non-transient errors through, and refuses an answer above its frame limit; RunId is kept
// across restarts. Nothing here reads log text.
#include "client/client_session.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include "base/files.h"
#include "server/coordinator_core.h"
#include "server/coordinator_service.h"
#include "server/worker_core.h"
#include "server/worker_service.h"

namespace splitq::client {
namespace {

// Answers every step with a one-byte "gradient" naming the worker, and counts steps.
class FakeServerPart : public trainer::ServerHandler {
 public:
  explicit FakeServerPart(char tag, size_t answer_bytes = 1)
      : tag_(tag), answer_bytes_(answer_bytes) {}
  uint64_t OpenSession() override { return ++sessions_; }
  int64_t CloseSession(uint64_t) override { return 0; }
  absl::StatusOr<trainer::DownFrame> Train(uint64_t, const trainer::UpFrame& up, bool) override {
    ++updates_;
    trainer::DownFrame down;
    down.step = up.step;
    down.frame = std::string(answer_bytes_, tag_);
    return down;
  }
  absl::StatusOr<trainer::EvalPiece> Evaluate(uint64_t, const trainer::UpFrame&) override {
    return trainer::EvalPiece{1.0, 1, 1, ""};
  }
  int64_t updates() const override { return updates_; }

 private:
  char tag_;
  size_t answer_bytes_;
  uint64_t sessions_ = 0;
  int64_t updates_ = 0;
};

// A worker on loopback (plaintext, no tokens) registered with the coordinator, heartbeating
// until it stops.
struct Worker {
  FakeServerPart part;
  server::WorkerCore core{part};
  server::WorkerService service{core, nullptr};
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<Heartbeater> heartbeat;
  int port = 0;

  Worker(char tag, CoordinatorClient& coordinator, const std::string& name, size_t answer_bytes = 1)
      : part(tag, answer_bytes) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service);
    server = builder.BuildAndStart();
    auto r = coordinator.Register(rpc::Role::kWorker, name,
                                  rpc::WorkerAddress{"127.0.0.1", static_cast<uint32_t>(port)}, 8);
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return;
    heartbeat = std::make_unique<Heartbeater>(
        coordinator, r->member_id, r->heartbeat_period, [] { return Heartbeater::Progress{}; },
        []() -> absl::StatusOr<uint64_t> { return absl::UnavailableError("not in this test"); });
  }
  void Stop() {
    heartbeat.reset();
    if (server) server->Shutdown(std::chrono::system_clock::now());
    server.reset();
  }
  ~Worker() { Stop(); }
};

class ClientSessionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    core_ = std::make_unique<server::CoordinatorCore>();
    service_ = std::make_unique<server::CoordinatorService>(*core_, nullptr, "task: fmnist\n");
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    options_.id = "alice";
    options_.coordinator = "127.0.0.1:" + std::to_string(port_);
    options_.security.insecure = true;
    options_.link.client_id = "alice";
    options_.connect_timeout = std::chrono::seconds(10);
    options_.reconnect_timeout = std::chrono::seconds(10);
    auto channel = MakeChannel(options_.coordinator, options_.security);
    ASSERT_TRUE(channel.ok()) << channel.status();
    coordinator_ = std::make_unique<CoordinatorClient>(*channel, "");
  }
  void TearDown() override { server_->Shutdown(std::chrono::system_clock::now()); }

  static trainer::UpFrame Up(int64_t step) {
    trainer::UpFrame up;
    up.step = step;
    up.frame = std::make_shared<const std::string>("frame");
    return up;
  }
  // One step through `link`, recovering as ClientRunner does. The gradient's byte: the worker.
  static absl::StatusOr<char> Step(ReconnectingLink& link, int64_t step) {
    for (;;) {
      auto down = link.Train(Up(step));
      if (down.ok()) return down->frame.at(0);
      if (absl::Status s = link.Recover(down.status()); !s.ok()) return s;
    }
  }

  std::unique_ptr<server::CoordinatorCore> core_;
  std::unique_ptr<server::CoordinatorService> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  ClientSessionOptions options_;
  std::unique_ptr<CoordinatorClient> coordinator_;
};

TEST_F(ClientSessionTest, FailsOverToTheNextWorkerWhenItsWorkerGoesAway) {
  Worker a('a', *coordinator_, "wa");
  ReconnectingLink link(*coordinator_, options_);
  ASSERT_TRUE(link.Connect(std::chrono::seconds(5)).ok());
  auto first = Step(link, 0);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(*first, 'a');
  EXPECT_EQ(link.worker().rfind("wa at ", 0), 0u) << link.worker();
  // A second worker comes up and the first goes away mid-run: the same step number again on a
  // new session, answered by the second worker; the step is not lost.
  Worker b('b', *coordinator_, "wb");
  a.Stop();
  auto second = Step(link, 1);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(*second, 'b');
  EXPECT_EQ(link.worker().rfind("wb at ", 0), 0u) << link.worker();
  EXPECT_EQ(a.part.updates(), 1);
  EXPECT_EQ(b.part.updates(), 1);
  link.Close();
}

TEST_F(ClientSessionTest, AWorkerThatDoesNotAnswerIsReportedAndAnotherOneIsPicked) {
  // "wdead" is registered and heartbeats (the coordinator thinks it alive), but it listens
  // nowhere.
  auto dead = coordinator_->Register(rpc::Role::kWorker, "wdead", {"127.0.0.1", 1}, 8);
  ASSERT_TRUE(dead.ok()) << dead.status();
  Heartbeater beats(
      *coordinator_, dead->member_id, dead->heartbeat_period,
      [] { return Heartbeater::Progress{}; },
      []() -> absl::StatusOr<uint64_t> { return absl::UnavailableError("not in this test"); });
  Worker b('b', *coordinator_, "wb");
  ReconnectingLink link(*coordinator_, options_);
  ASSERT_TRUE(link.Connect(std::chrono::seconds(20)).ok());
  auto step = Step(link, 0);
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(*step, 'b');
}

TEST_F(ClientSessionTest, GivesUpAfterItsReconnectTimeout) {
  options_.reconnect_timeout = std::chrono::seconds(1);
  auto a = std::make_unique<Worker>('a', *coordinator_, "wa");
  ReconnectingLink link(*coordinator_, options_);
  ASSERT_TRUE(link.Connect(std::chrono::seconds(5)).ok());
  ASSERT_TRUE(Step(link, 0).ok());
  a.reset();  // no worker at all now
  const auto start = std::chrono::steady_clock::now();
  auto step = Step(link, 1);
  EXPECT_EQ(step.status().code(), absl::StatusCode::kUnavailable) << step.status();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
}

// A worker's answer above the client's limit (RunClientSession sets it from the config:
// ClientPart::max_answer_frame_bytes) is refused before it takes that memory; one within it
// passes.
TEST_F(ClientSessionTest, AnAnswerAboveTheClientsLimitIsRefused) {
  options_.link.limits.max_frame_bytes = 4096;
  {
    Worker big('x', *coordinator_, "wbig", 100000);
    ReconnectingLink link(*coordinator_, options_);
    ASSERT_TRUE(link.Connect(std::chrono::seconds(5)).ok());
    auto down = link.Train(Up(0));
    ASSERT_FALSE(down.ok());
    EXPECT_NE(down.status().message().find("the worker's frame"), std::string::npos)
        << down.status();
    link.Close();
  }
  Worker fits('y', *coordinator_, "wfits", 4000);
  ReconnectingLink link(*coordinator_, options_);
  ASSERT_TRUE(link.Connect(std::chrono::seconds(20)).ok());
  auto step = Step(link, 0);
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(*step, 'y');
}

TEST_F(ClientSessionTest, NonTransientErrorsAreNotRetried) {
  ReconnectingLink link(*coordinator_, options_);
  const absl::Status bad = absl::InvalidArgumentError("a malformed frame");
  EXPECT_EQ(link.Recover(bad), bad);
  const absl::Status denied = absl::PermissionDeniedError("another client's token");
  EXPECT_EQ(link.Recover(denied), denied);
}

// A worker's refusal (RESOURCE_EXHAUSTED from its service) is final; the same code made by
// gRPC from a stream reset (a server under its memory quota cancelling streams) is a network
// failure, retried after a reconnect (the third outside probe: clients quit on it).
TEST(IsTransient, AStreamResetIsRetriedAServicesRefusalIsNot) {
  EXPECT_TRUE(
      client::IsTransient(absl::ResourceExhaustedError("Received RST_STREAM with error code 11")));
  EXPECT_FALSE(client::IsTransient(
      absl::ResourceExhaustedError("a frame of 300 MiB is above the limit of 6 MiB")));
  EXPECT_TRUE(client::IsTransient(absl::UnavailableError("Broken pipe")));
  EXPECT_FALSE(client::IsTransient(absl::InvalidArgumentError("a malformed frame")));
}

// A server part that answers late, or with numbers no worker sends (the sixth outside probe ran
// a fake worker: a client waited 624 s for a step that never came back, and wrote a NaN loss
// into metrics.jsonl, which is then not JSON).
class OddServerPart : public trainer::ServerHandler {
 public:
  int delay_ms = 0;
  double loss = 1.0;
  trainer::EvalPiece eval{1.0, 1, 1, ""};
  uint64_t OpenSession() override { return ++sessions_; }
  int64_t CloseSession(uint64_t) override { return 0; }
  absl::StatusOr<trainer::DownFrame> Train(uint64_t, const trainer::UpFrame& up, bool) override {
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    trainer::DownFrame down;
    down.step = up.step;
    down.frame = "g";
    down.loss = loss;
    return down;
  }
  absl::StatusOr<trainer::EvalPiece> Evaluate(uint64_t, const trainer::UpFrame&) override {
    return eval;
  }
  int64_t updates() const override { return 0; }

 private:
  uint64_t sessions_ = 0;
};

struct OddWorker {
  OddServerPart part;
  server::WorkerCore core{part};
  server::WorkerService service{core, nullptr};
  std::unique_ptr<grpc::Server> server;
  std::shared_ptr<grpc::Channel> channel;
  OddWorker() {
    int port = 0;
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service);
    server = builder.BuildAndStart();
    channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                  grpc::InsecureChannelCredentials());
  }
  ~OddWorker() { server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(3)); }
};

trainer::UpFrame OneUp(int64_t step) {
  trainer::UpFrame up;
  up.step = step;
  up.frame = std::make_shared<const std::string>("frame");
  return up;
}

TEST(WorkerClientChecks, AStepNotAnsweredInTimeEndsWithDeadlineExceeded) {
  OddWorker worker;
  worker.part.delay_ms = 2000;
  WorkerLinkOptions o;
  o.client_id = "alice";
  o.reply_timeout = std::chrono::milliseconds(300);
  WorkerClient link(worker.channel, o);
  const auto start = std::chrono::steady_clock::now();
  const auto down = link.Train(OneUp(0));
  const double waited =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(down.status().code(), absl::StatusCode::kDeadlineExceeded) << down.status();
  EXPECT_NE(down.status().message().find("--reply-timeout-s"), std::string::npos) << down.status();
  EXPECT_TRUE(IsTransient(down.status()));  // the client reconnects and resends
  EXPECT_GE(waited, 0.25);
  EXPECT_LT(waited, 1.8);  // not the 2 s the worker took
  // With time enough, the same worker answers.
  worker.part.delay_ms = 0;
  WorkerClient patient(worker.channel, o);
  EXPECT_TRUE(patient.Train(OneUp(0)).ok());
}

TEST(WorkerClientChecks, NumbersNoWorkerSendsAreRefused) {
  OddWorker worker;
  WorkerLinkOptions o;
  o.client_id = "alice";
  for (const double loss : {std::nan(""), HUGE_VAL, -HUGE_VAL}) {
    worker.part.loss = loss;
    WorkerClient link(worker.channel, o);
    const auto down = link.Train(OneUp(0));
    EXPECT_EQ(down.status().code(), absl::StatusCode::kInternal) << loss << ": " << down.status();
    EXPECT_FALSE(IsTransient(down.status()));
  }
  worker.part.loss = 1.0;
  for (const trainer::EvalPiece& bad :
       {trainer::EvalPiece{std::nan(""), 1, 1, ""}, trainer::EvalPiece{1.0, 2, 1, ""},
        trainer::EvalPiece{-1.0, 0, 1, ""}}) {
    worker.part.eval = bad;
    WorkerClient link(worker.channel, o);
    const auto piece = link.Evaluate(OneUp(0));
    EXPECT_EQ(piece.status().code(), absl::StatusCode::kInternal) << piece.status();
  }
  worker.part.eval = trainer::EvalPiece{1.0, 1, 1, ""};
  WorkerClient link(worker.channel, o);
  EXPECT_TRUE(link.Evaluate(OneUp(0)).ok());
}

TEST(RunId, IsMadeOnceAndKeptAcrossRestarts) {
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("splitq_run_id_" + std::to_string(getpid())))
          .string();
  base::RemoveTree(dir);
  auto first = RunId(dir);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_TRUE(rpc::IsValidMemberName(*first));
  auto again = RunId(dir);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *first);
  auto other = RunId(dir + "/other");
  ASSERT_TRUE(other.ok());
  EXPECT_NE(*other, *first);
  std::ofstream(std::filesystem::path(dir) / "run_id") << "not a run id!\n";
  EXPECT_EQ(RunId(dir).status().code(), absl::StatusCode::kFailedPrecondition);
  base::RemoveTree(dir);
}

}  // namespace
}  // namespace splitq::client

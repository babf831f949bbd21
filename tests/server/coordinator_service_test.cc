// server/coordinator_service.h over a real gRPC server on an OS-picked loopback port: tokens
// are required, a worker and a client register and meet, an old protocol version is refused
// with a clear message, and a worker that stops heartbeating is marked dead by the service's
// own expiry thread (the heartbeat reply then asks it to register again), and a token speaks
// only for its own id; malformed bodies are INVALID_ARGUMENT.
#include "server/coordinator_service.h"

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "client/coordinator_client.h"
#include "proto/rpc_channel.h"

namespace splitq::server {
namespace {

const std::string kToken = "0123456789abcdef0123456789abcdef";        // alice's
const std::string kWorkerToken = "fedcba9876543210fedcba9876543210";  // w's

class CoordinatorServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto tokens =
        TokenSet::Parse("alice " + kToken + " client\nw " + kWorkerToken + " worker\n", "test");
    ASSERT_TRUE(tokens.ok());
    tokens_ = std::make_unique<TokenSet>(*tokens);
    core_ = std::make_unique<CoordinatorCore>(Options());
    service_ = std::make_unique<CoordinatorService>(*core_, tokens_.get(), "task: fmnist\n");
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = splitq::v1::Coordinator::NewStub(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(port_), grpc::InsecureChannelCredentials()));
  }
  // Heartbeats every 50 ms, dead after 100 ms: the expiry test waits for it.
  virtual CoordinatorOptions Options() const {
    return CoordinatorOptions{std::chrono::milliseconds(50), std::chrono::milliseconds(100), 64};
  }
  void TearDown() override {
    server_->Shutdown();
    service_.reset();
  }

  // A call with the token of `who` ("alice" or "w"; "" for none).
  std::unique_ptr<grpc::ClientContext> Context(const std::string& who = "alice") {
    auto context = std::make_unique<grpc::ClientContext>();
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    if (!who.empty()) rpc::AddBearer(*context, who == "w" ? kWorkerToken : kToken);
    return context;
  }
  // Registers `name` with its own token (or none, or `as`'s).
  grpc::Status Register(splitq::v1::Role role, const std::string& name,
                        splitq::v1::RegisterReply* reply, int version = 1, bool token = true,
                        const std::string& as = "") {
    splitq::v1::RegisterRequest request;
    request.set_protocol_version(static_cast<splitq::v1::ProtocolVersion>(version));
    request.set_role(role);
    request.set_name(name);
    request.mutable_endpoint()->set_host("127.0.0.1");
    request.mutable_endpoint()->set_port(9999);
    return stub_->Register(Context(token ? (as.empty() ? name : as) : "").get(), request, reply);
  }

  int port_ = 0;
  std::unique_ptr<TokenSet> tokens_;
  std::unique_ptr<CoordinatorCore> core_;
  std::unique_ptr<CoordinatorService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<splitq::v1::Coordinator::Stub> stub_;
};

// Tokens have roles: a client's token cannot register a worker (one that would never answer
// and draw clients to it), nor a worker's token a client.
TEST_F(CoordinatorServiceTest, ATokenRegistersOnlyItsRole) {
  splitq::v1::RegisterReply reply;
  const grpc::Status as_worker = Register(splitq::v1::ROLE_WORKER, "alice", &reply);
  EXPECT_EQ(as_worker.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_NE(as_worker.error_message().find("client token"), std::string::npos)
      << as_worker.error_message();
  const grpc::Status as_client = Register(splitq::v1::ROLE_CLIENT, "w", &reply);
  EXPECT_EQ(as_client.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_TRUE(Register(splitq::v1::ROLE_WORKER, "w", &reply).ok());
  EXPECT_TRUE(Register(splitq::v1::ROLE_CLIENT, "alice", &reply).ok());
}

TEST_F(CoordinatorServiceTest, WorkerAndClientMeetWithTokens) {
  splitq::v1::RegisterReply reply;
  EXPECT_EQ(Register(splitq::v1::ROLE_WORKER, "w", &reply, 1, /*token=*/false).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  ASSERT_TRUE(Register(splitq::v1::ROLE_WORKER, "w", &reply).ok());
  EXPECT_EQ(reply.heartbeat_period_ms(), 50u);
  EXPECT_EQ(reply.config_yaml(), "task: fmnist\n");
  splitq::v1::RegisterReply client;
  ASSERT_TRUE(Register(splitq::v1::ROLE_CLIENT, "alice", &client).ok());
  splitq::v1::AssignRequest assign;
  assign.set_member_id(client.member_id());
  splitq::v1::AssignReply assigned;
  ASSERT_TRUE(stub_->Assign(Context().get(), assign, &assigned).ok());
  EXPECT_EQ(assigned.worker_name(), "w");
  EXPECT_EQ(assigned.worker().port(), 9999u);
  splitq::v1::StatusReply status;
  ASSERT_TRUE(stub_->Status(Context().get(), splitq::v1::StatusRequest(), &status).ok());
  EXPECT_EQ(status.members_size(), 2);
  EXPECT_EQ(status.next_page(), 0u);
  EXPECT_EQ(status.live_workers(), 1u);
  EXPECT_EQ(status.live_clients(), 1u);
  // A page at a time: the worker, then alice, then an empty last page.
  std::vector<std::string> names;
  splitq::v1::StatusRequest paged;
  paged.set_limit(1);
  for (int i = 0; i < 3; ++i) {
    splitq::v1::StatusReply page;
    ASSERT_TRUE(stub_->Status(Context().get(), paged, &page).ok());
    for (const auto& m : page.members()) names.push_back(m.name());
    if (page.next_page() == 0) break;
    paged.set_page(page.next_page());
  }
  EXPECT_EQ(names, (std::vector<std::string>{"w", "alice"}));
}

// A hostile peer's bodies that are not the method's message: INVALID_ARGUMENT naming the
// message, for every method (gRPC's generated handler answered an empty UNIMPLEMENTED); without
// a token, UNAUTHENTICATED before the body is looked at.
TEST_F(CoordinatorServiceTest, MalformedBodiesAreInvalidArgument) {
  grpc::GenericStub generic(grpc::CreateChannel("127.0.0.1:" + std::to_string(port_),
                                                grpc::InsecureChannelCredentials()));
  const auto call = [&](const std::string& method, const std::string& bytes, const char* who) {
    grpc::Slice slice(bytes);
    grpc::ByteBuffer request(&slice, 1), reply;
    auto context = Context(who);
    std::mutex mutex;
    std::condition_variable done;
    bool finished = false;
    grpc::Status status;
    generic.UnaryCall(context.get(), "/splitq.v1.Coordinator/" + method, grpc::StubOptions(),
                      &request, &reply, [&](grpc::Status s) {
                        std::lock_guard<std::mutex> lock(mutex);
                        status = std::move(s);
                        finished = true;
                        done.notify_one();
                      });
    std::unique_lock<std::mutex> lock(mutex);
    done.wait(lock, [&] { return finished; });
    return status;
  };
  const std::string truncated("\x0a\x05ab", 4);  // field 1, 5 bytes long, 2 there
  const std::string bad_varint(11, '\xff');
  for (const char* method : {"Register", "Assign", "Heartbeat", "Status", "Leave", "Group"}) {
    for (const std::string& body : {truncated, bad_varint}) {
      const grpc::Status s = call(method, body, "alice");
      EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << method;
      EXPECT_NE(s.error_message().find("is not a splitq.v1."), std::string::npos)
          << method << ": " << s.error_message();
    }
    EXPECT_EQ(call(method, truncated, "").error_code(), grpc::StatusCode::UNAUTHENTICATED)
        << method;
  }
  // The service still answers well-formed calls.
  splitq::v1::RegisterReply reply;
  EXPECT_TRUE(Register(splitq::v1::ROLE_CLIENT, "alice", &reply).ok());
}

TEST_F(CoordinatorServiceTest, AnOldProtocolVersionIsRefusedClearly) {
  splitq::v1::RegisterReply reply;
  const grpc::Status s = Register(splitq::v1::ROLE_CLIENT, "alice", &reply, /*version=*/0);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(s.error_message().find("protocol version"), std::string::npos) << s.error_message();
}

TEST_F(CoordinatorServiceTest, ASilentWorkerIsMarkedDeadByTheExpiryThread) {
  splitq::v1::RegisterReply reply;
  ASSERT_TRUE(Register(splitq::v1::ROLE_WORKER, "w", &reply).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(400));  // deadline 100 ms
  splitq::v1::HeartbeatRequest beat;
  beat.set_member_id(reply.member_id());
  splitq::v1::HeartbeatReply answer;
  ASSERT_TRUE(stub_->Heartbeat(Context("w").get(), beat, &answer).ok());
  EXPECT_TRUE(answer.unknown_member());
}

// The same with a 10 s deadline, for tests whose members must not expire while the test runs,
// however loaded the machine.
class CoordinatorServiceSlowExpiryTest : public CoordinatorServiceTest {
 protected:
  CoordinatorOptions Options() const override {
    return CoordinatorOptions{std::chrono::milliseconds(50), std::chrono::milliseconds(10000), 64};
  }
};

// A token speaks only for its own id: it cannot register under another name, nor assign,
// heartbeat or leave for another member (PERMISSION_DENIED, and the member is untouched).
TEST_F(CoordinatorServiceSlowExpiryTest, ATokenSpeaksOnlyForItsOwnId) {
  splitq::v1::RegisterReply worker, client;
  const grpc::Status rogue = Register(splitq::v1::ROLE_WORKER, "rogue", &worker, 1, true, "alice");
  EXPECT_EQ(rogue.error_code(), grpc::StatusCode::PERMISSION_DENIED) << rogue.error_message();
  EXPECT_NE(rogue.error_message().find("'alice'"), std::string::npos) << rogue.error_message();
  ASSERT_TRUE(Register(splitq::v1::ROLE_WORKER, "w", &worker).ok());
  ASSERT_TRUE(Register(splitq::v1::ROLE_CLIENT, "alice", &client).ok());

  splitq::v1::HeartbeatRequest beat;
  beat.set_member_id(worker.member_id());
  beat.set_step(999);
  splitq::v1::HeartbeatReply answer;
  EXPECT_EQ(stub_->Heartbeat(Context("alice").get(), beat, &answer).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  splitq::v1::LeaveRequest leave;
  leave.set_member_id(worker.member_id());
  splitq::v1::LeaveReply left;
  EXPECT_EQ(stub_->Leave(Context("alice").get(), leave, &left).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  splitq::v1::AssignRequest assign;
  assign.set_member_id(client.member_id());
  splitq::v1::AssignReply assigned;
  EXPECT_EQ(stub_->Assign(Context("w").get(), assign, &assigned).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);

  // The worker is still alive, with its own step, and serves alice.
  ASSERT_TRUE(stub_->Assign(Context("alice").get(), assign, &assigned).ok());
  EXPECT_EQ(assigned.worker_name(), "w");
  splitq::v1::StatusReply status;
  ASSERT_TRUE(stub_->Status(Context().get(), splitq::v1::StatusRequest(), &status).ok());
  for (const splitq::v1::MemberStatus& m : status.members()) {
    EXPECT_TRUE(m.alive()) << m.name();
    EXPECT_EQ(m.step(), 0u) << m.name();
  }
}

// A Heartbeater whose beats fail says so once, not every period (here 10 ms: a period of 0 is
// raised to that, not a spin), and one whose beats get through says nothing.
TEST_F(CoordinatorServiceSlowExpiryTest, HeartbeatFailuresAreLoggedOnceNotEveryBeat) {
  splitq::v1::RegisterReply worker;
  ASSERT_TRUE(Register(splitq::v1::ROLE_WORKER, "w", &worker).ok());
  auto channel =
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port_), grpc::InsecureChannelCredentials());
  client::CoordinatorClient as_alice(channel, kToken), as_w(channel, kWorkerToken);
  std::mutex mutex;
  std::vector<std::string> bad_lines, good_lines;
  int beats = 0;
  {
    client::Heartbeater wrong(
        as_alice, worker.member_id(), std::chrono::milliseconds(0),
        [&] {
          std::lock_guard<std::mutex> lock(mutex);
          ++beats;
          return client::Heartbeater::Progress{};
        },
        {},
        [&](const std::string& line) {
          std::lock_guard<std::mutex> lock(mutex);
          bad_lines.push_back(line);
        });
    client::Heartbeater right(as_w, worker.member_id(), std::chrono::milliseconds(10), {}, {},
                              [&](const std::string& line) {
                                std::lock_guard<std::mutex> lock(mutex);
                                good_lines.push_back(line);
                              });
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  }
  EXPECT_GE(beats, 2);
  EXPECT_LE(beats, 40);  // about one per 10 ms plus the call's time, not a spin
  ASSERT_EQ(bad_lines.size(), 1u);
  EXPECT_NE(bad_lines[0].find("PERMISSION_DENIED"), std::string::npos) << bad_lines[0];
  EXPECT_TRUE(good_lines.empty());
}

}  // namespace
}  // namespace splitq::server

// server/coordinator_service.h over a real gRPC server on an OS-picked loopback port: tokens
// are required, a worker and a client register and meet, an old protocol version is refused
// with a clear message, and a worker that stops heartbeating is marked dead by the service's
// own expiry thread (the heartbeat reply then asks it to register again).
#include "server/coordinator_service.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>

namespace splitq::server {
namespace {

const std::string kToken = "0123456789abcdef0123456789abcdef";

class CoordinatorServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto tokens = TokenSet::Parse("alice " + kToken + "\n", "test");
    ASSERT_TRUE(tokens.ok());
    tokens_ = std::make_unique<TokenSet>(*tokens);
    core_ = std::make_unique<CoordinatorCore>(
        CoordinatorOptions{std::chrono::milliseconds(50), std::chrono::milliseconds(100), 64});
    service_ = std::make_unique<CoordinatorService>(*core_, tokens_.get(), "task: fmnist\n");
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = splitq::v1::Coordinator::NewStub(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(port_), grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    server_->Shutdown();
    service_.reset();
  }

  std::unique_ptr<grpc::ClientContext> Context(bool with_token = true) {
    auto context = std::make_unique<grpc::ClientContext>();
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    if (with_token) AddBearer(*context, kToken);
    return context;
  }
  grpc::Status Register(splitq::v1::Role role, const std::string& name,
                        splitq::v1::RegisterReply* reply, int version = 1, bool token = true) {
    splitq::v1::RegisterRequest request;
    request.set_protocol_version(static_cast<splitq::v1::ProtocolVersion>(version));
    request.set_role(role);
    request.set_name(name);
    request.mutable_endpoint()->set_host("127.0.0.1");
    request.mutable_endpoint()->set_port(9999);
    return stub_->Register(Context(token).get(), request, reply);
  }

  int port_ = 0;
  std::unique_ptr<TokenSet> tokens_;
  std::unique_ptr<CoordinatorCore> core_;
  std::unique_ptr<CoordinatorService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<splitq::v1::Coordinator::Stub> stub_;
};

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
  ASSERT_TRUE(stub_->Heartbeat(Context().get(), beat, &answer).ok());
  EXPECT_TRUE(answer.unknown_member());
}

}  // namespace
}  // namespace splitq::server

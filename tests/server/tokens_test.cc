// server/tokens.h: token files parse strictly, written tokens load back and are private, and
// a real gRPC service that checks them answers UNAUTHENTICATED for a missing or wrong token
// and serves the right one, over an OS-picked loopback port.
#include "server/tokens.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "base/files.h"
#include "proto/rpc_channel.h"
#include "splitq/v1/coordinator.grpc.pb.h"

namespace splitq::server {
namespace {

const std::string kTokenA = "0123456789abcdef0123456789abcdef";
const std::string kTokenB = "fedcba9876543210fedcba9876543210";

TEST(TokenSet, ParsesAndRefusesBadFiles) {
  auto set = TokenSet::Parse("# comment\n\nalice " + kTokenA + "\nbob " + kTokenB + "\n", "t");
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->size(), 2u);
  for (const std::string& bad : std::vector<std::string>{
           "alice\n", "alice " + kTokenA + " extra\n", "al/ice " + kTokenA + "\n", "alice short\n",
           "alice " + kTokenA + "\nalice " + kTokenB + "\n",
           "alice " + kTokenA + "\nbob " + kTokenA + "\n"}) {
    const auto r = TokenSet::Parse(bad, "tokens");
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(r.status().message().find("tokens:"), std::string::npos) << r.status();
  }
  EXPECT_EQ(TokenSet::Load("/nonexistent/tokens").status().code(), absl::StatusCode::kNotFound);
}

TEST(TokenSet, AuthenticateNamesTheClient) {
  auto set = TokenSet::Parse("alice " + kTokenA + "\nbob " + kTokenB + "\n", "t");
  ASSERT_TRUE(set.ok());
  const std::string good = "Bearer " + kTokenB, wrong = "Bearer " + kTokenB + "x",
                    basic = "Basic " + kTokenB;
  std::multimap<grpc::string_ref, grpc::string_ref> metadata;
  EXPECT_EQ(set->Authenticate(metadata).status().code(), absl::StatusCode::kUnauthenticated);
  metadata.emplace("authorization", good);
  ASSERT_TRUE(set->Authenticate(metadata).ok());
  EXPECT_EQ(*set->Authenticate(metadata), "bob");
  for (const std::string* v : {&wrong, &basic}) {
    std::multimap<grpc::string_ref, grpc::string_ref> m;
    m.emplace("authorization", *v);
    EXPECT_EQ(set->Authenticate(m).status().code(), absl::StatusCode::kUnauthenticated) << *v;
  }
}

// A line's role: client or worker; none (files from before roles) is either; others refused.
TEST(Tokens, LinesCarryARole) {
  auto set = TokenSet::Parse("a " + kTokenA + " client\nb " + kTokenB + "\n", "t");
  ASSERT_TRUE(set.ok()) << set.status();
  std::multimap<grpc::string_ref, grpc::string_ref> metadata;
  const std::string a = "Bearer " + kTokenA, b = "Bearer " + kTokenB;
  metadata.emplace("authorization", a);
  EXPECT_EQ(set->Identify(metadata)->role, TokenRole::kClient);
  metadata.clear();
  metadata.emplace("authorization", b);
  EXPECT_EQ(set->Identify(metadata)->role, TokenRole::kAny);
  auto bad = TokenSet::Parse("a " + kTokenA + " admin\n", "t");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("client or worker"), std::string::npos) << bad.status();
}

// A token with a byte gRPC may not put in a header (a control byte, a space inside a member's
// own file, UTF-8) is refused when it is read, naming the file: before, the client or worker
// aborted on its first call (SIGABRT, nothing printed).
TEST(Tokens, TokensOfBytesAHeaderCannotCarryAreRefused) {
  for (const std::string bad : {std::string("aaaaaaaaaaaaaaaaaaaa\x01bbbb"),
                                std::string("aaaaaaaaaaaaaaaaaaaa\x00bbbb", 25),
                                std::string("aaaaaaaaaaaaaaaaaaaa\xc3\xa9\xff"),
                                std::string("aaaaaaaaaaaa aaaaaaaaaaaa")}) {
    const std::string dir = ::testing::TempDir() + "/bad_token";
    std::filesystem::create_directories(dir);
    const std::string path = dir + "/t.token";
    {
      std::ofstream out(path, std::ios::binary);
      out << bad << "\n";
    }
    std::filesystem::permissions(
        path, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
    const auto token = ReadToken(path);
    EXPECT_EQ(token.status().code(), absl::StatusCode::kInvalidArgument) << token.status();
    EXPECT_NE(token.status().message().find(path), std::string::npos) << token.status();
    if (bad.find(' ') == std::string::npos) {
      const auto set = TokenSet::Parse("alice " + bad + " client\n", "tokens");
      EXPECT_EQ(set.status().code(), absl::StatusCode::kInvalidArgument) << set.status();
      EXPECT_NE(set.status().message().find("visible ASCII"), std::string::npos) << set.status();
    }
  }
}

TEST(Tokens, WrittenFilesLoadBackAndArePrivate) {
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("splitq_tokens_" + std::to_string(getpid())))
          .string();
  ASSERT_TRUE(WriteTokens(dir, {"alice", "bob"}, {"w0"}).ok());
  auto set = TokenSet::Load(dir + "/tokens");
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->size(), 3u);
  auto token = ReadToken(dir + "/bob.token");
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_EQ(token->size(), 64u);
  const std::string header = "Bearer " + *token;
  std::multimap<grpc::string_ref, grpc::string_ref> metadata;
  metadata.emplace("authorization", header);
  EXPECT_EQ(*set->Authenticate(metadata), "bob");
  EXPECT_EQ(set->Identify(metadata)->role, TokenRole::kClient);
  const std::string worker_header = "Bearer " + *ReadToken(dir + "/w0.token");
  std::multimap<grpc::string_ref, grpc::string_ref> worker;
  worker.emplace("authorization", worker_header);
  EXPECT_EQ(set->Identify(worker)->id, "w0");
  EXPECT_EQ(set->Identify(worker)->role, TokenRole::kWorker);
  for (const char* name : {"tokens", "alice.token", "bob.token", "w0.token"}) {
    struct stat st {};
    ASSERT_EQ(stat((dir + "/" + name).c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u) << name;
  }
  EXPECT_EQ(WriteTokens(dir, {"a b"}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WriteTokens(dir, {"x", "x"}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WriteTokens(dir, {"x"}, {"x"}).code(), absl::StatusCode::kInvalidArgument);
  base::RemoveTree(dir);
}

// Token files that cannot serve say why: missing, a directory, too large, unreadable, or without
// a token (a coordinator or worker would refuse every call), each naming the file. A pipe works.
TEST(Tokens, UnusableFilesSayWhy) {
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("splitq_badtok_" + std::to_string(getpid())))
          .string();
  std::filesystem::create_directories(dir);
  const auto expect = [](const absl::Status& s, absl::StatusCode code, const std::string& path,
                         const char* words) {
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_NE(s.message().find(path), std::string::npos) << s;
    EXPECT_NE(s.message().find(words), std::string::npos) << s;
  };
  expect(TokenSet::Load(dir + "/none").status(), absl::StatusCode::kNotFound, dir + "/none",
         "No such file");
  expect(ReadToken(dir + "/none").status(), absl::StatusCode::kNotFound, dir + "/none",
         "No such file");
  expect(TokenSet::Load(dir).status(), absl::StatusCode::kInvalidArgument, dir, "a directory");
  const std::string empty = dir + "/empty";
  ASSERT_TRUE(base::WriteFileAtomically(empty, "# only a comment\n", 0600).ok());
  expect(TokenSet::Load(empty).status(), absl::StatusCode::kInvalidArgument, empty, "no tokens");
  const std::string blank = dir + "/blank";
  ASSERT_TRUE(base::WriteFileAtomically(blank, "\n", 0600).ok());
  expect(ReadToken(blank).status(), absl::StatusCode::kInvalidArgument, blank, "no token");
  // A pipe works, as `--token <(...)` gives one.
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  const std::string token = "0123456789abcdef0123456789abcdef";
  ASSERT_EQ(write(fds[1], token.data(), token.size()), static_cast<ssize_t>(token.size()));
  close(fds[1]);
  auto piped = ReadToken("/dev/fd/" + std::to_string(fds[0]));
  close(fds[0]);
  ASSERT_TRUE(piped.ok()) << piped.status();
  EXPECT_EQ(*piped, token);
  // Too large.
  const std::string huge = dir + "/huge";
  ASSERT_TRUE(base::WriteFileAtomically(huge, std::string(5000, 'a'), 0600).ok());
  expect(ReadToken(huge).status(), absl::StatusCode::kInvalidArgument, huge, "more than");
  if (geteuid() != 0) {  // root reads files whatever their mode
    const std::string locked = dir + "/locked";
    ASSERT_TRUE(base::WriteFileAtomically(locked, "alice 0123456789abcdef0123\n", 0000).ok());
    expect(TokenSet::Load(locked).status(), absl::StatusCode::kPermissionDenied, locked,
           "Permission denied");
  }
  base::RemoveTree(dir);
}

// A coordinator whose Status checks the bearer token first.
class CheckingCoordinator final : public splitq::v1::Coordinator::Service {
 public:
  explicit CheckingCoordinator(TokenSet tokens) : tokens_(std::move(tokens)) {}
  grpc::Status Status(grpc::ServerContext* context, const splitq::v1::StatusRequest*,
                      splitq::v1::StatusReply* reply) override {
    auto client = tokens_.Authenticate(context->client_metadata());
    if (!client.ok()) return rpc::ToGrpcStatus(client.status());
    reply->set_global_step(7);
    return grpc::Status::OK;
  }

 private:
  TokenSet tokens_;
};

TEST(Tokens, ARealServiceRefusesMissingAndWrongTokens) {
  auto set = TokenSet::Parse("alice " + kTokenA + "\n", "t");
  ASSERT_TRUE(set.ok());
  CheckingCoordinator service(*set);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  auto stub = splitq::v1::Coordinator::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  auto call = [&](const std::string* token) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    if (token != nullptr) rpc::AddBearer(context, *token);
    splitq::v1::StatusRequest request;
    splitq::v1::StatusReply reply;
    const grpc::Status status = stub->Status(&context, request, &reply);
    return std::make_pair(status.error_code(), reply.global_step());
  };
  EXPECT_EQ(call(nullptr).first, grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(call(&kTokenB).first, grpc::StatusCode::UNAUTHENTICATED);
  const auto ok = call(&kTokenA);
  EXPECT_EQ(ok.first, grpc::StatusCode::OK);
  EXPECT_EQ(ok.second, 7u);
  server->Shutdown();
}

}  // namespace
}  // namespace splitq::server

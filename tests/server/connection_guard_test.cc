// server/connection_guard.h on a real gRPC server (StartServing, the coordinator's service with
// tokens) on an OS-picked loopback port. Hostile peers are raw TCP connections that never send
// a byte, from several loopback source addresses (127.0.0.x): the caps per address and in total
// close the next one at once; connections that carried an authenticated call stop counting;
// a call without a valid token does not free its connection; closed connections free their
// place; connections pending too long are evicted; the server keeps listening throughout.
#include "server/connection_guard.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "client/coordinator_client.h"
#include "server/coordinator_service.h"
#include "server/process.h"

namespace splitq::server {
namespace {

const std::string kToken = "0123456789abcdef0123456789abcdef";

// A raw TCP connection from `source` (127.0.0.x) to 127.0.0.1:port; -1 on failure.
int Dial(const std::string& source, int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in from{};
  from.sin_family = AF_INET;
  inet_pton(AF_INET, source.c_str(), &from.sin_addr);
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&from), sizeof from) != 0 ||
      connect(fd, reinterpret_cast<sockaddr*>(&to), sizeof to) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Whether the server closed `fd` within `wait` (EOF or a reset). What the server sent first
// (a plaintext gRPC server's HTTP/2 settings) is read and skipped.
bool ClosedWithin(int fd, std::chrono::milliseconds wait) {
  const auto end = std::chrono::steady_clock::now() + wait;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        end - std::chrono::steady_clock::now());
    pollfd p{fd, POLLIN, 0};
    if (left.count() <= 0 || poll(&p, 1, static_cast<int>(left.count())) <= 0) return false;
    char buffer[256];
    if (recv(fd, buffer, sizeof buffer, MSG_DONTWAIT) <= 0) return true;
  }
}

class ConnectionGuardTest : public ::testing::Test {
 protected:
  void SetUp() override { Start(ConnectionLimits{6, 3}); }
  void Start(ConnectionLimits limits) {
    auto tokens = TokenSet::Parse("alice " + kToken + " client\n", "test");
    ASSERT_TRUE(tokens.ok());
    tokens_ = std::make_unique<TokenSet>(*tokens);
    core_ = std::make_unique<CoordinatorCore>();
    guard_ = std::make_unique<ConnectionGuard>(limits);
    service_ =
        std::make_unique<CoordinatorService>(*core_, tokens_.get(), "task: fmnist\n", guard_.get());
    ServingOptions options;
    options.listen = "127.0.0.1:0";
    options.security.insecure = true;
    options.guard = guard_.get();
    auto serving = StartServing(options, {service_.get()}, "splitq.v1.Coordinator");
    ASSERT_TRUE(serving.ok()) << serving.status();
    serving_ = std::move(*serving);
  }
  void TearDown() override { Stop(); }
  void Stop() {
    for (int fd : fds_) close(fd);
    fds_.clear();
    if (serving_.server) serving_.server->Shutdown();
    serving_.server.reset();  // before the service it serves
    service_.reset();
  }
  int Open(const std::string& source) {
    const int fd = Dial(source, serving_.port);
    EXPECT_GE(fd, 0) << source;
    fds_.push_back(fd);
    return fd;
  }
  // Registers a client over a fresh channel (its own connection from 127.0.0.1).
  absl::Status Call(const std::string& token, std::shared_ptr<grpc::Channel>* keep) {
    grpc::ChannelArguments args;
    args.SetInt("grpc.use_local_subchannel_pool", 1);  // not shared with other channels
    *keep = grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(serving_.port),
                                      grpc::InsecureChannelCredentials(), args);
    client::CoordinatorClient client(*keep, token);
    return client.Register(rpc::Role::kClient, "alice").status();
  }

  std::unique_ptr<TokenSet> tokens_;
  std::unique_ptr<CoordinatorCore> core_;
  std::unique_ptr<ConnectionGuard> guard_;
  std::unique_ptr<CoordinatorService> service_;
  Serving serving_;
  std::vector<int> fds_;
};

// With a hard open-files limit of 200 the caps come down to 100 (the per-address cap of 64
// stays), and the note says so. In a child process: the limit cannot be raised again.
void LoweredToHalf() {
  rlimit r{};
  r.rlim_cur = r.rlim_max = 200;
  if (setrlimit(RLIMIT_NOFILE, &r) != 0) std::_Exit(2);
  ConnectionLimits limits;  // 1024 and 64
  const std::string note = FitToDescriptorLimit(&limits);
  const bool ok = limits.max_pending == 100 && limits.max_pending_per_address == 64 &&
                  note.find("capped at 100 in total") != std::string::npos;
  if (!ok) {
    std::fprintf(stderr, "caps %d/%d, note '%s'\n", limits.max_pending,
                 limits.max_pending_per_address, note.c_str());
  }
  std::_Exit(ok ? 0 : 1);
}

// A soft limit below the hard one is raised: no caps lowered when the hard limit allows.
void SoftRaisedToHard() {
  rlimit r{};
  getrlimit(RLIMIT_NOFILE, &r);
  if (r.rlim_max != RLIM_INFINITY && r.rlim_max < 4096) std::_Exit(0);  // nothing to see here
  r.rlim_cur = 256;
  if (setrlimit(RLIMIT_NOFILE, &r) != 0) std::_Exit(2);
  ConnectionLimits limits;
  const std::string note = FitToDescriptorLimit(&limits);
  getrlimit(RLIMIT_NOFILE, &r);
  std::_Exit(limits.max_pending == 1024 && note.empty() && r.rlim_cur == r.rlim_max ? 0 : 1);
}

TEST(FitToDescriptorLimitTest, CapsComeDownToHalfTheLimit) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(LoweredToHalf(), ::testing::ExitedWithCode(0), "");
  EXPECT_EXIT(SoftRaisedToHard(), ::testing::ExitedWithCode(0), "");
}

TEST_F(ConnectionGuardTest, CapsPerAddressAndInTotal) {
  using std::chrono::milliseconds;
  // Three silent connections from 127.0.0.2 stay open; the fourth is closed at once.
  std::vector<int> two;
  for (int i = 0; i < 3; ++i) two.push_back(Open("127.0.0.2"));
  for (int fd : two) EXPECT_FALSE(ClosedWithin(fd, milliseconds(200)));
  EXPECT_TRUE(ClosedWithin(Open("127.0.0.2"), milliseconds(3000)));
  // Three more from 127.0.0.3 reach the total of six; one from 127.0.0.4 is closed.
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(ClosedWithin(Open("127.0.0.3"), milliseconds(200)));
  EXPECT_TRUE(ClosedWithin(Open("127.0.0.4"), milliseconds(3000)));
  EXPECT_EQ(guard_->counts().refused, 2u);

  // Closing 127.0.0.2's three frees their places (seen at the next look, kPruneEvery apart).
  for (int fd : two) close(fd);
  fds_.erase(fds_.begin(), fds_.begin() + 3);
  std::this_thread::sleep_for(milliseconds(200));
  // An authenticated call: its connection counts while it connects, then not.
  std::shared_ptr<grpc::Channel> good;
  ASSERT_TRUE(Call(kToken, &good).ok());
  // A call with a wrong token leaves its connection pending.
  std::shared_ptr<grpc::Channel> bad;
  EXPECT_EQ(Call("not-a-token-not-a-token-not-a-token", &bad).code(),
            absl::StatusCode::kUnauthenticated);
  // Pending now: 127.0.0.3's three and the refused caller's one (4 of 6): two more fit, the
  // next is closed.
  std::this_thread::sleep_for(milliseconds(100));
  for (int i = 0; i < 2; ++i) EXPECT_FALSE(ClosedWithin(Open("127.0.0.5"), milliseconds(200)));
  EXPECT_TRUE(ClosedWithin(Open("127.0.0.6"), milliseconds(3000)));
  EXPECT_EQ(guard_->counts().pending, 6u);
  // The authenticated channel still works, and the server still listens.
  client::CoordinatorClient again(good, kToken);
  EXPECT_TRUE(again.Heartbeat(1, 0).ok());
  std::shared_ptr<grpc::Channel> late;
  for (int fd : fds_) close(fd);
  fds_.clear();
  std::this_thread::sleep_for(milliseconds(100));
  EXPECT_EQ(Call(kToken, &late).code(), absl::StatusCode::kAlreadyExists);  // alice is alive
}

// Connections pending longer than evict_after are shut down when the cap is next reached, so
// peers that connect and idle cannot hold it for good.
TEST_F(ConnectionGuardTest, StaleOnesAreEvictedAtTheCap) {
  using std::chrono::milliseconds;
  Stop();
  ConnectionLimits limits{4, 0};
  limits.evict_after = milliseconds(500);
  Start(limits);
  std::vector<int> old;
  for (int i = 0; i < 4; ++i) old.push_back(Open("127.0.0.2"));
  for (int fd : old) EXPECT_FALSE(ClosedWithin(fd, milliseconds(100)));
  std::this_thread::sleep_for(milliseconds(700));
  const int fresh = Open("127.0.0.3");  // at the cap: the look evicts the four
  for (int fd : old) EXPECT_TRUE(ClosedWithin(fd, milliseconds(3000)));
  EXPECT_FALSE(ClosedWithin(fresh, milliseconds(200)));
  EXPECT_EQ(guard_->counts().evicted, 4u);
  EXPECT_EQ(guard_->counts().refused, 0u);
}

}  // namespace
}  // namespace splitq::server

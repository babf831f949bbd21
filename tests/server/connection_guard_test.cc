// server/connection_guard.h on a real gRPC server (StartServing, the coordinator's service with
// tokens) on an OS-picked loopback port. Hostile peers are raw TCP connections that never send
// a byte, from several loopback source addresses (127.0.0.x): the caps per address and in total
// close the next one at once; connections that carried an authenticated call stop counting;
// a call without a valid token does not free its connection; closed connections free their
// place; connections pending too long are evicted; the server keeps listening throughout.
#include "server/connection_guard.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <malloc.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "base/memory.h"
#include "client/coordinator_client.h"
#include "server/coordinator_service.h"
#include "server/health.h"
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

// A hostile HTTP/2 peer without a token (grpc/grpc's wire protocol written by hand, plaintext):
// on one connection it opens `streams` calls of `path`, each announcing a request message of
// `message_bytes`, and sends as much of the messages as the server's flow-control windows let
// it, never finishing one. It ignores the server's cap on concurrent streams (a peer need not
// obey it) and stops when the server has granted nothing for `idle`. Returns the bytes the
// server still holds for it: what it sent on streams the server has not reset, 0 when the
// server closed the connection (everything freed).
struct Flood {
  int64_t held = 0;             // bytes sent on streams still open
  int64_t sent = 0;             // bytes sent in all
  int refused = 0;              // streams the server reset
  bool closed = false;          // the server closed the connection (GOAWAY or EOF)
  int64_t max_concurrent = -1;  // the server's SETTINGS_MAX_CONCURRENT_STREAMS (-1: none)
};

void PutFrame(std::string* out, uint8_t type, uint8_t flags, uint32_t stream,
              const std::string& payload) {
  const uint32_t n = static_cast<uint32_t>(payload.size());
  const char head[9] = {static_cast<char>(n >> 16),
                        static_cast<char>(n >> 8),
                        static_cast<char>(n),
                        static_cast<char>(type),
                        static_cast<char>(flags),
                        static_cast<char>(stream >> 24),
                        static_cast<char>(stream >> 16),
                        static_cast<char>(stream >> 8),
                        static_cast<char>(stream)};
  out->append(head, 9);
  out->append(payload);
}

// HPACK "literal header field without indexing, new name", both strings raw (< 127 bytes).
void PutHeader(std::string* block, const std::string& name, const std::string& value) {
  block->push_back(0);
  block->push_back(static_cast<char>(name.size()));
  block->append(name);
  block->push_back(static_cast<char>(value.size()));
  block->append(value);
}

bool SendAll(int fd, const std::string& bytes) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = send(fd, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

uint32_t Be32(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}

Flood FloodWithHalfRequests(int port, const std::string& path, int streams, uint32_t message_bytes,
                            std::chrono::milliseconds idle) {
  Flood out;
  const int fd = Dial("127.0.0.1", port);
  if (fd < 0) return out;
  std::string start = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
  PutFrame(&start, 4, 0, 0, "");  // our SETTINGS: the defaults
  int64_t connection_window = 65535;
  int64_t initial_window = 65535;
  std::vector<int64_t> window(streams, 0), sent(streams, 0), left(streams, 0);
  std::vector<bool> open(streams, true);
  for (int i = 0; i < streams; ++i) {
    std::string block;
    PutHeader(&block, ":method", "POST");
    PutHeader(&block, ":scheme", "http");
    PutHeader(&block, ":path", path);
    PutHeader(&block, ":authority", "127.0.0.1");
    PutHeader(&block, "content-type", "application/grpc");
    PutHeader(&block, "te", "trailers");
    PutFrame(&start, 1, 0x4, static_cast<uint32_t>(2 * i + 1), block);  // END_HEADERS
    window[i] = initial_window;
    left[i] = int64_t{message_bytes} + 4;  // the 5-byte prefix, and all but the last byte
  }
  if (!SendAll(fd, start)) {
    close(fd);
    return out;
  }
  std::string in;
  auto last_grant = std::chrono::steady_clock::now();
  const auto deadline = last_grant + std::chrono::seconds(60);
  while (!out.closed && std::chrono::steady_clock::now() < deadline &&
         std::chrono::steady_clock::now() - last_grant < idle) {
    // Send what the windows allow, in DATA frames of at most 16 KiB.
    for (int i = 0; i < streams && connection_window > 0; ++i) {
      while (open[i] && left[i] > 0 && window[i] > 0 && connection_window > 0) {
        const int64_t n = std::min<int64_t>({16384, left[i], window[i], connection_window});
        std::string payload(static_cast<size_t>(n), '\0');
        if (sent[i] == 0) {  // the message prefix: not compressed, then the length
          payload[1] = static_cast<char>(message_bytes >> 24);
          payload[2] = static_cast<char>(message_bytes >> 16);
          payload[3] = static_cast<char>(message_bytes >> 8);
          payload[4] = static_cast<char>(message_bytes);
        }
        std::string frame;
        PutFrame(&frame, 0, 0, static_cast<uint32_t>(2 * i + 1), payload);
        if (!SendAll(fd, frame)) {
          out.closed = true;
          break;
        }
        sent[i] += n;
        left[i] -= n;
        window[i] -= n;
        connection_window -= n;
        out.sent += n;
      }
    }
    // Read what the server says.
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 50) <= 0) continue;
    char buffer[65536];
    const ssize_t got = recv(fd, buffer, sizeof buffer, 0);
    if (got <= 0) {
      out.closed = true;
      break;
    }
    in.append(buffer, static_cast<size_t>(got));
    std::string reply;
    while (in.size() >= 9) {
      const auto* h = reinterpret_cast<const unsigned char*>(in.data());
      const size_t length = (size_t{h[0]} << 16) | (size_t{h[1]} << 8) | h[2];
      if (in.size() < 9 + length) break;
      const uint8_t type = h[3], flags = h[4];
      const uint32_t stream = Be32(h + 5) & 0x7fffffffu;
      const unsigned char* body = h + 9;
      const int index = stream == 0 ? -1 : static_cast<int>((stream - 1) / 2);
      if (type == 4 && !(flags & 1)) {  // SETTINGS: note them and acknowledge
        for (size_t k = 0; k + 6 <= length; k += 6) {
          const int id = (body[k] << 8) | body[k + 1];
          const int64_t value = Be32(body + k + 2);
          if (id == 3) out.max_concurrent = value;
          if (id == 4) {
            for (int i = 0; i < streams; ++i) window[i] += value - initial_window;
            initial_window = value;
          }
        }
        PutFrame(&reply, 4, 1, 0, "");
      } else if (type == 6 && !(flags & 1)) {  // PING: answer it
        PutFrame(&reply, 6, 1, 0, std::string(reinterpret_cast<const char*>(body), length));
      } else if (type == 8 && length == 4) {  // WINDOW_UPDATE
        const int64_t increment = Be32(body) & 0x7fffffff;
        if (stream == 0) {
          connection_window += increment;
        } else if (index < streams) {
          window[index] += increment;
        }
        last_grant = std::chrono::steady_clock::now();
      } else if (type == 3 || (type == 1 && (flags & 1))) {  // RST_STREAM, or trailers
        if (index >= 0 && index < streams && open[index]) {
          open[index] = false;
          ++out.refused;
        }
      } else if (type == 7) {  // GOAWAY
        out.closed = true;
      }
      in.erase(0, 9 + length);
    }
    if (!reply.empty() && !SendAll(fd, reply)) out.closed = true;
  }
  if (!out.closed) {
    for (int i = 0; i < streams; ++i) {
      if (open[i]) out.held += sent[i];
    }
  }
  close(fd);
  return out;
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

// Every coordinator method is registered as a stream, so the token is checked when a call's
// headers arrive and nothing of a request without one is read: a peer that opens 120 streams
// on each of three connections, announcing ~4 MiB messages, gets every stream refused at once
// and the server holds none of it (registered as unary, gRPC read whole messages first: the
// third outside probe held 1 GB of a coordinator that way).
TEST_F(ConnectionGuardTest, CallsWithoutATokenHoldNothing) {
  Stop();
  ConnectionLimits limits;  // the defaults: 100 streams per connection, no memory quota
  Start(limits);
  malloc_trim(0);
  const double rss0 = base::RssMiB();
  std::vector<Flood> floods(3);
  std::vector<std::thread> peers;
  for (Flood& f : floods) {
    peers.emplace_back([&f, port = serving_.port] {
      f = FloodWithHalfRequests(port, "/splitq.v1.Coordinator/Register", 120, (4 << 20) - 4096,
                                std::chrono::milliseconds(1000));
    });
  }
  for (std::thread& t : peers) t.join();
  for (const Flood& f : floods) {
    EXPECT_EQ(f.max_concurrent, 100);
    EXPECT_EQ(f.refused, 120);
    EXPECT_EQ(f.held, 0);
    EXPECT_LE(f.sent, int64_t{16} << 20);  // the streams' first windows at most
  }
  EXPECT_LE(base::RssMiB(), rss0 + 32);
  std::shared_ptr<grpc::Channel> good;
  EXPECT_TRUE(Call(kToken, &good).ok());
}

// The health service answers without a token (probes have none), so it reads requests from
// anyone; it reads at most HealthService::kMaxReading at once and refuses more at their
// headers. One peer with 40 unfinished ~4 MiB Check requests gets 16 read (gRPC's built-in
// health service, unary, held all 40: 160 MiB), and a probe during the flood is refused; once
// the peer goes, checks answer again and the memory in use is back near where it was.
TEST_F(ConnectionGuardTest, UnfinishedHealthChecksHoldAtMostSixteenRequests) {
  const std::string kCheck = "/grpc.health.v1.Health/Check";
  malloc_trim(0);
  const double rss0 = base::RssMiB();
  Flood flood;
  std::thread peer([&] {
    flood = FloodWithHalfRequests(serving_.port, kCheck, 40, (4 << 20) - 4096,
                                  std::chrono::milliseconds(1500));
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  const std::string address = "127.0.0.1:" + std::to_string(serving_.port);
  rpc::TransportSecurity plaintext;
  plaintext.insecure = true;
  const absl::StatusOr<std::string> during = CheckHealth(address, plaintext);
  peer.join();
  const double peak = base::RssMiB();
  std::printf(
      "flood: sent %.1f MiB, held %.1f MiB, %d streams refused; a check during it: %s; "
      "RSS %.0f MiB before, %.0f after\n",
      flood.sent / 1048576.0, flood.held / 1048576.0, flood.refused,
      during.ok() ? during->c_str() : during.status().ToString().c_str(), rss0, peak);
  EXPECT_EQ(flood.refused, 40 - HealthService::kMaxReading);
  EXPECT_LE(flood.held, int64_t{HealthService::kMaxReading} << 22);
  EXPECT_GT(flood.held, int64_t{HealthService::kMaxReading - 1} << 22);
  EXPECT_EQ(during.status().code(), absl::StatusCode::kResourceExhausted);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const absl::StatusOr<std::string> after = CheckHealth(address, plaintext);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(*after, "SERVING");
  EXPECT_EQ(CheckHealth(address, plaintext, "splitq.v1.Coordinator").value_or(""), "SERVING");
  EXPECT_EQ(CheckHealth(address, plaintext, "no.such.Service").status().code(),
            absl::StatusCode::kNotFound);
  malloc_trim(0);
  EXPECT_LE(base::RssMiB(), rss0 + 32);
}

}  // namespace
}  // namespace splitq::server

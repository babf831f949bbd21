#include "tools/throttle.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "proto/protocol.h"

namespace splitq::tools {
namespace {

using Clock = std::chrono::steady_clock;
class Pacer {
 public:
  explicit Pacer(double bytes_per_second) : rate_(bytes_per_second) {}
  // Blocks until n bytes have gone over the link.
  void Send(size_t n) {
    Clock::time_point done;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const Clock::time_point start = std::max(Clock::now(), next_);
      next_ = start + std::chrono::duration_cast<Clock::duration>(
                          std::chrono::duration<double>(static_cast<double>(n) / rate_));
      done = next_;
    }
    std::this_thread::sleep_until(done);
  }

 private:
  double rate_;
  std::mutex mutex_;
  Clock::time_point next_ = Clock::now();
};

int Connect(const rpc::WorkerAddress& target) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_socktype = SOCK_STREAM;
  if (getaddrinfo(target.host.c_str(), std::to_string(target.port).c_str(), &hints, &res) != 0) {
    return -1;
  }
  int fd = -1;
  for (addrinfo* a = res; a != nullptr && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(res);
  if (fd >= 0) {
    const int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  return fd;
}

// Copies from -> to through the pacer until `from` closes, then half-closes `to`.
void Pump(int from, int to, Pacer& pacer) {
  std::unique_ptr<char[]> buf(new char[64 << 10]);
  for (;;) {
    const ssize_t n = recv(from, buf.get(), 64 << 10, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    pacer.Send(static_cast<size_t>(n));
    for (ssize_t off = 0; off < n;) {
      const ssize_t k = send(to, buf.get() + off, static_cast<size_t>(n - off), MSG_NOSIGNAL);
      if (k <= 0) {
        shutdown(from, SHUT_RD);
        return;
      }
      off += k;
    }
  }
  shutdown(to, SHUT_WR);
}

}  // namespace

int RunThrottle(const ThrottleOptions& opt, const std::atomic<bool>& stop,
                const std::function<void()>& serving) {
  const bool to_from_stdin = opt.to == "-";
  absl::StatusOr<rpc::WorkerAddress> from = rpc::ParseHostPort(opt.listen);
  absl::StatusOr<rpc::WorkerAddress> to =
      to_from_stdin ? rpc::WorkerAddress{} : rpc::ParseHostPort(opt.to);
  for (const auto* a : {&from, &to}) {
    if (!a->ok()) {
      std::fprintf(stderr, "throttle: %s\n", std::string(a->status().message()).c_str());
      return 2;
    }
  }
  if (!std::isfinite(opt.mbit) || opt.mbit < 0.001 || opt.mbit > 1e6) {
    std::fprintf(stderr, "throttle: --mbit must be a number from 0.001 to 1000000\n");
    return 2;
  }
  const std::string& host = from->host;
  const int server = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(from->port));
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
    std::fprintf(stderr, "throttle: --listen takes an IPv4 address\n");
    return 2;
  }
  const int one = 1;
  setsockopt(server, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(server, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      listen(server, 64) != 0) {
    std::fprintf(stderr, "throttle: cannot listen on %s: %s\n", opt.listen.c_str(),
                 strerror(errno));
    return 1;
  }
  socklen_t len = sizeof addr;
  getsockname(server, reinterpret_cast<sockaddr*>(&addr), &len);
  std::printf("throttle listening on %s:%d (%.0f Mbit/s each way to %s)\n", host.c_str(),
              ntohs(addr.sin_port), opt.mbit,
              to_from_stdin ? "the address on stdin" : opt.to.c_str());
  std::fflush(stdout);
  std::string target_name = opt.to;
  if (to_from_stdin) {
    if (!std::getline(std::cin, target_name)) {
      std::fprintf(stderr, "throttle: --to -: no HOST:PORT line on stdin\n");
      return 2;
    }
    to = rpc::ParseHostPort(target_name);
    if (!to.ok()) {
      std::fprintf(stderr, "throttle: --to -: %s\n", std::string(to.status().message()).c_str());
      return 2;
    }
    std::printf("throttle forwarding to %s\n", target_name.c_str());
    std::fflush(stdout);
  }
  if (serving) serving();
  // Shared with the connection threads, which may outlive this function at shutdown.
  auto up = std::make_shared<Pacer>(opt.mbit * 1e6 / 8);
  auto down = std::make_shared<Pacer>(opt.mbit * 1e6 / 8);
  timeval poll_every{0, 200000};
  setsockopt(server, SOL_SOCKET, SO_RCVTIMEO, &poll_every, sizeof poll_every);
  while (!stop.load()) {
    const int client = accept(server, nullptr, nullptr);
    if (client < 0) continue;  // timeout: look at `stop` again
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    const timeval blocking{0, 0};  // accepted sockets inherit the listener's receive timeout
    setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &blocking, sizeof blocking);
    const int target = Connect(*to);
    if (target < 0) {
      std::fprintf(stderr, "throttle: cannot reach %s\n", target_name.c_str());
      close(client);
      continue;
    }
    std::thread([client, target, up, down] {
      std::thread back([client, target, down] { Pump(target, client, *down); });
      Pump(client, target, *up);
      back.join();
      close(client);
      close(target);
    }).detach();
  }
  close(server);
  return 0;
}

}  // namespace splitq::tools

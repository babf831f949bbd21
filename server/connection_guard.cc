#include "server/connection_guard.h"

#include <arpa/inet.h>
#include <grpc/grpc.h>
#include <grpc/support/sync.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

// gRPC's socket mutator (src/core/lib/iomgr/socket_mutator.h, not installed): the layout of
// gRPC 1.36 and later. Only the struct's name is public (grpc_types.h declares it).
enum splitq_grpc_fd_usage {
  kSplitqClientConnectionUsage,
  kSplitqServerListenerUsage,
  kSplitqServerConnectionUsage,
};
struct splitq_grpc_mutate_socket_info {
  int fd;
  splitq_grpc_fd_usage usage;
};
struct splitq_grpc_socket_mutator_vtable {
  bool (*mutate_fd)(int fd, grpc_socket_mutator* mutator);
  int (*compare)(grpc_socket_mutator* a, grpc_socket_mutator* b);
  void (*destroy)(grpc_socket_mutator* mutator);
  bool (*mutate_fd_2)(const splitq_grpc_mutate_socket_info* info, grpc_socket_mutator* mutator);
};
struct grpc_socket_mutator {
  const splitq_grpc_socket_mutator_vtable* vtable;
  gpr_refcount refcount;
};

namespace splitq::server {

namespace {

// A peer: its address (IPv4 as IPv4-mapped IPv6) and port.
struct Peer {
  std::array<uint8_t, 16> address{};
  uint16_t port = 0;
  bool operator<(const Peer& o) const {
    return std::tie(address, port) < std::tie(o.address, o.port);
  }
};

std::array<uint8_t, 16> Mapped(const in_addr& v4) {
  std::array<uint8_t, 16> a{};
  a[10] = a[11] = 0xff;
  std::memcpy(a.data() + 12, &v4, 4);
  return a;
}

bool PeerOfSocket(int fd, Peer* peer) {
  sockaddr_storage storage{};
  socklen_t len = sizeof(storage);
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&storage), &len) != 0) return false;
  if (storage.ss_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(&storage);
    peer->address = Mapped(in->sin_addr);
    peer->port = ntohs(in->sin_port);
    return true;
  }
  if (storage.ss_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&storage);
    std::memcpy(peer->address.data(), &in6->sin6_addr, 16);
    peer->port = ntohs(in6->sin6_port);
    return true;
  }
  return false;  // a Unix socket: not counted
}

// gRPC's peer string: "ipv4:1.2.3.4:5", "ipv6:[::1]:5" (brackets perhaps %-escaped, a zone
// after %25).
bool PeerOfString(const std::string& peer_string, Peer* peer) {
  const std::string unescaped =
      absl::StrReplaceAll(peer_string, {{"%5B", "["}, {"%5D", "]"}, {"%5b", "["}, {"%5d", "]"}});
  absl::string_view rest = unescaped;
  const bool v4 = absl::ConsumePrefix(&rest, "ipv4:");
  if (!v4 && !absl::ConsumePrefix(&rest, "ipv6:")) return false;
  const std::string text(rest);
  const size_t colon = text.rfind(':');
  if (colon == std::string::npos) return false;
  uint32_t port = 0;
  if (!absl::SimpleAtoi(text.substr(colon + 1), &port) || port > 65535) return false;
  std::string host = text.substr(0, colon);
  if (!v4) {
    if (host.size() < 2 || host.front() != '[' || host.back() != ']') return false;
    host = host.substr(1, host.size() - 2);
    host = host.substr(0, host.find('%'));  // the zone
    in6_addr a6{};
    if (inet_pton(AF_INET6, host.c_str(), &a6) != 1) return false;
    std::memcpy(peer->address.data(), &a6, 16);
  } else {
    in_addr a4{};
    if (inet_pton(AF_INET, host.c_str(), &a4) != 1) return false;
    peer->address = Mapped(a4);
  }
  peer->port = static_cast<uint16_t>(port);
  return true;
}

}  // namespace

struct ConnectionGuard::State {
  explicit State(ConnectionLimits l) : limits(l) {}

  struct Entry {
    int fd = -1;
    ino_t inode = 0;
    std::chrono::steady_clock::time_point since;
  };

  // On gRPC's poller thread, right after accept().
  void Accepted(int fd) {
    Peer peer;
    struct stat st {};
    if (!PeerOfSocket(fd, &peer) || fstat(fd, &st) != 0) return;
    const auto now = std::chrono::steady_clock::now();
    std::lock_guard<std::mutex> lock(mutex);
    ++accepted;
    // Also now and then below the caps, so that closed entries do not pile up under one that
    // is never reached.
    if (now - last_prune >= kPruneIdle) {
      last_prune = now;
      PruneLocked(now);
    }
    if (Full(peer.address)) {
      if (now - last_prune >= kPruneEvery) {
        last_prune = now;
        PruneLocked(now);
      }
      if (Full(peer.address)) {
        ++refused;
        ::shutdown(fd, SHUT_RDWR);  // gRPC's handshake ends on the closed socket
        return;
      }
    }
    // A port seen again is a new connection: the old entry's socket is gone.
    if (auto it = pending.find(peer); it != pending.end()) EraseLocked(it);
    pending.emplace(peer, Entry{fd, st.st_ino, now});
    ++per_address[peer.address];
    count.store(pending.size(), std::memory_order_relaxed);
  }

  void Authenticated(const std::string& text) {
    if (count.load(std::memory_order_relaxed) == 0) return;
    Peer peer;
    if (!PeerOfString(text, &peer)) return;
    std::lock_guard<std::mutex> lock(mutex);
    if (auto it = pending.find(peer); it != pending.end()) EraseLocked(it);
  }

  bool Full(const std::array<uint8_t, 16>& address) const {
    if (limits.max_pending > 0 && pending.size() >= static_cast<size_t>(limits.max_pending)) {
      return true;
    }
    if (limits.max_pending_per_address > 0) {
      const auto it = per_address.find(address);
      if (it != per_address.end() && it->second >= limits.max_pending_per_address) return true;
    }
    return false;
  }

  // Drops entries whose descriptor no longer holds their socket (closed, perhaps reused), and
  // shuts down those pending for longer than limits.evict_after (a peer that finished the transport
  // handshake and then idles would otherwise hold its place for good).
  void PruneLocked(std::chrono::steady_clock::time_point now) {
    for (auto it = pending.begin(); it != pending.end();) {
      struct stat st {};
      const bool open =
          fstat(it->second.fd, &st) == 0 && st.st_ino == it->second.inode && S_ISSOCK(st.st_mode);
      if (open && now - it->second.since > limits.evict_after) {
        ::shutdown(it->second.fd, SHUT_RDWR);
        ++evicted;
        it = EraseLocked(it);
        continue;
      }
      it = open ? std::next(it) : EraseLocked(it);
    }
  }

  std::map<Peer, Entry>::iterator EraseLocked(std::map<Peer, Entry>::iterator it) {
    const auto a = per_address.find(it->first.address);
    if (a != per_address.end() && --a->second <= 0) per_address.erase(a);
    auto next = pending.erase(it);
    count.store(pending.size(), std::memory_order_relaxed);
    return next;
  }

  const ConnectionLimits limits;
  mutable std::mutex mutex;
  std::map<Peer, Entry> pending;
  std::map<std::array<uint8_t, 16>, int> per_address;
  std::atomic<size_t> count{0};
  uint64_t accepted = 0, refused = 0, evicted = 0;
  std::chrono::steady_clock::time_point last_prune{};
};

namespace {

// What gRPC holds: the C struct first, then our state.
struct GuardMutator {
  grpc_socket_mutator base;
  std::shared_ptr<ConnectionGuard::State> state;
};

bool MutateFd(int, grpc_socket_mutator*) { return true; }
int Compare(grpc_socket_mutator* a, grpc_socket_mutator* b) { return a < b ? -1 : (a > b ? 1 : 0); }
void Destroy(grpc_socket_mutator* m) { delete reinterpret_cast<GuardMutator*>(m); }
bool MutateFd2(const splitq_grpc_mutate_socket_info* info, grpc_socket_mutator* m) {
  if (info->usage == kSplitqServerConnectionUsage) {
    reinterpret_cast<GuardMutator*>(m)->state->Accepted(info->fd);
  }
  return true;  // never false: gRPC 1.51 would stop listening on the port
}
const splitq_grpc_socket_mutator_vtable kVtable = {MutateFd, Compare, Destroy, MutateFd2};

class GuardOption : public grpc::ServerBuilderOption {
 public:
  explicit GuardOption(std::shared_ptr<ConnectionGuard::State> state) : state_(std::move(state)) {}
  void UpdateArguments(grpc::ChannelArguments* args) override {
    auto* m = new GuardMutator;
    m->base.vtable = &kVtable;
    gpr_ref_init(&m->base.refcount, 1);  // the arguments own this reference
    m->state = state_;
    args->SetSocketMutator(&m->base);
  }
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>*) override {}

 private:
  std::shared_ptr<ConnectionGuard::State> state_;
};

// Major.minor of gRPC at run time, or {0, 0}.
std::pair<int, int> RuntimeVersion() {
  const std::vector<std::string> parts = absl::StrSplit(grpc::Version(), '.');
  int major = 0, minor = 0;
  if (parts.size() < 2 || !absl::SimpleAtoi(parts[0], &major) ||
      !absl::SimpleAtoi(parts[1], &minor)) {
    return {0, 0};
  }
  return {major, minor};
}

}  // namespace

ConnectionGuard::ConnectionGuard(ConnectionLimits limits)
    : state_(std::make_shared<State>(limits)) {}
ConnectionGuard::~ConnectionGuard() = default;

absl::StatusOr<std::unique_ptr<grpc::ServerBuilderOption>> ConnectionGuard::BuilderOption() {
  if (state_->limits.max_pending == 0 && state_->limits.max_pending_per_address == 0) {
    return std::unique_ptr<grpc::ServerBuilderOption>();
  }
  const auto [major, minor] = RuntimeVersion();
  if (major != 1 || minor < 36) {
    return absl::FailedPreconditionError(
        absl::StrCat("gRPC ", grpc::Version(),
                     ": the connection caps know the socket mutator of gRPC 1.36 to 1.x only"));
  }
  return std::unique_ptr<grpc::ServerBuilderOption>(new GuardOption(state_));
}

void ConnectionGuard::Authenticated(const grpc::ServerContextBase& context) {
  if (state_->count.load(std::memory_order_relaxed) == 0) return;
  state_->Authenticated(context.peer());
}
void ConnectionGuard::Authenticated(const std::string& peer) { state_->Authenticated(peer); }

ConnectionGuard::Counts ConnectionGuard::counts() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return Counts{state_->accepted, state_->refused, state_->evicted, state_->pending.size()};
}

const ConnectionLimits& ConnectionGuard::limits() const { return state_->limits; }

std::string FitToDescriptorLimit(ConnectionLimits* limits) {
  rlimit r{};
  if (getrlimit(RLIMIT_NOFILE, &r) != 0) return "";
  std::string note;
  if (r.rlim_cur < r.rlim_max) {
    const rlim_t before = r.rlim_cur;
    r.rlim_cur = r.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &r) != 0) {
      r.rlim_cur = before;
      note = absl::StrCat("cannot raise the open-files limit from ", before, " to ", r.rlim_max,
                          ": ", std::strerror(errno), "; ");
    }
  }
  if (r.rlim_cur == RLIM_INFINITY) return note;
  const int half = static_cast<int>(std::min<rlim_t>(r.rlim_cur / 2, 1 << 30));
  bool lowered = false;
  for (int* cap : {&limits->max_pending, &limits->max_pending_per_address}) {
    if (*cap > half) {
      *cap = std::max(1, half);
      lowered = true;
    }
  }
  if (lowered) {
    absl::StrAppend(&note, "the open-files limit is ", r.rlim_cur,
                    ": pending connections capped at ", limits->max_pending, " in total and ",
                    limits->max_pending_per_address,
                    " per address (half the limit; raise it with ulimit -n)");
  }
  if (!note.empty() && !lowered) note.resize(note.size() - 2);  // the trailing "; "
  return note;
}

std::string ResolveGrpcMemory(ConnectionLimits* limits, int64_t in_flight_bytes) {
  std::string how;
  if (limits->grpc_memory_mib == ConnectionLimits::kAutoGrpcMemory) {
    const int64_t mib = 64 + (std::max<int64_t>(in_flight_bytes, 0) + (1 << 20) - 1) / (1 << 20);
    limits->grpc_memory_mib = static_cast<int>(std::min<int64_t>(mib, 1 << 20));
    how = " (auto: 64 MiB + what peers may have in flight)";
  }
  const std::string streams =
      limits->max_streams_per_connection > 0
          ? absl::StrCat(limits->max_streams_per_connection, " streams per connection")
          : "no cap on streams per connection";
  if (limits->grpc_memory_mib <= 0) return absl::StrCat("no gRPC memory quota, ", streams);
  return absl::StrCat("gRPC memory quota ", limits->grpc_memory_mib, " MiB", how, ", ", streams);
}

}  // namespace splitq::server

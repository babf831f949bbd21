// splitq server: a cap on connections that have not yet carried an authenticated call
// ("pending" connections), per peer address and in total, for the coordinator's and the
// workers' gRPC servers (issue 19: 500 silent TCP connections held 500 file descriptors).
//
// gRPC (Debian's 1.51) has no such setting. The guard sits at the one place gRPC lets a server
// see each accepted socket before its handshake: a socket mutator (the channel argument
// GRPC_ARG_SOCKET_MUTATOR), called on gRPC's poller thread right after accept(). There it
// counts the connection as pending under its peer address; when a cap is reached it shuts the
// socket down (shutdown(2), both ways), and gRPC's handshake then ends at once on the closed
// socket and frees it. (Returning false from the mutator would make gRPC 1.51 stop listening
// on the port, so the guard never does.)
//
// A connection stops counting as pending when a call on it was authenticated (a valid bearer
// token; with tokens off, any call): the services call Authenticated with the call's peer, which
// names the connection (address and port). A pending connection that closes (its handshake
// timed out after ServingOptions::handshake_timeout_ms, or the peer went away) is noticed when
// the guard next looks: an entry whose file descriptor no longer holds the same socket (fstat's
// inode) is dropped. The guard looks when a cap would refuse a connection, at most every
// kPruneEvery (so a flood costs one scan per interval, not one per connection), and at an
// accept at least every kPruneIdle. A connection still pending after ConnectionLimits::evict_after
// (a peer that finished the TLS and HTTP/2 handshakes, which gRPC's handshake timeout does not end,
// and then idles without a call) is shut down at that look, so idle peers cannot hold the caps for
// good: a flood must keep opening connections to keep them full. (Between the inode check and
// the shutdown, gRPC could close the descriptor and a new accept reuse its number: a window of
// microseconds, in which that new connection would be closed and its client retry.)
//
// What it does not cover: connections that authenticated once and stay open (they hold a
// token), and the kernel's accept queue (the listen backlog) before gRPC accepts.
//
// The socket mutator's layout is gRPC's internal struct of 1.36 and later (checked against
// 1.51, Debian 12); Install refuses other major versions (FAILED_PRECONDITION) rather than
// guess.
#pragma once

#include <grpcpp/impl/server_builder_option.h>
#include <grpcpp/server_context.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace splitq::server {

struct ConnectionLimits {
  int max_pending = 1024;            // pending connections in total (0: no cap)
  int max_pending_per_address = 64;  // pending connections from one peer address (0: no cap)
  // A connection pending this long is shut down at the guard's next look.
  std::chrono::milliseconds evict_after{30000};
  // Applied by StartServing, not by the guard: gRPC's cap on concurrent streams per connection
  // (HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS; 0: gRPC's default, no cap) and a memory quota
  // for gRPC's own buffers (ResourceQuota, in MiB; 0: none; kAutoGrpcMemory: derived by the
  // process, ResolveGrpcMemory). Under the quota's pressure gRPC shrinks its flow-control
  // windows and, at the limit, cancels streams (RST_STREAM with ENHANCE_YOUR_CALM: the peer sees
  // RESOURCE_EXHAUSTED), legitimate ones included, to free memory. Off by default: the third
  // outside probe found that it cancelled training clients' streams under a flood while the
  // RSS still rose far above it (docs/cluster.md, Limits).
  static constexpr int kAutoGrpcMemory = -1;
  int max_streams_per_connection = 100;
  int grpc_memory_mib = 0;
};

// Resolves a grpc_memory_mib of kAutoGrpcMemory to 64 MiB plus `in_flight_bytes` (what
// legitimate peers may have in gRPC's buffers at once: a worker's clients x 2 streams x its
// largest message; the coordinator's calls are small), rounded up to MiB. Returns a line for the
// log naming the quota and the stream cap.
std::string ResolveGrpcMemory(ConnectionLimits* limits, int64_t in_flight_bytes);

// Raises this process's soft limit on open files to its hard limit, then lowers the caps in
// `limits` to half of the soft limit where they are above it: pending connections must not take
// the descriptors that authenticated peers, checkpoints and the listening socket need. (gRPC
// 1.51 stops accepting for good once an accept fails with EMFILE: grpc/grpc#16058, so a flood
// that reaches the descriptor limit would end the server's service.) Returns a line for the log
// when it changed the caps or could not raise the limit, "" otherwise.
std::string FitToDescriptorLimit(ConnectionLimits* limits);

class ConnectionGuard {
 public:
  static constexpr std::chrono::milliseconds kPruneEvery{50};  // at most, while at a cap
  static constexpr std::chrono::seconds kPruneIdle{10};        // at least, at any accept

  struct Counts {
    uint64_t accepted = 0;  // connections gRPC accepted while the guard was installed
    uint64_t refused = 0;   // ... of which shut down at once (a cap was reached)
    // ... shut down after ConnectionLimits::evict_after without an authenticated call
    uint64_t evicted = 0;
    uint64_t pending = 0;  // entries now (closed ones are dropped at the next look)
  };

  explicit ConnectionGuard(ConnectionLimits limits);
  ~ConnectionGuard();
  ConnectionGuard(const ConnectionGuard&) = delete;
  ConnectionGuard& operator=(const ConnectionGuard&) = delete;

  // The ServerBuilder option that installs the guard on a server (ServerBuilder::SetOption);
  // null when both caps are 0 (nothing to guard). FAILED_PRECONDITION when the gRPC library at
  // run time is not one whose socket mutator layout the guard knows (StartServing then fails:
  // run with both caps 0 to serve without the guard). The guard's state lives as long as the
  // server holds the option's arguments, even past the guard.
  absl::StatusOr<std::unique_ptr<grpc::ServerBuilderOption>> BuilderOption();

  // A call on `context`'s connection was authenticated: it no longer counts as pending. Cheap
  // when nothing is pending (one atomic load).
  void Authenticated(const grpc::ServerContextBase& context);
  // The same, by gRPC's peer string ("ipv4:A:P", "ipv6:[A]:P").
  void Authenticated(const std::string& peer);

  Counts counts() const;
  const ConnectionLimits& limits() const;

  struct State;

 private:
  std::shared_ptr<State> state_;
};

}  // namespace splitq::server

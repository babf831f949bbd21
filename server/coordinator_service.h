// splitq server: the gRPC Coordinator service (proto/splitq/v1/coordinator.proto), callback
// API. It only adapts CoordinatorCore (coordinator_core.h): it checks the caller's bearer
// token, converts messages, and maps statuses one to one. Every call is answered inline (the
// core is fast and never blocks on the network), so no call holds a thread.
// A background thread calls CoordinatorCore::Expire every heartbeat period, and returns freed
// memory to the system (base::MemoryTrimmer: at most every 30 s, when the RSS is 32 MiB over its
// low mark, and at least every 5 minutes; a closed connection leaves ~16 KB behind otherwise,
// `splitq bench coordinator`, connections phase).
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "base/metrics.h"
#include "server/connection_guard.h"
#include "server/coordinator_core.h"
#include "server/keyed_slots.h"
#include "server/tokens.h"
#include "splitq/v1/coordinator.grpc.pb.h"

namespace splitq::server {

// Every method is served in raw form (ByteBuffer): the service parses each request itself, so
// that a body that is not the method's message is INVALID_ARGUMENT with a message (gRPC's
// generated handler answered such a body with an empty UNIMPLEMENTED).
//
// And every method is registered as a bidirectional stream, although callers make unary calls
// (the same HTTP/2 exchange: one message each way): gRPC then hands the call to the service as
// soon as its headers arrive, and the bearer token is checked before any of the request is
// read. Registered as unary, gRPC 1.51 reads the whole request message (up to its 4 MiB limit)
// before the service sees the call, so a peer without a token made the coordinator hold that
// much per stream it opened (issue 19's third outside probe: 8 connections x 100 streams of
// unfinished 4 MiB requests, RSS 169 -> 1183 MiB).
//
// A caller WITH a token could still open streams and leave their requests unfinished; gRPC
// holds what arrived of each (up to 4 MiB). So at most kMaxReadingPerToken calls of one token
// may be waiting for their request at once; more are UNAVAILABLE at their headers (retried with
// backoff by the members' clients). A
// legitimate worker or client has one or two calls in flight, each read in microseconds.
// Members that share one token share its places. gRPC 1.51 lets a read request in as far as its
// 5-byte prefix announces (its 4 MiB limit is checked once the message is whole), so such a
// call may hold more than 4 MiB (docs/cluster.md, Limits); a call whose request has not
// arrived whole read_deadline_ms (default kReadDeadlineMs) after its headers is cancelled
// (the caller sees CANCELLED), so it holds its place and its bytes that long at most.
//
// Each call: the bearer token first (UNAUTHENTICATED), then its place (UNAVAILABLE),
// then the body (INVALID_ARGUMENT when it does not parse as the method's request, or when the
// caller sends none), then the method.
class CoordinatorService final : public grpc::Service {
 public:
  static constexpr int kMaxReadingPerToken = 16;
  // A request is a few hundred bytes (a Status reply is large, not its request); 10 s leaves
  // room for a slow link.
  static constexpr int kReadDeadlineMs = 10000;

  // `tokens`: every caller must present one of them (null: no token check, for tests and
  // trusted networks). `config_yaml`: the run config sent to each registrant.
  // `guard` (may be null) hears of every authenticated call (connection_guard.h).
  // `metrics` (may be null; base/metrics.h) counts the calls served, by method and status code
  // (splitq_coordinator_calls_total; calls refused at their headers are not counted).
  CoordinatorService(CoordinatorCore& core, const TokenSet* tokens, std::string config_yaml,
                     ConnectionGuard* guard = nullptr, base::Registry* metrics = nullptr);
  ~CoordinatorService() override;

  // Tests: the read deadline of calls that start after this (milliseconds, > 0).
  void set_read_deadline_ms(int ms) { read_deadline_ms_ = ms; }

 private:
  class Call;  // one call: token, then request, then reply (coordinator_service.cc)

  // Registers `name` (e.g. "/splitq.v1.Coordinator/Register") as described above: each call
  // checks the token, parses one `Request` and answers `handler`'s reply or status.
  template <class Request, class Reply>
  void AddCall(const char* name,
               absl::Status (CoordinatorService::*handler)(const Bearer&, const Request&, Reply*));
  absl::Status DoRegister(const Bearer& caller, const splitq::v1::RegisterRequest& request,
                          splitq::v1::RegisterReply* reply);
  absl::Status DoAssign(const Bearer& caller, const splitq::v1::AssignRequest& request,
                        splitq::v1::AssignReply* reply);
  absl::Status DoHeartbeat(const Bearer& caller, const splitq::v1::HeartbeatRequest& request,
                           splitq::v1::HeartbeatReply* reply);
  absl::Status DoStatus(const Bearer& caller, const splitq::v1::StatusRequest& request,
                        splitq::v1::StatusReply* reply);
  absl::Status DoLeave(const Bearer& caller, const splitq::v1::LeaveRequest& request,
                       splitq::v1::LeaveReply* reply);
  absl::Status DoGroup(const Bearer& caller, const splitq::v1::GroupRequest& request,
                       splitq::v1::GroupReply* reply);

  CoordinatorCore& core_;
  const TokenSet* tokens_;
  std::string config_yaml_;
  ConnectionGuard* guard_;
  base::Registry* metrics_;
  KeyedSlots reading_{kMaxReadingPerToken};  // calls waiting for their request, per token id
  std::atomic<int> read_deadline_ms_{kReadDeadlineMs};
  std::vector<std::shared_ptr<
      const std::function<absl::Status(const Bearer&, grpc::ByteBuffer*, grpc::ByteBuffer*)>>>
      serves_;  // each method's parse-and-serve, by method index
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::thread expiry_;
};

}  // namespace splitq::server

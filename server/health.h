// splitq server: the standard gRPC health-checking protocol (grpc.health.v1), served by the
// coordinator and the workers (HealthService) and asked by `splitq health HOST:PORT`
// (CheckHealth), so docker compose and orchestrators can probe them.
#pragma once

#include <grpcpp/impl/service_type.h>

#include <set>
#include <string>

#include "absl/status/statusor.h"
#include "proto/rpc_channel.h"
#include "server/keyed_slots.h"

namespace splitq::server {

// Asks `target` (HOST:PORT) about `service` ("" for the whole server) within timeout_ms.
// Returns the serving status by name: "SERVING", "NOT_SERVING" or "UNKNOWN". Errors, one to
// one from gRPC: UNAVAILABLE (nothing listening, or a TLS/plaintext mismatch),
// DEADLINE_EXCEEDED, NOT_FOUND (the server does not know `service`), INVALID_ARGUMENT (bad
// security options). `unread` (optional) is set when the server answered without reading the
// request (HealthService under a flood of unfinished Checks: the status is the whole server's,
// whatever `service` was).
absl::StatusOr<std::string> CheckHealth(const std::string& target,
                                        const rpc::TransportSecurity& security,
                                        const std::string& service = "", int timeout_ms = 2000,
                                        bool* unread = nullptr);

// grpc.health.v1.Health/Check without a token (probes have none): SERVING for "" (the whole
// server) and the names given, NOT_FOUND for other names. Watch is not served (UNIMPLEMENTED).
//
// It replaces gRPC's built-in health service, which is unary: gRPC reads a unary request whole
// (up to the 4 MiB message limit) before any handler runs, and a peer that sent all but the
// last byte of many such requests held ~3 GB of a worker (issue 19's third outside probe).
// Check is registered as a stream instead, so the call reaches the service at its headers,
// and at most kMaxReading requests are read at once, kMaxReadingPerPeer from one peer address:
// unfinished Check requests hold at most kMaxReading x the server's message limit. A Check
// that finds no place is answered at its headers for the whole server (SERVING), its request
// never read, with the trailing metadata kUnreadKey = "1": under a flood of unfinished Checks
// a probe still gets an answer, but one for a service name it asked about is the whole
// server's (an unknown name gets SERVING instead of NOT_FOUND). A probe's Check is a few bytes
// read at once, so the caps only matter under such a flood.
//
// A Check whose request has not arrived whole `read_deadline_ms` after its headers is
// cancelled (the peer sees CANCELLED), so an unfinished request holds its place and its bytes
// for that long at most.
class HealthService final : public grpc::Service {
 public:
  static constexpr int kMaxReading = 16;
  static constexpr int kMaxReadingPerPeer = 4;
  static constexpr int kReadDeadlineMs = 2000;  // a probe's request is a few bytes, sent at once
  static constexpr const char* kUnreadKey = "splitq-health-unread";
  explicit HealthService(std::set<std::string> serving, int read_deadline_ms = kReadDeadlineMs);

 private:
  class Check;
  const std::set<std::string> serving_;
  const int read_deadline_ms_;
  KeyedSlots reading_{kMaxReadingPerPeer, kMaxReading};  // by peer address
};

}  // namespace splitq::server

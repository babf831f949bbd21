// splitq server: the standard gRPC health-checking protocol (grpc.health.v1), served by the
// coordinator and the workers (HealthService) and asked by `splitq health HOST:PORT`
// (CheckHealth), so docker compose and orchestrators can probe them.
#pragma once

#include <grpcpp/impl/service_type.h>

#include <string>

#include "absl/status/statusor.h"
#include "proto/rpc_channel.h"

namespace splitq::server {

// Asks `target` (HOST:PORT) about `service` ("" for the whole server) within timeout_ms.
// Returns the serving status by name: "SERVING", "NOT_SERVING" or "UNKNOWN". Errors, one to
// one from gRPC: UNAVAILABLE (nothing listening, or a TLS/plaintext mismatch),
// DEADLINE_EXCEEDED, NOT_FOUND (the server does not know `service`; splitq's servers answer
// for the whole server whatever the name: HealthService), INVALID_ARGUMENT (bad security
// options).
absl::StatusOr<std::string> CheckHealth(const std::string& target,
                                        const rpc::TransportSecurity& security,
                                        const std::string& service = "", int timeout_ms = 2000);

// grpc.health.v1.Health/Check without a token (probes have none): SERVING, answered when the
// call's headers arrive, for the whole server. The request (which names a service) is never
// read, so every name gets SERVING, an unknown one too (the protocol would say NOT_FOUND); the
// service names a splitq server has are all serving while it answers. Watch is not served
// (UNIMPLEMENTED).
//
// Why never read: gRPC 1.51 lets a message in as long as its 5-byte prefix announces (the 4
// MiB limit is checked once the message has arrived whole), so every request a server reads
// may hold up to what its sender can push. gRPC's built-in health service (unary) read whole
// requests: ~3 GB of a worker held by unfinished 4 MiB Checks (issue 19's third outside
// probe). A stream-registered Check that read at most 16 requests at once, cancelled 2 s after
// its headers, still held +235-327 MiB under 16 streams announcing 256 MiB each (the fifth
// probe). Unread, a Check stream holds at most its first flow-control window (64 KiB) until
// the answer ends it. `rpc_test` UnreadHealthChecksHoldNothing.
class HealthService final : public grpc::Service {
 public:
  HealthService();

 private:
  class Check;
};

}  // namespace splitq::server

// splitq server: a client of the standard gRPC health-checking protocol (grpc.health.v1;
// `splitq health HOST:PORT`). Our coordinator and workers serve it through gRPC's built-in
// health service, so docker compose and orchestrators can probe them.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "proto/rpc_channel.h"

namespace splitq::server {

// Asks `target` (HOST:PORT) about `service` ("" for the whole server) within timeout_ms.
// Returns the serving status by name: "SERVING", "NOT_SERVING" or "UNKNOWN". Errors, one to
// one from gRPC: UNAVAILABLE (nothing listening, or a TLS/plaintext mismatch),
// DEADLINE_EXCEEDED, NOT_FOUND (the server does not know `service`), INVALID_ARGUMENT (bad
// security options).
absl::StatusOr<std::string> CheckHealth(const std::string& target,
                                        const rpc::TransportSecurity& security,
                                        const std::string& service = "", int timeout_ms = 2000);

}  // namespace splitq::server

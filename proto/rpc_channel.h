// splitq server: transport security and status mapping shared by every gRPC edge.
//
// TLS comes from a directory of certificates as `splitq certs --out DIR` writes it (ca.crt,
// server.crt/.key, client.crt/.key). Plaintext is only used when asked for explicitly
// (`--insecure`): a process given neither refuses to start.
// Status codes cross the gRPC edge one to one (INVALID_ARGUMENT stays INVALID_ARGUMENT;
// never UNKNOWN for a known code).
#pragma once

#include <grpcpp/client_context.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/support/status.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace splitq::rpc {

struct TransportSecurity {
  std::string tls_dir;  // a folder made by `splitq certs`; empty with `insecure`
  bool insecure = false;
  // Servers: require and verify client certificates. Clients: present client.crt/.key.
  bool mutual_tls = false;
};

// INVALID_ARGUMENT unless exactly one of tls_dir and insecure is given, or for mutual_tls with
// insecure.
absl::Status ValidateSecurity(const TransportSecurity& security);

// Credentials for a channel to a server. NOT_FOUND names a missing certificate file.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TransportSecurity& security);
// Credentials for a listening port.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TransportSecurity& security);

// Sends `token` as "authorization: Bearer <token>" call metadata (common.proto).
void AddBearer(grpc::ClientContext& context, const std::string& token);

absl::Status FromGrpcStatus(const grpc::Status& status);
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace splitq::rpc

// splitq server: what the coordinator and worker processes share: their gRPC server (one
// builder with splitq's settings) and the ready file that tells scripts they serve.
#pragma once

#include <grpcpp/server.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/rpc_channel.h"
#include "server/connection_guard.h"
#include "server/health.h"

namespace splitq::server {

struct ServingOptions {
  std::string listen;  // HOST:PORT (port 0: the OS picks)
  rpc::TransportSecurity security;
  int max_receive_message_bytes = -1;  // -1: gRPC's default (4 MiB)
  // Server keepalive: a client that vanished without closing its connection is noticed within
  // ~20 s; clients may ping every 5 s (client/worker_client.h pings every 10 s).
  bool keepalive = false;
  // A connection that has not finished its TLS (or HTTP/2) handshake by then is closed, so
  // silent connections cost a file descriptor for seconds, not gRPC's default 120 s.
  int handshake_timeout_ms = 10000;
  // Caps on connections that have not carried an authenticated call (connection_guard.h; the
  // services tell the guard). Null: no caps.
  ConnectionGuard* guard = nullptr;
};

struct Serving {
  std::unique_ptr<HealthService> health;  // before the server: it outlives it
  std::unique_ptr<grpc::Server> server;
  int port = 0;  // the port bound
};

// Starts a gRPC server for `services` with the standard health service (health.h's
// HealthService, not gRPC's built-in one). No SO_REUSEPORT (gRPC's default would let
// a second process listen on our port). UNAVAILABLE naming the address when it cannot listen;
// INVALID_ARGUMENT / NOT_FOUND for bad security flags or missing certificate files;
// FAILED_PRECONDITION when options.guard cannot be installed (connection_guard.h).
absl::StatusOr<Serving> StartServing(const ServingOptions& options,
                                     const std::vector<grpc::Service*>& services);

// --ready-file PATH of the servers: once a server listens, the address its peers dial,
// "HOST:PORT\n" (the coordinator: --listen's host with the port bound; a worker: the address it
// advertises), written atomically, so that a script or `splitq demo` waits for the file instead
// of reading log text. The file is removed when the object goes (the server stops), so it
// exists exactly while the server serves. An empty path writes nothing.
class ReadyFile {
 public:
  explicit ReadyFile(std::string path) : path_(std::move(path)) {}
  ReadyFile(const ReadyFile&) = delete;
  ReadyFile& operator=(const ReadyFile&) = delete;
  ~ReadyFile();
  // INTERNAL naming the file when it cannot be written.
  absl::Status Announce(const std::string& address);

 private:
  std::string path_;
  bool written_ = false;
};

}  // namespace splitq::server

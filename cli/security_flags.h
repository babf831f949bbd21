// splitq CLI: the transport-security flags every networked subcommand takes (proto/rpc_channel.h):
// --tls-dir DIR (certificates from `splitq certs`), --insecure (explicit plaintext), --mtls; and
// the servers' caps on unauthenticated connections (server/connection_guard.h).
#pragma once

#include <CLI/CLI.hpp>

#include "proto/rpc_channel.h"
#include "server/connection_guard.h"

namespace splitq::cli {

// `serving`: the command listens (--mtls requires client certificates) rather than dials
// (--mtls presents client.crt).
inline void AddSecurityFlags(CLI::App* cmd, rpc::TransportSecurity* security, bool serving) {
  cmd->add_option("--tls-dir", security->tls_dir, "Certificates from `splitq certs`");
  cmd->add_flag("--insecure", security->insecure, "Plaintext (no TLS)");
  cmd->add_flag("--mtls", security->mutual_tls,
                serving ? "Require client certificates" : "Present client.crt (mutual TLS)");
}

// --max-pending-connections N, --max-pending-per-address N (0: no cap).
inline void AddConnectionLimitFlags(CLI::App* cmd, server::ConnectionLimits* limits) {
  cmd->add_option("--max-pending-connections", limits->max_pending,
                  "Connections that have not yet carried an authenticated call, at most, in "
                  "total (more are closed at once; 0: no cap; default 1024)")
      ->check(CLI::Range(0, 1 << 20));
  cmd->add_option("--max-pending-per-address", limits->max_pending_per_address,
                  "... and from one peer address (0: no cap; default 64)")
      ->check(CLI::Range(0, 1 << 20));
  cmd->add_option("--max-streams-per-connection", limits->max_streams_per_connection,
                  "Concurrent calls on one connection, at most (default 100; 0: no cap)")
      ->check(CLI::Range(0, 1 << 20));
  cmd->add_option("--grpc-memory-mib", limits->grpc_memory_mib,
                  "A memory quota for gRPC's buffers, MiB (default 0: none; -1: auto, 64 MiB plus "
                  "what the peers may have in flight); under it gRPC shrinks its windows and at "
                  "the limit cancels calls, legitimate ones included (docs/cluster.md)")
      ->check(CLI::Range(-1, 1 << 20));
}

// --metrics-listen HOST:PORT (server/metrics_server.h).
inline void AddMetricsListen(CLI::App& cmd, std::string* listen) {
  cmd.add_option("--metrics-listen", *listen,
                 "Serve Prometheus metrics at http://HOST:PORT/metrics (plain HTTP, no token: "
                 "bind it where only your monitoring reaches; port 0: pick a free one)");
}

}  // namespace splitq::cli

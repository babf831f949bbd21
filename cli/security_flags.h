// splitq CLI: the transport-security flags every networked subcommand takes (proto/rpc_channel.h):
// --tls-dir DIR (certificates from `splitq certs`), --insecure (explicit plaintext), --mtls.
#pragma once

#include <CLI/CLI.hpp>

#include "proto/rpc_channel.h"

namespace splitq::cli {

// `serving`: the command listens (--mtls requires client certificates) rather than dials
// (--mtls presents client.crt).
inline void AddSecurityFlags(CLI::App* cmd, rpc::TransportSecurity* security, bool serving) {
  cmd->add_option("--tls-dir", security->tls_dir, "Certificates from `splitq certs`");
  cmd->add_flag("--insecure", security->insecure, "Plaintext (no TLS)");
  cmd->add_flag("--mtls", security->mutual_tls,
                serving ? "Require client certificates" : "Present client.crt (mutual TLS)");
}

}  // namespace splitq::cli

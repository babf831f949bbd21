// splitq CLI: the health probe's flags and run, shared by `splitq health` and the small
// `splitq-health` binary (cli/health_probe_main.cc). This header and what it includes stay free
// of libtorch, so that splitq-health starts in milliseconds (a compose healthcheck every few
// seconds; `splitq health` loads libtorch first: ~0.4 s of CPU per probe).
#pragma once

#include <CLI/CLI.hpp>
#include <cstdio>
#include <string>

#include "cli/int_range.h"
#include "cli/security_flags.h"
#include "proto/protocol.h"
#include "server/health.h"

namespace splitq::cli {

struct HealthOptions {
  std::string target, service;
  rpc::TransportSecurity security;
  int timeout_ms = 2000;
};

inline void AddHealthOptions(CLI::App* cmd, HealthOptions* opt) {
  cmd->add_option("target", opt->target, "HOST:PORT")->required();
  AddSecurityFlags(cmd, &opt->security, /*serving=*/false);
  cmd->add_option(
      "--service", opt->service,
      "Service name: splitq.v1.Coordinator or splitq.v1.Worker (default: the whole server; "
      "splitq's servers answer for the whole server whatever the name)");
  cmd->add_option("--timeout-ms", opt->timeout_ms, "Deadline in milliseconds")
      ->check(IntRange(1, 1 << 30));
}

// Prints the status; 0 when SERVING, 1 otherwise, 2 for a bad target.
inline int RunHealth(const HealthOptions& opt) {
  if (auto address = rpc::ParseHostPort(opt.target); !address.ok() || address->port == 0) {
    std::fprintf(stderr, "health: '%s': expected HOST:PORT with a port of 1..65535\n",
                 opt.target.c_str());
    return 2;
  }
  auto status = server::CheckHealth(opt.target, opt.security, opt.service, opt.timeout_ms);
  if (!status.ok()) {
    std::fprintf(stderr, "health %s: %s\n", opt.target.c_str(), status.status().ToString().c_str());
    return 1;
  }
  std::printf("%s\n", status->c_str());
  return *status == "SERVING" ? 0 : 1;
}

}  // namespace splitq::cli

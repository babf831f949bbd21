// `splitq health HOST:PORT (--tls-dir DIR | --insecure) [--mtls] [--service S]
// [--timeout-ms N]`: the standard gRPC health check (server/health.h). Prints the status;
// exits 0 when SERVING, 1 otherwise (usable as a docker compose healthcheck).
#include <cstdio>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "cli/net_common.h"
#include "cli/security_flags.h"
#include "server/health.h"

namespace splitq::cli {

void RegisterHealth(CLI::App& app, RunFn* run) {
  struct Options {
    std::string target, service;
    rpc::TransportSecurity security;
    int timeout_ms = 2000;
  };
  auto opt = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("health", "Ask a splitq server for its gRPC health");
  cmd->add_option("target", opt->target, "HOST:PORT")->required();
  AddSecurityFlags(cmd, &opt->security, /*serving=*/false);
  cmd->add_option(
      "--service", opt->service,
      "Service name: splitq.v1.Coordinator or splitq.v1.Worker (default: the whole server)");
  cmd->add_option("--timeout-ms", opt->timeout_ms, "Deadline in milliseconds")
      ->check(IntRange(1, 1 << 30));
  cmd->callback([opt, run] {
    *run = [opt] {
      if (auto address = ParseHostPort(opt->target); !address.ok() || address->port == 0) {
        std::fprintf(stderr, "health: '%s': expected HOST:PORT with a port of 1..65535\n",
                     opt->target.c_str());
        return 2;
      }
      auto status = server::CheckHealth(opt->target, opt->security, opt->service, opt->timeout_ms);
      if (!status.ok()) {
        std::fprintf(stderr, "health %s: %s\n", opt->target.c_str(),
                     status.status().ToString().c_str());
        return 1;
      }
      std::printf("%s\n", status->c_str());
      return *status == "SERVING" ? 0 : 1;
    };
  });
}

}  // namespace splitq::cli

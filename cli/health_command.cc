// `splitq health HOST:PORT (--tls-dir DIR | --insecure) [--mtls] [--service S]
// [--timeout-ms N]`: the standard gRPC health check (server/health.h). Prints the status;
// exits 0 when SERVING, 1 otherwise. `splitq-health` (cli/health_probe_main.cc) is the same
// without libtorch, for compose healthchecks.
#include <memory>

#include "cli/commands.h"
#include "cli/health_flags.h"

namespace splitq::cli {

void RegisterHealth(CLI::App& app, RunFn* run) {
  auto opt = std::make_shared<HealthOptions>();
  CLI::App* cmd = app.add_subcommand("health", "Ask a splitq server for its gRPC health");
  AddHealthOptions(cmd, opt.get());
  cmd->callback([opt, run] { *run = [opt] { return RunHealth(*opt); }; });
}

}  // namespace splitq::cli

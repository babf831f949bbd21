// `splitq tokens --out DIR [--keep | --force] [--worker NAME]... ID...`: a bearer token per
// client ID and per worker NAME, with its role (server/tokens.h): DIR/tokens for the
// coordinator and workers, DIR/ID.token for each, all mode 0600.
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "server/tokens.h"

namespace splitq::cli {

void RegisterTokens(CLI::App& app, RunFn* run) {
  struct Options {
    std::string out;
    std::vector<std::string> ids, workers;
    bool keep = false, force = false;
  };
  auto opt = std::make_shared<Options>();
  CLI::App* cmd =
      app.add_subcommand("tokens", "Make a bearer token for each client id and worker name");
  cmd->add_option("--out", opt->out, "Output folder")->required();
  cmd->add_option("ids", opt->ids, "Client ids (1..64 of [A-Za-z0-9._-], not . or ..)");
  cmd->add_option("--worker", opt->workers,
                  "A worker's name: its token may register a worker, not a client (repeatable)")
      ->allow_extra_args(false);
  CLI::Option* keep =
      cmd->add_flag("--keep", opt->keep,
                    "Do nothing when --out already holds a tokens file (for init containers)");
  cmd->add_flag("--force", opt->force,
                "Replace the tokens file in --out (ids not named lose their tokens)")
      ->excludes(keep);
  cmd->callback([opt, run] {
    *run = [opt] {
      if (opt->ids.empty() && opt->workers.empty()) {
        std::fprintf(stderr, "tokens: name at least one client id or --worker\n");
        return 2;
      }
      const bool exists = std::filesystem::exists(std::filesystem::path(opt->out) / "tokens");
      if (opt->keep && exists) {
        std::printf("kept the tokens in %s\n", opt->out.c_str());
        return 0;
      }
      if (exists && !opt->force) {
        std::fprintf(stderr,
                     "tokens: %s already holds a tokens file: --keep to leave it, or --force to "
                     "replace it with tokens for exactly the ids given (the others stop "
                     "working)\n",
                     opt->out.c_str());
        return 2;
      }
      const absl::Status status = server::WriteTokens(opt->out, opt->ids, opt->workers);
      if (!status.ok()) {
        std::fprintf(stderr, "tokens: %s\n", std::string(status.message()).c_str());
        return 1;
      }
      std::printf("wrote %s/tokens, %zu client and %zu worker token files (mode 0600)\n",
                  opt->out.c_str(), opt->ids.size(), opt->workers.size());
      return 0;
    };
  });
}

}  // namespace splitq::cli

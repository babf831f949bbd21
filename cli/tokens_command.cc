// `splitq tokens --out DIR [--keep | --force] [--worker NAME]... [--export ID=DIR]... ID...`: a
// bearer token per client ID and per worker NAME, with its role (server/tokens.h): DIR/tokens
// for the coordinator and workers, DIR/ID.token for each, all mode 0600; --export copies one
// member's ID.token alone into a folder of its own (docker-compose.yml gives each client only
// its folder).
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "base/files.h"
#include "cli/commands.h"
#include "server/tokens.h"

namespace splitq::cli {

void RegisterTokens(CLI::App& app, RunFn* run) {
  struct Options {
    std::string out;
    std::vector<std::string> ids, workers, exports;
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
  cmd->add_option("--export", opt->exports,
                  "ID=DIR: also copy ID.token alone into DIR (repeatable; run after run)")
      ->allow_extra_args(false);
  cmd->callback([opt, run] {
    *run = [opt] {
      if (opt->ids.empty() && opt->workers.empty()) {
        std::fprintf(stderr, "tokens: name at least one client id or --worker\n");
        return 2;
      }
      // Each --export names a member given here and a folder (checked before anything is
      // written).
      std::vector<std::pair<std::string, std::string>> exports;  // id, folder
      for (const std::string& e : opt->exports) {
        const size_t eq = e.find('=');
        const std::string id = e.substr(0, eq);
        const bool known =
            std::find(opt->ids.begin(), opt->ids.end(), id) != opt->ids.end() ||
            std::find(opt->workers.begin(), opt->workers.end(), id) != opt->workers.end();
        if (eq == std::string::npos || eq + 1 == e.size() || !known) {
          std::fprintf(stderr,
                       "tokens: --export '%s': expected ID=DIR with ID a client id or --worker "
                       "name given here\n",
                       e.c_str());
          return 2;
        }
        exports.emplace_back(id, e.substr(eq + 1));
      }
      // Each exported token, copied again on every run (a new volume gets it too).
      const auto exported = [&opt, &exports]() -> int {
        for (const auto& [id, dir] : exports) {
          const absl::Status status = base::CopyFilesInto(opt->out, {id + ".token"}, dir, 0600);
          if (!status.ok()) {
            std::fprintf(stderr, "tokens: %s\n", std::string(status.message()).c_str());
            return 1;
          }
          std::printf("copied %s.token to %s\n", id.c_str(), dir.c_str());
        }
        return 0;
      };
      const bool exists = std::filesystem::exists(std::filesystem::path(opt->out) / "tokens");
      if (opt->keep && exists) {
        std::printf("kept the tokens in %s\n", opt->out.c_str());
        return exported();
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
      return exported();
    };
  });
}

}  // namespace splitq::cli

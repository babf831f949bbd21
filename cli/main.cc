// splitq: one binary, one subcommand per job. `splitq --help` lists them.
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <cstdio>

#include "cli/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"splitq: distributed quantization-aware training and split learning"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "splitq 0.1.0");

  splitq::cli::RunFn run;
  CLI::App* bench = app.add_subcommand("bench", "Measure splitq against the alternatives");
  bench->require_subcommand(1);
  splitq::cli::RegisterBenchKernels(*bench, &run);

  CLI11_PARSE(app, argc, argv);
  if (!run) {
    std::fprintf(stderr, "%s", app.help().c_str());
    return 2;
  }
  try {
    return run();
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return 1;
  }
}

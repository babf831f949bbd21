// `splitq report RUN_DIR... [--out FILE.html]`: one self-contained HTML page of the runs'
// metrics.jsonl, validation.jsonl and summary.json (tools/report.h).
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "tools/report.h"

namespace splitq::cli {

void RegisterReport(CLI::App& app, RunFn* run) {
  struct Options {
    std::vector<std::string> dirs;
    std::string out = "report.html";
  };
  auto opt = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "report", "One HTML page (no network, no script) of one or more runs' curves and summaries");
  cmd->add_option("runs", opt->dirs, "Run output directories (--out of train, client or demo)")
      ->required();
  cmd->add_option("--out", opt->out, "The HTML file to write (default report.html)");
  cmd->callback([opt, run] {
    *run = [opt] {
      const absl::Status status = tools::WriteReport(opt->dirs, opt->out);
      if (!status.ok()) {
        std::fprintf(stderr, "report: %s\n", std::string(status.message()).c_str());
        return 2;
      }
      std::printf("wrote %s (%zu run%s)\n", opt->out.c_str(), opt->dirs.size(),
                  opt->dirs.size() == 1 ? "" : "s");
      return 0;
    };
  });
}

}  // namespace splitq::cli

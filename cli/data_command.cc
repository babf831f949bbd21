// `splitq data export DIR`: copies the data sets from their Debian packages into DIR, for a
// host that cannot install them (point SPLITQ_DATA_DIR=DIR there; trainer/datasets.h).
#include <cstdio>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "trainer/datasets.h"

namespace splitq::cli {

void RegisterData(CLI::App& app, RunFn* run) {
  CLI::App* data = app.add_subcommand("data", "Data sets for hosts without the Debian packages");
  data->require_subcommand(1);
  auto dir = std::make_shared<std::string>();
  CLI::App* cmd = data->add_subcommand(
      "export", "Write Fashion-MNIST, GCIDE and the Bible text into DIR (for SPLITQ_DATA_DIR)");
  cmd->add_option("DIR", *dir, "Output folder")->required();
  cmd->callback([dir, run] {
    *run = [dir] {
      const absl::Status status = trainer::ExportDataSets(*dir);
      if (!status.ok()) {
        std::fprintf(stderr, "data export: %s\n", std::string(status.message()).c_str());
        return 1;
      }
      std::printf("wrote %s; use it with SPLITQ_DATA_DIR=%s\n", dir->c_str(), dir->c_str());
      return 0;
    };
  });
}

}  // namespace splitq::cli

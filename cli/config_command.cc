// `splitq config check FILE [--set key=value ...]`: parse and validate a run config, as a
// run would at start-up, and say what is wrong. `splitq config reference`: print every key
// with its type, default and meaning (docs/configuration.md is this output).
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "trainer/config.h"

namespace splitq::cli {
namespace {

struct ConfigCheckOptions {
  std::string path;
  std::vector<std::string> overrides;
};

int RunConfigCheck(const ConfigCheckOptions& opt) {
  auto config = trainer::LoadRunConfig(opt.path, opt.overrides);
  if (!config.ok()) {
    std::fprintf(stderr, "config error: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  std::printf("%s: ok (task %s, %lld steps, activations %s)\n", opt.path.c_str(),
              config->task == trainer::Task::kFashionMnist ? "fmnist" : "lm",
              static_cast<long long>(config->steps),
              config->activations.mode == trainer::WireMode::kAmaq      ? "amaq"
              : config->activations.mode == trainer::WireMode::kUniform ? "uniform"
              : config->activations.mode == trainer::WireMode::kAqSgd   ? "aqsgd"
                                                                        : "fp32");
  return 0;
}

}  // namespace

void RegisterConfig(CLI::App& app, RunFn* run) {
  CLI::App* config = app.add_subcommand("config", "Check run configs; list every config key");
  config->require_subcommand(1);
  auto opt = std::make_shared<ConfigCheckOptions>();
  CLI::App* check = config->add_subcommand("check", "Parse and validate a run config");
  check->add_option("file", opt->path, "The YAML run config")->required();
  check->add_option("--set", opt->overrides, "Override a key: key.path=value (YAML value)");
  check->callback([opt, run] { *run = [opt] { return RunConfigCheck(*opt); }; });
  CLI::App* reference = config->add_subcommand("reference", "Print every key as a Markdown table");
  reference->callback([run] {
    *run = [] {
      std::printf("%s", trainer::ConfigReference().c_str());
      return 0;
    };
  });
}

}  // namespace splitq::cli

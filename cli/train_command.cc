// `splitq train --config F [--set key=value ...] [--out DIR]`: client and server in one
// process with the wire codec in the loop (trainer/train_loop.h). Progress goes to stderr (one
// updating line on a terminal); the summary to stdout and DIR/summary.json. Ctrl-C (or
// SIGTERM) stops at the end of the step with a checkpoint; `--resume` continues from it.
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "trainer/config.h"
#include "trainer/train_loop.h"

namespace splitq::cli {
namespace {

struct TrainCommandOptions {
  std::string config_path;
  std::vector<std::string> overrides;
  std::string out_dir;
  std::string init;
  bool resume = false;
  bool force = false;
};

std::atomic<bool> g_interrupt{false};
std::atomic<int> g_signal{0};

void OnInterrupt(int signal) {
  g_signal.store(signal);
  if (g_interrupt.exchange(true)) std::_Exit(128 + signal);  // a second one quits at once
}

int RunTrain(const TrainCommandOptions& opt) {
  WarnIfReferenceBlas();
  auto config = trainer::LoadRunConfig(opt.config_path, opt.overrides);
  if (!config.ok()) {
    spdlog::error("config error: {}", std::string(config.status().message()));
    return 2;
  }
  trainer::TrainOptions train_options;
  train_options.out_dir =
      opt.out_dir.empty()
          ? (std::filesystem::path("runs") / std::filesystem::path(opt.config_path).stem()).string()
          : opt.out_dir;
  train_options.init_checkpoint = opt.init;
  train_options.resume = opt.resume;
  train_options.overwrite = opt.force;
  train_options.interrupt = &g_interrupt;
  std::signal(SIGINT, OnInterrupt);
  std::signal(SIGTERM, OnInterrupt);
  SetProgressOutput("", &train_options);
  auto summary = trainer::Train(*config, train_options);
  EndProgress();
  if (!summary.ok()) {
    spdlog::error("train: {}", std::string(summary.status().message()));
    return summary.status().code() == absl::StatusCode::kCancelled ? 128 + g_signal.load() : 1;
  }
  PrintTrainSummary(*summary, train_options.out_dir);
  return 0;
}

}  // namespace

void PrintTrainSummary(const trainer::TrainSummary& summary, const std::string& out_dir) {
  std::printf("%s", trainer::FormatSummary(summary).c_str());
  if (!out_dir.empty()) {
    std::printf("wrote %s/{metrics.jsonl, validation.jsonl, checkpoint.pt, summary.json}\n",
                out_dir.c_str());
    std::printf("curves: splitq report %s --out %s/report.html\n", out_dir.c_str(),
                out_dir.c_str());
  }
}

void RegisterTrain(CLI::App& app, RunFn* run) {
  auto opt = std::make_shared<TrainCommandOptions>();
  CLI::App* cmd =
      app.add_subcommand("train", "Train a split model in one process, wire codec in the loop");
  cmd->add_option("--config", opt->config_path, "The YAML run config (configs/)")->required();
  cmd->add_option("--set", opt->overrides, "Override a key: key.path=value (YAML value)");
  cmd->add_option("--out", opt->out_dir, "Output directory (default runs/<config name>)");
  cmd->add_option("--init", opt->init,
                  "Checkpoint whose model weights are the base (LoRA runs need one)");
  auto* resume =
      cmd->add_flag("--resume", opt->resume, "Continue from the output directory's checkpoint.pt");
  cmd->add_flag("--force", opt->force,
                "Start over in an output directory that holds a run (its files are replaced)")
      ->excludes(resume);
  cmd->callback([opt, run] { *run = [opt] { return RunTrain(*opt); }; });
}

}  // namespace splitq::cli

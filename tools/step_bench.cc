#include "tools/step_bench.h"

#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "trainer/config.h"
#include "trainer/split_trainer.h"

namespace splitq::tools {
namespace {

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

int RunStepBench(const StepBenchOptions& opt) {
  auto config = trainer::LoadRunConfig(opt.config_path, opt.overrides);
  if (!config.ok()) {
    std::fprintf(stderr, "config error: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  trainer::RunConfig base = *config;
  base.activations.mode = trainer::WireMode::kFloat32;
  base.gradients.mode = trainer::WireMode::kFloat32;
  const int total = opt.warmup + opt.steps;
  config->steps = base.steps = std::max<int64_t>(config->steps, total);
  auto quantized = trainer::SplitTrainer::Create(*config, opt.init);
  auto fp32 = trainer::SplitTrainer::Create(base, opt.init);
  for (const auto* t : {&quantized, &fp32}) {
    if (!t->ok()) {
      std::fprintf(stderr, "bench step: %s\n", std::string(t->status().message()).c_str());
      return 1;
    }
  }
  std::vector<double> q_ms, f_ms;
  for (int i = 0; i < total; ++i) {
    auto a = (*quantized)->Step();
    auto b = (*fp32)->Step();
    if (!a.ok() || !b.ok()) {
      std::fprintf(stderr, "bench step: %s\n",
                   std::string((a.ok() ? b.status() : a.status()).message()).c_str());
      return 1;
    }
    if (i >= opt.warmup) {
      q_ms.push_back(a->step_ms);
      f_ms.push_back(b->step_ms);
    }
    std::fprintf(stderr, "\rstep %d/%d", i + 1, total);
  }
  std::fprintf(stderr, "\n");
  const double q = Median(q_ms), f = Median(f_ms);
  const trainer::ClientMemory mem = (*quantized)->client_memory();
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const double mb = 1.0 / (1 << 20);
  std::printf("device %s, %d steps after %d warm-up, medians, alternating step by step\n",
              (*quantized)->device().c_str(), opt.steps, opt.warmup);
  std::printf("  %-40s %9.2f ms/step\n", "this config's wire", q);
  std::printf("  %-40s %9.2f ms/step\n", "fp32 wire (same model and batches)", f);
  std::printf("  ratio %.3f; the quantized wire adds %+.1f%% of the fp32 step\n", q / f,
              100.0 * (q - f) / f);
  std::printf(
      "client part: parameters %.2f MiB (trainable %.2f MiB), optimizer state %.2f MiB, one "
      "boundary activation %.2f MiB, AQ-SGD cache %.2f MiB\n",
      mem.parameters * mb, mem.trainable * mb, mem.optimizer_state * mb, mem.boundary_tensor * mb,
      mem.aqsgd_cache * mb);
  std::printf("process peak RSS (both parts, both runs, data sets): %.1f MiB\n",
              usage.ru_maxrss / 1024.0);
  if (!opt.json_path.empty()) {
    std::ofstream out(opt.json_path);
    out << absl::StrFormat(
        "{\"config\": \"%s\", \"device\": \"%s\", \"steps\": %d, \"quantized_ms\": %.4f, "
        "\"fp32_ms\": %.4f, \"ratio\": %.4f, \"client_parameters_bytes\": %d, "
        "\"client_trainable_bytes\": %d, \"client_optimizer_bytes\": %d, "
        "\"boundary_bytes\": %d, \"peak_rss_kib\": %d}\n",
        opt.config_path, (*quantized)->device(), opt.steps, q, f, q / f, mem.parameters,
        mem.trainable, mem.optimizer_state, mem.boundary_tensor, usage.ru_maxrss);
    if (!out) {
      std::fprintf(stderr, "cannot write %s\n", opt.json_path.c_str());
      return 1;
    }
  }
  return 0;
}

}  // namespace splitq::tools

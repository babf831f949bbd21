// splitq: one binary, one subcommand per job. `splitq --help` lists them.
#include <malloc.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#if SPLITQ_WITH_SERVICES
#include <grpc/support/log.h>
#endif

#include "absl/synchronization/mutex.h"
#include "base/log.h"
#include "cli/commands.h"
#include "trainer/replica_group.h"

namespace {

// Large tensors are allocated and freed every step. By default glibc serves them with fresh
// mmap()s, so every step pays one page fault per 4 KiB; on the VMs we measured, that is
// ~12 us per fault (200 ms for a 64 MiB buffer, against 4 ms to fill a reused one). Keeping
// freed memory in the heap lets the next step reuse it.
// SPLITQ_LOW_MEMORY=1 keeps glibc's defaults (memory goes back to the system; slower steps).
void KeepLargeAllocationsInTheHeap() {
  if (const char* low = std::getenv("SPLITQ_LOW_MEMORY"); low != nullptr && low[0] == '1') return;
  if (mallopt(M_MMAP_THRESHOLD, 1 << 30) != 1 || mallopt(M_TRIM_THRESHOLD, 1 << 30) != 1) {
    spdlog::debug("mallopt refused; large allocations stay mmap-backed");
  }
}

// Debian's abseil is built with assertions, so every absl::Mutex lock (gRPC takes many per
// message) also updates a global lock graph to detect deadlocks: measured at 3.3% of the CPU
// time of `splitq bench transport`, about as much as gRPC itself. That is a debugging aid;
// SPLITQ_ABSL_DEADLOCK_CHECK=1 keeps it.
void SkipMutexDeadlockDetection() {
  if (const char* keep = std::getenv("SPLITQ_ABSL_DEADLOCK_CHECK"); keep && keep[0] == '1') return;
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
}

#if SPLITQ_WITH_SERVICES
// gRPC logs its own view of failures that splitq reports itself, in its own format (a bind error
// is "chttp2_server.cc:1065] UNKNOWN:No address added ..." before splitq's "cannot listen on
// ..."). Those lines are dropped unless SPLITQ_GRPC_LOG=1, which shows them as warnings
// prefixed "grpc:" (with GRPC_VERBOSITY=INFO or DEBUG for more than errors).
bool ShowGrpcLog() {
  const char* show = std::getenv("SPLITQ_GRPC_LOG");
  return show != nullptr && show[0] == '1';
}

void ForwardGrpcLog(gpr_log_func_args* args) {
  if (!ShowGrpcLog()) return;
  spdlog::warn("grpc: {}:{}: {}", args->file, args->line, args->message);
}
#endif

}  // namespace

namespace splitq::cli {

void WarnIfReferenceBlas() {
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line);) {
    // Debian's alternatives: .../blas/libblas.so.3 is netlib; OpenBLAS lives under
    // .../openblas-<flavour>/.
    const size_t at = line.find("/blas/libblas.so");
    if (at == std::string::npos) continue;
    spdlog::warn(
        "libtorch is running on the reference BLAS ({}): CPU training is about 10x slower than "
        "with OpenBLAS. Install it: scripts/install-deps.sh, or apt-get install "
        "libopenblas0-openmp",
        line.substr(line.find('/')));
    return;
  }
}

namespace {
bool ProgressOnTerminal() { return isatty(fileno(stderr)) != 0 && !base::LoggingAsJson(); }
}  // namespace

void SetProgressOutput(const std::string& prefix, trainer::TrainOptions* options) {
  if (ProgressOnTerminal()) {
    options->progress = [prefix](const std::string& line) {
      std::fprintf(stderr, "\r\033[K%s%s", prefix.c_str(), line.c_str());
      std::fflush(stderr);
    };
    options->note = [prefix](const std::string& line) {
      std::fprintf(stderr, "\r\033[K%s%s\n", prefix.c_str(), line.c_str());
    };
  } else {
    options->progress = [prefix](const std::string& line) { spdlog::info("{}{}", prefix, line); };
    options->note = options->progress;
  }
}

void EndProgress() {
  if (ProgressOnTerminal()) std::fprintf(stderr, "\n");
}

}  // namespace splitq::cli

int main(int argc, char** argv) {
  KeepLargeAllocationsInTheHeap();
  SkipMutexDeadlockDetection();
  splitq::trainer::TurnOffFlightRecorderUnlessAsked();  // an environment variable: no threads yet
#if SPLITQ_WITH_SERVICES
  gpr_set_log_function(&ForwardGrpcLog);
#endif
  CLI::App app{"splitq: distributed quantization-aware training and split learning"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "splitq 0.1.0");
  // Log lines (base/log.h), before or after the subcommand.
  std::string log_level = "info", log_format = "text";
  app.add_option("--log-level", log_level, "debug | info | warn | error (default info)");
  app.add_option("--log-format", log_format,
                 "text (default) or json: one object per line {time, level, msg} on stderr");
  app.fallthrough();

  splitq::cli::RunFn run;
  splitq::cli::RegisterTrain(app, &run);
  CLI::App* bench = app.add_subcommand("bench", "Measure splitq against the alternatives");
  bench->require_subcommand(1);
  splitq::cli::RegisterBenchKernels(*bench, &run);
  splitq::cli::RegisterBenchStep(*bench, &run);
  splitq::cli::RegisterBenchCoding(*bench, &run);
  splitq::cli::RegisterBenchAllreduce(*bench, &run);
#if SPLITQ_WITH_SERVICES
  splitq::cli::RegisterBenchTransport(*bench, &run);
  splitq::cli::RegisterBenchCluster(*bench, &run);
  splitq::cli::RegisterBenchCoordinator(*bench, &run);
#endif
  splitq::cli::RegisterConfig(app, &run);
  splitq::cli::RegisterReport(app, &run);
  splitq::cli::RegisterData(app, &run);
  splitq::cli::RegisterCerts(app, &run);
  splitq::cli::RegisterThrottle(app, &run);
#if SPLITQ_WITH_SERVICES
  splitq::cli::RegisterHealth(app, &run);
  splitq::cli::RegisterTokens(app, &run);
  splitq::cli::RegisterCoordinator(app, &run);
  splitq::cli::RegisterWorker(app, &run);
  splitq::cli::RegisterClient(app, &run);
  splitq::cli::RegisterDemo(app, &run);
#endif

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version exit 0; every usage error exits 2 (CLI11's own codes vary).
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (!run) {
    std::fprintf(stderr, "%s", app.help().c_str());
    return 2;
  }
  if (absl::Status s = splitq::base::ConfigureLogging(log_level, log_format); !s.ok()) {
    std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
    return 2;
  }
  // SPLITQ_PARSE_ONLY=1: check a command line (tests/deploy/compose_test.cc checks every
  // docker-compose.yml command this way) without running it.
  if (const char* parse_only = std::getenv("SPLITQ_PARSE_ONLY");
      parse_only != nullptr && std::string(parse_only) == "1") {
    std::printf("parsed\n");
    return 0;
  }
  try {
    return run();
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return 1;
  }
}

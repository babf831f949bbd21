// splitq CLI: the subcommands of the one `splitq` binary. Each Register* adds a subcommand
// to the CLI11 app; main() parses and runs the chosen one. A subcommand's run function
// returns the process exit code.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "cli/int_range.h"
#include "trainer/train_loop.h"

namespace splitq::cli {

using RunFn = std::function<int()>;

// Warns (once, on stderr) when libtorch runs on the reference (netlib) BLAS, Debian's default
// libblas3: CPU training is then ~10x slower than with OpenBLAS (scripts/deps.list).
void WarnIfReferenceBlas();

// The train driver's progress and note lines (trainer::TrainOptions), each prefixed with
// `prefix` ("" or "client0: "): on a terminal with text logs, progress rewrites one line
// (carriage return) and notes end it; otherwise every line is a log line (base/log.h), so
// `--log-format json` keeps one object per line.
void SetProgressOutput(const std::string& prefix, trainer::TrainOptions* options);
// Ends a progress line left open on a terminal.
void EndProgress();

// ParseWholeNumber and IntRange: cli/int_range.h.

// `splitq bench kernels`: our kernels against PyTorch's ops and a copy (docs/benchmarks.md).
void RegisterBenchKernels(CLI::App& bench, RunFn* run);

// `splitq bench step`: a config's training step against an fp32 wire, side by side.
void RegisterBenchStep(CLI::App& bench, RunFn* run);
void RegisterBenchCoding(CLI::App& bench, RunFn* run);

// `splitq bench allreduce` (tools/allreduce_bench.h).
void RegisterBenchAllreduce(CLI::App& bench, RunFn* run);

// `splitq train`: one-process split training with the wire codec in the loop.
void RegisterTrain(CLI::App& app, RunFn* run);
// The lines `splitq train` (and `splitq client`) print at the end of a run; the second (the
// files written) only with a non-empty out_dir.
void PrintTrainSummary(const trainer::TrainSummary& summary, const std::string& out_dir);

// `splitq data export DIR`: the data sets, for hosts without their Debian packages.
void RegisterData(CLI::App& app, RunFn* run);

// `splitq certs --out DIR`: a CA plus server and client certificates (server/tls_certs.h).
void RegisterCerts(CLI::App& app, RunFn* run);

// `splitq bench transport`: frames over gRPC against raw TCP (built with the services).
void RegisterBenchTransport(CLI::App& bench, RunFn* run);
// `splitq bench cluster`: a worker's aggregate throughput with N clients (with the services).
void RegisterBenchCluster(CLI::App& bench, RunFn* run);
// `splitq bench coordinator`: the control plane under load (tools/coordinator_bench.h).
void RegisterBenchCoordinator(CLI::App& bench, RunFn* run);

// `splitq coordinator`: a cluster's control plane (built with the services).
void RegisterCoordinator(CLI::App& app, RunFn* run);
// `splitq worker`: the server part behind the Worker service (built with the services).
void RegisterWorker(CLI::App& app, RunFn* run);
// `splitq client`: the client part, training through a worker (built with the services).
void RegisterClient(CLI::App& app, RunFn* run);
// `splitq throttle`: a TCP proxy capped at a link rate (link benchmarks without tc).
void RegisterThrottle(CLI::App& app, RunFn* run);
// `splitq demo`: coordinator, worker and clients as processes on loopback.
void RegisterDemo(CLI::App& app, RunFn* run);

// `splitq tokens --out DIR ID...`: bearer tokens (built with the services).
void RegisterTokens(CLI::App& app, RunFn* run);

// `splitq health HOST:PORT`: the standard gRPC health check (built with the services).
void RegisterHealth(CLI::App& app, RunFn* run);

// `splitq config check|reference`: validate run configs; list every key.
void RegisterConfig(CLI::App& app, RunFn* run);

// `splitq report RUN_DIR... [--out FILE.html]` (report_command.cc).
void RegisterReport(CLI::App& app, RunFn* run);

}  // namespace splitq::cli

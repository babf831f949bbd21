// `splitq demo [--config F] [--clients N] [--workers W] [--out DIR]`: a whole cluster on this
// machine, as real processes on loopback: one coordinator, W workers (default 1; with more, one
// replica group: `splitq worker --group-size W`) and N clients (default 2), with
// OS-picked ports, fresh certificates (TLS) and fresh bearer tokens. It trains the config (by
// default the embedded one below: Fashion-MNIST, AMAQ at the boundary, 8 -> 4 bits), relays
// the clients' progress, and writes DIR/summary.json with the keys of `splitq train`'s,
// counted over all clients (steps and bytes summed; validation and bits averaged; the max
// budget excess is the max).
//
// DIR holds: config.yaml, certs/, tokens/, logs/{coordinator,worker}.log, client<i>/ (each
// client's metrics, validation, checkpoint and summary), worker0/worker.pt (the server part)
// and summary.json. Ctrl-C stops the clients with a checkpoint and then the servers (the
// worker saves its checkpoint); running the demo again on the same DIR resumes them all.
// splitq tools: `splitq demo` (below): the orchestration of a cluster of processes on this machine.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "trainer/train_loop.h"

namespace splitq::tools {

struct DemoOptions {
  std::string config_path, out_dir = "runs/demo";
  int clients = 2;
  int workers = 1;  // more than 1: a worker group (Gloo on the CPU) on this machine
  int startup_timeout_s = 60;
};

// Runs it; returns the process exit code (errors are logged).
int RunDemo(const DemoOptions& options,
            const std::function<void(const trainer::TrainSummary&)>& print_summary);

}  // namespace splitq::tools

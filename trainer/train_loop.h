// splitq trainer: the driver of `splitq train`: runs a SplitTrainer (split_trainer.h) for the
// configured steps and writes what a run leaves behind.
//
// Outputs in `out_dir`:
//   metrics.jsonl     one line per logged step (every log_every): step, loss, lr, act_bits,
//                     grad_bits, bytes_up, bytes_down, step_ms (loss and bits are means over
//                     the steps since the previous line; bytes are cumulative).
//   validation.jsonl  one line per validation pass (every eval_every, and at the end): step,
//                     val_loss, val_accuracy, val_bits_per_byte.
//   checkpoint.pt     the whole training state, every checkpoint_every steps, on an interrupt
//                     and at the end (replaced atomically).
//   summary.json      task, steps, val_loss, val_accuracy, val_bits_per_byte, avg_act_bits,
//                     avg_grad_bits (means over the last logged window), act_budget and
//                     grad_budget (the schedules' targets, means over the same window; null
//                     for fp32),
//                     bytes_up, bytes_down, bytes_fp32_equivalent, wall_seconds,
//                     max_budget_excess (max over frames of mean bits - budget: never above
//                     0; with quant.activations.budget: bytes, coded payload bits per element
//                     - budget, which may be), device, clients (1; the demo's sum over N
//                     clients says N);
//                     a networked client adds steps_lost and lost_steps (TrainSummary).
// A run is never overwritten by accident: see TrainOptions::overwrite.
// Resume (`resume`): restores out_dir/checkpoint.pt, drops the metric and validation lines
// after its step, and continues; on the CPU the curve is bit-identical to an uninterrupted
// run (step_ms and the byte counters excepted: see split_trainer.h).
#pragma once

#include <atomic>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "trainer/config.h"
#include "trainer/split_trainer.h"

namespace splitq::trainer {

// One worker of a cluster run, as it reported at its stop (`splitq worker --out`'s worker.json).
struct WorkerReport {
  std::string name;
  int64_t rank = 0;
  int64_t server_updates = 0;
  int64_t steps_applied = 0;  // by the worker's last process
  int64_t updates_here = 0;   // by the worker's last process
  std::string weights_sha256;
};

struct TrainSummary {
  std::string task;
  int64_t steps = 0;
  double val_loss = 0;
  double val_accuracy = -1;       // classification; -1 (null in JSON) otherwise
  double val_bits_per_byte = -1;  // language model; -1 (null) otherwise
  double first_loss = 0;          // mean training loss over the first logged window
  double last_loss = 0;           // ... and the last one
  double avg_act_bits = 0;        // mean over the last logged window
  double avg_grad_bits = 0;
  // The schedules' targets B*(t) (bits per value), averaged over the last logged window, as
  // avg_act_bits and avg_grad_bits are; -1: fp32 (no budget), or a summary.json without them.
  // Learned bits may sit below the activation budget: it is a ceiling, and the gate penalty
  // (quant.activations.gate.beta) lowers a channel's bits wherever the task loss allows.
  double act_budget = -1, grad_budget = -1;
  int64_t clients = 1;  // runs summed into this one (`splitq demo`); steps are summed
  int64_t bytes_up = 0, bytes_down = 0, bytes_fp32_equivalent = 0;
  // summary.json writes wire_bits_up/down (bytes x 8 / elements, elements =
  // bytes_fp32_equivalent / 8 each way) and code_entropy_bits_up/down (entropy bits /
  // measured elements; null when no quantized frame went that way) with their element counts.
  CodeEntropyTotals entropy;
  double wall_seconds = 0;  // over all sessions of a resumed run
  // Max over frames of (mean bits sent - budget): <= 0 always for a budget in bits; for one in
  // bytes (coded payload bits per element - budget) it may be above 0 (config.h).
  double max_budget_excess = 0;
  std::string device;
  // `splitq demo` only (written when not empty): the workers, and the clients' steps applied
  // (all workers) per server update of the group (every replica takes each update), over the
  // workers' last processes (1 with one worker and no merged batches).
  std::vector<WorkerReport> workers;
  double mean_clients_per_update = -1;
  // A networked client (`splitq client`; written when >= 0): the steps its workers said they
  // had not applied (lost with a worker's state: see docs/cluster.md), in this process, as
  // ranges first..last and their count. `splitq demo` sums the count over its clients.
  int64_t steps_lost = -1;
  std::vector<std::pair<int64_t, int64_t>> lost_steps;
};

struct TrainOptions {
  std::string out_dir;          // created if missing
  std::string init_checkpoint;  // --init: base weights (required by LoRA runs)
  bool resume = false;          // --resume: continue from out_dir/checkpoint.pt
  // Without `resume`, an out_dir that holds a run (checkpoint.pt or summary.json) is refused
  // with FAILED_PRECONDITION, unless `overwrite` (--force): then that run's checkpoint and
  // summary are removed at once and its metric files are started anew.
  bool overwrite = false;
  // Stop after this step (with a checkpoint), as if interrupted; -1: run to the end.
  int64_t stop_after = -1;
  // Set (e.g. by a SIGINT handler) to stop at the end of the current step with a checkpoint;
  // Train then returns CANCELLED. A step that fails while it is set (a networked client
  // interrupted while reconnecting) also returns CANCELLED, without a new checkpoint (the
  // message says which checkpoint holds the state); a validation pass that fails while it is
  // set saves the state of the step before it. May be null.
  const std::atomic<bool>* interrupt = nullptr;
  // Called after every logged step with a one-line summary (progress); may be empty.
  std::function<void(const std::string&)> progress;
  // Called with one-off lines a person should keep seeing (where a resume starts, what the
  // bit budget means); may be empty (then `progress` gets them).
  std::function<void(const std::string&)> note;
  // What continues a stopped run, in the messages that say how to (`splitq train`: its
  // --resume flag; a networked client resumes from its --out by itself).
  std::string resume_hint = "continue with --resume";
  // Called with the finished summary before summary.json is written, to add what only the
  // caller knows (a networked client: the steps its workers lost). May be empty.
  std::function<void(TrainSummary&)> finish;
  // Called after every step (logged or not) with its numbers and the run's wire totals so far
  // (`splitq client --metrics-listen` feeds Prometheus from it). On the training thread: keep
  // it cheap. May be empty.
  std::function<void(int64_t step, const StepStats& stats, const WireTotals& wire)> on_step;
};

// Runs the configured training. CANCELLED after an interrupt or stop_after (the checkpoint
// is written; resume with `resume`). Other errors: see SplitTrainer::Create and Step.
absl::StatusOr<TrainSummary> Train(const RunConfig& config, const TrainOptions& options);

// The same driver around any StepRunner (a networked client: step.h, ClientRunner). The runner is
// created by the caller (options.init_checkpoint is not used here); `options.resume` loads
// out_dir/checkpoint.pt into it.
absl::StatusOr<TrainSummary> RunTraining(StepRunner& runner, const TrainOptions& options);

// summary.json (the keys listed at the top of this file, plus act_budget, grad_budget (null
// for fp32) and clients; first_loss and last_loss are not written). ReadSummary parses one
// back (INVALID_ARGUMENT naming the file); keys missing from an older file keep their defaults.
absl::Status WriteSummary(const TrainSummary& summary, const std::string& path);
absl::StatusOr<TrainSummary> ReadSummary(const std::string& path);

// The budget B*(t) of the activation (or gradient) schedule at step index `step` (0-based), as
// the boundary applies it: -1 for an fp32 wire; for uniform frames the whole bits sent.
double ActivationBudgetAt(const RunConfig& config, int64_t step);
double GradientBudgetAt(const RunConfig& config, int64_t step);

// The end of a run for a person, three lines: what was trained and how well; the bytes on the
// wire against fp32 ("wire 21.9 MB up+down vs 128.4 MB at fp32: 5.9x less"); the bits used
// next to their budgets. With summary.clients > 1 the steps read "N clients x S steps".
std::string FormatSummary(const TrainSummary& summary);

}  // namespace splitq::trainer

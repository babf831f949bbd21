// splitq trainer: the training loop of `splitq train`, client and server in one process with
// the wire codec in the loop.
//
// Every step: the client runs its layers; the boundary activation is quantized (AMAQ: the
// learned per-channel bits under the schedule's budget; uniform: the schedule's bits for
// every channel, min-max ranges; fp32: raw floats), encoded into a frame, serialized to bytes,
// parsed and decoded on the server side (no shortcut); the server runs its layers and the
// loss and backpropagates to the decoded activation; that gradient goes back the same way
// (max-abs ranges, stochastic rounding); the client backpropagates through the boundary
// (straight-through for h; true gradients for ranges and gates, plus the bit regulariser)
// and both sides step their optimisers (AdamW, warm-up then cosine, gradient clipping; gates
// and ranges in their own group with their own learning rate).
//
// Outputs in `out_dir`: metrics.jsonl (one line per logged step: step, loss, lr, act_bits,
// grad_bits, bytes_up, bytes_down, step_ms) and summary.json (task, steps, val_loss,
// val_accuracy, val_bits_per_byte, avg_act_bits, avg_grad_bits, bytes_up, bytes_down,
// bytes_fp32_equivalent, wall_seconds, max_budget_excess).
//
// Not yet: U-shaped runs, AQ-SGD, checkpoints and resume, --init, bf16 autocast (each is
// refused with a clear error rather than ignored).
#pragma once

#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "trainer/config.h"

namespace splitq::trainer {

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
  int64_t bytes_up = 0, bytes_down = 0, bytes_fp32_equivalent = 0;
  double wall_seconds = 0;
  double max_budget_excess = 0;  // max over frames of (mean bits sent - budget); <= 0 always
};

struct TrainOptions {
  std::string out_dir;  // created if missing
  // Called after every logged step with a one-line summary (progress); may be empty.
  std::function<void(const std::string&)> progress;
};

absl::StatusOr<TrainSummary> Train(const RunConfig& config, const TrainOptions& options);

}  // namespace splitq::trainer

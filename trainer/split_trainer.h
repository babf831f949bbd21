// splitq trainer: SplitTrainer, one split-learning run with both parties in one process:
// `splitq train` (train_loop.h) drives it; `splitq bench step` runs two side by side.
//
// It is the cluster's step, not a copy of it: a ClientPart (client_part.h) and a ServerPart
// (server_part.h) joined by a LocalServerLink and driven by ClientRunner (step.h, which shows
// the step and the boundary modes' path). Every frame is encoded, serialized, parsed and
// decoded as over the network.
//
// Boundary modes (quant.activations.mode), the same at both boundaries (design.md):
//   fp32     raw float32 bytes.
//   uniform  the schedule's bits for every channel, min-max ranges; straight-through.
//   amaq     learned per-channel bits under the schedule's budget (a frame's mean bits never
//            exceed it), learned ranges, the bit regulariser. Each boundary's gates and ranges
//            belong to the party that sends it (boundary 2: the server), in that party's second
//            optimizer group (quant.activations.gate.lr).
//   aqsgd    AQ-SGD (design.md "Delta mode"): the sender sends C(h - m_i) for sample i; sender
//            and receiver both set m_i <- m_i + C(h - m_i) from the same frame, so their caches
//            stay identical. Caches are float16, one entry per sample seen: memory is (samples
//            seen) x (boundary elements per sample) x 2 bytes on each side. Validation samples
//            have no cache entry: they cross as plain uniform frames.
// Gradients (quant.gradients.mode): fp32, or uniform bits from their schedule with per-channel
// max-abs ranges and stochastic (unbiased) rounding keyed by (seed, step, element).
//
// Checkpoints (SaveCheckpoint, "version" 1) hold the model (by block, so --init works across
// split points), the AMAQ boundaries, both optimizers, both sides' AQ-SGD caches, the wire byte
// counters and the step. The wire encoders are not saved: the first frame after a resume
// carries the bit map again (a few hundred bytes more than an uninterrupted run).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "trainer/config.h"
#include "trainer/split_link.h"
#include "trainer/step.h"

namespace splitq::trainer {

class SplitTrainer : public StepRunner {
 public:
  // Builds both parties (see ClientPart::Create for `init_checkpoint`, `for_resume` and the
  // errors).
  static absl::StatusOr<std::unique_ptr<SplitTrainer>> Create(
      const RunConfig& config, const std::string& init_checkpoint = "", bool for_resume = false);
  ~SplitTrainer() override;

  // Trains on batch step() and advances step(). A frame over the budget, a non-finite loss
  // or a wire error stops the run with an error (the state is then not meant to continue).
  absl::StatusOr<StepStats> Step() override;
  // The validation set through the same model and wire (training state not touched).
  absl::StatusOr<EvalStats> Evaluate() override;

  // Writes the whole training state to `path` atomically (base::CommitFile). `driver_state` is
  // stored opaquely (the caller's own counters, e.g. partial metric windows) and returned by
  // LoadCheckpoint.
  absl::Status SaveCheckpoint(const std::string& path,
                              const std::vector<double>& driver_state = {}) const override;
  // Restores a state written by SaveCheckpoint of a run with the same model, split point,
  // boundary mode, bit range and LoRA settings (FAILED_PRECONDITION naming the first field
  // that differs). Optimizer hyper-parameters come back from the checkpoint (the learning
  // rate is set again every step).
  absl::Status LoadCheckpoint(const std::string& path,
                              std::vector<double>* driver_state = nullptr) override;

  int64_t step() const override;
  const RunConfig& config() const override;
  WireTotals wire() const override;
  std::string device() const override;  // "cpu" or "cuda"
  ClientMemory client_memory() const;
  // Calls `tap` with every training step's activation and gradient frames, as serialized
  // (`splitq bench coding`).
  void set_frame_tap(LocalServerLink::FrameTap tap);

 private:
  struct Impl;
  explicit SplitTrainer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace splitq::trainer

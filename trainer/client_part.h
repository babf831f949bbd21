// splitq trainer: the client's party of a split run. It talks to the server part only in frames
// (split_link.h); step.h shows where each call sits in a step.
//
// A ClientPart holds the client's layers, the sending half of boundary 1 (AMAQ module,
// encoders, AQ-SGD sender cache), for a U-shaped model the head and the receiving half of
// boundary 2, one optimizer over all of them, and its data (one shard of the training set).
//
// AQ-SGD caches live as long as a server session: a new session (NewSession: a reconnect, a
// failover to another worker, a restarted client) starts both sides' caches at zero again, so
// sender and receiver always agree; a sample's next visit is then a plain uniform frame. Client
// checkpoints therefore hold no caches (SplitTrainer's one-process checkpoints hold both sides').
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "trainer/config.h"
#include "trainer/split_link.h"
#include "trainer/step.h"

namespace torch::serialize {
class InputArchive;
class OutputArchive;
}  // namespace torch::serialize

namespace splitq::trainer {

// UNIMPLEMENTED for a config the trainer does not support yet (a boundary granularity other
// than channel; AMAQ with min-max ranges), naming the key.
absl::Status CheckSupported(const RunConfig& config);

class ClientPart {
 public:
  // Builds data (the shard), the whole model (then keeps the client's blocks and the head),
  // boundaries and optimizer. `init_checkpoint` (--init): a checkpoint of any run of the same
  // task and model shape whose weights become the base before LoRA is applied; a LoRA run needs
  // one unless `for_resume` (LoadCheckpoint follows). Errors: a missing data set (NOT_FOUND
  // naming its Debian package), device cuda without a GPU (FAILED_PRECONDITION), a checkpoint
  // that does not match the model (FAILED_PRECONDITION naming the field), bf16_autocast on the
  // CPU (INVALID_ARGUMENT), CheckSupported's UNIMPLEMENTED.
  static absl::StatusOr<std::unique_ptr<ClientPart>> Create(const RunConfig& config,
                                                            const std::string& init_checkpoint,
                                                            bool for_resume,
                                                            const DataShard& shard = {});
  ~ClientPart();

  // The activation frame of step(). The autograd graph is kept until Backward. Calling it
  // again before Backward returns the same frame (it is not recomputed).
  absl::StatusOr<UpFrame> Forward();
  // U-shaped: the server's output activation of step() (Train's first answer) through the head:
  // the loss, and the gradient frame to send back (TrainHead). FAILED_PRECONDITION without a
  // pending Forward, for another step, or for a model that is not U-shaped.
  absl::StatusOr<HeadGradient> Head(const DownFrame& activation);
  // The gradient of step(): backpropagates, steps the optimizer, advances step().
  // FAILED_PRECONDITION without a pending Forward (and Head, U-shaped) or for another step.
  absl::StatusOr<StepStats> Backward(const DownFrame& down);
  // A new server session: the next frames (and the pending one) carry the bit map; AQ-SGD
  // caches start again at zero, and a pending AQ-SGD step is dropped (Forward recomputes its
  // frame against the empty cache; the weights have not moved, so it is the same step).
  void NewSession();
  // Memory for time: with k > 1, Forward (and EvalForward) compute the activation without the
  // autograd graph, k slices of the batch at a time, and Backward recomputes the client's layers
  // slice by slice, so a step holds the intermediate tensors of batch/k examples instead of the
  // whole batch's (LM LoRA client peak RSS 663 -> 343 MiB at k=4: docs/benchmarks.md). It costs
  // one more forward pass of the client's layers. The gradient is the same up to the order of
  // float sums (the models have no batch statistics: LayerNorm, no BatchNorm). Default 1.
  void set_micro_batches(int k) { micro_batches_ = std::max(1, k); }

  int64_t validation_batches() const;
  // Validation batch i (no autograd, its own encoder).
  absl::StatusOr<UpFrame> EvalForward(int64_t i);
  // U-shaped: the server's answer to validation batch i (its output activation) through the
  // head: the batch's loss and counts. Call right after EvalForward(i).
  absl::StatusOr<EvalPiece> EvalHead(int64_t i, const EvalPiece& server);

  // The client's state only: its blocks, boundary module, optimizer, counters (version
  // "client_version" 1). Loading checks the model's shape and state fields first
  // (FAILED_PRECONDITION naming the field).
  absl::Status SaveCheckpoint(const std::string& path, const std::vector<double>& driver) const;
  absl::Status LoadCheckpoint(const std::string& path, std::vector<double>* driver);
  // The same state as tensors of an archive whose header the caller writes (SplitTrainer's
  // one-process checkpoint), with the AQ-SGD caches when `with_caches`. Save may throw
  // c10::Error; Load returns FAILED_PRECONDITION for a missing or mismatched block.
  void SaveParts(torch::serialize::OutputArchive& archive, bool with_caches) const;
  absl::Status LoadParts(torch::serialize::InputArchive& archive, const std::string& path,
                         bool with_caches);
  // Restores the counters a checkpoint header holds.
  void SetCounters(int64_t step, const WireTotals& bytes);

  int64_t step() const;
  // The largest frame the worker may send this client (a gradient of its boundary or, U-shaped,
  // the server's output activation), as ServerPart::max_frame_bytes bounds what a worker takes:
  // the largest batch (the larger of batch_size and, for Fashion-MNIST, 500) x the larger
  // per-example element count of the two x 4 bytes, plus 16 bytes per element of one example
  // and 64 KiB. The client refuses a larger answer (its session breaks, and it reconnects).
  int64_t max_answer_frame_bytes() const;
  const RunConfig& config() const;
  WireTotals wire() const;  // bytes of completed steps
  std::string device() const;
  ClientMemory memory() const;

 private:
  struct Impl;
  explicit ClientPart(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  int micro_batches_ = 1;
};

}  // namespace splitq::trainer

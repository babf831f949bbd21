// splitq trainer: the server's party of a split run, shared by every client session of a worker
// (and by the one session of `splitq train`). It talks to client parts only in frames
// (split_link.h); step.h shows where each call sits in a step.
//
// A ServerPart holds the server's layers and one optimizer over them, and for a U-shaped model
// boundary 2's AMAQ module (the server sends that boundary, so its gates and ranges are the
// server's, trained by every session). Each session holds its own wire state: the receiving half
// of boundary 1 (decoders, AQ-SGD receiver cache, gradient encoder) and, U-shaped, the sending
// half of boundary 2 (encoders, AQ-SGD sender cache). Sessions' AQ-SGD caches die with them
// (client_part.h says why).
//
// Merged batches (TrainMerged, plain layout): the steps of K sessions become one server batch.
// Each session decodes its own frame (its bit map, its AQ-SGD cache); the activations are
// concatenated in the order given, and the server takes one forward, one backward and ONE
// optimizer update over the merged batch, with the loss the mean over all merged targets (what
// `splitq train` computes for one client with the batches concatenated). Each client gets the
// gradient of ITS OWN mean loss: its slice of the merged gradient times N / N_k (N targets in
// the merge, N_k its own), so a client's step is as large as it would be unmerged, and each
// gets its own loss back. The learning-rate schedule takes the largest step in the merge.
// A step with a bad frame or labels fails alone (INVALID_ARGUMENT etc., as Train); a
// non-finite merged loss fails every step of the merge (INTERNAL), with no update. A U-shaped
// server part computes merged steps one at a time (its steps hold a turn).
//
// Worker groups (set_group): the part is one replica of a data-parallel group
// (replica_group.h). Every TrainMerged call is then a ROUND in which every replica takes part,
// with steps or without (an idle round): the replicas agree on the round's largest step (the
// learning rate), compute their own merged batches, and sum their gradients weighted by
// their targets together with the targets; each divides by all the targets and takes the same
// update, so the replicas stay identical (WeightsDigest agrees) and the update is the one a
// single part would take on every replica's batches merged. A round nobody has a step for
// takes no update (and only one small collective). A failed collective fails the round's
// steps (UNAVAILABLE) with no update on this replica and marks the group broken. So does a
// round in which the members have heard of different generations (ReplicaGroup::
// latest_generation, compared in the round's first collective): every member leaves the
// generation at that same round, and the worker forms the next (server/worker_process.h).
// TrainRound's records travel in the update's collective, so every replica learns which
// steps the others applied (a client that moves to another member replays them, never
// applying twice). Replays (Train with update false) and validation take no part in rounds.
// Groups serve the plain layout (not U-shaped).
//
// Not thread-safe: the worker calls it from one thread, one step at a time (server/worker_core.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "trainer/config.h"
#include "trainer/split_link.h"

namespace at {
class Tensor;
}  // namespace at
namespace torch::serialize {
class InputArchive;
class OutputArchive;
}  // namespace torch::serialize

namespace splitq::trainer {

class ReplicaGroup;

struct ServerPartOptions {
  // The most examples a frame may carry (0: the larger of the training batch and the
  // validation batch); the decoders' element limit follows from it, so a session never
  // allocates more than one such activation.
  int64_t max_batch = 0;
  // Frames come from the network: fp32 frames with NaN or infinite values are INVALID_ARGUMENT.
  // In one process (false) a diverging run reaches the loss check instead, with its hint.
  bool network_input = true;
  // LoadCheckpoint or LoadParts follows (a LoRA run then needs no --init).
  bool for_resume = false;
};

// Where merged rounds (TrainMerged, TrainRound) spent their time, summed over the rounds
// that had work. Milliseconds of the computing thread's wall clock. A worker outside a group
// sends a lone ready step through Train, which is not counted here.
struct RoundTimes {
  int64_t rounds = 0;
  double total_ms = 0;      // in a group: from the round's agreement to its update
  double inputs_ms = 0;     // decoding and checking the frames (server.merge.threads)
  double compute_ms = 0;    // forward, loss, backward (until the losses reach the host)
  double gradients_ms = 0;  // each client's gradient slice encoded (server.merge.threads)
  double update_ms = 0;     // the optimizer update, with the group's sum
  double sum_ms = 0;        // worker groups: the gradient sum, waiting for the others included
  // Worker groups with server.group.bucket_kib: buckets whose all-reduce started during the
  // backward pass (from its hooks).
  int64_t early_buckets = 0;
  // Adds o times `sign` (-1: what came after o, given o is an earlier reading of these).
  void Add(const RoundTimes& o, int sign = 1) {
    rounds += sign * o.rounds;
    total_ms += sign * o.total_ms;
    inputs_ms += sign * o.inputs_ms;
    compute_ms += sign * o.compute_ms;
    gradients_ms += sign * o.gradients_ms;
    update_ms += sign * o.update_ms;
    sum_ms += sign * o.sum_ms;
    early_buckets += sign * o.early_buckets;
  }
};

class ServerPart : public ServerHandler {
 public:
  // Errors as ClientPart::Create.
  static absl::StatusOr<std::unique_ptr<ServerPart>> Create(const RunConfig& config,
                                                            const std::string& init_checkpoint,
                                                            const ServerPartOptions& options = {});
  ~ServerPart() override;

  uint64_t OpenSession() override;
  int64_t CloseSession(uint64_t session) override;
  absl::StatusOr<DownFrame> Train(uint64_t session, const UpFrame& up, bool update) override;
  absl::StatusOr<DownFrame> TrainHead(uint64_t session, const HeadGradient& head) override;
  std::vector<absl::StatusOr<DownFrame>> TrainMerged(
      const std::vector<std::pair<uint64_t, const UpFrame*>>& steps) override;
  std::vector<absl::StatusOr<DownFrame>> TrainRound(
      const std::vector<std::pair<uint64_t, const UpFrame*>>& steps,
      const std::vector<std::string>& records, std::vector<std::string>* others) override;
  bool u_shaped() const override;
  absl::StatusOr<EvalPiece> Evaluate(uint64_t session, const UpFrame& up) override;
  int64_t updates() const override;
  // The server's blocks (under their indices in the whole model, as in a `splitq train`
  // checkpoint), boundary 2's module, its optimizer and updates(); "server_version" 1. Loading
  // checks the shape and state fields of the run config first (a mismatch changes nothing); an
  // error after that (a damaged file) may leave the part half loaded, so the caller must not
  // serve with it.
  absl::Status SaveCheckpoint(const std::string& path, const std::string& extra) const override;
  absl::Status LoadCheckpoint(const std::string& path, std::string* extra) override;
  // The same state as tensors of an archive whose header the caller writes (SplitTrainer's
  // one-process checkpoint), with `session`'s AQ-SGD caches. Save may throw c10::Error.
  void SaveParts(torch::serialize::OutputArchive& archive, uint64_t session) const;
  absl::Status LoadParts(torch::serialize::InputArchive& archive, const std::string& path,
                         uint64_t session, int64_t updates);

  // Joins this part to a replica group (null: alone again); the group outlives its use.
  void set_group(ReplicaGroup* group);
  // The merged rounds' phases so far (RoundTimes); safe to read from any thread.
  RoundTimes round_times() const;
  // One example's boundary activation shape (what a frame carries per example).
  std::vector<int64_t> input_shape() const;
  // max_batch x the boundary's elements per example x 4 bytes (an fp32 frame, the largest
  // kind), plus 16 bytes per element of one example (a quantized frame's per-channel scales,
  // zero points and bit map are far less) and 64 KiB of headers.
  int64_t max_frame_bytes() const override;
  // The server's trainable weights (its blocks' parameters, then boundary 2's), in a fixed
  // order; and a SHA-256 (hex) of their bytes: replicas that took the same updates agree.
  std::vector<at::Tensor> Weights() const;
  std::string WeightsDigest() const override;

  size_t sessions() const;
  std::string device() const;
  // The largest (mean bits - budget) over boundary 2's training frames (U-shaped), or -1e9.
  double max_budget_excess() const;

 private:
  struct Impl;
  explicit ServerPart(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace splitq::trainer

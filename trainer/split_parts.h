// splitq trainer: the two parties of a split run as separate objects that talk only in
// frames (split_link.h), for the networked processes.
//
//   ClientPart    the client's layers, the sending half of boundary 1 (AMAQ module, encoders),
//                 its optimizer and its data (one shard). Forward() makes a step's UpFrame;
//                 Backward() takes the DownFrame and steps.
//   ServerPart    the server's layers and optimizer, shared by every session; each session
//                 holds its own receiving half of the boundary (decoders, gradient encoder).
//                 Implements ServerHandler. Not thread-safe: the worker calls it from one
//                 thread (sessions are served one step at a time, see server/worker_core.h).
//   ClientRunner  a ClientPart and a ServerLink as a StepRunner, so `splitq client` runs the
//                 same driver (metrics, validation, checkpoints, summary) as `splitq train`.
//
// The step is the one SplitTrainer computes (the same helpers, split_internal.h), so a client
// with shard {0, 1} and a server part fed only by it give `splitq train`'s curve: bit-identical
// on the CPU (tests/trainer/split_parts_test.cc). The bytes differ only in that a client sends
// the bit map again after every new session.
//
// Supported: the plain layout (not U-shaped) with boundary modes fp32, uniform and amaq.
// U-shaped models and AQ-SGD (whose receiver cache would have to outlive sessions and follow
// client checkpoints) are UNIMPLEMENTED over the network for now.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "trainer/config.h"
#include "trainer/split_link.h"
#include "trainer/split_trainer.h"

namespace splitq::trainer {

// UNIMPLEMENTED for a config the networked parts do not support (see above).
absl::Status CheckNetworkable(const RunConfig& config);

class ClientPart {
 public:
  // As SplitTrainer::Create (data, model, boundary, optimizer), for the client's share.
  static absl::StatusOr<std::unique_ptr<ClientPart>> Create(const RunConfig& config,
                                                            const std::string& init_checkpoint,
                                                            bool for_resume,
                                                            const DataShard& shard = {});
  ~ClientPart();

  // The activation frame of step(). The autograd graph is kept until Backward. Calling it
  // again before Backward returns the same frame (it is not recomputed).
  absl::StatusOr<UpFrame> Forward();
  // The gradient of step(): backpropagates, steps the optimizer, advances step().
  // FAILED_PRECONDITION without a pending Forward or for another step.
  absl::StatusOr<StepStats> Backward(const DownFrame& down);
  // A new server session: the next frames (and the pending one) carry the bit map.
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

  // The client's state only: its blocks, boundary module, optimizer, counters.
  absl::Status SaveCheckpoint(const std::string& path, const std::vector<double>& driver) const;
  absl::Status LoadCheckpoint(const std::string& path, std::vector<double>* driver);

  int64_t step() const;
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

class ServerPart : public ServerHandler {
 public:
  // `max_batch`: the most examples a frame may carry (0: the larger of the training batch
  // and the validation batch); the decoders' element limit follows from it, so a session
  // never allocates more than one such activation.
  static absl::StatusOr<std::unique_ptr<ServerPart>> Create(const RunConfig& config,
                                                            const std::string& init_checkpoint,
                                                            int64_t max_batch = 0);
  ~ServerPart() override;

  uint64_t OpenSession() override;
  void CloseSession(uint64_t session) override;
  absl::StatusOr<DownFrame> Train(uint64_t session, const UpFrame& up, bool update) override;
  absl::StatusOr<EvalPiece> Evaluate(uint64_t session, const UpFrame& up) override;
  int64_t updates() const override;
  // The server's blocks (under their indices in the whole model, as in a `splitq train`
  // checkpoint), its optimizer and updates(); "server_version" 1. Loading checks the shape and
  // state fields of the run config first (a mismatch changes nothing); an error after that
  // (a damaged file) may leave the part half loaded, so the caller must not serve with it.
  absl::Status SaveCheckpoint(const std::string& path, const std::string& extra) const override;
  absl::Status LoadCheckpoint(const std::string& path, std::string* extra) override;

  size_t sessions() const;
  std::string device() const;

 private:
  struct Impl;
  explicit ServerPart(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// A ClientPart driven through a ServerLink. Step = Forward, link.Train, Backward; Evaluate =
// every validation batch through link.Evaluate. When the link fails and Recover says OK, the
// same step (or batch) is sent again on the new session: nothing is recomputed or counted twice.
class ClientRunner : public StepRunner {
 public:
  ClientRunner(ClientPart& part, ServerLink& link) : part_(part), link_(link) {}
  absl::StatusOr<StepStats> Step() override;
  absl::StatusOr<EvalStats> Evaluate() override;
  absl::Status SaveCheckpoint(const std::string& path,
                              const std::vector<double>& driver_state) const override {
    return part_.SaveCheckpoint(path, driver_state);
  }
  absl::Status LoadCheckpoint(const std::string& path, std::vector<double>* driver) override {
    return part_.LoadCheckpoint(path, driver);
  }
  int64_t step() const override { return part_.step(); }
  const RunConfig& config() const override { return part_.config(); }
  WireTotals wire() const override { return part_.wire(); }
  std::string device() const override { return part_.device(); }

 private:
  ClientPart& part_;
  ServerLink& link_;
};

// A ServerLink to a ServerPart in this process, through one session (tests, benchmarks).
class LocalServerLink : public ServerLink {
 public:
  explicit LocalServerLink(ServerHandler& server)
      : server_(server), session_(server.OpenSession()) {}
  ~LocalServerLink() override { server_.CloseSession(session_); }
  absl::StatusOr<DownFrame> Train(const UpFrame& up) override {
    return server_.Train(session_, up, true);
  }
  absl::StatusOr<EvalPiece> Evaluate(const UpFrame& up) override {
    return server_.Evaluate(session_, up);
  }

 private:
  ServerHandler& server_;
  uint64_t session_;
};

}  // namespace splitq::trainer

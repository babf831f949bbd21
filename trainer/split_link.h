// splitq trainer: what crosses between a client part and a server part in one step, and the
// two plain interfaces the networked processes are built on. No torch here: the gRPC code
// (server/) includes this header, never torch's.
//
//   ServerLink     what a client part needs from "the server": one training step's gradient,
//                  one validation batch's loss. In one process (tests) a ServerPart answers
//                  it directly; over the network, server/worker_client.h does.
//   ServerHandler  what a worker needs from its server part: sessions, one step, one
//                  validation batch. ServerPart (split_parts.h) implements it; the worker's
//                  gRPC service (server/worker_service.h) only adapts it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace splitq::trainer {

// Client -> server, one step (or one validation batch).
struct UpFrame {
  int64_t step = 0;  // training step (validation: the batch index)
  // The serialized activation frame (quant/wire_format.h, or a raw fp32 frame for an fp32
  // boundary); never null. Shared and immutable: a resend or a network link (which sends it
  // without copying, server/chunk_codec.h) holds it without a copy.
  std::shared_ptr<const std::string> frame = std::make_shared<const std::string>();
  std::vector<int32_t> labels;      // targets, flattened (class per image / next byte per position)
  std::vector<int64_t> sample_ids;  // the batch's training-sample ids (for AQ-SGD; may be empty)
};

// Server -> client, one step.
struct DownFrame {
  int64_t step = 0;
  std::string frame;     // the serialized gradient frame
  double loss = 0;       // the server's loss on the step's batch (nats)
  double grad_bits = 0;  // mean bits per element of the gradient frame (32: fp32)
};

// One validation batch's result.
struct EvalPiece {
  double loss_sum = 0;  // summed cross-entropy over the batch's targets (nats)
  int64_t correct = 0;  // targets whose argmax prediction was right
  int64_t count = 0;    // targets in the batch
};

// Which training samples a client draws: ids congruent to `index` modulo `count` (its own
// shard of the data set). {0, 1}: all of them, exactly as `splitq train`.
struct DataShard {
  int64_t index = 0;
  int64_t count = 1;
};

class ServerLink {
 public:
  virtual ~ServerLink() = default;
  // The gradient for `up` (step up.step). Errors: whatever the server or the network says.
  virtual absl::StatusOr<DownFrame> Train(const UpFrame& up) = 0;
  virtual absl::StatusOr<EvalPiece> Evaluate(const UpFrame& up) = 0;
  // Called after Train or Evaluate failed with `error`. OK: the link has a new session (after
  // a reconnect, perhaps to another worker) and the call may be retried; the caller resends the
  // frame with its bit map (ClientPart::NewSession). Otherwise the error to give up with. The
  // default gives up.
  virtual absl::Status Recover(const absl::Status& error) { return error; }
};

class ServerHandler {
 public:
  virtual ~ServerHandler() = default;
  // A new session's receiving state (decoders, gradient encoder). Returns its id (>= 1).
  virtual uint64_t OpenSession() = 0;
  virtual void CloseSession(uint64_t session) = 0;
  // One training step of a session. `update` false: a step the server part has applied
  // already (a client that resumed from an older checkpoint): the gradient is computed, the
  // server's weights are not stepped again.
  // INVALID_ARGUMENT: a malformed frame, labels or activation that does not fit the model;
  // FAILED_PRECONDITION: a bit map the session never got; RESOURCE_EXHAUSTED: a frame over
  // the limits; NOT_FOUND: an unknown session; INTERNAL: a non-finite loss.
  virtual absl::StatusOr<DownFrame> Train(uint64_t session, const UpFrame& up, bool update) = 0;
  virtual absl::StatusOr<EvalPiece> Evaluate(uint64_t session, const UpFrame& up) = 0;
  // Optimizer steps taken so far, over all sessions.
  virtual int64_t updates() const = 0;
  // The trainable state shared by all sessions (weights, optimizer, updates()) plus the
  // caller's `extra` bytes, written to `path` atomically; sessions are not saved (a client
  // opens a new one and resends its bit map). The default: UNIMPLEMENTED.
  virtual absl::Status SaveCheckpoint(const std::string& path, const std::string& extra) const {
    (void)path, (void)extra;
    return absl::UnimplementedError("this server part cannot save checkpoints");
  }
  // Restores what SaveCheckpoint wrote and returns its `extra` in *extra. NOT_FOUND when the
  // file is missing; FAILED_PRECONDITION for a checkpoint of another kind or run config (the
  // message names the key), with nothing changed.
  virtual absl::Status LoadCheckpoint(const std::string& path, std::string* extra) {
    (void)path, (void)extra;
    return absl::UnimplementedError("this server part cannot load checkpoints");
  }
};

}  // namespace splitq::trainer

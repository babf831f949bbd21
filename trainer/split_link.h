// splitq trainer: what crosses between a client part and a server part in one step, and the
// two plain interfaces that join them. No torch here: the gRPC code (server/, client/) includes
// this header, never torch's.
//
//   ServerLink     what a client part needs from "the server": one training step's gradient,
//                  one validation batch's loss. In one process (`splitq train`) a ServerPart
//                  answers it through LocalServerLink; over the network, client/worker_client.h
//                  does.
//   ServerHandler  what a worker needs from its server part: sessions, one step, one
//                  validation batch. ServerPart (server_part.h) implements it; the worker's
//                  gRPC service (server/worker_service.h) only adapts it.
//
// One step, plain layout:  UpFrame (activation, labels) -> Train -> DownFrame (gradient).
// One step, U-shaped:      UpFrame (activation, no labels) -> Train -> DownFrame (the server's
//                          output activation, `activation` true); the client's head computes
//                          the loss -> HeadGradient -> TrainHead -> DownFrame (gradient).
// Between Train and TrainHead the server part holds the step open (its autograd graph): the
// caller must send that session's TrainHead before any other session's Train.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace splitq::trainer {

// Client -> server, one step (or one validation batch).
struct UpFrame {
  int64_t step = 0;  // training step (validation: the batch index)
  // The serialized activation frame (quant/wire_format.h, or a raw fp32 frame for an fp32
  // boundary); never null. Shared and immutable: a resend or a network link (which sends it
  // without copying, proto/chunk_codec.h) holds it without a copy.
  std::shared_ptr<const std::string> frame = std::make_shared<const std::string>();
  // Targets, flattened (class per image / next byte per position). U-shaped: empty (the labels
  // stay with the client, whose head computes the loss).
  std::vector<int32_t> labels;
  std::vector<int64_t> sample_ids;  // the batch's training-sample ids (for AQ-SGD; may be empty)
};

// Server -> client, one step: the gradient of the step's activation, or (U-shaped, the first
// answer) the server's output activation for the client's head.
struct DownFrame {
  int64_t step = 0;
  std::string frame;        // the serialized gradient frame (or activation frame)
  bool activation = false;  // U-shaped first answer: `frame` is boundary 2's activation
  double loss = 0;          // the step's loss (nats): the server's, or the client's echoed back
  double grad_bits = 0;     // mean bits per element of the gradient frame (32: fp32)
  double act_bits = 0;      // U-shaped first answer: mean bits of the activation frame
};

// Client -> server, U-shaped only: the gradient of the server's output activation of a step
// (boundary 2, coming back), with the loss the client's head computed.
struct HeadGradient {
  int64_t step = 0;
  std::string frame;  // the serialized gradient frame
  double loss = 0;
};

// One validation batch's result. U-shaped: the server answers with its output activation
// (`frame`, the counts zero) and the client's head computes the loss.
struct EvalPiece {
  double loss_sum = 0;  // summed cross-entropy over the batch's targets (nats)
  int64_t correct = 0;  // targets whose argmax prediction was right
  int64_t count = 0;    // targets in the batch
  std::string frame;    // U-shaped: boundary 2's activation frame of the batch
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
  // U-shaped: the second half of the step Train opened. The default: UNIMPLEMENTED.
  virtual absl::StatusOr<DownFrame> TrainHead(const HeadGradient& head) {
    (void)head;
    return absl::UnimplementedError("this link carries the plain layout only");
  }
  virtual absl::StatusOr<EvalPiece> Evaluate(const UpFrame& up) = 0;
  // A validation pass is over: the link may close what it opened for it (a worker's Evaluate
  // stream, which would otherwise sit idle until the next pass, and workers end idle sessions:
  // `splitq worker --session-idle-s`). The default does nothing.
  virtual void EndEvaluation() {}
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
  // Returns the bytes the session's caches held on the heap (AQ-SGD), which the caller may give
  // back to the system (malloc_trim) once it holds no lock others wait on.
  virtual int64_t CloseSession(uint64_t session) = 0;
  // One training step of a session. `update` false: a step the server part has applied
  // already (a client that resumed from an older checkpoint): the gradient is computed, the
  // server's weights are not stepped again.
  // INVALID_ARGUMENT: a malformed frame, labels or activation that does not fit the model;
  // FAILED_PRECONDITION: a bit map the session never got; RESOURCE_EXHAUSTED: a frame over
  // the limits; NOT_FOUND: an unknown session; INTERNAL: a non-finite loss.
  // U-shaped: Train answers with the server's output activation and holds the step open;
  // TrainHead finishes it (FAILED_PRECONDITION without an open step of that session and step).
  // Train of another session while one is open: FAILED_PRECONDITION.
  virtual absl::StatusOr<DownFrame> Train(uint64_t session, const UpFrame& up, bool update) = 0;
  virtual absl::StatusOr<DownFrame> TrainHead(uint64_t session, const HeadGradient& head) {
    (void)session, (void)head;
    return absl::UnimplementedError("this server part serves the plain layout only");
  }
  // Several sessions' steps as one server batch (a worker's merged batch; none of them a
  // replay, each of another session): one forward and backward over their activations
  // concatenated, one optimizer update. Returns one result per step, in order; a step whose
  // frame or labels are bad fails alone and the others go on without it. The default computes
  // them one after another with Train (an update each). ServerPart's semantics are in
  // server_part.h.
  virtual std::vector<absl::StatusOr<DownFrame>> TrainMerged(
      const std::vector<std::pair<uint64_t, const UpFrame*>>& steps) {
    std::vector<absl::StatusOr<DownFrame>> out;
    out.reserve(steps.size());
    for (const auto& [session, up] : steps) out.push_back(Train(session, *up, true));
    return out;
  }
  // Worker groups: TrainMerged, with one record per step (opaque bytes without NUL, e.g. the
  // worker's "client, run, step"); the records of the steps that the group's OTHER replicas
  // applied in the same update are appended to `others`, so that every replica knows every
  // step the group applied. The default (no group) is TrainMerged.
  virtual std::vector<absl::StatusOr<DownFrame>> TrainRound(
      const std::vector<std::pair<uint64_t, const UpFrame*>>& steps,
      const std::vector<std::string>& records, std::vector<std::string>* others) {
    (void)records, (void)others;
    return TrainMerged(steps);
  }
  // Whether Train leaves the step open for TrainHead (a U-shaped model).
  virtual bool u_shaped() const { return false; }
  virtual absl::StatusOr<EvalPiece> Evaluate(uint64_t session, const UpFrame& up) = 0;
  // Optimizer steps taken so far, over all sessions.
  virtual int64_t updates() const = 0;
  // The largest serialized frame a client of this run can send (its boundary activation at the
  // largest batch, as fp32, plus headers); 0: no limit of its own. The worker takes no frame
  // announced above it.
  virtual int64_t max_frame_bytes() const { return 0; }
  // A SHA-256 (hex) of the trainable weights: replicas that took the same updates agree.
  // The default: "" (unknown).
  virtual std::string WeightsDigest() const { return ""; }
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

// A ServerLink to a ServerHandler in this process, through one session (`splitq train`,
// tests, benchmarks).
class LocalServerLink : public ServerLink {
 public:
  explicit LocalServerLink(ServerHandler& server)
      : server_(server), session_(server.OpenSession()) {}
  ~LocalServerLink() override { server_.CloseSession(session_); }
  absl::StatusOr<DownFrame> Train(const UpFrame& up) override {
    absl::StatusOr<DownFrame> down = server_.Train(session_, up, true);
    if (tap_ && down.ok()) tap_(up, *down);
    return down;
  }
  absl::StatusOr<DownFrame> TrainHead(const HeadGradient& head) override {
    return server_.TrainHead(session_, head);
  }
  absl::StatusOr<EvalPiece> Evaluate(const UpFrame& up) override {
    return server_.Evaluate(session_, up);
  }
  uint64_t session() const { return session_; }
  // Called with each training step's frames both ways after it succeeded (benchmarks).
  using FrameTap = std::function<void(const UpFrame&, const DownFrame&)>;
  void set_tap(FrameTap tap) { tap_ = std::move(tap); }

 private:
  ServerHandler& server_;
  uint64_t session_;
  FrameTap tap_;
};

}  // namespace splitq::trainer

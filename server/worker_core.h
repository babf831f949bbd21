// splitq server: the worker's handler logic, behind a plain C++ interface (the gRPC Worker
// service of proto/splitq/v1/worker.proto only adapts it: server/worker_service.h). Tests
// drive it directly with a fake ServerHandler.
//
// A session is one client's Train (or Evaluate) stream. It opens with a hello, then carries
// one step at a time: the step's labels, then its activation frame in chunks; when the last
// chunk arrives the step is ready, RunStep computes it and the session expects the next step.
// One frame is in flight per session, so the memory a session holds is bounded by one frame
// (AssemblerLimits::max_frame_bytes) plus its labels.
//
// Ordering across clients: one computation at a time (RunStep and RunSteps hold a compute
// lock), in the order the caller asks. RunStep computes one client's step: one forward,
// backward and optimizer step of the shared server part, what `splitq train` computes for a
// single client. RunSteps computes the ready steps of several sessions as ONE merged server
// batch (ServerHandler::TrainMerged; trainer/server_part.h gives the semantics): one update
// for all of them. The service decides what to merge (server.merge.* in the run config,
// worker_service.h); with merging off every step is its own update, as before 2026-12.
//
// Exactly once with merged batches: each step of a merge is decided on its own, as in RunStep.
// A replay (a step this worker applied already) is computed alone for its gradient, outside
// the merge, and updates nothing; the steps applied are settled (counted as applied for their
// client) only when the merged update is taken, so a replay of a step that sat in a merged
// batch is answered and never applied twice. A merge holds only steps whose frames are complete:
// it never waits for a client, dead or slow. In a worker group (WorkerOptions::rounds) each
// round also settles the steps the OTHER members applied (their records, "CLIENT STEP RUN",
// come back from ServerHandler::TrainRound), so a client that moves here from another member
// replays the steps the group applied instead of applying them twice.
//
// Client restarts: the worker remembers, per client id, the next step it has not applied and
// the run it belongs to (TrainHello.run_id), and keeps both in its checkpoints. A hello with
// another run id than the one remembered starts afresh: a new run under an old client id.
// A client that comes back from an older checkpoint (hello.resume_step below that) gets its
// replayed steps' gradients, but the server's weights are not stepped again for them, so no
// step is counted twice. A hello from a client id that has a session already replaces it
// (the old one is a dead connection that has not been noticed yet).
//
// U-shaped models (handler.u_shaped()): RunStep answers with the server's output activation and
// leaves the step open; the session then takes the client's head loss (AddHeadLoss) and head
// gradient (AddHeadChunk), and RunHead finishes the step. While a step is open its session holds
// the turn (turn()): the server part computes no other session's step or validation batch until
// RunHead or Close (a validation forward would change boundary 2's module state that the open
// step's regulariser reads), so the caller must not run another session's RunStep or
// RunEvaluate meanwhile (FAILED_PRECONDITION; the gRPC service parks those jobs). A client that
// stops between the two holds the turn until its stream ends (keepalive finds a dead one within ~2
// x its period).
//
// Status codes (each with a message): FAILED_PRECONDITION for another protocol version or
// config, a chunk or labels before the hello or of another step, a frame without labels;
// INVALID_ARGUMENT for a bad client id or byte counts that lie; RESOURCE_EXHAUSTED for an
// oversized chunk, frame or label list, or too many sessions; PERMISSION_DENIED for a hello
// under another client's token; NOT_FOUND for an unknown session. A session with an error is
// closed by the service; the others carry on. Every method is safe to call from any thread;
// Open, RunStep, RunEvaluate, Close, SaveCheckpoint and LoadCheckpoint wait for the step being
// computed (the service calls RunStep, RunEvaluate and Close on its compute thread, so gRPC's
// threads wait only in Open, for at most one step or one checkpoint save); stats() never
// waits for it.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/frame_assembler.h"
#include "trainer/split_link.h"

namespace splitq::server {

struct WorkerOptions {
  // Train sessions at once (clients); Evaluate sessions are limited to one per client id apart
  // from that, so a worker holds at most 2 x max_sessions sessions.
  uint32_t max_sessions = 64;
  rpc::AssemblerLimits assembler;         // per session
  int64_t max_labels = int64_t{1} << 22;  // labels (and sample ids) per step
  // Hellos must carry this digest of the run config ("" here or in the hello: not checked).
  std::string config_digest;
  // The handler is one replica of a group (trainer/server_part.h, "Worker groups"): every
  // RunSteps call, with no session or one, is a round of the group, and no update is taken
  // outside rounds (RunStep is only for replays and U-shaped steps, which groups refuse).
  bool rounds = false;
};

// The largest step a session may start at (2^53): far beyond any run, and small enough that
// steps stay exact as int64 and double (a step above it is refused as INVALID_ARGUMENT).
inline constexpr uint64_t kMaxStep = uint64_t{1} << 53;

struct Hello {
  uint32_t protocol_version = 0;
  std::string client_id;
  uint64_t resume_step = 0;  // the first step the session sends, at most kMaxStep
  std::string config_digest;
  bool evaluate = false;  // an Evaluate stream: every frame is a validation batch
  std::string run_id;     // the client's run ("" : unknown, an older client)
};

struct Welcome {
  uint64_t session_id = 0;
  uint64_t expected_step = 0;
  // The client's first step that the server part has not applied, when this worker knows the
  // client (-1: it does not, e.g. a client moved here from another worker). Above
  // expected_step: the steps in between are replays, answered but not applied again. Below
  // it: the steps in between were lost with the worker's state (it restarted from an older
  // checkpoint); they are not sent again.
  int64_t next_applied = -1;
  // The worker knew this client id from another run (another run_id): that run's progress was
  // dropped, and this run's steps are all applied.
  bool new_run = false;
  // Sessions of the same client id and kind that this one replaced (already closed in the
  // core): the service ends their streams, which may still hold a read message.
  std::vector<uint64_t> replaced;
};

struct WorkerStats {
  uint32_t sessions = 0;        // Train and Evaluate sessions
  uint32_t train_sessions = 0;  // Train sessions (clients attached)
  int64_t steps_served = 0;     // training steps answered (replays included)
  int64_t updates = 0;          // optimizer steps of the server part
  // Steps applied to the server part by this process (replays excluded), and the updates this
  // process took (those restored from a checkpoint excluded): steps_applied / updates_here is
  // the mean number of clients merged per update (1 without merging).
  int64_t steps_applied = 0;
  int64_t updates_here = 0;
  // Worker groups: steps the group applied in the rounds this process took part in (its own
  // and the other members', from the rounds' records), and the sum over the clients this
  // worker knows of their first step not applied (with each client's steps applied once and
  // none lost, the sum of the clients' steps).
  int64_t group_steps_applied = 0;
  int64_t clients_next_sum = 0;
};

class WorkerCore {
 public:
  WorkerCore(trainer::ServerHandler& handler, const WorkerOptions& options = {});
  ~WorkerCore();

  // `authenticated_id`: the client id of the caller's bearer token ("" when tokens are off).
  absl::StatusOr<Welcome> Open(const Hello& hello, const std::string& authenticated_id);
  // The labels (and sample ids) of the step in flight, before its frame's last chunk.
  absl::Status AddLabels(uint64_t session, uint64_t step, std::vector<int32_t> labels,
                         std::vector<int64_t> sample_ids);
  // One chunk of the step's activation frame. True when it completed the frame: call RunStep
  // (or RunEvaluate) next.
  absl::StatusOr<bool> AddChunk(uint64_t session, const rpc::Chunk& chunk);
  // Computes the completed step and advances the session to the next one (U-shaped: opens it).
  absl::StatusOr<trainer::DownFrame> RunStep(uint64_t session);
  // The completed steps of `sessions` as one merged batch (see the top); one result each, in
  // order: a session without a complete frame, or whose frame is bad, fails alone. Two
  // sessions of one client id (an old one not closed yet): the later goes alone, after. A
  // U-shaped handler takes one session at a time (FAILED_PRECONDITION for more).
  std::vector<absl::StatusOr<trainer::DownFrame>> RunSteps(const std::vector<uint64_t>& sessions);
  // Labels of the session's complete frame (0: none complete): the targets it adds to a merge.
  int64_t ready_targets(uint64_t session) const;
  bool u_shaped() const { return handler_.u_shaped(); }
  // U-shaped: the head loss, then the chunks of the head gradient of the open step; true when
  // the frame is complete: call RunHead next, which finishes the step.
  absl::Status AddHeadLoss(uint64_t session, uint64_t step, double loss);
  absl::StatusOr<bool> AddHeadChunk(uint64_t session, const rpc::Chunk& chunk);
  absl::StatusOr<trainer::DownFrame> RunHead(uint64_t session);
  // The session whose U-shaped step is open (0: none).
  uint64_t turn() const;
  // Called (outside the core's locks, from the thread that freed it) each time the turn is
  // freed. Set before serving.
  void set_turn_listener(std::function<void()> listener) { turn_listener_ = std::move(listener); }
  absl::StatusOr<trainer::EvalPiece> RunEvaluate(uint64_t session);
  // Frees the session (a no-op for an unknown one).
  void Close(uint64_t session);

  // Worker checkpoints (`splitq worker --out`): the handler's state plus, per client id, the
  // first step not yet applied, so replays after a restart are still applied once. Saving
  // waits for the step being computed and returns the updates it saved. Loading is for a
  // worker that serves nobody yet (FAILED_PRECONDITION otherwise, and for a damaged progress
  // list); it returns the number of clients whose progress it restored. Other errors as
  // ServerHandler::SaveCheckpoint / LoadCheckpoint.
  // `serving`: a group member taking the group's state between rounds (WorkerOptions::rounds;
  // its sessions stay).
  absl::StatusOr<int64_t> SaveCheckpoint(const std::string& path);
  absl::StatusOr<size_t> LoadCheckpoint(const std::string& path, bool serving = false);

  WorkerStats stats() const;
  // The server part's weights digest (ServerHandler::WeightsDigest); waits for the step being
  // computed.
  std::string weights_digest() const;
  // Bytes held by sessions' partial frames and labels now.
  int64_t buffered_bytes() const;

 private:
  struct Session;
  absl::StatusOr<Session*> Find(uint64_t session);
  absl::StatusOr<trainer::UpFrame> TakeReady(uint64_t session, bool evaluate, uint64_t* handler_id,
                                             std::string* client_id, std::string* run_id);
  // Records that `client_id`'s step `step` is done (applied when `update`); under compute_.
  void Settle(const std::string& client_id, const std::string& run_id, int64_t step, bool update);
  // Records a step that another member of the group applied (a round's record).
  void SettleOther(const std::string& record);
  // Whether `client_id`'s step `step` is new to the server part (not a replay).
  bool WillUpdate(const std::string& client_id, const std::string& run_id, int64_t step) const;

  trainer::ServerHandler& handler_;
  WorkerOptions options_;
  mutable std::mutex mutex_;    // sessions_, next_applied_, counters
  mutable std::mutex compute_;  // handler_ (one step at a time)
  std::map<uint64_t, std::unique_ptr<Session>> sessions_;
  uint64_t turn_ = 0;  // under mutex_
  std::function<void()> turn_listener_;
  void FreeTurn(uint64_t session);
  struct Progress {
    uint64_t next = 0;   // the first step not yet applied
    std::string run_id;  // the run that applied them ("" : unknown)
  };
  std::map<std::string, Progress> next_applied_;  // by client id
  uint64_t next_id_ = 1;
  int64_t steps_served_ = 0;
  int64_t steps_applied_ = 0;
  int64_t group_steps_applied_ = 0;
  int64_t loaded_updates_ = 0;  // under mutex_: updates at construction or LoadCheckpoint
  // handler_.updates(), mirrored so that stats() (the heartbeat) never waits for compute_.
  std::atomic<int64_t> updates_{0};
};

}  // namespace splitq::server

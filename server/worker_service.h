// splitq server: the gRPC Worker service (proto/splitq/v1/worker.proto), callback API. It only
// adapts WorkerCore (worker_core.h): it checks the caller's bearer token, turns messages into
// core calls and statuses into stream endings, and writes the replies.
//
// Threads: gRPC's callback threads only read, reassemble and write; they never compute. When a
// frame is complete the step goes to one compute thread (the steps of all sessions, one
// computation at a time: WorkerCore's ordering).
//
// Merged batches (MergeOptions, the run config's server.merge.*; plain layout only): a
// complete training frame joins a queue of ready steps instead. The compute thread takes the
// queue's front steps, up to max_clients sessions and max_targets labels (the first step always
// fits), and computes them as one merged batch (WorkerCore::RunSteps). With window_ms > 0 it
// first waits until max_clients steps are ready or the oldest has waited window_ms, whichever
// comes first; with 0 it merges what is ready when it gets to it (steps that queued while it
// computed the previous batch). Only complete frames are queued, so a merge never waits for a
// client that stopped sending. U-shaped: while one session's step is open (its
// turn, worker_core.h), other sessions' steps are parked and posted again when the turn is
// freed. A session reads nothing more until its step's reply
// is written, so one frame is in flight per session and HTTP/2 flow control holds the client
// back; the compute queue holds at most one job per session.
//
// Errors end only the session that caused them, with the core's status code and message.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>

#include "base/metrics.h"
#include "server/connection_guard.h"
#include "server/keyed_slots.h"
#include "server/tokens.h"
#include "server/worker_core.h"
#include "splitq/v1/worker.grpc.pb.h"

namespace splitq::server {

// Runs posted jobs one at a time, in order, on its own thread.
class SerialExecutor {
 public:
  SerialExecutor();
  ~SerialExecutor();  // runs the jobs already posted, then joins
  void Post(std::function<void()> job);

 private:
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> jobs_;
  bool stopping_ = false;
  std::thread thread_;
};

// How a worker merges its clients' steps (the run config's server.merge.*).
struct MergeOptions {
  int64_t max_clients = 1;  // sessions per merged batch (1: no merging)
  int64_t max_targets = 0;  // labels per merged batch (0: no limit)
  double window_ms = 0;     // how long the oldest ready step may wait for others
  // Worker groups (WorkerOptions::rounds): the compute thread runs rounds without end, one
  // every idle_round_ms at most when no step is ready, so that other replicas' rounds find it.
  bool rounds = false;
  double idle_round_ms = 2;
  // Rounds: called on the compute thread before each round, with a flag that turns true when
  // the service is being destroyed. It may block (a group forming); false: no round (the
  // worker is stopping), and the ready steps fail with UNAVAILABLE (their clients send them
  // again, elsewhere). May be empty.
  std::function<bool(const std::atomic<bool>& closing)> before_round;
};

struct WorkerServiceOptions {
  MergeOptions merge;
  int64_t reply_chunk_bytes = 1 << 20;  // gradient frames go back in chunks of this size
                                        // (clamped to 1 KiB .. 4 MiB)
  // A session that has waited this long for the client's next message (after its hello) is
  // ended with DEADLINE_EXCEEDED; the client reconnects and resumes. It bounds how long an
  // unfinished message can hold the worker's memory (gRPC 1.51 lets a message in as far as
  // its prefix announces). 0: never. `splitq worker --session-idle-s`. The default, 5
  // minutes, is far above a client's pause between steps (seconds on a slow machine).
  int64_t session_idle_ms = 300000;
  // U-shaped layouts: a session whose step holds the server part (its turn: the worker has sent
  // the server's output and waits for the head loss and gradient, while every other client's
  // steps wait) and that has waited this long for the client's next message is ended the same
  // way, and its step abandoned, so that one client, stalled or hostile, holds the others up
  // for at most this long a step (it took up to session_idle_ms before). 0: only
  // session_idle_ms. `splitq worker --turn-idle-s`. The default, 30 s, is far above a head's
  // forward and backward on a slow machine.
  int64_t turn_idle_ms = 30000;
  // Called (from gRPC's threads) with one line when a session opens and when it ends (with
  // its status, or "the client disconnected"). May be empty.
  std::function<void(const std::string&)> log;
  // Hears of every authenticated session (connection_guard.h). May be null.
  ConnectionGuard* guard = nullptr;
  // Live numbers (base/metrics.h; `splitq worker --metrics-listen`): frames and bytes each way,
  // steps answered and failed by status code, the server's latency per step. May be null.
  base::Registry* metrics = nullptr;
};

// Both methods take raw messages (protobuf's wire format as ByteBuffers): frame chunks are
// decoded and encoded without copies (chunk_codec.h), everything else goes through the
// generated classes. A message that does not parse ends its session with INVALID_ARGUMENT.
//
// A stream is refused at its headers without a valid token (nothing of it is read). With
// tokens, at most kMaxOpeningPerToken streams of one token may be waiting for their hello at
// once (more: RESOURCE_EXHAUSTED, which clients retry as a full worker): gRPC reads a whole
// message (up to the frame chunk limit) for each of them, and one client token opened 800 such
// streams and held 3.4 GB of a worker in the third outside probe. gRPC 1.51 lets a read
// message in as far as its 5-byte prefix announces (its size limit is checked once the message
// is whole), so an unfinished hello may hold more than that limit; a stream whose hello has not
// arrived whole kHelloReadDeadlineMs after its headers is cancelled (the client sees
// CANCELLED). After its hello a stream is a session: one Train and one Evaluate session per
// client id (a newer hello ends the older). gRPC does not tell when a later message has begun,
// so a session's later messages have no deadline of their own; instead a session that has
// waited WorkerServiceOptions::session_idle_ms for its next message is ended
// (DEADLINE_EXCEEDED), which bounds how long an unfinished message holds what it announces.
class WorkerService final
    : public splitq::v1::Worker::WithRawCallbackMethod_Train<
          splitq::v1::Worker::WithRawCallbackMethod_Evaluate<splitq::v1::Worker::Service>> {
 public:
  static constexpr int kMaxOpeningPerToken = 4;
  // A hello is a few hundred bytes, sent as the stream opens; 10 s leaves room for a slow link.
  static constexpr int kHelloReadDeadlineMs = 10000;
  // `tokens`: every caller must present one (null: no check, for tests and trusted networks).
  WorkerService(WorkerCore& core, const TokenSet* tokens, const WorkerServiceOptions& options = {});
  ~WorkerService() override;

  // Tests: the hello read deadline of streams that start after this (milliseconds, > 0).
  void set_hello_read_deadline_ms(int ms) { hello_read_deadline_ms_ = ms; }
  // Tests: WorkerServiceOptions::session_idle_ms from now on (milliseconds, 0: never).
  void set_session_idle_ms(int64_t ms) {
    session_idle_ms_ = ms;
    idle_wake_.notify_all();
  }
  // Tests: WorkerServiceOptions::turn_idle_ms from now on (milliseconds, 0: none).
  void set_turn_idle_ms(int64_t ms) {
    turn_idle_ms_ = ms;
    idle_wake_.notify_all();
  }

  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* Train(
      grpc::CallbackServerContext* context) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* Evaluate(
      grpc::CallbackServerContext* context) override;

 private:
  template <typename Request, typename Reply, bool kEvaluate>
  friend class SessionReactor;

  // Runs `job` on the compute thread now, or parks it while another session holds the turn.
  // True when it was parked.
  bool ParkIfNotTurn(uint64_t session, std::function<void()> job);
  void Unpark();

  // Merged batches: whether complete training frames go to the ready queue.
  bool merging() const {
    return options_.merge.rounds || (options_.merge.max_clients > 1 && !core_.u_shaped());
  }
  // Worker groups: starts the endless rounds (the constructor calls it).
  void StartRounds();
  struct ReadyStep {
    uint64_t session = 0;
    std::chrono::steady_clock::time_point since;
    std::function<void(absl::StatusOr<trainer::DownFrame>)> deliver;  // on the compute thread
  };
  void EnqueueReady(ReadyStep step);
  void MergeReady();  // on the compute thread

  // The streams of open sessions, so that a hello that replaces a session (same client id and
  // kind) can end the old stream: until it ends, gRPC keeps its last message (up to a frame
  // chunk) and its buffers. `end` runs under live_mutex_ and takes the stream's own lock.
  // `reading_since_ms` (steady clock, 0: not waiting for a message) lives as long as the
  // entry; the idle watch ends sessions that have waited session_idle_ms.
  struct Live {
    std::function<void(const absl::Status&)> end;
    const std::atomic<int64_t>* reading_since_ms = nullptr;
  };
  void AddLive(uint64_t session, Live live);
  void RemoveLive(uint64_t session);
  void EndReplaced(const std::vector<uint64_t>& sessions, const absl::Status& status);
  // The idle watch (a thread): every quarter of the limit (at most 1 s) it ends the live
  // sessions that have waited longer than session_idle_ms_ for a message, and the session
  // holding the U-shaped turn once it has waited turn_idle_ms_.
  void WatchIdle();
  void EndIdle(int64_t idle_ms, int64_t turn_ms);

  WorkerCore& core_;
  const TokenSet* tokens_;
  WorkerServiceOptions options_;
  std::mutex parked_mutex_;
  std::deque<std::function<void()>> parked_;
  std::mutex merge_mutex_;
  std::condition_variable merge_wake_;
  std::deque<ReadyStep> ready_;       // under merge_mutex_
  bool merge_posted_ = false;         // a MergeReady job is posted or running
  bool stopping_ = false;             // under merge_mutex_: the service is going (rounds end)
  std::atomic<bool> closing_{false};  // the same, for MergeOptions::before_round
  std::mutex live_mutex_;
  std::unordered_map<uint64_t, Live> live_;
  // Streams waiting for their hello, per token id (tokens on only).
  KeyedSlots opening_{kMaxOpeningPerToken};
  std::atomic<int> hello_read_deadline_ms_{kHelloReadDeadlineMs};
  std::atomic<int64_t> session_idle_ms_{0};
  std::atomic<int64_t> turn_idle_ms_{0};
  std::mutex idle_mutex_;
  std::condition_variable idle_wake_;
  bool idle_stop_ = false;  // under idle_mutex_
  std::thread idle_thread_;
  // The metrics this service updates (null without WorkerServiceOptions::metrics).
  struct Metrics;
  std::unique_ptr<Metrics> metrics_;
  SerialExecutor compute_;
};

}  // namespace splitq::server

// splitq client: one client's whole run against a cluster, as a library (`splitq client` parses
// flags and calls RunClientSession; tests drive the pieces against fakes).
//
//   RunId              the client's run id, kept in its --out folder (the same across restarts)
//   ReconnectingLink   a trainer::ServerLink to whichever worker the coordinator assigns:
//                      registration (retried while the coordinator is unreachable), assignment,
//                      and after a failure reconnection with backoff (0.2 s doubling to 5 s,
//                      jittered) until --reconnect-timeout; a worker that refused the client as
//                      full, or could not be reached, is named to the coordinator as
//                      unreachable so that it picks another
//   RunClientSession   connect, train with the driver of `splitq train` (trainer/train_loop.h)
//                      through ClientRunner (trainer/step.h) while a heartbeat thread reports
//                      the step count, then say goodbye
//
// Failover and resume: the step in flight is sent again on the new session (AQ-SGD: recomputed,
// client_part.h); a client started on an --out with a checkpoint resumes from it, and the worker
// does not apply replayed steps twice (server/worker_core.h).
//
// Moves: in a worker group the coordinator may move a client to a member with fewer clients
// (server/coordinator_core.h, Rebalancing). The heartbeat thread hears it; the link finishes
// the step in flight, then reconnects through Assign before the next step's first frame.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "client/coordinator_client.h"
#include "client/worker_client.h"
#include "proto/rpc_channel.h"
#include "trainer/client_part.h"
#include "trainer/split_link.h"
#include "trainer/train_loop.h"

namespace splitq::client {

// DIR/run_id, made (16 random hex digits) on the first start on DIR: the same across restarts on
// DIR (the worker then takes replayed steps as replays), new for a new DIR (the worker then
// applies every step, even under a client id it knows from an earlier run). FAILED_PRECONDITION
// when the file holds something else.
absl::StatusOr<std::string> RunId(const std::string& dir);

struct ClientSessionOptions {
  std::string id;           // this client's id, as registered
  std::string coordinator;  // HOST:PORT
  rpc::TransportSecurity security;
  WorkerLinkOptions link;                     // client_id, token, config digest, run id, chunk size
  std::chrono::seconds connect_timeout{120};  // to reach the coordinator and a worker at first
  std::chrono::seconds reconnect_timeout{300};  // without progress after a failure
  // Set (e.g. by a signal handler) to stop: connecting stops, training stops at the end of the
  // step with a checkpoint (trainer::TrainOptions::interrupt). May be null.
  const std::atomic<bool>* interrupt = nullptr;
  // One line of news (reconnects, retries, heartbeat trouble), without the id. May be empty.
  std::function<void(const std::string&)> log;
};

class ReconnectingLink : public trainer::ServerLink {
 public:
  ReconnectingLink(CoordinatorClient& coordinator, ClientSessionOptions options);

  // Registers (retrying while the coordinator is unreachable) and connects to a worker
  // (retrying while none is available), for at most `timeout`. CANCELLED when interrupted.
  absl::Status Connect(std::chrono::seconds timeout);

  absl::StatusOr<trainer::DownFrame> Train(const trainer::UpFrame& up) override;
  absl::StatusOr<trainer::DownFrame> TrainHead(const trainer::HeadGradient& head) override;
  absl::StatusOr<trainer::EvalPiece> Evaluate(const trainer::UpFrame& up) override;
  void EndEvaluation() override;
  // Failures in a row back off (as Connect) until a call succeeds; after reconnect_timeout
  // without one, UNAVAILABLE naming the last error. Errors other than transient ones and
  // NOT_FOUND (an unknown session) are returned as they are.
  absl::Status Recover(const absl::Status& error) override;

  // ALREADY_EXISTS (the id is registered and alive: a previous run of this client that the
  // coordinator has not yet seen die, or a concurrent re-registration) comes back as
  // UNAVAILABLE, to be retried. Thread-safe against the link's own calls (the heartbeat thread
  // registers again through it).
  absl::StatusOr<uint64_t> Register();
  uint64_t member_id() const { return member_id_.load(); }
  // The heartbeat period of the coordinator's last answer to Register.
  std::chrono::milliseconds heartbeat_period() const {
    return std::chrono::milliseconds(heartbeat_ms_.load());
  }
  // "NAME at HOST:PORT" of the worker now.
  const std::string& worker() const { return worker_; }
  // The assignment_id of the coordinator's answer the link trains under (0: none yet).
  uint64_t assignment_id() const { return assignment_id_.load(); }
  // The coordinator assigned this client elsewhere (a heartbeat's `move`, naming the
  // assignment it was sent with; ignored when the link has reconnected since). The next Train
  // fails with ABORTED before it sends anything, and Recover then moves to the new worker at
  // once (no backoff, not counted as a failure); the caller resends the step on the new
  // session, as after any reconnect. Thread-safe (the heartbeat thread calls it).
  void RequestMove(uint64_t assignment_id) {
    std::lock_guard<std::mutex> lock(move_mutex_);  // not between ConnectOnce's two stores
    if (assignment_id != 0 && assignment_id == assignment_id_.load()) move_.store(true);
  }
  // Moves made for RequestMove, over this link's life.
  int moves() const { return moves_; }
  // The ranges first..last of this client's steps that workers said they had not applied
  // (their welcome's next_applied), in the order they were told, over this link's life.
  std::vector<std::pair<int64_t, int64_t>> lost_steps() const {
    std::lock_guard<std::mutex> lock(lost_mutex_);
    return lost_;
  }
  void Close();

 private:
  absl::Status ConnectOnce();
  bool interrupted() const { return options_.interrupt != nullptr && options_.interrupt->load(); }
  void Log(const std::string& line) const {
    if (options_.log) options_.log(line);
  }
  template <typename T>
  absl::StatusOr<T> Succeeded(absl::StatusOr<T> result) {
    if (result.ok()) failures_ = 0;
    return result;
  }

  CoordinatorClient& coordinator_;
  ClientSessionOptions options_;
  int failures_ = 0;
  std::chrono::steady_clock::time_point failing_since_;
  std::unique_ptr<WorkerClient> link_;
  std::atomic<uint64_t> member_id_{0};
  std::atomic<int64_t> heartbeat_ms_{1000};
  std::string worker_;
  std::atomic<uint64_t> assignment_id_{0};
  std::atomic<bool> move_{false};  // RequestMove
  std::mutex move_mutex_;          // assignment_id_ and move_ change together
  bool moving_ = false;            // Train refused a step for a move: Recover makes it
  int moves_ = 0;
  std::string assigned_;     // the worker's name
  std::string unreachable_;  // a worker we could not reach, or that was full: avoid it
  mutable std::mutex lost_mutex_;
  std::vector<std::pair<int64_t, int64_t>> lost_;  // lost_steps()
};

// What RunClientSession reports besides the summary.
struct SessionEvents {
  // Once connected, before the first step: the worker ("NAME at HOST:PORT").
  std::function<void(const std::string& worker)> connected;
};

// Connects (options.connect_timeout), trains `part` to the end of the run with `train`'s
// driver options (out dir, resume, progress), heartbeats meanwhile, and leaves the coordinator.
// Errors: the connect error (CANCELLED when interrupted while connecting), or the driver's
// (CANCELLED after an interrupt, with the checkpoint saved).
absl::StatusOr<trainer::TrainSummary> RunClientSession(trainer::ClientPart& part,
                                                       const ClientSessionOptions& options,
                                                       const trainer::TrainOptions& train,
                                                       const SessionEvents& events = {});

}  // namespace splitq::client

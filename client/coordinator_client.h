// splitq server: the client side of the Coordinator service (proto/splitq/v1/coordinator.proto),
// for workers and clients: register, get a worker assigned, heartbeat, leave; for the workers
// of a group, the group's view. Sync gRPC calls, each with a deadline (`call_timeout`).
//
// Heartbeater sends a heartbeat every period from its own thread; when the coordinator no
// longer knows the member (it was marked dead, or the coordinator restarted), it registers again
// through the callback given, so a member survives a coordinator restart.
#pragma once

#include <grpcpp/channel.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "proto/protocol.h"
#include "splitq/v1/coordinator.grpc.pb.h"

namespace splitq::client {

struct Registration {
  uint64_t member_id = 0;
  std::chrono::milliseconds heartbeat_period{1000};
  std::chrono::milliseconds heartbeat_deadline{2000};
  std::string config_yaml;  // the coordinator's run config
};

class CoordinatorClient {
 public:
  CoordinatorClient(std::shared_ptr<grpc::Channel> channel, std::string token,
                    std::chrono::milliseconds call_timeout = std::chrono::milliseconds(5000));

  // Errors one to one from the coordinator (coordinator_core.h), UNAVAILABLE when it cannot be
  // reached, DEADLINE_EXCEEDED after call_timeout.
  absl::StatusOr<Registration> Register(rpc::Role role, const std::string& name,
                                        const rpc::WorkerAddress& endpoint = {},
                                        uint32_t max_sessions = 0,
                                        const rpc::WorkerAddress& group_store = {});
  // `unreachable`: a worker this client could not reach ("" for none; coordinator_core.h).
  absl::StatusOr<rpc::Assignment> Assign(uint64_t member_id, const std::string& unreachable = "");
  struct Beat {
    bool known = true;  // false: the coordinator does not know the member any more (register)
    bool move = false;  // a client assigned elsewhere since `assignment_id` (Assign again)
  };
  // `assignment_id`: a client's assignment as it trains under it (0: ask for no moves).
  // `generation`: a group worker's last generation formed (0: none).
  absl::StatusOr<Beat> Heartbeat(uint64_t member_id, uint64_t step, uint32_t sessions = 0,
                                 uint64_t assignment_id = 0, int64_t generation = 0);
  absl::Status Leave(uint64_t member_id);
  // Worker groups: this member's view (coordinator_core.h, Group).
  absl::StatusOr<rpc::GroupView> Group(uint64_t member_id, int64_t failed_generation = 0);

 private:
  std::unique_ptr<grpc::ClientContext> Context() const;

  std::unique_ptr<splitq::v1::Coordinator::Stub> stub_;
  std::string token_;
  std::chrono::milliseconds call_timeout_;
};

class Heartbeater {
 public:
  struct Progress {
    uint64_t step = 0;
    uint32_t sessions = 0;
    uint64_t assignment_id = 0;  // clients: the assignment trained under (0: none)
    int64_t generation = 0;      // group workers: the last generation formed (0: none)
  };
  // `progress` is called on the heartbeat thread; `reregister` when the member is unknown (it
  // returns the new member id, or an error to try again next period); `log` (may be empty)
  // with a line when heartbeats start failing (the first error of a run of failures) and when
  // they get through again, not for every failed beat; `move` (may be empty) after every beat
  // whose answer says the client was assigned elsewhere, with the assignment_id that beat
  // named. `period` is at least 10 ms.
  Heartbeater(CoordinatorClient& client, uint64_t member_id, std::chrono::milliseconds period,
              std::function<Progress()> progress,
              std::function<absl::StatusOr<uint64_t>()> reregister,
              std::function<void(const std::string&)> log = {},
              std::function<void(uint64_t assignment_id)> move = {});
  ~Heartbeater();  // stops the thread (a beat in flight finishes first)

  uint64_t member_id() const { return member_id_.load(); }

 private:
  std::atomic<uint64_t> member_id_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::thread thread_;
};

// Retries `attempt` with exponential backoff (from `first`, doubling up to `cap`, with jitter)
// while it fails with a status for which `retry` is true and `timeout` has not passed. Calls
// `on_retry` (may be empty) before each wait.
absl::Status RetryWithBackoff(
    const std::function<absl::Status()>& attempt,
    const std::function<bool(const absl::Status&)>& retry, std::chrono::milliseconds timeout,
    const std::function<void(const absl::Status&, std::chrono::milliseconds)>& on_retry = {},
    std::chrono::milliseconds first = std::chrono::milliseconds(200),
    std::chrono::milliseconds cap = std::chrono::milliseconds(5000));

// UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, ABORTED, UNKNOWN: a network or peer failure
// worth retrying after a reconnect. Also RESOURCE_EXHAUSTED when gRPC made it from a stream
// reset ("Received RST_STREAM with error code 11", ENHANCE_YOUR_CALM: a server under its memory
// quota cancels streams, legitimate ones included), not when the peer's service refused.
bool IsTransient(const absl::Status& status);

}  // namespace splitq::client

// splitq server: the coordinator's handler logic, behind a plain C++ interface (the gRPC
// Coordinator service of proto/splitq/v1/coordinator.proto only adapts it). Tests drive it
// directly with made-up clocks.
//
// It keeps the registry of workers and clients:
// - Register: a worker or client joins under a unique name. A name that is registered and
//   alive is ALREADY_EXISTS. A dead or departed name may come back; a client keeps its
//   progress (resume step) across that.
// - Assign: a client gets the live worker with the fewest clients that has room (ties: the
//   earlier registration). A worker's clients are the more of those assigned to it here and
//   those it reported in its last heartbeat (after a coordinator restart its clients keep
//   training on it without being assigned again). UNAVAILABLE when none has room. A client assigned
//   already gets its worker again while that worker lives, unless it names that worker as
//   unreachable and another live worker has room.
// - Heartbeat: liveness, and progress (a client's steps completed; its resume step after a
//   restart). NOT_FOUND for a member that is not registered or was marked dead: it must
//   register again.
// - Expire(now): every member silent for longer than heartbeat_deadline is marked dead. A dead
//   worker's clients lose their assignment (their next Assign moves them to a live worker);
//   a dead client's slot on its worker is freed.
// - Leave: a clean goodbye (as dead, without waiting for the deadline).
// - Worker groups (a worker registered with a group store, `splitq worker --group-size`): the
//   live group workers form one data-parallel group (trainer/replica_group.h), ranked by
//   registration order. Group answers a member's view: the generation, its rank, the world and
//   rank 0's store. The generation changes whenever membership does (a group worker registers,
//   leaves or is marked dead) and when a member reports the current generation failed
//   (Group's failed_generation) and two heartbeat deadlines have passed since the first such
//   report without another change (a member that is alive but stuck in a collective). It never
//   repeats, across coordinator restarts too (a random 20-bit epoch above bit 32, exact as a
//   double). A coordinator takes workers of one kind: a group worker is refused while a worker
//   on its own is alive, and the other way round (FAILED_PRECONDITION).
// Every method is safe to call from several threads.
//
// Identity: each method takes `caller`, the id of the caller's bearer token ("" when tokens are
// off). With tokens, a member registers only under its own token's id, and only that token may
// assign, heartbeat or leave for it (PERMISSION_DENIED otherwise). Tokens carry no role: any
// token holder may register as a worker under its own id (with TLS its clients still check
// the worker's certificate).
//
// Member ids are unique across coordinator restarts (a random 31-bit epoch in the high 32 bits,
// a counter below), so a member that still holds an id from before a restart gets NOT_FOUND and
// registers again instead of landing on another member's record. A name that registers again
// replaces its dead record, so the registry holds one record per name.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/protocol.h"

namespace splitq::server {

using Clock = std::chrono::steady_clock;

using rpc::Assignment;
using rpc::IsValidMemberName;
using rpc::kProtocolVersion;
using rpc::Role;
using rpc::WorkerAddress;

struct CoordinatorOptions {
  std::chrono::milliseconds heartbeat_period{1000};
  // Silent longer than this: dead. Two periods by default, so one lost heartbeat is tolerated.
  std::chrono::milliseconds heartbeat_deadline{2000};
  uint32_t default_max_sessions = 64;  // a worker's clients when it names no limit
};

struct MemberView {
  Role role = Role::kClient;
  std::string name;
  bool alive = false;
  uint64_t step = 0;
  std::chrono::milliseconds since_heartbeat{0};
  std::string worker_name;  // clients: their worker ("" when unassigned)
  uint32_t clients = 0;     // workers: clients assigned now
};

class CoordinatorCore {
 public:
  explicit CoordinatorCore(const CoordinatorOptions& options = {});

  // Returns the member id. FAILED_PRECONDITION for another protocol version,
  // INVALID_ARGUMENT for a bad name or a worker without an endpoint, ALREADY_EXISTS for a
  // live duplicate name.
  absl::StatusOr<uint64_t> Register(Role role, const std::string& name, uint32_t protocol_version,
                                    const WorkerAddress& endpoint, uint32_t max_sessions,
                                    Clock::time_point now, const std::string& caller = "",
                                    const WorkerAddress& group_store = {});
  // `unreachable`: a worker the client could not reach ("" for none).
  absl::StatusOr<Assignment> Assign(uint64_t member_id, Clock::time_point now,
                                    const std::string& caller = "",
                                    const std::string& unreachable = "");
  // `sessions`: a worker's Train sessions now (its clients as it sees them; 0 from clients).
  absl::Status Heartbeat(uint64_t member_id, uint64_t step, Clock::time_point now,
                         const std::string& caller = "", uint32_t sessions = 0);
  absl::Status Leave(uint64_t member_id, const std::string& caller = "");
  // The group view of worker `member_id` (NOT_FOUND for one that is not a live group member).
  // failed_generation (0: none): the caller could not form or use that generation.
  absl::StatusOr<rpc::GroupView> Group(uint64_t member_id, int64_t failed_generation,
                                       Clock::time_point now, const std::string& caller = "");
  // Marks the silent dead; returns their names.
  std::vector<std::string> Expire(Clock::time_point now);
  std::vector<MemberView> Status(Clock::time_point now) const;
  const CoordinatorOptions& options() const { return options_; }

 private:
  struct Member {
    Role role = Role::kClient;
    std::string name;
    bool alive = true;
    WorkerAddress endpoint;
    uint32_t max_sessions = 0;
    uint64_t step = 0;
    Clock::time_point last_heartbeat;
    std::string worker_name;  // clients
    uint64_t assignment_id = 0;
    uint32_t reported_sessions = 0;  // workers: Train sessions in the last heartbeat
    WorkerAddress group_store;       // group workers: their store (host empty: not in a group)
  };
  // The live member `member_id`: NOT_FOUND when there is none, PERMISSION_DENIED when `caller`
  // (not "") is not its name.
  absl::StatusOr<Member*> Find(uint64_t member_id, const std::string& caller);
  Member* LiveWorker(const std::string& name);
  uint32_t ClientsOf(const std::string& worker_name) const;
  void MarkDead(Member& member);
  // Worker groups: a new generation (membership changed, or the current one failed).
  void NextGeneration();

  CoordinatorOptions options_;
  mutable std::mutex mutex_;
  std::map<uint64_t, Member> members_;               // by member id, in registration order
  std::map<std::string, uint64_t> client_progress_;  // client name -> steps completed
  uint64_t next_member_id_;                          // epoch << 32 | counter
  uint64_t next_assignment_id_ = 1;
  // Worker groups: the live group workers by member id (= registration order: ranks).
  std::vector<uint64_t> group_;
  int64_t generation_;
  Clock::time_point failed_since_;  // the first report that generation_ failed
  bool failed_reported_ = false;
};

}  // namespace splitq::server

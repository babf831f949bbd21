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
// - Rebalancing (worker groups only, CoordinatorOptions::rebalance_groups): a client's
//   heartbeat may move it. When its worker has at least two clients assigned more than the load
//   of the least loaded live worker with room (a member that joined, or came back, starts
//   empty), the client is assigned to that worker at once (so the next heartbeat sees the new
//   loads: one client moves per heartbeat, and the assigned counts end at most one apart).
//   A client moves only to a member that has formed the current generation (it says so in its
//   heartbeat): before that, its records of the clients' steps are its own, not the group's.
//   Only a client that names its current assignment_id in the heartbeat is moved; it hears
//   `move` in every heartbeat until it Assigns again, so a lost reply loses no move. A client
//   is never moved to the worker it last named unreachable in Assign. Workers on
//   their own never move clients: each holds its own server part, and a moved client would continue
//   against another model.
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
// assign, heartbeat or leave for it (PERMISSION_DENIED otherwise). Token roles (a worker token
// to register a worker) are checked by the service (coordinator_service.h), not here.
//
// Member ids are unique across coordinator restarts (a random 31-bit epoch in the high 32 bits,
// a counter below), so a member that still holds an id from before a restart gets NOT_FOUND and
// registers again instead of landing on another member's record. A name that registers again
// replaces its dead record, so the registry holds one record per name. A dead or departed
// record (and with it a client's progress) is removed `forget_after` after its death.
//
// Cost (issue 21; `splitq bench coordinator` measures it): Heartbeat, Leave and Group are
// O(log n) in the members n; Register is O(log n) (O(workers) only to name the worker in the
// refusal of a mixed group); Assign is O(log workers) when it picks a worker (live workers with
// room are kept ordered by load); Expire costs O(log n) per member it marks dead or forgets
// plus one per heartbeat received since the last call (a queue in arrival order, not a scan),
// kExpireChunk entries per hold of the lock; Status copies at most kStatusChunk members per
// hold. One mutex guards it all (the registry's share of a call is well under a microsecond
// beside gRPC's tens: `splitq bench coordinator`, rows "core").
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/protocol.h"

namespace splitq::server {

using Clock = std::chrono::steady_clock;

using rpc::Assignment;
using rpc::IsValidHost;
using rpc::IsValidMemberName;
using rpc::kProtocolVersion;
using rpc::Role;
using rpc::WorkerAddress;

struct CoordinatorOptions {
  std::chrono::milliseconds heartbeat_period{1000};
  // Silent longer than this: dead. Two periods by default, so one lost heartbeat is tolerated.
  std::chrono::milliseconds heartbeat_deadline{2000};
  uint32_t default_max_sessions = 64;  // a worker's clients when it names no limit
  // A dead or departed member's record (Status lists it; a client that registers again under
  // its name within this time gets its progress back) is removed this long after its death.
  std::chrono::milliseconds forget_after{std::chrono::minutes(10)};
  // Worker groups: move clients from busier members to one with fewer (see Rebalancing).
  bool rebalance_groups = true;
};

struct MemberView {
  uint64_t id = 0;
  Role role = Role::kClient;
  std::string name;
  bool alive = false;
  uint64_t step = 0;
  std::chrono::milliseconds since_heartbeat{0};
  std::string worker_name;  // clients: their worker ("" when unassigned)
  uint32_t clients = 0;     // workers: clients assigned now
};

// Totals over the live members, kept as they change (O(1) to read).
struct CoordinatorTotals {
  uint64_t workers = 0, clients = 0;  // alive
  uint64_t records = 0;               // alive, dead and departed
  uint64_t client_steps = 0;          // steps completed, summed over live clients
};

// The largest step a heartbeat may report: 2^53, as worker_core.h's kMaxStep (a resume step
// beyond it is refused there; Assign hands the step back as the client's resume step).
inline constexpr uint64_t kMaxHeartbeatStep = uint64_t{1} << 53;

class CoordinatorCore {
 public:
  // Status copies at most this many members per hold of the lock, and Expire handles at most
  // this many queue entries per hold.
  static constexpr size_t kStatusChunk = 2048;
  static constexpr size_t kExpireChunk = 2048;

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
  // `assignment_id`: a client's assignment as it trains under it (0: not told). `move` (may be
  // null) is set when that is no longer the client's assignment: it should Assign again.
  // `formed_generation`: a group worker's last generation formed (0: none). A step above
  // kMaxHeartbeatStep (2^53, a worker's kMaxStep) is INVALID_ARGUMENT.
  absl::Status Heartbeat(uint64_t member_id, uint64_t step, Clock::time_point now,
                         const std::string& caller = "", uint32_t sessions = 0,
                         uint64_t assignment_id = 0, bool* move = nullptr,
                         int64_t formed_generation = 0);
  absl::Status Leave(uint64_t member_id, Clock::time_point now, const std::string& caller = "");
  // The group view of worker `member_id` (NOT_FOUND for one that is not a live group member).
  // failed_generation (0: none): the caller could not form or use that generation.
  absl::StatusOr<rpc::GroupView> Group(uint64_t member_id, int64_t failed_generation,
                                       Clock::time_point now, const std::string& caller = "");
  // Marks the silent dead (returns their names) and forgets records dead for longer than
  // forget_after.
  std::vector<std::string> Expire(Clock::time_point now);
  // Members in id order (= registration order), from the first id above `after`, at most
  // `limit` of them (0: all). Not one atomic snapshot: each member's view is consistent, but
  // members may change between chunks of kStatusChunk.
  std::vector<MemberView> Status(Clock::time_point now, uint64_t after = 0, size_t limit = 0) const;
  CoordinatorTotals Totals() const;
  const CoordinatorOptions& options() const { return options_; }

 private:
  struct Member {
    uint64_t id = 0;
    Role role = Role::kClient;
    std::string name;
    bool alive = true;
    WorkerAddress endpoint;
    uint32_t max_sessions = 0;
    uint64_t step = 0;
    Clock::time_point last_heartbeat;
    Clock::time_point died;  // when it was marked dead or left
    uint64_t worker = 0;     // clients: their worker's member id (0: none; always live)
    uint64_t assignment_id = 0;
    uint64_t avoid = 0;              // clients: the worker last named unreachable (no move there)
    uint32_t reported_sessions = 0;  // workers: Train sessions in the last heartbeat
    WorkerAddress group_store;       // group workers: their store (host empty: not in a group)
    int64_t formed_generation = 0;   // group workers: as heartbeated
    std::unordered_set<uint64_t> clients;  // workers: the live clients assigned here
  };
  // The live member `member_id`: NOT_FOUND when there is none, PERMISSION_DENIED when `caller`
  // (not "") is not its name.
  absl::StatusOr<Member*> Find(uint64_t member_id, const std::string& caller);
  void Beat(Member& member, Clock::time_point now);
  // A worker's load: its clients as assigned here or as it reported them, the more.
  static uint32_t Load(const Member& worker);
  // Call before and after changing a live worker's load or room: keeps open_ in step.
  void Close(const Member& worker);
  void Open(const Member& worker);
  void Unassign(Member& client);
  // Assigns `client` to `worker` (a live worker with room), with a new assignment id.
  void MoveTo(Member& client, Member& worker);
  // Rebalancing: moves `client` to the least loaded group worker when that evens the loads.
  void Rebalance(Member& client);
  void MarkDead(Member& member, Clock::time_point now);
  // Worker groups: a new generation (membership changed, or the current one failed).
  void NextGeneration();
  void Erase(std::map<uint64_t, Member>::iterator it);

  CoordinatorOptions options_;
  mutable std::mutex mutex_;
  std::map<uint64_t, Member> members_;                 // by member id, in registration order
  std::unordered_map<std::string, uint64_t> by_name_;  // one record per name
  // Live workers with room, least loaded first (ties: the earlier registration).
  std::set<std::pair<uint32_t, uint64_t>> open_;
  std::set<uint64_t> live_workers_;
  size_t live_grouped_ = 0;  // live workers in a group
  CoordinatorTotals totals_;
  // (time, member) in arrival order: every heartbeat, and every death (for forget_after).
  std::deque<std::pair<Clock::time_point, uint64_t>> beats_, deaths_;
  uint64_t next_member_id_;  // epoch << 32 | counter
  uint64_t next_assignment_id_ = 1;
  // Worker groups: the live group workers by member id (= registration order: ranks).
  std::vector<uint64_t> group_;
  int64_t generation_;
  Clock::time_point failed_since_;  // the first report that generation_ failed
  bool failed_reported_ = false;
};

}  // namespace splitq::server

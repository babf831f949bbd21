#include "server/coordinator_core.h"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <random>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace splitq::server {
namespace {
// Group members that have not formed the current generation an Assign passes over at most.
constexpr size_t kSettledScan = 64;

// 1..2^31-1, different for each coordinator process (with high probability).
uint64_t RandomEpoch() {
  std::random_device device;
  const uint64_t bits = (uint64_t{device()} << 32 | device()) ^
                        static_cast<uint64_t>(Clock::now().time_since_epoch().count());
  return bits % 0x7fffffffu + 1;
}
}  // namespace

CoordinatorCore::CoordinatorCore(const CoordinatorOptions& options)
    : options_(options),
      next_member_id_(RandomEpoch() << 32 | 1),
      generation_(static_cast<int64_t>(RandomEpoch() & 0xfffff) << 32) {}

void CoordinatorCore::NextGeneration() {
  ++generation_;
  failed_reported_ = false;
}

absl::StatusOr<CoordinatorCore::Member*> CoordinatorCore::Find(uint64_t member_id,
                                                               const std::string& caller) {
  auto it = members_.find(member_id);
  if (it == members_.end() || !it->second.alive) {
    return absl::NotFoundError(
        absl::StrCat("member ", member_id, " is unknown or was marked dead: register again"));
  }
  if (!caller.empty() && caller != it->second.name) {
    return absl::PermissionDeniedError(absl::StrCat("member ", member_id, " is not '", caller,
                                                    "', whose token this call carries"));
  }
  return &it->second;
}

void CoordinatorCore::Beat(Member& member, Clock::time_point now) {
  member.last_heartbeat = now;
  beats_.emplace_back(now, member.id);
}

uint32_t CoordinatorCore::Load(const Member& worker) {
  return std::max(static_cast<uint32_t>(worker.clients.size()), worker.reported_sessions);
}

void CoordinatorCore::Close(const Member& worker) { open_.erase({Load(worker), worker.id}); }

void CoordinatorCore::Open(const Member& worker) {
  if (worker.alive && Load(worker) < worker.max_sessions) open_.emplace(Load(worker), worker.id);
}

void CoordinatorCore::Unassign(Member& client) {
  if (client.worker == 0) return;
  Member& worker = members_.at(client.worker);
  Close(worker);
  worker.clients.erase(client.id);
  Open(worker);
  client.worker = 0;
}

void CoordinatorCore::MoveTo(Member& client, Member& worker) {
  Unassign(client);
  Close(worker);
  worker.clients.insert(client.id);
  Open(worker);
  client.worker = worker.id;
  client.assignment_id = next_assignment_id_++;
}

void CoordinatorCore::Rebalance(Member& client) {
  if (!options_.rebalance_groups || client.worker == 0 || live_grouped_ < 2 || open_.empty()) {
    return;
  }
  Member& from = members_.at(client.worker);
  if (from.group_store.host.empty()) return;
  // Assigned clients (not reported sessions) on the busy side: a moved client still counts in
  // its old worker's report until that worker's next heartbeat, and counting it there would
  // move too many. The least loaded eligible member: one that has formed the current
  // generation (and so taken the group's client records), other than the one this client
  // last named unreachable (a move there would come back at once, every heartbeat).
  for (const auto& [load, id] : open_) {
    if (from.clients.size() < static_cast<size_t>(load) + 2) return;
    Member& to = members_.at(id);
    if (id == client.worker || id == client.avoid || to.group_store.host.empty() ||
        to.formed_generation != generation_) {
      continue;
    }
    MoveTo(client, to);
    return;
  }
}

void CoordinatorCore::MarkDead(Member& member, Clock::time_point now) {
  member.alive = false;
  member.died = now;
  deaths_.emplace_back(now, member.id);
  if (!member.group_store.host.empty()) {
    const auto it = std::find(group_.begin(), group_.end(), member.id);
    if (it != group_.end()) {
      group_.erase(it);
      NextGeneration();
    }
  }
  if (member.role == Role::kWorker) {
    Close(member);
    for (const uint64_t id : member.clients) members_.at(id).worker = 0;
    member.clients.clear();
    live_workers_.erase(member.id);
    live_grouped_ -= !member.group_store.host.empty();
    --totals_.workers;
  } else {
    Unassign(member);  // frees its slot
    totals_.client_steps -= member.step;
    --totals_.clients;
  }
}

void CoordinatorCore::Erase(std::map<uint64_t, Member>::iterator it) {
  by_name_.erase(it->second.name);
  members_.erase(it);
  --totals_.records;
}

absl::StatusOr<uint64_t> CoordinatorCore::Register(Role role, const std::string& name,
                                                   uint32_t protocol_version,
                                                   const WorkerAddress& endpoint,
                                                   uint32_t max_sessions, Clock::time_point now,
                                                   const std::string& caller,
                                                   const WorkerAddress& group_store) {
  if (protocol_version != kProtocolVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("protocol version ", protocol_version, " is not supported: this coordinator ",
                     "speaks version ", kProtocolVersion, " (upgrade the older side)"));
  }
  if (!IsValidMemberName(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("name '", name, "' is not 1..64 of [A-Za-z0-9._-], not . or .."));
  }
  if (role == Role::kWorker &&
      (endpoint.host.empty() || endpoint.port == 0 || endpoint.port > 65535)) {
    return absl::InvalidArgumentError(
        absl::StrCat("worker '", name, "' must give the host and port its clients dial"));
  }
  if (!caller.empty() && caller != name) {
    return absl::PermissionDeniedError(absl::StrCat("this call's token belongs to '", caller,
                                                    "': it cannot register as '", name, "'"));
  }
  for (const WorkerAddress* a : {&endpoint, &group_store}) {
    if (role == Role::kWorker && !a->host.empty() && !IsValidHost(a->host)) {
      // Clients dial it and print it: no control bytes, no megabyte names (sixth outside probe).
      return absl::InvalidArgumentError(absl::StrCat(
          "worker '", name, "': host '", absl::CHexEscape(a->host.substr(0, 64)),
          a->host.size() > 64 ? "...'" : "'",
          " is not a DNS name or an IP address (1..253 of [A-Za-z0-9.-_:%], not 0.0.0.0 or ::)"));
    }
  }
  const bool grouped = !group_store.host.empty();
  if (grouped && (role != Role::kWorker || group_store.port == 0 || group_store.port > 65535)) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", name, "': a group store is a worker's, with a host and a port"));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  const auto same = by_name_.find(name);
  Member* old = same == by_name_.end() ? nullptr : &members_.at(same->second);
  if (old != nullptr && old->alive) {
    return absl::AlreadyExistsError(absl::StrCat(
        "'", name, "' is registered and alive (member ", old->id, "); use another name, or wait ",
        options_.heartbeat_deadline.count(), " ms after it stops"));
  }
  if (role == Role::kWorker) {
    const size_t others = grouped ? live_workers_.size() - live_grouped_ : live_grouped_;
    if (others > 0) {
      std::string other;  // one of them, for the message
      for (const uint64_t id : live_workers_) {
        const Member& m = members_.at(id);
        if (m.group_store.host.empty() == grouped) {
          other = m.name;
          break;
        }
      }
      return absl::FailedPreconditionError(
          absl::StrCat("worker '", name, "' ", grouped ? "joins a worker group" : "is on its own",
                       ", but worker '", other, "' ", grouped ? "is on its own" : "is in a group",
                       ": start every worker of a run with --group-size, or none"));
    }
  }
  Member m;
  m.id = next_member_id_++;
  m.role = role;
  m.name = name;
  m.endpoint = endpoint;
  m.max_sessions = max_sessions == 0 ? options_.default_max_sessions : max_sessions;
  // A client that comes back keeps its progress; its dead record goes.
  if (role == Role::kClient && old != nullptr && old->role == Role::kClient) m.step = old->step;
  m.group_store = group_store;
  if (old != nullptr) Erase(members_.find(old->id));
  const uint64_t id = m.id;
  Member& added = members_.emplace(id, std::move(m)).first->second;
  by_name_[name] = id;
  Beat(added, now);
  ++totals_.records;
  if (role == Role::kWorker) {
    live_workers_.insert(id);
    live_grouped_ += grouped;
    ++totals_.workers;
    Open(added);
  } else {
    totals_.client_steps += added.step;
    ++totals_.clients;
  }
  if (grouped) {
    group_.push_back(id);
    NextGeneration();
  }
  return id;
}

absl::StatusOr<Assignment> CoordinatorCore::Assign(uint64_t member_id, Clock::time_point now,
                                                   const std::string& caller,
                                                   const std::string& unreachable) {
  std::lock_guard<std::mutex> lock(mutex_);
  absl::StatusOr<Member*> found = Find(member_id, caller);
  if (found.status().code() == absl::StatusCode::kPermissionDenied) return found.status();
  Member* client = found.ok() ? *found : nullptr;
  if (client == nullptr || client->role != Role::kClient) {
    return absl::NotFoundError(
        absl::StrCat("member ", member_id, " is not a registered, live client"));
  }
  Beat(*client, now);
  if (!unreachable.empty()) {
    const auto named = by_name_.find(unreachable);
    if (named != by_name_.end()) client->avoid = named->second;
  }
  Member* worker = client->worker == 0 ? nullptr : &members_.at(client->worker);
  Member* chosen = worker;
  if (worker == nullptr || (!unreachable.empty() && worker->name == unreachable)) {
    // The least loaded live worker with room, other than `unreachable` when another has room.
    // The client's own worker is `unreachable` here, or none. Among group members, one that
    // has formed the current generation first: a member that has just registered still holds
    // its own checkpoint's records of the clients' steps and would report a returning
    // client's applied steps as lost. At most kSettledScan members are passed over for that
    // (the least loaded open one is taken then), so a pick stays O(log workers).
    // Right after a generation bump (a member registered or died) no member has formed the
    // current one: then one that formed an earlier generation (it holds the group's state),
    // before one that never formed any (a fresh or restarted member).
    Member* fallback = nullptr;
    Member* least = nullptr;
    Member* formed_before = nullptr;
    chosen = nullptr;
    size_t scanned = 0;
    for (const auto& [load, id] : open_) {
      Member& w = members_.at(id);
      if (!unreachable.empty() && w.name == unreachable) {
        fallback = &w;
        continue;
      }
      if (least == nullptr) least = &w;
      if (w.group_store.host.empty() || w.formed_generation == generation_) {
        chosen = &w;
        break;
      }
      if (formed_before == nullptr && w.formed_generation != 0) formed_before = &w;
      if (++scanned >= kSettledScan) break;
    }
    if (chosen == nullptr) chosen = formed_before != nullptr ? formed_before : least;
    if (chosen == nullptr) chosen = worker != nullptr ? worker : fallback;
  }
  if (chosen == nullptr) {
    return absl::UnavailableError("no live worker has room; retry with backoff");
  }
  if (chosen != worker) MoveTo(*client, *chosen);
  Assignment a;
  a.worker_name = chosen->name;
  a.worker = chosen->endpoint;
  a.assignment_id = client->assignment_id;
  a.resume_step = client->step;
  return a;
}

absl::Status CoordinatorCore::Heartbeat(uint64_t member_id, uint64_t step, Clock::time_point now,
                                        const std::string& caller, uint32_t sessions,
                                        uint64_t assignment_id, bool* move,
                                        int64_t formed_generation) {
  if (move != nullptr) *move = false;
  std::lock_guard<std::mutex> lock(mutex_);
  absl::StatusOr<Member*> found = Find(member_id, caller);
  if (!found.ok()) return found.status();
  if (step > kMaxHeartbeatStep) {
    return absl::InvalidArgumentError(
        absl::StrCat("step ", step, " is above 2^53, the largest step a worker accepts"));
  }
  Member* m = *found;
  Beat(*m, now);
  if (m->role == Role::kWorker) {
    Close(*m);
    m->reported_sessions = sessions;
    m->formed_generation = formed_generation;
    Open(*m);
  } else {
    totals_.client_steps += step - m->step;  // modulo 2^64: exact once summed
    // Only a client that names its assignment hears of a move; one with a move pending (it
    // names an older one) is not moved again.
    if (assignment_id != 0 && assignment_id == m->assignment_id) Rebalance(*m);
    // Only moves the coordinator made: not a fresh record (registered again: assignment 0) nor
    // a client without a worker, and only within a group.
    if (move != nullptr) {
      *move = assignment_id != 0 && m->assignment_id != 0 && assignment_id != m->assignment_id &&
              m->worker != 0 && !members_.at(m->worker).group_store.host.empty();
    }
  }
  m->step = step;
  return absl::OkStatus();
}

absl::Status CoordinatorCore::Leave(uint64_t member_id, Clock::time_point now,
                                    const std::string& caller) {
  std::lock_guard<std::mutex> lock(mutex_);
  absl::StatusOr<Member*> found = Find(member_id, caller);
  if (!found.ok()) return found.status();
  MarkDead(**found, now);
  return absl::OkStatus();
}

absl::StatusOr<rpc::GroupView> CoordinatorCore::Group(uint64_t member_id, int64_t failed_generation,
                                                      Clock::time_point now,
                                                      const std::string& caller) {
  std::lock_guard<std::mutex> lock(mutex_);
  absl::StatusOr<Member*> found = Find(member_id, caller);
  if (!found.ok()) return found.status();
  const auto rank = std::find(group_.begin(), group_.end(), member_id);
  if (rank == group_.end()) {
    return absl::NotFoundError(absl::StrCat("member ", member_id, " is not in a worker group"));
  }
  Beat(**found, now);  // a member asking is alive
  if (failed_generation != 0 && failed_generation == generation_) {
    if (!failed_reported_) {
      failed_reported_ = true;
      failed_since_ = now;
    } else if (now - failed_since_ > 2 * options_.heartbeat_deadline) {
      NextGeneration();  // nobody was marked dead: the same members, afresh
    }
  }
  rpc::GroupView v;
  v.generation = generation_;
  v.rank = static_cast<uint32_t>(rank - group_.begin());
  v.world = static_cast<uint32_t>(group_.size());
  v.store = members_.at(group_.front()).group_store;
  for (uint64_t id : group_) v.members.push_back(members_.at(id).name);
  return v;
}

std::vector<std::string> CoordinatorCore::Expire(Clock::time_point now) {
  std::vector<std::string> dead;
  // Heartbeats in arrival order: a member whose newest heartbeat is past the deadline dies; an
  // older entry of a member that beat since is dropped. (Arrival order is time order up to the
  // few microseconds between a call reading the clock and taking the lock.) At most
  // kExpireChunk entries per hold of the lock, so that a mass death does not stall the calls.
  for (bool more = true; more;) {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t done = 0;
    while (!beats_.empty() && now - beats_.front().first > options_.heartbeat_deadline &&
           done++ < kExpireChunk) {
      const auto it = members_.find(beats_.front().second);
      beats_.pop_front();
      if (it == members_.end()) continue;
      Member& m = it->second;
      if (m.alive && now - m.last_heartbeat > options_.heartbeat_deadline) {
        MarkDead(m, now);
        dead.push_back(m.name);
      }
    }
    while (!deaths_.empty() && now - deaths_.front().first > options_.forget_after &&
           done++ < kExpireChunk) {
      const auto it = members_.find(deaths_.front().second);
      deaths_.pop_front();
      if (it != members_.end() && !it->second.alive) Erase(it);
    }
    more = done > kExpireChunk;
  }
  return dead;
}

std::vector<MemberView> CoordinatorCore::Status(Clock::time_point now, uint64_t after,
                                                size_t limit) const {
  std::vector<MemberView> out;
  const size_t wanted = limit == 0 ? SIZE_MAX : limit;
  while (out.size() < wanted) {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t chunk = std::min(kStatusChunk, wanted - out.size());
    size_t copied = 0;
    for (auto it = members_.upper_bound(after); it != members_.end() && copied < chunk;
         ++it, ++copied) {
      const Member& m = it->second;
      MemberView v;
      v.id = m.id;
      v.role = m.role;
      v.name = m.name;
      v.alive = m.alive;
      v.step = m.step;
      // At least 0: a member that beat while an earlier chunk was copied is newer than `now`.
      v.since_heartbeat =
          std::max(std::chrono::milliseconds(0),
                   std::chrono::duration_cast<std::chrono::milliseconds>(now - m.last_heartbeat));
      if (m.worker != 0) v.worker_name = members_.at(m.worker).name;
      v.clients = static_cast<uint32_t>(m.clients.size());
      out.push_back(std::move(v));
      after = m.id;
    }
    if (copied < chunk) break;  // the end
  }
  return out;
}

CoordinatorTotals CoordinatorCore::Totals() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return totals_;
}

}  // namespace splitq::server

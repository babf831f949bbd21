#include "server/coordinator_core.h"

#include <algorithm>
#include <cctype>
#include <random>

#include "absl/strings/str_cat.h"

namespace splitq::server {
namespace {
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

CoordinatorCore::Member* CoordinatorCore::LiveWorker(const std::string& name) {
  for (auto& [id, m] : members_) {
    if (m.alive && m.role == Role::kWorker && m.name == name) return &m;
  }
  return nullptr;
}

uint32_t CoordinatorCore::ClientsOf(const std::string& worker_name) const {
  uint32_t n = 0;
  for (const auto& [id, m] : members_) {
    n += m.alive && m.role == Role::kClient && m.worker_name == worker_name;
  }
  return n;
}

void CoordinatorCore::MarkDead(Member& member) {
  member.alive = false;
  if (!member.group_store.host.empty()) {
    for (auto it = group_.begin(); it != group_.end(); ++it) {
      if (&members_.at(*it) == &member) {
        group_.erase(it);
        NextGeneration();
        break;
      }
    }
  }
  if (member.role == Role::kWorker) {
    for (auto& [id, m] : members_) {
      if (m.role == Role::kClient && m.worker_name == member.name) m.worker_name.clear();
    }
  } else {
    member.worker_name.clear();  // frees its slot
  }
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
  const bool grouped = !group_store.host.empty();
  if (grouped && (role != Role::kWorker || group_store.port == 0 || group_store.port > 65535)) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", name, "': a group store is a worker's, with a host and a port"));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (role == Role::kWorker) {
    for (const auto& [id, m] : members_) {
      if (!m.alive || m.role != Role::kWorker || m.name == name ||
          m.group_store.host.empty() == !grouped) {
        continue;
      }
      return absl::FailedPreconditionError(
          absl::StrCat("worker '", name, "' ", grouped ? "joins a worker group" : "is on its own",
                       ", but worker '", m.name, "' ", grouped ? "is on its own" : "is in a group",
                       ": start every worker of a run with --group-size, or none"));
    }
  }
  for (auto it = members_.begin(); it != members_.end();) {
    if (it->second.name != name) {
      ++it;
    } else if (it->second.alive) {
      return absl::AlreadyExistsError(absl::StrCat("'", name, "' is registered and alive (member ",
                                                   it->first, "); use another name, or wait ",
                                                   options_.heartbeat_deadline.count(),
                                                   " ms after it stops"));
    } else {
      it = members_.erase(it);  // its dead record (a client's progress is kept apart)
    }
  }
  Member m;
  m.role = role;
  m.name = name;
  m.endpoint = endpoint;
  m.max_sessions = max_sessions == 0 ? options_.default_max_sessions : max_sessions;
  m.last_heartbeat = now;
  if (role == Role::kClient) m.step = client_progress_[name];
  m.group_store = group_store;
  const uint64_t id = next_member_id_++;
  members_.emplace(id, std::move(m));
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
  client->last_heartbeat = now;
  Member* worker = client->worker_name.empty() ? nullptr : LiveWorker(client->worker_name);
  // The least loaded live worker with room, other than `unreachable` when another has room.
  const auto pick = [&]() -> Member* {
    Member* best = nullptr;
    Member* fallback = nullptr;
    uint32_t best_load = 0, fallback_load = 0;
    for (auto& [id, m] : members_) {
      if (!m.alive || m.role != Role::kWorker) continue;
      // Its clients (as assigned here, or as it reported them), not counting this one.
      const uint32_t clients = std::max(ClientsOf(m.name), m.reported_sessions);
      const uint32_t self = client->worker_name == m.name ? 1 : 0;
      const uint32_t load = clients > self ? clients - self : 0;
      if (load >= m.max_sessions) continue;
      if (!unreachable.empty() && m.name == unreachable) {
        if (fallback == nullptr || load < fallback_load) {
          fallback = &m;
          fallback_load = load;
        }
      } else if (best == nullptr || load < best_load) {
        best = &m;
        best_load = load;
      }
    }
    return best != nullptr ? best : fallback;
  };
  Member* chosen = worker;
  if (worker == nullptr || (!unreachable.empty() && worker->name == unreachable)) {
    chosen = pick();  // for an unreachable worker: another, or that one again when none has room
    if (chosen == nullptr) chosen = worker;
  }
  if (chosen == nullptr) {
    return absl::UnavailableError("no live worker has room; retry with backoff");
  }
  if (chosen != worker) {
    worker = chosen;
    client->worker_name = worker->name;
    client->assignment_id = next_assignment_id_++;
  }
  Assignment a;
  a.worker_name = worker->name;
  a.worker = worker->endpoint;
  a.assignment_id = client->assignment_id;
  a.resume_step = client->step;
  return a;
}

absl::Status CoordinatorCore::Heartbeat(uint64_t member_id, uint64_t step, Clock::time_point now,
                                        const std::string& caller, uint32_t sessions) {
  std::lock_guard<std::mutex> lock(mutex_);
  absl::StatusOr<Member*> found = Find(member_id, caller);
  if (!found.ok()) return found.status();
  Member* m = *found;
  m->last_heartbeat = now;
  m->step = step;
  if (m->role == Role::kWorker) m->reported_sessions = sessions;
  if (m->role == Role::kClient) client_progress_[m->name] = step;
  return absl::OkStatus();
}

absl::Status CoordinatorCore::Leave(uint64_t member_id, const std::string& caller) {
  std::lock_guard<std::mutex> lock(mutex_);
  absl::StatusOr<Member*> found = Find(member_id, caller);
  if (!found.ok()) return found.status();
  MarkDead(**found);
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
  (*found)->last_heartbeat = now;  // a member asking is alive
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
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::string> dead;
  for (auto& [id, m] : members_) {
    if (m.alive && now - m.last_heartbeat > options_.heartbeat_deadline) {
      MarkDead(m);
      dead.push_back(m.name);
    }
  }
  return dead;
}

std::vector<MemberView> CoordinatorCore::Status(Clock::time_point now) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<MemberView> out;
  for (const auto& [id, m] : members_) {
    MemberView v;
    v.role = m.role;
    v.name = m.name;
    v.alive = m.alive;
    v.step = m.step;
    v.since_heartbeat =
        std::chrono::duration_cast<std::chrono::milliseconds>(now - m.last_heartbeat);
    v.worker_name = m.worker_name;
    v.clients = m.role == Role::kWorker ? ClientsOf(m.name) : 0;
    out.push_back(std::move(v));
  }
  return out;
}

}  // namespace splitq::server

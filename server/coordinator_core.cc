#include "server/coordinator_core.h"

#include <algorithm>
#include <cctype>

#include "absl/strings/str_cat.h"

namespace splitq::server {
bool IsValidMemberName(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-';
  });
}

CoordinatorCore::CoordinatorCore(const CoordinatorOptions& options) : options_(options) {}

CoordinatorCore::Member* CoordinatorCore::Find(uint64_t member_id) {
  auto it = members_.find(member_id);
  return it == members_.end() || !it->second.alive ? nullptr : &it->second;
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
                                                   uint32_t max_sessions, Clock::time_point now) {
  if (protocol_version != kProtocolVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("protocol version ", protocol_version, " is not supported: this coordinator ",
                     "speaks version ", kProtocolVersion, " (upgrade the older side)"));
  }
  if (!IsValidMemberName(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("name '", name, "' is not 1..64 of [A-Za-z0-9._-]"));
  }
  if (role == Role::kWorker &&
      (endpoint.host.empty() || endpoint.port == 0 || endpoint.port > 65535)) {
    return absl::InvalidArgumentError(
        absl::StrCat("worker '", name, "' must give the host and port its clients dial"));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& [id, m] : members_) {
    if (m.alive && m.name == name) {
      return absl::AlreadyExistsError(absl::StrCat(
          "'", name, "' is registered and alive (member ", id, "); use another name, or wait ",
          options_.heartbeat_deadline.count(), " ms after it stops"));
    }
  }
  Member m;
  m.role = role;
  m.name = name;
  m.endpoint = endpoint;
  m.max_sessions = max_sessions == 0 ? options_.default_max_sessions : max_sessions;
  m.last_heartbeat = now;
  if (role == Role::kClient) m.step = client_progress_[name];
  const uint64_t id = next_member_id_++;
  members_.emplace(id, std::move(m));
  return id;
}

absl::StatusOr<Assignment> CoordinatorCore::Assign(uint64_t member_id, Clock::time_point now) {
  std::lock_guard<std::mutex> lock(mutex_);
  Member* client = Find(member_id);
  if (client == nullptr || client->role != Role::kClient) {
    return absl::NotFoundError(
        absl::StrCat("member ", member_id, " is not a registered, live client"));
  }
  client->last_heartbeat = now;
  Member* worker = client->worker_name.empty() ? nullptr : LiveWorker(client->worker_name);
  if (worker == nullptr) {
    uint32_t best_load = 0;
    for (auto& [id, m] : members_) {
      if (!m.alive || m.role != Role::kWorker) continue;
      const uint32_t load = ClientsOf(m.name);
      if (load >= m.max_sessions) continue;
      if (worker == nullptr || load < best_load) {
        worker = &m;
        best_load = load;
      }
    }
    if (worker == nullptr) {
      return absl::UnavailableError("no live worker has room; retry with backoff");
    }
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

absl::Status CoordinatorCore::Heartbeat(uint64_t member_id, uint64_t step, Clock::time_point now) {
  std::lock_guard<std::mutex> lock(mutex_);
  Member* m = Find(member_id);
  if (m == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("member ", member_id, " is unknown or was marked dead: register again"));
  }
  m->last_heartbeat = now;
  m->step = step;
  if (m->role == Role::kClient) client_progress_[m->name] = step;
  return absl::OkStatus();
}

absl::Status CoordinatorCore::Leave(uint64_t member_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  Member* m = Find(member_id);
  if (m == nullptr) return absl::NotFoundError(absl::StrCat("member ", member_id, " is unknown"));
  MarkDead(*m);
  return absl::OkStatus();
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

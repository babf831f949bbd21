// splitq rpc: the plain C++ values of the protocol that both ends share (proto/splitq/v1/*.proto
// carries them): its version, what a member is, how members are named, where a worker is.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace splitq::rpc {

inline constexpr uint32_t kProtocolVersion = 1;  // splitq.v1 PROTOCOL_VERSION_CURRENT

enum class Role : uint8_t { kWorker, kClient };

// A host a client can dial, as a worker advertises it: 1..253 characters of a DNS name, an IPv4
// or an IPv6 address ([A-Za-z0-9.-_:%]), not an unspecified address (0.0.0.0, ::).
bool IsValidHost(const std::string& host);

// Worker names, client ids and run ids (also the ids of `splitq tokens`): 1..64 of
// [A-Za-z0-9._-], and not "." or ".." (they name folders: --out runs/<id>).
bool IsValidMemberName(const std::string& name);

struct WorkerAddress {
  std::string host;
  uint32_t port = 0;
};

// A client's worker, as the coordinator assigns it.
struct Assignment {
  std::string worker_name;
  WorkerAddress worker;
  uint64_t assignment_id = 0;  // new for every (re)assignment
  uint64_t resume_step = 0;    // the client's steps completed, as last reported
};

// A worker group member's view of its group, as the coordinator gives it (Coordinator.Group).
struct GroupView {
  int64_t generation = 0;  // changes with every change of membership
  uint32_t rank = 0;       // the member's rank (members by registration order)
  uint32_t world = 0;
  WorkerAddress store;               // rank 0's c10d store, where the generation meets
  std::vector<std::string> members;  // worker names, by rank
};

// "HOST:PORT" (IPv6 as "[::1]:PORT") -> {host, port}; INVALID_ARGUMENT otherwise.
absl::StatusOr<WorkerAddress> ParseHostPort(const std::string& text);
// {host, port} -> "HOST:PORT" (brackets around IPv6 literals).
std::string JoinHostPort(const WorkerAddress& address);

}  // namespace splitq::rpc

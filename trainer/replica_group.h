// splitq trainer: a data-parallel group of server-part replicas (libtorch's c10d): Gloo on the
// CPU, NCCL on CUDA. Each worker of a group holds one replica; every server update is one
// round in which every member takes part (server_part.h, "Worker groups"):
//
//   Max(values)        element-wise maximum over the members (a round's largest step, and
//                      whether anyone has work);
//   SumInPlace(grads)  the members' gradient sums, added up in place (one flat buffer per
//                      dtype: one collective, not one per tensor);
//   Broadcast(bytes)   a byte string from `root` to everyone (the state a joining member takes).
//
// Rendezvous: the members meet in a c10d TCPStore (store_host:store_port; one member hosts it,
// GroupStore below), under the prefix "g<generation>/", so a re-formed group never reads a
// dead generation's keys. A collective that fails (a member died, or did not answer within
// `timeout`) returns UNAVAILABLE and marks the group broken(); it is then unusable and the
// caller forms the next generation.
//
// Generations: the coordinator numbers them (server/coordinator_core.h). set_latest_generation
// records the newest one this member has heard of (from any thread); the members compare what
// they heard in their next round (server_part.h) so that all of them leave a generation at
// the same round.
//
// NCCL: Create sets TORCH_NCCL_BLOCKING_WAIT=1 and TORCH_NCCL_ASYNC_ERROR_HANDLING=0 unless
// they are set, so that a collective with a dead member fails after `timeout` instead of
// hanging or ending the process; a member's death is then found only by that timeout.
//
// Not thread-safe apart from set_latest_generation and broken(): one thread (the worker's
// compute thread) calls it.
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace splitq::trainer {

// Turns PyTorch 2.x's collective flight recorder off (TORCH_FR_BUFFER_SIZE=0) unless the
// user set its size: it races when two groups of one process start at once (replica_group.cc
// says how). Sets an environment variable, so call it from main() before any thread starts;
// ReplicaGroup::Create calls it too (once per process), for programs that did not.
void TurnOffFlightRecorderUnlessAsked();

struct ReplicaGroupOptions {
  std::string backend = "auto";  // auto (nccl on CUDA, gloo on the CPU) | gloo | nccl
  std::string store_host = "127.0.0.1";
  int store_port = 0;
  bool host_store = false;  // this member serves the store (then store_port 0 picks one)
  int rank = 0;
  int world = 1;
  int64_t generation = 0;
  std::string interface_host = "127.0.0.1";  // the address other members reach this one at (gloo)
  std::chrono::milliseconds timeout{30000};
};

class BucketedSum;

class ReplicaGroup {
 public:
  // Joins (waits up to `timeout` for every member). INVALID_ARGUMENT for a rank outside the
  // world or an unknown backend; FAILED_PRECONDITION for nccl without CUDA or a build without
  // it; UNAVAILABLE when the store or a member cannot be reached.
  // `on_store_port` (may be empty) gets the store's port as soon as the store is up, before
  // the members meet: a member that hosts the store on port 0 tells the others with it.
  static absl::StatusOr<std::unique_ptr<ReplicaGroup>> Create(
      const ReplicaGroupOptions& options, const at::Device& device,
      const std::function<void(int)>& on_store_port = {});
  ~ReplicaGroup();

  // Exact for |values| < 2^53.
  absl::StatusOr<std::vector<int64_t>> Max(const std::vector<int64_t>& values);
  absl::Status SumInPlace(const std::vector<at::Tensor>& tensors);
  absl::StatusOr<std::string> Broadcast(const std::string& bytes, int root);
  // A sum in buckets that may start while a backward pass still runs (BucketedSum below).
  // `like`: the tensors' shapes and dtypes, in the same order on every member; the buckets
  // live on this group's device. The group outlives the sum.
  std::unique_ptr<BucketedSum> StartSum(const std::vector<at::Tensor>& like, int64_t bucket_bytes);

  int rank() const;
  int world() const;
  int64_t generation() const;
  // The newest generation this member has heard of (starts at generation()); any thread.
  void set_latest_generation(int64_t generation);
  int64_t latest_generation() const;
  // A collective failed, or the members agreed to leave this generation (MarkBroken): form the
  // next one. Any thread.
  bool broken() const;
  void MarkBroken();
  std::string backend() const;
  int store_port() const;  // the store's port (the one picked, when this member hosts it)

 private:
  friend class BucketedSum;
  struct Impl;
  explicit ReplicaGroup(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// A sum over the group of a fixed list of tensors, in buckets whose all-reduces start as soon
// as they are filled, so the sum overlaps with the backward pass that fills them (what DDP
// does). Buckets are made from the list in REVERSE order (a backward pass produces the last
// layers' gradients first), each of one dtype and at most `bucket_bytes` (0: no limit, one
// bucket per dtype run). Add(i, value, scale) puts scale * value in tensor i's place (a second
// Add to the same place adds to it); when a bucket's places are all added it starts (an
// asynchronous all-reduce), but only after every bucket before it has started, so every member
// starts the same collectives in the same order whatever order its places arrive in. Finish
// starts the rest (places never added count as zeros) and waits for all. Every member must
// call Finish on a sum of the same list; a member with nothing to add just calls Finish.
//
// Add may run on another thread (autograd's) than Finish; the calls are serialized. A failed
// collective breaks the group (ReplicaGroup::broken) and Finish returns UNAVAILABLE. A sum
// dropped before Finish starts its remaining buckets first (zeros where nothing was added), so
// the other members never wait for collectives this one skipped.
class BucketedSum {
 public:
  ~BucketedSum();
  void Add(size_t index, const at::Tensor& value, double scale);
  // Forgets what was added to buckets that have not started (they will carry zeros). True when
  // some bucket had started: this member's values are then already on their way.
  bool Discard();
  absl::Status Finish();
  // Tensor `index`'s sum over the members (a view into its bucket), after Finish returned OK.
  at::Tensor sum(size_t index) const;
  // Whether tensor `index`'s place holds an Add since the sum started (or the last Discard).
  bool added(size_t index) const;
  // An Add came for a bucket that had started: its value is not in the sum. The collectives
  // all run as planned (every member starts the same ones); the caller must not use the sum
  // as complete (server_part.h poisons the round).
  bool late() const;
  int buckets() const;
  // Buckets that Add started (before Finish: during the backward pass, when Add runs there).
  int started_early() const;

 private:
  friend class ReplicaGroup;
  struct Impl;
  explicit BucketedSum(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The store a member serves for the generations in which it is rank 0: a c10d TCPStore server
// on `host`:`port` (0: a free one), alive as long as this object.
class GroupStore {
 public:
  // UNAVAILABLE when the port cannot be bound.
  static absl::StatusOr<std::unique_ptr<GroupStore>> Start(const std::string& host, int port,
                                                           std::chrono::milliseconds timeout);
  ~GroupStore();
  int port() const;

 private:
  struct Impl;
  explicit GroupStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace splitq::trainer

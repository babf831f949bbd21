// splitq server: a worker process as a library object (`splitq worker` parses flags and runs
// one): the server part of the model behind the Worker service (worker_service.h) with the
// standard health service; registration with the coordinator (retried with backoff until the
// connect timeout), heartbeats with the steps served, a status line every 10 s, periodic
// checkpoints, and a clean stop (leave the coordinator, stop serving, save).
//
// Checkpoints (out_dir): DIR/worker.pt holds the server part's weights and optimizer, and per
// client the first step it has not applied; it is replaced atomically once checkpoint_every
// server updates have passed since the last save (looked at every 0.1 s, so a fast worker saves
// a few updates later) and when the worker stops. A worker started on a DIR that holds one
// resumes from it; steps applied after the last checkpoint are lost, and the log names them when
// their client comes back. A failed save is retried checkpoint_every updates later (a full disk
// must not stall training with a save every 100 ms); a failed final save is Run's error.
// At the stop it also writes DIR/worker.json: name, rank, server_updates (all of the run's,
// checkpoints included), steps_served, steps_applied and updates_here (this process's), and
// weights_sha256 (WorkerCore::weights_digest) — what `splitq demo` puts in its summary.
//
// Merged batches: the run config's server.merge.* (worker_service.h, MergeOptions).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "proto/rpc_channel.h"
#include "server/connection_guard.h"
#include "server/tokens.h"
#include "trainer/config.h"

namespace splitq::server {

struct WorkerProcessOptions {
  trainer::RunConfig config;
  std::string config_digest;  // clients must present the same (cli/net_common.h ConfigDigest)
  std::string init;           // --init: base weights (LoRA runs)
  std::string name = "worker0";
  std::string coordinator;  // HOST:PORT
  std::string listen = "127.0.0.1:0";
  std::string advertise;        // host clients dial ("": the listen host, or this host's name)
  uint32_t advertise_port = 0;  // port clients dial (0: the one bound)
  rpc::TransportSecurity security;
  const TokenSet* tokens = nullptr;    // the clients' tokens (null: none checked)
  ConnectionLimits connection_limits;  // server/connection_guard.h
  std::string own_token;               // this worker's token, for the coordinator
  std::string out_dir;                 // "" : no checkpoints
  int64_t checkpoint_every = 0;        // server updates between saves (0: only when stopping)
  int64_t reply_chunk_bytes = 1 << 20;
  int64_t session_idle_ms = 300000;  // WorkerServiceOptions::session_idle_ms (0: never)
  int64_t turn_idle_ms = 30000;      // WorkerServiceOptions::turn_idle_ms (0: none)
  uint32_t max_clients = 64;
  std::chrono::seconds connect_timeout{120};
  std::string ready_file;  // server/process.h, ReadyFile
  // Worker groups (group_size >= 1): this worker is one replica of the run's data-parallel
  // group (trainer/replica_group.h; docs/cluster.md). It registers with the coordinator with
  // the address of its own c10d store (group_address, on a free port), and the coordinator
  // gives it its rank, the world and the generation (Coordinator.Group). Every change of
  // membership is a new generation: the members leave the old one at the same round, form the
  // new one at rank 0's store, and take the state (weights, optimizer, updates, every client's
  // progress) of the member with the most updates, by broadcast — so a worker that restarts,
  // or a new one, joins with the group's current state, not an old checkpoint. Before the
  // first round a worker waits (up to group_timeout) until group_size members have come.
  // group_address: where the others reach this member (its store and, for gloo, its
  // collectives). group_timeout: also the limit of one collective (a member slower than that
  // ends the generation).
  int group_size = 0;
  std::string group_address = "127.0.0.1";
  std::chrono::milliseconds group_timeout{60000};
  // HOST:PORT to serve Prometheus metrics on at /metrics ("" : none; server/metrics_server.h,
  // docs/cluster.md "Metrics").
  std::string metrics_listen;
  // Lines for the log (stdout in the CLI: "worker NAME ..." as printed) and for errors (stderr).
  std::function<void(const std::string&)> log, warn;
};

class WorkerProcess {
 public:
  // Builds the server part, restores out_dir's checkpoint when there is one, and starts
  // listening. Errors name what failed: the server part (data, device, --init), --out (not
  // writable, a damaged or mismatched checkpoint), the address, TLS.
  static absl::StatusOr<std::unique_ptr<WorkerProcess>> Start(const WorkerProcessOptions& options);
  ~WorkerProcess();

  // Registers, announces (ready file), heartbeats and checkpoints until `stop` is set, then
  // leaves the coordinator, stops serving and saves. OK also when stopped while registering.
  // Errors: registration that failed for good, the ready file, a failed final save.
  absl::Status Run(const std::atomic<bool>& stop);

  // The address clients dial ("HOST:PORT").
  std::string address() const;

 private:
  struct Impl;
  explicit WorkerProcess(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace splitq::server

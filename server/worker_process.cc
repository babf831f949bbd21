#include "server/worker_process.h"

#include <unistd.h>

#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/files.h"
#include "base/memory.h"
#include "base/status_macros.h"
#include "client/coordinator_client.h"
#include "client/worker_client.h"
#include "proto/protocol.h"
#include "server/process.h"
#include "server/worker_core.h"
#include "server/worker_service.h"
#include "trainer/replica_group.h"
#include "trainer/server_part.h"

namespace splitq::server {

namespace {
std::string MergeText(const MergeOptions& m, bool u_shaped) {
  if (m.max_clients <= 1) return "";
  if (u_shaped) return "; U-shaped: steps are not merged";
  return absl::StrFormat("; merging up to %d clients%s, window %g ms", m.max_clients,
                         m.max_targets > 0 ? absl::StrCat(" / ", m.max_targets, " labels") : "",
                         m.window_ms);
}

std::string StatsText(const WorkerStats& w) {
  std::string text =
      absl::StrFormat("%d steps served, %d server updates", w.steps_served, w.updates);
  if (w.updates_here > 0 && w.steps_applied > w.updates_here) {
    absl::StrAppend(&text, absl::StrFormat(" (%.2f clients per update)",
                                           static_cast<double>(w.steps_applied) / w.updates_here));
  }
  return text;
}

// What `splitq demo` gathers from each worker (--out DIR/worker.json).
std::string ReportJson(const std::string& name, int rank, const WorkerStats& w,
                       const std::string& digest) {
  return absl::StrFormat(
      "{\n  \"name\": \"%s\",\n  \"rank\": %d,\n  \"server_updates\": %d,\n"
      "  \"steps_served\": %d,\n  \"steps_applied\": %d,\n  \"updates_here\": %d,\n"
      "  \"weights_sha256\": \"%s\"\n}\n",
      name, rank, w.updates, w.steps_served, w.steps_applied, w.updates_here, digest);
}
}  // namespace

struct WorkerProcess::Impl {
  WorkerProcessOptions o;
  // Before the part, the core and the service: they go first (the service's compute thread
  // runs the group's rounds until it is joined).
  std::unique_ptr<trainer::ReplicaGroup> group;
  std::unique_ptr<trainer::ServerPart> part;
  std::unique_ptr<WorkerCore> core;
  std::unique_ptr<WorkerService> service;
  Serving serving;
  rpc::WorkerAddress advertised;
  std::string checkpoint;  // "" : none
  int64_t saved_updates = 0;

  void Log(const std::string& line) const {
    if (o.log) o.log(line);
  }
  void Warn(const std::string& line) const {
    if (o.warn) o.warn(line);
  }

  // Forms the group (waits for every member), then every member takes rank 0's state (its
  // weights, optimizer, updates and clients' progress: a worker checkpoint, broadcast), so
  // replicas start identical even when rank 0 resumed from its --out.
  absl::Status JoinGroup() {
    trainer::ReplicaGroupOptions g;
    g.backend = o.config.group_backend;
    SPLITQ_ASSIGN_OR_RETURN(const rpc::WorkerAddress store, rpc::ParseHostPort(o.group_store));
    g.store_host = store.host;
    g.store_port = static_cast<int>(store.port);
    g.host_store = o.group_rank == 0;
    g.rank = o.group_rank;
    g.world = o.group_size;
    g.interface_host = o.group_address;
    g.timeout = o.group_timeout;
    Log(absl::StrFormat("worker %s: joining group of %d as rank %d at %s", o.name, o.group_size,
                        o.group_rank, o.group_store));
    auto made = trainer::ReplicaGroup::Create(
        g, part->device() == "cuda" ? at::Device(at::kCUDA) : at::Device(at::kCPU));
    if (!made.ok()) return made.status();
    group = std::move(*made);
    const std::filesystem::path state = std::filesystem::temp_directory_path() /
                                        absl::StrCat("splitq-group-", o.name, "-", getpid(), ".pt");
    std::string bytes;
    if (o.group_rank == 0) {
      SPLITQ_RETURN_IF_ERROR(core->SaveCheckpoint(state.string()).status());
      auto read = base::ReadSmallFile(state, "group state", size_t{1} << 34);
      std::filesystem::remove(state);
      if (!read.ok()) return read.status();
      bytes = std::move(*read);
    }
    SPLITQ_ASSIGN_OR_RETURN(bytes, group->Broadcast(bytes, 0));
    if (o.group_rank != 0) {
      SPLITQ_RETURN_IF_ERROR(base::WriteFileAtomically(state, bytes, 0600));
      auto loaded = core->LoadCheckpoint(state.string());
      std::filesystem::remove(state);
      if (!loaded.ok()) return loaded.status();
    }
    part->set_group(group.get());
    Log(absl::StrFormat("worker %s: group of %d formed (%s), rank %d, %d server updates", o.name,
                        o.group_size, group->backend(), o.group_rank, core->stats().updates));
    return absl::OkStatus();
  }

  // The failed save's updates count as saved, so that the next attempt waits another
  // checkpoint_every updates.
  bool Save(bool final) {
    const int64_t before = core->stats().updates;
    const auto start = std::chrono::steady_clock::now();
    auto updates = core->SaveCheckpoint(checkpoint);
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (!updates.ok()) {
      Warn(absl::StrCat("checkpoint at ", before,
                        " server updates failed: ", updates.status().ToString()));
      saved_updates = before;
      return false;
    }
    saved_updates = *updates;
    if (final) {
      std::error_code size_error;
      const auto bytes = std::filesystem::file_size(checkpoint, size_error);
      Log(absl::StrFormat("worker %s saved %s at %d server updates (%.1f MiB in %.0f ms)", o.name,
                          checkpoint, *updates,
                          size_error ? 0.0 : static_cast<double>(bytes) / (1 << 20), ms));
    }
    return true;
  }
};

WorkerProcess::WorkerProcess(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
WorkerProcess::~WorkerProcess() = default;

absl::StatusOr<std::unique_ptr<WorkerProcess>> WorkerProcess::Start(
    const WorkerProcessOptions& options) {
  auto impl = std::make_unique<Impl>();
  Impl& s = *impl;
  s.o = options;
  auto named = [](const char* what, const absl::Status& status) {
    return absl::Status(status.code(), absl::StrCat(what, ": ", status.message()));
  };
  auto part = trainer::ServerPart::Create(s.o.config, s.o.init);
  if (!part.ok()) return named("server part", part.status());
  s.part = std::move(*part);
  WorkerOptions core_options;
  core_options.max_sessions = s.o.max_clients;
  core_options.config_digest = s.o.config_digest;
  core_options.rounds = s.o.group_size > 1;
  if (core_options.rounds && s.o.config.u_shaped) {
    return absl::InvalidArgumentError(
        "--group-size: worker groups serve the plain layout, not model.u_shaped");
  }
  s.core = std::make_unique<WorkerCore>(*s.part, core_options);
  if (!s.o.out_dir.empty()) {
    std::error_code error;
    std::filesystem::create_directories(s.o.out_dir, error);
    if (error)
      return absl::InternalError(absl::StrCat("--out: ", s.o.out_dir, ": ", error.message()));
    const std::filesystem::path probe = std::filesystem::path(s.o.out_dir) / ".write-test";
    if (absl::Status w = base::WriteFileAtomically(probe, "", 0600); !w.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("--out: ", s.o.out_dir, " is not writable: ", w.message()));
    }
    std::filesystem::remove(probe, error);
    s.checkpoint = (std::filesystem::path(s.o.out_dir) / "worker.pt").string();
    if (std::filesystem::exists(s.checkpoint)) {
      auto clients = s.core->LoadCheckpoint(s.checkpoint);
      if (!clients.ok()) return named("--out", clients.status());
      s.Log(absl::StrFormat("worker %s resumed from %s: %d server updates, progress of %d clients",
                            s.o.name, s.checkpoint, s.core->stats().updates, *clients));
    }
  }
  if (core_options.rounds) SPLITQ_RETURN_IF_ERROR(s.JoinGroup());
  s.saved_updates = s.core->stats().updates;
  WorkerServiceOptions service_options;
  service_options.reply_chunk_bytes = s.o.reply_chunk_bytes;
  service_options.merge = MergeOptions{s.o.config.merge_max_clients, s.o.config.merge_max_targets,
                                       s.o.config.merge_window_ms, core_options.rounds};
  service_options.log = [&s](const std::string& line) {
    s.Log(absl::StrCat("worker ", s.o.name, ": ", line));
  };
  s.service = std::make_unique<WorkerService>(*s.core, s.o.tokens, service_options);

  SPLITQ_ASSIGN_OR_RETURN(const rpc::WorkerAddress listen, rpc::ParseHostPort(s.o.listen));
  ServingOptions serving;
  serving.listen = s.o.listen;
  serving.security = s.o.security;
  serving.max_receive_message_bytes = rpc::MaxMessageBytes(core_options.assembler);
  serving.keepalive = true;
  auto started = StartServing(serving, {s.service.get()}, splitq::v1::Worker::service_full_name());
  if (!started.ok()) return started.status();
  s.serving = std::move(*started);
  s.advertised = rpc::WorkerAddress{
      s.o.advertise.empty() ? listen.host : s.o.advertise,
      s.o.advertise_port != 0 ? s.o.advertise_port : static_cast<uint32_t>(s.serving.port)};
  if (s.advertised.host == "0.0.0.0" || s.advertised.host == "::" || s.advertised.host.empty()) {
    char host[256] = {};
    gethostname(host, sizeof host - 1);
    s.advertised.host = host;
  }
  s.Log(absl::StrFormat("worker %s listening on %s (%s), server part on %s%s", s.o.name,
                        rpc::JoinHostPort(s.advertised),
                        s.o.security.insecure ? "plaintext" : "TLS", s.part->device(),
                        MergeText(service_options.merge, s.o.config.u_shaped)));
  if (s.advertised.port != static_cast<uint32_t>(s.serving.port)) {  // a proxy in front
    s.Log(absl::StrFormat("worker %s bound to %s:%d", s.o.name, listen.host, s.serving.port));
  }
  return std::unique_ptr<WorkerProcess>(new WorkerProcess(std::move(impl)));
}

std::string WorkerProcess::address() const { return rpc::JoinHostPort(impl_->advertised); }

absl::Status WorkerProcess::Run(const std::atomic<bool>& stop) {
  Impl& s = *impl_;
  // The coordinator: register (it may start after us), then heartbeat.
  SPLITQ_ASSIGN_OR_RETURN(auto channel, client::MakeChannel(s.o.coordinator, s.o.security));
  client::CoordinatorClient coordinator(channel, s.o.own_token);
  client::Registration registration;
  auto register_once = [&]() -> absl::Status {
    if (stop.load()) return absl::CancelledError("stopped");
    auto r = coordinator.Register(rpc::Role::kWorker, s.o.name, s.advertised, s.o.max_clients);
    if (r.status().code() == absl::StatusCode::kAlreadyExists) {
      // Our previous run (a restart) until the coordinator marks it dead (its heartbeat
      // deadline), or another live worker with this name, which the connect timeout ends.
      return absl::UnavailableError(absl::StrCat(
          r.status().message(), " (our previous run, or another worker with this name)"));
    }
    if (!r.ok()) return r.status();
    registration = *r;
    return absl::OkStatus();
  };
  const absl::Status registered = client::RetryWithBackoff(
      register_once, [&](const absl::Status& e) { return client::IsTransient(e) && !stop.load(); },
      s.o.connect_timeout,
      [&](const absl::Status& e, std::chrono::milliseconds wait) {
        s.Warn(absl::StrCat("coordinator ", s.o.coordinator, ": ", e.message(), "; retrying in ",
                            wait.count(), " ms"));
      });
  if (!registered.ok()) {
    s.serving.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    if (stop.load()) return absl::OkStatus();  // stopped while registering: a clean stop
    return absl::Status(registered.code(), absl::StrCat("register: ", registered.message()));
  }
  s.Log(absl::StrCat("worker ", s.o.name, " registered with the coordinator at ", s.o.coordinator));
  ReadyFile ready(s.o.ready_file);  // listening and registered: clients can be sent here
  if (absl::Status a = ready.Announce(address()); !a.ok()) {
    (void)coordinator.Leave(registration.member_id);  // no client is sent to a worker that quit
    s.serving.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    return absl::Status(a.code(), absl::StrCat("--ready-file: ", a.message()));
  }
  std::atomic<uint64_t> member_id{registration.member_id};  // the last registration's
  {
    client::Heartbeater heartbeat(
        coordinator, registration.member_id, registration.heartbeat_period,
        [&s] {
          const WorkerStats w = s.core->stats();
          return client::Heartbeater::Progress{static_cast<uint64_t>(w.steps_served),
                                               w.train_sessions};
        },
        [&]() -> absl::StatusOr<uint64_t> {
          auto r =
              coordinator.Register(rpc::Role::kWorker, s.o.name, s.advertised, s.o.max_clients);
          if (!r.ok()) return r.status();
          s.Log(absl::StrCat("worker ", s.o.name,
                             " registered again with the coordinator (it had lost us)"));
          member_id.store(r->member_id);
          return r->member_id;
        },
        [&s](const std::string& line) { s.Log(absl::StrCat("worker ", s.o.name, ": ", line)); });
    auto last_status = std::chrono::steady_clock::now();
    while (!stop.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      if (!s.checkpoint.empty() && s.o.checkpoint_every > 0 &&
          s.core->stats().updates - s.saved_updates >= s.o.checkpoint_every) {
        (void)s.Save(false);
      }
      if (std::chrono::steady_clock::now() - last_status > std::chrono::seconds(10)) {
        last_status = std::chrono::steady_clock::now();
        const WorkerStats w = s.core->stats();
        s.Log(absl::StrFormat("worker %s: %u sessions (train and evaluate), %s", s.o.name,
                              w.sessions, StatsText(w)));
      }
    }
  }
  // After the heartbeat thread has stopped, so that no beat re-registers us after the goodbye.
  (void)coordinator.Leave(member_id.load());
  s.serving.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  const bool saved = s.checkpoint.empty() || s.Save(true);
  const WorkerStats w = s.core->stats();
  if (!s.o.out_dir.empty()) {
    const std::string report = (std::filesystem::path(s.o.out_dir) / "worker.json").string();
    if (absl::Status r = base::WriteFileAtomically(
            report, ReportJson(s.o.name, s.o.group_rank, w, s.core->weights_digest()));
        !r.ok()) {
      s.Warn(absl::StrCat("worker ", s.o.name, ": ", r.ToString()));
    }
  }
  std::string group;
  if (s.group) {
    const auto [round_ms, sum_ms] = s.part->group_ms();
    group = absl::StrFormat(
        "; group rounds with work %.0f ms, of which the gradient sum %.0f ms "
        "(%.1f%%)",
        round_ms, sum_ms, round_ms > 0 ? 100 * sum_ms / round_ms : 0.0);
  }
  s.Log(absl::StrFormat("worker %s stopped: %s; peak RSS %.0f MiB%s", s.o.name, StatsText(w),
                        base::PeakRssMiB(), group));
  if (!saved) return absl::InternalError("the final checkpoint was not saved");
  return absl::OkStatus();
}

}  // namespace splitq::server

#include "server/worker_process.h"

#include <unistd.h>

#include <filesystem>
#include <memory>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "base/files.h"
#include "base/log.h"
#include "base/memory.h"
#include "base/status_macros.h"
#include "client/coordinator_client.h"
#include "client/worker_client.h"
#include "proto/protocol.h"
#include "server/metrics_server.h"
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
std::string ReportJson(const std::string& name, int rank, int64_t generation, const WorkerStats& w,
                       const std::string& digest) {
  return absl::StrFormat(
      "{\n  \"name\": \"%s\",\n  \"rank\": %d,\n  \"generation\": %d,\n"
      "  \"server_updates\": %d,\n  \"steps_served\": %d,\n  \"steps_applied\": %d,\n"
      "  \"updates_here\": %d,\n  \"group_steps_applied\": %d,\n"
      "  \"clients_next_sum\": %d,\n  \"weights_sha256\": \"%s\"\n}\n",
      name, rank, generation, w.updates, w.steps_served, w.steps_applied, w.updates_here,
      w.group_steps_applied, w.clients_next_sum, digest);
}
}  // namespace

struct WorkerProcess::Impl {
  WorkerProcessOptions o;
  std::unique_ptr<ConnectionGuard> guard;  // first: the service and server go before it
  // Before everything that updates it; its server goes first (it reads the core's stats).
  std::unique_ptr<base::Registry> metrics;
  // Worker groups. Before the part, the core and the service: they go after them (the
  // service's compute thread runs the group's rounds until it is joined).
  std::unique_ptr<trainer::GroupStore> store;  // this member's store (used while it is rank 0)
  std::unique_ptr<trainer::ReplicaGroup> group;
  std::unique_ptr<trainer::ServerPart> part;
  std::unique_ptr<WorkerCore> core;
  std::unique_ptr<WorkerService> service;
  Serving serving;
  std::unique_ptr<MetricsServer> metrics_server;  // after everything its scrapes read
  rpc::WorkerAddress advertised;
  std::string checkpoint;  // "" : none
  int64_t saved_updates = 0;
  std::shared_ptr<grpc::Channel> coordinator_channel;
  std::atomic<uint64_t> member_id{0};  // the coordinator's id for us (0: not registered yet)
  std::atomic<const std::atomic<bool>*> stop{nullptr};  // Run's flag
  std::atomic<int64_t> latest_generation{0};            // the newest the coordinator named
  // The compute thread's (BeforeRound).
  std::unique_ptr<client::CoordinatorClient> group_coordinator;
  int64_t failed_generation = 0;  // a generation that could not be formed
  bool formed_once = false;
  std::chrono::steady_clock::time_point waiting_since = std::chrono::steady_clock::now();
  std::string last_note;
  int group_root = 0;        // whose state the last generation took
  std::atomic<int> rank{0};  // in the last generation formed (for worker.json)
  std::atomic<int64_t> generation{0};
  std::atomic<int> world{0};  // the formed generation's size (0: none now; for the metrics)

  void Log(const std::string& line) const {
    if (o.log) o.log(line);
  }
  // The numbers that live in the core, the part and the group, copied in at each scrape.
  void AddScrapedMetrics() {
    base::Registry& r = *metrics;
    base::Metric* sessions_train =
        r.Gauge("splitq_worker_sessions", "Open sessions", {{"kind", "train"}});
    base::Metric* sessions_eval =
        r.Gauge("splitq_worker_sessions", "Open sessions", {{"kind", "evaluate"}});
    base::Metric* updates =
        r.Counter("splitq_worker_server_updates_total",
                  "Optimizer updates of the server part (checkpoints included)");
    base::Metric* applied = r.Counter("splitq_worker_steps_applied_total",
                                      "Client steps applied to the server part by this process "
                                      "(replays excluded)");
    base::Metric* updates_here =
        r.Counter("splitq_worker_updates_here_total", "Updates this process took");
    base::Metric* buffered = r.Gauge("splitq_worker_buffered_bytes",
                                     "Bytes held by sessions' partial frames and labels");
    base::Metric* rss = r.Gauge("splitq_worker_resident_bytes", "Resident memory");
    base::Metric* group_world = r.Gauge("splitq_worker_group_members",
                                        "Members of this worker's group generation (0: alone)");
    base::Metric* group_generation =
        r.Gauge("splitq_worker_group_generation", "The group generation last formed (0: none)");
    base::Metric* group_rank = r.Gauge("splitq_worker_group_rank", "This member's rank");
    base::Metric* sum_seconds =
        r.Counter("splitq_worker_group_sum_seconds_total", "Time in group rounds' gradient sums");
    base::Metric* round_seconds =
        r.Counter("splitq_worker_round_seconds_total", "Time in merged or group rounds with work");
    r.OnScrape([=] {
      const WorkerStats w = core->stats();
      sessions_train->Set(w.train_sessions);
      sessions_eval->Set(w.sessions - w.train_sessions);
      updates->Set(static_cast<double>(w.updates));
      applied->Set(static_cast<double>(w.steps_applied));
      updates_here->Set(static_cast<double>(w.updates_here));
      buffered->Set(static_cast<double>(core->buffered_bytes()));
      rss->Set(base::RssMiB() * 1048576.0);
      group_world->Set(store ? static_cast<double>(world.load()) : 0);
      group_generation->Set(static_cast<double>(generation.load()));
      group_rank->Set(rank.load());
      const trainer::RoundTimes t = part->round_times();
      sum_seconds->Set(t.sum_ms / 1e3);
      round_seconds->Set(t.total_ms / 1e3);
    });
  }
  void Warn(const std::string& line) const {
    if (o.warn) o.warn(line);
  }
  bool Stopping(const std::atomic<bool>& closing) const {
    const std::atomic<bool>* flag = stop.load();
    return closing.load() || (flag != nullptr && flag->load());
  }
  rpc::WorkerAddress GroupStoreAddress() const {
    return store ? rpc::WorkerAddress{o.group_address, static_cast<uint32_t>(store->port())}
                 : rpc::WorkerAddress{};
  }

  // On the compute thread before each round (MergeOptions::before_round): true with a formed
  // group; forms the next generation first when there is none or it broke. False only when
  // the worker stops.
  bool BeforeRound(const std::atomic<bool>& closing) {
    while (!Stopping(closing)) {
      if (group && !group->broken()) {
        group->set_latest_generation(latest_generation.load());
        return true;
      }
      const absl::Status formed = FormNext();
      if (formed.ok()) continue;
      const std::string note(formed.message());
      if (note != last_note) {
        last_note = note;
        Log(absl::StrCat("worker ", o.name, ": ", note));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return false;
  }

  // Asks the coordinator for the group's view and, when it names a generation we can form,
  // forms it and takes the state of the member with the most updates. UNAVAILABLE (a note for
  // the log) while there is nothing to form yet.
  absl::Status FormNext() {
    const uint64_t id = member_id.load();
    if (id == 0) return absl::UnavailableError("waiting to register with the coordinator");
    const int64_t failed = group ? group->generation() : failed_generation;
    auto asked = group_coordinator->Group(id, failed);
    if (!asked.ok()) {
      return absl::UnavailableError(
          absl::StrCat("asking the coordinator for the group: ", asked.status().message()));
    }
    const rpc::GroupView& view = *asked;
    latest_generation.store(view.generation);
    if (view.generation == failed) {
      return absl::UnavailableError(
          absl::StrCat("group generation ", failed, " ended; waiting for the coordinator's next"));
    }
    if (!formed_once && view.world < static_cast<uint32_t>(o.group_size) &&
        std::chrono::steady_clock::now() - waiting_since < o.group_timeout) {
      return absl::UnavailableError(
          absl::StrFormat("waiting for %d group members (%d so far)", o.group_size, view.world));
    }
    if (group) {
      part->set_group(nullptr);
      group.reset();
      world.store(0);  // no generation formed now (the metrics' group_members)
    }
    trainer::ReplicaGroupOptions g;
    g.backend = o.config.group_backend;
    g.store_host = view.store.host;
    g.store_port = static_cast<int>(view.store.port);
    g.rank = static_cast<int>(view.rank);
    g.world = static_cast<int>(view.world);
    g.generation = view.generation;
    g.interface_host = o.group_address;
    g.timeout = o.group_timeout;
    Log(absl::StrFormat("worker %s: forming group generation %d as rank %d of %d (%s) at %s",
                        o.name, view.generation, view.rank, view.world,
                        absl::StrJoin(view.members, ", "), rpc::JoinHostPort(view.store)));
    auto made = trainer::ReplicaGroup::Create(
        g, part->device() == "cuda" ? at::Device(at::kCUDA) : at::Device(at::kCPU));
    if (!made.ok()) {
      failed_generation = view.generation;
      return made.status();
    }
    group = std::move(*made);
    if (absl::Status taken = TakeGroupState(); !taken.ok()) {
      group->MarkBroken();
      return taken;
    }
    part->set_group(group.get());
    formed_once = true;
    rank.store(group->rank());
    generation.store(group->generation());
    world.store(group->world());
    last_note.clear();
    Log(absl::StrFormat(
        "worker %s: group of %d formed (%s), generation %d, rank %d, %d server updates "
        "(the state of rank %d)",
        o.name, group->world(), group->backend(), group->generation(), group->rank(),
        core->stats().updates, group_root));
    return absl::OkStatus();
  }

  // Every member takes the state of the member with the most updates (the lowest rank among
  // equals): its weights, optimizer, updates and clients' progress, as a worker checkpoint
  // broadcast, so that replicas start each generation identical.
  absl::Status TakeGroupState() {
    const int64_t mine = core->stats().updates;
    SPLITQ_ASSIGN_OR_RETURN(const std::vector<int64_t> most, group->Max({mine}));
    SPLITQ_ASSIGN_OR_RETURN(const std::vector<int64_t> first,
                            group->Max({mine == most[0] ? group->world() - group->rank() : 0}));
    group_root = group->world() - static_cast<int>(first[0]);
    if (group->world() == 1) return absl::OkStatus();
    const std::filesystem::path state = std::filesystem::temp_directory_path() /
                                        absl::StrCat("splitq-group-", o.name, "-", getpid(), ".pt");
    std::string bytes;
    if (group->rank() == group_root) {
      SPLITQ_RETURN_IF_ERROR(core->SaveCheckpoint(state.string()).status());
      auto read = base::ReadSmallFile(state, "group state", size_t{1} << 34);
      std::filesystem::remove(state);
      if (!read.ok()) return read.status();
      bytes = std::move(*read);
    }
    SPLITQ_ASSIGN_OR_RETURN(bytes, group->Broadcast(bytes, group_root));
    if (group->rank() != group_root) {
      SPLITQ_RETURN_IF_ERROR(base::WriteFileAtomically(state, bytes, 0600));
      auto loaded = core->LoadCheckpoint(state.string(), /*serving=*/true);
      std::filesystem::remove(state);
      if (!loaded.ok()) return loaded.status();
    }
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
  core_options.rounds = s.o.group_size >= 1;
  // No frame above what a client of this run can send (the assembler's default is 256 MiB).
  if (const int64_t most = s.part->max_frame_bytes(); most > 0) {
    core_options.assembler.max_frame_bytes = std::min(core_options.assembler.max_frame_bytes, most);
  }
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
  SPLITQ_ASSIGN_OR_RETURN(s.coordinator_channel,
                          client::MakeChannel(s.o.coordinator, s.o.security));
  if (core_options.rounds) {
    auto store = trainer::GroupStore::Start("0.0.0.0", 0, s.o.group_timeout);
    if (!store.ok()) return named("--group-size", store.status());
    s.store = std::move(*store);
    s.group_coordinator =
        std::make_unique<client::CoordinatorClient>(s.coordinator_channel, s.o.own_token);
  }
  s.saved_updates = s.core->stats().updates;
  WorkerServiceOptions service_options;
  service_options.reply_chunk_bytes = s.o.reply_chunk_bytes;
  service_options.session_idle_ms = s.o.session_idle_ms;
  service_options.turn_idle_ms = s.o.turn_idle_ms;
  service_options.merge.max_clients = s.o.config.merge_max_clients;
  service_options.merge.max_targets = s.o.config.merge_max_targets;
  service_options.merge.window_ms = s.o.config.merge_window_ms;
  service_options.merge.rounds = core_options.rounds;
  if (core_options.rounds) {
    service_options.merge.before_round = [&s](const std::atomic<bool>& closing) {
      return s.BeforeRound(closing);
    };
  }
  // Session lines are caused by peers: at most 20 a second (bursts of 200), and the next line
  // that goes out says how many were left out.
  auto budget = std::make_shared<base::LineBudget>(20, 200);
  service_options.log = [&s, budget](const std::string& line) {
    int64_t suppressed = 0;
    if (!budget->Take(&suppressed)) return;
    s.Log(absl::StrCat("worker ", s.o.name, ": ", line,
                       suppressed > 0 ? absl::StrCat(" (", suppressed,
                                                     " session lines left out before this one: "
                                                     "more than 20 a second)")
                                      : std::string()));
  };
  if (const std::string note = FitToDescriptorLimit(&s.o.connection_limits); !note.empty()) {
    s.Log(absl::StrCat("worker ", s.o.name, ": ", note));
  }
  // A client holds a Train and an Evaluate stream, each with at most one message in flight.
  s.Log(absl::StrCat(
      "worker ", s.o.name, ": ",
      ResolveGrpcMemory(&s.o.connection_limits, int64_t{2} * s.o.max_clients *
                                                    rpc::MaxMessageBytes(core_options.assembler))));
  s.guard = std::make_unique<ConnectionGuard>(s.o.connection_limits);
  service_options.guard = s.guard.get();
  if (!s.o.metrics_listen.empty()) {
    s.metrics = std::make_unique<base::Registry>();
    service_options.metrics = s.metrics.get();
  }
  s.service = std::make_unique<WorkerService>(*s.core, s.o.tokens, service_options);

  SPLITQ_ASSIGN_OR_RETURN(const rpc::WorkerAddress listen, rpc::ParseHostPort(s.o.listen));
  ServingOptions serving;
  serving.listen = s.o.listen;
  serving.security = s.o.security;
  serving.max_receive_message_bytes = rpc::MaxMessageBytes(core_options.assembler);
  serving.keepalive = true;
  serving.guard = s.guard.get();
  auto started = StartServing(serving, {s.service.get()});
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
  s.Log(absl::StrFormat(
      "worker %s listening on %s (%s), server part on %s, frames up to %.1f MiB%s", s.o.name,
      rpc::JoinHostPort(s.advertised), s.o.security.insecure ? "plaintext" : "TLS",
      s.part->device(), static_cast<double>(core_options.assembler.max_frame_bytes) / (1 << 20),
      MergeText(service_options.merge, s.o.config.u_shaped)));
  if (s.advertised.port != static_cast<uint32_t>(s.serving.port)) {  // a proxy in front
    s.Log(absl::StrFormat("worker %s bound to %s:%d", s.o.name, listen.host, s.serving.port));
  }
  if (s.metrics) {
    s.AddScrapedMetrics();
    auto metrics = MetricsServer::Start(s.o.metrics_listen, *s.metrics);
    if (!metrics.ok()) return metrics.status();
    s.metrics_server = std::move(*metrics);
    s.Log(absl::StrFormat("worker %s: metrics at http://%s/metrics", s.o.name,
                          s.metrics_server->address()));
  }
  return std::unique_ptr<WorkerProcess>(new WorkerProcess(std::move(impl)));
}

std::string WorkerProcess::address() const { return rpc::JoinHostPort(impl_->advertised); }

absl::Status WorkerProcess::Run(const std::atomic<bool>& stop) {
  Impl& s = *impl_;
  s.stop.store(&stop);
  // The coordinator: register (it may start after us), then heartbeat.
  client::CoordinatorClient coordinator(s.coordinator_channel, s.o.own_token);
  client::Registration registration;
  auto register_once = [&]() -> absl::Status {
    if (stop.load()) return absl::CancelledError("stopped");
    auto r = coordinator.Register(rpc::Role::kWorker, s.o.name, s.advertised, s.o.max_clients,
                                  s.GroupStoreAddress());
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
  s.member_id.store(registration.member_id);  // a group forms from here on
  ReadyFile ready(s.o.ready_file);            // listening and registered: clients can be sent here
  if (absl::Status a = ready.Announce(address()); !a.ok()) {
    (void)coordinator.Leave(registration.member_id);  // no client is sent to a worker that quit
    s.serving.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    return absl::Status(a.code(), absl::StrCat("--ready-file: ", a.message()));
  }
  {
    client::Heartbeater heartbeat(
        coordinator, registration.member_id, registration.heartbeat_period,
        [&s] {
          const WorkerStats w = s.core->stats();
          return client::Heartbeater::Progress{static_cast<uint64_t>(w.steps_served),
                                               w.train_sessions, 0, s.generation.load()};
        },
        [&]() -> absl::StatusOr<uint64_t> {
          auto r = coordinator.Register(rpc::Role::kWorker, s.o.name, s.advertised, s.o.max_clients,
                                        s.GroupStoreAddress());
          if (!r.ok()) return r.status();
          s.Log(absl::StrCat("worker ", s.o.name,
                             " registered again with the coordinator (it had lost us)"));
          s.member_id.store(r->member_id);
          return r->member_id;
        },
        [&s](const std::string& line) { s.Log(absl::StrCat("worker ", s.o.name, ": ", line)); });
    auto last_status = std::chrono::steady_clock::now();
    int ticks = 0;
    // Memory freed by closed sessions and by requests gRPC cancelled (its memory quota) goes
    // back to the system (base/memory.h).
    base::MemoryTrimmer trimmer;
    while (!stop.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      trimmer.Tick();
      if (s.store && ++ticks % 3 == 0) {
        // The group's generation, so that the members leave an old one at their next round.
        auto view = coordinator.Group(s.member_id.load());
        if (view.ok()) s.latest_generation.store(view->generation);
      }
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
  (void)coordinator.Leave(s.member_id.load());
  s.serving.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  const bool saved = s.checkpoint.empty() || s.Save(true);
  const WorkerStats w = s.core->stats();
  if (!s.o.out_dir.empty()) {
    const std::string report = (std::filesystem::path(s.o.out_dir) / "worker.json").string();
    if (absl::Status r = base::WriteFileAtomically(
            report,
            ReportJson(s.o.name, s.rank.load(), s.generation.load(), w, s.core->weights_digest()));
        !r.ok()) {
      s.Warn(absl::StrCat("worker ", s.o.name, ": ", r.ToString()));
    }
  }
  std::string group;
  const trainer::RoundTimes t = s.part->round_times();
  if (t.rounds > 0) {
    group = absl::StrFormat(
        "; %lld merged rounds: decoding %.0f ms, forward and backward %.0f ms, gradients "
        "%.0f ms, update %.0f ms",
        static_cast<long long>(t.rounds), t.inputs_ms, t.compute_ms, t.gradients_ms, t.update_ms);
  }
  if (s.store) {
    group += absl::StrFormat(
        "; group rounds with work %.0f ms, of which the gradient sum %.0f ms "
        "(%.1f%%)",
        t.total_ms, t.sum_ms, t.total_ms > 0 ? 100 * t.sum_ms / t.total_ms : 0.0);
  }
  s.Log(absl::StrFormat("worker %s stopped: %s; peak RSS %.0f MiB%s", s.o.name, StatsText(w),
                        base::PeakRssMiB(), group));
  if (!saved) return absl::InternalError("the final checkpoint was not saved");
  return absl::OkStatus();
}

}  // namespace splitq::server

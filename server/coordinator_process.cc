#include "server/coordinator_process.h"

#include <thread>

#include "absl/strings/str_cat.h"
#include "base/memory.h"
#include "base/metrics.h"
#include "base/status_macros.h"
#include "server/coordinator_core.h"
#include "server/coordinator_service.h"
#include "server/metrics_server.h"
#include "server/process.h"

namespace splitq::server {

struct CoordinatorProcess::Impl {
  CoordinatorProcessOptions o;
  std::unique_ptr<ConnectionGuard> guard;  // first: the service and server go before it
  std::unique_ptr<base::Registry> metrics;
  std::unique_ptr<CoordinatorCore> core;
  std::unique_ptr<CoordinatorService> service;
  Serving serving;
  std::unique_ptr<MetricsServer> metrics_server;  // goes first: its scrapes read the core
  std::string host;
  void Log(const std::string& line) const {
    if (o.log) o.log(line);
  }
};

CoordinatorProcess::CoordinatorProcess(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CoordinatorProcess::~CoordinatorProcess() = default;

absl::StatusOr<std::unique_ptr<CoordinatorProcess>> CoordinatorProcess::Start(
    const CoordinatorProcessOptions& options) {
  auto impl = std::make_unique<Impl>();
  Impl& s = *impl;
  s.o = options;
  s.core = std::make_unique<CoordinatorCore>(CoordinatorOptions{
      s.o.heartbeat_period, 2 * s.o.heartbeat_period, 64, s.o.forget_after, s.o.rebalance_groups});
  if (const std::string note = FitToDescriptorLimit(&s.o.connection_limits); !note.empty()) {
    s.Log(absl::StrCat("coordinator: ", note));
  }
  s.Log(absl::StrCat("coordinator: ", ResolveGrpcMemory(&s.o.connection_limits, 0)));
  s.guard = std::make_unique<ConnectionGuard>(s.o.connection_limits);
  if (!s.o.metrics_listen.empty()) s.metrics = std::make_unique<base::Registry>();
  s.service = std::make_unique<CoordinatorService>(*s.core, s.o.tokens, s.o.config_yaml,
                                                   s.guard.get(), s.metrics.get());
  ServingOptions serving;
  serving.guard = s.guard.get();
  serving.listen = s.o.listen;
  serving.security = s.o.security;
  SPLITQ_ASSIGN_OR_RETURN(s.serving, StartServing(serving, {s.service.get()}));
  s.host = s.o.listen.substr(0, s.o.listen.rfind(':'));
  s.Log(absl::StrCat("coordinator listening on ", s.host, ":", s.serving.port, " (",
                     s.o.security.insecure ? "plaintext" : "TLS", ")"));
  if (s.metrics) {
    base::Registry& r = *s.metrics;
    base::Metric* workers =
        r.Gauge("splitq_coordinator_members", "Live members, by role", {{"role", "worker"}});
    base::Metric* clients =
        r.Gauge("splitq_coordinator_members", "Live members, by role", {{"role", "client"}});
    base::Metric* records =
        r.Gauge("splitq_coordinator_records", "Member records held: alive, dead and departed");
    base::Metric* steps = r.Gauge("splitq_coordinator_client_steps",
                                  "Steps completed, summed over the live clients (as heartbeated)");
    base::Metric* rss = r.Gauge("splitq_coordinator_resident_bytes", "Resident memory");
    CoordinatorCore* core = s.core.get();
    r.OnScrape([=] {
      const CoordinatorTotals t = core->Totals();
      workers->Set(static_cast<double>(t.workers));
      clients->Set(static_cast<double>(t.clients));
      records->Set(static_cast<double>(t.records));
      steps->Set(static_cast<double>(t.client_steps));
      rss->Set(base::RssMiB() * 1048576.0);
    });
    SPLITQ_ASSIGN_OR_RETURN(s.metrics_server, MetricsServer::Start(s.o.metrics_listen, r));
    s.Log(absl::StrCat("coordinator: metrics at http://", s.metrics_server->address(), "/metrics"));
  }
  return std::unique_ptr<CoordinatorProcess>(new CoordinatorProcess(std::move(impl)));
}

std::string CoordinatorProcess::address() const {
  return absl::StrCat(impl_->host, ":", impl_->serving.port);
}

absl::Status CoordinatorProcess::Run(const std::atomic<bool>& stop) {
  ReadyFile ready(impl_->o.ready_file);
  if (absl::Status a = ready.Announce(address()); !a.ok()) {
    return absl::Status(a.code(), absl::StrCat("--ready-file: ", a.message()));
  }
  while (!stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  impl_->serving.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  impl_->Log("coordinator stopped");
  return absl::OkStatus();
}

}  // namespace splitq::server

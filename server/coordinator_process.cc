#include "server/coordinator_process.h"

#include <thread>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "server/coordinator_core.h"
#include "server/coordinator_service.h"
#include "server/process.h"

namespace splitq::server {

struct CoordinatorProcess::Impl {
  CoordinatorProcessOptions o;
  std::unique_ptr<ConnectionGuard> guard;  // first: the service and server go before it
  std::unique_ptr<CoordinatorCore> core;
  std::unique_ptr<CoordinatorService> service;
  Serving serving;
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
  s.service =
      std::make_unique<CoordinatorService>(*s.core, s.o.tokens, s.o.config_yaml, s.guard.get());
  ServingOptions serving;
  serving.guard = s.guard.get();
  serving.listen = s.o.listen;
  serving.security = s.o.security;
  SPLITQ_ASSIGN_OR_RETURN(s.serving, StartServing(serving, {s.service.get()},
                                                  splitq::v1::Coordinator::service_full_name()));
  s.host = s.o.listen.substr(0, s.o.listen.rfind(':'));
  s.Log(absl::StrCat("coordinator listening on ", s.host, ":", s.serving.port, " (",
                     s.o.security.insecure ? "plaintext" : "TLS", ")"));
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

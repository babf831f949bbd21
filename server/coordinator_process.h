// splitq server: a coordinator process as a library object (`splitq coordinator` parses flags
// and runs one): the Coordinator service (coordinator_service.h) with the standard health
// service, serving the run config to workers and clients, until stopped.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "proto/rpc_channel.h"
#include "server/connection_guard.h"
#include "server/tokens.h"

namespace splitq::server {

struct CoordinatorProcessOptions {
  std::string config_yaml;  // the run config's text, as members fetch it
  std::string listen = "127.0.0.1:0";
  rpc::TransportSecurity security;
  const TokenSet* tokens = nullptr;                                  // null: none checked
  std::chrono::milliseconds heartbeat_period{1000};                  // dead after two
  std::chrono::milliseconds forget_after{std::chrono::minutes(10)};  // CoordinatorOptions
  bool rebalance_groups = true;                                      // CoordinatorOptions
  ConnectionLimits connection_limits;                                // connection_guard.h
  std::string ready_file;                                            // server/process.h, ReadyFile
  std::string metrics_listen;  // HOST:PORT for Prometheus' /metrics ("" : none; metrics_server.h)
  std::function<void(const std::string&)> log;  // "coordinator ..." lines
};

class CoordinatorProcess {
 public:
  // Starts listening. UNAVAILABLE when it cannot; flag and certificate errors as StartServing.
  static absl::StatusOr<std::unique_ptr<CoordinatorProcess>> Start(
      const CoordinatorProcessOptions& options);
  ~CoordinatorProcess();
  // Announces (ready file) and serves until `stop` is set, then stops serving.
  absl::Status Run(const std::atomic<bool>& stop);
  // "HOST:PORT": --listen's host with the port bound.
  std::string address() const;

 private:
  struct Impl;
  explicit CoordinatorProcess(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace splitq::server

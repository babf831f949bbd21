#include "server/process.h"

#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/resource_quota.h>
#include <grpcpp/server_builder.h>

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "base/files.h"
#include "base/status_macros.h"
#include "proto/protocol.h"

namespace splitq::server {

absl::StatusOr<Serving> StartServing(const ServingOptions& options,
                                     const std::vector<grpc::Service*>& services) {
  // HOST:PORT with PORT 0..65535 (gRPC itself would take 99999 as 34463, a missing port as 443
  // and "unix:/path" as a socket: the sixth outside probe).
  SPLITQ_RETURN_IF_ERROR(rpc::ParseHostPort(options.listen).status());
  SPLITQ_ASSIGN_OR_RETURN(auto credentials, rpc::MakeServerCredentials(options.security));
  grpc::EnableDefaultHealthCheckService(false);  // (a process-wide switch, read at build)
  grpc::ServerBuilder builder;
  Serving out;
  // Every Check is answered for the whole server (health.h).
  out.health = std::make_unique<HealthService>();
  builder.RegisterService(out.health.get());
  builder.AddListeningPort(options.listen, credentials, &out.port);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddChannelArgument(GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS, options.handshake_timeout_ms);
  for (grpc::Service* service : services) builder.RegisterService(service);
  if (options.guard != nullptr) {
    SPLITQ_ASSIGN_OR_RETURN(std::unique_ptr<grpc::ServerBuilderOption> option,
                            options.guard->BuilderOption());
    if (option != nullptr) builder.SetOption(std::move(option));
    const ConnectionLimits& limits = options.guard->limits();
    if (limits.max_streams_per_connection > 0) {
      builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS,
                                 limits.max_streams_per_connection);
    }
    if (limits.grpc_memory_mib != 0) {  // kAutoGrpcMemory unresolved: nothing in flight
      ConnectionLimits resolved = limits;
      ResolveGrpcMemory(&resolved, 0);
      grpc::ResourceQuota quota("splitq");
      quota.Resize(static_cast<size_t>(resolved.grpc_memory_mib) << 20);
      builder.SetResourceQuota(quota);
    }
  }
  if (options.max_receive_message_bytes > 0) {
    builder.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  }
  if (options.keepalive) {
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 5000);
    builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  }
  out.server = builder.BuildAndStart();
  if (out.server == nullptr || out.port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen));
  }
  return out;
}

ReadyFile::~ReadyFile() {
  if (written_) std::remove(path_.c_str());
}

absl::Status ReadyFile::Announce(const std::string& address) {
  if (path_.empty()) return absl::OkStatus();
  SPLITQ_RETURN_IF_ERROR(base::WriteFileAtomically(path_, address + "\n"));
  written_ = true;
  return absl::OkStatus();
}

}  // namespace splitq::server

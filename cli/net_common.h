// splitq CLI: what the networked subcommands (worker, client, demo) share: the run config's
// digest, channels with splitq's arguments, host:port parsing and token files.
#pragma once

#include <grpcpp/channel.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/coordinator_core.h"
#include "server/rpc_channel.h"

namespace splitq::cli {

// Hex SHA-256 of the config file's bytes and the --set overrides, in order, except `device=`
// (each process runs on its own device) and `client.*` (the client's own settings). A worker
// refuses a client whose digest differs: both must start from the same file and overrides.
absl::StatusOr<std::string> ConfigDigest(const std::string& path,
                                         const std::vector<std::string>& overrides);

// A channel to `target` (HOST:PORT) with keepalive and 4 MiB chunk sizes
// (server/worker_client.h, ClientChannelArguments).
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(
    const std::string& target, const server::TransportSecurity& security);

// "HOST:PORT" (IPv6 as "[::1]:PORT") -> {host, port}; INVALID_ARGUMENT otherwise.
absl::StatusOr<server::WorkerAddress> ParseHostPort(const std::string& text);
// {host, port} -> "HOST:PORT" (brackets around IPv6 literals).
std::string JoinHostPort(const server::WorkerAddress& address);

// This process's peak resident set (VmHWM) in MiB, or -1 when /proc is not readable.
double PeakRssMiB();
// ... and its resident set now (VmRSS).
double RssMiB();

// The token in `path`, or "" for an empty path.
absl::StatusOr<std::string> TokenFromFile(const std::string& path);

}  // namespace splitq::cli

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

// --ready-file PATH of the servers: once a server listens, the address its peers dial,
// "HOST:PORT\n" (the coordinator: --listen's host with the port bound; a worker: the address it
// advertises), written atomically, so that a script or `splitq demo` waits for the file instead
// of reading log text. The file is removed when the object goes (the server stops), so it
// exists exactly while the server serves. An empty path writes nothing.
class ReadyFile {
 public:
  explicit ReadyFile(std::string path) : path_(std::move(path)) {}
  ReadyFile(const ReadyFile&) = delete;
  ReadyFile& operator=(const ReadyFile&) = delete;
  ~ReadyFile();
  // INTERNAL naming the file when it cannot be written.
  absl::Status Announce(const std::string& address);

 private:
  std::string path_;
  bool written_ = false;
};

// The token in `path`, or "" for an empty path.
absl::StatusOr<std::string> TokenFromFile(const std::string& path);

}  // namespace splitq::cli

// splitq CLI: what the networked subcommands (worker, client, demo) share: the run config's
// digest, channels with splitq's arguments, host:port parsing and token files.
#pragma once

#include <grpcpp/channel.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/memory.h"
#include "client/worker_client.h"
#include "proto/protocol.h"
#include "proto/rpc_channel.h"
#include "server/process.h"

namespace splitq::cli {

// Hex SHA-256 of the config file's bytes and the --set overrides, in order, except `device=`
// (each process runs on its own device) and `client.*` (the client's own settings). A worker
// refuses a client whose digest differs: both must start from the same file and overrides.
absl::StatusOr<std::string> ConfigDigest(const std::string& path,
                                         const std::vector<std::string>& overrides);

using client::MakeChannel;
using rpc::JoinHostPort;
using rpc::ParseHostPort;

using base::PeakRssMiB;
using base::RssMiB;
using server::ReadyFile;

// The token in `path`, or "" for an empty path.
absl::StatusOr<std::string> TokenFromFile(const std::string& path);

}  // namespace splitq::cli

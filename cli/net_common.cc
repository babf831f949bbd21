#include "cli/net_common.h"

#include <grpcpp/create_channel.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "base/files.h"
#include "base/sha256.h"
#include "base/status_macros.h"
#include "client/worker_client.h"
#include "server/tokens.h"

namespace splitq::cli {

absl::StatusOr<std::string> ConfigDigest(const std::string& path,
                                         const std::vector<std::string>& overrides) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat(path, ": cannot read"));
  std::stringstream text;
  text << file.rdbuf();
  std::string all = text.str();
  for (const std::string& o : overrides) {
    // Each process picks its own device; client.* settings are the client's alone, server.*
    // the worker's.
    if (o.rfind("device=", 0) == 0 || o.rfind("client.", 0) == 0 || o.rfind("server.", 0) == 0) {
      continue;
    }
    absl::StrAppend(&all, "\n--set ", o);
  }
  return base::Sha256Hex(all);
}

absl::StatusOr<std::string> TokenFromFile(const std::string& path) {
  if (path.empty()) return std::string();
  return server::ReadToken(path);
}

}  // namespace splitq::cli

#include "cli/net_common.h"

#include <grpcpp/create_channel.h>
#include <openssl/sha.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "base/files.h"
#include "base/status_macros.h"
#include "server/tokens.h"
#include "server/worker_client.h"

namespace splitq::cli {

absl::StatusOr<std::string> ConfigDigest(const std::string& path,
                                         const std::vector<std::string>& overrides) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat(path, ": cannot read"));
  std::stringstream text;
  text << file.rdbuf();
  std::string all = text.str();
  for (const std::string& o : overrides) {
    // Each process picks its own device, and client.* settings are the client's alone.
    if (o.rfind("device=", 0) == 0 || o.rfind("client.", 0) == 0) continue;
    absl::StrAppend(&all, "\n--set ", o);
  }
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(all.data()), all.size(), digest);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(digest), sizeof digest));
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(
    const std::string& target, const server::TransportSecurity& security) {
  SPLITQ_RETURN_IF_ERROR(server::ValidateSecurity(security));
  auto credentials = server::MakeChannelCredentials(security);
  if (!credentials.ok()) return credentials.status();
  return grpc::CreateCustomChannel(target, *credentials, server::ClientChannelArguments());
}

absl::StatusOr<server::WorkerAddress> ParseHostPort(const std::string& text) {
  const size_t colon = text.rfind(':');
  uint32_t port = 0;
  if (colon == std::string::npos || colon == 0 ||
      !absl::SimpleAtoi(text.substr(colon + 1), &port) || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", text, "': expected HOST:PORT (PORT 0..65535, 0: the OS picks)"));
  }
  std::string host = text.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  return server::WorkerAddress{host, port};
}

std::string JoinHostPort(const server::WorkerAddress& a) {
  if (a.host.find(':') != std::string::npos) return absl::StrCat("[", a.host, "]:", a.port);
  return absl::StrCat(a.host, ":", a.port);
}

namespace {
double StatusMiB(const std::string& key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) == 0) return std::stod(line.substr(key.size())) / 1024.0;
  }
  return -1;
}
}  // namespace

ReadyFile::~ReadyFile() {
  if (written_) std::remove(path_.c_str());
}

absl::Status ReadyFile::Announce(const std::string& address) {
  if (path_.empty()) return absl::OkStatus();
  SPLITQ_RETURN_IF_ERROR(base::WriteFileAtomically(path_, address + "\n"));
  written_ = true;
  return absl::OkStatus();
}

double PeakRssMiB() { return StatusMiB("VmHWM:"); }
double RssMiB() { return StatusMiB("VmRSS:"); }

absl::StatusOr<std::string> TokenFromFile(const std::string& path) {
  if (path.empty()) return std::string();
  return server::ReadToken(path);
}

}  // namespace splitq::cli

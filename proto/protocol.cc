#include "proto/protocol.h"

#include <algorithm>
#include <cctype>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace splitq::rpc {

bool IsValidMemberName(const std::string& name) {
  if (name.empty() || name.size() > 64 || name == "." || name == "..") return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-';
  });
}

bool IsValidHost(const std::string& host) {
  if (host.empty() || host.size() > 253 || host == "0.0.0.0" || host == "::") return false;
  return std::all_of(host.begin(), host.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_' ||
           c == ':' || c == '%';
  });
}

absl::StatusOr<WorkerAddress> ParseHostPort(const std::string& text) {
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
  return WorkerAddress{host, port};
}

std::string JoinHostPort(const WorkerAddress& a) {
  if (a.host.find(':') != std::string::npos) return absl::StrCat("[", a.host, "]:", a.port);
  return absl::StrCat(a.host, ":", a.port);
}

}  // namespace splitq::rpc

// splitq server: serves a base::Registry (base/metrics.h) at GET /metrics in Prometheus's text
// format, for `--metrics-listen HOST:PORT` on the coordinator and the worker. The HTTP server
// is cpp-httplib (Debian's libcpp-httplib-dev) on two threads of its own.
//
// Plain HTTP, no token: bind it to an address only your monitoring can reach (127.0.0.1, a
// private interface). Other paths answer 404, other methods 405. A request must arrive within
// 5 s; a connection serves at most 5 requests.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "base/metrics.h"

namespace splitq::server {

class MetricsServer {
 public:
  // `listen`: HOST:PORT (port 0: the OS picks; port() says which). INVALID_ARGUMENT for a bad
  // address, UNAVAILABLE when it cannot be bound. The registry outlives the server.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(const std::string& listen,
                                                              base::Registry& registry);
  ~MetricsServer();  // stops serving and joins its threads
  int port() const;
  std::string address() const;  // HOST:PORT as bound

 private:
  struct Impl;
  explicit MetricsServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace splitq::server

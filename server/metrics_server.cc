#include "server/metrics_server.h"

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "proto/protocol.h"

namespace splitq::server {

struct MetricsServer::Impl {
  httplib::Server http;
  std::thread thread;
  std::atomic<bool> done{false};  // listen_after_bind returned
  rpc::WorkerAddress bound;
};

MetricsServer::MetricsServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

MetricsServer::~MetricsServer() {
  // stop() before the serving loop has started is lost: ask until the loop has ended.
  while (!impl_->done.load()) {
    impl_->http.stop();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (impl_->thread.joinable()) impl_->thread.join();
}

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(const std::string& listen,
                                                                    base::Registry& registry) {
  absl::StatusOr<rpc::WorkerAddress> address = rpc::ParseHostPort(listen);
  if (!address.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics-listen '", listen, "': ", address.status().message()));
  }
  auto impl = std::make_unique<Impl>();
  httplib::Server& http = impl->http;
  http.new_task_queue = [] { return new httplib::ThreadPool(2); };
  http.set_read_timeout(5, 0);
  http.set_write_timeout(5, 0);
  http.set_keep_alive_max_count(5);
  http.set_payload_max_length(4096);
  http.Get("/metrics", [&registry](const httplib::Request&, httplib::Response& response) {
    response.set_content(registry.Render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  std::string host = address->host;
  int port = static_cast<int>(address->port);
  if (port == 0) {
    port = http.bind_to_any_port(host);
    if (port <= 0) {
      return absl::UnavailableError(absl::StrCat("--metrics-listen '", listen, "': cannot bind"));
    }
  } else if (!http.bind_to_port(host, port)) {
    return absl::UnavailableError(
        absl::StrCat("--metrics-listen '", listen, "': cannot bind (in use, or not this host's)"));
  }
  impl->bound = rpc::WorkerAddress{host, static_cast<uint32_t>(port)};
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] {
    raw->http.listen_after_bind();
    raw->done.store(true);
  });
  return std::unique_ptr<MetricsServer>(new MetricsServer(std::move(impl)));
}

int MetricsServer::port() const { return static_cast<int>(impl_->bound.port); }
std::string MetricsServer::address() const { return rpc::JoinHostPort(impl_->bound); }

}  // namespace splitq::server

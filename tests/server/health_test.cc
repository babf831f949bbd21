// server/health.h and proto/rpc_channel.h against a real gRPC server on a port the OS picks,
// on loopback: the health check answers SERVING over plaintext, TLS and mutual TLS; a
// plaintext client against a TLS server fails cleanly; an unknown service is NOT_FOUND;
// security options must be explicit.
#include "server/health.h"

#include <arpa/inet.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "base/files.h"
#include "server/process.h"
#include "server/tls_certs.h"
#include "splitq/v1/coordinator.grpc.pb.h"

namespace splitq::server {
namespace {

// A gRPC server with the built-in health service (and the generated Coordinator base class,
// every method UNIMPLEMENTED: a sync server needs one service), on 127.0.0.1 and an
// OS-picked port.
class HealthServer {
 public:
  explicit HealthServer(const rpc::TransportSecurity& security) {
    grpc::EnableDefaultHealthCheckService(true);
    auto credentials = rpc::MakeServerCredentials(security);
    EXPECT_TRUE(credentials.ok()) << credentials.status();
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", *credentials, &port_);
    builder.RegisterService(&placeholder_);
    server_ = builder.BuildAndStart();
    EXPECT_NE(server_, nullptr);
    EXPECT_GT(port_, 0);
  }
  ~HealthServer() { server_->Shutdown(); }
  std::string target() const { return "127.0.0.1:" + std::to_string(port_); }
  grpc::Server* server() { return server_.get(); }

 private:
  int port_ = 0;
  splitq::v1::Coordinator::Service placeholder_;
  std::unique_ptr<grpc::Server> server_;
};

rpc::TransportSecurity Insecure() {
  rpc::TransportSecurity s;
  s.insecure = true;
  return s;
}

TEST(Health, PlaintextServerIsServing) {
  HealthServer server(Insecure());
  auto status = CheckHealth(server.target(), Insecure());
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_EQ(*status, "SERVING");
  // A service the server does not know.
  EXPECT_EQ(CheckHealth(server.target(), Insecure(), "splitq.v1.Nope").status().code(),
            absl::StatusCode::kNotFound);
  // A service marked down.
  server.server()->GetHealthCheckService()->SetServingStatus("splitq.v1.Worker", false);
  auto down = CheckHealth(server.target(), Insecure(), "splitq.v1.Worker");
  ASSERT_TRUE(down.ok()) << down.status();
  EXPECT_EQ(*down, "NOT_SERVING");
}

TEST(Health, TlsAndMutualTlsAndAPlaintextClientFailsCleanly) {
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("splitq_health_" + std::to_string(getpid())))
          .string();
  ASSERT_TRUE(MakeCertificates(dir).ok());
  for (const bool mutual : {false, true}) {
    rpc::TransportSecurity tls;
    tls.tls_dir = dir;
    tls.mutual_tls = mutual;
    HealthServer server(tls);
    auto status = CheckHealth(server.target(), tls);
    ASSERT_TRUE(status.ok()) << status.status() << " mutual " << mutual;
    EXPECT_EQ(*status, "SERVING");
    // Plaintext against TLS: no answer, a clean UNAVAILABLE within the deadline.
    EXPECT_EQ(CheckHealth(server.target(), Insecure(), "", 1000).status().code(),
              absl::StatusCode::kUnavailable);
    if (mutual) {  // TLS without a client certificate is refused by a mutual-TLS server.
      rpc::TransportSecurity no_cert;
      no_cert.tls_dir = dir;
      EXPECT_EQ(CheckHealth(server.target(), no_cert, "", 1000).status().code(),
                absl::StatusCode::kUnavailable);
    }
  }
  base::RemoveTree(dir);
}

// Connections that never finish the TLS handshake are closed after the handshake timeout
// (gRPC's default would hold each file descriptor for 120 s).
TEST(Health, SilentConnectionsAreClosedAfterTheHandshakeTimeout) {
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("splitq_silent_" + std::to_string(getpid())))
          .string();
  const absl::Status made = MakeCertificates(dir);
  ASSERT_TRUE(made.ok()) << made;
  ServingOptions options;
  options.listen = "127.0.0.1:0";
  options.security.tls_dir = dir;
  options.handshake_timeout_ms = 500;
  splitq::v1::Coordinator::CallbackService service;  // any service: its methods go unused
  auto serving = StartServing(options, {&service});
  ASSERT_TRUE(serving.ok()) << serving.status();
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(serving->port));
  std::vector<int> fds;
  for (int i = 0; i < 50; ++i) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    fds.push_back(fd);
  }
  const auto start = std::chrono::steady_clock::now();
  int closed = 0;
  for (const int fd : fds) {
    timeval wait{10, 0};  // far beyond the timeout: a connection kept open fails the test
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &wait, sizeof wait);
    char byte;
    closed += ::recv(fd, &byte, 1, 0) <= 0 && errno != EAGAIN ? 1 : 0;
    ::close(fd);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("50 silent connections closed by the server after %.2f s\n", seconds);
  EXPECT_EQ(closed, 50);
  EXPECT_LT(seconds, 5.0);
  serving->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  base::RemoveTree(dir);
}

TEST(Health, SecurityMustBeExplicit) {
  EXPECT_EQ(CheckHealth("127.0.0.1:1", rpc::TransportSecurity{}).status().code(),
            absl::StatusCode::kInvalidArgument);
  rpc::TransportSecurity both;
  both.insecure = true;
  both.tls_dir = "/tmp";
  EXPECT_EQ(rpc::ValidateSecurity(both).code(), absl::StatusCode::kInvalidArgument);
  rpc::TransportSecurity mutual_plaintext;  // --mtls --insecure: the --mtls would be ignored
  mutual_plaintext.insecure = true;
  mutual_plaintext.mutual_tls = true;
  EXPECT_EQ(rpc::ValidateSecurity(mutual_plaintext).code(), absl::StatusCode::kInvalidArgument);
  rpc::TransportSecurity missing;
  missing.tls_dir = "/nonexistent";
  EXPECT_EQ(rpc::MakeChannelCredentials(missing).status().code(), absl::StatusCode::kNotFound);
}

TEST(StatusMapping, CodesCrossTheEdgeOneToOne) {
  for (const absl::StatusCode code :
       {absl::StatusCode::kInvalidArgument, absl::StatusCode::kFailedPrecondition,
        absl::StatusCode::kResourceExhausted, absl::StatusCode::kUnauthenticated,
        absl::StatusCode::kNotFound}) {
    const absl::Status back = rpc::FromGrpcStatus(rpc::ToGrpcStatus(absl::Status(code, "m")));
    EXPECT_EQ(back.code(), code);
    EXPECT_EQ(back.message(), "m");
  }
}

}  // namespace
}  // namespace splitq::server

// server/health.h and proto/rpc_channel.h against a real gRPC server on a port the OS picks,
// on loopback: the health check answers SERVING over plaintext, TLS and mutual TLS; a
// plaintext client against a TLS server fails cleanly; an unknown service is NOT_FOUND;
// security options must be explicit.
#include "server/health.h"

#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <string>

#include "base/files.h"
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

#include "server/health.h"

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>

#include <chrono>

#include "grpc/health/v1/health.grpc.pb.h"

namespace splitq::server {

absl::StatusOr<std::string> CheckHealth(const std::string& target,
                                        const rpc::TransportSecurity& security,
                                        const std::string& service, int timeout_ms) {
  auto credentials = rpc::MakeChannelCredentials(security);
  if (!credentials.ok()) return credentials.status();
  auto stub = grpc::health::v1::Health::NewStub(grpc::CreateChannel(target, *credentials));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) return rpc::FromGrpcStatus(status);
  return grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status());
}

}  // namespace splitq::server

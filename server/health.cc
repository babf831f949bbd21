#include "server/health.h"

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/impl/codegen/proto_utils.h>
#include <grpcpp/impl/codegen/server_callback_handlers.h>

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

// One Check: the answer, written at once; the request is never read. It deletes itself once
// gRPC is done with it (OnDone).
class HealthService::Check final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  Check() {
    grpc::health::v1::HealthCheckResponse response;
    response.set_status(grpc::health::v1::HealthCheckResponse::SERVING);
    bool own = false;
    (void)grpc::SerializationTraits<grpc::health::v1::HealthCheckResponse>::Serialize(
        response, &reply_, &own);
    StartWriteAndFinish(&reply_, grpc::WriteOptions(), grpc::Status::OK);
  }
  void OnDone() override { delete this; }

 private:
  grpc::ByteBuffer reply_;
};

HealthService::HealthService() {
  AddMethod(new grpc::internal::RpcServiceMethod(
      "/grpc.health.v1.Health/Check", grpc::internal::RpcMethod::BIDI_STREAMING, nullptr));
  MarkMethodRawCallback(0,
                        new grpc::internal::CallbackBidiHandler<grpc::ByteBuffer, grpc::ByteBuffer>(
                            [](grpc::CallbackServerContext*) { return new Check(); }));
}

}  // namespace splitq::server

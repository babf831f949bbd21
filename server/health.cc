#include "server/health.h"

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/impl/codegen/proto_utils.h>
#include <grpcpp/impl/codegen/server_callback_handlers.h>

#include <chrono>
#include <utility>

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

// One Check: a slot among kMaxReading, then one request read, then the answer.
class HealthService::Check final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  Check(HealthService& service, const std::string& peer)
      : service_(service), address_(peer.substr(0, peer.rfind(':'))) {
    if (!service_.reading_.Take(address_)) {
      Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "too many health checks at once"));
      return;
    }
    reading_ = true;
    StartRead(&request_);
  }
  void OnReadDone(bool ok) override {
    Release();
    grpc::health::v1::HealthCheckRequest request;
    if (!ok || !grpc::SerializationTraits<grpc::health::v1::HealthCheckRequest>::Deserialize(
                    &request_, &request)
                    .ok()) {
      Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no HealthCheckRequest"));
      return;
    }
    if (service_.serving_.count(request.service()) == 0) {
      Finish(grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown service"));
      return;
    }
    grpc::health::v1::HealthCheckResponse response;
    response.set_status(grpc::health::v1::HealthCheckResponse::SERVING);
    bool own = false;
    (void)grpc::SerializationTraits<grpc::health::v1::HealthCheckResponse>::Serialize(
        response, &reply_, &own);
    StartWriteAndFinish(&reply_, grpc::WriteOptions(), grpc::Status::OK);
  }
  void OnDone() override {
    Release();  // cancelled while reading
    delete this;
  }

 private:
  void Release() {
    if (reading_) service_.reading_.Release(address_);
    reading_ = false;
  }

  HealthService& service_;
  const std::string address_;
  bool reading_ = false;
  grpc::ByteBuffer request_, reply_;
};

HealthService::HealthService(std::set<std::string> serving) : serving_(std::move(serving)) {
  AddMethod(new grpc::internal::RpcServiceMethod(
      "/grpc.health.v1.Health/Check", grpc::internal::RpcMethod::BIDI_STREAMING, nullptr));
  MarkMethodRawCallback(0,
                        new grpc::internal::CallbackBidiHandler<grpc::ByteBuffer, grpc::ByteBuffer>(
                            [this](grpc::CallbackServerContext* context) {
                              return new Check(*this, context->peer());
                            }));
}

}  // namespace splitq::server

#include "server/health.h"

#include <grpcpp/alarm.h>
#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/impl/codegen/proto_utils.h>
#include <grpcpp/impl/codegen/server_callback_handlers.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <utility>

#include "grpc/health/v1/health.grpc.pb.h"

namespace splitq::server {

absl::StatusOr<std::string> CheckHealth(const std::string& target,
                                        const rpc::TransportSecurity& security,
                                        const std::string& service, int timeout_ms, bool* unread) {
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
  if (unread != nullptr) {
    *unread = context.GetServerTrailingMetadata().count(HealthService::kUnreadKey) > 0;
  }
  return grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status());
}

// One Check: a slot among kMaxReading, then one request read (cancelled at the read
// deadline), then the answer; without a slot, the answer at once. It deletes itself once gRPC is
// done with it (OnDone) and the deadline's alarm has run (fired or cancelled).
class HealthService::Check final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  Check(HealthService& service, grpc::CallbackServerContext* context)
      : service_(service), context_(context), address_([&] {
          const std::string peer = context->peer();
          return peer.substr(0, peer.rfind(':'));
        }()) {
    if (!service_.reading_.Take(address_)) {
      // No place to read the request: answer for the whole server without reading it (the
      // request may be anyone's unfinished 4 MiB; what arrives of it is dropped with the
      // stream).
      context_->AddTrailingMetadata(kUnreadKey, "1");
      Answer();
      return;
    }
    reading_ = true;
    refs_.fetch_add(1);
    alarm_.Set(
        std::chrono::system_clock::now() + std::chrono::milliseconds(service_.read_deadline_ms_),
        [this](bool fired) {
          {
            std::lock_guard<std::recursive_mutex> lock(mutex_);
            // Still reading and gRPC not done yet: the context is alive.
            if (fired && reading_ && !done_) context_->TryCancel();
          }
          Unref();
        });
    StartRead(&request_);
  }
  void OnReadDone(bool ok) override {
    Release();
    alarm_.Cancel();
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
    Answer();
  }
  void OnDone() override {
    Release();  // cancelled while reading
    {
      std::lock_guard<std::recursive_mutex> lock(mutex_);
      done_ = true;
    }
    alarm_.Cancel();
    Unref();
  }

 private:
  void Answer() {
    grpc::health::v1::HealthCheckResponse response;
    response.set_status(grpc::health::v1::HealthCheckResponse::SERVING);
    bool own = false;
    (void)grpc::SerializationTraits<grpc::health::v1::HealthCheckResponse>::Serialize(
        response, &reply_, &own);
    StartWriteAndFinish(&reply_, grpc::WriteOptions(), grpc::Status::OK);
  }
  void Release() {
    std::lock_guard<std::recursive_mutex> lock(mutex_);
    if (reading_) service_.reading_.Release(address_);
    reading_ = false;
  }
  void Unref() {
    if (refs_.fetch_sub(1) == 1) delete this;
  }

  HealthService& service_;
  grpc::CallbackServerContext* const context_;
  const std::string address_;
  std::recursive_mutex mutex_;  // TryCancel may run a reaction on this thread
  bool reading_ = false;        // holds a place in service_.reading_
  bool done_ = false;           // OnDone ran: context_ is gone
  std::atomic<int> refs_{1};    // OnDone, and the alarm's callback once set
  grpc::Alarm alarm_;
  grpc::ByteBuffer request_, reply_;
};

HealthService::HealthService(std::set<std::string> serving, int read_deadline_ms)
    : serving_(std::move(serving)), read_deadline_ms_(read_deadline_ms) {
  AddMethod(new grpc::internal::RpcServiceMethod(
      "/grpc.health.v1.Health/Check", grpc::internal::RpcMethod::BIDI_STREAMING, nullptr));
  MarkMethodRawCallback(
      0, new grpc::internal::CallbackBidiHandler<grpc::ByteBuffer, grpc::ByteBuffer>(
             [this](grpc::CallbackServerContext* context) { return new Check(*this, context); }));
}

}  // namespace splitq::server

// splitq server: the gRPC Coordinator service (proto/splitq/v1/coordinator.proto), callback
// API. It only adapts CoordinatorCore (coordinator_core.h): it checks the caller's bearer
// token, converts messages, and maps statuses one to one. Every call is answered inline (the
// core is fast and never blocks on the network), so no call holds a thread.
// A background thread calls CoordinatorCore::Expire every heartbeat period.
#pragma once

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

#include "server/coordinator_core.h"
#include "server/tokens.h"
#include "splitq/v1/coordinator.grpc.pb.h"

namespace splitq::server {

class CoordinatorService final : public splitq::v1::Coordinator::CallbackService {
 public:
  // `tokens`: every caller must present one of them (null: no token check, for tests and
  // trusted networks). `config_yaml`: the run config sent to each registrant.
  CoordinatorService(CoordinatorCore& core, const TokenSet* tokens, std::string config_yaml);
  ~CoordinatorService() override;

  grpc::ServerUnaryReactor* Register(grpc::CallbackServerContext* context,
                                     const splitq::v1::RegisterRequest* request,
                                     splitq::v1::RegisterReply* reply) override;
  grpc::ServerUnaryReactor* Assign(grpc::CallbackServerContext* context,
                                   const splitq::v1::AssignRequest* request,
                                   splitq::v1::AssignReply* reply) override;
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* context,
                                      const splitq::v1::HeartbeatRequest* request,
                                      splitq::v1::HeartbeatReply* reply) override;
  grpc::ServerUnaryReactor* Status(grpc::CallbackServerContext* context,
                                   const splitq::v1::StatusRequest* request,
                                   splitq::v1::StatusReply* reply) override;
  grpc::ServerUnaryReactor* Leave(grpc::CallbackServerContext* context,
                                  const splitq::v1::LeaveRequest* request,
                                  splitq::v1::LeaveReply* reply) override;
  grpc::ServerUnaryReactor* Group(grpc::CallbackServerContext* context,
                                  const splitq::v1::GroupRequest* request,
                                  splitq::v1::GroupReply* reply) override;

 private:
  // OK when the caller presents a valid bearer token (or no tokens are configured).
  // The caller's token id ("" when tokens are off), or UNAUTHENTICATED.
  absl::StatusOr<std::string> Authenticate(grpc::CallbackServerContext* context) const;
  static grpc::ServerUnaryReactor* Finish(grpc::CallbackServerContext* context,
                                          const absl::Status& status);

  CoordinatorCore& core_;
  const TokenSet* tokens_;
  std::string config_yaml_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::thread expiry_;
};

}  // namespace splitq::server

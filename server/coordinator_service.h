// splitq server: the gRPC Coordinator service (proto/splitq/v1/coordinator.proto), callback
// API. It only adapts CoordinatorCore (coordinator_core.h): it checks the caller's bearer
// token, converts messages, and maps statuses one to one. Every call is answered inline (the
// core is fast and never blocks on the network), so no call holds a thread.
// A background thread calls CoordinatorCore::Expire every heartbeat period, and returns freed
// memory to the system (malloc_trim) at most every 30 s, when the RSS has grown 32 MiB since
// the last trim, and at least every 5 minutes (a closed connection leaves ~16 KB behind otherwise;
// `splitq bench coordinator`, connections phase).
#pragma once

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

#include "server/connection_guard.h"
#include "server/coordinator_core.h"
#include "server/tokens.h"
#include "splitq/v1/coordinator.grpc.pb.h"

namespace splitq::server {

// The raw (ByteBuffer) form of every method: the service parses each request itself, so that
// a body that is not the method's message is INVALID_ARGUMENT with a message (gRPC's generated
// handler answered such a body with an empty UNIMPLEMENTED).
using CoordinatorRawBase = splitq::v1::Coordinator::WithRawCallbackMethod_Register<
    splitq::v1::Coordinator::WithRawCallbackMethod_Assign<
        splitq::v1::Coordinator::WithRawCallbackMethod_Heartbeat<
            splitq::v1::Coordinator::WithRawCallbackMethod_Status<
                splitq::v1::Coordinator::WithRawCallbackMethod_Leave<
                    splitq::v1::Coordinator::WithRawCallbackMethod_Group<
                        splitq::v1::Coordinator::Service>>>>>>;

class CoordinatorService final : public CoordinatorRawBase {
 public:
  // `tokens`: every caller must present one of them (null: no token check, for tests and
  // trusted networks). `config_yaml`: the run config sent to each registrant.
  // `guard` (may be null) hears of every authenticated call (connection_guard.h).
  CoordinatorService(CoordinatorCore& core, const TokenSet* tokens, std::string config_yaml,
                     ConnectionGuard* guard = nullptr);
  ~CoordinatorService() override;

  // Each call: the bearer token first (UNAUTHENTICATED), then the body (INVALID_ARGUMENT when
  // it does not parse as the method's request), then the method.
  grpc::ServerUnaryReactor* Register(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* reply) override;
  grpc::ServerUnaryReactor* Assign(grpc::CallbackServerContext* context,
                                   const grpc::ByteBuffer* request,
                                   grpc::ByteBuffer* reply) override;
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* context,
                                      const grpc::ByteBuffer* request,
                                      grpc::ByteBuffer* reply) override;
  grpc::ServerUnaryReactor* Status(grpc::CallbackServerContext* context,
                                   const grpc::ByteBuffer* request,
                                   grpc::ByteBuffer* reply) override;
  grpc::ServerUnaryReactor* Leave(grpc::CallbackServerContext* context,
                                  const grpc::ByteBuffer* request,
                                  grpc::ByteBuffer* reply) override;
  grpc::ServerUnaryReactor* Group(grpc::CallbackServerContext* context,
                                  const grpc::ByteBuffer* request,
                                  grpc::ByteBuffer* reply) override;

 private:
  // Authenticates, parses `in` as a Request, runs `handler` and serializes its reply to `out`.
  template <class Request, class Reply>
  grpc::ServerUnaryReactor* Serve(
      grpc::CallbackServerContext* context, const grpc::ByteBuffer* in, grpc::ByteBuffer* out,
      absl::Status (CoordinatorService::*handler)(const Bearer&, const Request&, Reply*));
  absl::Status DoRegister(const Bearer& caller, const splitq::v1::RegisterRequest& request,
                          splitq::v1::RegisterReply* reply);
  absl::Status DoAssign(const Bearer& caller, const splitq::v1::AssignRequest& request,
                        splitq::v1::AssignReply* reply);
  absl::Status DoHeartbeat(const Bearer& caller, const splitq::v1::HeartbeatRequest& request,
                           splitq::v1::HeartbeatReply* reply);
  absl::Status DoStatus(const Bearer& caller, const splitq::v1::StatusRequest& request,
                        splitq::v1::StatusReply* reply);
  absl::Status DoLeave(const Bearer& caller, const splitq::v1::LeaveRequest& request,
                       splitq::v1::LeaveReply* reply);
  absl::Status DoGroup(const Bearer& caller, const splitq::v1::GroupRequest& request,
                       splitq::v1::GroupReply* reply);
  static grpc::ServerUnaryReactor* Finish(grpc::CallbackServerContext* context,
                                          const absl::Status& status);

  CoordinatorCore& core_;
  const TokenSet* tokens_;
  std::string config_yaml_;
  ConnectionGuard* guard_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::thread expiry_;
};

}  // namespace splitq::server

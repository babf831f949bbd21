#include "server/coordinator_service.h"

#include <grpcpp/impl/codegen/proto_utils.h>
#include <grpcpp/impl/codegen/server_callback_handlers.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/memory.h"
#include "base/status_macros.h"
#include "proto/rpc_channel.h"
#include "server/read_deadline.h"

namespace splitq::server {

CoordinatorService::CoordinatorService(CoordinatorCore& core, const TokenSet* tokens,
                                       std::string config_yaml, ConnectionGuard* guard,
                                       base::Registry* metrics)
    : core_(core),
      tokens_(tokens),
      config_yaml_(std::move(config_yaml)),
      guard_(guard),
      metrics_(metrics) {
  // The order of proto/splitq/v1/coordinator.proto (not that gRPC needs it).
  AddCall("/splitq.v1.Coordinator/Register", &CoordinatorService::DoRegister);
  AddCall("/splitq.v1.Coordinator/Assign", &CoordinatorService::DoAssign);
  AddCall("/splitq.v1.Coordinator/Heartbeat", &CoordinatorService::DoHeartbeat);
  AddCall("/splitq.v1.Coordinator/Status", &CoordinatorService::DoStatus);
  AddCall("/splitq.v1.Coordinator/Leave", &CoordinatorService::DoLeave);
  AddCall("/splitq.v1.Coordinator/Group", &CoordinatorService::DoGroup);
  expiry_ = std::thread([this] {
    std::unique_lock<std::mutex> lock(mutex_);
    base::MemoryTrimmer trimmer;
    while (!wake_.wait_for(lock, core_.options().heartbeat_period, [this] { return stopping_; })) {
      const Clock::time_point now = Clock::now();
      core_.Expire(now);
      // Memory freed by closed connections and forgotten records goes back to the system.
      // Not by asking mallinfo2() how much is free: it walks every arena's free lists under
      // the arena's lock, 50-100 ms at 100k members, and every call that allocates meanwhile
      // waits (the p99 of the heartbeats at 10k/s on one core went from 1.1 ms to 0.7 ms
      // without it); MemoryTrimmer reads the RSS.
      trimmer.Tick();
    }
  });
}

CoordinatorService::~CoordinatorService() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  expiry_.join();
}

// One call, as a bidirectional stream that carries one message each way: the token is checked
// when the call starts (before any of the request is read), then one request is read (cancelled
// at the read deadline), parsed and served, and the reply is written with the status. It
// deletes itself once gRPC is done with it (OnDone) and the deadline's alarm has run (fired or
// cancelled).
class CoordinatorService::Call final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  using Serve = std::function<absl::Status(const Bearer&, grpc::ByteBuffer*, grpc::ByteBuffer*)>;
  Call(CoordinatorService& service, grpc::CallbackServerContext* context, const Serve& serve)
      : serve_(serve) {
    if (service.tokens_ != nullptr) {
      absl::StatusOr<Bearer> bearer = service.tokens_->Identify(context->client_metadata());
      if (!bearer.ok()) {
        Finish(rpc::ToGrpcStatus(bearer.status()));
        return;
      }
      caller_ = *bearer;
      if (!service.reading_.Take(caller_.id)) {
        // UNAVAILABLE, not RESOURCE_EXHAUSTED: a member retries it with backoff (a burst of
        // calls from members that share a token, a coordinator restart) rather than giving up.
        Finish(rpc::ToGrpcStatus(absl::UnavailableError(
            absl::StrCat("the token of '", caller_.id, "' has ", kMaxReadingPerToken,
                         " calls whose request has not fully arrived; try again when they have"))));
        return;
      }
      reading_ = &service.reading_;
    }
    if (service.guard_ != nullptr) service.guard_->Authenticated(*context);
    refs_.fetch_add(1);
    deadline_.Arm(context, std::chrono::milliseconds(service.read_deadline_ms_.load()),
                  [this] { Unref(); });
    StartRead(&request_);
  }
  void OnReadDone(bool ok) override {
    deadline_.Met();
    GivePlaceBack();
    if (!ok) {  // the caller half-closed (or went away) without a request
      Finish(rpc::ToGrpcStatus(absl::InvalidArgumentError("no request message")));
      return;
    }
    const absl::Status status = serve_(caller_, &request_, &reply_);
    if (status.ok()) {
      StartWriteAndFinish(&reply_, grpc::WriteOptions(), grpc::Status::OK);
    } else {
      Finish(rpc::ToGrpcStatus(status));
    }
  }
  void OnDone() override {
    GivePlaceBack();
    deadline_.Done();
    Unref();
  }

 private:
  void GivePlaceBack() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (reading_ != nullptr) reading_->Release(caller_.id);
    reading_ = nullptr;
  }
  void Unref() {
    if (refs_.fetch_sub(1) == 1) delete this;
  }

  const Serve& serve_;  // the method's, owned by its handler (lives as long as the service)
  std::mutex mutex_;    // reading_
  KeyedSlots* reading_ = nullptr;  // the place this call holds while its request arrives
  std::atomic<int> refs_{1};       // OnDone, and the read deadline once armed
  ReadDeadline deadline_;
  Bearer caller_;
  grpc::ByteBuffer request_, reply_;
};

namespace {
constexpr char kCallsHelp[] = "Calls answered, by method and gRPC status code";
}  // namespace

template <class Request, class Reply>
void CoordinatorService::AddCall(const char* name, absl::Status (CoordinatorService::*handler)(
                                                       const Bearer&, const Request&, Reply*)) {
  // The method's counter of answered calls (errors: looked up per code when they happen).
  const std::string method = std::string(name).substr(std::string(name).rfind('/') + 1);
  base::Metric* answered = metrics_ == nullptr
                               ? nullptr
                               : metrics_->Counter("splitq_coordinator_calls_total", kCallsHelp,
                                                   {{"method", method}, {"code", "OK"}});
  // Parses the body as a Request (INVALID_ARGUMENT naming the message when it does not), runs
  // the handler and serializes its reply; counts the call.
  auto serve = std::make_shared<Call::Serve>(
      [this, handler, method, answered](const Bearer& caller, grpc::ByteBuffer* in,
                                        grpc::ByteBuffer* out) {
        absl::Status status = [&]() -> absl::Status {
          Request request;
          const size_t size = in->Length();
          if (!grpc::SerializationTraits<Request>::Deserialize(in, &request).ok()) {
            return absl::InvalidArgumentError(absl::StrCat("the body (", size, " bytes) is not a ",
                                                           Request::descriptor()->full_name(),
                                                           " message"));
          }
          Reply reply;
          SPLITQ_RETURN_IF_ERROR((this->*handler)(caller, request, &reply));
          bool own = false;
          if (!grpc::SerializationTraits<Reply>::Serialize(reply, out, &own).ok()) {
            return absl::InternalError("the reply could not be serialized");
          }
          return absl::OkStatus();
        }();
        if (answered != nullptr && status.ok()) {
          answered->Add(1);
        } else if (metrics_ != nullptr) {
          metrics_
              ->Counter("splitq_coordinator_calls_total", kCallsHelp,
                        {{"method", method}, {"code", absl::StatusCodeToString(status.code())}})
              ->Add(1);
        }
        return status;
      });
  AddMethod(new grpc::internal::RpcServiceMethod(name, grpc::internal::RpcMethod::BIDI_STREAMING,
                                                 nullptr));
  MarkMethodRawCallback(static_cast<int>(serves_.size()),
                        new grpc::internal::CallbackBidiHandler<grpc::ByteBuffer, grpc::ByteBuffer>(
                            [this, serve](grpc::CallbackServerContext* context) {
                              return new Call(*this, context, *serve);
                            }));
  serves_.push_back(std::move(serve));
}

absl::Status CoordinatorService::DoRegister(const Bearer& caller,
                                            const splitq::v1::RegisterRequest& request,
                                            splitq::v1::RegisterReply* reply) {
  if (request.role() != splitq::v1::ROLE_WORKER && request.role() != splitq::v1::ROLE_CLIENT) {
    return absl::InvalidArgumentError("role: worker or client");
  }
  const Role role = request.role() == splitq::v1::ROLE_WORKER ? Role::kWorker : Role::kClient;
  const TokenRole needed = role == Role::kWorker ? TokenRole::kWorker : TokenRole::kClient;
  if (caller.role != TokenRole::kAny && caller.role != needed) {
    return absl::PermissionDeniedError(
        absl::StrCat("the token of '", caller.id, "' is a ", TokenRoleName(caller.role),
                     " token: it cannot register a ", TokenRoleName(needed),
                     needed == TokenRole::kWorker
                         ? " (make worker tokens with `splitq tokens --out DIR --worker NAME`)"
                         : " (make client tokens with `splitq tokens --out DIR NAME`)"));
  }
  auto id =
      core_.Register(role, request.name(), static_cast<uint32_t>(request.protocol_version()),
                     WorkerAddress{request.endpoint().host(), request.endpoint().port()},
                     request.max_sessions(), Clock::now(), caller.id,
                     WorkerAddress{request.group_store().host(), request.group_store().port()});
  if (!id.ok()) return id.status();
  reply->set_protocol_version(splitq::v1::PROTOCOL_VERSION_CURRENT);
  reply->set_member_id(*id);
  reply->set_heartbeat_period_ms(static_cast<uint32_t>(core_.options().heartbeat_period.count()));
  reply->set_heartbeat_deadline_ms(
      static_cast<uint32_t>(core_.options().heartbeat_deadline.count()));
  reply->set_config_yaml(config_yaml_);
  return absl::OkStatus();
}

absl::Status CoordinatorService::DoAssign(const Bearer& caller,
                                          const splitq::v1::AssignRequest& request,
                                          splitq::v1::AssignReply* reply) {
  auto a = core_.Assign(request.member_id(), Clock::now(), caller.id, request.unreachable_worker());
  if (!a.ok()) return a.status();
  reply->set_worker_name(a->worker_name);
  reply->mutable_worker()->set_host(a->worker.host);
  reply->mutable_worker()->set_port(a->worker.port);
  reply->set_resume_step(a->resume_step);
  reply->set_assignment_id(a->assignment_id);
  return absl::OkStatus();
}

absl::Status CoordinatorService::DoHeartbeat(const Bearer& caller,
                                             const splitq::v1::HeartbeatRequest& request,
                                             splitq::v1::HeartbeatReply* reply) {
  bool move = false;
  const absl::Status s =
      core_.Heartbeat(request.member_id(), request.step(), Clock::now(), caller.id,
                      request.sessions(), request.assignment_id(), &move, request.generation());
  if (s.code() == absl::StatusCode::kNotFound) {
    reply->set_unknown_member(true);  // an answer, not an error: the caller registers again
    return absl::OkStatus();
  }
  reply->set_move(move);
  return s;
}

absl::Status CoordinatorService::DoStatus(const Bearer&, const splitq::v1::StatusRequest& request,
                                          splitq::v1::StatusReply* reply) {
  const std::vector<MemberView> members =
      core_.Status(Clock::now(), request.page(), request.limit());
  for (const MemberView& m : members) {
    splitq::v1::MemberStatus* out = reply->add_members();
    out->set_role(m.role == Role::kWorker ? splitq::v1::ROLE_WORKER : splitq::v1::ROLE_CLIENT);
    out->set_name(m.name);
    out->set_alive(m.alive);
    out->set_step(m.step);
    out->set_last_heartbeat_age_ms(static_cast<uint64_t>(m.since_heartbeat.count()));
    out->set_worker_name(m.worker_name);
  }
  if (request.limit() != 0 && members.size() == request.limit()) {
    reply->set_next_page(members.back().id);
  }
  const CoordinatorTotals totals = core_.Totals();
  reply->set_global_step(totals.client_steps);
  reply->set_live_workers(totals.workers);
  reply->set_live_clients(totals.clients);
  reply->set_records(totals.records);
  return absl::OkStatus();
}

absl::Status CoordinatorService::DoLeave(const Bearer& caller,
                                         const splitq::v1::LeaveRequest& request,
                                         splitq::v1::LeaveReply*) {
  return core_.Leave(request.member_id(), Clock::now(), caller.id);
}

absl::Status CoordinatorService::DoGroup(const Bearer& caller,
                                         const splitq::v1::GroupRequest& request,
                                         splitq::v1::GroupReply* reply) {
  auto v = core_.Group(request.member_id(), request.failed_generation(), Clock::now(), caller.id);
  if (!v.ok()) return v.status();
  reply->set_generation(v->generation);
  reply->set_rank(v->rank);
  reply->set_world(v->world);
  reply->mutable_store()->set_host(v->store.host);
  reply->mutable_store()->set_port(v->store.port);
  for (const std::string& name : v->members) reply->add_members(name);
  return absl::OkStatus();
}

}  // namespace splitq::server

#include "server/coordinator_service.h"

#include <grpcpp/impl/codegen/proto_utils.h>

#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/memory.h"
#include "proto/rpc_channel.h"

namespace splitq::server {

CoordinatorService::CoordinatorService(CoordinatorCore& core, const TokenSet* tokens,
                                       std::string config_yaml, ConnectionGuard* guard)
    : core_(core), tokens_(tokens), config_yaml_(std::move(config_yaml)), guard_(guard) {
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

grpc::ServerUnaryReactor* CoordinatorService::Finish(grpc::CallbackServerContext* context,
                                                     const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(rpc::ToGrpcStatus(status));
  return reactor;
}

template <class Request, class Reply>
grpc::ServerUnaryReactor* CoordinatorService::Serve(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* in, grpc::ByteBuffer* out,
    absl::Status (CoordinatorService::*handler)(const Bearer&, const Request&, Reply*)) {
  Bearer caller;
  if (tokens_ != nullptr) {
    absl::StatusOr<Bearer> bearer = tokens_->Identify(context->client_metadata());
    if (!bearer.ok()) return Finish(context, bearer.status());
    caller = *bearer;
  }
  if (guard_ != nullptr) guard_->Authenticated(*context);
  Request request;
  grpc::ByteBuffer body(*in);  // shares the slices; Deserialize consumes its argument
  const size_t size = body.Length();
  if (!grpc::SerializationTraits<Request>::Deserialize(&body, &request).ok()) {
    return Finish(context, absl::InvalidArgumentError(
                               absl::StrCat("the body (", size, " bytes) is not a ",
                                            Request::descriptor()->full_name(), " message")));
  }
  Reply reply;
  const absl::Status status = (this->*handler)(caller, request, &reply);
  if (status.ok()) {
    bool own = false;
    if (!grpc::SerializationTraits<Reply>::Serialize(reply, out, &own).ok()) {
      return Finish(context, absl::InternalError("the reply could not be serialized"));
    }
  }
  return Finish(context, status);
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

grpc::ServerUnaryReactor* CoordinatorService::Register(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request,
                                                       grpc::ByteBuffer* reply) {
  return Serve(context, request, reply, &CoordinatorService::DoRegister);
}
grpc::ServerUnaryReactor* CoordinatorService::Assign(grpc::CallbackServerContext* context,
                                                     const grpc::ByteBuffer* request,
                                                     grpc::ByteBuffer* reply) {
  return Serve(context, request, reply, &CoordinatorService::DoAssign);
}
grpc::ServerUnaryReactor* CoordinatorService::Heartbeat(grpc::CallbackServerContext* context,
                                                        const grpc::ByteBuffer* request,
                                                        grpc::ByteBuffer* reply) {
  return Serve(context, request, reply, &CoordinatorService::DoHeartbeat);
}
grpc::ServerUnaryReactor* CoordinatorService::Status(grpc::CallbackServerContext* context,
                                                     const grpc::ByteBuffer* request,
                                                     grpc::ByteBuffer* reply) {
  return Serve(context, request, reply, &CoordinatorService::DoStatus);
}
grpc::ServerUnaryReactor* CoordinatorService::Leave(grpc::CallbackServerContext* context,
                                                    const grpc::ByteBuffer* request,
                                                    grpc::ByteBuffer* reply) {
  return Serve(context, request, reply, &CoordinatorService::DoLeave);
}
grpc::ServerUnaryReactor* CoordinatorService::Group(grpc::CallbackServerContext* context,
                                                    const grpc::ByteBuffer* request,
                                                    grpc::ByteBuffer* reply) {
  return Serve(context, request, reply, &CoordinatorService::DoGroup);
}

}  // namespace splitq::server

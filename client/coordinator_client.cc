#include "client/coordinator_client.h"

#include <grpcpp/client_context.h>

#include <algorithm>
#include <random>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "proto/rpc_channel.h"

namespace splitq::client {

CoordinatorClient::CoordinatorClient(std::shared_ptr<grpc::Channel> channel, std::string token,
                                     std::chrono::milliseconds call_timeout)
    : stub_(splitq::v1::Coordinator::NewStub(channel)),
      token_(std::move(token)),
      call_timeout_(call_timeout) {}

std::unique_ptr<grpc::ClientContext> CoordinatorClient::Context() const {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + call_timeout_);
  if (!token_.empty()) rpc::AddBearer(*context, token_);
  return context;
}

absl::StatusOr<Registration> CoordinatorClient::Register(rpc::Role role, const std::string& name,
                                                         const rpc::WorkerAddress& endpoint,
                                                         uint32_t max_sessions,
                                                         const rpc::WorkerAddress& group_store) {
  splitq::v1::RegisterRequest request;
  request.set_protocol_version(splitq::v1::PROTOCOL_VERSION_CURRENT);
  request.set_role(role == rpc::Role::kWorker ? splitq::v1::ROLE_WORKER : splitq::v1::ROLE_CLIENT);
  request.set_name(name);
  if (role == rpc::Role::kWorker) {
    request.mutable_endpoint()->set_host(endpoint.host);
    request.mutable_endpoint()->set_port(endpoint.port);
    request.set_max_sessions(max_sessions);
    if (!group_store.host.empty()) {
      request.mutable_group_store()->set_host(group_store.host);
      request.mutable_group_store()->set_port(group_store.port);
    }
  }
  splitq::v1::RegisterReply reply;
  auto context = Context();
  SPLITQ_RETURN_IF_ERROR(rpc::FromGrpcStatus(stub_->Register(context.get(), request, &reply)));
  Registration r;
  r.member_id = reply.member_id();
  r.heartbeat_period = std::chrono::milliseconds(reply.heartbeat_period_ms());
  r.heartbeat_deadline = std::chrono::milliseconds(reply.heartbeat_deadline_ms());
  r.config_yaml = reply.config_yaml();
  return r;
}

absl::StatusOr<rpc::Assignment> CoordinatorClient::Assign(uint64_t member_id,
                                                          const std::string& unreachable) {
  splitq::v1::AssignRequest request;
  request.set_member_id(member_id);
  request.set_unreachable_worker(unreachable);
  splitq::v1::AssignReply reply;
  auto context = Context();
  SPLITQ_RETURN_IF_ERROR(rpc::FromGrpcStatus(stub_->Assign(context.get(), request, &reply)));
  rpc::Assignment a;
  a.worker_name = reply.worker_name();
  a.worker = rpc::WorkerAddress{reply.worker().host(), reply.worker().port()};
  a.assignment_id = reply.assignment_id();
  a.resume_step = reply.resume_step();
  return a;
}

absl::StatusOr<CoordinatorClient::Beat> CoordinatorClient::Heartbeat(uint64_t member_id,
                                                                     uint64_t step,
                                                                     uint32_t sessions,
                                                                     uint64_t assignment_id,
                                                                     int64_t generation) {
  splitq::v1::HeartbeatRequest request;
  request.set_member_id(member_id);
  request.set_step(step);
  request.set_sessions(sessions);
  request.set_assignment_id(assignment_id);
  request.set_generation(generation);
  splitq::v1::HeartbeatReply reply;
  auto context = Context();
  SPLITQ_RETURN_IF_ERROR(rpc::FromGrpcStatus(stub_->Heartbeat(context.get(), request, &reply)));
  return Beat{!reply.unknown_member(), reply.move()};
}

absl::Status CoordinatorClient::Leave(uint64_t member_id) {
  splitq::v1::LeaveRequest request;
  request.set_member_id(member_id);
  splitq::v1::LeaveReply reply;
  auto context = Context();
  return rpc::FromGrpcStatus(stub_->Leave(context.get(), request, &reply));
}

absl::StatusOr<rpc::GroupView> CoordinatorClient::Group(uint64_t member_id,
                                                        int64_t failed_generation) {
  splitq::v1::GroupRequest request;
  request.set_member_id(member_id);
  request.set_failed_generation(failed_generation);
  splitq::v1::GroupReply reply;
  auto context = Context();
  SPLITQ_RETURN_IF_ERROR(rpc::FromGrpcStatus(stub_->Group(context.get(), request, &reply)));
  rpc::GroupView v;
  v.generation = reply.generation();
  v.rank = reply.rank();
  v.world = reply.world();
  v.store = rpc::WorkerAddress{reply.store().host(), reply.store().port()};
  v.members.assign(reply.members().begin(), reply.members().end());
  return v;
}

Heartbeater::Heartbeater(CoordinatorClient& client, uint64_t member_id,
                         std::chrono::milliseconds period, std::function<Progress()> progress,
                         std::function<absl::StatusOr<uint64_t>()> reregister,
                         std::function<void(const std::string&)> log,
                         std::function<void(uint64_t)> move)
    : member_id_(member_id) {
  period = std::max(period, std::chrono::milliseconds(10));
  thread_ = std::thread([this, &client, period, progress = std::move(progress),
                         reregister = std::move(reregister), log = std::move(log),
                         move = std::move(move)] {
    bool failing = false;
    std::unique_lock<std::mutex> lock(mutex_);
    while (!wake_.wait_for(lock, period, [this] { return stopping_; })) {
      lock.unlock();
      const Progress p = progress ? progress() : Progress{};
      absl::Status status;
      auto beat =
          client.Heartbeat(member_id_.load(), p.step, p.sessions, p.assignment_id, p.generation);
      if (!beat.ok()) {
        status = beat.status();
      } else if (beat->move && move) {
        move(p.assignment_id);
      } else if (!beat->known && reregister) {
        auto id = reregister();
        if (id.ok()) {
          member_id_.store(*id);
        } else {
          status = id.status();
        }
      }
      if (log && status.ok() == failing) {  // the state changed
        failing = !status.ok();
        log(failing ? absl::StrCat("heartbeats to the coordinator fail (", status.ToString(),
                                   "); retrying every ", period.count(), " ms")
                    : std::string("heartbeats reach the coordinator again"));
      }
      lock.lock();
    }
  });
}

Heartbeater::~Heartbeater() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

bool IsTransient(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kCancelled:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kUnknown:
      return true;
    case absl::StatusCode::kResourceExhausted:
      return absl::StartsWith(status.message(), "Received RST_STREAM");
    default:
      return false;
  }
}

absl::Status RetryWithBackoff(
    const std::function<absl::Status()>& attempt,
    const std::function<bool(const absl::Status&)>& retry, std::chrono::milliseconds timeout,
    const std::function<void(const absl::Status&, std::chrono::milliseconds)>& on_retry,
    std::chrono::milliseconds first, std::chrono::milliseconds cap) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  std::minstd_rand jitter(std::random_device{}());
  std::chrono::milliseconds wait = first;
  for (;;) {
    absl::Status status = attempt();
    if (status.ok() || !retry(status)) return status;
    // Full jitter in [wait/2, wait], so restarted clients do not reconnect in lock step.
    const auto sleep = std::chrono::milliseconds(
        wait.count() / 2 +
        static_cast<int64_t>(jitter() % static_cast<uint64_t>(wait.count() / 2 + 1)));
    if (std::chrono::steady_clock::now() + sleep > end) return status;
    if (on_retry) on_retry(status, sleep);
    std::this_thread::sleep_for(sleep);
    wait = std::min(cap, wait * 2);
  }
}

}  // namespace splitq::client

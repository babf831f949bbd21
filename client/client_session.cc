#include "client/client_session.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "base/files.h"
#include "base/status_macros.h"
#include "proto/protocol.h"
#include "trainer/step.h"

namespace splitq::client {

absl::StatusOr<std::string> RunId(const std::string& dir) {
  const std::filesystem::path path = std::filesystem::path(dir) / "run_id";
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) return absl::InternalError(absl::StrCat(dir, ": ", error.message()));
  if (std::filesystem::exists(path)) {
    std::ifstream in(path);
    std::stringstream text;
    text << in.rdbuf();
    const std::string id(absl::StripAsciiWhitespace(text.str()));
    if (!rpc::IsValidMemberName(id)) {
      return absl::FailedPreconditionError(absl::StrCat(
          path.string(), " holds '", id, "', not a run id (1..64 of [A-Za-z0-9._-], not . or ..)"));
    }
    return id;
  }
  std::random_device random;
  const std::string id = absl::StrFormat("%08x%08x", random(), random());
  SPLITQ_RETURN_IF_ERROR(base::WriteFileAtomically(path, id + "\n", 0644));
  return id;
}

ReconnectingLink::ReconnectingLink(CoordinatorClient& coordinator, ClientSessionOptions options)
    : coordinator_(coordinator), options_(std::move(options)) {}

absl::Status ReconnectingLink::Connect(std::chrono::seconds timeout) {
  return RetryWithBackoff(
      [this] { return ConnectOnce(); },
      // Ctrl-C while connecting stops, not retries.
      [this](const absl::Status& s) { return IsTransient(s) && !interrupted(); }, timeout,
      [this](const absl::Status& s, std::chrono::milliseconds wait) {
        Log(absl::StrCat(s.message(), "; retrying in ", wait.count(), " ms"));
      });
}

absl::StatusOr<trainer::DownFrame> ReconnectingLink::Train(const trainer::UpFrame& up) {
  if (move_.exchange(false)) {
    moving_ = true;
    return absl::AbortedError("the coordinator moved this client to another worker of its group");
  }
  return Succeeded(link_->Train(up));
}
absl::StatusOr<trainer::DownFrame> ReconnectingLink::TrainHead(const trainer::HeadGradient& head) {
  return Succeeded(link_->TrainHead(head));
}
absl::StatusOr<trainer::EvalPiece> ReconnectingLink::Evaluate(const trainer::UpFrame& up) {
  return Succeeded(link_->Evaluate(up));
}
void ReconnectingLink::EndEvaluation() {
  if (link_) link_->EndEvaluation();
}

absl::Status ReconnectingLink::Recover(const absl::Status& error) {
  if (moving_) {  // Train's own refusal: no failure, no backoff
    moving_ = false;
    const std::string from = assigned_;
    if (link_) link_->Close();
    link_.reset();
    SPLITQ_RETURN_IF_ERROR(Connect(options_.reconnect_timeout));
    ++moves_;
    Log(absl::StrCat("moved from worker ", from, " to ", worker_,
                     " (the coordinator rebalanced the group)"));
    return absl::OkStatus();
  }
  if (!IsTransient(error) && error.code() != absl::StatusCode::kNotFound) return error;
  const auto now = std::chrono::steady_clock::now();
  if (failures_ == 0) failing_since_ = now;
  if (now - failing_since_ > options_.reconnect_timeout) {
    return absl::UnavailableError(absl::StrCat("no progress for ",
                                               options_.reconnect_timeout.count(),
                                               " s; last error: ", error.ToString()));
  }
  const auto wait =
      std::chrono::milliseconds(std::min<int64_t>(5000, 200LL << std::min(failures_, 5)));
  ++failures_;
  // A worker that refused us as full: the coordinator is asked for another one.
  if (link_ && link_->refused_full()) unreachable_ = assigned_;
  Log(absl::StrCat("the worker stream failed (", error.ToString(), "); reconnecting in ",
                   wait.count(), " ms"));
  link_.reset();
  std::this_thread::sleep_for(wait);
  const absl::Status s = Connect(options_.reconnect_timeout);
  if (s.ok()) Log(absl::StrCat("reconnected to worker ", worker_));
  return s;
}

absl::StatusOr<uint64_t> ReconnectingLink::Register() {
  auto r = coordinator_.Register(rpc::Role::kClient, options_.id);
  if (r.status().code() == absl::StatusCode::kAlreadyExists) {
    return absl::UnavailableError(
        absl::StrCat("client id ", options_.id, " is registered and alive (a previous run?)"));
  }
  if (!r.ok()) return r.status();
  heartbeat_ms_.store(r->heartbeat_period.count());
  member_id_.store(r->member_id);
  return r->member_id;
}

void ReconnectingLink::Close() {
  if (link_) link_->Close();
}

absl::Status ReconnectingLink::ConnectOnce() {
  if (interrupted()) return absl::CancelledError("interrupted");
  if (member_id_.load() == 0) SPLITQ_RETURN_IF_ERROR(Register().status());
  uint64_t member = member_id_.load();
  auto assignment = coordinator_.Assign(member, unreachable_);
  if (assignment.status().code() == absl::StatusCode::kNotFound) {  // marked dead: again
    // Unless the heartbeat thread registered again meanwhile (its id stays).
    member_id_.compare_exchange_strong(member, 0);
    return absl::UnavailableError("the coordinator forgot this client; registering again");
  }
  if (!assignment.ok()) return assignment.status();
  const std::string target = rpc::JoinHostPort(assignment->worker);
  SPLITQ_ASSIGN_OR_RETURN(std::shared_ptr<grpc::Channel> channel,
                          MakeChannel(target, options_.security));
  // Wait for the connection so that a dead worker shows up here, not in the middle of a step.
  if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(5))) {
    unreachable_ = assignment->worker_name;  // the next Assign asks for another one
    return absl::UnavailableError(
        absl::StrCat("worker ", assignment->worker_name, " at ", target, " does not answer"));
  }
  unreachable_.clear();
  WorkerLinkOptions link = options_.link;
  link.lost = [this, name = assignment->worker_name, told = options_.link.lost](int64_t first,
                                                                                int64_t last) {
    {
      std::lock_guard<std::mutex> lock(lost_mutex_);
      lost_.emplace_back(first, last);
    }
    if (told) {
      told(first, last);
      return;
    }
    Log(absl::StrCat("worker ", name, " has not applied this client's steps ", first, "..", last,
                     ": lost with its state (it restarted from an older checkpoint), or "
                     "applied on another worker meanwhile; they are not sent again (a worker "
                     "group loses none)"));
  };
  link_ = std::make_unique<WorkerClient>(channel, link);
  assigned_ = assignment->worker_name;
  {
    std::lock_guard<std::mutex> lock(move_mutex_);
    assignment_id_.store(assignment->assignment_id);
    move_.store(false);
  }
  worker_ = absl::StrCat(assignment->worker_name, " at ", target);
  return absl::OkStatus();
}

namespace {

// Publishes the step count for the heartbeat thread.
class CountingRunner : public trainer::StepRunner {
 public:
  explicit CountingRunner(trainer::StepRunner& inner) : inner_(inner), steps_(inner.step()) {}
  absl::StatusOr<trainer::StepStats> Step() override {
    auto s = inner_.Step();
    steps_.store(inner_.step());
    return s;
  }
  absl::StatusOr<trainer::EvalStats> Evaluate() override { return inner_.Evaluate(); }
  absl::Status SaveCheckpoint(const std::string& p, const std::vector<double>& d) const override {
    return inner_.SaveCheckpoint(p, d);
  }
  absl::Status LoadCheckpoint(const std::string& p, std::vector<double>* d) override {
    absl::Status s = inner_.LoadCheckpoint(p, d);
    steps_.store(inner_.step());
    return s;
  }
  int64_t step() const override { return inner_.step(); }
  const trainer::RunConfig& config() const override { return inner_.config(); }
  trainer::WireTotals wire() const override { return inner_.wire(); }
  std::string device() const override { return inner_.device(); }
  int64_t steps() const { return steps_.load(); }

 private:
  trainer::StepRunner& inner_;
  std::atomic<int64_t> steps_;
};

}  // namespace

absl::StatusOr<trainer::TrainSummary> RunClientSession(trainer::ClientPart& part,
                                                       const ClientSessionOptions& options,
                                                       const trainer::TrainOptions& train,
                                                       const SessionEvents& events) {
  SPLITQ_ASSIGN_OR_RETURN(std::shared_ptr<grpc::Channel> channel,
                          MakeChannel(options.coordinator, options.security));
  CoordinatorClient coordinator(channel, options.link.token);
  // A worker's answer may be no larger than this client's config can produce.
  ClientSessionOptions bounded = options;
  bounded.link.limits.max_frame_bytes =
      std::min(bounded.link.limits.max_frame_bytes, part.max_answer_frame_bytes());
  ReconnectingLink link(coordinator, bounded);
  SPLITQ_RETURN_IF_ERROR(link.Connect(options.connect_timeout));
  if (events.connected) events.connected(link.worker());

  trainer::ClientRunner runner(part, link);
  CountingRunner counting(runner);
  absl::StatusOr<trainer::TrainSummary> summary;
  {
    Heartbeater heartbeat(
        coordinator, link.member_id(), link.heartbeat_period(),
        [&counting, &link] {
          return Heartbeater::Progress{static_cast<uint64_t>(counting.steps()), 0,
                                       link.assignment_id()};
        },
        [&link, &options]() -> absl::StatusOr<uint64_t> {
          const uint64_t before = link.member_id();
          auto id = link.Register();
          // The main thread registered meanwhile (our Register then found the name taken).
          const uint64_t now = link.member_id();
          if (!id.ok() && now != 0 && now != before) return now;
          if (id.ok() && options.log) {
            options.log("registered again with the coordinator (it had lost us)");
          }
          return id;
        },
        options.log, [&link](uint64_t assignment_id) { link.RequestMove(assignment_id); });
    trainer::TrainOptions with_lost = train;
    with_lost.finish = [&link, finish = train.finish](trainer::TrainSummary& s) {
      s.lost_steps = link.lost_steps();
      s.steps_lost = 0;
      for (const auto& [first, last] : s.lost_steps) s.steps_lost += last - first + 1;
      if (finish) finish(s);
    };
    summary = trainer::RunTraining(counting, with_lost);
    link.Close();
  }
  // After the heartbeat thread has stopped, so that no beat re-registers us after the goodbye,
  // with the id of our last registration (the heartbeat thread registers through `link`).
  (void)coordinator.Leave(link.member_id());
  return summary;
}

}  // namespace splitq::client

#include "server/worker_service.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "proto/chunk_codec.h"
#include "proto/rpc_channel.h"
#include "server/read_deadline.h"

namespace splitq::server {
namespace {

// Milliseconds on the steady clock (never 0 in practice: the idle watch reads 0 as "no read").
int64_t SteadyMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

SerialExecutor::SerialExecutor() {
  thread_ = std::thread([this] {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
      if (jobs_.empty()) return;  // stopping, and nothing left
      std::function<void()> job = std::move(jobs_.front());
      jobs_.pop_front();
      lock.unlock();
      job();
      lock.lock();
    }
  });
}

SerialExecutor::~SerialExecutor() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void SerialExecutor::Post(std::function<void()> job) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    jobs_.push_back(std::move(job));
  }
  wake_.notify_one();
}

struct WorkerService::Metrics {
  explicit Metrics(base::Registry& r)
      : registry(r),
        bytes_up(r.Counter("splitq_worker_received_bytes_total",
                           "Bytes of complete frames received from clients (activations, and "
                           "U-shaped head gradients; validation included)")),
        bytes_down(r.Counter("splitq_worker_sent_bytes_total",
                             "Bytes of frames sent back to clients (gradients; U-shaped "
                             "activations)")),
        train(r.Counter("splitq_worker_steps_total", "Steps answered", {{"kind", "train"}})),
        evaluate(r.Counter("splitq_worker_steps_total", "Steps answered", {{"kind", "evaluate"}})),
        train_latency(r.Histo("splitq_worker_step_seconds", kLatencyHelp, base::LatencyBuckets(),
                              {{"kind", "train"}})),
        evaluate_latency(r.Histo("splitq_worker_step_seconds", kLatencyHelp, base::LatencyBuckets(),
                                 {{"kind", "evaluate"}})),
        grad_bits(r.Gauge("splitq_worker_gradient_bits",
                          "Mean bits per value of the last gradient frame sent (32: fp32)")) {}
  // A request the service refused (`where` "request") or a step that failed ("step").
  void Failed(const char* where, const absl::Status& status) {
    registry
        .Counter("splitq_worker_failures_total",
                 "Requests refused and steps failed, by where and gRPC status code",
                 {{"where", where}, {"code", absl::StatusCodeToString(status.code())}})
        ->Add(1);
  }
  base::Registry& registry;
  base::Metric *bytes_up, *bytes_down, *train, *evaluate;
  base::Histogram *train_latency, *evaluate_latency;
  base::Metric* grad_bits;
  static constexpr char kLatencyHelp[] =
      "From a step's complete frame to its answer: waiting for the compute thread, merging, "
      "computing, encoding";
};

// One Train or Evaluate stream. States: reading one message at a time; when a frame completes,
// a compute job (no read outstanding) whose replies are written before the next read.
template <typename Request, typename Reply, bool kEvaluate>
class SessionReactor : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  SessionReactor(WorkerService& service, grpc::CallbackServerContext* context) : service_(service) {
    if (service_.tokens_ != nullptr) {
      auto bearer = service_.tokens_->Identify(context->client_metadata());
      if (bearer.ok() && bearer->role == TokenRole::kWorker) {
        bearer = absl::PermissionDeniedError(absl::StrCat(
            "the token of '", bearer->id, "' is a worker token: only client tokens open sessions"));
      }
      if (!bearer.ok()) {
        finished_ = true;
        this->Finish(rpc::ToGrpcStatus(bearer.status()));
        return;
      }
      auth_id_ = bearer->id;
      if (!service_.opening_.Take(auth_id_)) {
        finished_ = true;
        this->Finish(rpc::ToGrpcStatus(absl::ResourceExhaustedError(
            absl::StrCat("more than ", WorkerService::kMaxOpeningPerToken, " streams of '",
                         auth_id_, "' are waiting for their hello"))));
        return;
      }
      opening_ = true;
    }
    if (service_.options_.guard != nullptr) service_.options_.guard->Authenticated(*context);
    refs_.fetch_add(1);
    hello_deadline_.Arm(context, std::chrono::milliseconds(service_.hello_read_deadline_ms_.load()),
                        [this] { Unref(); });
    this->StartRead(&raw_);
  }

  void OnReadDone(bool ok) override {
    reading_since_ms_.store(0);
    hello_deadline_.Met();
    ReleaseOpening();  // the first message (the hello, or nothing) has been read
    if (!ok) {         // the client finished writing, or the stream broke
      std::lock_guard<std::mutex> lock(mutex_);
      read_closed_ = true;
      MaybeFinishLocked(absl::OkStatus());
      return;
    }
    bool compute = false;
    const absl::Status status = Handle(&compute);
    WorkerService::Metrics* metrics = service_.metrics_.get();
    if (metrics != nullptr && !status.ok()) metrics->Failed("request", status);
    std::lock_guard<std::mutex> lock(mutex_);
    if (finished_) return;  // a write failed meanwhile and ended the stream
    if (!status.ok()) {
      MaybeFinishLocked(status);
      return;
    }
    if (compute) {
      job_running_ = true;
      frame_done_ = std::chrono::steady_clock::now();
      if (metrics != nullptr) metrics->bytes_up->Add(static_cast<double>(frame_bytes_));
      if constexpr (!kEvaluate) {
        if (!head_ && service_.merging()) {
          service_.EnqueueReady(WorkerService::ReadyStep{
              session_, std::chrono::steady_clock::now(),
              [this](absl::StatusOr<trainer::DownFrame> down) { Deliver(std::move(down)); }});
          return;
        }
      }
      service_.compute_.Post([this] { Compute(); });
    } else if (writes_.empty() && !writing_) {
      StartNextRead();
    } else {
      read_after_writes_ = true;
    }
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mutex_);
    writing_ = false;
    if (!ok) {  // the client went away
      MaybeFinishLocked(finish_pending_ ? finish_status_
                                        : absl::CancelledError("the client went away"));
      return;
    }
    writes_.pop_front();
    WriteNextLocked();
  }

  void OnCancel() override { cancelled_.store(true); }

  void OnDone() override {
    hello_deadline_.Done();
    ReleaseOpening();  // (a stream that ended before its first message)
    bool last;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      done_ = true;
      last = !job_running_;
    }
    if (last) Destroy();
  }

 private:
  void ReleaseOpening() {
    if (opening_) service_.opening_.Release(auth_id_);
    opening_ = false;
  }
  // A read after the hello: the idle watch (WorkerService::WatchIdle) times it.
  void StartNextRead() {
    reading_since_ms_.store(SteadyMs());
    this->StartRead(&raw_);
  }
  // The last of this reactor's owners (gRPC's OnDone with the compute job, and the hello
  // deadline's alarm once set) deletes it.
  void Unref() {
    if (refs_.fetch_sub(1) == 1) delete this;
  }

  void Destroy() {
    if (session_ != 0) {
      service_.RemoveLive(session_);
      // Closing waits for the step being computed: on the compute thread, not gRPC's.
      service_.compute_.Post([&core = service_.core_, id = session_] { core.Close(id); });
      Log(absl::StrCat("ended: ", !end_status_.ok()   ? end_status_.ToString()
                                  : cancelled_.load() ? "the client disconnected"
                                                      : "finished"));
    }
    Unref();
  }

  void Log(const std::string& what) const {
    if (!service_.options_.log) return;
    service_.options_.log(absl::StrCat(kEvaluate ? "evaluate" : "train", " session ", session_,
                                       " of ", client_id_, " ", what));
  }

  // Handles raw_; sets *compute when a frame is complete.
  absl::Status Handle(bool* compute) {
    // A chunk as clients send them is taken from gRPC's slices without a copy.
    if (std::optional<rpc::ChunkMessage> chunk = rpc::DecodeChunk(raw_)) {
      if (chunk->field == rpc::kSecondChunkField) return HandleHeadChunk(chunk->chunk, compute);
      return HandleChunk(chunk->chunk, compute);
    }
    Request request;
    if (!rpc::FromByteBuffer(&raw_, &request)) {
      return absl::InvalidArgumentError(
          absl::StrCat("a message that is not a ", Request::descriptor()->full_name()));
    }
    switch (request.payload_case()) {
      case Request::kHello: {
        if (session_ != 0) return absl::FailedPreconditionError("a second hello on one stream");
        const auto& h = request.hello();
        Hello hello;
        hello.protocol_version = static_cast<uint32_t>(h.protocol_version());
        hello.client_id = h.client_id();
        hello.resume_step = h.resume_step();
        hello.config_digest = h.config_digest();
        hello.run_id = h.run_id();
        hello.evaluate = kEvaluate;
        SPLITQ_ASSIGN_OR_RETURN(Welcome welcome, service_.core_.Open(hello, auth_id_));
        session_ = welcome.session_id;
        client_id_ = hello.client_id;
        service_.AddLive(session_, WorkerService::Live{[this](const absl::Status& status) {
                                                         std::lock_guard<std::mutex> lock(mutex_);
                                                         MaybeFinishLocked(status);
                                                       },
                                                       &reading_since_ms_});
        if (!welcome.replaced.empty()) {
          service_.EndReplaced(
              welcome.replaced,
              absl::AbortedError(absl::StrCat("replaced by session ", session_, " of client '",
                                              client_id_, "' (a newer hello under its id)")));
        }
        std::string note;
        const int64_t known = welcome.next_applied;
        const auto expected = static_cast<int64_t>(welcome.expected_step);
        if (welcome.new_run) {
          note = absl::StrCat(" (a new run, ", hello.run_id,
                              ", of this client id: the previous run's progress is dropped)");
        } else if (known > expected && expected == 0 && hello.run_id.empty()) {
          note = absl::StrCat(
              "; WARNING: this worker has applied its steps before ", known, ", so steps 0..",
              known - 1,
              " are taken as replays and not applied again. A new run under an old client id? "
              "Give it a new --id, or start the worker without its --out state");
        } else if (known > expected) {
          note =
              absl::StrCat(" (steps before ", known, " are replays: answered, not applied again)");
        } else if (known >= 0 && known < expected) {
          note = absl::StrCat(" (its steps ", known, "..", expected - 1,
                              " were not applied on this worker: it restarted from an older "
                              "checkpoint, or the client trained elsewhere meanwhile)");
        }
        Log(absl::StrCat("opened at step ", welcome.expected_step, note));
        if constexpr (!kEvaluate) {
          Reply reply;
          auto* w = reply.mutable_welcome();
          w->set_protocol_version(splitq::v1::PROTOCOL_VERSION_CURRENT);
          w->set_session_id(welcome.session_id);
          w->set_expected_step(welcome.expected_step);
          if (welcome.next_applied >= 0) {
            w->set_next_applied(static_cast<uint64_t>(welcome.next_applied));
          }
          std::lock_guard<std::mutex> lock(mutex_);
          writes_.push_back(rpc::ToByteBuffer(reply));
          WriteNextLocked();
        }
        return absl::OkStatus();
      }
      case Request::kLabels: {
        if (session_ == 0) return absl::FailedPreconditionError("labels before the hello");
        auto* labels = request.mutable_labels();
        return service_.core_.AddLabels(
            session_, labels->step(),
            std::vector<int32_t>(labels->values().begin(), labels->values().end()),
            std::vector<int64_t>(labels->sample_ids().begin(), labels->sample_ids().end()));
      }
      case Request::kActivation: {
        const auto& c = request.activation();
        return HandleChunk(
            rpc::Chunk{c.step(), c.index(), c.count(), c.frame_bytes(), c.data(), {}}, compute);
      }
      default:
        if constexpr (!kEvaluate) {
          if (request.payload_case() == Request::kHeadLoss) {
            if (session_ == 0) return absl::FailedPreconditionError("a head loss before the hello");
            return service_.core_.AddHeadLoss(session_, request.head_loss().step(),
                                              request.head_loss().loss());
          }
          if (request.payload_case() == Request::kHeadGradient) {
            const auto& c = request.head_gradient();
            return HandleHeadChunk(
                rpc::Chunk{c.step(), c.index(), c.count(), c.frame_bytes(), c.data(), {}}, compute);
          }
        }
        return absl::InvalidArgumentError("an empty request");
    }
  }

  absl::Status HandleHeadChunk(const rpc::Chunk& chunk, bool* compute) {
    if constexpr (kEvaluate) {
      return absl::InvalidArgumentError("a head gradient on an Evaluate stream");
    } else {
      if (session_ == 0) return absl::FailedPreconditionError("a frame before the hello");
      SPLITQ_ASSIGN_OR_RETURN(*compute, service_.core_.AddHeadChunk(session_, chunk));
      head_ = *compute;
      frame_bytes_ = chunk.frame_bytes;
      return absl::OkStatus();
    }
  }

  absl::Status HandleChunk(const rpc::Chunk& chunk, bool* compute) {
    if (session_ == 0) return absl::FailedPreconditionError("a frame before the hello");
    head_ = false;
    SPLITQ_ASSIGN_OR_RETURN(*compute, service_.core_.AddChunk(session_, chunk));
    frame_step_ = chunk.step;
    frame_bytes_ = chunk.frame_bytes;
    return absl::OkStatus();
  }

  // Chunks of `frame` in `field`, then the step's result.
  void AppendFrame(const trainer::DownFrame& down, std::deque<grpc::ByteBuffer>* replies) {
    // The chunks refer to the frame; the last one written lets it go.
    const auto frame = std::make_shared<const std::string>(down.frame);
    const int64_t chunk = service_.options_.reply_chunk_bytes;
    const int64_t size = static_cast<int64_t>(frame->size());
    const uint32_t count = static_cast<uint32_t>(std::max<int64_t>(1, (size + chunk - 1) / chunk));
    for (uint32_t i = 0; i < count; ++i) {
      const int64_t begin = i * chunk;
      replies->push_back(rpc::EncodeChunk(
          static_cast<uint64_t>(down.step), i, count, static_cast<uint64_t>(size), frame,
          static_cast<size_t>(begin), static_cast<size_t>(std::min(chunk, size - begin)),
          down.activation ? rpc::kSecondChunkField : rpc::kChunkField));
    }
    Reply result;
    auto* res = result.mutable_result();
    res->set_step(static_cast<uint64_t>(down.step));
    res->set_loss(down.loss);
    res->set_grad_bits(down.grad_bits);
    res->set_bytes_down(static_cast<uint64_t>(size));
    res->set_activation(down.activation);
    res->set_act_bits(down.act_bits);
    replies->push_back(rpc::ToByteBuffer(result));
  }

  // On the compute thread.
  void Compute() {
    if constexpr (kEvaluate) {
      std::deque<grpc::ByteBuffer> replies;
      absl::Status status;
      // Validation waits for an open U-shaped step too: its forward would change the state of
      // boundary 2's module that the open step's regulariser reads.
      if (service_.ParkIfNotTurn(session_, [this] { Compute(); })) return;
      auto piece = service_.core_.RunEvaluate(session_);
      status = piece.status();
      if (piece.ok()) {
        Reply r;
        r.set_step(frame_step_);
        r.set_loss_sum(piece->loss_sum);
        r.set_correct(static_cast<uint64_t>(piece->correct));
        r.set_count(static_cast<uint64_t>(piece->count));
        r.set_output(piece->frame);
        replies.push_back(rpc::ToByteBuffer(r));
      }
      Count(status, 0, 0, true);
      EndJob(status, std::move(replies));
    } else {
      // Another session's U-shaped step is open: this step waits for its turn.
      if (!head_ && service_.ParkIfNotTurn(session_, [this] { Compute(); })) return;
      Deliver(head_ ? service_.core_.RunHead(session_) : service_.core_.RunStep(session_));
    }
  }

  // On the compute thread: a training step's result.
  void Deliver(absl::StatusOr<trainer::DownFrame> down) {
    std::deque<grpc::ByteBuffer> replies;
    if (down.ok()) AppendFrame(*down, &replies);
    Count(down.status(), down.ok() ? down->frame.size() : 0,
          down.ok() && !down->activation ? down->grad_bits : 0, !down.ok() || !down->activation);
    EndJob(down.status(), std::move(replies));
  }

  // On the compute thread: an answer (its frame's bytes and bits) or a failure. `last`: the
  // step's final answer (a U-shaped step answers twice; it counts once, at its head gradient).
  void Count(const absl::Status& status, size_t bytes, double grad_bits, bool last) {
    WorkerService::Metrics* m = service_.metrics_.get();
    if (m == nullptr) return;
    if (!status.ok()) {
      m->Failed("step", status);
      return;
    }
    m->bytes_down->Add(static_cast<double>(bytes));
    if (grad_bits > 0) m->grad_bits->Set(grad_bits);
    if (!last) return;
    (kEvaluate ? m->evaluate : m->train)->Add(1);
    (kEvaluate ? m->evaluate_latency : m->train_latency)
        ->Observe(
            std::chrono::duration<double>(std::chrono::steady_clock::now() - frame_done_).count());
  }

  // On the compute thread: the job is over; writes `replies` (or ends the stream with `status`).
  void EndJob(const absl::Status& status, std::deque<grpc::ByteBuffer> replies) {
    bool destroy;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_running_ = false;
      destroy = done_;
      if (!destroy) {
        if (!status.ok()) {
          MaybeFinishLocked(status);
        } else {
          for (grpc::ByteBuffer& r : replies) writes_.push_back(std::move(r));
          read_after_writes_ = true;
          WriteNextLocked();
        }
      }
    }
    if (destroy) Destroy();
  }

  void WriteNextLocked() {
    if (writing_ || finished_) return;
    if (!writes_.empty()) {
      writing_ = true;
      this->StartWrite(&writes_.front());
      return;
    }
    if (finish_pending_) {
      finished_ = true;
      end_status_ = finish_status_;
      this->Finish(rpc::ToGrpcStatus(finish_status_));
      return;
    }
    if (read_after_writes_ && !read_closed_) {
      read_after_writes_ = false;
      StartNextRead();
    } else if (read_closed_ && !job_running_) {
      finished_ = true;
      this->Finish(grpc::Status::OK);
    }
  }

  // Ends the stream with `status` once the queued writes are out (an error ends it at once:
  // queued replies are dropped).
  void MaybeFinishLocked(const absl::Status& status) {
    if (finished_) return;
    if (!status.ok()) {
      if (writing_) {  // StartWrite's message (the front) must live until OnWriteDone
        while (writes_.size() > 1) writes_.pop_back();
        finish_pending_ = true;
        finish_status_ = status;
        return;
      }
      writes_.clear();
      finished_ = true;
      end_status_ = status;
      this->Finish(rpc::ToGrpcStatus(status));
      return;
    }
    // The client is done: finish when nothing is computing or being written.
    if (job_running_ || writing_ || !writes_.empty()) return;
    finished_ = true;
    this->Finish(grpc::Status::OK);
  }

  WorkerService& service_;
  std::atomic<bool> cancelled_{false};
  std::string auth_id_, client_id_;
  bool opening_ = false;      // holds one of its token's opening places (until the first message)
  std::atomic<int> refs_{1};  // Destroy, and the hello deadline once armed
  ReadDeadline hello_deadline_;
  absl::Status end_status_;
  grpc::ByteBuffer raw_;      // the message being read
  uint64_t frame_step_ = 0;   // the step of the last chunk taken
  uint64_t frame_bytes_ = 0;  // the size of the frame of the last chunk taken
  std::chrono::steady_clock::time_point frame_done_;  // when the last frame completed
  bool head_ = false;  // the frame completed is a head gradient (U-shaped)
  uint64_t session_ = 0;
  std::mutex mutex_;
  std::deque<grpc::ByteBuffer> writes_;  // front: being written while writing_
  bool writing_ = false;
  bool read_after_writes_ = false;
  bool read_closed_ = false;
  bool job_running_ = false;
  bool done_ = false;
  bool finished_ = false;
  bool finish_pending_ = false;
  absl::Status finish_status_;
  // When the pending read after the hello was started (steady clock ms), 0 when none is.
  std::atomic<int64_t> reading_since_ms_{0};
};

void WorkerService::AddLive(uint64_t session, Live live) {
  std::lock_guard<std::mutex> lock(live_mutex_);
  live_[session] = std::move(live);
}

void WorkerService::RemoveLive(uint64_t session) {
  std::lock_guard<std::mutex> lock(live_mutex_);
  live_.erase(session);
}

void WorkerService::EndReplaced(const std::vector<uint64_t>& sessions, const absl::Status& status) {
  std::lock_guard<std::mutex> lock(live_mutex_);  // a stream leaves live_ before it is deleted
  for (const uint64_t id : sessions) {
    auto it = live_.find(id);
    if (it != live_.end()) it->second.end(status);
  }
}

WorkerService::WorkerService(WorkerCore& core, const TokenSet* tokens,
                             const WorkerServiceOptions& options)
    : core_(core), tokens_(tokens), options_(options) {
  if (options_.metrics != nullptr) metrics_ = std::make_unique<Metrics>(*options_.metrics);
  options_.reply_chunk_bytes = std::clamp<int64_t>(options_.reply_chunk_bytes, 1 << 10, 4 << 20);
  core_.set_turn_listener([this] { Unpark(); });
  if (options_.merge.rounds) StartRounds();
  session_idle_ms_ = std::max<int64_t>(0, options_.session_idle_ms);
  turn_idle_ms_ = std::max<int64_t>(0, options_.turn_idle_ms);
  idle_thread_ = std::thread([this] { WatchIdle(); });
}

void WorkerService::WatchIdle() {
  std::unique_lock<std::mutex> lock(idle_mutex_);
  while (!idle_stop_) {
    const int64_t idle = session_idle_ms_.load(), turn = turn_idle_ms_.load();
    // Look every quarter of the shorter limit (10 ms .. 1 s).
    const int64_t shorter = idle > 0 && turn > 0 ? std::min(idle, turn) : std::max(idle, turn);
    const auto period =
        std::chrono::milliseconds(shorter > 0 ? std::clamp<int64_t>(shorter / 4, 10, 1000) : 1000);
    idle_wake_.wait_for(lock, period);
    if (idle_stop_ || shorter <= 0) continue;
    lock.unlock();
    EndIdle(session_idle_ms_.load(), turn_idle_ms_.load());
    lock.lock();
  }
}

void WorkerService::EndIdle(int64_t idle_ms, int64_t turn_ms) {
  const int64_t now = SteadyMs();
  const uint64_t holder = core_.turn();           // the U-shaped session whose step is open, if any
  std::lock_guard<std::mutex> lock(live_mutex_);  // a stream leaves live_ before it is deleted
  for (auto& [id, live] : live_) {
    const int64_t since = live.reading_since_ms->load();
    if (since == 0) continue;
    if (id == holder && turn_ms > 0 && now - since > turn_ms) {
      live.end(absl::DeadlineExceededError(absl::StrCat(
          "no head gradient from the client for ", absl::SixDigits(turn_ms / 1000.0),
          " s while its step held the server part (U-shaped; every other client waits "
          "meanwhile): the worker ends the session and abandons the step (splitq worker "
          "--turn-idle-s); reconnect to resume")));
      continue;
    }
    if (idle_ms <= 0 || now - since <= idle_ms) continue;
    live.end(absl::DeadlineExceededError(absl::StrCat(
        "no message from the client for ", absl::SixDigits(idle_ms / 1000.0),
        " s: the worker ends idle sessions (splitq worker --session-idle-s); reconnect to "
        "resume")));
  }
}

bool WorkerService::ParkIfNotTurn(uint64_t session, std::function<void()> job) {
  // Under parked_mutex_, so a turn freed right after the check finds the job parked (Unpark
  // takes the same mutex after the core has freed the turn).
  std::lock_guard<std::mutex> lock(parked_mutex_);
  const uint64_t holder = core_.turn();
  if (holder == 0 || holder == session) return false;
  parked_.push_back(std::move(job));
  return true;
}

void WorkerService::Unpark() {
  std::deque<std::function<void()>> jobs;
  {
    std::lock_guard<std::mutex> lock(parked_mutex_);
    jobs.swap(parked_);
  }
  for (auto& job : jobs) compute_.Post(std::move(job));
}

void WorkerService::EnqueueReady(ReadyStep step) {
  bool post;
  {
    std::lock_guard<std::mutex> lock(merge_mutex_);
    ready_.push_back(std::move(step));
    post = !merge_posted_;
    merge_posted_ = true;
  }
  merge_wake_.notify_all();
  if (post) compute_.Post([this] { MergeReady(); });
}

void WorkerService::StartRounds() {
  {
    std::lock_guard<std::mutex> lock(merge_mutex_);
    merge_posted_ = true;
  }
  compute_.Post([this] { MergeReady(); });
}

void WorkerService::MergeReady() {
  const MergeOptions& m = options_.merge;
  std::vector<ReadyStep> batch;
  bool more;
  const bool round = !m.rounds || !m.before_round || m.before_round(closing_);
  {
    std::unique_lock<std::mutex> lock(merge_mutex_);
    if (!round && !stopping_) {
      // No round now (the worker is stopping): the ready steps go back to their clients.
      std::deque<ReadyStep> left;
      left.swap(ready_);
      lock.unlock();
      for (ReadyStep& r : left) r.deliver(absl::UnavailableError("the worker is stopping"));
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      compute_.Post([this] { MergeReady(); });
      return;
    }
    if (m.rounds && ready_.empty() && !stopping_) {
      // An idle replica still takes its part in the group's rounds, at most every idle_round_ms.
      merge_wake_.wait_for(lock, std::chrono::duration<double, std::milli>(m.idle_round_ms),
                           [&] { return !ready_.empty() || stopping_; });
    }
    if (ready_.empty() && (!m.rounds || stopping_)) {
      merge_posted_ = false;
      return;
    }
    if (m.rounds && stopping_) {
      // The group's other replicas may be gone: no more rounds; the clients retry elsewhere.
      std::deque<ReadyStep> left;
      left.swap(ready_);
      merge_posted_ = false;
      lock.unlock();
      for (ReadyStep& r : left) r.deliver(absl::UnavailableError("the worker is stopping"));
      return;
    }
    if (!ready_.empty() && m.window_ms > 0 && static_cast<int64_t>(ready_.size()) < m.max_clients) {
      const auto deadline =
          ready_.front().since + std::chrono::duration_cast<std::chrono::nanoseconds>(
                                     std::chrono::duration<double, std::milli>(m.window_ms));
      merge_wake_.wait_until(lock, deadline,
                             [&] { return static_cast<int64_t>(ready_.size()) >= m.max_clients; });
    }
    int64_t targets = 0;
    while (!ready_.empty() && static_cast<int64_t>(batch.size()) < m.max_clients) {
      const int64_t t = core_.ready_targets(ready_.front().session);
      if (!batch.empty() && m.max_targets > 0 && targets + t > m.max_targets) break;
      targets += t;
      batch.push_back(std::move(ready_.front()));
      ready_.pop_front();
    }
    more = (!ready_.empty() || m.rounds) && !stopping_;
    merge_posted_ = more;
  }
  if (more) compute_.Post([this] { MergeReady(); });
  std::vector<uint64_t> sessions;
  sessions.reserve(batch.size());
  for (const ReadyStep& r : batch) sessions.push_back(r.session);
  std::vector<absl::StatusOr<trainer::DownFrame>> results = core_.RunSteps(sessions);
  for (size_t i = 0; i < batch.size(); ++i) batch[i].deliver(std::move(results[i]));
}

WorkerService::~WorkerService() {
  {
    std::lock_guard<std::mutex> lock(idle_mutex_);
    idle_stop_ = true;
  }
  idle_wake_.notify_all();
  if (idle_thread_.joinable()) idle_thread_.join();
  closing_.store(true);
  {
    std::lock_guard<std::mutex> lock(merge_mutex_);
    stopping_ = true;
  }
  merge_wake_.notify_all();
  core_.set_turn_listener(nullptr);
  // Parked jobs belong to reactors that gRPC ends before the service goes; run none of them.
  std::lock_guard<std::mutex> lock(parked_mutex_);
  parked_.clear();
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* WorkerService::Train(
    grpc::CallbackServerContext* context) {
  return new SessionReactor<splitq::v1::TrainRequest, splitq::v1::TrainReply, false>(*this,
                                                                                     context);
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* WorkerService::Evaluate(
    grpc::CallbackServerContext* context) {
  return new SessionReactor<splitq::v1::EvaluateRequest, splitq::v1::EvaluateReply, true>(*this,
                                                                                          context);
}

}  // namespace splitq::server

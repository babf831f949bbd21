#include "server/worker_core.h"

#include <malloc.h>

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/status_macros.h"
#include "server/coordinator_core.h"

namespace splitq::server {

namespace {
// Two run ids name the same run, or one of them is unknown (an older client or checkpoint).
bool SameRun(const std::string& a, const std::string& b) {
  return a.empty() || b.empty() || a == b;
}
}  // namespace

namespace {
constexpr int64_t kTrimAboveBytes = int64_t{1} << 20;
}  // namespace

struct WorkerCore::Session {
  std::string client_id;
  std::string run_id;
  bool evaluate = false;
  uint64_t handler_id = 0;
  uint64_t expected_step = 0;
  rpc::FrameAssembler assembler;
  bool has_labels = false;
  std::vector<int32_t> labels;
  std::vector<int64_t> sample_ids;
  std::optional<trainer::UpFrame> ready;
  // U-shaped: the open step (-1: none), whether it updates, and its head loss and gradient.
  int64_t open_step = -1;
  bool open_update = false;
  bool has_head_loss = false;
  double head_loss = 0;
  std::optional<trainer::HeadGradient> head_ready;

  explicit Session(const rpc::AssemblerLimits& limits) : assembler(limits) {}
  int64_t bytes() const {
    int64_t n = assembler.buffered_bytes();
    n += static_cast<int64_t>(labels.size() * sizeof(int32_t) + sample_ids.size() * 8);
    if (ready) n += static_cast<int64_t>(ready->frame->size());
    return n;
  }
};

WorkerCore::WorkerCore(trainer::ServerHandler& handler, const WorkerOptions& options)
    : handler_(handler), options_(options), updates_(handler.updates()) {
  loaded_updates_ = updates_.load();
}

WorkerCore::~WorkerCore() {
  std::lock_guard<std::mutex> compute(compute_);
  for (auto& [id, s] : sessions_) handler_.CloseSession(s->handler_id);
}

absl::StatusOr<Welcome> WorkerCore::Open(const Hello& hello, const std::string& authenticated_id) {
  if (hello.protocol_version != kProtocolVersion) {
    return absl::FailedPreconditionError(absl::StrCat("protocol version ", hello.protocol_version,
                                                      "; this worker speaks ", kProtocolVersion,
                                                      " (upgrade the older side)"));
  }
  if (!IsValidMemberName(hello.client_id)) {
    return absl::InvalidArgumentError(
        absl::StrCat("client id '", hello.client_id, "': 1..64 of [A-Za-z0-9._-], not . or .."));
  }
  if (hello.resume_step > kMaxStep) {
    return absl::InvalidArgumentError(
        absl::StrCat("resume step ", hello.resume_step, " is above the largest step, 2^53"));
  }
  if (!hello.run_id.empty() && !IsValidMemberName(hello.run_id)) {
    return absl::InvalidArgumentError(
        absl::StrCat("run id '", hello.run_id, "': 1..64 of [A-Za-z0-9._-], not . or .."));
  }
  if (!authenticated_id.empty() && authenticated_id != hello.client_id) {
    return absl::PermissionDeniedError(
        absl::StrCat("the token belongs to another client than '", hello.client_id, "'"));
  }
  if (!options_.config_digest.empty() && !hello.config_digest.empty() &&
      hello.config_digest != options_.config_digest) {
    return absl::FailedPreconditionError(
        absl::StrCat("the client's run config (digest ", hello.config_digest.substr(0, 12),
                     ") is not the worker's (", options_.config_digest.substr(0, 12),
                     "): start both with the same --config and --set"));
  }
  // compute_ is held until the session is in place: a step being computed (RunStep holds
  // compute_ from its decision to update until it records the progress) never sees a new run
  // of its client id replace the record halfway.
  std::unique_lock<std::mutex> compute(compute_);
  const uint64_t handler_id = handler_.OpenSession();
  std::vector<uint64_t> replaced;
  Welcome welcome;
  bool full = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t same_kind = 0;  // Train and Evaluate sessions are counted apart
    for (const auto& [id, s] : sessions_) {
      if (s->evaluate != hello.evaluate) continue;
      ++same_kind;
      if (s->client_id == hello.client_id) replaced.push_back(id);
    }
    full = same_kind - replaced.size() >= options_.max_sessions;
    if (!full) {
      auto session = std::make_unique<Session>(options_.assembler);
      session->client_id = hello.client_id;
      session->run_id = hello.run_id;
      session->evaluate = hello.evaluate;
      session->handler_id = handler_id;
      session->expected_step = hello.resume_step;
      welcome.session_id = next_id_++;
      welcome.expected_step = hello.resume_step;
      if (!hello.evaluate) {
        auto known = next_applied_.find(hello.client_id);
        if (known != next_applied_.end() && SameRun(known->second.run_id, hello.run_id)) {
          welcome.next_applied = static_cast<int64_t>(known->second.next);
        } else if (known != next_applied_.end()) {  // a new run under this client id
          welcome.new_run = true;
          known->second = Progress{0, hello.run_id};
        }
      }
      sessions_[welcome.session_id] = std::move(session);
    }
  }
  if (full) {
    handler_.CloseSession(handler_id);
    return absl::ResourceExhaustedError(
        absl::StrCat("this worker serves ", options_.max_sessions, " clients at most"));
  }
  compute.unlock();
  for (uint64_t id : replaced) Close(id);  // (takes mutex_, then compute_)
  welcome.replaced = std::move(replaced);
  return welcome;
}

absl::StatusOr<WorkerCore::Session*> WorkerCore::Find(uint64_t session) {
  auto it = sessions_.find(session);
  if (it == sessions_.end()) {
    return absl::NotFoundError(absl::StrCat("no session ", session, " (closed or replaced)"));
  }
  return it->second.get();
}

absl::Status WorkerCore::AddLabels(uint64_t session, uint64_t step, std::vector<int32_t> labels,
                                   std::vector<int64_t> sample_ids) {
  std::lock_guard<std::mutex> lock(mutex_);
  SPLITQ_ASSIGN_OR_RETURN(Session * s, Find(session));
  if (s->ready) return absl::FailedPreconditionError("one step in flight per session");
  if (step != s->expected_step) {
    return absl::FailedPreconditionError(
        absl::StrCat("labels of step ", step, "; the session expects step ", s->expected_step));
  }
  if (s->has_labels) {
    return absl::FailedPreconditionError(absl::StrCat("labels of step ", step, " sent twice"));
  }
  if (static_cast<int64_t>(labels.size()) > options_.max_labels ||
      static_cast<int64_t>(sample_ids.size()) > options_.max_labels) {
    return absl::ResourceExhaustedError(
        absl::StrCat("more than ", options_.max_labels, " labels or sample ids in one step"));
  }
  s->labels = std::move(labels);
  s->sample_ids = std::move(sample_ids);
  s->has_labels = true;
  return absl::OkStatus();
}

absl::StatusOr<bool> WorkerCore::AddChunk(uint64_t session, const rpc::Chunk& chunk) {
  std::lock_guard<std::mutex> lock(mutex_);
  SPLITQ_ASSIGN_OR_RETURN(Session * s, Find(session));
  if (s->ready) return absl::FailedPreconditionError("one step in flight per session");
  if (s->open_step >= 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("an activation while the head gradient of step ", s->open_step, " is due"));
  }
  SPLITQ_ASSIGN_OR_RETURN(std::optional<std::string> frame,
                          s->assembler.Add(chunk, s->expected_step));
  if (!frame) return false;
  if (!s->has_labels) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the frame of step ", chunk.step, " ended before its labels (send them first)"));
  }
  trainer::UpFrame up;
  up.step = static_cast<int64_t>(s->expected_step);
  up.frame = std::make_shared<const std::string>(std::move(*frame));
  up.labels = std::move(s->labels);
  up.sample_ids = std::move(s->sample_ids);
  s->labels.clear();
  s->sample_ids.clear();
  s->has_labels = false;
  s->ready = std::move(up);
  return true;
}

absl::StatusOr<trainer::UpFrame> WorkerCore::TakeReady(uint64_t session, bool evaluate,
                                                       uint64_t* handler_id, std::string* client_id,
                                                       std::string* run_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  SPLITQ_ASSIGN_OR_RETURN(Session * s, Find(session));
  if (s->evaluate != evaluate) {
    return absl::FailedPreconditionError(evaluate ? "a Train session cannot evaluate"
                                                  : "an Evaluate session cannot train");
  }
  if (!s->ready) return absl::FailedPreconditionError("no complete frame to compute");
  trainer::UpFrame up = std::move(*s->ready);
  s->ready.reset();
  if (!evaluate) ++s->expected_step;  // validation batches all carry the training step
  *handler_id = s->handler_id;
  *client_id = s->client_id;
  *run_id = s->run_id;
  return up;
}

absl::StatusOr<trainer::DownFrame> WorkerCore::RunStep(uint64_t session) {
  // Deciding whether the step updates, computing it and settling the count happen under
  // compute_, so two sessions of one client id cannot interleave them (lock order: compute_,
  // then mutex_, everywhere).
  std::lock_guard<std::mutex> compute(compute_);
  if (const uint64_t holder = turn(); holder != 0 && holder != session) {
    return absl::FailedPreconditionError(
        absl::StrCat("session ", holder, " holds a U-shaped step open"));
  }
  uint64_t handler_id = 0;
  std::string client_id, run_id;
  SPLITQ_ASSIGN_OR_RETURN(trainer::UpFrame up,
                          TakeReady(session, false, &handler_id, &client_id, &run_id));
  const bool update = WillUpdate(client_id, run_id, up.step);
  absl::StatusOr<trainer::DownFrame> down = handler_.Train(handler_id, up, update);
  if (!down.ok()) return down.status();
  if (down->activation) {  // U-shaped: the step stays open until RunHead
    std::lock_guard<std::mutex> lock(mutex_);
    SPLITQ_ASSIGN_OR_RETURN(Session * s, Find(session));
    s->open_step = up.step;
    s->open_update = update;
    turn_ = session;
    return down;
  }
  Settle(client_id, run_id, up.step, update);
  return down;
}

bool WorkerCore::WillUpdate(const std::string& client_id, const std::string& run_id,
                            int64_t step) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto known = next_applied_.find(client_id);
  if (known == next_applied_.end()) return true;
  // A session of a run that a newer run of this client id replaced updates nothing.
  if (!SameRun(known->second.run_id, run_id)) return false;
  return static_cast<uint64_t>(step) >= known->second.next;
}

std::vector<absl::StatusOr<trainer::DownFrame>> WorkerCore::RunSteps(
    const std::vector<uint64_t>& sessions) {
  std::vector<absl::StatusOr<trainer::DownFrame>> out(sessions.size(),
                                                      absl::UnknownError("not computed"));
  if (sessions.size() == 1 && !options_.rounds) {
    out[0] = RunStep(sessions[0]);
    return out;
  }
  if (handler_.u_shaped()) {
    for (auto& r : out) {
      r = absl::FailedPreconditionError("U-shaped steps are computed one at a time (RunStep)");
    }
    return out;
  }
  // The duplicates of a client id (an old session not closed yet) go one at a time, after.
  std::vector<size_t> later;
  {
    std::lock_guard<std::mutex> compute(compute_);
    if (const uint64_t holder = turn(); holder != 0) {
      for (auto& r : out) {
        r = absl::FailedPreconditionError(
            absl::StrCat("session ", holder, " holds a U-shaped step open"));
      }
      return out;
    }
    struct Taken {
      size_t index = 0;
      uint64_t handler_id = 0;
      std::string client_id, run_id;
      trainer::UpFrame up;
    };
    std::vector<Taken> merged;
    std::vector<std::string> clients;
    for (size_t i = 0; i < sessions.size(); ++i) {
      Taken t;
      t.index = i;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        absl::StatusOr<Session*> s = Find(sessions[i]);
        if (s.ok() && std::find(clients.begin(), clients.end(), (*s)->client_id) != clients.end()) {
          later.push_back(i);
          continue;
        }
      }
      absl::StatusOr<trainer::UpFrame> up =
          TakeReady(sessions[i], false, &t.handler_id, &t.client_id, &t.run_id);
      if (!up.ok()) {
        out[i] = up.status();
        continue;
      }
      t.up = std::move(*up);
      clients.push_back(t.client_id);
      if (!WillUpdate(t.client_id, t.run_id, t.up.step)) {
        // A replay: its gradient, no update, outside the merge.
        out[i] = handler_.Train(t.handler_id, t.up, false);
        if (out[i].ok()) Settle(t.client_id, t.run_id, t.up.step, false);
        continue;
      }
      merged.push_back(std::move(t));
    }
    std::vector<std::pair<uint64_t, const trainer::UpFrame*>> steps;
    for (const Taken& t : merged) steps.emplace_back(t.handler_id, &t.up);
    std::vector<absl::StatusOr<trainer::DownFrame>> results;
    std::vector<std::string> others;
    if (options_.rounds) {
      // Each step's record, "CLIENT STEP RUN" (the progress line's fields), for the others.
      std::vector<std::string> records;
      for (const Taken& t : merged) {
        records.push_back(absl::StrCat(t.client_id, " ", t.up.step, " ", t.run_id));
      }
      results = handler_.TrainRound(steps, records, &others);
    } else {
      results = handler_.TrainMerged(steps);
    }
    // A group's round may update without a step of ours.
    updates_.store(handler_.updates());
    for (size_t k = 0; k < merged.size(); ++k) {
      const Taken& t = merged[k];
      out[t.index] = std::move(results[k]);
      if (out[t.index].ok()) Settle(t.client_id, t.run_id, t.up.step, true);
    }
    for (const std::string& record : others) SettleOther(record);
  }
  for (size_t i : later) {
    // In a group an update outside a round would set this replica apart: the step fails
    // (its client retries on its new session).
    out[i] = options_.rounds ? absl::AbortedError(
                                   "an older session of this client is being "
                                   "replaced; send the step again")
                             : RunStep(sessions[i]);
  }
  return out;
}

void WorkerCore::Settle(const std::string& client_id, const std::string& run_id, int64_t step,
                        bool update) {
  std::lock_guard<std::mutex> lock(mutex_);
  // A new run of this client id cannot have opened meanwhile (Open holds compute_ until its
  // record is in place); checked all the same, so that its fresh record would stay.
  auto known = next_applied_.find(client_id);
  if (update && (known == next_applied_.end() || SameRun(known->second.run_id, run_id))) {
    Progress& p = next_applied_[client_id];
    p.next = static_cast<uint64_t>(step) + 1;
    if (!run_id.empty()) p.run_id = run_id;
  }
  ++steps_served_;
  if (update) {
    ++steps_applied_;
    ++group_steps_applied_;
  }
  updates_.store(handler_.updates());
}

void WorkerCore::SettleOther(const std::string& record) {
  std::vector<std::string> fields = absl::StrSplit(record, ' ');
  int64_t step = 0;
  if (fields.size() != 3 || !IsValidMemberName(fields[0]) || !absl::SimpleAtoi(fields[1], &step) ||
      step < 0) {
    return;  // not one of ours (records are written by RunSteps above)
  }
  std::lock_guard<std::mutex> lock(mutex_);
  Progress& p = next_applied_[fields[0]];
  if (!SameRun(p.run_id, fields[2])) {
    p = Progress{};  // the other member has seen a newer run of this client id
  }
  p.next = std::max(p.next, static_cast<uint64_t>(step) + 1);
  if (!fields[2].empty()) p.run_id = fields[2];
  ++group_steps_applied_;
}

absl::Status WorkerCore::AddHeadLoss(uint64_t session, uint64_t step, double loss) {
  std::lock_guard<std::mutex> lock(mutex_);
  SPLITQ_ASSIGN_OR_RETURN(Session * s, Find(session));
  if (s->open_step < 0 || step != static_cast<uint64_t>(s->open_step)) {
    return absl::FailedPreconditionError(
        absl::StrCat("a head loss of step ", step, ", but that step is not open"));
  }
  if (s->has_head_loss) return absl::FailedPreconditionError("a head loss sent twice");
  s->has_head_loss = true;
  s->head_loss = loss;
  return absl::OkStatus();
}

absl::StatusOr<bool> WorkerCore::AddHeadChunk(uint64_t session, const rpc::Chunk& chunk) {
  std::lock_guard<std::mutex> lock(mutex_);
  SPLITQ_ASSIGN_OR_RETURN(Session * s, Find(session));
  if (s->open_step < 0 || s->head_ready) {
    return absl::FailedPreconditionError("a head gradient without an open U-shaped step");
  }
  SPLITQ_ASSIGN_OR_RETURN(std::optional<std::string> frame,
                          s->assembler.Add(chunk, static_cast<uint64_t>(s->open_step)));
  if (!frame) return false;
  if (!s->has_head_loss) {
    return absl::FailedPreconditionError(absl::StrCat("the head gradient of step ", chunk.step,
                                                      " ended before its loss (send it first)"));
  }
  s->head_ready = trainer::HeadGradient{s->open_step, std::move(*frame), s->head_loss};
  s->has_head_loss = false;
  return true;
}

absl::StatusOr<trainer::DownFrame> WorkerCore::RunHead(uint64_t session) {
  std::lock_guard<std::mutex> compute(compute_);
  trainer::HeadGradient head;
  uint64_t handler_id;
  bool update;
  std::string client_id, run_id;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    SPLITQ_ASSIGN_OR_RETURN(Session * s, Find(session));
    if (!s->head_ready) return absl::FailedPreconditionError("no complete head gradient");
    head = std::move(*s->head_ready);
    s->head_ready.reset();
    s->open_step = -1;
    update = s->open_update;
    handler_id = s->handler_id;
    client_id = s->client_id;
    run_id = s->run_id;
  }
  absl::StatusOr<trainer::DownFrame> down = handler_.TrainHead(handler_id, head);
  FreeTurn(session);  // whatever TrainHead said, the step is closed
  if (!down.ok()) return down.status();
  Settle(client_id, run_id, head.step, update);
  return down;
}

void WorkerCore::FreeTurn(uint64_t session) {
  bool freed = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (turn_ == session && session != 0) {
      turn_ = 0;
      freed = true;
    }
  }
  if (freed && turn_listener_) turn_listener_();
}

uint64_t WorkerCore::turn() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return turn_;
}

absl::StatusOr<trainer::EvalPiece> WorkerCore::RunEvaluate(uint64_t session) {
  uint64_t handler_id = 0;
  std::string client_id, run_id;
  std::lock_guard<std::mutex> compute(compute_);
  if (const uint64_t holder = turn(); holder != 0 && holder != session) {
    return absl::FailedPreconditionError(
        absl::StrCat("session ", holder, " holds a U-shaped step open"));
  }
  SPLITQ_ASSIGN_OR_RETURN(trainer::UpFrame up,
                          TakeReady(session, true, &handler_id, &client_id, &run_id));
  return handler_.Evaluate(handler_id, up);
}

void WorkerCore::Close(uint64_t session) {
  uint64_t handler_id = 0;
  int64_t held = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = sessions_.find(session);
    if (it == sessions_.end()) return;
    handler_id = it->second->handler_id;
    held = it->second->bytes();
    sessions_.erase(it);
  }
  {
    std::lock_guard<std::mutex> compute(compute_);
    held += handler_.CloseSession(handler_id);
  }
  FreeTurn(session);  // after the server part has let the step go
  // glibc keeps freed heap memory for later; a session that held a large (maybe hostile)
  // partial frame or many cached samples (AQ-SGD) gives it back to the system, so RSS returns
  // near its baseline. Outside the compute lock: a trim takes tens of ms on a large heap, and
  // other sessions' steps need not wait for it.
  if (held >= kTrimAboveBytes) malloc_trim(0);
}

absl::StatusOr<int64_t> WorkerCore::SaveCheckpoint(const std::string& path) {
  std::lock_guard<std::mutex> compute(compute_);
  std::string progress;  // "client_id next_step [run_id]\n" per client
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& [id, p] : next_applied_) {
      absl::StrAppend(&progress, id, " ", p.next, p.run_id.empty() ? "" : " ", p.run_id, "\n");
    }
  }
  SPLITQ_RETURN_IF_ERROR(handler_.SaveCheckpoint(path, progress));
  return handler_.updates();
}

absl::StatusOr<size_t> WorkerCore::LoadCheckpoint(const std::string& path, bool serving) {
  std::lock_guard<std::mutex> compute(compute_);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!sessions_.empty() && !(serving && options_.rounds)) {
      return absl::FailedPreconditionError("load a checkpoint before serving any session");
    }
  }
  const int64_t before = handler_.updates();
  std::string progress;
  SPLITQ_RETURN_IF_ERROR(handler_.LoadCheckpoint(path, &progress));
  std::map<std::string, Progress> next_applied;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(progress, '\n', absl::SkipEmpty())) {
    ++line_number;
    std::vector<absl::string_view> fields = absl::StrSplit(line, ' ');
    uint64_t next = 0;
    if (fields.size() < 2 || fields.size() > 3 || !IsValidMemberName(std::string(fields[0])) ||
        !absl::SimpleAtoi(fields[1], &next) ||
        (fields.size() == 3 && !IsValidMemberName(std::string(fields[2])))) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, ": the clients' progress is damaged (line ", line_number, ": '", line, "')"));
    }
    next_applied[std::string(fields[0])] =
        Progress{next, fields.size() == 3 ? std::string(fields[2]) : std::string()};
  }
  std::lock_guard<std::mutex> lock(mutex_);
  next_applied_ = std::move(next_applied);
  updates_.store(handler_.updates());
  // A group member taking the group's state keeps counting what it did itself.
  loaded_updates_ = serving ? loaded_updates_ + handler_.updates() - before : handler_.updates();
  return next_applied_.size();
}

WorkerStats WorkerCore::stats() const {
  WorkerStats out;
  out.updates = updates_.load();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    out.sessions = static_cast<uint32_t>(sessions_.size());
    for (const auto& [id, session] : sessions_) out.train_sessions += session->evaluate ? 0 : 1;
    out.steps_served = steps_served_;
    out.steps_applied = steps_applied_;
    out.updates_here = out.updates - loaded_updates_;
    out.group_steps_applied = group_steps_applied_;
    for (const auto& [client, progress] : next_applied_) {
      out.clients_next_sum += static_cast<int64_t>(progress.next);
    }
  }
  return out;
}

std::string WorkerCore::weights_digest() const {
  std::lock_guard<std::mutex> compute(compute_);
  return handler_.WeightsDigest();
}

int64_t WorkerCore::ready_targets(uint64_t session) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = sessions_.find(session);
  if (it == sessions_.end() || !it->second->ready) return 0;
  return static_cast<int64_t>(it->second->ready->labels.size());
}

int64_t WorkerCore::buffered_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t n = 0;
  for (const auto& [id, s] : sessions_) n += s->bytes();
  return n;
}

}  // namespace splitq::server

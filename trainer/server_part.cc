#include "trainer/server_part.h"

// clang-format off
// clip_grad.h uses torch::Tensor without including its definition: types.h goes first.
#include <torch/types.h>
#include <torch/nn/utils/clip_grad.h>
// clang-format on
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/sha256.h"
#include "base/status_macros.h"
#include "trainer/boundary.h"
#include "trainer/checkpoint_io.h"
#include "trainer/client_part.h"
#include "trainer/replica_group.h"
#include "trainer/setup.h"

namespace splitq::trainer {
namespace {
using namespace internal;  // NOLINT(build/namespaces)
constexpr int64_t kServerCheckpointVersion = 1;

// Worker groups: the round's records (TrainRound) travel in the same collective, as bytes
// in floats (exact), each member in its own slots of `slots` x `record_bytes`.
struct RoundRecords {
  const std::vector<std::string>* mine = nullptr;
  int64_t slots = 0, record_bytes = 0;
  std::vector<std::string>* others = nullptr;
};

using Clock = std::chrono::steady_clock;
double Ms(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double, std::milli>(to - from).count();
}

// server.merge.threads for `steps` steps: 0 is one per step, at most the hardware's threads.
int MergeThreads(int64_t configured, size_t steps) {
  const int64_t hardware = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t want = configured > 0 ? configured : std::min<int64_t>(hardware, steps);
  return static_cast<int>(std::clamp<int64_t>(want, 1, std::max<size_t>(steps, 1)));
}

// fn(0..n-1) on `threads` threads (the caller's among them); returns when all are done. fn
// must not throw (wrap torch calls in TorchCall).
void ForEach(size_t n, int threads, const std::function<void(size_t)>& fn) {
  if (threads <= 1 || n <= 1) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<size_t> next{0};
  const bool grad = at::GradMode::is_enabled();
  auto work = [&] {
    at::GradMode::set_enabled(grad);  // thread-local in torch
    for (size_t i = next++; i < n; i = next++) fn(i);
  };
  std::vector<std::thread> helpers;
  for (int k = 1; k < threads && static_cast<size_t>(k) < n; ++k) helpers.emplace_back(work);
  work();
  for (std::thread& h : helpers) h.join();
}
}  // namespace

struct ServerPart::Impl {
  RunConfig c;
  ServerPartOptions options;
  at::Device device{at::kCPU};
  SplitModel model;        // server kept; client and head dropped
  size_t first_block = 0;  // the index of the server's first block in the whole model
  std::unique_ptr<torch::optim::AdamW> opt;
  quant::AmaqBoundary amaq2{nullptr};  // U-shaped: boundary 2's module, shared by the sessions
  double excess2 = -1e9;
  std::vector<int64_t> sample_shape;  // one example's boundary activation
  int64_t classes = 0;                // logits' last dimension (plain layout)
  quant::FrameLimits limits;

  // A U-shaped step between Train and TrainHead.
  struct Open {
    int64_t step = 0;
    bool update = false;
    at::Tensor server_in, sender_side;
  };
  struct Session {
    std::unique_ptr<BoundaryReceiver> receiver;  // boundary 1
    std::unique_ptr<BoundarySender> sender;      // boundary 2 (U-shaped)
    std::optional<Open> open;
  };
  std::map<uint64_t, Session> sessions;
  uint64_t open_session = 0;      // the session whose U-shaped step is open (0: none)
  ReplicaGroup* group = nullptr;  // worker groups (set_group); null: this replica alone
  // Merged rounds' phases (RoundTimes), for round_times(); guarded by times_mutex.
  mutable std::mutex times_mutex;
  RoundTimes times;
  uint64_t next_session = 1;
  int64_t updates = 0;

  absl::StatusOr<Session*> Find(uint64_t id) {
    auto it = sessions.find(id);
    if (it == sessions.end()) return absl::NotFoundError(absl::StrCat("no session ", id));
    return &it->second;
  }

  // The decoded activation, checked against the model: [B, sample_shape...] with
  // 1 <= B <= max_batch, and labels that match its targets (U-shaped: none).
  // Values from the network, before they touch the shared server part: finite and at most
  // server.max_abs_input in magnitude (any frame kind: a quantized frame's scales can make
  // anything).
  absl::Status CheckValues(const at::Tensor& t, const char* what) const {
    return CheckLargest(t.numel() == 0 ? 0.0 : t.abs().max().item<double>(), what);
  }
  // `largest`: the largest magnitude in a tensor from the network.
  absl::Status CheckLargest(double largest, const char* what) const {
    if (!std::isfinite(largest)) {
      return absl::InvalidArgumentError(
          absl::StrCat("a non-finite value in the ", what,
                       ": refused before it reaches the shared server part"));
    }
    if (largest > c.max_abs_input) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the ", what, " has a value of magnitude ", largest, ", above server.max_abs_input (",
          c.max_abs_input, "): refused before it reaches the shared server part"));
    }
    return absl::OkStatus();
  }
  absl::Status CheckInput(const at::Tensor& h, const UpFrame& up) const {
    std::vector<int64_t> want{-1};
    want.insert(want.end(), sample_shape.begin(), sample_shape.end());
    bool ok = h.dim() == static_cast<int64_t>(want.size()) && h.size(0) >= 1 &&
              h.size(0) <= options.max_batch;
    for (size_t d = 1; ok && d < want.size(); ++d) ok = h.size(static_cast<int64_t>(d)) == want[d];
    if (!ok) {
      std::vector<int64_t> got = h.sizes().vec();
      return absl::InvalidArgumentError(absl::StrCat(
          "an activation of shape [", absl::StrJoin(got, ", "), "]; the server part takes [B, ",
          absl::StrJoin(sample_shape, ", "), "] with 1 <= B <= ", options.max_batch));
    }
    if (c.u_shaped) {
      if (!up.labels.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            up.labels.size(), " labels for a U-shaped model (its labels stay with the client)"));
      }
      return absl::OkStatus();
    }
    const int64_t targets = c.task == Task::kLanguageModel ? h.size(0) * h.size(1) : h.size(0);
    if (static_cast<int64_t>(up.labels.size()) != targets) {
      return absl::InvalidArgumentError(
          absl::StrCat(up.labels.size(), " labels for ", targets, " targets"));
    }
    for (int32_t label : up.labels) {
      if (label < 0 || label >= classes) {
        return absl::InvalidArgumentError(
            absl::StrCat("label ", label, " outside 0..", classes - 1));
      }
    }
    return absl::OkStatus();
  }

  // `check_values` false: the caller checks the values (TrainRound: all steps with one sync).
  absl::StatusOr<at::Tensor> Input(Session& session, const UpFrame& up, bool train,
                                   bool check_values = true) {
    const at::Tensor ids = at::tensor(up.sample_ids, at::kLong);
    SPLITQ_ASSIGN_OR_RETURN(
        at::Tensor h, session.receiver->Receive(*up.frame, up.step, ids, train, device,
                                                c.bf16_autocast ? at::kBFloat16 : at::kFloat));
    SPLITQ_RETURN_IF_ERROR(CheckInput(h, up));
    if (check_values && options.network_input) {
      SPLITQ_RETURN_IF_ERROR(CheckValues(h, "activation"));
    }
    return h;
  }
  at::Tensor Targets(const UpFrame& up) const {
    return at::tensor(up.labels, at::kInt).to(at::kLong).to(device);
  }
  // The server's output of `server_in` (U-shaped: boundary 2's activation).
  at::Tensor Forward(const at::Tensor& server_in) {
    AutocastScope scope(c.bf16_autocast);
    return model.server->forward(server_in);
  }
  // Worker groups with buckets: one hook per trainable parameter, registered once (a tensor's
  // hook list never shrinks: remove_hook only blanks an entry), that adds the parameter's
  // gradient to `hook_sum` (index i + 1, times `hook_scale`) while a round's backward pass
  // runs, and does nothing otherwise. HookTarget sets them for one backward pass.
  std::atomic<BucketedSum*> hook_sum{nullptr};
  double hook_scale = 1;  // written before hook_sum is set (release), read after (acquire)
  bool hooks_registered = false;
  struct HookTarget {
    HookTarget(Impl& s, BucketedSum* sum, double scale) : s(s) {
      if (!s.hooks_registered) {
        const std::vector<at::Tensor> params = s.Trainable();
        for (size_t i = 0; i < params.size(); ++i) {
          params[i].register_hook([&s, i](const at::Tensor& g) {
            BucketedSum* into = s.hook_sum.load(std::memory_order_acquire);
            if (into != nullptr) into->Add(i + 1, g, s.hook_scale);
          });
        }
        s.hooks_registered = true;
      }
      s.hook_scale = scale;
      s.hook_sum.store(sum, std::memory_order_release);
    }
    ~HookTarget() { s.hook_sum.store(nullptr, std::memory_order_release); }
    Impl& s;
  };
  // The trainable parameters, in the order of a group's sum (after its extras, index 0).
  std::vector<at::Tensor> Trainable() const {
    std::vector<at::Tensor> out;
    for (const at::Tensor& p : model.server->parameters()) {
      if (p.requires_grad()) out.push_back(p);
    }
    return out;
  }
  // A group round's sum: index 0 holds the extras (this replica's targets, whether its values
  // went out wrong, the step records' table), then the trainable parameters' gradients, in
  // buckets of server.group.bucket_kib.
  std::unique_ptr<BucketedSum> StartSum(const RoundRecords& records) {
    std::vector<at::Tensor> like{
        at::empty({2 + group->world() * records.slots * records.record_bytes}, at::kFloat)};
    for (const at::Tensor& p : Trainable()) like.push_back(p);
    return group->StartSum(like, c.group_bucket_kib * 1024);
  }
  // The update after a merged backward over `targets` targets (their mean loss). In a group:
  // the replicas' gradients, weighted by their targets, summed with the targets (a replica
  // without work adds zeros), then divided by all the targets, so every replica takes the
  // same update: the one a single replica would take on all the batches. `sum` is the round's
  // sum; with server.group.bucket_kib > 0 the backward pass has already added the gradients
  // (hooks, TrainRound), and its buckets may be on their way. A replica whose backward pass
  // failed after that (targets 0 and a bucket started), or whose hooks added a value too late
  // (BucketedSum::late), poisons the round: no member updates, every step of the round is
  // UNAVAILABLE (sent again). `sum_ms` (if set) gets the time in the group's sum.
  // `sum` is required in a group (StartSum, before the backward pass).
  absl::Status Update(int64_t targets, const RoundRecords& records, double* sum_ms,
                      BucketedSum* sum) {
    if (group == nullptr) {
      if (targets > 0) ClipAndStep(true);
      return absl::OkStatus();
    }
    const std::vector<at::Tensor> params = Trainable();
    bool poisoned = sum->late();
    if (targets <= 0) {
      poisoned = sum->Discard() || poisoned;
    } else {
      // Without hooks, every gradient now; with them, any a hook did not add (a parameter whose
      // tensor was replaced since its hook was registered): its bucket cannot have started.
      for (size_t i = 0; i < params.size(); ++i) {
        if (params[i].grad().defined() && !sum->added(i + 1)) {
          sum->Add(i + 1, params[i].grad(), static_cast<double>(targets));
        }
      }
    }
    const int64_t slot_bytes = records.slots * records.record_bytes;
    at::Tensor extras = at::zeros({2 + group->world() * slot_bytes}, at::kFloat);
    extras[0] = static_cast<float>(std::max<int64_t>(targets, 0));
    extras[1] = poisoned ? 1.0f : 0.0f;
    if (slot_bytes > 0) {
      float* data = extras.data_ptr<float>() + 2 + group->rank() * slot_bytes;
      const size_t n = std::min<size_t>(records.mine->size(), records.slots);
      for (size_t k = 0; k < n; ++k) {
        const std::string& r = (*records.mine)[k];
        for (size_t b = 0; b < r.size() && static_cast<int64_t>(b) < records.record_bytes; ++b) {
          data[k * records.record_bytes + b] = static_cast<float>(static_cast<uint8_t>(r[b]));
        }
      }
    }
    sum->Add(0, extras.to(device), 1.0);
    const auto start = Clock::now();
    SPLITQ_RETURN_IF_ERROR(sum->Finish());
    if (sum_ms != nullptr) *sum_ms = Ms(start, Clock::now());
    const at::Tensor all_extras = sum->sum(0).to(at::kCPU).contiguous();
    const float* data = all_extras.data_ptr<float>();
    if (data[1] > 0) {
      return absl::UnavailableError(
          "worker group: a member's backward pass failed after its gradients had gone out; no "
          "member took this round's update: send the step again");
    }
    if (slot_bytes > 0 && records.others != nullptr) {
      for (int member = 0; member < group->world(); ++member) {
        if (member == group->rank()) continue;
        for (int64_t k = 0; k < records.slots; ++k) {
          const float* r = data + 2 + member * slot_bytes + k * records.record_bytes;
          std::string record;
          for (int64_t b = 0; b < records.record_bytes && r[b] != 0; ++b) {
            record.push_back(static_cast<char>(static_cast<uint8_t>(r[b])));
          }
          if (!record.empty()) records.others->push_back(std::move(record));
        }
      }
    }
    const double all = data[0];
    if (all <= 0) return absl::OkStatus();  // every replica's steps failed: no update
    for (size_t i = 0; i < params.size(); ++i) {
      at::Tensor p = params[i];
      if (p.grad().defined()) {
        p.mutable_grad().copy_(sum->sum(i + 1)).div_(all);
      } else {
        p.mutable_grad() = sum->sum(i + 1) / all;
      }
    }
    ClipAndStep(true);
    return absl::OkStatus();
  }
  void ClipAndStep(bool update) {
    if (!update) return;
    if (c.grad_clip > 0) torch::nn::utils::clip_grad_norm_(model.server->parameters(), c.grad_clip);
    opt->step();
    ++updates;
  }
};

ServerPart::ServerPart(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ServerPart::~ServerPart() = default;

absl::StatusOr<std::unique_ptr<ServerPart>> ServerPart::Create(const RunConfig& c,
                                                               const std::string& init,
                                                               const ServerPartOptions& options) {
  SPLITQ_RETURN_IF_ERROR(CheckSupported(c));
  auto impl = std::make_unique<Impl>();
  impl->c = c;
  impl->options = options;
  SPLITQ_ASSIGN_OR_RETURN(impl->device, ResolveDevice(c));
  SPLITQ_ASSIGN_OR_RETURN(impl->model, BuildModel(c, init, options.for_resume, impl->device));
  SplitModel& m = impl->model;
  Impl& s = *impl;
  SPLITQ_RETURN_IF_ERROR(TorchCall("server part", [&]() -> absl::Status {
    at::NoGradGuard no_grad;
    // One example through the client layers gives the boundary's shape; one through the
    // server gives the classes.
    const at::Tensor x = c.task == Task::kFashionMnist ? at::zeros({1, 1, 28, 28}, at::kFloat)
                                                       : at::zeros({1, c.context}, at::kLong);
    const at::Tensor h = m.client->forward(x.to(s.device));
    s.sample_shape.assign(h.sizes().begin() + 1, h.sizes().end());
    s.classes = m.server->forward(h).size(-1);
    return absl::OkStatus();
  }));
  s.first_block = m.client->children().size();
  m.client = torch::nn::Sequential();  // the clients'
  m.head = torch::nn::Sequential();
  if (s.options.max_batch <= 0) {
    // Fashion-MNIST validation batches are 100 examples; clients before 2026-12 sent 500, which
    // a worker still takes.
    s.options.max_batch = std::max<int64_t>(c.batch_size, c.task == Task::kFashionMnist ? 500 : 0);
  }
  int64_t per_example = 1;
  for (int64_t d : s.sample_shape) per_example *= d;
  s.limits.max_elements = s.options.max_batch * per_example;
  s.limits.max_payload_bytes = s.limits.max_elements;  // 8 bits at most per element
  SPLITQ_RETURN_IF_ERROR(TorchCall("server part", [&]() -> absl::Status {
    std::vector<at::Tensor> gates;
    if (c.u_shaped) {
      // The module's options as a boundary-2 sender makes them; each session's sender shares it.
      BoundarySender probe(s.c, 1, m.boundary_channel_axis, BoundaryChannels(c, 1));
      s.amaq2 = probe.amaq();
      s.amaq2->to(s.device);
      gates = s.amaq2->parameters();
    }
    s.opt = MakeOptimizer(c, m.server->parameters(), gates);
    return absl::OkStatus();
  }));
  return std::unique_ptr<ServerPart>(new ServerPart(std::move(impl)));
}

uint64_t ServerPart::OpenSession() {
  Impl& s = *impl_;
  const uint64_t id = s.next_session++;
  Impl::Session& session = s.sessions[id];
  const int axis = s.model.boundary_channel_axis;
  session.receiver = std::make_unique<BoundaryReceiver>(s.c, 0, axis, s.limits,
                                                        s.options.network_input, s.sample_shape);
  if (s.c.u_shaped) {
    session.sender =
        std::make_unique<BoundarySender>(s.c, 1, axis, BoundaryChannels(s.c, 1), s.amaq2);
  }
  return id;
}

int64_t ServerPart::CloseSession(uint64_t session) {
  if (impl_->open_session == session) impl_->open_session = 0;
  const auto it = impl_->sessions.find(session);
  if (it == impl_->sessions.end()) return 0;
  int64_t cached = it->second.receiver->cache().bytes();
  if (it->second.sender) cached += it->second.sender->cache().bytes();
  impl_->sessions.erase(it);
  return cached;
}

bool ServerPart::u_shaped() const { return impl_->c.u_shaped; }

absl::StatusOr<DownFrame> ServerPart::Train(uint64_t id, const UpFrame& up, bool update) {
  Impl& s = *impl_;
  SPLITQ_ASSIGN_OR_RETURN(Impl::Session * session, s.Find(id));
  if (s.open_session != 0 && s.open_session != id) {
    return absl::FailedPreconditionError(absl::StrCat(
        "session ", s.open_session, " has a U-shaped step open; finish it before another"));
  }
  session->open.reset();  // a step sent again on its session starts over
  s.open_session = 0;
  DownFrame down;
  down.step = up.step;
  SPLITQ_RETURN_IF_ERROR(TorchCall(absl::StrCat("step ", up.step), [&]() -> absl::Status {
    if (update) {
      PrepareOptimizer(s.c, *s.opt, up.step);
    } else {
      s.opt->zero_grad();
    }
    SPLITQ_ASSIGN_OR_RETURN(at::Tensor received, s.Input(*session, up, true));
    const at::Tensor server_in = received.detach().requires_grad_(true);
    if (s.c.u_shaped) {
      const at::Tensor h2 = s.Forward(server_in);
      const at::Tensor ids = at::tensor(up.sample_ids, at::kLong);
      SPLITQ_ASSIGN_OR_RETURN(BoundarySender::Sent sent,
                              session->sender->Send(h2, up.step, ids, true));
      s.excess2 = std::max(s.excess2, session->sender->max_budget_excess());
      down.frame = std::move(sent.bytes);
      down.activation = true;
      down.act_bits = sent.bits;
      session->open = Impl::Open{up.step, update, server_in, sent.sender_side};
      s.open_session = id;
      return absl::OkStatus();
    }
    at::Tensor loss;
    {
      AutocastScope scope(s.c.bf16_autocast);
      loss = TaskLoss(s.model.server->forward(server_in), s.Targets(up));
    }
    SPLITQ_RETURN_IF_ERROR(CheckLoss(loss, up.step, &down.loss));
    loss.backward();
    SPLITQ_ASSIGN_OR_RETURN(auto grad, session->receiver->SendGradient(server_in.grad(), up.step));
    down.frame = std::move(grad.first);
    down.grad_bits = grad.second;
    s.ClipAndStep(update);
    return absl::OkStatus();
  }));
  return down;
}

std::vector<absl::StatusOr<DownFrame>> ServerPart::TrainMerged(
    const std::vector<std::pair<uint64_t, const UpFrame*>>& steps) {
  return TrainRound(steps, {}, nullptr);
}

std::vector<absl::StatusOr<DownFrame>> ServerPart::TrainRound(
    const std::vector<std::pair<uint64_t, const UpFrame*>>& steps,
    const std::vector<std::string>& records, std::vector<std::string>* others) {
  Impl& s = *impl_;
  if ((steps.size() <= 1 && s.group == nullptr) || s.c.u_shaped) {
    return ServerHandler::TrainMerged(steps);
  }
  std::vector<absl::StatusOr<DownFrame>> out(steps.size(), absl::UnknownError("not computed"));
  if (s.open_session != 0) {
    for (auto& r : out) {
      r = absl::FailedPreconditionError(absl::StrCat(
          "session ", s.open_session, " has a U-shaped step open; finish it before another"));
    }
    return out;
  }
  int64_t last_step = -1;
  for (const auto& [id, up] : steps) last_step = std::max(last_step, up->step);
  RoundRecords round_records;
  if (s.group != nullptr) {
    // The round's largest step (for the learning rate), whether anyone has work, the newest
    // and the oldest generation the members have heard of, and the size of the records.
    const int64_t latest = s.group->latest_generation();
    int64_t record_bytes = 0;
    for (const std::string& r : records) {
      record_bytes = std::max<int64_t>(record_bytes, static_cast<int64_t>(r.size()));
    }
    auto met = s.group->Max({last_step, steps.empty() ? 0 : 1, latest, -latest,
                             static_cast<int64_t>(records.size()), record_bytes});
    if (!met.ok()) {
      for (auto& r : out) r = met.status();
      return out;
    }
    if ((*met)[2] != s.group->generation() || -(*met)[3] != s.group->generation()) {
      s.group->MarkBroken();  // every member sees the same: all leave at this round
      for (auto& r : out) {
        r = absl::UnavailableError(absl::StrCat("worker group: generation ", (*met)[2],
                                                " is forming; send the step again"));
      }
      return out;
    }
    if ((*met)[1] == 0) return out;  // an idle round: nobody had a step
    last_step = (*met)[0];
    round_records = RoundRecords{&records, (*met)[4], (*met)[5], others};
  }
  // A group round's sum, started before the backward pass (Impl::Update).
  std::unique_ptr<BucketedSum> sum;
  if (s.group != nullptr) sum = s.StartSum(round_records);
  const auto round_start = Clock::now();
  RoundTimes t;  // this round's phases
  t.rounds = 1;
  // The steps whose input decoded, with their targets' share of the merge.
  struct Item {
    size_t index;
    Impl::Session* session;
    at::Tensor input;
    int64_t targets = 0;
  };
  std::vector<Item> items;
  int64_t total = 0;  // this replica's targets that reached the backward pass
  const int threads = MergeThreads(s.c.merge_threads, steps.size());
  const absl::Status local = TorchCall("merged step", [&]() -> absl::Status {
    PrepareOptimizer(s.c, *s.opt, std::max<int64_t>(last_step, 0));
    // Each step's frame decoded by its own session, side by side (sessions share nothing
    // there); the values are checked after, all steps with one sync.
    std::vector<absl::StatusOr<at::Tensor>> inputs(steps.size(), absl::UnknownError("not run"));
    std::vector<Impl::Session*> sessions(steps.size(), nullptr);
    for (size_t i = 0; i < steps.size(); ++i) {
      const UpFrame& up = *steps[i].second;
      out[i] = DownFrame{};
      out[i]->step = up.step;
      absl::StatusOr<Impl::Session*> session = s.Find(steps[i].first);
      if (!session.ok()) {
        out[i] = session.status();
        continue;
      }
      (*session)->open.reset();
      sessions[i] = *session;
    }
    ForEach(steps.size(), threads, [&](size_t i) {
      if (sessions[i] == nullptr) return;
      const UpFrame& up = *steps[i].second;
      // One bad frame fails its own step; TorchCall turns a torch error into a status here.
      inputs[i] = TorchCall(absl::StrCat("step ", up.step),
                            [&] { return s.Input(*sessions[i], up, true, false); });
    });
    for (size_t i = 0; i < steps.size(); ++i) {
      if (sessions[i] == nullptr) continue;
      if (!inputs[i].ok()) {
        out[i] = inputs[i].status();
        continue;
      }
      items.push_back(
          Item{i, sessions[i], *inputs[i], static_cast<int64_t>(steps[i].second->labels.size())});
    }
    if (!items.empty() && s.options.network_input) {
      std::vector<at::Tensor> largest;
      for (const Item& item : items) {
        largest.push_back(item.input.numel() == 0
                              ? at::zeros({}, item.input.options().dtype(at::kFloat))
                              : item.input.abs().max().to(at::kFloat));
      }
      const at::Tensor host = at::stack(largest).cpu();
      std::vector<Item> good;
      for (size_t k = 0; k < items.size(); ++k) {
        absl::Status v = s.CheckLargest(host.data_ptr<float>()[k], "activation");
        if (v.ok()) {
          good.push_back(std::move(items[k]));
        } else {
          out[items[k].index] = v;
        }
      }
      items = std::move(good);
    }
    const auto decoded = Clock::now();
    t.inputs_ms = Ms(round_start, decoded);
    if (items.empty()) return absl::OkStatus();
    std::vector<at::Tensor> merged_inputs, targets;
    int64_t merged = 0;
    for (const Item& item : items) {
      merged_inputs.push_back(item.input);
      targets.push_back(s.Targets(*steps[item.index].second));
      merged += item.targets;
    }
    const at::Tensor server_in = at::cat(merged_inputs).detach().requires_grad_(true);
    at::Tensor per_target;
    {
      AutocastScope scope(s.c.bf16_autocast);
      per_target = TaskLosses(s.model.server->forward(server_in), at::cat(targets));
    }
    const at::Tensor loss = per_target.sum() / static_cast<double>(merged);
    double merged_loss = 0;
    SPLITQ_RETURN_IF_ERROR(CheckLoss(loss, last_step, &merged_loss));
    if (sum != nullptr && s.c.group_bucket_kib > 0) {
      // In a group with buckets, each gradient goes into the sum as the backward pass makes it
      // (weighted by this replica's targets), so the buckets' all-reduces overlap the rest of
      // the backward pass (Impl::HookTarget).
      Impl::HookTarget into(s, sum.get(), static_cast<double>(merged));
      loss.backward();
      t.early_buckets = sum->started_early();
    } else {
      loss.backward();
    }
    const at::Tensor grad = server_in.grad();
    // Every client's own mean loss, in one copy to the host (which waits for the backward).
    std::vector<at::Tensor> sums;
    std::vector<int64_t> first_row(items.size());
    int64_t row = 0, target = 0;
    for (size_t k = 0; k < items.size(); ++k) {
      sums.push_back(per_target.narrow(0, target, items[k].targets).sum().to(at::kFloat));
      first_row[k] = row;
      row += items[k].input.size(0);
      target += items[k].targets;
    }
    const at::Tensor losses = at::stack(sums).to(at::kDouble).cpu();
    const auto computed = Clock::now();
    t.compute_ms = Ms(decoded, computed);
    ForEach(items.size(), threads, [&](size_t k) {
      const Item& item = items[k];
      DownFrame& down = *out[item.index];
      down.loss = losses.data_ptr<double>()[k] / static_cast<double>(item.targets);
      absl::StatusOr<std::pair<std::string, double>> frame =
          TorchCall(absl::StrCat("step ", down.step), [&] {
            // This client's own mean loss: the merged gradient's slice times N / N_k.
            const at::Tensor g = grad.narrow(0, first_row[k], item.input.size(0)) *
                                 (static_cast<double>(merged) / static_cast<double>(item.targets));
            return item.session->receiver->SendGradient(g, down.step);
          });
      if (frame.ok()) {
        down.frame = std::move(frame->first);
        down.grad_bits = frame->second;
      } else {
        out[item.index] = frame.status();
      }
    });
    t.gradients_ms = Ms(computed, Clock::now());
    total = merged;
    return absl::OkStatus();
  });
  // The records of the steps in the update (none when the local part failed).
  std::vector<std::string> applied;
  if (!local.ok()) {
    for (const Item& item : items) out[item.index] = local;
    total = 0;  // a replica of a group still takes its part in the round, with nothing
  } else {
    for (const Item& item : items) {
      if (item.index < records.size()) applied.push_back(records[item.index]);
    }
  }
  if (round_records.mine != nullptr) round_records.mine = &applied;
  const auto update_start = Clock::now();
  double sum_ms = 0;
  const absl::Status updated = TorchCall(
      "server update", [&] { return s.Update(total, round_records, &sum_ms, sum.get()); });
  if (!updated.ok()) {
    for (const Item& item : items) out[item.index] = updated;
  }
  const auto round_end = Clock::now();
  t.update_ms = Ms(update_start, round_end);
  t.sum_ms = sum_ms;
  t.total_ms = Ms(round_start, round_end);
  {
    std::lock_guard<std::mutex> lock(s.times_mutex);
    s.times.Add(t);
  }
  return out;
}

absl::StatusOr<DownFrame> ServerPart::TrainHead(uint64_t id, const HeadGradient& head) {
  Impl& s = *impl_;
  SPLITQ_ASSIGN_OR_RETURN(Impl::Session * session, s.Find(id));
  if (!session->open || session->open->step != head.step) {
    return absl::FailedPreconditionError(
        absl::StrCat("a head gradient of step ", head.step, ", but that step is not open"));
  }
  const Impl::Open open = std::move(*session->open);
  session->open.reset();  // whatever happens below, the step is closed
  s.open_session = 0;
  DownFrame down;
  down.step = head.step;
  down.loss = head.loss;
  SPLITQ_RETURN_IF_ERROR(TorchCall(absl::StrCat("step ", head.step), [&]() -> absl::Status {
    const at::Tensor& side = open.sender_side;
    SPLITQ_ASSIGN_OR_RETURN(at::Tensor g2, session->sender->ReceiveGradient(
                                               head.frame, side.device(), side.scalar_type()));
    if (g2.sizes() != side.sizes()) {
      return absl::InvalidArgumentError("the head gradient's shape is not the activation's");
    }
    if (s.options.network_input) SPLITQ_RETURN_IF_ERROR(s.CheckValues(g2, "head gradient"));
    BackwardWithRegularizer(side, g2, session->sender->Regularizer(head.step));
    SPLITQ_ASSIGN_OR_RETURN(auto grad,
                            session->receiver->SendGradient(open.server_in.grad(), head.step));
    down.frame = std::move(grad.first);
    down.grad_bits = grad.second;
    s.ClipAndStep(open.update);
    return absl::OkStatus();
  }));
  return down;
}

absl::StatusOr<EvalPiece> ServerPart::Evaluate(uint64_t id, const UpFrame& up) {
  Impl& s = *impl_;
  SPLITQ_ASSIGN_OR_RETURN(Impl::Session * session, s.Find(id));
  EvalPiece out;
  SPLITQ_RETURN_IF_ERROR(TorchCall("validation", [&]() -> absl::Status {
    at::NoGradGuard no_grad;
    SPLITQ_ASSIGN_OR_RETURN(at::Tensor received, s.Input(*session, up, false));
    const at::Tensor output = s.Forward(received);
    if (s.c.u_shaped) {
      SPLITQ_ASSIGN_OR_RETURN(BoundarySender::Sent sent,
                              session->sender->Send(output, up.step, {}, false));
      out.frame = std::move(sent.bytes);
      return absl::OkStatus();
    }
    out = ScoreBatch(output, s.Targets(up));
    return absl::OkStatus();
  }));
  return out;
}

int64_t ServerPart::updates() const { return impl_->updates; }

void ServerPart::SaveParts(torch::serialize::OutputArchive& archive, uint64_t session) const {
  const Impl& s = *impl_;
  SaveBlocks(archive, s.model.server->children(), s.first_block);
  if (s.c.u_shaped) {
    torch::serialize::OutputArchive boundary;
    s.amaq2->save(boundary);
    archive.write("boundary.1", boundary);
    archive.write("boundary.1.excess", at::tensor({s.excess2}, at::kDouble));
  }
  if (auto it = s.sessions.find(session); it != s.sessions.end()) {
    it->second.receiver->cache().Save(archive, "aqsgd.0.receiver");
    if (it->second.sender) it->second.sender->cache().Save(archive, "aqsgd.1.sender");
  }
  torch::serialize::OutputArchive opt;
  s.opt->save(opt);
  archive.write("server_opt", opt);
}

absl::Status ServerPart::LoadParts(torch::serialize::InputArchive& archive, const std::string& path,
                                   uint64_t session, int64_t updates) {
  Impl& s = *impl_;
  SPLITQ_RETURN_IF_ERROR(LoadBlocks(archive, path, s.model.server->children(), s.first_block));
  if (s.c.u_shaped) {
    torch::serialize::InputArchive boundary;
    archive.read("boundary.1", boundary);
    s.amaq2->load(boundary);
    at::Tensor excess;
    if (archive.try_read("boundary.1.excess", excess)) s.excess2 = excess.cpu().item<double>();
  }
  if (auto it = s.sessions.find(session); it != s.sessions.end()) {
    it->second.receiver->cache().Load(archive, "aqsgd.0.receiver", s.device);
    if (it->second.sender) it->second.sender->cache().Load(archive, "aqsgd.1.sender", s.device);
  }
  torch::serialize::InputArchive opt;
  archive.read("server_opt", opt);
  s.opt->load(opt);
  s.updates = updates;
  return absl::OkStatus();
}

absl::Status ServerPart::SaveCheckpoint(const std::string& path, const std::string& extra) const {
  const Impl& s = *impl_;
  return SaveCheckpointFile(path, "server_version", kServerCheckpointVersion, s.c,
                            CheckpointCounters{s.updates, 0, 0, 0, {}}, {},
                            [&](torch::serialize::OutputArchive& archive) {
                              SaveParts(archive, /*session=*/0);  // sessions are not saved
                              at::Tensor bytes =
                                  at::empty({static_cast<int64_t>(extra.size())}, at::kByte);
                              if (!extra.empty()) {
                                std::memcpy(bytes.data_ptr(), extra.data(), extra.size());
                              }
                              archive.write("server_extra", bytes);
                            });
}

absl::Status ServerPart::LoadCheckpoint(const std::string& path, std::string* extra) {
  Impl& s = *impl_;
  std::vector<double> driver;
  return LoadCheckpointFile(
      path, s.device, "server_version", kServerCheckpointVersion, "splitq worker", s.c, &driver,
      [&](torch::serialize::InputArchive& archive, const CheckpointCounters& n) -> absl::Status {
        SPLITQ_RETURN_IF_ERROR(LoadParts(archive, path, /*session=*/0, n.step));
        at::Tensor bytes;
        archive.read("server_extra", bytes);
        bytes = bytes.to(at::kCPU).contiguous();
        extra->assign(static_cast<const char*>(bytes.data_ptr()),
                      static_cast<size_t>(bytes.numel()));
        return absl::OkStatus();
      });
}

void ServerPart::set_group(ReplicaGroup* group) { impl_->group = group; }

RoundTimes ServerPart::round_times() const {
  std::lock_guard<std::mutex> lock(impl_->times_mutex);
  return impl_->times;
}

std::vector<int64_t> ServerPart::input_shape() const { return impl_->sample_shape; }

int64_t ServerPart::max_frame_bytes() const {
  int64_t per_example = 1;
  for (int64_t d : impl_->sample_shape) per_example *= d;
  return impl_->limits.max_elements * 4 + per_example * 16 + (int64_t{64} << 10);
}

std::vector<at::Tensor> ServerPart::Weights() const {
  const Impl& s = *impl_;
  std::vector<at::Tensor> out = s.model.server->parameters();
  if (s.c.u_shaped) {
    for (const at::Tensor& p : s.amaq2->parameters()) out.push_back(p);
  }
  return out;
}

std::string ServerPart::WeightsDigest() const {
  base::Sha256 sha;
  for (const at::Tensor& w : Weights()) {
    const at::Tensor bytes = w.detach().to(at::kCPU).contiguous();
    sha.Update(bytes.data_ptr(), static_cast<size_t>(bytes.numel() * bytes.element_size()));
  }
  return sha.HexDigest();
}

size_t ServerPart::sessions() const { return impl_->sessions.size(); }
std::string ServerPart::device() const { return impl_->device.is_cuda() ? "cuda" : "cpu"; }
double ServerPart::max_budget_excess() const { return impl_->excess2; }

}  // namespace splitq::trainer

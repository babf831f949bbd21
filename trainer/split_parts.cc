#include "trainer/split_parts.h"

// clang-format off
// clip_grad.h uses torch::Tensor without including its definition: types.h goes first.
#include <torch/types.h>
#include <torch/nn/utils/clip_grad.h>
// clang-format on
#include <torch/csrc/autograd/autograd.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "trainer/split_internal.h"

namespace splitq::trainer {
namespace {

using Clock = std::chrono::steady_clock;
using namespace internal;  // NOLINT(build/namespaces)
constexpr int64_t kClientCheckpointVersion = 1;
constexpr int64_t kServerCheckpointVersion = 1;

std::vector<at::Tensor> ClientParameters(const SplitModel& m) {
  std::vector<at::Tensor> out = m.client->parameters();
  for (const at::Tensor& p : m.head->parameters()) out.push_back(p);
  return out;
}

std::vector<int32_t> FlatLabels(const at::Tensor& targets) {
  const at::Tensor t = targets.reshape({-1}).to(at::kInt).contiguous().cpu();
  return std::vector<int32_t>(t.data_ptr<int32_t>(), t.data_ptr<int32_t>() + t.numel());
}

std::vector<int64_t> Ids(const at::Tensor& ids) {
  if (!ids.defined()) return {};
  const at::Tensor t = ids.contiguous().cpu();
  return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
}

}  // namespace

absl::Status CheckNetworkable(const RunConfig& c) {
  if (c.u_shaped) {
    return absl::UnimplementedError(
        "model.u_shaped: the networked client and worker support the plain layout only (use "
        "splitq train for U-shaped runs)");
  }
  if (c.activations.mode == WireMode::kAqSgd) {
    return absl::UnimplementedError(
        "quant.activations.mode: aqsgd is not supported over the network yet (its receiver "
        "cache would have to outlive sessions); use amaq, uniform or fp32");
  }
  if (c.activations.granularity != kernels::Granularity::kChannel &&
      c.activations.mode != WireMode::kFloat32) {
    return absl::UnimplementedError(
        "quant.activations.granularity: only channel is supported by the trainer yet");
  }
  if (c.activations.mode == WireMode::kAmaq && !c.activations.learned_scale) {
    return absl::UnimplementedError(
        "quant.activations.scale: minmax with mode amaq is not supported yet");
  }
  return absl::OkStatus();
}

// ---- ClientPart ------------------------------------------------------------------------------

namespace {

// The client's layers on `inputs` without autograd, k slices of the batch at a time, so only
// one slice's intermediate tensors are alive at once (micro-batch mode).
at::Tensor ForwardInSlices(torch::nn::SequentialImpl& client, const at::Tensor& inputs, int k) {
  at::NoGradGuard no_grad;
  if (k <= 1) return client.forward(inputs);
  const int64_t batch = inputs.size(0);
  const int64_t slice = (batch + k - 1) / k;
  std::vector<at::Tensor> parts;
  for (int64_t a = 0; a < batch; a += slice) {
    parts.push_back(client.forward(inputs.slice(0, a, std::min(batch, a + slice))));
  }
  return parts.size() == 1 ? parts[0] : at::cat(parts, 0);
}

}  // namespace

struct ClientPart::Impl {
  RunConfig c;
  at::Device device{at::kCPU};
  Data data;
  SplitModel model;  // client and head kept; the server part is dropped
  size_t first_server_block = 0, server_blocks = 0;
  std::unique_ptr<BoundarySender> sender;
  std::unique_ptr<torch::optim::AdamW> opt;
  int64_t step = 0;
  int64_t bytes_up = 0, bytes_down = 0, bytes_fp32 = 0, boundary_bytes = 0;

  struct Pending {
    UpFrame up;
    at::Tensor sender_side;
    at::Tensor inputs;  // micro-batch mode: the batch, to recompute the client's layers
    std::vector<uint8_t> bit_map;
    double bits = 32;
    Clock::time_point start;
  };
  std::optional<Pending> pending;
  bool resend_pending_map = false;

  std::vector<std::shared_ptr<torch::nn::Module>> OwnBlocks() const {
    std::vector<std::shared_ptr<torch::nn::Module>> out;
    for (const auto& b : model.client->children()) out.push_back(b);
    for (const auto& b : model.head->children()) out.push_back(b);
    return out;
  }
  // The global block index (as in a SplitTrainer checkpoint) of own block i.
  size_t GlobalIndex(size_t i) const {
    const size_t nc = model.client->children().size();
    return i < nc ? i : i + server_blocks;
  }
};

ClientPart::ClientPart(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ClientPart::~ClientPart() = default;

absl::StatusOr<std::unique_ptr<ClientPart>> ClientPart::Create(const RunConfig& c,
                                                               const std::string& init,
                                                               bool for_resume,
                                                               const DataShard& shard) {
  SPLITQ_RETURN_IF_ERROR(CheckNetworkable(c));
  auto impl = std::make_unique<Impl>();
  impl->c = c;
  SPLITQ_ASSIGN_OR_RETURN(impl->device, ResolveDevice(c));
  SPLITQ_ASSIGN_OR_RETURN(impl->data, Data::Load(c, shard));
  SPLITQ_ASSIGN_OR_RETURN(impl->model, BuildModel(c, init, for_resume, impl->device));
  SplitModel& m = impl->model;
  impl->first_server_block = m.client->children().size();
  impl->server_blocks = m.server->children().size();
  m.server = torch::nn::Sequential();  // the worker's
  try {
    impl->sender = std::make_unique<BoundarySender>(impl->c, 0, m.boundary_channel_axis,
                                                    BoundaryChannels(c, 0));
    impl->sender->amaq()->to(impl->device);
    impl->opt = MakeOptimizer(c, ClientParameters(m), impl->sender->amaq()->parameters());
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("client part: ", e.what_without_backtrace()));
  }
  return std::unique_ptr<ClientPart>(new ClientPart(std::move(impl)));
}

absl::StatusOr<UpFrame> ClientPart::Forward() {
  Impl& s = *impl_;
  if (s.pending) {
    if (s.resend_pending_map) {
      SPLITQ_ASSIGN_OR_RETURN(std::string with_map,
                              BoundarySender::WithBitMap(*s.pending->up.frame, s.pending->bit_map));
      s.pending->up.frame = std::make_shared<const std::string>(std::move(with_map));
      s.resend_pending_map = false;
    }
    return s.pending->up;
  }
  const int64_t step = s.step;
  Impl::Pending p;
  p.start = Clock::now();
  try {
    PrepareOptimizer(s.c, *s.opt, step);
    const Batch batch = s.data.Train(step);
    at::Tensor h1;
    {
      AutocastScope scope(s.c.bf16_autocast);
      if (micro_batches_ > 1) {  // Backward recomputes, slice by slice
        p.inputs = batch.inputs.to(s.device);
        h1 = ForwardInSlices(*s.model.client, p.inputs, micro_batches_);
      } else {
        h1 = s.model.client->forward(batch.inputs.to(s.device));
      }
    }
    SPLITQ_ASSIGN_OR_RETURN(BoundarySender::Sent sent, s.sender->Send(h1, step, batch.ids, true));
    p.up.step = step;
    p.up.frame = std::make_shared<const std::string>(std::move(sent.bytes));
    p.up.labels = FlatLabels(batch.targets);
    p.up.sample_ids = Ids(batch.ids);
    p.sender_side = sent.sender_side;
    p.bit_map = std::move(sent.bit_map);
    p.bits = sent.bits;
    s.boundary_bytes = 4 * h1.numel();
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("step ", step, ": ", e.what_without_backtrace()));
  }
  s.pending = std::move(p);
  s.resend_pending_map = false;
  return s.pending->up;
}

absl::StatusOr<StepStats> ClientPart::Backward(const DownFrame& down) {
  Impl& s = *impl_;
  if (!s.pending || down.step != s.step) {
    return absl::FailedPreconditionError(absl::StrCat(
        "a gradient for step ", down.step, ", the client waits for ", s.pending ? s.step : -1));
  }
  StepStats stats;
  try {
    const at::Tensor& side = s.pending->sender_side;
    SPLITQ_ASSIGN_OR_RETURN(
        at::Tensor g, s.sender->ReceiveGradient(down.frame, side.device(), side.scalar_type()));
    if (g.sizes() != side.sizes()) {
      return absl::InvalidArgumentError("the gradient frame's shape is not the activation's");
    }
    if (!s.pending->inputs.defined()) {
      BackwardWithRegularizer(side, g, s.sender->Regularizer(s.step));
    } else {
      const int64_t batch = s.pending->inputs.size(0);
      const int64_t slice = (batch + micro_batches_ - 1) / micro_batches_;
      for (int64_t a = 0; a < batch; a += slice) {
        const int64_t b = std::min(batch, a + slice);
        at::Tensor part;
        {
          AutocastScope scope(s.c.bf16_autocast);
          part = s.sender->SenderSide(s.model.client->forward(s.pending->inputs.slice(0, a, b)),
                                      s.step);
        }
        torch::autograd::backward({part}, {g.slice(0, a, b)});
      }
      if (at::Tensor reg = s.sender->Regularizer(s.step); reg.defined()) reg.backward();
    }
    if (s.c.grad_clip > 0) {
      torch::nn::utils::clip_grad_norm_(ClientParameters(s.model), s.c.grad_clip);
    }
    s.opt->step();
    stats.loss = down.loss;
    stats.act_bits = s.pending->bits;
    stats.grad_bits = down.grad_bits;
    s.bytes_up += static_cast<int64_t>(s.pending->up.frame->size());
    s.bytes_down += static_cast<int64_t>(down.frame.size());
    s.bytes_fp32 += 8 * side.numel();
    stats.step_ms =
        std::chrono::duration<double, std::milli>(Clock::now() - s.pending->start).count();
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("step ", s.step, ": ", e.what_without_backtrace()));
  }
  s.pending.reset();
  ++s.step;
  return stats;
}

void ClientPart::NewSession() {
  // The pending frame is patched to carry its map (the encoder's state then matches the new
  // receiver's); without one, the next frame carries it.
  if (impl_->pending) {
    impl_->resend_pending_map = true;
  } else {
    impl_->sender->ResendBitMap();
  }
}

int64_t ClientPart::validation_batches() const { return impl_->data.ValidationBatches(); }

absl::StatusOr<UpFrame> ClientPart::EvalForward(int64_t i) {
  Impl& s = *impl_;
  if (i < 0 || i >= validation_batches()) {
    return absl::OutOfRangeError(absl::StrCat("validation batch ", i));
  }
  const Batch batch = s.data.ValidationBatch(i);
  UpFrame up;
  try {
    at::NoGradGuard no_grad;
    at::Tensor h1;
    {
      AutocastScope scope(s.c.bf16_autocast);
      h1 = ForwardInSlices(*s.model.client, batch.inputs.to(s.device), micro_batches_);
    }
    SPLITQ_ASSIGN_OR_RETURN(BoundarySender::Sent sent, s.sender->Send(h1, s.step, {}, false));
    up.frame = std::make_shared<const std::string>(
        std::move(sent.bytes));  // carries its bit map (BoundarySender::Send)
    up.step = s.step;
    up.labels = FlatLabels(batch.targets);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("validation: ", e.what_without_backtrace()));
  }
  return up;
}

absl::Status ClientPart::SaveCheckpoint(const std::string& path,
                                        const std::vector<double>& driver) const {
  const Impl& s = *impl_;
  torch::serialize::OutputArchive archive;
  try {
    WriteHeader(archive, "client_version", kClientCheckpointVersion, s.c,
                CheckpointCounters{s.step, s.bytes_up, s.bytes_down, s.bytes_fp32}, driver);
    const auto blocks = s.OwnBlocks();
    for (size_t i = 0; i < blocks.size(); ++i) SaveBlocks(archive, {blocks[i]}, s.GlobalIndex(i));
    torch::serialize::OutputArchive boundary, opt;
    s.sender->amaq()->save(boundary);
    archive.write("boundary.0", boundary);
    archive.write("boundary.0.excess", at::tensor({s.sender->max_budget_excess()}, at::kDouble));
    s.opt->save(opt);
    archive.write("client_opt", opt);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat(path, ": cannot write the checkpoint: ", e.what_without_backtrace()));
  }
  return SaveArchive(archive, path);
}

absl::Status ClientPart::LoadCheckpoint(const std::string& path, std::vector<double>* driver) {
  Impl& s = *impl_;
  torch::serialize::InputArchive archive;
  SPLITQ_RETURN_IF_ERROR(OpenArchive(path, s.device, &archive));
  try {
    CheckpointCounters n;
    SPLITQ_RETURN_IF_ERROR(ReadHeader(archive, path, "client_version", kClientCheckpointVersion,
                                      "splitq client", s.c, &n, driver));
    const auto blocks = s.OwnBlocks();
    for (size_t i = 0; i < blocks.size(); ++i) {
      SPLITQ_RETURN_IF_ERROR(LoadBlocks(archive, path, {blocks[i]}, s.GlobalIndex(i)));
    }
    torch::serialize::InputArchive boundary, opt;
    archive.read("boundary.0", boundary);
    s.sender->amaq()->load(boundary);
    at::Tensor excess;
    if (archive.try_read("boundary.0.excess", excess)) {
      s.sender->set_max_budget_excess(excess.cpu().item<double>());
    }
    archive.read("client_opt", opt);
    s.opt->load(opt);
    s.step = n.step;
    s.bytes_up = n.bytes_up;
    s.bytes_down = n.bytes_down;
    s.bytes_fp32 = n.bytes_fp32;
  } catch (const c10::Error& e) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": cannot restore the checkpoint: ", e.what_without_backtrace()));
  }
  s.pending.reset();
  return absl::OkStatus();
}

int64_t ClientPart::step() const { return impl_->step; }
const RunConfig& ClientPart::config() const { return impl_->c; }
std::string ClientPart::device() const { return impl_->device.is_cuda() ? "cuda" : "cpu"; }

WireTotals ClientPart::wire() const {
  WireTotals w;
  w.bytes_up = impl_->bytes_up;
  w.bytes_down = impl_->bytes_down;
  w.bytes_fp32_equivalent = impl_->bytes_fp32;
  w.max_budget_excess =
      impl_->c.activations.mode == WireMode::kFloat32 ? 0 : impl_->sender->max_budget_excess();
  return w;
}

ClientMemory ClientPart::memory() const {
  const Impl& s = *impl_;
  ClientMemory m;
  AddModuleMemory(*s.model.client, &m);
  AddModuleMemory(*s.model.head, &m);
  AddModuleMemory(*s.sender->amaq(), &m);
  m.boundary_tensor = s.boundary_bytes;
  m.aqsgd_cache = s.sender->cache().bytes();
  return m;
}

// ---- ServerPart ------------------------------------------------------------------------------

struct ServerPart::Impl {
  RunConfig c;
  at::Device device{at::kCPU};
  SplitModel model;        // server kept; client and head dropped
  size_t first_block = 0;  // the index of the server's first block in the whole model
  std::unique_ptr<torch::optim::AdamW> opt;
  std::vector<int64_t> sample_shape;  // one example's boundary activation
  int64_t max_batch = 0;
  int64_t classes = 0;  // logits' last dimension
  quant::FrameLimits limits;
  std::map<uint64_t, std::unique_ptr<BoundaryReceiver>> sessions;
  uint64_t next_session = 1;
  int64_t updates = 0;

  absl::StatusOr<BoundaryReceiver*> Session(uint64_t id) {
    auto it = sessions.find(id);
    if (it == sessions.end()) return absl::NotFoundError(absl::StrCat("no session ", id));
    return it->second.get();
  }

  // The decoded activation, checked against the model: [B, sample_shape...] with
  // 1 <= B <= max_batch, and labels that match its targets.
  absl::Status CheckInput(const at::Tensor& h, const UpFrame& up) const {
    std::vector<int64_t> want{-1};
    want.insert(want.end(), sample_shape.begin(), sample_shape.end());
    bool ok =
        h.dim() == static_cast<int64_t>(want.size()) && h.size(0) >= 1 && h.size(0) <= max_batch;
    for (size_t d = 1; ok && d < want.size(); ++d) ok = h.size(static_cast<int64_t>(d)) == want[d];
    if (!ok) {
      std::vector<int64_t> got = h.sizes().vec();
      return absl::InvalidArgumentError(absl::StrCat(
          "an activation of shape [", absl::StrJoin(got, ", "), "]; the server part takes [B, ",
          absl::StrJoin(sample_shape, ", "), "] with 1 <= B <= ", max_batch));
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

  absl::StatusOr<at::Tensor> Input(BoundaryReceiver& r, const UpFrame& up, bool train) {
    const at::Tensor ids = at::tensor(up.sample_ids, at::kLong);
    SPLITQ_ASSIGN_OR_RETURN(at::Tensor h, r.Receive(*up.frame, up.step, ids, train, device,
                                                    c.bf16_autocast ? at::kBFloat16 : at::kFloat));
    SPLITQ_RETURN_IF_ERROR(CheckInput(h, up));
    return h;
  }
  at::Tensor Targets(const UpFrame& up) const {
    return at::tensor(up.labels, at::kInt).to(at::kLong).to(device);
  }
};

ServerPart::ServerPart(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ServerPart::~ServerPart() = default;

absl::StatusOr<std::unique_ptr<ServerPart>> ServerPart::Create(const RunConfig& c,
                                                               const std::string& init,
                                                               int64_t max_batch) {
  SPLITQ_RETURN_IF_ERROR(CheckNetworkable(c));
  auto impl = std::make_unique<Impl>();
  impl->c = c;
  SPLITQ_ASSIGN_OR_RETURN(impl->device, ResolveDevice(c));
  SPLITQ_ASSIGN_OR_RETURN(impl->model, BuildModel(c, init, false, impl->device));
  SplitModel& m = impl->model;
  try {
    at::NoGradGuard no_grad;
    // One example through the client layers gives the boundary's shape; one through the
    // server gives the classes.
    const at::Tensor x = c.task == Task::kFashionMnist ? at::zeros({1, 1, 28, 28}, at::kFloat)
                                                       : at::zeros({1, c.context}, at::kLong);
    const at::Tensor h = m.client->forward(x.to(impl->device));
    impl->sample_shape.assign(h.sizes().begin() + 1, h.sizes().end());
    impl->classes = m.server->forward(h).size(-1);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("server part: ", e.what_without_backtrace()));
  }
  impl->first_block = m.client->children().size();
  m.client = torch::nn::Sequential();  // the clients'
  m.head = torch::nn::Sequential();
  impl->max_batch = max_batch > 0
                        ? max_batch
                        // Fashion-MNIST validation batches are 100 examples; clients before
                        // 2026-12 sent 500, which a worker still takes.
                        : std::max<int64_t>(c.batch_size, c.task == Task::kFashionMnist ? 500 : 0);
  int64_t per_example = 1;
  for (int64_t d : impl->sample_shape) per_example *= d;
  impl->limits.max_elements = impl->max_batch * per_example;
  impl->limits.max_payload_bytes = impl->limits.max_elements;  // 8 bits at most per element
  try {
    impl->opt = MakeOptimizer(c, m.server->parameters(), {});
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("server part: ", e.what_without_backtrace()));
  }
  return std::unique_ptr<ServerPart>(new ServerPart(std::move(impl)));
}

uint64_t ServerPart::OpenSession() {
  Impl& s = *impl_;
  const uint64_t id = s.next_session++;
  s.sessions[id] =
      std::make_unique<BoundaryReceiver>(s.c, 0, s.model.boundary_channel_axis, s.limits,
                                         /*require_finite=*/true);
  return id;
}

void ServerPart::CloseSession(uint64_t session) { impl_->sessions.erase(session); }

absl::StatusOr<DownFrame> ServerPart::Train(uint64_t session, const UpFrame& up, bool update) {
  Impl& s = *impl_;
  SPLITQ_ASSIGN_OR_RETURN(BoundaryReceiver * r, s.Session(session));
  DownFrame down;
  down.step = up.step;
  try {
    if (update) {
      PrepareOptimizer(s.c, *s.opt, up.step);
    } else {
      s.opt->zero_grad();
    }
    SPLITQ_ASSIGN_OR_RETURN(at::Tensor received, s.Input(*r, up, true));
    const at::Tensor server_in = received.detach().requires_grad_(true);
    at::Tensor loss;
    {
      AutocastScope scope(s.c.bf16_autocast);
      loss = TaskLoss(s.model.server->forward(server_in), s.Targets(up));
    }
    SPLITQ_RETURN_IF_ERROR(CheckLoss(loss, up.step, &down.loss));
    loss.backward();
    SPLITQ_ASSIGN_OR_RETURN(auto grad, r->SendGradient(server_in.grad(), up.step));
    down.frame = std::move(grad.first);
    down.grad_bits = grad.second;
    if (update) {
      if (s.c.grad_clip > 0) {
        torch::nn::utils::clip_grad_norm_(s.model.server->parameters(), s.c.grad_clip);
      }
      s.opt->step();
      ++s.updates;
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("step ", up.step, ": ", e.what_without_backtrace()));
  }
  return down;
}

absl::StatusOr<EvalPiece> ServerPart::Evaluate(uint64_t session, const UpFrame& up) {
  Impl& s = *impl_;
  SPLITQ_ASSIGN_OR_RETURN(BoundaryReceiver * r, s.Session(session));
  EvalPiece out;
  try {
    at::NoGradGuard no_grad;
    SPLITQ_ASSIGN_OR_RETURN(at::Tensor received, s.Input(*r, up, false));
    at::Tensor logits;
    {
      AutocastScope scope(s.c.bf16_autocast);
      logits = s.model.server->forward(received);
    }
    const at::Tensor targets = s.Targets(up);
    const double n = static_cast<double>(targets.numel());
    out.loss_sum = TaskLoss(logits, targets).item<double>() * n;
    out.correct = (logits.argmax(-1).reshape({-1}) == targets.reshape({-1})).sum().item<int64_t>();
    out.count = targets.numel();
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("validation: ", e.what_without_backtrace()));
  }
  return out;
}

int64_t ServerPart::updates() const { return impl_->updates; }

absl::Status ServerPart::SaveCheckpoint(const std::string& path, const std::string& extra) const {
  const Impl& s = *impl_;
  torch::serialize::OutputArchive archive;
  try {
    WriteHeader(archive, "server_version", kServerCheckpointVersion, s.c,
                CheckpointCounters{s.updates}, {});
    SaveBlocks(archive, s.model.server->children(), s.first_block);
    torch::serialize::OutputArchive opt;
    s.opt->save(opt);
    archive.write("server_opt", opt);
    at::Tensor bytes = at::empty({static_cast<int64_t>(extra.size())}, at::kByte);
    if (!extra.empty()) std::memcpy(bytes.data_ptr(), extra.data(), extra.size());
    archive.write("server_extra", bytes);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat(path, ": cannot write the checkpoint: ", e.what_without_backtrace()));
  }
  return SaveArchive(archive, path);
}

absl::Status ServerPart::LoadCheckpoint(const std::string& path, std::string* extra) {
  Impl& s = *impl_;
  torch::serialize::InputArchive archive;
  SPLITQ_RETURN_IF_ERROR(OpenArchive(path, s.device, &archive));
  try {
    CheckpointCounters n;
    std::vector<double> driver;
    SPLITQ_RETURN_IF_ERROR(ReadHeader(archive, path, "server_version", kServerCheckpointVersion,
                                      "splitq worker", s.c, &n, &driver));
    SPLITQ_RETURN_IF_ERROR(LoadBlocks(archive, path, s.model.server->children(), s.first_block));
    torch::serialize::InputArchive opt;
    archive.read("server_opt", opt);
    s.opt->load(opt);
    at::Tensor bytes;
    archive.read("server_extra", bytes);
    bytes = bytes.to(at::kCPU).contiguous();
    extra->assign(static_cast<const char*>(bytes.data_ptr()), static_cast<size_t>(bytes.numel()));
    s.updates = n.step;
  } catch (const c10::Error& e) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": cannot restore the checkpoint: ", e.what_without_backtrace()));
  }
  return absl::OkStatus();
}
size_t ServerPart::sessions() const { return impl_->sessions.size(); }
std::string ServerPart::device() const { return impl_->device.is_cuda() ? "cuda" : "cpu"; }

// ---- ClientRunner ----------------------------------------------------------------------------

absl::StatusOr<StepStats> ClientRunner::Step() {
  for (;;) {
    SPLITQ_ASSIGN_OR_RETURN(UpFrame up, part_.Forward());
    absl::StatusOr<DownFrame> down = link_.Train(up);
    if (down.ok()) return part_.Backward(*down);
    SPLITQ_RETURN_IF_ERROR(link_.Recover(down.status()));
    part_.NewSession();
  }
}

absl::StatusOr<EvalStats> ClientRunner::Evaluate() {
  double loss_sum = 0, correct = 0, count = 0;
  for (int64_t i = 0; i < part_.validation_batches(); ++i) {
    SPLITQ_ASSIGN_OR_RETURN(UpFrame up, part_.EvalForward(i));
    absl::StatusOr<EvalPiece> piece = link_.Evaluate(up);
    if (!piece.ok()) {
      SPLITQ_RETURN_IF_ERROR(link_.Recover(piece.status()));
      part_.NewSession();
      --i;  // this batch again, on the new session
      continue;
    }
    loss_sum += piece->loss_sum;
    correct += static_cast<double>(piece->correct);
    count += static_cast<double>(piece->count);
  }
  EvalStats out;
  if (count == 0) return absl::InternalError("validation: no targets");
  out.loss = loss_sum / count;
  if (config().task == Task::kFashionMnist) {
    out.accuracy = correct / count;
  } else {
    out.bits_per_byte = out.loss / std::log(2.0);
  }
  return out;
}

}  // namespace splitq::trainer

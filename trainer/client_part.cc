#include "trainer/client_part.h"

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
#include <optional>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "trainer/batches.h"
#include "trainer/boundary.h"
#include "trainer/checkpoint_io.h"
#include "trainer/setup.h"

namespace splitq::trainer {
namespace {

// A tensor from the worker, before the client part uses it: finite, and at most `bound` in
// magnitude (client.max_abs_gradient; a worker could send 1e31 and poison the client's weights:
// the sixth outside probe).
absl::Status CheckFromWorker(const at::Tensor& t, const char* what, double bound) {
  const double largest = t.numel() == 0 ? 0.0 : t.abs().max().item<double>();
  if (!std::isfinite(largest)) {
    return absl::InvalidArgumentError(
        absl::StrCat("a non-finite value in the worker's ", what, " frame: refused"));
  }
  if (largest > bound) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the worker's ", what, " frame has a value of magnitude ", largest,
        ", above client.max_abs_gradient (", bound, "): refused before the client part uses it"));
  }
  return absl::OkStatus();
}

using Clock = std::chrono::steady_clock;
using namespace internal;  // NOLINT(build/namespaces)
constexpr int64_t kClientCheckpointVersion = 1;

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

absl::Status CheckSupported(const RunConfig& c) {
  if (c.activations.granularity == kernels::Granularity::kTensor &&
      c.activations.mode != WireMode::kFloat32) {
    return absl::UnimplementedError(
        "quant.activations.granularity: tensor is not supported by the trainer yet (channel, or "
        "token for the LM)");
  }
  if (c.activations.granularity == kernels::Granularity::kToken &&
      c.activations.mode != WireMode::kFloat32) {
    if (c.task != Task::kLanguageModel || c.u_shaped) {
      return absl::UnimplementedError(
          "quant.activations.granularity: token needs the language model's boundary [B, T, C] "
          "(task lm, not U-shaped)");
    }
    if (c.activations.mode == WireMode::kAmaq) {
      return absl::UnimplementedError(
          "quant.activations.granularity: token with mode amaq (AMAQ learns bits and ranges "
          "per channel; token scales go with mode uniform or aqsgd)");
    }
  }
  if (c.activations.mode == WireMode::kAmaq && !c.activations.learned_scale) {
    return absl::UnimplementedError(
        "quant.activations.scale: minmax with mode amaq is not supported yet (use learned, or "
        "mode uniform for min-max ranges)");
  }
  return absl::OkStatus();
}

struct ClientPart::Impl {
  RunConfig c;
  at::Device device{at::kCPU};
  Data data;
  SplitModel model;  // client and head kept; the server part is dropped
  size_t server_blocks = 0;
  std::unique_ptr<BoundarySender> sender;      // boundary 1
  std::unique_ptr<BoundaryReceiver> receiver;  // boundary 2 (U-shaped)
  std::unique_ptr<torch::optim::AdamW> opt;
  int64_t step = 0;
  int64_t bytes_up = 0, bytes_down = 0, bytes_fp32 = 0, boundary_bytes = 0;
  CodeEntropyTotals entropy;

  // The step between Forward and Backward.
  struct Pending {
    UpFrame up;
    at::Tensor sender_side;
    at::Tensor inputs;  // micro-batch mode: the batch, to recompute the client's layers
    at::Tensor targets, ids;
    std::vector<uint8_t> bit_map;
    double bits = 32;
    quant::CodeEntropy up_entropy;  // of the activation frame (0 elements: fp32)
    Clock::time_point start;
    double forward_ms = 0, encode_ms = 0;  // StepStats' client_forward_ms and encode_ms
    // U-shaped, after Head: boundary 2's share of the step.
    bool head_done = false;
    double head_loss = 0, act2_bits = 0, grad2_bits = 0;
    int64_t h2_numel = 0, head_bytes_up = 0, head_bytes_down = 0;
    quant::CodeEntropy head_up_entropy, head_down_entropy;  // boundary 2's frames
  };
  std::optional<Pending> pending;
  bool resend_pending_map = false;
  at::Tensor eval_targets;  // of the last EvalForward
  int64_t max_answer_bytes = 0;

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
  at::ScalarType ActivationType() const { return c.bf16_autocast ? at::kBFloat16 : at::kFloat; }
};

ClientPart::ClientPart(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ClientPart::~ClientPart() = default;

absl::StatusOr<std::unique_ptr<ClientPart>> ClientPart::Create(const RunConfig& c,
                                                               const std::string& init,
                                                               bool for_resume,
                                                               const DataShard& shard) {
  SPLITQ_RETURN_IF_ERROR(CheckSupported(c));
  auto impl = std::make_unique<Impl>();
  impl->c = c;
  SPLITQ_ASSIGN_OR_RETURN(impl->device, ResolveDevice(c));
  SPLITQ_ASSIGN_OR_RETURN(impl->data, Data::Load(c, shard));
  SPLITQ_ASSIGN_OR_RETURN(impl->model, BuildModel(c, init, for_resume, impl->device));
  SplitModel& m = impl->model;
  impl->server_blocks = m.server->children().size();
  SPLITQ_RETURN_IF_ERROR(TorchCall("client part", [&]() -> absl::Status {
    // One example through the client and the server layers: what an answer holds per example.
    at::NoGradGuard no_grad;
    const at::Tensor x = c.task == Task::kFashionMnist ? at::zeros({1, 1, 28, 28}, at::kFloat)
                                                       : at::zeros({1, c.context}, at::kLong);
    const at::Tensor h1 = m.client->forward(x.to(impl->device));
    int64_t per_example = h1.numel();
    if (c.u_shaped) per_example = std::max(per_example, m.server->forward(h1).numel());
    const int64_t max_batch =
        std::max<int64_t>(c.batch_size, c.task == Task::kFashionMnist ? 500 : 0);
    impl->max_answer_bytes = max_batch * per_example * 4 + per_example * 16 + (int64_t{64} << 10);
    return absl::OkStatus();
  }));
  m.server = torch::nn::Sequential();  // the worker's
  SPLITQ_RETURN_IF_ERROR(TorchCall("client part", [&]() -> absl::Status {
    Impl& s = *impl;
    const int axis = m.boundary_channel_axis;
    s.sender = std::make_unique<BoundarySender>(s.c, 0, axis, BoundaryChannels(c, 0));
    s.sender->amaq()->to(s.device);
    if (c.u_shaped) s.receiver = std::make_unique<BoundaryReceiver>(s.c, 1, axis);
    s.sender->set_measure_entropy(true);  // WireTotals::entropy
    if (s.receiver) s.receiver->set_measure_entropy(true);
    s.opt = MakeOptimizer(c, ClientParameters(m), s.sender->amaq()->parameters());
    return absl::OkStatus();
  }));
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
  SPLITQ_RETURN_IF_ERROR(TorchCall(absl::StrCat("step ", step), [&]() -> absl::Status {
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
    const Clock::time_point forwarded = Clock::now();
    SPLITQ_ASSIGN_OR_RETURN(BoundarySender::Sent sent, s.sender->Send(h1, step, batch.ids, true));
    p.forward_ms = std::chrono::duration<double, std::milli>(forwarded - p.start).count();
    p.encode_ms = std::chrono::duration<double, std::milli>(Clock::now() - forwarded).count();
    p.up.step = step;
    p.up.frame = std::make_shared<const std::string>(std::move(sent.bytes));
    if (!s.c.u_shaped) p.up.labels = FlatLabels(batch.targets);  // U-shaped: they stay here
    p.up.sample_ids = Ids(batch.ids);
    p.targets = batch.targets.to(s.device);
    p.ids = batch.ids;
    p.sender_side = sent.sender_side;
    p.bit_map = std::move(sent.bit_map);
    p.bits = sent.bits;
    p.up_entropy = sent.entropy;
    s.boundary_bytes = 4 * h1.numel();
    return absl::OkStatus();
  }));
  s.pending = std::move(p);
  s.resend_pending_map = false;
  return s.pending->up;
}

absl::StatusOr<HeadGradient> ClientPart::Head(const DownFrame& down) {
  Impl& s = *impl_;
  if (!s.c.u_shaped || !down.activation) {
    return absl::FailedPreconditionError("a head step needs a U-shaped model and an activation");
  }
  if (!s.pending || down.step != s.step) {
    return absl::FailedPreconditionError(
        absl::StrCat("an activation for step ", down.step, ", the client is at ", s.step));
  }
  Impl::Pending& p = *s.pending;
  HeadGradient out;
  out.step = s.step;
  SPLITQ_RETURN_IF_ERROR(TorchCall(absl::StrCat("step ", s.step), [&]() -> absl::Status {
    // A head step sent again (a new session) starts from clean head gradients; the client's
    // layers have none yet (they backpropagate in Backward).
    s.opt->zero_grad();
    SPLITQ_ASSIGN_OR_RETURN(
        at::Tensor received,
        s.receiver->Receive(down.frame, s.step, p.ids, true, s.device, s.ActivationType()));
    SPLITQ_RETURN_IF_ERROR(CheckFromWorker(received, "output", s.c.client_max_abs_gradient));
    const at::Tensor head_in = received.detach().requires_grad_(true);
    at::Tensor loss;
    {
      AutocastScope scope(s.c.bf16_autocast);
      loss = TaskLoss(s.model.head->forward(head_in), p.targets);
    }
    SPLITQ_RETURN_IF_ERROR(CheckLoss(loss, s.step, &out.loss));
    loss.backward();
    SPLITQ_ASSIGN_OR_RETURN(auto grad, s.receiver->SendGradient(head_in.grad(), s.step));
    out.frame = std::move(grad.first);
    p.head_done = true;
    p.head_loss = out.loss;
    p.act2_bits = down.act_bits;
    p.grad2_bits = grad.second;
    p.h2_numel = received.numel();
    p.head_bytes_up = static_cast<int64_t>(out.frame.size());
    p.head_bytes_down = static_cast<int64_t>(down.frame.size());
    p.head_down_entropy = s.receiver->received_entropy();
    p.head_up_entropy = s.receiver->sent_entropy();
    return absl::OkStatus();
  }));
  return out;
}

absl::StatusOr<StepStats> ClientPart::Backward(const DownFrame& down) {
  Impl& s = *impl_;
  if (!s.pending || down.step != s.step || down.activation ||
      (s.c.u_shaped && !s.pending->head_done)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "a gradient for step ", down.step, ", the client waits for ",
        !s.pending ? std::string("a Forward")
                   : absl::StrCat(s.c.u_shaped && !s.pending->head_done ? "the head of " : "",
                                  "step ", s.step)));
  }
  const Impl::Pending& p = *s.pending;
  StepStats stats;
  const Clock::time_point received = Clock::now();
  SPLITQ_RETURN_IF_ERROR(TorchCall(absl::StrCat("step ", s.step), [&]() -> absl::Status {
    const at::Tensor& side = p.sender_side;
    SPLITQ_ASSIGN_OR_RETURN(
        at::Tensor g, s.sender->ReceiveGradient(down.frame, side.device(), side.scalar_type()));
    const Clock::time_point decoded = Clock::now();
    if (g.sizes() != side.sizes()) {
      return absl::InvalidArgumentError("the gradient frame's shape is not the activation's");
    }
    SPLITQ_RETURN_IF_ERROR(CheckFromWorker(g, "gradient", s.c.client_max_abs_gradient));
    if (!p.inputs.defined()) {
      BackwardWithRegularizer(side, g, s.sender->Regularizer(s.step));
    } else {
      const int64_t batch = p.inputs.size(0);
      const int64_t slice = (batch + micro_batches_ - 1) / micro_batches_;
      for (int64_t a = 0; a < batch; a += slice) {
        const int64_t b = std::min(batch, a + slice);
        at::Tensor part;
        {
          AutocastScope scope(s.c.bf16_autocast);
          part = s.sender->SenderSide(s.model.client->forward(p.inputs.slice(0, a, b)), s.step);
        }
        torch::autograd::backward({part}, {g.slice(0, a, b)});
      }
      if (at::Tensor reg = s.sender->Regularizer(s.step); reg.defined()) reg.backward();
    }
    if (s.c.grad_clip > 0) {
      torch::nn::utils::clip_grad_norm_(ClientParameters(s.model), s.c.grad_clip);
    }
    s.opt->step();
    const double n1 = static_cast<double>(side.numel()), n2 = static_cast<double>(p.h2_numel);
    stats.loss = s.c.u_shaped ? p.head_loss : down.loss;
    stats.act_bits = (p.bits * n1 + p.act2_bits * n2) / (n1 + n2);
    stats.act_bit_map = p.bit_map;
    stats.grad_bits = (down.grad_bits * n1 + p.grad2_bits * n2) / (n1 + n2);
    s.bytes_up += static_cast<int64_t>(p.up.frame->size()) + p.head_bytes_up;
    s.bytes_down += static_cast<int64_t>(down.frame.size()) + p.head_bytes_down;
    s.bytes_fp32 += 8 * (side.numel() + p.h2_numel);
    const quant::CodeEntropy down_entropy = s.sender->gradient_entropy();
    s.entropy.elements_up += p.up_entropy.elements + p.head_up_entropy.elements;
    s.entropy.bits_up += p.up_entropy.bits + p.head_up_entropy.bits;
    s.entropy.elements_down += down_entropy.elements + p.head_down_entropy.elements;
    s.entropy.bits_down += down_entropy.bits + p.head_down_entropy.bits;
    if (s.c.u_shaped) s.boundary_bytes = 4 * (side.numel() + p.h2_numel);
    const Clock::time_point end = Clock::now();
    stats.step_ms = std::chrono::duration<double, std::milli>(end - p.start).count();
    stats.client_forward_ms = p.forward_ms;
    stats.encode_ms = p.encode_ms;
    stats.decode_ms = std::chrono::duration<double, std::milli>(decoded - received).count();
    stats.client_backward_ms = std::chrono::duration<double, std::milli>(end - decoded).count();
    return absl::OkStatus();
  }));
  s.pending.reset();
  ++s.step;
  return stats;
}

void ClientPart::NewSession() {
  Impl& s = *impl_;
  if (s.receiver) s.receiver->ResendBitMap();  // U-shaped: the head gradient's map
  if (s.c.activations.mode == WireMode::kAqSgd) {
    s.sender->ClearCache();
    if (s.receiver) s.receiver->ClearCache();
    s.pending.reset();  // its frame is a delta against the cache just dropped
    s.sender->ResendBitMap();
    return;
  }
  // The pending frame is patched to carry its map (the encoder's state then matches the new
  // receiver's); without one, the next frame carries it.
  if (s.pending) {
    s.resend_pending_map = true;
    s.pending->head_done = false;
  } else {
    s.sender->ResendBitMap();
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
  SPLITQ_RETURN_IF_ERROR(TorchCall("validation", [&]() -> absl::Status {
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
    if (!s.c.u_shaped) up.labels = FlatLabels(batch.targets);
    s.eval_targets = batch.targets.to(s.device);
    return absl::OkStatus();
  }));
  return up;
}

absl::StatusOr<EvalPiece> ClientPart::EvalHead(int64_t i, const EvalPiece& server) {
  Impl& s = *impl_;
  if (!s.c.u_shaped || !s.eval_targets.defined()) {
    return absl::FailedPreconditionError(
        absl::StrCat("validation batch ", i, ": no head step without EvalForward"));
  }
  EvalPiece out;
  SPLITQ_RETURN_IF_ERROR(TorchCall("validation", [&]() -> absl::Status {
    at::NoGradGuard no_grad;
    SPLITQ_ASSIGN_OR_RETURN(
        at::Tensor received,
        s.receiver->Receive(server.frame, s.step, {}, false, s.device, s.ActivationType()));
    at::Tensor logits;
    {
      AutocastScope scope(s.c.bf16_autocast);
      logits = s.model.head->forward(received);
    }
    out = ScoreBatch(logits, s.eval_targets);
    return absl::OkStatus();
  }));
  return out;
}

void ClientPart::SaveParts(torch::serialize::OutputArchive& archive, bool with_caches) const {
  const Impl& s = *impl_;
  const auto blocks = s.OwnBlocks();
  for (size_t i = 0; i < blocks.size(); ++i) SaveBlocks(archive, {blocks[i]}, s.GlobalIndex(i));
  torch::serialize::OutputArchive boundary, opt;
  s.sender->amaq()->save(boundary);
  archive.write("boundary.0", boundary);
  archive.write("boundary.0.excess", at::tensor({s.sender->max_budget_excess()}, at::kDouble));
  if (with_caches) {
    s.sender->cache().Save(archive, "aqsgd.0.sender");
    if (s.receiver) s.receiver->cache().Save(archive, "aqsgd.1.receiver");
  }
  s.opt->save(opt);
  archive.write("client_opt", opt);
}

absl::Status ClientPart::LoadParts(torch::serialize::InputArchive& archive, const std::string& path,
                                   bool with_caches) {
  Impl& s = *impl_;
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
  if (with_caches) {
    s.sender->cache().Load(archive, "aqsgd.0.sender", s.device);
    if (s.receiver) s.receiver->cache().Load(archive, "aqsgd.1.receiver", s.device);
  }
  archive.read("client_opt", opt);
  s.opt->load(opt);
  s.pending.reset();
  return absl::OkStatus();
}

void ClientPart::SetCounters(int64_t step, const WireTotals& bytes) {
  impl_->step = step;
  impl_->bytes_up = bytes.bytes_up;
  impl_->bytes_down = bytes.bytes_down;
  impl_->bytes_fp32 = bytes.bytes_fp32_equivalent;
  impl_->entropy = bytes.entropy;
}

absl::Status ClientPart::SaveCheckpoint(const std::string& path,
                                        const std::vector<double>& driver) const {
  const Impl& s = *impl_;
  return SaveCheckpointFile(
      path, "client_version", kClientCheckpointVersion, s.c,
      CheckpointCounters{s.step, s.bytes_up, s.bytes_down, s.bytes_fp32, s.entropy}, driver,
      [&](torch::serialize::OutputArchive& archive) { SaveParts(archive, /*with_caches=*/false); });
}

absl::Status ClientPart::LoadCheckpoint(const std::string& path, std::vector<double>* driver) {
  Impl& s = *impl_;
  return LoadCheckpointFile(
      path, s.device, "client_version", kClientCheckpointVersion, "splitq client", s.c, driver,
      [&](torch::serialize::InputArchive& archive, const CheckpointCounters& n) -> absl::Status {
        SPLITQ_RETURN_IF_ERROR(LoadParts(archive, path, /*with_caches=*/false));
        SetCounters(n.step, WireTotals{n.bytes_up, n.bytes_down, n.bytes_fp32, 0, n.entropy});
        // The caches are the session's (see the top of client_part.h): a resumed client starts
        // them at zero, as its new session does.
        s.sender->ClearCache();
        if (s.receiver) s.receiver->ClearCache();
        return absl::OkStatus();
      });
}

int64_t ClientPart::step() const { return impl_->step; }
int64_t ClientPart::max_answer_frame_bytes() const { return impl_->max_answer_bytes; }
const RunConfig& ClientPart::config() const { return impl_->c; }
std::string ClientPart::device() const { return impl_->device.is_cuda() ? "cuda" : "cpu"; }

WireTotals ClientPart::wire() const {
  WireTotals w;
  w.bytes_up = impl_->bytes_up;
  w.bytes_down = impl_->bytes_down;
  w.bytes_fp32_equivalent = impl_->bytes_fp32;
  w.entropy = impl_->entropy;
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
  m.aqsgd_cache = s.sender->cache().bytes() + (s.receiver ? s.receiver->cache().bytes() : 0);
  return m;
}

}  // namespace splitq::trainer

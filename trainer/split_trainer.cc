#include "trainer/split_trainer.h"

// clang-format off
// clip_grad.h uses torch::Tensor without including its definition: types.h goes first.
#include <torch/types.h>
#include <torch/nn/utils/clip_grad.h>
// clang-format on
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <chrono>
#include <cmath>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "trainer/split_internal.h"

namespace splitq::trainer {
namespace {

using Clock = std::chrono::steady_clock;
using namespace internal;  // NOLINT(build/namespaces): this file is the in-process composition
constexpr int64_t kCheckpointVersion = 1;

// One boundary in one process: its sender and its receiver, with the serialized bytes between
// them counted into the two directions' counters.
class Boundary {
 public:
  struct Crossed {
    at::Tensor sender_side;  // what the sender backpropagates through
    at::Tensor received;     // what the receiver decoded (no autograd)
    double bits = 32;        // mean bits per element of the frame
  };

  Boundary(const RunConfig& c, int index, int axis, int64_t channels, int64_t* forward_bytes,
           int64_t* backward_bytes)
      : sender_(c, index, axis, channels),
        receiver_(c, index, axis),
        forward_bytes_(forward_bytes),
        backward_bytes_(backward_bytes) {}

  BoundarySender& sender() { return sender_; }
  BoundaryReceiver& receiver() { return receiver_; }
  const BoundarySender& sender() const { return sender_; }
  const BoundaryReceiver& receiver() const { return receiver_; }

  // The activation across the wire (`train` false: validation, not counted).
  absl::StatusOr<Crossed> Forward(const at::Tensor& h, int64_t step, const at::Tensor& ids,
                                  bool train) {
    SPLITQ_ASSIGN_OR_RETURN(BoundarySender::Sent sent, sender_.Send(h, step, ids, train));
    if (train) *forward_bytes_ += static_cast<int64_t>(sent.bytes.size());
    auto received = receiver_.Receive(sent.bytes, step, ids, train, h.device(), h.scalar_type());
    if (received.status().code() == absl::StatusCode::kFailedPrecondition) {
      sender_.ResendBitMap();
    }
    SPLITQ_RETURN_IF_ERROR(received.status());
    return Crossed{sent.sender_side, *std::move(received), sent.bits};
  }

  // The gradient of the received tensor back to the sender, and its bits per element.
  absl::StatusOr<std::pair<at::Tensor, double>> Backward(const at::Tensor& grad, int64_t step) {
    SPLITQ_ASSIGN_OR_RETURN(auto sent, receiver_.SendGradient(grad, step));
    *backward_bytes_ += static_cast<int64_t>(sent.first.size());
    SPLITQ_ASSIGN_OR_RETURN(at::Tensor back,
                            sender_.ReceiveGradient(sent.first, grad.device(), grad.scalar_type()));
    return std::make_pair(back, sent.second);
  }

 private:
  BoundarySender sender_;
  BoundaryReceiver receiver_;
  int64_t* forward_bytes_;
  int64_t* backward_bytes_;
};

}  // namespace

double LearningRateAt(const RunConfig& c, int64_t step, double base) {
  step = std::max<int64_t>(step, 0);  // a negative step would give a negative rate
  if (step < c.warmup_steps) return base * static_cast<double>(step + 1) / c.warmup_steps;
  const double span = std::max<int64_t>(1, c.steps - c.warmup_steps);
  const double t = static_cast<double>(step - c.warmup_steps) / span;
  return base * 0.5 * (1.0 + std::cos(M_PI * std::min(1.0, t)));
}

struct SplitTrainer::Impl {
  RunConfig c;
  at::Device device{at::kCPU};
  Data data;
  SplitModel model;
  std::vector<std::unique_ptr<Boundary>> boundaries;  // 1, or 2 when U-shaped
  std::unique_ptr<torch::optim::AdamW> client_opt, server_opt;
  int64_t step = 0;
  int64_t bytes_up = 0, bytes_down = 0, bytes_fp32 = 0;
  int64_t boundary_bytes = 0, boundary2_bytes = 0;

  absl::Status LoadModel(torch::serialize::InputArchive& archive, const std::string& path) {
    return LoadBlocks(archive, path, Blocks(model));
  }
};

SplitTrainer::SplitTrainer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SplitTrainer::~SplitTrainer() = default;

absl::StatusOr<std::unique_ptr<SplitTrainer>> SplitTrainer::Create(
    const RunConfig& c, const std::string& init_checkpoint, bool for_resume) {
  if (c.activations.granularity != kernels::Granularity::kChannel &&
      c.activations.mode != WireMode::kFloat32) {
    return absl::UnimplementedError(
        "quant.activations.granularity: only channel is supported by the trainer yet");
  }
  if (c.activations.mode == WireMode::kAmaq && !c.activations.learned_scale) {
    return absl::UnimplementedError(
        "quant.activations.scale: minmax with mode amaq is not supported yet (use learned, or "
        "mode uniform for min-max ranges)");
  }
  auto impl = std::make_unique<Impl>();
  impl->c = c;
  SPLITQ_ASSIGN_OR_RETURN(impl->device, ResolveDevice(c));
  SPLITQ_ASSIGN_OR_RETURN(impl->data, Data::Load(c));
  SPLITQ_ASSIGN_OR_RETURN(impl->model, BuildModel(c, init_checkpoint, for_resume, impl->device));
  SplitModel& model = impl->model;
  try {
    const int axis = model.boundary_channel_axis;
    impl->boundaries.push_back(std::make_unique<Boundary>(impl->c, 0, axis, BoundaryChannels(c, 0),
                                                          &impl->bytes_up, &impl->bytes_down));
    if (c.u_shaped) {
      impl->boundaries.push_back(std::make_unique<Boundary>(
          impl->c, 1, axis, BoundaryChannels(c, 1), &impl->bytes_down, &impl->bytes_up));
    }
    for (auto& b : impl->boundaries) b->sender().amaq()->to(impl->device);

    std::vector<at::Tensor> client_params = model.client->parameters();
    for (const at::Tensor& p : model.head->parameters()) client_params.push_back(p);
    impl->client_opt =
        MakeOptimizer(c, client_params, impl->boundaries[0]->sender().amaq()->parameters());
    impl->server_opt = MakeOptimizer(c, model.server->parameters(),
                                     c.u_shaped ? impl->boundaries[1]->sender().amaq()->parameters()
                                                : std::vector<at::Tensor>{});
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("setting up the boundaries and optimizers: ", e.what_without_backtrace()));
  }
  return std::unique_ptr<SplitTrainer>(new SplitTrainer(std::move(impl)));
}

absl::StatusOr<StepStats> SplitTrainer::Step() {
  Impl& s = *impl_;
  const RunConfig& c = s.c;
  const int64_t step = s.step;
  const auto start = Clock::now();
  const bool autocast = c.bf16_autocast;
  StepStats stats;
  try {
    for (auto* opt : {s.client_opt.get(), s.server_opt.get()}) PrepareOptimizer(c, *opt, step);
    const Batch batch = s.data.Train(step);
    const at::Tensor inputs = batch.inputs.to(s.device), targets = batch.targets.to(s.device);
    Boundary& b1 = *s.boundaries[0];
    at::Tensor h1;
    {
      AutocastScope scope(autocast);
      h1 = s.model.client->forward(inputs);
    }
    SPLITQ_ASSIGN_OR_RETURN(Boundary::Crossed up, b1.Forward(h1, step, batch.ids, true));
    const at::Tensor server_in = up.received.detach().requires_grad_(true);
    at::Tensor loss;
    double act_bits_sum = up.bits * static_cast<double>(h1.numel());
    double act_elements = static_cast<double>(h1.numel());
    double grad_bits_sum = 0, grad_elements = 0;
    if (!c.u_shaped) {
      {
        AutocastScope scope(autocast);
        loss = TaskLoss(s.model.server->forward(server_in), targets);
      }
      SPLITQ_RETURN_IF_ERROR(CheckLoss(loss, step, &stats.loss));
      loss.backward();
    } else {
      Boundary& b2 = *s.boundaries[1];
      at::Tensor h2;
      {
        AutocastScope scope(autocast);
        h2 = s.model.server->forward(server_in);
      }
      SPLITQ_ASSIGN_OR_RETURN(Boundary::Crossed down, b2.Forward(h2, step, batch.ids, true));
      act_bits_sum += down.bits * static_cast<double>(h2.numel());
      act_elements += static_cast<double>(h2.numel());
      const at::Tensor head_in = down.received.detach().requires_grad_(true);
      {
        AutocastScope scope(autocast);
        loss = TaskLoss(s.model.head->forward(head_in), targets);
      }
      SPLITQ_RETURN_IF_ERROR(CheckLoss(loss, step, &stats.loss));
      loss.backward();
      SPLITQ_ASSIGN_OR_RETURN(auto g2, b2.Backward(head_in.grad(), step));
      grad_bits_sum += g2.second * static_cast<double>(h2.numel());
      grad_elements += static_cast<double>(h2.numel());
      s.bytes_fp32 += 8 * h2.numel();
      s.boundary2_bytes = 4 * h2.numel();
      BackwardWithRegularizer(down.sender_side, g2.first, b2.sender().Regularizer(step));
    }
    SPLITQ_ASSIGN_OR_RETURN(auto g1, b1.Backward(server_in.grad(), step));
    grad_bits_sum += g1.second * static_cast<double>(h1.numel());
    grad_elements += static_cast<double>(h1.numel());
    BackwardWithRegularizer(up.sender_side, g1.first, b1.sender().Regularizer(step));
    if (c.grad_clip > 0) {
      std::vector<at::Tensor> client_params = s.model.client->parameters();
      for (const at::Tensor& p : s.model.head->parameters()) client_params.push_back(p);
      torch::nn::utils::clip_grad_norm_(client_params, c.grad_clip);
      torch::nn::utils::clip_grad_norm_(s.model.server->parameters(), c.grad_clip);
    }
    s.client_opt->step();
    s.server_opt->step();
    stats.act_bits = act_bits_sum / act_elements;
    stats.grad_bits = grad_bits_sum / grad_elements;
    s.bytes_fp32 += 8 * h1.numel();
    s.boundary_bytes = 4 * h1.numel();
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("step ", step, ": ", e.what_without_backtrace()));
  }
  ++s.step;
  stats.step_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  return stats;
}

absl::StatusOr<EvalStats> SplitTrainer::Evaluate() {
  Impl& s = *impl_;
  double loss_sum = 0, correct = 0, count = 0;
  try {
    at::NoGradGuard no_grad;
    for (int64_t i = 0; i < s.data.ValidationBatches(); ++i) {
      const Batch batch = s.data.ValidationBatch(i);
      const at::Tensor inputs = batch.inputs.to(s.device), targets = batch.targets.to(s.device);
      at::Tensor h1;
      {
        AutocastScope scope(s.c.bf16_autocast);
        h1 = s.model.client->forward(inputs);
      }
      SPLITQ_ASSIGN_OR_RETURN(auto up, s.boundaries[0]->Forward(h1, s.step, {}, false));
      at::Tensor logits;
      {
        AutocastScope scope(s.c.bf16_autocast);
        logits = s.model.server->forward(up.received);
      }
      if (s.c.u_shaped) {
        SPLITQ_ASSIGN_OR_RETURN(auto down, s.boundaries[1]->Forward(logits, s.step, {}, false));
        AutocastScope scope(s.c.bf16_autocast);
        logits = s.model.head->forward(down.received);
      }
      const double n = static_cast<double>(batch.targets.numel());
      loss_sum += TaskLoss(logits, targets).item<double>() * n;
      correct += (logits.argmax(-1) == targets).sum().item<double>();
      count += n;
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("validation: ", e.what_without_backtrace()));
  }
  EvalStats out;
  out.loss = loss_sum / count;
  if (s.c.task == Task::kFashionMnist) {
    out.accuracy = correct / count;
  } else {
    out.bits_per_byte = out.loss / std::log(2.0);
  }
  return out;
}

absl::Status SplitTrainer::SaveCheckpoint(const std::string& path,
                                          const std::vector<double>& driver_state) const {
  const Impl& s = *impl_;
  torch::serialize::OutputArchive archive;
  try {
    WriteHeader(archive, "version", kCheckpointVersion, s.c,
                CheckpointCounters{s.step, s.bytes_up, s.bytes_down, s.bytes_fp32}, driver_state);
    SaveBlocks(archive, Blocks(s.model));
    for (size_t b = 0; b < s.boundaries.size(); ++b) {
      torch::serialize::OutputArchive boundary;
      s.boundaries[b]->sender().amaq()->save(boundary);
      archive.write(absl::StrCat("boundary.", b), boundary);
      archive.write(absl::StrCat("boundary.", b, ".excess"),
                    at::tensor({s.boundaries[b]->sender().max_budget_excess()}, at::kDouble));
      s.boundaries[b]->sender().cache().Save(archive, absl::StrCat("aqsgd.", b, ".sender"));
      s.boundaries[b]->receiver().cache().Save(archive, absl::StrCat("aqsgd.", b, ".receiver"));
    }
    torch::serialize::OutputArchive client_opt, server_opt;
    s.client_opt->save(client_opt);
    s.server_opt->save(server_opt);
    archive.write("client_opt", client_opt);
    archive.write("server_opt", server_opt);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat(path, ": cannot write the checkpoint: ", e.what_without_backtrace()));
  }
  return SaveArchive(archive, path);
}

absl::Status SplitTrainer::LoadCheckpoint(const std::string& path,
                                          std::vector<double>* driver_state) {
  Impl& s = *impl_;
  torch::serialize::InputArchive archive;
  SPLITQ_RETURN_IF_ERROR(OpenArchive(path, s.device, &archive));
  try {
    CheckpointCounters n;
    SPLITQ_RETURN_IF_ERROR(
        ReadHeader(archive, path, "version", kCheckpointVersion, "splitq", s.c, &n, driver_state));
    SPLITQ_RETURN_IF_ERROR(s.LoadModel(archive, path));
    for (size_t b = 0; b < s.boundaries.size(); ++b) {
      torch::serialize::InputArchive boundary;
      archive.read(absl::StrCat("boundary.", b), boundary);
      s.boundaries[b]->sender().amaq()->load(boundary);
      at::Tensor excess;
      if (archive.try_read(absl::StrCat("boundary.", b, ".excess"), excess)) {
        s.boundaries[b]->sender().set_max_budget_excess(excess.cpu().item<double>());
      }
      s.boundaries[b]->sender().cache().Load(archive, absl::StrCat("aqsgd.", b, ".sender"),
                                             s.device);
      s.boundaries[b]->receiver().cache().Load(archive, absl::StrCat("aqsgd.", b, ".receiver"),
                                               s.device);
    }
    torch::serialize::InputArchive client_opt, server_opt;
    archive.read("client_opt", client_opt);
    archive.read("server_opt", server_opt);
    s.client_opt->load(client_opt);
    s.server_opt->load(server_opt);
    s.step = n.step;
    s.bytes_up = n.bytes_up;
    s.bytes_down = n.bytes_down;
    s.bytes_fp32 = n.bytes_fp32;
  } catch (const c10::Error& e) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": cannot restore the checkpoint: ", e.what_without_backtrace()));
  }
  return absl::OkStatus();
}

int64_t SplitTrainer::step() const { return impl_->step; }
const RunConfig& SplitTrainer::config() const { return impl_->c; }
std::string SplitTrainer::device() const { return impl_->device.is_cuda() ? "cuda" : "cpu"; }

WireTotals SplitTrainer::wire() const {
  WireTotals w;
  w.bytes_up = impl_->bytes_up;
  w.bytes_down = impl_->bytes_down;
  w.bytes_fp32_equivalent = impl_->bytes_fp32;
  w.max_budget_excess = 0;
  if (impl_->c.activations.mode != WireMode::kFloat32) {
    w.max_budget_excess = -1e9;
    for (const auto& b : impl_->boundaries) {
      w.max_budget_excess = std::max(w.max_budget_excess, b->sender().max_budget_excess());
    }
  }
  return w;
}

ClientMemory SplitTrainer::client_memory() const {
  const Impl& s = *impl_;
  ClientMemory m;
  AddModuleMemory(*s.model.client, &m);
  AddModuleMemory(*s.model.head, &m);
  AddModuleMemory(*s.boundaries[0]->sender().amaq(), &m);
  m.boundary_tensor = s.boundary_bytes;
  m.aqsgd_cache = s.boundaries[0]->sender().cache().bytes();
  if (s.boundaries.size() > 1) {  // U-shaped: the client also receives boundary 2
    m.boundary_tensor += s.boundary2_bytes;
    m.aqsgd_cache += s.boundaries[1]->receiver().cache().bytes();
  }
  return m;
}

}  // namespace splitq::trainer

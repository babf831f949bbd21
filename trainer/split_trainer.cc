#include "trainer/split_trainer.h"

// clang-format off
// clip_grad.h uses torch::Tensor without including its definition: types.h goes first.
#include <torch/types.h>
#include <torch/nn/utils/clip_grad.h>
// clang-format on
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/cuda.h>
#include <torch/optim/adamw.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/version.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <optional>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "kernels/philox.h"
#include "quant/amaq_boundary.h"
#include "quant/wire_codec.h"
#include "trainer/datasets.h"
#include "trainer/models.h"

namespace splitq::trainer {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int64_t kCheckpointVersion = 1;

void SetLr(torch::optim::AdamW& opt, size_t group, double lr) {
  if (group >= opt.param_groups().size()) return;
  static_cast<torch::optim::AdamWOptions&>(opt.param_groups()[group].options()).lr(lr);
}

int ScheduleBits(const quant::BitSchedule& s, const BitsRange& range, int64_t step) {
  // The largest integer width within the budget (a uniform frame never exceeds it either).
  const int bits = static_cast<int>(std::floor(s.TargetAt(step) + 1e-9));
  return std::clamp(bits, range.min, range.max);
}

absl::StatusOr<quant::Frame> ThroughBytes(const quant::Frame& frame, int64_t* counter) {
  const std::string bytes = quant::SerializeFrame(frame);
  *counter += static_cast<int64_t>(bytes.size());
  return quant::ParseFrame(
      absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
}

// One direction of the wire: an encoder on the sending side and a decoder on the receiving
// side, with serialized bytes in between, counted into `counter`.
class WireLink {
 public:
  WireLink(quant::FrameKind kind, int32_t axis, kernels::Rounding rounding, uint64_t seed,
           int64_t* counter)
      : encoder_(1, kind, quant::WireEncoderOptions{axis, rounding, seed}), counter_(counter) {}

  // Sends x with per-channel bits/scales/offsets; returns the frame as the receiver parsed it.
  absl::StatusOr<quant::Frame> Transmit(const at::Tensor& x, uint64_t step,
                                        const std::vector<uint8_t>& bits, const at::Tensor& scales,
                                        const at::Tensor& offsets) {
    SPLITQ_ASSIGN_OR_RETURN(quant::Frame frame, encoder_.Encode(x, step, bits, scales, offsets));
    return ThroughBytes(frame, counter_);
  }

  // Transmit, then decode on the receiving side.
  absl::StatusOr<at::Tensor> Send(const at::Tensor& x, uint64_t step,
                                  const std::vector<uint8_t>& bits, const at::Tensor& scales,
                                  const at::Tensor& offsets) {
    SPLITQ_ASSIGN_OR_RETURN(quant::Frame received, Transmit(x, step, bits, scales, offsets));
    return Decode(received, x.device());
  }

  absl::StatusOr<at::Tensor> Decode(const quant::Frame& frame, const at::Device& device) {
    auto decoded = decoder_.Decode(frame, device);
    if (decoded.status().code() == absl::StatusCode::kFailedPrecondition) encoder_.ResendBitMap();
    return decoded;
  }

  // fp32: the raw bytes of x, copied out and back in.
  at::Tensor SendRaw(const at::Tensor& x) {
    const at::Tensor c = x.detach().to(at::kFloat).contiguous().cpu();
    std::string bytes(static_cast<size_t>(c.numel()) * 4, '\0');
    std::memcpy(bytes.data(), c.data_ptr<float>(), bytes.size());
    *counter_ += static_cast<int64_t>(bytes.size());
    at::Tensor out = at::empty(c.sizes(), at::kFloat);
    std::memcpy(out.data_ptr<float>(), bytes.data(), bytes.size());
    return out.to(x.device()).to(x.scalar_type());
  }

 private:
  quant::WireEncoder encoder_;
  quant::WireDecoder decoder_;
  int64_t* counter_;
};

// AQ-SGD's per-sample cache m_i on one side of the wire (float16, on the tensors' device).
class DeltaCache {
 public:
  // m for `ids` as float32 [B, sample...]: zeros for samples not seen yet.
  at::Tensor Gather(const at::Tensor& ids, const at::Tensor& like) const {
    at::Tensor out = at::zeros_like(like, like.options().dtype(at::kFloat));
    const at::Tensor id = ids.cpu();
    for (int64_t b = 0; b < id.numel(); ++b) {
      auto it = m_.find(id.data_ptr<int64_t>()[b]);
      if (it != m_.end()) out[b].copy_(it->second);
    }
    return out;
  }
  void Update(const at::Tensor& ids, const at::Tensor& values) {
    const at::Tensor id = ids.cpu();
    const at::Tensor half = values.detach().to(at::kHalf);
    for (int64_t b = 0; b < id.numel(); ++b) m_[id.data_ptr<int64_t>()[b]] = half[b].clone();
  }
  int64_t bytes() const {
    int64_t n = 0;
    for (const auto& [id, t] : m_) n += t.numel() * 2;
    return n;
  }
  void Save(torch::serialize::OutputArchive& archive, const std::string& key) const {
    std::vector<int64_t> ids;
    std::vector<at::Tensor> values;
    for (const auto& [id, t] : m_) {
      ids.push_back(id);
      values.push_back(t.cpu());  // one entry at a time: no second copy of the cache on a GPU
    }
    archive.write(key + ".ids", at::tensor(ids, at::kLong));
    if (!values.empty()) archive.write(key + ".values", at::stack(values));
  }
  void Load(torch::serialize::InputArchive& archive, const std::string& key,
            const at::Device& device) {
    m_.clear();
    at::Tensor ids, values;
    archive.read(key + ".ids", ids);
    ids = ids.cpu();  // the archive was loaded onto the run's device
    if (ids.numel() == 0) return;
    archive.read(key + ".values", values);
    values = values.to(device);
    for (int64_t b = 0; b < ids.numel(); ++b) m_[ids.data_ptr<int64_t>()[b]] = values[b].clone();
  }

 private:
  std::unordered_map<int64_t, at::Tensor> m_;
};

struct Batch {
  at::Tensor inputs, targets, ids;
};

// Training and validation batches, drawn deterministically from (seed, step).
class Data {
 public:
  static absl::StatusOr<Data> Load(const RunConfig& c) {
    Data d;
    d.config_ = c;
    if (c.task == Task::kFashionMnist) {
      SPLITQ_ASSIGN_OR_RETURN(d.train_, LoadFashionMnist(true));
      SPLITQ_ASSIGN_OR_RETURN(d.test_, LoadFashionMnist(false));
      d.samples_ = d.train_.labels.size(0);
    } else {
      SPLITQ_ASSIGN_OR_RETURN(std::string text, LoadTextCorpus(c.corpus));
      d.text_ = SplitText(text, c.validation_fraction);
      if (static_cast<int64_t>(d.text_.validation.size()) <= c.context + 1) {
        return absl::InvalidArgumentError("data.validation_fraction leaves too little text");
      }
      d.samples_ = ByteWindowCount(d.text_.train.size(), c.context + 1);
      if (d.samples_ < 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("data.corpus: ", c.corpus, " has less training text than one window of ",
                         c.context + 1, " bytes"));
      }
    }
    return d;
  }

  Batch Train(int64_t step) const {
    const RunConfig& c = config_;
    at::Tensor ids = at::empty({c.batch_size}, at::kLong);
    for (int64_t b = 0; b < c.batch_size; ++b) {
      const kernels::Philox4 r = kernels::PhiloxBlock(c.seed, static_cast<uint64_t>(step), b);
      const uint64_t draw = (static_cast<uint64_t>(r.v[0]) << 32) | r.v[1];
      ids.data_ptr<int64_t>()[b] = static_cast<int64_t>(draw % static_cast<uint64_t>(samples_));
    }
    if (c.task == Task::kFashionMnist) {
      return Batch{train_.images.index_select(0, ids), train_.labels.index_select(0, ids), ids};
    }
    const at::Tensor w = ByteWindowsAt(text_.train, ids, c.context + 1);
    return Batch{w.slice(1, 0, c.context), w.slice(1, 1, c.context + 1), ids};
  }

  // Validation batches: the whole test set (fmnist) or 16 fixed batches of windows (lm).
  std::vector<Batch> Validation() const {
    const RunConfig& c = config_;
    std::vector<Batch> out;
    if (c.task == Task::kFashionMnist) {
      const int64_t n = test_.labels.size(0);
      for (int64_t i = 0; i < n; i += 500) {
        const int64_t j = std::min(n, i + 500);
        out.push_back(Batch{test_.images.slice(0, i, j), test_.labels.slice(0, i, j), {}});
      }
      return out;
    }
    for (int64_t i = 0; i < 16; ++i) {
      const at::Tensor w = SampleByteWindows(text_.validation, c.batch_size, c.context + 1,
                                             c.seed ^ 0x5eed, static_cast<uint64_t>(i));
      out.push_back(Batch{w.slice(1, 0, c.context), w.slice(1, 1, c.context + 1), {}});
    }
    return out;
  }

 private:
  RunConfig config_;
  int64_t samples_ = 0;
  ImageDataset train_, test_;
  TextSplit text_;
};

at::Tensor TaskLoss(const at::Tensor& logits, const at::Tensor& targets) {
  return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}).to(at::kFloat),
                                targets.reshape({-1}));
}

// bf16 autocast on CUDA for the forward passes of one step (the backward runs outside, as
// autocast requires).
class AutocastScope {
 public:
  explicit AutocastScope(bool on) : on_(on) {
    if (!on_) return;
#if TORCH_VERSION_MAJOR >= 2
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    at::autocast::set_autocast_enabled(at::kCUDA, true);
#else
    at::autocast::set_autocast_gpu_dtype(at::kBFloat16);
    at::autocast::set_enabled(true);
#endif
  }
  ~AutocastScope() {
    if (!on_) return;
#if TORCH_VERSION_MAJOR >= 2
    at::autocast::set_autocast_enabled(at::kCUDA, false);
#else
    at::autocast::set_enabled(false);
#endif
    at::autocast::clear_cache();
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  bool on_;
};

// One boundary: a tensor that crosses from its sender to its receiver (boundary 1: client to
// server; boundary 2 of a U-shaped model: server to client), and its gradient that crosses
// back.
class Boundary {
 public:
  struct Crossed {
    at::Tensor sender_side;  // what the sender backpropagates through
    at::Tensor received;     // what the receiver decoded (no autograd)
    double bits = 32;        // mean bits per element of the frame
  };

  Boundary(const RunConfig& c, int index, int axis, int64_t channels, int64_t* forward_bytes,
           int64_t* backward_bytes)
      : c_(c),
        axis_(axis),
        amaq_(AmaqOptionsOf(c, axis), channels),
        act_(quant::FrameKind::kActivation, axis, kernels::Rounding::kNearest,
             c.seed + static_cast<uint64_t>(index), forward_bytes),
        eval_(quant::FrameKind::kActivation, axis, kernels::Rounding::kNearest, c.seed,
              &eval_bytes_),
        grad_(quant::FrameKind::kGradient, axis, c.gradients.rounding,
              (c.seed ^ 0x9e3779b97f4a7c15ull) + static_cast<uint64_t>(index), backward_bytes) {}

  quant::AmaqBoundary& amaq() { return amaq_; }
  const quant::AmaqBoundary& amaq() const { return amaq_; }
  DeltaCache& sender_cache() { return sender_cache_; }
  DeltaCache& receiver_cache() { return receiver_cache_; }
  const DeltaCache& sender_cache() const { return sender_cache_; }
  const DeltaCache& receiver_cache() const { return receiver_cache_; }
  double max_budget_excess() const { return max_excess_; }
  void set_max_budget_excess(double v) { max_excess_ = v; }

  // The activation across the wire. `ids` (AQ-SGD) names the batch's samples; `train` false:
  // validation (its own link, no caches).
  absl::StatusOr<Crossed> Forward(const at::Tensor& h, int64_t step, const at::Tensor& ids,
                                  bool train) {
    WireLink& link = train ? act_ : eval_;
    if (c_.activations.mode == WireMode::kFloat32) return Crossed{h, link.SendRaw(h), 32.0};
    const double budget = c_.activations.target.TargetAt(step);
    Crossed out;
    std::vector<uint8_t> bits;
    at::Tensor scales, offsets, payload = h.detach();
    at::Tensor sender_base, receiver_base;  // AQ-SGD: m_i on each side
    if (c_.activations.mode == WireMode::kAmaq) {
      if (train && step < c_.activations.calibration_steps) Calibrate(h);
      out.sender_side = train ? amaq_->forward(h, budget) : amaq_->forward(h.detach(), budget);
      bits = amaq_->last_bits();
      scales = amaq_->wire_scales();
      offsets = amaq_->wire_offsets();
    } else {
      bits.assign(
          static_cast<size_t>(h.size(axis_)),
          static_cast<uint8_t>(ScheduleBits(c_.activations.target, c_.activations.bits, step)));
      out.sender_side = h;  // straight-through: min-max ranges clip nothing
      if (c_.activations.mode == WireMode::kAqSgd && train) {
        sender_base = sender_cache_.Gather(ids, payload);
        receiver_base = receiver_cache_.Gather(ids, payload);
        payload = payload.to(at::kFloat) - sender_base;
      }
      const quant::WireRange range = quant::MinMaxRange(payload, axis_, bits);
      scales = range.scales;
      offsets = range.offsets;
    }
    out.bits = std::accumulate(bits.begin(), bits.end(), 0.0) / static_cast<double>(bits.size());
    if (out.bits > budget + 1e-9) {
      return absl::InternalError(
          absl::StrCat("a frame of ", out.bits, " bits exceeds the budget ", budget));
    }
    if (train) max_excess_ = std::max(max_excess_, out.bits - budget);
    SPLITQ_ASSIGN_OR_RETURN(quant::Frame frame, link.Transmit(payload, static_cast<uint64_t>(step),
                                                              bits, scales, offsets));
    SPLITQ_ASSIGN_OR_RETURN(out.received, link.Decode(frame, h.device()));
    if (receiver_base.defined()) {
      // Both sides apply the same frame to their own cache: the sender decodes its own frame
      // with its own decoder (as a remote sender would), the receiver the one it received.
      SPLITQ_ASSIGN_OR_RETURN(at::Tensor sender_delta, sender_decoder_.Decode(frame, h.device()));
      sender_cache_.Update(ids, sender_base + sender_delta);
      out.received = receiver_base + out.received;
      receiver_cache_.Update(ids, out.received);
      out.received = out.received.to(h.scalar_type());
    }
    return out;
  }

  // The gradient of the received tensor back to the sender.
  absl::StatusOr<std::pair<at::Tensor, double>> Backward(const at::Tensor& grad, int64_t step) {
    if (c_.gradients.mode == WireMode::kFloat32) return std::make_pair(grad_.SendRaw(grad), 32.0);
    const int bits = ScheduleBits(c_.gradients.target, c_.gradients.bits, step);
    const std::vector<uint8_t> gbits(static_cast<size_t>(grad.size(axis_)),
                                     static_cast<uint8_t>(bits));
    const quant::WireRange range = quant::MaxAbsRange(grad, axis_, gbits);
    SPLITQ_ASSIGN_OR_RETURN(at::Tensor back, grad_.Send(grad, static_cast<uint64_t>(step), gbits,
                                                        range.scales, range.offsets));
    return std::make_pair(back, static_cast<double>(bits));
  }

  // The bit regulariser of this boundary (AMAQ), or an undefined tensor.
  at::Tensor Regularizer(int64_t step) {
    if (c_.activations.mode != WireMode::kAmaq) return {};
    return quant::BitRegularization({amaq_}, c_.activations.gate_beta, c_.activations.gate_lambda,
                                    c_.activations.target.TargetAt(step));
  }

 private:
  // The calibration phase: each channel's range grows to cover this batch's min and max,
  // before the forward pass.
  void Calibrate(const at::Tensor& h) {
    if (!amaq_->is_initialized()) return;  // the first forward sets the range itself
    at::NoGradGuard no_grad;
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < h.dim(); ++d) {
      if (d != axis_) dims.push_back(d);
    }
    const at::Tensor x = h.detach().to(at::kFloat);
    at::Tensor range = amaq_->range(), center = amaq_->center();
    const at::Tensor lo = at::minimum(center - range, x.amin(dims));
    const at::Tensor hi = at::maximum(center + range, x.amax(dims));
    center.copy_((hi + lo) * 0.5);
    range.copy_((hi - lo) * 0.5);
  }

  static quant::AmaqOptions AmaqOptionsOf(const RunConfig& c, int axis) {
    quant::AmaqOptions o;
    o.bmin = c.activations.bits.min;
    o.bmax = c.activations.bits.max;
    o.alpha = c.activations.gate_alpha;
    o.channel_axis = axis;
    return o;
  }

  const RunConfig& c_;
  int axis_;
  quant::AmaqBoundary amaq_;
  int64_t eval_bytes_ = 0;
  WireLink act_, eval_, grad_;
  quant::WireDecoder sender_decoder_;
  DeltaCache sender_cache_, receiver_cache_;
  double max_excess_ = -1e9;
};

// Reads the loss (a device sync) and refuses a non-finite one before anything backpropagates
// or steps, so the weights stay finite and the error names the cause.
absl::Status CheckLoss(const at::Tensor& loss, int64_t step, StepStats* stats) {
  stats->loss = loss.item<double>();
  if (std::isfinite(stats->loss)) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat("step ", step, ": the loss is ", stats->loss,
                   " (diverged; try a lower optim.lr or a higher quant.activations.bits.min)"));
}

// Backpropagates `outputs` with `grads`, adding each defined regulariser with gradient 1.
void BackwardWithRegularizer(at::Tensor output, at::Tensor grad, const at::Tensor& reg) {
  std::vector<at::Tensor> outputs{std::move(output)}, grads{std::move(grad)};
  if (reg.defined()) {
    outputs.push_back(reg);
    grads.push_back(at::ones({}, reg.options()));
  }
  torch::autograd::backward(outputs, grads);
}

std::vector<at::Tensor> Trainable(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& p : params) {
    if (p.requires_grad()) out.push_back(p);
  }
  return out;
}

std::unique_ptr<torch::optim::AdamW> MakeOptimizer(const RunConfig& c,
                                                   const std::vector<at::Tensor>& model_params,
                                                   const std::vector<at::Tensor>& gate_params) {
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(Trainable(model_params));
  if (!gate_params.empty()) {  // the sender of an AMAQ boundary: gates and ranges
    auto gate_options = std::make_unique<torch::optim::AdamWOptions>(c.activations.gate_lr);
    gate_options->weight_decay(0);
    groups.emplace_back(gate_params, std::move(gate_options));
  }
  return std::make_unique<torch::optim::AdamW>(
      std::move(groups), torch::optim::AdamWOptions(c.lr).weight_decay(c.weight_decay));
}

// The model's blocks in model order (client, server, head): the same list at any split point.
std::vector<std::shared_ptr<torch::nn::Module>> Blocks(const SplitModel& m) {
  std::vector<std::shared_ptr<torch::nn::Module>> out;
  for (const auto* part : {&m.client, &m.server, &m.head}) {
    for (const auto& block : (*part)->children()) out.push_back(block);
  }
  return out;
}

// What must agree between a checkpoint and the run that loads it: the model's shape (for
// --init), then the rest of the trainable state (for a resume).
std::vector<std::pair<const char*, int64_t>> ShapeFields(const RunConfig& c) {
  return {{"task", static_cast<int64_t>(c.task)},
          {"model.layers", c.task == Task::kLanguageModel ? c.layers : 0},
          {"model.width", c.task == Task::kLanguageModel ? c.width : 0},
          {"model.heads", c.task == Task::kLanguageModel ? c.heads : 0},
          {"model.context", c.task == Task::kLanguageModel ? c.context : 0},
          {"quant.weights.bits", c.weight_bits},
          {"quant.weights.input_bits", c.input_bits}};
}
int64_t TargetMask(const std::vector<std::string>& targets) {
  int64_t mask = 0;
  const char* names[] = {"qkv", "proj", "fc1", "fc2"};
  for (int i = 0; i < 4; ++i) {
    if (std::find(targets.begin(), targets.end(), names[i]) != targets.end()) mask |= 1 << i;
  }
  return mask;
}

constexpr int kStateLoraRank = 2;  // index of lora.rank in StateFields
std::vector<std::pair<const char*, int64_t>> StateFields(const RunConfig& c) {
  return {{"model.split_after", c.split_after},
          {"model.u_shaped", c.u_shaped},
          {"lora.rank", c.lora_rank},
          {"lora.alpha (x1000)", static_cast<int64_t>(std::llround(c.lora_alpha * 1000))},
          {"lora.targets", TargetMask(c.lora_targets)},
          {"quant.activations.mode", static_cast<int64_t>(c.activations.mode)},
          {"quant.activations.bits.min", c.activations.bits.min},
          {"quant.activations.bits.max", c.activations.bits.max}};
}

at::Tensor FieldTensor(const std::vector<std::pair<const char*, int64_t>>& fields) {
  std::vector<int64_t> v;
  for (const auto& f : fields) v.push_back(f.second);
  return at::tensor(v, at::kLong);
}

absl::Status CheckFields(const std::string& path,
                         const std::vector<std::pair<const char*, int64_t>>& fields,
                         const at::Tensor& stored) {
  if (stored.numel() != static_cast<int64_t>(fields.size())) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": not a splitq checkpoint of this version"));
  }
  for (size_t i = 0; i < fields.size(); ++i) {
    const int64_t got = stored.data_ptr<int64_t>()[i];
    if (got != fields[i].second) {
      return absl::FailedPreconditionError(absl::StrCat(path, ": the checkpoint has ",
                                                        fields[i].first, " = ", got,
                                                        ", this run has ", fields[i].second));
    }
  }
  return absl::OkStatus();
}

}  // namespace

double LearningRateAt(const RunConfig& c, int64_t step, double base) {
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
    const auto blocks = Blocks(model);
    std::vector<std::vector<int64_t>> shapes;
    for (const at::Tensor& p : model.parameters()) shapes.push_back(p.sizes().vec());
    for (size_t i = 0; i < blocks.size(); ++i) {
      torch::serialize::InputArchive block;
      if (!archive.try_read(absl::StrCat("block.", i), block)) {
        return absl::FailedPreconditionError(
            absl::StrCat(path, ": the checkpoint has no block ", i));
      }
      blocks[i]->load(block);
    }
    const std::vector<at::Tensor> after = model.parameters();
    for (size_t i = 0; i < after.size(); ++i) {
      if (after[i].sizes().vec() != shapes[i]) {
        return absl::FailedPreconditionError(
            absl::StrCat(path, ": a parameter of shape ", after[i].sizes().vec().size(),
                         "-d in the checkpoint does not match the model"));
      }
    }
    return absl::OkStatus();
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
  if (c.lora_rank > 0 && init_checkpoint.empty() && !for_resume) {
    return absl::InvalidArgumentError(
        "lora.rank: a LoRA run fine-tunes a pretrained base; name its checkpoint with --init");
  }
  auto impl = std::make_unique<Impl>();
  impl->c = c;
  const bool cuda = torch::cuda::is_available();
  if (c.device == "cuda" && !cuda) {
    return absl::FailedPreconditionError(
        "device: cuda, but this build or machine has no usable GPU (use device=cpu or auto)");
  }
  impl->device = (c.device == "cuda" || (c.device == "auto" && cuda)) ? at::Device(at::kCUDA)
                                                                      : at::Device(at::kCPU);
  if (c.bf16_autocast && !impl->device.is_cuda()) {
    return absl::InvalidArgumentError(
        "optim.bf16_autocast: autocast is for CUDA; this run is on the CPU");
  }
  SPLITQ_ASSIGN_OR_RETURN(impl->data, Data::Load(c));
  at::manual_seed(c.seed);
  const QuantLayerOptions quant_layers{c.weight_bits, c.input_bits, true};
  SplitModel& model = impl->model;
  try {
    if (c.task == Task::kFashionMnist) {
      model = FashionMnistCnn(CnnOptions{c.split_after, c.u_shaped, quant_layers});
    } else {
      TransformerOptions t;
      t.layers = c.layers;
      t.width = c.width;
      t.heads = c.heads;
      t.context = c.context;
      t.split_after = c.split_after;
      t.u_shaped = c.u_shaped;
      t.quant = quant_layers;
      model = ByteTransformer(t);
    }
    if (!init_checkpoint.empty()) {
      torch::serialize::InputArchive archive;
      try {
        archive.load_from(init_checkpoint, at::kCPU);  // the model moves to its device below
      } catch (const c10::Error& e) {
        return absl::NotFoundError(
            absl::StrCat("--init ", init_checkpoint,
                         ": cannot read a checkpoint: ", e.what_without_backtrace()));
      }
      at::Tensor shape;
      if (!archive.try_read("shape", shape)) {
        return absl::FailedPreconditionError(
            absl::StrCat(init_checkpoint, ": not a splitq checkpoint"));
      }
      SPLITQ_RETURN_IF_ERROR(CheckFields(init_checkpoint, ShapeFields(c), shape));
      at::Tensor state;
      if (archive.try_read("state", state) && state.numel() > kStateLoraRank &&
          state.data_ptr<int64_t>()[kStateLoraRank] > 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            init_checkpoint,
            ": a LoRA run's checkpoint; --init takes a base model (its adapters would be lost)"));
      }
      SPLITQ_RETURN_IF_ERROR(impl->LoadModel(archive, init_checkpoint));
    }
    if (c.lora_rank > 0) {
      ApplyLora(model, c.lora_targets, LoraOptions{c.lora_rank, c.lora_alpha});
    }
    for (auto* part : {&model.client, &model.server, &model.head}) (*part)->to(impl->device);
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(e.what_without_backtrace());
  }
  try {
    const int axis = model.boundary_channel_axis;
    const int64_t channels1 = c.task == Task::kLanguageModel
                                  ? c.width
                                  : std::array<int64_t, 3>{32, 64, 128}[c.split_after - 1];
    impl->boundaries.push_back(std::make_unique<Boundary>(impl->c, 0, axis, channels1,
                                                          &impl->bytes_up, &impl->bytes_down));
    if (c.u_shaped) {
      const int64_t channels2 = c.task == Task::kLanguageModel ? c.width : 128;
      impl->boundaries.push_back(std::make_unique<Boundary>(impl->c, 1, axis, channels2,
                                                            &impl->bytes_down, &impl->bytes_up));
    }
    for (auto& b : impl->boundaries) b->amaq()->to(impl->device);

    std::vector<at::Tensor> client_params = model.client->parameters();
    for (const at::Tensor& p : model.head->parameters()) client_params.push_back(p);
    impl->client_opt = MakeOptimizer(c, client_params, impl->boundaries[0]->amaq()->parameters());
    impl->server_opt = MakeOptimizer(
        c, model.server->parameters(),
        c.u_shaped ? impl->boundaries[1]->amaq()->parameters() : std::vector<at::Tensor>{});
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
    for (auto* opt : {s.client_opt.get(), s.server_opt.get()}) {
      SetLr(*opt, 0, LearningRateAt(c, step, c.lr));
      SetLr(*opt, 1, LearningRateAt(c, step, c.activations.gate_lr));
      opt->zero_grad();
    }
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
      SPLITQ_RETURN_IF_ERROR(CheckLoss(loss, step, &stats));
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
      SPLITQ_RETURN_IF_ERROR(CheckLoss(loss, step, &stats));
      loss.backward();
      SPLITQ_ASSIGN_OR_RETURN(auto g2, b2.Backward(head_in.grad(), step));
      grad_bits_sum += g2.second * static_cast<double>(h2.numel());
      grad_elements += static_cast<double>(h2.numel());
      s.bytes_fp32 += 8 * h2.numel();
      s.boundary2_bytes = 4 * h2.numel();
      BackwardWithRegularizer(down.sender_side, g2.first, b2.Regularizer(step));
    }
    SPLITQ_ASSIGN_OR_RETURN(auto g1, b1.Backward(server_in.grad(), step));
    grad_bits_sum += g1.second * static_cast<double>(h1.numel());
    grad_elements += static_cast<double>(h1.numel());
    BackwardWithRegularizer(up.sender_side, g1.first, b1.Regularizer(step));
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
    for (const Batch& batch : s.data.Validation()) {
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
  const std::string temp = path + ".tmp";
  try {
    torch::serialize::OutputArchive archive;
    archive.write("version", at::tensor({kCheckpointVersion}, at::kLong));
    archive.write("shape", FieldTensor(ShapeFields(s.c)));
    archive.write("state", FieldTensor(StateFields(s.c)));
    archive.write("counters",
                  at::tensor({s.step, s.bytes_up, s.bytes_down, s.bytes_fp32}, at::kLong));
    archive.write("driver", at::tensor(driver_state, at::kDouble));
    const auto blocks = Blocks(s.model);
    for (size_t i = 0; i < blocks.size(); ++i) {
      torch::serialize::OutputArchive block;
      blocks[i]->save(block);
      archive.write(absl::StrCat("block.", i), block);
    }
    for (size_t b = 0; b < s.boundaries.size(); ++b) {
      torch::serialize::OutputArchive boundary;
      s.boundaries[b]->amaq()->save(boundary);
      archive.write(absl::StrCat("boundary.", b), boundary);
      archive.write(absl::StrCat("boundary.", b, ".excess"),
                    at::tensor({s.boundaries[b]->max_budget_excess()}, at::kDouble));
      s.boundaries[b]->sender_cache().Save(archive, absl::StrCat("aqsgd.", b, ".sender"));
      s.boundaries[b]->receiver_cache().Save(archive, absl::StrCat("aqsgd.", b, ".receiver"));
    }
    torch::serialize::OutputArchive client_opt, server_opt;
    s.client_opt->save(client_opt);
    s.server_opt->save(server_opt);
    archive.write("client_opt", client_opt);
    archive.write("server_opt", server_opt);
    archive.save_to(temp);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat(path, ": cannot write the checkpoint: ", e.what_without_backtrace()));
  }
  std::error_code ec;
  std::filesystem::rename(temp, path, ec);
  if (ec) return absl::InternalError(absl::StrCat(path, ": ", ec.message()));
  return absl::OkStatus();
}

absl::Status SplitTrainer::LoadCheckpoint(const std::string& path,
                                          std::vector<double>* driver_state) {
  Impl& s = *impl_;
  if (!std::filesystem::exists(path)) {
    return absl::NotFoundError(absl::StrCat(path, ": no checkpoint to resume from"));
  }
  try {
    torch::serialize::InputArchive archive;
    archive.load_from(path, s.device);
    at::Tensor version, shape, state, counters, driver;
    if (!archive.try_read("version", version) || version.item<int64_t>() != kCheckpointVersion) {
      return absl::FailedPreconditionError(
          absl::StrCat(path, ": not a splitq checkpoint of version ", kCheckpointVersion));
    }
    archive.read("shape", shape);
    archive.read("state", state);
    SPLITQ_RETURN_IF_ERROR(CheckFields(path, ShapeFields(s.c), shape.cpu()));
    SPLITQ_RETURN_IF_ERROR(CheckFields(path, StateFields(s.c), state.cpu()));
    SPLITQ_RETURN_IF_ERROR(s.LoadModel(archive, path));
    for (size_t b = 0; b < s.boundaries.size(); ++b) {
      torch::serialize::InputArchive boundary;
      archive.read(absl::StrCat("boundary.", b), boundary);
      s.boundaries[b]->amaq()->load(boundary);
      at::Tensor excess;
      if (archive.try_read(absl::StrCat("boundary.", b, ".excess"), excess)) {
        s.boundaries[b]->set_max_budget_excess(excess.cpu().item<double>());
      }
      s.boundaries[b]->sender_cache().Load(archive, absl::StrCat("aqsgd.", b, ".sender"), s.device);
      s.boundaries[b]->receiver_cache().Load(archive, absl::StrCat("aqsgd.", b, ".receiver"),
                                             s.device);
    }
    torch::serialize::InputArchive client_opt, server_opt;
    archive.read("client_opt", client_opt);
    archive.read("server_opt", server_opt);
    s.client_opt->load(client_opt);
    s.server_opt->load(server_opt);
    archive.read("counters", counters);
    counters = counters.cpu();
    s.step = counters.data_ptr<int64_t>()[0];
    s.bytes_up = counters.data_ptr<int64_t>()[1];
    s.bytes_down = counters.data_ptr<int64_t>()[2];
    s.bytes_fp32 = counters.data_ptr<int64_t>()[3];
    archive.read("driver", driver);
    if (driver_state != nullptr) {
      driver = driver.cpu();
      driver_state->assign(driver.data_ptr<double>(), driver.data_ptr<double>() + driver.numel());
    }
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
      w.max_budget_excess = std::max(w.max_budget_excess, b->max_budget_excess());
    }
  }
  return w;
}

ClientMemory SplitTrainer::client_memory() const {
  const Impl& s = *impl_;
  ClientMemory m;
  auto add = [&](const torch::nn::Module& module) {
    for (const at::Tensor& p : module.parameters()) {
      const int64_t bytes = p.numel() * static_cast<int64_t>(p.element_size());
      m.parameters += bytes;
      if (p.requires_grad()) {
        m.trainable += bytes;
        m.optimizer_state += 2 * bytes;
      }
    }
    for (const at::Tensor& b : module.buffers()) {
      m.parameters += b.numel() * static_cast<int64_t>(b.element_size());
    }
  };
  add(*s.model.client);
  add(*s.model.head);
  add(*s.boundaries[0]->amaq());
  m.boundary_tensor = s.boundary_bytes;
  m.aqsgd_cache = s.boundaries[0]->sender_cache().bytes();
  if (s.boundaries.size() > 1) {  // U-shaped: the client also receives boundary 2
    m.boundary_tensor += s.boundary2_bytes;
    m.aqsgd_cache += s.boundaries[1]->receiver_cache().bytes();
  }
  return m;
}

}  // namespace splitq::trainer

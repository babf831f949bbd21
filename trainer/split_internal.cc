#include "trainer/split_internal.h"

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/cuda.h>
#include <torch/version.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "base/files.h"
#include "base/status_macros.h"
#include "kernels/philox.h"
#include "trainer/split_trainer.h"

namespace splitq::trainer::internal {
namespace {

constexpr uint32_t kRawMagic = 0x31525153;  // "SQR1" read as little-endian u32
constexpr int kStateLoraRank = 2;           // index of lora.rank in StateFields

absl::StatusOr<quant::Frame> ParseBytes(const std::string& bytes) {
  return quant::ParseFrame(
      absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
}

quant::AmaqOptions AmaqOptionsOf(const RunConfig& c, int axis) {
  quant::AmaqOptions o;
  o.bmin = c.activations.bits.min;
  o.bmax = c.activations.bits.max;
  o.alpha = c.activations.gate_alpha;
  o.channel_axis = axis;
  return o;
}

int64_t TargetMask(const std::vector<std::string>& targets) {
  int64_t mask = 0;
  const char* names[] = {"qkv", "proj", "fc1", "fc2"};
  for (int i = 0; i < 4; ++i) {
    if (std::find(targets.begin(), targets.end(), names[i]) != targets.end()) mask |= 1 << i;
  }
  return mask;
}

std::vector<at::Tensor> Trainable(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& p : params) {
    if (p.requires_grad()) out.push_back(p);
  }
  return out;
}

void SetLr(torch::optim::AdamW& opt, size_t group, double lr) {
  if (group >= opt.param_groups().size()) return;
  static_cast<torch::optim::AdamWOptions&>(opt.param_groups()[group].options()).lr(lr);
}

}  // namespace

int ScheduleBits(const quant::BitSchedule& s, const BitsRange& range, int64_t step) {
  // The largest integer width within the budget (a uniform frame never exceeds it either).
  const int bits = static_cast<int>(std::floor(s.TargetAt(step) + 1e-9));
  return std::clamp(bits, range.min, range.max);
}

std::string EncodeRawTensor(const at::Tensor& x) {
  const at::Tensor c = x.detach().to(at::kFloat).contiguous().cpu();
  const uint32_t rank = static_cast<uint32_t>(c.dim());
  std::string out(8 + 8 * rank + static_cast<size_t>(c.numel()) * 4, '\0');
  std::memcpy(out.data(), &kRawMagic, 4);
  std::memcpy(out.data() + 4, &rank, 4);
  for (uint32_t d = 0; d < rank; ++d) {
    const int64_t n = c.size(d);
    std::memcpy(out.data() + 8 + 8 * d, &n, 8);
  }
  if (c.numel() > 0) {
    std::memcpy(out.data() + 8 + 8 * rank, c.data_ptr<float>(), static_cast<size_t>(c.numel()) * 4);
  }
  return out;
}

absl::StatusOr<at::Tensor> DecodeRawTensor(const std::string& bytes,
                                           const quant::FrameLimits& limits, bool require_finite) {
  uint32_t magic = 0, rank = 0;
  if (bytes.size() < 8) return absl::InvalidArgumentError("raw frame: shorter than its header");
  std::memcpy(&magic, bytes.data(), 4);
  std::memcpy(&rank, bytes.data() + 4, 4);
  if (magic != kRawMagic) return absl::InvalidArgumentError("raw frame: bad magic");
  if (rank > static_cast<uint32_t>(quant::kMaxFrameRank) || bytes.size() < 8 + 8 * rank) {
    return absl::InvalidArgumentError(absl::StrCat("raw frame: bad rank ", rank));
  }
  std::vector<int64_t> shape(rank);
  int64_t numel = 1;
  for (uint32_t d = 0; d < rank; ++d) {
    std::memcpy(&shape[d], bytes.data() + 8 + 8 * d, 8);
    if (shape[d] < 0 || (shape[d] > 0 && numel > limits.max_elements / shape[d])) {
      return absl::ResourceExhaustedError(
          absl::StrCat("raw frame: more than ", limits.max_elements, " elements"));
    }
    numel *= shape[d];
  }
  if (numel > limits.max_elements) {
    return absl::ResourceExhaustedError(
        absl::StrCat("raw frame: ", numel, " elements, more than ", limits.max_elements));
  }
  if (bytes.size() != 8 + 8 * rank + static_cast<size_t>(numel) * 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("raw frame: ", bytes.size(), " bytes for a shape of ", numel, " elements"));
  }
  at::Tensor out = at::empty(shape, at::kFloat);
  if (numel > 0) {
    std::memcpy(out.data_ptr<float>(), bytes.data() + 8 + 8 * rank, static_cast<size_t>(numel) * 4);
    if (require_finite && !at::isfinite(out).all().item<bool>()) {
      return absl::InvalidArgumentError("raw frame: values that are NaN or infinite");
    }
  }
  return out;
}

at::Tensor DeltaCache::Gather(const at::Tensor& ids, const at::Tensor& like) const {
  at::Tensor out = at::zeros_like(like, like.options().dtype(at::kFloat));
  const at::Tensor id = ids.cpu();
  for (int64_t b = 0; b < id.numel(); ++b) {
    auto it = m_.find(id.data_ptr<int64_t>()[b]);
    if (it != m_.end()) out[b].copy_(it->second);
  }
  return out;
}

void DeltaCache::Update(const at::Tensor& ids, const at::Tensor& values) {
  const at::Tensor id = ids.cpu();
  const at::Tensor half = values.detach().to(at::kHalf);
  for (int64_t b = 0; b < id.numel(); ++b) m_[id.data_ptr<int64_t>()[b]] = half[b].clone();
}

int64_t DeltaCache::bytes() const {
  int64_t n = 0;
  for (const auto& [id, t] : m_) n += t.numel() * 2;
  return n;
}

void DeltaCache::Save(torch::serialize::OutputArchive& archive, const std::string& key) const {
  std::vector<int64_t> ids;
  std::vector<at::Tensor> values;
  for (const auto& [id, t] : m_) {
    ids.push_back(id);
    values.push_back(t.cpu());  // one entry at a time: no second copy of the cache on a GPU
  }
  archive.write(key + ".ids", at::tensor(ids, at::kLong));
  if (!values.empty()) archive.write(key + ".values", at::stack(values));
}

void DeltaCache::Load(torch::serialize::InputArchive& archive, const std::string& key,
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

absl::StatusOr<Data> Data::Load(const RunConfig& c, const Shard& shard) {
  if (shard.count < 1 || shard.index < 0 || shard.index >= shard.count) {
    return absl::InvalidArgumentError(
        absl::StrCat("shard ", shard.index, "/", shard.count, ": need 0 <= index < count"));
  }
  Data d;
  d.config_ = c;
  d.shard_ = shard;
  if (c.task == Task::kFashionMnist) {
    SPLITQ_ASSIGN_OR_RETURN(d.train_, LoadFashionMnist(true));
    SPLITQ_ASSIGN_OR_RETURN(d.test_, LoadFashionMnist(false));
    d.samples_ = d.train_.labels.size(0);
    if (shard.count > 1 && d.samples_ >= shard.count) {  // keep this shard's samples only
      for (at::Tensor* t : {&d.train_.pixels, &d.train_.labels}) {
        *t = t->slice(0, shard.index, d.samples_, shard.count).contiguous();
      }
    }
  } else {
    SPLITQ_ASSIGN_OR_RETURN(std::string text, LoadTextCorpus(c.corpus));
    d.text_ = SplitText(std::move(text), c.validation_fraction);
    if (static_cast<int64_t>(d.text_.validation.size()) <= c.context + 1) {
      return absl::InvalidArgumentError("data.validation_fraction leaves too little text");
    }
    d.samples_ = ByteWindowCount(d.text_.train.size(), c.context + 1);
    if (d.samples_ < 1) {
      return absl::InvalidArgumentError(absl::StrCat("data.corpus: ", c.corpus,
                                                     " has less training text than one window of ",
                                                     c.context + 1, " bytes"));
    }
  }
  if (d.samples_ < shard.count) {
    return absl::InvalidArgumentError(absl::StrCat("shard count ", shard.count, " exceeds the ",
                                                   d.samples_, " training samples"));
  }
  return d;
}

Batch Data::Train(int64_t step) const {
  const RunConfig& c = config_;
  // Samples index, index + count, ...: the shard's share of the data set.
  const uint64_t in_shard =
      static_cast<uint64_t>((samples_ - shard_.index + shard_.count - 1) / shard_.count);
  at::Tensor ids = at::empty({c.batch_size}, at::kLong);
  at::Tensor local = at::empty({c.batch_size}, at::kLong);  // the shard's sample number
  for (int64_t b = 0; b < c.batch_size; ++b) {
    const kernels::Philox4 r = kernels::PhiloxBlock(c.seed, static_cast<uint64_t>(step), b);
    const uint64_t draw = (static_cast<uint64_t>(r.v[0]) << 32) | r.v[1];
    local.data_ptr<int64_t>()[b] = static_cast<int64_t>(draw % in_shard);
    ids.data_ptr<int64_t>()[b] = local.data_ptr<int64_t>()[b] * shard_.count + shard_.index;
  }
  if (c.task == Task::kFashionMnist) {
    return Batch{ImagesFromPixels(train_.pixels.index_select(0, local)),
                 train_.labels.index_select(0, local), ids};
  }
  const at::Tensor w = ByteWindowsAt(text_.train, ids, c.context + 1);
  return Batch{w.slice(1, 0, c.context), w.slice(1, 1, c.context + 1), ids};
}

// 100 examples: a client's validation forward at 500 had peaked 150 MiB above its training
// steps (the CNN's first blocks at full resolution); at 100 the passes cost no more memory than
// a training step, and the whole test set is still 100 even batches.
constexpr int64_t kImageValidationBatch = 100;

int64_t Data::ValidationBatches() const {
  if (config_.task != Task::kFashionMnist) return 16;
  return (test_.labels.size(0) + kImageValidationBatch - 1) / kImageValidationBatch;
}

Batch Data::ValidationBatch(int64_t i) const {
  const RunConfig& c = config_;
  if (c.task == Task::kFashionMnist) {
    const int64_t a = i * kImageValidationBatch;
    const int64_t b = std::min(test_.labels.size(0), a + kImageValidationBatch);
    return Batch{ImagesFromPixels(test_.pixels.slice(0, a, b)), test_.labels.slice(0, a, b), {}};
  }
  const at::Tensor w = SampleByteWindows(text_.validation, c.batch_size, c.context + 1,
                                         c.seed ^ 0x5eed, static_cast<uint64_t>(i));
  return Batch{w.slice(1, 0, c.context), w.slice(1, 1, c.context + 1), {}};
}

at::Tensor TaskLoss(const at::Tensor& logits, const at::Tensor& targets) {
  return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}).to(at::kFloat),
                                targets.reshape({-1}));
}

AutocastScope::AutocastScope(bool on) : on_(on) {
  if (!on_) return;
#if TORCH_VERSION_MAJOR >= 2
  at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
  at::autocast::set_autocast_enabled(at::kCUDA, true);
#else
  at::autocast::set_autocast_gpu_dtype(at::kBFloat16);
  at::autocast::set_enabled(true);
#endif
}

AutocastScope::~AutocastScope() {
  if (!on_) return;
#if TORCH_VERSION_MAJOR >= 2
  at::autocast::set_autocast_enabled(at::kCUDA, false);
#else
  at::autocast::set_enabled(false);
#endif
  at::autocast::clear_cache();
}

BoundarySender::BoundarySender(const RunConfig& c, int index, int axis, int64_t channels)
    : c_(c),
      axis_(axis),
      amaq_(AmaqOptionsOf(c, axis), channels),
      act_(1, quant::FrameKind::kActivation,
           quant::WireEncoderOptions{axis, kernels::Rounding::kNearest,
                                     c.seed + static_cast<uint64_t>(index)}),
      eval_(1, quant::FrameKind::kActivation,
            quant::WireEncoderOptions{axis, kernels::Rounding::kNearest, c.seed}) {}

absl::StatusOr<BoundarySender::Sent> BoundarySender::Send(const at::Tensor& h, int64_t step,
                                                          const at::Tensor& ids, bool train) {
  if (c_.activations.mode == WireMode::kFloat32) return Sent{h, EncodeRawTensor(h), 32.0, {}};
  const double budget = c_.activations.target.TargetAt(step);
  Sent out;
  std::vector<uint8_t> bits;
  at::Tensor scales, offsets, payload = h.detach();
  at::Tensor base;  // AQ-SGD: this side's m_i
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
      base = cache_.Gather(ids, payload);
      payload = payload.to(at::kFloat) - base;
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
  // Validation frames all carry their bit map: a receiver may see any one of them first.
  if (!train) eval_.ResendBitMap();
  quant::WireEncoder& encoder = train ? act_ : eval_;
  SPLITQ_ASSIGN_OR_RETURN(quant::Frame frame, encoder.Encode(payload, static_cast<uint64_t>(step),
                                                             bits, scales, offsets));
  out.bytes = quant::SerializeFrame(frame);
  out.bit_map = std::move(bits);
  if (base.defined()) {
    // The sender applies its own frame to its cache, decoded as the receiver decodes it.
    SPLITQ_ASSIGN_OR_RETURN(at::Tensor delta, self_decoder_.Decode(frame, h.device()));
    cache_.Update(ids, base + delta);
  }
  return out;
}

at::Tensor BoundarySender::SenderSide(const at::Tensor& h, int64_t step) {
  if (c_.activations.mode != WireMode::kAmaq) return h;
  return amaq_->forward(h, c_.activations.target.TargetAt(step));
}

absl::StatusOr<at::Tensor> BoundarySender::ReceiveGradient(const std::string& bytes,
                                                           const at::Device& device,
                                                           at::ScalarType dtype) {
  if (c_.gradients.mode == WireMode::kFloat32) {
    SPLITQ_ASSIGN_OR_RETURN(at::Tensor g, DecodeRawTensor(bytes));
    return g.to(device).to(dtype);
  }
  SPLITQ_ASSIGN_OR_RETURN(quant::Frame frame, ParseBytes(bytes));
  if (frame.kind != quant::FrameKind::kGradient) {
    return absl::InvalidArgumentError("expected a gradient frame");
  }
  return grad_decoder_.Decode(frame, device);
}

absl::StatusOr<std::string> BoundarySender::WithBitMap(const std::string& bytes,
                                                       const std::vector<uint8_t>& bit_map) {
  if (bit_map.empty()) return bytes;  // a raw frame
  SPLITQ_ASSIGN_OR_RETURN(quant::Frame frame, ParseBytes(bytes));
  if (!frame.bits.empty()) return bytes;
  frame.bits = bit_map;
  quant::SealFrame(&frame);
  return quant::SerializeFrame(frame);
}

void BoundarySender::ResendBitMap() { act_.ResendBitMap(); }  // eval_ always sends it

at::Tensor BoundarySender::Regularizer(int64_t step) {
  if (c_.activations.mode != WireMode::kAmaq) return {};
  return quant::BitRegularization({amaq_}, c_.activations.gate_beta, c_.activations.gate_lambda,
                                  c_.activations.target.TargetAt(step));
}

// The calibration phase: each channel's range grows to cover this batch's min and max, before
// the forward pass.
void BoundarySender::Calibrate(const at::Tensor& h) {
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

BoundaryReceiver::BoundaryReceiver(const RunConfig& c, int index, int axis,
                                   const quant::FrameLimits& limits, bool require_finite)
    : c_(c),
      axis_(axis),
      limits_(limits),
      require_finite_(require_finite),
      act_(limits),
      eval_(limits),
      grad_(1, quant::FrameKind::kGradient,
            quant::WireEncoderOptions{
                axis, c.gradients.rounding,
                (c.seed ^ 0x9e3779b97f4a7c15ull) + static_cast<uint64_t>(index)}) {}

absl::StatusOr<at::Tensor> BoundaryReceiver::Receive(const std::string& bytes, int64_t step,
                                                     const at::Tensor& ids, bool train,
                                                     const at::Device& device,
                                                     at::ScalarType dtype) {
  if (c_.activations.mode == WireMode::kFloat32) {
    SPLITQ_ASSIGN_OR_RETURN(at::Tensor h, DecodeRawTensor(bytes, limits_, require_finite_));
    return h.to(device).to(dtype);
  }
  SPLITQ_ASSIGN_OR_RETURN(quant::Frame frame, ParseBytes(bytes));
  if (frame.kind != quant::FrameKind::kActivation) {
    return absl::InvalidArgumentError("expected an activation frame");
  }
  if (frame.step != static_cast<uint64_t>(step)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the frame says step ", frame.step, ", it was sent as step ", step));
  }
  SPLITQ_ASSIGN_OR_RETURN(at::Tensor received, (train ? act_ : eval_).Decode(frame, device));
  if (c_.activations.mode == WireMode::kAqSgd && train) {
    if (ids.numel() != received.size(0)) {
      return absl::InvalidArgumentError(
          absl::StrCat(ids.numel(), " sample ids for a batch of ", received.size(0)));
    }
    received = cache_.Gather(ids, received) + received;
    cache_.Update(ids, received);
  }
  return received.to(dtype);
}

absl::StatusOr<std::pair<std::string, double>> BoundaryReceiver::SendGradient(
    const at::Tensor& grad, int64_t step) {
  if (c_.gradients.mode == WireMode::kFloat32) return std::make_pair(EncodeRawTensor(grad), 32.0);
  const int bits = ScheduleBits(c_.gradients.target, c_.gradients.bits, step);
  const std::vector<uint8_t> gbits(static_cast<size_t>(grad.size(axis_)),
                                   static_cast<uint8_t>(bits));
  const quant::WireRange range = quant::MaxAbsRange(grad, axis_, gbits);
  SPLITQ_ASSIGN_OR_RETURN(quant::Frame frame, grad_.Encode(grad, static_cast<uint64_t>(step), gbits,
                                                           range.scales, range.offsets));
  return std::make_pair(quant::SerializeFrame(frame), static_cast<double>(bits));
}

absl::Status CheckLoss(const at::Tensor& loss, int64_t step, double* value) {
  *value = loss.item<double>();
  if (std::isfinite(*value)) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat("step ", step, ": the loss is ", *value,
                   " (diverged; try a lower optim.lr or a higher quant.activations.bits.min)"));
}

void BackwardWithRegularizer(at::Tensor output, at::Tensor grad, const at::Tensor& reg) {
  std::vector<at::Tensor> outputs{std::move(output)}, grads{std::move(grad)};
  if (reg.defined()) {
    outputs.push_back(reg);
    grads.push_back(at::ones({}, reg.options()));
  }
  torch::autograd::backward(outputs, grads);
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

void PrepareOptimizer(const RunConfig& c, torch::optim::AdamW& opt, int64_t step) {
  SetLr(opt, 0, LearningRateAt(c, step, c.lr));
  SetLr(opt, 1, LearningRateAt(c, step, c.activations.gate_lr));
  opt.zero_grad();
}

std::vector<std::shared_ptr<torch::nn::Module>> Blocks(const SplitModel& m) {
  std::vector<std::shared_ptr<torch::nn::Module>> out;
  for (const auto* part : {&m.client, &m.server, &m.head}) {
    for (const auto& block : (*part)->children()) out.push_back(block);
  }
  return out;
}

Fields ShapeFields(const RunConfig& c) {
  return {{"task", static_cast<int64_t>(c.task)},
          {"model.layers", c.task == Task::kLanguageModel ? c.layers : 0},
          {"model.width", c.task == Task::kLanguageModel ? c.width : 0},
          {"model.heads", c.task == Task::kLanguageModel ? c.heads : 0},
          {"model.context", c.task == Task::kLanguageModel ? c.context : 0},
          {"quant.weights.bits", c.weight_bits},
          {"quant.weights.input_bits", c.input_bits}};
}

Fields StateFields(const RunConfig& c) {
  return {{"model.split_after", c.split_after},
          {"model.u_shaped", c.u_shaped},
          {"lora.rank", c.lora_rank},
          {"lora.alpha (x1000)", static_cast<int64_t>(std::llround(c.lora_alpha * 1000))},
          {"lora.targets", TargetMask(c.lora_targets)},
          {"quant.activations.mode", static_cast<int64_t>(c.activations.mode)},
          {"quant.activations.bits.min", c.activations.bits.min},
          {"quant.activations.bits.max", c.activations.bits.max}};
}

at::Tensor FieldTensor(const Fields& fields) {
  std::vector<int64_t> v;
  for (const auto& f : fields) v.push_back(f.second);
  return at::tensor(v, at::kLong);
}

absl::Status CheckFields(const std::string& path, const Fields& fields, const at::Tensor& stored) {
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

void WriteHeader(torch::serialize::OutputArchive& archive, const char* version_key, int64_t version,
                 const RunConfig& c, const CheckpointCounters& n,
                 const std::vector<double>& driver) {
  archive.write(version_key, at::tensor({version}, at::kLong));
  archive.write("shape", FieldTensor(ShapeFields(c)));
  archive.write("state", FieldTensor(StateFields(c)));
  archive.write("counters",
                at::tensor({n.step, n.bytes_up, n.bytes_down, n.bytes_fp32}, at::kLong));
  archive.write("driver", at::tensor(driver, at::kDouble));
}

absl::Status ReadHeader(torch::serialize::InputArchive& archive, const std::string& path,
                        const char* version_key, int64_t version, const char* kind,
                        const RunConfig& c, CheckpointCounters* n, std::vector<double>* driver) {
  at::Tensor v, shape, state, counters, driver_t;
  if (!archive.try_read(version_key, v) || v.cpu().item<int64_t>() != version) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": not a ", kind, " checkpoint of version ", version));
  }
  archive.read("shape", shape);
  archive.read("state", state);
  SPLITQ_RETURN_IF_ERROR(CheckFields(path, ShapeFields(c), shape.cpu()));
  SPLITQ_RETURN_IF_ERROR(CheckFields(path, StateFields(c), state.cpu()));
  archive.read("counters", counters);
  counters = counters.cpu();
  const int64_t* p = counters.data_ptr<int64_t>();
  *n = CheckpointCounters{p[0], p[1], p[2], p[3]};
  archive.read("driver", driver_t);
  if (driver != nullptr) {
    driver_t = driver_t.cpu();
    driver->assign(driver_t.data_ptr<double>(), driver_t.data_ptr<double>() + driver_t.numel());
  }
  return absl::OkStatus();
}

absl::Status OpenArchive(const std::string& path, const at::Device& device,
                         torch::serialize::InputArchive* archive) {
  if (!std::filesystem::exists(path)) {
    return absl::NotFoundError(absl::StrCat(path, ": no checkpoint to resume from"));
  }
  try {
    archive->load_from(path, device);
  } catch (const c10::Error& e) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": cannot read the checkpoint: ", e.what_without_backtrace()));
  }
  return absl::OkStatus();
}

absl::Status SaveArchive(torch::serialize::OutputArchive& archive, const std::string& path) {
  const std::string temp = path + ".tmp";
  try {
    archive.save_to(temp);
  } catch (const c10::Error& e) {
    std::error_code ignored;
    std::filesystem::remove(temp, ignored);
    return absl::InternalError(
        absl::StrCat(path, ": cannot write the checkpoint: ", e.what_without_backtrace()));
  }
  return base::CommitFile(temp, path);
}

void SaveBlocks(torch::serialize::OutputArchive& archive,
                const std::vector<std::shared_ptr<torch::nn::Module>>& blocks, size_t first) {
  for (size_t i = 0; i < blocks.size(); ++i) {
    torch::serialize::OutputArchive block;
    blocks[i]->save(block);
    archive.write(absl::StrCat("block.", first + i), block);
  }
}

absl::Status LoadBlocks(torch::serialize::InputArchive& archive, const std::string& path,
                        const std::vector<std::shared_ptr<torch::nn::Module>>& blocks,
                        size_t first) {
  for (size_t i = 0; i < blocks.size(); ++i) {
    std::vector<std::vector<int64_t>> shapes;
    for (const at::Tensor& p : blocks[i]->parameters()) shapes.push_back(p.sizes().vec());
    torch::serialize::InputArchive block;
    if (!archive.try_read(absl::StrCat("block.", first + i), block)) {
      return absl::FailedPreconditionError(
          absl::StrCat(path, ": the checkpoint has no block ", first + i));
    }
    blocks[i]->load(block);
    const std::vector<at::Tensor> after = blocks[i]->parameters();
    for (size_t j = 0; j < after.size(); ++j) {
      if (after[j].sizes().vec() != shapes[j]) {
        return absl::FailedPreconditionError(
            absl::StrCat(path, ": a parameter of block ", first + i,
                         " in the checkpoint does not match the model's shape"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Device> ResolveDevice(const RunConfig& c) {
  const bool cuda = torch::cuda::is_available();
  if (c.device == "cuda" && !cuda) {
    return absl::FailedPreconditionError(
        "device: cuda, but this build or machine has no usable GPU (use device=cpu or auto)");
  }
  const at::Device device = (c.device == "cuda" || (c.device == "auto" && cuda))
                                ? at::Device(at::kCUDA)
                                : at::Device(at::kCPU);
  if (c.bf16_autocast && !device.is_cuda()) {
    return absl::InvalidArgumentError(
        "optim.bf16_autocast: autocast is for CUDA; this run is on the CPU");
  }
  return device;
}

void AddModuleMemory(const torch::nn::Module& module, ClientMemory* m) {
  for (const at::Tensor& p : module.parameters()) {
    const int64_t bytes = p.numel() * static_cast<int64_t>(p.element_size());
    m->parameters += bytes;
    if (p.requires_grad()) {
      m->trainable += bytes;
      m->optimizer_state += 2 * bytes;
    }
  }
  for (const at::Tensor& b : module.buffers()) {
    m->parameters += b.numel() * static_cast<int64_t>(b.element_size());
  }
}

int64_t BoundaryChannels(const RunConfig& c, int index) {
  if (c.task == Task::kLanguageModel) return c.width;
  return index == 0 ? std::array<int64_t, 3>{32, 64, 128}[c.split_after - 1] : 128;
}

absl::StatusOr<SplitModel> BuildModel(const RunConfig& c, const std::string& init, bool for_resume,
                                      const at::Device& device) {
  if (c.lora_rank > 0 && init.empty() && !for_resume) {
    return absl::InvalidArgumentError(
        "lora.rank: a LoRA run fine-tunes a pretrained base; name its checkpoint with --init");
  }
  at::manual_seed(c.seed);
  const QuantLayerOptions quant_layers{c.weight_bits, c.input_bits, true};
  SplitModel model;
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
    if (!init.empty()) {
      torch::serialize::InputArchive archive;
      try {
        archive.load_from(init, at::kCPU);  // the model moves to its device below
      } catch (const c10::Error& e) {
        return absl::NotFoundError(absl::StrCat(
            "--init ", init, ": cannot read a checkpoint: ", e.what_without_backtrace()));
      }
      at::Tensor shape;
      if (!archive.try_read("shape", shape)) {
        return absl::FailedPreconditionError(absl::StrCat(init, ": not a splitq checkpoint"));
      }
      SPLITQ_RETURN_IF_ERROR(CheckFields(init, ShapeFields(c), shape));
      at::Tensor state;
      if (archive.try_read("state", state) && state.numel() > kStateLoraRank &&
          state.data_ptr<int64_t>()[kStateLoraRank] > 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            init,
            ": a LoRA run's checkpoint; --init takes a base model (its adapters would be lost)"));
      }
      SPLITQ_RETURN_IF_ERROR(LoadBlocks(archive, init, Blocks(model)));
    }
    if (c.lora_rank > 0) {
      ApplyLora(model, c.lora_targets, LoraOptions{c.lora_rank, c.lora_alpha});
    }
    for (auto* part : {&model.client, &model.server, &model.head}) (*part)->to(device);
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(e.what_without_backtrace());
  }
  return model;
}

}  // namespace splitq::trainer::internal

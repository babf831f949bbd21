#include "trainer/boundary.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"

namespace splitq::trainer::internal {
namespace {

constexpr uint32_t kRawMagic = 0x31525153;  // "SQR1" read as little-endian u32

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

absl::Status DeltaCache::Admit(const at::Tensor& ids, int64_t sample_bytes,
                               int64_t max_bytes) const {
  const at::Tensor id = ids.cpu().contiguous();
  const int64_t* p = id.data_ptr<int64_t>();
  std::unordered_set<int64_t> fresh;
  for (int64_t b = 0; b < id.numel(); ++b) {
    if (m_.count(p[b]) == 0) fresh.insert(p[b]);
  }
  const int64_t after = static_cast<int64_t>(m_.size() + fresh.size()) * sample_bytes;
  if (after > max_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the AQ-SGD cache would hold ", m_.size() + fresh.size(), " samples (",
                     after >> 20, " MiB), above server.aqsgd_max_cache_mib (", max_bytes >> 20,
                     " MiB): more distinct sample ids than this side takes"));
  }
  return absl::OkStatus();
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

uint64_t RotationSeed(const RunConfig& c, int index) {
  return (c.seed ^ 0x726f746174696f6eull) + static_cast<uint64_t>(index);  // "rotation"
}

namespace {
bool TokenFrames(const RunConfig& c) {
  return c.activations.granularity == kernels::Granularity::kToken &&
         c.activations.mode != WireMode::kFloat32;
}
}  // namespace

BoundarySender::BoundarySender(const RunConfig& c, int index, int axis, int64_t channels,
                               quant::AmaqBoundary shared)
    : c_(c),
      axis_(axis),
      token_(TokenFrames(c)),
      rotation_(
          c.activations.mode == WireMode::kFloat32
              ? quant::ChannelRotation()
              : quant::ChannelRotation(channels, c.activations.rotation, RotationSeed(c, index))),
      amaq_(shared ? std::move(shared) : quant::AmaqBoundary(AmaqOptionsOf(c, axis), channels)),
      act_(1, quant::FrameKind::kActivation,
           quant::WireEncoderOptions{token_ ? 0 : axis, kernels::Rounding::kNearest,
                                     c.seed + static_cast<uint64_t>(index), c.activations.coded}),
      eval_(1, quant::FrameKind::kActivation,
            quant::WireEncoderOptions{token_ ? 0 : axis, kernels::Rounding::kNearest, c.seed,
                                      c.activations.coded}) {
  // A budget in bytes prices every channel from the start: a unit price (nominal bits) until
  // the first coded frame is measured, so that a coded target below bits.min is met as well
  // as it can be rather than refused by the nominal projection.
  if (Priced() && amaq_->code_price().empty()) {
    amaq_->set_code_price(std::vector<float>(static_cast<size_t>(channels), 1.0f));
  }
}

bool BoundarySender::Priced() const {
  return c_.activations.budget_in_bytes && c_.activations.mode == WireMode::kAmaq;
}

absl::StatusOr<BoundarySender::Sent> BoundarySender::Send(const at::Tensor& unrotated, int64_t step,
                                                          const at::Tensor& ids, bool train) {
  if (c_.activations.mode == WireMode::kFloat32) {
    return Sent{unrotated, EncodeRawTensor(unrotated), 32.0, {}, {}};
  }
  const at::Tensor h = rotation_.Forward(unrotated, axis_);
  const double budget = c_.activations.target.TargetAt(step);
  Sent out;
  std::vector<uint8_t> bits;
  at::Tensor scales, offsets, payload = h.detach();
  at::Tensor base;  // AQ-SGD: this side's m_i
  if (c_.activations.mode == WireMode::kAmaq) {
    // The price measured on the previous training frame applies from this one on (not from
    // the recomputations of that frame's micro-batches, which must see the bits it was sent
    // with).
    if (train && !pending_price_.empty()) {
      amaq_->set_code_price(std::move(pending_price_));
      pending_price_.clear();
    }
    if (train && step < c_.activations.calibration_steps) Calibrate(h);
    out.sender_side = train ? amaq_->forward(h, budget) : amaq_->forward(h.detach(), budget);
    bits = amaq_->last_bits();
    scales = amaq_->wire_scales();
    offsets = amaq_->wire_offsets();
  } else {
    out.sender_side = h;  // straight-through: min-max ranges clip nothing
    if (c_.activations.mode == WireMode::kAqSgd && train) {
      base = cache_.Gather(ids, payload);
      payload = payload.to(at::kFloat) - base;
    }
    // Token frames: [B*T, C], a group per token.
    if (token_) payload = payload.reshape({-1, payload.size(-1)});
    const int group_axis = token_ ? 0 : axis_;
    bits.assign(
        static_cast<size_t>(payload.size(group_axis)),
        static_cast<uint8_t>(ScheduleBits(c_.activations.target, c_.activations.bits, step)));
    const quant::WireRange range = quant::MinMaxRange(payload, group_axis, bits);
    scales = range.scales;
    offsets = range.offsets;
  }
  out.bits = std::accumulate(bits.begin(), bits.end(), 0.0) / static_cast<double>(bits.size());
  // A budget in coded bits is checked after coding (an estimate until then).
  const bool priced = Priced();
  if (!priced && out.bits > budget + 1e-9) {
    return absl::InternalError(
        absl::StrCat("a frame of ", out.bits, " bits exceeds the budget ", budget));
  }
  if (train && !priced) max_excess_ = std::max(max_excess_, out.bits - budget);
  // Validation frames all carry their bit map: a receiver may see any one of them first.
  if (!train) eval_.ResendBitMap();
  quant::WireEncoder& encoder = train ? act_ : eval_;
  SPLITQ_ASSIGN_OR_RETURN(quant::Frame frame, encoder.Encode(payload, static_cast<uint64_t>(step),
                                                             bits, scales, offsets));
  out.bytes = quant::SerializeFrame(frame);
  if (train && priced) {
    const double coded = UpdateCodePrice(encoder.last_entropy(), bits);
    max_excess_ = std::max(max_excess_, coded - budget);
  }
  if (train && measure_) {
    if (c_.activations.coded) {
      out.entropy = encoder.last_entropy();  // the coder measured it (coded or not)
    } else {
      SPLITQ_ASSIGN_OR_RETURN(out.entropy, quant::MeasureCodeEntropy(frame, bits));
    }
  }
  out.bit_map = std::move(bits);
  if (base.defined()) {
    // The sender applies its own frame to its cache, decoded as the receiver decodes it.
    SPLITQ_ASSIGN_OR_RETURN(at::Tensor delta, self_decoder_.Decode(frame, h.device()));
    cache_.Update(ids, base + delta.view(base.sizes()));
  }
  return out;
}

double BoundarySender::UpdateCodePrice(const quant::CodeEntropy& e,
                                       const std::vector<uint8_t>& bits) {
  const size_t channels = bits.size();
  if (e.elements <= 0 || e.group_bits.size() != channels || channels == 0) return 0;
  const double per_channel = static_cast<double>(e.elements) / static_cast<double>(channels);
  std::vector<float> price = amaq_->code_price();
  const bool first = !measured_price_ || price.size() != channels;
  if (price.size() != channels) price.assign(channels, 1.0f);
  measured_price_ = true;
  double total = 0;
  for (size_t c = 0; c < channels; ++c) {
    total += e.group_bits[c];
    const double measured = e.group_bits[c] / (per_channel * std::max<int>(1, bits[c]));
    price[c] = static_cast<float>(first ? measured
                                        : kPriceMemory * price[c] + (1 - kPriceMemory) * measured);
  }
  pending_price_ = std::move(price);  // from the next training frame on (Send)
  return total / static_cast<double>(e.elements);
}

at::Tensor BoundarySender::SenderSide(const at::Tensor& unrotated, int64_t step) {
  const at::Tensor h = rotation_.Forward(unrotated, axis_);
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
  SPLITQ_ASSIGN_OR_RETURN(at::Tensor g, grad_decoder_.Decode(frame, device));
  if (measure_ && g.numel() > 0) {  // (an empty frame may carry no map: nothing to measure)
    SPLITQ_ASSIGN_OR_RETURN(
        gradient_entropy_,
        quant::MeasureCodeEntropy(frame, grad_decoder_.bits(), grad_decoder_.packed()));
  }
  return g;
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

absl::StatusOr<at::Tensor> TokensToSamples(const at::Tensor& tokens,
                                           const std::vector<int64_t>& sample_shape) {
  if (sample_shape.size() < 2) {
    return absl::InternalError("token frames need the receiver to know the sample shape");
  }
  int64_t per_sample = 1;
  for (size_t i = 0; i + 1 < sample_shape.size(); ++i) per_sample *= sample_shape[i];
  if (tokens.dim() != 2 || tokens.size(1) != sample_shape.back() ||
      tokens.size(0) % per_sample != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("a token frame of [", absl::StrJoin(tokens.sizes().vec(), ", "),
                     "]: expected [B*", per_sample, ", ", sample_shape.back(), "]"));
  }
  std::vector<int64_t> shape{tokens.size(0) / per_sample};
  shape.insert(shape.end(), sample_shape.begin(), sample_shape.end());
  return tokens.view(shape);
}

BoundaryReceiver::BoundaryReceiver(const RunConfig& c, int index, int axis,
                                   const quant::FrameLimits& limits, bool require_finite,
                                   std::vector<int64_t> sample_shape)
    : c_(c),
      axis_(axis),
      index_(index),
      limits_(limits),
      require_finite_(require_finite),
      sample_shape_(std::move(sample_shape)),
      act_(limits),
      eval_(limits),
      grad_(
          1, quant::FrameKind::kGradient,
          quant::WireEncoderOptions{axis, c.gradients.rounding,
                                    (c.seed ^ 0x9e3779b97f4a7c15ull) + static_cast<uint64_t>(index),
                                    c.gradients.coded}) {}

const quant::ChannelRotation& BoundaryReceiver::Rotation(int64_t channels) {
  if (c_.activations.rotation != 0 && c_.activations.mode != WireMode::kFloat32 &&
      rotation_.channels() != channels) {
    rotation_ = quant::ChannelRotation(channels, c_.activations.rotation, RotationSeed(c_, index_));
  }
  return rotation_;
}

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
  quant::WireDecoder& decoder = train ? act_ : eval_;
  SPLITQ_ASSIGN_OR_RETURN(at::Tensor received, decoder.Decode(frame, device));
  if (train && measure_ && received.numel() > 0) {
    SPLITQ_ASSIGN_OR_RETURN(received_entropy_,
                            quant::MeasureCodeEntropy(frame, decoder.bits(), decoder.packed()));
  }
  if (TokenFrames(c_)) {  // [B*T, C] back to [B, T, C]
    SPLITQ_ASSIGN_OR_RETURN(received, TokensToSamples(received, sample_shape_));
  }
  if (c_.activations.mode == WireMode::kAqSgd && train) {
    if (ids.numel() != received.size(0)) {
      return absl::InvalidArgumentError(
          absl::StrCat(ids.numel(), " sample ids for a batch of ", received.size(0)));
    }
    // A worker's session (network input) holds at most server.aqsgd_max_cache_mib.
    if (require_finite_ && received.size(0) > 0) {
      SPLITQ_RETURN_IF_ERROR(cache_.Admit(ids, 2 * (received.numel() / received.size(0)),
                                          c_.aqsgd_max_cache_mib << 20));
    }
    received = cache_.Gather(ids, received) + received;
    cache_.Update(ids, received);
  }
  if (received.dim() > axis_) received = Rotation(received.size(axis_)).Inverse(received, axis_);
  return received.to(dtype);
}

absl::StatusOr<std::pair<std::string, double>> BoundaryReceiver::SendGradient(
    const at::Tensor& unrotated, int64_t step) {
  // In the basis the sender quantized in (dL/dy = R dL/dx for y = R x).
  const at::Tensor grad = unrotated.dim() > axis_
                              ? Rotation(unrotated.size(axis_)).Forward(unrotated, axis_)
                              : unrotated;
  if (c_.gradients.mode == WireMode::kFloat32) return std::make_pair(EncodeRawTensor(grad), 32.0);
  const int bits = ScheduleBits(c_.gradients.target, c_.gradients.bits, step);
  const std::vector<uint8_t> gbits(static_cast<size_t>(grad.size(axis_)),
                                   static_cast<uint8_t>(bits));
  const quant::WireRange range = quant::MaxAbsRange(grad, axis_, gbits);
  SPLITQ_ASSIGN_OR_RETURN(quant::Frame frame, grad_.Encode(grad, static_cast<uint64_t>(step), gbits,
                                                           range.scales, range.offsets));
  if (measure_) {
    if (c_.gradients.coded) {
      sent_entropy_ = grad_.last_entropy();
    } else {
      SPLITQ_ASSIGN_OR_RETURN(sent_entropy_, quant::MeasureCodeEntropy(frame, gbits));
    }
  }
  return std::make_pair(quant::SerializeFrame(frame), static_cast<double>(bits));
}

}  // namespace splitq::trainer::internal

#include "quant/amaq_boundary.h"

#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace splitq::quant {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr double kMinRange = 1e-6;
// b starts this far below bmax, so that it rounds to bmax with the sigmoid not saturated.
constexpr double kInitBitsBelowMax = 0.25;

struct AmaqParams {
  at::Tensor levels;  // 2^k - 1, float32 [C]
  at::Tensor scale;   // 2 r / levels
  at::Tensor offset;  // m - r
};

AmaqParams ParamsFor(const at::Tensor& range, const at::Tensor& center, const at::Tensor& bits) {
  AmaqParams p;
  p.levels = at::exp2(bits.to(at::kFloat)) - 1.0;
  p.scale = (range * 2.0 / p.levels).contiguous();
  p.offset = (center - range).contiguous();
  return p;
}

QuantTensors QuantTensorsFor(const AmaqParams& p, const at::Tensor& bits) {
  QuantTensors q;
  q.scale = p.scale;
  q.offset = p.offset;
  q.bits = bits;
  q.is_signed = false;
  return q;
}

struct AmaqFunction : public torch::autograd::Function<AmaqFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& range,
                            const at::Tensor& center, const at::Tensor& continuous_bits,
                            const at::Tensor& bits, int64_t axis) {
    const AmaqParams p = ParamsFor(range, center, bits);
    ctx->save_for_backward({x, range, center, bits});
    ctx->saved_data["axis"] = axis;
    return FakeQuantize(x, Grouping{kernels::Granularity::kChannel, static_cast<int>(axis)},
                        QuantTensorsFor(p, bits));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& range = saved[1];
    const at::Tensor& center = saved[2];
    const at::Tensor& bits = saved[3];
    const Grouping grouping{kernels::Granularity::kChannel,
                            static_cast<int>(ctx->saved_data["axis"].toInt())};
    const AmaqParams p = ParamsFor(range, center, bits);
    const LsqGradSums sums = LsqBackward(x, grads[0], grouping, QuantTensorsFor(p, bits));
    const double n = static_cast<double>(LayoutOf(x, grouping).per_group());
    const at::Tensor g = (p.levels * n).rsqrt();
    const at::Tensor grad_range = g * (sums.grad_scale_sum * 2.0 / p.levels - sums.grad_offset_sum);
    const at::Tensor ds_db = -2.0 * std::log(2.0) * range * (p.levels + 1.0) / p.levels.square();
    const at::Tensor grad_bits = g * sums.grad_scale_sum * ds_db;
    const at::Tensor grad_center = g * sums.grad_offset_sum;
    return {sums.grad_x, grad_range, grad_center, grad_bits, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

absl::StatusOr<std::vector<uint8_t>> ProjectBits(const std::vector<float>& b, int bmin, int bmax,
                                                 double target_mean) {
  if (b.empty()) return absl::InvalidArgumentError("no channels to assign bits to");
  if (bmin < 1 || bmax > 8 || bmin > bmax) {
    return absl::InvalidArgumentError(absl::StrCat("bad bit bounds [", bmin, ", ", bmax, "]"));
  }
  if (!std::isfinite(target_mean)) {
    return absl::InvalidArgumentError(absl::StrCat("bit budget ", target_mean, " is not finite"));
  }
  if (target_mean < bmin) {
    return absl::InvalidArgumentError(
        absl::StrCat("bit budget ", target_mean, " is below the per-channel minimum ", bmin));
  }
  // Above bmax the budget cannot bind; clamping keeps the integer arithmetic below exact.
  target_mean = std::min<double>(target_mean, bmax);
  const int64_t channels = static_cast<int64_t>(b.size());
  std::vector<uint8_t> k(b.size());
  int64_t total = 0;
  for (size_t c = 0; c < b.size(); ++c) {
    const float rounded = std::nearbyint(std::isfinite(b[c]) ? b[c] : static_cast<float>(bmin));
    k[c] = static_cast<uint8_t>(std::clamp(static_cast<int>(rounded), bmin, bmax));
    total += k[c];
  }
  // Largest total allowed: floor(target * C), with no slack: the guarantee is strict.
  const int64_t allowed =
      static_cast<int64_t>(std::floor(target_mean * static_cast<double>(channels)));
  if (total <= allowed) return k;
  std::vector<int64_t> order(b.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return b[i] < b[j]; });
  int64_t excess = total - allowed;
  for (const int64_t c : order) {
    if (excess == 0) break;
    const int64_t give = std::min<int64_t>(excess, k[c] - bmin);
    k[c] = static_cast<uint8_t>(k[c] - give);
    excess -= give;
  }
  return k;
}

absl::StatusOr<std::vector<uint8_t>> ProjectPricedBits(const std::vector<float>& b, int bmin,
                                                       int bmax, double target_mean,
                                                       const std::vector<float>& price) {
  if (price.size() != b.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("a code price for ", price.size(), " channels, bits for ", b.size()));
  }
  for (const float p : price) {
    if (!std::isfinite(p) || p < 0) {
      return absl::InvalidArgumentError(absl::StrCat("code price ", p, " is not a finite >= 0"));
    }
  }
  if (!std::isfinite(target_mean) || target_mean <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("coded bit budget ", target_mean, " is not finite and positive"));
  }
  // The rounding and clamping of ProjectBits, with a budget that cannot bind.
  SPLITQ_ASSIGN_OR_RETURN(std::vector<uint8_t> k, ProjectBits(b, bmin, bmax, bmax));
  const double channels = static_cast<double>(b.size());
  double cost = 0;
  for (size_t c = 0; c < b.size(); ++c) cost += price[c] * k[c];
  const double allowed = target_mean * channels;
  if (cost <= allowed) return k;
  std::vector<int64_t> order(b.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return b[i] < b[j]; });
  for (const int64_t c : order) {
    if (price[c] <= 0) continue;  // its bits cost nothing on the wire
    while (cost > allowed && k[c] > bmin) {
      k[c] -= 1;
      cost -= price[c];
    }
    if (cost <= allowed) break;
  }
  return k;
}

AmaqBoundaryImpl::AmaqBoundaryImpl(const AmaqOptions& options, int64_t channels)
    : options_(options) {
  TORCH_CHECK(options.bmin >= 1 && options.bmax <= 8 && options.bmin <= options.bmax,
              "AMAQ bit bounds must satisfy 1 <= bmin <= bmax <= 8, got [", options.bmin, ", ",
              options.bmax, "]");
  TORCH_CHECK(options.alpha > 0, "AMAQ alpha must be > 0, got ", options.alpha);
  TORCH_CHECK(channels >= 1, "AMAQ needs at least one channel");
  double gate0 = 0.0;
  if (options.bmax > options.bmin) {
    const double span = options.bmax - options.bmin;
    const double p = std::clamp(1.0 - kInitBitsBelowMax / span, 0.5, 0.999);
    gate0 = std::log(p / (1.0 - p)) / options.alpha;
  }
  gate_ = register_parameter("gate", at::full({channels}, gate0));
  range_ = register_parameter("range", at::ones({channels}));
  center_ = register_parameter("center", at::zeros({channels}));
  initialized_ = register_buffer("initialized", at::zeros({}, at::kByte));
}

void AmaqBoundaryImpl::Initialize(const at::Tensor& x) {
  at::NoGradGuard no_grad;
  const kernels::GroupLayout layout =
      LayoutOf(x, Grouping{kernels::Granularity::kChannel, options_.channel_axis});
  const at::Tensor grouped =
      x.detach().to(at::kFloat).reshape({layout.outer, layout.groups, layout.inner});
  const at::Tensor lo = grouped.amin(at::IntArrayRef{0, 2});
  const at::Tensor hi = grouped.amax(at::IntArrayRef{0, 2});
  center_.copy_((hi + lo) * 0.5);
  range_.copy_(((hi - lo) * 0.5).clamp_min(kMinRange));
  initialized_.fill_(1);
}

at::Tensor AmaqBoundaryImpl::continuous_bits() const {
  return options_.bmin + (options_.bmax - options_.bmin) * at::sigmoid(options_.alpha * gate_);
}

bool AmaqBoundaryImpl::is_initialized() const {
  return known_initialized_ || initialized_.item<uint8_t>() != 0;
}

at::Tensor AmaqBoundaryImpl::forward(const at::Tensor& x, double target_bits) {
  const kernels::GroupLayout layout =
      LayoutOf(x, Grouping{kernels::Granularity::kChannel, options_.channel_axis});
  TORCH_CHECK(layout.groups == gate_.numel(), "AmaqBoundary has ", gate_.numel(),
              " channels, input has ", layout.groups, " on axis ", options_.channel_axis);
  if (!known_initialized_) {
    if (initialized_.item<uint8_t>() == 0) Initialize(x);
    known_initialized_ = true;
  }
  const at::Tensor b = continuous_bits();
  const at::Tensor b_host = b.detach().to(at::kCPU).contiguous();
  const float* bp = b_host.data_ptr<float>();
  std::vector<float> b_vector(bp, bp + b_host.numel());
  auto bits = price_.empty()
                  ? ProjectBits(b_vector, options_.bmin, options_.bmax, target_bits)
                  : ProjectPricedBits(b_vector, options_.bmin, options_.bmax, target_bits, price_);
  CheckOk(bits.status());
  last_bits_ = std::move(bits).value();
  last_bits_tensor_ =
      at::from_blob(last_bits_.data(), {static_cast<int64_t>(last_bits_.size())}, at::kByte)
          .to(gate_.device(), /*non_blocking=*/false, /*copy=*/true);
  last_per_channel_ = layout.per_group();
  return AmaqFunction::apply(x, range_.clamp_min(kMinRange), center_, b, last_bits_tensor_,
                             options_.channel_axis);
}

void AmaqBoundaryImpl::set_code_price(std::vector<float> price) {
  if (price.empty()) {
    price_.clear();
    price_tensor_ = at::Tensor();
    return;
  }
  TORCH_CHECK(static_cast<int64_t>(price.size()) == gate_.numel(), "a code price for ",
              price.size(), " channels, AmaqBoundary has ", gate_.numel());
  for (const float p : price) {
    TORCH_CHECK(std::isfinite(p) && p >= 0, "code price ", p, " is not a finite >= 0");
  }
  price_ = std::move(price);
  price_tensor_ = at::from_blob(price_.data(), {static_cast<int64_t>(price_.size())}, at::kFloat)
                      .to(gate_.device(), /*non_blocking=*/false, /*copy=*/true);
}

at::Tensor AmaqBoundaryImpl::wire_scales() const {
  TORCH_CHECK(last_bits_tensor_.defined(), "wire_scales() before the first forward()");
  at::NoGradGuard no_grad;
  return ParamsFor(range_.detach().clamp_min(kMinRange), center_.detach(), last_bits_tensor_).scale;
}

at::Tensor AmaqBoundaryImpl::wire_offsets() const {
  TORCH_CHECK(last_bits_tensor_.defined(), "wire_offsets() before the first forward()");
  at::NoGradGuard no_grad;
  return ParamsFor(range_.detach().clamp_min(kMinRange), center_.detach(), last_bits_tensor_)
      .offset;
}

at::Tensor BitRegularization(const std::vector<AmaqBoundary>& boundaries, double beta,
                             double lambda, double target_bits) {
  TORCH_CHECK(!boundaries.empty(), "BitRegularization needs at least one boundary");
  std::vector<at::Tensor> gate_terms;
  at::Tensor weighted_bits;
  double weight_total = 0.0;
  int64_t channels_total = 0;
  for (const AmaqBoundary& boundary : boundaries) {
    const AmaqOptions& o = boundary->options();
    gate_terms.push_back(at::sigmoid(o.alpha * boundary->gate()).square().sum());
    channels_total += boundary->gate().numel();
    const double weight =
        static_cast<double>(std::max<int64_t>(1, boundary->last_elements_per_channel()));
    const at::Tensor price = boundary->code_price_tensor();
    const at::Tensor b = boundary->continuous_bits();
    const at::Tensor term = (price.defined() ? (b * price).sum() : b.sum()) * weight;
    weighted_bits = weighted_bits.defined() ? weighted_bits + term : term;
    weight_total += weight * static_cast<double>(boundary->gate().numel());
  }
  const at::Tensor gate_mean = at::stack(gate_terms).sum() / static_cast<double>(channels_total);
  const at::Tensor mean_bits = weighted_bits / weight_total;
  return beta * gate_mean + lambda * at::relu(mean_bits - target_bits).square();
}

}  // namespace splitq::quant

// splitq quant: AmaqBoundary, the adaptive mixed-bit quantizer at a split boundary
// (AMAQ, design.md "Quantizers").
//
// Per channel c of the boundary tensor:
//   gate Q_c (learned)        b_c = bmin + (bmax - bmin) * sigmoid(alpha * Q_c)
//   range [m_c - r_c, m_c + r_c] (centre m_c and half-width r_c learned)
//   k_c = round(b_c), then the budget projection below
//   step                      s_c = 2 r_c / (2^k_c - 1),  offset beta_c = m_c - r_c
//   x_hat = clamp(rint((x - beta_c) / s_c), 0, 2^k_c - 1) * s_c + beta_c
// Backward (fused kernel, kernels/lsq_backward.h): straight-through for x inside the range;
// the range gets d/dr = g * (dL/ds * 2 / (2^k - 1) - dL/dbeta), the centre d/dm = g * dL/dbeta
// (asymmetric ranges: after a ReLU every level lands on [0, max]); the continuous bit width
// gets d/db = g * dL/ds * ds/db with ds/db = -2 r ln2 2^k / (2^k - 1)^2 (the straight-through
// estimate: b enters only through the step, evaluated at the integer k), and the gate gets
// that through the sigmoid by autograd. g = 1 / sqrt(n * (2^k - 1)) is the LSQ gradient
// scale, n the elements per channel.
//
// Budget projection (a hard guarantee): after rounding, while the mean of k over the
// channels exceeds the target B*(t), the channel with the lowest b_c that is still above
// bmin gives up one bit. So a frame's mean bit width never exceeds the target.
//
// Initialisation: Q so that b = bmax - 0.25 (rounds to bmax); [m_c - r_c, m_c + r_c] = the
// min and max of x_c over the first batch (no clipping at the start).
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "quant/tensor_ops.h"

namespace splitq::quant {

struct AmaqOptions {
  int bmin = 2;          // lowest bit width a channel can get (1..8)
  int bmax = 8;          // highest bit width (bmin..8)
  double alpha = 2.0;    // gate slope
  int channel_axis = 1;  // axis of the boundary tensor that holds the channels
};

// The budget projection: k = clamp(round(b), bmin, bmax), then bits are removed from the
// lowest-b channels (ties: lower index first) until mean(k) <= target_mean.
// INVALID_ARGUMENT when target_mean is not finite, target_mean < bmin (no assignment can
// meet it), or b is empty. A target above bmax does not bind.
absl::StatusOr<std::vector<uint8_t>> ProjectBits(const std::vector<float>& b, int bmin, int bmax,
                                                 double target_mean);

// The projection for a budget in coded bits: k = clamp(round(b), bmin, bmax), then bits are
// removed from the lowest-b channels (ties: lower index first) among those with a price above
// zero, until mean_c(price_c * k_c) <= target_mean or all of them are at bmin (the budget is
// then out of reach and the result goes over it: an estimate, unlike ProjectBits' guarantee).
// price_c: the wire bits per element one nominal bit of channel c costs (the coder's, as last
// measured). INVALID_ARGUMENT for empty b, a target that is not finite and positive, or a
// price of another length, negative or not finite.
absl::StatusOr<std::vector<uint8_t>> ProjectPricedBits(const std::vector<float>& b, int bmin,
                                                       int bmax, double target_mean,
                                                       const std::vector<float>& price);

class AmaqBoundaryImpl : public torch::nn::Module {
 public:
  AmaqBoundaryImpl(const AmaqOptions& options, int64_t channels);

  // Fake-quantizes x with bits chosen under `target_bits` (the schedule's B*(t)); the
  // chosen bits, steps and offsets are kept for the wire (last_bits(), wire_scales(), ...).
  // Throws c10::Error (an op body) when the channel count does not match or ProjectBits
  // refuses the target (not finite, or below bmin).
  at::Tensor forward(const at::Tensor& x, double target_bits);

  // b_c, with autograd to the gates.
  at::Tensor continuous_bits() const;
  // The integer bits of the last forward, one per channel.
  const std::vector<uint8_t>& last_bits() const { return last_bits_; }
  // Elements per channel in the last forward (the weight of this boundary in B-bar).
  int64_t last_elements_per_channel() const { return last_per_channel_; }
  // Step and offset per channel for the last forward's bits (float32 [C], no autograd):
  // what a wire frame carries so that decoding gives exactly forward()'s output.
  at::Tensor wire_scales() const;
  at::Tensor wire_offsets() const;

  // A budget in coded bits (quant.activations.budget: bytes): price_c, the wire bits per
  // element one nominal bit of channel c costs, as last measured (BoundarySender sets it from
  // each coded training frame). With a price, forward() projects with ProjectPricedBits and
  // BitRegularization's B-bar is the element-weighted mean of price_c * b_c. Empty (the
  // default, and after a restart until the first frame is measured): nominal bits. Throws
  // c10::Error for a price of another length, negative or not finite.
  void set_code_price(std::vector<float> price);
  const std::vector<float>& code_price() const { return price_; }
  at::Tensor code_price_tensor() const { return price_tensor_; }  // [C], undefined when empty

  // Whether the ranges were set from a first batch (or restored from a checkpoint).
  bool is_initialized() const;
  const AmaqOptions& options() const { return options_; }
  at::Tensor gate() const { return gate_; }
  at::Tensor range() const { return range_; }    // half-widths r [C]
  at::Tensor center() const { return center_; }  // centres m [C]

 private:
  void Initialize(const at::Tensor& x);

  AmaqOptions options_;
  at::Tensor gate_;         // parameter [C]
  at::Tensor range_;        // parameter [C], > 0
  at::Tensor center_;       // parameter [C]
  at::Tensor initialized_;  // buffer, scalar uint8
  bool known_initialized_ = false;
  std::vector<uint8_t> last_bits_;
  at::Tensor last_bits_tensor_;  // uint8 [C] on the parameters' device
  int64_t last_per_channel_ = 0;
  std::vector<float> price_;  // code_price()
  at::Tensor price_tensor_;   // float32 [C] on the parameters' device
};
TORCH_MODULE(AmaqBoundary);

// The bit regularisation of design.md over a set of boundaries:
//   beta * mean_c sigmoid(alpha Q_c)^2 + lambda * relu(Bbar - target)^2,
// Bbar the element-weighted mean of b over all boundaries (weights from each boundary's
// last forward), of price_c * b_c for a boundary with a code price (a budget in coded bits).
// Boundaries that have not run forward yet count with weight 1 per channel.
at::Tensor BitRegularization(const std::vector<AmaqBoundary>& boundaries, double beta,
                             double lambda, double target_bits);

}  // namespace splitq::quant

// splitq quant: WireEncoder / WireDecoder, boundary tensors to frames and back (torch side
// of quant/wire_format.h).
//
// One encoder and one decoder per session and direction. The encoder bumps the bit-map
// version and ships the map only when it changes; the decoder keeps the map of the last frame
// that carried one and decoded (of any version, older ones included: the sender's order is
// the session's order); a frame without a map, or with zero groups, leaves it. Decoding validates
// the whole frame (ValidateFrame) before it allocates the output, and a rejected frame leaves the
// decoder's state as it was, so the session goes on. If a frame that carried a new map was lost or
// rejected, the receiver answers the next frames with FAILED_PRECONDITION; the sender then calls
// ResendBitMap() and the next frame carries the map again.
//
// Memory: a valid frame decodes to numel * dtype-size bytes, up to 32x its payload (1-bit
// codes to float32); FrameLimits::max_elements bounds that before anything is allocated. CPU
// tensors are packed and unpacked by the CPU kernels straight into/out of the frame; CUDA tensors
// by the CUDA kernels, with one copy of the packed bytes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "quant/tensor_ops.h"
#include "quant/wire_format.h"

namespace splitq::quant {

struct WireEncoderOptions {
  int32_t group_axis = 1;  // axis with one bit width / scale / offset per entry; -1: one group
  kernels::Rounding rounding = kernels::Rounding::kNearest;  // stochastic for gradients
  uint64_t seed = 0;            // Philox seed for stochastic rounding (the step is the other key)
  bool entropy_coding = false;  // entropy-code the payload when that makes it smaller
};

class WireEncoder {
 public:
  WireEncoder(uint64_t session_id, FrameKind kind, const WireEncoderOptions& options);

  // Encodes x (float32/bfloat16/float16, any device) with per-group `bits` and float32
  // `scales` / `offsets` ([groups], any device). Returns a sealed frame.
  // INVALID_ARGUMENT (checked before any work, on every device): rank above 8, group_axis
  // outside -1..rank-1, another dtype, a bits/scales/offsets length that does not match
  // the groups, bits outside 1..8, a non-finite or non-positive scale, a non-finite offset.
  // INTERNAL: a device or allocation failure. A failed encode leaves the bit-map state as
  // it was.
  absl::StatusOr<Frame> Encode(const at::Tensor& x, uint64_t step, const std::vector<uint8_t>& bits,
                               const at::Tensor& scales, const at::Tensor& offsets);

  // The next frame carries the bit map even if it did not change (after the receiver
  // reported FAILED_PRECONDITION: it never got the current map).
  void ResendBitMap();

  uint32_t bitmap_version() const { return version_; }
  // With entropy_coding: the order-0 entropy of the last frame's codes (the coder measures it).
  const CodeEntropy& last_entropy() const { return entropy_; }

 private:
  CodeEntropy entropy_;
  uint64_t session_id_;
  FrameKind kind_;
  WireEncoderOptions options_;
  uint32_t version_ = 0;
  bool resend_bits_ = false;
  std::vector<uint8_t> last_bits_;
};

class WireDecoder {
 public:
  explicit WireDecoder(const FrameLimits& limits = {});

  // Validates `frame` and decodes it to a tensor of frame.shape / frame.dtype on `device`.
  // Status codes as ValidateFrame, plus INTERNAL for a device or allocation failure.
  absl::StatusOr<at::Tensor> Decode(const Frame& frame, const at::Device& device = at::kCPU);
  // The bit map the last successful Decode used (empty before one).
  const std::vector<uint8_t>& bits() const { return bits_; }
  // The packed payload of the last successful Decode when its frame was entropy-coded
  // (nullptr otherwise): for MeasureCodeEntropy, so the frame is not decoded twice.
  const std::vector<uint8_t>* packed() const { return coded_ ? &packed_ : nullptr; }

 private:
  bool coded_ = false;
  std::vector<uint8_t> packed_;
  FrameLimits limits_;
  bool has_bits_ = false;
  uint32_t version_ = 0;
  std::vector<uint8_t> bits_;
};

// Per-group ranges for the wire when the sender has no learned range.
struct WireRange {
  at::Tensor scales;   // float32 [groups], > 0
  at::Tensor offsets;  // float32 [groups]
};
// Asymmetric min-max: offset = min, scale = (max - min) / (2^k - 1).
WireRange MinMaxRange(const at::Tensor& x, int32_t group_axis, const std::vector<uint8_t>& bits);
// Symmetric max-abs (gradients, design.md): offset = -m, scale = 2 m / (2^k - 1).
WireRange MaxAbsRange(const at::Tensor& x, int32_t group_axis, const std::vector<uint8_t>& bits);

}  // namespace splitq::quant

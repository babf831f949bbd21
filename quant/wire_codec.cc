#include "quant/wire_codec.h"

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "quant/torch_status.h"

namespace splitq::quant {
namespace {

// Smallest step the wire carries: a constant channel still gets a valid (positive) scale.
constexpr double kMinWireScale = 1e-30;

Grouping GroupingFor(int32_t group_axis) {
  return group_axis < 0 ? Grouping{kernels::Granularity::kTensor, 0}
                        : Grouping{kernels::Granularity::kChannel, group_axis};
}

std::vector<float> HostFloats(const at::Tensor& t) {
  const at::Tensor h = t.detach().to(at::kCPU, at::kFloat).contiguous();
  return std::vector<float>(h.data_ptr<float>(), h.data_ptr<float>() + h.numel());
}

// CPU float32 fast path of the reductions below: one pass over x, no temporaries. Fills
// lo/hi (or, with max_abs, hi = max |x|) per group; a NaN in a group makes its results NaN,
// as at::amin/amax do.
bool GroupMinMaxCpu(const at::Tensor& x, int32_t group_axis, bool max_abs, at::Tensor* lo,
                    at::Tensor* hi) {
  if (!x.device().is_cpu() || x.scalar_type() != at::kFloat || !x.is_contiguous()) return false;
  const kernels::GroupLayout layout = LayoutOf(x, GroupingFor(group_axis));
  if (layout.per_group() == 0) return false;
  *lo = at::full({layout.groups}, std::numeric_limits<float>::infinity(), at::kFloat);
  *hi = at::full({layout.groups}, -std::numeric_limits<float>::infinity(), at::kFloat);
  float* l = lo->data_ptr<float>();
  float* h = hi->data_ptr<float>();
  std::vector<uint8_t> nan(static_cast<size_t>(layout.groups), 0);
  const float* p = x.data_ptr<float>();
  for (int64_t o = 0; o < layout.outer; ++o) {
    for (int64_t g = 0; g < layout.groups; ++g) {
      const float* row = p + (o * layout.groups + g) * layout.inner;
      float rl = l[g], rh = h[g];
      bool bad = false;
      for (int64_t i = 0; i < layout.inner; ++i) {
        const float v = max_abs ? std::fabs(row[i]) : row[i];
        bad |= std::isnan(v);
        rl = v < rl ? v : rl;
        rh = v > rh ? v : rh;
      }
      l[g] = rl;
      h[g] = rh;
      nan[static_cast<size_t>(g)] |= bad;
    }
  }
  for (int64_t g = 0; g < layout.groups; ++g) {
    if (nan[static_cast<size_t>(g)]) l[g] = h[g] = std::numeric_limits<float>::quiet_NaN();
  }
  return true;
}

// Per-group reduction of x to [groups] float32.
at::Tensor GroupReduce(const at::Tensor& x, int32_t group_axis, bool max_abs, bool want_min) {
  const kernels::GroupLayout layout = LayoutOf(x, GroupingFor(group_axis));
  const at::Tensor v =
      x.detach().to(at::kFloat).reshape({layout.outer, layout.groups, layout.inner});
  if (max_abs) return v.abs().amax(at::IntArrayRef{0, 2});
  return want_min ? v.amin(at::IntArrayRef{0, 2}) : v.amax(at::IntArrayRef{0, 2});
}

at::Tensor Levels(const std::vector<uint8_t>& bits, const at::Device& device) {
  at::Tensor b = at::empty({static_cast<int64_t>(bits.size())}, at::kFloat);
  for (size_t i = 0; i < bits.size(); ++i)
    b.data_ptr<float>()[i] = std::ldexp(1.0f, bits[i]) - 1.0f;
  return b.to(device);
}

}  // namespace

WireEncoder::WireEncoder(uint64_t session_id, FrameKind kind, const WireEncoderOptions& options)
    : session_id_(session_id), kind_(kind), options_(options) {}

absl::StatusOr<Frame> WireEncoder::Encode(const at::Tensor& x_in, uint64_t step,
                                          const std::vector<uint8_t>& bits,
                                          const at::Tensor& scales, const at::Tensor& offsets) {
  Frame frame;
  // Arguments are checked inside: what torch can still throw is a device or allocation failure.
  SPLITQ_RETURN_IF_ERROR(TorchCall("", [&]() -> absl::Status {
    const at::Tensor x = x_in.detach().contiguous();
    const std::vector<float> host_scales = HostFloats(scales);
    const std::vector<float> host_offsets = HostFloats(offsets);
    if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16 &&
        x.scalar_type() != at::kHalf) {
      return absl::InvalidArgumentError("only float32, bfloat16 and float16 tensors are encoded");
    }
    // Checked before any work on every device, so a failed encode changes nothing.
    SPLITQ_RETURN_IF_ERROR(ValidateEncodeArguments(x.sizes().vec(), options_.group_axis, bits,
                                                   host_scales, host_offsets)
                               .status());
    const kernels::RoundingSpec rounding{options_.rounding, options_.seed, step};
    if (x.is_cpu()) {
      SPLITQ_ASSIGN_OR_RETURN(
          frame, EncodeFrame(x.data_ptr(), ToKernelDType(x.scalar_type()), x.sizes().vec(),
                             options_.group_axis, bits, host_scales, host_offsets, rounding));
    } else {
      QuantTensors q;
      q.scale = scales.detach().to(x.device(), at::kFloat).contiguous();
      q.offset = offsets.detach().to(x.device(), at::kFloat).contiguous();
      const at::Tensor packed =
          QuantizePack(x, GroupingFor(options_.group_axis), q, bits, rounding).to(at::kCPU);
      frame.dtype = ToKernelDType(x.scalar_type());
      frame.shape = x.sizes().vec();
      frame.group_axis = options_.group_axis;
      frame.bits = bits;
      frame.scales = host_scales;
      frame.offsets = host_offsets;
      frame.payload.assign(packed.data_ptr<uint8_t>(), packed.data_ptr<uint8_t>() + packed.numel());
    }
    return absl::OkStatus();
  }));
  if (options_.entropy_coding) {
    SPLITQ_ASSIGN_OR_RETURN(entropy_, EntropyCodeFrame(&frame, bits));
  }
  // Only a frame that was built moves the bit-map state on.
  if (bits != last_bits_ || version_ == 0) {
    ++version_;
    last_bits_ = bits;
    resend_bits_ = false;
  } else if (resend_bits_) {
    resend_bits_ = false;
  } else {
    frame.bits.clear();  // the receiver holds this version already
  }
  frame.session_id = session_id_;
  frame.step = step;
  frame.kind = kind_;
  frame.bitmap_version = version_;
  SealFrame(&frame);
  return frame;
}

void WireEncoder::ResendBitMap() { resend_bits_ = true; }

WireDecoder::WireDecoder(const FrameLimits& limits) : limits_(limits) {}

absl::StatusOr<at::Tensor> WireDecoder::Decode(const Frame& frame, const at::Device& device) {
  SPLITQ_ASSIGN_OR_RETURN(std::vector<uint8_t> bits,
                          ValidateFrame(frame, has_bits_ ? &bits_ : nullptr, version_, limits_));
  // A coded payload is decoded on the host (its structure checked) before anything else.
  std::vector<uint8_t> packed_bytes;
  if (frame.coded) {
    SPLITQ_ASSIGN_OR_RETURN(packed_bytes, UncodedPayload(frame, bits));
  }
  const std::vector<uint8_t>& plain = frame.coded ? packed_bytes : frame.payload;
  SPLITQ_ASSIGN_OR_RETURN(
      at::Tensor decoded, TorchCall("", [&]() -> absl::StatusOr<at::Tensor> {
        at::Tensor out;
        if (device.is_cpu()) {
          out = at::empty(frame.shape, at::TensorOptions().dtype(ToScalarType(frame.dtype)));
          SPLITQ_RETURN_IF_ERROR(DecodePayload(frame, bits, out.data_ptr(), {}, &plain));
        } else {
          const int64_t payload_bytes = static_cast<int64_t>(plain.size());
          const at::Tensor packed =
              at::from_blob(const_cast<uint8_t*>(plain.data()), {payload_bytes}, at::kByte)
                  .to(device);
          const auto groups = static_cast<int64_t>(frame.scales.size());
          QuantTensors q;
          q.scale = at::from_blob(const_cast<float*>(frame.scales.data()), {groups}, at::kFloat)
                        .to(device);
          q.offset = at::from_blob(const_cast<float*>(frame.offsets.data()), {groups}, at::kFloat)
                         .to(device);
          out = UnpackDequantize(packed, frame.shape, ToScalarType(frame.dtype),
                                 GroupingFor(frame.group_axis), q, bits);
        }
        // Only a frame that carried a map replaces the kept one; a frame without one (kept map,
        // or zero groups: an empty tensor) leaves it as it was.
        if (!frame.bits.empty()) {
          has_bits_ = true;
          version_ = frame.bitmap_version;
          bits_ = std::move(bits);
        }
        return out;
      }));
  coded_ = frame.coded;
  packed_ = std::move(packed_bytes);
  return decoded;
}

WireRange MinMaxRange(const at::Tensor& x, int32_t group_axis, const std::vector<uint8_t>& bits) {
  at::Tensor fast_lo, fast_hi;
  if (GroupMinMaxCpu(x.detach(), group_axis, false, &fast_lo, &fast_hi)) {
    return WireRange{((fast_hi - fast_lo) / Levels(bits, x.device())).clamp_min(kMinWireScale),
                     fast_lo};
  }
  const at::Tensor lo = GroupReduce(x, group_axis, /*max_abs=*/false, /*want_min=*/true);
  const at::Tensor hi = GroupReduce(x, group_axis, /*max_abs=*/false, /*want_min=*/false);
  return WireRange{((hi - lo) / Levels(bits, x.device())).clamp_min(kMinWireScale), lo};
}

WireRange MaxAbsRange(const at::Tensor& x, int32_t group_axis, const std::vector<uint8_t>& bits) {
  at::Tensor unused, fast;
  const at::Tensor m = GroupMinMaxCpu(x.detach(), group_axis, true, &unused, &fast)
                           ? fast
                           : GroupReduce(x, group_axis, /*max_abs=*/true, false);
  return WireRange{(m * 2.0 / Levels(bits, x.device())).clamp_min(kMinWireScale), -m};
}

}  // namespace splitq::quant

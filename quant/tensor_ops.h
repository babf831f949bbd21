// splitq quant: torch-facing wrappers over kernels/ (fake-quant, fused LSQ backward,
// mixed-bit pack and unpack).
//
// Each wrapper checks device, dtype and contiguity first (TORCH_CHECK: these are op
// bodies), dispatches on dtype once, and runs the kernel on the tensor's device: the CPU
// kernels for CPU tensors, the CUDA kernels on the current stream for CUDA tensors (when
// splitq and libtorch were both built with CUDA). Inputs of dtype float32, bfloat16 and
// float16 are supported; per-group parameters are float32 tensors of `groups` entries on
// the same device (bits: uint8). A kernel error surfaces as a c10::Error with the
// kernel's message.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "kernels/common.h"
#include "kernels/pack.h"

namespace splitq::quant {

// Which elements share quantizer parameters (kernels/common.h, GroupLayout).
struct Grouping {
  kernels::Granularity granularity = kernels::Granularity::kChannel;
  int axis = 1;  // channel axis (kChannel only); negative counts from the end
};

kernels::DType ToKernelDType(at::ScalarType type);
at::ScalarType ToScalarType(kernels::DType dtype);
kernels::GroupLayout LayoutOf(const at::Tensor& x, const Grouping& grouping);
// CPU context, or the current CUDA stream of x's device.
kernels::ExecContext ContextOf(const at::Tensor& x);
// Throws c10::Error carrying `status`'s message when it is not OK.
void CheckOk(const absl::Status& status);

// Quantizer parameters as tensors. Undefined tensors mean "absent" (offset 0, zero point
// 0, uniform bits).
struct QuantTensors {
  at::Tensor scale;       // [groups] float32
  at::Tensor offset;      // [groups] float32 or undefined
  at::Tensor zero_point;  // [groups] float32 (integer-valued) or undefined
  at::Tensor bits;        // [groups] uint8 or undefined
  int uniform_bits = 8;
  bool is_signed = false;
};

// x_hat = fake-quant(x); same shape, dtype and device as x.
at::Tensor FakeQuantize(const at::Tensor& x, const Grouping& grouping, const QuantTensors& q);

struct LsqGradSums {
  at::Tensor grad_x;           // like x
  at::Tensor grad_scale_sum;   // [groups] float32, sum of dy * dx_hat/ds
  at::Tensor grad_offset_sum;  // [groups] float32, sum of dy * dx_hat/dbeta
};
// The fused backward of kernels/lsq_backward.h (raw sums, no gradient scale applied).
LsqGradSums LsqBackward(const at::Tensor& x, const at::Tensor& grad_y, const Grouping& grouping,
                        const QuantTensors& q);

// Packs x with per-group `bits` (host vector, one entry per group; it also sets the byte
// layout) into a uint8 tensor on x's device. `q.bits` is ignored.
at::Tensor QuantizePack(const at::Tensor& x, const Grouping& grouping, const QuantTensors& q,
                        const std::vector<uint8_t>& bits, const kernels::RoundingSpec& rounding);

// Inverse of QuantizePack: a tensor of `shape` and `dtype` on packed's device.
at::Tensor UnpackDequantize(const at::Tensor& packed, at::IntArrayRef shape, at::ScalarType dtype,
                            const Grouping& grouping, const QuantTensors& q,
                            const std::vector<uint8_t>& bits);

}  // namespace splitq::quant

// splitq kernels: fake-quantization forward (quantize then dequantize, same dtype out).
//
// Implements the quantizer in common.h for every group layout (per tensor, per channel,
// per token), signed or unsigned codes, uniform or mixed per-group bit widths (1..8), for
// fp32, bf16 and fp16 tensors. CPU (OpenMP) and CUDA paths give the same codes; values
// agree to the rounding of the output dtype.
#pragma once

#include "kernels/common.h"

namespace splitq::kernels {

// y = x_hat(x) element-wise. `x` and `y` hold layout.numel() elements of `dtype` and may
// alias. Errors: a bad layout or bits value, a null pointer with numel > 0, CUDA requested
// in a build without CUDA kernels, or a CUDA launch failure (named with file:line).
absl::Status FakeQuantForward(const ExecContext& ctx, DType dtype, const GroupLayout& layout,
                              const QuantParams& params, const void* x, void* y);

}  // namespace splitq::kernels

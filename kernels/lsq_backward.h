// splitq kernels: fused backward of a learned quantizer (LSQ / LSQ+ / AMAQ range form).
//
// One pass over x and grad_y yields grad_x and, per group, the raw sums
//   grad_scale_sum[g]  = sum_i dy_i * d x_hat_i / d s_g
//   grad_offset_sum[g] = sum_i dy_i * d x_hat_i / d beta_g
// with the formulas of design.md: for r = rint((x - beta) / s) (+ z, see common.h),
//   code in range:  dx = dy, d x_hat/ds = r - v,  d x_hat/dbeta = 0
//   below range:    dx = 0,  d x_hat/ds = qmin - z, d x_hat/dbeta = 1
//   above range:    dx = 0,  d x_hat/ds = qmax - z, d x_hat/dbeta = 1
// "In range" is decided on the rounded code, as PyTorch's learnable fake-quant does.
// The sums are raw: the caller applies the LSQ gradient scale g = 1/sqrt(n * qmax) (or any
// other factor) and chains to ranges or bit widths (quant/ does this per group, which is
// O(groups) work). A PyTorch-style zero-point gradient is -s_g * grad_offset_sum[g].
//
// Reductions are deterministic: partial sums go to the workspace in a fixed order and are
// added in a fixed order (for a given thread count on the CPU).
#pragma once

#include "kernels/common.h"

namespace splitq::kernels {

// Bytes of scratch LsqBackward needs for `layout` on `ctx.device` (may be 0).
size_t LsqBackwardWorkspaceBytes(const ExecContext& ctx, const GroupLayout& layout);

// `grad_x` (dtype, numel) may alias `grad_y`. `grad_offset_sum` may be nullptr when the
// offset gradient is not wanted. `workspace` must hold LsqBackwardWorkspaceBytes() bytes on
// the kernel's device.
absl::Status LsqBackward(const ExecContext& ctx, DType dtype, const GroupLayout& layout,
                         const QuantParams& params, const void* x, const void* grad_y, void* grad_x,
                         float* grad_scale_sum, float* grad_offset_sum, void* workspace,
                         size_t workspace_bytes);

}  // namespace splitq::kernels

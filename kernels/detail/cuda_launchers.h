// splitq kernels (internal): the CUDA launchers behind the public host API. Defined in the
// .cu files, which are built only when nvcc is found (SPLITQ_WITH_CUDA). The public
// functions validate their arguments and then call these for ExecContext::kCuda.
#pragma once

#include "kernels/common.h"
#include "kernels/pack.h"

namespace splitq::kernels::cuda {

absl::Status FakeQuantForward(void* stream, DType dtype, const GroupLayout& layout,
                              const QuantParams& params, const void* x, void* y);

size_t LsqBackwardWorkspaceBytes(const GroupLayout& layout);
absl::Status LsqBackward(void* stream, DType dtype, const GroupLayout& layout,
                         const QuantParams& params, const void* x, const void* grad_y, void* grad_x,
                         float* grad_scale_sum, float* grad_offset_sum, void* workspace,
                         size_t workspace_bytes);

absl::Status QuantizePack(void* stream, DType dtype, const GroupLayout& layout,
                          const QuantParams& params, const RoundingSpec& rounding, const void* x,
                          const int64_t* group_offsets, uint8_t* packed, int64_t packed_bytes);
absl::Status UnpackDequantize(void* stream, DType dtype, const GroupLayout& layout,
                              const QuantParams& params, const uint8_t* packed,
                              int64_t packed_bytes, const int64_t* group_offsets, void* y);

absl::Status RotateChannels(void* stream, DType dtype, const GroupLayout& layout, int64_t block,
                            const uint32_t* sign_bits, bool inverse, const void* x, void* y);

}  // namespace splitq::kernels::cuda

namespace splitq::kernels::detail {

// The error for a CUDA request in a build without CUDA kernels.
inline absl::Status CudaNotBuilt(const char* op) {
  return absl::FailedPreconditionError(
      std::string(op) +
      ": CUDA requested, but splitq was built without CUDA kernels (nvcc "
      "was not found at configure time)");
}

}  // namespace splitq::kernels::detail

#if defined(SPLITQ_WITH_CUDA)
#define SPLITQ_CUDA_OR_ERROR(op, call) return call
#else
#define SPLITQ_CUDA_OR_ERROR(op, call) return ::splitq::kernels::detail::CudaNotBuilt(op)
#endif

#include "kernels/common.h"

#include <limits>

#include "absl/strings/str_cat.h"

namespace splitq::kernels {

size_t DTypeSize(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat16:
      return "float16";
  }
  return "unknown";
}

bool CudaKernelsBuilt() {
#if defined(SPLITQ_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

absl::StatusOr<GroupLayout> MakeGroupLayout(absl::Span<const int64_t> shape,
                                            Granularity granularity, int axis) {
  // The product of the non-zero dims must fit in int64 too: outer and inner are partial
  // products that skip the zeros elsewhere in the shape.
  int64_t numel = 1, nonzero_product = 1;
  for (const int64_t d : shape) {
    if (d < 0) return absl::InvalidArgumentError(absl::StrCat("negative dimension ", d));
    if (d == 0) {
      numel = 0;
      continue;
    }
    if (nonzero_product > std::numeric_limits<int64_t>::max() / d) {
      return absl::InvalidArgumentError("element count overflows int64");
    }
    nonzero_product *= d;
    numel *= d;
  }
  const int rank = static_cast<int>(shape.size());
  switch (granularity) {
    case Granularity::kTensor:
      return GroupLayout{1, 1, numel};
    case Granularity::kToken: {
      if (rank == 0) return absl::InvalidArgumentError("per-token quantization needs rank >= 1");
      const int64_t last = shape.back();
      return GroupLayout{1, last == 0 ? 0 : numel / last, last};
    }
    case Granularity::kChannel: {
      if (rank == 0) return absl::InvalidArgumentError("per-channel quantization needs rank >= 1");
      const int a = axis < 0 ? axis + rank : axis;
      if (a < 0 || a >= rank) {
        return absl::InvalidArgumentError(
            absl::StrCat("channel axis ", axis, " is out of range for rank ", rank));
      }
      int64_t outer = 1, inner = 1;
      for (int i = 0; i < a; ++i) outer *= shape[i];
      for (int i = a + 1; i < rank; ++i) inner *= shape[i];
      return GroupLayout{outer, shape[a], inner};
    }
  }
  return absl::InvalidArgumentError("unknown granularity");
}

absl::Status ValidateQuantParams(const QuantParams& params, const GroupLayout& layout) {
  if (layout.outer < 0 || layout.groups < 0 || layout.inner < 0) {
    return absl::InvalidArgumentError("negative layout extent");
  }
  if (layout.groups > 0 && params.scale == nullptr) {
    return absl::InvalidArgumentError("scale is required");
  }
  if (params.bits == nullptr && (params.uniform_bits < 1 || params.uniform_bits > 8)) {
    return absl::InvalidArgumentError(
        absl::StrCat("bit width ", params.uniform_bits, " is outside 1..8"));
  }
  return absl::OkStatus();
}

}  // namespace splitq::kernels

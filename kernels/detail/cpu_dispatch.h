// splitq kernels (internal): helpers for the CPU paths (dtype dispatch, OpenMP team size,
// per-group parameter tables in structure-of-arrays form so that loops over channels
// vectorise).
#pragma once

#include <type_traits>
#include <vector>

#include "kernels/common.h"
#include "kernels/detail/host_dtype.h"
#include "kernels/detail/quant_math.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace splitq::kernels::detail {

inline int CpuThreads(const ExecContext& ctx) {
#if defined(_OPENMP)
  return ctx.cpu_threads > 0 ? ctx.cpu_threads : omp_get_max_threads();
#else
  (void)ctx;
  return 1;
#endif
}

template <DType D>
using DTypeTag = std::integral_constant<DType, D>;

// Calls fn(DTypeTag<D>{}) for the runtime dtype; the callee reads decltype(tag)::value.
template <typename Fn>
absl::Status DispatchDType(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      fn(DTypeTag<DType::kFloat32>{});
      return absl::OkStatus();
    case DType::kBFloat16:
      fn(DTypeTag<DType::kBFloat16>{});
      return absl::OkStatus();
    case DType::kFloat16:
      fn(DTypeTag<DType::kFloat16>{});
      return absl::OkStatus();
  }
  return absl::InvalidArgumentError("unknown dtype");
}

// Per-group constants, one array per field.
struct GroupTable {
  std::vector<float> scale, inv_scale, offset, lo, hi;

  GroupTable(const QuantParams& p, int64_t groups)
      : scale(groups), inv_scale(groups), offset(groups), lo(groups), hi(groups) {
    for (int64_t g = 0; g < groups; ++g) {
      const GroupQuant q = LoadGroupQuant(p, g);
      scale[g] = q.scale;
      inv_scale[g] = q.inv_scale;
      offset[g] = q.offset;
      lo[g] = q.lo;
      hi[g] = q.hi;
    }
  }
  GroupQuant at(int64_t g) const {
    return GroupQuant{scale[g], inv_scale[g], offset[g], lo[g], hi[g]};
  }
};

}  // namespace splitq::kernels::detail

// CPU path of lsq_backward.h, and the device dispatch.
//
// The CPU reduction splits the work into a fixed number of chunks (independent of the
// thread count), each with its own slice of per-group partial sums in double, and adds
// the slices in chunk order: the result does not depend on how many threads ran.
#include "kernels/lsq_backward.h"

#include <algorithm>

#include "base/status_macros.h"
#include "kernels/detail/cpu_dispatch.h"
#include "kernels/detail/cuda_launchers.h"

namespace splitq::kernels {
namespace {

constexpr int64_t kCpuChunks = 16;
// Work units of the inner > 1 path: at most this many contiguous elements of one group.
constexpr int64_t kUnitElements = 4096;

using detail::GroupTable;

int64_t CpuChunks(const GroupLayout& layout) {
  const int64_t units =
      layout.inner == 1
          ? layout.outer
          : layout.outer * layout.groups * ((layout.inner + kUnitElements - 1) / kUnitElements);
  return std::max<int64_t>(1, std::min(kCpuChunks, units));
}

template <DType D>
void LsqBackwardCpu(const ExecContext& ctx, const GroupLayout& layout, const GroupTable& t,
                    const void* x_raw, const void* dy_raw, void* dx_raw, double* partials,
                    int64_t chunks) {
  using E = detail::HostElement<D>;
  using T = typename E::Storage;
  const T* x = static_cast<const T*>(x_raw);
  const T* dy = static_cast<const T*>(dy_raw);
  T* dx = static_cast<T*>(dx_raw);
  const int64_t groups = layout.groups, inner = layout.inner;
  const int threads = detail::CpuThreads(ctx);
  const bool parallel = layout.numel() >= (1 << 15);
  std::fill(partials, partials + 2 * chunks * groups, 0.0);

  if (inner == 1) {
    const float *inv = t.inv_scale.data(), *off = t.offset.data(), *lo = t.lo.data(),
                *hi = t.hi.data();
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (parallel)
    for (int64_t c = 0; c < chunks; ++c) {
      double* gs = partials + 2 * c * groups;
      double* gb = gs + groups;
      const int64_t begin = layout.outer * c / chunks, end = layout.outer * (c + 1) / chunks;
      for (int64_t o = begin; o < end; ++o) {
        const T* xr = x + o * groups;
        const T* dyr = dy + o * groups;
        T* dxr = dx + o * groups;
        for (int64_t g = 0; g < groups; ++g) {
          const float v = (E::Load(xr[g]) - off[g]) * inv[g];
          const float d = E::Load(dyr[g]);
          float cv = v < lo[g] - 1.0f ? lo[g] - 1.0f : v;
          cv = cv > hi[g] + 1.0f ? hi[g] + 1.0f : cv;
          const float r = detail::RoundEven(cv);
          const bool below = r<lo[g], above = r> hi[g];
          const bool outside = below || above;
          const float ds = below ? lo[g] : (above ? hi[g] : r - v);
          dxr[g] = E::Store(outside ? 0.0f : d);
          gs[g] += static_cast<double>(d * ds);
          gb[g] += outside ? static_cast<double>(d) : 0.0;
        }
      }
    }
  } else {
    const int64_t per_row = (inner + kUnitElements - 1) / kUnitElements;
    const int64_t units = layout.outer * groups * per_row;
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (parallel)
    for (int64_t c = 0; c < chunks; ++c) {
      double* gs = partials + 2 * c * groups;
      double* gb = gs + groups;
      const int64_t begin = units * c / chunks, end = units * (c + 1) / chunks;
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t row = unit / per_row, part = unit % per_row;
        const int64_t g = row % groups;
        const detail::GroupQuant q = t.at(g);
        const int64_t j0 = part * kUnitElements, j1 = std::min(inner, j0 + kUnitElements);
        const int64_t base = row * inner;
        float sum_s = 0.0f, sum_b = 0.0f;
        for (int64_t j = j0; j < j1; ++j) {
          const detail::LsqGrad grad =
              detail::LsqElementGrad(E::Load(x[base + j]), E::Load(dy[base + j]), q);
          dx[base + j] = E::Store(grad.dx);
          sum_s += grad.dscale;
          sum_b += grad.doffset;
        }
        gs[g] += sum_s;
        gb[g] += sum_b;
      }
    }
  }
}

}  // namespace

size_t LsqBackwardWorkspaceBytes(const ExecContext& ctx, const GroupLayout& layout) {
  if (ctx.device == Device::kCuda) {
#if defined(SPLITQ_WITH_CUDA)
    return cuda::LsqBackwardWorkspaceBytes(layout);
#else
    return 0;
#endif
  }
  return static_cast<size_t>(2 * CpuChunks(layout) * layout.groups) * sizeof(double);
}

absl::Status LsqBackward(const ExecContext& ctx, DType dtype, const GroupLayout& layout,
                         const QuantParams& params, const void* x, const void* grad_y, void* grad_x,
                         float* grad_scale_sum, float* grad_offset_sum, void* workspace,
                         size_t workspace_bytes) {
  SPLITQ_RETURN_IF_ERROR(ValidateQuantParams(params, layout));
  if (layout.groups > 0 && grad_scale_sum == nullptr) {
    return absl::InvalidArgumentError("grad_scale_sum is required");
  }
  if (workspace_bytes < LsqBackwardWorkspaceBytes(ctx, layout)) {
    return absl::InvalidArgumentError("workspace is smaller than LsqBackwardWorkspaceBytes()");
  }
  if (layout.numel() > 0 && (x == nullptr || grad_y == nullptr || grad_x == nullptr)) {
    return absl::InvalidArgumentError("null tensor pointer");
  }
  if (ctx.device == Device::kCuda) {
    SPLITQ_CUDA_OR_ERROR(
        "LsqBackward",
        cuda::LsqBackward(ctx.stream, dtype, layout, params, x, grad_y, grad_x, grad_scale_sum,
                          grad_offset_sum, workspace, workspace_bytes));
  }
  for (int64_t g = 0; params.bits != nullptr && g < layout.groups; ++g) {
    if (params.bits[g] < 1 || params.bits[g] > 8) {
      return absl::InvalidArgumentError("a group's bit width is outside 1..8");
    }
  }
  const int64_t chunks = CpuChunks(layout);
  double* partials = static_cast<double*>(workspace);
  if (layout.numel() > 0) {
    const GroupTable table(params, layout.groups);
    SPLITQ_RETURN_IF_ERROR(detail::DispatchDType(dtype, [&](auto tag) {
      LsqBackwardCpu<decltype(tag)::value>(ctx, layout, table, x, grad_y, grad_x, partials, chunks);
    }));
  }
  for (int64_t g = 0; g < layout.groups; ++g) {
    double s = 0.0, b = 0.0;
    if (layout.numel() > 0) {
      for (int64_t c = 0; c < chunks; ++c) {
        s += partials[2 * c * layout.groups + g];
        b += partials[(2 * c + 1) * layout.groups + g];
      }
    }
    grad_scale_sum[g] = static_cast<float>(s);
    if (grad_offset_sum != nullptr) grad_offset_sum[g] = static_cast<float>(b);
  }
  return absl::OkStatus();
}

}  // namespace splitq::kernels

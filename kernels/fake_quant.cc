// CPU path of fake_quant.h, and the device dispatch.
#include "kernels/fake_quant.h"

#include "base/status_macros.h"
#include "kernels/detail/cpu_dispatch.h"
#include "kernels/detail/cuda_launchers.h"

namespace splitq::kernels {
namespace {

using detail::GroupTable;

template <DType D>
void FakeQuantCpu(const ExecContext& ctx, const GroupLayout& layout, const GroupTable& t,
                  const void* x_raw, void* y_raw) {
  using E = detail::HostElement<D>;
  using T = typename E::Storage;
  const T* x = static_cast<const T*>(x_raw);
  T* y = static_cast<T*>(y_raw);
  const int64_t groups = layout.groups, inner = layout.inner;
  const int threads = detail::CpuThreads(ctx);
  const bool parallel = layout.numel() >= (1 << 15);
  if (inner == 1) {
    // Channels last: vectorise across groups with the per-group tables.
    const float *sc = t.scale.data(), *inv = t.inv_scale.data(), *off = t.offset.data(),
                *lo = t.lo.data(), *hi = t.hi.data();
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
    for (int64_t o = 0; o < layout.outer; ++o) {
      const T* xr = x + o * groups;
      T* yr = y + o * groups;
      for (int64_t g = 0; g < groups; ++g) {
        float v = (E::Load(xr[g]) - off[g]) * inv[g];
        v = v < lo[g] ? lo[g] : v;
        v = v > hi[g] ? hi[g] : v;
        yr[g] = E::Store(detail::RoundEven(v) * sc[g] + off[g]);
      }
    }
    return;
  }
  const int64_t rows = layout.outer * groups;
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
  for (int64_t row = 0; row < rows; ++row) {
    const detail::GroupQuant q = t.at(row % groups);
    const T* xr = x + row * inner;
    T* yr = y + row * inner;
    for (int64_t j = 0; j < inner; ++j) {
      float v = (E::Load(xr[j]) - q.offset) * q.inv_scale;
      v = v < q.lo ? q.lo : v;
      v = v > q.hi ? q.hi : v;
      yr[j] = E::Store(detail::RoundEven(v) * q.scale + q.offset);
    }
  }
}

}  // namespace

absl::Status FakeQuantForward(const ExecContext& ctx, DType dtype, const GroupLayout& layout,
                              const QuantParams& params, const void* x, void* y) {
  SPLITQ_RETURN_IF_ERROR(ValidateQuantParams(params, layout));
  if (layout.numel() == 0) return absl::OkStatus();
  if (x == nullptr || y == nullptr) return absl::InvalidArgumentError("null tensor pointer");
  if (ctx.device == Device::kCuda) {
    SPLITQ_CUDA_OR_ERROR("FakeQuantForward",
                         cuda::FakeQuantForward(ctx.stream, dtype, layout, params, x, y));
  }
  for (int64_t g = 0; params.bits != nullptr && g < layout.groups; ++g) {
    if (params.bits[g] < 1 || params.bits[g] > 8) {
      return absl::InvalidArgumentError("a group's bit width is outside 1..8");
    }
  }
  const GroupTable table(params, layout.groups);
  return detail::DispatchDType(
      dtype, [&](auto tag) { FakeQuantCpu<decltype(tag)::value>(ctx, layout, table, x, y); });
}

}  // namespace splitq::kernels

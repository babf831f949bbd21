#include "quant/tensor_ops.h"

#include <c10/util/Exception.h>

#if defined(SPLITQ_TORCH_CUDA)
#include <c10/cuda/CUDAStream.h>
#endif

#include "kernels/fake_quant.h"
#include "kernels/lsq_backward.h"

namespace splitq::quant {
namespace {

void CheckParam(const at::Tensor& t, const char* name, int64_t groups, at::ScalarType type,
                const at::Tensor& x) {
  if (!t.defined()) return;
  TORCH_CHECK(t.scalar_type() == type, name, " must be ", type, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == groups, name, " must have ", groups, " entries, got ", t.numel());
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), ", x on ", x.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

kernels::QuantParams ParamsOf(const QuantTensors& q, const at::Tensor& x, int64_t groups) {
  TORCH_CHECK(q.scale.defined(), "scale is required");
  CheckParam(q.scale, "scale", groups, at::kFloat, x);
  CheckParam(q.offset, "offset", groups, at::kFloat, x);
  CheckParam(q.zero_point, "zero_point", groups, at::kFloat, x);
  CheckParam(q.bits, "bits", groups, at::kByte, x);
  kernels::QuantParams p;
  p.scale = q.scale.data_ptr<float>();
  p.offset = q.offset.defined() ? q.offset.data_ptr<float>() : nullptr;
  p.zero_point = q.zero_point.defined() ? q.zero_point.data_ptr<float>() : nullptr;
  p.bits = q.bits.defined() ? q.bits.data_ptr<uint8_t>() : nullptr;
  p.uniform_bits = q.uniform_bits;
  p.is_signed = q.is_signed;
  return p;
}

void CheckInput(const at::Tensor& x) {
  TORCH_CHECK(x.defined(), "input is undefined");
  TORCH_CHECK(x.device().is_cpu() || x.device().is_cuda(), "unsupported device ", x.device());
  ToKernelDType(x.scalar_type());
}

// The bit map and segment offsets of a packed layout, on one device.
struct PackedLayout {
  at::Tensor bits;     // uint8 [groups]
  at::Tensor offsets;  // int64 [groups + 1]
  int64_t total_bytes = 0;
};

PackedLayout MakePackedLayout(const std::vector<uint8_t>& bits, int64_t codes_per_group,
                              const at::Device& device) {
  PackedLayout layout;
  at::Tensor offsets = at::empty({static_cast<int64_t>(bits.size()) + 1}, at::kLong);
  CheckOk(kernels::PackedOffsets(
      bits, codes_per_group,
      absl::MakeSpan(offsets.data_ptr<int64_t>(), static_cast<size_t>(offsets.numel()))));
  layout.total_bytes = offsets.data_ptr<int64_t>()[bits.size()];
  const at::Tensor host_bits = at::from_blob(const_cast<uint8_t*>(bits.data()),
                                             {static_cast<int64_t>(bits.size())}, at::kByte);
  // Blocking copies: the cached tensors are complete before any stream reads them.
  layout.bits = host_bits.to(device, /*non_blocking=*/false, /*copy=*/true);
  layout.offsets = offsets.to(device, /*non_blocking=*/false, /*copy=*/true);
  return layout;
}

// The bit map changes rarely (when AMAQ moves a channel's width), so each thread keeps the
// device copies of the last few layouts instead of copying them to the GPU on every call.
const PackedLayout& CachedPackedLayout(const std::vector<uint8_t>& bits, int64_t codes_per_group,
                                       const at::Device& device) {
  struct Entry {
    std::vector<uint8_t> bits;
    int64_t codes_per_group;
    at::Device device;
    PackedLayout layout;
  };
  constexpr size_t kEntries = 4;
  thread_local std::vector<Entry> cache;
  for (const Entry& e : cache) {
    if (e.codes_per_group == codes_per_group && e.device == device && e.bits == bits) {
      return e.layout;
    }
  }
  if (cache.size() == kEntries) cache.erase(cache.begin());
  cache.push_back(
      Entry{bits, codes_per_group, device, MakePackedLayout(bits, codes_per_group, device)});
  return cache.back().layout;
}

// The cache may drop an entry while a kernel on another stream still reads it: tell the
// caching allocator which stream uses the memory.
void RecordUse(const PackedLayout& layout, const at::Tensor& x) {
#if defined(SPLITQ_TORCH_CUDA)
  if (x.is_cuda()) {
    const c10::Stream stream = c10::cuda::getCurrentCUDAStream(x.device().index());
    layout.bits.record_stream(stream);
    layout.offsets.record_stream(stream);
  }
#else
  (void)layout;
  (void)x;
#endif
}

}  // namespace

kernels::DType ToKernelDType(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return kernels::DType::kFloat32;
    case at::kBFloat16:
      return kernels::DType::kBFloat16;
    case at::kHalf:
      return kernels::DType::kFloat16;
    default:
      TORCH_CHECK(false, "unsupported dtype ", type, " (float32, bfloat16 or float16)");
  }
}

at::ScalarType ToScalarType(kernels::DType dtype) {
  switch (dtype) {
    case kernels::DType::kFloat32:
      return at::kFloat;
    case kernels::DType::kBFloat16:
      return at::kBFloat16;
    case kernels::DType::kFloat16:
      return at::kHalf;
  }
  TORCH_CHECK(false, "unknown kernel dtype");
}

kernels::GroupLayout LayoutOf(const at::Tensor& x, const Grouping& grouping) {
  const auto layout =
      kernels::MakeGroupLayout(x.sizes().vec(), grouping.granularity, grouping.axis);
  CheckOk(layout.status());
  return *layout;
}

kernels::ExecContext ContextOf(const at::Tensor& x) {
  kernels::ExecContext ctx;
  if (x.is_cuda()) {
#if defined(SPLITQ_TORCH_CUDA)
    ctx.device = kernels::Device::kCuda;
    ctx.stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
#else
    TORCH_CHECK(false, "CUDA tensor given, but splitq was built without torch CUDA support");
#endif
  }
  return ctx;
}

void CheckOk(const absl::Status& status) {
  TORCH_CHECK(status.ok(), std::string(status.message()));
}

at::Tensor FakeQuantize(const at::Tensor& x_in, const Grouping& grouping, const QuantTensors& q) {
  CheckInput(x_in);
  const at::Tensor x = x_in.contiguous();
  const kernels::GroupLayout layout = LayoutOf(x, grouping);
  const kernels::QuantParams params = ParamsOf(q, x, layout.groups);
  at::Tensor y = at::empty_like(x);
  CheckOk(kernels::FakeQuantForward(ContextOf(x), ToKernelDType(x.scalar_type()), layout, params,
                                    x.data_ptr(), y.data_ptr()));
  return y;
}

LsqGradSums LsqBackward(const at::Tensor& x_in, const at::Tensor& dy_in, const Grouping& grouping,
                        const QuantTensors& q) {
  CheckInput(x_in);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "grad_y shape ", dy_in.sizes(), " != x shape ",
              x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = dy_in.to(x.scalar_type()).contiguous();
  const kernels::GroupLayout layout = LayoutOf(x, grouping);
  const kernels::QuantParams params = ParamsOf(q, x, layout.groups);
  const kernels::ExecContext ctx = ContextOf(x);
  LsqGradSums out;
  out.grad_x = at::empty_like(x);
  const auto float_opts = x.options().dtype(at::kFloat);
  out.grad_scale_sum = at::empty({layout.groups}, float_opts);
  out.grad_offset_sum = at::empty({layout.groups}, float_opts);
  const size_t ws_bytes = kernels::LsqBackwardWorkspaceBytes(ctx, layout);
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  CheckOk(kernels::LsqBackward(
      ctx, ToKernelDType(x.scalar_type()), layout, params, x.data_ptr(), dy.data_ptr(),
      out.grad_x.data_ptr(), out.grad_scale_sum.data_ptr<float>(),
      out.grad_offset_sum.data_ptr<float>(), workspace.data_ptr(), ws_bytes));
  return out;
}

at::Tensor QuantizePack(const at::Tensor& x_in, const Grouping& grouping, const QuantTensors& q,
                        const std::vector<uint8_t>& bits, const kernels::RoundingSpec& rounding) {
  CheckInput(x_in);
  const at::Tensor x = x_in.contiguous();
  const kernels::GroupLayout layout = LayoutOf(x, grouping);
  TORCH_CHECK(static_cast<int64_t>(bits.size()) == layout.groups, "bits has ", bits.size(),
              " entries for ", layout.groups, " groups");
  const PackedLayout& packed_layout = CachedPackedLayout(bits, layout.per_group(), x.device());
  RecordUse(packed_layout, x);
  QuantTensors with_bits = q;
  with_bits.bits = packed_layout.bits;
  const kernels::QuantParams params = ParamsOf(with_bits, x, layout.groups);
  const at::Tensor& offsets = packed_layout.offsets;
  const int64_t total = packed_layout.total_bytes;
  at::Tensor packed = at::empty({total}, x.options().dtype(at::kByte));
  CheckOk(kernels::QuantizePack(ContextOf(x), ToKernelDType(x.scalar_type()), layout, params,
                                rounding, x.data_ptr(), offsets.data_ptr<int64_t>(),
                                packed.data_ptr<uint8_t>(), total));
  return packed;
}

at::Tensor UnpackDequantize(const at::Tensor& packed_in, at::IntArrayRef shape,
                            at::ScalarType dtype, const Grouping& grouping, const QuantTensors& q,
                            const std::vector<uint8_t>& bits) {
  TORCH_CHECK(packed_in.scalar_type() == at::kByte, "packed must be uint8");
  ToKernelDType(dtype);
  const at::Tensor packed = packed_in.contiguous();
  // Everything is checked against the packed bytes before the output is allocated.
  const auto layout_or = kernels::MakeGroupLayout(shape.vec(), grouping.granularity, grouping.axis);
  CheckOk(layout_or.status());
  const kernels::GroupLayout layout = *layout_or;
  TORCH_CHECK(static_cast<int64_t>(bits.size()) == layout.groups, "bits has ", bits.size(),
              " entries for ", layout.groups, " groups");
  const PackedLayout& packed_layout = CachedPackedLayout(bits, layout.per_group(), packed.device());
  RecordUse(packed_layout, packed);
  const int64_t total = packed_layout.total_bytes;
  TORCH_CHECK(packed.numel() == total, "packed has ", packed.numel(), " bytes, layout needs ",
              total);
  at::Tensor y = at::empty(shape, packed.options().dtype(dtype));
  QuantTensors with_bits = q;
  with_bits.bits = packed_layout.bits;
  const kernels::QuantParams params = ParamsOf(with_bits, y, layout.groups);
  CheckOk(kernels::UnpackDequantize(ContextOf(y), ToKernelDType(dtype), layout, params,
                                    packed.data_ptr<uint8_t>(), total,
                                    packed_layout.offsets.data_ptr<int64_t>(), y.data_ptr()));
  return y;
}

}  // namespace splitq::quant

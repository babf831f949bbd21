// The CUDA paths of the kernels against their CPU paths, through the same public API
// (ExecContext{Device::kCpu} vs {Device::kCuda}):
//   fake-quant values, packed bytes (nearest and stochastic), unpacked values and LSQ grad_x
//   bit for bit (NaN == NaN); LSQ per-group sums within kSum*Tol; the channel rotation
//   (kernels/rotate.h) bit for bit.
// Sweeps layout (per tensor, per channel on [N, C] and [N, C, H, W], per token; odd and
// empty sizes) x bits (uniform 2..8, random mixed 1..8 per group) x dtype x signedness.
// Inputs are synthetic (seeded std::mt19937) with ties, saturation, zeros, NaN and Inf.
// Every test skips, with the reason, where no CUDA device can be used.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/common.h"
#include "kernels/detail/host_dtype.h"
#include "kernels/detail/quant_math.h"
#include "kernels/fake_quant.h"
#include "kernels/lsq_backward.h"
#include "kernels/op_table.h"
#include "kernels/pack.h"
#include "kernels/rotate.h"
#include "tests/kernels/test_util.h"

namespace splitq::kernels {
namespace {

// LSQ sums: |gpu - cpu| <= kSumRelTol * |cpu| + kSumAbsSumTol * sum_i |term_i| + kSumAbsTol.
// The second term bounds float accumulation error under cancellation.
constexpr double kSumRelTol = 1e-4;
constexpr double kSumAbsSumTol = 1e-5;
constexpr double kSumAbsTol = 1e-6;

// Guard bytes after every device output, checked to be untouched.
constexpr size_t kGuardBytes = 64;
constexpr uint8_t kPoison = 0x7B;  // 0x7B7B... is finite in fp32, bf16 and fp16

// Empty when a CUDA device can be used, else why not.
const std::string& CudaUnavailableReason() {
  static const std::string reason = [] {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      return std::string("cudaGetDeviceCount failed: ") + cudaGetErrorName(err) + " (" +
             cudaGetErrorString(err) + ")";
    }
    if (count == 0) return std::string("cudaGetDeviceCount returned 0 devices");
    return std::string();
  }();
  return reason;
}

#define SKIP_WITHOUT_CUDA()                                          \
  do {                                                               \
    if (!CudaUnavailableReason().empty()) {                          \
      GTEST_SKIP() << "no CUDA device: " << CudaUnavailableReason(); \
    }                                                                \
  } while (false)

#define ASSERT_CUDA_OK(call)                                                   \
  do {                                                                         \
    const cudaError_t err_ = (call);                                           \
    ASSERT_EQ(err_, cudaSuccess) << #call << ": " << cudaGetErrorString(err_); \
  } while (false)

#define ASSERT_STATUS_OK(expr)                             \
  do {                                                     \
    const absl::Status status_ = (expr);                   \
    ASSERT_TRUE(status_.ok()) << #expr << ": " << status_; \
  } while (false)

// Device memory with kGuardBytes of poisoned guard after `bytes`.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (cudaMalloc(&ptr_, bytes + kGuardBytes) != cudaSuccess) ptr_ = nullptr;
    if (ptr_ != nullptr) cudaMemset(ptr_, kPoison, bytes + kGuardBytes);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  bool ok() const { return ptr_ != nullptr; }
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  cudaError_t Upload(const void* src, size_t n) const {
    return n == 0 ? cudaSuccess : cudaMemcpy(ptr_, src, n, cudaMemcpyHostToDevice);
  }
  cudaError_t Poison() const { return cudaMemset(ptr_, kPoison, bytes_ + kGuardBytes); }
  // The `bytes` payload; `guard_ok` says whether the guard after it is intact.
  std::vector<uint8_t> Download(bool* guard_ok) const {
    std::vector<uint8_t> all(bytes_ + kGuardBytes);
    if (cudaMemcpy(all.data(), ptr_, all.size(), cudaMemcpyDeviceToHost) != cudaSuccess) {
      *guard_ok = false;
      return {};
    }
    *guard_ok = true;
    for (size_t i = bytes_; i < all.size(); ++i) *guard_ok &= all[i] == kPoison;
    all.resize(bytes_);
    return all;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

template <typename T>
DeviceBuffer ToDevice(const std::vector<T>& v) {
  DeviceBuffer b(v.size() * sizeof(T));
  if (b.ok()) b.Upload(v.data(), v.size() * sizeof(T));
  return b;
}

// ---- element access on raw bytes ------------------------------------------------------

float LoadElem(DType dtype, const std::vector<uint8_t>& raw, int64_t i) {
  return testing::ElementAt(raw, dtype, static_cast<size_t>(i));
}

void StoreElem(DType dtype, std::vector<uint8_t>& raw, int64_t i, float v) {
  if (dtype == DType::kFloat32) {
    std::memcpy(raw.data() + 4 * i, &v, 4);
    return;
  }
  const uint16_t h =
      dtype == DType::kBFloat16 ? detail::FloatToBFloat16(v) : detail::FloatToHalf(v);
  std::memcpy(raw.data() + 2 * i, &h, 2);
}

uint32_t ElemBits(DType dtype, const std::vector<uint8_t>& raw, int64_t i) {
  if (dtype == DType::kFloat32) {
    uint32_t u;
    std::memcpy(&u, raw.data() + 4 * i, 4);
    return u;
  }
  uint16_t h;
  std::memcpy(&h, raw.data() + 2 * i, 2);
  return h;
}

bool ElemIsNan(DType dtype, uint32_t bits) {
  switch (dtype) {
    case DType::kFloat32:
      return (bits & 0x7fffffffu) > 0x7f800000u;
    case DType::kBFloat16:
      return (bits & 0x7fffu) > 0x7f80u;
    case DType::kFloat16:
      return (bits & 0x7fffu) > 0x7c00u;
  }
  return false;
}

// "" when a and b hold the same values bit for bit (any NaN equals any NaN), else the first
// mismatches.
std::string CompareElems(DType dtype, const std::vector<uint8_t>& want,
                         const std::vector<uint8_t>& got, int64_t numel) {
  if (want.size() != got.size()) return "size mismatch";
  std::ostringstream out;
  int64_t bad = 0;
  for (int64_t i = 0; i < numel; ++i) {
    const uint32_t a = ElemBits(dtype, want, i), b = ElemBits(dtype, got, i);
    if (a == b || (ElemIsNan(dtype, a) && ElemIsNan(dtype, b))) continue;
    if (bad++ < 5) {
      out << " [" << i << "] cpu=" << LoadElem(dtype, want, i) << " (0x" << std::hex << a
          << ") cuda=" << std::dec << LoadElem(dtype, got, i) << " (0x" << std::hex << b << std::dec
          << ")";
    }
  }
  if (bad == 0) return "";
  return std::to_string(bad) + " of " + std::to_string(numel) + " elements differ:" + out.str();
}

std::string CompareBytes(const std::vector<uint8_t>& want, const std::vector<uint8_t>& got) {
  if (want.size() != got.size()) return "size mismatch";
  std::ostringstream out;
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (want[i] == got[i]) continue;
    if (bad++ < 5) {
      out << " [" << i << "] cpu=0x" << std::hex << int{want[i]} << " cuda=0x" << int{got[i]}
          << std::dec;
    }
  }
  if (bad == 0) return "";
  return std::to_string(bad) + " of " + std::to_string(want.size()) + " bytes differ:" + out.str();
}

// ---- the sweep --------------------------------------------------------------------------

// The layouts, widths and dtypes come from kernels/op_table.h, the table the benchmark times.
using LayoutCase = ShapeCase;

using Param = std::tuple<LayoutCase, int /*bits; 0: mixed per group*/, DType, bool /*signed*/>;

std::string ParamName(const ::testing::TestParamInfo<Param>& info) {
  const auto& [layout, bits, dtype, is_signed] = info.param;
  std::string name = layout.name + (bits == 0 ? "_mixed" : "_b" + std::to_string(bits)) + "_" +
                     DTypeName(dtype) + (is_signed ? "_signed" : "_unsigned");
  for (char& c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return name;
}

class CudaVsCpuTest : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_CUDA();
    const auto& [lc, bits, dtype, is_signed] = GetParam();
    dtype_ = dtype;
    auto layout = MakeGroupLayout(lc.shape, lc.granularity, lc.axis);
    ASSERT_TRUE(layout.ok()) << layout.status();
    layout_ = *layout;
    numel_ = layout_.numel();
    const int64_t groups = layout_.groups;

    // A different, reproducible stream per case.
    seed_ = std::hash<std::string>{}(ParamName(::testing::TestParamInfo<Param>(GetParam(), 0)));
    std::mt19937 rng(static_cast<uint32_t>(seed_));
    const int variant = static_cast<int>(seed_ % 4);  // which of offset / zero point exist
    with_specials_ = seed_ % 3 != 0;                  // NaN and Inf in x

    bits_.resize(groups);
    std::uniform_int_distribution<int> any_bits(1, 8);
    for (auto& b : bits_) b = static_cast<uint8_t>(bits == 0 ? any_bits(rng) : bits);
    scale_.resize(groups);
    offset_.assign(groups, 0.0f);
    zero_point_.assign(groups, 0.0f);
    std::uniform_real_distribution<float> log_scale(std::log(0.004f), std::log(0.5f));
    std::uniform_real_distribution<float> off(-1.0f, 1.0f);
    std::uniform_int_distribution<int> zp(-3, 3);
    for (int64_t g = 0; g < groups; ++g) {
      scale_[g] = std::exp(log_scale(rng));
      if (variant & 1) offset_[g] = off(rng);
      if (variant & 2) zero_point_[g] = static_cast<float>(zp(rng));
    }

    // Host parameters for the CPU path.
    cpu_params_.scale = scale_.data();
    cpu_params_.offset = (variant & 1) ? offset_.data() : nullptr;
    cpu_params_.zero_point = (variant & 2) ? zero_point_.data() : nullptr;
    cpu_params_.bits = bits == 0 ? bits_.data() : nullptr;
    cpu_params_.uniform_bits = bits == 0 ? 8 : bits;
    cpu_params_.is_signed = is_signed;

    // The same parameters on the device.
    d_scale_ = ToDevice(scale_);
    d_offset_ = ToDevice(offset_);
    d_zero_point_ = ToDevice(zero_point_);
    d_bits_ = ToDevice(bits_);
    gpu_params_ = cpu_params_;
    gpu_params_.scale = d_scale_.get<float>();
    gpu_params_.offset = cpu_params_.offset ? d_offset_.get<float>() : nullptr;
    gpu_params_.zero_point = cpu_params_.zero_point ? d_zero_point_.get<float>() : nullptr;
    gpu_params_.bits = cpu_params_.bits ? d_bits_.get<uint8_t>() : nullptr;

    // Packed offsets.
    offsets_.resize(groups + 1);
    ASSERT_STATUS_OK(PackedOffsets(bits_, layout_.per_group(), absl::MakeSpan(offsets_)));
    packed_bytes_ = offsets_[groups];
    d_offsets_ = ToDevice(offsets_);

    // x: mostly in range, ties, saturation, signed zeros, and (some cases) NaN / Inf.
    x_.assign(numel_ * DTypeSize(dtype_), 0);
    dy_.assign(numel_ * DTypeSize(dtype_), 0);
    std::uniform_real_distribution<float> unit(0.0f, 1.0f);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int64_t i = 0; i < numel_; ++i) {
      const int64_t g = (i / layout_.inner) % groups;
      const detail::GroupQuant q = detail::LoadGroupQuant(cpu_params_, g);
      const float kind = unit(rng);
      float v;
      if (kind < 0.70f) {
        v = q.offset + q.scale * (q.lo - 3.0f + unit(rng) * (q.hi - q.lo + 6.0f));
      } else if (kind < 0.82f) {  // a tie n + 0.5 in code units
        const float n = std::floor(q.lo - 1.0f + unit(rng) * (q.hi - q.lo + 2.0f));
        v = q.offset + q.scale * (n + 0.5f);
      } else if (kind < 0.88f) {  // far outside the range
        v = (unit(rng) < 0.5f ? -1.0f : 1.0f) * q.scale * 1000.0f;
      } else if (kind < 0.92f) {
        v = unit(rng) < 0.5f ? 0.0f : -0.0f;
      } else if (kind < 0.95f && with_specials_) {
        v = std::numeric_limits<float>::quiet_NaN();
      } else if (kind < 0.98f && with_specials_) {
        v = unit(rng) < 0.5f ? std::numeric_limits<float>::infinity()
                             : -std::numeric_limits<float>::infinity();
      } else {
        v = q.offset + q.scale * q.hi;  // exactly the top of the range
      }
      StoreElem(dtype_, x_, i, v);
      StoreElem(dtype_, dy_, i, normal(rng));
    }
  }

  size_t Bytes() const { return static_cast<size_t>(numel_) * DTypeSize(dtype_); }
  std::string Where() const {
    return "layout outer=" + std::to_string(layout_.outer) +
           " groups=" + std::to_string(layout_.groups) + " inner=" + std::to_string(layout_.inner);
  }

  const ExecContext cpu_{Device::kCpu, nullptr, 0};
  const ExecContext gpu_{Device::kCuda, nullptr, 0};
  DType dtype_{};
  GroupLayout layout_;
  int64_t numel_ = 0;
  size_t seed_ = 0;
  bool with_specials_ = false;
  std::vector<uint8_t> bits_;
  std::vector<float> scale_, offset_, zero_point_;
  std::vector<int64_t> offsets_;
  int64_t packed_bytes_ = 0;
  QuantParams cpu_params_, gpu_params_;
  DeviceBuffer d_scale_, d_offset_, d_zero_point_, d_bits_, d_offsets_;
  std::vector<uint8_t> x_, dy_;
};

TEST_P(CudaVsCpuTest, FakeQuantForwardBitIdentical) {
  std::vector<uint8_t> want(Bytes());
  ASSERT_STATUS_OK(FakeQuantForward(cpu_, dtype_, layout_, cpu_params_, x_.data(), want.data()));

  // Out of place, then misaligned by one element (the scalar fallbacks), then in place.
  for (int mode = 0; mode < 3; ++mode) {
    SCOPED_TRACE(mode == 0 ? "out of place" : mode == 1 ? "misaligned" : "in place");
    const size_t shift = mode == 1 ? DTypeSize(dtype_) : 0;
    DeviceBuffer dx(Bytes() + shift), dy(Bytes() + shift);
    ASSERT_TRUE(dx.ok() && dy.ok());
    const DeviceBuffer& out_buf = mode == 2 ? dx : dy;
    ASSERT_CUDA_OK(
        cudaMemcpy(dx.get<uint8_t>() + shift, x_.data(), Bytes(), cudaMemcpyHostToDevice));
    void* out = out_buf.get<uint8_t>() + shift;
    ASSERT_STATUS_OK(
        FakeQuantForward(gpu_, dtype_, layout_, gpu_params_, dx.get<uint8_t>() + shift, out));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    bool guard_ok = false;
    std::vector<uint8_t> got = out_buf.Download(&guard_ok);
    ASSERT_TRUE(guard_ok) << "write past the end of y; " << Where();
    got.erase(got.begin(), got.begin() + shift);
    EXPECT_EQ(CompareElems(dtype_, want, got, numel_), "") << Where();
  }
}

TEST_P(CudaVsCpuTest, QuantizePackBytesIdentical) {
  for (const Rounding mode : {Rounding::kNearest, Rounding::kStochastic}) {
    std::mt19937_64 rng(seed_);
    RoundingSpec rounding;
    rounding.mode = mode;
    rounding.seed = rng();
    rounding.step = rng() >> (rng() % 64);  // small and large steps
    std::vector<uint8_t> want(packed_bytes_, 0xEE);
    ASSERT_STATUS_OK(QuantizePack(cpu_, dtype_, layout_, cpu_params_, rounding, x_.data(),
                                  offsets_.data(), want.data(), packed_bytes_));
    for (int misaligned = 0; misaligned < 2; ++misaligned) {
      SCOPED_TRACE(std::string(mode == Rounding::kNearest ? "nearest" : "stochastic") +
                   (misaligned ? ", misaligned x" : ", aligned x"));
      const size_t shift = misaligned ? DTypeSize(dtype_) : 0;
      DeviceBuffer dx(Bytes() + shift), dp(packed_bytes_);
      ASSERT_TRUE(dx.ok() && dp.ok());
      ASSERT_CUDA_OK(
          cudaMemcpy(dx.get<uint8_t>() + shift, x_.data(), Bytes(), cudaMemcpyHostToDevice));
      ASSERT_STATUS_OK(QuantizePack(gpu_, dtype_, layout_, gpu_params_, rounding,
                                    dx.get<uint8_t>() + shift, d_offsets_.get<int64_t>(),
                                    dp.get<uint8_t>(), packed_bytes_));
      ASSERT_CUDA_OK(cudaDeviceSynchronize());
      bool guard_ok = false;
      const std::vector<uint8_t> got = dp.Download(&guard_ok);
      ASSERT_TRUE(guard_ok) << "write past the end of the packed buffer; " << Where();
      EXPECT_EQ(CompareBytes(want, got), "") << Where();
    }
  }
}

TEST_P(CudaVsCpuTest, UnpackDequantizeBitIdentical) {
  // Codes from the CPU packer, then unpack on both sides.
  std::vector<uint8_t> packed(packed_bytes_);
  ASSERT_STATUS_OK(QuantizePack(cpu_, dtype_, layout_, cpu_params_, RoundingSpec{}, x_.data(),
                                offsets_.data(), packed.data(), packed_bytes_));
  std::vector<uint8_t> want(Bytes());
  ASSERT_STATUS_OK(UnpackDequantize(cpu_, dtype_, layout_, cpu_params_, packed.data(),
                                    packed_bytes_, offsets_.data(), want.data()));
  const DeviceBuffer dp = ToDevice(packed);
  for (int misaligned = 0; misaligned < 2; ++misaligned) {
    SCOPED_TRACE(misaligned ? "misaligned y" : "aligned y");
    const size_t shift = misaligned ? DTypeSize(dtype_) : 0;
    DeviceBuffer dy(Bytes() + shift);
    ASSERT_TRUE(dy.ok() && dp.ok());
    ASSERT_STATUS_OK(UnpackDequantize(gpu_, dtype_, layout_, gpu_params_, dp.get<uint8_t>(),
                                      packed_bytes_, d_offsets_.get<int64_t>(),
                                      dy.get<uint8_t>() + shift));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    bool guard_ok = false;
    std::vector<uint8_t> got = dy.Download(&guard_ok);
    ASSERT_TRUE(guard_ok) << "write past the end of y; " << Where();
    got.erase(got.begin(), got.begin() + shift);
    EXPECT_EQ(CompareElems(dtype_, want, got, numel_), "") << Where();
  }
}

TEST_P(CudaVsCpuTest, LsqBackwardMatches) {
  const int64_t groups = layout_.groups;
  std::vector<uint8_t> want_dx(Bytes());
  std::vector<float> want_s(groups, -1.0f), want_b(groups, -1.0f);
  std::vector<double> cpu_ws(LsqBackwardWorkspaceBytes(cpu_, layout_) / sizeof(double) + 1);
  ASSERT_STATUS_OK(LsqBackward(cpu_, dtype_, layout_, cpu_params_, x_.data(), dy_.data(),
                               want_dx.data(), want_s.data(), want_b.data(), cpu_ws.data(),
                               cpu_ws.size() * sizeof(double)));

  // sum_i |term_i| per group, for the tolerance.
  std::vector<double> abs_s(groups, 0.0), abs_b(groups, 0.0);
  for (int64_t i = 0; i < numel_; ++i) {
    const int64_t g = (i / layout_.inner) % groups;
    const detail::LsqGrad t = detail::LsqElementGrad(
        LoadElem(dtype_, x_, i), LoadElem(dtype_, dy_, i), detail::LoadGroupQuant(cpu_params_, g));
    abs_s[g] += std::fabs(t.dscale);
    abs_b[g] += std::fabs(t.doffset);
  }

  const size_t ws_bytes = LsqBackwardWorkspaceBytes(gpu_, layout_);
  DeviceBuffer ws(ws_bytes);
  ASSERT_TRUE(ws.ok());
  std::vector<float> first_s;
  // 0: out of place; 1: grad_x aliases grad_y and no offset sum; 2: misaligned; 3: repeat of 0.
  for (int mode = 0; mode < 4; ++mode) {
    SCOPED_TRACE("mode " + std::to_string(mode));
    const size_t shift = mode == 2 ? DTypeSize(dtype_) : 0;
    DeviceBuffer dxb(Bytes() + shift), dyb(Bytes() + shift), dgx(Bytes() + shift);
    DeviceBuffer ds(groups * sizeof(float)), db(groups * sizeof(float));
    ASSERT_TRUE(dxb.ok() && dyb.ok() && dgx.ok() && ds.ok() && db.ok());
    ASSERT_CUDA_OK(
        cudaMemcpy(dxb.get<uint8_t>() + shift, x_.data(), Bytes(), cudaMemcpyHostToDevice));
    ASSERT_CUDA_OK(
        cudaMemcpy(dyb.get<uint8_t>() + shift, dy_.data(), Bytes(), cudaMemcpyHostToDevice));
    const DeviceBuffer& gx_buf = mode == 1 ? dyb : dgx;
    const bool with_offset = mode != 1;
    ASSERT_STATUS_OK(LsqBackward(gpu_, dtype_, layout_, gpu_params_, dxb.get<uint8_t>() + shift,
                                 dyb.get<uint8_t>() + shift, gx_buf.get<uint8_t>() + shift,
                                 ds.get<float>(), with_offset ? db.get<float>() : nullptr, ws.get(),
                                 ws_bytes));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    bool guard_ok = false;
    std::vector<uint8_t> got_dx = gx_buf.Download(&guard_ok);
    ASSERT_TRUE(guard_ok) << "write past the end of grad_x; " << Where();
    got_dx.erase(got_dx.begin(), got_dx.begin() + shift);
    EXPECT_EQ(CompareElems(dtype_, want_dx, got_dx, numel_), "") << "grad_x; " << Where();

    std::vector<float> got_s(groups), got_b(groups);
    bool ok_s = false, ok_b = false;
    std::vector<uint8_t> raw_s = ds.Download(&ok_s), raw_b = db.Download(&ok_b);
    ASSERT_TRUE(ok_s && ok_b) << "write past the end of a sum; " << Where();
    if (groups > 0) {
      std::memcpy(got_s.data(), raw_s.data(), groups * sizeof(float));
      std::memcpy(got_b.data(), raw_b.data(), groups * sizeof(float));
    }
    int64_t bad = 0;
    for (int64_t g = 0; g < groups; ++g) {
      for (int which = 0; which < (with_offset ? 2 : 1); ++which) {
        const float w = which == 0 ? want_s[g] : want_b[g];
        const float o = which == 0 ? got_s[g] : got_b[g];
        const double abs_sum = which == 0 ? abs_s[g] : abs_b[g];
        if (std::isnan(w) && std::isnan(o)) continue;
        const double tol = kSumRelTol * std::fabs(w) + kSumAbsSumTol * abs_sum + kSumAbsTol;
        if (!(std::fabs(static_cast<double>(w) - o) <= tol) && bad++ < 5) {
          ADD_FAILURE() << (which == 0 ? "grad_scale_sum[" : "grad_offset_sum[") << g
                        << "]: cpu=" << w << " cuda=" << o << " tol=" << tol << "; " << Where();
        }
      }
    }
    EXPECT_EQ(bad, 0);
    if (!with_offset) {
      // grad_offset_sum was nullptr: its buffer must be untouched.
      for (uint8_t byte : raw_b) ASSERT_EQ(byte, kPoison);
    }
    if (mode == 0) first_s = got_s;
    if (mode == 3) {
      EXPECT_EQ(std::memcmp(first_s.data(), got_s.data(), groups * sizeof(float)), 0)
          << "the CUDA sums are not deterministic";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Sweep, CudaVsCpuTest,
    ::testing::Combine(::testing::ValuesIn(TestShapes()), ::testing::ValuesIn(TestBits()),
                       ::testing::Values(DType::kFloat32, DType::kBFloat16, DType::kFloat16),
                       ::testing::Bool()),
    ParamName);

INSTANTIATE_TEST_SUITE_P(
    Large, CudaVsCpuTest,
    ::testing::Combine(::testing::ValuesIn(LargeTestShapes()), ::testing::Values(4, 0 /*mixed*/),
                       ::testing::Values(DType::kFloat32, DType::kBFloat16, DType::kFloat16),
                       ::testing::Bool()),
    ParamName);

// The shapes and dtypes `splitq bench kernels` times on CUDA, at 4 bits and mixed widths.
std::vector<Param> PerfParams() {
  std::vector<Param> out;
  for (const auto& [shape, dtypes] : PerfShapes(Device::kCuda)) {
    for (const DType dtype : dtypes) {
      for (const int bits : {4, 0}) out.emplace_back(shape, bits, dtype, false);
    }
  }
  return out;
}
INSTANTIATE_TEST_SUITE_P(Perf, CudaVsCpuTest, ::testing::ValuesIn(PerfParams()), ParamName);

// ---- the channel rotation (kernels/rotate.h) -------------------------------------------

// Every per-channel shape of the table (the sweep's, the large ones and the benchmark's) x
// every block that divides its channels and that CUDA runs (2..1024 channels last, up to 64
// with inner > 1) x dtype x direction, out of place, in place and misaligned by one element:
// CUDA against the CPU float32 path on the same (dtype-rounded) values, the result rounded
// to the dtype once, bit for bit. Values: normal, with a few large outliers, zeros and, in
// some cases, Inf (which gives NaN in its block where it meets -Inf or Inf - Inf).
struct RotationShape {
  ShapeCase shape;
  bool perf;
};

std::vector<RotationShape> RotationShapes() {
  std::vector<RotationShape> out;
  for (const ShapeCase& s : TestShapes()) {
    if (s.granularity == Granularity::kChannel) out.push_back({s, false});
  }
  for (const ShapeCase& s : LargeTestShapes()) out.push_back({s, false});
  for (const auto& [s, dtypes] : PerfShapes(Device::kCuda)) out.push_back({s, true});
  return out;
}

TEST(CudaVsCpuRotation, BitIdenticalToTheCpuPath) {
  SKIP_WITHOUT_CUDA();
  const ExecContext cpu{Device::kCpu, nullptr, 0};
  const ExecContext gpu{Device::kCuda, nullptr, 0};
  int cases = 0, unsupported = 0;
  for (const RotationShape& rs : RotationShapes()) {
    const ShapeCase& sc = rs.shape;
    const auto layout_or = MakeGroupLayout(sc.shape, sc.granularity, sc.axis);
    ASSERT_TRUE(layout_or.ok()) << sc.name << ": " << layout_or.status();
    const GroupLayout layout = *layout_or;
    const int64_t n = layout.numel();
    std::mt19937 rng(static_cast<uint32_t>(std::hash<std::string>{}(sc.name)));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_real_distribution<float> unit(0.0f, 1.0f);
    const bool with_inf = std::hash<std::string>{}(sc.name) % 3 == 0;
    std::vector<float> values(static_cast<size_t>(n));
    for (float& v : values) {
      const float kind = unit(rng);
      v = normal(rng);
      if (kind < 0.01f) v *= 1000.0f;
      if (kind > 0.99f) v = 0.0f;
      if (with_inf && kind > 0.4995f && kind < 0.5f) v = std::numeric_limits<float>::infinity();
    }
    for (int64_t block = 1; block <= 1024 && block <= layout.groups; block *= 2) {
      if (layout.groups % block != 0) continue;
      if (rs.perf && block != 256 && block != 64 && block != 2) continue;  // the big ones: few
      for (const DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
        if (!RotateChannelsSupported(gpu, dtype, layout, block)) {
          ++unsupported;  // refused before anything is read (the buffer is a stand-in)
          const DeviceBuffer stand_in(64);
          EXPECT_EQ(RotateChannels(gpu, dtype, layout, block, 7, stand_in.get<uint32_t>(), false,
                                   stand_in.get(), stand_in.get())
                        .code(),
                    n == 0 ? absl::StatusCode::kOk : absl::StatusCode::kUnimplemented)
              << sc.name << " block " << block;
          continue;
        }
        const uint64_t seed = 1000 + static_cast<uint64_t>(block);
        const std::vector<uint32_t> bits = RotationSignBits(seed, layout.groups);
        const DeviceBuffer d_bits = ToDevice(bits);
        std::vector<uint8_t> x(static_cast<size_t>(n) * DTypeSize(dtype));
        std::vector<float> xf(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) {
          StoreElem(dtype, x, i, values[static_cast<size_t>(i)]);
          xf[static_cast<size_t>(i)] = LoadElem(dtype, x, i);
        }
        for (const bool inverse : {false, true}) {
          std::vector<float> yf(xf.size());
          ASSERT_STATUS_OK(RotateChannels(cpu, DType::kFloat32, layout, block, seed, nullptr,
                                          inverse, xf.data(), yf.data()));
          std::vector<uint8_t> want(x.size());
          for (int64_t i = 0; i < n; ++i) StoreElem(dtype, want, i, yf[static_cast<size_t>(i)]);
          const std::string where = sc.name + " block " + std::to_string(block) + " " +
                                    DTypeName(dtype) + (inverse ? " inverse" : " forward");
          // Out of place; in place; one element off 16-byte alignment (the scalar fallback).
          for (int mode = 0; mode < 3; ++mode) {
            const size_t shift = mode == 2 ? DTypeSize(dtype) : 0;
            DeviceBuffer d_x(x.size() + shift), d_y(x.size() + shift);
            ASSERT_TRUE(d_x.ok() && d_y.ok());
            ASSERT_CUDA_OK(
                cudaMemcpy(d_x.get<uint8_t>() + shift, x.data(), x.size(), cudaMemcpyHostToDevice));
            uint8_t* in = d_x.get<uint8_t>() + shift;
            uint8_t* out = mode == 1 ? in : d_y.get<uint8_t>() + shift;
            ASSERT_STATUS_OK(RotateChannels(gpu, dtype, layout, block, seed, d_bits.get<uint32_t>(),
                                            inverse, in, out));
            ASSERT_CUDA_OK(cudaDeviceSynchronize());
            std::vector<uint8_t> got(x.size());
            ASSERT_CUDA_OK(cudaMemcpy(got.data(), out, got.size(), cudaMemcpyDeviceToHost));
            bool guard_ok = true;
            (void)(mode == 1 ? d_x : d_y).Download(&guard_ok);
            EXPECT_TRUE(guard_ok) << where << " mode " << mode << ": wrote past the end";
            const std::string diff = CompareElems(dtype, want, got, n);
            EXPECT_TRUE(diff.empty()) << where << " mode " << mode << ": " << diff;
          }
          ++cases;
        }
      }
    }
  }
  std::printf("rotation: %d cases CUDA == CPU, %d (shape, block, dtype) not run on CUDA\n", cases,
              unsupported);
  EXPECT_GT(cases, 300);
}

}  // namespace
}  // namespace splitq::kernels

#include "kernels/rotate.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/detail/cuda_launchers.h"

namespace splitq::kernels {
namespace {

uint64_t SplitMix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// One butterfly pass over a run: (p[i], q[i]) <- (p[i] + q[i], p[i] - q[i]) for i < n.
inline void ButterflyRun(float* p, float* q, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float u = p[i], v = q[i];
    p[i] = u + v;
    q[i] = u - v;
  }
}

// One block of b >= 4 contiguous channels (inner == 1): dst = f_out * (H (f_in * src)), with
// the passes h = 1 and h = 2 done together as 4-point transforms (reading src, which may be
// dst) and the wider ones as vectorised loops over the block, which stays in L1. The same
// float operations, in the same order, as the general path below.
void FwhtBlock(const float* src, float* dst, int64_t b, const float* f_in, const float* f_out) {
  for (int64_t j = 0; j < b; j += 4) {
    const float a = src[j] * f_in[j], c1 = src[j + 1] * f_in[j + 1];
    const float c2 = src[j + 2] * f_in[j + 2], c3 = src[j + 3] * f_in[j + 3];
    const float s0 = a + c1, d0 = a - c1, s1 = c2 + c3, d1 = c2 - c3;
    dst[j] = s0 + s1;
    dst[j + 1] = d0 + d1;
    dst[j + 2] = s0 - s1;
    dst[j + 3] = d0 - d1;
  }
  for (int64_t h = 4; h < b; h <<= 1) {
    for (int64_t a = 0; a < b; a += 2 * h) ButterflyRun(dst + a, dst + a + h, h);
  }
  for (int64_t c = 0; c < b; ++c) dst[c] *= f_out[c];
}

}  // namespace

float RotationSign(uint64_t seed, int64_t channel) {
  return (SplitMix64(SplitMix64(seed) + static_cast<uint64_t>(channel)) & 1) != 0 ? -1.0f : 1.0f;
}

namespace {

absl::Status CheckBlock(const GroupLayout& layout, int64_t block) {
  if (block < 1 || (block & (block - 1)) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("rotation block ", block, " is not a power of two"));
  }
  if (layout.groups % block != 0) {
    return absl::InvalidArgumentError(absl::StrCat("rotation block ", block, " does not divide ",
                                                   layout.groups, " channels (pad them first)"));
  }
  return absl::OkStatus();
}

}  // namespace

std::vector<uint32_t> RotationSignBits(uint64_t seed, int64_t channels) {
  std::vector<uint32_t> bits(static_cast<size_t>((channels + 31) / 32), 0);
  for (int64_t c = 0; c < channels; ++c) {
    if (RotationSign(seed, c) < 0) bits[static_cast<size_t>(c / 32)] |= 1u << (c % 32);
  }
  return bits;
}

bool RotateChannelsSupported(const ExecContext& ctx, DType dtype, const GroupLayout& layout,
                             int64_t block) {
  if (ctx.device == Device::kCpu) return dtype == DType::kFloat32;
  if (!CudaKernelsBuilt()) return false;
  return layout.inner == 1 ? block <= 1024 : block <= 64;
}

absl::Status RotateChannels(const ExecContext& ctx, DType dtype, const GroupLayout& layout,
                            int64_t block, uint64_t seed, const uint32_t* sign_bits, bool inverse,
                            const void* x, void* y) {
  if (ctx.device == Device::kCpu) {
    if (dtype != DType::kFloat32) {
      return absl::UnimplementedError("RotateChannels on the CPU takes float32 only");
    }
    return RotateChannels(layout, block, seed, inverse, static_cast<const float*>(x),
                          static_cast<float*>(y));
  }
  SPLITQ_RETURN_IF_ERROR(CheckBlock(layout, block));
  if (layout.numel() == 0) return absl::OkStatus();
  if (x == nullptr || y == nullptr) return absl::InvalidArgumentError("RotateChannels: null data");
  if (sign_bits == nullptr) {
    return absl::InvalidArgumentError("RotateChannels on CUDA: null sign_bits");
  }
  if (CudaKernelsBuilt() && !RotateChannelsSupported(ctx, dtype, layout, block)) {
    return absl::UnimplementedError(absl::StrCat("RotateChannels on CUDA: block ", block,
                                                 " with inner ", layout.inner,
                                                 " (inner > 1 takes blocks up to 64)"));
  }
  SPLITQ_CUDA_OR_ERROR("RotateChannels", cuda::RotateChannels(ctx.stream, dtype, layout, block,
                                                              sign_bits, inverse, x, y));
}

absl::Status RotateChannels(const GroupLayout& layout, int64_t block, uint64_t seed, bool inverse,
                            const float* x, float* y) {
  SPLITQ_RETURN_IF_ERROR(CheckBlock(layout, block));
  const int64_t n = layout.numel();
  if (n == 0) return absl::OkStatus();
  if (x == nullptr || y == nullptr) return absl::InvalidArgumentError("RotateChannels: null data");
  const int64_t channels = layout.groups, inner = layout.inner;
  const float norm = 1.0f / std::sqrt(static_cast<float>(block));
  std::vector<float> sign(static_cast<size_t>(channels));
  for (int64_t c = 0; c < channels; ++c) sign[static_cast<size_t>(c)] = RotationSign(seed, c);
  if (inner == 1 && block >= 4) {  // channels last: block by block, the factors fused
    // Forward: signs in, 1/sqrt(b) out. Inverse: nothing in (multiplying by 1 is exact),
    // signs times 1/sqrt(b) out.
    std::vector<float> f_in(static_cast<size_t>(channels), 1.0f), f_out(f_in);
    for (size_t c = 0; c < sign.size(); ++c) {
      if (!inverse) f_in[c] = sign[c];
      f_out[c] = inverse ? sign[c] * norm : norm;
    }
#pragma omp parallel for schedule(static) if (n > (int64_t{1} << 16))
    for (int64_t o = 0; o < layout.outer; ++o) {
      for (int64_t start = 0; start < channels; start += block) {
        const int64_t at = o * channels + start;
        FwhtBlock(x + at, y + at, block, f_in.data() + start, f_out.data() + start);
      }
    }
    return absl::OkStatus();
  }
  if (x != y) std::memcpy(y, x, static_cast<size_t>(n) * sizeof(float));
#pragma omp parallel for schedule(static) if (n > (int64_t{1} << 16))
  for (int64_t o = 0; o < layout.outer; ++o) {
    float* plane = y + o * channels * inner;
    // Forward: signs first. Inverse: the transform first, signs last (R^T = diag(s) H / sqrt(b)).
    const auto apply_signs = [&](float scale) {
      for (int64_t c = 0; c < channels; ++c) {
        const float f = sign[static_cast<size_t>(c)] * scale;
        float* row = plane + c * inner;
        for (int64_t i = 0; i < inner; ++i) row[i] *= f;
      }
    };
    if (!inverse) apply_signs(1.0f);
    for (int64_t start = 0; start < channels; start += block) {
      for (int64_t h = 1; h < block; h <<= 1) {
        // Channels a..a+h-1 pair with a+h..a+2h-1 at the same inner position: their rows are
        // two contiguous runs of h * inner elements, h * inner apart.
        for (int64_t a = start; a < start + block; a += 2 * h) {
          ButterflyRun(plane + a * inner, plane + (a + h) * inner, h * inner);
        }
      }
    }
    if (inverse) {
      apply_signs(norm);
    } else {
      for (int64_t i = 0; i < channels * inner; ++i) plane[i] *= norm;
    }
  }
  return absl::OkStatus();
}

}  // namespace splitq::kernels

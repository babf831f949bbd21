// Tests of the torch-free wire format (quant/wire_format.h) and CRC-32C (quant/crc32c.h).
//
// Round trips are checked against a dequantization computed here, independently of the
// kernels (own quantizer arithmetic and own bf16/fp16 rounding). Every malformed input has
// its own test asserting the status code and that the message names the problem.
#include "quant/wire_format.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "base/status_macros.h"
#include "quant/crc32c.h"
#include "quant/entropy_coding.h"

// ---- allocation tracking ----------------------------------------------------------------
// A replaced global operator new records the largest single allocation made while a
// ScopedAllocTracker is alive, so that the decoder's "never allocate more than the input"
// promise can be asserted.
// GCC flags free() of operator new's memory once both are inlined; they match here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
namespace {
std::atomic<bool> g_track_allocs{false};
std::atomic<size_t> g_max_alloc{0};
}  // namespace

void* operator new(size_t n) {
  if (g_track_allocs.load(std::memory_order_relaxed)) {
    size_t seen = g_max_alloc.load(std::memory_order_relaxed);
    while (n > seen && !g_max_alloc.compare_exchange_weak(seen, n)) {
    }
  }
  void* p = std::malloc(n == 0 ? 1 : n);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }

namespace splitq::quant {
namespace {

using kernels::DType;

class ScopedAllocTracker {
 public:
  ScopedAllocTracker() {
    g_max_alloc = 0;
    g_track_allocs = true;
  }
  ~ScopedAllocTracker() { g_track_allocs = false; }
  size_t max_alloc() const { return g_max_alloc.load(); }
};

// Expects `status` to have `code` and a message containing every one of `needles`.
void ExpectError(const absl::Status& status, absl::StatusCode code,
                 std::initializer_list<const char*> needles) {
  EXPECT_EQ(status.code(), code) << status;
  for (const char* needle : needles) {
    EXPECT_NE(status.message().find(needle), absl::string_view::npos)
        << "message \"" << status.message() << "\" does not mention \"" << needle << "\"";
  }
}

absl::Span<const uint8_t> AsBytes(const std::string& s) {
  return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

// ---- independent float / bf16 / fp16 helpers ----------------------------------------------

float FloatFromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
uint32_t BitsFromFloat(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// Rounds a finite float to the nearest value with `mantissa_bits` explicit mantissa bits and
// minimum normal exponent `min_exp` (ties to even, in double, exact), overflowing to Inf
// above `max_finite` (+ half a quantum).
double RoundToFormat(float x, int mantissa_bits, int min_exp, double max_finite) {
  if (x == 0.0f) return x;
  int e = std::ilogb(x);
  if (e < min_exp) e = min_exp;
  const double quantum = std::ldexp(1.0, e - mantissa_bits);
  const double r = std::nearbyint(static_cast<double>(x) / quantum) * quantum;
  if (std::fabs(r) > max_finite) return std::copysign(HUGE_VAL, x);
  return r;
}
float RoundToDType(float x, DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return x;
    case DType::kBFloat16:
      return static_cast<float>(RoundToFormat(x, 7, -126, 3.3895313892515355e38));
    case DType::kFloat16:
      return static_cast<float>(RoundToFormat(x, 10, -14, 65504.0));
  }
  return x;
}
// Storage bits of a float that is exactly representable in `dtype`.
void StoreExact(float v, DType dtype, uint8_t* dst) {
  if (dtype == DType::kFloat32) {
    std::memcpy(dst, &v, 4);
    return;
  }
  uint16_t h = 0;
  if (dtype == DType::kBFloat16) {
    h = static_cast<uint16_t>(BitsFromFloat(v) >> 16);
  } else {
    const uint16_t sign = std::signbit(v) ? 0x8000 : 0;
    const double a = std::fabs(static_cast<double>(v));
    if (a == 0.0) {
      h = sign;
    } else if (std::ilogb(a) < -14) {
      h = static_cast<uint16_t>(sign | static_cast<uint16_t>(a / std::ldexp(1.0, -24)));
    } else {
      const int e = std::ilogb(a);
      const int mant = static_cast<int>(a / std::ldexp(1.0, e - 10)) - 1024;
      h = static_cast<uint16_t>(sign | ((e + 15) << 10) | mant);
    }
  }
  std::memcpy(dst, &h, 2);
}
float LoadAny(const uint8_t* src, DType dtype) {
  if (dtype == DType::kFloat32) {
    float f;
    std::memcpy(&f, src, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, src, 2);
  if (dtype == DType::kBFloat16) return FloatFromBits(static_cast<uint32_t>(h) << 16);
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  const int exponent = (h >> 10) & 0x1f;
  const int mantissa = h & 0x3ff;
  if (exponent == 0x1f) return static_cast<float>(mantissa ? NAN : sign * HUGE_VAL);
  if (exponent == 0) return static_cast<float>(sign * std::ldexp(mantissa, -24));
  return static_cast<float>(sign * std::ldexp(1024 + mantissa, exponent - 25));
}

// One rounding per operation, as the kernels do (no FMA contraction).
float Rounded(float v) {
  volatile float r = v;
  return r;
}

// The wire quantizer, written out: inv = 1/s, v = (x - beta) * inv, q = clamp(rint(v), 0,
// 2^k - 1), x_hat = q * s + beta (then rounded to the dtype).
float ReferenceDequant(float x, float scale, float offset, int bits) {
  const float inv = Rounded(1.0f / scale);
  float v = Rounded(Rounded(x - offset) * inv);
  const float qmax = static_cast<float>((1 << bits) - 1);
  if (!(v > 0.0f)) v = 0.0f;
  if (v > qmax) v = qmax;
  const float q = std::nearbyint(v);
  return Rounded(Rounded(q * scale) + offset);
}

int64_t Numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (const int64_t d : shape) n *= d;
  return n;
}

// Group of row-major element i for group_axis.
int64_t GroupOf(int64_t i, const std::vector<int64_t>& shape, int axis) {
  if (axis < 0) return 0;
  int64_t inner = 1;
  for (size_t a = axis + 1; a < shape.size(); ++a) inner *= shape[a];
  return (i / inner) % shape[axis];
}

// ---- fixtures -----------------------------------------------------------------------------

// The worked example of docs/wire-format.md: shape [3, 2], group_axis 1, bits {3, 5}.
struct Example {
  std::vector<float> x = {-1.0f, 0.0f, 0.3f, 1.3f, 1.6f, 7.9f};
  std::vector<int64_t> shape = {3, 2};
  std::vector<uint8_t> bits = {3, 5};
  std::vector<float> scales = {0.5f, 0.25f};
  std::vector<float> offsets = {-1.0f, 0.0f};
};

Frame ExampleFrame() {
  Example e;
  auto frame = EncodeFrame(e.x.data(), DType::kFloat32, e.shape, 1, e.bits, e.scales, e.offsets,
                           kernels::RoundingSpec{});
  EXPECT_TRUE(frame.ok()) << frame.status();
  frame->session_id = 7;
  frame->step = 42;
  frame->kind = FrameKind::kActivation;
  frame->bitmap_version = 1;
  SealFrame(&*frame);
  return *std::move(frame);
}

std::string ExampleBytes() { return SerializeFrame(ExampleFrame()); }

// Byte offsets in the example encoding (rank 2, 2 groups, bit map present, 4 payload bytes).
constexpr size_t kOffVersion = 4, kOffKind = 5, kOffDType = 6, kOffRank = 7, kOffFlags = 8,
                 kOffReserved = 9, kOffBitmapVersion = 12, kOffSession = 16, kOffStep = 24,
                 kOffAxis = 32, kOffShape = 36, kOffGroups = 52, kOffBits = 56, kOffScales = 58,
                 kOffOffsets = 66, kOffPayloadBytes = 74, kOffPayload = 82, kOffCrc = 86,
                 kExampleSize = 90;

void PutLe(std::string* s, size_t at, uint64_t v, int bytes) {
  for (int b = 0; b < bytes; ++b) (*s)[at + b] = static_cast<char>(v >> (8 * b));
}

// Seals, serializes, parses (must succeed) and validates a frame.
absl::StatusOr<std::vector<uint8_t>> Resealed(Frame f, const FrameLimits& limits = {},
                                              const std::vector<uint8_t>* known = nullptr,
                                              uint32_t known_version = 0) {
  SealFrame(&f);
  const std::string bytes = SerializeFrame(f);
  auto parsed = ParseFrame(AsBytes(bytes));
  EXPECT_TRUE(parsed.ok()) << parsed.status();
  if (!parsed.ok()) return parsed.status();
  return ValidateFrame(*parsed, known, known_version, limits);
}

absl::StatusOr<std::vector<uint8_t>> ParseAndValidate(const std::string& bytes) {
  SPLITQ_ASSIGN_OR_RETURN(const Frame f, ParseFrame(AsBytes(bytes)));
  return ValidateFrame(f, nullptr, 0, FrameLimits{});
}

// ---- CRC-32C --------------------------------------------------------------------------------

uint32_t BitwiseCrc32c(const uint8_t* p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int b = 0; b < 8; ++b) c = (c & 1u) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
  }
  return ~c;
}

TEST(Crc32cTest, KnownVectors) {
  const std::string digits = "123456789";
  EXPECT_EQ(Crc32c(AsBytes(digits)), 0xE3069283u);
  EXPECT_EQ(Crc32c({}), 0u);
  EXPECT_EQ(Crc32cExtend(0, nullptr, 0), 0u);
  const std::vector<uint8_t> zeros(32, 0x00);
  EXPECT_EQ(Crc32c(zeros), 0x8A9136AAu);
  const std::vector<uint8_t> ones(32, 0xFF);  // RFC 3720 B.4
  EXPECT_EQ(Crc32c(ones), 0x62A8AB43u);
  std::vector<uint8_t> ascending(32);
  for (int i = 0; i < 32; ++i) ascending[i] = static_cast<uint8_t>(i);
  EXPECT_EQ(Crc32c(ascending), 0x46DD794Eu);
}

TEST(Crc32cTest, MatchesBitwiseAndExtendsAtEverySplit) {
  std::mt19937 rng(1);
  std::vector<uint8_t> data(300);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  for (size_t n = 0; n <= data.size(); n += 7) {
    const uint32_t whole = Crc32c(absl::MakeConstSpan(data.data(), n));
    ASSERT_EQ(whole, BitwiseCrc32c(data.data(), n)) << n;
    ASSERT_EQ(Crc32cExtendSoftware(0, data.data(), n), whole) << n;  // the other path
    for (size_t split = 0; split <= n; split += 5) {
      ASSERT_EQ(Crc32cExtend(Crc32cExtend(0, data.data(), split), data.data() + split, n - split),
                whole);
    }
  }
  // Unaligned starts.
  for (size_t start = 1; start < 8; ++start) {
    EXPECT_EQ(Crc32cExtend(0, data.data() + start, 100), BitwiseCrc32c(data.data() + start, 100));
    EXPECT_EQ(Crc32cExtendSoftware(0, data.data() + start, 100),
              BitwiseCrc32c(data.data() + start, 100));
  }
}

// ---- encoding -------------------------------------------------------------------------------

TEST(WireFormatTest, ExampleFrameBytes) {
  // The worked example of docs/wire-format.md, byte for byte.
  const std::string bytes = ExampleBytes();
  static const uint8_t kExpected[] = {
      0x53, 0x51, 0x46, 0x31, 0x01, 0x01, 0x00, 0x02, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,
      0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x2a, 0x00, 0x00, 0x00, 0x00, 0x00,
      0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02,
      0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x03, 0x05, 0x00, 0x00,
      0x00, 0x3f, 0x00, 0x00, 0x80, 0x3e, 0x00, 0x00, 0x80, 0xbf, 0x00, 0x00, 0x00, 0x00, 0x04,
      0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x58, 0x01, 0xa0, 0x7c, 0x33, 0x07, 0x1e, 0x48};
  ASSERT_EQ(bytes.size(), kExampleSize);
  ASSERT_EQ(sizeof(kExpected), kExampleSize);
  for (size_t i = 0; i < kExampleSize; ++i) {
    EXPECT_EQ(static_cast<uint8_t>(bytes[i]), kExpected[i]) << "byte " << i;
  }
  uint32_t crc = 0;
  for (int b = 0; b < 4; ++b)
    crc |= static_cast<uint32_t>(static_cast<uint8_t>(bytes[kOffCrc + b])) << (8 * b);
  EXPECT_EQ(crc, Crc32c(AsBytes(bytes).subspan(0, kOffCrc)));
  EXPECT_EQ(crc, 0x481E0733u);  // docs/wire-format.md
}

TEST(WireFormatTest, ComputeFrameCrcIsCrcOfTheSerializedBytes) {
  Frame f = ExampleFrame();
  f.crc32c = 0;  // the CRC does not cover itself
  const std::string bytes = SerializeFrame(f);
  EXPECT_EQ(ComputeFrameCrc(f), Crc32c(AsBytes(bytes).subspan(0, bytes.size() - 4)));
  f.bits.clear();  // without a bit map
  const std::string short_bytes = SerializeFrame(f);
  EXPECT_EQ(short_bytes.size(), bytes.size() - 2);
  EXPECT_EQ(ComputeFrameCrc(f), Crc32c(AsBytes(short_bytes).subspan(0, short_bytes.size() - 4)));
}

TEST(WireFormatTest, ParseRestoresEveryField) {
  const Frame f = ExampleFrame();
  const std::string bytes = SerializeFrame(f);
  auto parsed = ParseFrame(AsBytes(bytes));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->session_id, 7u);
  EXPECT_EQ(parsed->step, 42u);
  EXPECT_EQ(parsed->kind, FrameKind::kActivation);
  EXPECT_EQ(parsed->dtype, DType::kFloat32);
  EXPECT_EQ(parsed->shape, f.shape);
  EXPECT_EQ(parsed->group_axis, 1);
  EXPECT_EQ(parsed->bitmap_version, 1u);
  EXPECT_EQ(parsed->bits, f.bits);
  EXPECT_EQ(parsed->scales, f.scales);
  EXPECT_EQ(parsed->offsets, f.offsets);
  EXPECT_EQ(parsed->payload, f.payload);
  EXPECT_EQ(parsed->crc32c, f.crc32c);
  EXPECT_EQ(SerializeFrame(*parsed), bytes);
  auto bits = ValidateFrame(*parsed, nullptr, 0, FrameLimits{});
  ASSERT_TRUE(bits.ok()) << bits.status();
  std::vector<float> y(6);
  ASSERT_TRUE(DecodePayload(*parsed, *bits, y.data()).ok());
  EXPECT_EQ(y, (std::vector<float>{-1.0f, 0.0f, 0.5f, 1.25f, 1.5f, 7.75f}));
}

// One random round trip: EncodeFrame -> SealFrame -> SerializeFrame -> ParseFrame ->
// ValidateFrame -> DecodePayload, against the reference.
void RoundTrip(const std::vector<int64_t>& shape, int axis, DType dtype, std::mt19937& rng,
               kernels::Rounding rounding = kernels::Rounding::kNearest) {
  SCOPED_TRACE(::testing::Message()
               << "shape rank " << shape.size() << " [" << shape[0]
               << (shape.size() > 1 ? ",..." : "") << "] numel " << Numel(shape) << " axis " << axis
               << " dtype " << kernels::DTypeName(dtype));
  const int64_t numel = Numel(shape);
  const int64_t groups = axis < 0 ? 1 : shape[axis];
  const size_t esize = kernels::DTypeSize(dtype);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  const float magnitude = std::exp(unit(rng) * 9.0f - 4.5f);  // ~0.01 .. 90
  std::vector<float> x(numel);
  std::vector<uint8_t> raw(numel * esize);
  for (int64_t i = 0; i < numel; ++i) {
    x[i] = RoundToDType(normal(rng) * magnitude + magnitude * 0.3f, dtype);
    StoreExact(x[i], dtype, raw.data() + i * esize);
  }
  std::vector<uint8_t> bits(groups);
  for (auto& b : bits) b = static_cast<uint8_t>(1 + rng() % 8);
  std::vector<float> lo(groups, INFINITY), hi(groups, -INFINITY);
  for (int64_t i = 0; i < numel; ++i) {
    const int64_t g = GroupOf(i, shape, axis);
    lo[g] = std::min(lo[g], x[i]);
    hi[g] = std::max(hi[g], x[i]);
  }
  std::vector<float> scales(groups), offsets(groups);
  for (int64_t g = 0; g < groups; ++g) {
    const float qmax = static_cast<float>((1 << bits[g]) - 1);
    float range = hi[g] - lo[g];
    if (!(range > 0.0f)) range = magnitude;
    offsets[g] = lo[g];
    // Sometimes a range narrower than the data, so that codes clamp at both ends.
    if (rng() % 3 == 0) {
      offsets[g] = lo[g] + 0.2f * range;
      range *= 0.6f;
    }
    scales[g] = range / qmax;
  }

  kernels::RoundingSpec spec;
  spec.mode = rounding;
  spec.seed = rng();
  spec.step = 3;
  auto encoded = EncodeFrame(raw.data(), dtype, shape, axis, bits, scales, offsets, spec);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  Frame f = *std::move(encoded);
  f.session_id = rng();
  f.step = rng();
  f.kind = rng() % 2 ? FrameKind::kActivation : FrameKind::kGradient;
  f.bitmap_version = rng();
  SealFrame(&f);
  const std::string bytes = SerializeFrame(f);
  auto parsed = ParseFrame(AsBytes(bytes));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_EQ(SerializeFrame(*parsed), bytes);
  auto decode_bits = ValidateFrame(*parsed, nullptr, 0, FrameLimits{});
  ASSERT_TRUE(decode_bits.ok()) << decode_bits.status();
  ASSERT_EQ(*decode_bits, bits);
  std::vector<uint8_t> out(numel * esize + 1, 0xEE);  // + a canary byte
  ASSERT_TRUE(DecodePayload(*parsed, *decode_bits, out.data()).ok());
  ASSERT_EQ(out.back(), 0xEE);

  const double dtype_rel = dtype == DType::kFloat32    ? 0.0
                           : dtype == DType::kBFloat16 ? 1.0 / 256
                                                       : 1.0 / 2048;
  for (int64_t i = 0; i < numel; ++i) {
    const int64_t g = GroupOf(i, shape, axis);
    const float y = LoadAny(out.data() + i * esize, dtype);
    const float qmax = static_cast<float>((1 << bits[g]) - 1);
    const double t = (static_cast<double>(x[i]) - offsets[g]) / scales[g];
    const bool in_range = t >= 0.0 && t <= qmax;
    const double eps = 1e-5 * (std::fabs(x[i]) + std::fabs(offsets[g]) + qmax * scales[g]);
    const double slack = eps + dtype_rel * std::fabs(y) + 1e-7;
    if (rounding == kernels::Rounding::kNearest) {
      const float ref = RoundToDType(ReferenceDequant(x[i], scales[g], offsets[g], bits[g]), dtype);
      ASSERT_EQ(y, ref) << "element " << i << " x " << x[i] << " group " << g << " bits "
                        << int(bits[g]) << " scale " << scales[g] << " offset " << offsets[g];
      if (in_range) {
        ASSERT_LE(std::fabs(static_cast<double>(y) - x[i]), scales[g] * 0.5 + slack)
            << "element " << i;
      }
    } else if (in_range) {
      ASSERT_LE(std::fabs(static_cast<double>(y) - x[i]), scales[g] + slack) << "element " << i;
    }
  }
}

std::vector<int64_t> RandomShape(std::mt19937& rng) {
  const int rank = 1 + rng() % 4;
  std::vector<int64_t> shape(rank);
  for (auto& d : shape) d = 1 + rng() % (rank <= 2 ? 29 : 11);
  return shape;
}

TEST(WireFormatTest, RoundTripRandomShapesAxesDTypes) {
  std::mt19937 rng(12345);
  std::vector<std::vector<int64_t>> shapes = {
      {1},     {7},       {1, 1},       {9, 1},       {1, 17}, {3, 2}, {13, 5},
      {8, 16}, {3, 1, 5}, {2, 3, 5, 7}, {1, 1, 1, 1}, {33, 3}, {1000}};
  for (int i = 0; i < 40; ++i) shapes.push_back(RandomShape(rng));
  for (const auto& shape : shapes) {
    for (int axis = -1; axis < static_cast<int>(shape.size()); ++axis) {
      for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
        RoundTrip(shape, axis, dtype, rng);
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST(WireFormatTest, RoundTripLargeUsesParallelPaths) {
  std::mt19937 rng(7);
  RoundTrip({4099, 9}, 1, DType::kFloat32, rng);  // channels last, > 2^15 elements
  RoundTrip({3, 5000, 3}, 1, DType::kBFloat16, rng);
  RoundTrip({40000}, -1, DType::kFloat16, rng);
}

TEST(WireFormatTest, RoundTripStochasticRounding) {
  std::mt19937 rng(99);
  for (int i = 0; i < 10; ++i) {
    const auto shape = RandomShape(rng);
    RoundTrip(shape, static_cast<int>(rng() % shape.size()), DType::kFloat32, rng,
              kernels::Rounding::kStochastic);
  }
}

TEST(WireFormatTest, ScalarAndEmptyTensors) {
  // Rank 0: one element, one group.
  const float one = 1.5f;
  const uint8_t bits4[] = {4};
  const float scale[] = {0.25f}, offset[] = {0.0f};
  auto f = EncodeFrame(&one, DType::kFloat32, {}, -1, bits4, scale, offset, {});
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->payload.size(), 1u);
  auto bits = Resealed(*f);
  ASSERT_TRUE(bits.ok()) << bits.status();
  float y = 0;
  ASSERT_TRUE(DecodePayload(*f, *bits, &y).ok());
  EXPECT_EQ(y, 1.5f);

  // [0, 3] on axis 1: three groups, no codes, empty payload.
  const uint8_t bits3[] = {2, 3, 4};
  const float s3[] = {1, 1, 1}, o3[] = {0, 0, 0};
  f = EncodeFrame(nullptr, DType::kFloat32, {0, 3}, 1, bits3, s3, o3, {});
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE(f->payload.empty());
  bits = Resealed(*f);
  ASSERT_TRUE(bits.ok()) << bits.status();
  EXPECT_TRUE(DecodePayload(*f, *bits, nullptr).ok());

  // [4, 0] on axis 1: zero groups; no bit map needed even without a known one.
  f = EncodeFrame(nullptr, DType::kFloat16, {4, 0}, 1, {}, {}, {}, {});
  ASSERT_TRUE(f.ok()) << f.status();
  bits = Resealed(*f);
  ASSERT_TRUE(bits.ok()) << bits.status();
  EXPECT_TRUE(bits->empty());
}

// The sizes docs/wire-format.md gives: the 52-byte frame (rank 0, no groups) never validates,
// since a rank-0 tensor has one group; the smallest valid frame is an empty tensor whose group
// axis has length 0 (60 bytes); one value takes 61 bytes (kept map) or 62 (with its map).
TEST(WireFormatTest, SmallestFrames) {
  Frame f52;
  f52.group_axis = -1;
  SealFrame(&f52);
  EXPECT_EQ(SerializeFrame(f52).size(), 52u);
  EXPECT_EQ(ValidateFrame(f52, nullptr, 0, FrameLimits{}).status().code(),
            absl::StatusCode::kFailedPrecondition);
  const std::vector<uint8_t> one_group = {4};
  EXPECT_EQ(ValidateFrame(f52, &one_group, 0, FrameLimits{}).status().code(),
            absl::StatusCode::kInvalidArgument);  // 0 scales for 1 group

  auto f60 = EncodeFrame(nullptr, DType::kFloat32, {0}, 0, {}, {}, {}, {});
  ASSERT_TRUE(f60.ok()) << f60.status();
  SealFrame(&*f60);
  EXPECT_EQ(SerializeFrame(*f60).size(), 60u);
  EXPECT_TRUE(ValidateFrame(*f60, nullptr, 0, FrameLimits{}).ok());

  const float value = 1.0f, scale[] = {1.0f}, offset[] = {0.0f};
  const uint8_t bit[] = {1};
  auto f62 = EncodeFrame(&value, DType::kFloat32, {}, -1, bit, scale, offset, {});
  ASSERT_TRUE(f62.ok()) << f62.status();
  SealFrame(&*f62);
  EXPECT_EQ(SerializeFrame(*f62).size(), 62u);
  EXPECT_TRUE(ValidateFrame(*f62, nullptr, 0, FrameLimits{}).ok());
  Frame f61 = *f62;
  f61.bits.clear();
  SealFrame(&f61);
  EXPECT_EQ(SerializeFrame(f61).size(), 61u);
  const std::vector<uint8_t> kept = {1};
  EXPECT_TRUE(ValidateFrame(f61, &kept, f61.bitmap_version, FrameLimits{}).ok());
}

// Zero groups hold no codes, yet M (codes per group) comes from the other dimensions; M * 8
// must fit in int64 (V6), whatever G.
TEST(WireFormatMalformedTest, CodesPerGroupTimesEightMustFitInt64) {
  Frame f;
  f.shape = {std::numeric_limits<int64_t>::max() / 8, 0};
  f.group_axis = 1;
  SealFrame(&f);
  EXPECT_TRUE(ValidateFrame(f, nullptr, 0, FrameLimits{}).ok());
  f.shape[0] += 1;
  SealFrame(&f);
  ExpectError(ValidateFrame(f, nullptr, 0, FrameLimits{}).status(),
              absl::StatusCode::kInvalidArgument, {"payload", "code count overflows"});
}

// ---- bit map omitted -------------------------------------------------------------------------

TEST(WireFormatTest, OmittedBitMapDecodesWithTheKnownMap) {
  const Frame first = ExampleFrame();
  auto known = ValidateFrame(first, nullptr, 0, FrameLimits{});
  ASSERT_TRUE(known.ok()) << known.status();

  Example e;
  e.x = {0.5f, 2.0f, -0.5f, 3.0f, 2.0f, 0.25f};
  auto second =
      EncodeFrame(e.x.data(), DType::kFloat32, e.shape, 1, e.bits, e.scales, e.offsets, {});
  ASSERT_TRUE(second.ok());
  second->bits.clear();
  second->bitmap_version = first.bitmap_version;
  second->step = 43;
  SealFrame(&*second);
  const std::string bytes = SerializeFrame(*second);
  EXPECT_EQ(bytes.size(), kExampleSize - 2);
  EXPECT_EQ(static_cast<uint8_t>(bytes[kOffFlags]), 0);
  auto parsed = ParseFrame(AsBytes(bytes));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_TRUE(parsed->bits.empty());
  auto bits = ValidateFrame(*parsed, &*known, first.bitmap_version, FrameLimits{});
  ASSERT_TRUE(bits.ok()) << bits.status();
  EXPECT_EQ(*bits, e.bits);
  std::vector<float> y(6);
  ASSERT_TRUE(DecodePayload(*parsed, *bits, y.data()).ok());
  EXPECT_EQ(y, (std::vector<float>{0.5f, 2.0f, -0.5f, 3.0f, 2.0f, 0.25f}));
}

TEST(WireFormatTest, OmittedBitMapWithUnknownVersionIsFailedPrecondition) {
  Frame f = ExampleFrame();
  const std::vector<uint8_t> known = f.bits;
  f.bits.clear();
  f.bitmap_version = 2;
  auto bits = Resealed(f, {}, &known, /*known_version=*/1);
  ExpectError(bits.status(), absl::StatusCode::kFailedPrecondition, {"bit map", "2", "1"});
}

TEST(WireFormatTest, OmittedBitMapWithNoKnownMapIsFailedPrecondition) {
  Frame f = ExampleFrame();
  f.bits.clear();
  ExpectError(Resealed(f).status(), absl::StatusCode::kFailedPrecondition, {"no bit map"});
}

TEST(WireFormatTest, KnownMapOfTheWrongLengthIsRejected) {
  Frame f = ExampleFrame();
  f.bits.clear();
  const std::vector<uint8_t> known = {4, 4, 4};
  ExpectError(Resealed(f, {}, &known, 1).status(), absl::StatusCode::kInvalidArgument,
              {"bit-map length 3", "2 groups"});
}

// ---- truncation --------------------------------------------------------------------------------

TEST(WireFormatMalformedTest, TruncatedPayloadFailsParse) {
  std::string bytes = ExampleBytes();
  bytes.resize(kOffPayload + 2);  // half the payload, no CRC
  ExpectError(ParseFrame(AsBytes(bytes)).status(), absl::StatusCode::kInvalidArgument,
              {"'payload'", "4 bytes claimed, 2 left"});
}

TEST(WireFormatMalformedTest, PayloadShorterThanTheShapeImpliesFailsValidation) {
  Frame f = ExampleFrame();
  f.payload.pop_back();
  ExpectError(Resealed(f).status(), absl::StatusCode::kInvalidArgument,
              {"'payload'", "3 bytes", "imply 4"});
}

TEST(WireFormatMalformedTest, EveryTruncatedPrefixFailsParseCleanly) {
  Frame without_bits = ExampleFrame();
  without_bits.bits.clear();
  SealFrame(&without_bits);
  for (const std::string& full : {ExampleBytes(), SerializeFrame(without_bits)}) {
    ASSERT_TRUE(ParseFrame(AsBytes(full)).ok());
    for (size_t n = 0; n < full.size(); ++n) {
      const std::string prefix = full.substr(0, n);
      ScopedAllocTracker tracker;
      const absl::Status status = ParseFrame(AsBytes(prefix)).status();
      const size_t max_alloc = tracker.max_alloc();
      ExpectError(status, absl::StatusCode::kInvalidArgument, {"frame field '", " left"});
      EXPECT_LE(max_alloc, n + 256) << "prefix " << n;
    }
  }
}

TEST(WireFormatMalformedTest, TrailingBytesAreRejected) {
  std::string bytes = ExampleBytes();
  bytes.push_back('\0');
  ExpectError(ParseFrame(AsBytes(bytes)).status(), absl::StatusCode::kInvalidArgument,
              {"1 trailing bytes"});
}

// ---- bit map
// -------------------------------------------------------------------------------------

TEST(WireFormatMalformedTest, BitMapLongerThanTheGroups) {
  // A consistent encoding whose groups count (3) disagrees with shape[axis] (2).
  Frame f = ExampleFrame();
  f.bits.push_back(4);
  f.scales.push_back(1.0f);
  f.offsets.push_back(0.0f);
  ExpectError(Resealed(f).status(), absl::StatusCode::kInvalidArgument,
              {"'bits'", "bit-map length 3", "2 groups"});
}

TEST(WireFormatMalformedTest, BitMapShorterThanTheGroups) {
  Frame f = ExampleFrame();
  f.bits.pop_back();
  SealFrame(&f);
  ExpectError(ValidateFrame(f, nullptr, 0, {}).status(), absl::StatusCode::kInvalidArgument,
              {"'bits'", "bit-map length 1", "2 groups"});
}

TEST(WireFormatMalformedTest, BitWidthZero) {
  Frame f = ExampleFrame();
  f.bits[1] = 0;
  ExpectError(Resealed(f).status(), absl::StatusCode::kInvalidArgument,
              {"'bits'", "group 1", "bit width 0", "1..8"});
}

TEST(WireFormatMalformedTest, BitWidthNine) {
  Frame f = ExampleFrame();
  f.bits[0] = 9;
  ExpectError(Resealed(f).status(), absl::StatusCode::kInvalidArgument,
              {"'bits'", "group 0", "bit width 9", "1..8"});
  std::string bytes = ExampleBytes();  // in the bytes as received
  bytes[kOffBits + 1] = 9;
  ExpectError(ParseAndValidate(bytes).status(), absl::StatusCode::kInvalidArgument,
              {"'bits'", "group 1", "bit width 9"});
}

TEST(WireFormatMalformedTest, BitMapFlaggedWithZeroGroups) {
  std::string bytes = ExampleBytes().substr(0, kOffGroups);
  bytes.append({0, 0, 0, 0});  // groups 0
  bytes.append(8, '\0');       // payload_bytes 0
  bytes.append(4, '\0');       // crc
  ExpectError(ParseFrame(AsBytes(bytes)).status(), absl::StatusCode::kInvalidArgument,
              {"'flags'", "0 groups"});
}

// ---- payload size
// --------------------------------------------------------------------------------

TEST(WireFormatMalformedTest, ShapeClaimsMoreElementsThanThePayloadHolds) {
  Frame f = ExampleFrame();
  f.shape = {16, 2};
  ExpectError(Resealed(f).status(), absl::StatusCode::kInvalidArgument,
              {"'payload'", "4 bytes", "imply 16"});
}

TEST(WireFormatMalformedTest, PayloadOneByteTooLong) {
  Frame f = ExampleFrame();
  f.payload.push_back(0);
  ExpectError(Resealed(f).status(), absl::StatusCode::kInvalidArgument,
              {"'payload'", "5 bytes", "imply 4"});
}

// ---- scales and offsets ------------------------------------------------------------------------

void ExpectBadScale(float scale, const char* shown) {
  Frame f = ExampleFrame();
  f.scales[1] = scale;
  ExpectError(Resealed(f).status(), absl::StatusCode::kInvalidArgument,
              {"'scales'", "group 1", shown, "finite and > 0"});
}

TEST(WireFormatMalformedTest, NaNScale) { ExpectBadScale(NAN, "nan"); }
TEST(WireFormatMalformedTest, InfiniteScale) {
  ExpectBadScale(INFINITY, "inf");
  ExpectBadScale(-INFINITY, "-inf");
}
TEST(WireFormatMalformedTest, ZeroScale) {
  ExpectBadScale(0.0f, "scale 0");
  ExpectBadScale(-0.0f, "scale -0");
}
TEST(WireFormatMalformedTest, NegativeScale) { ExpectBadScale(-0.5f, "scale -0.5"); }

TEST(WireFormatMalformedTest, NaNOffset) {
  Frame f = ExampleFrame();
  f.offsets[0] = NAN;
  ExpectError(Resealed(f).status(), absl::StatusCode::kInvalidArgument,
              {"'offsets'", "group 0", "nan", "finite"});
}

TEST(WireFormatMalformedTest, InfiniteOffset) {
  Frame f = ExampleFrame();
  f.offsets[1] = -INFINITY;
  ExpectError(Resealed(f).status(), absl::StatusCode::kInvalidArgument,
              {"'offsets'", "group 1", "-inf", "finite"});
}

TEST(WireFormatMalformedTest, ScalesOfTheWrongLength) {
  Frame f = ExampleFrame();
  f.scales.push_back(1.0f);
  ExpectError(ValidateFrame(f, nullptr, 0, {}).status(), absl::StatusCode::kInvalidArgument,
              {"'scales'", "3 entries for 2 groups"});
  f = ExampleFrame();
  f.offsets.pop_back();
  ExpectError(ValidateFrame(f, nullptr, 0, {}).status(), absl::StatusCode::kInvalidArgument,
              {"'offsets'", "1 entries for 2 groups"});
}

// ---- CRC
// -----------------------------------------------------------------------------------------

TEST(WireFormatMalformedTest, FlippedBytesFailTheCrc) {
  const std::string good = ExampleBytes();
  ASSERT_TRUE(ParseAndValidate(good).ok());
  // Bytes whose change keeps the frame well-formed: bitmap_version, session_id, step, the low
  // mantissa byte of a scale and of an offset, each payload byte, each CRC byte.
  const size_t positions[] = {
      kOffBitmapVersion, kOffBitmapVersion + 3, kOffSession,     kOffSession + 7,
      kOffStep,          kOffStep + 4,          kOffScales,      kOffOffsets + 4,
      kOffPayload,       kOffPayload + 1,       kOffPayload + 2, kOffPayload + 3,
      kOffCrc,           kOffCrc + 1,           kOffCrc + 2,     kOffCrc + 3};
  for (const size_t at : positions) {
    for (const uint8_t mask : {0x01, 0x80}) {
      std::string bad = good;
      bad[at] = static_cast<char>(bad[at] ^ mask);
      SCOPED_TRACE(::testing::Message() << "byte " << at << " mask " << int(mask));
      auto parsed = ParseFrame(AsBytes(bad));
      ASSERT_TRUE(parsed.ok()) << parsed.status();
      ExpectError(ValidateFrame(*parsed, nullptr, 0, {}).status(),
                  absl::StatusCode::kInvalidArgument, {"'crc32c'", "CRC mismatch"});
    }
  }
}

// ---- header fields
// -------------------------------------------------------------------------------

TEST(WireFormatMalformedTest, BadMagic) {
  std::string bytes = ExampleBytes();
  bytes[0] = 'X';
  ExpectError(ParseFrame(AsBytes(bytes)).status(), absl::StatusCode::kInvalidArgument,
              {"'magic'", "SQF1"});
}

TEST(WireFormatMalformedTest, BadVersion) {
  for (const uint8_t v : {0, 2, 255}) {
    std::string bytes = ExampleBytes();
    bytes[kOffVersion] = static_cast<char>(v);
    ExpectError(ParseFrame(AsBytes(bytes)).status(), absl::StatusCode::kInvalidArgument,
                {"'version'", "unsupported version"});
  }
}

TEST(WireFormatMalformedTest, BadKind) {
  for (const uint8_t v : {0, 3, 255}) {
    std::string bytes = ExampleBytes();
    bytes[kOffKind] = static_cast<char>(v);
    ExpectError(ParseFrame(AsBytes(bytes)).status(), absl::StatusCode::kInvalidArgument,
                {"'kind'", "unknown frame kind"});
  }
  Frame f = ExampleFrame();
  f.kind = static_cast<FrameKind>(9);
  ExpectError(ValidateFrame(f, nullptr, 0, {}).status(), absl::StatusCode::kInvalidArgument,
              {"'kind'", "9"});
}

TEST(WireFormatMalformedTest, BadDType) {
  for (const uint8_t v : {3, 128}) {
    std::string bytes = ExampleBytes();
    bytes[kOffDType] = static_cast<char>(v);
    ExpectError(ParseFrame(AsBytes(bytes)).status(), absl::StatusCode::kInvalidArgument,
                {"'dtype'", "unknown dtype"});
  }
  Frame f = ExampleFrame();
  f.dtype = static_cast<DType>(5);
  ExpectError(ValidateFrame(f, nullptr, 0, {}).status(), absl::StatusCode::kInvalidArgument,
              {"'dtype'", "5"});
}

TEST(WireFormatMalformedTest, NonZeroReservedBytes) {
  for (size_t i = 0; i < 3; ++i) {
    std::string bytes = ExampleBytes();
    bytes[kOffReserved + i] = 1;
    ExpectError(ParseFrame(AsBytes(bytes)).status(), absl::StatusCode::kInvalidArgument,
                {"'reserved'", "not zero"});
  }
}

TEST(WireFormatMalformedTest, UnknownFlagBits) {
  std::string bytes = ExampleBytes();
  bytes[kOffFlags] = 0x05;  // bit 1 (coded) is known: tests/quant/entropy_coding_test.cc
  ExpectError(ParseFrame(AsBytes(bytes)).status(), absl::StatusCode::kInvalidArgument,
              {"'flags'", "unknown flag bits 0x04"});
}

// ---- shape and axis
// ------------------------------------------------------------------------------

TEST(WireFormatMalformedTest, AxisOutOfRange) {
  for (const int32_t axis :
       {2, 3, -2, std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()}) {
    Frame f = ExampleFrame();
    f.group_axis = axis;
    ExpectError(Resealed(f).status(), absl::StatusCode::kInvalidArgument,
                {"'group_axis'", "out of range for rank 2"});
  }
  // In the bytes as received (the axis is checked before the CRC).
  std::string bytes = ExampleBytes();
  PutLe(&bytes, kOffAxis, static_cast<uint32_t>(-7), 4);
  ExpectError(ParseAndValidate(bytes).status(), absl::StatusCode::kInvalidArgument,
              {"'group_axis'", "-7 is out of range"});
}

TEST(WireFormatMalformedTest, NegativeDimension) {
  Frame f = ExampleFrame();
  f.shape = {-3, 2};
  ExpectError(Resealed(f).status(), absl::StatusCode::kInvalidArgument,
              {"'shape'", "dimension 0 is negative"});
  std::string bytes = ExampleBytes();
  PutLe(&bytes, kOffShape, static_cast<uint64_t>(int64_t{-3}), 8);
  ExpectError(ParseAndValidate(bytes).status(), absl::StatusCode::kInvalidArgument,
              {"'shape'", "dimension 0 is negative (-3)"});
  f.shape = {3, std::numeric_limits<int64_t>::min()};
  f.group_axis = -1;
  ExpectError(ValidateFrame(f, nullptr, 0, {}).status(), absl::StatusCode::kInvalidArgument,
              {"'shape'", "dimension 1 is negative"});
}

TEST(WireFormatMalformedTest, RankOverEight) {
  std::string bytes = ExampleBytes();
  bytes[kOffRank] = 9;
  ExpectError(ParseFrame(AsBytes(bytes)).status(), absl::StatusCode::kInvalidArgument,
              {"'rank'", "9 exceeds the maximum rank 8"});
  bytes[kOffRank] = static_cast<char>(255);
  ExpectError(ParseFrame(AsBytes(bytes)).status(), absl::StatusCode::kInvalidArgument,
              {"'rank'", "255"});
  Frame f = ExampleFrame();
  f.shape.assign(9, 1);
  f.group_axis = -1;
  ExpectError(ValidateFrame(f, nullptr, 0, {}).status(), absl::StatusCode::kInvalidArgument,
              {"'rank'", "9 exceeds"});
}

TEST(WireFormatMalformedTest, ElementCountOverflowingInt64) {
  Frame f = ExampleFrame();
  f.shape = {int64_t{1} << 40, int64_t{1} << 40};
  f.group_axis = -1;
  ExpectError(Resealed(f).status(), absl::StatusCode::kInvalidArgument, {"'shape'", "overflows"});
  // An empty tensor whose other dimensions multiply past int64.
  f.shape = {int64_t{1} << 40, 0, int64_t{1} << 40};
  f.group_axis = 1;
  ExpectError(Resealed(f).status(), absl::StatusCode::kInvalidArgument, {"'shape'", "overflows"});
}

// ---- limits
// --------------------------------------------------------------------------------------

TEST(WireFormatMalformedTest, ElementCountOverTheLimitIsResourceExhausted) {
  Frame f = ExampleFrame();
  f.shape = {3000, 2};
  FrameLimits limits;
  limits.max_elements = 5999;
  ExpectError(Resealed(f, limits).status(), absl::StatusCode::kResourceExhausted,
              {"6000 elements", "limit of 5999"});
  // The default limit, 2^28 elements, with a shape whose payload is not there.
  f.shape = {int64_t{1} << 30, 2};
  ExpectError(Resealed(f).status(), absl::StatusCode::kResourceExhausted,
              {"2147483648 elements", "limit of 268435456"});
}

TEST(WireFormatMalformedTest, PayloadOverTheLimitIsResourceExhausted) {
  FrameLimits limits;
  limits.max_payload_bytes = 3;
  ExpectError(Resealed(ExampleFrame(), limits).status(), absl::StatusCode::kResourceExhausted,
              {"'payload'", "4 bytes", "limit of 3"});
}

// ---- huge claimed counts
// -------------------------------------------------------------------------

TEST(WireFormatMalformedTest, HugeGroupCountFailsWithoutAllocating) {
  for (const bool with_bits : {true, false}) {
    std::string bytes = ExampleBytes();
    bytes[kOffFlags] = with_bits ? 1 : 0;
    PutLe(&bytes, kOffGroups, 0xFFFFFFFFu, 4);
    ScopedAllocTracker tracker;
    const absl::Status status = ParseFrame(AsBytes(bytes)).status();
    const size_t max_alloc = tracker.max_alloc();
    ExpectError(status, absl::StatusCode::kInvalidArgument,
                {with_bits ? "'bits'" : "'scales'",
                 with_bits ? "4294967295 bytes claimed" : "17179869180 bytes claimed"});
    EXPECT_LE(max_alloc, bytes.size() + 256);
  }
}

TEST(WireFormatMalformedTest, HugePayloadSizeFailsWithoutAllocating) {
  for (const uint64_t claimed : {uint64_t{1} << 63, ~uint64_t{0}, uint64_t{9}}) {
    std::string bytes = ExampleBytes();
    PutLe(&bytes, kOffPayloadBytes, claimed, 8);
    ScopedAllocTracker tracker;
    const absl::Status status = ParseFrame(AsBytes(bytes)).status();
    const size_t max_alloc = tracker.max_alloc();
    ExpectError(status, absl::StatusCode::kInvalidArgument,
                {"'payload'", std::to_string(claimed).c_str(), "bytes claimed, 8 left"});
    EXPECT_LE(max_alloc, bytes.size() + 256);
  }
}

TEST(WireFormatMalformedTest, HugeShapeFailsValidationWithoutAllocating) {
  // Shapes claiming 2^31 groups or 2^60 elements in a frame of a few dozen bytes.
  FrameLimits unlimited;
  unlimited.max_elements = std::numeric_limits<int64_t>::max();
  unlimited.max_payload_bytes = std::numeric_limits<int64_t>::max();
  Frame f = ExampleFrame();
  f.shape = {1, int64_t{1} << 31};
  SealFrame(&f);
  {
    ScopedAllocTracker tracker;
    const absl::Status status = ValidateFrame(f, nullptr, 0, unlimited).status();
    const size_t max_alloc = tracker.max_alloc();
    ExpectError(status, absl::StatusCode::kInvalidArgument, {"bit-map length 2", "2147483648"});
    EXPECT_LE(max_alloc, 1024u);
  }
  f.shape = {int64_t{1} << 59, 2};
  SealFrame(&f);
  {
    ScopedAllocTracker tracker;
    const absl::Status status = ValidateFrame(f, nullptr, 0, unlimited).status();
    const size_t max_alloc = tracker.max_alloc();
    ExpectError(status, absl::StatusCode::kInvalidArgument, {"'payload'", "4 bytes", "imply"});
    EXPECT_LE(max_alloc, 1024u);
  }
}

// ---- encoder and decoder argument checks ---------------------------------------------------

TEST(WireFormatTest, EncodeFrameAppliesTheContentRules) {
  Example e;
  auto encode = [&](std::vector<int64_t> shape, int axis, std::vector<uint8_t> bits,
                    std::vector<float> scales, std::vector<float> offsets) {
    return EncodeFrame(e.x.data(), DType::kFloat32, shape, axis, bits, scales, offsets, {})
        .status();
  };
  EXPECT_TRUE(encode(e.shape, 1, e.bits, e.scales, e.offsets).ok());
  ExpectError(encode(e.shape, 1, {3, 0}, e.scales, e.offsets), absl::StatusCode::kInvalidArgument,
              {"bit width 0"});
  ExpectError(encode(e.shape, 1, {3}, e.scales, e.offsets), absl::StatusCode::kInvalidArgument,
              {"bit-map length 1"});
  ExpectError(encode(e.shape, 1, e.bits, {0.5f, 0.0f}, e.offsets),
              absl::StatusCode::kInvalidArgument, {"'scales'", "group 1"});
  ExpectError(encode(e.shape, 1, e.bits, e.scales, {NAN, 0.0f}), absl::StatusCode::kInvalidArgument,
              {"'offsets'", "group 0"});
  ExpectError(encode(e.shape, 2, e.bits, e.scales, e.offsets), absl::StatusCode::kInvalidArgument,
              {"'group_axis'"});
  ExpectError(encode({3, -2}, 1, e.bits, e.scales, e.offsets), absl::StatusCode::kInvalidArgument,
              {"negative"});
  ExpectError(
      EncodeFrame(nullptr, DType::kFloat32, e.shape, 1, e.bits, e.scales, e.offsets, {}).status(),
      absl::StatusCode::kInvalidArgument, {"null"});
  kernels::ExecContext cuda;
  cuda.device = kernels::Device::kCuda;
  ExpectError(
      EncodeFrame(e.x.data(), DType::kFloat32, e.shape, 1, e.bits, e.scales, e.offsets, {}, cuda)
          .status(),
      absl::StatusCode::kInvalidArgument, {"host"});
}

TEST(WireFormatTest, DecodePayloadChecksItsArguments) {
  const Frame f = ExampleFrame();
  std::vector<float> y(6);
  const uint8_t one_bit_map[] = {3};
  ExpectError(DecodePayload(f, one_bit_map, y.data()), absl::StatusCode::kInvalidArgument,
              {"bit-map length 1"});
  const uint8_t wide_bits[] = {8, 8};  // implies 6 payload bytes, the frame has 4
  ExpectError(DecodePayload(f, wide_bits, y.data()), absl::StatusCode::kInvalidArgument,
              {"'payload'", "imply 6"});
  ExpectError(DecodePayload(f, f.bits, nullptr), absl::StatusCode::kInvalidArgument, {"null"});
}

// MeasureCodeEntropy against histograms of the codes themselves (x = code, scale 1, offset 0),
// mixed widths 1..8, skewed and uniform groups, and a group of one repeated code (0 bits).
TEST(WireFormatTest, MeasureCodeEntropyMatchesTheCodesHistograms) {
  std::mt19937 rng(7);
  const std::vector<int64_t> shape = {5, 9, 13};  // axis 1: 9 groups of 65 codes
  const int64_t groups = 9, outer = 5, inner = 13, per = outer * inner;
  std::vector<uint8_t> bits = {1, 2, 3, 4, 5, 6, 7, 8, 4};
  std::vector<float> x(static_cast<size_t>(groups * per));
  std::vector<std::vector<int64_t>> counts(groups, std::vector<int64_t>(256, 0));
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t j = 0; j < inner; ++j) {
        const uint32_t top = (1u << bits[g]) - 1;
        uint32_t q = g == 8 ? 3 : rng() % (top + 1);
        if (g % 2 == 1 && rng() % 4 != 0) q = 0;  // skewed groups
        x[static_cast<size_t>((o * groups + g) * inner + j)] = static_cast<float>(q);
        ++counts[g][q];
      }
    }
  }
  double expected = 0;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t c : counts[g]) {
      if (c > 0) expected -= c * std::log2(static_cast<double>(c) / per);
    }
  }
  const std::vector<float> scales(groups, 1.0f), offsets(groups, 0.0f);
  auto f = EncodeFrame(x.data(), DType::kFloat32, shape, 1, bits, scales, offsets, {});
  ASSERT_TRUE(f.ok()) << f.status();
  auto h = MeasureCodeEntropy(*f, bits);
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->elements, groups * per);
  EXPECT_NEAR(h->bits, expected, 1e-6 * expected);
  EXPECT_GT(expected, 0);
  // Padding bits that are not zero (a peer's frame) are not counted as codes: group 0 (1 bit,
  // 65 codes) ends in a byte of 1 code and 7 padding bits.
  Frame padded = *f;
  padded.payload[static_cast<size_t>((per + 7) / 8) - 1] |= 0xFE;
  auto hp = MeasureCodeEntropy(padded, bits);
  ASSERT_TRUE(hp.ok()) << hp.status();
  EXPECT_NEAR(hp->bits, expected, 1e-6 * expected);
  // A wrong bit map is refused, as DecodePayload refuses it.
  bits.pop_back();
  ExpectError(MeasureCodeEntropy(*f, bits).status(), absl::StatusCode::kInvalidArgument, {"bits"});
}

}  // namespace
}  // namespace splitq::quant

namespace splitq::quant {
namespace {

// A hostile coded payload of many tiny groups, each with a table of its own (15 bytes a group:
// mode, a one-code table, length, two states): decoding it allocates in proportion to the
// payload, not a table's worth (~2 KB) per group (the first version held one per group: 150x).
TEST(WireFormatMalformedTest, ManyTinyCodedGroupsHoldLittleMemory) {
  const int64_t groups = 5000, m = 14;
  std::vector<uint8_t> coded = {1, 0};  // version 1, no shared table
  for (int64_t g = 0; g < groups; ++g) {
    // mode 1, L = 8, lo = hi = 0, f_0 = 256, S = 8, both states 2^23 (code 0 leaves them).
    const uint8_t group[] = {1, 8, 0, 0, 0x80, 0x02, 8, 0, 0, 0x80, 0, 0, 0, 0x80, 0};
    coded.insert(coded.end(), std::begin(group), std::end(group));
  }
  const kernels::GroupLayout layout{m, groups, 1};
  const std::vector<uint8_t> bits(static_cast<size_t>(groups), 8);
  ASSERT_EQ(static_cast<int64_t>(coded.size()), MaxCodedPayloadBytes(m * groups, groups));
  std::vector<uint8_t> packed;
  absl::Status st;
  size_t max_alloc = 0;
  {
    ScopedAllocTracker tracker;
    st = EntropyDecode(coded, layout, bits, &packed);
    max_alloc = tracker.max_alloc();
  }
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(packed, std::vector<uint8_t>(static_cast<size_t>(m * groups), 0));
  EXPECT_LT(max_alloc, 4 * coded.size());
}

}  // namespace
}  // namespace splitq::quant

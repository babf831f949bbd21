// quant/entropy_coding.h and coded frames (quant/wire_format.h): the rANS arithmetic against
// the division it replaces, frequency tables, round trips over mixed widths and
// distributions, sizes against the codes' entropy, and every way a coded payload can be
// malformed.
#include "quant/entropy_coding.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "quant/crc32c.h"
#include "quant/wire_format.h"

namespace splitq::quant {
namespace {

// LSB-first packing of one group's codes (docs/wire-format.md), padding bits zero.
void PackGroup(const std::vector<uint8_t>& codes, int k, std::vector<uint8_t>* out) {
  const size_t start = out->size();
  out->resize(start + static_cast<size_t>((static_cast<int64_t>(codes.size()) * k + 7) / 8), 0);
  for (size_t m = 0; m < codes.size(); ++m) {
    for (int b = 0; b < k; ++b) {
      const size_t bit = m * static_cast<size_t>(k) + static_cast<size_t>(b);
      if ((codes[m] >> b) & 1) (*out)[start + bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
    }
  }
}

enum class Shape { kUniform, kPeaked, kConstant, kTwoValues };

struct Payload {
  kernels::GroupLayout layout;
  std::vector<uint8_t> bits, packed;
  double entropy = 0;  // order-0, per group, bits
};

// A payload of `groups` groups of `m` codes (outer = m, inner = 1), group g with width bits[g].
Payload MakePayload(std::mt19937& rng, int64_t groups, int64_t m, const std::vector<uint8_t>& bits,
                    const std::vector<Shape>& shapes) {
  Payload p;
  p.layout = kernels::GroupLayout{m, groups, 1};
  p.bits = bits;
  for (int64_t g = 0; g < groups; ++g) {
    const int k = bits[static_cast<size_t>(g)];
    const uint32_t top = (1u << k) - 1;
    std::geometric_distribution<int> geo(0.35);
    std::vector<uint8_t> codes(static_cast<size_t>(m));
    std::vector<int64_t> counts(256, 0);
    for (auto& c : codes) {
      switch (shapes[static_cast<size_t>(g) % shapes.size()]) {
        case Shape::kUniform:
          c = static_cast<uint8_t>(rng() & top);
          break;
        case Shape::kPeaked: {
          const int d = geo(rng);
          const int mid = static_cast<int>(top / 2);
          c = static_cast<uint8_t>(
              std::clamp(rng() % 2 ? mid + d : mid - d, 0, static_cast<int>(top)));
          break;
        }
        case Shape::kConstant:
          c = static_cast<uint8_t>(top / 3);
          break;
        case Shape::kTwoValues:
          c = static_cast<uint8_t>(rng() % 16 == 0 ? top : 0);
          break;
      }
      ++counts[c];
    }
    for (int64_t n : counts) {
      if (n > 0) p.entropy += static_cast<double>(n) * std::log2(static_cast<double>(m) / n);
    }
    PackGroup(codes, k, &p.packed);
  }
  return p;
}

TEST(EntropyCoding, ReciprocalStepEqualsTheDivision) {
  std::mt19937 rng(3);
  for (int l : {8, 12, 14, 16}) {
    for (uint32_t f = 1; f <= (1u << l); f += (f < 4096 ? 1 : 97)) {
      const uint32_t start = (1u << l) - f;  // any start below 2^l - f + 1
      const internal::RansSymbol s = internal::MakeRansSymbol(start, f, l);
      // The encoder steps with x in [2^23 >> ... , x_max): the renormalized range.
      const uint32_t lo = ((1u << 23) >> l) * f;
      for (int t = 0; t < 6; ++t) {
        uint32_t x = t == 0 ? lo : t == 1 ? s.x_max - 1 : lo + rng() % (s.x_max - lo);
        const uint32_t want = ((x / f) << l) + (x % f) + start;
        ASSERT_EQ(internal::RansStep(x, s), want) << "l " << l << " f " << f << " x " << x;
      }
    }
  }
}

TEST(EntropyCoding, NormalizedCountsSumToTheScaleAndKeepEveryCode) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 200; ++trial) {
    const int l = 8 + trial % 7;
    std::vector<int64_t> counts(256, 0);
    const int present = 1 + static_cast<int>(rng() % 256);
    for (int i = 0; i < present; ++i)
      counts[rng() % 256] += 1 + (rng() % 3 == 0 ? rng() % 100000 : 0);
    const std::vector<uint32_t> f = internal::NormalizeCounts(counts, l);
    uint64_t sum = 0;
    for (size_t s = 0; s < 256; ++s) {
      sum += f[s];
      EXPECT_EQ(f[s] > 0, counts[s] > 0) << s;
    }
    EXPECT_EQ(sum, uint64_t{1} << l);
  }
}

TEST(EntropyCoding, RoundTripsEveryWidthAndDistribution) {
  std::mt19937 rng(11);
  const std::vector<Shape> shapes{Shape::kUniform, Shape::kPeaked, Shape::kConstant,
                                  Shape::kTwoValues, Shape::kPeaked};
  for (int64_t m : {0, 1, 2, 7, 8, 9, 63, 100, 1000, 5000}) {
    std::vector<uint8_t> bits;
    for (int g = 0; g < 16; ++g) bits.push_back(static_cast<uint8_t>(1 + g % 8));
    const Payload p = MakePayload(rng, 16, m, bits, shapes);
    auto coded = EntropyCode(p.packed, p.layout, p.bits);
    ASSERT_TRUE(coded.ok()) << coded.status();
    EXPECT_LE(static_cast<int64_t>(coded->bytes.size()),
              MaxCodedPayloadBytes(static_cast<int64_t>(p.packed.size()), 16));
    EXPECT_NEAR(coded->entropy_bits, p.entropy, 1e-6 * (1 + p.entropy));
    std::vector<uint8_t> back;
    const absl::Status st = EntropyDecode(coded->bytes, p.layout, p.bits, &back);
    ASSERT_TRUE(st.ok()) << "m " << m << ": " << st;
    EXPECT_EQ(back, p.packed) << "m " << m;
  }
}

// Large peaked groups come within 1% of their entropy plus a small table; uniform 8-bit codes
// (incompressible) are stored: one byte a group more than packed.
TEST(EntropyCoding, SizeNearTheEntropyAndNeverMuchAbovePacked) {
  std::mt19937 rng(2);
  for (int k : {2, 3, 4, 6, 8}) {
    const Payload p = MakePayload(rng, 8, 1 << 15, std::vector<uint8_t>(8, k), {Shape::kPeaked});
    auto coded = EntropyCode(p.packed, p.layout, p.bits);
    ASSERT_TRUE(coded.ok()) << coded.status();
    const double entropy_bytes = p.entropy / 8;
    EXPECT_LT(static_cast<double>(coded->bytes.size()), 1.01 * entropy_bytes + 8 * 60) << k;
    EXPECT_LT(coded->bytes.size(), p.packed.size()) << k;
  }
  const Payload flat = MakePayload(rng, 8, 4096, std::vector<uint8_t>(8, 8), {Shape::kUniform});
  auto coded = EntropyCode(flat.packed, flat.layout, flat.bits);
  ASSERT_TRUE(coded.ok());
  EXPECT_EQ(coded->bytes.size(), flat.packed.size() + 8 + 2);
}

// A group's own table may be coarser than log2 m when the smaller table saves more than the
// coarser probabilities cost: 1024 two-bit codes in exact halves and quarters need 2-byte
// frequencies at L = 10 (512, 256, 256), and at L = 8 (128, 64, 64) only the first is two
// bytes (LEB128), with the same probabilities: the coder takes L = 8, two bytes fewer.
TEST(EntropyCoding, AnOwnTableTakesTheCheaperPrecision) {
  std::vector<uint8_t> codes(1024);
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = i % 4 == 0 ? 1 : i % 4 == 1 ? 2 : 0;
  std::shuffle(codes.begin(), codes.end(), std::mt19937(4));
  Payload p;
  p.layout = kernels::GroupLayout{1024, 1, 1};
  p.bits = {2};
  PackGroup(codes, 2, &p.packed);
  auto coded = EntropyCode(p.packed, p.layout, p.bits);
  ASSERT_TRUE(coded.ok()) << coded.status();
  // [coding_version, 0 shared tables, mode 1 (own table), L, lo, hi, freqs...]
  ASSERT_GT(coded->bytes.size(), 6u);
  EXPECT_EQ(coded->bytes[2], 1);
  EXPECT_EQ(coded->bytes[3], 8);
  EXPECT_EQ(std::vector<uint8_t>(coded->bytes.begin() + 4, coded->bytes.begin() + 10),
            (std::vector<uint8_t>{0, 2, 0x80, 0x01, 64, 64}));
  std::vector<uint8_t> back;
  ASSERT_TRUE(EntropyDecode(coded->bytes, p.layout, p.bits, &back).ok());
  EXPECT_EQ(back, p.packed);
}

// The coded bytes of one fixed payload (groups of every mode: own and shared tables, constant,
// stored; widths 1..8; a group count that is not a multiple of the encoder's batch of groups;
// one and two threads) are pinned by their CRC-32C, so that a faster encoder must write the
// same bytes. If the format changes on purpose, docs/wire-format.md and kCodingVersion change
// with this number.
TEST(EntropyCoding, TheCodedBytesOfAFixedPayloadArePinned) {
  std::mt19937 rng(21);
  std::vector<uint8_t> bits;
  for (int g = 0; g < 23; ++g) bits.push_back(static_cast<uint8_t>(1 + (g * 5) % 8));
  const Payload p = MakePayload(rng, 23, 3001, bits,
                                {Shape::kPeaked, Shape::kUniform, Shape::kTwoValues, Shape::kPeaked,
                                 Shape::kConstant, Shape::kPeaked});
  for (int threads : {1, 2}) {
    kernels::ExecContext cpu;
    cpu.cpu_threads = threads;
    auto coded = EntropyCode(p.packed, p.layout, p.bits, cpu);
    ASSERT_TRUE(coded.ok()) << coded.status();
    EXPECT_EQ(coded->bytes.size(), 20093u) << threads << " threads";
    EXPECT_GT(coded->bytes[1], 0) << "no group took a shared table";
    EXPECT_EQ(Crc32cExtend(0, coded->bytes.data(), coded->bytes.size()), 2012113260u)
        << threads << " threads";
    std::vector<uint8_t> back;
    ASSERT_TRUE(EntropyDecode(coded->bytes, p.layout, p.bits, &back).ok());
    EXPECT_EQ(back, p.packed);
  }
}

void ExpectInvalid(const std::vector<uint8_t>& coded, const Payload& p, const std::string& what) {
  std::vector<uint8_t> back;
  const absl::Status st = EntropyDecode(coded, p.layout, p.bits, &back);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << what << ": " << st;
  EXPECT_NE(st.message().find("entropy-coded"), std::string::npos) << st;
}

TEST(EntropyCodingMalformed, EveryHeaderAndTableFault) {
  std::mt19937 rng(9);
  // One group: no shared table; [version, 0 shared, mode 1, L, lo, hi, f_lo.., S, stream].
  const Payload p = MakePayload(rng, 1, 3000, {4}, {Shape::kPeaked});
  auto ok = EntropyCode(p.packed, p.layout, p.bits);
  ASSERT_TRUE(ok.ok());
  const std::vector<uint8_t>& c = ok->bytes;
  ASSERT_EQ(c[1], 0) << "no shared table for one group";
  ASSERT_EQ(c[2], 1) << "the group should be rANS-coded with its own table";
  std::vector<uint8_t> bad = c;
  bad[0] = 2;
  ExpectInvalid(bad, p, "version");
  bad = c;
  bad[3] = 7;
  ExpectInvalid(bad, p, "probability bits");
  bad = c;
  bad[2] = 9;
  ExpectInvalid(bad, p, "mode");
  bad = c;
  bad[2] = 3;
  ExpectInvalid(bad, p, "shared mode without a shared table");
  bad = c;
  bad[5] = 16;  // hi above the 4-bit alphabet
  ExpectInvalid(bad, p, "code range");
  bad = c;
  bad[6] = static_cast<uint8_t>(bad[6] ^ 1);  // the first frequency: the sum is off
  ExpectInvalid(bad, p, "frequency sum");
  bad = c;
  bad.push_back(0);
  ExpectInvalid(bad, p, "trailing byte");
  bad = c;
  bad.pop_back();
  ExpectInvalid(bad, p, "cut");
  ExpectInvalid({}, p, "empty");
  ExpectInvalid({1}, p, "no shared-table count");
  ExpectInvalid({1, 0, 2, 16}, p, "constant above the alphabet");
  ExpectInvalid({1, 1, 0}, p, "shared table of 0 bits");
  ExpectInvalid({1, 2, 4, 12, 0, 0, 0x80, 0x20, 4, 12, 0, 0, 0x80, 0x20, 2, 0}, p,
                "two shared tables for one width");
  // Every prefix and every single-byte change: an error or a payload, never a crash.
  std::vector<uint8_t> back;
  for (size_t n = 0; n < c.size(); ++n) {
    std::vector<uint8_t> prefix(c.begin(), c.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_FALSE(EntropyDecode(prefix, p.layout, p.bits, &back).ok()) << n;
  }
  int refused = 0;
  for (size_t i = 0; i < c.size(); ++i) {
    bad = c;
    bad[i] = static_cast<uint8_t>(bad[i] + 1 + rng() % 255);
    const absl::Status st = EntropyDecode(bad, p.layout, p.bits, &back);
    if (!st.ok()) {
      ++refused;
      EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    } else {
      EXPECT_EQ(back.size(), p.packed.size());
    }
  }
  // The end-state check catches most changes to the streams themselves.
  EXPECT_GT(refused, static_cast<int>(c.size()) * 9 / 10);
}

// Many small groups of one distribution share one table per width (their own tables would
// cost more than the streams gain), and decode; a group's mode-3 stream is read with it.
TEST(EntropyCoding, SmallGroupsShareATable) {
  std::mt19937 rng(12);
  std::vector<uint8_t> bits(64, 6);
  for (size_t g = 0; g < 16; ++g) bits[g] = 3;
  const Payload p = MakePayload(rng, 64, 300, bits, {Shape::kPeaked});
  auto coded = EntropyCode(p.packed, p.layout, p.bits);
  ASSERT_TRUE(coded.ok());
  EXPECT_EQ(coded->bytes[1], 2) << "one shared table for 3 bits and one for 6";
  EXPECT_LT(static_cast<double>(coded->bytes.size()), 1.05 * p.entropy / 8 + 64 * 4 + 400);
  std::vector<uint8_t> back;
  ASSERT_TRUE(EntropyDecode(coded->bytes, p.layout, p.bits, &back).ok());
  EXPECT_EQ(back, p.packed);
}

// Frames: the coded flag round-trips, decodes to what the packed frame decodes to, and the
// entropy the coder returns is MeasureCodeEntropy's.
TEST(CodedFrames, DecodeAsThePackedFrameAndParseCanonically) {
  std::mt19937 rng(4);
  const std::vector<int64_t> shape{32, 24, 5};  // axis 1: 24 groups of 160
  std::vector<float> x(32 * 24 * 5);
  std::normal_distribution<float> normal(0, 1);
  for (auto& v : x) v = std::max(0.0f, normal(rng));  // post-ReLU: peaked at the offset
  std::vector<uint8_t> bits(24);
  for (size_t g = 0; g < bits.size(); ++g) bits[g] = static_cast<uint8_t>(2 + g % 5);
  const std::vector<float> scales(24, 0.1f), offsets(24, 0.0f);
  auto packed =
      EncodeFrame(x.data(), kernels::DType::kFloat32, shape, 1, bits, scales, offsets, {});
  ASSERT_TRUE(packed.ok()) << packed.status();
  SealFrame(&*packed);
  Frame coded = *packed;
  auto h = EntropyCodeFrame(&coded, bits);
  ASSERT_TRUE(h.ok()) << h.status();
  ASSERT_TRUE(coded.coded);
  EXPECT_LT(coded.payload.size(), packed->payload.size());
  auto measured = MeasureCodeEntropy(*packed, bits);
  ASSERT_TRUE(measured.ok());
  EXPECT_NEAR(h->bits, measured->bits, 1e-9 * measured->bits);
  auto measured_coded = MeasureCodeEntropy(coded, bits);
  ASSERT_TRUE(measured_coded.ok()) << measured_coded.status();
  EXPECT_NEAR(measured_coded->bits, measured->bits, 1e-9 * measured->bits);
  EXPECT_EQ(EntropyCodeFrame(&coded, bits).status().code(), absl::StatusCode::kInvalidArgument);
  SealFrame(&coded);

  const std::string bytes = SerializeFrame(coded);
  EXPECT_EQ(static_cast<uint8_t>(bytes[8]), 0x03);  // bit map and coded
  auto parsed =
      ParseFrame(absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_TRUE(parsed->coded);
  auto vbits = ValidateFrame(*parsed, nullptr, 0, {});
  ASSERT_TRUE(vbits.ok()) << vbits.status();
  std::vector<float> a(x.size()), b(x.size());
  ASSERT_TRUE(DecodePayload(*packed, bits, a.data()).ok());
  ASSERT_TRUE(DecodePayload(*parsed, *vbits, b.data()).ok());
  EXPECT_EQ(a, b);
  auto plain = UncodedPayload(*parsed, bits);
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(*plain, packed->payload);

  // A coded payload above its bound fails validation; a malformed one fails decoding, both
  // INVALID_ARGUMENT, and nothing is written.
  Frame big = coded;
  big.payload.resize(packed->payload.size() + 24 + 3, 0);  // one byte above the bound
  SealFrame(&big);
  EXPECT_EQ(ValidateFrame(big, nullptr, 0, {}).status().code(), absl::StatusCode::kInvalidArgument);
  Frame broken = coded;
  broken.payload[0] = 9;
  SealFrame(&broken);
  ASSERT_TRUE(ValidateFrame(broken, nullptr, 0, {}).ok());
  std::vector<float> untouched(x.size(), 7.0f);
  EXPECT_EQ(DecodePayload(broken, bits, untouched.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(untouched, std::vector<float>(x.size(), 7.0f));

  // The coded flag on a frame of zero groups is not canonical.
  Frame none;
  none.shape = {0};
  none.group_axis = 0;
  none.coded = true;
  SealFrame(&none);
  const std::string nb = SerializeFrame(none);
  EXPECT_EQ(ParseFrame(absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(nb.data()), nb.size()))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// A frame whose codes do not compress stays packed (and uncoded).
TEST(CodedFrames, IncompressibleFramesStayPacked) {
  std::mt19937 rng(1);
  std::vector<float> x(64 * 8);
  for (auto& v : x) v = static_cast<float>(rng() % 256);
  const std::vector<uint8_t> bits(8, 8);
  auto f = EncodeFrame(x.data(), kernels::DType::kFloat32, {64, 8}, 1, bits,
                       std::vector<float>(8, 1.0f), std::vector<float>(8, 0.0f), {});
  ASSERT_TRUE(f.ok());
  const std::vector<uint8_t> before = f->payload;
  auto h = EntropyCodeFrame(&*f, bits);
  ASSERT_TRUE(h.ok());
  EXPECT_FALSE(f->coded);
  EXPECT_EQ(f->payload, before);
}

}  // namespace

}  // namespace splitq::quant

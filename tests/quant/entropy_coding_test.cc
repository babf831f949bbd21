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

// kLaplace: the difference of two geometric draws around the middle code (a two-sided
// geometric law, the shape version 2's geometric tables describe).
enum class Shape { kUniform, kPeaked, kConstant, kTwoValues, kLaplace };

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
        case Shape::kLaplace: {
          const int mid = static_cast<int>(top / 2);
          c = static_cast<uint8_t>(std::clamp(mid + geo(rng) - geo(rng), 0, static_cast<int>(top)));
          break;
        }
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
  auto coded = internal::EntropyCodeVersion1(p.packed, p.layout, p.bits);
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
TEST(EntropyCoding, TheVersion1BytesOfAFixedPayloadArePinned) {
  std::mt19937 rng(21);
  std::vector<uint8_t> bits;
  for (int g = 0; g < 23; ++g) bits.push_back(static_cast<uint8_t>(1 + (g * 5) % 8));
  const Payload p = MakePayload(rng, 23, 3001, bits,
                                {Shape::kPeaked, Shape::kUniform, Shape::kTwoValues, Shape::kPeaked,
                                 Shape::kConstant, Shape::kPeaked});
  for (int threads : {1, 2}) {
    kernels::ExecContext cpu;
    cpu.cpu_threads = threads;
    auto coded = internal::EntropyCodeVersion1(p.packed, p.layout, p.bits, cpu);
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

TEST(EntropyCodingMalformed, EveryVersion1HeaderAndTableFault) {
  std::mt19937 rng(9);
  // One group: no shared table; [version, 0 shared, mode 1, L, lo, hi, f_lo.., S, stream].
  const Payload p = MakePayload(rng, 1, 3000, {4}, {Shape::kPeaked});
  auto ok = internal::EntropyCodeVersion1(p.packed, p.layout, p.bits);
  ASSERT_TRUE(ok.ok());
  const std::vector<uint8_t>& c = ok->bytes;
  ASSERT_EQ(c[1], 0) << "no shared table for one group";
  ASSERT_EQ(c[2], 1) << "the group should be rANS-coded with its own table";
  std::vector<uint8_t> bad = c;
  bad[0] = 3;
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

// ---- coding version 2 -------------------------------------------------------------------

// Reads a version-2 payload's structure as docs/wire-format.md lays it out (independently of
// the decoder) and counts the groups of each mode; false if the bytes do not follow it.
bool WalkVersion2(const std::vector<uint8_t>& c, const Payload& p, std::array<int, 5>* modes,
                  int64_t* runs) {
  modes->fill(0);
  *runs = 0;
  size_t at = 0;
  const auto varint = [&](uint64_t* v) {
    *v = 0;
    for (int i = 0; i < 10 && at < c.size(); ++i) {
      const uint8_t b = c[at++];
      *v |= uint64_t{b & 0x7fu} << (7 * i);
      if ((b & 0x80) == 0) return true;
    }
    return false;
  };
  if (c.size() < 3 || c[0] != 2) return false;
  const int n_shared = c[1];
  at = 2;
  for (int i = 0; i < n_shared; ++i) {
    if (at + 4 > c.size()) return false;
    at += 1;  // k
    const int lo = c[at + 1], hi = c[at + 2];
    at += 3;
    for (int s = lo; s <= hi; ++s) {
      uint64_t f = 0;
      if (!varint(&f)) return false;
    }
  }
  uint64_t r = 0;
  if (!varint(&r) || r == 0) return false;
  const int64_t groups = p.layout.groups, m = p.layout.per_group();
  for (int64_t g0 = 0; g0 < groups; g0 += static_cast<int64_t>(r)) {
    ++*runs;
    bool rans = false;
    for (int64_t g = g0; g < std::min<int64_t>(groups, g0 + static_cast<int64_t>(r)); ++g) {
      const int k = p.bits[static_cast<size_t>(g)];
      if (at >= c.size()) return false;
      const int mode = c[at++];
      if (mode > 4) return false;
      ++(*modes)[static_cast<size_t>(mode)];
      switch (mode) {
        case 0:
          at += static_cast<size_t>((m * k + 7) / 8);
          break;
        case 2:
          at += 1;
          break;
        case 1: {  // L - 8 (4 bits), lo, hi (k bits), (hi - lo) frequencies of L bits
          if (at + 2 > c.size()) return false;
          const uint32_t head = c[at] | (uint32_t{c[at + 1]} << 8) |
                                (at + 2 < c.size() ? uint32_t{c[at + 2]} << 16 : 0);
          const int l = 8 + static_cast<int>(head & 15);
          const int lo = static_cast<int>((head >> 4) & ((1u << k) - 1));
          const int hi = static_cast<int>((head >> (4 + k)) & ((1u << k) - 1));
          at += static_cast<size_t>((4 + 2 * k + (hi - lo) * l + 7) / 8);
          rans = true;
          break;
        }
        case 3:
          rans = true;
          break;
        case 4:
          at += 3;
          rans = true;
          break;
      }
    }
    if (rans) {
      uint64_t s = 0;
      if (!varint(&s) || s < 16) return false;
      at += static_cast<size_t>(s);
    }
  }
  return at == c.size();
}

// The version-2 bytes of a payload like the version-1 pin's (two-sided geometric groups in
// place of two peaked ones): every mode occurs (stored, constant, own bit-coded tables, the
// shared table, a geometric table), in two runs; pinned by CRC-32C as above, on one and two
// threads.
TEST(EntropyCoding, TheVersion2BytesOfAFixedPayloadArePinned) {
  std::mt19937 rng(21);
  std::vector<uint8_t> bits;
  for (int g = 0; g < 23; ++g) bits.push_back(static_cast<uint8_t>(1 + (g * 5) % 8));
  const Payload p = MakePayload(rng, 23, 3001, bits,
                                {Shape::kPeaked, Shape::kUniform, Shape::kTwoValues,
                                 Shape::kLaplace, Shape::kConstant, Shape::kLaplace});
  for (int threads : {1, 2}) {
    kernels::ExecContext cpu;
    cpu.cpu_threads = threads;
    auto coded = EntropyCode(p.packed, p.layout, p.bits, cpu);
    ASSERT_TRUE(coded.ok()) << coded.status();
    ASSERT_EQ(coded->bytes[0], kCodingVersion);
    std::array<int, 5> modes{};
    int64_t runs = 0;
    ASSERT_TRUE(WalkVersion2(coded->bytes, p, &modes, &runs));
    EXPECT_EQ(runs, 2);  // 23 groups of 3001 codes: a run takes ceil(65536 / 3001) = 22 groups
    for (int mode = 0; mode <= 4; ++mode) EXPECT_GT(modes[static_cast<size_t>(mode)], 0) << mode;
    EXPECT_EQ(coded->bytes.size(), 20668u) << threads << " threads";
    EXPECT_EQ(Crc32cExtend(0, coded->bytes.data(), coded->bytes.size()), 4115861406u)
        << threads << " threads";
    std::vector<uint8_t> back;
    ASSERT_TRUE(EntropyDecode(coded->bytes, p.layout, p.bits, &back, cpu).ok());
    EXPECT_EQ(back, p.packed);
  }
}

// Runs of every shape: many runs of many tiny groups, runs that end with a short one, groups
// whose code count leaves 1, 2 or 3 codes over the four states, on one and two threads.
TEST(EntropyCoding, RunsOfEveryLengthRoundTrip) {
  std::mt19937 rng(31);
  for (const auto& [groups, m] : std::vector<std::pair<int64_t, int64_t>>{
           {600, 3}, {600, 7}, {300, 250}, {10, 20001}, {9, 4096}, {1, 70001}, {5, 2}}) {
    std::vector<uint8_t> bits;
    for (int64_t g = 0; g < groups; ++g) bits.push_back(static_cast<uint8_t>(1 + (g * 3) % 8));
    const Payload p = MakePayload(
        rng, groups, m, bits,
        {Shape::kPeaked, Shape::kTwoValues, Shape::kPeaked, Shape::kUniform, Shape::kConstant});
    for (int threads : {1, 2}) {
      kernels::ExecContext cpu;
      cpu.cpu_threads = threads;
      auto coded = EntropyCode(p.packed, p.layout, p.bits, cpu);
      ASSERT_TRUE(coded.ok()) << coded.status();
      EXPECT_LE(static_cast<int64_t>(coded->bytes.size()),
                MaxCodedPayloadBytes(static_cast<int64_t>(p.packed.size()), groups));
      std::vector<uint8_t> back;
      const absl::Status st = EntropyDecode(coded->bytes, p.layout, p.bits, &back, cpu);
      ASSERT_TRUE(st.ok()) << groups << " x " << m << ": " << st;
      EXPECT_EQ(back, p.packed) << groups << " x " << m;
      if (coded->bytes[0] == 2) {
        std::array<int, 5> modes{};
        int64_t runs = 0;
        EXPECT_TRUE(WalkVersion2(coded->bytes, p, &modes, &runs)) << groups << " x " << m;
        const int64_t per_run = std::clamp<int64_t>(((int64_t{1} << 16) + m - 1) / m, 1,
                                                    std::min<int64_t>(groups, 256));
        EXPECT_EQ(runs, (groups + per_run - 1) / per_run) << groups << " x " << m;
      }
    }
  }
}

TEST(EntropyCodingMalformed, EveryVersion2HeaderAndTableFault) {
  // Handmade payloads of two 4-bit groups of 64 codes (packed: 64 bytes; a coded payload may
  // take 68), one group a run; the second group is constant (mode 2, code 0) where the
  // first one's fault leaves the rest to read. Each fails before any stream is decoded.
  Payload p;
  p.layout = kernels::GroupLayout{64, 2, 1};
  p.bits = {4, 4};
  p.packed.assign(64, 0);
  ExpectInvalid({3, 0, 1, 2, 0, 2, 0}, p, "version 3");
  ExpectInvalid({2}, p, "no shared-table count");
  ExpectInvalid({2, 0}, p, "no groups per run");
  ExpectInvalid({2, 0, 0, 2, 0, 2, 0}, p, "0 groups per run");
  ExpectInvalid({2, 0, 3, 2, 0, 2, 0}, p, "more groups per run than groups");
  ExpectInvalid({2, 0, 1, 9, 0, 2, 0}, p, "unknown mode");
  ExpectInvalid({2, 0, 1, 3, 2, 0}, p, "shared mode without a shared table");
  ExpectInvalid({2, 0, 1, 2, 16, 2, 0}, p, "constant above the alphabet");
  ExpectInvalid({2, 0, 1, 4, 16, 0, 0, 2, 0}, p, "geometric centre outside the alphabet");
  ExpectInvalid({2, 0, 1, 4, 1, 64, 0, 2, 0}, p, "geometric rate above 63");
  ExpectInvalid({2, 0, 1, 4, 1, 0}, p, "geometric table cut");
  // Own tables in bits (k = 4, L = 8): L - 8 in bits 0-3, lo 4-7, hi 8-11, f_lo 12-19, then
  // padding to the byte.
  ExpectInvalid({2, 0, 1, 1, 0x00}, p, "own table cut");
  ExpectInvalid({2, 0, 1, 1, 0x09, 0x00, 0x00, 16}, p, "probability bits 17");
  ExpectInvalid({2, 0, 1, 1, 0x07, 0x00, 0x00, 16}, p, "probability bits 15 (at most 14)");
  ExpectInvalid({2, 0, 1, 1, 0x50, 0x03, 0x00, 16}, p, "lo above hi");
  ExpectInvalid({2, 0, 1, 1, 0x00, 0x01, 0x00, 16}, p, "first frequency 0");
  ExpectInvalid({2, 0, 1, 1, 0x00, 0x01, 0x18, 16}, p, "a padding bit set");
  ExpectInvalid({2, 0, 1, 1, 0x00, 0x01, 0x08, 15}, p, "stream below 16 bytes");
  ExpectInvalid({2, 0, 1, 1, 0x00, 0x01, 0x08, 60, 0, 0}, p, "stream beyond the bytes");
  ExpectInvalid({2, 0, 1, 2, 0, 2, 0, 7}, p, "trailing byte");
  Payload six = p;
  six.bits = {6, 4};
  six.packed.assign(48 + 32, 0);
  ExpectInvalid({2, 0, 1, 4, 1, 1, 1, 2, 0}, six, "geometric table for 6-bit codes");
  // Two constant groups decode as their segments.
  std::vector<uint8_t> back;
  ASSERT_TRUE(EntropyDecode({2, 0, 1, 2, 3, 2, 0}, p.layout, p.bits, &back).ok());
  std::vector<uint8_t> want(64, 0);
  std::fill(want.begin(), want.begin() + 32, 0x33);
  EXPECT_EQ(back, want);

  // A real payload: every prefix fails; every single-byte change fails or decodes to a
  // payload of the right size; the end-state check catches most.
  std::mt19937 rng(19);
  const Payload q = MakePayload(rng, 6, 500, {2, 3, 4, 4, 6, 8},
                                {Shape::kPeaked, Shape::kTwoValues, Shape::kPeaked});
  auto ok = EntropyCode(q.packed, q.layout, q.bits);
  ASSERT_TRUE(ok.ok());
  const std::vector<uint8_t>& c = ok->bytes;
  ASSERT_EQ(c[0], 2);
  for (size_t n = 0; n < c.size(); ++n) {
    std::vector<uint8_t> prefix(c.begin(), c.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_FALSE(EntropyDecode(prefix, q.layout, q.bits, &back).ok()) << n;
  }
  int refused = 0;
  for (size_t i = 0; i < c.size(); ++i) {
    std::vector<uint8_t> bad = c;
    bad[i] = static_cast<uint8_t>(bad[i] + 1 + rng() % 255);
    const absl::Status st = EntropyDecode(bad, q.layout, q.bits, &back);
    if (!st.ok()) {
      ++refused;
      EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
      EXPECT_NE(st.message().find("entropy-coded"), std::string::npos) << st;
    } else {
      EXPECT_EQ(back.size(), q.packed.size());
    }
  }
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

#include "quant/entropy_coding.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/detail/code_bytes.h"
#include "kernels/detail/cpu_dispatch.h"
#include "kernels/pack.h"

namespace splitq::quant {
namespace {

constexpr uint32_t kRansLow = 1u << 23;  // the state lives in [2^23, 2^31)
enum Mode : uint8_t { kStored = 0, kRans = 1, kConstant = 2, kRansShared = 3 };

absl::Status Bad(int64_t group, const std::string& what) {
  return absl::InvalidArgumentError(
      absl::StrCat("frame field 'payload' (entropy-coded), group ", group, ": ", what));
}

// The probability precision for groups of m codes: about log2(m), within 8..14 (8: a 256-code
// alphabet always fits).
int ProbBits(int64_t m) {
  int l = 8;
  while (l < 14 && (int64_t{1} << l) < m) ++l;
  return l;
}

void PutVarint(uint64_t v, std::vector<uint8_t>* out) {
  while (v >= 0x80) {
    out->push_back(static_cast<uint8_t>(v | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<uint8_t>(v));
}

// Reads a LEB128 value of at most `max_bytes` bytes from [*p, end).
// Only the shortest encoding is accepted (no trailing zero groups), and nothing above 2^64.
bool GetVarint(const uint8_t** p, const uint8_t* end, int max_bytes, uint64_t* v) {
  *v = 0;
  for (int i = 0; i < max_bytes; ++i) {
    if (*p == end) return false;
    const uint8_t b = *(*p)++;
    if (i == 9 && b > 1) return false;
    *v |= uint64_t{b & 0x7fu} << (7 * i);
    if ((b & 0x80) == 0) return i == 0 || b != 0;
  }
  return false;
}

// A frequency table: codes lo..hi, frequencies summing to 2^prob_bits, cumulative starts.
struct Table {
  int prob_bits = 8;
  int lo = 0, hi = -1;
  std::array<uint32_t, 256> freq{}, start{};
};

Table MakeTable(const std::vector<uint32_t>& freq, int prob_bits) {
  Table t;
  t.prob_bits = prob_bits;
  t.lo = static_cast<int>(freq.size());
  uint32_t start = 0;
  for (size_t s = 0; s < freq.size(); ++s) {
    t.freq[s] = freq[s];
    t.start[s] = start;
    start += freq[s];
    if (freq[s] != 0) {
      t.lo = std::min(t.lo, static_cast<int>(s));
      t.hi = static_cast<int>(s);
    }
  }
  return t;
}

void PutTable(const Table& t, std::vector<uint8_t>* out) {
  out->push_back(static_cast<uint8_t>(t.prob_bits));
  out->push_back(static_cast<uint8_t>(t.lo));
  out->push_back(static_cast<uint8_t>(t.hi));
  for (int s = t.lo; s <= t.hi; ++s) PutVarint(t.freq[s], out);
}

size_t TableBytes(const Table& t) {
  size_t n = 3;
  for (int s = t.lo; s <= t.hi; ++s) n += t.freq[s] < 128 ? 1 : t.freq[s] < 16384 ? 2 : 3;
  return n;
}

// Reads and checks a table of a 2^k-code alphabet.
bool ReadTable(const uint8_t** p, const uint8_t* end, int k, Table* t, std::string* why) {
  if (end - *p < 3) {
    *why = "the table's precision or code range is missing";
    return false;
  }
  const int prob_bits = (*p)[0];
  if (prob_bits < 8 || prob_bits > 16) {
    *why = absl::StrCat("probability bits ", prob_bits, " outside 8..16");
    return false;
  }
  t->prob_bits = prob_bits;
  t->lo = (*p)[1];
  t->hi = (*p)[2];
  *p += 3;
  if (t->lo > t->hi || t->hi >= (1 << k)) {
    *why = absl::StrCat("code range ", t->lo, "..", t->hi, " outside 0..", (1 << k) - 1);
    return false;
  }
  uint64_t total = 0;
  for (int s = t->lo; s <= t->hi; ++s) {
    uint64_t f = 0;
    if (!GetVarint(p, end, 3, &f) || f > (uint64_t{1} << prob_bits)) {
      *why = absl::StrCat("frequency of code ", s, " cut, malformed or above 2^", prob_bits);
      return false;
    }
    t->freq[s] = static_cast<uint32_t>(f);
    t->start[s] = static_cast<uint32_t>(total);
    total += f;
  }
  if (total != (uint64_t{1} << prob_bits)) {
    *why = absl::StrCat("frequencies sum to ", total, ", not 2^", prob_bits);
    return false;
  }
  return true;
}

// The bits the codes of `counts` cost under table `t` (infinite if one has no frequency).
double CostBits(const std::array<int64_t, 256>& counts, int alphabet, const Table& t) {
  const int prob_bits = t.prob_bits;
  double bits = 0;
  for (int s = 0; s < alphabet; ++s) {
    if (counts[s] == 0) continue;
    if (t.freq[s] == 0) return HUGE_VAL;
    bits +=
        static_cast<double>(counts[s]) * (prob_bits - std::log2(static_cast<double>(t.freq[s])));
  }
  return bits;
}

// One rANS encoder step of state x with symbol s, writing downwards from p. Renormalisation
// emits n = 0, 1 or 2 bytes of x, low byte first: n counts x >= x_max and x >= 256 x_max (a
// third byte would need x >= 2^16 x_max >= 2^33, as x_max >= 2^17 for prob_bits <= 14).
// Computed without a branch on the data (with 3-4-bit codes a byte goes out about every other
// code, which a branch mispredicts); both bytes are written every time, and the ones not
// counted are overwritten by later ones or lie below the stream.
inline void RansPut(uint8_t*& p, uint32_t& x, const internal::RansSymbol& s) {
  const uint64_t x_max = s.x_max;
  const int n = static_cast<int>(x >= x_max) + static_cast<int>(x >= (x_max << 8));
  p[-1] = static_cast<uint8_t>(x);
  p[-2] = static_cast<uint8_t>(x >> 8);
  p -= n;
  x >>= 8 * n;
  x = internal::RansStep(x, s);
}

// rANS-codes N groups of m codes each at once: lane l codes c[l] with table *t[l] into the end
// of streams[l] and sets begin[l] to the first byte it used. Each group's stream is what it
// would be alone (two states taking even and odd codes in turn, as the decoder reads them); the
// N groups' 2N states are stepped in lockstep so that their dependency chains overlap.
template <int N>
void EncodeStreams(const uint8_t* const* c, int64_t m, const Table* const* t,
                   std::vector<uint8_t>* const* streams, const uint8_t** begin) {
  std::array<std::array<internal::RansSymbol, 256>, N> sym;
  std::array<uint8_t*, N> p;
  std::array<uint32_t, N> x0, x1;
  for (int l = 0; l < N; ++l) {
    for (int s = t[l]->lo; s <= t[l]->hi; ++s) {
      if (t[l]->freq[s] != 0) {
        sym[l][s] = internal::MakeRansSymbol(t[l]->start[s], t[l]->freq[s], t[l]->prob_bits);
      }
    }
    // At most prob_bits <= 14 bits a code, plus the two final states.
    streams[l]->resize(static_cast<size_t>(m * 2 + 16));
    p[l] = streams[l]->data() + streams[l]->size();
    x0[l] = kRansLow;
    x1[l] = kRansLow;
  }
  int64_t j = m;
  if (j % 2 == 1) {
    --j;
    for (int l = 0; l < N; ++l) RansPut(p[l], x0[l], sym[l][c[l][j]]);
  }
  for (; j > 0; j -= 2) {
    for (int l = 0; l < N; ++l) RansPut(p[l], x1[l], sym[l][c[l][j - 1]]);
    for (int l = 0; l < N; ++l) RansPut(p[l], x0[l], sym[l][c[l][j - 2]]);
  }
  for (int l = 0; l < N; ++l) {
    for (const uint32_t x : {x1[l], x0[l]}) {  // state 0 first in the stream
      p[l] -= 4;
      for (int b = 0; b < 4; ++b) p[l][b] = static_cast<uint8_t>(x >> (8 * b));
    }
    begin[l] = p[l];
  }
}

// What the encoder learns of a group before choosing its mode.
struct GroupCodes {
  std::array<int64_t, 256> counts{};
  int present = 0, lo = 0;
  double entropy = 0;  // bits
};

// How a group will be coded: stored, constant, or rANS with its own table or the shared one
// of its width (when `shared` is set and cheaper). `table` points at `own` or the shared one.
struct GroupPlan {
  Mode mode = kStored;
  Table own;
  const Table* table = nullptr;
};

void PlanGroup(int64_t m, int k, int own_bits, const GroupCodes& gc, const Table* shared,
               GroupPlan* plan) {
  const int64_t seg_bytes = kernels::PackedGroupBytes(m, k);
  plan->mode = kStored;
  plan->table = nullptr;
  if (gc.present == 1 && seg_bytes > 2) {
    plan->mode = kConstant;
    return;
  }
  // Cheaper as stored for sure when even the entropy (no tables) would not save a byte.
  if (gc.present < 2 || gc.entropy / 8 + 8 >= static_cast<double>(seg_bytes)) return;
  const int alphabet = 1 << k;
  // The own table's precision: about log2 m, or up to two bits coarser where the smaller
  // table (fewer two-byte frequencies) saves more than the coarser probabilities cost
  // (tried for alphabets of up to 64 codes: an 8-bit one costs more time than it saves).
  double own_bytes = HUGE_VAL;
  const int coarsest = k <= 6 ? std::max(8, own_bits - 2) : own_bits;
  for (int l = own_bits; l >= coarsest; --l) {
    Table t =
        MakeTable(internal::NormalizeCounts(
                      absl::MakeConstSpan(gc.counts.data(), static_cast<size_t>(alphabet)), l),
                  l);
    const double bytes = static_cast<double>(TableBytes(t)) + CostBits(gc.counts, alphabet, t) / 8;
    if (bytes < own_bytes) {
      own_bytes = bytes;
      plan->own = std::move(t);
    }
  }
  const bool use_shared =
      shared != nullptr && CostBits(gc.counts, alphabet, *shared) / 8 < own_bytes;
  plan->mode = use_shared ? kRansShared : kRans;
  plan->table = use_shared ? shared : &plan->own;
}

// A group's bytes (mode byte first) in `out`, from its plan and, for rANS, its stream
// [p, end): stored instead when the stream with its table would not be smaller.
void EmitGroup(const uint8_t* seg, int64_t m, int k, const GroupCodes& gc, const GroupPlan& plan,
               const uint8_t* p, const uint8_t* end, std::vector<uint8_t>* out) {
  const int64_t seg_bytes = kernels::PackedGroupBytes(m, k);
  out->clear();
  if (plan.mode == kConstant) {
    out->push_back(kConstant);
    out->push_back(static_cast<uint8_t>(gc.lo));
    return;
  }
  if (plan.mode == kRans || plan.mode == kRansShared) {
    const auto stream_bytes = static_cast<uint64_t>(end - p);
    out->push_back(plan.mode);
    if (plan.mode == kRans) PutTable(plan.own, out);
    PutVarint(stream_bytes, out);
    if (static_cast<int64_t>(out->size() + stream_bytes) < seg_bytes + 1) {
      out->insert(out->end(), p, end);
      return;
    }
    out->clear();
  }
  out->push_back(kStored);
  out->insert(out->end(), seg, seg + seg_bytes);
}

// Groups planned and coded together in one thread (EncodeStreams' N).
constexpr int kGroupBatch = 4;

// Codes groups [g0, g0 + n) (n <= kGroupBatch) into coded[g0 ..]: the rANS ones in one
// EncodeStreams call. `all` holds every group's codes, one per byte, m per group.
void CodeGroups(int64_t g0, int n, const uint8_t* packed, const std::vector<int64_t>& offsets,
                const uint8_t* all, int64_t m, absl::Span<const uint8_t> bits, int own_bits,
                const std::vector<GroupCodes>& info, const Table* const* shared_by_width,
                std::array<GroupPlan, kGroupBatch>& plans,
                std::array<std::vector<uint8_t>, kGroupBatch>& streams,
                std::vector<std::vector<uint8_t>>* coded) {
  std::array<const uint8_t*, kGroupBatch> codes{}, begin{}, end{};
  std::array<const Table*, kGroupBatch> tables{};
  std::array<std::vector<uint8_t>*, kGroupBatch> outs{};
  std::array<int, kGroupBatch> lane_of{};
  int lanes = 0;
  for (int i = 0; i < n; ++i) {
    const auto g = static_cast<size_t>(g0 + i);
    PlanGroup(m, bits[g], own_bits, info[g], shared_by_width[bits[g]], &plans[i]);
    lane_of[i] = -1;
    if (plans[i].table == nullptr) continue;
    codes[lanes] = all + g * static_cast<size_t>(m);
    tables[lanes] = plans[i].table;
    outs[lanes] = &streams[lanes];
    lane_of[i] = lanes++;
  }
  switch (lanes) {
    case 1:
      EncodeStreams<1>(codes.data(), m, tables.data(), outs.data(), begin.data());
      break;
    case 2:
      EncodeStreams<2>(codes.data(), m, tables.data(), outs.data(), begin.data());
      break;
    case 3:
      EncodeStreams<3>(codes.data(), m, tables.data(), outs.data(), begin.data());
      break;
    case 4:
      EncodeStreams<4>(codes.data(), m, tables.data(), outs.data(), begin.data());
      break;
    default:
      break;
  }
  for (int l = 0; l < lanes; ++l) end[l] = streams[l].data() + streams[l].size();
  for (int i = 0; i < n; ++i) {
    const auto g = static_cast<size_t>(g0 + i);
    const int l = lane_of[i];
    EmitGroup(packed + offsets[g], m, bits[g], info[g], plans[i], l < 0 ? nullptr : begin[l],
              l < 0 ? nullptr : end[l], &(*coded)[g]);
  }
}

// Where each group's stream lies (found by the header pass, which reads and checks every
// table), and its table.
struct GroupSpan {
  uint8_t mode = kStored;
  const uint8_t* begin = nullptr;  // stored: the segment; constant: the code; rANS: the stream
  const uint8_t* end = nullptr;
  const Table* shared = nullptr;       // mode 3: the frame's table for the group's width
  const uint8_t* own_table = nullptr;  // mode 1: where its table starts (checked already)
};

// `slots` maps each of a table's 2^L slots to its code; `built` is the shared table they were
// last built for in this thread (nullptr: another), so that groups of one shared table build
// them once.
absl::Status DecodeGroup(int64_t g, const GroupSpan& span, int64_t m, int k, uint8_t* seg,
                         std::vector<uint8_t>* codes, std::vector<uint8_t>* slots,
                         const Table** built) {
  if (span.mode == kStored) {
    if (span.end != span.begin) {
      std::memcpy(seg, span.begin, static_cast<size_t>(span.end - span.begin));
    }
    return absl::OkStatus();
  }
  if (span.mode == kConstant) {
    codes->assign(static_cast<size_t>(m), *span.begin);
    kernels::detail::PackCodeBytes(codes->data(), m, k, seg);
    return absl::OkStatus();
  }
  // A group's own table is read again here, into this thread's stack: the header pass checked
  // it, and keeping one per group would cost ~2 KB for a 14-byte group of a hostile frame.
  Table own;
  if (span.mode == kRans) {
    const uint8_t* q = span.own_table;
    std::string why;
    if (!ReadTable(&q, span.begin, k, &own, &why)) return Bad(g, why);
  }
  const Table& t = span.mode == kRans ? own : *span.shared;
  const int prob_bits = t.prob_bits;
  const uint8_t* p = span.begin;
  if (span.mode == kRans || *built != span.shared) {
    slots->resize(size_t{1} << prob_bits);
    for (int s = t.lo; s <= t.hi; ++s) {
      std::memset(slots->data() + t.start[s], s, t.freq[s]);
    }
    *built = span.mode == kRans ? nullptr : span.shared;
  }
  uint32_t x0 = 0, x1 = 0;
  for (int b = 0; b < 4; ++b) {
    x0 |= uint32_t{p[b]} << (8 * b);
    x1 |= uint32_t{p[4 + b]} << (8 * b);
  }
  p += 8;
  const uint32_t mask = (1u << prob_bits) - 1;
  codes->resize(static_cast<size_t>(m));
  uint8_t* c = codes->data();
  const uint8_t* slot = slots->data();
  const uint8_t* const end = span.end;
  // One code from state x: decode, then refill x from the stream.
  auto step = [&](uint32_t& x, int64_t j) -> bool {
    const uint32_t r = x & mask;
    const uint8_t s = slot[r];
    x = t.freq[s] * (x >> prob_bits) + r - t.start[s];
    c[j] = s;
    while (x < kRansLow) {
      if (p == end) return false;
      x = (x << 8) | *p++;
    }
    return true;
  };
  int64_t j = 0;
  for (; j + 2 <= m; j += 2) {
    if (!step(x0, j) || !step(x1, j + 1)) return Bad(g, "stream ends before its last code");
  }
  if (j < m && !step(x0, j)) return Bad(g, "stream ends before its last code");
  if (p != end || x0 != kRansLow || x1 != kRansLow) {
    return Bad(g, "stream does not end in the coder's initial states at its last byte");
  }
  kernels::detail::PackCodeBytes(c, m, k, seg);
  return absl::OkStatus();
}

absl::Status CheckArguments(const kernels::GroupLayout& layout, absl::Span<const uint8_t> bits,
                            std::vector<int64_t>* offsets) {
  if (static_cast<int64_t>(bits.size()) != layout.groups) {
    return absl::InvalidArgumentError(absl::StrCat("entropy coding: ", bits.size(),
                                                   " bit widths for ", layout.groups, " groups"));
  }
  offsets->resize(bits.size() + 1);
  return kernels::PackedOffsets(bits, layout.per_group(), absl::MakeSpan(*offsets));
}

}  // namespace

namespace internal {

void UnpackCodes(const uint8_t* segment, int64_t m, int k, uint8_t* codes) {
  kernels::detail::UnpackCodeBytes(segment, m, k, codes);
}

void AddByteHistogram(const uint8_t* p, int64_t n, std::array<int64_t, 256>* counts) {
  std::array<std::array<int64_t, 256>, 4> part{};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++part[0][p[i]];
    ++part[1][p[i + 1]];
    ++part[2][p[i + 2]];
    ++part[3][p[i + 3]];
  }
  for (; i < n; ++i) ++part[0][p[i]];
  for (size_t v = 0; v < 256; ++v)
    (*counts)[v] += part[0][v] + part[1][v] + part[2][v] + part[3][v];
}

RansSymbol MakeRansSymbol(uint32_t start, uint32_t freq, int prob_bits) {
  RansSymbol s;
  s.x_max = ((kRansLow >> prob_bits) << 8) * freq;
  s.cmpl = (1u << prob_bits) - freq;
  if (freq < 2) {
    // x / 1 = x: q = x * (2^32 - 1) >> 32 = x - 1 for x >= 1, made up for in the bias.
    s.rcp = ~0u;
    s.shift = 32;
    s.bias = start + (1u << prob_bits) - 1;
  } else {
    uint32_t shift = 0;
    while (freq > (1u << shift)) ++shift;
    s.rcp = static_cast<uint32_t>(((uint64_t{1} << (shift + 31)) + freq - 1) / freq);
    s.shift = 32 + shift - 1;
    s.bias = start;
  }
  return s;
}

std::vector<uint32_t> NormalizeCounts(absl::Span<const int64_t> counts, int prob_bits) {
  const int64_t target = int64_t{1} << prob_bits;
  int64_t total = 0;
  for (int64_t c : counts) total += c;
  std::vector<uint32_t> freq(counts.size(), 0);
  if (total == 0) return freq;
  int64_t sum = 0;
  for (size_t s = 0; s < counts.size(); ++s) {
    if (counts[s] == 0) continue;
    const auto scaled =
        static_cast<int64_t>((static_cast<__int128>(counts[s]) * target + total / 2) / total);
    freq[s] = static_cast<uint32_t>(std::max<int64_t>(1, scaled));
    sum += freq[s];
  }
  // Give the difference to (or take it from) the largest frequencies: the smallest relative
  // change. Every frequency stays >= 1; counts.size() <= 2^prob_bits makes that possible.
  while (sum != target) {
    const size_t big =
        static_cast<size_t>(std::max_element(freq.begin(), freq.end()) - freq.begin());
    if (sum < target) {
      freq[big] += static_cast<uint32_t>(target - sum);
      sum = target;
    } else {
      // Take from the largest, but no more than halves it, and spread over several when needed.
      const int64_t take = std::min<int64_t>(sum - target, std::max<int64_t>(1, freq[big] / 2));
      freq[big] -= static_cast<uint32_t>(take);
      sum -= take;
    }
  }
  return freq;
}

}  // namespace internal

absl::StatusOr<CodedPayload> EntropyCode(absl::Span<const uint8_t> packed,
                                         const kernels::GroupLayout& layout,
                                         absl::Span<const uint8_t> bits,
                                         const kernels::ExecContext& cpu) {
  std::vector<int64_t> offsets;
  if (absl::Status st = CheckArguments(layout, bits, &offsets); !st.ok()) return st;
  if (static_cast<int64_t>(packed.size()) != offsets.back()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "entropy coding: ", packed.size(), " packed bytes, the layout implies ", offsets.back()));
  }
  const int64_t m = layout.per_group();
  const int own_bits = ProbBits(m);
  const int64_t groups = layout.groups;
  const auto gsize = static_cast<size_t>(groups);
  const int threads = kernels::detail::CpuThreads(cpu);
  const bool parallel = groups > 1 && m * groups >= (1 << 16);
  // 1. Every group's codes, histogram and entropy.
  std::vector<uint8_t> all(static_cast<size_t>(m) * gsize);
  std::vector<GroupCodes> info(gsize);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4) if (parallel)
  for (int64_t g = 0; g < groups; ++g) {
    const auto gi = static_cast<size_t>(g);
    uint8_t* c = all.data() + gi * static_cast<size_t>(m);
    kernels::detail::UnpackCodeBytes(packed.data() + offsets[gi], m, bits[gi], c);
    GroupCodes& gc = info[gi];
    internal::AddByteHistogram(c, m, &gc.counts);
    gc.lo = 256;
    for (int s = 0; s < (1 << bits[gi]); ++s) {
      if (gc.counts[s] == 0) continue;
      ++gc.present;
      gc.lo = std::min(gc.lo, s);
      gc.entropy += static_cast<double>(gc.counts[s]) *
                    std::log2(static_cast<double>(m) / static_cast<double>(gc.counts[s]));
    }
  }
  // 2. One shared table per bit width, from all its groups of two or more codes: a group
  // takes it instead of its own when that costs less than its own table and stream.
  std::array<std::unique_ptr<Table>, 9> shared;
  for (int k = 1; k <= 8; ++k) {
    std::array<int64_t, 256> sum{};
    int n = 0;
    for (size_t g = 0; g < gsize; ++g) {
      if (bits[g] != k || info[g].present < 2) continue;
      ++n;
      for (int s = 0; s < (1 << k); ++s) sum[s] += info[g].counts[s];
    }
    if (n < 2) continue;
    // Finer than a group's own table: it is paid once, and it codes n groups' codes.
    const int shared_bits = ProbBits(m * n);
    shared[k] = std::make_unique<Table>(
        MakeTable(internal::NormalizeCounts(
                      absl::MakeConstSpan(sum.data(), static_cast<size_t>(1) << k), shared_bits),
                  shared_bits));
  }
  // 3. Each group coded (shared tables count against the bound below: when they make the
  // payload larger than every group stored, it is coded again without them).
  CodedPayload out;
  for (const bool allow_shared : {true, false}) {
    std::vector<std::vector<uint8_t>> coded(gsize);
    std::array<const Table*, 9> shared_by_width{};
    for (int k = 1; k <= 8 && allow_shared; ++k) shared_by_width[k] = shared[k].get();
    const int64_t batches = (groups + kGroupBatch - 1) / kGroupBatch;
#pragma omp parallel num_threads(threads) if (parallel)
    {
      std::array<GroupPlan, kGroupBatch> plans;
      std::array<std::vector<uint8_t>, kGroupBatch> streams;
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < batches; ++b) {
        const int64_t g0 = b * kGroupBatch;
        CodeGroups(g0, static_cast<int>(std::min<int64_t>(kGroupBatch, groups - g0)), packed.data(),
                   offsets, all.data(), m, bits, own_bits, info, shared_by_width.data(), plans,
                   streams, &coded);
      }
    }
    std::array<bool, 9> used{};  // the shared tables some group took
    for (size_t g = 0; g < gsize; ++g) {
      if (!coded[g].empty() && coded[g][0] == kRansShared) used[bits[g]] = true;
    }
    out.bytes.clear();
    size_t total = 2 + 8 * (4 + 3 * 256);  // header and at most 8 shared tables
    for (const auto& c : coded) total += c.size();
    out.bytes.reserve(total);
    out.entropy_bits = 0;
    out.group_bytes.assign(gsize, 0);
    out.bytes.push_back(kCodingVersion);
    out.bytes.push_back(static_cast<uint8_t>(std::count(used.begin(), used.end(), true)));
    for (int k = 1; k <= 8; ++k) {
      if (!used[k]) continue;
      out.bytes.push_back(static_cast<uint8_t>(k));
      PutTable(*shared[k], &out.bytes);
    }
    for (size_t g = 0; g < gsize; ++g) {
      out.bytes.insert(out.bytes.end(), coded[g].begin(), coded[g].end());
      out.group_bytes[g] = static_cast<int64_t>(coded[g].size());
      out.entropy_bits += info[g].entropy;
    }
    if (static_cast<int64_t>(out.bytes.size()) <= MaxCodedPayloadBytes(offsets.back(), groups)) {
      break;
    }
  }
  return out;
}

absl::Status EntropyDecode(absl::Span<const uint8_t> coded, const kernels::GroupLayout& layout,
                           absl::Span<const uint8_t> bits, std::vector<uint8_t>* packed,
                           const kernels::ExecContext& cpu) {
  std::vector<int64_t> offsets;
  if (absl::Status st = CheckArguments(layout, bits, &offsets); !st.ok()) return st;
  const int64_t groups = layout.groups;
  if (static_cast<int64_t>(coded.size()) > MaxCodedPayloadBytes(offsets.back(), groups)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "frame field 'payload' (entropy-coded): ", coded.size(), " bytes, more than the ",
        MaxCodedPayloadBytes(offsets.back(), groups), " a coded payload of this frame may take"));
  }
  if (coded.empty()) {
    return absl::InvalidArgumentError(
        "frame field 'payload' (entropy-coded): the coding version is missing");
  }
  if (coded[0] != kCodingVersion) {
    return absl::InvalidArgumentError(
        absl::StrCat("frame field 'payload' (entropy-coded): coding version ",
                     static_cast<int>(coded[0]), " (this decoder reads ", kCodingVersion, ")"));
  }
  const int64_t m = layout.per_group();
  // The shared tables, at most one per bit width.
  const uint8_t* p = coded.data() + 1;
  const uint8_t* const end = coded.data() + coded.size();
  std::string why;
  std::array<std::unique_ptr<Table>, 9> shared;
  if (p == end) {
    return absl::InvalidArgumentError(
        "frame field 'payload' (entropy-coded): the shared-table count is missing");
  }
  const int n_shared = *p++;
  for (int i = 0; i < n_shared; ++i) {
    const int k = p == end ? 0 : *p++;
    if (k < 1 || k > 8 || shared[k] != nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("frame field 'payload' (entropy-coded): shared table ", i, ": bit width ", k,
                       " missing, outside 1..8 or repeated"));
    }
    shared[k] = std::make_unique<Table>();
    if (!ReadTable(&p, end, k, shared[k].get(), &why)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "frame field 'payload' (entropy-coded): shared table for ", k, " bits: ", why));
    }
  }
  // The header pass: each group's mode, table and extent, before any decoding.
  std::vector<GroupSpan> spans(static_cast<size_t>(groups));
  Table scratch;
  for (int64_t g = 0; g < groups; ++g) {
    const auto gi = static_cast<size_t>(g);
    const int k = bits[gi];
    GroupSpan& s = spans[gi];
    if (p == end) return Bad(g, "missing");
    s.mode = *p++;
    const int64_t seg_bytes = offsets[gi + 1] - offsets[gi];
    if (s.mode == kStored) {
      if (seg_bytes > end - p) return Bad(g, absl::StrCat(seg_bytes, " stored bytes, fewer left"));
      s.begin = p;
      p += seg_bytes;
    } else if (s.mode == kConstant) {
      if (p == end) return Bad(g, "the constant code is missing");
      if (*p >= (1 << k)) {
        return Bad(g,
                   absl::StrCat("constant code ", static_cast<int>(*p), " above ", (1 << k) - 1));
      }
      s.begin = p++;
    } else if (s.mode == kRans || s.mode == kRansShared) {
      if (s.mode == kRans) {
        s.own_table = p;
        if (!ReadTable(&p, end, k, &scratch, &why)) return Bad(g, why);
      } else {
        if (shared[k] == nullptr) return Bad(g, absl::StrCat("no shared table for ", k, " bits"));
        s.shared = shared[k].get();
      }
      uint64_t stream_bytes = 0;
      if (!GetVarint(&p, end, 10, &stream_bytes) || stream_bytes > static_cast<uint64_t>(end - p) ||
          stream_bytes < 8) {
        return Bad(g, "the stream length is malformed, below 8 or exceeds the bytes left");
      }
      s.begin = p;
      p += stream_bytes;
    } else {
      return Bad(g, absl::StrCat("unknown mode ", static_cast<int>(s.mode)));
    }
    s.end = p;
  }
  if (p != end) {
    return absl::InvalidArgumentError(absl::StrCat(
        "frame field 'payload' (entropy-coded): ", end - p, " bytes after the last group"));
  }
  packed->assign(static_cast<size_t>(offsets.back()), 0);
  std::vector<absl::Status> status(static_cast<size_t>(groups));
  const int threads = kernels::detail::CpuThreads(cpu);
#pragma omp parallel num_threads(threads) if (groups > 1 && m * groups >= (1 << 16))
  {
    std::vector<uint8_t> codes, slots;
    const Table* built = nullptr;
#pragma omp for schedule(dynamic, 4)
    for (int64_t g = 0; g < groups; ++g) {
      const auto gi = static_cast<size_t>(g);
      status[gi] = DecodeGroup(g, spans[gi], m, bits[gi], packed->data() + offsets[gi], &codes,
                               &slots, &built);
    }
  }
  for (const absl::Status& st : status) {
    if (!st.ok()) return st;
  }
  return absl::OkStatus();
}

}  // namespace splitq::quant

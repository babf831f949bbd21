#include "quant/entropy_coding.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
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

// Maps each of table t's 2^L slots to its code.
void BuildSlots(const Table& t, std::vector<uint8_t>* slots) {
  slots->resize(size_t{1} << t.prob_bits);
  for (int s = t.lo; s <= t.hi; ++s) {
    if (t.freq[s] != 0) std::memset(slots->data() + t.start[s], s, t.freq[s]);
  }
}

// One rANS decoding step with table t (slots from BuildSlots): code j of `codes` from state x,
// then x refilled from the stream [*p, end) while below 2^23. False if the stream runs out.
struct RansReader {
  const Table& t;
  const uint8_t* slot;
  uint8_t* codes;
  uint32_t mask = (1u << t.prob_bits) - 1;
  bool Step(uint32_t& x, int64_t j, const uint8_t*& p, const uint8_t* end) const {
    const uint32_t r = x & mask;
    const uint8_t s = slot[r];
    x = t.freq[s] * (x >> t.prob_bits) + r - t.start[s];
    codes[j] = s;
    while (x < kRansLow) {
      if (p == end) return false;
      x = (x << 8) | *p++;
    }
    return true;
  }
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
  const uint8_t* p = span.begin;
  if (span.mode == kRans || *built != span.shared) {
    BuildSlots(t, slots);
    *built = span.mode == kRans ? nullptr : span.shared;
  }
  uint32_t x0 = 0, x1 = 0;
  for (int b = 0; b < 4; ++b) {
    x0 |= uint32_t{p[b]} << (8 * b);
    x1 |= uint32_t{p[4 + b]} << (8 * b);
  }
  p += 8;
  codes->resize(static_cast<size_t>(m));
  uint8_t* c = codes->data();
  const uint8_t* const end = span.end;
  const RansReader rd{t, slots->data(), c};
  int64_t j = 0;
  for (; j + 2 <= m; j += 2) {
    if (!rd.Step(x0, j, p, end) || !rd.Step(x1, j + 1, p, end)) {
      return Bad(g, "stream ends before its last code");
    }
  }
  if (j < m && !rd.Step(x0, j, p, end)) return Bad(g, "stream ends before its last code");
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

// The shared tables at *p (a count, then per table its width and the table), at most one per
// width: both versions start with them.
absl::Status ReadSharedTables(const uint8_t** p, const uint8_t* end,
                              std::array<std::unique_ptr<Table>, 9>* shared) {
  std::string why;
  if (*p == end) {
    return absl::InvalidArgumentError(
        "frame field 'payload' (entropy-coded): the shared-table count is missing");
  }
  const int n_shared = *(*p)++;
  for (int i = 0; i < n_shared; ++i) {
    const int k = *p == end ? 0 : *(*p)++;
    if (k < 1 || k > 8 || (*shared)[k] != nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("frame field 'payload' (entropy-coded): shared table ", i, ": bit width ", k,
                       " missing, outside 1..8 or repeated"));
    }
    (*shared)[k] = std::make_unique<Table>();
    if (!ReadTable(p, end, k, (*shared)[k].get(), &why)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "frame field 'payload' (entropy-coded): shared table for ", k, " bits: ", why));
    }
  }
  return absl::OkStatus();
}

// The end of a payload's last group must be the payload's end.
absl::Status NothingAfter(const uint8_t* p, const uint8_t* end) {
  if (p == end) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("frame field 'payload' (entropy-coded): ", end - p,
                                                 " bytes after the last group"));
}

// fn(i, &scratch) for i in [0, n), on up to `threads` threads when `parallel`, each thread with
// its own Scratch; the first failure in index order, if any.
template <typename Scratch, typename Fn>
absl::Status DecodeEach(int64_t n, int threads, bool parallel, const Fn& fn) {
  std::vector<absl::Status> status(static_cast<size_t>(n));
#pragma omp parallel num_threads(threads) if (parallel)
  {
    Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) status[static_cast<size_t>(i)] = fn(i, &scratch);
  }
  for (const absl::Status& st : status) {
    if (!st.ok()) return st;
  }
  return absl::OkStatus();
}

// ---- coding version 2: streams that span runs of groups ---------------------------------
// docs/wire-format.md ("Entropy-coded payload", version 2) gives every byte. In short: groups
// are coded in runs of R consecutive groups; a run's rANS groups share one stream of four
// interleaved states (code i of a group in state i mod 4, the states going on from group to
// group), so the final states and the stream length are paid once a run; own tables are
// coded in bits; and a group of up to 5-bit codes may take a two-sided geometric table (a
// centre and a decay rate each side: 3 bytes), built in integer arithmetic so that every
// receiver gets the same frequencies.
enum Mode2 : uint8_t { kGeometric = 4 };
constexpr int kStates = 4;
constexpr int kGeometricMaxBits = 5;
constexpr int64_t kMaxRunGroups = 256;

// Groups per run: at least 2^16 codes a run where the groups allow (the states and the length
// then cost under 0.03% of a run of 2-bit codes), at most kMaxRunGroups, at most every group.
int64_t RunGroups(int64_t m, int64_t groups) {
  const int64_t want = m > 0 ? ((int64_t{1} << 16) + m - 1) / m : kMaxRunGroups;
  return std::clamp<int64_t>(want, 1, std::clamp<int64_t>(groups, 1, kMaxRunGroups));
}

// LSB-first bit fields (own tables of version 2).
class BitWriter {
 public:
  explicit BitWriter(std::vector<uint8_t>* out) : out_(out) {}
  void Put(uint32_t v, int bits) {
    acc_ |= static_cast<uint64_t>(v) << n_;
    n_ += bits;
    while (n_ >= 8) {
      out_->push_back(static_cast<uint8_t>(acc_));
      acc_ >>= 8;
      n_ -= 8;
    }
  }
  void Flush() {
    if (n_ > 0) out_->push_back(static_cast<uint8_t>(acc_));
    acc_ = 0;
    n_ = 0;
  }

 private:
  std::vector<uint8_t>* out_;
  uint64_t acc_ = 0;
  int n_ = 0;
};

class BitReader {
 public:
  BitReader(const uint8_t** p, const uint8_t* end) : p_(p), end_(end) {}
  bool Get(int bits, uint32_t* v) {
    while (n_ < bits) {
      if (*p_ == end_) return false;
      acc_ |= static_cast<uint64_t>(*(*p_)++) << n_;
      n_ += 8;
    }
    *v = static_cast<uint32_t>(acc_ & ((uint64_t{1} << bits) - 1));
    acc_ >>= bits;
    n_ -= bits;
    return true;
  }
  // The unread bits of the last byte read (padding) are zero.
  bool PaddingIsZero() const { return acc_ == 0; }

 private:
  const uint8_t** p_;
  const uint8_t* end_;
  uint64_t acc_ = 0;
  int n_ = 0;
};

// An own table in bits: L - 8 (4 bits), lo and hi (k bits each), then f_lo .. f_(hi-1) (L bits
// each; f_hi is what is left of 2^L), zero bits to the byte's end.
size_t BitTableBytes(const Table& t, int k) {
  return static_cast<size_t>((4 + 2 * k + (t.hi - t.lo) * t.prob_bits + 7) / 8);
}

void PutBitTable(const Table& t, int k, std::vector<uint8_t>* out) {
  BitWriter w(out);
  w.Put(static_cast<uint32_t>(t.prob_bits - 8), 4);
  w.Put(static_cast<uint32_t>(t.lo), k);
  w.Put(static_cast<uint32_t>(t.hi), k);
  for (int s = t.lo; s < t.hi; ++s) w.Put(t.freq[s], t.prob_bits);
  w.Flush();
}

bool ReadBitTable(const uint8_t** p, const uint8_t* end, int k, Table* t, std::string* why) {
  BitReader r(p, end);
  uint32_t l8 = 0, lo = 0, hi = 0;
  if (!r.Get(4, &l8) || !r.Get(k, &lo) || !r.Get(k, &hi)) {
    *why = "the table's precision or code range is cut";
    return false;
  }
  // 8..14 (what the coder writes): a table's slots cost 2^L bytes to build, whatever M is.
  const int prob_bits = 8 + static_cast<int>(l8);
  if (prob_bits > 14) {
    *why = absl::StrCat("probability bits ", prob_bits, " outside 8..14");
    return false;
  }
  if (lo > hi) {
    *why = absl::StrCat("code range ", lo, "..", hi, " is empty");
    return false;
  }
  *t = Table{};
  t->prob_bits = prob_bits;
  t->lo = static_cast<int>(lo);
  t->hi = static_cast<int>(hi);
  uint32_t total = 0;
  for (int s = t->lo; s < t->hi; ++s) {
    uint32_t f = 0;
    if (!r.Get(prob_bits, &f)) {
      *why = absl::StrCat("frequency of code ", s, " cut");
      return false;
    }
    t->freq[s] = f;
    t->start[s] = total;
    total += f;  // < 2^16 per frequency, at most 255 of them: no overflow
  }
  const uint32_t full = 1u << prob_bits;
  if (total >= full || (t->lo < t->hi && t->freq[t->lo] == 0)) {
    *why = absl::StrCat("frequencies sum to ", total, " of 2^", prob_bits,
                        " or the first is 0 (both ends of the range must occur)");
    return false;
  }
  t->freq[t->hi] = full - total;
  t->start[t->hi] = total;
  if (!r.PaddingIsZero()) {
    *why = "the table's padding bits are not zero";
    return false;
  }
  return true;
}

// The two-sided geometric table: weights 2^32 at code c, times (2a + 1) / 128 a code below and
// (2b + 1) / 128 a code above (integer products, truncated), normalized to 2^L by
// NormalizeCounts, L = ProbBits(m) (8..14: at least 4 slots a code for k <= 5). Codes whose
// weight truncates to 0 get no slot.
int GeometricBits(int64_t m, int /*k*/) { return ProbBits(m); }

Table GeometricTable(int64_t m, int k, int c, int a, int b) {
  const int alphabet = 1 << k;
  std::array<int64_t, 256> w{};
  w[c] = int64_t{1} << 32;
  for (int s = c - 1; s >= 0; --s) w[s] = (w[s + 1] * (2 * a + 1)) >> 7;
  for (int s = c + 1; s < alphabet; ++s) w[s] = (w[s - 1] * (2 * b + 1)) >> 7;
  const int prob_bits = GeometricBits(m, k);
  return MakeTable(internal::NormalizeCounts(
                       absl::MakeConstSpan(w.data(), static_cast<size_t>(alphabet)), prob_bits),
                   prob_bits);
}

// How a group goes into a version-2 payload, and what it is expected to cost (bytes).
struct Plan2 {
  uint8_t mode = kStored;
  Table table;  // own or geometric
  const Table* shared = nullptr;
  uint8_t c = 0, a = 0, b = 0;  // geometric
  double bytes = 0;
  const Table& rans_table() const { return mode == kRansShared ? *shared : table; }
  bool rans() const { return mode == kRans || mode == kRansShared || mode == kGeometric; }
};

// The decay index (0..63) whose rate (2i + 1) / 128 gives a geometric law the mean distance d.
int DecayIndex(double d) {
  const double theta = d / (1.0 + d);
  return std::clamp(static_cast<int>(std::lround(theta * 64.0 - 0.5)), 0, 63);
}

void PlanGroup2(int64_t m, int k, int own_bits, const GroupCodes& gc, const Table* shared,
                Plan2* plan) {
  const int64_t seg_bytes = kernels::PackedGroupBytes(m, k);
  plan->mode = kStored;
  plan->shared = nullptr;
  plan->bytes = static_cast<double>(seg_bytes + 1);
  if (gc.present == 1 && seg_bytes > 1) {
    plan->mode = kConstant;
    plan->c = static_cast<uint8_t>(gc.lo);
    plan->bytes = 2;
    return;
  }
  if (gc.present < 2 || gc.entropy / 8 + 2 >= static_cast<double>(seg_bytes)) return;
  const int alphabet = 1 << k;
  const auto counts = absl::MakeConstSpan(gc.counts.data(), static_cast<size_t>(alphabet));
  // Own table: about log2 m bits of precision, or (up to 6-bit codes, as in version 1) up to
  // two bits coarser where that is smaller.
  for (int l = own_bits; l >= (k <= 6 ? std::max(8, own_bits - 2) : own_bits); --l) {
    Table t = MakeTable(internal::NormalizeCounts(counts, l), l);
    const double bytes =
        1.0 + static_cast<double>(BitTableBytes(t, k)) + CostBits(gc.counts, alphabet, t) / 8;
    if (bytes < plan->bytes) {
      plan->bytes = bytes;
      plan->mode = kRans;
      plan->table = std::move(t);
    }
  }
  if (shared != nullptr) {
    const double bytes = 1.0 + CostBits(gc.counts, alphabet, *shared) / 8;
    if (bytes < plan->bytes) {
      plan->bytes = bytes;
      plan->mode = kRansShared;
      plan->shared = shared;
    }
  }
  if (k <= kGeometricMaxBits) {
    int mode = 0;
    for (int s = 1; s < alphabet; ++s) {
      if (gc.counts[s] > gc.counts[mode]) mode = s;
    }
    // Centre at the most frequent code; each side's rate from its mean distance, then one
    // step either way, the left rate first (5 tables tried).
    const int c = mode;
    double below = 0, above = 0, n_below = 0, n_above = 0;
    for (int s = 0; s < alphabet; ++s) {
      const auto n = static_cast<double>(gc.counts[s]);
      if (s < c) {
        below += n * (c - s);
        n_below += n;
      } else if (s > c) {
        above += n * (s - c);
        n_above += n;
      }
    }
    int best_a = DecayIndex(n_below > 0 ? below / n_below : 0.0);
    int best_b = DecayIndex(n_above > 0 ? above / n_above : 0.0);
    double best = HUGE_VAL;
    const auto try_rates = [&](int a, int b) {
      if (a < 0 || a > 63 || b < 0 || b > 63) return;
      Table t = GeometricTable(m, k, c, a, b);
      const double bytes = 4.0 + CostBits(gc.counts, alphabet, t) / 8;
      if (bytes < best) {
        best = bytes;
        best_a = a;
        best_b = b;
      }
      if (bytes < plan->bytes) {
        plan->bytes = bytes;
        plan->mode = kGeometric;
        plan->table = std::move(t);
        plan->c = static_cast<uint8_t>(c);
        plan->a = static_cast<uint8_t>(a);
        plan->b = static_cast<uint8_t>(b);
      }
    };
    try_rates(best_a, best_b);
    const int a0 = best_a;
    try_rates(a0 - 1, best_b);
    try_rates(a0 + 1, best_b);
    const int b0 = best_b;
    try_rates(best_a, b0 - 1);
    try_rates(best_a, b0 + 1);
  }
}

// Codes run [g0, g1) into `out`: every group's descriptor (its mode byte and what follows it),
// then, when some group is rANS-coded, the stream's length and the stream; every group stored
// instead when that is smaller (then it returns true). `group_bytes` gets each group's share.
bool EncodeRun2(int64_t g0, int64_t g1, int64_t m, const uint8_t* packed,
                const std::vector<int64_t>& offsets, const uint8_t* all,
                absl::Span<const uint8_t> bits, const std::vector<Plan2>& plans,
                std::vector<uint8_t>* stream, std::vector<uint8_t>* out, int64_t* group_bytes) {
  out->clear();
  int64_t rans_codes = 0, rans_groups = 0, stored_bytes = 0;
  for (int64_t g = g0; g < g1; ++g) {
    const auto gi = static_cast<size_t>(g);
    const Plan2& plan = plans[gi];
    const size_t before = out->size();
    const int64_t seg_bytes = offsets[gi + 1] - offsets[gi];
    stored_bytes += seg_bytes + 1;
    out->push_back(plan.mode);
    switch (plan.mode) {
      case kStored:
        out->insert(out->end(), packed + offsets[gi], packed + offsets[gi] + seg_bytes);
        break;
      case kConstant:
        out->push_back(plan.c);
        break;
      case kRans:
        PutBitTable(plan.table, bits[gi], out);
        break;
      case kGeometric:
        out->push_back(plan.c);
        out->push_back(plan.a);
        out->push_back(plan.b);
        break;
      default:
        break;
    }
    group_bytes[g - g0] = static_cast<int64_t>(out->size() - before);
    if (plan.rans()) {
      rans_codes += m;
      ++rans_groups;
    }
  }
  if (rans_groups > 0) {
    // Bytes a code: at most L <= 14 bits, renormalized a byte at a time; plus the states.
    stream->resize(static_cast<size_t>(rans_codes * 2 + 4 * kStates + 16));
    uint8_t* const end = stream->data() + stream->size();
    uint8_t* p = end;
    uint32_t x0 = kRansLow, x1 = kRansLow, x2 = kRansLow, x3 = kRansLow;
    std::array<internal::RansSymbol, 256> sym;
    for (int64_t g = g1 - 1; g >= g0; --g) {
      const auto gi = static_cast<size_t>(g);
      const Plan2& plan = plans[gi];
      if (!plan.rans()) continue;
      const Table& t = plan.rans_table();
      for (int s = t.lo; s <= t.hi; ++s) {
        if (t.freq[s] != 0) sym[s] = internal::MakeRansSymbol(t.start[s], t.freq[s], t.prob_bits);
      }
      const uint8_t* c = all + gi * static_cast<size_t>(m);
      const uint8_t* const p_before = p;
      // Code i into state i mod 4, from the last code down (the decoder reads them forward).
      int64_t i = m - m % kStates;
      switch (m % kStates) {  // the last m mod 4 codes first: states 2, 1, 0 as they come
        case 3:
          RansPut(p, x2, sym[c[i + 2]]);
          [[fallthrough]];
        case 2:
          RansPut(p, x1, sym[c[i + 1]]);
          [[fallthrough]];
        case 1:
          RansPut(p, x0, sym[c[i]]);
          break;
        default:
          break;
      }
      for (; i > 0; i -= kStates) {
        RansPut(p, x3, sym[c[i - 1]]);
        RansPut(p, x2, sym[c[i - 2]]);
        RansPut(p, x1, sym[c[i - 3]]);
        RansPut(p, x0, sym[c[i - 4]]);
      }
      group_bytes[g - g0] += p_before - p;
    }
    for (const uint32_t x : {x3, x2, x1, x0}) {  // state 0 first in the stream
      p -= 4;
      for (int b = 0; b < 4; ++b) p[b] = static_cast<uint8_t>(x >> (8 * b));
    }
    const auto stream_bytes = static_cast<uint64_t>(end - p);
    const size_t len_at = out->size();
    PutVarint(stream_bytes, out);
    // The length and the states: spread over the run's rANS groups.
    const int64_t shared_bytes = static_cast<int64_t>(out->size() - len_at) + 4 * kStates;
    for (int64_t g = g0; g < g1; ++g) {
      if (plans[static_cast<size_t>(g)].rans()) group_bytes[g - g0] += shared_bytes / rans_groups;
    }
    out->insert(out->end(), p, end);
  }
  if (static_cast<int64_t>(out->size()) > stored_bytes) {  // every group stored
    out->clear();
    for (int64_t g = g0; g < g1; ++g) {
      const auto gi = static_cast<size_t>(g);
      out->push_back(kStored);
      out->insert(out->end(), packed + offsets[gi], packed + offsets[gi + 1]);
      group_bytes[g - g0] = offsets[gi + 1] - offsets[gi] + 1;
    }
    return true;
  }
  return false;
}

// Version 2, decoding. One group's descriptor at *p, checked: the table of a rANS mode goes
// to *t (own, geometric) or *shared_out (shared); a stored group's segment to *stored.
struct Desc2 {
  uint8_t mode = kStored;
  const uint8_t* stored = nullptr;
  uint8_t q = 0;
  const Table* shared = nullptr;
};

bool ReadDesc2(const uint8_t** p, const uint8_t* end, int64_t m, int k, int64_t seg_bytes,
               const std::array<std::unique_ptr<Table>, 9>& shared, Desc2* d, Table* t,
               std::string* why) {
  if (*p == end) {
    *why = "missing";
    return false;
  }
  d->mode = *(*p)++;
  switch (d->mode) {
    case kStored:
      if (seg_bytes > end - *p) {
        *why = absl::StrCat(seg_bytes, " stored bytes, fewer left");
        return false;
      }
      d->stored = *p;
      *p += seg_bytes;
      return true;
    case kConstant:
      if (*p == end || **p >= (1 << k)) {
        *why = "the constant code is missing or outside the alphabet";
        return false;
      }
      d->q = *(*p)++;
      return true;
    case kRans:
      return ReadBitTable(p, end, k, t, why);
    case kRansShared:
      if (shared[k] == nullptr) {
        *why = absl::StrCat("no shared table for ", k, " bits");
        return false;
      }
      d->shared = shared[k].get();
      return true;
    case kGeometric: {
      if (k > kGeometricMaxBits) {
        *why = absl::StrCat("a geometric table for ", k, "-bit codes (at most ", kGeometricMaxBits,
                            ")");
        return false;
      }
      if (end - *p < 3 || (*p)[0] >= (1 << k) || (*p)[1] > 63 || (*p)[2] > 63) {
        *why = "the geometric table's centre or rates are cut or out of range";
        return false;
      }
      *t = GeometricTable(m, k, (*p)[0], (*p)[1], (*p)[2]);
      *p += 3;
      return true;
    }
    default:
      *why = absl::StrCat("unknown mode ", static_cast<int>(d->mode));
      return false;
  }
}

bool IsRans2(uint8_t mode) { return mode == kRans || mode == kRansShared || mode == kGeometric; }

// Where a run lies: its descriptors from `desc`, its stream [stream, end) (none: stream ==
// end == nullptr).
struct RunSpan {
  const uint8_t* desc = nullptr;
  const uint8_t* desc_end = nullptr;
  const uint8_t* stream = nullptr;
  const uint8_t* end = nullptr;
};

// Per thread: one group's codes, a table's slots, and the shared table they were built for.
struct RunScratch {
  std::vector<uint8_t> codes, slots;
  const Table* built = nullptr;
  Table table;
};

absl::Status DecodeRun2(int64_t g0, int64_t g1, const RunSpan& span, int64_t m,
                        absl::Span<const uint8_t> bits, const std::vector<int64_t>& offsets,
                        const std::array<std::unique_ptr<Table>, 9>& shared, uint8_t* packed,
                        RunScratch* sc) {
  const uint8_t* p = span.desc;
  const uint8_t* q = span.stream;
  const uint8_t* const end = span.end;
  std::array<uint32_t, kStates> x{};
  if (q != nullptr) {
    for (int j = 0; j < kStates; ++j) {
      for (int b = 0; b < 4; ++b) x[static_cast<size_t>(j)] |= uint32_t{q[4 * j + b]} << (8 * b);
    }
    q += 4 * kStates;
  }
  uint32_t x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
  for (int64_t g = g0; g < g1; ++g) {
    const auto gi = static_cast<size_t>(g);
    const int k = bits[gi];
    uint8_t* seg = packed + offsets[gi];
    const int64_t seg_bytes = offsets[gi + 1] - offsets[gi];
    Desc2 d;
    std::string why;
    if (!ReadDesc2(&p, span.desc_end, m, k, seg_bytes, shared, &d, &sc->table, &why)) {
      return Bad(g, why);  // checked by the header pass already
    }
    if (d.mode == kStored) {
      if (seg_bytes > 0) std::memcpy(seg, d.stored, static_cast<size_t>(seg_bytes));
      continue;
    }
    if (d.mode == kConstant) {
      sc->codes.assign(static_cast<size_t>(m), d.q);
      kernels::detail::PackCodeBytes(sc->codes.data(), m, k, seg);
      continue;
    }
    const Table& t = d.mode == kRansShared ? *d.shared : sc->table;
    if (d.mode != kRansShared || sc->built != d.shared) {
      BuildSlots(t, &sc->slots);
      sc->built = d.mode == kRansShared ? d.shared : nullptr;
    }
    sc->codes.resize(static_cast<size_t>(m));
    uint8_t* c = sc->codes.data();
    const RansReader rd{t, sc->slots.data(), c};
    int64_t i = 0;
    for (; i + kStates <= m; i += kStates) {
      if (!rd.Step(x0, i, q, end) || !rd.Step(x1, i + 1, q, end) || !rd.Step(x2, i + 2, q, end) ||
          !rd.Step(x3, i + 3, q, end)) {
        return Bad(g, "the run's stream ends before this group's last code");
      }
    }
    for (; i < m; ++i) {
      uint32_t& xs = i % kStates == 0 ? x0 : i % kStates == 1 ? x1 : x2;
      if (!rd.Step(xs, i, q, end))
        return Bad(g, "the run's stream ends before this group's last code");
    }
    kernels::detail::PackCodeBytes(c, m, k, seg);
  }
  if (span.stream != nullptr &&
      (q != end || x0 != kRansLow || x1 != kRansLow || x2 != kRansLow || x3 != kRansLow)) {
    return Bad(g1 - 1,
               "the run's stream does not end in the coder's initial states at its last "
               "byte");
  }
  return absl::OkStatus();
}

// Version 2 after the version byte (EntropyDecode checked the size bound and the version).
absl::Status DecodeVersion2(absl::Span<const uint8_t> coded, const kernels::GroupLayout& layout,
                            absl::Span<const uint8_t> bits, const std::vector<int64_t>& offsets,
                            std::vector<uint8_t>* packed, const kernels::ExecContext& cpu) {
  const int64_t m = layout.per_group();
  const int64_t groups = layout.groups;
  const uint8_t* p = coded.data() + 1;
  const uint8_t* const end = coded.data() + coded.size();
  std::string why;
  std::array<std::unique_ptr<Table>, 9> shared;
  SPLITQ_RETURN_IF_ERROR(ReadSharedTables(&p, end, &shared));
  uint64_t run = 0;
  if (!GetVarint(&p, end, 10, &run) || run < 1 ||
      run > static_cast<uint64_t>(std::max<int64_t>(groups, 1))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "frame field 'payload' (entropy-coded): groups per run missing, malformed or outside 1..",
        std::max<int64_t>(groups, 1)));
  }
  const auto r_groups = static_cast<int64_t>(run);
  const int64_t runs = (groups + r_groups - 1) / r_groups;
  // The header pass: every run's descriptors and stream, checked, before any decoding.
  std::vector<RunSpan> spans(static_cast<size_t>(runs));
  Table scratch;
  for (int64_t r = 0; r < runs; ++r) {
    RunSpan& span = spans[static_cast<size_t>(r)];
    span.desc = p;
    bool any_rans = false;
    for (int64_t g = r * r_groups; g < std::min(groups, (r + 1) * r_groups); ++g) {
      const auto gi = static_cast<size_t>(g);
      Desc2 d;
      if (!ReadDesc2(&p, end, m, bits[gi], offsets[gi + 1] - offsets[gi], shared, &d, &scratch,
                     &why)) {
        return Bad(g, why);
      }
      any_rans = any_rans || IsRans2(d.mode);
    }
    span.desc_end = p;
    if (any_rans) {
      uint64_t stream_bytes = 0;
      if (!GetVarint(&p, end, 10, &stream_bytes) || stream_bytes > static_cast<uint64_t>(end - p) ||
          stream_bytes < 4 * kStates) {
        return absl::InvalidArgumentError(absl::StrCat(
            "frame field 'payload' (entropy-coded): run ", r,
            ": the stream length is malformed, below ", 4 * kStates, " or exceeds the bytes left"));
      }
      span.stream = p;
      p += stream_bytes;
      span.end = p;
    }
  }
  SPLITQ_RETURN_IF_ERROR(NothingAfter(p, end));
  packed->assign(static_cast<size_t>(offsets.back()), 0);
  return DecodeEach<RunScratch>(
      runs, kernels::detail::CpuThreads(cpu), runs > 1 && m * groups >= (1 << 16),
      [&](int64_t r, RunScratch* sc) {
        return DecodeRun2(r * r_groups, std::min(groups, (r + 1) * r_groups),
                          spans[static_cast<size_t>(r)], m, bits, offsets, shared, packed->data(),
                          sc);
      });
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

namespace {

// What both encoders learn of a payload first: every group's codes (one per byte), histogram
// and entropy, and one shared table per bit width from all its groups of two or more codes.
struct Analysis {
  int64_t m = 0, groups = 0;
  int own_bits = 8, threads = 1;
  bool parallel = false;
  std::vector<int64_t> offsets;
  std::vector<uint8_t> all;
  std::vector<GroupCodes> info;
  std::array<std::unique_ptr<Table>, 9> shared;
};

absl::Status Analyze(absl::Span<const uint8_t> packed, const kernels::GroupLayout& layout,
                     absl::Span<const uint8_t> bits, const kernels::ExecContext& cpu, Analysis* a) {
  std::vector<int64_t>& offsets = a->offsets;
  if (absl::Status st = CheckArguments(layout, bits, &offsets); !st.ok()) return st;
  if (static_cast<int64_t>(packed.size()) != offsets.back()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "entropy coding: ", packed.size(), " packed bytes, the layout implies ", offsets.back()));
  }
  const int64_t m = layout.per_group();
  const int64_t groups = layout.groups;
  const auto gsize = static_cast<size_t>(groups);
  const int threads = kernels::detail::CpuThreads(cpu);
  const bool parallel = groups > 1 && m * groups >= (1 << 16);
  a->m = m;
  a->groups = groups;
  a->own_bits = ProbBits(m);
  a->threads = threads;
  a->parallel = parallel;
  // 1. Every group's codes, histogram and entropy.
  std::vector<uint8_t>& all = a->all;
  std::vector<GroupCodes>& info = a->info;
  all.resize(static_cast<size_t>(m) * gsize);
  info.assign(gsize, GroupCodes{});
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
  std::array<std::unique_ptr<Table>, 9>& shared = a->shared;
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
  return absl::OkStatus();
}

}  // namespace

namespace internal {

absl::StatusOr<CodedPayload> EntropyCodeVersion1(absl::Span<const uint8_t> packed,
                                                 const kernels::GroupLayout& layout,
                                                 absl::Span<const uint8_t> bits,
                                                 const kernels::ExecContext& cpu) {
  Analysis a;
  SPLITQ_RETURN_IF_ERROR(Analyze(packed, layout, bits, cpu, &a));
  const int64_t m = a.m, groups = a.groups;
  const auto gsize = static_cast<size_t>(groups);
  const int own_bits = a.own_bits, threads = a.threads;
  const bool parallel = a.parallel;
  const std::vector<int64_t>& offsets = a.offsets;
  const std::vector<uint8_t>& all = a.all;
  const std::vector<GroupCodes>& info = a.info;
  const std::array<std::unique_ptr<Table>, 9>& shared = a.shared;
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
    out.bytes.push_back(1);
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

}  // namespace internal

absl::StatusOr<CodedPayload> EntropyCode(absl::Span<const uint8_t> packed,
                                         const kernels::GroupLayout& layout,
                                         absl::Span<const uint8_t> bits,
                                         const kernels::ExecContext& cpu) {
  Analysis a;
  SPLITQ_RETURN_IF_ERROR(Analyze(packed, layout, bits, cpu, &a));
  const int64_t m = a.m, groups = a.groups;
  const auto gsize = static_cast<size_t>(groups);
  const int64_t run = RunGroups(m, groups);
  const int64_t runs = groups == 0 ? 0 : (groups + run - 1) / run;
  CodedPayload out;
  out.entropy_bits = 0;
  for (const GroupCodes& gc : a.info) out.entropy_bits += gc.entropy;
  for (const bool allow_shared : {true, false}) {
    std::vector<Plan2> plans(gsize);
#pragma omp parallel for num_threads(a.threads) schedule(dynamic, 4) if (a.parallel)
    for (int64_t g = 0; g < groups; ++g) {
      const auto gi = static_cast<size_t>(g);
      PlanGroup2(m, bits[gi], a.own_bits, a.info[gi],
                 allow_shared ? a.shared[bits[gi]].get() : nullptr, &plans[gi]);
    }
    std::vector<std::vector<uint8_t>> coded(static_cast<size_t>(runs));
    std::vector<char> stored_run(static_cast<size_t>(runs), 0);
    out.group_bytes.assign(gsize, 0);
#pragma omp parallel num_threads(a.threads) if (a.parallel && runs > 1)
    {
      std::vector<uint8_t> stream;
#pragma omp for schedule(dynamic, 1)
      for (int64_t r = 0; r < runs; ++r) {
        const int64_t g0 = r * run, g1 = std::min(groups, g0 + run);
        stored_run[static_cast<size_t>(r)] =
            EncodeRun2(g0, g1, m, packed.data(), a.offsets, a.all.data(), bits, plans, &stream,
                       &coded[static_cast<size_t>(r)], out.group_bytes.data() + g0);
      }
    }
    std::array<bool, 9> used{};  // the shared tables some group took (in a run not stored)
    for (int64_t r = 0; r < runs; ++r) {
      if (stored_run[static_cast<size_t>(r)]) continue;
      for (int64_t g = r * run; g < std::min(groups, (r + 1) * run); ++g) {
        const auto gi = static_cast<size_t>(g);
        if (plans[gi].mode == kRansShared) used[bits[gi]] = true;
      }
    }
    out.bytes.clear();
    out.bytes.push_back(kCodingVersion);
    out.bytes.push_back(static_cast<uint8_t>(std::count(used.begin(), used.end(), true)));
    for (int k = 1; k <= 8; ++k) {
      if (!used[k]) continue;
      out.bytes.push_back(static_cast<uint8_t>(k));
      PutTable(*a.shared[k], &out.bytes);
    }
    PutVarint(static_cast<uint64_t>(run), &out.bytes);
    for (const auto& c : coded) out.bytes.insert(out.bytes.end(), c.begin(), c.end());
    if (static_cast<int64_t>(out.bytes.size()) <= MaxCodedPayloadBytes(a.offsets.back(), groups)) {
      return out;
    }
  }
  // Larger than every group stored even without shared tables (a version-2 header is a byte
  // or two longer): every group stored, in version 1's layout, which is exactly that bound.
  out.bytes.assign({1, 0});
  for (size_t g = 0; g < gsize; ++g) {
    out.bytes.push_back(kStored);
    out.bytes.insert(out.bytes.end(), packed.begin() + a.offsets[g],
                     packed.begin() + a.offsets[g + 1]);
    out.group_bytes[g] = a.offsets[g + 1] - a.offsets[g] + 1;
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
  if (coded[0] == 2) return DecodeVersion2(coded, layout, bits, offsets, packed, cpu);
  if (coded[0] != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("frame field 'payload' (entropy-coded): coding version ",
                     static_cast<int>(coded[0]), " (this decoder reads 1 and 2)"));
  }
  const int64_t m = layout.per_group();
  // The shared tables, at most one per bit width.
  const uint8_t* p = coded.data() + 1;
  const uint8_t* const end = coded.data() + coded.size();
  std::string why;
  std::array<std::unique_ptr<Table>, 9> shared;
  SPLITQ_RETURN_IF_ERROR(ReadSharedTables(&p, end, &shared));
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
  SPLITQ_RETURN_IF_ERROR(NothingAfter(p, end));
  packed->assign(static_cast<size_t>(offsets.back()), 0);
  return DecodeEach<RunScratch>(
      groups, kernels::detail::CpuThreads(cpu), groups > 1 && m * groups >= (1 << 16),
      [&](int64_t g, RunScratch* sc) {
        const auto gi = static_cast<size_t>(g);
        return DecodeGroup(g, spans[gi], m, bits[gi], packed->data() + offsets[gi], &sc->codes,
                           &sc->slots, &sc->built);
      });
}

}  // namespace splitq::quant

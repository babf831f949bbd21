// libFuzzer target for the frame decoder (quant/wire_format.h): bytes from the network go
// through ParseFrame -> ValidateFrame -> DecodePayload exactly as a receiver would, and must
// never crash, leak, read or write out of bounds, or trip UBSan.
//
// Besides the input as received, the parsed frame is also re-sealed (its CRC recomputed) and
// validated and decoded again, so that mutations past the CRC still reach the content
// checks and the unpacking kernel. A frame without a bit map decodes with the map of the
// last valid frame that carried one (a static, as a receiver keeps it).
//
// Invariants checked (a violation aborts, which libFuzzer reports as a crash):
//   - ParseFrame accepts only canonical encodings: SerializeFrame(parsed) == input.
//   - ValidateFrame's errors are INVALID_ARGUMENT, FAILED_PRECONDITION or
//     RESOURCE_EXHAUSTED, and DecodePayload succeeds on every packed frame it accepts; on a
//     coded one (flags bit 1) it succeeds or says INVALID_ARGUMENT (rule V8), and agrees with
//     UncodedPayload.
//
// Seed corpus: run the binary with SPLITQ_FUZZ_WRITE_SEEDS=DIR and it writes a few valid
// frames to DIR and exits (from LLVMFuzzerInitialize, before any fuzzing). run_fuzz.sh does.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "quant/wire_format.h"

namespace {

using splitq::kernels::DType;
using splitq::quant::Frame;
using splitq::quant::FrameKind;

constexpr int64_t kMaxElements = int64_t{1} << 22;

struct KnownBitMap {
  bool valid = false;
  uint32_t version = 0;
  std::vector<uint8_t> bits;
};
KnownBitMap& Known() {
  static KnownBitMap known;
  return known;
}

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "frame_decoder_fuzz: invariant violated: %s\n", what);
    std::abort();
  }
}

// Validates and decodes `frame` as a receiver would.
void Receive(const Frame& frame) {
  splitq::quant::FrameLimits limits;
  limits.max_elements = kMaxElements;
  limits.max_payload_bytes = kMaxElements;
  KnownBitMap& known = Known();
  auto bits = splitq::quant::ValidateFrame(frame, known.valid ? &known.bits : nullptr,
                                           known.version, limits);
  if (!bits.ok()) {
    const absl::StatusCode code = bits.status().code();
    Check(code == absl::StatusCode::kInvalidArgument ||
              code == absl::StatusCode::kFailedPrecondition ||
              code == absl::StatusCode::kResourceExhausted,
          "unexpected ValidateFrame status code");
    return;
  }
  if (!frame.bits.empty()) {
    known.valid = true;
    known.version = frame.bitmap_version;
    known.bits = frame.bits;
  }
  auto layout = splitq::quant::FrameLayout(frame);
  Check(layout.ok() && layout->numel() <= kMaxElements, "layout of a validated frame");
  std::vector<uint8_t> out(static_cast<size_t>(layout->numel()) *
                           splitq::kernels::DTypeSize(frame.dtype));
  const absl::Status status = splitq::quant::DecodePayload(frame, *bits, out.data());
  if (frame.coded) {
    Check(status.ok() || status.code() == absl::StatusCode::kInvalidArgument,
          "DecodePayload error on a coded frame that is not INVALID_ARGUMENT");
    auto packed = splitq::quant::UncodedPayload(frame, *bits);
    Check(packed.ok() == status.ok(), "UncodedPayload and DecodePayload disagree");
    return;
  }
  Check(status.ok(), "DecodePayload failed on a validated frame");
}

// ---- seed corpus ------------------------------------------------------------------------------

void WriteSeed(const std::string& dir, const std::string& name, const std::string& bytes) {
  const std::string path = dir + "/" + name;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) {
    std::perror(path.c_str());
    std::exit(1);
  }
  std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
}

std::string SeedFrame(DType dtype, std::vector<int64_t> shape, int axis, uint32_t bitmap_version,
                      bool with_bits, uint32_t salt, bool coded = false) {
  int64_t numel = 1;
  for (const int64_t d : shape) numel *= d;
  const int64_t groups = axis < 0 ? 1 : shape[axis];
  std::vector<float> x(numel);
  for (int64_t i = 0; i < numel; ++i) x[i] = static_cast<float>((i * 37 + salt) % 23) * 0.5f - 4;
  if (coded) {  // peaked codes, so that groups take the rANS mode
    for (int64_t i = 0; i < numel; ++i) x[i] = (i * 7 + salt) % 11 == 0 ? 3.0f : -4.0f + (i % 3);
  }
  std::vector<uint16_t> half(numel);  // small positive values as fp16 or bf16
  for (int64_t i = 0; i < numel; ++i) half[i] = static_cast<uint16_t>(0x3c00 + (i * 131) % 512);
  std::vector<uint8_t> bits(groups);
  std::vector<float> scales(groups), offsets(groups);
  for (int64_t g = 0; g < groups; ++g) {
    bits[g] = static_cast<uint8_t>(1 + (g * 3 + salt) % 8);
    scales[g] = 0.125f * static_cast<float>(1 + g % 5);
    offsets[g] = -4.0f + static_cast<float>(g);
  }
  const void* data = dtype == DType::kFloat32 ? static_cast<const void*>(x.data())
                                              : static_cast<const void*>(half.data());
  auto frame = splitq::quant::EncodeFrame(data, dtype, shape, axis, bits, scales, offsets, {});
  if (!frame.ok()) {
    std::fprintf(stderr, "seed: %s\n", frame.status().ToString().c_str());
    std::exit(1);
  }
  frame->session_id = 0x5eed;
  frame->step = salt;
  frame->kind = salt % 2 ? FrameKind::kGradient : FrameKind::kActivation;
  frame->bitmap_version = bitmap_version;
  if (coded) {
    auto h = splitq::quant::EntropyCodeFrame(&*frame, bits);
    if (!h.ok() || !frame->coded) {
      std::fprintf(stderr, "seed: the coded seed did not code\n");
      std::exit(1);
    }
  }
  if (!with_bits) frame->bits.clear();
  splitq::quant::SealFrame(&*frame);
  return splitq::quant::SerializeFrame(*frame);
}

void WriteSeeds(const std::string& dir) {
  WriteSeed(dir, "example_3x2_axis1", SeedFrame(DType::kFloat32, {3, 2}, 1, 1, true, 0));
  WriteSeed(dir, "example_3x2_axis1_nobits", SeedFrame(DType::kFloat32, {3, 2}, 1, 1, false, 1));
  WriteSeed(dir, "tensor_f16_13", SeedFrame(DType::kFloat16, {13}, -1, 2, true, 2));
  WriteSeed(dir, "bf16_4x3x5_axis1", SeedFrame(DType::kBFloat16, {4, 3, 5}, 1, 3, true, 3));
  WriteSeed(dir, "f32_2x3x2x2_axis3", SeedFrame(DType::kFloat32, {2, 3, 2, 2}, 3, 4, true, 4));
  WriteSeed(dir, "f32_17x9_axis0", SeedFrame(DType::kFloat32, {17, 9}, 0, 5, true, 5));
  WriteSeed(dir, "scalar", SeedFrame(DType::kFloat32, {}, -1, 6, true, 6));
  WriteSeed(dir, "empty_0x4", SeedFrame(DType::kFloat16, {0, 4}, 1, 7, true, 7));
  WriteSeed(dir, "coded_f32_96x4_axis1",
            SeedFrame(DType::kFloat32, {96, 4}, 1, 8, true, 8, /*coded=*/true));
  WriteSeed(dir, "coded_bf16_8x3x40_axis1",
            SeedFrame(DType::kBFloat16, {8, 3, 40}, 1, 9, true, 9, /*coded=*/true));
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  if (const char* dir = std::getenv("SPLITQ_FUZZ_WRITE_SEEDS")) {
    WriteSeeds(dir);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto frame = splitq::quant::ParseFrame(absl::Span<const uint8_t>(data, size));
  if (!frame.ok()) {
    Check(frame.status().code() == absl::StatusCode::kInvalidArgument,
          "ParseFrame error that is not INVALID_ARGUMENT");
    return 0;
  }
  const std::string reencoded = splitq::quant::SerializeFrame(*frame);
  Check(reencoded.size() == size &&
            std::equal(reencoded.begin(), reencoded.end(), reinterpret_cast<const char*>(data)),
        "ParseFrame accepted a non-canonical encoding");
  Receive(*frame);
  // Past the CRC: the same frame, re-sealed.
  splitq::quant::SealFrame(&*frame);
  Receive(*frame);
  return 0;
}

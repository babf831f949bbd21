#include "kernels/op_table.h"

#include <algorithm>
#include <random>

#include "absl/strings/str_cat.h"

namespace splitq::kernels {

int64_t ShapeCase::numel() const {
  int64_t n = 1;
  for (const int64_t d : shape) n *= d;
  return n;
}

std::vector<ShapeCase> TestShapes() {
  const auto T = Granularity::kTensor, C = Granularity::kChannel, K = Granularity::kToken;
  return {
      // per tensor
      {"tensor_empty", {0}, T, 0},
      {"tensor_1", {1}, T, 0},
      {"tensor_7", {7}, T, 0},
      {"tensor_33x17", {33, 17}, T, 0},
      {"tensor_3x5x7x11", {3, 5, 7, 11}, T, 0},
      {"tensor_65539", {65539}, T, 0},
      // per channel, [N, C] on axis 1 (inner == 1)
      {"nc_empty_0x64", {0, 64}, C, 1},
      {"nc_1x1", {1, 1}, C, 1},
      {"nc_1x3", {1, 3}, C, 1},
      {"nc_7x1", {7, 1}, C, 1},
      {"nc_7x3", {7, 3}, C, 1},
      {"nc_5x32", {5, 32}, C, 1},
      {"nc_9x36", {9, 36}, C, 1},
      {"nc_33x100", {33, 100}, C, 1},
      {"nc_64x40", {64, 40}, C, 1},
      {"nc_300x37", {300, 37}, C, 1},
      {"nc_999x128", {999, 128}, C, 1},
      {"nc_1000x512", {1000, 512}, C, 1},
      {"nc_130x264", {130, 264}, C, 1},
      {"nc_20000x3", {20000, 3}, C, 1},
      {"nlc_3x7x48_axis_m1", {3, 7, 48}, C, -1},
      // per channel, [N, C, H, W] on axis 1 (inner > 1)
      {"nchw_empty", {0, 3, 2, 2}, C, 1},
      {"nchw_2x3x1x1", {2, 3, 1, 1}, C, 1},
      {"nchw_2x3x4x5", {2, 3, 4, 5}, C, 1},
      {"nchw_1x1x7x7", {1, 1, 7, 7}, C, 1},
      {"nchw_3x5x16x16", {3, 5, 16, 16}, C, 1},
      {"nchw_2x4x8x33", {2, 4, 8, 33}, C, 1},
      {"nchw_2x64x2x4", {2, 64, 2, 4}, C, 1},
      {"nchw_7x3x3x3", {7, 3, 3, 3}, C, 1},
      {"nchw_5x3x40x50", {5, 3, 40, 50}, C, 1},
      // per channel on axis 0 (weights [C_out, K])
      {"ck_16x9_axis0", {16, 9}, C, 0},
      {"ck_64x288_axis0", {64, 288}, C, 0},
      // per token
      {"token_empty_5x0", {5, 0}, K, 0},
      {"token_1x1", {1, 1}, K, 0},
      {"token_7x9", {7, 9}, K, 0},
      {"token_3x5x256", {3, 5, 256}, K, 0},
      {"token_4x1000", {4, 1000}, K, 0},
      {"token_64x4096", {64, 4096}, K, 0},
  };
}

std::vector<ShapeCase> LargeTestShapes() {
  const auto C = Granularity::kChannel;
  return {
      {"nc_1100x2048", {1100, 2048}, C, 1},
      {"nc_17000x40", {17000, 40}, C, 1},
      // short rows over several tiles of groups (pack.cu's staged kernels): 100 channels of
      // 7x7 make column tiles of 40, 40 and 20 groups; 700 groups of 3 make two uneven ones
      {"nchw_9x100x7x7", {9, 100, 7, 7}, C, 1},
      {"nchw_3x700x1x3", {3, 700, 1, 3}, C, 1},
  };
}

std::vector<int> TestBits() { return {2, 3, 4, 5, 6, 7, 8, 0}; }

const char* KernelOpName(KernelOp op) {
  switch (op) {
    case KernelOp::kCopy:
      return "copy";
    case KernelOp::kFakeQuant:
      return "fake_quant";
    case KernelOp::kLsq:
      return "lsq";
    case KernelOp::kPack:
      return "pack";
    case KernelOp::kPackStochastic:
      return "pack_sr";
    case KernelOp::kUnpack:
      return "unpack";
    case KernelOp::kRotate:
      return "rotate";
  }
  return "?";
}

std::string KernelCase::Name() const {
  std::string name = absl::StrCat(KernelOpName(op), ":", shape.name, ":", DTypeName(dtype));
  if (op == KernelOp::kCopy) return name;
  if (op == KernelOp::kRotate) return absl::StrCat(name, ":r", block);
  if (bits == 0) return absl::StrCat(name, ":b", mixed_lo, "-", mixed_hi);
  return absl::StrCat(name, ":b", bits);
}

double KernelCase::Bytes() const {
  const double n = static_cast<double>(shape.numel());
  const double es = static_cast<double>(DTypeSize(dtype));
  const double mean_bits = bits == 0 ? 0.5 * (mixed_lo + mixed_hi) : bits;
  switch (op) {
    case KernelOp::kCopy:
    case KernelOp::kFakeQuant:
    case KernelOp::kRotate:
      return 2 * n * es;
    case KernelOp::kLsq:  // forward: read x, write y; backward: read x and dy, write dx
      return 5 * n * es;
    case KernelOp::kPack:
    case KernelOp::kPackStochastic:
    case KernelOp::kUnpack:
      return n * es + n * mean_bits / 8;
  }
  return 0;
}

std::vector<uint8_t> KernelCase::MixedBits(int64_t groups) const {
  if (bits != 0) return {};
  std::vector<uint8_t> out(static_cast<size_t>(groups));
  std::mt19937 rng(1);
  const int span = mixed_hi - mixed_lo + 1;
  for (auto& b : out) b = static_cast<uint8_t>(mixed_lo + static_cast<int>(rng() % span));
  return out;
}

std::vector<std::pair<ShapeCase, std::vector<DType>>> PerfShapes(Device device) {
  const auto C = Granularity::kChannel;
  const auto f32 = DType::kFloat32, bf16 = DType::kBFloat16, f16 = DType::kFloat16;
  if (device == Device::kCuda) {
    return {
        {{"nc_16384x4096", {16384, 4096}, C, 1}, {f32, bf16, f16}},
        {{"nchw_256x64x32x32", {256, 64, 32, 32}, C, 1}, {f32, bf16}},
        {{"nchw_8192x64x7x7", {8192, 64, 7, 7}, C, 1}, {f32, bf16}},
    };
  }
  return {
      {{"nc_4096x4096", {4096, 4096}, C, 1}, {f32}},
      {{"nchw_64x64x32x32", {64, 64, 32, 32}, C, 1}, {f32}},
  };
}

std::vector<KernelCase> PerfCases(Device device) {
  std::vector<KernelCase> cases;
  for (const auto& [shape, dtypes] : PerfShapes(device)) {
    for (const DType dtype : dtypes) {
      auto add = [&](KernelOp op, int bits) {
        KernelCase c;
        c.op = op;
        c.shape = shape;
        c.dtype = dtype;
        c.bits = bits;
        cases.push_back(c);
      };
      add(KernelOp::kCopy, 8);
      add(KernelOp::kFakeQuant, 8);
      add(KernelOp::kLsq, 8);
      add(KernelOp::kPack, 4);
      add(KernelOp::kPack, 0);
      add(KernelOp::kPackStochastic, 4);
      add(KernelOp::kUnpack, 4);
      add(KernelOp::kUnpack, 0);
      // The rotation in blocks of 256 channels (issue 17's target case), or of the whole 64
      // channels of the NCHW shapes.
      add(KernelOp::kRotate, 8);
      cases.back().block = static_cast<int>(std::min<int64_t>(256, shape.shape[1]));
    }
  }
  return cases;
}

}  // namespace splitq::kernels

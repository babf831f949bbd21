// Tests for quant/wire_codec.h: tensor round trips, the bit-map protocol, rejected frames
// that leave the decoder usable, and the scale helpers.
#include "quant/wire_codec.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

namespace splitq::quant {
namespace {

TEST(WireCodec, RoundTripWithinHalfAStepAndBitMapSentOnlyOnChange) {
  const at::Tensor x = at::randn({64, 12});
  std::vector<uint8_t> bits(12, 4);
  WireEncoder enc(7, FrameKind::kActivation, {});
  WireDecoder dec;
  const WireRange range = MinMaxRange(x, 1, bits);
  auto f1 = enc.Encode(x, 1, bits, range.scales, range.offsets);
  ASSERT_TRUE(f1.ok()) << f1.status();
  EXPECT_EQ(f1->bits.size(), 12u);
  EXPECT_EQ(f1->session_id, 7u);
  auto y = dec.Decode(*f1);
  ASSERT_TRUE(y.ok()) << y.status();
  const at::Tensor err = (*y - x).abs();
  EXPECT_TRUE((err <= range.scales * 0.5001).all().item<bool>());

  auto f2 = enc.Encode(x, 2, bits, range.scales, range.offsets);
  ASSERT_TRUE(f2.ok());
  EXPECT_TRUE(f2->bits.empty());
  EXPECT_EQ(f2->bitmap_version, f1->bitmap_version);
  ASSERT_TRUE(dec.Decode(*f2).ok());

  bits[3] = 2;
  auto f3 = enc.Encode(x, 3, bits, MinMaxRange(x, 1, bits).scales, range.offsets);
  ASSERT_TRUE(f3.ok());
  EXPECT_EQ(f3->bitmap_version, f1->bitmap_version + 1);
  EXPECT_EQ(f3->bits.size(), 12u);
  EXPECT_LT(f3->payload.size(), f1->payload.size());
  ASSERT_TRUE(dec.Decode(*f3).ok());

  // A fresh decoder never saw the map of f2's version.
  WireDecoder fresh;
  EXPECT_EQ(fresh.Decode(*f2).status().code(), absl::StatusCode::kFailedPrecondition);
}

// An empty tensor (zero groups, no map) between two frames does not replace the kept map.
TEST(WireCodec, AFrameWithZeroGroupsKeepsTheKeptMap) {
  const at::Tensor x = at::randn({16, 4});
  std::vector<uint8_t> bits(4, 3);
  WireEncoder enc(1, FrameKind::kActivation, {});
  WireDecoder dec;
  const WireRange range = MinMaxRange(x, 1, bits);
  auto with_map = enc.Encode(x, 0, bits, range.scales, range.offsets);
  ASSERT_TRUE(with_map.ok());
  ASSERT_TRUE(dec.Decode(*with_map).ok());
  auto empty = EncodeFrame(nullptr, kernels::DType::kFloat32, {4, 0}, 1, {}, {}, {}, {});
  ASSERT_TRUE(empty.ok()) << empty.status();
  empty->bitmap_version = with_map->bitmap_version + 5;
  SealFrame(&*empty);
  auto decoded_empty = dec.Decode(*empty);
  ASSERT_TRUE(decoded_empty.ok()) << decoded_empty.status();
  EXPECT_EQ(decoded_empty->numel(), 0);
  auto without_map = enc.Encode(x, 1, bits, range.scales, range.offsets);
  ASSERT_TRUE(without_map.ok());
  ASSERT_TRUE(without_map->bits.empty());
  auto y = dec.Decode(*without_map);
  EXPECT_TRUE(y.ok()) << y.status();
}

TEST(WireCodec, RejectedFrameLeavesTheDecoderUsable) {
  const at::Tensor x = at::randn({16, 4});
  std::vector<uint8_t> bits(4, 3);
  WireEncoder enc(1, FrameKind::kGradient, {});
  WireDecoder dec;
  const WireRange range = MaxAbsRange(x, 1, bits);
  auto v1 = enc.Encode(x, 0, bits, range.scales, range.offsets);
  ASSERT_TRUE(v1.ok());
  ASSERT_TRUE(dec.Decode(*v1).ok());
  auto v1_again = enc.Encode(x, 1, bits, range.scales, range.offsets);  // no map: version 1
  ASSERT_TRUE(v1_again.ok());
  ASSERT_TRUE(v1_again->bits.empty());
  // A frame with a new map (version 2) and a bad CRC, then one with NaN scales: both rejected.
  std::vector<uint8_t> bits2(4, 5);
  auto v2 =
      WireEncoder(1, FrameKind::kGradient, {}).Encode(x, 2, bits2, range.scales, range.offsets);
  ASSERT_TRUE(v2.ok());
  Frame bad_crc = *v2;
  bad_crc.bitmap_version = 2;
  bad_crc.payload[0] ^= 0x5A;
  EXPECT_EQ(dec.Decode(bad_crc).status().code(), absl::StatusCode::kInvalidArgument);
  Frame nan_scale = *v2;
  nan_scale.bitmap_version = 2;
  nan_scale.scales[1] = std::nanf("");
  SealFrame(&nan_scale);
  EXPECT_EQ(dec.Decode(nan_scale).status().code(), absl::StatusCode::kInvalidArgument);
  // The decoder still holds version 1's map: a frame without a map at version 1 decodes.
  EXPECT_TRUE(dec.Decode(*v1_again).ok());
}

TEST(WireCodec, SenderRecoversAfterTheReceiverMissedANewMap) {
  const at::Tensor x = at::randn({16, 4});
  std::vector<uint8_t> bits(4, 3);
  WireEncoder enc(1, FrameKind::kActivation, {});
  WireDecoder dec;
  WireRange range = MinMaxRange(x, 1, bits);
  ASSERT_TRUE(dec.Decode(*enc.Encode(x, 0, bits, range.scales, range.offsets)).ok());
  bits[0] = 6;  // a new map, in a frame that gets lost
  range = MinMaxRange(x, 1, bits);
  ASSERT_TRUE(enc.Encode(x, 1, bits, range.scales, range.offsets).ok());
  auto next = enc.Encode(x, 2, bits, range.scales, range.offsets);
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(dec.Decode(*next).status().code(), absl::StatusCode::kFailedPrecondition);
  enc.ResendBitMap();
  auto resent = enc.Encode(x, 3, bits, range.scales, range.offsets);
  ASSERT_TRUE(resent.ok());
  EXPECT_EQ(resent->bits, bits);
  EXPECT_TRUE(dec.Decode(*resent).ok());
  auto after = enc.Encode(x, 4, bits, range.scales, range.offsets);
  ASSERT_TRUE(after.ok());
  EXPECT_TRUE(after->bits.empty());
  EXPECT_TRUE(dec.Decode(*after).ok());
}

TEST(WireCodec, FailedEncodeDoesNotMoveTheBitMapVersion) {
  const at::Tensor x = at::randn({8, 2});
  WireEncoder enc(1, FrameKind::kActivation, {});
  ASSERT_TRUE(enc.Encode(x, 0, {4, 4}, at::tensor({0.1f, 0.1f}), at::zeros({2})).ok());
  const uint32_t version = enc.bitmap_version();
  EXPECT_EQ(enc.Encode(x, 1, {5, 5}, at::tensor({0.1f, -1.0f}), at::zeros({2})).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(enc.bitmap_version(), version);
  WireEncoderOptions bad_axis;
  bad_axis.group_axis = -2;
  EXPECT_EQ(WireEncoder(1, FrameKind::kActivation, bad_axis)
                .Encode(x, 0, {4}, at::tensor({0.1f}), at::zeros({1}))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(WireCodec, EncodeRejectsBadScalesAndBits) {
  const at::Tensor x = at::randn({8, 2});
  WireEncoder enc(1, FrameKind::kActivation, {});
  EXPECT_FALSE(enc.Encode(x, 0, {4, 4}, at::tensor({0.1f, -1.0f}), at::zeros({2})).ok());
  EXPECT_FALSE(enc.Encode(x, 0, {4, 9}, at::tensor({0.1f, 0.1f}), at::zeros({2})).ok());
  EXPECT_FALSE(enc.Encode(x, 0, {4}, at::tensor({0.1f, 0.1f}), at::zeros({2})).ok());
}

TEST(WireCodec, StochasticGradientsAreUnbiased) {
  const at::Tensor g = at::full({20000, 2}, 0.123f);
  g.select(1, 1).fill_(-0.77f);
  const std::vector<uint8_t> bits(2, 2);
  WireEncoderOptions opt;
  opt.rounding = kernels::Rounding::kStochastic;
  opt.seed = 99;
  WireEncoder enc(1, FrameKind::kGradient, opt);
  WireDecoder dec;
  // A range wider than the values so that they fall between levels.
  const at::Tensor scales = at::full({2}, 2.0f / 3.0f), offsets = at::full({2}, -1.0f);
  auto frame = enc.Encode(g, 5, bits, scales, offsets);
  ASSERT_TRUE(frame.ok());
  auto y = dec.Decode(*frame);
  ASSERT_TRUE(y.ok());
  const at::Tensor mean = y->mean(0);
  EXPECT_NEAR(mean[0].item<float>(), 0.123f, 0.01f);
  EXPECT_NEAR(mean[1].item<float>(), -0.77f, 0.01f);
}

TEST(WireCodec, BFloat16AndPerTensorRoundTrip) {
  const at::Tensor x = at::randn({3, 5, 7}).to(at::kBFloat16);
  const std::vector<uint8_t> bits = {6};
  WireEncoderOptions opt;
  opt.group_axis = -1;
  WireEncoder enc(1, FrameKind::kActivation, opt);
  WireDecoder dec;
  const WireRange range = MinMaxRange(x, -1, bits);
  auto frame = enc.Encode(x, 0, bits, range.scales, range.offsets);
  ASSERT_TRUE(frame.ok()) << frame.status();
  auto y = dec.Decode(*frame);
  ASSERT_TRUE(y.ok());
  EXPECT_EQ(y->scalar_type(), at::kBFloat16);
  EXPECT_EQ(y->sizes(), x.sizes());
  EXPECT_LE((*y - x).abs().max().item<float>(), range.scales[0].item<float>() * 0.51f + 0.02f);
}

// The one-pass CPU float32 ranges agree exactly with torch's reductions (the path a
// non-contiguous or bf16 tensor takes), per tensor, channel and last-axis grouping, and a NaN
// makes its group's range NaN (which the encoder then refuses).
TEST(WireCodec, FastCpuRangesMatchTorchReductions) {
  const at::Tensor x = at::randn({5, 7, 3, 4});
  for (const int32_t axis : {-1, 1, 3}) {
    const int64_t groups = axis < 0 ? 1 : x.size(axis);
    const std::vector<uint8_t> bits(static_cast<size_t>(groups), 5);
    // A transposed copy is not contiguous: it takes the torch path.
    const at::Tensor slow_x = x.transpose(0, 2).contiguous().transpose(0, 2);
    ASSERT_FALSE(slow_x.is_contiguous());
    const WireRange fast = MinMaxRange(x, axis, bits), slow = MinMaxRange(slow_x, axis, bits);
    EXPECT_TRUE(at::equal(fast.scales, slow.scales)) << axis;
    EXPECT_TRUE(at::equal(fast.offsets, slow.offsets)) << axis;
    const WireRange fast_abs = MaxAbsRange(x, axis, bits),
                    slow_abs = MaxAbsRange(slow_x, axis, bits);
    EXPECT_TRUE(at::equal(fast_abs.scales, slow_abs.scales)) << axis;
    EXPECT_TRUE(at::equal(fast_abs.offsets, slow_abs.offsets)) << axis;
  }
  at::Tensor with_nan = x.clone();
  with_nan[2][4][1][0] = std::numeric_limits<float>::quiet_NaN();
  const std::vector<uint8_t> bits(7, 5);
  const WireRange range = MinMaxRange(with_nan, 1, bits);
  EXPECT_TRUE(std::isnan(range.offsets[4].item<float>()));
  EXPECT_FALSE(std::isnan(range.offsets[3].item<float>()));
  EXPECT_TRUE(std::isnan(MaxAbsRange(with_nan, 1, bits).scales[4].item<float>()));
}

}  // namespace
}  // namespace splitq::quant

// The torch-level ops on CUDA tensors against the same ops on CPU tensors: fake-quant,
// the LSQ autograd op, the AMAQ boundary, the wire codec and the channel rotation. Skips with a
// reason when libtorch has no CUDA or the machine has no GPU.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include "quant/amaq_boundary.h"
#include "quant/channel_rotation.h"
#include "quant/lsq_quantizer.h"
#include "quant/wire_codec.h"

namespace splitq::quant {
namespace {

class CudaTensors : public ::testing::TestWithParam<at::ScalarType> {
 protected:
  void SetUp() override {
#if !defined(SPLITQ_TORCH_CUDA)
    GTEST_SKIP() << "splitq was built against a libtorch without CUDA";
#else
    if (!at::globalContext().hasCUDA()) GTEST_SKIP() << "no CUDA device visible to libtorch";
#endif
  }
};

TEST_P(CudaTensors, FakeQuantAndPackMatchTheCpu) {
  const at::ScalarType dtype = GetParam();
  at::manual_seed(3);
  const at::Tensor x = (at::randn({513, 67}) * 2).to(dtype);
  std::vector<uint8_t> bits(67);
  for (size_t i = 0; i < bits.size(); ++i) bits[i] = static_cast<uint8_t>(1 + i % 8);
  QuantTensors q;
  q.scale = at::rand({67}) * 0.3 + 0.01;
  q.offset = at::randn({67});
  q.bits = at::tensor(std::vector<uint8_t>(bits)).to(at::kByte);
  QuantTensors qc = q;
  qc.scale = q.scale.cuda();
  qc.offset = q.offset.cuda();
  qc.bits = q.bits.cuda();
  const Grouping g{kernels::Granularity::kChannel, 1};
  EXPECT_TRUE(at::equal(FakeQuantize(x, g, q), FakeQuantize(x.cuda(), g, qc).cpu()));
  const at::Tensor packed_cpu = QuantizePack(x, g, q, bits, {kernels::Rounding::kStochastic, 5, 9});
  const at::Tensor packed_gpu =
      QuantizePack(x.cuda(), g, qc, bits, {kernels::Rounding::kStochastic, 5, 9}).cpu();
  EXPECT_TRUE(at::equal(packed_cpu, packed_gpu));
  EXPECT_TRUE(at::equal(UnpackDequantize(packed_cpu, x.sizes(), dtype, g, q, bits),
                        UnpackDequantize(packed_cpu.cuda(), x.sizes(), dtype, g, qc, bits).cpu()));
}

TEST_P(CudaTensors, LsqAutogradMatchesTheCpu) {
  const at::ScalarType dtype = GetParam();
  at::manual_seed(4);
  const at::Tensor x0 = at::randn({1000, 33}).to(dtype);
  const at::Tensor dy0 = at::randn({1000, 33}).to(dtype);
  LsqOptions opt;
  opt.bits = 4;
  opt.learn_offset = true;
  opt.grouping = Grouping{kernels::Granularity::kChannel, 1};
  std::vector<at::Tensor> results[2];
  for (int dev = 0; dev < 2; ++dev) {
    const at::Device device = dev == 0 ? at::Device(at::kCPU) : at::Device(at::kCUDA);
    const at::Tensor x = x0.to(device).requires_grad_(true);
    const at::Tensor s =
        at::full({33}, 0.2f, at::TensorOptions().device(device)).requires_grad_(true);
    const at::Tensor b =
        at::full({33}, 0.1f, at::TensorOptions().device(device)).requires_grad_(true);
    const at::Tensor y = LsqFakeQuant(x, s, b, opt);
    auto grads = torch::autograd::grad({y}, {x, s, b}, {dy0.to(device)});
    results[dev] = {y.cpu(), grads[0].cpu(), grads[1].cpu(), grads[2].cpu()};
  }
  EXPECT_TRUE(at::equal(results[0][0], results[1][0]));
  EXPECT_TRUE(at::equal(results[0][1], results[1][1]));
  EXPECT_TRUE(at::allclose(results[0][2], results[1][2], 1e-4, 1e-5));
  EXPECT_TRUE(at::allclose(results[0][3], results[1][3], 1e-4, 1e-5));
}

INSTANTIATE_TEST_SUITE_P(DTypes, CudaTensors,
                         ::testing::Values(at::kFloat, at::kBFloat16, at::kHalf));

TEST(CudaBoundary, EncodedOnTheGpuDecodesOnTheCpuToTheGpuForward) {
#if !defined(SPLITQ_TORCH_CUDA)
  GTEST_SKIP() << "splitq was built against a libtorch without CUDA";
#else
  if (!at::globalContext().hasCUDA()) GTEST_SKIP() << "no CUDA device visible to libtorch";
  AmaqOptions opt;
  opt.channel_axis = -1;
  AmaqBoundary boundary(opt, 64);
  boundary->to(at::kCUDA);
  const at::Tensor h = at::randn({8, 32, 64}, at::kCUDA);
  const at::Tensor y = boundary->forward(h, 3.5);
  WireEncoderOptions enc_opt;
  enc_opt.group_axis = 2;
  WireEncoder enc(1, FrameKind::kActivation, enc_opt);
  auto frame =
      enc.Encode(h, 0, boundary->last_bits(), boundary->wire_scales(), boundary->wire_offsets());
  ASSERT_TRUE(frame.ok()) << frame.status();
  WireDecoder dec;
  auto decoded = dec.Decode(*frame, at::kCPU);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_TRUE(at::equal(*decoded, y.detach().cpu()));
  WireDecoder dec_gpu;
  auto decoded_gpu = dec_gpu.Decode(*frame, at::kCUDA);
  ASSERT_TRUE(decoded_gpu.ok()) << decoded_gpu.status();
  EXPECT_TRUE(at::equal(decoded_gpu->cpu(), y.detach().cpu()));
#endif
}

// The rotation on CUDA (kernels/rotate.cu) gives the CPU kernel's float32 values bit for bit,
// channels last and NCHW, forward and inverse, and its gradient is the other rotation; 16-bit
// tensors agree with the float32 rotation rounded once; an NCHW block over 64 takes the matmul.
TEST(CudaRotation, MatchesTheCpuAndDifferentiates) {
#if !defined(SPLITQ_TORCH_CUDA)
  GTEST_SKIP() << "splitq was built against a libtorch without CUDA";
#else
  if (!at::globalContext().hasCUDA()) GTEST_SKIP() << "no CUDA device visible to libtorch";
  at::manual_seed(5);
  struct Case {
    std::vector<int64_t> shape;
    int64_t axis, block;
  };
  for (const Case& k : {Case{{64, 512}, 1, 256}, Case{{3, 7, 1024}, -1, 1024}, Case{{5, 96}, 1, 32},
                        Case{{4, 64, 7, 7}, 1, 64}, Case{{2, 128, 3, 3}, 1, 128}}) {
    const at::Tensor x = at::randn(k.shape);
    const ChannelRotation r(x.size(k.axis), k.block, 11);
    for (const bool inverse : {false, true}) {
      const at::Tensor want = inverse ? r.Inverse(x, k.axis) : r.Forward(x, k.axis);
      const at::Tensor got = inverse ? r.Inverse(x.cuda(), k.axis) : r.Forward(x.cuda(), k.axis);
      if (k.block <= 64 || k.shape.size() == 2 || k.axis == -1) {
        EXPECT_TRUE(at::equal(got.cpu(), want)) << k.block;
      } else {  // the matmul: the same R to float rounding
        EXPECT_TRUE(at::allclose(got.cpu(), want, 1e-4, 1e-5)) << k.block;
      }
      for (const at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
        const at::Tensor x16 = x.to(dtype);
        const at::Tensor ref =
            inverse ? r.Inverse(x16.to(at::kFloat), k.axis) : r.Forward(x16.to(at::kFloat), k.axis);
        const at::Tensor got16 =
            inverse ? r.Inverse(x16.cuda(), k.axis) : r.Forward(x16.cuda(), k.axis);
        ASSERT_EQ(got16.scalar_type(), dtype);
        if (k.block <= 64 || k.shape.size() == 2 || k.axis == -1) {
          EXPECT_TRUE(at::equal(got16.cpu(), ref.to(dtype))) << k.block;
        }
      }
    }
    const at::Tensor xg = x.cuda().requires_grad_(true);
    const at::Tensor g = at::randn(k.shape, at::kCUDA);
    const at::Tensor dx = torch::autograd::grad({r.Forward(xg, k.axis)}, {xg}, {g})[0];
    EXPECT_TRUE(at::allclose(dx, r.Inverse(g, k.axis), 1e-5, 1e-6));
  }
#endif
}

}  // namespace
}  // namespace splitq::quant

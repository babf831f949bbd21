// Tests for quant/tensor_ops.h: argument checks at the torch boundary.
#include "quant/tensor_ops.h"

#include <gtest/gtest.h>

namespace splitq::quant {
namespace {

QuantTensors Scale(int64_t groups, int bits = 8) {
  QuantTensors q;
  q.scale = at::full({groups}, 0.1f);
  q.uniform_bits = bits;
  q.is_signed = true;
  return q;
}

TEST(TensorOps, RejectsIntegerInputWithMessage) {
  const at::Tensor x = at::ones({4, 3}, at::kInt);
  try {
    FakeQuantize(x, Grouping{}, Scale(3));
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("unsupported dtype"), std::string::npos) << e.what();
  }
}

TEST(TensorOps, RejectsWrongScaleLength) {
  const at::Tensor x = at::randn({4, 3});
  EXPECT_THROW(FakeQuantize(x, Grouping{}, Scale(4)), c10::Error);
}

TEST(TensorOps, NonContiguousInputGivesTheSameResultAsContiguous) {
  const at::Tensor base = at::randn({5, 8});
  const at::Tensor xt = base.t();  // [8, 5], non-contiguous
  const at::Tensor a = FakeQuantize(xt, Grouping{}, Scale(5));
  const at::Tensor b = FakeQuantize(xt.contiguous(), Grouping{}, Scale(5));
  EXPECT_TRUE(at::equal(a, b));
}

TEST(TensorOps, PackUnpackRoundTripsAllDtypes) {
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    const at::Tensor x = at::randn({33, 6}).to(dtype);
    const std::vector<uint8_t> bits = {1, 2, 3, 4, 5, 8};
    QuantTensors q;
    q.scale = at::full({6}, 0.05f);
    q.offset = at::full({6}, -1.0f);
    const at::Tensor packed = QuantizePack(x, Grouping{}, q, bits, {});
    const at::Tensor y = UnpackDequantize(packed, x.sizes(), dtype, Grouping{}, q, bits);
    QuantTensors qb = q;
    qb.bits = at::tensor(std::vector<uint8_t>(bits)).to(at::kByte);
    EXPECT_TRUE(at::equal(y, FakeQuantize(x, Grouping{}, qb))) << dtype;
  }
}

}  // namespace
}  // namespace splitq::quant

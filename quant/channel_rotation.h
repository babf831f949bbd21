// splitq quant: the randomized Hadamard rotation of a boundary tensor along its channels, as
// torch ops (autograd, CPU and CUDA, any float dtype): issue 17's rotated boundaries.
//
// The same R as kernels/rotate.h (block-diagonal; within a block of b channels,
// R = H diag(s) / sqrt(b), H the Sylvester-Hadamard matrix, s_c = kernels::RotationSign(seed, c)),
// computed by kernels/rotate.h's fast Walsh-Hadamard transform (log2(b) add passes) where it
// runs the case (CPU float32; CUDA float32, bfloat16 and float16, any block channels last and
// blocks up to 64 for inner > 1; float32 gives the same bits on both devices), else as a
// [b, b] matmul on the channels moved last (the same R to float rounding). The sender rotates
// the boundary
// activation before it is quantized (Forward) and the receiver undoes it after decoding
// (Inverse); the receiver's gradient goes back rotated (Forward of the gradient: for y = R x,
// dL/dy = R dL/dx as R is orthonormal), so the sender backpropagates through its quantizer in
// the rotated basis and through R to its layers. An outlier channel is spread over its block
// (1/sqrt(b) of it in each channel), which is what makes 2-4-bit codes fail without it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>

namespace splitq::quant {

class ChannelRotation {
 public:
  // No rotation (Forward and Inverse return their input).
  ChannelRotation() = default;
  // Blocks of `block` channels (a power of two >= 2; where it does not divide `channels`, the
  // largest power of two that does, see block()); `seed` picks the signs. block <= 1 or a
  // largest dividing power of two of 1 (odd channel counts): no rotation.
  ChannelRotation(int64_t channels, int64_t block, uint64_t seed);

  bool enabled() const { return block_ > 1; }
  int64_t block() const { return block_; }
  int64_t channels() const { return channels_; }

  // R x and R^T y along dimension `axis` (size channels()). Differentiable.
  at::Tensor Forward(const at::Tensor& x, int64_t axis) const;
  at::Tensor Inverse(const at::Tensor& y, int64_t axis) const;

  // Tests and benchmarks: the [b, b] matmul on every device and dtype (instead of the kernel
  // where it runs the case).
  void set_force_matmul(bool on) { force_matmul_ = on; }

 private:
  at::Tensor Apply(const at::Tensor& x, int64_t axis, bool inverse) const;
  // The sign bits (kernels::RotationSignBits) on `device`, copied there once.
  at::Tensor SignBitsOn(const at::Device& device) const;

  int64_t channels_ = 0;
  int64_t block_ = 0;
  uint64_t seed_ = 0;
  bool force_matmul_ = false;
  at::Tensor signs_;      // [channels / block, block] float32, CPU
  at::Tensor hadamard_;   // [block, block] float32, CPU, H / sqrt(block)
  at::Tensor sign_bits_;  // [ceil(channels / 32)] int32, CPU
  struct DeviceBits {
    std::mutex mutex;
    std::map<int, at::Tensor> by_device;  // CUDA device index -> sign_bits_ there
  };
  std::shared_ptr<DeviceBits> device_bits_ = std::make_shared<DeviceBits>();
};

}  // namespace splitq::quant

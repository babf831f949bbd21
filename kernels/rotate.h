// splitq kernels: the randomized Hadamard rotation of a boundary tensor along its channels
// (issue 17, rotated boundaries): CPU (float32) and CUDA (float32, bfloat16, float16).
//
// The tensor is viewed as [outer, channels, inner] (common.h's GroupLayout, channels as the
// groups). Channels are taken in blocks of `block` (a power of two that divides the channel
// count; the caller pads otherwise). Within a block, with s_c = +-1 a random sign per channel
// and H the block x block Sylvester-Hadamard matrix (H[i][j] = (-1)^popcount(i & j)):
//
//   forward:  y = (1 / sqrt(block)) H diag(s) x      (R = H diag(s) / sqrt(block), orthonormal)
//   inverse:  x = diag(s) H y / sqrt(block)          (R^T: H is symmetric and H H = block I)
//
// so the rotation keeps norms and inner products, and a gradient taken in the rotated basis
// maps back with the inverse. The signs: s_c = -1 when bit 0 of SplitMix64(SplitMix64(seed) + c)
// is 1 (c: the channel's index in the whole tensor; the seed hashed first, so that seeds s and
// s + 1 do not give shifted copies of one sign sequence), so sender and receiver agree given the
// seed.
// The transform is the fast Walsh-Hadamard butterfly, log2(block) passes of block/2 pairs; for
// inner > 1 each butterfly runs over the inner elements of the two channels (contiguous).
// Both devices run the passes in the same order (h = 1, 2, 4, ...) with the same float
// operations (one add or subtract a pass, the factors applied as sign x 1/sqrt(block)), so a
// float32 rotation is bit for bit the same on the CPU and on CUDA; bfloat16 and float16 are
// computed in float32 and rounded to nearest even once, at the end.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kernels/common.h"

namespace splitq::kernels {

// +1 or -1: channel c's sign under `seed`.
float RotationSign(uint64_t seed, int64_t channel);

// y = R x (or R^T x with `inverse`), x and y float32 host arrays of layout.numel() elements;
// y may equal x (in place). INVALID_ARGUMENT: block not a power of two >= 1, or not dividing
// layout.groups, or null pointers with elements to write.
absl::Status RotateChannels(const GroupLayout& layout, int64_t block, uint64_t seed, bool inverse,
                            const float* x, float* y);

// The signs as bits, bit c of word c / 32 set where channel c's sign is -1: ceil(channels / 32)
// words, the table the CUDA path reads (copied to the device by the caller).
std::vector<uint32_t> RotationSignBits(uint64_t seed, int64_t channels);

// Whether RotateChannels below runs this case on ctx's device: the CPU takes float32; CUDA
// takes float32, bfloat16 and float16, any block (2..1024) when inner == 1 and blocks up to 64
// when inner > 1 (each thread keeps a block of one inner position in registers). False also
// for a CUDA request in a build without CUDA kernels. Callers fall back to a dense [block,
// block] product where it is false (quant/channel_rotation.h does).
bool RotateChannelsSupported(const ExecContext& ctx, DType dtype, const GroupLayout& layout,
                             int64_t block);

// The same rotation on ctx's device: x and y (may be equal) hold layout.numel() elements of
// `dtype` in ctx's memory. The CPU path uses `seed`; the CUDA path reads the signs from
// `sign_bits`, RotationSignBits(seed, layout.groups) in device memory, and runs on ctx.stream.
// Errors: those of the float32 form; UNIMPLEMENTED where RotateChannelsSupported is false
// (FAILED_PRECONDITION for CUDA in a build without it); INVALID_ARGUMENT for null sign_bits on
// CUDA; INTERNAL for a CUDA launch error.
absl::Status RotateChannels(const ExecContext& ctx, DType dtype, const GroupLayout& layout,
                            int64_t block, uint64_t seed, const uint32_t* sign_bits, bool inverse,
                            const void* x, void* y);

}  // namespace splitq::kernels

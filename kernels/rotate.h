// splitq kernels: the randomized Hadamard rotation of a boundary tensor along its channels
// (issue 17, rotated boundaries), CPU, float32.
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
#pragma once

#include <cstdint>

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

}  // namespace splitq::kernels

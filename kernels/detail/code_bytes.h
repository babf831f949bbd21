// splitq kernels (internal, host): one code per byte <-> a group's k-bit segment (pack.h's
// layout: code m at bits [m k, (m + 1) k), little-endian, padding bits zero). The CPU pack
// and unpack use them, and so does the entropy coder (quant/entropy_coding.cc), which codes
// byte codes.
#pragma once

#include <cstdint>

namespace splitq::kernels::detail {

// n codes of k (1..8) bits, one per byte -> ceil(n k / 8) bytes at dst.
void PackCodeBytes(const uint8_t* codes, int64_t n, int k, uint8_t* dst);

// Inverse of PackCodeBytes: the n codes of the segment at src, one per byte.
void UnpackCodeBytes(const uint8_t* src, int64_t n, int k, uint8_t* codes);

}  // namespace splitq::kernels::detail

// splitq quant: CRC-32C (Castagnoli), the checksum that ends every wire frame.
//
// Parameters (the "CRC-32C" / "CRC-32/ISCSI" of the CRC catalogue, as in iSCSI, SCTP,
// ext4 and Google's crc32c library):
//   polynomial 0x1EDC6F41, processed reflected (LSB first) as 0x82F63B78,
//   initial value 0xFFFFFFFF, final XOR 0xFFFFFFFF, input and output reflected.
//   Check value: Crc32c("123456789") == 0xE3069283; the CRC of no bytes is 0.
//
// On x86-64 CPUs with SSE4.2 (checked at run time) the crc32 instruction computes it
// (~4x the software path); elsewhere software slicing-by-8 (eight 256-entry tables, built
// at compile time, so there is no initialisation and no thread-safety concern), independent
// of the host's byte order. Both give the same values.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/types/span.h"

namespace splitq::quant {

// Extends `crc` (the CRC-32C of some bytes A, or 0 for none) with n more bytes B and returns
// the CRC-32C of A followed by B. So Crc32cExtend(Crc32cExtend(0, a, n), b, m) equals the
// CRC of the concatenation. `data` may be null when n == 0.
uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t n);

// The software path of Crc32cExtend, whatever the CPU (for tests and benchmarks).
uint32_t Crc32cExtendSoftware(uint32_t crc, const void* data, size_t n);

// CRC-32C of `data`.
inline uint32_t Crc32c(absl::Span<const uint8_t> data) {
  return Crc32cExtend(0, data.data(), data.size());
}

}  // namespace splitq::quant

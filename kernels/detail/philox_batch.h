// splitq kernels (internal, host only): Philox4x32-10 for eight consecutive blocks at once, the
// draws of 32 consecutive elements (kernels/philox.h gives the generator and its key and
// counter). Bit-identical to PhiloxBlock: the same function of (seed, step, block), computed
// eight lanes wide with AVX2 where the CPU has it (checked once at run time; the binary
// stays baseline x86-64), and one block after another otherwise.
#pragma once

#include <cstdint>

namespace splitq::kernels::detail {

// Blocks `first` .. `first` + 7 of `step` under `seed`, as uniforms in [0, 1) (PhiloxUniform):
// out[4 * i + j] is draw j of block first + i, i.e. element 4 * first + 4 * i + j.
void PhiloxUniforms32(uint64_t seed, uint64_t step, uint64_t first, float out[32]);

// Whether PhiloxUniforms32 takes the AVX2 path on this CPU.
bool PhiloxBatchUsesAvx2();

// The scalar path, always (for tests and benchmarks).
void PhiloxUniforms32Scalar(uint64_t seed, uint64_t step, uint64_t first, float out[32]);

}  // namespace splitq::kernels::detail

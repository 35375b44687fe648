// Internal: the k-bit view of a bit-plane linear as a dense fp32 matrix (docs/format.md).
//
// A reference op for tests and tools, not a decode path: the engine multiplies by the planes
// directly. Every backend's result must equal numpy's bitplane.dequantize_planes bit for bit.
#pragma once

#include <cstdint>
#include <cstring>

#include "flexquant/model_file.h"
#include "fp16.h"

namespace flexquant {

// W_k (n, k) of `w` at `bits` (BITS_MIN..w.max_bits, else flexquant::Error), reading only the
// first `bits` planes. out: (w.n, w.k) row-major fp32, written completely.
void dequantize_linear(const BitPlaneLinear& w, int bits, float* out /* (n, k) */);

}  // namespace flexquant

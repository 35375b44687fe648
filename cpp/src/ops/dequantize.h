// Internal: the k-bit view of a bit-plane linear as a dense fp32 matrix (docs/format.md).
//
// A reference op for tests and tools, not a decode path: the engine multiplies by the planes
// directly. Every backend's result must equal numpy's bitplane.dequantize_planes bit for bit.
#pragma once

#include <cstdint>
#include <cstring>

#include "flexquant/model_file.h"

namespace flexquant {

// W_k (n, k) of `w` at `bits` (BITS_MIN..w.max_bits, else flexquant::Error), reading only the
// first `bits` planes. out: (w.n, w.k) row-major fp32, written completely.
void dequantize_linear(const BitPlaneLinear& w, int bits, float* out /* (n, k) */);

// IEEE fp16 bits -> fp32. Exact (every fp16 value is a float) and portable: no F16C, no _Float16.
inline float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (mant << 13);  // inf, nan (payload kept)
    } else if (exp != 0) {
        bits = sign | ((exp + (127 - 15)) << 23) | (mant << 13);
    } else {
        // zero or subnormal: mant * 2^-24, exact in fp32 (a product with a power of two)
        const float f = float(mant) * 5.9604644775390625e-8f;
        std::memcpy(&bits, &f, sizeof bits);
        bits |= sign;
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

}  // namespace flexquant

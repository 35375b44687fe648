// IEEE binary16 <-> fp32 conversions shared by every CPU op (qparams, embeddings, the fp16 KV
// cache). Portable: no F16C, no _Float16.
#pragma once

#include <cstdint>
#include <cstring>

namespace flexquant {

// ---- fp16 <-> fp32 (IEEE binary16; used for qparams and the fp16 KV cache) ---------------------

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

// Round to nearest even; overflow gives inf, nan stays nan.
inline uint16_t fp32_to_fp16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u);
    if (ax >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: inf
    if (ax < 0x38800000u) {                        // below the smallest normal fp16 (2^-14)
        if (ax < 0x33000000u) return sign;         // below half the smallest subnormal
        const uint32_t e = ax >> 23, mant = (ax & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - e;  // value = mant * 2^(e-150); fp16 subnormal unit is 2^-24
        uint32_t r = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) ++r;
        return sign | static_cast<uint16_t>(r);
    }
    uint32_t r = ((ax >> 13) - (112u << 10));
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1))) ++r;
    return sign | static_cast<uint16_t>(r);
}

}  // namespace flexquant

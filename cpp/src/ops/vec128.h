// The 16-byte vector types and helpers of the kernels for CPUs without AVX2 (cpu_features().vec128:
// bitplane_matmul_vec128.cpp, attention.cpp's 128-bit paths, sampling.cpp's exp4), in GCC/Clang
// vector extensions: one source that the compiler turns into NEON on AArch64 and SSE2 on x86-64.
// FQ_VEC128 is defined where it does (the condition under which detect_cpu_features sets vec128);
// elsewhere the types still compile (GCC and Clang lower them to scalar code), for the files built on
// every target.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__SSE2__) || (defined(__aarch64__) && defined(__ARM_NEON))
#define FQ_VEC128 1
// the kernels read a (scale, min) pair of fp16 as one 32-bit lane, scale in its low half
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the 128-bit kernels assume a little-endian target");
#endif

#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#define FQ_V128_INLINE inline __attribute__((always_inline))

namespace flexquant {
namespace vec128 {

typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef int16_t i16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef float f32x4 __attribute__((vector_size(16)));

// Vector registers the tiles can count on: 32 on AArch64, 16 on x86-64 (SSE2; an i386 build has 8 and
// spills).
#if defined(__aarch64__)
constexpr int kRegisters = 32;
#else
constexpr int kRegisters = 16;
#endif

// 16 bytes at p, any alignment.
template <typename V>
FQ_V128_INLINE V load16(const void* p) {
    V v;
    std::memcpy(&v, p, 16);
    return v;
}
FQ_V128_INLINE void store16(void* p, f32x4 v) {
    std::memcpy(p, &v, 16);
}

// mask ? a : b per lane (mask lanes all ones or all zeros, as vector comparisons give them).
FQ_V128_INLINE f32x4 select(i32x4 mask, f32x4 a, f32x4 b) {
    return reinterpret_cast<f32x4>((mask & reinterpret_cast<i32x4>(a)) | (~mask & reinterpret_cast<i32x4>(b)));
}

// IEEE fp16 bits (the low 16 of each lane) -> fp32, exactly as fp16_to_fp32 (fp16.h). AArch64: fcvtl
// (which returns a signalling NaN quieted; still a NaN).
// SSE2 has no conversion: integer ops and one subtraction of normal numbers, so that no fp32 subnormal
// is ever an operand (a DAZ mode would read it as 0, and older cores take a slow assist on one):
// exponent and mantissa moved to fp32's places, the exponent rebiased by 112; a subnormal (exponent 0,
// value mant · 2^-24) as (2^-14 + mant · 2^-24) - 2^-14, the first term built the same way with
// exponent 113 (exact: the difference of two nearby floats); inf and NaN (exponent 31) get fp32's
// all-ones exponent with their mantissa kept; then the sign.
FQ_V128_INLINE f32x4 fp16_to_f32x4(u32x4 h) {
#if defined(__aarch64__) && defined(__ARM_NEON)
    return reinterpret_cast<f32x4>(vcvt_f32_f16(vreinterpret_f16_u16(vmovn_u32(reinterpret_cast<uint32x4_t>(h)))));
#else
    const u32x4 em = (h & 0x7fffu) << 13;
    const u32x4 normal = em + (112u << 23);
    const u32x4 sub = reinterpret_cast<u32x4>(reinterpret_cast<f32x4>(em + (113u << 23)) - 0x1p-14f);
    const u32x4 ex = h & 0x7c00u;
    const u32x4 special = reinterpret_cast<u32x4>(ex == 0x7c00u);  // all ones where inf / NaN
    const u32x4 zero_exp = reinterpret_cast<u32x4>(ex == 0u);
    const u32x4 bits = (special & (em | 0x7f800000u)) | (zero_exp & sub) | (~(special | zero_exp) & normal);
    return reinterpret_cast<f32x4>(bits | ((h & 0x8000u) << 16));
#endif
}

// 4 consecutive fp16 values at p as fp32.
FQ_V128_INLINE f32x4 load_f16x4(const uint16_t* p) {
#if defined(__aarch64__) && defined(__ARM_NEON)
    return reinterpret_cast<f32x4>(vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))));
#else
    return fp16_to_f32x4(u32x4{p[0], p[1], p[2], p[3]});
#endif
}

}  // namespace vec128
}  // namespace flexquant

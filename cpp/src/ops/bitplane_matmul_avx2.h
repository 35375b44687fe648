// Small AVX2 helpers shared by bitplane_matmul's AVX2 kernel files (bitplane_matmul_avx2.cpp,
// bitplane_matmul_avx2_i16.cpp). Include it inside their `#pragma GCC target("avx2,fma,f16c")`
// region, after FQ_INLINE is defined: the functions take the target of the place they are defined
// in, and are inlined into the GFNI kernels too (compiled for a superset of that target).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace flexquant {
namespace bitplane_detail {
namespace {

FQ_INLINE uint32_t load_u32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// 0xff in byte i where bit i of the 32-bit word at p is set (one plane of a stored word).
FQ_INLINE __m256i expand_plane(const uint8_t* p) {
    const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                                          3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(load_u32(p))), shuf);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

// The 32 k-bit codes c_k of a stored word, byte i = weight i, its planes at p, p + pb, ...: per
// plane the byte masks, then c = 2c - mask (Horner, MSB first), 5 ALU ops per plane.
template <int BITS>
FQ_INLINE __m256i word_codes(const uint8_t* p, uint64_t pb) {
    __m256i c = _mm256_sub_epi8(_mm256_setzero_si256(), expand_plane(p));
    for (int i = 1; i < BITS; ++i) c = _mm256_sub_epi8(_mm256_add_epi8(c, c), expand_plane(p + i * pb));
    return c;
}

// The 8 lanes' sum.
FQ_INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// [a x4 | b x4]: a factor per 128-bit lane (the two words or rows that share a register).
FQ_INLINE __m256 lane_pair(float a, float b) {
    return _mm256_setr_m128(_mm_set1_ps(a), _mm_set1_ps(b));
}

}  // namespace
}  // namespace bitplane_detail
}  // namespace flexquant

// exp8: eight fp32 exponentials on AVX2 + FMA, shared by the ops that need many (sampling.cpp's
// softmaxes over the vocab and the attention scores, swiglu.cpp). Include only on x86
// (FLEXQUANT_X86); it compiles its function for AVX2 + FMA itself, and callers must be compiled
// for at least that (their own target pragma) and run only where cpu_features().avx2 says so.
#pragma once

#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace flexquant {
namespace ops_detail {

// exp(l) for l <= 88: Cephes' expf. n = round(l / ln 2), r = l - n ln 2 (ln 2 split in two so r is
// exact), exp(r) by a degree-5 polynomial on |r| <= ln2/2, times 2^n built in the exponent field.
// Max relative error ~1.5e-7. l < -87.3 (and NaN) give 0: below the normal range, and p = 0 is
// what a -inf or NaN logit should get.
inline __m256 exp8(__m256 l) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    const __m256 keep = _mm256_cmp_ps(l, lo, _CMP_GE_OQ);  // false for NaN
    const __m256 x = _mm256_max_ps(_mm256_min_ps(l, _mm256_set1_ps(88.3f)), lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

}  // namespace ops_detail
}  // namespace flexquant

#pragma GCC pop_options

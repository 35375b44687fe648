// out = silu(gate) * up,   silu(g) = g / (1 + exp(-g))            gate, up, out (n)
//
// A prompt runs this over (tokens, ffn) elements per layer; with libm's expf one at a time it cost
// about as much as the gate projection's int16 GEMM, so on AVX2 eight go at once (exp8: within
// ~1.5e-7 of expf, well inside fp32's own rounding of the product).

#include <cmath>
#include <stdexcept>

#include "cpu_features.h"
#include "ops/ops.h"

#ifdef FLEXQUANT_X86
#include "ops/exp_avx2.h"
#endif

namespace flexquant {

namespace {

#ifdef FLEXQUANT_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")

// silu(g) * u for 8 lanes. exp8's argument is -|g| <= 0, so it never saturates (exp(-g) of a
// large negative g would, where expf's inf gives the limit -0): g >= 0: g / (1 + e), as the scalar
// formula; g < 0: g · e / (1 + e), the same value with e = exp(g) in range (-inf: -inf · 0 = NaN,
// as -inf / inf; NaN: exp8 gives 0 and g keeps it).
inline __m256 silu_mul8(__m256 g, __m256 u) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 abs_g = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), g);
    const __m256 e = ops_detail::exp8(_mm256_sub_ps(_mm256_setzero_ps(), abs_g));
    const __m256 neg = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
    const __m256 num = _mm256_blendv_ps(g, _mm256_mul_ps(g, e), neg);
    return _mm256_mul_ps(_mm256_div_ps(num, _mm256_add_ps(one, e)), u);
}

void swiglu_avx2(const float* gate, const float* up, int64_t n, float* out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, silu_mul8(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
    if (i < n) {
        // the tail through the same lanes: an element's value must not depend on where a call's
        // range starts (the engine splits a prompt's rows among threads)
        alignas(32) float g[8] = {}, u[8] = {}, o[8];
        for (int64_t t = i; t < n; ++t) {
            g[t - i] = gate[t];
            u[t - i] = up[t];
        }
        _mm256_store_ps(o, silu_mul8(_mm256_load_ps(g), _mm256_load_ps(u)));
        for (int64_t t = i; t < n; ++t) out[t] = o[t - i];
    }
}
#pragma GCC pop_options
#endif

}  // namespace

void swiglu(const float* gate, const float* up, int64_t n, float* out) {
    if (n < 0) throw std::invalid_argument("swiglu: n must be >= 0");
#ifdef FLEXQUANT_X86
    if (cpu_features().avx2) return swiglu_avx2(gate, up, n, out);
#endif
    for (int64_t i = 0; i < n; ++i) {
        const float g = gate[i];
        // exp(-g) overflows to inf for g < -88: g / inf = -0, the correct limit.
        out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
}

}  // namespace flexquant

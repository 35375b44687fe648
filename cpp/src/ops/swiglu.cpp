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
// Returns how many leading elements it did (a multiple of 8); the caller does the rest.
int64_t swiglu_avx2(const float* gate, const float* up, int64_t n, float* out) {
    const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        // exp8 gives 0 for -g < -87.3 (g / 1 = g, the limit) and saturates at exp(88.3) for -g
        // above it (g / 2e38: a tiny negative, for g < -88 where expf's inf would give -0). NaN:
        // exp8 gives 0 and g / 1 keeps it.
        const __m256 e = ops_detail::exp8(_mm256_xor_ps(g, neg));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
    return i;
}
#pragma GCC pop_options
#endif

}  // namespace

void swiglu(const float* gate, const float* up, int64_t n, float* out) {
    if (n < 0) throw std::invalid_argument("swiglu: n must be >= 0");
    int64_t i = 0;
#ifdef FLEXQUANT_X86
    if (cpu_features().avx2) i = swiglu_avx2(gate, up, n, out);
#endif
    for (; i < n; ++i) {
        const float g = gate[i];
        // exp(-g) overflows to inf for g < -88: g / inf = -0, the correct limit.
        out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
}

}  // namespace flexquant

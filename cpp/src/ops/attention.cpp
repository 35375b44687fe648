// Causal grouped-query attention of m new tokens at positions p0 .. p0+m-1 over a KV cache:
//   s_t      = q[i, h] · K[t, h / (H / Hkv)] / sqrt(d)               t = 0 .. p0 + i
//   out[i,h] = Σ_t softmax(s)_t · V[t, h / (H / Hkv)]
// q (m, H, d); K, V cache (t_max, Hkv, d) fp32 or fp16; out (m, H, d). fp32 math; the softmax
// subtracts the max.
//
// One task = one token, one KV head (all H / Hkv query heads of its group, so each K and V row is
// read once for the group, not once per head) and one span of positions. At decode (m = 1) there
// are only Hkv (token, KV head) pairs, too few to share among threads, so the positions are cut
// into spans of kSpan (whenever m * Hkv < 16, whatever the thread count, so that the result does
// not depend on it) and each task keeps its partial softmax (max, Σ exp, Σ exp · V); a second
// pass merges the spans (as flash-decoding does):
//   M = max_c mx_c,   out = Σ_c e^(mx_c - M) o_c / Σ_c e^(mx_c - M) sum_c.
// Otherwise (prefill) every task takes all positions.
//
// The dot products and the V accumulation are AVX2 (F16C for the fp16 cache) where available,
// portable loops otherwise; the exponentials use the shared vectorized exp (sampling.cpp).

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "ops/ops.h"
#include "thread_pool.h"

#ifdef FLEXQUANT_X86
#include <immintrin.h>
#endif

namespace flexquant {

namespace {

// Positions per task when one token's positions are split (decode): enough work per task to
// amortize it, small enough that 2K positions give 8 tasks per KV head.
constexpr int64_t kSpan = 256;

struct AttnArgs {
    const float* q;
    const void* k_cache;
    const void* v_cache;
    int64_t m, p0, n_heads, n_kv_heads, head_dim;
    float* out;
};

struct Task {
    int64_t i, hk, t0, t1;  // token, KV head, positions [t0, t1)
};

// ---- row primitives: dot(q, K row), acc += p * V row, in a portable and an AVX2 version -------------

inline float to_f32(float v) {
    return v;
}
inline float to_f32(uint16_t v) {
    return fp16_to_fp32(v);
}

template <typename KV>
struct RowsPortable {
    static float dot(const float* q, const KV* k, int64_t d) {
        float acc = 0.0f;
        for (int64_t e = 0; e < d; ++e) acc += q[e] * to_f32(k[e]);
        return acc;
    }
    static void axpy(float p, const KV* v, float* acc, int64_t d) {
        for (int64_t e = 0; e < d; ++e) acc[e] += p * to_f32(v[e]);
    }
};

#ifdef FLEXQUANT_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

inline __m256 load8(const float* p) {
    return _mm256_loadu_ps(p);
}
inline __m256 load8(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// head_dim a multiple of 8 (checked by the caller).
template <typename KV>
struct RowsAvx2 {
    static float dot(const float* q, const KV* k, int64_t d) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int64_t e = 0;
        for (; e + 16 <= d; e += 16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + e), load8(k + e), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + e + 8), load8(k + e + 8), a1);
        }
        if (e < d) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + e), load8(k + e), a0);
        const __m256 v = _mm256_add_ps(a0, a1);
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }
    static void axpy(float p, const KV* v, float* acc, int64_t d) {
        const __m256 pv = _mm256_set1_ps(p);
        for (int64_t e = 0; e < d; e += 8)
            _mm256_storeu_ps(acc + e, _mm256_fmadd_ps(pv, load8(v + e), _mm256_loadu_ps(acc + e)));
    }
};

#pragma GCC pop_options
#endif  // FLEXQUANT_X86

// One task: for each query head g of the group, over positions [t0, t1): mx[g] = max score,
// sum[g] = Σ exp(s - mx), o[g] (d) = Σ exp(s - mx) V[t]. scores: scratch of G * (t1 - t0).
template <typename KV, typename Rows>
void attend_span(const AttnArgs& a, const Task& tk, float* mx, float* sum, float* o, std::vector<float>& scores) {
    const int64_t G = a.n_heads / a.n_kv_heads, d = a.head_dim, n = tk.t1 - tk.t0;
    const int64_t stride = a.n_kv_heads * d;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    const float* q = a.q + (tk.i * a.n_heads + tk.hk * G) * d;  // the group's G heads, contiguous
    const KV* K = static_cast<const KV*>(a.k_cache) + tk.t0 * stride + tk.hk * d;
    const KV* V = static_cast<const KV*>(a.v_cache) + tk.t0 * stride + tk.hk * d;
    scores.resize(G * n);
    for (int64_t t = 0; t < n; ++t)
        for (int64_t g = 0; g < G; ++g) scores[g * n + t] = Rows::dot(q + g * d, K + t * stride, d) * scale;
    for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * n;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < n; ++t) m = std::max(m, s[t]);
        mx[g] = m;
        sum[g] = static_cast<float>(ops_detail::exp_scaled(s, n, 1.0f, m, s));
        float* og = o + g * d;
        std::fill(og, og + d, 0.0f);
        for (int64_t t = 0; t < n; ++t) Rows::axpy(s[t], V + t * stride, og, d);
    }
}

template <typename KV, typename Rows>
void run_tasks(const AttnArgs& a, const std::vector<Task>& tasks, float* partial, int64_t b, int64_t e) {
    thread_local std::vector<float> scores;
    const int64_t G = a.n_heads / a.n_kv_heads, d = a.head_dim;
    for (int64_t k = b; k < e; ++k) {
        float* p = partial + k * G * (d + 2);  // per task: mx (G), sum (G), o (G, d)
        attend_span<KV, Rows>(a, tasks[k], p, p + G, p + 2 * G, scores);
    }
}

template <typename KV>
void attention_impl(const AttnArgs& a, ThreadPool* pool) {
    if (a.m < 0 || a.p0 < 0 || a.head_dim <= 0 || a.n_kv_heads <= 0 || a.n_heads % a.n_kv_heads)
        throw std::invalid_argument(
            "attention: need m, p0 >= 0, head_dim > 0 and n_heads a multiple of n_kv_heads, got n_heads=" +
            std::to_string(a.n_heads) + ", n_kv_heads=" + std::to_string(a.n_kv_heads));
    if (a.m == 0) return;
    const int64_t G = a.n_heads / a.n_kv_heads, d = a.head_dim;
    // Split the positions only when the (token, KV head) pairs are too few to share among threads.
    // A fixed rule, not one on the thread count, so that the result does not depend on it.
    const int64_t span = a.m * a.n_kv_heads >= 16 ? std::numeric_limits<int64_t>::max() : kSpan;
    std::vector<Task> tasks;
    std::vector<int64_t> first(a.m * a.n_kv_heads + 1);  // tasks of (i, hk): [first[.], first[. + 1])
    for (int64_t i = 0; i < a.m; ++i) {
        const int64_t T = a.p0 + i + 1;
        for (int64_t hk = 0; hk < a.n_kv_heads; ++hk) {
            first[i * a.n_kv_heads + hk] = static_cast<int64_t>(tasks.size());
            for (int64_t t0 = 0; t0 < T; t0 += std::min(span, T - t0))
                tasks.push_back({i, hk, t0, t0 + std::min(span, T - t0)});
        }
    }
    first.back() = static_cast<int64_t>(tasks.size());
    std::vector<float> partial(tasks.size() * G * (d + 2));

    [[maybe_unused]] const bool simd = cpu_features().avx2 && d % 8 == 0;
    auto body = [&](int64_t b, int64_t e) {
#ifdef FLEXQUANT_X86
        if (simd) return run_tasks<KV, RowsAvx2<KV>>(a, tasks, partial.data(), b, e);
#endif
        run_tasks<KV, RowsPortable<KV>>(a, tasks, partial.data(), b, e);
    };
    const int64_t n_tasks = static_cast<int64_t>(tasks.size());
    // Later tokens attend to more positions: small chunks keep the threads even.
    const int64_t grain = std::max<int64_t>(1, n_tasks / ((pool ? pool->num_threads() : 1) * 8));
    if (pool)
        pool->parallel_for(n_tasks, grain, body);
    else
        body(0, n_tasks);

    // Merge the spans of each (token, head).
    for (int64_t i = 0; i < a.m; ++i) {
        for (int64_t h = 0; h < a.n_heads; ++h) {
            const int64_t hk = h / G, g = h % G;
            const int64_t c0 = first[i * a.n_kv_heads + hk], c1 = first[i * a.n_kv_heads + hk + 1];
            float M = -std::numeric_limits<float>::infinity();
            for (int64_t c = c0; c < c1; ++c) M = std::max(M, partial[c * G * (d + 2) + g]);
            float* out = a.out + (i * a.n_heads + h) * d;
            std::fill(out, out + d, 0.0f);
            float l = 0.0f;
            for (int64_t c = c0; c < c1; ++c) {
                const float* p = partial.data() + c * G * (d + 2);
                const float w = c1 - c0 == 1 ? 1.0f : std::exp(p[g] - M);
                l += w * p[G + g];
                const float* o = p + 2 * G + g * d;
                for (int64_t e = 0; e < d; ++e) out[e] += w * o[e];
            }
            const float inv = 1.0f / l;
            for (int64_t e = 0; e < d; ++e) out[e] *= inv;
        }
    }
}

}  // namespace

void attention(const float* q, const float* k_cache, const float* v_cache, int64_t m, int64_t p0, int64_t n_heads,
               int64_t n_kv_heads, int64_t head_dim, float* out, ThreadPool* pool) {
    attention_impl<float>({q, k_cache, v_cache, m, p0, n_heads, n_kv_heads, head_dim, out}, pool);
}

void attention_f16(const float* q, const uint16_t* k_cache, const uint16_t* v_cache, int64_t m, int64_t p0,
                   int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float* out, ThreadPool* pool) {
    attention_impl<uint16_t>({q, k_cache, v_cache, m, p0, n_heads, n_kv_heads, head_dim, out}, pool);
}

}  // namespace flexquant

// Softmax, argmax, entropy and a seeded sampler over a logit vector (vocab).
//   softmax(l)_i = exp(l_i - max l) / Z,   Z = Σ_j exp(l_j - max l)
//   entropy      = -Σ_i p_i ln p_i = ln Z - Σ_i p_i (l_i - max l)
//   top-1 prob   = 1 / Z
// The exponentials are fp32 (vectorized on AVX2 and on 128-bit vectors, within 2 ulp of expf); the
// sums over the vocab are fp64, as a 50k-entry vocab summed in fp32 loses ~4 digits. These run once
// per token over the whole vocab, so they are written for speed: ~30 us for 49k logits instead of
// ~0.5 ms.
//
// The sampler applies transformers' logits processors in generate()'s order (repetition penalty,
// temperature, top-k, top-p, min-p) with their semantics, then draws one token from the
// renormalized distribution with its own std::mt19937_64, so a seed reproduces a run exactly.
// NaN logits count as -inf.

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "cpu_features.h"
#include "ops/ops.h"
#include "ops/vec128.h"

#ifdef FLEXQUANT_X86
#include <immintrin.h>

#include "ops/exp_avx2.h"
#endif

namespace flexquant {

namespace {

void check_n(int64_t n, const char* op) {
    if (n <= 0) throw std::invalid_argument(std::string(op) + ": the vector must not be empty");
}

// Largest element, NaN ignored (-inf if all are NaN). 8 running maxima: one chain of maxss would
// cost its latency per element.
float max_of(const float* x, int64_t n) {
    float m[8];
    for (float& v : m) v = -std::numeric_limits<float>::infinity();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int e = 0; e < 8; ++e) m[e] = x[i + e] > m[e] ? x[i + e] : m[e];  // false for NaN
    for (; i < n; ++i) m[0] = x[i] > m[0] ? x[i] : m[0];
    for (int e = 1; e < 8; ++e) m[0] = m[e] > m[0] ? m[e] : m[0];
    return m[0];
}

// out[i] = exp(x[i] * scale - shift) for n entries (x[i] * scale - shift <= 0 expected; NaN -> 0);
// returns Σ out (fp64) and, if xsum, sets *xsum = Σ out[i] * (x[i] * scale - shift) (fp64).
double exp_portable(const float* x, int64_t n, float scale, float shift, float* out, double* xsum) {
    double s = 0.0, sl = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const float l = x[i] * scale - shift;
        const float e = l == l ? std::exp(l) : 0.0f;
        out[i] = e;
        s += e;
        if (e > 0.0f) sl += static_cast<double>(e) * l;
    }
    if (xsum) *xsum = sl;
    return s;
}

#ifdef FLEXQUANT_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")

inline __m256d widen_add(__m256d acc, __m256 v) {
    return _mm256_add_pd(_mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(v))),
                         _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

double exp_avx2(const float* x, int64_t n, float scale, float shift, float* out, double* xsum) {
    const __m256 vs = _mm256_set1_ps(scale), vh = _mm256_set1_ps(shift);
    __m256d s = _mm256_setzero_pd(), sl = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 l = _mm256_fmsub_ps(_mm256_loadu_ps(x + i), vs, vh);
        const __m256 e = ops_detail::exp8(l);
        _mm256_storeu_ps(out + i, e);
        s = widen_add(s, e);
        // e * l with e = 0 where l is -inf or NaN: blend the product to 0 there (0 * inf is NaN).
        if (xsum)
            sl = widen_add(sl, _mm256_and_ps(_mm256_mul_ps(e, l), _mm256_cmp_ps(e, _mm256_setzero_ps(), _CMP_GT_OQ)));
    }
    double t[4], tl[4];
    _mm256_storeu_pd(t, s);
    _mm256_storeu_pd(tl, sl);
    double tail_l = 0.0;
    const double tail = exp_portable(x + i, n - i, scale, shift, out + i, &tail_l);
    if (xsum) *xsum = ((tl[0] + tl[1]) + (tl[2] + tl[3])) + tail_l;
    return ((t[0] + t[1]) + (t[2] + t[3])) + tail;
}

#pragma GCC pop_options
#endif  // FLEXQUANT_X86

// ---- 128-bit vectors (cpu_features().vec128 without AVX2: NEON on AArch64, SSE2 on x86-64) ----------
#ifdef FQ_VEC128
using vec128::f32x4;
using vec128::i32x4;

// exp8 (exp_avx2.h) on 4 lanes, the same Cephes expf: n = round(l / ln 2) to nearest even by adding
// and subtracting 1.5 · 2^23 (exact for |l / ln 2| < 2^22; l is clamped to [-87.3, 88.3] first), r =
// l - n ln 2 in two steps, a degree-5 polynomial, times 2^n built in the exponent field. The
// multiply-adds are fused on AArch64 (the compiler contracts them), separate on SSE2, so the last bit
// can differ from exp8's. l < -87.3 and NaN give 0.
inline f32x4 exp4(f32x4 l) {
    const f32x4 lo = f32x4{} - 87.3f, hi = f32x4{} + 88.3f;
    const i32x4 keep = l >= lo;  // false for NaN
    f32x4 x = vec128::select(keep, l, lo);
    x = vec128::select(x > hi, hi, x);
    const f32x4 magic = f32x4{} + 12582912.0f;  // 1.5 · 2^23
    const f32x4 n = (x * 1.44269504088896341f + magic) - magic;
    f32x4 r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    f32x4 p = f32x4{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + (r + 1.0f);
    const i32x4 e = (__builtin_convertvector(n, i32x4) + 127) << 23;
    return reinterpret_cast<f32x4>(reinterpret_cast<i32x4>(p * reinterpret_cast<f32x4>(e)) & keep);
}

// exp_avx2 on 4 lanes: the fp64 sums per lane, added in the same order at the end.
double exp_vec128(const float* x, int64_t n, float scale, float shift, float* out, double* xsum) {
    double s[4] = {0.0, 0.0, 0.0, 0.0}, sl[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const f32x4 l = vec128::load16<f32x4>(x + i) * scale - shift;
        const f32x4 e = exp4(l);
        vec128::store16(out + i, e);
        for (int k = 0; k < 4; ++k) s[k] += e[k];
        if (xsum)  // e · l where e > 0 (0 · -inf would be NaN)
            for (int k = 0; k < 4; ++k) sl[k] += e[k] > 0.0f ? static_cast<double>(e[k]) * l[k] : 0.0;
    }
    double tail_l = 0.0;
    const double tail = exp_portable(x + i, n - i, scale, shift, out + i, &tail_l);
    if (xsum) *xsum = ((sl[0] + sl[1]) + (sl[2] + sl[3])) + tail_l;
    return ((s[0] + s[1]) + (s[2] + s[3])) + tail;
}
#endif

double exp_scaled_sum(const float* x, int64_t n, float scale, float shift, float* out, double* xsum = nullptr) {
#ifdef FLEXQUANT_X86
    if (cpu_features().avx2) return exp_avx2(x, n, scale, shift, out, xsum);
#endif
#ifdef FQ_VEC128
    if (cpu_features().vec128) return exp_vec128(x, n, scale, shift, out, xsum);
#endif
    return exp_portable(x, n, scale, shift, out, xsum);
}

}  // namespace

double ops_detail::exp_scaled(const float* x, int64_t n, float scale, float shift, float* out) {
    return exp_scaled_sum(x, n, scale, shift, out);
}

void softmax_(float* x, int64_t n) {
    check_n(n, "softmax_");
    const double sum = exp_scaled_sum(x, n, 1.0f, max_of(x, n), x);
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

int64_t argmax(const float* x, int64_t n) {
    check_n(n, "argmax");
    const float mx = max_of(x, n);
    for (int64_t i = 0; i < n; ++i)
        if (x[i] == mx) return i;
    return 0;  // all NaN
}

void entropy_and_top1(const float* logits, int64_t vocab, float* entropy, float* top1_prob) {
    check_n(vocab, "entropy_and_top1");
    thread_local std::vector<float> e;
    e.resize(vocab);
    double zl = 0.0;  // Σ e_i (l_i - max)
    const double z = exp_scaled_sum(logits, vocab, 1.0f, max_of(logits, vocab), e.data(), &zl);
    *entropy = static_cast<float>(std::log(z) - zl / z);
    *top1_prob = static_cast<float>(1.0 / z);
}

int64_t Sampler::sample(const float* logits, int64_t vocab, const SamplerParams& p, const int32_t* recent,
                        int64_t n_recent) {
    check_n(vocab, "Sampler::sample");
    const float* w = logits;
    if (p.repetition_penalty != 1.0f && recent && n_recent > 0) {
        // RepetitionPenaltyLogitsProcessor: once per distinct id, from the original logit, so repeats in
        // the history do not compound.
        work_.assign(logits, logits + vocab);
        for (int64_t r = 0; r < n_recent; ++r) {
            const int32_t id = recent[r];
            if (id < 0 || id >= vocab) continue;
            const float l = logits[id];
            work_[id] = l < 0.0f ? l * p.repetition_penalty : l / p.repetition_penalty;
        }
        w = work_.data();
    }
    if (!(p.temperature > 0.0f)) return argmax(w, vocab);

    // e_i = exp(l_i / T - max / T): unnormalized probabilities, the most likely token at 1.
    const float inv_t = 1.0f / p.temperature;
    const float mx = max_of(w, vocab);
    if (!std::isfinite(mx)) return argmax(w, vocab);  // all -inf / NaN, or +inf: nothing to weigh
    probs_.resize(vocab);
    float* e = probs_.data();
    double z = exp_scaled_sum(w, vocab, inv_t, mx * inv_t, e);

    // The candidates, as ids; `all` while no filter has cut the vocabulary.
    bool all = true;
    ids_.clear();
    auto more_likely = [e](int32_t a, int32_t b) { return e[a] > e[b] || (e[a] == e[b] && a < b); };
    if (p.top_k > 0 && p.top_k < vocab) {
        // Top-k by a bounded min-heap: most tokens fail the first comparison with the heap's smallest.
        const int64_t k = p.top_k;
        for (int32_t i = 0; i < vocab; ++i) {
            if (static_cast<int64_t>(ids_.size()) < k) {
                ids_.push_back(i);
                std::push_heap(ids_.begin(), ids_.end(), more_likely);
            } else if (more_likely(i, ids_.front())) {
                std::pop_heap(ids_.begin(), ids_.end(), more_likely);
                ids_.back() = i;
                std::push_heap(ids_.begin(), ids_.end(), more_likely);
            }
        }
        all = false;
        z = 0.0;
        for (int32_t id : ids_) z += e[id];
    }
    if (p.top_p < 1.0f) {
        // TopPLogitsWarper: keep the smallest most-likely-first prefix whose mass reaches top_p (a token
        // goes when the tokens strictly more likely already hold top_p). The nucleus is usually a small
        // part of the vocabulary: first cut to the tokens above a threshold whose mass already reaches
        // top_p (the nucleus is inside them), then sort only those.
        const double target = static_cast<double>(p.top_p) * z;
        if (all) {
            for (float floor_e : {1e-2f, 1e-4f, 1e-8f, 0.0f}) {
                double mass = 0.0;
                for (int64_t i = 0; i < vocab; ++i) mass += e[i] >= floor_e ? e[i] : 0.0f;
                if (mass >= target || floor_e == 0.0f) {
                    for (int32_t i = 0; i < vocab; ++i)
                        if (e[i] >= floor_e && (e[i] > 0.0f || floor_e == 0.0f)) ids_.push_back(i);
                    break;
                }
            }
            all = false;
        }
        std::sort(ids_.begin(), ids_.end(), more_likely);
        double mass = 0.0;
        size_t keep = 0;
        while (keep < ids_.size() && (keep == 0 || mass < target)) mass += e[ids_[keep++]];
        ids_.resize(keep);
    }
    if (p.min_p > 0.0f) {
        // MinPLogitsWarper: drop tokens less likely than min_p times the most likely one (e = 1). The
        // ratio does not change when top-k / top-p renormalize.
        if (all) {
            for (int32_t i = 0; i < vocab; ++i)
                if (e[i] >= p.min_p) ids_.push_back(i);
            all = false;
        } else {
            ids_.erase(std::remove_if(ids_.begin(), ids_.end(), [&](int32_t id) { return e[id] < p.min_p; }),
                       ids_.end());
        }
        if (ids_.empty()) return argmax(w, vocab);  // min_p > 1: only the top token is left
    }
    if (!all) {
        z = 0.0;
        for (int32_t id : ids_) z += e[id];
    }
    // 53 random bits -> u in [0, 1): the same on every platform, unlike std::uniform_real_distribution.
    const double u = static_cast<double>(rng_() >> 11) * (1.0 / 9007199254740992.0) * z;
    double c = 0.0;
    if (all) {
        int64_t last = 0;
        for (int64_t i = 0; i < vocab; ++i) {
            if (e[i] <= 0.0f) continue;
            c += e[i];
            last = i;
            if (u < c) return i;
        }
        return last;
    }
    for (int32_t id : ids_) {
        c += e[id];
        if (u < c) return id;
    }
    return ids_.back();
}

}  // namespace flexquant

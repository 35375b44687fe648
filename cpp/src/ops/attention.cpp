// Causal grouped-query attention of m new tokens at positions p0 .. p0+m-1 over a KV cache:
//   s_t      = q[i, h] · K[t, h / (H / Hkv)] / sqrt(d)               t = 0 .. p0 + i
//   out[i,h] = Σ_t softmax(s)_t · V[t, h / (H / Hkv)]
// q (m, H, d); K, V cache: rows K[t, hk] (d) at k_cache + hk·kv.head + t·kv.row, fp32, fp16 or q8
// (KvStrides, ops.h: the engine's cache is head-major, each KV head's rows one stream); out (m, H, d).
// fp32 math (on a q8 cache the AVX2 decode path multiplies int16-rounded queries with the codes);
// the softmax subtracts the max.
//
// One task = one token, one KV head (all H / Hkv query heads of its group, so that the AVX2 kernels
// read each K and V row from memory once for the group, not once per head) and one span of
// positions. At decode (m = 1) there
// are only Hkv (token, KV head) pairs, too few to share among threads, so the positions are cut
// into spans of kSpan (whenever m * Hkv < 16, whatever the thread count, so that the result does
// not depend on it) and each task keeps its partial softmax (max, Σ exp, Σ exp · V); a second
// pass merges the spans (as flash-decoding does):
//   M = max_c mx_c,   out = Σ_c e^(mx_c - M) o_c / Σ_c e^(mx_c - M) sum_c.
// Otherwise every task takes all positions. A prompt (m >= kPromptRows, on AVX2 or 128-bit vectors)
// goes another way:
// a task is a block of tokens x one KV head, multiplied with blocks of 64 keys as a small GEMM
// (attend_block below), so that each K and V row is widened to fp32 once for ~64 query vectors
// instead of once per head and token. Its results round differently from the per-token path (other
// summation orders), within fp32's rounding of the same formula.
//
// The dot products and the V accumulation are AVX2 (F16C for the fp16 cache) where available (the
// prompt path's score and output tiles on AVX-512 where the CPU has it: the same bits, twice the
// multiply-adds per instruction), 128-bit vectors without AVX2 (NEON, SSE2; head_dim a multiple of
// 4), portable loops otherwise; the exponentials use the shared vectorized exp (sampling.cpp). A
// decode step reads the whole cache, so the AVX2 kernels are
// written for memory-level throughput: tiles of rows x heads of dot products (up to 12 independent
// FMA chains, reduced 8 at a time), the V sums held in registers over blocks of rows, and each row
// read from memory and widened to fp32 once for up to 4 of the group's heads.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "ops/ops.h"
#include "ops/vec128.h"
#include "thread_pool.h"

#ifdef FLEXQUANT_X86
#include <immintrin.h>
#endif

namespace flexquant {

namespace {

// x (n) -> codes (n) = x / scale rounded to nearest even, within ±qmax, with scale = max |x| / qmax
// returned, in fp32 as numpy computes them: the q8 cache's rounding of a block (qmax 127) and the
// q8 decode kernel's of a query vector (32767). All zeros: scale 0 and zero codes. A NaN or an
// infinity: a NaN scale (so that attention shows it, as the fp32 cache would) and zero codes. The
// clamp matters only for a subnormal scale (max |x| < ~1e-36 against 127), where x / scale can pass
// qmax.
template <typename T>
float round_symmetric(const float* x, int64_t n, float qmax, T* codes) {
    float amax = 0.0f;
    bool finite = true;
    for (int64_t i = 0; i < n; ++i) {
        finite = finite && std::isfinite(x[i]);
        amax = std::max(amax, std::fabs(x[i]));
    }
    const float scale = amax / qmax;
    for (int64_t i = 0; i < n; ++i)
        codes[i] = static_cast<T>(finite && scale > 0.0f ? std::min(qmax, std::max(-qmax, std::nearbyint(x[i] / scale)))
                                                         : 0.0f);
    return finite ? scale : std::numeric_limits<float>::quiet_NaN();
}

// The prompt path (attend_block, below): blocks of kKeyBlock keys, from kPromptRows query tokens on.
constexpr int64_t kKeyBlock = 64;
constexpr int64_t kPromptRows = 8;

// Positions per task when one token's positions are split (decode): enough work per task to
// amortize it, small enough that 2K positions give 8 tasks per KV head.
constexpr int64_t kSpan = 256;

struct AttnArgs {
    const float* q;
    const void* k_cache;
    const void* v_cache;
    int64_t m, p0, n_heads, n_kv_heads, head_dim;
    KvStrides kv;  // K[t, hk] at k_cache + hk·kv.head + t·kv.row (V the same)
    float* out;
    // int8 caches: the scales of row (t, hk), one per kQ8Block codes, from
    // k_scale[(hk·kv.head + t·kv.row) / head_dim · q8_blocks] (V the same); null for the others
    const float* k_scale = nullptr;
    const float* v_scale = nullptr;
};

// n rows of a KV head's cache: row t at p + t·stride, and for a q8 cache its scales, block b of row t
// at sc[t·sc_stride + b] (sc null for fp32 and fp16 caches).
template <typename KV>
struct Rows {
    const KV* p;
    int64_t stride;
    const float* sc = nullptr;
    int64_t sc_stride = 0;
    Rows from(int64_t t) const { return {p + t * stride, stride, sc ? sc + t * sc_stride : nullptr, sc_stride}; }
    Rows cols(int64_t c) const { return {p + c, stride, sc ? sc + c / kQ8Block : nullptr, sc_stride}; }
    // element e of row t as fp32 (a q8 code times its block's scale)
    float at(int64_t t, int64_t e) const;
};

// The rows of KV head hk from position t0 in cache `cache` with scales `scale` (q8).
template <typename KV>
Rows<KV> rows_of(const AttnArgs& a, const void* cache, const float* scale, int64_t hk, int64_t t0) {
    const int64_t first = hk * a.kv.head + t0 * a.kv.row, nb = q8_blocks(a.head_dim);
    return {static_cast<const KV*>(cache) + first, a.kv.row, scale ? scale + first / a.head_dim * nb : nullptr,
            a.kv.row / a.head_dim * nb};
}

struct Task {
    int64_t i, hk, t0, t1;  // token, KV head, positions [t0, t1)
};

// One task of the prompt path (attend_block, attend_block_vec128): tokens [i0, i1) x KV head hk, and
// its scratch: S (nv, t_pad) the scores, kt (d, kKeyBlock) a block of keys transposed, vb (kKeyBlock,
// d) a block of V rows, O (nv, d) the V sums. Query vector v = token i0 + v / G, head hk G + v % G
// (the group's heads are contiguous in q).
struct BlockTask {
    const AttnArgs& a;
    int64_t i0, hk, G, d, nv, t_max, t_pad;
    float scale;
    float *S, *kt, *vb, *O;

    BlockTask(const AttnArgs& args, int64_t first, int64_t end, int64_t kv_head, std::vector<float>& scratch)
        : a(args), i0(first), hk(kv_head), G(args.n_heads / args.n_kv_heads), d(args.head_dim),
          nv((end - first) * G), t_max(args.p0 + end), t_pad((t_max + kKeyBlock - 1) / kKeyBlock * kKeyBlock),
          scale(1.0f / std::sqrt(static_cast<float>(d))) {
        scratch.resize(static_cast<size_t>(nv * t_pad + 2 * kKeyBlock * d + nv * d));
        S = scratch.data();
        kt = S + nv * t_pad;
        vb = kt + kKeyBlock * d;
        O = vb + kKeyBlock * d;
    }
    const float* query(int64_t v) const { return a.q + ((i0 + v / G) * a.n_heads + hk * G) * d + (v % G) * d; }
    int64_t keys(int64_t v) const { return a.p0 + i0 + v / G + 1; }  // causal: positions < this
    // Of the nb keys from position t0, how many vector v attends to.
    int64_t attended(int64_t v, int64_t t0, int64_t nb) const {
        return std::min(nb, std::max<int64_t>(0, keys(v) - t0));
    }
    // Vectors v0 .. v0 + NV - 1 (NV <= most, returned): their queries and score rows from column c.
    int score_rows(int64_t v0, int most, int64_t c, const float** q, float** s) const {
        const int NV = static_cast<int>(std::min<int64_t>(most, nv - v0));
        for (int v = 0; v < NV; ++v) {
            q[v] = query(v0 + v);
            s[v] = S + (v0 + v) * t_pad + c;
        }
        return NV;
    }
    // The same for the V sums: their weights (exp(s - max) from column t0) and their rows of O.
    int value_rows(int64_t v0, int most, int64_t t0, const float** p, float** o) const {
        const int NV = static_cast<int>(std::min<int64_t>(most, nv - v0));
        for (int v = 0; v < NV; ++v) {
            p[v] = S + (v0 + v) * t_pad + t0;
            o[v] = O + (v0 + v) * d;
        }
        return NV;
    }
    // Each score row -> exp(s - max) over its own positions (the raw scores after them are never read:
    // the V sums stop at each vector's positions); returns the Σ per vector and zeroes O. max: the
    // kernels' maximum (NaN ignored).
    template <typename Max>
    std::vector<float> softmax(Max max) const {
        std::vector<float> sums(static_cast<size_t>(nv));
        for (int64_t v = 0; v < nv; ++v) {
            float* sv = S + v * t_pad;
            const int64_t n = keys(v);
            sums[v] = static_cast<float>(ops_detail::exp_scaled(sv, n, 1.0f, max(sv, n), sv));
        }
        std::fill(O, O + nv * d, 0.0f);
        return sums;
    }
    // out = O / Σ per vector.
    void finish(const std::vector<float>& sums) const {
        for (int64_t v = 0; v < nv; ++v) {
            float* out = a.out + ((i0 + v / G) * a.n_heads + hk * G + v % G) * d;
            const float inv = 1.0f / sums[v];
            for (int64_t e = 0; e < d; ++e) out[e] = O[v * d + e] * inv;
        }
    }
};

// ---- a span's scores and V sums, in a portable and an AVX2 version ---------------------------------

template <>
float Rows<float>::at(int64_t t, int64_t e) const {
    return p[t * stride + e];
}
template <>
float Rows<uint16_t>::at(int64_t t, int64_t e) const {
    return fp16_to_fp32(p[t * stride + e]);
}
template <>
float Rows<int8_t>::at(int64_t t, int64_t e) const {
    return sc[t * sc_stride + e / kQ8Block] * static_cast<float>(p[t * stride + e]);
}

// The two halves of a span (attend_span below) on the G query heads of one KV head: the scores
// s (G, n) = scale · q_g · K[t], and the V sums o (G, d) = Σ_t p[g][t] · V[t], over n rows K[t]
// (Rows; V the same). Portable loops here, AVX2 (F16C) below.
template <typename KV>
struct SpanPortable {
    static float max(const float* s, int64_t n) {  // NaN ignored
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < n; ++t) m = std::max(m, s[t]);
        return m;
    }
    static void scores(const float* q, const Rows<KV>& K, int64_t n, int64_t G, int64_t d, float scale, float* s) {
        for (int64_t t = 0; t < n; ++t)
            for (int64_t g = 0; g < G; ++g) {
                float acc = 0.0f;
                for (int64_t e = 0; e < d; ++e) acc += q[g * d + e] * K.at(t, e);
                s[g * n + t] = acc * scale;
            }
    }
    static void weighted_sums(const float* p, const Rows<KV>& V, int64_t n, int64_t G, int64_t d, float* o) {
        std::fill(o, o + G * d, 0.0f);
        for (int64_t g = 0; g < G; ++g)
            for (int64_t t = 0; t < n; ++t)
                for (int64_t e = 0; e < d; ++e) o[g * d + e] += p[g * n + t] * V.at(t, e);
    }
};

#ifdef FLEXQUANT_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#define FQ_ATTN_INLINE inline __attribute__((always_inline))

inline __m256 load8(const float* p) {
    return _mm256_loadu_ps(p);
}
inline __m256 load8(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
// Elements e .. e + 7 of row t (e a multiple of 8, so all in one q8 block) as fp32: a q8 cache's
// codes times their block's scale, in the widening, where the decode kernels share it among heads.
template <typename KV>
FQ_ATTN_INLINE __m256 load8(const Rows<KV>& r, int64_t t, int64_t e) {
    const __m256 v = load8(r.p + t * r.stride + e);
    if constexpr (std::is_same_v<KV, int8_t>) return _mm256_mul_ps(v, _mm256_set1_ps(r.sc[t * r.sc_stride + e / kQ8Block]));
    return v;
}

// Lane r of the result = the sum of the 8 lanes of a_r: 6 horizontal adds and 2 lane swaps for
// 8 sums, where 8 separate reductions would take 8 x 4 shuffle-and-add steps.
inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
    // hadd(x, y) = [x0+x1, x2+x3, y0+y1, y2+y3 | x4+x5, x6+x7, y4+y5, y6+y7] (xi: lane i of x)
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    // s0123 = [Σ0..3 of a0..a3 | Σ4..7 of a0..a3], s4567 the same of a4..a7
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// The scores and the V sums of attend_span (below) for the AVX2 kernels. Positions go in blocks
// of kRowBlock (prefetched one block ahead). Each K or V element is loaded and widened to fp32 once
// for several of the group's heads (heads_scores, heads_values): the widening (vcvtph2ps) of an fp16
// cache, done once per head, had been the bottleneck of a decode step at long contexts (13 GB/s per
// core against the fp32 cache's 19).
constexpr int64_t kRowBlock = 32;

// Heads per pass of heads_scores and heads_values: up to 4, so that the register tiles below fit
// AVX2's 16 registers.
inline int64_t heads_per_pass(int64_t left) {
    return left >= 4 ? 4 : left;
}

// The R x GC dot products of rows K[t + r] with the GC query vectors q + g·d, in acc[r][g] (8 lanes
// each, summed by the caller): per 8 elements one widening and GC FMAs (q from L1 as the FMA's
// memory operand), R·GC independent chains.
template <int GC, typename KV>
struct DotFloat {
    static constexpr int kAcc = 12;  // accumulators of a tile (R rows x GC heads)
    const float* q;
    Rows<KV> k;
    int64_t d;
    template <int R>
    FQ_ATTN_INLINE void operator()(int64_t t, __m256 (&acc)[R][GC]) const {
        const Rows<KV> kt = k.from(t);
        for (int r = 0; r < R; ++r)
            for (int g = 0; g < GC; ++g) acc[r][g] = _mm256_setzero_ps();
        for (int64_t e = 0; e < d; e += 8)
            for (int r = 0; r < R; ++r) {
                const __m256 kv = load8(kt, r, e);
                for (int g = 0; g < GC; ++g)
                    acc[r][g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * d + e), kv, acc[r][g]);
            }
    }
};

// The same on a q8 cache (d a multiple of kQ8Block), with integer products: q16 holds the GC query
// vectors rounded to int16 (scaled by 1 / their own scale, applied by the caller), the codes are
// widened to int16 once for the GC heads, vpmaddwd adds the products in pairs, and each block's
// int32 sum (|Σ| <= 32 · 127 · 32767 < 2^31, exact) becomes fp32 times the block's scale. Widening
// the codes to fp32 and scaling them instead ran slower than the fp16 cache (17 GB/s). The sums are
// in units of the query's scale (applied at the end), up to 32767x the dot product: they overflow
// fp32 only for keys beyond ~1e34, where the fp32 cache's products would be near overflow too.
template <int GC>
struct DotQ8 {
    static constexpr int kAcc = 9;  // the codes, their scale and the products need 5 more registers
    const int16_t* q16;
    Rows<int8_t> k;
    int64_t d;
    template <int R>
    FQ_ATTN_INLINE void operator()(int64_t t, __m256 (&acc)[R][GC]) const {
        const Rows<int8_t> kt = k.from(t);
        for (int r = 0; r < R; ++r)
            for (int g = 0; g < GC; ++g) acc[r][g] = _mm256_setzero_ps();
        for (int64_t e = 0; e < d; e += kQ8Block)
            for (int r = 0; r < R; ++r) {
                const int8_t* c = kt.p + r * kt.stride + e;
                const __m256i c0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
                const __m256i c1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16)));
                const __m256 sc = _mm256_set1_ps(kt.sc[r * kt.sc_stride + e / kQ8Block]);
                for (int g = 0; g < GC; ++g) {
                    const int16_t* qg = q16 + g * d + e;
                    const __m256i p = _mm256_add_epi32(
                        _mm256_madd_epi16(c0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qg))),
                        _mm256_madd_epi16(c1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qg + 16))));
                    acc[r][g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sc, acc[r][g]);
                }
            }
    }
};

// s[g·ns + t] = f[g] · Σ (the dot tile's sums) for GC heads and n rows. R = Dot::kAcc / GC rows at a
// time, the rest one by one; each sum is reduced by hsum8, so that a row's score does
// not depend on where its tile starts.
template <int GC, typename Dot>
void heads_scores(const Dot& dot, int64_t n, const float* f, float* s, int64_t ns) {
    constexpr int R = Dot::kAcc / GC > 8 ? 8 : Dot::kAcc / GC;
    const __m256 z = _mm256_setzero_ps();
    alignas(32) float lanes[8];
    // sums (count <= 8 vectors) -> lanes[i] = Σ of vector i
    auto reduce = [&](const __m256* v, int count) {
        __m256 x[8];
        for (int i = 0; i < 8; ++i) x[i] = i < count ? v[i] : z;
        _mm256_store_ps(lanes, hsum8(x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]));
    };
    int64_t t = 0;
    for (; t + R <= n; t += R) {
        __m256 acc[R][GC];
        dot(t, acc);
        const __m256* flat = &acc[0][0];  // row-major: vector r·GC + g
        for (int i0 = 0; i0 < R * GC; i0 += 8) {
            const int count = R * GC - i0 < 8 ? R * GC - i0 : 8;
            reduce(flat + i0, count);
            for (int i = 0; i < count; ++i) s[((i0 + i) % GC) * ns + t + (i0 + i) / GC] = lanes[i] * f[(i0 + i) % GC];
        }
    }
    for (; t < n; ++t) {
        __m256 acc[1][GC];
        dot(t, acc);
        reduce(&acc[0][0], GC);
        for (int g = 0; g < GC; ++g) s[g * ns + t] = lanes[g] * f[g];
    }
}

// o[g·d + c .. + 8 DW) += Σ_t wt(g, t, c + 8w) · V[t][c + 8w ..] for GC heads over n rows V[t] (V:
// columns c..): the GC x DW sums stay in registers for all n rows, and each row's elements are
// widened once for the GC heads. wt(g, t, column) is the weight: p[g][t] (fp32, fp16), or p[g][t]
// times the q8 scale of the column's block (folded into the weight, so that the codes are only
// widened). Per element the same FMAs in the same order as a row-by-row o += p[t] · V[t].
template <int GC, int DW, typename KV, typename Weight>
FQ_ATTN_INLINE void values_rows(const Weight& wt, const Rows<KV>& V, int64_t n, int64_t c, int64_t d, float* o) {
    __m256 acc[GC][DW];
    for (int g = 0; g < GC; ++g)
        for (int w = 0; w < DW; ++w) acc[g][w] = _mm256_loadu_ps(o + g * d + c + 8 * w);
    for (int64_t t = 0; t < n; ++t) {
        for (int w = 0; w < DW; ++w) {
            const __m256 vv = load8(V.p + t * V.stride + 8 * w);
            for (int g = 0; g < GC; ++g) acc[g][w] = _mm256_fmadd_ps(_mm256_set1_ps(wt(g, t, c + 8 * w)), vv, acc[g][w]);
        }
    }
    for (int g = 0; g < GC; ++g)
        for (int w = 0; w < DW; ++w) _mm256_storeu_ps(o + g * d + c + 8 * w, acc[g][w]);
}

// All d elements (a multiple of 8) of heads_values' sums, DW = 12 / GC registers per head at a
// time (at most 8), the rest 8 at a time.
template <int GC, typename KV, typename Weight>
void heads_values(const Weight& wt, const Rows<KV>& V, int64_t n, int64_t d, float* o) {
    constexpr int DW = 12 / GC > 8 ? 8 : 12 / GC;
    int64_t c = 0;
    for (; c + 8 * DW <= d; c += 8 * DW) values_rows<GC, DW>(wt, V.cols(c), n, c, d, o);
    for (; c < d; c += 8) values_rows<GC, 1>(wt, V.cols(c), n, c, d, o);
}

// The V sums on a q8 cache: o[g·d + c .. + 32) += Σ_t p[g·np + t] · vs[t][c / 32] · V[t][c ..] for
// GC <= 3 heads and one block of 32 columns (V: columns c..): per row the GC weights are multiplied
// by the block's scale in registers, and the codes are only widened (4 x 8, shared by the heads).
template <int GC>
FQ_ATTN_INLINE void values_block_q8(const float* p, int64_t np, const Rows<int8_t>& V, int64_t n, float* o, int64_t d) {
    static_assert(GC <= 3, "3 heads x 4 registers of sums, with the weights and a row, fill AVX2's 16");
    __m256 acc[GC][4];
    for (int g = 0; g < GC; ++g)
        for (int w = 0; w < 4; ++w) acc[g][w] = _mm256_loadu_ps(o + g * d + 8 * w);
    for (int64_t t = 0; t < n; ++t) {
        const __m256 sc = _mm256_set1_ps(V.sc[t * V.sc_stride]);
        __m256 wg[GC];
        for (int g = 0; g < GC; ++g) wg[g] = _mm256_mul_ps(_mm256_broadcast_ss(p + g * np + t), sc);
        for (int w = 0; w < 4; ++w) {
            const __m256 vv = load8(V.p + t * V.stride + 8 * w);
            for (int g = 0; g < GC; ++g) acc[g][w] = _mm256_fmadd_ps(wg[g], vv, acc[g][w]);
        }
    }
    for (int g = 0; g < GC; ++g)
        for (int w = 0; w < 4; ++w) _mm256_storeu_ps(o + g * d + 8 * w, acc[g][w]);
}

// Asks for the block of rows [t0, min(t0 + kRowBlock, n)) at K (K + t·stride, d values each) to be
// brought into the cache: the next block's, while the current one is computed (none past n). On the
// token-major layout (a KV head's rows strided by the other heads') the hardware prefetcher alone
// kept an fp16 cache at 20 GB/s, and this gained ~12%. On the engine's head-major layout the rows are
// one stream, and with or without it measured the same (within 3%, 4K-8K positions).
template <typename KV>
inline void prefetch_block(const Rows<KV>& K, int64_t t0, int64_t n, int64_t d) {
    for (int64_t t = t0; t < std::min(t0 + kRowBlock, n); ++t) {
        // every 64-byte line the row touches, from the one holding its first byte
        const uintptr_t row = reinterpret_cast<uintptr_t>(K.p + t * K.stride);
        const uintptr_t end = row + static_cast<uintptr_t>(d) * sizeof(KV);
        for (uintptr_t line = row & ~uintptr_t(63); line < end; line += 64)
            _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T0);
    }
}

// The largest of s (n), NaN ignored (as std::max(m, s[t]) in a loop: max_ps returns its second
// operand when either is NaN); -inf for n = 0. Eight lanes: one chain of maxss costs its latency
// per element, and was 16% of a 2K-token prompt's attention (prompt path below).
inline float max_avx2(const float* s, int64_t n) {
    __m256 m8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) m8 = _mm256_max_ps(_mm256_loadu_ps(s + t), m8);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m8);
    float m = lanes[0];
    for (int l = 1; l < 8; ++l) m = std::max(m, lanes[l]);
    for (; t < n; ++t) m = std::max(m, s[t]);
    return m;
}

// heads_scores / heads_values for the GC heads of a pass, GC = 4, 3, 2 or 1 at run time.
template <template <int> class Make, typename... A>
void per_pass(int64_t gc, A&&... args) {
    switch (gc) {
        case 4: Make<4>::run(args...); break;
        case 3: Make<3>::run(args...); break;
        case 2: Make<2>::run(args...); break;
        default: Make<1>::run(args...); break;
    }
}

// The query vectors of the G heads rounded to int16 for DotQ8: q16 (G, d) = q / sq[g] to nearest,
// sq[g] = max |q_g| / 32767 (0 for a zero vector, whose scores are then 0). A NaN or inf in q: sq
// NaN, so the scores show it.
inline void round_queries_i16(const float* q, int64_t G, int64_t d, int16_t* q16, float* sq) {
    for (int64_t g = 0; g < G; ++g) sq[g] = round_symmetric(q + g * d, d, 32767.0f, q16 + g * d);
}

template <typename KV>
struct SpanAvx2 {
    template <int GC>
    struct FloatScores {
        static void run(const float* q, const Rows<KV>& K, int64_t n, int64_t d, const float* f, float* s, int64_t ns) {
            heads_scores<GC>(DotFloat<GC, KV>{q, K, d}, n, f, s, ns);
        }
    };
    template <int GC>
    struct Q8Scores {
        static void run(const int16_t* q16, const Rows<int8_t>& K, int64_t n, int64_t d, const float* f, float* s,
                        int64_t ns) {
            heads_scores<GC>(DotQ8<GC>{q16, K, d}, n, f, s, ns);
        }
    };
    template <int GC>
    struct Values {
        template <typename Weight>
        static void run(const Weight& wt, const Rows<KV>& V, int64_t n, int64_t d, float* o) {
            heads_values<GC>(wt, V, n, d, o);
        }
    };

    static float max(const float* s, int64_t n) { return max_avx2(s, n); }
    static void scores(const float* q, const Rows<KV>& K, int64_t n, int64_t G, int64_t d, float scale, float* s) {
        // q8 (d a multiple of the block): integer products on the queries rounded to int16
        constexpr bool q8 = std::is_same_v<KV, int8_t>;
        const bool q8_int = q8 && d % kQ8Block == 0;
        thread_local std::vector<int16_t> q16;
        thread_local std::vector<float> f;  // per head: the factor of its sums
        f.assign(static_cast<size_t>(G), scale);
        if (q8_int) {
            q16.resize(static_cast<size_t>(G * d));
            round_queries_i16(q, G, d, q16.data(), f.data());
            for (int64_t g = 0; g < G; ++g) f[g] *= scale;
        }
        for (int64_t t0 = 0; t0 < n; t0 += kRowBlock) {
            const int64_t nb = std::min(kRowBlock, n - t0);
            prefetch_block(K, t0 + kRowBlock, n, d);
            for (int64_t g = 0; g < G;) {
                const int64_t gc = heads_per_pass(G - g);
                float* sg = s + g * n + t0;
                if constexpr (q8) {
                    if (q8_int) {
                        per_pass<Q8Scores>(gc, q16.data() + g * d, K.from(t0), nb, d, f.data() + g, sg, n);
                        g += gc;
                        continue;
                    }
                }
                per_pass<FloatScores>(gc, q + g * d, K.from(t0), nb, d, f.data() + g, sg, n);
                g += gc;
            }
        }
    }
    static void weighted_sums(const float* p, const Rows<KV>& V, int64_t n, int64_t G, int64_t d, float* o) {
        std::fill(o, o + G * d, 0.0f);
        for (int64_t t0 = 0; t0 < n; t0 += kRowBlock) {
            const int64_t nb = std::min(kRowBlock, n - t0);
            prefetch_block(V, t0 + kRowBlock, n, d);
            if constexpr (std::is_same_v<KV, int8_t>) {
                if (d % kQ8Block == 0) {  // per block of 32 columns, up to 3 heads a pass
                    for (int64_t g = 0; g < G;) {
                        const int64_t gc = std::min<int64_t>(3, G - g);
                        for (int64_t c = 0; c < d; c += kQ8Block) {
                            const float* pg = p + g * n + t0;
                            const Rows<int8_t> Vb = V.from(t0).cols(c);
                            float* og = o + g * d + c;
                            if (gc == 3) values_block_q8<3>(pg, n, Vb, nb, og, d);
                            else if (gc == 2) values_block_q8<2>(pg, n, Vb, nb, og, d);
                            else values_block_q8<1>(pg, n, Vb, nb, og, d);
                        }
                        g += gc;
                    }
                    continue;
                }
            }
            for (int64_t g = 0; g < G;) {
                const int64_t gc = heads_per_pass(G - g);
                float* og = o + g * d;
                const float* p0 = p + g * n + t0;
                if constexpr (std::is_same_v<KV, int8_t>) {  // d not a multiple of 32: scale each weight
                    const Rows<int8_t> Vb = V.from(t0);
                    auto wt = [p0, n, Vb](int gi, int64_t t, int64_t col) {
                        return p0[gi * n + t] * Vb.sc[t * Vb.sc_stride + col / kQ8Block];
                    };
                    per_pass<Values>(gc, wt, Vb, nb, d, og);
                } else {
                    auto wt = [p0, n](int gi, int64_t t, int64_t) { return p0[gi * n + t]; };
                    per_pass<Values>(gc, wt, V.from(t0), nb, d, og);
                }
                g += gc;
            }
        }
    }
};

// ---- prompts: blocks of queries against blocks of keys ----------------------------------------
//
// A prompt's query rows are many, so a task takes a block of consecutive tokens (all G heads of one
// KV head: nv = tokens · G query vectors) and multiplies it with the keys as a small GEMM: a block
// of kKeyBlock keys is widened to fp32 and transposed once (kt, (d, kKeyBlock)), then 4 query vectors
// x 16 keys accumulate in 8 registers, a broadcast of q[e] times 16 keys' element e per FMA pair: no
// reductions, and the widening is shared by every query vector of the block. The V sums go the
// same way over fp32 blocks of V rows: 4 vectors x 16 dims per register tile. Per query vector the
// softmax is the decode path's (max, exp_scaled, divide at the end).
// (kKeyBlock, kPromptRows: above, shared with the 128-bit kernels.)

// The 8 x 8 transpose of r[0..8) (rows) in place: r[c] lane j <- old r[j] lane c.
inline void transpose8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xee);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xee);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// kt (d, kKeyBlock) = the n <= kKeyBlock rows K[t] as fp32 columns, zeros past n.
template <typename KV>
void keys_transposed(const Rows<KV>& K, int64_t n, int64_t d, float* kt) {
    for (int64_t j0 = 0; j0 < kKeyBlock; j0 += 8)
        for (int64_t e = 0; e < d; e += 8) {
            __m256 r[8];
            for (int j = 0; j < 8; ++j) r[j] = j0 + j < n ? load8(K, j0 + j, e) : _mm256_setzero_ps();
            transpose8(r);
            for (int c = 0; c < 8; ++c) _mm256_storeu_ps(kt + (e + c) * kKeyBlock + j0, r[c]);
        }
}

// s[v][0 .. 16) = scale · q[v] · the 16 keys at column j0 of kt, for NV query vectors.
template <int NV>
inline void scores_tile(const float* const* q, const float* kt, int64_t d, float scale, float* const* s) {
    __m256 a[NV][2];
    for (int v = 0; v < NV; ++v) a[v][0] = a[v][1] = _mm256_setzero_ps();
    for (int64_t e = 0; e < d; ++e) {
        const __m256 b0 = _mm256_loadu_ps(kt + e * kKeyBlock), b1 = _mm256_loadu_ps(kt + e * kKeyBlock + 8);
        for (int v = 0; v < NV; ++v) {
            const __m256 qe = _mm256_broadcast_ss(q[v] + e);
            a[v][0] = _mm256_fmadd_ps(qe, b0, a[v][0]);
            a[v][1] = _mm256_fmadd_ps(qe, b1, a[v][1]);
        }
    }
    const __m256 sc = _mm256_set1_ps(scale);
    for (int v = 0; v < NV; ++v) {
        _mm256_storeu_ps(s[v], _mm256_mul_ps(a[v][0], sc));
        _mm256_storeu_ps(s[v] + 8, _mm256_mul_ps(a[v][1], sc));
    }
}

// o[v][c .. c + 8 DW) += Σ_{t < n} p[v][t] · vb[t][c ..] for NV vectors; vb (n, d) fp32 rows.
template <int NV, int DW>
inline void values_tile(const float* const* p, const float* vb, int64_t n, int64_t d, int64_t c, float* const* o) {
    __m256 a[NV][DW];
    for (int v = 0; v < NV; ++v)
        for (int w = 0; w < DW; ++w) a[v][w] = _mm256_loadu_ps(o[v] + c + 8 * w);
    for (int64_t t = 0; t < n; ++t) {
        __m256 b[DW];
        for (int w = 0; w < DW; ++w) b[w] = _mm256_loadu_ps(vb + t * d + c + 8 * w);
        for (int v = 0; v < NV; ++v) {
            const __m256 pv = _mm256_broadcast_ss(p[v] + t);
            for (int w = 0; w < DW; ++w) a[v][w] = _mm256_fmadd_ps(pv, b[w], a[v][w]);
        }
    }
    for (int v = 0; v < NV; ++v)
        for (int w = 0; w < DW; ++w) _mm256_storeu_ps(o[v] + c + 8 * w, a[v][w]);
}

template <int NV>
inline void values_tiles(const float* const* p, const float* vb, int64_t n, int64_t d, float* const* o) {
    int64_t c = 0;
    for (; c + 16 <= d; c += 16) values_tile<NV, 2>(p, vb, n, d, c, o);
    if (c < d) values_tile<NV, 1>(p, vb, n, d, c, o);  // d is a multiple of 8
}

// The two tiles on AVX-512 where the CPU has it (cpu_features().avx512): 16 lanes, so twice the
// multiply-adds per instruction. Each lane sums the same products in the same order as the AVX2
// tiles' (over e for a score, over t for an output element), so the results are the same bits.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f")

// s[v][0 .. 32) = scale · q[v] · the 32 keys at column j0 of kt, for NV query vectors.
template <int NV>
void scores_tile512(const float* const* q, const float* kt, int64_t d, float scale, float* const* s) {
    __m512 a[NV][2];
    for (int v = 0; v < NV; ++v) a[v][0] = a[v][1] = _mm512_setzero_ps();
    for (int64_t e = 0; e < d; ++e) {
        const __m512 b0 = _mm512_loadu_ps(kt + e * kKeyBlock), b1 = _mm512_loadu_ps(kt + e * kKeyBlock + 16);
        for (int v = 0; v < NV; ++v) {
            const __m512 qe = _mm512_set1_ps(q[v][e]);
            a[v][0] = _mm512_fmadd_ps(qe, b0, a[v][0]);
            a[v][1] = _mm512_fmadd_ps(qe, b1, a[v][1]);
        }
    }
    const __m512 sc = _mm512_set1_ps(scale);
    for (int v = 0; v < NV; ++v) {
        _mm512_storeu_ps(s[v], _mm512_mul_ps(a[v][0], sc));
        _mm512_storeu_ps(s[v] + 16, _mm512_mul_ps(a[v][1], sc));
    }
}

// o[v][c .. c + 16 DW) += Σ_{t < n} p[v][t] · vb[t][c ..] for NV vectors; vb (n, d) fp32 rows.
template <int NV, int DW>
void values_tile512(const float* const* p, const float* vb, int64_t n, int64_t d, int64_t c, float* const* o) {
    __m512 a[NV][DW];
    for (int v = 0; v < NV; ++v)
        for (int w = 0; w < DW; ++w) a[v][w] = _mm512_loadu_ps(o[v] + c + 16 * w);
    for (int64_t t = 0; t < n; ++t) {
        __m512 b[DW];
        for (int w = 0; w < DW; ++w) b[w] = _mm512_loadu_ps(vb + t * d + c + 16 * w);
        for (int v = 0; v < NV; ++v) {
            const __m512 pv = _mm512_set1_ps(p[v][t]);
            for (int w = 0; w < DW; ++w) a[v][w] = _mm512_fmadd_ps(pv, b[w], a[v][w]);
        }
    }
    for (int v = 0; v < NV; ++v)
        for (int w = 0; w < DW; ++w) _mm512_storeu_ps(o[v] + c + 16 * w, a[v][w]);
}

template <int NV>
void values_tiles512(const float* const* p, const float* vb, int64_t n, int64_t d, float* const* o) {
    int64_t c = 0;
    for (; c + 64 <= d; c += 64) values_tile512<NV, 4>(p, vb, n, d, c, o);
    for (; c + 16 <= d; c += 16) values_tile512<NV, 1>(p, vb, n, d, c, o);
    if (c < d) values_tile<NV, 1>(p, vb, n, d, c, o);  // d is a multiple of 8
}

#pragma GCC pop_options

// One task of the prompt path (BlockTask). A q8 cache's rows are scaled as they are widened (kt, vb),
// so the products are those of the dequantized rows.
template <typename KV>
void attend_block(const AttnArgs& a, int64_t i0, int64_t i1, int64_t hk, std::vector<float>& scratch) {
    const BlockTask T(a, i0, i1, hk, scratch);
    const int64_t d = T.d;
    const Rows<KV> K = rows_of<KV>(a, a.k_cache, a.k_scale, hk, 0), V = rows_of<KV>(a, a.v_cache, a.v_scale, hk, 0);
    const bool w512 = cpu_features().avx512;
    // scores, every vector against every key block up to t_max (masked below)
    for (int64_t t0 = 0; t0 < T.t_max; t0 += kKeyBlock) {
        keys_transposed(K.from(t0), std::min(kKeyBlock, T.t_max - t0), d, T.kt);
        for (int64_t j0 = 0; j0 < kKeyBlock && t0 + j0 < T.t_max; j0 += w512 ? 32 : 16) {
            for (int64_t v0 = 0; v0 < T.nv; v0 += 4) {
                const float* q[4];
                float* s[4];
                const int NV = T.score_rows(v0, 4, t0 + j0, q, s);
                const float* kt = T.kt + j0;
                if (w512) {
                    switch (NV) {
                        case 4: scores_tile512<4>(q, kt, d, T.scale, s); break;
                        case 3: scores_tile512<3>(q, kt, d, T.scale, s); break;
                        case 2: scores_tile512<2>(q, kt, d, T.scale, s); break;
                        default: scores_tile512<1>(q, kt, d, T.scale, s); break;
                    }
                    continue;
                }
                switch (NV) {
                    case 4: scores_tile<4>(q, kt, d, T.scale, s); break;
                    case 3: scores_tile<3>(q, kt, d, T.scale, s); break;
                    case 2: scores_tile<2>(q, kt, d, T.scale, s); break;
                    default: scores_tile<1>(q, kt, d, T.scale, s); break;
                }
            }
        }
    }
    const std::vector<float> sums = T.softmax(max_avx2);
    // V sums: per block of V rows (fp32), 4 vectors at a time over the rows all 4 attend to, then
    // each vector alone over the rows only it attends to (a later token's)
    for (int64_t t0 = 0; t0 < T.t_max; t0 += kKeyBlock) {
        const int64_t nb = std::min(kKeyBlock, T.t_max - t0);
        for (int64_t t = 0; t < nb; ++t)
            for (int64_t e = 0; e < d; e += 8) _mm256_storeu_ps(T.vb + t * d + e, load8(V, t0 + t, e));
        for (int64_t v0 = 0; v0 < T.nv; v0 += 4) {
            const float* p[4];
            float* o[4];
            const int NV = T.value_rows(v0, 4, t0, p, o);
            // vectors in order of token: the first one attends to the fewest positions
            const int64_t common = T.attended(v0, t0, nb);
            switch (NV) {
                case 4: (w512 ? values_tiles512<4> : values_tiles<4>)(p, T.vb, common, d, o); break;
                case 3: (w512 ? values_tiles512<3> : values_tiles<3>)(p, T.vb, common, d, o); break;
                case 2: (w512 ? values_tiles512<2> : values_tiles<2>)(p, T.vb, common, d, o); break;
                default: (w512 ? values_tiles512<1> : values_tiles<1>)(p, T.vb, common, d, o); break;
            }
            for (int v = 0; v < NV; ++v) {
                const int64_t own = T.attended(v0 + v, t0, nb);
                const float* tail = p[v] + common;
                if (own > common)
                    (w512 ? values_tiles512<1> : values_tiles<1>)(&tail, T.vb + common * d, own - common, d, &o[v]);
            }
        }
    }
    T.finish(sums);
}

#pragma GCC pop_options
#endif  // FLEXQUANT_X86

// ---- 128-bit vectors: CPUs without AVX2 (cpu_features().vec128: NEON on AArch64, SSE2 on x86-64) ----
//
// The same two paths as the AVX2 kernels, in GCC/Clang vector extensions on 4 floats (the compiler
// emits NEON or SSE2): per token, spans whose K and V rows are widened to fp32 once for up to 4 of the
// group's heads (SpanVec128), and for prompts blocks of query vectors against blocks of keys
// (attend_block_vec128). The portable loops they replace widen an fp16 element in software once per
// head and keep one add chain per dot product: on SmolLM2 (x86-64 capped to SSE2, 2 threads) they took
// three quarters of a 1,024-token prompt and about half of a decode step at 1,024 positions. An fp16
// cache widens with NEON's fcvtl on AArch64; SSE2 has no fp16 conversion, so there it is the bits
// rearranged in vectors (vec128.h, exact). head_dim must be a multiple of 4.
#ifdef FQ_VEC128
using vec128::f32x4;
using vec128::i32x4;

FQ_V128_INLINE f32x4 load4(const float* p) {
    return vec128::load16<f32x4>(p);
}
FQ_V128_INLINE f32x4 load4(const uint16_t* p) {
    return vec128::load_f16x4(p);
}
FQ_V128_INLINE f32x4 load4(const int8_t* p) {
    return f32x4{static_cast<float>(p[0]), static_cast<float>(p[1]), static_cast<float>(p[2]), static_cast<float>(p[3])};
}
// Elements e .. e + 3 of row t (e a multiple of 4: in one q8 block) as fp32, a q8 code times its block's scale.
template <typename KV>
FQ_V128_INLINE f32x4 load4(const Rows<KV>& r, int64_t t, int64_t e) {
    const f32x4 v = load4(r.p + t * r.stride + e);
    if constexpr (std::is_same_v<KV, int8_t>) return v * r.sc[t * r.sc_stride + e / kQ8Block];
    return v;
}
FQ_V128_INLINE float hsum4(f32x4 a) {
    return (a[0] + a[1]) + (a[2] + a[3]);
}
FQ_V128_INLINE void store4(float* p, f32x4 v) {
    vec128::store16(p, v);
}

// The largest of s (n), NaN ignored (as std::max(m, s[t]) in a loop); -inf for n = 0.
inline float max_vec128(const float* s, int64_t n) {
    const float ninf = -std::numeric_limits<float>::infinity();
    f32x4 m4 = {ninf, ninf, ninf, ninf};
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
        const f32x4 v = load4(s + t);
        m4 = vec128::select(v > m4, v, m4);  // false for NaN: keeps m4
    }
    float m = std::max(std::max(m4[0], m4[1]), std::max(m4[2], m4[3]));
    for (; t < n; ++t) m = std::max(m, s[t]);
    return m;
}

// Vector registers the tiles below may hold as sums: half of them (16 on AArch64, 8 on x86-64).
constexpr int kV128Sums = vec128::kRegisters / 2;

template <typename KV>
struct SpanVec128 {
    static float max(const float* s, int64_t n) { return max_vec128(s, n); }

    // s[g·n + t] = scale · q_g · K[t] for GC heads, R rows at a time: each K element widened once for
    // the GC heads, R·GC independent sums.
    template <int R, int GC>
    static FQ_V128_INLINE void dot_rows(const float* q, const Rows<KV>& K, int64_t t, int64_t n, int64_t d, float scale,
                                        float* s) {
        f32x4 acc[R][GC];
        for (int r = 0; r < R; ++r)
            for (int g = 0; g < GC; ++g) acc[r][g] = f32x4{};
        for (int64_t e = 0; e < d; e += 4)
            for (int r = 0; r < R; ++r) {
                const f32x4 kv = load4(K, t + r, e);
                for (int g = 0; g < GC; ++g) acc[r][g] += load4(q + g * d + e) * kv;
            }
        for (int r = 0; r < R; ++r)
            for (int g = 0; g < GC; ++g) s[g * n + t + r] = hsum4(acc[r][g]) * scale;
    }
    template <int GC>
    static void scores_pass(const float* q, const Rows<KV>& K, int64_t n, int64_t d, float scale, float* s) {
        constexpr int R = kV128Sums / GC / 2 > 4 ? 4 : kV128Sums / GC / 2 < 1 ? 1 : kV128Sums / GC / 2;
        int64_t t = 0;
        for (; t + R <= n; t += R) dot_rows<R, GC>(q, K, t, n, d, scale, s);
        for (; t < n; ++t) dot_rows<1, GC>(q, K, t, n, d, scale, s);
    }
    static void scores(const float* q, const Rows<KV>& K, int64_t n, int64_t G, int64_t d, float scale, float* s) {
        for (int64_t g = 0; g < G;) {
            const int64_t gc = std::min<int64_t>(4, G - g);
            switch (gc) {
                case 4: scores_pass<4>(q + g * d, K, n, d, scale, s + g * n); break;
                case 3: scores_pass<3>(q + g * d, K, n, d, scale, s + g * n); break;
                case 2: scores_pass<2>(q + g * d, K, n, d, scale, s + g * n); break;
                default: scores_pass<1>(q + g * d, K, n, d, scale, s + g * n); break;
            }
            g += gc;
        }
    }

    // o[g·d + c .. + 4 DW) += Σ_t p[g·n + t] · V[t][c ..] for GC heads: the sums in registers over all n
    // rows, each row's elements widened once for the GC heads; per element the FMAs (or multiplies
    // and adds) of a row-by-row o += p[t] · V[t], in the same order.
    template <int GC, int DW>
    static FQ_V128_INLINE void values_cols(const float* p, const Rows<KV>& V, int64_t n, int64_t c, int64_t d,
                                           float* o) {
        f32x4 acc[GC][DW];
        for (int g = 0; g < GC; ++g)
            for (int w = 0; w < DW; ++w) acc[g][w] = load4(o + g * d + c + 4 * w);
        for (int64_t t = 0; t < n; ++t) {
            f32x4 vv[DW];
            for (int w = 0; w < DW; ++w) vv[w] = load4(V, t, c + 4 * w);
            for (int g = 0; g < GC; ++g) {
                const float pt = p[g * n + t];
                for (int w = 0; w < DW; ++w) acc[g][w] += pt * vv[w];
            }
        }
        for (int g = 0; g < GC; ++g)
            for (int w = 0; w < DW; ++w) store4(o + g * d + c + 4 * w, acc[g][w]);
    }
    template <int GC>
    static void values_pass(const float* p, const Rows<KV>& V, int64_t n, int64_t d, float* o) {
        constexpr int DW = kV128Sums / GC > 8 ? 8 : kV128Sums / GC;
        int64_t c = 0;
        for (; c + 4 * DW <= d; c += 4 * DW) values_cols<GC, DW>(p, V, n, c, d, o);
        for (; c < d; c += 4) values_cols<GC, 1>(p, V, n, c, d, o);
    }
    static void weighted_sums(const float* p, const Rows<KV>& V, int64_t n, int64_t G, int64_t d, float* o) {
        std::fill(o, o + G * d, 0.0f);
        for (int64_t g = 0; g < G;) {
            const int64_t gc = std::min<int64_t>(4, G - g);
            switch (gc) {
                case 4: values_pass<4>(p + g * n, V, n, d, o + g * d); break;
                case 3: values_pass<3>(p + g * n, V, n, d, o + g * d); break;
                case 2: values_pass<2>(p + g * n, V, n, d, o + g * d); break;
                default: values_pass<1>(p + g * n, V, n, d, o + g * d); break;
            }
            g += gc;
        }
    }
};

// ---- prompts on 128-bit vectors: attend_block's scheme (below the AVX2 one: blocks of query vectors
// against blocks of kKeyBlock keys widened and transposed once) with 4-float tiles: NV query vectors x
// 16 keys of scores, NV vectors x 16 dimensions of V sums, NV = 4 on AArch64, 2 on x86-64.
constexpr int kV128Vectors = kV128Sums / 4;

// kt (d, kKeyBlock) = the n <= kKeyBlock rows K[t] as fp32 columns, zeros past n.
template <typename KV>
void keys_transposed_vec128(const Rows<KV>& K, int64_t n, int64_t d, float* kt) {
    for (int64_t j = 0; j < kKeyBlock; ++j)
        for (int64_t e = 0; e < d; e += 4) {
            const f32x4 v = j < n ? load4(K, j, e) : f32x4{};
            for (int c = 0; c < 4; ++c) kt[(e + c) * kKeyBlock + j] = v[c];
        }
}

// s[v][0 .. 16) = scale · q[v] · the 16 keys at kt's columns, for NV query vectors.
template <int NV>
void scores_tile_vec128(const float* const* q, const float* kt, int64_t d, float scale, float* const* s) {
    f32x4 a[NV][4];
    for (int v = 0; v < NV; ++v)
        for (int w = 0; w < 4; ++w) a[v][w] = f32x4{};
    for (int64_t e = 0; e < d; ++e) {
        f32x4 b[4];
        for (int w = 0; w < 4; ++w) b[w] = load4(kt + e * kKeyBlock + 4 * w);
        for (int v = 0; v < NV; ++v) {
            const float qe = q[v][e];
            for (int w = 0; w < 4; ++w) a[v][w] += qe * b[w];
        }
    }
    for (int v = 0; v < NV; ++v)
        for (int w = 0; w < 4; ++w) store4(s[v] + 4 * w, a[v][w] * scale);
}

// o[v][c .. c + 4 DW) += Σ_{t < n} p[v][t] · vb[t][c ..] for NV vectors; vb (n, d) fp32 rows.
template <int NV, int DW>
void values_tile_vec128(const float* const* p, const float* vb, int64_t n, int64_t d, int64_t c, float* const* o) {
    f32x4 a[NV][DW];
    for (int v = 0; v < NV; ++v)
        for (int w = 0; w < DW; ++w) a[v][w] = load4(o[v] + c + 4 * w);
    for (int64_t t = 0; t < n; ++t) {
        f32x4 b[DW];
        for (int w = 0; w < DW; ++w) b[w] = load4(vb + t * d + c + 4 * w);
        for (int v = 0; v < NV; ++v) {
            const float pv = p[v][t];
            for (int w = 0; w < DW; ++w) a[v][w] += pv * b[w];
        }
    }
    for (int v = 0; v < NV; ++v)
        for (int w = 0; w < DW; ++w) store4(o[v] + c + 4 * w, a[v][w]);
}

template <int NV>
void values_tiles_vec128(const float* const* p, const float* vb, int64_t n, int64_t d, float* const* o) {
    int64_t c = 0;
    for (; c + 16 <= d; c += 16) values_tile_vec128<NV, 4>(p, vb, n, d, c, o);
    for (; c < d; c += 4) values_tile_vec128<NV, 1>(p, vb, n, d, c, o);  // d is a multiple of 4
}

// NV = n (1 .. kV128Vectors) at run time.
template <template <int> class Make, typename... A>
void per_vectors(int n, A&&... args) {
    switch (n) {
        case 4: if constexpr (kV128Vectors >= 4) { Make<4>::run(args...); break; } [[fallthrough]];
        case 3: if constexpr (kV128Vectors >= 3) { Make<3>::run(args...); break; } [[fallthrough]];
        case 2: Make<2>::run(args...); break;
        default: Make<1>::run(args...); break;
    }
}
template <int NV>
struct ScoresTileV128 {
    static void run(const float* const* q, const float* kt, int64_t d, float scale, float* const* s) {
        scores_tile_vec128<NV>(q, kt, d, scale, s);
    }
};
template <int NV>
struct ValuesTilesV128 {
    static void run(const float* const* p, const float* vb, int64_t n, int64_t d, float* const* o) {
        values_tiles_vec128<NV>(p, vb, n, d, o);
    }
};

// attend_block (AVX2, above) on 128-bit vectors: one task of the prompt path (BlockTask).
template <typename KV>
void attend_block_vec128(const AttnArgs& a, int64_t i0, int64_t i1, int64_t hk, std::vector<float>& scratch) {
    const BlockTask T(a, i0, i1, hk, scratch);
    const int64_t d = T.d;
    const Rows<KV> K = rows_of<KV>(a, a.k_cache, a.k_scale, hk, 0), V = rows_of<KV>(a, a.v_cache, a.v_scale, hk, 0);
    for (int64_t t0 = 0; t0 < T.t_max; t0 += kKeyBlock) {
        keys_transposed_vec128(K.from(t0), std::min(kKeyBlock, T.t_max - t0), d, T.kt);
        for (int64_t j0 = 0; j0 < kKeyBlock && t0 + j0 < T.t_max; j0 += 16)
            for (int64_t v0 = 0; v0 < T.nv; v0 += kV128Vectors) {
                const float* q[kV128Vectors];
                float* s[kV128Vectors];
                const int NV = T.score_rows(v0, kV128Vectors, t0 + j0, q, s);
                per_vectors<ScoresTileV128>(NV, q, T.kt + j0, d, T.scale, s);
            }
    }
    const std::vector<float> sums = T.softmax(max_vec128);
    for (int64_t t0 = 0; t0 < T.t_max; t0 += kKeyBlock) {
        const int64_t nb = std::min(kKeyBlock, T.t_max - t0);
        for (int64_t t = 0; t < nb; ++t)
            for (int64_t e = 0; e < d; e += 4) store4(T.vb + t * d + e, load4(V, t0 + t, e));
        for (int64_t v0 = 0; v0 < T.nv; v0 += kV128Vectors) {
            const float* p[kV128Vectors];
            float* o[kV128Vectors];
            const int NV = T.value_rows(v0, kV128Vectors, t0, p, o);
            // vectors in order of token: the first one attends to the fewest positions
            const int64_t common = T.attended(v0, t0, nb);
            per_vectors<ValuesTilesV128>(NV, p, T.vb, common, d, o);
            for (int v = 0; v < NV; ++v) {
                const int64_t own = T.attended(v0 + v, t0, nb);
                const float* tail = p[v] + common;
                if (own > common) values_tiles_vec128<1>(&tail, T.vb + common * d, own - common, d, &o[v]);
            }
        }
    }
    T.finish(sums);
}
#endif  // FQ_VEC128

// One task: for each query head g of the group, over positions [t0, t1): mx[g] = max score,
// sum[g] = Σ exp(s - mx), o[g] (d) = Σ exp(s - mx) V[t]. scores: scratch of G * (t1 - t0).
template <typename KV, typename Span>
void attend_span(const AttnArgs& a, const Task& tk, float* mx, float* sum, float* o, std::vector<float>& scores) {
    const int64_t G = a.n_heads / a.n_kv_heads, d = a.head_dim, n = tk.t1 - tk.t0;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    const float* q = a.q + (tk.i * a.n_heads + tk.hk * G) * d;  // the group's G heads, contiguous
    const Rows<KV> K = rows_of<KV>(a, a.k_cache, a.k_scale, tk.hk, tk.t0);
    const Rows<KV> V = rows_of<KV>(a, a.v_cache, a.v_scale, tk.hk, tk.t0);
    scores.resize(G * n);
    Span::scores(q, K, n, G, d, scale, scores.data());
    for (int64_t g = 0; g < G; ++g) {  // scores -> exp(s - max), in place
        float* s = scores.data() + g * n;
        const float m = Span::max(s, n);
        mx[g] = m;
        sum[g] = static_cast<float>(ops_detail::exp_scaled(s, n, 1.0f, m, s));
    }
    Span::weighted_sums(scores.data(), V, n, G, d, o);
}

template <typename KV, typename Span>
void run_tasks(const AttnArgs& a, const std::vector<Task>& tasks, float* partial, int64_t b, int64_t e) {
    thread_local std::vector<float> scores;
    const int64_t G = a.n_heads / a.n_kv_heads, d = a.head_dim;
    for (int64_t k = b; k < e; ++k) {
        float* p = partial + k * G * (d + 2);  // per task: mx (G), sum (G), o (G, d)
        attend_span<KV, Span>(a, tasks[k], p, p + G, p + 2 * G, scores);
    }
}

std::atomic<const char*> g_last_attention{""};

// attention_last_kernel()'s record, once per call (on the calling thread).
void note_attention(const char* name) {
    g_last_attention.store(name, std::memory_order_relaxed);
}

template <typename KV>
void attention_impl(const AttnArgs& a, ThreadPool* pool) {
    if (a.m < 0 || a.p0 < 0 || a.head_dim <= 0 || a.n_kv_heads <= 0 || a.n_heads % a.n_kv_heads)
        throw std::invalid_argument(
            "attention: need m, p0 >= 0, head_dim > 0 and n_heads a multiple of n_kv_heads, got n_heads=" +
            std::to_string(a.n_heads) + ", n_kv_heads=" + std::to_string(a.n_kv_heads));
    if (a.m == 0) return;
    const int64_t G = a.n_heads / a.n_kv_heads, d = a.head_dim;
    [[maybe_unused]] const bool simd = cpu_features().avx2 && d % 8 == 0;
#ifdef FQ_VEC128
    [[maybe_unused]] const bool vec = !cpu_features().avx2 && cpu_features().vec128 && d % 4 == 0;
#else
    [[maybe_unused]] const bool vec = false;  // no 128-bit kernels compiled for this target
#endif
#if defined(FLEXQUANT_X86) || defined(FQ_VEC128)
    if ((simd || vec) && a.m >= kPromptRows && a.m * a.n_kv_heads >= 16) {
        // A prompt: tasks of (a block of tokens, one KV head), about 64 query vectors each, fewer
        // where that would leave under 32 tasks (a short chunk on a long cache: the threads need
        // work) or make a task's scores (vectors x positions) pass 1M floats (4 MiB of scratch per
        // thread). A rule on the shapes alone, so the result does not depend on the thread count.
        // Fewer than 16 (token, KV head) pairs take the per-token path, which splits the positions.
        const int64_t t_all = a.p0 + a.m;
        int64_t tokens = std::max<int64_t>(4, 64 / G);
        tokens = std::min(tokens, std::max<int64_t>(1, a.m * a.n_kv_heads / 32));
        tokens = std::min(tokens, std::max<int64_t>(1, (int64_t(1) << 20) / (G * (t_all + kKeyBlock))));
        const int64_t n_blocks = (a.m + tokens - 1) / tokens, n_tasks = n_blocks * a.n_kv_heads;
        note_attention(simd ? (cpu_features().avx512 ? "prompt_avx512" : "prompt_avx2") : "prompt_vec128");
        auto body = [&](int64_t b, int64_t e) {
            thread_local std::vector<float> scratch;
            for (int64_t k = b; k < e; ++k) {
                // later blocks attend to more positions: they come first, so a share ends with its
                // lightest tasks, which are what a thread done early takes (from the back), and the
                // threads end together
                const int64_t blk = n_blocks - 1 - k / a.n_kv_heads, hk = k % a.n_kv_heads;
                const int64_t i0 = blk * tokens, i1 = std::min(a.m, (blk + 1) * tokens);
#ifdef FLEXQUANT_X86
                if (simd) {
                    attend_block<KV>(a, i0, i1, hk, scratch);
                    continue;
                }
#endif
#ifdef FQ_VEC128
                attend_block_vec128<KV>(a, i0, i1, hk, scratch);
#endif
            }
        };
        if (pool)
            pool->parallel_for(n_tasks, 1, body);
        else
            body(0, n_tasks);
        return;
    }
#endif
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

    note_attention(simd ? "span_avx2" : vec ? "span_vec128" : "span_portable");
    auto body = [&](int64_t b, int64_t e) {
#ifdef FLEXQUANT_X86
        if (simd) return run_tasks<KV, SpanAvx2<KV>>(a, tasks, partial.data(), b, e);
#endif
#ifdef FQ_VEC128
        if (vec) return run_tasks<KV, SpanVec128<KV>>(a, tasks, partial.data(), b, e);
#endif
        run_tasks<KV, SpanPortable<KV>>(a, tasks, partial.data(), b, e);
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

const char* attention_last_kernel() {
    return g_last_attention.load(std::memory_order_relaxed);
}

void attention(const float* q, const float* k_cache, const float* v_cache, int64_t m, int64_t p0, int64_t n_heads,
               int64_t n_kv_heads, int64_t head_dim, KvStrides kv, float* out, ThreadPool* pool) {
    attention_impl<float>({q, k_cache, v_cache, m, p0, n_heads, n_kv_heads, head_dim, kv, out}, pool);
}

void attention_f16(const float* q, const uint16_t* k_cache, const uint16_t* v_cache, int64_t m, int64_t p0,
                   int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, KvStrides kv, float* out, ThreadPool* pool) {
    attention_impl<uint16_t>({q, k_cache, v_cache, m, p0, n_heads, n_kv_heads, head_dim, kv, out}, pool);
}

void attention_q8(const float* q, const int8_t* k_cache, const float* k_scale, const int8_t* v_cache,
                  const float* v_scale, int64_t m, int64_t p0, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                  KvStrides kv, float* out, ThreadPool* pool) {
    if (!k_scale || !v_scale) throw std::invalid_argument("attention_q8: null scales");
    if (head_dim <= 0 || kv.row % head_dim || kv.head % head_dim)
        throw std::invalid_argument("attention_q8: the cache's strides must be multiples of head_dim " +
                                    std::to_string(head_dim) + ", got row=" + std::to_string(kv.row) +
                                    ", head=" + std::to_string(kv.head));
    AttnArgs a{q, k_cache, v_cache, m, p0, n_heads, n_kv_heads, head_dim, kv, out};
    a.k_scale = k_scale;
    a.v_scale = v_scale;
    attention_impl<int8_t>(a, pool);
}

#ifdef FLEXQUANT_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace {
// Returns how many leading elements it did (a multiple of 8).
int64_t to_f16_f16c(const float* x, int64_t n, uint16_t* out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return i;
}
}  // namespace
#pragma GCC pop_options
#endif

// Per block of kQ8Block values of a row (the last one may be shorter): round_symmetric to ±127.
void quantize_rows_q8(const float* x, int64_t rows, int64_t d, int8_t* codes, float* scales) {
    const int64_t nb = q8_blocks(d);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t i0 = r * d + b * kQ8Block, len = std::min(kQ8Block, d - b * kQ8Block);
            scales[r * nb + b] = round_symmetric(x + i0, len, 127.0f, codes + i0);
        }
}

// A prompt stores (tokens, 2 Hkv d) values per layer: one at a time in software that cost ~4% of a
// SmolLM2 prefill.
void to_f16(const float* x, int64_t n, uint16_t* out) {
    int64_t i = 0;
#ifdef FLEXQUANT_X86
    if (cpu_features().avx2) i = to_f16_f16c(x, n, out);
#endif
    for (; i < n; ++i) out[i] = fp32_to_fp16(x[i]);
}

}  // namespace flexquant

// AVX-512 decode and GEMM kernels of y (m, n) = x̂ (m, k) · W_kᵀ over a bit-plane linear on int16
// activations (BITPLANE_ACT_I16, ops.h; formula and layout: bitplane_matmul.cpp, docs/format.md):
//
//   y[r, n] = Σ_g s_k[n,g] · xs[r,g] · Σ_{i∈g} c_k[n,i] q[r,i]  +  m_k[n,g] · Σ_{i∈g} x̂[r,i]
//
// with x̂ = xs · q, q int16. Compiled for AVX-512 F/BW/DQ/VL/VNNI + GFNI by the pragma below and only
// called when cpu_features().avx512 says so.
//
// Why it is faster than the fp32 GFNI kernel (bitplane_matmul_avx2.cpp): that one converts every
// code to fp32 (an and, a cvtdq2ps and an FMA per 8 codes); here the codes stay integers and one
// vpdpwssd multiplies 32 of them by 32 int16 activations and adds the pairs into 16 int32 sums. Per
// 128 weights of a row that is ~19 instructions instead of ~80.
//
// One batch is a whole super-chunk row (16 words; a short last super-chunk of 3 words per lane has
// zeros past them, one of 1 or 2 shares its vectors with 3 or 1 other rows: short_super_i16): the 64
// bytes of each plane are transposed as in the GFNI kernel, so that 128-bit lane L of the codes of
// step v holds word 4L + v of the row (32 weights). The integer sums of a step (8 products per int32
// lane) are exact: |Σ| <= 8 * 255 * 32767 < 2^31. They become fp32 and are scaled by s_k · xs of
// their word's group (a lane may have its own group) once per step, or once per super-chunk where
// each lane's 4 words share a group (32 products, still exact).
//
// The GEMM (many rows: prompts, batches; gemm_block_i16) decodes a tile's 8 rows once to int16
// codes and turns the product around: a vector holds 16 activation rows' pairs of one K pair, a
// broadcast holds one weight row's pair, and each vpdpwssd adds 16 rows x 2 products. The fp32 GEMM
// (bitplane_matmul_avx2.cpp) does 8 multiply-adds per FMA; this one does 32 per instruction.

#include "cpu_features.h"

#ifdef FLEXQUANT_X86

#include <immintrin.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "ops/ops.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,gfni,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")
// GCC 12's AVX-512 headers start their reductions from _mm512_undefined_*(), which
// -Wmaybe-uninitialized reports at every use
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// and _mm512_extracti32x4_epi32 from _mm_undefined_si128(), which -Wuninitialized reports once it is
// inlined into a lambda (prepare_i16_avx512)
#pragma GCC diagnostic ignored "-Wuninitialized"

#define FQ_INLINE inline __attribute__((always_inline))

namespace flexquant {
namespace bitplane_detail {

namespace {

// Per-thread scratch (kernels never nest): grown, never shrunk.
float* scratch512(size_t n) {
    thread_local std::vector<float> buf;
    if (buf.size() < n) buf.resize(n);
    return buf.data();
}
int16_t* codes_scratch(size_t n) {  // a GEMM tile's int16 codes, one buffer for every bit-width
    thread_local std::vector<int16_t> buf;
    if (buf.size() < n) buf.resize(n);
    return buf.data();
}

// The first two transpose stages of the GFNI kernel (unpack_planes), on 4 lanes: B[i] and B[4 + i]
// hold, per 128-bit lane, planes 0-3 and 4-7 of byte positions 4i .. 4i+3 (word i of the lane), one
// dword per position.
// W: the super-chunk's words per lane (16 W bytes per plane of the row), the lanes past it zero.
template <int BITS>
FQ_INLINE __m512i load_plane(const uint8_t* p, int W) {
    // Masked loads only for W = 3: from memory they ran ~1.7x slower at 8 bits than plain ones.
    switch (W) {
        case 4: return _mm512_loadu_si512(p);
        case 1: return _mm512_zextsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        case 2: return _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        default: return _mm512_maskz_loadu_epi8((__mmask64(1) << 48) - 1, p);
    }
}

template <int BITS>
FQ_INLINE void transpose_planes512(const uint8_t* p, uint64_t pb, int W, __m512i B[8]) {
    const __m512i z = _mm512_setzero_si512();
    __m512i P[8], A[8];
    for (int i = 0; i < 8; ++i) P[i] = i < BITS ? load_plane<BITS>(p + i * pb, W) : z;
    for (int i = 0; i < 4; ++i) {
        A[2 * i] = 2 * i < BITS ? _mm512_unpacklo_epi8(P[2 * i], P[2 * i + 1]) : z;
        A[2 * i + 1] = 2 * i < BITS ? _mm512_unpackhi_epi8(P[2 * i], P[2 * i + 1]) : z;
    }
    for (int i = 0; i < 2; ++i) {
        const bool any = 4 * i < BITS;
        B[4 * i + 0] = any ? _mm512_unpacklo_epi16(A[4 * i], A[4 * i + 2]) : z;
        B[4 * i + 1] = any ? _mm512_unpackhi_epi16(A[4 * i], A[4 * i + 2]) : z;
        B[4 * i + 2] = any ? _mm512_unpacklo_epi16(A[4 * i + 1], A[4 * i + 3]) : z;
        B[4 * i + 3] = any ? _mm512_unpackhi_epi16(A[4 * i + 1], A[4 * i + 3]) : z;
    }
}

// Step v's codes from transpose_planes512's B: c0 / c1 = weights 0-15 / 16-31 of word 4L + v in
// lane L, one code byte each (shifted left by 8 - k); e / o their even / odd bytes as int16.
// (b_lo, b_hi: B[v] and B[4 + v].)
FQ_INLINE void step_codes512(__m512i b_lo, __m512i b_hi, __m512i& e0, __m512i& o0, __m512i& e1, __m512i& o1) {
    const __m512i sel = _mm512_set1_epi64(static_cast<long long>(0x8040201008040201ull));
    const __m512i low = _mm512_set1_epi16(0x00ff);
    const __m512i c0 = _mm512_gf2p8affine_epi64_epi8(sel, _mm512_unpacklo_epi32(b_lo, b_hi), 0);
    const __m512i c1 = _mm512_gf2p8affine_epi64_epi8(sel, _mm512_unpackhi_epi32(b_lo, b_hi), 0);
    e0 = _mm512_and_si512(c0, low), o0 = _mm512_srli_epi16(c0, 8);
    e1 = _mm512_and_si512(c1, low), o1 = _mm512_srli_epi16(c1, 8);
}

// A step's 8 products per int32 lane (|Σ| <= 8 · 255 · 32768, exact): the codes e0, o0, e1, o1
// against the activations x0 .. x3 (the step's 4 quarters of slots), from zero.
FQ_INLINE __m512i dot4_512(__m512i e0, __m512i o0, __m512i e1, __m512i o1, __m512i x0, __m512i x1, __m512i x2,
                           __m512i x3) {
    __m512i p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), e0, x0);
    p = _mm512_dpwssd_epi32(p, o0, x1);
    p = _mm512_dpwssd_epi32(p, e1, x2);
    return _mm512_dpwssd_epi32(p, o1, x3);
}

// A short last super-chunk of W = 1 or 2 words per lane (K_pad = 128 or 256 past a multiple of 512,
// e.g. K = 576): the decode below would transpose and multiply whole vectors of which only W lanes
// hold words. Here 4 / W weight rows share one vector instead: their 16 W bytes per plane are
// adjacent (rows gq .. gq + 4 / W - 1 are one 64-byte load), so the transpose is the same, lane l
// of a step holds word-lane l % W of row gq + l / W, and the activations of lanes 0 .. W - 1 are
// repeated in every row's lanes. tail[g][r] += row g's sum for activation row r0 + r. Rows past N are
// the layout's zero padding (their factors are 0 too), and are not added anywhere.
template <int BITS, int M>
__attribute__((noinline)) void short_super_i16(const Job& j, int64_t s, int W, const uint8_t* sb, int64_t r0,
                                                int rows, const TileFactorsI16& tf, float tail[8][M]) {
    const uint64_t pb = j.w->plane_bytes;
    const __m512i lane_of = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const int rp = 4 / W;  // weight rows per vector
    const bool lane_const = j.super_lane_const[s];
    // lane l's factor for activation row r at step v
    const auto factor = [&](int gq, int v, int r) {
        alignas(16) float f[4];
        for (int l = 0; l < 4; ++l)
            f[l] = tf.row(r0 + r, gq + l / W)[8 * j.step_group[16 * s + 4 * v + l % W]];
        return _mm512_permutexvar_ps(lane_of, _mm512_castps128_ps512(_mm_load_ps(f)));
    };
    for (int gq = 0; gq < rows; gq += rp) {
        __m512i B[8];
        transpose_planes512<BITS>(sb + 16 * W * gq, pb, 4, B);
        __m512 part[M];
        __m512i ip[M];
        for (int r = 0; r < M; ++r) part[r] = _mm512_setzero_ps(), ip[r] = _mm512_setzero_si512();
        for (int v = 0; v < 4; ++v) {
            __m512i e0, o0, e1, o1;
            step_codes512(B[v], B[4 + v], e0, o0, e1, o1);
            for (int r = 0; r < M; ++r) {
                // the 8 slots of lanes 0 .. W - 1 of each quarter, in every row's lanes
                const int16_t* x = j.xi + (r0 + r) * j.x_stride + (4 * s + v) * 128;
                const auto rep = [&](const int16_t* q) {
                    return W == 1 ? _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)))
                                  : _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
                };
                const __m512i p = dot4_512(e0, o0, e1, o1, rep(x), rep(x + 32), rep(x + 64), rep(x + 96));
                if (lane_const)  // exact int32 sums over the 4 steps, as in decode_tile_i16
                    ip[r] = _mm512_add_epi32(ip[r], p);
                else
                    part[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), factor(gq, v, r), part[r]);
            }
        }
        for (int r = 0; r < M; ++r) {
            if (lane_const) part[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(ip[r]), factor(gq, 0, r));
            alignas(64) float lanes[16];
            _mm512_store_ps(lanes, part[r]);
            for (int l = 0; l < 4; ++l) {
                const int g = gq + l / W;
                if (g < rows) tail[g][r] += (lanes[4 * l] + lanes[4 * l + 1]) + (lanes[4 * l + 2] + lanes[4 * l + 3]);
            }
        }
    }
}

// Rows r0 .. r0 + M - 1 of the activations against the 8 weight rows of tile rt; factors and bias
// from TileFactorsI16.
template <int BITS, int M>
void decode_tile_i16(const Job& j, int64_t rt, int64_t r0, const TileFactorsI16& tf) {
    const uint64_t pb = j.w->plane_bytes;
    const int rows = static_cast<int>(std::min<int64_t>(8, j.w->n - rt * 8));
    const __m512i lane_of = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc[8][M];
    for (int g = 0; g < 8; ++g)
        for (int r = 0; r < M; ++r) acc[g][r] = _mm512_setzero_ps();
    // a short last super-chunk of 1 or 2 words per lane: packed, after the loop
    const int w_last = super_words(j, j.n_super - 1);
    const int64_t n_loop = w_last <= 2 ? j.n_super - 1 : j.n_super;
    for (int64_t s = 0; s < n_loop; ++s) {
        const int W = super_words(j, s);  // bytes per row and plane: 16 W
        const uint8_t* sb = j.w->planes + super_offset(j, rt, s);
        for (int g = 0; g < rows; ++g) {
            __m512i B[8];
            transpose_planes512<BITS>(sb + 16 * W * g, pb, W, B);
            // the 8 products per int32 lane of step v for row r
            const auto dot = [&](int v, int r, __m512i e0, __m512i o0, __m512i e1, __m512i o1) {
                const int16_t* x = j.xi + (r0 + r) * j.x_stride + (4 * s + v) * 128;
                return dot4_512(e0, o0, e1, o1, _mm512_loadu_si512(x), _mm512_loadu_si512(x + 32),
                                _mm512_loadu_si512(x + 64), _mm512_loadu_si512(x + 96));
            };
            // the factor of each lane's word for row r: one group for all 4 unless G < 128 or a short
            // super-chunk
            const auto factor = [&](int v, int r) {
                const int32_t* lane_group = j.step_group + 16 * s + 4 * v;
                const float* f = tf.row(r0 + r, g);
                return j.step_uniform[4 * s + v]
                           ? _mm512_set1_ps(f[8 * lane_group[0]])
                           : _mm512_permutexvar_ps(lane_of, _mm512_castps128_ps512(_mm_setr_ps(
                                                                f[8 * lane_group[0]], f[8 * lane_group[1]],
                                                                f[8 * lane_group[2]], f[8 * lane_group[3]])));
            };
            __m512 sum[M];
            if (j.super_lane_const[s]) {
                // Each lane's 4 words are in one group (G a multiple of 512, Job::super_lane_const;
                // at G = 128 each step is one group, and factor() broadcasts it): its products are summed
                // in int32 over the whole super-chunk, 32 per lane, |Σ| <= 32 * 255 * 32768 < 2^31, so
                // exactly, and become fp32 and are scaled once instead of once per step. Each step's
                // vpdpwssd chain starts from zero (the steps' chains overlap) and a vpaddd adds it.
                __m512i ip[M];
                for (int r = 0; r < M; ++r) ip[r] = _mm512_setzero_si512();
                for (int v = 0; v < 4; ++v) {
                    __m512i e0, o0, e1, o1;
                    step_codes512(B[v], B[4 + v], e0, o0, e1, o1);
                    for (int r = 0; r < M; ++r) ip[r] = _mm512_add_epi32(ip[r], dot(v, r, e0, o0, e1, o1));
                }
                for (int r = 0; r < M; ++r) sum[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(ip[r]), factor(0, r));
            } else {
                // The row's sums of this super-chunk stay in registers, in two chains (v even / odd):
                // adding each step into acc[g] (memory: g is not unrolled) made one long chain of
                // load-FMA-store per row and ran no faster than the fp32 kernel.
                __m512 part[2][M];
                for (int r = 0; r < M; ++r) part[0][r] = part[1][r] = _mm512_setzero_ps();
                for (int v = 0; v < 4; ++v) {
                    __m512i e0, o0, e1, o1;
                    step_codes512(B[v], B[4 + v], e0, o0, e1, o1);
                    for (int r = 0; r < M; ++r) {
                        const __m512i p = dot(v, r, e0, o0, e1, o1);
                        part[v % 2][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), factor(v, r), part[v % 2][r]);
                    }
                }
                for (int r = 0; r < M; ++r) sum[r] = _mm512_add_ps(part[0][r], part[1][r]);
            }
            for (int r = 0; r < M; ++r) acc[g][r] = _mm512_add_ps(acc[g][r], sum[r]);
        }
    }
    float tail[8][M] = {};  // the rows' sums over that short super-chunk
    if (n_loop < j.n_super)
        short_super_i16<BITS, M>(j, n_loop, w_last, j.w->planes + super_offset(j, rt, n_loop), r0, rows, tf, tail);
    for (int g = 0; g < rows; ++g)
        for (int r = 0; r < M; ++r)
            j.y[(r0 + r) * j.w->n + rt * 8 + g] =
                (_mm512_reduce_add_ps(acc[g][r]) + tail[g][r]) + tf.bias()[(r0 + r) * 8 + g];
}

template <int BITS>
void decode_tiles_i16(const Job& j, int64_t t0, int64_t t1) {
    // The codes come out shifted left by 8 - k (as in the GFNI kernel); 2^(k-8) undoes it, exactly.
    TileFactorsI16 f(j, 1.0f / static_cast<float>(1 << (8 - BITS)));
    for (int64_t rt = t0; rt < t1; ++rt) {
        f.compute(rt);
        // Up to 4 activation rows per pass over the planes (the unrolled kernels); more rows (a
        // forced decode path) take several passes.
        for (int64_t r0 = 0; r0 < j.m; r0 += 4) {
            switch (std::min<int64_t>(4, j.m - r0)) {
                case 1: decode_tile_i16<BITS, 1>(j, rt, r0, f); break;
                case 2: decode_tile_i16<BITS, 2>(j, rt, r0, f); break;
                case 3: decode_tile_i16<BITS, 3>(j, rt, r0, f); break;
                default: decode_tile_i16<BITS, 4>(j, rt, r0, f); break;
            }
        }
    }
}

}  // namespace

namespace {

// Word bits 16h + 2i + e -> position 16h + 8e + i of a permuted word: the order in which both the
// decode kernel's slots (WORD_ORDER_I16, in 8-slot quarters) and the GEMM's pairs hold a word.
__m512i word_permutation() {
    alignas(64) int16_t idx[32];
    for (int h = 0; h < 2; ++h)
        for (int e = 0; e < 2; ++e)
            for (int i = 0; i < 8; ++i) idx[16 * h + 8 * e + i] = static_cast<int16_t>(16 * h + 2 * i + e);
    return _mm512_load_si512(idx);
}

// One row xr (k) -> q_tmp (k_pad; natural K order, zeros past k), and per group its scale s and
// Σ x̂ = s Σ q (fp64; NaN when the group holds a NaN or inf, so that y shows it), written at
// xscale[g * stride] and xsum[g * stride].
void quantize_row_i16(const float* xr, int64_t k, int64_t k_pad, int group, int64_t n_groups, int16_t* q_tmp,
                      float* xscale, double* xsum, int64_t stride) {
    const __m512 qmax = _mm512_set1_ps(32767.0f), qmin = _mm512_set1_ps(-32767.0f);
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    std::fill(q_tmp + k, q_tmp + k_pad, int16_t(0));
    for (int64_t g = 0; g < n_groups; ++g) {
        const int64_t i0 = g * group, i1 = std::min<int64_t>(k, i0 + group);
        // absmax; NaN never wins a max_ps with it second (as std::max in quantize_i16)
        __m512 amax = _mm512_setzero_ps();
        __mmask16 bad = 0;
        for (int64_t i = i0; i < i1; i += 16) {
            const __mmask16 live = i1 - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (i1 - i)) - 1);
            const __m512 v = _mm512_maskz_loadu_ps(live, xr + i);
            amax = _mm512_max_ps(_mm512_and_ps(v, abs_mask), amax);
            bad |= _mm512_mask_fpclass_ps_mask(live, v, 0x99);  // QNaN, SNaN, +inf, -inf
        }
        const float scale = _mm512_reduce_max_ps(amax) / 32767.0f;
        xscale[g * stride] = scale;
        int64_t qsum = 0;  // Σ q: int32 lanes would wrap for groups of 65,568 and more
        const __m512 sv = _mm512_set1_ps(scale);
        for (int64_t i = i0; i < i1; i += 16) {
            const __mmask16 live = i1 - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (i1 - i)) - 1);
            __m512i q = _mm512_setzero_si512();
            if (scale > 0.0f) {
                // x / s (IEEE), to nearest even, clamped: quantize_i16's fp32 operations
                const __m512 t = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(live, xr + i), sv),
                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                q = _mm512_cvtps_epi32(_mm512_min_ps(qmax, _mm512_max_ps(qmin, t)));
                // lanes past k, and NaN's INT_MIN (its group's sum is NaN anyway): 0, so that the
                // reduction below adds only in-range values
                q = _mm512_maskz_mov_epi32(live & ~_mm512_fpclass_ps_mask(_mm512_maskz_loadu_ps(live, xr + i), 0x99), q);
            }
            qsum += _mm512_reduce_add_epi32(q);  // |Σ| <= 16 * 32767 here (a NaN row: xsum is NaN below)
            _mm256_mask_storeu_epi16(q_tmp + i, live, _mm512_cvtsepi32_epi16(q));
        }
        xsum[g * stride] = bad ? std::numeric_limits<double>::quiet_NaN()
                               : static_cast<double>(scale) * static_cast<double>(qsum);
    }
}

}  // namespace

void prepare_i16_avx512(const Job& j, const float* x, int64_t k, int16_t* q_tmp, int16_t* xi, float* xscale,
                        double* xsum) {
    const __m512i perm = word_permutation();
    for (int64_t r = 0; r < j.m; ++r) {
        quantize_row_i16(x + r * k, k, j.k_pad, j.w->group_size, j.n_groups, q_tmp, xscale + r * j.n_groups,
                         xsum + r * j.n_groups, 1);
        // q_tmp (natural K order) -> the slots of every step's words: quarter 2h + e of a permuted
        // word goes to slots 64h + 32e + 8L .. + 7
        for_each_i16_word(j, xi + r * j.x_stride, [&](int32_t base, int16_t* blk) {
            const __m512i w = base >= 0 ? _mm512_permutexvar_epi16(perm, _mm512_loadu_si512(q_tmp + base))
                                        : _mm512_setzero_si512();
            _mm_storeu_si128(reinterpret_cast<__m128i*>(blk), _mm512_castsi512_si128(w));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(blk + 32), _mm512_extracti32x4_epi32(w, 1));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(blk + 64), _mm512_extracti32x4_epi32(w, 2));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(blk + 96), _mm512_extracti32x4_epi32(w, 3));
        });
    }
}

void prepare_i16_gemm_avx512(const Job& j, const float* x, int64_t k, int64_t b0, int64_t b1, int32_t* xt,
                             float* xst, double* xsumt) {
    const __m512i perm = word_permutation();
    const __m512i pair_at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(16));
    thread_local std::vector<int16_t> q_buf;
    if (q_buf.size() < static_cast<size_t>(j.k_pad)) q_buf.resize(static_cast<size_t>(j.k_pad));
    int16_t* q_tmp = q_buf.data();
    const int64_t nw = j.k_pad / 32, ng = j.n_groups;
    for (int64_t r = b0 * 16; r < b1 * 16; ++r) {
        const int64_t b = r / 16, lane = r % 16;
        if (r < j.m) {
            quantize_row_i16(x + r * k, k, j.k_pad, j.w->group_size, ng, q_tmp, xst + b * ng * 16 + lane,
                             xsumt + b * ng * 16 + lane, 16);
        } else {  // the last block's empty lanes: zeros (xt is not cleared; xst and xsumt are)
            std::fill(q_tmp, q_tmp + j.k_pad, int16_t(0));
        }
        // the row's 16 pairs of each word go to lane `lane` of 16 consecutive 64-byte vectors
        int32_t* out = xt + b * nw * 256 + lane;
        for (int64_t s = 0; s < j.n_super; ++s) {
            const int W = super_words(j, s);
            for (int v = 0; v < 4; ++v)
                for (int L = 0; L < W; ++L) {
                    const __m512i w = _mm512_permutexvar_epi16(perm, _mm512_loadu_si512(q_tmp + j.step_base[16 * s + 4 * v + L]));
                    _mm512_i32scatter_epi32(out + (16 * s + v * W + L) * 256, pair_at, w, 4);
                }
        }
    }
}

namespace {

// Codes of the 8 rows of tile rt as int16, wbuf (8, k_pad): row g's word pos (as Job::xt) at
// g * k_pad + 32 pos, its 32 codes permuted as word_permutation() permutes the activations, so
// that int32 pair t of a word multiplies pair t of xt. Codes come shifted left by 8 - k.
template <int BITS>
void tile_codes_i16(const Job& j, int64_t rt, int16_t* wbuf) {
    const uint64_t pb = j.w->plane_bytes;
    for (int64_t s = 0; s < j.n_super; ++s) {
        const int W = super_words(j, s);
        const uint8_t* sb = j.w->planes + super_offset(j, rt, s);
        for (int g = 0; g < 8; ++g) {  // rows past N are the layout's zero padding
            __m512i B[8];
            transpose_planes512<BITS>(sb + 16 * W * g, pb, W, B);
            int16_t* out = wbuf + g * j.k_pad + (16 * s) * 32;
            for (int v = 0; v < 4; ++v) {
                // 128-bit lane L of e0, o0, e1, o1: bits 2i, 2i + 1, 16 + 2i, 17 + 2i of word 4L + v;
                // a 4 x 4 transpose of the lanes gathers each word's 32 codes into one vector
                __m512i e0, o0, e1, o1;
                step_codes512(B[v], B[4 + v], e0, o0, e1, o1);
                const __m512i t0 = _mm512_shuffle_i64x2(e0, o0, 0x44), t1 = _mm512_shuffle_i64x2(e0, o0, 0xee);
                const __m512i t2 = _mm512_shuffle_i64x2(e1, o1, 0x44), t3 = _mm512_shuffle_i64x2(e1, o1, 0xee);
                const __m512i word[4] = {_mm512_shuffle_i64x2(t0, t2, 0x88), _mm512_shuffle_i64x2(t0, t2, 0xdd),
                                         _mm512_shuffle_i64x2(t1, t3, 0x88), _mm512_shuffle_i64x2(t1, t3, 0xdd)};
                for (int L = 0; L < W; ++L) _mm512_storeu_si512(out + (v * W + L) * 32, word[L]);
            }
        }
    }
}

// acc += the pairwise products of a and b (vpdpwssd), in asm: with the intrinsic, GCC 12 copied each
// loop-carried accumulator of gemm_block_i16 to another register and back around its vpdpwssd, and
// stored it to the stack on every pass.
FQ_INLINE void dpwssd_(__m512i& acc, __m512i a, __m512i b) {
    asm("vpdpwssd {%2, %1, %0|%0, %1, %2}" : "+v"(acc) : "v"(a), "v"(b));  // AT&T | Intel syntax
}

// y of rows 16 b0 .. 16 (b0 + MB) - 1 (those < m) and the 8 outputs of tile rt. 8 x MB int32
// accumulators (24 zmm at MB = 3) hold a run of words of one group: per pair t, MB vectors of 16
// rows' activation pairs and 8 broadcast weight pairs make 8 MB vpdpwssd. A run has at most 8 words,
// 256 products per int32 lane: |Σ| <= 256 * 255 * 32767 < 2^31, exact. Each run is then scaled to
// fp32 by s_k · s of its group.
template <int MB>
void gemm_block_i16(const Job& j, int64_t rt, int64_t b0, const int16_t* wbuf, const float* sk, const float* mk) {
    const int64_t nw = j.k_pad / 32, ng = j.n_groups, half = j.k_pad / 2;
    const int32_t* wp = reinterpret_cast<const int32_t*>(wbuf);  // (8, k_pad / 2) pairs of codes
    const int32_t* xb = j.xt + b0 * nw * 256;
    alignas(64) float facc[8][3][16];  // (8, MB, 16) used
    for (int g = 0; g < 8; ++g)
        for (int b = 0; b < MB; ++b) _mm512_store_ps(facc[g][b], _mm512_setzero_ps());
    for (int64_t sg = 0; sg < j.n_seg; ++sg) {
        const int64_t p0 = 16 * static_cast<int64_t>(j.seg[3 * sg]), p1 = p0 + 16 * j.seg[3 * sg + 1];
        const int64_t grp = j.seg[3 * sg + 2];
        // Named accumulators acc<g><b>, not an array: GCC kept an acc[8][MB] array (and even 8
        // per-row arrays) on the stack, loaded and stored around every vpdpwssd, asm or not.
#define FQ_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define FQ_ZERO(g) __m512i acc##g##0 = zero, acc##g##1 = zero, acc##g##2 = zero;
        const __m512i zero = _mm512_setzero_si512();
        FQ_ROWS(FQ_ZERO)
        for (int64_t p = p0; p < p1; ++p) {
            const __m512i a0 = _mm512_load_si512(xb + p * 16);
            const __m512i a1 = MB > 1 ? _mm512_load_si512(xb + nw * 256 + p * 16) : zero;
            const __m512i a2 = MB > 2 ? _mm512_load_si512(xb + 2 * nw * 256 + p * 16) : zero;
#define FQ_MAC(g)                                                             \
    {                                                                         \
        const __m512i wv = _mm512_set1_epi32(wp[g * half + p]);               \
        dpwssd_(acc##g##0, a0, wv);                                           \
        if (MB > 1) dpwssd_(acc##g##1, a1, wv);                               \
        if (MB > 2) dpwssd_(acc##g##2, a2, wv);                               \
    }
            FQ_ROWS(FQ_MAC)
        }
        const __m512 xs0 = _mm512_load_ps(j.xst + (b0 * ng + grp) * 16);
        const __m512 xs1 = MB > 1 ? _mm512_load_ps(j.xst + ((b0 + 1) * ng + grp) * 16) : _mm512_setzero_ps();
        const __m512 xs2 = MB > 2 ? _mm512_load_ps(j.xst + ((b0 + 2) * ng + grp) * 16) : _mm512_setzero_ps();
#define FQ_FLUSH1(g, b)                                                                                     \
    _mm512_store_ps(facc[g][b], _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc##g##b), _mm512_mul_ps(skv, xs##b),    \
                                                _mm512_load_ps(facc[g][b])));
#define FQ_FLUSH(g)                                          \
    {                                                        \
        const __m512 skv = _mm512_set1_ps(sk[g * ng + grp]); \
        FQ_FLUSH1(g, 0)                                      \
        if (MB > 1) FQ_FLUSH1(g, 1)                          \
        if (MB > 2) FQ_FLUSH1(g, 2)                          \
    }
        FQ_ROWS(FQ_FLUSH)
#undef FQ_FLUSH
#undef FQ_FLUSH1
#undef FQ_MAC
#undef FQ_ZERO
#undef FQ_ROWS
    }
    // + the min term Σ_g m_k Σ x̂ (fp64, as the decode kernels), then the rows' outputs
    const int rows = static_cast<int>(std::min<int64_t>(8, j.w->n - rt * 8));
    for (int b = 0; b < MB; ++b) {
        const int64_t r0 = (b0 + b) * 16;
        const int live = static_cast<int>(std::min<int64_t>(16, j.m - r0));
        if (live <= 0) break;
        const double* xsum = j.xsumt + (b0 + b) * ng * 16;
        for (int g = 0; g < rows; ++g) {
            __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
            for (int64_t gr = 0; gr < ng; ++gr) {
                const __m512d m = _mm512_set1_pd(mk[g * ng + gr]);
                lo = _mm512_fmadd_pd(m, _mm512_load_pd(xsum + gr * 16), lo);
                hi = _mm512_fmadd_pd(m, _mm512_load_pd(xsum + gr * 16 + 8), hi);
            }
            alignas(64) float out[16];
            const __m512 bias = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo)), _mm512_cvtpd_ps(hi), 1);
            _mm512_store_ps(out, _mm512_add_ps(_mm512_load_ps(facc[g][b]), bias));
            float* y = j.y + r0 * j.w->n + rt * 8 + g;
            for (int i = 0; i < live; ++i) y[i * j.w->n] = out[i];
        }
    }
}

template <int BITS>
void gemm_tiles_i16(const Job& j, int64_t t0, int64_t t1) {
    int16_t* codes = codes_scratch(static_cast<size_t>(8 * j.k_pad));
    float* sk = scratch512(16 * j.n_groups);
    float* mk = sk + 8 * j.n_groups;
    // Chunks of blocks outer: a tile is decoded once per chunk, and the chunk's activations stay
    // in cache while every tile of the range passes over them.
    for (int64_t c0 = 0; c0 < j.n_blocks; c0 += j.block_chunk) {
        const int64_t c1 = std::min(j.n_blocks, c0 + j.block_chunk);
        for (int64_t rt = t0; rt < t1; ++rt) {
            tile_codes_i16<BITS>(j, rt, codes);
            // codes shifted left by 8 - k: 2^(k-8) undoes it, exactly
            tile_factors(j, rt, 1.0f / static_cast<float>(1 << (8 - BITS)), sk, mk);
            for (int64_t b = c0; b < c1; b += 3) {
                switch (std::min<int64_t>(3, c1 - b)) {
                    case 1: gemm_block_i16<1>(j, rt, b, codes, sk, mk); break;
                    case 2: gemm_block_i16<2>(j, rt, b, codes, sk, mk); break;
                    default: gemm_block_i16<3>(j, rt, b, codes, sk, mk); break;
                }
            }
        }
    }
}

}  // namespace

void gemm_tiles_i16_avx512(const Job& j, int64_t t0, int64_t t1) {
    with_bits(j.bits, [&](auto bits) { gemm_tiles_i16<decltype(bits)::value>(j, t0, t1); });
}

void decode_tiles_i16_avx512(const Job& j, int64_t t0, int64_t t1) {
    with_bits(j.bits, [&](auto bits) { decode_tiles_i16<decltype(bits)::value>(j, t0, t1); });
}

}  // namespace bitplane_detail
}  // namespace flexquant

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif  // FLEXQUANT_X86

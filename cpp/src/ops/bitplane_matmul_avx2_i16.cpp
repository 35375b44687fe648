// AVX2 decode kernels of y (m, n) = x̂ (m, k) · W_kᵀ over a bit-plane linear on int16 activations
// (BITPLANE_ACT_I16, ops.h; formula and layout: bitplane_matmul.cpp, docs/format.md), for CPUs
// without AVX-512:
//
//   y[r, n] = Σ_g s_k[n,g] · xs[r,g] · Σ_{i∈g} c_k[n,i] q[r,i]  +  m_k[n,g] · Σ_{i∈g} x̂[r,i]
//
// with x̂ = xs · q, q int16. The AVX2 counterpart of decode_tile_i16 (bitplane_matmul_avx512.cpp),
// on the same activation layout (WORD_ORDER_I16). Kernel (bitplane_matmul_avx2_i16.inc) comes in
// variants that differ only in how a row's planes become codes, and in the multiply-add:
//  - gfni (compiled for avx2+gfni): gf2p8affineqb transposes each 8x8 bit block, as the fp32 GFNI
//    kernel does; with AVX-VNNI, a third compilation multiplies and adds with vpdpwssd, and on int8
//    activations (BITPLANE_ACT_I8, Job::xb) with vpdpbusd on the code bytes as they are (KernelI8:
//    the same int32 sums, half the multiply instructions and no split of the codes);
//  - shifts (plain AVX2): the same transpose in delta swaps (Hacker's Delight 7-3), across the 8
//    planes' vectors as loaded (12 swaps per 256 codes, cheaper below 8 bits: transpose_slots), the
//    planes fed in reverse order so that the result is bit for bit the GFNI one.
// Both keep the codes integers: bytes c_k << (8 - k), split into even and odd bytes (int16), and
// vpmaddwd multiplies 16 codes by 16 int16 activations into 8 int32 pair sums; the fp32 kernels spent
// an and, a convert and an FMA per 8 codes. The int32 sums of one step (8 products per lane,
// |Σ| <= 8 · 255 · 32767 < 2^31) are exact and become fp32 once per step, times 2^(k-8) s_k · xs of
// their word's group.
// Measured (4096 x 4096, one row, 2 threads, AMD EPYC capped to AVX2), µs at 8 / 6 / 4 / 2 bits: the
// transpose per qword after the unpacks (three swaps, 18 ops per 32 codes) 940 / - / - / -, per-plane
// byte masks (word_codes, 5 ops per plane and 32 codes) - / 780-824 / 569-599 / 380-398; the swaps
// across the planes 700-744 / 552-593 / 433-447 / 358-392, and 597-615 / 529-544 / 395-397 / 322-327
// with GCC's predictive commoning off for this file (CMakeLists.txt: it kept activations in spills).
//
// A batch is 8 consecutive stored words of a row (32 bytes of each plane): 128-bit lane h holds
// words 4h .. 4h + 3 of the batch, and step v takes word v of each lane, i.e. the words 4L + v of
// WORD_ORDER_I16 with L = 2b + h for batch b. A short last super-chunk of 1 or 3 words per lane leaves
// 4 words per row after its batches: those are decoded for two rows at once, one per lane, on
// activations broadcast to both lanes.

#include "cpu_features.h"

#ifdef FLEXQUANT_X86

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "ops/ops.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#define FQ_INLINE inline __attribute__((always_inline))

#include "ops/bitplane_matmul_avx2.h"

namespace flexquant {
namespace bitplane_detail {

namespace {

// 32 bytes of activations at p (16 int16, or 32 int8); and 16 of them in both 128-bit lanes (the
// two-row tail).
FQ_INLINE __m256i load_x(const void* p) {
    return _mm256_loadu_si256(static_cast<const __m256i*>(p));
}
FQ_INLINE __m256i load_x_both_lanes(const void* p) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}

// Σ over 4 vpmaddwd of (codes, activations) pairs: 8 int32 sums of 8 products each.
FQ_INLINE __m256i madd4(__m256i e0, __m256i o0, __m256i e1, __m256i o1, __m256i x0, __m256i x1, __m256i x2,
                        __m256i x3) {
    const __m256i a = _mm256_add_epi32(_mm256_madd_epi16(e0, x0), _mm256_madd_epi16(o0, x1));
    const __m256i b = _mm256_add_epi32(_mm256_madd_epi16(e1, x2), _mm256_madd_epi16(o1, x3));
    return _mm256_add_epi32(a, b);
}

}  // namespace

void prepare_i16_avx2(const Job& j, const float* x, int64_t k, int16_t* q_tmp, int16_t* xi, float* xscale,
                      double* xsum) {
    // per 128-bit lane of 8 int16: evens to the low qword, odds to the high one
    const __m256i split = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9, 12,
                                           13, 2, 3, 6, 7, 10, 11, 14, 15);
    for (int64_t r = 0; r < j.m; ++r) {
        quantize_row_i16_avx2(x + r * k, k, j.k_pad, j.w->group_size, j.n_groups, q_tmp, xscale + r * j.n_groups,
                              xsum + r * j.n_groups, 1, j.qmax);
        // q_tmp -> WORD_ORDER_I16: slot 64h + 32e + 8L + i of step (s, v) <- bit 16h + 2i + e of word
        // 4L + v
        for_each_i16_word(j, xi + r * j.x_stride, [&](int32_t base, int16_t* blk) {
            for (int h = 0; h < 2; ++h) {
                __m256i w = _mm256_setzero_si256();
                if (base >= 0) {
                    w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q_tmp + base + 16 * h));
                    // [evens 0-7 | odds 0-7 | evens 8-15 | odds 8-15] -> [evens | odds]
                    w = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(w, split), 0xd8);
                }
                _mm_storeu_si128(reinterpret_cast<__m128i*>(blk + 64 * h), _mm256_castsi256_si128(w));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(blk + 64 * h + 32), _mm256_extracti128_si256(w, 1));
            }
        });
    }
}

// The factors are computed per tile, one group at a time for all 8 rows of the tile: the 8 rows'
// (scale, min) pairs of 8 groups are loaded a row per vector and transposed (a gather per group
// instead was 15-20% slower at K = 4096, one row), F16C converts them, and each activation row then
// costs a multiply and a store for swx and two fp64 FMAs for the bias, per group. The layout
// follows: swx (m, n_groups, 8) and bias (m, 8) hold a group's 8 rows side by side.
// Measured (perf, SmolLM2 decode, AVX-512): the previous per-row form (8 groups of one row per
// vector, a horizontal sum per row) took 12-14% of a decode step at 4 and 8 bits, as much per group
// and row as a 4-bit tile's products; most of it was per row and tile, not per group.
void TileFactorsI16::compute(int64_t rt) {
    const Job& j = j_;
    const int64_t ng = j.n_groups;
    const __m256 smulv = _mm256_set1_ps(smul_), mmulv = _mm256_set1_ps(mmul_);
    // per 128-bit lane of 4 (scale, min) fp16 pairs: scales to the low qword, mins to the high one
    const __m256i split = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9, 12,
                                           13, 2, 3, 6, 7, 10, 11, 14, 15);
    const int rows = static_cast<int>(std::min<int64_t>(8, j.w->n - rt * 8));
    // a (scale, min) pair is one int32: pair (row g, group gr) of the tile at g ng + gr
    const int* pairs = reinterpret_cast<const int*>(j.w->qparams + rt * 8 * ng * 2);
    for (int64_t gr0 = 0; gr0 < ng; gr0 += 8) {
        // 8 groups of the 8 rows, one row per vector (rows past N not loaded, 0; groups past n_groups
        // are the next row's pairs or 0, never stored), transposed to one group per vector
        const int n8 = static_cast<int>(std::min<int64_t>(8, ng - gr0));
        const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(n8), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256i R[8], T[8];
        for (int g = 0; g < 8; ++g) {
            // a short row: a plain load where 8 pairs are there to read (the next rows'; the lanes past
            // n8 are not used), a masked one only at the end of qparams. Measured, SmolLM2 decode: the
            // masked loads (vpmaskmovd) took half of this function's time, 4-5% of a step.
            const bool whole = (rt * 8 + g) * ng + gr0 + 8 <= j.w->n * ng;
            R[g] = g >= rows ? _mm256_setzero_si256()
                   : whole   ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs + g * ng + gr0))
                             : _mm256_maskload_epi32(pairs + g * ng + gr0, tail);
        }
        for (int h = 0; h < 2; ++h) {
            const __m256i t0 = _mm256_unpacklo_epi32(R[4 * h], R[4 * h + 1]);
            const __m256i t1 = _mm256_unpackhi_epi32(R[4 * h], R[4 * h + 1]);
            const __m256i t2 = _mm256_unpacklo_epi32(R[4 * h + 2], R[4 * h + 3]);
            const __m256i t3 = _mm256_unpackhi_epi32(R[4 * h + 2], R[4 * h + 3]);
            // T[4h + c], per 128-bit lane: rows 4h .. 4h+3 of groups c and c + 4
            T[4 * h + 0] = _mm256_unpacklo_epi64(t0, t2);
            T[4 * h + 1] = _mm256_unpackhi_epi64(t0, t2);
            T[4 * h + 2] = _mm256_unpacklo_epi64(t1, t3);
            T[4 * h + 3] = _mm256_unpackhi_epi64(t1, t3);
        }
        for (int c = 0; c < n8; ++c) {
            const __m256i raw = c < 4 ? _mm256_permute2x128_si256(T[c], T[4 + c], 0x20)
                                      : _mm256_permute2x128_si256(T[c - 4], T[c], 0x31);
            const __m256i sm = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(raw, split), 0xd8);
            const __m256 sc = _mm256_cvtph_ps(_mm256_castsi256_si128(sm));
            const __m256 mk = _mm256_add_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(sm, 1)), _mm256_mul_ps(sc, mmulv));
            const int64_t gr = gr0 + c;
            _mm256_storeu_ps(sk_ + 8 * gr, _mm256_mul_ps(sc, smulv));
            _mm256_storeu_pd(mk_ + 8 * gr, _mm256_cvtps_pd(_mm256_castps256_ps128(mk)));
            _mm256_storeu_pd(mk_ + 8 * gr + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(mk, 1)));
        }
    }
    for (int64_t r = 0; r < j.m; ++r) {
        const float* xs = j.xscale + r * ng;
        const double* xsum = j.xsum + r * ng;
        float* out = swx_ + r * ng * 8;
        __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();  // bias of rows 0-3, 4-7 (fp64)
        for (int64_t gr = 0; gr < ng; ++gr) {
            _mm256_storeu_ps(out + 8 * gr, _mm256_mul_ps(_mm256_loadu_ps(sk_ + 8 * gr), _mm256_set1_ps(xs[gr])));
            const __m256d xv = _mm256_set1_pd(xsum[gr]);
            lo = _mm256_fmadd_pd(_mm256_loadu_pd(mk_ + 8 * gr), xv, lo);
            hi = _mm256_fmadd_pd(_mm256_loadu_pd(mk_ + 8 * gr + 4), xv, hi);
        }
        _mm256_storeu_ps(bias_ + 8 * r, _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo)));
    }
}

namespace {

// The variants' driver: tile params, then up to 4 activation rows per pass over the planes (more
// rows, 5 and 6 under the built-in rule or more on a table or a forced decode path, take several
// passes).
template <int BITS, template <int, int> class Kernel>
void decode_tiles_i16_with(const Job& j, int64_t t0, int64_t t1) {
    // codes shifted left by 8 - k (the transposes' output) need 2^(k-8)
    TileFactorsI16 f(j, 1.0f / static_cast<float>(1 << (8 - BITS)));
    for (int64_t rt = t0; rt < t1; ++rt) {
        f.compute(rt);
        for (int64_t r0 = 0; r0 < j.m; r0 += 4) {
            switch (std::min<int64_t>(4, j.m - r0)) {
                case 1: Kernel<BITS, 1>::run(j, rt, r0, f); break;
                case 2: Kernel<BITS, 2>::run(j, rt, r0, f); break;
                case 3: Kernel<BITS, 3>::run(j, rt, r0, f); break;
                default: Kernel<BITS, 4>::run(j, rt, r0, f); break;
            }
        }
    }
}

}  // namespace

// ---- the shifts variant -----------------------------------------------------------------------------

namespace i16_shifts {
#define FQ_I16_GFNI 0
#define FQ_I16_VNNI 0
#include "ops/bitplane_matmul_avx2_i16.inc"
#undef FQ_I16_VNNI
#undef FQ_I16_GFNI
}  // namespace i16_shifts

void decode_tiles_i16_avx2(const Job& j, int64_t t0, int64_t t1) {
    note_kernel("decode_i16_avx2");
    with_bits(j.bits,
              [&](auto bits) { decode_tiles_i16_with<decltype(bits)::value, i16_shifts::Kernel>(j, t0, t1); });
}

}  // namespace bitplane_detail
}  // namespace flexquant

#pragma GCC pop_options

// ---- the GFNI variant -------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,gfni")

namespace flexquant {
namespace bitplane_detail {

namespace i16_gfni {
#define FQ_I16_GFNI 1
#define FQ_I16_VNNI 0
#include "ops/bitplane_matmul_avx2_i16.inc"
#undef FQ_I16_VNNI
#undef FQ_I16_GFNI
}  // namespace i16_gfni

// Defined here, not in the avxvnni region: the path without it must not be compiled where the
// compiler may use AVX-VNNI (it runs on GFNI CPUs without it).
void decode_tiles_i16_gfni(const Job& j, int64_t t0, int64_t t1) {
#ifdef FLEXQUANT_AVXVNNI
    if (cpu_features().avxvnni) return decode_tiles_i16_gfni_vnni(j, t0, t1);
#endif
    note_kernel("decode_i16_gfni");
    with_bits(j.bits, [&](auto bits) { decode_tiles_i16_with<decltype(bits)::value, i16_gfni::Kernel>(j, t0, t1); });
}

}  // namespace bitplane_detail
}  // namespace flexquant

#pragma GCC pop_options

#ifdef FLEXQUANT_AVXVNNI

// ---- the GFNI variant with AVX-VNNI ------------------------------------------------------------------
// vpdpwssd multiplies and adds in one instruction: 4096 x 4096, one row, 262-296 -> 241-263 µs at 8
// bits and 228-230 -> 208-211 at 4 on this machine (AMD EPYC capped to the gfni family).

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,gfni,avxvnni")

namespace flexquant {
namespace bitplane_detail {

namespace i16_gfni_vnni {
#define FQ_I16_GFNI 1
#define FQ_I16_VNNI 1
#include "ops/bitplane_matmul_avx2_i16.inc"
#undef FQ_I16_VNNI
#undef FQ_I16_GFNI
}  // namespace i16_gfni_vnni

void decode_tiles_i16_gfni_vnni(const Job& j, int64_t t0, int64_t t1) {
    if (j.xb) {  // BITPLANE_ACT_I8: the code bytes against int8 activations (vpdpbusd)
        note_kernel("decode_i8_gfni_avxvnni");
        return with_bits(j.bits, [&](auto bits) {
            decode_tiles_i16_with<decltype(bits)::value, i16_gfni_vnni::KernelI8>(j, t0, t1);
        });
    }
    note_kernel("decode_i16_gfni_avxvnni");
    with_bits(j.bits,
              [&](auto bits) { decode_tiles_i16_with<decltype(bits)::value, i16_gfni_vnni::Kernel>(j, t0, t1); });
}

}  // namespace bitplane_detail
}  // namespace flexquant

#pragma GCC pop_options

#endif  // FLEXQUANT_AVXVNNI

#endif  // FLEXQUANT_X86

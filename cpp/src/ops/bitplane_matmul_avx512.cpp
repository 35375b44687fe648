// AVX-512 decode and GEMM kernels of y (m, n) = x̂ (m, k) · W_kᵀ over a bit-plane linear on int16
// activations (BITPLANE_ACT_I16, ops.h; formula and layout: bitplane_matmul.cpp, docs/format.md):
//
//   y[r, n] = Σ_g s_k[n,g] · xs[r,g] · Σ_{i∈g} c_k[n,i] q[r,i]  +  m_k[n,g] · Σ_{i∈g} x̂[r,i]
//
// with x̂ = xs · q, q int16. Compiled for AVX-512 F/BW/DQ/VL by the pragmas below and only called
// when cpu_features().avx512 says so. The kernels (bitplane_matmul_avx512.inc) come in three
// compilations, picked at run time: with GFNI and AVX-512 VNNI (Ice Lake, Zen 4 and later), with
// VNNI alone (Cascade Lake: the bit transpose in selects, transpose_slots512), and with neither
// (Skylake-SP: vpmaddwd + vpaddd for vpdpwssd). All three give the same output bits.
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
//
// On int8 activations (BITPLANE_ACT_I8: q = rint(x / s), s = absmax / 127; the same preparations with
// Job::qmax = 127) the VNNI compilations run int8 variants of both (template I8): vpdpbusd multiplies
// the code bytes (u8) by the activations' bytes (s8) and adds 4 products per int32 lane, with no
// split of the codes into int16 halves: the decode on Job::xb, the GEMM on quads of 16 rows' q
// (64 multiply-adds per instruction). Their int32 sums are the int16 kernels' on the same q, so the
// output bits are too; the plain compilation runs the int16 kernels on the int8 q.

#include "cpu_features.h"

#ifdef FLEXQUANT_X86

#include <immintrin.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "ops/ops.h"

// GCC 12's AVX-512 headers start their reductions from _mm512_undefined_*(), which
// -Wmaybe-uninitialized reports at every use
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// and _mm512_extracti32x4_epi32 from _mm_undefined_si128(), which -Wuninitialized reports once it is
// inlined into a lambda (prepare_i16_avx512)
#pragma GCC diagnostic ignored "-Wuninitialized"

#define FQ_INLINE inline __attribute__((always_inline))

// ---- what every variant shares: AVX-512 F/BW/DQ/VL ---------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")

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

// Word bits 16h + 2i + e -> position 16h + 8e + i of a permuted word: the order in which both the
// decode kernel's slots (WORD_ORDER_I16, in 8-slot quarters) and the GEMM's pairs hold a word.
__m512i word_permutation() {
    alignas(64) int16_t idx[32];
    for (int h = 0; h < 2; ++h)
        for (int e = 0; e < 2; ++e)
            for (int i = 0; i < 8; ++i) idx[16 * h + 8 * e + i] = static_cast<int16_t>(16 * h + 2 * i + e);
    return _mm512_load_si512(idx);
}

// One row xr (k) -> q_tmp (k_pad; natural K order, zeros past k), codes of at most qmax_f (32767 or
// 127: bitplane_act_qmax), and per group its scale s and
// Σ x̂ = s Σ q (fp64; NaN when the group holds a NaN or inf, so that y shows it), written at
// xscale[g * stride] and xsum[g * stride].
void quantize_row_i16(const float* xr, int64_t k, int64_t k_pad, int group, int64_t n_groups, int16_t* q_tmp,
                      float* xscale, double* xsum, int64_t stride, float qmax_f) {
    const __m512 qmax = _mm512_set1_ps(qmax_f), qmin = _mm512_set1_ps(-qmax_f);
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
        const float scale = _mm512_reduce_max_ps(amax) / qmax_f;
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
                         xsum + r * j.n_groups, 1, j.qmax);
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
    const __m256i quad_at = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(16));
    const int64_t per_word = j.gemm_i8 ? 8 : 16;  // int32 units (quads or pairs) of a word
    thread_local std::vector<int16_t> q_buf;
    if (q_buf.size() < static_cast<size_t>(j.k_pad)) q_buf.resize(static_cast<size_t>(j.k_pad));
    int16_t* q_tmp = q_buf.data();
    const int64_t nw = j.k_pad / 32, ng = j.n_groups;
    for (int64_t r = b0 * 16; r < b1 * 16; ++r) {
        const int64_t b = r / 16, lane = r % 16;
        if (r < j.m) {
            quantize_row_i16(x + r * k, k, j.k_pad, j.w->group_size, ng, q_tmp, xst + b * ng * 16 + lane,
                             xsumt + b * ng * 16 + lane, 16, j.qmax);
        } else {  // the last block's empty lanes: zeros (xt is not cleared; xst and xsumt are)
            std::fill(q_tmp, q_tmp + j.k_pad, int16_t(0));
        }
        // the row's 16 pairs (8 quads: its 32 permuted q as bytes, |q| <= 127, Job::gemm_i8) of each
        // word go to lane `lane` of 16 (8) consecutive 64-byte vectors
        int32_t* out = xt + b * nw * per_word * 16 + lane;
        for (int64_t s = 0; s < j.n_super; ++s) {
            const int W = super_words(j, s);
            for (int v = 0; v < 4; ++v)
                for (int L = 0; L < W; ++L) {
                    const __m512i w = _mm512_permutexvar_epi16(perm, _mm512_loadu_si512(q_tmp + j.step_base[16 * s + 4 * v + L]));
                    int32_t* at = out + (16 * s + v * W + L) * per_word * 16;
                    if (j.gemm_i8)
                        _mm256_i32scatter_epi32(at, quad_at, _mm512_cvtepi16_epi8(w), 4);
                    else
                        _mm512_i32scatter_epi32(at, pair_at, w, 4);
                }
        }
    }
}

}  // namespace bitplane_detail
}  // namespace flexquant

#pragma GCC pop_options

// ---- the kernels, one compilation per instruction set ------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,gfni,avx512vnni")
namespace flexquant {
namespace bitplane_detail {
namespace i512_gfni {
#define FQ512_GFNI 1
#define FQ512_VNNI 1
#define FQ512_NAME "avx512_gfni_vnni"
#include "ops/bitplane_matmul_avx512.inc"
#undef FQ512_NAME
#undef FQ512_VNNI
#undef FQ512_GFNI
}  // namespace i512_gfni
}  // namespace bitplane_detail
}  // namespace flexquant
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")
namespace flexquant {
namespace bitplane_detail {
namespace i512_vnni {
#define FQ512_GFNI 0
#define FQ512_VNNI 1
#define FQ512_NAME "avx512_vnni"
#include "ops/bitplane_matmul_avx512.inc"
#undef FQ512_NAME
#undef FQ512_VNNI
#undef FQ512_GFNI
}  // namespace i512_vnni
}  // namespace bitplane_detail
}  // namespace flexquant
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")
namespace flexquant {
namespace bitplane_detail {
namespace i512_plain {
#define FQ512_GFNI 0
#define FQ512_VNNI 0
#define FQ512_NAME "avx512"
#include "ops/bitplane_matmul_avx512.inc"
#undef FQ512_NAME
#undef FQ512_VNNI
#undef FQ512_GFNI
}  // namespace i512_plain

// The compilation bitplane_matmul_multi chose for the call (Job::i512), once, on its calling thread.
void decode_tiles_i16_avx512(const Job& j, int64_t t0, int64_t t1) {
    if (j.i512 == 0) return i512_gfni::decode_tiles(j, t0, t1);
    if (j.i512 == 1) return i512_vnni::decode_tiles(j, t0, t1);
    i512_plain::decode_tiles(j, t0, t1);
}

void gemm_tiles_i16_avx512(const Job& j, int64_t t0, int64_t t1) {
    if (j.i512 == 0) return i512_gfni::gemm_tiles(j, t0, t1);
    if (j.i512 == 1) return i512_vnni::gemm_tiles(j, t0, t1);
    i512_plain::gemm_tiles(j, t0, t1);
}

}  // namespace bitplane_detail
}  // namespace flexquant
#pragma GCC pop_options

#pragma GCC diagnostic pop

#endif  // FLEXQUANT_X86

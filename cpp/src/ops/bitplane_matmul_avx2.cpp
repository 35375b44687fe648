// AVX2 kernels of y (m, n) = x (m, k) · W_kᵀ over a bit-plane linear (formula and layout:
// bitplane_matmul.cpp, docs/format.md). Compiled for avx2+fma+f16c (and gfni for the *_gfni
// kernels) by the pragmas below, and only called when cpu_features() says so, so the library still
// runs on any x86-64.
//
// Every kernel turns the k planes of a row's stored 32-bit words into byte codes, then floats:
//  - AVX2, one word at a time: per plane, broadcast the word, vpshufb byte i/8 of it into byte i,
//    keep bit i%8, compare -> 0xff where set; then c = 2c - mask (Horner, MSB first): 6 ops per
//    plane and word.
//  - GFNI, 8 words at a time: load 32 bytes of each plane, transpose bytes with 3 rounds of unpacks
//    so that each qword holds one byte position of all 8 planes (zeros past k), then one
//    gf2p8affineqb per 4 qwords transposes each 8x8 bit block: byte j = bit j of the 8 plane bytes,
//    plane p at bit 7-p, i.e. c_k << (8-k). ~4 ops per word whatever k; the 2^(8-k) goes into the
//    group scale (exact).
// The 32 codes of a register are read as 8 dwords. Masking byte q in place (c & 0xff << 8q) and
// converting to float gives c · 2^(8q) for 8 activations without a shuffle; the activations were
// permuted to match (WordOrder) and, for the decode kernels, pre-scaled by 2^-8q (exact). Byte 3 is
// shifted down instead, as cvtdq2ps is signed.

#include "cpu_features.h"

#ifdef FLEXQUANT_X86

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "ops/ops.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

// The helpers are inlined into the GFNI kernels too (compiled for a superset of this target).
#define FQ_INLINE inline __attribute__((always_inline))

#include "ops/bitplane_matmul_avx2.h"

namespace flexquant {
namespace bitplane_detail {

namespace {

// Codes as floats, byte q of each dword (q = 0..3), scaled by 2^(8q) for q = 1, 2.
struct CodeFloats {
    __m256 f0, f1, f2, f3;
};
FQ_INLINE CodeFloats code_floats(__m256i c) {
    CodeFloats f;
    f.f0 = _mm256_cvtepi32_ps(_mm256_and_si256(c, _mm256_set1_epi32(0xff)));
    f.f1 = _mm256_cvtepi32_ps(_mm256_and_si256(c, _mm256_set1_epi32(0xff00)));
    f.f2 = _mm256_cvtepi32_ps(_mm256_and_si256(c, _mm256_set1_epi32(0xff0000)));
    f.f3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(c, 24));
    return f;
}

// Per-thread scratch for every kernel here (they never nest): grown, never shrunk, so a decode
// step allocates nothing once warm.
float* scratch(size_t n) {
    thread_local std::vector<float> buf;
    if (buf.size() < n) buf.resize(n);
    return buf.data();
}

int16_t* codes_scratch(size_t n) {  // the int16 GEMM's tile codes, one buffer for every bit-width
    thread_local std::vector<int16_t> buf;
    if (buf.size() < n) buf.resize(n);
    return buf.data();
}

// Per-row view parameters of a tile (as tile_params_portable, F16C conversions): scale (8,
// n_groups) = s_k * scale_mul, mins (8, n_groups) = m_k, bias (8, m) = Σ_g m_k[g] Σ_{i∈g} x[r, i].
// Rows past N get zeros.
void tile_params(const Job& j, int64_t rt, float* scale, float* mins, float* bias, float scale_mul = 1.0f) {
    const int shift = j.w->max_bits - j.bits;
    const float smul = static_cast<float>(1 << shift) * scale_mul;
    const float mmul = static_cast<float>(((1 << shift) - 1) / 2.0);
    for (int g = 0; g < 8; ++g) {
        const int64_t n = rt * 8 + g;
        float* sc = scale + g * j.n_groups;
        float* mn = mins + g * j.n_groups;
        if (n < j.w->n) {
            const uint16_t* qp = j.w->qparams + n * j.n_groups * 2;
            for (int64_t gr = 0; gr < j.n_groups; ++gr) {
                const float s = _cvtsh_ss(qp[2 * gr]), m = _cvtsh_ss(qp[2 * gr + 1]);
                sc[gr] = s * smul;
                mn[gr] = m + s * mmul;
            }
            if (bias) {
                for (int64_t r = 0; r < j.m; ++r) {
                    double acc = 0.0;
                    const double* xs = j.xsum + r * j.n_groups;
                    for (int64_t gr = 0; gr < j.n_groups; ++gr) acc += static_cast<double>(mn[gr]) * xs[gr];
                    bias[g * j.m + r] = static_cast<float>(acc);
                }
            }
        } else {
            std::fill(sc, sc + j.n_groups, 0.0f);
            std::fill(mn, mn + j.n_groups, 0.0f);
            if (bias) std::fill(bias + g * j.m, bias + (g + 1) * j.m, 0.0f);
        }
    }
}

// Decode: per row, Σ over stored words of s_k[group] · (codes · x) for M activation rows at once.
// Super-chunk outer, row inner: each plane is read as one sequential stream (8 rows x 16W bytes per
// super-chunk) that the hardware prefetchers follow; row-outer order strides 512 bytes and ran ~3x
// slower from DRAM.
template <int BITS, int M>
void decode_tile(const Job& j, int64_t rt, const float* scale, const float* bias) {
    const uint64_t pb = j.w->plane_bytes;
    const int rows = static_cast<int>(std::min<int64_t>(8, j.w->n - rt * 8));
    __m256 acc[8][M];
    for (int g = 0; g < 8; ++g)
        for (int r = 0; r < M; ++r) acc[g][r] = _mm256_setzero_ps();
    for (int64_t s = 0; s < j.n_super; ++s) {
        const int W = super_words(j, s);
        const uint8_t* sb = j.w->planes + super_offset(j, rt, s);
        for (int g = 0; g < rows; ++g) {
            const float* sc = scale + g * j.n_groups;
            const uint8_t* rb = sb + 16 * W * g;
            for (int o = 0; o < 4 * W; ++o) {
                const int64_t w = 16 * s + o;
                const CodeFloats f = code_floats(word_codes<BITS>(rb + 4 * o, pb));
                const __m256 sk = _mm256_set1_ps(sc[j.word_group[w]]);
                for (int r = 0; r < M; ++r) {
                    const float* xw = j.xp + r * j.x_stride + w * 32;
                    __m256 d = _mm256_mul_ps(f.f0, _mm256_loadu_ps(xw));
                    d = _mm256_fmadd_ps(f.f1, _mm256_loadu_ps(xw + 8), d);
                    d = _mm256_fmadd_ps(f.f2, _mm256_loadu_ps(xw + 16), d);
                    d = _mm256_fmadd_ps(f.f3, _mm256_loadu_ps(xw + 24), d);
                    acc[g][r] = _mm256_fmadd_ps(sk, d, acc[g][r]);
                }
            }
        }
    }
    for (int g = 0; g < rows; ++g)
        for (int r = 0; r < M; ++r) j.y[r * j.w->n + rt * 8 + g] = hsum(acc[g][r]) + bias[g * M + r];
}

template <int BITS>
void decode_tile_m(const Job& j, int64_t rt, const float* scale, const float* bias) {
    switch (j.m) {
        case 1: return decode_tile<BITS, 1>(j, rt, scale, bias);
        case 2: return decode_tile<BITS, 2>(j, rt, scale, bias);
        case 3: return decode_tile<BITS, 3>(j, rt, scale, bias);
        case 4: return decode_tile<BITS, 4>(j, rt, scale, bias);
        default: break;
    }
    // More rows than the unrolled kernels: run them 4 at a time on shifted views of the job.
    for (int64_t r0 = 0; r0 < j.m; r0 += 4) {
        Job sub = j;
        sub.m = std::min<int64_t>(4, j.m - r0);
        sub.xp = j.xp + r0 * j.x_stride;
        sub.y = j.y + r0 * j.w->n;
        std::vector<float> b(8 * sub.m);
        for (int g = 0; g < 8; ++g)
            for (int64_t r = 0; r < sub.m; ++r) b[g * sub.m + r] = bias[g * j.m + r0 + r];
        decode_tile_m<BITS>(sub, rt, scale, b.data());
    }
}

// One stored word of a row dequantized to d (32), W_k = s_k c_k + m_k, in DWORD order.
template <int BITS>
FQ_INLINE void dequantize_word(const uint8_t* p, uint64_t pb, const float* sc, const float* mn, int group, float* d) {
    const CodeFloats f = code_floats(word_codes<BITS>(p, pb));
    const float s0 = sc[group];
    const __m256 sk = _mm256_set1_ps(s0), mk = _mm256_set1_ps(mn[group]);
    _mm256_storeu_ps(d, _mm256_fmadd_ps(f.f0, sk, mk));
    _mm256_storeu_ps(d + 8, _mm256_fmadd_ps(f.f1, _mm256_set1_ps(s0 * (1.0f / 256)), mk));
    _mm256_storeu_ps(d + 16, _mm256_fmadd_ps(f.f2, _mm256_set1_ps(s0 * (1.0f / 65536)), mk));
    _mm256_storeu_ps(d + 24, _mm256_fmadd_ps(f.f3, sk, mk));
}

// Dequantize the 8 rows of tile rt to out (8, k_pad), fp32 W_k in the permuted (DWORD) order.
// Super-chunk outer, row inner, as in the decode kernels: the planes stream sequentially.
template <int BITS>
void dequantize_tile(const Job& j, int64_t rt, const float* scale, const float* mins, float* out) {
    const uint64_t pb = j.w->plane_bytes;
    for (int64_t s = 0; s < j.n_super; ++s) {
        const int W = super_words(j, s);
        const uint8_t* sb = j.w->planes + super_offset(j, rt, s);
        for (int g = 0; g < 8; ++g) {
            const uint8_t* rb = sb + 16 * W * g;
            for (int o = 0; o < 4 * W; ++o)
                dequantize_word<BITS>(rb + 4 * o, pb, scale + g * j.n_groups, mins + g * j.n_groups,
                                      j.word_group[16 * s + o], out + g * j.k_pad + (16 * s + o) * 32);
        }
    }
}

// y[r, n0 + g] for R activation rows and 2 weight rows: R x 2 dot products over k_pad.
template <int R>
inline void dot_block(const float* const* xr, const float* w0, const float* w1, int64_t k_pad, float out[][2]) {
    __m256 a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k_pad; i += 8) {
        const __m256 v0 = _mm256_loadu_ps(w0 + i), v1 = _mm256_loadu_ps(w1 + i);
        for (int r = 0; r < R; ++r) {
            __m256 xv = _mm256_loadu_ps(xr[r] + i);
            // Keep xv in a register: GCC would otherwise fold the load into both FMAs and load it twice,
            // which made this loop load-bound (10 loads per 8 FMAs instead of 6).
            __asm__("" : "+x"(xv));
            a0[r] = _mm256_fmadd_ps(xv, v0, a0[r]);
            a1[r] = _mm256_fmadd_ps(xv, v1, a1[r]);
        }
    }
    for (int r = 0; r < R; ++r) {
        out[r][0] = hsum(a0[r]);
        out[r][1] = hsum(a1[r]);
    }
}

// The gemm path: per tile, `dequantize` (one of the dequantize_tile*) 8 rows, then dot them with
// every activation row.
template <typename Dequantize>
void gemm_tiles_with(const Job& j, int64_t t0, int64_t t1, Dequantize dequantize) {
    // The 8 dequantized rows (8 * k_pad floats) stay in L2 while every activation row streams past.
    float* scale = scratch(16 * j.n_groups + 8 * j.k_pad);
    float* mins = scale + 8 * j.n_groups;
    float* wbuf = mins + 8 * j.n_groups;
    const int64_t n = j.w->n;
    for (int64_t rt = t0; rt < t1; ++rt) {
        tile_params(j, rt, scale, mins, nullptr);
        dequantize(j, rt, scale, mins, wbuf);
        const int rows = static_cast<int>(std::min<int64_t>(8, n - rt * 8));
        for (int64_t r0 = 0; r0 < j.m; r0 += 4) {
            const int R = static_cast<int>(std::min<int64_t>(4, j.m - r0));
            const float* xr[4];
            for (int r = 0; r < R; ++r) xr[r] = j.xp + (r0 + r) * j.x_stride;
            for (int g = 0; g < rows; g += 2) {
                float out[4][2];
                const float* w0 = wbuf + g * j.k_pad;
                const float* w1 = w0 + j.k_pad;
                switch (R) {
                    case 4: dot_block<4>(xr, w0, w1, j.k_pad, out); break;
                    case 3: dot_block<3>(xr, w0, w1, j.k_pad, out); break;
                    case 2: dot_block<2>(xr, w0, w1, j.k_pad, out); break;
                    default: dot_block<1>(xr, w0, w1, j.k_pad, out); break;
                }
                for (int r = 0; r < R; ++r) {
                    float* yr = j.y + (r0 + r) * n + rt * 8 + g;
                    yr[0] = out[r][0];
                    if (g + 1 < rows) yr[1] = out[r][1];
                }
            }
        }
    }
}

template <int BITS>
void gemm_tiles(const Job& j, int64_t t0, int64_t t1) {
    gemm_tiles_with(j, t0, t1, dequantize_tile<BITS>);
}

template <int BITS>
void decode_tiles(const Job& j, int64_t t0, int64_t t1) {
    float* scale = scratch(16 * j.n_groups + 8 * j.m);
    float* mins = scale + 8 * j.n_groups;
    float* bias = mins + 8 * j.n_groups;
    for (int64_t rt = t0; rt < t1; ++rt) {
        tile_params(j, rt, scale, mins, bias);
        decode_tile_m<BITS>(j, rt, scale, bias);
    }
}

// ---- the int16 GEMM (BITPLANE_ACT_I16 on CPUs without AVX-512) ----------------------------------
//
// As the AVX-512 one (bitplane_matmul_avx512.cpp: gemm_block_i16), on 8 activation rows per ymm:
// a tile's 8 rows are decoded once to int16 codes in natural K order (word_codes, widened), and
// each vpmaddwd multiplies one weight row's broadcast pair of codes with 8 rows' pairs of q and
// adds the two products; vpaddd accumulates. 16 multiply-adds per 2 instructions, where the fp32
// GEMM does 8 per FMA, and they issue on more ports.

// Codes of tile rt's 8 rows, wbuf (8, k_pad) int16, natural K order (c_k, unshifted); U8: as bytes
// (the int8 GEMM's), wbuf (8, k_pad) uint8.
template <int BITS, bool U8>
void tile_codes_natural(const Job& j, int64_t rt, void* wbuf) {
    const uint64_t pb = j.w->plane_bytes;
    for (int64_t s = 0; s < j.n_super; ++s) {
        const int W = super_words(j, s);
        const uint8_t* sb = j.w->planes + super_offset(j, rt, s);
        for (int g = 0; g < 8; ++g) {  // rows past N are the layout's zero padding
            const uint8_t* rb = sb + 16 * W * g;
            for (int o = 0; o < 4 * W; ++o) {
                // word o = t W + jj covers K 512 s + 128 jj + 32 t
                const int64_t base = 512 * s + 128 * (o % W) + 32 * (o / W);
                const __m256i c = word_codes<BITS>(rb + 4 * o, pb);
                if constexpr (U8) {
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint8_t*>(wbuf) + g * j.k_pad + base), c);
                } else {
                    int16_t* out = static_cast<int16_t*>(wbuf) + g * j.k_pad + base;
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_cvtepu8_epi16(_mm256_castsi256_si128(c)));
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16),
                                        _mm256_cvtepu8_epi16(_mm256_extracti128_si256(c, 1)));
                }
            }
        }
    }
}

// acc += the pairwise products of a and b (vpmaddwd, vpaddd), in asm: with the intrinsics GCC 12
// computed all 8 products first, then copied every accumulator to another register and back and
// spilled one, in a loop of 16 ymm registers.
FQ_INLINE void madd_acc(__m256i& acc, __m256i a, __m256i b) {
    __m256i t;
    asm("vpmaddwd {%[b], %[a], %[t]|%[t], %[a], %[b]}\n\tvpaddd {%[t], %[acc], %[acc]|%[acc], %[acc], %[t]}"
        : [acc] "+x"(acc), [t] "=&x"(t)
        : [a] "x"(a), [b] "x"(b));
}

#ifdef FLEXQUANT_AVXVNNI
// acc += the 4 products per int32 lane of a's bytes (u8 codes) and b's (s8 activations): AVX-VNNI's
// vpdpbusd, which only the int8 GEMM runs, and only where cpu_features().avxvnni (Job::gemm_i8). In
// asm, {vex}: this code is compiled for AVX2 alone (the int16 GEMM beside it must run without
// AVX-VNNI), and the EVEX form of the instruction is AVX-512's, which AVX-VNNI CPUs lack.
FQ_INLINE void dpbusd_vex(__m256i& acc, __m256i a, __m256i b) {
    asm("%{vex%} vpdpbusd {%2, %1, %0|%0, %1, %2}" : "+x"(acc) : "x"(a), "x"(b));  // (%{ %}: literal braces)
}
#endif

// y of rows 8 b0 .. 8 (b0 + MB) - 1 (those < m) and outputs g0 .. g0 + 3 of tile rt: 4 x MB int32
// accumulators per run of words of one group (at most 8 words: |Σ| <= 256 * 255 * 32767 < 2^31),
// then scaled to fp32 by s_k · s of the group. I8 (Job::gemm_i8): quads instead of pairs, wbuf the
// code bytes and xt the quads (q[4p] .. q[4p + 3]) of 8 rows, vpdpbusd adding 4 products per lane
// (32 multiply-adds per instruction where vpmaddwd + vpaddd make 16 per two); |Σ| <= 256 * 255 * 127.
template <int MB, bool I8>
void gemm_block_i16_avx2(const Job& j, int64_t rt, int g0, int64_t b0, const void* wbuf, const float* sk,
                         const float* mk) {
    constexpr int per_word = I8 ? 8 : 16;  // int32 units (quads or pairs) of a word of 32 values
    const int64_t row = j.k_pad / 32 * per_word, ng = j.n_groups;
    const int32_t* wp = static_cast<const int32_t*>(wbuf) + g0 * row;  // (4, row) pairs / quads of codes
    const int32_t* xb = j.xt + b0 * row * 8;
    alignas(32) float facc[4][2][8];
    for (int g = 0; g < 4; ++g)
        for (int b = 0; b < MB; ++b) _mm256_store_ps(facc[g][b], _mm256_setzero_ps());
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t sg = 0; sg < j.n_seg; ++sg) {
        const int64_t p0 = per_word * static_cast<int64_t>(j.seg[3 * sg]), p1 = p0 + per_word * j.seg[3 * sg + 1];
        const int64_t grp = j.seg[3 * sg + 2];
        // named accumulators (see gemm_block_i16 in the AVX-512 file)
        __m256i a00 = zero, a01 = zero, a10 = zero, a11 = zero, a20 = zero, a21 = zero, a30 = zero, a31 = zero;
        for (int64_t p = p0; p < p1; ++p) {
            const __m256i x0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(xb + p * 8));
            const __m256i x1 = MB > 1 ? _mm256_load_si256(reinterpret_cast<const __m256i*>(xb + (row + p) * 8)) : zero;
#ifdef FLEXQUANT_AVXVNNI
#define FQ_DOT(acc, x, w) (I8 ? dpbusd_vex(acc, w, x) : madd_acc(acc, x, w))
#else
#define FQ_DOT(acc, x, w) madd_acc(acc, x, w)
#endif
#define FQ_MAC(g)                                                                     \
    {                                                                                 \
        const __m256i wv = _mm256_set1_epi32(wp[g * row + p]);                        \
        FQ_DOT(a##g##0, x0, wv);                                                      \
        if (MB > 1) FQ_DOT(a##g##1, x1, wv);                                          \
    }
            FQ_MAC(0) FQ_MAC(1) FQ_MAC(2) FQ_MAC(3)
#undef FQ_MAC
#undef FQ_DOT
        }
        const __m256 xs0 = _mm256_load_ps(j.xst + (b0 * ng + grp) * 8);
        const __m256 xs1 = MB > 1 ? _mm256_load_ps(j.xst + ((b0 + 1) * ng + grp) * 8) : _mm256_setzero_ps();
#define FQ_FLUSH1(g, b)                                                                                   \
    _mm256_store_ps(facc[g][b], _mm256_fmadd_ps(_mm256_cvtepi32_ps(a##g##b), _mm256_mul_ps(skv, xs##b),    \
                                                _mm256_load_ps(facc[g][b])));
#define FQ_FLUSH(g)                                               \
    {                                                             \
        const __m256 skv = _mm256_set1_ps(sk[(g0 + g) * ng + grp]); \
        FQ_FLUSH1(g, 0)                                           \
        if (MB > 1) FQ_FLUSH1(g, 1)                               \
    }
        FQ_FLUSH(0) FQ_FLUSH(1) FQ_FLUSH(2) FQ_FLUSH(3)
#undef FQ_FLUSH
#undef FQ_FLUSH1
    }
    // + the min term Σ_g m_k Σ x̂ (fp64), then the rows' outputs
    const int rows = static_cast<int>(std::min<int64_t>(4, j.w->n - rt * 8 - g0));
    for (int b = 0; b < MB; ++b) {
        const int64_t r0 = (b0 + b) * 8;
        const int live = static_cast<int>(std::min<int64_t>(8, j.m - r0));
        const double* xsum = j.xsumt + (b0 + b) * ng * 8;
        for (int g = 0; g < rows; ++g) {
            __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
            for (int64_t gr = 0; gr < ng; ++gr) {
                const __m256d m = _mm256_set1_pd(mk[(g0 + g) * ng + gr]);
                lo = _mm256_fmadd_pd(m, _mm256_load_pd(xsum + gr * 8), lo);
                hi = _mm256_fmadd_pd(m, _mm256_load_pd(xsum + gr * 8 + 4), hi);
            }
            alignas(32) float out[8];
            const __m256 bias = _mm256_setr_m128(_mm256_cvtpd_ps(lo), _mm256_cvtpd_ps(hi));
            _mm256_store_ps(out, _mm256_add_ps(_mm256_load_ps(facc[g][b]), bias));
            float* y = j.y + r0 * j.w->n + rt * 8 + g0 + g;
            for (int i = 0; i < live; ++i) y[i * j.w->n] = out[i];
        }
    }
}

template <int BITS, bool I8>
void gemm_tiles_i16(const Job& j, int64_t t0, int64_t t1) {
    int16_t* codes = codes_scratch(static_cast<size_t>(8 * j.k_pad));  // (int16 or, I8, the first half as bytes)
    float* sk = scratch(16 * j.n_groups);
    float* mk = sk + 8 * j.n_groups;
    // chunks of blocks outer, as the AVX-512 GEMM: a chunk's activations stay in cache
    for (int64_t c0 = 0; c0 < j.n_blocks; c0 += j.block_chunk) {
        const int64_t c1 = std::min(j.n_blocks, c0 + j.block_chunk);
        for (int64_t rt = t0; rt < t1; ++rt) {
            tile_codes_natural<BITS, I8>(j, rt, codes);
            tile_factors(j, rt, 1.0f, sk, mk);
            for (int g0 = 0; g0 < 8 && rt * 8 + g0 < j.w->n; g0 += 4)
                for (int64_t b = c0; b < c1; b += 2) {
                    if (c1 - b >= 2)
                        gemm_block_i16_avx2<2, I8>(j, rt, g0, b, codes, sk, mk);
                    else
                        gemm_block_i16_avx2<1, I8>(j, rt, g0, b, codes, sk, mk);
                }
        }
    }
}

// The largest |x| of xr[i0, i1), as std::max(amax, |x|) element by element (max_ps returns its second
// operand when either is NaN: NaN never wins); with `bad`, also whether any element is NaN or inf.
// The group scale of BITPLANE_ACT_I16's rounding: quantize_i16_avx2 and prepare_i16_gemm_avx2.
float group_absmax(const float* xr, int64_t i0, int64_t i1, bool* bad) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 big = _mm256_set1_ps(3.40282347e38f);  // FLT_MAX: |x| <= it <=> x finite
    __m256 am = _mm256_setzero_ps();
    __m256 nonfinite = _mm256_setzero_ps();
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
        const __m256 a = _mm256_and_ps(_mm256_loadu_ps(xr + i), abs_mask);
        am = _mm256_max_ps(a, am);
        if (bad) nonfinite = _mm256_or_ps(nonfinite, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, am);
    float amax = 0.0f;
    for (float v : lanes) amax = std::max(amax, v);
    bool any_bad = _mm256_movemask_ps(nonfinite) != 0;
    for (; i < i1; ++i) {
        amax = std::max(amax, std::fabs(xr[i]));
        any_bad |= !std::isfinite(xr[i]);
    }
    if (bad) *bad = any_bad;
    return amax;
}

}  // namespace

void quantize_i16_avx2(const float* x, int64_t m, int64_t k, int group, float* xhat, float qmax_f) {
    const int64_t n_groups = (k + group - 1) / group;
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 qmax = _mm256_set1_ps(qmax_f), qmin = _mm256_set1_ps(-qmax_f);
    const __m256 big = _mm256_set1_ps(3.40282347e38f);  // FLT_MAX: |x| <= it <=> x finite
    for (int64_t r = 0; r < m; ++r) {
        for (int64_t g = 0; g < n_groups; ++g) {
            const int64_t i0 = g * group, i1 = std::min<int64_t>(k, i0 + group);
            const float* xr = x + r * k;
            float* out = xhat + r * k;
            const float scale = group_absmax(xr, i0, i1, nullptr) / qmax_f;
            int64_t i;
            const __m256 sv = _mm256_set1_ps(scale);
            const bool any = scale > 0.0f;
            for (i = i0; i + 8 <= i1; i += 8) {
                const __m256 xv = _mm256_loadu_ps(xr + i);
                __m256 v = _mm256_setzero_ps();
                if (any) {  // max(NaN, -qmax) = -qmax, as std::max(-qmax, NaN)
                    v = _mm256_round_ps(_mm256_div_ps(xv, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    v = _mm256_min_ps(_mm256_max_ps(v, qmin), qmax);
                }
                const __m256 finite = _mm256_cmp_ps(_mm256_and_ps(xv, abs_mask), big, _CMP_LE_OQ);
                _mm256_storeu_ps(out + i, _mm256_blendv_ps(xv, _mm256_mul_ps(sv, v), finite));
            }
            for (; i < i1; ++i) out[i] = round_i16(xr[i], scale, qmax_f);
        }
    }
}

// One row xr (k) -> q (k_pad int16, natural K order, zeros past k), and per group its scale s =
// absmax / qmax_f (32767, or 127: bitplane_act_qmax) and Σ x̂ = s Σ q (fp64; NaN when the group holds
// a NaN or inf, so that y shows it), written at xscale[g * stride] and xsum[g * stride]. The rounding
// of bitplane_round_i16. The int16 GEMM's and decode's preparation.
void quantize_row_i16_avx2(const float* xr, int64_t k, int64_t k_pad, int group, int64_t n_groups, int16_t* q,
                           float* xscale, double* xsum, int64_t stride, float qmax_f) {
    const __m256 qmax = _mm256_set1_ps(qmax_f), qmin = _mm256_set1_ps(-qmax_f);
    std::fill(q + k, q + k_pad, int16_t(0));
    for (int64_t g = 0; g < n_groups; ++g) {
        const int64_t i0 = g * group, i1 = std::min<int64_t>(k, i0 + group);
        bool bad = false;
        const float scale = group_absmax(xr, i0, i1, &bad) / qmax_f;
        int64_t qsum = 0;
        int64_t i = i0;
        if (scale > 0.0f) {
            const __m256 sv = _mm256_set1_ps(scale);
            __m256i acc = _mm256_setzero_si256();  // |Σ| < 2^15 · 32767 per lane between flushes
            int64_t n_acc = 0;
            auto flush = [&] {
                alignas(32) int32_t t[8];
                _mm256_store_si256(reinterpret_cast<__m256i*>(t), acc);
                for (int32_t v : t) qsum += v;
                acc = _mm256_setzero_si256();
                n_acc = 0;
            };
            for (; i + 8 <= i1; i += 8) {
                // max(qmin, NaN) is NaN, which converts to INT_MIN and packs to -32768: a NaN group's
                // q are garbage, and its Σ x̂ is NaN
                const __m256 t = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xr + i), sv),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                const __m256i qi = _mm256_cvtps_epi32(_mm256_min_ps(qmax, _mm256_max_ps(qmin, t)));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i),
                                 _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1)));
                acc = _mm256_add_epi32(acc, qi);
                if (++n_acc == (1 << 15)) flush();
            }
            flush();
            for (; i < i1; ++i) {
                q[i] = static_cast<int16_t>(q_i16(xr[i], scale, qmax_f));  // (scale > 0 here)
                qsum += q[i];
            }
        } else {
            std::fill(q + i0, q + i1, int16_t(0));
        }
        xscale[g * stride] = scale;
        xsum[g * stride] =
            bad ? std::numeric_limits<double>::quiet_NaN() : static_cast<double>(scale) * static_cast<double>(qsum);
    }
}

void prepare_i16_gemm_avx2(const Job& j, const float* x, int64_t k, int64_t b0, int64_t b1, int32_t* xt,
                           float* xst, double* xsumt) {
    const int64_t ng = j.n_groups, half = j.k_pad / 2, quarter = j.k_pad / 4;
    thread_local std::vector<int16_t> q_buf;  // (k_pad) q (natural K order)
    if (q_buf.size() < static_cast<size_t>(j.k_pad)) q_buf.resize(static_cast<size_t>(j.k_pad));
    int16_t* q = q_buf.data();
    for (int64_t r = b0 * 8; r < b1 * 8; ++r) {
        const int64_t b = r / 8, lane = r % 8;
        if (r < j.m)
            quantize_row_i16_avx2(x + r * k, k, j.k_pad, j.w->group_size, ng, q, xst + b * ng * 8 + lane,
                                  xsumt + b * ng * 8 + lane, 8, j.qmax);
        else  // the last block's empty lanes: zeros (xst and xsumt were zeroed by the caller)
            std::fill(q, q + j.k_pad, int16_t(0));
        if (j.gemm_i8) {
            // quads (q[4p] .. q[4p + 3]) as one int32 of bytes (|q| <= 127), to lane `lane` of quad p's
            // vector
            int32_t* out = xt + b * quarter * 8 + lane;
            for (int64_t p = 0; p < quarter; ++p) {
                uint32_t quad = 0;
                for (int e = 0; e < 4; ++e) quad |= static_cast<uint32_t>(static_cast<uint8_t>(q[4 * p + e])) << (8 * e);
                out[p * 8] = static_cast<int32_t>(quad);
            }
            continue;
        }
        // pairs (q[2p], q[2p+1]) as one int32, to lane `lane` of pair p's vector
        int32_t* out = xt + b * half * 8 + lane;
        for (int64_t p = 0; p < half; ++p) {
            int32_t pair;
            std::memcpy(&pair, q + 2 * p, 4);
            out[p * 8] = pair;
        }
    }
}

void gemm_tiles_i16_avx2(const Job& j, int64_t t0, int64_t t1) {
#ifdef FLEXQUANT_AVXVNNI
    if (j.gemm_i8) {  // BITPLANE_ACT_I8 with AVX-VNNI: code bytes against int8 activations (vpdpbusd)
        note_kernel("gemm_i8_avx2_avxvnni");
        return with_bits(j.bits, [&](auto bits) { gemm_tiles_i16<decltype(bits)::value, true>(j, t0, t1); });
    }
#endif
    note_kernel("gemm_i16_avx2");
    with_bits(j.bits, [&](auto bits) { gemm_tiles_i16<decltype(bits)::value, false>(j, t0, t1); });
}

void decode_tiles_avx2(const Job& j, int64_t t0, int64_t t1) {
    note_kernel("decode_avx2");
    with_bits(j.bits, [&](auto bits) { decode_tiles<decltype(bits)::value>(j, t0, t1); });
}

void gemm_tiles_avx2(const Job& j, int64_t t0, int64_t t1) {
    note_kernel("gemm_avx2");
    with_bits(j.bits, [&](auto bits) { gemm_tiles<decltype(bits)::value>(j, t0, t1); });
}

}  // namespace bitplane_detail
}  // namespace flexquant

#pragma GCC pop_options

// ---- GFNI kernels ------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,gfni")

namespace flexquant {
namespace bitplane_detail {

namespace {

// The first two transpose stages over P[i], 32 bytes of plane i (zero past BITS): B[i] and B[4 + i]
// hold, per 128-bit lane (16 byte positions b), planes 0-3 and 4-7 of b = 4i .. 4i+3, one dword
// per b.
template <int BITS>
FQ_INLINE void unpack_planes(const __m256i P[8], __m256i B[8]) {
    const __m256i z = _mm256_setzero_si256();
    __m256i A[8];
    for (int i = 0; i < 4; ++i) {  // planes 2i, 2i+1 paired per b: A[2i] b 0-7, A[2i+1] b 8-15
        A[2 * i] = 2 * i < BITS ? _mm256_unpacklo_epi8(P[2 * i], P[2 * i + 1]) : z;
        A[2 * i + 1] = 2 * i < BITS ? _mm256_unpackhi_epi8(P[2 * i], P[2 * i + 1]) : z;
    }
    for (int i = 0; i < 2; ++i) {  // i = 0: planes 0-3, i = 1: planes 4-7
        const bool any = 4 * i < BITS;
        B[4 * i + 0] = any ? _mm256_unpacklo_epi16(A[4 * i], A[4 * i + 2]) : z;      // b 0-3
        B[4 * i + 1] = any ? _mm256_unpackhi_epi16(A[4 * i], A[4 * i + 2]) : z;      // b 4-7
        B[4 * i + 2] = any ? _mm256_unpacklo_epi16(A[4 * i + 1], A[4 * i + 3]) : z;  // b 8-11
        B[4 * i + 3] = any ? _mm256_unpackhi_epi16(A[4 * i + 1], A[4 * i + 3]) : z;  // b 12-15
    }
}

// unpack_planes of 8 consecutive stored words of a row (their planes at p, p + pb, ...): lane 0
// holds words 0-3, lane 1 words 4-7.
template <int BITS>
FQ_INLINE void transpose_planes(const uint8_t* p, uint64_t pb, __m256i B[8]) {
    __m256i P[8];
    for (int i = 0; i < 8; ++i)
        P[i] = i < BITS ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i * pb)) : _mm256_setzero_si256();
    unpack_planes<BITS>(P, B);
}

// The last stage for v < 4: the codes, shifted left by 8 - BITS, of words v (low lane) and v + 4
// (high lane) of the batch: c[h] byte β of a lane = the code of weight 16h + β of that word.
// Qword b of unpack(B[v], B[4 + v]) holds the 8 plane bytes of byte position b; byte j of `sel`
// picks bit j of each, so gf2p8affineqb writes the 8x8 bit transpose: out bit i = bit j of plane
// 7 - i.
FQ_INLINE void batch_codes(const __m256i B[8], int v, __m256i c[2]) {
    const __m256i sel = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
    c[0] = _mm256_gf2p8affine_epi64_epi8(sel, _mm256_unpacklo_epi32(B[v], B[4 + v]), 0);
    c[1] = _mm256_gf2p8affine_epi64_epi8(sel, _mm256_unpackhi_epi32(B[v], B[4 + v]), 0);
}

// Σ codes · x over one register pair of codes (64 weights) for M activation rows into d; xb points
// at the pair's 64 slots of row 0. Two chains of 4 FMAs, so the latency hides behind the next pair.
template <int M>
FQ_INLINE void dot_pair(const __m256i c[2], const float* xb, int64_t x_stride, __m256 d[M]) {
    const CodeFloats f0 = code_floats(c[0]), f1 = code_floats(c[1]);
    for (int r = 0; r < M; ++r) {
        const float* x = xb + r * x_stride;
        __m256 a = _mm256_mul_ps(f0.f0, _mm256_loadu_ps(x));
        __m256 b = _mm256_mul_ps(f1.f0, _mm256_loadu_ps(x + 32));
        a = _mm256_fmadd_ps(f0.f1, _mm256_loadu_ps(x + 8), a);
        b = _mm256_fmadd_ps(f1.f1, _mm256_loadu_ps(x + 40), b);
        a = _mm256_fmadd_ps(f0.f2, _mm256_loadu_ps(x + 16), a);
        b = _mm256_fmadd_ps(f1.f2, _mm256_loadu_ps(x + 48), b);
        a = _mm256_fmadd_ps(f0.f3, _mm256_loadu_ps(x + 24), a);
        b = _mm256_fmadd_ps(f1.f3, _mm256_loadu_ps(x + 56), b);
        d[r] = _mm256_add_ps(a, b);
    }
}

// Decode with GFNI. `scale` holds s_k * 2^(k-8), the factor that undoes the codes' << (8 - k).
template <int BITS, int M>
void decode_tile_gfni(const Job& j, int64_t rt, const float* scale, const float* bias) {
    const uint64_t pb = j.w->plane_bytes;
    const int rows = static_cast<int>(std::min<int64_t>(8, j.w->n - rt * 8));
    const int32_t* wg = j.word_group;
    // Super-chunk outer, row inner: each plane is then read as one sequential stream (8 rows x 64
    // bytes per super-chunk), which the hardware prefetchers follow; row-outer order strides 512
    // bytes and ran ~3x slower from DRAM.
    __m256 acc[8][M];
    for (int g = 0; g < 8; ++g)
        for (int r = 0; r < M; ++r) acc[g][r] = _mm256_setzero_ps();
    for (int64_t s = 0; s < j.n_super; ++s) {
        const int words = 4 * super_words(j, s);
        const uint8_t* sb = j.w->planes + super_offset(j, rt, s);
        const int64_t ws = 16 * s;
        for (int g = 0; g < rows; ++g) {
            const float* sc = scale + g * j.n_groups;
            const uint8_t* rb = sb + 4 * words * g;
            for (int o = 0; o + 8 <= words; o += 8) {
                __m256i B[8];
                transpose_planes<BITS>(rb + 4 * o, pb, B);
                const int64_t w0 = ws + o;
                for (int v = 0; v < 4; ++v) {
                    __m256i c[2];
                    batch_codes(B, v, c);
                    __m256 d[M];
                    dot_pair<M>(c, j.xp + w0 * 32 + v * 64, j.x_stride, d);
                    // Words v and v + 4 are (t, j) and (t + 1, j): one group unless G is 32 or not a
                    // multiple of 64.
                    const int ga = wg[w0 + v], gb = wg[w0 + v + 4];
                    const __m256 sk = ga == gb ? _mm256_set1_ps(sc[ga]) : lane_pair(sc[ga], sc[gb]);
                    for (int r = 0; r < M; ++r) acc[g][r] = _mm256_fmadd_ps(sk, d[r], acc[g][r]);
                }
            }
        }
        if (words % 8) {
            // A short last super-chunk leaves 4 words per row after the 8-word batches: transpose them
            // for two rows at once, row g in the low lane and row g + 1 in the high one (the x slots after
            // k_pad hold their activations twice, once per lane).
            const int o = words - 4;
            const float* xt = j.xp + j.k_pad;
            for (int g = 0; g < rows; g += 2) {
                const uint8_t* ra = sb + 4 * words * g + 4 * o;
                __m256i P[8];
                for (int i = 0; i < 8; ++i)
                    P[i] = i < BITS ? _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(ra + i * pb + 4 * words),
                                                          reinterpret_cast<const __m128i*>(ra + i * pb))
                                    : _mm256_setzero_si256();
                __m256i B[8];
                unpack_planes<BITS>(P, B);
                const float* sa = scale + g * j.n_groups;
                const float* sb2 = scale + (g + 1) * j.n_groups;  // past N: zeros (tile_params)
                __m256 pair[M];
                for (int r = 0; r < M; ++r) pair[r] = _mm256_setzero_ps();
                for (int v = 0; v < 4; ++v) {
                    __m256i c[2];
                    batch_codes(B, v, c);
                    __m256 d[M];
                    dot_pair<M>(c, xt + v * 64, j.x_stride, d);
                    const int gr = wg[ws + o + v];
                    for (int r = 0; r < M; ++r) pair[r] = _mm256_fmadd_ps(lane_pair(sa[gr], sb2[gr]), d[r], pair[r]);
                }
                // Low lanes belong to row g, high lanes to row g + 1.
                for (int r = 0; r < M; ++r) {
                    acc[g][r] = _mm256_add_ps(acc[g][r], _mm256_blend_ps(pair[r], _mm256_setzero_ps(), 0xf0));
                    if (g + 1 < 8)
                        acc[g + 1][r] =
                            _mm256_add_ps(acc[g + 1][r], _mm256_blend_ps(pair[r], _mm256_setzero_ps(), 0x0f));
                }
            }
        }
    }
    for (int g = 0; g < rows; ++g)
        for (int r = 0; r < M; ++r) j.y[r * j.w->n + rt * 8 + g] = hsum(acc[g][r]) + bias[g * M + r];
}

template <int BITS>
void decode_tile_gfni_m(const Job& j, int64_t rt, const float* scale, const float* bias) {
    switch (j.m) {
        case 1: return decode_tile_gfni<BITS, 1>(j, rt, scale, bias);
        case 2: return decode_tile_gfni<BITS, 2>(j, rt, scale, bias);
        case 3: return decode_tile_gfni<BITS, 3>(j, rt, scale, bias);
        case 4: return decode_tile_gfni<BITS, 4>(j, rt, scale, bias);
        default: break;
    }
    for (int64_t r0 = 0; r0 < j.m; r0 += 4) {  // as decode_tile_m
        Job sub = j;
        sub.m = std::min<int64_t>(4, j.m - r0);
        sub.xp = j.xp + r0 * j.x_stride;
        sub.y = j.y + r0 * j.w->n;
        float b[8 * 4];
        for (int g = 0; g < 8; ++g)
            for (int64_t r = 0; r < sub.m; ++r) b[g * sub.m + r] = bias[g * j.m + r0 + r];
        decode_tile_gfni_m<BITS>(sub, rt, scale, b);
    }
}

template <int BITS>
void decode_tiles_gfni_bits(const Job& j, int64_t t0, int64_t t1) {
    float* scale = scratch(16 * j.n_groups + 8 * j.m);
    float* mins = scale + 8 * j.n_groups;
    float* bias = mins + 8 * j.n_groups;
    for (int64_t rt = t0; rt < t1; ++rt) {
        tile_params(j, rt, scale, mins, bias, 1.0f / static_cast<float>(1 << (8 - BITS)));
        decode_tile_gfni_m<BITS>(j, rt, scale, bias);
    }
}

// As dequantize_tile, in WORD_ORDER_GFNI. `scale` holds s_k (unshifted).
template <int BITS>
void dequantize_tile_gfni(const Job& j, int64_t rt, const float* scale, const float* mins, float* out) {
    const uint64_t pb = j.w->plane_bytes;
    const float shifted = 1.0f / static_cast<float>(1 << (8 - BITS));  // undoes c_k << (8 - k)
    for (int64_t s = 0; s < j.n_super; ++s) {
        const int words = 4 * super_words(j, s);
        const uint8_t* sb = j.w->planes + super_offset(j, rt, s);
        for (int g = 0; g < 8; ++g) {
            const float* sc = scale + g * j.n_groups;
            const float* mn = mins + g * j.n_groups;
            float* row = out + g * j.k_pad;
            const uint8_t* rb = sb + 4 * words * g;
            int o = 0;
            for (; o + 8 <= words; o += 8) {
                __m256i B[8];
                transpose_planes<BITS>(rb + 4 * o, pb, B);
                const int64_t w0 = 16 * s + o;
                for (int v = 0; v < 4; ++v) {
                    __m256i C[2];
                    batch_codes(B, v, C);
                    const int ga = j.word_group[w0 + v], gb = j.word_group[w0 + v + 4];
                    const float sa = sc[ga] * shifted, sb2 = sc[gb] * shifted;
                    const __m256 s0 = lane_pair(sa, sb2), s1 = lane_pair(sa * (1.0f / 256), sb2 * (1.0f / 256));
                    const __m256 s2 = lane_pair(sa * (1.0f / 65536), sb2 * (1.0f / 65536)),
                                 mk = lane_pair(mn[ga], mn[gb]);
                    for (int h = 0; h < 2; ++h) {
                        const CodeFloats f = code_floats(C[h]);
                        float* d = row + w0 * 32 + v * 64 + h * 32;
                        _mm256_storeu_ps(d, _mm256_fmadd_ps(f.f0, s0, mk));
                        _mm256_storeu_ps(d + 8, _mm256_fmadd_ps(f.f1, s1, mk));
                        _mm256_storeu_ps(d + 16, _mm256_fmadd_ps(f.f2, s2, mk));
                        _mm256_storeu_ps(d + 24, _mm256_fmadd_ps(f.f3, s0, mk));
                    }
                }
            }
            for (; o < words; ++o)
                dequantize_word<BITS>(rb + 4 * o, pb, sc, mn, j.word_group[16 * s + o], row + (16 * s + o) * 32);
        }
    }
}

template <int BITS>
void gemm_tiles_gfni_bits(const Job& j, int64_t t0, int64_t t1) {
    gemm_tiles_with(j, t0, t1, dequantize_tile_gfni<BITS>);
}

}  // namespace

void decode_tiles_gfni(const Job& j, int64_t t0, int64_t t1) {
    note_kernel("decode_gfni");
    with_bits(j.bits, [&](auto bits) { decode_tiles_gfni_bits<decltype(bits)::value>(j, t0, t1); });
}

void gemm_tiles_gfni(const Job& j, int64_t t0, int64_t t1) {
    note_kernel("gemm_gfni");
    with_bits(j.bits, [&](auto bits) { gemm_tiles_gfni_bits<decltype(bits)::value>(j, t0, t1); });
}

}  // namespace bitplane_detail
}  // namespace flexquant

#pragma GCC pop_options

#endif  // FLEXQUANT_X86

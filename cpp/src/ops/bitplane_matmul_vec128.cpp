// The 128-bit decode kernel of y (m, n) = x̂ (m, k) · W_kᵀ over a bit-plane linear on int16 activations
// (BITPLANE_ACT_I16, ops.h; formula and layout: bitplane_matmul.cpp, docs/format.md), for CPUs without
// AVX2: AArch64 (NEON, which every AArch64 CPU has: Apple M1 and later, Graviton, Ampere, Raspberry
// Pi 4/5) and x86-64's baseline SSE2:
//
//   y[r, n] = Σ_g s_k[n,g] · xs[r,g] · Σ_{i∈g} c_k[n,i] q[r,i]  +  m_k[n,g] · Σ_{i∈g} x̂[r,i]
//
// with x̂ = xs · q, q int16. Before it those CPUs ran the portable kernel on x̂ as fp32, a table
// lookup per plane byte (decode_tiles_portable): on x86-64 capped to SSE2, 4096 x 4096 at 8 bits took
// 2.5x this kernel's time (and 4.6x the AVX2 one's; docs/kernels.md, stop 30).
//
// Written once in GCC/Clang vector extensions (16-byte vectors; the compiler emits NEON or SSE2),
// with target-specific code where they have no form: dot4 (vpmaddwd's pair sums: pmaddwd on SSE2,
// smull / smlal and addp on NEON) and NEON's bit select (bsl). It is the AVX2 int16 shift kernel
// (bitplane_matmul_avx2_i16.inc) on one 128-bit lane: a batch is 4 consecutive stored words of a row
// (lane L of a super-chunk: 16 bytes of each plane); the 8 planes' vectors are transposed in delta
// swaps across them (transpose_slots: then vector j byte b is the code of weight j of byte position
// b), two stages of unpacks gather each qword's 8 codes, and step v takes word 4L + v: 32 codes as 4
// vectors of 8 int16 (even / odd bytes of each half), multiplied with the activations' slots of
// WORD_ORDER_I16 (the AVX kernels' layout; filled here by prepare_i16_portable) into 4 int32 sums of
// 8 products each, exact (|Σ| <= 8 · 255 · 32767 < 2^31), which become fp32 once per step, times
// 2^(k-8) s_k · xs of the word's group.
//
// The GEMM of prompts (gemm_tiles_vec128, at the end) is fp32 on either activations (x̂ on int16 ones):
// each tile of 8 weight rows is dequantized from the same transpose, then dotted with blocks of
// activation rows in 4-lane sums. fp32 rather than int16 products because NEON multiplies 4 lanes per
// instruction either way (fmla, smlal) and fp32 needs no per-group scaling of the sums. On SSE2 (no
// FMA) the multiplies and adds bound it, not the loads: blocks of 1, 2, 3 or 4 activation rows ran
// within 20% of each other, 2 the fastest (docs/kernels.md, stop 31).

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_features.h"
#include "fp16.h"
#include "ops/ops.h"
#include "ops/vec128.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace flexquant {
namespace bitplane_detail {

namespace {

using namespace vec128;

#define FQ_INLINE inline __attribute__((always_inline))

// Two-source shuffle with constant indices (0 .. 2n-1 over a then b): Clang's builtin, or GCC's.
#if defined(__clang__)
#define FQ_SHUFFLE(T, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define FQ_SHUFFLE(T, a, b, ...) __builtin_shuffle(a, b, T{__VA_ARGS__})
#endif

// Σ over the 4 (codes, activations) pairs of vpmaddwd's pair sums: lane u = Σ_pairs a[2u] b[2u] +
// a[2u+1] b[2u+1], 8 products (int32, exact: the codes are 0 .. 255, the activations int16). SSE2:
// pmaddwd and paddd. NEON: smull / smlal into the int16 lanes' own sums (0-3 and 4-7, 2 instructions
// per 8 products), then addp adds lanes 2u and 2u + 1: the same 8 products per lane, so the same sums.
FQ_INLINE i32x4 dot4(i16x8 a0, i16x8 a1, i16x8 a2, i16x8 a3, i16x8 b0, i16x8 b1, i16x8 b2, i16x8 b3) {
#if defined(__SSE2__)
    const auto madd = [](i16x8 a, i16x8 b) {
        return reinterpret_cast<i32x4>(_mm_madd_epi16(reinterpret_cast<__m128i>(a), reinterpret_cast<__m128i>(b)));
    };
    return (madd(a0, b0) + madd(a1, b1)) + (madd(a2, b2) + madd(a3, b3));
#elif defined(__aarch64__) && defined(__ARM_NEON)
    const auto v = [](i16x8 x) { return reinterpret_cast<int16x8_t>(x); };
    int32x4_t lo = vmull_s16(vget_low_s16(v(a0)), vget_low_s16(v(b0)));
    int32x4_t hi = vmull_high_s16(v(a0), v(b0));
    lo = vmlal_s16(lo, vget_low_s16(v(a1)), vget_low_s16(v(b1)));
    hi = vmlal_high_s16(hi, v(a1), v(b1));
    lo = vmlal_s16(lo, vget_low_s16(v(a2)), vget_low_s16(v(b2)));
    hi = vmlal_high_s16(hi, v(a2), v(b2));
    lo = vmlal_s16(lo, vget_low_s16(v(a3)), vget_low_s16(v(b3)));
    hi = vmlal_high_s16(hi, v(a3), v(b3));
    return reinterpret_cast<i32x4>(vpaddq_s32(lo, hi));
#else
    const i16x8 a[4] = {a0, a1, a2, a3}, b[4] = {b0, b1, b2, b3};
    i32x4 r = {0, 0, 0, 0};
    for (int t = 0; t < 4; ++t)
        for (int u = 0; u < 4; ++u)
            r[u] += int32_t(a[t][2 * u]) * int32_t(b[t][2 * u]) + int32_t(a[t][2 * u + 1]) * int32_t(b[t][2 * u + 1]);
    return r;
#endif
}

// The plane in slot i of the transpose: vector 7 - p holds plane p, so that plane p ends at bit 7 - p
// of the code byte (codes shifted left by 8 - k, as in the AVX kernels).
constexpr int plane_in_slot(int i) {
    return 7 - i;
}
template <int BITS>
constexpr bool slot_live(int i) {
    return plane_in_slot(i) < BITS;
}
// Slot r's vector is live at transpose stage `stage` (0: as loaded): a swap with a live partner makes
// it live. Known-zero vectors cost nothing, so fewer planes cost fewer instructions.
template <int BITS>
constexpr bool live_at(int stage, int r) {
    return stage == 0 ? slot_live<BITS>(r)
                      : live_at<BITS>(stage - 1, r) || live_at<BITS>(stage - 1, r ^ (1 << (stage - 1)));
}

// One delta swap of stage STAGE (S = 2^(STAGE-1)): in every byte, bit j + S of slot A <-> bit j of
// slot B = A + S, for the bits j in `mask` (0x55, 0x33, 0x0f per byte; the 16-bit shifts carry bits
// across bytes only where the mask drops them).
template <int BITS, int STAGE, int A>
FQ_INLINE void delta_swap(u16x8 M[8], u16x8 mask) {
    constexpr int S = 1 << (STAGE - 1), B = A + S;
    constexpr bool la = live_at<BITS>(STAGE - 1, A), lb = live_at<BITS>(STAGE - 1, B);
    if constexpr (la && lb) {
#if defined(__aarch64__) && defined(__ARM_NEON)
        // NEON's bit select (bsl) makes each side one select: 4 ops instead of 6 (GCC does not find it
        // in the xor form below)
        const uint16x8_t a = reinterpret_cast<uint16x8_t>(M[A]), b = reinterpret_cast<uint16x8_t>(M[B]);
        const uint16x8_t mk = reinterpret_cast<uint16x8_t>(mask);
        M[B] = reinterpret_cast<u16x8>(vbslq_u16(mk, vshrq_n_u16(a, S), b));
        M[A] = reinterpret_cast<u16x8>(vbslq_u16(mk, a, vshlq_n_u16(b, S)));
#else
        const u16x8 t = ((M[A] >> S) ^ M[B]) & mask;
        M[B] ^= t;
        M[A] ^= t << S;
#endif
    } else if constexpr (lb) {
        M[A] = (M[B] & mask) << S;
        M[B] &= ~mask;
    } else if constexpr (la) {
        M[B] = (M[A] >> S) & mask;
        M[A] &= ~(mask << S);
    }
}

// The 8x8 bit transpose of every byte position across the 8 slot vectors, in place: afterwards bit i
// of byte b of M[j] is bit j of byte b of slot i, i.e. M[j] byte b is the code of weight j of byte
// position b.
template <int BITS>
FQ_INLINE void transpose_slots(u16x8 M[8]) {
    const u16x8 m1 = u16x8{} + 0x5555, m2 = u16x8{} + 0x3333, m3 = u16x8{} + 0x0f0f;
    delta_swap<BITS, 1, 0>(M, m1);
    delta_swap<BITS, 1, 2>(M, m1);
    delta_swap<BITS, 1, 4>(M, m1);
    delta_swap<BITS, 1, 6>(M, m1);
    delta_swap<BITS, 2, 0>(M, m2);
    delta_swap<BITS, 2, 1>(M, m2);
    delta_swap<BITS, 2, 4>(M, m2);
    delta_swap<BITS, 2, 5>(M, m2);
    delta_swap<BITS, 3, 0>(M, m3);
    delta_swap<BITS, 3, 1>(M, m3);
    delta_swap<BITS, 3, 2>(M, m3);
    delta_swap<BITS, 3, 3>(M, m3);
}

// The x86 unpacks on 16 bytes: interleave the low / high halves of a and b, by bytes, int16 or int32.
FQ_INLINE u8x16 unpacklo8(u8x16 a, u8x16 b) {
    return FQ_SHUFFLE(u8x16, a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
}
FQ_INLINE u8x16 unpackhi8(u8x16 a, u8x16 b) {
    return FQ_SHUFFLE(u8x16, a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
}
FQ_INLINE u16x8 unpacklo16(u16x8 a, u16x8 b) {
    return FQ_SHUFFLE(u16x8, a, b, 0, 8, 1, 9, 2, 10, 3, 11);
}
FQ_INLINE u16x8 unpackhi16(u16x8 a, u16x8 b) {
    return FQ_SHUFFLE(u16x8, a, b, 4, 12, 5, 13, 6, 14, 7, 15);
}
FQ_INLINE u32x4 unpacklo32(u32x4 a, u32x4 b) {
    return FQ_SHUFFLE(u32x4, a, b, 0, 4, 1, 5);
}
FQ_INLINE u32x4 unpackhi32(u32x4 a, u32x4 b) {
    return FQ_SHUFFLE(u32x4, a, b, 2, 6, 3, 7);
}

// The 16 bytes of lane L of a row's planes at p (plane i at p + i pb) -> B[8]: B[i] and B[4 + i] hold
// slots 0-3 and 4-7 of byte positions 4i .. 4i + 3, one dword per position (after the transpose the
// slots are the codes of weights 0 .. 7 of each position).
template <int BITS>
FQ_INLINE void lane_to_B(const uint8_t* p, uint64_t pb, u32x4 B[8]) {
    u16x8 P[8];
    for (int i = 0; i < 8; ++i) P[i] = slot_live<BITS>(i) ? load16<u16x8>(p + plane_in_slot(i) * pb) : u16x8{};
    transpose_slots<BITS>(P);
    u16x8 A[8];
    for (int i = 0; i < 4; ++i) {
        const u8x16 a = reinterpret_cast<u8x16>(P[2 * i]), b = reinterpret_cast<u8x16>(P[2 * i + 1]);
        A[2 * i] = reinterpret_cast<u16x8>(unpacklo8(a, b));
        A[2 * i + 1] = reinterpret_cast<u16x8>(unpackhi8(a, b));
    }
    for (int i = 0; i < 2; ++i) {
        B[4 * i + 0] = reinterpret_cast<u32x4>(unpacklo16(A[4 * i], A[4 * i + 2]));
        B[4 * i + 1] = reinterpret_cast<u32x4>(unpackhi16(A[4 * i], A[4 * i + 2]));
        B[4 * i + 2] = reinterpret_cast<u32x4>(unpacklo16(A[4 * i + 1], A[4 * i + 3]));
        B[4 * i + 3] = reinterpret_cast<u32x4>(unpackhi16(A[4 * i + 1], A[4 * i + 3]));
    }
}

// Rows r0 .. r0 + M - 1 of the activations against the 8 weight rows of tile rt.
template <int BITS, int M>
void decode_tile(const Job& j, int64_t rt, int64_t r0, const TileFactorsI16& tf) {
    const uint64_t pb = j.w->plane_bytes;
    const int rows = static_cast<int>(std::min<int64_t>(8, j.w->n - rt * 8));
    const u16x8 low = u16x8{} + 0x00ff;
    f32x4 acc[8][M];
    for (int g = 0; g < 8; ++g)
        for (int r = 0; r < M; ++r) acc[g][r] = f32x4{};
    for (int64_t s = 0; s < j.n_super; ++s) {
        const int W = super_words(j, s);  // lanes of 4 words; bytes per row and plane: 16 W
        const uint8_t* sb = j.w->planes + super_offset(j, rt, s);
        const int32_t* step_group = j.step_group + 16 * s;
        const int16_t* xs = j.xi + r0 * j.x_stride + 4 * s * 128;  // step (s, 0) of row r0
        for (int g = 0; g < rows; ++g) {
            // two chains (v even / odd) per activation row
            f32x4 part[2][M];
            for (int r = 0; r < M; ++r) part[0][r] = part[1][r] = f32x4{};
            for (int L = 0; L < W; ++L) {
                u32x4 B[8];
                lane_to_B<BITS>(sb + 16 * W * g + 16 * L, pb, B);
                // unrolled, so that B[v] and part[v % 2] are indexed by constants (as in the AVX2 kernel)
#pragma GCC unroll 4
                for (int v = 0; v < 4; ++v) {
                    // qword b: the 8 codes of byte position b of word v; c0 / c1 = weights 0-15 / 16-31
                    const u16x8 c0 = reinterpret_cast<u16x8>(unpacklo32(B[v], B[4 + v]));
                    const u16x8 c1 = reinterpret_cast<u16x8>(unpackhi32(B[v], B[4 + v]));
                    const i16x8 e0 = reinterpret_cast<i16x8>(c0 & low), o0 = reinterpret_cast<i16x8>(c0 >> 8);
                    const i16x8 e1 = reinterpret_cast<i16x8>(c1 & low), o1 = reinterpret_cast<i16x8>(c1 >> 8);
                    const int32_t gr = step_group[4 * v + L];
                    for (int r = 0; r < M; ++r) {
                        // slots 64h + 32e + 8L + i of step (s, v): weight 16h + 2i + e of the word
                        const int16_t* x = xs + r * j.x_stride + v * 128 + 8 * L;
                        const i32x4 p = dot4(e0, o0, e1, o1, load16<i16x8>(x), load16<i16x8>(x + 32),
                                             load16<i16x8>(x + 64), load16<i16x8>(x + 96));
                        const float f = tf.row(r0 + r, g)[8 * gr];
                        part[v % 2][r] += __builtin_convertvector(p, f32x4) * f;
                    }
                }
            }
            for (int r = 0; r < M; ++r) acc[g][r] += part[0][r] + part[1][r];
        }
    }
    for (int g = 0; g < rows; ++g)
        for (int r = 0; r < M; ++r) {
            const f32x4 a = acc[g][r];
            j.y[(r0 + r) * j.w->n + rt * 8 + g] = ((a[0] + a[1]) + (a[2] + a[3])) + tf.bias()[(r0 + r) * 8 + g];
        }
}

template <int BITS>
void decode_tiles(const Job& j, int64_t t0, int64_t t1) {
    // codes shifted left by 8 - k (the transpose's output) need 2^(k-8)
    TileFactorsI16 f(j, 1.0f / static_cast<float>(1 << (8 - BITS)));
    for (int64_t rt = t0; rt < t1; ++rt) {
        f.compute_vec128(rt);
        // up to 4 activation rows per pass over the planes
        for (int64_t r0 = 0; r0 < j.m; r0 += 4) {
            switch (std::min<int64_t>(4, j.m - r0)) {
                case 1: decode_tile<BITS, 1>(j, rt, r0, f); break;
                case 2: decode_tile<BITS, 2>(j, rt, r0, f); break;
                case 3: decode_tile<BITS, 3>(j, rt, r0, f); break;
                default: decode_tile<BITS, 4>(j, rt, r0, f); break;
            }
        }
    }
}

// ---- the GEMM (prompts): y[r, n] = Σ_i w[n, i] x[r, i] over the tile's dequantized rows ------------
//
// The portable GEMM dots one weight row with one activation row at a time: two loads per multiply-add.
// Here a block of 4 weight rows and RB activation rows shares its loads, 4 + RB per 4 RB multiply-adds,
// each (weight row, activation row) pair a vector of 4 partial sums along K. RB = 4 on AArch64 (32
// vector registers: 16 sums, 8 operands), 2 on x86-64 (16 registers: 8 sums). FMA where the target
// has it (NEON's fmla: GCC and Clang contract the multiply-add; SSE2 has none).
constexpr int kGemmRows = kRegisters / 8;

// out[g][r] = Σ_i w[g k_pad + i] x[r x_stride + i], w (4, k_pad), x (RB, x_stride); k_pad a multiple of 4
template <int RB>
FQ_INLINE void dot_block(const float* w, int64_t k_pad, const float* x, int64_t x_stride, float out[4][RB]) {
    f32x4 acc[4][RB];
    for (int g = 0; g < 4; ++g)
        for (int r = 0; r < RB; ++r) acc[g][r] = f32x4{};
    for (int64_t i = 0; i < k_pad; i += 4) {
        f32x4 xv[RB];
        for (int r = 0; r < RB; ++r) xv[r] = load16<f32x4>(x + r * x_stride + i);
        for (int g = 0; g < 4; ++g) {
            const f32x4 wv = load16<f32x4>(w + g * k_pad + i);
            for (int r = 0; r < RB; ++r) acc[g][r] += wv * xv[r];
        }
    }
    for (int g = 0; g < 4; ++g)
        for (int r = 0; r < RB; ++r) out[g][r] = (acc[g][r][0] + acc[g][r][1]) + (acc[g][r][2] + acc[g][r][3]);
}

// rows (8, k_pad) = dequantize_tile's values, from the transpose of decode_tile: per lane of 4 words,
// lane_to_B and the unpacks give word v's 32 codes (shifted left by 8 - k) in K order, c0 and
// c1 as bytes; widened to fp32 they are scaled by 2^(k-8) s_k (the same products as s_k · c_k: only
// powers of two apart) plus m_k. Scalar, dequantize_tile cost ~0.65 ns per weight here: at 16 prompt
// rows as much as the multiply-adds.
template <int BITS>
void dequantize_tile_vec128(const Job& j, int64_t rt, float* rows) {
    const uint64_t pb = j.w->plane_bytes;
    const int shift = j.w->max_bits - BITS;
    const float smul = static_cast<float>(1 << shift) / static_cast<float>(1 << (8 - BITS));
    const float mmul = static_cast<float>(((1 << shift) - 1) / 2.0);
    const int n_rows = static_cast<int>(std::min<int64_t>(8, j.w->n - rt * 8));
    const u8x16 zero8 = u8x16{};
    const u16x8 zero16 = u16x8{};
    for (int g = 0; g < n_rows; ++g) {
        const uint16_t* qp = j.w->qparams + (rt * 8 + g) * j.n_groups * 2;
        float* row = rows + g * j.k_pad;
        for (int64_t s = 0; s < j.n_super; ++s) {
            const int W = super_words(j, s);
            const uint8_t* rb = j.w->planes + super_offset(j, rt, s) + 16 * W * g;
            for (int L = 0; L < W; ++L) {
                u32x4 B[8];
                lane_to_B<BITS>(rb + 16 * L, pb, B);
#pragma GCC unroll 4
                for (int v = 0; v < 4; ++v) {
                    const int64_t w = 16 * s + 4 * L + v;  // the stored word (WORD_ORDER_NATURAL)
                    const int32_t gr = j.word_group[w];
                    const float sc = fp16_to_fp32(qp[2 * gr]);
                    const float sk = sc * smul, mk = fp16_to_fp32(qp[2 * gr + 1]) + sc * mmul;
                    const u8x16 c[2] = {reinterpret_cast<u8x16>(unpacklo32(B[v], B[4 + v])),
                                        reinterpret_cast<u8x16>(unpackhi32(B[v], B[4 + v]))};
                    float* out = row + w * 32;
                    for (int h = 0; h < 2; ++h)
                        for (int e = 0; e < 2; ++e) {
                            const u16x8 c16 = reinterpret_cast<u16x8>(e ? unpackhi8(c[h], zero8) : unpacklo8(c[h], zero8));
                            const i32x4 lo = reinterpret_cast<i32x4>(unpacklo16(c16, zero16));
                            const i32x4 hi = reinterpret_cast<i32x4>(unpackhi16(c16, zero16));
                            const f32x4 flo = __builtin_convertvector(lo, f32x4) * sk + mk;
                            const f32x4 fhi = __builtin_convertvector(hi, f32x4) * sk + mk;
                            store16(out + 16 * h + 8 * e, flo);
                            store16(out + 16 * h + 8 * e + 4, fhi);
                        }
                }
            }
        }
    }
    std::fill(rows + n_rows * j.k_pad, rows + 8 * j.k_pad, 0.0f);
}

// Activation rows [r0, r0 + RB) against the tile's rows (8, k_pad) (n_rows of them real) -> y.
template <int RB>
void gemm_rows(const Job& j, int64_t rt, const float* rows, int n_rows, int64_t r0) {
    for (int g0 = 0; g0 < n_rows; g0 += 4) {
        float out[4][RB];
        dot_block<RB>(rows + g0 * j.k_pad, j.k_pad, j.xp + r0 * j.x_stride, j.x_stride, out);
        for (int g = 0; g < std::min(4, n_rows - g0); ++g)
            for (int r = 0; r < RB; ++r) j.y[(r0 + r) * j.w->n + rt * 8 + g0 + g] = out[g][r];
    }
}

}  // namespace

// TileFactorsI16::compute's factors (bitplane_matmul_avx2_i16.cpp) on 128-bit vectors: sk, mk per
// (group, tile row), then swx and the fp64 bias per activation row. 4 groups' (scale, min) pairs at a
// time, widened from fp16 in vectors (vec128.h): one at a time in software, the conversions had been
// 8% of a decode step on SSE2 (SmolLM2, 1,024 positions; AArch64 converts in one instruction).
void TileFactorsI16::compute_vec128(int64_t rt) {
    const Job& j = j_;
    const int64_t ng = j.n_groups;
    const int rows = static_cast<int>(std::min<int64_t>(8, j.w->n - rt * 8));
    for (int g = 0; g < 8; ++g) {
        if (g >= rows) {  // rows past N have no qparams: zero factors
            for (int64_t gr = 0; gr < ng; ++gr) {
                sk_[8 * gr + g] = 0.0f;
                mk_[8 * gr + g] = 0.0;
            }
            continue;
        }
        const uint16_t* qp = j.w->qparams + (rt * 8 + g) * ng * 2;
        int64_t gr = 0;
        for (; gr + 4 <= ng; gr += 4) {
            const u32x4 pairs = load16<u32x4>(qp + 2 * gr);  // lane c: group gr + c's scale (low), min (high)
            const f32x4 sc = fp16_to_f32x4(pairs & 0xffffu), mn = fp16_to_f32x4(pairs >> 16);
            const f32x4 sk = sc * smul_, mk = mn + sc * mmul_;
            for (int c = 0; c < 4; ++c) {
                sk_[8 * (gr + c) + g] = sk[c];
                mk_[8 * (gr + c) + g] = static_cast<double>(mk[c]);
            }
        }
        for (; gr < ng; ++gr) {
            const float sc = fp16_to_fp32(qp[2 * gr]), mn = fp16_to_fp32(qp[2 * gr + 1]);
            sk_[8 * gr + g] = sc * smul_;
            mk_[8 * gr + g] = static_cast<double>(mn + sc * mmul_);
        }
    }
    for (int64_t r = 0; r < j.m; ++r) {
        const float* xs = j.xscale + r * ng;
        const double* xsum = j.xsum + r * ng;
        float* out = swx_ + r * ng * 8;
        double b[8] = {};
        for (int64_t gr = 0; gr < ng; ++gr)
            for (int g = 0; g < 8; ++g) {
                out[8 * gr + g] = sk_[8 * gr + g] * xs[gr];
                b[g] += mk_[8 * gr + g] * xsum[gr];
            }
        for (int g = 0; g < 8; ++g) bias_[8 * r + g] = static_cast<float>(b[g]);
    }
}

void prepare_i16_portable(const Job& j, const float* x, int64_t k, int16_t* q_tmp, int16_t* xi, float* xscale,
                          double* xsum) {
    const int group = j.w->group_size;
    for (int64_t r = 0; r < j.m; ++r) {
        const float* xr = x + r * k;
        std::fill(q_tmp + k, q_tmp + j.k_pad, int16_t(0));
        for (int64_t g = 0; g < j.n_groups; ++g) {
            const int64_t i0 = g * group, i1 = std::min<int64_t>(k, i0 + group);
            // the fp32 operations of bitplane_round_i16: absmax (NaN never wins), x / s to nearest even,
            // clamped; a group holding NaN or inf gets Σ x̂ = NaN (so that y shows it) and q = 0 there
            float amax = 0.0f;
            bool bad = false;
            for (int64_t i = i0; i < i1; ++i) {
                amax = std::max(amax, std::fabs(xr[i]));
                bad |= !std::isfinite(xr[i]);
            }
            const float scale = amax / j.qmax;
            int64_t qsum = 0;
            for (int64_t i = i0; i < i1; ++i) {
                const int16_t q = std::isfinite(xr[i]) ? static_cast<int16_t>(q_i16(xr[i], scale, j.qmax)) : int16_t(0);
                q_tmp[i] = q;
                qsum += q;
            }
            xscale[r * j.n_groups + g] = scale;
            xsum[r * j.n_groups + g] =
                bad ? std::numeric_limits<double>::quiet_NaN() : static_cast<double>(scale) * static_cast<double>(qsum);
        }
        // q_tmp (natural K order) -> WORD_ORDER_I16: slot 64h + 32e + 8L + i of step (s, v) <- bit
        // 16h + 2i + e of word 4L + v
        for_each_i16_word(j, xi + r * j.x_stride, [&](int32_t base, int16_t* blk) {
            for (int h = 0; h < 2; ++h)
                for (int e = 0; e < 2; ++e)
                    for (int i = 0; i < 8; ++i)
                        blk[64 * h + 32 * e + i] = base >= 0 ? q_tmp[base + 16 * h + 2 * i + e] : int16_t(0);
        });
    }
}

void decode_tiles_i16_vec128(const Job& j, int64_t t0, int64_t t1) {
    note_kernel("decode_i16_vec128");
    with_bits(j.bits, [&](auto bits) { decode_tiles<decltype(bits)::value>(j, t0, t1); });
}

void gemm_tiles_vec128(const Job& j, int64_t t0, int64_t t1) {
    note_kernel("gemm_vec128");
    std::vector<float> rows(static_cast<size_t>(8 * j.k_pad));  // (8, k_pad)
    // The activation rows in chunks of about 512 KiB, each passed over by every tile of the range: a
    // long prompt's rows would not stay in cache from one tile to the next. A tile is dequantized once
    // per chunk (a few percent of its multiply-adds at 16 rows or more).
    const int64_t chunk =
        std::max<int64_t>(16, (int64_t(512) << 10) / (4 * j.k_pad)) / kGemmRows * kGemmRows;
    for (int64_t c0 = 0; c0 < j.m; c0 += chunk) {
        const int64_t c1 = std::min(j.m, c0 + chunk);
        for (int64_t rt = t0; rt < t1; ++rt) {
            with_bits(j.bits, [&](auto bits) { dequantize_tile_vec128<decltype(bits)::value>(j, rt, rows.data()); });
            const int n_rows = static_cast<int>(std::min<int64_t>(8, j.w->n - rt * 8));
            int64_t r0 = c0;
            for (; r0 + kGemmRows <= c1; r0 += kGemmRows) gemm_rows<kGemmRows>(j, rt, rows.data(), n_rows, r0);
            for (; r0 < c1; ++r0) gemm_rows<1>(j, rt, rows.data(), n_rows, r0);
        }
    }
}

}  // namespace bitplane_detail
}  // namespace flexquant

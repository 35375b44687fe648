// Internal, host and device: the data layout of the MMA path of cuda/bitplane_matmul.cu, the GEMV
// on the s8 tensor cores (mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32) with the weight codes
// decoded from the bit planes in registers:
//
//   ĉ8[n, i] = (c_k[n, i] − 2^(k−1)) · 2^(8−k)     the k-bit code, centred, at the top of an int8
//   I8[r, n, g] = Σ_{i∈g} q[r, i] · ĉ8[n, i]         exact int32 (|I8| ≤ 512 · 127 · 128 < 2^24)
//   y[r, n] = Σ_g a_s[r,g] · s[n,g] · 2^(B−8) · I8  +  a_z[r,g] · z_k[n,g]
//   z_k = m_k + s_k · 2^(k−1) (the code range's centre), a_z = a_s · Σq: so y = W_k · x̂ (the same
//   int8 activations x̂ = a_s · q as the TC path), because s_k · c_k = s·2^(B−8)·ĉ8 + s_k·2^(k−1).
//
// Why codes at the top of the byte: plane p of a k-bit code is bit 7 − p of ĉ8 ^ 0x80 whatever k
// is, so one bit transposition serves every k (missing planes are zeros), and the 2^(8−k) folds
// into the scale as an exact power of two.
//
// K order. An mma step multiplies 32 K of an A row by 32 K of a B column; which 32 physical K
// columns they are is free, as long as A and B agree. Lane 4g + t already holds, for weight row g
// of the row tile, K [128c + 32t, +32) in word j of each plane (c = 4s + j, tc8x512 layout), so
// step (c, qq), qq = 0..3, takes from every lane the 8 columns 128c + 32t + 8qq + e, e = 0..7:
//   logical K 4t + e      (fragment registers a0/a1, b0)  = physical 128c + 32t + 8qq + e,  e < 4
//   logical K 16 + 4t + e (a2/a3, b1)                     = physical 128c + 32t + 8qq + 4 + e
// (PTX ISA, "Matrix Fragments for mma.m16n8k32": A row groupID K 4·tig.., +16; B column groupID
// the same K). The 4 lanes t = 0..3 of a step span 128 columns, so a step never mixes two weight
// groups only when group_size is a multiple of 128: the path takes 128, 256 and 512.
//
// The activations are stored in that order by the preparation kernel (xa_index), up to 16 rows:
// A rows 0..7 are activation rows r = g (h = 0), rows 8..15 are r = g + 8 (h = 1), and a lane's
// 16 bytes of a step (row g, then row g + 8) are one 16-byte load, the warp's 512 bytes contiguous
// (8 bytes when the launch has at most 8 rows).
//
// tests/test_mma_layout.py compiles this header on the host and emulates a warp with it against
// numpy (every lane, the PTX fragment layout, the planes as the converter packs them).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FQ_MMA_HD __host__ __device__ __forceinline__
#else
#define FQ_MMA_HD inline
#endif

namespace flexquant {
namespace mma {

constexpr int ROWS = 16;  // activation rows per launch: the 16 A rows of the mma

// Byte offset in the prepared activations xa (n_chunks, 4, 8, 4, 2, 8) int8 of activation row
// r = g + 8h (< 16), K column col (< k_pad): chunk c = col / 128, then (qq, g, t, h, e) as above.
// Lane 4g + t of step (c, qq) reads the 16 bytes at xa_index(c·128 + 32t + 8qq, g): row g's 8,
// then row g + 8's.
FQ_MMA_HD int64_t xa_index(int64_t col, int r) {
    const int64_t c = col >> 7;
    const int in = int(col & 127), t = in >> 5, qq = (in >> 3) & 3, e = in & 7;
    return ((((c * 4 + qq) * 8 + (r & 7)) * 4 + t) * 2 + (r >> 3)) * 8 + e;
}

// __byte_perm(x, y, s) (CUDA Math API): byte i of the result = byte (nibble i of s) of the 8
// bytes y:x (0..3 = x). Selectors here use nibbles 0..7 only (no sign replication).
FQ_MMA_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
    return __byte_perm(x, y, s);
#else
    const uint64_t v = (uint64_t(y) << 32) | x;
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) r |= uint32_t((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
    return r;
#endif
}

// The 8x8 bit matrix in the 64 bits hi:lo, bit 8·row + col, transposed (bit 8·col + row):
// three delta swaps (Hacker's Delight, 7-3 "transpose8"), about 20 integer operations.
FQ_MMA_HD void transpose8x8(uint32_t& lo, uint32_t& hi) {
    uint32_t t;
    t = (lo ^ (lo >> 7)) & 0x00AA00AAu;
    lo ^= t ^ (t << 7);
    t = (hi ^ (hi >> 7)) & 0x00AA00AAu;
    hi ^= t ^ (t << 7);
    t = (lo ^ (lo >> 14)) & 0x0000CCCCu;
    lo ^= t ^ (t << 14);
    t = (hi ^ (hi >> 14)) & 0x0000CCCCu;
    hi ^= t ^ (t << 14);
    t = (lo ^ (hi << 4)) & 0xF0F0F0F0u;  // the 4x4 blocks across the halves
    lo ^= t;
    hi ^= t >> 4;
}

// u[p] = one 32-bit word of plane p (bit b = K column b of the word; 0 for planes p >= k) ->
// b[qq] = the B fragment (b0, b1) of step qq: ĉ8 of columns 8qq..8qq+3 and 8qq+4..8qq+7, one byte
// each (CENTRED; else the top-aligned unsigned code c_k·2^(8−k) = ĉ8 + 128, for the f16 path). First a 4x4 byte transpose gathers byte qq of the 8 planes, plane p at byte 7 − p of hi:lo
// (so that after the bit transposition plane 0, the MSB, is bit 7 of every code byte); then the
// bit transposition turns "byte = plane, bit = column" into "byte = column, bit = 7 − plane".
template <bool CENTRED = true>
FQ_MMA_HD void decode_word(const uint32_t (&u)[8], uint32_t (&b)[4][2]) {
    uint32_t hi[4], lo[4];
    {
        const uint32_t a = byte_perm(u[3], u[2], 0x5140u), c = byte_perm(u[1], u[0], 0x5140u);
        const uint32_t bb = byte_perm(u[3], u[2], 0x7362u), d = byte_perm(u[1], u[0], 0x7362u);
        hi[0] = byte_perm(a, c, 0x5410u);  // bytes: planes 3, 2, 1, 0 of byte 0 of the words
        hi[1] = byte_perm(a, c, 0x7632u);
        hi[2] = byte_perm(bb, d, 0x5410u);
        hi[3] = byte_perm(bb, d, 0x7632u);
    }
    {
        const uint32_t a = byte_perm(u[7], u[6], 0x5140u), c = byte_perm(u[5], u[4], 0x5140u);
        const uint32_t bb = byte_perm(u[7], u[6], 0x7362u), d = byte_perm(u[5], u[4], 0x7362u);
        lo[0] = byte_perm(a, c, 0x5410u);  // planes 7, 6, 5, 4
        lo[1] = byte_perm(a, c, 0x7632u);
        lo[2] = byte_perm(bb, d, 0x5410u);
        lo[3] = byte_perm(bb, d, 0x7632u);
    }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int qq = 0; qq < 4; ++qq) {
        transpose8x8(lo[qq], hi[qq]);
        const uint32_t flip = CENTRED ? 0x80808080u : 0u;  // c·2^(8−k) − 128 = ĉ8 as int8, per byte
        b[qq][0] = lo[qq] ^ flip;
        b[qq][1] = hi[qq] ^ flip;
    }
}

// The f16 path (W{k}A16, mma m16n8k16 with fp32 accumulation): 4 unsigned top-aligned codes u
// (bytes 0..3) -> two f16x2 registers whose halves are 1024 + u_i (exponent of 1024, the byte in
// the mantissa: exact). The kernel subtracts 1152 = 1024 + 128 per half (__hsub2), which leaves
// ĉ8 = u − 128 exactly; the byte-to-half conversion costs one byte permutation per two codes.
FQ_MMA_HD void codes_to_half2_biased(uint32_t u, uint32_t& h01, uint32_t& h23) {
    h01 = byte_perm(u, 0x64646464u, 0x5140u);  // bytes u0, 0x64, u1, 0x64
    h23 = byte_perm(u, 0x64646464u, 0x5342u);  // bytes u2, 0x64, u3, 0x64
}
constexpr uint32_t HALF2_BIAS = 0x64806480u;  // f16x2 (1152, 1152)

// fp16 activations saturate at ±65504 (fp16's largest finite value) instead of becoming ±inf, whose
// products would turn the whole output row into inf or NaN; NaN stays NaN. The CPU emulation
// (quantize_activations, bits 16) does the same.
FQ_MMA_HD float fp16_saturate(float v) {
#if defined(__CUDA_ARCH__)
    return fabsf(v) > 65504.0f ? copysignf(65504.0f, v) : v;
#else
    return std::fabs(v) > 65504.0f ? std::copysign(65504.0f, v) : v;
#endif
}

// Element offset (in halves) of activation row r, column col in the f16 path's prepared x
// (n_chunks, 4, 8, 4, 2, 8) fp16: the order of xa_index, 2 bytes per element; a lane's step is two
// 16-byte loads (row g, row g + 8).
FQ_MMA_HD int64_t xa16_index(int64_t col, int r) { return xa_index(col, r); }

// The fp32 constants of the epilogue for a view of k of B bits: s8_mul = 2^(B−8) (ĉ8 carries
// 2^(8−k), s_k = s · 2^(B−k)); z_k = (m + s · min_mul) + s · scale_mul · 2^(k−1) with the view's
// scale_mul = 2^(B−k), min_mul = (2^(B−k) − 1) / 2 (docs/format.md). All exact powers of two or
// the CPU op's own constants.
struct GroupConstants {
    float s8_mul, scale_mul, min_mul, centre;
};
FQ_MMA_HD GroupConstants group_constants(int max_bits, int bits) {
    GroupConstants c;
    c.s8_mul = float(1 << max_bits) / 256.0f;
    c.scale_mul = float(1 << (max_bits - bits));
    c.min_mul = 0.5f * float((1 << (max_bits - bits)) - 1);
    c.centre = float(1 << (bits - 1));
    return c;
}

// One group's contribution to y[r, n]: a_s · (s · s8_mul) · I8 + a_z · z_k. The f16 path passes
// its fp32 group sum Σ ĉ8 · fp16(x) as `dot`, a_s = 1 and a_z = Σ fp16(x) over the group.
FQ_MMA_HD float group_term(float dot, float a_s, float a_z, float s, float m, const GroupConstants& c) {
    const float z_k = (m + s * c.min_mul) + (s * c.scale_mul) * c.centre;
    return dot * (a_s * (s * c.s8_mul)) + a_z * z_k;
}
FQ_MMA_HD float group_term(int i8, float a_s, float a_z, float s, float m, const GroupConstants& c) {
    return group_term(float(i8), a_s, a_z, s, m, c);
}

}  // namespace mma
}  // namespace flexquant

// Internal, host and device: the tiling and the fp32 steps of the wgmma GEMM (A8_WG, wg_gemm_kernel
// in cuda/bitplane_matmul_gemm.cu), the A8 GEMM's arithmetic on Hopper's warpgroup MMA:
//
//   part[r, c]  = Σ_{i ∈ stage} x̃[r, i] · ĉ[c, i]            wgmma.m64n128k32.s32.s8.s8, exact int32
//   acc[r, c]  += (a_s[r,g] · s_k[c,g]) · part[r, c]          after every stage
//   acc[r, c]  += a_z[r,g] · z_k[c,g]                         when group g ends
//
// A block computes a BM x BN tile of y; K moves in stages of BK = 128 bytes. Stage s covers K
// [128s, 128s + 128), all in group g = 128s / group_size (group sizes are multiples of 128), and its
// int32 sums (|Σ| ≤ 128 · 128 · 127 < 2^22, exact through small_int_to_float) get their fp32 step at
// its end. For groups of 128 these are the mma.sync GEMM's chunks and steps, term for term; for wider
// groups that GEMM sums 256 K in int32 before a step, so the two differ by fp32 rounding there.
//
// Shared memory, as TMA writes a 128 x 128-byte box with CU_TENSOR_MAP_SWIZZLE_128B into a
// 1,024-byte aligned tile and as wgmma reads it through a K-major 128-byte-swizzle descriptor (stride
// byte offset 1,024 between 8-row atoms): byte b of row r sits at swizzle128(r, b), the 16-byte
// chunk index XORed with r % 8 (PTX ISA, "Tensor swizzling modes" / "Shared memory matrix layout").
// The k-th 32-byte step of a row is the descriptor's start address + 32k (the swizzle applies to the
// address the unit computes, so it is the same function of (r, 32k + b)).
//
// Accumulator fragment of wgmma m64nN (PTX ISA, "Register fragments: D" of wgmma .m64nNk32): warp wq
// (0..3) of the warpgroup holds rows 16wq..16wq+15; with gid = lane / 4, tig = lane % 4, register
// d[4j + e] is row 16wq + gid + 8·(e / 2), column 8j + 2·tig + (e % 2), j = 0..N/8 - 1 (acc_row, acc_col).
//
// tests/test_wgmma_layout.py compiles this header on the host and emulates every block, warp and
// register of a launch with it against numpy.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FQ_WG_HD __host__ __device__ __forceinline__
#else
#define FQ_WG_HD inline
#endif

namespace flexquant {
namespace wg {

constexpr int BM = 128, BN = 128, BK = 128;  // tile of y (rows of x, rows of W); K bytes per stage
constexpr int STAGES = 5;                    // shared-memory stages in flight
constexpr int THREADS = 384;                 // a producer warpgroup + 2 consumer warpgroups
constexpr int CONSUMERS = 256;
constexpr int WG_ROWS = 64;                  // rows of the tile per consumer warpgroup
constexpr int ACC = WG_ROWS * BN / 128;      // accumulator registers per thread (64)
constexpr int TILE_BYTES = BM * BK;          // one x̃ or code tile of a stage (16 KB)
constexpr int TERM_BYTES = BM * 8;           // 128 (float, float) group terms (1 KB)
static_assert(BM == BN, "one tile size for both operands and both term copies");

// The (float, float) and (float, float, float, float) group terms as stored (float2 / float4 layout).
struct alignas(8) Term2 {
    float x, y;
};
struct alignas(16) Term4 {
    float x, y, z, w;
};

// Byte offset of byte b (< 128) of row r in a 1,024-byte aligned tile of 128-byte rows, 128-byte swizzle.
FQ_WG_HD int swizzle128(int r, int b) { return r * 128 + ((((b >> 4) ^ r) & 7) << 4) + (b & 15); }

// The group of stage s, and whether stage s is the last of its group (or of K).
FQ_WG_HD int64_t stage_group(int s, int group_size) { return int64_t(s) * BK / group_size; }
FQ_WG_HD bool stage_ends_group(int s, int k_stages, int group_size) {
    return (int64_t(s) + 1) * BK % group_size == 0 || s + 1 == k_stages;
}

// Tile row (within the warpgroup's 64) and tile column of accumulator register q = 4j + e.
FQ_WG_HD int acc_row(int wq, int lane, int q) { return wq * 16 + (lane >> 2) + 8 * ((q & 3) >> 1); }
FQ_WG_HD int acc_col(int lane, int q) { return 8 * (q >> 2) + 2 * (lane & 3) + (q & 1); }

// Exact int32 -> fp32 for |v| < 2^22: the mantissa of 1.5 · 2^23 takes v, one add removes it.
FQ_WG_HD float small_int_to_float(int v) {
#if defined(__CUDA_ARCH__)
    return __int_as_float(0x4B400000 + v) - 12582912.0f;
#else
    const int bits = 0x4B400000 + v;
    float f;
    std::memcpy(&f, &bits, 4);
    return f - 12582912.0f;
#endif
}

// One thread's fp32 step at the end of a stage: acc[q] += (a_s · s_k) · part[q] (+ a_z · z_k at the
// group's end) over its 64 registers. rt: the stage's row terms (a_s, a_z) of the tile's 128 rows;
// ct: its column terms as Term4 pairs (s_k, z_k of column 2i, then of column 2i + 1); row_lo: the
// thread's first tile row (acc_row(wq, lane, 0) + 64 · warpgroup). The expressions are the mma.sync
// GEMM's flush, term for term, so that both round alike. GROUP_END a template argument: a run-time
// flag costs a select per output.
template <bool GROUP_END>
FQ_WG_HD void flush_stage(float (&acc)[ACC], const int (&part)[ACC], const Term2* rt, const Term4* ct, int row_lo,
                          int lane) {
    const Term2 pa[2] = {rt[row_lo], rt[row_lo + 8]};
    const int tig = lane & 3;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < ACC / 4; ++j) {
        const Term4 w = ct[4 * j + tig];  // columns 8j + 2tig and 8j + 2tig + 1
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
        for (int e = 0; e < 4; ++e) {
            const int q = 4 * j + e;
            const Term2 a = pa[e >> 1];
            const float s_k = (e & 1) ? w.z : w.x, z_k = (e & 1) ? w.w : w.y;
            float v = acc[q] + a.x * s_k * small_int_to_float(part[q]);
            if (GROUP_END) v += a.y * z_k;
            acc[q] = v;
        }
    }
}

}  // namespace wg
}  // namespace flexquant

// y (m, n) = x (m, k) · W_kᵀ over a bit-plane linear, for many activation rows (prefill, batches):
//
//   y[r, n] = Σ_g  a_s[r,g] · s_k[n,g] · Σ_{i∈g} x̃[r,i] · ĉ[n,i]   +   a_z[r,g] · z_k[n,g]
//   ĉ = c_k − 2^(k−1)  (the k-bit code, centred so that it fits int8 for every k ≤ 8)
//   s_k = s · 2^(B−k),  m_k = m + s · (2^(B−k) − 1) / 2,  z_k = m_k + s_k · 2^(k−1)   (docs/format.md)
//
//   A8  ("W{k}A8"):  x̃ = q = rint(x / a_s) int8 per (row, group), a_s = absmax / 127, a_z = a_s · Σq
//                     (the activation quantization of the GEMV's TC path, bit for bit), s8 IMMA
//                     mma.sync.m16n8k32.s32.s8.s8.s32, exact int32 sums, scaled in fp32
//   A16 ("W{k}A16"): x̃ = fp16(x), a_s = 1, a_z = Σ_{i∈g} fp16(x[r,i]),
//                     mma.sync.m16n8k16.f32.f16.f16.f32, the codes widened s8 -> f16 (exact)
//
// The tensor-core half of bitplane_matmul's CUDA op (bitplane_matmul.cu takes m ≤ 8 per launch on
// the binary tensor cores). Three launches per call:
//   1. unpack: the first k planes -> ĉ (n_alloc, k_pad) int8, row-major (a transient scratch of one
//      byte per weight; no f16 copy of the weights exists). One thread per 32-bit plane word, in
//      storage order, so the plane reads are coalesced; 4 codes per step by spreading a nibble of
//      each plane over 4 bytes ((nib · 0x00204081) & 0x01010101).
//   2. prepare: x -> x̃ (m_alloc, k_pad) int8 or fp16 with zero K padding, and (a_s, a_z) per (row, group).
//   3. gemm: 128 x 128 output tiles, 8 warps of 64 x 32, K tiles of 64 (A8) or 32 (A16) bytes of
//      codes in a 3-stage cp.async pipeline through shared memory, fragments read with ldmatrix.
//      The mma accumulates within a group (at most 256 K at a time in int32, so that |Σ| < 2^22
//      converts to fp32 exactly by the 2^23 + 2^22 trick); the group's scales, loaded when the
//      group starts, are applied when it ends, in registers.
// Decoding the planes once per call and not once per output tile is the design choice: at prefill
// sizes (m ≥ a few hundred) the GEMM is compute-bound and the unpack pass (read k/8 + write 1 byte
// per weight, once) costs a few % of it, while decoding inside the GEMM would repeat the bit
// transposition for every 128 rows of x on the CUDA cores, which are far slower than the tensor
// cores. Small m stays on the GEMV kernels; which path runs is measured (tools/gpu_check.sh).
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k32" / "mma.m16n8k16"), with
// gid = lane / 4, tig = lane % 4:
//   s8 A (16x32, row): reg0 row gid, K 4tig..4tig+3; reg1 row gid+8, same K; reg2/reg3 the same at K+16
//   s8 B (32x8, col):  reg0 K 4tig..4tig+3 of column gid; reg1 K+16
//   f16 A (16x16):     reg0 row gid, K 2tig, 2tig+1; reg1 row gid+8; reg2/reg3 the same at K+8
//   f16 B (16x8):      reg0 K 2tig, 2tig+1 of column gid; reg1 K+8
//   C (16x8, both):    c0, c1 row gid, columns 2tig, 2tig+1; c2, c3 row gid+8
// tests/test_cuda_ops.py and tools/gpu_check.sh check it against the CPU op (run on an H100,
// 2026-11-23; measured speed in docs/kernels.md).
#include <cuda_fp16.h>
#include <cudaTypedefs.h>  // CUtensorMap, PFN_cuTensorMapEncodeTiled (types only: no libcuda link)

#include <algorithm>
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "bitplane_matmul.cuh"
#include "bitplane_mma.cuh"
#include "bitplane_wgmma.cuh"
#include "cuda_backend.h"

namespace flexquant {

namespace {

constexpr int BM = 128, BN = 128;   // output tile: rows of x, rows of W
constexpr int THREADS = 256;        // 8 warps: 2 along m (64 rows each) x 4 along n (32 columns each)
constexpr int WARP_M = 64, WARP_N = 32;
constexpr int MT = WARP_M / 16, NT = WARP_N / 8;  // mma tiles per warp: 4 x 4
constexpr int SMEM_PAD = 16;        // bytes after each smem row: the fragment reads of 8 rows hit 8 distinct bank quads
constexpr int MAX_INT_STEPS = 8;    // int32 mma k-steps (32 K) between conversions: |Σ| ≤ 256·127·128 < 2^22
constexpr int PREP_THREADS = 256;
constexpr unsigned FULL = 0xffffffffu;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct GemmGeometry {
    int64_t m, n, k, k_pad, m_alloc, n_alloc, n_groups;
    int group_size;
};

GemmGeometry gemm_geometry(const BitplaneLinear& w, int64_t m) {
    GemmGeometry g{};
    g.m = m;
    g.n = w.n;
    g.k = w.k;
    g.k_pad = ceil_div(w.k, 128) * 128;
    g.m_alloc = ceil_div(std::max<int64_t>(m, 1), BM) * BM;
    g.n_alloc = ceil_div(w.n, BN) * BN;
    g.n_groups = w.n_groups();
    g.group_size = w.group_size;
    return g;
}

int act_bytes(BitplaneGemmKind kind) { return kind == BITPLANE_GEMM_A16 ? 2 : 1; }
bool wgmma_kind(BitplaneGemmKind kind) { return kind == BITPLANE_GEMM_A8_WG; }
int64_t n_chunks(const GemmGeometry& g) { return ceil_div(g.k_pad, 256); }  // 256-column chunks of the b1 mma

// The workspace, in this order (each part 256-byte aligned):
//   x̃ (m_alloc, k_pad) int8 or fp16        all kinds (B1: the a-bit integers before slicing)
//   x planes (m_alloc, n_chunks, 8, 8) u32  B1: bit p of q over the chunk's 8 words of 32 columns
//   (a_s, a_z) (m_alloc, n_groups) float2
//   (a_s, a_z) (n_groups, m_alloc) float2   A8_WG: the same, transposed (a tile's rows of a group in a row)
//   codes (n_alloc, k_pad) int8            A8, A16, A8_WG: the unpacked weights
//   (s_k, z_k) (n_groups, n_alloc) float2   A8_WG: the column terms at the call's k
// The activations come first, so their place depends only on (m, k, group_size, kind): linears that
// read the same x but differ in n find the prepared x at the same offset.
struct GemmScratch {
    int8_t* codes;      // null for B1
    void* acts;
    uint32_t* aplanes;  // null for A8, A16, A8_WG
    float2* aparams;
    float2* aparams_t;  // A8_WG only
    float2* wparams_t;  // A8_WG only
};

size_t codes_bytes(const GemmGeometry& g, BitplaneGemmKind kind) {
    return kind == BITPLANE_GEMM_B1 ? 0 : align256(size_t(g.n_alloc) * size_t(g.k_pad));
}
size_t aplanes_bytes(const GemmGeometry& g, BitplaneGemmKind kind) {
    return kind == BITPLANE_GEMM_B1 ? align256(size_t(g.m_alloc) * size_t(n_chunks(g)) * 256) : 0;
}
size_t aparams_t_bytes(const GemmGeometry& g, BitplaneGemmKind kind) {
    return wgmma_kind(kind) ? align256(size_t(g.m_alloc) * size_t(g.n_groups) * sizeof(float2)) : 0;
}
size_t wparams_t_bytes(const GemmGeometry& g, BitplaneGemmKind kind) {
    return wgmma_kind(kind) ? align256(size_t(g.n_alloc) * size_t(g.n_groups) * sizeof(float2)) : 0;
}

size_t gemm_scratch_bytes(const GemmGeometry& g, BitplaneGemmKind kind) {
    return codes_bytes(g, kind) + align256(size_t(g.m_alloc) * size_t(g.k_pad) * size_t(act_bytes(kind))) +
           aplanes_bytes(g, kind) + align256(size_t(g.m_alloc) * size_t(g.n_groups) * sizeof(float2)) +
           aparams_t_bytes(g, kind) + wparams_t_bytes(g, kind);
}

GemmScratch carve(const GemmGeometry& g, BitplaneGemmKind kind, void* ws) {
    uint8_t* p = static_cast<uint8_t*>(ws);
    GemmScratch s{};
    s.acts = p;
    p += align256(size_t(g.m_alloc) * size_t(g.k_pad) * size_t(act_bytes(kind)));
    s.aplanes = kind == BITPLANE_GEMM_B1 ? reinterpret_cast<uint32_t*>(p) : nullptr;
    p += aplanes_bytes(g, kind);
    s.aparams = reinterpret_cast<float2*>(p);
    p += align256(size_t(g.m_alloc) * size_t(g.n_groups) * sizeof(float2));
    s.aparams_t = wgmma_kind(kind) ? reinterpret_cast<float2*>(p) : nullptr;
    p += aparams_t_bytes(g, kind);
    s.codes = kind == BITPLANE_GEMM_B1 ? nullptr : reinterpret_cast<int8_t*>(p);
    p += codes_bytes(g, kind);
    s.wparams_t = wgmma_kind(kind) ? reinterpret_cast<float2*>(p) : nullptr;
    return s;
}

// ---- device helpers -----------------------------------------------------------------------------

// See bitplane_matmul.cu: the k a kernel runs at, from device memory when bits_dev is set (clamped
// to 2..bits, the planes present).
__device__ __forceinline__ int gemm_effective_bits(const int32_t* bits_dev, int bits) {
    return bits_dev ? max(2, min(bits, __ldg(bits_dev))) : bits;
}

#if defined(FLEXQUANT_SIMT)  // the CPU stand-in for CUDA (tests/cuda_host/simt): done at the wait
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) { simt::copy16(smem, gmem); }
__device__ __forceinline__ void cp_async_commit() { simt::cp_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { simt::cp_wait(N); }
#else
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
#endif

using wg::small_int_to_float;  // exact int32 -> fp32 for |v| < 2^22 (bitplane_wgmma.cuh)

// The column terms of the A8/A16 GEMMs' fp32 steps, at k of max_bits planes (docs/format.md):
// s_k = s · 2^(B−k), z_k = m_k + s_k · 2^(k−1), m_k = m + s · (2^(B−k) − 1) / 2. One definition for the
// mma.sync and the wgmma GEMMs, so that both round alike.
struct A8WeightTerms {
    float scale_mul, min_mul, centre;
    __device__ A8WeightTerms(int kb, int max_bits)
        : scale_mul(float(1 << (max_bits - kb))),
          min_mul(0.5f * float((1 << (max_bits - kb)) - 1)),
          centre(float(1 << (kb - 1))) {}
    __device__ float2 operator()(__half2 q) const {  // q = (s, m) of one column and group
        const float2 sm = __half22float2(q);
        const float s_k = sm.x * scale_mul;
        return make_float2(s_k, (sm.y + sm.x * min_mul) + s_k * centre);
    }
};

// ---- 1. unpack: planes -> centred int8 codes ------------------------------------------------------

// codes (n_alloc, k_pad) int8: ĉ[row, i] = c_k[row, i] − 2^(k−1) for row < n (rows n..n_alloc are
// not written: their outputs are never stored, and int codes cannot poison valid rows). One thread
// per 32-bit word of plane 0, in storage order: word w of the plane sits at byte 4w = row tile rt
// (k_pad bytes each) -> super-chunk s (512 bytes, W = 4 words per lane but fewer in a short last
// one) -> lane 4g + t -> word j, and holds K [512s + 128j + 32t, +32) of row 8rt + g.
static __global__ void __launch_bounds__(256)
unpack_codes_kernel(const uint8_t* __restrict__ planes,  // (bits, plane_bytes)
                    uint64_t plane_bytes, const int32_t* __restrict__ bits_dev, int bits,
                    int8_t* __restrict__ codes,           // (n_alloc, k_pad)
                    int64_t n, int64_t k_pad) {
    const int kb = gemm_effective_bits(bits_dev, bits);
    const int64_t words = int64_t(plane_bytes / 4);
    for (int64_t wi = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; wi < words;
         wi += int64_t(gridDim.x) * blockDim.x) {
        const int64_t byte = wi * 4;
        const int64_t rt = byte / k_pad, in_tile = byte % k_pad;
        const int64_t s0 = in_tile / 512 * 512, in_super = in_tile - s0;
        const int64_t W = min(int64_t(4), (k_pad - s0) / 128);
        const int64_t lane = in_super / (4 * W), j = (in_super / 4) % W;
        const int64_t row = rt * 8 + lane / 4;
        if (row >= n) continue;  // padding rows of the last tile
        const int64_t k0 = s0 + 128 * j + 32 * (lane % 4);

        uint32_t out[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // out[q] byte b = code of K k0 + 4q + b
        for (int p = 0; p < kb; ++p) {
            const uint32_t word = __ldcs(reinterpret_cast<const uint32_t*>(planes + uint64_t(p) * plane_bytes) + wi);
            const int shift = kb - 1 - p;  // plane 0 is the MSB of the k-bit code
#pragma unroll
            for (int q = 0; q < 8; ++q) {
                const uint32_t nib = (word >> (4 * q)) & 0xFu;  // bit b of the word = K k0 + b
                out[q] |= ((nib * 0x00204081u) & 0x01010101u) << shift;
            }
        }
        const uint32_t half = 0x01010101u * (1u << (kb - 1));
        uint4* dst = reinterpret_cast<uint4*>(codes + row * k_pad + k0);  // 32-byte aligned: k_pad % 128 == 0
        dst[0] = make_uint4(__vsub4(out[0], half), __vsub4(out[1], half), __vsub4(out[2], half), __vsub4(out[3], half));
        dst[1] = make_uint4(__vsub4(out[4], half), __vsub4(out[5], half), __vsub4(out[6], half), __vsub4(out[7], half));
    }
}

// ---- 2. prepare: x -> x̃ and the per-group activation terms ----------------------------------------

// Block r = activation row r; warp w takes groups w, w + 8, ...; the lanes stride over the group's
// columns. INT (A8, B1): a_s = absmax / qmax and q = rint(x / a_s) in [-qmax, qmax] (0 for a group of
// zeros), qmax = 2^(a-1) - 1: the same fp32 operations as the GEMV's bitplane_prepare_tc_kernel
// (qmax = 127) and the CPU op quantize_activations; a_z = a_s · Σq, so the result is W_k · x̂
// (x̂ = a_s · q) exactly up to fp32 rounding. A16: x̃ = fp16(x) (round to nearest, saturating at
// ±65504), a_s = 1, a_z = Σ fp16(x) in fp32. Columns k..k_pad are zeroed, so the codes of the K padding multiply
// zeros, and rows m..m_alloc are all zeros (the GEMM reads whole tiles; nothing it reads is unset).
// aparams_t, when set (A8_WG), gets (a_s, a_z) transposed too. Grid: m_alloc blocks.
template <bool INT>
static __global__ void __launch_bounds__(PREP_THREADS)
gemm_prepare_kernel(const float* __restrict__ x,      // (m, k)
                    int64_t m, int64_t k, int64_t k_pad, int64_t n_groups, int group_size, int qmax,
                    void* __restrict__ acts,           // (m_alloc, k_pad) int8 (INT) or fp16
                    float2* __restrict__ aparams,      // (m_alloc, n_groups)
                    float2* __restrict__ aparams_t) {  // (n_groups, m_alloc) or null
    const int64_t r = blockIdx.x, m_alloc = gridDim.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n_warps = PREP_THREADS / 32;
    const float* xr = x + r * k;
    int8_t* q8 = static_cast<int8_t*>(acts) + r * k_pad;
    __half* h16 = static_cast<__half*>(acts) + r * k_pad;
    if (r >= m) {  // a padding row
        for (int64_t c = threadIdx.x; c < k_pad; c += PREP_THREADS) {
            if (INT) q8[c] = 0;
            else h16[c] = __float2half_rn(0.0f);
        }
        for (int64_t g = threadIdx.x; g < n_groups; g += PREP_THREADS) {
            aparams[r * n_groups + g] = make_float2(0.0f, 0.0f);
            if (aparams_t) aparams_t[g * m_alloc + r] = make_float2(0.0f, 0.0f);
        }
        return;
    }
    const float fqmax = float(qmax);
    for (int64_t g = warp; g < n_groups; g += n_warps) {
        const int64_t c0 = g * group_size, c1 = min(k, c0 + group_size);
        if (INT) {
            float amax = 0.0f;
            for (int64_t c = c0 + lane; c < c1; c += 32) amax = fmaxf(amax, fabsf(xr[c]));
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(FULL, amax, o));
            const float scale = amax / fqmax;  // IEEE division, as numpy's amax / float32(qmax)
            int qsum = 0;                      // exact: |Σq| <= 127 · group_size
            for (int64_t c = c0 + lane; c < c1; c += 32) {
                const int q = scale > 0.0f ? max(-qmax, min(qmax, int(rintf(xr[c] / scale)))) : 0;
                q8[c] = int8_t(q);
                qsum += q;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) qsum += __shfl_xor_sync(FULL, qsum, o);
            if (lane == 0) {
                aparams[r * n_groups + g] = make_float2(scale, scale * float(qsum));
                if (aparams_t) aparams_t[g * m_alloc + r] = make_float2(scale, scale * float(qsum));
            }
        } else {
            float sum = 0.0f;
            for (int64_t c = c0 + lane; c < c1; c += 32) {
                const __half h = __float2half_rn(mma::fp16_saturate(xr[c]));  // ±65504, as the GEMV
                h16[c] = h;
                sum += __half2float(h);
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(FULL, sum, o);
            if (lane == 0) aparams[r * n_groups + g] = make_float2(1.0f, sum);
        }
    }
    for (int64_t c = k + threadIdx.x; c < k_pad; c += PREP_THREADS) {  // K padding
        if (INT) q8[c] = 0;
        else h16[c] = __float2half_rn(0.0f);
    }
}

// ---- 3. the tensor-core GEMM ------------------------------------------------------------------------

// What differs between the two GEMMs: the activation element, the K tile and step, the mma.
// Shared-memory stages of the K pipeline: two K tiles in flight while one is computed (one block of
// 8 warps per SM leaves only the pipeline to hide the L2 latency).
constexpr int STAGES = 3;

struct GemmA8Traits {
    static constexpr bool INT = true;
    static constexpr int BK = 64;              // K per shared-memory tile
    static constexpr int KSTEP = 32;           // K per mma
    static constexpr int A_ROW = BK;           // bytes of one x̃ row per tile
    static constexpr int B_ROW = BK;           // bytes of one code row per tile
    using Acc = int;
};
struct GemmA16Traits {
    static constexpr bool INT = false;
    static constexpr int BK = 32;
    static constexpr int KSTEP = 16;
    static constexpr int A_ROW = 2 * BK;
    static constexpr int B_ROW = BK;
    using Acc = float;
};

// The tile row of 16-byte chunk c (of PER_ROW per row) that the GEMM's cp.async copies. A 16-byte
// access is served 8 lanes at a time, and 8 chunks span 2 rows of 64 bytes (4 of 32): consecutive
// rows, SMEM_PAD apart, would share 4 banks (stride 80 bytes: banks 0-15, then 20-31 and 0-3), a 2-way
// conflict on every store. Within each group of 8 rows, lanes 8p..8p+7 take rows p, p + PER_ROW, ...
// instead: row r starts at bank 4·((r·(PER_ROW + 1)) mod 8), so those rows cover the 32 banks once
// (rows p and p + 4 of 64 bytes, or p, p + 2, p + 4, p + 6 of 32 bytes). Each row is still read whole
// from global memory (full sectors). tests/test_simt_traffic.py measures the stores conflict-free.
template <int PER_ROW>
__device__ __forceinline__ int chunk_row(int c) {
    static_assert(PER_ROW == 2 || PER_ROW == 4 || PER_ROW == 8, "rows of 32, 64 or 128 bytes");
    const int in_group = c % (8 * PER_ROW);  // the chunks of 8 rows
    return c / (8 * PER_ROW) * 8 + in_group / 8 + (in_group % 8) / PER_ROW * PER_ROW;
}

// Dynamic shared memory of gemm_kernel<T>: STAGES x (BM x-tile rows + BN code rows), padded rows.
template <class T>
constexpr int gemm_smem_bytes() {
    return STAGES * (BM * (T::A_ROW + SMEM_PAD) + BN * (T::B_ROW + SMEM_PAD));
}

__device__ __forceinline__ void mma_tile(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(FLEXQUANT_SIMT)  // the CPU stand-in for CUDA (tests/cuda_host/simt): the same operands
    simt::mma_s8(c, a[0], a[1], a[2], a[3], b[0], b[1]);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
__device__ __forceinline__ void mma_tile(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(FLEXQUANT_SIMT)
    simt::mma_f16(c, a[0], a[1], a[2], a[3], b[0], b[1]);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Four 8x8 b16 matrices from shared memory (lanes 8i..8i+7 give the 16-byte row addresses of matrix
// i); thread t gets 4 bytes 4(t%4).. of row t/4 of each: exactly the s8 and f16 A fragments above
// (and the s8 B fragment), one instruction instead of four 32-bit loads.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint8_t* p) {
#if defined(FLEXQUANT_SIMT)  // the CPU stand-in for CUDA (tests/cuda_host/simt)
    simt::ldmatrix_x4(r, p);
#else
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

// Two int8 codes (K i, i+1) -> an f16x2 register, lower half = K i. Exact: |ĉ| <= 128.
__device__ __forceinline__ uint32_t codes_to_half2(const uint8_t* p) {
    const __half2 h = __floats2half2_rn(float(int8_t(p[0])), float(int8_t(p[1])));
    return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ float acc_to_float(int v) { return small_int_to_float(v); }
__device__ __forceinline__ float acc_to_float(float v) { return v; }

// Grid (n_alloc / BN, m_alloc / BM), 256 threads. acts (m_alloc, k_pad), codes (n_alloc, k_pad),
// aparams (m_alloc, n_groups) float2 (a_s, a_z), qparams (n, n_groups) half2 (s, m); y (m, n) fp32.
template <class T>
static __global__ void __launch_bounds__(THREADS, 1)
gemm_kernel(const uint8_t* __restrict__ acts, const int8_t* __restrict__ codes,
            const float2* __restrict__ aparams, const __half2* __restrict__ qparams,
            const int32_t* __restrict__ bits_dev, int bits, int max_bits,
            int64_t m, int64_t n, int64_t k_pad, int64_t n_groups, int group_size, float* __restrict__ y,
            bool accumulate) {
    constexpr int A_STRIDE = T::A_ROW + SMEM_PAD, B_STRIDE = T::B_ROW + SMEM_PAD;
    extern __shared__ __align__(16) uint8_t gemm_smem[];  // gemm_smem_bytes<T>(): A stages, then B stages
    uint8_t* const As = gemm_smem;
    uint8_t* const Bs = gemm_smem + STAGES * BM * A_STRIDE;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3;
    const int gid = lane >> 2, tig = lane & 3;
    const int64_t row0 = int64_t(blockIdx.y) * BM, col0 = int64_t(blockIdx.x) * BN;

    const A8WeightTerms terms(gemm_effective_bits(bits_dev, bits), max_bits);

    // This thread's cp.async chunks: fixed rows and columns of the tile for the whole K loop, so a
    // tile load is a pointer add (the profile of the first version: ~21 instructions per mma, the
    // 64-bit address and group arithmetic among them, against ~6 at the tensor-core rate).
    constexpr int A_PER_ROW = T::A_ROW / 16, B_PER_ROW = T::B_ROW / 16;
    constexpr int A_ITERS = BM * A_PER_ROW / THREADS, B_ITERS = BN * B_PER_ROW / THREADS;
    static_assert(A_ITERS * THREADS == BM * A_PER_ROW && B_ITERS * THREADS == BN * B_PER_ROW, "whole tiles");
    const size_t a_row_bytes = size_t(k_pad) * (T::A_ROW / T::BK);  // bytes per x̃ row in global memory
    const uint8_t* a_src[A_ITERS];
    const uint8_t* b_src[B_ITERS];
    int a_dst[A_ITERS], b_dst[B_ITERS];
#pragma unroll
    for (int it = 0; it < A_ITERS; ++it) {
        const int c = tid + it * THREADS, r = chunk_row<A_PER_ROW>(c), q = c % A_PER_ROW;
        a_src[it] = acts + (size_t(row0) + size_t(r)) * a_row_bytes + q * 16;
        a_dst[it] = r * A_STRIDE + q * 16;
    }
#pragma unroll
    for (int it = 0; it < B_ITERS; ++it) {
        const int c = tid + it * THREADS, r = chunk_row<B_PER_ROW>(c), q = c % B_PER_ROW;
        b_src[it] = reinterpret_cast<const uint8_t*>(codes) + (size_t(col0) + size_t(r)) * size_t(k_pad) + q * 16;
        b_dst[it] = r * B_STRIDE + q * 16;
    }
    auto load_tile = [&](int stage, int64_t k0) {
        const size_t a_off = size_t(k0) * (T::A_ROW / T::BK);
#pragma unroll
        for (int it = 0; it < A_ITERS; ++it) cp_async16(As + stage * (BM * A_STRIDE) + a_dst[it], a_src[it] + a_off);
#pragma unroll
        for (int it = 0; it < B_ITERS; ++it)
            cp_async16(Bs + stage * (BN * B_STRIDE) + b_dst[it], b_src[it] + size_t(k0));
    };
    // ldmatrix row addresses of this lane: A (and A8's B) fragments, see ldsm_x4
    const int a_lrow = (lane & 7) + 8 * ((lane >> 3) & 1), a_lbyte = 16 * (lane >> 4);
    const int b_lrow = (lane & 7) + 8 * (lane >> 4), b_lbyte = 16 * ((lane >> 3) & 1);

    typename T::Acc part[MT][NT][4];  // the current group's sums
    float acc[MT][NT][4];             // the result
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                part[i][j][e] = 0;
                acc[i][j][e] = 0.0f;
            }

    // The group parameters of this thread's 8 rows and 8 columns, loaded when the group starts and
    // used when it ends, so that their latency hides behind its k-steps (a load at the flush itself
    // stalled all 8 warps of the SM at once).
    float2 pa[MT][2];
    __half2 pq[NT][2];
    auto fetch = [&](int64_t g) {
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int64_t r = row0 + wm * WARP_M + i * 16 + gid + 8 * h;
                pa[i][h] = r < m && g < n_groups ? aparams[r * n_groups + g] : make_float2(0.0f, 0.0f);
            }
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int64_t col = col0 + wn * WARP_N + j * 8 + 2 * tig + c;
                pq[j][c] = col < n && g < n_groups ? qparams[col * n_groups + g] : __floats2half2_rn(0.0f, 0.0f);
            }
    };

    // Adds part · a_s · s_k (and, at the group's end, a_z · z_k) of the fetched group into acc, clears
    // part. Columns past n fetched zeros, so their s_k and z_k are 0.
    auto flush = [&](bool group_end) {
        float s_k[NT][2], z_k[NT][2];
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const float2 t = terms(pq[j][c]);
                s_k[j][c] = t.x;
                z_k[j][c] = t.y;
            }
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int h = e >> 1, c = e & 1;
                    float v = acc[i][j][e] + pa[i][h].x * s_k[j][c] * acc_to_float(part[i][j][e]);
                    if (group_end) v += pa[i][h].y * z_k[j][c];
                    acc[i][j][e] = v;
                    part[i][j][e] = 0;
                }
    };

    const int64_t k_tiles = k_pad / T::BK;
    const int group_steps = group_size / T::KSTEP;  // group_size is a multiple of 32 (the file format)
    int isteps = 0;   // k-steps accumulated in part since the last flush
    int gstep = 0;    // k-steps of the current group so far
    int64_t g_cur = 0;
    fetch(0);
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < k_tiles) load_tile(st, st * T::BK);
        cp_async_commit();  // possibly empty: one group per tile, so the counts below hold
    }
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
        const int64_t next = kt + STAGES - 1;
        if (next < k_tiles) load_tile(int(next % STAGES), next * T::BK);
        cp_async_commit();            // possibly empty, so that "all but the newest STAGES - 1" is tile kt
        cp_async_wait<STAGES - 1>();  // tile kt has landed (this thread's part; the barrier: all of it)
        __syncthreads();
        const uint8_t* as = As + int(kt % STAGES) * (BM * A_STRIDE);
        const uint8_t* bs = Bs + int(kt % STAGES) * (BN * B_STRIDE);
#pragma unroll
        for (int ks = 0; ks < T::BK / T::KSTEP; ++ks) {
            uint32_t a[MT][4], b[NT][2];
#pragma unroll
            for (int i = 0; i < MT; ++i)
                ldsm_x4(a[i], as + (wm * WARP_M + i * 16 + a_lrow) * A_STRIDE + ks * 32 + a_lbyte);
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                if (T::INT) {
                    if (j % 2 == 0) {  // columns j and j + 1: b[j][0], b[j][1], b[j+1][0], b[j+1][1]
                        uint32_t r4[4];
                        ldsm_x4(r4, bs + (wn * WARP_N + j * 8 + b_lrow) * B_STRIDE + ks * T::KSTEP + b_lbyte);
                        b[j][0] = r4[0];
                        b[j][1] = r4[1];
                        b[j + 1][0] = r4[2];
                        b[j + 1][1] = r4[3];
                    }
                } else {
                    const uint8_t* p = bs + (wn * WARP_N + j * 8 + gid) * B_STRIDE + ks * T::KSTEP;
                    b[j][0] = codes_to_half2(p + tig * 2);
                    b[j][1] = codes_to_half2(p + tig * 2 + 8);
                }
            }
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int j = 0; j < NT; ++j) mma_tile(part[i][j], a[i], b[j]);

            ++isteps;
            const bool last = kt + 1 == k_tiles && ks + 1 == T::BK / T::KSTEP;
            const bool group_end = ++gstep == group_steps || last;
            if (group_end || (T::INT && isteps == MAX_INT_STEPS)) {
                // Steps wholly in the K padding past the last group only multiplied zeros.
                if (g_cur < n_groups) flush(group_end);
                isteps = 0;
            }
            if (group_end) {
                fetch(++g_cur);
                gstep = 0;
            }
        }
        __syncthreads();  // the next iteration's load overwrites this stage
    }

#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int64_t r = row0 + wm * WARP_M + i * 16 + gid + 8 * (e >> 1);
                const int64_t col = col0 + wn * WARP_N + j * 8 + 2 * tig + (e & 1);
                if (r < m && col < n) y[r * n + col] = accumulate ? y[r * n + col] + acc[i][j][e] : acc[i][j][e];
            }
}


// ---- 3b. the warpgroup-MMA GEMM (A8_WG, Hopper sm_90a) ---------------------------------------------
//
// The A8 GEMM's arithmetic (same x̃, ĉ and fp32 expressions as gemm_kernel<GemmA8Traits>; an fp32 step
// per 128 K, which for groups of 128 are that kernel's steps exactly) on sm_90a's asynchronous
// warpgroup MMA; formula, tiling, shared-memory layout and fragment layout in bitplane_wgmma.cuh. The
// GPU tests compare it with the A8 GEMM and the references.
//
// Why: the mma.sync GEMM measured 155 TOP/s at m = 1024 on the H100 (one block of 8 warps per SM,
// latency-bound), and the goal of 1.6x cuBLAS fp16 (~1,100 TOP/s) is out of mma.sync's reach once the
// per-group fp32 steps share the issue slots. wgmma runs asynchronously from shared memory, so one
// warpgroup's fp32 steps overlap the other's tensor-core work, and TMA loads need no thread per byte.
//
// A block: a 128 x 128 tile of y, 384 threads. Warpgroup 0 produces (one thread issues the copies;
// setmaxnreg hands its registers to the others), warpgroups 1 and 2 consume (rows 64(w-1).. of the
// tile, all 128 columns: 2 x 64 int32 sums + 64 fp32 results per thread, up to 232 registers). Per stage
// the producer loads the x̃ tile (acts, 128 x 128 int8) and the code tile (codes, 128 x 128 int8) by
// TMA with the 128-byte swizzle, and the stage's group terms of the tile's rows (a_s, a_z) and columns
// (s_k, z_k) by 1 KB bulk copies from transposed copies, all completing on the stage's `full`
// barrier; each consumer warp arrives on `empty` when done with the stage. wg::STAGES in flight.
// Grid (m_alloc / 128, n_alloc / 128): x = row tiles, so the blocks that run together share a code
// tile through L2 and the codes come from HBM about once.

// acts tiles, code tiles, row terms, column terms, then the 2·STAGES barriers; + 1 KB to align.
constexpr int WG_SMEM_BYTES = wg::STAGES * (2 * wg::TILE_BYTES + 2 * wg::TERM_BYTES) + 2 * wg::STAGES * 8 + 1024;

// The sm_90a instructions: only that target's code has them, and the CPU stand-in for CUDA
// (tests/cuda_host/simt/hopper.h), which models each of them from the PTX ISA.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(FLEXQUANT_SIMT)
#define FQ_WGMMA_CODE 1
#endif

#if defined(FQ_WGMMA_CODE)
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

#if defined(FLEXQUANT_SIMT)  // the CPU stand-in: the same operands, the instructions as hopper.h models them
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) { simt::mbar_init(bar, count); }
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) { simt::mbar_arrive(bar, bytes); }
__device__ __forceinline__ void mbar_arrive(uint32_t bar) { simt::mbar_arrive(bar, 0); }
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) { simt::mbar_wait(bar, parity); }
__device__ __forceinline__ void fence_barrier_init() {}  // (the stand-in's barriers are visible at once)
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int32_t c0, int32_t c1, uint32_t bar) {
    simt::tma_load_2d(dst, map, c0, c1, bar);
}
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
    simt::bulk_load(dst, src, bytes, bar);
}
template <uint32_t N>
__device__ __forceinline__ void setmaxnreg_dec() { simt::setmaxnreg(N, false); }
template <uint32_t N>
__device__ __forceinline__ void setmaxnreg_inc() { simt::setmaxnreg(N, true); }
__device__ __forceinline__ void wgmma_fence() { simt::wgmma_fence(); }
__device__ __forceinline__ void wgmma_commit() { simt::wgmma_commit(); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { simt::wgmma_wait(N); }
#else
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Returns when the barrier's phase of this parity has completed (a fresh barrier counts its phase
// "before 0", parity 1, as complete).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n"
        ".reg .pred P1;\n"
        "LAB_WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
        "@P1 bra DONE;\n"
        "bra LAB_WAIT;\n"
        "DONE:\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
// The barriers' initialization visible to the other threads and to the TMA unit.
__device__ __forceinline__ void fence_barrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Box (c0 = K byte, c1 = row) of a 2-D tensor map -> shared memory, completing on bar.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int32_t c0, int32_t c1, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}
// `bytes` (a multiple of 16, both addresses 16-byte aligned) global -> shared, completing on bar.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}
// The warpgroup's registers per thread, down (giving them to the block's pool) or up (waiting for them).
template <uint32_t N>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N) : "memory"); }
template <uint32_t N>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N) : "memory"); }
// Before a batch of wgmma: the accumulators were read or written by plain code.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Until at most N committed groups of this warpgroup's wgmma are still running.
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
#endif

__device__ __forceinline__ uint64_t wg_desc(uint32_t addr) {  // K-major, 128-byte swizzle (see above)
    return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// d (64 x 128 int32 over the warpgroup) (+)= A (64 x 32 s8, desc a) · B (128 x 32 s8, desc b)ᵀ;
// scale_d = 0 starts a fresh sum.
__device__ __forceinline__ void wgmma_s8_64x128x32(int (&d)[64], uint64_t a, uint64_t b, int scale_d) {
#if defined(FLEXQUANT_SIMT)
    simt::wgmma_s8(d, 128, a, b, scale_d != 0);
#else
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p;\n"
        "}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
          "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
          "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
          "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
          "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
          "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
          "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
          "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
        : "l"(a), "l"(b), "r"(scale_d));
#endif
}
#endif  // FQ_WGMMA_CODE

// wparams_t (n_groups, n_alloc) float2 = (s_k, z_k) of column c in group g at the kernel's k (zeros for
// the padding columns n..n_alloc): the column terms the A8 GEMM computes in its flush, transposed so
// that a tile's 128 columns of one group are 1 KB in a row.
static __global__ void __launch_bounds__(256)
wg_column_terms_kernel(const __half2* __restrict__ qparams,  // (n, n_groups) (s, m)
                       const int32_t* __restrict__ bits_dev, int bits, int max_bits,
                       int64_t n, int64_t n_alloc, int64_t n_groups,
                       float2* __restrict__ wparams_t) {    // (n_groups, n_alloc)
    const int kb = gemm_effective_bits(bits_dev, bits);
    const A8WeightTerms t(kb, max_bits);
    const int64_t total = n_groups * n_alloc;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t g = i / n_alloc, c = i % n_alloc;
        wparams_t[i] = c < n ? t(qparams[c * n_groups + g]) : make_float2(0.0f, 0.0f);
    }
}

// One thread in a build or device without sm_90a writes 0 (see bitplane_gemm_wgmma_supported).
static __global__ void wg_probe_kernel(int* out) {
#if defined(FQ_WGMMA_CODE)
    *out = 1;
#else
    *out = 0;
#endif
}

// Grid (m_alloc / wg::BM, n_alloc / wg::BN), wg::THREADS threads, WG_SMEM_BYTES of dynamic shared memory.
// tm_acts: acts (m_alloc, k_pad) int8, tm_codes: codes (n_alloc, k_pad) int8, both boxes 128 x 128 with
// the 128-byte swizzle; aparams_t (n_groups, m_alloc) float2 (a_s, a_z); wparams_t (n_groups, n_alloc)
// float2 (s_k, z_k); y (m, n) fp32. k_stages = k_pad / 128; group_size a multiple of 128.
static __global__ void __launch_bounds__(wg::THREADS, 1)
wg_gemm_kernel(const __grid_constant__ CUtensorMap tm_acts, const __grid_constant__ CUtensorMap tm_codes,
               const float2* __restrict__ aparams_t, const float2* __restrict__ wparams_t,
               int64_t m, int64_t n, int64_t m_alloc, int64_t n_alloc, int k_stages, int group_size,
               float* __restrict__ y, bool accumulate) {
#if defined(FQ_WGMMA_CODE)
    extern __shared__ __align__(1024) uint8_t wg_smem[];
    // The 128-byte swizzle is a function of the address bits: tiles must start 1,024-byte aligned.
    const uint32_t base = (smem_u32(wg_smem) + 1023u) & ~1023u;
    const uint32_t acts_s = base;                                        // [STAGES][128][128] int8, swizzled
    const uint32_t codes_s = acts_s + wg::STAGES * wg::TILE_BYTES;       // [STAGES][128][128] int8, swizzled
    const uint32_t rterm_s = codes_s + wg::STAGES * wg::TILE_BYTES;      // [STAGES][128] (a_s, a_z)
    const uint32_t cterm_s = rterm_s + wg::STAGES * wg::TERM_BYTES;      // [STAGES][128] (s_k, z_k)
    const uint32_t full_s = cterm_s + wg::STAGES * wg::TERM_BYTES;       // [STAGES] mbarrier
    const uint32_t empty_s = full_s + wg::STAGES * 8;                    // [STAGES] mbarrier
    uint8_t* const smem_gen = wg_smem + (base - smem_u32(wg_smem));        // generic pointer of `base`

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t row0 = int64_t(blockIdx.x) * wg::BM, col0 = int64_t(blockIdx.y) * wg::BN;

    if (threadIdx.x == 0) {
        for (int s = 0; s < wg::STAGES; ++s) {
            mbar_init(full_s + 8 * s, 1);                // the producer's arrive (+ the bytes it expects)
            mbar_init(empty_s + 8 * s, wg::CONSUMERS / 32);  // lane 0 of every consumer warp
        }
        fence_barrier_init();
    }
    __syncthreads();

    if (warp < 4) {  // ---- the producer warpgroup ----
        setmaxnreg_dec<40>();
        if (warp == 0 && lane == 0) {
            constexpr uint32_t STAGE_BYTES = 2 * wg::TILE_BYTES + 2 * wg::TERM_BYTES;
            for (int s = 0; s < k_stages; ++s) {
                const int slot = s % wg::STAGES;
                const uint32_t round = uint32_t(s / wg::STAGES);
                mbar_wait(empty_s + 8 * slot, (round & 1u) ^ 1u);  // the consumers are done with the slot
                const uint32_t full = full_s + 8 * slot;
                mbar_expect_tx(full, STAGE_BYTES);
                const int64_t g = wg::stage_group(s, group_size);
                tma_load_2d(acts_s + slot * wg::TILE_BYTES, &tm_acts, s * wg::BK, int32_t(row0), full);
                tma_load_2d(codes_s + slot * wg::TILE_BYTES, &tm_codes, s * wg::BK, int32_t(col0), full);
                bulk_load(rterm_s + slot * wg::TERM_BYTES, aparams_t + g * m_alloc + row0, wg::TERM_BYTES, full);
                bulk_load(cterm_s + slot * wg::TERM_BYTES, wparams_t + g * n_alloc + col0, wg::TERM_BYTES, full);
            }
        }
        return;
    }

    // ---- the consumers ----
    // Two int32 accumulator sets: stage s's wgmma runs into one while the fp32 step of stage s - 1
    // reads the other, so a warpgroup's own tensor-core work overlaps its fp32 work (with one set,
    // both warpgroups, released by the same barrier, would tend to wait and then step together,
    // leaving the tensor cores idle during the steps). The loop is unrolled by two so that each set
    // is a fixed register array (a run-time choice would make the compiler wait for both), and shaped
    // so that the same wgmma is in flight at the top of every turn: with other shapes ptxas serialized
    // the wgmma (its warning C7514), as it does for any read of a set whose wgmma may still run.
    setmaxnreg_inc<232>();
    const int wgi = (warp >> 2) - 1, wq = warp & 3;
    const int row_lo = wgi * wg::WG_ROWS + wg::acc_row(wq, lane, 0);  // this thread's first tile row
    int part_a[wg::ACC], part_b[wg::ACC];
    float acc[wg::ACC];
#pragma unroll
    for (int q = 0; q < wg::ACC; ++q) {
        part_a[q] = part_b[q] = 0;
        acc[q] = 0.0f;
    }
    auto pin = [](int(&p)[wg::ACC]) {  // the compiler may not move accesses of p across this point
#pragma unroll
        for (int q = 0; q < wg::ACC; ++q) asm volatile("" : "+r"(p[q])::"memory");
    };
    // Stage s's products into `into` (a fresh sum).
    auto issue = [&](int s, int(&into)[wg::ACC]) {
        const int slot = s % wg::STAGES;
        mbar_wait(full_s + 8 * slot, uint32_t(s / wg::STAGES) & 1u);
        const uint32_t a_tile = acts_s + slot * wg::TILE_BYTES + wgi * wg::WG_ROWS * wg::BK;  // this warpgroup's rows
        const uint32_t b_tile = codes_s + slot * wg::TILE_BYTES;
        pin(into);
        wgmma_fence();  // into was read/written by plain code
#pragma unroll
        for (int kk = 0; kk < wg::BK / 32; ++kk)
            wgmma_s8_64x128x32(into, wg_desc(a_tile + 32 * kk), wg_desc(b_tile + 32 * kk), kk > 0);
        wgmma_commit();
    };
    // The fp32 step of stage s from `from` (its wgmma complete), then stage s's slot goes back to the
    // producer: one arrival per warp once all its lanes are done with the slot.
    auto step = [&](int s, int(&from)[wg::ACC]) {
        pin(from);
        const int slot = s % wg::STAGES;
        const auto* rt = reinterpret_cast<const wg::Term2*>(smem_gen + (rterm_s - base) + slot * wg::TERM_BYTES);
        const auto* ct = reinterpret_cast<const wg::Term4*>(smem_gen + (cterm_s - base) + slot * wg::TERM_BYTES);
        if (wg::stage_ends_group(s, k_stages, group_size))  // (two calls: no per-output select)
            wg::flush_stage<true>(acc, from, rt, ct, row_lo, lane);
        else
            wg::flush_stage<false>(acc, from, rt, ct, row_lo, lane);
        __syncwarp();
        if (lane == 0) mbar_arrive(empty_s + 8 * slot);
    };
    // In flight at the top of each turn: stage s in part_a.
    issue(0, part_a);
    for (int s = 0;; s += 2) {
        if (s + 1 >= k_stages) {
            wgmma_wait<0>();
            step(s, part_a);
            break;
        }
        issue(s + 1, part_b);
        wgmma_wait<1>();  // stage s's wgmma done
        step(s, part_a);
        if (s + 2 >= k_stages) {
            wgmma_wait<0>();
            step(s + 1, part_b);
            break;
        }
        issue(s + 2, part_a);
        wgmma_wait<1>();  // stage s + 1's
        step(s + 1, part_b);
    }

#pragma unroll
    for (int q = 0; q < wg::ACC; ++q) {
        const int64_t r = row0 + wgi * wg::WG_ROWS + wg::acc_row(wq, lane, q);
        const int64_t col = col0 + wg::acc_col(lane, q);
        if (r < m && col < n) y[r * n + col] = accumulate ? y[r * n + col] + acc[q] : acc[q];
    }
#else
    __trap();  // never launched: bitplane_gemm_wgmma_supported is false without sm_90a code
#endif
}

// ---- 4. the binary-tensor-core GEMM (B1, "W{k}A{a}", FlexQ style) ------------------------------------
//
//   y[r, n] = Σ_g a_s[r,g] · ( s_k[n,g] · I[r,n,g] + m_k[n,g] · Σ_{i∈g} q[r,i] )
//   I[r,n,g] = Σ_{i∈g} c_k[n,i] q[r,i] = Σ_{b<a} w_b Σ_{p<k} 2^(k-1-p) · popc(Xplane_b[r] AND Wplane_p[n])
//   w_b = 2^b (b < a-1), -2^(a-1) for the sign plane b = a-1 (two's complement of the a-bit q)
//
// mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc: A = 16 rows (token, activation plane b),
// B = the 8 rows of one weight row tile in one weight plane, exactly as stored (lane 4g+t's words
// j = 2c, 2c+1 of a super-chunk are b0, b1 of its 256-column chunk c; see bitplane_matmul.cu). The
// weight planes are folded by Horner (acc = 2·acc + mma), the activation planes by an exact integer
// butterfly across the lanes holding the same token, then one fp32 step per group. Groups narrower
// than 256 columns (32, 64, 128) run one masked pass per group (A words outside the group zeroed);
// groups of 256 and 512 sum their chunks first (wider ones are refused: the integer sums must stay
// exact in fp32). A_ROWS = 8 rows (planes) per token for
// a = 5..8, 4 for a = 2..4 (4 tokens per mma instead of 2): the b1 work is a x k binary products per
// weight and token, so W6A6 runs at most 10,675 / 36 ≈ 296 effective TOP/s on an H100 and W6A8 at
// ≈ 222 (issue 6's facts), under s8's 1,301: this path exists to be measured, not to win there.
// Warp = one row tile (8 outputs) x 16 tokens; block = 8 warps along n; grid (m_alloc/16, ceil(n_tiles/8)):
// tokens along x, so that the blocks running together share the weights (L2), and x has room for
// long prompts (m_alloc/16 can exceed y's 65535).

constexpr int B1_TOKENS = 16;  // tokens per warp
constexpr int B1_WARPS = 8;    // row tiles per block

// q (m_alloc, k_pad) int8 -> planes (m_alloc, n_chunks, 8, 8) uint32: word w of plane b of chunk c
// holds bit b (two's complement) of q[32(8c + w) + i] at bit i. One warp per (row, word); the words
// past k_pad (a short last chunk) are zeros.
static __global__ void __launch_bounds__(256)
gemm_slice_kernel(const int8_t* __restrict__ q, int64_t k_pad, int64_t chunks, int64_t rows,
                  uint32_t* __restrict__ planes) {
    const int lane = threadIdx.x & 31;
    const int64_t words = chunks * 8;
    for (int64_t item = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; item < rows * words;
         item += (int64_t(gridDim.x) * blockDim.x) >> 5) {
        const int64_t r = item / words, w = item % words;
        const int64_t col = 32 * w + lane;
        const int v = col < k_pad ? int(q[r * k_pad + col]) : 0;
        uint32_t mine = 0;
#pragma unroll
        for (int b = 0; b < 8; ++b) {
            const uint32_t word = __ballot_sync(FULL, (v >> b) & 1);
            if (lane == b) mine = word;
        }
        if (lane < 8) planes[((r * chunks + w / 8) * 8 + lane) * 8 + (w % 8)] = mine;
    }
}

__device__ __forceinline__ void mma_b1(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(FLEXQUANT_SIMT)  // the CPU stand-in for CUDA (tests/cuda_host/simt): the same operands
    simt::mma_b1(c, a[0], a[1], a[2], a[3], b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <int A_ROWS>
static __global__ void __launch_bounds__(B1_WARPS * 32, 1)
gemm_b1_kernel(const uint8_t* __restrict__ wplanes, uint64_t plane_bytes,  // (bits, plane_bytes) tc8x512
               const __half2* __restrict__ qparams,                         // (n, n_groups) (s, m)
               const uint32_t* __restrict__ aplanes,                        // (m_alloc, n_chunks, 8, 8)
               const float2* __restrict__ aparams,                          // (m_alloc, n_groups) (a_s, a_z)
               const int32_t* __restrict__ bits_dev, int bits, int max_bits, int act_bits,
               int64_t m, int64_t n, int64_t k_pad, int64_t n_groups, int group_size, float* __restrict__ y,
            bool accumulate) {
    constexpr int TPM = 16 / A_ROWS;          // tokens per mma
    constexpr int TILES = B1_TOKENS / TPM;    // mma tiles per warp (8 or 4)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, t = lane & 3;
    const int64_t rt = int64_t(blockIdx.y) * B1_WARPS + warp;
    if (rt * 8 >= n) return;  // no block-wide synchronization below: a warp past the last tile just leaves
    const int64_t tok0 = int64_t(blockIdx.x) * B1_TOKENS;
    const int64_t chunks = ceil_div(k_pad, 256);

    const int kb = gemm_effective_bits(bits_dev, bits);
    const float scale_mul = float(1 << (max_bits - kb));
    const float min_mul = 0.5f * float((1 << (max_bits - kb)) - 1);
    // This lane's two mma rows (gid, gid + 8) in every tile: the activation plane and the weight of
    // that plane in the butterfly (0 for planes >= a: their bits are the sign extension).
    const int plane = gid % A_ROWS;
    const int wb = plane < act_bits - 1 ? (1 << plane) : plane == act_bits - 1 ? -(1 << plane) : 0;
    auto token_of = [&](int i, int h) { return tok0 + int64_t(i) * TPM + (gid + 8 * h) / A_ROWS; };

    int gacc[TILES][4];  // the current group's Horner sums, per (token, activation plane) row
    float acc[TILES][4];
#pragma unroll
    for (int i = 0; i < TILES; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) gacc[i][e] = 0, acc[i][e] = 0.0f;

    // Folds gacc of group g into acc, clears gacc.
    auto flush = [&](int64_t g) {
        float s_k[2], m_k[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const int64_t col = rt * 8 + 2 * t + c;
            const float2 sm = col < n ? __half22float2(qparams[col * n_groups + g]) : make_float2(0.0f, 0.0f);
            s_k[c] = sm.x * scale_mul;
            m_k[c] = sm.y + sm.x * min_mul;
        }
#pragma unroll
        for (int i = 0; i < TILES; ++i) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int v = gacc[i][e] * wb;  // |v| <= 512 · 255 · 128 < 2^24: exact in int32 and as a float
#pragma unroll
                for (int o = 4; o < 4 * A_ROWS; o <<= 1) v += __shfl_xor_sync(FULL, v, o);  // the token's planes
                gacc[i][e] = 0;
                const float2 ap = aparams[token_of(i, e >> 1) * n_groups + g];  // padding rows: zeros
                acc[i][e] += ap.x * s_k[e & 1] * float(v) + ap.y * m_k[e & 1];
            }
        }
    };

    const int64_t n_super = ceil_div(k_pad, 512);
    const int sub = group_size < 256 ? 256 / group_size : 1;  // masked passes per chunk
    for (int64_t s = 0; s < n_super; ++s) {
        const int W = int(min(int64_t(4), (k_pad - s * 512) / 128));  // words per lane of this super-chunk
        uint32_t P[8][4];
        const uint8_t* tile_s = wplanes + uint64_t(rt) * uint64_t(k_pad) + uint64_t(s) * 512;
#pragma unroll
        for (int p = 0; p < 8; ++p)
#pragma unroll
            for (int j = 0; j < 4; ++j)
                P[p][j] = (p < kb && j < W) ? __ldcs(reinterpret_cast<const uint32_t*>(tile_s + p * plane_bytes) + lane * W + j) : 0u;
#pragma unroll
        for (int c = 0; c < 2; ++c) {  // unrolled, so that P[p][2c] stays in registers
            if (c >= (W + 1) / 2) break;
            const int64_t chunk = 2 * s + c;
            uint32_t A[TILES][4];
#pragma unroll
            for (int i = 0; i < TILES; ++i) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {  // a0/a2: row gid, a1/a3: row gid + 8
                    const uint32_t* src = aplanes + ((token_of(i, h) * chunks + chunk) * 8 + plane) * 8;
                    A[i][h] = src[t];          // columns 32t .. 32t + 31 of the chunk
                    A[i][2 + h] = src[4 + t];  // columns 128 + 32t ..
                }
            }
            for (int ps = 0; ps < sub; ++ps) {
                // pass ps covers the chunk's columns [ps·G, (ps+1)·G) when G < 256, all of it otherwise
                const bool lo = sub == 1 || (32 * t) / group_size == ps;
                const bool hi = sub == 1 || (128 + 32 * t) / group_size == ps;
#pragma unroll
                for (int i = 0; i < TILES; ++i) {
                    const uint32_t a[4] = {lo ? A[i][0] : 0u, lo ? A[i][1] : 0u, hi ? A[i][2] : 0u, hi ? A[i][3] : 0u};
                    int h4[4] = {0, 0, 0, 0};
#pragma unroll
                    for (int p = 0; p < 8; ++p) {
                        if (p < kb) {
#pragma unroll
                            for (int e = 0; e < 4; ++e) h4[e] *= 2;
                            mma_b1(h4, a, P[p][2 * c], P[p][2 * c + 1]);
                        }
                    }
#pragma unroll
                    for (int e = 0; e < 4; ++e) gacc[i][e] += h4[e];
                }
                const int64_t k_end = chunk * 256 + (sub == 1 ? 256 : (ps + 1) * group_size);  // columns done
                const int64_t g = (k_end - 1) / group_size;
                const bool group_end = k_end % group_size == 0 || k_end >= k_pad;
                if (group_end && g < n_groups) flush(g);
            }
        }
    }

#pragma unroll
    for (int i = 0; i < TILES; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int64_t r = token_of(i, e >> 1);
            const int64_t col = rt * 8 + 2 * t + (e & 1);
            // every lane of the butterfly holds the sum: the lanes of plane 0 store it
            if (plane == 0 && r < m && col < n) y[r * n + col] = accumulate ? y[r * n + col] + acc[i][e] : acc[i][e];
        }
}

// ---- launchers --------------------------------------------------------------------------------------

void check(bool ok, const std::string& fn, const std::string& what) {
    if (!ok) throw Error(fn + ": " + what);
}

// The planes -> codes launch (A8, A16), and zeros in the code rows n..n_alloc that the GEMM tiles read.
void unpack_launch(const GemmGeometry& g, const uint8_t* planes, uint64_t plane_bytes, const int32_t* bits_dev,
                   int bits, int8_t* codes, cudaStream_t stream) {
    if (g.n_alloc > g.n)
        cuda_check(cudaMemsetAsync(codes + g.n * g.k_pad, 0, size_t(g.n_alloc - g.n) * size_t(g.k_pad), stream),
                   "bitplane_gemm (zero the code padding rows)");
    const int64_t words = int64_t(plane_bytes / 4);
    const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(words, 256), int64_t(1) << 16));
    unpack_codes_kernel<<<blocks, 256, 0, stream>>>(planes, plane_bytes, bits_dev, bits, codes, g.n, g.k_pad);
}

// What a call prepares from the weights: the codes (A8, A16, A8_WG) and the transposed column terms
// (A8_WG). Nothing for B1, which reads the planes.
void weights_launch(const GemmGeometry& g, const uint8_t* planes, uint64_t plane_bytes, const uint16_t* qparams,
                    const int32_t* bits_dev, int bits, int max_bits, BitplaneGemmKind kind, const GemmScratch& sc,
                    cudaStream_t stream) {
    if (kind == BITPLANE_GEMM_B1) return;
    unpack_launch(g, planes, plane_bytes, bits_dev, bits, sc.codes, stream);
    if (wgmma_kind(kind)) {
        const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(g.n_groups * g.n_alloc, 256), int64_t(1) << 16));
        wg_column_terms_kernel<<<blocks, 256, 0, stream>>>(reinterpret_cast<const __half2*>(qparams), bits_dev, bits,
                                                           max_bits, g.n, g.n_alloc, g.n_groups, sc.wparams_t);
    }
}

void prepare_launch(const GemmGeometry& g, const float* x, BitplaneGemmKind kind, int act_bits, const GemmScratch& sc,
                    cudaStream_t stream) {
    const unsigned blocks = unsigned(g.m_alloc);  // rows m..m_alloc are zeroed
    if (kind == BITPLANE_GEMM_A16) {
        gemm_prepare_kernel<false><<<blocks, PREP_THREADS, 0, stream>>>(x, g.m, g.k, g.k_pad, g.n_groups, g.group_size,
                                                                        0, sc.acts, sc.aparams, nullptr);
        return;
    }
    const int qmax = (1 << (act_bits - 1)) - 1;
    gemm_prepare_kernel<true><<<blocks, PREP_THREADS, 0, stream>>>(x, g.m, g.k, g.k_pad, g.n_groups, g.group_size, qmax,
                                                                   sc.acts, sc.aparams, sc.aparams_t);
    if (kind == BITPLANE_GEMM_B1) {
        const int64_t warps = g.m_alloc * n_chunks(g) * 8;
        const unsigned sblocks = unsigned(std::min<int64_t>(ceil_div(warps, 8), int64_t(1) << 16));
        gemm_slice_kernel<<<sblocks, 256, 0, stream>>>(static_cast<const int8_t*>(sc.acts), g.k_pad, n_chunks(g),
                                                       g.m_alloc, sc.aplanes);
    }
}

// cuTensorMapEncodeTiled from the driver, found at run time (the engine links no libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
        void* fn = nullptr;
        cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
        const cudaError_t err =
            cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
#else  // (the versioned query is CUDA 12.5+)
        const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
        if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
            cudaGetLastError();
            fn = nullptr;
        }
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    }();
    return encode;
}

// A row-major (rows, row_bytes) int8 matrix as TMA sees it: boxes of 128 rows x 128 bytes, 128-byte
// swizzle (the layout wg_desc describes). rows and row_bytes are multiples of 128, base 256-aligned.
CUtensorMap tensor_map_128(const void* base, int64_t rows, int64_t row_bytes, const std::string& fn) {
    const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
    check(encode != nullptr, fn, "the CUDA driver offers no cuTensorMapEncodeTiled (the wgmma GEMM needs CUDA 12+)");
    CUtensorMap map{};
    const cuuint64_t dims[2] = {cuuint64_t(row_bytes), cuuint64_t(rows)};
    const cuuint64_t strides[1] = {cuuint64_t(row_bytes)};  // bytes between rows (dimension 1)
    const cuuint32_t box[2] = {wg::BK, wg::BM}, elem_strides[2] = {1, 1};
    const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(base), dims, strides, box,
                              elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    check(r == CUDA_SUCCESS, fn, "cuTensorMapEncodeTiled failed (CUresult " + std::to_string(int(r)) + ") for a (" +
                                     std::to_string(rows) + ", " + std::to_string(row_bytes) + ") int8 matrix");
    return map;
}

bool wgmma_supported(int group_size, bool may_probe);  // (below, with bitplane_gemm_wgmma_supported)

void wg_gemm_launch(const GemmGeometry& g, const GemmScratch& sc, float* y, cudaStream_t stream, bool accumulate) {
    const std::string fn = "bitplane_gemm (A8_WG)";
    // (a launch of the trap branch would end the CUDA context: refuse instead; while `stream` is
    // being captured, only an answer the engine's construction already cached counts)
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    const cudaError_t query = cudaStreamIsCapturing(stream, &capture);
    if (query != cudaSuccess) cudaGetLastError();  // (a failed query: no probe either)
    const bool may_probe = query == cudaSuccess && capture == cudaStreamCaptureStatusNone;
    check(wgmma_supported(g.group_size, may_probe), fn,
          "BITPLANE_GEMM_A8_WG needs a compute capability 9.0 GPU (Hopper) and a build with sm_90a code (and "
          "FLEXQUANT_CUDA_WGMMA_OFF unset)");
    const CUtensorMap tm_acts = tensor_map_128(sc.acts, g.m_alloc, g.k_pad, fn);
    const CUtensorMap tm_codes = tensor_map_128(sc.codes, g.n_alloc, g.k_pad, fn);
    static std::atomic<uint64_t> smem{0};  // devices whose limit is raised
    raise_dynamic_smem(wg_gemm_kernel, WG_SMEM_BYTES, smem, fn);
    const dim3 grid(unsigned(g.m_alloc / wg::BM), unsigned(g.n_alloc / wg::BN));
    wg_gemm_kernel<<<grid, wg::THREADS, WG_SMEM_BYTES, stream>>>(tm_acts, tm_codes, sc.aparams_t, sc.wparams_t, g.m, g.n,
                                                               g.m_alloc, g.n_alloc, int(g.k_pad / wg::BK),
                                                               g.group_size, y, accumulate);
}

void gemm_launch(const GemmGeometry& g, const uint8_t* planes, uint64_t plane_bytes, const uint16_t* qparams,
                 const int32_t* bits_dev, int bits, int max_bits, BitplaneGemmKind kind, int act_bits,
                 const GemmScratch& sc, float* y, cudaStream_t stream, bool accumulate = false) {
    const auto* qp = reinterpret_cast<const __half2*>(qparams);
    if (kind == BITPLANE_GEMM_B1) {
        // x = token blocks, so the blocks that run together share the weights (L2), y = row tiles
        const dim3 grid(unsigned(g.m_alloc / B1_TOKENS), unsigned(ceil_div(ceil_div(g.n, 8), B1_WARPS)));
        if (act_bits <= 4)
            gemm_b1_kernel<4><<<grid, B1_WARPS * 32, 0, stream>>>(planes, plane_bytes, qp, sc.aplanes, sc.aparams,
                                                                  bits_dev, bits, max_bits, act_bits, g.m, g.n, g.k_pad,
                                                                  g.n_groups, g.group_size, y, accumulate);
        else
            gemm_b1_kernel<8><<<grid, B1_WARPS * 32, 0, stream>>>(planes, plane_bytes, qp, sc.aplanes, sc.aparams,
                                                                  bits_dev, bits, max_bits, act_bits, g.m, g.n, g.k_pad,
                                                                  g.n_groups, g.group_size, y, accumulate);
        return;
    }
    if (wgmma_kind(kind)) {
        wg_gemm_launch(g, sc, y, stream, accumulate);
        return;
    }
    const dim3 grid(unsigned(g.n_alloc / BN), unsigned(g.m_alloc / BM));
    const auto* acts = static_cast<const uint8_t*>(sc.acts);
    static std::atomic<uint64_t> a8_smem{0}, a16_smem{0};  // devices whose limit is raised
    if (kind == BITPLANE_GEMM_A8)
        raise_dynamic_smem(gemm_kernel<GemmA8Traits>, gemm_smem_bytes<GemmA8Traits>(), a8_smem, "bitplane_gemm (A8)");
    else
        raise_dynamic_smem(gemm_kernel<GemmA16Traits>, gemm_smem_bytes<GemmA16Traits>(), a16_smem,
                           "bitplane_gemm (A16)");
    if (kind == BITPLANE_GEMM_A8)
        gemm_kernel<GemmA8Traits><<<grid, THREADS, gemm_smem_bytes<GemmA8Traits>(), stream>>>(acts, sc.codes, sc.aparams, qp, bits_dev, bits,
                                                                max_bits, g.m, g.n, g.k_pad, g.n_groups,
                                                                g.group_size, y, accumulate);
    else
        gemm_kernel<GemmA16Traits><<<grid, THREADS, gemm_smem_bytes<GemmA16Traits>(), stream>>>(acts, sc.codes, sc.aparams, qp, bits_dev, bits,
                                                                 max_bits, g.m, g.n, g.k_pad, g.n_groups,
                                                                 g.group_size, y, accumulate);
}

// All three launches of one product.
void run_launches(const GemmGeometry& g, const BitplaneLinear& w, const int32_t* bits_dev, int bits, const float* x,
                  BitplaneGemmKind kind, int act_bits, const GemmScratch& sc, float* y, cudaStream_t stream,
                  bool accumulate = false) {
    weights_launch(g, w.planes, w.plane_bytes, w.qparams, bits_dev, bits, w.max_bits, kind, sc, stream);
    prepare_launch(g, x, kind, act_bits, sc, stream);
    gemm_launch(g, w.planes, w.plane_bytes, w.qparams, bits_dev, bits, w.max_bits, kind, act_bits, sc, y, stream,
                accumulate);
}

// ---- validation --------------------------------------------------------------------------------------

// Resolves act_bits 0 to the kind's own (8, 16, 8) and checks everything about the call's shape.
int validate(const BitplaneLinear& w, int bits, int64_t m, BitplaneGemmKind kind, int act_bits, const std::string& fn) {
    check(kind == BITPLANE_GEMM_A8 || kind == BITPLANE_GEMM_A16 || kind == BITPLANE_GEMM_B1 ||
              kind == BITPLANE_GEMM_A8_WG,
          fn, "kind must be BITPLANE_GEMM_A8, _A16, _B1 or _A8_WG, got " + std::to_string(int(kind)));
    const int natural = kind == BITPLANE_GEMM_A16 ? 16 : 8;
    if (act_bits == 0) act_bits = natural;
    if (kind == BITPLANE_GEMM_B1)
        check(act_bits >= 2 && act_bits <= 8, fn, "act_bits must be in 2..8 for the B1 GEMM, got " + std::to_string(act_bits));
    else
        check(act_bits == natural, fn, "act_bits must be " + std::to_string(natural) + " (or 0) for this kind, got " +
                                           std::to_string(act_bits));
    check_bitplane_view(w, bits, m, fn);
    if (kind == BITPLANE_GEMM_B1)
        check(bitplane_gemm_b1_supports(w.group_size), fn,
              "the B1 GEMM needs group_size 32, 64, 128, 256 or 512, got " + std::to_string(w.group_size));
    if (wgmma_kind(kind)) {
        check(w.group_size % wg::BK == 0, fn,
              "the A8_WG GEMM needs a group_size that is a multiple of 128, got " + std::to_string(w.group_size));
        // (a stage's coordinate is an int32 TMA coordinate; k_stages an int)
        check(w.k <= int64_t(0x7fffff00), fn, "the A8_WG GEMM takes k up to 2^31 - 256, got " + std::to_string(w.k));
    }
    // Grid limits: tiles of n in x (2^31 - 1) or y (65535, B1: 64 rows each), m_alloc blocks of the
    // preparation in x, tiles of m in y (65535).
    check(ceil_div(w.n, BN) <= int64_t(0x7fffffff) && ceil_div(w.n, 64) <= 65535 && ceil_div(m, BM) <= 65535, fn,
          "too large: n=" + std::to_string(w.n) + ", m=" + std::to_string(m));
    return act_bits;
}

}  // namespace

// ---- entry points -----------------------------------------------------------------------------------------

bool bitplane_gemm_b1_supports(int group_size) {
    return group_size == 32 || group_size == 64 || group_size == 128 || group_size == 256 || group_size == 512;
}

bool bitplane_gemm_wgmma_supported(int group_size) { return wgmma_supported(group_size, true); }

namespace {
// may_probe false: the cached answer only (no probe yet: false). A launch being captured into a
// graph passes false: the probe's cudaMalloc / cudaFree / synchronization would break the capture.
bool wgmma_supported(int group_size, bool may_probe) {
    if (group_size <= 0 || group_size % wg::BK != 0) return false;
    if (cuda_env_flag("FLEXQUANT_CUDA_WGMMA_OFF")) return false;  // the user's (or gpu_check's) off switch
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64 ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    // sm_90a code runs on compute capability 9.0 only (a newer GPU would JIT the PTX of another
    // target, in which the kernel is a trap)
    if (major != 9 || minor != 0) return false;
    // Whether the loaded image has the sm_90a kernel (a build for other targets JIT-compiles the
    // plain PTX): asked of a probe from the same image once per device, so the answer holds for
    // later calls made while a graph is being captured (the engine asks at construction).
    static std::atomic<int> known[64];  // 0: not asked yet, 1: yes, 2: no
    const int k = known[dev].load();
    if (k != 0) return k == 1;
    if (!may_probe) return false;
    // setmaxnreg.inc to 232 waits until the block's registers allow it: 384 threads at 168 registers
    // (what ptxas gives __launch_bounds__(384, 1)) = 40 for the producers + 232 for the consumers.
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, wg_gemm_kernel) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    if (attr.numRegs * wg::THREADS < 40 * 128 + 232 * wg::CONSUMERS) {
        known[dev].store(2);
        return false;
    }
    int found = 0;
    int* d = nullptr;
    cudaStream_t st = nullptr;
    // relaxed: a capture in progress on another stream of this thread (global mode) would otherwise
    // forbid the allocation; the probe's stream is not captured
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaThreadExchangeStreamCaptureMode(&mode);
    const bool ok = cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) == cudaSuccess &&
                    cudaMalloc(&d, sizeof(int)) == cudaSuccess &&
                    (wg_probe_kernel<<<1, 1, 0, st>>>(d), cudaGetLastError() == cudaSuccess) &&
                    cudaMemcpyAsync(&found, d, sizeof(int), cudaMemcpyDeviceToHost, st) == cudaSuccess &&
                    cudaStreamSynchronize(st) == cudaSuccess;
    if (d) cudaFree(d);
    if (st) cudaStreamDestroy(st);
    cudaThreadExchangeStreamCaptureMode(&mode);  // back to the caller's mode
    cudaGetLastError();
    if (!ok) return false;  // not cached: a failure (e.g. during a capture) may pass
    known[dev].store(found == 1 ? 1 : 2);
    return found == 1;
}
}  // namespace

size_t bitplane_gemm_cuda_workspace(const BitplaneLinear& w, int64_t m, BitplaneGemmKind kind) {
    const std::string fn = "bitplane_gemm_cuda_workspace";
    validate(w, w.max_bits, m, kind, 0, fn);
    return gemm_scratch_bytes(gemm_geometry(w, m), kind);
}

namespace {
// The checks the device-resident entry points share; returns the resolved act_bits.
int validate_async(const BitplaneLinear& w, int bits, int64_t m, const void* workspace, size_t workspace_bytes,
                   BitplaneGemmKind kind, int act_bits, const std::string& fn) {
    act_bits = validate(w, bits, m, kind, act_bits, fn);
    check(w.planes && w.qparams && workspace, fn, "null pointer");
    check(reinterpret_cast<uintptr_t>(w.planes) % 4 == 0, fn, "planes must be 4-byte aligned");
    check(reinterpret_cast<uintptr_t>(w.qparams) % 4 == 0, fn, "qparams must be 4-byte aligned");
    check(reinterpret_cast<uintptr_t>(workspace) % 256 == 0, fn, "workspace must be 256-byte aligned");
    const size_t need = gemm_scratch_bytes(gemm_geometry(w, m), kind);
    check(workspace_bytes >= need, fn,
          "workspace holds " + std::to_string(workspace_bytes) + " bytes, needs " + std::to_string(need));
    return act_bits;
}
}  // namespace

void bitplane_gemm_cuda_async(const BitplaneLinear& w, int bits, const float* x, int64_t m, float* y, void* workspace,
                              size_t workspace_bytes, BitplaneGemmKind kind, CUstream_st* stream,
                              const int32_t* bits_dev, int act_bits, bool accumulate) {
    const std::string fn = "bitplane_gemm_cuda_async";
    act_bits = validate_async(w, bits, m, workspace, workspace_bytes, kind, act_bits, fn);
    if (m == 0) return;
    check(x && y, fn, "null pointer");
    const GemmGeometry g = gemm_geometry(w, m);
    run_launches(g, w, bits_dev, bits, x, kind, act_bits, carve(g, kind, workspace), y, stream, accumulate);
    cuda_check(cudaGetLastError(), fn + " (kernel launch)");
}

void bitplane_gemm_prepare_cuda_async(const BitplaneLinear& w, const float* x, int64_t m, void* workspace,
                                      size_t workspace_bytes, BitplaneGemmKind kind, CUstream_st* stream,
                                      int act_bits) {
    const std::string fn = "bitplane_gemm_prepare_cuda_async";
    act_bits = validate_async(w, w.max_bits, m, workspace, workspace_bytes, kind, act_bits, fn);
    if (m == 0) return;
    check(x != nullptr, fn, "null pointer");
    const GemmGeometry g = gemm_geometry(w, m);
    prepare_launch(g, x, kind, act_bits, carve(g, kind, workspace), stream);
    cuda_check(cudaGetLastError(), fn + " (kernel launch)");
}

void bitplane_gemm_prepared_cuda_async(const BitplaneLinear& w, int bits, int64_t m, float* y, void* workspace,
                                       size_t workspace_bytes, BitplaneGemmKind kind, CUstream_st* stream,
                                       const int32_t* bits_dev, int act_bits, bool accumulate) {
    const std::string fn = "bitplane_gemm_prepared_cuda_async";
    act_bits = validate_async(w, bits, m, workspace, workspace_bytes, kind, act_bits, fn);
    if (m == 0) return;
    check(y != nullptr, fn, "null pointer");
    const GemmGeometry g = gemm_geometry(w, m);
    const GemmScratch sc = carve(g, kind, workspace);
    weights_launch(g, w.planes, w.plane_bytes, w.qparams, bits_dev, bits, w.max_bits, kind, sc, stream);
    gemm_launch(g, w.planes, w.plane_bytes, w.qparams, bits_dev, bits, w.max_bits, kind, act_bits, sc, y, stream,
                accumulate);
    cuda_check(cudaGetLastError(), fn + " (kernel launch)");
}

void bitplane_gemm_cuda(const BitplaneLinear& w, int bits, const float* x, int64_t m, float* y,
                        BitplaneGemmKind kind, int act_bits, const float* y0) {
    const std::string fn = "bitplane_gemm_cuda";
    validate(w, bits, m, kind, act_bits, fn);
    check(w.planes && w.qparams && x && y, fn, "null pointer");
    if (m == 0) return;
    const DeviceLinear dw(w, bits, fn);
    const size_t ws_bytes = gemm_scratch_bytes(gemm_geometry(w, m), kind);
    DeviceBuffer<float> xd(size_t(m) * w.k, fn), yd(size_t(m) * w.n, fn);
    DeviceBuffer<uint8_t> ws(ws_bytes, fn);
    upload(xd, x, size_t(m) * w.k, fn + " x");
    start_output(yd, y0, size_t(m) * w.n, fn + " y");
    // The scratch is poisoned too: a scratch byte the kernels read without having written it shows
    // (NaN fp16 activations; 0xff codes and planes are wrong integers).
    cuda_check(cudaMemset(ws.get(), 0xff, ws_bytes), fn + " (poison workspace)");
    bitplane_gemm_cuda_async(dw.view, bits, xd.get(), m, yd.get(), ws.get(), ws_bytes, kind, nullptr, nullptr, act_bits,
                             y0 != nullptr);
    download(y, yd, size_t(m) * w.n, fn + " y");
}

void bitplane_unpack_codes_cuda(const BitplaneLinear& w, int bits, int8_t* codes) {
    const std::string fn = "bitplane_unpack_codes_cuda";
    validate(w, bits, 1, BITPLANE_GEMM_A8, 0, fn);
    check(w.planes && codes, fn, "null pointer");
    check(w.qparams != nullptr, fn, "null pointer");
    const GemmGeometry g = gemm_geometry(w, 1);
    const size_t count = size_t(w.n) * size_t(g.k_pad);
    const DeviceLinear dw(w, bits, fn);
    DeviceBuffer<int8_t> out(size_t(g.n_alloc) * size_t(g.k_pad), fn);
    cuda_check(cudaMemset(out.get(), 0x55, count), fn + " (poison)");
    unpack_launch(g, dw.view.planes, w.plane_bytes, nullptr, bits, out.get(), nullptr);
    cuda_check(cudaGetLastError(), fn + " (kernel launch)");
    download(codes, out, count, fn + " codes");
}

// ---- benchmark ------------------------------------------------------------------------------------------

namespace {

// Median microseconds per call of enqueue(i) over `reps` timed rounds of `calls` calls (after one
// untimed round), timed with events on `stream`.
template <class F>
double time_calls(cudaStream_t stream, int calls, int reps, const std::string& fn, F enqueue) {
    CudaEvent start(fn), stop(fn);
    std::vector<double> us;
    for (int rep = -1; rep < reps; ++rep) {
        cuda_check(cudaEventRecord(start.e, stream), fn);
        for (int i = 0; i < calls; ++i) enqueue(i);
        cuda_check(cudaGetLastError(), fn + " (launch)");
        cuda_check(cudaEventRecord(stop.e, stream), fn);
        cuda_check(cudaEventSynchronize(stop.e), fn);
        float ms = 0;
        cuda_check(cudaEventElapsedTime(&ms, start.e, stop.e), fn);
        if (rep >= 0) us.push_back(1000.0 * ms / calls);
    }
    std::sort(us.begin(), us.end());
    return us[us.size() / 2];
}
}  // namespace

BitplaneGemmTiming bitplane_gemm_cuda_bench(const BitplaneLinear& w, int bits, const float* x, int64_t m,
                                            BitplaneGemmKind kind, int reps, int act_bits) {
    const std::string fn = "bitplane_gemm_cuda_bench";
    act_bits = validate(w, bits, m, kind, act_bits, fn);
    check(m >= 1, fn, "m must be >= 1, got " + std::to_string(m));
    check(w.planes && w.qparams && x, fn, "null pointer");
    check(reps >= 1, fn, "reps must be >= 1, got " + std::to_string(reps));
    int device = 0;
    cuda_check(cudaGetDevice(&device), fn);
    cudaDeviceProp prop{};
    cuda_check(cudaGetDeviceProperties(&prop, device), fn);
    const size_t planes_bytes = size_t(bits) * w.plane_bytes;
    // Weight copies rotated so that the planes come from HBM, as in a forward pass (>= 4x L2, <= 4 GB).
    const size_t l2 = size_t(std::max(prop.l2CacheSize, 1 << 20));
    const int copies = int(std::clamp<size_t>((4 * l2 + planes_bytes - 1) / planes_bytes, 1,
                                              std::max<size_t>(1, (size_t(4) << 30) / planes_bytes)));
    std::vector<std::unique_ptr<DeviceLinear>> weight_copies;
    for (int c = 0; c < copies; ++c) weight_copies.push_back(std::make_unique<DeviceLinear>(w, bits, fn));
    const GemmGeometry g = gemm_geometry(w, m);
    const size_t ws_bytes = gemm_scratch_bytes(g, kind);
    DeviceBuffer<uint8_t> ws(ws_bytes, fn);
    DeviceBuffer<float> xd(size_t(m) * w.k, fn), yd(size_t(m) * w.n, fn);
    upload(xd, x, size_t(m) * w.k, fn + " x");
    cuda_check(cudaDeviceSynchronize(), fn + " (uploads complete)");
    const GemmScratch sc = carve(g, kind, ws.get());
    auto copy = [&](int i) -> const BitplaneLinear& { return weight_copies[size_t(i % copies)]->view; };

    CudaStream stream(fn);
    const int calls = std::max(copies, 8);
    BitplaneGemmTiming t;
    if (kind != BITPLANE_GEMM_B1)
        t.unpack_us = time_calls(stream.s, calls, reps, fn, [&](int i) {
            weights_launch(g, copy(i).planes, w.plane_bytes, copy(i).qparams, nullptr, bits, w.max_bits, kind, sc,
                           stream.s);
        });
    t.prepare_us = time_calls(stream.s, calls, reps, fn,
                              [&](int) { prepare_launch(g, xd.get(), kind, act_bits, sc, stream.s); });
    t.gemm_us = time_calls(stream.s, calls, reps, fn, [&](int i) {
        gemm_launch(g, copy(i).planes, w.plane_bytes, copy(i).qparams, nullptr, bits, w.max_bits, kind, act_bits, sc,
                    yd.get(), stream.s);
    });
    t.total_us = time_calls(stream.s, calls, reps, fn, [&](int i) {
        run_launches(g, copy(i), nullptr, bits, xd.get(), kind, act_bits, sc, yd.get(), stream.s);
    });
    t.copies = copies;
    return t;
}

}  // namespace flexquant

// y (m, n) = x (m, k) · W_kᵀ over a bit-plane linear, reading only its first k planes:
//
//   y[r, n] = Σ_g s_k[n,g] · Σ_{i∈g} c_k[n,i] x[r,i]  +  m_k[n,g] · Σ_{i∈g} x[r,i]
//   Σ_i c_k[n,i] x[i] = Σ_{p<k} 2^(k-1-p) · Σ_{i: bit of plane p set} x[i]
//   s_k = s · 2^(B-k),   m_k = m + s · (2^(B-k) - 1) / 2               (docs/format.md)
//
// The CUDA twin of cpp/src/ops/bitplane_matmul.cpp, for decode-sized m (each launch takes up to 8
// activation rows; the entry point slices larger m). Two kernel families (bitplane_matmul.cuh):
//
// TC ("W{k}A8", the fast path). Each activation row is quantized per weight group to int8
// (q = rint(x / (absmax/127))) and sliced into 8 two's-complement bit planes, laid out like the
// weights so that one 16-byte load per lane fetches them. One
//   mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc      (PTX ISA, "Warp-level Matrix
//   Multiply-Accumulate Instructions", m16n8k256 .b1 fragments)
// gives, for 8 weight rows (the B columns = one row tile) and 16 A rows, Σ_K popc(a AND b) over a
// 256-column chunk. A row = (activation bit plane g, "slot"), a slot being one (activation row,
// weight group) pair: groups narrower than 256 columns are separated by masking the A words that
// lie outside the slot's group. Weight planes are folded in by Horner (acc = 2·acc + mma), the 8
// activation planes by an exact integer butterfly across the lanes (weights 2^g, -128 for the sign
// plane), and only then is the integer converted and scaled by s_k · (absmax/127); the min term
// takes the sum of the int8 activations too (see bitplane_prepare_tc_kernel), so the result is
// W_k · x̂ exactly (x̂ = scale · q) up to fp32 rounding of the per-group terms.
//
// FP32 (the accuracy reference; any group size). Per lane and 32-bit word, the codes of 4 columns
// at a time are assembled byte-wise from the planes ((P >> b) & 0x01010101 per plane) and
// multiplied with fp32 activations stored in the matching order.
//
// Both read the tc8x512 layout as stored: one warp = one row tile of 8 rows, lane l = 4g + t holds
// row g's words j = K [512s + 128j + 32t, +32) of super-chunk s, i.e. one 16-byte load per lane per
// plane; the warps of a block split the super-chunks of one row tile and reduce in shared memory
// (deterministic order). Weights are read once, so they are loaded with the evict-first /
// streaming hint (__ldcs) and leave L2 to the activations, which every block reads.
//
// Measured on the H100 (tools/gpu_check.sh, m = 1, G = 128, weights rotated past L2, µs per launch
// in a CUDA graph; cuBLAS fp16 F.linear 15.7 / 35.3 / 35.8): TC 4096x4096 9.2 / 8.0 / 6.7 at
// 8 / 6 / 4 bits, 11008x4096 18.6 / 15.1 / 12.1 (84% of copy bandwidth at 8 bits), 4096x11008
// 19.4 / 16.4 / 13.9; the activation preparation adds ~2.3 µs (a second launch). FP32 runs at
// 15-42 µs, about cuBLAS fp16: the bit transposition on the CUDA cores is the bound, not memory.
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "bitplane_matmul.cuh"
#include "bitplane_mma.cuh"
#include "cuda_backend.h"

namespace flexquant {

namespace {

constexpr int TILE_N = 8;        // rows per tile = the 8 columns of the mma's B operand
constexpr int SUPER_K = 512;     // columns per full super-chunk (4 words per lane)
constexpr int MAX_M = 8;         // activation rows per launch (TC, FP32)
constexpr int MMA_MAX_M = mma::ROWS;  // activation rows per launch of the MMA kernel: 16
constexpr int MAX_WARPS = 16;    // warps per block (split-K)
constexpr int AUTO_WARPS_PER_SM = 14;
constexpr int PREP_THREADS = SUPER_K;  // the preparation kernels: one thread per column of a super-chunk
constexpr unsigned FULL = 0xffffffffu;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Geometry shared by the launchers.
struct Geometry {
    int64_t n, k, k_pad, n_tiles, n_groups;
    int n_super, last_words;  // super-chunks; words per lane of the last one (1..4)
    int group_size;
};

Geometry geometry(const BitplaneLinear& w) {
    Geometry g{};
    g.n = w.n;
    g.k = w.k;
    g.k_pad = ceil_div(w.k, 128) * 128;
    g.n_tiles = ceil_div(w.n, TILE_N);
    g.n_groups = w.n_groups();
    g.n_super = int(ceil_div(g.k_pad, SUPER_K));
    g.last_words = int((g.k_pad - int64_t(g.n_super - 1) * SUPER_K) / 128);
    g.group_size = w.group_size;
    return g;
}

// ---- device helpers ---------------------------------------------------------------------------

// Lane `lane`'s words of one super-chunk for planes p < bits: P[p] = words j = 0..3 (zeros past W).
// tile_s: planes + rt * k_pad + s * 512 (row tile rt, super-chunk s of plane 0).
__device__ __forceinline__ void load_planes(uint4 (&P)[8], const uint8_t* __restrict__ tile_s, uint64_t plane_bytes,
                                            int bits, int W, int lane) {
    if (W == 4) {
#pragma unroll
        for (int p = 0; p < 8; ++p)
            if (p < bits) P[p] = __ldcs(reinterpret_cast<const uint4*>(tile_s + p * plane_bytes) + lane);
    } else {  // the short last super-chunk: W words per lane, 4W-byte lane stride
#pragma unroll
        for (int p = 0; p < 8; ++p) {
            if (p < bits) {
                const uint32_t* q = reinterpret_cast<const uint32_t*>(tile_s + p * plane_bytes) + lane * W;
                P[p].x = __ldcs(q);
                P[p].y = W > 1 ? __ldcs(q + 1) : 0u;
                P[p].z = W > 2 ? __ldcs(q + 2) : 0u;
                P[p].w = 0u;
            }
        }
    }
}

// Asks L2 for `bytes` (a multiple of 16) at the 16-byte aligned p: the bulk-copy unit fetches them
// while the warp goes on (cp.async.bulk.prefetch, sm_90; nothing on older GPUs). A hint: no result
// depends on it.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes));  // no clobber: a hint
#endif
}

// With `on`: lane 0 asks L2 for planes 0..bits-1 of super-chunk s of the row tile (tile: its plane
// 0), s < n_super: 128 bytes per word of a lane, 4 words (the short last one: last_words). One lane
// with warp-wide addresses, as TMA copies are issued: a bulk prefetch from every lane with its own
// address may make the compiler serialize the lanes.
__device__ __forceinline__ void prefetch_super_chunk(bool on, const uint8_t* tile, uint64_t plane_bytes, int s,
                                                     int n_super, int last_words, int bits, int lane) {
    if (on && s < n_super && lane == 0) {
        const uint8_t* chunk = tile + int64_t(s) * SUPER_K;
        const uint32_t bytes = 128u * (s == n_super - 1 ? last_words : 4);
        for (int p = 0; p < bits; ++p) prefetch_l2(chunk + p * plane_bytes, bytes);
    }
}

// A warp's walk over its super-chunks s = warp, warp + n_warps, ... of the row tile (tile: its plane
// 0): P holds each one's planes when body(s, W) runs (W: its words per lane). The first is loaded
// before pdl_wait (weights never come from an earlier kernel, so under PDL the load overlaps the
// previous kernel's tail), then the wait (the activations and y do); each next one is asked of L2
// ahead with `prefetch`.
template <class Body>
__device__ __forceinline__ void walk_super_chunks(uint4 (&P)[8], const uint8_t* tile, uint64_t plane_bytes, int bits,
                                                  int n_super, int last_words, int warp, int n_warps, int lane,
                                                  bool prefetch, Body&& body) {
    if (warp < n_super)
        load_planes(P, tile + int64_t(warp) * SUPER_K, plane_bytes, bits, warp == n_super - 1 ? last_words : 4, lane);
    prefetch_super_chunk(prefetch, tile, plane_bytes, warp + n_warps, n_super, last_words, bits, lane);
    pdl_wait();
    for (int s = warp; s < n_super; s += n_warps) {
        const int W = s == n_super - 1 ? last_words : 4;
        if (s != warp) {
            load_planes(P, tile + int64_t(s) * SUPER_K, plane_bytes, bits, W, lane);
            prefetch_super_chunk(prefetch, tile, plane_bytes, s + n_warps, n_super, last_words, bits, lane);
        }
        body(s, W);
    }
}

// The bit-width a kernel runs at: `bits` (a launch argument), or, when bits_dev is set, the value
// in device memory at the time the kernel runs (the engine's CUDA graph reads a mask that the host
// updates between replays). Clamped to 2..bits: the buffer holds only `bits` planes, so a bad
// mask value can lower the precision but never make a kernel read past the planes.
__device__ __forceinline__ int effective_bits(const int32_t* bits_dev, int bits) {
    return bits_dev ? max(2, min(bits, __ldg(bits_dev))) : bits;
}

// The linears of one GEMV launch (1..MAX_PARTS: q, k and v, or gate and up, read the same prepared
// input and share k, the group size and max_bits): their row tiles form one grid, linear i owning
// blocks [tile0_i, tile0_{i+1}), so the launch's start and tail are paid once, not per linear.
constexpr int MAX_PARTS = BITPLANE_MAX_MULTI;
struct GemvPart {
    const uint8_t* planes;     // (>= bits, plane_bytes) tc8x512
    const __half2* qparams;    // (n, n_groups): (scale, min)
    float* y;                  // (M, n)
    const int32_t* bits_dev;   // its bit-width in device memory, or null (effective_bits)
    uint64_t plane_bytes;
    int64_t n;
    int64_t tile0;             // its first block
};
struct GemvParts {
    GemvPart part[MAX_PARTS];
    int count;
};
// The part block `b` belongs to, picked by selects over the kernel parameters (an indexed read of
// them would go through local memory).
__device__ __forceinline__ GemvPart part_of(const GemvParts& parts, int64_t b) {
    GemvPart pt = parts.part[0];
#pragma unroll
    for (int i = 1; i < MAX_PARTS; ++i)
        if (i < parts.count && b >= parts.part[i].tile0) pt = parts.part[i];
    return pt;
}

// s_k = s · scale_mul and m_k = m + s · min_mul (docs/format.md): 2^(B-k) and (2^(B-k) - 1) / 2,
// exact in fp32 and equal to the host constants of the CPU op and numpy's view_params.
__device__ __forceinline__ float view_scale_mul(int max_bits, int bits) { return float(1 << (max_bits - bits)); }
__device__ __forceinline__ float view_min_mul(int max_bits, int bits) { return 0.5f * float((1 << (max_bits - bits)) - 1); }

__device__ __forceinline__ uint32_t word_of(const uint4& v, int j) {
    return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// d += Σ_K popc(a AND b) on the binary tensor cores (m16n8k256). Fragments: a0/a2 = A row
// groupID, K [32t, +32) / [128 + 32t, +32); a1/a3 = A row groupID + 8, same K; b0/b1 = B column
// groupID, K [32t, +32) / [128 + 32t, +32); d0, d1 = C[groupID][2t, 2t+1], d2, d3 = C[groupID+8][..].
__device__ __forceinline__ void mma_b1(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(FLEXQUANT_SIMT)  // the CPU stand-in for CUDA (tests/cuda_host/simt): the same operands
    simt::mma_b1(d, a[0], a[1], a[2], a[3], b0, b1);
#else
    asm("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Σ over the 8 lanes that share t (g = 0..7, lane bits 2..4) of v[2·b4 + b3], where b3, b4 are
// bits 1 and 2 of this lane's g: a reduce-scatter butterfly, 4 shuffles for the 4 values instead
// of 12. Each value ends in 2 lanes (b2 = 0 and 1).
__device__ __forceinline__ int reduce_act_planes(const int (&v)[4], int b3, int b4) {
    const int u0 = (b4 ? v[2] : v[0]) + __shfl_xor_sync(FULL, b4 ? v[0] : v[2], 16);
    const int u1 = (b4 ? v[3] : v[1]) + __shfl_xor_sync(FULL, b4 ? v[1] : v[3], 16);
    int z = (b3 ? u1 : u0) + __shfl_xor_sync(FULL, b3 ? u0 : u1, 8);
    z += __shfl_xor_sync(FULL, z, 4);
    return z;
}

// y[r, 8 rt + i] = Σ_w red[w][r][i] in warp order (deterministic), for rows < n; with accumulate,
// y[r, 8 rt + i] += that sum (the residual add of the engine's o and down linears, with the same one
// rounding as a separate add).
template <int M, int R>
__device__ __forceinline__ void write_tile(const float (&red)[MAX_WARPS][R][TILE_N], float* __restrict__ y,
                                           int64_t n, int64_t rt, int n_warps, bool accumulate) {
    __syncthreads();
    for (int i = threadIdx.x; i < M * TILE_N; i += blockDim.x) {
        const int r = i / TILE_N, rr = i % TILE_N;
        const int64_t row = rt * TILE_N + rr;
        if (row < n) {
            float sum = 0.0f;
            for (int w = 0; w < n_warps; ++w) sum += red[w][r][rr];
            y[r * n + row] = accumulate ? y[r * n + row] + sum : sum;
        }
    }
}

// ---- TC path -------------------------------------------------------------------------------------

// x (m, k) -> xq (m, n_super, 32 lanes, 4 words): word j of lane 4g + t of super-chunk s holds bit g
// of q[512s + 128j + 32t + b] at bit b; aparams (m, n_groups) = (scale, scale · Σq) per group, scale
// = absmax / 127, q = rint(x / scale) in [-127, 127] (0 where the group is all zeros). Block (s, r):
// one column per thread; warp w covers K 512s + 32w, i.e. (j, t) = (w / 4, w % 4). Needs
// group_size | 512.
//
// The min term uses Σ x̂ = scale · Σq, the sum of the int8 activations, not the exact Σx: then the
// result is exactly W_k · x̂, whose error W_k · (x̂ - x) is that of the weights' own (zero-mean-ish)
// values. With the exact Σx the error would be s_k · Σ c_k (x̂ - x), where the codes c_k carry the
// group's offset (mean ~ 2^k / 2): measured 3-5x larger on random weights.
//
// FUSE (BitplanePrepareFusion, 0 = none) computes the input from the op before the linear first, in
// the same launch (a decode step is latency-bound: one launch fewer is ~3-4 µs), and writes it to
// out too (other kernels read it): RMS_NORM, out = rms_norm(x, aux = weight (k), eps) with the sum
// and roundings of rms_norm_kernel (cuda_backend.h; each block sums its whole row); SWIGLU,
// out = silu(x) · aux (aux = up (m, k)) as swiglu_kernel, out may be x.
template <int FUSE>
static __global__ void __launch_bounds__(PREP_THREADS)
bitplane_prepare_tc_kernel(const float* x,                 // (m, k)
                           int64_t k, int n_super, int64_t n_groups, int group_size,
                           uint32_t* __restrict__ xq,      // (m, n_super, 32, 4)
                           float2* __restrict__ aparams,   // (m, n_groups)
                           int8_t* __restrict__ xa,        // (n_chunks, 4, 8, 4, 2, 8): q for the MMA path
                           const float* __restrict__ aux, float eps,
                           float* out) {                   // (m, k), FUSE only
    pdl_begin();  // cuda_backend.h: launched with PDL in the engine's passes
    __shared__ float warp_max[PREP_THREADS / 32];
    __shared__ int warp_qsum[PREP_THREADS / 32];
    const int s = blockIdx.x, r = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t col = int64_t(s) * SUPER_K + threadIdx.x;
    float v;
    if (FUSE == BITPLANE_FUSE_RMS_NORM) {
        const float* xr = x + r * k;
        const float inv = rms_inv(rms_row_sum_squares(xr, k, rms_vec(x, aux, out, k)), k, eps);
        v = col < k ? rms_apply(xr[col], inv, aux[col]) : 0.0f;
    } else if (FUSE == BITPLANE_FUSE_SWIGLU) {
        v = col < k ? silu_mul(x[r * k + col], aux[r * k + col]) : 0.0f;
    } else {
        v = col < k ? x[r * k + col] : 0.0f;
    }
    if (FUSE != 0 && col < k) out[r * k + col] = v;

    float amax = fabsf(v);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(FULL, amax, o));
    if (lane == 0) warp_max[warp] = amax;
    __syncthreads();
    const int per_group = group_size / 32, w0 = warp / per_group * per_group;
    amax = 0.0f;
    for (int w = w0; w < w0 + per_group; ++w) amax = fmaxf(amax, warp_max[w]);
    // IEEE division and rint (round half to even): the same float32 operations as numpy's
    // amax / float32(127), rint(x / scale), so tests can rebuild q exactly.
    const float scale = amax / 127.0f;
    const int q = scale > 0.0f ? max(-127, min(127, int(rintf(v / scale)))) : 0;

    int qsum = q;  // exact: |Σq| <= 127 * 512
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) qsum += __shfl_xor_sync(FULL, qsum, o);
    if (lane == 0) warp_qsum[warp] = qsum;
    __syncthreads();
    qsum = 0;
    for (int w = w0; w < w0 + per_group; ++w) qsum += warp_qsum[w];

    uint32_t mine = 0;
#pragma unroll
    for (int b = 0; b < 8; ++b) {
        const uint32_t word = __ballot_sync(FULL, (q >> b) & 1);  // two's complement bit b
        if (lane == b) mine = word;
    }
    const int j = warp >> 2, t = warp & 3;
    if (lane < 8) xq[((int64_t(r) * n_super + s) * 32 + 4 * lane + t) * 4 + j] = mine;
    // The same q in the MMA kernel's order (bitplane_mma.cuh), the K padding (q = 0) included: its
    // codes are not zero there (ĉ8 of code 0 is -128), so the zeros must be here. (xa is null for
    // the group sizes the MMA kernel lacks.)
    if (xa != nullptr && col < ((k + 127) & ~int64_t(127))) xa[mma::xa_index(col, r)] = int8_t(q);
    if (col < k && col % group_size == 0) aparams[r * n_groups + col / group_size] = make_float2(scale, scale * float(qsum));
}

// One block = one row tile, its warps splitting the super-chunks. L = weight groups per 256-column
// chunk (256 / group_size, 1 for 256 and 512); group_shift = log2(group_size / 256) when L == 1.
// Slots (activation row r, local group lg) are numbered r·L + lg; mma jm covers slots 2jm (A rows
// 0-7) and 2jm + 1 (A rows 8-15). Loading the next super-chunk's planes before computing the
// current one was measured slower at every split (32 more registers, fewer warps resident: e.g.
// 11008x4096, 4 bits, 2 warps: 17.7 µs against 12.0), so each warp loads, then computes.
template <int M, int L>
static __global__ void __launch_bounds__(MAX_WARPS * 32)
bitplane_matmul_tc_kernel(const GemvParts parts,              // the linears (planes, qparams, y, n)
                          const uint4* __restrict__ xq,         // (M, n_super, 32): activation planes
                          const float2* __restrict__ aparams,   // (M, n_groups): (scale, Σ x̂)
                          int64_t k_pad, int64_t n_groups, int n_super, int last_words, int group_shift, int bits,
                          int max_bits, bool accumulate, bool prefetch) {
    // Under PDL the first planes are loaded before pdl_wait (below): they and the mask in the step
    // input (bits_dev) are written before the first kernel of a pass, never by the kernel before.
    pdl_launch_dependents();
    const GemvPart pt = part_of(parts, blockIdx.x);
    const int64_t n = pt.n;
    bits = effective_bits(pt.bits_dev, bits);
    const float scale_mul = view_scale_mul(max_bits, bits), min_mul = view_min_mul(max_bits, bits);
    constexpr int J = (M * L + 1) / 2;                 // mma per weight plane per chunk
    constexpr int NACC = L >= 2 ? M : (M + 1) / 2;    // fp32 accumulators per lane
    __shared__ float red[MAX_WARPS][MAX_M][TILE_N];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int b3 = (g >> 1) & 1, b4 = g >> 2;  // after the butterfly: row parity, slot parity owned
    const int w_g = g == 7 ? -128 : 1 << g;    // weight of activation plane g (two's complement)
    const int64_t rt = blockIdx.x - pt.tile0;  // the row tile within its linear
    const int64_t row = rt * TILE_N + 2 * t + b3;  // the output row this lane scales
    const bool row_ok = row < n;
    const __half2* qrow = pt.qparams + (row_ok ? row : 0) * n_groups;
    const uint8_t* tile = pt.planes + rt * k_pad;
    const uint64_t plane_bytes = pt.plane_bytes;
    // Local group (within the chunk) of this lane's low word (K 32t) and high word (K 128 + 32t).
    const int lg_lo = (t * L) >> 3, lg_hi = ((4 + t) * L) >> 3;

    float acc[NACC];
#pragma unroll
    for (int i = 0; i < NACC; ++i) acc[i] = 0.0f;

    uint4 P[8];
    walk_super_chunks(P, tile, plane_bytes, bits, n_super, last_words, warp, n_warps, lane, prefetch, [&](int s, int W) {
        uint4 X[M];
#pragma unroll
        for (int r = 0; r < M; ++r) X[r] = __ldg(xq + (int64_t(r) * n_super + s) * 32 + lane);

#pragma unroll
        for (int h = 0; h < 2; ++h) {  // the two 256-column chunks of the super-chunk
            if (h == 1 && W <= 2) break;
            const int64_t c = 2 * int64_t(s) + h;
#pragma unroll
            for (int jm = 0; jm < J; ++jm) {
                uint32_t a[4];
#pragma unroll
                for (int half = 0; half < 2; ++half) {  // half 0: slot 2jm (a0, a2); 1: slot 2jm+1 (a1, a3)
                    const int slot = 2 * jm + half;
                    uint32_t lo = 0, hi = 0;
                    if (slot < M * L) {
                        const int r = slot / L, lg = slot % L;
                        const uint32_t xlo = h ? X[r].z : X[r].x, xhi = h ? X[r].w : X[r].y;
                        lo = (L == 1 || lg_lo == lg) ? xlo : 0u;
                        hi = (L == 1 || lg_hi == lg) ? xhi : 0u;
                    }
                    a[half] = lo;
                    a[2 + half] = hi;
                }
                int d[4] = {0, 0, 0, 0};
#pragma unroll
                for (int p = 0; p < 8; ++p) {
                    if (p < bits) {  // Horner over the weight planes, MSB first
#pragma unroll
                        for (int i = 0; i < 4; ++i) d[i] += d[i];
                        mma_b1(d, a, h ? P[p].z : P[p].x, h ? P[p].w : P[p].y);
                    }
                }
#pragma unroll
                for (int i = 0; i < 4; ++i) d[i] *= w_g;  // |d| <= 255 * 256: no overflow
                const int z = reduce_act_planes(d, b3, b4);  // exact Σ_i c_k q over the slot's group

                // This lane's (slot, row): slot 2jm + b4, row 2t + b3.
                const int r = L >= 2 ? (2 * jm) / L : 2 * jm + b4;
                const int64_t grp = L >= 2 ? c * L + (2 * jm) % L + b4 : c >> group_shift;
                const bool first = L >= 2 || (c & ((int64_t(1) << group_shift) - 1)) == 0;
                if (row_ok && r < M && grp < n_groups) {
                    const float2 sm = __half22float2(__ldg(qrow + grp));  // read-only: the non-coherent path
                    const float2 ap = __ldg(aparams + int64_t(r) * n_groups + grp);
                    const float s_k = sm.x * scale_mul;
                    float term = float(z) * (s_k * ap.x);
                    if (first) term += (sm.y + sm.x * min_mul) * ap.y;  // m_k Σ x̂, once per group
                    acc[L >= 2 ? r : jm] += term;
                }
            }
        }
    });

    // L >= 2: lanes b4 = 0, 1 hold the two slot parities of the same (r, row): add them. Then one
    // lane per (r, row) (b2 = 0) stores.
    if (L >= 2) {
#pragma unroll
        for (int i = 0; i < NACC; ++i) acc[i] += __shfl_xor_sync(FULL, acc[i], 16);
        if ((g & 5) == 0) {
#pragma unroll
            for (int r = 0; r < M; ++r) red[warp][r][2 * t + b3] = acc[r];
        }
    } else if ((g & 1) == 0) {
#pragma unroll
        for (int jm = 0; jm < NACC; ++jm) {
            const int r = 2 * jm + b4;
            if (r < M) red[warp][r][2 * t + b3] = acc[jm];
        }
    }
    write_tile<M>(red, pt.y, n, rt, n_warps, accumulate);
}

// ---- MMA path ------------------------------------------------------------------------------------

// MMA_A16's preparation: x (m, k) -> xh = fp16(x) (round to nearest, saturating) in the MMA order
// (mma::xa16_index; the K padding columns up to k_pad hold zeros) and aparams (m, n_groups) =
// (1, Σ fp16(x) over the group, in fp32). Block (s, r), one column per thread; group_size 128, 256
// or 512 (it divides the block's 512 columns).
static __global__ void __launch_bounds__(PREP_THREADS)
bitplane_prepare_a16_kernel(const float* __restrict__ x,    // (m, k)
                            int64_t k, int64_t n_groups, int group_size,
                            __half* __restrict__ xh,        // (n_chunks, 4, 8, 4, 2, 8)
                            float2* __restrict__ aparams) { // (m, n_groups)
    pdl_begin();  // cuda_backend.h: launched with PDL in the engine's passes
    __shared__ float warp_sum[PREP_THREADS / 32];
    const int s = blockIdx.x, r = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t col = int64_t(s) * SUPER_K + threadIdx.x;
    const __half h = __float2half_rn(mma::fp16_saturate(col < k ? x[r * k + col] : 0.0f));
    if (col < ((k + 127) & ~int64_t(127))) xh[mma::xa16_index(col, r)] = h;
    float sum = __half2float(h);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(FULL, sum, o);
    if (lane == 0) warp_sum[warp] = sum;
    __syncthreads();
    if (col < k && col % group_size == 0) {
        const int per_group = group_size / 32;
        float total = 0.0f;
        for (int w = warp; w < warp + per_group; ++w) total += warp_sum[w];
        aparams[r * n_groups + col / group_size] = make_float2(1.0f, total);
    }
}

// d (4) += A · B on the s8 tensor cores (mma m16n8k32, s32 accumulators): A rows = the activation
// rows (a = this lane's 16 bytes, bitplane_mma.cuh's K order: .x/.y row groupID, .z/.w row
// groupID + 8); B = b (this lane's codes of column groupID). d0, d1 = C[groupID][2t, 2t+1],
// d2, d3 = C[groupID + 8][2t, 2t+1].
// volatile: .aligned needs every lane; the compiler must not sink an mma into the g < M branches.
__device__ __forceinline__ void mma_s8(int (&d)[4], const uint4& a, const uint32_t (&b)[2]) {
    // the PTX operands a0..a3 (row g K lo, row g + 8 K lo, row g K hi, row g + 8 K hi) in a's order
    const uint32_t a0 = a.x, a1 = a.z, a2 = a.y, a3 = a.w;
#if defined(FLEXQUANT_SIMT)  // the CPU stand-in for CUDA (tests/cuda_host/simt): the same operands
    simt::mma_s8(d, a0, a1, a2, a3, b[0], b[1]);
#else
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b[0]), "r"(b[1]));
#endif
}

// This lane's A fragment of step (c, qq) for an M-row launch: rows g and g + 8 where they exist
// (< M), zeros elsewhere (their outputs are never stored; unwritten scratch is never read).
template <int M>
__device__ __forceinline__ uint4 load_a(const uint4* __restrict__ xa, int64_t c, int qq, int g, int t) {
    const int64_t i = ((c * 4 + qq) * 8 + g) * 4 + t;
    if (M > 8 && g + 8 < M) return __ldg(xa + i);
    if (g < M) {
        const uint2 lo = __ldg(reinterpret_cast<const uint2*>(xa + i));
        return make_uint4(lo.x, lo.y, 0u, 0u);
    }
    return make_uint4(0u, 0u, 0u, 0u);
}

// The f16 twin of mma_s8 (MMA_A16: fp16 activations, codes as f16, fp32 accumulation), one k16
// step: a0/a2 row groupID K 2t.. / 2t + 8.., a1/a3 row groupID + 8; b0/b1 column groupID.
__device__ __forceinline__ void mma_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                        uint32_t b0, uint32_t b1) {
#if defined(FLEXQUANT_SIMT)  // the CPU stand-in for CUDA (tests/cuda_host/simt): the same operands
    simt::mma_f16(d, a0, a1, a2, a3, b0, b1);
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}
__device__ __forceinline__ uint32_t sub_f16x2(uint32_t a, uint32_t b) {
#if defined(FLEXQUANT_SIMT)
    return simt::sub_f16x2(a, b);
#else
    uint32_t r;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
#endif
}

// MMA_A16: this lane's 8 fp16 activations of step (c, qq) of row g (lo) and row g + 8 (hi), zeros
// for rows >= M (never read).
template <int M>
__device__ __forceinline__ void load_a16(const uint4* __restrict__ xa, int64_t c, int qq, int g, int t, uint4& lo,
                                         uint4& hi) {
    const int64_t i = (((c * 4 + qq) * 8 + g) * 4 + t) * 2;  // uint4 = 8 halves; rows g, g + 8 adjacent
    lo = g < M ? __ldg(xa + i) : make_uint4(0u, 0u, 0u, 0u);
    hi = M > 8 && g + 8 < M ? __ldg(xa + i + 1) : make_uint4(0u, 0u, 0u, 0u);
}

// The TC path's product (same preparation, same int8 activations, the same exact integer sums per
// group) on the s8 tensor cores: the codes are decoded from the planes in registers
// (mma::decode_word: a byte gather and an 8x8 bit transposition, ~6 integer operations per code
// byte), then one mma per 32 K instead of one b1 mma per weight plane, activation plane row and
// group. Why: the b1 kernel's work grows with m (M · L / 2 mma per plane per 256 K, plus an
// activation-plane butterfly per slot), this one's does not (the 16 rows of the A tile are the m
// activation rows), so a batched decode step of up to 16 rows reads the weights once at about the
// cost of one row. Group sizes 128, 256, 512 (a step spans 128 K columns: bitplane_mma.cuh).
// One block = one row tile; its warps split the super-chunks (as the TC kernel: the planes of a
// super-chunk are loaded before pdl_wait and prefetched the same way). Lane 4g + t owns the outputs
// (rows g and g + 8 of x, weight rows 8 rt + 2t, +1) and adds one mma::group_term per weight group.
// A16 (path MMA_A16, "W{k}A16"): the same loop with fp16 activations (their own preparation,
// bitplane_prepare_a16_kernel) and the codes converted to f16 (mma::codes_to_half2_biased, exact),
// two mma m16n8k16 per 32 K with fp32 accumulators; a_s = 1, a_z = Σ fp16(x) per group.
template <int M, bool A16>
static __global__ void __launch_bounds__(MAX_WARPS * 32)
bitplane_matmul_mma_kernel(const GemvParts parts,              // the linears (planes, qparams, y, n)
                           const uint4* __restrict__ xa,         // (n_chunks, 4, 8, 4, 2) x 8 bytes (A16: 16)
                           const float2* __restrict__ aparams,   // (M, n_groups): (a_s, a_z = a_s · Σq)
                           int64_t k_pad, int64_t n_groups, int n_super, int last_words, int group_chunk_shift,
                           int bits, int max_bits, bool accumulate, bool prefetch) {
    pdl_launch_dependents();
    const GemvPart pt = part_of(parts, blockIdx.x);
    const int64_t n = pt.n;
    bits = effective_bits(pt.bits_dev, bits);
    const mma::GroupConstants gc = mma::group_constants(max_bits, bits);
    __shared__ __align__(16) float red[MAX_WARPS][MMA_MAX_M][TILE_N];  // (8-byte aligned pairs: the stores below)

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int64_t rt = blockIdx.x - pt.tile0;  // the row tile within its linear
    const int64_t row0 = rt * TILE_N + 2 * t;  // this lane's weight rows row0, row0 + 1 (stored if < n)
    const __half2* q0 = pt.qparams + min(row0, n - 1) * n_groups;
    const __half2* q1 = pt.qparams + min(row0 + 1, n - 1) * n_groups;
    const float2* ap_lo = aparams + int64_t(g < M ? g : 0) * n_groups;          // x row g
    const float2* ap_hi = aparams + int64_t(g + 8 < M ? g + 8 : 0) * n_groups;  // x row g + 8
    const uint8_t* tile = pt.planes + rt * k_pad;
    const uint64_t plane_bytes = pt.plane_bytes;
    const int64_t last_chunk = k_pad / 128 - 1;
    const int64_t group_mask = (int64_t(1) << group_chunk_shift) - 1;  // chunks per group - 1

    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // (x row g, g + 8) x (weight row row0, row0 + 1), as d
    uint4 P[8];
    walk_super_chunks(P, tile, plane_bytes, bits, n_super, last_words, warp, n_warps, lane, prefetch, [&](int s, int W) {
#pragma unroll
        for (int p = 0; p < 8; ++p)  // planes past k are zero bits of ĉ8 (load_planes left them unset)
            if (p >= bits) P[p] = make_uint4(0u, 0u, 0u, 0u);
        using Acc = typename std::conditional<A16, float, int>::type;
        Acc d[4] = {0, 0, 0, 0};  // the current group's sums (groups never straddle a super-chunk)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (j >= W) break;
            const int64_t c = 4 * int64_t(s) + j;  // the 128-column chunk
            uint32_t u[8], b[4][2];
#pragma unroll
            for (int p = 0; p < 8; ++p) u[p] = word_of(P[p], j);
            if constexpr (A16) {
                uint4 lo[4], hi[4];
#pragma unroll
                for (int qq = 0; qq < 4; ++qq) load_a16<M>(xa, c, qq, g, t, lo[qq], hi[qq]);
                mma::decode_word<false>(u, b);
#pragma unroll
                for (int qq = 0; qq < 4; ++qq)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {  // K 8qq + 4h .. + 3 of each lane's 32
                        uint32_t b01, b23;
                        mma::codes_to_half2_biased(b[qq][h], b01, b23);
                        mma_f16(d, h ? lo[qq].z : lo[qq].x, h ? hi[qq].z : hi[qq].x, h ? lo[qq].w : lo[qq].y,
                                h ? hi[qq].w : hi[qq].y, sub_f16x2(b01, mma::HALF2_BIAS),
                                sub_f16x2(b23, mma::HALF2_BIAS));
                    }
            } else {
                uint4 a[4];
#pragma unroll
                for (int qq = 0; qq < 4; ++qq) a[qq] = load_a<M>(xa, c, qq, g, t);
                mma::decode_word(u, b);
#pragma unroll
                for (int qq = 0; qq < 4; ++qq) mma_s8(d, a[qq], b[qq]);
            }
            if (((c + 1) & group_mask) == 0 || c == last_chunk) {  // the group ends with this chunk
                const int64_t grp = c >> group_chunk_shift;
                if (g < M) {
                    const float2 w0 = __half22float2(__ldg(q0 + grp)), w1 = __half22float2(__ldg(q1 + grp));
                    const float2 av = __ldg(ap_lo + grp);
                    acc[0] += mma::group_term(d[0], av.x, av.y, w0.x, w0.y, gc);
                    acc[1] += mma::group_term(d[1], av.x, av.y, w1.x, w1.y, gc);
                    if (M > 8 && g + 8 < M) {
                        const float2 bv = __ldg(ap_hi + grp);
                        acc[2] += mma::group_term(d[2], bv.x, bv.y, w0.x, w0.y, gc);
                        acc[3] += mma::group_term(d[3], bv.x, bv.y, w1.x, w1.y, gc);
                    }
                }
                d[0] = d[1] = d[2] = d[3] = 0;
            }
        }
    });
    // Each lane's two outputs as one 8-byte store: lanes g and g + 4 of 4-byte stores would share a
    // bank (words 8g + 2t, 32 apart), a 2-way conflict once M > 4; 8-byte stores are served 16 lanes
    // at a time, and 16 lanes cover 32 consecutive words (tests/test_simt_traffic.py measures it).
    if (g < M) *reinterpret_cast<float2*>(&red[warp][g][2 * t]) = make_float2(acc[0], acc[1]);
    if (M > 8 && g + 8 < M) *reinterpret_cast<float2*>(&red[warp][g + 8][2 * t]) = make_float2(acc[2], acc[3]);
    write_tile<M>(red, pt.y, n, rt, n_warps, accumulate);
}

// ---- FP32 path -----------------------------------------------------------------------------------

// x (m, k) -> xp (m, k_pad): column 32w + e at slot 32w + 4(e % 8) + e / 8, so that the float4 at
// slot 32w + 4b holds columns 32w + b, +8, +16, +24 (the 4 bytes of the byte-wise codes below);
// wsum (m, k_pad / 32) = Σ of each word's 32 columns. Block (s, r), one column per thread.
static __global__ void __launch_bounds__(PREP_THREADS)
bitplane_prepare_fp32_kernel(const float* __restrict__ x,  // (m, k)
                             int64_t k, int64_t k_pad,
                             float* __restrict__ xp,        // (m, k_pad)
                             float* __restrict__ wsum) {    // (m, k_pad / 32)
    pdl_begin();  // cuda_backend.h: launched with PDL in the engine's passes
    const int64_t col = int64_t(blockIdx.x) * SUPER_K + threadIdx.x;
    const int r = blockIdx.y;
    if (col >= k_pad) return;  // whole warps: k_pad is a multiple of 128
    const float v = col < k ? x[r * k + col] : 0.0f;
    const int e = int(col & 31);
    xp[r * k_pad + (col & ~int64_t(31)) + 4 * (e & 7) + (e >> 3)] = v;
    double sum = v;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(FULL, sum, o);
    if (e == 0) wsum[r * (k_pad / 32) + col / 32] = float(sum);
}

template <int M>
static __global__ void __launch_bounds__(MAX_WARPS * 32)
bitplane_matmul_fp32_kernel(const GemvParts parts,              // the linears (planes, qparams, y, n)
                            const float* __restrict__ xp,         // (M, k_pad) permuted (prepare)
                            const float* __restrict__ wsum,       // (M, k_pad / 32)
                            int64_t k_pad, int64_t n_groups, int n_super, int last_words, int words_per_group,
                            int bits, int max_bits, bool accumulate, bool prefetch) {
    pdl_begin();  // cuda_backend.h: launched with PDL in the engine's passes
    const GemvPart pt = part_of(parts, blockIdx.x);
    const int64_t n = pt.n;
    const uint64_t plane_bytes = pt.plane_bytes;
    bits = effective_bits(pt.bits_dev, bits);
    const float scale_mul = view_scale_mul(max_bits, bits), min_mul = view_min_mul(max_bits, bits);
    __shared__ float red[MAX_WARPS][MAX_M][TILE_N];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int64_t rt = blockIdx.x - pt.tile0;  // the row tile within its linear
    const int64_t row = rt * TILE_N + g;
    const bool row_ok = row < n;
    const uint8_t* tile = pt.planes + rt * k_pad;
    const int64_t n_words = k_pad / 32;

    float acc[M];
#pragma unroll
    for (int r = 0; r < M; ++r) acc[r] = 0.0f;

    for (int s = warp; s < n_super; s += n_warps) {
        const int W = s == n_super - 1 ? last_words : 4;
        uint4 P[8];
        load_planes(P, tile + int64_t(s) * SUPER_K, plane_bytes, bits, W, lane);
        prefetch_super_chunk(prefetch, tile, plane_bytes, s + n_warps, n_super, last_words, bits, lane);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (j >= W) break;
            const int64_t wi = int64_t(s) * 16 + 4 * j + t;  // word index = K / 32
            const int64_t grp = wi / words_per_group;
            float s_k = 0.0f, m_k = 0.0f;
            if (row_ok && grp < n_groups) {  // padding words (K >= k) may lie past the last group
                const float2 sm = __half22float2(__ldg(pt.qparams + row * n_groups + grp));
                s_k = sm.x * scale_mul;
                m_k = sm.y + sm.x * min_mul;
            }
            float dot[M];
#pragma unroll
            for (int r = 0; r < M; ++r) dot[r] = 0.0f;
#pragma unroll
            for (int b = 0; b < 8; ++b) {
                // Byte q of `code` = the k-bit code of column 32 wi + 8q + b.
                uint32_t code = 0;
#pragma unroll
                for (int p = 0; p < 8; ++p)
                    if (p < bits) code = (code << 1) | ((word_of(P[p], j) >> b) & 0x01010101u);
                const float c0 = float(code & 0xffu), c1 = float((code >> 8) & 0xffu);
                const float c2 = float((code >> 16) & 0xffu), c3 = float(code >> 24);
#pragma unroll
                for (int r = 0; r < M; ++r) {
                    const float4 xv = __ldg(reinterpret_cast<const float4*>(xp + r * k_pad + wi * 32) + b);
                    dot[r] += c0 * xv.x + c1 * xv.y + c2 * xv.z + c3 * xv.w;
                }
            }
#pragma unroll
            for (int r = 0; r < M; ++r) acc[r] += s_k * dot[r] + m_k * __ldg(wsum + r * n_words + wi);
        }
    }

#pragma unroll
    for (int r = 0; r < M; ++r) {  // the 4 lanes t of row g
        acc[r] += __shfl_xor_sync(FULL, acc[r], 1);
        acc[r] += __shfl_xor_sync(FULL, acc[r], 2);
    }
    if (t == 0) {
#pragma unroll
        for (int r = 0; r < M; ++r) red[warp][r][g] = acc[r];
    }
    write_tile<M>(red, pt.y, n, rt, n_warps, accumulate);
}

// ---- launchers: raw device pointers, sizes, a stream; no validation ---------------------------------

using TcKernel = void (*)(const GemvParts, const uint4*, const float2*, int64_t, int64_t, int, int, int, int, int, bool,
                          bool);
using Fp32Kernel = void (*)(const GemvParts, const float*, const float*, int64_t, int64_t, int, int, int, int, int,
                            bool, bool);
using MmaKernel = void (*)(const GemvParts, const uint4*, const float2*, int64_t, int64_t, int, int, int, int, int,
                           bool, bool);

template <int M>
TcKernel tc_kernel_for_l(int L) {
    switch (L) {
        case 1: return bitplane_matmul_tc_kernel<M, 1>;
        case 2: return bitplane_matmul_tc_kernel<M, 2>;
        case 4: return bitplane_matmul_tc_kernel<M, 4>;
        default: return bitplane_matmul_tc_kernel<M, 8>;
    }
}

// The one dispatch switch of each family: compile-time m (register arrays) and L.
TcKernel tc_kernel(int m, int L) {
    switch (m) {
        case 1: return tc_kernel_for_l<1>(L);
        case 2: return tc_kernel_for_l<2>(L);
        case 3: return tc_kernel_for_l<3>(L);
        case 4: return tc_kernel_for_l<4>(L);
        case 5: return tc_kernel_for_l<5>(L);
        case 6: return tc_kernel_for_l<6>(L);
        case 7: return tc_kernel_for_l<7>(L);
        default: return tc_kernel_for_l<8>(L);
    }
}

template <bool A16>
MmaKernel mma_kernel(int m) {
    switch (m) {
        case 1: return bitplane_matmul_mma_kernel<1, A16>;
        case 2: return bitplane_matmul_mma_kernel<2, A16>;
        case 3: return bitplane_matmul_mma_kernel<3, A16>;
        case 4: return bitplane_matmul_mma_kernel<4, A16>;
        case 5: return bitplane_matmul_mma_kernel<5, A16>;
        case 6: return bitplane_matmul_mma_kernel<6, A16>;
        case 7: return bitplane_matmul_mma_kernel<7, A16>;
        case 8: return bitplane_matmul_mma_kernel<8, A16>;
        case 9: return bitplane_matmul_mma_kernel<9, A16>;
        case 10: return bitplane_matmul_mma_kernel<10, A16>;
        case 11: return bitplane_matmul_mma_kernel<11, A16>;
        case 12: return bitplane_matmul_mma_kernel<12, A16>;
        case 13: return bitplane_matmul_mma_kernel<13, A16>;
        case 14: return bitplane_matmul_mma_kernel<14, A16>;
        case 15: return bitplane_matmul_mma_kernel<15, A16>;
        default: return bitplane_matmul_mma_kernel<16, A16>;
    }
}

Fp32Kernel fp32_kernel(int m) {
    switch (m) {
        case 1: return bitplane_matmul_fp32_kernel<1>;
        case 2: return bitplane_matmul_fp32_kernel<2>;
        case 3: return bitplane_matmul_fp32_kernel<3>;
        case 4: return bitplane_matmul_fp32_kernel<4>;
        case 5: return bitplane_matmul_fp32_kernel<5>;
        case 6: return bitplane_matmul_fp32_kernel<6>;
        case 7: return bitplane_matmul_fp32_kernel<7>;
        default: return bitplane_matmul_fp32_kernel<8>;
    }
}

// Warps per block (split-K). The smallest power of two that puts >= 14 warps per multiprocessor
// over the grid: fewer warps per block means fewer blocks past the first wave and less block
// reduction, while 14 warps of 16-byte loads per SM keep enough bytes in flight. Measured on the
// H100 (tools/gpu_check.sh, TC, m = 1, 4 / 8 bits, µs for 1, 2, 4, 8 warps): 4096x4096 13.9, 8.8,
// 6.7, 7.2 / 15.3, 10.7, 9.2, 9.7; 11008x4096 16.1, 12.0, 12.4, 13.2 / 20.5, 18.6, 18.0, 18.8;
// 4096x11008 41.2, 21.1, 13.7, 14.9 / 42.7, 24.7, 19.3, 20.3. The rule picks 4, 2, 4.
// BitplaneCudaTuning::prefetch resolved: -1 is FLEXQUANT_CUDA_PREFETCH=1 (read once per process).
bool use_prefetch(int prefetch) {
    if (prefetch >= 0) return prefetch != 0;
    static const bool from_env = cuda_env_flag("FLEXQUANT_CUDA_PREFETCH");
    return from_env;
}

int pick_warps(const Geometry& g, int warps_per_block) {
    if (warps_per_block > 0) return warps_per_block;
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
        cudaGetLastError();  // not sticky; the launch reports a real problem
        sms = 132;
    }
    const int64_t target = int64_t(AUTO_WARPS_PER_SM) * sms;
    int w = 1;
    while (w < MAX_WARPS && w < g.n_super && g.n_tiles * w < target) w *= 2;
    return std::min(w, g.n_super);
}

// Scratch of one launch of m rows (<= 8; MMA <= 16), each part 256-aligned: [activations][group or
// word params] and, for the int8 paths (TC and MMA share one preparation, so either kernel runs
// from it) at the group sizes the MMA kernel takes, [xa] the same q in its order (16 row slots x
// k_pad bytes).
struct Scratch {
    void* acts;
    void* params;
    void* xa;  // null unless has_xa (the int8 paths at the MMA kernel's group sizes)
};
bool int8_path(BitplaneCudaPath path) { return path == BITPLANE_CUDA_TC || path == BITPLANE_CUDA_MMA; }
size_t acts_bytes(const Geometry& g, int64_t m, BitplaneCudaPath path) {
    if (path == BITPLANE_CUDA_MMA_A16) return size_t(mma::ROWS) * size_t(g.k_pad) * sizeof(__half);  // 16 row slots
    return int8_path(path) ? size_t(m) * g.n_super * SUPER_K  // 32 lanes x 16 bytes
                           : size_t(m) * g.k_pad * sizeof(float);
}
size_t params_bytes(const Geometry& g, int64_t m, BitplaneCudaPath path) {
    return path != BITPLANE_CUDA_FP32 ? size_t(m) * g.n_groups * sizeof(float2) : size_t(m) * (g.k_pad / 32) * sizeof(float);
}
bool has_xa(const Geometry& g, BitplaneCudaPath path) {  // the MMA kernel could read this preparation
    return int8_path(path) && bitplane_cuda_mma_supports(g.group_size);
}
size_t xa_bytes(const Geometry& g, BitplaneCudaPath path) {
    return has_xa(g, path) ? size_t(mma::ROWS) * size_t(g.k_pad) : 0;
}
Scratch carve(const Geometry& g, int64_t m, BitplaneCudaPath path, void* ws) {
    char* p = static_cast<char*>(ws);
    char* params = p + align256(acts_bytes(g, m, path));
    char* xa = params + align256(params_bytes(g, m, path));
    return {ws, params, has_xa(g, path) ? xa : nullptr};
}
size_t scratch_bytes(const Geometry& g, int64_t m, BitplaneCudaPath path) {
    return align256(acts_bytes(g, m, path)) + align256(params_bytes(g, m, path)) + align256(xa_bytes(g, path));
}

// x (m, k), m <= bitplane_cuda_launch_rows(path) -> the scratch of `path`.
void bitplane_prepare_launch(const Geometry& g, const float* x, int64_t m, BitplaneCudaPath path, const Scratch& sc,
                             cudaStream_t stream) {
    const dim3 grid(unsigned(g.n_super), unsigned(m));
    if (path == BITPLANE_CUDA_MMA_A16)
        launch_kernel(bitplane_prepare_a16_kernel, grid, dim3(PREP_THREADS), 0, stream, x, g.k, g.n_groups,
                      g.group_size, static_cast<__half*>(sc.acts), static_cast<float2*>(sc.params));
    else if (int8_path(path))
        launch_kernel(bitplane_prepare_tc_kernel<0>, grid, dim3(PREP_THREADS), 0, stream, x, g.k, g.n_super, g.n_groups,
                      g.group_size, static_cast<uint32_t*>(sc.acts), static_cast<float2*>(sc.params),
                      static_cast<int8_t*>(sc.xa), static_cast<const float*>(nullptr), 0.0f,
                      static_cast<float*>(nullptr));
    else
        launch_kernel(bitplane_prepare_fp32_kernel, grid, dim3(PREP_THREADS), 0, stream, x, g.k, g.k_pad,
                      static_cast<float*>(sc.acts), static_cast<float*>(sc.params));
}

// One linear as the only part of a launch.
GemvParts single_part(const uint8_t* planes, uint64_t plane_bytes, const uint16_t* qparams, float* y, int64_t n,
                      const int32_t* bits_dev) {
    GemvParts parts{};
    parts.part[0] = {planes, reinterpret_cast<const __half2*>(qparams), y, bits_dev, plane_bytes, n, 0};
    parts.count = 1;
    return parts;
}

// The row tiles of all parts: the launch's grid.
int64_t total_tiles(const GemvParts& parts) {
    const GemvPart& last = parts.part[parts.count - 1];
    return last.tile0 + ceil_div(last.n, TILE_N);
}

// y_i (m, n_i) (m <= the path's launch rows) of every part from the prepared scratch (accumulate: y_i += it); g: the
// geometry the parts share (k, group size). bits_dev: see effective_bits.
void bitplane_matmul_launch(const Geometry& g, const GemvParts& parts, int bits, int max_bits, int64_t m,
                            BitplaneCudaPath path, const Scratch& sc, int warps, bool prefetch, cudaStream_t stream,
                            bool accumulate = false) {
    const dim3 grid(unsigned(total_tiles(parts))), block(unsigned(32 * warps));
    if (path == BITPLANE_CUDA_TC) {
        const int L = g.group_size >= 256 ? 1 : 256 / g.group_size;
        const int group_shift = g.group_size == 512 ? 1 : 0;
        launch_kernel(tc_kernel(int(m), L), grid, block, 0, stream, parts, static_cast<const uint4*>(sc.acts),
                      static_cast<const float2*>(sc.params), g.k_pad, g.n_groups, g.n_super, g.last_words,
                      group_shift, bits, max_bits, accumulate, prefetch);
    } else if (path == BITPLANE_CUDA_MMA || path == BITPLANE_CUDA_MMA_A16) {
        const int group_chunk_shift = g.group_size == 128 ? 0 : g.group_size == 256 ? 1 : 2;
        const bool a16 = path == BITPLANE_CUDA_MMA_A16;
        launch_kernel(a16 ? mma_kernel<true>(int(m)) : mma_kernel<false>(int(m)), grid, block, 0, stream, parts,
                      static_cast<const uint4*>(a16 ? sc.acts : sc.xa), static_cast<const float2*>(sc.params), g.k_pad,
                      g.n_groups, g.n_super, g.last_words, group_chunk_shift, bits, max_bits, accumulate, prefetch);
    } else {
        launch_kernel(fp32_kernel(int(m)), grid, block, 0, stream, parts, static_cast<const float*>(sc.acts),
                      static_cast<const float*>(sc.params), g.k_pad, g.n_groups, g.n_super, g.last_words,
                      g.group_size / 32, bits, max_bits, accumulate, prefetch);
    }
}

// Test entry points fill the scratch with 0xff bytes first (NaN floats, -1 int8), so a byte the
// kernels read without the preparation having written it shows in the result.
void poison_scratch(DeviceBuffer<uint8_t>& ws, size_t bytes, const std::string& fn) {
    cuda_check(cudaMemset(ws.get(), 0xff, bytes), fn + " (poison workspace)");
}

// ---- validation ----------------------------------------------------------------------------------

void check(bool ok, const std::string& fn, const std::string& what) {
    if (!ok) throw Error(fn + ": " + what);
}

void validate(const BitplaneLinear& w, int bits, int64_t m, const std::string& fn) {
    check_bitplane_view(w, bits, m, fn);
    check(ceil_div(w.n, TILE_N) <= int64_t(0x7fffffff) && ceil_div(w.k, SUPER_K) <= 65535, fn, "linear too large");
}

// 1..8 rows per launch (TC, FP32), 1..16 for MMA (the 16 rows of its mma tile).
void check_launch_rows(int64_t m, BitplaneCudaPath path, const std::string& fn) {
    const int rows = bitplane_cuda_launch_rows(path);
    check(m >= 1 && m <= rows, fn,
          "m must be in 1.." + std::to_string(rows) + " for this path, got " + std::to_string(m));
}

// The path of an int8 preparation (TC or MMA: both kernels read it), resolved for w's group size.
BitplaneCudaPath int8_prep_path(const BitplaneLinear& w, BitplaneCudaPath path, const std::string& fn) {
    check(path == BITPLANE_CUDA_TC || path == BITPLANE_CUDA_MMA, fn,
          "path must be TC or MMA (the paths of the int8 preparation), got " + std::to_string(int(path)));
    return bitplane_cuda_resolve_path(w, path);  // throws for group sizes the path lacks
}

void validate_tuning(const BitplaneCudaTuning& tuning, const std::string& fn) {
    check(tuning.warps_per_block >= 0 && tuning.warps_per_block <= MAX_WARPS, fn,
          "warps_per_block must be in 0..16, got " + std::to_string(tuning.warps_per_block));
    check(tuning.prefetch >= -1 && tuning.prefetch <= 1, fn,
          "prefetch must be -1 (default), 0 or 1, got " + std::to_string(tuning.prefetch));
}

}  // namespace

// ---- entry points ----------------------------------------------------------------------------------

void check_bitplane_view(const BitplaneLinear& w, int bits, int64_t m, const std::string& fn) {
    check(w.n > 0 && w.k > 0, fn, "n and k must be positive, got n=" + std::to_string(w.n) + ", k=" + std::to_string(w.k));
    check(w.max_bits >= 2 && w.max_bits <= 8, fn, "max_bits must be in 2..8, got " + std::to_string(w.max_bits));
    check(w.group_size > 0 && w.group_size % 32 == 0, fn,
          "group_size must be a positive multiple of 32, got " + std::to_string(w.group_size));
    check(bits >= 2 && bits <= w.max_bits, fn,
          "bits must be in 2.." + std::to_string(w.max_bits) + ", got " + std::to_string(bits));
    const uint64_t want = uint64_t(ceil_div(w.n, 8) * 8) * uint64_t(ceil_div(w.k, 128) * 128) / 8;
    check(w.plane_bytes == want, fn,
          "plane_bytes must be " + std::to_string(want) + " for n=" + std::to_string(w.n) + ", k=" +
              std::to_string(w.k) + ", got " + std::to_string(w.plane_bytes));
    check(m >= 0, fn, "m must be >= 0, got " + std::to_string(m));
}

bool bitplane_cuda_tc_supports(int group_size) {
    return group_size == 32 || group_size == 64 || group_size == 128 || group_size == 256 || group_size == 512;
}

bool bitplane_cuda_mma_supports(int group_size) {
    return group_size == 128 || group_size == 256 || group_size == 512;
}

BitplaneCudaPath bitplane_cuda_resolve_path(const BitplaneLinear& w, BitplaneCudaPath path) {
    if (path == BITPLANE_CUDA_AUTO) return bitplane_cuda_tc_supports(w.group_size) ? BITPLANE_CUDA_TC : BITPLANE_CUDA_FP32;
    if (path == BITPLANE_CUDA_TC && !bitplane_cuda_tc_supports(w.group_size))
        throw Error("bitplane_matmul_cuda: the TC path needs group_size 32, 64, 128, 256 or 512, got " +
                    std::to_string(w.group_size) + " (use the FP32 path)");
    if ((path == BITPLANE_CUDA_MMA || path == BITPLANE_CUDA_MMA_A16) && !bitplane_cuda_mma_supports(w.group_size))
        throw Error(std::string("bitplane_matmul_cuda: the ") + (path == BITPLANE_CUDA_MMA ? "MMA" : "MMA_A16") +
                    " path needs group_size 128, 256 or 512, got " + std::to_string(w.group_size) +
                    (path == BITPLANE_CUDA_MMA ? " (use the TC path)" : " (use the FP32 path)"));
    if (path != BITPLANE_CUDA_TC && path != BITPLANE_CUDA_FP32 && path != BITPLANE_CUDA_MMA &&
        path != BITPLANE_CUDA_MMA_A16)
        throw Error("bitplane_matmul_cuda: unknown path " + std::to_string(int(path)));
    return path;
}

int bitplane_cuda_launch_rows(BitplaneCudaPath path) {
    return path == BITPLANE_CUDA_MMA || path == BITPLANE_CUDA_MMA_A16 ? MMA_MAX_M : MAX_M;
}

size_t bitplane_matmul_cuda_workspace(const BitplaneLinear& w, int64_t m, BitplaneCudaPath path) {
    path = bitplane_cuda_resolve_path(w, path);
    return scratch_bytes(geometry(w), std::min<int64_t>(std::max<int64_t>(m, 1), bitplane_cuda_launch_rows(path)), path);
}

void bitplane_matmul_cuda_async(const BitplaneLinear& w, int bits, const float* x, int64_t m, float* y,
                                void* workspace, size_t workspace_bytes, BitplaneCudaPath path, CUstream_st* stream,
                                const BitplaneCudaTuning& tuning, const int32_t* bits_dev, bool accumulate) {
    const std::string fn = "bitplane_matmul_cuda_async";
    validate(w, bits, m, fn);
    path = bitplane_cuda_resolve_path(w, path);
    if (m == 0) return;
    check(w.planes && w.qparams && x && y && workspace, fn, "null pointer");
    // 16-byte lane loads of the planes; half2 loads of the qparams.
    check(reinterpret_cast<uintptr_t>(w.planes) % 16 == 0, fn, "planes must be 16-byte aligned");
    check(reinterpret_cast<uintptr_t>(w.qparams) % 4 == 0, fn, "qparams must be 4-byte aligned");
    check(reinterpret_cast<uintptr_t>(workspace) % 256 == 0, fn, "workspace must be 256-byte aligned");
    validate_tuning(tuning, fn);
    const size_t need = bitplane_matmul_cuda_workspace(w, m, path);
    check(workspace_bytes >= need, fn,
          "workspace holds " + std::to_string(workspace_bytes) + " bytes, needs " + std::to_string(need));

    const Geometry g = geometry(w);
    const int warps = pick_warps(g, tuning.warps_per_block);
    const int64_t rows = bitplane_cuda_launch_rows(path);
    for (int64_t r0 = 0; r0 < m; r0 += rows) {  // the workspace is reused in stream order
        const int64_t mm = std::min<int64_t>(rows, m - r0);
        const Scratch sc = carve(g, mm, path, workspace);
        bitplane_prepare_launch(g, x + r0 * w.k, mm, path, sc, stream);
        bitplane_matmul_launch(g, single_part(w.planes, w.plane_bytes, w.qparams, y + r0 * w.n, w.n, bits_dev), bits,
                               w.max_bits, mm, path, sc, warps, use_prefetch(tuning.prefetch), stream, accumulate);
    }
    cuda_check(cudaGetLastError(), fn + " (kernel launch)");
}

namespace {
// The checks both halves share: the linear, the device pointers, the workspace.
void validate_async(const BitplaneLinear& w, int bits, int64_t m, const void* workspace, size_t workspace_bytes,
                    BitplaneCudaPath path, const std::string& fn) {
    validate(w, bits, m, fn);
    check_launch_rows(m, path, fn);
    check(w.planes && w.qparams && workspace, fn, "null pointer");
    check(reinterpret_cast<uintptr_t>(w.planes) % 16 == 0, fn, "planes must be 16-byte aligned");
    check(reinterpret_cast<uintptr_t>(w.qparams) % 4 == 0, fn, "qparams must be 4-byte aligned");
    check(reinterpret_cast<uintptr_t>(workspace) % 256 == 0, fn, "workspace must be 256-byte aligned");
    const size_t need = bitplane_matmul_cuda_workspace(w, m, path);
    check(workspace_bytes >= need, fn,
          "workspace holds " + std::to_string(workspace_bytes) + " bytes, needs " + std::to_string(need));
}
}  // namespace

void bitplane_prepare_cuda_async(const BitplaneLinear& w, const float* x, int64_t m, void* workspace,
                                 size_t workspace_bytes, BitplaneCudaPath path, CUstream_st* stream) {
    const std::string fn = "bitplane_prepare_cuda_async";
    path = bitplane_cuda_resolve_path(w, path);
    validate_async(w, w.max_bits, m, workspace, workspace_bytes, path, fn);
    check(x != nullptr, fn, "null pointer");
    const Geometry g = geometry(w);
    bitplane_prepare_launch(g, x, m, path, carve(g, m, path, workspace), stream);
    cuda_check(cudaGetLastError(), fn + " (kernel launch)");
}

void bitplane_prepare_fused_cuda_async(const BitplaneLinear& w, BitplanePrepareFusion op, const float* x,
                                       const float* aux, float eps, int64_t m, float* out, void* workspace,
                                       size_t workspace_bytes, CUstream_st* stream, BitplaneCudaPath path) {
    const std::string fn = "bitplane_prepare_fused_cuda_async";
    check(op == BITPLANE_FUSE_RMS_NORM || op == BITPLANE_FUSE_SWIGLU, fn,
          "op must be BITPLANE_FUSE_RMS_NORM or BITPLANE_FUSE_SWIGLU, got " + std::to_string(int(op)));
    path = int8_prep_path(w, path, fn);
    validate_async(w, w.max_bits, m, workspace, workspace_bytes, path, fn);
    check(x && aux && out, fn, "null pointer");
    const Geometry g = geometry(w);
    const Scratch sc = carve(g, m, path, workspace);
    const dim3 grid(unsigned(g.n_super), unsigned(m));
    auto* xq = static_cast<uint32_t*>(sc.acts);
    auto* ap = static_cast<float2*>(sc.params);
    auto* xa = static_cast<int8_t*>(sc.xa);
    if (op == BITPLANE_FUSE_RMS_NORM)
        launch_kernel(bitplane_prepare_tc_kernel<BITPLANE_FUSE_RMS_NORM>, grid, dim3(PREP_THREADS), 0, stream, x, g.k,
                      g.n_super, g.n_groups, g.group_size, xq, ap, xa, aux, eps, out);
    else
        launch_kernel(bitplane_prepare_tc_kernel<BITPLANE_FUSE_SWIGLU>, grid, dim3(PREP_THREADS), 0, stream, x, g.k,
                      g.n_super, g.n_groups, g.group_size, xq, ap, xa, aux, eps, out);
    cuda_check(cudaGetLastError(), fn + " (kernel launch)");
}

void bitplane_matmul_prepared_cuda_async(const BitplaneLinear& w, int bits, int64_t m, float* y, const void* workspace,
                                         size_t workspace_bytes, BitplaneCudaPath path, CUstream_st* stream,
                                         const BitplaneCudaTuning& tuning, const int32_t* bits_dev, bool accumulate) {
    const std::string fn = "bitplane_matmul_prepared_cuda_async";
    path = bitplane_cuda_resolve_path(w, path);
    validate_async(w, bits, m, workspace, workspace_bytes, path, fn);
    validate_tuning(tuning, fn);
    check(y != nullptr, fn, "null pointer");
    const Geometry g = geometry(w);
    bitplane_matmul_launch(g, single_part(w.planes, w.plane_bytes, w.qparams, y, w.n, bits_dev), bits, w.max_bits, m,
                           path, carve(g, m, path, const_cast<void*>(workspace)), pick_warps(g, tuning.warps_per_block),
                           use_prefetch(tuning.prefetch), stream, accumulate);
    cuda_check(cudaGetLastError(), fn + " (kernel launch)");
}

void bitplane_matmul_prepared_multi_cuda_async(const BitplaneLinear* ws, int count, int bits, int64_t m,
                                               float* const* ys, const void* workspace, size_t workspace_bytes,
                                               BitplaneCudaPath path, CUstream_st* stream,
                                               const int32_t* const* bits_devs, bool accumulate,
                                               const BitplaneCudaTuning& tuning) {
    const std::string fn = "bitplane_matmul_prepared_multi_cuda_async";
    check(ws != nullptr && ys != nullptr, fn, "null pointer");
    validate_tuning(tuning, fn);
    check(count >= 1 && count <= MAX_PARTS, fn,
          "count must be in 1.." + std::to_string(MAX_PARTS) + ", got " + std::to_string(count));
    path = bitplane_cuda_resolve_path(ws[0], path);
    GemvParts parts{};
    parts.count = count;
    int64_t tiles = 0;
    for (int i = 0; i < count; ++i) {
        const BitplaneLinear& w = ws[i];
        const std::string li = " (linear " + std::to_string(i) + ")";
        validate_async(w, bits, m, workspace, workspace_bytes, path, fn + li);
        check(bitplane_cuda_resolve_path(w, path) == path, fn, "the linears must take the same path" + li);
        // they read one prepared input: the same columns, groups and code range
        check(w.k == ws[0].k && w.group_size == ws[0].group_size && w.max_bits == ws[0].max_bits, fn,
              "linear " + std::to_string(i) + " has k=" + std::to_string(w.k) + ", group_size=" +
                  std::to_string(w.group_size) + ", max_bits=" + std::to_string(w.max_bits) + "; linear 0 has " +
                  std::to_string(ws[0].k) + ", " + std::to_string(ws[0].group_size) + ", " +
                  std::to_string(ws[0].max_bits));
        check(ys[i] != nullptr, fn, "null pointer" + li);
        parts.part[i] = {w.planes, reinterpret_cast<const __half2*>(w.qparams), ys[i],
                         bits_devs ? bits_devs[i] : nullptr, w.plane_bytes, w.n, tiles};
        tiles += ceil_div(w.n, TILE_N);
    }
    check(tiles <= int64_t(0x7fffffff), fn, "linears too large");
    Geometry g = geometry(ws[0]);
    g.n_tiles = tiles;  // the warps per block follow the whole grid
    bitplane_matmul_launch(g, parts, bits, ws[0].max_bits, m, path, carve(g, m, path, const_cast<void*>(workspace)),
                           pick_warps(g, tuning.warps_per_block), use_prefetch(tuning.prefetch), stream, accumulate);
    cuda_check(cudaGetLastError(), fn + " (kernel launch)");
}

void bitplane_matmul_multi_cuda(const BitplaneLinear* ws, const int* bits, int count, const float* x, int64_t m,
                                float* const* ys, BitplaneCudaPath path, const BitplaneCudaTuning& tuning) {
    const std::string fn = "bitplane_matmul_multi_cuda";
    check(ws && bits && x && ys, fn, "null pointer");
    validate_tuning(tuning, fn);
    check(count >= 1 && count <= MAX_PARTS, fn,
          "count must be in 1.." + std::to_string(MAX_PARTS) + ", got " + std::to_string(count));
    check_launch_rows(m, bitplane_cuda_resolve_path(ws[0], path), fn);
    int cap = 2;  // the launch's bits: a cap; linear i runs at bits[i] <= cap from device memory
    for (int i = 0; i < count; ++i) {
        validate(ws[i], bits[i], m, fn + " (linear " + std::to_string(i) + ")");
        check(ws[i].planes && ws[i].qparams && ys[i], fn, "null pointer (linear " + std::to_string(i) + ")");
        cap = std::max(cap, bits[i]);
    }
    path = bitplane_cuda_resolve_path(ws[0], path);
    std::vector<std::unique_ptr<DeviceLinear>> dws;
    std::vector<BitplaneLinear> views;
    std::vector<std::unique_ptr<DeviceBuffer<float>>> yds;
    std::vector<float*> yptr;
    for (int i = 0; i < count; ++i) {
        // only its own bits[i] planes: the host array may hold no more (the kernel reads no more)
        dws.push_back(std::make_unique<DeviceLinear>(ws[i], bits[i], fn));
        views.push_back(dws.back()->view);
        yds.push_back(std::make_unique<DeviceBuffer<float>>(size_t(m) * ws[i].n, fn));
        poison(*yds.back(), size_t(m) * ws[i].n, fn + " y");
        yptr.push_back(yds.back()->get());
    }
    DeviceBuffer<int32_t> bd(size_t(count), fn);
    std::vector<int32_t> b32(bits, bits + count);
    upload(bd, b32.data(), size_t(count), fn + " bits");
    std::vector<const int32_t*> bptr;
    for (int i = 0; i < count; ++i) bptr.push_back(bd.get() + i);
    const size_t ws_bytes = bitplane_matmul_cuda_workspace(ws[0], m, path);
    DeviceBuffer<float> xd(size_t(m) * ws[0].k, fn);
    DeviceBuffer<uint8_t> scratch(ws_bytes, fn);
    poison_scratch(scratch, ws_bytes, fn);
    upload(xd, x, size_t(m) * ws[0].k, fn + " x");
    bitplane_prepare_cuda_async(views[0], xd.get(), m, scratch.get(), ws_bytes, path, nullptr);
    bitplane_matmul_prepared_multi_cuda_async(views.data(), count, cap, m, yptr.data(), scratch.get(), ws_bytes, path,
                                              nullptr, bptr.data(), false, tuning);
    for (int i = 0; i < count; ++i) download(ys[i], *yds[size_t(i)], size_t(m) * ws[i].n, fn + " y");
}

void bitplane_matmul_cuda(const BitplaneLinear& w, int bits, const float* x, int64_t m, float* y,
                          BitplaneCudaPath path, const BitplaneCudaTuning& tuning, const float* y0) {
    const std::string fn = "bitplane_matmul_cuda";
    validate(w, bits, m, fn);
    validate_tuning(tuning, fn);
    path = bitplane_cuda_resolve_path(w, path);
    check(w.planes && w.qparams && x && y, fn, "null pointer");
    if (m == 0) return;
    const DeviceLinear dw(w, bits, fn);
    const size_t ws_bytes = bitplane_matmul_cuda_workspace(w, m, path);
    DeviceBuffer<float> xd(size_t(m) * w.k, fn), yd(size_t(m) * w.n, fn);
    DeviceBuffer<uint8_t> ws(ws_bytes, fn);
    poison_scratch(ws, ws_bytes, fn);
    upload(xd, x, size_t(m) * w.k, fn + " x");
    start_output(yd, y0, size_t(m) * w.n, fn + " y");
    bitplane_matmul_cuda_async(dw.view, bits, xd.get(), m, yd.get(), ws.get(), ws_bytes, path, nullptr, tuning,
                               nullptr, y0 != nullptr);
    download(y, yd, size_t(m) * w.n, fn + " y");
}

void bitplane_matmul_fused_cuda(const BitplaneLinear& w, int bits, BitplanePrepareFusion op, const float* x,
                                const float* aux, float eps, int64_t m, float* y, float* out, BitplaneCudaPath path) {
    const std::string fn = "bitplane_matmul_fused_cuda";
    validate(w, bits, m, fn);
    path = int8_prep_path(w, path, fn);
    check(w.planes && w.qparams && x && aux && y && out, fn, "null pointer");
    check_launch_rows(m, path, fn);
    const DeviceLinear dw(w, bits, fn);
    const size_t ws_bytes = bitplane_matmul_cuda_workspace(w, m, path);
    const size_t aux_n = op == BITPLANE_FUSE_RMS_NORM ? size_t(w.k) : size_t(m) * w.k;
    DeviceBuffer<float> xd(size_t(m) * w.k, fn), ad(aux_n, fn), od(size_t(m) * w.k, fn), yd(size_t(m) * w.n, fn);
    DeviceBuffer<uint8_t> ws(ws_bytes, fn);
    poison_scratch(ws, ws_bytes, fn);
    upload(xd, x, size_t(m) * w.k, fn + " x");
    upload(ad, aux, aux_n, fn + " aux");
    poison(od, size_t(m) * w.k, fn + " out");
    poison(yd, size_t(m) * w.n, fn + " y");
    // SwiGLU in place, as the engine runs it (out = x = the gate)
    float* const o = op == BITPLANE_FUSE_SWIGLU ? xd.get() : od.get();
    bitplane_prepare_fused_cuda_async(dw.view, op, xd.get(), ad.get(), eps, m, o, ws.get(), ws_bytes, nullptr, path);
    bitplane_matmul_prepared_cuda_async(dw.view, bits, m, yd.get(), ws.get(), ws_bytes, path, nullptr);
    download(y, yd, size_t(m) * w.n, fn + " y");
    download(out, op == BITPLANE_FUSE_SWIGLU ? xd : od, size_t(m) * w.k, fn + " out");
}

// ---- benchmark ---------------------------------------------------------------------------------------

namespace {

// RAII holder of a captured graph, so that an error thrown mid-benchmark releases it.
struct Graph {
    cudaGraph_t g = nullptr;
    cudaGraphExec_t exec = nullptr;
    ~Graph() {
        if (exec) cudaGraphExecDestroy(exec);
        if (g) cudaGraphDestroy(g);
    }
};

// Captures `enqueue(i)` for i < launches into a graph on `stream`, replays it (2 warm-ups, then
// `reps` timed), returns per-launch times in microseconds, sorted.
template <class F>
std::vector<double> time_graph(cudaStream_t stream, int launches, int reps, const std::string& fn, F enqueue) {
    Graph graph;
    cuda_check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), fn + " (begin capture)");
    for (int i = 0; i < launches; ++i) enqueue(i);
    const cudaError_t launch_err = cudaGetLastError();
    const cudaError_t capture_err = cudaStreamEndCapture(stream, &graph.g);
    cuda_check(launch_err, fn + " (launch during capture)");
    cuda_check(capture_err, fn + " (end capture)");
    cuda_check(cudaGraphInstantiate(&graph.exec, graph.g, 0), fn + " (instantiate)");
    CudaEvent start(fn), stop(fn);
    std::vector<double> us;
    for (int rep = -2; rep < reps; ++rep) {
        cuda_check(cudaEventRecord(start.e, stream), fn);
        cuda_check(cudaGraphLaunch(graph.exec, stream), fn + " (graph launch)");
        cuda_check(cudaEventRecord(stop.e, stream), fn);
        cuda_check(cudaEventSynchronize(stop.e), fn + " (replay)");
        float ms = 0;
        cuda_check(cudaEventElapsedTime(&ms, start.e, stop.e), fn);
        if (rep >= 0) us.push_back(1000.0 * ms / launches);
    }
    std::sort(us.begin(), us.end());
    return us;
}

}  // namespace

BitplaneCudaTiming bitplane_matmul_cuda_bench(const BitplaneLinear& w, int bits, const float* x, int64_t m,
                                              BitplaneCudaPath path, int copies, int reps,
                                              const BitplaneCudaTuning& tuning) {
    const std::string fn = "bitplane_matmul_cuda_bench";
    validate(w, bits, m, fn);
    path = bitplane_cuda_resolve_path(w, path);
    check_launch_rows(m, path, fn);
    check(w.planes && w.qparams && x, fn, "null pointer");
    check(reps >= 1 && copies >= 0, fn, "reps must be >= 1 and copies >= 0");
    validate_tuning(tuning, fn);

    int device = 0;
    cuda_check(cudaGetDevice(&device), fn);
    cudaDeviceProp prop{};
    cuda_check(cudaGetDeviceProperties(&prop, device), fn);
    const size_t planes_bytes = size_t(bits) * w.plane_bytes;
    const size_t qparams_count = size_t(w.n) * w.n_groups() * 2;
    const size_t per_copy = planes_bytes + qparams_count * 2;
    if (copies == 0) {  // rotate through >= 4x L2 of weights, within 8 GB
        const size_t l2 = size_t(std::max(prop.l2CacheSize, 1 << 20));
        copies = int(std::clamp<size_t>((4 * l2 + per_copy - 1) / per_copy, 2, 256));
        copies = int(std::max<size_t>(2, std::min<size_t>(copies, (size_t(8) << 30) / per_copy)));
    }

    std::vector<std::unique_ptr<DeviceLinear>> weight_copies;
    for (int c = 0; c < copies; ++c) weight_copies.push_back(std::make_unique<DeviceLinear>(w, bits, fn));
    cuda_check(cudaDeviceSynchronize(), fn + " (uploads complete)");  // the stream below is non-blocking
    const Geometry g = geometry(w);
    const size_t ws_bytes = scratch_bytes(g, m, path);
    DeviceBuffer<float> xd(size_t(m) * w.k, fn), yd(size_t(m) * w.n, fn);
    DeviceBuffer<uint8_t> ws(ws_bytes, fn);
    cuda_check(cudaMemcpy(xd.get(), x, size_t(m) * w.k * sizeof(float), cudaMemcpyHostToDevice), fn);
    const Scratch sc = carve(g, m, path, ws.get());
    const int warps = pick_warps(g, tuning.warps_per_block);
    const bool prefetch = use_prefetch(tuning.prefetch);

    CudaStream stream(fn);
    bitplane_prepare_launch(g, xd.get(), m, path, sc, stream.s);  // the matmul-only graph reads this
    cuda_check(cudaStreamSynchronize(stream.s), fn + " (prepare)");
    const int launches = std::max(copies, 128);
    auto matmul = [&](int i) {
        const int c = i % copies;
        const BitplaneLinear& wc = weight_copies[size_t(c)]->view;
        bitplane_matmul_launch(g, single_part(wc.planes, wc.plane_bytes, wc.qparams, yd.get(), w.n, nullptr), bits,
                               w.max_bits, m, path, sc, warps, prefetch, stream.s);
    };
    const std::vector<double> mm = time_graph(stream.s, launches, reps, fn, matmul);
    const std::vector<double> prep = time_graph(stream.s, launches, reps, fn, [&](int) {
        bitplane_prepare_launch(g, xd.get(), m, path, sc, stream.s);
    });
    const std::vector<double> total = time_graph(stream.s, launches, reps, fn, [&](int i) {
        bitplane_prepare_launch(g, xd.get(), m, path, sc, stream.s);
        matmul(i);
    });

    BitplaneCudaTiming out;
    out.matmul_us = mm[mm.size() / 2];
    out.matmul_min_us = mm.front();
    out.prepare_us = prep[prep.size() / 2];
    out.total_us = total[total.size() / 2];
    out.copies = copies;
    out.launches = launches;
    out.warps_per_block = warps;
    out.prefetch = prefetch ? 1 : 0;
    return out;
}

}  // namespace flexquant

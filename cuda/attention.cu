// Causal grouped-query attention of m new tokens over a KV cache, query i at position p_i:
//   s_t      = q[i, h] · K[t, h / (H / Hkv)] / sqrt(d)               t = 0 .. p_i
//   out[i,h] = Σ_t softmax(s)_t · V[t, h / (H / Hkv)]
// q (m, H, d); K, V cache (t_max, Hkv, d) fp32 or fp16; out (m, H, d). fp32 math. With several
// sequences in one cache, query i reads the rows bases[i] + t (its sequence's block of the cache).
//
// The CUDA twin of cpp/src/ops/attention.cpp. One block = one (token, head) and one of n_splits
// spans of its positions ("flash-decoding": at decode there are only H (token, head) pairs, far
// too few blocks for the GPU, so the positions are split too). Each warp runs an online softmax
// over runs of P = 4 positions, every 4th run of the span (max m, Σ exp l, Σ exp·V acc), the
// block merges its warps, and with n_splits > 1 a second kernel merges the spans:
//   M = max_c m_c,   out = Σ_c e^(m_c - M) acc_c / Σ_c e^(m_c - M) l_c.
// The spans are cut from the length p_i + 1 read at run time, so one captured launch serves every
// position. A lane holds DJ = ceil(d / 32) dims of the head, so one K or V row is one coalesced
// read per warp: with VEC (d a multiple of 128) dims 128j + 4·lane + 0..3, one 16-byte (fp32) or
// 8-byte (fp16) load per lane and 128 dims; else dims lane + 32j, one load per dim.
//
// Prefill (attention_prefill_kernel): the m rows of one sequence at consecutive positions, tiled over
// the queries, so that a tile of 32 queries reads each K and V row once (the per-(token, head) kernel
// reads a row once per query: a 2048-token prompt read its cache about a thousand times per layer).
#include <cuda_fp16.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>

#include "cuda_backend.h"

namespace flexquant {

namespace {
constexpr int WARPS = 4;
constexpr int P = 4;  // positions in flight per warp (their K and V rows: 2P rows)
constexpr int MAX_DJ = ATTENTION_MAX_HEAD_DIM / 32;

// The head dim of a lane's element e (see the header).
template <bool VEC>
__device__ __forceinline__ int dim_of(int e, int lane) {
    return VEC ? 128 * (e >> 2) + 4 * lane + (e & 3) : lane + 32 * e;
}

__device__ __forceinline__ float load_kv(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_kv(const __half* p) { return __half2float(*p); }
// 4 consecutive cache values (16-byte aligned fp32, 8-byte aligned fp16) as floats.
__device__ __forceinline__ float4 load_kv4(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }
__device__ __forceinline__ float4 load_kv4(const __half* p) {
    const uint2 r = __ldg(reinterpret_cast<const uint2*>(p));
    __half2_raw lo, hi;
    lo.x = static_cast<unsigned short>(r.x & 0xffffu), lo.y = static_cast<unsigned short>(r.x >> 16);
    hi.x = static_cast<unsigned short>(r.y & 0xffffu), hi.y = static_cast<unsigned short>(r.y >> 16);
    const float2 a = __half22float2(__half2(lo)), b = __half22float2(__half2(hi));
    return make_float4(a.x, a.y, b.x, b.y);
}
}  // namespace

template <class KV, int DJ, bool VEC>
static __global__ void __launch_bounds__(WARPS * 32)
attention_kernel(const float* __restrict__ q,            // (m, H, d)
                 const KV* __restrict__ k_cache,         // (t_max, Hkv, d)
                 const KV* __restrict__ v_cache,         // (t_max, Hkv, d)
                 const int64_t* __restrict__ positions,  // (m)
                 const int64_t* __restrict__ bases,      // (m) cache row of each query's position 0, or null
                 int64_t n_heads, int64_t n_kv_heads, int d, float scale,
                 float* __restrict__ partial,            // (m, H, n_splits, d + 2) when n_splits > 1
                 float* __restrict__ out) {              // (m, H, d)
    pdl_begin();  // cuda_backend.h: launched with PDL in the engine's passes
    static_assert(!VEC || DJ % 4 == 0, "VEC lanes hold 4 dims per 128");
    __shared__ float s_m[WARPS], s_l[WARPS];
    __shared__ float s_acc[WARPS][DJ * 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t pair = blockIdx.x;  // token i, head h
    const int64_t i = pair / n_heads, h = pair % n_heads;
    const int64_t hk = h / (n_heads / n_kv_heads);
    const int n_splits = gridDim.y, split = blockIdx.y;
    const int64_t len = positions[i] + 1;
    const int64_t base = bases ? bases[i] : 0;
    const int64_t chunk = (len + n_splits - 1) / n_splits;
    const int64_t t0 = split * chunk, t1 = min(len, t0 + chunk);

    float qv[DJ], acc[DJ];
#pragma unroll
    for (int e = 0; e < DJ; ++e) {
        const int dd = dim_of<VEC>(e, lane);
        qv[e] = VEC || dd < d ? q[pair * d + dd] : 0.0f;
        acc[e] = 0.0f;
    }
    // P positions per warp and step, their K and V rows all loaded before any is used: one
    // position at a time waits a memory round trip per position (58 µs a layer at 2048 positions
    // on an H100, 4 warps per block and few blocks per SM at decode), P at a time overlaps P of
    // them, and V loaded with K (not after the scores) halves the round trips again.
    float m = -INFINITY, l = 0.0f;
    float kr[P][DJ], vr[P][DJ], s[P];
    // r = this lane's dims of the cache row of position tb + u (zeros past t1 or d)
    auto load_row = [&](const KV* cache, int64_t tb, int u, float (&r)[DJ]) {
        const bool in = tb + u < t1;
        const KV* row = cache + ((base + tb + u) * n_kv_heads + hk) * d;
        if (VEC) {
#pragma unroll
            for (int j = 0; j < DJ / 4; ++j) {
                const float4 v = in ? load_kv4(row + 128 * j + 4 * lane) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                r[4 * j] = v.x, r[4 * j + 1] = v.y, r[4 * j + 2] = v.z, r[4 * j + 3] = v.w;
            }
        } else {
#pragma unroll
            for (int e = 0; e < DJ; ++e) {
                const int dd = dim_of<VEC>(e, lane);
                r[e] = in && dd < d ? load_kv(row + dd) : 0.0f;
            }
        }
    };
    for (int64_t tb = t0 + warp * P; tb < t1; tb += WARPS * P) {
#pragma unroll
        for (int u = 0; u < P; ++u) {
            load_row(k_cache, tb, u, kr[u]);
            load_row(v_cache, tb, u, vr[u]);
        }
#pragma unroll
        for (int u = 0; u < P; ++u) {
            float dot = 0.0f;
#pragma unroll
            for (int e = 0; e < DJ; ++e) dot += qv[e] * kr[u][e];
            s[u] = dot;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int u = 0; u < P; ++u) s[u] += __shfl_xor_sync(0xffffffffu, s[u], o);
        float m_new = m;
#pragma unroll
        for (int u = 0; u < P; ++u) {
            s[u] = tb + u < t1 ? s[u] * scale : -INFINITY;
            m_new = fmaxf(m_new, s[u]);
        }
        // the online-softmax update with the P scores at once
        const float corr = expf(m - m_new);  // m = -inf on the first step: 0
        l *= corr;
#pragma unroll
        for (int e = 0; e < DJ; ++e) acc[e] *= corr;
#pragma unroll
        for (int u = 0; u < P; ++u) {
            const float p = expf(s[u] - m_new);  // a position past t1: exp(-inf) = 0
            l += p;
#pragma unroll
            for (int e = 0; e < DJ; ++e) acc[e] += p * vr[u][e];
        }
        m = m_new;
    }
    // Merge the warps (a warp that saw no position has m = -inf, l = 0 and adds nothing).
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < DJ; ++e) s_acc[warp][dim_of<VEC>(e, lane)] = acc[e];
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < WARPS; ++w) M = fmaxf(M, s_m[w]);
    float L = 0.0f, wgt[WARPS];
    for (int w = 0; w < WARPS; ++w) {
        wgt[w] = s_m[w] == -INFINITY ? 0.0f : expf(s_m[w] - M);
        L += wgt[w] * s_l[w];
    }
    if (n_splits == 1) {
        for (int dd = threadIdx.x; dd < d; dd += blockDim.x) {
            float a = 0.0f;
            for (int w = 0; w < WARPS; ++w) a += wgt[w] * s_acc[w][dd];
            out[pair * d + dd] = a / L;  // L > 0: every query sees at least its own position
        }
    } else {
        float* part = partial + (pair * n_splits + split) * (d + 2);
        for (int dd = threadIdx.x; dd < d; dd += blockDim.x) {
            float a = 0.0f;
            for (int w = 0; w < WARPS; ++w) a += wgt[w] * s_acc[w][dd];
            part[dd] = a;
        }
        if (threadIdx.x == 0) {
            part[d] = M;  // -inf for an empty span
            part[d + 1] = L;
        }
    }
}

// ---- prefill: one sequence's consecutive positions, tiled over the queries ---------------------------
//
// Block = (tile of PQ = 32 queries q0.., head h): query r sits at position p0 + q0 + r and sees the
// cache rows base + 0 .. base + p0 + q0 + r. K and V go through shared memory in tiles of PK = 32
// positions, each loaded once for the 32 queries. Warp w owns queries PROWS·w .. PROWS·w + 7:
//   scores   lane j: s[r] = (Σ_c q[r, c] · K[t0 + j, c]) · scale, -inf past the query's position
//            (K rows at a stride ≡ 4 mod 8 floats, key_stride: the 16-byte reads of 8 lanes hit
//            distinct banks; the query reads are broadcasts)
//   softmax  per query across the warp: m' = max(m, max_j s), l = l·e^(m−m') + Σ_j e^(s_j−m'),
//            o ·= e^(m−m'); the weights e^(s_j−m') go to shared memory (P)
//   values   lane j: dims 4j .. 4j + 3 of o[r] += Σ_t P[r, t] · V[t0 + t, dims]
// out = o / l. fp32 math as the CPU op, in another order than the per-token kernel (the GPU tests
// hold both to the same tolerance). d ≤ 128 and d % 4 == 0 (attention_prefill_supports); cache rows
// past the tile's last query are not read (zeros in shared memory: a stale or unset row could hold a
// NaN, and 0 · NaN is NaN).
constexpr int PQ = 32, PK = 32, PWARPS = 4, PROWS = PQ / PWARPS;
constexpr int PREFILL_MAX_D = 128;

// The K tile's row stride in floats, ≡ 4 mod 8 (d is a multiple of 4).
__host__ __device__ constexpr int key_stride(int d) { return d % 8 == 0 ? d + 4 : d; }
// Dynamic shared memory of attention_prefill_kernel: Q (PQ, d), K (PK, key_stride), V (PK, d), P (PQ, PK).
static size_t prefill_smem_bytes(int d) {
    return sizeof(float) * size_t(PQ * d + PK * key_stride(d) + PK * d + PQ * PK);
}

template <class KV>
static __global__ void __launch_bounds__(PWARPS * 32)
attention_prefill_kernel(const float* __restrict__ q,     // (m, H, d)
                         const KV* __restrict__ k_cache,  // (t_max, Hkv, d)
                         const KV* __restrict__ v_cache,  // (t_max, Hkv, d)
                         int64_t m, int64_t p0, int64_t base, int64_t n_heads, int64_t n_kv_heads, int d,
                         float scale,
                         float* __restrict__ out) {       // (m, H, d)
    pdl_begin();  // cuda_backend.h: launched with PDL in the engine's passes
    extern __shared__ float4 prefill_smem4[];
    float* const Qs = reinterpret_cast<float*>(prefill_smem4);  // every part starts 16-byte aligned
    const int ks = key_stride(d), d4 = d / 4;
    float* const Ks = Qs + PQ * d;
    float* const Vs = Ks + PK * ks;
    float* const Ps = Vs + PK * d;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // the last query tiles (the longest prefixes) first, so that the short ones fill the tail
    const int64_t q0 = int64_t(gridDim.x - 1 - blockIdx.x) * PQ, h = blockIdx.y, hk = h / (n_heads / n_kv_heads);
    const int64_t rows = min(int64_t(PQ), m - q0);
    const int64_t last = p0 + q0 + rows - 1;  // the tile's last query position: the last key any reads

    for (int i = threadIdx.x; i < PQ * d4; i += blockDim.x) {  // the queries (zeros past m)
        const int r = i / d4, c = 4 * (i % d4);
        const float4 v = r < rows ? __ldg(reinterpret_cast<const float4*>(q + ((q0 + r) * n_heads + h) * d + c))
                                  : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        *reinterpret_cast<float4*>(Qs + r * d + c) = v;
    }
    const bool dims = 4 * lane < d;  // this lane's output dims 4·lane .. +3 exist
    float mrow[PROWS], lrow[PROWS], o[PROWS][4];
#pragma unroll
    for (int rr = 0; rr < PROWS; ++rr) {
        mrow[rr] = -INFINITY;
        lrow[rr] = 0.0f;
        o[rr][0] = o[rr][1] = o[rr][2] = o[rr][3] = 0.0f;
    }
    for (int64_t t0 = 0; t0 <= last; t0 += PK) {
        __syncthreads();  // the previous tile's K, V (and, first, nothing) are read; Q is stored
#pragma unroll 4
        for (int i = threadIdx.x; i < PK * d4; i += blockDim.x) {  // (unrolled: several loads in flight)
            const int r = i / d4, c = 4 * (i % d4);
            const bool in = t0 + r <= last;
            const int64_t off = ((base + t0 + r) * n_kv_heads + hk) * d + c;
            const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            *reinterpret_cast<float4*>(Ks + r * ks + c) = in ? load_kv4(k_cache + off) : zero;
            *reinterpret_cast<float4*>(Vs + r * d + c) = in ? load_kv4(v_cache + off) : zero;
        }
        __syncthreads();
        float s[PROWS];
#pragma unroll
        for (int rr = 0; rr < PROWS; ++rr) s[rr] = 0.0f;
        for (int c = 0; c < d; c += 4) {
            const float4 kk = *reinterpret_cast<const float4*>(Ks + lane * ks + c);
#pragma unroll
            for (int rr = 0; rr < PROWS; ++rr) {
                const float4 qq = *reinterpret_cast<const float4*>(Qs + (warp * PROWS + rr) * d + c);  // broadcast
                s[rr] = fmaf(qq.w, kk.w, fmaf(qq.z, kk.z, fmaf(qq.y, kk.y, fmaf(qq.x, kk.x, s[rr]))));
            }
        }
#pragma unroll
        for (int rr = 0; rr < PROWS; ++rr) {
            const int64_t qpos = p0 + q0 + warp * PROWS + rr;
            const float sc = t0 + lane <= qpos ? s[rr] * scale : -INFINITY;
            float mx = sc;
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            // finite: tile 0 holds position 0, which every query sees, so mrow is finite after it
            const float m_new = fmaxf(mrow[rr], mx);
            const float corr = expf(mrow[rr] - m_new);  // the first tile: e^-inf = 0
            const float p = expf(sc - m_new);            // a position past the query: 0
            float ps = p;
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, off);
            lrow[rr] = lrow[rr] * corr + ps;
            o[rr][0] *= corr, o[rr][1] *= corr, o[rr][2] *= corr, o[rr][3] *= corr;
            mrow[rr] = m_new;
            Ps[(warp * PROWS + rr) * PK + lane] = p;
        }
        __syncwarp();  // the warp's P rows are written
        if (dims) {
            for (int t = 0; t < PK; t += 4) {  // 4 positions: one 16-byte (broadcast) read of each P row
                float4 vv[4];
#pragma unroll
                for (int u = 0; u < 4; ++u) vv[u] = *reinterpret_cast<const float4*>(Vs + (t + u) * d + 4 * lane);
#pragma unroll
                for (int rr = 0; rr < PROWS; ++rr) {
                    const float4 p4 = *reinterpret_cast<const float4*>(Ps + (warp * PROWS + rr) * PK + t);
                    const float pu[4] = {p4.x, p4.y, p4.z, p4.w};
#pragma unroll
                    for (int u = 0; u < 4; ++u) {
                        o[rr][0] = fmaf(pu[u], vv[u].x, o[rr][0]);
                        o[rr][1] = fmaf(pu[u], vv[u].y, o[rr][1]);
                        o[rr][2] = fmaf(pu[u], vv[u].z, o[rr][2]);
                        o[rr][3] = fmaf(pu[u], vv[u].w, o[rr][3]);
                    }
                }
            }
        }
        __syncwarp();  // P is read before the next tile rewrites it
    }
#pragma unroll
    for (int rr = 0; rr < PROWS; ++rr) {
        const int r = warp * PROWS + rr;
        if (r < rows && dims) {
            const float inv = 1.0f / lrow[rr];  // lrow > 0: every query sees at least its own position
            *reinterpret_cast<float4*>(out + ((q0 + r) * n_heads + h) * d + 4 * lane) =
                make_float4(o[rr][0] * inv, o[rr][1] * inv, o[rr][2] * inv, o[rr][3] * inv);
        }
    }
}

// Block per (token, head): merges the n_splits partial results. The spans' maxima and weights
// e^(m_c - M) go through shared memory (up to MERGE_SMEM spans; more take the same sums from
// global memory), so the per-dim sums issue their loads back to back instead of re-reading m_c,
// and the sums run over c in the same order either way.
constexpr int MERGE_SMEM = 64;
static __global__ void __launch_bounds__(128)
attention_merge_kernel(const float* __restrict__ partial,  // (m, H, n_splits, d + 2)
                       int n_splits, int d,
                       float* __restrict__ out) {          // (m, H, d)
    pdl_begin();  // cuda_backend.h: launched with PDL in the engine's passes
    __shared__ float s_w[MERGE_SMEM];  // e^(m_c - M), 0 for an empty span (m_c = -inf)
    const int64_t pair = blockIdx.x;
    const float* part = partial + pair * n_splits * (d + 2);
    if (n_splits <= MERGE_SMEM) {
        __shared__ float s_m[MERGE_SMEM], s_l[MERGE_SMEM];
        for (int c = threadIdx.x; c < n_splits; c += blockDim.x) {
            s_m[c] = part[c * (d + 2) + d];
            s_l[c] = part[c * (d + 2) + d + 1];
        }
        __syncthreads();
        float M = -INFINITY;
        for (int c = 0; c < n_splits; ++c) M = fmaxf(M, s_m[c]);
        for (int c = threadIdx.x; c < n_splits; c += blockDim.x) s_w[c] = s_m[c] != -INFINITY ? expf(s_m[c] - M) : 0.0f;
        __syncthreads();
        float L = 0.0f;
        for (int c = 0; c < n_splits; ++c)
            if (s_m[c] != -INFINITY) L += s_w[c] * s_l[c];
        for (int dd = threadIdx.x; dd < d; dd += blockDim.x) {
            float a = 0.0f;
#pragma unroll 8
            for (int c = 0; c < n_splits; ++c)
                if (s_m[c] != -INFINITY) a += s_w[c] * part[c * (d + 2) + dd];
            out[pair * d + dd] = a / L;  // L > 0: every query sees at least its own position
        }
        return;
    }
    float M = -INFINITY;
    for (int c = 0; c < n_splits; ++c) M = fmaxf(M, part[c * (d + 2) + d]);
    float L = 0.0f;
    for (int c = 0; c < n_splits; ++c) {
        const float mc = part[c * (d + 2) + d];
        if (mc != -INFINITY) L += expf(mc - M) * part[c * (d + 2) + d + 1];
    }
    for (int dd = threadIdx.x; dd < d; dd += blockDim.x) {
        float a = 0.0f;
        for (int c = 0; c < n_splits; ++c) {
            const float mc = part[c * (d + 2) + d];
            if (mc != -INFINITY) a += expf(mc - M) * part[c * (d + 2) + dd];
        }
        out[pair * d + dd] = a / L;
    }
}

namespace {

template <class KV>
void launch_typed(const float* q, const void* k_cache, const void* v_cache, int64_t m, const int64_t* positions,
                  const int64_t* bases, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int n_splits, float* partial, float* out,
                  cudaStream_t stream) {
    const float scale = 1.0f / std::sqrt(float(head_dim));  // as the CPU op
    const dim3 grid(unsigned(m * n_heads), unsigned(n_splits));
    const auto* kc = static_cast<const KV*>(k_cache);
    const auto* vc = static_cast<const KV*>(v_cache);
    const int d = int(head_dim);
    // The one dispatch switch: register arrays need a compile-time DJ. VEC when every row starts
    // on a vector boundary: d a multiple of 128 and the caches aligned (arena and cudaMalloc
    // buffers are 256-byte aligned; a view that is not takes the per-dim loads).
    const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % (4 * sizeof(KV)) == 0; };
    const bool vec = head_dim % 128 == 0 && aligned(k_cache) && aligned(v_cache);
#define FQ_ATTENTION(DJ, VEC) \
    launch_kernel(attention_kernel<KV, DJ, VEC>, grid, dim3(WARPS * 32), 0, stream, q, kc, vc, positions, bases, \
                  n_heads, n_kv_heads, d, scale, partial, out)
    if (vec && head_dim == 128)
        FQ_ATTENTION(4, true);
    else if (vec && head_dim == 256)
        FQ_ATTENTION(8, true);
    else
        switch ((head_dim + 31) / 32) {
            case 1: FQ_ATTENTION(1, false); break;
            case 2: FQ_ATTENTION(2, false); break;
            case 3: FQ_ATTENTION(3, false); break;
            case 4: FQ_ATTENTION(4, false); break;
            case 5: case 6: FQ_ATTENTION(6, false); break;
            default: FQ_ATTENTION(MAX_DJ, false); break;
        }
#undef FQ_ATTENTION
    if (n_splits > 1)
        launch_kernel(attention_merge_kernel, dim3(unsigned(m * n_heads)), dim3(128), 0, stream, partial, n_splits, d,
                      out);
}

}  // namespace

void attention_launch(const float* q, const void* k_cache, const void* v_cache, bool kv_f16, int64_t m,
                      const int64_t* positions, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int n_splits,
                      float* partial, float* out, cudaStream_t stream, const int64_t* bases) {
    if (m <= 0) return;
    if (kv_f16)
        launch_typed<__half>(q, k_cache, v_cache, m, positions, bases, n_heads, n_kv_heads, head_dim, n_splits, partial,
                             out, stream);
    else
        launch_typed<float>(q, k_cache, v_cache, m, positions, bases, n_heads, n_kv_heads, head_dim, n_splits, partial,
                            out, stream);
}

bool attention_prefill_supports(int64_t head_dim) { return head_dim <= PREFILL_MAX_D && head_dim % 4 == 0 && head_dim > 0; }

void attention_prefill_launch(const float* q, const void* k_cache, const void* v_cache, bool kv_f16, int64_t m,
                              int64_t p0, int64_t base, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float* out,
                              cudaStream_t stream) {
    if (m <= 0) return;
    const std::string fn = "attention_prefill_launch";
    if (!attention_prefill_supports(head_dim))
        throw Error(fn + ": the tiled prefill kernel takes head_dim in 4..128, a multiple of 4, got " +
                    std::to_string(head_dim));
    const auto aligned = [](const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; };
    const size_t kv_align = kv_f16 ? 8 : 16;  // one 4-dim load of a cache row
    if (!aligned(q, 16) || !aligned(out, 16) || !aligned(k_cache, kv_align) || !aligned(v_cache, kv_align))
        throw Error(fn + ": q, out and the caches must be aligned for 4-dim loads");
    const int d = int(head_dim);
    const size_t smem = prefill_smem_bytes(d);
    // (the limit raised to the largest head dim's need, so any d launches)
    static std::atomic<uint64_t> f32_smem{0}, f16_smem{0};  // devices whose limit is raised
    const size_t most = prefill_smem_bytes(PREFILL_MAX_D);
    if (kv_f16)
        raise_dynamic_smem(attention_prefill_kernel<__half>, most, f16_smem, fn);
    else
        raise_dynamic_smem(attention_prefill_kernel<float>, most, f32_smem, fn);
    const float scale = 1.0f / std::sqrt(float(head_dim));  // as the CPU op
    const dim3 grid(unsigned((m + PQ - 1) / PQ), unsigned(n_heads));
    if (kv_f16)
        launch_kernel(attention_prefill_kernel<__half>, grid, dim3(PWARPS * 32), smem, stream, q,
                      static_cast<const __half*>(k_cache), static_cast<const __half*>(v_cache), m, p0, base, n_heads,
                      n_kv_heads, d, scale, out);
    else
        launch_kernel(attention_prefill_kernel<float>, grid, dim3(PWARPS * 32), smem, stream, q,
                      static_cast<const float*>(k_cache), static_cast<const float*>(v_cache), m, p0, base, n_heads,
                      n_kv_heads, d, scale, out);
}

void attention_cuda(const float* q, const void* k_cache, const void* v_cache, bool kv_f16, int64_t t_max, int64_t m,
                    int64_t p0, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int n_splits, float* out,
                    int64_t base, bool prefill) {
    const std::string fn = "attention_cuda";
    if (m < 0 || p0 < 0 || base < 0 || base + p0 + m > t_max || n_kv_heads <= 0 || n_heads % n_kv_heads != 0 || head_dim <= 0 ||
        head_dim > ATTENTION_MAX_HEAD_DIM || n_splits < 1 || n_splits > 65535 || m * n_heads > 0x7fffffff)
        throw Error(fn + ": bad sizes m=" + std::to_string(m) + ", p0=" + std::to_string(p0) + ", t_max=" +
                    std::to_string(t_max) + ", base=" + std::to_string(base) + ", n_heads=" + std::to_string(n_heads) + ", n_kv_heads=" +
                    std::to_string(n_kv_heads) + ", head_dim=" + std::to_string(head_dim) + " (<= " +
                    std::to_string(ATTENTION_MAX_HEAD_DIM) + "), n_splits=" + std::to_string(n_splits));
    if (m == 0) return;
    const size_t nq = size_t(m * n_heads * head_dim);
    const size_t cache_bytes = size_t(t_max * n_kv_heads * head_dim) * (kv_f16 ? 2 : 4);
    DeviceBuffer<float> qd(nq, fn), od(nq, fn), part(size_t(m * n_heads) * n_splits * (head_dim + 2), fn);
    DeviceBuffer<uint8_t> kd(cache_bytes, fn), vd(cache_bytes, fn);
    DeviceBuffer<int64_t> pd(size_t(m), fn), bd(size_t(m), fn);
    std::vector<int64_t> pos(static_cast<size_t>(m)), bases(static_cast<size_t>(m), base);
    for (int64_t i = 0; i < m; ++i) pos[size_t(i)] = p0 + i;
    upload(qd, q, nq, fn);
    upload(kd, static_cast<const uint8_t*>(k_cache), cache_bytes, fn);
    upload(vd, static_cast<const uint8_t*>(v_cache), cache_bytes, fn);
    upload(pd, pos.data(), size_t(m), fn);
    upload(bd, bases.data(), size_t(m), fn);
    poison(od, nq, fn);
    if (prefill)
        attention_prefill_launch(qd.get(), kd.get(), vd.get(), kv_f16, m, p0, base, n_heads, n_kv_heads, head_dim,
                                 od.get(), nullptr);
    else
        attention_launch(qd.get(), kd.get(), vd.get(), kv_f16, m, pd.get(), n_heads, n_kv_heads, head_dim, n_splits,
                         part.get(), od.get(), nullptr, base != 0 ? bd.get() : nullptr);
    cuda_check(cudaGetLastError(), fn + " (launch)");
    download(out, od, nq, fn);
}

}  // namespace flexquant

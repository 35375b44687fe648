// The CUDA ops (cuda/attention.cu, rms_norm.cu, rope.cu, swiglu.cu, sampling.cu, the GEMV of
// bitplane_matmul.cu and the GEMMs of bitplane_matmul_gemm.cu), compiled as C++ against the CPU
// stand-in for CUDA (tests/cuda_host/simt), driven from files:
// tests/test_engine_cuda.py runs the GPU op tests on it (the `simt` backend of its `cuda_ops`).
// The ops run through the same host entry points as on a GPU (flexquant::attention_cuda etc.), or
// through the engine's launchers where only the engine calls them (rope_kv_store_launch, the step
// signals of several rows): device memory is host memory here.
//
// usage: simt_ops DIR   DIR/meta.txt: "OP int ..." (below); inputs DIR/<name>.bin, outputs the same.
//   rms_norm m d eps_bits      x (m, d) f32, w (d) f32                       -> y (m, d)
//   rope m H Hkv d             inv (d/2) f32, q (m, H, d), k (m, Hkv, d), pos (m) i64 -> q, k rotated
//   rope_kv m H Hkv d f16 rows inv, q, k, v (m, Hkv, d), pos, bases (m) i64, kc, vc (rows, Hkv, d) f32
//                              or f16 bits -> q, k, kc, vc
//   swiglu n                   g, u (n) f32                                  -> out (n)
//   attention f16 t_max m p0 H Hkv d splits base prefill   q (m, H, d) f32, kc, vc (t_max, Hkv, d) -> out
//   signals rows vocab         logits (rows, vocab) f32 -> out (rows) {f32 entropy, f32 top1, i32 argmax}
//   gemv n k max_bits group_size bits m path warps prefetch n_planes plane_bytes has_y0
//                              planes (n_planes, plane_bytes) u8, qparams (n, n_groups, 2) u16, x (m, k)
//                              f32, y0 (m, n) f32 when has_y0 -> y (m, n)   (bitplane_matmul_cuda)
//   fused n k max_bits group_size bits m op path eps_bits n_planes plane_bytes
//                              planes, qparams, x, aux (k) or (m, k) -> y (m, n), out (m, k)
//   gemm n k max_bits group_size bits m kind act_bits n_planes plane_bytes has_y0
//                              planes, qparams, x (m, k), y0 when has_y0 -> y (m, n)  (bitplane_gemm_cuda)
//   unpack n k max_bits group_size bits n_planes plane_bytes   planes, qparams -> codes (n, k_pad) i8
//   wgmma_supported G          -> out (1) i32: bitplane_gemm_wgmma_supported(G), the host code's probe
//   selftest NAME              the stand-in's own checks (names in main: deadlock, mixed collectives, an
//                              mma with lanes missing, shared-memory poison, cp.async; sm_90: TMA + wgmma
//                              against A · Bᵀ, a wgmma half the warpgroup skips, accumulators changed in
//                              flight, a TMA destination read before and after the wait, setmaxnreg.inc
//                              with nothing released before it, an mbarrier wait that never ends, a
//                              wgmma operand changed in flight; races: none, without __syncthreads,
//                              within a warp, a bulk copy's destination read early; traffic: the
//                              meter's known answers) -> out (64) f32 (traffic: (12, 32)); the sm_90
//                              ones also a (50, 128) i8, b (128, 128) i8, d (64, 128) i32
//   multi count k max_bits group_size m path warps prefetch, then per linear i: n_i bits_i n_planes_i
//                              plane_bytes_i; planes<i>, qparams<i>, x -> y<i> (m, n_i)
// A flexquant::Error goes to stderr as "error: <message>" with exit status 2.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "bitplane_matmul.cuh"
#include "cuda_backend.h"
#include "host_io.h"

using namespace flexquant;

namespace {

std::string g_dir;

// ---- the stand-in's own checks (op "selftest NAME"): kernels that break a rule on purpose ----------
// A GPU would hang, pair wrong lanes or read garbage; the stand-in must say so (or show the poison).
__global__ void st_deadlock() {  // half the warp at __syncthreads, the other half at __syncwarp
    if (threadIdx.x < 16)
        __syncthreads();
    else
        __syncwarp();
}
__global__ void st_mixed_collectives(int* out) {  // lanes at two different warp collectives
    out[threadIdx.x] = threadIdx.x < 16 ? __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1)
                                        : int(__ballot_sync(0xffffffffu, 1));
}
__global__ void st_partial_mma(int* out) {  // an .aligned mma after the upper half-warp returned
    if (threadIdx.x >= 16) return;
    int d[4] = {0, 0, 0, 0};
    simt::mma_s8(d, 1u, 1u, 1u, 1u, 1u, 1u);
    out[threadIdx.x] = d[0];
}
__global__ void st_shared_poison(float* out) {  // block 0 writes its shared memory, block 1 does not
    __shared__ float s[32];
    if (blockIdx.x == 0) s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[blockIdx.x * 32 + threadIdx.x] = s[threadIdx.x];
}
__global__ void st_cp_async(const float* src, float* out) {  // before its wait a copy has not landed
    float* const tile = reinterpret_cast<float*>(::simt::dynamic_smem());
    simt::copy16(tile + 4 * threadIdx.x, src + 4 * threadIdx.x);
    simt::cp_commit();
    out[threadIdx.x] = tile[4 * threadIdx.x];  // too early
    simt::cp_wait(0);
    out[32 + threadIdx.x] = tile[4 * threadIdx.x];
}

// Races (for the -fsanitize=thread build, tests/test_simt_racecheck.py): thread 32 reads what thread 0
// wrote to shared memory with no __syncthreads between (race_block); lane 1 reads lane 0's write after
// a shuffle, which orders no memory (race_warp); the same exchanges ordered by __syncthreads,
// __syncwarp and atomics (race_free: no report).
__global__ void st_race(int mode, float* out) {
    __shared__ float s[64];
    __shared__ int count;
    if (threadIdx.x == 0) {
        s[0] = 1.0f;
        count = 0;
    }
    if (mode != 1) __syncthreads();
    if (threadIdx.x == 32) out[0] = s[0];
    if (mode == 0) {
        __syncthreads();
        atomicAdd(&count, 1);
        if (threadIdx.x < 32) s[1 + threadIdx.x] = float(threadIdx.x);
        __syncwarp();
        if (threadIdx.x < 32) out[1 + threadIdx.x] = s[1 + (threadIdx.x + 1) % 32];
        __syncthreads();
        if (threadIdx.x == 0) out[33] = float(count);
    } else if (mode == 2) {
        if (threadIdx.x < 32) s[1 + threadIdx.x] = float(threadIdx.x);
        const float v = __shfl_sync(0xffffffffu, 1.0f, 0);
        if (threadIdx.x < 32) out[1 + threadIdx.x] = v * s[1 + (threadIdx.x + 1) % 32];
    }
}

// A bulk copy's destination read by another thread after the issue (a __syncthreads after it) but
// before the wait: the copy may land at any time until the wait (race_copy, a race).
__global__ void st_race_copy(const float* src, float* out) {
    uint8_t* const smem = reinterpret_cast<uint8_t*>(::simt::dynamic_smem(128));
    const uint32_t bar = uint32_t(__cvta_generic_to_shared(smem)), dst = bar + 128;
    if (threadIdx.x == 0) simt::mbar_init(bar, 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        simt::mbar_arrive(bar, 256);
        simt::bulk_load(dst, src, 256, bar);
    }
    __syncthreads();
    if (threadIdx.x == 1) {
        out[0] = reinterpret_cast<const float*>(smem + 128)[0];  // too early
        simt::mbar_wait(bar, 0);
        out[1] = reinterpret_cast<const float*>(smem + 128)[0];
    }
}

// Known answers for the traffic meter (the traffic-measuring build, tests/test_simt_traffic.py): one
// warp, one launch per mode, each with one access pattern to global or shared memory (and the
// coalesced store of its result to out).
//   global: 0 coalesced floats, 1 floats 8 apart, 2 one float for all lanes, 3 a uint4 per lane,
//           4 the lower half-warp only;
//   shared: 5 consecutive words, 6 words 32 apart (one bank), 7 words 2 apart, 8 one word for all,
//           9 a float4 per lane, consecutive, 10 float4s 32 words apart;
//   11: odd and even lanes load in different iterations of a loop with a __syncwarp: a GPU issues
//       two requests, which the meter's grouping by count cannot tell apart; its self-check counts
//       the 16 lanes grouped across the barrier.
constexpr int ST_TRAFFIC_MODES = 12;
__global__ void st_traffic(int mode, const float* src, float* out) {
    __shared__ __align__(16) float s[32 * 36];
    const int t = int(threadIdx.x);
    for (int i = t; i < 32 * 36; i += 32) s[i] = float(i);
    __syncthreads();
    float v = 0.0f;
    switch (mode) {
        case 0: v = src[t]; break;
        case 1: v = src[8 * t]; break;
        case 2: v = src[0]; break;
        case 3: {
            const uint4 u = reinterpret_cast<const uint4*>(src)[t];
            v = __uint_as_float(u.x) + __uint_as_float(u.y) + __uint_as_float(u.z) + __uint_as_float(u.w);
            break;
        }
        case 4:
            if (t < 16) v = src[t];
            break;
        case 5: v = s[t]; break;
        case 6: v = s[32 * t]; break;
        case 7: v = s[2 * t]; break;
        case 8: v = s[0]; break;
        case 9: {
            const float4 f = reinterpret_cast<const float4*>(s)[t];
            v = f.x + f.y + f.z + f.w;
            break;
        }
        case 10: {
            const float4 f = reinterpret_cast<const float4*>(s)[8 * t];
            v = f.x + f.y + f.z + f.w;
            break;
        }
        case 11:
            for (int it = 0; it < 2; ++it) {
                if (t % 2 == it) v = src[t];
                __syncwarp();
            }
            break;
    }
    out[32 * mode + t] = v;
}

// sm_90 (hopper.h). One warpgroup TMA-loads A (50 x 128 int8 in memory, a box of 64 rows: rows 50..63
// out of bounds) and B (128 x 128) with the 128-byte swizzle, then runs 4 wgmma m64n128k32 steps along
// K (the descriptors' start + 32 k) into accumulators that start at 7 (the first step overwrites):
// out (64, 128) int32 = A · Bᵀ, A's rows past 50 zeros. The descriptors are built here from the ISA's
// fields, not with the GEMM's helpers.
constexpr int ST_A_ROWS = 50;
__device__ uint64_t st_desc(uint32_t addr) {  // K-major, stride byte offset 1,024, 128-byte swizzle
    return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}
__global__ void st_wgmma(const __grid_constant__ CUtensorMap ta, const __grid_constant__ CUtensorMap tb, int* out) {
    uint8_t* const smem = reinterpret_cast<uint8_t*>(::simt::dynamic_smem(1024));
    const uint32_t a_s = uint32_t(__cvta_generic_to_shared(smem)), b_s = a_s + 64 * 128, bar = b_s + 128 * 128;
    if (threadIdx.x == 0) {
        simt::mbar_init(bar, 1);
        simt::mbar_arrive(bar, 64 * 128 + 128 * 128);
        simt::tma_load_2d(a_s, &ta, 0, 0, bar);
        simt::tma_load_2d(b_s, &tb, 0, 0, bar);
    }
    __syncthreads();
    simt::mbar_wait(bar, 0);
    int d[64];
    for (int q = 0; q < 64; ++q) d[q] = 7;
    simt::wgmma_fence();
    for (int kk = 0; kk < 4; ++kk) simt::wgmma_s8(d, 128, st_desc(a_s + 32 * kk), st_desc(b_s + 32 * kk), kk > 0);
    simt::wgmma_commit();
    simt::wgmma_wait(0);
    const int w = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
    for (int q = 0; q < 64; ++q)  // (PTX ISA, wgmma "Register fragments: D")
        out[(16 * w + lane / 4 + 8 * (q % 4 / 2)) * 128 + 8 * (q / 4) + 2 * (lane % 4) + q % 2] = d[q];
}
// Thread 0 starts the TMA load of B (128 x 128) into smem, on a barrier after it that expects `extra`
// bytes more than the copy brings; returns the barrier's shared address.
__device__ uint32_t st_issue_b(const CUtensorMap& tb, uint8_t* smem, uint32_t extra) {
    const uint32_t b_s = uint32_t(__cvta_generic_to_shared(smem)), bar = b_s + 128 * 128;
    if (threadIdx.x == 0) {
        simt::mbar_init(bar, 1);
        simt::mbar_arrive(bar, 128 * 128 + extra);
        simt::tma_load_2d(b_s, &tb, 0, 0, bar);
    }
    return bar;
}
// Rule breakers: a wgmma that half the warpgroup skips; accumulators (or an operand in shared memory)
// changed while their wgmma is in flight; a warpgroup that raises its registers with no decrease
// before it (the block's pool holds only what decreases released: a GPU waits forever too).
__global__ void st_wgmma_partial(int* out) {
    if (threadIdx.x >= 64) return;
    int d[64] = {};
    simt::wgmma_fence();
    out[threadIdx.x] = d[0];
}
__global__ void st_wgmma_touched(const __grid_constant__ CUtensorMap tb, int* out, int operand) {
    uint8_t* const smem = reinterpret_cast<uint8_t*>(::simt::dynamic_smem(1024));
    const uint32_t bar = st_issue_b(tb, smem, 0), b_s = bar - 128 * 128;
    __syncthreads();
    simt::mbar_wait(bar, 0);
    int d[64] = {};
    simt::wgmma_fence();
    simt::wgmma_s8(d, 128, st_desc(b_s), st_desc(b_s), false);
    simt::wgmma_commit();
    if (!operand) d[5] += 1;                                   // too early: the accumulators
    if (operand && threadIdx.x == 0) smem[0] = uint8_t(smem[0] + 1);  // too early: an operand
    simt::wgmma_wait(0);
    out[threadIdx.x] = d[5];
}
// TMA's destination read before the wait (the poison) and after it (B's first byte); with `extra`,
// the barrier expects that many bytes more than the copy brings, and its wait never ends.
__global__ void st_tma_early(const __grid_constant__ CUtensorMap tb, float* out, uint32_t extra) {
    uint8_t* const smem = reinterpret_cast<uint8_t*>(::simt::dynamic_smem(1024));
    const uint32_t bar = st_issue_b(tb, smem, extra);
    if (threadIdx.x == 0) out[0] = float(int8_t(smem[0]));  // too early
    __syncthreads();
    simt::mbar_wait(bar, 0);
    if (threadIdx.x == 0) out[1] = float(int8_t(smem[0]));
}
__global__ void st_setmaxnreg_over() {
    simt::setmaxnreg(256, true);
}

// A row-major (rows, 128) int8 matrix as TMA boxes of box_rows x 128 bytes, 128-byte swizzle.
CUtensorMap st_map(const int8_t* base, uint64_t rows, uint32_t box_rows) {
    CUtensorMap m{};
    const cuuint64_t dims[2] = {128, rows}, strides[1] = {128};
    const cuuint32_t box[2] = {128, box_rows}, es[2] = {1, 1};
    const CUresult r = simt::encode_tensor_map_tiled(&m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<int8_t*>(base), dims,
                                                     strides, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                                     CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                                                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) throw std::runtime_error("selftest: cuTensorMapEncodeTiled failed");
    return m;
}

void selftest(const std::string& name) {
    if (name == "wgmma" || name == "wgmma_partial" || name == "wgmma_touched" || name == "tma_early" ||
        name == "mbar_short" || name == "setmaxnreg_over" || name == "wgmma_smem_changed") {
        std::vector<int8_t> a(ST_A_ROWS * 128), b(128 * 128);
        uint32_t x = 12345;  // every int8 value, the extremes included
        for (auto& v : a) v = int8_t((x = x * 1664525u + 1013904223u) >> 24);
        for (auto& v : b) v = int8_t((x = x * 1664525u + 1013904223u) >> 24);
        a[0] = -128, a[1] = 127, b[0] = -128, b[1] = -128;
        std::vector<int> d(64 * 128, int(0x80000000));
        std::vector<float> f(64, 0.0f);
        const CUtensorMap ta = st_map(a.data(), ST_A_ROWS, 64), tb = st_map(b.data(), 128, 128);
        const size_t smem = 64 * 128 + 128 * 128 + 64;
        if (name == "wgmma") launch_kernel(st_wgmma, dim3(1), dim3(128), smem, nullptr, ta, tb, d.data());
        if (name == "wgmma_partial") launch_kernel(st_wgmma_partial, dim3(1), dim3(128), 0, nullptr, d.data());
        if (name == "wgmma_touched" || name == "wgmma_smem_changed")
            launch_kernel(st_wgmma_touched, dim3(1), dim3(128), smem, nullptr, tb, d.data(), int(name == "wgmma_smem_changed"));
        if (name == "tma_early" || name == "mbar_short")
            launch_kernel(st_tma_early, dim3(1), dim3(128), smem, nullptr, tb, f.data(), name == "tma_early" ? 0u : 16u);
        if (name == "setmaxnreg_over") launch_kernel(st_setmaxnreg_over, dim3(1), dim3(128), 0, nullptr);
        cuda_check(cudaGetLastError(), "selftest " + name);
        write_file(g_dir + "/a.out", a);
        write_file(g_dir + "/b.out", b);
        write_file(g_dir + "/d.out", d);
        write_file(g_dir + "/out.out", f);
        return;
    }
    std::vector<float> f(64, 0.0f), src(128);
    std::vector<int> i(32, 0);
    for (size_t k = 0; k < src.size(); ++k) src[k] = float(k);
    if (name == "deadlock") launch_kernel(st_deadlock, dim3(1), dim3(32), 0, nullptr);
    if (name == "mixed_collectives") launch_kernel(st_mixed_collectives, dim3(1), dim3(32), 0, nullptr, i.data());
    if (name == "partial_mma") launch_kernel(st_partial_mma, dim3(1), dim3(32), 0, nullptr, i.data());
    if (name == "shared_poison") launch_kernel(st_shared_poison, dim3(2), dim3(32), 0, nullptr, f.data());
    if (name == "race_free" || name == "race_block" || name == "race_warp")
        launch_kernel(st_race, dim3(1), dim3(64), 0, nullptr, name == "race_free" ? 0 : name == "race_block" ? 1 : 2, f.data());
    if (name == "race_copy") launch_kernel(st_race_copy, dim3(1), dim3(32), 512, nullptr, src.data(), f.data());
    if (name == "cp_async") launch_kernel(st_cp_async, dim3(1), dim3(32), 512, nullptr, src.data(), f.data());
    if (name == "traffic") {  // device memory, so that the meter counts it as global
        float *src_d = nullptr, *out_d = nullptr;
        cuda_check(cudaMalloc(&src_d, 1024 * sizeof(float)), "selftest traffic");
        cuda_check(cudaMalloc(&out_d, 32 * ST_TRAFFIC_MODES * sizeof(float)), "selftest traffic");
        std::vector<float> host(1024);
        for (size_t k = 0; k < host.size(); ++k) host[k] = float(k);
        cuda_check(cudaMemcpy(src_d, host.data(), 1024 * sizeof(float), cudaMemcpyHostToDevice), "selftest traffic");
        for (int mode = 0; mode < ST_TRAFFIC_MODES; ++mode) launch_kernel(st_traffic, dim3(1), dim3(32), 0, nullptr, mode, src_d, out_d);
        f.resize(32 * ST_TRAFFIC_MODES);
        cuda_check(cudaMemcpy(f.data(), out_d, f.size() * sizeof(float), cudaMemcpyDeviceToHost), "selftest traffic");
        cudaFree(src_d);
        cudaFree(out_d);
    }
    cuda_check(cudaGetLastError(), "selftest " + name);
    write_file(g_dir + "/out.out", f);
}

template <class T>
std::vector<T> in(const std::string& name, size_t count) {
    return read_file<T>(g_dir + "/" + name + ".bin", count);
}
template <class T>
void out(const std::string& name, const std::vector<T>& v) {
    write_file(g_dir + "/" + name + ".out", v);
}

// A linear from DIR/planes<suffix>.bin (n_planes, plane_bytes) and DIR/qparams<suffix>.bin (n, n_groups, 2).
struct HostLinear {
    std::vector<uint8_t> planes;
    std::vector<uint16_t> qparams;
    BitplaneLinear w;
};
HostLinear read_linear(const std::string& suffix, int64_t n, int64_t k, int64_t max_bits, int64_t group_size,
                       int64_t n_planes, int64_t plane_bytes) {
    HostLinear h;
    h.w.n = n, h.w.k = k, h.w.max_bits = int(max_bits), h.w.group_size = int(group_size);
    h.planes = in<uint8_t>("planes" + suffix, size_t(n_planes * plane_bytes));
    h.qparams = in<uint16_t>("qparams" + suffix, size_t(n * h.w.n_groups() * 2));
    h.w.planes = h.planes.data(), h.w.plane_bytes = uint64_t(plane_bytes), h.w.qparams = h.qparams.data();
    return h;  // (moving the vectors keeps their buffers, so w stays valid)
}

void run(const std::string& op, const std::vector<int64_t>& a) {
    auto need = [&](size_t n) {
        if (a.size() != n) throw std::runtime_error(op + ": expected " + std::to_string(n) + " numbers");
    };
    if (op == "rms_norm") {
        need(3);
        const int64_t m = a[0], d = a[1];
        float eps;
        const auto eps_bits = uint32_t(a[2]);
        std::memcpy(&eps, &eps_bits, 4);
        auto x = in<float>("x", size_t(m * d)), w = in<float>("w", size_t(d));
        std::vector<float> y(static_cast<size_t>(m * d));
        rms_norm_cuda(x.data(), w.data(), m, d, eps, y.data());
        out("y", y);
    } else if (op == "rope") {
        need(4);
        const int64_t m = a[0], H = a[1], Hkv = a[2], d = a[3];
        auto inv = in<float>("inv", size_t(d / 2));
        auto q = in<float>("q", size_t(m * H * d)), k = in<float>("k", size_t(m * Hkv * d));
        auto pos = in<int64_t>("pos", size_t(m));
        rope_cuda(inv.data(), int(d), q.data(), H, k.data(), Hkv, pos.data(), m);
        out("q", q);
        out("k", k);
    } else if (op == "rope_kv") {
        need(6);
        const int64_t m = a[0], H = a[1], Hkv = a[2], d = a[3], rows = a[5];
        const bool f16 = a[4] != 0;
        const size_t cache_bytes = size_t(rows * Hkv * d) * (f16 ? 2 : 4);
        auto inv = in<float>("inv", size_t(d / 2));
        auto q = in<float>("q", size_t(m * H * d)), k = in<float>("k", size_t(m * Hkv * d));
        auto v = in<float>("v", size_t(m * Hkv * d));
        auto pos = in<int64_t>("pos", size_t(m)), bases = in<int64_t>("bases", size_t(m));
        auto kc = in<uint8_t>("kc", cache_bytes), vc = in<uint8_t>("vc", cache_bytes);
        rope_kv_store_launch(inv.data(), int(d), q.data(), H, k.data(), v.data(), Hkv, pos.data(), bases.data(), m, f16,
                             kc.data(), vc.data(), nullptr);
        cuda_check(cudaGetLastError(), "rope_kv_store_launch");
        out("q", q);
        out("k", k);
        out("kc", kc);
        out("vc", vc);
    } else if (op == "swiglu") {
        need(1);
        const int64_t n = a[0];
        auto g = in<float>("g", size_t(n)), u = in<float>("u", size_t(n));
        std::vector<float> o(static_cast<size_t>(n));
        swiglu_cuda(g.data(), u.data(), n, o.data());
        out("out", o);
    } else if (op == "attention") {
        need(10);
        const bool f16 = a[0] != 0, prefill = a[9] != 0;
        const int64_t t_max = a[1], m = a[2], p0 = a[3], H = a[4], Hkv = a[5], d = a[6], base = a[8];
        const size_t cache_bytes = size_t(t_max * Hkv * d) * (f16 ? 2 : 4);
        auto q = in<float>("q", size_t(m * H * d));
        auto kc = in<uint8_t>("kc", cache_bytes), vc = in<uint8_t>("vc", cache_bytes);
        std::vector<float> o(static_cast<size_t>(m * H * d));
        attention_cuda(q.data(), kc.data(), vc.data(), f16, t_max, m, p0, H, Hkv, d, int(a[7]), o.data(), base, prefill);
        out("out", o);
    } else if (op == "signals") {
        need(2);
        const int64_t rows = a[0], vocab = a[1];
        auto lg = in<float>("logits", size_t(rows * vocab));
        std::vector<StepSignalsDevice> o(static_cast<size_t>(rows));
        std::memset(o.data(), 0xff, o.size() * sizeof(StepSignalsDevice));  // poisoned, as a test entry point does
        entropy_and_top1_launch(lg.data(), vocab, o.data(), nullptr, rows);
        cuda_check(cudaGetLastError(), "entropy_and_top1_launch");
        out("out", o);
    } else if (op == "gemv" || op == "fused") {
        const bool fused = op == "fused";
        need(fused ? 11 : 12);
        const HostLinear h = read_linear("", a[0], a[1], a[2], a[3], a[9], a[10]);
        const BitplaneLinear& w = h.w;
        const int bits = int(a[4]);
        const int64_t m = a[5];
        auto x = in<float>("x", size_t(m * w.k));
        std::vector<float> y(static_cast<size_t>(m * w.n));
        if (!fused) {
            BitplaneCudaTuning tuning;
            tuning.warps_per_block = int(a[7]);
            tuning.prefetch = int(a[8]);
            std::vector<float> y0;
            if (a[11]) y0 = in<float>("y0", size_t(m * w.n));
            bitplane_matmul_cuda(w, bits, x.data(), m, y.data(), BitplaneCudaPath(a[6]), tuning, a[11] ? y0.data() : nullptr);
        } else {
            const auto fo = BitplanePrepareFusion(a[6]);
            float eps;
            const auto eps_bits = uint32_t(a[8]);
            std::memcpy(&eps, &eps_bits, 4);
            auto aux = in<float>("aux", size_t(fo == BITPLANE_FUSE_RMS_NORM ? w.k : m * w.k));
            std::vector<float> o(static_cast<size_t>(m * w.k));
            bitplane_matmul_fused_cuda(w, bits, fo, x.data(), aux.data(), eps, m, y.data(), o.data(),
                                       BitplaneCudaPath(a[7]));
            out("out", o);
        }
        out("y", y);
    } else if (op == "gemm" || op == "unpack") {
        const bool gemm = op == "gemm";
        need(gemm ? 11 : 7);
        const HostLinear h = read_linear("", a[0], a[1], a[2], a[3], gemm ? a[8] : a[5], gemm ? a[9] : a[6]);
        const BitplaneLinear& w = h.w;
        const int bits = int(a[4]);
        if (gemm) {
            const int64_t m = a[5];
            auto x = in<float>("x", size_t(m * w.k));
            std::vector<float> y(static_cast<size_t>(m * w.n)), y0;
            if (a[10]) y0 = in<float>("y0", size_t(m * w.n));
            bitplane_gemm_cuda(w, bits, x.data(), m, y.data(), BitplaneGemmKind(a[6]), int(a[7]),
                               a[10] ? y0.data() : nullptr);
            out("y", y);
        } else {
            std::vector<int8_t> codes(static_cast<size_t>(w.n * ((w.k + 127) / 128 * 128)));
            bitplane_unpack_codes_cuda(w, bits, codes.data());
            out("codes", codes);
        }
    } else if (op == "wgmma_supported") {
        need(1);
        out("out", std::vector<int32_t>{bitplane_gemm_wgmma_supported(int(a[0])) ? 1 : 0});
    } else if (op == "multi") {
        if (a.size() < 8) throw std::runtime_error("multi: expected at least 8 numbers");
        const int count = int(a[0]);
        need(size_t(8 + 4 * count));
        const int64_t m = a[4];
        std::vector<HostLinear> lins;
        std::vector<BitplaneLinear> ws;
        std::vector<std::vector<float>> ys(static_cast<size_t>(count));
        std::vector<int> bits;
        std::vector<float*> yp;
        for (int i = 0; i < count; ++i) {
            const int64_t* li = &a[size_t(8 + 4 * i)];
            lins.push_back(read_linear(std::to_string(i), li[0], a[1], a[2], a[3], li[2], li[3]));
            bits.push_back(int(li[1]));
            ys[size_t(i)].resize(size_t(m * li[0]));
            yp.push_back(ys[size_t(i)].data());
        }
        for (const HostLinear& h : lins) ws.push_back(h.w);
        auto x = in<float>("x", size_t(m * a[1]));
        BitplaneCudaTuning tuning;
        tuning.warps_per_block = int(a[6]);
        tuning.prefetch = int(a[7]);
        bitplane_matmul_multi_cuda(ws.data(), bits.data(), count, x.data(), m, yp.data(), BitplaneCudaPath(a[5]), tuning);
        for (int i = 0; i < count; ++i) out("y" + std::to_string(i), ys[size_t(i)]);
    } else {
        throw std::runtime_error("unknown op " + op);
    }
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::cerr << "usage: simt_ops DIR\n";
        return 1;
    }
    g_dir = argv[1];
    std::ifstream meta(g_dir + "/meta.txt");
    std::string op;
    meta >> op;
    std::vector<int64_t> a;
    try {
        if (op == "selftest") {
            std::string name;
            meta >> name;
            static const char* names[] = {"deadlock", "mixed_collectives", "partial_mma", "shared_poison", "cp_async",
                                          "wgmma", "wgmma_partial", "wgmma_touched", "tma_early", "setmaxnreg_over",
                                          "mbar_short", "race_free", "race_block", "race_warp", "wgmma_smem_changed",
                                          "race_copy", "traffic"};
            if (std::find(std::begin(names), std::end(names), name) == std::end(names))
                throw std::runtime_error("selftest: no test " + name);
            selftest(name);
            return 0;
        }
        for (int64_t v; meta >> v;) a.push_back(v);
        run(op, a);
    } catch (const Error& e) {
        std::cerr << "error: " << e.what() << "\n";
        return 2;
    } catch (const std::exception& e) {  // the driver's own (a bad op or argument count)
        std::cerr << "simt_ops: " << e.what() << "\n";
        return 1;
    }
    return 0;
}

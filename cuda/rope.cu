// Rotate-half rotary position embedding (Hugging Face Llama), for i < d/2, f_i = pos * inv_freq[i]:
//   x[i]       <- x[i] cos f_i - x[i + d/2] sin f_i
//   x[i + d/2] <- x[i + d/2] cos f_i + x[i] sin f_i
// on q (m, n_heads, d) and k (m, n_kv_heads, d), in place; rope_kv_store_launch also writes
//   K cache[bases[r] + pos_r] <- k[r] (rotated),  V cache[bases[r] + pos_r] <- v[r]
// (the decode step's cache write, fused: one launch fewer per layer).
//
// The CUDA twin of cpp/src/ops/rope.cpp, with the same inv_freq table (rope_init, uploaded once):
// the angle is the fp32 product, its cos/sin are taken in fp64 and rounded to fp32 (as the CPU op
// does), and the rotation is two products and one sum each, without fused multiply-adds (torch's
// rounding). The positions are read from device memory so that a captured decode step rotates by
// the position the host wrote before the replay.
#include <cuda_fp16.h>

#include <algorithm>

#include "cuda_backend.h"

namespace flexquant {

namespace {
constexpr int THREADS = 128;
}

// Block (r, head): token r, head h < n_heads of q, else kv head h - n_heads of k; threads over i.
// One block per head, not per token: a decode step has one token, and its rotations (an fp64
// cos and sin each) on two blocks took 11 µs on an H100, latency-bound.
// STORE (the engine's decode and prefill): the rotated k row also goes to its KV-cache row
// bases[r] + positions[r] as KV (fp32 or fp16), and blocks n_heads + n_kv_heads.. copy v's heads
// there: the cache write without a launch of its own.
template <class KV, bool STORE>
static __global__ void __launch_bounds__(THREADS)
rope_kernel(const float* __restrict__ inv_freq,   // (d / 2)
            int half,
            float* __restrict__ q, int64_t n_heads,       // (m, n_heads, 2 half)
            float* __restrict__ k, int64_t n_kv_heads,    // (m, n_kv_heads, 2 half)
            const int64_t* __restrict__ positions,        // (m)
            const float* __restrict__ v,                  // (m, n_kv_heads, 2 half), STORE
            const int64_t* __restrict__ bases,            // (m), STORE
            KV* __restrict__ k_cache, KV* __restrict__ v_cache) {  // (rows, n_kv_heads, 2 half), STORE
    pdl_begin();  // cuda_backend.h: launched with PDL in the engine's passes
    const int64_t r = blockIdx.x;
    const int64_t y = blockIdx.y;
    const int64_t d = 2 * int64_t(half);
    if (STORE && y >= n_heads + n_kv_heads) {  // a head of v: copied
        const int64_t h = y - n_heads - n_kv_heads;
        const float* src = v + (r * n_kv_heads + h) * d;
        KV* dst = v_cache + ((bases[r] + positions[r]) * n_kv_heads + h) * d;
        for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = KV(src[i]);
        return;
    }
    const bool is_k = y >= n_heads;
    const int64_t h = is_k ? y - n_heads : y;
    float* vec = is_k ? k + (r * n_kv_heads + h) * d : q + (r * n_heads + h) * d;
    KV* cached = STORE && is_k ? k_cache + ((bases[r] + positions[r]) * n_kv_heads + h) * d : nullptr;
    const float pos = float(positions[r]);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float angle = __fmul_rn(pos, inv_freq[i]);
        const float c = float(cos(double(angle))), s = float(sin(double(angle)));
        const float a = vec[i], b = vec[i + half];
        const float ra = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        const float rb = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
        vec[i] = ra;
        vec[i + half] = rb;
        if (cached) {
            cached[i] = KV(ra);
            cached[i + half] = KV(rb);
        }
    }
}

void rope_launch(const float* inv_freq, int head_dim, float* q, int64_t n_heads, float* k, int64_t n_kv_heads,
                 const int64_t* positions, int64_t m, cudaStream_t stream) {
    if (m <= 0) return;
    const dim3 grid(unsigned(m), unsigned(n_heads + (k ? n_kv_heads : 0)));
    const unsigned threads = unsigned(std::min(THREADS, (head_dim / 2 + 31) / 32 * 32));
    launch_kernel(rope_kernel<float, false>, grid, dim3(threads), 0, stream, inv_freq, head_dim / 2, q, n_heads, k,
                  n_kv_heads, positions, nullptr, nullptr, static_cast<float*>(nullptr), static_cast<float*>(nullptr));
}

void rope_kv_store_launch(const float* inv_freq, int head_dim, float* q, int64_t n_heads, float* k, const float* v,
                          int64_t n_kv_heads, const int64_t* positions, const int64_t* bases, int64_t m, bool kv_f16,
                          void* k_cache, void* v_cache, cudaStream_t stream) {
    if (m <= 0) return;
    const dim3 grid(unsigned(m), unsigned(n_heads + 2 * n_kv_heads));
    const unsigned threads = unsigned(std::min(THREADS, (head_dim / 2 + 31) / 32 * 32));
    if (kv_f16)
        launch_kernel(rope_kernel<__half, true>, grid, dim3(threads), 0, stream, inv_freq, head_dim / 2, q, n_heads, k,
                      n_kv_heads, positions, v, bases, static_cast<__half*>(k_cache), static_cast<__half*>(v_cache));
    else
        launch_kernel(rope_kernel<float, true>, grid, dim3(threads), 0, stream, inv_freq, head_dim / 2, q, n_heads, k,
                      n_kv_heads, positions, v, bases, static_cast<float*>(k_cache), static_cast<float*>(v_cache));
}

void rope_cuda(const float* inv_freq, int head_dim, float* q, int64_t n_heads, float* k, int64_t n_kv_heads,
               const int64_t* positions, int64_t m) {
    const std::string fn = "rope_cuda";
    if (head_dim <= 0 || head_dim % 2 || n_heads <= 0 || n_kv_heads < 0 || n_heads + n_kv_heads > 65535 || m < 0 ||
        m > 65535)
        throw Error(fn + ": need an even head_dim > 0, n_heads > 0 and m in 0..65535, got head_dim=" +
                    std::to_string(head_dim) + ", n_heads=" + std::to_string(n_heads) + ", m=" + std::to_string(m));
    if (m == 0) return;
    const size_t nq = size_t(m * n_heads * head_dim), nk = size_t(m * n_kv_heads * head_dim);
    DeviceBuffer<float> fd(size_t(head_dim / 2), fn), qd(nq, fn), kd(std::max<size_t>(nk, 1), fn);
    DeviceBuffer<int64_t> pd(size_t(m), fn);
    upload(fd, inv_freq, size_t(head_dim / 2), fn);
    upload(qd, q, nq, fn);
    if (k && nk) upload(kd, k, nk, fn);
    upload(pd, positions, size_t(m), fn);
    rope_launch(fd.get(), head_dim, qd.get(), n_heads, k && nk ? kd.get() : nullptr, n_kv_heads, pd.get(), m, nullptr);
    cuda_check(cudaGetLastError(), fn + " (launch)");
    download(q, qd, nq, fn);
    if (k && nk) download(k, kd, nk, fn);
}

}  // namespace flexquant

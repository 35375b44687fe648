// Rotate-half rotary position embedding (Hugging Face Llama), for i < d/2, f_i = pos * inv_freq[i]:
//   x[i]       <- x[i] cos f_i - x[i + d/2] sin f_i
//   x[i + d/2] <- x[i + d/2] cos f_i + x[i] sin f_i
// on q (m, n_heads, d) and k (m, n_kv_heads, d), in place.
//
// The CUDA twin of cpp/src/ops/rope.cpp, with the same inv_freq table (rope_init, uploaded once):
// the angle is the fp32 product, its cos/sin are taken in fp64 and rounded to fp32 (as the CPU op
// does), and the rotation is two products and one sum each, without fused multiply-adds (torch's
// rounding). The positions are read from device memory so that a captured decode step rotates by
// the position the host wrote before the replay.
#include "cuda_backend.h"

namespace flexquant {

namespace {
constexpr int THREADS = 128;
}

// Block (r, which): token r; which = 0 rotates q, 1 rotates k. Threads stride over (head, i).
static __global__ void __launch_bounds__(THREADS)
rope_kernel(const float* __restrict__ inv_freq,   // (d / 2)
            int half,
            float* __restrict__ q, int64_t n_heads,       // (m, n_heads, 2 half)
            float* __restrict__ k, int64_t n_kv_heads,    // (m, n_kv_heads, 2 half)
            const int64_t* __restrict__ positions) {      // (m)
    const int64_t r = blockIdx.x;
    const bool is_k = blockIdx.y == 1;
    const int64_t heads = is_k ? n_kv_heads : n_heads;
    float* x = (is_k ? k : q) + r * heads * 2 * half;
    const float pos = float(positions[r]);
    for (int64_t idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
        const int64_t h = idx / half;
        const int i = int(idx % half);
        const float angle = __fmul_rn(pos, inv_freq[i]);
        const float c = float(cos(double(angle))), s = float(sin(double(angle)));
        float* v = x + h * 2 * half;
        const float a = v[i], b = v[i + half];
        v[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        v[i + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    }
}

void rope_launch(const float* inv_freq, int head_dim, float* q, int64_t n_heads, float* k, int64_t n_kv_heads,
                 const int64_t* positions, int64_t m, cudaStream_t stream) {
    if (m <= 0) return;
    const dim3 grid(unsigned(m), k ? 2u : 1u);
    rope_kernel<<<grid, THREADS, 0, stream>>>(inv_freq, head_dim / 2, q, n_heads, k, n_kv_heads, positions);
}

void rope_cuda(const float* inv_freq, int head_dim, float* q, int64_t n_heads, float* k, int64_t n_kv_heads,
               const int64_t* positions, int64_t m) {
    const std::string fn = "rope_cuda";
    if (head_dim <= 0 || head_dim % 2 || n_heads <= 0 || n_kv_heads < 0 || m < 0 || m > 65535)
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

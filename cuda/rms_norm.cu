// y = x * w / sqrt(mean(x^2) + eps)        rows of x (m, d), w (d)
//
// The CUDA twin of cpp/src/ops/rms_norm.cpp: the sum of squares in fp64 (so the result does not
// depend on the reduction order), r = 1 / sqrt(mean + eps) with IEEE sqrt and division, then
// (x * r) * w as two roundings, like transformers' LlamaRMSNorm in fp32.
#include "cuda_backend.h"

namespace flexquant {

namespace {
constexpr int THREADS = RMS_THREADS;  // the sum's fixed order is for 256 threads
}

// One block per row. y may equal x: each thread reads its elements before writing them.
// Latency, not bandwidth, bounds a decode row (d = 4096 is 16 KB on one SM): a rolled loop waits
// for each load in turn (measured 10.7 µs a row on an H100, 2.5 µs with the loads in flight; the
// sum is rms_row_sum_squares in cuda_backend.h, shared with the GEMV's fused preparation).
static __global__ void __launch_bounds__(THREADS)
rms_norm_kernel(const float* x,                  // (m, d)
                const float* __restrict__ w,     // (d)
                int64_t d, float eps,
                float* y) {                      // (m, d)
    pdl_begin();  // cuda_backend.h: launched with PDL in the engine's passes
    const float* xr = x + int64_t(blockIdx.x) * d;
    float* yr = y + int64_t(blockIdx.x) * d;
    const bool vec = rms_vec(x, w, y, d);
    const float inv = rms_inv(rms_row_sum_squares(xr, d, vec), d, eps);
    if (vec) {
        const int64_t d4 = d / 4;
        const float4* x4 = reinterpret_cast<const float4*>(xr);
        const float4* w4 = reinterpret_cast<const float4*>(w);
        float4* y4 = reinterpret_cast<float4*>(yr);
        for (int64_t base = 0; base < d4; base += int64_t(THREADS) * RMS_UNROLL) {
            float4 v[RMS_UNROLL], g[RMS_UNROLL];
#pragma unroll
            for (int u = 0; u < RMS_UNROLL; ++u) {
                const int64_t i = base + threadIdx.x + u * THREADS;
                if (i < d4) {
                    v[u] = x4[i];
                    g[u] = w4[i];
                }
            }
#pragma unroll
            for (int u = 0; u < RMS_UNROLL; ++u) {
                const int64_t i = base + threadIdx.x + u * THREADS;
                if (i < d4)
                    y4[i] = make_float4(rms_apply(v[u].x, inv, g[u].x), rms_apply(v[u].y, inv, g[u].y),
                                        rms_apply(v[u].z, inv, g[u].z), rms_apply(v[u].w, inv, g[u].w));
            }
        }
    } else {
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) yr[i] = rms_apply(xr[i], inv, w[i]);
    }
}

void rms_norm_launch(const float* x, const float* w, int64_t m, int64_t d, float eps, float* y, cudaStream_t stream) {
    if (m > 0) launch_kernel(rms_norm_kernel, dim3(unsigned(m)), dim3(THREADS), 0, stream, x, w, d, eps, y);
}

void rms_norm_cuda(const float* x, const float* w, int64_t m, int64_t d, float eps, float* y) {
    const std::string fn = "rms_norm_cuda";
    if (d <= 0 || m < 0 || m > 0x7fffffff)
        throw Error(fn + ": d must be positive and m in 0..2^31-1, got m=" + std::to_string(m) + ", d=" + std::to_string(d));
    if (m == 0) return;
    DeviceBuffer<float> xd(size_t(m * d), fn), wd(size_t(d), fn), yd(size_t(m * d), fn);
    upload(xd, x, size_t(m * d), fn);
    upload(wd, w, size_t(d), fn);
    poison(yd, size_t(m * d), fn);
    rms_norm_launch(xd.get(), wd.get(), m, d, eps, yd.get(), nullptr);
    cuda_check(cudaGetLastError(), fn + " (launch)");
    download(y, yd, size_t(m * d), fn);
}

}  // namespace flexquant

// y = x * w / sqrt(mean(x^2) + eps)        rows of x (m, d), w (d)
//
// The CUDA twin of cpp/src/ops/rms_norm.cpp: the sum of squares in fp64 (so the result does not
// depend on the reduction order), r = 1 / sqrt(mean + eps) with IEEE sqrt and division, then
// (x * r) * w as two roundings, like transformers' LlamaRMSNorm in fp32.
#include "cuda_backend.h"

namespace flexquant {

namespace {
constexpr int THREADS = 256;
}

// One block per row. y may equal x: each thread reads its elements before writing them.
static __global__ void __launch_bounds__(THREADS)
rms_norm_kernel(const float* x,                  // (m, d)
                const float* __restrict__ w,     // (d)
                int64_t d, float eps,
                float* y) {                      // (m, d)
    const float* xr = x + int64_t(blockIdx.x) * d;
    float* yr = y + int64_t(blockIdx.x) * d;
    double ss = 0.0;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) ss += double(xr[i]) * double(xr[i]);
    ss = block_reduce(ss, [](double a, double b) { return a + b; });
    const float mean = float(ss / double(d));
    const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) yr[i] = __fmul_rn(__fmul_rn(xr[i], inv), w[i]);
}

void rms_norm_launch(const float* x, const float* w, int64_t m, int64_t d, float eps, float* y, cudaStream_t stream) {
    if (m > 0) rms_norm_kernel<<<unsigned(m), THREADS, 0, stream>>>(x, w, d, eps, y);
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

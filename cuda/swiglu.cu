// out = silu(gate) * up,   silu(g) = g / (1 + exp(-g))            gate, up, out (n)
//
// The CUDA twin of cpp/src/ops/swiglu.cpp, elementwise; out may equal gate. expf is the accurate
// (not the __expf intrinsic) version, so the two backends differ by a few ulp at most.
#include "cuda_backend.h"

namespace flexquant {

namespace {
constexpr int THREADS = 256;
}

static __global__ void __launch_bounds__(THREADS)
swiglu_kernel(const float* gate, const float* __restrict__ up, int64_t n, float* out) {  // (n) each
    pdl_begin();  // cuda_backend.h: launched with PDL in the engine's passes
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        out[i] = silu_mul(gate[i], up[i]);  // cuda_backend.h, shared with the GEMV's fused preparation
    }
}

void swiglu_launch(const float* gate, const float* up, int64_t n, float* out, cudaStream_t stream) {
    if (n <= 0) return;
    const int64_t blocks = std::min<int64_t>((n + THREADS - 1) / THREADS, 4096);
    launch_kernel(swiglu_kernel, dim3(unsigned(blocks)), dim3(THREADS), 0, stream, gate, up, n, out);
}

void swiglu_cuda(const float* gate, const float* up, int64_t n, float* out) {
    const std::string fn = "swiglu_cuda";
    if (n < 0) throw Error(fn + ": n must be >= 0, got " + std::to_string(n));
    if (n == 0) return;
    DeviceBuffer<float> gd(size_t(n), fn), ud(size_t(n), fn), od(size_t(n), fn);
    upload(gd, gate, size_t(n), fn);
    upload(ud, up, size_t(n), fn);
    poison(od, size_t(n), fn);
    swiglu_launch(gd.get(), ud.get(), n, od.get(), nullptr);
    cuda_check(cudaGetLastError(), fn + " (launch)");
    download(out, od, size_t(n), fn);
}

}  // namespace flexquant

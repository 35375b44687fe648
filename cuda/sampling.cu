// The next-token signals of one logit vector (vocab), the CUDA twin of entropy_and_top1 and argmax
// in cpp/src/ops/sampling.cpp:
//   Z = Σ_j exp(l_j - max l),   entropy = ln Z - Σ_i p_i (l_i - max l),   top-1 prob = 1 / Z,
//   argmax = the first index holding max l.
// One block of 1024 threads per logit row: the vocab (32k-128k) is one pass of ~100 reads per
// thread, cheaper than a second launch to merge blocks; a batched step's rows are the grid. The sums are fp64 as on the CPU; NaN counts as -inf.
#include <cmath>

#include "cuda_backend.h"

namespace flexquant {

namespace {
constexpr int THREADS = 1024;

__device__ __forceinline__ float clean(float v) { return isnan(v) ? -INFINITY : v; }
}  // namespace

static __global__ void __launch_bounds__(THREADS)
entropy_and_top1_kernel(const float* __restrict__ logits_all,  // (rows, vocab)
                        int64_t vocab,
                        StepSignalsDevice* __restrict__ out_all) {        // (rows)
    pdl_begin();  // cuda_backend.h: launched with PDL in the engine's passes
    const float* logits = logits_all + int64_t(blockIdx.x) * vocab;
    StepSignalsDevice* out = out_all + blockIdx.x;
    float mx = -INFINITY;
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, clean(logits[i]));
    mx = block_reduce(mx, [](float a, float b) { return fmaxf(a, b); });
    long long first = vocab;  // the first index at the max (all NaN: 0, as the CPU op)
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x)
        if (clean(logits[i]) == mx) {
            first = i;
            break;
        }
    first = block_reduce(first, [](long long a, long long b) { return a < b ? a : b; });
    double z = 0.0, zl = 0.0;
    if (isfinite(mx)) {
        for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float d = clean(logits[i]) - mx;
            const float e = expf(d);
            z += e;
            if (e > 0.0f) zl += double(e) * d;
        }
    }
    z = block_reduce(z, [](double a, double b) { return a + b; });
    zl = block_reduce(zl, [](double a, double b) { return a + b; });
    if (threadIdx.x == 0) {
        out->entropy = z > 0.0 ? float(log(z) - zl / z) : 0.0f;
        out->top1_prob = z > 0.0 ? float(1.0 / z) : 0.0f;
        out->argmax = int32_t(first < vocab ? first : 0);
    }
}

void entropy_and_top1_launch(const float* logits, int64_t vocab, StepSignalsDevice* out, cudaStream_t stream,
                             int64_t rows) {
    if (rows > 0) launch_kernel(entropy_and_top1_kernel, dim3(unsigned(rows)), dim3(THREADS), 0, stream, logits, vocab, out);
}

void entropy_and_top1_cuda(const float* logits, int64_t vocab, float* entropy, float* top1_prob, int64_t* argmax) {
    const std::string fn = "entropy_and_top1_cuda";
    if (vocab <= 0 || vocab > 0x7fffffff) throw Error(fn + ": vocab must be in 1..2^31-1, got " + std::to_string(vocab));
    DeviceBuffer<float> ld(size_t(vocab), fn);
    DeviceBuffer<StepSignalsDevice> od(1, fn);
    upload(ld, logits, size_t(vocab), fn);
    poison(od, 1, fn);
    entropy_and_top1_launch(ld.get(), vocab, od.get(), nullptr);
    cuda_check(cudaGetLastError(), fn + " (launch)");
    StepSignalsDevice s{};
    download(&s, od, 1, fn);
    *entropy = s.entropy;
    *top1_prob = s.top1_prob;
    *argmax = s.argmax;
}

}  // namespace flexquant

// The next-token signals of one logit vector (vocab), the CUDA twin of entropy_and_top1 and argmax
// in cpp/src/ops/sampling.cpp:
//   Z = Σ_j exp(l_j - max l),   entropy = ln Z - Σ_i p_i (l_i - max l),   top-1 prob = 1 / Z,
//   argmax = the first index holding max l.
// One block of 1024 threads per logit row: the vocab (32k-128k) is ~30-130 reads per thread,
// cheaper than a second launch to merge blocks; a batched step's rows are the grid. The sums are
// fp64 as on the CPU; NaN counts as -inf. Two passes over the row, each with UNROLL loads in flight
// per thread (a rolled loop waits for one L2 round trip per element: ~20 µs a 32k row on an H100
// with three such passes); the max pass also keeps each thread's first index of its max, so the
// first index of the row's max needs no pass of its own. Each thread visits its elements in the
// same order as a rolled loop, so the sums are the same.
#include <cmath>

#include "cuda_backend.h"

namespace flexquant {

namespace {
constexpr int THREADS = 1024;
constexpr int UNROLL = 8;

__device__ __forceinline__ float clean(float v) { return isnan(v) ? -INFINITY : v; }

// v[u] = the cleaned logit at base + u·stride, -inf past vocab: UNROLL loads issued back to back.
__device__ __forceinline__ void load_batch(const float* logits, int64_t base, int64_t stride, int64_t vocab,
                                           float (&v)[UNROLL]) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int64_t i = base + u * stride;
        v[u] = i < vocab ? clean(logits[i]) : -INFINITY;
    }
}
}  // namespace

static __global__ void __launch_bounds__(THREADS)
entropy_and_top1_kernel(const float* __restrict__ logits_all,  // (rows, vocab)
                        int64_t vocab,
                        StepSignalsDevice* __restrict__ out_all) {        // (rows)
    pdl_begin();  // cuda_backend.h: launched with PDL in the engine's passes
    const float* logits = logits_all + int64_t(blockIdx.x) * vocab;
    StepSignalsDevice* out = out_all + blockIdx.x;
    const int64_t stride = blockDim.x;
    // this thread's max and the first of its indices holding it (vocab: no element)
    float m = -INFINITY;
    long long idx = vocab;
    for (int64_t base = threadIdx.x; base < vocab; base += stride * UNROLL) {
        float v[UNROLL];
        load_batch(logits, base, stride, vocab, v);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int64_t i = base + u * stride;
            if (i < vocab && (idx == vocab || v[u] > m)) {  // increasing i: the first one wins ties
                m = v[u];
                idx = i;
            }
        }
    }
    const float mx = block_reduce(m, [](float a, float b) { return fmaxf(a, b); });
    // the first index at the max (all NaN: 0, as the CPU op): the least of the threads' first
    // indices whose max is the row's
    const long long first =
        block_reduce(idx < vocab && m == mx ? idx : (long long)vocab, [](long long a, long long b) { return a < b ? a : b; });
    double z = 0.0, zl = 0.0;
    if (isfinite(mx)) {
        for (int64_t base = threadIdx.x; base < vocab; base += stride * UNROLL) {
            float v[UNROLL];
            load_batch(logits, base, stride, vocab, v);
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                if (base + u * stride >= vocab) break;
                const float d = v[u] - mx;
                const float e = expf(d);
                z += e;
                if (e > 0.0f) zl += double(e) * d;
            }
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

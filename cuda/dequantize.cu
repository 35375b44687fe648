// W_k[n, i] = s_k[n, g] * c_k[n, i] + m_k[n, g],   g = i / group_size
//   c_k = c >> (B - k)                  = the bits of the first k planes (plane 0 = MSB)
//   s_k = s * 2^(B-k),  m_k = m + s * (2^(B-k) - 1) / 2      (s, m: the fp16 group params)
// docs/format.md; the CUDA twin of cpp/src/ops/dequantize.cpp, bit-exact with it and with numpy's
// bitplane.dequantize_planes.
//
// A reference op for tests and tools, not a decode path, so it is written for clarity: one thread
// per (row, 32-column word). Each multiply and add is an explicit round-to-nearest intrinsic
// (__fmul_rn, __fadd_rn): nvcc contracts a * b + c into an FMA by default, which rounds once and
// would differ from the CPU reference in the last bit.
#include <cuda_fp16.h>

#include <algorithm>

#include "cuda_backend.h"

namespace flexquant {

namespace {
constexpr int WORD_BITS = 32;
constexpr int64_t TILE_N = 8, TILE_K = 128, SUPER_K = 512;
constexpr int THREADS = 256;
}  // namespace

// One thread: row `row`, K [32 wi, 32 wi + 32). Group boundaries are multiples of group_size, itself
// a multiple of 32, so the 32 columns share one (s_k, m_k).
static __global__ void dequantize_linear_kernel(const uint8_t* __restrict__ planes,    // (bits, plane_bytes)
                                                uint64_t plane_bytes,
                                                const uint16_t* __restrict__ qparams,  // (n, n_groups, 2)
                                                float* __restrict__ out,               // (n, k)
                                                int64_t n, int64_t k, int64_t k_pad, int64_t n_groups,
                                                int group_size, int bits, float scale_mul, float min_mul) {
    const int64_t words_per_row = k_pad / WORD_BITS;
    const int64_t total = n * words_per_row;
    for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
         idx += int64_t(gridDim.x) * blockDim.x) {
        const int64_t row = idx / words_per_row;
        const int64_t k0 = (idx % words_per_row) * WORD_BITS;
        if (k0 >= k) continue;  // a word wholly in the K padding: no output, and its group may be >= n_groups
        // tc8x512: row tile (K_pad bytes) -> super-chunk (W words per lane) -> lane 4g+t -> word j
        const int64_t s0 = k0 / SUPER_K * SUPER_K;
        const int64_t words = min(int64_t(4), (k_pad - s0) / TILE_K);
        const int64_t j = (k0 - s0) / TILE_K, t = (k0 - s0) % TILE_K / WORD_BITS;
        const int64_t lane = (row % TILE_N) * 4 + t;
        const uint64_t offset = uint64_t(row / TILE_N) * uint64_t(k_pad) + uint64_t(s0) + uint64_t(lane * words + j) * 4;

        uint32_t plane_words[8];  // bits <= 8
        for (int p = 0; p < bits; ++p)
            plane_words[p] = *reinterpret_cast<const uint32_t*>(planes + uint64_t(p) * plane_bytes + offset);

        const int64_t g = k0 / group_size;
        const uint16_t* qp = qparams + (row * n_groups + g) * 2;
        const float s = __half2float(__ushort_as_half(qp[0]));
        const float m = __half2float(__ushort_as_half(qp[1]));
        const float s_k = __fmul_rn(s, scale_mul);
        const float m_k = __fadd_rn(m, __fmul_rn(s, min_mul));

        float* y = out + row * k;
        const int b_end = int(min(int64_t(WORD_BITS), k - k0));  // the last word may hold K padding
        for (int b = 0; b < b_end; ++b) {
            uint32_t code = 0;
            for (int p = 0; p < bits; ++p) code = (code << 1) | ((plane_words[p] >> b) & 1u);
            y[k0 + b] = __fadd_rn(__fmul_rn(float(code), s_k), m_k);
        }
    }
}

void dequantize_linear_launch(const uint8_t* planes, uint64_t plane_bytes, const uint16_t* qparams,
                              float* out, int64_t n, int64_t k, int64_t k_pad, int64_t n_groups,
                              int group_size, int bits, int max_bits, cudaStream_t stream) {
    const int shift = max_bits - bits;
    // The same fp32 constants as the CPU op (numpy: float32(1 << shift), float32((2^shift - 1) / 2)).
    const float scale_mul = float(1 << shift);
    const float min_mul = float(((1 << shift) - 1) / 2.0);
    const int64_t total = n * (k_pad / WORD_BITS);
    // A grid-stride loop covers any size; 2^16 blocks of 256 threads fill any current GPU.
    const unsigned blocks = unsigned(std::min<int64_t>((total + THREADS - 1) / THREADS, int64_t(1) << 16));
    dequantize_linear_kernel<<<blocks, THREADS, 0, stream>>>(planes, plane_bytes, qparams, out, n, k, k_pad,
                                                             n_groups, group_size, bits, scale_mul, min_mul);
}

void dequantize_linear_cuda(const BitPlaneLinear& w, int bits, float* host_out /* (n, k) */) {
    w.check_bits(bits);
    const std::string what = "dequantize_linear_cuda('" + w.name + "', bits=" + std::to_string(bits) + ")";
    // Only the first `bits` planes travel: the k-bit view never reads the others.
    const size_t planes_bytes = size_t(bits) * size_t(w.plane_bytes);
    const size_t qparams_count = size_t(w.n) * size_t(w.n_groups) * 2;
    const size_t out_count = size_t(w.n) * size_t(w.k);

    DeviceBuffer<uint8_t> planes(planes_bytes, what);
    DeviceBuffer<uint16_t> qparams(qparams_count, what);
    DeviceBuffer<float> out(out_count, what);
    upload(planes, w.planes, planes_bytes, what + " planes");
    upload(qparams, w.qparams, qparams_count, what + " qparams");
    dequantize_linear_launch(planes.get(), w.plane_bytes, qparams.get(), out.get(), w.n, w.k, w.k_pad, w.n_groups,
                             w.group_size, bits, w.max_bits, /*stream=*/0);
    cuda_check(cudaGetLastError(), what + " (kernel launch)");
    download(host_out, out, out_count, what);  // waits for the kernel: an error it raised surfaces here
}

}  // namespace flexquant

// x̂ = s · rint(x / s),  s = absmax_g(x) / (2^(b-1) - 1),  per row and per group g of `group` columns
//
// Symmetric b-bit activations per weight group, returned dequantized (fp32): what the CUDA
// tensor-core GEMV computes with (cuda/bitplane_matmul.cu, bitplane_prepare_tc_kernel, b = 8), so
// the CPU engine can run the model the GPU runs, and calibration can measure what low-precision
// activations cost per layer. The same fp32 operations as the kernel and as numpy's
// amax / float32(qmax), rint(x / s) (IEEE division, round half to even); a group of zeros stays 0.
// b = 16 stands for fp16 activations (x̂ = fp16(x), per element): the CUDA f16 GEMV's (MMA_A16).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "fp16.h"
#include "ops/ops.h"

namespace flexquant {

void quantize_activations(const float* x, int64_t m, int64_t k, int group, int bits, float* out) {
    if (m < 0 || k <= 0 || group <= 0 || ((bits < 2 || bits > 8) && bits != 16))
        throw std::invalid_argument("quantize_activations: need m >= 0, k > 0, group > 0 and bits in 2..8 or 16, got m=" +
                                    std::to_string(m) + ", k=" + std::to_string(k) + ", group=" + std::to_string(group) +
                                    ", bits=" + std::to_string(bits));
    if (bits == 16) {  // fp16 activations: no scale, each element to the nearest half, saturating
        for (int64_t i = 0; i < m * k; ++i) {  // (as the CUDA f16 GEMV's preparation: ±65504, not inf)
            const float v = std::fabs(x[i]) > 65504.0f ? std::copysign(65504.0f, x[i]) : x[i];
            out[i] = fp16_to_fp32(fp32_to_fp16(v));
        }
        return;
    }
    const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
    for (int64_t r = 0; r < m; ++r) {
        const float* xr = x + r * k;
        float* yr = out + r * k;
        for (int64_t g0 = 0; g0 < k; g0 += group) {
            const int64_t g1 = std::min<int64_t>(k, g0 + group);
            float amax = 0.0f;
            for (int64_t i = g0; i < g1; ++i) amax = std::max(amax, std::fabs(xr[i]));
            const float scale = amax / qmax;
            for (int64_t i = g0; i < g1; ++i) {
                // out may be x: each element is read before it is written
                const float q = scale > 0.0f ? std::min(qmax, std::max(-qmax, std::nearbyint(xr[i] / scale))) : 0.0f;
                yr[i] = scale * q;
            }
        }
    }
}

}  // namespace flexquant

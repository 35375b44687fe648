// y = x * w / sqrt(mean(x^2) + eps)        rows of x (m, d), w (d)
//
// As transformers' LlamaRMSNorm in fp32: r = rsqrt(mean + eps) in fp32, then (x * r) * w. The sum
// of squares is taken in fp64 so the result does not depend on d's size or the summation order.

#include <cmath>
#include <stdexcept>

#include "ops/ops.h"

namespace flexquant {

void rms_norm(const float* x, const float* w, int64_t m, int64_t d, float eps, float* y) {
    if (d <= 0 || m < 0) throw std::invalid_argument("rms_norm: d must be positive and m >= 0");
    for (int64_t r = 0; r < m; ++r) {
        const float* xr = x + r * d;
        float* yr = y + r * d;
        // 4 partial sums: one fp64 add chain costs its latency per element (a prompt's norms ran
        // ~2% of a SmolLM2 prefill that way)
        double part[4] = {0.0, 0.0, 0.0, 0.0};
        int64_t i = 0;
        for (; i + 4 <= d; i += 4)
            for (int e = 0; e < 4; ++e) part[e] += static_cast<double>(xr[i + e]) * xr[i + e];
        for (; i < d; ++i) part[0] += static_cast<double>(xr[i]) * xr[i];
        const double ss = (part[0] + part[1]) + (part[2] + part[3]);
        const float mean = static_cast<float>(ss / static_cast<double>(d));
        const float inv = 1.0f / std::sqrt(mean + eps);
        for (int64_t i = 0; i < d; ++i) yr[i] = (xr[i] * inv) * w[i];  // yr may be xr: read before write
    }
}

}  // namespace flexquant

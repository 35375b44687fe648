// out = silu(gate) * up,   silu(g) = g / (1 + exp(-g))            gate, up, out (n)

#include <cmath>
#include <stdexcept>

#include "ops/ops.h"

namespace flexquant {

void swiglu(const float* gate, const float* up, int64_t n, float* out) {
    if (n < 0) throw std::invalid_argument("swiglu: n must be >= 0");
    for (int64_t i = 0; i < n; ++i) {
        const float g = gate[i];
        // exp(-g) overflows to inf for g < -88: g / inf = -0, the correct limit.
        out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
}

}  // namespace flexquant

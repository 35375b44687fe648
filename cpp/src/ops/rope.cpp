// Rotate-half rotary position embedding (Hugging Face Llama), for i < d/2, f_i = pos * inv_freq[i]:
//   x[i]       <- x[i] cos f_i - x[i + d/2] sin f_i
//   x[i + d/2] <- x[i + d/2] cos f_i + x[i] sin f_i
// inv_freq as transformers' ROPE_INIT_FUNCTIONS compute it in fp32 (modeling_rope_utils.py):
//   default: 1 / theta^(2i/d);   linear: default / factor;
//   llama3 (_compute_llama3_parameters): by wavelength 2π/inv_freq, keep it below
//     original_max_position / high_freq_factor, divide by factor above
//     original_max_position / low_freq_factor, and in between blend the two with
//     smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor):
//     (1 - smooth) * inv_freq / factor + smooth * inv_freq.
// Every step is the same fp32 operation in the same order as there, so the tables agree to the
// ulp, and the rotation is q*cos + rotate_half(q)*sin without fused multiply-adds, as in torch.

#include <cmath>
#include <stdexcept>
#include <string>

#include "ops/ops.h"

// The rotation must round like torch's separate multiply and add (see above): no contraction into
// fused multiply-adds (GCC contracts by default where the target has FMA, e.g. aarch64).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace flexquant {

Rope rope_init(const RopeParams& p) {
    if (p.head_dim <= 0 || p.head_dim % 2)
        throw std::invalid_argument("rope_init: head_dim must be positive and even, got " + std::to_string(p.head_dim));
    if (!(p.theta > 0.0f)) throw std::invalid_argument("rope_init: theta must be positive");
    if (p.scaling != ROPE_SCALING_NONE && !(p.factor > 0.0f))
        throw std::invalid_argument("rope_init: factor must be positive");
    Rope r;
    r.head_dim = p.head_dim;
    const int half = p.head_dim / 2;
    r.inv_freq.resize(half);
    for (int i = 0; i < half; ++i) {
        const float e = static_cast<float>(2 * i) / static_cast<float>(p.head_dim);
        r.inv_freq[i] = 1.0f / std::pow(p.theta, e);
    }
    if (p.scaling == ROPE_SCALING_LINEAR) {
        for (float& f : r.inv_freq) f /= p.factor;
    } else if (p.scaling == ROPE_SCALING_LLAMA3) {
        if (!(p.high_freq_factor > p.low_freq_factor) || !(p.low_freq_factor > 0.0f) || p.original_max_position <= 0)
            throw std::invalid_argument(
                "rope_init: llama3 scaling needs 0 < low_freq_factor < high_freq_factor and "
                "original_max_position > 0");
        const float old_len = static_cast<float>(p.original_max_position);
        // Python scalars in transformers: computed in double, then used as fp32 by the tensor ops.
        const float low_wavelen = static_cast<float>(static_cast<double>(p.original_max_position) / p.low_freq_factor);
        const float high_wavelen =
            static_cast<float>(static_cast<double>(p.original_max_position) / p.high_freq_factor);
        const float two_pi = static_cast<float>(2.0 * 3.14159265358979323846);  // 2 * math.pi
        const float span = static_cast<float>(static_cast<double>(p.high_freq_factor) - p.low_freq_factor);
        for (float& f : r.inv_freq) {
            // torch evaluates `scalar / tensor` as tensor.reciprocal() * scalar.
            const float wavelen = (1.0f / f) * two_pi;
            float inv = wavelen > low_wavelen ? f / p.factor : f;
            if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
                const float smooth = ((1.0f / wavelen) * old_len - p.low_freq_factor) / span;
                inv = (1.0f - smooth) * inv / p.factor + smooth * inv;
            }
            f = inv;
        }
    }
    return r;
}

void rope_cos_sin(const Rope& rope, const int64_t* positions, int64_t m, float* cos, float* sin) {
    const int half = rope.head_dim / 2;
    for (int64_t r = 0; r < m; ++r) {
        const float pos = static_cast<float>(positions[r]);
        for (int i = 0; i < half; ++i) {
            const float angle = pos * rope.inv_freq[i];  // fp32, as transformers
            cos[r * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
            sin[r * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
        }
    }
}

void rope_apply_(const float* cos, const float* sin, float* x, int64_t m, int64_t n_heads, int64_t head_dim) {
    const int64_t half = head_dim / 2;
    for (int64_t r = 0; r < m; ++r) {
        const float* c = cos + r * half;
        const float* s = sin + r * half;
        for (int64_t h = 0; h < n_heads; ++h) {
            float* v = x + (r * n_heads + h) * head_dim;
            for (int64_t i = 0; i < half; ++i) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i] + a * s[i];
            }
        }
    }
}

void rope_(const Rope& rope, float* q, int64_t n_heads, float* k, int64_t n_kv_heads, const int64_t* positions,
           int64_t m) {
    const int64_t half = rope.head_dim / 2;
    std::vector<float> cs(static_cast<size_t>(2 * m * half));
    rope_cos_sin(rope, positions, m, cs.data(), cs.data() + m * half);
    rope_apply_(cs.data(), cs.data() + m * half, q, m, n_heads, rope.head_dim);
    if (k) rope_apply_(cs.data(), cs.data() + m * half, k, m, n_kv_heads, rope.head_dim);
}

}  // namespace flexquant

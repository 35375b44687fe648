// W_k[n, i] = s_k[n, g] * c_k[n, i] + m_k[n, g],   g = i / group_size
//   c_k = c >> (B - k)                  = the bits of the first k planes (plane 0 = MSB)
//   s_k = s * 2^(B-k),  m_k = m + s * (2^(B-k) - 1) / 2      (s, m: the fp16 group params)
// docs/format.md, "Quantization and the k-bit view" and "Plane layout tc8x512".
//
// Bit-exact with numpy's bitplane.dequantize_planes: every step is one fp32 operation rounded on
// its own, in numpy's order. A fused multiply-add would round once instead of twice and differ in
// the last bit, so contraction is switched off for this file (below, so that no build flag is
// needed for it).
#include "ops/dequantize.h"

#include <algorithm>
#include <vector>

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace flexquant {

namespace {

constexpr int64_t TILE_N = 8;     // rows per row tile
constexpr int64_t TILE_K = 128;   // K per lane word group (4 lanes x 32 bits)
constexpr int64_t SUPER_K = 512;  // K per full super-chunk

uint32_t load_le32(const uint8_t* p) {
    return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

// Accumulate plane `tile` (K_pad bytes: one row tile of one plane) into codes (8, k_pad): each code
// shifts left by one and takes this plane's bit, so after planes 0..k-1 it holds c >> (B - k).
void accumulate_plane_tile(const uint8_t* tile /* (k_pad) bytes */, int64_t k_pad,
                           uint8_t* codes /* (8, k_pad) */) {
    for (int64_t s0 = 0; s0 < k_pad; s0 += SUPER_K) {
        const int64_t words = std::min<int64_t>(4, (k_pad - s0) / TILE_K);  // W
        // Super-chunks before this one are full, so this one starts s0 bytes into the tile.
        const uint8_t* chunk = tile + s0;
        for (int64_t lane = 0; lane < 32; ++lane) {
            const int64_t g = lane / 4, t = lane % 4;
            for (int64_t j = 0; j < words; ++j) {
                const uint32_t word = load_le32(chunk + (lane * words + j) * 4);
                uint8_t* c = codes + g * k_pad + s0 + TILE_K * j + 32 * t;
                for (int b = 0; b < 32; ++b) c[b] = uint8_t(c[b] << 1 | ((word >> b) & 1u));
            }
        }
    }
}

}  // namespace

void dequantize_linear(const BitPlaneLinear& w, int bits, float* out /* (n, k) */) {
    w.check_bits(bits);
    const int shift = w.max_bits - bits;
    // numpy: s_k = s * float32(1 << shift); m_k = m + s * float32(((1 << shift) - 1) / 2.0)
    const float scale_mul = float(1 << shift);
    const float min_mul = float(((1 << shift) - 1) / 2.0);

    std::vector<uint8_t> codes(size_t(TILE_N * w.k_pad));  // one row tile, (8, k_pad)
    for (int64_t rt = 0; rt < w.n_pad / TILE_N; ++rt) {
        std::fill(codes.begin(), codes.end(), uint8_t(0));
        for (int p = 0; p < bits; ++p)
            accumulate_plane_tile(w.planes + uint64_t(p) * w.plane_bytes + uint64_t(rt) * uint64_t(w.k_pad), w.k_pad,
                                  codes.data());
        for (int64_t g = 0; g < TILE_N; ++g) {
            const int64_t row = rt * TILE_N + g;
            if (row >= w.n) break;  // padding rows
            const uint8_t* c = codes.data() + g * w.k_pad;
            const uint16_t* qp = w.qparams + row * w.n_groups * 2;  // (n_groups, 2)
            float* y = out + row * w.k;
            for (int64_t grp = 0; grp < w.n_groups; ++grp) {
                const float s = fp16_to_fp32(qp[2 * grp]);
                const float m = fp16_to_fp32(qp[2 * grp + 1]);
                const float s_k = s * scale_mul;
                const float m_k = m + s * min_mul;
                const int64_t i_end = std::min(w.k, (grp + 1) * w.group_size);
                for (int64_t i = grp * w.group_size; i < i_end; ++i) {
                    const float scaled = float(c[i]) * s_k;
                    y[i] = scaled + m_k;
                }
            }
        }
    }
}

}  // namespace flexquant

// y (m, n) = x (m, k) · W_kᵀ over a bit-plane linear, reading only its first k planes:
//
//   y[r, n] = Σ_g s_k[n,g] · Σ_{i∈g} c_k[n,i] x[r,i]  +  m_k[n,g] · Σ_{i∈g} x[r,i]
//   Σ_i c_k[n,i] x[i] = Σ_{p<k} 2^(k-1-p) · Σ_{i: bit of plane p set} x[i]
//   s_k = s · 2^(B-k),   m_k = m + s · (2^(B-k) - 1) / 2               (docs/format.md)
//
// This file holds the entry point (validation, the activation permutation, dispatch) and the
// portable kernels; bitplane_matmul_avx2.cpp holds the AVX2 ones. Two regimes:
//  - decode (m <= bitplane_decode_max_m(act), ops.h): straight from the planes, re-read per activation row. The
//    portable kernel looks up each plane byte in a 256-entry table of partial sums of the 8
//    activations it covers (built once per call, shared by all rows and planes); the SIMD kernels
//    turn the k planes of a row's words into byte codes (vpshufb per plane, or one 8x8 bit
//    transpose for all planes: GFNI, or shifts) and multiply them with the activations: as fp32
//    (bitplane_matmul_avx2.cpp), or as int16 on int16 activations (bitplane_matmul_avx512.cpp with
//    vpdpwssd, bitplane_matmul_avx2_i16.cpp with vpmaddwd).
//  - gemm (larger m): 8 rows are dequantized to fp32 once and dotted with all m activation rows, so
//    the decode cost is paid once per call instead of once per activation row. On int16 activations
//    the rows become int16 codes instead, multiplied by 16 activation rows at a time with vpdpwssd
//    on AVX-512 VNNI (bitplane_matmul_avx512.cpp), by 8 with vpmaddwd on AVX2
//    (bitplane_matmul_avx2.cpp).
// Both walk the planes in their stored order: the activations are permuted once per call to match
// the layout's word order (word (t, j) of a super-chunk covers K 512s + 128j + 32t).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_features.h"
#include "ops/ops.h"
#include "thread_pool.h"

namespace flexquant {

using namespace bitplane_detail;

namespace {

void check(bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument("bitplane_matmul: " + what);
}

int64_t ceil_to(int64_t x, int64_t m) {
    return (x + m - 1) / m * m;
}

// n elements of v starting at a 64-byte boundary (the AVX-512 kernels' aligned loads), zeroed
// if `zero`.
template <typename T>
T* aligned64(std::vector<T>& v, size_t n, bool zero = true) {
    if (zero)
        v.assign(n + 64 / sizeof(T), T(0));
    else if (v.size() < n + 64 / sizeof(T))
        v.resize(n + 64 / sizeof(T));
    const size_t off = (64 - reinterpret_cast<uintptr_t>(v.data()) % 64) % 64;
    return v.data() + off / sizeof(T);
}

// K index of bit 0 of stored word w (per row: 16 words per full super-chunk, word o = t*W + j of
// super-chunk s covers K 512s + 128j + 32t).
inline int64_t word_k_base(int64_t k_pad, int64_t w) {
    const int64_t s = w / 16, o = w % 16;
    const int64_t rest = (k_pad - s * 512) / 128;
    const int64_t W = rest < 4 ? rest : 4;
    const int64_t t = o / W, j = o % W;
    return s * 512 + 128 * j + 32 * t;
}

// The 4 last words of a row in a short last super-chunk (W = 1 or 3), or -1 when it is full.
inline int64_t tail_first_word(int64_t k_pad) {
    const int64_t s = (k_pad - 1) / 512, words = 4 * ((k_pad - s * 512) / 128);
    return words % 8 ? 16 * s + words - 4 : -1;
}

// src (x_stride): the K index whose activation goes to slot i of the permuted buffer (WordOrder).
std::vector<int32_t> slot_sources(int64_t k_pad, WordOrder order) {
    const int64_t tail = order == WORD_ORDER_GFNI ? tail_first_word(k_pad) : -1;
    std::vector<int32_t> src(k_pad + (tail >= 0 ? 256 : 0));
    auto one_word = [&](int64_t w) {  // NATURAL or DWORD order inside the word's own 32 slots
        const int64_t base = word_k_base(k_pad, w);
        for (int slot = 0; slot < 32; ++slot) {
            const int e = order == WORD_ORDER_NATURAL ? slot : 4 * (slot % 8) + slot / 8;
            src[w * 32 + slot] = static_cast<int32_t>(base + e);
        }
    };
    for (int64_t s = 0; s * 512 < k_pad; ++s) {
        const int64_t words = 4 * std::min<int64_t>(4, (k_pad - s * 512) / 128);
        int64_t o = 0;
        if (order == WORD_ORDER_GFNI) {
            // Batches of 8 words (see WORD_ORDER_GFNI): slot 32(2v + h) + 8q + i of the batch holds
            // weight 16h + 4(i%4) + q of word v + 4(i/4).
            for (; o + 8 <= words; o += 8) {
                for (int pos = 0; pos < 256; ++pos) {
                    const int v = pos / 64, h = (pos / 32) % 2, q = (pos % 32) / 8, i = pos % 8;
                    const int64_t w = 16 * s + o + v + 4 * (i / 4);
                    src[(16 * s + o) * 32 + pos] =
                        static_cast<int32_t>(word_k_base(k_pad, w) + 16 * h + 4 * (i % 4) + q);
                }
            }
        }
        for (; o < words; ++o) one_word(16 * s + o);
    }
    if (tail >= 0) {
        // The tail words decoded two rows at a time (decode_tile_gfni): slot 64v + 32h + 8q + i holds
        // weight 16h + 4(i%4) + q of tail word v, for i and i + 4 alike (one row per 128-bit lane).
        for (int pos = 0; pos < 256; ++pos) {
            const int v = pos / 64, h = (pos / 32) % 2, q = (pos % 32) / 8, i = pos % 8;
            src[k_pad + pos] = static_cast<int32_t>(word_k_base(k_pad, tail + v) + 16 * h + 4 * (i % 4) + q);
        }
    }
    return src;
}

// What a call needs that depends only on (k, group_size, order): computed once per distinct
// shape (a model has a handful) and kept, as computing it costs about as much as a small product.
struct Layout {
    std::vector<int32_t> src;         // (x_stride) slot_sources; K indices >= k mark zero padding (empty
                                      // for WORD_ORDER_I16, whose x_stride is n_super * 512)
    std::vector<int32_t> word_group;  // (k_pad / 32) group of each stored word, clamped to n_groups - 1
    // WORD_ORDER_I16 only: Job::step_base, step_group, step_uniform, super_lane_const, and the GEMM's
    // Job::seg
    std::vector<int32_t> step_base, step_group;
    std::vector<uint8_t> step_uniform, super_lane_const;
    std::vector<int32_t> gemm_seg;
    // every order: the int16 GEMM's runs over K's words in natural order (AVX2)
    std::vector<int32_t> natural_seg;
};

// Job::seg: runs of consecutive words (in the GEMM's order) of one group, at most 8 words each.
void add_to_runs(std::vector<int32_t>& seg, int32_t pos, int32_t group) {
    const size_t n = seg.size();
    if (n && seg[n - 1] == group && seg[n - 2] < 8 && seg[n - 3] + seg[n - 2] == pos)
        ++seg[n - 2];
    else
        seg.insert(seg.end(), {pos, 1, group});
}

std::shared_ptr<const Layout> layout_for(int64_t k, int group_size, WordOrder order) {
    static std::mutex mutex;
    static std::map<std::tuple<int64_t, int, int>, std::shared_ptr<const Layout>> cache;
    const auto key = std::make_tuple(k, group_size, static_cast<int>(order));
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    auto l = std::make_shared<Layout>();
    const int64_t k_pad = ceil_to(k, 128), n_groups = (k + group_size - 1) / group_size;
    l->word_group.resize(k_pad / 32);
    for (int64_t w = 0; w < k_pad / 32; ++w)
        l->word_group[w] = static_cast<int32_t>(std::min<int64_t>(word_k_base(k_pad, w) / group_size, n_groups - 1));
    if (order == WORD_ORDER_I16) {
        const int64_t n_super = (k_pad + 511) / 512;
        l->step_base.assign(n_super * 16, -1);
        l->step_group.assign(n_super * 16, 0);
        l->step_uniform.assign(n_super * 4, 1);
        l->super_lane_const.assign(n_super, 1);
        for (int64_t s = 0; s < n_super; ++s) {
            const int64_t words = 4 * std::min<int64_t>(4, (k_pad - s * 512) / 128);
            for (int v = 0; v < 4; ++v) {
                for (int L = 0; L < 4; ++L) {
                    const int64_t o = 4 * L + v, i = 16 * s + 4 * v + L;
                    if (o >= words) continue;
                    l->step_base[i] = static_cast<int32_t>(word_k_base(k_pad, 16 * s + o));
                    l->step_group[i] = l->word_group[16 * s + o];
                }
                // a lane without a word (its codes are 0) takes lane 0's group: any finite factor
                // will do, and the step keeps one factor for all lanes where the words share one
                int32_t* gr = &l->step_group[16 * s + 4 * v];
                for (int L = 1; L < 4; ++L)
                    if (4 * L + v >= words) gr[L] = gr[0];
                l->step_uniform[4 * s + v] = gr[0] == gr[1] && gr[0] == gr[2] && gr[0] == gr[3];
            }
            // every lane in one group over the 4 steps: the decode may then sum a lane's int32
            // products over the super-chunk. A full super-chunk's lane spans 512 K (word 4L + v covers
            // K 512s + 128v + 32L), so G a multiple of 512; a short one of 1 word per lane spans 128
            // (G a multiple of 128: K = 576 at G = 128), of 2 words 192 (G a multiple of 256)
            bool same = true;
            for (int v = 1; v < 4; ++v)
                for (int L = 0; L < 4; ++L)
                    same = same && l->step_group[16 * s + 4 * v + L] == l->step_group[16 * s + L];
            l->super_lane_const[s] = same;
        }
        // The GEMM's words in their order (Job::xt), cut into runs of one group of at most 8 words
        int32_t pos = 0;
        for (int64_t s = 0; s < n_super; ++s) {
            const int64_t W = std::min<int64_t>(4, (k_pad - s * 512) / 128);
            for (int v = 0; v < 4; ++v)
                for (int64_t L = 0; L < W; ++L, ++pos) add_to_runs(l->gemm_seg, pos, l->step_group[16 * s + 4 * v + L]);
        }
    } else {
        l->src = slot_sources(k_pad, order);
    }
    for (int64_t w = 0; w < k_pad / 32; ++w)
        add_to_runs(l->natural_seg, static_cast<int32_t>(w),
                    static_cast<int32_t>(std::min<int64_t>(32 * w / group_size, n_groups - 1)));
    if (cache.size() >= 64) cache.clear();  // bound the memory if shapes keep changing
    cache.emplace(key, l);
    return l;
}

// xp (m, x_stride) <- x (m, k) in the kernel's slot order (src from slot_sources), zero padded. With
// `scaled` (the SIMD decode kernels), slots 8..15 and 16..23 of each 32 hold x * 2^-8 and x * 2^-16:
// those kernels convert code bytes 1 and 2 of a dword to float in place (c * 2^8, c * 2^16); the
// factor is exact.
void permute_activations(const float* x, int64_t m, int64_t k, int64_t x_stride, const int32_t* src, bool scaled,
                         float* xp) {
    const float q1 = scaled ? 1.0f / 256 : 1.0f, q2 = scaled ? 1.0f / 65536 : 1.0f;
    for (int64_t r = 0; r < m; ++r) {
        const float* xr = x + r * k;
        float* out = xp + r * x_stride;
        for (int64_t i = 0; i < x_stride; i += 32) {
            for (int e = 0; e < 32; ++e) {
                const int64_t from = src[i + e];
                const float v = from < k ? xr[from] : 0.0f;
                out[i + e] = e >= 8 && e < 16 ? v * q1 : e >= 16 && e < 24 ? v * q2 : v;
            }
        }
    }
}

}  // namespace

// The same fp32 operations as quantize_activations (and quantize_i16_avx2, prepare_i16_avx512).
void bitplane_round_i16(const float* x, int64_t m, int64_t k, int group, float* xhat, float qmax) {
    if (!(m >= 0 && k > 0 && group > 0))
        check(false, "round_i16: need m >= 0, k > 0 and group > 0, got m=" + std::to_string(m) +
                         ", k=" + std::to_string(k) + ", group=" + std::to_string(group));
    if (!(qmax == 32767.0f || qmax == 127.0f))
        check(false, "round_i16: qmax must be 32767 or 127, got " + std::to_string(qmax));
#ifdef FLEXQUANT_X86
    if (cpu_features().avx2) return quantize_i16_avx2(x, m, k, group, xhat, qmax);
#endif
    const int64_t n_groups = (k + group - 1) / group;
    for (int64_t r = 0; r < m; ++r) {
        for (int64_t g = 0; g < n_groups; ++g) {
            const int64_t i0 = g * group, i1 = std::min<int64_t>(k, i0 + group);
            const float* xr = x + r * k;
            float amax = 0.0f;
            for (int64_t i = i0; i < i1; ++i) amax = std::max(amax, std::fabs(xr[i]));  // NaN never wins
            const float scale = amax / qmax;
            for (int64_t i = i0; i < i1; ++i) xhat[r * k + i] = round_i16(xr[i], scale, qmax);
        }
    }
}

namespace {
std::atomic<const char*> g_last_kernel{""};

// Job::xb (m, x_stride bytes) from j.xi, whose q all fit in a byte (BITPLANE_ACT_I8: |q| <= 127).
// A copy of m * 4 * n_super * 128 values per call, next to the decode's m * n * k products.
void prepare_i8(const bitplane_detail::Job& j, int8_t* xb) {
    const int64_t n_steps = 4 * j.n_super;
    for (int64_t r = 0; r < j.m; ++r)
        for (int64_t t = 0; t < n_steps; ++t) {
            const int16_t* q = j.xi + r * j.x_stride + t * 128;
            int8_t* out = xb + r * j.x_stride + t * 128;
            for (int h = 0; h < 2; ++h)
                for (int e = 0; e < 2; ++e)
                    for (int i = 0; i < 32; ++i) out[64 * h + 2 * i + e] = static_cast<int8_t>(q[64 * h + 32 * e + i]);
        }
}
}  // namespace

void bitplane_detail::note_kernel(const char* name) {
    // a load first: the tile chunks of one call all write the same name, without taking the line
    if (g_last_kernel.load(std::memory_order_relaxed) != name) g_last_kernel.store(name, std::memory_order_relaxed);
}

const char* bitplane_last_kernel() {
    return g_last_kernel.load(std::memory_order_relaxed);
}

// TileFactorsI16 (ops.h): its buffers are per-thread scratch.
bitplane_detail::TileFactorsI16::TileFactorsI16(const bitplane_detail::Job& j, float code_scale) : j_(j) {
    const int shift = j.w->max_bits - j.bits;
    smul_ = static_cast<float>(1 << shift) * code_scale;
    mmul_ = static_cast<float>(((1 << shift) - 1) / 2.0);
    const int64_t ng = j.n_groups;
    thread_local std::vector<float> f_buf;
    thread_local std::vector<double> d_buf;
    const size_t nf = static_cast<size_t>(8 * j.m * ng + 8 * j.m + 8 * ng);
    if (f_buf.size() < nf) f_buf.resize(nf);
    if (d_buf.size() < static_cast<size_t>(8 * ng)) d_buf.resize(static_cast<size_t>(8 * ng));
    swx_ = f_buf.data();
    bias_ = swx_ + 8 * j.m * ng;
    sk_ = bias_ + 8 * j.m;
    mk_ = d_buf.data();
}

void bitplane_detail::tile_factors(const Job& j, int64_t rt, float code_scale, float* sk, float* mk) {
    const int shift = j.w->max_bits - j.bits;
    const float smul = static_cast<float>(1 << shift) * code_scale;
    const float mmul = static_cast<float>(((1 << shift) - 1) / 2.0);
    const int64_t ng = j.n_groups;
    for (int g = 0; g < 8; ++g) {
        const int64_t n = rt * 8 + g;
        if (n >= j.w->n) {
            std::fill(sk + g * ng, sk + (g + 1) * ng, 0.0f);
            std::fill(mk + g * ng, mk + (g + 1) * ng, 0.0f);
            continue;
        }
        const uint16_t* qp = j.w->qparams + n * ng * 2;
        for (int64_t gr = 0; gr < ng; ++gr) {
            const float sc = fp16_to_fp32(qp[2 * gr]), mn = fp16_to_fp32(qp[2 * gr + 1]);
            sk[g * ng + gr] = sc * smul;
            mk[g * ng + gr] = mn + sc * mmul;
        }
    }
}

namespace {

// Per-row view parameters of one row tile: scale (8, n_groups) = s_k, and bias (8, m) =
// Σ_g m_k[g] Σ_{i∈g} x[r, i]. Rows past N get zeros.
void tile_params_portable(const Job& j, int64_t rt, float* scale, float* bias) {
    const int shift = j.w->max_bits - j.bits;
    const float smul = static_cast<float>(1 << shift);
    const float mmul = static_cast<float>(((1 << shift) - 1) / 2.0);
    for (int g = 0; g < 8; ++g) {
        const int64_t n = rt * 8 + g;
        float* sc = scale + g * j.n_groups;
        for (int64_t r = 0; r < j.m; ++r) bias[g * j.m + r] = 0.0f;
        if (n >= j.w->n) {
            std::fill(sc, sc + j.n_groups, 0.0f);
            continue;
        }
        const uint16_t* qp = j.w->qparams + n * j.n_groups * 2;
        for (int64_t r = 0; r < j.m; ++r) {
            double b = 0.0;
            for (int64_t gr = 0; gr < j.n_groups; ++gr) {
                const float s = fp16_to_fp32(qp[2 * gr]), mn = fp16_to_fp32(qp[2 * gr + 1]);
                if (r == 0) sc[gr] = s * smul;
                b += static_cast<double>(mn + s * mmul) * j.xsum[r * j.n_groups + gr];
            }
            bias[g * j.m + r] = static_cast<float>(b);
        }
    }
}

inline uint32_t load_u32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);  // the layout is little-endian, as is every target of this file
    return v;
}

// Portable decode. lut (m, k_pad/8, 256): lut[r][q][v] = Σ_{b: bit b of v} xp[r][8q + b], so one
// lookup adds the 8 activations a plane byte selects.
void build_luts(const float* xp, int64_t m, int64_t k_pad, int64_t x_stride, float* lut) {
    const int64_t nq = k_pad / 8;
    for (int64_t r = 0; r < m; ++r) {
        for (int64_t q = 0; q < nq; ++q) {
            const float* xv = xp + r * x_stride + q * 8;
            float* t = lut + (r * nq + q) * 256;
            t[0] = 0.0f;
            for (int v = 1; v < 256; ++v) t[v] = t[v & (v - 1)] + xv[__builtin_ctz(v)];
        }
    }
}

void decode_tiles_portable(const Job& j, const float* lut, int64_t t0, int64_t t1) {
    note_kernel("decode_portable");
    const uint64_t pb = j.w->plane_bytes;
    const int64_t nq = j.k_pad / 8;
    std::vector<float> scale(8 * j.n_groups), bias(8 * j.m), acc(8 * j.m);
    for (int64_t rt = t0; rt < t1; ++rt) {
        tile_params_portable(j, rt, scale.data(), bias.data());
        const int rows = static_cast<int>(std::min<int64_t>(8, j.w->n - rt * 8));
        std::fill(acc.begin(), acc.end(), 0.0f);
        // Super-chunk outer, row inner: the planes are read as sequential streams.
        for (int64_t s = 0; s < j.n_super; ++s) {
            const int W = super_words(j, s);
            const uint8_t* sb = j.w->planes + super_offset(j, rt, s);
            for (int g = 0; g < rows; ++g) {
                const float* sc = scale.data() + g * j.n_groups;
                const uint8_t* rb = sb + 16 * W * g;
                for (int64_t r = 0; r < j.m; ++r) {
                    const float* lr = lut + r * nq * 256;
                    float a = 0.0f;
                    for (int o = 0; o < 4 * W; ++o) {
                        const int64_t w = 16 * s + o;
                        const float* L = lr + w * 4 * 256;
                        float word = 0.0f;
                        for (int p = 0; p < j.bits; ++p) {
                            const uint32_t v = load_u32(rb + p * pb + 4 * o);
                            const float t = (L[v & 255] + L[256 + ((v >> 8) & 255)]) +
                                            (L[512 + ((v >> 16) & 255)] + L[768 + (v >> 24)]);
                            word = (word + word) + t;  // Horner over the planes, MSB first: exact doubling
                        }
                        a += sc[j.word_group[w]] * word;
                    }
                    acc[g * j.m + r] += a;
                }
            }
        }
        for (int g = 0; g < rows; ++g)
            for (int64_t r = 0; r < j.m; ++r) j.y[r * j.w->n + rt * 8 + g] = acc[g * j.m + r] + bias[g * j.m + r];
    }
}

// spread[v]: byte i = bit i of v. Adding spread[plane byte] to 8 byte codes at once (SWAR, no carry
// between bytes: codes stay <= 255) appends one plane to 8 codes.
struct SpreadTable {
    uint64_t t[256];
    SpreadTable() {
        for (int v = 0; v < 256; ++v) {
            t[v] = 0;
            for (int i = 0; i < 8; ++i) t[v] |= static_cast<uint64_t>((v >> i) & 1) << (8 * i);
        }
    }
};
const SpreadTable kSpread;

}  // namespace

void bitplane_detail::dequantize_tile(const Job& j, int64_t rt, float* rows) {
    const uint64_t pb = j.w->plane_bytes;
    const int shift = j.w->max_bits - j.bits;
    const float smul = static_cast<float>(1 << shift);
    const float mmul = static_cast<float>(((1 << shift) - 1) / 2.0);
    const int n_rows = static_cast<int>(std::min<int64_t>(8, j.w->n - rt * 8));
    std::vector<float> scale(j.n_groups), mins(j.n_groups);
    for (int g = 0; g < n_rows; ++g) {
        const uint16_t* qp = j.w->qparams + (rt * 8 + g) * j.n_groups * 2;
        for (int64_t gr = 0; gr < j.n_groups; ++gr) {
            const float s = fp16_to_fp32(qp[2 * gr]);
            scale[gr] = s * smul;
            mins[gr] = fp16_to_fp32(qp[2 * gr + 1]) + s * mmul;
        }
        float* row = rows + g * j.k_pad;
        for (int64_t s = 0; s < j.n_super; ++s) {
            const int W = super_words(j, s);
            const uint8_t* rb = j.w->planes + super_offset(j, rt, s) + 16 * W * g;
            for (int o = 0; o < 4 * W; ++o) {
                const int64_t w = 16 * s + o;
                uint64_t code[4] = {0, 0, 0, 0};  // byte i of code[q] = code of weight 8q + i
                for (int p = 0; p < j.bits; ++p) {
                    const uint32_t v = load_u32(rb + p * pb + 4 * o);
                    for (int q = 0; q < 4; ++q) code[q] = (code[q] << 1) + kSpread.t[(v >> (8 * q)) & 255];
                }
                const int gr = j.word_group[w];
                const float sk = scale[gr], mk = mins[gr];
                float* out = row + w * 32;
                for (int q = 0; q < 4; ++q)
                    for (int i = 0; i < 8; ++i) out[8 * q + i] = sk * static_cast<float>((code[q] >> (8 * i)) & 255) + mk;
            }
        }
    }
    std::fill(rows + n_rows * j.k_pad, rows + 8 * j.k_pad, 0.0f);
}

namespace {

// Portable gemm: dequantize each row of the tile (natural word order) and dot it with every x row.
void gemm_tiles_portable(const Job& j, int64_t t0, int64_t t1) {
    note_kernel("gemm_portable");
    std::vector<float> rows_buf(8 * j.k_pad);
    for (int64_t rt = t0; rt < t1; ++rt) {
        dequantize_tile(j, rt, rows_buf.data());
        const int rows = static_cast<int>(std::min<int64_t>(8, j.w->n - rt * 8));
        // The min term is inside the dequantized rows, so no bias here.
        for (int g = 0; g < rows; ++g) {
            const float* row = rows_buf.data() + g * j.k_pad;
            for (int64_t r = 0; r < j.m; ++r) {
                const float* xr = j.xp + r * j.x_stride;
                // 32 partial sums: independent chains (the adds' latency, not their count, bounds a
                // single chain); k_pad is a multiple of 128.
                float part[32] = {};
                for (int64_t i = 0; i < j.k_pad; i += 32)
                    for (int e = 0; e < 32; ++e) part[e] += row[i + e] * xr[i + e];
                for (int e = 16; e > 0; e /= 2)
                    for (int i = 0; i < e; ++i) part[i] += part[i + e];
                j.y[r * j.w->n + rt * 8 + g] = part[0];
            }
        }
    }
}

}  // namespace

int64_t bitplane_decode_max_m(BitplaneActivations act) {
    // the integer decode kernels that beat their GEMM to 6 rows and more (ops.h)
    const CpuFeatures& f = cpu_features();
    const bool fast_decode = f.avx512 || (f.avx2 && f.gfni);
    return act != BITPLANE_ACT_F32 && fast_decode ? 6 : 4;
}

uint64_t bitplane_bytes_at(const BitplaneLinear& w, int bits) {
    return static_cast<uint64_t>(bits) * w.plane_bytes + static_cast<uint64_t>(w.n) * w.n_groups() * 4;
}

void bitplane_matmul(const BitplaneLinear& w, int bits, const float* x, int64_t m, float* y, ThreadPool* pool,
                     BitplaneMatmulPath path, BitplaneActivations act) {
    const BitplaneLinear* ws[1] = {&w};
    bitplane_matmul_multi(ws, &bits, 1, x, m, &y, pool, path, act);
}

namespace {

// Runs on every call (a decode step makes ~150): the messages are built only for a failed check.
void check_view(const BitplaneLinear& w, int bits) {
    if (!(w.n > 0 && w.k > 0))
        check(false, "n and k must be positive, got n=" + std::to_string(w.n) + ", k=" + std::to_string(w.k));
    if (!(w.max_bits >= 2 && w.max_bits <= 8))
        check(false, "max_bits must be in 2..8, got " + std::to_string(w.max_bits));
    if (!(w.group_size > 0 && w.group_size % 32 == 0))
        check(false, "group_size must be a positive multiple of 32, got " + std::to_string(w.group_size));
    if (!(bits >= 2 && bits <= w.max_bits))
        check(false, "bits must be in 2.." + std::to_string(w.max_bits) + ", got " + std::to_string(bits));
    const int64_t n_pad = ceil_to(w.n, 8), k_pad = ceil_to(w.k, 128);
    if (w.plane_bytes != static_cast<uint64_t>(n_pad * k_pad / 8))
        check(false, "plane_bytes must be " + std::to_string(n_pad * k_pad / 8) + " for n=" + std::to_string(w.n) +
                         ", k=" + std::to_string(w.k) + ", got " + std::to_string(w.plane_bytes));
    check(w.planes && w.qparams, "null pointer");
}

}  // namespace

void bitplane_matmul_multi(const BitplaneLinear* const* ws, const int* bits_of, int count, const float* x, int64_t m,
                           float* const* ys, ThreadPool* pool, BitplaneMatmulPath path, BitplaneActivations act) {
    if (!(count >= 1 && ws && bits_of && ys)) check(false, "need at least one linear, got count=" + std::to_string(count));
    for (int i = 0; i < count; ++i) {
        check(ws[i] != nullptr && ys[i] != nullptr, "null pointer");
        check_view(*ws[i], bits_of[i]);
        if (!(ws[i]->k == ws[0]->k && ws[i]->group_size == ws[0]->group_size))
            check(false, "the linears of one call must share k and group_size, got k=" + std::to_string(ws[i]->k) +
                             ", group_size=" + std::to_string(ws[i]->group_size) + " after k=" +
                             std::to_string(ws[0]->k) + ", group_size=" + std::to_string(ws[0]->group_size));
    }
    const BitplaneLinear& w = *ws[0];
    const int bits = bits_of[0];
    float* y = ys[0];
    const int64_t n_pad = ceil_to(w.n, 8), k_pad = ceil_to(w.k, 128);
    check(x != nullptr, "null pointer");
    check(m >= 0, "m must be >= 0");
    if (!(act == BITPLANE_ACT_F32 || act == BITPLANE_ACT_I16 || act == BITPLANE_ACT_I8))
        check(false, "act must be F32, I16 or I8, got " + std::to_string(act));
    if (m == 0) return;

    Job j{};
    j.w = &w;
    j.bits = bits;
    j.m = m;
    j.k_pad = k_pad;
    j.n_tiles = n_pad / 8;
    j.n_super = (k_pad + 511) / 512;
    j.n_groups = w.n_groups();
    j.y = y;
    j.qmax = bitplane_act_qmax(act);

    const bool avx2 = cpu_features().avx2, gfni = cpu_features().gfni;
    if (path == BITPLANE_PATH_AUTO) path = m <= bitplane_decode_max_m(act) ? BITPLANE_PATH_DECODE : BITPLANE_PATH_GEMM;

    // int16 (or int8) activations: the integer SIMD kernels multiply q themselves; the portable ones
    // and the 128-bit fp32 GEMM run on x̂ as fp32 (the same products, each rounded to fp32)
    const bool int_act = act != BITPLANE_ACT_F32;
    const bool i16_avx512 = int_act && cpu_features().avx512;
    // (GFNI without AVX-512 VNNI exists only as a cap: no CPU with both GFNI and AVX-512 lacks VNNI)
    j.i512 = cpu_features().gfni && cpu_features().avx512vnni ? 0 : cpu_features().avx512vnni ? 1 : 2;
    const bool i16_avx2 = int_act && !i16_avx512 && avx2;
    // without AVX2: the 128-bit decode (NEON, SSE2) on int16 activations, and the 128-bit fp32 GEMM on
    // either (x̂ as fp32 on int16 ones)
    const bool i16_vec128 = int_act && !i16_avx512 && !i16_avx2 && cpu_features().vec128 &&
                            path == BITPLANE_PATH_DECODE;
    const bool gemm_vec128 = !i16_avx512 && !avx2 && cpu_features().vec128 && path == BITPLANE_PATH_GEMM;
    const bool i16_kernel = ((i16_avx512 || i16_avx2) && path == BITPLANE_PATH_DECODE) || i16_vec128;  // xi, I16 order
    const bool i16_gemm = i16_avx512 && path == BITPLANE_PATH_GEMM;
    const bool i16_gemm_avx2 = i16_avx2 && path == BITPLANE_PATH_GEMM;
    std::vector<float> xscale, xhat;
    if (int_act && !i16_avx512 && !i16_avx2 && !i16_vec128) {
        xhat.resize(static_cast<size_t>(m * w.k));
        bitplane_round_i16(x, m, w.k, w.group_size, xhat.data(), j.qmax);
        x = xhat.data();
    }

    const WordOrder order = i16_avx512 || i16_kernel ? WORD_ORDER_I16
                            : gfni                   ? WORD_ORDER_GFNI
                            : avx2                   ? WORD_ORDER_DWORD
                                                     : WORD_ORDER_NATURAL;
    const std::shared_ptr<const Layout> layout = layout_for(w.k, w.group_size, order);
    j.x_stride = order == WORD_ORDER_I16 ? j.n_super * 512 : static_cast<int64_t>(layout->src.size());
    j.word_group = layout->word_group.data();
    std::vector<float> xp;
    std::vector<int16_t> xi, q_tmp;
    std::vector<int8_t> xb;
    // Σ x per row and group, for the kernels that add the min term from it: none for the int16 GEMMs
    // (their preparation keeps its own) nor the fp32 GEMMs without AVX2 (their dequantized rows hold
    // m_k), so that a kernel reading them there would fault rather than take zeros
    const bool gemm_f32_rows = path == BITPLANE_PATH_GEMM && !avx2;
    std::vector<double> xsum(static_cast<size_t>(i16_gemm || i16_gemm_avx2 || gemm_f32_rows ? 0 : m) * j.n_groups, 0.0);
    // kept per calling thread: a prompt's activations are up to tens of MiB, which a fresh vector
    // would clear (and page in) on every call
    thread_local std::vector<int32_t> xt_buf;
    std::vector<float> xst_buf;
    std::vector<double> xsumt_buf;
    if (i16_gemm || i16_gemm_avx2) {
#ifdef FLEXQUANT_X86
        const int64_t R = i16_gemm ? 16 : 8;  // activation rows per vector
        const int64_t per_pass = i16_gemm ? 3 : 2;  // blocks per pass of the micro-kernel
        // int8 activations with VNNI (AVX-512's, or AVX-VNNI for the AVX2 GEMM): the GEMM's vpdpbusd
        // variant, on quads of int8 q
#ifdef FLEXQUANT_AVXVNNI
        j.gemm_i8 = act == BITPLANE_ACT_I8 && (i16_gemm ? j.i512 <= 1 : cpu_features().avxvnni);
#else
        j.gemm_i8 = act == BITPLANE_ACT_I8 && i16_gemm && j.i512 <= 1;  // (no AVX-VNNI kernels built)
#endif
        const int64_t per_int32 = j.gemm_i8 ? 4 : 2;  // activations per int32 of xt
        j.step_base = layout->step_base.data();
        j.n_blocks = (m + R - 1) / R;
        const int64_t block_bytes = k_pad / per_int32 * 4 * R;  // (k_pad / per_int32, R) int32
        // a chunk's activations (a few MiB) stay in cache while every weight tile passes over them
        j.block_chunk = std::max<int64_t>(per_pass, (int64_t(4) << 20) / block_bytes / per_pass * per_pass);
        const std::vector<int32_t>& seg = i16_gemm ? layout->gemm_seg : layout->natural_seg;
        j.seg = seg.data();
        j.n_seg = static_cast<int64_t>(seg.size() / 3);
        int32_t* xt = aligned64(xt_buf, static_cast<size_t>(j.n_blocks * k_pad / per_int32 * R), /*zero=*/false);
        float* xst = aligned64(xst_buf, static_cast<size_t>(j.n_blocks * j.n_groups * R));
        double* xsumt = aligned64(xsumt_buf, static_cast<size_t>(j.n_blocks * j.n_groups * R));
        auto prepare = [&](int64_t b0, int64_t b1) {
            if (i16_gemm)
                prepare_i16_gemm_avx512(j, x, w.k, b0, b1, xt, xst, xsumt);
            else
                prepare_i16_gemm_avx2(j, x, w.k, b0, b1, xt, xst, xsumt);
        };
        if (pool)
            pool->parallel_for(j.n_blocks, 1, prepare);
        else
            prepare(0, j.n_blocks);
        j.xt = xt;
        j.xst = xst;
        j.xsumt = xsumt;
#endif
    } else if (i16_kernel) {
        j.step_base = layout->step_base.data();
        j.step_group = layout->step_group.data();
        j.step_uniform = layout->step_uniform.data();
        j.super_lane_const = layout->super_lane_const.data();
        xi.resize(static_cast<size_t>(m) * j.x_stride);
        q_tmp.resize(static_cast<size_t>(k_pad));
        xscale.resize(static_cast<size_t>(m * j.n_groups));
        if (i16_vec128)
            prepare_i16_portable(j, x, w.k, q_tmp.data(), xi.data(), xscale.data(), xsum.data());
#ifdef FLEXQUANT_X86
        else if (i16_avx512)
            prepare_i16_avx512(j, x, w.k, q_tmp.data(), xi.data(), xscale.data(), xsum.data());
        else
            prepare_i16_avx2(j, x, w.k, q_tmp.data(), xi.data(), xscale.data(), xsum.data());
#endif
        j.xi = xi.data();
        j.xscale = xscale.data();
        // int8 activations where the decode has vpdpbusd (AVX-512 VNNI; AVX-VNNI with the GFNI
        // kernel): its int8 variant reads them as bytes. Elsewhere the int16 kernels multiply the
        // same q (their int32 sums are the same).
        const bool vnni = i16_avx512 ? j.i512 <= 1 : i16_avx2 && gfni && cpu_features().avxvnni;
        if (act == BITPLANE_ACT_I8 && vnni) {
            xb.resize(static_cast<size_t>(m) * j.x_stride);
            prepare_i8(j, xb.data());
            j.xb = xb.data();
        }
    } else {
        xp.resize(static_cast<size_t>(m) * j.x_stride);
        permute_activations(x, m, w.k, j.x_stride, layout->src.data(), avx2 && path == BITPLANE_PATH_DECODE,
                            xp.data());
        j.xp = xp.data();
    }

    // Group sums in fp64: the min term multiplies them by m_k, which can be large next to the
    // scale term (a group far from zero), so their rounding would show in y. (The int16 kernel's
    // came from its preparation.)
    const bool no_xsum = i16_avx512 || i16_avx2 || i16_vec128 || gemm_f32_rows;
    for (int64_t r = 0; r < (no_xsum ? 0 : m); ++r)
        for (int64_t gr = 0; gr < j.n_groups; ++gr) {
            // 4 partial sums: one fp64 add chain would cost ~4 cycles per element.
            double acc[4] = {0.0, 0.0, 0.0, 0.0};
            const float* xg = x + r * w.k + gr * w.group_size;
            const int64_t len = std::min<int64_t>(w.group_size, w.k - gr * w.group_size);
            int64_t i = 0;
            for (; i + 4 <= len; i += 4)
                for (int e = 0; e < 4; ++e) acc[e] += xg[i + e];
            for (; i < len; ++i) acc[0] += xg[i];
            xsum[r * j.n_groups + gr] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        }
    j.xsum = xsum.data();

    std::vector<float> lut;
    if (!avx2 && !i16_vec128 && path == BITPLANE_PATH_DECODE) {
        lut.resize(static_cast<size_t>(m) * k_pad * 32);
        build_luts(xp.data(), m, k_pad, j.x_stride, lut.data());
    }

    // One job per linear: the activations above are shared, the weights and outputs are each one's.
    std::vector<Job> jobs(static_cast<size_t>(count), j);
    std::vector<int64_t> first(static_cast<size_t>(count) + 1, 0);  // global index of each one's tile 0
    for (int i = 0; i < count; ++i) {
        jobs[i].w = ws[i];
        jobs[i].bits = bits_of[i];
        jobs[i].n_tiles = ceil_to(ws[i]->n, 8) / 8;
        jobs[i].y = ys[i];
        first[i + 1] = first[i] + jobs[i].n_tiles;
    }
    const int64_t n_tiles = first[count];

    const int threads = pool ? pool->num_threads() : 1;
    // A few chunks per thread so that a slow thread does not hold up the call (the pool gives each
    // thread a contiguous share of them and balances by taking chunks from the back of others').
    // The decode path (small batches too): 2 per thread; prompts at most 4. Each split of a thread's
    // run costs speed (measured, SmolLM2, 2 threads, EPYC, decode tok/s at 1 / 2 / 4 chunks per
    // thread: 325 / 317 / 303 at 4 bits, 211 / 208 / 206 at 8 bits), but with 1 a thread that starts
    // late, or is preempted, delays the call by up to its whole share; with 2 the others can take
    // half of it.
    const int64_t per_thread = path == BITPLANE_PATH_DECODE ? 2 : 4;
    const int64_t grain = std::max<int64_t>(1, (n_tiles + threads * per_thread - 1) / (threads * per_thread));
    auto tiles = [&](const Job& jb, int64_t t0, int64_t t1) {
        if (i16_vec128) return decode_tiles_i16_vec128(jb, t0, t1);
#ifdef FLEXQUANT_X86
        if (path == BITPLANE_PATH_DECODE) {
            if (i16_kernel && i16_avx512) return decode_tiles_i16_avx512(jb, t0, t1);
            if (i16_kernel && gfni) return decode_tiles_i16_gfni(jb, t0, t1);
            if (i16_kernel) return decode_tiles_i16_avx2(jb, t0, t1);
            if (gfni) return decode_tiles_gfni(jb, t0, t1);
            if (avx2) return decode_tiles_avx2(jb, t0, t1);
        } else {
            if (i16_gemm) return gemm_tiles_i16_avx512(jb, t0, t1);
            if (i16_gemm_avx2) return gemm_tiles_i16_avx2(jb, t0, t1);
            if (gfni) return gemm_tiles_gfni(jb, t0, t1);
            if (avx2) return gemm_tiles_avx2(jb, t0, t1);
        }
#endif
        if (gemm_vec128) return gemm_tiles_vec128(jb, t0, t1);
        if (path == BITPLANE_PATH_DECODE)
            decode_tiles_portable(jb, lut.data(), t0, t1);
        else
            gemm_tiles_portable(jb, t0, t1);
    };
    auto body = [&](int64_t t0, int64_t t1) {  // global tiles [t0, t1): the parts of each linear's
        for (int i = 0; i < count; ++i) {
            const int64_t a = std::max(t0, first[i]), b = std::min(t1, first[i + 1]);
            if (a < b) tiles(jobs[i], a - first[i], b - first[i]);
        }
    };
    if (pool)
        pool->parallel_for(n_tiles, grain, body);
    else
        body(0, n_tiles);
}

}  // namespace flexquant

// The CPU ops of the Llama forward pass: plain C++17 on raw pointers, row-major buffers.
//
// Every buffer is contiguous and row-major with the shape given beside it; "(m, n)" means m rows
// of n elements. No op allocates its output; an op that may run in place says so. Ops that take a
// ThreadPool* run on the caller alone when it is null. Precision: fp32 storage and math unless a
// comment says otherwise (the bit-plane matmul accumulates in fp32 and its group sums in fp64).
// Invalid sizes throw std::invalid_argument naming the argument.
//
// One op per file, same stem as the CUDA kernel: bitplane_matmul.cpp (+ bitplane_matmul_avx2.cpp,
// the AVX2/GFNI kernels), rms_norm.cpp, rope.cpp, attention.cpp, swiglu.cpp, sampling.cpp;
// quantize_activations.cpp is the CPU twin of the activation preparation in bitplane_matmul.cu;
// nested_gptq.cpp is the converter's (no kernel runs it).
// SIMD kernels are picked at run time (cpu_features.h); every op also has a portable path. Results
// do not depend on the thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "fp16.h"

namespace flexquant {

class ThreadPool;

// ---- bit-plane matmul (bitplane_matmul.cpp) ---------------------------------------------------

// A non-owning view of one bit-plane linear of N outputs x K inputs (docs/format.md). The planes
// must hold at least as many planes as the bit-width asked for; only those are read.
struct BitplaneLinear {
    const uint8_t* planes = nullptr;    // (max_bits, plane_bytes) tc8x512, plane 0 = MSB
    uint64_t plane_bytes = 0;           // ceil(n/8)*8 * ceil(k/128)*128 / 8
    const uint16_t* qparams = nullptr;  // (n, n_groups, 2) fp16 (scale, min) of the max_bits code
    int64_t n = 0;                      // output rows N
    int64_t k = 0;                      // inputs K
    int max_bits = 8;                   // B, 2..8
    int group_size = 128;               // G, a positive multiple of 32

    int64_t n_groups() const { return (k + group_size - 1) / group_size; }
};

// Which kernel family bitplane_matmul uses. AUTO picks DECODE for m <= bitplane_decode_max_m(act)
// and GEMM above it; the others force one (tests, benchmarks).
enum BitplaneMatmulPath {
    BITPLANE_PATH_AUTO = 0,
    BITPLANE_PATH_DECODE = 1,  // bit-serial straight from the planes, re-read per activation row
    BITPLANE_PATH_GEMM = 2,    // decode 8 rows once (to fp32, or to int16 codes for the AVX-512
                               // int16 GEMM), then a micro-kernel over all the activation rows
};

// The activations bitplane_matmul multiplies with. F32: x as given. I16: x rounded per row and per
// weight group to symmetric int16, x̂ = s · q, s = absmax_g(x) / 32767, q = rint(x / s) (fp32 ops,
// round half to even, as quantize_activations): y is then x̂ · W_kᵀ (the min term uses Σ x̂ too).
// Every kernel computes that; the SIMD decode and GEMM kernels (AVX-512 VNNI, AVX2) multiply q by
// the integer codes exactly (vpdpwssd, vpmaddwd) instead of converting every code to fp32, which is
// what makes them faster; the portable ones multiply x̂ in fp32. The rounding is 2^-16 of a group's
// largest |x|: below the fp16 KV cache's (docs/kernels.md). I8: the same with s = absmax_g(x) / 127
// (quantize_activations' 8-bit rounding for finite x, which the engine's activation bits 8 ask for), on
// the same kernels; with AVX-512 VNNI the decode and the GEMM, with AVX-VNNI the GFNI decode and the
// AVX2 GEMM multiply the u8 codes by the s8 q with vpdpbusd (4 products per int32 lane where vpdpwssd
// adds 2), giving the same exact int32 sums.
enum BitplaneActivations {
    BITPLANE_ACT_F32 = 0,
    BITPLANE_ACT_I16 = 1,
    BITPLANE_ACT_I8 = 2,
};
// The largest code of an integer activation type: 32767 (I16) or 127 (I8).
inline float bitplane_act_qmax(BitplaneActivations act) {
    return act == BITPLANE_ACT_I8 ? 127.0f : 32767.0f;
}

// The built-in rule's crossover (no kernel table): the decode kernels up to this many activation
// rows, the GEMM above, for the kernels that run now (cpu_features(), caps included) on these
// activations. 6 where the integer decode is AVX-512 or AVX2 + GFNI (int16 or int8 activations),
// else 4. Measured (flexquant-rt tune, SmolLM2 shapes, 1 and 2 threads, every bit-width; stop 34):
// those crossovers are 6-14 rows with AVX-512 and 9-13 with AVX2 + GFNI (int8: 5-12, the 5 once, on
// the smallest shape), and the decode also wins at 6 rows on 4096 x 4096 and 11008 x 4096; on fp32
// activations the GEMM wins from 5 rows on most shapes, and plain AVX2's are 4-9 rows, mostly 5.
int64_t bitplane_decode_max_m(BitplaneActivations act);

// y (m, n) = x (m, k) . W_bitsᵀ, W_bits the `bits`-bit view (2 <= bits <= max_bits):
//   y[r, n] = Σ_g s_k[n,g] Σ_{i∈g} c_k[n,i] x[r,i] + m_k[n,g] Σ_{i∈g} x[r,i]
// reading only the first `bits` planes and the qparams. Scratch is allocated per call (x permuted
// to the plane layout's order: m * (ceil(k/128)*128 + 256) floats at most, plus a lookup table on
// the portable decode path; with BITPLANE_ACT_I16 also x̂, m * k floats, or instead of both
// m * ceil(k/512)*512 int16 on the int16 decode kernels). The int16 GEMMs (AVX-512, AVX2) keep
// their activations, R * ceil(m/R) * ceil(k/128)*128 int16 (R = 16 or 8 rows per vector), in a
// buffer per calling thread that grows and is kept (a 2,048-token prompt of K = 14,336: 59 MB), plus
// 3 * R * ceil(m/R) * n_groups floats per call. Threads split the row tiles of 8 outputs. Throws
// std::invalid_argument on an inconsistent view (plane_bytes, group_size, bits).
void bitplane_matmul(const BitplaneLinear& w, int bits, const float* x, int64_t m, float* y, ThreadPool* pool,
                     BitplaneMatmulPath path = BITPLANE_PATH_AUTO, BitplaneActivations act = BITPLANE_ACT_F32);

// The same for `count` linears that read the same x (q, k and v; gate and up): ys[i] (m, ws[i]->n) =
// x · W_i,bits[i]ᵀ, exactly what one bitplane_matmul per linear gives. The activations are prepared
// once and one parallel_for runs every linear's tiles; for a decode step's small linears those are
// a large part of a call. The linears must share k and group_size.
void bitplane_matmul_multi(const BitplaneLinear* const* ws, const int* bits, int count, const float* x, int64_t m,
                           float* const* ys, ThreadPool* pool, BitplaneMatmulPath path = BITPLANE_PATH_AUTO,
                           BitplaneActivations act = BITPLANE_ACT_F32);

// The kernel the last bitplane_matmul call ran, on any thread: "<path>_<kernel>", e.g. "decode_i16_vec128"
// or "gemm_i16_avx512_vnni" (bitplane_detail::note_kernel). Each kernel records its own name as it
// runs, so tests can tell which family and compilation the dispatch picked.
const char* bitplane_last_kernel();

// xhat (m, k) = x̂, the int16 rounding of x (m, k) per row and group of `group` columns that
// bitplane_matmul multiplies with BITPLANE_ACT_I16 (non-finite elements kept as they are); with
// qmax = 127, BITPLANE_ACT_I8's. xhat may equal x.
void bitplane_round_i16(const float* x, int64_t m, int64_t k, int group, float* xhat, float qmax = 32767.0f);

// Bytes the k-bit product reads from the weight: bits * plane_bytes + n * n_groups * 4.
uint64_t bitplane_bytes_at(const BitplaneLinear& w, int bits);

// ---- quantize_activations (quantize_activations.cpp) ------------------------------------------

// out (m, k) = x (m, k) quantized to symmetric `bits`-bit integers per row and per group of `group`
// columns (scale = absmax / (2^(bits-1) - 1), round half to even), dequantized back to fp32: the
// activations the CUDA tensor-core GEMV runs on (bits = 8). bits = 16: each element rounded to fp16
// (to nearest even, saturating at ±65504; NaN stays NaN) and back, the activations of the CUDA f16
// GEMV (MMA_A16). out may equal x.
// bits in 2..8 or 16.
void quantize_activations(const float* x, int64_t m, int64_t k, int group, int bits, float* out);

// ---- nested_gptq (nested_gptq.cpp) -------------------------------------------------------------

// One block of b columns of view-aware GPTQ (the converter's quantizer, python/flexquant_rt/
// nested_gptq.py): for each row and column in order, the max_bits-bit code that minimises
// Σ_v lambda[v] (w_v − q_v(code))² over the views k_v = views[v] (q_v: the k_v-bit view, the top
// k_v bits at their interval's midpoint, with the row's (scale, min) of the column's group), then
// each view's error, divided by u[j,j], is propagated to the block's later columns through row j
// of u. w (n_views, n, b) holds each view's targets and is updated in place; codes (n, b) and
// err (n_views, n, b) (the scaled errors, for the caller's update of the later blocks) are written.
// scale, min (n, n_groups); group_of (b,) the group of each column; u (b, b) upper triangular with
// a positive diagonal (float64). Rows run in parallel on `pool` (may be null).
void nested_gptq_block(float* w, const double* u, const float* scale, const float* min, int64_t n_groups,
                       const int32_t* group_of, const int32_t* views, const double* lambda, int n_views,
                       int max_bits, int64_t n, int b, uint8_t* codes, float* err, ThreadPool* pool);

// ---- rms_norm (rms_norm.cpp) -------------------------------------------------------------------

// y (m, d) = x * w / sqrt(mean(x^2) + eps) per row, as transformers' LlamaRMSNorm in fp32:
// (x * rsqrt(mean + eps)) * w. y may equal x (in place).
void rms_norm(const float* x, const float* w /*(d)*/, int64_t m, int64_t d, float eps, float* y);

// ---- rope (rope.cpp) ----------------------------------------------------------------------------

enum RopeScalingType {
    ROPE_SCALING_NONE = 0,
    ROPE_SCALING_LINEAR = 1,  // inv_freq / factor (= positions / factor)
    ROPE_SCALING_LLAMA3 = 2,  // Llama 3.1: wavelength-dependent, see rope.cpp
};

struct RopeParams {
    int head_dim = 64;  // even
    float theta = 10000.0f;
    RopeScalingType scaling = ROPE_SCALING_NONE;
    float factor = 1.0f;                   // linear, llama3
    float low_freq_factor = 1.0f;          // llama3
    float high_freq_factor = 4.0f;         // llama3
    int64_t original_max_position = 8192;  // llama3: original_max_position_embeddings
};

// The per-model RoPE frequencies, computed once.
struct Rope {
    int head_dim = 0;
    std::vector<float> inv_freq;  // (head_dim / 2), fp32 exactly as transformers computes it
};

Rope rope_init(const RopeParams& p);

// Rotate-half RoPE (Hugging Face Llama order, not interleaved), in place:
//   x[i]       <- x[i] cos(f_i) - x[i + d/2] sin(f_i)
//   x[i + d/2] <- x[i + d/2] cos(f_i) + x[i] sin(f_i),    f_i = pos * inv_freq[i], i < d/2
// on q (m, n_heads, head_dim) and k (m, n_kv_heads, head_dim) at positions (m). k may be null.
// The angle is the fp32 product (as transformers), its cos/sin are correctly rounded fp32.
void rope_(const Rope& rope, float* q, int64_t n_heads, float* k, int64_t n_kv_heads, const int64_t* positions,
           int64_t m);

// The same in two steps, so that a forward pass computes the angles once for all its layers:
// cos, sin (m, head_dim / 2) for the positions (m), then the rotation of x (m, n_heads, head_dim).
void rope_cos_sin(const Rope& rope, const int64_t* positions, int64_t m, float* cos, float* sin);
void rope_apply_(const float* cos, const float* sin, float* x, int64_t m, int64_t n_heads, int64_t head_dim);

// ---- attention (attention.cpp) ------------------------------------------------------------------

// Where a KV cache's rows lie, in elements: K[t, hk] (head_dim values) at k_cache + hk·head + t·row
// (V the same).
//  - token-major (t_max, n_kv_heads, head_dim): row = n_kv_heads·head_dim, head = head_dim;
//  - head-major (n_kv_heads, t_cap, head_dim), the engine's: row = head_dim, head = t_cap·head_dim.
//    A KV head's rows are then one sequential stream, which a decode step reads 1.7-1.8x faster
//    than the token-major cache's strided rows (SmolLM2's shapes, 4K-8K positions, fp16 cache, 2
//    threads: 36-38 against 20-21 GB/s, docs/kernels.md): the hardware prefetchers follow it.
struct KvStrides {
    int64_t row, head;
    static KvStrides token_major(int64_t n_kv_heads, int64_t head_dim) { return {n_kv_heads * head_dim, head_dim}; }
    static KvStrides head_major(int64_t t_cap, int64_t head_dim) { return {head_dim, t_cap * head_dim}; }
};

// Causal grouped-query attention of m new tokens at positions [p0, p0 + m), whose keys and values
// are already in the cache at those positions:
//   out[i, h] = Σ_{t <= p0+i} softmax_t(q[i,h] · K[t, h/(H/Hkv)] / sqrt(d)) V[t, h/(H/Hkv)]
// q (m, n_heads, head_dim); k_cache, v_cache: rows t < p0 + m of n_kv_heads heads at `kv`;
// out (m, n_heads, head_dim). fp32 math, softmax with max subtraction. Threads split (token, KV
// head) pairs, and at decode the positions too (see attention.cpp).
void attention(const float* q, const float* k_cache, const float* v_cache, int64_t m, int64_t p0, int64_t n_heads,
               int64_t n_kv_heads, int64_t head_dim, KvStrides kv, float* out, ThreadPool* pool);
// The path the last attention call took, on any thread: "<path>_<kernels>", path "span" (per token,
// positions split at decode) or "prompt" (blocks of tokens against blocks of keys), kernels
// "portable", "vec128", "avx2" or "avx512" (the prompt path's tiles). Tests use it to tell which ran.
const char* attention_last_kernel();
// The same over an fp16 cache (uint16_t bit patterns, same layout), fp32 math.
void attention_f16(const float* q, const uint16_t* k_cache, const uint16_t* v_cache, int64_t m, int64_t p0,
                   int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, KvStrides kv, float* out, ThreadPool* pool);

// A q8 KV cache: int8 codes, and one fp32 scale per block of kQ8Block consecutive values of a row
// (the last block of a row may be shorter), as llama.cpp's q8_0: 36 bytes per 32 values. Blocks of
// 32 rather than one scale per row because a key row's few large channels set its scale: on SmolLM2
// one scale per 64-value row gave a next-token KL of 8.4e-4 against the fp32 cache, blocks of 32
// 4.2e-4 (keys 8.5e-4 of it alone, values 3.4e-5).
constexpr int64_t kQ8Block = 32;
inline int64_t q8_blocks(int64_t head_dim) {
    return (head_dim + kQ8Block - 1) / kQ8Block;
}

// The same over a q8 cache: the codes at `kv` as above, and the scales of row (t, hk) at
// k_scale + (hk·kv.head + t·kv.row) / head_dim · q8_blocks(head_dim) (V the same; the strides are
// multiples of head_dim): K[t, hk][e] = scale[e / kQ8Block] · code[e]. fp32 math on those values,
// except that the AVX2 decode path (head_dim a multiple of 32) rounds each query vector to int16
// (a step of max |q| / 32767) and multiplies integers.
void attention_q8(const float* q, const int8_t* k_cache, const float* k_scale, const int8_t* v_cache,
                  const float* v_scale, int64_t m, int64_t p0, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                  KvStrides kv, float* out, ThreadPool* pool);

// The q8 KV cache's rounding of x (rows, d): per block of kQ8Block values of a row, scales (rows,
// q8_blocks(d)) = max |x| / 127, and codes (rows, d) = x / scale to nearest even, within ±127 (a zero
// block: scale 0; a block with NaN or inf: scale NaN).
void quantize_rows_q8(const float* x, int64_t rows, int64_t d, int8_t* codes, float* scales);

// The fp16 KV cache's rounding of x (n): out[i] = fp32_to_fp16(x[i]) (nearest even, overflow to inf;
// F16C where the CPU has it, which may keep a NaN's payload where fp32_to_fp16 makes it 0x7e00).
void to_f16(const float* x, int64_t n, uint16_t* out);

// ---- swiglu (swiglu.cpp) ------------------------------------------------------------------------

// out (n) = silu(gate) * up, silu(g) = g / (1 + exp(-g)). out may equal gate or up.
// On AVX2 8 at a time, as g · e^g / (1 + e^g) for g < 0 (the same value; exp(-g) would overflow),
// within ~2e-7 relative of the scalar formula; each element's value does not depend on where the
// call's range starts.
void swiglu(const float* gate, const float* up, int64_t n, float* out);

// ---- sampling (sampling.cpp) ---------------------------------------------------------------------

// In place: x (n) <- softmax(x), fp32 with max subtraction (sums in fp64).
void softmax_(float* x, int64_t n);
// Index of the largest logit (the first one on ties; nan is never chosen unless all are nan).
int64_t argmax(const float* x, int64_t n);
// Entropy (nats) of softmax(logits) and the probability of its most likely token.
void entropy_and_top1(const float* logits, int64_t vocab, float* entropy, float* top1_prob);

struct SamplerParams {
    float temperature = 1.0f;         // <= 0: greedy (argmax after the repetition penalty)
    int64_t top_k = 0;                // <= 0: off
    float top_p = 1.0f;               // >= 1: off
    float min_p = 0.0f;               // <= 0: off
    float repetition_penalty = 1.0f;  // 1: off
};

// Seeded sampler: the same seed, logits and history give the same tokens on every run. The
// filters follow transformers' order and semantics: repetition penalty (logit / penalty if > 0,
// else logit * penalty, once per distinct token in the history), temperature, top-k, top-p (keep
// the smallest prefix, most likely first, whose mass reaches top_p), min-p (drop tokens below
// min_p * the top probability); then one draw from the renormalized distribution.
class Sampler {
  public:
    explicit Sampler(uint64_t seed = 0) : rng_(seed) {}
    void seed(uint64_t s) { rng_.seed(s); }
    // logits (vocab); recent (n_recent) token ids for the repetition penalty (ids outside
    // [0, vocab) are ignored).
    int64_t sample(const float* logits, int64_t vocab, const SamplerParams& p, const int32_t* recent = nullptr,
                   int64_t n_recent = 0);

  private:
    std::mt19937_64 rng_;
    std::vector<float> work_;
    std::vector<int32_t> ids_;
    std::vector<float> probs_;  // exp(l / T - max / T) per token
};

// ---- internals shared between the op files ---------------------------------------------------------

namespace ops_detail {
// out (n) = exp(x * scale - shift), each x * scale - shift <= 0 expected (NaN and < -87.3 give 0);
// returns Σ out in fp64. out may equal x. AVX2-vectorized where available (sampling.cpp): the
// softmaxes over the vocab and over the attention scores.
double exp_scaled(const float* x, int64_t n, float scale, float shift, float* out);
}  // namespace ops_detail

// ---- internals shared by bitplane_matmul.cpp and bitplane_matmul_avx2.cpp --------------------------

namespace bitplane_detail {

// Order of the 32 activations of one stored word in the permuted activation buffer.
enum WordOrder {
    WORD_ORDER_NATURAL = 0,  // slot b <- K base + b (portable kernels: bit b is slot b)
    WORD_ORDER_DWORD = 1,    // slot 8q + l <- K base + 4l + q: the AVX2 kernels read a word's 32 byte
                             // codes as 8 dwords and take byte q of each at once
    WORD_ORDER_GFNI = 2,     // words in batches of 8 (a super-chunk row's words 0-7 and 8-15, where
                             // present) laid out as the GFNI transpose emits them, see
                             // bitplane_matmul_avx2.cpp; the other words (the 4 last ones of a short
                             // last super-chunk) in DWORD order, and again after k_pad in the order
                             // of the kernel that decodes them for two rows at once
    WORD_ORDER_I16 = 3,      // the int16 activations of the decode kernels on int16 activations (AVX-512,
                             // AVX2 and vec128; x_stride = n_super * 512):
                             // per super-chunk s and step v = 0..3, 128 slots 64h + 32e + 8L + i <-
                             // bit 16h + 2i + e of word 4L + v of the row's words (zero slots where a
                             // short super-chunk has no such word); built from the step tables below
};

// bitplane_last_kernel()'s record: each kernel entry calls it with its own name (a string literal).
void note_kernel(const char* name);

// f(std::integral_constant<int, bits>) for bits in 2..8 (8 above): the kernels are templates on the
// bit-width, instantiated once per width.
template <typename F>
inline void with_bits(int bits, F&& f) {
    switch (bits) {
        case 2: return f(std::integral_constant<int, 2>{});
        case 3: return f(std::integral_constant<int, 3>{});
        case 4: return f(std::integral_constant<int, 4>{});
        case 5: return f(std::integral_constant<int, 5>{});
        case 6: return f(std::integral_constant<int, 6>{});
        case 7: return f(std::integral_constant<int, 7>{});
        default: return f(std::integral_constant<int, 8>{});
    }
}

// One linear's job in a call: its weights, bit-width, tiles and output (w, bits, n_tiles, y), and the
// call's shared geometry and activations in the order the kernel reads them (the same in every job of
// a bitplane_matmul_multi call, whose linears share k and group_size).
struct Job {
    const BitplaneLinear* w;
    int bits;
    int64_t m;
    int64_t k_pad, n_tiles, n_super, n_groups;
    const float* xp;            // (m, x_stride) activations permuted to the stored word order (zero padded)
    int64_t x_stride;           // k_pad, + 256 in WORD_ORDER_GFNI when the last super-chunk is short
    const double* xsum;         // (m, n_groups) Σ_{i∈g} x[r, i]
    const int32_t* word_group;  // (k_pad / 32) group of each stored word (clamped to n_groups - 1)
    float* y;                   // (m, n)
    // The int16 decode kernels only (WORD_ORDER_I16): step (s, v) lane L is the row's word 4L + v of
    // super-chunk s, index 16s + 4v + L of the step tables.
    const int16_t* xi;            // (m, n_super * 512) int16 activations q
    const float* xscale;          // (m, n_groups) their scales s
    // BITPLANE_ACT_I8 where the decode has vpdpbusd (AVX-512 VNNI, AVX-VNNI): xi's values as bytes,
    // for vpdpbusd against the code bytes: row r's step (s, v) at xb + r x_stride + (4s + v) 128, its
    // quarters 2h and 2h + 1 interleaved (byte 2i + e of half h = slot i of quarter 2h + e). The
    // kernels run their int8 variant where it is set; null otherwise.
    const int8_t* xb;
    float qmax;                   // the largest code q: bitplane_act_qmax of the call's activations
    const int32_t* step_base;     // (n_super * 16) K index of the word's bit 0; -1 where there is no word
    const int32_t* step_group;    // (n_super * 16) its group (lane 0's where there is no word: its codes are 0)
    const uint8_t* step_uniform;  // (n_super * 4) 1 where the 4 lanes of a step share one group
    const uint8_t* super_lane_const;  // (n_super) 1 where each lane's group is the same in all 4 steps
    // The AVX-512 int16 kernels' compilation (bitplane_matmul_avx512.cpp), chosen once per call from
    // cpu_features(): 0 GFNI + AVX-512 VNNI, 1 VNNI alone, 2 neither.
    int i512;
    // The int16 GEMMs only (gemm_tiles_i16_*): the activations of R rows at a time (R = 16 on
    // AVX-512, 8 on AVX2) as the pairs of int16 that the weights' pairs of codes multiply:
    // xt[b][pair][lane] = pair `pair` of row R b + lane (zeros past m). The pairs are the K pairs
    // (2p, 2p + 1) on AVX2. On AVX-512 they follow the words in the order (s, v, L < W) of the step
    // tables, pos = 16 s + v W + L (the missing lanes of a short super-chunk left out), 16 pairs per
    // word, in the order word_permutation() gives a word's 32 values (bitplane_matmul_avx512.cpp).
    const int32_t* xt;      // (n_blocks, k_pad / 2, R) pairs of int16 q; with gemm_i8 (n_blocks, k_pad / 4, R)
                            // quads of int8 q in the same order: K quads (4p .. 4p + 3) on AVX2, and on
                            // AVX-512 8 per word, bytes 4t .. 4t + 3 of its 32 permuted values
    bool gemm_i8;           // BITPLANE_ACT_I8 with VNNI (AVX-512, or AVX-VNNI for the AVX2 GEMM): the GEMM's
                            // vpdpbusd variant (xt in quads)
    const float* xst;       // (n_blocks, n_groups, R) their scales s (0 past m)
    const double* xsumt;    // (n_blocks, n_groups, R) Σ x̂ per group (0 past m)
    int64_t n_blocks;       // ceil(m / R)
    int64_t block_chunk;    // blocks that share one decode of a weight tile (their xt stays in cache)
    const int32_t* seg;     // (n_seg, 3) runs of words (32 K, in xt's order) of one group: first
    int64_t n_seg;          // word, count (<= 8), group
};

// Byte offset, inside one plane, of row tile rt's super-chunk s; row g's words then start at
// + 16 * W * g with W = words per lane of s (4 except in a short last super-chunk).
inline uint64_t super_offset(const Job& j, int64_t rt, int64_t s) {
    return static_cast<uint64_t>(rt) * j.k_pad + static_cast<uint64_t>(s) * 512;
}
inline int super_words(const Job& j, int64_t s) {
    const int64_t rest = (j.k_pad - s * 512) / 128;
    return static_cast<int>(rest < 4 ? rest : 4);
}

// The words of one activation row in WORD_ORDER_I16 (xi + r * x_stride): f(base, blk) for each step
// (s, v) and lane L, base = the K index of the word's bit 0 (-1 where a short super-chunk has no such
// word) and blk = its slots, 8 per quarter 2h + e, the quarters 32 apart. The int16 decode's
// preparations (prepare_i16_avx512, prepare_i16_avx2) fill them.
// Always inlined: it has no target of its own, so it could not inline the caller's AVX2 or AVX-512
// lambda; inlined into the caller, the lambda is inlined there.
template <typename F>
inline __attribute__((always_inline)) void for_each_i16_word(const Job& j, int16_t* row, F&& f) {
    for (int64_t s = 0; s < j.n_super; ++s)
        for (int v = 0; v < 4; ++v)
            for (int L = 0; L < 4; ++L) f(j.step_base[16 * s + 4 * v + L], row + (4 * s + v) * 128 + 8 * L);
}

// The int16 decode kernels' per-tile factors: compute (bitplane_matmul_avx2_i16.cpp, AVX2 + F16C) for the AVX2 and
// AVX-512 kernels, compute_vec128 (bitplane_matmul_vec128.cpp; the constructor in bitplane_matmul.cpp) for
// vec128's, the same values. compute(rt) fills, for row tile rt, swx (m, n_groups, 8): swx[(r n_groups + group) 8 +
// g] = s_k[g, group] · code_scale · xs[r, group] (the factor of a step's int32 sums; code_scale undoes the codes'
// own shift), and bias (m, 8): bias[8 r + g] = Σ_group m_k[g, group] Σ_{i∈group} x̂[r, i] (fp64 sums); zeros for
// rows g past N. One per call of a decode_tiles_* on its thread: the buffers are per-thread scratch.
class TileFactorsI16 {
  public:
    TileFactorsI16(const Job& j, float code_scale);
    void compute(int64_t rt);           // AVX2 + F16C (x86 only)
    void compute_vec128(int64_t rt);    // the same factors on 128-bit vectors (any target)
    const float* bias() const { return bias_; }
    // the factors of activation row r and tile row g: its group gr's at [8 gr]
    const float* row(int64_t r, int g) const { return swx_ + r * j_.n_groups * 8 + g; }

  private:
    const Job& j_;
    float smul_, mmul_;
    float* swx_;
    float* bias_;
    float* sk_;   // (n_groups, 8) the tile's s_k · 2^shift · code_scale
    double* mk_;  // (n_groups, 8) and m_k
};

// rows (8, k_pad) = the k-bit view of tile rt's 8 weight rows in fp32, s_k c_k + m_k in WORD_ORDER_NATURAL
// (zeros for rows past N; past k, m_k: the activations are zero there), in scalar code: the portable
// GEMM's (bitplane_matmul.cpp). gemm_tiles_vec128 makes the same values from its bit transpose.
void dequantize_tile(const Job& j, int64_t rt, float* rows);

// bitplane_matmul_vec128.cpp: decode on int16 activations for CPUs without AVX2 (NEON on AArch64,
// SSE2 on x86-64; the same xi, xscale, xsum and step tables as decode_tiles_i16_avx512), and its
// scalar preparation, as prepare_i16_avx512.
void decode_tiles_i16_vec128(const Job& j, int64_t t0, int64_t t1);
void prepare_i16_portable(const Job& j, const float* x, int64_t k, int16_t* q_tmp, int16_t* xi, float* xscale,
                          double* xsum);
// Its GEMM (prompts), on either activations (x̂ as fp32 on int16 ones): each tile's rows dequantized
// (dequantize_tile's values) against xp (WORD_ORDER_NATURAL), register-blocked in fp32 vectors.
void gemm_tiles_vec128(const Job& j, int64_t t0, int64_t t1);

// The int16 GEMMs' per-tile factors (bitplane_matmul.cpp): sk (8, n_groups) = s_k · code_scale (the
// codes' own scale: 2^(k-8) for codes shifted left by 8 - k, else 1; exact), mk (8, n_groups) = m_k;
// zeros for rows past N.
void tile_factors(const Job& j, int64_t rt, float code_scale, float* sk, float* mk);

// AVX2 kernels over row tiles [t0, t1) (bitplane_matmul_avx2.cpp); the caller has checked the CPU.
void decode_tiles_avx2(const Job& j, int64_t t0, int64_t t1);  // xp in WORD_ORDER_DWORD, scaled
void gemm_tiles_avx2(const Job& j, int64_t t0, int64_t t1);    // xp in WORD_ORDER_DWORD
void decode_tiles_gfni(const Job& j, int64_t t0, int64_t t1);  // xp in WORD_ORDER_GFNI, scaled
void gemm_tiles_gfni(const Job& j, int64_t t0, int64_t t1);    // xp in WORD_ORDER_GFNI
// One element of BITPLANE_ACT_I16's rounding, given its group's scale s = absmax / qmax (32767; 127
// for BITPLANE_ACT_I8): q_i16 its code, round_i16 x̂ = s q. The scalar loops (bitplane_round_i16,
// prepare_i16_portable) and the vector kernels' tails use these, the vector bodies the same ops. NaN
// and inf stay in x̂: a non-finite input must show in y.
inline float q_i16(float x, float s, float qmax = 32767.0f) {  // the code q of x at scale s (0 where s is 0)
    return s > 0.0f ? std::min(qmax, std::max(-qmax, std::nearbyint(x / s))) : 0.0f;
}
inline float round_i16(float x, float s, float qmax = 32767.0f) {
    return std::isfinite(x) ? s * q_i16(x, s, qmax) : x;
}
// x̂ (m, k): BITPLANE_ACT_I16's rounding of x (m, k) per row and group (qmax 32767, or 127 for I8),
// vectorized (a prompt runs it over every input of every linear); bit for bit bitplane_round_i16's
// scalar loop.
void quantize_i16_avx2(const float* x, int64_t m, int64_t k, int group, float* xhat, float qmax);
// The int16 GEMM on AVX2 (CPUs without AVX-512): blocks [b0, b1) of 8 rows of x (m, k) -> xt, xst,
// xsumt (as prepare_i16_gemm_avx512; natural K pairs, or quads with Job::gemm_i8), and the tiles [t0, t1).
void prepare_i16_gemm_avx2(const Job& j, const float* x, int64_t k, int64_t b0, int64_t b1, int32_t* xt, float* xst,
                           double* xsumt);
void gemm_tiles_i16_avx2(const Job& j, int64_t t0, int64_t t1);  // (and the int8 one: Job::gemm_i8)
// bitplane_matmul_avx2_i16.cpp: decode on int16 activations without AVX-512 (the same xi, xscale,
// xsum and step tables as decode_tiles_i16_avx512), by 8x8 bit transposes in shifts (AVX2) or with
// GFNI; and their preparation, as prepare_i16_avx512. quantize_row_i16_avx2: one row x (k) -> q
// (k_pad int16, natural K order, zeros past k) and per group xscale, xsum at [g * stride].
void decode_tiles_i16_avx2(const Job& j, int64_t t0, int64_t t1);
void decode_tiles_i16_gfni(const Job& j, int64_t t0, int64_t t1);
// decode_tiles_i16_gfni's variant with AVX-VNNI (builds with FLEXQUANT_AVXVNNI only); it calls it.
// Declared here, outside any target region: GCC would take a declaration inside one for another
// version of the function.
void decode_tiles_i16_gfni_vnni(const Job& j, int64_t t0, int64_t t1);
void prepare_i16_avx2(const Job& j, const float* x, int64_t k, int16_t* q_tmp, int16_t* xi, float* xscale,
                      double* xsum);
void quantize_row_i16_avx2(const float* xr, int64_t k, int64_t k_pad, int group, int64_t n_groups, int16_t* q,
                           float* xscale, double* xsum, int64_t stride, float qmax);
// bitplane_matmul_avx512.cpp: decode on int16 activations (xi, xscale and the step tables; xp
// unused), and their preparation: x (m, k) -> xi, xscale and xsum (m, n_groups) = s Σ q (fp64).
// q_tmp: k_pad int16 of scratch. The rounding is the same everywhere (bitplane_round_i16). The
// decode and GEMM run the compilation Job::i512 names (with or without GFNI and AVX-512 VNNI).
void decode_tiles_i16_avx512(const Job& j, int64_t t0, int64_t t1);
void prepare_i16_avx512(const Job& j, const float* x, int64_t k, int16_t* q_tmp, int16_t* xi, float* xscale,
                        double* xsum);
// The GEMM on int16 activations (many rows: prompts, batches): its preparation of blocks [b0, b1) of
// 16 rows, x (m, k) -> xt (every element written, zeros for rows past m; quads with Job::gemm_i8), xst,
// xsumt (zeroed by the caller), and the tiles [t0, t1).
void prepare_i16_gemm_avx512(const Job& j, const float* x, int64_t k, int64_t b0, int64_t b1, int32_t* xt,
                             float* xst, double* xsumt);
void gemm_tiles_i16_avx512(const Job& j, int64_t t0, int64_t t1);

}  // namespace bitplane_detail

}  // namespace flexquant

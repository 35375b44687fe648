// The Llama forward pass on the CPU over the bit-plane store (see flexquant/engine.h).
//
// Per layer, for T new tokens at positions [p0, p0+T):
//   h = rms_norm(x, attn_norm);  q, k, v = h Wqᵀ, h Wkᵀ, h Wvᵀ   (each at its mask's bit-width)
//   rope(q, k);  K/V cache[p0 : p0+T] = k, v
//   x += attention(q, K, V) Woᵀ
//   h = rms_norm(x, ffn_norm);   x += (silu(h Wgateᵀ) * (h Wupᵀ)) Wdownᵀ
// logits = rms_norm(x, output_norm) Wheadᵀ
// The embedding is read in place from the mapping; the linears are read in place (first k planes).
#include "flexquant/engine.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>

#include "cuda_backend.h"
#include "ops/ops.h"
#include "thread_pool.h"

namespace flexquant {

namespace {

// Error messages without iostreams: a static libstdc++ on some toolchains crashes in
// std::ostringstream inside a Python extension, and a message needs no locale.
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, const char* v) { s += v; }
template <typename T>
std::enable_if_t<std::is_arithmetic<T>::value> append(std::string& s, T v) { s += std::to_string(v); }
template <typename... A>
std::string cat(const A&... a) {
    std::string s;
    (append(s, a), ...);
    return s;
}

const char* const kLinearNames[LINEARS_PER_LAYER] = {"q", "k", "v", "o", "gate", "up", "down"};

BitplaneLinear to_op(const flexquant::BitPlaneLinear& l) {
    BitplaneLinear o;
    o.planes = l.planes;
    o.plane_bytes = l.plane_bytes;
    o.qparams = l.qparams;
    o.n = l.n;
    o.k = l.k;
    o.max_bits = l.max_bits;
    o.group_size = l.group_size;
    return o;
}

}  // namespace

struct Engine::Impl {
    std::shared_ptr<const ModelFile> model;
    const ModelConfig* cfg = nullptr;
    int64_t n_ctx = 0;
    int n_seq = 1;
    std::vector<int64_t> past;  // (n_seq): tokens in each sequence's KV cache
    KvDType kv_dtype = KvDType::KV_F32;
    CpuActivations cpu_act = CpuActivations::ACT_I16;
    // What linear j's bit-plane matmul multiplies: int8 codes where its act_bits is 8
    // (BITPLANE_ACT_I8 rounds as quantize_activations does and multiplies the codes as integers:
    // vpdpbusd on AVX-512 VNNI and AVX-VNNI; ACT_I8 engines start every linear there); where it is
    // 0, int16 codes (ACT_I16 and ACT_I8 engines) or the input as given (ACT_F32); else the input
    // already rounded as asked (quantize_activations: prerounded(j)), exactly, with nothing on top.
    BitplaneActivations matmul_act(size_t j) const {
        if (act_bits[j] == 8) return BITPLANE_ACT_I8;
        return act_bits[j] == 0 && cpu_act != CpuActivations::ACT_F32 ? BITPLANE_ACT_I16 : BITPLANE_ACT_F32;
    }
    bool prerounded(size_t j) const { return act_bits[j] != 0 && act_bits[j] != 8; }
    int bits_cap = 0;  // EngineParams::max_bits resolved
    ThreadPool pool;
    Backend backend = Backend::BACKEND_CPU;
    std::string backend_note;
#ifdef FLEXQUANT_HAVE_CUDA
    std::unique_ptr<CudaForward> gpu;  // set when the forward pass runs on the GPU
#endif

    // weights (views into the mapping)
    const void* embd = nullptr;  // (vocab, hidden) f16 or f32
    bool embd_f16 = true;
    const float* out_norm = nullptr;              // (hidden)
    std::vector<const float*> attn_norm, ffn_norm;  // n_layers x (hidden)
    std::vector<BitplaneLinear> lin;              // n_layers * 7, LinearKind order
    BitplaneLinear head;
    Rope rope;

    // precision
    std::vector<int32_t> bits;  // (n_layers, 7)
    int head_bits = 0;

    // KV cache: per layer (n_seq, n_kv_heads, n_ctx, head_dim), fp32 or fp16 bit patterns. Head-major
    // (KvStrides::head_major, ops.h): a decode step reads each KV head's rows as one stream.
    // Allocated without initialisation so untouched positions (and sequences) cost no memory.
    std::vector<std::unique_ptr<float[]>> k32, v32;
    std::vector<std::unique_ptr<uint16_t[]>> k16, v16;
    // KV_Q8: int8 codes in the same layout, and fp32 scales (n_seq, n_kv_heads, n_ctx, q8_blocks)
    std::vector<std::unique_ptr<int8_t[]>> k8, v8;
    std::vector<std::unique_ptr<float[]>> k8_scale, v8_scale;

    // in-step rules: per linear (n_layers * 7, then the LM head) a (levels, K) cost table
    bool rules = false;
    int rule_min = 0, rule_max = 0;
    double lambda = 0.0;
    std::vector<std::vector<float>> rule_cost;
    std::vector<int32_t> used;  // bits each linear ran at in the last eval
    std::vector<int32_t> act_bits;  // per linear (n_layers * 7 + 1): 0 (CPU: int16, or fp32 with ACT_F32;
                                    // CUDA: fp32), 2..8, 16 = fp16 (matmul_act)
    // kernel dispatch: the table as given, and per linear (n_layers * 7 + 1) and bits its decode_max_m
    // (-1 where the table has none: the built-in rule, bitplane_decode_max_m)
    std::vector<KernelChoice> kernel_table;
    std::vector<std::array<int64_t, 9>> decode_max;
    std::vector<float> xq;          // scratch: a linear's quantized input

    // calibration statistics: Σ_t h_i² per linear input
    bool collect = false;
    std::vector<std::vector<double>> energy;
    std::vector<int64_t> energy_n;  // rows accumulated per linear

    // outputs of the last eval
    std::vector<float> logits;
    StepSignals sig;

    // scratch, grown on demand (T = tokens of the current eval)
    std::vector<float> x, h, q, kx, vx, att, o, g, u;

    explicit Impl(int threads) : pool(threads) {}

    void check_open_bits(int b, const std::string& what) const {
        if (b < BITS_MIN || b > bits_cap) {
            throw Error(cat(what, " = ", b, " is outside ", BITS_MIN, "..", bits_cap, cap_note()));
        }
    }
    std::string cap_note() const {
        return bits_cap < cfg->max_bits ? cat(" (the engine's max_bits; the file holds ", cfg->max_bits, ")") : "";
    }
    bool on_gpu() const {
#ifdef FLEXQUANT_HAVE_CUDA
        return gpu != nullptr;
#else
        return false;
#endif
    }
    // Opens the CUDA backend or records why not (then the CPU runs the model).
    void init_backend(const EngineParams& params, bool on_gpu);

    void check_seq(int seq, const char* what) const {
        if (seq < 0 || seq >= n_seq) throw Error(cat(what, ": sequence ", seq, " is outside 0..", n_seq - 1));
    }
    void check_tokens(const int32_t* tokens, int64_t n) const;
    // Prefill or a step of one sequence: T tokens appended to sequence seq; its next-token logits
    // go to `logits` and, if asked, every position's to all_logits (T, vocab).
    void forward(int seq, const int32_t* tokens, int64_t T, float* all_logits);
    // Embeds T rows and runs every layer: row t is tokens[t] of sequence seqs[t] at position
    // pos[t]. prefill: all rows are one sequence at consecutive positions (one causal attention
    // block); else each row attends to its own sequence alone (batched decode). Leaves x (T, D).
    void layers(const int32_t* tokens, int64_t T, const int32_t* seqs, const int64_t* pos, bool prefill);
    // Element offset of K[pos] of KV head hk of sequence seq in a layer's cache (V the same).
    uint64_t kv_offset(int seq, int64_t hk, int64_t pos) const {
        return ((static_cast<uint64_t>(seq) * cfg->n_kv_heads + hk) * n_ctx + pos) * cfg->head_dim;
    }
    // The offset of the q8 scales of the row at element offset off (one per kQ8Block values).
    uint64_t q8_scale_offset(uint64_t off) const { return off / cfg->head_dim * q8_blocks(cfg->head_dim); }
    // Runs linear j (index into lin, or lin.size() for the LM head) on x (T, K) -> y (T, N) at
    // the mask's bits or, with rules, at the bits its input asks for; records them in `used`.
    void linear(size_t j, const float* x, int64_t T, float* y) { linears(j, 1, x, T, &y); }
    // Linears j0 .. j0 + count - 1 on the same input x (T, K) -> ys[i]: one bitplane_matmul_multi call
    // when they run the same way (kernel path, activations), else one call each; the same results.
    void linears(size_t j0, int count, const float* x, int64_t T, float* const* ys);
    const BitplaneLinear& lin_at(size_t j) const { return j < lin.size() ? lin[j] : head; }
    // The mask's bits of every linear, then the LM head's (n_layers * 7 + 1), as `used` orders them.
    std::vector<int32_t> mask_bits() const {
        std::vector<int32_t> b = bits;
        b.push_back(head_bits);
        return b;
    }
    uint64_t bytes_at(const std::vector<int32_t>& b) const;
};

void Engine::Impl::linears(size_t j0, int count, const float* x, int64_t T, float* const* ys) {
    int b_of[8];
    if (count < 1 || count > 8) throw Error(cat("linears: count = ", count, " must be in 1..8"));
    for (int i = 0; i < count; ++i) {
        const size_t j = j0 + i;
        const BitplaneLinear& w = lin_at(j);
        const int64_t K = w.k;
        if (collect) {
            std::vector<double>& e = energy[j];
            for (int64_t t = 0; t < T; ++t)
                for (int64_t k = 0; k < K; ++k) e[k] += static_cast<double>(x[t * K + k]) * x[t * K + k];
            energy_n[j] += T;
        }
        int b = j < lin.size() ? bits[j] : head_bits;
        if (rules) {
            // predicted loss of each level: one pass over the input energy per level (levels * K
            // flops: under 1.5% of the N * K matrix-vector product for N >= 500)
            const int levels = rule_max - rule_min + 1;
            const float* cost = rule_cost[j].data();
            int best_all = rule_min;
            for (int64_t t = 0; t < T; ++t) {
                const float* h = x + t * K;
                double best = 0.0;
                int best_k = rule_min;
                for (int l = 0; l < levels; ++l) {
                    const float* c = cost + static_cast<int64_t>(l) * K;
                    double acc = 0.0;
                    for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(c[k]) * h[k] * h[k];
                    const double total =
                        acc + lambda * static_cast<double>(w.n) * static_cast<double>(w.k) * (rule_min + l);
                    if (l == 0 || total < best) {
                        best = total;
                        best_k = rule_min + l;
                    }
                }
                best_all = std::max(best_all, best_k);
            }
            b = best_all;
        }
        used[j] = b;
        b_of[i] = b;
    }
    auto path_of = [&](int i) {
        // < 0: the built-in rule, for the kernels and activations of this call (either may have
        // changed since the table was set)
        const int64_t dmax = decode_max[j0 + i][b_of[i]];
        const int64_t lim = dmax >= 0 ? dmax : bitplane_decode_max_m(matmul_act(j0 + i));
        return T <= lim ? BITPLANE_PATH_DECODE : BITPLANE_PATH_GEMM;
    };
    bool together = count > 1;
    for (int i = 0; i < count && together; ++i)
        together = !prerounded(j0 + i) && path_of(i) == path_of(0) && matmul_act(j0 + i) == matmul_act(j0) &&
                   lin_at(j0 + i).k == lin_at(j0).k && lin_at(j0 + i).group_size == lin_at(j0).group_size;
    if (together) {
        const BitplaneLinear* ws[8];
        for (int i = 0; i < count; ++i) ws[i] = &lin_at(j0 + i);
        bitplane_matmul_multi(ws, b_of, count, x, T, ys, &pool, path_of(0), matmul_act(j0));
        return;
    }
    for (int i = 0; i < count; ++i) {
        const size_t j = j0 + i;
        const BitplaneLinear& w = lin_at(j);
        const float* xi = x;
        if (prerounded(j)) {
            if (xq.size() < static_cast<size_t>(T * w.k)) xq.resize(static_cast<size_t>(T * w.k));
            quantize_activations(x, T, w.k, w.group_size, act_bits[j], xq.data());
            xi = xq.data();
        }
        bitplane_matmul(w, b_of[i], xi, T, ys[i], &pool, path_of(i), matmul_act(j));
    }
}

uint64_t Engine::Impl::bytes_at(const std::vector<int32_t>& b) const {
    uint64_t total = 0;
    for (size_t i = 0; i < lin.size(); ++i) total += bitplane_bytes_at(lin[i], b[i]);
    total += bitplane_bytes_at(head, b[lin.size()]);
    total += static_cast<uint64_t>(cfg->hidden) * (embd_f16 ? 2 : 4);
    total += static_cast<uint64_t>(2 * cfg->n_layers + 1) * cfg->hidden * 4;
    return total;
}

namespace {

// Whether the engine runs on the GPU: CUDA or auto asked for, a CUDA build and a device present.
bool gpu_backend_wanted(const EngineParams& params) {
#ifdef FLEXQUANT_HAVE_CUDA
    return params.backend != Backend::BACKEND_CPU && cuda_device_count() > 0;
#else
    (void)params;
    return false;
#endif
}

}  // namespace

Engine::Engine(std::shared_ptr<const ModelFile> model, const EngineParams& params)
    : impl_(new Impl(params.n_threads)) {
    Impl& e = *impl_;
    if (!model) throw Error("Engine: null model");
    e.model = std::move(model);
    e.cfg = &e.model->config();
    const ModelConfig& c = *e.cfg;
    // Where the engine runs is decided once, here: KV_AUTO and init_backend both follow it.
    // KV_AUTO: fp32 on the GPU, fp16 on the CPU.
    const bool on_gpu = gpu_backend_wanted(params);
    e.kv_dtype = params.kv_dtype != KvDType::KV_AUTO ? params.kv_dtype
                 : on_gpu                          ? KvDType::KV_F32
                                                   : KvDType::KV_F16;
    if (e.kv_dtype != KvDType::KV_F32 && e.kv_dtype != KvDType::KV_F16 && e.kv_dtype != KvDType::KV_Q8)
        throw Error(cat("kv_dtype = ", static_cast<int>(params.kv_dtype), " is not KV_AUTO, KV_F32, KV_F16 or KV_Q8"));
    if (on_gpu && e.kv_dtype == KvDType::KV_Q8)
        throw Error("kv_dtype q8: the CUDA backend has no int8 KV cache; use f16 or f32 there, or the CPU backend");
    if (params.cpu_activations != CpuActivations::ACT_I16 && params.cpu_activations != CpuActivations::ACT_F32 &&
        params.cpu_activations != CpuActivations::ACT_I8)
        throw Error(cat("cpu_activations = ", static_cast<int>(params.cpu_activations),
                        " is not ACT_I16, ACT_F32 or ACT_I8"));
    e.cpu_act = params.cpu_activations;

    // bytes of one KV head's row (a q8 row: its codes and its scale)
    const uint64_t row_bytes = e.kv_dtype == KvDType::KV_Q8   ? c.head_dim + 4 * q8_blocks(c.head_dim)
                               : e.kv_dtype == KvDType::KV_F16 ? 2 * c.head_dim
                                                               : 4 * c.head_dim;
    const uint64_t per_token = 2ull * c.n_layers * c.n_kv_heads * row_bytes;
    if (params.n_ctx < 0) throw Error("n_ctx = " + std::to_string(params.n_ctx) + " must be >= 0");
    if (params.n_seq < 1 || params.n_seq > 4096) throw Error(cat("n_seq = ", params.n_seq, " is outside 1..4096"));
    if (params.cuda_gemm_min_rows < 0)
        throw Error(cat("cuda_gemm_min_rows = ", params.cuda_gemm_min_rows, " must be >= 0 (0: never use the GEMM)"));
    if (params.cuda_mma_min_rows < 0 || params.cuda_mma_min_rows > 16)
        throw Error(cat("cuda_mma_min_rows = ", params.cuda_mma_min_rows,
                        " must be in 0..16 (0: never use the MMA GEMV; one launch of it takes up to 16 rows)"));
    e.n_seq = params.n_seq;
    e.past.assign(e.n_seq, 0);
    if (params.n_ctx > 0) {
        e.n_ctx = params.n_ctx;
    } else {
        const uint64_t per_seq = params.kv_budget_bytes / static_cast<uint64_t>(e.n_seq);
        const int64_t cap = static_cast<int64_t>(std::max<uint64_t>(1, per_seq / per_token));
        e.n_ctx = std::min<int64_t>(c.context_length, cap);
    }
    if (e.n_ctx > (int64_t(1) << 24)) throw Error("n_ctx = " + std::to_string(e.n_ctx) + " is too large");

    const TensorView& emb = e.model->tensor("token_embd.weight");
    e.embd = emb.data;
    e.embd_f16 = emb.dtype == DType::DTYPE_F16;
    e.out_norm = static_cast<const float*>(e.model->tensor("output_norm.weight").data);
    for (int64_t l = 0; l < c.n_layers; ++l) {
        e.attn_norm.push_back(static_cast<const float*>(
            e.model->tensor("blk." + std::to_string(l) + ".attn_norm.weight").data));
        e.ffn_norm.push_back(static_cast<const float*>(
            e.model->tensor("blk." + std::to_string(l) + ".ffn_norm.weight").data));
        for (int kind = 0; kind < LINEARS_PER_LAYER; ++kind)
            e.lin.push_back(to_op(e.model->linear(l, static_cast<LinearKind>(kind))));
    }
    e.head = to_op(e.model->lm_head());

    RopeParams rp;
    rp.head_dim = static_cast<int>(c.head_dim);
    rp.theta = c.rope_theta;
    switch (c.rope_scaling.type) {
        case RopeScaling::Type::ROPE_SCALING_NONE: rp.scaling = ROPE_SCALING_NONE; break;
        case RopeScaling::Type::ROPE_SCALING_LINEAR: rp.scaling = ROPE_SCALING_LINEAR; break;
        case RopeScaling::Type::ROPE_SCALING_LLAMA3: rp.scaling = ROPE_SCALING_LLAMA3; break;
    }
    rp.factor = c.rope_scaling.factor;
    rp.low_freq_factor = c.rope_scaling.low_freq_factor;
    rp.high_freq_factor = c.rope_scaling.high_freq_factor;
    rp.original_max_position = c.rope_scaling.original_context_length;
    if (c.head_dim % 2) throw Error("head_dim = " + std::to_string(c.head_dim) + " must be even for RoPE");
    e.rope = rope_init(rp);

    if (params.max_bits != 0 && (params.max_bits < BITS_MIN || params.max_bits > c.max_bits))
        throw Error(cat("max_bits = ", params.max_bits, " is outside ", BITS_MIN, "..", c.max_bits,
                        " (the file's max_bits; 0 = the file's)"));
    e.bits_cap = params.max_bits != 0 ? params.max_bits : c.max_bits;
    e.bits.assign(c.n_layers * LINEARS_PER_LAYER, e.bits_cap);
    e.head_bits = e.bits_cap;
    e.used.assign(e.lin.size() + 1, e.bits_cap);
    // ACT_I8: every decoder linear starts at int8 (8), the LM head at int16 (0, which then means
    // int16: what protect_activations keeps and calibration compares with). The head's int8 was a
    // quarter of int8's KL on SmolLM2 (8 bits: 2.46e-3 -> 1.80e-3 without it) for 1.5% of the decode
    // speed. The GPU sets its own below.
    e.act_bits.assign(e.lin.size() + 1, params.cpu_activations == CpuActivations::ACT_I8 ? 8 : 0);
    e.act_bits.back() = 0;
    std::array<int64_t, 9> dflt;
    dflt.fill(-1);  // the built-in rule (bitplane_decode_max_m)
    e.decode_max.assign(e.lin.size() + 1, dflt);

    e.init_backend(params, on_gpu);
#ifdef FLEXQUANT_HAVE_CUDA
    if (e.on_gpu()) e.act_bits = e.gpu->activation_bits();  // the GPU's GEMV: int8 (8), fp16 (16) or fp32 (0)
#endif
    if (e.on_gpu()) return;  // the KV cache lives on the GPU

    const uint64_t cache_elems = static_cast<uint64_t>(e.n_seq) * e.n_ctx * c.n_kv_heads * c.head_dim;
    for (int64_t l = 0; l < c.n_layers; ++l) {
        if (e.kv_dtype == KvDType::KV_F16) {
            e.k16.emplace_back(new uint16_t[cache_elems]);
            e.v16.emplace_back(new uint16_t[cache_elems]);
        } else if (e.kv_dtype == KvDType::KV_Q8) {
            e.k8.emplace_back(new int8_t[cache_elems]);
            e.v8.emplace_back(new int8_t[cache_elems]);
            e.k8_scale.emplace_back(new float[e.q8_scale_offset(cache_elems)]);
            e.v8_scale.emplace_back(new float[e.q8_scale_offset(cache_elems)]);
        } else {
            e.k32.emplace_back(new float[cache_elems]);
            e.v32.emplace_back(new float[cache_elems]);
        }
    }
}

void Engine::Impl::init_backend(const EngineParams& params, bool on_gpu) {
    if (!on_gpu) {
        if (params.backend == Backend::BACKEND_CUDA)
#ifdef FLEXQUANT_HAVE_CUDA
            backend_note = "backend CUDA: no CUDA device is available (no GPU or no driver); running on the CPU";
#else
            backend_note = "backend CUDA: this build has no CUDA backend (nvcc was not found when it was built); "
                           "running on the CPU";
#endif
        return;
    }
#ifdef FLEXQUANT_HAVE_CUDA
    CudaForwardParams cp;
    cp.bits_cap = bits_cap;
    cp.n_ctx = n_ctx;
    cp.n_seq = n_seq;
    cp.kv_f16 = kv_dtype == KvDType::KV_F16;
    cp.fp32_matmul = params.cuda_fp32_matmul;
    cp.use_graph = params.cuda_graph;
    cp.gemm_min_rows = params.cuda_gemm_min_rows;
    cp.mma_min_rows = params.cuda_mma_min_rows;
    std::vector<BitplaneLinear> all = lin;
    all.push_back(head);
    gpu.reset(new CudaForward(*model, all, rope.inv_freq, cp));  // throws with the reason (e.g. memory)
    backend = Backend::BACKEND_CUDA;
#endif
}

std::unique_ptr<Engine> Engine::open(const std::string& path, const EngineParams& params) {
    return std::unique_ptr<Engine>(new Engine(ModelFile::open(path), params));
}

Engine::~Engine() = default;

const ModelConfig& Engine::config() const { return *impl_->cfg; }
const std::shared_ptr<const ModelFile>& Engine::model() const { return impl_->model; }
int64_t Engine::n_ctx() const { return impl_->n_ctx; }
int64_t Engine::n_past() const { return impl_->past[0]; }
int Engine::n_seq() const { return impl_->n_seq; }
int64_t Engine::n_past_seq(int seq) const {
    impl_->check_seq(seq, "n_past_seq");
    return impl_->past[seq];
}
void Engine::reset_seq(int seq) {
    impl_->check_seq(seq, "reset_seq");
    impl_->past[seq] = 0;
}
// Every entry on its own, then the one rule across entries: the GEMV kernel (mma_min_rows) is
// chosen per linear, so the entries of one (n, k, act_bits) must agree on it. Both backends check
// the CUDA fields, so a table is valid or not wherever it is applied.
static void check_kernel_table(const std::vector<KernelChoice>& table) {
    for (size_t i = 0; i < table.size(); ++i) {
        const KernelChoice& c = table[i];
        const std::string at = cat("kernel table entry ", i, ": ");
        if (c.n <= 0 || c.k <= 0) throw Error(cat(at, "shape ", c.n, " x ", c.k, " is not positive"));
        if (c.bits < BITS_MIN || c.bits > 8) throw Error(cat(at, "bits = ", c.bits, " is outside ", BITS_MIN, "..8"));
        if (c.decode_max_m < 0) throw Error(cat(at, "decode_max_m = ", c.decode_max_m, " is negative"));
        if (c.act_bits != 0 && c.act_bits != 8 && c.act_bits != 16)
            throw Error(cat(at, "act_bits = ", c.act_bits, " is not 0, 8 or 16"));
        if (c.mma_min_rows < -1 || c.mma_min_rows > 16)
            throw Error(cat(at, "mma_min_rows = ", c.mma_min_rows, " is outside -1..16"));
        if (c.mma_min_rows >= 0 && c.act_bits != 8)
            throw Error(cat(at, "mma_min_rows = ", c.mma_min_rows, " needs act_bits 8 (it picks an int8 GEMV kernel), got ",
                            c.act_bits));
        if (!c.gemm.empty()) {
            const int family = c.gemm == "a8" || c.gemm == "a8_wg" ? 8 : c.gemm == "a16" ? 16 : 0;
            if (family == 0)
                throw Error(cat(at, "gemm = '", c.gemm, "' is not one of 'a8', 'a8_wg', 'a16' (or '' for the default)"));
            if (family != c.act_bits)
                throw Error(cat(at, "gemm '", c.gemm, "' needs act_bits ", family, ", got ", c.act_bits));
        }
    }
    for (size_t i = 0; i < table.size(); ++i)
        for (size_t j = i + 1; j < table.size(); ++j) {
            const KernelChoice &a = table[i], &b = table[j];
            if (a.n == b.n && a.k == b.k && a.act_bits == b.act_bits && a.mma_min_rows != b.mma_min_rows)
                throw Error(cat("kernel table entries ", i, " and ", j, " (shape ", a.n, " x ", a.k, ", act_bits ", a.act_bits,
                                ") disagree on mma_min_rows (", a.mma_min_rows, ", ", b.mma_min_rows,
                                "): the GEMV kernel is chosen per linear, not per bit-width"));
        }
}

void Engine::set_kernel_table(const std::vector<KernelChoice>& table) {
    Impl& e = *impl_;
    check_kernel_table(table);
#ifdef FLEXQUANT_HAVE_CUDA
    if (e.gpu) e.gpu->set_kernel_table(table);  // checks what this GPU can run before it changes anything
#endif
    std::array<int64_t, 9> dflt;
    dflt.fill(-1);  // the built-in rule (bitplane_decode_max_m)
    e.decode_max.assign(e.lin.size() + 1, dflt);
    for (const KernelChoice& c : table)
        for (size_t j = 0; j <= e.lin.size(); ++j) {
            const BitplaneLinear& w = e.lin_at(j);
            if (w.n == c.n && w.k == c.k) e.decode_max[j][c.bits] = c.decode_max_m;
        }
    e.kernel_table = table;
}

std::vector<KernelChoice> Engine::kernel_table() const { return impl_->kernel_table; }

std::vector<KernelChoice> Engine::tune_kernels(int64_t max_m, int repeats) {
    Impl& e = *impl_;
    if (max_m < 1 || max_m > 256) throw Error(cat("tune_kernels: max_m = ", max_m, " is outside 1..256"));
    if (repeats < 1 || repeats > 100) throw Error(cat("tune_kernels: repeats = ", repeats, " is outside 1..100"));
#ifdef FLEXQUANT_HAVE_CUDA
    if (e.gpu) {  // the GEMV against the tensor-core GEMM (CudaForward::tune)
        std::vector<KernelChoice> table = e.gpu->tune(std::max<int64_t>(max_m, 16), repeats);
        e.kernel_table = table;  // tune() applied it already
        return table;
    }
#endif
    const size_t n_lin = e.lin.size() + 1;  // the LM head last
    // the distinct shapes, in model order, and each linear's
    std::vector<std::pair<int64_t, int64_t>> shapes;
    std::vector<size_t> shape_of(n_lin);
    int64_t max_k = 0, max_n = 0;
    for (size_t j = 0; j < n_lin; ++j) {
        const BitplaneLinear& w = e.lin_at(j);
        const auto key = std::make_pair(w.n, w.k);
        shape_of[j] = static_cast<size_t>(std::find(shapes.begin(), shapes.end(), key) - shapes.begin());
        if (shape_of[j] == shapes.size()) shapes.push_back(key);
        max_k = std::max(max_k, w.k);
        max_n = std::max(max_n, w.n);
    }
    const size_t S = shapes.size();
    // activations: any values do (the time does not depend on them); a fixed LCG, no zeros
    std::vector<float> x(static_cast<size_t>(max_m * max_k)), y(static_cast<size_t>(max_m * max_n));
    uint32_t r = 12345u;
    for (float& v : x) {
        r = r * 1664525u + 1013904223u;
        v = static_cast<float>(r >> 8) / 16777216.0f - 0.5f;
    }
    // Time each shape inside passes over every linear of the model in order, as a forward pass
    // reads them: timing one weight over and over would serve it from the cache and flatter the
    // decode kernels, which re-read the planes per row.
    auto pass = [&](int bits, int64_t m, BitplaneMatmulPath path, std::vector<double>& per_shape) {
        std::fill(per_shape.begin(), per_shape.end(), 0.0);
        for (size_t j = 0; j < n_lin; ++j) {
            const auto t0 = std::chrono::steady_clock::now();
            bitplane_matmul(e.lin_at(j), bits, x.data(), m, y.data(), &e.pool, path, e.matmul_act(j));
            per_shape[shape_of[j]] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        }
    };
    std::vector<KernelChoice> table;
    std::vector<double> t(S), best_dec(S), best_gemm(S);
    for (int bits = BITS_MIN; bits <= e.bits_cap; ++bits) {
        pass(bits, 1, BITPLANE_PATH_DECODE, t);  // warm-up
        // per shape: decode until GEMM wins at two m in a row (one win may be noise)
        std::vector<int64_t> dmax(S, max_m);
        std::vector<char> gemm_won(S, 0), done(S, 0);
        size_t n_done = 0;
        for (int64_t m = 1; m <= max_m && n_done < S; ++m) {
            std::fill(best_dec.begin(), best_dec.end(), 1e30);
            std::fill(best_gemm.begin(), best_gemm.end(), 1e30);
            for (int rep = 0; rep < repeats; ++rep) {
                pass(bits, m, BITPLANE_PATH_DECODE, t);
                for (size_t i = 0; i < S; ++i) best_dec[i] = std::min(best_dec[i], t[i]);
                pass(bits, m, BITPLANE_PATH_GEMM, t);
                for (size_t i = 0; i < S; ++i) best_gemm[i] = std::min(best_gemm[i], t[i]);
            }
            for (size_t i = 0; i < S; ++i) {
                if (done[i]) continue;
                const bool wins = best_gemm[i] < best_dec[i];
                if (wins && gemm_won[i]) {
                    dmax[i] = m - 2;
                    done[i] = 1;
                    ++n_done;
                }
                gemm_won[i] = wins;
            }
        }
        for (size_t i = 0; i < S; ++i) {
            if (!done[i] && gemm_won[i]) dmax[i] = max_m - 1;
            KernelChoice c;  // (the CUDA kernel fields keep their defaults: the CPU ignores them)
            c.n = shapes[i].first;
            c.k = shapes[i].second;
            c.bits = bits;
            c.decode_max_m = dmax[i];
            table.push_back(c);
        }
    }
    set_kernel_table(table);
    return table;
}

uint64_t Engine::bytes_per_token_at(const int32_t* bits, int64_t count) const {
    const Impl& e = *impl_;
    const int64_t want = static_cast<int64_t>(e.lin.size()) + 1;
    if (count != want) throw Error(cat("bytes_per_token_at: ", count, " bit-widths given, expected ", want,
                                       " (n_layers * 7, then the LM head)"));
    for (int64_t j = 0; j < count; ++j) e.check_open_bits(bits[j], cat("bits[", j, "]"));
    return e.bytes_at(std::vector<int32_t>(bits, bits + count));
}
int Engine::n_threads() const { return impl_->pool.num_threads(); }
Backend Engine::backend() const { return impl_->backend; }
const std::string& Engine::backend_note() const { return impl_->backend_note; }
KvDType Engine::kv_dtype() const { return impl_->kv_dtype; }
CpuActivations Engine::cpu_activations() const { return impl_->cpu_act; }
int Engine::max_bits() const { return impl_->bits_cap; }
uint64_t Engine::device_bytes() const {
#ifdef FLEXQUANT_HAVE_CUDA
    if (impl_->gpu) return impl_->gpu->device_bytes();
#endif
    return 0;
}
void Engine::set_threads(int n) {
    if (n < 0) throw Error("threads = " + std::to_string(n) + " must be >= 0 (0 = all cores)");
    impl_->pool.set_num_threads(n);
}

void Engine::set_layer_bits(const int32_t* mask, int64_t count) {
    Impl& e = *impl_;
    const int64_t L = e.cfg->n_layers;
    if (count != L && count != L * LINEARS_PER_LAYER) {
        throw Error(cat("mask has ", count, " entries; expected n_layers = ", L, " (one per layer) or n_layers * 7 = ",
                        L * LINEARS_PER_LAYER, " (q, k, v, o, gate, up, down per layer)"));
    }
    // Validate everything before changing anything: a bad mask leaves the old one in force.
    const bool per_layer = count == L;
    for (int64_t i = 0; i < count; ++i) {
        const int b = mask[i];
        if (b < BITS_MIN || b > e.bits_cap) {
            const std::string where =
                per_layer ? cat("mask[", i, "] (layer ", i, ")")
                          : cat("mask[", i / LINEARS_PER_LAYER, "][", i % LINEARS_PER_LAYER, "] (layer ",
                                i / LINEARS_PER_LAYER, ", ", kLinearNames[i % LINEARS_PER_LAYER], ")");
            throw Error(cat(where, " = ", b, " is outside ", BITS_MIN, "..", e.bits_cap, e.cap_note()));
        }
    }
    for (int64_t i = 0; i < L * LINEARS_PER_LAYER; ++i)
        e.bits[i] = per_layer ? mask[i / LINEARS_PER_LAYER] : mask[i];
}

void Engine::set_lm_head_bits(int bits) {
    impl_->check_open_bits(bits, "lm_head bits");
    impl_->head_bits = bits;
}

std::vector<int32_t> Engine::layer_bits() const { return impl_->bits; }
int Engine::lm_head_bits() const { return impl_->head_bits; }

uint64_t Engine::bytes_per_token() const {
    return impl_->bytes_at(impl_->mask_bits());
}

void Engine::set_activation_bits(const int32_t* bits, int64_t count) {
    Impl& e = *impl_;
    const int64_t n = static_cast<int64_t>(e.lin.size()) + 1;
    if (count != n && count != 1)
        throw Error(cat("activation bits: ", count, " entries; expected 1 (all linears) or n_layers * 7 + 1 = ", n));
    auto where = [&](int64_t i) {
        return count == 1 ? std::string("activation bits")
               : i == n - 1 ? std::string("activation bits[") + std::to_string(i) + "] (lm_head)"
                            : cat("activation bits[", i, "] (layer ", i / LINEARS_PER_LAYER, ", ",
                                  kLinearNames[i % LINEARS_PER_LAYER], ")");
    };
    for (int64_t i = 0; i < count; ++i) {
        const int b = bits[i];
        // the GPU's GEMV: int8 activations (binary or s8 tensor cores), fp16 (f16 tensor cores) or fp32
        if (e.on_gpu() && b != 0 && b != 8 && b != 16)
            throw Error(cat(where(i), " = ", b,
                            ": the CUDA backend runs 8 (int8, the tensor-core GEMV), 16 (fp16) or 0 (fp32); other "
                            "widths run on the CPU backend (for measurement)"));
        if (b != 0 && b != 16 && (b < 2 || b > 8))
            throw Error(cat(where(i), " = ", b, " must be 0 (the default activations), 16 (fp16) or in 2..8"));
    }
    if (e.on_gpu()) {
#ifdef FLEXQUANT_HAVE_CUDA
        std::vector<int32_t> all(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) all[static_cast<size_t>(i)] = bits[count == 1 ? 0 : i];
        e.gpu->set_activation_bits(all);  // throws for a linear that cannot take them, changing nothing
        e.act_bits = e.gpu->activation_bits();
#endif
        return;
    }
    for (int64_t i = 0; i < n; ++i) e.act_bits[i] = bits[count == 1 ? 0 : i];
}

std::vector<int32_t> Engine::activation_bits() const { return impl_->act_bits; }

void Engine::set_precision_rules(int bits_min, int bits_max, const std::vector<std::vector<float>>& cost,
                                 double lambda) {
    Impl& e = *impl_;
    if (e.on_gpu())
        throw Error("precision rules run on the CPU backend only; open the engine with backend CPU to use them");
    const int B = e.bits_cap;
    if (bits_min < BITS_MIN || bits_max > B || bits_min > bits_max) {
        throw Error(cat("precision rules: bits range ", bits_min, "..", bits_max, " is not within ", BITS_MIN, "..", B));
    }
    const size_t n_lin = e.lin.size() + 1;
    if (cost.size() != n_lin) {
        throw Error(cat("precision rules: ", cost.size(), " cost tables; expected n_layers * 7 + 1 = ", n_lin));
    }
    const int levels = bits_max - bits_min + 1;
    for (size_t j = 0; j < n_lin; ++j) {
        const BitplaneLinear& w = e.lin_at(j);
        if (cost[j].size() != static_cast<size_t>(levels) * w.k) {
            throw Error(cat("precision rules: cost table ", j, " has ", cost[j].size(), " values; expected levels (",
                            levels, ") * K (", w.k, ") = ", levels * w.k));
        }
        for (float v : cost[j])
            if (!std::isfinite(v) || v < 0.0f)
                throw Error("precision rules: cost table " + std::to_string(j) + " holds " + std::to_string(v) +
                            "; costs must be finite and >= 0");
    }
    if (!std::isfinite(lambda) || lambda < 0.0)
        throw Error("precision rules: lambda = " + std::to_string(lambda) + " must be finite and >= 0");
    e.rule_cost = cost;
    e.rule_min = bits_min;
    e.rule_max = bits_max;
    e.lambda = lambda;
    e.rules = true;
}

void Engine::set_rule_lambda(double lambda) {
    if (!impl_->rules) throw Error("set_rule_lambda: no precision rules are set");
    if (!std::isfinite(lambda) || lambda < 0.0)
        throw Error("lambda = " + std::to_string(lambda) + " must be finite and >= 0");
    impl_->lambda = lambda;
}

void Engine::clear_precision_rules() {
    impl_->rules = false;
    impl_->rule_cost.clear();
}

bool Engine::has_precision_rules() const { return impl_->rules; }
std::vector<int32_t> Engine::last_bits() const { return impl_->used; }
uint64_t Engine::last_bytes_per_token() const { return impl_->bytes_at(impl_->used); }

void Engine::collect_input_energy(bool enable) {
    Impl& e = *impl_;
    if (enable && e.on_gpu())
        throw Error("collect_input_energy runs on the CPU backend only; open the engine with backend CPU");
    e.collect = enable;
    e.energy.clear();
    e.energy_n.assign(enable ? e.lin.size() + 1 : 0, 0);
    if (enable)
        for (size_t j = 0; j < e.lin.size() + 1; ++j) e.energy.emplace_back(e.lin_at(j).k, 0.0);
}

const std::vector<std::vector<double>>& Engine::input_energy() const { return impl_->energy; }
const std::vector<int64_t>& Engine::input_energy_rows() const { return impl_->energy_n; }

const std::vector<float>& Engine::logits() const { return impl_->logits; }
StepSignals Engine::signals() const { return impl_->sig; }
void Engine::reset() {
    impl_->past[0] = 0;
    impl_->logits.clear();
    impl_->sig = StepSignals{};
}

void Engine::Impl::check_tokens(const int32_t* tokens, int64_t n) const {
    for (int64_t i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] >= cfg->vocab) {
            throw Error(cat("token id ", tokens[i], " at position ", i, " is outside the vocabulary 0..", cfg->vocab - 1));
        }
    }
}

void Engine::eval(const int32_t* tokens, int64_t n, float* all_logits) { eval_seq(0, tokens, n, all_logits); }

void Engine::eval_seq(int seq, const int32_t* tokens, int64_t n, float* all_logits) {
    Impl& e = *impl_;
    e.check_seq(seq, "eval");
    if (n <= 0) throw Error("eval: no tokens (n = " + std::to_string(n) + ")");
    e.check_tokens(tokens, n);
    if (e.past[seq] + n > e.n_ctx) {
        throw Error(cat("context full: ", e.past[seq], " tokens in the cache", e.n_seq > 1 ? cat(" of sequence ", seq) : "",
                        " + ", n, " new > n_ctx = ", e.n_ctx));
    }
    e.forward(seq, tokens, n, all_logits);
}

void Engine::decode_batch(const int32_t* seqs, const int32_t* tokens, int64_t count, float* out, StepSignals* signals) {
    Impl& e = *impl_;
    if (count <= 0) throw Error(cat("decode_batch: no sequences (count = ", count, ")"));
    if (count > e.n_seq) throw Error(cat("decode_batch: ", count, " rows for ", e.n_seq, " sequences"));
    if (!seqs || !tokens || !out) throw Error("decode_batch: null pointer");
    std::vector<char> seen(e.n_seq, 0);
    for (int64_t i = 0; i < count; ++i) {
        const int s = seqs[i];
        if (s < 0 || s >= e.n_seq) throw Error(cat("decode_batch: seqs[", i, "] = ", s, " is outside 0..", e.n_seq - 1));
        if (seen[s]) throw Error(cat("decode_batch: sequence ", s, " appears twice (seqs[", i, "])"));
        seen[s] = 1;
        if (tokens[i] < 0 || tokens[i] >= e.cfg->vocab)
            throw Error(cat("decode_batch: token id ", tokens[i], " (row ", i, ", sequence ", s,
                            ") is outside the vocabulary 0..", e.cfg->vocab - 1));
        if (e.past[s] + 1 > e.n_ctx)
            throw Error(cat("context full: sequence ", s, " holds ", e.past[s], " tokens = n_ctx"));
    }
    const int64_t D = e.cfg->hidden, V = e.cfg->vocab;
    std::vector<int64_t> pos(count);
    for (int64_t i = 0; i < count; ++i) pos[i] = e.past[seqs[i]];
#ifdef FLEXQUANT_HAVE_CUDA
    if (e.gpu) {
        const std::vector<int32_t> b = e.mask_bits();
        std::vector<float> ent(count), top1(count);
        e.gpu->decode_batch(seqs, tokens, pos.data(), count, b.data(), out, ent.data(), top1.data());
        e.used = b;
        for (int64_t i = 0; i < count; ++i) {
            if (signals) signals[i] = StepSignals{ent[i], top1[i]};
            ++e.past[seqs[i]];
        }
        return;
    }
#endif
    e.layers(tokens, count, seqs, pos.data(), /*prefill=*/false);
    rms_norm(e.x.data(), e.out_norm, count, D, e.cfg->rms_norm_eps, e.h.data());
    e.linear(e.lin.size(), e.h.data(), count, out);
    for (int64_t i = 0; i < count; ++i) {
        StepSignals s;
        entropy_and_top1(out + i * V, V, &s.entropy, &s.top1_prob);
        if (signals) signals[i] = s;
        ++e.past[seqs[i]];
    }
}

void Engine::Impl::forward(int seq, const int32_t* tokens, int64_t T, float* all_logits) {
    const ModelConfig& c = *cfg;
    const int64_t D = c.hidden, V = c.vocab;
#ifdef FLEXQUANT_HAVE_CUDA
    if (gpu) {
        const std::vector<int32_t> b = mask_bits();
        logits.resize(V);
        gpu->forward(seq, tokens, T, past[seq], b.data(), logits.data(), all_logits, &sig.entropy, &sig.top1_prob);
        used = b;
        past[seq] += T;
        return;
    }
#endif
    std::vector<int64_t> pos(T);
    for (int64_t t = 0; t < T; ++t) pos[t] = past[seq] + t;
    const std::vector<int32_t> seqs(T, seq);
    layers(tokens, T, seqs.data(), pos.data(), /*prefill=*/true);

    // Only the rows whose logits are wanted go through the LM head (the largest linear).
    const int64_t first = all_logits ? 0 : T - 1;
    const int64_t rows = T - first;
    rms_norm(x.data() + first * D, out_norm, rows, D, c.rms_norm_eps, h.data());
    logits.resize(V);
    if (all_logits) {
        linear(lin.size(), h.data(), rows, all_logits);
        std::memcpy(logits.data(), all_logits + (T - 1) * V, V * 4);
    } else {
        linear(lin.size(), h.data(), 1, logits.data());
    }
    entropy_and_top1(logits.data(), V, &sig.entropy, &sig.top1_prob);
    past[seq] += T;
}

void Engine::Impl::layers(const int32_t* tokens, int64_t T, const int32_t* seqs, const int64_t* pos, bool prefill) {
    const ModelConfig& c = *cfg;
    const int64_t D = c.hidden, H = c.n_heads, Hkv = c.n_kv_heads, hd = c.head_dim, F = c.ffn;
    const int64_t qdim = H * hd, kvdim = Hkv * hd;
    auto grow = [](std::vector<float>& v, size_t n) {
        if (v.size() < n) v.resize(n);
    };
    grow(x, T * D);
    grow(h, T * D);
    grow(q, T * qdim);
    grow(kx, T * kvdim);
    grow(vx, T * kvdim);
    grow(att, T * qdim);
    grow(o, T * D);
    grow(g, T * F);
    grow(u, T * F);

    // Row-wise ops of a prompt or batch on the pool (one row runs on the caller: a decode step's
    // norms are too small to share). The rows are independent, so the results do not change.
    auto rows = [&](int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
        if (n > 1)
            pool.parallel_for(n, std::max<int64_t>(1, n / (4 * pool.num_threads())), fn);
        else
            fn(0, n);
    };
    for (int64_t t = 0; t < T; ++t) {
        float* row = x.data() + t * D;
        if (embd_f16) {
            const uint16_t* src = static_cast<const uint16_t*>(embd) + static_cast<int64_t>(tokens[t]) * D;
            for (int64_t i = 0; i < D; ++i) row[i] = fp16_to_fp32(src[i]);
        } else {
            std::memcpy(row, static_cast<const float*>(embd) + static_cast<int64_t>(tokens[t]) * D, D * 4);
        }
    }
    for (int64_t l = 0; l < c.n_layers; ++l) {
        const size_t j0 = static_cast<size_t>(l) * LINEARS_PER_LAYER;
        rows(T, [&](int64_t t0, int64_t t1) {
            rms_norm(x.data() + t0 * D, attn_norm[l], t1 - t0, D, c.rms_norm_eps, h.data() + t0 * D);
        });
        float* qkv[3] = {q.data(), kx.data(), vx.data()};
        linears(j0 + 0, 3, h.data(), T, qkv);
        rope_(rope, q.data(), H, kx.data(), Hkv, pos, T);
        for (int64_t t = 0; t < T; ++t)
            for (int64_t hk = 0; hk < Hkv; ++hk) {
                const uint64_t off = kv_offset(seqs[t], hk, pos[t]);
                const float* kh = kx.data() + t * kvdim + hk * hd;
                const float* vh = vx.data() + t * kvdim + hk * hd;
                if (kv_dtype == KvDType::KV_F16) {
                    to_f16(kh, hd, k16[l].get() + off);
                    to_f16(vh, hd, v16[l].get() + off);
                } else if (kv_dtype == KvDType::KV_Q8) {
                    quantize_rows_q8(kh, 1, hd, k8[l].get() + off, k8_scale[l].get() + q8_scale_offset(off));
                    quantize_rows_q8(vh, 1, hd, v8[l].get() + off, v8_scale[l].get() + q8_scale_offset(off));
                } else {
                    std::memcpy(k32[l].get() + off, kh, hd * 4);
                    std::memcpy(v32[l].get() + off, vh, hd * 4);
                }
            }
        // Prefill: one causal block over the sequence's cache. Batched decode: each row over its
        // own sequence's cache (their lengths differ).
        const int64_t blocks = prefill ? 1 : T, m = prefill ? T : 1;
        for (int64_t b = 0; b < blocks; ++b) {
            const uint64_t base = kv_offset(seqs[b], 0, 0);
            const KvStrides kv = KvStrides::head_major(n_ctx, hd);
            float* out = att.data() + b * qdim;
            const float* qb = q.data() + b * qdim;
            if (kv_dtype == KvDType::KV_F16)
                attention_f16(qb, k16[l].get() + base, v16[l].get() + base, m, pos[b], H, Hkv, hd, kv, out, &pool);
            else if (kv_dtype == KvDType::KV_Q8)
                attention_q8(qb, k8[l].get() + base, k8_scale[l].get() + q8_scale_offset(base), v8[l].get() + base,
                             v8_scale[l].get() + q8_scale_offset(base), m, pos[b], H, Hkv, hd, kv, out, &pool);
            else
                attention(qb, k32[l].get() + base, v32[l].get() + base, m, pos[b], H, Hkv, hd, kv, out, &pool);
        }
        linear(j0 + 3, att.data(), T, o.data());
        for (int64_t i = 0; i < T * D; ++i) x[i] += o[i];

        rows(T, [&](int64_t t0, int64_t t1) {
            rms_norm(x.data() + t0 * D, ffn_norm[l], t1 - t0, D, c.rms_norm_eps, h.data() + t0 * D);
        });
        float* gate_up[2] = {g.data(), u.data()};
        linears(j0 + 4, 2, h.data(), T, gate_up);
        rows(T, [&](int64_t t0, int64_t t1) {
            swiglu(g.data() + t0 * F, u.data() + t0 * F, (t1 - t0) * F, g.data() + t0 * F);
        });
        linear(j0 + 6, g.data(), T, o.data());
        for (int64_t i = 0; i < T * D; ++i) x[i] += o[i];
    }
}

// ---- sampling -----------------------------------------------------------------------------------

struct TokenSampler::Impl {
    SamplerParams p;
    Sampler sampler;
    Impl(const Sampling& s, uint64_t seed) : sampler(seed) {
        p.temperature = s.temperature;
        p.top_k = s.top_k;
        p.top_p = s.top_p;
        p.min_p = s.min_p;
        p.repetition_penalty = s.repetition_penalty;
    }
};

TokenSampler::TokenSampler(const Sampling& s, uint64_t seed) {
    if (!(s.top_p > 0.0f && s.top_p <= 1.0f))
        throw Error("top_p = " + std::to_string(s.top_p) + " must be in (0, 1]");
    if (!(s.min_p >= 0.0f && s.min_p <= 1.0f))
        throw Error("min_p = " + std::to_string(s.min_p) + " must be in [0, 1]");
    if (!(s.repetition_penalty > 0.0f))
        throw Error("repetition_penalty = " + std::to_string(s.repetition_penalty) + " must be > 0");
    if (s.top_k < 0) throw Error("top_k = " + std::to_string(s.top_k) + " must be >= 0 (0 = off)");
    if (!(s.temperature >= 0.0f) || std::isinf(s.temperature))
        throw Error("temperature = " + std::to_string(s.temperature) + " must be a finite number >= 0");
    impl_.reset(new Impl(s, seed));
}

TokenSampler::~TokenSampler() = default;

int32_t TokenSampler::sample(const Engine& eng, const int32_t* history, int64_t n_history) {
    const std::vector<float>& lg = eng.logits();
    if (lg.empty()) throw Error("sample: the engine has no logits yet (call eval first)");
    return sample_logits(lg.data(), static_cast<int64_t>(lg.size()), history, n_history);
}

int32_t TokenSampler::sample_logits(const float* logits, int64_t vocab, const int32_t* history, int64_t n_history) {
    if (!logits || vocab <= 0) throw Error(cat("sample: no logits (vocab = ", vocab, ")"));
    return static_cast<int32_t>(impl_->sampler.sample(logits, vocab, impl_->p, history, n_history));
}

std::vector<int32_t> generate(Engine& eng, const std::vector<int32_t>& prompt, int64_t max_new_tokens,
                              const Sampling& sampling, uint64_t seed,
                              const std::function<bool(int32_t)>& on_token) {
    if (prompt.empty()) throw Error("generate: the prompt is empty");
    TokenSampler sampler(sampling, seed);
    eng.reset();
    eng.eval(prompt.data(), static_cast<int64_t>(prompt.size()));
    std::vector<int32_t> history = prompt, out;
    for (int64_t i = 0; i < max_new_tokens; ++i) {
        const int32_t tok = sampler.sample(eng, history.data(), static_cast<int64_t>(history.size()));
        if (tok == eng.config().eos_token_id) break;
        out.push_back(tok);
        history.push_back(tok);
        if (on_token && !on_token(tok)) break;
        if (eng.n_past() >= eng.n_ctx() || i + 1 == max_new_tokens) break;  // the last token needs no pass
        eng.eval(&tok, 1);
    }
    return out;
}

}  // namespace flexquant

// The Llama forward pass on the GPU (flexquant::CudaForward, cpp/src/cuda_backend.h): the same
// computation as Engine::Impl::forward in cpp/src/engine.cpp, with every op on the device:
//
//   x = embd[token]
//   per layer:  h = rms_norm(x, attn_norm);  q, k, v = h Wqᵀ, h Wkᵀ, h Wvᵀ   (k-bit views)
//               rope(q, k);  K/V cache[pos] = k, v;  x += attention(q, K, V) Woᵀ
//               h = rms_norm(x, ffn_norm);   x += (silu(h Wgateᵀ) * (h Wupᵀ)) Wdownᵀ
//   logits = rms_norm(x, output_norm) Wheadᵀ;  entropy, top-1 probability of softmax(logits)
//
// A prompt goes through in passes. With the tensor-core GEMM on (params.gemm_min_rows > 0, the
// int8-activation path), while at least gemm_min_rows tokens are left a pass takes up to
// max(PREFILL_ROWS = 256, gemm_min_rows) of them and runs its layer linears on
// bitplane_gemm_cuda_async (cuda/bitplane_matmul_gemm.cu: the same int8 activations as the GEMV, so
// the same numbers up to fp32 rounding); the rest goes in passes of SLICE = 8 rows on the GEMV
// (8 rows per launch), as do the LM head and, unless gemm_min_rows is 1, the decode step. With the
// GEMM off, or asked for all rows' logits, passes of 8 rows.
//
// Several sequences (params.n_seq) share one KV cache per layer, sequence s in rows
// [s · n_ctx, (s + 1) · n_ctx); decode_batch runs one step of several of them as one pass, each row
// with its own position and cache block (the "bases"), the linears on all rows at once.
//
// Everything a step reads from the host sits in one small "step input" block in device memory:
// the pass's token ids, their positions, their sequences' cache bases and the bit-width of every
// linear. The kernels read their
// k, the positions and the ids from there at run time, so the one-token step is captured once as a
// CUDA graph and replayed for every token and every mask: a new mask costs the one async copy of
// that block that every step makes anyway, no re-capture and no host sync. A step synchronizes
// once, after the copy of the logits and signals back to pinned host memory.
#include <cuda_fp16.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "../cuda/bitplane_matmul.cuh"
#include "cuda_backend.h"

namespace flexquant {

namespace {

constexpr int64_t SLICE = 8;           // rows per GEMV pass: the bit-plane GEMV kernels take up to 8
constexpr int64_t PREFILL_ROWS = 256;  // rows per prompt pass when the GEMM is on
constexpr int64_t MAX_GEMM_ROWS = 4096;  // a larger gemm_min_rows turns the GEMM off (buffers scale with it)
constexpr int THREADS = 256;

// A bump allocator over one cudaMalloc: the layout is planned first (sizes only), then allocated
// once, so a failure leaves nothing behind and the error can name the total.
struct Arena {
    size_t size = 0;
    size_t take(size_t bytes) {
        const size_t off = size;
        size += align256(bytes);
        return off;
    }
};

// x (T, D) = embd[tokens] as fp32; ids were checked by the engine, clamped anyway (no OOB read).
template <class E>
static __global__ void __launch_bounds__(THREADS)
embed_kernel(const E* __restrict__ embd, int64_t vocab, int64_t D, const int32_t* __restrict__ tokens,
             float* __restrict__ x) {
    const int64_t t = blockIdx.x;
    const int64_t id = min(max(int64_t(tokens[t]), int64_t(0)), vocab - 1);
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) x[t * D + i] = float(embd[id * D + i]);
}

// cache[bases[t] + positions[t]] = src[t] for t < T: rows of n = Hkv * d values, fp32 or fp16.
template <class KV>
static __global__ void __launch_bounds__(THREADS)
kv_store_kernel(const float* __restrict__ k, const float* __restrict__ v, int64_t n,
                const int64_t* __restrict__ positions, const int64_t* __restrict__ bases,
                KV* __restrict__ k_cache, KV* __restrict__ v_cache) {
    const int64_t t = blockIdx.x;
    const int64_t row = (bases[t] + positions[t]) * n;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        k_cache[row + i] = KV(k[t * n + i]);
        v_cache[row + i] = KV(v[t * n + i]);
    }
}

// x += y, elementwise (the residual connections).
static __global__ void __launch_bounds__(THREADS) add_kernel(float* __restrict__ x, const float* __restrict__ y,
                                                             int64_t n) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        x[i] = __fadd_rn(x[i], y[i]);
}

unsigned blocks_for(int64_t n) { return unsigned(std::min<int64_t>((n + THREADS - 1) / THREADS, 4096)); }

}  // namespace

struct CudaForward::Impl {
    ModelConfig cfg;
    CudaForwardParams p;
    BitplaneCudaPath path = BITPLANE_CUDA_AUTO;
    int64_t n_lin = 0;  // n_layers * 7 + 1
    int n_splits = 1;   // attention spans at decode
    bool use_gemm = false;     // prompt slices of >= p.gemm_min_rows rows on the tensor-core GEMM
    int64_t max_rows = SLICE;  // rows per pass: PREFILL_ROWS with the GEMM, else SLICE
    int64_t head_rows = SLICE; // rows of logits and signals one pass may produce (the batch)
    cudaStream_t stream = nullptr;
    uint8_t* arena = nullptr;
    size_t arena_bytes = 0;

    // device views
    std::vector<BitplaneLinear> lin;  // n_lin: planes/qparams in the arena, max_bits = the file's
    const void* embd = nullptr;
    bool embd_f16 = true;
    float* out_norm = nullptr;
    std::vector<float*> attn_norm, ffn_norm;
    float* inv_freq = nullptr;
    std::vector<void*> k_cache, v_cache;  // n_layers x (n_seq, n_ctx, Hkv, d)
    float *x = nullptr, *h = nullptr, *q = nullptr, *k = nullptr, *v = nullptr, *att = nullptr, *o = nullptr;
    float *g = nullptr, *u = nullptr, *logits = nullptr, *partial = nullptr;
    void* ws = nullptr;  // bit-plane activation scratch (prepared input of the current linears)
    size_t ws_bytes = 0;
    StepSignalsDevice* sig = nullptr;  // (head_rows)

    // step input: tokens (max_rows) int32 | positions (max_rows) int64 | bases (max_rows) int64 (the
    // cache row of each row's position 0: its sequence times n_ctx) | bits (n_lin) int32
    uint8_t* in_dev = nullptr;
    uint8_t* in_host = nullptr;  // pinned
    size_t in_bytes = 0, in_pos = 0, in_base = 0, in_bits = 0;  // size; byte offsets of the parts
    int32_t* tokens_dev() const { return reinterpret_cast<int32_t*>(in_dev); }
    int64_t* positions_dev() const { return reinterpret_cast<int64_t*>(in_dev + in_pos); }
    int64_t* bases_dev() const { return reinterpret_cast<int64_t*>(in_dev + in_base); }
    int32_t* bits_dev() const { return reinterpret_cast<int32_t*>(in_dev + in_bits); }
    // Fills row t of the pinned step input.
    void set_row(int64_t t, int32_t token, int64_t position, int64_t seq) {
        reinterpret_cast<int32_t*>(in_host)[t] = token;
        reinterpret_cast<int64_t*>(in_host + in_pos)[t] = position;
        reinterpret_cast<int64_t*>(in_host + in_base)[t] = seq * p.n_ctx;
    }

    // step output, pinned: logits (head_rows, vocab), then the signals (head_rows)
    float* out_host = nullptr;
    StepSignalsDevice* out_sig() const { return reinterpret_cast<StepSignalsDevice*>(out_host + head_rows * cfg.vocab); }

    cudaGraph_t graph = nullptr;
    cudaGraphExec_t graph_exec = nullptr;
    int replays = 0;
    // A call that threw after queuing work may have left a copy of the pinned step input pending:
    // the next call waits for the stream before it rewrites the block. No cost on the normal path.
    bool pending = false;
    void settle() {
        if (pending) cudaStreamSynchronize(stream);  // an error here resurfaces at the next check
        pending = false;
    }

    ~Impl() {
        if (graph_exec) cudaGraphExecDestroy(graph_exec);
        if (graph) cudaGraphDestroy(graph);
        if (in_host) cudaFreeHost(in_host);
        if (out_host) cudaFreeHost(out_host);
        if (arena) cudaFree(arena);
        if (stream) cudaStreamDestroy(stream);
    }

    // The GEMV in two halves: prepare xin (T <= SLICE rows) once for the linears that read it, then
    // each linear. On the GEMM (gemm true) there is nothing to share: linear() runs all of it.
    void prepare(size_t j, const float* xin, int64_t T, bool gemm) {
        if (!gemm) bitplane_prepare_cuda_async(lin[j], xin, T, ws, ws_bytes, path, stream);
    }
    void linear(size_t j, const float* xin, int64_t T, float* y, bool gemm) {
        if (gemm)
            bitplane_gemm_cuda_async(lin[j], p.bits_cap, xin, T, y, ws, ws_bytes, BITPLANE_GEMM_A8, stream,
                                     bits_dev() + j);
        else
            bitplane_matmul_prepared_cuda_async(lin[j], p.bits_cap, T, y, ws, ws_bytes, path, stream, {},
                                                bits_dev() + j);
    }
    // The kernels of one pass of T <= max_rows rows. head: run the LM head, on every row (all_rows,
    // T <= head_rows: logits (T, vocab) and signals (T)) or on the last one (logits row 0, signals 0);
    // a prompt's earlier passes skip it.
    void enqueue(int64_t T, bool head, bool all_rows);
};

void CudaForward::Impl::enqueue(int64_t T, bool head, bool all_rows) {
    const ModelConfig& c = cfg;
    const int64_t D = c.hidden, H = c.n_heads, Hkv = c.n_kv_heads, hd = c.head_dim, F = c.ffn, V = c.vocab;
    const int64_t kvdim = Hkv * hd;
    // The kernels launched here directly: a bad launch is named now, not at the next op's check.
    auto launched = [](const char* what) { cuda_check(cudaGetLastError(), std::string("CudaForward (") + what + ")"); };
    const bool gemm = use_gemm && T >= p.gemm_min_rows;
    // Split attention's partial buffer holds SLICE rows; a longer slice has T x H blocks to fill the GPU.
    const int splits = T <= SLICE ? n_splits : 1;
    if (embd_f16)
        embed_kernel<__half><<<unsigned(T), THREADS, 0, stream>>>(static_cast<const __half*>(embd), V, D, tokens_dev(), x);
    else
        embed_kernel<float><<<unsigned(T), THREADS, 0, stream>>>(static_cast<const float*>(embd), V, D, tokens_dev(), x);
    launched("embed_kernel");
    for (int64_t l = 0; l < c.n_layers; ++l) {
        const size_t j0 = size_t(l) * LINEARS_PER_LAYER;
        rms_norm_launch(x, attn_norm[l], T, D, c.rms_norm_eps, h, stream);
        prepare(j0, h, T, gemm);  // q, k and v read the same h
        linear(j0 + 0, h, T, q, gemm);
        linear(j0 + 1, h, T, k, gemm);
        linear(j0 + 2, h, T, v, gemm);
        rope_launch(inv_freq, int(hd), q, H, k, Hkv, positions_dev(), T, stream);
        if (p.kv_f16)
            kv_store_kernel<__half><<<unsigned(T), THREADS, 0, stream>>>(
                k, v, kvdim, positions_dev(), bases_dev(), static_cast<__half*>(k_cache[l]), static_cast<__half*>(v_cache[l]));
        else
            kv_store_kernel<float><<<unsigned(T), THREADS, 0, stream>>>(
                k, v, kvdim, positions_dev(), bases_dev(), static_cast<float*>(k_cache[l]), static_cast<float*>(v_cache[l]));
        launched("kv_store_kernel");
        attention_launch(q, k_cache[l], v_cache[l], p.kv_f16, T, positions_dev(), H, Hkv, hd, splits, partial, att,
                         stream, bases_dev());
        prepare(j0 + 3, att, T, gemm);
        linear(j0 + 3, att, T, o, gemm);
        add_kernel<<<blocks_for(T * D), THREADS, 0, stream>>>(x, o, T * D);
        launched("add_kernel");

        rms_norm_launch(x, ffn_norm[l], T, D, c.rms_norm_eps, h, stream);
        prepare(j0 + 4, h, T, gemm);  // gate and up read the same h
        linear(j0 + 4, h, T, g, gemm);
        linear(j0 + 5, h, T, u, gemm);
        swiglu_launch(g, u, T * F, g, stream);
        prepare(j0 + 6, g, T, gemm);
        linear(j0 + 6, g, T, o, gemm);
        add_kernel<<<blocks_for(T * D), THREADS, 0, stream>>>(x, o, T * D);
        launched("add_kernel");
    }
    if (!head) return;
    // Only the rows whose logits are wanted go through the LM head (the largest linear).
    const int64_t first = all_rows ? 0 : T - 1, rows = T - first;
    rms_norm_launch(x + first * D, out_norm, rows, D, c.rms_norm_eps, h, stream);
    const size_t j_head = size_t(n_lin - 1);
    for (int64_t r0 = 0; r0 < rows; r0 += SLICE) {  // the GEMV, 8 rows per launch
        const int64_t n = std::min<int64_t>(SLICE, rows - r0);
        prepare(j_head, h + r0 * D, n, false);
        linear(j_head, h + r0 * D, n, logits + r0 * V, false);
    }
    if (all_rows)
        for (int64_t r = 0; r < rows; ++r) entropy_and_top1_launch(logits + r * V, V, sig + r, stream);
    else
        entropy_and_top1_launch(logits, V, sig, stream);
}

CudaForward::CudaForward(const ModelFile& model, const std::vector<BitplaneLinear>& lin,
                         const std::vector<float>& inv_freq, const CudaForwardParams& params)
    : impl_(new Impl) {
    const std::string fn = "CudaForward";
    std::unique_ptr<Impl> guard(impl_);  // frees everything if a step below throws
    Impl& e = *impl_;
    e.cfg = model.config();
    e.p = params;
    const ModelConfig& c = e.cfg;
    const int64_t D = c.hidden, Hkv = c.n_kv_heads, hd = c.head_dim, F = c.ffn, V = c.vocab;
    e.n_lin = c.n_layers * LINEARS_PER_LAYER + 1;
    if (int64_t(lin.size()) != e.n_lin)
        throw Error(fn + ": " + std::to_string(lin.size()) + " linears, expected n_layers * 7 + 1 = " + std::to_string(e.n_lin));
    if (params.bits_cap < BITS_MIN || params.bits_cap > c.max_bits)
        throw Error(fn + ": max_bits = " + std::to_string(params.bits_cap) + " is outside " + std::to_string(BITS_MIN) +
                    ".." + std::to_string(c.max_bits));
    if (params.n_ctx < 1) throw Error(fn + ": n_ctx = " + std::to_string(params.n_ctx) + " must be >= 1");
    if (hd > ATTENTION_MAX_HEAD_DIM)
        throw Error(fn + ": head_dim = " + std::to_string(hd) + " exceeds " + std::to_string(ATTENTION_MAX_HEAD_DIM));
    if (!(c.n_heads % Hkv == 0)) throw Error(fn + ": n_heads must be a multiple of n_kv_heads");
    e.path = params.fp32_matmul ? BITPLANE_CUDA_FP32 : BITPLANE_CUDA_AUTO;
    // Spans of >= 256 positions at full context, at most 32 of them (H * 32 blocks already fill a GPU).
    e.n_splits = int(std::clamp<int64_t>((params.n_ctx + 255) / 256, 1, 32));
    // The GEMM computes with the int8 activations of the GEMV's TC path; where that path does not
    // apply (fp32 reference asked for, or a group size it lacks), prompts stay on the GEMV so that
    // prefill and decode use the same arithmetic.
    e.use_gemm = params.gemm_min_rows > 0 && params.gemm_min_rows <= MAX_GEMM_ROWS && !params.fp32_matmul;
    for (const BitplaneLinear& w : lin)
        if (bitplane_cuda_resolve_path(w, e.path) != BITPLANE_CUDA_TC) e.use_gemm = false;
    e.max_rows = e.use_gemm ? std::max<int64_t>(PREFILL_ROWS, params.gemm_min_rows) : SLICE;
    const int64_t R = e.max_rows;
    if (params.n_seq < 1 || params.n_seq > 4096)
        throw Error(fn + ": n_seq = " + std::to_string(params.n_seq) + " is outside 1..4096");
    // A batched step produces one logit row per sequence, in passes of at most max_rows rows.
    e.head_rows = std::max<int64_t>(SLICE, std::min<int64_t>(params.n_seq, R));

    // ---- plan the arena ----
    Arena a;
    std::vector<size_t> off_planes(lin.size()), off_qp(lin.size());
    for (size_t j = 0; j < lin.size(); ++j) {
        off_planes[j] = a.take(size_t(params.bits_cap) * lin[j].plane_bytes);
        off_qp[j] = a.take(size_t(lin[j].n) * lin[j].n_groups() * 4);
    }
    const TensorView& emb = model.tensor("token_embd.weight");
    e.embd_f16 = emb.dtype == DType::DTYPE_F16;
    if (!e.embd_f16 && emb.dtype != DType::DTYPE_F32) throw Error(fn + ": token_embd.weight must be F16 or F32");
    const size_t off_embd = a.take(emb.nbytes);
    const size_t off_out_norm = a.take(size_t(D) * 4);
    std::vector<size_t> off_attn_norm, off_ffn_norm, off_k, off_v;
    const size_t cache_bytes = size_t(params.n_seq) * size_t(params.n_ctx) * size_t(Hkv * hd) * (params.kv_f16 ? 2 : 4);
    for (int64_t l = 0; l < c.n_layers; ++l) {
        off_attn_norm.push_back(a.take(size_t(D) * 4));
        off_ffn_norm.push_back(a.take(size_t(D) * 4));
        off_k.push_back(a.take(cache_bytes));
        off_v.push_back(a.take(cache_bytes));
    }
    const size_t off_freq = a.take(size_t(hd / 2) * 4);
    const size_t qdim = size_t(c.n_heads * hd), kvdim = size_t(Hkv * hd);
    const size_t off_x = a.take(R * D * 4), off_h = a.take(R * D * 4), off_q = a.take(R * qdim * 4);
    const size_t off_kx = a.take(R * kvdim * 4), off_vx = a.take(R * kvdim * 4);
    const size_t off_att = a.take(R * qdim * 4), off_o = a.take(R * D * 4);
    const size_t off_g = a.take(R * F * 4), off_u = a.take(R * F * 4);
    const size_t off_logits = a.take(size_t(e.head_rows) * V * 4);  // the LM head runs on at most head_rows rows
    // split attention for every row of a slice of <= SLICE rows: a prefill slice of a long prompt
    // scans the whole cache
    const size_t off_partial = a.take(SLICE * size_t(c.n_heads) * e.n_splits * (hd + 2) * 4);
    for (size_t j = 0; j < lin.size(); ++j) {
        e.ws_bytes = std::max(e.ws_bytes, bitplane_matmul_cuda_workspace(lin[j], SLICE, e.path));
        // the GEMM's scratch (codes of one linear + the slice's activations); never for the LM head
        if (e.use_gemm && j + 1 < lin.size())
            e.ws_bytes = std::max(e.ws_bytes, bitplane_gemm_cuda_workspace(lin[j], R, BITPLANE_GEMM_A8));
    }
    const size_t off_ws = a.take(e.ws_bytes);
    const size_t off_sig = a.take(size_t(e.head_rows) * sizeof(StepSignalsDevice));
    e.in_pos = (size_t(R) * 4 + 7) / 8 * 8;
    e.in_base = e.in_pos + size_t(R) * 8;
    e.in_bits = e.in_base + size_t(R) * 8;
    e.in_bytes = e.in_bits + size_t(e.n_lin) * 4;
    const size_t off_in = a.take(e.in_bytes);
    e.arena_bytes = a.size;

    // ---- allocate, with the numbers in the error ----
    size_t free_b = 0, total_b = 0;
    cuda_check(cudaMemGetInfo(&free_b, &total_b), fn + " (cudaMemGetInfo)");
    if (e.arena_bytes > free_b)
        throw Error(fn + ": the model needs " + std::to_string(e.arena_bytes >> 20) + " MiB of GPU memory at max_bits = " +
                    std::to_string(params.bits_cap) + " with n_ctx = " + std::to_string(params.n_ctx) + "; " +
                    std::to_string(free_b >> 20) + " MiB are free (lower max_bits or n_ctx)");
    cuda_check(cudaMalloc(&e.arena, e.arena_bytes), fn + " (cudaMalloc of " + std::to_string(e.arena_bytes) + " bytes)");
    cuda_check(cudaStreamCreateWithFlags(&e.stream, cudaStreamNonBlocking), fn + " (stream)");
    cuda_check(cudaMallocHost(&e.in_host, e.in_bytes), fn + " (pinned step input)");
    cuda_check(cudaMallocHost(&e.out_host, size_t(e.head_rows) * (size_t(V) * 4 + sizeof(StepSignalsDevice))),
               fn + " (pinned step output)");
    std::memset(e.in_host, 0, e.in_bytes);

    // ---- upload: only the first bits_cap planes of each linear travel ----
    auto put = [&](size_t off, const void* src, size_t bytes, const std::string& what) {
        cuda_check(cudaMemcpy(e.arena + off, src, bytes, cudaMemcpyHostToDevice), fn + " (upload " + what + ")");
    };
    e.lin = lin;
    for (size_t j = 0; j < lin.size(); ++j) {
        put(off_planes[j], lin[j].planes, size_t(params.bits_cap) * lin[j].plane_bytes, "planes");
        put(off_qp[j], lin[j].qparams, size_t(lin[j].n) * lin[j].n_groups() * 4, "qparams");
        e.lin[j].planes = e.arena + off_planes[j];
        e.lin[j].qparams = reinterpret_cast<const uint16_t*>(e.arena + off_qp[j]);
    }
    put(off_embd, emb.data, emb.nbytes, "token_embd.weight");
    e.embd = e.arena + off_embd;
    put(off_out_norm, model.tensor("output_norm.weight").data, size_t(D) * 4, "output_norm.weight");
    e.out_norm = reinterpret_cast<float*>(e.arena + off_out_norm);
    for (int64_t l = 0; l < c.n_layers; ++l) {
        const std::string b = "blk." + std::to_string(l);
        put(off_attn_norm[size_t(l)], model.tensor(b + ".attn_norm.weight").data, size_t(D) * 4, b + ".attn_norm");
        put(off_ffn_norm[size_t(l)], model.tensor(b + ".ffn_norm.weight").data, size_t(D) * 4, b + ".ffn_norm");
        e.attn_norm.push_back(reinterpret_cast<float*>(e.arena + off_attn_norm[size_t(l)]));
        e.ffn_norm.push_back(reinterpret_cast<float*>(e.arena + off_ffn_norm[size_t(l)]));
        e.k_cache.push_back(e.arena + off_k[size_t(l)]);
        e.v_cache.push_back(e.arena + off_v[size_t(l)]);
    }
    put(off_freq, inv_freq.data(), inv_freq.size() * 4, "rope inv_freq");
    e.inv_freq = reinterpret_cast<float*>(e.arena + off_freq);
    auto f = [&](size_t off) { return reinterpret_cast<float*>(e.arena + off); };
    e.x = f(off_x), e.h = f(off_h), e.q = f(off_q), e.k = f(off_kx), e.v = f(off_vx), e.att = f(off_att);
    e.o = f(off_o), e.g = f(off_g), e.u = f(off_u), e.logits = f(off_logits), e.partial = f(off_partial);
    e.ws = e.arena + off_ws;
    e.sig = reinterpret_cast<StepSignalsDevice*>(e.arena + off_sig);
    e.in_dev = e.arena + off_in;
    // A pageable cudaMemcpy may return before its DMA ends, and the compute stream is non-blocking
    // (not ordered after the legacy stream): wait for the uploads before any step reads them.
    cuda_check(cudaDeviceSynchronize(), fn + " (uploads complete)");
    guard.release();
}

CudaForward::~CudaForward() { delete impl_; }

uint64_t CudaForward::device_bytes() const { return impl_->arena_bytes; }
int CudaForward::graph_replays() const { return impl_->replays; }

namespace {
void check_bits(const int32_t* bits, int64_t n_lin, int bits_cap, const std::string& fn) {
    for (int64_t j = 0; j < n_lin; ++j)
        if (bits[j] < BITS_MIN || bits[j] > bits_cap)
            throw Error(fn + ": bits[" + std::to_string(j) + "] = " + std::to_string(bits[j]) + " is outside " +
                        std::to_string(BITS_MIN) + ".." + std::to_string(bits_cap));
}
}  // namespace

void CudaForward::forward(int seq, const int32_t* tokens, int64_t T, int64_t n_past, const int32_t* bits,
                          float* logits, float* all_logits, float* entropy, float* top1_prob) {
    Impl& e = *impl_;
    const std::string fn = "CudaForward::forward";
    const int64_t V = e.cfg.vocab;
    if (seq < 0 || seq >= e.p.n_seq)
        throw Error(fn + ": sequence " + std::to_string(seq) + " is outside 0.." + std::to_string(e.p.n_seq - 1));
    if (T < 1 || n_past < 0 || n_past + T > e.p.n_ctx)
        throw Error(fn + ": T = " + std::to_string(T) + " tokens at n_past = " + std::to_string(n_past) +
                    " do not fit n_ctx = " + std::to_string(e.p.n_ctx));
    check_bits(bits, e.n_lin, e.p.bits_cap, fn);
    e.settle();
    std::memcpy(e.in_host + e.in_bits, bits, size_t(e.n_lin) * 4);
    // Passes: up to max_rows on the GEMM while at least gemm_min_rows tokens are left, else up to
    // SLICE on the GEMV (which takes 8 rows); all rows' logits: SLICE rows (<= head_rows).
    int64_t rows = 0;
    for (int64_t t0 = 0; t0 < T; t0 += rows) {
        const int64_t left = T - t0;
        const bool gemm_pass = e.use_gemm && all_logits == nullptr && left >= e.p.gemm_min_rows;
        rows = std::min<int64_t>(gemm_pass ? e.max_rows : SLICE, left);
        const bool last = t0 + rows == T;
        for (int64_t t = 0; t < rows; ++t) e.set_row(t, tokens[t0 + t], n_past + t0 + t, seq);
        // The copy reads the pinned block when the stream reaches it: the host must not rewrite the
        // block before then, so each pass waits for the previous one (prefill only; a decode step
        // is one pass).
        e.pending = true;
        cuda_check(cudaMemcpyAsync(e.in_dev, e.in_host, e.in_bytes, cudaMemcpyHostToDevice, e.stream), fn + " (step input)");
        const bool all_rows = all_logits != nullptr;
        if (rows == 1 && !all_rows && e.p.use_graph) {
            if (!e.graph_exec) {
                if (e.graph) {  // left by a failed instantiate
                    cudaGraphDestroy(e.graph);
                    e.graph = nullptr;
                }
                cuda_check(cudaStreamBeginCapture(e.stream, cudaStreamCaptureModeRelaxed), fn + " (begin capture)");
                try {
                    e.enqueue(1, true, false);
                } catch (...) {
                    cudaGraph_t broken = nullptr;
                    cudaStreamEndCapture(e.stream, &broken);
                    if (broken) cudaGraphDestroy(broken);
                    throw;
                }
                cuda_check(cudaStreamEndCapture(e.stream, &e.graph), fn + " (end capture)");
                cuda_check(cudaGraphInstantiate(&e.graph_exec, e.graph, 0), fn + " (instantiate)");
            }
            cuda_check(cudaGraphLaunch(e.graph_exec, e.stream), fn + " (graph launch)");
            ++e.replays;
        } else {
            e.enqueue(rows, last || all_rows, all_rows);
        }
        cuda_check(cudaGetLastError(), fn + " (kernel launch)");
        if (all_rows)
            cuda_check(cudaMemcpyAsync(all_logits + t0 * V, e.logits, size_t(rows) * V * 4, cudaMemcpyDeviceToHost, e.stream),
                       fn + " (all logits)");
        if (last) {
            const int64_t r = all_rows ? rows - 1 : 0;
            cuda_check(cudaMemcpyAsync(e.out_host, e.logits + r * V, size_t(V) * 4, cudaMemcpyDeviceToHost, e.stream),
                       fn + " (logits)");
            cuda_check(cudaMemcpyAsync(e.out_sig(), e.sig + r, sizeof(StepSignalsDevice), cudaMemcpyDeviceToHost, e.stream),
                       fn + " (signals)");
        }
        cuda_check(cudaStreamSynchronize(e.stream), fn + " (step)");
        e.pending = false;
    }
    std::memcpy(logits, e.out_host, size_t(V) * 4);
    const StepSignalsDevice s = *e.out_sig();
    *entropy = s.entropy;
    *top1_prob = s.top1_prob;
}

void CudaForward::decode_batch(const int32_t* seqs, const int32_t* tokens, const int64_t* positions, int64_t count,
                               const int32_t* bits, float* logits, float* entropy, float* top1_prob) {
    Impl& e = *impl_;
    const std::string fn = "CudaForward::decode_batch";
    const int64_t V = e.cfg.vocab;
    if (count < 1 || count > e.p.n_seq)
        throw Error(fn + ": count = " + std::to_string(count) + " is outside 1.." + std::to_string(e.p.n_seq));
    std::vector<char> seen(size_t(e.p.n_seq), 0);  // two rows of one sequence would write one cache row
    for (int64_t i = 0; i < count; ++i) {
        if (seqs[i] < 0 || seqs[i] >= e.p.n_seq)
            throw Error(fn + ": seqs[" + std::to_string(i) + "] = " + std::to_string(seqs[i]) + " is outside 0.." +
                        std::to_string(e.p.n_seq - 1));
        if (seen[size_t(seqs[i])]++)
            throw Error(fn + ": sequence " + std::to_string(seqs[i]) + " appears twice (seqs[" + std::to_string(i) + "])");
        if (positions[i] < 0 || positions[i] >= e.p.n_ctx)
            throw Error(fn + ": positions[" + std::to_string(i) + "] = " + std::to_string(positions[i]) +
                        " is outside 0.." + std::to_string(e.p.n_ctx - 1));
    }
    check_bits(bits, e.n_lin, e.p.bits_cap, fn);
    e.settle();
    std::memcpy(e.in_host + e.in_bits, bits, size_t(e.n_lin) * 4);
    // Passes of distinct sequences: up to min(max_rows, head_rows) rows on the GEMM while at least
    // gemm_min_rows rows are left, else up to SLICE rows on the GEMV.
    int64_t rows = 0;
    for (int64_t r0 = 0; r0 < count; r0 += rows) {
        const int64_t left = count - r0;
        const bool gemm_pass = e.use_gemm && left >= e.p.gemm_min_rows;
        rows = std::min<int64_t>(gemm_pass ? std::min(e.max_rows, e.head_rows) : SLICE, left);
        for (int64_t t = 0; t < rows; ++t) e.set_row(t, tokens[r0 + t], positions[r0 + t], seqs[r0 + t]);
        e.pending = true;
        cuda_check(cudaMemcpyAsync(e.in_dev, e.in_host, e.in_bytes, cudaMemcpyHostToDevice, e.stream), fn + " (step input)");
        e.enqueue(rows, true, true);
        cuda_check(cudaGetLastError(), fn + " (kernel launch)");
        cuda_check(cudaMemcpyAsync(e.out_host, e.logits, size_t(rows) * V * 4, cudaMemcpyDeviceToHost, e.stream),
                   fn + " (logits)");
        cuda_check(cudaMemcpyAsync(e.out_sig(), e.sig, size_t(rows) * sizeof(StepSignalsDevice), cudaMemcpyDeviceToHost,
                                   e.stream),
                   fn + " (signals)");
        cuda_check(cudaStreamSynchronize(e.stream), fn + " (step)");
        e.pending = false;
        std::memcpy(logits + r0 * V, e.out_host, size_t(rows) * V * 4);
        for (int64_t t = 0; t < rows; ++t) {
            entropy[r0 + t] = e.out_sig()[t].entropy;
            top1_prob[r0 + t] = e.out_sig()[t].top1_prob;
        }
    }
}

}  // namespace flexquant

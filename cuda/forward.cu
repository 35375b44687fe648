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
// int8-activation path), a pass takes up to max(PREFILL_ROWS = 1024, gemm_min_rows) tokens, and
// each layer linear of a pass of T rows picks its kernel (the dispatcher): the GEMM
// (bitplane_gemm_cuda_async, cuda/bitplane_matmul_gemm.cu: the same int8 activations as the GEMV,
// so the same numbers up to fp32 rounding; the A16 GEMM for a linear set to fp16 activations) when
// T > gemv_max[linear][its bit-width], else the GEMV (8 rows per launch, 16 on the MMA kernels).
// Without a kernel table gemv_max is gemm_min_rows - 1 for every linear, the int8 GEMM is A8 (A8_WG
// with FLEXQUANT_CUDA_WGMMA=1) and the GEMV runs MMA from cuda_mma_min_rows rows; a table
// (set_kernel_table, or what tune() measured and checked on this GPU) sets all three per linear.
// The LM head always runs on the GEMV, as does the decode step unless gemm_min_rows is 1. With the
// GEMM off, passes of 8 rows (16 where the MMA GEMV may run: cuda_mma_min_rows > 0); asked for all
// rows' logits, passes of 8 rows.
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
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "../cuda/bitplane_matmul.cuh"
#include "cuda_backend.h"
#include "kernel_dispatch.h"

namespace flexquant {

namespace {

constexpr int64_t MMA_SLICE = 16;      // rows per launch of the MMA GEMV (cuda_mma_min_rows > 0)
constexpr int64_t SLICE = 8;           // rows per GEMV pass: the bit-plane GEMV kernels take up to 8
constexpr int64_t PREFILL_ROWS = 1024;  // rows per prompt pass when the GEMM is on (the unpack of the planes is per pass)
constexpr int64_t MAX_GEMM_ROWS = 4096;  // a larger gemm_min_rows turns the GEMM off (buffers scale with it)
// Prompt passes of at least this many rows take the tiled attention (FLEXQUANT_CUDA_TILED_ATTENTION=1):
// fewer make too few blocks of 32 queries to fill the GPU (to be measured).
constexpr int64_t PREFILL_ATTENTION_ROWS = 64;
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

// Blocks (row, part): a row of a few thousand values split over `row_parts` blocks, so that a decode
// step's single row is not one block's serial loop (the 4096-wide embedding row: 7.5 µs in one
// block, 1.8 µs in 16, on an H100).
dim3 row_parts(int64_t T, int64_t n) {
    return dim3(unsigned(T), unsigned(std::min<int64_t>((n + THREADS - 1) / THREADS, 16)));
}

// x (T, D) = embd[tokens] as fp32; ids were checked by the engine, clamped anyway (no OOB read).
template <class E>
static __global__ void __launch_bounds__(THREADS)
embed_kernel(const E* __restrict__ embd, int64_t vocab, int64_t D, const int32_t* __restrict__ tokens,
             float* __restrict__ x) {
    pdl_begin();  // cuda_backend.h: launched with PDL in the engine's passes
    const int64_t t = blockIdx.x;
    const int64_t id = min(max(int64_t(tokens[t]), int64_t(0)), vocab - 1);
    for (int64_t i = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; i < D; i += int64_t(gridDim.y) * blockDim.x)
        x[t * D + i] = float(embd[id * D + i]);
}

// Programmatic dependent launch for the passes (cuda_backend.h): FLEXQUANT_CUDA_PDL=1 asks for it,
// and it needs compute capability 9.0 (Hopper) or newer and kernels built from sm_90+ code (a build
// for sm_80 alone, JIT-compiled on a Hopper, has no griddepcontrol: its kernels would not wait).
// Off by default until it is measured to win on the decode step (tools/bench.py --variant).
bool pdl_from_env() {
    if (!cuda_env_flag("FLEXQUANT_CUDA_PDL")) return false;
    int device = 0, major = 0;
    cudaFuncAttributes attr{};
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaFuncGetAttributes(&attr, embed_kernel<float>) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    return major >= 9 && attr.ptxVersion >= 90;
}

}  // namespace

struct CudaForward::Impl {
    ModelConfig cfg;
    CudaForwardParams p;
    BitplaneCudaPath path = BITPLANE_CUDA_AUTO;  // the engine's: FP32 with fp32_matmul, else AUTO
    // Per linear (n_lin): TC (int8 activations; MMA kernel per kernels[j].mma_from), MMA_A16 (fp16) or FP32
    // (fp32 activations), the engine's path resolved, then as set_activation_bits chose (calibration
    // keeps more precision in sensitive layers).
    std::vector<BitplaneCudaPath> lin_path;
    int64_t n_lin = 0;  // n_layers * 7 + 1
    int n_splits = 1;   // attention spans at decode
    bool use_gemm = false;     // prompt slices of >= p.gemm_min_rows rows on the tensor-core GEMM
    bool pdl = false;          // launch the pass's kernels with PDL (pdl_from_env)
    // Prompt passes of >= PREFILL_ATTENTION_ROWS rows take the tiled attention kernel
    // (attention_prefill_launch): FLEXQUANT_CUDA_TILED_ATTENTION=1, off by default until measured.
    bool tiled_attention = false;
    int64_t pass_p0 = -1;   // the pass being enqueued: one sequence's positions pass_p0.. (-1: any rows)
    int64_t pass_base = 0;  // and that sequence's first cache row
    // Per linear: whether the wgmma GEMM (BITPLANE_GEMM_A8_WG) can run it (a Hopper GPU, sm_90a code,
    // a group size it takes), and whether it is the default int8 GEMM (FLEXQUANT_CUDA_WGMMA=1: off
    // until measured; a kernel table chooses per shape and bit-width).
    std::vector<char> wgmma_ok;
    bool wgmma_default = false;
    int64_t max_rows = SLICE;  // rows per pass: PREFILL_ROWS with the GEMM, else one GEMV launch's (8 or 16)
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
    float *x = nullptr, *h = nullptr, *q = nullptr, *k = nullptr, *v = nullptr, *att = nullptr;
    float *g = nullptr, *u = nullptr, *logits = nullptr, *partial = nullptr;
    void* ws = nullptr;  // the GEMV's scratch (the prepared input of the current linears, <= 8 rows; MMA 16)
    size_t ws_bytes = 0;
    void* ws_gemm = nullptr;  // the GEMM's (codes of one linear, the pass's activations): apart, so
    size_t ws_gemm_bytes = 0; // that a GEMM between two GEMV linears keeps their prepared input
    // The dispatcher's choices (set_kernel_table: the defaults, then the table's entries), per linear:
    // per bit-width the most rows the GEMV takes before the GEMM does and whether that GEMM is A8_WG
    // (int8 linears); the rows from which its int8 GEMV launches run the MMA kernel (0: never).
    std::vector<KernelChoice> table;
    std::vector<dispatch::LinearKernels> kernels;  // (n_lin)
    std::vector<dispatch::LinearSlot> slots() const;
    void apply_table();
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
    // The captured step's kernel per linear (step_choice at capture): a table may choose the GEMM for
    // one row at some bit-widths only, or another GEMM, so a mask that changes the choice re-captures.
    // Checked per decode step in place (no allocation on that path).
    std::vector<char> graph_choice;
    char step_choice(size_t j) const { return on_gemm(j, 1) ? char(1 + int(gemm_kind(j))) : 0; }
    void record_graph_choice() {
        graph_choice.resize(size_t(n_lin));
        for (size_t j = 0; j < graph_choice.size(); ++j) graph_choice[j] = step_choice(j);
    }
    bool graph_choice_stale() const {
        for (size_t j = 0; j < graph_choice.size(); ++j)
            if (graph_choice[j] != step_choice(j)) return true;
        return false;
    }
    int replays = 0;
    // A call that threw after queuing work may have left a copy of the pinned step input pending:
    // the next call waits for the stream before it rewrites the block. No cost on the normal path.
    bool pending = false;
    void settle() {
        if (pending) cudaStreamSynchronize(stream);  // an error here resurfaces at the next check
        pending = false;
    }
    void drop_graph();

    ~Impl() {
        // work a throwing call left queued (pending) may still read the buffers freed below
        if (stream) cudaStreamSynchronize(stream);
        if (graph_exec) cudaGraphExecDestroy(graph_exec);
        if (graph) cudaGraphDestroy(graph);
        if (in_host) cudaFreeHost(in_host);
        if (out_host) cudaFreeHost(out_host);
        if (arena) cudaFree(arena);
        if (stream) cudaStreamDestroy(stream);
    }

    // The kernel linear j runs on for T rows: the host copy of the step's bits picks the table entry
    // (the kernels themselves read the bits from device memory).
    size_t host_bits(size_t j) const {
        return size_t(std::clamp(reinterpret_cast<const int32_t*>(in_host + in_bits)[j], 0, 8));
    }
    bool on_gemm(size_t j, int64_t T) const {
        if (!use_gemm || j + 1 >= size_t(n_lin)) return false;  // the LM head: the GEMV
        if (lin_path[j] == BITPLANE_CUDA_FP32) return false;  // fp32 activations: the GEMMs have int8 or fp16
        return T > kernels[j].gemv_max[host_bits(j)];
    }
    // The GEMM of linear j at the step's bit-width: the activations its GEMV path has (int8: A8, or
    // A8_WG where gemm_wg says so; fp16: A16).
    BitplaneGemmKind gemm_kind(size_t j) const {
        if (lin_path[j] == BITPLANE_CUDA_MMA_A16) return BITPLANE_GEMM_A16;
        return kernels[j].gemm_wg[host_bits(j)] ? BITPLANE_GEMM_A8_WG : BITPLANE_GEMM_A8;
    }
    // The GEMV kernel of linear j for a launch of `rows` rows: the TC path's preparation also serves
    // the MMA kernel (s8 tensor cores), which runs from kernels[j].mma_from rows where the group size allows
    // it. Not a function of the bit-width, so the captured decode step stays valid under any mask.
    BitplaneCudaPath gemv_kernel(size_t j, int64_t rows) const {
        const int from = kernels[j].mma_from;
        const bool mma = lin_path[j] == BITPLANE_CUDA_TC && from > 0 && rows >= from &&
                         bitplane_cuda_mma_supports(lin[j].group_size);
        return mma ? BITPLANE_CUDA_MMA : lin_path[j];
    }
    // The kernel of T rows that may not fit one launch: the full slices' (the sliced call runs every
    // slice, a last partial one too, on the kernel it is given).
    BitplaneCudaPath gemv_slices_kernel(size_t j, int64_t T) const {
        return gemv_kernel(j, std::min<int64_t>(T, MMA_SLICE));
    }
    // Rows one GEMV launch of linear j takes when T rows come: 16 on the MMA kernel, else 8.
    int64_t gemv_launch_rows(size_t j, int64_t T) const {
        return bitplane_cuda_launch_rows(gemv_slices_kernel(j, T));
    }
    // Linears js, all reading xin (T rows), into ys. xin is prepared once per kernel family (q, k
    // and v; gate and up share it): for the GEMM always, for the GEMV when T fits one launch (8 rows,
    // 16 on the MMA kernels; with more rows the GEMV slices and prepares each slice), and the GEMV
    // linears that read one prepared input run in one launch
    // (bitplane_matmul_prepared_multi_cuda_async: q, k and v as one grid).
    // accumulate: ys += the products (the residual adds of o and down, fused into the kernels'
    // stores: two launches fewer per layer). prepared: the group size the GEMV scratch already holds
    // xin for (fused_prepare), else 0.
    void linears(std::initializer_list<size_t> js, const float* xin, int64_t T, std::initializer_list<float*> ys,
                 bool accumulate = false, int prepared = 0) {
        // a prepared input serves linears of the same group size and path (k is xin's width for all
        // of them): fused_prepare prepares for the TC path
        int prepared_g = prepared, gemm_prepared_g = 0;
        BitplaneGemmKind gemm_prepared_kind = BITPLANE_GEMM_A8;
        BitplaneCudaPath prepared_path = BITPLANE_CUDA_TC, batch_kernel = BITPLANE_CUDA_TC;
        // GEMV linears waiting for their one launch: all read the scratch as prepared for prepared_g
        BitplaneLinear batch[BITPLANE_MAX_MULTI];
        float* batch_y[BITPLANE_MAX_MULTI];
        const int32_t* batch_bits[BITPLANE_MAX_MULTI];
        int n_batch = 0;
        auto flush = [&] {
            if (n_batch > 0)
                bitplane_matmul_prepared_multi_cuda_async(batch, n_batch, p.bits_cap, T, batch_y, ws, ws_bytes,
                                                          batch_kernel, stream, batch_bits, accumulate);
            n_batch = 0;
        };
        auto y = ys.begin();
        for (size_t j : js) {
            float* out = *y++;
            const int g = lin[j].group_size;
            if (on_gemm(j, T)) {
                const BitplaneGemmKind kind = gemm_kind(j);
                if (gemm_prepared_g != g || gemm_prepared_kind != kind)
                    bitplane_gemm_prepare_cuda_async(lin[j], xin, T, ws_gemm, ws_gemm_bytes, kind, stream);
                gemm_prepared_g = g;
                gemm_prepared_kind = kind;
                bitplane_gemm_prepared_cuda_async(lin[j], p.bits_cap, T, out, ws_gemm, ws_gemm_bytes, kind,
                                                  stream, bits_dev() + j, 0, accumulate);
            } else if (T <= gemv_launch_rows(j, T)) {
                const BitplaneCudaPath pj = lin_path[j], kj = gemv_kernel(j, T);
                const bool same_input = prepared_g == g && prepared_path == pj;
                // (one launch runs one kernel: linears of one shape share it, q and k/v may not)
                const bool joins = same_input && n_batch > 0 && n_batch < BITPLANE_MAX_MULTI &&
                                   batch[0].max_bits == lin[j].max_bits && batch_kernel == kj;
                if (!joins) flush();  // (before a new preparation overwrites the scratch it reads)
                // (prepared for the kernel that will run: TC and MMA share the preparation, MMA takes
                // 16 rows; for T <= 8 either kernel reads the other's)
                if (!same_input) bitplane_prepare_cuda_async(lin[j], xin, T, ws, ws_bytes, kj, stream);
                prepared_g = g;
                prepared_path = pj;
                batch_kernel = kj;
                batch[n_batch] = lin[j];
                batch_y[n_batch] = out;
                batch_bits[n_batch] = bits_dev() + j;
                ++n_batch;
            } else {
                flush();  // the batch reads the scratch that the slices below overwrite
                bitplane_matmul_cuda_async(lin[j], p.bits_cap, xin, T, out, ws, ws_bytes,
                                           gemv_slices_kernel(j, T), stream, {}, bits_dev() + j,
                                           accumulate);
                prepared_g = 0;  // the slices overwrote the GEMV's prepared input
            }
        }
        flush();
    }
    // out = op(xin, aux) (RMSNorm with weight aux, or SwiGLU with up = aux) for the linears j, ...
    // reading out next: one fused launch that also prepares out for the GEMV when it will run it
    // (TC path, T within one launch; returns the group size prepared, for linears()), else the op
    // alone (0).
    int fused_prepare(BitplanePrepareFusion op, const float* xin, const float* aux, int64_t T, float* out, size_t j) {
        const BitplaneLinear& w = lin[j];
        if (lin_path[j] == BITPLANE_CUDA_TC && T <= gemv_launch_rows(j, T)) {
            bitplane_prepare_fused_cuda_async(w, op, xin, aux, cfg.rms_norm_eps, T, out, ws, ws_bytes, stream,
                                              gemv_kernel(j, T));
            return w.group_size;
        }
        if (op == BITPLANE_FUSE_RMS_NORM)
            rms_norm_launch(xin, aux, T, w.k, cfg.rms_norm_eps, out, stream);
        else
            swiglu_launch(xin, aux, T * w.k, out, stream);
        return 0;
    }
    // The kernels of one pass of T <= max_rows rows. head: run the LM head, on every row (all_rows,
    // T <= head_rows: logits (T, vocab) and signals (T)) or on the last one (logits row 0, signals 0);
    // a prompt's earlier passes skip it.
    void enqueue(int64_t T, bool head, bool all_rows);
};

void CudaForward::Impl::enqueue(int64_t T, bool head, bool all_rows) {
    const PdlScope pdl_scope(pdl);  // the launches below (and those of the captured graph) carry it
    const ModelConfig& c = cfg;
    const int64_t D = c.hidden, H = c.n_heads, Hkv = c.n_kv_heads, hd = c.head_dim, V = c.vocab;
    // The kernels launched here directly: a bad launch is named now, not at the next op's check.
    auto launched = [](const char* what) { cuda_check(cudaGetLastError(), std::string("CudaForward (") + what + ")"); };
    // Split attention's partial buffer holds SLICE x n_splits (row, span) pairs: up to SLICE rows get
    // n_splits spans each (the decode step), a longer pass fewer (it has T x H blocks besides).
    const int splits = int(std::clamp<int64_t>(int64_t(n_splits) * SLICE / T, 1, n_splits));
    if (embd_f16)
        launch_kernel(embed_kernel<__half>, row_parts(T, D), dim3(THREADS), 0, stream, static_cast<const __half*>(embd), V,
                      D, tokens_dev(), x);
    else
        launch_kernel(embed_kernel<float>, row_parts(T, D), dim3(THREADS), 0, stream, static_cast<const float*>(embd), V, D,
                      tokens_dev(), x);
    launched("embed_kernel");
    for (int64_t l = 0; l < c.n_layers; ++l) {
        const size_t j0 = size_t(l) * LINEARS_PER_LAYER;
        int pg = fused_prepare(BITPLANE_FUSE_RMS_NORM, x, attn_norm[l], T, h, j0);  // h = rms_norm(x)
        linears({j0 + 0, j0 + 1, j0 + 2}, h, T, {q, k, v}, false, pg);  // q, k and v read the same h
        // rotate q and k, and write k and v to the cache rows of this pass
        rope_kv_store_launch(inv_freq, int(hd), q, H, k, v, Hkv, positions_dev(), bases_dev(), T, p.kv_f16, k_cache[l],
                             v_cache[l], stream);
        if (tiled_attention && pass_p0 >= 0 && T >= PREFILL_ATTENTION_ROWS && attention_prefill_supports(hd))
            attention_prefill_launch(q, k_cache[l], v_cache[l], p.kv_f16, T, pass_p0, pass_base, H, Hkv, hd, att, stream);
        else
            attention_launch(q, k_cache[l], v_cache[l], p.kv_f16, T, positions_dev(), H, Hkv, hd, splits, partial, att,
                             stream, bases_dev());
        launched("attention");
        linears({j0 + 3}, att, T, {x}, /*accumulate=*/true);  // x += att Woᵀ

        pg = fused_prepare(BITPLANE_FUSE_RMS_NORM, x, ffn_norm[l], T, h, j0 + 4);
        linears({j0 + 4, j0 + 5}, h, T, {g, u}, false, pg);  // gate and up read the same h
        pg = fused_prepare(BITPLANE_FUSE_SWIGLU, g, u, T, g, j0 + 6);  // g = silu(g) * u
        linears({j0 + 6}, g, T, {x}, /*accumulate=*/true, pg);  // x += (silu(gate) * up) Wdownᵀ
    }
    if (!head) return;
    // Only the rows whose logits are wanted go through the LM head (the largest linear).
    const int64_t first = all_rows ? 0 : T - 1, rows = T - first;
    const size_t j_head = size_t(n_lin - 1);
    const int pg = fused_prepare(BITPLANE_FUSE_RMS_NORM, x + first * D, out_norm, rows, h, j_head);
    // the GEMV, 8 rows per launch (16 on the MMA kernel)
    const int64_t head_step = gemv_launch_rows(j_head, rows);
    for (int64_t r0 = 0; r0 < rows; r0 += head_step) {
        const int64_t n = std::min<int64_t>(head_step, rows - r0);
        linears({j_head}, h + r0 * D, n, {logits + r0 * V}, false, r0 == 0 ? pg : 0);
    }
    entropy_and_top1_launch(logits, V, sig, stream, all_rows ? rows : 1);
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
    for (const BitplaneLinear& w : lin) e.lin_path.push_back(bitplane_cuda_resolve_path(w, e.path));
    e.pdl = pdl_from_env();
    e.tiled_attention = cuda_env_flag("FLEXQUANT_CUDA_TILED_ATTENTION");
    // (asked here, before any graph capture: the first answer per device launches a probe)
    e.wgmma_default = cuda_env_flag("FLEXQUANT_CUDA_WGMMA");
    for (const BitplaneLinear& w : lin) e.wgmma_ok.push_back(bitplane_gemm_wgmma_supported(w.group_size) ? 1 : 0);
    // Spans of >= 128 positions at full context, at most 32 of them (H * 32 blocks already fill a
    // GPU): each warp's positions are a chain of memory round trips (4 positions per trip), so a
    // long span is latency-bound before it is bandwidth-bound (spans of 256 measured 30 µs a layer
    // at 2048 positions, fp32 cache, on the H100: 2.2 TB/s).
    e.n_splits = int(std::clamp<int64_t>((params.n_ctx + 127) / 128, 1, 32));
    if (params.mma_min_rows < 0 || params.mma_min_rows > int(MMA_SLICE))
        throw Error(fn + ": mma_min_rows = " + std::to_string(params.mma_min_rows) + " is outside 0..16");
    // The GEMM computes with the int8 activations of the GEMV's TC path; where that path does not
    // apply (fp32 reference asked for, or a group size it lacks), prompts stay on the GEMV so that
    // prefill and decode use the same arithmetic.
    e.use_gemm = params.gemm_min_rows > 0 && params.gemm_min_rows <= MAX_GEMM_ROWS && !params.fp32_matmul;
    for (const BitplaneLinear& w : lin)
        if (bitplane_cuda_resolve_path(w, e.path) != BITPLANE_CUDA_TC) e.use_gemm = false;
    // Without the GEMM, passes of one GEMV launch: 16 rows where the MMA kernel may run, else 8.
    e.max_rows = e.use_gemm ? std::max<int64_t>(PREFILL_ROWS, params.gemm_min_rows)
                            : params.mma_min_rows > 0 ? MMA_SLICE : SLICE;
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
    const size_t off_att = a.take(R * qdim * 4);
    const size_t off_g = a.take(R * F * 4), off_u = a.take(R * F * 4);
    const size_t off_logits = a.take(size_t(e.head_rows) * V * 4);  // the LM head runs on at most head_rows rows
    // split attention for every row of a slice of <= SLICE rows: a prefill slice of a long prompt
    // scans the whole cache
    const size_t off_partial = a.take(SLICE * size_t(c.n_heads) * e.n_splits * (hd + 2) * 4);
    for (size_t j = 0; j < lin.size(); ++j) {
        // every path set_activation_bits may move a linear to: FP32, TC (and MMA), MMA_A16
        e.ws_bytes = std::max(e.ws_bytes, bitplane_matmul_cuda_workspace(lin[j], SLICE, BITPLANE_CUDA_FP32));
        if (e.lin_path[j] == BITPLANE_CUDA_TC) {  // TC's 8 rows, and MMA's 16 where a table may choose it
            e.ws_bytes = std::max(e.ws_bytes, bitplane_matmul_cuda_workspace(lin[j], SLICE, BITPLANE_CUDA_TC));
            if (bitplane_cuda_mma_supports(lin[j].group_size))
                e.ws_bytes = std::max(e.ws_bytes, bitplane_matmul_cuda_workspace(lin[j], MMA_SLICE, BITPLANE_CUDA_MMA));
        }
        const bool fp16_ok = !params.fp32_matmul && bitplane_cuda_mma_supports(lin[j].group_size);
        if (fp16_ok)
            e.ws_bytes = std::max(e.ws_bytes, bitplane_matmul_cuda_workspace(lin[j], MMA_SLICE, BITPLANE_CUDA_MMA_A16));
        // the GEMM's scratch (codes of one linear + the pass's activations, int8 or fp16); never for
        // the LM head
        if (e.use_gemm && j + 1 < lin.size()) {
            e.ws_gemm_bytes = std::max(e.ws_gemm_bytes, bitplane_gemm_cuda_workspace(lin[j], R, BITPLANE_GEMM_A8));
            if (e.wgmma_ok[j])  // (a table may choose it)
                e.ws_gemm_bytes = std::max(e.ws_gemm_bytes, bitplane_gemm_cuda_workspace(lin[j], R, BITPLANE_GEMM_A8_WG));
            if (fp16_ok)
                e.ws_gemm_bytes = std::max(e.ws_gemm_bytes, bitplane_gemm_cuda_workspace(lin[j], R, BITPLANE_GEMM_A16));
        }
    }
    const size_t off_ws = a.take(e.ws_bytes);
    const size_t off_ws_gemm = a.take(e.ws_gemm_bytes);
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
    e.apply_table();  // no table yet: the defaults
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
    e.g = f(off_g), e.u = f(off_u), e.logits = f(off_logits), e.partial = f(off_partial);
    e.ws = e.arena + off_ws;
    e.ws_gemm = e.ws_gemm_bytes ? e.arena + off_ws_gemm : nullptr;
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
    // Passes of up to max_rows (each linear then picks its kernel); all rows' logits: SLICE rows
    // (<= head_rows).
    const int64_t pass_rows = all_logits == nullptr ? e.max_rows : SLICE;
    int64_t rows = 0;
    for (int64_t t0 = 0; t0 < T; t0 += rows) {
        rows = std::min<int64_t>(pass_rows, T - t0);
        const bool last = t0 + rows == T;
        for (int64_t t = 0; t < rows; ++t) e.set_row(t, tokens[t0 + t], n_past + t0 + t, seq);
        e.pass_p0 = n_past + t0;  // (the captured one-row step never takes the tiled attention)
        e.pass_base = int64_t(seq) * e.p.n_ctx;
        // The copy reads the pinned block when the stream reaches it: the host must not rewrite the
        // block before then, so each pass waits for the previous one (prefill only; a decode step
        // is one pass).
        e.pending = true;
        cuda_check(cudaMemcpyAsync(e.in_dev, e.in_host, e.in_bytes, cudaMemcpyHostToDevice, e.stream), fn + " (step input)");
        const bool all_rows = all_logits != nullptr;
        if (rows == 1 && !all_rows && e.p.use_graph) {
            // (with tune()'s tables one row stays on the GEMV at every bit-width, so this re-captures
            // only under hand-made tables or gemm_min_rows = 1 with a partial table)
            if (e.graph_exec && e.graph_choice_stale()) e.drop_graph();
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
                e.record_graph_choice();
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
    // Passes of distinct sequences, up to head_rows (<= max_rows) rows each.
    int64_t rows = 0;
    for (int64_t r0 = 0; r0 < count; r0 += rows) {
        rows = std::min<int64_t>(e.head_rows, count - r0);
        for (int64_t t = 0; t < rows; ++t) e.set_row(t, tokens[r0 + t], positions[r0 + t], seqs[r0 + t]);
        e.pass_p0 = -1;  // rows of several sequences
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

// The captured decode step holds the kernel choice it was captured with: a new table drops it, so
// the next step captures again.
void CudaForward::Impl::drop_graph() {
    settle();
    if (graph_exec) cudaGraphExecDestroy(graph_exec);
    if (graph) cudaGraphDestroy(graph);
    graph_exec = nullptr;
    graph = nullptr;
}

// The table through dispatch::apply (cpp/src/kernel_dispatch.h): the defaults, then each entry on
// the layer linears of its shape and activation family. Never throws: set_kernel_table checked the
// table, and a kernel a linear cannot run is skipped (a8_wg where wgmma_ok is false; MMA at a group
// size it lacks: gemv_kernel checks that).
std::vector<dispatch::LinearSlot> CudaForward::Impl::slots() const {
    std::vector<dispatch::LinearSlot> out(static_cast<size_t>(n_lin));
    for (size_t j = 0; j < size_t(n_lin); ++j) {
        out[j].n = lin[j].n;
        out[j].k = lin[j].k;
        out[j].act_bits = lin_path[j] == BITPLANE_CUDA_TC ? 8 : lin_path[j] == BITPLANE_CUDA_MMA_A16 ? 16 : 0;
        out[j].wgmma_ok = wgmma_ok[j] != 0;
        out[j].layer = j + 1 < size_t(n_lin);
    }
    return out;
}

void CudaForward::Impl::apply_table() {
    kernels = dispatch::apply(table, slots(), use_gemm ? p.gemm_min_rows : 0, wgmma_default, p.mma_min_rows);
}

void CudaForward::set_kernel_table(const std::vector<KernelChoice>& table) {
    Impl& e = *impl_;
    // (Engine::set_kernel_table checked each entry's fields; here what this GPU and model can run)
    const std::string why = dispatch::refusal(table, e.slots(), [&](size_t j) { return e.lin[j].group_size; });
    if (!why.empty()) throw Error(why);
    e.drop_graph();  // the captured step holds the kernel choice
    e.table = table;
    e.apply_table();
}

void CudaForward::set_activation_bits(const std::vector<int32_t>& bits) {
    Impl& e = *impl_;
    const std::string fn = "CudaForward::set_activation_bits";
    if (int64_t(bits.size()) != e.n_lin)
        throw Error(fn + ": " + std::to_string(bits.size()) + " entries, expected n_layers * 7 + 1 = " +
                    std::to_string(e.n_lin));
    std::vector<BitplaneCudaPath> next(bits.size());
    for (size_t j = 0; j < bits.size(); ++j) {
        const int b = bits[j];
        const int gs = e.lin[j].group_size;
        const std::string lin = fn + ": linear " + std::to_string(j);
        if (b != 0 && b != 8 && b != 16)
            throw Error(lin + ": activation bits " + std::to_string(b) + " (the GPU runs 8, 16 or 0)");
        if (b != 0 && e.p.fp32_matmul)
            throw Error(lin + " cannot take " + (b == 8 ? "int8" : "fp16") +
                        " activations (the engine was opened with cuda_fp32_matmul)");
        if (b == 8 && !bitplane_cuda_tc_supports(gs))
            throw Error(lin + " cannot take int8 activations (group size " + std::to_string(gs) +
                        " is not one of 32, 64, 128, 256, 512)");
        if (b == 16 && !bitplane_cuda_mma_supports(gs))
            throw Error(lin + " cannot take fp16 activations (group size " + std::to_string(gs) +
                        " is not one of 128, 256, 512)");
        next[j] = b == 0 ? BITPLANE_CUDA_FP32 : b == 8 ? BITPLANE_CUDA_TC : BITPLANE_CUDA_MMA_A16;
    }
    if (next == e.lin_path) return;
    e.drop_graph();  // the captured step holds each linear's kernel family
    e.lin_path = next;
    e.apply_table();  // the table's entries are per activation family
}

std::vector<int32_t> CudaForward::activation_bits() const {
    std::vector<int32_t> out;
    for (BitplaneCudaPath p : impl_->lin_path)
        out.push_back(p == BITPLANE_CUDA_TC ? 8 : p == BITPLANE_CUDA_MMA_A16 ? 16 : 0);
    return out;
}

// The measurements of dispatch::choose (cpp/src/kernel_dispatch.h, which decides and documents the
// rules) on this GPU.
std::vector<KernelChoice> CudaForward::tune(int64_t max_m, int repeats) {
    Impl& e = *impl_;
    const std::string fn = "CudaForward::tune";
    if (!e.use_gemm)
        throw Error(fn + ": the GEMM is off (cuda_gemm_min_rows = 0 or > 4096, cuda_fp32_matmul, or a group size "
                         "the int8 path lacks): every linear runs on the GEMV");
    if (max_m < 2 * SLICE || max_m > e.max_rows)
        throw Error(fn + ": max_m = " + std::to_string(max_m) + " is outside " + std::to_string(2 * SLICE) + ".." +
                    std::to_string(e.max_rows));
    if (repeats < 1 || repeats > 100) throw Error(fn + ": repeats = " + std::to_string(repeats) + " is outside 1..100");
    e.settle();
    // The GEMMs are also checked on this many rows: past two row tiles, the third one partial.
    const int64_t odd_rows = std::min<int64_t>(300, e.max_rows);
    const int64_t check_m = std::max(max_m, odd_rows);
    // The layer linears by shape and activation family (int8: TC path, fp16: MMA_A16; fp32 ones
    // never take a GEMM; the LM head always runs on the GEMV). Each timing runs a group's linears of
    // every layer back to back: different weights, so the planes come from HBM as in a forward
    // pass, not from L2.
    struct Group {
        dispatch::TuneGroup spec;
        std::vector<size_t> members;
    };
    std::vector<Group> groups;
    const std::vector<dispatch::LinearSlot> slots = e.slots();
    int64_t max_k = 0, max_n = 0;
    for (size_t j = 0; j + 1 < size_t(e.n_lin); ++j) {
        const BitplaneCudaPath pj = e.lin_path[j];
        if (pj != BITPLANE_CUDA_TC && pj != BITPLANE_CUDA_MMA_A16) continue;
        const bool int8 = pj == BITPLANE_CUDA_TC;
        auto it = std::find_if(groups.begin(), groups.end(), [&](const Group& g) {
            return g.spec.n == e.lin[j].n && g.spec.k == e.lin[j].k && g.spec.int8 == int8;
        });
        if (it == groups.end()) {
            dispatch::TuneGroup spec;
            spec.n = e.lin[j].n;
            spec.k = e.lin[j].k;
            spec.int8 = int8;
            spec.mma_ok = int8 && bitplane_cuda_mma_supports(e.lin[j].group_size);
            // (a8_wg only where every layer linear of the shape can run it, as set_kernel_table asks)
            spec.wgmma_ok = int8 && dispatch::a8_wg_blocker(slots, spec.n, spec.k) == slots.size();
            spec.bits_min = BITS_MIN;
            spec.bits_max = e.p.bits_cap;
            spec.max_m = max_m;
            spec.odd_rows = odd_rows;
            spec.all_rows = std::max(PREFILL_ROWS, MAX_GEMM_ROWS);  // (>= any engine's max_rows)
            it = groups.insert(groups.end(), Group{spec, {}});
        }
        it->members.push_back(j);
        max_k = std::max(max_k, e.lin[j].k);
        max_n = std::max(max_n, e.lin[j].n);
    }
    std::vector<KernelChoice> table;
    if (groups.empty()) {  // every layer linear on fp32 activations: nothing to choose
        set_kernel_table(table);
        return table;
    }
    // Random activations (a fixed LCG, uniform in [-1, 1)): the correctness checks need values of
    // both signs everywhere, so that a permutation or a dropped term shows; the timings do not
    // depend on them.
    std::vector<float> xh(size_t(check_m * max_k));
    uint32_t r = 2024u;
    for (float& v : xh) {
        r = r * 1664525u + 1013904223u;
        v = float(r >> 8) / 8388608.0f - 1.0f;
    }
    DeviceBuffer<float> x(xh.size(), fn), y(size_t(check_m * max_n), fn), y_ref(size_t(check_m * max_n), fn);
    // (on e.stream, so that the kernels below read x after it: a plain cudaMemcpy from pageable
    // memory may return before its DMA ends, and e.stream does not wait for the default stream)
    cuda_check(cudaMemcpyAsync(x.get(), xh.data(), xh.size() * 4, cudaMemcpyHostToDevice, e.stream), fn + " (x)");
    CudaEvent start_ev(fn), stop_ev(fn);
    cudaEvent_t start = start_ev.e, stop = stop_ev.e;
    // A test hook: FLEXQUANT_CUDA_TUNE_FAULT=<kernel> (mma, a8, a8_wg, a16) corrupts one output
    // element of that kernel in the correctness check, as a wrong kernel would (the GPU tests use it
    // to see that the check rejects it).
    const char* fault_env = std::getenv("FLEXQUANT_CUDA_TUNE_FAULT");
    const std::string fault = fault_env ? fault_env : "";

    // One product of linear j at `bits` on m rows of x into out, on the kernel named `kernel`.
    auto run = [&](const std::string& kernel, size_t j, int bits, int64_t m, float* out) {
        const BitplaneGemmKind kind = kernel == "a8" ? BITPLANE_GEMM_A8 : kernel == "a8_wg" ? BITPLANE_GEMM_A8_WG
                                      : kernel == "a16" ? BITPLANE_GEMM_A16 : BitplaneGemmKind(0);
        if (kind != BitplaneGemmKind(0)) {
            bitplane_gemm_cuda_async(e.lin[j], bits, x.get(), m, out, e.ws_gemm, e.ws_gemm_bytes, kind, e.stream);
            return;
        }
        const BitplaneCudaPath path = kernel == "tc" ? BITPLANE_CUDA_TC : kernel == "mma" ? BITPLANE_CUDA_MMA
                                      : kernel == "mma_a16" ? BITPLANE_CUDA_MMA_A16 : BITPLANE_CUDA_AUTO;
        if (path == BITPLANE_CUDA_AUTO) throw Error(fn + ": no kernel '" + kernel + "'");
        bitplane_matmul_cuda_async(e.lin[j], bits, x.get(), m, out, e.ws, e.ws_bytes, path, e.stream);
    };
    std::vector<float> got, want;
    dispatch::Probe probe;
    // all the linears of the groups gs, back to back
    probe.time = [&](const std::vector<size_t>& gs, const std::string& kernel, int bits, int64_t m) {
        float best = std::numeric_limits<float>::max();
        for (int rep = 0; rep <= repeats; ++rep) {  // rep 0 warms up
            cuda_check(cudaEventRecord(start, e.stream), fn);
            for (size_t gi : gs)
                for (size_t j : groups[gi].members) run(kernel, j, bits, m, y.get());
            cuda_check(cudaEventRecord(stop, e.stream), fn);
            cuda_check(cudaEventSynchronize(stop), fn + " (timing)");
            float ms = 0;
            cuda_check(cudaEventElapsedTime(&ms, start, stop), fn);
            if (rep > 0) best = std::min(best, ms);
        }
        return double(best);
    };
    // on group gi's first linear: the reference GEMV into y_ref, the kernel into y (poisoned first)
    probe.error = [&](size_t gi, const std::string& kernel, int bits, int64_t m) {
        const Group& g = groups[gi];
        const size_t j = g.members.front(), n = size_t(e.lin[j].n), count = size_t(m) * n;
        // both outputs poisoned (NaN): an element either kernel leaves unwritten shows
        cuda_check(cudaMemsetAsync(y_ref.get(), 0xff, count * 4, e.stream), fn + " (poison)");
        run(g.spec.int8 ? "tc" : "mma_a16", j, bits, m, y_ref.get());
        cuda_check(cudaMemsetAsync(y.get(), 0xff, count * 4, e.stream), fn + " (poison)");
        try {
            run(kernel, j, bits, m, y.get());
        } catch (const Error& ex) {
            // Refused by its entry point (validation, or a launch that could not start): the kernel
            // is left out. A fault of the device (sticky: the stream reports it) ends the tuning.
            const cudaError_t st = cudaStreamSynchronize(e.stream);
            cudaGetLastError();
            if (st != cudaSuccess) throw;
            throw dispatch::Refused(ex.what());
        }
        got.resize(count);
        want.resize(count);
        // (pageable destinations: these copies return when the data is in host memory)
        cuda_check(cudaMemcpyAsync(got.data(), y.get(), count * 4, cudaMemcpyDeviceToHost, e.stream), fn);
        cuda_check(cudaMemcpyAsync(want.data(), y_ref.get(), count * 4, cudaMemcpyDeviceToHost, e.stream), fn);
        cuda_check(cudaStreamSynchronize(e.stream), fn + " (check)");
        if (fault == kernel) got[count - 1] = want[count - 1] + 1.0f + std::fabs(want[count - 1]);
        // A reference that is not finite would score every kernel as agreeing (NaN compares false):
        // it is a broken reference kernel, which ends the tuning instead of deciding anything.
        for (size_t i = 0; i < count; ++i)
            if (!std::isfinite(want[i]))
                throw Error(fn + ": the reference GEMV (" + std::string(g.spec.int8 ? "tc" : "mma_a16") +
                            ") gave a non-finite output " + std::to_string(want[i]) + " at row " +
                            std::to_string(i / n) + ", column " + std::to_string(i % n) + " of linear " +
                            std::to_string(j) + " at " + std::to_string(bits) + " bits");
        double worst = 0;
        for (size_t row = 0; row < size_t(m); ++row) {
            double d2 = 0, r2 = 0;
            for (size_t i = row * n; i < (row + 1) * n; ++i) {
                if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
                const double d = double(got[i]) - double(want[i]);
                d2 += d * d;
                r2 += double(want[i]) * double(want[i]);
            }
            worst = std::max(worst, std::sqrt(d2 / std::max(r2, 1e-30)));
        }
        return worst;
    };
    try {
        std::vector<dispatch::TuneGroup> specs;
        for (const Group& g : groups) specs.push_back(g.spec);
        table = dispatch::choose(specs, probe);
    } catch (...) {
        cudaStreamSynchronize(e.stream);  // nothing of this call still runs when its buffers are freed
        throw;
    }
    set_kernel_table(table);
    return table;
}

}  // namespace flexquant

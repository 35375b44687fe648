// Internal: the CUDA backend (cuda/*.cu), as seen from the rest of the engine.
//
// The first part declares plain C++ entry points, so any engine file may include this header;
// call them only under `#ifdef FLEXQUANT_HAVE_CUDA` (defined when CMake built the backend). The
// part under __CUDACC__ is shared by the .cu files: error checking, device buffers, launchers.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "flexquant/engine.h"  // KernelChoice
#include "flexquant/error.h"
#include "flexquant/model_file.h"
#include "ops/ops.h"

namespace flexquant {

// Whether the environment variable `name` is exactly "1": the CUDA backend's opt-in switches
// (FLEXQUANT_CUDA_PDL, FLEXQUANT_CUDA_PREFETCH).
bool cuda_env_flag(const char* name);

// Number of CUDA devices this process can use; 0 when there is no driver or no GPU. Never throws:
// a CUDA build must run on the CPU on a machine without a GPU.
int cuda_device_count() noexcept;
// The name of CUDA device `device` ("" when there is none): part of the key of a saved kernel table.
std::string cuda_device_name(int device = 0);

// dequantize_linear (ops/dequantize.h) on the current CUDA device: uploads the first `bits` planes
// and the group params of `w`, computes W_k, downloads it. host_out: (w.n, w.k) fp32, host
// memory. Bit-exact with the CPU op. Throws flexquant::Error on a bad bit-width or any CUDA error.
void dequantize_linear_cuda(const BitPlaneLinear& w, int bits, float* host_out /* (n, k) */);

// ---- the decode ops, host memory in and out (tests): each runs the CUDA kernel of the op with the
// same stem (cuda/<op>.cu) on the current device, synchronously, and throws flexquant::Error on a bad
// size or any CUDA error. The device output is poisoned with NaN first, so a missed element shows.

// rms_norm (ops.h): y (m, d) = x * w / sqrt(mean(x^2) + eps) per row.
void rms_norm_cuda(const float* x /* (m, d) */, const float* w /* (d) */, int64_t m, int64_t d, float eps,
                   float* y /* (m, d) */);
// rope_ (ops.h) on q (m, n_heads, head_dim) and k (m, n_kv_heads, head_dim), in place, with the
// inv_freq table of rope_init and positions (m).
void rope_cuda(const float* inv_freq /* (head_dim / 2) */, int head_dim, float* q, int64_t n_heads, float* k,
               int64_t n_kv_heads, const int64_t* positions /* (m) */, int64_t m);
// swiglu (ops.h): out (n) = silu(gate) * up.
void swiglu_cuda(const float* gate, const float* up, int64_t n, float* out);
// attention / attention_f16 (ops.h): cache (t_max >= base + p0 + m, n_kv_heads, head_dim), fp32 or
// fp16 bit patterns (kv_f16), the sequence's position 0 at cache row `base` (one sequence's block of a
// multi-sequence cache; base > 0 goes through the per-query bases of the kernel). n_splits > 1 cuts
// the positions of each (token, head) into that many spans and merges them (the decode path); 1
// takes them all in one block. prefill: the tiled kernel of a prompt pass instead
// (attention_prefill_launch; n_splits unused).
void attention_cuda(const float* q /* (m, H, d) */, const void* k_cache, const void* v_cache, bool kv_f16,
                    int64_t t_max, int64_t m, int64_t p0, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                    int n_splits, float* out /* (m, H, d) */, int64_t base = 0, bool prefill = false);
// entropy_and_top1 and argmax (ops.h) of one logit vector (vocab).
void entropy_and_top1_cuda(const float* logits, int64_t vocab, float* entropy, float* top1_prob, int64_t* argmax);

// The forward pass on the GPU, owned by flexquant::Engine when it runs with backend CUDA. It holds
// the weights in device memory (the first `bits_cap` planes of every linear, the group params, the
// embedding, the norms), the KV cache, scratch, and the CUDA graph of the one-token decode step.
// Construction throws flexquant::Error naming what failed (e.g. bytes needed and free) and leaves
// nothing allocated.
struct CudaForwardParams {
    int bits_cap = 8;          // planes uploaded per linear: 2..the model's max_bits
    int64_t n_ctx = 0;         // KV-cache positions per sequence
    int n_seq = 1;             // sequences, each with its own n_ctx rows of the cache (1..4096)
    bool kv_f16 = false;       // fp16 KV cache (else fp32)
    bool fp32_matmul = false;  // fp32 activations in the bit-plane GEMV (the accuracy reference)
                               // instead of int8 activations on the binary tensor cores
    bool use_graph = true;     // replay the one-token step from a CUDA graph
    int64_t gemm_min_rows = 64;  // prompt slices of at least this many rows run their linears on the
                                 // tensor-core GEMM (int8 activations, as the GEMV); 0: never
    int mma_min_rows = 0;  // GEMV launches of at least this many rows (1..16) of the int8 path run the
                           // MMA kernel (s8 tensor cores, codes decoded in registers, 16 rows per
                           // launch) instead of the binary tensor cores (8), for group sizes
                           // 128/256/512; 0: never
};

class CudaForward {
public:
    // lin: n_layers * 7 linears (LinearKind order), then the LM head: views into the mapped file.
    // inv_freq: rope_init's table (head_dim / 2).
    CudaForward(const ModelFile& model, const std::vector<BitplaneLinear>& lin, const std::vector<float>& inv_freq,
                const CudaForwardParams& params);
    ~CudaForward();
    CudaForward(const CudaForward&) = delete;
    CudaForward& operator=(const CudaForward&) = delete;

    // Runs tokens (T >= 1, ids already checked) of sequence `seq` at positions [n_past, n_past + T),
    // n_past + T <= n_ctx, with bits (n_layers * 7 + 1) per linear (2..bits_cap; they reach the
    // kernels through device memory, so a new mask costs no re-capture), appending their K, V to the
    // sequence's cache. Writes the last token's logits (vocab), entropy and top-1 probability;
    // all_logits (T, vocab) is optional. One host synchronization per pass (one for a decode step).
    void forward(int seq, const int32_t* tokens, int64_t T, int64_t n_past, const int32_t* bits, float* logits,
                 float* all_logits, float* entropy, float* top1_prob);
    // One decode step of `count` distinct sequences seqs (count) with one token each (count, ids
    // checked), row i at position positions[i] (< n_ctx) of its sequence: the linears run on all
    // rows at once (the GEMM from gemm_min_rows rows, else the GEMV 8 rows per launch), attention
    // per row over its own sequence. logits (count, vocab), entropy and top1_prob (count).
    void decode_batch(const int32_t* seqs, const int32_t* tokens, const int64_t* positions, int64_t count,
                      const int32_t* bits, float* logits, float* entropy, float* top1_prob);
    // The dispatcher for the layer linears (the LM head always runs on the GEMV). Per linear and
    // bit-width: the GEMV up to gemv_max rows, the GEMM above; which GEMV kernel (TC or MMA, by
    // rows) and which GEMM (A8 or A8_WG for int8 activations; A16 for fp16). Without a table: the
    // GEMM from gemm_min_rows rows, MMA from mma_min_rows, A8_WG where FLEXQUANT_CUDA_WGMMA=1.
    // tune() measures, per layer-linear shape (n, k) and activation family (int8 or fp16, as
    // set_activation_bits left the linears), on random input, what dispatch::choose
    // (kernel_dispatch.h: the rules) asks: each candidate kernel's row error against the reference
    // GEMV on the shape's first linear, then timings of the shape's linears of every layer back to
    // back (the weights come from HBM). It applies the table and returns it (act_bits 8 or 16,
    // every field set). set_kernel_table checks a table (Engine::set_kernel_table checked each
    // entry on its own) against this GPU and these linears (dispatch::refusal: a8_wg where it
    // cannot run), then applies it (dispatch::apply); an empty table returns to the defaults. Both
    // drop the captured decode graph (it holds the kernel choice). tune() throws when the GEMM is
    // off.
    std::vector<KernelChoice> tune(int64_t max_m, int repeats);
    void set_kernel_table(const std::vector<KernelChoice>& table);
    // Activation precision per linear (n_layers * 7 + 1, LinearKind order, then the LM head): bits[j]
    // 8 runs linear j on int8 activations (TC path, or MMA per mma_min_rows; its group size must
    // allow it, and not with fp32_matmul), 16 on fp16 activations (MMA_A16 path: group sizes 128,
    // 256, 512; prompts on the A16 GEMM), 0 on the fp32-activation GEMV (FP32 path; prompts never
    // take a GEMM). A change drops the captured decode graph. Throws naming the linear; a bad call
    // changes nothing.
    void set_activation_bits(const std::vector<int32_t>& bits);
    std::vector<int32_t> activation_bits() const;  // per linear: 8 (int8), 16 (fp16) or 0 (fp32)
    uint64_t device_bytes() const;  // device memory held
    int graph_replays() const;      // one-token steps served from the captured graph so far

private:
    struct Impl;
    Impl* impl_;
};

}  // namespace flexquant

// (FLEXQUANT_SIMT: tests/cuda_host/simt, the CPU stand-in for CUDA that the tests build cuda/ with)
#if defined(__CUDACC__) || defined(FLEXQUANT_SIMT)
#include <cuda_runtime.h>

#include <atomic>

#include <cstdint>
#include <string>
#include <utility>

namespace flexquant {

// Throws flexquant::Error "CUDA error in <what>: <cudaGetErrorString>" unless err is cudaSuccess.
inline void cuda_check(cudaError_t err, const std::string& what) {
    if (err != cudaSuccess) throw Error("CUDA error in " + what + ": " + cudaGetErrorString(err));
}

// Device buffers are carved at 256-byte boundaries (cudaMalloc's own alignment), so any carved
// pointer is as aligned as a fresh allocation (16-byte plane loads, 256-byte workspaces).
inline size_t align256(size_t x) { return (x + 255) / 256 * 256; }

// Device memory for `count` elements of T, freed on scope exit (also when an error unwinds).
template <class T>
class DeviceBuffer {
public:
    DeviceBuffer(size_t count, const std::string& what) {
        cuda_check(cudaMalloc(&ptr_, count * sizeof(T)),
                   what + " (cudaMalloc of " + std::to_string(count * sizeof(T)) + " bytes)");
    }
    ~DeviceBuffer() {
        if (ptr_ != nullptr) cudaFree(ptr_);
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    T* get() const { return ptr_; }

private:
    T* ptr_ = nullptr;
};

// Launcher of the dequantize kernel (cuda/dequantize.cu): device pointers, no validation.
// planes: (bits, plane_bytes), the first `bits` planes of a linear; qparams: (n, n_groups, 2) fp16
// bits; out: (n, k) fp32.
void dequantize_linear_launch(const uint8_t* planes, uint64_t plane_bytes, const uint16_t* qparams,
                              float* out, int64_t n, int64_t k, int64_t k_pad, int64_t n_groups,
                              int group_size, int bits, int max_bits, cudaStream_t stream);

// ---- launchers of the decode ops (device pointers, sizes, a stream; no validation) ------------------

void rms_norm_launch(const float* x /* (m, d) */, const float* w /* (d) */, int64_t m, int64_t d, float eps,
                     float* y /* (m, d) */, cudaStream_t stream);
// positions (m) in device memory: the graph of the decode step reads the position the host wrote.
void rope_launch(const float* inv_freq /* (d / 2) */, int head_dim, float* q /* (m, H, d) */, int64_t n_heads,
                 float* k /* (m, Hkv, d) */, int64_t n_kv_heads, const int64_t* positions /* (m) */, int64_t m,
                 cudaStream_t stream);
// rope_launch, then the KV-cache write of the step in the same launch: the rotated k and v rows of
// token r go to cache row bases[r] + positions[r] of k_cache / v_cache ((rows, n_kv_heads, head_dim),
// fp16 when kv_f16, else fp32).
void rope_kv_store_launch(const float* inv_freq, int head_dim, float* q, int64_t n_heads, float* k, const float* v,
                          int64_t n_kv_heads, const int64_t* positions, const int64_t* bases, int64_t m, bool kv_f16,
                          void* k_cache, void* v_cache, cudaStream_t stream);
void swiglu_launch(const float* gate, const float* up, int64_t n, float* out, cudaStream_t stream);
// Query i sits at positions[i] and sees cache rows bases[i] + 0..positions[i] (device memory, see
// rope_launch; bases null: 0, one sequence). partial: (m, H, n_splits, head_dim + 2) floats of scratch
// when n_splits > 1, else unused. head_dim <= ATTENTION_MAX_HEAD_DIM.
constexpr int ATTENTION_MAX_HEAD_DIM = 256;
void attention_launch(const float* q /* (m, H, d) */, const void* k_cache, const void* v_cache, bool kv_f16,
                      int64_t m, const int64_t* positions /* (m) */, int64_t n_heads, int64_t n_kv_heads,
                      int64_t head_dim, int n_splits, float* partial, float* out /* (m, H, d) */,
                      cudaStream_t stream, const int64_t* bases /* (m) */ = nullptr);
// A prompt pass: the m rows of one sequence at consecutive positions p0 .. p0 + m - 1 (cache rows
// base + position), tiled over the queries so that each K and V row is read once per 32 queries
// (attention_launch reads it once per query). head_dim a multiple of 4 up to 128
// (attention_prefill_supports); positions and base are host values, so no captured graph uses it.
bool attention_prefill_supports(int64_t head_dim);
void attention_prefill_launch(const float* q /* (m, H, d) */, const void* k_cache, const void* v_cache, bool kv_f16,
                              int64_t m, int64_t p0, int64_t base, int64_t n_heads, int64_t n_kv_heads,
                              int64_t head_dim, float* out /* (m, H, d) */, cudaStream_t stream);
// out (rows): {entropy, top-1 probability, argmax} of each row of logits (rows, vocab).
struct StepSignalsDevice {
    float entropy;
    float top1_prob;
    int32_t argmax;
};
void entropy_and_top1_launch(const float* logits, int64_t vocab, StepSignalsDevice* out, cudaStream_t stream,
                             int64_t rows = 1);

// ---- programmatic dependent launch (PDL, compute capability >= 9.0) ---------------------------------
//
// A decode step is a chain of ~15 short kernels per layer, and each one's start (launch, the first
// memory round trip) waits for the end of the one before. With PDL a kernel may start while the one
// before it still runs: its blocks do the work that depends on nothing earlier (the GEMV loads its
// weight planes, which never change) and then wait. Rules, for every kernel launched through
// launch_kernel:
//  - pdl_wait() before reading anything an earlier kernel of the stream wrote, and before writing
//    anything at all (a kernel before it may still read that buffer); it returns once the kernel
//    before has completed and its writes are visible, which, as every kernel waits, means all
//    earlier kernels have. Read-only inputs (planes, group params, norm weights) and the step input
//    block (copied before the first kernel, which waits for the copy) may be read before it.
//  - pdl_launch_dependents() lets the next kernel start once every block of this one has called it
//    (or exited): called first thing, so the next kernel's blocks take the multiprocessors as this
//    one's blocks leave (all of this one's blocks are running by then, so none of them can be
//    crowded out).
// Both are no-ops on a launch without the attribute and on devices below sm_90.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// The usual start of a kernel with nothing to do before its inputs are ready.
__device__ __forceinline__ void pdl_begin() {
    pdl_launch_dependents();
    pdl_wait();
}

// Whether launch_kernel on this host thread adds the PDL attribute (cuda/device.cu). Off unless a
// PdlScope turned it on: the engine's passes, when FLEXQUANT_CUDA_PDL=1 on an sm_90+ device.
bool& pdl_enabled();
struct PdlScope {
    bool before;
    explicit PdlScope(bool on) : before(pdl_enabled()) { pdl_enabled() = on; }
    ~PdlScope() { pdl_enabled() = before; }
    PdlScope(const PdlScope&) = delete;
    PdlScope& operator=(const PdlScope&) = delete;
};

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute when pdl_enabled(). A bad
// launch is reported as by <<<>>>: through cudaGetLastError.
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = pdl_enabled() ? 1 : 0;
    cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);  // its error stays the last error
}

// Lets `kernel` take `bytes` of dynamic shared memory (more than the 48 KB a launch gets without
// asking), once per device: done is the caller's static set of devices (bit d, d < 64). Not a stream
// operation, so also fine while a graph is being captured.
template <class... Params>
void raise_dynamic_smem(void (*kernel)(Params...), size_t bytes, std::atomic<uint64_t>& done, const std::string& what) {
    int dev = 0;
    cuda_check(cudaGetDevice(&dev), what + " (device)");
    const uint64_t bit = uint64_t(1) << (dev & 63);
    if (done.load() & bit) return;
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
               what + " (shared memory)");
    done.fetch_or(bit);
}

// ---- shared device helpers -------------------------------------------------------------------------

// Σ (or max) of v over the block; every thread gets the result. blockDim.x a multiple of 32,
// <= 1024. Uses 32 slots of shared memory and syncs twice.
template <class T, class Op>
__device__ __forceinline__ T block_reduce(T v, Op op) {
    __shared__ T slots[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();  // the slots may still be read by a previous call
    if (lane == 0) slots[warp] = v;
    __syncthreads();
    v = slots[0];
    for (int w = 1; w < n_warps; ++w) v = op(v, slots[w]);
    return v;
}

// RMSNorm's pieces, shared by rms_norm_kernel (cuda/rms_norm.cu) and the GEMV's fused norm +
// activation preparation (cuda/bitplane_matmul.cu), so that both give the same bits.
// Σ x² of one row xr (d floats) in fp64, every thread of the block gets it: threads 0..255 sum in a
// fixed order (UNROLL 16-byte loads in flight each when vec: d % 4 == 0 and 16-byte aligned rows),
// and the threads past 255 of a larger block add zeros, which leave the sum unchanged.
constexpr int RMS_THREADS = 256, RMS_UNROLL = 4;
__device__ __forceinline__ double rms_row_sum_squares(const float* xr, int64_t d, bool vec) {
    double ss = 0.0;
    if (threadIdx.x < RMS_THREADS) {
        if (vec) {
            const int64_t d4 = d / 4;
            const float4* x4 = reinterpret_cast<const float4*>(xr);
            for (int64_t base = 0; base < d4; base += int64_t(RMS_THREADS) * RMS_UNROLL) {
                float4 v[RMS_UNROLL];
#pragma unroll
                for (int u = 0; u < RMS_UNROLL; ++u) {
                    const int64_t i = base + threadIdx.x + u * RMS_THREADS;
                    v[u] = i < d4 ? x4[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                }
#pragma unroll
                for (int u = 0; u < RMS_UNROLL; ++u)
                    ss += double(v[u].x) * double(v[u].x) + double(v[u].y) * double(v[u].y) +
                          double(v[u].z) * double(v[u].z) + double(v[u].w) * double(v[u].w);
            }
        } else {
            for (int64_t i = threadIdx.x; i < d; i += RMS_THREADS) ss += double(xr[i]) * double(xr[i]);
        }
    }
    return block_reduce(ss, [](double a, double b) { return a + b; });
}
// 1 / sqrt(mean(x²) + eps) with IEEE sqrt and division; y = (x · inv) · w, two roundings.
__device__ __forceinline__ float rms_inv(double ss, int64_t d, float eps) {
    const float mean = float(ss / double(d));
    return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
}
__device__ __forceinline__ float rms_apply(float x, float inv, float w) { return __fmul_rn(__fmul_rn(x, inv), w); }
// Whether rms_row_sum_squares may read rows of x (m, d) as float4 (w and y: the other operands).
__device__ __forceinline__ bool rms_vec(const float* x, const float* w, const float* y, int64_t d) {
    return d % 4 == 0 &&
           (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(y)) % 16 == 0;
}

// SwiGLU's element, shared by swiglu_kernel and the fused preparation: silu(g) · u, silu(g) =
// g / (1 + exp(-g)) with the accurate expf (exp(-g) = inf for g < -88: g / inf = -0, the limit).
__device__ __forceinline__ float silu_mul(float g, float u) {
    return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

// RAII holders of a non-blocking stream and an event, so that an error thrown mid-way (benchmarks,
// tuning) releases them.
struct CudaStream {
    cudaStream_t s = nullptr;
    explicit CudaStream(const std::string& what) {
        cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), what + " (stream)");
    }
    ~CudaStream() { if (s) cudaStreamDestroy(s); }
    CudaStream(const CudaStream&) = delete;
    CudaStream& operator=(const CudaStream&) = delete;
};
struct CudaEvent {
    cudaEvent_t e = nullptr;
    explicit CudaEvent(const std::string& what) { cuda_check(cudaEventCreate(&e), what + " (event)"); }
    ~CudaEvent() { if (e) cudaEventDestroy(e); }
    CudaEvent(const CudaEvent&) = delete;
    CudaEvent& operator=(const CudaEvent&) = delete;
};

// Host helpers for the test entry points: a device copy of host data, and the copy back.
template <class T>
void upload(DeviceBuffer<T>& d, const T* host, size_t count, const std::string& what) {
    cuda_check(cudaMemcpy(d.get(), host, count * sizeof(T), cudaMemcpyHostToDevice), what + " (upload)");
}
template <class T>
void download(T* host, const DeviceBuffer<T>& d, size_t count, const std::string& what) {
    // cudaMemcpy waits for the work on the legacy default stream: a kernel's error surfaces here.
    cuda_check(cudaMemcpy(host, d.get(), count * sizeof(T), cudaMemcpyDeviceToHost), what + " (download)");
}
// A device copy of a host bit-plane linear for the test and benchmark entry points: only its first
// `bits` planes travel (the k-bit view never reads the others), and its group params. `view` is
// the linear with the device pointers.
struct DeviceLinear {
    DeviceBuffer<uint8_t> planes;    // (bits, plane_bytes)
    DeviceBuffer<uint16_t> qparams;  // (n, n_groups, 2)
    BitplaneLinear view;
    DeviceLinear(const BitplaneLinear& w, int bits, const std::string& what)
        : planes(size_t(bits) * w.plane_bytes, what), qparams(size_t(w.n) * size_t(w.n_groups()) * 2, what), view(w) {
        upload(planes, w.planes, size_t(bits) * w.plane_bytes, what + " planes");
        upload(qparams, w.qparams, size_t(w.n) * size_t(w.n_groups()) * 2, what + " qparams");
        view.planes = planes.get();
        view.qparams = qparams.get();
    }
};

// NaN in every float (all-ones bits): an element a kernel fails to write shows up in the test.
template <class T>
void poison(DeviceBuffer<T>& d, size_t count, const std::string& what) {
    cuda_check(cudaMemset(d.get(), 0xff, count * sizeof(T)), what + " (poison)");
}
// A test entry point's output before the kernels run: y0 (host) when they accumulate onto it, else
// poison, so that an element they miss shows.
template <class T>
void start_output(DeviceBuffer<T>& d, const T* y0, size_t count, const std::string& what) {
    if (y0)
        upload(d, y0, count, what + " y0");
    else
        poison(d, count, what);
}

}  // namespace flexquant
#endif  // __CUDACC__ || FLEXQUANT_SIMT

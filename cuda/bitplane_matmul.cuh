// Internal: the CUDA bit-plane matmul (cuda/bitplane_matmul.cu), the GPU twin of the CPU op
// bitplane_matmul (cpp/src/ops/ops.h, same BitplaneLinear view):
//
//   y (m, n) = x (m, k) · W_bitsᵀ,  reading only the first `bits` planes of the tc8x512 layout.
//
// Plain C++ (no CUDA types), so the Python binding and the engine may include it; call it only
// under `#ifdef FLEXQUANT_HAVE_CUDA`. Every function throws flexquant::Error on a bad argument
// (the message starts with the function's name) or on any CUDA error.
//
// Two kernel families (BitplaneCudaPath):
//  - TC, "W{k}A8": each activation row is quantized per weight group to int8 (absmax / 127,
//    round half to even) and sliced into 8 bit planes; the products run on the binary tensor
//    cores (mma m16n8k256 b1 AND+POPC). The integer part is exact, so the result equals W_k · x̂
//    (x̂ = the dequantized int8 activations) up to fp32 rounding of the per-group terms; its
//    distance from W_k · x is the int8 quantization of x (~0.5% relative on Gaussian x, a few %
//    with outliers in a group; tools/gpu_check.sh prints it).
//    Group sizes 32, 64, 128, 256 and 512 (the groups must tile the 256-column chunks of the mma).
//  - MMA, "W{k}A8" too: the TC path's preparation and int8 activations (the same exact integer
//    sums per group; the fp32 epilogue differs in rounding only), but the codes are decoded from the
//    planes in registers and multiplied on the s8 tensor cores (mma m16n8k32), one mma per 32 K for
//    all m <= 16 rows at once (16 per launch), so its cost hardly grows with m (batched decode).
//    Group sizes 128, 256
//    and 512. Layout and arithmetic: cuda/bitplane_mma.cuh. Not yet measured on a GPU: opt-in.
//  - MMA_A16, "W{k}A16": the MMA kernel's loop with the activations rounded to fp16 (their own
//    preparation) and the codes converted to f16 exactly, mma m16n8k16 with fp32 accumulation:
//    near-fp32 accuracy at the MMA kernel's cost. Group sizes 128, 256, 512; up to 16 rows a launch.
//    The engine runs it for linears set to 16-bit activations (Engine::set_activation_bits).
//  - FP32: fp32 activations, bit-serial on the CUDA cores. Any group size; the accuracy reference.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "../cpp/src/ops/ops.h"  // BitplaneLinear (relative: this header is also reached from cpp/python)

struct CUstream_st;  // = cudaStream_t, without the CUDA headers

namespace flexquant {

enum BitplaneCudaPath {
  BITPLANE_CUDA_AUTO = 0,  // TC when bitplane_cuda_tc_supports(group_size), else FP32
  BITPLANE_CUDA_TC = 1,    // int8 activations, binary tensor cores (W{k}A8)
  BITPLANE_CUDA_FP32 = 2,  // fp32 activations, CUDA cores
  BITPLANE_CUDA_MMA = 3,   // int8 activations as TC (same preparation), s8 tensor cores (W{k}A8)
  BITPLANE_CUDA_MMA_A16 = 4,  // fp16 activations, the MMA kernel's loop on f16 tensor cores (W{k}A16)
};

// Tuning knobs (tests, benchmarks); the defaults are what the measurements chose.
struct BitplaneCudaTuning {
  int warps_per_block = 0;  // warps splitting K within a row tile, 1..16; 0: automatic (see the .cu)
  // 1: each warp asks L2 for the planes of its next super-chunk (one bulk prefetch per plane,
  // sm_90) before it computes the current one, so two super-chunks per warp are on their way from
  // HBM instead of one; 0: off; -1: the default, off unless FLEXQUANT_CUDA_PREFETCH=1 (until it is
  // measured to win). Never changes a result.
  int prefetch = -1;
};

// Internal, shared by the GEMV and the GEMM: throws flexquant::Error "<fn>: ..." unless the view is
// consistent (n, k > 0; max_bits 2..8; group_size a positive multiple of 32; bits 2..max_bits;
// plane_bytes as the tc8x512 layout needs) and m >= 0.
void check_bitplane_view(const BitplaneLinear& w, int bits, int64_t m, const std::string& fn);

// Whether the TC path handles this group size (32, 64, 128, 256, 512).
bool bitplane_cuda_tc_supports(int group_size);

// Whether the MMA path handles this group size (128, 256, 512).
bool bitplane_cuda_mma_supports(int group_size);

// Activation rows one launch of this path takes (the async entry points slice larger m): 16 for
// MMA and MMA_A16 (the 16 rows of their mma tile), 8 for TC and FP32.
int bitplane_cuda_launch_rows(BitplaneCudaPath path);

// The path AUTO resolves to for this linear (TC or FP32; MMA is only taken when asked for). Throws
// for a path that cannot run this linear's group size.
BitplaneCudaPath bitplane_cuda_resolve_path(const BitplaneLinear& w, BitplaneCudaPath path);

// Device scratch bytes bitplane_matmul_cuda_async needs for m activation rows (the activations
// in the kernel's order: int8 bit planes + group parameters, or permuted fp32 + word sums).
size_t bitplane_matmul_cuda_workspace(const BitplaneLinear& w, int64_t m, BitplaneCudaPath path);

// Device-resident product, asynchronous on `stream` (nullptr: the legacy default stream).
// w.planes (>= bits, plane_bytes), w.qparams (n, n_groups, 2), x (m, k) fp32, y (m, n) fp32 and
// workspace (workspace_bytes >= bitplane_matmul_cuda_workspace(w, m, path)) are device pointers.
// Any m >= 0 (launched in slices of bitplane_cuda_launch_rows(path) rows: two launches each, the
// activation preparation and the product). bits_dev (optional, device int32): the kernels read their bit-width from it when they
// run, clamped to 2..bits (`bits` planes must be present), so a CUDA graph captured once follows a
// mask the host rewrites between replays. accumulate: y (m, n) += the product (a fused residual add,
// the same one rounding as adding afterwards) instead of y = it.
void bitplane_matmul_cuda_async(const BitplaneLinear& w, int bits, const float* x, int64_t m, float* y,
                                void* workspace, size_t workspace_bytes, BitplaneCudaPath path,
                                CUstream_st* stream, const BitplaneCudaTuning& tuning = {},
                                const int32_t* bits_dev = nullptr, bool accumulate = false);

// The two halves of bitplane_matmul_cuda_async for m <= bitplane_cuda_launch_rows(path) rows (8; MMA:
// 16), so that linears reading the same
// input (q, k and v; gate and up) prepare it once. Prepare x (m, k) into the workspace for linears
// of w's k and group_size, then run any number of such linears from it (same path and m).
void bitplane_prepare_cuda_async(const BitplaneLinear& w, const float* x, int64_t m, void* workspace,
                                 size_t workspace_bytes, BitplaneCudaPath path, CUstream_st* stream);
void bitplane_matmul_prepared_cuda_async(const BitplaneLinear& w, int bits, int64_t m, float* y,
                                         const void* workspace, size_t workspace_bytes, BitplaneCudaPath path,
                                         CUstream_st* stream, const BitplaneCudaTuning& tuning = {},
                                         const int32_t* bits_dev = nullptr, bool accumulate = false);

// bitplane_matmul_prepared_cuda_async over `count` (1..BITPLANE_MAX_MULTI) linears ws (count) that
// read the same prepared input (q, k and v; gate and up: the same k, group_size and max_bits) in ONE
// launch: their row tiles form one grid, so the launch's start and tail are paid once instead of
// per linear. ys (count): each linear's y (m, n_i); bits_devs (count, optional, entries may be null):
// each linear's bit-width in device memory, clamped to 2..bits. The same results, bit for bit, as
// one bitplane_matmul_prepared_cuda_async per linear with the same warps per block (the automatic
// choice follows the whole grid, so it may split K differently than for one linear alone).
constexpr int BITPLANE_MAX_MULTI = 3;
void bitplane_matmul_prepared_multi_cuda_async(const BitplaneLinear* ws, int count, int bits, int64_t m,
                                               float* const* ys, const void* workspace, size_t workspace_bytes,
                                               BitplaneCudaPath path, CUstream_st* stream,
                                               const int32_t* const* bits_devs = nullptr, bool accumulate = false,
                                               const BitplaneCudaTuning& tuning = {});

// bitplane_prepare_cuda_async for `path` (TC, m <= 8 rows, or MMA, m <= 16: the same preparation)
// fused with the op before the linear, one launch instead of two (a decode step is latency-bound).
// It writes the op's output to `out` (m, k) too, bit for bit what the op's own launch gives, and
// prepares it:
//   RMS_NORM: out = rms_norm(x, aux = weight (k), eps)  (rms_norm_launch; out must not be x)
//   SWIGLU:   out = silu(x) · aux, aux = up (m, k)       (swiglu_launch; out may be x)
enum BitplanePrepareFusion { BITPLANE_FUSE_RMS_NORM = 1, BITPLANE_FUSE_SWIGLU = 2 };
void bitplane_prepare_fused_cuda_async(const BitplaneLinear& w, BitplanePrepareFusion op, const float* x,
                                       const float* aux, float eps, int64_t m, float* out, void* workspace,
                                       size_t workspace_bytes, CUstream_st* stream,
                                       BitplaneCudaPath path = BITPLANE_CUDA_TC);

// Host memory in and out (tests, tools): uploads the first `bits` planes, the qparams and x,
// runs bitplane_matmul_cuda_async on the current device, downloads y (m, n). Synchronous. The
// device y is filled with NaN before the launch, so an element the kernels miss comes back NaN;
// with y0 (m, n) it starts as y0 and the product is accumulated into it (accumulate = true).
void bitplane_matmul_cuda(const BitplaneLinear& w, int bits, const float* x, int64_t m, float* y,
                          BitplaneCudaPath path = BITPLANE_CUDA_AUTO, const BitplaneCudaTuning& tuning = {},
                          const float* y0 = nullptr);

// Host memory in and out (tests): x (m <= the path's launch rows, k) prepared once, then the
// linears ws (count) in one bitplane_matmul_prepared_multi_cuda_async launch, linear i at bits[i]
// (read from device memory, as the engine's mask) -> ys[i] (m, n_i), each poisoned first.
void bitplane_matmul_multi_cuda(const BitplaneLinear* ws, const int* bits, int count, const float* x, int64_t m,
                                float* const* ys, BitplaneCudaPath path = BITPLANE_CUDA_AUTO,
                                const BitplaneCudaTuning& tuning = {});

// Host memory in and out (tests): bitplane_prepare_fused_cuda_async then the GEMV (path TC or MMA:
// both read that preparation) on m rows of x (m, k) (<= 8; MMA <= 16); aux: the norm weight (k)
// or up (m, k). -> y (m, n) and the op's output out (m, k) (SWIGLU in place, as the engine runs
// it). Outputs poisoned first.
void bitplane_matmul_fused_cuda(const BitplaneLinear& w, int bits, BitplanePrepareFusion op, const float* x,
                                const float* aux, float eps, int64_t m, float* y, float* out,
                                BitplaneCudaPath path = BITPLANE_CUDA_TC);

// Timing of the device-resident product (bitplane_matmul_cuda_bench).
struct BitplaneCudaTiming {
  double matmul_us = 0;    // median per launch of the matmul kernel alone (activations prepared)
  double prepare_us = 0;   // median per launch of the activation preparation kernel alone
  double total_us = 0;     // median per call of prepare + matmul, back to back
  double matmul_min_us = 0;
  int copies = 0;          // weight copies rotated so that L2 does not serve the planes
  int launches = 0;        // launches per timed graph replay
  int warps_per_block = 0; // the value used
  int prefetch = 0;        // the value used (0 or 1)
};

// Uploads `copies` copies of the linear once (0: enough that the bytes read by `copies` calls are
// >= 4x the L2 size) and x (m, k) host fp32, captures each timed sequence (launches rotating over
// the copies) in a CUDA graph and times `reps` replays with cudaEvents; medians per launch.
BitplaneCudaTiming bitplane_matmul_cuda_bench(const BitplaneLinear& w, int bits, const float* x, int64_t m,
                                              BitplaneCudaPath path, int copies = 0, int reps = 20,
                                              const BitplaneCudaTuning& tuning = {});

// ---- many rows: the tensor-core GEMM (cuda/bitplane_matmul_gemm.cu) --------------------------------
//
// y (m, n) = x (m, k) · W_bitsᵀ for prefill- and batch-sized m, in three launches: the first `bits`
// planes are unpacked once per call into int8 codes (a scratch of n·k bytes, no f16 weight copy),
// x is prepared, and a tile GEMM runs on the tensor cores with the group scales applied in
// registers. Any group size that is a multiple of 32; any m >= 0.
enum BitplaneGemmKind {
    BITPLANE_GEMM_A8 = 1,   // "W{k}A8": x quantized per (row, group) to int8 exactly as the TC GEMV does
                            // (so the result equals it up to fp32 rounding), s8 IMMA m16n8k32
    BITPLANE_GEMM_A16 = 2,  // "W{k}A16": x rounded to fp16, f16 mma m16n8k16 with fp32 accumulation
    BITPLANE_GEMM_B1 = 3,   // "W{k}A{a}" (W6A6, W6A8, W4A4, ...): x quantized per (row, group) to a-bit
                            // integers (act_bits, as the CPU op quantize_activations), bit-serial on the
                            // binary tensor cores (b1 m16n8k256 AND+POPC) straight from the weight planes
    BITPLANE_GEMM_A8_WG = 4,  // A8's arithmetic (the same int8 x̂, codes and fp32 expressions) on
                              // Hopper's warpgroup MMA (wgmma m64n128k32 s8, TMA loads, sm_90a only);
                              // group sizes that are multiples of 128. Not yet run on a GPU: opt-in
                              // (FLEXQUANT_CUDA_WGMMA=1 for the engine).
};

// Whether this GPU and build run BITPLANE_GEMM_A8_WG at this group size: compute capability 9.0, a
// build with sm_90a code, group_size % 128 == 0, and FLEXQUANT_CUDA_WGMMA_OFF not "1" (an off switch:
// then neither tune nor a table ever runs it). Never throws (false without a device).
bool bitplane_gemm_wgmma_supported(int group_size);

// Whether the B1 GEMM handles this group size (32, 64, 128, 256 or 512).
bool bitplane_gemm_b1_supports(int group_size);

// Device scratch bytes bitplane_gemm_cuda_async needs: n_pad·k_pad (codes; not for B1) + m_pad·k_pad·
// (1 or 2) (activations) + m_pad·k_pad (B1: their bit planes) + 8·m_pad·n_groups, each rounded to
// 256 bytes (n_pad, m_pad: multiples of 128).
size_t bitplane_gemm_cuda_workspace(const BitplaneLinear& w, int64_t m, BitplaneGemmKind kind);

// Device-resident product, asynchronous on `stream`: w.planes (>= bits planes), w.qparams, x (m, k)
// fp32, y (m, n) fp32 and workspace are device pointers. bits_dev as for bitplane_matmul_cuda_async.
// act_bits: the activation bit-width, 2..8 for B1; A8 takes 8 and A16 16; 0 = the kind's (8, 16, 8).
// accumulate: y += the product, as for bitplane_matmul_cuda_async.
void bitplane_gemm_cuda_async(const BitplaneLinear& w, int bits, const float* x, int64_t m, float* y,
                              void* workspace, size_t workspace_bytes, BitplaneGemmKind kind, CUstream_st* stream,
                              const int32_t* bits_dev = nullptr, int act_bits = 0, bool accumulate = false);

// The two halves of bitplane_gemm_cuda_async, so that linears reading the same x (q, k and v; gate
// and up) prepare it once: prepare x (m, k) into the workspace for linears of w's k and group_size,
// then run any number of such linears from it (same m, kind and act_bits; each call's workspace_bytes
// must cover that linear: the codes, last in the workspace, grow with n, the prepared x does not move).
void bitplane_gemm_prepare_cuda_async(const BitplaneLinear& w, const float* x, int64_t m, void* workspace,
                                      size_t workspace_bytes, BitplaneGemmKind kind, CUstream_st* stream,
                                      int act_bits = 0);
void bitplane_gemm_prepared_cuda_async(const BitplaneLinear& w, int bits, int64_t m, float* y, void* workspace,
                                       size_t workspace_bytes, BitplaneGemmKind kind, CUstream_st* stream,
                                       const int32_t* bits_dev = nullptr, int act_bits = 0, bool accumulate = false);

// Host memory in and out (tests): uploads, runs on the current device, downloads y (m, n). y and the
// workspace are filled with NaN / 0xff bytes first, so a missed element or a read of an unwritten
// scratch byte shows; with y0 (m, n), y starts as y0 and the product is accumulated into it.
void bitplane_gemm_cuda(const BitplaneLinear& w, int bits, const float* x, int64_t m, float* y,
                        BitplaneGemmKind kind, int act_bits = 0, const float* y0 = nullptr);

// The unpack launch alone (tests): codes (n, k_pad) int8 = c_bits − 2^(bits−1), k_pad = ceil(k/128)·128.
void bitplane_unpack_codes_cuda(const BitplaneLinear& w, int bits, int8_t* codes);

struct BitplaneGemmTiming {
    double unpack_us = 0;   // median per call of each launch alone (no unpack for B1: 0)
    double prepare_us = 0;
    double gemm_us = 0;
    double total_us = 0;    // the three back to back
    int copies = 0;         // plane copies rotated so that the unpack reads HBM, not L2
};
BitplaneGemmTiming bitplane_gemm_cuda_bench(const BitplaneLinear& w, int bits, const float* x, int64_t m,
                                            BitplaneGemmKind kind, int reps = 10, int act_bits = 0);

}  // namespace flexquant

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
//  - FP32: fp32 activations, bit-serial on the CUDA cores. Any group size; the accuracy reference.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../cpp/src/ops/ops.h"  // BitplaneLinear (relative: this header is also reached from cpp/python)

struct CUstream_st;  // = cudaStream_t, without the CUDA headers

namespace flexquant {

enum BitplaneCudaPath {
  BITPLANE_CUDA_AUTO = 0,  // TC when bitplane_cuda_tc_supports(group_size), else FP32
  BITPLANE_CUDA_TC = 1,    // int8 activations, binary tensor cores (W{k}A8)
  BITPLANE_CUDA_FP32 = 2,  // fp32 activations, CUDA cores
};

// Tuning knobs (tests, benchmarks); the defaults are what the measurements chose.
struct BitplaneCudaTuning {
  int warps_per_block = 0;  // warps splitting K within a row tile, 1..16; 0: automatic (see the .cu)
};

// Whether the TC path handles this group size (32, 64, 128, 256, 512).
bool bitplane_cuda_tc_supports(int group_size);

// The path AUTO resolves to for this linear.
BitplaneCudaPath bitplane_cuda_resolve_path(const BitplaneLinear& w, BitplaneCudaPath path);

// Device scratch bytes bitplane_matmul_cuda_async needs for m activation rows (the activations
// in the kernel's order: int8 bit planes + group parameters, or permuted fp32 + word sums).
size_t bitplane_matmul_cuda_workspace(const BitplaneLinear& w, int64_t m, BitplaneCudaPath path);

// Device-resident product, asynchronous on `stream` (nullptr: the legacy default stream).
// w.planes (>= bits, plane_bytes), w.qparams (n, n_groups, 2), x (m, k) fp32, y (m, n) fp32 and
// workspace (workspace_bytes >= bitplane_matmul_cuda_workspace(w, m, path)) are device pointers.
// Any m >= 0 (launched in slices of 8 rows: two launches each, the activation preparation and the
// product). bits_dev (optional, device int32): the kernels read their bit-width from it when they
// run, clamped to 2..bits (`bits` planes must be present), so a CUDA graph captured once follows a
// mask the host rewrites between replays.
void bitplane_matmul_cuda_async(const BitplaneLinear& w, int bits, const float* x, int64_t m, float* y,
                                void* workspace, size_t workspace_bytes, BitplaneCudaPath path,
                                CUstream_st* stream, const BitplaneCudaTuning& tuning = {},
                                const int32_t* bits_dev = nullptr);

// The two halves of bitplane_matmul_cuda_async for m <= 8 rows, so that linears reading the same
// input (q, k and v; gate and up) prepare it once. Prepare x (m, k) into the workspace for linears
// of w's k and group_size, then run any number of such linears from it (same path and m).
void bitplane_prepare_cuda_async(const BitplaneLinear& w, const float* x, int64_t m, void* workspace,
                                 size_t workspace_bytes, BitplaneCudaPath path, CUstream_st* stream);
void bitplane_matmul_prepared_cuda_async(const BitplaneLinear& w, int bits, int64_t m, float* y,
                                         const void* workspace, size_t workspace_bytes, BitplaneCudaPath path,
                                         CUstream_st* stream, const BitplaneCudaTuning& tuning = {},
                                         const int32_t* bits_dev = nullptr);

// Host memory in and out (tests, tools): uploads the first `bits` planes, the qparams and x,
// runs bitplane_matmul_cuda_async on the current device, downloads y (m, n). Synchronous. The
// device y is filled with NaN before the launch, so an element the kernels miss comes back NaN.
void bitplane_matmul_cuda(const BitplaneLinear& w, int bits, const float* x, int64_t m, float* y,
                          BitplaneCudaPath path = BITPLANE_CUDA_AUTO, const BitplaneCudaTuning& tuning = {});

// Timing of the device-resident product (bitplane_matmul_cuda_bench).
struct BitplaneCudaTiming {
  double matmul_us = 0;    // median per launch of the matmul kernel alone (activations prepared)
  double prepare_us = 0;   // median per launch of the activation preparation kernel alone
  double total_us = 0;     // median per call of prepare + matmul, back to back
  double matmul_min_us = 0;
  int copies = 0;          // weight copies rotated so that L2 does not serve the planes
  int launches = 0;        // launches per timed graph replay
  int warps_per_block = 0; // the value used
};

// Uploads `copies` copies of the linear once (0: enough that the bytes read by `copies` calls are
// >= 4x the L2 size) and x (m, k) host fp32, captures each timed sequence (launches rotating over
// the copies) in a CUDA graph and times `reps` replays with cudaEvents; medians per launch.
BitplaneCudaTiming bitplane_matmul_cuda_bench(const BitplaneLinear& w, int bits, const float* x, int64_t m,
                                              BitplaneCudaPath path, int copies = 0, int reps = 20,
                                              const BitplaneCudaTuning& tuning = {});

}  // namespace flexquant

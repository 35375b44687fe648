// Internal: the CUDA backend (cuda/*.cu), as seen from the rest of the engine.
//
// The first part declares plain C++ entry points, so any engine file may include this header;
// call them only under `#ifdef FLEXQUANT_HAVE_CUDA` (defined when CMake built the backend). The
// part under __CUDACC__ is shared by the .cu files: error checking, device buffers, launchers.
#pragma once

#include <cstddef>

#include "flexquant/error.h"
#include "flexquant/model_file.h"

namespace flexquant {

// Number of CUDA devices this process can use; 0 when there is no driver or no GPU. Never throws:
// a CUDA build must run on the CPU on a machine without a GPU.
int cuda_device_count() noexcept;

// dequantize_linear (ops/dequantize.h) on the current CUDA device: uploads the first `bits` planes
// and the group params of `w`, computes W_k, downloads it. host_out: (w.n, w.k) fp32, host
// memory. Bit-exact with the CPU op. Throws flexquant::Error on a bad bit-width or any CUDA error.
void dequantize_linear_cuda(const BitPlaneLinear& w, int bits, float* host_out /* (n, k) */);

}  // namespace flexquant

#ifdef __CUDACC__
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace flexquant {

// Throws flexquant::Error "CUDA error in <what>: <cudaGetErrorString>" unless err is cudaSuccess.
inline void cuda_check(cudaError_t err, const std::string& what) {
    if (err != cudaSuccess) throw Error("CUDA error in " + what + ": " + cudaGetErrorString(err));
}

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

}  // namespace flexquant
#endif  // __CUDACC__

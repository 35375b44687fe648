// CUDA device discovery.
//
// The CUDA runtime is linked statically, so a CUDA build loads on any machine; whether a driver
// and a GPU exist is only known here, at run time. Everything GPU-side must be gated on this.
#include <cstdlib>
#include <cstring>

#include "cuda_backend.h"

namespace flexquant {

int cuda_device_count() noexcept {
    int count = 0;
    // No driver (cudaErrorInsufficientDriver), no GPU (cudaErrorNoDevice) or anything else: the
    // answer is "no usable device", not an error.
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError();  // reset the last-error state so no later call reports this one
        return 0;
    }
    return count;
}

bool cuda_env_flag(const char* name) {
    const char* v = std::getenv(name);
    return v != nullptr && std::strcmp(v, "1") == 0;
}

bool& pdl_enabled() {
    thread_local bool on = false;
    return on;
}

std::string cuda_device_name(int device) {
    cudaDeviceProp prop{};
    if (device < 0 || device >= cuda_device_count() || cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
        cudaGetLastError();
        return "";
    }
    return prop.name;
}

}  // namespace flexquant

// CPU stand-in for <cudaTypedefs.h> (see cuda_runtime.h here): the driver entry point the wgmma GEMM's
// host code looks up, cuTensorMapEncodeTiled, which the stand-in provides (hopper.h: the tensor-map
// types, the encoder with the driver's argument checks, and the TMA copies that read its maps).
#pragma once

#include "cuda_runtime.h"

using PFN_cuTensorMapEncodeTiled_v12000 = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                                       const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                                       const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                                       CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
enum cudaDriverEntryPointQueryResult { cudaDriverEntryPointSuccess = 0, cudaDriverEntryPointSymbolNotFound = 1 };
constexpr unsigned long long cudaEnableDefault = 0;
#define CUDART_VERSION 12080
inline cudaError_t cudaGetDriverEntryPointByVersion(const char* name, void** fn, unsigned version, unsigned long long,
                                                    cudaDriverEntryPointQueryResult* found) {
    const bool known = std::strcmp(name, "cuTensorMapEncodeTiled") == 0 && version >= 12000;
    const PFN_cuTensorMapEncodeTiled_v12000 encode = &simt::encode_tensor_map_tiled;
    *fn = known ? reinterpret_cast<void*>(encode) : nullptr;
    *found = known ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
    return cudaSuccess;
}

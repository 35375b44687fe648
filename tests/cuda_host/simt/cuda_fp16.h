// CPU stand-in for <cuda_fp16.h> (see cuda_runtime.h here): __half and __half2 as IEEE binary16 bit
// patterns, converted with the engine's own round-to-nearest-even routines (cpp/src/fp16.h), which
// the CPU ops use for the fp16 KV cache.
#pragma once

#include "cuda_runtime.h"
#include "fp16.h"

struct __half_raw {
    unsigned short x;
};
struct __half2_raw {
    unsigned short x, y;
};
struct alignas(2) __half {
    unsigned short __x;
    __half() = default;
    __half(float f) : __x(flexquant::fp32_to_fp16(f)) {}
    __half(__half_raw r) : __x(r.x) {}
    operator float() const { return flexquant::fp16_to_fp32(__x); }
};
struct alignas(4) __half2 {
    __half x, y;
    __half2() = default;
    __half2(__half a, __half b) : x(a), y(b) {}
    __half2(__half2_raw r) {
        x.__x = r.x;
        y.__x = r.y;
    }
};
inline float __half2float(__half h) { return flexquant::fp16_to_fp32(h.__x); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __ushort_as_half(unsigned short u) { return __half(__half_raw{u}); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline float2 __half22float2(__half2 h) { return make_float2(__half2float(h.x), __half2float(h.y)); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2(__half(a), __half(b)); }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }

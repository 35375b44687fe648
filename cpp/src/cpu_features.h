// Runtime CPU feature detection for the kernels' dispatch.
//
// SIMD kernels are compiled with per-function target attributes, so the library itself runs on
// any x86-64; these flags pick the kernel at run time. FLEXQUANT_CPU in the environment caps what
// is used, for tests and for measuring speed-ups: `portable` (no SIMD kernels), `vec128` (no AVX2),
// `avx2` (no GFNI, no AVX-512), `gfni` (no AVX-512), `avx512-nogfni` (as Cascade Lake: AVX-512 and
// its VNNI, no GFNI, no AVX-VNNI) or `avx512-nogfni-novnni` (as Skylake-SP: AVX-512 F/BW/DQ/VL);
// `avx512` or empty: no cap. Any other value is named on stderr and ignored.
#pragma once

// The intrinsics kernels (AVX2, GFNI, AVX-512) exist on x86 only; elsewhere the int16 decode, the
// prompt GEMM, attention and the exponentials are the vector-extension ones (vec128: NEON on
// AArch64) and every other kernel the portable one.
#if defined(__x86_64__) || defined(__i386__)
#define FLEXQUANT_X86 1
// AVX-VNNI (target "avxvnni", __builtin_cpu_supports("avxvnni")) needs GCC 11 or clang 12; older
// compilers build without the kernel variant that uses it.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define FLEXQUANT_AVXVNNI 1
#endif
#endif

namespace flexquant {

struct CpuFeatures {
    // 16-byte SIMD written in vector extensions (SSE2 on x86-64, NEON on AArch64): the kernels of CPUs
    // without AVX2 (bitplane_matmul_vec128.cpp: int16 decode, fp32 GEMM; attention; exp)
    bool vec128 = false;
    bool avx2 = false;  // AVX2 + FMA + F16C: what the *_avx2 kernels use
    bool gfni = false;  // GFNI on top of avx2 (Ice Lake, Zen 4 and later): 8x8 bit transposes
    bool avx512 = false;  // AVX-512 F/BW/DQ/VL on top of avx2: the int16-activation kernels, wide attention
    bool avx512vnni = false;  // AVX-512 VNNI on top of avx512 (vpdpwssd; Cascade Lake, Zen 4 and later)
    bool avxvnni = false;  // AVX-VNNI (VEX vpdpwssd, Alder Lake and later) on top of avx2: the AVX2 int16
                           // decode kernel's multiply-adds with GFNI; no family of its own
};

// Detected once; then the same answer every call.
const CpuFeatures& cpu_features();

// Overrides the detected features (e.g. {avx2 = false} to test the portable kernels); a feature
// the CPU lacks, or FLEXQUANT_CPU left out, stays off. Returns the previous value. Not thread-safe with kernels running.
CpuFeatures set_cpu_features(const CpuFeatures& f);

// The features actually present on this CPU, ignoring overrides.
CpuFeatures detect_cpu_features();

// The most set_cpu_features can turn on: the detected features less what FLEXQUANT_CPU leaves out
// (a run capped by the environment stays capped, whatever the code then asks for).
CpuFeatures allowed_cpu_features();

}  // namespace flexquant

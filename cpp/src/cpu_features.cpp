#include "cpu_features.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "ops/vec128.h"

namespace flexquant {

CpuFeatures detect_cpu_features() {
    CpuFeatures f;
#ifdef FQ_VEC128
    f.vec128 = true;  // part of the architecture's baseline (ops/vec128.h)
#endif
#if defined(FLEXQUANT_X86) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    f.gfni = f.avx2 && __builtin_cpu_supports("gfni");
    f.avx512 = f.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    f.avx512vnni = f.avx512 && __builtin_cpu_supports("avx512vnni");
#ifdef FLEXQUANT_AVXVNNI
    f.avxvnni = f.avx2 && __builtin_cpu_supports("avxvnni");
#endif
#endif
    return f;
}

namespace {
// The detected features less what FLEXQUANT_CPU leaves out.
CpuFeatures env_capped() {
    CpuFeatures f = detect_cpu_features();
    const char* env = std::getenv("FLEXQUANT_CPU");
    if (!env || !*env) return f;
    const auto is = [&](const char* v) { return std::strcmp(env, v) == 0; };
    if (!is("portable") && !is("vec128") && !is("avx2") && !is("gfni") && !is("avx512") && !is("avx512-nogfni") &&
        !is("avx512-nogfni-novnni"))
        // a typo must not pass for a measurement of the capped kernels; no exception: this runs while
        // the module loads
        std::fprintf(stderr,
                     "flexquant_rt: FLEXQUANT_CPU='%s' is none of portable, vec128, avx2, gfni, avx512, "
                     "avx512-nogfni, avx512-nogfni-novnni: ignored, no cap\n",
                     env);
    if (is("portable")) f.vec128 = f.avx2 = f.gfni = f.avx512 = f.avx512vnni = f.avxvnni = false;
    if (is("vec128")) f.avx2 = f.gfni = f.avx512 = f.avx512vnni = f.avxvnni = false;
    if (is("avx2")) f.gfni = f.avx512 = f.avx512vnni = false;
    if (is("gfni")) f.avx512 = f.avx512vnni = false;
    // Cascade Lake and Skylake-SP have no AVX-VNNI (the VEX form came with Alder Lake) either
    if (is("avx512-nogfni")) f.gfni = f.avxvnni = false;
    if (is("avx512-nogfni-novnni")) f.gfni = f.avx512vnni = f.avxvnni = false;
    return f;
}

CpuFeatures& current() {
    static CpuFeatures f = allowed_cpu_features();
    return f;
}
}  // namespace

CpuFeatures allowed_cpu_features() {
    static const CpuFeatures f = env_capped();
    return f;
}

const CpuFeatures& cpu_features() {
    return current();
}

CpuFeatures set_cpu_features(const CpuFeatures& f) {
    CpuFeatures old = current();
    const CpuFeatures allowed = allowed_cpu_features();
    current().vec128 = f.vec128 && allowed.vec128;  // never enable what the CPU lacks
    current().avx2 = f.avx2 && allowed.avx2;
    current().gfni = f.gfni && f.avx2 && allowed.gfni;
    current().avx512 = f.avx512 && current().avx2 && allowed.avx512;
    current().avx512vnni = f.avx512vnni && current().avx512 && allowed.avx512vnni;
    current().avxvnni = f.avxvnni && current().avx2 && allowed.avxvnni;
    return old;
}

}  // namespace flexquant

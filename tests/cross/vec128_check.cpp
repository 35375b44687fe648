// The 128-bit int16 decode (bitplane_matmul_vec128.cpp) against the portable kernel, on random planes,
// scales, mins and activations: built for another architecture and run under an emulator by
// tests/test_cross_arch.py (AArch64: the kernel's NEON form, which x86 machines cannot run natively).
// Prints one line per case and "worst <relative error>"; exits 1 if any case is past the tolerance, or
// if the 128-bit kernel did not run.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu_features.h"
#include "fp16.h"
#include "ops/ops.h"

using namespace flexquant;

int main() {
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_int_distribution<int> byte(0, 255);
    const CpuFeatures detected = detect_cpu_features();
    std::printf("vec128 %d\n", detected.vec128 ? 1 : 0);
    if (!detected.vec128) return 1;
    struct Shape {
        int64_t n, k;
        int group;
    };
    // K with full and short last super-chunks (1, 2, 3 words per lane), groups that split them
    const Shape shapes[] = {{37, 1664, 128}, {20, 896, 64}, {11, 384, 32}, {9, 2000, 256}, {16, 1408, 96},
                            {19, 640, 32},   {10, 1536, 512}};
    double worst = 0.0;
    bool ok = true;
    for (int si = 0; si < static_cast<int>(sizeof(shapes) / sizeof(shapes[0])); ++si) {
        const Shape& sh = shapes[si];
        const int64_t n_pad = (sh.n + 7) / 8 * 8, k_pad = (sh.k + 127) / 128 * 128;
        BitplaneLinear w;
        w.n = sh.n;
        w.k = sh.k;
        w.group_size = sh.group;
        w.max_bits = 8 - si % 3 * 2;  // files stored at 8, 6 and 4 bits (the factors scale by 2^(max - k))
        w.plane_bytes = static_cast<uint64_t>(n_pad * k_pad / 8);
        std::vector<uint8_t> planes(static_cast<size_t>(w.max_bits) * w.plane_bytes);
        for (auto& b : planes) b = static_cast<uint8_t>(byte(rng));
        std::vector<uint16_t> qp(static_cast<size_t>(sh.n * w.n_groups() * 2));
        for (size_t i = 0; i < qp.size(); ++i)
            qp[i] = fp32_to_fp16(i % 2 ? normal(rng) : std::fabs(normal(rng)) * 0.01f + 1e-3f);
        w.planes = planes.data();
        w.qparams = qp.data();
        for (int64_t m : {1, 2, 3, 4, 5, 9}) {
            std::vector<float> x(static_cast<size_t>(m * sh.k));
            for (auto& v : x) v = normal(rng) * 3.0f;
            for (int bits = w.max_bits; bits >= 2; --bits) {
                std::vector<float> ref(static_cast<size_t>(m * sh.n)), got(ref.size());
                CpuFeatures f;  // all off: the portable kernels
                set_cpu_features(f);
                bitplane_matmul(w, bits, x.data(), m, ref.data(), nullptr, BITPLANE_PATH_DECODE, BITPLANE_ACT_I16);
                f.vec128 = true;
                set_cpu_features(f);
                if (!cpu_features().vec128) return 1;
                bitplane_matmul(w, bits, x.data(), m, got.data(), nullptr, BITPLANE_PATH_DECODE, BITPLANE_ACT_I16);
                double err = 0.0, scale = 0.0;
                bool same = true;
                for (size_t i = 0; i < ref.size(); ++i) {
                    err = std::fmax(err, std::fabs(static_cast<double>(got[i]) - ref[i]));
                    scale = std::fmax(scale, std::fabs(static_cast<double>(ref[i])));
                    same = same && got[i] == ref[i];
                }
                const double rel = err / scale;
                worst = std::fmax(worst, rel);
                // an integer kernel ran: its int32 sums round differently from the fp32 kernel's
                if (!(rel <= 1e-5) || same) {
                    ok = false;
                    std::printf("FAIL n=%lld k=%lld g=%d max_bits=%d m=%lld bits=%d rel=%.3g same=%d\n",
                                (long long)sh.n, (long long)sh.k, sh.group, w.max_bits, (long long)m, bits, rel,
                                same ? 1 : 0);
                }
            }
        }
    }
    std::printf("worst %.3g\n", worst);
    return ok ? 0 : 1;
}

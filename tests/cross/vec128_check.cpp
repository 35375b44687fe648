// The 128-bit kernels (bitplane_matmul_vec128.cpp: the int16 decode and the fp32 GEMM; attention.cpp's
// spans and prompt blocks) against the portable ones, on random planes, scales, mins, activations and
// KV caches: built for another architecture and run under an emulator by
// tests/test_cross_arch.py (AArch64: the kernel's NEON form, which x86 machines cannot run natively).
// Prints one line per case and "worst <relative error>"; exits 1 if any case is past the tolerance, or
// if the 128-bit kernel did not run.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <cstring>
#include <vector>

#include "cpu_features.h"
#include "fp16.h"
#include "ops/ops.h"

using namespace flexquant;

// max |got - ref| / max |ref|, and whether every element is the same bits. Not inlined: inlined into
// main, its loop made the vectorizer of Debian's aarch64 GCC 12.2 fail (an internal compiler error).
__attribute__((noinline)) static double compare(const std::vector<float>& got, const std::vector<float>& ref, bool* same) {
    double err = 0.0, scale = 0.0;
    *same = true;
    for (size_t i = 0; i < ref.size(); ++i) {
        err = std::fmax(err, std::fabs(static_cast<double>(got[i]) - ref[i]));
        scale = std::fmax(scale, std::fabs(static_cast<double>(ref[i])));
        *same = *same && got[i] == ref[i];
    }
    return err / scale;
}

// A bit-plane linear of random planes (all 8 bits of every byte vary), scales and mins.
struct RandomLinear {
    std::vector<uint8_t> planes;
    std::vector<uint16_t> qp;
    BitplaneLinear w;
    RandomLinear(const RandomLinear&) = delete;  // w points into the vectors
    RandomLinear(int64_t n, int64_t k, int group, int max_bits, std::mt19937& rng) {
        std::normal_distribution<float> normal(0.0f, 1.0f);
        std::uniform_int_distribution<int> byte(0, 255);
        const int64_t n_pad = (n + 7) / 8 * 8, k_pad = (k + 127) / 128 * 128;
        w.n = n;
        w.k = k;
        w.group_size = group;
        w.max_bits = max_bits;
        w.plane_bytes = static_cast<uint64_t>(n_pad * k_pad / 8);
        planes.resize(static_cast<size_t>(max_bits) * w.plane_bytes);
        for (auto& b : planes) b = static_cast<uint8_t>(byte(rng));
        qp.resize(static_cast<size_t>(n * w.n_groups() * 2));
        for (size_t i = 0; i < qp.size(); ++i)
            qp[i] = fp32_to_fp16(i % 2 ? normal(rng) : std::fabs(normal(rng)) * 0.01f + 1e-3f);
        w.planes = planes.data();
        w.qparams = qp.data();
    }
};

int main() {
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
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
        // files stored at 8, 6 and 4 bits (the factors scale by 2^(max - k))
        const RandomLinear lin(sh.n, sh.k, sh.group, 8 - si % 3 * 2, rng);
        const BitplaneLinear& w = lin.w;
        for (int64_t m : {1, 2, 3, 4, 5, 9}) {
            std::vector<float> x(static_cast<size_t>(m * sh.k));
            for (auto& v : x) v = normal(rng) * 3.0f;
            for (int bits = w.max_bits; bits >= 2; --bits) {
                for (BitplaneActivations act : {BITPLANE_ACT_I16, BITPLANE_ACT_I8}) {  // (int8: the same kernel)
                    std::vector<float> ref(static_cast<size_t>(m * sh.n)), got(ref.size());
                    CpuFeatures f;  // all off: the portable kernels
                    set_cpu_features(f);
                    bitplane_matmul(w, bits, x.data(), m, ref.data(), nullptr, BITPLANE_PATH_DECODE, act);
                    f.vec128 = true;
                    set_cpu_features(f);
                    if (!cpu_features().vec128) return 1;
                    bitplane_matmul(w, bits, x.data(), m, got.data(), nullptr, BITPLANE_PATH_DECODE, act);
                    bool same;
                    const double rel = compare(got, ref, &same);
                    worst = std::fmax(worst, rel);
                    // an integer kernel ran: its int32 sums round differently from the fp32 kernel's
                    if (!(rel <= 1e-5) || same) {
                        ok = false;
                        std::printf("FAIL n=%lld k=%lld g=%d max_bits=%d m=%lld bits=%d act=%d rel=%.3g same=%d\n",
                                    (long long)sh.n, (long long)sh.k, sh.group, w.max_bits, (long long)m, bits, (int)act,
                                    rel, same ? 1 : 0);
                    }
                }
            }
        }
    }
    std::printf("decode worst %.3g\n", worst);
    double all = worst;

    // The GEMM (prompts: fp32 tiles, fmla on NEON) against the portable one, on either activations.
    worst = 0.0;
    for (int si = 0; si < static_cast<int>(sizeof(shapes) / sizeof(shapes[0])); ++si) {
        const Shape& sh = shapes[si];
        const RandomLinear lin(sh.n, sh.k, sh.group, 8 - si % 3 * 2, rng);
        const BitplaneLinear& w = lin.w;
        for (int64_t m : {5, 6, 7, 9, 17, 34}) {  // blocks of 4 rows and every tail
            std::vector<float> x(static_cast<size_t>(m * sh.k));
            for (auto& v : x) v = normal(rng) * 3.0f;
            for (int bits = w.max_bits; bits >= 2; --bits)
                for (BitplaneActivations act : {BITPLANE_ACT_I16, BITPLANE_ACT_I8, BITPLANE_ACT_F32}) {
                    std::vector<float> ref(static_cast<size_t>(m * sh.n)), got(ref.size());
                    CpuFeatures f;
                    set_cpu_features(f);
                    bitplane_matmul(w, bits, x.data(), m, ref.data(), nullptr, BITPLANE_PATH_GEMM, act);
                    f.vec128 = true;
                    set_cpu_features(f);
                    bitplane_matmul(w, bits, x.data(), m, got.data(), nullptr, BITPLANE_PATH_GEMM, act);
                    const bool ran = std::strcmp(bitplane_last_kernel(), "gemm_vec128") == 0;
                    bool same;
                    const double rel = compare(got, ref, &same);
                    worst = std::fmax(worst, rel);
                    if (!(rel <= 1e-5) || !ran) {
                        ok = false;
                        std::printf("FAIL gemm n=%lld k=%lld g=%d m=%lld bits=%d act=%d rel=%.3g kernel=%s\n",
                                    (long long)sh.n, (long long)sh.k, sh.group, (long long)m, bits, (int)act, rel,
                                    bitplane_last_kernel());
                    }
                }
        }
    }
    std::printf("gemm worst %.3g\n", worst);
    all = std::fmax(all, worst);

    // Attention on fp32, fp16 (fcvtl) and q8 caches, the per-token spans and the prompt blocks, against
    // the portable loops; head-major caches as the engine's.
    worst = 0.0;
    struct Attn {
        int64_t m, p0, H, Hkv, d;
    };
    const Attn cases[] = {{1, 5, 6, 2, 64}, {1, 700, 9, 3, 64}, {3, 530, 17, 1, 8}, {7, 20, 4, 4, 40},
                          {9, 0, 3, 1, 36}, {40, 13, 9, 3, 64},  {130, 300, 8, 2, 24}, {20, 64, 10, 2, 200}};
    for (const Attn& c : cases) {
        const int64_t t = c.p0 + c.m;
        std::vector<float> q(static_cast<size_t>(c.m * c.H * c.d)), kf(static_cast<size_t>(c.Hkv * t * c.d)),
            vf(kf.size());
        for (auto& v : q) v = normal(rng);
        for (auto& v : kf) v = normal(rng) * 2.0f;
        for (auto& v : vf) v = normal(rng);
        std::vector<uint16_t> kh(kf.size()), vh(vf.size());
        for (size_t i = 0; i < kf.size(); ++i) {
            kh[i] = fp32_to_fp16(kf[i]);
            vh[i] = fp32_to_fp16(vf[i]);
        }
        const int64_t nb = q8_blocks(c.d);
        std::vector<int8_t> kq(kf.size()), vq(vf.size());
        std::vector<float> ks(static_cast<size_t>(c.Hkv * t * nb)), vs(ks.size());
        quantize_rows_q8(kf.data(), c.Hkv * t, c.d, kq.data(), ks.data());
        quantize_rows_q8(vf.data(), c.Hkv * t, c.d, vq.data(), vs.data());
        const KvStrides kv = KvStrides::head_major(t, c.d);
        for (int dtype = 0; dtype < 3; ++dtype) {
            std::vector<float> out[2];
            const bool prompt = c.m >= 8 && c.m * c.Hkv >= 16;  // attention.cpp's rule for the prompt path
            bool ran = true;
            for (int v = 0; v < 2; ++v) {
                CpuFeatures f;
                f.vec128 = v == 1;
                set_cpu_features(f);
                out[v].assign(q.size(), 0.0f);
                if (dtype == 0)
                    attention(q.data(), kf.data(), vf.data(), c.m, c.p0, c.H, c.Hkv, c.d, kv, out[v].data(), nullptr);
                else if (dtype == 1)
                    attention_f16(q.data(), kh.data(), vh.data(), c.m, c.p0, c.H, c.Hkv, c.d, kv, out[v].data(), nullptr);
                else
                    attention_q8(q.data(), kq.data(), ks.data(), vq.data(), vs.data(), c.m, c.p0, c.H, c.Hkv, c.d, kv,
                                 out[v].data(), nullptr);
                const char* want = v == 0 ? "span_portable" : prompt ? "prompt_vec128" : "span_vec128";
                ran = ran && std::strcmp(attention_last_kernel(), want) == 0;
            }
            bool same;
            const double rel = compare(out[1], out[0], &same);
            worst = std::fmax(worst, rel);
            // The spans' 4-lane sums add in other orders than the portable loops: some bits differ. The
            // prompt blocks sum each score and output element in the portable order (they may be the same
            // bits); the kernel names tell that they ran.
            if (!(rel <= 1e-5) || (same && !prompt) || !ran) {
                ok = false;
                std::printf("FAIL attention m=%lld p0=%lld H=%lld Hkv=%lld d=%lld dtype=%d rel=%.3g same=%d ran=%d\n",
                            (long long)c.m, (long long)c.p0, (long long)c.H, (long long)c.Hkv, (long long)c.d, dtype,
                            rel, same ? 1 : 0, ran ? 1 : 0);
            }
        }
    }
    std::printf("attention worst %.3g\n", worst);
    all = std::fmax(all, worst);
    std::printf("worst %.3g\n", all);
    return ok ? 0 : 1;
}

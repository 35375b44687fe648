// Host emulation of one launch of the wgmma GEMM (cuda/bitplane_matmul_gemm.cu, wg_gemm_kernel) built
// from its own helpers (cuda/bitplane_wgmma.cuh): every block, consumer warpgroup, warp, lane and
// accumulator register, stage by stage. The hardware's part is modelled from the PTX ISA:
//  - TMA, CU_TENSOR_MAP_SWIZZLE_128B: the box's byte b of row r lands at the tile offset the header's
//    swizzle128(r, b) gives (that function is the kernel's claim, checked against the read below);
//  - wgmma with a K-major 128-byte-swizzle descriptor (start address a, stride byte offset 1,024):
//    element (row r, K byte kb) of the operand is read at swz(a + (r / 8)·1024 + (r % 8)·128 + kb),
//    swz(x) = x XOR (((x >> 7) & 7) << 4) on offsets from the 1,024-byte aligned tile;
//  - the accumulator fragment (acc_row, acc_col) and scale-d = 0 on a stage's first k-step.
// The kernel runs a stage's wgmma while the previous stage's fp32 step runs (two accumulator sets);
// each thread's steps still come one per stage, in stage order, which is what is emulated here.
// tests/test_wgmma_layout.py runs it against numpy.
//
// usage: wgmma_layout DIR   with DIR/meta.txt "n k group_size m", DIR/codes.bin (n, k) int8 (ĉ),
//   DIR/q.bin (m, k) int8 (x̃), DIR/aparams.bin (m, n_groups, 2) f32 (a_s, a_z), DIR/wterms.bin
//   (n, n_groups, 2) f32 (s_k, z_k); writes DIR/y.bin (m, n) f32 and DIR/flushes.txt (fp32 steps per
//   thread, then the zero terms it added: groups ended).
#include <cstdint>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "bitplane_wgmma.cuh"
#include "host_io.h"

using namespace flexquant;

// The wgmma unit's address of operand element (row r, K byte kb) from a descriptor start offset.
int operand_offset(int start, int r, int kb) {
    const int x = start + (r / 8) * 1024 + (r % 8) * 128 + kb;
    return x ^ (((x >> 7) & 7) << 4);
}

int main(int argc, char** argv) {
    if (argc != 2) throw std::runtime_error("usage: wgmma_layout DIR");
    const std::string dir = argv[1];
    int64_t n = 0, k = 0, group_size = 0, m = 0;
    {
        std::ifstream meta(dir + "/meta.txt");
        if (!(meta >> n >> k >> group_size >> m)) throw std::runtime_error("bad meta.txt");
    }
    const int64_t n_groups = (k + group_size - 1) / group_size;
    const int64_t k_pad = (k + 127) / 128 * 128, k_stages = k_pad / wg::BK;
    const int64_t m_alloc = (m + wg::BM - 1) / wg::BM * wg::BM, n_alloc = (n + wg::BN - 1) / wg::BN * wg::BN;
    const auto codes = read_file<int8_t>(dir + "/codes.bin", size_t(n * k));
    const auto q = read_file<int8_t>(dir + "/q.bin", size_t(m * k));
    const auto ap = read_file<float>(dir + "/aparams.bin", size_t(m * n_groups * 2));
    const auto wt = read_file<float>(dir + "/wterms.bin", size_t(n * n_groups * 2));

    // Global memory as the preparation, the unpack and wg_column_terms_kernel leave it: x̃ zero past
    // k and m; codes of the K padding nonzero (an unset plane bit is code 0, centred −2^(k−1)) and the
    // padding rows arbitrary, both meeting zero activations or zero terms; terms transposed, zero
    // for padding rows and columns.
    std::vector<int8_t> acts(size_t(m_alloc * k_pad), 0), wcodes(size_t(n_alloc * k_pad), 0);
    for (int64_t r = 0; r < m; ++r)
        for (int64_t i = 0; i < k; ++i) acts[size_t(r * k_pad + i)] = q[size_t(r * k + i)];
    for (int64_t c = 0; c < n_alloc; ++c)
        for (int64_t i = 0; i < k_pad; ++i)
            wcodes[size_t(c * k_pad + i)] = c < n && i < k ? codes[size_t(c * k + i)] : int8_t(-128 + (c * 7 + i) % 200);
    std::vector<wg::Term2> aparams_t(size_t(n_groups * m_alloc), wg::Term2{0, 0});
    std::vector<wg::Term2> wparams_t(size_t(n_groups * n_alloc), wg::Term2{0, 0});
    for (int64_t g = 0; g < n_groups; ++g) {
        for (int64_t r = 0; r < m; ++r)
            aparams_t[size_t(g * m_alloc + r)] = wg::Term2{ap[size_t((r * n_groups + g) * 2)], ap[size_t((r * n_groups + g) * 2 + 1)]};
        for (int64_t c = 0; c < n; ++c)
            wparams_t[size_t(g * n_alloc + c)] = wg::Term2{wt[size_t((c * n_groups + g) * 2)], wt[size_t((c * n_groups + g) * 2 + 1)]};
    }

    std::vector<float> y(size_t(m * n), -12345.0f);  // poison: every element must be written
    std::vector<int64_t> flushes;
    std::vector<int8_t> a_tile(wg::TILE_BYTES), b_tile(wg::TILE_BYTES);
    std::vector<wg::Term2> rt(wg::BM), ct2(wg::BN);
    struct Thread {
        int part[wg::ACC];
        float acc[wg::ACC];
        int64_t flushes, group_ends;
    };
    std::vector<Thread> threads(wg::CONSUMERS);
    for (int64_t bx = 0; bx < m_alloc / wg::BM; ++bx)
        for (int64_t by = 0; by < n_alloc / wg::BN; ++by) {
            const int64_t row0 = bx * wg::BM, col0 = by * wg::BN;
            for (Thread& t : threads) {
                for (int qi = 0; qi < wg::ACC; ++qi) {
                    t.part[qi] = 0x5a5a5a5a;  // scale-d = 0 must not read the previous stage's sums
                    t.acc[qi] = 0.0f;
                }
                t.flushes = t.group_ends = 0;
            }
            for (int s = 0; s < int(k_stages); ++s) {
                // the producer: two TMA boxes and two 1 KB bulk copies of group stage_group(s)
                for (int r = 0; r < wg::BM; ++r)
                    for (int b = 0; b < wg::BK; ++b) {
                        a_tile[size_t(wg::swizzle128(r, b))] = acts[size_t((row0 + r) * k_pad + int64_t(s) * wg::BK + b)];
                        b_tile[size_t(wg::swizzle128(r, b))] = wcodes[size_t((col0 + r) * k_pad + int64_t(s) * wg::BK + b)];
                    }
                const int64_t g = wg::stage_group(s, int(group_size));
                if (g >= n_groups) throw std::runtime_error("stage past the last group");
                for (int i = 0; i < wg::BM; ++i) {
                    rt[size_t(i)] = aparams_t[size_t(g * m_alloc + row0 + i)];
                    ct2[size_t(i)] = wparams_t[size_t(g * n_alloc + col0 + i)];
                }
                std::vector<wg::Term4> ct(wg::BN / 2);
                for (int i = 0; i < wg::BN / 2; ++i)
                    ct[size_t(i)] = wg::Term4{ct2[size_t(2 * i)].x, ct2[size_t(2 * i)].y, ct2[size_t(2 * i + 1)].x,
                                              ct2[size_t(2 * i + 1)].y};
                // the consumers
                for (int tid = 0; tid < wg::CONSUMERS; ++tid) {
                    Thread& t = threads[size_t(tid)];
                    const int wgi = tid / 128, wq = (tid / 32) % 4, lane = tid % 32;
                    const int a_start = wgi * wg::WG_ROWS * wg::BK;  // this warpgroup's rows of the x̃ tile
                    for (int kk = 0; kk < wg::BK / 32; ++kk) {
                        const bool scale_d = kk > 0;
                        for (int qi = 0; qi < wg::ACC; ++qi) {
                            const int r = wg::acc_row(wq, lane, qi), c = wg::acc_col(lane, qi);
                            int sum = 0;
                            for (int kb = 0; kb < 32; ++kb)
                                sum += int(a_tile[size_t(operand_offset(a_start + 32 * kk, r, kb))]) *
                                       int(b_tile[size_t(operand_offset(32 * kk, c, kb))]);
                            t.part[qi] = scale_d ? t.part[qi] + sum : sum;
                        }
                    }
                    const int row_lo = wgi * wg::WG_ROWS + wg::acc_row(wq, lane, 0);
                    if (wg::stage_ends_group(s, int(k_stages), int(group_size))) {
                        wg::flush_stage<true>(t.acc, t.part, rt.data(), ct.data(), row_lo, lane);
                        ++t.group_ends;
                    } else {
                        wg::flush_stage<false>(t.acc, t.part, rt.data(), ct.data(), row_lo, lane);
                    }
                    ++t.flushes;
                }
            }
            for (int tid = 0; tid < wg::CONSUMERS; ++tid) {
                const Thread& t = threads[size_t(tid)];
                const int wgi = tid / 128, wq = (tid / 32) % 4, lane = tid % 32;
                flushes.push_back(t.flushes);
                flushes.push_back(t.group_ends);
                for (int qi = 0; qi < wg::ACC; ++qi) {
                    const int64_t r = row0 + wgi * wg::WG_ROWS + wg::acc_row(wq, lane, qi);
                    const int64_t c = col0 + wg::acc_col(lane, qi);
                    if (r < m && c < n) y[size_t(r * n + c)] = t.acc[qi];
                }
            }
        }
    write_file(dir + "/y.bin", y);
    std::ofstream fl(dir + "/flushes.txt");
    for (int64_t f : flushes) fl << f << "\n";
    return 0;
}

// Host emulation of one launch of the MMA GEMV (cuda/bitplane_matmul.cu, bitplane_matmul_mma_kernel)
// built from the same helpers (cuda/bitplane_mma.cuh): every warp, every lane, with the mma computed
// from the fragment registers as PTX defines them ("Matrix Fragments for mma.m16n8k32", .s8: A row
// groupID / groupID + 8, K 4·tig.. and 16 + 4·tig..; B column groupID; C rows groupID / + 8,
// columns 2·tig, 2·tig + 1. "for mma.m16n8k16", .f16: A row groupID / + 8 (a0, a2 / a1, a3), K 2·tig
// + (0, 1) in a0/a1 and 2·tig + 8 + (0, 1) in a2/a3; B column groupID, K 2·tig + (0, 1) in b0, + 8
// in b1; C the same). tests/test_mma_layout.py runs it against numpy.
//
// usage: mma_layout DIR [a16]   with DIR/meta.txt "n k group_size max_bits bits m",
//   DIR/planes.bin (bits, plane_bytes) u8 (the first `bits` planes, tc8x512), DIR/sm.bin (n, n_groups,
//   2) f32 (s, m), DIR/aparams.bin (m, n_groups, 2) f32 (a_s, a_z), and the activations: DIR/q.bin
//   (m, k) int8 (the int8 kernel) or, with "a16" (the f16 kernel), DIR/xh.bin (m, k) uint16 = fp16.
// writes DIR/sums.bin (m, n, n_groups) f64, the group sums (Σ q · ĉ8, or Σ fp16(x) · ĉ8), and
// DIR/y.bin (m, n) f32.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "bitplane_mma.cuh"
#include "host_io.h"

using namespace flexquant;

uint8_t byte_of(uint32_t w, int i) { return uint8_t(w >> (8 * i)); }

// IEEE half (bits) -> double, every finite value.
double half_value(uint16_t h) {
    const int sign = h >> 15, e = (h >> 10) & 31, f = h & 1023;
    if (e == 31) throw std::runtime_error("half inf/nan");
    const double v = e == 0 ? std::ldexp(double(f), -24) : std::ldexp(double(1024 + f), e - 25);
    return sign ? -v : v;
}
double half_of(uint32_t reg, int i) { return half_value(uint16_t(reg >> (16 * i))); }

struct Shape {
    int64_t n, k, group_size, max_bits, bits, m;
    int64_t k_pad, n_tiles, n_groups, plane_bytes, n_super, n_chunks, cpg;
    int last_words;
};

// One step (c, qq) of every lane into d[lane][4] (C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]).
// int8: xa holds q at xa_index; b = decode_word's centred codes.
void step_s8(const Shape& sh, const std::vector<int8_t>& xa, const uint32_t (&b)[32][4][2], int64_t c, int qq,
             double (&d)[32][4]) {
    uint32_t a[32][4];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        // the kernel's one 16-byte load: row g's 8 bytes, then row g + 8's; rows >= m are never read
        const int8_t* src = &xa[size_t(mma::xa_index(128 * c + 32 * t + 8 * qq, g))];
        uint32_t w[4] = {0, 0, 0, 0};
        for (int h = 0; h < 2; ++h)
            if (g + 8 * h < sh.m)
                for (int e = 0; e < 8; ++e) w[2 * h + e / 4] |= uint32_t(uint8_t(src[8 * h + e])) << (8 * (e % 4));
        a[l][0] = w[0];  // row g, logical K 4t..
        a[l][1] = w[2];  // row g + 8, logical K 4t..
        a[l][2] = w[1];  // row g, logical K 16 + 4t..
        a[l][3] = w[3];  // row g + 8, logical K 16 + 4t..
    }
    for (int r = 0; r < 16; ++r)
        for (int col = 0; col < 8; ++col) {
            int sum = 0;
            for (int L = 0; L < 32; ++L) {
                const int tp = (L % 16) / 4, e = L % 4;
                const uint32_t areg = a[4 * (r % 8) + tp][(r >= 8 ? 1 : 0) + (L >= 16 ? 2 : 0)];
                const uint32_t breg = b[4 * col + tp][qq][L >= 16 ? 1 : 0];
                sum += int(int8_t(byte_of(areg, e))) * int(int8_t(byte_of(breg, e)));
            }
            d[4 * (r % 8) + col / 2][(r >= 8 ? 2 : 0) + col % 2] += sum;  // C[r][col] -> lane g = r % 8, t = col / 2
        }
}

// f16: xh holds fp16(x) at xa16_index; b = decode_word<false>'s top-aligned unsigned codes; two
// m16n8k16 per step (h: columns 8qq + 4h ..).
void step_f16(const Shape& sh, const std::vector<uint16_t>& xh, const uint32_t (&b)[32][4][2], int64_t c, int qq,
              double (&d)[32][4]) {
    const double bias = half_value(uint16_t(mma::HALF2_BIAS & 0xffff));
    for (int h = 0; h < 2; ++h) {
        uint32_t a[32][4], bb[32][2];
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            const uint16_t* src = &xh[size_t(mma::xa16_index(128 * c + 32 * t + 8 * qq, g))];
            uint32_t w[2][4] = {};  // the kernel's two 16-byte loads: rows g and g + 8 (rows >= m: zeros)
            for (int rr = 0; rr < 2; ++rr)
                if (g + 8 * rr < sh.m)
                    for (int e = 0; e < 4; ++e)
                        w[rr][e] = uint32_t(src[8 * rr + 2 * e]) | uint32_t(src[8 * rr + 2 * e + 1]) << 16;
            a[l][0] = w[0][2 * h];      // row g, K 2t, 2t+1
            a[l][1] = w[1][2 * h];      // row g + 8
            a[l][2] = w[0][2 * h + 1];  // row g, K 2t + 8, +9
            a[l][3] = w[1][2 * h + 1];
            mma::codes_to_half2_biased(b[l][qq][h], bb[l][0], bb[l][1]);
        }
        for (int r = 0; r < 16; ++r)
            for (int col = 0; col < 8; ++col) {
                double sum = 0;
                for (int L = 0; L < 16; ++L) {
                    const int tp = (L % 8) / 2, e = L % 2;
                    const double av = half_of(a[4 * (r % 8) + tp][(r >= 8 ? 1 : 0) + (L >= 8 ? 2 : 0)], e);
                    sum += av * (half_of(bb[4 * col + tp][L >= 8 ? 1 : 0], e) - bias);
                }
                d[4 * (r % 8) + col / 2][(r >= 8 ? 2 : 0) + col % 2] += sum;
            }
    }
}

int main(int argc, char** argv) {
    if (argc != 2 && argc != 3) {
        std::fprintf(stderr, "usage: mma_layout DIR [a16]\n");
        return 2;
    }
    const std::string dir = argv[1];
    const bool a16 = argc == 3 && std::string(argv[2]) == "a16";
    Shape sh{};
    {
        std::ifstream meta(dir + "/meta.txt");
        if (!(meta >> sh.n >> sh.k >> sh.group_size >> sh.max_bits >> sh.bits >> sh.m))
            throw std::runtime_error("bad meta.txt");
    }
    sh.k_pad = (sh.k + 127) / 128 * 128;
    sh.n_tiles = (sh.n + 7) / 8;
    sh.n_groups = (sh.k + sh.group_size - 1) / sh.group_size;
    sh.plane_bytes = sh.n_tiles * sh.k_pad;
    sh.n_super = (sh.k_pad + 511) / 512;
    sh.n_chunks = sh.k_pad / 128;
    sh.last_words = int((sh.k_pad - (sh.n_super - 1) * 512) / 128);
    sh.cpg = sh.group_size / 128;  // chunks per group
    const int64_t m = sh.m, n = sh.n, k = sh.k, n_groups = sh.n_groups;

    const auto planes = read_file<uint8_t>(dir + "/planes.bin", size_t(sh.bits * sh.plane_bytes));
    const auto sm = read_file<float>(dir + "/sm.bin", size_t(n * n_groups * 2));
    const auto ap = read_file<float>(dir + "/aparams.bin", size_t(m * n_groups * 2));
    // The preparation kernels' stores: row r, column col at xa_index (K padding columns hold 0;
    // rows >= m are never written, and never read: poisoned here).
    std::vector<int8_t> xa;
    std::vector<uint16_t> xh;
    if (a16) {
        const auto x = read_file<uint16_t>(dir + "/xh.bin", size_t(m * k));
        xh.assign(size_t(sh.n_chunks * 128 * mma::ROWS), uint16_t(0x7e00));  // NaN
        for (int64_t r = 0; r < m; ++r)
            for (int64_t col = 0; col < sh.k_pad; ++col)
                xh[size_t(mma::xa16_index(col, int(r)))] = col < k ? x[size_t(r * k + col)] : 0;
    } else {
        const auto q = read_file<int8_t>(dir + "/q.bin", size_t(m * k));
        xa.assign(size_t(sh.n_chunks * 128 * mma::ROWS), int8_t(0x5a));
        for (int64_t r = 0; r < m; ++r)
            for (int64_t col = 0; col < sh.k_pad; ++col)
                xa[size_t(mma::xa_index(col, int(r)))] = col < k ? q[size_t(r * k + col)] : 0;
    }

    std::vector<double> sums(size_t(m * n * n_groups), 0.0);
    std::vector<float> y(size_t(m * n), 0.0f);
    const mma::GroupConstants gc = mma::group_constants(int(sh.max_bits), int(sh.bits));
    for (int64_t rt = 0; rt < sh.n_tiles; ++rt) {
        float acc[32][4] = {};  // per lane: (x rows g, g + 8) x (weight rows 8rt + 2t, +1)
        for (int64_t s = 0; s < sh.n_super; ++s) {
            const int W = s == sh.n_super - 1 ? sh.last_words : 4;
            // load_planes: lane l's words j of plane p at tile + 512 s + 4 (l W + j); planes >= bits zero
            uint32_t P[32][8][4] = {};
            for (int l = 0; l < 32; ++l)
                for (int p = 0; p < sh.bits; ++p)
                    for (int j = 0; j < W; ++j) {
                        const size_t off = size_t(p * sh.plane_bytes + rt * sh.k_pad + s * 512 + 4 * (l * W + j));
                        P[l][p][j] = uint32_t(planes[off]) | uint32_t(planes[off + 1]) << 8 |
                                     uint32_t(planes[off + 2]) << 16 | uint32_t(planes[off + 3]) << 24;
                    }
            double d[32][4] = {};  // the group's sums (int8: exact integers in a double)
            for (int j = 0; j < W; ++j) {
                const int64_t c = 4 * s + j;
                if (c % sh.cpg == 0)
                    for (auto& dl : d) dl[0] = dl[1] = dl[2] = dl[3] = 0;
                uint32_t b[32][4][2];
                for (int l = 0; l < 32; ++l) {
                    uint32_t u[8];
                    for (int p = 0; p < 8; ++p) u[p] = P[l][p][j];
                    if (a16)
                        mma::decode_word<false>(u, b[l]);
                    else
                        mma::decode_word(u, b[l]);
                }
                for (int qq = 0; qq < 4; ++qq) {
                    if (a16)
                        step_f16(sh, xh, b, c, qq, d);
                    else
                        step_s8(sh, xa, b, c, qq, d);
                }
                if ((c + 1) % sh.cpg == 0 || c == sh.n_chunks - 1) {  // the group's end
                    const int64_t grp = c / sh.cpg;
                    for (int l = 0; l < 32; ++l) {
                        const int g = l >> 2, t = l & 3;
                        for (int i = 0; i < 4; ++i) {  // d[i]: x row g + 8 (i / 2), weight row 8rt + 2t + i % 2
                            const int xr = g + 8 * (i >> 1);
                            const int64_t row = rt * 8 + 2 * t + (i & 1);
                            if (xr >= m || row >= n) continue;
                            sums[size_t((xr * n + row) * n_groups + grp)] = d[l][i];
                            const float* smp = &sm[size_t((row * n_groups + grp) * 2)];
                            const float* app = &ap[size_t((xr * n_groups + grp) * 2)];
                            const float term = a16 ? mma::group_term(float(d[l][i]), app[0], app[1], smp[0], smp[1], gc)
                                                   : mma::group_term(int(d[l][i]), app[0], app[1], smp[0], smp[1], gc);
                            acc[l][i] += term;
                        }
                    }
                }
            }
        }
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            for (int i = 0; i < 4; ++i) {
                const int xr = g + 8 * (i >> 1);
                const int64_t row = rt * 8 + 2 * t + (i & 1);
                if (xr < m && row < n) y[size_t(xr * n + row)] = acc[l][i];
            }
        }
    }
    write_file(dir + "/sums.bin", sums);
    write_file(dir + "/y.bin", y);
    return 0;
}

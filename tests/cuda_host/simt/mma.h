// The warp-wide tensor-core instructions of the GEMV kernels (cuda/bitplane_matmul.cu wraps each in a
// function whose FLEXQUANT_SIMT branch calls these), computed on the CPU from the 32 lanes' operand
// registers as the PTX ISA lays them out ("Matrix fragments for mma.m16n8k256 / m16n8k32 /
// m16n8k16"), written here from the ISA and not from the kernels' own helpers, so a kernel that puts
// a value in the wrong register gets a wrong product. With gid = lane / 4, tig = lane % 4:
//   A (16 rows x K, row-major): a0 row gid, a1 row gid + 8, the first half of K; a2, a3 the same rows,
//     the second half. Within a half, lane tig holds K [tig·E, tig·E + E) of its row, E elements per
//     32-bit register (32 bits of b1, 4 bytes of s8, 2 halves of f16), the lowest K in the lowest bits.
//   B (K x 8, column-major): b0 column gid, the first half of K; b1 the second; lane tig's elements
//     as for A.
//   C, D (16 x 8): d0, d1 row gid, columns 2·tig, 2·tig + 1; d2, d3 row gid + 8.
// The products are exact integers (b1 AND + POPC, s8) or exact fp32 products of fp16 values summed in
// fp64 and rounded once (the hardware's fp32 accumulation order is its own; the tests' f16 bounds
// allow for it).
#pragma once

namespace simt {

// This lane's registers into the warp's table; returns the table once every lane has put its own.
// .aligned: all 32 lanes of the warp must execute the instruction.
inline Warp& mma_gather(const char* fn, std::initializer_list<uint32_t> regs) {
    Block& b = *current_block();
    Fiber& f = fiber();
    Warp& w = b.warps[size_t(f.warp)];
    if (w.live != 32) fatal(std::string(fn) + ": an .aligned mma with " + std::to_string(w.live) + " live lanes (needs 32)");
    int i = 0;
    for (uint32_t r : regs) w.frag[f.lane][i++] = r;
    warp_barrier(fn);
    // (again after the wait: lanes that returned while the others waited also let it open)
    if (w.live != 32) fatal(std::string(fn) + ": an .aligned mma with " + std::to_string(w.live) + " live lanes (needs 32)");
    return w;
}

// m16n8k256 .b1 AND + POPC: d[row, col] += Σ_K popc(A[row, K] AND B[K, col]).
inline void mma_b1(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    Internal internal;  // (registers only: the lanes' operands in the warp's table)
    const Warp& w = mma_gather("mma.m16n8k256.b1", {a0, a1, a2, a3, b0, b1});
    const int lane = fiber().lane, gid = lane >> 2, tig = lane & 3;
    for (int e = 0; e < 4; ++e) {
        const int row = gid + 8 * (e >> 1), col = 2 * tig + (e & 1);
        int sum = 0;
        for (int half = 0; half < 2; ++half)
            for (int t = 0; t < 4; ++t) {
                const uint32_t a = w.frag[4 * (row & 7) + t][(row >> 3) + 2 * half];  // a0/a1, then a2/a3
                const uint32_t b = w.frag[4 * col + t][4 + half];                     // b0, then b1
                sum += __builtin_popcount(a & b);
            }
        d[e] += sum;
    }
    warp_barrier("mma (done)");
}

// m16n8k32 .s8: d[row, col] += Σ_K A[row, K] · B[K, col], signed bytes, int32.
inline void mma_s8(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    Internal internal;  // (registers only: the lanes' operands in the warp's table)
    const Warp& w = mma_gather("mma.m16n8k32.s8", {a0, a1, a2, a3, b0, b1});
    const int lane = fiber().lane, gid = lane >> 2, tig = lane & 3;
    auto byte = [](uint32_t r, int i) { return int(int8_t(uint8_t(r >> (8 * i)))); };
    for (int e = 0; e < 4; ++e) {
        const int row = gid + 8 * (e >> 1), col = 2 * tig + (e & 1);
        int sum = 0;
        for (int kk = 0; kk < 32; ++kk) {
            const int half = kk / 16, t = kk % 16 / 4, i = kk % 4;
            sum += byte(w.frag[4 * (row & 7) + t][(row >> 3) + 2 * half], i) * byte(w.frag[4 * col + t][4 + half], i);
        }
        d[e] += sum;
    }
    warp_barrier("mma (done)");
}

// m16n8k16 .f16 -> .f32: d[row, col] += Σ_K A[row, K] · B[K, col].
inline void mma_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    Internal internal;  // (registers only: the lanes' operands in the warp's table)
    const Warp& w = mma_gather("mma.m16n8k16.f16", {a0, a1, a2, a3, b0, b1});
    const int lane = fiber().lane, gid = lane >> 2, tig = lane & 3;
    auto half = [](uint32_t r, int i) { return double(flexquant::fp16_to_fp32(uint16_t(r >> (16 * i)))); };
    for (int e = 0; e < 4; ++e) {
        const int row = gid + 8 * (e >> 1), col = 2 * tig + (e & 1);
        double sum = d[e];
        for (int kk = 0; kk < 16; ++kk) {
            const int h = kk / 8, t = kk % 8 / 2, i = kk % 2;
            sum += half(w.frag[4 * (row & 7) + t][(row >> 3) + 2 * h], i) * half(w.frag[4 * col + t][4 + h], i);
        }
        d[e] = float(sum);
    }
    warp_barrier("mma (done)");
}

// sub.rn.f16x2: each 16-bit half a - b rounded to the nearest fp16 (exact in fp64, then one rounding
// through fp32, which is exact for the differences of fp16 values the kernels form).
inline uint32_t sub_f16x2(uint32_t a, uint32_t b) {
    uint32_t r = 0;
    for (int i = 0; i < 2; ++i) {
        const float x = flexquant::fp16_to_fp32(uint16_t(a >> (16 * i))), y = flexquant::fp16_to_fp32(uint16_t(b >> (16 * i)));
        r |= uint32_t(flexquant::fp32_to_fp16(float(double(x) - double(y)))) << (16 * i);
    }
    return r;
}

}  // namespace simt

namespace simt {

// cp.async.cg 16 bytes, commit_group, wait_group N: a copy is done when its group is waited for, not
// before, so a kernel that reads shared memory before the wait reads the poison.
inline void copy16(void* dst, const void* src) {
    declare_read(src, 16);
    declare_write(dst, 16);
    Fiber& f = fiber();
    PendingCopy c;
    c.dst = static_cast<unsigned char*>(dst);
    c.src = static_cast<const unsigned char*>(src);
    c.bytes = 16;
    ordered_before(c.issued.get());
    f.cp_open.push_back(std::move(c));
}
inline void cp_commit() {
    Fiber& f = fiber();
    f.cp_groups.push_back(std::move(f.cp_open));
    f.cp_open.clear();
}
inline void cp_wait(size_t pending) {
    Fiber& f = fiber();
    while (f.cp_groups.size() > pending) {
        for (const auto& c : f.cp_groups.front())
            as_copy_engine(f.engine, c, &f.cp_landed);
        f.cp_groups.pop_front();
    }
    ordered_after(&f.cp_landed);
}

// ldmatrix.sync.aligned.m8n8.x4.b16: lanes 8i..8i+7 give the 16-byte row addresses of matrix i (row
// j from lane 8i + j); lane t receives, of each matrix i, the 4 bytes 4·(t % 4).. of row t / 4.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
    Block& b = *current_block();
    Fiber& f = fiber();
    Warp& w = b.warps[size_t(f.warp)];
    if (w.live != 32) fatal("ldmatrix with " + std::to_string(w.live) + " live lanes (needs 32)");
    if (reinterpret_cast<uintptr_t>(row) % 16) fatal("ldmatrix: a row address that is not 16-byte aligned");
    declare_read(row, 16);  // (the row is read for the lane that gives its address)
    Internal internal;      // (the exchange of the row addresses and bytes: the stand-in's)
    w.slot[f.lane] = reinterpret_cast<uintptr_t>(row);
    warp_barrier("ldmatrix");
    if (w.live != 32) fatal("ldmatrix with " + std::to_string(w.live) + " live lanes (needs 32)");
    for (int i = 0; i < 4; ++i)
        std::memcpy(&r[i], reinterpret_cast<const char*>(uintptr_t(w.slot[8 * i + f.lane / 4])) + 4 * (f.lane % 4), 4);
    warp_barrier("ldmatrix (done)");
}

}  // namespace simt

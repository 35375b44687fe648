// sm_90's asynchronous instructions in the CPU stand-in for CUDA (cuda_runtime.h here), as the wgmma
// GEMM (wg_gemm_kernel, cuda/bitplane_matmul_gemm.cu) uses them, each written from the PTX ISA and
// the driver API's documentation, not from the kernel's helpers (cuda/bitplane_wgmma.cuh), so that
// a kernel that puts a byte or a register in the wrong place gets a wrong product:
//
//  - The .shared window: shared address a is the block's window + a; the dynamic shared memory starts
//    at its declared alignment (at least 16). Every address an instruction below takes is checked
//    against the dynamic shared memory.
//  - mbarrier (init, arrive, arrive.expect_tx, try_wait.parity): a phase completes when its expected
//    arrivals have arrived and its transaction count is back to 0; try_wait.parity(P) is true once
//    the phase of parity P has completed (a fresh barrier's phase "before 0", parity 1, has).
//  - Bulk copies (cp.async.bulk, and cp.async.bulk.tensor through a tensor map that this file's
//    cuTensorMapEncodeTiled encodes with the driver's checks): they complete on their mbarrier when a
//    thread next tests it, not when issued, so a read of their destination before the wait shows.
//    TMA writes its box densely, inner dimension first, out-of-bounds elements as zeros, and with
//    CU_TENSOR_MAP_SWIZZLE_128B XORs the 16-byte chunk bits [4, 7) of each shared address with bits
//    [7, 10) (the swizzle is a function of the address: boxes must be 1,024-byte aligned here).
//  - wgmma.mma_async .s32.s8.s8 (m64nNk32): A (64 x 32 bytes) and B (N x 32 bytes), both K-major,
//    read through their matrix descriptors (start address >> 4 in bits 0-13, stride byte offset >> 4
//    in bits 32-45, swizzle mode in bits 62-63; the 128-byte swizzle only): row r's byte k at
//    start + (r / 8)·SBO + (r % 8)·128 + k, swizzled as TMA writes it. D, N/2 int32 per thread: warp w
//    of the warpgroup holds rows 16w..16w+15; register 4j + e of lane l is row 16w + l/4 + 8·(e/2),
//    column 8j + 2·(l%4) + e%2. The operands are read at the issue and the products done at the
//    wgmma.wait_group that covers them: shared memory they read that changes in between, and
//    accumulators that plain code changes in between, are errors. N must be one the ISA allows for
//    s8, and the descriptors' reserved bits 0. A wgmma.fence must open each batch (stricter than the
//    ISA, which needs it only when plain code touched the registers: the kernels fence every batch).
//  - setmaxnreg.inc / .dec: the warpgroup's registers per thread (REGS_AT_LAUNCH at launch), moved to
//    and from the block's pool (PTX ISA: per CTA, holding what .dec released); an increase waits until
//    the pool has enough, as on a GPU (one that never can is reported as a deadlock).
//  - Every instruction here that is .sync.aligned checks that all 128 threads of the warpgroup are at
//    the same one, with the same operands (wgmma's descriptors, N and scale-d).
//  Not modelled: clusters (.shared::cluster is the block's own shared memory), multicast, the 32- and
//  64-byte swizzles, interleaved tensor maps, element strides, im2col, TMA stores, the fp16/bf16/fp8
//  wgmma, and the memory ordering the memory fences provide (fence.proxy.async and
//  fence.mbarrier_init are no-ops here; wgmma.fence is checked, above).
#pragma once

namespace simt {

// ---- the .shared window ---------------------------------------------------------------------------

[[noreturn]] inline void fatal_at(const char* who, const std::string& what) { fatal(std::string(who) + ": " + what); }

inline std::string hex(uint64_t v) {
    char s[24];
    std::snprintf(s, sizeof s, "0x%llx", static_cast<unsigned long long>(v));
    return s;
}

// The host bytes of shared addresses [a, a + n), which must lie in the block's dynamic shared memory.
inline unsigned char* shared_bytes(uint64_t a, uint64_t n, const char* who) {
    Internal internal;
    const Block& b = *current_block();
    if (b.dyn_offset == 0) fatal_at(who, "shared address " + hex(a) + " in a kernel without dynamic shared memory");
    if (a < b.dyn_offset || a + n > b.dyn_offset + b.dyn_bytes)
        fatal_at(who, "shared addresses [" + hex(a) + ", " + hex(a + n) + ") outside the dynamic shared memory [" +
                          hex(b.dyn_offset) + ", " + hex(b.dyn_offset + b.dyn_bytes) + ")");
    return b.smem_window + a;
}

}  // namespace simt

// A generic pointer into the block's dynamic shared memory -> its shared address.
inline size_t __cvta_generic_to_shared(const void* p) {
    simt::Internal internal;
    const simt::Block& b = *simt::current_block();
    const auto* c = static_cast<const unsigned char*>(p);
    if (b.dyn_offset == 0 || c < b.smem_window + b.dyn_offset || c > b.smem_window + b.dyn_offset + b.dyn_bytes)
        simt::fatal("__cvta_generic_to_shared: a pointer outside the dynamic shared memory (the stand-in maps only it)");
    return size_t(c - b.smem_window);
}

// ---- tensor maps (the driver's cuTensorMapEncodeTiled; <cudaTypedefs.h> names the function type) ----
using cuuint32_t = uint32_t;
using cuuint64_t = uint64_t;
enum CUresult { CUDA_SUCCESS = 0, CUDA_ERROR_INVALID_VALUE = 1 };
struct alignas(64) CUtensorMap {
    uint64_t opaque[16];
};
enum CUtensorMapDataType {
    CU_TENSOR_MAP_DATA_TYPE_UINT8 = 0, CU_TENSOR_MAP_DATA_TYPE_UINT16, CU_TENSOR_MAP_DATA_TYPE_UINT32,
    CU_TENSOR_MAP_DATA_TYPE_INT32, CU_TENSOR_MAP_DATA_TYPE_UINT64, CU_TENSOR_MAP_DATA_TYPE_INT64,
    CU_TENSOR_MAP_DATA_TYPE_FLOAT16, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, CU_TENSOR_MAP_DATA_TYPE_FLOAT64,
    CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
};
enum CUtensorMapInterleave { CU_TENSOR_MAP_INTERLEAVE_NONE = 0, CU_TENSOR_MAP_INTERLEAVE_16B, CU_TENSOR_MAP_INTERLEAVE_32B };
enum CUtensorMapSwizzle {
    CU_TENSOR_MAP_SWIZZLE_NONE = 0, CU_TENSOR_MAP_SWIZZLE_32B, CU_TENSOR_MAP_SWIZZLE_64B, CU_TENSOR_MAP_SWIZZLE_128B,
};
enum CUtensorMapL2promotion {
    CU_TENSOR_MAP_L2_PROMOTION_NONE = 0, CU_TENSOR_MAP_L2_PROMOTION_L2_64B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
    CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
};
enum CUtensorMapFloatOOBfill { CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE = 0, CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA };

namespace simt {

// What the stand-in keeps in a CUtensorMap's 128 opaque bytes.
struct TensorMap {
    uint32_t magic;
    uint8_t rank, elem, swizzle, interleave;
    uint64_t base;
    uint64_t dims[5];
    uint64_t strides[4];  // bytes between consecutive indices of dimensions 1.. (dimension 0: elem)
    uint16_t box[5];
    uint8_t elem_strides[5];
};
static_assert(sizeof(TensorMap) <= sizeof(CUtensorMap), "a tensor map fits the opaque bytes");
constexpr uint32_t TENSOR_MAP_MAGIC = 0x544d4150;  // "TMAP"

// cuTensorMapEncodeTiled with the checks its documentation lists (an invalid argument:
// CUDA_ERROR_INVALID_VALUE, the map untouched).
inline CUresult encode_tensor_map_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* base,
                                        const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                                        const cuuint32_t* elem_strides, CUtensorMapInterleave interleave,
                                        CUtensorMapSwizzle swizzle, CUtensorMapL2promotion promotion,
                                        CUtensorMapFloatOOBfill fill) {
    static const uint8_t sizes[] = {1, 2, 4, 4, 8, 8, 2, 4, 8, 2};
    if (map == nullptr || unsigned(type) > CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 || rank < 1 || rank > 5 ||
        unsigned(interleave) > CU_TENSOR_MAP_INTERLEAVE_32B || unsigned(swizzle) > CU_TENSOR_MAP_SWIZZLE_128B ||
        unsigned(promotion) > CU_TENSOR_MAP_L2_PROMOTION_L2_256B || unsigned(fill) > CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA)
        return CUDA_ERROR_INVALID_VALUE;
    if (interleave != CU_TENSOR_MAP_INTERLEAVE_NONE && rank < 3) return CUDA_ERROR_INVALID_VALUE;
    const uint64_t align = interleave == CU_TENSOR_MAP_INTERLEAVE_32B ? 32 : 16;
    if (reinterpret_cast<uintptr_t>(base) % align) return CUDA_ERROR_INVALID_VALUE;
    const uint32_t elem = sizes[type];
    TensorMap t{};
    t.magic = TENSOR_MAP_MAGIC;
    t.rank = uint8_t(rank), t.elem = uint8_t(elem), t.swizzle = uint8_t(swizzle), t.interleave = uint8_t(interleave);
    t.base = reinterpret_cast<uintptr_t>(base);
    for (uint32_t i = 0; i < rank; ++i) {
        if (dims[i] == 0 || dims[i] > (uint64_t(1) << 32)) return CUDA_ERROR_INVALID_VALUE;
        if (box[i] == 0 || box[i] > 256) return CUDA_ERROR_INVALID_VALUE;
        if (elem_strides[i] == 0 || elem_strides[i] > 8) return CUDA_ERROR_INVALID_VALUE;
        if (i + 1 < rank && (strides[i] % align || strides[i] >= (uint64_t(1) << 40))) return CUDA_ERROR_INVALID_VALUE;
        t.dims[i] = dims[i], t.box[i] = uint16_t(box[i]), t.elem_strides[i] = uint8_t(elem_strides[i]);
        if (i + 1 < rank) t.strides[i] = strides[i];
    }
    if (interleave == CU_TENSOR_MAP_INTERLEAVE_NONE) {
        const uint64_t inner = uint64_t(box[0]) * elem;
        if (inner % 16) return CUDA_ERROR_INVALID_VALUE;  // the inner box dimension: a multiple of 16 bytes
        static const uint64_t span[] = {0, 32, 64, 128};
        if (swizzle != CU_TENSOR_MAP_SWIZZLE_NONE && inner > span[swizzle]) return CUDA_ERROR_INVALID_VALUE;
    }
    *map = CUtensorMap{};
    std::memcpy(map, &t, sizeof t);
    return CUDA_SUCCESS;
}

// ---- warpgroup collectives ------------------------------------------------------------------------

// A .sync.aligned warpgroup instruction `what`: all 128 threads of the caller's warpgroup, all at it,
// with the same `operands` (3 values; none: zeros).
inline WarpGroup& warpgroup_collective(const char* what, const uint64_t* operands = nullptr) {
    Internal internal;
    Block& b = *current_block();
    const Fiber& f = fiber();
    const int gi = f.warp / 4, t = f.warp % 4 * 32 + f.lane;
    WarpGroup& g = b.groups[size_t(gi)];
    auto need_all = [&] {
        if (g.live != 128)
            fatal(std::string(what) + ": a .sync.aligned warpgroup instruction with " + std::to_string(g.live) +
                  " live threads in warpgroup " + std::to_string(gi) + " (needs 128)");
    };
    need_all();
    const unsigned mine = g.gen;
    g.at[t] = what;
    for (int i = 0; i < 3; ++i) g.operands[t][i] = operands ? operands[i] : 0;
    if (g.arrived + 1 == g.live) {  // the last to arrive: every thread of the warpgroup must be at `what`
        for (int l = 0; l < 128; ++l) {
            if (std::strcmp(g.at[l], what) != 0)
                fatal("warpgroup " + std::to_string(gi) + ": thread " + std::to_string(t) + " is at " + what +
                      " while thread " + std::to_string(l) + " is at " + g.at[l]);
            for (int i = 0; i < 3; ++i)
                if (g.operands[l][i] != g.operands[t][i])
                    fatal(std::string(what) + ": warpgroup " + std::to_string(gi) + "'s threads " + std::to_string(l) +
                          " and " + std::to_string(t) + " give operand " + std::to_string(i) + " as " +
                          hex(g.operands[l][i]) + " and " + hex(g.operands[t][i]) + " (it must be the same)");
        }
        if (g.live == 128) g.full_gen = mine + 1;
    }
    barrier(g.arrived, g.live, g.gen);
    if (g.full_gen != mine + 1)  // it opened because threads returned while the others waited
        fatal(std::string(what) + ": a .sync.aligned warpgroup instruction that threads of warpgroup " +
              std::to_string(gi) + " returned instead of executing (needs all 128)");
    return g;
}

// ---- setmaxnreg -----------------------------------------------------------------------------------

inline void setmaxnreg(uint32_t n, bool inc) {
    const char* what = inc ? "setmaxnreg.inc" : "setmaxnreg.dec";
    if (n < 24 || n > 256 || n % 8) fatal_at(what, "register count " + std::to_string(n) + " (24..256, a multiple of 8)");
    const uint64_t operands[3] = {n, 0, 0};
    WarpGroup& g = warpgroup_collective(what, operands);
    Internal internal;
    Block& b = *current_block();
    const Fiber& f = fiber();
    if (f.warp % 4 == 0 && f.lane == 0) {  // once for the warpgroup
        if (inc ? int(n) < g.regs : int(n) > g.regs)
            fatal_at(what, "from " + std::to_string(g.regs) + " to " + std::to_string(n) + " registers per thread");
        const int delta = (int(n) - g.regs) * 128;
        while (b.reg_pool < delta) yield();  // an increase waits until decreases left enough in the pool
        b.reg_pool -= delta;
        g.regs = int(n);
        ++b.progress;
    }
    warpgroup_collective(inc ? "setmaxnreg.inc (done)" : "setmaxnreg.dec (done)");
}

// ---- mbarrier -------------------------------------------------------------------------------------

inline MBarrier& mbarrier(uint32_t bar, const char* who) {
    Internal internal;
    Block& b = *current_block();
    const auto it = b.mbars.find(bar);
    if (it == b.mbars.end()) fatal_at(who, "no mbarrier was initialized at shared address " + hex(bar));
    return it->second;
}

constexpr int64_t TX_LIMIT = (int64_t(1) << 20) - 1;  // the transaction count's range: ±(2^20 - 1)

inline void mbar_complete_if_done(MBarrier& m) {
    Internal internal;
    if (m.pending == 0 && m.tx == 0) {
        ++m.phase;
        m.pending = m.count;
        ++current_block()->progress;
    }
}

// The barrier's 8 bytes in shared memory: init writes them, arrive and test_wait access them
// atomically, so that a thread using a barrier that no ordering puts after its initialization, or
// plain code writing over it, is a race (race checking).
inline uint64_t* mbar_word(uint32_t bar, const char* who) { return reinterpret_cast<uint64_t*>(shared_bytes(bar, 8, who)); }

inline void mbar_init(uint32_t bar, uint32_t count) {
    if (bar % 8) fatal_at("mbarrier.init", "shared address " + hex(bar) + " is not 8-byte aligned");
    if (count == 0 || count >= (1u << 20)) fatal_at("mbarrier.init", "expected count " + std::to_string(count) + " (1..2^20 - 1)");
    {
        TrafficIgnore traffic_ignore;
        *mbar_word(bar, "mbarrier.init") = 0;  // (a plain store: the race checker's memset interception misses races with atomics)
    }
    Internal internal;
    Block& b = *current_block();
    const auto it = b.mbars.find(bar);
    if (it != b.mbars.end() && !it->second.copies.empty())
        fatal_at("mbarrier.init", "the mbarrier at " + hex(bar) + " has bulk copies in flight");
    MBarrier m;
    m.count = m.pending = count;
    b.mbars[bar] = std::move(m);
}

// arrive (expect_tx = 0) or arrive.expect_tx: the transaction bytes expected first, then one arrival.
inline void mbar_arrive(uint32_t bar, uint32_t expect_tx) {
    const char* who = expect_tx ? "mbarrier.arrive.expect_tx" : "mbarrier.arrive";
    MBarrier& m = mbarrier(bar, who);
    {
        TrafficIgnore traffic_ignore;
        __atomic_fetch_add(mbar_word(bar, who), uint64_t(0), __ATOMIC_RELAXED);
    }
    ordered_before(order_of(m.order, m.phase));  // this thread's work, before the waits that see the phase complete
    Internal internal;
    if (m.pending == 0) fatal_at(who, "the mbarrier at " + hex(bar) + " expects no more arrivals in its phase");
    m.tx += expect_tx;
    if (m.tx > TX_LIMIT) fatal_at(who, "the mbarrier at " + hex(bar) + " expects " + std::to_string(m.tx) + " bytes (at most 2^20 - 1)");
    --m.pending;
    ++current_block()->progress;
    mbar_complete_if_done(m);
}

// mbarrier.try_wait.parity: whether the phase of this parity has completed. The bulk copies that
// complete on the barrier are done now (the first test after their issue).
inline bool mbar_test_parity(uint32_t bar, uint32_t parity) {
    const char* who = "mbarrier.try_wait.parity";
    MBarrier& m = mbarrier(bar, who);
    {
        TrafficIgnore traffic_ignore;
        (void)__atomic_load_n(mbar_word(bar, who), __ATOMIC_RELAXED);
    }
    std::vector<PendingCopy> copies;
    {
        Internal internal;
        copies = std::move(m.copies);
        m.copies.clear();
    }
    if (!copies.empty()) {
        Block& b = *current_block();
        // each by its issuer's copy engine: after its issue, before the waits that see the phase complete
        const void* const landed = order_of(m.order, m.phase);
        for (auto& c : copies) as_copy_engine(b.fibers[size_t(c.issuer)].engine, c, landed);
        Internal internal;
        for (auto& c : copies) m.tx -= c.bytes;
        std::vector<PendingCopy>().swap(copies);  // (freed here: the records' bookkeeping is the stand-in's)
        if (m.tx < -TX_LIMIT) fatal_at("mbarrier complete_tx", "the mbarrier at " + hex(bar) + " got " + std::to_string(-m.tx) + " bytes more than expected (at most 2^20 - 1)");
        ++current_block()->progress;
        mbar_complete_if_done(m);
    }
    bool done;
    {
        Internal internal;
        done = (m.phase & 1u) != (parity & 1u);
    }
    if (done) ordered_after(&m.order[parity & 1]);
    return done;
}

inline void mbar_wait(uint32_t bar, uint32_t parity) {
    while (!mbar_test_parity(bar, parity)) yield();  // (a wait that never ends: a deadlock, reported)
}

// ---- bulk copies ------------------------------------------------------------------------------------

// A copy into shared [dst, dst + bytes) must not overwrite an mbarrier.
inline void check_no_barrier(uint32_t dst, uint64_t bytes, const char* who) {
    Internal internal;
    const Block& b = *current_block();
    const auto it = b.mbars.lower_bound(dst >= 7 ? dst - 7 : 0);
    if (it != b.mbars.end() && it->first < dst + bytes)
        fatal_at(who, "the destination [" + hex(dst) + ", " + hex(dst + bytes) + ") overwrites the mbarrier at " + hex(it->first));
}

// A bulk copy issued by this thread, to complete on the mbarrier at bar.
inline void issue_copy(uint32_t bar, PendingCopy c, const char* who) {
    MBarrier& m = mbarrier(bar, who);
    Block& b = *current_block();
    ordered_before(c.issued.get());
    Internal internal;
    c.issuer = b.cur;
    m.copies.push_back(std::move(c));
}

// cp.async.bulk.shared.global.mbarrier::complete_tx::bytes [dst], [src], bytes, [bar]
inline void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
    const char* who = "cp.async.bulk";
    if (bytes == 0 || bytes % 16 || dst % 16 || reinterpret_cast<uintptr_t>(src) % 16)
        fatal_at(who, std::to_string(bytes) + " bytes from " + hex(reinterpret_cast<uintptr_t>(src)) + " to " + hex(dst) +
                          " (sizes and addresses: multiples of 16)");
    unsigned char* d = shared_bytes(dst, bytes, who);
    check_no_barrier(dst, bytes, who);
    declare_read(src, bytes);
    declare_write(d, bytes);
    PendingCopy c;
    c.dst = d;
    c.src = static_cast<const unsigned char*>(src);
    c.bytes = bytes;
    issue_copy(bar, std::move(c), who);
}

// cp.async.bulk.tensor.Nd.shared.global.tile.mbarrier::complete_tx::bytes [dst], [map, {c...}], [bar]
inline void tma_load(uint32_t dst, const CUtensorMap* map, const int32_t* coords, int rank, uint32_t bar) {
    const char* who = "cp.async.bulk.tensor";
    TensorMap t;
    std::memcpy(&t, map, sizeof t);
    if (t.magic != TENSOR_MAP_MAGIC) fatal_at(who, "a tensor map that cuTensorMapEncodeTiled did not encode");
    if (t.rank != rank) fatal_at(who, "a ." + std::to_string(rank) + "d copy through a rank-" + std::to_string(t.rank) + " tensor map");
    if (t.interleave != CU_TENSOR_MAP_INTERLEAVE_NONE) fatal_at(who, "interleaved tensor maps are not modelled");
    if (t.swizzle != CU_TENSOR_MAP_SWIZZLE_NONE && t.swizzle != CU_TENSOR_MAP_SWIZZLE_128B)
        fatal_at(who, "the 32- and 64-byte swizzles are not modelled");
    uint64_t total = t.elem;
    for (int i = 0; i < rank; ++i) {
        if (t.elem_strides[i] != 1) fatal_at(who, "element strides are not modelled");
        total *= t.box[i];
    }
    const bool swz = t.swizzle == CU_TENSOR_MAP_SWIZZLE_128B;
    if (dst % 128) fatal_at(who, "shared address " + hex(dst) + " is not 128-byte aligned");
    if (swz && (dst % 1024 || uint64_t(t.box[0]) * t.elem != 128))
        fatal_at(who, "the 128-byte swizzle into " + hex(dst) + " with a " + std::to_string(t.box[0] * t.elem) +
                          "-byte inner box (modelled: 1,024-byte aligned boxes of 128-byte rows)");
    unsigned char* window = shared_bytes(dst, total, who) - dst;
    check_no_barrier(dst, total, who);
    PendingCopy pc;
    pc.tensor = true;
    pc.window = window;
    pc.dst_addr = dst;
    pc.bytes = uint32_t(total);
    std::memcpy(pc.coords, coords, sizeof(int32_t) * size_t(rank));
    std::memcpy(pc.map, map, sizeof pc.map);
    declare_write(window + dst, total);
    issue_copy(bar, std::move(pc), who);
}

// Does a pending copy, as the copy engine (as_copy_engine): uninstrumented, declaring what it writes
// and reads. TMA: the box in order, dimension 0 fastest; out-of-bounds elements are zeros; the
// 128-byte swizzle XORs address bits [4, 7) with bits [7, 10).
SIMT_NO_TSAN inline void perform_copy(const PendingCopy& c) {
    if (!c.tensor) {
        declare_read(c.src, c.bytes);
        declare_write(c.dst, c.bytes);
        std::memcpy(c.dst, c.src, c.bytes);
        return;
    }
    TensorMap t;
    std::memcpy(&t, c.map, sizeof t);
    declare_write(c.window + c.dst_addr, c.bytes);
    int64_t idx[5] = {0, 0, 0, 0, 0};
    for (uint64_t o = 0; o < c.bytes; o += t.elem) {
        bool inside = true;
        uint64_t src = t.base;
        for (int i = 0; i < t.rank; ++i) {
            const int64_t g = c.coords[i] + idx[i];
            inside = inside && g >= 0 && uint64_t(g) < t.dims[i];
            src += uint64_t(g) * (i == 0 ? t.elem : t.strides[i - 1]);
        }
        uint64_t a = c.dst_addr + o;
        if (t.swizzle == CU_TENSOR_MAP_SWIZZLE_128B) a ^= ((a >> 7) & 7) << 4;
        if (inside) {
            declare_read(reinterpret_cast<const void*>(src), t.elem);
            std::memcpy(c.window + a, reinterpret_cast<const void*>(src), t.elem);
        } else {
            std::memset(c.window + a, 0, t.elem);
        }
        for (int i = 0; i < t.rank && ++idx[i] == t.box[i]; ++i) idx[i] = 0;
    }
}

inline void tma_load_2d(uint32_t dst, const CUtensorMap* map, int32_t c0, int32_t c1, uint32_t bar) {
    const int32_t c[2] = {c0, c1};
    tma_load(dst, map, c, 2, bar);
}

// ---- wgmma ----------------------------------------------------------------------------------------

// Row r's 32 bytes [k0, k0 + 32) of a K-major operand through its matrix descriptor.
// Returns the host address of the 128-byte swizzle row the bytes lie in.
inline const unsigned char* wgmma_operand_row(uint64_t desc, int r, int8_t (&out)[32], const char* who) {
    // reserved: bits 14-15, 30-31 and 52-61 (bits 46-48 too on sm_90, left unchecked: later targets use them)
    constexpr uint64_t RESERVED = (uint64_t(3) << 14) | (uint64_t(3) << 30) | (uint64_t(0x3FF) << 52);
    if (desc & RESERVED) fatal_at(who, "descriptor " + hex(desc) + " sets reserved bits");
    const uint32_t start = uint32_t(desc & 0x3FFF) << 4, sbo = uint32_t(desc >> 32 & 0x3FFF) << 4;
    const unsigned base_offset = unsigned(desc >> 49 & 7), mode = unsigned(desc >> 62);
    if (mode != 1) fatal_at(who, "descriptor swizzle mode " + std::to_string(mode) + " (the stand-in models the 128-byte swizzle, mode 1)");
    if (base_offset != 0 || (start & 0x380) != 0)
        fatal_at(who, "a descriptor whose start " + hex(start) + " is not in the first row of a 1,024-byte swizzle atom (base offset not modelled)");
    if ((start & 127) + 32 > 128) fatal_at(who, "a K step at " + hex(start) + " that crosses a 128-byte swizzle row");
    const uint32_t row = start + uint32_t(r >> 3) * sbo + uint32_t(r & 7) * 128;
    const unsigned char* p = shared_bytes(row & ~127u, 128, who) - (row & ~127u);
    TrafficIgnore traffic_ignore;  // (the stand-in computing the product: the operand reads are declared at the issue)
    for (uint32_t k = 0; k < 32; ++k) {
        const uint32_t a = row + k;
        out[k] = int8_t(p[a ^ ((a >> 7 & 7) << 4)]);
    }
    return p + (row & ~127u);
}

// The operand rows thread f's registers need, 32 bytes each: A rows 16w + l/4 and + 8, then B rows
// 8j + 2·(l%4) + c for j < N/8, c < 2. declare: also declares them read (race checking: at the issue).
inline std::vector<int8_t> wgmma_rows(const Fiber& f, const WgmmaOp& op, bool declare) {
    const char* who = "wgmma.mma_async";
    const int wq = f.warp % 4, gid = f.lane >> 2, tig = f.lane & 3;
    std::vector<int8_t> rows(size_t(2 + op.n / 4) * 32);
    auto row = [&](size_t i) -> int8_t(&)[32] { return *reinterpret_cast<int8_t(*)[32]>(rows.data() + 32 * i); };
    for (int h = 0; h < 2; ++h) {
        const unsigned char* p = wgmma_operand_row(op.a, 16 * wq + gid + 8 * h, row(size_t(h)), who);
        if (declare) declare_read(p, 128);
    }
    for (int j = 0; j < op.n / 8; ++j)
        for (int c = 0; c < 2; ++c) {
            const unsigned char* p = wgmma_operand_row(op.b, 8 * j + 2 * tig + c, row(size_t(2 + 2 * j + c)), who);
            if (declare) declare_read(p, 128);
        }
    return rows;
}

inline void wgmma_execute(Fiber& f, const WgmmaOp& op) {
    const char* who = "wgmma.mma_async";
    auto& flight = f.wg_inflight[op.d];
    const int regs = op.n / 2;
    if (!std::equal(op.d, op.d + regs, flight.first.begin()))
        fatal_at(who, "plain code changed the accumulators of a wgmma in flight (before the wgmma.wait_group that completes it)");
    if (wgmma_rows(f, op, false) != op.rows)  // (a GPU may read them at any time from the issue to the wait)
        fatal_at(who, "shared memory a wgmma in flight reads changed between its issue and its wait");
    const int8_t* a = op.rows.data();
    for (int j = 0; j < op.n / 8; ++j)
        for (int c = 0; c < 2; ++c) {
            const int8_t* b = a + 32 * (2 + 2 * j + c);
            for (int h = 0; h < 2; ++h) {
                uint32_t sum = 0;  // (int32 arithmetic wraps, as the tensor core's)
                for (int k = 0; k < 32; ++k) sum += uint32_t(int(a[32 * h + k]) * int(b[k]));
                int& d = op.d[4 * j + 2 * h + c];
                d = int(op.accumulate ? uint32_t(d) + sum : sum);
            }
        }
    std::copy(op.d, op.d + regs, flight.first.begin());
    if (--flight.second == 0) f.wg_inflight.erase(op.d);
}

inline void wgmma_fence() {
    warpgroup_collective("wgmma.fence");
    fiber().wg_fenced = true;
}

// wgmma.mma_async.sync.aligned.m64n{n}k32.s32.s8.s8 d, desc_a, desc_b, (accumulate ? 1 : 0)
inline void wgmma_s8(int* d, int n, uint64_t desc_a, uint64_t desc_b, bool accumulate) {
    const uint64_t operands[3] = {desc_a, desc_b, uint64_t(n) << 1 | uint64_t(accumulate)};
    warpgroup_collective("wgmma.mma_async", operands);
    if (!(n == 8 || n == 16 || n == 24 || (n % 16 == 0 && n >= 32 && n <= 256)))
        fatal_at("wgmma.mma_async", "N = " + std::to_string(n) + " (s8: 8, 16, 24, or a multiple of 16 from 32 to 256)");
    Fiber& f = fiber();
    if (!f.wg_fenced) fatal("wgmma.mma_async: a batch without a wgmma.fence before it");
    WgmmaOp op{d, n, desc_a, desc_b, accumulate, {}};
    op.rows = wgmma_rows(f, op, true);
    auto it = f.wg_inflight.find(d);
    if (it == f.wg_inflight.end())
        f.wg_inflight.emplace(d, std::make_pair(std::vector<int>(d, d + n / 2), 1));
    else if (it->second.first.size() != size_t(n / 2))
        fatal_at("wgmma.mma_async", "accumulators in flight with another N (" + std::to_string(2 * it->second.first.size()) +
                                        ", now " + std::to_string(n) + ")");
    else
        ++it->second.second;
    f.wg_open.push_back(std::move(op));
}

inline void wgmma_commit() {
    warpgroup_collective("wgmma.commit_group");
    Fiber& f = fiber();
    f.wg_groups.push_back(std::move(f.wg_open));
    f.wg_open.clear();
    f.wg_fenced = false;
}

// wgmma.wait_group N: the committed groups but the newest N are done (in order).
inline void wgmma_wait(size_t pending) {
    warpgroup_collective("wgmma.wait_group");
    Fiber& f = fiber();
    while (f.wg_groups.size() > pending) {
        for (const WgmmaOp& op : f.wg_groups.front()) wgmma_execute(f, op);
        f.wg_groups.pop_front();
    }
}

}  // namespace simt

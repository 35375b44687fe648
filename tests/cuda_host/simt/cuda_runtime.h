// A CPU stand-in for the CUDA runtime and device built-ins, so that the CUDA code of cuda/ runs in CI,
// which has no GPU. tests/simt_ops.py compiles the .cu files as C++ against this directory (force-
// included; extern __shared__ and <<<>>> rewritten), where each piece of inline PTX it models has a
// FLEXQUANT_SIMT branch calling mma.h here. tests/test_cuda_ops.py and tests/test_engine_cuda.py run
// their op tests on it (the `cuda_ops` fixture), and tests/test_simt_engine.py the whole CUDA engine
// (cuda/forward.cu) through a build of the package with this as its CUDA backend.
//
// The model of the hardware, and what it does not model:
//  - Every thread of a block is a fiber with its own stack; the blocks of a grid run one after the
//    other, on the host thread that launched them (streams are synchronous; a capture records). A
//    fiber runs until it waits: at __syncthreads (all live threads of the block), at a warp
//    collective (__shfl_*_sync, __syncwarp, __ballot_sync: all live lanes of its warp of 32). A thread
//    that has returned counts as arrived. A wait that can never end (a barrier some threads never
//    reach) stops the process with "simt: deadlock" instead of hanging.
//  - A kernel's __shared__ variables are carved from the block's static shared memory at their first
//    use (the builder rewrites each declaration to simt::static_shared), filled with 0xff bytes (NaN
//    as floats) before each block, as is the dynamic shared memory, so a read of shared memory the
//    block did not write shows. cudaMalloc and cudaMallocHost memory start as 0xff too.
//  - cp.async copies are done at the cp.async.wait_group that covers them, not when issued.
//  - Warp collectives check that every live lane is at the same one, and .aligned ones (mma,
//    ldmatrix) that all 32 lanes are there.
//  - Launch checks as the runtime makes them: 1..1024 threads, grid limits, dynamic shared memory
//    over 48 KB only after cudaFuncSetAttribute raised the kernel's limit (227 KB at most). The
//    dynamic shared memory starts at its declared alignment (16 by default), no more aligned than that.
//  - sm_90's asynchronous instructions of the wgmma GEMM (mbarrier, TMA through tensor maps, wgmma,
//    setmaxnreg): hopper.h, which says what it models.
//  - Races between the threads of a block: not by running the stand-in (the fibers interleave only
//    at waits), but by building it with -fsanitize=thread (tests/test_simt_racecheck.py; "race
//    detection" below says what orderings it declares): ThreadSanitizer then reports two accesses
//    that no CUDA ordering separates, whatever order the fibers ran in, as compute-sanitizer's
//    racecheck does on a GPU. Races between blocks are out of its reach (blocks run in order).
//  - Memory traffic: not by running the stand-in either, but by its traffic-measuring build
//    (SIMT_TRAFFIC, traffic.cpp: the compiler's hook at every access of the kernels): the sectors of
//    device memory each launch reads and writes, the coalescing of each warp request, the bank
//    conflicts of each shared-memory request (tests/test_simt_traffic.py, tools/kernel_traffic.py).
//  - Not modelled: the memory model's weaker orderings (fences are no-ops), the ulp-level
//    differences of the device math library (expf here is the host's), the PTX it has no branch for
//    (the sm_90 L2 prefetch), programmatic dependent launch (griddepcontrol is a no-op), timing
//    (events read 0 ms). This covers index arithmetic, bounds, masks, what each thread writes, and
//    the host code's launches, captures and bookkeeping.
//  - CUDA graphs: a capture records its stream's launches, copies and sets; a graph launch replays
//    them. A synchronization on the captured stream invalidates the capture, as the runtime does.
#pragma once

#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- the CUDA keywords --------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__
// __shared__ is not defined: the builder (tests/simt_ops.py) rewrites every declaration to
// simt::static_shared, the block's static shared memory, filled with 0xff bytes before each block
// (extern __shared__: its dynamic shared memory). (A static with a section of its own, filled by
// run_block, would not do: GCC ignores the section of a template's static.)

using std::isfinite;
using std::isinf;
using std::isnan;

// ---- vector types -------------------------------------------------------------------------------
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
#define SIMT_VEC2(T, N, A) \
    struct alignas(A) N { T x, y; }; \
    inline N make_##N(T x, T y) { return N{x, y}; }
#define SIMT_VEC4(T, N, A) \
    struct alignas(A) N { T x, y, z, w; }; \
    inline N make_##N(T x, T y, T z, T w) { return N{x, y, z, w}; }
SIMT_VEC2(float, float2, 8)
SIMT_VEC4(float, float4, 16)
SIMT_VEC2(int, int2, 8)
SIMT_VEC4(int, int4, 16)
SIMT_VEC2(unsigned, uint2, 8)
SIMT_VEC4(unsigned, uint4, 16)
SIMT_VEC2(double, double2, 16)
SIMT_VEC4(signed char, char4, 4)
SIMT_VEC4(unsigned char, uchar4, 4)
#undef SIMT_VEC2
#undef SIMT_VEC4

// ---- race detection (the build with -fsanitize=thread of tests/test_simt_racecheck.py) ------------
// ThreadSanitizer sees each fiber as a thread of its own (its fiber API: simt.cpp), the switches
// between fibers order nothing, and the stand-in declares the orderings CUDA gives, so a kernel's
// accesses to shared and global memory that no such ordering separates are reported as races (what
// compute-sanitizer's racecheck finds on a GPU): __syncthreads and __syncwarp (every arrival before
// every departure); an mbarrier arrival before the wait that sees its phase complete; a bulk copy's
// issue before its completion, and that before the waits on its barrier; the host before a block's
// threads and those before the host. Shuffles, ballots, mma and ldmatrix exchange registers but
// order no memory, so they declare nothing. Deferred copies run on their issuer's copy engine (a
// fiber of its own: as_copy_engine). The stand-in's own bookkeeping, which every fiber touches
// (barrier counts, the warps' exchange slots, pending copies), is left out of the detection (Internal).
// SIMT_RACE: the race-checking build. The traffic-measuring build (SIMT_TRAFFIC, traffic.cpp) also
// compiles the kernels with -fsanitize=thread, for the compiler's hook at every load and store, but
// links traffic.cpp's hooks instead of ThreadSanitizer.
#if defined(__SANITIZE_THREAD__) && !defined(SIMT_TRAFFIC)
#define SIMT_RACE 1
#else
#define SIMT_RACE 0
#endif
#if defined(__SANITIZE_THREAD__)
#define SIMT_NO_TSAN __attribute__((no_sanitize_thread))
#else
#define SIMT_NO_TSAN
#endif
#if SIMT_RACE
#include <sanitizer/tsan_interface.h>
extern "C" {
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
void __tsan_read_range(void* addr, unsigned long size);
void __tsan_write_range(void* addr, unsigned long size);
}
namespace simt {
struct Internal {  // within its scope, this fiber's reads and writes are not checked
    Internal() {
        AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
        AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
    }
    ~Internal() {
        AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
        AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
    }
    Internal(const Internal&) = delete;
    Internal& operator=(const Internal&) = delete;
};
// What this fiber did so far happens before what any fiber does after a later ordered_after(sync).
inline void ordered_before(const void* sync) { __tsan_release(const_cast<void*>(sync)); }
inline void ordered_after(const void* sync) { __tsan_acquire(const_cast<void*>(sync)); }
// Accesses the stand-in makes on a thread's behalf, declared as that thread's: an asynchronous copy
// or product (cp.async, TMA, wgmma) may read and write its operands at any time from its issue to
// its wait, so they are declared at the issue too (a kernel that reuses a buffer too early is
// reported); ldmatrix's rows are read by the lanes that give their addresses.
inline void declare_read(const void* p, size_t n) { __tsan_read_range(const_cast<void*>(p), n); }
inline void declare_write(void* p, size_t n) { __tsan_write_range(p, n); }

}  // namespace simt
#elif defined(SIMT_TRAFFIC)
// The traffic-measuring build (traffic.cpp): the stand-in's bookkeeping is not the kernel's traffic
// (Internal), and the accesses it makes on a thread's behalf (cp.async, bulk copies, TMA, ldmatrix)
// are counted as that thread's, where it declares them.
extern "C" {
void simt_traffic_ignore(int delta);
void simt_traffic_declare(const void* p, size_t n, int write);
void simt_traffic_launch(const void* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz);
void simt_traffic_launch_end();
void simt_traffic_block(int begin);
void simt_traffic_alloc(const void* p, size_t bytes, int host);
void simt_traffic_free(const void* p);
void simt_traffic_copy_engine(int begin, int tensor);
}
namespace simt {
struct Internal {
    Internal() { simt_traffic_ignore(1); }
    ~Internal() { simt_traffic_ignore(-1); }
    Internal(const Internal&) = delete;
    Internal& operator=(const Internal&) = delete;
};
inline void ordered_before(const void*) {}
inline void ordered_after(const void*) {}
inline void declare_read(const void* p, size_t n) { simt_traffic_declare(p, n, 0); }
inline void declare_write(void* p, size_t n) { simt_traffic_declare(p, n, 1); }
}  // namespace simt
#else
namespace simt {
struct Internal {
    Internal() {}  // (user-provided: no unused-variable warning)
};
inline void ordered_before(const void*) {}
inline void ordered_after(const void*) {}
inline void declare_read(const void*, size_t) {}
inline void declare_write(void*, size_t) {}
}  // namespace simt

#endif
#if defined(SIMT_TRAFFIC)
#define SIMT_TRAFFIC_HOOK(call) call
namespace simt {
// Accesses that the race checker must see but that are not the kernel's traffic: the mbarrier's word
// (its polls depend on the stand-in's scheduling), the stand-in reading wgmma operands to compute the
// product (declared once at the issue).
using TrafficIgnore = Internal;
}  // namespace simt
#else
#define SIMT_TRAFFIC_HOOK(call) ((void)0)
namespace simt {
struct TrafficIgnore {
    TrafficIgnore() {}  // (user-provided: no unused-variable warning)
};
}  // namespace simt
#endif

namespace simt {
// A copy the stand-in makes later than its issue (cp.async, bulk copies, TMA), as plain data (the copy
// engine reads it uninstrumented: it is the stand-in's bookkeeping). `issued`: an ordering object of
// its own that the issuing thread releases at the issue (race checking).
struct PendingCopy {
    unsigned char* dst = nullptr;        // plain: bytes from src to dst
    const unsigned char* src = nullptr;
    uint32_t bytes = 0;
    bool tensor = false;                 // TMA: the box at coords of the tensor map (hopper.h) into the
    uint32_t dst_addr = 0;               // shared address dst_addr of the window
    unsigned char* window = nullptr;
    int32_t coords[5] = {};
    unsigned char map[128] = {};
    int issuer = 0;
    std::shared_ptr<char> issued = std::make_shared<char>(0);
};
inline void perform_copy(const PendingCopy& c);  // hopper.h (SIMT_NO_TSAN: it declares its accesses)

// Does copy c as the copy engine of the thread that issued it (`engine`, a ThreadSanitizer fiber of its
// own): ordered after the copy's issue and before `landed`, and after nothing else, so the thread
// that happens to complete it inherits none of the issuer's work, and its own reads of the
// destination before its wait race with the copy. (The engine runs on the current thread's stack:
// nothing here is instrumented, perform_copy declares what it touches.)
SIMT_NO_TSAN inline void as_copy_engine(void* engine, const PendingCopy& c, const void* landed) {
#if SIMT_RACE
    void* const me = __tsan_get_current_fiber();
    __tsan_switch_to_fiber(engine, __tsan_switch_to_fiber_no_sync);
    __tsan_acquire(c.issued.get());
    perform_copy(c);
    __tsan_release(const_cast<void*>(landed));
    __tsan_switch_to_fiber(me, __tsan_switch_to_fiber_no_sync);
#else
    (void)engine, (void)landed;
    SIMT_TRAFFIC_HOOK(simt_traffic_copy_engine(1, c.tensor));
    perform_copy(c);
    SIMT_TRAFFIC_HOOK(simt_traffic_copy_engine(0, c.tensor));
#endif
}
}  // namespace simt

// ---- the fiber scheduler ------------------------------------------------------------------------
// The block's coordinates and the launch's shape: plain variables, as one block runs at a time.
inline thread_local dim3 blockIdx, blockDim, gridDim;

namespace simt {

[[noreturn]] inline void fatal(const std::string& what) {
    std::fprintf(stderr, "simt: %s\n", what.c_str());
    std::fflush(stderr);
    std::_Exit(3);  // no unwinding across fiber stacks
}

// wgmma.mma_async as issued (hopper.h): d (N/2 int32 per thread) (+)= A (64 x 32, desc a) · B (N x 32, desc b)ᵀ.
struct WgmmaOp {
    int* d;
    int n;
    uint64_t a, b;
    bool accumulate;
    std::vector<int8_t> rows;  // the operand rows this thread's registers need, as read at the issue
};

struct Fiber {
    void* sp = nullptr;
    dim3 tid;
    int lane = 0, warp = 0;
    bool done = false;
    void* tsan = nullptr;    // its ThreadSanitizer fiber (a -fsanitize=thread build)
    void* engine = nullptr;  // and that of its copy engine (as_copy_engine)
    // cp.async: the copies issued since the last commit, and the committed groups not yet waited for
    // (done in cp.async.wait_group, not before: a read of their destination before the wait shows)
    std::vector<PendingCopy> cp_open;
    std::deque<std::vector<PendingCopy>> cp_groups;
    char cp_landed = 0;  // race checking: the copies of a cp.async.wait_group, before the thread's next step
    // wgmma (hopper.h): the products issued since the last commit, the committed groups not yet
    // waited for (done in wgmma.wait_group, not before), and whether a wgmma.fence opened this batch
    std::vector<WgmmaOp> wg_open;
    std::deque<std::vector<WgmmaOp>> wg_groups;
    bool wg_fenced = false;
    // accumulators with wgmma in flight: their contents as the last of those left them (plain code
    // may not touch them until the wait that completes them), and how many are still in flight
    std::map<int*, std::pair<std::vector<int>, int>> wg_inflight;
};

// A warpgroup (4 warps, 128 threads): its .sync.aligned collectives (wgmma, setmaxnreg) and the
// registers per thread setmaxnreg gave it.
struct WarpGroup {
    int live = 0, arrived = 0;
    unsigned gen = 0;
    const char* at[128] = {};
    uint64_t operands[128][3] = {};  // each thread's operands of the instruction (all must agree)
    unsigned full_gen = 0;  // the last generation that opened with all 128 threads arrived
    int regs = 0;
};

// An mbarrier (hopper.h), kept by its shared-memory address: arrivals still expected in the current
// phase, the transaction bytes still expected, the phases completed, and the bulk copies that will
// complete on it (done when a thread next tests the barrier: a read of their destination before the
// wait shows).
struct MBarrier {
    uint32_t count = 0, pending = 0;
    int64_t tx = 0;
    uint32_t phase = 0;
    std::vector<PendingCopy> copies;
    char order[2] = {};  // race checking: the orderings of the phases, by parity
};

struct Warp {
    int live = 0, arrived = 0;
    unsigned gen = 0;
    char order[2] = {};  // race checking: __syncwarp's orderings, by the parity of gen
    const char* at[32] = {};  // the collective each lane waits at (all must be at the same one)
    uint64_t slot[32] = {};
    uint32_t frag[32][8] = {};  // the lanes' operand registers of a warp-wide mma (mma.h)
};

struct Block {
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    int live = 0, arrived = 0;
    unsigned gen = 0;
    // Race checking: __syncthreads' orderings, one per parity of gen, so that a thread that passes a
    // barrier late is not ordered after what the others did after it (another generation's arrivals)
    char order[2] = {};
    int cur = -1;
    void* sched_sp = nullptr;
    std::function<void()> body;
    // The static shared memory (static_shared): STATIC_SMEM bytes at static_base, 1,024-aligned; the
    // offsets given to the declarations so far (by their key) and the bytes they take
    std::vector<unsigned char> static_area;
    unsigned char* static_base = nullptr;
    std::map<std::pair<const char*, uint32_t>, std::pair<size_t, size_t>> static_offsets;  // -> offset, bytes
    size_t static_used = 0;
    std::vector<unsigned char> dyn_smem;  // + 2,048 bytes: the window's alignment and the declared one
    // The .shared window (hopper.h): shared address a is smem_window + a; the dynamic shared memory
    // (dyn_bytes) starts at shared address dyn_offset, its declared alignment (at least 16: what a GPU
    // guarantees, no more, so a kernel that needs more must align it itself)
    unsigned char* smem_window = nullptr;
    size_t dyn_bytes = 0, dyn_offset = 0;
    std::vector<WarpGroup> groups;
    int reg_pool = 0;                    // the block's pool of registers setmaxnreg.dec released (.inc takes from it)
    std::map<uint32_t, MBarrier> mbars;  // by shared address
    uint64_t progress = 0;               // arrivals, releases, ends: a pass without any is a deadlock
    void* tsan_host = nullptr;           // the scheduler's ThreadSanitizer fiber (its address: the launch's ordering)
};

inline thread_local Block* g_block = nullptr;  // the block running now (on this host thread)
SIMT_NO_TSAN inline Block* current_block() { return g_block; }  // (set by run_block only)
// Defined once, in simt.cpp.
void run_block(Block& b);  // runs b.body on every fiber of b until all have returned
void yield();              // back to the scheduler; resumes at the next pass

SIMT_NO_TSAN inline Fiber& fiber() {
    Block* b = current_block();
    if (b == nullptr || b->cur < 0) fatal("a device built-in was called outside a kernel");
    return b->fibers[size_t(b->cur)];
}

// Arrive at a barrier of `live` threads (arrived, gen: its state) and wait until all have arrived.
// Opens a barrier whose `live` threads have all arrived (a thread that returns lowers `live`, and
// may be the one that completes it); returns whether it opened.
inline bool open_if_complete(int& arrived, int live, unsigned& gen) {
    Internal internal;
    if (arrived == 0 || arrived != live) return false;
    arrived = 0;
    ++gen;
    return true;
}
inline void barrier(int& arrived, const int& live, unsigned& gen) {
    Internal internal;
    const unsigned mine = gen;
    ++current_block()->progress;
    ++arrived;
    if (open_if_complete(arrived, live, gen)) return;
    while (gen == mine) yield();
}
// Race checking: the ordering object of the current generation (or mbarrier phase) `gen`, one per
// parity, so that a thread that passes late is not ordered after another generation's arrivals.
inline const void* order_of(const char (&order)[2], const unsigned& gen) {
    Internal internal;  // (gen: the stand-in's state)
    return &order[gen & 1];
}
// __syncthreads: every live thread of the block.
inline void block_barrier() {
    Block& b = *current_block();
    const void* const order = order_of(b.order, b.gen);
    ordered_before(order);
    barrier(b.arrived, b.live, b.gen);
    ordered_after(order);
}
// A warp collective `what`: every live lane of the caller's warp, all at the same collective (lanes
// at different ones would exchange each other's values on a GPU, or hang).
inline void warp_barrier(const char* what = "__syncwarp") {
    Internal internal;
    Block& b = *current_block();
    const Fiber& f = fiber();
    Warp& w = b.warps[size_t(f.warp)];
    w.at[f.lane] = what;
    if (w.arrived + 1 == w.live)  // the last to arrive: the others wait, their collective recorded
        for (int l = 0; l < 32; ++l) {
            const size_t i = size_t(f.warp) * 32 + size_t(l);
            if (i < b.fibers.size() && !b.fibers[i].done && std::strcmp(w.at[l], what) != 0)
                fatal("warp " + std::to_string(f.warp) + ": lane " + std::to_string(f.lane) + " is at " + what +
                      " while lane " + std::to_string(l) + " is at " + w.at[l]);
        }
    barrier(w.arrived, w.live, w.gen);
}

template <class T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move up to 8 bytes");
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T>
inline T from_bits(uint64_t u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}

inline void check_mask(unsigned mask, const char* fn) {
    const int lane = fiber().lane;
    if (!(mask >> lane & 1u)) fatal(std::string(fn) + ": the calling lane " + std::to_string(lane) + " is not in the mask");
}

// Lane src's v, for every lane of the warp (src < 0: the caller's own value).
template <class T>
inline T exchange(unsigned mask, T v, int src, const char* fn) {
    Internal internal;
    check_mask(mask, fn);
    Block& b = *current_block();
    Fiber& f = fiber();
    Warp& w = b.warps[size_t(f.warp)];
    w.slot[f.lane] = to_bits(v);
    warp_barrier(fn);
    T r = v;
    if (src >= 0) {
        const size_t idx = size_t(f.warp) * 32 + size_t(src);
        if (!(mask >> src & 1u) || idx >= b.fibers.size() || b.fibers[idx].done)
            fatal(std::string(fn) + ": lane " + std::to_string(f.lane) + " reads lane " + std::to_string(src) +
                  ", which is not in the mask or has returned");
        r = from_bits<T>(w.slot[src]);
    }
    warp_barrier(fn);  // the slots are read before the next collective rewrites them
    return r;
}

constexpr size_t STATIC_SMEM = 48 * 1024;  // a kernel's static shared memory at most (CUDA's limit)

// __shared__ __align__(align) T name; (T: the array type, for an array) as the builder rewrites it:
// T& name = simt::static_shared<T>(__PRETTY_FUNCTION__, key, align). The function's name (one per
// template instantiation, which on a GPU has arrays of its own) and the declaration's key tell the
// variables apart. Every thread of the block gets the same bytes, carved from the block's static
// shared memory at the first use.
template <class T>
inline T& static_shared(const char* function, uint32_t key, size_t align) {
    Internal internal;
    Block& b = *current_block();
    auto it = b.static_offsets.find({function, key});
    if (it == b.static_offsets.end()) {
        align = std::max(std::max(align, alignof(T)), size_t(16));
        const size_t off = (b.static_used + align - 1) / align * align;
        if (off + sizeof(T) > STATIC_SMEM)
            fatal("__shared__ variables of " + std::to_string(off + sizeof(T)) + " bytes (at most 48 KB)");
        it = b.static_offsets.emplace(std::make_pair(function, key), std::make_pair(off, sizeof(T))).first;
        b.static_used = off + sizeof(T);
    } else if (it->second.second != sizeof(T)) {
        fatal(std::string("a __shared__ declaration of ") + function + " taken as " + std::to_string(sizeof(T)) +
              " and " + std::to_string(it->second.second) + " bytes");
    }
    return *reinterpret_cast<T*>(b.static_base + it->second.first);
}

// extern __shared__ __align__(align) T name[] (tests/simt_ops.py rewrites the declaration to this).
inline unsigned char* dynamic_smem(size_t align = 16) {
    Internal internal;
    Block* b = current_block();
    if (align < 16) align = 16;
    if (align > 1024 || (align & (align - 1))) fatal("extern __shared__ aligned to " + std::to_string(align) + " (the stand-in models up to 1,024)");
    if (b->dyn_offset != 0 && b->dyn_offset != align) fatal("two declarations of the dynamic shared memory with different alignments");
    b->dyn_offset = align;
    return b->smem_window + align;
}

}  // namespace simt

#define threadIdx (::simt::fiber().tid)
constexpr int warpSize = 32;

inline void __syncthreads() { simt::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    simt::check_mask(mask, "__syncwarp");
    if (mask != 0xffffffffu) simt::fatal("__syncwarp with a partial mask is not modelled (the stand-in syncs every live lane)");
    const simt::Warp& w = simt::current_block()->warps[size_t(simt::fiber().warp)];
    const void* const order = simt::order_of(w.order, w.gen);
    simt::ordered_before(order);
    simt::warp_barrier();
    simt::ordered_after(order);
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    const int lane = simt::fiber().lane;
    return simt::exchange(mask, v, (lane & ~(width - 1)) + (src & (width - 1)), "__shfl_sync");
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    const int lane = simt::fiber().lane, src = lane ^ lane_mask;
    // a source outside the caller's group of `width` lanes: the caller's own value (CUDA's rule)
    return simt::exchange(mask, v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : -1, "__shfl_xor_sync");
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = simt::fiber().lane, src = lane + int(delta);
    return simt::exchange(mask, v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : -1, "__shfl_down_sync");
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = simt::fiber().lane, src = lane - int(delta);
    return simt::exchange(mask, v, src >= (lane & ~(width - 1)) ? src : -1, "__shfl_up_sync");
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    simt::Internal internal;
    simt::check_mask(mask, "__ballot_sync");
    simt::Block& b = *simt::current_block();
    simt::Fiber& f = simt::fiber();
    simt::Warp& w = b.warps[size_t(f.warp)];
    w.slot[f.lane] = pred != 0;
    simt::warp_barrier("__ballot_sync");
    unsigned r = 0;
    for (int l = 0; l < 32; ++l)
        if ((mask >> l & 1u) && w.slot[l]) r |= 1u << l;
    simt::warp_barrier("__ballot_sync");
    return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }  // (every lane of mask takes part)

// ---- loads, stores, atomics (the fibers never interleave inside one; atomics as the compiler's
// relaxed atomics, which a race detector knows) ----------------------------------------------------
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
namespace simt {
template <class T, class F>  // *p = f(*p), atomically (through T's bits: floats, halves too); returns the old value
inline T atomic_update(T* p, F f) {
    using U = typename std::conditional<sizeof(T) == 2, uint16_t,
                                        typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type>::type;
    static_assert(sizeof(T) == sizeof(U), "atomics on 2, 4 or 8 bytes");
    auto* u = reinterpret_cast<U*>(p);
    U o = __atomic_load_n(u, __ATOMIC_RELAXED);
    for (;;) {
        T old, val;
        std::memcpy(&old, &o, sizeof(T));
        val = f(old);
        U n;
        std::memcpy(&n, &val, sizeof(T));
        if (__atomic_compare_exchange_n(u, &o, n, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return old;
    }
}
}  // namespace simt
template <class T> inline T atomicAdd(T* p, T v) { return simt::atomic_update(p, [v](T o) { return T(o + v); }); }
template <class T> inline T atomicMax(T* p, T v) { return simt::atomic_update(p, [v](T o) { return std::max(o, v); }); }
template <class T> inline T atomicMin(T* p, T v) { return simt::atomic_update(p, [v](T o) { return std::min(o, v); }); }
template <class T> inline T atomicExch(T* p, T v) { return simt::atomic_update(p, [v](T) { return v; }); }
template <class T> inline T atomicCAS(T* p, T cmp, T v) { return simt::atomic_update(p, [cmp, v](T o) { return o == cmp ? v : o; }); }
[[noreturn]] inline void __trap() { simt::fatal("__trap() in a kernel"); }
inline void __threadfence() {}
inline void __threadfence_block() {}

// ---- arithmetic intrinsics (IEEE round to nearest: this file is compiled with -ffp-contract=off) ----
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline float __saturatef(float a) { return a < 0.0f ? 0.0f : (a > 1.0f ? 1.0f : a); }
inline int __float2int_rn(float a) { return int(std::nearbyint(a)); }
inline float __int_as_float(int v) { return simt::from_bits<float>(uint32_t(v)); }
inline int __float_as_int(float v) { return int(uint32_t(simt::to_bits(v))); }
inline float __uint_as_float(unsigned v) { return simt::from_bits<float>(v); }
inline unsigned __float_as_uint(float v) { return unsigned(simt::to_bits(v)); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(unsigned(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline unsigned __vsub4(unsigned a, unsigned b) {  // per byte, modulo 256
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= (((a >> (8 * i)) - (b >> (8 * i))) & 0xffu) << (8 * i);
    return r;
}
inline unsigned __vadd4(unsigned a, unsigned b) {
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= (((a >> (8 * i)) + (b >> (8 * i))) & 0xffu) << (8 * i);
    return r;
}
inline unsigned __brev(unsigned v) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= (v >> i & 1u) << (31 - i);
    return r;
}
// CUDA's integer min / max overloads (mixed operand types: their common type).
template <class A, class B>
inline typename std::common_type<A, B>::type min(A a, B b) {
    using C = typename std::common_type<A, B>::type;
    return C(a) < C(b) ? C(a) : C(b);
}
template <class A, class B>
inline typename std::common_type<A, B>::type max(A a, B b) {
    using C = typename std::common_type<A, B>::type;
    return C(a) < C(b) ? C(b) : C(a);
}

// ---- the runtime API (synchronous: streams and events are tokens) ---------------------------------
enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInsufficientDriver = 35,
    cudaErrorNoDevice = 100,
    cudaErrorIllegalState = 401,
    cudaErrorNotSupported = 801,
    cudaErrorStreamCaptureUnsupported = 900,
    cudaErrorStreamCaptureInvalidated = 901,
};
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice, cudaMemcpyDefault };
struct CUstream_st {};
struct CUevent_st {};
using cudaStream_t = CUstream_st*;
using cudaEvent_t = CUevent_st*;
constexpr unsigned cudaStreamNonBlocking = 1;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaLaunchAttributeID { cudaLaunchAttributeProgrammaticStreamSerialization = 5 };
struct cudaLaunchAttributeValue {
    int programmaticStreamSerializationAllowed;
};
struct cudaLaunchAttribute {
    cudaLaunchAttributeID id;
    cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
    dim3 gridDim, blockDim;
    size_t dynamicSmemBytes;
    cudaStream_t stream;
    cudaLaunchAttribute* attrs;
    unsigned numAttrs;
};
enum cudaDeviceAttr {
    cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrComputeCapabilityMajor = 75,
    cudaDevAttrComputeCapabilityMinor = 76,
    cudaDevAttrL2CacheSize = 38,
};
// CUDA graphs: a capture records the stream's launches, copies and sets in order; a launch of the
// instantiated graph replays them (with the pointers and arguments of the capture, as on a GPU).
struct CUgraph_st {
    std::vector<std::function<void()>> ops;
};
struct CUgraphExec_st {
    std::vector<std::function<void()>> ops;
};
using cudaGraph_t = CUgraph_st*;
using cudaGraphExec_t = CUgraphExec_st*;
enum cudaStreamCaptureMode { cudaStreamCaptureModeGlobal, cudaStreamCaptureModeThreadLocal, cudaStreamCaptureModeRelaxed };
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone, cudaStreamCaptureStatusActive, cudaStreamCaptureStatusInvalidated };
struct cudaDeviceProp {
    char name[256];
    int major, minor, multiProcessorCount, l2CacheSize;
    size_t totalGlobalMem, sharedMemPerBlock, sharedMemPerBlockOptin;
};

namespace simt {
inline thread_local cudaError_t g_last_error = cudaSuccess;  // per host thread, as CUDA's
inline cudaError_t& last_error() { return g_last_error; }
inline cudaError_t fail(cudaError_t e) {
    last_error() = e;
    return e;
}
inline std::map<const void*, int> g_smem_limits;  // kernel -> raised dynamic shared memory limit
inline std::map<const void*, int>& smem_limits() { return g_smem_limits; }
constexpr size_t SMEM_DEFAULT = 48 * 1024, SMEM_MAX = 232448;  // an H100's limits
}  // namespace simt

inline const char* cudaGetErrorString(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument (simt)";
        case cudaErrorMemoryAllocation: return "out of memory (simt)";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument (simt)";
        case cudaErrorNotSupported: return "operation not supported (simt)";
        case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing (simt)";
        case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture (simt)";
        case cudaErrorIllegalState: return "the stream is not capturing (simt)";
        default: return "error (simt)";
    }
}
inline cudaError_t cudaGetLastError() {
    const cudaError_t e = simt::last_error();
    simt::last_error() = cudaSuccess;
    return e;
}
inline cudaError_t cudaPeekAtLastError() { return simt::last_error(); }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : simt::fail(cudaErrorInvalidValue); }
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
    if (d != 0) return simt::fail(cudaErrorInvalidValue);
    *p = cudaDeviceProp{};
    std::snprintf(p->name, sizeof p->name, "simt (CPU stand-in for an sm_90 GPU)");
    p->major = 9, p->minor = 0, p->multiProcessorCount = 132, p->l2CacheSize = 50 << 20;
    p->totalGlobalMem = size_t(80) << 30, p->sharedMemPerBlock = simt::SMEM_DEFAULT;
    p->sharedMemPerBlockOptin = simt::SMEM_MAX;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int d) {
    if (d != 0) return simt::fail(cudaErrorInvalidValue);
    switch (a) {
        case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = int(simt::SMEM_MAX); break;
        case cudaDevAttrMultiProcessorCount: *v = 132; break;
        case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
        case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
        case cudaDevAttrL2CacheSize: *v = 50 << 20; break;
        default: return simt::fail(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}
struct cudaFuncAttributes {
    int numRegs, maxThreadsPerBlock;
    size_t sharedSizeBytes;
    int ptxVersion, binaryVersion;
};
namespace simt {
// Registers per thread at launch, for every kernel: the stand-in allocates none, and reports what
// ptxas gives a __launch_bounds__(384, 1) kernel (65,536 / 384, down to a multiple of 8), the wgmma
// GEMM's: its host code checks that setmaxnreg can be satisfied, and hopper.h's setmaxnreg starts
// every warpgroup there.
constexpr int REGS_AT_LAUNCH = 168;
}  // namespace simt
template <class F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F*) {
    *a = cudaFuncAttributes{simt::REGS_AT_LAUNCH, 1024, 0, 90, 90};
    return cudaSuccess;
}
inline cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode*) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) { *ms = 0.0f; return cudaSuccess; }
namespace simt {
inline thread_local cudaStream_t g_capture_stream = nullptr;  // the stream being captured (one per thread here)
inline thread_local cudaGraph_t g_capture = nullptr;
inline thread_local bool g_capture_broken = false;  // a call that a capture forbids was made: EndCapture fails
inline bool capturing(cudaStream_t s) { return g_capture != nullptr && s == g_capture_stream; }
// Work on stream s: recorded while s is captured, else done now (streams are synchronous here).
template <class F>
inline cudaError_t enqueue(cudaStream_t s, F&& f) {
    if (capturing(s))
        g_capture->ops.emplace_back(std::forward<F>(f));
    else
        f();
    return cudaSuccess;
}
// A call that waits for the host (a synchronization) on a stream being captured: the capture is
// invalidated, as the runtime does.
inline cudaError_t forbid_in_capture(cudaStream_t s) {
    if (!capturing(s)) return cudaSuccess;
    g_capture_broken = true;
    return fail(cudaErrorStreamCaptureUnsupported);
}
}  // namespace simt
inline cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode) {
    if (s == nullptr || simt::g_capture != nullptr) return simt::fail(cudaErrorStreamCaptureUnsupported);
    simt::g_capture_stream = s;
    simt::g_capture = new CUgraph_st;
    simt::g_capture_broken = false;
    return cudaSuccess;
}
inline cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* g) {
    if (!simt::capturing(s)) return simt::fail(cudaErrorIllegalState);
    *g = simt::g_capture;
    simt::g_capture = nullptr;
    simt::g_capture_stream = nullptr;
    if (simt::g_capture_broken) {
        delete *g;
        *g = nullptr;
        return simt::fail(cudaErrorStreamCaptureInvalidated);
    }
    return cudaSuccess;
}
inline cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* st) {
    *st = simt::capturing(s) ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
    return cudaSuccess;
}
inline cudaError_t cudaGraphInstantiate(cudaGraphExec_t* e, cudaGraph_t g, unsigned long long = 0) {
    if (g == nullptr) return simt::fail(cudaErrorInvalidValue);
    *e = new CUgraphExec_st{g->ops};
    return cudaSuccess;
}
inline cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t s) {
    if (e == nullptr) return simt::fail(cudaErrorInvalidValue);
    return simt::enqueue(s, [ops = e->ops] {
        for (const auto& op : ops) op();
    });
}
inline cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) { delete e; return cudaSuccess; }
inline cudaError_t cudaGraphDestroy(cudaGraph_t g) { delete g; return cudaSuccess; }
inline cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total) {
    *total = size_t(80) << 30, *free_bytes = size_t(64) << 30;
    return cudaSuccess;
}
template <class T>
inline cudaError_t cudaMalloc(T** p, size_t bytes) {
    void* q = std::aligned_alloc(256, std::max<size_t>(256, (bytes + 255) / 256 * 256));
    if (q == nullptr) return simt::fail(cudaErrorMemoryAllocation);
    std::memset(q, 0xff, bytes);  // uninitialized device memory: NaN as floats
    SIMT_TRAFFIC_HOOK(simt_traffic_alloc(q, bytes, 0));
    *p = static_cast<T*>(q);
    return cudaSuccess;
}
inline cudaError_t cudaFree(void* p) {
    SIMT_TRAFFIC_HOOK(simt_traffic_free(p));
    std::free(p);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind) {
    if (n) std::memmove(dst, src, n);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t s = nullptr) {
    return simt::enqueue(s, [=] {
        if (n) std::memmove(dst, src, n);
    });
}
inline cudaError_t cudaMemset(void* p, int v, size_t n) { std::memset(p, v, n); return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t s = nullptr) {
    return simt::enqueue(s, [=] { std::memset(p, v, n); });
}
template <class T>
inline cudaError_t cudaMallocHost(T** p, size_t bytes) {
    *p = static_cast<T*>(std::aligned_alloc(256, std::max<size_t>(256, (bytes + 255) / 256 * 256)));
    if (*p == nullptr) return simt::fail(cudaErrorMemoryAllocation);
    std::memset(static_cast<void*>(*p), 0xff, bytes);  // uninitialized, as cudaMalloc's
    SIMT_TRAFFIC_HOOK(simt_traffic_alloc(*p, bytes, 1));
    return cudaSuccess;
}
inline cudaError_t cudaFreeHost(void* p) {
    SIMT_TRAFFIC_HOOK(simt_traffic_free(p));
    std::free(p);
    return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { *s = new CUstream_st; return cudaSuccess; }
inline cudaError_t cudaStreamDestroy(cudaStream_t s) { delete s; return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t s) { return simt::forbid_in_capture(s); }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaEventCreate(cudaEvent_t* e) { *e = new CUevent_st; return cudaSuccess; }
inline cudaError_t cudaEventDestroy(cudaEvent_t e) { delete e; return cudaSuccess; }
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t = nullptr) { return cudaSuccess; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return simt::forbid_in_capture(simt::g_capture_stream); }
inline cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned = 0) { return cudaSuccess; }
template <class F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || size_t(value) > simt::SMEM_MAX)
        return simt::fail(cudaErrorInvalidValue);
    simt::smem_limits()[reinterpret_cast<const void*>(kernel)] = value;
    return cudaSuccess;
}

// The kernel on every block of the grid, one block at a time, its arguments converted to the
// kernel's parameter types as a launch does. A bad configuration launches nothing and becomes the
// last error, as on a GPU.
template <class... Params, class... Args>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(Params...), Args&&... args) {
    const dim3 g = cfg->gridDim, t = cfg->blockDim;
    const uint64_t threads = uint64_t(t.x) * t.y * t.z;
    if (threads == 0 || threads > 1024 || t.z > 64 || g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 ||
        g.z > 65535 || g.x > 0x7fffffffu)
        return simt::fail(cudaErrorInvalidConfiguration);
    size_t limit = simt::SMEM_DEFAULT;
    const auto it = simt::smem_limits().find(reinterpret_cast<const void*>(kernel));
    if (it != simt::smem_limits().end()) limit = std::max(limit, size_t(it->second));
    if (cfg->dynamicSmemBytes > limit) return simt::fail(cudaErrorInvalidValue);
    std::tuple<typename std::decay<Params>::type...> params(std::forward<Args>(args)...);
    const size_t smem = cfg->dynamicSmemBytes;
    return simt::enqueue(cfg->stream, [kernel, params = std::move(params), g, t, smem] {
        simt::Block b;
        b.body = [&] { std::apply(kernel, params); };
        gridDim = g;
        blockDim = t;
        SIMT_TRAFFIC_HOOK(simt_traffic_launch(reinterpret_cast<const void*>(kernel), g.x, g.y, g.z, t.x, t.y, t.z));
        for (unsigned z = 0; z < g.z; ++z)
            for (unsigned y = 0; y < g.y; ++y)
                for (unsigned x = 0; x < g.x; ++x) {
                    blockIdx = dim3(x, y, z);
                    b.dyn_smem.assign(smem + 2048, 0xff);
                    const auto p = reinterpret_cast<uintptr_t>(b.dyn_smem.data());
                    b.smem_window = reinterpret_cast<unsigned char*>((p + 1023) & ~uintptr_t(1023));
                    b.dyn_bytes = smem;
                    b.dyn_offset = 0;
                    simt::run_block(b);
                }
        SIMT_TRAFFIC_HOOK(simt_traffic_launch_end());
    });
}

#include <initializer_list>

#include "fp16.h"
#include "mma.h"     // the warp-wide tensor-core instructions the kernels wrap
#include "hopper.h"  // sm_90's asynchronous ones: mbarrier, TMA, wgmma, setmaxnreg

// kernel<<<grid, block, smem, stream>>>(args...): tests/simt_ops.py rewrites it to
// simt_launch(kernel, grid, block, smem, stream)(args...), a launch like launch_kernel's.
template <class... Params>
struct SimtLaunch {
    void (*kernel)(Params...);
    cudaLaunchConfig_t cfg;
    template <class... Args>
    void operator()(Args&&... args) const {
        cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
    }
};
template <class... Params>
inline SimtLaunch<Params...> simt_launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem = 0,
                                         cudaStream_t stream = nullptr) {
    return SimtLaunch<Params...>{kernel, cudaLaunchConfig_t{grid, block, smem, stream, nullptr, 0}};
}

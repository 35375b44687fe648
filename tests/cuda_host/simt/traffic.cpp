// Memory traffic of the kernels on the CPU stand-in for CUDA: what each launch reads and writes, as a
// GPU's memory system would see it (tests/test_simt_traffic.py, tools/kernel_traffic.py).
//
// The traffic-measuring build (tests/simt_ops.py, traffic=True) compiles the kernels with
// -fsanitize=thread -DSIMT_TRAFFIC, so that the compiler calls a hook at every load and store, at
// every function entry and exit and at every atomic, and links this file instead of
// ThreadSanitizer's runtime: these are the hooks. (-fno-tree-sra and -fno-tree-vectorize keep each
// load of the source one access of its size: a uint4 load one 16-byte access, as on the GPU.)
//
// An access is a kernel's when a block runs, outside the stand-in's bookkeeping (Internal), and it is
// counted when it falls in device memory (a cudaMalloc or cudaMallocHost allocation: "global") or in
// the block's shared memory. The stand-in's declared accesses (cp.async and bulk copies at their
// issue, ldmatrix's rows, TMA's reads as its copy engine makes them) count as the issuing thread's.
//
// A warp's request: the accesses of one instruction by the lanes of a warp. Lanes run one after the
// other here, so the n-th execution of an access site (its code address and its call stack) by each
// lane of a warp is taken as one instruction, which is what a converged warp issues. (A limit: lanes
// that reach a site in different iterations of a loop, one lane skipping an iteration the others run,
// are grouped by count, not by iteration; and an access outside device and shared memory does not
// advance its site's count. The kernels measured here take their sites in step.)
//  - global: the 32-byte sectors a request touches (an L1 / L2 transaction each); a coalesced
//    request touches only sectors it uses in full.
//  - shared: the bank conflicts. A request of n bytes per lane is served in phases of 128 bytes (32
//    lanes of 4 bytes, 16 of 8, 8 of 16); a phase takes as many wavefronts as the most distinct
//    4-byte words any one of the 32 banks holds (the same word to several lanes is a broadcast).
//    Requests wider than 16 bytes per lane (bulk copies, TMA, wgmma's operands) are not lane
//    accesses and are counted as bytes only.
//  - the sectors of each allocation a launch read and wrote (the unique ones: a DRAM lower bound,
//    each sector fetched once, with the L2 serving repeats within the launch), up to the allocation's
//    end as cudaMalloc rounds it (256 bytes). A request counts towards the allocation of its first
//    lane; TMA copies towards the allocation they read.
//
// Output: one record per launch, appended to the file $SIMT_TRAFFIC_OUT (tests/simt_ops.py parses it):
//   launch <kernel, relative address> <grid x y z> <block x y z> <lanes grouped across a barrier>
//   alloc <id> <dev|host> <bytes> <sectors read> <sectors written> <requests> <bytes requested>
//         <sectors of the requests> R <ranges of sectors read: lo-hi ...> W <ranges written>
//   site <code address> <its two innermost call sites> <call stack hash> <g|s|c: global, shared,
//        TMA copies> <r|w> <requests> <bytes of the lanes> <distinct bytes, request by request (g, c)>
//        <sectors (g, c) or wavefronts (s)> <ideal wavefronts (s)>
//   end
// Code addresses are relative to the object they lie in (named on the first line, "object PATH"),
// for addr2line.
#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda_runtime.h"

namespace {

struct Alloc {
    uintptr_t lo = 0, hi = 0;  // [lo, hi): the allocation as cudaMalloc rounds it (256 bytes), which a kernel may read
    uint64_t size = 0;         // the bytes asked for
    int id = 0;
    bool host = false;
    std::vector<uint64_t> rd, wr;  // sectors touched by this launch (bitmaps; empty until touched)
    uint64_t requests = 0, req_bytes = 0, req_sectors = 0;
};
// The hooks run before this file's globals would be constructed (other files' static initializers
// are instrumented) and after they would be destroyed (their destructors too): the state with
// constructors is made at first use and never destroyed.
template <class T, int Tag>  // (Tag: one object per use, not per type)
T& leaked() {
    static T* const p = new T();
    return *p;
}
std::map<uintptr_t, Alloc>& allocs() { return leaked<std::map<uintptr_t, Alloc>, 1>(); }  // by first byte
std::mutex& allocs_lock() { return leaked<std::mutex, 2>(); }  // (an engine thread may allocate while another launches)
int g_next_alloc = 0;

struct FiberState {
    std::vector<std::pair<uint64_t, uintptr_t>> stack;  // open functions: the hash below each, its call site
    uint64_t hash = 0;                                  // of the call sites of the open functions
    int ignore = 0;               // open Internal scopes
    std::unordered_map<uint64_t, uint32_t> seen;  // access site -> executions so far
};
std::vector<FiberState>& fibers() { return leaked<std::vector<FiberState>, 3>(); }  // of the running block, by thread index
FiberState& host_state() {  // outside a block: per host thread
    thread_local FiberState* h = nullptr;
    if (h == nullptr) h = new FiberState;
    return *h;
}

struct Lane {
    uintptr_t a;
    uint32_t n;
    uint32_t lane;
};
struct Request {
    char space = 0;  // 'g' or 's'
    bool write = false;
    uint64_t gen = 0;  // the block's and the warp's barrier generations at the first lane
    Alloc* alloc = nullptr;
    uint64_t site = 0;
    std::vector<Lane> lanes;
};
struct KeyHash {
    size_t operator()(const std::pair<uint64_t, uint64_t>& k) const { return size_t(k.first * 0x9E3779B97F4A7C15ull ^ k.second); }
};
using Requests = std::unordered_map<std::pair<uint64_t, uint64_t>, Request, KeyHash>;
Requests& requests() { return leaked<Requests, 4>(); }  // by (site, warp + execution)

struct Site {
    uintptr_t pc = 0;
    uintptr_t callers[2] = {};  // the innermost call sites (relative), for a site in a helper not inlined
    uint64_t stack = 0;
    char space = 0;
    bool write = false;
    uint64_t requests = 0, bytes = 0, distinct = 0, units = 0, ideal = 0;
};
std::map<uint64_t, Site>& sites() { return leaked<std::map<uint64_t, Site>, 5>(); }  // of this launch, by site key

bool g_active = false;
uint64_t g_mixed = 0;           // lanes grouped into a request across a barrier (the grouping's self-check)
std::string& launch_line() { return leaked<std::string, 6>(); }  // the record's first line
int g_copy = -1;                // in the copy engine: -1 no, 0 a plain copy, 1 a TMA copy
std::vector<uint64_t>& copy_sectors() { return leaked<std::vector<uint64_t>, 7>(); }
Alloc* g_copy_alloc = nullptr;
uint64_t g_copy_bytes = 0;
uintptr_t g_base = 0;           // load address of the object this file is in
std::string& object_path() { return leaked<std::string, 8>(); }
bool g_object_written = false;

// The hooks use the standard library, whose templates the instrumented code instantiates too (the
// linker may keep an instrumented copy): a hook called from within a hook returns at once.
thread_local bool t_busy = false;
struct Busy {
    const bool was;
    Busy() : was(t_busy) { t_busy = true; }
    ~Busy() { t_busy = was; }
};

uint64_t mix(uint64_t h, uint64_t v) {
    h ^= v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
    return h * 0xFF51AFD7ED558CCDull;
}

bool g_base_found = false;
void find_base() {
    if (g_base_found) return;
    g_base_found = true;
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(&find_base), &info) && info.dli_fbase) {
        // addr2line takes offsets in a position-independent object, addresses in a fixed one
        const auto* elf = static_cast<const ElfW(Ehdr)*>(info.dli_fbase);
        g_base = elf->e_type == ET_EXEC ? 0 : reinterpret_cast<uintptr_t>(info.dli_fbase);
        object_path() = info.dli_fname ? info.dli_fname : "";
    }
}
uintptr_t rel(uintptr_t pc) { return pc - g_base; }

FiberState& state() {
    simt::Block* b = simt::current_block();
    if (b == nullptr || b->cur < 0 || size_t(b->cur) >= fibers().size()) return host_state();
    return fibers()[size_t(b->cur)];
}

Alloc* find_alloc(uintptr_t a) {
    const std::lock_guard<std::mutex> lock(allocs_lock());  // (the Alloc stays: it is freed on the launching thread)
    auto it = allocs().upper_bound(a);
    if (it == allocs().begin()) return nullptr;
    --it;
    return a < it->second.hi ? &it->second : nullptr;
}

bool in_shared(uintptr_t a) {
    const simt::Block* b = simt::current_block();
    const auto st = reinterpret_cast<uintptr_t>(b->static_base);
    if (st != 0 && a >= st && a < st + simt::STATIC_SMEM) return true;
    const auto d = reinterpret_cast<uintptr_t>(b->dyn_smem.data());
    return a >= d && a < d + b->dyn_smem.size();
}

void mark(Alloc& al, uintptr_t a, size_t n, bool write) {
    std::vector<uint64_t>& bits = write ? al.wr : al.rd;
    if (bits.empty()) bits.assign(((al.hi - al.lo + 31) / 32 + 63) / 64, 0);
    const uintptr_t end = std::min<uintptr_t>(a + n, al.hi);
    for (uintptr_t s = (a - al.lo) / 32; s <= (end - 1 - al.lo) / 32; ++s) bits[s / 64] |= uint64_t(1) << (s % 64);
}

// rmw: an atomic read-modify-write (one request, its sectors read and written)
void access(uintptr_t a, size_t n, bool write, uintptr_t pc, bool declared, bool rmw = false) {
    if (!g_active || n == 0 || t_busy) return;
    const Busy busy;
    simt::Block* b = simt::current_block();
    if (b == nullptr || b->cur < 0) return;
    FiberState& f = state();
    if (f.ignore > 0 && !declared) return;
    if (g_copy >= 0) {  // the copy engine: TMA's reads, one request per copy (plain copies: counted at the issue)
        Alloc* al = g_copy == 1 && !write ? find_alloc(a) : nullptr;
        if (al == nullptr) return;
        mark(*al, a, n, false);
        g_copy_alloc = al;
        g_copy_bytes += n;
        for (uintptr_t s = a / 32; s <= (a + n - 1) / 32; ++s) copy_sectors().push_back(s);
        return;
    }
    Alloc* al = find_alloc(a);
    const char space = al != nullptr ? 'g' : (in_shared(a) ? 's' : 0);
    if (space == 0) return;  // a register (the fiber's stack) or the stand-in's own state
    if (al != nullptr) mark(*al, a, n, write);
    if (al != nullptr && rmw) mark(*al, a, n, false);
    const uint64_t site = mix(mix(f.hash, pc), uint64_t(write) << 1 | uint64_t(space == 's'));
    const uint32_t nth = f.seen[site]++;
    const simt::Fiber& fb = b->fibers[size_t(b->cur)];
    Request& r = requests()[{site, uint64_t(fb.warp) << 32 | nth}];
    const uint64_t gen = uint64_t(b->gen) << 32 | b->warps[size_t(fb.warp)].gen;
    if (r.lanes.empty()) {
        r.space = space, r.write = write, r.alloc = al, r.site = site, r.gen = gen;
        Site& s = sites()[site];
        s.pc = rel(pc), s.stack = f.hash, s.space = space, s.write = write;
        for (size_t i = 0; i < 2 && i < f.stack.size(); ++i) s.callers[i] = rel(f.stack[f.stack.size() - 1 - i].second);
    }
    if (r.gen != gen) ++g_mixed;  // a lane at the site's n-th execution after a barrier the first was before
    r.lanes.push_back(Lane{a, uint32_t(n), uint32_t(fb.lane)});
}

void finish_request(const Request& r) {
    Site& s = sites()[r.site];
    ++s.requests;
    uint32_t widest = 0;
    for (const Lane& l : r.lanes) s.bytes += l.n, widest = std::max(widest, l.n);
    if (r.space == 'g') {
        std::vector<uintptr_t> sectors;
        std::vector<std::pair<uintptr_t, uintptr_t>> spans;  // the lanes' byte ranges, for the distinct bytes
        for (const Lane& l : r.lanes) {
            for (uintptr_t x = l.a / 32; x <= (l.a + l.n - 1) / 32; ++x) sectors.push_back(x);
            spans.emplace_back(l.a, l.a + l.n);
        }
        std::sort(sectors.begin(), sectors.end());
        const uint64_t count = uint64_t(std::unique(sectors.begin(), sectors.end()) - sectors.begin());
        std::sort(spans.begin(), spans.end());
        uint64_t distinct = 0;
        uintptr_t reach = 0;
        for (const auto& sp : spans) {
            const uintptr_t from = std::max(sp.first, reach);
            if (sp.second > from) distinct += sp.second - from;
            reach = std::max(reach, sp.second);
        }
        s.units += count;
        s.distinct += distinct;
        Alloc& al = *r.alloc;
        ++al.requests;
        al.req_bytes += distinct;
        al.req_sectors += count;
        return;
    }
    if (widest > 16) return;  // not a lane access (bulk copy, TMA, wgmma operand): bytes only
    const uint32_t per_phase = widest <= 4 ? 32 : 128 / widest;
    std::map<uint32_t, std::map<uint32_t, std::vector<uintptr_t>>> phases;  // phase -> bank -> words
    for (const Lane& l : r.lanes)
        for (uintptr_t w = l.a / 4; w <= (l.a + l.n - 1) / 4; ++w) phases[l.lane / per_phase][uint32_t(w % 32)].push_back(w);
    for (auto& ph : phases) {
        size_t worst = 1;
        for (auto& bank : ph.second) {
            std::vector<uintptr_t>& words = bank.second;
            std::sort(words.begin(), words.end());
            worst = std::max(worst, size_t(std::unique(words.begin(), words.end()) - words.begin()));
        }
        s.units += worst;
        s.ideal += 1;
    }
}

void ranges(FILE* out, const std::vector<uint64_t>& bits, uint64_t sectors) {
    uint64_t s = 0;
    while (s < sectors) {
        if (bits.empty() || !(bits[s / 64] >> (s % 64) & 1)) {
            ++s;
            continue;
        }
        const uint64_t lo = s;
        while (s < sectors && (bits[s / 64] >> (s % 64) & 1)) ++s;
        std::fprintf(out, " %llu-%llu", static_cast<unsigned long long>(lo), static_cast<unsigned long long>(s));
    }
}
uint64_t popcount(const std::vector<uint64_t>& bits) {
    uint64_t c = 0;
    for (uint64_t w : bits) c += uint64_t(__builtin_popcountll(w));
    return c;
}

void write_record() {
    const char* path = std::getenv("SIMT_TRAFFIC_OUT");
    FILE* out = path ? std::fopen(path, "a") : nullptr;
    if (out == nullptr) return;
    if (!g_object_written) {
        std::fprintf(out, "object %s\n", object_path().c_str());
        g_object_written = true;
    }
    std::fprintf(out, "%s %llu\n", launch_line().c_str(), static_cast<unsigned long long>(g_mixed));
    const std::lock_guard<std::mutex> lock(allocs_lock());
    for (auto& kv : allocs()) {
        Alloc& al = kv.second;
        if (al.rd.empty() && al.wr.empty() && al.requests == 0) continue;
        const uint64_t sectors = (al.hi - al.lo + 31) / 32;
        std::fprintf(out, "alloc %d %s %llu %llu %llu %llu %llu %llu R", al.id, al.host ? "host" : "dev",
                     static_cast<unsigned long long>(al.size), static_cast<unsigned long long>(popcount(al.rd)),
                     static_cast<unsigned long long>(popcount(al.wr)), static_cast<unsigned long long>(al.requests),
                     static_cast<unsigned long long>(al.req_bytes), static_cast<unsigned long long>(al.req_sectors));
        ranges(out, al.rd, sectors);
        std::fprintf(out, " W");
        ranges(out, al.wr, sectors);
        std::fprintf(out, "\n");
        al.rd.clear(), al.wr.clear();
        al.requests = al.req_bytes = al.req_sectors = 0;
    }
    for (const auto& kv : sites()) {
        const Site& s = kv.second;
        std::fprintf(out, "site %llx %llx %llx %llx %c %c %llu %llu %llu %llu %llu\n", static_cast<unsigned long long>(s.pc),
                     static_cast<unsigned long long>(s.callers[0]), static_cast<unsigned long long>(s.callers[1]),
                     static_cast<unsigned long long>(s.stack), s.space, s.write ? 'w' : 'r',
                     static_cast<unsigned long long>(s.requests), static_cast<unsigned long long>(s.bytes),
                     static_cast<unsigned long long>(s.distinct), static_cast<unsigned long long>(s.units),
                     static_cast<unsigned long long>(s.ideal));
    }
    std::fprintf(out, "end\n");
    std::fclose(out);
}

}  // namespace

extern "C" {

// ---- the stand-in's hooks (cuda_runtime.h, simt.cpp) -------------------------------------------
void simt_traffic_ignore(int delta) {
    const Busy busy;  // (called by the stand-in, never from within a hook)
    state().ignore += delta;
}
void simt_traffic_declare(const void* p, size_t n, int write) {
    access(reinterpret_cast<uintptr_t>(p), n, write != 0, reinterpret_cast<uintptr_t>(__builtin_return_address(0)), true);
}
void simt_traffic_launch(const void* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz) {
    const Busy busy;
    find_base();
    char line[256];
    std::snprintf(line, sizeof line, "launch %llx %u %u %u %u %u %u",
                  static_cast<unsigned long long>(rel(reinterpret_cast<uintptr_t>(kernel))), gx, gy, gz, bx, by, bz);
    launch_line() = line;
    sites().clear();
    g_mixed = 0;
    g_active = true;
}
void simt_traffic_launch_end() {
    const Busy busy;
    g_active = false;
    write_record();
}
void simt_traffic_block(int begin) {
    const Busy busy;
    if (begin) {
        fibers().assign(simt::current_block()->fibers.size(), FiberState{});
        requests().clear();
        return;
    }
    for (const auto& kv : requests()) finish_request(kv.second);
    requests().clear();
    fibers().clear();
}
void simt_traffic_alloc(const void* p, size_t bytes, int host) {
    const Busy busy;
    const auto lo = reinterpret_cast<uintptr_t>(p);
    const std::lock_guard<std::mutex> lock(allocs_lock());
    Alloc& al = allocs()[lo];
    al = Alloc{};
    al.lo = lo, al.hi = lo + std::max<size_t>(256, (bytes + 255) / 256 * 256), al.size = bytes;
    al.id = g_next_alloc++, al.host = host != 0;
}
void simt_traffic_free(const void* p) {
    const Busy busy;
    const std::lock_guard<std::mutex> lock(allocs_lock());
    allocs().erase(reinterpret_cast<uintptr_t>(p));
}
void simt_traffic_copy_engine(int begin, int tensor) {
    const Busy busy;
    if (begin) {
        g_copy = tensor ? 1 : 0;
        copy_sectors().clear(), g_copy_alloc = nullptr, g_copy_bytes = 0;
        return;
    }
    if (g_copy == 1 && g_copy_alloc != nullptr && g_active) {
        std::sort(copy_sectors().begin(), copy_sectors().end());
        const uint64_t count = uint64_t(std::unique(copy_sectors().begin(), copy_sectors().end()) - copy_sectors().begin());
        Site& s = sites()[0];  // one site for every TMA copy of the launch
        s.space = 'c';
        ++s.requests, s.bytes += g_copy_bytes, s.distinct += g_copy_bytes, s.units += count;
        ++g_copy_alloc->requests, g_copy_alloc->req_bytes += g_copy_bytes, g_copy_alloc->req_sectors += count;
    }
    g_copy = -1;
}

// A line of the caller's between the launches' records ("mark TEXT"): e.g. where a decode step starts.
void simt_traffic_mark(const char* text) {
    const Busy busy;
    const char* path = std::getenv("SIMT_TRAFFIC_OUT");
    FILE* out = path ? std::fopen(path, "a") : nullptr;
    if (out == nullptr) return;
    std::fprintf(out, "mark %s\n", text);
    std::fclose(out);
}

// ---- the compiler's hooks (-fsanitize=thread) ----------------------------------------------------
void __tsan_init() {}
void __tsan_func_entry(void* call_site) {
    if (t_busy) return;
    const Busy busy;
    FiberState& f = state();
    f.stack.emplace_back(f.hash, reinterpret_cast<uintptr_t>(call_site));
    f.hash = mix(f.hash, reinterpret_cast<uintptr_t>(call_site));
}
void __tsan_func_exit() {
    if (t_busy) return;
    const Busy busy;
    FiberState& f = state();
    if (!f.stack.empty()) {
        f.hash = f.stack.back().first;
        f.stack.pop_back();
    }
}
#define SIMT_ACCESS(N)                                                                                                       \
    void __tsan_read##N(void* p) { access(reinterpret_cast<uintptr_t>(p), N, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)), false); } \
    void __tsan_write##N(void* p) { access(reinterpret_cast<uintptr_t>(p), N, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)), false); } \
    void __tsan_unaligned_read##N(void* p) { access(reinterpret_cast<uintptr_t>(p), N, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)), false); } \
    void __tsan_unaligned_write##N(void* p) { access(reinterpret_cast<uintptr_t>(p), N, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)), false); }
SIMT_ACCESS(1)
SIMT_ACCESS(2)
SIMT_ACCESS(4)
SIMT_ACCESS(8)
SIMT_ACCESS(16)
#undef SIMT_ACCESS
void __tsan_read_range(void* p, unsigned long n) {
    access(reinterpret_cast<uintptr_t>(p), n, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)), false);
}
void __tsan_write_range(void* p, unsigned long n) {
    access(reinterpret_cast<uintptr_t>(p), n, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)), false);
}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}

// Atomics: done, and counted as one access (a read-modify-write: its sectors read and written).
#define SIMT_ATOMICS(BITS, T)                                                                                                 \
    T __tsan_atomic##BITS##_load(const volatile T* p, int) {                                                                 \
        access(reinterpret_cast<uintptr_t>(p), sizeof(T), false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)), false); \
        return __atomic_load_n(p, __ATOMIC_SEQ_CST);                                                                         \
    }                                                                                                                        \
    void __tsan_atomic##BITS##_store(volatile T* p, T v, int) {                                                              \
        access(reinterpret_cast<uintptr_t>(p), sizeof(T), true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)), false); \
        __atomic_store_n(p, v, __ATOMIC_SEQ_CST);                                                                            \
    }                                                                                                                        \
    int __tsan_atomic##BITS##_compare_exchange_strong(volatile T* p, T* expected, T v, int, int) {                           \
        access(reinterpret_cast<uintptr_t>(p), sizeof(T), true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)), false, true); \
        return __atomic_compare_exchange_n(p, expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                       \
    }                                                                                                                        \
    int __tsan_atomic##BITS##_compare_exchange_weak(volatile T* p, T* expected, T v, int, int) {                             \
        access(reinterpret_cast<uintptr_t>(p), sizeof(T), true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)), false, true); \
        return __atomic_compare_exchange_n(p, expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                       \
    }                                                                                                                        \
    T __tsan_atomic##BITS##_fetch_add(volatile T* p, T v, int) {                                                             \
        access(reinterpret_cast<uintptr_t>(p), sizeof(T), true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)), false, true); \
        return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);                                                                   \
    }                                                                                                                        \
    T __tsan_atomic##BITS##_fetch_or(volatile T* p, T v, int) {                                                              \
        access(reinterpret_cast<uintptr_t>(p), sizeof(T), true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)), false, true); \
        return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);                                                                    \
    }                                                                                                                        \
    T __tsan_atomic##BITS##_exchange(volatile T* p, T v, int) {                                                              \
        access(reinterpret_cast<uintptr_t>(p), sizeof(T), true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)), false, true); \
        return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);                                                                  \
    }
SIMT_ATOMICS(8, uint8_t)
SIMT_ATOMICS(16, uint16_t)
SIMT_ATOMICS(32, uint32_t)
SIMT_ATOMICS(64, uint64_t)
#undef SIMT_ATOMICS

}  // extern "C"

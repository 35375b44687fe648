// The fiber scheduler of the CPU stand-in for CUDA (cuda_runtime.h here): a block's threads as
// fibers, switched at their waits. x86-64 switches with a few instructions of its own (ucontext's
// swapcontext makes a system call per switch, and a warp shuffle switches 64 times); other
// machines use ucontext.
#include <cstdlib>
#include <memory>

#include "cuda_runtime.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace simt {
namespace {

constexpr size_t STACK = 128 * 1024;  // per fiber: the kernels' locals are registers on a GPU
thread_local std::vector<std::unique_ptr<char[]>> g_stacks;  // reused by every launch of the thread
#if SIMT_RACE
// ThreadSanitizer fibers for thread i of a block and for its copy engine, reused by every block (a
// block's threads are ordered after the previous block's anyway, and creating them costs).
thread_local std::vector<void*> g_tsan_threads, g_tsan_engines;
#endif

#if defined(__x86_64__)
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the
// stack pointer in *save, switches to `load` (a stack saved the same way) and restores from it.
extern "C" void simt_switch(void** save, void* load);
asm(R"(
    .text
    .p2align 4
    .globl simt_switch
    .type simt_switch, @function
simt_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size simt_switch, .-simt_switch
)");
#else
thread_local std::vector<ucontext_t> g_ctx;  // fiber i at i, the scheduler last
#endif

// (not instrumented: it never returns, and a frame per block would pile up on a reused fiber's
// ThreadSanitizer stack; the kernel it calls is)
[[noreturn]] SIMT_NO_TSAN void fiber_main() {
    Block& b = *current_block();
    ordered_after(&b.tsan_host);  // the host's work before the launch (run_block)
    b.body();
    Fiber& f = fiber();
    // A returned thread's work is ordered before the barriers its block and warp open from now on.
    const Warp& fw = b.warps[size_t(f.warp)];
    ordered_before(order_of(b.order, b.gen));
    ordered_before(order_of(fw.order, fw.gen));
    {
        Internal internal;
        if (!f.wg_open.empty() || !f.wg_groups.empty())
            fatal("thread " + std::to_string(b.cur) + " returned with wgmma issued but not waited for (wgmma.wait_group)");
        f.done = true;
        ++b.progress;
        // A returned thread counts as arrived at every barrier its block or warp waits on.
        --b.live;
        open_if_complete(b.arrived, b.live, b.gen);
        Warp& w = b.warps[size_t(f.warp)];
        --w.live;
        open_if_complete(w.arrived, w.live, w.gen);
        WarpGroup& g = b.groups[size_t(f.warp / 4)];
        --g.live;
        open_if_complete(g.arrived, g.live, g.gen);
    }
    yield();
    fatal("a returned fiber was resumed");
}

#if defined(__x86_64__)
// A fresh stack whose first switch "returns" into fiber_main, 16-byte aligned as after a call.
void* fresh_stack(char* base) {
    auto top = (reinterpret_cast<uintptr_t>(base) + STACK) & ~uintptr_t(15);
    auto* sp = reinterpret_cast<uint64_t*>(top - 8);  // fiber_main's (never used) return address slot
    *sp = 0;
    *--sp = reinterpret_cast<uint64_t>(&fiber_main);
    for (int r = 0; r < 6; ++r) *--sp = 0;  // rbp, rbx, r12 .. r15
    *--sp = 0;
    const uint32_t mxcsr = 0x1F80;   // round to nearest, exceptions masked
    const uint16_t fcw = 0x037F;
    std::memcpy(reinterpret_cast<char*>(sp), &mxcsr, 4);
    std::memcpy(reinterpret_cast<char*>(sp) + 4, &fcw, 2);
    return sp;
}
#endif

}  // namespace

SIMT_NO_TSAN void yield() {
    Block& b = *current_block();
#if SIMT_RACE
    // a returned thread's switch orders its work before the host's; a waiting thread's, nothing
    const unsigned flags = b.fibers[size_t(b.cur)].done ? 0 : __tsan_switch_to_fiber_no_sync;
    __tsan_switch_to_fiber(b.tsan_host, flags);
#endif
#if defined(__x86_64__)
    simt_switch(&b.fibers[size_t(b.cur)].sp, b.sched_sp);
#else
    swapcontext(&g_ctx[size_t(b.cur)], &g_ctx.back());
#endif
}

void run_block(Block& b) {
    const dim3 t = blockDim;
    const size_t n = size_t(t.x) * t.y * t.z;
    while (g_stacks.size() < n) g_stacks.emplace_back(new char[STACK]);
    b.fibers.assign(n, Fiber{});
    b.warps.assign((n + 31) / 32, Warp{});
    b.groups.assign((n + 127) / 128, WarpGroup{});
    for (WarpGroup& g : b.groups) g.regs = REGS_AT_LAUNCH;
    b.reg_pool = 0;  // (PTX ISA: a pool per CTA, of what setmaxnreg.dec released)
    b.mbars.clear();
    for (size_t i = 0; i < n; ++i) {
        Fiber& f = b.fibers[i];
        f.tid = dim3(unsigned(i % t.x), unsigned(i / t.x % t.y), unsigned(i / (size_t(t.x) * t.y)));
        f.lane = int(i % 32);
        f.warp = int(i / 32);
        ++b.warps[i / 32].live;
        ++b.groups[i / 128].live;
#if defined(__x86_64__)
        f.sp = fresh_stack(g_stacks[i].get());
#endif
    }
#if !defined(__x86_64__)
    g_ctx.assign(n + 1, ucontext_t{});
    for (size_t i = 0; i < n; ++i) {
        getcontext(&g_ctx[i]);
        g_ctx[i].uc_stack.ss_sp = g_stacks[i].get();
        g_ctx[i].uc_stack.ss_size = STACK;
        g_ctx[i].uc_link = nullptr;
        makecontext(&g_ctx[i], reinterpret_cast<void (*)()>(&fiber_main), 0);
    }
#endif
    // shared memory is not initialized on a GPU: a block that reads what it did not write reads NaN
    if (b.static_area.empty()) {
        b.static_area.assign(STATIC_SMEM + 1024, 0xff);
        const auto p = reinterpret_cast<uintptr_t>(b.static_area.data());
        b.static_base = reinterpret_cast<unsigned char*>((p + 1023) & ~uintptr_t(1023));
    } else {
        std::memset(b.static_base, 0xff, b.static_used);  // (what the previous block used)
    }
    b.static_offsets.clear();
    b.static_used = 0;
#if SIMT_RACE
    b.tsan_host = __tsan_get_current_fiber();
    while (g_tsan_threads.size() < n) {
        g_tsan_threads.push_back(__tsan_create_fiber(0));
        g_tsan_engines.push_back(__tsan_create_fiber(0));
    }
    for (size_t i = 0; i < n; ++i) b.fibers[i].tsan = g_tsan_threads[i], b.fibers[i].engine = g_tsan_engines[i];
#endif
    b.live = int(n);
    b.arrived = 0;
    b.gen = 0;
    b.progress = 0;
    g_block = &b;
    SIMT_TRAFFIC_HOOK(simt_traffic_block(1));
    ordered_before(&b.tsan_host);  // (the last of the host's work before the threads start)
    while (b.live > 0) {
        const uint64_t before = b.progress;
        for (size_t i = 0; i < n; ++i) {
            if (b.fibers[i].done) continue;
            b.cur = int(i);
#if defined(__x86_64__)
            void* const sp = b.fibers[i].sp;  // (read before the fiber switch below)
#endif
#if SIMT_RACE
            // (no ordering: a sync here would also pass on what the block's returned threads did;
            // fiber_main orders the host's work before the launch. After this call ThreadSanitizer
            // counts what runs as the fiber's: no instrumented access until the switch)
            __tsan_switch_to_fiber(b.fibers[i].tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(__x86_64__)
            simt_switch(&b.sched_sp, sp);
#else
            swapcontext(&g_ctx.back(), &g_ctx[i]);
#endif
        }
        // A pass in which no thread arrived anywhere, no barrier opened and no thread returned: every
        // live thread waits for one that never comes.
        if (b.live > 0 && b.progress == before) {
            std::string who;
            for (size_t i = 0; i < n && who.size() < 200; ++i)
                if (!b.fibers[i].done) who += " " + std::to_string(i);
            fatal("deadlock in block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ", " +
                  std::to_string(blockIdx.z) + "): " + std::to_string(b.live) + " threads wait forever (block " +
                  std::to_string(b.arrived) + " arrived; threads:" + who + ")");
        }
    }
    for (const auto& m : b.mbars)
        if (!m.second.copies.empty())
            fatal("block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ", " + std::to_string(blockIdx.z) +
                  ") ended with bulk copies in flight on the mbarrier at shared address " + hex(m.first));
    b.cur = -1;
    SIMT_TRAFFIC_HOOK(simt_traffic_block(0));
    g_block = nullptr;
}

}  // namespace simt

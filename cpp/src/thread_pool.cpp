#include "thread_pool.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FQ_CPU_RELAX() _mm_pause()
#else
#define FQ_CPU_RELAX() ((void)0)
#endif

namespace flexquant {

namespace {
// How long an idle worker spins before it sleeps on the condition variable. Long enough to bridge
// the gap between two linears of one token, short enough not to burn a core between tokens.
constexpr auto kSpin = std::chrono::microseconds(200);

thread_local bool t_inside_pool = false;
}  // namespace

ThreadPool::ThreadPool(int n_threads) {
    start(n_threads);
}

ThreadPool::~ThreadPool() {
    stop();
}

void ThreadPool::set_num_threads(int n_threads) {
    // Wait for a parallel_for running on another thread (the ops release the GIL, so Python can call
    // this while one runs): stop() and start() replace the workers and the shares that it uses.
    if (t_inside_pool) throw std::logic_error("ThreadPool::set_num_threads called from inside a parallel_for");
    for (bool expected = false; !busy_.compare_exchange_weak(expected, true); expected = false)
        std::this_thread::yield();
    struct Release {  // busy_ released even if start() throws (a thread that cannot be created)
        std::atomic<bool>& busy;
        ~Release() { busy.store(false); }
    } release{busy_};
    stop();
    start(n_threads);
}

void ThreadPool::start(int n_threads) {
    if (n_threads <= 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    n_threads_ = n_threads;
    quit_ = false;
    // A worker starts from the generation of now, not of whenever its thread gets to run: a
    // parallel_for issued before that would otherwise be missed and never complete.
    const uint64_t gen = generation_.load();
    shares_ = std::vector<Share>(static_cast<size_t>(n_threads));
    for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this, gen, i] { worker_loop(gen, i); });
}

void ThreadPool::stop() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        quit_ = true;
        generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
}

// Thread id's share first, from its front, then the others', each from its back. Why shares rather
// than one counter that all threads claim from: with one counter, two threads alternate chunks, so
// each reads the weights of a linear in short pieces with gaps, and the hardware prefetchers restart
// at every piece. Measured (SmolLM2, 4-bit decode, 2 threads, EPYC): the kernels took 20-40% more
// CPU time than on one thread, and decode ran 1.3-1.4x as fast as on one thread; with one chunk per
// thread it ran 1.5x as fast. A thief takes the back so that the owner's run stays unbroken.
void ThreadPool::run_chunks(int id) {
    const int T = static_cast<int>(shares_.size());
    for (int i = 0; i < T; ++i) {
        std::atomic<uint64_t>& range = shares_[static_cast<size_t>((id + i) % T)].range;
        const bool own = i == 0;
        for (;;) {
            uint64_t r = range.load(std::memory_order_relaxed);
            int64_t chunk;
            for (;;) {
                const uint64_t front = r & 0xffffffffu, back = r >> 32;
                if (front >= back) {
                    chunk = -1;
                    break;
                }
                chunk = static_cast<int64_t>(own ? front : back - 1);
                const uint64_t claimed = own ? r + 1 : r - (uint64_t{1} << 32);
                if (range.compare_exchange_weak(r, claimed)) break;
            }
            if (chunk < 0) break;
            try {
                (*fn_)(chunk * grain_, std::min(n_, (chunk + 1) * grain_));
            } catch (...) {
                std::lock_guard<std::mutex> lock(error_mutex_);
                if (!error_) error_ = std::current_exception();
                for (Share& o : shares_) o.range.store(0);  // abandon the remaining chunks
            }
        }
    }
}

void ThreadPool::worker_loop(uint64_t seen, int id) {
    t_inside_pool = true;
    for (;;) {
        // Spin first, then sleep: see kSpin.
        const auto spin_until = std::chrono::steady_clock::now() + kSpin;
        // The generation is checked at every pause, the clock every 64: checked only every 64 pauses,
        // a worker joined a job 2255 cycles after it began on average, 315 checked at each
        // (rdtsc, SmolLM2 4-bit decode, 2 threads, EPYC), and a decode step has ~150 jobs.
        while (generation_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < spin_until) {
            for (int i = 0; i < 64 && generation_.load(std::memory_order_relaxed) == seen; ++i) FQ_CPU_RELAX();
        }
        if (generation_.load(std::memory_order_acquire) == seen) {
            std::unique_lock<std::mutex> lock(mutex_);
            wake_.wait(lock, [&] { return generation_.load() != seen; });
        }
        seen = generation_.load(std::memory_order_acquire);
        if (quit_) return;
        // Join the job only while it is open; the caller waits for the workers that joined, and
        // only for them (see parallel_for).
        active_.fetch_add(1);
        if (open_.load()) run_chunks(id);
        active_.fetch_sub(1);
    }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    grain = std::max<int64_t>(1, grain);
    bool expected = false;
    if (n_threads_ == 1 || n <= grain || t_inside_pool || !busy_.compare_exchange_strong(expected, true)) {
        for (int64_t b = 0; b < n; b += grain) fn(b, std::min(n, b + grain));
        return;
    }
    // chunk indices are 32-bit in a Share: a larger grain where they would not fit
    grain = std::max(grain, (n - 1) / 0x7fffffff + 1);
    fn_ = &fn;
    n_ = n;
    grain_ = grain;
    // thread t's share: chunks [t c / T, (t + 1) c / T) of the c there are
    const uint64_t chunks = static_cast<uint64_t>((n + grain - 1) / grain), T = shares_.size();
    for (uint64_t t = 0; t < T; ++t)
        shares_[t].range.store(chunks * t / T | (chunks * (t + 1) / T) << 32);
    error_ = nullptr;
    open_.store(true);
    {
        // The lock orders the job's fields before the generation bump for a worker about to sleep.
        std::lock_guard<std::mutex> lock(mutex_);
        generation_.fetch_add(1, std::memory_order_acq_rel);
    }
    wake_.notify_all();
    t_inside_pool = true;
    run_chunks(0);
    t_inside_pool = false;
    // All chunks are claimed. Close the job, then wait for the workers that joined it to finish
    // theirs. A worker that has not woken up yet is not waited for: on a machine with more
    // threads than free cores it may not run for milliseconds, and the caller has done its share.
    // Spin briefly, then yield, so that a worker descheduled mid-chunk can have this core.
    open_.store(false);
    for (int i = 0; active_.load() != 0; ++i) {
        if (i < 2048)
            FQ_CPU_RELAX();
        else
            std::this_thread::yield();
    }
    fn_ = nullptr;
    // taken before busy_ is released: another thread's parallel_for may reset error_ from then on
    const std::exception_ptr error = error_;
    busy_.store(false);
    if (error) std::rethrow_exception(error);
}

}  // namespace flexquant

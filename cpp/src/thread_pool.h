// A small persistent thread pool for the CPU ops: one parallel_for over an index range at a time.
//
// The calling thread takes part in the work, so a pool of n threads starts n - 1 workers. Workers
// spin briefly before sleeping: a decode step issues hundreds of short parallel_for calls (one per
// linear, ~10-100 us each), and waking a sleeping thread through a condition variable costs about
// as much as the work itself.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace flexquant {

class ThreadPool {
  public:
    // n_threads <= 0: std::thread::hardware_concurrency() (at least 1).
    explicit ThreadPool(int n_threads = 0);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    // Threads that run a parallel_for, the caller included.
    int num_threads() const { return n_threads_.load(std::memory_order_relaxed); }
    // Stops the workers and starts n_threads - 1 new ones (<= 0: hardware concurrency). Called
    // while another thread's parallel_for runs, it waits for it to end; from a chunk that a pool's
    // threads run (of any pool), it throws std::logic_error.
    void set_num_threads(int n_threads);

    // Calls fn(begin, end) on disjoint chunks [begin, end) that cover [0, n), each chunk `grain`
    // indices long (the last one shorter; grain is raised where n / grain would pass 2^31 - 1).
    // Returns when all chunks are done. The first exception thrown by fn is rethrown here. A
    // parallel_for called from inside fn (nested) or while another thread is using the pool runs
    // serially on the caller.
    // Who runs which chunk: thread t owns the t-th of num_threads() contiguous shares of the chunks
    // and runs them from the front; a thread done with its share takes unclaimed chunks from the
    // back of the others', so the chunks of a late or slow thread that it has not begun are not
    // waited for.
    void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

  private:
    void start(int n_threads);
    void stop();
    void worker_loop(uint64_t seen, int id);
    void run_chunks(int id);

    std::atomic<int> n_threads_{1};  // atomic: read without busy_ (num_threads, the serial check)
    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable wake_;
    std::atomic<uint64_t> generation_{0};  // bumped once per parallel_for (and on shutdown)
    std::atomic<int> active_{0};           // workers inside a job (joined, not yet left)
    std::atomic<bool> open_{false};        // the current job still admits workers
    std::atomic<bool> quit_{false};
    std::atomic<bool> busy_{false};  // a parallel_for is running (guards re-entry)
    // The current job: fn_ over [0, n_) in chunks of grain_; thread t's unclaimed chunks are
    // [front, back) of shares_[t], packed as front | back << 32 (chunk indices) so that the owner,
    // taking the front, and a thief, taking the back, claim with one compare-and-swap.
    struct alignas(64) Share {  // a cache line each: the owner claims from it at every chunk
        std::atomic<uint64_t> range{0};
    };
    const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
    int64_t n_ = 0, grain_ = 1;
    std::vector<Share> shares_;  // (n_threads_)
    std::mutex error_mutex_;
    std::exception_ptr error_;
};

}  // namespace flexquant

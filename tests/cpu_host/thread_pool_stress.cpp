// ThreadPool (cpp/src/thread_pool.cpp) under stress, built with ThreadSanitizer by
// tests/test_thread_pool.py: the main thread runs parallel_fors of every size and grain (every 97th
// throwing from a chunk), a second thread runs its own on the same pool (serially, while the pool is
// busy), and a third resizes the pool all along. Each index must be hit exactly once per call, each
// thrown exception must come back to its caller, and ThreadSanitizer must report nothing.
// Prints "bad <wrong counts> caught <exceptions> of <thrown>"; exits 1 on a wrong count.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <thread>
#include <vector>

#include "thread_pool.h"

using flexquant::ThreadPool;

int main() {
    ThreadPool pool(3);
    std::atomic<bool> stop{false};
    std::atomic<long> bad{0};
    std::thread resizer([&] {
        for (int i = 0; !stop.load(); ++i) {
            pool.set_num_threads(1 + i % 4);
            std::this_thread::sleep_for(std::chrono::microseconds(300));
        }
    });
    std::thread other([&] {
        std::vector<int> hits(100);  // (100,) calls that hit each index
        for (int r = 0; r < 2000; ++r)
            pool.parallel_for(100, 3, [&](int64_t b, int64_t e) {
                for (int64_t i = b; i < e; ++i) hits[i]++;
            });
        for (int h : hits) bad += h != 2000;
    });
    std::vector<int> hits(1000);  // (1000,)
    long caught = 0, thrown = 0;
    for (int r = 0; r < 3000; ++r) {
        const int64_t n = 1 + r % 1000, grain = 1 + r % 17;
        const bool fail = r % 97 == 0;
        thrown += fail;
        for (auto& h : hits) h = 0;
        try {
            pool.parallel_for(n, grain, [&](int64_t b, int64_t e) {
                for (int64_t i = b; i < e; ++i) hits[i]++;
                if (fail && b == 0) throw std::runtime_error("chunk 0");
            });
            for (int64_t i = 0; i < n; ++i) bad += hits[i] != 1;
        } catch (const std::runtime_error&) {
            ++caught;
        }
    }
    stop = true;
    resizer.join();
    other.join();
    std::printf("bad %ld caught %ld of %ld\n", bad.load(), caught, thrown);
    return bad.load() != 0 || caught != thrown;
}

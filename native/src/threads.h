// A small fork-join thread pool: the caller is thread 0, workers spin briefly between regions (a
// decode step runs a few hundred short parallel regions) and then sleep, so an idle engine costs nothing.
// Contexts share one pool per thread count (shared_thread_pool): a server's models take turns on the cores.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace ryz {

class ThreadPool {
public:
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool &) = delete;
    ThreadPool &operator=(const ThreadPool &) = delete;

    int size() const { return n_threads_; }
    // Runs fn(thread_index, n_threads) on every thread and returns when all are done. Callers on several
    // threads take turns: one region runs at a time.
    void run(const std::function<void(int, int)> &fn);

    // Runs fn(thread_index, chunk) once for every chunk in [0, n_chunks) and returns when all are done.
    // Each thread first takes the chunks of its own static share in order (one forward stream through
    // its rows), then helps with the others' remaining chunks, so a thread delayed by another process
    // on the machine no longer holds the whole region up. Which thread runs a chunk depends on timing;
    // callers make what a chunk computes independent of that.
    void run_chunks(int64_t n_chunks, const std::function<void(int, int64_t)> &fn);

private:
    void run_region(const std::function<void(int, int)> &fn);  // the caller holds turn_
    void worker(int index);

    struct alignas(64) Cursor {  // one thread's share of run_chunks: next unclaimed chunk, end
        std::atomic<int64_t> next{0};
        int64_t end = 0;
    };

    int n_threads_;
    std::unique_ptr<Cursor[]> cursors_;
    std::vector<std::thread> workers_;
    const std::function<void(int, int)> *job_ = nullptr;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> pending_{0};
    std::atomic<int> sleepers_{0};
    std::atomic<bool> stop_{false};
    std::mutex mutex_;
    std::condition_variable wake_;
    std::mutex turn_;  // one region at a time when contexts on several threads share the pool
};

// The process's pool of n_threads threads, created on first use and kept while a context holds it. Every
// model of a server (production, canary, a draft model) gets the same workers: with a pool each, the waiting
// model's workers spun on the cores the running model's workers needed (docs/serving.md).
std::shared_ptr<ThreadPool> shared_thread_pool(int n_threads);

// Split [0, n) into `parts` contiguous ranges aligned to `align`; returns range `part`.
inline void split_range(int64_t n, int64_t align, int part, int parts, int64_t *begin, int64_t *end) {
    const int64_t units = (n + align - 1) / align;
    const int64_t per = units / parts, extra = units % parts;
    const int64_t first = part * per + (part < extra ? part : extra);
    const int64_t count = per + (part < extra ? 1 : 0);
    *begin = first * align < n ? first * align : n;
    *end = (first + count) * align < n ? (first + count) * align : n;
}

}  // namespace ryz

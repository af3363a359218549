// A small fork-join thread pool: the caller is thread 0, workers spin briefly between regions (a
// decode step runs a few hundred short parallel regions) and then sleep, so an idle engine costs nothing.
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
    // Runs fn(thread_index, n_threads) on every thread and returns when all are done.
    void run(const std::function<void(int, int)> &fn);

    // Runs fn(thread_index, chunk) once for every chunk in [0, n_chunks) and returns when all are done.
    // Each thread first takes the chunks of its own static share in order (one forward stream through
    // its rows), then helps with the others' remaining chunks, so a thread delayed by another process
    // on the machine no longer holds the whole region up. Which thread runs a chunk depends on timing;
    // callers make what a chunk computes independent of that.
    void run_chunks(int64_t n_chunks, const std::function<void(int, int64_t)> &fn);

private:
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
};

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

#include "threads.h"

#include <unistd.h>

#include <map>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#elif defined(__aarch64__)
static inline void cpu_relax() { asm volatile("yield"); }
#else
static inline void cpu_relax() {}
#endif

namespace ryz {

// Spins before sleeping: long enough to bridge the gaps between a step's parallel regions.
constexpr int SPINS_BEFORE_SLEEP = 1 << 16;
// Spins before yielding the core. On a loaded machine the thread we wait for may be runnable on this
// very core: spinning through our whole time slice would stall the region by milliseconds.
constexpr int SPINS_BEFORE_YIELD = 1 << 10;

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads), cursors_(new Cursor[n_threads_]) {
    for (int i = 1; i < n_threads_; ++i) workers_.emplace_back(&ThreadPool::worker, this, i);
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_.store(true);
        generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto &t : workers_) t.join();
}

void ThreadPool::run(const std::function<void(int, int)> &fn) {
    if (n_threads_ == 1) {  // no workers, nothing shared: callers on several threads run at once
        fn(0, 1);
        return;
    }
    std::lock_guard<std::mutex> turn(turn_);
    run_region(fn);
}

void ThreadPool::run_region(const std::function<void(int, int)> &fn) {
    job_ = &fn;
    pending_.store(n_threads_ - 1, std::memory_order_relaxed);
    // seq_cst pairs with the worker's sleepers_ increment: either it sees the new generation before
    // sleeping, or we see it asleep and wake it (under the lock, so the wake cannot be lost).
    generation_.fetch_add(1);
    if (sleepers_.load() > 0) {
        std::lock_guard<std::mutex> lock(mutex_);
        wake_.notify_all();
    }
    fn(0, n_threads_);
    for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
        if (spins < SPINS_BEFORE_YIELD) cpu_relax();
        else std::this_thread::yield();
    }
}

void ThreadPool::run_chunks(int64_t n_chunks, const std::function<void(int, int64_t)> &fn) {
    if (n_threads_ == 1) {
        for (int64_t i = 0; i < n_chunks; ++i) fn(0, i);
        return;
    }
    std::lock_guard<std::mutex> turn(turn_);  // the cursors are the region's too
    for (int t = 0; t < n_threads_; ++t) {  // published to the workers by run()'s generation bump
        int64_t begin, end;
        split_range(n_chunks, 1, t, n_threads_, &begin, &end);
        cursors_[t].next.store(begin, std::memory_order_relaxed);
        cursors_[t].end = end;
    }
    run_region([&](int ti, int nt) {
        for (int k = 0; k < nt; ++k) {  // own share first, then the next threads' leftovers
            Cursor &c = cursors_[(ti + k) % nt];
            for (int64_t i; (i = c.next.fetch_add(1, std::memory_order_relaxed)) < c.end;) fn(ti, i);
        }
    });
}

void ThreadPool::worker(int index) {
    uint64_t seen = 0;
    for (;;) {
        int spins = 0;
        uint64_t now;
        while ((now = generation_.load(std::memory_order_acquire)) == seen) {
            if (++spins < SPINS_BEFORE_SLEEP) {
                if (spins < SPINS_BEFORE_YIELD) cpu_relax();
                else std::this_thread::yield();
                continue;
            }
            std::unique_lock<std::mutex> lock(mutex_);
            sleepers_.fetch_add(1);
            wake_.wait(lock, [&] { return generation_.load() != seen; });
            sleepers_.fetch_sub(1);
            spins = 0;
        }
        seen = now;
        if (stop_.load()) return;
        (*job_)(index, n_threads_);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
}

std::shared_ptr<ThreadPool> shared_thread_pool(int n_threads) {
    static std::mutex mutex;
    static std::map<int, std::weak_ptr<ThreadPool>> pools;
    static pid_t owner = getpid();
    std::lock_guard<std::mutex> lock(mutex);
    if (getpid() != owner) {  // a forked child: the parent's pools have no workers here
        pools.clear();
        owner = getpid();
    }
    std::shared_ptr<ThreadPool> pool = pools[n_threads].lock();
    if (!pool) {
        pool = std::make_shared<ThreadPool>(n_threads);
        pools[n_threads] = pool;
    }
    return pool;
}

}  // namespace ryz

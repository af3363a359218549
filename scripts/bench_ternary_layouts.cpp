// T2P vs T1P ternary GEMM through the C ABI (docs/kernels.md, "The 1.6-bit ternary layout"): threads on
// disjoint halves of one matrix, layouts alternated, medians. Random bytes (results unused).
//   g++ -O2 -std=c++17 -Inative/include scripts/bench_ternary_layouts.cpp -o /tmp/bench -L<build> -lryz -Wl,-rpath,<build> -lpthread
//   /tmp/bench <cols> <T2P MB> <threads> <isa id> <reps> [calls per rep] [tokens] [pages: huge (default, as the engine) | 4k]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
#include <sys/mman.h>
#include "ryz.h"

int main(int argc, char **argv) {
    const int64_t cols = argc > 1 ? atoll(argv[1]) : 2560;
    const double mb = argc > 2 ? atof(argv[2]) : 512;  // T2P megabytes
    const int threads = argc > 3 ? atoi(argv[3]) : 2;
    const int isa = argc > 4 ? atoi(argv[4]) : 2;
    const int reps = argc > 5 ? atoi(argv[5]) : 15;
    const int inner = argc > 6 ? atoi(argv[6]) : 1;
    const int ntok = argc > 7 ? atoi(argv[7]) : 1;
    const bool huge = !(argc > 8 && strcmp(argv[8], "4k") == 0);
    int64_t rows = static_cast<int64_t>(mb * 1e6 / (cols / 4)) / (4 * threads) * (4 * threads);
    if (ryz_set_isa(isa) != RYZ_OK) { printf("isa\n"); return 1; }
    std::vector<int8_t> act(cols * ntok);
    for (auto &a : act) a = static_cast<int8_t>(rand());
    std::vector<int32_t> out(rows * ntok);
    const int64_t per = rows / threads;
    std::vector<std::vector<int32_t>> outs(threads, std::vector<int32_t>(per * ntok));
    for (int layout : {0, 1, 0, 1}) {
        const size_t bytes = ryz_ternary_layout_bytes(layout, rows, cols), per_bytes = ryz_ternary_layout_bytes(layout, per, cols);
        const size_t align = huge ? size_t(2) << 20 : 64, alloc = (bytes + align - 1) / align * align;
        uint8_t *w = static_cast<uint8_t *>(aligned_alloc(align, alloc));
        if (huge) madvise(w, alloc, MADV_HUGEPAGE);  // as the engine's ternary_weights buffer
        for (size_t i = 0; i < bytes; ++i) w[i] = static_cast<uint8_t>(layout ? (i * 2654435761u >> 13) % 243 : ((i * 2654435761u >> 13) & 0x55) | 0x11);
        std::vector<double> t;
        for (int r = 0; r < reps; ++r) {
            const auto s = std::chrono::steady_clock::now();
            std::vector<std::thread> th;
            for (int i = 0; i < threads; ++i)
                th.emplace_back([&, i] { for (int k = 0; k < inner; ++k) ryz_ternary_gemm_layout(layout, w + i * per_bytes, per_bytes, per, cols, act.data(), ntok, 0, outs[i].data()); });
            for (auto &x : th) x.join();
            t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count() / inner);
        }
        std::sort(t.begin(), t.end());
        printf("%s cols=%lld rows=%lld %.0f MB: median %.2f ms (%.1f GB/s, %.2f G MAC/s), best %.2f ms (%.1f GB/s)\n", layout ? "T1P" : "T2P",
               (long long)cols, (long long)rows, bytes / 1e6, t[reps / 2] * 1e3, bytes / t[reps / 2] / 1e9, rows * cols * double(ntok) / t[reps / 2] / 1e9,
               t[0] * 1e3, bytes / t[0] / 1e9);
        free(w);
    }
}

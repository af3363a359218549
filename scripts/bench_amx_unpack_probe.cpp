// How TDPBUSD overlaps with the work of unpacking its A tiles (docs/kernels.md "Batched decode: one token tile"), and
// what the prefill kernel's tile loads cost (docs/kernels.md "Prefill with the tokens as the tile rows").
//
//     g++ -O2 -std=c++17 -mavx512f -mavx512bw -mamx-tile -mamx-int8 scripts/bench_amx_unpack_probe.cpp -o probe && ./probe
//
// Prints nominal cycles (wall time x 2.6 GHz, this Xeon's base clock) per TDPBUSD for: the tile unit alone; an
// unpack alone (16 64-byte loads, shift and mask, 16 aligned stores into a ring of 1 KB slots); both, with each
// tile loaded D slots after the unpack stored it; and both with the tiles loaded from a buffer never written. Then the
// prefill kernel's inner loop (2 x 2 tiles: two token tiles and two weight tiles loaded per K step, 4 TDPBUSD, C in the
// registers over all of K) over operands that fit in L1 and over operands that live in L2.
// Linux only (arch_prctl for the tile data); exits 1 where AMX is missing or not granted.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>

namespace {

struct __attribute__((packed)) TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};
alignas(64) TileConfig g_config;
alignas(64) uint8_t g_fixed[2][1024];   // tiles loaded but never written (both on the zero page: L1)
alignas(64) uint8_t g_ring[32][1024];   // the unpack's destination
alignas(64) uint8_t g_src[64 * 1024];   // what the unpack reads (never written: the zero page, L1)

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Four TDPBUSD per iteration into C tiles 0-3 (A: tiles 4/5, B: tile 7). TDP: run them; LOAD: load each A tile first
// (from the ring slot written D slots ago, or from g_fixed when FIXED); UNPACK: unpack one 1 KB tile per TDPBUSD.
template <bool TDP, bool LOAD, bool UNPACK, int D, bool FIXED = false>
double cycles_per_tdp(long iterations) {
    const __m512i m3 = _mm512_set1_epi8(3);
    const double start = now();
    for (long it = 0; it < iterations; ++it) {
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
            const long slot = it * 4 + j;
            const uint8_t *a = FIXED ? g_fixed[j & 1] : g_ring[slot & 31];
            if (LOAD) {
                if (j & 1) _tile_loadd(5, a, 64);
                else _tile_loadd(4, a, 64);
            }
            if (TDP) {
                if (j == 0) _tile_dpbusd(0, 4, 7);
                if (j == 1) _tile_dpbusd(1, 5, 7);
                if (j == 2) _tile_dpbusd(2, 4, 7);
                if (j == 3) _tile_dpbusd(3, 5, 7);
            }
            if (UNPACK) {
                const uint8_t *src = g_src + (slot & 63) * 1024;
                uint8_t *dst = g_ring[(slot + D) & 31];
#pragma GCC unroll 16
                for (int r = 0; r < 16; ++r)
                    _mm512_store_si512(dst + 64 * r, _mm512_and_si512(_mm512_srli_epi16(_mm512_load_si512(src + 64 * r), 2), m3));
                asm volatile("" ::: "memory");
            }
        }
    }
    return (now() - start) / iterations / 4 * 2.6e9;
}

// gemm_tokens_as_rows's loop: token pairs of n_tiles token tiles, each over all `steps` K steps of one weight row pair.
double cycles_per_tdp_2x2(const int8_t *a, const uint8_t *b, int n_tiles, int steps, int reps) {
    alignas(64) static int32_t c[4][256];
    const double start = now();
    for (int rep = 0; rep < reps; ++rep)
        for (int tt = 0; tt < n_tiles; tt += 2) {
            const int8_t *a0 = a + static_cast<long>(tt) * steps * 1024, *a1 = a0 + static_cast<long>(steps) * 1024;
            const uint8_t *b0 = b, *b1 = b + static_cast<long>(steps) * 1024;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int k = 0; k < steps; ++k) {
                _tile_loadd(4, a0 + k * 1024, 64);
                _tile_loadd(6, b0 + k * 1024, 64);
                _tile_dpbusd(0, 4, 6);
                _tile_loadd(7, b1 + k * 1024, 64);
                _tile_dpbusd(1, 4, 7);
                _tile_loadd(5, a1 + k * 1024, 64);
                _tile_dpbusd(2, 5, 6);
                _tile_dpbusd(3, 5, 7);
            }
            _tile_stored(0, c[0], 64);
            _tile_stored(1, c[1], 64);
            _tile_stored(2, c[2], 64);
            _tile_stored(3, c[3], 64);
        }
    return (now() - start) / (static_cast<double>(reps) * n_tiles * 2 * steps) * 2.6e9;
}

}  // namespace

int main() {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */)) {
        std::perror("no AMX tile data for this process");
        return 1;
    }
    g_config.palette = 1;
    for (int i = 0; i < 8; ++i) g_config.colsb[i] = 64, g_config.rows[i] = 16;
    _tile_loadconfig(&g_config);
    const long n = 1000000;
    for (int round = 0; round < 2; ++round) {
        std::printf("TDPBUSD alone %.1f | + tile loads %.1f | unpack alone %.1f\n", cycles_per_tdp<true, false, false, 0>(n),
                    cycles_per_tdp<true, true, false, 0, true>(n), cycles_per_tdp<false, false, true, 8>(n));
        std::printf("TDPBUSD + unpack + tile loads of the unpack's tiles, D = 1: %.1f  2: %.1f  4: %.1f  8: %.1f  16: %.1f\n",
                    cycles_per_tdp<true, true, true, 1>(n), cycles_per_tdp<true, true, true, 2>(n), cycles_per_tdp<true, true, true, 4>(n),
                    cycles_per_tdp<true, true, true, 8>(n), cycles_per_tdp<true, true, true, 16>(n));
        std::printf("TDPBUSD + unpack + tile loads of a buffer never written: %.1f\n", cycles_per_tdp<true, true, true, 8, true>(n));
    }
    // 2 token tiles x 4 steps and 2 weight tiles x 4 steps: 16 KB (L1); 10 token tiles x 40 steps (2560 columns) and 2
    // weight tiles x 40 steps: 480 KB (L2).
    alignas(64) static int8_t a[10 * 40 * 1024];
    alignas(64) static uint8_t b[2 * 40 * 1024];
    std::memset(a, 1, sizeof a);  // pages of their own (never written, they would all be the one zero page)
    std::memset(b, 1, sizeof b);
    for (int round = 0; round < 2; ++round)
        std::printf("2 x 2 tiles, one 1 KB tile load per TDPBUSD: operands in L1 %.1f | in L2 %.1f\n", cycles_per_tdp_2x2(a, b, 2, 4, 200000),
                    cycles_per_tdp_2x2(a, b, 10, 40, 4000));
}

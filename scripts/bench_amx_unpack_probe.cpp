// How TDPBUSD overlaps with the work of unpacking its A tiles (docs/kernels.md "Batched decode: one token tile").
//
//     g++ -O2 -std=c++17 -mavx512f -mavx512bw -mamx-tile -mamx-int8 scripts/bench_amx_unpack_probe.cpp -o probe && ./probe
//
// Prints nominal cycles (wall time x 2.6 GHz, this Xeon's base clock) per TDPBUSD for: the tile unit alone; an
// unpack alone (16 64-byte loads, shift and mask, 16 aligned stores into a ring of 1 KB slots); both, with each
// tile loaded D slots after the unpack stored it; and both with the tiles loaded from a buffer never written.
// Linux only (arch_prctl for the tile data); exits 1 where AMX is missing or not granted.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>

namespace {

struct __attribute__((packed)) TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};
alignas(64) TileConfig g_config;
alignas(64) uint8_t g_fixed[2][1024];   // tiles loaded but never written
alignas(64) uint8_t g_ring[32][1024];   // the unpack's destination
alignas(64) uint8_t g_src[64 * 1024];   // what the unpack reads

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
}

// Could the Q8_0 head run on AMX? A probe of one way to do it exactly enough, against the engine's own kernel
// (docs/kernels.md "A Q8_0 head on AMX: measured, not taken").
//
//     cmake -S native -B /tmp/probe-build -DCMAKE_BUILD_TYPE=Release && cmake --build /tmp/probe-build -j 2
//     g++ -O2 -std=c++17 -march=sapphirerapids -Inative/include scripts/bench_amx_head_probe.cpp -o /tmp/head-probe
//         -L/tmp/probe-build -lryz -Wl,-rpath,/tmp/probe-build && /tmp/head-probe
//
// The head's weights are Q8_0 (int8 q, one fp16 d per 32 columns) and its activations floats. TDPBSSD multiplies
// int8 by int8 exactly, so each token's activations become 24-bit fixed point (x * 2^(22 - E), E the exponent of
// max|x|) split into three signed byte digits, 3 tile columns per token (5 tokens per tile). An A tile is 16 weight
// rows x one block's 32 q bytes, loaded in place (stride: the row's bytes); each block's C tile is stored and
// multiplied into float accumulators by its rows' d (the scale changes every 32 columns, so C cannot run on over K).
// Error against a double reference is about the float kernel's (printed). Hot in L1/L2 (512 rows x 2560, one thread,
// 400 calls), for 1 and 8 tokens: the engine's kernel (`ryz_dense_gemm`), the AMX version, and the AMX version with
// its tile instructions alone (no float work). Linux only; exits 1 where AMX is missing or not granted.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "ryz.h"

namespace {

constexpr long COLS = 2560, ROWS = 512, BLOCKS = COLS / 32;
constexpr size_t ROW_BYTES = BLOCKS * 34;

struct __attribute__((packed)) TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};
alignas(64) TileConfig g_config;

void configure() {  // 0: A 16 x 32 bytes; 1, 2: B 8 x 64; 3-6: C 16 x 64
    g_config.palette = 1;
    g_config.rows[0] = 16, g_config.colsb[0] = 32;
    for (int t = 1; t <= 2; ++t) g_config.rows[t] = 8, g_config.colsb[t] = 64;
    for (int t = 3; t <= 6; ++t) g_config.rows[t] = 16, g_config.colsb[t] = 64;
}

struct Activations {  // B tiles [block][tile][8 rows][64 bytes] (VNNI layout), and each token's 2^(E - 22)
    int tokens, tiles;
    std::vector<int8_t> b;
    std::vector<float> scale;
};

Activations fixed_point(const float *x, int tokens) {
    Activations a{tokens, (tokens + 4) / 5, {}, {}};
    a.b.assign(size_t(BLOCKS) * a.tiles * 512, 0);
    for (int t = 0; t < tokens; ++t) {
        float m = 0;
        for (long k = 0; k < COLS; ++k) m = std::max(m, std::fabs(x[t * COLS + k]));
        int e;
        std::frexp(m, &e);  // m < 2^e, so |X| < 2^22 and the top digit stays in [-64, 64]
        a.scale.push_back(std::ldexp(1.0f, e - 22));
        for (long k = 0; k < COLS; ++k) {
            const int32_t X = static_cast<int32_t>(std::nearbyint(std::ldexp(x[t * COLS + k], 22 - e)));
            const int d0 = ((X + 128) & 255) - 128, X1 = (X - d0) >> 8;
            const int d1 = ((X1 + 128) & 255) - 128, d2 = (X1 - d1) >> 8;
            const int digits[3] = {d2, d1, d0};
            int8_t *tile = a.b.data() + (size_t(k / 32) * a.tiles + t / 5) * 512;
            for (int j = 0; j < 3; ++j) tile[(k % 32) / 4 * 64 + 4 * (3 * (t % 5) + j) + k % 4] = static_cast<int8_t>(digits[j]);
        }
    }
    return a;
}

// out[t * ROWS + r] for all rows; block b + 1's TDPBSSDs are issued before block b's C is turned into floats.
void amx_head(const uint8_t *w, const Activations &a, float *out, bool float_work) {
    _tile_loadconfig(&g_config);
    alignas(64) int32_t c[2][16][16];
    alignas(64) float digit[2][16], d[BLOCKS][16];
    for (int tile = 0; tile < 2; ++tile)
        for (int n = 0; n < 16; ++n) digit[tile][n] = n < 15 && tile * 5 + n / 3 < a.tokens ? std::ldexp(1.0f, 8 * (2 - n % 3)) : 0.0f;
    const __m512 digit0 = _mm512_load_ps(digit[0]), digit1 = _mm512_load_ps(digit[1]);
    const __m512i down = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(ROW_BYTES));
    const bool two = a.tiles > 1;
    const int8_t *B = a.b.data();
    for (long r = 0; r < ROWS; r += 16) {
        const uint8_t *base = w + r * ROW_BYTES;
        for (long b = 0; b < BLOCKS; ++b)  // the 16 rows' d of each block, gathered down the rows
            _mm512_store_ps(d[b], _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_i32gather_epi32(down, base + b * 34, 1))));
        __m512 acc0[16], acc1[16];
        for (int m = 0; m < 16; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
        _tile_loadd(0, base + 2, ROW_BYTES);
        _tile_loadd(1, B, 64);
        _tile_zero(3);
        _tile_dpbssd(3, 0, 1);
        if (two) {
            _tile_loadd(2, B + 512, 64);
            _tile_zero(4);
            _tile_dpbssd(4, 0, 2);
        }
        for (long b = 0; b < BLOCKS; ++b) {
            if (b & 1) {
                _tile_stored(5, c[0], 64);
                if (two) _tile_stored(6, c[1], 64);
            } else {
                _tile_stored(3, c[0], 64);
                if (two) _tile_stored(4, c[1], 64);
            }
            if (b + 1 < BLOCKS) {
                _tile_loadd(0, base + (b + 1) * 34 + 2, ROW_BYTES);
                _tile_loadd(1, B + (b + 1) * a.tiles * 512, 64);
                if (b & 1) {
                    _tile_zero(3);
                    _tile_dpbssd(3, 0, 1);
                } else {
                    _tile_zero(5);
                    _tile_dpbssd(5, 0, 1);
                }
                if (two) {
                    _tile_loadd(2, B + ((b + 1) * a.tiles + 1) * 512, 64);
                    if (b & 1) {
                        _tile_zero(4);
                        _tile_dpbssd(4, 0, 2);
                    } else {
                        _tile_zero(6);
                        _tile_dpbssd(6, 0, 2);
                    }
                }
            }
            if (!float_work) continue;
#pragma GCC unroll 16
            for (int m = 0; m < 16; ++m) {
                const __m512 dm = _mm512_set1_ps(d[b][m]);
                acc0[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[0][m])), _mm512_mul_ps(dm, digit0), acc0[m]);
                if (two) acc1[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[1][m])), _mm512_mul_ps(dm, digit1), acc1[m]);
            }
        }
        for (int m = 0; m < 16; ++m) {
            alignas(64) float sums[2][16];
            _mm512_store_ps(sums[0], acc0[m]);
            _mm512_store_ps(sums[1], acc1[m]);
            for (int t = 0; t < a.tokens; ++t) {
                const float *s = &sums[t / 5][3 * (t % 5)];
                out[t * ROWS + r + m] = ((s[0] + s[1]) + s[2]) * a.scale[t];
            }
        }
    }
    _tile_release();
}

template <typename Fn>
double microseconds_per_call(Fn fn) {
    constexpr int CALLS = 400;
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < CALLS; ++i) fn();
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() / CALLS;
}

}  // namespace

int main() {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) {
        std::puts("AMX tile data not granted: nothing to measure");
        return 1;
    }
    configure();
    std::mt19937 rng(1);
    std::vector<uint8_t> w(ROW_BYTES * ROWS);
    for (auto &byte : w) byte = static_cast<uint8_t>(rng());
    for (long r = 0; r < ROWS; ++r)
        for (long b = 0; b < BLOCKS; ++b) {
            const uint16_t d = static_cast<uint16_t>(0x1c00 + (rng() & 0xff));  // ~2^-8: a head's scales
            std::memcpy(w.data() + r * ROW_BYTES + b * 34, &d, 2);
        }
    for (int tokens : {1, 8}) {
        std::vector<float> x(tokens * COLS), engine(tokens * ROWS), amx(tokens * ROWS);
        std::normal_distribution<float> normal;
        for (auto &v : x) v = normal(rng);
        const Activations a = fixed_point(x.data(), tokens);
        double err_engine = 0, err_amx = 0, norm = 0;
        ryz_dense_gemm(w.data(), 8 /* Q8_0 */, ROWS, COLS, x.data(), tokens, engine.data());
        amx_head(w.data(), a, amx.data(), true);
        for (int t = 0; t < tokens; ++t)
            for (long r = 0; r < ROWS; ++r) {
                double ref = 0;
                const uint8_t *row = w.data() + r * ROW_BYTES;
                for (long k = 0; k < COLS; ++k) {
                    uint16_t dh;
                    std::memcpy(&dh, row + k / 32 * 34, 2);
                    ref += double(_cvtsh_ss(dh)) * static_cast<int8_t>(row[k / 32 * 34 + 2 + k % 32]) * x[t * COLS + k];
                }
                err_engine += std::pow(engine[t * ROWS + r] - ref, 2), err_amx += std::pow(amx[t * ROWS + r] - ref, 2), norm += ref * ref;
            }
        for (int round = 0; round < 3; ++round) {
            const double us_engine = microseconds_per_call([&] { ryz_dense_gemm(w.data(), 8, ROWS, COLS, x.data(), tokens, engine.data()); });
            const double us_amx = microseconds_per_call([&] { amx_head(w.data(), a, amx.data(), true); });
            const double us_tiles = microseconds_per_call([&] { amx_head(w.data(), a, amx.data(), false); });
            const double us_prepare = microseconds_per_call([&] { (void)fixed_point(x.data(), tokens); });
            std::printf("%d token(s), %ld x %ld hot: engine %.1f us, amx %.1f us (tile instructions alone %.1f; %.0f ns per "
                        "16 rows x 32 columns), activations %.1f us | relative L2 error vs double: engine %.2e, amx %.2e\n",
                        tokens, ROWS, COLS, us_engine, us_amx, us_tiles, us_tiles * 1e3 / (ROWS / 16 * BLOCKS), us_prepare,
                        std::sqrt(err_engine / norm), std::sqrt(err_amx / norm));
        }
    }
    return 0;
}

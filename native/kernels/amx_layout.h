// The AMX-INT8 ternary GEMM's tile operands (amx.cpp), as plain loops: the spec of the layout. amx.cpp
// builds its tiles with vectorized twins of these (unpack_weights_avx512, pack_acts_avx512, held to
// scalar by the kernel tests); the tests also build these buffers and multiply them the way TDPBUSD is
// defined, so the layout is checked against the scalar spec on hosts without AMX too.
//
// One K step is 64 columns: step s = 4b + l is plane l of T2P block b, columns 64s .. 64s + 63.
//   A (16 weight rows x 64 bytes, unsigned): A[i][j] = code+1 of (row r + i, column 64s + j), which is
//     (byte j of the row's T2P block b) >> 2l & 3: a plane is already 64 contiguous columns, so there
//     is no transpose, only a shift and a mask.
//   B (16 rows x 64 bytes, signed, "VNNI" layout): B[kk][4n + m] = act[token t + n][64s + 4kk + m];
//     tokens past the end are zeros.
//   TDPBUSD: C[i][n] += sum_kk sum_m A[i][4kk + m] * B[kk][4n + m], so after every step
//     C[i][n] = sum_k (code(r + i, k) + 1) * act[t + n][k], and out[t + n][r + i] = C[i][n] - act_sums[t + n].
// Bound: |C| <= cols * 3 * 128 < 2^31 for cols < 5.5M (as the VNNI kernels).
#pragma once

#include <cstdint>
#include <cstring>

#include "../src/blocks.h"

namespace ryz {
namespace amx {

constexpr int TILE_M = 16;          // rows of a tile (weight rows of A, K groups of B, rows of C)
constexpr int TILE_K = 64;          // bytes per tile row: one K step
constexpr int TILE_BYTES = TILE_M * TILE_K;

// A tiles of rows [r, r + 16) (r a multiple of TILE_ROWS) for K steps [s0, s1), one after another:
// dst[(s - s0) * TILE_BYTES + i * 64 + j]. (amx.cpp's unpack_weights_avx512 is this, vectorized.)
static inline void unpack_weights(const uint8_t *packed, int64_t blocks, int64_t r, int64_t s0, int64_t s1, uint8_t *dst) {
    for (int i = 0; i < TILE_M; ++i) {
        const int64_t row = r + i;
        const uint8_t *base = packed + (row / TILE_ROWS * blocks * TILE_ROWS + row % TILE_ROWS) * T2P_BLOCK_BYTES;
        for (int64_t s = s0; s < s1; ++s) {
            const uint8_t *q = base + (s / 4) * TILE_ROWS * T2P_BLOCK_BYTES;
            const int shift = 2 * static_cast<int>(s % 4);
            uint8_t *d = dst + (s - s0) * TILE_BYTES + i * TILE_K;
            for (int j = 0; j < TILE_K; ++j) d[j] = static_cast<uint8_t>((q[j] >> shift) & 3);
        }
    }
}

// B tiles of tokens [0, n_valid) of `act` (rows of `cols` int8), every K step s at dst + s * step_stride
// (the kernel interleaves token tiles step by step, so a K chunk's B tiles are one contiguous run).
static inline void pack_acts(const int8_t *act, int64_t cols, int n_valid, int8_t *dst, int64_t step_stride) {
    const int64_t steps = cols / TILE_K;
    for (int64_t s = 0; s < steps; ++s) {
        int8_t *d = dst + s * step_stride;
        if (n_valid < 16) std::memset(d, 0, TILE_BYTES);
        for (int n = 0; n < n_valid; ++n) {
            const int8_t *a = act + n * cols + s * TILE_K;
            for (int kk = 0; kk < TILE_M; ++kk) std::memcpy(d + kk * TILE_K + 4 * n, a + 4 * kk, 4);
        }
    }
}

}  // namespace amx
}  // namespace ryz

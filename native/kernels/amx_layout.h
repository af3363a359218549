// The AMX-INT8 ternary GEMM's tile operands (amx.cpp), as plain loops: the spec of the layout. amx.cpp
// builds its tiles with vectorized twins of these (unpack_weights_avx512, pack_acts_avx512, held to
// scalar by the kernel tests; unpack_vnni_block, also held to unpack_vnni directly); the tests also build
// these buffers and multiply them the way TDPBUSD / TDPBSUD are defined, so the layout is checked against
// the scalar spec on hosts without AMX too.
//
// One K step is 64 columns: step s = 4b + l is plane l of T2P block b, columns 64s .. 64s + 63.
//
// 8 to 31 tokens (weights as the tile rows; 8 to 16 tokens are one token tile, gemm_one_token_tile, which unpacks
// each A tile one K step at a time: plane l of block b for step 4b + l):
//   A (16 weight rows x 64 bytes, unsigned): A[i][j] = code+1 of (row r + i, column 64s + j), which is
//     (byte j of the row's T2P block b) >> 2l & 3: a plane is already 64 contiguous columns, so there
//     is no transpose, only a shift and a mask.
//   B (16 rows x 64 bytes, signed, "VNNI" layout): B[kk][4n + m] = act[token t + n][64s + 4kk + m];
//     tokens past the end are zeros.
//   TDPBUSD: C[i][n] += sum_kk sum_m A[i][4kk + m] * B[kk][4n + m], so after every step
//     C[i][n] = sum_k (code(r + i, k) + 1) * act[t + n][k], and out[t + n][r + i] = C[i][n] - act_sums[t + n].
//
// From 32 tokens, prefill (gemm_tokens_as_rows: tokens as the tile rows, the same product turned round):
//   A (16 tokens x 64 bytes, signed): A[n][j] = act[token t + n][64s + j], a plain copy of the token's
//     64 columns; tokens past the end are zero rows. A token tile's A tiles for all K steps are one run.
//   B (16 rows x 64 bytes, unsigned, VNNI layout): B[kk][4i + m] = code+1 of (row r + i, column 64s + 4kk + m)
//     = (byte 4kk + m of row r + i's T2P block b) >> 2l & 3: dword kk of each of the 16 rows' blocks,
//     transposed (whole bytes move, so one transpose serves the block's 4 planes), then shift and mask.
//     Only whole row tiles: the 4-12 rows of a range past the last multiple of 16 go to AVX-512.
//   C starts from minus the activation sums: C[n][i] = -act_sums[t + n] (0 for a padding token).
//   TDPBSUD (s8 x u8): C[n][i] += sum_kk sum_m A[n][4kk + m] * B[kk][4i + m], so after the last
//     step C[n][i] = out[t + n][r + i] itself, stored with no transpose (a padding token's row stays 0, unstored).
// Bound: |C| <= cols * 3 * 128 < 2^31 for cols < 5.5M (as the VNNI kernels); with -act_sums folded in,
// |C| <= cols * 4 * 128 < 2^31 for cols < 4.1M.
#pragma once

#include <cstdint>
#include <cstring>

#include "../src/blocks.h"

namespace ryz {
namespace amx {

constexpr int TILE_M = 16;          // rows of a tile (weight rows of A, K groups of B, rows of C)
constexpr int TILE_K = 64;          // bytes per tile row: one K step
constexpr int TILE_BYTES = TILE_M * TILE_K;

// The 64-byte T2P block b of `row` (blocks.h: packed[tile][block][row in tile][64]; `blocks` = cols / 256).
static inline const uint8_t *t2p_block(const uint8_t *packed, int64_t blocks, int64_t row, int64_t b) {
    return packed + (row / TILE_ROWS * blocks * TILE_ROWS + b * TILE_ROWS + row % TILE_ROWS) * T2P_BLOCK_BYTES;
}

// Bytes from a row's T2P block to the same block of the row TILE_ROWS further on.
static inline int64_t t2p_tile_stride(int64_t blocks) { return blocks * TILE_ROWS * T2P_BLOCK_BYTES; }

// Row r + i's block, given row r's (`base` = t2p_block(packed, blocks, r, b), r a multiple of TILE_ROWS) and
// t2p_tile_stride(blocks). The vectorized unpacks address their 16 rows this way, from one base with constant
// offsets: t2p_block per row made GCC spend more on index arithmetic, spilled to xmm registers, than on the unpack.
static inline const uint8_t *t2p_block_in_tile(const uint8_t *base, int64_t tile_stride, int i) {
    return base + i / TILE_ROWS * tile_stride + i % TILE_ROWS * T2P_BLOCK_BYTES;
}

// code+1 of (row, col) in T2P: bits 2l..2l+1 of byte j of the row's block b, where col = 256b + 64l + j.
// K step s is plane s % 4 of block s / 4.
static inline uint8_t t2p_code1(const uint8_t *packed, int64_t blocks, int64_t row, int64_t col) {
    return static_cast<uint8_t>((t2p_block(packed, blocks, row, col / QK_K)[col % TILE_K] >> (2 * (col % QK_K / TILE_K))) & 3);
}

// A tiles of rows [r, r + 16) (r a multiple of TILE_ROWS) for K steps [s0, s1), one after another:
// dst[(s - s0) * TILE_BYTES + i * 64 + j]. (amx.cpp's unpack_weights_avx512 is this, vectorized.)
static inline void unpack_weights(const uint8_t *packed, int64_t blocks, int64_t r, int64_t s0, int64_t s1, uint8_t *dst) {
    for (int64_t s = s0; s < s1; ++s)
        for (int i = 0; i < TILE_M; ++i)
            for (int j = 0; j < TILE_K; ++j) dst[(s - s0) * TILE_BYTES + i * TILE_K + j] = t2p_code1(packed, blocks, r + i, TILE_K * s + j);
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

// ---- Prefill: tokens as the tile rows (gemm_tokens_as_rows) ----

// A tiles of tokens [0, n_valid) of `act` (rows of `cols` int8) for K steps [s0, s1), one after another:
// dst[(s - s0) * TILE_BYTES + n * 64 + j]; rows n >= n_valid are zeros (the kernel pads a partial token tile
// instead of configuring a smaller one). No reformat: a tile row is the token's 64 contiguous columns.
static inline void pack_token_rows(const int8_t *act, int64_t cols, int n_valid, int64_t s0, int64_t s1, int8_t *dst) {
    for (int64_t s = s0; s < s1; ++s)
        for (int n = 0; n < TILE_M; ++n) {
            int8_t *d = dst + (s - s0) * TILE_BYTES + n * TILE_K;
            if (n < n_valid) std::memcpy(d, act + n * cols + s * TILE_K, TILE_K);
            else std::memset(d, 0, TILE_K);
        }
}

// B tiles of rows [r, r + 16) in the VNNI layout for K steps [s0, s1), one after another:
// dst[(s - s0) * TILE_BYTES + kk * 64 + 4i + m] = code+1 of (row r + i, column 64s + 4kk + m). (amx.cpp's
// unpack_vnni_block is this for one T2P block, s0 = 4b, s1 = 4b + 4, vectorized as a dword transpose.)
static inline void unpack_vnni(const uint8_t *packed, int64_t blocks, int64_t r, int64_t s0, int64_t s1, uint8_t *dst) {
    for (int64_t s = s0; s < s1; ++s)
        for (int i = 0; i < TILE_M; ++i)
            for (int kk = 0; kk < TILE_M; ++kk)
                for (int m = 0; m < 4; ++m)
                    dst[(s - s0) * TILE_BYTES + kk * TILE_K + 4 * i + m] = t2p_code1(packed, blocks, r + i, TILE_K * s + 4 * kk + m);
}

// The C tile a token tile starts from: dst[n * 16 + i] = -act_sums[n] for n < n_valid, 0 for padding, so
// the sum needs no pass of its own and C ends as the output (16 x 16 int32, row n = token n).
static inline void neg_sums_tile(const int32_t *act_sums, int n_valid, int32_t *dst) {
    for (int n = 0; n < TILE_M; ++n)
        for (int i = 0; i < TILE_M; ++i) dst[n * TILE_M + i] = n < n_valid ? -act_sums[n] : 0;
}

}  // namespace amx
}  // namespace ryz

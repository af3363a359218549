// Block formats: the GGUF blocks we read (ggml's layouts) and the ternary layout our kernels run on.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ryz {

constexpr int QK_K = 256;  // super-block of the K-quants and ternary types
constexpr int QK8_0 = 32;

using fp16_t = uint16_t;

// TQ2_0: 2.0625 bpw. Byte qs[c*32 + m] holds, in bits 2l..2l+1, code+1 of weight c*128 + l*32 + m
// (c: 128-weight chunk, l: plane). d is the fp16 block scale; ours is always exactly 1.0.
struct block_tq2_0 {
    uint8_t qs[QK_K / 4];  // 2-bit codes, value + 1 in {0, 1, 2}
    fp16_t d;              // block scale
};
static_assert(sizeof(block_tq2_0) == 66, "block_tq2_0 must stay 66 bytes");

// TQ1_0: 1.6875 bpw. Five base-3 digits per byte in qs (values 0..239 of 32+16 bytes, stored scaled
// by 256/243 so the digits can be peeled off with multiply-by-3-and-shift), four per byte in qh.
struct block_tq1_0 {
    uint8_t qs[(QK_K - 4 * QK_K / 64) / 5];  // 48 bytes: 240 weights
    uint8_t qh[QK_K / 64];                   // 4 bytes: 16 weights
    fp16_t d;
};
static_assert(sizeof(block_tq1_0) == 54, "block_tq1_0 must stay 54 bytes");

// Q8_0: 8.5 bpw. 32 int8 values times one fp16 scale.
struct block_q8_0 {
    fp16_t d;
    int8_t qs[QK8_0];
};
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 must stay 34 bytes");

// Q6_K: 6.5625 bpw. 16 sub-blocks of 16 with int8 scales; 6-bit values split into 4 low bits (ql)
// and 2 high bits (qh), minus 32.
struct block_q6_k {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    fp16_t d;
};
static_assert(sizeof(block_q6_k) == 210, "block_q6_k must stay 210 bytes");

// Our kernels' ternary layout ("T2P"), 2.0 bpw, made from TQ2_0/TQ1_0 at load time:
//   rows are grouped in tiles of TILE_ROWS; a tile stores, for each 256-column block b in order, the
//   64-byte block of each of its rows in order: packed[tile][b][row][64].
//   Within a 64-byte block, byte j holds code+1 of columns 64l + j in bits 2l..2l+1 (l = 0..3), so
//   each 2-bit plane of a 64-, 32- or 16-byte load lines up with contiguous activations (AVX-512,
//   AVX2, NEON alike), and no block scale is stored (the model's per-tensor scale is applied after).
constexpr int TILE_ROWS = 4;
constexpr int T2P_BLOCK_BYTES = 64;
struct block_t2p {
    uint8_t qs[QK_K / 4];
};
static_assert(sizeof(block_t2p) == T2P_BLOCK_BYTES, "block_t2p must stay 64 bytes");

inline size_t t2p_bytes(int64_t rows, int64_t cols) {
    return static_cast<size_t>(rows) * static_cast<size_t>(cols / QK_K) * T2P_BLOCK_BYTES;
}

// The 1.6-bit ternary layout ("T1P"), made from TQ1_0 at load time (TQ2_0 stays T2P):
//   a row tile (TILE_ROWS = 4 rows) is a sequence of n = ceil(cols / 80) 64-byte vectors:
//   packed[tile][i][64], i = 0..n-1. Byte 16 * r + m of vector i (r: row in the tile, m = 0..15) holds
//   the codes+1 d_0..d_4 of columns 80 i + 16 k + m (k = 0..4) of row r as five base-3 digits, stored
//   as TQ1_0 stores them: q = ceil(v * 256 / 243), v = sum_k d_k 3^(4-k). Digit k of any byte q is
//   (3 * (3^k q mod 256)) >> 8. Columns at or past `cols` (the last vector, when 80 does not divide
//   cols: 2560 = 32 x 80, 6912 = 86 x 80 + 32) hold d = 1 (weight 0); every 16-column group is wholly
//   in or out, since cols is a multiple of 256.
//   Why this shape: each of a vector's five digit planes lines up with 16 contiguous activations,
//   the same 16 for the 4 rows (one 128-bit broadcast load), and a 32-bit accumulator lane sums bytes
//   of one row only (lanes 4r..4r+3 are row r). No block scale, as T2P.
//   1.6 bpw (2560 columns) to 1.611 (6912: 87 vectors for 86.4).
constexpr int T1P_VECTOR_BYTES = 64;
constexpr int T1P_VECTOR_COLS = 80;  // 5 digits x 16 bytes per row

inline int64_t t1p_vectors(int64_t cols) { return (cols + T1P_VECTOR_COLS - 1) / T1P_VECTOR_COLS; }

inline size_t t1p_bytes(int64_t rows, int64_t cols) {
    return static_cast<size_t>(rows / TILE_ROWS) * static_cast<size_t>(t1p_vectors(cols)) * T1P_VECTOR_BYTES;
}

// Digit k (0..4) of a T1P / TQ1_0 byte: code+1 in {0, 1, 2} for every byte value.
inline uint8_t t1p_digit(uint8_t q, int k) {
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    return static_cast<uint8_t>((static_cast<unsigned>(static_cast<uint8_t>(q * pow3[k])) * 3) >> 8);
}

// The byte holding digits d[0..4] (each 0..2).
inline uint8_t t1p_encode(const uint8_t *d) {
    const unsigned v = d[0] * 81u + d[1] * 27u + d[2] * 9u + d[3] * 3u + d[4];
    return static_cast<uint8_t>((v * 256 + 242) / 243);
}

// Ternary weight layouts in memory (TernaryLinear::layout, the ABI's RYZ_LAYOUT_*).
constexpr int32_t LAYOUT_T2P = 0, LAYOUT_T1P = 1;

float fp16_to_fp32(fp16_t h);
fp16_t fp32_to_fp16(float f);

}  // namespace ryz

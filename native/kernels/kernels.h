// The kernel table: one implementation per ISA family, chosen once at load (see src/dispatch.cpp).
// Each SIMD file mirrors scalar.cpp, which is the executable spec; the tests hold every SIMD entry to
// its scalar twin bit for bit on integer outputs.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../src/blocks.h"

namespace ryz {

struct Kernels {
    int isa;  // RYZ_ISA_*

    // Ternary x int8 GEMM over T2P-packed weights (blocks.h) and per-token int8 activations:
    //   out[t * out_stride + r] = sum_k (code(r, k) - 1) * act[t * cols + k]
    // for rows r in [row_begin, row_end) (multiples of TILE_ROWS) and tokens t in [0, n_tokens).
    // act_sums[t] = sum_k act[t * cols + k] (SIMD kernels multiply code+1 and subtract it).
    // token_tile: tokens sharing one unpacking of a weight block (a tuning knob; results identical).
    void (*ternary_gemm)(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols,
                         const int8_t *act, const int32_t *act_sums, int32_t n_tokens, int32_t token_tile,
                         int32_t *out, int64_t out_stride);

    // Dense rows (F32, F16, Q8_0 or Q6_K) times float activations, for the head and the embedding:
    //   out[t * out_stride + r] = sum_k dequant(w)[r, k] * x[t * cols + k]
    // Floats are summed in a fixed order per ISA (not necessarily the scalar order: tolerance-tested).
    void (*dense_gemm)(const void *w, int32_t type, int64_t row_begin, int64_t row_end, int64_t cols,
                       const float *x, int32_t n_tokens, float *out, int64_t out_stride);

    // One token: scale = 127 / max(max|x|, 1e-5); q = clamp(rint(x * scale), -128, 127); sum = sum q.
    void (*quantize_act)(const float *x, int64_t cols, int8_t *q, float *scale, int32_t *sum);

    // Attention over a KV cache stored as F32 or F16 (kv_type RYZ_KV_*), rows `stride` elements apart:
    //   scores[p] = dot(q, key_p) for p < n_pos;   out[i] = sum_p probs[p] * value_p[i].
    // Entries left null fall back to the scalar ones (forward.cpp), so a family may omit them.
    void (*kv_dot)(const float *q, const void *keys, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d, float *scores);
    void (*kv_axpy)(const float *probs, const void *values, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d, float *out);

    // ternary_gemm's contract over T1P-packed weights (blocks.h; TQ1_0 models): the same integers.
    // Last in the table so families written before it leave it null: forward.cpp then runs scalar's.
    void (*ternary_gemm_t1p)(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols,
                             const int8_t *act, const int32_t *act_sums, int32_t n_tokens, int32_t token_tile,
                             int32_t *out, int64_t out_stride);

    // The attention softmax's per-position work, bit for bit the scalar loops (scalar.cpp is the spec):
    //   softmax_exp: scores[p] = float(exp(double(scores[p] - max_score))) for p < n (exp in double and
    //                rounded once, as the reference; SIMD families must give exactly these bits)
    //   softmax:     scores[p] /= divisor; m = max over p (NaNs skipped, -inf if none); softmax_exp(m);
    //                scores[p] /= pairwise_sum(scores) (numpy's order)
    // Null entries fall back to scalar's (forward.cpp), as ternary_gemm_t1p does.
    void (*softmax_exp)(float *scores, int32_t n, float max_score);
    void (*softmax)(float *scores, int32_t n, float divisor);

    // kv_dot and kv_axpy for nq queries over the same KV rows (the heads of a GQA group, for a block of one
    // sequence's tokens): every query's result is exactly what kv_dot / kv_axpy give it (the same float
    // operations in the same order), but each K/V row is loaded once per few queries instead of once per query.
    //   kv_dot_multi:  scores[j][p] = dot(q[j], key_p) for p < n_pos, j < nq
    //   kv_axpy_multi: out[j][i] = sum over p < n_pos[j] of probs[j][p] * value_p[i], j < nq
    // Null (families without them): forward.cpp calls kv_dot / kv_axpy once per query.
    void (*kv_dot_multi)(const float *const *q, int32_t nq, const void *keys, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d,
                         float *const *scores);
    void (*kv_axpy_multi)(const float *const *probs, int32_t nq, const int32_t *n_pos, const void *values, int32_t kv_type, int64_t stride,
                          int32_t d, float *const *out);

    // The forward's per-token element-wise work, bit for bit the scalar loops (scalar.cpp is the spec): every
    // element goes through the same IEEE operations in the same order, SIMD only adds lanes (no FMA).
    //   rms_norm:    out[i] = x[i] / sqrt(pairwise_sum(x[k] * x[k]) / n + eps) * w[i] (the sum in numpy's order)
    //   ffn_act_mul: gate[i] = act(gate[i]) * up[i]; act RYZ_ACT_RELU2: g > 0 ? g * g : 0,
    //                RYZ_ACT_SILU: g / (1 + exp(-g)) with exp in double rounded once (softmax_exp's exp)
    //   add:         x[i] += y[i] (the residuals)
    //   rope:        NEOX rotation of n_heads heads of vec ([n_heads][head_dim]) by one position's cos / sin
    //                ([head_dim / 2]): with a = v[i], b = v[i + half]: v[i] = a cos[i] - b sin[i],
    //                v[i + half] = b cos[i] + a sin[i]
    //   kv_store:    a row into the KV cache: dst[i] = src[i] as kv_type (RYZ_KV_F32 a copy; RYZ_KV_F16
    //                fp32_to_fp16: round to nearest even, subnormals kept, NaN -> sign | 0x7E00)
    //   linear_out:  a BitLinear's rescale: out[r] = float(acc[r]) / act_scale * w_scale
    // Null entries fall back to scalar's (forward.cpp), as ternary_gemm_t1p does.
    void (*rms_norm)(const float *x, const float *w, int64_t n, float eps, float *out);
    void (*ffn_act_mul)(float *gate, const float *up, int64_t n, int32_t act);
    void (*add)(float *x, const float *y, int64_t n);
    void (*rope)(float *vec, int32_t n_heads, int32_t head_dim, const float *cos, const float *sin);
    void (*kv_store)(const float *src, int64_t n, int32_t kv_type, void *dst);
    void (*linear_out)(const int32_t *acc, int64_t n, float act_scale, float w_scale, float *out);
};

const Kernels &kernels_scalar();
const Kernels *kernels_avx2();    // nullptr when not compiled in
const Kernels *kernels_avx512();  // nullptr when not compiled in
const Kernels *kernels_neon();    // nullptr when not compiled in
const Kernels *kernels_amx();     // nullptr when not compiled in (AVX-512's table, AMX-INT8 batched GEMM)

// numpy's pairwise summation (the order np.sum uses over a contiguous axis), so float sums here
// repeat the reference's bit for bit: below 8 terms a plain loop; up to 128 terms eight interleaved
// partial sums r[j] += term[8i + j] combined as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)), then the tail;
// above 128, the two halves (the first a multiple of 8 long) summed recursively.
template <typename Term>
float pairwise_sum(const Term &term, int64_t n, int64_t first = 0) {  // sums term(first .. first + n - 1)
    if (n < 8) {
        float res = 0.0f;
        for (int64_t i = 0; i < n; ++i) res += term(first + i);
        return res;
    }
    if (n <= 128) {
        float r[8];
        for (int j = 0; j < 8; ++j) r[j] = term(first + j);
        int64_t i = 8;
        for (; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; ++j) r[j] += term(first + i + j);
        float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; ++i) res += term(first + i);
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(term, n2, first) + pairwise_sum(term, n - n2, first + n2);
}

// K/V rows come from DRAM in decode (an 8-sequence step reads ~120 MB of them): the AVX2 and AVX-512 attention
// kernels prefetch the rows KV_PREFETCH_ROWS positions ahead, every 64-byte line of a row of d elements. On the Xeon
// of docs/kernels.md "Prefetch", an 8-sequence step's attention (AVX-512): 13.1-13.5 -> 9.2-9.6 ms with the head-major
// cache, 16.0 -> 10.4 ms with the earlier position-major one; 16 rows ahead measured the same ("K/V cache layout and
// prefetch"). A prefetch never faults; callers stay within the n_pos rows anyway.
constexpr int32_t KV_PREFETCH_ROWS = 8;
inline void prefetch_kv_row(const void *rows, int64_t row, int32_t d, int64_t elem_bytes) {
    const char *p = static_cast<const char *>(rows) + row * elem_bytes;
    for (int64_t b = 0; b < int64_t(d) * elem_bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
}

// The loop structure every SIMD ternary GEMM shares; only the inner kernels are the ISA's own.
// Decode (one token): `gemv(tile_weights, r)` writes the 4 outputs of the row tile starting at row r.
// Several tokens: `micro(n, tile_weights, t, r)` for n <= tile tokens starting at token t, nested so
// that the activations, which a micro call reads tile-times more of than weights, stay in L1:
//   token blocks of about GEMM_ACT_BLOCK_BYTES of activations (re-read from L2, not L3: 512 tokens x
//   6912 columns would be 3.5 MB)
//   > row groups of GEMM_ROW_GROUP_TILES row tiles (their weights, <= 56 KB, are re-read from L2)
//   > token tiles (<= 6 x 6912 bytes of activations, read from L1 by every row tile of the group)
//   > row tiles.
// A block's tokens are split into equal tiles (8 tokens with a tile of 6: 4 + 4, not 6 + 2, whose
// 2-token pass does as much unpacking per weight for a third of the products). token_tile < 1 picks
// `default_tile`; larger than `max_tile` acts as it. The sums are exact integers, so no ordering here
// changes a result.
constexpr int64_t GEMM_ACT_BLOCK_BYTES = 128 * 1024;
constexpr int64_t GEMM_ROW_GROUP_TILES = 8;

template <typename Gemv, typename Micro>
void ternary_gemm_tiles(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, int32_t n_tokens,
                        int32_t token_tile, int max_tile, int default_tile, int32_t *out, int64_t out_stride,
                        Gemv gemv, Micro micro) {
    const int64_t blocks = cols / QK_K;
    const int64_t tile_bytes = blocks * TILE_ROWS * T2P_BLOCK_BYTES;
    if (row_end <= row_begin || n_tokens < 1) return;
    if (blocks < 1) {  // empty rows: the sums are 0, as the scalar kernel writes
        for (int32_t t = 0; t < n_tokens; ++t)
            for (int64_t r = row_begin; r < row_end; ++r) out[t * out_stride + r] = 0;
        return;
    }
    if (n_tokens == 1) {
        for (int64_t r = row_begin; r < row_end; r += TILE_ROWS) gemv(packed + (r / TILE_ROWS) * tile_bytes, r);
        return;
    }
    const int tt = token_tile < 1 ? default_tile : std::min<int>(token_tile, max_tile);
    const int64_t token_block = std::max<int64_t>(tt, GEMM_ACT_BLOCK_BYTES / cols / tt * tt);
    const int64_t group_rows = GEMM_ROW_GROUP_TILES * TILE_ROWS;
    for (int64_t t0 = 0; t0 < n_tokens; t0 += token_block) {
        const int64_t in_block = std::min<int64_t>(n_tokens - t0, token_block);
        const int64_t n_tiles = (in_block + tt - 1) / tt;
        for (int64_t g = row_begin; g < row_end; g += group_rows) {
            const int64_t g_end = std::min<int64_t>(row_end, g + group_rows);
            for (int64_t k = 0; k < n_tiles; ++k) {
                const int64_t t = t0 + k * in_block / n_tiles, t_next = t0 + (k + 1) * in_block / n_tiles;
                for (int64_t r = g; r < g_end; r += TILE_ROWS)
                    micro(static_cast<int>(t_next - t), packed + (r / TILE_ROWS) * tile_bytes, t, r);
            }
        }
    }
}

// T1P GEMM through a family's T2P kernel (`t2p`, ternary_gemm's signature): per token block of about
// `act_block_bytes` of activations, each group of `group_rows` rows is expanded into T2P in `scratch`
// (group_rows / TILE_ROWS * cols bytes) by `expand`, then multiplied. `expand(packed, row_begin, row_end,
// cols, dst)` writes the T2P bytes (blocks.h) of T1P rows [row_begin, row_end) (whole tiles) to dst, whose
// tile 0 is row_begin's tile: the same codes+1, so the same GEMM integers.
// The expansion is paid once per (token block, row group), so it is amortised over the block's tokens.
template <typename Expand, typename T2pGemm>
void t1p_gemm_via_t2p(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, const int8_t *act,
                      const int32_t *act_sums, int32_t n_tokens, int32_t token_tile, int32_t *out, int64_t out_stride,
                      uint8_t *scratch, int64_t group_rows, int64_t act_block_bytes, Expand expand, T2pGemm t2p) {
    if (row_end <= row_begin || n_tokens < 1) return;
    const int64_t token_block = std::max<int64_t>(1, act_block_bytes / std::max<int64_t>(cols, 1));
    for (int64_t t0 = 0; t0 < n_tokens; t0 += token_block) {
        const int32_t n = static_cast<int32_t>(std::min<int64_t>(token_block, n_tokens - t0));
        for (int64_t g = row_begin; g < row_end; g += group_rows) {
            const int64_t g_end = std::min(row_end, g + group_rows);
            expand(packed, g, g_end, cols, scratch);
            t2p(scratch, 0, g_end - g, cols, act + t0 * cols, act_sums + t0, n, token_tile, out + t0 * out_stride + g, out_stride);
        }
    }
}

// Several tokens over T1P for a family with an expansion of its own: 32-row groups expanded into a
// per-thread buffer, then the family's T2P kernel (t1p_gemm_via_t2p).
template <typename Expand, typename T2pGemm>
void t1p_gemm_expanding(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, const int8_t *act,
                        const int32_t *act_sums, int32_t n_tokens, int32_t token_tile, int32_t *out, int64_t out_stride, Expand expand,
                        T2pGemm t2p) {
    constexpr int64_t group_rows = GEMM_ROW_GROUP_TILES * TILE_ROWS;
    thread_local std::vector<uint8_t> scratch;
    const size_t need = static_cast<size_t>(group_rows / TILE_ROWS * cols);
    if (scratch.size() < need) scratch.resize(need);
    t1p_gemm_via_t2p(packed, row_begin, row_end, cols, act, act_sums, n_tokens, token_tile, out, out_stride, scratch.data(), group_rows,
                     4 * GEMM_ACT_BLOCK_BYTES, expand, t2p);
}

// AVX-512's T1P -> T2P expansion (t1p_gemm_via_t2p's `expand`), which the AMX family's T1P GEMM uses too.
void t1p_to_t2p_avx512(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, uint8_t *dst);
// Its first half: one T1P row tile's code+1 bytes, row r's column c at codes[r * stride + c] (stride >= the
// tile's vectors x 80). The AMX family loads its A tiles from them directly.
void t1p_codes_avx512(const uint8_t *tile, int64_t nv, uint8_t *codes, int64_t stride);

// The AVX2 attention kernels, the AVX-512 family's fallback for head sizes its own do not cover.
void kv_dot_avx2(const float *q, const void *keys, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d, float *scores);
void kv_axpy_avx2(const float *probs, const void *values, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d, float *out);
// numpy's pairwise sum of x[0 .. n) in ymm lanes (pairwise_sum's order exactly), for the softmax of AVX2 and AVX-512.
float pairwise_sum_avx2(const float *x, int64_t n);
// The same order over x[i] * x[i] (rms_norm's sum of squares), for AVX2 and AVX-512.
float pairwise_sum_squares_avx2(const float *x, int64_t n);

// Shared scalar helpers (scalar.cpp), used by SIMD files for ragged tails and rare types.
void dense_gemm_scalar(const void *w, int32_t type, int64_t row_begin, int64_t row_end, int64_t cols,
                       const float *x, int32_t n_tokens, float *out, int64_t out_stride);
void dequantize_row(const void *w, int32_t type, int64_t row, int64_t cols, float *out);
size_t row_bytes(int32_t type, int64_t cols);

}  // namespace ryz

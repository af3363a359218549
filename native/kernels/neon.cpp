// NEON kernels (AArch64, Armv8.2-A with the dot-product extension; this file is built with
// -march=armv8.2-a+dotprod+fp16).
//
// Layouts (src/blocks.h; scalar.cpp is the spec):
//   T2P ternary: packed[tile][block][row][64], 4 rows per tile, one 64-byte block per 256 columns.
//     Byte j of a row's block holds code+1 of column 64l + j in bits 2l..2l+1, so the 16-byte slice
//     j0..j0+15 holds, in plane l, columns 64l + j0 .. 64l + j0 + 15: one q register of activations.
//   T1P ternary (TQ1_0 models): packed[tile][i][64], byte 16r + m of vector i holds 5 base-3 digits
//     (codes+1 of columns 80i + 16k + m of row r): a q register per row. Digits by compares.
//   Activations: int8, row-major [token][cols], plus act_sums[token] = the sum of that token's row.
//   Dense (head / embedding): ggml's F32, F16, Q8_0 and Q6_K rows, read in place.
//
// Ternary arithmetic: sdot (vdotq_s32) multiplies signed bytes by signed bytes and adds each group of
// 4 products to an int32 lane. The stored code+1 in {0,1,2} is a valid signed byte too, so, as on x86,
// the kernels multiply code+1 and subtract act_sums[t] once per output: sum (code_k+1) * a_k - sum a_k
// = sum code_k * a_k. That saves decoding every plane to -1/0/+1 (a vsub per 16 bytes; both are exact).
// The GEMV keeps planes 1 and 2 in place (x & 0x0C = 4 * code, x & 0x30 = 16 * code, both < 128 so
// still valid signed bytes) in their own accumulators, divided back exactly at the end; plane 3 is
// x >> 6 (0xC0 would read as negative). Bound: a lane adds cols/64 products of at most 48 * 128, so
// it stays below cols * 96 < 2^31. Exact integer arithmetic: bit-identical to the scalar kernel.
//
// Dense arithmetic: each weight dequantised with dequantize_row's operations; per row four float32x4
// accumulators A0..A3 where lane i of A_j takes the columns k = 4j + i (mod 16) in increasing order,
// with FMA; then (A1 + A3) + (A0 + A2) and the pairwise sum of the lanes (s0 + s2) + (s1 + s3). That
// is the AVX-512 kernels' lane assignment and GCC's _mm512_reduce_add_ps tree, so for the same
// dequantised values the two produce the same bits. A row's result depends only on the row and x.
#include <cmath>
#include <cstddef>
#include <cstring>
#include <vector>

#include "../include/ryz.h"
#include "../src/blocks.h"
#include "kernels.h"

#if defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#endif

namespace ryz {

#if defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)

namespace {

// ---------------------------------------------------------------------------------------------
// Ternary GEMV / GEMM
// ---------------------------------------------------------------------------------------------

inline int8x16_t s8(uint8x16_t v) { return vreinterpretq_s8_u8(v); }

// Decode: one tile (4 rows) against one token. Per 16-byte slice j of the block: the four activation
// vectors of that slice (one per plane) are loaded once and used by the 4 rows; per row one load,
// four plane ops (3 and + 1 shift) and four sdot into per-plane accumulators (16 in all: they also
// cover sdot latency).
inline int32x4_t gemv_tile(const uint8_t *w, int64_t blocks, const int8_t *act) {
    const uint8x16_t m03 = vdupq_n_u8(0x03), m0c = vdupq_n_u8(0x0C), m30 = vdupq_n_u8(0x30);
    int32x4_t acc[TILE_ROWS][4];
    for (int r = 0; r < TILE_ROWS; ++r)
        for (int l = 0; l < 4; ++l) acc[r][l] = vdupq_n_s32(0);
    for (int64_t b = 0; b < blocks; ++b, w += TILE_ROWS * T2P_BLOCK_BYTES, act += QK_K) {
        __builtin_prefetch(w + 2048);
        __builtin_prefetch(w + 2048 + 64);
        __builtin_prefetch(w + 2048 + 128);
        __builtin_prefetch(w + 2048 + 192);
        for (int j = 0; j < 4; ++j) {
            const int8x16_t a0 = vld1q_s8(act + 16 * j), a1 = vld1q_s8(act + 64 + 16 * j);
            const int8x16_t a2 = vld1q_s8(act + 128 + 16 * j), a3 = vld1q_s8(act + 192 + 16 * j);
            for (int r = 0; r < TILE_ROWS; ++r) {
                const uint8x16_t x = vld1q_u8(w + r * T2P_BLOCK_BYTES + 16 * j);
                acc[r][0] = vdotq_s32(acc[r][0], s8(vandq_u8(x, m03)), a0);
                acc[r][1] = vdotq_s32(acc[r][1], s8(vandq_u8(x, m0c)), a1);
                acc[r][2] = vdotq_s32(acc[r][2], s8(vandq_u8(x, m30)), a2);
                acc[r][3] = vdotq_s32(acc[r][3], s8(vshrq_n_u8(x, 6)), a3);
            }
        }
    }
    int32_t s[TILE_ROWS];
    for (int r = 0; r < TILE_ROWS; ++r) {
        const int32x4_t v = vaddq_s32(vaddq_s32(acc[r][0], vshrq_n_s32(acc[r][1], 2)), vaddq_s32(vshrq_n_s32(acc[r][2], 4), acc[r][3]));
        s[r] = vaddvq_s32(v);
    }
    return vld1q_s32(s);
}

// Prefill / batched decode: one tile (4 rows) times T tokens in 4T accumulators (32 q registers:
// 4 raw slices + 4 planes + 4T accumulators + activation + mask, so T <= 4). Each plane is unpacked
// (shift + and) once per slice and reused by the T tokens.
template <int T>
void gemm_micro(const uint8_t *w, int64_t blocks, int64_t cols, const int8_t *act, const int32_t *sums, int32_t *out,
                int64_t out_stride) {
    const uint8x16_t m03 = vdupq_n_u8(0x03);
    int32x4_t acc[TILE_ROWS][T];
    for (int r = 0; r < TILE_ROWS; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = vdupq_n_s32(0);
    for (int64_t b = 0; b < blocks; ++b, w += TILE_ROWS * T2P_BLOCK_BYTES, act += QK_K) {
        for (int j = 0; j < 4; ++j) {
            uint8x16_t x[TILE_ROWS];
            for (int r = 0; r < TILE_ROWS; ++r) x[r] = vld1q_u8(w + r * T2P_BLOCK_BYTES + 16 * j);
            for (int l = 0; l < 4; ++l) {
                int8x16_t p[TILE_ROWS];
                for (int r = 0; r < TILE_ROWS; ++r) {
                    uint8x16_t v;
                    switch (l) {  // constant after unrolling
                        case 0: v = vandq_u8(x[r], m03); break;
                        case 1: v = vandq_u8(vshrq_n_u8(x[r], 2), m03); break;
                        case 2: v = vandq_u8(vshrq_n_u8(x[r], 4), m03); break;
                        default: v = vshrq_n_u8(x[r], 6); break;
                    }
                    p[r] = s8(v);
                }
                for (int t = 0; t < T; ++t) {
                    const int8x16_t a = vld1q_s8(act + t * cols + 64 * l + 16 * j);
                    for (int r = 0; r < TILE_ROWS; ++r) acc[r][t] = vdotq_s32(acc[r][t], p[r], a);
                }
            }
        }
    }
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < TILE_ROWS; ++r) out[t * out_stride + r] = vaddvq_s32(acc[r][t]) - sums[t];
}

using MicroFn = void (*)(const uint8_t *, int64_t, int64_t, const int8_t *, const int32_t *, int32_t *, int64_t);

// Token tiles 1..4; larger requests act as 4 (the default).
constexpr int MAX_TOKEN_TILE = 4;
constexpr int DEFAULT_TOKEN_TILE = 4;
const MicroFn MICRO[MAX_TOKEN_TILE + 1] = {nullptr, gemm_micro<1>, gemm_micro<2>, gemm_micro<3>, gemm_micro<4>};

void ternary_gemm_neon(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, const int8_t *act,
                       const int32_t *act_sums, int32_t n_tokens, int32_t token_tile, int32_t *out, int64_t out_stride) {
    const int64_t blocks = cols / QK_K;
    ternary_gemm_tiles(packed, row_begin, row_end, cols, n_tokens, token_tile, MAX_TOKEN_TILE, DEFAULT_TOKEN_TILE, out, out_stride,
        [&](const uint8_t *w, int64_t r) { vst1q_s32(out + r, vsubq_s32(gemv_tile(w, blocks, act), vdupq_n_s32(act_sums[0]))); },
        [&](int n, const uint8_t *w, int64_t t, int64_t r) { MICRO[n](w, blocks, cols, act + t * cols, act_sums + t, out + t * out_stride + r, out_stride); });
}

// ---------------------------------------------------------------------------------------------
// Ternary GEMV / GEMM over T1P (1.6 bpw, blocks.h; scalar spec: ternary_gemm_t1p_scalar)
// ---------------------------------------------------------------------------------------------

// Digits by compares: digit k of a byte q is d_k = [q_k >= 86] + [q_k >= 171] with q_k = 3^k q mod 256
// (a wrapping byte multiply per step). The two masks (0 or -1) added give -d_k; sdot of -d_k by int8
// is exact (4 products of at most 2 x 128 per lane and digit).
inline int8x16_t t1p_neg_digits(uint8x16_t q) { return s8(vaddq_u8(vcgeq_u8(q, vdupq_n_u8(86)), vcgeq_u8(q, vdupq_n_u8(171)))); }

// Decode over one T1P row tile: byte 16r + m of a vector is row r, so each row is one q register and
// each digit plane's 16 activations are loaded once for the 4 rows. Two accumulators per row (even and
// odd digits) keep 8 sdot chains in flight; a lane adds at most 5 x 4 x 256 per vector.
inline int32x4_t gemv_t1p_tile(const uint8_t *w, int64_t nv, int64_t cols, const int8_t *act) {
    const uint8x16_t three = vdupq_n_u8(3);
    int32x4_t acc[TILE_ROWS][2];
    for (int r = 0; r < TILE_ROWS; ++r) acc[r][0] = acc[r][1] = vdupq_n_s32(0);
    auto vector = [&](const uint8_t *p, const int8_t *a, int groups) {
        uint8x16_t q[TILE_ROWS];
        for (int r = 0; r < TILE_ROWS; ++r) q[r] = vld1q_u8(p + 16 * r);
        for (int k = 0; k < groups; ++k) {
            const int8x16_t ak = vld1q_s8(a + 16 * k);
            for (int r = 0; r < TILE_ROWS; ++r) {
                acc[r][k & 1] = vdotq_s32(acc[r][k & 1], t1p_neg_digits(q[r]), ak);
                q[r] = vmulq_u8(q[r], three);
            }
        }
    };
    const int64_t full = nv - 1;  // the last vector may have fewer digit groups with columns
    for (int64_t i = 0; i < full; ++i) {
        __builtin_prefetch(w + i * T1P_VECTOR_BYTES + 2048);
        vector(w + i * T1P_VECTOR_BYTES, act + i * T1P_VECTOR_COLS, 5);
    }
    vector(w + full * T1P_VECTOR_BYTES, act + full * T1P_VECTOR_COLS, static_cast<int>((cols - full * T1P_VECTOR_COLS) / 16));
    int32_t s[TILE_ROWS];
    for (int r = 0; r < TILE_ROWS; ++r) s[r] = -vaddvq_s32(vaddq_s32(acc[r][0], acc[r][1]));
    return vld1q_s32(s);
}

// T1P rows [row_begin, row_end) -> T2P at dst (t1p_gemm_via_t2p's `expand`): the GEMV's digits into
// per-row code bytes, then four code planes per T2P block.
void t1p_to_t2p_neon(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, uint8_t *dst) {
    const int64_t nv = t1p_vectors(cols), blocks = cols / QK_K, stride = nv * T1P_VECTOR_COLS;
    thread_local std::vector<uint8_t> codes;
    if (codes.size() < static_cast<size_t>(TILE_ROWS * stride)) codes.resize(static_cast<size_t>(TILE_ROWS * stride));
    const uint8x16_t three = vdupq_n_u8(3);
    for (int64_t r0 = row_begin; r0 < row_end; r0 += TILE_ROWS) {
        const uint8_t *p = packed + (r0 / TILE_ROWS) * nv * T1P_VECTOR_BYTES;
        for (int64_t i = 0; i < nv; ++i)
            for (int r = 0; r < TILE_ROWS; ++r) {
                uint8x16_t q = vld1q_u8(p + i * T1P_VECTOR_BYTES + 16 * r);
                for (int k = 0; k < 5; ++k) {
                    vst1q_s8(reinterpret_cast<int8_t *>(codes.data() + r * stride + i * T1P_VECTOR_COLS + 16 * k), vnegq_s8(t1p_neg_digits(q)));
                    q = vmulq_u8(q, three);
                }
            }
        uint8_t *o = dst + (r0 - row_begin) / TILE_ROWS * blocks * TILE_ROWS * T2P_BLOCK_BYTES;
        for (int64_t b = 0; b < blocks; ++b)
            for (int r = 0; r < TILE_ROWS; ++r, o += T2P_BLOCK_BYTES)
                for (int j = 0; j < 4; ++j) {
                    const uint8_t *c = codes.data() + r * stride + b * QK_K + 16 * j;
                    vst1q_u8(o + 16 * j, vorrq_u8(vorrq_u8(vld1q_u8(c), vshlq_n_u8(vld1q_u8(c + 64), 2)),
                                                  vorrq_u8(vshlq_n_u8(vld1q_u8(c + 128), 4), vshlq_n_u8(vld1q_u8(c + 192), 6))));
                }
    }
}

// Decode: the GEMV above per row tile. Several tokens: 32-row groups expanded to T2P once per block
// of activations (t1p_gemm_via_t2p), then the T2P kernels; the same integers either way.
void ternary_gemm_t1p_neon(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, const int8_t *act,
                           const int32_t *act_sums, int32_t n_tokens, int32_t token_tile, int32_t *out, int64_t out_stride) {
    if (row_end <= row_begin || n_tokens < 1) return;
    if (n_tokens == 1) {
        const int64_t nv = t1p_vectors(cols);
        for (int64_t r = row_begin; r < row_end; r += TILE_ROWS)
            vst1q_s32(out + r, vsubq_s32(gemv_t1p_tile(packed + (r / TILE_ROWS) * nv * T1P_VECTOR_BYTES, nv, cols, act), vdupq_n_s32(act_sums[0])));
        return;
    }
    t1p_gemm_expanding(packed, row_begin, row_end, cols, act, act_sums, n_tokens, token_tile, out, out_stride, t1p_to_t2p_neon, ternary_gemm_neon);
}

// ---------------------------------------------------------------------------------------------
// Dense GEMM (output head, embedding)
// ---------------------------------------------------------------------------------------------

inline float half_to_float(fp16_t h) {
    __fp16 v;
    std::memcpy(&v, &h, sizeof v);
    return static_cast<float>(v);  // exact
}

// 16 dequantised columns of a row as four vectors (columns k + 4j .. k + 4j + 3 in w[j]).
struct Chunk {
    float32x4_t w[4];
};

inline Chunk widen_scaled(int8x16_t q, float scale) {  // scale * q, one rounding, as dequantize_row
    const int16x8_t lo = vmovl_s8(vget_low_s8(q)), hi = vmovl_s8(vget_high_s8(q));
    const float32x4_t s = vdupq_n_f32(scale);
    return {{vmulq_f32(s, vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)))), vmulq_f32(s, vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo)))),
             vmulq_f32(s, vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)))), vmulq_f32(s, vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi))))}};
}

struct DecodeF32 {
    static constexpr bool ragged = true;  // rows may end in a partial chunk
    static Chunk chunk(const uint8_t *row, int64_t k) {
        const float *p = reinterpret_cast<const float *>(row) + k;
        return {{vld1q_f32(p), vld1q_f32(p + 4), vld1q_f32(p + 8), vld1q_f32(p + 12)}};
    }
};
struct DecodeF16 {
    static constexpr bool ragged = true;
    static Chunk chunk(const uint8_t *row, int64_t k) {
        const float16_t *p = reinterpret_cast<const float16_t *>(row) + k;
        const float16x8_t a = vld1q_f16(p), b = vld1q_f16(p + 8);
        return {{vcvt_f32_f16(vget_low_f16(a)), vcvt_high_f32_f16(a), vcvt_f32_f16(vget_low_f16(b)), vcvt_high_f32_f16(b)}};
    }
};
struct DecodeQ8_0 {  // d * q: exact in float
    static constexpr bool ragged = false;
    static Chunk chunk(const uint8_t *row, int64_t k) {
        const block_q8_0 *blk = reinterpret_cast<const block_q8_0 *>(row) + k / QK8_0;
        return widen_scaled(vld1q_s8(blk->qs + k % QK8_0), half_to_float(blk->d));
    }
};
// Q6_K chunk c of a block (16 columns, one sub-block scale): half h = c / 8, ggml group g = (c % 8) / 2
// and part s = c % 2:  g = 0: ql[l] & 15, qh bits 0..1;  1: ql[l+32] & 15, bits 2..3;  2: ql[l] >> 4,
// bits 4..5;  3: ql[l+32] >> 4, bits 6..7;  l = 16 s + 0..15;  value (d * sc[8h + 2g + s]) * (q - 32).
struct DecodeQ6_K {
    static constexpr bool ragged = false;
    static Chunk chunk(const uint8_t *row, int64_t k) {
        const block_q6_k *blk = reinterpret_cast<const block_q6_k *>(row) + k / QK_K;
        const int c = static_cast<int>(k % QK_K) / 16, h = c / 8, g = (c % 8) / 2, s = c % 2;
        const uint8x16_t ql = vld1q_u8(blk->ql + 64 * h + 32 * (g & 1) + 16 * s);
        const uint8x16_t qh = vld1q_u8(blk->qh + 32 * h + 16 * s);
        const uint8x16_t lo = (g & 2) ? vshrq_n_u8(ql, 4) : vandq_u8(ql, vdupq_n_u8(0x0F));
        const uint8x16_t hi = vandq_u8(vshlq_u8(qh, vdupq_n_s8(static_cast<int8_t>(-2 * g))), vdupq_n_u8(3));
        const int8x16_t q = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(lo, vshlq_n_u8(hi, 4))), vdupq_n_s8(32));
        return widen_scaled(q, half_to_float(blk->d) * static_cast<float>(blk->scales[8 * h + 2 * g + s]));
    }
};

// The fixed reduction: (A1 + A3) + (A0 + A2), then (s0 + s2) + (s1 + s3) (see the header).
inline float reduce16(const float32x4_t (&a)[4]) {
    const float32x4_t s = vaddq_f32(vaddq_f32(a[3], a[1]), vaddq_f32(a[2], a[0]));
    const float32x2_t t = vadd_f32(vget_high_f32(s), vget_low_f32(s));
    return vget_lane_f32(t, 0) + vget_lane_f32(t, 1);
}

// 4 rows per pass (16 accumulators), one token per pass over them; rows past the end of the range
// repeat the last row and are discarded. A ragged F32/F16 column tail goes through a zero-padded
// copy, and lanes past the end keep their accumulator (vbsl).
template <class D>
void dense_typed(const uint8_t *w, size_t rb, int64_t row_begin, int64_t row_end, int64_t cols, const float *x,
                 int32_t n_tokens, float *out, int64_t out_stride, int es) {
    constexpr int R = 4;
    const int64_t full = cols / 16 * 16;
    for (int64_t r0 = row_begin; r0 < row_end; r0 += R) {
        const int n_rows = static_cast<int>(row_end - r0 < R ? row_end - r0 : R);
        const uint8_t *rows[R];
        for (int i = 0; i < R; ++i) rows[i] = w + static_cast<size_t>(r0 + (i < n_rows ? i : n_rows - 1)) * rb;
        for (int32_t t = 0; t < n_tokens; ++t) {
            const float *xt = x + t * cols;
            float32x4_t acc[R][4];
            for (int r = 0; r < R; ++r)
                for (int j = 0; j < 4; ++j) acc[r][j] = vdupq_n_f32(0.0f);
            for (int64_t k = 0; k < full; k += 16) {
                const int64_t pf = k * static_cast<int64_t>(rb) / cols + 1024;  // the row's byte offset of column k, ahead
                for (int r = 0; r < R; ++r) __builtin_prefetch(rows[r] + pf);
                const float32x4_t x0 = vld1q_f32(xt + k), x1 = vld1q_f32(xt + k + 4), x2 = vld1q_f32(xt + k + 8), x3 = vld1q_f32(xt + k + 12);
                for (int r = 0; r < R; ++r) {
                    const Chunk c = D::chunk(rows[r], k);
                    acc[r][0] = vfmaq_f32(acc[r][0], c.w[0], x0);
                    acc[r][1] = vfmaq_f32(acc[r][1], c.w[1], x1);
                    acc[r][2] = vfmaq_f32(acc[r][2], c.w[2], x2);
                    acc[r][3] = vfmaq_f32(acc[r][3], c.w[3], x3);
                }
            }
            if constexpr (D::ragged) {  // F32 / F16 only: quantised rows are whole blocks
              if (full < cols) {
                const int n = static_cast<int>(cols - full);
                float xb[16] = {};
                std::memcpy(xb, xt + full, static_cast<size_t>(n) * 4);
                for (int r = 0; r < R; ++r) {
                    alignas(16) uint8_t wb[64] = {};
                    std::memcpy(wb, rows[r] + full * es, static_cast<size_t>(n) * es);
                    const Chunk c = D::chunk(wb, 0);
                    for (int j = 0; j < 4; ++j) {
                        const int32_t lanes[4] = {4 * j, 4 * j + 1, 4 * j + 2, 4 * j + 3};
                        const uint32x4_t keep = vcltq_s32(vld1q_s32(lanes), vdupq_n_s32(n));
                        acc[r][j] = vbslq_f32(keep, vfmaq_f32(acc[r][j], c.w[j], vld1q_f32(xb + 4 * j)), acc[r][j]);
                    }
                }
              }
            }
            for (int r = 0; r < n_rows; ++r) out[t * out_stride + r0 + r] = reduce16(acc[r]);
        }
    }
}

void dense_gemm_neon(const void *w, int32_t type, int64_t row_begin, int64_t row_end, int64_t cols, const float *x,
                     int32_t n_tokens, float *out, int64_t out_stride) {
    const uint8_t *base = static_cast<const uint8_t *>(w);
    const size_t rb = row_bytes(type, cols);
    switch (type) {
        case RYZ_TYPE_F32: dense_typed<DecodeF32>(base, rb, row_begin, row_end, cols, x, n_tokens, out, out_stride, 4); break;
        case RYZ_TYPE_F16: dense_typed<DecodeF16>(base, rb, row_begin, row_end, cols, x, n_tokens, out, out_stride, 2); break;
        // es: element size for the ragged-tail copy, which only F32 / F16 rows can have
        case RYZ_TYPE_Q8_0: dense_typed<DecodeQ8_0>(base, rb, row_begin, row_end, cols, x, n_tokens, out, out_stride, 1); break;
        case RYZ_TYPE_Q6_K: dense_typed<DecodeQ6_K>(base, rb, row_begin, row_end, cols, x, n_tokens, out, out_stride, 1); break;
        default: dense_gemm_scalar(w, type, row_begin, row_end, cols, x, n_tokens, out, out_stride); break;
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantisation
// ---------------------------------------------------------------------------------------------

// Bit-identical to quantize_act_scalar: fmaxnm / fminnm are IEEE maxNum / minNum like fmax / fmin
// (a quiet NaN loses to a number), so a NaN |x| leaves the running max alone and a NaN product is
// clamped to -128 as in the scalar code; max is exact and order-free; same scalar scale; one rounded
// multiply; frintn rounds half to even like rint in the default mode; fcvtzs of an integral in-range
// value is exact. The ragged tail runs the scalar expressions.
void quantize_act_neon(const float *x, int64_t cols, int8_t *q, float *scale, int32_t *sum) {
    float32x4_t m0 = vdupq_n_f32(0.0f), m1 = m0;
    int64_t k = 0;
    for (; k + 8 <= cols; k += 8) {
        m0 = vmaxnmq_f32(m0, vabsq_f32(vld1q_f32(x + k)));
        m1 = vmaxnmq_f32(m1, vabsq_f32(vld1q_f32(x + k + 4)));
    }
    float amax = vmaxnmvq_f32(vmaxnmq_f32(m0, m1));
    for (; k < cols; ++k) amax = std::fmax(amax, std::fabs(x[k]));
    const float s = 127.0f / std::fmax(amax, 1e-5f);
    const float32x4_t lo = vdupq_n_f32(-128.0f), hi = vdupq_n_f32(127.0f);
    int32x4_t total = vdupq_n_s32(0);
    auto quant4 = [&](const float *p) {
        const float32x4_t v = vrndnq_f32(vmulq_f32(vld1q_f32(p), vdupq_n_f32(s)));
        return vcvtq_s32_f32(vminnmq_f32(vmaxnmq_f32(v, lo), hi));
    };
    for (k = 0; k + 16 <= cols; k += 16) {
        const int32x4_t i0 = quant4(x + k), i1 = quant4(x + k + 4), i2 = quant4(x + k + 8), i3 = quant4(x + k + 12);
        total = vaddq_s32(vaddq_s32(total, vaddq_s32(i0, i1)), vaddq_s32(i2, i3));
        const int16x8_t a = vcombine_s16(vmovn_s32(i0), vmovn_s32(i1)), b = vcombine_s16(vmovn_s32(i2), vmovn_s32(i3));
        vst1q_s8(q + k, vcombine_s8(vmovn_s16(a), vmovn_s16(b)));
    }
    int32_t acc = vaddvq_s32(total);
    for (; k < cols; ++k) {
        const float v = std::fmin(std::fmax(std::rint(x[k] * s), -128.0f), 127.0f);
        q[k] = static_cast<int8_t>(v);
        acc += q[k];
    }
    *scale = s;
    *sum = acc;
}

// ---------------------------------------------------------------------------------------------
// Element-wise (kernels.h; scalar.cpp the spec): per element the scalar loop's operations in its order,
// 4 lanes at a time (no FMA: -ffp-contract=off and explicit vmul + vadd), ragged ends in scalar.
// ---------------------------------------------------------------------------------------------

// numpy's pairwise sum of x[i] * x[i] (kernels.h's pairwise_sum): its eight partial sums are two q registers.
float pairwise_sum_squares_neon(const float *x, int64_t n) {
    if (n < 8) {
        float res = 0.0f;
        for (int64_t i = 0; i < n; ++i) res += x[i] * x[i];
        return res;
    }
    if (n <= 128) {
        float32x4_t a = vld1q_f32(x), b = vld1q_f32(x + 4);
        a = vmulq_f32(a, a);
        b = vmulq_f32(b, b);
        int64_t i = 8;
        for (; i < n - (n % 8); i += 8) {
            const float32x4_t c = vld1q_f32(x + i), d = vld1q_f32(x + i + 4);
            a = vaddq_f32(a, vmulq_f32(c, c));
            b = vaddq_f32(b, vmulq_f32(d, d));
        }
        float l[8];
        vst1q_f32(l, a);
        vst1q_f32(l + 4, b);
        float res = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
        for (; i < n; ++i) res += x[i] * x[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum_squares_neon(x, n2) + pairwise_sum_squares_neon(x + n2, n - n2);
}

void rms_norm_neon(const float *x, const float *w, int64_t n, float eps, float *out) {
    const float denom = std::sqrt(pairwise_sum_squares_neon(x, n) / static_cast<float>(n) + eps);
    const float32x4_t dv = vdupq_n_f32(denom);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(out + i, vmulq_f32(vdivq_f32(vld1q_f32(x + i), dv), vld1q_f32(w + i)));
    for (; i < n; ++i) out[i] = x[i] / denom * w[i];
}

// relu^2 in lanes (fcmgt is false for NaN: +0, as the scalar's 0.0f); SiLU keeps the scalar loop (exp in double).
void ffn_act_mul_neon(float *gate, const float *up, int64_t n, int32_t act) {
    int64_t i = 0;
    if (act == RYZ_ACT_RELU2) {
        for (; i + 4 <= n; i += 4) {
            const float32x4_t g = vld1q_f32(gate + i);
            const uint32x4_t pos = vcgtq_f32(g, vdupq_n_f32(0.0f));
            const float32x4_t a = vreinterpretq_f32_u32(vandq_u32(pos, vreinterpretq_u32_f32(vmulq_f32(g, g))));
            vst1q_f32(gate + i, vmulq_f32(a, vld1q_f32(up + i)));
        }
    }
    if (i < n) kernels_scalar().ffn_act_mul(gate + i, up + i, n - i, act);
}

void add_neon(float *x, const float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(x + i, vaddq_f32(vld1q_f32(x + i), vld1q_f32(y + i)));
    for (; i < n; ++i) x[i] += y[i];
}

void rope_neon(float *vec, int32_t n_heads, int32_t head_dim, const float *cs, const float *sn) {
    const int32_t half = head_dim / 2;
    for (int32_t h = 0; h < n_heads; ++h) {
        float *v = vec + int64_t(h) * head_dim;
        int32_t i = 0;
        for (; i + 4 <= half; i += 4) {
            const float32x4_t a = vld1q_f32(v + i), b = vld1q_f32(v + i + half), c = vld1q_f32(cs + i), s = vld1q_f32(sn + i);
            vst1q_f32(v + i, vsubq_f32(vmulq_f32(a, c), vmulq_f32(b, s)));
            vst1q_f32(v + i + half, vaddq_f32(vmulq_f32(b, c), vmulq_f32(a, s)));
        }
        for (; i < half; ++i) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cs[i] - b * sn[i];
            v[i + half] = b * cs[i] + a * sn[i];
        }
    }
}

// fcvtn rounds to nearest even (FPCR's default mode) with subnormal halves; a NaN keeps its top payload bits
// there, so NaN lanes are cut to sign | 0x7E00, fp32_to_fp16's NaN.
void kv_store_neon(const float *src, int64_t n, int32_t kv_type, void *dst) {
    if (kv_type == RYZ_KV_F32) {
        std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n));
        return;
    }
    fp16_t *h = static_cast<fp16_t *>(dst);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t v = vld1q_f32(src + i);
        const uint16x4_t r = vreinterpret_u16_f16(vcvt_f16_f32(v));
        const uint16x4_t nan = vmovn_u32(vmvnq_u32(vceqq_f32(v, v)));
        vst1_u16(h + i, vbic_u16(r, vand_u16(nan, vdup_n_u16(0x01FF))));
    }
    for (; i < n; ++i) h[i] = fp32_to_fp16(src[i]);
}

void linear_out_neon(const int32_t *acc, int64_t n, float act_scale, float w_scale, float *out) {
    const float32x4_t as = vdupq_n_f32(act_scale), ws = vdupq_n_f32(w_scale);
    int64_t r = 0;
    for (; r + 4 <= n; r += 4) vst1q_f32(out + r, vmulq_f32(vdivq_f32(vcvtq_f32_s32(vld1q_s32(acc + r)), as), ws));  // scvtf: nearest even
    for (; r < n; ++r) out[r] = static_cast<float>(acc[r]) / act_scale * w_scale;
}

}  // namespace

const Kernels *kernels_neon() {
    // kv_dot / kv_axpy and the softmax left null: forward.cpp falls back to the scalar ones.
    static const Kernels k{RYZ_ISA_NEON, ternary_gemm_neon, dense_gemm_neon, quantize_act_neon, nullptr, nullptr,
                           ternary_gemm_t1p_neon, nullptr, nullptr, nullptr, nullptr,
                           rms_norm_neon, ffn_act_mul_neon, add_neon, rope_neon, kv_store_neon, linear_out_neon};
    return &k;
}

#else

const Kernels *kernels_neon() { return nullptr; }

#endif

}  // namespace ryz

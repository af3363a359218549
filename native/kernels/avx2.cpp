// AVX2 kernels (AVX2, FMA, F16C; this file alone is built with those flags).
//
// Layouts (src/blocks.h; scalar.cpp is the spec):
//   T2P ternary: packed[tile][block][row][64], 4 rows per tile, one 64-byte block per 256 columns.
//     Byte j of a row's block holds code+1 of column 64l + j in bits 2l..2l+1. A 32-byte half h of
//     the block (bytes 32h..32h+31) therefore holds, in plane l, columns 64l + 32h + 0..31: one ymm of
//     activations per plane and half.
//   T1P ternary (TQ1_0 models): packed[tile][i][64], byte 16r + m of vector i holds 5 base-3 digits
//     (codes+1 of columns 80i + 16k + m of row r); a ymm half of a vector is rows 0-1 or 2-3, one
//     128-bit lane per row. Digits are made by compares (gemv_t1p_tile).
//   Activations: int8, row-major [token][cols], plus act_sums[token] = the sum of that token's row.
//   Dense (head / embedding): ggml's F32, F16, Q8_0 and Q6_K rows, read in place.
//
// Ternary arithmetic: vpmaddubsw multiplies unsigned bytes (the stored code+1) by signed bytes (the
// activations) and adds adjacent pairs into int16, saturating. Then vpmaddwd with ones widens pairs
// of int16 into int32 lanes. sum (code_k+1) * a_k - act_sums[t] = sum code_k * a_k, as in the
// AVX-512 file. Planes are not shifted down one by one: with y = x >> 4 (one vpsrlw per 32 bytes),
//   plane 0 = x & 0x03, plane 1 = x & 0x0C (= 4 * code), plane 2 = y & 0x03, plane 3 = y & 0x0C (4x),
// and per row and half  s = 4 * (maddubs(p0) + maddubs(p2)) + (maddubs(p1) + maddubs(p3)),  which is
// 4 times the true partial sum; the int32 total is divided by 4 at the end (exact: every term is a
// multiple of 4).
// No saturation or wrap-around, even for the unused 2-bit code 3 that a TQ2_0 file could carry:
//   one vpmaddubsw pair:   |u0*a0 + u1*a1| <= 2 * 12 * 128 = 3072  (u <= 12 for a scaled plane,
//                          <= 3 unscaled: 768)  < 32767, so vpmaddubsw never saturates;
//   unscaled sum of 2:     <= 1536, times 4: <= 6144;  scaled sum of 2: <= 6144;  s <= 12288;
//   per row over a block (two halves): <= 24576 < 32767; then vpmaddwd (exact) adds 2 of those per
//   int32 lane and block: lanes stay below cols * 192 < 2^31.
// All exact integer arithmetic: the result equals the scalar kernel's bit for bit.
//
// Dense arithmetic: as in avx512.cpp: each weight dequantised with dequantize_row's operations, FMA
// into per-row accumulators with the AVX-512 kernels' 16-lane assignment (two ymm) and reduction
// tree, so AVX2, AVX-512 and NEON return the same bits. A row's result depends only on the row and x.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <vector>

#include "../include/ryz.h"
#include "../src/blocks.h"
#include "kernels.h"

namespace ryz {

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

namespace {

// ---------------------------------------------------------------------------------------------
// Ternary GEMV / GEMM
// ---------------------------------------------------------------------------------------------

// Lane i of the result = sum of the lanes of a_i (integers: order-free).
inline __m128i hsum4_epi32(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
    const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

inline __m256i load32(const void *p) { return _mm256_loadu_si256(static_cast<const __m256i *>(p)); }

// One 32-byte half of a row's block against one token's activations for that block (a points at
// column 32h of the block): returns the int32 partial sums, 4x the true value (see the header).
struct Planes {
    __m256i p0, p1, p2, p3;
};
inline Planes unpack(__m256i x, __m256i m03, __m256i m0c) {
    const __m256i y = _mm256_srli_epi16(x, 4);  // bits leaking in from the high byte are masked off
    return {_mm256_and_si256(x, m03), _mm256_and_si256(x, m0c), _mm256_and_si256(y, m03), _mm256_and_si256(y, m0c)};
}
inline __m256i half_dot(const Planes &p, const int8_t *a, __m256i ones) {
    const __m256i x1 = _mm256_add_epi16(_mm256_maddubs_epi16(p.p0, load32(a)), _mm256_maddubs_epi16(p.p2, load32(a + 128)));
    const __m256i x4 = _mm256_add_epi16(_mm256_maddubs_epi16(p.p1, load32(a + 64)), _mm256_maddubs_epi16(p.p3, load32(a + 192)));
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_slli_epi16(x1, 2), x4), ones);
}

// Decode: one tile (4 rows) against one token. Per row and block: 2 loads, 2 shifts, 8 ands, 8
// vpmaddubsw (activations as memory operands; the 8 activation vectors of a block are shared by the
// tile's 4 rows through L1), 8 int16 adds, one vpmaddwd. The two halves are summed in int16 before
// widening (bound above). Software prefetch as in the AVX-512 GEMV.
constexpr int64_t GEMV_PREFETCH = 4096;

inline __m128i gemv_tile(const uint8_t *w, int64_t blocks, const int8_t *act) {
    const __m256i m03 = _mm256_set1_epi8(0x03), m0c = _mm256_set1_epi8(0x0C), ones = _mm256_set1_epi16(1);
    __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    for (int64_t b = 0; b < blocks; ++b, w += TILE_ROWS * T2P_BLOCK_BYTES, act += QK_K) {
        for (int r = 0; r < TILE_ROWS; ++r) _mm_prefetch(reinterpret_cast<const char *>(w + GEMV_PREFETCH + r * 64), _MM_HINT_T0);
#define RYZ_ROW(r, acc)                                                                                                  \
        {                                                                                                                \
            const Planes lo = unpack(load32(w + r * T2P_BLOCK_BYTES), m03, m0c);                                         \
            const Planes hi = unpack(load32(w + r * T2P_BLOCK_BYTES + 32), m03, m0c);                                    \
            const __m256i x1 = _mm256_add_epi16(                                                                         \
                _mm256_add_epi16(_mm256_maddubs_epi16(lo.p0, load32(act)), _mm256_maddubs_epi16(lo.p2, load32(act + 128))), \
                _mm256_add_epi16(_mm256_maddubs_epi16(hi.p0, load32(act + 32)), _mm256_maddubs_epi16(hi.p2, load32(act + 160)))); \
            const __m256i x4 = _mm256_add_epi16(                                                                         \
                _mm256_add_epi16(_mm256_maddubs_epi16(lo.p1, load32(act + 64)), _mm256_maddubs_epi16(lo.p3, load32(act + 192))), \
                _mm256_add_epi16(_mm256_maddubs_epi16(hi.p1, load32(act + 96)), _mm256_maddubs_epi16(hi.p3, load32(act + 224)))); \
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_add_epi16(_mm256_slli_epi16(x1, 2), x4), ones));        \
        }
        RYZ_ROW(0, acc0) RYZ_ROW(1, acc1) RYZ_ROW(2, acc2) RYZ_ROW(3, acc3)
#undef RYZ_ROW
    }
    return _mm_srai_epi32(hsum4_epi32(acc0, acc1, acc2, acc3), 2);
}

// Prefill / batched decode: one row times T tokens (16 ymm registers: 4 planes + T accumulators +
// 3 constants + temporaries, so T <= 6 and one row at a time). The planes of each 32-byte half are
// unpacked once and reused by the T tokens; the tile's 4 rows run one after another over the same
// activations, which stay in L1.
template <int T>
void gemm_micro(const uint8_t *w, int64_t blocks, int64_t cols, const int8_t *act, const int32_t *sums, int32_t *out,
                int64_t out_stride) {
    const __m256i m03 = _mm256_set1_epi8(0x03), m0c = _mm256_set1_epi8(0x0C), ones = _mm256_set1_epi16(1);
    __m256i acc[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_si256();
    for (int64_t b = 0; b < blocks; ++b, w += TILE_ROWS * T2P_BLOCK_BYTES, act += QK_K) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            const Planes p = unpack(load32(w + 32 * h), m03, m0c);
#pragma GCC unroll 8
            for (int t = 0; t < T; ++t) acc[t] = _mm256_add_epi32(acc[t], half_dot(p, act + t * cols + 32 * h, ones));
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
        const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc[t]), _mm256_extracti128_si256(acc[t], 1));
        const __m128i s2 = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        out[t * out_stride] = (_mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1))) >> 2) - sums[t];
    }
}

using MicroFn = void (*)(const uint8_t *, int64_t, int64_t, const int8_t *, const int32_t *, int32_t *, int64_t);

// Token tiles 1..6; larger requests act as 6. Default 4: 4-6 measured within 3% of each other on
// Zen 5, and 4 keeps the accumulators nearly spill-free in 16 registers.
constexpr int MAX_TOKEN_TILE = 6;
constexpr int DEFAULT_TOKEN_TILE = 4;
const MicroFn MICRO[MAX_TOKEN_TILE + 1] = {nullptr, gemm_micro<1>, gemm_micro<2>, gemm_micro<3>,
                                           gemm_micro<4>, gemm_micro<5>, gemm_micro<6>};

void ternary_gemm_avx2(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, const int8_t *act,
                       const int32_t *act_sums, int32_t n_tokens, int32_t token_tile, int32_t *out, int64_t out_stride) {
    const int64_t blocks = cols / QK_K;
    ternary_gemm_tiles(packed, row_begin, row_end, cols, n_tokens, token_tile, MAX_TOKEN_TILE, DEFAULT_TOKEN_TILE, out, out_stride,
        [&](const uint8_t *w, int64_t r) { _mm_storeu_si128(reinterpret_cast<__m128i *>(out + r), _mm_sub_epi32(gemv_tile(w, blocks, act), _mm_set1_epi32(act_sums[0]))); },
        [&](int n, const uint8_t *w, int64_t t, int64_t r) {
            for (int i = 0; i < TILE_ROWS; ++i)  // AVX2's micro-kernel takes one row at a time
                MICRO[n](w + i * T2P_BLOCK_BYTES, blocks, cols, act + t * cols, act_sums + t, out + t * out_stride + r + i, out_stride);
        });
}

// ---------------------------------------------------------------------------------------------
// Ternary GEMV / GEMM over T1P (1.6 bpw, blocks.h; scalar spec: ternary_gemm_t1p_scalar)
// ---------------------------------------------------------------------------------------------

// Digits by compares. Digit k of a byte q is d_k = floor(3 q_k / 256) with q_k = 3^k q mod 256, i.e.
// [q_k >= 86] + [q_k >= 171]. AVX2 compares signed bytes only, so the kernels carry s_k = q_k ^ 0x80
// (= q_k - 128): s_{k+1} = 3 s_k mod 256 as well (3 * 128 = 128 mod 256), and d_k = [s_k > -43] +
// [s_k > 42]: two vpcmpgtb (masks 0 / -1) and two vpsubb. (AVX-512's GEMV multiplies q_k itself with
// vpdpbusd; vpmaddubsw would saturate on 255 x 127 pairs, so here the digits are made.)
struct T1pThresholds {
    __m256i t1 = _mm256_set1_epi8(85 - 128), t2 = _mm256_set1_epi8(170 - 128);
    // Opaque to GCC, which otherwise rewrites one compare against a known constant as vpminsb + vpcmpeqb.
    T1pThresholds() { asm("" : "+x"(t1), "+x"(t2)); }
};
inline __m256i t1p_digits(__m256i s, const T1pThresholds &t) {
    return _mm256_sub_epi8(_mm256_sub_epi8(_mm256_setzero_si256(), _mm256_cmpgt_epi8(s, t.t1)), _mm256_cmpgt_epi8(s, t.t2));
}
inline __m256i times3(__m256i s) { return _mm256_add_epi8(_mm256_add_epi8(s, s), s); }
inline __m256i flip_sign(const uint8_t *p) { return _mm256_xor_si256(load32(p), _mm256_set1_epi8(static_cast<char>(0x80))); }

// Decode over one T1P row tile: the 64-byte vector in two ymm halves (rows 0-1, rows 2-3; a 128-bit
// lane is one row), each digit plane against its 16 activations broadcast to both lanes. vpmaddubsw
// of digits <= 2 by int8 is exact (|pair| <= 512); a vector adds at most 5 x 512 to an int16 lane, so
// 8 vectors (20480) are summed in int16 before vpmaddwd widens them.
constexpr int64_t T1P_INT16_VECTORS = 8;

inline __m128i gemv_t1p_tile(const uint8_t *w, int64_t nv, int64_t cols, const int8_t *act) {
    const __m256i ones = _mm256_set1_epi16(1);
    const T1pThresholds th;
    __m256i acc01 = _mm256_setzero_si256(), acc23 = acc01;  // int32; lane (128-bit) j of acc01 is row j, of acc23 row 2 + j
    auto vector = [&](const uint8_t *p, const int8_t *a, int groups, __m256i &sum01, __m256i &sum23) {
        __m256i s01 = flip_sign(p), s23 = flip_sign(p + 32);
#pragma GCC unroll 5
        for (int k = 0; k < groups; ++k) {
            const __m256i ak = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i *>(a + 16 * k)));
            sum01 = _mm256_add_epi16(sum01, _mm256_maddubs_epi16(t1p_digits(s01, th), ak));
            sum23 = _mm256_add_epi16(sum23, _mm256_maddubs_epi16(t1p_digits(s23, th), ak));
            s01 = times3(s01);
            s23 = times3(s23);
        }
    };
    const int64_t full = nv - 1;  // the last vector may have fewer digit groups with columns
    for (int64_t i0 = 0; i0 < full; i0 += T1P_INT16_VECTORS) {
        const int64_t i1 = std::min(full, i0 + T1P_INT16_VECTORS);
        __m256i sum01 = _mm256_setzero_si256(), sum23 = sum01;
        for (int64_t i = i0; i < i1; ++i) {
            _mm_prefetch(reinterpret_cast<const char *>(w + i * T1P_VECTOR_BYTES + GEMV_PREFETCH), _MM_HINT_T0);
            vector(w + i * T1P_VECTOR_BYTES, act + i * T1P_VECTOR_COLS, 5, sum01, sum23);
        }
        acc01 = _mm256_add_epi32(acc01, _mm256_madd_epi16(sum01, ones));
        acc23 = _mm256_add_epi32(acc23, _mm256_madd_epi16(sum23, ones));
    }
    __m256i sum01 = _mm256_setzero_si256(), sum23 = sum01;
    vector(w + full * T1P_VECTOR_BYTES, act + full * T1P_VECTOR_COLS, static_cast<int>((cols - full * T1P_VECTOR_COLS) / 16), sum01, sum23);
    acc01 = _mm256_add_epi32(acc01, _mm256_madd_epi16(sum01, ones));
    acc23 = _mm256_add_epi32(acc23, _mm256_madd_epi16(sum23, ones));
    // lane sums: h2's low lane is [row 0, row 2, ..], its high lane [row 1, row 3, ..]
    const __m256i h = _mm256_hadd_epi32(acc01, acc23), h2 = _mm256_hadd_epi32(h, h);
    return _mm_unpacklo_epi32(_mm256_castsi256_si128(h2), _mm256_extracti128_si256(h2, 1));
}

// T1P rows [row_begin, row_end) -> T2P at dst (t1p_gemm_via_t2p's `expand`): the GEMV's digits into
// per-row code bytes, then four code planes per T2P block.
void t1p_to_t2p_avx2(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, uint8_t *dst) {
    const int64_t nv = t1p_vectors(cols), blocks = cols / QK_K, stride = nv * T1P_VECTOR_COLS;
    thread_local std::vector<uint8_t> codes;
    if (codes.size() < static_cast<size_t>(TILE_ROWS * stride)) codes.resize(static_cast<size_t>(TILE_ROWS * stride));
    const T1pThresholds th;
    for (int64_t r0 = row_begin; r0 < row_end; r0 += TILE_ROWS) {
        const uint8_t *p = packed + (r0 / TILE_ROWS) * nv * T1P_VECTOR_BYTES;
        for (int64_t i = 0; i < nv; ++i) {
            __m256i s01 = flip_sign(p + i * T1P_VECTOR_BYTES), s23 = flip_sign(p + i * T1P_VECTOR_BYTES + 32);
            for (int k = 0; k < 5; ++k) {
                const __m256i d01 = t1p_digits(s01, th), d23 = t1p_digits(s23, th);
                uint8_t *c = codes.data() + i * T1P_VECTOR_COLS + 16 * k;
                _mm_storeu_si128(reinterpret_cast<__m128i *>(c), _mm256_castsi256_si128(d01));
                _mm_storeu_si128(reinterpret_cast<__m128i *>(c + stride), _mm256_extracti128_si256(d01, 1));
                _mm_storeu_si128(reinterpret_cast<__m128i *>(c + 2 * stride), _mm256_castsi256_si128(d23));
                _mm_storeu_si128(reinterpret_cast<__m128i *>(c + 3 * stride), _mm256_extracti128_si256(d23, 1));
                s01 = times3(s01);
                s23 = times3(s23);
            }
        }
        uint8_t *o = dst + (r0 - row_begin) / TILE_ROWS * blocks * TILE_ROWS * T2P_BLOCK_BYTES;
        for (int64_t b = 0; b < blocks; ++b)
            for (int r = 0; r < TILE_ROWS; ++r, o += T2P_BLOCK_BYTES)
                for (int h = 0; h < 2; ++h) {
                    const uint8_t *c = codes.data() + r * stride + b * QK_K + 32 * h;
                    // codes are <= 2, so 16-bit shifts by up to 6 move no bit across a byte
                    _mm256_storeu_si256(reinterpret_cast<__m256i *>(o + 32 * h),
                                        _mm256_or_si256(_mm256_or_si256(load32(c), _mm256_slli_epi16(load32(c + 64), 2)),
                                                        _mm256_or_si256(_mm256_slli_epi16(load32(c + 128), 4), _mm256_slli_epi16(load32(c + 192), 6))));
                }
    }
}

// Decode: the GEMV above per row tile. Several tokens: 32-row groups expanded to T2P once per block
// of activations (t1p_gemm_via_t2p), then the T2P kernels; the same integers either way.
void ternary_gemm_t1p_avx2(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, const int8_t *act,
                           const int32_t *act_sums, int32_t n_tokens, int32_t token_tile, int32_t *out, int64_t out_stride) {
    if (row_end <= row_begin || n_tokens < 1) return;
    if (n_tokens == 1) {
        const int64_t nv = t1p_vectors(cols);
        for (int64_t r = row_begin; r < row_end; r += TILE_ROWS)
            _mm_storeu_si128(reinterpret_cast<__m128i *>(out + r),
                             _mm_sub_epi32(gemv_t1p_tile(packed + (r / TILE_ROWS) * nv * T1P_VECTOR_BYTES, nv, cols, act), _mm_set1_epi32(act_sums[0])));
        return;
    }
    t1p_gemm_expanding(packed, row_begin, row_end, cols, act, act_sums, n_tokens, token_tile, out, out_stride, t1p_to_t2p_avx2, ternary_gemm_avx2);
}

// ---------------------------------------------------------------------------------------------
// Dense GEMM (output head, embedding)
// ---------------------------------------------------------------------------------------------

inline float half_to_float(fp16_t h) { return _cvtsh_ss(h); }  // F16C: exact, like fp16_to_fp32

// Per row two accumulators, lo and hi: lane i of lo takes the columns k = i (mod 16), lane i of hi the
// columns k = 8 + i (mod 16), in increasing k. The reduction is (hi + lo), then the 128-bit halves,
// then (s0 + s2) + (s1 + s3): the same lane assignment and tree as the AVX-512 and NEON kernels (GCC's
// _mm512_reduce_add_ps), so the three SIMD families return the same bits for the same row.
inline float reduce16(__m256 lo, __m256 hi) {
    const __m256 v = _mm256_add_ps(hi, lo);
    const __m128 s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// Reduce and store with compile-time indices (a runtime index keeps GCC's accumulators in memory).
template <int R>
inline void store_rows(const __m256 (&acc)[R][2], float *out, int n_rows) {
    float res[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) res[r] = reduce16(acc[r][0], acc[r][1]);
    for (int r = 0; r < n_rows; ++r) out[r] = res[r];
}

constexpr int64_t DENSE_PREFETCH = 2048;
inline void prefetch(const uint8_t *p) { _mm_prefetch(reinterpret_cast<const char *>(p), _MM_HINT_T0); }
// Rows of a pass are consecutive: past a row's end, prefetch the same row of the next pass.
inline size_t prefetch_offset(size_t off, size_t rb, int R) {
    return off + DENSE_PREFETCH + (off + DENSE_PREFETCH >= rb ? (R - 1) * rb : 0);
}

// The kernels below do 4 rows x 1 token (8 accumulators of the 16 ymm registers); the weights of a
// pass stay in L1 for the next token. Rows past the end of the range repeat the last row (results
// discarded), so every row goes through the same operations.
constexpr int R = 4;
#define RYZ_DENSE_ROWS              \
    const uint8_t *rows[R];         \
    for (int i = 0; i < R; ++i) rows[i] = w + static_cast<size_t>(std::min(i, n_rows - 1)) * rb;
#define RYZ_DENSE_ZERO                                                 \
    __m256 acc[R][2];                                                  \
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();

// F32 / F16 rows, one 64-byte line of each row per step. A ragged column tail goes through a
// zero-padded copy, and its lanes past the end keep their accumulator (blend): they add nothing,
// not even a -0 + 0, as the AVX-512 masked FMA.
template <bool HALF>
void dense_plain(const uint8_t *w, size_t rb, int n_rows, int64_t cols, const float *x, float *out) {
    RYZ_DENSE_ROWS
    RYZ_DENSE_ZERO
    constexpr int ES = HALF ? 2 : 4;
    constexpr int STEP = 64 / ES;
    auto load_w = [](const uint8_t *p) {
        if constexpr (HALF) {
            return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
        } else {
            return _mm256_loadu_ps(reinterpret_cast<const float *>(p));
        }
    };
    int64_t k = 0;
    for (; k + STEP <= cols; k += STEP) {
        const size_t pf = prefetch_offset(static_cast<size_t>(k * ES), rb, R);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) prefetch(rows[r] + pf);
#pragma GCC unroll 4
        for (int j = 0; j < STEP; j += 8) {
            const __m256 xv = _mm256_loadu_ps(x + k + j);
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) acc[r][(j / 8) % 2] = _mm256_fmadd_ps(load_w(rows[r] + (k + j) * ES), xv, acc[r][(j / 8) % 2]);
        }
    }
    for (; k < cols; k += 8) {  // k stays a multiple of 8, so (k / 8) % 2 picks the accumulator
        const int n = static_cast<int>(std::min<int64_t>(8, cols - k));
        alignas(32) float xb[8] = {};
        std::memcpy(xb, x + k, static_cast<size_t>(n) * 4);
        const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
        const int h = static_cast<int>((k / 8) % 2);
        for (int r = 0; r < R; ++r) {
            alignas(32) uint8_t wb[32] = {};
            std::memcpy(wb, rows[r] + k * ES, static_cast<size_t>(n) * ES);
            acc[r][h] = _mm256_blendv_ps(acc[r][h], _mm256_fmadd_ps(load_w(wb), _mm256_load_ps(xb), acc[r][h]), keep);
        }
    }
    store_rows<R>(acc, out, n_rows);
}

// Q8_0 rows: a block (32 columns, four vectors) per step; d converted once per block and row; the
// values d * q are exact in float, as in dequantize_row.
void dense_q8_0(const uint8_t *w, size_t rb, int n_rows, int64_t cols, const float *x, float *out) {
    RYZ_DENSE_ROWS
    RYZ_DENSE_ZERO
    for (int64_t b = 0; b < cols / QK8_0; ++b) {
        const size_t pf = prefetch_offset(b * sizeof(block_q8_0), rb, R);
        __m256 d[R];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            prefetch(rows[r] + pf);
            fp16_t dh;
            std::memcpy(&dh, rows[r] + b * sizeof(block_q8_0) + offsetof(block_q8_0, d), sizeof dh);
            d[r] = _mm256_set1_ps(half_to_float(dh));
        }
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
            const __m256 xv = _mm256_loadu_ps(x + b * QK8_0 + 8 * c);
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {
                const uint8_t *qs = rows[r] + b * sizeof(block_q8_0) + offsetof(block_q8_0, qs) + 8 * c;
                const __m256 wv = _mm256_mul_ps(d[r], _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(qs)))));
                acc[r][c % 2] = _mm256_fmadd_ps(wv, xv, acc[r][c % 2]);
            }
        }
    }
    store_rows<R>(acc, out, n_rows);
}

// Q6_K rows, decoded group by group (32 columns) and multiplied in at once, as in avx512.cpp's
// dense_q6_k (same layout notes); values (d * scale) * (q - 32) as in dequantize_row.
void dense_q6_k(const uint8_t *w, size_t rb, int n_rows, int64_t cols, const float *x, float *out) {
    RYZ_DENSE_ROWS
    RYZ_DENSE_ZERO
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3), bias = _mm256_set1_epi8(32);
    for (int64_t b = 0; b < cols / QK_K; ++b) {
        const size_t pf = prefetch_offset(b * sizeof(block_q6_k), rb, R);
        const float *xb = x + b * QK_K;
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            for (int i = 0; i < 256; i += 64) prefetch(rows[r] + pf + i);
            const block_q6_k *blk = reinterpret_cast<const block_q6_k *>(rows[r] + b * sizeof(block_q6_k));
            const float d = half_to_float(blk->d);
            for (int h = 0; h < 2; ++h) {
                const __m256i ql0 = load32(blk->ql + 64 * h), ql1 = load32(blk->ql + 64 * h + 32), qh = load32(blk->qh + 32 * h);
#pragma GCC unroll 4
                for (int g = 0; g < 4; ++g) {
                    const __m256i lo = (g & 2) ? _mm256_and_si256(_mm256_srli_epi16(g & 1 ? ql1 : ql0, 4), m4) : _mm256_and_si256(g & 1 ? ql1 : ql0, m4);
                    const __m256i hi = _mm256_and_si256(g ? _mm256_srli_epi16(qh, 2 * g) : qh, m2);
                    const __m256i v = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), bias);
                    const __m128i v0 = _mm256_castsi256_si128(v), v1 = _mm256_extracti128_si256(v, 1);
                    const __m256 s0 = _mm256_set1_ps(d * static_cast<float>(blk->scales[8 * h + 2 * g]));
                    const __m256 s1 = _mm256_set1_ps(d * static_cast<float>(blk->scales[8 * h + 2 * g + 1]));
                    const float *xc = xb + 128 * h + 32 * g;
                    acc[r][0] = _mm256_fmadd_ps(_mm256_mul_ps(s0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v0))), _mm256_loadu_ps(xc), acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(_mm256_mul_ps(s0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v0, 8)))), _mm256_loadu_ps(xc + 8), acc[r][1]);
                    acc[r][0] = _mm256_fmadd_ps(_mm256_mul_ps(s1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v1))), _mm256_loadu_ps(xc + 16), acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(_mm256_mul_ps(s1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v1, 8)))), _mm256_loadu_ps(xc + 24), acc[r][1]);
                }
            }
        }
    }
    store_rows<R>(acc, out, n_rows);
}

#undef RYZ_DENSE_ROWS
#undef RYZ_DENSE_ZERO

using DenseFn = void (*)(const uint8_t *, size_t, int, int64_t, const float *, float *);

template <DenseFn F>
void dense_rows(const uint8_t *w, size_t rb, int64_t row_begin, int64_t row_end, int64_t cols, const float *x,
                int32_t n_tokens, float *out, int64_t out_stride) {
    for (int64_t r = row_begin; r < row_end; r += R) {
        const int n_rows = static_cast<int>(std::min<int64_t>(R, row_end - r));
        for (int32_t t = 0; t < n_tokens; ++t) F(w + static_cast<size_t>(r) * rb, rb, n_rows, cols, x + t * cols, out + t * out_stride + r);
    }
}

void dense_gemm_avx2(const void *w, int32_t type, int64_t row_begin, int64_t row_end, int64_t cols, const float *x,
                     int32_t n_tokens, float *out, int64_t out_stride) {
    const uint8_t *base = static_cast<const uint8_t *>(w);
    const size_t rb = row_bytes(type, cols);
    switch (type) {
        case RYZ_TYPE_F32: dense_rows<dense_plain<false>>(base, rb, row_begin, row_end, cols, x, n_tokens, out, out_stride); break;
        case RYZ_TYPE_F16: dense_rows<dense_plain<true>>(base, rb, row_begin, row_end, cols, x, n_tokens, out, out_stride); break;
        case RYZ_TYPE_Q8_0: dense_rows<dense_q8_0>(base, rb, row_begin, row_end, cols, x, n_tokens, out, out_stride); break;
        case RYZ_TYPE_Q6_K: dense_rows<dense_q6_k>(base, rb, row_begin, row_end, cols, x, n_tokens, out, out_stride); break;
        default: dense_gemm_scalar(w, type, row_begin, row_end, cols, x, n_tokens, out, out_stride); break;
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantisation
// ---------------------------------------------------------------------------------------------

// Bit-identical to quantize_act_scalar, for the reasons given in avx512.cpp: max is exact and
// order-free (vmaxps returns its second operand on NaN, as fmax returns the non-NaN one); same scalar
// scale; one rounded multiply; vroundps(NEAREST) = rint half-to-even; max(v, -128) then min(v, 127),
// which sends NaN to -128 as the scalar fmax/fmin do. The ragged tail runs the scalar expressions.
void quantize_act_avx2(const float *x, int64_t cols, int8_t *q, float *scale, int32_t *sum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= cols; k += 16) {
        m0 = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)), m0);
        m1 = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + k + 8)), m1);
    }
    __m256 m = _mm256_max_ps(m0, m1);
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float amax = std::fmax(_mm_cvtss_f32(m4), _mm_cvtss_f32(_mm_movehdup_ps(m4)));
    for (; k < cols; ++k) amax = std::fmax(amax, std::fabs(x[k]));
    const float s = 127.0f / std::fmax(amax, 1e-5f);

    const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i total = _mm256_setzero_si256();
    auto quant8 = [&](const float *p) {
        const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(p), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
    };
    for (k = 0; k + 32 <= cols; k += 32) {
        const __m256i i0 = quant8(x + k), i1 = quant8(x + k + 8), i2 = quant8(x + k + 16), i3 = quant8(x + k + 24);
        total = _mm256_add_epi32(_mm256_add_epi32(total, _mm256_add_epi32(i0, i1)), _mm256_add_epi32(i2, i3));
        // in-range values: the saturating packs are plain narrowing; they interleave 128-bit lanes,
        // the permute puts the 32 bytes back in order
        const __m256i w16 = _mm256_packs_epi32(i0, i1), w16b = _mm256_packs_epi32(i2, i3);
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(q + k), _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16, w16b), order));
    }
    const __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    const __m128i t2 = _mm_add_epi32(t, _mm_unpackhi_epi64(t, t));
    int32_t acc = _mm_cvtsi128_si32(_mm_add_epi32(t2, _mm_shuffle_epi32(t2, 1)));
    for (; k < cols; ++k) {
        const float v = std::fmin(std::fmax(std::rint(x[k] * s), -128.0f), 127.0f);
        q[k] = static_cast<int8_t>(v);
        acc += q[k];
    }
    *scale = s;
    *sum = acc;
}

}  // namespace

// Attention over the KV cache. The order of float operations is fixed by the reference
// (engine/reference.py), not chosen for speed: a dot product is numpy's pairwise sum, which for up to
// 128 terms is exactly eight interleaved partial sums (one 8-lane vector: lane j adds term 8i + j in
// order) folded as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)); products are rounded before the add (mul then
// add, never FMA). A 16-lane sum would reorder them: the AVX-512 family keeps these 8-lane sums, two
// positions per zmm (avx512.cpp), and falls back to these kernels for other head sizes.
// Value sums run sequentially over positions, so any lane width is exact there.
namespace {

inline __m256 load8(const void *base, int32_t kv_type, int64_t index) {
    if (kv_type == RYZ_KV_F32) return _mm256_loadu_ps(static_cast<const float *>(base) + index);
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(static_cast<const fp16_t *>(base) + index)));
}

inline float fold8(__m256 r) {
    alignas(32) float v[8];
    _mm256_store_ps(v, r);
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

}  // namespace

void kv_dot_avx2(const float *q, const void *keys, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d, float *scores) {
    if (d % 8 || d < 8 || d > 128) {  // other head sizes: the generic pairwise sum
        kernels_scalar().kv_dot(q, keys, kv_type, stride, n_pos, d, scores);
        return;
    }
    // Four positions at a time: each position's sum is one chain of d/8 dependent adds (4 cycles each),
    // so one position alone left the core idle between them; four independent chains fill that time.
    // Each position's operations and their order are unchanged.
    const int64_t elem_bytes = kv_type == RYZ_KV_F32 ? 4 : 2;
    int32_t p = 0;
    for (; p + 4 <= n_pos; p += 4) {
        const int64_t row = int64_t(p) * stride;
        for (int32_t a = p + KV_PREFETCH_ROWS; a < std::min(n_pos, p + KV_PREFETCH_ROWS + 4); ++a) prefetch_kv_row(keys, int64_t(a) * stride, d, elem_bytes);
        const __m256 q0 = _mm256_loadu_ps(q);
        __m256 r0 = _mm256_mul_ps(q0, load8(keys, kv_type, row));
        __m256 r1 = _mm256_mul_ps(q0, load8(keys, kv_type, row + stride));
        __m256 r2 = _mm256_mul_ps(q0, load8(keys, kv_type, row + 2 * stride));
        __m256 r3 = _mm256_mul_ps(q0, load8(keys, kv_type, row + 3 * stride));
        for (int32_t i = 8; i < d; i += 8) {
            const __m256 qi = _mm256_loadu_ps(q + i);
            r0 = _mm256_add_ps(r0, _mm256_mul_ps(qi, load8(keys, kv_type, row + i)));
            r1 = _mm256_add_ps(r1, _mm256_mul_ps(qi, load8(keys, kv_type, row + stride + i)));
            r2 = _mm256_add_ps(r2, _mm256_mul_ps(qi, load8(keys, kv_type, row + 2 * stride + i)));
            r3 = _mm256_add_ps(r3, _mm256_mul_ps(qi, load8(keys, kv_type, row + 3 * stride + i)));
        }
        scores[p] = fold8(r0);
        scores[p + 1] = fold8(r1);
        scores[p + 2] = fold8(r2);
        scores[p + 3] = fold8(r3);
    }
    for (; p < n_pos; ++p) {
        const int64_t row = int64_t(p) * stride;
        __m256 r = _mm256_mul_ps(_mm256_loadu_ps(q), load8(keys, kv_type, row));
        for (int32_t i = 8; i < d; i += 8) r = _mm256_add_ps(r, _mm256_mul_ps(_mm256_loadu_ps(q + i), load8(keys, kv_type, row + i)));
        scores[p] = fold8(r);
    }
}

void kv_axpy_avx2(const float *probs, const void *values, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d, float *out) {
    if (d % 8) {
        kernels_scalar().kv_axpy(probs, values, kv_type, stride, n_pos, d, out);
        return;
    }
    const int64_t elem_bytes = kv_type == RYZ_KV_F32 ? 4 : 2;
    for (int32_t i0 = 0; i0 < d; i0 += 64) {  // up to 8 accumulators live across the position loop
        const int32_t width = std::min(64, d - i0);
        __m256 acc[8];
        for (int j = 0; j < width / 8; ++j) acc[j] = _mm256_setzero_ps();
        for (int32_t p = 0; p < n_pos; ++p) {
            if (i0 == 0 && p + KV_PREFETCH_ROWS < n_pos) prefetch_kv_row(values, int64_t(p + KV_PREFETCH_ROWS) * stride, d, elem_bytes);
            const __m256 w = _mm256_set1_ps(probs[p]);
            const int64_t row = int64_t(p) * stride + i0;
            for (int j = 0; j < width / 8; ++j) acc[j] = _mm256_add_ps(acc[j], _mm256_mul_ps(w, load8(values, kv_type, row + 8 * j)));
        }
        for (int j = 0; j < width / 8; ++j) _mm256_storeu_ps(out + i0 + 8 * j, acc[j]);
    }
}

// numpy's pairwise sum of x[0 .. n) (kernels.h's pairwise_sum over an array), of the squares when SQUARE: its
// eight partial sums r[j] += term[8i + j] are one ymm, the same additions in the same order, so the same bits.
// (In an unnamed namespace: an AVX2 instantiation must not be a weak symbol a baseline caller could bind to.)
namespace {
template <bool SQUARE>
float pairwise_avx2(const float *x, int64_t n) {
    if (n < 8) {
        float res = 0.0f;
        for (int64_t i = 0; i < n; ++i) res += SQUARE ? x[i] * x[i] : x[i];
        return res;
    }
    if (n <= 128) {
        auto load = [x](int64_t i) {
            const __m256 v = _mm256_loadu_ps(x + i);
            return SQUARE ? _mm256_mul_ps(v, v) : v;
        };
        __m256 r = load(0);
        int64_t i = 8;
        for (; i < n - (n % 8); i += 8) r = _mm256_add_ps(r, load(i));
        alignas(32) float l[8];
        _mm256_store_ps(l, r);
        float res = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
        for (; i < n; ++i) res += SQUARE ? x[i] * x[i] : x[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_avx2<SQUARE>(x, n2) + pairwise_avx2<SQUARE>(x + n2, n - n2);
}
}  // namespace

float pairwise_sum_avx2(const float *x, int64_t n) { return pairwise_avx2<false>(x, n); }
float pairwise_sum_squares_avx2(const float *x, int64_t n) { return pairwise_avx2<true>(x, n); }

namespace {

// exp for the softmax, bit for bit (float)std::exp((double)x) (docs/kernels.md "Softmax exp"). In double:
// k = rint(x log2 e), r = x - k ln2 (Cody-Waite, two FMAs, |r| <= 0.347), exp(r) by its Taylor polynomial
// of degree 12 (truncation < 2^-51 relative) in Horner form, times 2^k: y is within 2^-49 of exp(x),
// relative. libm's double exp is within 1 ulp (2^-52), so both lie inside y (1 +- 2^-40): where
// y (1 - 2^-40) and y (1 + 2^-40) round to the same float, every value between them does (rounding is
// monotone), libm's result included, and that float is the answer. Otherwise (about 1 lane in 30000) and
// for NaN the lane is recomputed with std::exp. x is clamped to [-120, 89] first: exp(-120) rounds to
// float 0 and exp(89) to inf, as everything beyond does.
constexpr double EXP_LOG2E = 0x1.71547652b82fep0, EXP_LN2_HI = 0x1.62e42fefa39efp-1, EXP_LN2_LO = 0x1.abc9e3b39803fp-56;
constexpr double EXP_MARGIN_LO = 1.0 - 0x1p-40, EXP_MARGIN_HI = 1.0 + 0x1p-40;
constexpr double EXP_COEF[13] = {1.0,        1.0,         1.0 / 2,      1.0 / 6,       1.0 / 24,       1.0 / 120,       1.0 / 720,
                                 1.0 / 5040, 1.0 / 40320, 1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600};

// 4 lanes: the float to return where *exact, else anything (the caller recomputes the lane).
inline __m128 exp4(__m128 xf, int *exact) {
    __m256d x = _mm256_cvtps_pd(xf);
    x = _mm256_min_pd(_mm256_max_pd(x, _mm256_set1_pd(-120.0)), _mm256_set1_pd(89.0));  // NaN -> -120 (recomputed)
    const __m256d k = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(EXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_fnmadd_pd(k, _mm256_set1_pd(EXP_LN2_HI), x);
    r = _mm256_fnmadd_pd(k, _mm256_set1_pd(EXP_LN2_LO), r);
    __m256d p = _mm256_set1_pd(EXP_COEF[12]);
    for (int i = 11; i >= 0; --i) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(EXP_COEF[i]));
    const __m256i e = _mm256_slli_epi64(_mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(k)), _mm256_set1_epi64x(1023)), 52);
    const __m256d y = _mm256_mul_pd(p, _mm256_castsi256_pd(e));  // 2^k is a normal double: k in [-174, 129]
    const __m128i lo = _mm_castps_si128(_mm256_cvtpd_ps(_mm256_mul_pd(y, _mm256_set1_pd(EXP_MARGIN_LO))));
    const __m128i hi = _mm_castps_si128(_mm256_cvtpd_ps(_mm256_mul_pd(y, _mm256_set1_pd(EXP_MARGIN_HI))));
    const __m128i ok = _mm_andnot_si128(_mm_castps_si128(_mm_cmpunord_ps(xf, xf)), _mm_cmpeq_epi32(lo, hi));
    *exact = _mm_movemask_ps(_mm_castsi128_ps(ok));
    return _mm_castsi128_ps(lo);
}

// scores[0 .. 8) = exp(scores - max), as softmax_exp_scalar.
inline void exp8(float *scores, __m256 max_score) {
    const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(scores), max_score);
    int ok_lo, ok_hi;
    const __m128 a = exp4(_mm256_castps256_ps128(x), &ok_lo), b = exp4(_mm256_extractf128_ps(x, 1), &ok_hi);
    _mm256_storeu_ps(scores, _mm256_set_m128(b, a));
    if ((ok_lo | ok_hi << 4) != 0xFF) {
        alignas(32) float xs[8];
        _mm256_store_ps(xs, x);
        for (int i = 0; i < 8; ++i)
            if (!((ok_lo | ok_hi << 4) >> i & 1)) scores[i] = static_cast<float>(std::exp(static_cast<double>(xs[i])));
    }
}

void softmax_exp_avx2(float *scores, int32_t n, float max_score) {
    const __m256 m = _mm256_set1_ps(max_score);
    int32_t p = 0;
    for (; p + 8 <= n; p += 8) exp8(scores + p, m);
    if (p < n) {  // the tail through a padded copy (its padding lanes are computed and dropped)
        float tail[8] = {};
        std::memcpy(tail, scores + p, sizeof(float) * size_t(n - p));
        exp8(tail, m);
        std::memcpy(scores + p, tail, sizeof(float) * size_t(n - p));
    }
}

// softmax_scalar's loops: IEEE division and max are exact, so lanes change no bits. vmaxps(s, m) keeps m
// when s is NaN, as std::max(m, s) does; the lanes' maxima are combined in another order, which can only
// change the sign of a zero maximum, and s - (+0) and s - (-0) have the same exp.
void softmax_avx2(float *scores, int32_t n, float divisor) {
    const __m256 dv = _mm256_set1_ps(divisor);
    __m256 mv = _mm256_set1_ps(-INFINITY);
    int32_t p = 0;
    for (; p + 8 <= n; p += 8) {
        const __m256 s = _mm256_div_ps(_mm256_loadu_ps(scores + p), dv);
        _mm256_storeu_ps(scores + p, s);
        mv = _mm256_max_ps(s, mv);
    }
    alignas(32) float l[8];
    _mm256_store_ps(l, mv);
    float max_score = -INFINITY;
    for (int i = 0; i < 8; ++i) max_score = std::max(max_score, l[i]);
    for (; p < n; ++p) {
        scores[p] = scores[p] / divisor;
        max_score = std::max(max_score, scores[p]);
    }
    softmax_exp_avx2(scores, n, max_score);
    const __m256 sum = _mm256_set1_ps(pairwise_sum_avx2(scores, n));
    p = 0;
    for (; p + 8 <= n; p += 8) _mm256_storeu_ps(scores + p, _mm256_div_ps(_mm256_loadu_ps(scores + p), sum));
    for (; p < n; ++p) scores[p] = scores[p] / _mm256_cvtss_f32(sum);
}

// The element-wise kernels (kernels.h; scalar.cpp the spec): per element the scalar loop's operations in its
// order, 8 lanes at a time (no FMA: the file's -mfma is for intrinsics that ask), the ragged end in scalar.
void rms_norm_avx2(const float *x, const float *w, int64_t n, float eps, float *out) {
    const float denom = std::sqrt(pairwise_sum_squares_avx2(x, n) / static_cast<float>(n) + eps);
    const __m256 dv = _mm256_set1_ps(denom);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), dv), _mm256_loadu_ps(w + i)));
    for (; i < n; ++i) out[i] = x[i] / denom * w[i];
}

// relu^2: a lane not > 0 (NaN included) is +0 before the product, as the scalar's 0.0f. SiLU: exp(-g) by
// softmax_exp's exact exp (max 0: x - 0 is x), then the scalar's division and product per lane.
void ffn_act_mul_avx2(float *gate, const float *up, int64_t n, int32_t act) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        __m256 a;
        if (act == RYZ_ACT_RELU2) {
            a = _mm256_and_ps(_mm256_cmp_ps(g, zero, _CMP_GT_OQ), _mm256_mul_ps(g, g));
        } else {
            alignas(32) float e[8];
            _mm256_store_ps(e, _mm256_xor_ps(g, sign));  // -g exactly
            exp8(e, zero);
            a = _mm256_div_ps(g, _mm256_add_ps(one, _mm256_load_ps(e)));
        }
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(a, _mm256_loadu_ps(up + i)));
    }
    if (i < n) kernels_scalar().ffn_act_mul(gate + i, up + i, n - i, act);
}

void add_avx2(float *x, const float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; ++i) x[i] += y[i];
}

void rope_avx2(float *vec, int32_t n_heads, int32_t head_dim, const float *cs, const float *sn) {
    const int32_t half = head_dim / 2;
    for (int32_t h = 0; h < n_heads; ++h) {
        float *v = vec + int64_t(h) * head_dim;
        int32_t i = 0;
        for (; i + 8 <= half; i += 8) {
            const __m256 a = _mm256_loadu_ps(v + i), b = _mm256_loadu_ps(v + i + half);
            const __m256 c = _mm256_loadu_ps(cs + i), s = _mm256_loadu_ps(sn + i);
            _mm256_storeu_ps(v + i, _mm256_sub_ps(_mm256_mul_ps(a, c), _mm256_mul_ps(b, s)));
            _mm256_storeu_ps(v + i + half, _mm256_add_ps(_mm256_mul_ps(b, c), _mm256_mul_ps(a, s)));
        }
        for (; i < half; ++i) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cs[i] - b * sn[i];
            v[i + half] = b * cs[i] + a * sn[i];
        }
    }
}

// vcvtps2ph with round-to-nearest-even is fp32_to_fp16 on every non-NaN float (subnormal halves included; it
// ignores MXCSR.FTZ, and a float that DAZ would zero rounds to a signed zero anyway). A NaN keeps its top payload
// bits there, so NaN lanes are cut to sign | 0x7E00, fp32_to_fp16's NaN.
void kv_store_avx2(const float *src, int64_t n, int32_t kv_type, void *dst) {
    if (kv_type == RYZ_KV_F32) {
        std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n));
        return;
    }
    fp16_t *h = static_cast<fp16_t *>(dst);
    const __m128i payload = _mm_set1_epi16(0x01FF);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(src + i);
        const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(nan), _mm256_extracti128_si256(nan, 1));
        const __m128i r = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128(reinterpret_cast<__m128i *>(h + i), _mm_andnot_si128(_mm_and_si128(nan16, payload), r));
    }
    for (; i < n; ++i) h[i] = fp32_to_fp16(src[i]);
}

// vcvtdq2ps rounds to nearest even, as the scalar int -> float conversion does.
void linear_out_avx2(const int32_t *acc, int64_t n, float act_scale, float w_scale, float *out) {
    const __m256 as = _mm256_set1_ps(act_scale), ws = _mm256_set1_ps(w_scale);
    int64_t r = 0;
    for (; r + 8 <= n; r += 8) {
        const __m256 a = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(acc + r)));
        _mm256_storeu_ps(out + r, _mm256_mul_ps(_mm256_div_ps(a, as), ws));
    }
    for (; r < n; ++r) out[r] = static_cast<float>(acc[r]) / act_scale * w_scale;
}

}  // namespace

const Kernels *kernels_avx2() {
    static const Kernels k{RYZ_ISA_AVX2, ternary_gemm_avx2, dense_gemm_avx2, quantize_act_avx2, kv_dot_avx2, kv_axpy_avx2,
                           ternary_gemm_t1p_avx2, softmax_exp_avx2, softmax_avx2,
                           nullptr, nullptr,  // no multi-query attention: the single-query kernels per query
                           rms_norm_avx2, ffn_act_mul_avx2, add_avx2, rope_avx2, kv_store_avx2, linear_out_avx2};
    return &k;
}

#else

const Kernels *kernels_avx2() { return nullptr; }

#endif

}  // namespace ryz

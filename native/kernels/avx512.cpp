// AVX-512 kernels (F, BW, VL, DQ, VNNI; this file alone is built with those flags).
// dense_q6_k_vbmi alone also uses VBMI (a target attribute, checked with CPUID before it runs).
//
// Layouts (src/blocks.h; scalar.cpp is the spec):
//   T2P ternary: packed[tile][block][row][64], 4 rows per tile, one 64-byte block per 256 columns.
//     Byte j of a row's block holds code+1 of column 64l + j in bits 2l..2l+1, so one 64-byte load
//     holds all four planes and plane l lines up byte for byte with the activations
//     act[256b + 64l .. 256b + 64l + 63] (one zmm). A tile's blocks are one sequential stream.
//   Activations: int8, row-major [token][cols], plus act_sums[token] = the sum of that token's row.
//   Dense (head / embedding): ggml's F32, F16, Q8_0 and Q6_K rows, read in place.
//   KV cache (attention): F32 or F16 rows of kv_heads * head_dim, `stride` elements apart.
//
// Ternary arithmetic: vpdpbusd multiplies unsigned bytes by signed bytes and adds each group of 4
// products to an int32 lane, without saturation (unlike vpmaddubsw). The unsigned operand is the
// stored code+1 in {0,1,2}, the signed one the int8 activation, so a row accumulates
// sum (code_k+1) * a_k = sum code_k * a_k + sum a_k: subtracting act_sums[t] once per output folds the
// -1 offset back in, with no decode to -1/0/+1 and no sign games. Overflow: with the largest 2-bit
// field (3, unused but possible in a TQ2_0 file) and the GEMV's planes scaled by up to 64 (see
// gemv_tile), a lane stays below cols * 384 < 2^31 for cols < 5.5M. All of it is exact integer
// arithmetic, so the result equals the scalar kernel's bit for bit whatever the order.
//
// Attention arithmetic: the reference's float order, exactly as the AVX2 kernels (see avx2.cpp): an
// 8-lane pairwise sum per dot product (two positions per zmm here), and value sums sequential over
// positions (16 lanes are exact there). Equal to the AVX2 and scalar kernels bit for bit.
//
// Dense arithmetic: each weight is dequantised with the operations dequantize_row uses (so the same
// float value), then multiplied into per-row float accumulators with FMA, lane i taking columns
// i mod 16 in increasing order, and reduced by one fixed tree at the end. A row's result depends only
// on the row and x: not on row_begin, on which rows share a pass, on n_tokens or on the thread. It
// differs from the scalar (sequential, unfused) sum by rounding only.

// GCC 12 reports its own _mm512_undefined_* placeholders inside the intrinsics as uninitialised
// (GCC PR 105593, fixed in 13); the warning is about the header, not this file.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <cmath>
#include <cstring>
#include <vector>

#include "../include/ryz.h"
#include "../src/blocks.h"
#include "kernels.h"

namespace ryz {

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)

namespace {

// The lanes of a 16-float step with `left` elements still to go (all 16 once left >= 16).
inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

// ---------------------------------------------------------------------------------------------
// Ternary GEMV / GEMM
// ---------------------------------------------------------------------------------------------

// vpdpbusd acc += u8 x s8. GCC 12 allocates registers badly around the intrinsic (a copy in and out of
// every accumulator per use, and spills once more than a few are live: the decode loop ran ~1.3x
// slower), so GCC gets the instruction as inline asm; the "vm" constraint still lets it fold the
// activation load into a memory operand. Other compilers use the intrinsic.
inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
#if defined(__GNUC__) && !defined(__clang__)
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "vm"(s8));
    return acc;
#else
    return _mm512_dpbusd_epi32(acc, u8, s8);
#endif
}

// A loaded vector pinned in a register. Without it GCC 12 folds the load into every use: the GEMV loaded
// each weight vector 4 times (once per vpand) and each activation vector 4 times (once per row), 32
// 64-byte loads per 256 weight bytes where 8 suffice, so the load ports, not vpdpbusd, set the pace.
// Pinned, one Zen 5 core streams a 512 MB matrix from DRAM at 35-38 GB/s instead of 16-19 (the
// single-thread read probe: 42), and runs ~4x faster hot in L2.
inline __m512i in_register(__m512i x) {
#if defined(__GNUC__)
    __asm__("" : "+v"(x));
#endif
    return x;
}

// Sum each of four int32 vectors: result lane i = sum of all lanes of a_i (integer: order-free).
inline __m128i hsum4_epi32(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
    const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    // per 128-bit lane: [a0, a1, a0, a1] + [a2, a3, a2, a3] halves -> [a0, a1, a2, a3]
    const __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// Decode: one row tile (4 rows) against one token; the tile's blocks are one forward stream.
// Per 64-byte block of a row: one load, four vpand with 0x03 / 0x0C / 0x30 / 0xC0 and four vpdpbusd
// against the block's four activation vectors (loaded once per tile block, shared by its 4 rows).
// No shifts: plane l is left in place, i.e. multiplied by 4^l, and goes to its own accumulator, which
// is divided back by an arithmetic shift at the end of the row. That division is exact: every
// product added to accumulator l is 4^l * (code+1) * a. Why: on Zen 5 vpsrlw competes with vpdpbusd
// for the same two ports, so unpacking by shifts held the loop at ~3.5 cycles per 64 bytes; vpand
// runs on any of 4 ports, and the loop gets near the 2 cycles of its 4 vpdpbusd (hot in L2/L3:
// 72 -> ~105 GB/s). Bound for the scaled accumulators: a lane adds cols/64 products of at most
// 192 * 128, i.e. < cols * 384 < 2^31.
// The 16 accumulators (4 rows x 4 planes) also cover vpdpbusd's latency (4 cycles, 2 per cycle).
// Software prefetch 4 KB ahead (16 tile blocks): the hardware prefetcher alone left the loop at ~78%
// of a plain streaming read from DRAM, with it ~90% (Zen 5; a NTA hint or 1-2 KB was no better).
constexpr int64_t GEMV_PREFETCH = 4096;

// Where the streaming kernels' software prefetches put a line: the distances and prefetcht0 above were
// tuned on Zen 5. On Intel (a Sapphire Rapids-class Xeon, 2 cores) prefetcht0 held the 2-thread decode
// GEMV at 17-19 GB/s against a 26 GB/s plain read; prefetcht1, into L2 (an Intel core tracks more L2
// misses than its 16 L1 fill buffers), reached 22-26 GB/s on T2P and T1P alike, in rounds of
// scripts/bench_ternary_layouts.cpp (docs/kernels.md "Prefetch"). Intel only: T1 on Zen is unmeasured.
// Each kernel is instantiated for both targets; the entry points pick one by CPU vendor.
enum class Prefetch { L1, L2 };
template <Prefetch P>
inline void prefetch_line(const void *p) {
    _mm_prefetch(static_cast<const char *>(p), P == Prefetch::L2 ? _MM_HINT_T1 : _MM_HINT_T0);
}
inline bool prefetch_to_l2() {
    static const bool intel = __builtin_cpu_is("intel");
    return intel;
}

template <Prefetch P>
inline __m128i gemv_tile(const uint8_t *w, int64_t blocks, const int8_t *act) {
    const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0C), m2 = _mm512_set1_epi8(0x30),
                  m3 = _mm512_set1_epi8(static_cast<char>(0xC0));
    // acc<row><plane>, written out: GCC 12 keeps an array of accumulators in memory.
    __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m512i a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
    for (int64_t b = 0; b < blocks; ++b, w += TILE_ROWS * T2P_BLOCK_BYTES, act += QK_K) {
        for (int r = 0; r < TILE_ROWS; ++r) prefetch_line<P>(w + GEMV_PREFETCH + r * 64);
        const __m512i v0 = in_register(_mm512_loadu_si512(act));
        const __m512i v1 = in_register(_mm512_loadu_si512(act + 64));
        const __m512i v2 = in_register(_mm512_loadu_si512(act + 128));
        const __m512i v3 = in_register(_mm512_loadu_si512(act + 192));
#define RYZ_ROW(r)                                                                     \
        {                                                                              \
            const __m512i x = in_register(_mm512_loadu_si512(w + r * T2P_BLOCK_BYTES)); \
            a##r##0 = dpbusd(a##r##0, _mm512_and_si512(x, m0), v0);                    \
            a##r##1 = dpbusd(a##r##1, _mm512_and_si512(x, m1), v1);                    \
            a##r##2 = dpbusd(a##r##2, _mm512_and_si512(x, m2), v2);                    \
            a##r##3 = dpbusd(a##r##3, _mm512_and_si512(x, m3), v3);                    \
        }
        RYZ_ROW(0) RYZ_ROW(1) RYZ_ROW(2) RYZ_ROW(3)
#undef RYZ_ROW
    }
#define RYZ_COMBINE(r) _mm512_add_epi32(_mm512_add_epi32(a##r##0, _mm512_srai_epi32(a##r##1, 2)), \
                                        _mm512_add_epi32(_mm512_srai_epi32(a##r##2, 4), _mm512_srai_epi32(a##r##3, 6)))
    const __m128i s = hsum4_epi32(RYZ_COMBINE(0), RYZ_COMBINE(1), RYZ_COMBINE(2), RYZ_COMBINE(3));
#undef RYZ_COMBINE
    return s;
}

// Prefill / batched decode: one row tile (4 rows) times T tokens, held in 4*T zmm accumulators across
// the whole row. Each weight plane is unpacked once per block and reused by the T tokens (token_tile);
// each activation vector is loaded once per plane and reused by the 4 rows (pinned in a register:
// folded into the 4 vpdpbusd, it was 4 loads, 112 per block for 96 vpdpbusd, more than the 2 load
// ports retire in the 48 cycles those take).
// Here the planes are shifted down (vpsrlw + vpand) rather than kept scaled as in the GEMV: scaled
// planes would need 4 accumulators per (row, token); the shifts are amortised over T tokens instead.
// Per plane step: 4T vpdpbusd, T activation loads, <= 4 shift/and pairs. Weights are prefetched as in the
// GEMV: batched decode streams them from DRAM once, and without it 4 tokens ran at ~1/3 of the GEMV's
// read rate (the loop's compute hid none of the misses).
template <Prefetch P, int T>
inline void gemm_micro(const uint8_t *w, int64_t blocks, int64_t cols, const int8_t *act, const int32_t *sums,
                       int32_t *out, int64_t out_stride) {
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i acc[TILE_ROWS][T];
#pragma GCC unroll 4
    for (int r = 0; r < TILE_ROWS; ++r)
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
    for (int64_t b = 0; b < blocks; ++b, w += TILE_ROWS * T2P_BLOCK_BYTES, act += QK_K) {
        for (int r = 0; r < TILE_ROWS; ++r) prefetch_line<P>(w + GEMV_PREFETCH + r * 64);
#pragma GCC unroll 4
        for (int l = 0; l < 4; ++l) {
            __m512i p[TILE_ROWS];
#pragma GCC unroll 4
            for (int r = 0; r < TILE_ROWS; ++r) {
                const __m512i x = _mm512_loadu_si512(w + r * T2P_BLOCK_BYTES);
                p[r] = _mm512_and_si512(l == 0 ? x : _mm512_srli_epi16(x, 2 * l), m3);
            }
#pragma GCC unroll 8
            for (int t = 0; t < T; ++t) {
                const __m512i a = in_register(_mm512_loadu_si512(act + t * cols + 64 * l));
#pragma GCC unroll 4
                for (int r = 0; r < TILE_ROWS; ++r) acc[r][t] = dpbusd(acc[r][t], p[r], a);
            }
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
        const __m128i s = _mm_sub_epi32(hsum4_epi32(acc[0][t], acc[1][t], acc[2][t], acc[3][t]), _mm_set1_epi32(sums[t]));
        _mm_storeu_si128(reinterpret_cast<__m128i *>(out + t * out_stride), s);
    }
}

using MicroFn = void (*)(const uint8_t *, int64_t, int64_t, const int8_t *, const int32_t *, int32_t *, int64_t);

// Token tiles 1..6 (4 x 6 = 24 accumulators + 4 planes + activation + mask = 30 of 32 zmm). Larger
// requests act as 6: 2-row halves of the tile with 7-8 tokens were measured at ~60% of the 4-row
// kernels (each activation vector then feeds only 2 vpdpbusd). Default 6: 4, 5 and 6 are within noise
// of each other on Zen 5 (64 tokens: 90-95% of the vpdpbusd peak in short runs at full clock), and 6
// unpacks least often.
constexpr int MAX_TOKEN_TILE = 6;
constexpr int DEFAULT_TOKEN_TILE = 6;
template <Prefetch P>
constexpr MicroFn MICRO[MAX_TOKEN_TILE + 1] = {nullptr, gemm_micro<P, 1>, gemm_micro<P, 2>, gemm_micro<P, 3>,
                                               gemm_micro<P, 4>, gemm_micro<P, 5>, gemm_micro<P, 6>};

template <Prefetch P>
void ternary_gemm_rows(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, const int8_t *act,
                       const int32_t *act_sums, int32_t n_tokens, int32_t token_tile, int32_t *out, int64_t out_stride) {
    const int64_t blocks = cols / QK_K;
    ternary_gemm_tiles(packed, row_begin, row_end, cols, n_tokens, token_tile, MAX_TOKEN_TILE, DEFAULT_TOKEN_TILE, out, out_stride,
        [&](const uint8_t *w, int64_t r) { _mm_storeu_si128(reinterpret_cast<__m128i *>(out + r), _mm_sub_epi32(gemv_tile<P>(w, blocks, act), _mm_set1_epi32(act_sums[0]))); },
        [&](int n, const uint8_t *w, int64_t t, int64_t r) { MICRO<P>[n](w, blocks, cols, act + t * cols, act_sums + t, out + t * out_stride + r, out_stride); });
}

void ternary_gemm_avx512(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, const int8_t *act,
                         const int32_t *act_sums, int32_t n_tokens, int32_t token_tile, int32_t *out, int64_t out_stride) {
    (prefetch_to_l2() ? ternary_gemm_rows<Prefetch::L2> : ternary_gemm_rows<Prefetch::L1>)(packed, row_begin, row_end, cols, act, act_sums,
                                                                                            n_tokens, token_tile, out, out_stride);
}

// ---------------------------------------------------------------------------------------------
// Ternary GEMV / GEMM over T1P (1.6 bpw, blocks.h; scalar spec: ternary_gemm_t1p_scalar)
// ---------------------------------------------------------------------------------------------

// Decode over T1P without decoding digits. For a byte q let q_k = 3^k q mod 256 (q_{k+1} = q_k * 3,
// two wrapping byte adds). Digit k is d_k = floor(3 q_k / 256), and 3 q_k = 256 d_k + q_{k+1} exactly,
// so d_k * a = (3 q_k a - q_{k+1} a) / 256. vpdpbusd takes q_k and q_{k+1} as they are (unsigned bytes):
// A_k += q_k . a_k and B_k += q_{k+1} . a_k, and at the end each 32-bit lane holds 3 A - B = 256 x its
// exact sum of d * a (A and B of a byte land in the same lane), an exact arithmetic shift by 8 away.
// Per 64-byte vector (320 weights): 10 vpaddb + 10 vpdpbusd + 1 load + 5 broadcast loads; the digit
// compare route (2 vpcmpub into masks, a masked move and add per digit, then vpdpbusd) took ~35 vector
// ops. Lanes 4r..4r+3 are row r (blocks.h), so one accumulator serves the whole tile.
// Bound: a lane adds 20 products <= 255 * 128 per vector, so 3 A stays < 2^31 over 512 vectors (40960
// columns); longer rows are folded every 512 vectors.
constexpr int64_t T1P_FOLD_VECTORS = 512;

inline __m512i bcast16(const int8_t *p) { return in_register(_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)))); }
inline __m512i times3(__m512i q) { return _mm512_add_epi8(_mm512_add_epi8(q, q), q); }
// The intrinsic here: with the asm dpbusd GCC 12 added 6 register copies per vector to this loop; with the
// intrinsic it has none (and does not fold the broadcasts, which vpdpbusd could not take as memory operands).
inline __m512i dpbusd_i(__m512i acc, __m512i u8, __m512i s8) { return _mm512_dpbusd_epi32(acc, u8, s8); }

template <Prefetch P>
inline __m128i gemv_t1p_tile(const uint8_t *w, int64_t nv, int64_t cols, const int8_t *act) {
    __m512i total = _mm512_setzero_si512();
    const int tail_groups = static_cast<int>((cols - (nv - 1) * T1P_VECTOR_COLS) / 16);  // digits of the last vector with columns
    for (int64_t i0 = 0; i0 < nv; i0 += T1P_FOLD_VECTORS) {
        const int64_t i1 = std::min(nv, i0 + T1P_FOLD_VECTORS);
        __m512i A0 = _mm512_setzero_si512(), A1 = A0, A2 = A0, A3 = A0, A4 = A0, B0 = A0, B1 = A0, B2 = A0, B3 = A0, B4 = A0;
        const int64_t full_end = i1 == nv ? nv - 1 : i1;
        const uint8_t *p = w + i0 * T1P_VECTOR_BYTES;
        const int8_t *a = act + i0 * T1P_VECTOR_COLS;
        for (int64_t i = i0; i < full_end; ++i, p += T1P_VECTOR_BYTES, a += T1P_VECTOR_COLS) {
            prefetch_line<P>(p + GEMV_PREFETCH);
            const __m512i a0 = bcast16(a), a1 = bcast16(a + 16), a2 = bcast16(a + 32), a3 = bcast16(a + 48), a4 = bcast16(a + 64);
            const __m512i q0 = in_register(_mm512_loadu_si512(p));
            A0 = dpbusd_i(A0, q0, a0);
            const __m512i q1 = times3(q0);
            A1 = dpbusd_i(A1, q1, a1);
            B0 = dpbusd_i(B0, q1, a0);
            const __m512i q2 = times3(q1);
            A2 = dpbusd_i(A2, q2, a2);
            B1 = dpbusd_i(B1, q2, a1);
            const __m512i q3 = times3(q2);
            A3 = dpbusd_i(A3, q3, a3);
            B2 = dpbusd_i(B2, q3, a2);
            const __m512i q4 = times3(q3);
            A4 = dpbusd_i(A4, q4, a4);
            B3 = dpbusd_i(B3, q4, a3);
            B4 = dpbusd_i(B4, times3(q4), a4);
        }
        if (i1 == nv) {  // the last vector: digits without columns are skipped (their activations would be past the row)
            __m512i q = _mm512_loadu_si512(p);
            __m512i *As[5] = {&A0, &A1, &A2, &A3, &A4}, *Bs[5] = {&B0, &B1, &B2, &B3, &B4};
            for (int k = 0; k < tail_groups; ++k) {
                const __m512i ak = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i *>(a + 16 * k)));
                const __m512i next = times3(q);
                *As[k] = dpbusd(*As[k], q, ak);
                *Bs[k] = dpbusd(*Bs[k], next, ak);
                q = next;
            }
        }
        const __m512i A = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(A0, A1), _mm512_add_epi32(A2, A3)), A4);
        const __m512i B = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(B0, B1), _mm512_add_epi32(B2, B3)), B4);
        total = _mm512_add_epi32(total, _mm512_srai_epi32(_mm512_sub_epi32(_mm512_add_epi32(_mm512_add_epi32(A, A), A), B), 8));
    }
    // lanes 4r..4r+3 -> row r
    const __m512i s1 = _mm512_add_epi32(total, _mm512_shuffle_epi32(total, _MM_PERM_BADC));
    const __m512i s2 = _mm512_add_epi32(s1, _mm512_shuffle_epi32(s1, _MM_PERM_CDAB));  // every lane of a 128-bit lane: its sum
    return _mm512_castsi512_si128(_mm512_maskz_compress_epi32(0x1111, s2));
}

}  // namespace

// One T1P row tile (TILE_ROWS rows, nv vectors at `tile`) -> code+1 bytes: row r's column c at
// codes[r * stride + c], stride >= nv * 80 (columns past the row's end come out as 1: weight 0). The digits
// by compares ([q_k >= 86] + [q_k >= 171]). Outside the anonymous namespace: the AMX family uses it too.
void t1p_codes_avx512(const uint8_t *tile, int64_t nv, uint8_t *codes, int64_t stride) {
    const __m512i one = _mm512_set1_epi8(1), lo = _mm512_set1_epi8(85), hi = _mm512_set1_epi8(static_cast<char>(170));
    for (int64_t i = 0; i < nv; ++i) {
        __m512i q = _mm512_loadu_si512(tile + i * T1P_VECTOR_BYTES);
        for (int k = 0; k < 5; ++k) {
            const __m512i d1 = _mm512_maskz_mov_epi8(_mm512_cmpgt_epu8_mask(q, lo), one);
            const __m512i d = _mm512_mask_add_epi8(d1, _mm512_cmpgt_epu8_mask(q, hi), d1, one);
            uint8_t *c = codes + i * T1P_VECTOR_COLS + 16 * k;
            _mm_storeu_si128(reinterpret_cast<__m128i *>(c), _mm512_castsi512_si128(d));
            _mm_storeu_si128(reinterpret_cast<__m128i *>(c + stride), _mm512_extracti32x4_epi32(d, 1));
            _mm_storeu_si128(reinterpret_cast<__m128i *>(c + 2 * stride), _mm512_extracti32x4_epi32(d, 2));
            _mm_storeu_si128(reinterpret_cast<__m128i *>(c + 3 * stride), _mm512_extracti32x4_epi32(d, 3));
            q = times3(q);
        }
    }
}

// T1P rows [row_begin, row_end) -> T2P at dst (t1p_gemm_via_t2p's `expand`): each row tile's code bytes
// (t1p_codes_avx512), then four code vectors per T2P block.
void t1p_to_t2p_avx512(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, uint8_t *dst) {
    const int64_t nv = t1p_vectors(cols), blocks = cols / QK_K, stride = nv * T1P_VECTOR_COLS;
    thread_local std::vector<uint8_t> codes;
    if (codes.size() < static_cast<size_t>(TILE_ROWS * stride)) codes.resize(static_cast<size_t>(TILE_ROWS * stride));
    for (int64_t r0 = row_begin; r0 < row_end; r0 += TILE_ROWS) {
        t1p_codes_avx512(packed + (r0 / TILE_ROWS) * nv * T1P_VECTOR_BYTES, nv, codes.data(), stride);
        uint8_t *o = dst + (r0 - row_begin) / TILE_ROWS * blocks * TILE_ROWS * T2P_BLOCK_BYTES;
        for (int64_t b = 0; b < blocks; ++b)
            for (int r = 0; r < TILE_ROWS; ++r, o += T2P_BLOCK_BYTES) {
                const uint8_t *c = codes.data() + r * stride + b * QK_K;
                // codes are <= 2, so 16-bit shifts by up to 6 move no bit across a byte
                const __m512i c0 = _mm512_loadu_si512(c), c1 = _mm512_loadu_si512(c + 64), c2 = _mm512_loadu_si512(c + 128),
                              c3 = _mm512_loadu_si512(c + 192);
                _mm512_storeu_si512(o, _mm512_or_si512(_mm512_or_si512(c0, _mm512_slli_epi16(c1, 2)),
                                                       _mm512_or_si512(_mm512_slli_epi16(c2, 4), _mm512_slli_epi16(c3, 6))));
            }
    }
}

namespace {

// Decode: the GEMV above per row tile. Several tokens: expand 32-row groups to T2P once per block of
// up to 512 KB of activations and run the T2P kernels on them (same integers; the expansion is shared
// by the block's tokens).
void ternary_gemm_t1p_avx512(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, const int8_t *act,
                             const int32_t *act_sums, int32_t n_tokens, int32_t token_tile, int32_t *out, int64_t out_stride) {
    if (row_end <= row_begin || n_tokens < 1) return;
    if (n_tokens == 1) {
        const int64_t nv = t1p_vectors(cols);
        const auto tile = prefetch_to_l2() ? gemv_t1p_tile<Prefetch::L2> : gemv_t1p_tile<Prefetch::L1>;
        for (int64_t r = row_begin; r < row_end; r += TILE_ROWS)
            _mm_storeu_si128(reinterpret_cast<__m128i *>(out + r),
                             _mm_sub_epi32(tile(packed + (r / TILE_ROWS) * nv * T1P_VECTOR_BYTES, nv, cols, act), _mm_set1_epi32(act_sums[0])));
        return;
    }
    t1p_gemm_expanding(packed, row_begin, row_end, cols, act, act_sums, n_tokens, token_tile, out, out_stride, t1p_to_t2p_avx512, ternary_gemm_avx512);
}

// ---------------------------------------------------------------------------------------------
// Dense GEMM (output head, embedding)
// ---------------------------------------------------------------------------------------------

inline float half_to_float(fp16_t h) { return _cvtsh_ss(h); }  // F16C: exact, like fp16_to_fp32

// Every dense kernel below computes, per row and token, one accumulator vector whose lane i sums the
// products of columns k = i (mod 16) in increasing k with FMA, then _mm512_reduce_add_ps (a fixed
// tree). Rows are processed R at a time so each x vector feeds R rows; rows past the end of the range
// repeat the last row and are discarded, so every row goes through the identical operations. Each
// row is its own stream: software prefetch dense_prefetch<P> bytes ahead in each, as in the GEMV (the
// head is 100s of MB, read once per token; without it the loop reached ~40% of a plain read). Into L2
// (Intel), 4 KB ahead: the Q6_K head went from 15-17 to 19-21 GB/s on 2 threads, Q8_0 stayed at 21-25.
template <Prefetch P>
constexpr int64_t dense_prefetch = P == Prefetch::L2 ? 4096 : 2048;

// The R rows of a pass are consecutive in memory, so dense_prefetch<P> past byte `off` of a row is the
// same row further on, or once that runs past the row's end, the same row of the next pass (R rows
// down): without that jump every pass started with R cold streams.
template <Prefetch P>
inline size_t prefetch_offset(size_t off, size_t rb, int R) {
    return off + dense_prefetch<P> + (off + dense_prefetch<P> >= rb ? (R - 1) * rb : 0);
}

// Row pointers of a pass: rows past the end of the range repeat the last row (results discarded).
#define RYZ_DENSE_ROWS                                                                              \
    const uint8_t *rows[R];                                                                         \
    for (int i = 0; i < R; ++i) rows[i] = w + static_cast<size_t>(std::min(i, n_rows - 1)) * rb;

// Reduce and store: compile-time indices only (a runtime index would make GCC keep the accumulator
// array in memory and store it on every loop iteration).
template <int R, int T>
inline void store_rows(const __m512 (&acc)[R][T], float *out, int64_t out_stride, int n_rows) {
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
        float res[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) res[r] = _mm512_reduce_add_ps(acc[r][t]);
        if (n_rows == R) {  // a fixed count: plain stores (with n_rows GCC called memcpy, per pass and token)
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) out[t * out_stride + r] = res[r];
        } else {
            for (int r = 0; r < n_rows; ++r) out[t * out_stride + r] = res[r];
        }
    }
}

// F32 / F16 rows, one 64-byte line of each row per step (one prefetch per row). 4 rows per pass: 8
// rows (more FMA chains) measured slower, from DRAM and for 4 tokens (register pressure).
template <Prefetch P, bool HALF, int R, int T>
void dense_plain(const uint8_t *w, size_t rb, int n_rows, int64_t cols, const float *x, float *out, int64_t out_stride) {
    RYZ_DENSE_ROWS
    constexpr int ES = HALF ? 2 : 4;          // element size
    constexpr int STEP = 64 / ES;             // columns per 64-byte line of a row: one prefetch each
    __m512 acc[R][T];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    auto chunk = [&](int64_t k, __mmask16 m) {
        __m512 wv[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            if constexpr (HALF) {
                wv[r] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, rows[r] + k * ES));
            } else {
                wv[r] = _mm512_maskz_loadu_ps(m, rows[r] + k * ES);
            }
        }
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) {
            const __m512 xv = _mm512_maskz_loadu_ps(m, x + t * cols + k);
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) acc[r][t] = _mm512_mask3_fmadd_ps(wv[r], xv, acc[r][t], m);
        }
    };
    int64_t k = 0;
    for (; k + STEP <= cols; k += STEP) {
        const size_t pf = prefetch_offset<P>(static_cast<size_t>(k * ES), rb, R);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) prefetch_line<P>(rows[r] + pf);
#pragma GCC unroll 2
        for (int j = 0; j < STEP; j += 16) chunk(k + j, static_cast<__mmask16>(0xFFFF));
    }
    for (; k < cols; k += 16)  // masked-off lanes keep their accumulator unchanged
        chunk(k, tail_mask(cols - k));
    store_rows<R, T>(acc, out, out_stride, n_rows);
}

// Q8_0 rows, a block (32 columns, two vectors) per step: d converted once per block, values d * q
// (an 11-bit by 8-bit product: exact in float, the same value dequantize_row makes). 8 rows per pass:
// from DRAM ~90% of a plain read, against ~80% with 4 (the loop is not far above DRAM speed, hot
// ~45 GB/s on Zen 5, so more independent streams help). Each activation vector is loaded once for the R
// rows; a row's operations are the same for any R and T: acc = fma(w0, x0, acc), then fma(w1, x1, acc).
template <Prefetch P, int R, int T>
void dense_q8_0(const uint8_t *w, size_t rb, int n_rows, int64_t cols, const float *x, float *out, int64_t out_stride) {
    RYZ_DENSE_ROWS
    __m512 acc[R][T];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < cols / QK8_0; ++b) {
        const size_t pf = prefetch_offset<P>(b * sizeof(block_q8_0), rb, R);
        __m512 w0[R], w1[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const uint8_t *blk = rows[r] + b * sizeof(block_q8_0);
            prefetch_line<P>(rows[r] + pf);
            fp16_t dh;
            std::memcpy(&dh, blk + offsetof(block_q8_0, d), sizeof dh);
            const __m512 d = _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(dh)));
            const uint8_t *qs = blk + offsetof(block_q8_0, qs);
            w0[r] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(qs)))));
            w1[r] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(qs + 16)))));
        }
        // Every loop unrolled (a runtime token index would put acc in memory), and each x vector pinned to a
        // register: GCC otherwise folds a load of it into every FMA, which at 8 tokens (80 KB of x at 2560
        // columns: L2, not L1) made the 3 x 8 kernel L2-bound and slower than 4 x 4.
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) {
            __m512 x0 = _mm512_loadu_ps(x + t * cols + b * QK8_0);
            asm("" : "+v"(x0));
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(w0[r], x0, acc[r][t]);
            __m512 x1 = _mm512_loadu_ps(x + t * cols + b * QK8_0 + 16);
            asm("" : "+v"(x1));
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(w1[r], x1, acc[r][t]);
        }
    }
    store_rows<R, T>(acc, out, out_stride, n_rows);
}

// Q6_K rows. Half h (128 columns) of a block in ggml's layout, l = 0..31: column 32g + l of the half is
//   g = 0: ql[l] & 15 | (qh[l] & 3) << 4        g = 1: ql[l+32] & 15 | (qh[l] >> 2 & 3) << 4
//   g = 2: ql[l] >> 4 | (qh[l] >> 4 & 3) << 4   g = 3: ql[l+32] >> 4 | (qh[l] >> 6 & 3) << 4
// minus 32, with scale[8h + 2g + l / 16]. Each group of 32 is built with 256-bit byte ops, widened to
// two float vectors and multiplied into the accumulators at once (no buffer: GCC turned a
// dequantise-to-L1 version into spill-heavy code at half this speed). Values are dequantize_row's:
// (d * scale) * (q - 32), d * scale exact (11-bit by 8-bit), one rounding for the product with q.
template <Prefetch P, int R, int T>
void dense_q6_k(const uint8_t *w, size_t rb, int n_rows, int64_t cols, const float *x, float *out, int64_t out_stride) {
    RYZ_DENSE_ROWS
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3), bias = _mm256_set1_epi8(32);
    __m512 acc[R][T];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < cols / QK_K; ++b) {
        const size_t pf = prefetch_offset<P>(b * sizeof(block_q6_k), rb, R);
        const float *xb = x + b * QK_K;
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            for (int i = 0; i < 256; i += 64) prefetch_line<P>(rows[r] + pf + i);
            const block_q6_k *blk = reinterpret_cast<const block_q6_k *>(rows[r] + b * sizeof(block_q6_k));
            alignas(64) float sc[16];
            _mm512_store_ps(sc, _mm512_mul_ps(_mm512_set1_ps(half_to_float(blk->d)),
                                              _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(blk->scales))))));
            for (int h = 0; h < 2; ++h) {
                const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk->ql + 64 * h));
                const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk->ql + 64 * h + 32));
                const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk->qh + 32 * h));
#pragma GCC unroll 4
                for (int g = 0; g < 4; ++g) {
                    const __m256i lo = (g & 2) ? _mm256_and_si256(_mm256_srli_epi16(g & 1 ? ql1 : ql0, 4), m4) : _mm256_and_si256(g & 1 ? ql1 : ql0, m4);
                    const __m256i hi = _mm256_and_si256(g ? _mm256_srli_epi16(qh, 2 * g) : qh, m2);
                    const __m256i v = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), bias);
                    const __m512 w0 = _mm512_mul_ps(_mm512_set1_ps(sc[8 * h + 2 * g]), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v))));
                    const __m512 w1 = _mm512_mul_ps(_mm512_set1_ps(sc[8 * h + 2 * g + 1]), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1))));
                    const float *xc = xb + 128 * h + 32 * g;
#pragma GCC unroll 4
                    for (int t = 0; t < T; ++t)
                        acc[r][t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xc + t * cols + 16), _mm512_fmadd_ps(w0, _mm512_loadu_ps(xc + t * cols), acc[r][t]));
                }
            }
        }
    }
    store_rows<R, T>(acc, out, out_stride, n_rows);
}

// Q6_K rows with VBMI (used when the CPU has it and x passes q6_k_fast_x): the same weights and FMAs
// in the same order as dense_q6_k, with the dequantisation rebuilt. Every weight (d * scale) * (q - 32)
// is exact in float (d: 11 significant bits, scale: 7, q - 32: 5 or the power of two 32, so <= 23
// bits; no overflow or underflow), so any exact way of producing it gives the same value. Here the
// 64 six-bit q of a half-group are assembled as bytes with zmm bit ops, one vpermt2b per 16 columns
// moves each q to byte 2 of a dword under the constant byte 0x43 (the float 128 + q, exact), and
// one FMA gives (128 + q) * s - 160 * s = s * (q - 32) with s = d * scale and -160 * s exact (21
// bits): one rounding of an exact value, i.e. the value itself. This replaces widen, convert and
// multiply (3 uops) by permute and FMA (2). The one difference is the sign of a zero weight (q = 32
// with s < 0, or s = 0): +0 here. A zero weight's product only changes an accumulator that is exactly
// -0, and an accumulator starts at +0 and can only become -0 by rounding a negative sum of magnitude
// below 2^-150 to zero; with every nonzero finite |x| >= 2^-60 each weight (a multiple of 2^-24)
// times x is a multiple of 2^-107, so every accumulator stays a multiple of 2^-107 and never rounds
// to zero from a nonzero sum (q6_k_fast_x checks this once per call; otherwise dense_q6_k runs).
// Non-finite d (inf * 0 vs NaN) sends that block of that row to dense_q6_k's code.
inline bool q6_k_fast_x(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        uint32_t b;
        std::memcpy(&b, x + i, sizeof b);
        b &= 0x7FFFFFFFu;
        if (b != 0 && b < (67u << 23)) return false;  // nonzero with |x| < 2^-60 (denormals included)
    }
    return true;
}

template <int T>
inline void q6_k_block_plain(const block_q6_k *blk, const float *xb, int64_t cols, __m512 (&acc)[T]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3), bias = _mm256_set1_epi8(32);
    alignas(64) float sc[16];
    _mm512_store_ps(sc, _mm512_mul_ps(_mm512_set1_ps(half_to_float(blk->d)),
                                      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(blk->scales))))));
    for (int h = 0; h < 2; ++h) {
        const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk->ql + 64 * h));
        const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk->ql + 64 * h + 32));
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk->qh + 32 * h));
        for (int g = 0; g < 4; ++g) {
            const __m256i lo = (g & 2) ? _mm256_and_si256(_mm256_srli_epi16(g & 1 ? ql1 : ql0, 4), m4) : _mm256_and_si256(g & 1 ? ql1 : ql0, m4);
            const __m256i hi = _mm256_and_si256(g ? _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * g)) : qh, m2);
            const __m256i v = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), bias);
            const __m512 w0 = _mm512_mul_ps(_mm512_set1_ps(sc[8 * h + 2 * g]), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v))));
            const __m512 w1 = _mm512_mul_ps(_mm512_set1_ps(sc[8 * h + 2 * g + 1]), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1))));
            const float *xc = xb + 128 * h + 32 * g;
            for (int t = 0; t < T; ++t)
                acc[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xc + t * cols + 16), _mm512_fmadd_ps(w0, _mm512_loadu_ps(xc + t * cols), acc[t]));
        }
    }
}

template <Prefetch P, int R, int T>
__attribute__((target("avx512vbmi"))) void dense_q6_k_vbmi(const uint8_t *w, size_t rb, int n_rows, int64_t cols, const float *x, float *out,
                                                           int64_t out_stride) {
    RYZ_DENSE_ROWS
    const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30), top = _mm512_set1_epi32(0x43000000);
    // qh bits 2g..2g+1 to bits 4..5: g = 0 | 1 in the low | high 32 bytes (shift left 4 | 2), g = 2 | 3 (right 0 | 2)
    const __m512i shl = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i shr = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    // Sub-block k: byte 2 of dword i takes q[16k + i] (idx[k]); the other bytes keep top's 0x43000000.
    const __mmask64 byte2 = 0x4444444444444444ull;
    __m512i idx[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k)
        idx[k] = _mm512_slli_epi32(_mm512_add_epi32(_mm512_set1_epi32(16 * k), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)), 16);
    const __m512 neg160 = _mm512_set1_ps(-160.0f);
    __m512 acc[R][T];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < cols / QK_K; ++b) {
        const size_t pf = prefetch_offset<P>(b * sizeof(block_q6_k), rb, R);
        const float *xb = x + b * QK_K;
        const block_q6_k *blk[R];
        bool finite = true;
        alignas(64) float sc[R][16], cc[R][16];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            for (int i = 0; i < 256; i += 64) prefetch_line<P>(rows[r] + pf + i);
            blk[r] = reinterpret_cast<const block_q6_k *>(rows[r] + b * sizeof(block_q6_k));
            fp16_t dh;
            std::memcpy(&dh, &blk[r]->d, sizeof dh);
            finite = finite && (dh & 0x7C00) != 0x7C00;
            const __m512 s = _mm512_mul_ps(_mm512_set1_ps(half_to_float(dh)),
                                           _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(blk[r]->scales)))));
            _mm512_store_ps(sc[r], s);
            _mm512_store_ps(cc[r], _mm512_mul_ps(s, neg160));
        }
        if (__builtin_expect(!finite, 0)) {  // an inf or NaN d: this block the plain way (a row's order is its own)
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) q6_k_block_plain<T>(blk[r], xb, cols, acc[r]);
            continue;
        }
        // Broadcast from memory (load ports): without this GCC keeps s in a register and spends a
        // vpermd (port 5, the permute's port) per broadcast.
        asm("" : "+m"(sc), "+m"(cc));
        // The R rows advance together, sub-block by sub-block: each row's accumulator is one FMA
        // chain (the fixed order), so R chains in flight hide the FMA latency.
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            __m512i A[R][2];
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                const __m512i L = _mm512_loadu_si512(blk[r]->ql + 64 * h);
                const __m512i Q = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk[r]->qh + 32 * h)));
                // (L & 0x0F) | (qh bits & 0x30): ternlog (a & c) | b = 0xEC
                A[r][0] = _mm512_ternarylogic_epi32(L, _mm512_and_si512(_mm512_sllv_epi16(Q, shl), m30), m4, 0xEC);
                A[r][1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(L, 4), _mm512_and_si512(_mm512_srlv_epi16(Q, shr), m30), m4, 0xEC);
            }
#pragma GCC unroll 2
            for (int a = 0; a < 2; ++a)
#pragma GCC unroll 4
                for (int k = 0; k < 4; ++k) {
                    const int j = 8 * h + 4 * a + k;
                    const float *xc = xb + 16 * j;
#pragma GCC unroll 8
                    for (int r = 0; r < R; ++r) {
                        const __m512 fl = _mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(top, byte2, idx[k], A[r][a]));
                        const __m512 wv = _mm512_fmadd_ps(fl, _mm512_set1_ps(sc[r][j]), _mm512_set1_ps(cc[r][j]));
#pragma GCC unroll 4
                        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xc + t * cols), acc[r][t]);
                    }
                }
        }
    }
    store_rows<R, T>(acc, out, out_stride, n_rows);
}

using DenseFn = void (*)(const uint8_t *, size_t, int, int64_t, const float *, float *, int64_t);

// R rows per pass and kernels for 8 and 4 (if registers allow), 2 and 1 tokens; n_tokens is covered greedily.
template <int R, DenseFn F1, DenseFn F2, DenseFn F4 = nullptr, DenseFn F8 = nullptr>
void dense_rows(const uint8_t *w, size_t rb, int64_t row_begin, int64_t row_end, int64_t cols, const float *x,
                int32_t n_tokens, float *out, int64_t out_stride) {
    for (int64_t r = row_begin; r < row_end; r += R) {
        const int n_rows = static_cast<int>(std::min<int64_t>(R, row_end - r));
        const uint8_t *first = w + static_cast<size_t>(r) * rb;
        int32_t t = 0;
        if constexpr (F8 != nullptr)
            for (; t + 8 <= n_tokens; t += 8) F8(first, rb, n_rows, cols, x + t * cols, out + t * out_stride + r, out_stride);
        if constexpr (F4 != nullptr)
            for (; t + 4 <= n_tokens; t += 4) F4(first, rb, n_rows, cols, x + t * cols, out + t * out_stride + r, out_stride);
        for (; t + 2 <= n_tokens; t += 2) F2(first, rb, n_rows, cols, x + t * cols, out + t * out_stride + r, out_stride);
        for (; t < n_tokens; ++t) F1(first, rb, n_rows, cols, x + t * cols, out + t * out_stride + r, out_stride);
    }
}

template <Prefetch P>
void dense_gemm_rows(const void *w, int32_t type, int64_t row_begin, int64_t row_end, int64_t cols, const float *x,
                     int32_t n_tokens, float *out, int64_t out_stride) {
    const uint8_t *base = static_cast<const uint8_t *>(w);
    const size_t rb = row_bytes(type, cols);
    switch (type) {
        case RYZ_TYPE_F32:
            dense_rows<4, dense_plain<P, false, 4, 1>, dense_plain<P, false, 4, 2>, dense_plain<P, false, 4, 4>>(base, rb, row_begin, row_end, cols, x, n_tokens, out, out_stride);
            break;
        case RYZ_TYPE_F16:
            dense_rows<4, dense_plain<P, true, 4, 1>, dense_plain<P, true, 4, 2>, dense_plain<P, true, 4, 4>>(base, rb, row_begin, row_end, cols, x, n_tokens, out, out_stride);
            break;
        case RYZ_TYPE_Q8_0:
            // 8 rows for decode; 3 rows x 8 tokens from 8 tokens (each weight dequantized once per 8 tokens; 24
            // accumulators, 6 weight and 1 activation vector fill the registers, and each activation load serves 3
            // FMAs); 4 rows x up to 4 tokens otherwise (8 x 2 runs out of registers). A row's operations are the
            // same either way, so its result does not depend on n_tokens.
            if (n_tokens == 1)
                dense_rows<8, dense_q8_0<P, 8, 1>, dense_q8_0<P, 8, 1>>(base, rb, row_begin, row_end, cols, x, n_tokens, out, out_stride);
            else if (n_tokens >= 8)
                dense_rows<3, dense_q8_0<P, 3, 1>, dense_q8_0<P, 3, 2>, dense_q8_0<P, 3, 4>, dense_q8_0<P, 3, 8>>(base, rb, row_begin, row_end, cols, x, n_tokens,
                                                                                                            out, out_stride);
            else
                dense_rows<4, dense_q8_0<P, 4, 1>, dense_q8_0<P, 4, 2>, dense_q8_0<P, 4, 4>>(base, rb, row_begin, row_end, cols, x, n_tokens, out, out_stride);
            break;
        case RYZ_TYPE_Q6_K: {
            static const bool vbmi = __builtin_cpu_supports("avx512vbmi");
            // 4 rows in decode too: 8 measured no faster from DRAM (Xeon 0xA7, 2 cores).
            if (vbmi && q6_k_fast_x(x, static_cast<int64_t>(n_tokens) * cols))
                dense_rows<4, dense_q6_k_vbmi<P, 4, 1>, dense_q6_k_vbmi<P, 4, 2>, dense_q6_k_vbmi<P, 4, 4>>(base, rb, row_begin, row_end, cols, x, n_tokens, out, out_stride);
            else
                dense_rows<4, dense_q6_k<P, 4, 1>, dense_q6_k<P, 4, 2>, dense_q6_k<P, 4, 4>>(base, rb, row_begin, row_end, cols, x, n_tokens, out, out_stride);
            break;
        }
        default:
            dense_gemm_scalar(w, type, row_begin, row_end, cols, x, n_tokens, out, out_stride);
            break;
    }
}

void dense_gemm_avx512(const void *w, int32_t type, int64_t row_begin, int64_t row_end, int64_t cols, const float *x,
                       int32_t n_tokens, float *out, int64_t out_stride) {
    (prefetch_to_l2() ? dense_gemm_rows<Prefetch::L2> : dense_gemm_rows<Prefetch::L1>)(w, type, row_begin, row_end, cols, x, n_tokens,
                                                                                        out, out_stride);
}

// ---------------------------------------------------------------------------------------------
// Activation quantisation
// ---------------------------------------------------------------------------------------------

// Bit-identical to quantize_act_scalar: max is exact and order-free; the scale is the same scalar
// expression; x * s is one rounded float multiply (no FMA); roundscale(NEAREST) is rint with
// round-half-even; clamping with max(v, -128) then min(v, 127) mirrors fmax/fmin, including NaN
// (vmaxps returns its second operand when either is NaN, as fmax returns the non-NaN one):
// a NaN |x| leaves the running max unchanged and a NaN product becomes -128, as in the scalar code.
void quantize_act_avx512(const float *x, int64_t cols, int8_t *q, float *scale, int32_t *sum) {
    const __m512 sign = _mm512_set1_ps(-0.0f);
    __m512 m0 = _mm512_setzero_ps(), m1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= cols; k += 32) {
        m0 = _mm512_max_ps(_mm512_andnot_ps(sign, _mm512_loadu_ps(x + k)), m0);
        m1 = _mm512_max_ps(_mm512_andnot_ps(sign, _mm512_loadu_ps(x + k + 16)), m1);
    }
    for (; k < cols; k += 16) {
        const __mmask16 m = tail_mask(cols - k);
        m0 = _mm512_max_ps(_mm512_andnot_ps(sign, _mm512_maskz_loadu_ps(m, x + k)), m0);
    }
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
    const float s = 127.0f / std::fmax(amax, 1e-5f);
    const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
    __m512i total = _mm512_setzero_si512();
    for (k = 0; k < cols; k += 16) {
        const __mmask16 m = tail_mask(cols - k);
        const __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512i i = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, lo), hi));
        _mm_mask_storeu_epi8(q + k, m, _mm512_cvtepi32_epi8(i));
        total = _mm512_add_epi32(total, _mm512_maskz_mov_epi32(m, i));
    }
    *scale = s;
    *sum = _mm512_reduce_add_epi32(total);
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

// Dot products q . key_p in numpy's pairwise order for d <= 128 terms: lane j of an 8-lane sum adds
// term 8i + j in order, then ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)), mul then add (see avx2.cpp). A zmm
// holds two positions, p in lanes 0-7 and p + 1 in lanes 8-15, against q repeated in both halves, so
// each position's lanes see exactly the AVX2 kernel's operations with half the instructions; four
// such vectors (8 positions) keep the add chains' latency covered.
template <bool HALF>
inline __m512 load_pair(const void *keys, int64_t row0, int64_t row1) {
    if constexpr (HALF) {
        const fp16_t *k = static_cast<const fp16_t *>(keys);
        const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i *>(k + row0));
        const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i *>(k + row1));
        return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
    } else {
        const float *k = static_cast<const float *>(keys);
        return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(k + row0)), _mm256_loadu_ps(k + row1), 1);
    }
}

inline void fold_pair(__m512 r, float *scores) {  // the 8-lane fold of each half
    alignas(64) float v[16];
    _mm512_store_ps(v, r);
    scores[0] = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
    scores[1] = ((v[8] + v[9]) + (v[10] + v[11])) + ((v[12] + v[13]) + (v[14] + v[15]));
}

// fold_pair for four vectors (8 positions) at once, in vector lanes: each level adds the even lanes to the odd ones
// (a + b with a the left operand of fold_pair's sum), gathered from two vectors by one two-source permute, so every
// score gets exactly fold_pair's additions. 8 permutes and 4 adds instead of 4 stores, 64 reloads and 56 scalar adds.
inline void fold_eight(const __m512 (&r)[4], float *scores) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    // (v0+v1), (v2+v3), (v4+v5), (v6+v7) of positions 0-3, then of 4-7
    const __m512 a = _mm512_add_ps(_mm512_permutex2var_ps(r[0], even, r[1]), _mm512_permutex2var_ps(r[0], odd, r[1]));
    const __m512 b = _mm512_add_ps(_mm512_permutex2var_ps(r[2], even, r[3]), _mm512_permutex2var_ps(r[2], odd, r[3]));
    // ((v0+v1)+(v2+v3)), ((v4+v5)+(v6+v7)) of positions 0-7
    const __m512 c = _mm512_add_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b));
    // the two halves' sum, positions 0-7 in the low 8 lanes
    const __m512 d = _mm512_add_ps(_mm512_permutexvar_ps(even, c), _mm512_permutexvar_ps(odd, c));
    _mm256_storeu_ps(scores, _mm512_castps512_ps256(d));
}

template <bool HALF>
void kv_dot_pairs(const float *q, const void *keys, int64_t stride, int32_t n_pos, int32_t d, float *scores) {
    __m512 qq[16];  // q[8i .. 8i+7] in both halves
    for (int32_t i = 0; i < d; i += 8) qq[i / 8] = _mm512_broadcast_f32x8(_mm256_loadu_ps(q + i));
    int32_t p = 0;
    for (; p + 8 <= n_pos; p += 8) {
        const int64_t row = int64_t(p) * stride;
        for (int32_t a = p + KV_PREFETCH_ROWS; a < std::min(n_pos, p + KV_PREFETCH_ROWS + 8); ++a) prefetch_kv_row(keys, int64_t(a) * stride, d, HALF ? 2 : 4);
        __m512 r[4];
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) r[j] = _mm512_mul_ps(qq[0], load_pair<HALF>(keys, row + 2 * j * stride, row + (2 * j + 1) * stride));
        for (int32_t i = 8; i < d; i += 8)
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j)
                r[j] = _mm512_add_ps(r[j], _mm512_mul_ps(qq[i / 8], load_pair<HALF>(keys, row + 2 * j * stride + i, row + (2 * j + 1) * stride + i)));
        fold_eight(r, scores + p);
    }
    for (; p + 2 <= n_pos; p += 2) {
        const int64_t row = int64_t(p) * stride;
        __m512 r = _mm512_mul_ps(qq[0], load_pair<HALF>(keys, row, row + stride));
        for (int32_t i = 8; i < d; i += 8) r = _mm512_add_ps(r, _mm512_mul_ps(qq[i / 8], load_pair<HALF>(keys, row + i, row + stride + i)));
        fold_pair(r, scores + p);
    }
    if (p < n_pos) kv_dot_avx2(q, static_cast<const uint8_t *>(keys) + int64_t(p) * stride * (HALF ? 2 : 4), HALF ? RYZ_KV_F16 : RYZ_KV_F32,
                               stride, n_pos - p, d, scores + p);
}

void kv_dot_avx512(const float *q, const void *keys, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d, float *scores) {
    if (d % 8 || d < 8 || d > 128) kv_dot_avx2(q, keys, kv_type, stride, n_pos, d, scores);  // which falls back to scalar
    else if (kv_type == RYZ_KV_F32) kv_dot_pairs<false>(q, keys, stride, n_pos, d, scores);
    else kv_dot_pairs<true>(q, keys, stride, n_pos, d, scores);
}

// kv_dot for QB queries at once (kernels.h kv_dot_multi): each pair of key rows is loaded (and converted) once
// for QB queries, and every query's position gets exactly kv_dot_pairs' operations: the products of 8-lane
// slices, added in i order, then fold_pair. An odd last position goes to kv_dot_avx2, as in kv_dot_pairs.
template <bool HALF, int QB>
void kv_dot_block(const float *const *q, const void *keys, int64_t stride, int32_t n_pos, int32_t d, float *const *scores) {
    int32_t p = 0;
    for (; p + 8 <= n_pos; p += 8) {  // 4 pairs x QB queries: up to 16 accumulators
        const int64_t row = int64_t(p) * stride;
        for (int32_t a = p + KV_PREFETCH_ROWS; a < std::min(n_pos, p + KV_PREFETCH_ROWS + 8); ++a) prefetch_kv_row(keys, int64_t(a) * stride, d, HALF ? 2 : 4);
        __m512 r[QB][4], k[4];
#pragma GCC unroll 4
        for (int m = 0; m < 4; ++m) k[m] = load_pair<HALF>(keys, row + 2 * m * stride, row + (2 * m + 1) * stride);
#pragma GCC unroll 4
        for (int j = 0; j < QB; ++j) {
            const __m512 qv = _mm512_broadcast_f32x8(_mm256_loadu_ps(q[j]));
#pragma GCC unroll 4
            for (int m = 0; m < 4; ++m) r[j][m] = _mm512_mul_ps(qv, k[m]);
        }
        for (int32_t i = 8; i < d; i += 8) {
#pragma GCC unroll 4
            for (int m = 0; m < 4; ++m) k[m] = load_pair<HALF>(keys, row + 2 * m * stride + i, row + (2 * m + 1) * stride + i);
#pragma GCC unroll 4
            for (int j = 0; j < QB; ++j) {
                const __m512 qv = _mm512_broadcast_f32x8(_mm256_loadu_ps(q[j] + i));
#pragma GCC unroll 4
                for (int m = 0; m < 4; ++m) r[j][m] = _mm512_add_ps(r[j][m], _mm512_mul_ps(qv, k[m]));
            }
        }
#pragma GCC unroll 4
        for (int j = 0; j < QB; ++j) fold_eight(r[j], scores[j] + p);
    }
    for (; p + 2 <= n_pos; p += 2) {
        const int64_t row = int64_t(p) * stride;
        __m512 r[QB];
        __m512 k = load_pair<HALF>(keys, row, row + stride);
#pragma GCC unroll 4
        for (int j = 0; j < QB; ++j) r[j] = _mm512_mul_ps(_mm512_broadcast_f32x8(_mm256_loadu_ps(q[j])), k);
        for (int32_t i = 8; i < d; i += 8) {
            k = load_pair<HALF>(keys, row + i, row + stride + i);
#pragma GCC unroll 4
            for (int j = 0; j < QB; ++j) r[j] = _mm512_add_ps(r[j], _mm512_mul_ps(_mm512_broadcast_f32x8(_mm256_loadu_ps(q[j] + i)), k));
        }
#pragma GCC unroll 4
        for (int j = 0; j < QB; ++j) fold_pair(r[j], scores[j] + p);
    }
    if (p < n_pos)
        for (int j = 0; j < QB; ++j)
            kv_dot_avx2(q[j], static_cast<const uint8_t *>(keys) + int64_t(p) * stride * (HALF ? 2 : 4), HALF ? RYZ_KV_F16 : RYZ_KV_F32, stride,
                        n_pos - p, d, scores[j] + p);
}

template <bool HALF>
void kv_dot_queries(const float *const *q, int32_t nq, const void *keys, int64_t stride, int32_t n_pos, int32_t d, float *const *scores) {
    int32_t j = 0;
    for (; j + 4 <= nq; j += 4) kv_dot_block<HALF, 4>(q + j, keys, stride, n_pos, d, scores + j);
    switch (nq - j) {
    case 3: kv_dot_block<HALF, 3>(q + j, keys, stride, n_pos, d, scores + j); break;
    case 2: kv_dot_block<HALF, 2>(q + j, keys, stride, n_pos, d, scores + j); break;
    case 1: kv_dot_block<HALF, 1>(q + j, keys, stride, n_pos, d, scores + j); break;
    default: break;
    }
}

void kv_dot_multi_avx512(const float *const *q, int32_t nq, const void *keys, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d,
                         float *const *scores) {
    if (d % 8 || d < 8 || d > 128) {  // off kv_dot_pairs' path: kv_dot itself, query by query
        for (int32_t j = 0; j < nq; ++j) kv_dot_avx512(q[j], keys, kv_type, stride, n_pos, d, scores[j]);
    } else if (kv_type == RYZ_KV_F32) {
        kv_dot_queries<false>(q, nq, keys, stride, n_pos, d, scores);
    } else {
        kv_dot_queries<true>(q, nq, keys, stride, n_pos, d, scores);
    }
}

// Weighted sum of values: out[i] = sum_p probs[p] * value_p[i], sequential over p for every i, as the
// scalar kernel and the reference add them; each lane owns one i, so 16 lanes give the same bits as
// the AVX2 kernel's 8 with half the instructions.
template <bool HALF>
void kv_axpy_rows(const float *probs, const void *values, int64_t stride, int32_t n_pos, int32_t d, float *out) {
    for (int32_t i0 = 0; i0 < d; i0 += 128) {  // up to 8 accumulators live across the position loop
        const int n_vec = std::min(128, d - i0) / 16;
        __m512 acc[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
        for (int32_t p = 0; p < n_pos; ++p) {
            if (i0 == 0 && p + KV_PREFETCH_ROWS < n_pos) prefetch_kv_row(values, int64_t(p + KV_PREFETCH_ROWS) * stride, d, HALF ? 2 : 4);
            const __m512 w = _mm512_set1_ps(probs[p]);
            const int64_t row = int64_t(p) * stride + i0;
#pragma GCC unroll 8
            for (int j = 0; j < 8; ++j) {
                if (j >= n_vec) break;
                __m512 v;
                if constexpr (HALF) v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(static_cast<const fp16_t *>(values) + row + 16 * j)));
                else v = _mm512_loadu_ps(static_cast<const float *>(values) + row + 16 * j);
                acc[j] = _mm512_add_ps(acc[j], _mm512_mul_ps(w, v));
            }
        }
        for (int j = 0; j < n_vec; ++j) _mm512_storeu_ps(out + i0 + 16 * j, acc[j]);
    }
}

void kv_axpy_avx512(const float *probs, const void *values, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d, float *out) {
    if (d % 16) kv_axpy_avx2(probs, values, kv_type, stride, n_pos, d, out);
    else if (kv_type == RYZ_KV_F32) kv_axpy_rows<false>(probs, values, stride, n_pos, d, out);
    else kv_axpy_rows<true>(probs, values, stride, n_pos, d, out);
}

// kv_axpy for QB queries at once (kernels.h kv_axpy_multi), 64 columns at a time: each value row's 4 vectors are
// loaded once for QB queries. Query j's lanes start at zero and add probs[j][p] * value_p[i] for p = 0, 1, ...
// up to its own n_pos, kv_axpy_rows' operations and order: the positions all QB queries share first, then each
// query's own remaining ones.
template <bool HALF>
inline __m512 value16(const void *values, int64_t at) {
    if constexpr (HALF) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(static_cast<const fp16_t *>(values) + at)));
    else return _mm512_loadu_ps(static_cast<const float *>(values) + at);
}

template <bool HALF, int QB>
void kv_axpy_block(const float *const *probs, const int32_t *n_pos, const void *values, int64_t stride, int32_t d, float *const *out) {
    int32_t shared = n_pos[0];
    for (int j = 1; j < QB; ++j) shared = std::min(shared, n_pos[j]);
    for (int32_t i0 = 0; i0 < d; i0 += 64) {
        const int n_vec = std::min(64, d - i0) / 16;
        __m512 acc[QB][4];
#pragma GCC unroll 4
        for (int j = 0; j < QB; ++j)
#pragma GCC unroll 4
            for (int m = 0; m < 4; ++m) acc[j][m] = _mm512_setzero_ps();
        if (n_vec == 4) {
            for (int32_t p = 0; p < shared; ++p) {
                if (i0 == 0 && p + KV_PREFETCH_ROWS < shared) prefetch_kv_row(values, int64_t(p + KV_PREFETCH_ROWS) * stride, d, HALF ? 2 : 4);
                const int64_t row = int64_t(p) * stride + i0;
                __m512 v[4];
#pragma GCC unroll 4
                for (int m = 0; m < 4; ++m) v[m] = value16<HALF>(values, row + 16 * m);
#pragma GCC unroll 4
                for (int j = 0; j < QB; ++j) {
                    const __m512 w = _mm512_set1_ps(probs[j][p]);
#pragma GCC unroll 4
                    for (int m = 0; m < 4; ++m) acc[j][m] = _mm512_add_ps(acc[j][m], _mm512_mul_ps(w, v[m]));
                }
            }
        }
        for (int j = 0; j < QB; ++j)
            for (int32_t p = n_vec == 4 ? shared : 0; p < n_pos[j]; ++p) {
                const __m512 w = _mm512_set1_ps(probs[j][p]);
                const int64_t row = int64_t(p) * stride + i0;
                for (int m = 0; m < n_vec; ++m) acc[j][m] = _mm512_add_ps(acc[j][m], _mm512_mul_ps(w, value16<HALF>(values, row + 16 * m)));
            }
        for (int j = 0; j < QB; ++j)
            for (int m = 0; m < n_vec; ++m) _mm512_storeu_ps(out[j] + i0 + 16 * m, acc[j][m]);
    }
}

template <bool HALF>
void kv_axpy_queries(const float *const *probs, int32_t nq, const int32_t *n_pos, const void *values, int64_t stride, int32_t d,
                     float *const *out) {
    int32_t j = 0;
    for (; j + 4 <= nq; j += 4) kv_axpy_block<HALF, 4>(probs + j, n_pos + j, values, stride, d, out + j);
    switch (nq - j) {
    case 3: kv_axpy_block<HALF, 3>(probs + j, n_pos + j, values, stride, d, out + j); break;
    case 2: kv_axpy_block<HALF, 2>(probs + j, n_pos + j, values, stride, d, out + j); break;
    case 1: kv_axpy_block<HALF, 1>(probs + j, n_pos + j, values, stride, d, out + j); break;
    default: break;
    }
}

void kv_axpy_multi_avx512(const float *const *probs, int32_t nq, const int32_t *n_pos, const void *values, int32_t kv_type, int64_t stride,
                          int32_t d, float *const *out) {
    if (d % 16) {
        for (int32_t j = 0; j < nq; ++j) kv_axpy_avx512(probs[j], values, kv_type, stride, n_pos[j], d, out[j]);
    } else if (kv_type == RYZ_KV_F32) {
        kv_axpy_queries<false>(probs, nq, n_pos, values, stride, d, out);
    } else {
        kv_axpy_queries<true>(probs, nq, n_pos, values, stride, d, out);
    }
}

// The softmax (kernels.h; scalar.cpp the spec), as avx2.cpp's with 16 lanes and vscalefpd for the 2^k:
// the same exp (see exp4 there for why it gives std::exp's bits), margins and fallback.
constexpr double EXP_LOG2E = 0x1.71547652b82fep0, EXP_LN2_HI = 0x1.62e42fefa39efp-1, EXP_LN2_LO = 0x1.abc9e3b39803fp-56;
constexpr double EXP_MARGIN_LO = 1.0 - 0x1p-40, EXP_MARGIN_HI = 1.0 + 0x1p-40;
constexpr double EXP_COEF[13] = {1.0,        1.0,         1.0 / 2,      1.0 / 6,       1.0 / 24,       1.0 / 120,       1.0 / 720,
                                 1.0 / 5040, 1.0 / 40320, 1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600};

// 8 lanes: the float to return where bit i of *exact is set, else anything (the caller recomputes the lane).
inline __m256 exp8_pd(__m256 xf, __mmask8 *exact) {
    __m512d x = _mm512_cvtps_pd(xf);
    x = _mm512_min_pd(_mm512_max_pd(x, _mm512_set1_pd(-120.0)), _mm512_set1_pd(89.0));  // NaN -> -120 (recomputed)
    const __m512d k = _mm512_roundscale_pd(_mm512_mul_pd(x, _mm512_set1_pd(EXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512d r = _mm512_fnmadd_pd(k, _mm512_set1_pd(EXP_LN2_HI), x);
    r = _mm512_fnmadd_pd(k, _mm512_set1_pd(EXP_LN2_LO), r);
    __m512d p = _mm512_set1_pd(EXP_COEF[12]);
    for (int i = 11; i >= 0; --i) p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(EXP_COEF[i]));
    const __m512d y = _mm512_scalef_pd(p, k);  // exact: k in [-174, 129], a normal double
    const __m256 lo = _mm512_cvtpd_ps(_mm512_mul_pd(y, _mm512_set1_pd(EXP_MARGIN_LO)));
    const __m256 hi = _mm512_cvtpd_ps(_mm512_mul_pd(y, _mm512_set1_pd(EXP_MARGIN_HI)));
    *exact = _mm256_cmpeq_epi32_mask(_mm256_castps_si256(lo), _mm256_castps_si256(hi)) & _mm256_cmp_ps_mask(xf, xf, _CMP_ORD_Q);
    return lo;
}

// scores[p] = exp(scores[p] - max) for the lanes of `mask` (16 positions from scores).
inline void exp16(float *scores, __m512 max_score, __mmask16 mask) {
    const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores), max_score);
    __mmask8 ok_lo, ok_hi;
    const __m256 a = exp8_pd(_mm512_castps512_ps256(x), &ok_lo);
    const __m256 b = exp8_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)), &ok_hi);
    _mm512_mask_storeu_ps(scores, mask, _mm512_insertf32x8(_mm512_castps256_ps512(a), b, 1));
    const unsigned redo = mask & ~(unsigned(ok_lo) | unsigned(ok_hi) << 8);
    if (redo) {
        alignas(64) float xs[16];
        _mm512_store_ps(xs, x);
        for (int i = 0; i < 16; ++i)
            if (redo >> i & 1) scores[i] = static_cast<float>(std::exp(static_cast<double>(xs[i])));
    }
}


void softmax_exp_avx512(float *scores, int32_t n, float max_score) {
    const __m512 m = _mm512_set1_ps(max_score);
    for (int32_t p = 0; p < n; p += 16) exp16(scores + p, m, tail_mask(n - p));
}

// softmax_avx2's argument for the lanes: division and max are exact, and the order the lanes' maxima are
// combined in can only change the sign of a zero maximum, which no exp sees.
void softmax_avx512(float *scores, int32_t n, float divisor) {
    const __m512 dv = _mm512_set1_ps(divisor);
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int32_t p = 0; p < n; p += 16) {
        const __mmask16 mask = tail_mask(n - p);
        const __m512 s = _mm512_div_ps(_mm512_maskz_loadu_ps(mask, scores + p), dv);
        _mm512_mask_storeu_ps(scores + p, mask, s);
        mv = _mm512_mask_max_ps(mv, mask, s, mv);  // vmaxps(s, m): m where s is NaN
    }
    alignas(64) float l[16];
    _mm512_store_ps(l, mv);
    float max_score = -INFINITY;
    for (int i = 0; i < 16; ++i) max_score = std::max(max_score, l[i]);
    softmax_exp_avx512(scores, n, max_score);
    const __m512 sum = _mm512_set1_ps(pairwise_sum_avx2(scores, n));
    for (int32_t p = 0; p < n; p += 16) {
        const __mmask16 mask = tail_mask(n - p);
        _mm512_mask_storeu_ps(scores + p, mask, _mm512_div_ps(_mm512_maskz_loadu_ps(mask, scores + p), sum));
    }
}

// The element-wise kernels (kernels.h; scalar.cpp the spec), avx2.cpp's with 16 lanes and masked ends: per
// element the scalar loop's operations in its order (no FMA). The sum of squares keeps AVX2's ymm: numpy's
// pairwise order has 8 partial sums.

void rms_norm_avx512(const float *x, const float *w, int64_t n, float eps, float *out) {
    const __m512 denom = _mm512_set1_ps(std::sqrt(pairwise_sum_squares_avx2(x, n) / static_cast<float>(n) + eps));
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(m, x + i), denom), _mm512_maskz_loadu_ps(m, w + i)));
    }
}

// relu^2: lanes not > 0 (NaN included) are +0 before the product, as the scalar's 0.0f. SiLU: exp(-g) by the
// softmax's exact exp (max 0: x - 0 is x), then the scalar's division and product.
void ffn_act_mul_avx512(float *gate, const float *up, int64_t n, int32_t act) {
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
        __m512 a;
        if (act == RYZ_ACT_RELU2) {
            a = _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(g, zero, _CMP_GT_OQ), g, g);
        } else {
            alignas(64) float e[16];
            _mm512_store_ps(e, _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), _mm512_set1_epi32(INT32_MIN))));  // -g exactly
            exp16(e, zero, 0xFFFF);
            a = _mm512_div_ps(g, _mm512_add_ps(one, _mm512_load_ps(e)));
        }
        _mm512_mask_storeu_ps(gate + i, m, _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, up + i)));
    }
}

void add_avx512(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(x + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
    }
}

void rope_avx512(float *vec, int32_t n_heads, int32_t head_dim, const float *cs, const float *sn) {
    const int32_t half = head_dim / 2;
    for (int32_t h = 0; h < n_heads; ++h) {
        float *v = vec + int64_t(h) * head_dim;
        for (int32_t i = 0; i < half; i += 16) {
            const __mmask16 m = tail_mask(half - i);
            const __m512 a = _mm512_maskz_loadu_ps(m, v + i), b = _mm512_maskz_loadu_ps(m, v + i + half);
            const __m512 c = _mm512_maskz_loadu_ps(m, cs + i), s = _mm512_maskz_loadu_ps(m, sn + i);
            _mm512_mask_storeu_ps(v + i, m, _mm512_sub_ps(_mm512_mul_ps(a, c), _mm512_mul_ps(b, s)));
            _mm512_mask_storeu_ps(v + i + half, m, _mm512_add_ps(_mm512_mul_ps(b, c), _mm512_mul_ps(a, s)));
        }
    }
}

// kv_store_avx2's conversion (vcvtps2ph, round to nearest even, NaN lanes cut to sign | 0x7E00), 16 lanes.
void kv_store_avx512(const float *src, int64_t n, int32_t kv_type, void *dst) {
    if (kv_type == RYZ_KV_F32) {
        std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n));
        return;
    }
    fp16_t *h = static_cast<fp16_t *>(dst);
    const __m256i nan_bits = _mm256_set1_epi16(static_cast<short>(0xFE00));
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        const __m512 v = _mm512_maskz_loadu_ps(m, src + i);
        const __m256i r = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        _mm256_mask_storeu_epi16(h + i, m, _mm256_mask_blend_epi16(nan, r, _mm256_and_si256(r, nan_bits)));
    }
}

void linear_out_avx512(const int32_t *acc, int64_t n, float act_scale, float w_scale, float *out) {
    const __m512 as = _mm512_set1_ps(act_scale), ws = _mm512_set1_ps(w_scale);
    for (int64_t r = 0; r < n; r += 16) {
        const __mmask16 m = tail_mask(n - r);
        const __m512 a = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, acc + r));  // round to nearest even, as the scalar cast
        _mm512_mask_storeu_ps(out + r, m, _mm512_mul_ps(_mm512_div_ps(a, as), ws));
    }
}

}  // namespace

const Kernels *kernels_avx512() {
    static const Kernels k{RYZ_ISA_AVX512, ternary_gemm_avx512, dense_gemm_avx512, quantize_act_avx512, kv_dot_avx512, kv_axpy_avx512,
                           ternary_gemm_t1p_avx512, softmax_exp_avx512, softmax_avx512, kv_dot_multi_avx512, kv_axpy_multi_avx512,
                           rms_norm_avx512, ffn_act_mul_avx512, add_avx512, rope_avx512, kv_store_avx512, linear_out_avx512};
    return &k;
}

#else

const Kernels *kernels_avx512() { return nullptr; }

#endif

}  // namespace ryz

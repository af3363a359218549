// amx.cpp's VNNI weight tiles for the prefill orientation (gemm_tokens_as_rows), vectorized: amx::unpack_vnni
// (amx_layout.h) for one T2P block. A header of its own so the tests can hold it to the plain loops directly,
// on any AVX-512 host (with or without AMX) and with no exported symbol: the test executable compiles its own copy.
// It is built for the baseline ISA, so there the function takes AVX-512 by a target attribute, and the tests call it
// only where the library reports the AVX-512 family supported; amx.cpp has the flags already and gets no attribute.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <cstdint>

#include "../src/blocks.h"
#include "amx_layout.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define RYZ_AMX_VNNI_TARGET
#else
#define RYZ_AMX_VNNI_TARGET __attribute__((target("avx512f,avx512bw")))
#endif
#define RYZ_HAVE_AMX_VNNI_BLOCK 1

// GCC 12's AVX-512 intrinsics self-initialize (`__m512i __Y = __Y;`) and warn when inlined: as amx.cpp, silenced.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace ryz {
namespace amx {

// The VNNI B tiles of T2P block b (K steps 4b .. 4b + 3) of rows [r, r + 16): tile 4b + l at dst + (4b + l) * TILE_BYTES.
// The transpose is done on the packed bytes, once per 64-byte block (4 K steps): a 16 x 16 dword transpose of the 16
// rows' blocks (bytes move whole, so plane l of the transposed block is the VNNI tile of step 4b + l), then the
// shift and mask of unpack_weights_avx512. 64 shuffles per 4 tiles. dst is 64-byte aligned (aligned stores).
RYZ_AMX_VNNI_TARGET static inline void unpack_vnni_block(const uint8_t *packed, int64_t blocks, int64_t r, int64_t b, uint8_t *dst) {
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i t[16], u[16];
    const uint8_t *base = t2p_block(packed, blocks, r, b);
    const int64_t tile_stride = t2p_tile_stride(blocks);
    for (int i = 0; i < 8; ++i) {
        const uint8_t *row = t2p_block_in_tile(base, tile_stride, 2 * i);  // rows r + 2i and r + 2i + 1: one row tile
        const __m512i x = _mm512_loadu_si512(row);
        const __m512i y = _mm512_loadu_si512(row + T2P_BLOCK_BYTES);
        t[2 * i] = _mm512_unpacklo_epi32(x, y);
        t[2 * i + 1] = _mm512_unpackhi_epi32(x, y);
    }
    for (int i = 0; i < 4; ++i) {
        u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    // u[4i + j], 128-bit lane L = dword column 4L + j of rows 4i .. 4i + 3
    uint8_t *d = dst + 4 * b * TILE_BYTES;
    for (int j = 0; j < 4; ++j) {
        const __m512i x0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), x1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
        const __m512i y0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44), y1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
        const __m512i col[4] = {_mm512_shuffle_i32x4(x0, y0, 0x88), _mm512_shuffle_i32x4(x0, y0, 0xDD),
                                _mm512_shuffle_i32x4(x1, y1, 0x88), _mm512_shuffle_i32x4(x1, y1, 0xDD)};
        for (int L = 0; L < 4; ++L) {
            uint8_t *e = d + (4 * L + j) * TILE_K;  // B row kk = 4L + j
            _mm512_store_si512(e, _mm512_and_si512(col[L], m3));
            _mm512_store_si512(e + TILE_BYTES, _mm512_and_si512(_mm512_srli_epi16(col[L], 2), m3));
            _mm512_store_si512(e + 2 * TILE_BYTES, _mm512_and_si512(_mm512_srli_epi16(col[L], 4), m3));
            _mm512_store_si512(e + 3 * TILE_BYTES, _mm512_and_si512(_mm512_srli_epi16(col[L], 6), m3));
        }
    }
}

}  // namespace amx
}  // namespace ryz

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic pop
#endif

#endif

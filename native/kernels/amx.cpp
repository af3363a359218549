// AMX-INT8 family (Intel Sapphire Rapids and later): the AVX-512 family with the batched ternary GEMM
// (prefill, batched decode) on the tile unit. This file alone is built with AVX-512 + AMX flags;
// dispatch.cpp checks AMX-TILE/AMX-INT8 in CPUID, XTILECFG/XTILEDATA in XCR0, and asks Linux for
// permission to use tile data (arch_prctl) before it lets anything here run.
//
// Tile operands (amx_layout.h): A = 16 weight rows x 64 columns, unpacked to code+1 in {0,1,2,(3)};
// B = 16 tokens' activations for the same 64 columns in the VNNI layout; TDPBUSD (u8 x s8, int32 sums,
// no saturation) gives C[row][token] = sum (code+1) * a, and act_sums[t] is subtracted once when C is
// transposed into out[t][r], as the VNNI kernels do. Exact integer arithmetic: bit-equal to scalar.
//
// Why this orientation: a T2P plane is already 64 contiguous columns of one row, so an A tile is a
// shift and a mask per 64 bytes, with no transpose of the weights; the activation reformat (a 4-byte
// transpose) is shared by every row of the call, and the C transpose by a whole row of K steps.
//
// Batched decode, 8 to 16 tokens (gemm_one_token_tile): one B tile per K step shared by every row, 5 row tiles' C in
// the registers over all of K, each A tile unpacked into L1 one K step ahead between the TDPBUSDs.
// Blocking, 17 to 31 tokens (batched decode of 17+ sequences, short prompt chunks): token blocks of
// TOKEN_BLOCK tokens (B tiles of a 64-token block are at most 432 KB: L2), re-read by each row group. In each
// block, row groups of ROW_GROUP_TILES x 16 rows; in each, K chunks of K_CHUNK steps whose A tiles are unpacked
// once into an L1 buffer and used by every token tile of the block; 2 x 2 register blocking (4 C tiles, 2 A,
// 2 B: all 8 tile registers), C kept in an L1 buffer across K chunks.
// From STATIONARY_MIN_TOKENS on (prefill), gemm_tokens_as_rows: the orientation turned round (A = 16 tokens'
// activations copied contiguously, B = 16 weight rows in the VNNI layout, TDPBSUD), so C is out[t][r] itself and
// no transposed store is needed; the transpose moved to the weights, done on the packed T2P bytes (once per 4 K
// steps) for the next row pair while the tile unit works on this one. 2 x 2 tiles, C in the registers over all
// of K. It replaced gemm_stationary (C[row][token] over all of K, then a gathered transposed store): 1.03-1.26x
// per call in thread CPU time (docs/kernels.md "AMX").
//
// Everything else (decode, few tokens, the row tail not a multiple of 16, every other kernel) is the
// AVX-512 family's: its table is copied at first use, so entries added there are inherited.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <type_traits>

#include "../include/ryz.h"
#include "../src/blocks.h"
#include "amx_layout.h"
#include "amx_vnni.h"
#include "kernels.h"

namespace ryz {

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__AVX512BW__)

namespace {

using amx::TILE_BYTES;
using amx::TILE_M;

// Below this many tokens the AVX-512 kernel runs. 8 to 16 tokens (one token tile) take gemm_one_token_tile: at 8
// tokens 1.04-1.5x AVX-512's G MAC/s, at 6 0.8-1.05x, at 4 0.7-0.9x (2 threads, weights from DRAM;
// docs/kernels.md "AMX").
constexpr int32_t MIN_TOKENS = 8;
// Row groups of 4 x 16 rows and K chunks of 4 steps (one T2P block): the A chunk is 16 KB (L1), each B
// tile pair loaded for a chunk feeds 2 row pairs, and C tiles go through the buffer once per 16 TDPBUSD.
// Of the settings tried (docs/kernels.md "AMX"), 4 x 4 was fastest or within noise at 16, 64 and 512 tokens.
constexpr int ROW_GROUP_TILES = 4;
constexpr int64_t K_CHUNK = 4;  // a multiple of 4: the unpack works in whole T2P blocks
static_assert(K_CHUNK % 4 == 0, "K chunks are whole T2P blocks");
// 64-token blocks: with a 512-token call as one block the GEMM was 1.03-1.26x slower (median thread CPU time,
// 4 shapes; docs/kernels.md "AMX"): its B tiles (1.3-3.5 MB) leave L2 and its C transposes scatter over 512
// output rows. The weights, unpacked again for each block, come from L3 after the first.
constexpr int64_t TOKEN_BLOCK = 64;
// From this many tokens on, the prefill path (gemm_tokens_as_rows). Against the K-chunked kernel (2 threads, weights
// from DRAM, scripts/bench_ternary_layouts.cpp, 2560 / 6912 columns): 32 tokens 1.24-1.93x, 48 1.03-1.25x, 64
// 1.0-1.28x, 96 1.33-1.52x; at 16 tokens 1.04-1.08x on 2560 columns but 0.84-0.95x on 6912, at 8 0.77-0.95x
// (docs/kernels.md "AMX"). Its token blocks are STATIONARY_B_BYTES of B tiles (384 tokens at 2560 columns, 128 at
// 6912); 512 KB and 2 MB were no faster.
constexpr int32_t STATIONARY_MIN_TOKENS = 32;
constexpr int64_t STATIONARY_B_BYTES = 1 << 20;
static_assert(TOKEN_BLOCK % (2 * TILE_M) == 0, "token blocks are whole token-tile pairs");

// Palette 1, all 8 tiles 16 rows x 64 bytes (partial token tiles are zero-padded instead of
// configured smaller, so one configuration serves every call).
struct alignas(64) TileConfig {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// Loaded on every call rather than once per thread: it costs next to nothing against a GEMM, and
// another library in the process (oneDNN under PyTorch, say) may have configured this thread's tiles
// its own way since our last call. A constant in static storage: GCC 12 dropped the stores of the column
// widths when the configuration was built on the stack in a function it inlined twice, and LDTILECFG
// faulted on the zero widths.
TileConfig make_tile_config() {
    TileConfig cfg{};
    cfg.palette_id = 1;
    for (int i = 0; i < 8; ++i) {
        cfg.rows[i] = TILE_M;
        cfg.colsb[i] = amx::TILE_K;
    }
    return cfg;
}
const TileConfig g_tile_config = make_tile_config();

void configure_tiles() { _tile_loadconfig(&g_tile_config); }

// A per-thread, 64-byte aligned scratch buffer that only grows; nullptr when memory runs out (the
// caller then takes the AVX-512 path: no exception may leave a kernel run by a pool thread).
struct Scratch {
    struct Free {
        void operator()(uint8_t *p) const { std::free(p); }
    };
    std::unique_ptr<uint8_t, Free> data;
    size_t size = 0;
    uint8_t *get(size_t bytes) {
        if (bytes > size) {
            const size_t rounded = (bytes + 63) / 64 * 64;
            data.reset(static_cast<uint8_t *>(std::aligned_alloc(64, rounded)));
            size = data ? rounded : 0;
        }
        return data.get();
    }
};
thread_local Scratch g_a, g_b, g_c, g_codes;

// C tiles (NR row tiles x NT token tiles, tiles 0..3) += A (tiles 4, 5) . B (tiles 6, 7) over `steps`
// K steps (A tiles consecutive, B tiles b_step bytes apart). c[rt][tt] are 16 x 16 int32 buffers; first: start from zero instead of loading them.
template <int NR, int NT>
void tile_block(const uint8_t *a0, const uint8_t *a1, const int8_t *b0, const int8_t *b1, int64_t b_step, int64_t steps,
                int32_t *c00, int32_t *c01, int32_t *c10, int32_t *c11, bool first) {
    if (first) {
        _tile_zero(0);
        if constexpr (NT > 1) _tile_zero(1);
        if constexpr (NR > 1) _tile_zero(2);
        if constexpr (NR > 1 && NT > 1) _tile_zero(3);
    } else {
        _tile_loadd(0, c00, 64);
        if constexpr (NT > 1) _tile_loadd(1, c01, 64);
        if constexpr (NR > 1) _tile_loadd(2, c10, 64);
        if constexpr (NR > 1 && NT > 1) _tile_loadd(3, c11, 64);
    }
    for (int64_t s = 0; s < steps; ++s) {
        _tile_loadd(4, a0 + s * TILE_BYTES, 64);
        _tile_loadd(6, b0 + s * b_step, 64);
        _tile_dpbusd(0, 4, 6);
        if constexpr (NT > 1) {
            _tile_loadd(7, b1 + s * b_step, 64);
            _tile_dpbusd(1, 4, 7);
        }
        if constexpr (NR > 1) {
            _tile_loadd(5, a1 + s * TILE_BYTES, 64);
            _tile_dpbusd(2, 5, 6);
            if constexpr (NT > 1) _tile_dpbusd(3, 5, 7);
        }
    }
    _tile_stored(0, c00, 64);
    if constexpr (NT > 1) _tile_stored(1, c01, 64);
    if constexpr (NR > 1) _tile_stored(2, c10, 64);
    if constexpr (NR > 1 && NT > 1) _tile_stored(3, c11, 64);
}

// tile_block with as many row and token tiles (1 or 2 each) as there are: the edges of a row group or token block.
inline void tile_block_edge(bool two_r, bool two_t, const uint8_t *a0, const uint8_t *a1, const int8_t *b0, const int8_t *b1, int64_t b_step,
                            int64_t steps, int32_t *c00, int32_t *c01, int32_t *c10, int32_t *c11, bool first) {
    if (two_r && two_t) tile_block<2, 2>(a0, a1, b0, b1, b_step, steps, c00, c01, c10, c11, first);
    else if (two_r) tile_block<2, 1>(a0, a1, b0, b1, b_step, steps, c00, c01, c10, c11, first);
    else if (two_t) tile_block<1, 2>(a0, a1, b0, b1, b_step, steps, c00, c01, c10, c11, first);
    else tile_block<1, 1>(a0, a1, b0, b1, b_step, steps, c00, c01, c10, c11, first);
}

// amx::unpack_weights for whole T2P blocks (s0, s1 multiples of 4), vectorized: per row and block one
// 64-byte load, four planes by shift and mask. GCC's version of the plain loop ran at a third of this
// speed, and the unpack is what a 16-token call spends most of its time on.
inline void unpack_weights_avx512(const uint8_t *packed, int64_t blocks, int64_t r, int64_t s0, int64_t s1, uint8_t *dst) {
    const __m512i m3 = _mm512_set1_epi8(3);
    const uint8_t *base = amx::t2p_block(packed, blocks, r, 0);
    const int64_t tile_stride = amx::t2p_tile_stride(blocks);
    for (int i = 0; i < TILE_M; ++i) {
        const uint8_t *row = amx::t2p_block_in_tile(base, tile_stride, i);
        for (int64_t b = s0 / 4; b < s1 / 4; ++b) {
            const __m512i q = _mm512_loadu_si512(row + b * TILE_ROWS * T2P_BLOCK_BYTES);
            uint8_t *d = dst + (4 * b - s0) * TILE_BYTES + i * amx::TILE_K;
            _mm512_store_si512(d, _mm512_and_si512(q, m3));
            _mm512_store_si512(d + TILE_BYTES, _mm512_and_si512(_mm512_srli_epi16(q, 2), m3));
            _mm512_store_si512(d + 2 * TILE_BYTES, _mm512_and_si512(_mm512_srli_epi16(q, 4), m3));
            _mm512_store_si512(d + 3 * TILE_BYTES, _mm512_and_si512(_mm512_srli_epi16(q, 6), m3));
        }
    }
}

// amx::pack_acts, vectorized: B row kk of step s is one gather of 16 tokens' dwords (masked past
// n_valid, so nothing beyond the activations is read). The plain loop's 4-byte copies took ~10% of a
// 512-token call.
inline void pack_acts_avx512(const int8_t *act, int64_t cols, int n_valid, int8_t *dst, int64_t step_stride) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(static_cast<int>(cols / 4)));
    const __mmask16 valid = static_cast<__mmask16>(n_valid >= TILE_M ? 0xFFFF : (1u << n_valid) - 1);
    for (int64_t s = 0; s < cols / amx::TILE_K; ++s)
        for (int kk = 0; kk < TILE_M; ++kk)
            _mm512_store_si512(dst + s * step_stride + kk * amx::TILE_K,
                               _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, idx, act + s * amx::TILE_K + 4 * kk, 4));
}

// out[(t + n) * out_stride + r + i] = c[i][n] - sums[t + n] for n < n_valid: a 16 x 16 int32 transpose.
inline void store_transposed(const int32_t *c, const int32_t *sums, int n_valid, int32_t *out, int64_t out_stride) {
    const __m512i idx = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16, 0);
    for (int n = 0; n < n_valid; ++n) {
        const __m512i col = _mm512_i32gather_epi32(idx, c + n, 4);  // c[0..15][n]
        _mm512_storeu_si512(out + n * out_stride, _mm512_sub_epi32(col, _mm512_set1_epi32(sums[n])));
    }
}

// ---- Prefill with the tokens as the tile rows (gemm_tokens_as_rows) ----
// A tiles = 16 tokens x 64 K bytes of activations (signed), copied contiguously per token tile (1 KB a tile, a
// plain 64-byte copy per token row); B tiles = 16 weight rows in the VNNI layout, B[kk][4n+m] = code+1 of
// (row r + n, column 64s + 4kk + m). TDPBSUD (s8 x u8) gives C[t][r] = sum a * (code+1); C starts from a tile
// holding -act_sums[t] in row t, so it is the output itself and is stored with one TILESTORED (stride out_stride).
// The operands as plain loops: amx_layout.h (pack_token_rows, unpack_vnni, neg_sums_tile); the kernel calls the first
// and last itself, and its vectorized weight transpose, unpack_vnni_block, is in amx_vnni.h so the tests can hold it
// to unpack_vnni on any AVX-512 host.

// The VNNI weights of the next row pair, built a T2P block at a time between the TDPBSUDs of the current one
// (the vector units are idle while the tile unit works). unit u = row tile u / blocks, T2P block u % blocks.
struct VnniWork {
    const uint8_t *packed;
    int64_t blocks, r, per_tile;
    uint8_t *dst;
    int64_t next, end;
    void one() {
        const int64_t rt = next / blocks, b = next % blocks;
        amx::unpack_vnni_block(packed, blocks, r + rt * TILE_M, b, dst + rt * per_tile);  // amx_vnni.h
        ++next;
    }
    void finish() {
        while (next < end) one();
    }
};

// C tiles 0..3 = (token tile 0, row tile 0), (0, 1), (1, 0), (1, 1); A (tokens) tiles 4, 5; B (weights) tiles 6, 7.
// C starts from the -act_sums tiles n0 / n1 and is stored to o[k] with stride os[k] bytes.
template <int NT, int NR>
void tile_block_rows(const int8_t *a0, const int8_t *a1, const uint8_t *b0, const uint8_t *b1, int64_t steps, const int32_t *n0,
                     const int32_t *n1, int32_t *const o[4], const int64_t os[4], VnniWork &work, int64_t units, int64_t every) {
    _tile_loadd(0, n0, 64);
    if constexpr (NR > 1) _tile_loadd(1, n0, 64);
    if constexpr (NT > 1) _tile_loadd(2, n1, 64);
    if constexpr (NT > 1 && NR > 1) _tile_loadd(3, n1, 64);
    const int64_t stop = std::min(work.end, work.next + units);
    for (int64_t s = 0; s < steps; ++s) {
        if (s % every == 0 && work.next < stop) work.one();
        _tile_loadd(4, a0 + s * TILE_BYTES, 64);
        _tile_loadd(6, b0 + s * TILE_BYTES, 64);
        _tile_dpbsud(0, 4, 6);
        if constexpr (NR > 1) {
            _tile_loadd(7, b1 + s * TILE_BYTES, 64);
            _tile_dpbsud(1, 4, 7);
        }
        if constexpr (NT > 1) {
            _tile_loadd(5, a1 + s * TILE_BYTES, 64);
            _tile_dpbsud(2, 5, 6);
            if constexpr (NR > 1) _tile_dpbsud(3, 5, 7);
        }
    }
    _tile_stored(0, o[0], os[0]);
    if constexpr (NR > 1) _tile_stored(1, o[1], os[1]);
    if constexpr (NT > 1) _tile_stored(2, o[2], os[2]);
    if constexpr (NT > 1 && NR > 1) _tile_stored(3, o[3], os[3]);
}

// Prefill (>= STATIONARY_MIN_TOKENS), ternary_gemm's contract for whole row tiles: token blocks of STATIONARY_B_BYTES of activation
// tiles, packed once per block; per row pair its VNNI weight tiles over all of K (built once per token block, used by
// every token tile, double-buffered: the next pair's are built inside this pair's K loops); 2 x 2 tiles, C in the
// registers over all of K, stored straight into out (a partial last token tile through a buffer). false when
// scratch memory runs out (the caller then takes the chunked path).
bool gemm_tokens_as_rows(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, const int8_t *act,
                         const int32_t *act_sums, int32_t n_tokens, int32_t *out, int64_t out_stride) {
    const int64_t blocks = cols / QK_K, steps = blocks * 4;
    const int64_t per_tile = steps * TILE_BYTES;
    const int64_t block_tiles = std::max<int64_t>(2, STATIONARY_B_BYTES / per_tile / 2 * 2);
    const int64_t max_tiles = std::min<int64_t>(block_tiles, (n_tokens + TILE_M - 1) / TILE_M);
    int8_t *abuf = reinterpret_cast<int8_t *>(g_b.get(static_cast<size_t>(max_tiles * per_tile)));
    uint8_t *wbuf = g_a.get(static_cast<size_t>(4 * per_tile));  // two row pairs: the current one and the next
    int32_t *sbuf = reinterpret_cast<int32_t *>(g_c.get(static_cast<size_t>((max_tiles + 4) * TILE_BYTES)));
    if (!abuf || !wbuf || !sbuf) return false;
    int32_t *cbuf = sbuf + max_tiles * TILE_M * TILE_M;  // 4 C tiles for a partial token tile
    configure_tiles();
    for (int64_t t0 = 0; t0 < n_tokens; t0 += block_tiles * TILE_M) {
        const int64_t in_block = std::min<int64_t>(block_tiles * TILE_M, n_tokens - t0);
        const int64_t n_tt = (in_block + TILE_M - 1) / TILE_M;
        for (int64_t tt = 0; tt < n_tt; ++tt) {  // the spec's own loops (amx_layout.h): 64-byte copies, no reformat
            const int64_t t = t0 + tt * TILE_M;
            const int nv = static_cast<int>(std::min<int64_t>(TILE_M, n_tokens - t));
            amx::pack_token_rows(act + t * cols, cols, nv, 0, steps, abuf + tt * per_tile);
            amx::neg_sums_tile(act_sums + t, nv, sbuf + tt * TILE_M * TILE_M);
        }
        const int64_t n_calls = (n_tt + 1) / 2;  // tile_block_rows calls per row pair
        VnniWork first{packed, blocks, row_begin, per_tile, wbuf, 0, (row_begin + TILE_M < row_end ? 2 : 1) * blocks};
        first.finish();
        for (int64_t g = row_begin, pair = 0; g < row_end; g += 2 * TILE_M, ++pair) {
            const bool two_r = g + TILE_M < row_end;
            const uint8_t *b0 = wbuf + (pair % 2) * 2 * per_tile, *b1 = b0 + per_tile;
            const int64_t gn = g + 2 * TILE_M;  // the next pair, built while this one runs
            VnniWork work{packed, blocks, gn, per_tile, wbuf + ((pair + 1) % 2) * 2 * per_tile, 0,
                          gn >= row_end ? 0 : (gn + TILE_M < row_end ? 2 : 1) * blocks};
            const int64_t units = (work.end + n_calls - 1) / n_calls, every = std::max<int64_t>(1, steps / std::max<int64_t>(1, units));
            for (int64_t tt = 0; tt < n_tt; tt += 2) {
                const bool two_t = tt + 1 < n_tt;
                const int8_t *a0 = abuf + tt * per_tile, *a1 = a0 + per_tile;
                const int32_t *n0 = sbuf + tt * TILE_M * TILE_M, *n1 = n0 + TILE_M * TILE_M;
                int32_t *o[4];
                int64_t os[4];
                int nv[2];
                for (int j = 0; j < 2; ++j) {
                    const int64_t t = t0 + (tt + j) * TILE_M;
                    nv[j] = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(TILE_M, n_tokens - t)));
                    for (int rt = 0; rt < 2; ++rt) {
                        const bool full = nv[j] == TILE_M;
                        o[2 * j + rt] = full ? out + t * out_stride + g + rt * TILE_M : cbuf + (2 * j + rt) * TILE_M * TILE_M;
                        os[2 * j + rt] = full ? out_stride * 4 : 64;
                    }
                }
                if (two_t && two_r) tile_block_rows<2, 2>(a0, a1, b0, b1, steps, n0, n1, o, os, work, units, every);
                else if (two_t) tile_block_rows<2, 1>(a0, a1, b0, b1, steps, n0, n1, o, os, work, units, every);
                else if (two_r) tile_block_rows<1, 2>(a0, a1, b0, b1, steps, n0, n1, o, os, work, units, every);
                else tile_block_rows<1, 1>(a0, a1, b0, b1, steps, n0, n1, o, os, work, units, every);
                for (int j = 0; j < (two_t ? 2 : 1); ++j) {
                    if (nv[j] == TILE_M) continue;
                    const int64_t t = t0 + (tt + j) * TILE_M;
                    for (int rt = 0; rt < (two_r ? 2 : 1); ++rt)
                        for (int n = 0; n < nv[j]; ++n)
                            _mm512_storeu_si512(out + (t + n) * out_stride + g + rt * TILE_M,
                                                _mm512_load_si512(cbuf + (2 * j + rt) * TILE_M * TILE_M + n * TILE_M));
                }
            }
            work.finish();
        }
    }
    return true;
}

// ---- Batched decode: one token tile (gemm_one_token_tile) ----
// Up to 16 tokens fill one B tile, so a K step is one B tile (tile 7) shared by every row tile. A row group's C
// tiles (ONE_TILE_GROUP of them: tiles 0..4) stay in the registers over all of K; A tiles alternate between tiles 5
// and 6. Each A tile is unpacked (amx_layout.h unpack_weights: shift and mask of the row's T2P block) into a
// two-step ring in L1 one K step ahead, between the TDPBUSDs. No C goes through memory before the row group's
// transposed store.
constexpr int ONE_TILE_GROUP = 5;

// The A tile of rows [r, r + 16) for K step 4b + L (plane L of T2P block b): dst[i * 64 + j]. L is a template
// argument so that each shift is by an immediate.
template <int L>
inline void unpack_plane_avx512(const uint8_t *packed, int64_t blocks, int64_t r, int64_t b, uint8_t *dst) {
    const __m512i m3 = _mm512_set1_epi8(3);
    const uint8_t *base = amx::t2p_block(packed, blocks, r, b);
    const int64_t tile_stride = amx::t2p_tile_stride(blocks);
#pragma GCC unroll 16
    for (int i = 0; i < TILE_M; ++i) {
        const __m512i q = _mm512_loadu_si512(amx::t2p_block_in_tile(base, tile_stride, i));
        _mm512_store_si512(dst + i * amx::TILE_K, _mm512_and_si512(L ? _mm512_srli_epi16(q, 2 * L) : q, m3));
    }
}
inline void unpack_step_avx512(const uint8_t *packed, int64_t blocks, int64_t r, int64_t s, uint8_t *dst) {
    switch (s % 4) {
        case 0: unpack_plane_avx512<0>(packed, blocks, r, s / 4, dst); break;
        case 1: unpack_plane_avx512<1>(packed, blocks, r, s / 4, dst); break;
        case 2: unpack_plane_avx512<2>(packed, blocks, r, s / 4, dst); break;
        default: unpack_plane_avx512<3>(packed, blocks, r, s / 4, dst); break;
    }
}

// C tiles 0..NR-1 of a row group (the one-token-tile kernels): zeroed, and stored to cbuf (16 x 16 int32 each).
template <int NR>
inline void zero_c_tiles() {
    static_assert(NR >= 1 && NR <= 5, "C tiles 0..4");
    _tile_zero(0);
    if constexpr (NR > 1) _tile_zero(1);
    if constexpr (NR > 2) _tile_zero(2);
    if constexpr (NR > 3) _tile_zero(3);
    if constexpr (NR > 4) _tile_zero(4);
}
template <int NR>
inline void store_c_tiles(int32_t *cbuf) {
    _tile_stored(0, cbuf, 64);
    if constexpr (NR > 1) _tile_stored(1, cbuf + 1 * TILE_M * TILE_M, 64);
    if constexpr (NR > 2) _tile_stored(2, cbuf + 2 * TILE_M * TILE_M, 64);
    if constexpr (NR > 3) _tile_stored(3, cbuf + 3 * TILE_M * TILE_M, 64);
    if constexpr (NR > 4) _tile_stored(4, cbuf + 4 * TILE_M * TILE_M, 64);
}

// group(std::integral_constant<int, nr>) for nr = 1..ONE_TILE_GROUP, then the group's C tiles (cbuf) into
// out[t][16 rt + i] = C - act_sums[t].
template <typename Group>
inline void one_tile_rows(int nr, Group group, const int32_t *cbuf, const int32_t *act_sums, int32_t n_tokens, int32_t *out,
                          int64_t out_stride) {
    switch (nr) {
        case 5: group(std::integral_constant<int, 5>{}); break;
        case 4: group(std::integral_constant<int, 4>{}); break;
        case 3: group(std::integral_constant<int, 3>{}); break;
        case 2: group(std::integral_constant<int, 2>{}); break;
        default: group(std::integral_constant<int, 1>{}); break;
    }
    for (int rt = 0; rt < nr; ++rt) store_transposed(cbuf + rt * TILE_M * TILE_M, act_sums, n_tokens, out + rt * TILE_M, out_stride);
}

template <int NR>
void one_tile_group(const uint8_t *packed, int64_t blocks, int64_t g, const int8_t *bbuf, uint8_t *ring, int32_t *cbuf) {
    static_assert(NR >= 1 && NR <= 5, "C tiles 0..4");
    const int64_t steps = blocks * 4;
    constexpr int64_t SLOT = NR * TILE_BYTES;  // one K step's A tiles
    for (int rt = 0; rt < NR; ++rt) unpack_plane_avx512<0>(packed, blocks, g + rt * TILE_M, 0, ring + rt * TILE_BYTES);
    zero_c_tiles<NR>();
    for (int64_t s = 0; s < steps; ++s) {
        const uint8_t *cur = ring + (s % 2) * SLOT;
        uint8_t *next = ring + ((s + 1) % 2) * SLOT;
        const bool more = s + 1 < steps;
        _tile_loadd(7, bbuf + s * TILE_BYTES, 64);
        // C tile rt += A(rt) . B, then rt's next A tile is unpacked while the tile unit works.
#define RYZ_ONE_TILE_STEP(rt, a)                                                                         \
    if constexpr (NR > rt) {                                                                             \
        _tile_loadd(a, cur + rt * TILE_BYTES, 64);                                                      \
        _tile_dpbusd(rt, a, 7);                                                                          \
        if (more) unpack_step_avx512(packed, blocks, g + rt * TILE_M, s + 1, next + rt * TILE_BYTES);   \
    }
        RYZ_ONE_TILE_STEP(0, 5)
        RYZ_ONE_TILE_STEP(1, 6)
        RYZ_ONE_TILE_STEP(2, 5)
        RYZ_ONE_TILE_STEP(3, 6)
        RYZ_ONE_TILE_STEP(4, 5)
#undef RYZ_ONE_TILE_STEP
    }
    store_c_tiles<NR>(cbuf);
}

// The one-token-tile kernels' scratch: the call's B tiles (one per K step), the A ring (gemm_one_token_tile's) and
// the C tiles of a row group.
struct OneTileScratch {
    int8_t *bbuf;
    uint8_t *ring;
    int32_t *cbuf;
    bool get(int64_t steps) {
        bbuf = reinterpret_cast<int8_t *>(g_b.get(static_cast<size_t>(steps * TILE_BYTES)));
        ring = g_a.get(static_cast<size_t>(2 * ONE_TILE_GROUP * TILE_BYTES));
        cbuf = reinterpret_cast<int32_t *>(g_c.get(static_cast<size_t>(ONE_TILE_GROUP * TILE_BYTES)));
        return bbuf && ring && cbuf;
    }
};

// ternary_gemm's contract for at most 16 tokens and whole row tiles. false when scratch memory runs out.
bool gemm_one_token_tile(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, const int8_t *act,
                         const int32_t *act_sums, int32_t n_tokens, int32_t *out, int64_t out_stride) {
    const int64_t blocks = cols / QK_K;
    OneTileScratch sc;
    if (!sc.get(blocks * 4)) return false;
    configure_tiles();
    pack_acts_avx512(act, cols, n_tokens, sc.bbuf, TILE_BYTES);
    for (int64_t g = row_begin; g < row_end; g += ONE_TILE_GROUP * TILE_M) {
        const int nr = static_cast<int>(std::min<int64_t>(ONE_TILE_GROUP, (row_end - g) / TILE_M));
        one_tile_rows(
            nr, [&](auto n) { one_tile_group<decltype(n)::value>(packed, blocks, g, sc.bbuf, sc.ring, sc.cbuf); }, sc.cbuf, act_sums,
            n_tokens, out + g, out_stride);
    }
    return true;
}

void ternary_gemm_amx(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, const int8_t *act,
                      const int32_t *act_sums, int32_t n_tokens, int32_t token_tile, int32_t *out, int64_t out_stride) {
    const Kernels &avx = *kernels_avx512();
    const int64_t blocks = cols / QK_K;
    const int64_t amx_end = row_begin + (row_end - row_begin) / TILE_M * TILE_M;
    if (n_tokens < MIN_TOKENS || blocks < 1 || amx_end <= row_begin) {
        avx.ternary_gemm(packed, row_begin, row_end, cols, act, act_sums, n_tokens, token_tile, out, out_stride);
        return;
    }
    if (amx_end < row_end)  // 4 to 12 rows left over
        avx.ternary_gemm(packed, amx_end, row_end, cols, act, act_sums, n_tokens, token_tile, out, out_stride);
    if (n_tokens <= TILE_M && gemm_one_token_tile(packed, row_begin, amx_end, cols, act, act_sums, n_tokens, out, out_stride)) return;
    if (n_tokens >= STATIONARY_MIN_TOKENS && gemm_tokens_as_rows(packed, row_begin, amx_end, cols, act, act_sums, n_tokens, out, out_stride))
        return;
    const int64_t steps = blocks * 4;  // K steps of 64 columns
    const int64_t max_tiles = (std::min<int64_t>(TOKEN_BLOCK, n_tokens) + TILE_M - 1) / TILE_M;
    int8_t *bbuf = reinterpret_cast<int8_t *>(g_b.get(static_cast<size_t>(max_tiles * steps * TILE_BYTES)));
    uint8_t *abuf = g_a.get(static_cast<size_t>(ROW_GROUP_TILES * K_CHUNK * TILE_BYTES));
    int32_t *cbuf = reinterpret_cast<int32_t *>(g_c.get(static_cast<size_t>(ROW_GROUP_TILES * max_tiles * TILE_M * TILE_M * 4)));
    if (!bbuf || !abuf || !cbuf) {
        avx.ternary_gemm(packed, row_begin, amx_end, cols, act, act_sums, n_tokens, token_tile, out, out_stride);
        return;
    }
    configure_tiles();

    for (int64_t t0 = 0; t0 < n_tokens; t0 += TOKEN_BLOCK) {
        const int64_t in_block = std::min<int64_t>(TOKEN_BLOCK, n_tokens - t0);
        const int64_t n_tt = (in_block + TILE_M - 1) / TILE_M;
        const int64_t step_stride = n_tt * TILE_BYTES;  // B tile of (step s, token tile tt) at s * step_stride + tt * TILE_BYTES
        for (int64_t tt = 0; tt < n_tt; ++tt)
            pack_acts_avx512(act + (t0 + tt * TILE_M) * cols, cols, static_cast<int>(std::min<int64_t>(TILE_M, in_block - tt * TILE_M)),
                           bbuf + tt * TILE_BYTES, step_stride);
        for (int64_t g = row_begin; g < amx_end; g += ROW_GROUP_TILES * TILE_M) {
            const int64_t n_rt = std::min<int64_t>(ROW_GROUP_TILES, (amx_end - g) / TILE_M);
            auto c_tile = [&](int64_t rt, int64_t tt) { return cbuf + (rt * n_tt + tt) * TILE_M * TILE_M; };
            for (int64_t s0 = 0; s0 < steps; s0 += K_CHUNK) {
                const int64_t n_s = std::min<int64_t>(K_CHUNK, steps - s0);
                for (int64_t rt = 0; rt < n_rt; ++rt) unpack_weights_avx512(packed, blocks, g + rt * TILE_M, s0, s0 + n_s, abuf + rt * K_CHUNK * TILE_BYTES);
                const bool first = s0 == 0;
                for (int64_t tt = 0; tt < n_tt; tt += 2) {
                    const int8_t *b0 = bbuf + s0 * step_stride + tt * TILE_BYTES, *b1 = b0 + TILE_BYTES;
                    for (int64_t rt = 0; rt < n_rt; rt += 2) {
                        const uint8_t *a0 = abuf + rt * K_CHUNK * TILE_BYTES, *a1 = a0 + K_CHUNK * TILE_BYTES;
                        const bool two_r = rt + 1 < n_rt, two_t = tt + 1 < n_tt;
                        int32_t *c00 = c_tile(rt, tt), *c01 = two_t ? c_tile(rt, tt + 1) : nullptr;
                        int32_t *c10 = two_r ? c_tile(rt + 1, tt) : nullptr, *c11 = two_r && two_t ? c_tile(rt + 1, tt + 1) : nullptr;
                        tile_block_edge(two_r, two_t, a0, a1, b0, b1, step_stride, n_s, c00, c01, c10, c11, first);
                    }
                }
            }
            for (int64_t rt = 0; rt < n_rt; ++rt)
                for (int64_t tt = 0; tt < n_tt; ++tt) {
                    const int64_t t = t0 + tt * TILE_M;
                    store_transposed(c_tile(rt, tt), act_sums + t, static_cast<int>(std::min<int64_t>(TILE_M, n_tokens - t)),
                                     out + t * out_stride + g + rt * TILE_M, out_stride);
                }
        }
    }
}

// T1P (TQ1_0 models) on AMX: decode and fewer than MIN_TOKENS keep AVX-512's kernels on the raw base-3 bytes; 8 to 16
// tokens load their A tiles from code bytes (t1p_one_token_tile, below); more tokens expand each group of
// T1P_GROUP_ROWS rows to T2P once per call (1.7 MB at 6912 columns) and run the AMX GEMM over all the call's tokens
// on it, so each weight is expanded once per call, not once per block of tokens. Each group's GEMM packs every token's
// activations again, so groups are large: 1024 rows against 256 took pp512 of the 2B4T TQ1_0 file from 1.19-1.21 s
// to 1.11-1.16 s (4096 rows: 1.08-1.15, for 4x the scratch; 3 alternations, Xeon 0xA7).
constexpr int64_t T1P_GROUP_ROWS = 1024;

// T1P with one token tile, no T2P in between: each row group's 5 row tiles are expanded once into code+1 bytes, row
// after row (t1p_codes_avx512: 200 KB at 2560 columns, in L2), and that buffer is the A tiles themselves (a tile
// load with the buffer's row pitch as its stride). The B tiles and C handling are gemm_one_token_tile's. At 8 tokens
// 1.06-1.47x AVX-512's batched T1P kernel, at 16 about 2x, and 1.4-1.6x the expansion to T2P followed by
// gemm_one_token_tile (docs/kernels.md "AMX").
template <int NR>
void t1p_tile_group(const uint8_t *codes, int64_t pitch, int64_t steps, const int8_t *bbuf, int32_t *cbuf) {
    zero_c_tiles<NR>();
    for (int64_t s = 0; s < steps; ++s) {
        _tile_loadd(7, bbuf + s * TILE_BYTES, 64);
        const uint8_t *a = codes + s * amx::TILE_K;
        _tile_loadd(5, a, pitch);
        _tile_dpbusd(0, 5, 7);
        if constexpr (NR > 1) { _tile_loadd(6, a + 1 * TILE_M * pitch, pitch); _tile_dpbusd(1, 6, 7); }
        if constexpr (NR > 2) { _tile_loadd(5, a + 2 * TILE_M * pitch, pitch); _tile_dpbusd(2, 5, 7); }
        if constexpr (NR > 3) { _tile_loadd(6, a + 3 * TILE_M * pitch, pitch); _tile_dpbusd(3, 6, 7); }
        if constexpr (NR > 4) { _tile_loadd(5, a + 4 * TILE_M * pitch, pitch); _tile_dpbusd(4, 5, 7); }
    }
    store_c_tiles<NR>(cbuf);
}

bool t1p_one_token_tile(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, const int8_t *act,
                        const int32_t *act_sums, int32_t n_tokens, int32_t token_tile, int32_t *out, int64_t out_stride) {
    const int64_t blocks = cols / QK_K, steps = blocks * 4, nv = t1p_vectors(cols), pitch = nv * T1P_VECTOR_COLS;
    const int64_t amx_end = row_begin + (row_end - row_begin) / TILE_M * TILE_M;
    if (blocks < 1 || amx_end <= row_begin) return false;
    OneTileScratch sc;
    uint8_t *codes = g_codes.get(static_cast<size_t>(ONE_TILE_GROUP * TILE_M * pitch));
    if (!sc.get(steps) || !codes) return false;
    configure_tiles();
    pack_acts_avx512(act, cols, n_tokens, sc.bbuf, TILE_BYTES);
    for (int64_t g = row_begin; g < amx_end; g += ONE_TILE_GROUP * TILE_M) {
        const int nr = static_cast<int>(std::min<int64_t>(ONE_TILE_GROUP, (amx_end - g) / TILE_M));
        for (int64_t r = 0; r < nr * TILE_M; r += TILE_ROWS)
            t1p_codes_avx512(packed + (g + r) / TILE_ROWS * nv * T1P_VECTOR_BYTES, nv, codes + r * pitch, pitch);
        one_tile_rows(
            nr, [&](auto n) { t1p_tile_group<decltype(n)::value>(codes, pitch, steps, sc.bbuf, sc.cbuf); }, sc.cbuf, act_sums,
            n_tokens, out + g, out_stride);
    }
    if (amx_end < row_end)  // 4 to 12 rows left over
        kernels_avx512()->ternary_gemm_t1p(packed, amx_end, row_end, cols, act, act_sums, n_tokens, token_tile, out, out_stride);
    return true;
}

void ternary_gemm_t1p_amx(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols, const int8_t *act,
                          const int32_t *act_sums, int32_t n_tokens, int32_t token_tile, int32_t *out, int64_t out_stride) {
    if (n_tokens < MIN_TOKENS) {
        kernels_avx512()->ternary_gemm_t1p(packed, row_begin, row_end, cols, act, act_sums, n_tokens, token_tile, out, out_stride);
        return;
    }
    if (n_tokens <= TILE_M && t1p_one_token_tile(packed, row_begin, row_end, cols, act, act_sums, n_tokens, token_tile, out, out_stride)) return;
    thread_local std::vector<uint8_t> scratch;
    const size_t need = static_cast<size_t>(T1P_GROUP_ROWS / TILE_ROWS * cols);
    if (scratch.size() < need) scratch.resize(need);
    t1p_gemm_via_t2p(packed, row_begin, row_end, cols, act, act_sums, n_tokens, token_tile, out, out_stride, scratch.data(),
                     T1P_GROUP_ROWS, static_cast<int64_t>(n_tokens) * cols, t1p_to_t2p_avx512, ternary_gemm_amx);
}

}  // namespace

const Kernels *kernels_amx() {
    static const Kernels k = [] {
        Kernels t = *kernels_avx512();  // every other entry is AVX-512's
        t.isa = RYZ_ISA_AMX;
        t.ternary_gemm = ternary_gemm_amx;
        t.ternary_gemm_t1p = ternary_gemm_t1p_amx;
        return t;
    }();
    return &k;
}

#else

const Kernels *kernels_amx() { return nullptr; }

#endif

}  // namespace ryz

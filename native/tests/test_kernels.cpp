// Kernel tests: every SIMD family compiled in and supported by this CPU against the scalar kernels
// (the executable spec), through the C ABI only. No framework: one line per failure, a final
// "N passed, M failed" line, non-zero exit status on failure.
//
//   ternary GEMM       bit-exact vs scalar (integer arithmetic has one right answer), random and
//                      extreme codes/activations, rows a multiple of 4 but not of 8/16, cols 256..2816,
//                      n_tokens 1..70, every token tile when the library exports ryz_ternary_gemm_tiled,
//                      buffers at odd addresses; the scalar kernel itself against a naive reference
//   quantization       bit-exact vs scalar: ties at .5, zeros, huge, tiny, subnormal, inf and NaN
//   dense GEMM         F32/F16/Q8_0/Q6_K within a rounding-error bound (see dense_tolerance), plus
//                      determinism: the same bits run to run, over any row sub-range, and whatever the
//                      batch (a row's result must not depend on which rows or tokens share a call);
//                      and the same bits from every SIMD family (AVX2, AVX-512 and NEON share the lane
//                      assignment and reduction tree, so logits do not depend on the machine)
//   ternary pack       TQ2_0 and TQ1_0 blocks built here from random codes repack to the T2P bytes
//                      built here from the same codes; then GEMM on the repacked weights
//   t1p                the 1.6-bit layout of TQ1_0 models: scalar spec vs a naive product from the codes
//                      (canonical, arbitrary and all-255 bytes), every family and token tile bit-exact vs
//                      scalar (cols 256..2816, 6912, 43008; rows 4/12/36/20/260/68; 1..70 tokens; odd
//                      addresses), TQ1_0 repack to T1P bytes built here, and T1P GEMM == T2P GEMM of the
//                      same file; byte lengths, layouts and types the entry points refuse
//   attention          kv_dot / kv_axpy bit-exact vs scalar (they follow the reference's float order):
//                      F32 and F16 caches, head sizes on and off every family's fast path, 0..130
//                      positions, strides of several heads, buffers off 64-byte alignment; the multi-query
//                      kernels (the forward's GQA path) for 1..17 queries with ragged n_pos against scalar's
//                      single-query ones per query, with inf/NaN rows (NaN only as NaN: its sign is free)
//   softmax            softmax_exp bit-exact vs (float)std::exp((double)x): every 97th float and whole
//                      delicate regions here, every one of the 2^32 floats with --exhaustive-exp (make
//                      exhaustive-exp); the whole softmax (divide, max, exp, pairwise sum, divide) bit-exact
//                      vs scalar for 0..4100 scores with NaN, infinities, signed zeros and ties
//   elementwise        the forward's per-token kernels (rms_norm, relu^2 / SiLU times up, residual add, RoPE, KV
//                      store, BitLinear rescale) bit-exact vs scalar (NaN only as NaN) on odd lengths and the 2B4T
//                      widths, with inf/NaN/subnormal/fp16-edge values, odd addresses and guards past the end; the
//                      fp16 store over every 1009th float and whole subnormal/overflow regions
#include <dlfcn.h>

#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "ryz.h"
#include "../kernels/amx_layout.h"  // the AMX kernel's tile operands, emulated below on any host
#include "../kernels/amx_vnni.h"    // amx.cpp's vectorized VNNI weight tiles, held to amx_layout.h on AVX-512 hosts

namespace {

int g_passed = 0, g_failed = 0;

void check(bool ok, const char *fmt, ...) {
    if (ok) {
        ++g_passed;
        return;
    }
    ++g_failed;
    std::va_list ap;
    va_start(ap, fmt);
    std::printf("FAIL: ");
    std::vprintf(fmt, ap);
    std::printf("\n");
    va_end(ap);
}

struct Rng {  // splitmix64: fixed seed, same sequence everywhere
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed) {}
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    int range(int lo, int hi) { return lo + static_cast<int>(next() % static_cast<uint64_t>(hi - lo + 1)); }  // [lo, hi]
    float uniform() { return static_cast<float>(next() >> 40) / 16777216.0f; }                                  // [0, 1)
    float symmetric() { return 2.0f * uniform() - 1.0f; }
};

// A buffer whose data pointer sits `offset` bytes past a 64-byte boundary (kernels must not assume alignment).
template <class T>
struct Buffer {
    std::vector<uint8_t> storage;
    T *ptr = nullptr;
    size_t n = 0;
    Buffer(size_t count, size_t offset) : storage(count * sizeof(T) + 128), n(count) {
        uintptr_t base = reinterpret_cast<uintptr_t>(storage.data());
        base = (base + 63) & ~static_cast<uintptr_t>(63);
        ptr = reinterpret_cast<T *>(base + offset);
    }
    T &operator[](size_t i) { return ptr[i]; }
    const T &operator[](size_t i) const { return ptr[i]; }
};

const char *isa_name(int32_t isa) {
    static const char *names[] = {"scalar", "avx2", "avx512", "neon", "amx"};
    return isa >= 0 && isa < 5 ? names[isa] : "?";
}

// Optional ABI entry with an explicit token tile; the sweep over tiles runs when the library has it.
using TiledFn = ryz_status (*)(const uint8_t *, int64_t, int64_t, const int8_t *, int32_t, int32_t, int32_t *);
TiledFn tiled_gemm() {
    static TiledFn fn = reinterpret_cast<TiledFn>(dlsym(RTLD_DEFAULT, "ryz_ternary_gemm_tiled"));
    return fn;
}

// ---------------------------------------------------------------------------------------------
// fp16 helpers (test-side, independent of the library)
// ---------------------------------------------------------------------------------------------

float half_to_float(uint16_t h) {
    const int sign = h >> 15, exp = (h >> 10) & 31, mant = h & 1023;
    float v;
    if (exp == 0) v = std::ldexp(static_cast<float>(mant), -24);
    else if (exp == 31) v = mant ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
    else v = std::ldexp(static_cast<float>(mant + 1024), exp - 25);
    return sign ? -v : v;
}

uint16_t float_to_half(float f) {  // round to nearest even, finite normal/subnormal range only (test data)
    uint16_t best = 0;
    const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
    const float a = std::fabs(f);
    // binary search on the monotone positive half range [0, 0x7BFF]
    uint16_t lo = 0, hi = 0x7BFF;
    while (lo < hi) {
        const uint16_t mid = static_cast<uint16_t>((lo + hi + 1) / 2);
        if (half_to_float(mid) <= a) lo = mid; else hi = static_cast<uint16_t>(mid - 1);
    }
    best = lo;
    if (lo < 0x7BFF) {
        const float d0 = a - half_to_float(lo), d1 = half_to_float(static_cast<uint16_t>(lo + 1)) - a;
        if (d1 < d0 || (d1 == d0 && (lo & 1))) best = static_cast<uint16_t>(lo + 1);
    }
    return static_cast<uint16_t>(sign | best);
}

// ---------------------------------------------------------------------------------------------
// Ternary: weights as codes+1 in {0, 1, 2} (3 also tested: the unused 2-bit value of TQ2_0)
// ---------------------------------------------------------------------------------------------

constexpr int QK = 256, TILE = 4, BLOCK_BYTES = 64;

// T2P (src/blocks.h): packed[tile][block][row][64]; byte j holds code+1 of column 64l + j in bits 2l.
std::vector<uint8_t> make_t2p(const std::vector<uint8_t> &codes, int64_t rows, int64_t cols) {
    const int64_t blocks = cols / QK;
    std::vector<uint8_t> out(static_cast<size_t>(rows * blocks * BLOCK_BYTES));
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t b = 0; b < blocks; ++b) {
            uint8_t *dst = &out[static_cast<size_t>(((r / TILE * blocks + b) * TILE + r % TILE) * BLOCK_BYTES)];
            const uint8_t *c = &codes[static_cast<size_t>(r * cols + b * QK)];
            for (int j = 0; j < 64; ++j)
                dst[j] = static_cast<uint8_t>(c[j] | c[64 + j] << 2 | c[128 + j] << 4 | c[192 + j] << 6);
        }
    return out;
}

// Codes with every block kind: random, all 0 (all -1), all 1 (all 0), all 2 (all +1), and optionally 3.
std::vector<uint8_t> random_codes(Rng &rng, int64_t rows, int64_t cols, bool allow3) {
    std::vector<uint8_t> codes(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t b = 0; b < cols / QK; ++b) {
            const int kind = rng.range(0, 7);
            uint8_t *c = &codes[static_cast<size_t>(r * cols + b * QK)];
            for (int k = 0; k < QK; ++k) {
                if (kind <= 3) c[k] = static_cast<uint8_t>(allow3 ? rng.range(0, 3) : rng.range(0, 2));
                else if (kind == 4) c[k] = 0;
                else if (kind == 5) c[k] = 1;
                else if (kind == 6) c[k] = 2;
                else c[k] = static_cast<uint8_t>(allow3 ? 3 : 2);
            }
        }
    return codes;
}

// Per token: random, all 127, all -128, alternating 127/-128, random in {-128, 127}.
void random_acts(Rng &rng, int8_t *act, int32_t n_tokens, int64_t cols) {
    for (int32_t t = 0; t < n_tokens; ++t) {
        const int kind = t == 0 ? rng.range(0, 4) : (t % 5 + rng.range(0, 1)) % 5;
        int8_t *a = act + t * cols;
        for (int64_t k = 0; k < cols; ++k) {
            switch (kind) {
                case 0: a[k] = static_cast<int8_t>(rng.range(-128, 127)); break;
                case 1: a[k] = 127; break;
                case 2: a[k] = -128; break;
                case 3: a[k] = static_cast<int8_t>(k % 2 ? -128 : 127); break;
                default: a[k] = static_cast<int8_t>(rng.range(0, 1) ? -128 : 127); break;
            }
        }
    }
}

std::vector<int32_t> naive_ternary(const std::vector<uint8_t> &codes, int64_t rows, int64_t cols, const int8_t *act, int32_t n_tokens) {
    std::vector<int32_t> out(static_cast<size_t>(rows * n_tokens));
    for (int32_t t = 0; t < n_tokens; ++t)
        for (int64_t r = 0; r < rows; ++r) {
            int64_t acc = 0;
            for (int64_t k = 0; k < cols; ++k) acc += (codes[static_cast<size_t>(r * cols + k)] - 1) * act[t * cols + k];
            out[static_cast<size_t>(t * rows + r)] = static_cast<int32_t>(acc);
        }
    return out;
}

size_t first_mismatch(const int32_t *a, const int32_t *b, size_t n) {
    for (size_t i = 0; i < n; ++i)
        if (a[i] != b[i]) return i;
    return n;
}

std::vector<int32_t> g_simd_isas;

// One ternary shape: scalar reference once, then every SIMD family and token tile against it.
void ternary_case(Rng &rng, int64_t rows, int64_t cols, int32_t n_tokens, const std::vector<int32_t> &tiles, bool allow3, bool naive) {
    const std::vector<uint8_t> codes = random_codes(rng, rows, cols, allow3);
    const std::vector<uint8_t> t2p = make_t2p(codes, rows, cols);
    Buffer<uint8_t> w(t2p.size(), static_cast<size_t>(rng.range(1, 63)));
    std::memcpy(w.ptr, t2p.data(), t2p.size());
    Buffer<int8_t> act(static_cast<size_t>(n_tokens * cols), static_cast<size_t>(rng.range(1, 63)));
    random_acts(rng, act.ptr, n_tokens, cols);
    const size_t n_out = static_cast<size_t>(rows * n_tokens);

    std::vector<int32_t> ref(n_out, 0x7EADBEEF);
    ryz_set_isa(RYZ_ISA_SCALAR);
    ryz_status st = ryz_ternary_gemm(w.ptr, rows, cols, act.ptr, n_tokens, ref.data());
    check(st == RYZ_OK, "ternary scalar %lldx%lld n=%d: status %d (%s)", (long long)rows, (long long)cols, n_tokens, st, ryz_last_error());
    if (naive) {
        const std::vector<int32_t> want = naive_ternary(codes, rows, cols, act.ptr, n_tokens);
        const size_t i = first_mismatch(ref.data(), want.data(), n_out);
        check(i == n_out, "ternary scalar vs naive %lldx%lld n=%d: out[%zu] = %d, want %d", (long long)rows, (long long)cols,
              n_tokens, i, i < n_out ? ref[i] : 0, i < n_out ? want[i] : 0);
    }
    for (int32_t isa : g_simd_isas) {
        ryz_set_isa(isa);
        Buffer<int32_t> out(n_out, 4 * static_cast<size_t>(rng.range(1, 15)));
        std::fill(out.ptr, out.ptr + n_out, 0x7EADBEEF);
        st = ryz_ternary_gemm(w.ptr, rows, cols, act.ptr, n_tokens, out.ptr);
        size_t i = first_mismatch(out.ptr, ref.data(), n_out);
        check(st == RYZ_OK && i == n_out, "ternary %s %lldx%lld n=%d%s: out[%zu] = %d, scalar %d", isa_name(isa), (long long)rows,
              (long long)cols, n_tokens, allow3 ? " (code 3)" : "", i, i < n_out ? out[i] : 0, i < n_out ? ref[i] : 0);
        if (!tiled_gemm()) continue;
        for (int32_t tile : tiles) {
            std::fill(out.ptr, out.ptr + n_out, 0x7EADBEEF);
            st = tiled_gemm()(w.ptr, rows, cols, act.ptr, n_tokens, tile, out.ptr);
            i = first_mismatch(out.ptr, ref.data(), n_out);
            check(st == RYZ_OK && i == n_out, "ternary %s %lldx%lld n=%d token_tile=%d: out[%zu] = %d, scalar %d", isa_name(isa),
                  (long long)rows, (long long)cols, n_tokens, tile, i, i < n_out ? out[i] : 0, i < n_out ? ref[i] : 0);
        }
    }
}

void test_ternary() {
    Rng rng(1);
    const std::vector<int32_t> all_tiles = {-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 1000};
    const std::vector<int32_t> some_tiles = {1, 3, 4, 8, 13};
    // Every n_tokens 1..70 on small shapes (ragged token tails for every tile).
    for (int32_t n = 1; n <= 70; ++n) ternary_case(rng, n % 2 ? 4 : 12, 256 * (1 + n % 3), n, all_tiles, false, n <= 6);
    // Every cols 256..2816 x rows 4, 12, 260 x a spread of token counts (ragged against every tile).
    for (int64_t cols = 256; cols <= 2816; cols += 256)
        for (int64_t rows : {4, 12, 260})
            for (int32_t n : {1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 17, 33, 64, 70}) ternary_case(rng, rows, cols, n, some_tiles, false, false);
    // Larger decode and prefill shapes, and the unused code 3 (kernels must match scalar anyway).
    ternary_case(rng, 260, 2560, 1, all_tiles, false, true);
    ternary_case(rng, 132, 6912, 1, some_tiles, false, false);
    ternary_case(rng, 68, 2560, 70, some_tiles, false, false);
    ternary_case(rng, 12, 1024, 11, all_tiles, true, true);
    ternary_case(rng, 8, 8192, 3, some_tiles, true, false);
    // The AMX kernel's own edges (every family runs them): an odd number of 16-row tiles plus a 4-row
    // tail, token tiles odd and partial, K chunks with a remainder (2816 = 44 steps of 64), token blocks
    // that split (6912 columns: 96 tokens per block; 2560: 288) and prefill-sized calls.
    ternary_case(rng, 84, 2816, 40, some_tiles, false, false);
    ternary_case(rng, 48, 768, 16, {0}, true, false);
    ternary_case(rng, 260, 6912, 128, {0}, false, false);
    ternary_case(rng, 36, 2560, 515, {0}, true, false);
    // Prefill (>= 128 tokens) edges: odd row-tile counts, a partial token tile alone and in a pair, a 1-token block.
    ternary_case(rng, 80, 2560, 300, {0}, false, false);
    ternary_case(rng, 48, 2560, 150, {0}, true, false);
    ternary_case(rng, 96, 6912, 129, {0}, false, false);
    ternary_case(rng, 2560, 2560, 300, {0}, false, false);
}

// What both AMX layout emulations start from: random T2P weights (code 3 too if allow3) and activations, the scalar
// kernel's output for them, and each token's activation sum.
struct AmxLayoutOperands {
    std::vector<uint8_t> t2p;
    std::vector<int8_t> act;
    std::vector<int32_t> ref, sums;
};
AmxLayoutOperands amx_layout_operands(Rng &rng, int64_t rows, int64_t cols, int32_t n_tokens, bool allow3, const char *name) {
    AmxLayoutOperands o;
    o.t2p = make_t2p(random_codes(rng, rows, cols, allow3), rows, cols);
    o.act.resize(static_cast<size_t>(n_tokens * cols));
    random_acts(rng, o.act.data(), n_tokens, cols);
    o.ref.resize(static_cast<size_t>(rows * n_tokens));
    ryz_set_isa(RYZ_ISA_SCALAR);
    check(ryz_ternary_gemm(o.t2p.data(), rows, cols, o.act.data(), n_tokens, o.ref.data()) == RYZ_OK, "%s: scalar failed", name);
    o.sums.assign(static_cast<size_t>(n_tokens), 0);
    for (int32_t t = 0; t < n_tokens; ++t)
        for (int64_t k = 0; k < cols; ++k) o.sums[t] += o.act[t * cols + k];
    return o;
}

// An emulation's outputs against the scalar kernel's, over the rows it covers (whole 16-row tiles).
void check_amx_layout_outputs(const std::vector<int32_t> &got, const std::vector<int32_t> &ref, int64_t rows, int64_t cols,
                              int32_t n_tokens, bool allow3, const char *name) {
    size_t bad = ref.size();
    for (int32_t t = 0; t < n_tokens && bad == ref.size(); ++t)
        for (int64_t r = 0; r < rows / 16 * 16; ++r)
            if (got[t * rows + r] != ref[t * rows + r]) { bad = static_cast<size_t>(t * rows + r); break; }
    check(bad == ref.size(), "%s emulation %lldx%lld n=%d%s: out[%zu] = %d, scalar %d", name, (long long)rows, (long long)cols, n_tokens,
          allow3 ? " (code 3)" : "", bad, bad < ref.size() ? got[bad] : 0, bad < ref.size() ? ref[bad] : 0);
}

// The AMX kernel's tile operands (kernels/amx_layout.h: A = weight rows unpacked to code+1, B =
// activations in the VNNI layout) multiplied as TDPBUSD defines (C[i][n] += sum A[i][4kk+m] *
// B[kk][4n+m], u8 x s8 into int32), minus the activation sums, against the scalar kernel. Runs on every
// host, so the layout is checked where there are no tiles; the A tiles are built in two K chunks, as the
// kernel builds them.
void amx_layout_case(Rng &rng, int64_t rows, int64_t cols, int32_t n_tokens, bool allow3) {
    namespace amx = ryz::amx;
    const AmxLayoutOperands o = amx_layout_operands(rng, rows, cols, n_tokens, allow3, "amx layout");
    const std::vector<uint8_t> &t2p = o.t2p;
    const std::vector<int8_t> &act = o.act;
    const int64_t steps = cols / amx::TILE_K, blocks = cols / QK, split = steps / 3;
    std::vector<uint8_t> a(static_cast<size_t>(steps * amx::TILE_BYTES));
    std::vector<int8_t> b(static_cast<size_t>(steps * amx::TILE_BYTES));
    std::vector<int32_t> got(o.ref.size(), 0x7EADBEEF);
    for (int32_t t0 = 0; t0 < n_tokens; t0 += 16) {
        const int nv = std::min(16, n_tokens - t0);
        amx::pack_acts(act.data() + t0 * cols, cols, nv, b.data(), amx::TILE_BYTES);
        for (int64_t r = 0; r + 16 <= rows; r += 16) {
            amx::unpack_weights(t2p.data(), blocks, r, 0, split, a.data());
            amx::unpack_weights(t2p.data(), blocks, r, split, steps, a.data() + split * amx::TILE_BYTES);
            int32_t c[16][16] = {};
            for (int64_t s = 0; s < steps; ++s)
                for (int i = 0; i < 16; ++i)
                    for (int n = 0; n < 16; ++n)
                        for (int kk = 0; kk < 16; ++kk)
                            for (int m = 0; m < 4; ++m)
                                c[i][n] += static_cast<int32_t>(a[s * amx::TILE_BYTES + i * 64 + 4 * kk + m]) *
                                           static_cast<int32_t>(b[s * amx::TILE_BYTES + kk * 64 + 4 * n + m]);
            for (int n = 0; n < 16; ++n) {
                if (n >= nv) {  // padding tokens: zero activations
                    for (int i = 0; i < 16; ++i) check(c[i][n] == 0, "amx layout: padding token %d row %d = %d", n, i, c[i][n]);
                    continue;
                }
                for (int i = 0; i < 16; ++i) got[(t0 + n) * rows + r + i] = c[i][n] - o.sums[t0 + n];
            }
        }
    }
    check_amx_layout_outputs(got, o.ref, rows, cols, n_tokens, allow3, "amx layout");
}

// The prefill orientation's operands (kernels/amx_layout.h, gemm_tokens_as_rows: A = 16 tokens' activation
// rows, B = 16 weight rows in the VNNI layout, C starting from minus the activation sums) multiplied as TDPBSUD
// defines (C[n][i] += sum A[n][4kk+m] * B[kk][4i+m], s8 x u8 into int32) against the scalar kernel, with
// nothing subtracted after: C is the output. Runs on every host; both operands are built in two K ranges
// (B's split on a T2P block, as the kernel builds it a block at a time), padding token rows must stay 0. On
// AVX-512 hosts (AMX or not) the kernel's vectorized unpack_vnni_block (amx_vnni.h) must build the same B tiles.
void amx_rows_layout_case(Rng &rng, int64_t rows, int64_t cols, int32_t n_tokens, bool allow3) {
    namespace amx = ryz::amx;
    const AmxLayoutOperands o = amx_layout_operands(rng, rows, cols, n_tokens, allow3, "amx rows layout");
    const std::vector<uint8_t> &t2p = o.t2p;
    const std::vector<int8_t> &act = o.act;
    const int64_t steps = cols / amx::TILE_K, blocks = cols / QK, split = steps / 3, bsplit = blocks / 2 * 4;
    const int32_t n_tt = (n_tokens + 15) / 16;
    std::vector<int8_t> a(static_cast<size_t>(n_tt * steps * amx::TILE_BYTES));  // a token tile's tiles over all of K, as the kernel's
    std::vector<uint8_t> b(static_cast<size_t>(steps * amx::TILE_BYTES));
    std::vector<int32_t> got(o.ref.size(), 0x7EADBEEF);
    for (int32_t tt = 0; tt < n_tt; ++tt) {
        int8_t *at = a.data() + tt * steps * amx::TILE_BYTES;
        const int nv = std::min(16, n_tokens - 16 * tt);
        amx::pack_token_rows(act.data() + 16 * tt * cols, cols, nv, 0, split, at);
        amx::pack_token_rows(act.data() + 16 * tt * cols, cols, nv, split, steps, at + split * amx::TILE_BYTES);
    }
    for (int64_t r = 0; r + 16 <= rows; r += 16) {
        amx::unpack_vnni(t2p.data(), blocks, r, 0, bsplit, b.data());
        amx::unpack_vnni(t2p.data(), blocks, r, bsplit, steps, b.data() + bsplit * amx::TILE_BYTES);
#ifdef RYZ_HAVE_AMX_VNNI_BLOCK
        if (ryz_isa_supported(RYZ_ISA_AVX512)) {  // the kernel's own B tiles, a T2P block at a time, against the spec
            Buffer<uint8_t> v(b.size(), 0);
            for (int64_t bb = 0; bb < blocks; ++bb) amx::unpack_vnni_block(t2p.data(), blocks, r, bb, v.ptr);
            check(std::memcmp(v.ptr, b.data(), b.size()) == 0, "amx unpack_vnni_block %lldx%lld rows %lld..: differs from unpack_vnni",
                  (long long)rows, (long long)cols, (long long)r);
        }
#endif
        for (int32_t tt = 0; tt < n_tt; ++tt) {
            const int8_t *at = a.data() + tt * steps * amx::TILE_BYTES;
            const int nv = std::min(16, n_tokens - 16 * tt);
            int32_t c[16][16];
            amx::neg_sums_tile(o.sums.data() + 16 * tt, nv, &c[0][0]);
            for (int64_t s = 0; s < steps; ++s) {
                const int8_t *ta = at + s * amx::TILE_BYTES;
                const uint8_t *tb = b.data() + s * amx::TILE_BYTES;
                for (int n = 0; n < 16; ++n)
                    for (int i = 0; i < 16; ++i)
                        for (int kk = 0; kk < 16; ++kk)
                            for (int m = 0; m < 4; ++m)
                                c[n][i] += static_cast<int32_t>(ta[n * 64 + 4 * kk + m]) * static_cast<int32_t>(tb[kk * 64 + 4 * i + m]);
            }
            for (int n = 0; n < 16; ++n) {
                if (n >= nv) {  // padding tokens: zero rows from a zero start
                    for (int i = 0; i < 16; ++i) check(c[n][i] == 0, "amx rows layout: padding token %d row %d = %d", n, i, c[n][i]);
                    continue;
                }
                for (int i = 0; i < 16; ++i) got[(16 * tt + n) * rows + r + i] = c[n][i];
            }
        }
    }
    check_amx_layout_outputs(got, o.ref, rows, cols, n_tokens, allow3, "amx rows layout");
}

void test_amx_layout() {
    Rng rng(7);
    amx_layout_case(rng, 16, 256, 1, false);
    amx_layout_case(rng, 48, 768, 37, false);
    amx_layout_case(rng, 36, 2816, 16, true);  // 2 row tiles (+ 4 rows the kernel hands to AVX-512)
    amx_layout_case(rng, 32, 512, 70, true);
    // Prefill orientation: 1- and 16-token tiles, partial last token tiles (130 = 8 x 16 + 2, 200 = 12 x 16 + 8),
    // odd row-tile counts and a 4-row tail left to AVX-512, 6912 columns (108 steps: 27 T2P blocks).
    amx_rows_layout_case(rng, 16, 256, 1, false);
    amx_rows_layout_case(rng, 48, 768, 16, true);
    amx_rows_layout_case(rng, 36, 2816, 130, false);
    amx_rows_layout_case(rng, 48, 256, 200, true);
    amx_rows_layout_case(rng, 16, 6912, 130, true);
    amx_rows_layout_case(rng, 80, 2560, 150, false);
}

// ---------------------------------------------------------------------------------------------
// Activation quantization
// ---------------------------------------------------------------------------------------------

void quantize_case(const char *what, const std::vector<float> &x, int32_t n_tokens, int64_t cols, Rng &rng) {
    Buffer<float> in(x.size(), 4 * static_cast<size_t>(rng.range(0, 15)));
    std::memcpy(in.ptr, x.data(), x.size() * sizeof(float));
    std::vector<int8_t> q_ref(x.size());
    std::vector<float> s_ref(n_tokens);
    std::vector<int32_t> sum_ref(n_tokens);
    ryz_set_isa(RYZ_ISA_SCALAR);
    check(ryz_quantize_activations(in.ptr, n_tokens, cols, q_ref.data(), s_ref.data(), sum_ref.data()) == RYZ_OK,
          "quantize scalar %s: %s", what, ryz_last_error());
    for (int32_t isa : g_simd_isas) {
        ryz_set_isa(isa);
        Buffer<int8_t> q(x.size(), static_cast<size_t>(rng.range(1, 63)));
        std::vector<float> s(n_tokens);
        std::vector<int32_t> sum(n_tokens);
        const ryz_status st = ryz_quantize_activations(in.ptr, n_tokens, cols, q.ptr, s.data(), sum.data());
        size_t bad = x.size();
        for (size_t i = 0; i < x.size(); ++i)
            if (q[i] != q_ref[i]) { bad = i; break; }
        check(st == RYZ_OK && bad == x.size(), "quantize %s %s cols=%lld: q[%zu] = %d, scalar %d (x = %.9g)", isa_name(isa), what,
              (long long)cols, bad, bad < x.size() ? q[bad] : 0, bad < x.size() ? q_ref[bad] : 0, bad < x.size() ? x[bad] : 0.0);
        check(std::memcmp(s.data(), s_ref.data(), s.size() * sizeof(float)) == 0 && sum == sum_ref,
              "quantize %s %s cols=%lld: scale or sum differs (%.9g vs %.9g, %d vs %d)", isa_name(isa), what, (long long)cols, s[0], s_ref[0],
              sum[0], sum_ref[0]);
    }
}

void test_quantize() {
    Rng rng(2);
    // Random data over lengths that exercise every vector tail, several tokens per call.
    for (int64_t cols : {1, 2, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 255, 256, 257, 1000, 2560, 6912}) {
        const int32_t n = 3;
        std::vector<float> x(static_cast<size_t>(n * cols));
        for (int32_t t = 0; t < n; ++t) {
            const float mag = t == 0 ? 1.0f : t == 1 ? 3.0e4f : 1.0e-3f;
            for (int64_t k = 0; k < cols; ++k) x[t * cols + k] = mag * rng.symmetric();
        }
        quantize_case("random", x, n, cols, rng);
    }
    // Exact ties: max|x| = 127 makes the scale exactly 1, so k + 0.5 lands on a tie (half to even).
    for (int64_t cols : {256, 259}) {
        std::vector<float> x(static_cast<size_t>(cols));
        for (int64_t k = 0; k < cols; ++k) x[k] = static_cast<float>(k % 255 - 127) + (k % 3 ? 0.5f : 0.0f);
        x[0] = -127.0f;
        quantize_case("ties", x, 1, cols, rng);
        // max 254: scale 0.5, odd integers become ties
        for (int64_t k = 0; k < cols; ++k) x[k] = static_cast<float>(k % 509 - 254);
        quantize_case("ties-half-scale", x, 1, cols, rng);
    }
    {
        std::vector<float> zeros(512, 0.0f);
        quantize_case("zeros", zeros, 2, 256, rng);
        std::vector<float> neg(300, -0.0f);
        quantize_case("negative zeros", neg, 1, 300, rng);
    }
    {
        const float specials[] = {std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(), 1.0e30f, -2.5e37f,
                                  1.0e-30f, -1.0e-38f, std::numeric_limits<float>::denorm_min(), 3.0e-41f, -7.0e-44f, 0.0f};
        std::vector<float> x(512);
        for (size_t k = 0; k < x.size(); ++k) x[k] = specials[rng.range(0, 9)] * (rng.uniform() + 0.5f);
        quantize_case("huge", x, 2, 256, rng);
        for (size_t k = 0; k < x.size(); ++k) x[k] = (k % 2 ? 1.0e-30f : -3.0e-41f) * static_cast<float>(k % 7);  // all below 1e-5
        quantize_case("tiny", x, 2, 256, rng);
        for (size_t k = 0; k < x.size(); ++k) x[k] = 1.0e-5f * rng.symmetric();
        quantize_case("around-floor", x, 2, 256, rng);
    }
    {  // Non-finite input: the scalar code defines the result (NaN -> -128, inf makes the scale 0).
        std::vector<float> x(768);
        for (size_t k = 0; k < x.size(); ++k) x[k] = rng.symmetric();
        x[5] = std::numeric_limits<float>::quiet_NaN();
        x[300] = -std::numeric_limits<float>::quiet_NaN();
        x[600] = std::numeric_limits<float>::infinity();
        x[601] = -std::numeric_limits<float>::infinity();
        quantize_case("non-finite", x, 3, 256, rng);
    }
}

// ---------------------------------------------------------------------------------------------
// Dense GEMM
// ---------------------------------------------------------------------------------------------

size_t dense_row_bytes(int32_t type, int64_t cols) {
    switch (type) {
        case RYZ_TYPE_F32: return static_cast<size_t>(cols) * 4;
        case RYZ_TYPE_F16: return static_cast<size_t>(cols) * 2;
        case RYZ_TYPE_Q8_0: return static_cast<size_t>(cols / 32) * 34;
        case RYZ_TYPE_Q6_K: return static_cast<size_t>(cols / 256) * 210;
        default: return 0;
    }
}

// Random rows of `type`, and the same rows dequantised in double (ggml's layouts, independent of the library).
void random_dense(Rng &rng, int32_t type, int64_t rows, int64_t cols, std::vector<uint8_t> &w, std::vector<double> &deq) {
    const size_t rb = dense_row_bytes(type, cols);
    w.assign(rb * static_cast<size_t>(rows), 0);
    deq.assign(static_cast<size_t>(rows * cols), 0.0);
    for (int64_t r = 0; r < rows; ++r) {
        uint8_t *row = &w[rb * static_cast<size_t>(r)];
        double *y = &deq[static_cast<size_t>(r * cols)];
        if (type == RYZ_TYPE_F32) {
            for (int64_t k = 0; k < cols; ++k) {
                const float v = rng.symmetric();
                std::memcpy(row + 4 * k, &v, 4);
                y[k] = v;
            }
        } else if (type == RYZ_TYPE_F16) {
            for (int64_t k = 0; k < cols; ++k) {
                const uint16_t h = float_to_half(rng.symmetric());
                std::memcpy(row + 2 * k, &h, 2);
                y[k] = half_to_float(h);
            }
        } else if (type == RYZ_TYPE_Q8_0) {
            for (int64_t b = 0; b < cols / 32; ++b) {
                uint8_t *blk = row + 34 * b;
                const uint16_t d = float_to_half(0.001f + 0.05f * rng.uniform());
                std::memcpy(blk, &d, 2);
                for (int j = 0; j < 32; ++j) {
                    const int8_t q = static_cast<int8_t>(rng.range(-128, 127));
                    blk[2 + j] = static_cast<uint8_t>(q);
                    y[b * 32 + j] = half_to_float(d) * q;
                }
            }
        } else {  // Q6_K: ql[128] qh[64] scales[16] d
            for (int64_t b = 0; b < cols / 256; ++b) {
                uint8_t *blk = row + 210 * b;
                for (int j = 0; j < 192; ++j) blk[j] = static_cast<uint8_t>(rng.next());
                for (int j = 0; j < 16; ++j) blk[192 + j] = static_cast<uint8_t>(static_cast<int8_t>(rng.range(-128, 127)));
                const uint16_t d = float_to_half(0.0005f + 0.002f * rng.uniform());
                std::memcpy(blk + 208, &d, 2);
                const uint8_t *ql = blk, *qh = blk + 128;
                const int8_t *sc = reinterpret_cast<const int8_t *>(blk + 192);
                double *o = y + b * 256;
                for (int half = 0; half < 2; ++half) {
                    for (int l = 0; l < 32; ++l) {
                        const int is = l / 16;
                        const int q1 = ((ql[l] & 0xF) | ((qh[l] >> 0 & 3) << 4)) - 32;
                        const int q2 = ((ql[l + 32] & 0xF) | ((qh[l] >> 2 & 3) << 4)) - 32;
                        const int q3 = ((ql[l] >> 4) | ((qh[l] >> 4 & 3) << 4)) - 32;
                        const int q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6 & 3) << 4)) - 32;
                        // the float rounding of ggml's (d * scale) * q, so the values are exactly the kernels'
                        const float dd = half_to_float(d);
                        o[l] = (dd * static_cast<float>(sc[is])) * static_cast<float>(q1);
                        o[l + 32] = (dd * static_cast<float>(sc[is + 2])) * static_cast<float>(q2);
                        o[l + 64] = (dd * static_cast<float>(sc[is + 4])) * static_cast<float>(q3);
                        o[l + 96] = (dd * static_cast<float>(sc[is + 6])) * static_cast<float>(q4);
                    }
                    o += 128; ql += 64; qh += 32; sc += 8;
                }
            }
        }
    }
}

// Tolerance. Both kernels sum n = cols products in float, in different orders (scalar: sequential,
// unfused; SIMD: 16/8/4 lane partial sums with FMA, then a tree). Each result is within
// gamma_n * sum_k |w_k x_k| of the exact dot product (gamma_n = n u / (1 - n u), u = 2^-24; Higham,
// Accuracy and Stability, 3.1; the weights are dequantised by the same float operations in both), so
// two kernels differ by at most 2 gamma_n sum |w x|. A bound relative to sum |w x|, not to the result,
// is what holds under cancellation. A small absolute term covers results that underflow.
double dense_tolerance(const double *w, const float *x, int64_t cols) {
    double abs_sum = 0.0;
    for (int64_t k = 0; k < cols; ++k) abs_sum += std::fabs(w[k] * x[k]);
    const double u = std::ldexp(1.0, -24), n = static_cast<double>(cols) + 1.0;
    return 2.0 * (n * u / (1.0 - n * u)) * abs_sum + 1e-30;
}

void dense_case(Rng &rng, int32_t type, int64_t rows, int64_t cols, int32_t n_tokens) {
    static const char *names[] = {"F32", "F16"};
    const char *tn = type == RYZ_TYPE_Q8_0 ? "Q8_0" : type == RYZ_TYPE_Q6_K ? "Q6_K" : names[type];
    std::vector<uint8_t> wbytes;
    std::vector<double> deq;
    random_dense(rng, type, rows, cols, wbytes, deq);
    // GGUF data is 32-byte aligned, and Q8_0 / Q6_K blocks are 34 / 210 bytes: their blocks are 2-byte
    // aligned (the fp16 scale), not more. F32 / F16 rows: 4-byte aligned here.
    const bool block_rows = type == RYZ_TYPE_Q8_0 || type == RYZ_TYPE_Q6_K;
    Buffer<uint8_t> w(wbytes.size(), (block_rows ? 2 : 4) * static_cast<size_t>(rng.range(1, 15)));
    std::memcpy(w.ptr, wbytes.data(), wbytes.size());
    Buffer<float> x(static_cast<size_t>(n_tokens * cols), 4 * static_cast<size_t>(rng.range(0, 15)));
    for (size_t i = 0; i < x.n; ++i) x[i] = rng.symmetric() * (i % 7 == 0 ? 10.0f : 1.0f);
    const size_t n_out = static_cast<size_t>(rows * n_tokens);

    std::vector<float> ref(n_out);
    ryz_set_isa(RYZ_ISA_SCALAR);
    check(ryz_dense_gemm(w.ptr, type, rows, cols, x.ptr, n_tokens, ref.data()) == RYZ_OK, "dense scalar %s: %s", tn, ryz_last_error());
    std::vector<double> tol(n_out);
    for (int32_t t = 0; t < n_tokens; ++t)
        for (int64_t r = 0; r < rows; ++r) {
            const size_t o = static_cast<size_t>(t * rows + r);
            tol[o] = dense_tolerance(&deq[static_cast<size_t>(r * cols)], x.ptr + t * cols, cols);
            double exact = 0.0;
            for (int64_t k = 0; k < cols; ++k) exact += deq[static_cast<size_t>(r * cols + k)] * x[static_cast<size_t>(t * cols + k)];
            // the scalar kernel against the double-precision definition (half the two-kernel bound)
            check(std::fabs(ref[o] - exact) <= tol[o] / 2,
                  "dense scalar %s %lldx%lld: row %lld token %d = %.9g, exact %.9g", tn, (long long)rows, (long long)cols, (long long)r, t,
                  ref[o], exact);
        }

    std::vector<float> first_family;  // the SIMD families share lane assignment and reduction tree
    for (int32_t isa : g_simd_isas) {
        ryz_set_isa(isa);
        Buffer<float> out(n_out, 4 * static_cast<size_t>(rng.range(1, 15)));
        ryz_status st = ryz_dense_gemm(w.ptr, type, rows, cols, x.ptr, n_tokens, out.ptr);
        if (isa != RYZ_ISA_SCALAR) {
            if (first_family.empty()) first_family.assign(out.ptr, out.ptr + n_out);
            else check(std::memcmp(first_family.data(), out.ptr, n_out * 4) == 0, "dense %s %s %lldx%lld: differs from %s bit for bit",
                       isa_name(isa), tn, (long long)rows, (long long)cols, isa_name(g_simd_isas[0]));
        }
        size_t bad = n_out;
        double worst = 0.0;
        for (size_t i = 0; i < n_out; ++i) {
            const double err = std::fabs(static_cast<double>(out[i]) - ref[i]);
            if (!(err <= tol[i])) { bad = i; break; }
            worst = std::max(worst, err / tol[i]);
        }
        check(st == RYZ_OK && bad == n_out, "dense %s %s %lldx%lld n=%d: out[%zu] = %.9g, scalar %.9g, tolerance %.3g", isa_name(isa), tn,
              (long long)rows, (long long)cols, n_tokens, bad, bad < n_out ? out[bad] : 0.0f, bad < n_out ? ref[bad] : 0.0f,
              bad < n_out ? tol[bad] : 0.0);

        // Determinism: run twice; every row sub-range (as a shifted matrix); each token on its own.
        Buffer<float> again(n_out, 4 * static_cast<size_t>(rng.range(1, 15)));
        st = ryz_dense_gemm(w.ptr, type, rows, cols, x.ptr, n_tokens, again.ptr);
        check(st == RYZ_OK && std::memcmp(out.ptr, again.ptr, n_out * 4) == 0, "dense %s %s: two runs differ", isa_name(isa), tn);
        const size_t rb = dense_row_bytes(type, cols);
        for (int trial = 0; trial < 3; ++trial) {
            const int64_t b = rng.range(0, static_cast<int>(rows - 1)), e = rng.range(static_cast<int>(b + 1), static_cast<int>(rows));
            std::vector<float> part(static_cast<size_t>((e - b) * n_tokens));
            st = ryz_dense_gemm(w.ptr + rb * static_cast<size_t>(b), type, e - b, cols, x.ptr, n_tokens, part.data());
            bool same = st == RYZ_OK;
            for (int32_t t = 0; t < n_tokens; ++t)
                for (int64_t r = b; r < e; ++r) same = same && std::memcmp(&part[static_cast<size_t>(t * (e - b) + r - b)], &out[static_cast<size_t>(t * rows + r)], 4) == 0;
            check(same, "dense %s %s: rows [%lld, %lld) computed alone differ from the full call", isa_name(isa), tn, (long long)b, (long long)e);
        }
        bool same = true;
        for (int32_t t = 0; t < n_tokens && n_tokens > 1; ++t) {
            std::vector<float> one(static_cast<size_t>(rows));
            ryz_dense_gemm(w.ptr, type, rows, cols, x.ptr + t * cols, 1, one.data());
            same = same && std::memcmp(one.data(), &out[static_cast<size_t>(t * rows)], static_cast<size_t>(rows) * 4) == 0;
        }
        check(same, "dense %s %s: a token's result depends on the batch it is in", isa_name(isa), tn);
    }
}

// Q6_K inputs that take the AVX-512 kernel's other paths (avx512.cpp, dense_q6_k_vbmi): blocks with an
// inf or NaN d, zero scales and zero weights (q = 32) under negative scales, and activations with
// zeros of both signs, or with denormals (the whole call then takes the plain kernel). The SIMD
// families must still agree bit for bit, NaNs and signed zeros included.
void dense_q6_k_edges() {
    Rng rng(11);
    const int64_t rows = 9, cols = 512;
    std::vector<uint8_t> w;
    std::vector<double> deq;
    random_dense(rng, RYZ_TYPE_Q6_K, rows, cols, w, deq);
    const size_t rb = dense_row_bytes(RYZ_TYPE_Q6_K, cols);
    const uint16_t d_special[] = {0x7C00, 0xFC00, 0x7E00, 0x0000, 0x8000};
    for (int i = 0; i < 5; ++i) std::memcpy(&w[rb * static_cast<size_t>(i + 1) + 210 * static_cast<size_t>(i % 2) + 208], &d_special[i], 2);
    for (int64_t r = 0; r < rows; ++r) {
        uint8_t *blk = &w[rb * static_cast<size_t>(r)];
        blk[192 + r % 16] = 0;                                        // a zero scale
        blk[192 + (r + 5) % 16] = static_cast<uint8_t>(-3);           // a negative one with q = 32 below
        for (int j = 0; j < 128; ++j) blk[j] &= 0xF0;                 // low nibbles 0 and
        for (int j = 0; j < 64; ++j) blk[128 + j] = static_cast<uint8_t>(blk[128 + j] & 0xFC) | 2;  // qh bits 0-1 = 2: q = 32
    }
    for (int tiny = 0; tiny < 2; ++tiny)
        for (int32_t n_tokens : {1, 2, 5}) {
            std::vector<float> x(static_cast<size_t>(n_tokens * cols));
            for (size_t i = 0; i < x.size(); ++i) {
                x[i] = rng.symmetric();
                if (i % 5 == 0) x[i] = (i % 10 == 0) ? 0.0f : -0.0f;
                if (tiny && i % 7 == 0) x[i] = (i % 14 == 0 ? 1.0f : -1.0f) * 1e-40f;
            }
            std::vector<float> first;
            for (int32_t isa : g_simd_isas) {
                if (isa == RYZ_ISA_SCALAR) continue;
                ryz_set_isa(isa);
                std::vector<float> out(static_cast<size_t>(rows * n_tokens));
                check(ryz_dense_gemm(w.data(), RYZ_TYPE_Q6_K, rows, cols, x.data(), n_tokens, out.data()) == RYZ_OK, "dense Q6_K edges: %s", ryz_last_error());
                if (first.empty()) first = out;
                else check(std::memcmp(first.data(), out.data(), out.size() * 4) == 0, "dense %s Q6_K edges (tiny x %d, n=%d): differs from %s bit for bit",
                           isa_name(isa), tiny, n_tokens, isa_name(g_simd_isas[0]));
            }
        }
}

void test_dense() {
    Rng rng(3);
    for (int32_t type : {RYZ_TYPE_F32, RYZ_TYPE_F16, RYZ_TYPE_Q8_0, RYZ_TYPE_Q6_K}) {
        const bool any_cols = type == RYZ_TYPE_F32 || type == RYZ_TYPE_F16;
        int i = 0;
        for (int64_t rows : {1, 3, 4, 5, 9, 37})
            for (int32_t n : {1, 2, 3, 7, 8, 13, 16}) {
                const int64_t cols = (i++ % 2) ? 2560 : 512;
                dense_case(rng, type, rows, cols, n);
            }
        if (any_cols)
            for (int64_t cols : {1, 15, 17, 100, 250, 1000}) dense_case(rng, type, 6, cols, 2);
        dense_case(rng, type, 67, 256 * 3, 1);
    }    dense_q6_k_edges();
}

// ---------------------------------------------------------------------------------------------
// Ternary pack from TQ2_0 / TQ1_0
// ---------------------------------------------------------------------------------------------

// TQ2_0 (ggml): qs[c*32 + m] bits 2l hold code+1 of column c*128 + l*32 + m; then fp16 d.
std::vector<uint8_t> make_tq2(const std::vector<uint8_t> &codes, int64_t rows, int64_t cols, const std::vector<uint16_t> &d) {
    const int64_t blocks = cols / QK;
    std::vector<uint8_t> out(static_cast<size_t>(rows * blocks * 66), 0);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t b = 0; b < blocks; ++b) {
            uint8_t *blk = &out[static_cast<size_t>((r * blocks + b) * 66)];
            const uint8_t *c = &codes[static_cast<size_t>(r * cols + b * QK)];
            for (int k = 0; k < QK; ++k) blk[(k / 128) * 32 + k % 32] |= static_cast<uint8_t>(c[k] << (2 * ((k % 128) / 32)));
            std::memcpy(blk + 64, &d[static_cast<size_t>(r * blocks + b)], 2);
        }
    return out;
}

// TQ1_0 (gguf-py quants.py): columns 0..159 as 32 bytes of five base-3 digits (digit n of byte m is
// column 32n + m, weight 3^(4-n)), 160..239 as 16 bytes (column 160 + 16n + m), 240..255 as 4 bytes
// of four digits (column 240 + 4n + m, weights 81, 27, 9, 3); each byte v stored as ceil(v * 256 / 243).
std::vector<uint8_t> make_tq1(const std::vector<uint8_t> &codes, int64_t rows, int64_t cols, const std::vector<uint16_t> &d) {
    const int64_t blocks = cols / QK;
    std::vector<uint8_t> out(static_cast<size_t>(rows * blocks * 54), 0);
    static const int pow3[5] = {81, 27, 9, 3, 1};
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t b = 0; b < blocks; ++b) {
            uint8_t *blk = &out[static_cast<size_t>((r * blocks + b) * 54)];
            const uint8_t *c = &codes[static_cast<size_t>(r * cols + b * QK)];
            int v[52] = {0};
            for (int m = 0; m < 32; ++m)
                for (int n = 0; n < 5; ++n) v[m] += c[32 * n + m] * pow3[n];
            for (int m = 0; m < 16; ++m)
                for (int n = 0; n < 5; ++n) v[32 + m] += c[160 + 16 * n + m] * pow3[n];
            for (int m = 0; m < 4; ++m)
                for (int n = 0; n < 4; ++n) v[48 + m] += c[240 + 4 * n + m] * pow3[n];
            for (int i = 0; i < 52; ++i) blk[i] = static_cast<uint8_t>((v[i] * 256 + 242) / 243);
            std::memcpy(blk + 52, &d[static_cast<size_t>(r * blocks + b)], 2);
        }
    return out;
}

void test_pack() {
    Rng rng(4);
    for (int32_t type : {RYZ_TYPE_TQ2_0, RYZ_TYPE_TQ1_0}) {
        const char *tn = type == RYZ_TYPE_TQ2_0 ? "TQ2_0" : "TQ1_0";
        for (auto shape : {std::pair<int64_t, int64_t>{4, 256}, {12, 768}, {20, 2560}, {8, 6912}}) {
            const int64_t rows = shape.first, cols = shape.second, blocks = cols / QK;
            std::vector<uint8_t> codes = random_codes(rng, rows, cols, false);
            std::vector<uint16_t> d(static_cast<size_t>(rows * blocks), 0x3C00);  // block scale 1.0
            const bool zero_block = rows >= 12;  // a zero block scale means an all-zero block (stored code+1 = 1)
            if (zero_block) d[5] = 0x0000;
            const std::vector<uint8_t> src = type == RYZ_TYPE_TQ2_0 ? make_tq2(codes, rows, cols, d) : make_tq1(codes, rows, cols, d);
            if (zero_block) std::memset(&codes[static_cast<size_t>((5 / blocks) * cols + (5 % blocks) * QK)], 1, QK);
            const std::vector<uint8_t> want = make_t2p(codes, rows, cols);
            check(ryz_ternary_packed_bytes(rows, cols) == want.size(), "pack %s %lldx%lld: packed size %zu, want %zu", tn, (long long)rows,
                  (long long)cols, ryz_ternary_packed_bytes(rows, cols), want.size());
            std::vector<uint8_t> got(want.size() + 64, 0xA5);
            const ryz_status st = ryz_ternary_pack(src.data(), type, rows, cols, got.data());
            size_t bad = want.size();
            for (size_t i = 0; i < want.size(); ++i)
                if (got[i] != want[i]) { bad = i; break; }
            bool tail_ok = true;
            for (size_t i = want.size(); i < got.size(); ++i) tail_ok = tail_ok && got[i] == 0xA5;
            check(st == RYZ_OK && bad == want.size() && tail_ok, "pack %s %lldx%lld: status %d, byte %zu = 0x%02x, want 0x%02x%s", tn,
                  (long long)rows, (long long)cols, st, bad, bad < want.size() ? got[bad] : 0, bad < want.size() ? want[bad] : 0,
                  tail_ok ? "" : " (wrote past the end)");
            // End to end: GEMM on the repacked weights equals the naive product with the codes.
            std::vector<int8_t> act(static_cast<size_t>(3 * cols));
            random_acts(rng, act.data(), 3, cols);
            const std::vector<int32_t> ref = naive_ternary(codes, rows, cols, act.data(), 3);
            for (int32_t isa : g_simd_isas) {
                ryz_set_isa(isa);
                for (int32_t n : {1, 3}) {
                    std::vector<int32_t> out(static_cast<size_t>(rows * n));
                    ryz_ternary_gemm(got.data(), rows, cols, act.data(), n, out.data());
                    bool same = true;
                    for (int32_t t = 0; t < n; ++t)
                        for (int64_t r = 0; r < rows; ++r) same = same && out[static_cast<size_t>(t * rows + r)] == ref[static_cast<size_t>(t * rows + r)];
                    check(same, "pack %s %lldx%lld then ternary GEMM %s n=%d differs from the naive product", tn, (long long)rows, (long long)cols,
                          isa_name(isa), n);
                }
            }
        }
    }
    // Shapes the packer must refuse.
    std::vector<uint8_t> src(66 * 8), dst(64 * 8);
    check(ryz_ternary_pack(src.data(), RYZ_TYPE_TQ2_0, 2, 256, dst.data()) != RYZ_OK, "pack accepted rows not a multiple of 4");
    check(ryz_ternary_pack(src.data(), RYZ_TYPE_TQ2_0, 4, 100, dst.data()) != RYZ_OK, "pack accepted cols not a multiple of 256");
    check(ryz_ternary_pack(src.data(), RYZ_TYPE_Q8_0, 4, 256, dst.data()) != RYZ_OK, "pack accepted a non-ternary type");
}

void attention_case(Rng &rng, int32_t kv_type, int32_t d, int64_t stride, int32_t n_pos) {
    const size_t es = kv_type == RYZ_KV_F16 ? 2 : 4, n_elems = static_cast<size_t>(std::max<int64_t>(n_pos * stride, 1));
    Buffer<uint8_t> kv(n_elems * es, es * static_cast<size_t>(rng.range(0, 15)));  // element-aligned, as cache rows are
    const float scale = rng.range(0, 1) ? 1.0f : 40.0f;  // also large products, where rounding differs most
    for (size_t i = 0; i < n_elems; ++i) {
        const float v = scale * rng.symmetric();
        if (kv_type == RYZ_KV_F16) {
            const uint16_t h = float_to_half(v);
            std::memcpy(kv.ptr + 2 * i, &h, 2);
        } else {
            std::memcpy(kv.ptr + 4 * i, &v, 4);
        }
    }
    Buffer<float> q(static_cast<size_t>(d), 4 * static_cast<size_t>(rng.range(0, 15)));
    for (int32_t i = 0; i < d; ++i) q[i] = rng.symmetric();
    Buffer<float> probs(static_cast<size_t>(std::max(n_pos, 1)), 4 * static_cast<size_t>(rng.range(0, 15)));
    for (int32_t p = 0; p < n_pos; ++p) probs[p] = rng.uniform();
    const char *type = kv_type == RYZ_KV_F16 ? "f16" : "f32";

    std::vector<float> ref_scores(static_cast<size_t>(n_pos) + 1, -7.0f), ref_out(static_cast<size_t>(d), -7.0f);
    ryz_set_isa(RYZ_ISA_SCALAR);
    check(ryz_kv_dot(q.ptr, kv.ptr, kv_type, stride, n_pos, d, ref_scores.data()) == RYZ_OK, "kv_dot scalar %s d=%d: %s", type, d, ryz_last_error());
    check(ryz_kv_axpy(probs.ptr, kv.ptr, kv_type, stride, n_pos, d, ref_out.data()) == RYZ_OK, "kv_axpy scalar %s d=%d: %s", type, d, ryz_last_error());
    for (int32_t isa : g_simd_isas) {
        ryz_set_isa(isa);
        std::vector<float> scores(ref_scores.size(), -7.0f), out(ref_out.size(), -7.0f);
        const ryz_status a = ryz_kv_dot(q.ptr, kv.ptr, kv_type, stride, n_pos, d, scores.data());
        const ryz_status b = ryz_kv_axpy(probs.ptr, kv.ptr, kv_type, stride, n_pos, d, out.data());
        size_t i = 0;
        while (i < scores.size() && std::memcmp(&scores[i], &ref_scores[i], 4) == 0) ++i;
        check(a == RYZ_OK && i == scores.size(), "kv_dot %s %s d=%d stride=%lld n_pos=%d: scores[%zu] = %.9g, scalar %.9g", isa_name(isa),
              type, d, (long long)stride, n_pos, i, i < scores.size() ? scores[i] : 0.0, i < scores.size() ? ref_scores[i] : 0.0);
        i = 0;
        while (i < out.size() && std::memcmp(&out[i], &ref_out[i], 4) == 0) ++i;
        check(b == RYZ_OK && i == out.size(), "kv_axpy %s %s d=%d stride=%lld n_pos=%d: out[%zu] = %.9g, scalar %.9g", isa_name(isa),
              type, d, (long long)stride, n_pos, i, i < out.size() ? out[i] : 0.0, i < out.size() ? ref_out[i] : 0.0);
    }
}

// The multi-query kernels (the forward's GQA path): nq queries over the same rows, each with its own n_pos for
// kv_axpy_multi, bit for bit the scalar single-query kernels per query, in every family (scalar's own fallback
// included). Rows past a query's n_pos may hold inf/NaN: a query must never read them.
void attention_multi_case(Rng &rng, int32_t kv_type, int32_t d, int64_t stride, int32_t n_max, int32_t nq) {
    const size_t es = kv_type == RYZ_KV_F16 ? 2 : 4, n_elems = static_cast<size_t>(std::max<int64_t>(n_max * stride, 1));
    Buffer<uint8_t> kv(n_elems * es, es * static_cast<size_t>(rng.range(0, 15)));
    const float scale = rng.range(0, 1) ? 1.0f : 40.0f;
    const bool poison = rng.range(0, 2) == 0;
    for (size_t i = 0; i < n_elems; ++i) {
        float v = scale * rng.symmetric();
        if (poison && rng.range(0, 200) == 0) v = rng.range(0, 1) ? INFINITY : NAN;
        if (kv_type == RYZ_KV_F16) {
            const uint16_t h = float_to_half(v);
            std::memcpy(kv.ptr + 2 * i, &h, 2);
        } else {
            std::memcpy(kv.ptr + 4 * i, &v, 4);
        }
    }
    std::vector<Buffer<float>> q, probs;
    q.reserve(static_cast<size_t>(nq));
    probs.reserve(static_cast<size_t>(nq));
    std::vector<int32_t> n_pos(static_cast<size_t>(nq));
    for (int32_t j = 0; j < nq; ++j) {
        q.emplace_back(static_cast<size_t>(d), 4 * static_cast<size_t>(rng.range(0, 15)));
        for (int32_t i = 0; i < d; ++i) q.back()[i] = rng.symmetric();
        n_pos[j] = rng.range(0, 2) ? n_max : static_cast<int32_t>(rng.range(0, n_max));  // a causal block: ragged ends
        probs.emplace_back(static_cast<size_t>(std::max(n_max, 1)), 4 * static_cast<size_t>(rng.range(0, 15)));
        for (int32_t p = 0; p < n_max; ++p) probs.back()[p] = rng.uniform();
    }
    const char *type = kv_type == RYZ_KV_F16 ? "f16" : "f32";
    const size_t n_scores = static_cast<size_t>(n_max) + 1;
    std::vector<float> ref_scores(n_scores * nq, -7.0f), ref_out(static_cast<size_t>(d) * nq, -7.0f);
    ryz_set_isa(RYZ_ISA_SCALAR);
    for (int32_t j = 0; j < nq; ++j) {
        check(ryz_kv_dot(q[j].ptr, kv.ptr, kv_type, stride, n_max, d, &ref_scores[n_scores * j]) == RYZ_OK, "kv_dot scalar: %s", ryz_last_error());
        check(ryz_kv_axpy(probs[j].ptr, kv.ptr, kv_type, stride, n_pos[j], d, &ref_out[size_t(d) * j]) == RYZ_OK, "kv_axpy scalar: %s",
              ryz_last_error());
    }
    std::vector<int32_t> isas{RYZ_ISA_SCALAR};
    isas.insert(isas.end(), g_simd_isas.begin(), g_simd_isas.end());
    for (int32_t isa : isas) {
        ryz_set_isa(isa);
        std::vector<float> scores(ref_scores.size(), -7.0f), out(ref_out.size(), -7.0f);
        std::vector<const float *> qp, pp;
        std::vector<float *> sp, op;
        for (int32_t j = 0; j < nq; ++j) {
            qp.push_back(q[j].ptr);
            pp.push_back(probs[j].ptr);
            sp.push_back(&scores[n_scores * j]);
            op.push_back(&out[size_t(d) * j]);
        }
        const ryz_status a = ryz_kv_dot_multi(qp.data(), nq, kv.ptr, kv_type, stride, n_max, d, sp.data());
        const ryz_status b = ryz_kv_axpy_multi(pp.data(), nq, n_pos.data(), kv.ptr, kv_type, stride, d, op.data());
        // the same bits, or both NaN: a NaN's sign and payload are the compiler's choice (a sanitized build's scalar
        // kernel and the single-query SIMD ones already differ there), whether it is NaN is not
        const auto same = [](float x, float y) { return std::memcmp(&x, &y, 4) == 0 || (std::isnan(x) && std::isnan(y)); };
        size_t i = 0;
        while (i < scores.size() && same(scores[i], ref_scores[i])) ++i;
        check(a == RYZ_OK && i == scores.size(), "kv_dot_multi %s %s d=%d stride=%lld n_pos=%d nq=%d: query %zu scores[%zu] = %.9g, scalar %.9g",
              isa_name(isa), type, d, (long long)stride, n_max, nq, i / n_scores, i % n_scores, i < scores.size() ? scores[i] : 0.0,
              i < scores.size() ? ref_scores[i] : 0.0);
        i = 0;
        while (i < out.size() && same(out[i], ref_out[i])) ++i;
        check(b == RYZ_OK && i == out.size(), "kv_axpy_multi %s %s d=%d stride=%lld nq=%d: query %zu (n_pos %d) out[%zu] = %.9g, scalar %.9g",
              isa_name(isa), type, d, (long long)stride, nq, i / d, i < out.size() ? n_pos[i / d] : 0, i % d, i < out.size() ? out[i] : 0.0,
              i < out.size() ? ref_out[i] : 0.0);
    }
}

void test_attention() {
    Rng rng(5);
    // 64 and 128: every family's fast path; 8/16/24: short; 100, 136, 256: off the AVX-512 dot path (d % 8,
    // d > 128) and, for 100, the value path (d % 16), so the fallbacks are held to scalar too.
    for (int32_t kv_type : {RYZ_KV_F32, RYZ_KV_F16})
        for (int32_t d : {8, 16, 24, 64, 100, 128, 136, 256})
            for (int32_t n_pos : {0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 33, 70, 130})
                for (int64_t heads : {1, 5}) attention_case(rng, kv_type, d, heads * d + (heads > 1 ? rng.range(0, 1) * 8 : 0), n_pos);
    // 1..17 queries: every block size of the AVX-512 kernels (4 at a time, then 3/2/1) and the forward's 16
    for (int32_t kv_type : {RYZ_KV_F32, RYZ_KV_F16})
        for (int32_t d : {8, 16, 48, 64, 100, 128, 136})
            for (int32_t n_max : {0, 1, 2, 7, 8, 9, 17, 70, 130})
                for (int32_t nq : {1, 2, 3, 4, 5, 8, 16, 17}) attention_multi_case(rng, kv_type, d, 5 * d + rng.range(0, 1) * 8, n_max, nq);
    float q[8] = {}, out[8];
    const float *qs[1] = {q};
    float *outs[1] = {out};
    const int32_t one[1] = {1};
    check(ryz_kv_dot_multi(qs, 1, q, RYZ_KV_F32, 4, 1, 8, outs) != RYZ_OK, "kv_dot_multi accepted a stride below d");
    check(ryz_kv_axpy_multi(qs, 1, nullptr, q, RYZ_KV_F32, 8, 8, outs) != RYZ_OK, "kv_axpy_multi accepted null n_pos");
    check(ryz_kv_axpy_multi(qs, 1, one, q, 7, 8, 8, outs) != RYZ_OK, "kv_axpy_multi accepted an unknown kv_type");
    check(ryz_kv_dot(q, q, 7, 8, 1, 8, out) != RYZ_OK, "kv_dot accepted an unknown kv_type");
    check(ryz_kv_dot(q, q, RYZ_KV_F32, 4, 1, 8, out) != RYZ_OK, "kv_dot accepted a stride below d");
    check(ryz_kv_axpy(nullptr, q, RYZ_KV_F32, 8, 1, 8, out) != RYZ_OK, "kv_axpy accepted a null argument");
}

// ---------------------------------------------------------------------------------------------
// Softmax: its exp bit for bit (float)std::exp((double)x) over every float (--exhaustive-exp) or a
// strided subset plus the boundary regions; the whole softmax bit for bit vs scalar
// ---------------------------------------------------------------------------------------------

float float_of(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

uint32_t bits_of(float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return b;
}

// Every SIMD family's ryz_softmax_exp (max_score 0, so x - max = x exactly) against the spec, over the float bit
// patterns first, first + stride, ... < last; returns the floats compared, adds mismatches (reporting the first few).
uint64_t exp_sweep(uint64_t first, uint64_t last, uint64_t stride, uint64_t *mismatches) {
    constexpr size_t CHUNK = 1 << 16;
    std::vector<float> x(CHUNK), ref(CHUNK), out(CHUNK);
    uint64_t compared = 0;
    for (uint64_t b = first; b < last;) {
        size_t n = 0;
        for (; n < CHUNK && b < last; ++n, b += stride) x[n] = float_of(static_cast<uint32_t>(b));
        for (size_t i = 0; i < n; ++i) ref[i] = static_cast<float>(std::exp(static_cast<double>(x[i])));  // scalar.cpp's line
        for (int32_t isa : g_simd_isas) {
            ryz_set_isa(isa);
            std::memcpy(out.data(), x.data(), n * 4);
            if (ryz_softmax_exp(out.data(), static_cast<int32_t>(n), 0.0f) != RYZ_OK) {
                check(false, "softmax_exp %s: %s", isa_name(isa), ryz_last_error());
                return compared;
            }
            for (size_t i = 0; i < n; ++i)
                if (bits_of(out[i]) != bits_of(ref[i]) && ++*mismatches <= 20)
                    std::printf("MISMATCH softmax_exp %s: x = %a (0x%08x): %a (0x%08x), std::exp %a (0x%08x)\n", isa_name(isa), x[i], bits_of(x[i]),
                                out[i], bits_of(out[i]), ref[i], bits_of(ref[i]));
        }
        compared += n;
    }
    return compared;
}

// Every float (2^32 bit patterns: the softmax's x = s - max <= 0 is the negative half, the rest for good measure).
void exhaustive_exp() {
    const auto t0 = std::chrono::steady_clock::now();
    uint64_t mismatches = 0;
    const uint64_t compared = exp_sweep(0, uint64_t(1) << 32, 1, &mismatches);
    std::printf("exhaustive softmax_exp: %llu floats x %zu families compared in %.1f s, %llu mismatches\n", (unsigned long long)compared,
                g_simd_isas.size(), std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), (unsigned long long)mismatches);
    check(mismatches == 0 && compared == uint64_t(1) << 32, "exhaustive softmax_exp: %llu mismatches", (unsigned long long)mismatches);
}

void test_softmax() {
    // The scalar kernel is the spec's line.
    ryz_set_isa(RYZ_ISA_SCALAR);
    float probe[4] = {-1.0f, 0.0f, -88.0f, -104.0f};
    check(ryz_softmax_exp(probe, 4, 0.0f) == RYZ_OK && bits_of(probe[0]) == bits_of(static_cast<float>(std::exp(-1.0))) && probe[1] == 1.0f &&
              bits_of(probe[2]) == bits_of(static_cast<float>(std::exp(-88.0))) && probe[3] == static_cast<float>(std::exp(-104.0)),
          "softmax_exp scalar is not (float)std::exp((double)x)");
    // Every 97th float over all 2^32, then whole regions where rounding is delicate: the results near 1 (x around
    // -2^-25, where exp crosses the midpoint below 1.0f), the subnormal and vanishing results (x in [-104.5, -87]),
    // near overflow (x in [88, 89]), and the specials (+-0, +-inf, NaNs with payloads).
    uint64_t mismatches = 0, compared = exp_sweep(0, uint64_t(1) << 32, 97, &mismatches);
    const struct { float a, b; } regions[] = {{-0x1p-24f, -0x1p-26f}, {0x1p-26f, 0x1p-24f}, {-104.5f, -87.0f}, {88.0f, 89.0f}, {-1e-3f, -0.99e-3f}};
    for (const auto &r : regions) {
        const uint32_t ba = bits_of(r.a), bb = bits_of(r.b);
        compared += exp_sweep(std::min(ba, bb), uint64_t(std::max(ba, bb)) + 1, 1, &mismatches);
    }
    for (uint32_t b : {0x00000000u, 0x80000000u, 0x7F800000u, 0xFF800000u, 0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFFBFFFFFu, 0x7FC12345u})
        compared += exp_sweep(b, uint64_t(b) + 1, 1, &mismatches);
    std::printf("softmax_exp: %llu floats compared per family, %llu mismatches (all 2^32: --exhaustive-exp)\n", (unsigned long long)compared,
                (unsigned long long)mismatches);
    check(mismatches == 0, "softmax_exp: %llu mismatches", (unsigned long long)mismatches);

    // A non-zero max, ragged lengths and odd addresses: x = s - max as the kernel computes it.
    Rng rng(11);
    for (int32_t n : {0, 1, 5, 8, 15, 16, 17, 31, 33, 100, 127, 128, 129, 130, 255, 256, 257, 511, 512, 513, 1000, 2049, 4100}) {
        for (int trial = 0; trial < 4; ++trial) {
            std::vector<float> s(static_cast<size_t>(n) + 2);
            const float spread = trial == 0 ? 1.0f : trial == 1 ? 30.0f : trial == 2 ? 300.0f : 1e-6f;
            for (int32_t p = 0; p < n; ++p) s[p + 1] = spread * rng.symmetric();
            if (trial == 3 && n > 6) {  // the specials a score can be (a NaN from an inf key, an inf, zeros of either sign)
                s[1] = -0.0f;
                s[3] = 0.0f;
                s[4] = -INFINITY;
                s[5] = std::numeric_limits<float>::quiet_NaN();
                s[6] = INFINITY;
            }
            if (trial == 2 && n > 3) s[2] = s[3];  // a tied maximum somewhere
            const float divisor = trial == 0 ? std::sqrt(128.0f) : trial == 1 ? 8.0f : 1.0f;
            const float max_score = n > 0 ? s[1 + n / 2] : 0.0f;
            std::vector<float> ref_e(s), ref_s(s);
            ryz_set_isa(RYZ_ISA_SCALAR);
            ryz_softmax_exp(ref_e.data() + 1, n, max_score);
            ryz_softmax(ref_s.data() + 1, n, divisor);
            for (int32_t isa : g_simd_isas) {
                ryz_set_isa(isa);
                std::vector<float> e(s), sm(s);
                const ryz_status a = ryz_softmax_exp(e.data() + 1, n, max_score), b = ryz_softmax(sm.data() + 1, n, divisor);
                size_t i = 0;
                while (i < e.size() && bits_of(e[i]) == bits_of(ref_e[i])) ++i;
                check(a == RYZ_OK && i == e.size(), "softmax_exp %s n=%d trial %d: [%zu] = %a, scalar %a", isa_name(isa), n, trial, i,
                      i < e.size() ? e[i] : 0.0, i < e.size() ? ref_e[i] : 0.0);
                // A sum over two NaNs (an inf - inf next to a NaN score) is the NaN of whichever operand the compiler put
                // first, in the scalar spec as in SIMD (addition commutes for it), so there NaN only has to meet NaN.
                i = 0;
                while (i < sm.size() && (bits_of(sm[i]) == bits_of(ref_s[i]) || (std::isnan(sm[i]) && std::isnan(ref_s[i])))) ++i;
                check(b == RYZ_OK && i == sm.size(), "softmax %s n=%d trial %d: [%zu] = %a, scalar %a", isa_name(isa), n, trial, i,
                      i < sm.size() ? sm[i] : 0.0, i < sm.size() ? ref_s[i] : 0.0);
            }
        }
    }
    // All scores -inf or NaN: the max stays -inf and every exp is NaN, in every family.
    for (float special : {-INFINITY, std::numeric_limits<float>::quiet_NaN()}) {
        std::vector<float> ref(37, special);
        ryz_set_isa(RYZ_ISA_SCALAR);
        ryz_softmax(ref.data(), 37, 8.0f);
        for (int32_t isa : g_simd_isas) {
            ryz_set_isa(isa);
            std::vector<float> sm(37, special);
            ryz_softmax(sm.data(), 37, 8.0f);
            bool same = true;
            for (size_t i = 0; i < sm.size(); ++i) same = same && std::isnan(sm[i]) && std::isnan(ref[i]);
            check(same, "softmax %s of all %g: not all NaN as scalar's", isa_name(isa), special);
        }
    }
    check(ryz_softmax(nullptr, 3, 1.0f) != RYZ_OK && ryz_softmax_exp(probe, -1, 0.0f) != RYZ_OK, "softmax accepted a null or negative n");
    check(ryz_softmax(nullptr, 0, 1.0f) == RYZ_OK, "softmax refused n = 0");
}

// ---------------------------------------------------------------------------------------------
// T1P, the 1.6-bit layout of TQ1_0 models: scalar spec vs naive, every family vs scalar, repack
// ---------------------------------------------------------------------------------------------

// T1P (src/blocks.h), built here from codes: byte 16 (r % 4) + m of vector i of tile r / 4 holds the
// codes+1 of columns 80 i + 16 k + m as base-3 digits (k = 0 the most significant), stored as
// ceil(v * 256 / 243); columns past the row hold 1.
std::vector<uint8_t> make_t1p(const std::vector<uint8_t> &codes, int64_t rows, int64_t cols) {
    const int64_t nv = (cols + 79) / 80;
    std::vector<uint8_t> out(static_cast<size_t>(rows / TILE * nv * 64));
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < nv; ++i)
            for (int m = 0; m < 16; ++m) {
                int v = 0;
                for (int k = 0; k < 5; ++k) {
                    const int64_t c = 80 * i + 16 * k + m;
                    v = 3 * v + (c < cols ? codes[static_cast<size_t>(r * cols + c)] : 1);
                }
                out[static_cast<size_t>((r / TILE * nv + i) * 64 + (r % TILE) * 16 + m)] = static_cast<uint8_t>((v * 256 + 242) / 243);
            }
    return out;
}

// The codes+1 any T1P bytes stand for (digit k of q: floor(3 * (3^k q mod 256) / 256)), for the naive product.
std::vector<uint8_t> t1p_codes(const uint8_t *packed, int64_t rows, int64_t cols) {
    const int64_t nv = (cols + 79) / 80;
    std::vector<uint8_t> codes(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
            const int64_t i = c / 80, k = c % 80 / 16, m = c % 16;
            unsigned q = packed[(r / TILE * nv + i) * 64 + (r % TILE) * 16 + m];
            for (int j = 0; j < k; ++j) q = q * 3 % 256;
            codes[static_cast<size_t>(r * cols + c)] = static_cast<uint8_t>(q * 3 / 256);
        }
    return codes;
}

// mode 0: codes from random_codes (canonical bytes); 1: any byte value (non-canonical ones too: the
// spec defines every byte); 2: every byte 255 (digits 2, 2, 2, 2, 1: the largest products).
void t1p_case(Rng &rng, int64_t rows, int64_t cols, int32_t n_tokens, const std::vector<int32_t> &tiles, int mode, bool naive) {
    std::vector<uint8_t> bytes;
    if (mode == 0) {
        const std::vector<uint8_t> codes = random_codes(rng, rows, cols, false);
        bytes = make_t1p(codes, rows, cols);
        check(t1p_codes(bytes.data(), rows, cols) == codes, "t1p %lldx%lld: digits do not decode back to the codes", (long long)rows, (long long)cols);
    } else {
        bytes.resize(ryz_ternary_layout_bytes(RYZ_LAYOUT_T1P, rows, cols));
        for (uint8_t &b : bytes) b = mode == 1 ? static_cast<uint8_t>(rng.next()) : 255;
    }
    check(bytes.size() == ryz_ternary_layout_bytes(RYZ_LAYOUT_T1P, rows, cols), "t1p %lldx%lld: layout bytes %zu, want %zu", (long long)rows,
          (long long)cols, ryz_ternary_layout_bytes(RYZ_LAYOUT_T1P, rows, cols), bytes.size());
    Buffer<uint8_t> w(bytes.size(), static_cast<size_t>(rng.range(1, 63)));
    std::memcpy(w.ptr, bytes.data(), bytes.size());
    Buffer<int8_t> act(static_cast<size_t>(n_tokens * cols), static_cast<size_t>(rng.range(1, 63)));
    random_acts(rng, act.ptr, n_tokens, cols);
    const size_t n_out = static_cast<size_t>(rows * n_tokens);

    std::vector<int32_t> ref(n_out, 0x7EADBEEF);
    ryz_set_isa(RYZ_ISA_SCALAR);
    ryz_status st = ryz_ternary_gemm_layout(RYZ_LAYOUT_T1P, w.ptr, bytes.size(), rows, cols, act.ptr, n_tokens, 0, ref.data());
    check(st == RYZ_OK, "t1p scalar %lldx%lld n=%d: status %d (%s)", (long long)rows, (long long)cols, n_tokens, st, ryz_last_error());
    if (naive) {
        const std::vector<int32_t> want = naive_ternary(t1p_codes(bytes.data(), rows, cols), rows, cols, act.ptr, n_tokens);
        const size_t i = first_mismatch(ref.data(), want.data(), n_out);
        check(i == n_out, "t1p scalar vs naive %lldx%lld n=%d mode %d: out[%zu] = %d, want %d", (long long)rows, (long long)cols, n_tokens, mode,
              i, i < n_out ? ref[i] : 0, i < n_out ? want[i] : 0);
    }
    for (int32_t isa : g_simd_isas) {
        ryz_set_isa(isa);
        Buffer<int32_t> out(n_out, 4 * static_cast<size_t>(rng.range(1, 15)));
        for (int32_t tile : tiles) {
            std::fill(out.ptr, out.ptr + n_out, 0x7EADBEEF);
            st = ryz_ternary_gemm_layout(RYZ_LAYOUT_T1P, w.ptr, bytes.size(), rows, cols, act.ptr, n_tokens, tile, out.ptr);
            const size_t i = first_mismatch(out.ptr, ref.data(), n_out);
            check(st == RYZ_OK && i == n_out, "t1p %s %lldx%lld n=%d token_tile=%d mode %d: out[%zu] = %d, scalar %d", isa_name(isa),
                  (long long)rows, (long long)cols, n_tokens, tile, mode, i, i < n_out ? out[i] : 0, i < n_out ? ref[i] : 0);
        }
    }
}

void test_t1p() {
    Rng rng(6);
    const std::vector<int32_t> all_tiles = {-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 1000};
    const std::vector<int32_t> some_tiles = {0, 1, 3, 4, 8};
    for (int32_t n = 1; n <= 70; ++n) t1p_case(rng, n % 2 ? 4 : 12, 256 * (1 + n % 3), n, all_tiles, n % 7 == 3 ? 1 : 0, n <= 6);
    for (int64_t cols = 256; cols <= 2816; cols += 256)
        for (int64_t rows : {4, 12, 36})
            for (int32_t n : {1, 2, 5, 7, 13}) t1p_case(rng, rows, cols, n, some_tiles, (cols / 256 + n) % 3, n == 1 && rows == 4);
    for (int mode : {0, 1, 2}) {
        t1p_case(rng, 20, 6912, 1, some_tiles, mode, true);
        t1p_case(rng, 12, 6912, 9, some_tiles, mode, mode == 2);
        t1p_case(rng, 260, 2560, 1, {0}, mode, false);
    }
    t1p_case(rng, 68, 2560, 70, some_tiles, 0, false);
    // 8-16 tokens on the AMX family (t1p_one_token_tile): groups of 5 row tiles and a smaller last one, a 4-row tail
    t1p_case(rng, 100, 2560, 8, some_tiles, 0, false);
    t1p_case(rng, 84, 6912, 16, some_tiles, 1, false);
    t1p_case(rng, 164, 768, 11, {0}, 2, false);
    t1p_case(rng, 4, 43008, 1, {0}, 2, true);  // past the AVX-512 GEMV's fold of 512 vectors (40960 columns)
    t1p_case(rng, 1044, 512, 40, {0}, 0, false);  // prefill-sized on AMX: two T2P expansion groups, the second partial

    // TQ1_0 blocks from random codes repack to the T1P bytes built here, and GEMM on them equals GEMM on
    // the T2P repack of the same file.
    for (auto shape : {std::pair<int64_t, int64_t>{4, 256}, {12, 768}, {20, 2560}, {8, 6912}, {12, 2816}}) {
        const int64_t rows = shape.first, cols = shape.second, blocks = cols / QK;
        std::vector<uint8_t> codes = random_codes(rng, rows, cols, false);
        std::vector<uint16_t> d(static_cast<size_t>(rows * blocks), 0x3C00);
        const bool zero_block = rows >= 12;  // a zero block scale: all codes 0 whatever the digits say
        if (zero_block) d[5] = 0x0000;
        const std::vector<uint8_t> src = make_tq1(codes, rows, cols, d);
        if (zero_block) std::memset(&codes[static_cast<size_t>((5 / blocks) * cols + (5 % blocks) * QK)], 1, QK);
        const std::vector<uint8_t> want = make_t1p(codes, rows, cols);
        std::vector<uint8_t> t1p(want.size() + 64, 0xA5), t2p(ryz_ternary_layout_bytes(RYZ_LAYOUT_T2P, rows, cols));
        ryz_status st = ryz_ternary_pack_layout(src.data(), RYZ_TYPE_TQ1_0, RYZ_LAYOUT_T1P, rows, cols, t1p.data(), want.size());
        bool tail_ok = true;
        for (size_t i = want.size(); i < t1p.size(); ++i) tail_ok = tail_ok && t1p[i] == 0xA5;
        check(st == RYZ_OK && std::equal(want.begin(), want.end(), t1p.begin()) && tail_ok, "t1p pack %lldx%lld: status %d, bytes differ%s",
              (long long)rows, (long long)cols, st, tail_ok ? "" : " (wrote past the end)");
        st = ryz_ternary_pack_layout(src.data(), RYZ_TYPE_TQ1_0, RYZ_LAYOUT_T2P, rows, cols, t2p.data(), t2p.size());
        check(st == RYZ_OK && t2p == make_t2p(codes, rows, cols), "t2p pack_layout %lldx%lld: status %d, bytes differ", (long long)rows, (long long)cols, st);
        const int32_t n_max = 9;
        std::vector<int8_t> act(static_cast<size_t>(n_max * cols));
        random_acts(rng, act.data(), n_max, cols);
        for (int32_t isa : g_simd_isas)
            for (int32_t n : {1, 3, n_max}) {
                ryz_set_isa(isa);
                std::vector<int32_t> a(static_cast<size_t>(rows * n), 1), b(static_cast<size_t>(rows * n), 2);
                const ryz_status s1 = ryz_ternary_gemm_layout(RYZ_LAYOUT_T1P, t1p.data(), want.size(), rows, cols, act.data(), n, 0, a.data());
                const ryz_status s2 = ryz_ternary_gemm_layout(RYZ_LAYOUT_T2P, t2p.data(), t2p.size(), rows, cols, act.data(), n, 0, b.data());
                check(s1 == RYZ_OK && s2 == RYZ_OK && a == b, "t1p pack %lldx%lld then GEMM %s n=%d differs from the T2P repack", (long long)rows,
                      (long long)cols, isa_name(isa), n);
            }
    }
    // Refused: byte lengths other than the layout's, TQ2_0 into T1P, unknown layouts, bad shapes.
    std::vector<uint8_t> src(54 * 8), dst(1024);
    const size_t t1 = ryz_ternary_layout_bytes(RYZ_LAYOUT_T1P, 4, 512);
    check(t1 == 4 / 4 * 7 * 64 && ryz_ternary_layout_bytes(RYZ_LAYOUT_T2P, 4, 512) == 512, "layout bytes for 4x512: T1P %zu", t1);
    check(ryz_ternary_layout_bytes(RYZ_LAYOUT_T1P, 4, 300) == 0 && ryz_ternary_layout_bytes(RYZ_LAYOUT_T1P, 2, 256) == 0 &&
              ryz_ternary_layout_bytes(7, 4, 256) == 0, "layout bytes of a bad shape or layout must be 0");
    check(ryz_ternary_pack_layout(src.data(), RYZ_TYPE_TQ1_0, RYZ_LAYOUT_T1P, 4, 512, dst.data(), t1 - 1) != RYZ_OK, "t1p pack accepted a short dst");
    check(ryz_ternary_pack_layout(src.data(), RYZ_TYPE_TQ1_0, RYZ_LAYOUT_T1P, 4, 512, dst.data(), t1 + 1) != RYZ_OK, "t1p pack accepted a wrong dst length");
    check(ryz_ternary_pack_layout(src.data(), RYZ_TYPE_TQ2_0, RYZ_LAYOUT_T1P, 4, 512, dst.data(), t1) != RYZ_OK, "t1p pack accepted TQ2_0");
    check(ryz_ternary_pack_layout(src.data(), RYZ_TYPE_TQ1_0, 9, 4, 512, dst.data(), t1) != RYZ_OK, "pack accepted an unknown layout");
    std::vector<int8_t> act(512);
    std::vector<int32_t> out(4);
    check(ryz_ternary_gemm_layout(RYZ_LAYOUT_T1P, dst.data(), t1 - 64, 4, 512, act.data(), 1, 0, out.data()) != RYZ_OK, "t1p gemm accepted short weights");
    check(ryz_ternary_gemm_layout(RYZ_LAYOUT_T1P, dst.data(), t1, 4, 500, act.data(), 1, 0, out.data()) != RYZ_OK, "t1p gemm accepted cols 500");
    check(ryz_ternary_gemm_layout(5, dst.data(), t1, 4, 512, act.data(), 1, 0, out.data()) != RYZ_OK, "gemm accepted an unknown layout");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Element-wise: the forward's per-token kernels (norms, activation, residual, RoPE, KV store,
// BitLinear rescale), every family bit for bit vs scalar
// ---------------------------------------------------------------------------------------------

// Mostly `scale`-sized values; with `specials`, 1 in 16 is one of the values a forward can meet at an edge.
float elementwise_value(Rng &rng, float scale, bool specials) {
    static const float edges[] = {0.0f, -0.0f, INFINITY, -INFINITY, std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN(),
                                  1e-40f, -3e-39f, 3.4e38f, -3.4e38f, 65504.0f, 65519.0f, 65520.0f, -65520.0f, 6e-8f, 2.98e-8f, 2.9802322e-8f,
                                  -5.9604645e-8f, 6.1035156e-5f, 6.1028e-5f, 1e-30f, 88.7f, -88.7f, 89.5f, -104.0f, 1.0f};
    if (specials && rng.range(0, 15) == 0) return edges[rng.range(0, int(sizeof edges / sizeof edges[0]) - 1)];
    return scale * rng.symmetric();
}

// `run(buf)` on a copy of `init` at an odd address, in scalar then in every family; every float of the buffer
// (the outputs and the guard floats past them, which no kernel may write) must be scalar's bits. A NaN only has to
// meet a NaN: which operand's NaN an IEEE operation returns is the compiler's operand order, in scalar code too.
template <class Run>
void elementwise_compare(const char *what, int64_t n, int variant, const std::vector<float> &init, Run run) {
    Rng rng(static_cast<uint64_t>(n) * 31 + variant);
    ryz_set_isa(RYZ_ISA_SCALAR);
    std::vector<float> ref(init);
    check(run(ref.data()) == RYZ_OK, "%s scalar n=%lld: %s", what, (long long)n, ryz_last_error());
    for (int32_t isa : g_simd_isas) {
        ryz_set_isa(isa);
        Buffer<float> buf(init.size(), 4 * static_cast<size_t>(rng.range(0, 15)));
        std::memcpy(buf.ptr, init.data(), init.size() * 4);
        const ryz_status st = run(buf.ptr);
        size_t i = 0;
        while (i < init.size() && (bits_of(buf[i]) == bits_of(ref[i]) || (std::isnan(buf[i]) && std::isnan(ref[i])))) ++i;
        check(st == RYZ_OK && i == init.size(), "%s %s n=%lld variant %d: [%zu] = %a, scalar %a", what, isa_name(isa), (long long)n, variant, i,
              i < init.size() ? buf[i] : 0.0, i < init.size() ? ref[i] : 0.0);
    }
}

// Every family's fp16 KV store against fp32_to_fp16 (scalar) over the float bit patterns first, first + stride, ...
// < last, bit for bit (NaN included: the store writes one quiet NaN per sign); returns the floats compared.
uint64_t kv_store_sweep(uint64_t first, uint64_t last, uint64_t stride, uint64_t *mismatches) {
    constexpr size_t CHUNK = 1 << 16;
    std::vector<float> x(CHUNK);
    std::vector<uint16_t> ref(CHUNK), out(CHUNK);
    uint64_t compared = 0;
    for (uint64_t b = first; b < last;) {
        size_t n = 0;
        for (; n < CHUNK && b < last; ++n, b += stride) x[n] = float_of(static_cast<uint32_t>(b));
        ryz_set_isa(RYZ_ISA_SCALAR);
        ryz_kv_store(x.data(), static_cast<int64_t>(n), RYZ_KV_F16, ref.data());
        for (int32_t isa : g_simd_isas) {
            ryz_set_isa(isa);
            ryz_kv_store(x.data(), static_cast<int64_t>(n), RYZ_KV_F16, out.data());
            for (size_t i = 0; i < n; ++i)
                if (out[i] != ref[i] && ++*mismatches <= 20)
                    std::printf("MISMATCH kv_store f16 %s: x = %a (0x%08x): 0x%04x, scalar 0x%04x\n", isa_name(isa), x[i], bits_of(x[i]), out[i], ref[i]);
        }
        compared += n;
    }
    return compared;
}

void test_elementwise() {
    // The scalar spec's fp16 rounding where it is delicate: ties to even, the largest half, overflow, subnormal halves.
    ryz_set_isa(RYZ_ISA_SCALAR);
    const float probe[] = {1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f, 65504.0f, 65519.0f, 65520.0f, 0x1p-24f, 0x1p-25f, 0x1.8p-25f, -0x1p-14f, 0x1p-26f};
    const uint16_t want[] = {0x3C00, 0x3C02, 0x7BFF, 0x7BFF, 0x7C00, 0x0001, 0x0000, 0x0001, 0x8400, 0x0000};
    uint16_t got[10] = {};
    check(ryz_kv_store(probe, 10, RYZ_KV_F16, got) == RYZ_OK && std::memcmp(got, want, sizeof got) == 0, "kv_store f16 scalar: not fp16 round to nearest even");

    // fp16 stores over every 1009th float and the whole regions where the conversion is delicate (subnormal halves and
    // their vanishing edge, the overflow edge), plus the specials.
    uint64_t mismatches = 0, compared = kv_store_sweep(0, uint64_t(1) << 32, 1009, &mismatches);
    for (uint32_t sign : {0u, 0x80000000u}) {
        compared += kv_store_sweep(sign | bits_of(0x1p-26f), uint64_t(sign | bits_of(0x1p-14f)) + 1, 1, &mismatches);
        compared += kv_store_sweep(sign | bits_of(65000.0f), uint64_t(sign | bits_of(66000.0f)) + 1, 1, &mismatches);
    }
    for (uint32_t b : {0x00000000u, 0x80000000u, 0x7F800000u, 0xFF800000u, 0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFFBFFFFFu, 0x7FC12345u, 0x7FFFFFFFu})
        compared += kv_store_sweep(b, uint64_t(b) + 1, 1, &mismatches);
    std::printf("kv_store f16: %llu floats compared per family, %llu mismatches\n", (unsigned long long)compared, (unsigned long long)mismatches);
    check(mismatches == 0, "kv_store f16: %llu mismatches", (unsigned long long)mismatches);

    // Odd lengths around every lane count, and the 2B4T widths (head 128, kv 640, hidden 2560, ffn 6912).
    Rng rng(17);
    for (int64_t n : {0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 100, 127, 128, 129, 130, 255, 257, 640, 1000, 2560, 6912, 6913}) {
        for (int variant = 0; variant < 3; ++variant) {
            const bool specials = variant == 2;
            const float scale = variant == 0 ? 1.0f : variant == 1 ? 40.0f : 3.0f;
            std::vector<float> x(n), y(n);
            for (auto &v : x) v = elementwise_value(rng, scale, specials);
            for (auto &v : y) v = elementwise_value(rng, 1.5f, specials);
            const float eps = variant == 1 ? 1e-6f : 1e-5f;
            std::vector<float> out(static_cast<size_t>(n) + 3, -7.0f);  // 3 guards
            elementwise_compare("rms_norm", n, variant, out, [&](float *o) { return ryz_rms_norm(x.data(), y.data(), n, eps, o); });
            std::vector<float> io(x);
            io.insert(io.end(), {-7.0f, -7.0f, -7.0f});
            elementwise_compare("ffn relu2", n, variant, io, [&](float *g) { return ryz_ffn_act_mul(g, y.data(), n, RYZ_ACT_RELU2); });
            elementwise_compare("ffn silu", n, variant, io, [&](float *g) { return ryz_ffn_act_mul(g, y.data(), n, RYZ_ACT_SILU); });
            elementwise_compare("add", n, variant, io, [&](float *v) { return ryz_add(v, y.data(), n); });
            elementwise_compare("kv_store f32", n, variant, out, [&](float *o) { return ryz_kv_store(x.data(), n, RYZ_KV_F32, o); });
            // The f16 store: scalar's halves, and nothing past the row (guards 0xBEEF).
            std::vector<uint16_t> ref(static_cast<size_t>(n) + 3, 0xBEEF);
            ryz_set_isa(RYZ_ISA_SCALAR);
            ryz_kv_store(x.data(), n, RYZ_KV_F16, ref.data());
            for (int32_t isa : g_simd_isas) {
                ryz_set_isa(isa);
                Buffer<uint16_t> h(ref.size(), 2 * static_cast<size_t>(rng.range(0, 31)));
                for (size_t i = 0; i < ref.size(); ++i) h[i] = 0xBEEF;
                const ryz_status st = ryz_kv_store(x.data(), n, RYZ_KV_F16, h.ptr);
                size_t i = 0;
                while (i < ref.size() && h[i] == ref[i]) ++i;
                check(st == RYZ_OK && i == ref.size(), "kv_store f16 %s n=%lld: [%zu] = 0x%04x, scalar 0x%04x", isa_name(isa), (long long)n, i,
                      i < ref.size() ? h[i] : 0, i < ref.size() ? ref[i] : 0);
            }
            // The BitLinear rescale: sums of any size (above 2^24 the int -> float conversion rounds), extremes included.
            std::vector<int32_t> acc(n);
            for (auto &a : acc) {
                const int kind = rng.range(0, 9);
                a = kind == 0 ? std::numeric_limits<int32_t>::min() : kind == 1 ? std::numeric_limits<int32_t>::max()
                    : kind < 5 ? static_cast<int32_t>(rng.next()) : rng.range(-200000, 200000);
            }
            const float act_scale = variant == 2 ? 127.0f / 1e-5f : 127.0f / (scale * 0.9f), w_scale = variant == 1 ? 0.0123f : 1.7f;
            elementwise_compare("linear_out", n, variant, out, [&](float *o) { return ryz_linear_out(acc.data(), n, act_scale, w_scale, o); });
        }
    }
    // RoPE: head sizes on and off the lane counts (2B4T: 128; halves of 1, 3, 8, 16, 17, 64, 65), several heads.
    for (int32_t head_dim : {2, 6, 16, 32, 34, 64, 128, 130}) {
        for (int32_t n_heads : {1, 3, 20}) {
            const int32_t half = head_dim / 2;
            std::vector<float> vec(size_t(n_heads) * head_dim), cs(half), sn(half);
            for (auto &v : vec) v = elementwise_value(rng, 4.0f, n_heads == 3);
            for (int32_t i = 0; i < half; ++i) {
                const double angle = rng.uniform() * 4000.0;  // cos / sin of some position's angle, as the context tables
                cs[i] = static_cast<float>(std::cos(angle));
                sn[i] = static_cast<float>(std::sin(angle));
            }
            vec.insert(vec.end(), {-7.0f, -7.0f, -7.0f});
            elementwise_compare("rope", head_dim, n_heads, vec, [&](float *v) { return ryz_rope(v, n_heads, head_dim, cs.data(), sn.data()); });
        }
    }
    float v = 1.0f;
    check(ryz_rms_norm(nullptr, &v, 3, 1e-5f, &v) != RYZ_OK && ryz_add(&v, &v, -1) != RYZ_OK && ryz_ffn_act_mul(&v, &v, 1, 7) != RYZ_OK &&
              ryz_kv_store(&v, 1, 9, &v) != RYZ_OK,
          "an element-wise entry accepted a null buffer, a negative length or an unknown act / kv_type");
}

int main(int argc, char **argv) {
    const bool exhaustive = argc > 1 && std::strcmp(argv[1], "--exhaustive-exp") == 0;
    const auto start = std::chrono::steady_clock::now();
    const int32_t initial = ryz_isa();
    std::printf("ryz kernel tests: ABI %d, default ISA %s\n", ryz_abi_version(), isa_name(initial));
    check(ryz_isa_supported(RYZ_ISA_SCALAR) == 1, "scalar kernels must always be supported");
    check(ryz_set_isa(99) != RYZ_OK, "ryz_set_isa accepted an unknown family");
    for (int32_t isa : {RYZ_ISA_AVX2, RYZ_ISA_AVX512, RYZ_ISA_NEON, RYZ_ISA_AMX}) {
        if (ryz_isa_supported(isa)) {
            check(ryz_set_isa(isa) == RYZ_OK && ryz_isa() == isa, "ryz_set_isa(%s) failed though supported", isa_name(isa));
            g_simd_isas.push_back(isa);
        } else {
            check(ryz_set_isa(isa) != RYZ_OK, "ryz_set_isa(%s) succeeded though unsupported", isa_name(isa));
        }
    }
    // Always exercise scalar-vs-scalar too, so the harness runs even on a machine without SIMD.
    std::string families = "scalar";
    for (int32_t isa : g_simd_isas) families += std::string(", ") + isa_name(isa);
    std::printf("testing: %s%s\n", families.c_str(), tiled_gemm() ? "" : " (ryz_ternary_gemm_tiled not exported: default token tile only)");
    if (!ryz_isa_supported(RYZ_ISA_AMX))
        std::printf("amx: skipped (not compiled in, no AMX-INT8, or no tile permission); its tile layout is emulated\n");
    if (g_simd_isas.empty()) g_simd_isas.push_back(RYZ_ISA_SCALAR);

    struct { const char *name; void (*fn)(); } suites[] = {
        {"ternary", test_ternary}, {"amx-layout", test_amx_layout}, {"quantize", test_quantize}, {"dense", test_dense}, {"pack", test_pack},
        {"attention", test_attention}, {"t1p", test_t1p}, {"softmax", test_softmax}, {"elementwise", test_elementwise}};
    if (exhaustive) {  // only the exhaustive softmax exp (native/tests; `make exhaustive-exp`)
        exhaustive_exp();
        std::printf("%d passed, %d failed\n", g_passed, g_failed);
        return g_failed == 0 ? 0 : 1;
    }
    for (const auto &s : suites) {
        const int before = g_failed;
        const auto t0 = std::chrono::steady_clock::now();
        s.fn();
        std::printf("%-9s %s (%.2f s)\n", s.name, g_failed == before ? "ok" : "FAILED",
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    ryz_set_isa(initial);
    std::printf("total %.2f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    std::printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed == 0 ? 0 : 1;
}

// The kernel table: one implementation per ISA family, chosen once at load (see src/dispatch.cpp).
// Each SIMD file mirrors scalar.cpp, which is the executable spec; the tests hold every SIMD entry to
// its scalar twin bit for bit on integer outputs.
#pragma once

#include <cstdint>

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
};

const Kernels &kernels_scalar();
const Kernels *kernels_avx2();    // nullptr when not compiled in
const Kernels *kernels_avx512();  // nullptr when not compiled in
const Kernels *kernels_neon();    // nullptr when not compiled in

// Shared scalar helpers (scalar.cpp), used by SIMD files for ragged tails and rare types.
void dense_gemm_scalar(const void *w, int32_t type, int64_t row_begin, int64_t row_end, int64_t cols,
                       const float *x, int32_t n_tokens, float *out, int64_t out_stride);
void dequantize_row(const void *w, int32_t type, int64_t row, int64_t cols, float *out);
size_t row_bytes(int32_t type, int64_t cols);

}  // namespace ryz

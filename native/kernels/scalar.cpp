// Scalar reference kernels: plain loops, the executable spec of every layout and of the arithmetic.
//
// Ternary weights: T2P layout (blocks.h): packed[tile][block][row][64]; byte j of a row's 64-byte
// block holds code+1 of column 64l + j in bits 2l..2l+1. Here the code is decoded to -1/0/+1 and
// multiplied directly, so the SIMD kernels' "multiply code+1, subtract the activation sum" shortcut
// is checked against the definition, not against itself.
#include <cmath>
#include <cstring>

#include "../include/ryz.h"
#include "../src/blocks.h"
#include "kernels.h"

namespace ryz {

float fp16_to_fp32(fp16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1F;
    const uint32_t mant = h & 0x3FF;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            int e = -1;
            uint32_t m = mant;
            do { m <<= 1; ++e; } while ((m & 0x400) == 0);
            bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (m & 0x3FF) << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | mant << 13;
    } else {
        bits = sign | (exp + 127 - 15) << 23 | mant << 13;
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

fp16_t fp32_to_fp16(float f) {  // round to nearest even; only used for the KV cache and tests
    uint32_t x;
    std::memcpy(&x, &f, sizeof x);
    const uint32_t sign = (x >> 16) & 0x8000;
    const uint32_t abs = x & 0x7FFFFFFF;
    if (abs >= 0x7F800000) return static_cast<fp16_t>(sign | 0x7C00 | (abs > 0x7F800000 ? 0x200 : 0));
    if (abs >= 0x477FF000) return static_cast<fp16_t>(sign | 0x7C00);  // overflows to inf
    if (abs < 0x38800000) {  // subnormal or zero in fp16
        const uint32_t shift = 113 - (abs >> 23);
        // Below 2^-25 (shift > 11) the value rounds to zero; larger shifts would also shift a uint32 by >= 32.
        if (shift > 11) return static_cast<fp16_t>(sign);
        const uint32_t mant = (abs & 0x7FFFFF) | 0x800000;
        uint32_t h = mant >> (shift + 13);
        const uint32_t rem = mant & ((1u << (shift + 13)) - 1), half = 1u << (shift + 12);
        if (rem > half || (rem == half && (h & 1))) ++h;
        return static_cast<fp16_t>(sign | h);
    }
    uint32_t h = ((abs >> 13) - (112u << 10));
    const uint32_t rem = abs & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
    return static_cast<fp16_t>(sign | h);
}

static void ternary_gemm_scalar(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols,
                                const int8_t *act, const int32_t * /*act_sums*/, int32_t n_tokens, int32_t /*token_tile*/,
                                int32_t *out, int64_t out_stride) {
    const int64_t blocks = cols / QK_K;
    for (int64_t r = row_begin; r < row_end; ++r) {
        const int64_t tile = r / TILE_ROWS, in_tile = r % TILE_ROWS;
        for (int32_t t = 0; t < n_tokens; ++t) {
            const int8_t *a = act + t * cols;
            int32_t acc = 0;
            for (int64_t b = 0; b < blocks; ++b) {
                const uint8_t *qs = packed + ((tile * blocks + b) * TILE_ROWS + in_tile) * T2P_BLOCK_BYTES;
                for (int l = 0; l < 4; ++l) {
                    for (int j = 0; j < 64; ++j) {
                        const int code = ((qs[j] >> (2 * l)) & 3) - 1;
                        acc += code * a[b * QK_K + 64 * l + j];
                    }
                }
            }
            out[t * out_stride + r] = acc;
        }
    }
}

// T1P (blocks.h): packed[tile][i][64]; byte 16 * (r % 4) + m of vector i holds, as base-3 digit k,
// code+1 of column 80 i + 16 k + m. Digits decoded one by one from the definition.
static void ternary_gemm_t1p_scalar(const uint8_t *packed, int64_t row_begin, int64_t row_end, int64_t cols,
                                    const int8_t *act, const int32_t * /*act_sums*/, int32_t n_tokens, int32_t /*token_tile*/,
                                    int32_t *out, int64_t out_stride) {
    const int64_t nv = t1p_vectors(cols);
    for (int64_t r = row_begin; r < row_end; ++r) {
        const uint8_t *row = packed + (r / TILE_ROWS) * nv * T1P_VECTOR_BYTES + (r % TILE_ROWS) * 16;
        for (int32_t t = 0; t < n_tokens; ++t) {
            const int8_t *a = act + t * cols;
            int32_t acc = 0;
            for (int64_t i = 0; i < nv; ++i)
                for (int k = 0; k < 5; ++k)
                    for (int m = 0; m < 16; ++m) {
                        const int64_t c = i * T1P_VECTOR_COLS + 16 * k + m;
                        if (c < cols) acc += (t1p_digit(row[i * T1P_VECTOR_BYTES + m], k) - 1) * a[c];
                    }
            out[t * out_stride + r] = acc;
        }
    }
}

size_t row_bytes(int32_t type, int64_t cols) {
    switch (type) {
        case RYZ_TYPE_F32: return static_cast<size_t>(cols) * 4;
        case RYZ_TYPE_F16: return static_cast<size_t>(cols) * 2;
        case RYZ_TYPE_Q8_0: return static_cast<size_t>(cols / QK8_0) * sizeof(block_q8_0);
        case RYZ_TYPE_Q6_K: return static_cast<size_t>(cols / QK_K) * sizeof(block_q6_k);
        default: return 0;
    }
}

void dequantize_row(const void *w, int32_t type, int64_t row, int64_t cols, float *out) {
    const uint8_t *base = static_cast<const uint8_t *>(w) + static_cast<size_t>(row) * row_bytes(type, cols);
    switch (type) {
        case RYZ_TYPE_F32:
            std::memcpy(out, base, static_cast<size_t>(cols) * 4);
            break;
        case RYZ_TYPE_F16: {
            const fp16_t *h = reinterpret_cast<const fp16_t *>(base);
            for (int64_t k = 0; k < cols; ++k) out[k] = fp16_to_fp32(h[k]);
            break;
        }
        case RYZ_TYPE_Q8_0: {
            const block_q8_0 *blk = reinterpret_cast<const block_q8_0 *>(base);
            for (int64_t b = 0; b < cols / QK8_0; ++b) {
                const float d = fp16_to_fp32(blk[b].d);
                for (int j = 0; j < QK8_0; ++j) out[b * QK8_0 + j] = d * static_cast<float>(blk[b].qs[j]);
            }
            break;
        }
        case RYZ_TYPE_Q6_K: {  // ggml's dequantize_row_q6_K order: two halves of 128, four groups of 32
            const block_q6_k *blk = reinterpret_cast<const block_q6_k *>(base);
            for (int64_t b = 0; b < cols / QK_K; ++b) {
                const float d = fp16_to_fp32(blk[b].d);
                float *y = out + b * QK_K;
                const uint8_t *ql = blk[b].ql, *qh = blk[b].qh;
                const int8_t *sc = blk[b].scales;
                for (int half = 0; half < 2; ++half) {
                    for (int l = 0; l < 32; ++l) {
                        const int is = l / 16;
                        const int q1 = static_cast<int>((ql[l] & 0xF) | ((qh[l] >> 0 & 3) << 4)) - 32;
                        const int q2 = static_cast<int>((ql[l + 32] & 0xF) | ((qh[l] >> 2 & 3) << 4)) - 32;
                        const int q3 = static_cast<int>((ql[l] >> 4) | ((qh[l] >> 4 & 3) << 4)) - 32;
                        const int q4 = static_cast<int>((ql[l + 32] >> 4) | ((qh[l] >> 6 & 3) << 4)) - 32;
                        y[l] = d * sc[is] * q1;
                        y[l + 32] = d * sc[is + 2] * q2;
                        y[l + 64] = d * sc[is + 4] * q3;
                        y[l + 96] = d * sc[is + 6] * q4;
                    }
                    y += 128; ql += 64; qh += 32; sc += 8;
                }
            }
            break;
        }
        default:
            break;
    }
}

void dense_gemm_scalar(const void *w, int32_t type, int64_t row_begin, int64_t row_end, int64_t cols,
                       const float *x, int32_t n_tokens, float *out, int64_t out_stride) {
    float row[16384];
    float *buf = cols <= 16384 ? row : new float[cols];
    for (int64_t r = row_begin; r < row_end; ++r) {
        dequantize_row(w, type, r, cols, buf);
        for (int32_t t = 0; t < n_tokens; ++t) {
            const float *xt = x + t * cols;
            float acc = 0.0f;
            for (int64_t k = 0; k < cols; ++k) acc += buf[k] * xt[k];
            out[t * out_stride + r] = acc;
        }
    }
    if (buf != row) delete[] buf;
}

static void quantize_act_scalar(const float *x, int64_t cols, int8_t *q, float *scale, int32_t *sum) {
    float amax = 0.0f;
    for (int64_t k = 0; k < cols; ++k) amax = std::fmax(amax, std::fabs(x[k]));
    const float s = 127.0f / std::fmax(amax, 1e-5f);
    int32_t total = 0;
    for (int64_t k = 0; k < cols; ++k) {
        // rint rounds half to even in the default rounding mode, as numpy and torch do.
        const float v = std::fmin(std::fmax(std::rint(x[k] * s), -128.0f), 127.0f);
        q[k] = static_cast<int8_t>(v);
        total += q[k];
    }
    *scale = s;
    *sum = total;
}

static inline float kv_at(const void *base, int32_t kv_type, int64_t index) {
    if (kv_type == RYZ_KV_F32) return static_cast<const float *>(base)[index];
    return fp16_to_fp32(static_cast<const fp16_t *>(base)[index]);
}

static void kv_dot_scalar(const float *q, const void *keys, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d, float *scores) {
    for (int32_t p = 0; p < n_pos; ++p)
        scores[p] = pairwise_sum([&](int64_t i) { return q[i] * kv_at(keys, kv_type, p * stride + i); }, d);
}

static void kv_axpy_scalar(const float *probs, const void *values, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d, float *out) {
    for (int32_t i = 0; i < d; ++i) out[i] = 0.0f;
    for (int32_t p = 0; p < n_pos; ++p)
        for (int32_t i = 0; i < d; ++i) out[i] += probs[p] * kv_at(values, kv_type, p * stride + i);
}

// The attention softmax, exactly the loops the forward ran inline (and the reference's float order): exp in
// double, rounded once to float; std::max(m, s) keeps m when s is NaN, so NaN scores never become the max.
static void softmax_exp_scalar(float *scores, int32_t n, float max_score) {
    for (int32_t p = 0; p < n; ++p) scores[p] = static_cast<float>(std::exp(static_cast<double>(scores[p] - max_score)));
}

static void softmax_scalar(float *scores, int32_t n, float divisor) {
    float max_score = -INFINITY;
    for (int32_t p = 0; p < n; ++p) {
        scores[p] = scores[p] / divisor;
        max_score = std::max(max_score, scores[p]);
    }
    softmax_exp_scalar(scores, n, max_score);
    const float sum = pairwise_sum([scores](int64_t p) { return scores[p]; }, n);
    for (int32_t p = 0; p < n; ++p) scores[p] = scores[p] / sum;
}

// The forward's element-wise work, exactly the loops it ran inline (the reference's float order).
static void rms_norm_scalar(const float *x, const float *w, int64_t n, float eps, float *out) {
    const float sum = pairwise_sum([x](int64_t i) { return x[i] * x[i]; }, n);
    const float denom = std::sqrt(sum / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] / denom * w[i];
}

static void ffn_act_mul_scalar(float *gate, const float *up, int64_t n, int32_t act) {
    for (int64_t i = 0; i < n; ++i) {
        const float g = gate[i];
        const float a = act == RYZ_ACT_RELU2 ? (g > 0.0f ? g * g : 0.0f) : g / (1.0f + static_cast<float>(std::exp(static_cast<double>(-g))));
        gate[i] = a * up[i];
    }
}

static void add_scalar(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

static void rope_scalar(float *vec, int32_t n_heads, int32_t head_dim, const float *cs, const float *sn) {
    const int32_t half = head_dim / 2;
    for (int32_t h = 0; h < n_heads; ++h) {
        float *v = vec + int64_t(h) * head_dim;
        for (int32_t i = 0; i < half; ++i) {  // NEOX: rotate the two halves (transformers' rotate_half)
            const float a = v[i], b = v[i + half];
            v[i] = a * cs[i] - b * sn[i];
            v[i + half] = b * cs[i] + a * sn[i];
        }
    }
}

static void kv_store_scalar(const float *src, int64_t n, int32_t kv_type, void *dst) {
    if (kv_type == RYZ_KV_F32) {
        std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n));
        return;
    }
    fp16_t *h = static_cast<fp16_t *>(dst);
    for (int64_t i = 0; i < n; ++i) h[i] = fp32_to_fp16(src[i]);
}

static void linear_out_scalar(const int32_t *acc, int64_t n, float act_scale, float w_scale, float *out) {
    for (int64_t r = 0; r < n; ++r) out[r] = static_cast<float>(acc[r]) / act_scale * w_scale;
}

const Kernels &kernels_scalar() {
    static const Kernels k{RYZ_ISA_SCALAR, ternary_gemm_scalar, dense_gemm_scalar, quantize_act_scalar, kv_dot_scalar, kv_axpy_scalar,
                           ternary_gemm_t1p_scalar, softmax_exp_scalar, softmax_scalar,
                           nullptr, nullptr,  // no multi-query attention: the single-query kernels per query
                           rms_norm_scalar, ffn_act_mul_scalar, add_scalar, rope_scalar, kv_store_scalar, linear_out_scalar};
    return k;
}

}  // namespace ryz

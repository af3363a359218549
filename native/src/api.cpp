// The kernels' own ABI entry points (tests, autotuner, benchmark) and the bandwidth probe.
#include <algorithm>
#include <chrono>
#include <thread>
#include <vector>

#include "internal.h"
#include "threads.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC PR 105593: false positives inside the AVX-512 headers
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace ryz {
namespace {

// Sums 64-byte lines with the widest loads the CPU has, so the probe measures what SIMD kernels can read.
#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx512f"))) uint64_t read_avx512(const uint8_t *p, size_t bytes) {
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
    for (size_t i = 0; i + 128 <= bytes; i += 128) {
        acc0 = _mm512_xor_si512(acc0, _mm512_load_si512(p + i));
        acc1 = _mm512_xor_si512(acc1, _mm512_load_si512(p + i + 64));
    }
    return static_cast<uint64_t>(_mm512_reduce_add_epi64(_mm512_xor_si512(acc0, acc1)));
}
__attribute__((target("avx2"))) uint64_t read_avx2(const uint8_t *p, size_t bytes) {
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
    for (size_t i = 0; i + 64 <= bytes; i += 64) {
        acc0 = _mm256_xor_si256(acc0, _mm256_load_si256(reinterpret_cast<const __m256i *>(p + i)));
        acc1 = _mm256_xor_si256(acc1, _mm256_load_si256(reinterpret_cast<const __m256i *>(p + i + 32)));
    }
    const __m256i x = _mm256_xor_si256(acc0, acc1);
    return static_cast<uint64_t>(_mm256_extract_epi64(x, 0) ^ _mm256_extract_epi64(x, 1) ^ _mm256_extract_epi64(x, 2) ^ _mm256_extract_epi64(x, 3));
}
#endif

uint64_t read_scalar(const uint8_t *p, size_t bytes) {
    uint64_t acc = 0;
    for (size_t i = 0; i + 8 <= bytes; i += 8) acc ^= *reinterpret_cast<const uint64_t *>(p + i);
    return acc;
}

uint64_t read_block(const uint8_t *p, size_t bytes) {
#if defined(__x86_64__) || defined(_M_X64)
    if (kernels().isa == RYZ_ISA_AVX512 || kernels().isa == RYZ_ISA_AMX) return read_avx512(p, bytes);  // AMX is AVX-512's family too
    if (kernels().isa == RYZ_ISA_AVX2) return read_avx2(p, bytes);
#endif
    return read_scalar(p, bytes);
}

}  // namespace
}  // namespace ryz

using namespace ryz;

extern "C" {

ryz_status ryz_ternary_gemm(const uint8_t *packed, int64_t rows, int64_t cols, const int8_t *act, int32_t n_tokens, int32_t *out) {
    return ryz_ternary_gemm_tiled(packed, rows, cols, act, n_tokens, 0, out);
}

ryz_status ryz_ternary_gemm_tiled(const uint8_t *packed, int64_t rows, int64_t cols, const int8_t *act, int32_t n_tokens,
                                  int32_t token_tile, int32_t *out) {
    if (!packed || !act || !out || n_tokens < 1) return fail(RYZ_ERR_INVALID_ARGUMENT, "null argument or no tokens");
    if (rows <= 0 || rows % TILE_ROWS || cols <= 0 || cols % QK_K)
        return fail(RYZ_ERR_INVALID_ARGUMENT, "rows must be a multiple of 4 and cols of 256");
    std::vector<int32_t> sums(n_tokens);
    for (int32_t t = 0; t < n_tokens; ++t) {
        int32_t s = 0;
        for (int64_t k = 0; k < cols; ++k) s += act[t * cols + k];
        sums[t] = s;
    }
    kernels().ternary_gemm(packed, 0, rows, cols, act, sums.data(), n_tokens, token_tile, out, rows);
    return RYZ_OK;
}

static_assert(RYZ_LAYOUT_T2P == LAYOUT_T2P && RYZ_LAYOUT_T1P == LAYOUT_T1P, "ABI layout ids are blocks.h's");

ryz_status ryz_ternary_gemm_layout(int32_t layout, const uint8_t *packed, size_t packed_bytes, int64_t rows, int64_t cols,
                                   const int8_t *act, int32_t n_tokens, int32_t token_tile, int32_t *out) {
    if (!packed || !act || !out || n_tokens < 1) return fail(RYZ_ERR_INVALID_ARGUMENT, "null argument or no tokens");
    const size_t need = ryz_ternary_layout_bytes(layout, rows, cols);
    if (need == 0) return fail(RYZ_ERR_INVALID_ARGUMENT, "unknown layout, or rows not a multiple of 4 or cols of 256");
    if (packed_bytes != need)
        return fail(RYZ_ERR_INVALID_ARGUMENT, "packed weights are " + std::to_string(packed_bytes) + " bytes, the layout takes " + std::to_string(need));
    return guarded([&] {
        std::vector<int32_t> sums(n_tokens);
        for (int32_t t = 0; t < n_tokens; ++t) {
            int32_t s = 0;
            for (int64_t k = 0; k < cols; ++k) s += act[t * cols + k];
            sums[t] = s;
        }
        ternary_kernel(layout)(packed, 0, rows, cols, act, sums.data(), n_tokens, token_tile, out, rows);
        return RYZ_OK;
    });
}

ryz_status ryz_quantize_activations(const float *x, int32_t n_tokens, int64_t cols, int8_t *q, float *scale, int32_t *sums) {
    if (!x || !q || !scale || !sums || n_tokens < 1 || cols < 1) return fail(RYZ_ERR_INVALID_ARGUMENT, "null argument or empty input");
    for (int32_t t = 0; t < n_tokens; ++t) kernels().quantize_act(x + t * cols, cols, q + t * cols, scale + t, sums + t);
    return RYZ_OK;
}

ryz_status ryz_dense_gemm(const void *w, int32_t type, int64_t rows, int64_t cols, const float *x, int32_t n_tokens, float *out) {
    if (!w || !x || !out || rows < 1 || n_tokens < 1) return fail(RYZ_ERR_INVALID_ARGUMENT, "null argument or empty input");
    if (row_bytes(type, cols) == 0 || (type == RYZ_TYPE_Q8_0 && cols % QK8_0) || (type == RYZ_TYPE_Q6_K && cols % QK_K))
        return fail(RYZ_ERR_UNSUPPORTED, "dense type must be F32, F16, Q8_0 or Q6_K with whole blocks");
    kernels().dense_gemm(w, type, 0, rows, cols, x, n_tokens, out, rows);
    return RYZ_OK;
}

namespace {

ryz_status check_kv_args(const void *a, const void *b, const void *out, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d) {
    if (!a || !b || !out) return fail(RYZ_ERR_INVALID_ARGUMENT, "null argument");
    if (kv_type != RYZ_KV_F32 && kv_type != RYZ_KV_F16) return fail(RYZ_ERR_INVALID_ARGUMENT, "kv_type must be RYZ_KV_F32 or RYZ_KV_F16");
    if (d < 1 || n_pos < 0 || stride < d) return fail(RYZ_ERR_INVALID_ARGUMENT, "need d >= 1, n_pos >= 0 and stride >= d");
    return RYZ_OK;
}

}  // namespace

ryz_status ryz_kv_dot(const float *q, const void *keys, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d, float *scores) {
    if (ryz_status st = check_kv_args(q, keys, scores, kv_type, stride, n_pos, d)) return st;
    kv_dot_kernel()(q, keys, kv_type, stride, n_pos, d, scores);
    return RYZ_OK;
}

ryz_status ryz_kv_axpy(const float *probs, const void *values, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d, float *out) {
    if (ryz_status st = check_kv_args(probs, values, out, kv_type, stride, n_pos, d)) return st;
    kv_axpy_kernel()(probs, values, kv_type, stride, n_pos, d, out);
    return RYZ_OK;
}

ryz_status ryz_kv_dot_multi(const float *const *q, int32_t nq, const void *keys, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d,
                            float *const *scores) {
    if (!q || !scores || nq < 0) return fail(RYZ_ERR_INVALID_ARGUMENT, "need nq >= 0 and q / scores arrays");
    for (int32_t j = 0; j < nq; ++j)
        if (ryz_status st = check_kv_args(q[j], keys, scores[j], kv_type, stride, n_pos, d)) return st;
    if (nq > 0) kv_dot_multi(q, nq, keys, kv_type, stride, n_pos, d, scores);
    return RYZ_OK;
}

ryz_status ryz_kv_axpy_multi(const float *const *probs, int32_t nq, const int32_t *n_pos, const void *values, int32_t kv_type, int64_t stride,
                             int32_t d, float *const *out) {
    if (!probs || !out || !n_pos || nq < 0) return fail(RYZ_ERR_INVALID_ARGUMENT, "need nq >= 0 and probs / n_pos / out arrays");
    for (int32_t j = 0; j < nq; ++j)
        if (ryz_status st = check_kv_args(probs[j], values, out[j], kv_type, stride, n_pos[j], d)) return st;
    if (nq > 0) kv_axpy_multi(probs, nq, n_pos, values, kv_type, stride, d, out);
    return RYZ_OK;
}

ryz_status ryz_softmax_exp(float *scores, int32_t n, float max_score) {
    if ((!scores && n > 0) || n < 0) return fail(RYZ_ERR_INVALID_ARGUMENT, "need n >= 0 and scores for n > 0");
    softmax_exp_kernel()(scores, n, max_score);
    return RYZ_OK;
}

ryz_status ryz_softmax(float *scores, int32_t n, float divisor) {
    if ((!scores && n > 0) || n < 0) return fail(RYZ_ERR_INVALID_ARGUMENT, "need n >= 0 and scores for n > 0");
    softmax_kernel()(scores, n, divisor);
    return RYZ_OK;
}

ryz_status ryz_rms_norm(const float *x, const float *w, int64_t n, float eps, float *out) {
    if (n < 0 || (n > 0 && (!x || !w || !out))) return fail(RYZ_ERR_INVALID_ARGUMENT, "need n >= 0 and x, w, out for n > 0");
    if (n > 0) elementwise_kernels().rms_norm(x, w, n, eps, out);
    return RYZ_OK;
}

ryz_status ryz_ffn_act_mul(float *gate, const float *up, int64_t n, int32_t act) {
    if (n < 0 || (n > 0 && (!gate || !up))) return fail(RYZ_ERR_INVALID_ARGUMENT, "need n >= 0 and gate, up for n > 0");
    if (act != RYZ_ACT_SILU && act != RYZ_ACT_RELU2) return fail(RYZ_ERR_INVALID_ARGUMENT, "act must be RYZ_ACT_SILU or RYZ_ACT_RELU2");
    elementwise_kernels().ffn_act_mul(gate, up, n, act);
    return RYZ_OK;
}

ryz_status ryz_add(float *x, const float *y, int64_t n) {
    if (n < 0 || (n > 0 && (!x || !y))) return fail(RYZ_ERR_INVALID_ARGUMENT, "need n >= 0 and x, y for n > 0");
    elementwise_kernels().add(x, y, n);
    return RYZ_OK;
}

ryz_status ryz_rope(float *vec, int32_t n_heads, int32_t head_dim, const float *cos, const float *sin) {
    if (n_heads < 0 || head_dim < 0 || (n_heads > 0 && head_dim > 1 && (!vec || !cos || !sin)))
        return fail(RYZ_ERR_INVALID_ARGUMENT, "need n_heads, head_dim >= 0 and vec, cos, sin");
    elementwise_kernels().rope(vec, n_heads, head_dim, cos, sin);
    return RYZ_OK;
}

ryz_status ryz_kv_store(const float *src, int64_t n, int32_t kv_type, void *dst) {
    if (n < 0 || (n > 0 && (!src || !dst))) return fail(RYZ_ERR_INVALID_ARGUMENT, "need n >= 0 and src, dst for n > 0");
    if (kv_type != RYZ_KV_F32 && kv_type != RYZ_KV_F16) return fail(RYZ_ERR_INVALID_ARGUMENT, "kv_type must be RYZ_KV_F32 or RYZ_KV_F16");
    if (n > 0) elementwise_kernels().kv_store(src, n, kv_type, dst);
    return RYZ_OK;
}

ryz_status ryz_linear_out(const int32_t *acc, int64_t n, float act_scale, float w_scale, float *out) {
    if (n < 0 || (n > 0 && (!acc || !out))) return fail(RYZ_ERR_INVALID_ARGUMENT, "need n >= 0 and acc, out for n > 0");
    elementwise_kernels().linear_out(acc, n, act_scale, w_scale, out);
    return RYZ_OK;
}

ryz_status ryz_top_k(const float *logits, int64_t n, int32_t k, int32_t *ids, float *values) {
    if (!logits || !ids || !values || n < 1 || k < 1 || k > n) return fail(RYZ_ERR_INVALID_ARGUMENT, "need 1 <= k <= n and non-null buffers");
    // A size-k min-heap by (value, -index): ties resolve to the lower index, as numpy's argmax does.
    std::vector<std::pair<float, int64_t>> heap;
    heap.reserve(static_cast<size_t>(k));
    auto worse = [](const std::pair<float, int64_t> &a, const std::pair<float, int64_t> &b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    for (int64_t i = 0; i < n; ++i) {
        const float v = logits[i];
        if (static_cast<int32_t>(heap.size()) < k) {
            heap.emplace_back(v, i);
            std::push_heap(heap.begin(), heap.end(), worse);
        } else if (v > heap.front().first) {
            std::pop_heap(heap.begin(), heap.end(), worse);
            heap.back() = {v, i};
            std::push_heap(heap.begin(), heap.end(), worse);
        }
    }
    std::sort_heap(heap.begin(), heap.end(), worse);
    for (int32_t j = 0; j < k; ++j) {
        ids[j] = static_cast<int32_t>(heap[j].second);
        values[j] = heap[j].first;
    }
    return RYZ_OK;
}

double ryz_read_bandwidth(int64_t bytes, int32_t n_threads, int32_t repeats) {
    if (bytes < (1 << 20) || n_threads < 1 || repeats < 1) return 0.0;
    AlignedBuffer buffer;
    if (!buffer.allocate(static_cast<size_t>(bytes), true, true)) return 0.0;  // pages as the weights have them
    for (int64_t i = 0; i < bytes; i += 4096) buffer.get()[i] = static_cast<uint8_t>(i);  // fault pages in
    ThreadPool pool(n_threads);
    std::vector<uint64_t> sink(n_threads);
    double best = 0.0;
    for (int32_t r = 0; r < repeats; ++r) {
        const auto start = std::chrono::steady_clock::now();
        pool.run([&](int ti, int nt) {
            int64_t b, e;
            split_range(bytes, 4096, ti, nt, &b, &e);
            sink[ti] += read_block(buffer.get() + b, static_cast<size_t>(e - b));
        });
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        best = std::max(best, static_cast<double>(bytes) / seconds);
    }
    volatile uint64_t keep = 0;
    for (uint64_t s : sink) keep = keep ^ s;
    return best / 1e9;  // GB/s
}

}  // extern "C"

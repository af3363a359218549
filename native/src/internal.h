// Shared between the library's translation units; nothing here crosses the C ABI.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "../include/ryz.h"
#include "../kernels/kernels.h"
#include "blocks.h"

namespace ryz {

const Kernels &kernels();  // the table chosen by dispatch (or forced by ryz_set_isa)

// The attention kernels the forward runs: the family's own, or scalar's where the family leaves them null.
inline auto kv_dot_kernel() { return kernels().kv_dot ? kernels().kv_dot : kernels_scalar().kv_dot; }
inline auto kv_axpy_kernel() { return kernels().kv_axpy ? kernels().kv_axpy : kernels_scalar().kv_axpy; }
inline auto softmax_exp_kernel() { return kernels().softmax_exp ? kernels().softmax_exp : kernels_scalar().softmax_exp; }
inline auto softmax_kernel() { return kernels().softmax ? kernels().softmax : kernels_scalar().softmax; }
// kv_dot / kv_axpy for several queries over the same rows: the family's kernel, else its single-query one per query.
inline void kv_dot_multi(const float *const *q, int32_t nq, const void *keys, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d,
                         float *const *scores) {
    if (kernels().kv_dot_multi) return kernels().kv_dot_multi(q, nq, keys, kv_type, stride, n_pos, d, scores);
    for (int32_t j = 0; j < nq; ++j) kv_dot_kernel()(q[j], keys, kv_type, stride, n_pos, d, scores[j]);
}
inline void kv_axpy_multi(const float *const *probs, int32_t nq, const int32_t *n_pos, const void *values, int32_t kv_type, int64_t stride,
                          int32_t d, float *const *out) {
    if (kernels().kv_axpy_multi) return kernels().kv_axpy_multi(probs, nq, n_pos, values, kv_type, stride, d, out);
    for (int32_t j = 0; j < nq; ++j) kv_axpy_kernel()(probs[j], values, kv_type, stride, n_pos[j], d, out[j]);
}
// The element-wise kernels (kernels.h): the family's own, or scalar's where the family leaves one null.
struct Elementwise {
    decltype(Kernels::rms_norm) rms_norm;
    decltype(Kernels::ffn_act_mul) ffn_act_mul;
    decltype(Kernels::add) add;
    decltype(Kernels::rope) rope;
    decltype(Kernels::kv_store) kv_store;
    decltype(Kernels::linear_out) linear_out;
};
inline Elementwise elementwise_kernels() {
    const Kernels &k = kernels(), &s = kernels_scalar();
    return {k.rms_norm ? k.rms_norm : s.rms_norm, k.ffn_act_mul ? k.ffn_act_mul : s.ffn_act_mul, k.add ? k.add : s.add,
            k.rope ? k.rope : s.rope, k.kv_store ? k.kv_store : s.kv_store, k.linear_out ? k.linear_out : s.linear_out};
}
// The ternary GEMM for a weight layout (LAYOUT_*): T1P's falls back to scalar's where a family has none.
inline auto ternary_kernel(int32_t layout) {
    if (layout != LAYOUT_T1P) return kernels().ternary_gemm;
    return kernels().ternary_gemm_t1p ? kernels().ternary_gemm_t1p : kernels_scalar().ternary_gemm_t1p;
}
ryz_status fail(ryz_status status, const std::string &message);  // records ryz_last_error

// Runs an ABI entry's body so that no exception crosses the C ABI: a failed allocation (a size from a crafted
// file that got this far) or thread start becomes a status and a message instead of std::terminate.
template <typename Body>
ryz_status guarded(Body &&body) {
    try {
        return body();
    } catch (const std::bad_alloc &) {
        return fail(RYZ_ERR_OUT_OF_MEMORY, "out of memory");
    } catch (const std::exception &e) {
        return fail(RYZ_ERR_STATE, std::string("internal error: ") + e.what());
    }
}

// 64-byte aligned buffer (cache lines and AVX-512 loads), zero-initialised unless `zero` is false.
// `huge_pages`: 2 MB aligned and advised to the kernel as transparent huge pages (Linux; a hint that may be
// ignored). For what is streamed every token: with 4 KB pages the decode GEMVs paid a TLB miss every 4 KB
// (docs/kernels.md "Huge pages"). The last 2 MB page is whole once touched, so use it for one large buffer,
// not for many small ones.
struct AlignedBuffer {
    struct Free { void operator()(void *p) const { std::free(p); } };
    std::unique_ptr<uint8_t, Free> data;
    size_t size = 0;
    bool allocate(size_t bytes, bool zero = true, bool huge_pages = false);
    uint8_t *get() const { return data.get(); }
};

// std::vector storage on 64-byte boundaries. The GEMM output (forward.cpp's acc) uses it: the AMX prefill kernel
// stores each 16-int tile row straight into it, one cache line when aligned (1.06-1.17x per call measured aligned
// against a vector's 16-byte start; docs/kernels.md "AMX").
template <typename T>
struct CacheLineAllocator {
    using value_type = T;
    CacheLineAllocator() = default;
    template <typename U>
    CacheLineAllocator(const CacheLineAllocator<U> &) {}
    T *allocate(size_t n) {
        void *p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
        if (!p) throw std::bad_alloc();
        return static_cast<T *>(p);
    }
    void deallocate(T *p, size_t) { std::free(p); }
    template <typename U>
    bool operator==(const CacheLineAllocator<U> &) const { return true; }
    template <typename U>
    bool operator!=(const CacheLineAllocator<U> &) const { return false; }
};

struct DenseTensor {
    const void *data = nullptr;
    int32_t type = -1;
    int64_t rows = 0, cols = 0;
};

struct TernaryLinear {
    const uint8_t *packed = nullptr;  // in ryz_model::ternary_weights; `layout`: T2P (from TQ2_0) or T1P (from TQ1_0), blocks.h
    int32_t layout = LAYOUT_T2P;
    int64_t rows = 0, cols = 0;
    float scale = 1.0f;    // real weight = code * scale
};

enum LinearSlot { Q, K, V, O, GATE, UP, DOWN, N_LINEARS };

struct Layer {
    const float *attn_norm = nullptr, *ffn_norm = nullptr, *attn_sub_norm = nullptr, *ffn_sub_norm = nullptr;
    TernaryLinear linear[N_LINEARS];
};

struct Source {  // a registered GGUF tensor, before finalize
    const void *data = nullptr;
    int32_t type = -1;
    int64_t rows = 0, cols = 0;
};

}  // namespace ryz

struct ryz_model {
    ryz_hparams hp{};
    std::vector<ryz::Layer> layers;
    ryz::DenseTensor token_embd, output;  // output.data == token_embd.data when tied
    const float *output_norm = nullptr;
    std::vector<std::pair<std::string, ryz::Source>> sources;
    bool finalized = false;
    double repack_seconds = 0.0;
    int64_t repacked_bytes = 0;
    ryz::AlignedBuffer ternary_weights;  // every layer's packed linears, one huge-page buffer
};

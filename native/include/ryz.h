/* Ryzanstein native engine: the whole C ABI.
 *
 * POD structs, integer status codes, no exceptions across this boundary. Python reaches it through
 * ctypes (engine/model/native.py, the only importer). Tensors are passed by pointer and byte length into
 * the caller's memory-mapped GGUF; ternary weights are repacked into the kernels' layout at finalize time,
 * every other tensor is read in place, so the caller must keep the mapping alive while the model lives.
 */
#ifndef RYZ_H
#define RYZ_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ABI 5: additions only (RYZ_ISA_AMX, the 1.6-bit T1P layout's test entry points, per-part profiling).
 * ABI 4: ryz_model_set_tensor takes the byte length of the tensor's data. ABI 3 added ryz_kv_dot / ryz_kv_axpy. */
#define RYZ_ABI_VERSION 5

#if defined(__GNUC__)
#define RYZ_API __attribute__((visibility("default")))
#else
#define RYZ_API
#endif

typedef enum {
    RYZ_OK = 0,
    RYZ_ERR_INVALID_ARGUMENT = 1, /* bad shape, type, name, token id, position or sequence */
    RYZ_ERR_OUT_OF_MEMORY = 2,
    RYZ_ERR_UNSUPPORTED = 3,      /* a type or ISA this build cannot run */
    RYZ_ERR_CAPACITY = 4,         /* a sequence would exceed the context's capacity */
    RYZ_ERR_STATE = 5             /* call order: e.g. forward on a model that is not finalized */
} ryz_status;

/* GGML type ids of the tensors we accept (values match ggml's enum). */
enum {
    RYZ_TYPE_F32 = 0, RYZ_TYPE_F16 = 1, RYZ_TYPE_Q8_0 = 8, RYZ_TYPE_Q6_K = 14,
    RYZ_TYPE_TQ1_0 = 34, RYZ_TYPE_TQ2_0 = 35
};

enum { RYZ_ACT_SILU = 0, RYZ_ACT_RELU2 = 1 };
enum { RYZ_KV_F32 = 0, RYZ_KV_F16 = 1 };
enum { RYZ_ISA_SCALAR = 0, RYZ_ISA_AVX2 = 1, RYZ_ISA_AVX512 = 2, RYZ_ISA_NEON = 3, RYZ_ISA_AMX = 4 };

typedef struct {
    int32_t hidden, layers, heads, kv_heads, head_dim, ffn, vocab;
    float rope_theta, rms_eps;
    int32_t ffn_act;    /* RYZ_ACT_* */
    int32_t sub_norms;  /* 1: attn_sub_norm / ffn_sub_norm present */
    int32_t tied;       /* 1: token_embd is also the output head */
} ryz_hparams;

/* Tuning parameters the autotuner sweeps (0 = built-in default). */
typedef struct {
    int32_t gemm_token_tile;  /* tokens processed per weight pass in the batched GEMM */
    int32_t rows_per_task;    /* output rows per work item handed to a thread */
} ryz_tuning;

typedef struct ryz_model ryz_model;
typedef struct ryz_context ryz_context;

/* Library */
RYZ_API int32_t ryz_abi_version(void);
RYZ_API int32_t ryz_isa(void);                   /* the kernel family in use (RYZ_ISA_*) */
RYZ_API const char *ryz_isa_name(int32_t isa);
RYZ_API int32_t ryz_isa_supported(int32_t isa);  /* 1 if compiled in and this CPU + OS can run it */
RYZ_API ryz_status ryz_set_isa(int32_t isa);     /* force a path (tests, RYZ_ISA); fails if unsupported */
RYZ_API const char *ryz_last_error(void);         /* message for the last failing call on this thread */
RYZ_API const char *ryz_source_hash(void);        /* hash of the sources this library was built from */

/* Model */
RYZ_API ryz_status ryz_model_new(const ryz_hparams *hp, ryz_model **out);
/* Register one GGUF tensor by its GGUF name (e.g. "blk.3.attn_q.weight"); rows x cols in numpy order. `n_bytes` is
 * the length of `data` and must be exactly what `type` takes for rows x cols (refused otherwise, as are a type the
 * engine does not read, partial blocks, sizes that overflow and a name registered twice). */
RYZ_API ryz_status ryz_model_set_tensor(ryz_model *m, const char *name, const void *data, size_t n_bytes, int32_t type,
                                        int64_t rows, int64_t cols);
RYZ_API ryz_status ryz_model_finalize(ryz_model *m, int32_t n_threads);  /* checks completeness, repacks ternary weights */
RYZ_API double ryz_model_repack_seconds(const ryz_model *m);
RYZ_API int64_t ryz_model_repacked_bytes(const ryz_model *m);
RYZ_API void ryz_model_free(ryz_model *m);

/* Context: a thread pool, scratch buffers, and one KV cache per sequence. */
RYZ_API ryz_status ryz_context_new(ryz_model *m, int32_t n_threads, int32_t max_seqs, int32_t max_positions, int32_t kv_type, ryz_context **out);
RYZ_API void ryz_context_free(ryz_context *c);
RYZ_API ryz_status ryz_context_set_tuning(ryz_context *c, const ryz_tuning *t);
RYZ_API int32_t ryz_seq_length(const ryz_context *c, int32_t seq);
RYZ_API ryz_status ryz_seq_truncate(ryz_context *c, int32_t seq, int32_t length);  /* 0 resets */
RYZ_API ryz_status ryz_seq_copy(ryz_context *c, int32_t src, int32_t dst, int32_t length);  /* shared-prefix reuse */
RYZ_API ryz_status ryz_seq_release(ryz_context *c, int32_t seq);  /* frees the slot's KV memory (allocated again on next use) */
RYZ_API int64_t ryz_context_kv_bytes(const ryz_context *c);

/* One forward step over a batch of tokens from any sequences. Each token's position must equal its
 * sequence's length at that point (tokens of one sequence in order). `want_logits[i]` != 0 selects the
 * tokens whose logits are written, densely in batch order, to `logits` (rows of `vocab` floats);
 * NULL selects the last token of the batch only. */
RYZ_API ryz_status ryz_forward(ryz_context *c, int32_t n_tokens, const int32_t *tokens, const int32_t *seq_ids,
                       const uint8_t *want_logits, float *logits);

/* Per-part profile of ryz_forward (ABI 5), so a benchmark shows where a step's time goes: wall seconds spent
 * in the ternary linears (GEMMs + rescale), the head (final norm + dense GEMM), attention (scores, softmax, values)
 * and everything else (embedding, norms, int8 activation quantization, RoPE, KV stores, activation functions,
 * residuals; quantization counted with the linears until 2026-12-05),
 * summed over the forward calls since profiling was turned on. Off by default; turning it on (or off) resets it. */
enum { RYZ_PART_TERNARY = 0, RYZ_PART_HEAD = 1, RYZ_PART_ATTENTION = 2, RYZ_PART_OTHER = 3, RYZ_PART_COUNT = 4 };
RYZ_API ryz_status ryz_context_set_profiling(ryz_context *c, int32_t on);
/* seconds[RYZ_PART_COUNT]; *calls = forward calls profiled. */
RYZ_API ryz_status ryz_context_profile(const ryz_context *c, double *seconds, int64_t *calls);

/* Kernels, exposed for tests and the autotuner (they use the current ISA). */
RYZ_API size_t ryz_ternary_packed_bytes(int64_t rows, int64_t cols);
RYZ_API ryz_status ryz_ternary_pack(const void *src, int32_t type, int64_t rows, int64_t cols, uint8_t *dst);
/* out[t * rows + r] = sum_k W[r, k] * act[t * cols + k] over ternary W (packed), int8 activations. */
RYZ_API ryz_status ryz_ternary_gemm(const uint8_t *packed, int64_t rows, int64_t cols, const int8_t *act,
                            int32_t n_tokens, int32_t *out);
/* The same with an explicit token tile (tokens sharing one unpacking of a weight block; 0 = default). */
RYZ_API ryz_status ryz_ternary_gemm_tiled(const uint8_t *packed, int64_t rows, int64_t cols, const int8_t *act,
                                  int32_t n_tokens, int32_t token_tile, int32_t *out);
/* ABI 5: the in-memory ternary layouts (docs/kernels.md): T2P (2 bits, from TQ2_0) and T1P (1.6 bits, from TQ1_0;
 * a model's TQ1_0 tensors are repacked into it at finalize). layout_bytes is 0 for a bad layout or shape. Packing
 * to T1P takes TQ1_0 only; dst_bytes and packed_bytes must be what the layout takes for rows x cols. */
enum { RYZ_LAYOUT_T2P = 0, RYZ_LAYOUT_T1P = 1 };
RYZ_API size_t ryz_ternary_layout_bytes(int32_t layout, int64_t rows, int64_t cols);
RYZ_API ryz_status ryz_ternary_pack_layout(const void *src, int32_t type, int32_t layout, int64_t rows, int64_t cols,
                                           uint8_t *dst, size_t dst_bytes);
RYZ_API ryz_status ryz_ternary_gemm_layout(int32_t layout, const uint8_t *packed, size_t packed_bytes, int64_t rows, int64_t cols,
                                           const int8_t *act, int32_t n_tokens, int32_t token_tile, int32_t *out);
/* Per-token absmax int8 quantization: q = clamp(rint(x * 127 / max|x|)); scale[t] = 127 / max|x|. */
RYZ_API ryz_status ryz_quantize_activations(const float *x, int32_t n_tokens, int64_t cols, int8_t *q, float *scale, int32_t *sums);
/* out[t * rows + r] = dot(dequant(W[r]), x[t]) for a Q8_0, Q6_K, F16 or F32 head / embedding. */
RYZ_API ryz_status ryz_dense_gemm(const void *w, int32_t type, int64_t rows, int64_t cols, const float *x, int32_t n_tokens, float *out);
/* Attention over a KV cache of F32 or F16 rows (kv_type RYZ_KV_*), `stride` elements apart, head size d:
 * scores[p] = dot(q, key_p) for p < n_pos, in numpy's pairwise order; out[i] = sum_p probs[p] * value_p[i],
 * sequential over p. The forward's own kernels, exposed so tests can hold each family to scalar bit for bit. */
RYZ_API ryz_status ryz_kv_dot(const float *q, const void *keys, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d, float *scores);
RYZ_API ryz_status ryz_kv_axpy(const float *probs, const void *values, int32_t kv_type, int64_t stride, int32_t n_pos, int32_t d, float *out);
/* ABI 5 addition: the attention softmax over n scores in place (n >= 0), the forward's own kernels, for the tests.
 * ryz_softmax_exp: scores[p] = (float)exp((double)(scores[p] - max_score)). ryz_softmax: scores[p] /= divisor, then
 * exp(score - max) as above, then each divided by their sum in numpy's pairwise order. */
RYZ_API ryz_status ryz_softmax_exp(float *scores, int32_t n, float max_score);
RYZ_API ryz_status ryz_softmax(float *scores, int32_t n, float divisor);
/* ABI 5 addition, for the tests: ryz_kv_dot / ryz_kv_axpy for nq queries over the same rows (the forward's GQA
 * kernels: the heads of a KV group, a block of tokens), each query's result bit for bit its single-query one.
 * ryz_kv_dot_multi: scores[j][p] = dot(q[j], key_p), p < n_pos; ryz_kv_axpy_multi: out[j] over n_pos[j] positions. */
RYZ_API ryz_status ryz_kv_dot_multi(const float *const *q, int32_t nq, const void *keys, int32_t kv_type, int64_t stride, int32_t n_pos,
                                    int32_t d, float *const *scores);
RYZ_API ryz_status ryz_kv_axpy_multi(const float *const *probs, int32_t nq, const int32_t *n_pos, const void *values, int32_t kv_type,
                                     int64_t stride, int32_t d, float *const *out);
/* ABI 5 addition, for the tests: the forward's per-token element-wise kernels (the current ISA's; kernels.h has
 * their exact definitions), each family bit for bit the scalar one. n >= 0 elements.
 * ryz_rms_norm: out = x / sqrt(sum(x^2) / n + eps) * w; ryz_ffn_act_mul: gate = act(gate) * up (act RYZ_ACT_*);
 * ryz_add: x += y; ryz_rope: NEOX rotation of n_heads heads of head_dim by cos / sin[head_dim / 2];
 * ryz_kv_store: dst = src as kv_type (RYZ_KV_F16: round to nearest even); ryz_linear_out: out = float(acc) / act_scale * w_scale. */
RYZ_API ryz_status ryz_rms_norm(const float *x, const float *w, int64_t n, float eps, float *out);
RYZ_API ryz_status ryz_ffn_act_mul(float *gate, const float *up, int64_t n, int32_t act);
RYZ_API ryz_status ryz_add(float *x, const float *y, int64_t n);
RYZ_API ryz_status ryz_rope(float *vec, int32_t n_heads, int32_t head_dim, const float *cos, const float *sin);
RYZ_API ryz_status ryz_kv_store(const float *src, int64_t n, int32_t kv_type, void *dst);
RYZ_API ryz_status ryz_linear_out(const int32_t *acc, int64_t n, float act_scale, float w_scale, float *out);
/* The k largest logits, largest first (ties: lower id first). */
RYZ_API ryz_status ryz_top_k(const float *logits, int64_t n, int32_t k, int32_t *ids, float *values);
/* Memory read bandwidth probe: streams `bytes` with SIMD loads on n_threads threads, `repeats` times. */
RYZ_API double ryz_read_bandwidth(int64_t bytes, int32_t n_threads, int32_t repeats);

#ifdef __cplusplus
}
#endif

#endif /* RYZ_H */

// The BitNet b1.58 forward over a batch of tokens from any sequences, one C call per step.
//
// Same computation and, where it matters, the same float order as engine/reference.py:
//   per layer  n = rms(x) -> int8 -> q,k,v (ternary GEMM) -> rope -> KV cache -> causal GQA attention
//              -> [attn_sub_norm] -> int8 -> o_proj -> x += ;  m = rms(x) -> int8 -> gate, up -> act(gate)*up
//              -> [ffn_sub_norm] -> int8 -> down -> x +=
//   then rms(x) -> dense head GEMM for the tokens whose logits are wanted.
// A BitLinear output is float(int32 sum) / activation_scale * weight_scale, as the reference computes it.
// Every parallel region splits work statically by thread index, so results never depend on timing.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <new>

#include "internal.h"
#include "threads.h"

namespace ryz {

struct KVSeq {
    // [layer][kv_head][position][head_dim], fp32 or fp16: one head's rows are one contiguous stream for attention
    // (position-major, a head's 256-byte rows sat 1280 bytes apart and the hardware prefetchers never ramped up).
    AlignedBuffer keys, values;
    int32_t length = 0;
};

}  // namespace ryz

struct ryz_context {
    ryz_model *model = nullptr;
    std::shared_ptr<ryz::ThreadPool> pool;  // shared with the process's other contexts of this thread count
    int32_t max_seqs = 0, max_positions = 0, kv_type = RYZ_KV_F16;
    std::vector<ryz::KVSeq> seqs;
    ryz_tuning tuning{0, 0};  // 0: each kernel family's default tile
    std::vector<float> rope_cos, rope_sin;  // [position][head_dim / 2]
    std::vector<std::vector<float>> scores;  // per thread: attention scores over max_positions
    // Scratch, grown to the largest batch seen.
    int32_t capacity = 0;
    std::vector<float> x, xb, q, k, v, att, gate, up, act_scale, head_in;
    std::vector<int8_t> act;
    std::vector<int32_t> act_sum, positions;
    std::vector<int32_t, ryz::CacheLineAllocator<int32_t>> acc;  // GEMM outputs, [job][token][row]
    // ryz_context_set_profiling: per-part wall seconds (RYZ_PART_*) over the calls since it was turned on.
    bool profiling = false;
    double part_seconds[RYZ_PART_COUNT] = {};
    int64_t profiled_calls = 0;
};

namespace ryz {

namespace {

size_t kv_elem_bytes(int32_t kv_type) { return kv_type == RYZ_KV_F32 ? 4 : 2; }

// One position's row of one KV head in a sequence's K or V buffer, in bytes.
size_t kv_row_bytes(const ryz_context *c) { return size_t(c->model->hp.head_dim) * kv_elem_bytes(c->kv_type); }

// Byte offset of (layer, KV head)'s rows in a sequence's K or V buffer (KVSeq: [layer][kv_head][position][head_dim]).
size_t kv_head_offset(const ryz_context *c, int32_t layer, int32_t kv_head) {
    return (size_t(layer) * c->model->hp.kv_heads + kv_head) * c->max_positions * kv_row_bytes(c);
}

// Runs fn, adding its wall time to `part` when the context is profiling. The forward's parallel regions
// return only when every thread is done, so wall time on the calling thread is the part's time.
template <typename Fn>
void timed(ryz_context *c, int part, Fn fn) {
    if (!c->profiling) {
        fn();
        return;
    }
    const auto start = std::chrono::steady_clock::now();
    fn();
    c->part_seconds[part] += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Token t's input to the next linear: `src` (cols values), RMS-normed by `norm` into the context's xb row when a
// norm is given, then quantized to int8 into its row of the act buffer. The forward calls it from the per-token
// work that produced `src`, while the row is still in L1: a separate pass over the batch read every row back from
// L2 or memory and cost a parallel region per linear input.
void linear_input(ryz_context *c, const Elementwise &ew, int32_t t, const float *src, const float *norm, int64_t cols) {
    if (norm) {
        float *normed = c->xb.data() + int64_t(t) * cols;
        ew.rms_norm(src, norm, cols, c->model->hp.rms_eps, normed);
        src = normed;
    }
    kernels().quantize_act(src, cols, c->act.data() + int64_t(t) * cols, &c->act_scale[t], &c->act_sum[t]);
}

// out[t, r] = float(acc) / act_scale[t] * w.scale for each linear, all run in one parallel region
// (q, k, v share their input activations, as do gate and up).
struct LinearJob {
    const TernaryLinear *w;
    float *out;  // [n][w->rows]
};

// Decode (one token per sequence, n small) runs a linear region in chunks of rows (ThreadPool::
// run_chunks), so a thread that finishes early takes over the rest of a delayed one. 128 rows (a
// multiple of TILE_ROWS) are 80-220 KB of 2B4T weights, a few microseconds of streaming: the last
// chunk waited for is short, and claiming one (an atomic add on its owner's cache line) is cheap next
// to it. Prefill keeps one contiguous range per thread, so its token blocks reuse each activation
// block across all of a thread's rows (chunked prefill showed no gain we could measure on the busy
// machine). Either way a row's result does not depend on its range or thread, so neither do the outputs.
constexpr int64_t LINEAR_CHUNK_ROWS = 128;
constexpr int32_t CHUNKED_MAX_TOKENS = 4;

void bit_linears(ryz_context *c, const LinearJob *jobs, int n_jobs, int32_t n) {
    const int64_t cols = jobs[0].w->cols;
    const int32_t tile = c->tuning.gemm_token_tile;
    const auto linear_out = elementwise_kernels().linear_out;
    int64_t first_row[4] = {0, 0, 0, 0};  // where each job's rows start among all jobs' rows (n_jobs <= 3)
    for (int j = 0; j < n_jobs; ++j) first_row[j + 1] = first_row[j] + jobs[j].w->rows;
    auto run_rows = [&](int j, int64_t rb, int64_t re) {  // rows [rb, re) of job j, whole row tiles
        const TernaryLinear &w = *jobs[j].w;
        int32_t *acc = c->acc.data() + first_row[j] * n;  // [job rows][...]: disjoint per job
        ternary_kernel(w.layout)(w.packed, rb, re, cols, c->act.data(), c->act_sum.data(), n, tile, acc, w.rows);
        for (int32_t t = 0; t < n; ++t)
            linear_out(acc + int64_t(t) * w.rows + rb, re - rb, c->act_scale[t], w.scale, jobs[j].out + int64_t(t) * w.rows + rb);
    };
    if (n <= CHUNKED_MAX_TOKENS) {
        int64_t first_chunk[4] = {0, 0, 0, 0};  // where each job's chunks start
        for (int j = 0; j < n_jobs; ++j) first_chunk[j + 1] = first_chunk[j] + (jobs[j].w->rows + LINEAR_CHUNK_ROWS - 1) / LINEAR_CHUNK_ROWS;
        c->pool->run_chunks(first_chunk[n_jobs], [&](int, int64_t chunk) {
            int j = 0;
            while (chunk >= first_chunk[j + 1]) ++j;
            const int64_t rb = (chunk - first_chunk[j]) * LINEAR_CHUNK_ROWS;
            run_rows(j, rb, std::min<int64_t>(rb + LINEAR_CHUNK_ROWS, jobs[j].w->rows));
        });
        return;
    }
    c->pool->run([&](int ti, int nt) {
        int64_t begin, end;  // this thread's share of all jobs' rows, in whole row tiles
        split_range(first_row[n_jobs], TILE_ROWS, ti, nt, &begin, &end);
        for (int j = 0; j < n_jobs; ++j) {
            const int64_t rb = std::max<int64_t>(begin - first_row[j], 0), re = std::min<int64_t>(end - first_row[j], jobs[j].w->rows);
            if (rb < re) run_rows(j, rb, re);
        }
    });
}

ryz_status ensure_seq(ryz_context *c, int32_t seq) {
    KVSeq &s = c->seqs[seq];
    if (s.keys.get()) return RYZ_OK;
    const ryz_hparams &hp = c->model->hp;
    const size_t bytes = size_t(hp.layers) * hp.kv_heads * c->max_positions * kv_row_bytes(c);
    // Not zeroed: attention reads only positions already written. Zeroing touched every page of the
    // slot's capacity (315 MB for 2B4T at 4096 positions), ~0.1 s on the engine thread per new request,
    // and made all of it resident; untouched, the pages come in as positions are written.
    if (!s.keys.allocate(bytes, false) || !s.values.allocate(bytes, false)) return fail(RYZ_ERR_OUT_OF_MEMORY, "out of memory for the KV cache");
    return RYZ_OK;
}

void grow_scratch(ryz_context *c, int32_t n) {
    if (n <= c->capacity) return;
    const ryz_hparams &hp = c->model->hp;
    const int64_t q_dim = int64_t(hp.heads) * hp.head_dim, kv_dim = int64_t(hp.kv_heads) * hp.head_dim;
    const int64_t widest = std::max<int64_t>({hp.hidden, q_dim, hp.ffn});
    const int64_t all_rows = q_dim + 2 * kv_dim + 2 * int64_t(hp.ffn) + hp.hidden;
    c->x.resize(size_t(n) * hp.hidden);
    c->xb.resize(size_t(n) * widest);
    c->q.resize(size_t(n) * q_dim);
    c->k.resize(size_t(n) * kv_dim);
    c->v.resize(size_t(n) * kv_dim);
    c->att.resize(size_t(n) * q_dim);
    c->gate.resize(size_t(n) * hp.ffn);
    c->up.resize(size_t(n) * hp.ffn);
    c->act.resize(size_t(n) * widest);
    c->act_scale.resize(n);
    c->act_sum.resize(n);
    c->acc.resize(size_t(n) * all_rows);
    c->positions.resize(n);
    c->head_in.resize(size_t(n) * hp.hidden);
    c->capacity = n;
}

void attention(ryz_context *c, int layer, int32_t n, const int32_t *seq_ids) {
    const ryz_hparams &hp = c->model->hp;
    const int32_t d = hp.head_dim, group = hp.heads / hp.kv_heads;
    const int64_t q_dim = int64_t(hp.heads) * d;
    const float sqrt_d = std::sqrt(static_cast<float>(d));
    const auto kv_dot = kv_dot_kernel(), kv_axpy = kv_axpy_kernel();
    const auto softmax = softmax_kernel();
    // GQA with a family that has the multi-query kernels: an item is one KV head for a block of consecutive tokens of
    // one sequence, and all the group's query heads of the block's tokens (up to 16 queries) share every K/V row
    // load, which the per-head loop below repeats for each query. Items go round robin to the threads (a causal
    // prefill's later blocks attend to more positions). Too few items to share (a decode of one or two sequences)
    // keep the per-head split. Each query's result is the same bits either way (kernels.h).
    const int32_t block = std::max(1, 16 / group);
    std::vector<int32_t> starts;  // the blocks' first tokens, then n
    for (int32_t t = 0; t < n;) {
        starts.push_back(t);
        const int32_t first = t;
        for (++t; t < n && t - first < block && seq_ids[t] == seq_ids[first]; ++t) {
        }
    }
    starts.push_back(n);
    const int64_t items = int64_t(starts.size() - 1) * hp.kv_heads;
    if (kernels().kv_dot_multi && kernels().kv_axpy_multi && items >= 4 * c->pool->size()) {
        const int32_t max_q = block * group;
        c->pool->run([&](int ti, int nt) {
            std::vector<float> &scores = c->scores[ti];
            const size_t per_query = size_t(c->max_positions);
            if (scores.size() < per_query * max_q) scores.resize(per_query * max_q);  // once per thread
            std::vector<const float *> qs(max_q);
            std::vector<float *> sc(max_q), outs(max_q);
            std::vector<int32_t> n_pos(max_q);
            for (int64_t item = ti; item < items; item += nt) {
                const int32_t b = static_cast<int32_t>(item / hp.kv_heads), kvh = static_cast<int32_t>(item % hp.kv_heads);
                const KVSeq &s = c->seqs[seq_ids[starts[b]]];
                const size_t head_off = kv_head_offset(c, layer, kvh);
                int32_t nq = 0, n_max = 0;
                for (int32_t t = starts[b]; t < starts[b + 1]; ++t)
                    for (int32_t h = kvh * group; h < (kvh + 1) * group; ++h, ++nq) {
                        qs[nq] = c->q.data() + int64_t(t) * q_dim + int64_t(h) * d;
                        outs[nq] = c->att.data() + int64_t(t) * q_dim + int64_t(h) * d;
                        sc[nq] = scores.data() + per_query * nq;
                        n_pos[nq] = c->positions[t] + 1;  // causal: positions 0..pos
                        n_max = std::max(n_max, n_pos[nq]);
                    }
                // every query's scores over the block's positions (those past a query's own are not read)
                kv_dot_multi(qs.data(), nq, s.keys.get() + head_off, c->kv_type, d, n_max, d, sc.data());
                for (int32_t j = 0; j < nq; ++j) softmax(sc[j], n_pos[j], sqrt_d);
                kv_axpy_multi(sc.data(), nq, n_pos.data(), s.values.get() + head_off, c->kv_type, d, d, outs.data());
            }
        });
        return;
    }
    // Each thread takes its share of every token's heads (contiguous heads: neighbours share a KV head),
    // not a contiguous range of tokens: a causal prefill's later tokens attend to more positions, and
    // splitting by tokens left the first of 2 threads a quarter of the work. An item's result does not
    // depend on the thread that computes it.
    c->pool->run([&](int ti, int nt) {
        std::vector<float> &scores = c->scores[ti];
        int64_t hb, he;
        split_range(hp.heads, 1, ti, nt, &hb, &he);
        for (int32_t t = 0; t < n; ++t) {
            for (int32_t h = static_cast<int32_t>(hb); h < he; ++h) {
                const int32_t n_pos = c->positions[t] + 1, kvh = h / group;  // causal: positions 0..pos
                const KVSeq &s = c->seqs[seq_ids[t]];
                const size_t head_off = kv_head_offset(c, layer, kvh);
                kv_dot(c->q.data() + int64_t(t) * q_dim + int64_t(h) * d, s.keys.get() + head_off, c->kv_type, d, n_pos, d, scores.data());
                softmax(scores.data(), n_pos, sqrt_d);  // scores / sqrt_d, exp(- max) in double, / pairwise sum
                kv_axpy(scores.data(), s.values.get() + head_off, c->kv_type, d, n_pos, d, c->att.data() + int64_t(t) * q_dim + int64_t(h) * d);
            }
        }
    });
}

// Per-token work (norms, element-wise ops) split across threads by token.
template <typename Fn>
void per_token(ryz_context *c, int32_t n, Fn fn) {
    if (n == 1) {  // decode: not worth a barrier
        fn(0);
        return;
    }
    c->pool->run([&](int ti, int nt) {
        int64_t b, e;
        split_range(n, 1, ti, nt, &b, &e);
        for (int64_t t = b; t < e; ++t) fn(static_cast<int32_t>(t));
    });
}

}  // namespace

}  // namespace ryz

using namespace ryz;

extern "C" {

ryz_status ryz_context_new(ryz_model *m, int32_t n_threads, int32_t max_seqs, int32_t max_positions, int32_t kv_type,
                           ryz_context **out) {
    if (!m || !out) return fail(RYZ_ERR_INVALID_ARGUMENT, "null argument");
    if (!m->finalized) return fail(RYZ_ERR_STATE, "finalize the model before creating a context");
    if (n_threads < 1 || max_seqs < 1 || max_positions < 1 || (kv_type != RYZ_KV_F32 && kv_type != RYZ_KV_F16))
        return fail(RYZ_ERR_INVALID_ARGUMENT, "n_threads, max_seqs and max_positions must be >= 1 and kv_type F32 or F16");
    // Sizes come from a file's context_length: a failed allocation is a status, never an exception across the ABI.
    return guarded([&]() -> ryz_status {
        auto c = std::make_unique<ryz_context>();
        c->model = m;
        c->pool = shared_thread_pool(n_threads);
        c->max_seqs = max_seqs;
        c->max_positions = max_positions;
        c->kv_type = kv_type;
        c->seqs.resize(max_seqs);
        const ryz_hparams &hp = m->hp;
        const int32_t half = hp.head_dim / 2;
        c->rope_cos.resize(size_t(max_positions) * half);
        c->rope_sin.resize(size_t(max_positions) * half);
        for (int32_t i = 0; i < half; ++i) {
            // As the reference: float32 theta^(2i/d), its float32 inverse, times the float32 position.
            const float exponent = static_cast<float>(2 * i) / static_cast<float>(hp.head_dim);
            const float inv_freq = 1.0f / static_cast<float>(std::pow(static_cast<double>(hp.rope_theta), static_cast<double>(exponent)));
            for (int32_t p = 0; p < max_positions; ++p) {
                const float angle = static_cast<float>(p) * inv_freq;
                c->rope_cos[size_t(p) * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
                c->rope_sin[size_t(p) * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
            }
        }
        // After the RoPE tables (head_dim floats per position, against n_threads here): an impossible context fails on them at once
        // instead of first zero-filling n_threads x max_positions floats (16 GB and 25-48 s at 2^31 positions).
        c->scores.assign(n_threads, std::vector<float>(max_positions));
        *out = c.release();
        return RYZ_OK;
    });
}

void ryz_context_free(ryz_context *c) { delete c; }

ryz_status ryz_context_set_tuning(ryz_context *c, const ryz_tuning *t) {
    if (!c || !t) return fail(RYZ_ERR_INVALID_ARGUMENT, "null argument");
    c->tuning.gemm_token_tile = t->gemm_token_tile > 0 ? t->gemm_token_tile : 0;
    c->tuning.rows_per_task = t->rows_per_task;
    return RYZ_OK;
}

int32_t ryz_seq_length(const ryz_context *c, int32_t seq) {
    return (c && seq >= 0 && seq < c->max_seqs) ? c->seqs[seq].length : -1;
}

ryz_status ryz_seq_truncate(ryz_context *c, int32_t seq, int32_t length) {
    if (!c || seq < 0 || seq >= c->max_seqs) return fail(RYZ_ERR_INVALID_ARGUMENT, "sequence id out of range");
    if (length < 0 || length > c->seqs[seq].length) return fail(RYZ_ERR_INVALID_ARGUMENT, "can only truncate to a length <= the current one");
    c->seqs[seq].length = length;
    return RYZ_OK;
}

ryz_status ryz_seq_copy(ryz_context *c, int32_t src, int32_t dst, int32_t length) {
    if (!c || src < 0 || dst < 0 || src >= c->max_seqs || dst >= c->max_seqs || src == dst)
        return fail(RYZ_ERR_INVALID_ARGUMENT, "sequence ids out of range or equal");
    if (length < 0 || length > c->seqs[src].length) return fail(RYZ_ERR_INVALID_ARGUMENT, "copy length exceeds the source sequence");
    if (ryz_status st = ensure_seq(c, dst)) return st;
    const ryz_hparams &hp = c->model->hp;
    const size_t row = kv_row_bytes(c);
    for (int32_t l = 0; l < hp.layers; ++l)
        for (int32_t h = 0; h < hp.kv_heads; ++h) {
            const size_t off = kv_head_offset(c, l, h);
            std::memcpy(c->seqs[dst].keys.get() + off, c->seqs[src].keys.get() + off, size_t(length) * row);
            std::memcpy(c->seqs[dst].values.get() + off, c->seqs[src].values.get() + off, size_t(length) * row);
        }
    c->seqs[dst].length = length;
    return RYZ_OK;
}

ryz_status ryz_seq_release(ryz_context *c, int32_t seq) {
    if (!c || seq < 0 || seq >= c->max_seqs) return fail(RYZ_ERR_INVALID_ARGUMENT, "sequence id out of range");
    c->seqs[seq] = ryz::KVSeq{};
    return RYZ_OK;
}

int64_t ryz_context_kv_bytes(const ryz_context *c) {
    if (!c) return 0;
    int64_t total = 0;
    for (const auto &s : c->seqs) total += static_cast<int64_t>(s.keys.size + s.values.size);
    return total;
}

ryz_status ryz_forward(ryz_context *c, int32_t n, const int32_t *tokens, const int32_t *seq_ids, const uint8_t *want_logits,
                       float *logits) {
    if (!c || !tokens || !seq_ids || !logits || n < 1) return fail(RYZ_ERR_INVALID_ARGUMENT, "null argument or empty batch");
    const auto forward_start = std::chrono::steady_clock::now();
    const double ternary_before = c->part_seconds[RYZ_PART_TERNARY], attention_before = c->part_seconds[RYZ_PART_ATTENTION];
    const ryz_model *m = c->model;
    const ryz_hparams &hp = m->hp;
    // n comes from the caller: a batch too large for memory is a status, not an exception across the ABI. A failed
    // resize leaves the buffers and capacity as they were (std::vector's strong guarantee).
    if (ryz_status st = guarded([&] { grow_scratch(c, n); return RYZ_OK; })) return st;
    // Validate everything before touching any state: ids, sequences, capacity; assign positions.
    std::vector<int32_t> lengths(c->max_seqs);
    for (int32_t s = 0; s < c->max_seqs; ++s) lengths[s] = c->seqs[s].length;
    for (int32_t t = 0; t < n; ++t) {
        if (tokens[t] < 0 || tokens[t] >= hp.vocab)
            return fail(RYZ_ERR_INVALID_ARGUMENT, "token id " + std::to_string(tokens[t]) + " out of range [0, " + std::to_string(hp.vocab) + ")");
        if (seq_ids[t] < 0 || seq_ids[t] >= c->max_seqs) return fail(RYZ_ERR_INVALID_ARGUMENT, "sequence id out of range");
        if (lengths[seq_ids[t]] >= c->max_positions)
            return fail(RYZ_ERR_CAPACITY, "sequence " + std::to_string(seq_ids[t]) + " is full (" + std::to_string(c->max_positions) + " positions)");
        c->positions[t] = lengths[seq_ids[t]]++;
    }
    for (int32_t t = 0; t < n; ++t)
        if (ryz_status st = ensure_seq(c, seq_ids[t])) return st;

    const int64_t q_dim = int64_t(hp.heads) * hp.head_dim, kv_dim = int64_t(hp.kv_heads) * hp.head_dim;
    const Kernels &kern = kernels();
    // Norms, RoPE, KV stores, the activation and residuals run in the family's element-wise kernels: this file is
    // built for the baseline ISA (kernels.h has their bit-exact contracts).
    const Elementwise ew = elementwise_kernels();
    const int32_t half = hp.head_dim / 2;
    float *x = c->x.data();

    // Each per-token step ends with the next linear's input (linear_input).
    per_token(c, n, [&](int32_t t) {
        float *xt = x + int64_t(t) * hp.hidden;
        dequantize_row(m->token_embd.data, m->token_embd.type, tokens[t], hp.hidden, xt);
        linear_input(c, ew, t, xt, m->layers[0].attn_norm, hp.hidden);
    });

    for (int32_t l = 0; l < hp.layers; ++l) {
        const Layer &layer = m->layers[l];
        // Attention block.
        const LinearJob qkv[3] = {{&layer.linear[Q], c->q.data()}, {&layer.linear[K], c->k.data()}, {&layer.linear[V], c->v.data()}};
        timed(c, RYZ_PART_TERNARY, [&] { bit_linears(c, qkv, 3, n); });
        per_token(c, n, [&](int32_t t) {
            float *qt = c->q.data() + int64_t(t) * q_dim, *kt = c->k.data() + int64_t(t) * kv_dim, *vt = c->v.data() + int64_t(t) * kv_dim;
            const float *cs = c->rope_cos.data() + int64_t(c->positions[t]) * half, *sn = c->rope_sin.data() + int64_t(c->positions[t]) * half;
            ew.rope(qt, hp.heads, hp.head_dim, cs, sn);
            ew.rope(kt, hp.kv_heads, hp.head_dim, cs, sn);
            KVSeq &s = c->seqs[seq_ids[t]];
            for (int32_t h = 0; h < hp.kv_heads; ++h) {
                const size_t at = kv_head_offset(c, l, h) + size_t(c->positions[t]) * kv_row_bytes(c);
                ew.kv_store(kt + int64_t(h) * hp.head_dim, hp.head_dim, c->kv_type, s.keys.get() + at);
                ew.kv_store(vt + int64_t(h) * hp.head_dim, hp.head_dim, c->kv_type, s.values.get() + at);
            }
        });
        timed(c, RYZ_PART_ATTENTION, [&] { attention(c, l, n, seq_ids); });
        per_token(c, n, [&](int32_t t) { linear_input(c, ew, t, c->att.data() + int64_t(t) * q_dim, layer.attn_sub_norm, q_dim); });
        const LinearJob o[1] = {{&layer.linear[O], c->gate.data()}};  // gate buffer as scratch
        timed(c, RYZ_PART_TERNARY, [&] { bit_linears(c, o, 1, n); });
        per_token(c, n, [&](int32_t t) {
            float *xt = x + int64_t(t) * hp.hidden;
            ew.add(xt, c->gate.data() + int64_t(t) * hp.hidden, hp.hidden);
            linear_input(c, ew, t, xt, layer.ffn_norm, hp.hidden);
        });
        // Feed-forward block.
        const LinearJob gate_up[2] = {{&layer.linear[GATE], c->gate.data()}, {&layer.linear[UP], c->up.data()}};
        timed(c, RYZ_PART_TERNARY, [&] { bit_linears(c, gate_up, 2, n); });
        per_token(c, n, [&](int32_t t) {
            float *g = c->gate.data() + int64_t(t) * hp.ffn;
            ew.ffn_act_mul(g, c->up.data() + int64_t(t) * hp.ffn, hp.ffn, hp.ffn_act);  // relu^2 or SiLU, exp in double as the reference
            linear_input(c, ew, t, g, layer.ffn_sub_norm, hp.ffn);
        });
        const LinearJob down[1] = {{&layer.linear[DOWN], c->up.data()}};
        timed(c, RYZ_PART_TERNARY, [&] { bit_linears(c, down, 1, n); });
        const bool last = l + 1 == hp.layers;
        per_token(c, n, [&](int32_t t) {
            float *xt = x + int64_t(t) * hp.hidden;
            ew.add(xt, c->up.data() + int64_t(t) * hp.hidden, hp.hidden);
            if (!last) linear_input(c, ew, t, xt, m->layers[l + 1].attn_norm, hp.hidden);  // the head's norm is its own
        });
    }

    // Head: only the tokens whose logits are wanted.
    const auto head_start = std::chrono::steady_clock::now();
    int32_t n_out = 0;
    for (int32_t t = 0; t < n; ++t) {
        if (want_logits ? want_logits[t] != 0 : t == n - 1) {
            ew.rms_norm(x + int64_t(t) * hp.hidden, m->output_norm, hp.hidden, hp.rms_eps, c->head_in.data() + int64_t(n_out) * hp.hidden);
            ++n_out;
        }
    }
    if (n_out > 0) {
        // In chunks as the linears (a row's logit does not depend on the rows computed with it), each
        // a few MB, so prefetching past a chunk's end wastes well under 1 % of the reads.
        constexpr int64_t HEAD_CHUNK_ROWS = 2048;
        c->pool->run_chunks((hp.vocab + HEAD_CHUNK_ROWS - 1) / HEAD_CHUNK_ROWS, [&](int, int64_t chunk) {
            const int64_t b = chunk * HEAD_CHUNK_ROWS, e = std::min<int64_t>(b + HEAD_CHUNK_ROWS, hp.vocab);
            kern.dense_gemm(m->output.data, m->output.type, b, e, hp.hidden, c->head_in.data(), n_out, logits, hp.vocab);
        });
    }
    for (int32_t t = 0; t < n; ++t) c->seqs[seq_ids[t]].length = c->positions[t] + 1;
    if (c->profiling) {  // "other" is the rest of the call, so the parts add up to the forward's wall time
        const auto end = std::chrono::steady_clock::now();
        const double head = std::chrono::duration<double>(end - head_start).count();
        const double total = std::chrono::duration<double>(end - forward_start).count();
        const double parts = (c->part_seconds[RYZ_PART_TERNARY] - ternary_before) +
                             (c->part_seconds[RYZ_PART_ATTENTION] - attention_before) + head;
        c->part_seconds[RYZ_PART_HEAD] += head;
        c->part_seconds[RYZ_PART_OTHER] += std::max(0.0, total - parts);
        ++c->profiled_calls;
    }
    return RYZ_OK;
}

ryz_status ryz_context_set_profiling(ryz_context *c, int32_t on) {
    if (!c) return fail(RYZ_ERR_INVALID_ARGUMENT, "null context");
    c->profiling = on != 0;
    std::fill(std::begin(c->part_seconds), std::end(c->part_seconds), 0.0);
    c->profiled_calls = 0;
    return RYZ_OK;
}

ryz_status ryz_context_profile(const ryz_context *c, double *seconds, int64_t *calls) {
    if (!c || !seconds || !calls) return fail(RYZ_ERR_INVALID_ARGUMENT, "null argument");
    std::copy(std::begin(c->part_seconds), std::end(c->part_seconds), seconds);
    *calls = c->profiled_calls;
    return RYZ_OK;
}

}  // extern "C"

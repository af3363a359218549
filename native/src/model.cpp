// Model: tensors registered by GGUF name with their byte length (checked against type and shape, so nothing
// here reads past a caller's buffer), checked against the hyperparameters, ternary weights repacked into the
// kernels' layouts (blocks.h: TQ2_0 into T2P, TQ1_0 into T1P); everything else read in place.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <thread>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "internal.h"

namespace ryz {

bool AlignedBuffer::allocate(size_t bytes, bool zero, bool huge_pages) {
    constexpr size_t HUGE_PAGE = size_t(2) << 20;
    const size_t align = huge_pages ? HUGE_PAGE : 64;
    const size_t rounded = bytes ? (bytes + align - 1) / align * align : align;
    void *p = std::aligned_alloc(align, rounded);
    if (!p) return false;
#ifdef MADV_HUGEPAGE
    if (huge_pages) madvise(p, rounded, MADV_HUGEPAGE);  // advice: THP off or unavailable leaves 4 KB pages
#endif
    if (zero) std::memset(p, 0, rounded);
    data.reset(static_cast<uint8_t *>(p));
    size = bytes;
    return true;
}

namespace {

const char *const LINEAR_STEMS[N_LINEARS] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};

// TQ2_0 block -> one T2P 64-byte block (codes+1 unchanged, only their positions move).
// TQ2_0 keeps column c*128 + l*32 + m in byte c*32 + m, bits 2l; T2P keeps column 64L + j in byte j,
// bits 2L. So T2P byte j < 32 gathers columns j, 64+j, 128+j, 192+j = (c0,l0), (c0,l2), (c1,l0), (c1,l2)
// of source bytes j and 32+j; byte 32+j gathers planes l1 and l3 of the same two source bytes.
inline void tq2_to_t2p(const uint8_t *qs, uint8_t *dst) {
    for (int j = 0; j < 32; ++j) {
        const uint8_t a = qs[j], b = qs[32 + j];
        dst[j] = static_cast<uint8_t>((a & 3) | ((a >> 4 & 3) << 2) | ((b & 3) << 4) | ((b >> 4 & 3) << 6));
        dst[32 + j] = static_cast<uint8_t>((a >> 2 & 3) | ((a >> 6 & 3) << 2) | ((b >> 2 & 3) << 4) | ((b >> 6 & 3) << 6));
    }
}

// TQ1_0 block -> 256 codes+1 in column order: qs[0..32) carry columns 32n + m (digit n of byte m),
// qs[32..48) columns 160 + 16n + m, qh columns 240 + 4n + m. Digit n of a byte q is the top base-3
// digit of q * 3^n (mod 256), read as (q * 3^n mod 256) * 3 >> 8 (the bytes are stored pre-scaled).
inline void tq1_codes(const block_tq1_0 &blk, uint8_t *codes) {
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    auto digit = [](uint8_t q, uint8_t p) { return static_cast<uint8_t>((static_cast<uint16_t>(static_cast<uint8_t>(q * p)) * 3) >> 8); };
    for (int n = 0; n < 5; ++n)
        for (int m = 0; m < 32; ++m) codes[32 * n + m] = digit(blk.qs[m], pow3[n]);
    for (int n = 0; n < 5; ++n)
        for (int m = 0; m < 16; ++m) codes[160 + 16 * n + m] = digit(blk.qs[32 + m], pow3[n]);
    for (int n = 0; n < 4; ++n)
        for (int m = 0; m < 4; ++m) codes[240 + 4 * n + m] = digit(blk.qh[m], pow3[n]);
}

inline void codes_to_t2p(const uint8_t *codes, uint8_t *dst) {
    for (int j = 0; j < 64; ++j)
        dst[j] = static_cast<uint8_t>(codes[j] | codes[64 + j] << 2 | codes[128 + j] << 4 | codes[192 + j] << 6);
}

// Block scales: ours are exactly 1.0. Files from other converters (llama.cpp's) store the tensor scale
// in every block instead; accept that when all non-zero blocks agree, folding it into the tensor scale.
// A zero block scale means an all-zero block whatever its codes say, so its codes become 0 (stored 1).
ryz_status block_scale(const uint8_t *src, int32_t type, int64_t n_blocks, float *common) {
    const size_t stride = type == RYZ_TYPE_TQ2_0 ? sizeof(block_tq2_0) : sizeof(block_tq1_0);
    const size_t offset = type == RYZ_TYPE_TQ2_0 ? offsetof(block_tq2_0, d) : offsetof(block_tq1_0, d);
    fp16_t found = 0;
    for (int64_t i = 0; i < n_blocks; ++i) {
        fp16_t d;
        std::memcpy(&d, src + i * stride + offset, sizeof d);
        if ((d & 0x7FFF) == 0) continue;
        if (found == 0) found = d;
        if (d != found) {
            return fail(RYZ_ERR_UNSUPPORTED, "ternary tensor has differing block scales; only per-tensor scales "
                                             "(Ryzanstein's block scale 1, or one shared value) are supported");
        }
    }
    *common = found == 0 ? 1.0f : fp16_to_fp32(found);
    return RYZ_OK;
}

ryz_status pack_rows(const uint8_t *src, int32_t type, int64_t row_begin, int64_t row_end, int64_t cols, uint8_t *dst) {
    const int64_t blocks = cols / QK_K;
    uint8_t codes[QK_K];
    for (int64_t r = row_begin; r < row_end; ++r) {
        const int64_t tile = r / TILE_ROWS, in_tile = r % TILE_ROWS;
        for (int64_t b = 0; b < blocks; ++b) {
            uint8_t *out = dst + ((tile * blocks + b) * TILE_ROWS + in_tile) * T2P_BLOCK_BYTES;
            if (type == RYZ_TYPE_TQ2_0) {
                const block_tq2_0 &blk = reinterpret_cast<const block_tq2_0 *>(src)[r * blocks + b];
                if ((blk.d & 0x7FFF) == 0) { std::memset(out, 0x55, T2P_BLOCK_BYTES); continue; }  // all codes 0
                tq2_to_t2p(blk.qs, out);
            } else {
                const block_tq1_0 &blk = reinterpret_cast<const block_tq1_0 *>(src)[r * blocks + b];
                if ((blk.d & 0x7FFF) == 0) { std::memset(out, 0x55, T2P_BLOCK_BYTES); continue; }
                tq1_codes(blk, codes);
                codes_to_t2p(codes, out);
            }
        }
    }
    return RYZ_OK;
}

// T1P (blocks.h) from TQ1_0: the same codes+1 as the T2P repack, five to a byte; padding columns 1.
// An all-zero-scale block becomes codes 1 (weight 0), as in pack_rows.
void pack_rows_t1p(const uint8_t *src, int64_t row_begin, int64_t row_end, int64_t cols, uint8_t *dst) {
    const int64_t blocks = cols / QK_K, nv = t1p_vectors(cols);
    std::vector<uint8_t> codes(static_cast<size_t>(nv * T1P_VECTOR_COLS));
    for (int64_t r = row_begin; r < row_end; ++r) {
        std::fill(codes.begin(), codes.end(), uint8_t(1));
        for (int64_t b = 0; b < blocks; ++b) {
            const block_tq1_0 &blk = reinterpret_cast<const block_tq1_0 *>(src)[r * blocks + b];
            if ((blk.d & 0x7FFF) != 0) tq1_codes(blk, codes.data() + b * QK_K);
        }
        uint8_t *out = dst + (r / TILE_ROWS) * nv * T1P_VECTOR_BYTES + (r % TILE_ROWS) * 16;
        for (int64_t i = 0; i < nv; ++i)
            for (int m = 0; m < 16; ++m) {
                const uint8_t *c = codes.data() + i * T1P_VECTOR_COLS + m;
                const uint8_t d[5] = {c[0], c[16], c[32], c[48], c[64]};
                out[i * T1P_VECTOR_BYTES + m] = t1p_encode(d);
            }
    }
}

ryz_status check_ternary_shape(int32_t type, int64_t rows, int64_t cols) {
    if (type != RYZ_TYPE_TQ2_0 && type != RYZ_TYPE_TQ1_0)
        return fail(RYZ_ERR_UNSUPPORTED, "ternary weights must be TQ2_0 or TQ1_0, got GGML type " + std::to_string(type));
    if (cols <= 0 || cols % QK_K)
        return fail(RYZ_ERR_INVALID_ARGUMENT, "ternary row length " + std::to_string(cols) + " is not a multiple of 256");
    if (rows <= 0 || rows % TILE_ROWS)
        return fail(RYZ_ERR_INVALID_ARGUMENT, "ternary row count " + std::to_string(rows) + " is not a multiple of 4");
    return RYZ_OK;
}

// The layout a ternary source type is repacked into: TQ1_0 keeps its 1.6 bits (T1P), TQ2_0 becomes T2P.
int32_t layout_for(int32_t type) { return type == RYZ_TYPE_TQ1_0 ? LAYOUT_T1P : LAYOUT_T2P; }

size_t layout_bytes(int32_t layout, int64_t rows, int64_t cols) {
    return layout == LAYOUT_T1P ? t1p_bytes(rows, cols) : t2p_bytes(rows, cols);
}

void pack_layout_rows(const uint8_t *src, int32_t type, int32_t layout, int64_t begin, int64_t end, int64_t cols, uint8_t *dst) {
    if (layout == LAYOUT_T1P) pack_rows_t1p(src, begin, end, cols, dst);
    else pack_rows(src, type, begin, end, cols, dst);
}

ryz_status pack_parallel(const void *src, int32_t type, int32_t layout, int64_t rows, int64_t cols, uint8_t *dst, int n_threads) {
    if (n_threads <= 1 || rows < 64) {
        pack_layout_rows(static_cast<const uint8_t *>(src), type, layout, 0, rows, cols, dst);
        return RYZ_OK;
    }
    std::vector<std::thread> threads;
    for (int i = 0; i < n_threads; ++i) {
        threads.emplace_back([=] {
            const int64_t per = (rows / TILE_ROWS + n_threads - 1) / n_threads * TILE_ROWS;
            const int64_t begin = i * per, end = std::min(rows, begin + per);
            if (begin < end) pack_layout_rows(static_cast<const uint8_t *>(src), type, layout, begin, end, cols, dst);
        });
    }
    for (auto &t : threads) t.join();
    return RYZ_OK;
}

// The bytes a tensor of `type` with rows x cols (numpy order) takes, or a failing status: a type this engine does not
// read, a non-positive size, a partial block, or a size that overflows. rows x row bytes is checked by division
// before it is multiplied, so no product wraps: a crafted shape cannot make a small buffer look big enough.
ryz_status stored_bytes(int32_t type, int64_t rows, int64_t cols, size_t *out) {
    struct Layout { int32_t type; int64_t block, block_bytes; };
    static const Layout layouts[] = {
        {RYZ_TYPE_F32, 1, 4},
        {RYZ_TYPE_F16, 1, 2},
        {RYZ_TYPE_Q8_0, QK8_0, sizeof(block_q8_0)},
        {RYZ_TYPE_Q6_K, QK_K, sizeof(block_q6_k)},
        {RYZ_TYPE_TQ1_0, QK_K, sizeof(block_tq1_0)},
        {RYZ_TYPE_TQ2_0, QK_K, sizeof(block_tq2_0)},
    };
    const Layout *layout = nullptr;
    for (const Layout &l : layouts)
        if (l.type == type) layout = &l;
    if (!layout) return fail(RYZ_ERR_UNSUPPORTED, "GGML type " + std::to_string(type) + " is not one this engine reads");
    if (rows <= 0 || cols <= 0) return fail(RYZ_ERR_INVALID_ARGUMENT, "rows and cols must be positive");
    if (cols % layout->block) {
        return fail(RYZ_ERR_INVALID_ARGUMENT,
                    "rows of " + std::to_string(cols) + " values are not whole blocks of " + std::to_string(layout->block));
    }
    const int64_t blocks = cols / layout->block;
    if (blocks > INT64_MAX / layout->block_bytes || blocks * layout->block_bytes > INT64_MAX / rows)
        return fail(RYZ_ERR_INVALID_ARGUMENT, std::to_string(rows) + "x" + std::to_string(cols) + " values overflow a 64-bit size");
    *out = static_cast<size_t>(blocks * layout->block_bytes * rows);
    return RYZ_OK;
}

const Source *find(const ryz_model *m, const std::string &name) {
    for (const auto &entry : m->sources)
        if (entry.first == name) return &entry.second;
    return nullptr;
}

ryz_status require(const ryz_model *m, const std::string &name, int64_t rows, int64_t cols, const Source **out) {
    const Source *s = find(m, name);
    if (!s) return fail(RYZ_ERR_INVALID_ARGUMENT, "tensor '" + name + "' was not registered");
    if (s->rows != rows || s->cols != cols) {
        return fail(RYZ_ERR_INVALID_ARGUMENT, "tensor '" + name + "' is " + std::to_string(s->rows) + "x" + std::to_string(s->cols) +
                                                  ", expected " + std::to_string(rows) + "x" + std::to_string(cols));
    }
    *out = s;
    return RYZ_OK;
}

ryz_status require_f32(const ryz_model *m, const std::string &name, int64_t n, const float **out) {
    const Source *s;
    if (ryz_status st = require(m, name, 1, n, &s)) return st;
    if (s->type != RYZ_TYPE_F32) return fail(RYZ_ERR_UNSUPPORTED, "norm '" + name + "' must be F32");
    *out = static_cast<const float *>(s->data);
    return RYZ_OK;
}

ryz_status require_dense(const ryz_model *m, const std::string &name, int64_t rows, int64_t cols, DenseTensor *out) {
    const Source *s;
    if (ryz_status st = require(m, name, rows, cols, &s)) return st;
    if (row_bytes(s->type, cols) == 0 || (s->type == RYZ_TYPE_Q8_0 && cols % QK8_0) || (s->type == RYZ_TYPE_Q6_K && cols % QK_K))
        return fail(RYZ_ERR_UNSUPPORTED, "embedding/head '" + name + "' must be F32, F16, Q8_0 or Q6_K with whole blocks");
    *out = DenseTensor{s->data, s->type, rows, cols};
    return RYZ_OK;
}

// Checks every tensor against the hyperparameters and repacks the ternary weights (ryz_model_finalize's body).
ryz_status finalize_model(ryz_model *m, int32_t n_threads) {
    const ryz_hparams &hp = m->hp;
    // Each layer registers at least its two norms and seven linears, so a block count beyond what was registered is
    // refused before anything is sized by it (a crafted count would otherwise size the layer table).
    if (static_cast<size_t>(hp.layers) > m->sources.size() / (2 + N_LINEARS)) {
        return fail(RYZ_ERR_INVALID_ARGUMENT, std::to_string(hp.layers) + " layers need at least " + std::to_string(2 + N_LINEARS) +
                                                  " tensors each; " + std::to_string(m->sources.size()) + " are registered");
    }
    m->layers.resize(hp.layers);
    // Packing threads: no more than the CPU has (a thread that fails to start would throw with others running).
    const int threads = std::max(1, std::min<int>(n_threads, static_cast<int>(std::max(1u, std::thread::hardware_concurrency()))));
    const int64_t q_dim = int64_t(hp.heads) * hp.head_dim, kv_dim = int64_t(hp.kv_heads) * hp.head_dim;
    if (ryz_status st = require_dense(m, "token_embd.weight", hp.vocab, hp.hidden, &m->token_embd)) return st;
    if (hp.tied) {
        m->output = m->token_embd;
    } else if (ryz_status st = require_dense(m, "output.weight", hp.vocab, hp.hidden, &m->output)) {
        return st;
    }
    if (ryz_status st = require_f32(m, "output_norm.weight", hp.hidden, &m->output_norm)) return st;
    const int64_t shapes[N_LINEARS][2] = {{q_dim, hp.hidden}, {kv_dim, hp.hidden}, {kv_dim, hp.hidden}, {hp.hidden, q_dim},
                                          {hp.ffn, hp.hidden},  {hp.ffn, hp.hidden},  {hp.hidden, hp.ffn}};
    const auto started = std::chrono::steady_clock::now();
    // Checked and sized first, then packed into one buffer (huge pages without a partly used page per linear).
    struct Placement {
        const Source *src;
        size_t offset;  // in m->ternary_weights, 64-byte aligned
    };
    std::vector<Placement> placements;
    size_t total = 0;
    for (int i = 0; i < hp.layers; ++i) {
        Layer &layer = m->layers[i];
        const std::string p = "blk." + std::to_string(i) + ".";
        if (ryz_status st = require_f32(m, p + "attn_norm.weight", hp.hidden, &layer.attn_norm)) return st;
        if (ryz_status st = require_f32(m, p + "ffn_norm.weight", hp.hidden, &layer.ffn_norm)) return st;
        if (hp.sub_norms) {
            if (ryz_status st = require_f32(m, p + "attn_sub_norm.weight", q_dim, &layer.attn_sub_norm)) return st;
            if (ryz_status st = require_f32(m, p + "ffn_sub_norm.weight", hp.ffn, &layer.ffn_sub_norm)) return st;
        }
        for (int s = 0; s < N_LINEARS; ++s) {
            const Source *w;
            const std::string name = p + LINEAR_STEMS[s];
            if (ryz_status st = require(m, name + ".weight", shapes[s][0], shapes[s][1], &w)) return st;
            if (ryz_status st = check_ternary_shape(w->type, w->rows, w->cols)) return fail(st, name + ".weight: " + ryz_last_error());
            float tensor_scale = 1.0f, block = 1.0f;
            if (const Source *scale = find(m, name + ".scale")) {
                // set_tensor checked its bytes against its type and shape, so one F32 value is 4 readable bytes.
                if (scale->type != RYZ_TYPE_F32 || scale->rows != 1 || scale->cols != 1) {
                    return fail(RYZ_ERR_INVALID_ARGUMENT, name + ".scale must be one F32 value, got GGML type " + std::to_string(scale->type) + " " +
                                                              std::to_string(scale->rows) + "x" + std::to_string(scale->cols));
                }
                std::memcpy(&tensor_scale, scale->data, sizeof tensor_scale);
                if (!std::isfinite(tensor_scale)) return fail(RYZ_ERR_INVALID_ARGUMENT, name + ".scale is not a finite number");
            }
            if (ryz_status st = block_scale(static_cast<const uint8_t *>(w->data), w->type, w->rows * (w->cols / QK_K), &block)) return st;
            TernaryLinear &lin = layer.linear[s];
            lin.rows = w->rows;
            lin.cols = w->cols;
            lin.scale = block == 1.0f ? tensor_scale : tensor_scale * block;
            lin.layout = layout_for(w->type);
            const size_t bytes = layout_bytes(lin.layout, w->rows, w->cols);
            placements.push_back({w, total});
            total += (bytes + 63) / 64 * 64;
            m->repacked_bytes += static_cast<int64_t>(bytes);
        }
    }
    // Not zeroed: the packers write every byte of each linear's layout (whole tiles: rows are a multiple of
    // TILE_ROWS), and the up to 63 bytes between two linears are never read. A memset here faulted in the whole
    // buffer on one thread before the packers, on several, wrote it again.
    if (!m->ternary_weights.allocate(total, false, true)) return fail(RYZ_ERR_OUT_OF_MEMORY, "out of memory repacking the ternary weights");
    const Placement *next = placements.data();
    for (Layer &layer : m->layers) {
        for (TernaryLinear &lin : layer.linear) {
            const Placement &at = *next++;
            uint8_t *dst = m->ternary_weights.get() + at.offset;
            lin.packed = dst;
            pack_parallel(at.src->data, at.src->type, lin.layout, lin.rows, lin.cols, dst, threads);
        }
    }
    m->repack_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    m->sources.clear();
    m->finalized = true;
    return RYZ_OK;
}

}  // namespace

}  // namespace ryz

using namespace ryz;

extern "C" {

ryz_status ryz_model_new(const ryz_hparams *hp, ryz_model **out) {
    if (!hp || !out) return fail(RYZ_ERR_INVALID_ARGUMENT, "null argument");
    if (hp->hidden <= 0 || hp->layers <= 0 || hp->heads <= 0 || hp->kv_heads <= 0 || hp->head_dim <= 0 || hp->ffn <= 0 ||
        hp->vocab <= 0 || hp->heads % hp->kv_heads || hp->head_dim % 2 || (hp->ffn_act != RYZ_ACT_SILU && hp->ffn_act != RYZ_ACT_RELU2))
        return fail(RYZ_ERR_INVALID_ARGUMENT, "invalid hyperparameters (sizes must be positive, heads a multiple of kv_heads, head_dim even)");
    auto *m = new (std::nothrow) ryz_model();
    if (!m) return fail(RYZ_ERR_OUT_OF_MEMORY, "out of memory");
    m->hp = *hp;  // the layer table is sized at finalize, against the tensors actually registered
    *out = m;
    return RYZ_OK;
}

ryz_status ryz_model_set_tensor(ryz_model *m, const char *name, const void *data, size_t n_bytes, int32_t type, int64_t rows,
                                int64_t cols) {
    if (!m || !name || !data) return fail(RYZ_ERR_INVALID_ARGUMENT, "null argument");
    if (m->finalized) return fail(RYZ_ERR_STATE, "model is already finalized");
    return guarded([&] {
        const std::string tensor = std::string("tensor '") + name + "'";
        if (find(m, name)) return fail(RYZ_ERR_INVALID_ARGUMENT, tensor + " is registered twice");
        size_t expected = 0;
        if (ryz_status st = stored_bytes(type, rows, cols, &expected)) return fail(st, tensor + ": " + ryz_last_error());
        if (n_bytes != expected) {
            return fail(RYZ_ERR_INVALID_ARGUMENT, tensor + " is given " + std::to_string(n_bytes) + " bytes, but GGML type " +
                                                      std::to_string(type) + " with " + std::to_string(rows) + "x" + std::to_string(cols) +
                                                      " values takes " + std::to_string(expected));
        }
        m->sources.emplace_back(name, Source{data, type, rows, cols});
        return RYZ_OK;
    });
}

ryz_status ryz_model_finalize(ryz_model *m, int32_t n_threads) {
    if (!m) return fail(RYZ_ERR_INVALID_ARGUMENT, "null model");
    if (m->finalized) return RYZ_OK;
    return guarded([&] { return finalize_model(m, n_threads); });
}

double ryz_model_repack_seconds(const ryz_model *m) { return m ? m->repack_seconds : 0.0; }
int64_t ryz_model_repacked_bytes(const ryz_model *m) { return m ? m->repacked_bytes : 0; }
void ryz_model_free(ryz_model *m) { delete m; }

size_t ryz_ternary_packed_bytes(int64_t rows, int64_t cols) { return t2p_bytes(rows, cols); }

ryz_status ryz_ternary_pack(const void *src, int32_t type, int64_t rows, int64_t cols, uint8_t *dst) {
    if (!src || !dst) return fail(RYZ_ERR_INVALID_ARGUMENT, "null argument");
    if (ryz_status st = check_ternary_shape(type, rows, cols)) return st;
    return pack_rows(static_cast<const uint8_t *>(src), type, 0, rows, cols, dst);
}

size_t ryz_ternary_layout_bytes(int32_t layout, int64_t rows, int64_t cols) {
    if ((layout != RYZ_LAYOUT_T2P && layout != RYZ_LAYOUT_T1P) || rows <= 0 || rows % TILE_ROWS || cols <= 0 || cols % QK_K) return 0;
    return layout_bytes(layout, rows, cols);
}

ryz_status ryz_ternary_pack_layout(const void *src, int32_t type, int32_t layout, int64_t rows, int64_t cols, uint8_t *dst,
                                   size_t dst_bytes) {
    if (!src || !dst) return fail(RYZ_ERR_INVALID_ARGUMENT, "null argument");
    if (ryz_status st = check_ternary_shape(type, rows, cols)) return st;
    if (layout != RYZ_LAYOUT_T2P && layout != RYZ_LAYOUT_T1P) return fail(RYZ_ERR_INVALID_ARGUMENT, "unknown layout " + std::to_string(layout));
    // TQ2_0's spare code 3 has no base-3 digit, so only TQ1_0 packs to T1P (as at load).
    if (layout == RYZ_LAYOUT_T1P && type != RYZ_TYPE_TQ1_0) return fail(RYZ_ERR_UNSUPPORTED, "only TQ1_0 packs to the T1P layout");
    if (dst_bytes != layout_bytes(layout, rows, cols))
        return fail(RYZ_ERR_INVALID_ARGUMENT, "destination is " + std::to_string(dst_bytes) + " bytes, the layout takes " +
                                                  std::to_string(layout_bytes(layout, rows, cols)));
    return guarded([&] {
        pack_layout_rows(static_cast<const uint8_t *>(src), type, layout, 0, rows, cols, dst);
        return RYZ_OK;
    });
}

}  // extern "C"

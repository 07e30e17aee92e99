/* The C model step: one step of a Gemma model for R rows in one call, each row a token at
 * its own position of its own slot of a slot KV cache, logits out for the rows that want
 * them (driven by gemmakit/inference/c_decode.py: BatchDecoder for the serving engine, whose
 * every step is one call holding its decoding rows, speculative proposals and prompt chunks
 * of any lengths; CDecoder for one sequence over the torch model's KVCache, its prompt in
 * calls of up to 512 rows, then one row a step, in slot 0).
 *
 * Why a C step: a Gemma 3 270M step is ~2,500 small torch ops (torch.profiler); on a 2-core
 * CPU their dispatch costs more than the arithmetic. Here the whole step runs as plain loops
 * over the same weights and KV cache tensors the torch model uses, with float32
 * activations. Why batched: a decode step is memory-bound on its weights (Gemma 3 270M in
 * float32 reads ~1 GB a step), so every matrix is read once for all R rows (gemv.c's
 * matmul_rows): R rows cost about the weight traffic of one plus R times the arithmetic, and
 * a prompt's rows fill the products that decode rows alone leave memory-bound.
 *
 * The maths is the torch model's (gemmakit/model/, which cites the reference
 * implementations), operation for operation: RMSNorm, rotate-half RoPE, q/k norms (Gemma 3),
 * attention soft-capping (Gemma 2), tanh-approximate GeGLU (geglu.c's training forward),
 * pre/post norms, final soft-capping (step.h), over float32, bfloat16 or int8 weights and a
 * float32 or bfloat16 cache. Only the order of the additions inside dot products differs
 * from torch's kernels; it is the same for a row whatever else is in its step, so a request
 * gets the same tokens alone or batched, prefilled in one call or in chunks.
 *
 * Attention: the rows of one slot are one run of consecutive positions (Batch). Every row's
 * key and value are staged first (in the cache's element type); each row then attends to
 * the positions [0, p] (full layers) or [max(0, p - window + 1), p] (sliding layers: a ring
 * of the layer's own capacity) of its own slot, those before its run from the cache and
 * those of its run from the staged keys, in position order; only then are the staged keys
 * stored at (slot, position % capacity). A run may therefore be longer than a sliding ring
 * (a 512-row prompt chunk over a ring of window + 16): no row loses a key a later row of its
 * run overwrites, and the sums are those of one row a step.
 *
 * Logit rows: only the rows of Batch.logit_rows (a prompt chunk's last row when it ends its
 * prompt, every decoding row) go on after the last block's attention (its output
 * projection, MLP, the final norm and the output head), so a 512-row prompt costs one row of
 * the 262,144-wide head and the logits buffer holds those rows only.
 *
 * Threads: the Python caller's thread and n-1 workers run the step together (SPMD, step.c's
 * pool). Matrices' output rows and attention's tasks are handed out in chunks (take_chunk:
 * each thread its own share first, then what is left of the others'); the element-wise work of
 * every row (norms, residual adds) is repeated on each thread on its own copy of the residual
 * streams (identical instructions on identical data, so the copies stay bit-identical)
 * instead of paying a barrier; keys and values are split by (row, KV head), attention by
 * blocks of rows of one run with one KV head (each key and value row read once for all the
 * block's queries: its rows' heads that share the KV head), or, for a step of fewer blocks
 * than threads (one decode row), each block's positions and columns in chunks. Why chunks:
 * a decode step is ~110 short memory-bound sections, each ended by a barrier, and a static
 * split left one thread waiting for the other at most of them (memory stalls differ between
 * the cores; measured, bundled Q4_K_M one-row steps on 2 threads, loaded machine: 0.5-0.9 ms
 * of a 12 ms step in barrier waits). A chunk's values do not depend on the thread that
 * computes it (a column of a product depends on its own weight row, a score on its own key),
 * so nothing changes but who computes what.
 */
#include <stdatomic.h>
#include <stdlib.h>

#include "gguf_dot.h"
#include "step.h"

/* A row's run: the rows of its slot in the step (consecutive rows at consecutive positions):
 * the run's first row, and its first and last positions */
typedef struct {
    int64_t row, first, last;
} Run;

/* Attention in blocks: consecutive attending rows of one run (rows i0..i1-1 of the attending
 * rows: every row, or the last block's logit rows) with one KV head, whose queries (about
 * BLOCK_QUERIES: the rows' heads that share the KV head) read each key and value row once */
enum { BLOCK_QUERIES = 16 };
typedef struct {
    int64_t i0, i1;
} Block;

/* The blocks of one list of attending rows; split: fewer blocks x kv_heads than threads (a
 * decode step of one row, a prompt chunk's last block), so that each block's positions, then
 * its columns, are split over the threads instead, its scores in Buffers.split_scores */
typedef struct {
    Block *blocks;
    int64_t n, split;
} Blocks;

/* chunks of the head's columns per thread (taken dynamically: run_batch) */
enum { HEAD_CHUNKS_PER_THREAD = 8 };

/* Work in chunks (a product's output rows, attention's positions or tasks): thread t first
 * takes, in order, the chunks of its own share [n t / T, n (t + 1) / T), one stream through
 * memory as a static split reads it, then, its share done, the chunks left in the others'
 * shares from their ends (the last chunk of a slower thread's share first). A share's counts
 * of chunks taken from its front (by its owner: low 32 bits) and from its back (by the others:
 * high 32 bits) are one atomic word, so each chunk is taken exactly once. One Shares (a word
 * per thread, each on its own cache line, zero at the start of a step) per kind of work and
 * layer, and the head's. */
enum { C_QKV, C_SCORES, C_SUMS, C_TASKS, C_O, C_GATE_UP, C_DOWN, C_HEAD, CHUNK_KINDS };
typedef struct {
    _Atomic uint64_t taken;
    char pad[64 - sizeof(uint64_t)];
} Share;

/* The next chunk of the n chunks whose shares are `shares` for thread tid, or -1 when none is
 * left; *helping starts at 0 (the thread's own share first) */
static int64_t take_chunk(Share *shares, int64_t n, int tid, int nthreads, int *helping) {
    for (; *helping < nthreads; ++*helping) {
        const int owner = (tid + *helping) % nthreads;
        const uint64_t step = *helping ? (uint64_t)1 << 32 : 1;
        int64_t lo, hi;
        rows_of(n, owner, nthreads, &lo, &hi);
        uint64_t w = atomic_load_explicit(&shares[owner].taken, memory_order_relaxed);
        while ((int64_t)((w & 0xFFFFFFFFu) + (w >> 32)) < hi - lo)
            if (atomic_compare_exchange_weak_explicit(&shares[owner].taken, &w, w + step, memory_order_relaxed,
                                                      memory_order_relaxed))
                return *helping ? hi - 1 - (int64_t)(w >> 32) : lo + (int64_t)(w & 0xFFFFFFFFu);
    }
    return -1;
}

/* chunks per thread of a layer's products and of a split attention's positions: small enough
 * that the last ones even out the threads (a chunk of a one-row step's products: a few
 * microseconds), each of whole 64-row tiles (gguf_dot_rows) */
enum { CHUNKS_PER_THREAD = 8, POSITION_CHUNK_MIN = 16 };

/* items per chunk of n items, about CHUNKS_PER_THREAD chunks a thread, a multiple of unit */
static int64_t chunk_size(int64_t n, int nthreads, int64_t unit) {
    const int64_t per = (n + nthreads * CHUNKS_PER_THREAD - 1) / (nthreads * CHUNKS_PER_THREAD);
    return (per + unit - 1) / unit * unit;
}

static int64_t align64(int64_t n) { return (n + 63) & ~(int64_t)63; }

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* A logit and its index, the largest of those seen (index -1: none yet) */
typedef struct {
    float value;
    int64_t index;
} Best;

/* whether logit (v, i) goes before the best so far: the first NaN, else the largest, the
 * lower index of equal ones (numpy's argmax) */
static inline int better(float v, int64_t i, Best best) {
    if (best.index < 0) return 1;
    if (isnan(best.value)) return isnan(v) && i < best.index;
    return isnan(v) || v > best.value || (v == best.value && i < best.index);
}

/* the best of logits [lo, hi) of a row, merged into *best */
static void best_of(const float *logits, int64_t lo, int64_t hi, Best *best) {
    for (int64_t n = lo; n < hi; n++)
        if (better(logits[n], n, *best)) *best = (Best){logits[n], n};
}

/* Buffers every thread reads, (rows, width) each: matrix outputs, written by column ranges
 * between barriers; the new keys and values (staged: kv_heads x rows x head_dim each, in the
 * cache's element type); each row's run; the attention blocks of every row and of the logit
 * rows, the split blocks' scores; the scratch of each thread (thread_floats) */
typedef struct {
    float *q, *k, *v, *attn, *o, *act, *up, *down;
    void *staged_k, *staged_v;
    const Run *runs;
    Blocks all, out;
    float *split_scores;
    uint8_t *rounded_shared, *rounded_own; /* Rounded inputs: the step's, each thread's */
    int64_t rounded_own_bytes;
    Share *shares; /* CHUNK_KINDS x threads per layer, then the head's */
    Best *best; /* each thread's best logit of each logit row so far (Batch.best) */
    float *scratch;
} Buffers;

typedef struct {
    const Model *m;
    const Batch *b;
    Buffers buf;
} Job;

/* the rows of an attention block: BLOCK_QUERIES query heads, or one row's heads of a KV head */
static int64_t block_rows(const Model *m) {
    const int64_t group = m->heads / m->kv_heads;
    return group < BLOCK_QUERIES ? BLOCK_QUERIES / group : 1;
}

/* the queries of one attention block and the scores of each (max_visible) */
static int64_t block_scores(const Model *m) { return block_rows(m) * (m->heads / m->kv_heads) * m->max_visible; }

/* a thread's residual streams and their normed copies (rows x hidden each), RoPE angles
 * (rows x 2 groups x head_dim), one head (head_dim) and one block's attention scores */
static int64_t thread_floats(const Model *m, int64_t rows) {
    return rows * (m->hidden * 2 + m->head_dim * 2) + m->head_dim + block_scores(m);
}

/* From this many rows on, an input is rounded to 8-bit blocks once for all threads (each
 * its share of the rows, then a barrier); below, each thread rounds every row into its own
 * buffer, which costs less than the barrier (a decode step's one row: about a microsecond). */
enum { SHARED_ROUNDING_ROWS = 16 };

/* The input rows of the products that read them, rounded once to the 8-bit blocks of the
 * GGUF matrices' activation type (act; -1: the products take x as it is) */
typedef struct {
    ActRows a;
    int64_t act;
} Rounded;

static int64_t activation_type(const Mat *mat) {
    if (mat->type < W_GGUF_BASE || gguf_row_bytes(mat->type - W_GGUF_BASE, mat->k) < 0) return -1;
    return gguf_act_type(mat->type - W_GGUF_BASE);
}

/* x (rows of mat->k) rounded for mat and the matrices of its activation type that read the
 * same input: once per input, not once per matrix and thread. Every thread calls it. */
static void round_input(const Buffers *buf, const Mat *mat, const float *x, int64_t rows, Rounded *in, int tid,
                        int nthreads) {
    in->act = activation_type(mat);
    if (in->act < 0) return;
    if (rows >= SHARED_ROUNDING_ROWS) {
        act_rows_init(&in->a, in->act, rows, mat->k, buf->rounded_shared);
        int64_t lo, hi;
        rows_of(rows, tid, nthreads, &lo, &hi);
        act_rows_quantize(&in->a, x, lo, hi);
        pool_barrier(nthreads); /* every row rounded before any product reads it */
    } else {
        act_rows_init(&in->a, in->act, rows, mat->k, buf->rounded_own + tid * buf->rounded_own_bytes);
        act_rows_quantize(&in->a, x, 0, rows);
    }
}

/* y columns [lo, hi) = the rows of x times mat: a GGUF matrix of in's activation type from
 * the rows rounded once (gguf_dot_rows: what gguf_matmul_rows runs after rounding them), any
 * other through matmul_rows */
static void product(const Mat *mat, const float *x, int64_t rows, const Rounded *in, float *y, int64_t lo,
                    int64_t hi) {
    if (in->act >= 0 && activation_type(mat) == in->act && mat->k == in->a.k)
        gguf_dot_rows(mat->type - W_GGUF_BASE, mat->w, mat->n, &in->a, y, lo, hi);
    else matmul_rows(mat, x, rows, y, lo, hi);
}

/* every row times each of the `count` matrices (all reading x, rounded as `in`), into ys: the
 * output columns of all of them as one list of chunks (take_chunk) */
static void products(const Mat *const *mats, float *const *ys, int count, const float *x, int64_t rows,
                     const Rounded *in, Share *shares, int tid, int nthreads) {
    int64_t sizes[3] = {0}, chunks[3] = {0}, total = 0;
    for (int i = 0; i < count; i++) {
        sizes[i] = chunk_size(mats[i]->n, nthreads, 64);
        total += chunks[i] = (mats[i]->n + sizes[i] - 1) / sizes[i];
    }
    int helping = 0;
    for (int64_t c; (c = take_chunk(shares, total, tid, nthreads, &helping)) >= 0;) {
        int i = 0;
        for (; c >= chunks[i]; i++) c -= chunks[i];
        const int64_t lo = c * sizes[i], hi = lo + sizes[i] < mats[i]->n ? lo + sizes[i] : mats[i]->n;
        product(mats[i], x, rows, in, ys[i], lo, hi);
    }
}

/* rows x C values of x into xn, each row normed */
static void norm_rows(const float *x, const float *gain, float *xn, int64_t rows, int64_t C, double eps) {
    for (int64_t r = 0; r < rows; r++) rms_norm(x + r * C, gain, xn + r * C, C, eps);
}

/* Stages every row's key (normed, rotated) and value in the cache's element type, and norms
 * and rotates the queries of the n_out attending rows (out_rows, or every row) in place: this
 * thread's (row, KV head) and (row, query head) pairs. Staged, not stored: a row of a long run
 * must still find in the cache the keys a later row of its run will overwrite (a sliding
 * ring's old positions). */
static void stage_keys_values(const Model *m, const Batch *b, const Layer *L, const Buffers *buf,
                              const float *trig, const int64_t *out_rows, int64_t n_out, float *head, int tid,
                              int nthreads) {
    const int64_t R = b->rows, H = m->heads, KV = m->kv_heads, D = m->head_dim, g = L->group;
    for (int64_t i = tid; i < n_out * H; i += nthreads) {
        const int64_t r = out_rows ? out_rows[i / H] : i / H;
        float *query = buf->q + (r * H + i % H) * D;
        const float *angles = trig + (r * 2 + g) * D;
        norm_rope_head(query, L->q_norm, angles, angles + D / 2, head, D, m->eps);
        memcpy(query, head, sizeof(float) * D);
    }
    for (int64_t i = tid; i < R * KV; i += nthreads) {
        const int64_t r = i / KV, kv = i % KV, at = (kv * R + r) * D;
        const float *angles = trig + (r * 2 + g) * D;
        norm_rope_head(buf->k + i * D, L->k_norm, angles, angles + D / 2, head, D, m->eps);
        const float *value = buf->v + i * D;
        if (m->cache_bf16) {
            uint16_t *ks = (uint16_t *)buf->staged_k + at, *vs = (uint16_t *)buf->staged_v + at;
            for (int64_t d = 0; d < D; d++) ks[d] = f32_to_bf16(head[d]), vs[d] = f32_to_bf16(value[d]);
        } else {
            memcpy((float *)buf->staged_k + at, head, sizeof(float) * D);
            memcpy((float *)buf->staged_v + at, value, sizeof(float) * D);
        }
    }
}

/* Stores the staged keys and values at (slot, position % capacity), once every row has
 * attended: this thread's (row, KV head) pairs. A row whose ring index a later row of its
 * run also writes (a run longer than the ring) is skipped: the later position stays. */
static void store_staged(const Model *m, const Batch *b, const Layer *L, const Buffers *buf, int tid,
                         int nthreads) {
    const int64_t R = b->rows, KV = m->kv_heads, D = m->head_dim, cap = L->capacity;
    const int64_t bytes = (m->cache_bf16 ? 2 : 4) * D;
    for (int64_t i = tid; i < R * KV; i += nthreads) {
        const int64_t r = i / KV, kv = i % KV, p = b->positions[r];
        if (p + cap <= buf->runs[r].last) continue;
        const int64_t from = (kv * R + r) * bytes, at = ((b->slots[r] * KV + kv) * cap + p % cap) * bytes;
        memcpy((char *)L->k_cache + at, (const char *)buf->staged_k + from, bytes);
        memcpy((char *)L->v_cache + at, (const char *)buf->staged_v + from, bytes);
    }
}

/* The queries of block blk with KV head kv (their scores at `scores`, `stride` apart), the
 * key and value rows they see, and the positions [x0, x1) any of them sees: its number of
 * queries. The rows of a block are consecutive rows of one run, so they share its rows. */
static int64_t block_queries(const Model *m, const Batch *b, const Layer *L, const Buffers *buf,
                             const int64_t *out_rows, Block blk, int64_t kv, float *scores, int64_t stride, Query *qs,
                             KVRows *rows, int64_t *x0, int64_t *x1) {
    const int64_t R = b->rows, H = m->heads, KV = m->kv_heads, D = m->head_dim, G = H / KV, cap = L->capacity;
    const int64_t elem = m->cache_bf16 ? 2 : 4, r0 = out_rows ? out_rows[blk.i0] : blk.i0;
    int64_t n = 0;
    for (int64_t i = blk.i0; i < blk.i1; i++) {
        const int64_t r = out_rows ? out_rows[i] : i, p = b->positions[r];
        const int64_t lo = L->group == 1 && p - m->window + 1 > 0 ? p - m->window + 1 : 0;
        for (int64_t h = kv * G; h < kv * G + G; h++, n++)
            qs[n] = (Query){buf->q + (r * H + h) * D, scores + n * stride, buf->attn + (i * H + h) * D, lo, p};
    }
    const Run *run = &buf->runs[r0];
    const int64_t base = (b->slots[r0] * KV + kv) * cap * D * elem, staged = (kv * R + run->row) * D * elem;
    *rows = (KVRows){(const char *)L->k_cache + base, (const char *)L->v_cache + base,
                     (const char *)buf->staged_k + staged, (const char *)buf->staged_v + staged,
                     cap, run->first, D * elem, m->cache_bf16};
    *x0 = qs[0].lo, *x1 = qs[n - 1].hi + 1;
    return n;
}

/* Attention of every (block, KV head) pair over the positions its queries see, in position
 * order: those before its run from the cache (a sliding ring holds them at position %
 * capacity), those of its run from the staged keys. Each score, softmax and weighted sum is
 * computed the same way whichever block, thread or part of a split its row falls in
 * (attention_scores, attention_sum), so a row's attention is the same, bit for bit, wherever
 * its earlier positions were computed (this step or an earlier one) and whatever else is in
 * the step. Whole pairs are the chunks (take_chunk); a split list (fewer pairs than threads)
 * cuts each pair's positions into chunks for the scores, then, after a barrier, its columns
 * (4 vectors of 16 a chunk) for the weighted sums, each thread taking the softmax of every
 * query itself into its own scratch (the same bits on each, and one barrier fewer a layer). */
static void attend(const Model *m, const Batch *b, const Layer *L, const Buffers *buf, const int64_t *out_rows,
                   const Blocks *blocks, float *scratch, Share *shares, int tid, int nthreads) {
    const int64_t KV = m->kv_heads, D = m->head_dim, tasks = blocks->n * KV, stride = m->max_visible;
    const float scale = (float)m->attn_scale;
    Query qs[block_rows(m) * (m->heads / KV)];
    KVRows rows;
    int64_t x0, x1;
    if (!blocks->split) {
        int helping = 0;
        for (int64_t t; (t = take_chunk(shares + C_TASKS * nthreads, tasks, tid, nthreads, &helping)) >= 0;) {
            const int64_t nq = block_queries(m, b, L, buf, out_rows, blocks->blocks[t / KV], t % KV, scratch, stride,
                                             qs, &rows, &x0, &x1);
            attention_scores(qs, nq, &rows, x0, x1, D, scale, m->attn_softcap);
            for (int64_t j = 0; j < nq; j++) {
                softmax_row(qs[j].scores, qs[j].hi - qs[j].lo + 1);
                memset(qs[j].out, 0, sizeof(float) * D);
            }
            attention_sum(qs, nq, &rows, x0, x1, 0, D, D);
        }
        return;
    }
    /* the split: each task's positions in chunks (scores), then its columns in chunks of 4
     * vectors of 16 (sums), both taken by the first thread free */
    const int64_t per_task = block_scores(m), columns = (D + 15) / 16, column_chunks = (columns + 3) / 4;
    int64_t first[MAX_STEP_THREADS + 1], size[MAX_STEP_THREADS]; /* each task's first chunk and its positions per chunk */
    first[0] = 0;
    for (int64_t t = 0; t < tasks; t++) {
        block_queries(m, b, L, buf, out_rows, blocks->blocks[t / KV], t % KV, scratch, stride, qs, &rows, &x0, &x1);
        size[t] = chunk_size(x1 - x0, nthreads, POSITION_CHUNK_MIN);
        first[t + 1] = first[t] + (x1 - x0 + size[t] - 1) / size[t];
    }
    int helping = 0;
    for (int64_t c; (c = take_chunk(shares + C_SCORES * nthreads, first[tasks], tid, nthreads, &helping)) >= 0;) {
        int64_t t = 0;
        while (c >= first[t + 1]) t++;
        const int64_t nq = block_queries(m, b, L, buf, out_rows, blocks->blocks[t / KV], t % KV,
                                         buf->split_scores + t * per_task, stride, qs, &rows, &x0, &x1);
        const int64_t lo = x0 + (c - first[t]) * size[t];
        attention_scores(qs, nq, &rows, lo, min64(x1, lo + size[t]), D, scale, m->attn_softcap);
    }
    pool_barrier(nthreads); /* every score computed */
    helping = 0;
    for (int64_t c; (c = take_chunk(shares + C_SUMS * nthreads, tasks * column_chunks, tid, nthreads, &helping)) >= 0;) {
        const int64_t t = c / column_chunks, lo = c % column_chunks * 4, hi = min64(lo + 4, columns);
        const int64_t nq = block_queries(m, b, L, buf, out_rows, blocks->blocks[t / KV], t % KV,
                                         buf->split_scores + t * per_task, stride, qs, &rows, &x0, &x1);
        const int64_t d0 = lo * 16, d1 = hi * 16 < D ? hi * 16 : D;
        for (int64_t j = 0; j < nq; j++) { /* each thread its own softmax of every query: no barrier */
            const int64_t n = qs[j].hi - qs[j].lo + 1;
            memcpy(scratch + j * stride, qs[j].scores, sizeof(float) * n);
            qs[j].scores = scratch + j * stride;
            softmax_row(qs[j].scores, n);
            memset(qs[j].out + d0, 0, sizeof(float) * (d1 - d0));
        }
        attention_sum(qs, nq, &rows, x0, x1, d0, d1, D);
    }
}

/* keeps the rows `keep` (ascending) of x (rows of C floats), moved to the front in order */
static void keep_rows(float *x, const int64_t *keep, int64_t n, int64_t C) {
    for (int64_t i = 0; i < n; i++)
        if (keep[i] != i) memmove(x + i * C, x + keep[i] * C, sizeof(float) * C);
}

/* One block over the R rows of x; in the last block (out_rows set), only the rows whose
 * logits are wanted go on after attention: returns the rows x holds then. */
static int64_t run_block(const Job *job, const Layer *L, float *x, float *xn, float *trig, float *head,
                         float *scores, const int64_t *out_rows, int64_t n_out, int tid, int nthreads) {
    const Blocks *blocks = out_rows ? &job->buf.out : &job->buf.all;
    const Model *m = job->m;
    const Batch *b = job->b;
    const Buffers *buf = &job->buf;
    const int64_t R = b->rows, C = m->hidden, I = m->intermediate;
    Share *shares = buf->shares + (L - m->layers) * CHUNK_KINDS * nthreads;
    Rounded in;
    norm_rows(x, L->input_norm, xn, R, C, m->eps);
    round_input(buf, &L->q, xn, R, &in, tid, nthreads); /* q, k and v read it */
    const Mat *qkv[3] = {&L->q, &L->k, &L->v};
    float *const qkv_out[3] = {buf->q, buf->k, buf->v};
    products(qkv, qkv_out, 3, xn, R, &in, shares + C_QKV * nthreads, tid, nthreads);
    pool_barrier(nthreads);
    stage_keys_values(m, b, L, buf, trig, out_rows, n_out, head, tid, nthreads);
    pool_barrier(nthreads); /* every row's key and query is ready before any row attends */
    attend(m, b, L, buf, out_rows, blocks, scores, shares, tid, nthreads);
    pool_barrier(nthreads); /* every row has read the cache before any key is stored */
    store_staged(m, b, L, buf, tid, nthreads);
    int64_t rows = R;
    if (out_rows) keep_rows(x, out_rows, rows = n_out, C);
    if (rows == 0) return 0; /* no row wants logits: the keys and values were all the step had to give */
    round_input(buf, &L->o, buf->attn, rows, &in, tid, nthreads);
    const Mat *o = &L->o;
    products(&o, &buf->o, 1, buf->attn, rows, &in, shares + C_O * nthreads, tid, nthreads);
    pool_barrier(nthreads);
    for (int64_t r = 0; r < rows; r++) add_residual(x + r * C, buf->o + r * C, L->post_attention_norm, xn, C, m->eps);
    /* MLP: gate and up over the same chunk of columns, then GeGLU of those columns */
    norm_rows(x, L->pre_feedforward_norm, xn, rows, C, m->eps);
    round_input(buf, &L->gate, xn, rows, &in, tid, nthreads); /* gate and up read it */
    const int64_t size = chunk_size(I, nthreads, 64);
    int helping = 0;
    for (int64_t c; (c = take_chunk(shares + C_GATE_UP * nthreads, (I + size - 1) / size, tid, nthreads, &helping)) >= 0;) {
        const int64_t lo = c * size, hi = min64(lo + size, I);
        product(&L->gate, xn, rows, &in, buf->act, lo, hi);
        product(&L->up, xn, rows, &in, buf->up, lo, hi);
        for (int64_t r = 0; r < rows; r++) /* in place: each value read before written */
            geglu_forward(buf->act + r * I, buf->up + r * I, buf->act + r * I, lo, hi, 0);
    }
    pool_barrier(nthreads);
    round_input(buf, &L->down, buf->act, rows, &in, tid, nthreads);
    const Mat *down = &L->down;
    products(&down, &buf->down, 1, buf->act, rows, &in, shares + C_DOWN * nthreads, tid, nthreads);
    pool_barrier(nthreads);
    for (int64_t r = 0; r < rows; r++) add_residual(x + r * C, buf->down + r * C, L->post_feedforward_norm, xn, C, m->eps);
    return rows;
}

static void run_batch(const void *arg, int tid, int nthreads) {
    const Job *job = arg;
    const Model *m = job->m;
    const Batch *b = job->b;
    const int64_t R = b->rows, C = m->hidden, D = m->head_dim;
    float *x = job->buf.scratch + tid * thread_floats(m, R);
    float *xn = x + R * C, *trig = xn + R * C, *head = trig + R * 2 * D, *scores = head + D;
    for (int64_t r = 0; r < R; r++) {
        /* the embedding row, times sqrt(hidden) rounded to the activation dtype */
        mat_row(&m->embed, b->tokens[r], x + r * C);
        for (int64_t i = 0; i < C; i++) x[r * C + i] *= m->embed_scale;
        for (int g = 0; g < 2; g++) {
            float *angles = trig + (r * 2 + g) * D;
            if (m->inv_freq[g]) rope_angles(b->positions[r], m->inv_freq[g], D, angles, angles + D / 2);
        }
    }
    int64_t rows = R;
    for (int64_t li = 0; li < m->n_layers; li++) {
        const int last = li == m->n_layers - 1;
        rows = run_block(job, &m->layers[li], x, xn, trig, head, scores, last ? b->logit_rows : NULL,
                         last && b->logit_rows ? b->n_logit_rows : R, tid, nthreads);
    }
    if (rows == 0) return;
    norm_rows(x, m->final_norm, xn, rows, C, m->eps);
    Rounded in;
    round_input(&job->buf, &m->lm_head, xn, rows, &in, tid, nthreads);
    /* The head, the largest read of a step, in chunks each taken by the first thread free: a
     * thread that loses its core for a while (a shared machine, a server's other threads)
     * leaves its chunks to the others instead of making them wait. A column's logits depend
     * on its own weight row only, so who computes it changes nothing. */
    const int64_t V = m->vocab, chunk = (V / (nthreads * HEAD_CHUNKS_PER_THREAD) / 64 + 1) * 64; /* >= 64 */
    Share *head_shares = job->buf.shares + m->n_layers * CHUNK_KINDS * nthreads;
    int helping = 0;
    for (int64_t c; (c = take_chunk(head_shares, (V + chunk - 1) / chunk, tid, nthreads, &helping)) >= 0;) {
        const int64_t lo = c * chunk, hi = lo + chunk < V ? lo + chunk : V;
        product(&m->lm_head, xn, rows, &in, b->logits, lo, hi);
        if (m->final_softcap > 0)
            for (int64_t r = 0; r < rows; r++)
                for (int64_t n = lo; n < hi; n++) b->logits[r * V + n] = softcap(b->logits[r * V + n], m->final_softcap);
        if (b->best) /* while the chunk's logits are in the cache */
            for (int64_t r = 0; r < rows; r++) best_of(b->logits + r * V, lo, hi, &job->buf.best[tid * rows + r]);
    }
}

/* Each row's run: the rows of its slot in this step, which must be consecutive rows at
 * consecutive positions. Returns 0, or -2 when a slot's rows are not one such run. */
static int find_runs(const Batch *b, Run *runs) {
    const int64_t R = b->rows;
    for (int64_t r = 0; r < R; r++) {
        const int continues = r > 0 && b->slots[r] == b->slots[r - 1] && b->positions[r] == b->positions[r - 1] + 1;
        runs[r].row = continues ? runs[r - 1].row : r;
        runs[r].first = b->positions[runs[r].row];
    }
    for (int64_t r = R - 1; r >= 0; r--)
        runs[r].last = r + 1 < R && runs[r + 1].row == runs[r].row ? runs[r + 1].last : b->positions[r];
    for (int64_t r = 0; r < R; r++) /* no slot starts two runs */
        for (int64_t s = 0; runs[r].row == r && s < r; s++)
            if (runs[s].row == s && b->slots[s] == b->slots[r]) return -2;
    return 0;
}

/* The attention blocks of the n attending rows (out_rows, or every row): the runs of
 * consecutive rows of one slot at consecutive positions, cut every per_block rows; their
 * number. */
static int64_t make_blocks(const Batch *b, const int64_t *out_rows, int64_t n, int64_t per_block, Block *blocks) {
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = out_rows ? out_rows[i] : i, prev = i == 0 ? -1 : out_rows ? out_rows[i - 1] : i - 1;
        const int joins = count && i - blocks[count - 1].i0 < per_block && prev == r - 1 &&
                          b->slots[r] == b->slots[prev] && b->positions[r] == b->positions[prev] + 1;
        if (joins) blocks[count - 1].i1 = i + 1;
        else blocks[count++] = (Block){i, i + 1};
    }
    return count;
}

int decode_batch(const Model *m, const Batch *b, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_STEP_THREADS) threads = MAX_STEP_THREADS;
    const int64_t R = b->rows, C = m->hidden, H = m->heads, KV = m->kv_heads, D = m->head_dim, I = m->intermediate;
    if (D % 2 || KV < 1 || H % KV) return -1;
    if (R < 1) return 0;
    if (b->logit_rows) /* ascending, within [0, R) */
        for (int64_t i = 0; i < b->n_logit_rows; i++)
            if (b->logit_rows[i] < 0 || b->logit_rows[i] >= R || (i && b->logit_rows[i] <= b->logit_rows[i - 1]))
                return -3;
    const int64_t n_out = b->logit_rows ? b->n_logit_rows : R;
    const int64_t widths[10] = {H * D, KV * D, KV * D, H * D, C, I, I, C, KV * D, KV * D}; /* Buffers' order */
    int64_t shared_floats = 0;
    for (int i = 0; i < 10; i++) shared_floats += R * widths[i];
    /* a split list's scores: fewer than `threads` (block, KV head) pairs */
    shared_floats += threads * block_scores(m);
    /* rounded inputs, of the widest input any product reads: the step's (many rows) or each
     * thread's (few), each 64-byte aligned */
    const int64_t widest = C > H * D ? (C > I ? C : I) : (H * D > I ? H * D : I);
    const int64_t shared_bytes = R >= SHARED_ROUNDING_ROWS ? align64(act_rows_bytes(R, widest)) : 0;
    const int64_t own_bytes = R < SHARED_ROUNDING_ROWS ? align64(act_rows_bytes(R, widest)) : 0;
    /* the runs and the blocks first (int64 aligned), then the rounded inputs, then the floats */
    const int64_t n_shares = (m->n_layers + 1) * CHUNK_KINDS * threads;
    const int64_t lists_bytes = align64(sizeof(Run) * R + sizeof(Block) * (R + n_out) + sizeof(Best) * threads * n_out);
    const int64_t head_bytes = lists_bytes + sizeof(Share) * n_shares + 64;
    char *memory = malloc(head_bytes + shared_bytes + threads * own_bytes +
                          sizeof(float) * (shared_floats + threads * thread_floats(m, R)));
    if (!memory) return -1;
    Run *runs = (Run *)memory;
    if (find_runs(b, runs)) {
        free(memory);
        return -2;
    }
    Block *blocks = (Block *)(runs + R);
    const int64_t n_all = make_blocks(b, NULL, R, block_rows(m), blocks);
    const int64_t n_chosen = make_blocks(b, b->logit_rows, n_out, block_rows(m), blocks + R);
    Best *best = (Best *)(blocks + R + n_out);
    for (int64_t i = 0; i < threads * n_out; i++) best[i] = (Best){0.f, -1};
    Share *shares = (Share *)(memory + lists_bytes);
    for (int64_t i = 0; i < n_shares; i++) atomic_init(&shares[i].taken, 0);
    uint8_t *rounded = (uint8_t *)(((uintptr_t)(memory + head_bytes - 64) + 63) & ~(uintptr_t)63);
    float *parts[10], *at = (float *)(rounded + shared_bytes + threads * own_bytes);
    for (int i = 0; i < 10; i++) parts[i] = at, at += R * widths[i];
    Job job = {m, b, {parts[0], parts[1], parts[2], parts[3], parts[4], parts[5], parts[6], parts[7], parts[8], parts[9], runs,
                      {blocks, n_all, n_all * KV < threads}, {blocks + R, n_chosen, n_chosen * KV < threads}, at,
                      rounded, rounded + shared_bytes, own_bytes, shares, best, at + threads * block_scores(m)}};
    pool_run(run_batch, &job, threads);
    if (b->best) /* each logit row's best over the threads' (a thread that computed none: index -1) */
        for (int64_t r = 0; r < n_out; r++) {
            Best all = best[r];
            for (int t = 1; t < threads; t++)
                if (best[t * n_out + r].index >= 0 && better(best[t * n_out + r].value, best[t * n_out + r].index, all))
                    all = best[t * n_out + r];
            b->best[r] = all.index;
        }
    free(memory);
    return 0;
}

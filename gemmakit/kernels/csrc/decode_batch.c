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
 * pool). Matrices are split by output rows over the threads; the element-wise work of every
 * row (norms, residual adds) is repeated on each thread on its own copy of the residual
 * streams (identical instructions on identical data, so the copies stay bit-identical)
 * instead of paying a barrier; keys and values are split by (row, KV head), attention by
 * blocks of rows of one run with one KV head (each key and value row read once for all the
 * block's queries: its rows' heads that share the KV head), or, for a step of fewer blocks
 * than threads (one decode row), each block's positions and columns split over the threads.
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

static int64_t align64(int64_t n) { return (n + 63) & ~(int64_t)63; }

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
    atomic_llong *head_next; /* the next chunk of the head's columns */
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

/* every row times the matrix, this thread's share of its output columns */
static void my_columns(const Mat *mat, const float *x, int64_t rows, const Rounded *in, float *y, int tid,
                       int nthreads) {
    int64_t lo, hi;
    rows_of(mat->n, tid, nthreads, &lo, &hi);
    product(mat, x, rows, in, y, lo, hi);
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
 * the step. Whole pairs go to the threads in turn; a split list (fewer pairs than threads)
 * splits each pair's positions over the threads for the scores, then, after a barrier, its
 * columns for the weighted sums, each thread taking the softmax of every query itself into
 * its own scratch (the same bits on each, and one barrier fewer a layer). */
static void attend(const Model *m, const Batch *b, const Layer *L, const Buffers *buf, const int64_t *out_rows,
                   const Blocks *blocks, float *scratch, int tid, int nthreads) {
    const int64_t KV = m->kv_heads, D = m->head_dim, tasks = blocks->n * KV, stride = m->max_visible;
    const float scale = (float)m->attn_scale;
    Query qs[block_rows(m) * (m->heads / KV)];
    KVRows rows;
    int64_t x0, x1;
    if (!blocks->split) {
        for (int64_t t = tid; t < tasks; t += nthreads) {
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
    const int64_t per_task = block_scores(m);
    for (int64_t t = 0; t < tasks; t++) { /* this thread's share of the positions */
        const int64_t nq = block_queries(m, b, L, buf, out_rows, blocks->blocks[t / KV], t % KV,
                                         buf->split_scores + t * per_task, stride, qs, &rows, &x0, &x1);
        int64_t lo, hi;
        rows_of(x1 - x0, tid, nthreads, &lo, &hi);
        attention_scores(qs, nq, &rows, x0 + lo, x0 + hi, D, scale, m->attn_softcap);
    }
    pool_barrier(nthreads); /* every score computed */
    for (int64_t t = 0; t < tasks; t++) { /* this thread's columns, in whole vectors of 16 */
        const int64_t nq = block_queries(m, b, L, buf, out_rows, blocks->blocks[t / KV], t % KV,
                                         buf->split_scores + t * per_task, stride, qs, &rows, &x0, &x1);
        int64_t lo, hi;
        rows_of((D + 15) / 16, tid, nthreads, &lo, &hi);
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
    Rounded in;
    norm_rows(x, L->input_norm, xn, R, C, m->eps);
    round_input(buf, &L->q, xn, R, &in, tid, nthreads); /* q, k and v read it */
    my_columns(&L->q, xn, R, &in, buf->q, tid, nthreads);
    my_columns(&L->k, xn, R, &in, buf->k, tid, nthreads);
    my_columns(&L->v, xn, R, &in, buf->v, tid, nthreads);
    pool_barrier(nthreads);
    stage_keys_values(m, b, L, buf, trig, out_rows, n_out, head, tid, nthreads);
    pool_barrier(nthreads); /* every row's key and query is ready before any row attends */
    attend(m, b, L, buf, out_rows, blocks, scores, tid, nthreads);
    pool_barrier(nthreads); /* every row has read the cache before any key is stored */
    store_staged(m, b, L, buf, tid, nthreads);
    int64_t rows = R;
    if (out_rows) keep_rows(x, out_rows, rows = n_out, C);
    if (rows == 0) return 0; /* no row wants logits: the keys and values were all the step had to give */
    round_input(buf, &L->o, buf->attn, rows, &in, tid, nthreads);
    my_columns(&L->o, buf->attn, rows, &in, buf->o, tid, nthreads);
    pool_barrier(nthreads);
    for (int64_t r = 0; r < rows; r++) add_residual(x + r * C, buf->o + r * C, L->post_attention_norm, xn, C, m->eps);
    /* MLP: gate and up over the same column range, then GeGLU of those columns */
    norm_rows(x, L->pre_feedforward_norm, xn, rows, C, m->eps);
    round_input(buf, &L->gate, xn, rows, &in, tid, nthreads); /* gate and up read it */
    int64_t lo, hi;
    rows_of(I, tid, nthreads, &lo, &hi);
    product(&L->gate, xn, rows, &in, buf->act, lo, hi);
    product(&L->up, xn, rows, &in, buf->up, lo, hi);
    for (int64_t r = 0; r < rows; r++) /* in place: each value read before written */
        geglu_forward(buf->act + r * I, buf->up + r * I, buf->act + r * I, lo, hi, 0);
    pool_barrier(nthreads);
    round_input(buf, &L->down, buf->act, rows, &in, tid, nthreads);
    my_columns(&L->down, buf->act, rows, &in, buf->down, tid, nthreads);
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
    for (int64_t lo; (lo = atomic_fetch_add(job->buf.head_next, 1) * chunk) < V;) {
        const int64_t hi = lo + chunk < V ? lo + chunk : V;
        product(&m->lm_head, xn, rows, &in, b->logits, lo, hi);
        if (m->final_softcap > 0)
            for (int64_t r = 0; r < rows; r++)
                for (int64_t n = lo; n < hi; n++) b->logits[r * V + n] = softcap(b->logits[r * V + n], m->final_softcap);
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
    const int64_t head_bytes = align64(sizeof(Run) * R + sizeof(Block) * (R + n_out) + sizeof(atomic_llong)) + 64;
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
    atomic_llong *head_next = (atomic_llong *)(blocks + R + n_out);
    atomic_init(head_next, 0);
    uint8_t *rounded = (uint8_t *)(((uintptr_t)(memory + head_bytes - 64) + 63) & ~(uintptr_t)63);
    float *parts[10], *at = (float *)(rounded + shared_bytes + threads * own_bytes);
    for (int i = 0; i < 10; i++) parts[i] = at, at += R * widths[i];
    Job job = {m, b, {parts[0], parts[1], parts[2], parts[3], parts[4], parts[5], parts[6], parts[7], parts[8], parts[9], runs,
                      {blocks, n_all, n_all * KV < threads}, {blocks + R, n_chosen, n_chosen * KV < threads}, at,
                      rounded, rounded + shared_bytes, own_bytes, head_next, at + threads * block_scores(m)}};
    pool_run(run_batch, &job, threads);
    free(memory);
    return 0;
}

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
 * (row, query head).
 */
#include <stdlib.h>

#include "step.h"

/* A row's run: the rows of its slot in the step (consecutive rows at consecutive positions):
 * the run's first row, and its first and last positions */
typedef struct {
    int64_t row, first, last;
} Run;

/* Buffers every thread reads, (rows, width) each: matrix outputs, written by column ranges
 * between barriers; the new keys and values (staged: kv_heads x rows x head_dim each, in the
 * cache's element type); each row's run; the scratch of each thread (thread_floats) */
typedef struct {
    float *q, *k, *v, *attn, *o, *act, *up, *down;
    void *staged_k, *staged_v;
    const Run *runs;
    float *scratch;
} Buffers;

typedef struct {
    const Model *m;
    const Batch *b;
    Buffers buf;
} Job;

/* a thread's residual streams and their normed copies (rows x hidden each), RoPE angles
 * (rows x 2 groups x head_dim), one head (head_dim) and attention scores (max_visible) */
static int64_t thread_floats(const Model *m, int64_t rows) {
    return rows * (m->hidden * 2 + m->head_dim * 2) + m->head_dim + m->max_visible;
}

/* every row times the matrix, this thread's share of its output columns */
static void my_columns(const Mat *mat, const float *x, int64_t rows, float *y, int tid, int nthreads) {
    int64_t lo, hi;
    rows_of(mat->n, tid, nthreads, &lo, &hi);
    matmul_rows(mat, x, rows, y, lo, hi);
}

/* rows x C values of x into xn, each row normed */
static void norm_rows(const float *x, const float *gain, float *xn, int64_t rows, int64_t C, double eps) {
    for (int64_t r = 0; r < rows; r++) rms_norm(x + r * C, gain, xn + r * C, C, eps);
}

/* Stages every row's key (normed, rotated) and value in the cache's element type: this
 * thread's (row, KV head) pairs. Staged, not stored: a row of a long run must still find in
 * the cache the keys a later row of its run will overwrite (a sliding ring's old positions). */
static void stage_keys_values(const Model *m, const Batch *b, const Layer *L, const Buffers *buf,
                              const float *trig, float *head, int tid, int nthreads) {
    const int64_t R = b->rows, KV = m->kv_heads, D = m->head_dim, g = L->group;
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

/* Attention of this thread's (row, query head) pairs, for the `out` rows (NULL: every row;
 * output i for row out[i]), over the positions the row sees, in position order: those before
 * its run from the cache (a sliding ring holds them at position % capacity: up to two
 * contiguous runs), those of its run from the staged keys. The scores, their softmax and the
 * weighted sum of the values are therefore the same, bit for bit, wherever its earlier
 * positions were computed (this step or an earlier one). */
static void attend(const Model *m, const Batch *b, const Layer *L, const Buffers *buf, const float *trig,
                   const int64_t *out_rows, int64_t n_out, float *head, float *scores, int tid, int nthreads) {
    const int64_t R = b->rows, H = m->heads, KV = m->kv_heads, D = m->head_dim, cap = L->capacity, g = L->group;
    const int64_t elem = m->cache_bf16 ? 2 : 4;
    const float scale = (float)m->attn_scale;
    for (int64_t i = tid; i < n_out * H; i += nthreads) {
        const int64_t r = out_rows ? out_rows[i / H] : i / H, h = i % H, kv = h / (H / KV), p = b->positions[r];
        const Run *run = &buf->runs[r];
        const int64_t lo = g == 1 && p - m->window + 1 > 0 ? p - m->window + 1 : 0;
        /* positions [lo, first) from the cache, [new_from, p] staged */
        const int64_t n_old = run->first > lo ? run->first - lo : 0, new_from = lo + n_old;
        const int64_t n_new = p - new_from + 1, start = lo % cap;
        const int64_t n1 = n_old < cap - start ? n_old : cap - start; /* from `start`, then [0, n_old - n1) */
        const int64_t base = (b->slots[r] * KV + kv) * cap * D;
        const char *keys = (const char *)L->k_cache + base * elem, *values = (const char *)L->v_cache + base * elem;
        const int64_t staged_at = (kv * R + run->row + (new_from - run->first)) * D * elem;
        const char *new_keys = (const char *)buf->staged_k + staged_at;
        const char *new_values = (const char *)buf->staged_v + staged_at;
        const float *angles = trig + (r * 2 + g) * D;
        norm_rope_head(buf->q + (r * H + h) * D, L->q_norm, angles, angles + D / 2, head, D, m->eps);
        float top = key_scores(head, keys + start * D * elem, n1, D, scale, m->attn_softcap, scores, -INFINITY,
                               m->cache_bf16);
        top = key_scores(head, keys, n_old - n1, D, scale, m->attn_softcap, scores + n1, top, m->cache_bf16);
        top = key_scores(head, new_keys, n_new, D, scale, m->attn_softcap, scores + n_old, top, m->cache_bf16);
        softmax_given_top(scores, n_old + n_new, top);
        float *o = buf->attn + i * D;
        memset(o, 0, sizeof(float) * D);
        weighted_sum_add(scores, values + start * D * elem, n1, D, o, m->cache_bf16);
        weighted_sum_add(scores + n1, values, n_old - n1, D, o, m->cache_bf16);
        weighted_sum_add(scores + n_old, new_values, n_new, D, o, m->cache_bf16);
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
    const Model *m = job->m;
    const Batch *b = job->b;
    const Buffers *buf = &job->buf;
    const int64_t R = b->rows, C = m->hidden, I = m->intermediate;
    norm_rows(x, L->input_norm, xn, R, C, m->eps);
    my_columns(&L->q, xn, R, buf->q, tid, nthreads);
    my_columns(&L->k, xn, R, buf->k, tid, nthreads);
    my_columns(&L->v, xn, R, buf->v, tid, nthreads);
    pool_barrier(nthreads);
    stage_keys_values(m, b, L, buf, trig, head, tid, nthreads);
    pool_barrier(nthreads); /* every row's key is staged before any row attends */
    attend(m, b, L, buf, trig, out_rows, n_out, head, scores, tid, nthreads);
    pool_barrier(nthreads); /* every row has read the cache before any key is stored */
    store_staged(m, b, L, buf, tid, nthreads);
    int64_t rows = R;
    if (out_rows) keep_rows(x, out_rows, rows = n_out, C);
    if (rows == 0) return 0; /* no row wants logits: the keys and values were all the step had to give */
    my_columns(&L->o, buf->attn, rows, buf->o, tid, nthreads);
    pool_barrier(nthreads);
    for (int64_t r = 0; r < rows; r++) add_residual(x + r * C, buf->o + r * C, L->post_attention_norm, xn, C, m->eps);
    /* MLP: gate and up over the same column range, then GeGLU of those columns */
    norm_rows(x, L->pre_feedforward_norm, xn, rows, C, m->eps);
    int64_t lo, hi;
    rows_of(I, tid, nthreads, &lo, &hi);
    matmul_rows(&L->gate, xn, rows, buf->act, lo, hi);
    matmul_rows(&L->up, xn, rows, buf->up, lo, hi);
    for (int64_t r = 0; r < rows; r++) /* in place: each value read before written */
        geglu_forward(buf->act + r * I, buf->up + r * I, buf->act + r * I, lo, hi, 0);
    pool_barrier(nthreads);
    my_columns(&L->down, buf->act, rows, buf->down, tid, nthreads);
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
    int64_t lo, hi;
    rows_of(m->vocab, tid, nthreads, &lo, &hi);
    matmul_rows(&m->lm_head, xn, rows, b->logits, lo, hi);
    if (m->final_softcap > 0)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t n = lo; n < hi; n++) b->logits[r * m->vocab + n] = softcap(b->logits[r * m->vocab + n], m->final_softcap);
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

int decode_batch(const Model *m, const Batch *b, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_STEP_THREADS) threads = MAX_STEP_THREADS;
    const int64_t R = b->rows, C = m->hidden, H = m->heads, KV = m->kv_heads, D = m->head_dim, I = m->intermediate;
    if (D % 2) return -1;
    if (R < 1) return 0;
    if (b->logit_rows) /* ascending, within [0, R) */
        for (int64_t i = 0; i < b->n_logit_rows; i++)
            if (b->logit_rows[i] < 0 || b->logit_rows[i] >= R || (i && b->logit_rows[i] <= b->logit_rows[i - 1]))
                return -3;
    const int64_t widths[10] = {H * D, KV * D, KV * D, H * D, C, I, I, C, KV * D, KV * D}; /* Buffers' order */
    int64_t shared_floats = 0;
    for (int i = 0; i < 10; i++) shared_floats += R * widths[i];
    /* the runs first (int64 aligned), then the floats */
    Run *runs = malloc(sizeof(Run) * R + sizeof(float) * (shared_floats + threads * thread_floats(m, R)));
    if (!runs) return -1;
    if (find_runs(b, runs)) {
        free(runs);
        return -2;
    }
    float *parts[10], *at = (float *)(runs + R);
    for (int i = 0; i < 10; i++) parts[i] = at, at += R * widths[i];
    Job job = {m, b, {parts[0], parts[1], parts[2], parts[3], parts[4], parts[5], parts[6], parts[7], parts[8], parts[9], runs, at}};
    pool_run(run_batch, &job, threads);
    free(runs);
    return 0;
}

/* The C decode step: one step of a Gemma model for R rows in one call, each row a token at
 * its own position of its own slot of a slot KV cache, logits out (driven by
 * gemmakit/inference/c_decode.py: BatchDecoder for the serving engine, speculative
 * verification and chunked prefill; CDecoder for one sequence over the torch model's
 * KVCache, one row in slot 0).
 *
 * Why a C step: a Gemma 3 270M step is ~2,500 small torch ops (torch.profiler); on a 2-core
 * CPU their dispatch costs more than the arithmetic. Here the whole step runs as plain loops
 * over the same weights and KV cache tensors the torch model uses, with float32
 * activations, so prefill can stay in torch and decode continue in C. Why batched: the step
 * is memory-bound on its weights (Gemma 3 270M in float32 reads ~1 GB a step), so every
 * matrix is read once for all R rows (gemv.c's matmul_rows): R rows cost about the weight
 * traffic of one plus R times the arithmetic.
 *
 * The maths is the torch model's (gemmakit/model/, which cites the reference
 * implementations), operation for operation: RMSNorm, rotate-half RoPE, q/k norms (Gemma 3),
 * attention soft-capping (Gemma 2), tanh-approximate GeGLU (geglu.c's training forward),
 * pre/post norms, final soft-capping (step.h), over float32, bfloat16 or int8 weights and a
 * float32 or bfloat16 cache. Only the order of the additions inside dot products differs
 * from torch's kernels; it is the same for a row whatever else is in its step.
 *
 * Attention: every row's key and value are stored first, at (slot, position % capacity of
 * the layer), then each row attends to the positions [0, p] (full layers) or
 * [max(0, p - window + 1), p] (sliding layers: a ring of the layer's own capacity) of its
 * own slot. Several rows of one slot at consecutive positions therefore see each other
 * causally, as the rows of a prefill chunk do.
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

/* Buffers every thread reads, (rows, width) each: matrix outputs, written by column ranges
 * between barriers; the scratch of each thread (thread_floats) */
typedef struct {
    float *q, *k, *v, *attn, *o, *act, *up, *down;
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

/* Stores every row's key (normed, rotated) and value: this thread's (row, KV head) pairs */
static void store_keys_values(const Model *m, const Batch *b, const Layer *L, const Buffers *buf,
                              const float *trig, float *head, int tid, int nthreads) {
    const int64_t KV = m->kv_heads, D = m->head_dim, g = L->group;
    for (int64_t i = tid; i < b->rows * KV; i += nthreads) {
        const int64_t r = i / KV, kv = i % KV;
        const float *angles = trig + (r * 2 + g) * D;
        const int64_t at = ((b->slots[r] * KV + kv) * L->capacity + b->positions[r] % L->capacity) * D;
        norm_rope_head(buf->k + i * D, L->k_norm, angles, angles + D / 2, head, D, m->eps);
        const float *value = buf->v + i * D;
        if (m->cache_bf16) {
            uint16_t *kc = (uint16_t *)L->k_cache + at, *vc = (uint16_t *)L->v_cache + at;
            for (int64_t d = 0; d < D; d++) kc[d] = f32_to_bf16(head[d]), vc[d] = f32_to_bf16(value[d]);
        } else {
            memcpy((float *)L->k_cache + at, head, sizeof(float) * D);
            memcpy((float *)L->v_cache + at, value, sizeof(float) * D);
        }
    }
}

/* Attention of this thread's (row, query head) pairs over the visible positions of the row's
 * slot. A sliding ring holds positions lo..p at lo % capacity on, wrapping once: two
 * contiguous runs of keys, scored into one softmax. */
static void attend(const Model *m, const Batch *b, const Layer *L, const Buffers *buf, const float *trig,
                   float *head, float *scores, int tid, int nthreads) {
    const int64_t H = m->heads, KV = m->kv_heads, D = m->head_dim, cap = L->capacity, g = L->group;
    const int64_t elem = m->cache_bf16 ? 2 : 4;
    for (int64_t i = tid; i < b->rows * H; i += nthreads) {
        const int64_t r = i / H, h = i % H, p = b->positions[r];
        const int64_t lo = g == 1 && p - m->window + 1 > 0 ? p - m->window + 1 : 0;
        const int64_t n = p - lo + 1, first = lo % cap;
        const int64_t n1 = n < cap - first ? n : cap - first; /* the run from `first`, then [0, n - n1) */
        const int64_t base = (b->slots[r] * KV + h / (H / KV)) * cap * D;
        const char *keys = (const char *)L->k_cache + base * elem, *values = (const char *)L->v_cache + base * elem;
        const float *angles = trig + (r * 2 + g) * D;
        norm_rope_head(buf->q + i * D, L->q_norm, angles, angles + D / 2, head, D, m->eps);
        const float scale = (float)m->attn_scale;
        float top = key_scores(head, keys + first * D * elem, n1, D, scale, m->attn_softcap, scores, -INFINITY,
                               m->cache_bf16);
        top = key_scores(head, keys, n - n1, D, scale, m->attn_softcap, scores + n1, top, m->cache_bf16);
        softmax_given_top(scores, n, top);
        float *out = buf->attn + i * D;
        memset(out, 0, sizeof(float) * D);
        weighted_sum_add(scores, values + first * D * elem, n1, D, out, m->cache_bf16);
        weighted_sum_add(scores + n1, values, n - n1, D, out, m->cache_bf16);
    }
}

static void run_batch(const void *arg, int tid, int nthreads) {
    const Job *job = arg;
    const Model *m = job->m;
    const Batch *b = job->b;
    const Buffers *buf = &job->buf;
    const int64_t R = b->rows, C = m->hidden, D = m->head_dim, I = m->intermediate;
    float *x = buf->scratch + tid * thread_floats(m, R);
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
    for (int64_t li = 0; li < m->n_layers; li++) {
        const Layer *L = &m->layers[li];
        norm_rows(x, L->input_norm, xn, R, C, m->eps);
        my_columns(&L->q, xn, R, buf->q, tid, nthreads);
        my_columns(&L->k, xn, R, buf->k, tid, nthreads);
        my_columns(&L->v, xn, R, buf->v, tid, nthreads);
        pool_barrier(nthreads);
        store_keys_values(m, b, L, buf, trig, head, tid, nthreads);
        pool_barrier(nthreads); /* every row's key is stored before any row attends */
        attend(m, b, L, buf, trig, head, scores, tid, nthreads);
        pool_barrier(nthreads);
        my_columns(&L->o, buf->attn, R, buf->o, tid, nthreads);
        pool_barrier(nthreads);
        for (int64_t r = 0; r < R; r++) add_residual(x + r * C, buf->o + r * C, L->post_attention_norm, xn, C, m->eps);
        /* MLP: gate and up over the same column range, then GeGLU of those columns */
        norm_rows(x, L->pre_feedforward_norm, xn, R, C, m->eps);
        int64_t lo, hi;
        rows_of(I, tid, nthreads, &lo, &hi);
        matmul_rows(&L->gate, xn, R, buf->act, lo, hi);
        matmul_rows(&L->up, xn, R, buf->up, lo, hi);
        for (int64_t r = 0; r < R; r++) /* in place: each value read before written */
            geglu_forward(buf->act + r * I, buf->up + r * I, buf->act + r * I, lo, hi, 0);
        pool_barrier(nthreads);
        my_columns(&L->down, buf->act, R, buf->down, tid, nthreads);
        pool_barrier(nthreads);
        for (int64_t r = 0; r < R; r++) add_residual(x + r * C, buf->down + r * C, L->post_feedforward_norm, xn, C, m->eps);
    }
    norm_rows(x, m->final_norm, xn, R, C, m->eps);
    int64_t lo, hi;
    rows_of(m->vocab, tid, nthreads, &lo, &hi);
    matmul_rows(&m->lm_head, xn, R, b->logits, lo, hi);
    if (m->final_softcap > 0)
        for (int64_t r = 0; r < R; r++)
            for (int64_t n = lo; n < hi; n++) b->logits[r * m->vocab + n] = softcap(b->logits[r * m->vocab + n], m->final_softcap);
}

int decode_batch(const Model *m, const Batch *b, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_STEP_THREADS) threads = MAX_STEP_THREADS;
    const int64_t R = b->rows, C = m->hidden, H = m->heads, KV = m->kv_heads, D = m->head_dim, I = m->intermediate;
    if (D % 2) return -1;
    if (R < 1) return 0;
    const int64_t widths[8] = {H * D, KV * D, KV * D, H * D, C, I, I, C}; /* Buffers' order */
    int64_t shared_floats = 0;
    for (int i = 0; i < 8; i++) shared_floats += R * widths[i];
    float *all = malloc(sizeof(float) * (shared_floats + threads * thread_floats(m, R)));
    if (!all) return -1;
    float *parts[8], *at = all;
    for (int i = 0; i < 8; i++) parts[i] = at, at += R * widths[i];
    Job job = {m, b, {parts[0], parts[1], parts[2], parts[3], parts[4], parts[5], parts[6], parts[7], at}};
    pool_run(run_batch, &job, threads);
    free(all);
    return 0;
}

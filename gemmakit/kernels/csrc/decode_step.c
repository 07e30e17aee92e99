/* The single-sequence decode step: one step of a Gemma model in one call, token id in,
 * logits out (driven by gemmakit/inference/c_decode.py), and the thread pool that runs it.
 *
 * Why a C decode step: a Gemma 3 270M step is ~2,500 small torch ops (torch.profiler); on a
 * 2-core CPU their dispatch costs more than the arithmetic. Here the whole step runs as plain
 * loops over the same weights and the same KV cache tensors the torch model uses, with
 * float32 activations, so prefill stays in torch and decode continues in C.
 *
 * The maths is the torch model's (gemmakit/model/, which cites the reference
 * implementations), operation for operation: RMSNorm x * rsqrt(mean(x^2) + eps) * (1 + w) in
 * float32 (the 1 + w gains arrive precomputed; norm.c's training forward), rotate-half RoPE,
 * q/k norms (Gemma 3), attention soft-capping (Gemma 2), tanh-approximate GeGLU (geglu.c's
 * training forward), pre/post norms, final soft-capping. Only the order of the additions
 * inside dot products differs from torch's kernels.
 *
 * Threads: the Python caller's thread and n-1 workers run the step together (SPMD). Every
 * matrix is split by output rows; small element-wise work is repeated on each thread on its
 * own copy of the residual stream (identical instructions on identical data, so the copies
 * stay bit-identical) instead of paying a barrier. The pool and the per-row maths are shared
 * with the batched step (step.h, step.c, decode_batch.c).
 */
#include <stdlib.h>

#include "step.h"

static void my_rows(const Mat *m, const float *x, float *y, int tid, int nthreads) {
    int64_t lo, hi;
    rows_of(m->n, tid, nthreads, &lo, &hi);
    matvec(m, x, y, lo, hi);
}

/* Buffers every thread reads: matrix outputs, written by row ranges between barriers. */
typedef struct {
    float *q, *k, *v, *attn, *o, *act, *down;
    float *scratch; /* per thread: scratch_floats(m) floats at scratch + tid * that */
} Shared;

/* a thread's residual stream and its normed copy (hidden each), query head (head_dim),
 * attention scores (max_visible) and up-projection rows (intermediate) */
static int64_t scratch_floats(const Model *m) {
    return m->hidden * 2 + m->head_dim + m->max_visible + m->intermediate;
}

/* one step's arguments, for every thread */
typedef struct {
    const Model *m;
    const Step *st;
    Shared sh;
} Job;

static void run_step(const void *arg, int tid, int nthreads) {
    const Job *job = arg;
    const Model *m = job->m;
    const Step *st = job->st;
    const Shared *sh = &job->sh;
    const int64_t C = m->hidden, H = m->heads, KV = m->kv_heads, D = m->head_dim, I = m->intermediate;
    const int64_t G = H / KV;
    float *x = sh->scratch + tid * scratch_floats(m);
    float *xn = x + C, *qh = xn + C, *scores = qh + D, *up = scores + m->max_visible;
    float trig[2][2][256]; /* per group: cos, sin */
    /* the embedding row, times sqrt(hidden) rounded to the activation dtype */
    mat_row(&m->embed, st->token, x);
    for (int64_t i = 0; i < C; i++) x[i] *= m->embed_scale;
    for (int g = 0; g < 2; g++)
        if (m->inv_freq[g]) rope_angles(st->position, m->inv_freq[g], D, trig[g][0], trig[g][1]);
    for (int64_t li = 0; li < m->n_layers; li++) {
        const Layer *L = &m->layers[li];
        const int g = (int)L->group;
        /* attention: q, k, v by row ranges */
        rms_norm(x, L->input_norm, xn, C, m->eps);
        my_rows(&L->q, xn, sh->q, tid, nthreads);
        my_rows(&L->k, xn, sh->k, tid, nthreads);
        my_rows(&L->v, xn, sh->v, tid, nthreads);
        pool_barrier(nthreads);
        /* each KV head by one thread: norm, RoPE, into its cache slot */
        for (int64_t kv = tid; kv < KV; kv += nthreads) {
            const int64_t at = (kv * L->capacity + st->slot[g]) * D;
            float *kk = qh; /* scratch: the normed, rotated key before it is stored */
            norm_rope_head(sh->k + kv * D, L->k_norm, trig[g][0], trig[g][1], kk, D, m->eps);
            if (m->cache_bf16) {
                uint16_t *kc = (uint16_t *)L->k_cache + at, *vc = (uint16_t *)L->v_cache + at;
                for (int64_t d = 0; d < D; d++) kc[d] = f32_to_bf16(kk[d]), vc[d] = f32_to_bf16(sh->v[kv * D + d]);
            } else {
                memcpy((float *)L->k_cache + at, kk, sizeof(float) * D);
                memcpy((float *)L->v_cache + at, sh->v + kv * D, sizeof(float) * D);
            }
        }
        pool_barrier(nthreads);
        /* each query head by one thread, over the visible slots of its KV head */
        const int64_t S = st->visible[g];
        const int64_t elem = m->cache_bf16 ? 2 : 4;
        for (int64_t h = tid; h < H; h += nthreads) {
            const int64_t base = (h / G) * L->capacity * D * elem;
            norm_rope_head(sh->q + h * D, L->q_norm, trig[g][0], trig[g][1], qh, D, m->eps);
            const float top = key_scores(qh, (const char *)L->k_cache + base, S, D, (float)m->attn_scale,
                                         m->attn_softcap, scores, -INFINITY, m->cache_bf16);
            softmax_given_top(scores, S, top);
            memset(sh->attn + h * D, 0, sizeof(float) * D);
            weighted_sum_add(scores, (const char *)L->v_cache + base, S, D, sh->attn + h * D, m->cache_bf16);
        }
        pool_barrier(nthreads);
        my_rows(&L->o, sh->attn, sh->o, tid, nthreads);
        pool_barrier(nthreads);
        add_residual(x, sh->o, L->post_attention_norm, xn, C, m->eps);
        /* MLP: gate and up over the same row range, then GeGLU of those rows */
        rms_norm(x, L->pre_feedforward_norm, xn, C, m->eps);
        int64_t lo, hi;
        rows_of(I, tid, nthreads, &lo, &hi);
        matvec(&L->gate, xn, sh->act, lo, hi);
        matvec(&L->up, xn, up, lo, hi);
        geglu_forward(sh->act, up, sh->act, lo, hi, 0); /* in place: each value read before written */
        pool_barrier(nthreads);
        my_rows(&L->down, sh->act, sh->down, tid, nthreads);
        pool_barrier(nthreads);
        add_residual(x, sh->down, L->post_feedforward_norm, xn, C, m->eps);
    }
    rms_norm(x, m->final_norm, xn, C, m->eps);
    int64_t lo, hi;
    rows_of(m->vocab, tid, nthreads, &lo, &hi);
    matvec(&m->lm_head, xn, st->logits, lo, hi);
    if (m->final_softcap > 0)
        for (int64_t n = lo; n < hi; n++) st->logits[n] = softcap(st->logits[n], m->final_softcap);
}

/* Runs one step on `threads` threads (the caller's included; fewer if no more can be
 * started). Calls from several threads take turns. Returns 0, or -1 when the head size is
 * unsupported or the buffers cannot be allocated. */
int decode_step(const Model *m, const Step *st, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_STEP_THREADS) threads = MAX_STEP_THREADS;
    const int64_t C = m->hidden, H = m->heads, KV = m->kv_heads, D = m->head_dim, I = m->intermediate;
    if (D > 512 || D % 2) return -1; /* run_step's trig scratch */
    const int64_t shared_floats = H * D * 2 + KV * D * 2 + C * 2 + I;
    float *buf = malloc(sizeof(float) * (shared_floats + threads * scratch_floats(m)));
    if (!buf) return -1;
    Job job = {m, st,
               {buf, buf + H * D, buf + H * D + KV * D, buf + H * D + KV * D * 2, buf + H * D * 2 + KV * D * 2,
                buf + H * D * 2 + KV * D * 2 + C, buf + H * D * 2 + KV * D * 2 + C + I, buf + shared_floats}};
    pool_run(run_step, &job, threads);
    free(buf);
    return 0;
}

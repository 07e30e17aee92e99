/* The decode step's helpers (internal, for decode_batch.c): the per-row maths of a Gemma
 * block outside the matrix products, and the worker pool that runs a step on several
 * threads (step.c).
 *
 * The maths is the torch model's (gemmakit/model/, which cites the reference
 * implementations): RMSNorm x * rsqrt(mean(x^2) + eps) * (1 + w) in float32 (norm.c's
 * training forward, the 1 + w gains precomputed), rotate-half RoPE, attention soft-capping
 * (Gemma 2), softmax, the probability-weighted sum of the value rows.
 */
#ifndef GEMMAKIT_STEP_H
#define GEMMAKIT_STEP_H

#include "gemv.h"

/* [lo, hi) of n items: thread tid's contiguous share */
static inline void rows_of(int64_t n, int tid, int nthreads, int64_t *lo, int64_t *hi) {
    *lo = n * tid / nthreads;
    *hi = n * (tid + 1) / nthreads;
}

/* y = RMSNorm(x) * gain over n floats: the training kernel's forward on one float32 row */
static inline void rms_norm(const float *x, const float *gain, float *y, int64_t n, double eps) {
    float rstd;
    rms_norm_forward(x, gain, y, &rstd, n, eps, 0, 1, 0);
}

/* x += post_norm(y), or x += y where the model has no post-norm (Gemma 1); tmp: C floats */
static inline void add_residual(float *x, const float *y, const float *post_norm, float *tmp, int64_t C,
                                double eps) {
    if (post_norm) {
        rms_norm(y, post_norm, tmp, C, eps);
        y = tmp;
    }
    for (int64_t i = 0; i < C; i++) x[i] += y[i];
}

/* cos and sin of position * inv_freq[i] for the D/2 frequencies of a head */
static inline void rope_angles(int64_t position, const float *inv_freq, int64_t D, float *cos_, float *sin_) {
    for (int64_t i = 0; i < D / 2; i++) {
        float f = (float)position * inv_freq[i];
        cos_[i] = cosf(f), sin_[i] = sinf(f);
    }
}

/* in place on one head (head_dim D): x*cos + rotate_half(x)*sin */
static inline void rope(float *x, const float *cos_, const float *sin_, int64_t D) {
    int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos_[i] - b * sin_[i];
        x[i + half] = b * cos_[i] + a * sin_[i];
    }
}

static inline float softcap(float v, double cap) { return cap > 0 ? tanhf(v / (float)cap) * (float)cap : v; }

/* out = norm(x) (or x where norm is NULL), then rotated: one query or key head */
static inline void norm_rope_head(const float *x, const float *norm, const float *cos_, const float *sin_,
                                  float *out, int64_t D, double eps) {
    if (norm) rms_norm(x, norm, out, D, eps);
    else memcpy(out, x, sizeof(float) * D);
    rope(out, cos_, sin_, D);
}

/* --- attention over the queries that share a KV head (step.c) -------------------------- */

/* One KV head of one slot as a step sees it: position x before the run's first position from
 * the cache (a full layer's rows, or a sliding layer's ring: x at x % cap), from the run's
 * first position on from the run's staged rows (x at x - first). row_bytes: one key or value
 * row (head_dim float32 or bfloat16). */
typedef struct {
    const char *k_cache, *v_cache, *k_new, *v_new;
    int64_t cap, first, row_bytes, bf16;
} KVRows;

/* One query head of one row: its D values, the positions [lo, hi] it sees, its scores
 * (scores[x - lo], then its probabilities in place) and its output (D floats). */
typedef struct {
    const float *q;
    float *scores, *out;
    int64_t lo, hi;
} Query;

/* scores[x - lo] = softcap(q . key(x) * scale) for the positions x in [x0, x1) that each of
 * the nq queries sees: every key row read once for all the queries (4 x 4 tiles in
 * registers). Each dot is one fixed sum over D whatever the tile, the queries or the range it
 * is computed in, so a score does not depend on what else is in the step. */
void attention_scores(const Query *qs, int64_t nq, const KVRows *kv, int64_t x0, int64_t x1, int64_t D, float scale,
                      double cap);

/* out[d] += p[x - lo] * value(x)[d] for d in [d0, d1) and the positions x in [x0, x1) each of
 * the nq queries sees, in position order, each product added with one rounding (an FMA):
 * every out[d] is the same chain of FMAs however the positions, the columns or the queries are
 * split between calls. */
void attention_sum(const Query *qs, int64_t nq, const KVRows *kv, int64_t x0, int64_t x1, int64_t d0, int64_t d1,
                   int64_t D);

/* scores (n) become softmax(scores) (their maximum found first) */
void softmax_row(float *scores, int64_t n);

/* --- the worker pool (step.c) --------------------------------------------------------- */

/* the most threads a step runs on (more are clamped to it) */
#define MAX_STEP_THREADS 64

/* one thread's share of a step: tid in [0, nthreads) */
typedef void (*step_job)(const void *job, int tid, int nthreads);

/* Runs job on `threads` threads, the caller's as tid 0 (fewer if no more can be started),
 * and returns when every thread has finished. One job at a time in the process: calls from
 * several threads take turns. Workers spin briefly between jobs, then sleep. */
void pool_run(step_job fn, const void *job, int threads);

/* Waits until all nthreads threads of the running job reach it. */
void pool_barrier(int nthreads);

#endif

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
 * stay bit-identical) instead of paying a barrier. Workers spin between steps for a couple of
 * milliseconds, then sleep on a condition variable.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#include "gemv.h"

static void rows_of(int64_t n, int tid, int nthreads, int64_t *lo, int64_t *hi) {
    *lo = n * tid / nthreads;
    *hi = n * (tid + 1) / nthreads;
}

static void my_rows(const Mat *m, const float *x, float *y, int tid, int nthreads) {
    int64_t lo, hi;
    rows_of(m->n, tid, nthreads, &lo, &hi);
    matvec(m, x, y, lo, hi);
}

/* y = RMSNorm(x) * gain over n floats: the training kernel's forward on one float32 row */
static void rms_norm(const float *x, const float *gain, float *y, int64_t n, double eps) {
    float rstd;
    rms_norm_forward(x, gain, y, &rstd, n, eps, 0, 1, 0);
}

/* x += post_norm(y), or x += y where the model has no post-norm (Gemma 1); tmp: C floats */
static void add_residual(float *x, const float *y, const float *post_norm, float *tmp, int64_t C, double eps) {
    if (post_norm) {
        rms_norm(y, post_norm, tmp, C, eps);
        y = tmp;
    }
    for (int64_t i = 0; i < C; i++) x[i] += y[i];
}

/* in place on one head (head_dim D): x*cos + rotate_half(x)*sin, cos/sin of (pos * inv_freq) */
static void rope(float *x, const float *cos_, const float *sin_, int64_t D) {
    int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos_[i] - b * sin_[i];
        x[i + half] = b * cos_[i] + a * sin_[i];
    }
}

static float softcap(float v, double cap) { return cap > 0 ? tanhf(v / (float)cap) * (float)cap : v; }

/* scores[s] = e^(scores[s] - top); returns their sum */
static float exp_shifted(float *scores, int64_t n, float top) {
    int64_t s = 0;
    float total = 0.f;
#ifdef __AVX512F__
    __m512 sum = _mm512_setzero_ps(), shift = _mm512_set1_ps(top);
    for (; s + 16 <= n; s += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + s), shift));
        _mm512_storeu_ps(scores + s, e);
        sum = _mm512_add_ps(sum, e);
    }
    total = _mm512_reduce_add_ps(sum);
#endif
    for (; s < n; s++) total += (scores[s] = expf(scores[s] - top));
    return total;
}

/* out (D) = sum over s of p[s] * values[s], values (S, D) rows of float or bfloat16; LOAD16
 * reads 16 values as floats, TO_F32 one */
#define WEIGHTED_SUM(name, T, LOAD16, TO_F32)                                                   \
    static void name(const float *p, const T *values, int64_t S, int64_t D, float *out) {       \
        int64_t d = 0;                                                                          \
        WEIGHTED_SUM_BLOCKS(T, LOAD16)                                                          \
        for (; d < D; d++) {                                                                    \
            float acc = 0.f;                                                                    \
            for (int64_t s = 0; s < S; s++) acc += p[s] * TO_F32(values[s * D + d]);            \
            out[d] = acc;                                                                       \
        }                                                                                       \
    }
#ifdef __AVX512F__
/* 128 outputs in registers per pass over the rows */
#define WEIGHTED_SUM_BLOCKS(T, LOAD16)                                                          \
    for (; d + 128 <= D; d += 128) {                                                            \
        __m512 acc[8];                                                                          \
        for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_ps();                               \
        for (int64_t s = 0; s < S; s++) {                                                       \
            const __m512 w = _mm512_set1_ps(p[s]);                                              \
            const T *v = values + s * D + d;                                                    \
            for (int j = 0; j < 8; j++) acc[j] = _mm512_fmadd_ps(w, LOAD16(v + 16 * j), acc[j]); \
        }                                                                                       \
        for (int j = 0; j < 8; j++) _mm512_storeu_ps(out + d + 16 * j, acc[j]);                 \
    }
#else
#define WEIGHTED_SUM_BLOCKS(T, LOAD16)
#endif
WEIGHTED_SUM(weighted_sum, float, LOAD_F32, SAME_F32)
WEIGHTED_SUM(weighted_sum_bf16, uint16_t, load_bf16, bf16_to_f32)

/* --- threads -------------------------------------------------------------------------- */

#define MAX_THREADS 64

static atomic_int barrier_count, barrier_phase;

static void barrier(int nthreads) {
    if (nthreads == 1) return;
    int phase = atomic_load(&barrier_phase);
    if (atomic_fetch_add(&barrier_count, 1) == nthreads - 1) {
        atomic_store(&barrier_count, 0);
        atomic_fetch_add(&barrier_phase, 1);
    } else {
        while (atomic_load(&barrier_phase) == phase) {
            spin_pause();
        }
    }
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

static void run_step(const Model *m, const Step *st, const Shared *sh, int tid, int nthreads) {
    const int64_t C = m->hidden, H = m->heads, KV = m->kv_heads, D = m->head_dim, I = m->intermediate;
    const int64_t G = H / KV;
    float *x = sh->scratch + tid * scratch_floats(m);
    float *xn = x + C, *qh = xn + C, *scores = qh + D, *up = scores + m->max_visible;
    float *cos_g[2], *sin_g[2];
    float trig[2][2][256];
    /* the embedding row, times sqrt(hidden) rounded to the activation dtype */
    mat_row(&m->embed, st->token, x);
    for (int64_t i = 0; i < C; i++) x[i] *= m->embed_scale;
    for (int g = 0; g < 2; g++) {
        cos_g[g] = trig[g][0], sin_g[g] = trig[g][1];
        if (!m->inv_freq[g]) continue;
        for (int64_t i = 0; i < D / 2; i++) {
            float f = (float)st->position * m->inv_freq[g][i];
            cos_g[g][i] = cosf(f), sin_g[g][i] = sinf(f);
        }
    }
    for (int64_t li = 0; li < m->n_layers; li++) {
        const Layer *L = &m->layers[li];
        const int g = (int)L->group;
        /* attention: q, k, v by row ranges */
        rms_norm(x, L->input_norm, xn, C, m->eps);
        my_rows(&L->q, xn, sh->q, tid, nthreads);
        my_rows(&L->k, xn, sh->k, tid, nthreads);
        my_rows(&L->v, xn, sh->v, tid, nthreads);
        barrier(nthreads);
        /* each KV head by one thread: norm, RoPE, into its cache slot */
        for (int64_t kv = tid; kv < KV; kv += nthreads) {
            const int64_t at = (kv * L->capacity + st->slot[g]) * D;
            float *kk = qh; /* scratch: the normed, rotated key before it is stored */
            if (L->k_norm) rms_norm(sh->k + kv * D, L->k_norm, kk, D, m->eps);
            else memcpy(kk, sh->k + kv * D, sizeof(float) * D);
            rope(kk, cos_g[g], sin_g[g], D);
            if (m->cache_bf16) {
                uint16_t *kc = (uint16_t *)L->k_cache + at, *vc = (uint16_t *)L->v_cache + at;
                for (int64_t d = 0; d < D; d++) kc[d] = f32_to_bf16(kk[d]), vc[d] = f32_to_bf16(sh->v[kv * D + d]);
            } else {
                memcpy((float *)L->k_cache + at, kk, sizeof(float) * D);
                memcpy((float *)L->v_cache + at, sh->v + kv * D, sizeof(float) * D);
            }
        }
        barrier(nthreads);
        /* each query head by one thread, over the visible slots of its KV head */
        const int64_t S = st->visible[g];
        for (int64_t h = tid; h < H; h += nthreads) {
            const int64_t kv = h / G;
            const int64_t base = kv * L->capacity * D;
            if (L->q_norm) rms_norm(sh->q + h * D, L->q_norm, qh, D, m->eps);
            else memcpy(qh, sh->q + h * D, sizeof(float) * D);
            rope(qh, cos_g[g], sin_g[g], D);
            float top = -INFINITY;
            for (int64_t s = 0; s < S; s++) {
                const float dot = m->cache_bf16 ? dot_bf16(qh, (const uint16_t *)L->k_cache + base + s * D, D)
                                                : dot_f32(qh, (const float *)L->k_cache + base + s * D, D);
                float v = softcap(dot * (float)m->attn_scale, m->attn_softcap);
                scores[s] = v;
                if (v > top) top = v;
            }
            const float inv_total = 1.f / exp_shifted(scores, S, top);
            for (int64_t s = 0; s < S; s++) scores[s] *= inv_total;
            if (m->cache_bf16) weighted_sum_bf16(scores, (const uint16_t *)L->v_cache + base, S, D, sh->attn + h * D);
            else weighted_sum(scores, (const float *)L->v_cache + base, S, D, sh->attn + h * D);
        }
        barrier(nthreads);
        my_rows(&L->o, sh->attn, sh->o, tid, nthreads);
        barrier(nthreads);
        add_residual(x, sh->o, L->post_attention_norm, xn, C, m->eps);
        /* MLP: gate and up over the same row range, then GeGLU of those rows */
        rms_norm(x, L->pre_feedforward_norm, xn, C, m->eps);
        int64_t lo, hi;
        rows_of(I, tid, nthreads, &lo, &hi);
        matvec(&L->gate, xn, sh->act, lo, hi);
        matvec(&L->up, xn, up, lo, hi);
        geglu_forward(sh->act, up, sh->act, lo, hi, 0); /* in place: each value read before written */
        barrier(nthreads);
        my_rows(&L->down, sh->act, sh->down, tid, nthreads);
        barrier(nthreads);
        add_residual(x, sh->down, L->post_feedforward_norm, xn, C, m->eps);
    }
    rms_norm(x, m->final_norm, xn, C, m->eps);
    int64_t lo, hi;
    rows_of(m->vocab, tid, nthreads, &lo, &hi);
    matvec(&m->lm_head, xn, st->logits, lo, hi);
    if (m->final_softcap > 0)
        for (int64_t n = lo; n < hi; n++) st->logits[n] = softcap(st->logits[n], m->final_softcap);
}

/* --- the worker pool ------------------------------------------------------------------ */

static pthread_mutex_t step_lock = PTHREAD_MUTEX_INITIALIZER; /* one step at a time: the pool is shared */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static atomic_int job_generation, job_done;
static int pool_size; /* workers started (threads beyond the caller's) */
static int job_threads;
static const Model *job_model;
static const Step *job_step;
static const Shared *job_shared;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *worker(void *arg) {
    const int tid = (int)(intptr_t)arg;
    int seen = 0;
    for (;;) {
        /* Spin briefly (the next decode step is usually a fraction of a millisecond away),
         * then sleep so an idle pool costs nothing. */
        double until = now_s() + 0.002;
        int spins = 0;
        while (atomic_load(&job_generation) == seen) {
            if (++spins % 1024 == 0 && now_s() > until) {
                pthread_mutex_lock(&pool_lock);
                while (atomic_load(&job_generation) == seen) pthread_cond_wait(&pool_wake, &pool_lock);
                pthread_mutex_unlock(&pool_lock);
            }
            spin_pause();
        }
        seen = atomic_load(&job_generation);
        if (tid < job_threads) run_step(job_model, job_step, job_shared, tid, job_threads);
        atomic_fetch_add(&job_done, 1);
    }
    return NULL;
}

/* A forked child has none of the parent's workers: it starts its own pool. */
static void forget_pool(void) {
    pool_size = 0;
    atomic_store(&barrier_count, 0);
    pthread_mutex_init(&step_lock, NULL);
    pthread_mutex_init(&pool_lock, NULL);
    pthread_cond_init(&pool_wake, NULL);
}

static pthread_once_t fork_handler_once = PTHREAD_ONCE_INIT;

static void install_fork_handler(void) { pthread_atfork(NULL, NULL, forget_pool); }

/* Runs one step on `threads` threads (the caller's included; fewer if no more can be
 * started). Calls from several threads take turns. Returns 0, or -1 when the head size is
 * unsupported or the buffers cannot be allocated. */
int decode_step(const Model *m, const Step *st, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    const int64_t C = m->hidden, H = m->heads, KV = m->kv_heads, D = m->head_dim, I = m->intermediate;
    if (D > 512 || D % 2) return -1; /* run_step's trig scratch */
    const int64_t shared_floats = H * D * 2 + KV * D * 2 + C * 2 + I;
    float *buf = malloc(sizeof(float) * (shared_floats + threads * scratch_floats(m)));
    if (!buf) return -1;
    pthread_once(&fork_handler_once, install_fork_handler);
    pthread_mutex_lock(&step_lock);
    Shared sh = {buf, buf + H * D, buf + H * D + KV * D, buf + H * D + KV * D * 2, buf + H * D * 2 + KV * D * 2,
                 buf + H * D * 2 + KV * D * 2 + C, buf + H * D * 2 + KV * D * 2 + C + I, buf + shared_floats};
    pthread_mutex_lock(&pool_lock);
    while (pool_size < threads - 1) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker, (void *)(intptr_t)(pool_size + 1)) != 0) break;
        pthread_detach(t);
        pool_size++;
    }
    if (pool_size < threads - 1) threads = pool_size + 1;
    job_model = m, job_step = st, job_shared = &sh, job_threads = threads;
    atomic_store(&job_done, 0);
    atomic_fetch_add(&job_generation, 1);
    pthread_cond_broadcast(&pool_wake);
    pthread_mutex_unlock(&pool_lock);
    run_step(m, st, &sh, 0, threads);
    while (atomic_load(&job_done) < pool_size) {
        spin_pause();
    }
    pthread_mutex_unlock(&step_lock);
    free(buf);
    return 0;
}

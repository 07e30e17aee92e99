/* The decode steps' attention helpers and their worker pool (step.h).
 *
 * Threads: the Python caller's thread and n-1 workers run a step together (SPMD, one job
 * function per step kind). Workers spin between steps for a couple of milliseconds, then
 * sleep on a condition variable.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#include "step.h"

float key_scores(const float *q, const void *keys, int64_t S, int64_t D, float scale, double cap, float *scores,
                 float top, int64_t bf16) {
    for (int64_t s = 0; s < S; s++) {
        const float dot = bf16 ? dot_bf16(q, (const uint16_t *)keys + s * D, D) : dot_f32(q, (const float *)keys + s * D, D);
        const float v = softcap(dot * scale, cap);
        scores[s] = v;
        if (v > top) top = v;
    }
    return top;
}

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

void softmax_given_top(float *scores, int64_t n, float top) {
    const float inv_total = 1.f / exp_shifted(scores, n, top);
    for (int64_t s = 0; s < n; s++) scores[s] *= inv_total;
}

/* out (D) += sum over s of p[s] * values[s]; LOAD16 reads 16 values as floats, TO_F32 one.
 * Every product is added with one rounding (fmaf, as the vector blocks' FMA): the compiler
 * otherwise contracts some vectorized forms of the loop and not others, and a sum over the
 * rows split in two calls (the cache's keys, then a step's own) would differ in the last bit
 * from the same sum in one call. */
#define WEIGHTED_SUM(name, T, LOAD16, TO_F32)                                                   \
    static void name(const float *p, const T *values, int64_t S, int64_t D, float *out) {       \
        int64_t d = 0;                                                                          \
        WEIGHTED_SUM_BLOCKS(T, LOAD16)                                                          \
        for (; d < D; d++) {                                                                    \
            float acc = out[d];                                                                 \
            for (int64_t s = 0; s < S; s++) acc = fmaf(p[s], TO_F32(values[s * D + d]), acc); \
            out[d] = acc;                                                                       \
        }                                                                                       \
    }
#ifdef __AVX512F__
/* 128 outputs in registers per pass over the rows */
#define WEIGHTED_SUM_BLOCKS(T, LOAD16)                                                          \
    for (; d + 128 <= D; d += 128) {                                                            \
        __m512 acc[8];                                                                          \
        for (int j = 0; j < 8; j++) acc[j] = _mm512_loadu_ps(out + d + 16 * j);                 \
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
WEIGHTED_SUM(weighted_sum_f32, float, LOAD_F32, SAME_F32)
WEIGHTED_SUM(weighted_sum_bf16, uint16_t, load_bf16, bf16_to_f32)

void weighted_sum_add(const float *p, const void *values, int64_t S, int64_t D, float *out, int64_t bf16) {
    if (bf16) weighted_sum_bf16(p, (const uint16_t *)values, S, D, out);
    else weighted_sum_f32(p, (const float *)values, S, D, out);
}

/* --- threads -------------------------------------------------------------------------- */



static atomic_int barrier_count, barrier_phase;

/* One poll of a spin wait. Past YIELD_AFTER polls the thread gives its core away at each
 * poll: on a machine with more runnable threads than cores the thread being waited for
 * may not be running, and spinning on would only keep it off the core (measured on a 2-core
 * VM at load 12: an int8 Gemma 3 270M step on 2 threads took 1.6 s against 19 ms of CPU). */
#define YIELD_AFTER 2000
static inline void wait_turn(int spins) {
    if (spins < YIELD_AFTER) spin_pause();
    else sched_yield();
}

void pool_barrier(int nthreads) {
    if (nthreads == 1) return;
    int phase = atomic_load(&barrier_phase);
    if (atomic_fetch_add(&barrier_count, 1) == nthreads - 1) {
        atomic_store(&barrier_count, 0);
        atomic_fetch_add(&barrier_phase, 1);
    } else {
        for (int spins = 0; atomic_load(&barrier_phase) == phase; spins++) wait_turn(spins);
    }
}

static pthread_mutex_t step_lock = PTHREAD_MUTEX_INITIALIZER; /* one step at a time: the pool is shared */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static atomic_int job_generation, job_done;
static int pool_size; /* workers started (threads beyond the caller's) */
static int job_threads;
static step_job job_fn;
static const void *job_arg;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* The job generation current when worker t was started: the last job it must not take for
 * a new one. Written by its creator before pthread_create (which orders it before the new
 * thread's first read). A worker that began at 0 instead would take a pool that grows after
 * jobs ran (a step on 1 thread, then on 2) as a new job at once: it could run with the last
 * job's stale arguments, or count itself done before running the real one, so that pool_run
 * returned while it still wrote into freed buffers. */
static int first_generation[MAX_STEP_THREADS];

static void *worker(void *arg) {
    const int tid = (int)(intptr_t)arg;
    int seen = first_generation[tid];
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
        if (tid < job_threads) job_fn(job_arg, tid, job_threads);
        atomic_fetch_add(&job_done, 1);
    }
    return NULL;
}

/* A forked child has none of the parent's workers: it starts its own pool, from job
 * generation 0 (its new workers start from the generation current then: first_generation). */
static void forget_pool(void) {
    pool_size = 0;
    atomic_store(&job_generation, 0);
    atomic_store(&barrier_count, 0);
    pthread_mutex_init(&step_lock, NULL);
    pthread_mutex_init(&pool_lock, NULL);
    pthread_cond_init(&pool_wake, NULL);
}

static pthread_once_t fork_handler_once = PTHREAD_ONCE_INIT;

static void install_fork_handler(void) { pthread_atfork(NULL, NULL, forget_pool); }

void pool_run(step_job fn, const void *job, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_STEP_THREADS) threads = MAX_STEP_THREADS;
    pthread_once(&fork_handler_once, install_fork_handler);
    pthread_mutex_lock(&step_lock);
    pthread_mutex_lock(&pool_lock);
    while (pool_size < threads - 1) {
        pthread_t t;
        first_generation[pool_size + 1] = atomic_load(&job_generation);
        if (pthread_create(&t, NULL, worker, (void *)(intptr_t)(pool_size + 1)) != 0) break;
        pthread_detach(t);
        pool_size++;
    }
    if (pool_size < threads - 1) threads = pool_size + 1;
    job_fn = fn, job_arg = job, job_threads = threads;
    atomic_store(&job_done, 0);
    atomic_fetch_add(&job_generation, 1);
    pthread_cond_broadcast(&pool_wake);
    pthread_mutex_unlock(&pool_lock);
    fn(job, 0, threads);
    for (int spins = 0; atomic_load(&job_done) < pool_size; spins++) wait_turn(spins);
    pthread_mutex_unlock(&step_lock);
}

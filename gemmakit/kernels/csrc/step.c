/* The decode steps' attention kernels and their worker pool (step.h).
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

/* --- attention: the queries of one KV head against its key and value rows --------------- */

/* The vector width of the build: AVX-512's 16 floats, AVX2's 8 (with FMA), else one. Every
 * product below is added with one rounding (a fused multiply-add: the vector FMAs, fmaf in the
 * scalar build and the tails), so the compiler's contraction choices cannot make one call's
 * sum differ from another's. */
#if defined(__AVX512F__)
typedef __m512 vec;
#define VL 16
#define V_ZERO() _mm512_setzero_ps()
#define V_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define V_LOAD(p) _mm512_loadu_ps(p)
#define V_LOAD_BF16(p) load_bf16(p)
#define V_STORE(p, v) _mm512_storeu_ps(p, v)
#define V_SET1(f) _mm512_set1_ps(f)
#define V_SUM(v) _mm512_reduce_add_ps(v)
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
#define VL 8
#define V_ZERO() _mm256_setzero_ps()
#define V_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define V_LOAD(p) _mm256_loadu_ps(p)
#define V_LOAD_BF16(p) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define V_STORE(p, v) _mm256_storeu_ps(p, v)
#define V_SET1(f) _mm256_set1_ps(f)
static inline float v_sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#define V_SUM(v) v_sum8(v)
#else
typedef float vec;
#define VL 1
#define V_ZERO() 0.f
#define V_FMA(a, b, c) fmaf(a, b, c)
#define V_LOAD(p) (*(p))
#define V_LOAD_BF16(p) bf16_to_f32(*(p))
#define V_STORE(p, v) (*(p) = (v))
#define V_SET1(f) (f)
#define V_SUM(v) (v)
#endif

/* v kept in a register: each key and query vector loaded once per tile step, not again by
 * every FMA that reads it (GCC folds the loads into the FMAs otherwise: 20 loads a step
 * instead of 8, and the tile waits on loads) */
#ifdef __AVX2__
#define IN_REGISTER(v)               \
    ({                               \
        vec in_register_ = (v);      \
        __asm__("" : "+v"(in_register_)); \
        in_register_;                \
    })
#else
#define IN_REGISTER(v) (v)
#endif

/* Key and value rows are fetched this many positions ahead of their use: a decode row's keys
 * and values come from memory (the step's weights have pushed them out of the caches), and
 * the hardware prefetcher alone left the attention of a one-row step waiting on them
 * (measured, bundled Q4_K_M at position 600, one thread, loaded machine: perf samples in
 * attention 1118-1165 -> 1003-1043 for the same 200 steps). */
enum { AHEAD_ROWS = 8 };

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* element t of a key or value row, float32 or (bf16) bfloat16 */
ALWAYS_INLINE float row_value(const char *row, int64_t t, const int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)row)[t]) : ((const float *)row)[t];
}

ALWAYS_INLINE vec row_load(const char *row, int64_t t, const int bf16) {
    return bf16 ? V_LOAD_BF16((const uint16_t *)row + t) : V_LOAD((const float *)row + t);
}

/* The rows from position x on that lie one after the other in memory (up to x1, the end of
 * the ring or the cache's part): their number, and the first one's key and value rows. */
static int64_t kv_stretch(const KVRows *kv, int64_t x, int64_t x1, const char **k, const char **v) {
    if (x >= kv->first) {
        *k = kv->k_new + (x - kv->first) * kv->row_bytes, *v = kv->v_new + (x - kv->first) * kv->row_bytes;
        return x1 - x;
    }
    const int64_t i = x % kv->cap;
    *k = kv->k_cache + i * kv->row_bytes, *v = kv->v_cache + i * kv->row_bytes;
    return min64(min64(x1, kv->first) - x, kv->cap - i);
}

#ifdef __AVX512F__
/* The 16 lane sums of v[j * 4 + i] (j, i < 4) at once, lane i * 4 + j: a fixed tree of
 * additions per sum (halves, quarters, pairs, then the last two), whatever the other vectors
 * hold, in 45 operations instead of 16 reductions of about 10 */
static inline __m512 sums16(const __m512 v[4][4]) {
    __m512 s[8], t[4], z[2];
    for (int q = 0; q < 8; q++) {
        const __m512 a = v[q / 2][q % 2 * 2], b = v[q / 2][q % 2 * 2 + 1];
        s[q] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    }
    for (int q = 0; q < 4; q++)
        t[q] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * q], s[2 * q + 1], 0x88),
                             _mm512_shuffle_f32x4(s[2 * q], s[2 * q + 1], 0xDD));
    for (int q = 0; q < 2; q++)
        z[q] = _mm512_add_ps(_mm512_unpacklo_ps(t[2 * q], t[2 * q + 1]), _mm512_unpackhi_ps(t[2 * q], t[2 * q + 1]));
    return _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x44), _mm512_shuffle_ps(z[0], z[1], 0xEE));
}
#endif

/* dots[i * 4 + j] = q[j] . k[i] for NJ queries and 4 keys: per pair one accumulator over the
 * D / VL vectors in order, its lanes summed (AVX-512: sums16, the same tree for every pair
 * whatever NJ), then the D % VL leftover products */
ALWAYS_INLINE void dots_tile(const float *const *q, const char *const *k, int64_t D, const int NJ, const int bf16,
                             float dots[16]) {
    vec acc[4][4];
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < 4; i++) acc[j][i] = V_ZERO();
    int64_t d = 0;
    for (; d + VL <= D; d += VL) {
        vec kv[4];
        for (int i = 0; i < 4; i++) kv[i] = IN_REGISTER(row_load(k[i], d, bf16));
        for (int j = 0; j < NJ; j++) {
            const vec qv = IN_REGISTER(V_LOAD(q[j] + d));
            for (int i = 0; i < 4; i++) acc[j][i] = V_FMA(qv, kv[i], acc[j][i]);
        }
    }
#ifdef __AVX512F__
    _mm512_storeu_ps(dots, sums16((const __m512(*)[4])acc));
#else
    for (int j = 0; j < NJ; j++)
        for (int i = 0; i < 4; i++) dots[i * 4 + j] = V_SUM(acc[j][i]);
#endif
    if (d < D)
        for (int j = 0; j < NJ; j++)
            for (int i = 0; i < 4; i++)
                for (int64_t t = d; t < D; t++) dots[i * 4 + j] = fmaf(q[j][t], row_value(k[i], t, bf16), dots[i * 4 + j]);
}

/* the scores of queries qs[0, nj) (nj <= 4) against the 4 keys at positions x.. (the last
 * repeated where fewer than 4 remain: nk) */
static void score_tile(const Query *qs, int nj, const char *const *k, int64_t x, int nk, int64_t D, int bf16,
                       float scale, double cap) {
    const float *q[4];
    for (int j = 0; j < 4; j++) q[j] = qs[j < nj ? j : nj - 1].q;
    float dots[16];
#define SCORE_TILE(NJ)                                                       \
    case NJ:                                                                 \
        if (bf16) dots_tile(q, k, D, NJ, 1, dots);                           \
        else dots_tile(q, k, D, NJ, 0, dots);                                \
        break;
    switch (nj) {
        SCORE_TILE(1)
        SCORE_TILE(2)
        SCORE_TILE(3)
        SCORE_TILE(4)
    }
#undef SCORE_TILE
    for (int j = 0; j < nj; j++)
        for (int i = 0; i < nk; i++)
            if (x + i >= qs[j].lo && x + i <= qs[j].hi)
                qs[j].scores[x + i - qs[j].lo] = softcap(dots[i * 4 + j] * scale, cap);
}

void attention_scores(const Query *qs, int64_t nq, const KVRows *kv, int64_t x0, int64_t x1, int64_t D, float scale,
                      double cap) {
    for (int64_t x = x0; x < x1;) {
        const char *k0, *v0;
        const int64_t n = kv_stretch(kv, x, x1, &k0, &v0);
        for (int64_t i0 = 0; i0 < n; i0 += 4) {
            const int nk = (int)min64(4, n - i0);
            const char *k[4];
            for (int i = 0; i < 4; i++) k[i] = k0 + (i0 + (i < nk ? i : nk - 1)) * kv->row_bytes;
            if (i0 + AHEAD_ROWS + 4 <= n) /* the key rows two tiles on */
                for (int64_t b = 0; b < 4 * kv->row_bytes; b += 64) __builtin_prefetch(k0 + (i0 + AHEAD_ROWS) * kv->row_bytes + b);
            for (int64_t j0 = 0; j0 < nq; j0 += 4) {
                const int nj = (int)min64(4, nq - j0);
                int seen = 0; /* a tile no query of which sees these positions is skipped */
                for (int j = 0; j < nj; j++) seen |= qs[j0 + j].lo < x + i0 + nk && qs[j0 + j].hi >= x + i0;
                if (seen) score_tile(qs + j0, nj, k, x + i0, nk, D, (int)kv->bf16, scale, cap);
            }
        }
        x += n;
    }
}

/* acc (NJ x NV vectors) += the weighted value rows of the positions [x0, x1) each query
 * sees, in position order (every: each query sees them all, no test per position) */
ALWAYS_INLINE void sum_rows(const Query *qs, const KVRows *kv, int64_t x0, int64_t x1, int64_t d, const int NJ,
                            const int NV, const int bf16, const int every, vec acc[4][4]) {
    for (int64_t x = x0; x < x1;) {
        const char *k0, *v0;
        const int64_t n = kv_stretch(kv, x, x1, &k0, &v0);
        for (int64_t i = 0; i < n; i++) {
            const char *row = v0 + i * kv->row_bytes;
            if (i + AHEAD_ROWS < n) /* this tile's columns of the value row AHEAD_ROWS on */
                for (int c = 0; c < NV * VL * (bf16 ? 2 : 4); c += 64)
                    __builtin_prefetch(row + AHEAD_ROWS * kv->row_bytes + d * (bf16 ? 2 : 4) + c);
            vec v[4];
            for (int c = 0; c < NV; c++) v[c] = IN_REGISTER(row_load(row, d + c * VL, bf16));
            for (int j = 0; j < NJ; j++)
                if (every || (x + i >= qs[j].lo && x + i <= qs[j].hi)) {
                    const vec w = V_SET1(qs[j].scores[x + i - qs[j].lo]);
                    for (int c = 0; c < NV; c++) acc[j][c] = V_FMA(w, v[c], acc[j][c]);
                }
        }
        x += n;
    }
}

/* out[d .. d + NV * VL) of queries qs[0, NJ) += their weighted values over the positions
 * [x0, x1) each sees: NJ x NV accumulators in registers, each value row read once for all */
ALWAYS_INLINE void sum_tile(const Query *qs, const KVRows *kv, int64_t x0, int64_t x1, int64_t d, const int NJ,
                            const int NV, const int bf16) {
    vec acc[4][4];
    int64_t lo = x0, hi = x1; /* the positions every query sees: no test per position there */
    for (int j = 0; j < NJ; j++) {
        for (int c = 0; c < NV; c++) acc[j][c] = V_LOAD(qs[j].out + d + c * VL);
        lo = max64(lo, qs[j].lo), hi = min64(hi, qs[j].hi + 1);
    }
    if (lo >= hi) lo = hi = x1;
    sum_rows(qs, kv, x0, lo, d, NJ, NV, bf16, 0, acc);
    sum_rows(qs, kv, lo, hi, d, NJ, NV, bf16, 1, acc);
    sum_rows(qs, kv, hi, x1, d, NJ, NV, bf16, 0, acc);
    for (int j = 0; j < NJ; j++)
        for (int c = 0; c < NV; c++) V_STORE(qs[j].out + d + c * VL, acc[j][c]);
}

/* sum_tile for nj (<= 4) queries and NV vectors */
static void sum_tiles(const Query *qs, int nj, const KVRows *kv, int64_t x0, int64_t x1, int64_t d, const int NV) {
    const int bf16 = (int)kv->bf16;
#define SUM_TILE(NJ)                                                   \
    case NJ:                                                           \
        if (bf16) sum_tile(qs, kv, x0, x1, d, NJ, NV, 1);              \
        else sum_tile(qs, kv, x0, x1, d, NJ, NV, 0);                   \
        break;
    switch (nj) {
        SUM_TILE(1)
        SUM_TILE(2)
        SUM_TILE(3)
        SUM_TILE(4)
    }
#undef SUM_TILE
}

void attention_sum(const Query *qs, int64_t nq, const KVRows *kv, int64_t x0, int64_t x1, int64_t d0, int64_t d1,
                   int64_t D) {
    (void)D;
    for (int64_t j0 = 0; j0 < nq; j0 += 4) {
        const int nj = (int)min64(4, nq - j0);
        const Query *tile = qs + j0;
        int64_t lo = x1, hi = x0; /* the positions any query of the tile sees */
        for (int j = 0; j < nj; j++) lo = min64(lo, max64(tile[j].lo, x0)), hi = max64(hi, min64(tile[j].hi + 1, x1));
        if (lo >= hi) continue;
        int64_t d = d0;
        for (; d + 4 * VL <= d1; d += 4 * VL) sum_tiles(tile, nj, kv, lo, hi, d, 4);
        for (; d + VL <= d1; d += VL) sum_tiles(tile, nj, kv, lo, hi, d, 1);
        for (int j = 0; j < nj && d < d1; j++) /* the last columns, one at a time */
            for (int64_t x = max64(tile[j].lo, lo); x < min64(tile[j].hi + 1, hi);) {
                const char *k0, *v0;
                const int64_t n = kv_stretch(kv, x, min64(tile[j].hi + 1, hi), &k0, &v0);
                for (int64_t i = 0; i < n; i++)
                    for (int64_t t = d; t < d1; t++)
                        tile[j].out[t] = fmaf(tile[j].scores[x + i - tile[j].lo],
                                              row_value(v0 + i * kv->row_bytes, t, (int)kv->bf16), tile[j].out[t]);
                x += n;
            }
    }
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

void softmax_row(float *scores, int64_t n) {
    float top = -INFINITY;
    for (int64_t s = 0; s < n; s++)
        if (scores[s] > top) top = scores[s];
    const float inv_total = 1.f / exp_shifted(scores, n, top);
    for (int64_t s = 0; s < n; s++) scores[s] *= inv_total;
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

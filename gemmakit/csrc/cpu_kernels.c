/* gemmakit's CPU kernels (built by gemmakit/cpu_kernels.py):
 *
 * decode_step: one decode step of a Gemma model for a single sequence, in one call: token id
 * in, logits out (driven by gemmakit/c_decode.py).
 * gemv_int8: one token times an int8 weight-only matrix, for the torch step's output
 * projection (gemmakit/quantization.py's Int8Linear; torch's _weight_int8pack_mm takes 6.4 ms
 * for Gemma 3 270M's 262144 x 640 matrix and needs bfloat16 activations).
 * dropout: LoRA's input dropout with a mask rebuilt from a seed (gemmakit/lora.py).
 * softmax_xent_bf16: the cross-entropy gradient of a chunk of bfloat16 logits, in place.
 * rms_norm_backward: RMSNorm's input gradient, for training.
 *
 * Why a C decode step: a Gemma 3 270M step is ~2,500 small torch ops (torch.profiler); on a
 * 2-core CPU their dispatch costs more than the arithmetic. Here the whole step
 * runs as plain loops over the same weights and the same KV cache tensors the torch model
 * uses, with float32 activations, so prefill stays in torch and decode continues in C.
 *
 * The maths is gemmakit/model.py's, operation for operation (which cites the reference
 * implementations): RMSNorm x * rsqrt(mean(x^2) + eps) * (1 + w) in float32 (the 1 + w gains
 * arrive precomputed), rotate-half RoPE, q/k norms (Gemma 3), attention soft-capping
 * (Gemma 2), tanh-approximate GeGLU, pre/post norms, final soft-capping. Only the order of
 * the additions inside dot products differs from torch's kernels.
 *
 * Threads: the Python caller's thread and n-1 workers run the step together (SPMD). Every
 * matrix is split by output rows; small element-wise work is repeated on each thread on
 * its own copy of the residual stream (identical instructions on identical data, so the
 * copies stay bit-identical) instead of paying a barrier. Workers spin between steps for a
 * couple of milliseconds, then sleep on a condition variable.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

enum { W_F32 = 0, W_INT8 = 1, W_BF16 = 2 };

typedef struct {
    /* W_F32: w is float (n, k); W_INT8: w is int8 (n, k) with float scale s (n,);
     * W_BF16: w is bfloat16 (n, k) */
    int64_t type;
    const void *w;
    const float *s;
    int64_t n, k;
} Mat;

typedef struct {
    Mat q, k, v, o, gate, up, down;
    /* 1 + w gains (float32); NULL where the model has no such norm */
    const float *input_norm, *post_attention_norm, *pre_feedforward_norm, *post_feedforward_norm;
    const float *q_norm, *k_norm;
    void *k_cache, *v_cache; /* (kv_heads, capacity, head_dim) of batch row 0, float or bfloat16 */
    int64_t capacity, group;  /* group: 0 full attention, 1 sliding (Step's indices) */
} Layer;

typedef struct {
    int64_t n_layers, hidden, heads, kv_heads, head_dim, intermediate, vocab;
    double eps, attn_scale, attn_softcap, final_softcap; /* softcaps: 0 when absent */
    float embed_scale;                                   /* sqrt(hidden), rounded to the model's dtype */
    const float *inv_freq[2];                            /* head_dim/2 RoPE frequencies per group */
    Mat embed, lm_head;
    const float *final_norm;
    const Layer *layers;
    int64_t max_visible; /* the longest key row any group can have (scratch size) */
    int64_t cache_bf16;  /* the KV cache holds bfloat16 (a bfloat16 model), else float */
} Model;

typedef struct {
    int64_t token, position;
    /* per group: the cache slot written, and the slots attended (all of [0, visible) hold
     * real tokens inside the group's window: the caller checks, so no mask is needed) */
    int64_t slot[2], visible[2];
    float *logits;               /* (vocab,) output */
} Step;

/* --- kernels -------------------------------------------------------------------------- */

/* bfloat16 is the top half of a float32: widening is exact */
static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* round to nearest even, as torch's float -> bfloat16 cast does (finite values) */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#ifdef __AVX512F__
static inline __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#endif

/* x . w over K values, w of type T; LOAD16 reads 16 of them as floats, TO_F32 one. Four
 * accumulators hide the FMA latency. */
#ifdef __AVX512F__
#define DOT_BLOCKS(LOAD16)                                                                      \
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();                                  \
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();                                  \
    for (; k + 64 <= K; k += 64) {                                                              \
        a0 = _mm512_fmadd_ps(LOAD16(w + k), _mm512_loadu_ps(x + k), a0);                        \
        a1 = _mm512_fmadd_ps(LOAD16(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);              \
        a2 = _mm512_fmadd_ps(LOAD16(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);              \
        a3 = _mm512_fmadd_ps(LOAD16(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);              \
    }                                                                                           \
    for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(LOAD16(w + k), _mm512_loadu_ps(x + k), a0); \
    acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
/* 16 int8 weights widened to float32 */
#define LOAD_I8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#else
#define DOT_BLOCKS(LOAD16)
#endif
#define DOT(name, T, LOAD16, TO_F32)                                                            \
    static float name(const float *x, const T *w, int64_t K) {                                  \
        int64_t k = 0;                                                                          \
        float acc = 0.f;                                                                        \
        DOT_BLOCKS(LOAD16)                                                                      \
        for (; k < K; k++) acc += x[k] * TO_F32(w[k]);                                          \
        return acc;                                                                             \
    }
#define LOAD_F32(p) _mm512_loadu_ps(p)
#define SAME_F32(v) (v)
#define I8_TO_F32(v) ((float)(v))
DOT(dot_f32, float, LOAD_F32, SAME_F32)
DOT(dot_i8, int8_t, LOAD_I8, I8_TO_F32)
DOT(dot_bf16, uint16_t, load_bf16, bf16_to_f32)

/* y[n] = row n of m . x for rows [lo, hi) */
static void matvec(const Mat *m, const float *x, float *y, int64_t lo, int64_t hi) {
    if (m->type == W_INT8) {
        const int8_t *w = (const int8_t *)m->w;
        for (int64_t n = lo; n < hi; n++) y[n] = dot_i8(x, w + n * m->k, m->k) * m->s[n];
    } else if (m->type == W_BF16) {
        const uint16_t *w = (const uint16_t *)m->w;
        for (int64_t n = lo; n < hi; n++) y[n] = dot_bf16(x, w + n * m->k, m->k);
    } else {
        const float *w = (const float *)m->w;
        for (int64_t n = lo; n < hi; n++) y[n] = dot_f32(x, w + n * m->k, m->k);
    }
}

/* y[n] = s[n] * (x . row n of the int8 matrix w (N, K)) for rows [start, stop): the torch
 * step's output projection, rows split over Python threads by gemmakit/cpu_kernels.py */
void gemv_int8(const float *x, const int8_t *w, const float *s, float *y, int64_t start, int64_t stop,
               int64_t K) {
    const Mat m = {W_INT8, w, s, stop, K};
    matvec(&m, x, y, start, stop);
}

/* Dropout with a counter-based mask, for LoRA training (gemmakit/lora.py): element i is kept
 * when a 32-bit hash of (seed, i) is at least `threshold` (= p * 2^32, so P(drop) = p within
 * 2^-32), and kept values are multiplied by `scale` (1 / (1 - p)). The mask is a function of
 * the seed and the index alone, so the backward rebuilds it instead of storing it, and any
 * split of [start, stop) over threads gives the same result. The hash is splitmix64's
 * finalizer (Steele, Lea, Flood, "Fast splittable pseudorandom number generators", 2014)
 * over seed + pair index; each 64-bit hash serves two elements. */
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline uint32_t mask_bits(uint64_t seed, int64_t i) {
    uint64_t h = mix64(seed + (uint64_t)(i >> 1) * 0x9E3779B97F4A7C15ULL);
    return (i & 1) ? (uint32_t)(h >> 32) : (uint32_t)h;
}

/* out = x * keep * scale over [start, stop); x and out float32 or (bf16 != 0) bfloat16 and
 * may be the same buffer */
void dropout(const void *x, void *out, int64_t start, int64_t stop, uint64_t seed, uint32_t threshold,
             float scale, int64_t bf16) {
    if (bf16) {
        const uint16_t *src = (const uint16_t *)x;
        uint16_t *dst = (uint16_t *)out;
        for (int64_t i = start; i < stop; i++)
            dst[i] = mask_bits(seed, i) >= threshold ? f32_to_bf16(bf16_to_f32(src[i]) * scale) : 0;
    } else {
        const float *src = (const float *)x;
        float *dst = (float *)out;
        for (int64_t i = start; i < stop; i++) dst[i] = mask_bits(seed, i) >= threshold ? src[i] * scale : 0.0f;
    }
}

static void rows_of(int64_t n, int tid, int nthreads, int64_t *lo, int64_t *hi) {
    *lo = n * tid / nthreads;
    *hi = n * (tid + 1) / nthreads;
}

static void my_rows(const Mat *m, const float *x, float *y, int tid, int nthreads) {
    int64_t lo, hi;
    rows_of(m->n, tid, nthreads, &lo, &hi);
    matvec(m, x, y, lo, hi);
}

static void rms_norm(const float *x, const float *gain, float *y, int64_t n, double eps) {
    float ss = 0.f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.f / sqrtf(ss / (float)n + (float)eps);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * r * gain[i];
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

static float gelu_tanh(float x) {
    /* torch's approximate="tanh": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
    const float k = 0.7978845608028654f;
    return 0.5f * x * (1.f + tanhf(k * (x + 0.044715f * x * x * x)));
}

#ifdef __AVX512F__
/* e^x for 16 floats (x <= 88): x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, Cephes'
 * expf), e^r by its degree-6 Taylor polynomial (truncation r^7/7! < 1.3e-7 relative, about
 * one float32 ulp), scaled by 2^n. Inputs below -88 give 0 or a denormal, as expf does. */
static __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-104.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* RMSNorm's input gradient over rows [lo, hi) of C values, for training (gemmakit/model.py):
 * with xhat = x * rstd and gy = g * gain, dx = rstd * (gy - xhat * mean(gy * xhat)), in
 * float32; g, x and dx are float32 or (bf16 != 0) bfloat16, rstd one float32 per row, gain
 * the float32 (1 + w). torch has no CPU kernel for this (aten::_fused_rms_norm_backward is
 * CUDA-only), and its autograd of F.rms_norm takes ~12 element-wise ops. */
void rms_norm_backward(const void *g, const void *x, const float *rstd, const float *gain, void *dx, int64_t C,
                       int64_t lo, int64_t hi, int64_t bf16) {
    float gy[C > 0 ? C : 1], xh[C > 0 ? C : 1];
    for (int64_t r = lo; r < hi; r++) {
        const float rs = rstd[r];
        float part[16] = {0};
        for (int64_t i = 0; i < C; i++) {
            float gi, xi;
            if (bf16) {
                gi = bf16_to_f32(((const uint16_t *)g)[r * C + i]);
                xi = bf16_to_f32(((const uint16_t *)x)[r * C + i]);
            } else {
                gi = ((const float *)g)[r * C + i];
                xi = ((const float *)x)[r * C + i];
            }
            gy[i] = gi * gain[i];
            xh[i] = xi * rs;
            part[i & 15] += gy[i] * xh[i];
        }
        float dot = 0.f;
        for (int k = 0; k < 16; k++) dot += part[k];
        const float mean = dot / (float)C;
        for (int64_t i = 0; i < C; i++) {
            const float d = rs * (gy[i] - xh[i] * mean);
            if (bf16)
                ((uint16_t *)dx)[r * C + i] = f32_to_bf16(d);
            else
                ((float *)dx)[r * C + i] = d;
        }
    }
}

/* Softmax cross-entropy gradient over rows [lo, hi) of bfloat16 logits z (rows of V), in
 * place, for training's chunked loss (gemmakit/training.py): lse[r] = log sum_v e^z[r,v],
 * then z[r] = softmax(z[r]) - onehot(targets[r]) rounded once to bfloat16, all arithmetic in
 * float32 (sums of blocks of 1024 added in double). Replaces torch's log_softmax, exp and
 * cast passes over a float32 copy of the logits. */
void softmax_xent_bf16(uint16_t *z, const int64_t *targets, float *lse, int64_t V, int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; r++) {
        uint16_t *row = z + r * V;
        float top = -INFINITY;
        int64_t i = 0;
#ifdef __AVX512F__
        __m512 vtop = _mm512_set1_ps(-INFINITY);
        for (; i + 16 <= V; i += 16) vtop = _mm512_max_ps(vtop, load_bf16(row + i));
        top = _mm512_reduce_max_ps(vtop);
#endif
        for (; i < V; i++) top = fmaxf(top, bf16_to_f32(row[i]));
        double sum = 0.0;
        i = 0;
#ifdef __AVX512F__
        const __m512 vt = _mm512_set1_ps(top);
        for (; i + 1024 <= V; i += 1024) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = i; j < i + 1024; j += 16) acc = _mm512_add_ps(acc, exp16(_mm512_sub_ps(load_bf16(row + j), vt)));
            sum += _mm512_reduce_add_ps(acc);
        }
#endif
        for (; i < V; i++) sum += expf(bf16_to_f32(row[i]) - top);
        const float l = top + (float)log(sum);
        lse[r] = l;
        const int64_t y = targets[r];
        const float target_p = expf(bf16_to_f32(row[y]) - l);
        i = 0;
#ifdef __AVX512F__
        const __m512 vl = _mm512_set1_ps(l);
        const __m512i round_bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
        for (; i + 16 <= V; i += 16) {
            __m512i u = _mm512_castps_si512(exp16(_mm512_sub_ps(load_bf16(row + i), vl)));
            /* round to nearest even, as f32_to_bf16 */
            u = _mm512_add_epi32(u, _mm512_add_epi32(round_bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
            _mm256_storeu_si256((__m256i *)(row + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
        }
#endif
        for (; i < V; i++) row[i] = f32_to_bf16(expf(bf16_to_f32(row[i]) - l));
        row[y] = f32_to_bf16(target_p - 1.0f);
    }
}

/* act[i] = gelu_tanh(act[i]) * up[i]; tanh(u) = 1 - 2 / (e^(2u) + 1), 16 at a time */
static void geglu(float *act, const float *up, int64_t n) {
    int64_t i = 0;
#ifdef __AVX512F__
    const __m512 k = _mm512_set1_ps(0.7978845608028654f), c = _mm512_set1_ps(0.044715f);
    const __m512 one = _mm512_set1_ps(1.f), two = _mm512_set1_ps(2.f), half = _mm512_set1_ps(0.5f);
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(act + i);
        __m512 u = _mm512_mul_ps(k, _mm512_fmadd_ps(_mm512_mul_ps(c, x), _mm512_mul_ps(x, x), x));
        __m512 t = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(exp16(_mm512_mul_ps(two, u)), one)));
        __m512 g = _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, t));
        _mm512_storeu_ps(act + i, _mm512_mul_ps(g, _mm512_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) act[i] = gelu_tanh(act[i]) * up[i];
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
#ifdef __AVX512F__
            _mm_pause();
#endif
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
    const Mat *e = &m->embed;
    if (e->type == W_INT8) {
        const int8_t *row = (const int8_t *)e->w + st->token * C;
        for (int64_t i = 0; i < C; i++) x[i] = ((float)row[i] * e->s[st->token]) * m->embed_scale;
    } else if (e->type == W_BF16) {
        const uint16_t *row = (const uint16_t *)e->w + st->token * C;
        for (int64_t i = 0; i < C; i++) x[i] = bf16_to_f32(row[i]) * m->embed_scale;
    } else {
        const float *row = (const float *)e->w + st->token * C;
        for (int64_t i = 0; i < C; i++) x[i] = row[i] * m->embed_scale;
    }
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
        geglu(sh->act + lo, up + lo, hi - lo);
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
#ifdef __AVX512F__
            _mm_pause();
#endif
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
#ifdef __AVX512F__
        _mm_pause();
#endif
    }
    pthread_mutex_unlock(&step_lock);
    free(buf);
    return 0;
}

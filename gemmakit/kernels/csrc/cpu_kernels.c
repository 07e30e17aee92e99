/* gemmakit's CPU kernels (built by gemmakit/cpu_kernels.py):
 *
 * decode_step: one decode step of a Gemma model for a single sequence, in one call: token id
 * in, logits out (driven by gemmakit/c_decode.py).
 * gemv_int8: one token times an int8 weight-only matrix, for the torch step's output
 * projection (gemmakit/quantization.py's Int8Linear; torch's _weight_int8pack_mm takes 6.4 ms
 * for Gemma 3 270M's 262144 x 640 matrix and needs bfloat16 activations).
 * dropout: LoRA's input dropout with a mask rebuilt from a seed (gemmakit/lora.py).
 * softmax_xent_bf16: the cross-entropy gradient of a chunk of bfloat16 logits, in place.
 * rms_norm_forward, rms_norm_backward: RMSNorm and its input gradient, for training.
 * geglu_forward, geglu_backward: the MLP's gelu_tanh(gate) * up and its gradients, for
 * training.
 * nf4_dequantize: a QLoRA base weight from bitsandbytes' NF4 layout (gemmakit/quantization.py).
 * The training kernels take float32 or bfloat16 and give torch's results (the same bits
 * where noted); their vector paths need AVX-512 (F, BW, DQ, VL), else scalar loops run.
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

/* The training kernels' vector paths (dropout, RMSNorm, GeGLU) also use AVX-512 BW and VL
 * (masked 16-bit loads for row tails) and DQ (64-bit multiplies for the dropout hash), which
 * every AVX-512 CPU since Skylake-SP has; elsewhere they run their scalar loops. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define AVX512_TRAIN 1
#ifndef ALWAYS_INLINE
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#endif

/* lanes [0, n) of a 16-lane mask, n clamped to [0, 16]: the tail of a row in one masked step */
static inline __mmask16 first_lanes(int64_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

/* f32_to_bf16's integer round-to-nearest-even on 16 lanes, bit for bit, left in the top
 * halves of the lanes. Where the CPU has AVX512-BF16, its conversions (vcvtneps2bf16) round
 * the same way (to nearest even) and are used instead: the same bits for every non-NaN value,
 * and a NaN stays a NaN (f32_to_bf16 can carry some NaN payloads into -0 or infinity). */
static inline __m512i bf16_rne_bits(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    return _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                                 _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
}

/* v rounded to bfloat16 and widened back: torch's bfloat16 intermediates inside float32 maths */
static inline __m512 round_bf16(__m512 v) {
#ifdef __AVX512BF16__
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
#else
    return _mm512_castsi512_ps(_mm512_and_si512(bf16_rne_bits(v), _mm512_set1_epi32((int)0xFFFF0000u)));
#endif
}

/* a then b, 32 floats, rounded to bfloat16 at p */
static inline void store32_bf16(uint16_t *p, __m512 a, __m512 b) {
#ifdef __AVX512BF16__
    _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(b, a));
#else
    const __m512i odd_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29,
                                               27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    _mm512_storeu_si512(p, _mm512_permutex2var_epi16(bf16_rne_bits(a), odd_words, bf16_rne_bits(b)));
#endif
}

/* 16 float32 or (bf16) bfloat16 values from element i of p, lanes outside m read as 0 */
ALWAYS_INLINE __m512 load16(const void *p, int64_t i, const int bf16, __mmask16 m) {
    if (bf16)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i)), 16));
    return _mm512_maskz_loadu_ps(m, (const float *)p + i);
}

/* stores the lanes m of v at element i of p, as float32 or (bf16) rounded as f32_to_bf16 */
ALWAYS_INLINE void store16(void *p, int64_t i, __m512 v, const int bf16, __mmask16 m) {
    if (bf16)
#ifdef __AVX512BF16__
        _mm256_mask_storeu_epi16((uint16_t *)p + i, m, (__m256i)_mm512_cvtneps_pbh(v));
#else
        _mm256_mask_storeu_epi16((uint16_t *)p + i, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_rne_bits(v), 16)));
#endif
    else
        _mm512_mask_storeu_ps((float *)p + i, m, v);
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
 * step's output projection (gemv_int8_mt splits the rows over threads) */
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

#ifdef AVX512_TRAIN
/* mix64 on 8 lanes */
static inline __m512i mix64x8(__m512i z) {
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), _mm512_set1_epi64((int64_t)0xBF58476D1CE4E5B9ULL));
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), _mm512_set1_epi64((int64_t)0x94D049BB133111EBULL));
    return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}

/* dropout's vector loop over whole 16-element blocks from an even i; returns where it stopped.
 * 8 64-bit hashes of pairs i/2 .. i/2+7 seen as 16 32-bit lanes are mask_bits(seed, i .. i+15)
 * in order (little-endian: lane 2k is pair k's low half, lane 2k+1 its high half). */
ALWAYS_INLINE int64_t dropout16(const void *x, void *out, int64_t i, int64_t stop, uint64_t seed, uint32_t threshold,
                                float scale, const int bf16) {
    const uint64_t golden = 0x9E3779B97F4A7C15ULL;
    __m512i z = _mm512_add_epi64(_mm512_set1_epi64((int64_t)(seed + (uint64_t)(i >> 1) * golden)),
                                 _mm512_mullo_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0),
                                                    _mm512_set1_epi64((int64_t)golden)));
    const __m512i step = _mm512_set1_epi64((int64_t)(8 * golden));
    const __m512i thr = _mm512_set1_epi32((int)threshold);
    const __m512 vscale = _mm512_set1_ps(scale);
    if (bf16) /* 32 at a time: one 64-byte store */
        for (; i + 32 <= stop; i += 32) {
            const __mmask16 keep0 = _mm512_cmpge_epu32_mask(mix64x8(z), thr);
            z = _mm512_add_epi64(z, step);
            const __mmask16 keep1 = _mm512_cmpge_epu32_mask(mix64x8(z), thr);
            z = _mm512_add_epi64(z, step);
            store32_bf16((uint16_t *)out + i, _mm512_maskz_mul_ps(keep0, load16(x, i, 1, 0xFFFF), vscale),
                         _mm512_maskz_mul_ps(keep1, load16(x, i + 16, 1, 0xFFFF), vscale));
        }
    for (; i + 16 <= stop; i += 16) {
        const __mmask16 keep = _mm512_cmpge_epu32_mask(mix64x8(z), thr);
        z = _mm512_add_epi64(z, step);
        /* dropped lanes are +0, as the scalar loop's 0 */
        store16(out, i, _mm512_maskz_mul_ps(keep, load16(x, i, bf16, 0xFFFF), vscale), bf16, 0xFFFF);
    }
    return i;
}
#endif

static void dropout_scalar(const void *x, void *out, int64_t i, int64_t stop, uint64_t seed, uint32_t threshold,
                           float scale, int64_t bf16) {
    if (bf16) {
        const uint16_t *src = (const uint16_t *)x;
        uint16_t *dst = (uint16_t *)out;
        for (; i < stop; i++)
            dst[i] = mask_bits(seed, i) >= threshold ? f32_to_bf16(bf16_to_f32(src[i]) * scale) : 0;
    } else {
        const float *src = (const float *)x;
        float *dst = (float *)out;
        for (; i < stop; i++) dst[i] = mask_bits(seed, i) >= threshold ? src[i] * scale : 0.0f;
    }
}

/* out = x * keep * scale over [start, stop); x and out float32 or (bf16 != 0) bfloat16 and
 * may be the same buffer. The vector loop gives the scalar loop's bits (the same hash, one
 * float32 product, rounding to nearest even; only a NaN's payload may differ, see
 * bf16_rne_bits), so neither the mask nor the values depend on how [start, stop) is split. */
void dropout(const void *x, void *out, int64_t start, int64_t stop, uint64_t seed, uint32_t threshold,
             float scale, int64_t bf16) {
    int64_t i = start;
#ifdef AVX512_TRAIN
    const int64_t from = start + (start & 1); /* the blocks start on a pair */
    if (from + 16 <= stop) {
        dropout_scalar(x, out, start, from, seed, threshold, scale, bf16);
        i = bf16 ? dropout16(x, out, from, stop, seed, threshold, scale, 1)
                 : dropout16(x, out, from, stop, seed, threshold, scale, 0);
    }
#endif
    dropout_scalar(x, out, i, stop, seed, threshold, scale, bf16);
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

#ifdef __AVX512F__
/* e^x for 16 floats (x <= 88): x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, Cephes'
 * expf), e^r by its degree-7 Taylor polynomial (truncation r^8/8! < 5.3e-9 relative, a
 * twentieth of a float32 ulp: GeGLU's tanh has its last bit depend on it), scaled by 2^n.
 * Inputs below -88 give 0 or a denormal, as expf does. */
static __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-104.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* element i of a float32 or (bf16) bfloat16 array, as float */
static inline float get_f(const void *p, int64_t i, int64_t bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void put_f(void *p, int64_t i, float v, int64_t bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

#ifdef __AVX2__
#include <immintrin.h>
#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* keeps the compiler from fusing v, a product, into the addition it feeds (GCC's default
 * -ffp-contract=fast would) where torch rounds the product first */
#define ROUNDED(v) __asm__("" : "+v"(v))

/* x[o + 8 j .. o + 8 j + 7]^2, each square rounded as torch's x.pow(2) */
ALWAYS_INLINE __m256 squares8(const void *x, int64_t o, int64_t j, const int bf16) {
    const __m256 v = bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + o + 8 * j))), 16))
                          : _mm256_loadu_ps((const float *)x + o + 8 * j);
    __m256 sq = _mm256_mul_ps(v, v);
    ROUNDED(sq);
    return sq;
}

/* element k of x squared, rounded */
ALWAYS_INLINE float square1(const void *x, int64_t k, const int bf16) {
    const float v = get_f(x, k, bf16);
    float sq = v * v;
    ROUNDED(sq);
    return sq;
}

/* sum of x[o .. o + C)^2 in the order torch's CPU sum adds a contiguous float32 row
 * (aten/src/ATen/native/cpu/SumKernel.cpp: vectorized_inner_sum, row_sum, multi_row_sum),
 * so that rstd, and with it y, are torch's to the bit: vectors of 8 (what torch 2.13's
 * AVX-512 build adds with, checked bit for bit), vector 4i + k into accumulator k, in chunks
 * of 16 summed level by level, the leftover vectors into accumulator 0, the four added in
 * order, then the leftover elements one by one and the 8 lanes in order. Rows under 8
 * elements take torch's scalar row_sum. */
ALWAYS_INLINE float sum_squares_torch(const void *x, int64_t o, int64_t C, const int bf16) {
    const int64_t V = C / 8;
    if (V == 0) {
        float acc[4] = {0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 4 <= C; i += 4)
            for (int k = 0; k < 4; k++) acc[k] += square1(x, o + i + k, bf16);
        for (; i < C; i++) acc[0] += square1(x, o + i, bf16);
        return ((acc[0] + acc[1]) + acc[2]) + acc[3];
    }
    const int64_t n = V / 4; /* groups of 4 vectors */
    int64_t ceil_log2 = 0;
    while (((int64_t)1 << ceil_log2) < n) ceil_log2++;
    const int64_t power = ceil_log2 / 4 > 4 ? ceil_log2 / 4 : 4, step = (int64_t)1 << power, mask = step - 1;
    __m256 acc[4][4];
    for (int l = 0; l < 4; l++)
        for (int k = 0; k < 4; k++) acc[l][k] = _mm256_setzero_ps();
    int64_t i = 0;
    while (i + step <= n) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], squares8(x, o, 4 * i + k, bf16));
        for (int l = 1; l < 4; l++) {
            for (int k = 0; k < 4; k++) {
                acc[l][k] = _mm256_add_ps(acc[l][k], acc[l - 1][k]);
                acc[l - 1][k] = _mm256_setzero_ps();
            }
            if (i & (mask << (l * power))) break;
        }
    }
    for (; i < n; i++)
        for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], squares8(x, o, 4 * i + k, bf16));
    for (int l = 1; l < 4; l++)
        for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], acc[l][k]);
    for (int64_t j = 4 * n; j < V; j++) acc[0][0] = _mm256_add_ps(acc[0][0], squares8(x, o, j, bf16));
    const __m256 total = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0][0], acc[0][1]), acc[0][2]), acc[0][3]);
    float sum = 0.f, lanes[8];
    for (int64_t k = 8 * V; k < C; k++) sum += square1(x, o + k, bf16);
    _mm256_storeu_ps(lanes, total);
    for (int k = 0; k < 8; k++) sum += lanes[k];
    return sum;
}

#endif
#ifdef AVX512_TRAIN
ALWAYS_INLINE void rms_norm_forward16(const void *x, const float *gain, void *y, float *rstd, int64_t C, float eps,
                                      int64_t lo, int64_t hi, const int bf16) {
    for (int64_t r = lo; r < hi; r++) {
        const int64_t o = r * C;
        const float rs = 1.f / sqrtf(sum_squares_torch(x, o, C, bf16) / (float)C + eps);
        rstd[r] = rs;
        const __m512 vrs = _mm512_set1_ps(rs);
        for (int64_t i = 0; i < C; i += 16) {
            const __mmask16 m = first_lanes(C - i);
            const __m512 v = _mm512_mul_ps(_mm512_mul_ps(load16(x, o + i, bf16, m), vrs), _mm512_maskz_loadu_ps(m, gain + i));
            store16(y, o + i, v, bf16, m);
        }
    }
}

ALWAYS_INLINE void rms_norm_backward16(const void *g, const void *x, const float *rstd, const float *gain, void *dx,
                                       int64_t C, int64_t lo, int64_t hi, const int bf16) {
    for (int64_t r = lo; r < hi; r++) {
        const int64_t o = r * C;
        const __m512 rs = _mm512_set1_ps(rstd[r]);
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int64_t i = 0; i < C; i += 32) {
            const __mmask16 m0 = first_lanes(C - i), m1 = first_lanes(C - i - 16);
            const __m512 gy0 = _mm512_mul_ps(load16(g, o + i, bf16, m0), _mm512_maskz_loadu_ps(m0, gain + i));
            const __m512 gy1 = _mm512_mul_ps(load16(g, o + i + 16, bf16, m1), _mm512_maskz_loadu_ps(m1, gain + i + 16));
            a0 = _mm512_fmadd_ps(gy0, _mm512_mul_ps(load16(x, o + i, bf16, m0), rs), a0);
            a1 = _mm512_fmadd_ps(gy1, _mm512_mul_ps(load16(x, o + i + 16, bf16, m1), rs), a1);
        }
        const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) / (float)C);
        /* the row is still in L1: reading it again is cheaper than keeping gy and xhat */
        for (int64_t i = 0; i < C; i += 16) {
            const __mmask16 m = first_lanes(C - i);
            const __m512 gy = _mm512_mul_ps(load16(g, o + i, bf16, m), _mm512_maskz_loadu_ps(m, gain + i));
            const __m512 xh = _mm512_mul_ps(load16(x, o + i, bf16, m), rs);
            store16(dx, o + i, _mm512_mul_ps(rs, _mm512_fnmadd_ps(xh, mean, gy)), bf16, m);
        }
    }
}
#endif

/* RMSNorm over rows [lo, hi) of C values, for training (gemmakit/model.py): rstd[r] =
 * 1 / sqrt(mean(x^2) + eps) and y = (x * rstd) * gain, in float32 and rounded once to x's
 * dtype (float32 or, bf16 != 0, bfloat16), as torch's aten::_fused_rms_norm of x.float()
 * (on the CPU: x.pow(2).mean(-1) + eps, rsqrt, two products) followed by .to(dtype); gain is
 * the float32 (1 + w). With AVX2 the squares are added in torch's order (sum_squares_torch,
 * 8-lane vectors as torch's AVX2 and AVX-512 builds use) and y is torch's to the bit; a CPU
 * without AVX2 adds them in 16 interleaved partial sums, and rstd may differ from torch's in
 * its last bit. One pass instead of torch's upcast copy, ~5 ops and downcast. */
void rms_norm_forward(const void *x, const float *gain, void *y, float *rstd, int64_t C, double eps, int64_t lo,
                      int64_t hi, int64_t bf16) {
    /* torch adds eps to the float32 mean as a float32 */
    const float e = (float)eps;
#ifdef AVX512_TRAIN
    if (bf16)
        rms_norm_forward16(x, gain, y, rstd, C, e, lo, hi, 1);
    else
        rms_norm_forward16(x, gain, y, rstd, C, e, lo, hi, 0);
#else
    for (int64_t r = lo; r < hi; r++) {
#ifdef __AVX2__
        const float ss = sum_squares_torch(x, r * C, C, (int)bf16);
#else
        float part[16] = {0};
        for (int64_t i = 0; i < C; i++) {
            const float xi = get_f(x, r * C + i, bf16);
            part[i & 15] += xi * xi;
        }
        float ss = 0.f;
        for (int k = 0; k < 16; k++) ss += part[k];
#endif
        const float rs = 1.f / sqrtf(ss / (float)C + e);
        rstd[r] = rs;
        for (int64_t i = 0; i < C; i++) put_f(y, r * C + i, (get_f(x, r * C + i, bf16) * rs) * gain[i], bf16);
    }
#endif
}

/* RMSNorm's input gradient over rows [lo, hi) of C values, for training (gemmakit/model.py):
 * with xhat = x * rstd and gy = g * gain, dx = rstd * (gy - xhat * mean(gy * xhat)), in
 * float32; g, x and dx are float32 or (bf16 != 0) bfloat16, rstd one float32 per row, gain
 * the float32 (1 + w). torch has no CPU kernel for this (aten::_fused_rms_norm_backward is
 * CUDA-only), and its autograd of F.rms_norm takes ~12 element-wise ops. */
void rms_norm_backward(const void *g, const void *x, const float *rstd, const float *gain, void *dx, int64_t C,
                       int64_t lo, int64_t hi, int64_t bf16) {
#ifdef AVX512_TRAIN
    if (bf16)
        rms_norm_backward16(g, x, rstd, gain, dx, C, lo, hi, 1);
    else
        rms_norm_backward16(g, x, rstd, gain, dx, C, lo, hi, 0);
#else
    for (int64_t r = lo; r < hi; r++) {
        const float rs = rstd[r];
        float part[16] = {0};
        for (int64_t i = 0; i < C; i++)
            part[i & 15] += (get_f(g, r * C + i, bf16) * gain[i]) * (get_f(x, r * C + i, bf16) * rs);
        float dot = 0.f;
        for (int k = 0; k < 16; k++) dot += part[k];
        const float mean = dot / (float)C;
        for (int64_t i = 0; i < C; i++) {
            const float gy = get_f(g, r * C + i, bf16) * gain[i], xh = get_f(x, r * C + i, bf16) * rs;
            put_f(dx, r * C + i, rs * (gy - xh * mean), bf16);
        }
    }
#endif
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

/* GeGLU for training (the MLP's gelu_tanh(gate) * up, gemmakit/model.py), forward and
 * backward, as torch computes F.gelu(gate, approximate="tanh") * up and its autograd:
 * aten/src/ATen/native/cpu/Activation.cpp (GeluKernelImpl, GeluBackwardKernelImpl, tanh
 * branches) operation for operation in float32, with torch's bfloat16 roundings between the
 * ops when the tensors are bfloat16 (gelu(gate) and grad * up are bfloat16 tensors there).
 * Where torch's build fuses a multiply into an add (checked bit for bit against torch 2.13:
 * x + kKappa x^3, 1 - tanh^2, 1 + 3 kKappa x^2) so do these; where it does not, neither do
 * they. One pass each instead of torch's gelu, multiply and (backward) gelu_backward and two
 * multiplies, with their bfloat16 tensors in between. */
#define GELU_BETA 0.7978845608028654f /* sqrt(2) * (2 / sqrt(pi)) * 0.5 = sqrt(2 / pi) */
#define GELU_KAPPA 0.044715f

/* tanh(u) as torch's CPU kernels get it from SLEEF's tanhf (u10): correctly rounded up to
 * rare last-bit differences, and exactly +-1 for |u| > 8.664339742 (SLEEF
 * src/libm/sleefsimdsp.c, xtanhf). With q = 1 - |tanh u| = 2 / (e^(2|u|) + 1), the float32
 * subtraction 1 - q rounds onto tanh's float32 grid near 1 itself; q's own error (a few of
 * its ulps) is far below that grid's step when q is small, which is where torch's 1 + tanh
 * and 1 - tanh^2 cancel, so those keep torch's values there, cancellation included (e.g.
 * gelu(-5.1) is -0 in torch and here). */
static inline float tanh_sleef(float u) {
    const float a = fabsf(u);
    const float t = a > 8.664339742f ? 1.f : 1.f - 2.f / (expf(a + a) + 1.f);
    return copysignf(t, u);
}

#ifdef AVX512_TRAIN
static inline __m512 tanh_sleef16(__m512 u) {
    const __m512 a = _mm512_abs_ps(u), one = _mm512_set1_ps(1.f);
    __m512 t = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(exp16(_mm512_add_ps(a, a)), one)));
    t = _mm512_mask_mov_ps(t, _mm512_cmp_ps_mask(a, _mm512_set1_ps(8.664339742f), _CMP_GT_OQ), one);
    /* t | sign(u), t being >= 0 */
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(t), _mm512_castps_si512(u),
                                                         _mm512_set1_epi32((int)0x80000000u), 0xF8));
}

ALWAYS_INLINE void geglu_forward16(const void *gate, const void *up, void *out, int64_t i, int64_t stop,
                                   const int bf16) {
    const __m512 beta = _mm512_set1_ps(GELU_BETA), kappa = _mm512_set1_ps(GELU_KAPPA);
    const __m512 one = _mm512_set1_ps(1.f), half = _mm512_set1_ps(0.5f);
    for (; i < stop; i += 16) {
        const __mmask16 m = first_lanes(stop - i);
        const __m512 x = load16(gate, i, bf16, m);
        const __m512 inner = _mm512_mul_ps(beta, _mm512_fmadd_ps(kappa, _mm512_mul_ps(_mm512_mul_ps(x, x), x), x));
        __m512 gl = _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, tanh_sleef16(inner)));
        if (bf16) gl = round_bf16(gl);
        store16(out, i, _mm512_mul_ps(gl, load16(up, i, bf16, m)), bf16, m);
    }
}

ALWAYS_INLINE void geglu_backward16(const void *grad, const void *gate, const void *up, void *grad_gate,
                                    void *grad_up, int64_t i, int64_t stop, const int bf16) {
    const __m512 beta = _mm512_set1_ps(GELU_BETA), kappa = _mm512_set1_ps(GELU_KAPPA);
    const __m512 kappa3 = _mm512_set1_ps(3.f * GELU_KAPPA); /* torch's kThree * kKappa, rounded */
    const __m512 one = _mm512_set1_ps(1.f), half = _mm512_set1_ps(0.5f);
    for (; i < stop; i += 16) {
        const __mmask16 m = first_lanes(stop - i);
        const __m512 dy = load16(grad, i, bf16, m), x = load16(gate, i, bf16, m), u = load16(up, i, bf16, m);
        const __m512 x_sq = _mm512_mul_ps(x, x);
        const __m512 t = tanh_sleef16(_mm512_mul_ps(beta, _mm512_fmadd_ps(kappa, _mm512_mul_ps(x_sq, x), x)));
        const __m512 left = _mm512_mul_ps(half, x), right = _mm512_add_ps(one, t);
        __m512 gl = _mm512_mul_ps(left, right), dgl = _mm512_mul_ps(dy, u);
        if (bf16) gl = round_bf16(gl), dgl = round_bf16(dgl);
        store16(grad_up, i, _mm512_mul_ps(dy, gl), bf16, m);
        const __m512 tanh_derivative = _mm512_fnmadd_ps(t, t, one);
        const __m512 inner_derivative = _mm512_mul_ps(beta, _mm512_fmadd_ps(kappa3, x_sq, one));
        __m512 right_derivative = _mm512_mul_ps(_mm512_mul_ps(left, tanh_derivative), inner_derivative);
        ROUNDED(right_derivative);
        store16(grad_gate, i, _mm512_mul_ps(dgl, _mm512_add_ps(_mm512_mul_ps(half, right), right_derivative)), bf16, m);
    }
}
#endif

/* out = gelu_tanh(gate) * up over elements [start, stop); float32 or (bf16 != 0) bfloat16, for
 * bfloat16 out = bf16(bf16(gelu(gate)) * up) as torch's two ops */
void geglu_forward(const void *gate, const void *up, void *out, int64_t start, int64_t stop, int64_t bf16) {
#ifdef AVX512_TRAIN
    if (bf16)
        geglu_forward16(gate, up, out, start, stop, 1);
    else
        geglu_forward16(gate, up, out, start, stop, 0);
#else
    for (int64_t i = start; i < stop; i++) {
        const float x = get_f(gate, i, bf16);
        float gl = (0.5f * x) * (1.f + tanh_sleef(GELU_BETA * fmaf(GELU_KAPPA, (x * x) * x, x)));
        if (bf16) gl = bf16_to_f32(f32_to_bf16(gl));
        put_f(out, i, gl * get_f(up, i, bf16), bf16);
    }
#endif
}

/* The gradients of out = gelu_tanh(gate) * up over elements [start, stop): grad_up = grad *
 * gelu(gate) and grad_gate = gelu'(gate) * (grad * up), with gelu(gate) and grad * up
 * rounded to bfloat16 first when bf16 != 0, as in torch's autograd graph. */
void geglu_backward(const void *grad, const void *gate, const void *up, void *grad_gate, void *grad_up,
                    int64_t start, int64_t stop, int64_t bf16) {
#ifdef AVX512_TRAIN
    if (bf16)
        geglu_backward16(grad, gate, up, grad_gate, grad_up, start, stop, 1);
    else
        geglu_backward16(grad, gate, up, grad_gate, grad_up, start, stop, 0);
#else
    for (int64_t i = start; i < stop; i++) {
        const float dy = get_f(grad, i, bf16), x = get_f(gate, i, bf16), u = get_f(up, i, bf16);
        const float x_sq = x * x;
        const float t = tanh_sleef(GELU_BETA * fmaf(GELU_KAPPA, x_sq * x, x));
        const float left = 0.5f * x, right = 1.f + t;
        float gl = left * right, dgl = dy * u;
        if (bf16) gl = bf16_to_f32(f32_to_bf16(gl)), dgl = bf16_to_f32(f32_to_bf16(dgl));
        put_f(grad_up, i, dy * gl, bf16);
        /* volatile: rounded before the sum, as in torch, not fused into it */
        volatile float right_derivative = (left * fmaf(-t, t, 1.f)) * (GELU_BETA * fmaf(3.f * GELU_KAPPA, x_sq, 1.f));
        put_f(grad_gate, i, dgl * (0.5f * right + right_derivative), bf16);
    }
#endif
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

/* NF4 dequantization (QLoRA's frozen base, gemmakit/quantization.py NF4Linear): value j of the
 * weight is code[nibble j] * absmax[j / 64], one float32 product, the nibbles packed two to a
 * byte with the first in the high nibble (bitsandbytes' layout), rounded once to bfloat16 when
 * bf16 != 0: bitsandbytes' dequantize_4bit in float32 followed by .to(bfloat16), bit for bit.
 * Over the 64-value blocks [lo, hi) of n values; code holds the 16 float32 levels. bitsandbytes'
 * CPU fallback (torch ops) takes ~1.1 ms per projection of Gemma 3 270M, and a LoRA step
 * dequantizes each projection twice (forward and backward). */
void nf4_dequantize(const uint8_t *packed, const float *absmax, const float *code, void *out, int64_t n, int64_t lo,
                    int64_t hi, int64_t bf16) {
    for (int64_t b = lo; b < hi; b++) {
        const int64_t start = b * 64, stop = start + 64 < n ? start + 64 : n;
        const float scale = absmax[b];
        int64_t j = start;
#ifdef AVX512_TRAIN
        if (stop - start == 64) {
            /* 8 bytes -> 16 values: lane k reads byte k / 2, the high nibble for even k */
            const __m512 table = _mm512_loadu_ps(code), vs = _mm512_set1_ps(scale);
            const __m512i byte_of_lane = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
            const __m512i shift = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
            for (; j < stop; j += 16) {
                const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(packed + j / 2)));
                const __m512i nibble = _mm512_and_si512(
                    _mm512_srlv_epi32(_mm512_permutexvar_epi32(byte_of_lane, bytes), shift), _mm512_set1_epi32(15));
                const __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(nibble, table), vs);
                if (bf16)
                    store16(out, j, v, 1, 0xFFFF);
                else
                    store16(out, j, v, 0, 0xFFFF);
            }
        }
#endif
        for (; j < stop; j++) {
            const uint8_t byte = packed[j / 2];
            put_f(out, j, code[(j & 1) ? (byte & 15) : (byte >> 4)] * scale, bf16);
        }
    }
}

/* --- the kernels above, split over torch's threads -------------------------------------------
 *
 * Built with -fopenmp, this library's NEEDED libgomp.so.1 resolves to the libgomp torch has
 * already loaded (the dynamic loader reuses a loaded object of the same soname), so these
 * parallel regions run on torch's own intra-op threads. A pool of our own fought them: after
 * a torch matmul, torch's OpenMP workers spin for a while, and a GeGLU backward split over
 * two Python threads took 1.4 ms against 0.74 ms alone (0.82 ms with OMP_WAIT_POLICY=PASSIVE).
 * Here the spinning workers take the work at once. Without OpenMP the loop below runs the
 * parts one after another on the calling thread: the same result, one core.
 * [0, n) is cut into `threads` contiguous parts (rows or elements, per kernel). */
#define SPLIT(n, threads, CALL)                                                                  \
    do {                                                                                         \
        const int64_t n_ = (n), t_ = (threads) > 1 ? (threads) : 1;                              \
        _Pragma("omp parallel for schedule(static, 1) num_threads(t_)") for (int64_t k_ = 0; k_ < t_; k_++) { \
            const int64_t lo = n_ * k_ / t_, hi = n_ * (k_ + 1) / t_;                            \
            CALL;                                                                                \
        }                                                                                        \
    } while (0)

void gemv_int8_mt(const float *x, const int8_t *w, const float *s, float *y, int64_t n, int64_t k,
                  int64_t threads) {
    SPLIT(n, threads, gemv_int8(x, w, s, y, lo, hi, k));
}

void dropout_mt(const void *x, void *out, int64_t n, uint64_t seed, uint32_t threshold, float scale, int64_t bf16,
                int64_t threads) {
    SPLIT(n, threads, dropout(x, out, lo, hi, seed, threshold, scale, bf16));
}

void softmax_xent_bf16_mt(uint16_t *z, const int64_t *targets, float *lse, int64_t V, int64_t rows,
                          int64_t threads) {
    SPLIT(rows, threads, softmax_xent_bf16(z, targets, lse, V, lo, hi));
}

void rms_norm_forward_mt(const void *x, const float *gain, void *y, float *rstd, int64_t C, double eps,
                         int64_t rows, int64_t bf16, int64_t threads) {
    SPLIT(rows, threads, rms_norm_forward(x, gain, y, rstd, C, eps, lo, hi, bf16));
}

void rms_norm_backward_mt(const void *g, const void *x, const float *rstd, const float *gain, void *dx, int64_t C,
                          int64_t rows, int64_t bf16, int64_t threads) {
    SPLIT(rows, threads, rms_norm_backward(g, x, rstd, gain, dx, C, lo, hi, bf16));
}

void geglu_forward_mt(const void *gate, const void *up, void *out, int64_t n, int64_t bf16, int64_t threads) {
    SPLIT(n, threads, geglu_forward(gate, up, out, lo, hi, bf16));
}

void geglu_backward_mt(const void *grad, const void *gate, const void *up, void *grad_gate, void *grad_up,
                       int64_t n, int64_t bf16, int64_t threads) {
    SPLIT(n, threads, geglu_backward(grad, gate, up, grad_gate, grad_up, lo, hi, bf16));
}

void nf4_dequantize_mt(const uint8_t *packed, const float *absmax, const float *code, void *out, int64_t n,
                       int64_t bf16, int64_t threads) {
    SPLIT((n + 63) / 64, threads, nf4_dequantize(packed, absmax, code, out, n, lo, hi, bf16));
}

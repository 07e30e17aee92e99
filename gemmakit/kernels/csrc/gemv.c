/* Matrix-vector products over float32, bfloat16 and int8 weight-only rows: the decode step's
 * projections and gemv_int8, the torch step's int8 output projection. */
#include "gemv.h"

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
    float name(const float *x, const T *w, int64_t K) {                                         \
        int64_t k = 0;                                                                          \
        float acc = 0.f;                                                                        \
        DOT_BLOCKS(LOAD16)                                                                      \
        for (; k < K; k++) acc += x[k] * TO_F32(w[k]);                                          \
        return acc;                                                                             \
    }
#define I8_TO_F32(v) ((float)(v))
DOT(dot_f32, float, LOAD_F32, SAME_F32)
DOT(dot_i8, int8_t, LOAD_I8, I8_TO_F32)
DOT(dot_bf16, uint16_t, load_bf16, bf16_to_f32)

/* y[n] = row n of m . x for rows [lo, hi) */
void matvec(const Mat *m, const float *x, float *y, int64_t lo, int64_t hi) {
    if (m->type >= W_GGUF_BASE) {
        gguf_matvec(m->type - W_GGUF_BASE, m->w, m->k, x, y, lo, hi);
    } else if (m->type == W_INT8) {
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

/* row `row` of m as k floats: the embedding lookup of the decode step */
void mat_row(const Mat *m, int64_t row, float *out) {
    const int64_t k = m->k;
    if (m->type >= W_GGUF_BASE) {
        gguf_dequantize_rows(m->type - W_GGUF_BASE, m->w, k, out, row, row + 1);
    } else if (m->type == W_INT8) {
        const int8_t *w = (const int8_t *)m->w + row * k;
        for (int64_t i = 0; i < k; i++) out[i] = (float)w[i] * m->s[row];
    } else if (m->type == W_BF16) {
        const uint16_t *w = (const uint16_t *)m->w + row * k;
        for (int64_t i = 0; i < k; i++) out[i] = bf16_to_f32(w[i]);
    } else {
        memcpy(out, (const float *)m->w + row * k, sizeof(float) * k);
    }
}

/* y[n] = s[n] * (x . row n of the int8 matrix w (N, K)) for rows [start, stop): the torch
 * step's output projection (Int8Linear for one token; gemv_int8_mt splits the rows over
 * threads). torch's _weight_int8pack_mm needs bfloat16 activations and, measured on a 2-core CPU,
 * took 6.4 ms for Gemma 3 270M's 262144 x 640 matrix. */
void gemv_int8(const float *x, const int8_t *w, const float *s, float *y, int64_t start, int64_t stop,
               int64_t K) {
    const Mat m = {W_INT8, w, s, stop, K};
    matvec(&m, x, y, start, stop);
}

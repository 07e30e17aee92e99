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
    } else if (m->type == W_PACKED4) {
        packed4_matmul_rows((const Packed4 *)m->w, m->n, m->k, x, 1, y, lo, hi);
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

/* y[n] = s[n] * (x . row n of the int8 matrix w (N, K)) for rows [start, stop): the torch
 * step's output projection (Int8Linear for one token; gemv_int8_mt splits the rows over
 * threads). torch's _weight_int8pack_mm needs bfloat16 activations and, measured on a 2-core CPU,
 * took 6.4 ms for Gemma 3 270M's 262144 x 640 matrix. */
void gemv_int8(const float *x, const int8_t *w, const float *s, float *y, int64_t start, int64_t stop,
               int64_t K) {
    const Mat m = {W_INT8, w, s, stop, K};
    matvec(&m, x, y, start, stop);
}

/* out = row `row` of m as floats (int8 rows times their scale; GGUF blocks dequantized, as
 * gguf_blocks.c does): the embedding lookup */
void mat_row(const Mat *m, int64_t row, float *out) {
    const int64_t K = m->k;
    if (m->type >= W_GGUF_BASE) {
        gguf_dequantize_rows(m->type - W_GGUF_BASE, m->w, K, out, row, row + 1);
    } else if (m->type == W_PACKED4) {
        packed4_dequantize_rows((const Packed4 *)m->w, K, out, row, row + 1);
    } else if (m->type == W_INT8) {
        const int8_t *w = (const int8_t *)m->w + row * K;
        for (int64_t i = 0; i < K; i++) out[i] = (float)w[i] * m->s[row];
    } else if (m->type == W_BF16) {
        const uint16_t *w = (const uint16_t *)m->w + row * K;
        for (int64_t i = 0; i < K; i++) out[i] = bf16_to_f32(w[i]);
    } else {
        memcpy(out, (const float *)m->w + row * K, sizeof(float) * K);
    }
}

/* --- several activation rows against one weight matrix ----------------------------------
 *
 * A decode step of R rows is memory-bound on its weights: each weight row is read from
 * memory once and used by all R activation rows while it is in L1. A tile of NW weight rows
 * times NR activation rows keeps NW * NR accumulators in registers, so each vector of
 * weights loaded (and widened from bfloat16 or int8) feeds NR multiply-adds and each vector
 * of activations NW. The vector width is the widest the build has (AVX-512: 16 floats and 4
 * x 4 tiles in 32 registers; AVX2: 8 floats and 2 x 4 tiles in 16; else one float), the code
 * the same. Each output is one accumulator's lane sums, then the K % VL leftover products in
 * order: an output's value depends on neither the tile shape nor the number of rows, so a
 * row computed in a batch equals the row computed alone, bit for bit. */
#if defined(__AVX512F__)
typedef __m512 vec;
#define VL 16
#define TILE_NW 4
#define V_ZERO() _mm512_setzero_ps()
#define V_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define V_LOAD_F32(p) _mm512_loadu_ps(p)
#define V_LOAD_BF16(p) load_bf16(p)
#define V_LOAD_I8(p) LOAD_I8(p)
#define V_SUM(v) _mm512_reduce_add_ps(v)
#elif defined(__AVX2__)
typedef __m256 vec;
#define VL 8
#define TILE_NW 2
#define V_ZERO() _mm256_setzero_ps()
#ifdef __FMA__
#define V_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#else
#define V_FMA(a, b, c) _mm256_add_ps(_mm256_mul_ps(a, b), c)
#endif
#define V_LOAD_F32(p) _mm256_loadu_ps(p)
#define V_LOAD_BF16(p) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define V_LOAD_I8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
static inline float v_sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#define V_SUM(v) v_sum8(v)
#else
typedef float vec;
#define VL 1
#define TILE_NW 4
#define V_ZERO() 0.f
#define V_FMA(a, b, c) ((a) * (b) + (c))
#define V_LOAD_F32(p) (*(p))
#define V_LOAD_BF16(p) bf16_to_f32(*(p))
#define V_LOAD_I8(p) ((float)*(p))
#define V_SUM(v) (v)
#endif
#define TILE_NR 4 /* activation rows per tile */
/* From this many rows on, tiles of TILE_NW weight rows; below, of one. Measured on a loaded
 * 2-core EPYC VM (one thread, 65536 x 640 float32): one weight row at a time runs 1 row in
 * 7.5 ms (matvec 8.0 ms), 4 rows in 12.5 ms (14 ms in 4-row tiles), while 16 rows take 29 ms
 * in 4 x 4 tiles against 37 ms in 1 x 4. */
#define WIDE_TILE_ROWS 8
/* From this many rows on, a tile prefetches the next one's weights: with few rows the
 * hardware prefetcher keeps ahead of the arithmetic, and a software prefetch per 64 bytes
 * only costs (one row: the whole float32 Gemma 3 270M step 10% slower, measured as above). */
#define PREFETCH_ROWS 4
#if defined(__AVX2__) || defined(__AVX512F__)
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#else
#define PREFETCH(p) __builtin_prefetch(p)
#endif

/* y[j * N + i] = row i of w (NW rows of K) . row j of x (NR rows of K), for the constant tile
 * shape NW x NR (each call site's constants unroll the loops) */
#define MATMUL_TILE(name, T, V_LOAD_W, TO_F32)                                                   \
    ALWAYS_INLINE void name(const T *w, const float *x, float *y, int64_t K, int64_t N, const int NW,  \
                            const int NR, const T *next) {                                       \
        vec acc[TILE_NW][TILE_NR];                                                               \
        for (int i = 0; i < NW; i++)                                                             \
            for (int j = 0; j < NR; j++) acc[i][j] = V_ZERO();                                   \
        int64_t k = 0;                                                                           \
        for (; k + VL <= K; k += VL) {                                                           \
            vec wv[TILE_NW];                                                                     \
            for (int i = 0; i < NW; i++) wv[i] = V_LOAD_W(w + i * K + k);                        \
            if (next) /* the next tile's bytes in memory order, at this tile's pace */           \
                for (int b = 0; b < NW * VL * (int)sizeof(T); b += 64)                           \
                    PREFETCH((const char *)next + k * NW * (int64_t)sizeof(T) + b);              \
            for (int j = 0; j < NR; j++) {                                                       \
                const vec xv = V_LOAD_F32(x + j * K + k);                                        \
                for (int i = 0; i < NW; i++) acc[i][j] = V_FMA(wv[i], xv, acc[i][j]);            \
            }                                                                                    \
        }                                                                                        \
        for (int i = 0; i < NW; i++)                                                             \
            for (int j = 0; j < NR; j++) {                                                       \
                float sum = V_SUM(acc[i][j]);                                                    \
                for (int64_t kk = k; kk < K; kk++) sum += TO_F32(w[i * K + kk]) * x[j * K + kk]; \
                y[j * N + i] = sum;                                                              \
            }                                                                                    \
    }

/* every activation row against NW weight rows: tiles of TILE_NR rows, then the leftover */
#define MATMUL_ROW_TILES(tile, w, x, rows, y, K, N, NW, next)                                          \
    do {                                                                                         \
        int64_t r_ = 0;                                                                          \
        for (; r_ + TILE_NR <= (rows); r_ += TILE_NR)                                            \
            tile(w, (x) + r_ * (K), (y) + r_ * (N), K, N, NW, TILE_NR, r_ ? NULL : (next));       \
        switch ((rows) - r_) {                                                                   \
        case 3: tile(w, (x) + r_ * (K), (y) + r_ * (N), K, N, NW, 3, r_ ? NULL : (next)); break;  \
        case 2: tile(w, (x) + r_ * (K), (y) + r_ * (N), K, N, NW, 2, r_ ? NULL : (next)); break;  \
        case 1: tile(w, (x) + r_ * (K), (y) + r_ * (N), K, N, NW, 1, r_ ? NULL : (next)); break;  \
        }                                                                                        \
    } while (0)

/* y (rows, N) columns [lo, hi) = x (rows, K) times the weight rows [lo, hi) of w (N, K); each
 * tile's first activation rows prefetch the next tile's weights */
#define MATMUL(name, tile, T)                                                                    \
    static void name(const T *w, const float *x, int64_t rows, float *y, int64_t N, int64_t K, int64_t lo, \
                     int64_t hi) {                                                               \
        int64_t n = lo;                                                                          \
        if (rows >= WIDE_TILE_ROWS)                                                              \
            for (; n + TILE_NW <= hi; n += TILE_NW)                                              \
                MATMUL_ROW_TILES(tile, w + n * K, x, rows, y + n, K, N, TILE_NW, w + (n + TILE_NW) * K); \
        for (; n < hi; n++)                                                                      \
            MATMUL_ROW_TILES(tile, w + n * K, x, rows, y + n, K, N, 1,                           \
                             rows >= PREFETCH_ROWS ? w + (n + 1) * K : (const T *)NULL);          \
    }

MATMUL_TILE(tile_f32, float, V_LOAD_F32, SAME_F32)
MATMUL_TILE(tile_bf16, uint16_t, V_LOAD_BF16, bf16_to_f32)
MATMUL_TILE(tile_i8, int8_t, V_LOAD_I8, I8_TO_F32)
MATMUL(matmul_f32, tile_f32, float)
MATMUL(matmul_bf16, tile_bf16, uint16_t)
MATMUL(matmul_i8, tile_i8, int8_t)

void matmul_rows(const Mat *m, const float *x, int64_t rows, float *y, int64_t lo, int64_t hi) {
    const int64_t N = m->n, K = m->k;
    if (m->type >= W_GGUF_BASE) { /* rows rounded to 8-bit blocks, integer dots (gguf_blocks.c) */
        if (rows == 1) gguf_matvec(m->type - W_GGUF_BASE, m->w, K, x, y, lo, hi);
        else gguf_matmul_rows(m->type - W_GGUF_BASE, m->w, N, K, x, rows, y, lo, hi);
    } else if (m->type == W_PACKED4) { /* each row dequantized once for all rows (packed4.c) */
        packed4_matmul_rows((const Packed4 *)m->w, N, K, x, rows, y, lo, hi);
    } else if (m->type == W_F32) {
        matmul_f32((const float *)m->w, x, rows, y, N, K, lo, hi);
    } else if (m->type == W_BF16) {
        matmul_bf16((const uint16_t *)m->w, x, rows, y, N, K, lo, hi);
    } else if (m->type == W_INT8) {
        matmul_i8((const int8_t *)m->w, x, rows, y, N, K, lo, hi);
        for (int64_t r = 0; r < rows; r++)
            for (int64_t n = lo; n < hi; n++) y[r * N + n] *= m->s[n];
    } else { /* a type without a multi-row kernel: one matrix-vector product per row */
        for (int64_t r = 0; r < rows; r++) matvec(m, x + r * K, y + r * N, lo, hi);
    }
}

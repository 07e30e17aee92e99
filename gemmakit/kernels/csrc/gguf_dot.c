/* Integer dots of GGUF block matrices with activations rounded to 8-bit blocks (gguf_act.c):
 * llama.cpp's products (ggml-cpu/quants.c ggml_vec_dot_*_generic states each formula),
 * restated over one unpacked form per family.
 *
 * Each weight row is unpacked once per call (gguf_unpack.c) into int8 values (signed, or
 * unsigned where the type subtracts a min) and its scales:
 *  - blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) against Q8_0 / Q8_1: per block
 *    sumi = sum w*x, and the block adds (d_w * d_x) * sumi, plus m_w * s_x for Q4_1 / Q5_1;
 *  - super-blocks of 256 (Q2_K..Q6_K, IQ4_XS) against Q8_K: per 16 values an integer scale,
 *    sumi = sum over the 16-groups of scale * sum w*x, and the block adds (d_x * d_w) * sumi,
 *    minus (d_x * dmin_w) * sum of min * bsums for the types with mins (Q2_K, Q4_K, Q5_K).
 * The integer sums are exact in every build. The float accumulation has one fixed order,
 * shared by the vector and scalar paths so that they give the same bits: eight lane sums,
 * lane j holding values 4j..4j+3 of every 32 (the lanes of AVX-512 VNNI's vpdpbusd and of
 * AVX2's vpmaddubsw + vpmaddwd alike), each block's lane integer converted to float, times
 * the block's float scale, added to the lane's float; at the end the eight lanes are summed
 * as (l0 + l4) + (l2 + l6) + ((l1 + l5) + (l3 + l7)) and the min term added. A row's result
 * therefore depends on nothing but its own values: not the number of rows, nor the tiles,
 * nor the build. Products take |w| (unsigned) and x with w's sign: AVX-512 VNNI's vpdpbusd adds
 * each four into a lane at once; AVX2's vpmaddubsw pairs them first, whose sums stay within 16
 * bits for every pair the types produce (|w| <= 128, |x| <= 127), and vpmaddwd adds two pairs
 * (or, for the super-blocks, weighs them by their 16-group's scale).
 *
 * The blocks of 32 run fused where AVX2 is (each block's values assembled in a register and
 * used for up to four activation rows at once); elsewhere, and for the super-blocks, each
 * weight row is unpacked once (gguf_unpack.c) and dotted with every activation row.
 */
#include <stdlib.h>

#include "common.h"
#include "gguf_dot.h"

#pragma GCC optimize("fp-contract=off") /* the float order above, in every build */

enum { QK = 32, QKK = 256 };
enum { UNPACKED_BYTES = 68 }; /* a block of 32 unpacked for many rows: values, lanes' start, d */

/* --- the lane sums of 32 products, and the fixed float accumulation --------------------- */

#if defined(__AVX2__) && defined(__FMA__)
#define DOT_AVX2 1
#define LOAD32(p) _mm256_loadu_si256((const __m256i *)(p))

/* lane j = sum of w[i] * x[i] for i in 4j..4j+3, from |w| and x with w's sign */
static inline __m256i lanes(__m256i abs_w, __m256i signed_x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), abs_w, signed_x);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(abs_w, signed_x), _mm256_set1_epi16(1));
#endif
}

/* the same, each lane times the scale of its 16-group (pair_scales: vpmaddwd's operand) */
static inline __m256i lanes_scaled(__m256i v, const int8_t *x, const int16_t *pair_scales) {
    const __m256i products = _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(LOAD32(x), v));
    return _mm256_madd_epi16(products, _mm256_load_si256((const __m256i *)pair_scales));
}

static inline float lanes_sum(__m256 v) { /* (l0 + l4) + (l2 + l6) + ((l1 + l5) + (l3 + l7)) */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline int32_t sum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

/* the integer min term of a super-block: sum of min * bsum over its 16-groups (exact) */
static inline int32_t k_min_sum(const int16_t *mn, const int16_t *bsums) {
    return sum_i32(_mm256_madd_epi16(LOAD32(mn), LOAD32(bsums)));
}
#else
static inline int32_t k_min_sum(const int16_t *mn, const int16_t *bsums) {
    int32_t s = 0;
    for (int g = 0; g < 16; g++) s += mn[g] * bsums[g];
    return s;
}
#endif

static inline float lanes_sum_scalar(const float *l) {
    float s[4];
    for (int j = 0; j < 4; j++) s[j] = l[j] + l[j + 4];
    return (s[0] + s[2]) + (s[1] + s[3]);
}

/* lane j of chunk c: sum of w * x over its values 4j..4j+3 */
static inline int32_t lane_scalar(const WRow *w, int64_t c, const int8_t *xq, int j) {
    const int8_t *wq = w->q + c * w->stride + 4 * j, *x = xq + c * QK + 4 * j;
    return wq[0] * x[0] + wq[1] * x[1] + wq[2] * x[2] + wq[3] * x[3];
}

/* Each block's lanes, as floats, times its scale, added to the lane's float by one fused
 * multiply-add (fmaf in the scalar loops: the same rounding) */
static float dot_b32(const WRow *w, const int8_t *xq, const float *xd, const float *xs, int64_t nb) {
    float acc[8] = {0}, min_sum = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const float dd = w->d[b] * xd[b];
        for (int j = 0; j < 8; j++) acc[j] = fmaf(dd, (float)lane_scalar(w, b, xq, j), acc[j]);
        if (w->has_min) min_sum = fmaf(w->m[b], xs[b], min_sum);
    }
    return lanes_sum_scalar(acc) + min_sum;
}

static float dot_k256(const WRow *w, const int8_t *xq, const float *xd, const int16_t *bsums, int64_t nb) {
    float min_sum = 0.f;
#ifdef DOT_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *wq = w->q + b * QKK, *x = xq + b * QKK;
        const int16_t *ps = w->pair_scales + b * (QKK / 2); /* 16 per 32 values */
        __m256i l = lanes_scaled(LOAD32(wq), x, ps);
        for (int c = 1; c < 8; c++) l = _mm256_add_epi32(l, lanes_scaled(LOAD32(wq + c * QK), x + c * QK, ps + 16 * c));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(xd[b] * w->d[b]), _mm256_cvtepi32_ps(l), acc);
        if (w->has_min)
            min_sum = fmaf(xd[b] * w->m[b], (float)k_min_sum(w->mn + b * 16, bsums + b * 16), min_sum);
    }
    return lanes_sum(acc) - min_sum;
#else
    float acc[8] = {0};
    for (int64_t b = 0; b < nb; b++) {
        int32_t l[8] = {0};
        for (int c = 0; c < 8; c++)
            for (int j = 0; j < 8; j++) l[j] += w->sc[b * 16 + 2 * c + j / 4] * lane_scalar(w, 8 * b + c, xq, j);
        const float dd = xd[b] * w->d[b];
        for (int j = 0; j < 8; j++) acc[j] = fmaf(dd, (float)l[j], acc[j]);
        if (w->has_min)
            min_sum = fmaf(xd[b] * w->m[b], (float)k_min_sum(w->mn + b * 16, bsums + b * 16), min_sum);
    }
    return lanes_sum_scalar(acc) - min_sum;
#endif
}

/* --- blocks of 32, fused: values assembled in a register, up to four activation rows ---- */

#ifdef DOT_AVX2
static inline __m256i values_q4_0(const uint8_t *p) { return _mm256_sub_epi8(nibbles32(p + 2), _mm256_set1_epi8(8)); }
static inline __m256i values_q4_1(const uint8_t *p) { return nibbles32(p + 4); }
static inline __m256i values_q5_0(const uint8_t *p) {
    return _mm256_sub_epi8(_mm256_or_si256(nibbles32(p + 6), high_bits32(p + 2)), _mm256_set1_epi8(16));
}
static inline __m256i values_q5_1(const uint8_t *p) { return _mm256_or_si256(nibbles32(p + 8), high_bits32(p + 4)); }
static inline __m256i values_q8_0(const uint8_t *p) { return LOAD32(p + 2); }
static inline __m256i values_iq4_nl(const uint8_t *p) {
    const __m128i table = _mm_loadu_si128((const __m128i *)IQ4NL_VALUES);
    return _mm256_shuffle_epi8(_mm256_set_m128i(table, table), nibbles32(p + 2));
}

/* out[i * n + j] = weight row j . activation row r0 + i for NW weight rows from `row` (rb
 * bytes apart) and NR activation rows (both constants at each call): each block's values are
 * assembled once for NR rows, each activation block loaded once for NW weight rows. With VNNI
 * the lanes start from -128 times the block's lane sums (once per weight block) and vpdpbusd
 * adds the unsigned x + 128 times the signed values: sum x*w, with no sign trick per pair. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define B32_VNNI 1
#define B32_MAX_NR 8 /* 16 accumulators of 32 ymm registers */
#else
#define B32_MAX_NR 4 /* 8 of 16 */
#endif
#ifdef B32_VNNI
#define B32_START(start, v, p)                                                                       \
    start = _mm256_sub_epi32(_mm256_setzero_si256(),                                                 \
                             _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8((char)0x80), v))
#define B32_LOAD_X(a, at) LOAD32((a)->xu + (at))
#define B32_LANES(start, x, v) _mm256_dpbusd_epi32(start, x, v)
#else
#define B32_START(start, v, p) start = _mm256_sign_epi8(v, v) /* |v| */
#define B32_LOAD_X(a, at) LOAD32((a)->q + (at))
#define B32_LANES(start, x, v) lanes(start, _mm256_sign_epi8(x, v))
#endif
#define B32_TILE(name, VALUES, BYTES, HAS_MIN) B32_TILE_FROM(name, VALUES, B32_START, half_to_float, BYTES, HAS_MIN)
/* START_OF(start, v, p): the lanes' starting values of block p; SCALE_OF(p): its float d */
#define B32_TILE_FROM(name, VALUES, START_OF, SCALE_OF, BYTES, HAS_MIN)                              \
    ALWAYS_INLINE void name##_tile(const uint8_t *row, int64_t rb, int64_t nb, const ActRows *a, int64_t r0, \
                                   const int NW, const int NR, float *out, int64_t n) {              \
        __m256 acc[2][B32_MAX_NR];                                                                   \
        float min_sum[2][B32_MAX_NR];                                                                \
        for (int j = 0; j < NW; j++)                                                                 \
            for (int i = 0; i < NR; i++) acc[j][i] = _mm256_setzero_ps(), min_sum[j][i] = 0.f;       \
        const int64_t k = a->k;                                                                      \
        for (int64_t b = 0; b < nb; b++) {                                                           \
            __m256i v[2], start[2];                                                                  \
            __m256 d[2];                                                                             \
            float m[2];                                                                              \
            for (int j = 0; j < NW; j++) {                                                           \
                const uint8_t *p = row + j * rb + b * BYTES;                                         \
                v[j] = VALUES(p);                                                                    \
                START_OF(start[j], v[j], p);                                                         \
                d[j] = _mm256_set1_ps(SCALE_OF(p)), m[j] = HAS_MIN ? half_to_float(p + 2) : 0.f;     \
            }                                                                                        \
            for (int i = 0; i < NR; i++) {                                                           \
                const int64_t r = r0 + i;                                                            \
                const __m256i x = B32_LOAD_X(a, r * k + b * QK);                                     \
                const __m256 xd = _mm256_set1_ps(a->d[r * (k / QK) + b]);                            \
                for (int j = 0; j < NW; j++) {                                                       \
                    const __m256i l = B32_LANES(start[j], x, v[j]);                                  \
                    acc[j][i] = _mm256_fmadd_ps(_mm256_mul_ps(d[j], xd), _mm256_cvtepi32_ps(l), acc[j][i]); \
                    if (HAS_MIN) min_sum[j][i] = fmaf(m[j], a->s[r * (k / QK) + b], min_sum[j][i]);  \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        for (int j = 0; j < NW; j++)                                                                 \
            for (int i = 0; i < NR; i++) out[i * n + j] = lanes_sum(acc[j][i]) + min_sum[j][i];      \
    }                                                                                                \
    ALWAYS_INLINE void name##_rows(const uint8_t *row, int64_t rb, int64_t nb, const ActRows *a, float *y, int64_t n, \
                                   const int NW) {                                                   \
        int64_t r = 0;                                                                               \
        for (; r + B32_MAX_NR <= a->rows; r += B32_MAX_NR)                                            \
            name##_tile(row, rb, nb, a, r, NW, B32_MAX_NR, y + r * n, n);                            \
        for (; r + 4 <= a->rows; r += 4) name##_tile(row, rb, nb, a, r, NW, 4, y + r * n, n);         \
        switch (a->rows - r) {                                                                       \
        case 3: name##_tile(row, rb, nb, a, r, NW, 3, y + r * n, n); break;                          \
        case 2: name##_tile(row, rb, nb, a, r, NW, 2, y + r * n, n); break;                          \
        case 1: name##_tile(row, rb, nb, a, r, NW, 1, y + r * n, n); break;                          \
        }                                                                                            \
    }                                                                                                \
    static void name(const uint8_t *w, int64_t nb, const ActRows *a, float *y, int64_t n, int64_t lo, int64_t hi) { \
        const int64_t rb = nb * BYTES;                                                               \
        int64_t o = lo;                                                                              \
        /* two weight rows per tile only from 4 activation rows on: with one, measured on the  \
         * bundled head (one thread, loaded 2-core EPYC), 60 ms against 13 ms one at a time */   \
        for (; o + 2 <= hi && a->rows >= 4; o += 2) name##_rows(w + o * rb, rb, nb, a, y + o, n, 2);  \
        for (; o < hi; o++) name##_rows(w + o * rb, rb, nb, a, y + o, n, 1);                         \
    }

B32_TILE(fused_q4_0, values_q4_0, 18, 0)
B32_TILE(fused_q4_1, values_q4_1, 20, 1)
B32_TILE(fused_q5_0, values_q5_0, 22, 0)
B32_TILE(fused_q5_1, values_q5_1, 24, 1)
B32_TILE(fused_q8_0, values_q8_0, 34, 0)
B32_TILE(fused_iq4_nl, values_iq4_nl, 18, 0)

/* Blocks unpacked once for many activation rows: per block its 32 values, its lanes' start
 * (B32_START) and its float d, 68 bytes; the product then reads them instead of assembling
 * each block once per tile of activation rows (Q4_0, Q5_0, IQ4_NL, which assemble their
 * values from nibbles and bits; blocks with a min, and Q8_0, read the file's blocks) */
#define UNPACKED_VALUES(p) LOAD32(p)
#define UNPACKED_START(start, v, p) start = LOAD32((p) + 32)
static inline float unpacked_scale(const uint8_t *p) {
    float d;
    memcpy(&d, p + 64, sizeof d);
    return d;
}
B32_TILE_FROM(fused_unpacked, UNPACKED_VALUES, UNPACKED_START, unpacked_scale, UNPACKED_BYTES, 0)

#define UNPACK_INTO(VALUES)                                                                          \
    for (int64_t b = 0; b < nb * rows; b++) {                                                        \
        const uint8_t *p = w + b * bb;                                                               \
        uint8_t *u = out + b * UNPACKED_BYTES;                                                       \
        const __m256i v = VALUES(p);                                                                 \
        __m256i start;                                                                               \
        B32_START(start, v, p);                                                                      \
        const float d = half_to_float(p);                                                            \
        _mm256_storeu_si256((__m256i *)u, v), _mm256_storeu_si256((__m256i *)(u + 32), start);       \
        memcpy(u + 64, &d, sizeof d);                                                                \
    }

/* `rows` weight rows of nb blocks (bb bytes each) of type Q4_0, Q5_0 or IQ4_NL unpacked into
 * out; 0 for another type */
static int unpack_b32_rows(int64_t type, const uint8_t *w, int64_t nb, int64_t bb, int64_t rows, uint8_t *out) {
    /* (out: rows * nb * UNPACKED_BYTES) */
    switch (type) {
    case 2: UNPACK_INTO(values_q4_0) return 1;
    case 6: UNPACK_INTO(values_q5_0) return 1;
    case 20: UNPACK_INTO(values_iq4_nl) return 1;
    default: return 0;
    }
}

/* the fused product of a block-of-32 type: 1, or 0 for another type */
static int fused_b32(int64_t type, const uint8_t *w, int64_t nb, const ActRows *a, float *y, int64_t n, int64_t lo,
                     int64_t hi) {
    switch (type) {
    case 2: fused_q4_0(w, nb, a, y, n, lo, hi); return 1;
    case 3: fused_q4_1(w, nb, a, y, n, lo, hi); return 1;
    case 6: fused_q5_0(w, nb, a, y, n, lo, hi); return 1;
    case 7: fused_q5_1(w, nb, a, y, n, lo, hi); return 1;
    case 8: fused_q8_0(w, nb, a, y, n, lo, hi); return 1;
    case 20: fused_iq4_nl(w, nb, a, y, n, lo, hi); return 1;
    default: return 0;
    }
}

/* out[i * n] = the unpacked super-block row w . activation row r0 + i for i < NR: each 32
 * values' |w| and scales loaded once for NR rows; the float order is dot_k256's */
ALWAYS_INLINE void k256_tile(const WRow *w, int64_t nb, const ActRows *a, int64_t r0, const int NR, float *out,
                             int64_t n) {
    const int64_t k = a->k;
    __m256 acc[B32_MAX_NR];
    float min_sum[B32_MAX_NR];
    for (int i = 0; i < NR; i++) acc[i] = _mm256_setzero_ps(), min_sum[i] = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        __m256i l[B32_MAX_NR];
        for (int i = 0; i < NR; i++) l[i] = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++) {
            const int64_t chunk = 8 * b + c;
            const __m256i v = LOAD32(w->q + chunk * QK), abs_v = _mm256_sign_epi8(v, v);
            const __m256i scales = _mm256_load_si256((const __m256i *)(w->pair_scales + 16 * chunk));
            for (int i = 0; i < NR; i++) {
                const __m256i sx = _mm256_sign_epi8(LOAD32(a->q + (r0 + i) * k + chunk * QK), v);
                l[i] = _mm256_add_epi32(l[i], _mm256_madd_epi16(_mm256_maddubs_epi16(abs_v, sx), scales));
            }
        }
        for (int i = 0; i < NR; i++) {
            const float xd = a->d[(r0 + i) * (k / QK) + b];
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(xd * w->d[b]), _mm256_cvtepi32_ps(l[i]), acc[i]);
            if (w->has_min) {
                const int32_t summ = k_min_sum(w->mn + b * 16, a->bsums + (r0 + i) * (k / 16) + b * 16);
                min_sum[i] = fmaf(xd * w->m[b], (float)summ, min_sum[i]);
            }
        }
    }
    for (int i = 0; i < NR; i++) out[i * n] = lanes_sum(acc[i]) - min_sum[i];
}

/* the unpacked super-block row w against every row of a, into y[r * n] */
static void k256_rows(const WRow *w, int64_t nb, const ActRows *a, float *y, int64_t n) {
    int64_t r = 0;
    for (; r + B32_MAX_NR <= a->rows; r += B32_MAX_NR) k256_tile(w, nb, a, r, B32_MAX_NR, y + r * n, n);
    for (; r + 4 <= a->rows; r += 4) k256_tile(w, nb, a, r, 4, y + r * n, n);
    switch (a->rows - r) {
    case 3: k256_tile(w, nb, a, r, 3, y + r * n, n); break;
    case 2: k256_tile(w, nb, a, r, 2, y + r * n, n); break;
    case 1: k256_tile(w, nb, a, r, 1, y + r * n, n); break;
    }
}
#endif

/* --- rows of activations against rows of weights ----------------------------------------- */

/* From this many activation rows on, blocks of 32 that assemble their values are unpacked
 * once per call (fused_unpacked) */
enum { UNPACK_ROWS = 16 };

/* rows [lo, hi) of w against every row of a */
static int unpacks_b32(int64_t type) { return type == 2 || type == 6 || type == 20; }

/* rows [lo, hi) of w against every row of a; scratch: the bytes gguf_dot_rows sizes for it */
static void dot_rows_all(int64_t type, const void *w, int64_t n, const ActRows *a, float *y, int64_t lo, int64_t hi,
                         uint8_t *scratch) {
    const int64_t k = a->k, bb = gguf_dot_block_bytes(type), K = a->type == ACT_Q8_K;
    const int64_t nb = k / (K ? QKK : QK), rb = nb * bb;
#ifdef DOT_AVX2
    if (unpacks_b32(type) && a->rows >= UNPACK_ROWS) { /* many activation rows: each block assembled once */
        unpack_b32_rows(type, (const uint8_t *)w + lo * rb, nb, bb, hi - lo, scratch);
        fused_unpacked(scratch, nb, a, y + lo, n, 0, hi - lo);
        return;
    }
    if (fused_b32(type, (const uint8_t *)w, nb, a, y, n, lo, hi)) return;
#endif
    WRow row;
    wrow_init(&row, k, scratch);
    for (int64_t o = lo; o < hi; o++) {
        unpack_row(type, (const uint8_t *)w + o * rb, k, &row);
#ifdef DOT_AVX2
        if (K) {
            k256_rows(&row, nb, a, y + o, n);
            continue;
        }
#endif
        for (int64_t r = 0; r < a->rows; r++) {
            const int8_t *xq = a->q + r * k;
            const float *xd = a->d + r * (k / QK);
            y[r * n + o] = K ? dot_k256(&row, xq, xd, a->bsums + r * (k / 16), nb)
                             : dot_b32(&row, xq, xd, a->s + r * (k / QK), nb);
        }
    }
}

/* The product in tiles of ROWS_PER_PASS activation rows x COLS_PER_TILE weight rows, each
 * written into a small local buffer and copied out row by row: the activation rows of a tile
 * stay in L1/L2 while the weights stream, and the outputs are not written a float at a time
 * at a stride of the whole output row (a multiple of 4 KiB for every Gemma width, so each
 * store of a column would contend for one L1 set). Measured in thread CPU time on the bundled
 * gate_proj (2048 x 640, Q5_0), one thread of a loaded 2-core EPYC: 0.81 ns per block pair
 * at 8, 64 and 512 rows. */
enum { ROWS_PER_PASS = 64, COLS_PER_TILE = 64 };

void gguf_dot_rows(int64_t type, const void *w, int64_t n, const ActRows *a, float *y, int64_t lo, int64_t hi) {
    const int64_t k = a->k, bb = gguf_dot_block_bytes(type);
    if (bb < 0 || gguf_act_type(type) != a->type) return;
    const int64_t nb = k / (a->type == ACT_Q8_K ? QKK : QK), rb = nb * bb;
    const int64_t unpacked = COLS_PER_TILE * nb * UNPACKED_BYTES, row = wrow_bytes(k);
    uint8_t *scratch = malloc((size_t)(unpacked > row ? unpacked : row));
    if (!scratch) return;
    float tile[ROWS_PER_PASS * COLS_PER_TILE];
    for (int64_t r0 = 0; r0 < a->rows; r0 += ROWS_PER_PASS) {
        ActRows part = *a; /* rows [r0, r0 + pass) of a: each row's result is its own */
        part.rows = a->rows - r0 < ROWS_PER_PASS ? a->rows - r0 : ROWS_PER_PASS;
        part.q += r0 * k, part.xu += r0 * k, part.d += r0 * (k / QK), part.s += r0 * (k / QK);
        part.bsums += r0 * (k / 16);
        for (int64_t o0 = lo; o0 < hi; o0 += COLS_PER_TILE) {
            const int64_t cols = hi - o0 < COLS_PER_TILE ? hi - o0 : COLS_PER_TILE;
            dot_rows_all(type, (const uint8_t *)w + o0 * rb, cols, &part, tile, 0, cols, scratch);
            for (int64_t r = 0; r < part.rows; r++)
                memcpy(y + (r0 + r) * n + o0, tile + r * cols, (size_t)cols * sizeof(float));
        }
    }
    free(scratch);
}

/* x (rows, k) rounded once into 8-bit blocks, then output columns split over threads */
void gguf_matmul_q8_mt(int64_t type, const void *w, int64_t n, int64_t k, const float *x, int64_t rows, float *y,
                       int64_t threads) {
    const int64_t act = gguf_act_type(type), t = threads > 1 ? threads : 1;
    if (act < 0 || k % (act == ACT_Q8_K ? QKK : QK)) return;
    void *buffer = malloc((size_t)act_rows_bytes(rows, k));
    if (!buffer) return;
    ActRows a;
    act_rows_init(&a, act, rows, k, buffer);
#pragma omp parallel for schedule(static, 1) num_threads(t)
    for (int64_t i = 0; i < t; i++) act_rows_quantize(&a, x, rows * i / t, rows * (i + 1) / t);
#pragma omp parallel for schedule(static, 1) num_threads(t)
    for (int64_t i = 0; i < t; i++) gguf_dot_rows(type, w, n, &a, y, n * i / t, n * (i + 1) / t);
    free(buffer);
}

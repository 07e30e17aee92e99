/* Integer dots of GGUF block matrices with activations rounded to 8-bit blocks (gguf_act.c):
 * llama.cpp's products (ggml-cpu/quants.c ggml_vec_dot_*_generic states each formula),
 * restated over one unpacked form per family.
 *
 * Each weight row is unpacked once per call into int8 values (signed, or unsigned where the
 * type subtracts a min) and its scales:
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
 * nor the build. Signed products use the sign trick (|w| times x with w's sign), which stays
 * within 16 bits for every pair the types produce (|w| <= 128, |x| <= 127).
 */
#include <stdlib.h>

#include "gguf_dot.h"

#pragma GCC optimize("fp-contract=off") /* the float order above, in every build */

enum { QK = 32, QKK = 256 };

static const int8_t IQ4NL_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                        1,    13,   25,  38,  53,  69,  89,  113}; /* ggml-common.h kvalues_iq4nl */

/* One unpacked weight row: 32-value chunks of int8 values at q + c * stride (32, or 34 for
 * Q8_0 read in place), per block a scale d and a min m (B32: the fp16 m of Q4_1 / Q5_1; K:
 * dmin), per 16 values an integer scale sc and min mn (K types). */
typedef struct {
    const int8_t *q;
    int64_t stride;
    float *d, *m;
    int16_t *sc, *mn;
    int has_min;
} WRow;

/* --- unpacking, type by type (layouts: gguf_blocks.c, ggml-common.h block_q*) ----------- */

static void unpack_q4_0(const uint8_t *b, int8_t *q, float *d, float *m) {
    *d = half_to_float(b), *m = 0.f;
    for (int j = 0; j < 16; j++) q[j] = (int8_t)((b[2 + j] & 0xF) - 8), q[j + 16] = (int8_t)((b[2 + j] >> 4) - 8);
}

static void unpack_q4_1(const uint8_t *b, int8_t *q, float *d, float *m) {
    *d = half_to_float(b), *m = half_to_float(b + 2);
    for (int j = 0; j < 16; j++) q[j] = (int8_t)(b[4 + j] & 0xF), q[j + 16] = (int8_t)(b[4 + j] >> 4);
}

static inline uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void unpack_q5_0(const uint8_t *b, int8_t *q, float *d, float *m) {
    const uint32_t qh = le32(b + 2);
    *d = half_to_float(b), *m = 0.f;
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)(((b[6 + j] & 0xF) | ((qh >> j) & 1) << 4) - 16);
        q[j + 16] = (int8_t)(((b[6 + j] >> 4) | ((qh >> (j + 16)) & 1) << 4) - 16);
    }
}

static void unpack_q5_1(const uint8_t *b, int8_t *q, float *d, float *m) {
    const uint32_t qh = le32(b + 4);
    *d = half_to_float(b), *m = half_to_float(b + 2);
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)((b[8 + j] & 0xF) | ((qh >> j) & 1) << 4);
        q[j + 16] = (int8_t)((b[8 + j] >> 4) | ((qh >> (j + 16)) & 1) << 4);
    }
}

static void unpack_iq4_nl(const uint8_t *b, int8_t *q, float *d, float *m) {
    *d = half_to_float(b), *m = 0.f;
    for (int j = 0; j < 16; j++) q[j] = IQ4NL_VALUES[b[2 + j] & 0xF], q[j + 16] = IQ4NL_VALUES[b[2 + j] >> 4];
}

/* Q2_K: value e = h*128 + s*32 + l is bits 2s of qs[h*32 + l]; group e/16's scale and min
 * are the nibbles of scales[e/16] */
static void unpack_q2_k(const uint8_t *b, int8_t *q, float *d, float *m, int16_t *sc, int16_t *mn) {
    const uint8_t *qs = b + 16;
    *d = half_to_float(b + 80), *m = half_to_float(b + 82);
    for (int g = 0; g < 16; g++) sc[g] = b[g] & 0xF, mn[g] = b[g] >> 4;
    for (int e = 0; e < QKK; e++) q[e] = (int8_t)((qs[(e / 128) * 32 + e % 32] >> (2 * ((e / 32) % 4))) & 3);
}

/* Q3_K: low bits as Q2_K's, a clear bit e/32 of hmask[e % 32] subtracts 4; six-bit signed
 * scales per 16 */
static void unpack_q3_k(const uint8_t *b, int8_t *q, float *d, int16_t *sc) {
    const uint8_t *hmask = b, *qs = b + 32, *s = b + 96;
    *d = half_to_float(b + 108);
    for (int g = 0; g < 16; g++) {
        const int low = g < 8 ? s[g] & 0xF : s[g - 8] >> 4, high = (s[8 + g % 4] >> (2 * (g / 4))) & 3;
        sc[g] = (int16_t)((low | high << 4) - 32);
    }
    for (int e = 0; e < QKK; e++) {
        const int low = (qs[(e / 128) * 32 + e % 32] >> (2 * ((e / 32) % 4))) & 3;
        q[e] = (int8_t)(low - (((hmask[e % 32] >> (e / 32)) & 1) ? 0 : 4));
    }
}

/* the 6-bit scale and min of sub-block j of Q4_K / Q5_K (ggml-quants.c get_scale_min_k4) */
static inline void k_scale_min(const uint8_t *s, int j, int16_t *sc, int16_t *m) {
    if (j < 4) {
        *sc = s[j] & 63, *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 2) & 0x30);
        *m = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
    }
}

/* Q4_K: sub-block j (32 values) is nibble j%2 of qs[(j/2)*32 + l]; Q5_K adds bit j of qh[l] */
static void unpack_q45_k(const uint8_t *b, int five, int8_t *q, float *d, float *m, int16_t *sc, int16_t *mn) {
    const uint8_t *qh = b + 16, *qs = five ? b + 48 : b + 16;
    *d = half_to_float(b), *m = half_to_float(b + 2);
    for (int j = 0; j < 8; j++) {
        k_scale_min(b + 4, j, sc + 2 * j, mn + 2 * j);
        sc[2 * j + 1] = sc[2 * j], mn[2 * j + 1] = mn[2 * j];
        const uint8_t *src = qs + (j / 2) * 32;
        const int shift = 4 * (j % 2);
        for (int l = 0; l < 32; l++)
            q[j * 32 + l] = (int8_t)(((src[l] >> shift) & 0xF) | (five ? ((qh[l] >> j) & 1) << 4 : 0));
    }
}

/* Q6_K: value e = h*128 + r: nibble r/64 of ql[h*64 + r%64], bits 2*(r/32) of qh[h*32 + r%32],
 * minus 32; int8 scales per 16 */
static void unpack_q6_k(const uint8_t *b, int8_t *q, float *d, int16_t *sc) {
    const uint8_t *ql = b, *qh = b + 128;
    *d = half_to_float(b + 208);
    for (int g = 0; g < 16; g++) sc[g] = (int8_t)b[192 + g];
    for (int e = 0; e < QKK; e++) {
        const int h = e / 128, r = e % 128;
        const int lo = (ql[h * 64 + r % 64] >> (4 * (r / 64))) & 0xF, hi = (qh[h * 32 + r % 32] >> (2 * (r / 32))) & 3;
        q[e] = (int8_t)((lo | hi << 4) - 32);
    }
}

/* IQ4_XS: d, scales_h, scales_l[4], qs[128]; sub-block ib's scale is 6 bits minus 32, its
 * values the IQ4_NL table's (ggml-quants.c dequantize_row_iq4_xs) */
static void unpack_iq4_xs(const uint8_t *b, int8_t *q, float *d, int16_t *sc) {
    const uint16_t scales_h = (uint16_t)(b[2] | b[3] << 8);
    *d = half_to_float(b);
    for (int ib = 0; ib < 8; ib++) {
        const int ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 0xF) | (((scales_h >> (2 * ib)) & 3) << 4);
        sc[2 * ib] = sc[2 * ib + 1] = (int16_t)(ls - 32);
        const uint8_t *qs = b + 8 + 16 * ib;
        for (int j = 0; j < 16; j++)
            q[ib * 32 + j] = IQ4NL_VALUES[qs[j] & 0xF], q[ib * 32 + j + 16] = IQ4NL_VALUES[qs[j] >> 4];
    }
}

/* bytes per block and values per block of the types with a dot here */
static int block_bytes(int64_t type) {
    switch (type) {
    case 2: return 18;
    case 3: return 20;
    case 6: return 22;
    case 7: return 24;
    case 8: return 34;
    case 20: return 18;
    case 10: return 84;
    case 11: return 110;
    case 12: return 144;
    case 13: return 176;
    case 14: return 210;
    case 23: return 136;
    default: return -1;
    }
}

/* row `row` of raw blocks into w (its buffers sized for k values) */
static void unpack_row(int64_t type, const uint8_t *row, int64_t k, WRow *w, int8_t *qbuf) {
    const int64_t bb = block_bytes(type);
    w->stride = QK, w->q = qbuf, w->has_min = type == 3 || type == 7 || type == 10 || type == 12 || type == 13;
    if (type == 8) { /* Q8_0: the values in place, only the scales converted */
        w->q = (const int8_t *)(row + 2), w->stride = 34;
        for (int64_t b = 0; b < k / QK; b++) w->d[b] = half_to_float(row + b * 34), w->m[b] = 0.f;
        return;
    }
    for (int64_t b = 0; b < k / (gguf_act_type(type) == ACT_Q8_K ? QKK : QK); b++) {
        const uint8_t *p = row + b * bb;
        int8_t *q = qbuf + b * (gguf_act_type(type) == ACT_Q8_K ? QKK : QK);
        int16_t *sc = w->sc + b * 16, *mn = w->mn + b * 16;
        switch (type) {
        case 2: unpack_q4_0(p, q, w->d + b, w->m + b); break;
        case 3: unpack_q4_1(p, q, w->d + b, w->m + b); break;
        case 6: unpack_q5_0(p, q, w->d + b, w->m + b); break;
        case 7: unpack_q5_1(p, q, w->d + b, w->m + b); break;
        case 20: unpack_iq4_nl(p, q, w->d + b, w->m + b); break;
        case 10: unpack_q2_k(p, q, w->d + b, w->m + b, sc, mn); break;
        case 11: unpack_q3_k(p, q, w->d + b, sc); break;
        case 12: unpack_q45_k(p, 0, q, w->d + b, w->m + b, sc, mn); break;
        case 13: unpack_q45_k(p, 1, q, w->d + b, w->m + b, sc, mn); break;
        case 14: unpack_q6_k(p, q, w->d + b, sc); break;
        case 23: unpack_iq4_xs(p, q, w->d + b, sc); break;
        }
    }
}

/* --- the lane sums of 32 products, and the fixed float accumulation --------------------- */

#if defined(__AVX2__)
/* lane j = sum of w[i] * x[i] for i in 4j..4j+3 */
static inline __m256i lanes_i8(__m256i w, __m256i x) {
    const __m256i aw = _mm256_sign_epi8(w, w), sx = _mm256_sign_epi8(x, w);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1));
#endif
}

/* lane j = scale of its 16-group times the sum of w[i] * x[i] for i in 4j..4j+3: scales s0
 * for values 0..15 (lanes 0-3), s1 for 16..31 */
static inline __m256i lanes_i8_scaled(__m256i w, __m256i x, int16_t s0, int16_t s1) {
    const __m256i aw = _mm256_sign_epi8(w, w), sx = _mm256_sign_epi8(x, w);
    const __m256i scales = _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), scales);
}

static inline float lanes_sum(__m256 v) { /* (l0 + l4) + (l2 + l6) + ((l1 + l5) + (l3 + l7)) */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#define LOAD32(p) _mm256_loadu_si256((const __m256i *)(p))
#endif

static inline float lanes_sum_scalar(const float *l) {
    float s[4];
    for (int j = 0; j < 4; j++) s[j] = l[j] + l[j + 4];
    return (s[0] + s[2]) + (s[1] + s[3]);
}

/* a row of blocks of 32 . a Q8_0 / Q8_1 activation row */
static float dot_b32(const WRow *w, const int8_t *xq, const float *xd, const float *xs, int64_t nb) {
    float min_sum = 0.f;
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i l = lanes_i8(LOAD32(w->q + b * w->stride), LOAD32(xq + b * QK));
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(w->d[b] * xd[b]), _mm256_cvtepi32_ps(l)));
        if (w->has_min) min_sum = min_sum + w->m[b] * xs[b];
    }
    return lanes_sum(acc) + min_sum;
#else
    float acc[8] = {0};
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *wq = w->q + b * w->stride, *x = xq + b * QK;
        const float dd = w->d[b] * xd[b];
        for (int j = 0; j < 8; j++) {
            int32_t l = 0;
            for (int i = 4 * j; i < 4 * j + 4; i++) l += wq[i] * x[i];
            acc[j] = acc[j] + dd * (float)l;
        }
        if (w->has_min) min_sum = min_sum + w->m[b] * xs[b];
    }
    return lanes_sum_scalar(acc) + min_sum;
#endif
}

/* the integer min term of super-block b: sum of min * bsum over its 16-groups */
static inline int32_t k_min_sum(const int16_t *mn, const int16_t *bsums) {
    int32_t s = 0;
    for (int g = 0; g < 16; g++) s += mn[g] * bsums[g];
    return s;
}

/* a row of super-blocks of 256 . a Q8_K activation row */
static float dot_k256(const WRow *w, const int8_t *xq, const float *xd, const int16_t *bsums, int64_t nb) {
    float min_sum = 0.f;
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *wq = w->q + b * QKK, *x = xq + b * QKK;
        const int16_t *sc = w->sc + b * 16;
        __m256i l = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++)
            l = _mm256_add_epi32(l, lanes_i8_scaled(LOAD32(wq + c * QK), LOAD32(x + c * QK), sc[2 * c], sc[2 * c + 1]));
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(xd[b] * w->d[b]), _mm256_cvtepi32_ps(l)));
        if (w->has_min) min_sum = min_sum + (xd[b] * w->m[b]) * (float)k_min_sum(w->mn + b * 16, bsums + b * 16);
    }
    return lanes_sum(acc) - min_sum;
#else
    float acc[8] = {0};
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *wq = w->q + b * QKK, *x = xq + b * QKK;
        const int16_t *sc = w->sc + b * 16;
        int32_t l[8] = {0};
        for (int c = 0; c < 8; c++)
            for (int j = 0; j < 8; j++) {
                int32_t p = 0;
                for (int i = c * QK + 4 * j; i < c * QK + 4 * j + 4; i++) p += wq[i] * x[i];
                l[j] += sc[2 * c + j / 4] * p;
            }
        const float dd = xd[b] * w->d[b];
        for (int j = 0; j < 8; j++) acc[j] = acc[j] + dd * (float)l[j];
        if (w->has_min) min_sum = min_sum + (xd[b] * w->m[b]) * (float)k_min_sum(w->mn + b * 16, bsums + b * 16);
    }
    return lanes_sum_scalar(acc) - min_sum;
#endif
}

/* --- rows of activations against rows of weights ----------------------------------------- */

enum { TILE_W = 4 }; /* weight rows unpacked together, each dotted with every activation row */

void gguf_dot_rows(int64_t type, const void *w, int64_t n, const ActRows *a, float *y, int64_t lo, int64_t hi) {
    const int64_t k = a->k, bb = block_bytes(type), K = a->type == ACT_Q8_K;
    if (bb < 0 || gguf_act_type(type) != a->type) return;
    const int64_t values = K ? QKK : QK, nb = k / values, rb = nb * bb;
    /* per weight row of the tile: k values, k/32 d and m, k/16 sc and mn */
    const int64_t per_row = k + 2 * (k / QK) * (int64_t)sizeof(float) + 2 * (k / 16) * (int64_t)sizeof(int16_t);
    uint8_t *buffer = malloc((size_t)(TILE_W * per_row + 64));
    if (!buffer) return;
    WRow rows[TILE_W];
    int8_t *qbuf[TILE_W];
    for (int i = 0; i < TILE_W; i++) {
        uint8_t *p = buffer + i * per_row;
        qbuf[i] = (int8_t *)p;
        rows[i].d = (float *)(p + k), rows[i].m = rows[i].d + k / QK;
        rows[i].sc = (int16_t *)(rows[i].m + k / QK), rows[i].mn = rows[i].sc + k / 16;
    }
    for (int64_t n0 = lo; n0 < hi; n0 += TILE_W) {
        const int nw = hi - n0 < TILE_W ? (int)(hi - n0) : TILE_W;
        for (int i = 0; i < nw; i++) unpack_row(type, (const uint8_t *)w + (n0 + i) * rb, k, &rows[i], qbuf[i]);
        for (int64_t r = 0; r < a->rows; r++) {
            const int8_t *xq = a->q + r * k;
            const float *xd = a->d + r * (k / QK), *xs = a->s + r * (k / QK);
            for (int i = 0; i < nw; i++)
                y[r * n + n0 + i] = K ? dot_k256(&rows[i], xq, xd, a->bsums + r * (k / 16), nb)
                                      : dot_b32(&rows[i], xq, xd, xs, nb);
        }
    }
    free(buffer);
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

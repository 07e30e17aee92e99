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
 * shared by the vector and scalar paths so that they give the same bits.
 *  - Blocks of 32: eight lane sums. Lane m holds the blocks b with b mod 8 = m: each block's
 *    whole integer sum converted to float, times the block's float scale (d_w * d_x), added to
 *    the lane's float by one fused multiply-add (blocks past the last, to a multiple of 8, add
 *    fmaf(0, 0, lane)). At the end the eight lanes are summed as (l0 + l4) + (l2 + l6) + ((l1 +
 *    l5) + (l3 + l7)) and the min term added.
 *  - Super-blocks: eight lane sums too, llama.cpp's (ggml-cpu/arch/x86/quants.c, the AVX2
 *    ggml_vec_dot_q4_K_q8_K and kin): lane j holds values 4j..4j+3 of every 32 (the lanes of
 *    vpmaddubsw + vpmaddwd), each super-block's scaled lane integer converted, times (d_x *
 *    d_w), added by one fused multiply-add; the same lane sum at the end, minus the min term
 *    (a float of (d_x * dmin_w) times each super-block's integer sum of min * bsums). Keeping
 *    llama.cpp's rounding matters beyond the last bit: the bundled model's perplexity on the
 *    test text moves by 0.5-1% with any other rounding of these products (measured: one
 *    integer per super-block gave 36.14 against llama-perplexity's 35.80, main's lane order
 *    with another final lane tree 35.99), as the activations' 8-bit rounding amplifies it.
 * A row's result therefore depends on nothing but its own values: not the number of rows, nor
 * the tiles, nor the build. (llama.cpp's AVX2 ggml_vec_dot_q8_0_q8_0
 * keeps lane j of every block instead: a different rounding of the same exact block sums, one
 * convert and one multiply-add per block where this order takes one per 8 blocks.) Products
 * take |w| (unsigned) and x with w's sign: AVX-512 VNNI's vpdpbusd adds
 * each four into a lane at once; AVX2's vpmaddubsw pairs them first, whose sums stay within 16
 * bits for every pair the types produce (|w| <= 128, |x| <= 127), and vpmaddwd adds two pairs
 * (or, for the super-blocks, weighs them by their 16-group's scale).
 *
 * The blocks of 32 run fused where AVX2 is: for few activation rows, each group of 8 blocks
 * assembled in registers and its lanes reduced to block sums (B32_TILE); from UNPACK_ROWS rows
 * on, the weight rows unpacked once per call into transposed groups that the activations'
 * transposed copy (ActRows xt) meets word for word (groups_product). Q4_K and Q6_K against up
 * to FUSED_K_ROWS activation rows are read from the file's blocks in registers as well
 * (gguf_fused_k.c). With 512-bit VNNI the blocks of 32 without a min take gguf_panel.c's
 * panels from 2 or 3 rows on instead of both (panels_take_rows), and Q4_K and Q6_K take
 * gguf_kpanel.c's from KPANEL_MIN_ROWS rows on (kpanels_take). Elsewhere, and for the other
 * super-blocks, each weight row is unpacked once (gguf_unpack.c) and dotted with every
 * activation row.
 */
#include <stdlib.h>

#include "common.h"
#include "gguf_dot.h"

#pragma GCC optimize("fp-contract=off") /* the float order above, in every build */

enum { QK = 32, QKK = 256 };
enum { GROUP_BYTES = 256 + 32 + 32 }; /* 8 blocks of 32 unpacked: values, lanes' start, d */

/* --- the lane sums of 32 products, and the fixed float accumulation --------------------- */

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
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

/* Each block's integer sum, as a float, times its scale, added to the float of lane (block
 * mod 8) by one fused multiply-add; the blocks after the last, up to a multiple of 8, add
 * fmaf(0, 0, lane) as the vector loops' zero padding does (the same bits, -0 included) */
static float dot_b32(const WRow *w, const int8_t *xq, const float *xd, const float *xs, int64_t nb) {
    float acc[8] = {0}, min_sum = 0.f;
    for (int64_t b = 0; b < (nb + 7) / 8 * 8; b++) {
        int32_t sum = 0;
        float dd = 0.f;
        if (b < nb) {
            for (int j = 0; j < 8; j++) sum += lane_scalar(w, b, xq, j);
            dd = w->d[b] * xd[b];
            if (w->has_min) min_sum = fmaf(w->m[b], xs[b], min_sum);
        }
        acc[b % 8] = fmaf(dd, (float)sum, acc[b % 8]);
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

/* --- blocks of 32: each block's integer sum in lane (block mod 8) ------------------------ */

#ifdef DOT_AVX2
/* With VNNI the lanes start from -128 times the block's lane sums (once per weight block) and
 * vpdpbusd adds the unsigned x + 128 times the signed values: sum x*w, with no sign trick per
 * pair; without, |w| times x with w's sign (vpmaddubsw + vpmaddwd). */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define B32_VNNI 1
#endif
#ifdef B32_VNNI
#define B32_START(start, v)                                                                          \
    start = _mm256_sub_epi32(_mm256_setzero_si256(),                                                 \
                             _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8((char)0x80), v))
#define B32_X(a, at) LOAD32((a)->xu + (at))
#define B32_XT(a, at) LOAD32((a)->xut + (at))
#define B32_LANES(start, x, v) _mm256_dpbusd_epi32(start, x, v)
#else
#define B32_START(start, v) start = _mm256_sign_epi8(v, v) /* |v| */
#define B32_X(a, at) LOAD32((a)->q + (at))
#define B32_XT(a, at) LOAD32((a)->qt + (at))
#define B32_LANES(start, x, v) lanes(start, _mm256_sign_epi8(x, v))
#endif

/* lane m = the sum of l_m's eight lanes, from q0 = hadd(hadd(l0, l1), hadd(l2, l3)) and q1 the
 * same of l4..l7 (exact integers) */
static inline __m256i block_sums8(__m256i q0, __m256i q1) {
    return _mm256_add_epi32(_mm256_permute2x128_si256(q0, q1, 0x20), _mm256_permute2x128_si256(q0, q1, 0x31));
}

/* the qsum of `count` (<= 8) blocks of an activation row, 0 after count */
ALWAYS_INLINE __m256i block_qsums(const int32_t *qsum, const int count) {
    if (count == 8) return LOAD32(qsum);
    const __m256i in_group = _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_maskload_epi32((const int *)qsum, in_group);
}

/* the fp16 d at the start of `count` (<= 8) blocks `bytes` apart as 8 floats, 0 after count:
 * assembled in a register (8 stores and one wide load would stall store forwarding) */
ALWAYS_INLINE __m256 scales8(const uint8_t *p, const int64_t bytes, const int count) {
    __m128i h = _mm_setzero_si128();
#define SCALE_LANE(m)                                                                                \
    if (m < count) h = _mm_insert_epi16(h, (short)(p[(m) * bytes] | p[(m) * bytes + 1] << 8), m)
    SCALE_LANE(0); SCALE_LANE(1); SCALE_LANE(2); SCALE_LANE(3);
    SCALE_LANE(4); SCALE_LANE(5); SCALE_LANE(6); SCALE_LANE(7);
#undef SCALE_LANE
    return _mm256_cvtph_ps(h);
}

/* out[i * n + j] = weight row j . activation row r0 + i for NW weight rows from `row` (rb
 * bytes apart, the file's blocks) and NR activation rows (constants at each call): per group
 * of 8 blocks, each block's values assembled once for NR rows, its lanes reduced to one block
 * sum per lane (block_sums8), then scaled. Rows of few activations (decode) take this path. */
#define B32_TILE(name, VALUES, BYTES, HAS_MIN, U, OFFSET)                                            \
    /* the group of `count` blocks from block g (count 8 but in the last group) */                  \
    ALWAYS_INLINE void name##_group(const uint8_t *row, int64_t rb, int64_t g, const ActRows *a, int64_t r0, \
                                    const int NW, const int NR, const int count, __m256 acc[2][4],   \
                                    float min_sum[2][4]) {                                           \
        const int64_t k = a->k, kt = a->kt;                                                          \
        __m256i half[2][4], quarter[2][4], sums[2][4];                                               \
        __m256 dw[2];                                                                                \
        for (int j = 0; j < NW; j++) dw[j] = scales8(row + j * rb + g * BYTES, BYTES, count);       \
        _Pragma("GCC unroll 8") for (int m = 0; m < 8; m++) {                                        \
            __m256i v[2], start[2];                                                                  \
            for (int j = 0; j < NW; j++) {                                                           \
                v[j] = m < count ? VALUES(row + j * rb + (g + m) * BYTES) : _mm256_setzero_si256(); \
                if (U) start[j] = _mm256_setzero_si256();                                            \
                else B32_START(start[j], v[j]);                                                      \
            }                                                                                        \
            for (int i = 0; i < NR; i++) {                                                           \
                const int64_t r = r0 + i, at = r * k + (g + m) * QK;                                 \
                const __m256i x = m >= count ? _mm256_setzero_si256() : U ? LOAD32(a->q + at) : B32_X(a, at); \
                for (int j = 0; j < NW; j++) {                                                       \
                    const __m256i l = U ? lanes(v[j], x) : B32_LANES(start[j], x, v[j]);             \
                    if (m % 2 == 0) half[j][i] = l;                                                  \
                    else if (m % 4 == 1) quarter[j][i] = _mm256_hadd_epi32(half[j][i], l);          \
                    else {                                                                           \
                        const __m256i q = _mm256_hadd_epi32(quarter[j][i], _mm256_hadd_epi32(half[j][i], l)); \
                        sums[j][i] = m == 3 ? q : block_sums8(sums[j][i], q);                        \
                    }                                                                                \
                    if (HAS_MIN && m < count)                                                        \
                        min_sum[j][i] = fmaf(half_to_float(row + j * rb + (g + m) * BYTES + 2),      \
                                             a->s[r * (k / QK) + g + m], min_sum[j][i]);             \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        for (int i = 0; i < NR; i++) {                                                               \
            if (OFFSET) { /* the values' offset: OFFSET times each block's sum of x, subtracted */  \
                const __m256i x_sums = block_qsums(a->qsum + (r0 + i) * (k / QK) + g, count);       \
                for (int j = 0; j < NW; j++)                                                         \
                    sums[j][i] = _mm256_sub_epi32(sums[j][i], _mm256_mullo_epi32(x_sums, _mm256_set1_epi32(OFFSET))); \
            }                                                                                        \
            const __m256 dx = _mm256_loadu_ps(a->dt + (r0 + i) * (kt / QK) + g);                     \
            for (int j = 0; j < NW; j++)                                                             \
                acc[j][i] = _mm256_fmadd_ps(_mm256_mul_ps(dw[j], dx), _mm256_cvtepi32_ps(sums[j][i]), acc[j][i]); \
        }                                                                                            \
    }                                                                                                \
    ALWAYS_INLINE void name##_tile(const uint8_t *row, int64_t rb, int64_t nb, const ActRows *a, int64_t r0, \
                                   const int NW, const int NR, float *out, int64_t n) {              \
        __m256 acc[2][4];                                                                            \
        float min_sum[2][4];                                                                         \
        for (int j = 0; j < NW; j++)                                                                 \
            for (int i = 0; i < NR; i++) acc[j][i] = _mm256_setzero_ps(), min_sum[j][i] = 0.f;       \
        int64_t g = 0;                                                                               \
        for (; g + 8 <= nb; g += 8) name##_group(row, rb, g, a, r0, NW, NR, 8, acc, min_sum);        \
        if (g < nb) name##_group(row, rb, g, a, r0, NW, NR, (int)(nb - g), acc, min_sum);            \
        for (int j = 0; j < NW; j++)                                                                 \
            for (int i = 0; i < NR; i++) out[i * n + j] = lanes_sum(acc[j][i]) + min_sum[j][i];      \
    }                                                                                                \
    ALWAYS_INLINE void name##_rows(const uint8_t *row, int64_t rb, int64_t nb, const ActRows *a, float *y, int64_t n, \
                                   const int NW) {                                                   \
        int64_t r = 0;                                                                               \
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

/* name, values, block bytes, has a min, values unsigned (0 / 1), their offset */
B32_TILE(fused_q4_0, values_q4_0_unsigned, 18, 0, 1, 8)
B32_TILE(fused_q4_1, values_q4_1, 20, 1, 1, 0)
B32_TILE(fused_q5_0, values_q5_0_unsigned, 22, 0, 1, 16)
B32_TILE(fused_q5_1, values_q5_1, 24, 1, 1, 0)
B32_TILE(fused_q8_0, values_q8_0, 34, 0, 0, 0)
B32_TILE(fused_iq4_nl, values_iq4_nl, 18, 0, 0, 0)

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

/* Weight rows unpacked once per call for many activation rows, in groups of 8 blocks
 * (GROUP_BYTES each): the 8 blocks' values transposed as the activations' xt (GROUP_WORD),
 * the lanes' start (-128 times each block's sum with VNNI, else 0) and the 8 blocks' float d
 * (0 for the padding blocks after the last). A dot then loads 8 words of each operand per
 * group and accumulates each block's whole sum in its lane: no reduction, and one convert,
 * one multiply and one fused multiply-add per 8 blocks. */

#define UNPACK_GROUPS(VALUES, BYTES)                                                                 \
    for (int64_t o = 0; o < rows; o++)                                                               \
        for (int64_t g = 0; g < groups; g++) {                                                       \
            const uint8_t *blocks = w + o * nb * BYTES + g * 8 * BYTES;                              \
            uint8_t *u = out + (o * groups + g) * GROUP_BYTES;                                       \
            __m256i v[8], words[8], start = _mm256_setzero_si256();                                  \
            const int count = nb - g * 8 < 8 ? (int)(nb - g * 8) : 8;                                \
            for (int m = 0; m < 8; m++) v[m] = m < count ? VALUES(blocks + m * BYTES) : _mm256_setzero_si256(); \
            transpose_words(v, words);                                                               \
            for (int t = 0; t < 8; t++) {                                                            \
                _mm256_storeu_si256((__m256i *)(u + 32 * t), words[t]);                              \
                UNPACKED_START_ADD(start, words[t]);                                                 \
            }                                                                                        \
            _mm256_storeu_si256((__m256i *)(u + 256), start);                                        \
            _mm256_storeu_ps((float *)(u + 288), scales8(blocks, BYTES, count));                     \
        }

#ifdef B32_VNNI
#define UNPACKED_START_ADD(start, words)                                                             \
    start = _mm256_sub_epi32(start, _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8((char)0x80), words))
#else
#define UNPACKED_START_ADD(start, words) (void)(words)
#endif

/* `rows` weight rows of nb blocks of type Q4_0, Q5_0, Q8_0 or IQ4_NL unpacked into out (rows *
 * ceil(nb / 8) * GROUP_BYTES bytes); 0 for another type */
static int unpack_b32_groups(int64_t type, const uint8_t *w, int64_t nb, int64_t rows, uint8_t *out) {
    const int64_t groups = (nb + 7) / 8;
    switch (type) {
    case 2: UNPACK_GROUPS(values_q4_0, 18) return 1;
    case 6: UNPACK_GROUPS(values_q5_0, 22) return 1;
    case 8: UNPACK_GROUPS(values_q8_0, 34) return 1;
    case 20: UNPACK_GROUPS(values_iq4_nl, 18) return 1;
    default: return 0;
    }
}

/* out[i * n + j] = unpacked weight row j (ub bytes apart) . activation row r0 + i, NW x NR
 * (constants at each call): 2 x 6 keeps 12 integer and 12 float accumulators in registers */
enum { GROUPS_NW = 2, GROUPS_NR = 6 };
ALWAYS_INLINE void groups_tile(const uint8_t *u, int64_t ub, int64_t groups, const ActRows *a, int64_t r0, const int NW,
                               const int NR, float *out, int64_t n) {
    const int64_t kt = a->kt;
    __m256 acc[GROUPS_NW][GROUPS_NR];
    for (int j = 0; j < NW; j++)
        for (int i = 0; i < NR; i++) acc[j][i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256i sums[GROUPS_NW][GROUPS_NR];
        for (int j = 0; j < NW; j++) {
            const __m256i start = LOAD32(u + j * ub + g * GROUP_BYTES + 256);
            for (int i = 0; i < NR; i++) sums[j][i] = start;
        }
        for (int t = 0; t < 8; t++) {
            __m256i v[GROUPS_NW];
#ifndef B32_VNNI
            __m256i abs_v[GROUPS_NW]; /* vpsignb's operand form; vpdpbusd takes v as it is */
#endif
            for (int j = 0; j < NW; j++) {
                v[j] = LOAD32(u + j * ub + g * GROUP_BYTES + 32 * t);
#ifndef B32_VNNI
                abs_v[j] = _mm256_sign_epi8(v[j], v[j]);
#endif
            }
            for (int i = 0; i < NR; i++) {
                const __m256i x = B32_XT(a, (r0 + i) * kt + g * 256 + 32 * t);
                for (int j = 0; j < NW; j++) {
#ifdef B32_VNNI
                    sums[j][i] = _mm256_dpbusd_epi32(sums[j][i], x, v[j]);
#else
                    sums[j][i] = _mm256_add_epi32(sums[j][i], lanes(abs_v[j], _mm256_sign_epi8(x, v[j])));
#endif
                }
            }
        }
        for (int i = 0; i < NR; i++) {
            const __m256 dx = _mm256_loadu_ps(a->dt + (r0 + i) * (kt / QK) + g * 8);
            for (int j = 0; j < NW; j++) {
                const __m256 dw = _mm256_loadu_ps((const float *)(u + j * ub + g * GROUP_BYTES + 288));
                acc[j][i] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(sums[j][i]), acc[j][i]);
            }
        }
    }
    for (int j = 0; j < NW; j++)
        for (int i = 0; i < NR; i++) out[i * n + j] = lanes_sum(acc[j][i]);
}

ALWAYS_INLINE void groups_rows(const uint8_t *u, int64_t ub, int64_t groups, const ActRows *a, float *y, int64_t n,
                               const int NW) {
    int64_t r = 0;
    for (; r + GROUPS_NR <= a->rows; r += GROUPS_NR) groups_tile(u, ub, groups, a, r, NW, GROUPS_NR, y + r * n, n);
    switch (a->rows - r) {
    case 5: groups_tile(u, ub, groups, a, r, NW, 5, y + r * n, n); break;
    case 4: groups_tile(u, ub, groups, a, r, NW, 4, y + r * n, n); break;
    case 3: groups_tile(u, ub, groups, a, r, NW, 3, y + r * n, n); break;
    case 2: groups_tile(u, ub, groups, a, r, NW, 2, y + r * n, n); break;
    case 1: groups_tile(u, ub, groups, a, r, NW, 1, y + r * n, n); break;
    }
}

/* the unpacked rows [0, cols) of u against every row of a, into y[r * n + o]; each weight row
 * done prefetches its share of the next tile (prefetch_share) */
static void groups_product(const uint8_t *u, int64_t groups, const ActRows *a, float *y, int64_t n, int64_t cols,
                           const uint8_t *next, int64_t next_bytes) {
    const int64_t ub = groups * GROUP_BYTES;
    int64_t o = 0;
    for (; o + 2 <= cols; o += 2) {
        groups_rows(u + o * ub, ub, groups, a, y + o, n, 2);
        prefetch_share(next, next_bytes, o, cols), prefetch_share(next, next_bytes, o + 1, cols);
    }
    for (; o < cols; o++) groups_rows(u + o * ub, ub, groups, a, y + o, n, 1), prefetch_share(next, next_bytes, o, cols);
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define K256_MAX_NR 8 /* 8 accumulators and their floats of 32 ymm registers */
#else
#define K256_MAX_NR 4 /* of 16 */
#endif

/* out[i * n] = the unpacked super-block row w . activation row r0 + i for i < NR: each 32
 * values' |w| and scales loaded once for NR rows; the float order is dot_k256's */
ALWAYS_INLINE void k256_tile(const WRow *w, int64_t nb, const ActRows *a, int64_t r0, const int NR, float *out,
                             int64_t n, const int unsigned_values) {
    const int64_t k = a->k;
    __m256 acc[K256_MAX_NR];
    for (int i = 0; i < NR; i++) acc[i] = _mm256_setzero_ps();
    /* the min terms of the NR rows, lane i row r0 + i: dot_k256's scalar fmaf per row, in
     * lanes (the same bits), so that a super-block's integer sums of min * bsums for all rows
     * come out of one reduction (block_sums8) instead of one horizontal sum per row */
    __m256 min_sums = _mm256_setzero_ps();
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i row_at = _mm256_mullo_epi32(lane, _mm256_set1_epi32((int)(k / QK)));
    const __m256 in_tile = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(NR), lane));
    for (int64_t b = 0; b < nb; b++) {
        __m256i l[K256_MAX_NR];
        for (int i = 0; i < NR; i++) l[i] = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++) {
            const int64_t chunk = 8 * b + c;
            const __m256i v = LOAD32(w->q + chunk * QK), abs_v = _mm256_sign_epi8(v, v);
            const __m256i scales = _mm256_load_si256((const __m256i *)(w->pair_scales + 16 * chunk));
            for (int i = 0; i < NR; i++) {
                /* values of the types with a min are unsigned already: |v| = v, and x's sign
                 * need not move (the sign trick only zeroes x where v is 0: the same products) */
                const __m256i x = LOAD32(a->q + (r0 + i) * k + chunk * QK);
                const __m256i pairs = _mm256_maddubs_epi16(abs_v, unsigned_values ? x : _mm256_sign_epi8(x, v));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
                l[i] = _mm256_dpwssd_epi32(l[i], pairs, scales); /* vpmaddwd and the add in one */
#else
                l[i] = _mm256_add_epi32(l[i], _mm256_madd_epi16(pairs, scales));
#endif
            }
        }
        for (int i = 0; i < NR; i++) {
            const float xd = a->d[(r0 + i) * (k / QK) + b];
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(xd * w->d[b]), _mm256_cvtepi32_ps(l[i]), acc[i]);
        }
        if (unsigned_values) { /* the types with a min */
            const __m256i mn = LOAD32(w->mn + b * 16);
            __m256i p[8];
            for (int i = 0; i < 8; i++)
                p[i] = i < NR ? _mm256_madd_epi16(mn, LOAD32(a->bsums + (r0 + i) * (k / 16) + b * 16))
                              : _mm256_setzero_si256();
            const __m256i summ = block_sums8(_mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3])),
                                             _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7])));
            const __m256 xd = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), a->d + r0 * (k / QK) + b, row_at, in_tile, 4);
            min_sums = _mm256_fmadd_ps(_mm256_mul_ps(xd, _mm256_set1_ps(w->m[b])), _mm256_cvtepi32_ps(summ), min_sums);
        }
    }
    float min_sum[8];
    _mm256_storeu_ps(min_sum, min_sums);
    for (int i = 0; i < NR; i++) out[i * n] = lanes_sum(acc[i]) - min_sum[i];
}

/* the unpacked super-block row w against every row of a, into y[r * n] */
ALWAYS_INLINE void k256_rows_of(const WRow *w, int64_t nb, const ActRows *a, float *y, int64_t n, const int u) {
    int64_t r = 0;
    for (; r + K256_MAX_NR <= a->rows; r += K256_MAX_NR) k256_tile(w, nb, a, r, K256_MAX_NR, y + r * n, n, u);
    for (; r + 4 <= a->rows; r += 4) k256_tile(w, nb, a, r, 4, y + r * n, n, u);
    switch (a->rows - r) {
    case 3: k256_tile(w, nb, a, r, 3, y + r * n, n, u); break;
    case 2: k256_tile(w, nb, a, r, 2, y + r * n, n, u); break;
    case 1: k256_tile(w, nb, a, r, 1, y + r * n, n, u); break;
    }
}

static void k256_rows(const WRow *w, int64_t nb, const ActRows *a, float *y, int64_t n) {
    if (w->has_min) k256_rows_of(w, nb, a, y, n, 1); /* Q2_K, Q4_K, Q5_K: values from 0 up */
    else k256_rows_of(w, nb, a, y, n, 0);
}
#endif

/* --- rows of activations against rows of weights ----------------------------------------- */

#ifdef DOT_AVX2 /* (the panels' builds are AVX2 builds too) */
static int unpacks_b32(int64_t type) { return type == 2 || type == 6 || type == 8 || type == 20; }
#endif

enum { ROWS_PER_PASS = 64, COLS_PER_TILE = 64 }; /* see gguf_dot_rows */

/* How a tile of weight rows meets the activations: unpacked into groups of 8 blocks of 32,
 * from the file's blocks (fused, few activation rows), unpacked row by row (WRow) once for
 * every pass, or (one pass) each row unpacked into one WRow just before its dot: with a
 * single pass the whole tile unpacked would only leave L1 (measured on a Q6_K 640 x 2048,
 * one row: 0.135 ms against 0.107) */
enum { BY_GROUPS, BY_FUSED, BY_ROWS, BY_ROW_EACH };
enum { K512_ROWS = 8 }; /* from this many rows on the super-blocks take gguf_k512.c's tiles */

static int tile_mode(int64_t type, int64_t rows) {
#ifdef DOT_AVX2
    if (gguf_act_type(type) != ACT_Q8_K) return unpacks_b32(type) && rows >= UNPACK_ROWS ? BY_GROUPS : BY_FUSED;
    if ((type == 12 || type == 14) && rows <= FUSED_K_ROWS) return BY_FUSED; /* Q4_K, Q6_K (gguf_fused_k.c) */
#endif
    (void)type;
#ifdef GGUF_PANELS
    if (rows >= K512_ROWS) return BY_ROWS; /* gguf_k512.c: activation rows outer, in L1 */
#endif
    return rows > ROWS_PER_PASS ? BY_ROWS : BY_ROW_EACH;
}

/* the cols weight rows at wt unpacked once for every pass of activation rows over them */
static void unpack_tile(int mode, int64_t type, const uint8_t *wt, int64_t k, int64_t cols, uint8_t *scratch,
                        WRow *rows) {
    const int64_t nb = k / (gguf_act_type(type) == ACT_Q8_K ? QKK : QK), rb = nb * gguf_dot_block_bytes(type);
#ifdef DOT_AVX2
    if (mode == BY_GROUPS) unpack_b32_groups(type, wt, nb, cols, scratch);
#endif
    if (mode == BY_ROWS)
        for (int64_t c = 0; c < cols; c++) {
            wrow_init(&rows[c], k, scratch + c * wrow_bytes(k));
            unpack_row(type, wt + c * rb, k, &rows[c]);
        }
}

/* tile (a->rows, cols) = the rows of a times the tile's weight rows */
static void tile_product(int mode, int64_t type, const uint8_t *wt, int64_t cols, const ActRows *a, float *tile,
                         const uint8_t *scratch, const WRow *rows, const uint8_t *next, int64_t next_bytes) {
    const int64_t k = a->k, K = a->type == ACT_Q8_K, nb = k / (K ? QKK : QK);
#ifdef DOT_AVX2
    if (mode == BY_GROUPS) {
        groups_product(scratch, (nb + 7) / 8, a, tile, cols, cols, next, next_bytes);
        return;
    }
    if (mode == BY_FUSED) {
        if (K) fused_k256(type, wt, nb, a, tile, cols, 0, cols);
        else fused_b32(type, wt, nb, a, tile, cols, 0, cols);
        return;
    }
#endif
#ifdef GGUF_PANELS
    if (K && mode == BY_ROWS) {
        k256_tile_512(rows, cols, nb, a, tile, next, next_bytes);
        return;
    }
#endif
    WRow each;
    const int64_t rb = nb * gguf_dot_block_bytes(type); /* a weight row's bytes */
    if (mode == BY_ROW_EACH) wrow_init(&each, k, (void *)scratch);
    for (int64_t c = 0; c < cols; c++) {
        const WRow *row = &rows[c];
        if (mode == BY_ROW_EACH) unpack_row(type, wt + c * rb, k, &each), row = &each;
        else prefetch_share(next, next_bytes, c, cols);
#ifdef DOT_AVX2
        if (K) {
            k256_rows(row, nb, a, tile + c, cols);
            continue;
        }
#endif
        for (int64_t r = 0; r < a->rows; r++) {
            const int8_t *xq = a->q + r * k;
            tile[r * cols + c] = K ? dot_k256(row, xq, a->d + r * (k / QK), a->bsums + r * (k / 16), nb)
                                   : dot_b32(row, xq, a->dt + r * (a->kt / QK), a->s + r * (k / QK), nb);
        }
    }
}

/* The product in tiles of COLS_PER_TILE weight rows, each unpacked once, times passes of
 * ROWS_PER_PASS activation rows, each pass written into a small local buffer and copied out
 * row by row: a tile's unpacked weights (at most ~290 KB: 64 Q6_K rows of 2048) and a pass's
 * activation rows stay in L2, and the outputs are not written a float at a time at a stride
 * of the whole output row (a multiple of 4 KiB for every Gemma width, so each store of a
 * column would contend for one L1 set). */

void gguf_dot_rows(int64_t type, const void *w, int64_t n, const ActRows *a, float *y, int64_t lo, int64_t hi) {
    const int64_t k = a->k, bb = gguf_dot_block_bytes(type);
    if (bb < 0 || gguf_act_type(type) != a->type) return;
#ifdef GGUF_PANELS
    if (unpacks_b32(type) && panels_take_rows(a->rows, (hi - lo) * (k / QK) * bb)) {
        panel_dot_rows(type, w, n, a, y, lo, hi);
        return;
    }
    if (kpanels_take(type, a->rows) && kpanel_dot_rows(type, w, n, a, y, lo, hi)) return;
#endif
    const int64_t nb = k / (a->type == ACT_Q8_K ? QKK : QK), rb = nb * bb, mode = tile_mode(type, a->rows);
    /* the unpacked weights each mode keeps (the fused products read the file's blocks): no
     * allocation on the decode step's one-row calls */
    const int64_t bytes = mode == BY_GROUPS ? COLS_PER_TILE * ((nb + 7) / 8) * GROUP_BYTES
                          : mode == BY_ROWS ? COLS_PER_TILE * wrow_bytes(k)
                          : mode == BY_ROW_EACH ? wrow_bytes(k) : 0;
    uint8_t *scratch = bytes ? thread_scratch(SCRATCH_UNPACKED, bytes) : NULL;
    if (bytes && !scratch) return;
    WRow unpacked[COLS_PER_TILE];
    float tile[ROWS_PER_PASS * COLS_PER_TILE];
    for (int64_t o0 = lo; o0 < hi; o0 += COLS_PER_TILE) {
        const int64_t cols = hi - o0 < COLS_PER_TILE ? hi - o0 : COLS_PER_TILE;
        const uint8_t *wt = (const uint8_t *)w + o0 * rb;
        unpack_tile((int)mode, type, wt, k, cols, scratch, unpacked);
        /* the next tile's weights, fetched during this tile's first pass (tiles unpacked at once) */
        const int64_t next_cols = hi - o0 - cols < COLS_PER_TILE ? hi - o0 - cols : COLS_PER_TILE;
        const uint8_t *next = mode == BY_GROUPS || mode == BY_ROWS ? wt + cols * rb : NULL;
        for (int64_t r0 = 0; r0 < a->rows; r0 += ROWS_PER_PASS) {
            ActRows part = *a; /* rows [r0, r0 + pass) of a: each row's result is its own */
            part.rows = a->rows - r0 < ROWS_PER_PASS ? a->rows - r0 : ROWS_PER_PASS;
            part.q += r0 * k, part.xu += r0 * k, part.d += r0 * (k / QK), part.s += r0 * (k / QK);
            part.qsum += r0 * (k / QK);
            part.bsums += r0 * (k / 16), part.qt += r0 * a->kt, part.xut += r0 * a->kt, part.dt += r0 * (a->kt / QK);
            tile_product((int)mode, type, wt, cols, &part, tile, scratch, unpacked, r0 || next_cols <= 0 ? NULL : next,
                         next_cols * rb);
            for (int64_t r = 0; r < part.rows; r++)
                memcpy(y + (r0 + r) * n + o0, tile + r * cols, (size_t)cols * sizeof(float));
        }
    }
}

/* x (rows, k) rounded once into 8-bit blocks (rows split over the threads), then the output
 * columns handed out to the threads in chunks of whole tiles, each to the first thread free:
 * one parallel region, and a thread that loses its core for a while (a shared machine) leaves
 * its columns to the other instead of making it wait at the join. A column's values depend on
 * nothing but its own weight row, so the chunks change no result. */
enum { CHUNKS_PER_THREAD = 8 };

void gguf_matmul_q8_mt(int64_t type, const void *w, int64_t n, int64_t k, const float *x, int64_t rows, float *y,
                       int64_t threads) {
    const int64_t act = gguf_act_type(type), t = threads > 1 ? threads : 1;
    if (act < 0 || k % (act == ACT_Q8_K ? QKK : QK)) return;
    void *buffer = thread_scratch(SCRATCH_ACT, act_rows_bytes(rows, k));
    if (!buffer) return;
    ActRows a;
    act_rows_init(&a, act, rows, k, buffer);
    int64_t chunk = (n + t * CHUNKS_PER_THREAD - 1) / (t * CHUNKS_PER_THREAD);
    chunk = (chunk + COLS_PER_TILE - 1) / COLS_PER_TILE * COLS_PER_TILE;
    const int64_t chunks = (n + chunk - 1) / chunk;
#pragma omp parallel num_threads(t)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < t; i++) act_rows_quantize(&a, x, rows * i / t, rows * (i + 1) / t);
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < chunks; c++)
            gguf_dot_rows(type, w, n, &a, y, c * chunk, c * chunk + chunk < n ? c * chunk + chunk : n);
    }
}

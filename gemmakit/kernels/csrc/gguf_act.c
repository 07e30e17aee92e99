/* Activations rounded to llama.cpp's 8-bit blocks before an integer dot with GGUF weights:
 * Q8_0 and Q8_1 (32 values: an fp16 scale d, int8 values; Q8_1 also s, fp16 of d times the
 * values' sum) and Q8_K (256 values: a float scale d, int8 values, the sums of each 16).
 *
 * The roundings are those llama.cpp runs on an x86 CPU with AVX2 (ggml-cpu/arch/x86/quants.c):
 *  - quantize_row_q8_0 / _q8_1: amax = max |x|, d = amax / 127, id = 127 / amax (0 when amax
 *    is 0), q = round(x * id) with _mm256_round_ps(_MM_ROUND_NEAREST), ties to even (the _ref
 *    C versions use roundf, ties away: not what runs); d stored as fp16 (round to nearest
 *    even, F16C); Q8_1's s = fp16(d * sum q) with the float d, not its fp16 rounding.
 *  - quantize_row_q8_K is quantize_row_q8_K_ref (ggml-quants.c): max = the first value of
 *    largest magnitude, with its sign; iscale = -127 / max; q = min(127, nearest_int(iscale *
 *    x)) (nearest_int: ties to even); d = 1 / iscale, so d has the opposite sign of max; an
 *    all-zero block has d = 0 and zero values; bsums[j] = sum of q over values 16j..16j+15.
 * Every step is one float operation, so the AVX2 loops (llama.cpp's own instructions) and the
 * scalar ones give llama.cpp's bytes alike.
 */
#include <stdlib.h>

#include "gguf_dot.h"

/* x * y rounded once: no contraction into a following addition (there is none here, but the
 * compiler must not fuse the rounding step into anything either) */
#pragma GCC optimize("fp-contract=off")

enum { QK = 32, QKK = 256 };

void *thread_scratch(int slot, int64_t bytes) {
    static __thread void *buffers[SCRATCH_SLOTS];
    static __thread int64_t capacity[SCRATCH_SLOTS];
    if (bytes > capacity[slot]) {
        free(buffers[slot]);
        const int64_t grown = (bytes + 63) / 64 * 64;
        buffers[slot] = aligned_alloc(64, (size_t)grown);
        capacity[slot] = buffers[slot] ? grown : 0;
    }
    return buffers[slot];
}

int64_t gguf_act_type(int64_t weight_type) {
    switch (weight_type) {
    case 2: case 6: case 8: case 20: return ACT_Q8_0; /* Q4_0, Q5_0, Q8_0, IQ4_NL */
    case 3: case 7: return ACT_Q8_1;                 /* Q4_1, Q5_1 */
    case 10: case 11: case 12: case 13: case 14: case 23: return ACT_Q8_K; /* Q2_K..Q6_K, IQ4_XS */
    default: return -1;
    }
}

/* q, xu, then d and s per 32 values (Q8_K uses d per 256), then bsums per 16, 64-byte aligned */
static int64_t align64(int64_t n) { return (n + 63) & ~(int64_t)63; }

int64_t act_rows_bytes(int64_t rows, int64_t k) {
    const int64_t kt = group_padded(k);
    return 2 * align64(rows * k) + 3 * align64(rows * (k / QK) * (int64_t)sizeof(float)) +
           align64(rows * (k / 16) * (int64_t)sizeof(int16_t)) + 2 * align64(rows * kt) +
           align64(rows * (kt / QK) * (int64_t)sizeof(float));
}

void act_rows_init(ActRows *a, int64_t type, int64_t rows, int64_t k, void *buffer) {
    uint8_t *p = (uint8_t *)buffer;
    a->type = type, a->rows = rows, a->k = k;
    a->q = (int8_t *)p;
    p += align64(rows * k);
    a->xu = p;
    p += align64(rows * k);
    a->d = (float *)p;
    p += align64(rows * (k / QK) * (int64_t)sizeof(float));
    a->s = (float *)p;
    p += align64(rows * (k / QK) * (int64_t)sizeof(float));
    a->qsum = (int32_t *)p;
    p += align64(rows * (k / QK) * (int64_t)sizeof(int32_t));
    a->bsums = (int16_t *)p;
    p += align64(rows * (k / 16) * (int64_t)sizeof(int16_t));
    a->kt = group_padded(k);
    a->qt = (int8_t *)p;
    p += align64(rows * a->kt);
    a->xut = p;
    p += align64(rows * a->kt);
    a->dt = (float *)p;
    a->starts4 = (int32_t *)a->xu;
}

/* row r of a's blocks of 32 into the transposed groups (GROUP_WORD), zero blocks after the last */
static void transpose_row(const ActRows *a, int64_t r) {
    const int64_t nb = a->k / QK, kt = a->kt;
    int8_t *qt = a->qt + r * kt;
    uint8_t *xut = a->xut + r * kt;
    float *dt = a->dt + r * (kt / QK);
#if defined(__AVX2__)
    for (int64_t g = 0; g < kt / 256; g++) { /* 8 blocks' words as an 8 x 8 transpose, the same bytes */
        __m256i q[8], u[8], qw[8], uw[8];
        for (int m = 0; m < 8; m++) {
            const int64_t b = g * 8 + m, at = r * a->k + b * QK;
            q[m] = b < nb ? _mm256_loadu_si256((const __m256i *)(a->q + at)) : _mm256_setzero_si256();
            u[m] = b < nb ? _mm256_loadu_si256((const __m256i *)(a->xu + at)) : _mm256_set1_epi8((char)0x80);
        }
        transpose_words(q, qw), transpose_words(u, uw);
        for (int t = 0; t < 8; t++) {
            _mm256_storeu_si256((__m256i *)(qt + g * 256 + GROUP_WORD(t, 0) * 4), qw[t]);
            _mm256_storeu_si256((__m256i *)(xut + g * 256 + GROUP_WORD(t, 0) * 4), uw[t]);
        }
    }
    for (int64_t b = 0; b < kt / QK; b++) dt[b] = b < nb ? a->d[r * nb + b] : 0.f;
#else
    for (int64_t b = 0; b < kt / QK; b++) {
        const int64_t group = b / 8 * 256, m = b % 8;
        for (int t = 0; t < 8; t++) {
            const int64_t at = group + GROUP_WORD(t, m) * 4;
            if (b < nb) {
                memcpy(qt + at, a->q + r * a->k + b * QK + 4 * t, 4);
                memcpy(xut + at, a->xu + r * a->k + b * QK + 4 * t, 4);
            } else {
                memset(qt + at, 0, 4), memset(xut + at, 0x80, 4);
            }
        }
        dt[b] = b < nb ? a->d[r * nb + b] : 0.f;
    }
#endif
}

/* Whether gguf_dot_rows hands these rows to gguf_panel.c whatever the matrix (panels_take_rows
 * from 3 rows on), which reads only q, d and qsum: then xu and the transposed copies (qt, xut,
 * dt) are not written (the blocks of 32 without a min are exactly the weight types of Q8_0
 * activations) */
static int panels_take(const ActRows *a) {
#ifdef GGUF_PANELS
    return a->type == ACT_Q8_0 && a->rows > PANEL_MIN_ROWS;
#else
    (void)a;
    return 0;
#endif
}

#ifdef GGUF_PANELS
/* The starts gguf_kpanel.c's Q6_K word pairs read, for the k values at q (a multiple of 256):
 * per super-block and pair p = 8h + j (h < 4, j < 8), -32 times the sum of values 4j..4j+3 of
 * chunk 2h in the low int16 and of chunk 2h + 1 in the high one (|sum| <= 4 * 127: fits) */
static void word_starts(const int8_t *q, int64_t k, int32_t *starts) {
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int64_t c = 0; c < k / 32; c += 2) { /* chunks c and c + 1: their 8 words' sums (exact) */
        const __m256i lo = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, _mm256_loadu_si256((const __m256i *)(q + 32 * c))), ones16);
        const __m256i hi = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, _mm256_loadu_si256((const __m256i *)(q + 32 * c + 32))), ones16);
        const __m256i pairs = _mm256_blend_epi16(lo, _mm256_slli_epi32(hi, 16), 0xAA);
        _mm256_storeu_si256((__m256i *)(starts + 4 * c), _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(pairs, 5)));
    }
}
#endif

/* the first of the 256 values whose magnitude is amax (the last when none is: a NaN matches none) */
static int first_of_magnitude(const float *x, float amax) {
#if defined(__AVX2__)
    const __m256 sign = _mm256_set1_ps(-0.f), m = _mm256_set1_ps(amax);
    for (int j = 0; j < QKK; j += 8) {
        const __m256 magnitudes = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j));
        const int hits = _mm256_movemask_ps(_mm256_cmp_ps(magnitudes, m, _CMP_EQ_OQ));
        if (hits) return j + __builtin_ctz((unsigned)hits);
    }
    return QKK - 1;
#else
    int first = 0;
    while (first < QKK - 1 && fabsf(x[first]) != amax) first++;
    return first;
#endif
}

/* the largest |x| of n values (a multiple of 32): exact in any order */
static float max_abs(const float *x, int n) {
#if defined(__AVX2__)
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 m = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#else
    float amax = 0.f;
    for (int j = 0; j < n; j++) amax = fmaxf(amax, fabsf(x[j]));
    return amax;
#endif
}

/* q[j] = x[j] * scale rounded to the nearest integer, ties to even (_mm256_round_ps), and
 * saturated to int8 (vpackssdw / vpacksswb), for 32 values; returns their sum */
static int round32(const float *x, float scale, int8_t *q) {
#if defined(__AVX2__)
    const __m256 m = _mm256_set1_ps(scale);
    __m256i i[4];
    for (int t = 0; t < 4; t++)
        i[t] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * t), m),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1)));
#else
    int sum = 0;
    for (int j = 0; j < QK; j++) {
        const float v = nearbyintf(x[j] * scale); /* ties to even in the default rounding mode */
        q[j] = (int8_t)(v > 127.f ? 127 : v < -128.f ? -128 : (int)v);
        sum += q[j];
    }
    return sum;
#endif
}

/* one block of 32 as Q8_0 (s NULL) or Q8_1, and the sum of its values */
static void quantize_q8_32(const float *x, int8_t *q, float *d, float *s, int32_t *qsum) {
    const float amax = max_abs(x, QK);
    const float scale = amax / 127.f, inverse = amax != 0.f ? 127.f / amax : 0.f;
    const int sum = round32(x, inverse, q); /* no value exceeds 127 in magnitude: the sum is q's */
    *d = round_to_half(scale), *qsum = sum;
    if (s) *s = round_to_half(scale * (float)sum);
}

static void quantize_q8_k(const float *x, int8_t *q, float *d, int16_t *bsums) {
    const float amax = max_abs(x, QKK);
    if (amax == 0.f) {
        *d = 0.f;
        memset(q, 0, QKK);
        memset(bsums, 0, QKK / 16 * sizeof(int16_t));
        return;
    }
    const int first = first_of_magnitude(x, amax); /* the first value of that magnitude gives the sign */
    const float iscale = -127.f / x[first];
    for (int c = 0; c < QKK / QK; c++) round32(x + c * QK, iscale, q + c * QK); /* |q| <= 127: min(127, v) */
    for (int g = 0; g < QKK / 16; g++) {
        int sum = 0;
        for (int j = 0; j < 16; j++) sum += q[g * 16 + j];
        bsums[g] = (int16_t)sum;
    }
    *d = 1.f / iscale;
}

void act_rows_quantize(const ActRows *a, const float *x, int64_t lo, int64_t hi) {
    const int64_t k = a->k;
    for (int64_t r = lo; r < hi; r++) {
        const float *xr = x + r * k;
        int8_t *q = a->q + r * k;
        if (a->type == ACT_Q8_K)
            for (int64_t b = 0; b < k / QKK; b++)
                quantize_q8_k(xr + b * QKK, q + b * QKK, a->d + r * (k / QK) + b, a->bsums + r * (k / 16) + b * 16);
        else
            for (int64_t b = 0; b < k / QK; b++)
                quantize_q8_32(xr + b * QK, q + b * QK, a->d + r * (k / QK) + b,
                               a->type == ACT_Q8_1 ? a->s + r * (k / QK) + b : NULL, a->qsum + r * (k / QK) + b);
        if (panels_take(a)) continue; /* no product reads xu, qt, xut or dt then */
        if (a->type == ACT_Q8_K) {
#ifdef GGUF_PANELS
            if (a->rows >= KPANEL_MIN_ROWS) word_starts(q, k, a->starts4 + r * (k / 8));
#endif
            continue;
        }
        uint8_t *restrict xu = a->xu + r * k;
        const int8_t *restrict qr = q;
        for (int64_t i = 0; i < k; i++) xu[i] = (uint8_t)qr[i] ^ 0x80; /* q + 128 */
        transpose_row(a, r);
    }
}

int64_t gguf_quantize_activations(int64_t type, const float *x, int64_t rows, int64_t k, int8_t *q, float *d,
                                  float *s, int16_t *bsums) {
    const int64_t block = type == ACT_Q8_K ? QKK : QK;
    if ((type != ACT_Q8_0 && type != ACT_Q8_1 && type != ACT_Q8_K) || k % block) return -1;
    void *buffer = malloc((size_t)act_rows_bytes(rows, k));
    if (!buffer) return -1;
    ActRows a;
    act_rows_init(&a, type, rows, k, buffer);
    act_rows_quantize(&a, x, 0, rows);
    memcpy(q, a.q, (size_t)(rows * k));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < k / block; b++) {
            d[r * (k / block) + b] = a.d[r * (k / QK) + b];
            if (type == ACT_Q8_1) s[r * (k / QK) + b] = a.s[r * (k / QK) + b];
        }
    if (type == ACT_Q8_K) memcpy(bsums, a.bsums, (size_t)(rows * (k / 16)) * sizeof(int16_t));
    free(buffer);
    return 0;
}

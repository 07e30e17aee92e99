/* GGUF weight rows unpacked for the integer dots of gguf_dot.c: each block's values as int8
 * (signed, or unsigned where the type subtracts a min), its float scale (and min), and for
 * the super-block types an integer scale (and min) per 16 values. The layouts are llama.cpp's
 * (ggml-common.h block_q*; value orders as gguf_blocks.c restates them); the hot types of the
 * Q4_K_M mix (Q5_0, Q4_K, Q6_K; Q8_0 is read in place) also unpack with AVX2, to the same bytes.
 *
 * With AVX2 the super-block types also get, per 32 values, the 16-bit scales of vpmaddwd
 * (precomputed once per weight row rather than once per activation row). The blocks of 32 have
 * register versions of the same unpacking in gguf_dot.c (fused with their dots).
 */
#include "gguf_dot.h"

enum { QK = 32, QKK = 256 };


/* --- unpacking, type by type (layouts: gguf_blocks.c, ggml-common.h block_q*) ----------- */

static void unpack_q4_0(const uint8_t *b, int8_t *q, float *d, float *m) {
    *d = half_to_float(b), *m = 0.f;
    for (int j = 0; j < 16; j++) q[j] = (int8_t)((b[2 + j] & 0xF) - 8), q[j + 16] = (int8_t)((b[2 + j] >> 4) - 8);
}

static void unpack_q4_1(const uint8_t *b, int8_t *q, float *d, float *m) {
    *d = half_to_float(b), *m = half_to_float(b + 2);
    for (int j = 0; j < 16; j++) q[j] = (int8_t)(b[4 + j] & 0xF), q[j + 16] = (int8_t)(b[4 + j] >> 4);
}

PORTABLE_FORM static void unpack_q5_0(const uint8_t *b, int8_t *q, float *d, float *m) {
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
PORTABLE_FORM static void unpack_q45_k(const uint8_t *b, int five, int8_t *q, float *d, float *m, int16_t *sc, int16_t *mn) {
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
PORTABLE_FORM static void unpack_q6_k(const uint8_t *b, int8_t *q, float *d, int16_t *sc) {
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

/* --- AVX2 unpacking of the hot types: the same bytes as the scalar loops above --------------- */

#if defined(__AVX2__)
static void unpack_q5_0_avx2(const uint8_t *b, int8_t *q, float *d, float *m) {
    *d = half_to_float(b), *m = 0.f;
    const __m256i v = _mm256_or_si256(nibbles32(b + 6), high_bits32(b + 2));
    _mm256_storeu_si256((__m256i *)q, _mm256_sub_epi8(v, _mm256_set1_epi8(16)));
}

static void unpack_q45_k_avx2(const uint8_t *b, int five, int8_t *q, float *d, float *m, int16_t *sc, int16_t *mn) {
    const uint8_t *qs = five ? b + 48 : b + 16;
    const __m256i mask = _mm256_set1_epi8(0xF), one = _mm256_set1_epi8(1);
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16));
    *d = half_to_float(b), *m = half_to_float(b + 2);
    for (int j = 0; j < 8; j++) {
        k_scale_min(b + 4, j, sc + 2 * j, mn + 2 * j);
        sc[2 * j + 1] = sc[2 * j], mn[2 * j + 1] = mn[2 * j];
    }
    for (int p = 0; p < 4; p++) { /* sub-blocks 2p (low nibbles) and 2p + 1 (high) */
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * p));
        __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        if (five) {
            lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * p), one), 4));
            hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * p + 1), one), 4));
        }
        _mm256_storeu_si256((__m256i *)(q + 64 * p), lo);
        _mm256_storeu_si256((__m256i *)(q + 64 * p + 32), hi);
    }
}

static void unpack_q6_k_avx2(const uint8_t *b, int8_t *q, float *d, int16_t *sc) {
    const __m256i mask = _mm256_set1_epi8(0xF), three = _mm256_set1_epi8(3), offset = _mm256_set1_epi8(32);
    *d = half_to_float(b + 208);
    for (int g = 0; g < 16; g++) sc[g] = (int8_t)b[192 + g];
    for (int h = 0; h < 2; h++) { /* values h*128 + r: nibble r/64 of ql, bits 2*(r/32) of qh */
        const __m256i l0 = _mm256_loadu_si256((const __m256i *)(b + 64 * h));
        const __m256i l1 = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32));
        const __m256i hb = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
        const __m256i low[4] = {_mm256_and_si256(l0, mask), _mm256_and_si256(l1, mask),
                                _mm256_and_si256(_mm256_srli_epi16(l0, 4), mask),
                                _mm256_and_si256(_mm256_srli_epi16(l1, 4), mask)};
        for (int t = 0; t < 4; t++) {
            const __m256i high = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * t), three), 4);
            _mm256_storeu_si256((__m256i *)(q + 128 * h + 32 * t),
                                _mm256_sub_epi8(_mm256_or_si256(low[t], high), offset));
        }
    }
}
#endif

/* bytes per block of the types with a dot here, or -1: one block's row in gguf_blocks.c's table */
int gguf_dot_block_bytes(int64_t type) {
    const int64_t act = gguf_act_type(type);
    return act < 0 ? -1 : (int)gguf_row_bytes(type, act == ACT_Q8_K ? QKK : QK);
}

int64_t wrow_bytes(int64_t k) {
    /* pair scales (32 bytes per 32 values); values; d and m per 32; sc and mn per 16 */
    return 2 * k + 2 * (k / QK) * (int64_t)sizeof(float) + 2 * (k / 16) * (int64_t)sizeof(int16_t) + 32;
}

void wrow_init(WRow *w, int64_t k, void *buffer) {
    uint8_t *p = (uint8_t *)(((uintptr_t)buffer + 31) & ~(uintptr_t)31);
    w->pair_scales = (int16_t *)p, w->values = (int8_t *)(p + k);
    w->d = (float *)(p + 2 * k), w->m = w->d + k / QK;
    w->sc = (int16_t *)(w->m + k / QK), w->mn = w->sc + k / 16;
}

/* the 16-bit scales of vpmaddwd per 32 values: the two 16-groups' scales, 8 lanes each */
static void pair_scales(WRow *w, int64_t k) {
#if defined(__AVX2__)
    for (int64_t c = 0; c < k / QK; c++)
        _mm256_store_si256((__m256i *)(w->pair_scales + 16 * c),
                           _mm256_set_m128i(_mm_set1_epi16(w->sc[2 * c + 1]), _mm_set1_epi16(w->sc[2 * c])));
#else
    (void)w, (void)k;
#endif
}

void unpack_row(int64_t type, const uint8_t *row, int64_t k, WRow *w) {
    const int64_t bb = gguf_dot_block_bytes(type), values = gguf_act_type(type) == ACT_Q8_K ? QKK : QK;
    w->stride = QK, w->q = w->values, w->has_min = type == 3 || type == 7 || type == 10 || type == 12 || type == 13;
    if (type == 8) { /* Q8_0: the values in place, only the scales converted */
        w->q = (const int8_t *)(row + 2), w->stride = 34;
        for (int64_t b = 0; b < k / QK; b++) w->d[b] = half_to_float(row + b * 34), w->m[b] = 0.f;
    }
    for (int64_t b = 0; type != 8 && b < k / values; b++) {
        const uint8_t *p = row + b * bb;
        int8_t *q = w->values + b * values;
        float *d = w->d + b, *m = w->m + b;
        int16_t *sc = w->sc + b * 16, *mn = w->mn + b * 16;
        switch (type) {
        case 2: unpack_q4_0(p, q, d, m); break;
        case 3: unpack_q4_1(p, q, d, m); break;
#if defined(__AVX2__)
        case 6: unpack_q5_0_avx2(p, q, d, m); break;
        case 12: unpack_q45_k_avx2(p, 0, q, d, m, sc, mn); break;
        case 13: unpack_q45_k_avx2(p, 1, q, d, m, sc, mn); break;
        case 14: unpack_q6_k_avx2(p, q, d, sc); break;
#else
        case 6: unpack_q5_0(p, q, d, m); break;
        case 12: unpack_q45_k(p, 0, q, d, m, sc, mn); break;
        case 13: unpack_q45_k(p, 1, q, d, m, sc, mn); break;
        case 14: unpack_q6_k(p, q, d, sc); break;
#endif
        case 7: unpack_q5_1(p, q, d, m); break;
        case 20: unpack_iq4_nl(p, q, d, m); break;
        case 10: unpack_q2_k(p, q, d, m, sc, mn); break;
        case 11: unpack_q3_k(p, q, d, sc); break;
        case 23: unpack_iq4_xs(p, q, d, sc); break;
        }
    }
    if (values == QKK) pair_scales(w, k);
}

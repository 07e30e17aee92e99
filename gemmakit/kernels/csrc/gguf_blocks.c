/* GGUF block types executed as they are stored: dequantization of rows, the mat-vec of the
 * decode step and a multi-row product, over the raw block bytes of a (n, k) matrix as the
 * file holds them (ggml type ids: Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q2_K 10, Q3_K 11,
 * Q4_K 12, Q5_K 13, Q6_K 14, IQ4_NL 20, IQ4_XS 23).
 *
 * Block layouts and value formulas are llama.cpp's (ggml/src/ggml-common.h block_q*,
 * ggml-quants.c dequantize_row_q*), as the `gguf` package's numpy dequantizers
 * (gguf/quants.py) restate them; `gguf_dequantize_rows` gives those dequantizers' float32
 * bits (tests/test_gguf_blocks.py), which is why this unit is compiled without contraction
 * of a product into a following addition: numpy rounds d * q before it subtracts the min.
 *
 * What the model runs, gguf_matvec and gguf_matmul_rows (at the end of this file), is
 * llama.cpp's product: the activations rounded to 8-bit blocks (gguf_act.c: Q8_0, Q8_1 or
 * Q8_K as llama.cpp pairs them with the weight type, with its x86 roundings) and integer dots
 * with the blocks' values, scaled per block in float32 (gguf_dot.c, gguf_unpack.c). That is
 * the one rounding beyond float32 summation, at most half a step of each activation's block
 * (|x| max / 254), and a row's result depends on nothing but its own values.
 *
 * The float products here (gguf_matvec_f32, gguf_matmul_rows_f32: autograd's forward, and the
 * reference the tests compare with) dequantize one block (32 or 256 values) at a time into a
 * small buffer on the stack, which stays in L1, and multiply it with float32 activations: no
 * float copy of the matrix is ever made and the activations keep their float32 precision.
 * Q8_0 has a fused vector path that widens its int8 values in registers. Vector paths:
 * AVX-512, then AVX2 with FMA, then scalar loops, chosen at compile time.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "gguf_dot.h"

/* numpy's rounding: every product is rounded before it is added (see above) */
#pragma GCC optimize("fp-contract=off")

enum { QK = 32, QKK = 256 };

/* --- one block -> floats (gguf/quants.py dequantize_blocks, type by type) --------------- */

static void block_q4_0(const uint8_t *b, float *out) {
    const float d = half_to_float(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        out[j] = d * (float)((qs[j] & 0xF) - 8);
        out[j + 16] = d * (float)((qs[j] >> 4) - 8);
    }
}

static void block_q4_1(const uint8_t *b, float *out) {
    const float d = half_to_float(b), m = half_to_float(b + 2);
    const uint8_t *qs = b + 4;
    for (int j = 0; j < 16; j++) {
        out[j] = d * (float)(qs[j] & 0xF) + m;
        out[j + 16] = d * (float)(qs[j] >> 4) + m;
    }
}

/* the fifth bit of value j of a Q5 block: bit j of a little-endian uint32 */
static inline uint32_t q5_high_bits(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void block_q5_0(const uint8_t *b, float *out) {
    const float d = half_to_float(b);
    const uint32_t qh = q5_high_bits(b + 2);
    const uint8_t *qs = b + 6;
    for (int j = 0; j < 16; j++) {
        out[j] = d * (float)((int)((qs[j] & 0xF) | ((qh >> j) & 1) << 4) - 16);
        out[j + 16] = d * (float)((int)((qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4) - 16);
    }
}

static void block_q5_1(const uint8_t *b, float *out) {
    const float d = half_to_float(b), m = half_to_float(b + 2);
    const uint32_t qh = q5_high_bits(b + 4);
    const uint8_t *qs = b + 8;
    for (int j = 0; j < 16; j++) {
        out[j] = d * (float)((qs[j] & 0xF) | ((qh >> j) & 1) << 4) + m;
        out[j + 16] = d * (float)((qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4) + m;
    }
}

static void block_q8_0(const uint8_t *b, float *out) {
    const float d = half_to_float(b);
    const int8_t *qs = (const int8_t *)(b + 2);
    for (int j = 0; j < QK; j++) out[j] = (float)qs[j] * d;
}

/* Q2_K: scales[16] (low nibble scale, high nibble min), qs[64] (2 bits), d, dmin. Value
 * e = h*128 + s*32 + l holds bits 2s of qs[h*32 + l]; group e/16 has its scale and min. */
static void block_q2_k(const uint8_t *b, float *out) {
    const uint8_t *scales = b, *qs = b + 16;
    const float d = half_to_float(b + 80), dmin = half_to_float(b + 82);
    for (int h = 0; h < 2; h++)
        for (int s = 0; s < 4; s++)
            for (int half = 0; half < 2; half++) {
                const int g = h * 8 + s * 2 + half; /* (h*128 + s*32 + half*16) / 16 */
                const float dl = d * (float)(scales[g] & 0xF), ml = dmin * (float)(scales[g] >> 4);
                const uint8_t *q = qs + h * 32 + half * 16;
                float *o = out + g * 16;
                for (int l = 0; l < 16; l++) o[l] = dl * (float)((q[l] >> (2 * s)) & 3) - ml;
            }
}

/* Q3_K: hmask[32], qs[64], scales[12] (16 six-bit signed scales), d. Value e: low bits as
 * Q2_K's, high bit b = e/32 of hmask[e%32]; a clear high bit subtracts 4. */
static void block_q3_k(const uint8_t *b, float *out) {
    const uint8_t *hmask = b, *qs = b + 32, *sc = b + 96;
    const float d = half_to_float(b + 108);
    for (int h = 0; h < 2; h++)
        for (int s = 0; s < 4; s++)
            for (int half = 0; half < 2; half++) {
                const int g = h * 8 + s * 2 + half, bit = h * 4 + s; /* bit: (g * 16) / 32 */
                const int low = g < 8 ? sc[g] & 0xF : sc[g - 8] >> 4;
                const int high = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
                const float dl = d * (float)((int8_t)(low | high << 4) - 32);
                const uint8_t *q = qs + h * 32 + half * 16, *m = hmask + half * 16;
                float *o = out + g * 16;
                for (int l = 0; l < 16; l++)
                    o[l] = dl * (float)((int)((q[l] >> (2 * s)) & 3) - (((m[l] >> bit) & 1) ? 0 : 4));
            }
}

/* the 6-bit scale and min of sub-block j of Q4_K / Q5_K (gguf/quants.py Q4_K.get_scale_min) */
static inline void k_scale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63, *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 2) & 0x30);
        *m = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
    }
}

/* Q4_K: d, dmin, scales[12], qs[128]. Sub-block j (32 values) holds nibble j%2 of
 * qs[(j/2)*32 + l]; value = d*sc * q - dmin*m. Q5_K adds qh[32]: bit j of qh[l]. */
static void block_q4_k(const uint8_t *b, float *out) {
    const float d = half_to_float(b), dmin = half_to_float(b + 2);
    const uint8_t *scales = b + 4, *qs = b + 16;
    for (int j = 0; j < 8; j++) {
        int sc, m;
        k_scale_min(scales, j, &sc, &m);
        const float dl = d * (float)sc, ml = dmin * (float)m;
        const uint8_t *q = qs + (j / 2) * 32;
        const int shift = 4 * (j % 2);
        for (int l = 0; l < 32; l++) out[j * 32 + l] = dl * (float)((q[l] >> shift) & 0xF) - ml;
    }
}

static void block_q5_k(const uint8_t *b, float *out) {
    const float d = half_to_float(b), dmin = half_to_float(b + 2);
    const uint8_t *scales = b + 4, *qh = b + 16, *qs = b + 48;
    for (int j = 0; j < 8; j++) {
        int sc, m;
        k_scale_min(scales, j, &sc, &m);
        const float dl = d * (float)sc, ml = dmin * (float)m;
        const uint8_t *q = qs + (j / 2) * 32;
        const int shift = 4 * (j % 2);
        for (int l = 0; l < 32; l++)
            out[j * 32 + l] = dl * (float)(((q[l] >> shift) & 0xF) | ((qh[l] >> j) & 1) << 4) - ml;
    }
}

/* Q6_K: ql[128], qh[64], scales[16] (int8), d. Value e = h*128 + r (r < 128): low nibble
 * r/64 of ql[h*64 + r%64], high 2 bits 2*(r/32) of qh[h*32 + r%32]; minus 32. */
static void block_q6_k(const uint8_t *b, float *out) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *scales = (const int8_t *)(b + 192);
    const float d = half_to_float(b + 208);
    for (int h = 0; h < 2; h++)
        for (int t = 0; t < 4; t++)
            for (int half = 0; half < 2; half++) {
                const int g = h * 8 + t * 2 + half; /* (h*128 + t*32 + half*16) / 16 */
                const float dl = d * (float)scales[g];
                const uint8_t *lo = ql + h * 64 + (t % 2) * 32 + half * 16, *hi = qh + h * 32 + half * 16;
                float *o = out + g * 16;
                for (int l = 0; l < 16; l++)
                    o[l] = dl * (float)((((lo[l] >> (4 * (t / 2))) & 0xF) | ((hi[l] >> (2 * t)) & 3) << 4) - 32);
            }
}

/* IQ4_NL: d, qs[16]; value j is the table entry of nibble j%16 (low for j < 16) of qs[j%16] */
static void block_iq4_nl(const uint8_t *b, float *out) {
    const float d = half_to_float(b);
    for (int j = 0; j < 16; j++) {
        out[j] = d * (float)IQ4NL_VALUES[b[2 + j] & 0xF];
        out[j + 16] = d * (float)IQ4NL_VALUES[b[2 + j] >> 4];
    }
}

/* IQ4_XS: d, scales_h, scales_l[4], qs[128]: sub-block ib (32 values) has scale d * (ls - 32),
 * ls six bits (low nibble ib%2 of scales_l[ib/2], high bits 2ib of scales_h), and its values
 * as IQ4_NL's (gguf/quants.py IQ4_XS: dl = d * scale, then dl * value) */
static void block_iq4_xs(const uint8_t *b, float *out) {
    const float d = half_to_float(b);
    const unsigned scales_h = (unsigned)(b[2] | b[3] << 8);
    for (int ib = 0; ib < 8; ib++) {
        const int ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 0xF) | (((scales_h >> (2 * ib)) & 3) << 4);
        const float dl = d * (float)(ls - 32);
        const uint8_t *qs = b + 8 + 16 * ib;
        for (int j = 0; j < 16; j++) {
            out[32 * ib + j] = dl * (float)IQ4NL_VALUES[qs[j] & 0xF];
            out[32 * ib + j + 16] = dl * (float)IQ4NL_VALUES[qs[j] >> 4];
        }
    }
}

typedef void (*BlockFn)(const uint8_t *, float *);

typedef struct {
    BlockFn fn;
    int values, bytes; /* per block */
} BlockType;

/* the block type of a ggml type id, or NULL when this unit does not run it */
static const BlockType *block_type(int64_t type) {
    static const BlockType q4_0 = {block_q4_0, QK, 18}, q4_1 = {block_q4_1, QK, 20};
    static const BlockType q5_0 = {block_q5_0, QK, 22}, q5_1 = {block_q5_1, QK, 24};
    static const BlockType q8_0 = {block_q8_0, QK, 34}, q2_k = {block_q2_k, QKK, 84};
    static const BlockType q3_k = {block_q3_k, QKK, 110}, q4_k = {block_q4_k, QKK, 144};
    static const BlockType q5_k = {block_q5_k, QKK, 176}, q6_k = {block_q6_k, QKK, 210};
    static const BlockType iq4_nl = {block_iq4_nl, QK, 18}, iq4_xs = {block_iq4_xs, QKK, 136};
    switch (type) {
    case 2: return &q4_0;
    case 3: return &q4_1;
    case 6: return &q5_0;
    case 7: return &q5_1;
    case 8: return &q8_0;
    case 10: return &q2_k;
    case 11: return &q3_k;
    case 12: return &q4_k;
    case 13: return &q5_k;
    case 14: return &q6_k;
    case 20: return &iq4_nl;
    case 23: return &iq4_xs;
    default: return NULL;
    }
}

int64_t gguf_row_bytes(int64_t type, int64_t k) {
    const BlockType *t = block_type(type);
    if (!t || k % t->values) return -1;
    return k / t->values * t->bytes;
}

/* the k floats of one row */
static void dequantize_row(const BlockType *t, const uint8_t *row, int64_t k, float *out) {
    for (int64_t b = 0; b < k / t->values; b++) t->fn(row + b * t->bytes, out + b * t->values);
}

void gguf_dequantize_rows(int64_t type, const void *w, int64_t k, float *out, int64_t lo, int64_t hi) {
    const BlockType *t = block_type(type);
    const int64_t rb = gguf_row_bytes(type, k);
    if (!t || rb < 0) return;
    for (int64_t n = lo; n < hi; n++) dequantize_row(t, (const uint8_t *)w + n * rb, k, out + (n - lo) * k);
}

void gguf_gather_rows(int64_t type, const void *w, int64_t k, const int64_t *ids, float *out, int64_t lo,
                      int64_t hi) {
    const BlockType *t = block_type(type);
    const int64_t rb = gguf_row_bytes(type, k);
    if (!t || rb < 0) return;
    for (int64_t i = lo; i < hi; i++) dequantize_row(t, (const uint8_t *)w + ids[i] * rb, k, out + i * k);
}

/* --- dots ------------------------------------------------------------------------------ */

/* sum of a[i] * b[i] over n floats (n a multiple of 16) */
static float dot_floats(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float acc = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), a1);
    }
    for (; i + 16 <= n; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), a0);
    acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
    }
    __m256 s = _mm256_add_ps(a0, a1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    acc = _mm_cvtss_f32(h);
#endif
    for (; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* row . x for any block type from block b on, added to acc block by block: a block at a time
 * through an L1 buffer (the vector paths below hand their scalar tails to it) */
static float dot_blocks_from(const BlockType *t, const uint8_t *row, const float *x, int64_t k, int64_t b, float acc) {
    float buf[QKK];
    for (; b < k / t->values; b++) {
        t->fn(row + b * t->bytes, buf);
        acc += dot_floats(buf, x + b * t->values, t->values);
    }
    return acc;
}

/* Q8_0 row . x: int8 values widened in registers, each block's sum scaled by its d */
static float dot_q8_0(const uint8_t *row, const float *x, int64_t k) {
    int64_t b = 0;
    float acc = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; b + 2 <= k / QK; b += 2) {
        const uint8_t *p = row + b * 34;
        const float *xb = x + b * QK;
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 2))));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 18))));
        __m512 s = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(xb)));
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(half_to_float(p)), s, a0);
        lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 36))));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 52))));
        s = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 48), _mm512_mul_ps(lo, _mm512_loadu_ps(xb + 32)));
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(half_to_float(p + 34)), s, a1);
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
    return dot_blocks_from(block_type(8), row, x, k, b, acc);
}

/* Q5_0 row . x: the 5-bit values assembled in registers (low nibbles, then bit j of qh
 * shifted into place lane by lane), each block's sum scaled by its d */
static float dot_q5_0(const uint8_t *row, const float *x, int64_t k) {
    int64_t b = 0;
    float acc = 0.f;
#if defined(__AVX512F__)
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(16));
    const __m512i nibble = _mm512_set1_epi32(0xF), one = _mm512_set1_epi32(1), offset = _mm512_set1_epi32(16);
    __m512 a0 = _mm512_setzero_ps();
    for (; b < k / QK; b++) {
        const uint8_t *p = row + b * 22;
        const float *xb = x + b * QK;
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 6)));
        const __m512i qh = _mm512_set1_epi32((int)q5_high_bits(p + 2));
        __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_srli_epi32(v, 4);
        lo = _mm512_or_si512(lo, _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(qh, first), one), 4));
        hi = _mm512_or_si512(hi, _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(qh, second), one), 4));
        const __m512 flo = _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, offset));
        const __m512 fhi = _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, offset));
        const __m512 s = _mm512_fmadd_ps(fhi, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(flo, _mm512_loadu_ps(xb)));
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(half_to_float(p)), s, a0);
    }
    acc = _mm512_reduce_add_ps(a0);
#endif
    return dot_blocks_from(block_type(6), row, x, k, b, acc);
}


void gguf_matvec_f32(int64_t type, const void *w, int64_t k, const float *x, float *y, int64_t lo, int64_t hi) {
    const BlockType *t = block_type(type);
    const int64_t rb = gguf_row_bytes(type, k);
    if (!t || rb < 0) return;
    const uint8_t *base = (const uint8_t *)w;
    if (type == 8)
        for (int64_t n = lo; n < hi; n++) y[n] = dot_q8_0(base + n * rb, x, k);
    else if (type == 6)
        for (int64_t n = lo; n < hi; n++) y[n] = dot_q5_0(base + n * rb, x, k);
    else
        for (int64_t n = lo; n < hi; n++) y[n] = dot_blocks_from(t, base + n * rb, x, k, 0, 0.f);
}

/* y (rows, n) = x (rows, k) times the (n, k) matrix transposed, output columns [lo, hi):
 * each weight row is dequantized once into `buf` (k floats) and dotted with every x row */
static void matmul_rows_buffered(const BlockType *t, const uint8_t *w, int64_t rb, int64_t k, const float *x,
                                 int64_t rows, float *y, int64_t n_out, int64_t lo, int64_t hi, float *buf) {
    for (int64_t n = lo; n < hi; n++) {
        dequantize_row(t, w + n * rb, k, buf);
        for (int64_t r = 0; r < rows; r++) y[r * n_out + n] = dot_floats(buf, x + r * k, k);
    }
}

enum { STACK_ROW = 4096 }; /* k up to this many floats is dequantized into a stack buffer */

void gguf_matmul_rows_f32(int64_t type, const void *w, int64_t n, int64_t k, const float *x, int64_t rows, float *y,
                          int64_t lo, int64_t hi) {
    const BlockType *t = block_type(type);
    const int64_t rb = gguf_row_bytes(type, k);
    if (!t || rb < 0) return;
    if (k <= STACK_ROW) {
        float buf[STACK_ROW];
        matmul_rows_buffered(t, (const uint8_t *)w, rb, k, x, rows, y, n, lo, hi, buf);
        return;
    }
    /* wide rows: block by block, each block against every x row */
    for (int64_t o = lo; o < hi; o++) {
        for (int64_t r = 0; r < rows; r++) y[r * n + o] = 0.f;
        float blk[QKK];
        const uint8_t *row = (const uint8_t *)w + o * rb;
        for (int64_t b = 0; b < k / t->values; b++) {
            t->fn(row + b * t->bytes, blk);
            for (int64_t r = 0; r < rows; r++) y[r * n + o] += dot_floats(blk, x + r * k + b * t->values, t->values);
        }
    }
}

/* --- the products the model runs: activations rounded to 8-bit blocks (gguf_act.c) and
 * integer dots (gguf_dot.c), llama.cpp's products ------------------------------------------ */

void gguf_matmul_rows(int64_t type, const void *w, int64_t n, int64_t k, const float *x, int64_t rows, float *y,
                      int64_t lo, int64_t hi) {
    const int64_t act = gguf_act_type(type);
    if (act < 0 || gguf_row_bytes(type, k) < 0) return;
    void *buffer = thread_scratch(SCRATCH_ACT, act_rows_bytes(rows, k)); /* this thread's, reused */
    if (!buffer) return;
    ActRows a;
    act_rows_init(&a, act, rows, k, buffer);
    act_rows_quantize(&a, x, 0, rows);
    gguf_dot_rows(type, w, n, &a, y, lo, hi);
}

void gguf_matvec(int64_t type, const void *w, int64_t k, const float *x, float *y, int64_t lo, int64_t hi) {
    gguf_matmul_rows(type, w, hi, k, x, 1, y, lo, hi); /* one row: n only strides rows of y */
}

/* the float32 product over [0, n) split over threads (split.c's pattern) */
void gguf_matmul_f32_mt(int64_t type, const void *w, int64_t n, int64_t k, const float *x, int64_t rows, float *y,
                        int64_t threads) {
    const int64_t t = threads > 1 ? threads : 1;
#pragma omp parallel for schedule(static, 1) num_threads(t)
    for (int64_t i = 0; i < t; i++) {
        const int64_t lo = n * i / t, hi = n * (i + 1) / t;
        if (rows == 1) gguf_matvec_f32(type, w, k, x, y, lo, hi);
        else gguf_matmul_rows_f32(type, w, n, k, x, rows, y, lo, hi);
    }
}

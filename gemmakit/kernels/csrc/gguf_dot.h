/* GGUF products with 8-bit activations (internal to gguf_blocks.c, gguf_act.c, gguf_dot.c):
 * fp16 conversions, activation rows rounded to llama.cpp's 8-bit blocks (gguf_act.c), and
 * the integer dots of a block matrix with them (gguf_dot.c).
 */
#ifndef GEMMAKIT_GGUF_DOT_H
#define GEMMAKIT_GGUF_DOT_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "common.h"
#include "gemmakit_kernels.h"

/* ggml type ids of the activation blocks (ggml.h): Q8_0, Q8_1, Q8_K */
enum { ACT_Q8_0 = 8, ACT_Q8_1 = 9, ACT_Q8_K = 15 };

/* IEEE half -> float, exact (subnormals included): the blocks' fp16 scales */
static inline float half_bits_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0x1F) bits = sign | 0x7F800000u | (mant << 13);
    else if (exp) bits = sign | ((exp + 112) << 23) | (mant << 13);
    else if (!mant) bits = sign;
    else { /* subnormal half: normalize */
        int e = -1;
        do mant <<= 1, e++; while (!(mant & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

static inline float half_to_float(const uint8_t *p) { return half_bits_to_float((uint16_t)(p[0] | (p[1] << 8))); }

/* float -> IEEE half rounded to nearest even, as F16C's vcvtps2ph with immediate 0 (llama.cpp's
 * GGML_CPU_FP32_TO_FP16 on x86: ggml-cpu/simd-mappings.h) */
static inline uint16_t float_to_half_bits(float f) {
#ifdef __F16C__
    return (uint16_t)_cvtss_sh(f, 0);
#else
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) return (uint16_t)(sign | 0x7E00); /* NaN */
    if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00); /* from 65520 on: infinity */
    if (ax < 0x38800000u) { /* below 2^-14: a subnormal half, round(|f| * 2^24), exact scaling */
        float a;
        memcpy(&a, &ax, sizeof a);
        return (uint16_t)(sign | (uint32_t)nearbyintf(a * 16777216.f));
    }
    /* normal: round the 23-bit mantissa to 10 at bit 13, ties to even, then rebias 127 -> 15 */
    const uint32_t rounded = ax + 0xFFFu + ((ax >> 13) & 1u) - 0x38000000u;
    return (uint16_t)(sign | (rounded >> 13));
#endif
}

static inline float round_to_half(float f) { return half_bits_to_float(float_to_half_bits(f)); }

static inline uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* IQ4_NL's and IQ4_XS's 16 values (ggml-common.h kvalues_iq4nl) */
static const int8_t IQ4NL_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

#if defined(__AVX512BW__) && defined(__AVX512VL__)
/* 16 bytes -> their low nibbles (values 0..15) then their high nibbles (16..31): the 16 bytes
 * in both halves, the upper half shifted by 4 (the AVX2 version below gives the same bytes) */
static inline __m256i nibbles32(const uint8_t *p) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    const __m256i shift = _mm256_setr_epi16(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
    return _mm256_and_si256(_mm256_srlv_epi16(v, shift), _mm256_set1_epi8(0xF));
}

/* bit j of the little-endian 32 bits at p -> 0x10 in byte j, else 0: the bits as a byte mask */
static inline __m256i high_bits32(const uint8_t *p) {
    return _mm256_maskz_mov_epi8((__mmask32)le32(p), _mm256_set1_epi8(0x10));
}
#elif defined(__AVX2__)
/* 16 bytes -> their low nibbles (values 0..15) then their high nibbles (16..31) */
static inline __m256i nibbles32(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), mask = _mm_set1_epi8(0xF);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
}

/* bit j of the little-endian 32 bits at p -> 0x10 in byte j, else 0 */
static inline __m256i high_bits32(const uint8_t *p) {
    const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)le32(p)),
                                              _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2,
                                                               2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit), _mm256_set1_epi8(0x10));
}
#endif

#if defined(__AVX2__)
/* the 32 values of a block of 32 at p (the file's bytes) as int8 (gguf_dot.c, gguf_panel.c) */
static inline __m256i values_q4_0(const uint8_t *p) { return _mm256_sub_epi8(nibbles32(p + 2), _mm256_set1_epi8(8)); }
static inline __m256i values_q4_1(const uint8_t *p) { return nibbles32(p + 4); }
static inline __m256i values_q5_0(const uint8_t *p) {
    return _mm256_sub_epi8(_mm256_or_si256(nibbles32(p + 6), high_bits32(p + 2)), _mm256_set1_epi8(16));
}
static inline __m256i values_q5_1(const uint8_t *p) { return _mm256_or_si256(nibbles32(p + 8), high_bits32(p + 4)); }
static inline __m256i values_q8_0(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)(p + 2)); }
/* Q4_0's and Q5_0's values before their offset (8, 16) is subtracted: 0..15, 0..31 */
static inline __m256i values_q4_0_unsigned(const uint8_t *p) { return nibbles32(p + 2); }
static inline __m256i values_q5_0_unsigned(const uint8_t *p) { return _mm256_or_si256(nibbles32(p + 6), high_bits32(p + 2)); }
static inline __m256i values_iq4_nl(const uint8_t *p) {
    const __m128i table = _mm_loadu_si128((const __m128i *)IQ4NL_VALUES);
    return _mm256_shuffle_epi8(_mm256_set_m128i(table, table), nibbles32(p + 2));
}
#endif

#if defined(__AVX2__)
/* scale j (low 32 bits: j < 4) and min j of a Q4_K super-block's 12 scale bytes as bytes:
 * j < 4: s[j] & 63 and s[j + 4] & 63; j >= 4: s[j + 4] & 15 | (s[j - 4] >> 6) << 4 and
 * s[j + 4] >> 4 | (s[j] >> 6) << 4 (ggml-quants.c get_scale_min_k4, four at a time) */
static inline void q4_k_scales_mins(const uint8_t *s, uint64_t *scales, uint64_t *mins) {
    const uint32_t w0 = le32(s), w1 = le32(s + 4), w2 = le32(s + 8), low6 = 0x3F3F3F3Fu, low4 = 0x0F0F0F0Fu;
    const uint32_t top2 = 0x03030303u;
    *scales = (uint64_t)(w0 & low6) | (uint64_t)((w2 & low4) | ((w0 >> 6) & top2) << 4) << 32;
    *mins = (uint64_t)(w1 & low6) | (uint64_t)(((w2 >> 4) & low4) | ((w1 >> 6) & top2) << 4) << 32;
}

/* chunk c's values of a Q4_K super-block (0..15): nibble c % 2 of its bytes 32 * (c / 2).. */
ALWAYS_INLINE __m256i q4_k_chunk(const uint8_t *block, const int c) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)(block + 16 + 32 * (c / 2)));
    return _mm256_and_si256(c % 2 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0xF));
}

/* chunk c = 4h + t's values of a Q6_K super-block plus 32 (0..63): nibble t / 2 of ql[64h +
 * 32(t % 2)..] and bits 2t of qh[32h..] (gguf_unpack.c unpack_q6_k) */
ALWAYS_INLINE __m256i q6_k_chunk_unsigned(const uint8_t *block, const int c) {
    const int h = c / 4, t = c % 4;
    const __m256i ql = _mm256_loadu_si256((const __m256i *)(block + 64 * h + 32 * (t % 2)));
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(block + 128 + 32 * h));
    const __m256i low = _mm256_and_si256(t / 2 ? _mm256_srli_epi16(ql, 4) : ql, _mm256_set1_epi8(0xF));
    const __m256i high = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * t), _mm256_set1_epi8(3)), 4);
    return _mm256_or_si256(low, high);
}

/* the same values as they are (-32..31) */
ALWAYS_INLINE __m256i q6_k_chunk(const uint8_t *block, const int c) {
    return _mm256_sub_epi8(q6_k_chunk_unsigned(block, c), _mm256_set1_epi8(32));
}

/* dwords: out[t] lane m = word t of v[m] (an 8 x 8 transpose of 32-bit words) */
static inline void transpose_words(const __m256i v[8], __m256i out[8]) {
    __m256i t[8], u[8];
    for (int p = 0; p < 4; p++) {
        t[2 * p] = _mm256_unpacklo_epi32(v[2 * p], v[2 * p + 1]);
        t[2 * p + 1] = _mm256_unpackhi_epi32(v[2 * p], v[2 * p + 1]);
    }
    for (int h = 0; h < 2; h++) { /* blocks 0..3 (h 0) and 4..7 (h 1) */
        u[4 * h + 0] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
        u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
    }
    for (int q = 0; q < 4; q++) {
        out[q] = _mm256_permute2x128_si256(u[q], u[4 + q], 0x20);
        out[q + 4] = _mm256_permute2x128_si256(u[q], u[4 + q], 0x31);
    }
}

/* lane i = the sum of p[i]'s 8 lanes, for i < 8 (exact integers) */
static inline __m256i row_sums8(const __m256i p[8]) {
    const __m256i q0 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    const __m256i q1 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(q0, q1, 0x20), _mm256_permute2x128_si256(q0, q1, 0x31));
}

/* lane i = the sum of l[i]'s 8 lanes for i < NR (a constant at each call), 0 after: one exact
 * integer per row, the super-blocks' sumi (gguf_dot.c) */
ALWAYS_INLINE __m256i row_sums(const __m256i *l, const int NR) {
    if (NR == 1) {
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(l[0]), _mm256_extracti128_si256(l[0], 1));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
        return _mm256_zextsi128_si256(_mm_cvtsi32_si128(_mm_cvtsi128_si32(s)));
    }
    __m256i p[8];
    for (int i = 0; i < 8; i++) p[i] = i < NR ? l[i] : _mm256_setzero_si256();
    return row_sums8(p);
}

/* the float sum of 8 lanes in gguf_dot.c's order: (l0 + l4) + (l2 + l6) + ((l1 + l5) + (l3 + l7)) */
static inline float lanes_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* Rows of activations rounded to 8-bit blocks, row r's values at q + r * k (and the same values
 * plus 128 at xu: the unsigned operand of AVX-512 VNNI's vpdpbusd). Per block of 32 (Q8_0, Q8_1): d the fp16
 * scale as float and qsum the sum of its q; Q8_1 also s = fp16(d * sum of q). Per block of 256
 * (Q8_K): d the float scale and bsums the sums of q over each 16 values. */
typedef struct {
    int64_t type, rows, k;
    int8_t *q;
    uint8_t *xu;
    float *d, *s;
    int32_t *qsum;
    int16_t *bsums;
    /* blocks of 32 only: the same values in groups of 8 blocks with the 4-byte words
     * transposed (GROUP_WORD), the last group padded with zero blocks (xu 128), kt values per
     * row; dt the blocks' d, padded with 0, kt / 32 per row */
    int64_t kt;
    int8_t *qt;
    uint8_t *xut;
    float *dt;
    /* Q8_K rows from KPANEL_MIN_ROWS on: -32 times the sums of 4 values, two as an int16 pair
     * (what gguf_kpanel.c's Q6_K word pairs add: gguf_act.c word_starts), k / 8 per row, in
     * xu's place (Q8_K products read no xu) */
    int32_t *starts4;
} ActRows;

/* Groups of 8 blocks of 32 "transposed": byte c of word t (values 4t..4t+3) of block m of a
 * group sits at GROUP_WORD(t, m) * 4 + c, so that a 32-byte load t holds word t of each of the
 * 8 blocks, and integer dots accumulated over the 8 loads give each block's sum in its own lane */
#define GROUP_WORD(t, m) ((t) * 8 + (m))
/* values per row of blocks of 32, padded to whole groups of 8 blocks */
static inline int64_t group_padded(int64_t k) { return (k / 32 + 7) / 8 * 256; }

/* A buffer of at least `bytes` (64-byte aligned) kept by the calling thread for its next call
 * with the same slot, or NULL when out of memory: a product's activation blocks (slot
 * SCRATCH_ACT) and unpacked weights (SCRATCH_UNPACKED) reuse their pages instead of asking the
 * kernel for freshly zeroed ones every call (measured: 8% of a 512-row product's time in the
 * kernel's clear_page). Each thread keeps its largest buffers until it exits. */
enum { SCRATCH_ACT, SCRATCH_UNPACKED, SCRATCH_SLOTS };
void *thread_scratch(int slot, int64_t bytes);

/* Part `part` of `parts` of the `bytes` at next (the next tile's weight rows) fetched into L2
 * while this tile computes: a tile unpacked at once (many activation rows) reads its weights
 * in one burst that the hardware prefetcher does not run ahead of. Measured on the bundled
 * head (Q8_0 262144 x 640, 16 rows, one thread, thread CPU time): the unpacking waited on
 * memory for ~40% of the product's time before. */
static inline void prefetch_share(const uint8_t *next, int64_t bytes, int64_t part, int64_t parts) {
    if (!next) return;
    for (int64_t at = bytes * part / parts / 64 * 64; at < bytes * (part + 1) / parts; at += 64)
        __builtin_prefetch(next + at, 0, 2);
}

/* the activation type llama.cpp pairs with a weight type (ggml-cpu.c type_traits_cpu
 * vec_dot_type), or -1 for a type without an integer dot here */
int64_t gguf_act_type(int64_t weight_type);
/* bytes ActRows of `rows` rows of k values take in one buffer (act_rows_init lays them out) */
int64_t act_rows_bytes(int64_t rows, int64_t k);
void act_rows_init(ActRows *a, int64_t type, int64_t rows, int64_t k, void *buffer);
/* rows [lo, hi) of x (rows, k) rounded into a */
void act_rows_quantize(const ActRows *a, const float *x, int64_t lo, int64_t hi);

/* One weight row unpacked (gguf_unpack.c): 32-value chunks of int8 values at q + c * stride
 * (in `values`, stride 32; Q8_0's in place, stride 34), per block a scale d and a min m (blocks
 * of 32: Q4_1 / Q5_1's fp16 m; super-blocks: dmin), per 16 values an integer scale sc and min
 * mn (super-blocks), and per 32 values the scales of its two 16-groups as 16 int16 (AVX2's
 * vpmaddwd operand). */
typedef struct {
    const int8_t *q;
    int64_t stride;
    int8_t *values;
    float *d, *m;
    int16_t *sc, *mn;
    int16_t *pair_scales;
    int has_min;
} WRow;

/* bytes per block of a type with an integer dot, or -1 */
int gguf_dot_block_bytes(int64_t type);
/* bytes a WRow of k values takes in one buffer (wrow_init lays them out, 32-byte aligned) */
int64_t wrow_bytes(int64_t k);
void wrow_init(WRow *w, int64_t k, void *buffer);
/* one row of raw blocks of ggml type `type` into w */
void unpack_row(int64_t type, const uint8_t *row, int64_t k, WRow *w);

/* Q4_K or Q6_K rows [lo, hi) of w (nb super-blocks each) against the rows of a (Q8_K, at most
 * FUSED_K_ROWS), read in registers from the file's blocks, into y[r * n + o]; the same bits as
 * the unpacked rows' product (gguf_fused_k.c). 0, doing nothing, for another type, more rows,
 * or a build without AVX2. */
/* Q4_K 640 x 2048 (one thread, thread CPU time, shared machine), ms fused / unpacked: 1 row
 * 0.044 / 0.155, 4 rows 0.10 / 0.21, 16 rows 0.39 / 0.45; from 32 rows on about even. Q6_K
 * 640 x 2048: 1 row 0.053 / 0.111, 16 rows 0.41 / 0.45 */
enum { FUSED_K_ROWS = 16 };
int fused_k256(int64_t type, const uint8_t *w, int64_t nb, const ActRows *a, float *y, int64_t n, int64_t lo,
               int64_t hi);

/* From this many activation rows on, the blocks of 32 without a min are unpacked once per
 * call into groups (groups_product). Measured with the next tile prefetched (one thread,
 * thread CPU time, shared machine): the bundled head at 4 rows 31.6 ms fused against 17.3 ms
 * in groups, at 8 rows 34.5 against 24.6, a Q5_0 2048 x 640 at 8 rows 0.318 against 0.180 ms;
 * at 2 and 3 rows the fused path stays ahead (head 13.1 against 14.3 ms, 15.8 against 16.6). */
enum { UNPACK_ROWS = 4 };

/* gguf_dot_rows for Q4_0, Q5_0, Q8_0 and IQ4_NL with 512-bit VNNI (gguf_panel.c): weight rows
 * unpacked in panels of 16, one row per 32-bit lane; the same bits as gguf_dot.c's paths */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__FMA__) && defined(__F16C__)
#define GGUF_PANELS 1
/* Whether gguf_dot_rows hands `rows` activation rows against `bytes` of weight rows to
 * gguf_panel.c (else the fused or grouped paths). Measured against the fused path (one thread,
 * thread CPU time, loaded machine, the same bits): at 3 rows panels win everywhere (Q5_0 2048 x
 * 640 0.112 -> 0.080 ms, the head 17.8 -> 14.7 ms); at 2 rows they win on the layers' matrices
 * (Q5_0 2048 x 640 0.085 -> 0.068 ms, 256 x 640 0.024 -> 0.018) but lose on the head (13.5 ->
 * 15.3 ms), whose two-row product waits on memory and gains nothing from the unpacking: two rows
 * go to the panels only below PANEL_TWO_ROW_BYTES of weights */
enum { PANEL_MIN_ROWS = 2, PANEL_TWO_ROW_BYTES = 16 << 20 };
static inline int panels_take_rows(int64_t rows, int64_t bytes) {
    return rows > PANEL_MIN_ROWS || (rows == PANEL_MIN_ROWS && bytes < PANEL_TWO_ROW_BYTES);
}
/* z[p] holds row p's 8 words in lanes 0..7 and row p + 8's in lanes 8..15; out[t] lane j =
 * word t of row j (transpose_words in both 256-bit halves, then the halves' 128-bit lanes
 * interleaved) */
static inline void transpose_panel(const __m512i z[8], __m512i out[8]) {
    __m512i t[8], u[8];
    for (int p = 0; p < 4; p++) {
        t[2 * p] = _mm512_unpacklo_epi32(z[2 * p], z[2 * p + 1]);
        t[2 * p + 1] = _mm512_unpackhi_epi32(z[2 * p], z[2 * p + 1]);
    }
    for (int h = 0; h < 2; h++) {
        u[4 * h + 0] = _mm512_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 1] = _mm512_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 2] = _mm512_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
        u[4 * h + 3] = _mm512_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
    }
    const __m512i low = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), high = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    for (int q = 0; q < 4; q++) {
        out[q] = _mm512_permutex2var_epi64(u[q], low, u[4 + q]);
        out[q + 4] = _mm512_permutex2var_epi64(u[q], high, u[4 + q]);
    }
}

/* acc + the unsigned bytes of u times the signed word at p broadcast to 16 lanes (vpdpbusd with
 * an embedded broadcast: GCC does not fold the vpbroadcastd into it, one instruction more per
 * vpdpbusd otherwise) */
static inline __m512i dpbusd_word(__m512i acc, __m512i u, const int8_t *p) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u), "m"(*(const int32_t *)p));
    return acc;
}

void panel_dot_rows(int64_t type, const void *w, int64_t n, const ActRows *a, float *y, int64_t lo, int64_t hi);
/* From this many activation rows on, Q4_K and Q6_K take gguf_kpanel.c's panels, which read the
 * activations' starts4 (act_rows_quantize fills it for Q8_K rows from this many on). Measured
 * against main's fused path (one thread, thread CPU time, loaded machine, the same bits): Q4_K
 * 640 x 1024 / Q6_K 640 x 2048 at 8 rows 0.083 / 0.204 ms against 0.097 / 0.199, at 16 rows
 * 0.129 / 0.292 against 0.187 / 0.402, at 64 rows 0.42 / 0.92 against 0.68 / 1.24 (k512). */
enum { KPANEL_MIN_ROWS = 8 };
static inline int kpanels_take(int64_t type, int64_t rows) { return (type == 12 || type == 14) && rows >= KPANEL_MIN_ROWS; }
/* gguf_dot_rows for Q4_K and Q6_K against many Q8_K rows (gguf_kpanel.c): weight rows in
 * panels of 16, one row per 32-bit lane, the same bits; 0 (nothing done) for another type or
 * without memory for its scratch */
int kpanel_dot_rows(int64_t type, const void *w, int64_t n, const ActRows *a, float *y, int64_t lo, int64_t hi);
/* the cols unpacked super-block rows (Q2_K..Q6_K, IQ4_XS) against every row of a (Q8_K) into
 * tile[r * cols + c], two chunks per 512-bit instruction, while the next tile's next_bytes at
 * next (or none) are fetched: gguf_dot.c's k256_rows, the same bits (gguf_k512.c) */
void k256_tile_512(const WRow *rows, int64_t cols, int64_t nb, const ActRows *a, float *tile, const uint8_t *next,
                   int64_t next_bytes);
#endif

/* y (rows, n) columns [lo, hi) = the rows of a times the rows [lo, hi) of the (n, k) block
 * matrix w of ggml type `type` (gguf_dot.c); a->type must be gguf_act_type(type) */
void gguf_dot_rows(int64_t type, const void *w, int64_t n, const ActRows *a, float *y, int64_t lo, int64_t hi);

#endif

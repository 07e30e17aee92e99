/* Q4_K and Q6_K weights against many activation rows (Q8_K) with 512-bit VNNI: 16 weight rows
 * per panel, one per 32-bit lane, as gguf_panel.c does for the blocks of 32, with gguf_dot.c's
 * (llama.cpp's) float order for the super-blocks, bit for bit.
 *
 * That order keeps, per super-block, eight integer lanes: lane j = the sum over the 8 chunks of
 * 32 values of the chunk's 16-group scale times the dot of its values 4j..4j+3 with x (P, one
 * vpdpbusd word), each lane scaled and accumulated in its own float. gguf_dot.c's other paths
 * form them one weight row at a time, pairing the values (vpmaddubsw) and weighing the pairs by
 * their scale (vpmaddwd / vpdpwssd): 128 multiply instructions per 256 values of 16 weight rows
 * and one activation row (+ 64 signs for Q6_K). Here a weight row's values sit in its lane, an
 * activation row's word is broadcast to all 16 lanes, so one vpdpbusd gives P of one word for
 * 16 weight rows; two words of the same lane j in chunks 2q and 2q + 1 each fit 16 bits (|P|
 * <= 4 * 32 * 127), so one lane takes both (the second shifted up and blended in: on this Zen 4
 * vpslld and vpblendmw beside vpdpbusd cost nothing, vpdpwssd a multiply slot, measured) and
 * one vpdpwssd weighs them by their scales. Per 256 values of 16 weight rows and one
 * activation row: 64 vpdpbusd, 32 vpdpwssd and 8 fused multiply-adds.
 *
 * The operands: vpdpbusd multiplies unsigned by signed bytes: the weights are the unsigned side
 * (Q4_K's values 0..15; Q6_K's plus 32, 0..63) and x (|x| <= 127, gguf_act.c) the signed one.
 * Q6_K's pairs of word sums then take -32 times the words' sums of x (ActRows starts4, int16
 * pairs) by one 16-bit add, so P = sum w * x exactly. The lane integers are exact in int32
 * (|lane| <= 8 * 128 * 16256).
 *
 * The float order, lane by lane: lane j's float += (d_x * d_w) * its integer by one fused
 * multiply-add per super-block in order from +0, the 8 lanes then summed as (l0 + l4) + (l2 +
 * l6) + ((l1 + l5) + (l3 + l7)), minus Q4_K's min term (its own float of (d_x * dmin) times
 * each super-block's integer sum of min * bsums, that integer formed by 4 vpdpwssd on pairs of
 * sub-blocks). A row's result is therefore gguf_dot.c's, bit for bit, for any number of rows
 * and in every build (tests/test_gguf_dot.py).
 *
 * A panel is unpacked one super-block at a time into a slice that stays in L1 while every
 * activation row, in tiles of KP_NR (6; 4 and 8 measured slower), meets it; the lanes' float
 * accumulators of every row are kept in a scratch array between super-blocks (y only gets the
 * finished values, masked at a partial panel's edge), and the next slice's raw blocks are
 * fetched into cache evenly over the tiles.
 */
#include "common.h"
#include "gguf_dot.h"

#pragma GCC optimize("fp-contract=off") /* gguf_dot.c's float order */

#ifdef GGUF_PANELS

enum { QK = 32, QKK = 256, KP_LANES = 16, KP_NR = 6, Q4_K_TYPE = 12, Q6_K_TYPE = 14 };

/* A slice: one super-block of a panel's 16 weight rows, in 64-byte vectors (lane r: row r):
 *   [0, 64)       values: vector t = 8c + j holds values 4j..4j+3 of chunk c (32c..32c+31) as
 *                 unsigned bytes: Q4_K's as they are, Q6_K's plus 32
 *   [64, 72)      SCALES + 2q + h: the scales of chunks 2q and 2q + 1 for lanes j of half h
 *                 (j / 4 = h) as an int16 pair: Q4_K's sub-block scale, Q6_K's 16-group 2c + h
 *   D             d as floats; Q4_K also DMIN, dmin as floats, and [MINS, MINS + 4) the mins of
 *                 sub-blocks 2p and 2p + 1 as an int16 pair */
enum { SCALES = 64, D_AT = 72, DMIN_AT = 73, MINS_AT = 74, SLICE_VECTORS = 78 };

static inline int block_bytes_of(const int type) { return type == Q4_K_TYPE ? 144 : 210; }

/* chunk c (values 32c..32c+31) of a super-block of `type` at p, as signed bytes */
ALWAYS_INLINE __m256i k_chunk(const int type, const uint8_t *p, const int c) {
    return type == Q4_K_TYPE ? q4_k_chunk(p, c) : q6_k_chunk_unsigned(p, c);
}

/* super-block b of `rows` (<= 16) weight rows from w (rb bytes apart) into slice; the lanes of
 * missing rows get zeros */
ALWAYS_INLINE void unpack_slice(const int type, const uint8_t *w, int64_t rb, int64_t b, int64_t rows,
                                __m512i *slice) {
    const int bytes = block_bytes_of(type);
    const uint8_t *first = w + b * bytes;
    for (int c = 0; c < 8; c++) {
        __m512i z[8], t[8];
        for (int p = 0; p < 8; p++) {
            const __m256i lo = p < rows ? k_chunk(type, first + p * rb, c) : _mm256_setzero_si256();
            const __m256i hi = p + 8 < rows ? k_chunk(type, first + (p + 8) * rb, c) : _mm256_setzero_si256();
            z[p] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        }
        transpose_panel(z, t);
        for (int i = 0; i < 8; i++) slice[8 * c + i] = t[i];
    }
    int32_t *scales = (int32_t *)(slice + SCALES), *mins = (int32_t *)(slice + MINS_AT);
    float *d = (float *)(slice + D_AT), *dmin = (float *)(slice + DMIN_AT);
    for (int r = 0; r < KP_LANES; r++) {
        const uint8_t *block = first + r * rb;
        int sc[8][2] = {{0}}; /* chunk c, half h */
        d[r] = dmin[r] = 0.f;
        for (int p = 0; p < 4; p++) mins[p * KP_LANES + r] = 0;
        if (r < rows && type == Q4_K_TYPE) {
            uint64_t s6, m6;
            q4_k_scales_mins(block + 4, &s6, &m6);
            for (int c = 0; c < 8; c++) sc[c][0] = sc[c][1] = (int)((s6 >> (8 * c)) & 0xFF);
            for (int p = 0; p < 4; p++)
                mins[p * KP_LANES + r] = (int32_t)(((m6 >> (16 * p)) & 0xFF) | ((m6 >> (16 * p + 8)) & 0xFF) << 16);
            d[r] = half_to_float(block), dmin[r] = half_to_float(block + 2);
        } else if (r < rows) {
            for (int c = 0; c < 8; c++) sc[c][0] = (int8_t)block[192 + 2 * c], sc[c][1] = (int8_t)block[193 + 2 * c];
            d[r] = half_to_float(block + 208);
        }
        for (int q = 0; q < 4; q++)
            for (int h = 0; h < 2; h++)
                scales[(2 * q + h) * KP_LANES + r] = (int32_t)((uint32_t)(uint16_t)sc[2 * q][h] | (uint32_t)(uint16_t)sc[2 * q + 1][h] << 16);
    }
}

/* Super-block b of the slice against activation rows r0..r0 + NR - 1 (NR a constant at each
 * call): their 8 lanes' float accumulators acc (row r lane j at (8r + j) * 16) and Q4_K's min
 * sums (16 floats per row) take this super-block (from +0 when first). pairs: Q4_K's per row
 * and super-block the 4 words of (bsum of sub-block 2p, of 2p + 1) as int16 pairs. */
ALWAYS_INLINE void slice_tile(const int type, const __m512i *slice, const ActRows *a, int64_t b, int64_t r0,
                              const int NR, const int32_t *pairs, float *acc, float *mins, const int first) {
    const int64_t k = a->k, nb = k / QKK;
    float dd[KP_NR][KP_LANES] __attribute__((aligned(64))); /* d_x * d_w, lane r: row r (kept in L1, not registers) */
    const __m512 dw = _mm512_load_ps((const float *)(slice + D_AT));
    for (int i = 0; i < NR; i++) _mm512_store_ps(dd[i], _mm512_mul_ps(dw, _mm512_set1_ps(a->d[(r0 + i) * (k / QK) + b])));
    _Pragma("GCC unroll 1") /* one lane at a time: unrolled, the compiler hoists loads and spills */
    for (int j = 0; j < 8; j++) { /* llama.cpp's lane j: values 4j..4j+3 of every chunk */
        __m512i lane[KP_NR];
        for (int i = 0; i < NR; i++) lane[i] = _mm512_setzero_si512();
        for (int q = 0; q < 4; q++) { /* chunks 2q and 2q + 1 */
            const int ta = 16 * q + j, tb = ta + 8;
            const __m512i va = slice[ta], vb = slice[tb];
            __m512i pair[KP_NR];
            for (int i = 0; i < NR; i++) {
                const int8_t *x = a->q + (r0 + i) * k + b * QKK;
                /* each word's sum fits 16 bits (|sum| <= 4 * 63 * 127), so does the pair's */
                const __m512i pa = dpbusd_word(_mm512_setzero_si512(), va, x + 4 * ta);
                const __m512i pb = dpbusd_word(_mm512_setzero_si512(), vb, x + 4 * tb);
                pair[i] = _mm512_mask_blend_epi16(0xAAAAAAAAu, pa, _mm512_slli_epi32(pb, 16));
                if (type == Q6_K_TYPE) /* values + 32 back to the values: 16-bit adds, exact (|P| <= 4 * 32 * 127) */
                    pair[i] = _mm512_add_epi16(pair[i], _mm512_set1_epi32(a->starts4[(r0 + i) * (k / 8) + b * 32 + 8 * q + j]));
            }
            const __m512i scale = slice[SCALES + 2 * q + j / 4];
            for (int i = 0; i < NR; i++) lane[i] = _mm512_dpwssd_epi32(lane[i], pair[i], scale);
        }
        for (int i = 0; i < NR; i++) {
            float *at = acc + ((r0 + i) * 8 + j) * KP_LANES;
            const __m512 before = first ? _mm512_setzero_ps() : _mm512_load_ps(at);
            _mm512_store_ps(at, _mm512_fmadd_ps(_mm512_load_ps(dd[i]), _mm512_cvtepi32_ps(lane[i]), before));
        }
    }
    if (type != Q4_K_TYPE) return;
    __m512i summ[KP_NR];
    for (int i = 0; i < NR; i++) summ[i] = _mm512_setzero_si512();
    for (int p = 0; p < 4; p++) {
        const __m512i mn = slice[MINS_AT + p];
        for (int i = 0; i < NR; i++)
            summ[i] = _mm512_dpwssd_epi32(summ[i], _mm512_set1_epi32(pairs[((r0 + i) * nb + b) * 4 + p]), mn);
    }
    const __m512 dmin = _mm512_load_ps((const float *)(slice + DMIN_AT));
    for (int i = 0; i < NR; i++) {
        float *row_mins = mins + (r0 + i) * KP_LANES;
        const __m512 dm = _mm512_mul_ps(dmin, _mm512_set1_ps(a->d[(r0 + i) * (k / QK) + b]));
        const __m512 before = first ? _mm512_setzero_ps() : _mm512_load_ps(row_mins);
        _mm512_store_ps(row_mins, _mm512_fmadd_ps(dm, _mm512_cvtepi32_ps(summ[i]), before));
    }
}

/* rows `lo`..`hi` of the `rows` (<= 16) raw rows at w (rb bytes apart), `bytes` of each from
 * super-block b, fetched into L2 */
static void fetch_rows(const uint8_t *w, int64_t rb, int64_t b, int bytes, int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; j++) {
        const uint8_t *p = w + j * rb + b * bytes;
        for (int at = 0; at < bytes; at += 64) __builtin_prefetch(p + at, 0, 2);
        __builtin_prefetch(p + bytes - 1, 0, 2); /* the last line where the block straddles one more */
    }
}

/* Every activation row of a against super-block b of the slice, in tiles of KP_NR, each tile
 * fetching its share of the next slice's raw rows (next: its first row, next_rows of them,
 * super-block next_b) */
ALWAYS_INLINE void slice_rows(const int type, const __m512i *slice, const ActRows *a, int64_t b, const int32_t *pairs,
                              float *acc, float *mins, const uint8_t *next, int64_t rb, int64_t next_b,
                              int64_t next_rows) {
    const int first = b == 0, bytes = block_bytes_of(type);
    const int64_t tiles = (a->rows + KP_NR - 1) / KP_NR;
    int64_t r = 0, t = 0;
#define FETCH_SHARE(t)                                                                               \
    if (next) fetch_rows(next, rb, next_b, bytes, next_rows * (t) / tiles, next_rows * ((t) + 1) / tiles)
    for (; r + KP_NR <= a->rows; r += KP_NR, t++) {
        slice_tile(type, slice, a, b, r, KP_NR, pairs, acc, mins, first);
        FETCH_SHARE(t);
    }
    switch (a->rows - r) {
    case 5: slice_tile(type, slice, a, b, r, 5, pairs, acc, mins, first); break;
    case 4: slice_tile(type, slice, a, b, r, 4, pairs, acc, mins, first); break;
    case 3: slice_tile(type, slice, a, b, r, 3, pairs, acc, mins, first); break;
    case 2: slice_tile(type, slice, a, b, r, 2, pairs, acc, mins, first); break;
    case 1: slice_tile(type, slice, a, b, r, 1, pairs, acc, mins, first); break;
    default: return;
    }
    FETCH_SHARE(t);
#undef FETCH_SHARE
}

ALWAYS_INLINE void kpanel_rows(const int type, const uint8_t *w, int64_t n, const ActRows *a, float *y, int64_t lo,
                               int64_t hi, uint8_t *scratch) {
    const int64_t k = a->k, nb = k / QKK, rb = nb * block_bytes_of(type), rows = a->rows;
    __m512i *slice = (__m512i *)scratch;
    float *acc = (float *)(slice + SLICE_VECTORS), *mins = acc + rows * 8 * KP_LANES;
    int32_t *pairs = (int32_t *)(mins + rows * KP_LANES);
    if (type == Q4_K_TYPE) /* per row and super-block: (bsum 2p, bsum 2p + 1) of its 32-value sub-blocks */
        for (int64_t r = 0; r < rows; r++)
            for (int64_t b = 0; b < nb; b++) {
                const int16_t *bs = a->bsums + r * (k / 16) + b * 16;
                for (int p = 0; p < 4; p++)
                    pairs[(r * nb + b) * 4 + p] = (int32_t)((uint32_t)(uint16_t)(bs[4 * p] + bs[4 * p + 1]) |
                                                            (uint32_t)(uint16_t)(bs[4 * p + 2] + bs[4 * p + 3]) << 16);
            }
    for (int64_t o = lo; o < hi; o += KP_LANES) {
        const int64_t cols = hi - o < KP_LANES ? hi - o : KP_LANES;
        const uint8_t *panel = w + o * rb;
        for (int64_t b = 0; b < nb; b++) {
            unpack_slice(type, panel, rb, b, cols, slice);
            /* the next slice: this panel's next super-block, or the next panel's first */
            const int last = b + 1 == nb;
            const int64_t next_cols = last ? (hi - o - cols < KP_LANES ? hi - o - cols : KP_LANES) : cols;
            slice_rows(type, slice, a, b, pairs, acc, mins, next_cols > 0 ? (last ? panel + cols * rb : panel) : NULL, rb,
                       last ? 0 : b + 1, next_cols);
        }
        const __mmask16 lanes = (__mmask16)(cols >= KP_LANES ? 0xFFFF : (1u << cols) - 1);
        for (int64_t r = 0; r < rows; r++) { /* (l0 + l4) + (l2 + l6) + ((l1 + l5) + (l3 + l7)), minus the min sum */
            const float *l = acc + r * 8 * KP_LANES;
#define L(j) _mm512_load_ps(l + (j) * KP_LANES)
            const __m512 even = _mm512_add_ps(_mm512_add_ps(L(0), L(4)), _mm512_add_ps(L(2), L(6)));
            const __m512 odd = _mm512_add_ps(_mm512_add_ps(L(1), L(5)), _mm512_add_ps(L(3), L(7)));
#undef L
            __m512 v = _mm512_add_ps(even, odd);
            if (type == Q4_K_TYPE) v = _mm512_sub_ps(v, _mm512_load_ps(mins + r * KP_LANES));
            _mm512_mask_storeu_ps(y + r * n + o, lanes, v);
        }
    }
}

int kpanel_dot_rows(int64_t type, const void *w, int64_t n, const ActRows *a, float *y, int64_t lo, int64_t hi) {
    if (type != Q4_K_TYPE && type != Q6_K_TYPE) return 0;
    const int64_t nb = a->k / QKK;
    const int64_t bytes = SLICE_VECTORS * 64 + 9 * a->rows * KP_LANES * (int64_t)sizeof(float) +
                          a->rows * nb * 4 * (int64_t)sizeof(int32_t);
    uint8_t *scratch = thread_scratch(SCRATCH_UNPACKED, bytes);
    if (!scratch) return 0;
    if (type == Q4_K_TYPE) kpanel_rows(Q4_K_TYPE, (const uint8_t *)w, n, a, y, lo, hi, scratch);
    else kpanel_rows(Q6_K_TYPE, (const uint8_t *)w, n, a, y, lo, hi, scratch);
    return 1;
}

#else
typedef int gguf_kpanel_unused; /* an empty unit otherwise: the panels need 512-bit VNNI */
#endif

/* Blocks of 32 without a min (Q4_0, Q5_0, Q8_0, IQ4_NL) against many activation rows with
 * 512-bit VNNI: weight rows in panels of 16, one weight row per 32-bit lane.
 *
 * A panel holds, per block, its 8 words of 4 values as 8 vectors (vector t, lane j: values
 * 4t..4t+3 of weight row j, plus 128 so that they are vpdpbusd's unsigned operand) and the 16
 * rows' fp16 scales. An activation row's word t is broadcast to every lane, so 8 vpdpbusd give 16 weight rows' exact block sums at once, each in
 * its own lane, with no reduction; the + 128 comes off as -128 times the activation block's
 * sum (ActRows qsum), the sum's starting value. Unpacking is a 16 x 8 transpose of words per
 * block, once per call for every activation row.
 *
 * Measured (one thread, thread CPU time, the 2-core EPYC loaded by other work): the bundled
 * head (Q8_0 262144 x 640) at 16 rows 30 ms against 36-38 ms with gguf_dot.c's groups (21 ms
 * with the weights in cache: ~16 of products, at the bound of 8 vpdpbusd plus a multiply and a
 * fused multiply-add per block and row on the two 512-bit-capable pipes, and ~4 of
 * unpacking); a Q5_0 2048 x 640 at 512 rows 4.8 ms against 6.7-9.4.
 *
 * The float order is gguf_dot.c's, lane for lane: a weight row's block b adds (d_w * d_x) times
 * its converted sum to the float of position b mod 8 by one fused multiply-add, blocks in
 * order, and the eight positions are summed as (l0 + l4) + (l2 + l6) + ((l1 + l5) + (l3 +
 * l7)). Here each position runs to its end before the next starts (in the order 0, 4, 2, 6, 1,
 * 5, 3, 7, so that each sum of the tree is made as soon as its two positions are done): only
 * the partial sums stay in registers. Blocks after the last up to a multiple of 8 (gguf_dot.c's
 * zero padding) add fmaf(0, 0, lane) there, which leaves the lane as it is: a lane starts at
 * +0 and a sum of nonzero products that cancels gives +0 too, so it is never -0. The result is
 * gguf_dot.c's, bit for bit: tests/test_gguf_dot.py compares this build with the AVX2 and
 * scalar ones.
 */
#include "common.h"
#include "gguf_dot.h"

#pragma GCC optimize("fp-contract=off") /* gguf_dot.c's float order */

#ifdef GGUF_PANELS

enum { QK = 32, WORDS = 8, PANEL_BLOCK_BYTES = WORDS * 64 + 64 /* 8 vectors, 16 fp16 scales, padding */ };

/* rows (<= 16) weight rows of nb blocks from w (rb bytes apart) into one panel; the lanes of
 * missing rows get zero values and scales */
#define UNPACK_PANEL(VALUES, BYTES)                                                                  \
    for (int64_t b = 0; b < nb; b++) {                                                               \
        uint8_t *out = panel + b * PANEL_BLOCK_BYTES;                                                \
        __m512i z[8], words[8];                                                                      \
        for (int p = 0; p < 8; p++) {                                                                \
            const __m256i lo = p < rows ? VALUES(w + p * rb + b * BYTES) : _mm256_setzero_si256();  \
            const __m256i hi = p + 8 < rows ? VALUES(w + (p + 8) * rb + b * BYTES) : _mm256_setzero_si256(); \
            z[p] = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), flip);   \
        }                                                                                            \
        transpose_panel(z, words);                                                                   \
        for (int t = 0; t < WORDS; t++) _mm512_store_si512((__m512i *)(out + 64 * t), words[t]);     \
        /* the rows' fp16 d, copied as they are (a gather took 3 times as long, measured) */        \
        uint16_t *d = (uint16_t *)(out + WORDS * 64);                                                \
        if (rows == 16)                                                                              \
            for (int j = 0; j < 16; j++) memcpy(d + j, w + j * rb + b * BYTES, 2);                   \
        else                                                                                         \
            for (int j = 0; j < 16; j++)                                                             \
                if (j < rows) memcpy(d + j, w + j * rb + b * BYTES, 2);                              \
                else d[j] = 0;                                                                       \
    }

static int unpack_panel(int64_t type, const uint8_t *w, int64_t nb, int64_t rows, uint8_t *panel) {
    const __m512i flip = _mm512_set1_epi8((char)0x80); /* signed values -> values + 128 */
    const int64_t rb = nb * gguf_dot_block_bytes(type);
    switch (type) {
    case 2: UNPACK_PANEL(values_q4_0, 18) return 1;
    case 6: UNPACK_PANEL(values_q5_0, 22) return 1;
    case 8: UNPACK_PANEL(values_q8_0, 34) return 1;
    case 20: UNPACK_PANEL(values_iq4_nl, 18) return 1;
    default: return 0;
    }
}

/* the activation word at p broadcast to 16 lanes */
static inline __m512i word16(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}

/* out[i * n + j] = panel row j . activation row r0 + i for i < NR (a constant at each call),
 * stored for the lanes in `lanes` */
ALWAYS_INLINE void panel_tile(const uint8_t *panel, int64_t nb, const ActRows *a, int64_t r0, const int NR, float *out,
                              int64_t n, __mmask16 lanes, const int32_t *starts, const uint8_t *fetch,
                              int64_t fetch_bytes) {
    int64_t fetched = 0;
    const int64_t k = a->k, bk = k / QK;
    enum { MAX_NR = 6 };
    __m512 total[MAX_NR], pair[MAX_NR], quad[MAX_NR];
    static const int positions[8] = {0, 4, 2, 6, 1, 5, 3, 7};
    for (int i = 0; i < NR; i++) pair[i] = quad[i] = _mm512_setzero_ps(); /* (set before use below) */
    for (int pi = 0; pi < 8; pi++) {
        const int p = positions[pi];
        __m512 lane[MAX_NR];
        for (int i = 0; i < NR; i++) lane[i] = _mm512_setzero_ps();
        for (int64_t b = p; b < nb; b += 8) {
            const uint8_t *block = panel + b * PANEL_BLOCK_BYTES;
            /* a line per block while any is left (the rest after the last block): no division
             * and no data-dependent loop per block */
            if (fetched < fetch_bytes) __builtin_prefetch(fetch + fetched, 0, 2), fetched += 64;
            __m512i sums[MAX_NR];
            for (int i = 0; i < NR; i++) sums[i] = _mm512_set1_epi32(starts[(r0 + i) * bk + b]);
            for (int t = 0; t < WORDS; t++) {
                const __m512i v = _mm512_load_si512((const __m512i *)(block + 64 * t));
                for (int i = 0; i < NR; i++)
                    sums[i] = _mm512_dpbusd_epi32(sums[i], v, word16(a->q + (r0 + i) * k + b * QK + 4 * t));
            }
            const __m512 dw = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(block + WORDS * 64)));
            for (int i = 0; i < NR; i++) {
                const __m512 dd = _mm512_mul_ps(dw, _mm512_set1_ps(a->d[(r0 + i) * bk + b]));
                lane[i] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(sums[i]), lane[i]);
            }
        }
        for (int i = 0; i < NR; i++) switch (pi) { /* (l0 + l4) + (l2 + l6) + ((l1 + l5) + (l3 + l7)) */
            case 0: total[i] = lane[i]; break;
            case 1: total[i] = _mm512_add_ps(total[i], lane[i]); break;
            case 2: pair[i] = lane[i]; break;
            case 3: total[i] = _mm512_add_ps(total[i], _mm512_add_ps(pair[i], lane[i])); break;
            case 4: pair[i] = lane[i]; break;
            case 5: pair[i] = _mm512_add_ps(pair[i], lane[i]); break;
            case 6: quad[i] = lane[i]; break;
            default: total[i] = _mm512_add_ps(total[i], _mm512_add_ps(pair[i], _mm512_add_ps(quad[i], lane[i])));
            }
    }
    for (; fetched < fetch_bytes; fetched += 64) __builtin_prefetch(fetch + fetched, 0, 2);
    for (int i = 0; i < NR; i++) _mm512_mask_storeu_ps(out + i * n, lanes, total[i]);
}

enum { PANEL_ROWS = 16, PANEL_NR = 6 }; /* activation rows per tile: 6 x 5 zmm registers (8 spills: measured slower) */

/* y[r * n + j] = panel row j . activation row r for j < cols (<= 16) and every row of a, while
 * the next panel's `next_bytes` at next (or none) are fetched into L2, evenly over the tiles
 * and a line per block within a tile: a burst of prefetches would wait for free miss buffers
 * and stall the products */
static void panel_product(const uint8_t *panel, int64_t nb, const ActRows *a, const int32_t *starts, float *y, int64_t n,
                          int64_t cols, const uint8_t *next, int64_t next_bytes) {
    const __mmask16 lanes = (__mmask16)(cols >= 16 ? 0xFFFF : (1u << cols) - 1);
    const int64_t tiles = (a->rows + PANEL_NR - 1) / PANEL_NR;
    if (!next) next_bytes = 0;
#define PANEL_TILE(r, NR)                                                                            \
    {                                                                                                \
        const int64_t t = (r) / PANEL_NR, from = next_bytes * t / tiles / 64 * 64;                  \
        panel_tile(panel, nb, a, r, NR, y + (r) * n, n, lanes, starts, next ? next + from : NULL,    \
                   next_bytes * (t + 1) / tiles - from);                                             \
    }
    int64_t r = 0;
    for (; r + PANEL_NR <= a->rows; r += PANEL_NR) PANEL_TILE(r, PANEL_NR)
    switch (a->rows - r) {
    case 5: PANEL_TILE(r, 5) break;
    case 4: PANEL_TILE(r, 4) break;
    case 3: PANEL_TILE(r, 3) break;
    case 2: PANEL_TILE(r, 2) break;
    case 1: PANEL_TILE(r, 1) break;
    }
#undef PANEL_TILE
}

/* Panel by panel: 16 weight rows unpacked (into L1), multiplied by every activation row while
 * the next 16 rows are fetched, the results stored straight into y (16 floats of a row: one
 * cache line) */
void panel_dot_rows(int64_t type, const void *w, int64_t n, const ActRows *a, float *y, int64_t lo, int64_t hi) {
    const int64_t nb = a->k / QK, rb = nb * gguf_dot_block_bytes(type);
    uint8_t *panel = thread_scratch(SCRATCH_UNPACKED, nb * PANEL_BLOCK_BYTES + a->rows * nb * (int64_t)sizeof(int32_t));
    if (!panel) return;
    /* each block sum's start: -128 times the activation block's sum takes the weights' + 128 off */
    int32_t *starts = (int32_t *)(panel + nb * PANEL_BLOCK_BYTES);
    for (int64_t i = 0; i < a->rows * nb; i++) starts[i] = -128 * a->qsum[i];
    for (int64_t o = lo; o < hi; o += PANEL_ROWS) {
        const int64_t cols = hi - o < PANEL_ROWS ? hi - o : PANEL_ROWS, next_cols = hi - o - cols;
        const uint8_t *rows = (const uint8_t *)w + o * rb;
        unpack_panel(type, rows, nb, cols, panel);
        panel_product(panel, nb, a, starts, y + o, n, cols, next_cols > 0 ? rows + cols * rb : NULL,
                      (next_cols < PANEL_ROWS ? next_cols : PANEL_ROWS) * rb);
    }
}

#else
typedef int gguf_panel_unused; /* an empty unit otherwise: the panels need 512-bit VNNI */
#endif

/* Q4_K and Q6_K weights against many activation rows (Q8_K) with 512-bit VNNI: 16 weight rows
 * per panel, one per 32-bit lane, as gguf_panel.c does for the blocks of 32.
 *
 * gguf_dot.c's other super-block paths pair the values (vpmaddubsw) and weigh each pair by its
 * 16-group's scale (vpmaddwd / vpdpwssd): two multiply instructions per 64 multiply-adds, plus
 * a masked sign per 64 for Q6_K. Here a weight row's values of one super-block sit in one lane,
 * 4 per vpdpbusd word, and an activation row's word is broadcast to all 16 lanes, so that one
 * vpdpbusd is 64 multiply-adds of 16 weight rows at once, each lane summing its own row's group
 * of G values (Q4_K 16, Q6_K 8) without a reduction. Two such sums that share a scale (the two
 * halves of a Q4_K sub-block of 32, of a Q6_K 16-group) each fit 16 bits: one lane takes both
 * (the second shifted up and blended in, on pipes the multiplies leave free: measured on this
 * Zen 4, vpslld and vpblendmw beside vpdpbusd cost nothing, vpdpwssd or vpmulld a multiply
 * slot each) and one vpdpwssd weighs the pair by the scale in both halves. Per 256 values of
 * 16 weight rows and one activation row: 64 vpdpbusd and 8 (Q4_K) or 16 (Q6_K) vpdpwssd,
 * against 128 multiplies (+ 64 signs for Q6_K) in the paired form.
 *
 * The operands: vpdpbusd multiplies unsigned by signed bytes. The weights are the signed side
 * (Q4_K 0..15, Q6_K -32..31 as they are) and the activations the unsigned one, x + 128 (ActRows
 * xu, 1..255 since |x| <= 127 for Q8_K: gguf_act.c); each group's sum starts at -128 times the
 * group's values' sum (a per-lane constant, unpacked once), so S = sum w * x exactly. S must
 * fit 16 bits for vpdpwssd: Q4_K |S| <= 16 * 15 * 127 = 30480, Q6_K |S| <= 8 * 32 * 127 =
 * 32512 (hence Q6_K's groups of 8: 16 would reach 65024). The super-block's integer sumi, the
 * sum of scale * S, is exact in int32 (|sumi| <= 256 * 127 * 15 * 63 for Q4_K, 256 * 127 * 32
 * * 128 for Q6_K, both below 2^28); with bias the partial sums never leave int32 either.
 *
 * The float order is gguf_dot.c's super-block order, lane by lane: acc = fma(d_x * d_w, (float)
 * sumi, acc) per super-block in order from +0, for Q4_K the min term likewise, with the integer
 * sum of min * bsums formed as sum over the 8 sub-blocks of min * (bsum of its 32 values) by 4
 * vpdpwssd on pairs, then acc - min. A row's result is therefore gguf_dot.c's, bit for bit, for
 * any number of rows and in every build (tests/test_gguf_dot.py).
 *
 * A panel is unpacked one super-block at a time into a slice that stays in L1 while every
 * activation row, in tiles of KP_NR (6: 7 spills, measured 9-12% slower), meets it; the
 * float accumulators of every row and lane are
 * kept in a scratch array between super-blocks (y only gets the finished values, masked at a
 * partial panel's edge), and the next slice's raw blocks are fetched into cache evenly over the
 * tiles.
 */
#include "common.h"
#include "gguf_dot.h"

#pragma GCC optimize("fp-contract=off") /* gguf_dot.c's float order */

#ifdef GGUF_PANELS

enum { QK = 32, QKK = 256, KP_LANES = 16, KP_NR = 6, Q4_K_TYPE = 12, Q6_K_TYPE = 14 };

/* A slice: one super-block of a panel's 16 weight rows, in 64-byte vectors (lane j: row j):
 *   [0, 64)                values: vector t holds values 4t..4t+3, signed bytes
 *   [64, 64 + NG)          group g's start: -128 * the sum of its values
 *   [SCALES, + NG / 2)     the scale of groups 2q and 2q + 1 (one 32-value sub-block of Q4_K,
 *                          one 16-group of Q6_K) as an int16 in both halves
 *   D                      d as floats; Q4_K also DMIN, dmin as floats, and [MINS, MINS + 4)
 *                          the mins of sub-blocks 2p and 2p + 1 as an int16 pair
 * with NG the groups per super-block: Q4_K 16 (16 values each), Q6_K 32 (8 values each). */
static inline int groups_of(const int type) { return type == 12 ? 16 : 32; }
#define SCALES(NG) (64 + (NG))
#define D_AT(NG) (64 + (NG) + (NG) / 2)
#define DMIN_AT(NG) (D_AT(NG) + 1)
#define MINS_AT(NG) (D_AT(NG) + 2)
enum { SLICE_VECTORS = 64 + 32 + 16 + 1 }; /* Q6_K's; Q4_K's 64 + 16 + 8 + 6 fit */

static inline int block_bytes_of(const int type) { return type == Q4_K_TYPE ? 144 : 210; }

/* chunk c (values 32c..32c+31) of a super-block of `type` at p, as signed bytes */
ALWAYS_INLINE __m256i k_chunk(const int type, const uint8_t *p, const int c) {
    return type == Q4_K_TYPE ? q4_k_chunk(p, c) : q6_k_chunk(p, c);
}

/* super-block b of `rows` (<= 16) weight rows from w (rb bytes apart) into slice; the lanes of
 * missing rows get zeros */
ALWAYS_INLINE void unpack_slice(const int type, const uint8_t *w, int64_t rb, int64_t b, int64_t rows,
                                __m512i *slice) {
    const int NG = groups_of(type), bytes = block_bytes_of(type), words = 64 / NG; /* per group */
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
    const __m512i ones = _mm512_set1_epi8(1);
    for (int g = 0; g < NG; g++) {
        __m512i sum = _mm512_setzero_si512();
        for (int u = 0; u < words; u++) sum = _mm512_dpbusd_epi32(sum, ones, slice[g * words + u]);
        slice[64 + g] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, 7));
    }
    int32_t *scales = (int32_t *)(slice + SCALES(NG)), *mins = (int32_t *)(slice + MINS_AT(NG));
    float *d = (float *)(slice + D_AT(NG)), *dmin = (float *)(slice + DMIN_AT(NG));
    for (int j = 0; j < KP_LANES; j++) {
        const uint8_t *block = first + j * rb;
        if (j >= rows) {
            for (int q = 0; q < NG / 2; q++) scales[q * KP_LANES + j] = 0;
            d[j] = 0.f;
            if (type == Q4_K_TYPE) {
                dmin[j] = 0.f;
                for (int p = 0; p < 4; p++) mins[p * KP_LANES + j] = 0;
            }
            continue;
        }
        if (type == Q4_K_TYPE) {
            uint64_t sc, mn;
            q4_k_scales_mins(block + 4, &sc, &mn);
            for (int q = 0; q < 8; q++) scales[q * KP_LANES + j] = (int32_t)(((sc >> (8 * q)) & 0xFF) * 0x10001u);
            for (int p = 0; p < 4; p++)
                mins[p * KP_LANES + j] = (int32_t)(((mn >> (16 * p)) & 0xFF) | ((mn >> (16 * p + 8)) & 0xFF) << 16);
            d[j] = half_to_float(block), dmin[j] = half_to_float(block + 2);
        } else {
            for (int q = 0; q < 16; q++) scales[q * KP_LANES + j] = (int32_t)((uint16_t)(int8_t)block[192 + q] * 0x10001u);
            d[j] = half_to_float(block + 208);
        }
    }
}

/* activation word at p broadcast to 16 lanes */
static inline __m512i word16(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}

/* Super-block b of the slice against activation rows r0..r0 + NR - 1 (NR a constant at each
 * call): their float accumulators acc (and Q4_K's mins), 16 floats per row, take this
 * super-block (from +0 when first). pairs: Q4_K's per row and super-block the 4 words of
 * (bsum of sub-block 2p, of 2p + 1) as int16 pairs. */
ALWAYS_INLINE void slice_tile(const int type, const __m512i *slice, const ActRows *a, int64_t b, int64_t r0,
                              const int NR, const int32_t *pairs, float *acc, float *mins, const int first) {
    const int64_t k = a->k, nb = k / QKK;
    const int NG = groups_of(type), words = 64 / NG;
    __m512i sumi[KP_NR];
    for (int i = 0; i < NR; i++) sumi[i] = _mm512_setzero_si512();
    for (int q = 0; q < NG / 2; q++) { /* groups 2q and 2q + 1: one scale */
        __m512i s[2][KP_NR];
        for (int h = 0; h < 2; h++) {
            const int g = 2 * q + h;
            for (int i = 0; i < NR; i++) s[h][i] = slice[64 + g];
            for (int u = 0; u < words; u++) {
                const int t = g * words + u;
                const __m512i v = slice[t];
                for (int i = 0; i < NR; i++)
                    s[h][i] = _mm512_dpbusd_epi32(s[h][i], word16(a->xu + (r0 + i) * k + b * QKK + 4 * t), v);
            }
        }
        /* both sums fit 16 bits: one lane holds the pair (low: group 2q, high: 2q + 1), and one
         * vpdpwssd weighs both (the shift and the word blend run beside the multiplies) */
        const __m512i scale = slice[SCALES(NG) + q];
        for (int i = 0; i < NR; i++) {
            const __m512i pair = _mm512_mask_blend_epi16(0xAAAAAAAAu, s[0][i], _mm512_slli_epi32(s[1][i], 16));
            sumi[i] = _mm512_dpwssd_epi32(sumi[i], pair, scale);
        }
    }
    const __m512 dw = _mm512_load_ps((const float *)(slice + D_AT(NG)));
    for (int i = 0; i < NR; i++) {
        float *row_acc = acc + (r0 + i) * KP_LANES;
        const __m512 dd = _mm512_mul_ps(dw, _mm512_set1_ps(a->d[(r0 + i) * (k / QK) + b]));
        const __m512 before = first ? _mm512_setzero_ps() : _mm512_load_ps(row_acc);
        _mm512_store_ps(row_acc, _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(sumi[i]), before));
    }
    if (type != Q4_K_TYPE) return;
    __m512i summ[KP_NR];
    for (int i = 0; i < NR; i++) summ[i] = _mm512_setzero_si512();
    for (int p = 0; p < 4; p++) {
        const __m512i mn = slice[MINS_AT(NG) + p];
        for (int i = 0; i < NR; i++)
            summ[i] = _mm512_dpwssd_epi32(summ[i], _mm512_set1_epi32(pairs[((r0 + i) * nb + b) * 4 + p]), mn);
    }
    const __m512 dmin = _mm512_load_ps((const float *)(slice + DMIN_AT(NG)));
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
    float *acc = (float *)(slice + SLICE_VECTORS), *mins = acc + rows * KP_LANES;
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
        for (int64_t r = 0; r < rows; r++) {
            __m512 v = _mm512_load_ps(acc + r * KP_LANES);
            if (type == Q4_K_TYPE) v = _mm512_sub_ps(v, _mm512_load_ps(mins + r * KP_LANES));
            _mm512_mask_storeu_ps(y + r * n + o, lanes, v);
        }
    }
}

int kpanel_dot_rows(int64_t type, const void *w, int64_t n, const ActRows *a, float *y, int64_t lo, int64_t hi) {
    if (type != Q4_K_TYPE && type != Q6_K_TYPE) return 0;
    const int64_t nb = a->k / QKK;
    const int64_t bytes = SLICE_VECTORS * 64 + 2 * a->rows * KP_LANES * (int64_t)sizeof(float) +
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

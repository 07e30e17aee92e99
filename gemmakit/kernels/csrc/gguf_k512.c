/* An unpacked super-block weight row (WRow of Q2_K..Q6_K, IQ4_XS: gguf_unpack.c) against many
 * activation rows (Q8_K) with 512-bit vectors: gguf_dot.c's k256_tile, two 32-value chunks per
 * instruction.
 *
 * Lane j of chunk c (values 4j..4j+3) is the low half's lane j of a 512-bit vector for the even
 * chunk of a pair and the high half's for the odd one; at the end of a super-block the halves
 * are added, which gives each lane's exact integer, the sum over the 8 chunks of the chunk's
 * 16-group scale times its values times x, as gguf_dot.c's 256-bit lanes hold it. The float
 * order is then k256_tile's: one fused multiply-add of (d_x * d) and the converted lanes per
 * super-block, the min term per row as there, and the same lane sum at the end: the same bits
 * (tests/test_gguf_dot.py compares with the AVX2 and scalar builds).
 *
 * AVX-512 has no vpsignb: x takes the weight's sign by a masked subtraction from 0 where the
 * weight is negative (where it is 0, |w| is 0 and the product 0 either way, as with vpsignb).
 */
#include "common.h"
#include "gguf_dot.h"

#pragma GCC optimize("fp-contract=off") /* gguf_dot.c's float order */

#ifdef GGUF_PANELS

enum { QK = 32, QKK = 256, K512_NR = 8 };

/* out[i * n] = w . activation row r0 + i for i < NR (constants at each call) */
ALWAYS_INLINE void k512_tile(const WRow *w, int64_t nb, const ActRows *a, int64_t r0, const int NR, float *out,
                             int64_t n, const int unsigned_values) {
    const int64_t k = a->k;
    __m256 acc[K512_NR], min_sums = _mm256_setzero_ps();
    for (int i = 0; i < NR; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i l[K512_NR];
        for (int i = 0; i < NR; i++) l[i] = _mm512_setzero_si512();
        for (int c = 0; c < 8; c += 2) {
            const int64_t chunk = 8 * b + c;
            const __m512i v = _mm512_loadu_si512(w->q + chunk * QK), abs_v = _mm512_abs_epi8(v);
            const __m512i scales = _mm512_loadu_si512(w->pair_scales + 16 * chunk);
            const __mmask64 negative = _mm512_movepi8_mask(v);
            for (int i = 0; i < NR; i++) {
                const __m512i x = _mm512_loadu_si512(a->q + (r0 + i) * k + chunk * QK);
                const __m512i signed_x = unsigned_values ? x : _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
                l[i] = _mm512_dpwssd_epi32(l[i], _mm512_maddubs_epi16(abs_v, signed_x), scales);
            }
        }
        for (int i = 0; i < NR; i++) {
            const __m256i lanes = _mm256_add_epi32(_mm512_castsi512_si256(l[i]), _mm512_extracti64x4_epi64(l[i], 1));
            const float xd = a->d[(r0 + i) * (k / QK) + b];
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(xd * w->d[b]), _mm256_cvtepi32_ps(lanes), acc[i]);
        }
        if (unsigned_values) { /* the types with a min: k256_tile's min terms, lane i row r0 + i */
            const __m256i mn = _mm256_loadu_si256((const __m256i *)(w->mn + b * 16));
            __m256i p[8];
            float xd[8];
            for (int i = 0; i < 8; i++) {
                p[i] = i < NR ? _mm256_madd_epi16(mn, _mm256_loadu_si256((const __m256i *)(a->bsums + (r0 + i) * (k / 16) + b * 16)))
                              : _mm256_setzero_si256();
                xd[i] = i < NR ? a->d[(r0 + i) * (k / QK) + b] : 0.f;
            }
            const __m256 xds = _mm256_setr_ps(xd[0], xd[1], xd[2], xd[3], xd[4], xd[5], xd[6], xd[7]);
            min_sums = _mm256_fmadd_ps(_mm256_mul_ps(xds, _mm256_set1_ps(w->m[b])), _mm256_cvtepi32_ps(row_sums8(p)), min_sums);
        }
    }
    float min_sum[8];
    _mm256_storeu_ps(min_sum, min_sums);
    for (int i = 0; i < NR; i++) out[i * n] = lanes_sum(acc[i]) - min_sum[i];
}

/* tile[r * cols + c] = weight row c . activation row r for every c < cols and row of a:
 * activation rows in tiles of K512_NR (16 KB of a 2048-wide Q8_K row tile: in L1) outer, the
 * unpacked weight rows (in L2) inner, each tile done fetching its share of the next weight
 * tile. Weight row outer instead read every activation row from L2 for every weight row: one
 * byte per multiply-add. */
ALWAYS_INLINE void k512_tile_rows(const WRow *rows, int64_t cols, int64_t nb, const ActRows *a, float *tile,
                                  const uint8_t *next, int64_t next_bytes, const int u) {
    const int64_t tiles = (a->rows + K512_NR - 1) / K512_NR;
    int64_t r = 0;
    for (; r + K512_NR <= a->rows; r += K512_NR) {
        for (int64_t c = 0; c < cols; c++) k512_tile(&rows[c], nb, a, r, K512_NR, tile + r * cols + c, cols, u);
        prefetch_share(next, next_bytes, r / K512_NR, tiles);
    }
    if (r == a->rows) return;
    for (int64_t c = 0; c < cols; c++) switch (a->rows - r) {
        case 7: k512_tile(&rows[c], nb, a, r, 7, tile + r * cols + c, cols, u); break;
        case 6: k512_tile(&rows[c], nb, a, r, 6, tile + r * cols + c, cols, u); break;
        case 5: k512_tile(&rows[c], nb, a, r, 5, tile + r * cols + c, cols, u); break;
        case 4: k512_tile(&rows[c], nb, a, r, 4, tile + r * cols + c, cols, u); break;
        case 3: k512_tile(&rows[c], nb, a, r, 3, tile + r * cols + c, cols, u); break;
        case 2: k512_tile(&rows[c], nb, a, r, 2, tile + r * cols + c, cols, u); break;
        default: k512_tile(&rows[c], nb, a, r, 1, tile + r * cols + c, cols, u);
        }
    prefetch_share(next, next_bytes, tiles - 1, tiles);
}

void k256_tile_512(const WRow *rows, int64_t cols, int64_t nb, const ActRows *a, float *tile, const uint8_t *next,
                   int64_t next_bytes) {
    if (rows[0].has_min) k512_tile_rows(rows, cols, nb, a, tile, next, next_bytes, 1); /* Q2_K, Q4_K, Q5_K: from 0 up */
    else k512_tile_rows(rows, cols, nb, a, tile, next, next_bytes, 0);
}

#else
typedef int gguf_k512_unused; /* an empty unit otherwise */
#endif

/* Q4_K and Q6_K weights against few activation rows (Q8_K blocks), read from the file's blocks in
 * registers: the decode step's product for the K-quant matrices of a Q4_K_M file.
 *
 * gguf_dot.c's super-block path unpacks each weight row into values, scales and vpmaddwd
 * operands in memory (gguf_unpack.c) and then dots it: with one activation row, measured on
 * a Q4_K 640 x 2048 (one thread, thread CPU time), the unpacking was 43% of the product. Here
 * each 32-byte load of a super-block's nibbles gives two 32-value chunks, its 6-bit scales and
 * mins are decoded as 32-bit words, and the integer lanes are the same exact integers as
 * gguf_dot.c's (lane j = the sum over the 8 chunks of the chunk's scale times its values
 * 4j..4j+3 times x), reduced to the super-block's integer and scaled and summed in the same
 * float order: per super-block one fused multiply-add of (d_x * d) and the converted integer,
 * and (Q4_K) one of (d_x * dmin) and the integer min term, then the first minus the second. A
 * row's result is therefore bit for bit what gguf_dot.c gives it, for any number of rows.
 */
#include "common.h"
#include "gguf_dot.h"

#pragma GCC optimize("fp-contract=off") /* gguf_dot.c's float order */

enum { QK = 32, QKK = 256, Q4_K_BYTES = 144, Q6_K_BYTES = 210, TILE_ROWS = 4 /* activation rows per tile */ };

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

/* out[i * n] = the super-block row (Q4_K: type 12, Q6_K: 14) . activation row r0 + i for i < NR
 * (both constants at each call) */
ALWAYS_INLINE void k_tile(const int type, const uint8_t *row, int64_t nb, const ActRows *a, int64_t r0, const int NR,
                          float *out, int64_t n) {
    const int64_t k = a->k, bytes = type == 12 ? Q4_K_BYTES : Q6_K_BYTES;
    __m256 acc = _mm256_setzero_ps(); /* lane i: row r0 + i */
    __m128 one_row = _mm_setzero_ps();  /* NR 1: lane 0 the row's float, lane 1 its min sum */
    float min_sum[TILE_ROWS];
    for (int i = 0; i < NR; i++) min_sum[i] = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *block = row + b * bytes;
        /* Q4_K: its 8 scales as 16 bits in both halves, chunk c's vpmaddwd operand is word c
         * everywhere; Q6_K: its 16 int8 scales as 16 bits, the 16-groups 2c and 2c + 1 of chunk c
         * (c < 4: the first 8 in both halves, else the last 8) word 2c in the low half, 2c + 1 in
         * the high one */
        uint64_t scales = 0, mins = 0;
        __m256i scales16[2], scales_all = _mm256_setzero_si256();
        if (type == 12) {
            q4_k_scales_mins(block + 4, &scales, &mins);
            scales16[0] = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)scales)));
        } else {
            scales_all = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(block + 192)));
            scales16[0] = _mm256_permute2x128_si256(scales_all, scales_all, 0x00);
            scales16[1] = _mm256_permute2x128_si256(scales_all, scales_all, 0x11);
        }
        /* even and odd chunks in two accumulators: half the dependent chain (exact integers) */
        __m256i l[2][TILE_ROWS];
        for (int i = 0; i < NR; i++) l[0][i] = l[1][i] = _mm256_setzero_si256();
        /* Q6_K's values as v + 32 (0..63) meet x unsigned, as Q4_K's do (no sign per pair: each
         * pair's sum stays within 2 * 63 * 127), and 32 * sum of scale * bsum comes off the
         * lanes after (exact integers) */
        _Pragma("GCC unroll 8") for (int c = 0; c < 8; c++) {
            const __m256i v = type == 12 ? q4_k_chunk(block, c) : q6_k_chunk_unsigned(block, c);
            /* vpshufb indices: the two bytes of word c (Q4_K) or of words 2(c % 4), 2(c % 4) + 1 */
            const int lo = type == 12 ? 2 * c : 4 * (c % 4), hi = type == 12 ? 2 * c : 4 * (c % 4) + 2;
            const __m256i scale = _mm256_shuffle_epi8(type == 12 ? scales16[0] : scales16[c / 4],
                                                      _mm256_set_m128i(_mm_set1_epi16((short)(hi | (hi + 1) << 8)),
                                                                       _mm_set1_epi16((short)(lo | (lo + 1) << 8))));
            for (int i = 0; i < NR; i++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(a->q + (r0 + i) * k + b * QKK + c * QK));
                const __m256i pairs = _mm256_maddubs_epi16(v, x);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
                l[c % 2][i] = _mm256_dpwssd_epi32(l[c % 2][i], pairs, scale);
#else
                l[c % 2][i] = _mm256_add_epi32(l[c % 2][i], _mm256_madd_epi16(pairs, scale));
#endif
            }
        }
        for (int i = 0; i < NR; i++) {
            l[0][i] = _mm256_add_epi32(l[0][i], l[1][i]);
            if (type == 14) { /* minus 32 * (scale * bsum) per 16-group, in lanes */
                const __m256i bsums = _mm256_loadu_si256((const __m256i *)(a->bsums + (r0 + i) * (k / 16) + b * 16));
                l[0][i] = _mm256_sub_epi32(l[0][i], _mm256_slli_epi32(_mm256_madd_epi16(scales_all, bsums), 5));
            }
        }
        /* Q4_K's d and dmin, as floats in lanes 0 and 1 (Q6_K: d in lane 0) */
        const __m128 scales_f = type == 12 ? _mm_cvtph_ps(_mm_cvtsi32_si128((int)le32(block)))
                                           : _mm_set_ss(half_to_float(block + 208));
        const __m128i mins8 = _mm_cvtsi64_si128((long long)mins);
        const __m256i mins16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mins8, mins8));
        if (NR == 1) { /* the super-block's integer (lane 0) and min term (lane 1) in one reduction */
            const __m256i m = type == 12 ? _mm256_madd_epi16(mins16, _mm256_loadu_si256((const __m256i *)(a->bsums + r0 * (k / 16) + b * 16)))
                                         : _mm256_setzero_si256();
            const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(l[0][0], m), _mm256_setzero_si256());
            const __m128i both = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)); /* (sumi, min sum, 0, 0) */
            const __m128 dd = _mm_mul_ps(_mm_set1_ps(a->d[r0 * (k / QK) + b]), scales_f);
            one_row = _mm_fmadd_ps(dd, _mm_cvtepi32_ps(both), one_row); /* lane 0 acc, lane 1 the min sum */
            continue;
        }
        const float d = _mm_cvtss_f32(scales_f);
        const float *xd_of = a->d + r0 * (k / QK) + b; /* row r0 + i's d at xd_of[i * (k / QK)] */
#define XD(i) ((i) < NR ? xd_of[(i) * (k / QK)] : 0.f)
        const __m256 xds = _mm256_setr_ps(XD(0), XD(1), XD(2), XD(3), 0.f, 0.f, 0.f, 0.f); /* NR <= TILE_ROWS = 4 */
#undef XD
        acc = _mm256_fmadd_ps(_mm256_mul_ps(xds, _mm256_set1_ps(d)), _mm256_cvtepi32_ps(row_sums(l[0], NR)), acc);
        if (type == 12) /* the min term: the sum of min * bsum over the 16-groups, exact */
            for (int i = 0; i < NR; i++) {
                const __m256i bsums = _mm256_loadu_si256((const __m256i *)(a->bsums + (r0 + i) * (k / 16) + b * 16));
                const __m256i m = _mm256_madd_epi16(mins16, bsums);
                __m128i s = _mm_add_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
                s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
                s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
                min_sum[i] = fmaf(xd_of[i * (k / QK)] * _mm_cvtss_f32(_mm_shuffle_ps(scales_f, scales_f, 1)),
                                  (float)_mm_cvtsi128_si32(s), min_sum[i]);
            }
    }
    if (NR == 1) {
        out[0] = _mm_cvtss_f32(one_row) - _mm_cvtss_f32(_mm_shuffle_ps(one_row, one_row, 1));
        return;
    }
    float rows_acc[8];
    _mm256_storeu_ps(rows_acc, acc);
    for (int i = 0; i < NR; i++) out[i * n] = rows_acc[i] - min_sum[i];
}

/* every activation row of a against the weight row, tiles of TILE_ROWS then the rest */
ALWAYS_INLINE void k_rows(const int type, const uint8_t *row, int64_t nb, const ActRows *a, float *y, int64_t n) {
    int64_t r = 0;
    for (; r + TILE_ROWS <= a->rows; r += TILE_ROWS) k_tile(type, row, nb, a, r, TILE_ROWS, y + r * n, n);
    switch (a->rows - r) {
    case 3: k_tile(type, row, nb, a, r, 3, y + r * n, n); break;
    case 2: k_tile(type, row, nb, a, r, 2, y + r * n, n); break;
    case 1: k_tile(type, row, nb, a, r, 1, y + r * n, n); break;
    }
}

int fused_k256(int64_t type, const uint8_t *w, int64_t nb, const ActRows *a, float *y, int64_t n, int64_t lo,
               int64_t hi) {
    if ((type != 12 && type != 14) || a->rows > FUSED_K_ROWS) return 0;
    const int64_t rb = nb * (type == 12 ? Q4_K_BYTES : Q6_K_BYTES); /* a row: in L1 for every tile after the first */
    for (int64_t o = lo; o < hi; o++) {
        if (type == 12) k_rows(12, w + o * rb, nb, a, y + o, n);
        else k_rows(14, w + o * rb, nb, a, y + o, n);
    }
    return 1;
}

#else
int fused_k256(int64_t type, const uint8_t *w, int64_t nb, const ActRows *a, float *y, int64_t n, int64_t lo,
               int64_t hi) {
    (void)type, (void)w, (void)nb, (void)a, (void)y, (void)n, (void)lo, (void)hi;
    return 0;
}
#endif

/* Q4_K and Q6_K weights against few activation rows (Q8_K blocks), read from the file's blocks in
 * registers: the decode step's product for the K-quant matrices of a Q4_K_M file.
 *
 * gguf_dot.c's super-block path unpacks each weight row into values, scales and vpmaddwd
 * operands in memory (gguf_unpack.c) and then dots it: with one activation row, measured on
 * a Q4_K 640 x 2048 (one thread, thread CPU time), the unpacking was 43% of the product. Here
 * each 32-byte load of a super-block's nibbles gives two 32-value chunks, its 6-bit scales and
 * mins are decoded as 32-bit words, and the integer lanes are the same exact integers as
 * gguf_dot.c's (lane j = the sum over the 8 chunks of the chunk's scale times its values
 * 4j..4j+3 times x), scaled and summed in the same float order: per super-block one fused
 * multiply-add of (d_x * d) and the converted lanes, and (Q4_K) one of (d_x * dmin) and the
 * integer min term, then (l0 + l4) + (l2 + l6) + ((l1 + l5) + (l3 + l7)) minus the min sum. A row's
 * result is therefore bit for bit what gguf_dot.c gives it, for any number of rows.
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
    __m256 acc[TILE_ROWS];
    float min_sum[TILE_ROWS];
    for (int i = 0; i < NR; i++) acc[i] = _mm256_setzero_ps(), min_sum[i] = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *block = row + b * bytes;
        /* Q4_K: its 8 scales as 16 bits in both halves, chunk c's vpmaddwd operand is word c
         * everywhere; Q6_K: its 16 int8 scales as 16 bits, the 16-groups 2c and 2c + 1 of chunk c
         * (c < 4: the first 8 in both halves, else the last 8) word 2c in the low half, 2c + 1 in
         * the high one */
        uint64_t scales = 0, mins = 0;
        __m256i scales16[2];
        if (type == 12) {
            q4_k_scales_mins(block + 4, &scales, &mins);
            scales16[0] = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)scales)));
        } else {
            const __m256i all = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(block + 192)));
            scales16[0] = _mm256_permute2x128_si256(all, all, 0x00);
            scales16[1] = _mm256_permute2x128_si256(all, all, 0x11);
        }
        /* even and odd chunks in two accumulators: half the dependent chain (exact integers) */
        __m256i l[TILE_ROWS], l_odd[TILE_ROWS];
        for (int i = 0; i < NR; i++) l[i] = l_odd[i] = _mm256_setzero_si256();
        _Pragma("GCC unroll 8") for (int c = 0; c < 8; c++) {
            const __m256i v = type == 12 ? q4_k_chunk(block, c) : q6_k_chunk(block, c);
            /* vpshufb indices: the two bytes of word c (Q4_K) or of words 2(c % 4), 2(c % 4) + 1 */
            const int lo = type == 12 ? 2 * c : 4 * (c % 4), hi = type == 12 ? 2 * c : 4 * (c % 4) + 2;
            const __m256i scale = _mm256_shuffle_epi8(type == 12 ? scales16[0] : scales16[c / 4],
                                                      _mm256_set_m128i(_mm_set1_epi16((short)(hi | (hi + 1) << 8)),
                                                                       _mm_set1_epi16((short)(lo | (lo + 1) << 8))));
            const __m256i abs_v = type == 12 ? v : _mm256_sign_epi8(v, v); /* Q4_K's values are >= 0 */
            for (int i = 0; i < NR; i++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(a->q + (r0 + i) * k + b * QKK + c * QK));
                const __m256i pairs = _mm256_maddubs_epi16(abs_v, type == 12 ? x : _mm256_sign_epi8(x, v));
                __m256i *sum = c % 2 ? &l_odd[i] : &l[i];
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
                *sum = _mm256_dpwssd_epi32(*sum, pairs, scale);
#else
                *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, scale));
#endif
            }
        }
        for (int i = 0; i < NR; i++) l[i] = _mm256_add_epi32(l[i], l_odd[i]);
        const float d = half_to_float(block + (type == 12 ? 0 : 208));
        for (int i = 0; i < NR; i++) {
            const float xd = a->d[(r0 + i) * (k / QK) + b];
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(xd * d), _mm256_cvtepi32_ps(l[i]), acc[i]);
            if (type == 12) { /* the min term: the sum of min * bsum over the 16-groups, exact */
                const __m128i mins8 = _mm_cvtsi64_si128((long long)mins);
                const __m256i mins16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mins8, mins8));
                const __m256i bsums = _mm256_loadu_si256((const __m256i *)(a->bsums + (r0 + i) * (k / 16) + b * 16));
                const __m256i m = _mm256_madd_epi16(mins16, bsums);
                __m128i s = _mm_add_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
                s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
                s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
                min_sum[i] = fmaf(xd * half_to_float(block + 2), (float)_mm_cvtsi128_si32(s), min_sum[i]);
            }
        }
    }
    for (int i = 0; i < NR; i++) out[i * n] = lanes_sum(acc[i]) - min_sum[i];
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

/* GPTQ / AWQ 4-bit weights in the decode steps: W_PACKED4 matrices (gemmakit_kernels.h).
 *
 * A weight row is dequantized once into a float buffer, exactly: w = q * scale + min with
 * min = -zero * scale, q in 0..15 and scale an fp16 value, is (q - zero) * scale with no
 * rounding at all (an fp16 significand times a 5-bit integer fits float32's 24 bits), so the
 * buffer holds the very floats the torch module's `dequantize()` gives. Each activation row
 * is then one dot_f32 against that buffer: a row's output is the float32 model's matvec over
 * the dequantized weight, bit for bit, whatever the number of rows in the step (the decode
 * steps' "same alone or batched"), and the packed bytes are read once for all rows.
 *
 * Layout (gemmakit/quant/packed4.py `c_layout`): row n holds k / 2 bytes in chunks of 32
 * columns, byte j of a chunk = column j (low nibble) | column j + 16 (high nibble), so one
 * 16-byte load widens to two vectors of consecutive columns. Columns are in group order; for
 * an act-order weight perm[c] is the input column of stored column c. The products gather
 * each activation row into stored order once per call (x'[c] = x[perm[c]]) and dot it with
 * the rows as stored: scattering every dequantized value to its input column instead cost
 * act-order GPTQ almost half its decode speed (20.0 against AWQ's 36.2 tok/s, note.md).
 * The sum then runs in stored order, still one fixed order per output, so a row's result
 * does not depend on the other rows. The embedding-style row reads (`mat_row`) scatter. */
#include <stdlib.h>

#include "gemv.h"

#define CHUNK 32 /* columns per 16 packed bytes */

/* out[0..32) = q * s + m over one chunk's 16 bytes */
ALWAYS_INLINE void dequantize_chunk(const uint8_t *q, float s, float m, float *out) {
#if defined(__AVX512F__)
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    const __m512 S = _mm512_set1_ps(s), M = _mm512_set1_ps(m);
    const __m512i low = _mm512_and_si512(v, _mm512_set1_epi32(15));
    _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(low), S, M));
    _mm512_storeu_ps(out + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), S, M));
#elif defined(__AVX2__)
    const __m256 S = _mm256_set1_ps(s), M = _mm256_set1_ps(m);
    for (int h = 0; h < 16; h += 8) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + h)));
        const __m256 low = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
        const __m256 high = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
        /* q * s is exact, so a separate multiply and add round as the fused form does */
        _mm256_storeu_ps(out + h, _mm256_add_ps(_mm256_mul_ps(low, S), M));
        _mm256_storeu_ps(out + 16 + h, _mm256_add_ps(_mm256_mul_ps(high, S), M));
    }
#else
    for (int j = 0; j < 16; j++) {
        out[j] = (float)(q[j] & 15) * s + m;
        out[j + 16] = (float)(q[j] >> 4) * s + m;
    }
#endif
}

/* row n of the matrix in stored (group) order: no scatter */
static void dequantize_stored_row(const Packed4 *p, int64_t k, int64_t n, float *out) {
    const int64_t groups = k / p->group_size;
    const uint8_t *q = p->q + n * (k / 2);
    const float *scale = p->scale + n * groups, *min = p->min + n * groups;
    for (int64_t c = 0; c < k; c += CHUNK) {
        const int64_t g = c / p->group_size;
        dequantize_chunk(q + c / 2, scale[g], min[g], out + c);
    }
}

/* out (k floats) = row n of the matrix, in input-column order */
static void dequantize_row(const Packed4 *p, int64_t k, int64_t n, float *out) {
    if (!p->perm) {
        dequantize_stored_row(p, k, n, out);
        return;
    }
    const int64_t groups = k / p->group_size;
    const uint8_t *q = p->q + n * (k / 2);
    const float *scale = p->scale + n * groups, *min = p->min + n * groups;
    for (int64_t c = 0; c < k; c += CHUNK) {
        float chunk[CHUNK];
        dequantize_chunk(q + c / 2, scale[c / p->group_size], min[c / p->group_size], chunk);
        for (int j = 0; j < CHUNK; j++) out[p->perm[c + j]] = chunk[j];
    }
}

int64_t packed4_supported(int64_t k, int64_t group_size) {
    return k > 0 && group_size > 0 && group_size % CHUNK == 0 && k % group_size == 0;
}

void packed4_dequantize_rows(const Packed4 *p, int64_t k, float *out, int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; n++) dequantize_row(p, k, n, out + (n - lo) * k);
}

/* x' = row r of x in stored-column order */
static void gather_row(const Packed4 *p, int64_t k, const float *x, float *out) {
    for (int64_t c = 0; c < k; c++) out[c] = x[p->perm[c]];
}

void packed4_matmul_rows(const Packed4 *p, int64_t n, int64_t k, const float *x, int64_t rows, float *y,
                         int64_t lo, int64_t hi) {
    float w[k]; /* one dequantized row: k floats on the stack (86 KB for a 21504-wide matrix) */
    const float *xs = x;
    float *gathered = p->perm ? malloc(sizeof(float) * rows * k) : NULL;
    if (p->perm && !gathered) { /* no memory for all of x': one row at a time, the same sums */
        float xr[k];
        for (int64_t i = lo; i < hi; i++) {
            dequantize_stored_row(p, k, i, w);
            for (int64_t r = 0; r < rows; r++) {
                gather_row(p, k, x + r * k, xr);
                y[r * n + i] = dot_f32(xr, w, k);
            }
        }
        return;
    }
    if (gathered) {
        for (int64_t r = 0; r < rows; r++) gather_row(p, k, x + r * k, gathered + r * k);
        xs = gathered;
    }
    for (int64_t i = lo; i < hi; i++) {
        dequantize_stored_row(p, k, i, w);
        for (int64_t r = 0; r < rows; r++) y[r * n + i] = dot_f32(xs + r * k, w, k);
    }
    free(gathered);
}

/* NF4 dequantization: QLoRA's frozen base weight from bitsandbytes' layout. */
#include "common.h"

/* NF4 dequantization (QLoRA's frozen base, gemmakit/quant/linear.py NF4Linear): value j of the
 * weight is code[nibble j] * absmax[j / 64], one float32 product, the nibbles packed two to a
 * byte with the first in the high nibble (bitsandbytes' layout), rounded once to bfloat16 when
 * bf16 != 0: bitsandbytes' dequantize_4bit in float32 followed by .to(bfloat16), bit for bit.
 * Over the 64-value blocks [lo, hi) of n values; code holds the 16 float32 levels. bitsandbytes'
 * CPU fallback (torch ops), measured on a 2-core CPU, took ~1.1 ms per projection of Gemma 3
 * 270M, and a LoRA step dequantizes each projection twice (forward and backward). */
void nf4_dequantize(const uint8_t *packed, const float *absmax, const float *code, void *out, int64_t n, int64_t lo,
                    int64_t hi, int64_t bf16) {
    for (int64_t b = lo; b < hi; b++) {
        const int64_t start = b * 64, stop = start + 64 < n ? start + 64 : n;
        const float scale = absmax[b];
        int64_t j = start;
#ifdef AVX512_TRAIN
        if (stop - start == 64) {
            /* 8 bytes -> 16 values: lane k reads byte k / 2, the high nibble for even k */
            const __m512 table = _mm512_loadu_ps(code), vs = _mm512_set1_ps(scale);
            const __m512i byte_of_lane = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
            const __m512i shift = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
            for (; j < stop; j += 16) {
                const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(packed + j / 2)));
                const __m512i nibble = _mm512_and_si512(
                    _mm512_srlv_epi32(_mm512_permutexvar_epi32(byte_of_lane, bytes), shift), _mm512_set1_epi32(15));
                const __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(nibble, table), vs);
                if (bf16)
                    store16(out, j, v, 1, 0xFFFF);
                else
                    store16(out, j, v, 0, 0xFFFF);
            }
        }
#endif
        for (; j < stop; j++) {
            const uint8_t byte = packed[j / 2];
            put_f(out, j, code[(j & 1) ? (byte & 15) : (byte >> 4)] * scale, bf16);
        }
    }
}

/* LoRA's input dropout with a mask rebuilt from a seed instead of stored. */
#include "common.h"

/* Dropout with a counter-based mask, for LoRA training: element i is kept
 * when a 32-bit hash of (seed, i) is at least `threshold` (= p * 2^32, so P(drop) = p within
 * 2^-32), and kept values are multiplied by `scale` (1 / (1 - p)). The mask is a function of
 * the seed and the index alone, so the backward rebuilds it instead of storing it, and any
 * split of [start, stop) over threads gives the same result. The hash is splitmix64's
 * finalizer (Steele, Lea, Flood, "Fast splittable pseudorandom number generators", 2014)
 * over seed + pair index; each 64-bit hash serves two elements. */
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline uint32_t mask_bits(uint64_t seed, int64_t i) {
    uint64_t h = mix64(seed + (uint64_t)(i >> 1) * 0x9E3779B97F4A7C15ULL);
    return (i & 1) ? (uint32_t)(h >> 32) : (uint32_t)h;
}

#ifdef AVX512_TRAIN
/* mix64 on 8 lanes */
static inline __m512i mix64x8(__m512i z) {
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), _mm512_set1_epi64((int64_t)0xBF58476D1CE4E5B9ULL));
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), _mm512_set1_epi64((int64_t)0x94D049BB133111EBULL));
    return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}

/* dropout's vector loop over whole 16-element blocks from an even i; returns where it stopped.
 * 8 64-bit hashes of pairs i/2 .. i/2+7 seen as 16 32-bit lanes are mask_bits(seed, i .. i+15)
 * in order (little-endian: lane 2k is pair k's low half, lane 2k+1 its high half). */
ALWAYS_INLINE int64_t dropout16(const void *x, void *out, int64_t i, int64_t stop, uint64_t seed, uint32_t threshold,
                                float scale, const int bf16) {
    const uint64_t golden = 0x9E3779B97F4A7C15ULL;
    __m512i z = _mm512_add_epi64(_mm512_set1_epi64((int64_t)(seed + (uint64_t)(i >> 1) * golden)),
                                 _mm512_mullo_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0),
                                                    _mm512_set1_epi64((int64_t)golden)));
    const __m512i step = _mm512_set1_epi64((int64_t)(8 * golden));
    const __m512i thr = _mm512_set1_epi32((int)threshold);
    const __m512 vscale = _mm512_set1_ps(scale);
    if (bf16) /* 32 at a time: one 64-byte store */
        for (; i + 32 <= stop; i += 32) {
            const __mmask16 keep0 = _mm512_cmpge_epu32_mask(mix64x8(z), thr);
            z = _mm512_add_epi64(z, step);
            const __mmask16 keep1 = _mm512_cmpge_epu32_mask(mix64x8(z), thr);
            z = _mm512_add_epi64(z, step);
            store32_bf16((uint16_t *)out + i, _mm512_maskz_mul_ps(keep0, load16(x, i, 1, 0xFFFF), vscale),
                         _mm512_maskz_mul_ps(keep1, load16(x, i + 16, 1, 0xFFFF), vscale));
        }
    for (; i + 16 <= stop; i += 16) {
        const __mmask16 keep = _mm512_cmpge_epu32_mask(mix64x8(z), thr);
        z = _mm512_add_epi64(z, step);
        /* dropped lanes are +0, as the scalar loop's 0 */
        store16(out, i, _mm512_maskz_mul_ps(keep, load16(x, i, bf16, 0xFFFF), vscale), bf16, 0xFFFF);
    }
    return i;
}
#endif

static void dropout_scalar(const void *x, void *out, int64_t i, int64_t stop, uint64_t seed, uint32_t threshold,
                           float scale, int64_t bf16) {
    if (bf16) {
        const uint16_t *src = (const uint16_t *)x;
        uint16_t *dst = (uint16_t *)out;
        for (; i < stop; i++)
            dst[i] = mask_bits(seed, i) >= threshold ? f32_to_bf16(bf16_to_f32(src[i]) * scale) : 0;
    } else {
        const float *src = (const float *)x;
        float *dst = (float *)out;
        for (; i < stop; i++) dst[i] = mask_bits(seed, i) >= threshold ? src[i] * scale : 0.0f;
    }
}

/* out = x * keep * scale over [start, stop); x and out float32 or (bf16 != 0) bfloat16 and
 * may be the same buffer. The vector loop gives the scalar loop's bits (the same hash, one
 * float32 product, rounding to nearest even; only a NaN's payload may differ, see
 * bf16_rne_bits), so neither the mask nor the values depend on how [start, stop) is split. */
void dropout(const void *x, void *out, int64_t start, int64_t stop, uint64_t seed, uint32_t threshold,
             float scale, int64_t bf16) {
    int64_t i = start;
#ifdef AVX512_TRAIN
    const int64_t from = start + (start & 1); /* the blocks start on a pair */
    if (from + 16 <= stop) {
        dropout_scalar(x, out, start, from, seed, threshold, scale, bf16);
        i = bf16 ? dropout16(x, out, from, stop, seed, threshold, scale, 1)
                 : dropout16(x, out, from, stop, seed, threshold, scale, 0);
    }
#endif
    dropout_scalar(x, out, i, stop, seed, threshold, scale, bf16);
}

/* Helpers every kernel unit shares (internal: not part of the library's interface, which is
 * gemmakit_kernels.h): bfloat16 <-> float32 conversions with torch's rounding, element access
 * to float32-or-bfloat16 arrays, the AVX-512 loads, stores and roundings of the training
 * kernels' vector paths, and a vector e^x.
 *
 * Every function here is static inline, so each unit inlines its own copy. The vector paths
 * need AVX-512 (F, BW, DQ, VL: AVX512_TRAIN below); RMSNorm's sum of squares needs only AVX2
 * (norm.c); elsewhere the scalar loops run.
 */
#ifndef GEMMAKIT_COMMON_H
#define GEMMAKIT_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "gemmakit_kernels.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* a portable form that a vector build replaces (kept compiled: the scalar build runs it) */
#define PORTABLE_FORM __attribute__((unused))

#ifdef __AVX2__
/* keeps the compiler from fusing v, a product, into the addition it feeds (GCC's default
 * -ffp-contract=fast would) where torch rounds the product first */
#define ROUNDED(v) __asm__("" : "+v"(v))
#endif

/* a spinning thread's pause between polls */
static inline void spin_pause(void) {
#ifdef __AVX512F__
    _mm_pause();
#endif
}


/* bfloat16 is the top half of a float32: widening is exact */
static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* round to nearest even, as torch's float -> bfloat16 cast does (finite values) */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#ifdef __AVX512F__
static inline __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#endif

/* The training kernels' vector paths (dropout, RMSNorm, GeGLU) also use AVX-512 BW and VL
 * (masked 16-bit loads for row tails) and DQ (64-bit multiplies for the dropout hash), which
 * every AVX-512 CPU since Skylake-SP has; elsewhere they run their scalar loops. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define AVX512_TRAIN 1

/* lanes [0, n) of a 16-lane mask, n clamped to [0, 16]: the tail of a row in one masked step */
static inline __mmask16 first_lanes(int64_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

/* f32_to_bf16's integer round-to-nearest-even on 16 lanes, bit for bit, left in the top
 * halves of the lanes. Where the CPU has AVX512-BF16, its conversions (vcvtneps2bf16) round
 * the same way (to nearest even) and are used instead: the same bits for every non-NaN value,
 * and a NaN stays a NaN (f32_to_bf16 can carry some NaN payloads into -0 or infinity). */
static inline __m512i bf16_rne_bits(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    return _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                                 _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
}

/* v rounded to bfloat16 and widened back: torch's bfloat16 intermediates inside float32 maths */
static inline __m512 round_bf16(__m512 v) {
#ifdef __AVX512BF16__
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
#else
    return _mm512_castsi512_ps(_mm512_and_si512(bf16_rne_bits(v), _mm512_set1_epi32((int)0xFFFF0000u)));
#endif
}

/* a then b, 32 floats, rounded to bfloat16 at p */
static inline void store32_bf16(uint16_t *p, __m512 a, __m512 b) {
#ifdef __AVX512BF16__
    _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(b, a));
#else
    const __m512i odd_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29,
                                               27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    _mm512_storeu_si512(p, _mm512_permutex2var_epi16(bf16_rne_bits(a), odd_words, bf16_rne_bits(b)));
#endif
}

/* 16 float32 or (bf16) bfloat16 values from element i of p, lanes outside m read as 0 */
ALWAYS_INLINE __m512 load16(const void *p, int64_t i, const int bf16, __mmask16 m) {
    if (bf16)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i)), 16));
    return _mm512_maskz_loadu_ps(m, (const float *)p + i);
}

/* stores the lanes m of v at element i of p, as float32 or (bf16) rounded as f32_to_bf16 */
ALWAYS_INLINE void store16(void *p, int64_t i, __m512 v, const int bf16, __mmask16 m) {
    if (bf16)
#ifdef __AVX512BF16__
        _mm256_mask_storeu_epi16((uint16_t *)p + i, m, (__m256i)_mm512_cvtneps_pbh(v));
#else
        _mm256_mask_storeu_epi16((uint16_t *)p + i, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_rne_bits(v), 16)));
#endif
    else
        _mm512_mask_storeu_ps((float *)p + i, m, v);
}
#endif

/* 16 floats loaded as floats: the float32 case of the dot and weighted-sum macros */
#define LOAD_F32(p) _mm512_loadu_ps(p)
#define SAME_F32(v) (v)

#ifdef __AVX512F__
/* e^x for 16 floats (x <= 88): x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, Cephes'
 * expf), e^r by its degree-7 Taylor polynomial (truncation r^8/8! < 5.3e-9 relative, a
 * twentieth of a float32 ulp: GeGLU's tanh has its last bit depend on it), scaled by 2^n.
 * Inputs below -88 give 0 or a denormal, as expf does. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-104.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* element i of a float32 or (bf16) bfloat16 array, as float */
static inline float get_f(const void *p, int64_t i, int64_t bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void put_f(void *p, int64_t i, float v, int64_t bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

#endif

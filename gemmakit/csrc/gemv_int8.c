/* y[n] = s[n] * sum_k x[k] * w[n, k] for rows n in [start, stop): one token times an int8
 * weight-only matrix with a float32 scale per row, accumulated in float32.
 *
 * This is the decode step's output projection (Gemma 3 270M: 262144 x 640 int8 = 168 MB read
 * per token). torch's _weight_int8pack_mm takes 6.4 ms for it on the 2-core AVX512 machine
 * and needs bfloat16 activations; this loop streams the rows at memory speed (2.7 ms with
 * two threads, each given half the rows by gemmakit/cpu_kernels.py).
 *
 * Built at first use with the machine's C compiler and -march=native; without AVX-512 the
 * plain loop below is what the compiler vectorizes.
 */
#include <stdint.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

void gemv_int8(const float *x, const int8_t *w, const float *s, float *y, int64_t start, int64_t stop,
               int64_t K) {
    for (int64_t n = start; n < stop; n++) {
        const int8_t *row = w + n * K;
        int64_t k = 0;
        float acc = 0.f;
#ifdef __AVX512F__
        /* Four independent accumulators hide the FMA latency; each step widens 16 int8
         * weights to float32 and multiplies them into the matching 16 activations. */
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
#define WIDEN(off) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + k + (off)))))
        for (; k + 64 <= K; k += 64) {
            a0 = _mm512_fmadd_ps(WIDEN(0), _mm512_loadu_ps(x + k), a0);
            a1 = _mm512_fmadd_ps(WIDEN(16), _mm512_loadu_ps(x + k + 16), a1);
            a2 = _mm512_fmadd_ps(WIDEN(32), _mm512_loadu_ps(x + k + 32), a2);
            a3 = _mm512_fmadd_ps(WIDEN(48), _mm512_loadu_ps(x + k + 48), a3);
        }
#undef WIDEN
        acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
        for (; k < K; k++) acc += x[k] * (float)row[k];
        y[n] = acc * s[n];
    }
}

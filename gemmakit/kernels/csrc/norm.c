/* RMSNorm's forward (torch's bits) and input gradient, for training; the decode step's norms
 * use the same forward. */
#include "common.h"

#ifdef __AVX2__

/* x[o + 8 j .. o + 8 j + 7]^2, each square rounded as torch's x.pow(2) */
ALWAYS_INLINE __m256 squares8(const void *x, int64_t o, int64_t j, const int bf16) {
    const __m256 v = bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + o + 8 * j))), 16))
                          : _mm256_loadu_ps((const float *)x + o + 8 * j);
    __m256 sq = _mm256_mul_ps(v, v);
    ROUNDED(sq);
    return sq;
}

/* element k of x squared, rounded */
ALWAYS_INLINE float square1(const void *x, int64_t k, const int bf16) {
    const float v = get_f(x, k, bf16);
    float sq = v * v;
    ROUNDED(sq);
    return sq;
}

/* sum of x[o .. o + C)^2 in the order torch's CPU sum adds a contiguous float32 row
 * (aten/src/ATen/native/cpu/SumKernel.cpp: vectorized_inner_sum, row_sum, multi_row_sum),
 * so that rstd, and with it y, are torch's to the bit: vectors of 8 (what torch 2.13 adds
 * with on AVX2 and on AVX-512 CPUs, checked bit for bit on both; AVX2 is all this needs),
 * vector 4i + k into accumulator k, in chunks
 * of 16 summed level by level, the leftover vectors into accumulator 0, the four added in
 * order, then the leftover elements one by one and the 8 lanes in order. Rows under 8
 * elements take torch's scalar row_sum. */
ALWAYS_INLINE float sum_squares_torch(const void *x, int64_t o, int64_t C, const int bf16) {
    const int64_t V = C / 8;
    if (V == 0) {
        float acc[4] = {0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 4 <= C; i += 4)
            for (int k = 0; k < 4; k++) acc[k] += square1(x, o + i + k, bf16);
        for (; i < C; i++) acc[0] += square1(x, o + i, bf16);
        return ((acc[0] + acc[1]) + acc[2]) + acc[3];
    }
    const int64_t n = V / 4; /* groups of 4 vectors */
    int64_t ceil_log2 = 0;
    while (((int64_t)1 << ceil_log2) < n) ceil_log2++;
    const int64_t power = ceil_log2 / 4 > 4 ? ceil_log2 / 4 : 4, step = (int64_t)1 << power, mask = step - 1;
    __m256 acc[4][4];
    for (int l = 0; l < 4; l++)
        for (int k = 0; k < 4; k++) acc[l][k] = _mm256_setzero_ps();
    int64_t i = 0;
    while (i + step <= n) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], squares8(x, o, 4 * i + k, bf16));
        for (int l = 1; l < 4; l++) {
            for (int k = 0; k < 4; k++) {
                acc[l][k] = _mm256_add_ps(acc[l][k], acc[l - 1][k]);
                acc[l - 1][k] = _mm256_setzero_ps();
            }
            if (i & (mask << (l * power))) break;
        }
    }
    for (; i < n; i++)
        for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], squares8(x, o, 4 * i + k, bf16));
    for (int l = 1; l < 4; l++)
        for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], acc[l][k]);
    for (int64_t j = 4 * n; j < V; j++) acc[0][0] = _mm256_add_ps(acc[0][0], squares8(x, o, j, bf16));
    const __m256 total = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0][0], acc[0][1]), acc[0][2]), acc[0][3]);
    float sum = 0.f, lanes[8];
    for (int64_t k = 8 * V; k < C; k++) sum += square1(x, o + k, bf16);
    _mm256_storeu_ps(lanes, total);
    for (int k = 0; k < 8; k++) sum += lanes[k];
    return sum;
}

#endif
#ifdef AVX512_TRAIN
ALWAYS_INLINE void rms_norm_forward16(const void *x, const float *gain, void *y, float *rstd, int64_t C, float eps,
                                      int64_t lo, int64_t hi, const int bf16) {
    for (int64_t r = lo; r < hi; r++) {
        const int64_t o = r * C;
        const float rs = 1.f / sqrtf(sum_squares_torch(x, o, C, bf16) / (float)C + eps);
        rstd[r] = rs;
        const __m512 vrs = _mm512_set1_ps(rs);
        for (int64_t i = 0; i < C; i += 16) {
            const __mmask16 m = first_lanes(C - i);
            const __m512 v = _mm512_mul_ps(_mm512_mul_ps(load16(x, o + i, bf16, m), vrs), _mm512_maskz_loadu_ps(m, gain + i));
            store16(y, o + i, v, bf16, m);
        }
    }
}

ALWAYS_INLINE void rms_norm_backward16(const void *g, const void *x, const float *rstd, const float *gain, void *dx,
                                       int64_t C, int64_t lo, int64_t hi, const int bf16) {
    for (int64_t r = lo; r < hi; r++) {
        const int64_t o = r * C;
        const __m512 rs = _mm512_set1_ps(rstd[r]);
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int64_t i = 0; i < C; i += 32) {
            const __mmask16 m0 = first_lanes(C - i), m1 = first_lanes(C - i - 16);
            const __m512 gy0 = _mm512_mul_ps(load16(g, o + i, bf16, m0), _mm512_maskz_loadu_ps(m0, gain + i));
            const __m512 gy1 = _mm512_mul_ps(load16(g, o + i + 16, bf16, m1), _mm512_maskz_loadu_ps(m1, gain + i + 16));
            a0 = _mm512_fmadd_ps(gy0, _mm512_mul_ps(load16(x, o + i, bf16, m0), rs), a0);
            a1 = _mm512_fmadd_ps(gy1, _mm512_mul_ps(load16(x, o + i + 16, bf16, m1), rs), a1);
        }
        const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) / (float)C);
        /* the row is still in L1: reading it again is cheaper than keeping gy and xhat */
        for (int64_t i = 0; i < C; i += 16) {
            const __mmask16 m = first_lanes(C - i);
            const __m512 gy = _mm512_mul_ps(load16(g, o + i, bf16, m), _mm512_maskz_loadu_ps(m, gain + i));
            const __m512 xh = _mm512_mul_ps(load16(x, o + i, bf16, m), rs);
            store16(dx, o + i, _mm512_mul_ps(rs, _mm512_fnmadd_ps(xh, mean, gy)), bf16, m);
        }
    }
}
#endif

/* RMSNorm over rows [lo, hi) of C values, for training (the model's RMSNorm): rstd[r] =
 * 1 / sqrt(mean(x^2) + eps) and y = (x * rstd) * gain, in float32 and rounded once to x's
 * dtype (float32 or, bf16 != 0, bfloat16), as torch's aten::_fused_rms_norm of x.float()
 * (on the CPU: x.pow(2).mean(-1) + eps, rsqrt, two products) followed by .to(dtype); gain is
 * the float32 (1 + w). With AVX2 the squares are added in torch's order (sum_squares_torch,
 * 8-lane vectors as torch's AVX2 and AVX-512 builds use) and y is torch's to the bit; a CPU
 * without AVX2 adds them in 16 interleaved partial sums, and rstd may differ from torch's in
 * its last bit. One pass instead of torch's upcast copy, ~5 ops and downcast. */
void rms_norm_forward(const void *x, const float *gain, void *y, float *rstd, int64_t C, double eps, int64_t lo,
                      int64_t hi, int64_t bf16) {
    /* torch adds eps to the float32 mean as a float32 */
    const float e = (float)eps;
#ifdef AVX512_TRAIN
    if (bf16)
        rms_norm_forward16(x, gain, y, rstd, C, e, lo, hi, 1);
    else
        rms_norm_forward16(x, gain, y, rstd, C, e, lo, hi, 0);
#else
    for (int64_t r = lo; r < hi; r++) {
#ifdef __AVX2__
        const float ss = sum_squares_torch(x, r * C, C, (int)bf16);
#else
        float part[16] = {0};
        for (int64_t i = 0; i < C; i++) {
            const float xi = get_f(x, r * C + i, bf16);
            part[i & 15] += xi * xi;
        }
        float ss = 0.f;
        for (int k = 0; k < 16; k++) ss += part[k];
#endif
        const float rs = 1.f / sqrtf(ss / (float)C + e);
        rstd[r] = rs;
        for (int64_t i = 0; i < C; i++) put_f(y, r * C + i, (get_f(x, r * C + i, bf16) * rs) * gain[i], bf16);
    }
#endif
}

/* RMSNorm's input gradient over rows [lo, hi) of C values, for training (the model's RMSNorm):
 * with xhat = x * rstd and gy = g * gain, dx = rstd * (gy - xhat * mean(gy * xhat)), in
 * float32; g, x and dx are float32 or (bf16 != 0) bfloat16, rstd one float32 per row, gain
 * the float32 (1 + w). torch has no CPU kernel for this (aten::_fused_rms_norm_backward is
 * CUDA-only), and its autograd of F.rms_norm takes ~12 element-wise ops. */
void rms_norm_backward(const void *g, const void *x, const float *rstd, const float *gain, void *dx, int64_t C,
                       int64_t lo, int64_t hi, int64_t bf16) {
#ifdef AVX512_TRAIN
    if (bf16)
        rms_norm_backward16(g, x, rstd, gain, dx, C, lo, hi, 1);
    else
        rms_norm_backward16(g, x, rstd, gain, dx, C, lo, hi, 0);
#else
    for (int64_t r = lo; r < hi; r++) {
        const float rs = rstd[r];
        float part[16] = {0};
        for (int64_t i = 0; i < C; i++)
            part[i & 15] += (get_f(g, r * C + i, bf16) * gain[i]) * (get_f(x, r * C + i, bf16) * rs);
        float dot = 0.f;
        for (int k = 0; k < 16; k++) dot += part[k];
        const float mean = dot / (float)C;
        for (int64_t i = 0; i < C; i++) {
            const float gy = get_f(g, r * C + i, bf16) * gain[i], xh = get_f(x, r * C + i, bf16) * rs;
            put_f(dx, r * C + i, rs * (gy - xh * mean), bf16);
        }
    }
#endif
}

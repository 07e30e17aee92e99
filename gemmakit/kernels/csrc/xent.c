/* The cross-entropy gradient of a chunk of bfloat16 logits, in place, for training's loss. */
#include "common.h"

/* Softmax cross-entropy gradient over rows [lo, hi) of bfloat16 logits z (rows of V), in
 * place, for training's chunked loss (gemmakit/training/loss.py): lse[r] = log sum_v e^z[r,v],
 * then z[r] = softmax(z[r]) - onehot(targets[r]) rounded once to bfloat16, all arithmetic in
 * float32 (sums of blocks of 1024 added in double). Replaces torch's log_softmax, exp and
 * cast passes over a float32 copy of the logits. */
void softmax_xent_bf16(uint16_t *z, const int64_t *targets, float *lse, int64_t V, int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; r++) {
        uint16_t *row = z + r * V;
        float top = -INFINITY;
        int64_t i = 0;
#ifdef __AVX512F__
        __m512 vtop = _mm512_set1_ps(-INFINITY);
        for (; i + 16 <= V; i += 16) vtop = _mm512_max_ps(vtop, load_bf16(row + i));
        top = _mm512_reduce_max_ps(vtop);
#endif
        for (; i < V; i++) top = fmaxf(top, bf16_to_f32(row[i]));
        double sum = 0.0;
        i = 0;
#ifdef __AVX512F__
        const __m512 vt = _mm512_set1_ps(top);
        for (; i + 1024 <= V; i += 1024) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = i; j < i + 1024; j += 16) acc = _mm512_add_ps(acc, exp16(_mm512_sub_ps(load_bf16(row + j), vt)));
            sum += _mm512_reduce_add_ps(acc);
        }
#endif
        for (; i < V; i++) sum += expf(bf16_to_f32(row[i]) - top);
        const float l = top + (float)log(sum);
        lse[r] = l;
        const int64_t y = targets[r];
        const float target_p = expf(bf16_to_f32(row[y]) - l);
        i = 0;
#ifdef __AVX512F__
        const __m512 vl = _mm512_set1_ps(l);
        const __m512i round_bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
        for (; i + 16 <= V; i += 16) {
            __m512i u = _mm512_castps_si512(exp16(_mm512_sub_ps(load_bf16(row + i), vl)));
            /* round to nearest even, as f32_to_bf16 */
            u = _mm512_add_epi32(u, _mm512_add_epi32(round_bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
            _mm256_storeu_si256((__m256i *)(row + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
        }
#endif
        for (; i < V; i++) row[i] = f32_to_bf16(expf(bf16_to_f32(row[i]) - l));
        row[y] = f32_to_bf16(target_p - 1.0f);
    }
}

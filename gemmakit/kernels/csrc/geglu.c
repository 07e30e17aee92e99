/* GeGLU (gelu_tanh(gate) * up) and its gradients with torch's roundings, for training; the
 * decode step's MLP uses the same forward. */
#include "common.h"

/* GeGLU for training (the MLP's gelu_tanh(gate) * up), forward and
 * backward, as torch computes F.gelu(gate, approximate="tanh") * up and its autograd:
 * aten/src/ATen/native/cpu/Activation.cpp (GeluKernelImpl, GeluBackwardKernelImpl, tanh
 * branches) operation for operation in float32, with torch's bfloat16 roundings between the
 * ops when the tensors are bfloat16 (gelu(gate) and grad * up are bfloat16 tensors there).
 * Where torch's build fuses a multiply into an add (checked bit for bit against torch 2.13:
 * x + kKappa x^3, 1 - tanh^2, 1 + 3 kKappa x^2) so do these; where it does not, neither do
 * they. One pass each instead of torch's gelu, multiply and (backward) gelu_backward and two
 * multiplies, with their bfloat16 tensors in between. */
#define GELU_BETA 0.7978845608028654f /* sqrt(2) * (2 / sqrt(pi)) * 0.5 = sqrt(2 / pi) */
#define GELU_KAPPA 0.044715f

/* tanh(u) as torch's CPU kernels get it from SLEEF's tanhf (u10): correctly rounded up to
 * rare last-bit differences, and exactly +-1 for |u| > 8.664339742 (SLEEF
 * src/libm/sleefsimdsp.c, xtanhf). With q = 1 - |tanh u| = 2 / (e^(2|u|) + 1), the float32
 * subtraction 1 - q rounds onto tanh's float32 grid near 1 itself; q's own error (a few of
 * its ulps) is far below that grid's step when q is small, which is where torch's 1 + tanh
 * and 1 - tanh^2 cancel, so those keep torch's values there, cancellation included (e.g.
 * gelu(-5.1) is -0 in torch and here). */
static inline float tanh_sleef(float u) {
    const float a = fabsf(u);
    const float t = a > 8.664339742f ? 1.f : 1.f - 2.f / (expf(a + a) + 1.f);
    return copysignf(t, u);
}

#ifdef AVX512_TRAIN
static inline __m512 tanh_sleef16(__m512 u) {
    const __m512 a = _mm512_abs_ps(u), one = _mm512_set1_ps(1.f);
    __m512 t = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(exp16(_mm512_add_ps(a, a)), one)));
    t = _mm512_mask_mov_ps(t, _mm512_cmp_ps_mask(a, _mm512_set1_ps(8.664339742f), _CMP_GT_OQ), one);
    /* t | sign(u), t being >= 0 */
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(t), _mm512_castps_si512(u),
                                                         _mm512_set1_epi32((int)0x80000000u), 0xF8));
}

ALWAYS_INLINE void geglu_forward16(const void *gate, const void *up, void *out, int64_t i, int64_t stop,
                                   const int bf16) {
    const __m512 beta = _mm512_set1_ps(GELU_BETA), kappa = _mm512_set1_ps(GELU_KAPPA);
    const __m512 one = _mm512_set1_ps(1.f), half = _mm512_set1_ps(0.5f);
    for (; i < stop; i += 16) {
        const __mmask16 m = first_lanes(stop - i);
        const __m512 x = load16(gate, i, bf16, m);
        const __m512 inner = _mm512_mul_ps(beta, _mm512_fmadd_ps(kappa, _mm512_mul_ps(_mm512_mul_ps(x, x), x), x));
        __m512 gl = _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, tanh_sleef16(inner)));
        if (bf16) gl = round_bf16(gl);
        store16(out, i, _mm512_mul_ps(gl, load16(up, i, bf16, m)), bf16, m);
    }
}

ALWAYS_INLINE void geglu_backward16(const void *grad, const void *gate, const void *up, void *grad_gate,
                                    void *grad_up, int64_t i, int64_t stop, const int bf16) {
    const __m512 beta = _mm512_set1_ps(GELU_BETA), kappa = _mm512_set1_ps(GELU_KAPPA);
    const __m512 kappa3 = _mm512_set1_ps(3.f * GELU_KAPPA); /* torch's kThree * kKappa, rounded */
    const __m512 one = _mm512_set1_ps(1.f), half = _mm512_set1_ps(0.5f);
    for (; i < stop; i += 16) {
        const __mmask16 m = first_lanes(stop - i);
        const __m512 dy = load16(grad, i, bf16, m), x = load16(gate, i, bf16, m), u = load16(up, i, bf16, m);
        const __m512 x_sq = _mm512_mul_ps(x, x);
        const __m512 t = tanh_sleef16(_mm512_mul_ps(beta, _mm512_fmadd_ps(kappa, _mm512_mul_ps(x_sq, x), x)));
        const __m512 left = _mm512_mul_ps(half, x), right = _mm512_add_ps(one, t);
        __m512 gl = _mm512_mul_ps(left, right), dgl = _mm512_mul_ps(dy, u);
        if (bf16) gl = round_bf16(gl), dgl = round_bf16(dgl);
        store16(grad_up, i, _mm512_mul_ps(dy, gl), bf16, m);
        const __m512 tanh_derivative = _mm512_fnmadd_ps(t, t, one);
        const __m512 inner_derivative = _mm512_mul_ps(beta, _mm512_fmadd_ps(kappa3, x_sq, one));
        __m512 right_derivative = _mm512_mul_ps(_mm512_mul_ps(left, tanh_derivative), inner_derivative);
        ROUNDED(right_derivative);
        store16(grad_gate, i, _mm512_mul_ps(dgl, _mm512_add_ps(_mm512_mul_ps(half, right), right_derivative)), bf16, m);
    }
}
#endif

/* out = gelu_tanh(gate) * up over elements [start, stop); float32 or (bf16 != 0) bfloat16, for
 * bfloat16 out = bf16(bf16(gelu(gate)) * up) as torch's two ops */
void geglu_forward(const void *gate, const void *up, void *out, int64_t start, int64_t stop, int64_t bf16) {
#ifdef AVX512_TRAIN
    if (bf16)
        geglu_forward16(gate, up, out, start, stop, 1);
    else
        geglu_forward16(gate, up, out, start, stop, 0);
#else
    for (int64_t i = start; i < stop; i++) {
        const float x = get_f(gate, i, bf16);
        float gl = (0.5f * x) * (1.f + tanh_sleef(GELU_BETA * fmaf(GELU_KAPPA, (x * x) * x, x)));
        if (bf16) gl = bf16_to_f32(f32_to_bf16(gl));
        put_f(out, i, gl * get_f(up, i, bf16), bf16);
    }
#endif
}

/* The gradients of out = gelu_tanh(gate) * up over elements [start, stop): grad_up = grad *
 * gelu(gate) and grad_gate = gelu'(gate) * (grad * up), with gelu(gate) and grad * up
 * rounded to bfloat16 first when bf16 != 0, as in torch's autograd graph. */
void geglu_backward(const void *grad, const void *gate, const void *up, void *grad_gate, void *grad_up,
                    int64_t start, int64_t stop, int64_t bf16) {
#ifdef AVX512_TRAIN
    if (bf16)
        geglu_backward16(grad, gate, up, grad_gate, grad_up, start, stop, 1);
    else
        geglu_backward16(grad, gate, up, grad_gate, grad_up, start, stop, 0);
#else
    for (int64_t i = start; i < stop; i++) {
        const float dy = get_f(grad, i, bf16), x = get_f(gate, i, bf16), u = get_f(up, i, bf16);
        const float x_sq = x * x;
        const float t = tanh_sleef(GELU_BETA * fmaf(GELU_KAPPA, x_sq * x, x));
        const float left = 0.5f * x, right = 1.f + t;
        float gl = left * right, dgl = dy * u;
        if (bf16) gl = bf16_to_f32(f32_to_bf16(gl)), dgl = bf16_to_f32(f32_to_bf16(dgl));
        put_f(grad_up, i, dy * gl, bf16);
        /* volatile: rounded before the sum, as in torch, not fused into it */
        volatile float right_derivative = (left * fmaf(-t, t, 1.f)) * (GELU_BETA * fmaf(3.f * GELU_KAPPA, x_sq, 1.f));
        put_f(grad_gate, i, dgl * (0.5f * right + right_derivative), bf16);
    }
#endif
}

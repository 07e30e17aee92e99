/* The `_mt` entry points: each kernel of gemmakit_kernels.h over [0, n), split over torch's
 * own OpenMP threads.
 *
 * Built with -fopenmp, this library's NEEDED libgomp.so.1 resolves to the libgomp torch has
 * already loaded (the dynamic loader reuses a loaded object of the same soname), so these
 * parallel regions run on torch's own intra-op threads, which keep spinning for a while after
 * a torch matmul and take the work at once. A separate pool competes with them: measured on a
 * 2-core CPU, a GeGLU backward split over two threads of its own took 1.4 ms against 0.74 ms
 * on one (0.82 ms with OMP_WAIT_POLICY=PASSIVE). Without OpenMP the loop below runs the parts
 * one after another on the calling thread: the same result, one core.
 */
#include "common.h"

/* [0, n) cut into `threads` contiguous parts (rows or elements, per kernel), CALL on each
 * part's [lo, hi) */
#define SPLIT(n, threads, CALL)                                                                  \
    do {                                                                                         \
        const int64_t n_ = (n), t_ = (threads) > 1 ? (threads) : 1;                              \
        _Pragma("omp parallel for schedule(static, 1) num_threads(t_)") for (int64_t k_ = 0; k_ < t_; k_++) { \
            const int64_t lo = n_ * k_ / t_, hi = n_ * (k_ + 1) / t_;                            \
            CALL;                                                                                \
        }                                                                                        \
    } while (0)

void gemv_int8_mt(const float *x, const int8_t *w, const float *s, float *y, int64_t n, int64_t k,
                  int64_t threads) {
    SPLIT(n, threads, gemv_int8(x, w, s, y, lo, hi, k));
}

void dropout_mt(const void *x, void *out, int64_t n, uint64_t seed, uint32_t threshold, float scale, int64_t bf16,
                int64_t threads) {
    SPLIT(n, threads, dropout(x, out, lo, hi, seed, threshold, scale, bf16));
}

void softmax_xent_bf16_mt(uint16_t *z, const int64_t *targets, float *lse, int64_t V, int64_t rows,
                          int64_t threads) {
    SPLIT(rows, threads, softmax_xent_bf16(z, targets, lse, V, lo, hi));
}

void rms_norm_forward_mt(const void *x, const float *gain, void *y, float *rstd, int64_t C, double eps,
                         int64_t rows, int64_t bf16, int64_t threads) {
    SPLIT(rows, threads, rms_norm_forward(x, gain, y, rstd, C, eps, lo, hi, bf16));
}

void rms_norm_backward_mt(const void *g, const void *x, const float *rstd, const float *gain, void *dx, int64_t C,
                          int64_t rows, int64_t bf16, int64_t threads) {
    SPLIT(rows, threads, rms_norm_backward(g, x, rstd, gain, dx, C, lo, hi, bf16));
}

void geglu_forward_mt(const void *gate, const void *up, void *out, int64_t n, int64_t bf16, int64_t threads) {
    SPLIT(n, threads, geglu_forward(gate, up, out, lo, hi, bf16));
}

void geglu_backward_mt(const void *grad, const void *gate, const void *up, void *grad_gate, void *grad_up,
                       int64_t n, int64_t bf16, int64_t threads) {
    SPLIT(n, threads, geglu_backward(grad, gate, up, grad_gate, grad_up, lo, hi, bf16));
}

void nf4_dequantize_mt(const uint8_t *packed, const float *absmax, const float *code, void *out, int64_t n,
                       int64_t bf16, int64_t threads) {
    SPLIT((n + 63) / 64, threads, nf4_dequantize(packed, absmax, code, out, n, lo, hi, bf16));
}


void gguf_dequantize_rows_mt(int64_t type, const void *w, int64_t n, int64_t k, float *out, int64_t threads) {
    SPLIT(n, threads, gguf_dequantize_rows(type, w, k, out + lo * k, lo, hi));
}

void gguf_gather_rows_mt(int64_t type, const void *w, int64_t k, const int64_t *ids, int64_t count, float *out,
                         int64_t threads) {
    SPLIT(count, threads, gguf_gather_rows(type, w, k, ids, out, lo, hi));
}

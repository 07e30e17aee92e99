/* Matrix-vector products (gemv.c), shared by gemv_int8 and the decode step. */
#ifndef GEMMAKIT_GEMV_H
#define GEMMAKIT_GEMV_H

#include "common.h"

/* x . w over K values, w float32, int8 or bfloat16 */
float dot_f32(const float *x, const float *w, int64_t K);
float dot_i8(const float *x, const int8_t *w, int64_t K);
float dot_bf16(const float *x, const uint16_t *w, int64_t K);

/* y[n] = row n of m . x for rows [lo, hi) (int8 rows times their scale) */
void matvec(const Mat *m, const float *x, float *y, int64_t lo, int64_t hi);

/* row `row` of m as m->k floats (int8 rows times their scale) */
void mat_row(const Mat *m, int64_t row, float *out);

#endif

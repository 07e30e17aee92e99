/* Matrix-vector and multi-row products (gemv.c), shared by gemv_int8 and the decode steps. */
#ifndef GEMMAKIT_GEMV_H
#define GEMMAKIT_GEMV_H

#include "common.h"

/* x . w over K values, w float32, int8 or bfloat16 */
float dot_f32(const float *x, const float *w, int64_t K);
float dot_i8(const float *x, const int8_t *w, int64_t K);
float dot_bf16(const float *x, const uint16_t *w, int64_t K);

/* y[n] = row n of m . x for rows [lo, hi) (int8 rows times their scale) */
void matvec(const Mat *m, const float *x, float *y, int64_t lo, int64_t hi);

/* y (rows, m->n) columns [lo, hi) = x (rows, m->k) times the rows [lo, hi) of m: each weight
 * row read once for all rows (int8 rows times their scale; a type without a multi-row
 * kernel runs matvec per row) */
void matmul_rows(const Mat *m, const float *x, int64_t rows, float *y, int64_t lo, int64_t hi);

/* out (m->k) = row `row` of m as floats (int8: times its scale) */
void mat_row(const Mat *m, int64_t row, float *out);

#endif

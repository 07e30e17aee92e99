/* GGUF block quantizers whose bytes equal llama.cpp's (ggml/src/ggml-quants.c of the llama.cpp
 * vendored by llama-cpp-python 0.3.36): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K,
 * Q3_K, Q4_K, Q5_K, Q6_K, each with and without an importance matrix, as `ggml_quantize_chunk`
 * dispatches them (`quantize_q4_K` & co.: the `_ref` quantizer without one, the `_impl` one
 * with one).
 *
 * Bit-exactness rests on doing the same float operations in the same order: the searches
 * below keep ggml's loop order, accumulate in float in ggml's association order, round with
 * the same magic-number trick (`nearest_int`) and convert to half with round-to-nearest-even.
 * ggml-base is built without -march (plain SSE2: no fused multiply-adds), so this unit must
 * not fuse either: GCC fuses a*b+c by default (-ffp-contract=fast) once -march=native offers
 * FMA, hence the pragma. GCC does not reassociate float sums without -ffast-math, so its
 * vectorizer keeps the sums' order.
 */
#include "gguf_quantize.h"

/* ================= the legacy 32-value blocks ================= */

/* nibbles: value j in the low half of byte j, value j + 16 in the high half */
static void pack_nibbles(uint8_t *qs, const uint8_t *L) {
    for (int j = 0; j < 16; ++j) qs[j] = (uint8_t)((L[j] & 0x0F) | ((L[j + 16] & 0x0F) << 4));
}

/* the fifth bits of 32 levels as one little-endian uint32 (bit j: value j) */
static void pack_high_bits(uint8_t *qh, const uint8_t *L) {
    uint32_t bits = 0;
    for (int j = 0; j < 32; ++j) bits |= (uint32_t)((L[j] & 0x10u) >> 4) << j;
    memcpy(qh, &bits, 4);
}

/* sum of squares of a row divided by its length: the sigma^2 of the legacy types' imatrix
 * weights (quantize_row_q4_0_impl & co.) */
static float row_sigma2(const float *x, int64_t k) {
    float sum_x2 = 0;
    for (int64_t j = 0; j < k; ++j) sum_x2 += x[j] * x[j];
    return sum_x2 / k;
}

/* Q4_0 (18 bytes: d, 16 nibble bytes) and Q5_0 (22 bytes: d, qh, qs): symmetric, d = the
 * signed extreme / -8 (-16), quantize_row_q4_0_ref / q5_0_ref; with an imatrix
 * quantize_row_q4_0_impl / q5_0_impl (make_qx_quants on weights qw * sqrt(sigma2 + x^2)) */
static void quantize_row_symmetric(const float *x, uint8_t *y, int64_t k, const float *qw, int bits) {
    const int half = 1 << (bits - 1), bytes = bits == 4 ? 18 : 22;
    const float sigma2 = qw ? row_sigma2(x, k) : 0;
    for (int64_t ib = 0; ib < k / QK; ++ib, y += bytes) {
        const float *xb = x + ib * QK;
        uint8_t L[QK];
        float d;
        if (qw) {
            float weight[QK];
            int8_t Ls[QK];
            for (int j = 0; j < QK; ++j) weight[j] = qw[ib * QK + j] * sqrtf(sigma2 + xb[j] * xb[j]);
            d = make_qx_quants(QK, half, xb, Ls, weight);
            for (int j = 0; j < QK; ++j) L[j] = (uint8_t)Ls[j];
        } else {
            float amax = 0, max = 0;
            for (int j = 0; j < QK; ++j) {
                if (amax < fabsf(xb[j])) { amax = fabsf(xb[j]); max = xb[j]; }
            }
            d = max / -half;
            const float id = d ? 1.0f / d : 0.0f;
            for (int j = 0; j < QK; ++j) {
                const uint8_t l = (uint8_t)(int8_t)(xb[j] * id + (half + 0.5f));
                L[j] = l < 2 * half - 1 ? l : (uint8_t)(2 * half - 1);
            }
        }
        put_half(y, d);
        if (bits == 5) pack_high_bits(y + 2, L);
        pack_nibbles(y + bytes - 16, L);
    }
}

/* Q4_1 (20 bytes: d, m, qs) and Q5_1 (24 bytes: d, m, qh, qs): x ~ d * L + m, d = (max - min)
 * / (2^bits - 1), quantize_row_q4_1_ref / q5_1_ref; with an imatrix quantize_row_q4_1_impl /
 * q5_1_impl (make_qkx3_quants, rmin -0.9, rdelta 0.05, 36 steps) */
static void quantize_row_affine(const float *x, uint8_t *y, int64_t k, const float *qw, int bits) {
    const int nmax = (1 << bits) - 1, bytes = bits == 4 ? 20 : 24;
    const float sigma2 = qw ? row_sigma2(x, k) : 0;
    for (int64_t ib = 0; ib < k / QK; ++ib, y += bytes) {
        const float *xb = x + ib * QK;
        uint8_t L[QK];
        float d, m;
        if (qw) {
            float weight[QK], min;
            uint8_t Laux[QK];
            for (int j = 0; j < QK; ++j) weight[j] = qw[ib * QK + j] * sqrtf(sigma2 + xb[j] * xb[j]);
            d = make_qkx_quants(QK, nmax, xb, weight, L, &min, Laux, -0.9f, 0.05f, 36, 0);
            m = -min;
        } else {
            float min = FLT_MAX, max = -FLT_MAX;
            for (int j = 0; j < QK; ++j) {
                if (xb[j] < min) min = xb[j];
                if (xb[j] > max) max = xb[j];
            }
            d = (max - min) / nmax;
            m = min;
            const float id = d ? 1.0f / d : 0.0f;
            for (int j = 0; j < QK; ++j) {
                const float v = (xb[j] - min) * id;
                /* q4_1_ref clamps (MIN(15, (int8_t)...)); q5_1_ref does not */
                L[j] = bits == 4 ? (uint8_t)imin(15, (int8_t)(v + 0.5f)) : (uint8_t)(v + 0.5f);
            }
        }
        put_half(y, d);
        put_half(y + 2, m);
        if (bits == 5) pack_high_bits(y + 4, L);
        pack_nibbles(y + bytes - 16, L);
    }
}

/* Q8_0 (34 bytes: d, 32 int8): d = amax / 127, quantize_row_q8_0_ref (no imatrix use) */
static void quantize_row_q8_0(const float *x, uint8_t *y, int64_t k) {
    for (int64_t ib = 0; ib < k / QK; ++ib, y += 34) {
        const float *xb = x + ib * QK;
        float amax = 0;
        for (int j = 0; j < QK; ++j) amax = amax > fabsf(xb[j]) ? amax : fabsf(xb[j]);
        const float d = amax / 127;
        const float id = d ? 1.0f / d : 0.0f;
        put_half(y, d);
        for (int j = 0; j < QK; ++j) y[2 + j] = (uint8_t)(int8_t)roundf(xb[j] * id);
    }
}

/* ================= IQ4_NL (18 bytes: d, qs) and IQ4_XS (136 bytes: d, scales_h, scales_l[4], qs[128]) ================= */

/* the 16 non-linear levels of IQ4_NL / IQ4_XS (ggml-common.h kvalues_iq4nl) */
static const int8_t IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* ggml-quants.c best_index_int8: the index of the level nearest x (ties to the upper one) by
 * bisection of the sorted levels */
static int best_index_int8(int n, const int8_t *val, float x) {
    if (x <= val[0]) return 0;
    if (x >= val[n - 1]) return n - 1;
    int ml = 0, mu = n - 1;
    while (mu - ml > 1) {
        const int mav = (ml + mu) / 2;
        if (x < val[mav]) mu = mav; else ml = mav;
    }
    return x - val[mu - 1] < val[mu] - x ? mu - 1 : mu;
}

/* the scale of one 32-value group on the IQ4 levels: the extreme's scale, then 15 trial
 * scales (ntry 7) keeping the best weighted fit (quantize_row_iq4_nl_impl's inner loop) */
static float iq4_group_scale(const float *xb, const float *weight, uint8_t *Lb) {
    float amax = 0, max = 0;
    for (int j = 0; j < 32; ++j) {
        if (fabsf(xb[j]) > amax) { amax = fabsf(xb[j]); max = xb[j]; }
    }
    if (amax < GROUP_MAX_EPS) return 0;
    float d = -max / IQ4_VALUES[0];
    float id = 1 / d;
    float sumqx = 0, sumq2 = 0;
    for (int j = 0; j < 32; ++j) {
        const int l = best_index_int8(16, IQ4_VALUES, id * xb[j]);
        Lb[j] = (uint8_t)l;
        const float q = IQ4_VALUES[l], w = weight[j];
        sumqx += w * q * xb[j];
        sumq2 += w * q * q;
    }
    d = sumq2 > 0 ? sumqx / sumq2 : 0.f;
    float best = d * sumqx;
    for (int itry = -7; itry <= 7; ++itry) {
        id = (itry + IQ4_VALUES[0]) / max;
        sumqx = sumq2 = 0;
        for (int j = 0; j < 32; ++j) {
            const float q = IQ4_VALUES[best_index_int8(16, IQ4_VALUES, id * xb[j])], w = weight[j];
            sumqx += w * q * xb[j];
            sumq2 += w * q * q;
        }
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    return d;
}

/* quantize_iq4_nl / quantize_iq4_xs (both through quantize_row_iq4_nl_impl, ntry 7): groups of
 * 32 weighted by x^2, or with an imatrix by qw * sqrt(sigma2 + x^2); IQ4_XS then stores each
 * group's scale as a 6-bit multiple of d = -max_scale / 32 and requantizes against it */
static void quantize_row_iq4(const float *x, uint8_t *y, int64_t k, const float *qw, int super) {
    const int nb = super / 32, bytes = super == 32 ? 18 : 136;
    for (int64_t ibl = 0; ibl < k / super; ++ibl, x += super, y += bytes) {
        const float *w = qw ? qw + ibl * super : NULL;
        float sigma2 = 0, scales[8], weight[32], max_scale = 0, amax_scale = 0;
        uint8_t L[QK_K];
        for (int j = 0; j < super; ++j) sigma2 += x[j] * x[j];
        sigma2 *= 2.f / super;
        for (int ib = 0; ib < nb; ++ib) {
            const float *xb = x + ib * 32;
            for (int j = 0; j < 32; ++j) weight[j] = w ? w[ib * 32 + j] * sqrtf(sigma2 + xb[j] * xb[j]) : xb[j] * xb[j];
            scales[ib] = iq4_group_scale(xb, weight, L + ib * 32);
            if (fabsf(scales[ib]) > amax_scale) {
                amax_scale = fabsf(scales[ib]);
                max_scale = scales[ib];
            }
        }
        uint8_t *qs = y + bytes - super / 2;
        if (nb == 1) {
            put_half(y, scales[0]);
            const float id = scales[0] ? 1 / scales[0] : 0;
            for (int j = 0; j < 32; ++j) L[j] = (uint8_t)best_index_int8(16, IQ4_VALUES, id * x[j]);
        } else {
            uint16_t scales_h = 0;
            uint8_t *scales_l = y + 4;
            const float d = -max_scale / 32;
            put_half(y, d);
            const float id = d ? 1 / d : 0.f;
            for (int ib = 0; ib < nb; ++ib) {
                const int l = imax(-32, imin(31, nearest_int(id * scales[ib])));
                const float dl = d * l, idl = dl ? 1 / dl : 0.f;
                for (int j = 0; j < 32; ++j) L[ib * 32 + j] = (uint8_t)best_index_int8(16, IQ4_VALUES, idl * x[ib * 32 + j]);
                const int stored = l + 32;
                if (ib % 2 == 0) scales_l[ib / 2] = (uint8_t)(stored & 0xf);
                else scales_l[ib / 2] |= (uint8_t)((stored & 0xf) << 4);
                scales_h |= (uint16_t)((stored >> 4) << 2 * (ib % 8));
            }
            memcpy(y + 2, &scales_h, 2);
        }
        for (int i = 0; i < super / 32; ++i) pack_nibbles(qs + 16 * i, L + 32 * i);
    }
}

/* bytes of one row of k values in `type`, or 0 when the type is not one of ours or k is not a
 * whole number of its blocks */
static int64_t row_bytes(int64_t type, int64_t k) {
    int64_t block = QK, size;
    switch (type) {
        case 2: size = 18; break;  /* Q4_0 */
        case 3: size = 20; break;  /* Q4_1 */
        case 6: size = 22; break;  /* Q5_0 */
        case 7: size = 24; break;  /* Q5_1 */
        case 8: size = 34; break;  /* Q8_0 */
        case 10: size = 84; block = QK_K; break;  /* Q2_K */
        case 11: size = 110; block = QK_K; break; /* Q3_K */
        case 12: size = 144; block = QK_K; break; /* Q4_K */
        case 13: size = 176; block = QK_K; break; /* Q5_K */
        case 14: size = 210; block = QK_K; break; /* Q6_K */
        case 20: size = 18; break;                /* IQ4_NL */
        case 23: size = 136; block = QK_K; break; /* IQ4_XS */
        default: return 0;
    }
    return k > 0 && k % block == 0 ? k / block * size : 0;
}

GEMMAKIT_API int64_t gguf_quantize_rows(int64_t type, const float *x, void *out, int64_t k, int64_t lo, int64_t hi,
                                        const float *imatrix) {
    const int64_t bytes = row_bytes(type, k);
    if (!bytes) return -1;
    for (int64_t r = lo; r < hi; ++r) {
        const float *row = x + r * k;
        uint8_t *y = (uint8_t *)out + r * bytes;
        switch (type) {
            case 2: quantize_row_symmetric(row, y, k, imatrix, 4); break;
            case 6: quantize_row_symmetric(row, y, k, imatrix, 5); break;
            case 3: quantize_row_affine(row, y, k, imatrix, 4); break;
            case 7: quantize_row_affine(row, y, k, imatrix, 5); break;
            case 8: quantize_row_q8_0(row, y, k); break;
            case 10: quantize_row_q2_K(row, y, k, imatrix); break;
            case 11: quantize_row_q3_K(row, y, k, imatrix); break;
            case 12: quantize_row_q45_K(row, y, k, imatrix, 4); break;
            case 13: quantize_row_q45_K(row, y, k, imatrix, 5); break;
            case 14: quantize_row_q6_K(row, y, k, imatrix); break;
            case 20: quantize_row_iq4(row, y, k, imatrix, 32); break;
            case 23: quantize_row_iq4(row, y, k, imatrix, QK_K); break;
        }
    }
    return bytes;
}

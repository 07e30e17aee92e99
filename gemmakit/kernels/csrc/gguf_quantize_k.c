/* The K-quants (256-value super-blocks) with llama.cpp's bytes: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
 * following ggml/src/ggml-quants.c quantize_row_qN_K_ref (no importance matrix) and
 * quantize_row_qN_K_impl (with one). Each block fits a scale (and for Q2/Q4/Q5 a min) per
 * sub-block, quantizes those to 4, 6 or 8 bits against a half-precision super-block scale, and
 * then requantizes every value against the scales as stored, which is what a reader decodes.
 * See gguf_quantize.c for why float operations keep ggml's order and are never fused.
 */
#include "gguf_quantize.h"

/* Q2_K and Q3_K store their 2-bit level planes the same way: byte l of each 32-byte group
 * holds values l, l + 32, l + 64, l + 96 of a 128-value half, two bits each */
static void pack_2bit_planes(uint8_t *qs, const uint8_t *L) {
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
        }
    }
}

/* ---------------- Q2_K: scales[16], qs[64], d, dmin (84 bytes) ---------------- */

/* per 16-value sub-block: x ~ d * (scale & 15) * L - dmin * (scale >> 4), L in [0, 3] */
void quantize_row_q2_K(const float *x, uint8_t *y, int64_t k, const float *qw) {
    for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K, y += 84) {
        uint8_t L[QK_K], Laux[16], Ls[16], Lm[16];
        float weight[16], scales[16], mins[16], sw[16];
        uint8_t *sc = y, *qs = y + 16, *d = y + 80, *dmin = y + 82;
        if (qw) { /* quantize_row_q2_K_impl */
            float sumx2 = 0;
            for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
            const float sigma2 = sumx2 / QK_K;
            for (int j = 0; j < 16; ++j) {
                const float *w = qw + QK_K * i + 16 * j;
                sw[j] = 0;
                for (int l = 0; l < 16; ++l) weight[l] = w[l] * sqrtf(sigma2 + x[16 * j + l] * x[16 * j + l]);
                for (int l = 0; l < 16; ++l) sw[j] += weight[l];
                scales[j] = make_qkx_quants(16, 3, x + 16 * j, weight, L + 16 * j, &mins[j], Laux, -0.9f, 0.05f, 36, 0);
            }
            put_half(d, make_qp_quants(16, 15, scales, Ls, sw));
            put_half(dmin, make_qp_quants(16, 15, mins, Lm, sw));
            for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)(Ls[j] | (Lm[j] << 4));
        } else { /* quantize_row_q2_K_ref */
            float max_scale = 0, max_min = 0;
            for (int j = 0; j < 16; ++j) {
                for (int l = 0; l < 16; ++l) weight[l] = fabsf(x[16 * j + l]);
                scales[j] = make_qkx_quants(16, 3, x + 16 * j, weight, L + 16 * j, &mins[j], Laux, -0.5f, 0.1f, 15, 1);
                if (scales[j] > max_scale) max_scale = scales[j];
                if (mins[j] > max_min) max_min = mins[j];
            }
            if (max_scale > 0) {
                const float iscale = 15.f / max_scale;
                for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)nearest_int(iscale * scales[j]);
                put_half(d, max_scale / 15.f);
            } else {
                memset(sc, 0, 16);
                put_half(d, 0.f);
            }
            if (max_min > 0) {
                const float iscale = 15.f / max_min;
                for (int j = 0; j < 16; ++j) sc[j] |= (uint8_t)(nearest_int(iscale * mins[j]) << 4);
                put_half(dmin, max_min / 15.f);
            } else {
                put_half(dmin, 0.f);
            }
        }
        const float dd = get_half(d), dm = get_half(dmin);
        for (int j = 0; j < 16; ++j) {
            const float dl = dd * (sc[j] & 0xF);
            if (!dl) continue;
            const float ml = dm * (sc[j] >> 4);
            for (int ii = 0; ii < 16; ++ii) {
                L[16 * j + ii] = (uint8_t)imax(0, imin(3, nearest_int((x[16 * j + ii] + ml) / dl)));
            }
        }
        pack_2bit_planes(qs, L);
    }
}

/* ---------------- Q3_K: hmask[32], qs[64], scales[12], d (110 bytes) ---------------- */

/* 16 six-bit scales (stored + 32): low nibbles in bytes 0-7 (sub-blocks 0-7 low, 8-15 high
 * half), the top two bits in bytes 8-11 */
static void pack_q3_scales(uint8_t *scales, const int *levels) {
    memset(scales, 0, 12);
    for (int j = 0; j < 16; ++j) {
        int l = levels[j];
        if (j < 8) {
            scales[j] = (uint8_t)(l & 0xF);
        } else {
            scales[j - 8] |= (uint8_t)((l & 0xF) << 4);
        }
        l >>= 4;
        scales[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
    }
}

static int q3_scale(const uint8_t *scales, int j) {
    const int low = j < 8 ? scales[j] & 0xF : scales[j - 8] >> 4;
    return (int8_t)((low | (((scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
}

/* the sub-block scales and the super-block scale of one Q3_K block; the levels of sub-blocks
 * whose stored scale is 0 stay those of the fit (in L) */
static void q3_K_scales(const float *x, int8_t *L, uint8_t *y, const float *qw) {
    float scales[16];
    int levels[16];
    float d;
    if (qw) { /* quantize_row_q3_K_impl */
        float sumx2 = 0, weight[16], sw[16];
        int8_t Ls[16];
        for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
        const float sigma2 = 2 * sumx2 / QK_K;
        for (int j = 0; j < 16; ++j) {
            for (int l = 0; l < 16; ++l) weight[l] = qw[16 * j + l] * sqrtf(sigma2 + x[16 * j + l] * x[16 * j + l]);
            float sumw = 0;
            for (int l = 0; l < 16; ++l) sumw += weight[l];
            sw[j] = sumw;
            scales[j] = make_qx_quants(16, 4, x + 16 * j, L + 16 * j, weight);
        }
        d = make_qx_quants(16, 32, scales, Ls, sw);
        for (int j = 0; j < 16; ++j) levels[j] = Ls[j];
    } else { /* quantize_row_q3_K_ref */
        float max_scale = 0, amax = 0;
        for (int j = 0; j < 16; ++j) {
            scales[j] = make_q3_quants(16, 4, x + 16 * j, L + 16 * j);
            if (fabsf(scales[j]) > amax) {
                amax = fabsf(scales[j]);
                max_scale = scales[j];
            }
        }
        if (!max_scale) {
            memset(y + 96, 0, 12);
            put_half(y + 108, 0.f);
            return;
        }
        const float iscale = -32.f / max_scale;
        for (int j = 0; j < 16; ++j) {
            const int8_t l = (int8_t)nearest_int(iscale * scales[j]); /* int8_t as in ggml */
            levels[j] = imax(-32, imin(31, l)) + 32;
        }
        d = 1 / iscale;
    }
    pack_q3_scales(y + 96, levels);
    put_half(y + 108, d);
}

void quantize_row_q3_K(const float *x, uint8_t *y, int64_t k, const float *qw) {
    for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K, y += 110) {
        int8_t L[QK_K];
        q3_K_scales(x, L, y, qw ? qw + QK_K * i : NULL);
        const float d_all = get_half(y + 108);
        for (int j = 0; j < 16; ++j) {
            const float d = d_all * q3_scale(y + 96, j);
            if (!d) continue;
            for (int ii = 0; ii < 16; ++ii) {
                L[16 * j + ii] = (int8_t)(imax(-4, imin(3, nearest_int(x[16 * j + ii] / d))) + 4);
            }
        }
        /* the third bit: value j's in bit j / 32 of hmask byte j % 32 */
        uint8_t *hmask = y, low[QK_K];
        memset(hmask, 0, 32);
        for (int j = 0; j < QK_K; ++j) {
            int l = L[j];
            if (l > 3) {
                hmask[j % 32] |= (uint8_t)(1u << (j / 32));
                l -= 4;
            }
            low[j] = (uint8_t)l;
        }
        pack_2bit_planes(y + 32, low);
    }
}

/* ---------------- Q4_K (144 bytes) and Q5_K (176 bytes): d, dmin, scales[12], [qh[32]], qs[128] ---------------- */

/* 8 six-bit scales and mins: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7
 * (mins); sub-blocks 4-7 as nibbles in bytes 8-11 with their top two bits in the high bits of
 * bytes 0-7 (ggml-quants.c get_scale_min_k4 reads it back) */
static void pack_k4_scales(uint8_t *scales, const uint8_t *ls, const uint8_t *lm) {
    for (int j = 0; j < 8; ++j) {
        if (j < 4) {
            scales[j] = ls[j];
            scales[j + 4] = lm[j];
        } else {
            scales[j + 4] = (uint8_t)((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
            scales[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
            scales[j] |= (uint8_t)((lm[j] >> 4) << 6);
        }
    }
}

static void get_scale_min_k4(int j, const uint8_t *q, int *d, int *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* the scales, mins, d and dmin of one Q4_K / Q5_K block (nmax 15 / 31) */
static void q45_K_scales(const float *x, uint8_t *L, uint8_t *y, const float *qw, int nmax) {
    float scales[8], mins[8], weights[32], sw[8];
    uint8_t Laux[32], Ls[8], Lm[8];
    if (qw) { /* quantize_row_q4_K_impl / q5_K_impl */
        float sum_x2 = 0;
        for (int l = 0; l < QK_K; ++l) sum_x2 += x[l] * x[l];
        const float sigma2 = 2 * sum_x2 / QK_K;
        for (int j = 0; j < 8; ++j) {
            for (int l = 0; l < 32; ++l) weights[l] = qw[32 * j + l] * sqrtf(sigma2 + x[32 * j + l] * x[32 * j + l]);
            float sumw = 0;
            for (int l = 0; l < 32; ++l) sumw += weights[l];
            sw[j] = sumw;
            scales[j] = make_qkx_quants(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, -0.9f, 0.05f, 36, 0);
        }
        const float d_block = make_qp_quants(8, 63, scales, Ls, sw);
        const float m_block = make_qp_quants(8, 63, mins, Lm, sw);
        pack_k4_scales(y + 4, Ls, Lm);
        put_half(y, d_block);
        put_half(y + 2, m_block);
        return;
    }
    /* quantize_row_q4_K_ref (rmin -1, 20 steps) / q5_K_ref (rmin -0.5, 15 steps) */
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
        float sum_x2 = 0;
        for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
        const float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; ++l) weights[l] = av_x + fabsf(x[32 * j + l]);
        scales[j] = nmax == 15 ? make_qkx_quants(32, 15, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, -1.f, 0.1f, 20, 0)
                               : make_qkx_quants(32, 31, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, -0.5f, 0.1f, 15, 0);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; ++j) {
        /* uint8_t first, then the clamp, as ggml does */
        const uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]);
        const uint8_t lm = (uint8_t)nearest_int(inv_min * mins[j]);
        Ls[j] = ls < 63 ? ls : 63;
        Lm[j] = lm < 63 ? lm : 63;
    }
    pack_k4_scales(y + 4, Ls, Lm);
    put_half(y, max_scale / 63.f);
    put_half(y + 2, max_min / 63.f);
}

void quantize_row_q45_K(const float *x, uint8_t *y, int64_t k, const float *qw, int bits) {
    const int nmax = (1 << bits) - 1, bytes = bits == 4 ? 144 : 176;
    for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K, y += bytes) {
        uint8_t L[QK_K];
        q45_K_scales(x, L, y, qw ? qw + QK_K * i : NULL, nmax);
        const float dd = get_half(y), dmin = get_half(y + 2);
        for (int j = 0; j < 8; ++j) {
            int sc, m;
            get_scale_min_k4(j, y + 4, &sc, &m);
            const float d = dd * sc;
            if (!d) continue;
            const float dm = dmin * m;
            for (int ii = 0; ii < 32; ++ii) {
                L[32 * j + ii] = (uint8_t)imax(0, imin(nmax, nearest_int((x[32 * j + ii] + dm) / d)));
            }
        }
        /* 64-value groups: byte l of a 32-byte run holds values l (low nibble) and l + 32
         * (high); Q5_K's fifth bits go to qh bit 2g (value l) and 2g + 1 (value l + 32) */
        uint8_t *qh = bits == 5 ? y + 16 : NULL, *ql = y + (bits == 5 ? 48 : 16);
        if (qh) memset(qh, 0, 32);
        for (int g = 0; g < 4; ++g, ql += 32) {
            for (int l = 0; l < 32; ++l) {
                int l1 = L[64 * g + l], l2 = L[64 * g + l + 32];
                if (qh && l1 > 15) { l1 -= 16; qh[l] |= (uint8_t)(1u << (2 * g)); }
                if (qh && l2 > 15) { l2 -= 16; qh[l] |= (uint8_t)(2u << (2 * g)); }
                ql[l] = (uint8_t)(l1 | (l2 << 4));
            }
        }
    }
}

/* ---------------- Q6_K: ql[128], qh[64], scales[16] (int8), d (210 bytes) ---------------- */

static void pack_q6_levels(uint8_t *ql, uint8_t *qh, const int8_t *L) {
    for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
        for (int l = 0; l < 32; ++l) {
            const int q1 = L[j + l], q2 = L[j + l + 32], q3 = L[j + l + 64], q4 = L[j + l + 96];
            ql[l] = (uint8_t)((q1 & 0xF) | ((q3 & 0xF) << 4));
            ql[l + 32] = (uint8_t)((q2 & 0xF) | ((q4 & 0xF) << 4));
            qh[l] = (uint8_t)((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
        }
    }
}

/* quantize_row_q6_K_ref / _impl: x ~ d * scale * (L - 32), make_qx_quants per 16 values
 * weighted by x^2 (no imatrix) or by the imatrix alone */
void quantize_row_q6_K(const float *x, uint8_t *y, int64_t k, const float *qw) {
    for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K, y += 210) {
        int8_t L[QK_K];
        float scales[16], max_scale = 0, max_abs_scale = 0;
        for (int ib = 0; ib < 16; ++ib) {
            scales[ib] = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib, qw ? qw + QK_K * i + 16 * ib : NULL);
            if (fabsf(scales[ib]) > max_abs_scale) {
                max_abs_scale = fabsf(scales[ib]);
                max_scale = scales[ib];
            }
        }
        if (max_abs_scale < GROUP_MAX_EPS) {
            memset(y, 0, 210);
            continue;
        }
        const float iscale = -128.f / max_scale;
        int8_t *sc = (int8_t *)(y + 192);
        put_half(y + 208, 1 / iscale);
        for (int ib = 0; ib < 16; ++ib) sc[ib] = (int8_t)imin(127, nearest_int(iscale * scales[ib]));
        const float dd = get_half(y + 208);
        for (int j = 0; j < 16; ++j) {
            const float d = dd * sc[j];
            if (!d) continue;
            for (int ii = 0; ii < 16; ++ii) {
                L[16 * j + ii] = (int8_t)(imax(-32, imin(31, nearest_int(x[16 * j + ii] / d))) + 32);
            }
        }
        pack_q6_levels(y, y + 128, L);
    }
}

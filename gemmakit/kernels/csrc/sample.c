/* Sampling's heavy part over rows of logits: each row's best candidates and its log-sum-exp.
 *
 * A sampled token needs, per row of V logits scaled by 1 / temperature, the `count` largest
 * (top-k, or top-p decided on the best 1,024) and the log of the softmax's denominator (the
 * candidates' share of the whole row). torch does that in two passes plus a topk that took
 * ~1 ms a row of Gemma's 262,144 logits on the 2-core CPU; here a histogram of the logits'
 * order-preserving integer keys names the bin the count-th largest falls in (a histogram of
 * every 8th logit, where the row is long enough for that sample to name a safe bin), one
 * pass collects the few thousand that can be among the best into a scratch list (AVX-512's
 * compress), and the final order is sorted from those alone. 3.6 ms for 16 rows of the bundled model's
 * logits on one thread of the (loaded) 2-core machine (6.2 ms with the whole-row
 * histogram), against torch's ~1 ms a row.
 *
 * The result of a row depends on that row only, never on the other rows of the call or how
 * the rows are split over threads, so one row sampled alone and the same row in a batch get
 * the same candidates (the serving engine's guarantee: tests/test_sampling_batched.py).
 * Candidates are ordered by logit, descending, ties by the lower token id first.
 */
#include <stdlib.h>

#include "common.h"

/* an order-preserving key: for floats a < b (no NaN), key(a) < key(b), and -0 and +0 share one
 * (f + 0 is +0 for both); a positive NaN sorts above +inf, so a NaN row keeps its NaN among
 * the candidates and its sampling fails alone */
static inline uint32_t order_key(float f) {
    f += 0.0f;
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u ^ (uint32_t)(((int32_t)u >> 31) | (int32_t)0x80000000);
}

typedef struct {
    uint32_t key;
    int32_t id;
} Candidate;

/* a row's index list, then as many Candidates */
int64_t sample_scratch_words(int64_t V) { return V + V * (int64_t)(sizeof(Candidate) / sizeof(int32_t)); }

static int by_key_then_id(const void *a, const void *b) {
    const Candidate *x = a, *y = b;
    if (x->key != y->key) return x->key < y->key ? 1 : -1;
    return (x->id > y->id) - (x->id < y->id);
}

/* The bin of a histogram of `bins` counts (highest first) where the running count reaches
 * `need`; *above gets the count of the bins over it. */
static int64_t reaching_bin(const int64_t *hist, int64_t bins, int64_t need, int64_t *above) {
    int64_t total = 0, b = bins - 1;
    for (; b > 0 && total + hist[b] < need; b--) total += hist[b];
    *above = total;
    return b;
}

/* The indices of row x whose key is at least `floor`, in index order, into ids; their number. */
static int64_t collect_from(const float *x, int64_t V, uint32_t floor, int32_t *ids) {
    int64_t n = 0, i = 0;
#ifdef __AVX512F__
    const __m512i sign = _mm512_set1_epi32((int)0x80000000), lim = _mm512_set1_epi32((int)(floor ^ 0x80000000u));
    __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i sixteen = _mm512_set1_epi32(16);
    for (; i + 16 <= V; i += 16) {
        __m512i u = _mm512_castps_si512(_mm512_add_ps(_mm512_loadu_ps(x + i), _mm512_setzero_ps()));
        /* order_key on 16 lanes, compared as signed after flipping the top bit back */
        __m512i key = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), sign));
        __mmask16 keep = _mm512_cmpge_epi32_mask(_mm512_xor_si512(key, sign), lim);
        if (keep) { /* compress in a register: a compress straight to memory is microcoded on AMD Zen 4 */
            /* n <= i, so the 16 lanes stored end by i + 16 <= V */
            _mm512_storeu_si512(ids + n, _mm512_maskz_compress_epi32(keep, index));
            n += __builtin_popcount(keep);
        }
        index = _mm512_add_epi32(index, sixteen);
    }
#endif
    for (; i < V; i++)
        if (order_key(x[i]) >= floor) ids[n++] = (int32_t)i;
    return n;
}

/* log sum_i e^(x[i] / t) given top = max_i x[i], in float32 per block of 1024 with the blocks
 * added in double (as xent.c) */
static float log_sum_exp(const float *x, int64_t V, float t, float top) {
    const float m = top / t;
    double sum = 0.0;
    int64_t i = 0;
#ifdef __AVX512F__
    const __m512 vt = _mm512_set1_ps(t), vm = _mm512_set1_ps(m);
    for (; i + 1024 <= V; i += 1024) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = i; j < i + 1024; j += 16)
            acc = _mm512_add_ps(acc, exp16(_mm512_sub_ps(_mm512_div_ps(_mm512_loadu_ps(x + j), vt), vm)));
        sum += _mm512_reduce_add_ps(acc);
    }
#endif
    for (; i < V; i++) sum += expf(x[i] / t - m);
    return m + (float)log(sum);
}

/* One row: its `count` best logits (count <= V) as values x / t and ids, and its lse. */
static void row_candidates(const float *x, float t, int64_t V, int64_t count, float *values, int64_t *ids,
                           float *lse, int32_t *scratch) {
    Candidate *best = (Candidate *)(scratch + V);
    enum { BITS = 11, BINS = 1 << BITS, STRIDE = 8 };
    int64_t hist[BINS], n = 0;
    /* A histogram of every STRIDE-th logit names a bin low enough to hold the best `count`
     * (twice the share a stride's sample needs, plus a margin); every key from that bin up
     * is collected and counted exactly. Where that collects too few (a sample that misled),
     * the histogram of the whole row decides. */
    memset(hist, 0, sizeof hist);
    for (int64_t i = 0; i < V; i += STRIDE) hist[order_key(x[i]) >> (32 - BITS)]++;
    int64_t unused;
    const int64_t guess = reaching_bin(hist, BINS, 2 * count / STRIDE + 16, &unused);
    if (V >= 16 * STRIDE * count) n = collect_from(x, V, (uint32_t)guess << (32 - BITS), scratch);
    if (n >= count) {
        memset(hist, 0, sizeof hist);
        for (int64_t j = 0; j < n; j++) hist[order_key(x[scratch[j]]) >> (32 - BITS)]++;
    } else {
        /* four histograms, element i counted in the (i % 4)th: logits crowd into a few bins,
         * and one histogram would make each increment wait for the one before to the same bin */
        uint32_t part[4][BINS];
        memset(part, 0, sizeof part);
        int64_t i = 0;
        for (; i + 4 <= V; i += 4)
            for (int j = 0; j < 4; j++) part[j][order_key(x[i + j]) >> (32 - BITS)]++;
        for (; i < V; i++) part[0][order_key(x[i]) >> (32 - BITS)]++;
        for (int b = 0; b < BINS; b++) hist[b] = (int64_t)part[0][b] + part[1][b] + part[2][b] + part[3][b];
    }
    int64_t above;
    const int64_t bin = reaching_bin(hist, BINS, count, &above);
    /* every key of the bins from `bin` up: the candidates and those tied with the last one */
    if (n >= count) { /* already collected (from a bin at or below `bin`): keep those from it up */
        int64_t m = 0;
        for (int64_t j = 0; j < n; j++)
            if (order_key(x[scratch[j]]) >> (32 - BITS) >= (uint32_t)bin) scratch[m++] = scratch[j];
        n = m;
    } else {
        n = collect_from(x, V, (uint32_t)bin << (32 - BITS), scratch);
    }
    /* narrow to the exact threshold key: two more histograms over the collected keys only */
    uint32_t prefix = (uint32_t)bin, shift = 32 - BITS;
    int64_t need = count - above;
    while (shift > 0 && n > count) {
        const uint32_t bits = shift >= BITS ? BITS : shift;
        shift -= bits;
        int64_t sub[BINS];
        memset(sub, 0, sizeof sub);
        const uint32_t mask = (1u << bits) - 1;
        for (int64_t j = 0; j < n; j++) {
            const uint32_t key = order_key(x[scratch[j]]);
            if (key >> (shift + bits) == prefix) sub[(key >> shift) & mask]++;
        }
        int64_t over;
        const int64_t b = reaching_bin(sub, (int64_t)1 << bits, need, &over);
        need -= over;
        prefix = (prefix << bits) | (uint32_t)b;
        /* keep the keys at or over the new prefix (and those above the old one), index order */
        int64_t m = 0;
        for (int64_t j = 0; j < n; j++)
            if (order_key(x[scratch[j]]) >> shift >= prefix) scratch[m++] = scratch[j];
        n = m;
    }
    /* scratch now holds every key above the threshold and the keys equal to it (shift 0) or
     * sharing its prefix; order them all and keep the first count */
    for (int64_t j = 0; j < n; j++) best[j] = (Candidate){order_key(x[scratch[j]]), scratch[j]};
    qsort(best, (size_t)n, sizeof *best, by_key_then_id);
    for (int64_t j = 0; j < count; j++) {
        ids[j] = best[j].id;
        values[j] = x[best[j].id] / t;
    }
    *lse = log_sum_exp(x, V, t, x[best[0].id]); /* the first candidate is the row's maximum */
}

void sample_candidates(const float *logits, const float *temperature, int64_t V, int64_t count, float *values,
                       int64_t *ids, float *lse, int32_t *scratch, int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; r++)
        row_candidates(logits + r * V, temperature[r], V, count, values + r * count, ids + r * count, lse + r,
                       scratch);
}

void sample_candidates_mt(const float *logits, const float *temperature, int64_t V, int64_t count, float *values,
                          int64_t *ids, float *lse, int32_t *scratch, int64_t rows, int64_t threads) {
    const int64_t t = threads > 1 ? threads : 1;
#pragma omp parallel for schedule(static, 1) num_threads(t)
    for (int64_t k = 0; k < t; k++)
        sample_candidates(logits, temperature, V, count, values, ids, lse, scratch + k * sample_scratch_words(V),
                          rows * k / t, rows * (k + 1) / t);
}

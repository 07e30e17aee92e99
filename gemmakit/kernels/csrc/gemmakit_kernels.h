/* gemmakit's CPU kernels: every function the shared library exports and every struct it
 * shares with Python, declared once.
 *
 * gemmakit/kernels/bindings.py reads this file to give each GEMMAKIT_API function its ctypes
 * argument types and to build the ctypes structures of the decode step, so a declaration
 * changed here is a declaration changed there. Keep it to what that parser reads: `enum { NAME
 * = value, ... };`, `typedef struct { ... } Name;` with fields of the fixed-width integer types,
 * float, double, pointers, nested structs and fixed arrays, and one `GEMMAKIT_API` prototype
 * per exported function. Nothing else in the library is visible outside it (-fvisibility=hidden).
 *
 * Ranges: the plain kernels work over [lo, hi) (or [start, stop)) of rows or elements on the
 * calling thread; each `_mt` entry point (split.c) runs one over [0, n) split over `threads`
 * OpenMP threads. float32 or bfloat16 data is chosen per call by `bf16` (nonzero: bfloat16).
 */
#ifndef GEMMAKIT_KERNELS_H
#define GEMMAKIT_KERNELS_H

#include <stdint.h>

#define GEMMAKIT_API __attribute__((visibility("default")))

/* Mat.type: how a matrix's weights are stored; W_GGUF_BASE + a ggml type id (Q8_0 108,
 * Q4_K 112, Q6_K 114, ...): the raw GGUF block bytes of the (n, k) matrix (gguf_blocks.c) */
enum { W_F32 = 0, W_INT8 = 1, W_BF16 = 2, W_GGUF_BASE = 100 };

/* Mat.type W_PACKED4: GPTQ / AWQ 4-bit weights (packed4.c); Mat.w points to a Packed4 */
enum { W_PACKED4 = 3 };

typedef struct {
    /* q: uint8 (n, k / 2), each 32 columns in 16 bytes (column j low nibble, j + 16 high);
     * scale, min: float (n, k / group_size), w = q * scale + min; perm: int32 (k,), the input
     * column of each stored column (act-order), or NULL when they are in order */
    const uint8_t *q;
    const float *scale;
    const float *min;
    const int32_t *perm;
    int64_t group_size;
} Packed4;

/* --- the decode step's view of a model (decode_batch.c, gemmakit/inference/c_decode.py) --- */

typedef struct {
    /* W_F32: w is float (n, k); W_INT8: w is int8 (n, k) with float scale s (n,);
     * W_BF16: w is bfloat16 (n, k); W_GGUF_BASE + t: w is the GGUF blocks of ggml type t, s unused */
    int64_t type;
    const void *w;
    const float *s;
    int64_t n, k;
} Mat;

typedef struct {
    Mat q, k, v, o, gate, up, down;
    /* 1 + w gains (float32); NULL where the model has no such norm */
    const float *input_norm, *post_attention_norm, *pre_feedforward_norm, *post_feedforward_norm;
    const float *q_norm, *k_norm;
    /* (slots, kv_heads, capacity, head_dim) from slot 0 on, float or bfloat16 */
    void *k_cache, *v_cache;
    int64_t capacity, group; /* group: 0 full attention, 1 sliding (inv_freq's index) */
} Layer;

typedef struct {
    int64_t n_layers, hidden, heads, kv_heads, head_dim, intermediate, vocab;
    double eps, attn_scale, attn_softcap, final_softcap; /* softcaps: 0 when absent */
    float embed_scale;                                   /* sqrt(hidden), rounded to the model's dtype */
    const float *inv_freq[2];                            /* head_dim/2 RoPE frequencies per group */
    Mat embed, lm_head;
    const float *final_norm;
    const Layer *layers;
    int64_t max_visible; /* the longest key row any group can have (scratch size) */
    int64_t cache_bf16;  /* the KV cache holds bfloat16 (a bfloat16 model), else float */
    int64_t window;      /* the sliding layers' window (a position p sees p - window + 1 on) */
} Model;

/* --- the decode step: R rows of a slot cache (decode_batch.c; one row: c_decode.CDecoder) --- */

typedef struct {
    int64_t rows;
    /* per row: the token fed, its slot in the cache, its position. The rows of one slot are
     * consecutive rows at consecutive positions (a prompt chunk, a row and its speculative
     * proposals, one decode row) and see each other causally; a row sees the positions [0, p]
     * (full layers) or [max(0, p - window + 1), p] (sliding) of its own slot. */
    const int64_t *tokens, *slots, *positions;
    /* the rows whose logits are computed, ascending (a prompt row before the last of its
     * prompt needs none), n_logit_rows of them; NULL: every row */
    const int64_t *logit_rows;
    int64_t n_logit_rows;
    float *logits; /* (n_logit_rows, or rows when logit_rows is NULL, vocab) output */
} Batch;

/* One step of b->rows rows on `threads` threads (the caller's included), each weight matrix
 * read once for all rows: 0; -1 when the head size is unsupported or the buffers cannot be
 * allocated; -2 when the rows of one slot are not one run of consecutive rows at consecutive
 * positions; -3 when logit_rows is not ascending within [0, rows). */
GEMMAKIT_API int decode_batch(const Model *m, const Batch *b, int threads);

/* --- GGUF block quantization with llama.cpp's bytes (gguf_quantize.c, gguf_quantize_k.c) --- */

/* Rows [lo, hi) of x (n, k) float32 quantized to ggml type `type` (Q4_0 2, Q4_1 3, Q5_0 6,
 * Q5_1 7, Q8_0 8, Q2_K 10, Q3_K 11, Q4_K 12, Q5_K 13, Q6_K 14, IQ4_NL 20, IQ4_XS 23) into
 * out (n rows of the returned bytes), with the importance matrix's k column weights or NULL.
 * Returns the bytes of one row, or -1 for another type or a k that is not a whole number of
 * its blocks. */
GEMMAKIT_API int64_t gguf_quantize_rows(int64_t type, const float *x, void *out, int64_t k, int64_t lo, int64_t hi,
                                        const float *imatrix);

/* --- kernels over a range, on the calling thread --- */

/* y[n] = s[n] * (x . row n of int8 w (N, K)) for rows [start, stop) (gemv.c) */
GEMMAKIT_API void gemv_int8(const float *x, const int8_t *w, const float *s, float *y, int64_t start, int64_t stop,
                            int64_t K);
/* out = x * keep(seed, i) * scale; keep when a hash of (seed, i) >= threshold (dropout.c) */
GEMMAKIT_API void dropout(const void *x, void *out, int64_t start, int64_t stop, uint64_t seed, uint32_t threshold,
                          float scale, int64_t bf16);
/* RMSNorm of rows of C values: y = (x * rstd) * gain, rstd one float per row (norm.c) */
GEMMAKIT_API void rms_norm_forward(const void *x, const float *gain, void *y, float *rstd, int64_t C, double eps,
                                   int64_t lo, int64_t hi, int64_t bf16);
GEMMAKIT_API void rms_norm_backward(const void *g, const void *x, const float *rstd, const float *gain, void *dx,
                                    int64_t C, int64_t lo, int64_t hi, int64_t bf16);
/* bfloat16 logits (rows of V) become softmax - onehot(targets), in place; lse per row (xent.c) */
GEMMAKIT_API void softmax_xent_bf16(uint16_t *z, const int64_t *targets, float *lse, int64_t V, int64_t lo,
                                    int64_t hi);
/* out = gelu_tanh(gate) * up and its gradients (geglu.c) */
GEMMAKIT_API void geglu_forward(const void *gate, const void *up, void *out, int64_t start, int64_t stop,
                                int64_t bf16);
GEMMAKIT_API void geglu_backward(const void *grad, const void *gate, const void *up, void *grad_gate,
                                 void *grad_up, int64_t start, int64_t stop, int64_t bf16);
/* NF4 weight over the 64-value blocks [lo, hi) of n values (nf4.c) */
GEMMAKIT_API void nf4_dequantize(const uint8_t *packed, const float *absmax, const float *code, void *out, int64_t n,
                                 int64_t lo, int64_t hi, int64_t bf16);
/* GGUF block types (ggml type ids 2, 3, 6, 7, 8, 10-14, 20, 23) over the raw blocks w of a (n, k)
 * matrix (gguf_blocks.c): bytes per row (-1 for a type or k it does not take); rows [lo, hi)
 * as floats (out: (hi - lo, k)), bit for bit the gguf package's dequantize; rows ids[lo..hi)
 * into out rows [lo, hi) (out: (len(ids), k)); y[n] = row n . x for rows [lo, hi); and
 * y (rows, n) = x (rows, k) W^T over output columns [lo, hi). gguf_matvec and
 * gguf_matmul_rows round x to llama.cpp's 8-bit activation blocks and run integer dots
 * (gguf_act.c, gguf_dot.c): llama.cpp's products; the _f32 variants multiply the dequantized
 * blocks with x in float32. */
GEMMAKIT_API int64_t gguf_row_bytes(int64_t type, int64_t k);
GEMMAKIT_API void gguf_dequantize_rows(int64_t type, const void *w, int64_t k, float *out, int64_t lo, int64_t hi);
GEMMAKIT_API void gguf_gather_rows(int64_t type, const void *w, int64_t k, const int64_t *ids, float *out,
                                   int64_t lo, int64_t hi);
GEMMAKIT_API void gguf_matvec(int64_t type, const void *w, int64_t k, const float *x, float *y, int64_t lo,
                              int64_t hi);
GEMMAKIT_API void gguf_matmul_rows(int64_t type, const void *w, int64_t n, int64_t k, const float *x, int64_t rows,
                                   float *y, int64_t lo, int64_t hi);
GEMMAKIT_API void gguf_matvec_f32(int64_t type, const void *w, int64_t k, const float *x, float *y, int64_t lo,
                                  int64_t hi);
GEMMAKIT_API void gguf_matmul_rows_f32(int64_t type, const void *w, int64_t n, int64_t k, const float *x,
                                       int64_t rows, float *y, int64_t lo, int64_t hi);
/* x (rows, k) rounded to 8-bit blocks of ggml type `type` (Q8_0 8, Q8_1 9, Q8_K 15) as
 * llama.cpp does on x86 (gguf_act.c): q (rows, k), d per block (32 values, Q8_K 256), Q8_1's s
 * per 32 and Q8_K's bsums per 16 (NULL otherwise). 0, or -1 for another type or k. */
GEMMAKIT_API int64_t gguf_quantize_activations(int64_t type, const float *x, int64_t rows, int64_t k, int8_t *q,
                                               float *d, float *s, int16_t *bsums);

/* GPTQ / AWQ 4-bit (packed4.c): 1 when the C kernels take a (n, k) matrix with this group
 * size; rows [lo, hi) dequantized into out (hi - lo, k); y (rows, n) = x (rows, k) W^T over
 * output columns [lo, hi), each output the float32 dot of its row with the dequantized one */
GEMMAKIT_API int64_t packed4_supported(int64_t k, int64_t group_size);
GEMMAKIT_API void packed4_dequantize_rows(const Packed4 *p, int64_t k, float *out, int64_t lo, int64_t hi);
GEMMAKIT_API void packed4_matmul_rows(const Packed4 *p, int64_t n, int64_t k, const float *x, int64_t rows,
                                      float *y, int64_t lo, int64_t hi);

/* --- the same kernels over [0, n) split over threads (split.c) --- */

GEMMAKIT_API void gemv_int8_mt(const float *x, const int8_t *w, const float *s, float *y, int64_t n, int64_t k,
                               int64_t threads);
GEMMAKIT_API void dropout_mt(const void *x, void *out, int64_t n, uint64_t seed, uint32_t threshold, float scale,
                             int64_t bf16, int64_t threads);
GEMMAKIT_API void softmax_xent_bf16_mt(uint16_t *z, const int64_t *targets, float *lse, int64_t V, int64_t rows,
                                       int64_t threads);
GEMMAKIT_API void rms_norm_forward_mt(const void *x, const float *gain, void *y, float *rstd, int64_t C, double eps,
                                      int64_t rows, int64_t bf16, int64_t threads);
GEMMAKIT_API void rms_norm_backward_mt(const void *g, const void *x, const float *rstd, const float *gain, void *dx,
                                       int64_t C, int64_t rows, int64_t bf16, int64_t threads);
GEMMAKIT_API void geglu_forward_mt(const void *gate, const void *up, void *out, int64_t n, int64_t bf16,
                                   int64_t threads);
GEMMAKIT_API void geglu_backward_mt(const void *grad, const void *gate, const void *up, void *grad_gate,
                                    void *grad_up, int64_t n, int64_t bf16, int64_t threads);
GEMMAKIT_API void nf4_dequantize_mt(const uint8_t *packed, const float *absmax, const float *code, void *out,
                                    int64_t n, int64_t bf16, int64_t threads);
GEMMAKIT_API void gguf_dequantize_rows_mt(int64_t type, const void *w, int64_t n, int64_t k, float *out,
                                          int64_t threads);
GEMMAKIT_API void gguf_gather_rows_mt(int64_t type, const void *w, int64_t k, const int64_t *ids, int64_t count,
                                      float *out, int64_t threads);
/* gguf_matmul_rows with x rounded once for all threads, the output columns split over them */
GEMMAKIT_API void gguf_matmul_q8_mt(int64_t type, const void *w, int64_t n, int64_t k, const float *x, int64_t rows,
                                    float *y, int64_t threads);
/* gguf_matmul_rows_f32 over [0, n) */
GEMMAKIT_API void gguf_matmul_f32_mt(int64_t type, const void *w, int64_t n, int64_t k, const float *x,
                                     int64_t rows, float *y, int64_t threads);

/* --- SentencePiece's BPE over a GGUF's vocabulary, in place (bpe.c, gemmakit/kernels/bpe.py) --- */

typedef struct {
    /* the file's tokenizer.ggml.tokens array as stored: per piece a uint64 length, then its
     * bytes; its scores (float32) and SentencePiece piece types (int32: 1 normal, 2 unknown,
     * 3 control, 4 user-defined, 5 unused, 6 byte), count of each, where the file holds them
     * (GGUF does not align them) */
    const uint8_t *strings;
    const void *scores, *types;
    int64_t count;
    /* filled by bpe_index (or read back from a cache, then bpe_check_index): offsets
     * (count + 1,) each piece's length field in strings, then the end; slots (slot_count =
     * bpe_slot_count(count),) the pieces hashed by their bytes */
    uint32_t *offsets, *slots;
    int64_t slot_count;
    /* filled by bpe_user_pieces: the user-defined pieces (spaces escaped) as a trie of
     * bpe_trie_words(their total bytes) words */
    int32_t *trie;
    /* the <0xNN> pieces' ids (-1 where missing; all 256 present: byte fallback), the unknown id */
    int32_t byte_ids[256];
    int32_t unk_id;
    /* filled by bpe_index (or read back with offsets and slots) and bpe_user_pieces: bit b
     * set where a mergeable piece holds byte b right before a U+2581 that does not start it
     * (the text is not cut there) */
    uint8_t joined_before_space[32];
} BpeVocab;

/* the version of bpe_index's hashing and layout: a cached index of another is built again */
GEMMAKIT_API int64_t bpe_index_version(void);
GEMMAKIT_API int64_t bpe_slot_count(int64_t count);
/* fills offsets and slots from strings (size bytes); 0, or -1 where a piece runs past the end
 * or the strings pass 4 GB */
GEMMAKIT_API int64_t bpe_index(BpeVocab *v, int64_t size);
/* 0 where offsets and slots (an index bpe_index built, read back from a cache) fit strings
 * (size bytes) and count: every piece within strings, its length field its size, every slot's
 * id a piece; else -1 (a damaged index: built again) */
GEMMAKIT_API int64_t bpe_check_index(const BpeVocab *v, int64_t size);
GEMMAKIT_API int64_t bpe_trie_words(int64_t total_bytes);
/* the n user-defined pieces, piece i the bytes [ends[i - 1], ends[i]) of pieces (ends[-1] = 0)
 * with id ids[i] (a later piece of the same bytes replaces an earlier one), into v->trie */
GEMMAKIT_API void bpe_user_pieces(BpeVocab *v, const uint8_t *pieces, const int64_t *ends, const int32_t *ids,
                                  int64_t n);
/* the lowest id whose bytes are piece[0, n) among the types whose bit (1 << type) is in kinds; -1 if none */
GEMMAKIT_API int64_t bpe_find(const BpeVocab *v, const uint8_t *piece, int64_t n, int64_t kinds);
/* SentencePiece's ids of text[0, n) (UTF-8, spaces already escaped as U+2581) into ids (room
 * for n); their count, or -1 when out of memory */
GEMMAKIT_API int64_t bpe_encode(const BpeVocab *v, const uint8_t *text, int64_t n, int32_t *ids);
/* the UTF-8 text of ids[0, n) as SentencePiece decodes them, into out (the first capacity
 * bytes written); its length in bytes (more than capacity: call again with that room), or
 * -1 - i where ids[i] is no piece */
GEMMAKIT_API int64_t bpe_decode(const BpeVocab *v, const int32_t *ids, int64_t n, uint8_t *out, int64_t capacity);

/* --- sampling (sample.c) --- */

/* int32 words of scratch one thread of sample_candidates needs for rows of V logits */
GEMMAKIT_API int64_t sample_scratch_words(int64_t V);
/* rows [lo, hi) of logits (rows of V): the `count` (<= V) largest of each row as values
 * logit / temperature[r] and ids (rows of count; by logit descending, ties lower id first),
 * and lse[r] = log sum_v e^(logit_v / temperature[r]); scratch: sample_scratch_words(V) words.
 * The _mt form splits the rows over threads, scratch: threads times that. */
GEMMAKIT_API void sample_candidates(const float *logits, const float *temperature, int64_t V, int64_t count,
                                    float *values, int64_t *ids, float *lse, int32_t *scratch, int64_t lo, int64_t hi);
GEMMAKIT_API void sample_candidates_mt(const float *logits, const float *temperature, int64_t V, int64_t count,
                                       float *values, int64_t *ids, float *lse, int32_t *scratch, int64_t rows,
                                       int64_t threads);

#endif

/* SentencePiece's BPE over a GGUF's vocabulary where the memory-mapped file holds it: the
 * ids SentencePiece's processor gives for the model gemmakit builds from that vocabulary, and
 * its text for ids (formats/sentencepiece_bpe.py holds the same rules in Python, and the
 * tests hold both to SentencePiece and to each other).
 *
 * Encoding follows sentencepiece src/bpe_model.cc `Model::SampleEncode` (alpha 0): the text
 * (spaces escaped as U+2581 by the caller) splits into characters, a user-defined piece
 * starting at a character taken whole (the longest: its PrefixMatcher) and frozen; then,
 * while two neighbouring unfrozen symbols concatenate to a piece a merge may make (normal,
 * user-defined, unused), the pair of the highest score merges, ties to the leftmost pair (its
 * SymbolPairComparator), pairs that went stale since they were queued skipped as it skips
 * them. A final symbol is its piece's id (normal, user-defined, unused), or its UTF-8 bytes
 * as <0xNN> pieces (sentencepiece_processor.cc's byte fallback), or the unknown id (once for
 * a run of such symbols, as sentencepiece_processor.cc merges them). Symbols are ranges of
 * the text, so a pair's piece is the text's bytes from the left symbol's start: a lookup
 * hashes them where they lie.
 *
 * Lookups: every piece hashed by its bytes into an open-addressing table (linear probing,
 * half full), inserted in id order, so among equal pieces the lowest id is met first; a slot
 * holds id + 1 in its low bits and the hash's top bits above them, so most slots of other
 * pieces are passed over without reading the file. The user-defined pieces, as SentencePiece
 * holds them (spaces escaped), sit in a byte trie: the prefix match of the split and the first
 * answer for a merged piece, as in the Python backend.
 *
 * Decoding follows sentencepiece_processor.cc's DecodeIds: U+2581 as a space, control and
 * unknown pieces as nothing, a run of byte pieces as the UTF-8 they spell with each byte that
 * starts no valid character as U+FFFD (ProcessBytePieces); other pieces' bytes as Python's
 * decode(errors="replace") reads them (one U+FFFD per maximal invalid subpart), which is what
 * the Python backend does per piece.
 */
#include <stdlib.h>
#include <string.h>

#include "gemmakit_kernels.h"

/* sentencepiece_model.proto's ModelProto.SentencePiece.Type */
enum { PIECE_NORMAL = 1, PIECE_UNKNOWN = 2, PIECE_CONTROL = 3, PIECE_USER_DEFINED = 4, PIECE_UNUSED = 5, PIECE_BYTE = 6 };
/* model_interface.cc: the pieces a merge may make (`pieces_`) */
#define MERGEABLE ((1u << PIECE_NORMAL) | (1u << PIECE_USER_DEFINED) | (1u << PIECE_UNUSED))

/* --- hashing the pieces ------------------------------------------------------------------ */

/* murmur3's 64-bit finalizer */
static inline uint64_t mix64(uint64_t h) {
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    return h ^ (h >> 33);
}

static inline uint64_t piece_hash(const uint8_t *p, int64_t n) {
    uint64_t h = (uint64_t)n * 0x9e3779b97f4a7c15ULL;
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = mix64(h ^ w);
    }
    uint64_t w = 0;
    for (int64_t i = 0; i < n; i++) w |= (uint64_t)p[i] << (8 * i);
    return mix64(h ^ w);
}

/* bits of a slot holding id + 1 (0: empty); the rest hold the top of the piece's hash */
static inline int id_bits(int64_t count) { return 64 - __builtin_clzll((uint64_t)count | 1); }

static inline uint32_t slot_tag(uint64_t h, int bits) {
    return bits >= 32 ? 0 : (uint32_t)(h >> 32) & ~((1u << bits) - 1);
}

/* bump with any change to piece_hash, the slots' layout or the index's words */
int64_t bpe_index_version(void) { return 1; }

int64_t bpe_slot_count(int64_t count) {
    int64_t slots = 16;
    while (slots < 2 * count) slots *= 2;
    return slots;
}

static inline const uint8_t *piece_bytes(const BpeVocab *v, int64_t id, int64_t *n) {
    *n = (int64_t)v->offsets[id + 1] - v->offsets[id] - 8;
    return v->strings + v->offsets[id] + 8;
}

/* piece id's type and score, read where the file holds them (unaligned) */
static inline int32_t piece_type(const BpeVocab *v, int64_t id) {
    int32_t t;
    memcpy(&t, (const uint8_t *)v->types + 4 * id, 4);
    return t;
}

static inline float piece_score(const BpeVocab *v, int64_t id) {
    float f;
    memcpy(&f, (const uint8_t *)v->scores + 4 * id, 4);
    return f;
}

static inline int type_in(const BpeVocab *v, int64_t id, uint32_t kinds) {
    uint32_t t = (uint32_t)piece_type(v, id);
    return t < 32 && (kinds >> t & 1);
}

static inline int is_space(const uint8_t *p) { return p[0] == 0xe2 && p[1] == 0x96 && p[2] == 0x81; }

/* marks the bytes right before a U+2581 inside piece p[0, n) (see segment_starts) */
static void mark_joins(BpeVocab *v, const uint8_t *p, int64_t n) {
    for (int64_t k = 1; k + 3 <= n; k++)
        if (is_space(p + k)) v->joined_before_space[p[k - 1] >> 3] |= (uint8_t)(1u << (p[k - 1] & 7));
}

int64_t bpe_index(BpeVocab *v, int64_t size) {
    uint64_t at = 0;
    for (int64_t i = 0; i < v->count; i++) {
        uint64_t n;
        if (at + 8 > (uint64_t)size) return -1;
        memcpy(&n, v->strings + at, 8); /* GGUF is little-endian, as every target here */
        if (n > (uint64_t)size - at - 8) return -1;
        v->offsets[i] = (uint32_t)at;
        at += 8 + n;
        if (at >= (1ULL << 32)) return -1;
    }
    v->offsets[v->count] = (uint32_t)at;
    int bits = id_bits(v->count);
    uint64_t mask = (uint64_t)v->slot_count - 1;
    memset(v->slots, 0, (size_t)v->slot_count * sizeof *v->slots);
    memset(v->joined_before_space, 0, sizeof v->joined_before_space);
    enum { AHEAD = 32 }; /* hashes computed and their slots fetched this many pieces ahead */
    uint64_t hashes[AHEAD];
    for (int64_t first = 0; first < v->count; first += AHEAD) {
        int64_t last = first + AHEAD < v->count ? first + AHEAD : v->count;
        for (int64_t i = first; i < last; i++) {
            int64_t n;
            const uint8_t *p = piece_bytes(v, i, &n);
            if (type_in(v, i, MERGEABLE)) mark_joins(v, p, n);
            hashes[i - first] = piece_hash(p, n);
            __builtin_prefetch(&v->slots[hashes[i - first] & mask], 1);
        }
        for (int64_t i = first; i < last; i++) { /* in id order: the lowest id of a piece is met first */
            uint64_t h = hashes[i - first], s = h & mask;
            while (v->slots[s]) s = (s + 1) & mask;
            v->slots[s] = slot_tag(h, bits) | (uint32_t)(i + 1);
        }
    }
    return 0;
}

int64_t bpe_check_index(const BpeVocab *v, int64_t size) {
    if (v->slot_count != bpe_slot_count(v->count) || v->offsets[0] != 0 || v->offsets[v->count] > (uint64_t)size)
        return -1;
    for (int64_t i = 0; i < v->count; i++) {
        uint64_t n, at = v->offsets[i];
        if (v->offsets[i + 1] < at + 8) return -1;
        memcpy(&n, v->strings + at, 8);
        if (n != v->offsets[i + 1] - at - 8) return -1;
    }
    int bits = id_bits(v->count);
    uint32_t low = bits >= 32 ? 0xffffffffu : (1u << bits) - 1;
    for (int64_t s = 0; s < v->slot_count; s++)
        if ((v->slots[s] & low) > (uint64_t)v->count || (v->slots[s] && !(v->slots[s] & low))) return -1;
    return 0;
}

/* memcmp's answer for the few bytes of a piece, without a call */
static inline int same(const uint8_t *a, const uint8_t *b, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (a[i] != b[i]) return 0;
    return 1;
}

static int64_t find(const BpeVocab *v, const uint8_t *piece, int64_t n, uint32_t kinds) {
    int bits = id_bits(v->count);
    uint64_t h = piece_hash(piece, n), mask = (uint64_t)v->slot_count - 1;
    uint32_t tag = slot_tag(h, bits), low = bits >= 32 ? 0xffffffffu : (1u << bits) - 1;
    for (uint64_t s = h & mask; v->slots[s]; s = (s + 1) & mask) {
        uint32_t slot = v->slots[s];
        if ((slot & ~low) != tag) continue;
        int64_t id = (int64_t)(slot & low) - 1, size;
        const uint8_t *p = piece_bytes(v, id, &size);
        if (size == n && type_in(v, id, kinds) && same(p, piece, n)) return id;
    }
    return -1;
}

int64_t bpe_find(const BpeVocab *v, const uint8_t *piece, int64_t n, int64_t kinds) {
    return find(v, piece, n, (uint32_t)kinds);
}

/* --- the user-defined pieces' trie --------------------------------------------------------
 * words [0, 256): the node of each first byte (-1: none); then per node 4 words: its first
 * child, its next sibling, its byte, and the id of the piece ending there (-1: none) */
enum { TRIE_ROOTS = 256, CHILD = 0, SIBLING = 1, BYTE = 2, ID = 3 };

int64_t bpe_trie_words(int64_t total_bytes) { return TRIE_ROOTS + 4 * (total_bytes + 1); }

static inline int32_t *node(const BpeVocab *v, int32_t i) { return v->trie + TRIE_ROOTS + 4 * (int64_t)i; }

static int32_t child(const BpeVocab *v, int32_t parent, uint8_t byte) {
    for (int32_t c = node(v, parent)[CHILD]; c >= 0; c = node(v, c)[SIBLING])
        if (node(v, c)[BYTE] == byte) return c;
    return -1;
}

void bpe_user_pieces(BpeVocab *v, const uint8_t *pieces, const int64_t *ends, const int32_t *ids, int64_t n) {
    int32_t nodes = 0;
    for (int i = 0; i < TRIE_ROOTS; i++) v->trie[i] = -1;
    for (int64_t i = 0, start = 0; i < n; start = ends[i++]) {
        if (ends[i] == start) continue;
        mark_joins(v, pieces + start, ends[i] - start);
        int32_t at = -1;
        for (int64_t b = start; b < ends[i]; b++) {
            int32_t next = at < 0 ? v->trie[pieces[b]] : child(v, at, pieces[b]);
            if (next < 0) {
                next = nodes++;
                int32_t *fresh = node(v, next);
                fresh[CHILD] = -1, fresh[BYTE] = pieces[b], fresh[ID] = -1;
                if (at < 0) {
                    fresh[SIBLING] = -1;
                    v->trie[pieces[b]] = next;
                } else {
                    fresh[SIBLING] = node(v, at)[CHILD];
                    node(v, at)[CHILD] = next;
                }
            }
            at = next;
        }
        node(v, at)[ID] = ids[i];
    }
}

/* the longest user-defined piece text[0, n) starts with: its length (0: none), its id in *id */
static int64_t user_prefix(const BpeVocab *v, const uint8_t *text, int64_t n, int32_t *id) {
    int64_t best = 0;
    int32_t at = v->trie[text[0]];
    for (int64_t k = 1; at >= 0; k++) {
        if (node(v, at)[ID] >= 0) best = k, *id = node(v, at)[ID];
        if (k == n) break;
        at = child(v, at, text[k]);
    }
    return best;
}

/* the user-defined piece that is exactly piece[0, n), or -1 */
static int32_t user_piece(const BpeVocab *v, const uint8_t *piece, int64_t n) {
    int32_t at = v->trie[piece[0]];
    for (int64_t k = 1; k < n && at >= 0; k++) at = child(v, at, piece[k]);
    return at < 0 ? -1 : node(v, at)[ID];
}

/* the piece a merge may make of piece[0, n) (user-defined ones first), or -1 */
static inline int64_t mergeable(const BpeVocab *v, const uint8_t *piece, int64_t n) {
    int32_t user = v->trie[piece[0]] < 0 ? -1 : user_piece(v, piece, n);
    return user >= 0 ? user : find(v, piece, n, MERGEABLE);
}

/* --- encoding ----------------------------------------------------------------------------- */

typedef struct {
    int32_t start, size; /* the text's bytes [start, start + size); size 0: merged away */
    int32_t prev, next;  /* neighbours in the text (-1: none) */
    int32_t id;          /* its piece where known (a merge's, a user-defined piece's), else -1 */
    int32_t frozen;      /* a user-defined piece: never merged */
} Symbol;

typedef struct {
    float score;
    int32_t left, right, size, id;
} Pair;

typedef struct {
    Pair *items;
    int64_t count, room;
} Agenda;

/* SymbolPairComparator's order: the higher score first, then the leftmost pair */
static inline int before(const Pair *a, const Pair *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static int push(Agenda *q, Pair p) {
    if (q->count == q->room) {
        int64_t room = q->room ? 2 * q->room : 64;
        Pair *items = realloc(q->items, (size_t)room * sizeof *items);
        if (!items) return -1;
        q->items = items, q->room = room;
    }
    int64_t at = q->count++;
    while (at > 0 && before(&p, &q->items[(at - 1) / 2])) {
        q->items[at] = q->items[(at - 1) / 2];
        at = (at - 1) / 2;
    }
    q->items[at] = p;
    return 0;
}

static Pair pop(Agenda *q) {
    Pair top = q->items[0], last = q->items[--q->count];
    int64_t at = 0;
    for (;;) {
        int64_t c = 2 * at + 1;
        if (c >= q->count) break;
        if (c + 1 < q->count && before(&q->items[c + 1], &q->items[c])) c++;
        if (!before(&q->items[c], &last)) break;
        q->items[at] = q->items[c];
        at = c;
    }
    if (q->count) q->items[at] = last;
    return top;
}

/* queues the pair of symbols left and right where they concatenate to a mergeable piece */
static int consider(const BpeVocab *v, const uint8_t *text, const Symbol *s, int32_t left, int32_t right,
                    Agenda *q) {
    if (left < 0 || right < 0 || s[left].frozen || s[right].frozen) return 0;
    int32_t size = s[left].size + s[right].size;
    int64_t id = mergeable(v, text + s[left].start, size);
    if (id < 0) return 0;
    return push(q, (Pair){piece_score(v, id), left, right, size, (int32_t)id});
}

/* the text split into characters and user-defined pieces; the symbol count */
static int32_t split(const BpeVocab *v, const uint8_t *text, int64_t n, Symbol *s) {
    int32_t count = 0;
    for (int64_t at = 0; at < n;) {
        int32_t id = -1;
        int64_t size = v->trie[text[at]] < 0 ? 0 : user_prefix(v, text + at, n - at, &id);
        int frozen = size > 0;
        if (!frozen) { /* one UTF-8 character (the caller's text is valid UTF-8) */
            uint8_t lead = text[at];
            size = lead < 0x80 ? 1 : lead < 0xe0 ? 2 : lead < 0xf0 ? 3 : 4;
            if (size > n - at) size = n - at;
        }
        s[count] = (Symbol){(int32_t)at, (int32_t)size, count - 1, count + 1, id, frozen};
        count++;
        at += size;
    }
    if (count) s[count - 1].next = -1;
    return count;
}

/* a final symbol's ids into ids (the count): its piece's (a control piece of the same bytes
 * does not count: SentencePiece encodes such a symbol as an unknown one, measured), else its
 * bytes' pieces (byte fallback), else the unknown id, which sentencepiece_processor.cc writes
 * once for a run of unknown symbols (`unknown`: whether the ids so far end in one) */
static int64_t emit(const BpeVocab *v, const uint8_t *piece, const Symbol *s, int fallback, int *unknown,
                    int32_t *ids) {
    int64_t id = s->id >= 0 ? s->id : mergeable(v, piece, s->size);
    if (id < 0 && fallback) {
        for (int32_t b = 0; b < s->size; b++) ids[b] = v->byte_ids[piece[b]];
        *unknown = 0;
        return s->size;
    }
    if (id < 0) id = v->unk_id;
    int run = *unknown && id == v->unk_id;
    *unknown = id == v->unk_id;
    if (run) return 0;
    ids[0] = (int32_t)id;
    return 1;
}

/* Whether no merge can join symbol i to the one before it, so the symbols before and from i
 * merge on their own (each part's merges are the whole text's merges in that part, in the same
 * order: a smaller agenda, the same ids). A frozen symbol never merges; a merge across i makes
 * a piece holding the text's byte before i right before the U+2581 i starts with, and
 * `joined_before_space` holds each byte some piece has there (Gemma 3: '>' of ">▁</", and the
 * user-defined runs of U+2581). */
static inline int segment_starts(const BpeVocab *v, const uint8_t *text, const Symbol *s, int32_t i) {
    if (s[i].frozen || s[i - 1].frozen) return 1;
    uint8_t before = text[s[i].start - 1];
    return s[i].size == 3 && is_space(text + s[i].start) && !(v->joined_before_space[before >> 3] >> (before & 7) & 1);
}

/* the merges of symbols [first, last], linked among themselves only; 0, or -1 when out of memory */
static int merge(const BpeVocab *v, const uint8_t *text, Symbol *s, int32_t first, int32_t last, Agenda *q) {
    s[first].prev = -1, s[last].next = -1;
    q->count = 0;
    for (int32_t i = first; i < last; i++)
        if (consider(v, text, s, i, i + 1, q)) return -1;
    while (q->count) {
        Pair p = pop(q);
        Symbol *left = &s[p.left], *right = &s[p.right];
        /* a symbol of this pair merged since the pair was queued */
        if (!left->size || !right->size || left->size + right->size != p.size || left->next != p.right) continue;
        left->size = p.size, left->id = p.id;
        right->size = 0;
        left->next = right->next;
        if (right->next >= 0) s[right->next].prev = p.left;
        if (consider(v, text, s, left->prev, p.left, q) || consider(v, text, s, p.left, left->next, q)) return -1;
    }
    return 0;
}

int64_t bpe_encode(const BpeVocab *v, const uint8_t *text, int64_t n, int32_t *ids) {
    if (n <= 0) return 0;
    if (n >= (1LL << 31)) return -1;
    Symbol *s = malloc((size_t)n * sizeof *s);
    Agenda q = {0};
    if (!s) return -1;
    int32_t count = split(v, text, n, s);
    int64_t out = -1;
    for (int32_t first = 0, last; first < count; first = last + 1) {
        for (last = first; last + 1 < count && !segment_starts(v, text, s, last + 1);) last++;
        if (merge(v, text, s, first, last, &q)) goto done;
    }
    int fallback = 1; /* sentencepiece_processor.cc: byte fallback where the model has all 256 */
    for (int b = 0; b < 256; b++) fallback &= v->byte_ids[b] >= 0;
    out = 0;
    int unknown = 0;
    for (int32_t i = 0; i < count; i++) /* merges keep the left symbol: the survivors in order */
        if (s[i].size) out += emit(v, text + s[i].start, &s[i], fallback, &unknown, ids + out);
done:
    free(q.items);
    free(s);
    return out;
}

/* --- decoding ----------------------------------------------------------------------------- */

/* the length of the valid UTF-8 character p[0, n) starts with (Python's strict decoder: no
 * overlong forms, no surrogates, nothing past U+10FFFF), or 0; in *prefix, the length of its
 * longest start that a valid character could continue (at least 1: the maximal subpart
 * Python's errors="replace" replaces by one U+FFFD) */
static int utf8_char(const uint8_t *p, int64_t n, int *prefix) {
    uint8_t c = p[0];
    *prefix = 1;
    if (c < 0x80) return 1;
    int size;
    uint8_t lo = 0x80, hi = 0xbf; /* the second byte's range */
    if (c >= 0xc2 && c <= 0xdf) size = 2;
    else if (c >= 0xe0 && c <= 0xef) size = 3, lo = c == 0xe0 ? 0xa0 : 0x80, hi = c == 0xed ? 0x9f : 0xbf;
    else if (c >= 0xf0 && c <= 0xf4) size = 4, lo = c == 0xf0 ? 0x90 : 0x80, hi = c == 0xf4 ? 0x8f : 0xbf;
    else return 0;
    for (int k = 1; k < size; k++) {
        if (k >= n || p[k] < (k == 1 ? lo : 0x80) || p[k] > (k == 1 ? hi : 0xbf)) return 0;
        *prefix = k + 1;
    }
    return size;
}

static const uint8_t REPLACEMENT[3] = {0xef, 0xbf, 0xbd}; /* U+FFFD */

typedef struct {
    uint8_t *out;
    int64_t size, capacity;
} Output;

static inline void put(Output *o, const uint8_t *p, int64_t n) {
    if (o->size + n <= o->capacity) memcpy(o->out + o->size, p, (size_t)n);
    o->size += n;
}

/* a byte run: each valid character as it is, each other byte as U+FFFD; with more bytes to
 * come (not final), only the positions whose character lies whole in p (4 bytes ahead); the
 * bytes done */
static int64_t put_bytes(Output *o, const uint8_t *p, int64_t n, int final) {
    int64_t at = 0;
    while (final ? at < n : at + 4 <= n) {
        int prefix, size = utf8_char(p + at, n - at, &prefix);
        if (size) put(o, p + at, size), at += size;
        else put(o, REPLACEMENT, 3), at += 1;
    }
    return at;
}

/* a piece: U+2581 as a space, each maximal invalid subpart as U+FFFD */
static void put_piece(Output *o, const uint8_t *p, int64_t n) {
    static const uint8_t space = ' ';
    if (o->size + 3 * n > o->capacity) { /* near the end of the room (a byte's text is at most 3 bytes) */
        for (int64_t at = 0; at < n;) {
            int prefix, size = utf8_char(p + at, n - at, &prefix);
            if (!size) put(o, REPLACEMENT, 3), at += prefix;
            else if (size == 3 && is_space(p + at)) put(o, &space, 1), at += 3;
            else put(o, p + at, size), at += size;
        }
        return;
    }
    uint8_t *out = o->out + o->size;
    for (int64_t at = 0; at < n;) {
        if (p[at] < 0x80) { /* ASCII, most of most pieces */
            *out++ = p[at++];
            continue;
        }
        int prefix, size = utf8_char(p + at, n - at, &prefix);
        if (!size) memcpy(out, REPLACEMENT, 3), out += 3, at += prefix;
        else if (size == 3 && is_space(p + at)) *out++ = ' ', at += 3;
        else memcpy(out, p + at, (size_t)size), out += size, at += size;
    }
    o->size = out - o->out;
}

static inline int hex_digit(uint8_t c) { return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10; }

int64_t bpe_decode(const BpeVocab *v, const int32_t *ids, int64_t n, uint8_t *out, int64_t capacity) {
    Output o = {out, 0, capacity};
    uint8_t run[256]; /* the byte pieces since the last other piece, not yet written */
    int64_t pending = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= v->count) return -1 - i;
        int32_t type = piece_type(v, id);
        int64_t size;
        const uint8_t *p = piece_bytes(v, id, &size);
        if (type == PIECE_BYTE && size == 6) { /* "<0xNN>" */
            if (pending == (int64_t)sizeof run) {
                int64_t done = put_bytes(&o, run, pending, 0);
                memmove(run, run + done, (size_t)(pending - done));
                pending -= done;
            }
            run[pending++] = (uint8_t)(hex_digit(p[3]) << 4 | hex_digit(p[4]));
            continue;
        }
        if (pending) put_bytes(&o, run, pending, 1), pending = 0;
        if (type == PIECE_CONTROL || type == PIECE_UNKNOWN) continue;
        put_piece(&o, p, size);
    }
    if (pending) put_bytes(&o, run, pending, 1);
    return o.size;
}

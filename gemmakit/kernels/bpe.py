"""csrc/bpe.c over a GGUF's mapped vocabulary, torch-free: the lookups, encoding and decoding
`formats/sentencepiece_bpe.NativeSentencePieceBPE` calls."""

from __future__ import annotations

import array
import ctypes
import threading

import numpy as np

from gemmakit.kernels import bindings, build

# The decoding buffer kept for the next call: a text stream's few tokens at a time, up to a
# few thousand tokens of text at once; a longer text gets its own.
_KEPT_OUTPUT = 1 << 16
# Room for a text's bytes, per token: Gemma 3's tokens of English average 4.2-4.8 bytes and of
# C 2.6 (measured on benchmarks/tokenizer_speed.py's texts and csrc/bpe.c); more asks for a second call
_GUESS_BYTES_PER_ID = 8
# BpeVocab.joined_before_space's 32 bytes, as index words
_JOINED_WORDS = 8


# The kernels' library, or None where it cannot be built (one cache with kernels/cpu.py's)
library = build.kept_library


def kinds_mask(kinds) -> int:
    """`bpe_find`'s bit mask of SentencePiece piece types."""
    return sum(1 << k for k in set(kinds))


def cache_prefix(lib) -> str:
    """The tokenizer cache's name for this library's indexes (`tokenizer_cache.read_index`)."""
    return f"bpec{lib.bpe_index_version()}"


def index_words(lib, count: int) -> int:
    """uint32 words of a vocabulary's index (`Vocabulary.index`) for `count` pieces."""
    return count + 1 + lib.bpe_slot_count(count) + _JOINED_WORDS


class Vocabulary:
    """A GGUF's pieces (`strings`: the file's tokenizer.ggml.tokens array as stored, `scores`
    float32 and `types` int32 arrays over the mapped file) indexed by csrc/bpe.c: `index`,
    uint32 words (`index_words`) holding each piece's offset in `strings` and the end
    (`offsets`), the pieces' hash table and `joined_before_space` (3 MB for Gemma 3's 262k
    pieces). `cached` is one read back (`built` False; it may be mapped: C only reads it)
    where it fits the pieces, else it is built (`built` True: worth keeping). Raises
    ValueError where the array does not hold `len(types)` strings. `find` answers at once;
    encoding waits for `set_pieces`."""

    def __init__(self, lib, strings, scores: np.ndarray, types: np.ndarray, cached: np.ndarray | None = None):
        count = len(types)
        self.lib = lib
        # the buffers C reads: the file's own (kept alive here) and the index
        self._strings = np.frombuffer(strings, dtype=np.uint8)
        self._scores = np.ascontiguousarray(scores, dtype=np.float32)
        self._types = np.ascontiguousarray(types, dtype=np.int32)
        vocab = bindings.declarations().structs["BpeVocab"]()
        vocab.strings, vocab.scores, vocab.types, vocab.count = (
            self._strings.ctypes.data, self._scores.ctypes.data, self._types.ctypes.data, count,
        )  # fmt: skip
        vocab.slot_count = lib.bpe_slot_count(count)
        vocab.byte_ids[:] = [-1] * 256
        self._vocab, self._ref = vocab, ctypes.byref(vocab)
        # decoding's output buffer, kept: a text stream decodes each token, and a call that
        # allocates its own costs as much as the decoding
        self._out, self._lock = (ctypes.c_char * 4096)(), threading.Lock()
        words = index_words(lib, count)
        if cached is not None and cached.shape == (words,) and cached.dtype == np.uint32:
            self._use_index(cached)
            self.built = lib.bpe_check_index(self._ref, len(self._strings)) != 0
        else:
            self.built = True
        if self.built:
            self._use_index(np.empty(words, dtype=np.uint32))
            if lib.bpe_index(self._ref, len(self._strings)) != 0:
                raise ValueError("the vocabulary's strings do not hold its pieces (or pass 4 GB)")
            self.index[-_JOINED_WORDS:] = np.frombuffer(bytes(vocab.joined_before_space), dtype=np.uint32)
        else:
            vocab.joined_before_space[:] = self.index[-_JOINED_WORDS:].tobytes()

    def _use_index(self, index: np.ndarray) -> None:
        """Points the vocabulary at `index` (bpe_index fills it, or a cached one holds it)."""
        count, vocab = self._vocab.count, self._vocab
        self.index, self.offsets = index, index[: count + 1]
        vocab.offsets, vocab.slots = self.offsets.ctypes.data, index[count + 1 :].ctypes.data

    def set_pieces(self, user_pieces: dict[bytes, int], byte_ids: list[int | None], unk_id: int) -> None:
        """The user-defined pieces as SentencePiece holds them (spaces escaped) with their
        ids, the <0xNN> pieces' ids (None: missing) and the unknown id."""
        forms = b"".join(user_pieces)
        self._trie = np.empty(self.lib.bpe_trie_words(len(forms)), dtype=np.int32)
        self._vocab.trie = self._trie.ctypes.data
        ends = np.cumsum([len(p) for p in user_pieces], dtype=np.int64)
        ids = np.fromiter(user_pieces.values(), dtype=np.int32, count=len(user_pieces))
        self.lib.bpe_user_pieces(self._ref, forms, ends.ctypes.data, ids.ctypes.data, len(ids))
        self._vocab.byte_ids[:] = [-1 if i is None else i for i in byte_ids]
        self._vocab.unk_id = unk_id

    def find(self, piece: bytes, mask: int) -> int | None:
        """The lowest id of `piece` among the piece types in `mask` (`kinds_mask`), or None."""
        found = self.lib.bpe_find(self._ref, piece, len(piece), mask)
        return None if found < 0 else found

    def encode(self, text: bytes) -> list[int]:
        """The ids of UTF-8 `text` whose spaces are escaped already."""
        ids = (ctypes.c_int32 * len(text))()  # a piece per byte at most (byte fallback)
        count = self.lib.bpe_encode(self._ref, text, len(text), ids)
        if count < 0:
            raise MemoryError("tokenizing the text")
        return ids[:count]

    def decode(self, ids) -> str:
        """The text of `ids` (ints) as SentencePiece decodes them; IndexError for an id
        outside the vocabulary."""
        n = len(ids)
        # a short list straight into a ctypes array, a longer one through array.array (faster from 16 on)
        ids = (
            (ctypes.c_int32 * n)(*ids) if n <= 8 else (ctypes.c_int32 * n).from_buffer(array.array("i", ids))
        )
        with self._lock:  # the kept buffer is one call's at a time
            out = self._out
            if len(out) < _GUESS_BYTES_PER_ID * n:
                out = (ctypes.c_char * (_GUESS_BYTES_PER_ID * n))()
            size = self.lib.bpe_decode(self._ref, ids, n, out, len(out))
            if size > len(out):  # an unusual text: decoded again into room for it
                out = (ctypes.c_char * size)()
                size = self.lib.bpe_decode(self._ref, ids, n, out, size)
            if len(out) <= _KEPT_OUTPUT:
                self._out = out
            text = out[:size]
        if size < 0:
            raise IndexError(f"token id {ids[-1 - size]} is outside the vocabulary")
        return text.decode("utf-8")

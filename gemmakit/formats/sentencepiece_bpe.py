"""SentencePiece's BPE encoding and decoding over a GGUF's own vocabulary, in place.

A SentencePiece processor built from Gemma 3's 262k-piece vocabulary holds ~38 MiB of its own
(measured), a Python dict of the pieces ~30 MiB more; these backends keep an index of 3 MB
(each piece's offset in the file and a hash of the pieces: csrc/bpe.c's table, or the Python
fallback's sorted CRC-32 keys) and read the pieces, scores and types where the memory-mapped
GGUF holds them. `NativeSentencePieceBPE` encodes and decodes in C (kernels/bpe.py) where the
kernels library builds (encoding 3-6x faster than SentencePiece, decoding 1-3x: README,
benchmarks/tokenizer_speed.py); `SentencePieceBPE` holds the same rules in Python. Both compute
what SentencePiece computes for the model `formats/tokenizer.py` builds from such a
vocabulary (`_sentencepiece_proto`: BPE, identity normalization that escapes spaces as "▁",
no dummy prefix, byte fallback), following sentencepiece's bpe_model.cc `Model::SampleEncode`:

- the text's spaces become "▁"; it splits into characters, where a user-defined piece that
  starts at a character is taken whole (the longest one), frozen;
- while two neighbouring symbols concatenate to a piece (normal, user-defined or unused), the
  pair of the highest score is merged (ties: the leftmost pair);
- a final symbol is its piece's id (never a control piece's: SentencePiece encodes one as
  unknown), or, outside the vocabulary, its UTF-8 bytes as <0xNN> pieces (byte fallback),
  else the unknown id (one for a run of such symbols).

Decoding writes "▁" as a space and runs of byte pieces as the UTF-8 they spell (an invalid
byte as U+FFFD, as SentencePiece does); control and unknown pieces are the `Tokenizer`'s
business (it never hands them here). `tests/test_sentencepiece_bpe.py` checks both against
SentencePiece and each other, on the bundled vocabulary and made-up ones. Vocabularies with
unused pieces (which SentencePiece re-splits after merging) are left to SentencePiece
(`build` returns None).
"""

from __future__ import annotations

import bisect
import heapq
import struct
import zlib

import numpy as np

from gemmakit.errors import GemmakitError
from gemmakit.formats import tokenizer_cache
from gemmakit.kernels import bpe

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"
_SPACE_BYTES = SPACE.encode()
_STRING, _FLOAT32, _INT32 = 8, 6, 5  # GGUF value types
# The longest id list `NativeSentencePieceBPE` decodes in Python
_PYTHON_DECODE = 2
# Pieces a merge may produce (sentencepiece model_interface.cc: `pieces_`); the others
# (control, unknown, byte) are only found whole.
_MERGEABLE = (NORMAL, USER_DEFINED, UNUSED)


def index(data: memoryview, count: int) -> np.ndarray:
    """The lookup index of `count` GGUF strings in `data`: uint32 (3, count + 1) holding each
    piece's offset in `data` (and the end), the pieces' keys (CRC-32: stable across
    processes, unlike Python's `hash`; a key's pieces are compared byte for byte) sorted, and
    the ids in that order (equal keys: the lower id first). One pass (~0.2 s for 262k
    pieces), kept in the tokenizer cache (`tokenizer_cache.read_index`); the Python
    backend's (csrc/bpe.c builds its own)."""
    offsets = np.empty(count + 1, dtype=np.int64)
    keys = np.empty(count, dtype=np.int64)
    unpack, at = struct.Struct("<Q").unpack_from, 0
    for i in range(count):
        n = unpack(data, at)[0]
        offsets[i] = at
        keys[i] = zlib.crc32(data[at + 8 : at + 8 + n])
        at += 8 + n
    offsets[count] = at
    order = np.argsort(keys, kind="stable")
    if at >= 2**32:
        raise ValueError("a vocabulary of 4 GB")
    table = np.zeros((3, count + 1), dtype=np.uint32)  # 3 MB for 262k pieces
    table[0], table[1, :count], table[2, :count] = offsets, keys[order], order
    return table


def _ints(values: np.ndarray, fmt: str) -> memoryview:
    """A 1-D array as a memoryview whose items are Python ints (~10x faster to index than
    numpy scalars, and `bisect` searches it in C)."""
    return memoryview(np.ascontiguousarray(values, dtype=np.dtype(fmt))).cast("B").cast(fmt)


class SentencePieceBPE:
    """`encode_as_ids(text)` and `decode_ids(ids)` as SentencePiece's processor answers them
    for the model built from the same vocabulary, plus the lookups `Tokenizer` makes
    (`GetPieceSize`, `IdToPiece`, `PieceToId`): in Python, over `index`'s table (the
    fallback where the kernels cannot be built; `NativeSentencePieceBPE` runs csrc/bpe.c)."""

    def __init__(self, data: memoryview, table: np.ndarray, scores: np.ndarray, types: np.ndarray):
        count = len(types)
        self._keys, self._ids = _ints(table[1, :count], "I"), _ints(table[2, :count], "I")
        self._setup(data, table[0], scores, types)

    def _setup(self, data: memoryview, offsets: np.ndarray, scores: np.ndarray, types: np.ndarray):
        """What both backends hold: the file's pieces, the user-defined ones, the byte and
        unknown ids (`_find` answers already)."""
        self._data, self._scores = data, scores
        self._offsets, self._kinds = _ints(offsets, "I"), _ints(types, "i")
        self._user_defined = {self._bytes(int(i)).decode("utf-8", "replace").replace(" ", SPACE): int(i)
                              for i in np.flatnonzero(types == USER_DEFINED)}  # fmt: skip
        self._user_lengths = sorted({len(p) for p in self._user_defined}, reverse=True)
        self._user_starts = {p[0] for p in self._user_defined if p}
        self._byte_ids = [self._find(f"<0x{b:02X}>".encode(), (BYTE,)) for b in range(256)]
        unknown = np.flatnonzero(types == UNKNOWN)
        # as `tokenizer._sentencepiece_proto` names it: the UNKNOWN piece, else "<unk>", else id 3
        named = self._find(b"<unk>", tuple(range(7)))
        self.unk_id = int(unknown[0]) if len(unknown) else (3 if named is None else named)

    def _bytes(self, i: int) -> bytes:
        """Piece i's bytes as the file stores them."""
        return bytes(self._data[self._offsets[i] + 8 : self._offsets[i + 1]])

    def _find(self, piece: bytes, kinds: tuple[int, ...]) -> int | None:
        """The lowest id of `piece` among pieces of `kinds`, or None."""
        key, keys, offsets = zlib.crc32(piece), self._keys, self._offsets
        at = bisect.bisect_left(keys, key)
        while at < len(keys) and keys[at] == key:
            i = self._ids[at]
            if self._kinds[i] in kinds and self._data[offsets[i] + 8 : offsets[i + 1]] == piece:
                return i
            at += 1
        return None

    def _score(self, i: int) -> float:
        return float(self._scores[i])

    def _mergeable(self, piece: str) -> int | None:
        """The id of a piece a merge may make (SentencePiece's `pieces_`), or None."""
        found = self._user_defined.get(piece)  # held with real spaces in the file
        return found if found is not None else self._find(piece.encode(), _MERGEABLE)

    def _piece_id(self, piece: str) -> int | None:
        """SentencePiece's PieceToId: control, unknown and byte pieces first, then the others;
        None where it answers the unknown id."""
        found = self._find(piece.encode(), (CONTROL, UNKNOWN, BYTE))
        return found if found is not None else self._mergeable(piece)

    # --- encoding --------------------------------------------------------------------------

    def _symbols(self, text: str) -> tuple[list[str], list[bool]]:
        """The normalized text split into characters, user-defined pieces taken whole (frozen)."""
        symbols, frozen = [], []
        i, n = 0, len(text)
        starts = self._user_starts
        while i < n:
            if text[i] not in starts:
                symbols.append(text[i])
                frozen.append(False)
                i += 1
                continue
            for length in self._user_lengths:
                if text[i : i + length] in self._user_defined:
                    symbols.append(text[i : i + length])
                    frozen.append(True)
                    i += length
                    break
            else:
                symbols.append(text[i])
                frozen.append(False)
                i += 1
        return symbols, frozen

    def encode_as_ids(self, text: str) -> list[int]:
        if not text:
            return []
        utf8_text(text)
        symbols, frozen = self._symbols(text.replace(" ", SPACE))
        n = len(symbols)
        prev, nxt = list(range(-1, n - 1)), [*range(1, n), -1]
        agenda: list = []
        seen: dict[str, int | None] = {}  # a text's pairs repeat: each looked up once

        def add_pair(left: int, right: int):
            if left < 0 or right < 0 or frozen[left] or frozen[right]:
                return
            merged = symbols[left] + symbols[right]
            found = seen[merged] if merged in seen else seen.setdefault(merged, self._mergeable(merged))
            if found is not None:  # best score first, then the leftmost pair
                heapq.heappush(agenda, (-self._score(found), left, right, len(merged)))

        for i in range(n - 1):
            add_pair(i, i + 1)
        while agenda:
            _, left, right, size = heapq.heappop(agenda)
            if not symbols[left] or not symbols[right] or len(symbols[left]) + len(symbols[right]) != size:
                continue  # a symbol of this pair was merged since it was queued
            if nxt[left] != right:
                continue
            symbols[left] += symbols[right]
            symbols[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add_pair(prev[left], left)
            add_pair(left, nxt[left])
        ids: list[int] = []
        fallback, unknown = all(b is not None for b in self._byte_ids), False
        for symbol in symbols:
            if not symbol:
                continue
            # its piece, never a control one of the same bytes (SentencePiece encodes such a
            # symbol as unknown: measured)
            found = self._mergeable(symbol)
            if found is None and fallback:
                ids += [self._byte_ids[b] for b in symbol.encode()]
                unknown = False
                continue
            found = self.unk_id if found is None else found
            # sentencepiece_processor.cc writes a run of unknown symbols as one unknown id
            if not (unknown and found == self.unk_id):
                ids.append(found)
            unknown = found == self.unk_id
        return ids

    # --- decoding --------------------------------------------------------------------------

    def decode_ids(self, ids) -> str:
        out, pending = [], bytearray()
        for i in ids:
            i = int(i)
            kind = self._kinds[i]
            if kind == BYTE:
                pending.append(int(self._bytes(i)[3:5], 16))  # "<0xNN>"
                continue
            if pending:
                out.append(_utf8_or_replacement(bytes(pending)))
                pending.clear()
            if kind in (CONTROL, UNKNOWN):
                continue
            out.append(self._bytes(i).replace(_SPACE_BYTES, b" ").decode("utf-8", "replace"))
        if pending:
            out.append(_utf8_or_replacement(bytes(pending)))
        return "".join(out)

    # --- the lookups Tokenizer makes ------------------------------------------------------

    def GetPieceSize(self) -> int:  # noqa: N802 - SentencePieceProcessor's name
        return len(self._kinds)

    def IdToPiece(self, ids):  # noqa: N802
        """A piece (user-defined ones with spaces escaped, as the built model holds them), or
        a list of them for a list of ids (`Tokenizer` asks for the ~6k control pieces at
        each load: decoded from the mapped bytes, no copy)."""
        if not isinstance(ids, (list, tuple)):
            return self.IdToPiece([ids])[0]
        data, offsets, kinds, pieces = self._data, self._offsets, self._kinds, []
        for i in ids:
            piece = str(data[offsets[i] + 8 : offsets[i + 1]], "utf-8", "replace")
            pieces.append(piece.replace(" ", SPACE) if kinds[i] == USER_DEFINED else piece)
        return pieces

    def PieceToId(self, piece: str) -> int:  # noqa: N802
        found = self._piece_id(piece)
        return self.unk_id if found is None else found


class NativeSentencePieceBPE(SentencePieceBPE):
    """The same answers from csrc/bpe.c (`kernels/bpe.Vocabulary`): the merge loop, the
    lookups and decoding in C over the mapped pieces."""

    def __init__(self, data: memoryview, vocabulary, scores: np.ndarray, types: np.ndarray):
        self._native = vocabulary
        self._setup(data, vocabulary.offsets, scores, types)
        user_pieces = {piece.encode(): i for piece, i in self._user_defined.items()}
        vocabulary.set_pieces(user_pieces, self._byte_ids, self.unk_id)

    def _find(self, piece: bytes, kinds: tuple[int, ...]) -> int | None:
        return self._native.find(piece, bpe.kinds_mask(kinds))

    def encode_as_ids(self, text: str) -> list[int]:
        return self._native.encode(utf8_text(text.replace(" ", SPACE))) if text else []

    def decode_ids(self, ids) -> str:
        # a text stream's token and its context: the Python loop costs less than a C call
        # (~1.5 against ~2.2 us, benchmarks/tokenizer_speed.py's "stream"); the same text
        return super().decode_ids(ids) if len(ids) <= _PYTHON_DECODE else self._native.decode(ids)


def utf8_text(text: str) -> bytes:
    """`text` as UTF-8; a GemmakitError where it holds a lone surrogate (Python's stand-in for
    a command-line byte that is not UTF-8), which no tokenizer can read."""
    try:
        return text.encode()
    except UnicodeEncodeError as e:
        raise GemmakitError(
            f"the text holds {text[e.start]!r} at character {e.start}, not a Unicode character "
            "(a byte that is not UTF-8?)"
        ) from None


def _utf8_or_replacement(data: bytes) -> str:
    """Bytes as UTF-8 text, each byte of an invalid sequence as U+FFFD (sentencepiece's
    ProcessBytePieces), not Python's one U+FFFD per maximal invalid run."""
    out, i = [], 0
    while i < len(data):
        for size in (1, 2, 3, 4):
            try:
                out.append(data[i : i + size].decode("utf-8"))
            except UnicodeDecodeError:
                continue
            i += size
            break
        else:
            out.append("\ufffd")
            i += 1
    return "".join(out)


def build(metadata, source: str = "GGUF", native: bool = True) -> SentencePieceBPE | None:
    """The backend over a GGUF header's SentencePiece vocabulary (`GGUFMetadata`), or None
    where SentencePiece itself must run it (unused pieces, a non-array or odd layout): csrc/bpe.c
    where the kernels build (and `native`), else the Python one; each over its index, read
    from the tokenizer cache or built and kept there."""
    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    if not hasattr(metadata, "array_bytes") or any(k not in metadata for k in keys):
        return None
    kind, count, data = metadata.array_bytes(keys[0])
    score_kind, score_count, score_bytes = metadata.array_bytes(keys[1])
    type_kind, type_count, type_bytes = metadata.array_bytes(keys[2])
    if (kind, score_kind, type_kind) != (_STRING, _FLOAT32, _INT32) or not count == score_count == type_count:
        return None
    scores = np.frombuffer(score_bytes, dtype="<f4")
    types = np.frombuffer(type_bytes, dtype="<i4")
    if (types == UNUSED).any() or (types == UNKNOWN).sum() > 1:
        return None
    lib = bpe.library() if native else None
    if lib is not None:
        shape, prefix = (bpe.index_words(lib, count),), bpe.cache_prefix(lib)
        cached = tokenizer_cache.read_index(metadata, shape, prefix, mapped=True)
        try:
            vocabulary = bpe.Vocabulary(lib, data, scores, types, cached)
        except ValueError:
            return None
        if vocabulary.built:
            tokenizer_cache.write_index(metadata, vocabulary.index, source, prefix)
        return NativeSentencePieceBPE(data, vocabulary, scores, types)
    table = tokenizer_cache.read_index(metadata, (3, count + 1))
    if table is None:
        try:
            table = index(data, count)
        except ValueError:
            return None
        tokenizer_cache.write_index(metadata, table, source)
    return SentencePieceBPE(data, table, scores, types)

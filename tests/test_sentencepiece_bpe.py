"""formats/sentencepiece_bpe.py: SentencePiece's BPE over the GGUF's mapped vocabulary gives
SentencePiece's own ids and text (the bundled Gemma 3 vocabulary: 262k pieces, byte
fallback, user-defined whitespace and markup pieces), in C (csrc/bpe.c) and in Python alike;
and so on a small made-up vocabulary whose pieces join across spaces, repeat, and lack bytes."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys

import numpy as np
import pytest

from gemmakit.formats import sentencepiece_bpe
from gemmakit.formats.gguf import GGUFFile
from gemmakit.formats.tokenizer import Tokenizer
from gemmakit.loading import default_gguf

TEXTS = [
    "Hello world",
    "  leading spaces,\ttabs\n\nand newlines\n",
    "naïve café — “quotes” 日本語のテキスト 😀🎉",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "x" * 50,
    "    def f(x):\n        return x ** 2\n",
    "Ünïcödé ßtraße Ελληνικά русский עברית العربية",
    "\u200b\u2028odd\ufeffchars \x00\x01 control",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math and a\u0301 combining",
    "<table><tr><td>1</td></tr></table> [multimodal] <unk> <0x41>",
    "a\r\nb\r\n \u3000全角\u3000スペース 한국어 ﬁﬂ ½ ² ㎏",
    " " * 40 + "x" + "\n" * 30 + "\t" * 17,
    # ">▁</" is the one piece of the vocabulary that joins across a space (csrc/bpe.c splits
    # the text elsewhere before spaces)
    "<b> </b> <i>x</i> > </ a>  </ >   </p> ></",
    "👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 ⌘⌥ \U0001f9d1\u200d\U0001f52c",
    "Supercalifragilisticexpialidocious" * 8 + " pneumonoultramicroscopicsilicovolcanoconiosis",
    "x" * 3000,
    "ab" * 1500 + " " + "日本" * 700,
    "for (int i = 0; i < n; i++) {\n\tif (a[i] != b[i]) return -1;\n}\n# comment // ok\n",
    "\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n  \t \n ",
    "\U0010ffff\ue000\ufffd\u00ad soft\u00adhyphen",
    " ",
    "a",
]


@pytest.fixture(scope="module")
def vocabularies():
    g = GGUFFile(default_gguf())
    reference = Tokenizer.from_gguf_metadata(g.metadata, "bundled")  # SentencePiece's processor
    in_place = Tokenizer.from_gguf_metadata(g.metadata, "bundled", in_place=True)
    assert isinstance(in_place.backend, sentencepiece_bpe.NativeSentencePieceBPE)
    return reference, in_place


@pytest.fixture(scope="module")
def python_backend():
    backend = sentencepiece_bpe.build(GGUFFile(default_gguf()).metadata, native=False)
    assert type(backend) is sentencepiece_bpe.SentencePieceBPE
    return backend


def _random_texts(count: int) -> list[str]:
    rng = random.Random(0)
    alphabet = "abcdefghij ABC\n\t.,!?-éü日本😀▁<>/ "
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 80))) for _ in range(count)]
    return texts + ["".join(chr(rng.randrange(32, 0x3000)) for _ in range(40)) for _ in range(count // 3)]


def test_ids_and_text_equal_sentencepiece(vocabularies):
    reference, in_place = vocabularies
    for text in TEXTS + _random_texts(300):
        ids = reference.encode(text)
        assert in_place.encode(text) == ids, text
        assert in_place.decode(ids) == reference.decode(ids), text
        assert in_place.decode(ids, skip_special=False) == reference.decode(ids, skip_special=False)


def test_byte_pieces_decode_as_sentencepiece_does(vocabularies):
    reference, in_place = vocabularies
    byte = [in_place.backend.PieceToId(f"<0x{b:02X}>") for b in b"\xe6\x97\xa5\xe2\x82 \xff"]
    assert reference.decode(byte) == in_place.decode(byte)  # an invalid byte: one U+FFFD each
    assert in_place.decode(byte).count("\ufffd") == 3


def test_named_ids_and_pieces_equal_sentencepiece(vocabularies):
    reference, in_place = vocabularies
    for name in (
        "bos_id",
        "eos_id",
        "pad_id",
        "end_of_turn_id",
        "start_of_turn_id",
        "stop_ids",
        "vocab_size",
    ):
        assert getattr(in_place, name) == getattr(reference, name), name
    assert in_place.special_ids == reference.special_ids
    sp, ours = reference.backend, in_place.backend
    for i in np.random.default_rng(0).integers(0, sp.GetPieceSize(), 2000).tolist() + [0, 1, 2, 3, 106]:
        piece = sp.IdToPiece(i)
        assert ours.IdToPiece(i) == piece
        assert ours.PieceToId(piece) == sp.PieceToId(piece)
    chat = [{"role": "user", "content": "hi"}]
    assert in_place.apply_chat_template(chat) == reference.apply_chat_template(chat)


@pytest.mark.parametrize("native", [True, False])
def test_the_index_is_cached_and_rebuilt_when_damaged(native):
    from gemmakit.formats import tokenizer_cache
    from gemmakit.kernels import bpe

    g = GGUFFile(default_gguf())
    count = len(g.metadata["tokenizer.ggml.token_type"])
    prefix, shape = tokenizer_cache.PYTHON_INDEX, (3, count + 1)
    if native:
        prefix, shape = bpe.cache_prefix(bpe.library()), (bpe.index_words(bpe.library(), count),)
    first = sentencepiece_bpe.build(g.metadata, native=native)  # the session cache holds its index now
    assert isinstance(first, sentencepiece_bpe.NativeSentencePieceBPE) == native
    path = tokenizer_cache._index_folder(g.metadata, prefix) / tokenizer_cache.INDEX_FILE
    assert path.exists()
    if native:
        assert not sentencepiece_bpe.build(g.metadata)._native.built  # read back, checked
        good = np.load(path)
        for at, value in ((100, good[100] + 1), (count + 1 + 5, 0xFFFFFFFF), (count + 1 + 7, 1 << 31)):
            table = good.copy()
            table[at] = value  # an offset that does not fit the pieces, a slot of no piece
            np.save(path, table)
            assert sentencepiece_bpe.build(g.metadata)._native.built  # refused: built again
            assert not sentencepiece_bpe.build(g.metadata)._native.built
    path.write_bytes(b"damaged")
    again = sentencepiece_bpe.build(g.metadata, native=native)
    assert again.encode_as_ids("Hello there") == first.encode_as_ids("Hello there") == [9259, 993]
    assert tokenizer_cache.read_index(g.metadata, shape, prefix) is not None


# --- csrc/bpe.c against the Python backend and SentencePiece -----------------------------------


def test_c_and_python_backends_give_the_same_ids_and_text(vocabularies, python_backend):
    native = vocabularies[1].backend
    assert native.encode_as_ids("") == python_backend.encode_as_ids("") == []
    for text in TEXTS + _random_texts(300):
        ids = python_backend.encode_as_ids(text)
        assert native.encode_as_ids(text) == ids, text
        assert native.decode_ids(ids) == python_backend.decode_ids(ids), text


def test_a_long_text_equals_sentencepiece(vocabularies):
    # ~20k tokens in one call: many parts merged apart, one agenda reused
    from gemmakit.paths import DATA

    reference, in_place = vocabularies
    text = "\n\n".join(p.read_text() for p in sorted(DATA.glob("*.txt"))) * 3
    ids = reference.backend.encode_as_ids(text)
    assert len(ids) > 10_000
    assert in_place.backend.encode_as_ids(text) == ids
    assert in_place.backend.decode_ids(ids) == reference.backend.decode_ids(ids) == text


def test_any_ids_decode_as_sentencepiece_decodes_them(vocabularies, python_backend):
    reference, in_place = vocabularies
    sp, native = reference.backend, in_place.backend
    rng = np.random.default_rng(1)
    size = sp.GetPieceSize()
    byte_ids = [native.PieceToId(f"<0x{b:02X}>") for b in range(256)]
    for _ in range(200):
        # mostly byte pieces, so runs of them spell valid and invalid UTF-8 across ids
        ids = [int(rng.integers(0, size)) if rng.random() < 0.3 else byte_ids[int(rng.integers(0, 256))]
               for _ in range(int(rng.integers(1, 40)))]  # fmt: skip
        text = sp.decode_ids(ids)
        assert native.decode_ids(ids) == text == python_backend.decode_ids(ids), ids
        assert native._native.decode(ids) == text  # C also for the short lists decoded in Python
    # longer than decoding's first guess of room (8 bytes a token): the 31-space piece, and
    # 3-byte U+FFFD for each lone byte
    spaces, lone = native.PieceToId("\u2581" * 31), byte_ids[0xFF]
    for ids in ([spaces] * 1000, [lone] * 5000, [spaces, lone] * 700 + [9259] * 100):
        assert native.decode_ids(ids) == sp.decode_ids(ids) == python_backend.decode_ids(ids)
    for ids in (np.array([9259, 1902]), np.array([9259, 1902] * 10, dtype=np.int32)):  # numpy ids too
        assert native.decode_ids(ids) == native._native.decode(ids) == "Hello world" * (len(ids) // 2)
    with pytest.raises(IndexError):
        native.decode_ids([9259, size])


def test_without_the_kernels_the_python_backend_runs(monkeypatch):
    from gemmakit.kernels import bpe

    monkeypatch.setattr(bpe, "library", lambda: None)
    backend = sentencepiece_bpe.build(GGUFFile(default_gguf()).metadata)
    assert type(backend) is sentencepiece_bpe.SentencePieceBPE
    assert backend.encode_as_ids("Hello world") == [9259, 1902]


# --- a made-up vocabulary: pieces across spaces, user-defined pieces with spaces, duplicates ---

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = (sentencepiece_bpe.NORMAL, sentencepiece_bpe.UNKNOWN,
    sentencepiece_bpe.CONTROL, sentencepiece_bpe.USER_DEFINED, sentencepiece_bpe.BYTE)  # fmt: skip
ALPHABET = "abcx/<>é日\u2581"


class _Header(dict):
    """A GGUF header's tokenizer arrays, as `sentencepiece_bpe.build` reads them."""

    def array_bytes(self, key: str):
        values = self[key]
        if key == "tokenizer.ggml.tokens":
            data = b"".join(struct.pack("<Q", len(p.encode())) + p.encode() for p in values)
            return 8, len(values), memoryview(data)
        if key == "tokenizer.ggml.scores":
            return 6, len(values), memoryview(np.asarray(values, dtype="<f4").tobytes())
        return 5, len(values), memoryview(np.asarray(values, dtype="<i4").tobytes())


def _made_up_vocabulary(
    seed: int, byte_fallback: bool, duplicates: bool = False, joined: str = ALPHABET
) -> _Header:
    """Special pieces, the alphabet's characters, user-defined pieces (with real spaces, as
    llama.cpp writes them), <0xNN> pieces or none, then 400 random pieces of 2-6 characters
    with distinct random scores, U+2581 inside them (joining across spaces) only after a
    character of `joined` (elsewhere csrc/bpe.c merges the text's parts apart)."""
    rng = random.Random(seed)
    # "q": a control piece the text can hold, which SentencePiece's PieceToId finds first
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<start>", "q"]
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN, CONTROL, CONTROL]
    user = ["\n", "  ", "   ", "<x>", "a c", "日日", "> <"]
    pieces += user + list(ALPHABET)
    types += [USER_DEFINED] * len(user) + [NORMAL] * len(ALPHABET)
    if byte_fallback:
        pieces += [f"<0x{b:02X}>" for b in range(256)]
        types += [BYTE] * 256
    known = {p.replace(" ", "\u2581") for p in pieces}
    while len(pieces) < 700 + 256 * byte_fallback:
        piece = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(2, 7)))
        if any(c == "\u2581" and piece[i - 1] not in joined for i, c in enumerate(piece) if i):
            continue
        if piece not in known or (duplicates and rng.random() < 0.3):
            known.add(piece)
            pieces.append(piece)
            types.append(NORMAL)
    scores = [-1000.0 - i for i in range(len(pieces))]
    merged = list(range(len(pieces) - 400, len(pieces)))
    for i, score in zip(merged, rng.sample(range(-900, 0), 400)):
        scores[i] = float(score)
    return _Header({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces,
                    "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types})  # fmt: skip


def _made_up_texts(seed: int, count: int = 400) -> list[str]:
    rng = random.Random(seed)
    letters = ALPHABET.replace("\u2581", "") + "   \nzq😀"
    return ["".join(rng.choice(letters) for _ in range(rng.randrange(0, 60))) for _ in range(count)]


@pytest.mark.parametrize(("byte_fallback", "joined"), [(True, ALPHABET), (True, "a"), (False, "a")])
def test_a_made_up_vocabulary_gives_sentencepiece_s_ids(byte_fallback, joined):
    header = _made_up_vocabulary(0, byte_fallback, joined=joined)
    sp = Tokenizer.from_gguf_metadata(dict(header), "made up").backend  # a plain dict: SentencePiece
    native, python = sentencepiece_bpe.build(header), sentencepiece_bpe.build(header, native=False)
    assert isinstance(native, sentencepiece_bpe.NativeSentencePieceBPE)
    unknown = native.PieceToId("<unk>")
    assert unknown == sp.PieceToId("<unk>") == 3
    for text in _made_up_texts(1):
        ids = sp.encode_as_ids(text)
        assert native.encode_as_ids(text) == python.encode_as_ids(text) == ids, text
        ids = [i for i in ids if i != unknown]  # SentencePiece writes " ⁇ " for it; Tokenizer never asks
        assert native.decode_ids(ids) == python.decode_ids(ids) == sp.decode_ids(ids), text


def test_repeated_pieces_give_the_lowest_id_in_c_and_python():
    # SentencePiece refuses such a vocabulary; the backends agree on it all the same
    header = _made_up_vocabulary(2, byte_fallback=True, duplicates=True)
    native, python = sentencepiece_bpe.build(header), sentencepiece_bpe.build(header, native=False)
    pieces = header["tokenizer.ggml.tokens"]
    assert len(set(pieces)) < len(pieces)
    for piece in set(pieces) | {"", "zz", "\u2581\u2581", "a\u2581c"}:
        assert native.PieceToId(piece) == python.PieceToId(piece)
    for text in _made_up_texts(3):
        assert native.encode_as_ids(text) == python.encode_as_ids(text), text


def test_a_lone_surrogate_is_a_one_line_error(vocabularies, python_backend):
    from gemmakit.errors import GemmakitError

    for backend in (vocabularies[1].backend, python_backend):
        with pytest.raises(GemmakitError, match=r"'\\udce9' at character 3, not a Unicode character"):
            backend.encode_as_ids("caf\udce9 au lait")
    # a command-line byte that is not UTF-8 reaches the torch-free generate as one
    command = [os.fsencode(sys.executable), b"-m", b"gemmakit.cli", b"generate", b"caf\xe9"]
    out = subprocess.run(command, capture_output=True)
    assert out.returncode != 0
    assert b"Traceback" not in out.stderr and b"not a Unicode character" in out.stderr


def test_a_lone_surrogate_is_a_one_line_error_on_the_torch_path_too(tiny):
    """The torch path's SentencePiece processor raised pybind's RuntimeError (a traceback from
    `generate --dtype float32`) on text a command-line byte made invalid."""
    from gemmakit.errors import GemmakitError
    from gemmakit.formats.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(tiny("gemma3"))
    assert tokenizer.encode("café au lait")  # the valid text still encodes
    with pytest.raises(GemmakitError, match=r"'\\udce9' at character 3, not a Unicode character"):
        tokenizer.encode("caf\udce9 au lait")

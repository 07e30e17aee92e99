"""formats/sentencepiece_bpe.py: SentencePiece's BPE over the GGUF's mapped vocabulary gives
SentencePiece's own ids and text (the bundled Gemma 3 vocabulary: 262k pieces, byte
fallback, user-defined whitespace and markup pieces)."""

from __future__ import annotations

import random

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
]


@pytest.fixture(scope="module")
def vocabularies():
    g = GGUFFile(default_gguf())
    reference = Tokenizer.from_gguf_metadata(g.metadata, "bundled")  # SentencePiece's processor
    in_place = Tokenizer.from_gguf_metadata(g.metadata, "bundled", in_place=True)
    assert isinstance(in_place.backend, sentencepiece_bpe.SentencePieceBPE)
    return reference, in_place


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


def test_the_index_is_cached_and_rebuilt_when_damaged(vocabularies, tmp_path, monkeypatch):
    from gemmakit.formats import tokenizer_cache

    g = GGUFFile(default_gguf())
    first = sentencepiece_bpe.build(g.metadata)  # the session cache holds its index now
    folder = tokenizer_cache._index_folder(g.metadata)
    assert (folder / tokenizer_cache.INDEX_FILE).exists()
    (folder / tokenizer_cache.INDEX_FILE).write_bytes(b"damaged")
    again = sentencepiece_bpe.build(g.metadata)
    assert again.encode_as_ids("Hello there") == first.encode_as_ids("Hello there")
    assert tokenizer_cache.read_index(g.metadata, again.GetPieceSize()) is not None

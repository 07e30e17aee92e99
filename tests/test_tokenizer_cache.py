"""The content-keyed cache of SentencePiece models built from GGUF vocabularies, and the lazy
GGUF metadata it relies on (`formats/tokenizer_cache.py`, `formats/gguf.GGUFMetadata`)."""

from __future__ import annotations

import json

import pytest

from gemmakit.formats.gguf import GGUFFile
from gemmakit.formats.tokenizer import CONTROL, NORMAL, USER_DEFINED, Tokenizer
from gemmakit.formats.tokenizer_cache import KIND, MODEL_FILE

TOKENS = "tokenizer.ggml.tokens"
# Spaces and their runs, newlines, tabs, accents, CJK and emoji (byte fallback), control tokens
# written in the text, "<...>" that is no token, and an unused control piece.
TEXT = (
    "Hello world!  two  spaces,   three\n\nnew\tparagraph\r\n café naïve 日本語 😀 "
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n <unused5> <bos> <not a token>"
)


def varied_texts(count: int = 300) -> list[str]:
    """The shipped evaluation text, and random strings over ASCII, whitespace runs, accents,
    CJK, emoji, byte-fallback characters and Gemma's control tokens (seeded)."""
    import random

    from gemmakit.paths import DATA

    rng = random.Random(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;:!?'\"()-_/\\")
    alphabet += [
        " ",
        "  ",
        "\n",
        "\n\n",
        "\t",
        "\r\n",
        "é",
        "ß",
        "ñ",
        "日",
        "本",
        "語",
        "😀",
        "🎉",
        "\u200b",
        "\x00",
    ]
    alphabet += ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unused7>", "<mask>", "<"]
    texts = [DATA.joinpath("eval_text.txt").read_text(encoding="utf-8")]
    for _ in range(count):
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60))))
    return texts


def tokenizer_state(tok: Tokenizer, text: str = TEXT):
    """Everything a caller sees of a tokenizer on `text`."""
    ids = tok.encode(text)
    return {
        "ids": ids,
        "no_bos": tok.encode(text, add_bos=False),
        "decoded": tok.decode(ids),
        "decoded_special": tok.decode(ids, skip_special=False),
        "named": (tok.bos_id, tok.eos_id, tok.pad_id, tok.end_of_turn_id, tok.start_of_turn_id),
        "stop_ids": tok.stop_ids,
        "special_ids": tok.special_ids,
        "vocab_size": tok.vocab_size,
        "template": None
        if tok.chat_template is None
        else (tok.chat_template.text, tok.chat_template.special_tokens),
    }


def load_tokenizer(path) -> tuple[Tokenizer, GGUFFile]:
    g = GGUFFile(path)
    return Tokenizer.from_gguf_metadata(g.metadata, str(path)), g


def entries(cache):
    return sorted((cache / KIND).glob("sp-*"))


def write_vocabulary(path, pieces, types, scores=None, chat_template=None):
    """A GGUF holding only a SentencePiece ("llama") vocabulary, as llama.cpp's converter
    writes one (user-defined pieces with real spaces)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores or [-float(i) for i in range(len(pieces))])
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def small_vocabulary():
    """(pieces, types): Gemma-like specials, byte pieces, whitespace runs, a few words."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "<unused0>"]
    types = [CONTROL, CONTROL, CONTROL, 2, CONTROL, CONTROL, CONTROL, CONTROL]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    runs = ["  ", "   ", "\n\n", "\t\t"]
    words = [
        "\u2581",
        "h",
        "e",
        "l",
        "o",
        "he",
        "ll",
        "hell",
        "hello",
        "\u2581hello",
        "w",
        "r",
        "d",
        "\u2581w",
    ]
    # Past formats.gguf_metadata.LAZY_ARRAY_MIN pieces, so the file's arrays are read lazily.
    words += [f"\u2581w{i}" for i in range(1000)]
    pieces = specials + bytes_ + runs + words
    types = types + [6] * 256 + [USER_DEFINED] * len(runs) + [NORMAL] * len(words)
    return pieces, types


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("GEMMAKIT_CACHE", str(folder))
    monkeypatch.delenv("GEMMAKIT_NO_CACHE", raising=False)
    return folder


@pytest.fixture(scope="module")
def bundled_gguf():
    from gemmakit.loading import default_gguf

    return default_gguf()  # found before a test points the cache elsewhere


def test_cached_bundled_tokenizer_is_the_built_one(bundled_gguf, cache, monkeypatch):
    """The first load builds and stores the model; the second reads it back without decoding
    the 262k pieces, and tokenizes, decodes and names ids exactly as a fresh build does."""
    monkeypatch.setenv("GEMMAKIT_NO_CACHE", "1")
    fresh, _ = load_tokenizer(bundled_gguf)
    monkeypatch.delenv("GEMMAKIT_NO_CACHE")
    assert entries(cache) == []
    built, _ = load_tokenizer(bundled_gguf)
    assert len(entries(cache)) == 1
    cached, g = load_tokenizer(bundled_gguf)
    assert not g.metadata.is_decoded(TOKENS)  # served from the cache: the vocabulary stayed raw
    expected = tokenizer_state(fresh)
    assert tokenizer_state(built) == expected
    assert tokenizer_state(cached) == expected
    for text in varied_texts():
        ids = fresh.encode(text)
        assert cached.encode(text) == ids, text
        assert cached.decode(ids, skip_special=False) == fresh.decode(ids, skip_special=False)
        assert cached.decode(ids) == fresh.decode(ids)
    assert expected["named"] == (2, 1, 0, 106, 105)
    # The lists are still there when asked for, equal to the file's.
    assert cached.pieces == fresh.pieces and cached.types == fresh.types
    assert cached.token_id("<end_of_turn>") == fresh.token_id("<end_of_turn>") == 106
    assert g.metadata.is_decoded(TOKENS)


def test_cached_vocabulary_with_spaces_and_a_template(tmp_path, cache):
    """User-defined pieces with real spaces and the chat template's special tokens come out
    of a cached model as they do from the file."""
    pieces, types = small_vocabulary()
    path = write_vocabulary(tmp_path / "v.gguf", pieces, types, chat_template="{{ bos_token }}{{ messages }}")
    text = "hello  hello\n\nworld <start_of_turn>\t\thello   <end_of_turn>"
    fresh, _ = load_tokenizer(path)
    cached, g = load_tokenizer(path)
    assert not g.metadata.is_decoded(TOKENS)
    assert tokenizer_state(cached, text) == tokenizer_state(fresh, text)
    assert cached.chat_template.special_tokens["bos_token"] == "<bos>"
    assert cached.token_id("  ") == fresh.token_id("  ") == pieces.index("  ")
    assert cached.pieces == pieces


def test_key_is_the_vocabulary_not_the_path(tmp_path, cache):
    pieces, types = small_vocabulary()
    a = write_vocabulary(tmp_path / "a.gguf", pieces, types)
    copy = tmp_path / "elsewhere" / "copy.gguf"
    copy.parent.mkdir()
    copy.write_bytes(a.read_bytes())
    load_tokenizer(a)
    load_tokenizer(copy)
    assert len(entries(cache)) == 1  # a copy finds the same entry

    renamed = list(pieces)
    renamed[-1] = "\u2581x"  # one piece differs
    load_tokenizer(write_vocabulary(tmp_path / "b.gguf", renamed, types))
    rescored = write_vocabulary(tmp_path / "c.gguf", pieces, types, scores=[0.5] * len(pieces))
    load_tokenizer(rescored)
    retyped = list(types)
    retyped[7] = USER_DEFINED  # <unused0>
    tok, _ = load_tokenizer(write_vocabulary(tmp_path / "d.gguf", pieces, retyped))
    assert len(entries(cache)) == 4
    assert 7 not in tok.special_ids  # and the cached model is the retyped one
    again, _ = load_tokenizer(tmp_path / "d.gguf")
    assert 7 not in again.special_ids


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "stamp"])
def test_damaged_entry_is_rebuilt(tmp_path, cache, damage):
    pieces, types = small_vocabulary()
    path = write_vocabulary(tmp_path / "v.gguf", pieces, types)
    fresh, _ = load_tokenizer(path)
    (entry,) = entries(cache)
    model = entry / MODEL_FILE
    good = model.read_bytes()
    if damage == "garbage":
        model.write_bytes(b"not a sentencepiece model")
    elif damage == "truncated":
        model.write_bytes(good[: len(good) // 2])
    elif damage == "flipped":  # still a loadable model, with one piece changed
        model.write_bytes(good.replace(b"hello", b"jello", 1))
    else:
        (entry / "cache-source.json").write_text("{")
    again, g = load_tokenizer(path)
    assert tokenizer_state(again, "hello world") == tokenizer_state(fresh, "hello world")
    assert g.metadata.is_decoded(TOKENS)  # rebuilt from the file's vocabulary
    assert model.read_bytes() == good  # and rewritten
    third, g = load_tokenizer(path)
    assert not g.metadata.is_decoded(TOKENS)


def test_cache_off_and_unwritable(tmp_path, cache, monkeypatch):
    pieces, types = small_vocabulary()
    path = write_vocabulary(tmp_path / "v.gguf", pieces, types)
    monkeypatch.setenv("GEMMAKIT_NO_CACHE", "1")
    load_tokenizer(path)
    assert not cache.exists()
    monkeypatch.delenv("GEMMAKIT_NO_CACHE")
    cache.mkdir()
    (cache / KIND).write_text("a file where the folder should be")
    tok, _ = load_tokenizer(path)  # best effort: no error, no entry
    assert tok.encode("hello", add_bos=False) == [pieces.index("hello")]


def test_cache_command_lists_and_clears_tokenizers(tmp_path, cache, capsys):
    from gemmakit.cli import main

    pieces, types = small_vocabulary()
    path = write_vocabulary(tmp_path / "v.gguf", pieces, types)
    load_tokenizer(path)
    assert main(["cache", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    (row,) = listed["entries"]
    assert row["kind"] == "tokenizers" and row["source"] == str(path) and row["bytes"] > 0
    assert main(["cache", "clear", "--kind", "tokenizers"]) == 0
    assert "removed 1 entry" in capsys.readouterr().out
    assert entries(cache) == []


def test_metadata_arrays_are_decoded_only_when_read(bundled_gguf):
    g = GGUFFile(bundled_gguf)
    md = g.metadata
    assert TOKENS in md and not md.is_decoded(TOKENS)
    assert md.array_length(TOKENS) == 262144
    assert md.is_decoded("general.architecture") and md["gemma3.block_count"] == 18
    digest = md.digest("tokenizer.ggml.")
    assert not md.is_decoded(TOKENS)
    tokens = md[TOKENS]
    assert len(tokens) == 262144 and tokens[:3] == ["<pad>", "<eos>", "<bos>"] and md[TOKENS] is tokens
    assert md.digest("tokenizer.ggml.") == digest  # the raw bytes, however the values are held
    assert md.digest("general.") != digest


def test_small_vocabularies_are_not_cached(tmp_path, cache):
    from gemmakit.formats.tokenizer_cache import MIN_CACHED_PIECES

    pieces, types = small_vocabulary()
    keep = MIN_CACHED_PIECES - 1
    path = write_vocabulary(tmp_path / "v.gguf", pieces[:keep], types[:keep])
    tok, _ = load_tokenizer(path)
    assert tok.encode("hello", add_bos=False) == [pieces.index("hello")]
    assert entries(cache) == []

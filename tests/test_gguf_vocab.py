"""Gemma 4 GGUF vocabularies: llama.cpp's "gemma4" tokenizer (SentencePiece-style BPE with merges).

The reference is llama.cpp itself. A tiny Gemma 4 folder with a Gemma-style tokenizer.json
(▁ for spaces, <0xNN> byte fallback pieces, merges, control and user-defined tokens) is
converted by llama.cpp's convert_hf_to_gguf.py (GEMMAKIT_LLAMA_CPP_SRC); gemmakit must load the
file and give transformers' logits, and (GEMMAKIT_LLAMA_CPP_BIN, a folder holding
llama-tokenize) the ids llama-tokenize gives. The hand-written vocabulary at the end needs
neither: its expected ids were read from llama-tokenize on the same metadata.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gemmakit.errors import ModelFileError
from gemmakit.formats.tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, Tokenizer
from tests.test_gguf_families import CASES, COMMON, LLAMA_CPP_BIN, llama_cpp_convert, needs_converter

# Spaces (leading, trailing, runs), newlines and their runs, tabs, carriage returns, accents,
# CJK and emoji (through byte fallback), control and user-defined tokens written in the text.
TEXTS = [
    "Hello world",
    " leading space",
    "trailing space ",
    "two  spaces and   three",
    "    indented",
    "line one\nline two",
    "para\n\nnext\n\n\nthird\n",
    "\n",
    "\n\n\n\n",
    "tab\tseparated\tcolumns",
    "\t\tdouble tab",
    "crlf\r\nline",
    "café naïve façade",
    "日本語のテキスト",
    "emoji 😀 and 🎉!",
    "<|turn>user\nHi there<turn|>\n<|turn>model\n",
    "<|channel>thought<channel|>answer",
    "<eos> in the middle <pad>",
    "not a <token> at all",
    "   ",
    " ",
    "the quick brown fox jumps over the lazy dog",
]


def gemma_style_folder(folder: Path) -> Path:
    """A tiny Gemma 4 model with a Gemma-style 400-token BPE tokenizer.json (byte fallback)."""
    import sentencepiece as spm
    import transformers

    from gemmakit.evaluation.verify import DEFAULT_TEXT

    lines = [line for line in DEFAULT_TEXT.read_text().splitlines() if line.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=400, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", byte_fallback=True,
        control_symbols=["<mask>", "<|turn>", "<turn|>", "<|channel>", "<channel|>"],
        user_defined_symbols=["\n\n", "\u2581\u2581"], add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    tok = transformers.GemmaTokenizer.from_pretrained(folder, mask_token="<mask>")
    (folder / "tokenizer.model").unlink()  # the converter must read tokenizer.json
    tok.save_pretrained(folder)

    cfg = transformers.Gemma4TextConfig(**{**COMMON, "vocab_size": len(tok)}, **CASES["gemma4_dense"])
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Gemma4ForCausalLM(cfg).eval()
    persistent = set(model.state_dict())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3 if "norm" in name else 0.1)
        for name, b in model.named_buffers():
            if name in persistent:  # layer_scalar: a loader that drops it changes the logits
                b.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(hf folder, llama.cpp's GGUF of it)."""
    root = tmp_path_factory.mktemp("gemma4_vocab")
    folder = gemma_style_folder(root / "hf")
    gguf = root / "llama_cpp.gguf"
    llama_cpp_convert(folder, gguf)
    return folder, gguf


def gguf_tokenizer(path: Path) -> Tokenizer:
    from gemmakit.formats.gguf import GGUFFile

    return Tokenizer.from_gguf_metadata(GGUFFile(path).metadata, str(path))


def llama_tokenize(gguf: Path, text: str) -> list[int]:
    binary = Path(LLAMA_CPP_BIN) / "llama-tokenize"
    cmd = [str(binary), "-m", str(gguf), "--stdin", "--no-escape", "--ids", "--log-disable"]
    done = subprocess.run(cmd, input=text.encode(), capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return [int(i) for i in done.stdout.decode().strip().splitlines()[-1].strip("[]").split(",") if i.strip()]


@needs_converter
def test_converted_vocabulary_is_gemma4_bpe(converted):
    from gemmakit.formats.gguf import GGUFFile

    md = GGUFFile(converted[1]).metadata
    assert md["tokenizer.ggml.model"] == "gemma4"
    assert len(md["tokenizer.ggml.merges"]) > 50
    types = [int(t) for t in md["tokenizer.ggml.token_type"]]
    assert types.count(BYTE) == 256
    # The converter marks <|channel> and <channel|> user-defined (always rendered).
    tokens = list(md["tokenizer.ggml.tokens"])
    assert types[tokens.index("<|channel>")] == USER_DEFINED
    assert types[tokens.index("<|turn>")] == CONTROL


@needs_converter
@pytest.mark.llamacpp
@pytest.mark.skipif(
    not LLAMA_CPP_BIN, reason="set GEMMAKIT_LLAMA_CPP_BIN to the folder holding llama-tokenize"
)
@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_llama_tokenize(converted, text):
    tok = gguf_tokenizer(converted[1])
    assert tok.encode(text) == llama_tokenize(converted[1], text)


@needs_converter
def test_round_trip_and_hf_ids(converted):
    """decode(encode(s)) == s, and the ids of the folder's own tokenizer.json (transformers'
    tokenizer agrees with llama.cpp on this vocabulary)."""
    import tokenizers

    folder, gguf = converted
    tok = gguf_tokenizer(gguf)
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in TEXTS:
        ids = tok.encode(text, add_bos=False)
        assert tok.decode(ids, skip_special=False) == text, text
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
    assert tok.decode(tok.encode("<|turn>user\nHi<turn|>")) == "user\nHi"  # control tokens skipped


@needs_converter
def test_load_gives_transformers_logits(converted):
    import transformers

    from gemmakit.loading import load

    folder, gguf = converted
    loaded = load(gguf, dtype="float32", device="cpu")
    ids = loaded.tokenizer.encode("Hello world, the quick brown fox 😀")
    assert ids[0] == 2 and 3 not in ids  # BOS, and no <unk>
    ref = transformers.Gemma4ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids]))
        expected = ref(torch.tensor([ids])).logits
    ours = ours.logits if hasattr(ours, "logits") else ours
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


@needs_converter
def test_hf_export_keeps_the_tokenization(converted, tmp_path):
    from gemmakit.export import export_hf
    from gemmakit.loading import load

    loaded = load(converted[1], dtype="float32", device="cpu")
    export_hf(loaded, tmp_path / "hf", progress=False)
    exported = Tokenizer.from_folder(tmp_path / "hf")
    for text in TEXTS:
        assert exported.encode(text) == loaded.tokenizer.encode(text), text


# --- a hand-written gemma4 vocabulary (no llama.cpp needed) ------------------------------------

HAND_MERGES = ["h e", "l l", "he ll", "hell o", "▁ w", "o r", "▁w or", "l d", "▁wor ld", "▁ ▁", "t h", "th e"]


def hand_vocabulary() -> dict:
    """GGUF tokenizer metadata as llama.cpp's converter writes a Gemma 4 vocabulary, padded to
    400 tokens. "\\n\\n\\n" is a token no merge reaches: llama.cpp takes a newline run whole."""
    specials = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", UNKNOWN)]
    specials += [("<|turn>", CONTROL), ("<turn|>", CONTROL), ("<|channel>", USER_DEFINED), ("\t\t", CONTROL)]
    byte_pieces = [(f"<0x{b:02X}>", BYTE) for b in range(256)]
    chars = [(c, NORMAL) for c in ["\n", "\n\n", "\n\n\n", "▁", "h", "e", "l", "o", "w", "r", "d", "t"]]
    merged = [(m.replace(" ", ""), NORMAL) for m in HAND_MERGES]
    vocab = specials + byte_pieces + chars + merged
    vocab += [(f"[PAD{i}]", 5) for i in range(len(vocab), 400)]
    return {
        "tokenizer.ggml.model": "gemma4",
        "tokenizer.ggml.tokens": [p for p, _ in vocab],
        "tokenizer.ggml.scores": [-1000.0] * len(vocab),
        "tokenizer.ggml.token_type": [t for _, t in vocab],
        "tokenizer.ggml.merges": HAND_MERGES,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": False,
    }


HAND_TEXTS = [
    "hello world",
    " hello  world ",
    "the\n\n\nhello\n\n\n\n",
    "<|turn>hello<turn|>\n<|channel>é😀",
    "\tx<unk>\t\t\tz",
    "\n\n\n\n\nhe\n\nd",
    "<he\t\tlo><<|turn>>",
]
# llama-tokenize's ids for HAND_TEXTS on a GGUF holding hand_vocabulary() (read once, by hand).
HAND_IDS = [
    [2, 279, 284],
    [2, 267, 279, 267, 284, 267],
    [2, 275, 276, 266, 279, 264, 264, 264, 264],
    [2, 4, 279, 5, 264, 6, 203, 177, 248, 167, 160, 136],
    [2, 17, 128, 3, 7, 17, 130],
    [2, 264, 264, 264, 264, 264, 276, 265, 274],
    [2, 68, 276, 7, 270, 271, 70, 68, 4, 70],
]


@pytest.mark.parametrize("text,expected", list(zip(HAND_TEXTS, HAND_IDS)))
def test_hand_vocabulary_ids_and_round_trip(text, expected):
    tok = Tokenizer.from_gguf_metadata(hand_vocabulary(), "hand")
    assert tok.encode(text) == expected
    # Control tokens are skipped unless asked for; <unk> (unknown, not control) is written out.
    assert tok.decode(tok.encode(text)) == text.replace("<|turn>", "").replace("<turn|>", "")
    assert tok.decode(tok.encode(text), skip_special=False) == "<bos>" + text


def test_hand_vocabulary_via_gguf_file(tmp_path):
    """Written with gguf's GGUFWriter and read back through gemmakit's GGUF reader."""
    import gguf

    from gemmakit.formats.gguf import GGUFFile

    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "gemma4")
    for k, v in hand_vocabulary().items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        else:
            w.add_array(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = Tokenizer.from_gguf_metadata(GGUFFile(path).metadata, str(path))
    assert [tok.encode(t) for t in HAND_TEXTS] == HAND_IDS
    assert tok.stop_ids[:2] == (1, 5)  # <eos>, <turn|>


def test_broken_gemma4_vocabulary_is_one_clear_error():
    md = hand_vocabulary()
    del md["tokenizer.ggml.merges"]
    with pytest.raises(ModelFileError, match="missing tokenizer.ggml.merges"):
        Tokenizer.from_gguf_metadata(md, "x.gguf")
    md = hand_vocabulary()
    md["tokenizer.ggml.merges"] = ["h e", "x y"]  # "xy" is no token
    with pytest.raises(ModelFileError, match="invalid gemma4 vocabulary"):
        Tokenizer.from_gguf_metadata(md, "x.gguf")
    md["tokenizer.ggml.model"] = "gpt2"
    with pytest.raises(ModelFileError, match="'gpt2' is neither"):
        Tokenizer.from_gguf_metadata(md, "x.gguf")


def test_gguf_export_keeps_a_gemma4_vocabulary(tmp_path):
    """Re-exporting a gemma4-vocabulary GGUF writes that vocabulary (model and merges) back, so
    the file tokenizes exactly as its source."""
    import gguf

    from gemmakit.config import PRESETS
    from gemmakit.formats.gguf import GGUFFile
    from gemmakit.formats.gguf_writer import _add_tokenizer

    source = hand_vocabulary()
    tok = Tokenizer.from_gguf_metadata(source, "hand")
    config = PRESETS["gemma-3-270m"].replace(vocab_size=400)
    path = tmp_path / "out.gguf"
    w = gguf.GGUFWriter(str(path), "gemma4")
    _add_tokenizer(w, tok, config, source, None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    md = GGUFFile(path).metadata
    assert md["tokenizer.ggml.model"] == "gemma4" and list(md["tokenizer.ggml.merges"]) == HAND_MERGES
    back = Tokenizer.from_gguf_metadata(md, str(path))
    assert [back.encode(t) for t in HAND_TEXTS] == HAND_IDS


def test_gemma4_hf_export_writes_the_bpe_vocabulary(tmp_path):
    """A Gemma 4 HF folder (tokenizer.json BPE) exports to GGUF as a "gemma4" vocabulary with
    its merges, tokenizing as the folder does (rebuilt as SentencePiece it would not)."""
    from gemmakit.export import export
    from gemmakit.formats.gguf import GGUFFile

    folder = gemma_style_folder(tmp_path / "hf")
    out = tmp_path / "ours.gguf"
    export(model=str(folder), to="gguf", output=out, qtype="f32", progress=False)
    md = GGUFFile(out).metadata
    merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    assert md["tokenizer.ggml.model"] == "gemma4"
    assert list(md["tokenizer.ggml.merges"]) == [m if isinstance(m, str) else " ".join(m) for m in merges]
    source, exported = Tokenizer.from_folder(folder), gguf_tokenizer(out)
    for text in TEXTS:
        assert exported.encode(text) == source.encode(text), text


@needs_converter
def test_gemma4_hf_export_vocabulary_equals_llama_cpp_conversion(converted, tmp_path):
    from gemmakit.export import export
    from gemmakit.formats.gguf import GGUFFile

    folder, theirs = converted
    out = tmp_path / "ours.gguf"
    export(model=str(folder), to="gguf", output=out, qtype="f32", progress=False)
    a, b = GGUFFile(out).metadata, GGUFFile(theirs).metadata
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.scores", "tokenizer.ggml.merges"):  # fmt: skip
        assert list(np.atleast_1d(a[key])) == list(np.atleast_1d(b[key])), key

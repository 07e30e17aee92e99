"""Damaged model files: each gives one GemmakitError naming the file, never another exception.

A tiny GGUF and a tiny safetensors file are built here, then cut at many offsets and given
flipped bytes and fields; the readers must return a correct result or raise a GemmakitError.
"""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest
import torch

from gemmakit.cli import main
from gemmakit.errors import GemmakitError, ModelFileError
from gemmakit.formats.gguf import GGUFFile, config_from_gguf
from gemmakit.formats.safetensors import SafetensorsReader, read_safetensors, save_safetensors
from gemmakit.hf_config import load_hf_config
from gemmakit.loading import load

HIDDEN, VOCAB, HEADS = 32, 64, 2


def write_gguf(path, alignment=None, head_count=HEADS, drop=(), tokens=True, head_count_type=None):
    """A tiny gemma3 GGUF: enough metadata for a config, and two F32 tensors."""
    import gguf

    w = gguf.GGUFWriter(str(path), "gemma3")
    if alignment is not None:
        w.add_uint32("general.alignment", alignment)
    w.add_uint32("gemma3.embedding_length", HIDDEN)
    if head_count_type == "string":
        w.add_string("gemma3.attention.head_count", "two")
    else:
        w.add_uint32("gemma3.attention.head_count", head_count)
    w.add_uint32("gemma3.attention.head_count_kv", 1)
    w.add_uint32("gemma3.attention.key_length", 16)
    w.add_uint32("gemma3.block_count", 2)
    w.add_uint32("gemma3.feed_forward_length", 64)
    w.add_uint32("gemma3.context_length", 128)
    if tokens:
        w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(VOCAB)])
        w.add_array("tokenizer.ggml.scores", [float(-i) for i in range(VOCAB)])
        w.add_array("tokenizer.ggml.token_type", [1] * VOCAB)
    rng = np.random.default_rng(0)
    tensors = {
        "token_embd.weight": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
        "output_norm.weight": rng.standard_normal(HIDDEN).astype(np.float32),
    }
    for name, value in tensors.items():
        if name not in drop:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def read_gguf(path):
    """Everything a load reads from a GGUF before building the model."""
    g = GGUFFile(path)
    config = config_from_gguf(g)
    return g, config, {name: g.tensor(name) for name in g.tensors}


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    tensors = write_gguf(path)
    g, config, read = read_gguf(path)
    assert config.hidden_size == HIDDEN and config.num_attention_heads == HEADS
    for name, value in tensors.items():
        np.testing.assert_array_equal(read[name].numpy(), value)
    return path.read_bytes(), tensors, g.data_offset


@pytest.fixture(scope="module")
def safetensors_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    torch.manual_seed(0)
    tensors = {"a": torch.randn(4, 8), "b": torch.randn(16, dtype=torch.float64), "c": torch.arange(6)}
    save_safetensors(tensors, path)
    return path.read_bytes(), tensors


def _gguf_case(path, data: bytes, tensors):
    path.write_bytes(data)
    try:
        _, _, read = read_gguf(path)
    except GemmakitError as e:
        assert str(path) in str(e) or path.name in str(e), str(e)
        return False
    # Accepted (a flip in a name or in padding): every tensor still has its declared shape.
    g = GGUFFile(path)
    for name, value in read.items():
        assert tuple(value.shape) == g.tensors[name].shape
    return True


def _safetensors_case(path, data: bytes, tensors):
    path.write_bytes(data)
    try:
        read = read_safetensors([path])
        rows = SafetensorsReader([path])
        for name in rows.entries:
            rows.tensor(name)
    except GemmakitError as e:
        assert path.name in str(e), str(e)
        return False
    # Accepted (a flip in a name, in padding or in a dtype of the same width): the same number of
    # tensors, and one whose name, dtype and shape are unchanged has its original values.
    assert len(read) == len(tensors)
    for name, value in read.items():
        same = name in tensors and value.dtype == tensors[name].dtype and value.shape == tensors[name].shape
        if same:
            torch.testing.assert_close(value, tensors[name], rtol=0, atol=0)
    return True


def _cuts(size: int, header_end: int, n: int, rng: random.Random) -> list[int]:
    """Offsets in every region: the magic, the header, the tensor data, and the last bytes."""
    fixed = list(range(0, min(64, size))) + [header_end - 1, header_end, header_end + 1, size - 1]
    return sorted(set(fixed + [rng.randrange(size) for _ in range(n)]))


def _flips(data: bytes, header_end: int, n: int, rng: random.Random):
    """Copies with one header byte or an 8-byte field set to a hostile value."""
    for _ in range(n):
        out = bytearray(data)
        pos = rng.randrange(min(header_end, len(data)))
        kind = rng.randrange(3)
        if kind == 0:
            out[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[pos] = rng.choice([0x00, 0xFF, 0x7F, 0x80])
        else:
            value = rng.choice([0, 1, 2**31, 2**63, 2**64 - 1, len(data) * 2])
            out[pos : pos + 8] = struct.pack("<Q", value)[: len(out) - pos]
        yield bytes(out)


def _fuzz_gguf(tmp_path, gguf_bytes, n_cuts, n_flips, seed):
    data, tensors, data_offset = gguf_bytes
    rng = random.Random(seed)
    path = tmp_path / "fuzz.gguf"
    accepted = 0
    for cut in _cuts(len(data), data_offset, n_cuts, rng):
        assert not _gguf_case(path, data[:cut], tensors), f"cut at {cut} was accepted"
    for damaged in _flips(data, data_offset, n_flips, rng):
        accepted += _gguf_case(path, damaged, tensors)
    return accepted


def _fuzz_safetensors(tmp_path, safetensors_bytes, n_cuts, n_flips, seed):
    data, tensors = safetensors_bytes
    rng = random.Random(seed)
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    path = tmp_path / "model.safetensors"
    for cut in _cuts(len(data), header_end, n_cuts, rng):
        assert not _safetensors_case(path, data[:cut], tensors), f"cut at {cut} was accepted"
    for damaged in _flips(data, header_end, n_flips, rng):
        _safetensors_case(path, damaged, tensors)


def test_fuzz_gguf_reader(tmp_path, gguf_bytes):
    _fuzz_gguf(tmp_path, gguf_bytes, n_cuts=100, n_flips=200, seed=1)


def test_fuzz_safetensors_reader(tmp_path, safetensors_bytes):
    _fuzz_safetensors(tmp_path, safetensors_bytes, n_cuts=60, n_flips=200, seed=2)


@pytest.mark.slow
def test_fuzz_readers_long(tmp_path, gguf_bytes, safetensors_bytes):
    for seed in range(5):
        _fuzz_gguf(tmp_path, gguf_bytes, n_cuts=400, n_flips=1000, seed=100 + seed)
        _fuzz_safetensors(tmp_path, safetensors_bytes, n_cuts=200, n_flips=1000, seed=200 + seed)


# --- each case of issue 19 item 4 through load() and the CLI ------------------------------------


def _assert_one_line_error(path, match, capsys, error=GemmakitError):
    with pytest.raises(error, match=match) as info:
        load(path, dtype="float32", device="cpu")
    assert path.name in str(info.value) and "\n" not in str(info.value)
    capsys.readouterr()
    assert main(["generate", "--model", str(path), "--max-new-tokens", "1", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and path.name in err, err
    assert err.startswith("gemmakit generate: error:"), err


@pytest.fixture
def no_cache(monkeypatch):
    monkeypatch.setenv("GEMMAKIT_NO_CACHE", "1")


@pytest.mark.parametrize("where", ["header", "kv", "tensor_infos", "data"])
def test_cut_gguf(tmp_path, gguf_bytes, where, capsys, no_cache):
    data, _, data_offset = gguf_bytes
    cut = {"header": 10, "kv": 200, "tensor_infos": data_offset - 20, "data": data_offset + 100}.get(where)
    path = tmp_path / f"cut_{where}.gguf"
    path.write_bytes(data[:cut])
    _assert_one_line_error(path, "truncated|corrupt", capsys, ModelFileError)


def test_bundled_gguf_cut_at_3mb(tmp_path):
    """The issue's case: the bundled model cut inside its 262k-token vocabulary."""
    from gemmakit.loading import default_gguf

    path = tmp_path / "cut3mb.gguf"
    with open(default_gguf(), "rb") as f:
        path.write_bytes(f.read(3_000_000))
    with pytest.raises(ModelFileError, match=r"cut3mb\.gguf: (truncated|corrupt)"):
        GGUFFile(path)


def test_gguf_alignment_zero(tmp_path, capsys, no_cache):
    path = tmp_path / "align0.gguf"
    write_gguf(path, alignment=0)
    _assert_one_line_error(path, "general.alignment", capsys, ModelFileError)


def test_gguf_head_count_zero(tmp_path, capsys, no_cache):
    path = tmp_path / "heads0.gguf"
    write_gguf(path, head_count=0)
    _assert_one_line_error(path, "head_count must be positive", capsys, ModelFileError)


def test_gguf_head_count_string(tmp_path, capsys, no_cache):
    path = tmp_path / "headsstr.gguf"
    write_gguf(path, head_count_type="string")
    _assert_one_line_error(path, "invalid GGUF metadata", capsys, ModelFileError)


def test_gguf_without_token_embd(tmp_path, capsys, no_cache):
    path = tmp_path / "noembd.gguf"
    write_gguf(path, drop=("token_embd.weight",))
    _assert_one_line_error(path, "no token_embd.weight", capsys, ModelFileError)


def test_gguf_without_tokenizer(tmp_path, capsys, no_cache):
    path = tmp_path / "notok.gguf"
    write_gguf(path, tokens=False)
    _assert_one_line_error(path, "no tokenizer", capsys, ModelFileError)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda cfg: [cfg], "not a JSON object"),
        (lambda cfg: "hello", "not a JSON object"),
        (lambda cfg: {**cfg, "num_attention_heads": 0}, "num_attention_heads must be a positive"),
        (lambda cfg: {**cfg, "num_key_value_heads": 0}, "num_key_value_heads must be a positive"),
        (lambda cfg: {**cfg, "hidden_size": "big"}, "config.json"),
        (lambda cfg: {**cfg, "num_hidden_layers": "2"}, "config.json"),
    ],
)
def test_bad_config_json(hf_folder, change, match, capsys):
    folder, _ = hf_folder("gemma3")
    file = folder / "config.json"
    file.write_text(json.dumps(change(json.loads(file.read_text()))))
    with pytest.raises(GemmakitError, match=match) as info:
        load_hf_config(folder)
    assert "config.json" in str(info.value)
    with pytest.raises(GemmakitError, match=match):
        load(folder, dtype="float32", device="cpu")
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--max-new-tokens", "1", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config.json" in err, err


def _set_tensor_offset(data: bytes, name: str, offset: int) -> bytes:
    """The GGUF bytes with tensor `name`'s data offset (relative to the data section) replaced."""
    raw = name.encode()
    at = data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)
    (n_dims,) = struct.unpack_from("<I", data, at)
    field = at + 4 + 8 * n_dims + 4  # after the dims and the type
    return data[:field] + struct.pack("<Q", offset) + data[field + 8 :]


@pytest.mark.parametrize(
    "offset, match",
    [
        (64, "token_embd.weight and output_norm.weight overlap"),
        (10**9, "truncated: tensor output_norm.weight"),
    ],
)
def test_gguf_tensor_data_overlapping_or_past_the_end(tmp_path, gguf_bytes, offset, match, capsys, no_cache):
    """Issue 19: a tensor whose bytes overlap another's, or lie past the end, is one clear line."""
    data, _, _ = gguf_bytes
    path = tmp_path / "ranges.gguf"
    path.write_bytes(_set_tensor_offset(data, "output_norm.weight", offset))
    with pytest.raises(ModelFileError, match=match):
        GGUFFile(path)
    _assert_one_line_error(path, match, capsys, ModelFileError)


def test_gguf_tensor_listed_twice(tmp_path, gguf_bytes):
    data, _, _ = gguf_bytes
    second = struct.pack("<Q", 18) + b"output_norm.weight"
    assert data.count(second) == 1
    twice = data.replace(second, struct.pack("<Q", 17) + b"token_embd.weight")
    path = tmp_path / "twice.gguf"
    path.write_bytes(twice)
    with pytest.raises(ModelFileError, match="listed twice"):
        GGUFFile(path)

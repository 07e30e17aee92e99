"""Importance matrices: llama.cpp's file formats, the statistic, the CLI, parity with llama-imatrix."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gemmakit.errors import GemmakitError, ModelFileError
from gemmakit.formats.imatrix import load_imatrix, read_imatrix, write_imatrix

LLAMA_CPP_BIN = Path(os.environ.get("GEMMAKIT_LLAMA_CPP_BIN", "/work/llamacpp/build/bin"))


def sample_stats(seed: int = 0):
    """A dense entry, and a 3-expert entry whose last expert saw no token."""
    rng = np.random.default_rng(seed)
    sums = {
        "blk.0.attn_q.weight": rng.random(64, dtype=np.float32) * 100,
        "blk.1.ffn_down_exps.weight": np.concatenate(
            [rng.random((2, 32), dtype=np.float32) * 50, np.zeros((1, 32), np.float32)]
        ),
    }
    counts = {"blk.0.attn_q.weight": 1024, "blk.1.ffn_down_exps.weight": np.array([300, 17, 0])}
    return sums, counts


# --- the file formats ---------------------------------------------------------------------


def test_gguf_round_trip_gives_llama_cpp_means(tmp_path):
    sums, counts = sample_stats()
    path = write_imatrix(tmp_path / "m.gguf", sums, counts, ["wiki.txt"], chunk_count=2, chunk_size=512)
    loaded = load_imatrix(path)
    assert not loaded.is_legacy
    assert (loaded.datasets, loaded.chunk_count, loaded.chunk_size) == (["wiki.txt"], 2, 512)
    np.testing.assert_array_equal(loaded.sums["blk.0.attn_q.weight"][0], sums["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(loaded.counts["blk.1.ffn_down_exps.weight"], [300, 17, 0])
    imp = read_imatrix(path)
    assert imp["blk.0.attn_q.weight"].dtype == np.float32
    np.testing.assert_array_equal(imp["blk.0.attn_q.weight"], sums["blk.0.attn_q.weight"] / np.float32(1024))
    moe = imp["blk.1.ffn_down_exps.weight"]
    assert moe.shape == (96,)  # flat, expert after expert, as the quantizer indexes it
    e = sums["blk.1.ffn_down_exps.weight"]
    np.testing.assert_array_equal(moe[:32], e[0] / np.float32(300))
    np.testing.assert_array_equal(moe[32:64], e[1] / np.float32(17))
    np.testing.assert_array_equal(moe[64:], np.ones(32, np.float32))  # no tokens: 1 (quantize.cpp)


def test_gguf_layout_read_by_the_gguf_package(tmp_path):
    """An independent reader (gguf-py) sees llama-imatrix's layout: 1-D tensors for a dense
    matrix (ggml drops trailing 1s), (experts, columns) for MoE, the metadata keys."""
    from gguf import GGUFReader

    sums, counts = sample_stats()
    path = write_imatrix(tmp_path / "m.gguf", sums, counts, ["a.txt", "b.txt"], 3, 256)
    r = GGUFReader(path)
    shapes = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    assert list(shapes) == [
        "blk.0.attn_q.weight.in_sum2",
        "blk.0.attn_q.weight.counts",
        "blk.1.ffn_down_exps.weight.in_sum2",
        "blk.1.ffn_down_exps.weight.counts",
    ]
    assert shapes["blk.0.attn_q.weight.in_sum2"] == [64]
    assert shapes["blk.0.attn_q.weight.counts"] == [1]
    assert shapes["blk.1.ffn_down_exps.weight.in_sum2"] == [32, 3]  # ggml order
    assert shapes["blk.1.ffn_down_exps.weight.counts"] == [1, 3]
    fields = r.fields
    assert fields["general.type"].contents() == "imatrix"
    assert fields["imatrix.datasets"].contents() == ["a.txt", "b.txt"]
    assert fields["imatrix.chunk_count"].contents() == 3
    assert fields["imatrix.chunk_size"].contents() == 256
    counts_tensor = next(t for t in r.tensors if t.name == "blk.1.ffn_down_exps.weight.counts")
    np.testing.assert_array_equal(np.asarray(counts_tensor.data).reshape(-1), [300, 17, 0])


def write_legacy(path, entries, trailer=(4, "data.txt")):
    """llama.cpp's legacy .dat (imatrix.cpp save_imatrix_legacy): values stored as mean * ncall."""
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, len(values))
        out += np.asarray(values, "<f4").tobytes()
    if trailer is not None:
        out += struct.pack("<i", trailer[0]) + struct.pack("<i", len(trailer[1])) + trailer[1].encode()
    Path(path).write_bytes(out)


def test_legacy_dat_is_divided_by_ncall(tmp_path):
    values = np.array([3.0, 6.0, 0.5], np.float32)
    write_legacy(
        tmp_path / "m.dat", [("blk.0.ffn_up.weight", 4, values), ("blk.0.ffn_down.weight", 0, values)]
    )
    loaded = load_imatrix(tmp_path / "m.dat")
    assert loaded.is_legacy and loaded.chunk_count == 4 and loaded.datasets == ["data.txt"]
    imp = read_imatrix(tmp_path / "m.dat")
    np.testing.assert_array_equal(imp["blk.0.ffn_up.weight"], values / np.float32(4))
    np.testing.assert_array_equal(imp["blk.0.ffn_down.weight"], values)  # ncall 0: as stored
    write_legacy(tmp_path / "bare.dat", [("blk.0.ffn_up.weight", 2, values)], trailer=None)
    bare = load_imatrix(tmp_path / "bare.dat")  # the trailer is optional
    assert bare.chunk_count == 0 and bare.datasets == []


def test_bad_imatrix_files_are_one_line_errors(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        read_imatrix(tmp_path / "missing.gguf")
    values = np.ones(8, np.float32)
    write_legacy(tmp_path / "m.dat", [("blk.0.ffn_up.weight", 1, values)])
    data = (tmp_path / "m.dat").read_bytes()
    for cut in (0, 3, 10, 30, 40):
        (tmp_path / "cut.dat").write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="cut.dat"):
            read_imatrix(tmp_path / "cut.dat")
    sums, counts = sample_stats()
    good = write_imatrix(tmp_path / "m.gguf", sums, counts, [], 1, 512).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[: len(good) - 100])
    with pytest.raises(ModelFileError, match="cut.gguf"):
        read_imatrix(tmp_path / "cut.gguf")
    # A GGUF without the imatrix metadata (a model file): llama.cpp's quantizer refuses it too.
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "gemma3")
    w.add_tensor("blk.0.attn_q.weight", np.ones((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="not an importance matrix"):
        read_imatrix(tmp_path / "model.gguf")


def test_write_refuses_mismatched_counts(tmp_path):
    with pytest.raises(GemmakitError, match="do not match"):
        write_imatrix(tmp_path / "m.gguf", {"a.weight": np.ones((2, 4))}, {"a.weight": 5}, [], 1, 1)
    assert not (tmp_path / "m.gguf").exists()


# --- parity with llama.cpp ----------------------------------------------------------------


def llama_imatrix(model: Path, text: Path, out: Path, ctx: int, chunks: int, fmt: str = "gguf") -> Path:
    exe = LLAMA_CPP_BIN / "llama-imatrix"
    if not exe.exists():
        pytest.skip(f"{exe} not built")
    cmd = [str(exe), "-m", str(model), "-f", str(text), "-o", str(out), "-c", str(ctx), "--chunks",
           str(chunks), "--output-format", fmt, "--no-ppl", "-t", "2"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="module")
def bundled_gguf():
    from gemmakit.loading import default_gguf

    return default_gguf()


@pytest.mark.llamacpp
def test_reads_llama_imatrix_files_and_rewrites_them_byte_for_byte(tmp_path, bundled_gguf):
    from gemmakit.paths import DATA

    text = DATA / "eval_text.txt"
    made = llama_imatrix(bundled_gguf, text, tmp_path / "ref.gguf", ctx=128, chunks=2)
    legacy = llama_imatrix(bundled_gguf, text, tmp_path / "ref.dat", ctx=128, chunks=2, fmt="dat")
    loaded = load_imatrix(made)
    assert loaded.datasets == [str(text)] and loaded.chunk_count == 2 and loaded.chunk_size == 128
    assert all(c.tolist() == [256] for c in loaded.counts.values())
    imp, imp_legacy = read_imatrix(made), read_imatrix(legacy)
    assert set(imp) == set(imp_legacy) and "blk.0.attn_q.weight" in imp
    for name in imp:  # the .dat stores mean * ncall: the same means up to float rounding
        np.testing.assert_allclose(imp[name], imp_legacy[name], rtol=1e-5)
    ours = write_imatrix(
        tmp_path / "ours.gguf",
        loaded.sums,
        loaded.counts,
        loaded.datasets,
        loaded.chunk_count,
        loaded.chunk_size,
    )
    assert ours.read_bytes() == made.read_bytes()

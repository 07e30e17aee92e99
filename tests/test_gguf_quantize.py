"""GGUF quantization as llama.cpp writes it: the block quantizers (bytes), the mixes (per-tensor
types), the importance matrix, `export --type q4_k_m ...`, and parity with llama-quantize."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from gemmakit.cli import main
from gemmakit.errors import GemmakitError
from gemmakit.export import export
from gemmakit.formats.gguf import GGUFFile
from gemmakit.formats.gguf_mix import MIXES, ModelShape, llama_order, plan_mix
from gemmakit.formats.gguf_quantize import imatrix_for, quantize_tensor
from gemmakit.formats.imatrix import write_imatrix
from gemmakit.kernels import cpu
from gemmakit.ops.gguf import gguf_quantize
from tests.test_export import tiny_sentencepiece

LLAMA_CPP_BIN = Path(os.environ.get("GEMMAKIT_LLAMA_CPP_BIN", "/work/llamacpp/build/bin"))
BLOCK_TYPES = (
    Q.Q4_0,
    Q.Q4_1,
    Q.Q5_0,
    Q.Q5_1,
    Q.Q8_0,
    Q.Q2_K,
    Q.Q3_K,
    Q.Q4_K,
    Q.Q5_K,
    Q.Q6_K,
    Q.IQ4_NL,
    Q.IQ4_XS,
)

needs_kernels = pytest.mark.skipif(cpu.library() is None, reason="the C kernels do not build here")


def golden_inputs():
    """Fixed rows with the cases the searches branch on: tiny values, all positive, a zero
    super-block, heavy tails, one outlier; and an importance matrix spanning 0 to 20."""
    rng = np.random.default_rng(20261206)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    x[1] *= 1e-3
    x[2] = np.abs(x[2]) * 10
    x[3, :256] = 0
    x[4] = x[4] ** 3
    x[5, 100] = 50.0
    importance = (rng.random(512) ** 4 * 20).astype(np.float32)
    return x, importance


# sha256[:16] of gguf_quantize(golden_inputs()) without / with the importance matrix; the bytes
# were checked equal to llama.cpp's ggml_quantize_chunk (test_blocks_equal_ggml below).
GOLDEN = {
    Q.Q4_0: ("554d53821daf096e", "4b2116b43194f974"),
    Q.Q4_1: ("a564f5cf756d8320", "9e46575d347228ee"),
    Q.Q5_0: ("de6a0507f9315cfe", "5c820f7e883e430f"),
    Q.Q5_1: ("4ae4904d979a97fd", "45a1e2c6fce16697"),
    Q.Q8_0: ("16da858f1431c834", "16da858f1431c834"),  # Q8_0 ignores the importance matrix
    Q.Q2_K: ("72e81de30b730509", "8ce6d4482c8c422b"),
    Q.Q3_K: ("bdc571a3f2f4e912", "5db5e7afd82cdee8"),
    Q.Q4_K: ("6469ef4c096abde0", "32e8ff9222d2d4a1"),
    Q.Q5_K: ("5ac67decb582a9de", "6d57151cfa5b0951"),
    Q.Q6_K: ("c5d3b0805fd2c0d3", "6a3cdf38eea94717"),
    Q.IQ4_NL: ("5adb05b172e2139d", "bc00155cdba698ff"),
    Q.IQ4_XS: ("00064b54db9f43cb", "c645da0c2c60a239"),
}

# Relative RMS error of a round trip on Gaussian rows, upper bounds a few times above what
# each type gives (bits per weight: Q2_K 2.6, Q3_K 3.4, Q4 4.5, Q5 5.5, Q6_K 6.6, Q8_0 8.5).
MAX_RELATIVE_ERROR = {
    Q.Q2_K: 0.45, Q.Q3_K: 0.25, Q.Q4_0: 0.15, Q.Q4_1: 0.15, Q.Q4_K: 0.12, Q.Q5_0: 0.08,
    Q.Q5_1: 0.08, Q.Q5_K: 0.06, Q.Q6_K: 0.03, Q.Q8_0: 0.01, Q.IQ4_NL: 0.15, Q.IQ4_XS: 0.15,
}  # fmt: skip


@needs_kernels
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_golden_bytes_never_change(qtype):
    x, importance = golden_inputs()
    plain = hashlib.sha256(gguf_quantize(x, int(qtype)).tobytes()).hexdigest()[:16]
    weighted = hashlib.sha256(gguf_quantize(x, int(qtype), importance).tobytes()).hexdigest()[:16]
    assert (plain, weighted) == GOLDEN[qtype]


@needs_kernels
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_round_trip_within_the_types_error(qtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 768)).astype(np.float32) * 0.05
    for importance in (None, (rng.random(768) * 3).astype(np.float32)):
        data = quantize_tensor(torch.from_numpy(x), qtype, importance)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        assert data.shape == (32, 768 // block * size) and data.dtype == np.uint8
        back = gguf.quants.dequantize(data, qtype)
        error = np.sqrt(np.mean((back - x) ** 2) / np.mean(x**2))
        assert error < MAX_RELATIVE_ERROR[qtype], (qtype.name, error)


@needs_kernels
def test_importance_matrix_lowers_the_weighted_error():
    """The imatrix quantizers minimise error weighted by the importance: on the columns it
    marks important, the error drops against the unweighted quantizer."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    importance = np.where(np.arange(512) % 8 == 0, 100.0, 0.01).astype(np.float32)
    for qtype in (Q.Q4_K, Q.Q3_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q4_0):
        plain = gguf.quants.dequantize(quantize_tensor(x, qtype), qtype)
        weighted = gguf.quants.dequantize(quantize_tensor(x, qtype, importance), qtype)

        def weighted_error(y):
            return float(np.sum(importance * (y - x) ** 2))

        assert weighted_error(weighted) < 0.9 * weighted_error(plain), qtype.name


@needs_kernels
def test_threads_and_row_ranges_give_the_same_bytes(monkeypatch):
    x = np.random.default_rng(3).standard_normal((100, 256)).astype(np.float32)
    whole = gguf_quantize(x, int(Q.Q4_K))
    monkeypatch.setattr(cpu, "GGUF_QUANTIZE_ROWS_PER_TASK", 7)
    assert np.array_equal(gguf_quantize(x, int(Q.Q4_K)), whole)
    assert np.array_equal(gguf_quantize(x[37:38], int(Q.Q4_K)), whole[37:38])


def test_block_mismatch_and_missing_kernels_are_clear_errors(monkeypatch):
    with pytest.raises(GemmakitError, match="not a whole number of Q4_K blocks"):
        quantize_tensor(np.zeros((2, 640), np.float32), Q.Q4_K)
    monkeypatch.setattr(cpu, "gguf_quantize_rows", lambda *a: None)
    # the numpy fallback writes the legacy types with the same bytes
    x = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)
    assert np.array_equal(gguf_quantize(x, int(Q.Q4_0)), gguf.quants.quantize(x, Q.Q4_0))
    with pytest.raises(GemmakitError, match="needs gemmakit's C kernels"):
        gguf_quantize(np.zeros((2, 256), np.float32), int(Q.Q4_K))


def test_imatrix_entries_apply_as_llama_quantize_applies_them():
    importance = {"blk.0.attn_q.weight": np.ones(64, np.float32), "token_embd.weight": np.ones(3, np.float32)}
    assert imatrix_for("blk.0.attn_q.weight", (128, 64), importance) is importance["blk.0.attn_q.weight"]
    assert imatrix_for("blk.0.attn_k.weight", (16, 64), importance) is None  # missing: without
    assert imatrix_for("token_embd.weight", (256, 64), importance) is None  # wrong size: ignored
    with pytest.raises(GemmakitError, match="has 64 values for blk.0.attn_q.weight"):
        imatrix_for("blk.0.attn_q.weight", (128, 32), importance)


# --- the mixes --------------------------------------------------------------------------------


def gemma_tensors(n_layer: int, hidden: int = 256, ffn: int = 512, tied: bool = True) -> dict:
    """GGUF name -> shape of a Gemma 3 with 4 query heads and 1 KV head of 64."""
    tensors = {"token_embd.weight": (1024, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        tensors["output.weight"] = (1024, hidden)
    for i in range(n_layer):
        tensors |= {f"blk.{i}.attn_q.weight": (256, hidden), f"blk.{i}.attn_k.weight": (64, hidden),
                    f"blk.{i}.attn_v.weight": (64, hidden), f"blk.{i}.attn_output.weight": (hidden, 256),
                    f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                    f"blk.{i}.ffn_down.weight": (hidden, ffn), f"blk.{i}.attn_norm.weight": (hidden,)}  # fmt: skip
    return tensors


def test_llama_order_sorts_by_layer_number_then_name():
    names = ["blk.10.attn_v.weight", "output_norm.weight", "blk.2.ffn_up.weight", "blk.2.attn_k.weight"]
    assert llama_order(names) == [
        "output_norm.weight",
        "blk.2.attn_k.weight",
        "blk.2.ffn_up.weight",
        "blk.10.attn_v.weight",
    ]


def test_mix_rules_pick_llama_cpps_layers():
    shape = ModelShape(n_layer=16, n_gqa=4)
    tensors = gemma_tensors(16)
    q4km = plan_mix(tensors, "q4_k_m", shape).types
    more_bits = [i for i in range(16) if q4km[f"blk.{i}.attn_v.weight"] == Q.Q6_K]
    # use_more_bits: the first and last eighth, then every third layer from n/8 + 2
    assert more_bits == [0, 1, 4, 7, 10, 13, 14, 15]
    assert [i for i in range(16) if q4km[f"blk.{i}.ffn_down.weight"] == Q.Q6_K] == more_bits
    assert q4km["token_embd.weight"] == Q.Q6_K and q4km["output_norm.weight"] == Q.F32
    assert q4km["blk.3.attn_q.weight"] == Q.Q4_K and q4km["blk.3.attn_v.weight"] == Q.Q4_K
    q3km = plan_mix(tensors, "q3_k_m", shape).types
    assert [q3km[f"blk.{i}.attn_v.weight"] for i in (0, 1, 2)] == [Q.Q5_K, Q.Q5_K, Q.Q4_K]
    assert q3km["blk.0.ffn_down.weight"] == Q.Q5_K and q3km["blk.1.ffn_down.weight"] == Q.Q4_K
    assert q3km["blk.5.attn_output.weight"] == Q.Q4_K and q3km["blk.5.ffn_up.weight"] == Q.Q3_K
    q2k = plan_mix(tensors, "q2_k", shape).types
    assert (q2k["blk.0.attn_v.weight"], q2k["blk.0.ffn_down.weight"], q2k["blk.0.attn_output.weight"]) == (
        Q.Q4_K, Q.Q3_K, Q.Q3_K)  # fmt: skip
    assert plan_mix(tensors, "q2_k", ModelShape(16, n_gqa=2)).types["blk.0.attn_v.weight"] == Q.Q3_K
    q4ks = plan_mix(tensors, "q4_k_s", shape).types
    assert [q4ks[f"blk.{i}.attn_v.weight"] for i in (3, 4)] == [Q.Q5_K, Q.Q4_K]
    assert [q4ks[f"blk.{i}.ffn_down.weight"] for i in (1, 2)] == [Q.Q5_K, Q.Q4_K]
    q8 = plan_mix(tensors, "q8_0", shape).types
    assert set(q8.values()) == {Q.Q8_0, Q.F32}
    q40 = plan_mix(tensors, "q4_0", shape)
    assert q40.types["token_embd.weight"] == Q.Q6_K and q40.types["blk.0.ffn_down.weight"] == Q.Q4_0
    # with an importance matrix Q4_0 guards the first eighth of ffn_down with Q4_1
    assert plan_mix(tensors, "q4_0", shape, has_imatrix=True).types["blk.1.ffn_down.weight"] == Q.Q4_1
    iq4 = plan_mix(tensors, "iq4_xs", shape).types
    assert (iq4["blk.0.attn_v.weight"], iq4["blk.1.ffn_down.weight"], iq4["blk.2.ffn_down.weight"]) == (
        Q.Q5_K, Q.Q5_K, Q.IQ4_XS)  # fmt: skip
    assert plan_mix(tensors, "iq4_nl", shape, has_imatrix=True).types["blk.1.ffn_down.weight"] == Q.IQ4_NL
    untied = plan_mix(gemma_tensors(16, tied=False), "q4_k_m", shape).types
    assert untied["output.weight"] == Q.Q6_K and untied["token_embd.weight"] == Q.Q4_K


def test_mix_fallbacks_for_rows_that_do_not_fit():
    """640-wide rows (Gemma 3 270M): 2.5 super-blocks, so each K type falls back."""
    shape = ModelShape(n_layer=8, n_gqa=4)
    plan = plan_mix(gemma_tensors(8, hidden=640, ffn=2048), "q4_k_m", shape)
    t = plan.types
    assert t["token_embd.weight"] == Q.Q8_0  # the output rule: rows not a whole Q4_K block
    assert t["blk.3.attn_q.weight"] == Q.Q5_0 and t["blk.0.attn_v.weight"] == Q.Q8_0  # Q6_K -> Q8_0
    assert t["blk.3.attn_output.weight"] == Q.Q4_K  # 256-wide rows fit
    assert t["blk.0.ffn_down.weight"] == Q.Q6_K  # 2048-wide rows fit
    q3 = plan_mix(gemma_tensors(8, hidden=640, ffn=2048), "q3_k_s", shape).types
    assert q3["blk.3.attn_q.weight"] == Q.Q4_0
    q5 = plan_mix(gemma_tensors(8, hidden=640, ffn=2048), "q5_k_s", shape).types
    assert q5["blk.3.attn_q.weight"] == Q.Q5_1
    assert plan_mix(gemma_tensors(8, hidden=640), "iq4_xs", shape).types["blk.3.attn_q.weight"] == Q.IQ4_NL
    odd = plan_mix({"blk.0.attn_q.weight": (64, 48)}, "q4_k_m", shape).types
    assert odd["blk.0.attn_q.weight"] == Q.F16  # Q5_0's 32 does not divide 48 either
    assert plan.notes and "640" in plan.notes[0]
    with pytest.raises(GemmakitError, match="unknown quantization mix"):
        plan_mix({}, "q4_k_x", shape)


def test_mix_types_equal_the_bundled_q4_k_m_file():
    """The bundled Gemma 3 270M is llama.cpp's own Q4_K_M: the rules give its every type."""
    from gemmakit.loading import default_gguf

    info = GGUFFile(default_gguf()).tensors
    shapes = {name: t.shape for name, t in info.items()}
    plan = plan_mix(shapes, "q4_k_m", ModelShape(n_layer=18, n_gqa=4))
    assert {n: t.name for n, t in plan.types.items()} == {n: t.ggml_type.name for n, t in info.items()}


# --- export -----------------------------------------------------------------------------------


def tiny_256(tmp_path: Path, layers: int = 8) -> Path:
    """A random Gemma 3 folder whose rows are multiples of 256, so the K-quant rules decide
    (4 query heads, 1 KV head of 64: n_gqa 4)."""
    import transformers

    cfg = transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
        sliding_window=4, layer_types=[("sliding_attention", "sliding_attention", "full_attention")[i % 3] for i in range(layers)],
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5 if "norm" in name else 0.08)
    folder = tmp_path / f"gemma3-{layers}"
    model.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(tiny_sentencepiece())
    return folder


@needs_kernels
def test_cli_export_k_mix_reads_back(tmp_path, capsys):
    folder = tiny_256(tmp_path)
    out = tmp_path / "m.q4_k_m.gguf"
    assert main(["export", "--model", str(folder), "--to", "gguf", "--type", "q4_k_m", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Q4_K" in printed and "Q6_K" in printed
    f = GGUFFile(out)
    assert f.metadata["general.file_type"] == int(MIXES["q4_k_m"][0])
    assert f.tensors["blk.0.attn_v.weight"].ggml_type == Q.Q6_K
    assert f.tensors["blk.2.attn_v.weight"].ggml_type == Q.Q4_K
    # what gemmakit reads back is the source within Q4_K's error
    from gemmakit.loading import load

    back = load(str(out), dtype="float32", device="cpu").model.state_dict()
    src = load(str(folder), dtype="float32", device="cpu").model.state_dict()
    name = "model.layers.2.self_attn.q_proj.weight"
    error = (back[name] - src[name]).pow(2).mean().sqrt() / src[name].pow(2).mean().sqrt()
    assert 0 < error < MAX_RELATIVE_ERROR[Q.Q4_K]


@needs_kernels
def test_export_with_imatrix_uses_it_per_tensor(tmp_path):
    folder = tiny_256(tmp_path, layers=2)
    plain = export(model=str(folder), to="gguf", output=tmp_path / "a.gguf", qtype="q4_k_m", progress=False)
    rng = np.random.default_rng(5)
    sums = {"blk.0.attn_q.weight": rng.random(256, dtype=np.float32) * 50}
    imatrix = write_imatrix(tmp_path / "im.gguf", sums, {"blk.0.attn_q.weight": 10}, ["x"], 1, 512)
    weighted = export(
        model=str(folder), to="gguf", output=tmp_path / "b.gguf", qtype="q4_k_m", imatrix=str(imatrix),
        progress=False,
    )  # fmt: skip
    assert any("no entry for" in n for n in weighted["notes"])
    a, b = GGUFFile(plain["path"]), GGUFFile(weighted["path"])
    assert not np.array_equal(a.raw("blk.0.attn_q.weight"), b.raw("blk.0.attn_q.weight"))
    assert np.array_equal(a.raw("blk.1.attn_q.weight"), b.raw("blk.1.attn_q.weight"))
    with pytest.raises(GemmakitError, match="q2_k_s needs an importance matrix"):
        export(model=str(folder), to="gguf", output=tmp_path / "c.gguf", qtype="q2_k_s", progress=False)
    with pytest.raises(GemmakitError, match="GGUF export only"):
        export(model=str(folder), to="hf", output=tmp_path / "hf", imatrix=str(imatrix), progress=False)


def test_cli_export_mistakes_are_one_line_errors(tmp_path, capsys):
    assert main(["export", "--to", "gguf", "--type", "q4_k_x", "-o", str(tmp_path / "m.gguf")]) == 2
    assert "q4_k_m" in capsys.readouterr().err
    missing = tmp_path / "none.gguf"
    args = [
        "export",
        "--to",
        "gguf",
        "--type",
        "q4_k_m",
        "--imatrix",
        str(missing),
        "-o",
        str(tmp_path / "m.gguf"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "none.gguf" in err and "\n" not in err and not (tmp_path / "m.gguf").exists()


@needs_kernels
def test_quantize_table_gains_the_k_mixes(tmp_path, capsys):
    folder = tiny_256(tmp_path, layers=2)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    args = ["quantize", "--model", str(folder), "--text", str(text), "--context", "64", "--json",
            "--types", "fp32,gguf-q6_k,gguf-q4_k_m,gguf-q2_k", "--max-tokens", "200"]  # fmt: skip
    assert main(args) == 0
    rows = {r["type"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert (
        "Q6_K" in rows["gguf-q4_k_m"]["description"]
        and "embedding Q6_K" in rows["gguf-q4_k_m"]["description"]
    )
    assert rows["gguf-q2_k"]["bytes"] < rows["gguf-q4_k_m"]["bytes"] < rows["gguf-q6_k"]["bytes"]
    # a random model's perplexity is noise around the vocabulary size; still, 6 bits stay
    # nearer float32 than 2 bits
    assert abs(rows["gguf-q6_k"]["change"]) < abs(rows["gguf-q2_k"]["change"])


# --- parity with llama.cpp ------------------------------------------------------------------------


def ggml_base():
    """llama.cpp's ggml-base library (ggml_quantize_chunk), or a skip."""
    path = LLAMA_CPP_BIN / "libggml-base.so"
    if not path.exists():
        pytest.skip(f"{path} not built (GEMMAKIT_LLAMA_CPP_BIN)")
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    return lib


def ggml_quantize(lib, x: np.ndarray, qtype: Q, importance: np.ndarray | None) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
    im = importance.ctypes.data if importance is not None else None
    lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], im)
    return out


@pytest.mark.llamacpp
@needs_kernels
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_blocks_equal_ggml_quantize_chunk(qtype):
    """Byte for byte against llama.cpp's own quantizer on rows that exercise every branch:
    scales from 1e-6 to 1e3, all-positive and all-negative rows, zero and constant blocks,
    outliers, heavy tails; importance matrices with zeros, and none."""
    lib = ggml_base()
    rng = np.random.default_rng(7)
    x, importance = golden_inputs()
    cases = [(x, None), (x, importance)]
    for trial in range(12):
        x = rng.standard_normal((16, 1024)).astype(np.float32) * 10.0 ** rng.integers(-6, 4)
        x[trial % 16, : 32 * (trial + 1)] = 0
        x[(trial + 1) % 16] = x[(trial + 1) % 16, 0]  # a constant row
        x[(trial + 2) % 16] = -np.abs(x[(trial + 2) % 16])
        x[(trial + 3) % 16, rng.integers(0, 1024)] *= 1000
        if trial % 3 == 0:
            x = x**3
        x = x.astype(np.float32)
        weights = (rng.random(1024) ** 3 * 10).astype(np.float32)
        weights[rng.integers(0, 1024, 100)] = 0
        cases += [(x, None), (x, weights)]
    for i, (x, w) in enumerate(cases):
        assert np.array_equal(gguf_quantize(x, int(qtype), w), ggml_quantize(lib, x, qtype, w)), i


def llama_quantize(source: Path, out: Path, mix: str, imatrix: Path | None = None) -> Path:
    """llama.cpp's llama-quantize (llama_model_quantize) of `source` into `mix`, 2 threads."""
    exe = LLAMA_CPP_BIN / "llama-quantize"
    if not exe.exists():
        pytest.skip(f"{exe} not built (GEMMAKIT_LLAMA_CPP_BIN)")
    cmd = [
        str(exe),
        *(["--imatrix", str(imatrix)] if imatrix else []),
        str(source),
        str(out),
        mix.upper(),
        "2",
    ]
    env = {**os.environ, "LD_LIBRARY_PATH": str(LLAMA_CPP_BIN)}
    subprocess.run(cmd, check=True, capture_output=True, timeout=600, env=env)
    return out


def compare_tensors(ours: Path, theirs: Path) -> tuple[int, list[str]]:
    """(tensors compared, the names whose type or bytes differ) of two GGUF files."""
    a, b = GGUFFile(ours), GGUFFile(theirs)
    assert set(a.tensors) == set(b.tensors)
    differ = [
        name
        for name in b.tensors
        if a.tensors[name].ggml_type != b.tensors[name].ggml_type
        or not np.array_equal(a.raw(name).view(np.uint8), b.raw(name).view(np.uint8))
    ]
    return len(b.tensors), differ


def synthetic_imatrix(f32_file: Path, out: Path, seed: int = 0) -> Path:
    """An importance matrix in llama.cpp's GGUF format with an entry for every block matrix
    of `f32_file` (sums over 512 tokens), as llama-imatrix would write one."""
    rng = np.random.default_rng(seed)
    sums, counts = {}, {}
    for name, t in GGUFFile(f32_file).tensors.items():
        if name.startswith("blk.") and len(t.shape) == 2:
            sums[name] = (rng.random(t.shape[-1], dtype=np.float32) ** 2 * 512).astype(np.float32)
            counts[name] = 512
    return write_imatrix(out, sums, counts, ["synthetic"], 1, 512)


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    """A random 8-layer Gemma 3 with 256-multiple rows as a float32 GGUF gemmakit wrote."""
    root = tmp_path_factory.mktemp("tiny_f32")
    folder = tiny_256(root)
    return Path(
        export(model=str(folder), to="gguf", output=root / "f32.gguf", qtype="f32", progress=False)["path"]
    )


@pytest.mark.llamacpp
@needs_kernels
@pytest.mark.parametrize("mix", [m for m in MIXES if m != "q2_k_s"] + ["q2_k_s+imatrix"])
def test_tiny_model_files_equal_llama_quantize(tiny_f32, tmp_path, mix):
    """Every tensor of every mix: the same type and the same bytes as llama-quantize's file
    from the same float32 GGUF; and again with an importance matrix."""
    mix = mix.removesuffix("+imatrix")
    imatrix = synthetic_imatrix(tiny_f32, tmp_path / "im.gguf")
    runs = [imatrix] if mix == "q2_k_s" else [None, imatrix]
    for im in runs:
        theirs = llama_quantize(tiny_f32, tmp_path / "theirs.gguf", mix, im)
        ours = export(
            model=str(tiny_f32), to="gguf", output=tmp_path / "ours.gguf", qtype=mix, progress=False,
            imatrix=str(im) if im else None,
        )  # fmt: skip
        total, differ = compare_tensors(ours["path"], theirs)
        assert differ == [], (mix, im is not None, f"{len(differ)} of {total} differ")


@pytest.fixture(scope="module")
def bundled_f32(tmp_path_factory):
    """The bundled Gemma 3 270M dequantized to a float32 GGUF (1.1 GB), and an importance
    matrix llama-imatrix computes for it on the shipped evaluation text."""
    from gemmakit.paths import DATA

    root = tmp_path_factory.mktemp("bundled_f32")
    f32 = Path(export(to="gguf", output=root / "f32.gguf", qtype="f32", progress=False)["path"])
    exe = LLAMA_CPP_BIN / "llama-imatrix"
    if not exe.exists():
        pytest.skip(f"{exe} not built (GEMMAKIT_LLAMA_CPP_BIN)")
    imatrix = root / "imatrix.gguf"
    cmd = [str(exe), "-m", str(f32), "-f", str(DATA / "eval_text.txt"), "-o", str(imatrix), "-c", "128",
           "--chunks", "4", "--no-ppl", "-t", "2"]  # fmt: skip
    env = {**os.environ, "LD_LIBRARY_PATH": str(LLAMA_CPP_BIN)}
    subprocess.run(cmd, check=True, capture_output=True, timeout=600, env=env)
    return f32, imatrix


@pytest.mark.llamacpp
@needs_kernels
@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_m", "q6_k", "q3_k_m", "q8_0", "q2_k", "iq4_xs"])
def test_bundled_model_files_equal_llama_quantize(bundled_f32, tmp_path, mix):
    """The real model (640-wide rows: llama.cpp's fallbacks decide most types), with and
    without llama-imatrix's importance matrix: every tensor's type and bytes."""
    f32, imatrix = bundled_f32
    for im in (None, imatrix):
        theirs = llama_quantize(f32, tmp_path / "theirs.gguf", mix, im)
        ours = export(
            model=str(f32), to="gguf", output=tmp_path / "ours.gguf", qtype=mix, progress=False,
            imatrix=str(im) if im else None,
        )  # fmt: skip
        total, differ = compare_tensors(ours["path"], theirs)
        print(f"{mix} imatrix={im is not None}: {total - len(differ)} of {total} tensors equal")
        assert differ == [], (mix, im is not None, f"{len(differ)} of {total} differ: {differ[:3]}")

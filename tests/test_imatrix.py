"""Importance matrices: llama.cpp's file formats, the statistic, the CLI, parity with llama-imatrix."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gemmakit.errors import GemmakitError, ModelFileError
from gemmakit.evaluation.imatrix import compute_imatrix, imatrix_chunks
from gemmakit.formats.gguf import hf_to_gguf_name
from gemmakit.formats.imatrix import load_imatrix, read_imatrix, write_imatrix
from gemmakit.formats.safetensors import hf_to_native, load_into
from gemmakit.hf_config import from_hf_config
from gemmakit.loading import ModelSource, load_model
from gemmakit.model.families import model_class

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


def test_fuzz_imatrix_reader(tmp_path):
    """Both formats cut at every offset and with bytes flipped: a result or one ModelFileError."""
    import random

    sums, counts = sample_stats()
    gguf_bytes = write_imatrix(tmp_path / "m.gguf", sums, counts, ["t.txt"], 2, 512).read_bytes()
    write_legacy(tmp_path / "m.dat", [("blk.0.ffn_up.weight", 3, np.ones(16, np.float32))])
    rng = random.Random(0)
    path = tmp_path / "fuzz"
    for data in (gguf_bytes, (tmp_path / "m.dat").read_bytes()):
        cases = [data[:cut] for cut in sorted({*range(0, len(data), 7), len(data) - 1})]
        for _ in range(300):
            damaged = bytearray(data)
            damaged[rng.randrange(len(data))] = rng.choice([0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)])
            cases.append(bytes(damaged))
        for case in cases:
            path.write_bytes(case)
            try:
                result = read_imatrix(path)
            except ModelFileError as e:
                assert "fuzz" in str(e) and "\n" not in str(e)
                continue
            assert all(v.dtype == np.float32 and v.ndim == 1 for v in result.values())


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
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
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


# --- the statistic ------------------------------------------------------------------------


def test_chunks_follow_llama_imatrix():
    ids = [2, *range(10, 30)]  # <bos> + 20 text tokens = 21 ids
    chunks = imatrix_chunks(ids, bos_id=2, ctx=8)
    # 21 // 8 = 2 chunks; each starts with <bos> in place of its first token; the tail is dropped.
    assert chunks == [[2, *range(10, 17)], [2, *range(18, 25)]]
    assert imatrix_chunks(ids, 2, 5, chunks=3) == [
        [2, 10, 11, 12, 13],
        [2, 15, 16, 17, 18],
        [2, 20, 21, 22, 23],
    ]
    with pytest.raises(GemmakitError, match="needs at least 22"):
        imatrix_chunks(ids, 2, 11)
    with pytest.raises(GemmakitError, match="--chunks"):
        imatrix_chunks(ids, 2, 4, chunks=0)


def reference_stats(hf_model, chunks):
    """The statistic computed independently: transformers' model, one chunk at a time, each
    linear's input captured and squared-summed in float64."""
    sums, counts = {}, {}

    def hook_for(name):
        def hook(_m, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = []
    for path, m in hf_model.named_modules():
        if isinstance(m, torch.nn.Linear) and path.startswith("model.layers."):
            handles.append(m.register_forward_pre_hook(hook_for(hf_to_gguf_name(path + ".weight"))))
    with torch.no_grad():
        for chunk in chunks:
            hf_model(torch.tensor([chunk]))
    for h in handles:
        h.remove()
    return sums, counts


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_statistic_matches_an_independent_computation(family, hf_folder):
    folder, hf_model = hf_folder(family)
    model = load_model(ModelSource("hf", folder, family))
    ids = [2, *torch.randint(3, 256, (70,), generator=torch.Generator().manual_seed(1)).tolist()]
    stats, n = compute_imatrix(model, ids, bos_id=2, ctx=16, batch_tokens=32)  # two passes of 2 chunks
    assert n == 4
    ref_sums, ref_counts = reference_stats(hf_model, imatrix_chunks(ids, 2, 16))
    per_layer = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    assert set(stats.sums) == {f"blk.{i}.{t}.weight" for i in range(2) for t in per_layer} == set(ref_sums)
    for name, s in stats.sums.items():
        assert s.dtype == torch.float32 and s.shape == (1, ref_sums[name].shape[0])
        assert stats.counts[name].tolist() == [ref_counts[name]] == [64]
        torch.testing.assert_close(s[0].double(), ref_sums[name], rtol=1e-5, atol=1e-6)
    # And by hand for layer 0's q/k/v: the input is input_layernorm(embed * sqrt(C)), (1 + w).
    chunks = torch.tensor(imatrix_chunks(ids, 2, 16))
    layer = hf_model.model.layers[0].input_layernorm
    h = hf_model.model.embed_tokens.weight[chunks].double() * torch.tensor(64**0.5).double()
    h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + layer.eps) * (1 + layer.weight.double())
    expected = h.reshape(-1, 64).square().sum(0)
    for t in ("attn_q", "attn_k", "attn_v"):
        torch.testing.assert_close(
            stats.sums[f"blk.0.{t}.weight"][0].double(), expected, rtol=1e-4, atol=1e-5
        )


def test_experts_are_counted_per_expert():
    """Gemma 4's experts: one row of sums and one count per expert, as llama.cpp's MUL_MAT_ID
    collection; each token adds its input to each of its top-k experts."""
    from tests.test_gemma4 import VARIANTS, random_gemma4

    hf_model = random_gemma4("moe")
    config = from_hf_config(hf_model.config.to_dict())
    model = model_class(config)(config)
    load_into(model, hf_to_native(hf_model.state_dict(), config), "moe")
    model.eval()
    expert_inputs = []
    norm = model.model.layers[1].pre_feedforward_layernorm_2
    handle = norm.register_forward_hook(lambda _m, _a, out: expert_inputs.append(out.detach()))
    ids = [2, *torch.randint(3, 160, (40,), generator=torch.Generator().manual_seed(2)).tolist()]
    stats, n = compute_imatrix(model, ids, bos_id=2, ctx=8, chunks=3)
    handle.remove()
    k, experts = VARIANTS["moe"]["top_k_experts"], VARIANTS["moe"]["num_experts"]
    gate_up, down = stats.sums["blk.1.ffn_gate_up_exps.weight"], stats.sums["blk.1.ffn_down_exps.weight"]
    assert gate_up.shape == (experts, 48) and down.shape == (experts, 24)
    counts = stats.counts["blk.1.ffn_gate_up_exps.weight"]
    assert (
        counts.sum().item() == n * 8 * k
        and counts.tolist() == stats.counts["blk.1.ffn_down_exps.weight"].tolist()
    )
    x = torch.cat(expert_inputs).reshape(-1, 48).double()
    torch.testing.assert_close(gate_up.double().sum(0), k * x.square().sum(0), rtol=1e-5, atol=1e-6)
    assert stats.counts["blk.1.ffn_gate_inp.weight"].tolist() == [n * 8]  # the router: dense
    assert "blk.1.ffn_gate.weight" in stats.sums  # the dense MLP beside the experts
    assert not [n for n in stats.sums if "norm" in n]  # pre_ffw_norm_2 & co. are no matrices


# --- the command --------------------------------------------------------------------------


@pytest.fixture
def bundled_load(monkeypatch, bundled):
    """`gemmakit imatrix` gets the session's bundled model instead of loading it again."""
    import gemmakit.loading

    monkeypatch.setattr(gemmakit.loading, "load", lambda model=None, **kw: bundled)
    return bundled


def test_cli_writes_the_statistic_of_the_text(tmp_path, capsys, bundled_load):
    from gemmakit.cli import main
    from gemmakit.paths import DATA

    text = DATA / "eval_text.txt"
    out = tmp_path / "imatrix.gguf"
    assert (
        main(["imatrix", "--text", str(text), "-o", str(out), "--ctx", "16", "--chunks", "2", "--json"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["chunks"] == 2 and summary["tokens"] == 32 and summary["entries"] == 18 * 7
    loaded = load_imatrix(out)
    assert loaded.datasets == [str(text)] and (loaded.chunk_count, loaded.chunk_size) == (2, 16)
    assert set(loaded.counts) == {f"blk.{i}.{t}.weight" for i in range(18) for t in (
        "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}  # fmt: skip
    tok = bundled_load.tokenizer
    ids = tok.encode(text.read_text(), add_bos=True)
    stats, _ = compute_imatrix(bundled_load.model, ids, tok.bos_id, ctx=16, chunks=2)
    for name in ("blk.0.attn_q.weight", "blk.17.ffn_down.weight"):
        np.testing.assert_array_equal(loaded.sums[name][0], stats.sums[name][0].numpy())
        assert loaded.counts[name].tolist() == [32]


def test_cli_help(capsys):
    from gemmakit.cli import main

    with pytest.raises(SystemExit):
        main(["imatrix", "--help"])
    text = capsys.readouterr().out
    assert "--ctx" in text and "--chunks" in text and "llama-imatrix" in text and "MODEL" in text


def test_cli_mistakes_are_one_line_errors(tmp_path, capsys, bundled_load):
    from gemmakit.cli import main

    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    cases = [
        (["--text", str(short), "--ctx", "512"], "needs at least 1024"),
        (["--text", str(tmp_path)], "is a folder"),
        (["--ctx", "1"], "--ctx must be at least 2"),
        (["--chunks", "0"], "--chunks must be positive"),
        (["-o", str(tmp_path)], "-o takes a file name"),
    ]
    for extra, message in cases:
        assert main(["imatrix", "-o", str(tmp_path / "x.gguf"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.gguf").exists()


def relative_differences(ours: dict, reference: dict) -> dict[str, float]:
    """Per entry, |ours - reference|_2 / |reference|_2 over the per-column means."""
    return {
        name: float(np.linalg.norm(ours[name] - ref) / max(np.linalg.norm(ref), 1e-30))
        for name, ref in reference.items()
    }


@pytest.mark.llamacpp
@pytest.mark.parametrize("ctx, chunks", [(128, 4), (512, None)])
def test_cli_matches_llama_imatrix_on_the_bundled_model(tmp_path, bundled_gguf, ctx, chunks):
    """The same text, ctx and chunks through `gemmakit imatrix` and `llama-imatrix`: the same
    entries and counts, and means within the difference of llama.cpp running the Q4_K_M blocks
    with 8-bit-quantized activations against gemmakit's float32 dequantized weights."""
    from gemmakit.cli import main
    from gemmakit.paths import DATA

    text = DATA / "eval_text_wiki.txt"
    ref = llama_imatrix(bundled_gguf, text, tmp_path / "ref.gguf", ctx=ctx, chunks=chunks or 10**6)
    args = [
        "imatrix",
        str(bundled_gguf),
        "--text",
        str(text),
        "-o",
        str(tmp_path / "ours.gguf"),
        "--ctx",
        str(ctx),
    ]
    assert main(args + (["--chunks", str(chunks)] if chunks else [])) == 0
    theirs, ours = load_imatrix(ref), load_imatrix(tmp_path / "ours.gguf")
    assert set(ours.sums) == set(theirs.sums)
    assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size)
    for name in theirs.counts:
        assert ours.counts[name].tolist() == theirs.counts[name].tolist(), (
            name,
            ours.counts[name],
            theirs.counts[name],
        )
    diffs = relative_differences(ours.importance(), theirs.importance())
    worst = max(diffs, key=diffs.get)
    print(f"\nctx {ctx}: max relative L2 difference {diffs[worst]:.2e} ({worst}), "
          f"median {np.median(list(diffs.values())):.2e}")  # fmt: skip
    assert diffs[worst] < 0.05, (worst, diffs[worst])


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", ["gemma3", "gemma4_e", "gemma3n_llama_cpp"])
def test_matches_llama_imatrix_on_tiny_float32_models(tmp_path, case):
    """Tiny random models of every family gemmakit exports to GGUF (Gemma 3; Gemma 4 with PLE,
    KV sharing and experts; Gemma 3n with AltUp and LAuReL), written as float32 GGUFs, so
    llama.cpp multiplies float32 weights by float32 activations: the same entries (the experts
    per expert) and counts as llama-imatrix, and the same means up to float rounding."""
    from gemmakit.cli import main
    from gemmakit.export import export
    from gemmakit.paths import DATA
    from tests.conftest import random_hf_model as random_gemma3
    from tests.test_gguf_families import random_hf_model, save_folder

    if case == "gemma3":
        model = random_gemma3("gemma3")
        # llama.cpp ignores Gemma 3's query_pre_attn_scalar (it uses head_dim; gguf_writer notes it).
        model.config.query_pre_attn_scalar = model.config.head_dim
    else:
        model = random_hf_model(case)
    folder = save_folder(model, tmp_path / "hf")
    gguf_path = tmp_path / "m.gguf"
    export(model=str(folder), to="gguf", output=gguf_path, qtype="f32", progress=False)
    text = DATA / "eval_text.txt"
    ref = llama_imatrix(gguf_path, text, tmp_path / "ref.gguf", ctx=64, chunks=4)
    out = tmp_path / "ours.gguf"
    assert (
        main(["imatrix", str(gguf_path), "--text", str(text), "-o", str(out), "--ctx", "64", "--chunks", "4"])
        == 0
    )
    theirs, ours = load_imatrix(ref), load_imatrix(out)
    assert set(ours.sums) == set(theirs.sums), set(ours.sums) ^ set(theirs.sums)
    flipped = []  # layers where an expert choice differs
    for name, count in theirs.counts.items():
        if "_exps." in name:
            # Each token's k experts: the same total; an expert choice that is a near tie may
            # flip between llama.cpp's arithmetic (its GELU is a float16 table) and torch's.
            assert ours.counts[name].sum() == count.sum(), name
            assert np.abs(ours.counts[name] - count).max() <= 0.03 * count.max(), (
                name,
                ours.counts[name],
                count,
            )
            if ours.counts[name].tolist() != count.tolist():
                flipped.append(int(name.split(".")[1]))
        else:
            assert ours.counts[name].tolist() == count.tolist(), name
    diffs = relative_differences(ours.importance(), theirs.importance())
    # Until routing first differs, the statistic is the same up to float drift; Gemma 3n
    # drifts more with depth (llama.cpp's sparsity cutoff uses the n - 1 standard deviation
    # where transformers uses n; measured: blk.0 within 1e-6, blk.21 1.3e-2).
    same_routing = {n: d for n, d in diffs.items() if int(n.split(".")[1]) < min(flipped, default=10**6)}
    worst = max(same_routing, key=same_routing.get)
    print(f"\n{case}: {len(diffs)} entries, max relative L2 difference {diffs[worst]:.2e} ({worst})"
          f"{f' before layer {min(flipped)} (expert choices differ there), {max(diffs.values()):.2e} overall' if flipped else ''}")  # fmt: skip
    assert diffs[worst] < (0.02 if case.startswith("gemma3n") else 3e-3), (worst, diffs[worst])
    assert max(diffs.values()) < 0.1
    # llama.cpp's quantizer takes gemmakit's file as its own.
    done = subprocess.run(
        [str(LLAMA_CPP_BIN / "llama-quantize"), "--imatrix", str(out), str(gguf_path), str(tmp_path / "q.gguf"), "q4_k_m"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"loaded {len(diffs)} importance matrix entries" in done.stdout + done.stderr

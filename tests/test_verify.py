"""verify: the verdicts on identical copies, quantized copies and different models; the CLIs."""

from __future__ import annotations

import json

import pytest
import torch

from gemmakit.cli import main
from gemmakit.evaluation.verify import THRESHOLDS, classify, compare
from gemmakit.export import export
from gemmakit.loading import load
from tests.test_export import tiny_sentencepiece

SHORT_TEXT = "The orchard produced more fruit than she could sell, so she pressed cider. " * 6


@pytest.fixture
def tiny_pair(hf_folder, tmp_path):
    """A tiny gemma2 folder with a tokenizer, and its f32 GGUF export."""
    folder, _ = hf_folder("gemma2")
    (folder / "tokenizer.model").write_bytes(tiny_sentencepiece())
    out = tmp_path / "tiny.f32.gguf"
    export(model=str(folder), to="gguf", output=out, qtype="f32", progress=False)
    return folder, out


def test_classify_thresholds():
    t = THRESHOLDS
    assert classify(True, 0.0, 64, 64, 0.0)[0] == "identical"
    assert classify(True, 2e-3, 64, 64, 0.0)[0] == "within quantization tolerance"
    assert classify(True, 0.5, 55, 64, 0.05)[0] == "within quantization tolerance"  # 86% agree
    assert classify(True, 0.5, 54, 64, 0.05)[0] == "different"  # 84% < 85%
    assert classify(True, 0.5, 64, 64, t.tolerance_ppl + 0.01)[0] == "different"
    assert classify(True, 0.5, 64, 64, -0.12)[0] == "different"  # much *lower* is suspicious too
    verdict, reason = classify(False, 0.0, 64, 64, 0.0)
    assert verdict == "different" and "tokenizers" in reason


def test_export_is_identical(tiny_pair):
    folder, gguf_path = tiny_pair
    a = load(str(folder), dtype="float32", device="cpu")
    b = load(str(gguf_path), dtype="float32", device="cpu")
    result = compare(a, b, prompts=["The bridge", "A letter"], new_tokens=8, text=SHORT_TEXT, context=64)
    assert result["verdict"] == "identical" and result["faithful"]
    assert result["greedy_agreement"] == result["greedy_total"] == 16
    assert result["max_abs_logit_diff"] <= 1e-5
    assert result["perplexity_a"] == pytest.approx(result["perplexity_b"], rel=1e-6)


def test_different_model_is_different(tiny_pair, hf_folder, tmp_path):
    folder, _ = tiny_pair
    a = load(str(folder), dtype="float32", device="cpu")
    b = load(str(folder), dtype="float32", device="cpu")
    with torch.no_grad():  # a fine-tune gone wrong: every weight moved
        for p in b.model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    result = compare(a, b, prompts=["The bridge", "A letter"], new_tokens=8, text=SHORT_TEXT, context=64)
    assert result["verdict"] == "different" and not result["faithful"]
    assert result["max_abs_logit_diff"] > 0.1


def test_cli_verify_json_and_exit_codes(tiny_pair, tmp_path, capsys):
    folder, gguf_path = tiny_pair
    text = tmp_path / "text.txt"
    text.write_text(SHORT_TEXT)
    args = ["--new-tokens", "4", "--text", str(text), "--context", "64", "--prompt", "The bridge"]
    capsys.readouterr()
    assert main(["verify", str(folder), str(gguf_path), *args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verdict"] == "identical" and result["greedy_total"] == 4
    # Human output states the verdict and the thresholds.
    assert main(["verify", str(folder), str(gguf_path), *args]) == 0
    out = capsys.readouterr().out
    assert "verdict: IDENTICAL: B is a faithful copy of A" in out and "thresholds:" in out
    # Q8_0 stays within tolerance (exit 0); Q4_0 of a random tiny model does not (exit 1).
    for qtype, status, verdict in (("q8_0", 0, "within quantization tolerance"), ("q4_0", 1, "different")):
        path = tmp_path / f"tiny.{qtype}.gguf"
        export(model=str(folder), to="gguf", output=path, qtype=qtype, progress=False)
        assert main(["verify", str(folder), str(path), *args, "--json"]) == status
        assert json.loads(capsys.readouterr().out)["verdict"] == verdict
    # The tolerance is the user's to set.
    loose = ["--ppl-tolerance", "10", "--agreement", "0"]
    assert main(["verify", str(folder), str(path), *args, *loose, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "within quantization tolerance"
    assert main(["verify", str(folder), str(path), "--agreement", "2"]) == 2
    assert main(["verify", str(folder), str(tmp_path / "nope.gguf")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_quantize_help_says_what_it_measures_and_that_it_keeps_no_file(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the description
    assert "size" in text and "perplexity" in text and "No file is kept" in text
    assert "gemmakit export --to gguf --type TYPE" in text


def test_cli_quantize_table_json(tiny_pair, tmp_path, capsys):
    folder, _ = tiny_pair
    text = tmp_path / "text.txt"
    text.write_text(SHORT_TEXT)
    capsys.readouterr()
    rc = main(["quantize", "--model", str(folder), "--text", str(text), "--context", "64",
               "--types", "fp32,int8,nf4,int4-all,gguf-q8_0,gguf-f32", "--json"])  # fmt: skip
    assert rc == 0
    table = json.loads(capsys.readouterr().out)
    rows = {r["type"]: r for r in table["rows"]}
    assert list(rows) == ["fp32", "int8", "nf4", "int4-all", "gguf-q8_0", "gguf-f32"]
    assert rows["fp32"]["change"] == 0
    assert rows["gguf-f32"]["perplexity"] == pytest.approx(rows["fp32"]["perplexity"], rel=1e-5)
    assert rows["int4-all"]["bytes"] < rows["int8"]["bytes"] < rows["fp32"]["bytes"] / 3
    assert rows["gguf-q8_0"]["bytes"] < rows["fp32"]["bytes"] / 2
    assert abs(rows["int8"]["change"]) < 0.05  # 8 bits barely move perplexity
    assert main(["quantize", "--model", str(folder), "--types", "fp32,int3"]) == 2
    assert "unknown type(s) int3" in capsys.readouterr().err


@pytest.mark.slow
def test_bundled_q8_0_export_is_within_tolerance(bundled, tmp_path):
    out = tmp_path / "b.q8_0.gguf"
    export(loaded=bundled, to="gguf", output=out, qtype="q8_0", progress=False)
    result = compare(bundled, load(str(out), dtype="float32", device="cpu"), max_tokens=512)
    assert result["verdict"] == "within quantization tolerance"
    assert result["greedy_agreement"] >= 0.9 * result["greedy_total"]

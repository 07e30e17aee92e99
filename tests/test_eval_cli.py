"""`gemmakit eval`: perplexity, choice and tasks from the command line."""

from __future__ import annotations

import json
import math

import pytest

from gemmakit.cli import main
from gemmakit.evaluation import settings as eval_settings
from gemmakit.evaluation.perplexity import text_perplexity


@pytest.fixture
def bundled_for_every_setting(monkeypatch, bundled):
    """Makes every setting load the session's bundled model (no quantize/adapter allowed)."""
    seen = []

    def fake_load(setting, dtype="auto", device=None):
        assert setting.adapter is None and setting.quantize is None
        seen.append(setting)
        return bundled

    monkeypatch.setattr(eval_settings, "load_setting", fake_load)
    return seen


def test_help_mentions_the_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "perplexity" in text and "choice" in text and "tasks" in text
    with pytest.raises(SystemExit):
        main(["eval", "choice", "--help"])
    text = capsys.readouterr().out
    assert "--fewshot" in text and "--quantize" in text and "repeatable" in text


def test_tasks_lists_shipped_files(capsys):
    assert main(["eval", "tasks"]) == 0
    out = capsys.readouterr().out
    for name, layout in (("arc_style", "arc"), ("hellaswag_style", "hellaswag"), ("piqa_style", "piqa")):
        assert any(line.split()[:2] == [name, layout] for line in out.splitlines())
    assert main(["eval", "tasks", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {t["name"] for t in listed} >= {"arc_style", "hellaswag_style", "mmlu_style", "piqa_style"}


def test_choice_json_on_the_real_bundled_model(capsys):
    assert main(["eval", "choice", "--task", "piqa_style", "--limit", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "ln p(c_j | <bos>, context" in out["scoring_rule"]
    (row,) = out["results"]
    assert row["task"] == "piqa_style" and row["layout"] == "piqa" and row["n"] == 2
    assert 0 <= row["acc"] <= 1 and 0 <= row["acc_norm"] <= 1
    assert row["quantize"] is None and row["model"].endswith(".gguf")


def test_choice_text_prints_layout_rule_and_table(capsys, tmp_path, bundled_for_every_setting):
    samples = tmp_path / "samples.jsonl"
    argv = [
        "eval",
        "choice",
        "--task",
        "arc_style",
        "--limit",
        "1",
        "--fewshot",
        "1",
        "--samples",
        str(samples),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "layout detected: arc (ARC-style" in out and "1 of 40 questions" in out
    assert "Scoring rule" in out and "acc_norm" in out and "1-shot" in out
    header = next(line for line in out.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "setting", "n", "acc", "acc_norm", "tokens/s", "seconds"]
    row = out.splitlines()[-1].split()
    assert row[:3] == ["arc_style", "bundled", "none"] and float(row[4]) in (0.0, 1.0)
    (sample,) = [json.loads(line) for line in samples.read_text().splitlines()]
    assert sample["task"] == "arc_style" and len(sample["loglikelihoods"]) == 4


def test_choice_compares_settings_in_one_table(capsys, tmp_path, bundled_for_every_setting):
    data = tmp_path / "mine.jsonl"
    data.write_text(
        json.dumps({"goal": "To open a door,", "sol1": "turn the handle.", "sol2": "eat it.", "label": 0})
    )
    argv = ["eval", "choice", "--data", str(data), "--model", "first.gguf", "--model", "second", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s.model for s in bundled_for_every_setting] == ["first.gguf", "second"]
    assert [r["setting"] for r in out["results"]] == ["first.gguf none", "second none"]
    assert out["results"][0]["acc"] == out["results"][1]["acc"]  # the same model twice


def test_perplexity_json(capsys, tmp_path, bundled, bundled_for_every_setting):
    text = tmp_path / "t.txt"
    text.write_text("The cat sat on the mat. The dog lay by the fire, and the house was quiet.")
    assert (
        main(["eval", "perplexity", "--text", str(text), "--context", "16", "--stride", "8", "--json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"model", "tokens", "nll", "perplexity"}
    assert out["tokens"] == len(bundled.tokenizer.encode(text.read_text(), add_bos=False))
    assert out["perplexity"] == pytest.approx(math.exp(out["nll"]))
    direct = text_perplexity(bundled, text.read_text(), 16, 8)
    assert out["nll"] == pytest.approx(direct.nll, rel=1e-6)
    assert (out["context"], out["stride"], out["windows"]) == (16, 8, direct.windows)


def test_perplexity_text_states_the_method_and_compares(capsys, tmp_path, bundled_for_every_setting):
    text = tmp_path / "t.txt"
    text.write_text("One two three four five six seven eight nine ten.")
    assert (
        main(["eval", "perplexity", "--text", str(text), "--context", "8", "--model", "a", "--model", "b"])
        == 0
    )
    out = capsys.readouterr().out
    assert "<bos> starts every window and is never predicted" in out and "exp(nll)" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("a ", "b "))]
    assert [r[0] for r in rows] == ["a", "b"] and rows[0][3] == rows[1][3]  # same perplexity


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval"], "choose what to evaluate"),
        (["eval", "choice"], "give --task NAME"),
        (["eval", "choice", "--task", "nope"], "no shipped task 'nope'"),
        (["eval", "choice", "--task", "piqa_style", "--fewshot", "40"], "--fewshot 40: .* has only 40 questions"),
        (["eval", "perplexity", "--text", "/no/such.txt"], "/no/such.txt: no such file"),
        (["eval", "perplexity", "--context", "64", "--stride", "64"], "--stride must be between 1 and context - 1 = 63"),
    ],
)  # fmt: skip
def test_user_errors_exit_2_with_one_line(capsys, argv, message):
    import re

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gemmakit eval: error: ") and re.search(message, err) and "Traceback" not in err


def test_bad_task_file_names_file_and_line(capsys, tmp_path):
    bad = tmp_path / "arc.jsonl"
    row = {
        "question": "q",
        "choices": {"text": ["a", "b", "c", "d"], "label": list("ABCD")},
        "answerKey": "A",
    }
    bad.write_text(
        "\n".join([json.dumps(row)] * 6 + ['{"ctx": "c", "endings": ["a", "b", "c", "d"], "label": 5}'])
    )
    assert main(["eval", "choice", "--data", str(bad)]) == 2
    assert f"{bad}:7: hellaswag layout, but line 1 is arc" in capsys.readouterr().err
    bad.write_text('{"ctx": "c", "endings": ["a", "b", "c", "d"], "label": 5}\n')
    assert main(["eval", "choice", "--data", str(bad)]) == 2
    assert f"{bad}:1: label 5 out of range for 4 choices" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["eval", "choice", "--data", str(empty)]) == 2
    assert f"{empty}: no questions (the file is empty)" in capsys.readouterr().err
    text = tmp_path / "blank.txt"
    text.write_text("  \n")
    assert main(["eval", "perplexity", "--text", str(text)]) == 2
    assert "the text is empty" in capsys.readouterr().err


# --- real quantized / adapted settings (modules written separately) --------------------------


def test_quantize_settings_compare_in_one_run(capsys):
    pytest.importorskip("gemmakit.quant")
    argv = ["eval", "choice", "--task", "piqa_style", "--limit", "2", "--json",
            "--quantize", "none", "--quantize", "int8"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["quantize"] for r in rows] == [None, "int8"]
    assert all(0 <= r["acc"] <= 1 for r in rows)


def test_adapter_setting_changes_the_scores(capsys, tmp_path):
    pytest.importorskip("gemmakit.lora")
    import torch
    from safetensors.torch import save_file

    # A PEFT-format LoRA on layer 0's q/v projections with non-zero B, so it changes outputs.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": None, "modules_to_save": None, "layers_to_transform": [0],
        "use_dora": False, "use_rslora": False, "inference_mode": True,
    }))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    prefix = "base_model.model.model.layers.0.self_attn"
    save_file({
        f"{prefix}.q_proj.lora_A.weight": torch.randn(2, 640, generator=g) * 0.05,
        f"{prefix}.q_proj.lora_B.weight": torch.randn(1024, 2, generator=g) * 0.05,
        f"{prefix}.v_proj.lora_A.weight": torch.randn(2, 640, generator=g) * 0.05,
        f"{prefix}.v_proj.lora_B.weight": torch.randn(256, 2, generator=g) * 0.05,
    }, str(adapter / "adapter_model.safetensors"))  # fmt: skip
    samples = tmp_path / "s.jsonl"
    argv = ["eval", "choice", "--task", "piqa_style", "--limit", "1", "--json", "--samples", str(samples),
            "--adapter", "none", "--adapter", str(adapter)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["adapter"] for r in rows] == [None, str(adapter)]
    base, adapted = (json.loads(line)["loglikelihoods"] for line in samples.read_text().splitlines())
    assert base != adapted

"""`gemmakit finetune` and `gemmakit merge` from the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gemmakit.cli import main
from tests.test_training import SAMPLE, one_thread, records, tiny_model_folder  # noqa: F401


def tiny_args(folder, out, *extra):
    return [
        "finetune", "--model", str(folder), "--data", SAMPLE, "--output", str(out), "--recipe", "lora",
        "--max-length", "64", "--ce-chunk", "16", "--eval-max-rows", "8", "--lr", "0.005",
        "--warmup-steps", "1", *extra,
    ]  # fmt: skip


def test_help_lists_the_interface(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--data", "--eval-data", "--output", "--recipe", "--config", "--max-steps",
                 "--max-length", "--batch-size", "--lr", "--eval-every", "--save-every", "--resume",
                 "--gradient-checkpointing", "--packing", "--chat-template", "--train-on-responses-only",
                 "qlora-guanaco"):  # fmt: skip
        assert flag in out, flag


def test_every_setting_is_a_flag(capsys):
    """The flags come from TrainConfig's fields: one per field, each with its help text."""
    from gemmakit.options import flag_name, help_texts
    from gemmakit.training.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    for name, text in help_texts(TrainConfig).items():
        assert flag_name(name) in out, name
        assert " ".join(text.split()[:4]) in out, name


def test_finetune_then_merge_then_generate(tmp_path, capsys):
    folder = tiny_model_folder(tmp_path)
    out = tmp_path / "run"
    assert (
        main(tiny_args(folder, out, "--max-steps", "4", "--eval-every", "2", "--save-every", "2", "--json"))
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 4 and summary["last_eval_loss"] < summary["first_eval_loss"]
    assert summary["optimizer"] == "torch.optim.AdamW (fused)"
    recs = records(out)
    assert [r["step"] for r in recs if "eval_loss" in r] == [0, 2, 4]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    saved = json.loads((out / "config.json").read_text())
    assert saved["max_steps"] == 4 and saved["recipe"] == "lora" and saved["lora_r"] == 16

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(folder), "--adapter", str(out / "adapter"), "-o", str(merged)]) == 0
    from gemmakit import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=12)
    a = LLM(model=str(folder), adapter=str(out / "adapter"))
    b = LLM(model=str(merged))
    ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        torch.testing.assert_close(a.model(ids), b.model(ids), rtol=1e-5, atol=1e-5)
    prompt = "### Human: What is 2+2?### Assistant:"
    assert (
        a.generate(prompt, params)[0].outputs[0].token_ids
        == b.generate(prompt, params)[0].outputs[0].token_ids
    )
    assert main(["merge", "--model", str(folder), "--adapter", str(out / "adapter"), "-o", str(merged)]) == 2
    assert "exists" in capsys.readouterr().err


def test_config_file_and_flags(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("recipe: lora\nlr: 0.001\nbatch-size: 2\npacking: true\n")
    assert (
        main(["finetune", "--config", str(cfg), "--lr", "0.01", "--data", "guanaco-sample", "--show-config"])
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert (shown["recipe"], shown["lr"], shown["batch_size"], shown["packing"]) == ("lora", 0.01, 2, True)
    assert shown["data"].endswith("guanaco_sample.jsonl") and shown["max_steps"] == 300
    assert main(["finetune", "--data", "guanaco-sample", "--show-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["recipe"] == "qlora-guanaco" and shown["lr"] == 2e-5 and shown["quantization"] == "nf4"
    assert main(["finetune", "--data", "guanaco-sample", "--recipe", "qlora-article", "--show-config"]) == 0
    assert json.loads(capsys.readouterr().out)["recipe"] == "qlora-guanaco"  # the former name, accepted


def test_user_errors_exit_2(tmp_path, capsys):
    folder = tiny_model_folder(tmp_path)
    assert main(["finetune", "--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o"),
                 "--model", str(folder)]) == 2  # fmt: skip
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(tiny_args(folder, tmp_path / "r", "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["finetune", "--data", SAMPLE, "--batch-size", "0", "--show-config"]) == 2


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path):
    folder = tiny_model_folder(tmp_path)
    out = tmp_path / "run"
    args = tiny_args(folder, out, "--max-steps", "400", "--eval-every", "1000", "--save-every", "1000")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gemmakit.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (out / "metrics.jsonl").exists() and len(records(out)) >= 3:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    (ckpt,) = sorted((out / "checkpoints").glob("step-*"))
    step = int(ckpt.name.split("-")[1])
    assert 2 <= step < 400 and max(r["step"] for r in records(out)) == step
    assert not (out / "adapter").exists()
    assert main(tiny_args(folder, out, "--resume", "--max-steps", str(step + 2))) == 0
    assert [r["step"] for r in records(out) if "loss" in r] == list(range(1, step + 3))
    assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_default_model_learns_the_format_and_stops(tmp_path):
    """The README demo: LoRA on the bundled 270M with the shipped data in chat format; the tuned
    model then answers held-out-style questions briefly and ends its turn by itself."""
    from gemmakit import LLM, SamplingParams

    out = tmp_path / "demo"
    args = ["finetune", "--data", "guanaco-sample", "--output", str(out), "--recipe", "lora", "--dtype", "bfloat16",
            "--chat-template", "--max-steps", "60", "--eval-every", "30", "--save-every", "60", "--lr", "2e-4",
            "--warmup-steps", "5", "--max-length", "128"]  # fmt: skip
    assert main(args) == 0
    evals = [r["eval_loss"] for r in records(out) if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.3, evals
    llm = LLM(adapter=str(out / "adapter"), dtype="bfloat16")
    questions = ["What is the capital of Peru?", "What is 9 times 7?", "What is the opposite of strong?"]
    outs = llm.chat(
        [[{"role": "user", "content": q}] for q in questions], SamplingParams(temperature=0, max_tokens=48)
    )
    for o in outs:
        assert o.outputs[0].finish_reason == "stop" and 0 < len(o.outputs[0].token_ids) < 40, o.outputs[
            0
        ].text

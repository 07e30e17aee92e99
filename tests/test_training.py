"""Training loop: the fused chunked loss, resume equivalence, interrupts, data parallelism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gemmakit import lora
from gemmakit.errors import ConfigError, GemmakitError
from gemmakit.loading import load
from gemmakit.options import help_texts
from gemmakit.training import config as train_config
from gemmakit.training import data as sft_data
from gemmakit.training import loss as training_loss
from gemmakit.training import setup as train_setup
from gemmakit.training.checkpoints import checkpoints
from gemmakit.training.trainer import train
from tests.conftest import random_hf_model

SAMPLE = str(sft_data.shipped_dataset())
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two threads
    wait on each other at every op; the default model's test sets its own."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_tiny_tokenizer(folder: Path):
    """A character-level tokenizer.json with Gemma's special ids (pad 0, eos 1, bos 2)."""
    from tokenizers import Tokenizer, models

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))


def tiny_model_folder(root: Path, family: str = "gemma3", seed: int = 0) -> Path:
    folder = root / f"tiny-{family}"
    if not (folder / "config.json").exists():
        random_hf_model(family, seed=seed).save_pretrained(folder)
        write_tiny_tokenizer(folder)
    return folder


def tiny_config(model: Path, output: Path, **kw) -> train_config.TrainConfig:
    base = dict(
        model=str(model), data=SAMPLE, output=str(output), max_steps=6, eval_every=3, save_every=2,
        lr=5e-3, warmup_steps=1, batch_size=4, max_length=96, ce_chunk=16, eval_max_rows=16,
    )  # fmt: skip
    base.update(kw)
    return train_config.make_config(kw.pop("recipe", "lora"), base)


def records(output: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    out = [json.loads(ln) for ln in (output / "metrics.jsonl").read_text().splitlines()]
    for r in out:
        r.pop("tokens_per_s", None)
    return out


# --- the loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
@pytest.mark.parametrize("train_head", [False, True])
def test_fused_cross_entropy_matches_plain(tmp_path, family, train_head):
    """Loss and gradients (w.r.t. hidden states and the head) equal full-logits CE."""
    model = load(tiny_model_folder(tmp_path, family)).model
    torch.manual_seed(0)
    h = torch.randn(37, model.config.hidden_size, requires_grad=True)
    y = torch.randint(0, model.config.vocab_size, (37,))
    model.lm_head.weight.requires_grad_(train_head)
    ref = F.cross_entropy(model.logits(h), y, reduction="sum")
    ref_grads = torch.autograd.grad(ref, [h] + ([model.lm_head.weight] if train_head else []))
    got = training_loss.linear_cross_entropy(model, h, y, chunk=8)  # 5 chunks, the last partial
    got_grads = torch.autograd.grad(got * 1.0, [h] + ([model.lm_head.weight] if train_head else []))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the eval path
        torch.testing.assert_close(training_loss.linear_cross_entropy(model, h, y, chunk=8), ref.detach())


def test_checkpointed_chunks_for_a_wrapped_head(tmp_path):
    """LoRA on lm_head takes the generic path: same loss and LoRA gradients as plain CE."""
    model = load(tiny_model_folder(tmp_path)).model
    lora.apply_lora(model, 4, 8, 0.0, ("lm_head",))
    with torch.no_grad():
        model.lm_head.lora_B.weight.normal_(0, 0.1)
    h = torch.randn(21, model.config.hidden_size)
    y = torch.randint(0, model.config.vocab_size, (21,))
    b = model.lm_head.lora_B.weight
    ref = F.cross_entropy(model.logits(h), y, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref, [b])
    got = training_loss.linear_cross_entropy(model, h, y, chunk=4)
    (g_got,) = torch.autograd.grad(got, [b])
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g_got, g_ref)


def test_batch_loss_ignores_padding_and_prompt(tmp_path):
    loaded = load(tiny_model_folder(tmp_path))
    tok, model = loaded.tokenizer, loaded.model
    rows = [
        {"prompt": "What is 2+2?", "completion": "4."},
        {"prompt": "Capital of France?", "completion": "Paris."},
    ]
    ex, _ = sft_data.build_examples(rows, tok, 64, responses_only=True)
    batch = sft_data.collate(ex, tok.pad_id)
    with torch.no_grad():
        total = training_loss.batch_loss_sum(model, batch)
        one_by_one = sum(training_loss.batch_loss_sum(model, sft_data.collate([e], tok.pad_id)) for e in ex)
        logits = model(batch["input_ids"][:1, : len(ex[0])])[0, :-1]
        labels = torch.tensor(ex[0].labels[1:])
        keep = labels != sft_data.IGNORE
        ref0 = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
    torch.testing.assert_close(total, one_by_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        training_loss.batch_loss_sum(model, sft_data.collate(ex[:1], 0)).detach(), ref0
    )


# --- config ----------------------------------------------------------------------------------


def test_recipes_and_precedence(tmp_path):
    art = train_config.make_config("qlora-guanaco")
    assert (art.method, art.quantization, art.lora_r, art.lora_alpha, art.lora_dropout) == (
        "qlora",
        "nf4",
        16,
        16,
        0.05,
    )
    assert (art.lr, art.warmup_steps, art.batch_size, art.max_steps, art.eval_every, art.save_every) == (
        2e-5, 30, 4, 300, 50, 50,
    )  # fmt: skip
    assert art.max_length == 512 and art.optimizer == "paged_adamw_8bit" and art.lr_scheduler == "linear"
    assert set(art.lora_targets) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    f = tmp_path / "c.yaml"
    f.write_text("recipe: lora\nlr: 0.001\nmax-steps: 7\nlora_targets: q_proj,v_proj\n")
    cfg = train_config.make_config(None, train_config.read_config_file(f), {"lr": 0.5})
    assert (cfg.recipe, cfg.method, cfg.lr, cfg.max_steps, cfg.lora_targets) == (
        "lora",
        "lora",
        0.5,
        7,
        ("q_proj", "v_proj"),
    )
    f.write_text("lr: 1\nbogus: 2\n")
    with pytest.raises(ConfigError, match="bogus"):
        train_config.read_config_file(f)
    with pytest.raises(ConfigError, match="recipe"):
        train_config.make_config("nope")
    with pytest.raises(ConfigError, match="batch_size"):
        train_config.make_config("lora", {"batch_size": 0})
    helps = help_texts(train_config.TrainConfig)
    assert set(helps) == set(train_config.FIELD_NAMES), set(train_config.FIELD_NAMES) - set(helps)


def test_default_recipe_and_its_alias():
    """The default recipe is qlora-guanaco; its former name qlora-article is accepted for it."""
    assert train_config.TrainConfig().recipe == "qlora-guanaco"
    assert train_config.make_config().recipe == "qlora-guanaco"
    assert train_config.make_config("qlora-article") == train_config.make_config("qlora-guanaco")
    assert train_config.make_config(None, {"recipe": "qlora-article", "lr": 0.1}).recipe == "qlora-guanaco"


def test_linear_schedule_matches_transformers():
    from transformers import get_linear_schedule_with_warmup

    cfg = train_config.make_config("qlora-guanaco", {"max_steps": 50, "warmup_steps": 7})
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, 7, 50)
    ref = []
    for _ in range(50):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [train_setup.lr_lambda(s, cfg) for s in range(50)] == pytest.approx(ref)


# --- runs ------------------------------------------------------------------------------------


def test_resume_is_bit_exact(tmp_path):
    """Interrupt at step 3 (a callback raising KeyboardInterrupt), resume: the same curve."""
    folder = tiny_model_folder(tmp_path)
    kw = dict(lora_dropout=0.1, eval_every=2)  # dropout: the RNG state must be restored too
    full = train(tiny_config(folder, tmp_path / "a", **kw), progress=False)
    assert not full.interrupted and full.step == 6

    def stop_at_3(event):
        if event["step"] == 3:
            raise KeyboardInterrupt

    cfg_b = tiny_config(folder, tmp_path / "b", **kw)
    part = train(cfg_b, callbacks=[stop_at_3], progress=False)
    assert part.interrupted and part.step == 3 and part.checkpoint.name == "step-000003"
    assert not (tmp_path / "b" / "adapter").exists()
    with pytest.raises(GemmakitError, match="--resume"):
        train(cfg_b, progress=False)
    rest = train(cfg_b, resume=True, progress=False)
    assert rest.step == 6 and not rest.interrupted
    assert records(tmp_path / "a") == records(tmp_path / "b")  # every loss, lr and eval loss, exactly
    _, wa = lora.read_adapter(tmp_path / "a" / "adapter")
    _, wb = lora.read_adapter(tmp_path / "b" / "adapter")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    losses = [r["eval_loss"] for r in records(tmp_path / "a") if "eval_loss" in r]
    assert [r["step"] for r in records(tmp_path / "a") if "eval_loss" in r] == [0, 2, 4, 6]
    assert losses[-1] < losses[0]
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["lr"] == 5e-3 and saved["effective"]["optimizer"] == "torch.optim.AdamW (fused)"
    assert len(checkpoints(tmp_path / "a")) == 2  # keep_checkpoints
    assert (tmp_path / "a" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_gradient_accumulation_and_checkpointing_keep_the_step(tmp_path):
    """batch 4 == 2 micro-batches of 2; recomputing activations changes nothing but memory."""
    folder = tiny_model_folder(tmp_path)
    kw = dict(lora_dropout=0.0, max_steps=3, eval_every=3, save_every=3)
    a = train(tiny_config(folder, tmp_path / "a", **kw), progress=False)
    b = train(tiny_config(folder, tmp_path / "b", batch_size=2, grad_accum=2, **kw), progress=False)
    c = train(tiny_config(folder, tmp_path / "c", gradient_checkpointing=True, **kw), progress=False)
    la = [r["loss"] for r in records(tmp_path / "a") if "loss" in r]
    lb = [r["loss"] for r in records(tmp_path / "b") if "loss" in r]
    lc = [r["loss"] for r in records(tmp_path / "c") if "loss" in r]
    assert la == pytest.approx(lb, rel=1e-5) and la == pytest.approx(lc, rel=1e-6)
    assert a.last_eval_loss == pytest.approx(b.last_eval_loss, rel=1e-5)
    assert a.last_eval_loss == pytest.approx(c.last_eval_loss, rel=1e-6)


def test_full_finetune_saves_a_loadable_model(tmp_path):
    folder = tiny_model_folder(tmp_path, "gemma")
    cfg = tiny_config(
        folder, tmp_path / "run", recipe="full", lr=1e-3, max_steps=3, eval_every=3, save_every=3
    )
    res = train(cfg, progress=False)
    assert res.last_eval_loss < res.first_eval_loss
    reloaded = load(tmp_path / "run" / "model")
    assert sorted(p.name for p in (tmp_path / "run" / "model").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    base = load(folder).model
    with torch.no_grad():
        assert not torch.allclose(reloaded.model(ids), base(ids))  # trained weights, not the base
    ev = train_setup.load_data(cfg, reloaded.tokenizer)[1]
    reloaded.model.eval()
    with torch.no_grad():
        batch = sft_data.collate(ev, 0)
        loss = float(training_loss.batch_loss_sum(reloaded.model, batch)) / sft_data.target_count(
            batch["labels"]
        )
    assert loss == pytest.approx(res.last_eval_loss, rel=1e-5)


def test_bfloat16_lora_keeps_float32_adapters_only(tmp_path):
    folder = tiny_model_folder(tmp_path)
    cfg = tiny_config(folder, tmp_path / "run", dtype="bfloat16", max_steps=2, eval_every=2, save_every=2)
    loaded = train_setup.load_for_training(cfg, "cpu", torch.bfloat16)
    res = train(cfg, loaded=loaded, progress=False)
    m = loaded.model
    dtypes = {(p.requires_grad, p.dtype) for p in m.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    assert res.notes["autocast"] is False and res.last_eval_loss < res.first_eval_loss


def test_default_model_eval_loss_goes_down(tmp_path):
    """A few LoRA steps on the bundled Gemma 3 270M lower the held-out loss of the shipped data."""
    # bfloat16 where the CPU multiplies it natively (AVX512-BF16/AMX); elsewhere torch emulates
    # bfloat16 matmuls (~5x slower than float32 on an AVX2 CPU: this test took 15 min there).
    dtype = "bfloat16" if torch.cpu._is_avx512_bf16_supported() else "float32"
    cfg = train_config.make_config("lora", {
        "data": SAMPLE, "output": str(tmp_path / "run"), "max_steps": 3, "eval_every": 3, "save_every": 3,
        "warmup_steps": 0, "lr": 1e-3, "dtype": dtype, "eval_max_rows": 8, "max_length": 48,
    })  # fmt: skip
    res = train(cfg, progress=False)
    assert res.last_eval_loss < res.first_eval_loss - 0.05, (res.first_eval_loss, res.last_eval_loss)


# --- data parallel ---------------------------------------------------------------------------

DDP_SCRIPT = """
import json, sys
from gemmakit.training.config import make_config
from gemmakit.training.trainer import train
cfg = make_config("lora", json.loads(sys.argv[1]))
train(cfg, progress=False)
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 19 s on an idle 2-core machine, 40 s on a loaded one
def test_two_processes_equal_one_with_double_batch(tmp_path):
    """torchrun, 2 CPU processes on gloo, batch 2 each == 1 process with batch 4."""
    folder = tiny_model_folder(tmp_path)
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT)
    common = dict(model=str(folder), data=SAMPLE, max_steps=4, eval_every=2, save_every=4, lr=5e-3,
                  warmup_steps=1, lora_dropout=0.0, max_length=96, eval_max_rows=16)  # fmt: skip
    # The scripts run from tmp_path: PYTHONPATH makes them import this checkout's gemmakit.
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    one = dict(common, output=str(tmp_path / "one"), batch_size=4)
    two = dict(common, output=str(tmp_path / "two"), batch_size=2)
    subprocess.run([sys.executable, str(script), json.dumps(one)], check=True, env=env, timeout=300)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(script), json.dumps(two)],
        check=True, env=env, timeout=300,
    )  # fmt: skip
    r1, r2 = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in r1] == [r["step"] for r in r2]
    for a, b in zip(r1, r2):
        key = "loss" if "loss" in a else "eval_loss"
        assert a[key] == pytest.approx(b[key], rel=1e-5)
        if key == "loss":
            assert a["tokens"] == b["tokens"] and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    saved = json.loads((tmp_path / "two" / "config.json").read_text())
    assert saved["effective"]["world_size"] == 2


def test_qlora_recipe_trains_on_an_nf4_base(tmp_path):
    pytest.importorskip("gemmakit.quant")
    folder = tiny_model_folder(tmp_path)
    cfg = tiny_config(folder, tmp_path / "run", recipe="qlora-guanaco", lr=5e-3, warmup_steps=1, max_steps=3,
                      eval_every=3, save_every=3)  # fmt: skip
    loaded = load(folder)
    res = train(cfg, loaded=loaded, progress=False)
    assert res.notes["quantization_used"] == "nf4" and "AdamW" in res.optimizer
    q = loaded.model.model.layers[0].self_attn.q_proj
    assert type(q.base).__name__ == "NF4Linear" and q.lora_A.weight.requires_grad
    assert res.last_eval_loss < res.first_eval_loss
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_bfloat16_fused_cross_entropy_matches_plain(tmp_path, monkeypatch):
    """bfloat16 on the CPU goes through the C softmax kernel: same loss and dL/dh as plain CE
    on the same bfloat16 logits."""
    from gemmakit.kernels import cpu as cpu_kernels

    if cpu_kernels.library() is None:
        pytest.skip("no C compiler")
    calls = []
    real = cpu_kernels.softmax_xent_
    monkeypatch.setattr(cpu_kernels, "softmax_xent_", lambda z, y: calls.append(1) or real(z, y))
    model = load(tiny_model_folder(tmp_path), dtype=torch.bfloat16).model
    model.lm_head.weight.requires_grad_(False)  # frozen, as under LoRA
    torch.manual_seed(0)
    h = torch.randn(37, model.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, model.config.vocab_size, (37,))
    ref = F.cross_entropy(model.logits(h).float(), y, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, [h])
    got = training_loss.linear_cross_entropy(model, h, y, chunk=8)
    (got_grad,) = torch.autograd.grad(got * 1.0, [h])
    assert len(calls) == 5  # 37 rows in chunks of 8
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(
        got_grad.float(), ref_grad.float(), atol=2e-2 * float(ref_grad.abs().max()), rtol=2e-2
    )

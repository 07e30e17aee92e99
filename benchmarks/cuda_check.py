"""The CUDA paths, checked and timed against transformers (+ peft + bitsandbytes) in one run.

    python benchmarks/cuda_check.py --tokenizer DIR [--json out.json] [--tiny] [--device cuda]

No model hub is reachable where this runs, so both systems get the same *random* weights in
Gemma 3 shapes (the 270M's, or a 1B-shaped model for the training row), with the real Gemma
3 tokenizer taken from DIR (a folder holding tokenizer.model). Random weights change nothing
about speed, memory or agreement between the two implementations. Sections:

1. parity: logits of one 256-token prompt, gemmakit vs transformers, float32 and bfloat16
   (each bfloat16 compared with the float32 reference), and 32 greedy tokens in float32.
2. nf4: `load(..., quantize="nf4")` on the GPU against transformers' BitsAndBytesConfig(nf4,
   double quantization): packed weights and quantization statistics byte for byte, logits.
3. inference: one 512-token prompt, 128 greedy tokens, bfloat16 and nf4 (batch 1).
4. training: LoRA r=16 on the seven projections, batch 4 x 512 tokens of the shipped guanaco
   sample, bfloat16 + AdamW, and QLoRA (nf4 base) + bitsandbytes' paged 8-bit AdamW, against
   transformers + peft (+ bitsandbytes) with the same data; median step time after warm-up and
   peak CUDA memory (torch.cuda.max_memory_allocated) per system.
5. the CLI: `gemmakit finetune` with the default recipe (QLoRA, paged 8-bit AdamW) for a few
   steps, `--resume` for a few more, then `gemmakit generate --adapter`.
`--tiny` shrinks every model to a few layers so the script can be checked on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS: dict = {}
JSON_PATH: str | None = None


def log(*parts):
    print(*parts, flush=True)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_config(name: str, tiny: bool):
    from gemmakit.config import preset

    cfg = preset(name)
    if tiny:
        cfg = cfg.replace(
            num_hidden_layers=2,
            layer_types=cfg.layer_types[4:6],
            hidden_size=64,
            intermediate_size=128,
            head_dim=32,
            query_pre_attn_scalar=32,
        )
    return cfg


def random_hf_model(cfg, device: str, dtype: torch.dtype, seed: int = 0):
    """transformers' model of `cfg` with random weights; norms random too (so 1 + w matters)."""
    import transformers

    from gemmakit.hf_config import to_hf_config

    hf_cfg = transformers.Gemma3TextConfig(
        **{k: v for k, v in to_hf_config(cfg).items() if k != "architectures"}
    )
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.Gemma3ForCausalLM(hf_cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.1 if "norm" in name else 0.03)
    return model


def nf4_config():
    """transformers' QLoRA quantization: NF4 with double quantization, bfloat16 compute."""
    import transformers

    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip


def write_folder(hf_model, tokenizer_dir: Path, folder: Path):
    hf_model.save_pretrained(folder)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        if (tokenizer_dir / name).exists():
            shutil.copyfile(tokenizer_dir / name, folder / name)


def prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(1000, 200000, (n - 1,), generator=g).tolist()


# --- 1. parity --------------------------------------------------------------------------------


def parity(folder: Path, device: str):
    import transformers

    from gemmakit.loading import load

    ids = torch.tensor([prompt(256)], device=device)
    out = {}
    ref = None
    for dtype in (torch.float32, torch.bfloat16):
        ours = load(folder, dtype=dtype, device=device).model
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation="sdpa"
        )
        hf = hf.to(device).eval()
        with torch.inference_mode():
            a = ours(ids).float()
            b = hf(ids).logits.float()
        name = str(dtype).removeprefix("torch.")
        if ref is None:
            ref = b
            out[name] = {"max_abs_diff_vs_transformers": float((a - b).abs().max()),
                         "logit_scale": float(b.abs().max())}  # fmt: skip
            greedy = []
            with torch.inference_mode():
                for model in (ours, hf):
                    seq = ids[:, :64]
                    for _ in range(32):
                        logits = model(seq) if model is ours else model(seq).logits
                        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], 1)
                    greedy.append(seq[0, 64:].tolist())
            out[name]["greedy_32_identical"] = greedy[0] == greedy[1]
        else:
            out[name] = {"ours_max_abs_diff_vs_fp32": float((a - ref).abs().max()),
                         "transformers_max_abs_diff_vs_fp32": float((b - ref).abs().max()),
                         "top1_agreement_ours_vs_fp32": float((a.argmax(-1) == ref.argmax(-1)).float().mean()),
                         "top1_agreement_transformers_vs_fp32": float((b.argmax(-1) == ref.argmax(-1)).float().mean())}  # fmt: skip
        del ours, hf
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


# --- 2. nf4 -----------------------------------------------------------------------------------


def nf4(folder: Path, device: str):
    import transformers

    from gemmakit.loading import load

    ours = load(folder, dtype=torch.bfloat16, device=device, quantize="nf4").model
    bnb_cfg = nf4_config()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, quantization_config=bnb_cfg, device_map={"": device}
    ).eval()
    mine = ours.model.layers[0].self_attn.q_proj
    theirs = hf.model.layers[0].self_attn.q_proj.weight
    state = theirs.quant_state
    same = {
        "packed": torch.equal(mine.weight.view(-1), theirs.data.view(-1)),
        "absmax_codes": torch.equal(mine.weight_absmax, state.absmax),
        "nested_absmax": torch.equal(mine.weight_nested_absmax, state.state2.absmax),
        "offset": torch.equal(mine.weight_offset.view(-1), state.offset.view(-1).float()),
    }
    ids = torch.tensor([prompt(256)], device=device)
    with torch.inference_mode():
        a = ours(ids).float()
        b = hf(ids).logits.float()
    return {"q_proj_layer0_identical": same, "max_abs_diff_logits": float((a - b).abs().max()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "logit_scale": float(b.abs().max())}  # fmt: skip


# --- 3. inference -----------------------------------------------------------------------------


def time_ours(model, ids, new, device):
    from gemmakit.inference.engine import Request, generate_steps
    from gemmakit.inference.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    with torch.inference_mode():
        steps = generate_steps(model, [Request(ids, params, ())])
        sync(device)
        t0 = time.perf_counter()
        next(steps)
        sync(device)
        t1 = time.perf_counter()
        for _ in steps:
            pass
        sync(device)
        t2 = time.perf_counter()
    return t0, t1, t2


def time_hf(model, ids, new, device):
    x = torch.tensor([ids], device=device)
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        out = model(x, use_cache=True)
        token, past = out.logits[:, -1:].argmax(-1), out.past_key_values
        sync(device)
        t1 = time.perf_counter()
        for _ in range(new - 1):
            out = model(token, past_key_values=past, use_cache=True)
            token, past = out.logits[:, -1:].argmax(-1), out.past_key_values
        sync(device)
        t2 = time.perf_counter()
    return t0, t1, t2


def inference(folder: Path, device: str, runs: int = 3):
    import transformers

    from gemmakit.loading import load

    ids, new = prompt(512), 128
    bnb_cfg = nf4_config()
    rows = {}
    for label, quant in (("bfloat16", None), ("nf4", "nf4")):
        ours = load(folder, dtype=torch.bfloat16, device=device, quantize=quant).model
        extra = {"quantization_config": bnb_cfg, "device_map": {"": device}} if quant else {}
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **extra)
        hf = hf.to(device).eval() if not quant else hf.eval()
        for name, model, fn in (("gemmakit", ours, time_ours), ("transformers", hf, time_hf)):
            fn(model, ids[:64], 8, device)  # warm-up
            prefill, decode = [], []
            for _ in range(runs):
                t0, t1, t2 = fn(model, ids, new, device)
                prefill.append(len(ids) / (t1 - t0))
                decode.append((new - 1) / (t2 - t1))
            rows[f"{name} {label}"] = {"prefill_tok_s": statistics.median(prefill),
                                       "decode_tok_s": statistics.median(decode)}  # fmt: skip
        del ours, hf
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


# --- 4. training ------------------------------------------------------------------------------


def train_batches(tokenizer, steps: int, batch: int, length: int, device: str):
    from gemmakit.training import data

    ids = []
    for ex in data.build_examples(data.read_rows(data.shipped_dataset()), tokenizer, 512)[0]:
        ids += ex.input_ids
    need = steps * batch * length
    ids = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor(ids, device=device).view(steps, batch, length)


def train_case(system: str, hf_model_fn, cfg, quant: str | None, tokenizer, device, steps, batch, length):
    """One system's LoRA/QLoRA steps on a fresh model: step times, first loss, peak memory."""
    import bitsandbytes as bnb

    from gemmakit import lora
    from gemmakit.formats import safetensors as checkpoint
    from gemmakit.model.gemma import Gemma
    from gemmakit.training import config as train_config
    from gemmakit.training import loss as training_loss
    from gemmakit.training import setup as train_setup

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    hf = hf_model_fn()
    if system == "gemmakit":
        with torch.device("meta"):
            model = Gemma(cfg)
        state = checkpoint.hf_to_native(hf.state_dict(), cfg)
        checkpoint.load_into(model, {k: v.to(device) for k, v in state.items()}, "random")
        del hf, state
        if quant:
            from gemmakit.quant import quantize_model

            quantize_model(model, quant)
        lora.apply_lora(model, 16, 16, 0.05, TARGETS)
        params = [p for p in model.parameters() if p.requires_grad]
        tcfg = train_config.make_config("qlora-guanaco" if quant else "lora", {"lr": 1e-4})
        opt, opt_name = train_setup.make_optimizer(params, tcfg, device)

        def step(ids):
            b = {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "labels": ids}
            s = training_loss.batch_loss_sum(model, b)
            loss = s / (ids.shape[0] * (ids.shape[1] - 1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        import peft
        import transformers

        if quant:  # through a folder, as users load a 4-bit model
            folder = Path(tempfile.mkdtemp())
            hf.save_pretrained(folder)
            del hf
            bnb_cfg = nf4_config()
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.bfloat16, quantization_config=bnb_cfg, device_map={"": device},
                attn_implementation="sdpa",
            )  # fmt: skip
            shutil.rmtree(folder)
        else:
            hf.config._attn_implementation = "sdpa"
        peft_cfg = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS,
                                   task_type="CAUSAL_LM")  # fmt: skip
        model = peft.get_peft_model(hf, peft_cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        if quant:
            opt, opt_name = bnb.optim.PagedAdamW8bit(params, lr=1e-4), "bitsandbytes PagedAdamW8bit"
        else:
            opt, opt_name = torch.optim.AdamW(params, lr=1e-4), "torch.optim.AdamW"

        def step(ids):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

    model.train()
    data = train_batches(tokenizer, steps + 2, batch, length, device)
    times, losses = [], []
    for ids in data:
        sync(device)
        t = time.perf_counter()
        losses.append(float(step(ids)))
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    s = statistics.median(times[2:])
    return {"optimizer": opt_name, "s_per_step": s, "tokens_per_s": batch * length / s, "first_loss": losses[0],
            "last_loss": losses[-1], "peak_gib": peak}  # fmt: skip


def training_rows(size: str, tokenizer, device, tiny, steps, batch, length):
    cfg = model_config(size, tiny)
    rows = {}
    for quant in (None, "nf4"):
        label = "qlora nf4 + paged 8-bit AdamW" if quant else "lora bf16 + AdamW"
        for system in ("transformers+peft", "gemmakit"):
            rows[f"{size} {label} {system}"] = train_case(
                system, lambda: random_hf_model(cfg, device, torch.bfloat16, seed=1), cfg, quant,
                tokenizer, device, steps, batch, length,
            )  # fmt: skip
            log(f"  {size} {label} {system}: {rows[f'{size} {label} {system}']}")
    return rows


# --- 5. the CLI -------------------------------------------------------------------------------


def cli(folder: Path, device: str, work: Path):
    from gemmakit.training import data

    run = work / "run"
    base = [sys.executable, "-m", "gemmakit.cli"]
    common = ["finetune", "--model", str(folder), "--data", str(data.shipped_dataset()), "--output", str(run),
              "--max-length", "256", "--eval-every", "5", "--save-every", "5"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = {}
    for name, extra in (("first", ["--max-steps", "5"]), ("resumed", ["--max-steps", "10", "--resume"])):
        t = time.perf_counter()
        p = subprocess.run(base + common + extra, capture_output=True, text=True, env=env, check=False)
        out[name] = {"rc": p.returncode, "seconds": round(time.perf_counter() - t, 1),
                     "log_tail": (p.stdout + p.stderr)[-1500:]}  # fmt: skip
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out["metrics"] = metrics
    out["adapter_files"] = (
        sorted(p.name for p in (run / "adapter").iterdir()) if (run / "adapter").exists() else []
    )
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    out["config_device_optimizer"] = [cfg.get("device"), cfg.get("optimizer")]
    p = subprocess.run(
        base + ["generate", "--model", str(folder), "--adapter", str(run / "adapter"), "--max-new-tokens", "8",
                "--greedy", "### Human: Hello### Assistant:"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    out["generate"] = {"rc": p.returncode, "output_tail": (p.stdout + p.stderr)[-800:]}
    return out


def section(name, fn, *args):
    log(f"== {name}")
    t = time.perf_counter()
    try:
        RESULTS[name] = fn(*args)
    except Exception:
        RESULTS[name] = {"error": traceback.format_exc()[-3000:]}
    RESULTS[name + "_seconds"] = round(time.perf_counter() - t, 1)
    log(json.dumps(RESULTS[name], indent=1, default=str)[:4000])
    if JSON_PATH:  # after every section, so a run stopped midway keeps what it measured
        Path(JSON_PATH).write_text(json.dumps(RESULTS, indent=2, default=str))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="folder with the Gemma 3 tokenizer.model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--tiny", action="store_true", help="tiny models (to check the script on a CPU)")
    ap.add_argument("--sections", default="parity,nf4,inference,training,cli")
    ap.add_argument("--train-steps", type=int, default=10)
    args = ap.parse_args()
    device, wanted = args.device, args.sections.split(",")
    global JSON_PATH
    JSON_PATH = args.json
    RESULTS["env"] = {"torch": torch.__version__, "device": device,
                      "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None}  # fmt: skip
    try:
        import bitsandbytes
        import peft
        import transformers

        RESULTS["env"].update(transformers=transformers.__version__, peft=peft.__version__,
                              bitsandbytes=bitsandbytes.__version__)  # fmt: skip
    except ImportError as e:
        RESULTS["env"]["missing"] = str(e)
    log(RESULTS["env"])
    from gemmakit.formats.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(Path(args.tokenizer))
    work = Path(tempfile.mkdtemp(prefix="gemmakit-cuda-"))
    folder = work / "gemma-3-270m-random"
    cfg = model_config("gemma-3-270m", args.tiny)
    write_folder(random_hf_model(cfg, device, torch.float32).cpu(), Path(args.tokenizer), folder)
    batch, length = (4, 512) if not args.tiny else (2, 32)
    if "parity" in wanted:
        section("parity", parity, folder, device)
    if "nf4" in wanted:
        section("nf4", nf4, folder, device)
    if "inference" in wanted:
        section("inference", inference, folder, device)
    if "training" in wanted:
        steps = args.train_steps
        section(
            "training_270m", training_rows, "gemma-3-270m", tokenizer, device, args.tiny, steps, batch, length
        )
        section(
            "training_1b", training_rows, "gemma-3-1b", tokenizer, device, args.tiny, steps, batch, length
        )
    if "cli" in wanted:
        section("cli", cli, folder, device, work)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

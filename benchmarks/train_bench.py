"""Training throughput and peak memory: gemmakit vs transformers + peft, same data and settings.

    python benchmarks/train_bench.py [--steps 4] [--json out.json]

Each case runs in a fresh subprocess (so peak RSS is that case's alone): load the bundled
Gemma 3 270M, LoRA r=16 / alpha=16 / dropout 0.05 on all seven projections, AdamW lr 1e-4
(torch's fused kernel for both systems),
batch 4 x 128 tokens of the shipped guanaco sample (packed, loss on every token), no
gradient checkpointing, float32 and bfloat16. transformers loads the same weights: our
dequantized GGUF written once as an HF folder (config.json + model.safetensors).
Two phases:
1. memory: one fresh subprocess per (system, dtype) case, as a user runs it (transformers
   with glibc's default allocator settings, gemmakit pinning the mmap threshold as its
   trainer does): its peak RSS (load included) and the median of 3 steps after a warm-up.
2. speed: one subprocess per dtype holding both systems, alternating their steps, so both
   see the same machine load (the machine is shared; back-to-back runs drift by 2x). Both
   run under gemmakit's allocator setting there (one process has one malloc).
Reported: median seconds per optimizer step after one warm-up step, training tokens/s
(= 512 / step time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BATCH, LENGTH = 4, 128
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(tokenizer, steps: int):
    """steps+1 batches of 4 x 128 token ids, cut from the shipped rows laid end to end."""
    import torch

    from gemmakit.training import data

    ids = []
    for ex in data.build_examples(data.read_rows(data.shipped_dataset()), tokenizer, 512)[0]:
        ids += ex.input_ids
    need = (steps + 1) * BATCH * LENGTH
    ids = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor(ids).view(steps + 1, BATCH, LENGTH)


def hf_folder() -> Path:
    """Our dequantized bundled model as an HF folder, written once."""
    from gemmakit.paths import cache_dir

    folder = cache_dir() / "bench-hf-gemma-3-270m"
    if (folder / "model.safetensors").exists():
        return folder
    from gemmakit.formats.hf_folder import save_hf_folder
    from gemmakit.loading import load

    loaded = load(dtype="float32", device="cpu")
    save_hf_folder(loaded.model, loaded.tokenizer, folder)
    return folder


def run_ours(dtype_name: str, steps: int) -> dict:
    import torch

    from gemmakit import lora
    from gemmakit.training import config as train_config
    from gemmakit.training import loss as training_loss
    from gemmakit.training import setup as train_setup

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    cfg = train_config.make_config("lora", {"dtype": dtype_name})
    train_setup.limit_heap_fragmentation()  # as training.trainer.train does
    t0 = time.perf_counter()
    loaded = train_setup.load_for_training(cfg, "cpu", dtype)
    load_s = time.perf_counter() - t0
    model = loaded.model
    lora.apply_lora(model, 16, 16, 0.05, TARGETS)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    data = batches(loaded.tokenizer, steps)
    times, losses = [], []
    for ids in data:
        t = time.perf_counter()
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "labels": ids}
        s = training_loss.batch_loss_sum(model, batch)
        n = BATCH * (LENGTH - 1)
        (s / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(s) / n)
    return {"load_s": load_s, "times": times, "losses": losses}


def run_hf(dtype_name: str, steps: int) -> dict:
    import peft
    import torch
    import transformers

    from gemmakit.loading import load_tokenizer, resolve

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder(), dtype=dtype)
    load_s = time.perf_counter() - t0
    cfg = peft.LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(model, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    data = batches(load_tokenizer(resolve(None)), steps)
    times, losses = [], []
    for ids in data:
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(out.loss))
    return {"load_s": load_s, "times": times, "losses": losses}


def interleaved(dtype_name: str, steps: int) -> dict:
    """Both systems in one process, one step of each in turn."""
    import peft
    import torch
    import transformers

    from gemmakit import lora
    from gemmakit.training import config as train_config
    from gemmakit.training import loss as training_loss
    from gemmakit.training import setup as train_setup

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    train_setup.limit_heap_fragmentation()
    loaded = train_setup.load_for_training(train_config.make_config("lora", {}), "cpu", dtype)
    ours = loaded.model
    lora.apply_lora(ours, 16, 16, 0.05, TARGETS)
    ours.train()
    o_opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4, fused=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder(), dtype=dtype)
    cfg = peft.LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    hf = peft.get_peft_model(hf, cfg)
    hf.train()
    h_opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step_ours(ids):
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "labels": ids}
        (training_loss.batch_loss_sum(ours, batch) / (BATCH * (LENGTH - 1))).backward()
        o_opt.step()
        o_opt.zero_grad(set_to_none=True)

    def step_hf(ids):
        hf(input_ids=ids, labels=ids).loss.backward()
        h_opt.step()
        h_opt.zero_grad(set_to_none=True)

    times = {"transformers+peft": [], "gemmakit": []}
    for ids in batches(loaded.tokenizer, steps):
        for name, fn in (("transformers+peft", step_hf), ("gemmakit", step_ours)):
            t = time.perf_counter()
            fn(ids)
            times[name].append(time.perf_counter() - t)
    return times


def child(system: str, dtype: str, steps: int):
    if system == "both":
        print("RESULT " + json.dumps(interleaved(dtype, steps)))
        return
    result = (run_ours if system == "gemmakit" else run_hf)(dtype, steps)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="measured speed steps per system (after 1 warm-up)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch's default)")
    ap.add_argument("--child", nargs=2, metavar=("SYSTEM", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        return child(*args.child, args.steps)
    hf_folder()
    threads = "default" if not args.threads else str(args.threads)

    def spawn(system, dtype, steps):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", system, dtype, "--steps", str(steps), "--threads", str(args.threads)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{system} {dtype} failed:\n{proc.stderr[-3000:]}")
        return json.loads(line[7:])

    rows = []
    for dtype in ("float32", "bfloat16"):
        for system in ("transformers+peft", "gemmakit"):
            load1 = os.getloadavg()[0]
            r = spawn(system, dtype, 3)
            rows.append({
                "system": system, "dtype": dtype, "peak_rss_gb": r["peak_rss_bytes"] / 1e9, "load_s": r["load_s"],
                "alone_s_per_step": statistics.median(r["times"][1:]), "first_loss": r["losses"][0],
                "loadavg": load1,
            })  # fmt: skip
            print(f"memory: {system} {dtype}: {rows[-1]['peak_rss_gb']:.2f} GB", file=sys.stderr, flush=True)
        load1 = os.getloadavg()[0]
        times = spawn("both", dtype, args.steps)
        for r in rows:
            if r["dtype"] == dtype:
                r["s_per_step"] = statistics.median(times[r["system"]][1:])
                r["tokens_per_s"] = BATCH * LENGTH / r["s_per_step"]
                r["steps"] = [round(t, 2) for t in times[r["system"]]]
                r["speed_loadavg"] = load1
        print(f"speed: {dtype} done", file=sys.stderr, flush=True)
    print(f"\nLoRA r=16 (7 projections), AdamW, batch {BATCH} x {LENGTH}, no gradient checkpointing; "
          f"{os.cpu_count()} CPUs, torch threads = {threads}. Speed: {args.steps} measured steps per system, "
          "alternating in one process, median; 'own process': median of 3 steps in each case's fresh process. "
          "Memory: peak RSS of a fresh process per case.\n")  # fmt: skip
    print(
        "| system | dtype | s/step | train tokens/s | s/step, own process | peak RSS | first loss "
        "| load avg (memory / speed run) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['dtype']} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['alone_s_per_step']:.2f} | {r['peak_rss_gb']:.2f} GB | {r['first_loss']:.4f} | "
              f"{r['loadavg']:.1f} / {r['speed_loadavg']:.1f} |")  # fmt: skip
    for d in ("float32", "bfloat16"):
        hf = next(r for r in rows if r["dtype"] == d and r["system"] != "gemmakit")
        us = next(r for r in rows if r["dtype"] == d and r["system"] == "gemmakit")
        print(f"{d}: gemmakit {us['tokens_per_s'] / hf['tokens_per_s']:.2f}x the tokens/s "
              f"({hf['alone_s_per_step'] / us['alone_s_per_step']:.2f}x each in its own process), "
              f"{us['peak_rss_gb'] / hf['peak_rss_gb']:.2f}x the peak memory")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

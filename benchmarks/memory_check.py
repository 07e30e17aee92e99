"""Predicted vs measured peak memory (RSS) of gemmakit on the bundled Gemma 3 270M GGUF.

Each case runs in a fresh subprocess, so its peak resident set (`resource.getrusage`
ru_maxrss) is its own. The child first imports torch and gemmakit and runs a few tiny ops so
the kernels' code is paged in; that resident set is the *runtime baseline*, measured, not
guessed. It then resets the peak (`/proc/self/clear_refs` = 5, Linux) and records the peak of
each phase separately: loading the model, then the workload. Between the two it calls glibc's
malloc_trim once, so the heap the loader freed (reported) does not count as workload memory.

The prediction adds to the measured baseline what `gemmakit.planning` says sits in memory:
    load      the GGUF loader's own footprint (below): the parsed header, the mapped file,
              every tensor in the target dtype, and one chunk being dequantized;
    forward   weights in the target dtype + the forward's activations
              (`activations.inference_activation_bytes`, logits over the 262k vocabulary
              included);
    step      one LoRA training step (r=16, alpha 16, dropout 0.05 on the seven
              projections, AdamW, batch 2 x --tokens, gemmakit's chunked cross-entropy):
              `training_memory.training_memory`'s total, i.e. weights + fp32 adapters, their
              gradients, AdamW's two states, the activations autograd keeps and one chunk
              of logits.
The whole-process peak is the larger of the two; the table prints both phases and the ratio
measured / predicted (target: within 15%).

A case is a small function (`@case`) that runs in the child and returns the peaks it measured,
plus a function that predicts them; write the pair and register it.

Usage:
    python benchmarks/memory_check.py [--tokens 128] [--case NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MB = 10**6


# --- Measuring, in the child process ------------------------------------------------------------


def peak_rss() -> int:
    """Peak resident set of this process since start or the last reset, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Sets the peak to the current resident set (Linux: clear_refs 5 resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def warm_runtime() -> None:
    """Pages in the code the loader and a forward use, with tensors too small to matter.

    Building a module on the meta device (as load_model does) makes torch import its meta
    and decomposition registries, ~75 MB of Python objects paid once per process: runtime,
    not model memory.
    """
    import torch
    import torch.nn.functional as F

    with torch.device("meta"):
        torch.nn.Embedding(8, 8)
        torch.nn.Linear(8, 8)

    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(1, 4, 8, 16, dtype=dtype)
            mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
            F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], attn_mask=mask, enable_gqa=True)
            w = torch.randn(32, 16, dtype=dtype)
            F.gelu(F.linear(x, w), approximate="tanh").float().pow(2).mean(-1).rsqrt()
            torch.nn.functional.embedding(torch.tensor([[1, 2]]), w)


def warm_training() -> None:
    """Pages in autograd's backward kernels, dropout and AdamW with a tiny training step."""
    import torch
    import torch.nn.functional as F

    w = torch.nn.Parameter(torch.randn(16, 16))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, 4, 8, 16, dtype=dtype, requires_grad=True)
        mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
        h = F.rms_norm(x.float(), (16,), torch.ones(16), 1e-6).to(dtype)
        h = F.scaled_dot_product_attention(h, h[:, :1], h[:, :1], attn_mask=mask, enable_gqa=True)
        h = F.linear(F.dropout(h, 0.05, training=True), w.to(dtype))
        torch.log_softmax(F.gelu(h, approximate="tanh") * h, -1, dtype=torch.float32).sum().backward()
    opt = torch.optim.AdamW([w], lr=1e-4)
    opt.step()
    opt.zero_grad(set_to_none=True)


def release_freed_heap() -> None:
    """Returns heap that glibc keeps after frees to the OS (malloc_trim), where there is glibc.

    The GGUF loader frees hundreds of MB of float32 temporaries in blocks small enough to be
    carved out of the heap; glibc keeps those pages resident for reuse. Trimming once after
    loading makes the forward's RSS show live memory; the amount trimmed is reported.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except AttributeError:  # not glibc
            pass


# --- Cases ---------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    # Runs in the child: returns {"baseline": B, "load": peak, "forward": peak, ...} in bytes.
    measure: Callable[[argparse.Namespace], dict]
    # Runs in the parent: {phase: (predicted bytes, what it is made of)} from the baseline.
    predict: Callable[[argparse.Namespace, dict], dict]


CASES: dict[str, Case] = {}


def case(name: str, predict: Callable[[argparse.Namespace, dict], dict]):
    def register(fn):
        CASES[name] = Case(name, fn, predict)
        return fn

    return register


def default_arch():
    from gemmakit.formats.gguf import GGUFFile
    from gemmakit.loading import resolve
    from gemmakit.planning.architecture import from_gguf

    g = GGUFFile(resolve(None).path)
    return from_gguf(g), g


def predict_gguf_load(g, dtype: str) -> tuple[int, str]:
    """Peak of gemmakit.loading.load_model on a GGUF file, above the baseline.

    The loader parses the header (the vocabulary becomes Python strings), maps the file (each
    tensor's pages become resident as it is read) and dequantizes tensor by tensor,
    `gguf.CHUNK_VALUES` at a time, straight into the target dtype (`GGUFFile.tensor`). While
    a chunk is decoded the gguf package's dequantizer holds two float32 copies of it (its
    block-by-block values and their concatenation; measured with tracemalloc: 2.0-2.2x for
    Q8_0, Q5_0, Q4_K and Q6_K), beside the chunk's raw bytes; F32 and F16 chunks are
    widened once. The peak comes at the last tensor: everything mapped and held.
    """
    import sys

    from gemmakit.formats.gguf import CHUNK_VALUES

    header = g.data_offset
    for v in g.metadata.values():
        if isinstance(v, list):
            header += sys.getsizeof(v) + sum(sys.getsizeof(x) for x in v)
        else:
            header += getattr(v, "nbytes", None) or sys.getsizeof(v)
    size = {"fp32": 4, "bf16": 2}[dtype]
    mapped = held = peak = 0
    for t in g.tensors.values():
        n = 1
        for d in t.shape:
            n *= d
        chunk = min(n, max(1, CHUNK_VALUES // t.shape[-1]) * t.shape[-1]) if t.shape else n
        raw = t.nbytes * chunk // n
        transient = 4 * chunk if t.ggml_type.name in ("F32", "F16") else 2 * 4 * chunk + raw
        mapped += t.nbytes
        held += size * n
        peak = max(peak, header + mapped + held + transient)
    parts = f"header {header / MB:.0f} + file {mapped / MB:.0f} + {dtype} state {held / MB:.0f} + chunk"
    return peak, parts


def predict_inference(dtype: str):
    def predict(args, measured):
        from gemmakit.planning.activations import inference_activation_bytes
        from gemmakit.planning.weights import weight_bytes

        arch, g = default_arch()
        base = measured["baseline"]
        load, load_parts = predict_gguf_load(g, dtype)
        weights = weight_bytes(arch, dtype)
        act = inference_activation_bytes(arch, 1, args.tokens, dtype)
        return {
            "load": (base + load, load_parts),
            "forward": (base + weights + act, f"weights {weights / MB:.0f} + activations {act / MB:.0f}"),
        }

    return predict


def measure_inference(dtype: str):
    def measure(args) -> dict:
        import torch

        import gemmakit.formats.gguf  # noqa: F401  (the loader imports it: part of the runtime)
        from gemmakit.loading import load_model, resolve

        source = resolve(None)  # assembles the bundled GGUF once, before anything is measured
        warm_runtime()
        baseline = current_rss()
        reset_peak()
        model = load_model(source, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        load_peak = peak_rss()
        after_load = current_rss()
        release_freed_heap()
        trimmed = after_load - current_rss()
        reset_peak()
        ids = torch.randint(
            3, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0)
        )
        with torch.no_grad():
            logits = model(ids)
        assert logits.shape == (1, args.tokens, model.config.vocab_size)
        return {"baseline": baseline, "load": load_peak, "trimmed": trimmed, "forward": peak_rss()}

    return measure


for _dtype in ("fp32", "bf16"):
    case(f"{_dtype} inference", predict_inference(_dtype))(measure_inference(_dtype))


# One LoRA training step: the settings of `gemmakit finetune --recipe lora` (r=16, alpha 16,
# dropout 0.05 on the seven projections, AdamW), on a small batch.
LORA_BATCH, LORA_RANK, LORA_DROPOUT = 2, 16, 0.05


def predict_lora_step(dtype: str):
    def predict(args, measured):
        import torch

        from gemmakit.planning.training_memory import training_memory
        from gemmakit.training.loss import default_chunk

        arch, g = default_arch()
        base = measured["baseline"]
        load, load_parts = predict_gguf_load(g, dtype)
        t = training_memory(
            arch, "lora", LORA_BATCH, args.tokens, dtype, LORA_RANK, LORA_DROPOUT,
            ce_chunk=default_chunk(arch.vocab_size, torch.bfloat16 if dtype == "bf16" else torch.float32),
            cpu_kernels=True,  # the trainer measured here is gemmakit's own, on the CPU
        )  # fmt: skip
        items = ("weights", "gradients", "optimizer_states", "activations", "logits_chunked")
        names = ("weights", "grads", "AdamW", "activations", "CE chunk")
        step = sum(t[k] for k in items)
        parts = " + ".join(f"{n} {t[k] / MB:.0f}" for n, k in zip(names, items))
        return {"load": (base + load, load_parts), "step": (base + step, parts)}

    return predict


def measure_lora_step(dtype: str):
    def measure(args) -> dict:
        import torch

        import gemmakit.formats.gguf  # noqa: F401  (the loader imports it: part of the runtime)
        from gemmakit import lora
        from gemmakit.loading import load_model, resolve
        from gemmakit.training import loss as training_loss
        from gemmakit.training import setup as train_setup

        source = resolve(None)
        train_setup.limit_heap_fragmentation()  # as training.trainer.train does
        warm_runtime()
        warm_training()
        baseline = current_rss()
        reset_peak()
        # The GGUF path, which training.setup.load_for_training takes for a bfloat16 run.
        model = load_model(source, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        load_peak = peak_rss()
        after_load = current_rss()
        release_freed_heap()
        trimmed = after_load - current_rss()
        reset_peak()
        lora.apply_lora(model, LORA_RANK, LORA_RANK, LORA_DROPOUT)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        ids = torch.randint(
            3, model.config.vocab_size, (LORA_BATCH, args.tokens), generator=torch.Generator().manual_seed(0)
        )
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "labels": ids}
        loss = training_loss.batch_loss_sum(model, batch) / (LORA_BATCH * (args.tokens - 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.isfinite(loss)
        return {"baseline": baseline, "load": load_peak, "trimmed": trimmed, "step": peak_rss()}

    return measure


for _dtype in ("fp32", "bf16"):
    case(f"{_dtype} LoRA step", predict_lora_step(_dtype))(measure_lora_step(_dtype))


# --- Driver --------------------------------------------------------------------------------------


def run_child(name: str, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--tokens", str(tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"case {name!r} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=128, help="tokens in the forward pass (default 128)")
    p.add_argument("--case", action="append", choices=list(CASES), help="run only these cases")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(CASES[args.child].measure(args)))
        return 0

    import torch

    rows = []
    worst = 0.0
    for name in args.case or list(CASES):
        measured = run_child(name, args.tokens)
        predicted = CASES[name].predict(args, measured)
        for phase, (pred, parts) in predicted.items():
            ratio = measured[phase] / pred
            worst = max(worst, abs(ratio - 1))
            if phase != "load" and measured.get("trimmed"):
                parts += f"; {measured['trimmed'] / MB:.0f} MB of freed heap trimmed after load"
            rows.append((name, phase, measured["baseline"], pred, measured[phase], ratio, parts))
        peak_pred = max(v[0] for v in predicted.values())
        peak_meas = max(measured[k] for k in predicted)
        rows.append(
            (name, "whole run", measured["baseline"], peak_pred, peak_meas, peak_meas / peak_pred, "")
        )
    print(
        f"Peak RSS on the bundled Gemma 3 270M GGUF: forward of {args.tokens} tokens under no_grad; "
        f"LoRA step on {LORA_BATCH} x {args.tokens} tokens "
        f"(torch {torch.__version__}, {os.cpu_count()} CPUs; MB = 10^6 bytes)\n"
    )
    header = (
        "case",
        "phase",
        "baseline MB",
        "predicted MB",
        "measured MB",
        "ratio",
        "prediction above baseline",
    )
    table = [header] + [
        (c, ph, f"{b / MB:.0f}", f"{pr / MB:.0f}", f"{m / MB:.0f}", f"{r:.3f}", parts)
        for c, ph, b, pr, m, r, parts in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(
        "\nbaseline: RSS after importing torch + gemmakit, building a tiny module on the meta "
        "device and running tiny versions of the forward's ops (and, for the LoRA cases, of a training "
        "step), measured in each child before loading."
    )
    print(f"largest deviation: {worst:.1%} ({'within' if worst <= 0.15 else 'OUTSIDE'} the 15% target)")
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Several LoRA adapters in one batch: what a mixed batch costs, and grouping vs gathered bmm.

    python benchmarks/multi_lora.py [--rows 8] [--rank 16] [--steps 20] [--threads N] [--json out.json]

On the bundled Gemma 3 270M (float32, CPU), with three random rank-`--rank` adapters on the
seven projections attached by `gemmakit.lora.multi`, times one decode step (a batch of
`--rows` rows, one token each, after a 64-token prompt) for: the base model with no adapter
attached, every row on one adapter, and the rows spread over the three adapters and the base.

Then, for one 640 -> 1024 projection (q_proj's shape), the low-rank update alone of a mixed
batch computed two ways: grouped per adapter (`MultiLoRALinear`: gather the adapter's rows,
two matmuls, scatter-add) and gathered (the factors of each row stacked, padded to one rank,
two `bmm`s), the choice `lora/multi.py` names. Median of `--steps` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gemmakit import lora
from gemmakit.loading import load
from gemmakit.lora import multi

NAMES = ["a", "b", "c"]


def median_ms(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def make_adapters(model, rank: int, root: Path) -> dict[str, Path]:
    """Random PEFT adapters of rank `rank` on every projection, written as files directly
    (no copy of the model needed)."""
    from safetensors.torch import save_file

    folders = {}
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]
    for i, name in enumerate(NAMES):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for module in targets:
            out_f, in_f = model.get_submodule(module).weight.shape
            tensors[f"{lora.PEFT_PREFIX}{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.01
            tensors[f"{lora.PEFT_PREFIX}{module}.lora_B.weight"] = (
                torch.randn(out_f, rank, generator=g) * 0.01
            )
        folders[name] = root / name
        folders[name].mkdir()
        save_file(tensors, str(folders[name] / lora.ADAPTER_WEIGHTS))
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank}
        (folders[name] / lora.ADAPTER_CONFIG).write_text(json.dumps(config))
    return folders


@torch.inference_mode()
def decode_step_ms(model, rows: int, names, steps: int) -> float:
    cache = model.make_cache(rows, 64 + steps + 2)  # the prompt, the warm-up and each timed step
    ids = torch.randint(3, 1000, (rows, 64))
    if names is not None:
        multi.select_rows(model, names)
    model(ids, torch.ones_like(ids, dtype=torch.bool), cache=cache)
    step = torch.randint(3, 1000, (rows, 1))
    mask = torch.ones_like(step, dtype=torch.bool)

    return median_ms(lambda: model(step, mask, cache=cache), steps)


@torch.inference_mode()
def update_ms(rows: int, rank: int, steps: int) -> dict[str, float]:
    """The low-rank update of a mixed batch for one 640 -> 1024 projection, both ways."""
    g = torch.Generator().manual_seed(0)
    factors = {
        n: (torch.randn(rank, 640, generator=g) * 0.05, torch.randn(1024, rank, generator=g) * 0.05)
        for n in NAMES
    }
    names = [(NAMES + [None])[i % 4] for i in range(rows)]
    x = torch.randn(rows, 1, 640, generator=g)
    groups = {n: torch.tensor([i for i, m in enumerate(names) if m == n]) for n in NAMES}

    def grouped():
        out = torch.zeros(rows, 1, 1024)
        for n, idx in groups.items():
            a, b = factors[n]
            out = out.index_add(0, idx, F.linear(F.linear(x.index_select(0, idx), a), b))
        return out

    zero_a, zero_b = torch.zeros(rank, 640), torch.zeros(1024, rank)
    a_rows = torch.stack([factors[n][0] if n else zero_a for n in names])  # (B, r, in)
    b_rows = torch.stack([factors[n][1] if n else zero_b for n in names])  # (B, out, r)

    def gathered():
        # Stacking the rows' factors is part of each step: a row's adapter changes as rows
        # join and leave the batch.
        a = torch.stack([factors[n][0] if n else zero_a for n in names])
        b = torch.stack([factors[n][1] if n else zero_b for n in names])
        return torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))

    torch.testing.assert_close(
        grouped(), torch.bmm(torch.bmm(x, a_rows.transpose(1, 2)), b_rows.transpose(1, 2))
    )
    return {"grouped_ms": median_ms(grouped, steps), "gathered_bmm_ms": median_ms(gathered, steps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        # On a loaded machine 1 thread gives honest numbers: a descheduled OpenMP partner
        # thread turns each small op's barrier into a wait of a whole time slice.
        torch.set_num_threads(args.threads)
    base = load(dtype="float32", device="cpu").model.eval()
    result = {"rows": args.rows, "rank": args.rank, "threads": torch.get_num_threads()}
    result |= {f"q_proj_update_{k}": v for k, v in update_ms(args.rows, args.rank, args.steps * 10).items()}
    print(json.dumps(result), flush=True)
    result["base_step_ms"] = decode_step_ms(base, args.rows, None, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(base, args.rank, Path(tmp))
        for name, folder in folders.items():
            multi.attach(base, name, folder)
    result["one_adapter_step_ms"] = decode_step_ms(base, args.rows, ["a"] * args.rows, args.steps)
    mixed = [(NAMES + [None])[i % 4] for i in range(args.rows)]
    result["mixed_step_ms"] = decode_step_ms(base, args.rows, mixed, args.steps)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Milliseconds of the GGUF block products on the bundled Gemma 3 270M's own matrices: the
integer dots with 8-bit activation blocks (llama.cpp's product, what the model runs) against
the float32-activation product, at several row counts (1: a decode step; 16: a batched
serving step; 512: a prefill chunk).

    python benchmarks/gguf_kernels.py [--rows 1,16,512] [--threads 1] [--repeats 5] [--json]

One matrix of each ggml type the file holds (layer 0's, and the tied output head, whose
262144 rows make it the largest read of a step) is multiplied `--repeats` times per
measurement; the table gives the best time and the weight bytes read per second, and a
"torch" column: the weight dequantized to float32 and multiplied by torch (the many-row path
before the integer dots). The last line is the read ceiling: the head's bytes summed as int64,
what a one-row product over them can at best approach. `--clock thread` times the calling thread's CPU time instead of the
wall clock: with `--threads 1` (the product then runs on that thread) it is what a loaded
machine can still compare.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gemmakit.kernels import cpu as cpu_kernels
from gemmakit.loading import load
from gemmakit.quant import GGUFLinear


def matrices(model) -> dict[str, GGUFLinear]:
    """One matrix per (name, ggml type): layer 0's projections, a later down_proj of another
    type, and the output head."""
    chosen = {}
    for name, module in model.named_modules():
        if isinstance(module, GGUFLinear):
            key = f"{name.split('.')[-1]} {module.type_name}"
            if key not in chosen or name == "lm_head":
                chosen[key] = (name, module)
    return {f"{name} ({m.type_name}, {m.out_features}x{m.in_features})": m for name, m in chosen.values()}


def read_ceiling(chosen: dict[str, GGUFLinear], repeats: int, clock) -> dict:
    """What reading the largest matrix's bytes costs with nothing else done: its raw blocks
    viewed as int64 and summed (torch's vectorized reduction), the memory-bandwidth bound of
    a one-row product over the same bytes."""
    largest = max(chosen.values(), key=lambda m: m.weight.numel())
    words = largest.weight.reshape(-1)[: largest.weight.numel() // 8 * 8].view(torch.int64)
    ms = best_ms(lambda: words.sum(), repeats, clock)
    return {"bytes": words.numel() * 8, "ms": ms, "gb_per_s": words.numel() * 8 / ms / 1e6}


def best_ms(fn, repeats: int, clock=time.perf_counter) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,16,512", help="activation rows, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="threads of each product")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (best kept)")
    parser.add_argument("--head-rows", type=int, default=16, help="most rows the output head is timed at")
    parser.add_argument(
        "--clock", choices=("wall", "thread"), default="wall", help="wall clock or thread CPU time"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    model = load(device="cpu").model
    results = []
    for label, m in matrices(model).items():
        for rows in (int(r) for r in args.rows.split(",")):
            if m.out_features > 100_000 and rows > args.head_rows:
                continue  # the head is only ever multiplied by the rows that sample
            x = torch.randn(rows, m.in_features, generator=torch.Generator().manual_seed(0))
            row = dict(matrix=label, rows=rows)
            for kind, rounded in (("int8_ms", True), ("float_ms", False)):
                call = (x, m.weight, m.ggml_type, m.in_features)
                row[kind] = best_ms(
                    lambda c=call, r=rounded: cpu_kernels.gguf_matmul(*c, rounded=r), args.repeats, clock
                )
            if m.out_features < 100_000:
                row["torch_ms"] = best_ms(
                    lambda m=m, x=x: x @ cpu_kernels.gguf_dequantize(m.weight, m.ggml_type, m.in_features).T,
                    args.repeats,
                    clock,
                )
            row["int8_gb_per_s"] = m.weight.numel() / row["int8_ms"] / 1e6
            results.append(row)
    ceiling = read_ceiling(matrices(model), args.repeats, clock)
    if args.json:
        print(json.dumps({"products": results, "read_ceiling": ceiling}, indent=1))
        return
    print(f"threads {args.threads}, best of {args.repeats}, {args.clock} clock")
    print(
        f"{'matrix':<48} {'rows':>5} {'int8 ms':>9} {'float ms':>9} {'torch ms':>9} {'speed-up':>8} {'GB/s':>6}"
    )
    for r in results:
        torch_ms = f"{r['torch_ms']:>9.3f}" if "torch_ms" in r else f"{'-':>9}"
        best_other = min(r["float_ms"], r.get("torch_ms", r["float_ms"]))
        print(
            f"{r['matrix']:<48} {r['rows']:>5} {r['int8_ms']:>9.3f} {r['float_ms']:>9.3f} {torch_ms} "
            f"{best_other / r['int8_ms']:>8.2f} {r['int8_gb_per_s']:>6.1f}"
        )
    print(
        f"read ceiling: the head's {ceiling['bytes'] / 1e6:.0f} MB summed as int64 by torch in "
        f"{ceiling['ms']:.3f} ms, {ceiling['gb_per_s']:.1f} GB/s"
    )


if __name__ == "__main__":
    main()

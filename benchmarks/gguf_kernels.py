"""Milliseconds of the GGUF block products on the bundled Gemma 3 270M's own matrices: the
integer dots with 8-bit activation blocks (llama.cpp's product, what the model runs) against
the float32-activation product, at several row counts (1: a decode step; 16 and 64: batched
serving steps; 512: a prefill chunk).

    python benchmarks/gguf_kernels.py [--rows 1,16,64,512] [--threads 1] [--repeats 5] [--json]

One matrix of each ggml type the file holds (layer 0's, and the tied output head, whose
262144 rows make it the largest read of a step) is multiplied `--repeats` times per
measurement; the table gives the best time and the weight bytes read per second, and a
"torch" column: the weight dequantized to float32 and multiplied by torch (the many-row path
before the integer dots). The C decode steps' `matmul_rows` (gemv.c) runs the same product
on each thread's share of the output columns. `--clock thread` times the calling thread's CPU
time instead of the wall clock: with `--threads 1` (the product then runs on that thread) it is
what a loaded machine can still compare.

Then the decode bounds: the read ceiling, the head's bytes summed as int64 by torch on one
thread and on two (wall clock: what one decode step's products can at best approach), the
head's one-row product split over two threads as the decode step splits it, and the bytes a
decode token reads (every block matrix once) against the two-thread ceiling.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gemmakit, not an installed one

from gemmakit.kernels import cpu as cpu_kernels  # noqa: E402
from gemmakit.loading import load  # noqa: E402
from gemmakit.quant import GGUFLinear  # noqa: E402


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


def read_ceiling(chosen: dict[str, GGUFLinear], repeats: int, clock, threads: int) -> dict:
    """What reading the largest matrix's bytes costs with nothing else done, on `threads`
    threads: its raw blocks viewed as int64 and summed (torch's vectorized reduction, split
    over its threads), the memory-bandwidth bound of a one-row product over the same bytes."""
    largest = max(chosen.values(), key=lambda m: m.weight.numel())
    words = largest.weight.reshape(-1)[: largest.weight.numel() // 8 * 8].view(torch.int64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ms = best_ms(lambda: words.sum(), repeats, clock)
    finally:
        torch.set_num_threads(before)
    return {
        "threads": threads,
        "bytes": words.numel() * 8,
        "ms": ms,
        "gb_per_s": words.numel() * 8 / ms / 1e6,
    }


def decode_bounds(model, chosen: dict[str, GGUFLinear], repeats: int, clock) -> dict:
    """The read ceilings on one thread (`clock`) and two (wall clock), the head's one-row
    product over two threads (wall clock), and the bytes of every block matrix (a decode
    token's weight reads, the embedding row aside) with the tokens per second that reading
    them at the two-thread ceiling would allow."""
    one = read_ceiling(chosen, repeats, clock, 1)
    two = read_ceiling(chosen, repeats, time.perf_counter, 2)
    head = max(chosen.values(), key=lambda m: m.weight.numel())
    x = torch.randn(1, head.in_features, generator=torch.Generator().manual_seed(0))
    y = torch.empty(1, head.out_features)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        head_ms = best_ms(
            lambda: cpu_kernels.gguf_matmul(x, head.weight, head.ggml_type, head.in_features, out=y),
            repeats,
            time.perf_counter,
        )
    finally:
        torch.set_num_threads(before)
    token_bytes = sum(m.weight.numel() for m in model.modules() if isinstance(m, GGUFLinear))
    return {
        "read_ceiling_1_thread": one,
        "read_ceiling_2_threads": two,
        "head_1_row_2_threads_ms": head_ms,
        "head_1_row_2_threads_gb_per_s": head.weight.numel() / head_ms / 1e6,
        "token_bytes": token_bytes,
        "tokens_per_s_at_2_thread_ceiling": two["gb_per_s"] * 1e9 / token_bytes,
    }


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
    parser.add_argument("--rows", default="1,16,64,512", help="activation rows, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="threads of each product")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (best kept)")
    parser.add_argument("--head-rows", type=int, default=64, help="most rows the output head is timed at")
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
            y = torch.empty(
                rows, m.out_features
            )  # reused: a fresh output's page faults are not the product's
            row = dict(matrix=label, rows=rows)
            for kind, rounded in (("int8_ms", True), ("float_ms", False)):
                call = (x, m.weight, m.ggml_type, m.in_features)
                row[kind] = best_ms(
                    lambda c=call, r=rounded, y=y: cpu_kernels.gguf_matmul(*c, rounded=r, out=y),
                    args.repeats,
                    clock,
                )
            if m.out_features < 100_000:
                row["torch_ms"] = best_ms(
                    lambda m=m, x=x: x @ cpu_kernels.gguf_dequantize(m.weight, m.ggml_type, m.in_features).T,
                    args.repeats,
                    clock,
                )
            row["int8_gb_per_s"] = m.weight.numel() / row["int8_ms"] / 1e6
            results.append(row)
    bounds = decode_bounds(model, matrices(model), args.repeats, clock)
    if args.json:
        print(json.dumps({"products": results, "decode": bounds}, indent=1))
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
    for key, clock_name in (("read_ceiling_1_thread", args.clock), ("read_ceiling_2_threads", "wall")):
        c = bounds[key]
        print(
            f"read ceiling, {c['threads']} thread(s), {clock_name} clock: the head's {c['bytes'] / 1e6:.0f} MB "
            f"summed as int64 by torch in {c['ms']:.3f} ms, {c['gb_per_s']:.1f} GB/s"
        )
    print(
        f"head, one row over 2 threads (wall clock): {bounds['head_1_row_2_threads_ms']:.3f} ms, "
        f"{bounds['head_1_row_2_threads_gb_per_s']:.1f} GB/s"
    )
    print(
        f"a decode token reads {bounds['token_bytes'] / 1e6:.0f} MB of block matrices: at the 2-thread "
        f"ceiling at most {bounds['tokens_per_s_at_2_thread_ceiling']:.0f} tokens/s"
    )


if __name__ == "__main__":
    main()

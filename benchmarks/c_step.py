"""The C model step alone on the bundled GGUF: this checkout's kernels against another
checkout's, interleaved in one process, so a loaded machine slows both alike.

    python benchmarks/c_step.py --baseline ../main            # this checkout vs main's kernels
    python benchmarks/c_step.py --threads 1 --rounds 8        # one thread, more rounds

Each round, each library in turn runs a 512-token prompt as one C step (`CDecoder.prefill`:
every row through the layers, the last through the output head) and then `--decode` one-row
steps from position 512 on (`CDecoder.step`). Reported per library: wall milliseconds of the
prefill and of a decode step, min / p25 / median over all rounds, and the decode step as
tokens/s (the C step only: no sampling, no Python loop around it).

On a shared machine a step during which one of the step's threads waited for a CPU measures
the other processes, not the kernels: a decode step is ~110 sections ended by barriers, and a
thread taken off its core for a millisecond holds the others at the next one. Such steps are
dropped (`--max-wait-us`, from the kernel's run-queue waits of the calling thread and of the
library's pool workers, /proc/self/task/*/schedstat; where that file is missing nothing is
dropped) and the table says how many were kept. Differences of a few percent need a few hundred kept steps per library. A baseline's library is
built from DIR/gemmakit/kernels/csrc with the flags kernels/build.py uses; its Model / Layer /
Batch structs must be laid out as this checkout's (additions whose zero value keeps today's
behaviour are fine only if this checkout has them too). Each library runs its own worker pool.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gemmakit

from inference import prompt_ids  # noqa: E402  (the inference benchmark's 512 prompt ids)

from gemmakit.inference import c_decode  # noqa: E402
from gemmakit.kernels import build, cpu  # noqa: E402
from gemmakit.loading import load  # noqa: E402


def baseline_library(checkout: Path, folder: str) -> ctypes.CDLL:
    """The kernels of another checkout, built into `folder` with kernels/build.py's flags."""
    units = sorted(str(p) for p in (checkout / "gemmakit" / "kernels" / "csrc").glob("*.c"))
    if not units:
        raise SystemExit(f"no C sources under {checkout}/gemmakit/kernels/csrc")
    target = Path(folder) / "baseline.so"
    subprocess.run(["cc", *build.FLAGS, "-fopenmp", "-o", str(target), *units], check=True)
    return ctypes.CDLL(str(target))


def thread_ids() -> set[int]:
    """The ids of this process's threads (Linux), or none where /proc does not list them."""
    return {int(path.rsplit("/", 1)[1]) for path in glob.glob("/proc/self/task/*")}


def run_queue_wait_ns(threads: set[int]) -> int | None:
    """Nanoseconds `threads` have waited on a run queue so far (the second field of each
    one's schedstat), or None where the kernel does not report it. Only the step's threads:
    torch's idle pool threads wait there too, and would count every step as disturbed."""
    total, found = 0, False
    for tid in threads:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
            found = True
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total if found else None


def one_round(
    model, lib, ids: list[int], decode: int, max_wait_ns: int, workers: set[int]
) -> tuple[float, list[float], int]:
    """A prefill of `ids` and `decode` one-row steps with `lib`: (prefill ms, [step ms] of the
    steps during which the calling thread and `lib`'s pool workers (added to `workers` as its
    first step starts them) waited no more than max_wait_ns for a CPU, steps dropped)."""
    cache = model.make_cache(1, len(ids) + decode + 1)
    decoder = c_decode.decoder(model, cache, 1)
    if decoder is None or not decoder.block_weights:
        raise SystemExit("the C step does not run this model on its GGUF blocks")
    decoder.lib = lib
    before = thread_ids()
    start = time.perf_counter()
    decoder.prefill(ids)
    prefill_ms = (time.perf_counter() - start) * 1e3
    workers |= thread_ids() - before  # the pool's threads start with its first step
    step_threads = workers | {threading.get_native_id()}
    steps, dropped = [], 0
    for i in range(decode):
        waited = run_queue_wait_ns(step_threads)
        start = time.perf_counter()
        decoder.step(1000 + i)
        elapsed = (time.perf_counter() - start) * 1e3
        if waited is not None and run_queue_wait_ns(step_threads) - waited > max_wait_ns:
            dropped += 1
        else:
            steps.append(elapsed)
    return prefill_ms, steps, dropped


def spread(values: list[float]) -> dict:
    if not values:  # every step waited for a CPU
        return {"min": float("nan"), "p25": float("nan"), "median": float("nan")}
    ordered = sorted(values)
    return {"min": ordered[0], "p25": ordered[len(ordered) // 4], "median": statistics.median(ordered)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, default=None, help="another checkout whose kernels to compare")
    p.add_argument("--threads", type=int, default=2, help="threads of the C step (2)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, each library once a round (5)")
    p.add_argument("--decode", type=int, default=64, help="one-row steps a round (64)")
    p.add_argument(
        "--max-wait-us", type=float, default=100.0,
        help="drop a decode step during which the threads waited longer for a CPU (100)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load().model  # the bundled GGUF in its own block types
    ids = prompt_ids()
    with tempfile.TemporaryDirectory(prefix="gemmakit-c-step-") as folder, torch.inference_mode():
        libs = {"this checkout": cpu.library()}
        if args.baseline is not None:
            libs[f"baseline {args.baseline}"] = baseline_library(args.baseline, folder)
        times = {name: ([], [], [0]) for name in libs}
        workers = {name: set() for name in libs}
        for _ in range(args.rounds):
            for name, lib in libs.items():
                max_wait = int(args.max_wait_us * 1e3)
                prefill_ms, steps, dropped = one_round(model, lib, ids, args.decode, max_wait, workers[name])
                times[name][0].append(prefill_ms)
                times[name][1].extend(steps)
                times[name][2][0] += dropped
    results = {
        name: {"prefill_ms": spread(pre), "decode_step_ms": spread(dec), "steps_kept": len(dec),
               "steps_dropped": dropped[0]}
        for name, (pre, dec, dropped) in times.items()
    }  # fmt: skip
    print(f"{len(ids)}-token prefill and one-row decode steps, {args.threads} threads, {args.rounds} rounds")
    print(
        "| kernels | prefill ms (min / p25 / median) | decode step ms (min / p25 / median) | decode tok/s (p25)"
        " | steps kept / dropped |"
    )
    print("|---|---|---|---|---|")
    for name, r in results.items():
        pre, dec = r["prefill_ms"], r["decode_step_ms"]
        print(
            f"| {name} | {pre['min']:.0f} / {pre['p25']:.0f} / {pre['median']:.0f}"
            f" | {dec['min']:.2f} / {dec['p25']:.2f} / {dec['median']:.2f} | {1e3 / dec['p25']:.1f}"
            f" | {r['steps_kept']} / {r['steps_dropped']} |"
        )
    if any(r["steps_kept"] == 0 for r in results.values()):
        print("every decode step of a library waited for a CPU: the machine is busy (or raise --max-wait-us)")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

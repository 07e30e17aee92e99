"""Where a load of the bundled GGUF in its own types spends time and resident memory, stage by stage.

    .venv/bin/python benchmarks/load_profile.py [--runs 5] [--prompt-tokens N] [--no-tokenizer-cache] [--json]

Each run is a fresh process that walks `loading.load`'s steps one at a time (import torch,
import gemmakit, parse the GGUF header, build the model and map its block matrices, the
tokenizer, the first generated token, 15 more) and reads its VmRSS / VmHWM
(/proc/self/status) after each; at the end it sums its resident pages by what they map
(/proc/self/smaps: the GGUF file, torch's libraries, the heap, anonymous memory). The table
gives each stage's median seconds and the median VmHWM after it, across runs.
`--prompt-tokens N` prompts with N fixed token ids instead of "Hi" (512: benchmarks/inference.py's
prompt, whose run peaks higher: the prefill's activations and a 640-position KV cache).
`--no-tokenizer-cache` builds the SentencePiece model from the file's vocabulary every time
(`GEMMAKIT_NO_CACHE=1`), as loads did before the tokenizer cache. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

STAGES = (
    "import torch", "import gemmakit", "GGUF header", "model + block matrices", "tokenizer",
    "first token", "15 more tokens",
)  # fmt: skip


def status_mib() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) / 1024
    return out


def resident_by_mapping(gguf_path: str) -> dict[str, float]:
    """Resident MiB by what the pages map: the GGUF, torch's libraries, heap, anonymous, other."""
    groups: dict[str, float] = {}
    name = "other"
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's header line: address range ... [path]
                path = fields[5] if len(fields) > 5 else ""
                if path == gguf_path:
                    name = "the GGUF file"
                elif "/torch/lib/" in path:
                    name = "torch's libraries"
                elif path == "[heap]":
                    name = "heap"
                elif not path:
                    name = "anonymous"
                else:
                    name = "other files"
            elif fields[0] == "Rss:":
                groups[name] = groups.get(name, 0.0) + int(fields[1]) / 1024
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def prompt(tokenizer, tokens: int) -> list[int]:
    """ "Hi", or `tokens` fixed ids: BOS, then ids of ordinary pieces (as benchmarks/inference.py's)."""
    if not tokens:
        return tokenizer.encode("Hi")
    import random

    rng = random.Random(0)
    return [tokenizer.bos_id] + [rng.randrange(1000, 200000) for _ in range(tokens - 1)]


def child(prompt_tokens: int = 0) -> dict:
    marks = []
    last = time.perf_counter()

    def mark(stage: str):
        nonlocal last
        now = time.perf_counter()
        marks.append({"stage": stage, "seconds": now - last, **status_mib()})
        last = now

    import torch

    mark("import torch")
    from gemmakit import loading
    from gemmakit.formats.gguf import GGUFFile, config_from_gguf
    from gemmakit.inference.engine import Request, generate_steps
    from gemmakit.inference.sampling import SamplingParams

    mark("import gemmakit")
    loading.freeze_startup_objects()  # as `load` does first
    source = loading.resolve(None)
    g = GGUFFile(source.path)
    config_from_gguf(g)
    mark("GGUF header")
    model = loading.load_native_gguf(g, source)
    mark("model + block matrices")
    tokenizer = loading.load_tokenizer(source, g)
    mark("tokenizer")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with torch.inference_mode():
        steps = generate_steps(model, [Request(prompt(tokenizer, prompt_tokens), params, tokenizer.stop_ids)])
        next(steps)
        mark("first token")
        for _ in steps:
            pass
        mark("15 more tokens")
    return {"stages": marks, "resident": resident_by_mapping(str(source.path.resolve()))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="fresh processes (5)")
    ap.add_argument("--prompt-tokens", type=int, default=0, metavar="N", help='N fixed prompt ids, not "Hi"')
    ap.add_argument("--no-tokenizer-cache", action="store_true", help="build the tokenizer every run")
    ap.add_argument("--json", action="store_true", help="print every run as JSON")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.prompt_tokens)))
        return
    from gemmakit.loading import default_gguf

    default_gguf()  # assembled once, outside the timed runs
    env = dict(os.environ)
    if args.no_tokenizer_cache:
        env["GEMMAKIT_NO_CACHE"] = "1"
    busy = os.getloadavg()[0]
    if busy > 0.5:
        print(
            f"warning: load average {busy:.2f}; other work on the machine skews these numbers",
            file=sys.stderr,
        )
    runs = []
    for _ in range(args.runs):
        done = subprocess.run(
            [sys.executable, __file__, "--child", "--prompt-tokens", str(args.prompt_tokens)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(runs, indent=2))
        return
    print("| stage | seconds | peak RSS after |")
    print("|---|---|---|")
    for i, stage in enumerate(STAGES):
        seconds = statistics.median(r["stages"][i]["seconds"] for r in runs)
        peak = statistics.median(r["stages"][i]["VmHWM"] for r in runs)
        print(f"| {stage} | {seconds:.3f} s | {peak:,.0f} MiB |")
    load = [sum(s["seconds"] for s in r["stages"][2:5]) for r in runs]
    print(f"\nload (header + model + tokenizer): {statistics.median(load):.3f} s, median of {len(runs)}")
    print("resident at the end, by mapping (last run):")
    for name, mib in runs[-1]["resident"].items():
        print(f"  {name:<18} {mib:7.1f} MiB")


if __name__ == "__main__":
    main()

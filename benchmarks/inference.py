"""CPU inference benchmark: gemmakit vs transformers vs llama.cpp on the bundled Gemma 3 270M.

    .venv/bin/python benchmarks/inference.py [--runs 3] [--systems ...] [--json]

Each measurement runs in a fresh process (so load time and peak RSS are honest), the systems
take turns run by run (so a slow minute on a shared machine hits them alike), and the table
reports medians with [min-max] across processes, then the ratios the targets are set in. Everyone gets the same 512 prompt
token ids; decode is 128 greedy tokens. llama-cpp-python and transformers are optional:
missing ones are reported, not faked. "gemmakit generate, no torch" is the path plain
`gemmakit generate` takes on the bundled file (inference/lean.py: tokenizer loaded, each token
detokenized), run in a child that fails if torch was imported.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gemmakit

PROMPT_TOKENS = 512
DECODE_TOKENS = 128
SYSTEMS = {
    "gemmakit (file's own types)": ("gemmakit", "auto", None),
    # `gemmakit generate`'s torch-free path (inference/lean.py): the file's own types through
    # the same C step, the tokenizer loaded and each token detokenized as the command does
    "gemmakit generate, no torch": ("gemmakit-lean", None, None),
    "gemmakit fp32": ("gemmakit", "float32", None),
    "gemmakit bf16": ("gemmakit", "bfloat16", None),
    "gemmakit int8": ("gemmakit", "float32", "int8"),
    "gemmakit int8, torch step": ("gemmakit", "float32", "int8"),  # GEMMAKIT_NO_C_KERNELS=1
    "gemmakit int4": ("gemmakit", "float32", "int4"),
    "gemmakit nf4": ("gemmakit", "float32", "nf4"),
    # GPTQ / AWQ 4-bit: a folder `gemmakit quantize --method` writes once (`gptq_folder`), loaded
    # as a user loads a GPTQ checkpoint; the C step reads the packed weights (csrc/packed4.c),
    # the torch step runs torch's int4 CPU kernel. The folder's tied embedding / output head is
    # bfloat16 (the writer's default), kept so and read as bf16 rows; "f32 head" folders
    # are written with --dtype float32 (the head read as float32, 2x the bytes).
    "gemmakit gptq g32": ("gemmakit-folder", "float32", "gptq-g32-bfloat16"),
    "gemmakit gptq g128": ("gemmakit-folder", "float32", "gptq-g128-bfloat16"),
    "gemmakit gptq g128, torch step": ("gemmakit-folder", "float32", "gptq-g128-bfloat16"),
    "gemmakit gptq g128, f32 head": ("gemmakit-folder", "float32", "gptq-g128-float32"),
    "gemmakit awq g128": ("gemmakit-folder", "float32", "awq-g128-bfloat16"),
    "llama.cpp Q4_K_M": ("llamacpp", None, None),
    "llama.cpp Q4_K_M (llama-bench)": ("llamacpp-bin", None, None),
    "transformers fp32": ("transformers", "float32", None),
    "transformers bf16": ("transformers", "bfloat16", None),
}


def gptq_folder(spec: str):
    """The folder of a `method-gGROUP-DTYPE` GPTQ/AWQ model of the bundled GGUF (DTYPE: what
    its unquantized tensors are stored in), written on first use by `gemmakit quantize
    --method` (minutes) under the gemmakit cache, reused after."""
    from pathlib import Path

    from gemmakit.paths import cache_dir

    method, _, rest = spec.partition("-g")
    group, _, dtype = rest.partition("-")
    folder = Path(cache_dir()) / "benchmarks" / spec
    if not (folder / "config.json").exists():
        print(f"writing {folder} (once)...", file=sys.stderr, flush=True)
        command = [sys.executable, "-m", "gemmakit.cli", "quantize", "--method", method, "--group-size", group,
                   "-o", str(folder), "--dtype", dtype, "--force", "--json"]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return folder


def prompt_ids(vocab_size: int = 262144) -> list[int]:
    """512 fixed token ids: BOS, then ids of ordinary text pieces (deterministic)."""
    import random

    rng = random.Random(0)
    return [2] + [rng.randrange(1000, 200000) for _ in range(PROMPT_TOKENS - 1)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- children: one system, one process --------------------------------------------------------


def run_gemmakit(dtype: str, quantize: str | None, model=None) -> dict:
    import torch

    from gemmakit.inference.engine import Request, generate_steps
    from gemmakit.inference.sampling import SamplingParams
    from gemmakit.loading import load

    start = time.perf_counter()
    loaded = load(model, dtype=dtype, device="cpu", quantize=quantize)  # quantized as it is read
    load_s = time.perf_counter() - start
    ids = prompt_ids()
    params = SamplingParams(temperature=0, max_tokens=DECODE_TOKENS, ignore_eos=True)
    requests = [Request(ids, params, loaded.stop_ids)]
    with torch.inference_mode():
        return _timed_tokens(load_s, generate_steps(loaded.model, requests))


def run_gemmakit_lean() -> dict:
    """The torch-free path `gemmakit generate` takes on the bundled GGUF (inference/lean.py),
    in this process, which must not import torch (checked: the row would be meaningless)."""
    from gemmakit.inference import lean
    from gemmakit.inference.sampling_params import SamplingParams

    start = time.perf_counter()
    model = lean.load(None)
    load_s = time.perf_counter() - start
    params = SamplingParams(temperature=0, max_tokens=DECODE_TOKENS, ignore_eos=True)
    result = _timed_tokens(load_s, lean.stream(model, prompt_ids(), params, lean.Completion()))
    if "torch" in sys.modules:
        raise RuntimeError("the lean path imported torch")
    return result


def run_llamacpp() -> dict:
    from llama_cpp import Llama

    from gemmakit.loading import default_gguf

    path = str(default_gguf())
    start = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=1024, n_threads=2, n_batch=512, verbose=False)
    load_s = time.perf_counter() - start
    # llama-cpp-python's generator never ends by itself: take DECODE_TOKENS tokens of it.
    gen = llm.generate(prompt_ids(), top_k=1, temp=0.0, reset=True)
    return _timed_tokens(load_s, itertools.islice(gen, DECODE_TOKENS))


def run_llamacpp_bin() -> dict:
    """llama.cpp's own programs (GEMMAKIT_LLAMA_CPP_BIN): llama-bench's pp512 and tg128 @ d512 rates
    on 2 threads, llama-simple's reported model load time, and the peak RSS of the two (the
    larger; llama-bench holds the 512-token batch)."""
    import re

    from gemmakit.loading import default_gguf

    folder = os.environ.get("GEMMAKIT_LLAMA_CPP_BIN", "/work/llamacpp/build/bin")
    path = str(default_gguf())
    threads = os.environ.get("OMP_NUM_THREADS", "2")

    def bench(prompt: int, generated: int, depth: int) -> float:
        done = subprocess.run(
            [f"{folder}/llama-bench", "-m", path, "-p", str(prompt), "-n", str(generated), "-d", str(depth),
             "-t", threads, "-r", "1", "-o", "json"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        (test,) = json.loads(done.stdout)
        return test["avg_ts"]

    # Decode at depth PROMPT_TOKENS (tg128 @ d512): the same work as the other rows' decode,
    # which follows their 512-token prompt (llama-bench's default tg128 starts at position 0).
    prefill, decode = bench(PROMPT_TOKENS, 0, 0), bench(0, DECODE_TOKENS, PROMPT_TOKENS)
    simple = subprocess.run(
        [f"{folder}/llama-simple", "-m", path, "-n", "1", "Hello"], capture_output=True, text=True, check=True
    )
    load_ms = re.search(r"load time =\s*([0-9.]+) ms", simple.stderr + simple.stdout)
    return {
        "load_s": float(load_ms.group(1)) / 1000 if load_ms else float("nan"),
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def run_transformers(dtype: str) -> dict:
    import torch
    import transformers

    from gemmakit.loading import default_gguf

    path = default_gguf()
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=getattr(torch, dtype)
    ).eval()
    load_s = time.perf_counter() - start
    ids = torch.tensor([prompt_ids()])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        past = out.past_key_values
        t1 = time.perf_counter()
        for _ in range(DECODE_TOKENS - 1):
            out = model(token, past_key_values=past, use_cache=True)
            token, past = out.logits[:, -1:].argmax(-1), out.past_key_values
        t2 = time.perf_counter()
    return _result(load_s, t0, t1, t2)


def _timed_tokens(load_s: float, tokens) -> dict:
    """The rates of a generator of DECODE_TOKENS tokens (lazy: its first `next` is the
    prefill and the first token, the rest the decode)."""
    t0 = time.perf_counter()
    next(tokens)
    t1 = time.perf_counter()
    for _ in tokens:
        pass
    t2 = time.perf_counter()
    return _result(load_s, t0, t1, t2)


def _result(load_s, t0, t1, t2) -> dict:
    return {
        "load_s": load_s,
        "prefill_tok_s": PROMPT_TOKENS / (t1 - t0),
        "decode_tok_s": (DECODE_TOKENS - 1) / (t2 - t1),
        "peak_rss_mib": peak_rss_mib(),
    }


def child(name: str) -> dict:
    kind, dtype, quantize = SYSTEMS[name]
    if kind == "gemmakit":
        return run_gemmakit(dtype, quantize)
    if kind == "gemmakit-folder":
        return run_gemmakit(dtype, None, gptq_folder(quantize))
    if kind == "gemmakit-lean":
        return run_gemmakit_lean()
    if kind == "llamacpp":
        return run_llamacpp()
    if kind == "llamacpp-bin":
        return run_llamacpp_bin()
    return run_transformers(dtype)


# --- parent ---------------------------------------------------------------------------------


def run_child(name: str) -> dict:
    if SYSTEMS[name][0] == "gemmakit-folder":
        gptq_folder(SYSTEMS[name][2])  # written before the timed process, not in it
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if name.endswith("torch step"):
        env["GEMMAKIT_NO_C_KERNELS"] = "1"
    proc = subprocess.run(
        [sys.executable, __file__, "--child", name], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(names: list[str], runs: int) -> list[dict]:
    """Every system once per round, `runs` rounds; a system that fails is not run again."""
    results: dict[str, list[dict]] = {name: [] for name in names}
    errors: dict[str, str] = {}
    for round_ in range(runs):
        for name in names:
            if name in errors:
                continue
            print(f"round {round_ + 1}/{runs}: {name}...", file=sys.stderr, flush=True)
            result = run_child(name)
            if "error" in result:
                errors[name] = result["error"]
            else:
                results[name].append(result)
    rows = []
    for name in names:
        if not results[name]:
            rows.append({"name": name, "error": errors.get(name, "no result")})
            continue
        summary = {"name": name, "runs": len(results[name])}
        for key in results[name][0]:
            values = [r[key] for r in results[name]]
            summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        rows.append(summary)
    return rows


def ratios(rows: list[dict]) -> list[str]:
    """The issue's targets as ratios of medians, for the systems this run measured."""
    med = {r["name"]: r for r in rows if "error" not in r}

    def get(name, key):
        return med[name][key]["median"] if name in med else None

    lines = []
    peer = next((n for n in ("llama.cpp Q4_K_M", "llama.cpp Q4_K_M (llama-bench)") if n in med), None)
    for native in ("gemmakit (file's own types)", "gemmakit generate, no torch"):
        if native not in med or not peer:
            continue
        for key, what, target in (
            ("decode_tok_s", "decode", "target >= 1.5x"),
            ("prefill_tok_s", "prefill 512", "target >= 2x"),
            ("peak_rss_mib", "peak RSS", "target <= 1x"),
            ("load_s", "load", "target <= 1x"),
        ):
            r = get(native, key) / get(peer, key)
            lines.append(f"{what}, {native} / {peer}: {r:.2f}x ({target})")
    best_quantized = max(
        (n for n in med if n.startswith("gemmakit") and ("int" in n or "nf4" in n or "gptq" in n)),
        key=lambda n: get(n, "decode_tok_s"), default=None,
    )  # fmt: skip
    if best_quantized and get("llama.cpp Q4_K_M", "decode_tok_s"):
        r = get(best_quantized, "decode_tok_s") / get("llama.cpp Q4_K_M", "decode_tok_s")
        lines.append(f"decode, {best_quantized} / llama.cpp Q4_K_M: {r:.2f}x (target 1.2x)")
    if get("gemmakit bf16", "decode_tok_s") and get("transformers bf16", "decode_tok_s"):
        r = get("gemmakit bf16", "decode_tok_s") / get("transformers bf16", "decode_tok_s")
        lines.append(f"decode, gemmakit bf16 / transformers bf16: {r:.2f}x (target 2x)")
    ours = [n for n in med if n.startswith("gemmakit")]
    peers = [n for n in med if not n.startswith("gemmakit")]
    if ours and peers:
        a = max(ours, key=lambda n: get(n, "prefill_tok_s"))
        b = max(peers, key=lambda n: get(n, "prefill_tok_s"))
        r = get(a, "prefill_tok_s") / get(b, "prefill_tok_s")
        lines.append(f"prefill, {a} / fastest peer ({b}): {r:.2f}x (target 1.5x)")
    return lines


def fmt(cell: dict | None, unit: str, digits: int = 0) -> str:
    if not cell:
        return "—"
    med, lo, hi = (f"{cell[k]:,.{digits}f}" for k in ("median", "min", "max"))
    return f"{med}{unit} [{lo}–{hi}]" if lo != hi else f"{med}{unit}"


def table(rows: list[dict]) -> str:
    out = [
        f"| system | load | prefill, {PROMPT_TOKENS}-token prompt | decode, {DECODE_TOKENS} greedy tokens | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} | not run: {r['error'][:80]} | | | |")
            continue
        out.append(
            f"| {r['name']} | {fmt(r['load_s'], ' s', 2)} | {fmt(r['prefill_tok_s'], ' tok/s')} "
            f"| {fmt(r['decode_tok_s'], ' tok/s', 1)} | {fmt(r['peak_rss_mib'], ' MiB')} |"
        )
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="processes per system (3)")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS), metavar="NAME")
    ap.add_argument("--json", action="store_true", help="print the raw summaries as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    busy = os.getloadavg()[0]
    if busy > 0.5:
        print(f"warning: load average {busy:.2f}; other work on the machine skews these numbers",
              file=sys.stderr)  # fmt: skip
    rows = measure(args.systems, args.runs)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows))
        print()
        print("\n".join(f"- {line}" for line in ratios(rows)))


if __name__ == "__main__":
    main()

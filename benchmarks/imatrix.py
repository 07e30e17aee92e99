"""`gemmakit imatrix` against llama.cpp's `llama-imatrix` on the bundled Gemma 3 270M.

    .venv/bin/python benchmarks/imatrix.py [--ctx 512] [--chunks N] [--threads 2] [--text FILE]

Both run the same text, ctx and chunks on the bundled Q4_K_M file (llama.cpp on its blocks,
gemmakit on their float32 dequantization, the model load excluded: gemmakit's is timed
apart, llama-imatrix's is its "seconds per pass" sum). Prints one JSON document: each side's
seconds and tokens/s, the entries and counts compared, the relative L2 difference of the
per-column means (max and median over entries), and the load average (the machine is often
shared). llama-imatrix is looked for in $GEMMAKIT_LLAMA_CPP_BIN (default
/work/llamacpp/build/bin).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemmakit.evaluation.imatrix import compute_imatrix  # noqa: E402
from gemmakit.evaluation.perplexity import DEFAULT_TEXT  # noqa: E402
from gemmakit.formats.imatrix import load_imatrix, write_imatrix  # noqa: E402
from gemmakit.loading import default_gguf, load  # noqa: E402

LLAMA_CPP_BIN = Path(os.environ.get("GEMMAKIT_LLAMA_CPP_BIN", "/work/llamacpp/build/bin"))


def run_llama_imatrix(
    model: Path, text: Path, out: Path, ctx: int, chunks: int | None, threads: int
) -> float:
    """Seconds llama-imatrix spent computing (the sum of its "seconds per pass" lines)."""
    cmd = [str(LLAMA_CPP_BIN / "llama-imatrix"), "-m", str(model), "-f", str(text), "-o", str(out),
           "-c", str(ctx), "--no-ppl", "-t", str(threads)]  # fmt: skip
    if chunks:
        cmd += ["--chunks", str(chunks)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    # llama-imatrix logs its first pass only ("%.2f seconds per pass"), a pass being up to
    # 2048 // ctx chunks (its default batch of 2048): when that is all of them, it is the whole
    # computation; otherwise the wall time (model load included) is what there is.
    passes = re.findall(r"([\d.]+) seconds per pass", done.stdout + done.stderr)
    one_pass = chunks is not None and chunks <= max(1, 2048 // ctx)
    return float(passes[0]) if passes and one_pass else wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=None)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model_path = default_gguf()
    text = args.text.read_text(encoding="utf-8")
    text = text[:-1] if text.endswith("\n") else text  # as llama-imatrix reads -f

    start = time.perf_counter()
    loaded = load(str(model_path), dtype="float32", device="cpu")
    load_seconds = time.perf_counter() - start
    ids = loaded.tokenizer.encode(text, add_bos=True)
    with torch.inference_mode():  # warm-up: first-call costs (kernel builds, allocations) untimed
        loaded.model.hidden_states(torch.tensor([ids[: min(args.ctx, 64)]]))
    start = time.perf_counter()
    stats, chunks = compute_imatrix(loaded.model, ids, loaded.tokenizer.bos_id, args.ctx, args.chunks)
    ours_seconds = time.perf_counter() - start
    tokens = chunks * args.ctx
    result = {
        "model": str(model_path), "text": str(args.text), "ctx": args.ctx, "chunks": chunks, "tokens": tokens,
        "threads": args.threads, "gemmakit": {"seconds": round(ours_seconds, 2), "load_seconds": round(load_seconds, 2),
        "tokens_per_second": round(tokens / ours_seconds, 1)},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ours_file = write_imatrix(Path(tmp) / "ours.gguf", *stats.numpy(), [str(args.text)], chunks, args.ctx)
        if (LLAMA_CPP_BIN / "llama-imatrix").exists():
            ref_file = Path(tmp) / "ref.gguf"
            ref_seconds = run_llama_imatrix(model_path, args.text, ref_file, args.ctx, chunks, args.threads)
            ours, theirs = load_imatrix(ours_file), load_imatrix(ref_file)
            a, b = ours.importance(), theirs.importance()
            diffs = [float(np.linalg.norm(a[n] - b[n]) / np.linalg.norm(b[n])) for n in b if n in a]
            result["llama_imatrix"] = {
                "seconds": round(ref_seconds, 2),
                "tokens_per_second": round(tokens / ref_seconds, 1),
            }
            result["same_entries"] = set(a) == set(b)
            result["same_counts"] = all(
                ours.counts[n].tolist() == c.tolist() for n, c in theirs.counts.items() if n in ours.counts
            )
            result["relative_l2_max"] = max(diffs)
            result["relative_l2_median"] = float(np.median(diffs))
    result["load_average"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

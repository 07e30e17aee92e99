"""The tokenizer of plain `gemmakit generate` against SentencePiece's, on the bundled GGUF's vocabulary.

    .venv/bin/python benchmarks/tokenizer_speed.py [--runs 15] [--python-runs 3] [--fresh-runs 5] [--json]

(`PYTHONPATH=.` first measures the checkout it runs in rather than the installed gemmakit.)
Backends, all over the same 262k-piece vocabulary and giving the same ids (checked here too):
"in place, C" (`formats/sentencepiece_bpe.py` over csrc/bpe.c: what the torch-free path
runs), "in place, Python" (the same rules in Python: the fallback where the kernels cannot be
built, and what the torch-free path ran before csrc/bpe.c) and "SentencePiece" (its
`SentencePieceProcessor` of the model built from the vocabulary: what the torch path runs).

Texts: the shipped evaluation texts and the guanaco sample (`gemmakit/data`), repeated until
SentencePiece counts ~30k tokens ("30k text"), and that text's first 512 tokens decoded back
("512 prompt"). Per text and backend: encode and decode, the median of `--runs` calls (the
Python backend: `--python-runs`), the backends one after another for each text; "stream" is
what a text stream pays a generated token: the decode of that token with the one before it
(`inference/text_stream.py` decodes the new token with its context), in microseconds per
token over the prompt's ids.

Then time to first use, each in `--fresh-runs` fresh processes (torch never imported): import,
parse the GGUF header, load the kernels library (plain `generate` loads it for its C step
before the tokenizer; none under `GEMMAKIT_NO_C_KERNELS`), build the tokenizer, encode "Hi",
with the resident memory the build added and the process's peak. Each backend's index (C's,
mapped; Python's, read with `GEMMAKIT_NO_C_KERNELS=1`) and SentencePiece's model proto come
from gemmakit's tokenizer cache, which a first untimed process fills. Prints tables (or `--json`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gemmakit

LONG_TOKENS = 30_000
PROMPT_TOKENS = 512
DATA = Path(__file__).resolve().parents[1] / "gemmakit" / "data"


def backends(metadata) -> dict[str, object]:
    from gemmakit.formats import sentencepiece_bpe
    from gemmakit.formats.tokenizer import Tokenizer

    native = sentencepiece_bpe.build(metadata)
    if not isinstance(native, sentencepiece_bpe.NativeSentencePieceBPE):
        sys.exit("the kernels library did not build: no C tokenizer to measure")
    return {
        "in place, C": native,
        "in place, Python": sentencepiece_bpe.build(metadata, native=False),
        "SentencePiece": Tokenizer.from_gguf_metadata(metadata, "bundled").backend,
    }


def texts(sentencepiece) -> dict[str, str]:
    """The 512-token prompt and the ~30k-token text."""
    documents = [(DATA / "eval_text.txt").read_text(), (DATA / "eval_text_wiki.txt").read_text()]
    with open(DATA / "guanaco_sample.jsonl") as f:
        documents += [json.loads(line)["text"] for line in f if line.strip()]
    long, count = "", 0
    while count < LONG_TOKENS:
        for document in documents:
            long += document + "\n\n"
            count += len(sentencepiece.encode_as_ids(document + "\n\n"))
            if count >= LONG_TOKENS:
                break
    prompt = sentencepiece.decode_ids(sentencepiece.encode_as_ids(long)[:PROMPT_TOKENS])
    return {"512 prompt": prompt, "30k text": long}


def median_seconds(call, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stream_seconds(backend, ids: list[int], runs: int) -> float:
    """Median seconds per token of decoding each token with the one before it."""

    def stream():
        for i in range(1, len(ids)):
            backend.decode_ids(ids[i - 1 : i + 1])

    return median_seconds(stream, runs) / (len(ids) - 1)


def measure(metadata, runs: int, python_runs: int) -> list[dict]:
    found = backends(metadata)
    sample = texts(found["SentencePiece"])
    rows = []
    for text_name, text in sample.items():
        ids = found["SentencePiece"].encode_as_ids(text)
        for name, backend in found.items():
            if backend.encode_as_ids(text) != ids or backend.decode_ids(ids) != found[
                "SentencePiece"
            ].decode_ids(ids):
                sys.exit(f"{name} does not give SentencePiece's ids or text on the {text_name}")
        for name, backend in found.items():  # one backend's rounds after another, interleaved per text
            n = python_runs if name == "in place, Python" else runs
            row = {"text": text_name, "backend": name, "tokens": len(ids), "chars": len(text)}
            row["encode_ms"] = median_seconds(lambda b=backend, t=text: b.encode_as_ids(t), n) * 1e3
            row["decode_ms"] = median_seconds(lambda b=backend, i=ids: b.decode_ids(i), n) * 1e3
            if text_name == "512 prompt":
                row["stream_us_per_token"] = stream_seconds(backend, ids, n) * 1e6
            rows.append(row)
    return rows


FIRST_USE = """
import sys, time
def status_mib(key):
    with open("/proc/self/status") as f:  # VmHWM: this process's own peak (ru_maxrss keeps the parent's)
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024
start = time.perf_counter()
from gemmakit.formats.gguf import GGUFFile
from gemmakit.formats.tokenizer import Tokenizer
from gemmakit.kernels import bpe
from gemmakit.model_source import resolve
imported = time.perf_counter()
g = GGUFFile(resolve(None).path)
header = time.perf_counter()
bpe.library()  # loaded before the tokenizer, as plain generate loads it for the C step
library, before = time.perf_counter(), status_mib("VmRSS:")
tok = Tokenizer.from_gguf_metadata(g.metadata, "bundled", in_place=sys.argv[1] == "in-place")
built, after = time.perf_counter(), status_mib("VmRSS:")
tok.encode("Hi")
done = time.perf_counter()
assert "torch" not in sys.modules
print(imported - start, header - imported, library - header, built - library, done - built, after - before,
      status_mib("VmHWM:"))
"""

FRESH = (
    ("in place, C", "in-place", {}),
    ("in place, Python", "in-place", {"GEMMAKIT_NO_C_KERNELS": "1"}),  # its index from the cache
    ("SentencePiece", "sentencepiece", {}),  # its model proto from the cache
)


def first_use(runs: int) -> list[dict]:
    """Median seconds of each step to a first encode in fresh processes, per tokenizer."""

    import gemmakit

    rows, root = [], Path(gemmakit.__file__).parents[1]  # the children import the same gemmakit
    for name, how, env in FRESH:
        command, env = [sys.executable, "-c", FIRST_USE, how], {**os.environ, **env}
        subprocess.run(command, check=True, capture_output=True, cwd=root, env=env)  # fills the caches
        samples = []
        for _ in range(runs):
            out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=root, env=env)
            samples.append([float(x) for x in out.stdout.split()])
        columns = [statistics.median(c) for c in zip(*samples)]
        keys = ("import_s", "header_s", "library_s", "tokenizer_s", "first_encode_s", "tokenizer_rss_mib",
                "peak_rss_mib")  # fmt: skip
        rows.append({"backend": name, **dict(zip(keys, columns))})
    return rows


def print_tables(rows: list[dict], fresh: list[dict]) -> None:
    print("| text | backend | encode ms | encode tok/s | decode ms | decode tok/s | stream us/token |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        stream = f"{r['stream_us_per_token']:.2f}" if "stream_us_per_token" in r else ""
        print(f"| {r['text']} ({r['tokens']:,} tokens) | {r['backend']} | {r['encode_ms']:.2f} | "
              f"{r['tokens'] / r['encode_ms'] * 1e3:,.0f} | {r['decode_ms']:.3f} | "
              f"{r['tokens'] / r['decode_ms'] * 1e3:,.0f} | {stream} |")  # fmt: skip
    by = {(r["text"], r["backend"]): r for r in rows}
    for text in dict.fromkeys(r["text"] for r in rows):
        c, sp = by[(text, "in place, C")], by[(text, "SentencePiece")]
        print(f"{text}: C / SentencePiece time: encode {c['encode_ms'] / sp['encode_ms']:.2f}x, "
              f"decode {c['decode_ms'] / sp['decode_ms']:.2f}x")  # fmt: skip
    print()
    print("| fresh process | import | GGUF header | kernels library | tokenizer | first encode | tokenizer RSS "
          "| peak RSS |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in fresh:
        print(f"| {r['backend']} | {r['import_s'] * 1e3:.1f} ms | {r['header_s'] * 1e3:.1f} ms | "
              f"{r['library_s'] * 1e3:.1f} ms | "
              f"{r['tokenizer_s'] * 1e3:.1f} ms | {r['first_encode_s'] * 1e3:.2f} ms | "
              f"{r['tokenizer_rss_mib']:.1f} MiB | {r['peak_rss_mib']:.1f} MiB |")  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="calls per measurement (median)")
    parser.add_argument(
        "--python-runs", type=int, default=3, help="calls per measurement of the Python backend"
    )
    parser.add_argument("--fresh-runs", type=int, default=5, help="fresh processes per time-to-first-use row")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    from gemmakit.formats.gguf import GGUFFile
    from gemmakit.model_source import resolve

    rows = measure(GGUFFile(resolve(None).path).metadata, args.runs, args.python_runs)
    fresh = first_use(args.fresh_runs)
    if args.json:
        print(json.dumps({"rows": rows, "first_use": fresh}, indent=2))
    else:
        print_tables(rows, fresh)


if __name__ == "__main__":
    main()

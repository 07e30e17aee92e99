"""Quantization quality and decode speed on the bundled Gemma 3 270M.

    .venv/bin/python benchmarks/quant_quality.py            # table + timings -> quant_quality.json
    .venv/bin/python benchmarks/quant_quality.py --timings  # decode timings only
    .venv/bin/python benchmarks/quant_quality.py --quality --types gguf-q4_k_m,gguf-q3_k_m  # rows only

The quality table is `gemmakit quantize`'s (size, perplexity on gemmakit/data/eval_text.txt),
by default for its default types: the in-memory formats and the GGUF mixes from F16 to Q3_K_M,
K-quants included (written with llama-quantize's types and bytes, read back dequantized).
The decode timing is the wall time of one KV-cached decode step (batch 1, 32 tokens of
context) for each in-memory format, measured in interleaved rounds (min and median of 30
steps each). The machine running it is often shared: the JSON records the load average next
to the numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent


class Decoder:
    """One KV-cached decode step at a time, batch 1, after a 32-token prompt."""

    def __init__(self, model, context: int = 32, steps: int = 64):
        self.model, self.token = model, torch.tensor([[1234]])
        self.cache = model.make_cache(1, context + steps)
        with torch.inference_mode():
            model(torch.arange(1000, 1000 + context)[None], cache=self.cache)

    @torch.inference_mode()
    def step_ms(self) -> float:
        start = time.perf_counter()
        self.model(self.token, cache=self.cache)
        return (time.perf_counter() - start) * 1e3


def timings(loaded, rounds: int = 6, steps: int = 5) -> list[dict]:
    """Decode-step times of each format, measured in interleaved rounds.

    On a shared machine the load changes from second to second; interleaving the formats
    spreads that noise over all of them, and the minimum over steps is the least disturbed
    estimate of each format's own cost (the median is reported too).
    """
    from gemmakit.quant import model_memory, quantize_model

    variants = [("fp32", None, None), ("bf16", None, None), ("nf4", "nf4", None),
                ("int8-linear", "int8", False), ("int8", "int8", None),
                ("int4-linear", "int4", False), ("int4", "int4", None), ("int4-all", "int4", True)]  # fmt: skip
    decoders, sizes = {}, {}
    for name, kind, embeddings in variants:
        model = copy.deepcopy(loaded.model)
        if name == "bf16":
            model = model.to(torch.bfloat16)
        elif kind:
            quantize_model(model, kind, embeddings=embeddings)
        decoders[name], sizes[name] = Decoder(model, steps=rounds * steps + 2), model_memory(model)
        decoders[name].step_ms()  # warm-up
    samples = {name: [] for name in decoders}
    for _ in range(rounds):
        for name, decoder in decoders.items():
            samples[name] += [decoder.step_ms() for _ in range(steps)]
    rows = []
    for name, times in samples.items():
        row = {"type": name, "decode_step_ms_min": round(min(times), 1),
               "decode_step_ms_median": round(statistics.median(times), 1), "bytes": sizes[name]}  # fmt: skip
        rows.append(row)
        print(f"{name:<12} decode step min {row['decode_step_ms_min']:7.1f} ms  median "
              f"{row['decode_step_ms_median']:7.1f} ms   {sizes[name] / 1e6:8.1f} MB", flush=True)  # fmt: skip
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timings", action="store_true", help="only the decode timings (updates the JSON)")
    p.add_argument("--quality", action="store_true", help="only the quality table (updates the JSON)")
    p.add_argument(
        "--types",
        default=None,
        help="comma-separated types of the quality table (default: gemmakit quantize's)",
    )
    p.add_argument("--out", default=str(HERE / "quant_quality.json"))
    args = p.parse_args()

    from gemmakit.commands.quantize import DEFAULT_TYPES, format_table, parse_types, quality_table
    from gemmakit.evaluation.verify import DEFAULT_TEXT
    from gemmakit.loading import load

    loaded = load(dtype="float32", device="cpu")
    out = Path(args.out)
    partial = args.timings or args.quality
    result = json.loads(out.read_text()) if partial and out.exists() else {}
    result |= {
        "model": str(loaded.source.path),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_before": os.getloadavg(),
    }
    if not args.quality:
        result["decode"] = timings(loaded)
    if not args.timings:
        types = parse_types(args.types) if args.types else DEFAULT_TYPES
        table = quality_table(loaded, DEFAULT_TEXT.read_text(), types)
        print(format_table(table))
        result["quality"] = table
    result["load_average_after"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

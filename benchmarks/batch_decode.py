"""Decode speed of the batched C step at 1..32 rows against the single-row C step and the
torch batched step, on the bundled Gemma 3 270M (float32 dequantized, bfloat16, int8, or
`gguf`: the file's own block types, multiplied with 8-bit activation blocks).

    python benchmarks/batch_decode.py [--rows 1,2,4,8,16,32] [--weights float32,bfloat16,int8]
        [--context 64] [--steps 8] [--threads N] [--no-torch] [--tiny] [--json]

Each row decodes one token per step in its own slot at position `--context` and on (a
serving engine's steady state: every row mid-sequence). Speed does not depend on what the
cache holds, so the slots stay zeros and no prefill runs for the batched step. "GB/s" is
the weight bytes one step reads (every matrix once, the tied output head included) times
steps per second: the memory bandwidth the step achieves, the figure a decode step on a CPU
is bound by. "x 1 row" is the step's tokens/s over the single-row C step's; the torch
column runs the model's own batched forward on a KVCache of `rows` sequences.
`--tiny`: a random 4-layer model with a small vocabulary (a smoke run of this script).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from gemmakit.config import FULL, PRESETS
from gemmakit.inference import c_decode
from gemmakit.model.families import model_class
from gemmakit.quant import quantize_model

# the slack a slot cache's sliding rings keep beyond the window (model/slot_cache.py)
RING_SLACK = 16


def load_model(weights: str, tiny: bool) -> nn.Module:
    """The bundled model (or a tiny random one) with float32, bfloat16 or int8 weights, or
    (gguf) the bundled file's own block types."""
    if weights == "gguf":
        from gemmakit.loading import load

        return load(device="cpu").model
    if tiny:
        config = PRESETS["gemma-3-270m"]
        config = config.replace(vocab_size=4096, num_hidden_layers=4, layer_types=config.layer_types[:4])
        torch.manual_seed(0)
        model = model_class(config)(config).eval()
    else:
        from gemmakit.loading import load

        model = load(dtype="float32", device="cpu").model
    if weights == "int8":
        quantize_model(model, "int8")
    elif weights == "bfloat16":
        model.to(torch.bfloat16)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every matrix a step reads in full: the blocks' projections and the output head."""
    modules = [*model.model.layers.modules(), model.lm_head]
    total = 0
    for module in modules:
        for name in ("weight", "weight_scale"):
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor) and (name != "weight" or t.dim() == 2):
                total += t.numel() * t.element_size()
    return total


def slot_cache(model, slots: int, capacity: int):
    c = model.config
    kv = []
    for kind in c.layer_types:
        cap = capacity if kind == FULL else min(capacity, c.sliding_window + RING_SLACK)
        shape = (slots, c.num_key_value_heads, cap, c.head_dim)
        kv.append((torch.zeros(shape, dtype=model.dtype), torch.zeros(shape, dtype=model.dtype)))
    return kv


def batched_c_seconds(model, rows: int, context: int, steps: int) -> float:
    """Seconds per step of the batched C step, rows at positions context, context + 1, ..."""
    decoder = c_decode.batch_decoder(model, slot_cache(model, rows, context + steps + 1))
    if decoder is None:
        raise SystemExit("the batched C step does not run this model")
    tokens, slots = [5 + r for r in range(rows)], list(range(rows))
    decoder.step(tokens, slots, [context] * rows)  # warm-up: the pool's threads, the buffers
    start = time.perf_counter()
    for i in range(steps):
        decoder.step(tokens, slots, [context + 1 + i] * rows)
    return (time.perf_counter() - start) / steps


def single_c_seconds(model, context: int, steps: int) -> float:
    """Seconds per step of the single-row C step after a torch prefill of `context` tokens."""
    cache = model.make_cache(1, context + steps + 2)
    decoder = c_decode.decoder(model, cache, batch=1)
    model(torch.full((1, context), 5), cache=cache)
    decoder.step(6)
    start = time.perf_counter()
    for i in range(steps):
        decoder.step(7 + i)
    return (time.perf_counter() - start) / steps


def torch_seconds(model, rows: int, context: int, steps: int) -> float:
    """Seconds per step of the torch model's batched decode step over a KVCache of `rows`."""
    cache = model.make_cache(rows, context + steps + 2)
    model(torch.full((rows, context), 5), cache=cache)
    model(torch.full((rows, 1), 6), cache=cache)
    start = time.perf_counter()
    for i in range(steps):
        model(torch.full((rows, 1), 7 + i), cache=cache)
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32", help="row counts, comma-separated")
    parser.add_argument("--weights", default="float32,bfloat16,int8", help="float32, bfloat16, int8, gguf")
    parser.add_argument("--context", type=int, default=64, help="position of every row's first timed step")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch and C step threads")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch batched step")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model: a smoke run")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    row_counts = [int(r) for r in args.rows.split(",")]
    results = []
    for weights in args.weights.split(","):
        model = load_model(weights, args.tiny)  # outside inference mode: its tensors stay ordinary
        gb = weight_bytes(model) / 1e9
        with torch.inference_mode():
            single = single_c_seconds(model, args.context, args.steps)
            for rows in row_counts:
                step = batched_c_seconds(model, rows, args.context, args.steps)
                torch_step = None if args.no_torch else torch_seconds(model, rows, args.context, args.steps)
                results.append(
                    dict(
                        weights=weights,
                        rows=rows,
                        step_ms=step * 1e3,
                        tokens_per_s=rows / step,
                        vs_single_row=rows / step * single,
                        gb_per_s=gb / step,
                        single_row_ms=single * 1e3,
                        torch_tokens_per_s=None if torch_step is None else rows / torch_step,
                    )  # fmt: skip
                )
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"threads {torch.get_num_threads()}, context {args.context}, {args.steps} steps each")
    header = f"{'weights':>9} {'rows':>4} {'ms/step':>8} {'tok/s':>8} {'x 1 row':>8} {'GB/s':>6} {'torch tok/s':>11}"
    print(header)
    for r in results:
        torch_col = "-" if r["torch_tokens_per_s"] is None else f"{r['torch_tokens_per_s']:.1f}"
        print(
            f"{r['weights']:>9} {r['rows']:>4} {r['step_ms']:>8.2f} {r['tokens_per_s']:>8.1f} "
            f"{r['vs_single_row']:>8.2f} {r['gb_per_s']:>6.1f} {torch_col:>11}"
        )
    for weights in dict.fromkeys(r["weights"] for r in results):
        single = next(r["single_row_ms"] for r in results if r["weights"] == weights)
        print(f"single-row C step, {weights}: {single:.2f} ms/step, {1e3 / single:.1f} tok/s")


if __name__ == "__main__":
    main()

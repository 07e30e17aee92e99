"""Batch-1 greedy decode speed of a Gemma-4-shaped model (torch step) against the same shapes
as Gemma 3 (C step, and torch step for reference), float32, random weights, on the CPU.

    python benchmarks/family_decode.py [--tokens 32] [--prompt 32] [--rounds 3] [--threads N] [--tiny]

Both models have the Gemma 3 270M's shapes (hidden 640, 18 layers, 4 heads, 1 KV head,
head_dim 256, MLP 2048, vocab 262144, 5 sliding : 1 full, window 512); the Gemma 4 one adds
what Gemma 4 computes on those shapes (norm gains w, v_norm, attention scale 1.0, proportional
RoPE on global layers, layer scalars), with PLE, KV sharing, K = V and experts off. Random
weights change nothing about speed. "read/token" counts the parameters a decode step reads
(every matrix, the tied head included; one embedding row), and GB/s is that many float32
bytes times tokens/s: the memory bandwidth the step achieves, the figure a decode step on a
CPU is bound by. The last column compares it with the Gemma 3 C step's.
"""

from __future__ import annotations

import argparse
import time

import torch

from gemmakit.config import PRESETS
from gemmakit.inference import c_decode, engine
from gemmakit.inference.sampling import SamplingParams
from gemmakit.model.families import model_class


def gemma3_config(tiny: bool):
    config = PRESETS["gemma-3-270m"]
    if tiny:
        config = config.replace(vocab_size=512, num_hidden_layers=6, layer_types=config.layer_types[:6])
    return config


def gemma4_config(tiny: bool):
    # What Gemma 4 computes on the same shapes (hf_config's Gemma4ForCausalLM behaviours).
    return gemma3_config(tiny).replace(
        model_type="gemma4_text", architecture="Gemma4ForCausalLM", norm_unit_offset=False,
        fixed_attention_scale=1.0, use_v_norm=True, use_layer_scalar=True, rope_partial_rotary_factor=0.25,
    )  # fmt: skip


def params_read_per_token(model) -> int:
    """Parameters a decode step reads: every matrix, plus one row of each embedding table."""
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            total += p.shape[1]  # one row; the tied head's read is counted as lm_head below
        else:
            total += p.numel()
    if model.config.tie_word_embeddings:
        total += model.lm_head.weight.numel()
    return total


def decode_tokens_per_second(model, prompt_len: int, tokens: int, c_step: bool) -> float:
    prompt = torch.randint(
        3, model.config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)
    )
    request = engine.Request(
        prompt.tolist(), SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
    )
    original = c_decode.decoder
    if not c_step:
        c_decode.decoder = lambda *args: None
    try:
        steps = engine.generate_steps(model, [request])
        next(steps)  # the prefill and the first token
        start = time.perf_counter()
        n = sum(1 for _ in steps)
        return n / (time.perf_counter() - start)
    finally:
        c_decode.decoder = original


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument(
        "--rounds", type=int, default=3, help="rows measured in turn this often; the best is kept"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="6 layers, vocab 512: checks the script runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {}
    for family, config in (("gemma3", gemma3_config(args.tiny)), ("gemma4", gemma4_config(args.tiny))):
        models[family] = model_class(config)(config).eval()
        with torch.no_grad():
            for b in models[family].buffers():  # layer scalars: random too
                b.uniform_(0.5, 1.5)
    rows = [
        ("Gemma 3 shapes, C step", "gemma3", True),
        ("Gemma 3 shapes, torch step", "gemma3", False),
        ("Gemma 4 (same shapes), torch step", "gemma4", True),
    ]
    best = [0.0] * len(rows)
    # The rows take turns, best of --rounds: on a shared machine the load changes between runs.
    for _ in range(args.rounds):
        for i, (_, family, c_step) in enumerate(rows):
            decode_tokens_per_second(models[family], args.prompt, 2, c_step)  # warm-up
            best[i] = max(best[i], decode_tokens_per_second(models[family], args.prompt, args.tokens, c_step))
    print(
        f"threads {torch.get_num_threads()}, prompt {args.prompt}, {args.tokens} tokens, best of {args.rounds}, float32"
    )
    print(f"{'model':36} {'step':6} {'tok/s':>8} {'read/token':>12} {'GB/s':>7} {'vs C':>6}")
    base = None
    for (label, family, c_step), tps in zip(rows, best):
        model = models[family]
        with torch.inference_mode():
            runs_c = c_step and c_decode.decoder(model, model.make_cache(1, 8), 1) is not None
        read = params_read_per_token(model)
        gbs = read * 4 * tps / 1e9
        base = base or gbs
        print(
            f"{label:36} {'C' if runs_c else 'torch':6} {tps:8.1f} {read / 1e6:10.1f} M {gbs:7.2f} {gbs / base:6.2f}"
        )


if __name__ == "__main__":
    main()

"""Speculative decoding benchmark: tokens/s plain vs n-gram (vs a draft model) on the bundled model.

    .venv/bin/python benchmarks/speculative.py [--tokens 128] [--runs 3] [--num-speculative 8]
        [--draft-model M | --draft-bf16] [--only copy|free] [--json out.json]

Prompts where copying pays (repeat a passage, fix one word in a paragraph, rename a variable in
code) and where it does not (free writing), each in Gemma's chat template; greedy decoding, so
every mode must give the same tokens (checked, printed as `same`). Modes take turns run by run
(a slow minute on a shared machine hits them alike); the table gives median decode tokens/s
(tokens after the first / time from the first token to the last: prefill and load excluded), the speed-up over plain,
the acceptance rate and tokens per model step. A draft comes from `--draft-model M` (a
smaller model with the same tokenizer) or `--draft-bf16` (the bundled model in bfloat16
drafting for its float32 self: high acceptance, but no cheaper per token, so it shows the
mechanism, not a speed-up). Targets (issue 20): >= 2x on copy-heavy prompts with ngram,
>= 0.9x on free writing.

    .venv/bin/python benchmarks/speculative.py --mtp-target DIR --mtp-assistant DIR [--tokens N]
    .venv/bin/python benchmarks/speculative.py --mtp-tiny

MTP mode: a Gemma 4 target and its assistant (`gemma4_assistant`, the MTP drafter) in plain,
ngram and mtp decoding, the same table. `--mtp-tiny` builds a tiny random pair (transformers'
classes, random weights): its drafter proposes noise, so it shows the mode runs and gives
plain greedy's tokens, not a speed-up; real speed needs the released checkpoints.
"""

from __future__ import annotations

import argparse
import json
import statistics

PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the "
    "wick, polished the great lens until it gleamed, and wrote the weather in a leather "
    "logbook: wind from the west, a swell of two metres, fog expected before midnight. Ships "
    "passing the point blinked their lamps in greeting, and he blinked back, three long "
    "flashes, as his father had done before him."
)
CODE = """def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax


def cheapest(items):
    best = None
    for item in items:
        if best is None or item.price < best.price:
            best = item
    return best
"""
PROMPTS = {
    "copy: repeat a passage": ("copy", f"Repeat this passage exactly, word for word:\n\n{PASSAGE}"),
    "copy: fix one word": (
        "copy",
        "Rewrite this paragraph with 'evening' replaced by 'night', changing nothing else:\n\n" + PASSAGE,
    ),
    "copy: rename in code": (
        "copy",
        f"Rename the variable `items` to `products` in this Python code and print the whole code:\n\n{CODE}",
    ),
    "free: story": ("free", "Write a short story about a dragon who is afraid of the dark."),
    "free: explain": ("free", "Explain why the sky is blue to a ten-year-old."),
}


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))


def run_once(llm, ids, tokens, mode, k):
    from gemmakit import SamplingParams

    params = SamplingParams(
        temperature=0, max_tokens=tokens, ignore_eos=True, speculative=mode, num_speculative_tokens=k
    )
    out = llm.generate([ids], params)[0]
    # decode only: from the first token (the prefill's) to the last
    seconds = out.metrics["generation_seconds"] - out.metrics["time_to_first_token"]
    return out.outputs[0].token_ids, seconds, out.metrics.get("speculation")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128, help="greedy tokens per generation (128)")
    p.add_argument("--runs", type=int, default=3, help="runs per prompt and mode; the median is reported (3)")
    p.add_argument("--num-speculative", type=int, default=8, help="tokens proposed per step at most (8)")
    p.add_argument("--draft-model", default=None, help="a draft model with the bundled model's tokenizer")
    p.add_argument("--draft-bf16", action="store_true", help="draft with the bundled model in bfloat16")
    p.add_argument("--dtype", default="float32",
                   help="the target's weights: float32 (default), or auto (the GGUF's own block types)")  # fmt: skip
    p.add_argument("--only", choices=["copy", "free"], default=None, help="run one kind of prompt")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--mtp-target", default=None, help="MTP mode: a Gemma 4 model folder")
    p.add_argument("--mtp-assistant", default=None, help="MTP mode: its gemma4_assistant folder")
    p.add_argument("--mtp-tiny", action="store_true", help="MTP mode on a tiny random pair (shows it runs)")
    args = p.parse_args()
    if args.mtp_tiny or args.mtp_target:
        return mtp_main(args)

    from gemmakit import LLM
    from gemmakit.loading import load

    llm = LLM(dtype=args.dtype, device="cpu", draft_model=args.draft_model)
    if args.draft_bf16:
        llm.draft = load(dtype="bfloat16", device="cpu")
    modes = [None, "ngram"] + (["draft"] if llm.draft is not None else [])
    prompts = {name: (kind, chat_ids(llm.tokenizer, text)) for name, (kind, text) in PROMPTS.items()}
    prompts = {n: v for n, v in prompts.items() if args.only in (None, v[0])}
    run_once(llm, prompts[next(iter(prompts))][1], 8, None, args.num_speculative)  # warm-up
    results = []
    for name, (kind, ids) in prompts.items():
        times = {m: [] for m in modes}
        outputs, stats = {}, {}
        for _ in range(args.runs):
            for mode in modes:
                out, seconds, spec = run_once(llm, ids, args.tokens, mode, args.num_speculative)
                times[mode].append(seconds)
                outputs[mode], stats[mode] = out, spec
        decoded = args.tokens - 1  # tokens after the prefill's
        plain = decoded / statistics.median(times[None])
        for mode in modes:
            rate = decoded / statistics.median(times[mode])
            spec = stats[mode] or {}
            row = {
                "prompt": name, "kind": kind, "prompt_tokens": len(ids), "mode": mode or "plain",
                "tokens_per_second": round(rate, 2), "speedup": round(rate / plain, 3),
                "acceptance_rate": spec.get("acceptance_rate"), "tokens_per_step": spec.get("tokens_per_step"),
                "same": outputs[mode] == outputs[None],
            }  # fmt: skip
            results.append(row)
            print(
                f"{name:24} {row['mode']:6} {rate:7.2f} tok/s  x{row['speedup']:.2f}  "
                f"accepted {_pct(row['acceptance_rate']):>5}  tokens/step {_num(row['tokens_per_step']):>5}  "
                f"same {row['same']}",
                flush=True,
            )
    for kind in ("copy", "free"):
        for mode in modes[1:]:
            rows = [r for r in results if r["kind"] == kind and r["mode"] == mode]
            if rows:
                speedup = statistics.geometric_mean(r["speedup"] for r in rows)
                print(f"{kind} prompts, {mode}: geometric-mean speed-up x{speedup:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "runs": args.runs, "results": results}, f, indent=2)


def mtp_main(args):
    """plain / ngram / mtp on a Gemma 4 target and its assistant (see the module docstring)."""
    import time

    import torch

    from gemmakit.inference import engine, speculative
    from gemmakit.inference.sampling import SamplingParams

    if args.mtp_tiny:
        target, assistant = tiny_mtp_pair()
        g = torch.Generator().manual_seed(0)
        prompts = {}
        for n in (5, 9):
            block = torch.randint(3, target.config.vocab_size, (n,), generator=g).tolist()
            prompts[f"copy: {n}-token block x4"] = ("copy", block * 4)
        prompts["free: random 24 tokens"] = (
            "free",
            torch.randint(3, target.config.vocab_size, (24,), generator=g).tolist(),
        )
    else:
        from gemmakit import LLM

        llm = LLM(args.mtp_target, dtype="float32", device="cpu", draft_model=args.mtp_assistant)
        target, assistant = llm.model, llm.assistant
        prompts = {name: (kind, chat_ids(llm.tokenizer, text)) for name, (kind, text) in PROMPTS.items()}

    def once(ids, mode):
        params = SamplingParams(
            temperature=0, max_tokens=args.tokens, ignore_eos=True, speculative=mode,
            num_speculative_tokens=args.num_speculative,
        )  # fmt: skip
        request = engine.Request(ids, params)
        steps = (
            speculative.generate_steps(target, [request], assistant)
            if mode
            else engine.generate_steps(target, [request])
        )
        first = None
        for _ in steps:
            first = first or time.perf_counter()
        seconds = time.perf_counter() - first
        return request.output_ids, seconds, request.speculation.as_dict() if request.speculation else None

    modes = [None, "ngram", "mtp"]
    for name, (_kind, ids) in prompts.items():
        times, outputs, stats = {m: [] for m in modes}, {}, {}
        for _ in range(args.runs):
            for mode in modes:
                outputs[mode], seconds, stats[mode] = once(ids, mode)
                times[mode].append(seconds)
        plain = (args.tokens - 1) / statistics.median(times[None])
        for mode in modes:
            rate, spec = (args.tokens - 1) / statistics.median(times[mode]), stats[mode] or {}
            print(
                f"{name:24} {mode or 'plain':6} {rate:7.2f} tok/s  x{rate / plain:.2f}  "
                f"accepted {_pct(spec.get('acceptance_rate')):>5}  tokens/step {_num(spec.get('tokens_per_step')):>5}  "
                f"same {outputs[mode] == outputs[None]}",
                flush=True,
            )


def tiny_mtp_pair():
    """A tiny random Gemma 4 target (KV sharing, K = V on global layers) and a tiny random
    assistant made for it, built by transformers and loaded through gemmakit's HF loaders."""
    import tempfile
    from pathlib import Path

    import torch
    import transformers

    from gemmakit.loading import ModelSource, load_assistant, load_model

    s, f = "sliding_attention", "full_attention"
    rope = {
        s: {"rope_type": "default", "rope_theta": 10_000.0},
        f: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }
    shared = dict(
        vocab_size=512, num_attention_heads=4, head_dim=32, num_key_value_heads=2, sliding_window=16,
        rope_parameters=rope, global_head_dim=64, num_global_key_value_heads=1, attention_k_eq_v=True,
        max_position_embeddings=1024, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
    )  # fmt: skip
    torch.manual_seed(0)
    target = transformers.Gemma4ForCausalLM(
        transformers.Gemma4TextConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=6,
            layer_types=[s, s, f, s, s, f],
            num_kv_shared_layers=2,
            **shared,
        )  # fmt: skip
    )
    text = transformers.Gemma4TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, layer_types=[s, f], **shared
    )
    assistant = transformers.Gemma4AssistantForCausalLM(
        transformers.Gemma4AssistantConfig(text_config=text, backbone_hidden_size=128)
    )
    folder = Path(tempfile.mkdtemp(prefix="gemmakit-mtp-"))
    target.save_pretrained(folder / "target")
    assistant.save_pretrained(folder / "assistant")
    return load_model(ModelSource("hf", folder / "target", "tiny-gemma4")), load_assistant(
        folder / "assistant"
    )


def _pct(x):
    return "-" if x is None else f"{x:.0%}"


def _num(x):
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()

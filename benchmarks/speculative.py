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
    p.add_argument("--only", choices=["copy", "free"], default=None, help="run one kind of prompt")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()

    from gemmakit import LLM
    from gemmakit.loading import load

    llm = LLM(dtype="float32", device="cpu", draft_model=args.draft_model)
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


def _pct(x):
    return "-" if x is None else f"{x:.0%}"


def _num(x):
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()

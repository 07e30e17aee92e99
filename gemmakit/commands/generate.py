"""`gemmakit generate`: text for one or more prompts, with load and generation timings."""

from __future__ import annotations

import sys
import time

from gemmakit.commands.common import add_model_arguments, load_llm, print_json


def add_arguments(p):
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text(s); several run as a batch")
    add_model_arguments(p)
    s = p.add_argument_group("sampling (vLLM SamplingParams semantics)")
    s.add_argument("--max-new-tokens", type=int, default=150, help="tokens to generate at most (150)")
    s.add_argument("--temperature", type=float, default=0.7, help="0 means greedy (0.7)")
    s.add_argument("--top-p", type=float, default=0.8, help="nucleus sampling mass (0.8)")
    s.add_argument("--top-k", type=int, default=20, help="sample among the k likeliest; 0 disables (20)")
    s.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    s.add_argument("--greedy", action="store_true", help="always take the likeliest token")
    s.add_argument("--stop", action="append", default=None, help="stop before this string (repeatable)")
    s.add_argument("--chat", action="store_true", help="wrap each prompt in Gemma's chat template")
    d = p.add_argument_group("speculative decoding (same output distribution, fewer model steps)")
    d.add_argument(
        "--speculative", choices=["ngram", "draft", "mtp"], default=None,
        help="ngram: propose tokens copied from the prompt and the text so far (prompt lookup); "
        "draft: propose with --draft-model, a smaller model; mtp: propose with --draft-model, "
        "a Gemma 4 assistant (the MTP drafter made for this Gemma 4 model), from the model's "
        "own hidden state and keys",
    )  # fmt: skip
    d.add_argument(
        "--draft-model", default=None, metavar="M",
        help="for --speculative draft: a smaller model with the same tokenizer (folder, .gguf); "
        "for --speculative mtp: a gemma4_assistant folder (config.json + safetensors)",
    )  # fmt: skip
    d.add_argument(
        "--num-speculative", type=int, default=8, metavar="K",
        help="tokens proposed per step at most, 1 to 16 (8); fewer when proposals fail",
    )  # fmt: skip
    o = p.add_argument_group("output")
    o.add_argument("--stream", action="store_true", help="print text as it is generated")
    o.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args) -> int:
    from gemmakit import SamplingParams
    from gemmakit.errors import GemmakitError

    if args.speculative == "draft" and not args.draft_model:
        raise GemmakitError("--speculative draft needs --draft-model M (a model with the same tokenizer)")
    if args.speculative == "mtp" and not args.draft_model:
        raise GemmakitError("--speculative mtp needs --draft-model DIR (a Gemma 4 assistant folder)")
    if args.draft_model and args.speculative not in ("draft", "mtp"):
        raise GemmakitError("--draft-model is used by --speculative draft or mtp only")
    params = SamplingParams(
        temperature=0.0 if args.greedy else args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, max_tokens=args.max_new_tokens, stop=args.stop,
        speculative=args.speculative, num_speculative_tokens=args.num_speculative,
    )  # fmt: skip
    llm = load_llm(args)
    if llm.memory:  # MB = 1e6 bytes, as model sizes are usually quoted
        before, after = (round(llm.memory[k] / 1e6) for k in ("before", "after"))
        print(f"quantized ({args.quantize}): {before} MB -> {after} MB", file=sys.stderr)
    tok = llm.tokenizer
    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) if args.chat else p
        for p in args.prompts
    ]
    start = time.perf_counter()
    if args.stream and not args.json:
        outputs = []
        for prompt in prompts:
            for event in llm.stream([prompt], params):
                sys.stdout.write(event.delta)
                sys.stdout.flush()
            sys.stdout.write("\n\n")
    else:
        outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs) if outputs else None
    if args.json:
        report = {
            "model": str(llm.loaded.source.path),
            "load_seconds": round(llm.loaded.load_seconds, 4),
            "generation_seconds": round(seconds, 4),
            "tokens_per_second": round(generated / seconds, 2),
            "outputs": [
                {
                    "prompt": p,
                    "text": o.outputs[0].text,
                    "token_ids": o.outputs[0].token_ids,
                    "finish_reason": o.outputs[0].finish_reason,
                }  # fmt: skip
                | ({"speculation": o.metrics["speculation"]} if "speculation" in o.metrics else {})
                for p, o in zip(args.prompts, outputs)
            ],
        }
        if args.speculative:
            report["speculation"] = _total_speculation([o.metrics.get("speculation") for o in outputs])
        if llm.memory:
            report["memory"] = {"before_bytes": llm.memory["before"], "after_bytes": llm.memory["after"]}
        print_json(report)
        return 0
    for p, o in zip(args.prompts, outputs):
        if len(outputs) > 1:
            print(f"--- {p!r}")
        print(p + o.outputs[0].text if not args.chat else o.outputs[0].text)
        print()
    rate = f", {generated / seconds:.1f} tokens/s ({generated} tokens)" if generated else ""
    if args.speculative and outputs:
        total = _total_speculation([o.metrics.get("speculation") for o in outputs])
        rate += (
            f" | speculative {args.speculative}: {total['acceptance_rate']:.0%} of proposals accepted, "
            f"{total['tokens_per_step']:.2f} tokens per step"
        )
    print(
        f"Loading time: {llm.loaded.load_seconds:.2f} s | generation time: {seconds:.2f} s{rate}",
        file=sys.stderr,
    )
    return 0


def _total_speculation(per_output: list[dict | None]) -> dict:
    """The speculation counts of all outputs summed, with the overall rates."""
    from gemmakit.inference.engine import SpeculationStats

    keys = ("steps", "proposed", "accepted", "generated")
    return SpeculationStats(**{k: sum(s[k] for s in per_output if s) for k in keys}).as_dict()

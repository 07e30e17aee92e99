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
    from gemmakit.errors import GemmakitError
    from gemmakit.inference.sampling_params import SamplingParams

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
    lean = _lean_model(args)
    if lean is not None:
        return _run_lean(args, params, lean)
    return _run_torch(args, params)


def lean_applies(args) -> bool:
    """Whether the arguments let `generate` run without torch (`inference/lean.py`), decided
    before anything heavy is imported: the model's own types (no --dtype, --quantize,
    adapter or speculation) on the CPU (named, or the default on a machine without a GPU).
    Its tokens are the torch path's, sampled ones included (one sampler, inference/sampler.py)."""
    import os

    if os.environ.get("GEMMAKIT_TORCH_GENERATE"):
        return False
    if args.dtype != "auto" or args.quantize or args.adapter or args.speculative or args.draft_model:
        return False
    if args.device not in (None, "cpu") or args.device is None and _gpu_present():
        return False
    return True


def _gpu_present() -> bool:
    """Whether a GPU's device files exist (NVIDIA's or ROCm's): torch would then default to
    CUDA, which only importing torch can tell for sure."""
    from pathlib import Path

    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd"))


def _lean_model(args):
    """The torch-free path's model, or None where the torch path runs."""
    if not lean_applies(args):
        return None
    from gemmakit.inference import lean

    return lean.load(args.model)


def _run_lean(args, params, model) -> int:
    from gemmakit.inference import lean, sampler

    tok = model.tokenizer
    seeds = sampler.generator(0)  # as the torch path's LLM(seed=0) seeds its requests
    prompts = _prompts(args, tok)
    start = time.perf_counter()
    outputs = []
    for prompt in prompts:
        ids = prompt if isinstance(prompt, list) else tok.encode(prompt)
        completion = lean.Completion()
        for event in lean.stream(model, ids, params, completion, seeds):
            if args.stream and not args.json:
                sys.stdout.write(event.delta)
                sys.stdout.flush()
        if args.stream and not args.json:
            sys.stdout.write("\n\n")
        outputs.append(completion)
    seconds = time.perf_counter() - start
    streamed = args.stream and not args.json
    _report(args, str(model.source.path), model.load_seconds, seconds, [] if streamed else outputs, {})
    return 0


def _prompts(args, tok) -> list:
    """The prompts as generation takes them: with --chat, the chat template's token ids
    (encoded before the timed part), else the text itself (encoded within it)."""
    if not args.chat:
        return list(args.prompts)
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in args.prompts]


def _run_torch(args, params) -> int:
    llm = load_llm(args)
    if llm.memory:  # MB = 1e6 bytes, as model sizes are usually quoted
        before, after = (round(llm.memory[k] / 1e6) for k in ("before", "after"))
        print(f"quantized ({args.quantize}): {before} MB -> {after} MB", file=sys.stderr)
    prompts = _prompts(args, llm.tokenizer)
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
    extra = {}
    if args.speculative and outputs:
        extra["speculation"] = [o.metrics.get("speculation") for o in outputs]
    if llm.memory:
        extra["memory"] = {"before_bytes": llm.memory["before"], "after_bytes": llm.memory["after"]}
    completions = [o.outputs[0] for o in outputs]
    _report(args, str(llm.loaded.source.path), llm.loaded.load_seconds, seconds, completions, extra)
    return 0


def _report(
    args, model_path: str, load_seconds: float, seconds: float, completions: list, extra: dict
) -> None:
    """Prints the completions (objects with text, token_ids and finish_reason; none after
    --stream) as text or --json, and the timings, the same whichever path generated them."""
    generated = sum(len(c.token_ids) for c in completions) if completions else None
    speculation = extra.get("speculation")
    if args.json:
        report = {
            "model": model_path,
            "load_seconds": round(load_seconds, 4),
            "generation_seconds": round(seconds, 4),
            "tokens_per_second": round(generated / seconds, 2),
            "outputs": [
                {"prompt": p, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
                | ({"speculation": speculation[i]} if speculation and speculation[i] is not None else {})
                for i, (p, c) in enumerate(zip(args.prompts, completions))
            ],
        }
        if args.speculative:
            report["speculation"] = _total_speculation(speculation or [])
        if "memory" in extra:
            report["memory"] = extra["memory"]
        print_json(report)
        return
    for p, c in zip(args.prompts, completions):
        if len(completions) > 1:
            print(f"--- {p!r}")
        print(p + c.text if not args.chat else c.text)
        print()
    rate = f", {generated / seconds:.1f} tokens/s ({generated} tokens)" if generated else ""
    if args.speculative and completions:
        total = _total_speculation(speculation)
        rate += (
            f" | speculative {args.speculative}: {total['acceptance_rate']:.0%} of proposals accepted, "
            f"{total['tokens_per_step']:.2f} tokens per step"
        )
    print(f"Loading time: {load_seconds:.2f} s | generation time: {seconds:.2f} s{rate}", file=sys.stderr)


def _total_speculation(per_output: list[dict | None]) -> dict:
    """The speculation counts of all outputs summed, with the overall rates."""
    from gemmakit.inference.engine import SpeculationStats

    keys = ("steps", "proposed", "accepted", "generated")
    return SpeculationStats(**{k: sum(s[k] for s in per_output if s) for k in keys}).as_dict()

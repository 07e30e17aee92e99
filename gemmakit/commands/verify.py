"""`gemmakit verify A B`: is model B a faithful copy of model A?"""

from __future__ import annotations

from gemmakit.commands.common import print_json


def add_arguments(p):
    p.add_argument("a", metavar="A", help="the reference model: folder, .gguf file, or 'default' (bundled)")
    p.add_argument("b", metavar="B", help="the model to check against A (an export, a merge, ...)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt to compare on (repeatable)")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens compared per prompt (16)")
    p.add_argument("--text", default=None, help="text file for perplexity (default: the bundled text)")
    p.add_argument("--max-tokens", type=int, default=1024, help="text tokens scored for perplexity (1024)")
    p.add_argument("--context", type=int, default=512, help="perplexity window, <bos> included (512)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of both models")
    p.add_argument("--device", default="cpu", help="device of both models (cpu)")
    p.add_argument(
        "--ppl-tolerance", type=float, default=0.10,
        help="largest relative perplexity change still 'within quantization tolerance' (0.10)",
    )  # fmt: skip
    p.add_argument(
        "--agreement", type=float, default=0.85,
        help="smallest fraction of equal greedy tokens still 'within quantization tolerance' (0.85)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")


def run(args) -> int:
    from pathlib import Path

    from gemmakit.errors import GemmakitError
    from gemmakit.evaluation.verify import DEFAULT_PROMPTS, Thresholds, compare
    from gemmakit.loading import load

    text = None
    if args.text:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except OSError as e:
            raise GemmakitError(f"{args.text}: {e.strerror or e}") from None
    if not 0 <= args.agreement <= 1 or args.ppl_tolerance < 0:
        raise GemmakitError("--agreement must be in [0, 1] and --ppl-tolerance >= 0")
    thresholds = Thresholds(tolerance_agreement=args.agreement, tolerance_ppl=args.ppl_tolerance)
    a = load(args.a, dtype=args.dtype, device=args.device)
    b = load(args.b, dtype=args.dtype, device=args.device)
    result = compare(
        a, b, prompts=args.prompt or DEFAULT_PROMPTS, new_tokens=args.new_tokens, text=text,
        max_tokens=args.max_tokens, context=args.context, progress=not args.json, thresholds=thresholds,
    )  # fmt: skip
    if args.json:
        print_json(result)
        return 0 if result["faithful"] else 1
    print(f"A: {result['a']}\nB: {result['b']}\n")
    width = max(len(repr(r["prompt"])) for r in result["prompts"])
    print(f"{'prompt':<{width}}  max|Δlogit|  greedy agreement  identical prefix")
    for r in result["prompts"]:
        print(
            f"{r['prompt']!r:<{width}}  {r['max_abs_logit_diff']:>11.4g}  "
            f"{r['greedy_agreement']:>9}/{r['new_tokens']:<6}  {r['identical_prefix']:>16}"
        )
    print(
        f"\nperplexity ({result['perplexity_method']}): A {result['perplexity_a']:.4f}  "
        f"B {result['perplexity_b']:.4f} ({result['perplexity_change']:+.2%})"
    )
    print(f"tokenization: {'same' if result['same_tokenization'] else 'DIFFERENT'}")
    verdict = result["verdict"].upper()
    meaning = "B is a faithful copy of A" if result["faithful"] else "B is NOT a faithful copy of A"
    print(f"\nverdict: {verdict}: {meaning} ({result['reason']})")
    t = thresholds
    print(
        f"thresholds: identical = same tokens, max |Δlogit| <= {t.identical_logit:g}, all greedy tokens equal; "
        f"within tolerance = >= {t.tolerance_agreement:.0%} greedy agreement and perplexity within "
        f"±{t.tolerance_ppl:.0%}"
    )
    return 0 if result["faithful"] else 1

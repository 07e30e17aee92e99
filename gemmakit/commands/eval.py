"""`gemmakit eval`: perplexity and multiple-choice accuracy, with the method printed.

    gemmakit eval perplexity [--text FILE] [--context N] [--stride S] [--json]
    gemmakit eval choice --task arc_style [--fewshot K] [--limit N] [--json]
    gemmakit eval tasks

`--model`, `--adapter` and `--quantize` may each be repeated: every combination is evaluated
in one run and reported as one table (and one JSON document).
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

from gemmakit.commands.common import QUANTIZATIONS, print_json, read_text_file
from gemmakit.errors import GemmakitError


def add_arguments(p):
    sub = p.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    ppl = sub.add_parser(
        "perplexity", help="perplexity of a text (strided sliding windows, <bos> per window)",
        description="Perplexity of a text file by the strided sliding-window method, every window "
        "starting with one <bos> that is never predicted.",
    )  # fmt: skip
    ppl.add_argument("--text", default=None, metavar="FILE",
                     help="UTF-8 text file (default: the bundled 1,450-token text on timekeeping)")  # fmt: skip
    ppl.add_argument("--context", type=int, default=512, help="ids per window, <bos> included (512)")
    ppl.add_argument("--stride", type=int, default=None, help="tokens each window advances (context // 2)")
    ppl.add_argument("--batch-tokens", type=int, default=4096, metavar="N",
                     help="ids per forward pass; equal-length windows run together (4096)")  # fmt: skip
    _model_arguments(ppl)
    ppl.add_argument("--json", action="store_true",
                     help='print {"model", "tokens", "nll", "perplexity", ...} (a list for several settings)')  # fmt: skip

    mc = sub.add_parser(
        "choice", help="multiple-choice log-likelihood accuracy (HellaSwag/ARC/MMLU/PIQA layouts)",
        description="Multiple-choice accuracy: each choice scored by its summed log-probability "
        "given <bos> + context, as lm-evaluation-harness does; the scoring rule is printed.",
    )  # fmt: skip
    mc.add_argument("--task", action="append", default=[], metavar="NAME",
                    help="a shipped task (see `gemmakit eval tasks`), or 'all'; repeatable")  # fmt: skip
    mc.add_argument("--data", action="append", default=[], metavar="FILE.jsonl",
                    help="a JSONL task file in a HellaSwag, ARC, MMLU or PIQA layout; repeatable")  # fmt: skip
    mc.add_argument(
        "--fewshot", type=int, default=0, metavar="K", help="solved examples before each question (0)"
    )
    mc.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draw (1234)")
    mc.add_argument(
        "--limit", type=int, default=None, metavar="N", help="only the first N questions of each file"
    )
    mc.add_argument("--batch-tokens", type=int, default=4096, metavar="N",
                    help="padded tokens per forward pass (4096)")  # fmt: skip
    mc.add_argument("--samples", default=None, metavar="FILE.jsonl",
                    help="also write each question's log-likelihoods and predictions here")  # fmt: skip
    _model_arguments(mc)
    mc.add_argument("--json", action="store_true", help="print one JSON document")

    tasks = sub.add_parser("tasks", help="list the task files shipped with gemmakit")
    tasks.add_argument("--json", action="store_true", help="print a JSON list")


def _model_arguments(parser):
    g = parser.add_argument_group("models to compare (each option repeatable; every combination is run)")
    g.add_argument("--model", "-m", action="append", default=None,
                   help="a Hugging Face model folder or .gguf file (default: the bundled Gemma 3 270M)")  # fmt: skip
    g.add_argument("--adapter", action="append", default=None,
                   help="a LoRA adapter folder (PEFT format); 'none' for the model without one")  # fmt: skip
    g.add_argument("--quantize", action="append", default=None, choices=("none", *QUANTIZATIONS),
                   help="quantize linear layers after loading (gemmakit.quant); 'none' = as loaded")  # fmt: skip
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations dtype (auto: float32 on CPU, bfloat16 on CUDA)")  # fmt: skip
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")


def run(args) -> int:
    command = getattr(args, "eval_command", None)
    if command == "perplexity":
        return run_perplexity(args)
    if command == "choice":
        return run_choice(args)
    if command == "tasks":
        return run_tasks(args)
    raise GemmakitError("choose what to evaluate: perplexity, choice or tasks (see gemmakit eval --help)")


def _settings(args):
    from gemmakit.evaluation.settings import settings

    return settings(args.model, args.adapter, args.quantize)


def _each_loaded(args):
    """Yields (setting, loaded) for every setting, freeing each model before the next."""
    from gemmakit.evaluation.settings import load_setting

    for setting in _settings(args):
        print(f"loading {setting.label} ...", file=sys.stderr)
        loaded = load_setting(setting, args.dtype, args.device)
        yield setting, loaded
        del loaded
        gc.collect()


def _setting_fields(setting, loaded) -> dict:
    return {
        "model": str(loaded.source.path), "setting": setting.label,
        "adapter": setting.adapter, "quantize": setting.quantize,
    }  # fmt: skip


# --- perplexity ------------------------------------------------------------------------------


def run_perplexity(args) -> int:
    from gemmakit.evaluation.perplexity import (
        DEFAULT_TEXT,
        perplexity_method,
        strided_windows,
        text_perplexity,
    )
    from gemmakit.evaluation.table import format_table

    path = Path(args.text) if args.text else DEFAULT_TEXT
    text = read_text_file(path)
    stride = args.stride or max(1, args.context // 2)
    strided_windows(1, args.context, stride)  # checks the numbers before any loading
    if args.batch_tokens < 1:
        raise GemmakitError(f"--batch-tokens must be >= 1, got {args.batch_tokens}")
    rows = []
    for setting, loaded in _each_loaded(args):
        start = time.perf_counter()
        r = text_perplexity(loaded, text, args.context, stride, progress=True, batch_tokens=args.batch_tokens)
        seconds = time.perf_counter() - start
        rows.append({**_setting_fields(setting, loaded), "tokens": r.tokens, "nll": r.nll,
                     "perplexity": r.perplexity, "text": str(path), "context": r.context,
                     "stride": r.stride, "windows": r.windows, "seconds": round(seconds, 3)})  # fmt: skip
    if args.json:
        print_json(rows[0] if len(rows) == 1 else rows)
        return 0
    print(f"Perplexity of {path.name} ({rows[0]['tokens']} tokens, {rows[0]['windows']} windows)")
    print(perplexity_method(args.context, stride))
    print()
    table = [
        (r["setting"], r["tokens"], f"{r['nll']:.4f}", f"{r['perplexity']:.3f}",
         f"{r['tokens'] / r['seconds']:.0f}", f"{r['seconds']:.1f}")
        for r in rows
    ]  # fmt: skip
    print(format_table(("setting", "tokens", "nll", "perplexity", "tokens/s", "seconds"), table))
    return 0


# --- multiple choice -------------------------------------------------------------------------


def _tasks(args):
    from gemmakit.evaluation.tasks import list_tasks, load_task, task_path

    names = [t["name"] for t in list_tasks()] if "all" in args.task else args.task
    tasks = [load_task(task_path(n), where=f"{n}.jsonl") for n in dict.fromkeys(names)]
    tasks += [load_task(d) for d in args.data]
    if not tasks:
        raise GemmakitError("give --task NAME (see `gemmakit eval tasks`) or --data FILE.jsonl")
    for task in tasks:  # fail on a bad --fewshot before loading any model
        if args.fewshot >= len(task.questions):
            raise GemmakitError(
                f"--fewshot {args.fewshot}: {task.path} has only {len(task.questions)} questions"
            )
    return tasks


def run_choice(args) -> int:
    from gemmakit.evaluation.scoring import evaluate_choice, scoring_rule
    from gemmakit.evaluation.table import format_table
    from gemmakit.evaluation.tasks import LAYOUTS

    tasks = _tasks(args)
    if args.batch_tokens < 1:
        raise GemmakitError(f"--batch-tokens must be >= 1, got {args.batch_tokens}")
    rule = scoring_rule([t.layout for t in tasks], args.fewshot, args.seed)
    if not args.json:
        for t in tasks:
            n = len(t.questions) if args.limit is None else min(args.limit, len(t.questions))
            print(f"{t.name}: {t.path} - layout detected: {t.layout} ({LAYOUTS[t.layout]}); "
                  f"{n} of {len(t.questions)} questions")  # fmt: skip
        print(rule)
        print()
        sys.stdout.flush()
    results, samples = [], []
    for setting, loaded in _each_loaded(args):
        for t in tasks:
            start = time.perf_counter()
            r = evaluate_choice(
                loaded, t, args.fewshot, args.seed, args.limit, args.batch_tokens, progress=True
            )
            seconds = time.perf_counter() - start
            row = {"task": t.name, "file": str(t.path), "layout": t.layout, **_setting_fields(setting, loaded),
                   **r.to_dict(), "fewshot": args.fewshot, "seconds": round(seconds, 3)}  # fmt: skip
            results.append(row)
            samples += [{"task": t.name, "setting": setting.label, **s} for s in r.samples]
    if args.samples:
        _write_jsonl(Path(args.samples), samples)
    if args.json:
        print_json({"fewshot": args.fewshot, "seed": args.seed, "limit": args.limit,
                    "scoring_rule": rule, "results": results})  # fmt: skip
        return 0
    table = [
        (r["task"], r["setting"], r["n"], _pm(r["acc"], r["acc_stderr"]),
         _pm(r["acc_norm"], r["acc_norm_stderr"]), f"{r['tokens'] / r['seconds']:.0f}", f"{r['seconds']:.1f}")
        for r in results
    ]  # fmt: skip
    print(format_table(("task", "setting", "n", "acc", "acc_norm", "tokens/s", "seconds"), table))
    return 0


def _pm(p: float, stderr: float | None) -> str:
    return f"{p:.4f}" if stderr is None else f"{p:.4f} ± {stderr:.4f}"


def _write_jsonl(path: Path, rows: list[dict]):
    import json

    from gemmakit.files import atomic_write

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(path, write)
    print(f"wrote {len(rows)} samples to {path}", file=sys.stderr)


def run_tasks(args) -> int:
    from gemmakit.evaluation.table import format_table
    from gemmakit.evaluation.tasks import list_tasks

    tasks = list_tasks()
    if args.json:
        print_json(tasks)
        return 0
    print(format_table(("task", "layout", "questions", "file"),
                          [(t["name"], t["layout"], t["questions"], Path(t["path"]).name) for t in tasks]))  # fmt: skip
    print("\nRun one with: gemmakit eval choice --task NAME [--fewshot K] [--limit N]")
    return 0

"""GPTQ / AWQ ablations on the bundled Gemma 3 270M: perplexity of one setting per run.

    .venv/bin/python benchmarks/gptq_ablation.py --group-size 32 --float-target 0.25 [--out FILE]
    .venv/bin/python benchmarks/gptq_ablation.py --method awq --rounding gptq --group-size 128

Each run loads the bundled model in float32 (the exact dequantization of its Q4_K_M file),
quantizes its block linears with the named settings (the rest are `GPTQSettings`' defaults),
and measures perplexity on `gemmakit/data/eval_text.txt` exactly as `gemmakit quantize`'s
quality table does (windows of 512, stride 511). `--eval-tokens N` scores only the first N
tokens: a cheaper screening proxy, stated in the output. One JSON line per run is printed
and appended to `--out`. Perplexity is not a timing: a loaded machine changes no number here.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("gptq", "awq", "rtn", "none"), default="gptq")
    p.add_argument("--rounding", choices=("round", "clip", "gptq"), default="round", help="AWQ's rounding")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--desc-act", type=int, choices=(0, 1), default=None)
    p.add_argument("--static-groups", type=int, choices=(0, 1), default=None)
    p.add_argument("--damp", type=float, default=None, help="damp_percent")
    p.add_argument("--sym", type=int, choices=(0, 1), default=None)
    p.add_argument("--mse", type=int, choices=(0, 1), default=None)
    p.add_argument("--true-sequential", type=int, choices=(0, 1), default=None)
    p.add_argument("--float-target", type=float, default=None, help="GPTAQ's alpha (0: off)")
    p.add_argument("--windows", type=int, default=64, help="at most this many calibration windows")
    p.add_argument("--window", type=int, default=512, help="calibration window length, <bos> included")
    p.add_argument("--calibration", default=None, help="calibration text file (default: the shipped one)")
    p.add_argument("--eval-tokens", type=int, default=None, help="score only the first N eval tokens")
    p.add_argument("--head-bf16", action="store_true",
                   help="round the tied embedding / output head to bfloat16, as a GPTQ folder stores it")  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    return p.parse_args(argv)


def settings_of(args):
    from gemmakit.quant.gptq import GPTQSettings

    overrides = {
        "desc_act": args.desc_act, "static_groups": args.static_groups, "damp_percent": args.damp,
        "sym": args.sym, "mse": args.mse, "true_sequential": args.true_sequential,
        "float_target": args.float_target,
    }  # fmt: skip
    chosen = {k: type(getattr(GPTQSettings, k))(v) for k, v in overrides.items() if v is not None}
    return GPTQSettings(group_size=args.group_size, **chosen)


def quantized(loaded, args, windows):
    from gemmakit.quant.awq import awq_quantize_model
    from gemmakit.quant.gptq import block_linears, dequantize, gptq_quantize_model, rtn_quantize

    model = copy.deepcopy(loaded.model)
    if args.method == "none":
        return model
    if args.method == "awq":
        return awq_quantize_model(model, windows, args.group_size, progress=True, rounding=args.rounding)
    if args.method == "rtn":  # round to nearest on GPTQ's grid, the weights replaced in float
        settings = settings_of(args)
        for block in model.model.layers:
            for m in block_linears(block).values():
                q = rtn_quantize(m.weight, args.group_size, settings.sym, settings.mse)
                m.weight.data.copy_(dequantize(q))
        return model
    return gptq_quantize_model(model, windows, progress=True, settings=settings_of(args))


def main(argv=None) -> int:
    from gemmakit.evaluation.perplexity import perplexity
    from gemmakit.loading import load
    from gemmakit.paths import DATA
    from gemmakit.quant.gptq import calibration_windows, default_calibration_text

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load(None, dtype="float32", device="cpu")
    tok = loaded.tokenizer
    text = open(args.calibration, encoding="utf-8").read() if args.calibration else default_calibration_text()
    calib_ids = tok.encode(text, add_bos=False)
    windows = calibration_windows(calib_ids, tok.bos_id, args.window, args.windows)
    ids = tok.encode((DATA / "eval_text.txt").read_text(encoding="utf-8"), add_bos=False)[: args.eval_tokens]
    start = time.perf_counter()
    model = quantized(loaded, args, windows)
    seconds = time.perf_counter() - start
    if args.head_bf16:  # tied: the embedding and the output head are one tensor
        weight = model.model.embed_tokens.weight
        weight.data.copy_(weight.data.bfloat16().float())
    with torch.inference_mode():
        base = perplexity(loaded.model, ids, tok.bos_id, 512, 511).perplexity
        ppl = perplexity(model, ids, tok.bos_id, 512, 511).perplexity
    row = {
        "method": args.method,
        "rounding": args.rounding if args.method == "awq" else None,
        "settings": dataclasses.asdict(settings_of(args)),
        "calibration_windows": len(windows),
        "calibration_tokens": sum(w.numel() for w in windows),
        "window": args.window,
        "eval_tokens": len(ids),
        "head": "bf16" if args.head_bf16 else "f32",
        "fp32": round(base, 4),
        "perplexity": round(ppl, 4),
        "change": round(ppl / base - 1, 5),
        "quantize_seconds": round(seconds, 1),
    }
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

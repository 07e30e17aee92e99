"""`gemmakit quantize --method gptq|awq -o DIR`: a GPTQ or AWQ 4-bit folder transformers and vLLM load.

Also the calibrated rows of the quality table (`gptq`, `gptq-g32`): the model quantized in
memory by `gemmakit.quant.gptq`, calibrated on `--calibration` (default: the shipped wiki
text and guanaco sample, `gptq.default_calibration_text`, disjoint from the evaluation text
the table scores).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

METHODS = ("gptq", "awq")
TABLE_TYPES = {"gptq": 128, "gptq-g32": 32, "awq": 128}  # quality-table type -> group size


def add_arguments(p):
    g = p.add_argument_group("calibrated 4-bit (writes a folder)")
    g.add_argument("--method", choices=METHODS, default=None,
                   help="quantize with GPTQ or AWQ and write a folder in that format to -o (no quality table)")  # fmt: skip
    g.add_argument("--bits", type=int, default=4, help="bits per weight (4 only)")
    g.add_argument("--group-size", type=int, default=128, help="input columns per scale/zero (128)")
    g.add_argument("--no-desc-act", dest="desc_act", action="store_false",
                   help="quantize columns in order instead of by decreasing activation (act-order)")  # fmt: skip
    g.add_argument("--calibration", default=None,
                   help="calibration text file (default: the shipped wiki text and guanaco sample)")  # fmt: skip
    g.add_argument("-o", "--output", default=None, help="the folder to write (--method)")
    g.add_argument("--force", action="store_true", help="overwrite the files of a non-empty folder")


def calibration_text(path) -> tuple[str, str]:
    """(text, its name): the file at `path`, or the shipped calibration text."""
    from gemmakit.errors import GemmakitError
    from gemmakit.quant.gptq import CALIBRATION_FILES, default_calibration_text

    if not path:
        return default_calibration_text(), " + ".join(CALIBRATION_FILES)
    try:
        return Path(path).read_text(encoding="utf-8"), Path(path).name
    except OSError as e:
        raise GemmakitError(f"{path}: {e.strerror or e}") from None


def gptq_model(
    loaded, group_size: int, desc_act: bool, calibration=None, progress: bool = False, method="gptq"
):
    """A GPTQ- (or AWQ-) quantized copy of the loaded model."""
    from gemmakit.quant.awq import awq_quantize_model
    from gemmakit.quant.gptq import calibration_windows, gptq_quantize_model

    text, _ = calibration_text(calibration)
    windows = calibration_windows(loaded.tokenizer.encode(text, add_bos=False), loaded.tokenizer.bos_id)
    model = copy.deepcopy(loaded.model)
    if method == "awq":
        return awq_quantize_model(model, windows, group_size, progress)
    return gptq_quantize_model(model, windows, group_size, desc_act, progress)


def table_variant(loaded, kind: str):
    return gptq_model(loaded, TABLE_TYPES[kind], desc_act=True, method="awq" if kind == "awq" else "gptq")


def run(args) -> int:
    import torch

    from gemmakit.commands.common import print_json
    from gemmakit.errors import GemmakitError
    from gemmakit.formats.gptq_folder import awq_config, gptq_config, write_gptq_folder
    from gemmakit.loading import load
    from gemmakit.quant.gptq import GPTQSettings
    from gemmakit.quant.packed4 import gptq_state_to_awq

    if args.bits != 4:
        raise GemmakitError(f"--bits: {args.method} is written at 4 bits only")
    if not args.output:
        raise GemmakitError(f"--method {args.method} needs -o DIR, the folder to write")
    if args.group_size not in (32, 64, 128, 256):
        raise GemmakitError("--group-size must be 32, 64, 128 or 256")
    _, calibration = calibration_text(args.calibration)  # a missing file fails before the load
    start = time.perf_counter()
    loaded = load(args.model, dtype="float32", device=args.device or "cpu")
    awq = args.method == "awq"
    model = gptq_model(
        loaded, args.group_size, args.desc_act and not awq, args.calibration, not args.json, args.method
    )
    state = gptq_state_to_awq(model.state_dict()) if awq else model.state_dict()
    settings = GPTQSettings(args.group_size, args.desc_act)
    qconfig = (
        awq_config(args.group_size) if awq else gptq_config(args.group_size, args.desc_act, settings=settings)
    )
    dtype = torch.bfloat16 if args.dtype in ("auto", "bf16", "bfloat16") else torch.float32
    source = loaded.source.path if loaded.source.kind == "hf" else None
    summary = write_gptq_folder(
        args.output, state, model.config, loaded.tokenizer, qconfig,
        dtype, source_folder=source, force=args.force, progress=not args.json, stop_ids=loaded.stop_ids,
    )  # fmt: skip
    summary |= {"method": args.method, "group_size": args.group_size, "desc_act": args.desc_act and not awq,
                "calibration": str(calibration), "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {summary['path']} ({summary['bytes'] / 1e6:.1f} MB, {args.method.upper()} 4-bit group {args.group_size}, "
              f"calibrated on {calibration}) in {summary['seconds']} s")  # fmt: skip
    return 0

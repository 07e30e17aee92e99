"""`gemmakit quantize`: what each quantization costs a model in size and perplexity; it keeps no file.

For every requested type it measures the model's size and its perplexity on a text, and prints
one table against fp32. In-memory types (fp32, bf16, nf4, int8, int4) are measured on a copy of
the loaded model, their size being the bytes its parameters and buffers hold; GGUF types are
written to a temporary file by `gemmakit.export.export_gguf`, read back by gemmakit's loader
(which dequantizes to float32), measured with the file's size, and deleted. Perplexity is
`gemmakit.evaluation.perplexity`'s: windows of `--context` ids, each starting with one <bos>,
non-overlapping (stride context - 1), on the same text tokens.

To run a model quantized, pass `--quantize` to generate, chat, serve or eval; to keep a
quantized file, write it with `gemmakit export --to gguf --type TYPE`.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

from gemmakit.commands.common import add_model_arguments, print_json

MEMORY_TYPES = ("fp32", "bf16", "nf4", "int8", "int8-linear", "int4", "int4-linear", "int4-all",
                "gptq", "gptq-g32", "awq")  # fmt: skip
# the GGUF float types, then llama.cpp's mixes as `gemmakit export` writes them (the K-quants
# with llama-quantize's per-tensor types and bytes)
GGUF_TYPES = (
    "gguf-f32", "gguf-f16", "gguf-bf16", "gguf-q8_0", "gguf-q6_k", "gguf-q5_k_m", "gguf-q5_k_s",
    "gguf-q5_1", "gguf-q5_0", "gguf-q4_k_m", "gguf-q4_k_s", "gguf-iq4_xs", "gguf-iq4_nl", "gguf-q4_1",
    "gguf-q4_0", "gguf-q3_k_l", "gguf-q3_k_m", "gguf-q3_k_s", "gguf-q2_k",
)  # fmt: skip
DEFAULT_TYPES = ("fp32", "bf16", "nf4", "int8", "int4", "gguf-f16", "gguf-q8_0", "gguf-q6_k", "gguf-q5_0",
                 "gguf-q4_k_m", "gguf-q4_0", "gguf-q3_k_m")  # fmt: skip
DESCRIPTIONS = {
    "fp32": "float32 weights",
    "bf16": "bfloat16 weights and compute",
    "nf4": "NF4 + double quant (linear layers; embedding fp32)",
    "int8": "int8 per-channel, linear layers + embedding/lm_head",
    "int8-linear": "int8 per-channel, linear layers only",
    "int4": "int4 group-32 linear layers, embedding/lm_head int8",
    "int4-linear": "int4 group-32, linear layers only",
    "int4-all": "int4 group-32, linear layers + embedding/lm_head",
    "gptq": "GPTQ 4-bit group-128 act-order, mse range search, linear layers (calibrated on wiki + guanaco)",
    "gptq-g32": "GPTQ 4-bit group-32 act-order, mse range search, linear layers (calibrated on wiki + guanaco)",
    "awq": "AWQ 4-bit group-128, linear layers (calibrated on wiki + guanaco)",
}
CALIBRATED = ("gptq", "gptq-g32", "awq")  # commands/quantize_gptq.py


def add_arguments(p):
    p.description = (
        "Measure each quantization of a model: its size (in memory, or as a GGUF file written to "
        "a temporary folder and deleted) and its perplexity on a text, in one table against fp32. "
        "No file is kept: to run a model quantized, pass --quantize to generate, chat, serve or "
        "eval; to keep a quantized GGUF, use `gemmakit export --to gguf --type TYPE`."
    )
    add_model_arguments(p, adapter=True, quantize=False)
    p.add_argument(
        "--text", default=None, help="text file for perplexity (default: the bundled ~2.8k-word text)"
    )
    p.add_argument(
        "--types", default=",".join(DEFAULT_TYPES),
        help=f"comma-separated types to measure, from: {', '.join(MEMORY_TYPES + GGUF_TYPES)} "
        f"(default: {','.join(DEFAULT_TYPES)}); 'all' for every one",
    )  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N text tokens")
    p.add_argument(
        "--imatrix", default=None, metavar="FILE",
        help="an importance matrix the GGUF mixes are written with (as `gemmakit export --imatrix`)",
    )  # fmt: skip
    p.add_argument("--context", type=int, default=512, help="perplexity window, <bos> included (512)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    from gemmakit.commands import quantize_gptq

    quantize_gptq.add_arguments(p)


def parse_types(spec: str) -> list[str]:
    from gemmakit.errors import GemmakitError

    if spec.strip() == "all":
        return list(MEMORY_TYPES + GGUF_TYPES)
    types = [t.strip().lower() for t in spec.split(",") if t.strip()]
    unknown = [t for t in types if t not in MEMORY_TYPES + GGUF_TYPES]
    if unknown or not types:
        raise GemmakitError(
            f"unknown type(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(MEMORY_TYPES + GGUF_TYPES)}"
        )
    return types


def _variant(loaded, kind: str):
    """A copy of the loaded model in the in-memory format `kind`."""
    import torch

    from gemmakit.quant import quantize_model

    if kind in CALIBRATED:
        from gemmakit.commands.quantize_gptq import table_variant

        return table_variant(loaded, kind)
    model = copy.deepcopy(loaded.model)
    if kind == "bf16":
        return model.to(torch.bfloat16)
    if kind == "fp32":
        return model
    base, _, scope = kind.partition("-")
    embeddings = {"": None, "linear": False, "all": True}[scope]
    return quantize_model(model, base, embeddings=embeddings)


def quality_table(
    loaded, text: str, types, context: int = 512, max_tokens: int | None = None, progress=True, imatrix=None
):
    """Rows of {type, description, bytes, perplexity, change} for each type, fp32 first;
    `imatrix`: an importance matrix file the GGUF mixes are written with."""
    from gemmakit.errors import GemmakitError
    from gemmakit.evaluation.perplexity import perplexity
    from gemmakit.export import export_gguf
    from gemmakit.loading import load
    from gemmakit.quant import model_memory

    ids = loaded.tokenizer.encode(text, add_bos=False)[:max_tokens]
    if len(ids) < 2:
        raise GemmakitError("the text is too short to measure perplexity")
    stride = context - 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="gemmakit-quantize-") as tmp:
        for kind in types:
            start = time.perf_counter()
            if kind.startswith("gguf-"):
                qtype = kind.removeprefix("gguf-")
                path = Path(tmp) / f"model.{qtype}.gguf"
                summary = export_gguf(loaded, path, qtype, progress=False, imatrix=imatrix)
                model, size = load(path, dtype="float32", device="cpu").model, summary["bytes"]
                where, desc = "file", f"GGUF {qtype.upper()} written and read back" + _mix_note(path, qtype)
                path.unlink()
            else:
                model = _variant(loaded, kind)
                size, where, desc = model_memory(model), "memory", DESCRIPTIONS[kind]
            if progress:
                print(f"[{kind}] measuring perplexity...", file=sys.stderr)
            result = perplexity(model, ids, loaded.tokenizer.bos_id, context, stride)
            rows.append(
                {"type": kind, "description": desc, "bytes": size, "size_of": where,
                 "perplexity": result.perplexity, "seconds": round(time.perf_counter() - start, 1)}
            )  # fmt: skip
            del model
    ref = next((r["perplexity"] for r in rows if r["type"] == "fp32"), rows[0]["perplexity"])
    for r in rows:
        r["change"] = r["perplexity"] / ref - 1
    return {"tokens": len(ids), "context": context, "stride": stride, "rows": rows}


def _mix_note(path: Path, qtype: str) -> str:
    """How a mix's file differs from its name: the token embedding's type, and the types the
    tensors whose rows do not fit the mix's blocks fell back to."""
    from gemmakit.formats.gguf import GGUFFile

    if qtype in ("f32", "f16", "bf16"):
        return ""
    tensors = GGUFFile(path).tensors
    counts: dict[str, int] = {}
    for t in tensors.values():
        if len(t.shape) > 1:
            counts[t.ggml_type.name] = counts.get(t.ggml_type.name, 0) + 1
    embd = tensors.get("token_embd.weight")
    parts = [f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return f" ({', '.join(parts)}; embedding {embd.ggml_type.name})" if embd else f" ({', '.join(parts)})"


def format_table(table: dict) -> str:
    lines = [
        f"{'type':<12} {'size MB':>9} {'of':<6} {'perplexity':>10} {'vs fp32':>8}  description",
    ]
    for r in table["rows"]:
        lines.append(
            f"{r['type']:<12} {r['bytes'] / 1e6:>9.1f} {r['size_of']:<6} {r['perplexity']:>10.3f} "
            f"{r['change']:>+8.2%}  {r['description']}"
        )
    lines.append(
        f"perplexity over {table['tokens']} tokens, windows of {table['context']} ids (one <bos> each), "
        f"stride {table['stride']}"
    )
    return "\n".join(lines)


def run(args) -> int:
    from gemmakit.errors import GemmakitError
    from gemmakit.evaluation.verify import DEFAULT_TEXT
    from gemmakit.export import apply_adapter
    from gemmakit.loading import load

    if args.method:
        from gemmakit.commands import quantize_gptq

        return quantize_gptq.run(args)
    types = parse_types(args.types)
    if args.max_tokens is not None and args.max_tokens < 2:
        raise GemmakitError("--max-tokens must be at least 2")
    path = Path(args.text) if args.text else DEFAULT_TEXT
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise GemmakitError(f"{path}: {e.strerror or e}") from None
    dtype = "float32" if args.dtype == "auto" else args.dtype
    loaded = load(args.model, dtype=dtype, device=args.device or "cpu")
    if args.adapter:
        loaded = apply_adapter(loaded, args.adapter)
    table = quality_table(
        loaded, text, types, args.context, args.max_tokens, progress=not args.json, imatrix=args.imatrix
    )
    table.update(model=str(loaded.source.path), text=str(path))
    if args.json:
        print_json(table)
        return 0
    print(f"model: {loaded.source.path}\ntext: {path}\n")
    print(format_table(table))
    return 0

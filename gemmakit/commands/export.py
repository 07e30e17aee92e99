"""`gemmakit export`: write a model (optionally with a LoRA adapter merged) as GGUF or HF."""

from __future__ import annotations

import sys

from gemmakit.commands.common import print_json

# the float types, then llama.cpp's mixes (formats/gguf_mix.py MIXES), largest first
GGUF_CHOICES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s",
                "iq4_xs", "iq4_nl", "q4_1", "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k", "q2_k_s")  # fmt: skip
EMBEDDING_CHOICES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "iq4_xs", "iq4_nl",
                     "q4_1", "q4_0", "q3_k", "q2_k")  # fmt: skip


def add_arguments(p):
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", "-m", default=None,
        help="a Hugging Face model folder, a .gguf file, or omitted for the bundled Gemma 3 270M",
    )  # fmt: skip
    g.add_argument("--adapter", default=None, help="a LoRA adapter folder (PEFT format) merged before export")
    g.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"],
        help="dtype the model is loaded and merged in (float32 keeps a GGUF source's values exact)",
    )  # fmt: skip
    o = p.add_argument_group("output")
    o.add_argument("--to", required=True, choices=["gguf", "hf"], help="GGUF file or Hugging Face folder")
    o.add_argument(
        "--type", default="auto", metavar="TYPE",
        help=f"GGUF: {', '.join(GGUF_CHOICES)} (auto = f16); the quantized types are llama.cpp's "
        "mixes (per-tensor types and block bytes as llama-quantize writes them from float32); "
        "HF: f32, bf16, f16 (auto = the loaded dtype)",
    )  # fmt: skip
    o.add_argument(
        "--embedding-type", default=None, choices=EMBEDDING_CHOICES,
        help="GGUF type of the (tied) token embedding, as llama-quantize's --token-embedding-type; "
        "default: the mix's choice (Q6_K, or Q8_0 where rows do not fit), or --type for f32/f16/bf16",
    )  # fmt: skip
    o.add_argument(
        "--imatrix", default=None, metavar="FILE",
        help="GGUF mixes: an importance matrix (llama-imatrix's GGUF or .dat file, or gemmakit "
        "imatrix's) weighting the rounding error as llama-quantize --imatrix does",
    )  # fmt: skip
    o.add_argument("--output", "-o", required=True, help="the .gguf file or the output folder")
    o.add_argument("--force", action="store_true", help="HF: overwrite the files of a non-empty folder")
    o.add_argument("--json", action="store_true", help="print a JSON summary")


def run(args) -> int:
    from gemmakit.errors import GemmakitError
    from gemmakit.export import export
    from gemmakit.formats.hf_folder import HF_DTYPES

    qtype = args.type.lower()
    valid = GGUF_CHOICES if args.to == "gguf" else tuple(HF_DTYPES)
    if qtype != "auto" and qtype not in valid:
        raise GemmakitError(
            f"--type {args.type} is not valid with --to {args.to}; choose auto, {', '.join(valid)}"
        )
    if args.to == "gguf" and not args.output.endswith(".gguf"):
        print(f"note: {args.output} does not end in .gguf", file=sys.stderr)
    result = export(
        model=args.model, adapter=args.adapter, to=args.to, output=args.output, qtype=qtype,
        embedding_type=args.embedding_type, dtype=args.dtype, force=args.force, progress=not args.json,
        imatrix=args.imatrix,
    )  # fmt: skip
    if args.json:
        print_json(result)
        return 0
    what = "GGUF" if args.to == "gguf" else "Hugging Face folder"
    print(f"wrote {what} {result['path']} ({result['bytes'] / 1e6:,.1f} MB, {result['type']})")
    if "tensor_types" in result:
        print("tensors: " + ", ".join(f"{n} {t}" for t, n in sorted(result["tensor_types"].items())))
    for note in result.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    return 0

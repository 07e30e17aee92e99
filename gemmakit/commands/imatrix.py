"""`gemmakit imatrix`: the importance matrix of a model over a text, in llama.cpp's format.

    gemmakit imatrix [MODEL] [--text FILE] [-o imatrix.gguf] [--ctx 512] [--chunks N] [--json]

The statistics are llama-imatrix's (see `gemmakit.evaluation.imatrix`); the file is the GGUF
that llama-imatrix writes, which `llama-quantize --imatrix` (and gemmakit's exporter) reads.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from gemmakit.commands.common import add_model_arguments, print_json, read_text_file
from gemmakit.errors import GemmakitError


def add_arguments(p):
    p.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                   help="a Hugging Face model folder or .gguf file (default: the bundled Gemma 3 270M)")  # fmt: skip
    p.add_argument("--text", "-f", default=None, metavar="FILE",
                   help="UTF-8 calibration text (default: the bundled 1,450-token text on timekeeping)")  # fmt: skip
    p.add_argument("--output", "-o", default="imatrix.gguf", metavar="FILE",
                   help="where to write the importance matrix, llama.cpp's GGUF format (imatrix.gguf)")  # fmt: skip
    p.add_argument("--ctx", "-c", type=int, default=512, metavar="N",
                   help="tokens per chunk, <bos> included, as llama-imatrix's -c (512)")  # fmt: skip
    p.add_argument("--chunks", type=int, default=None, metavar="N",
                   help="use at most N chunks (default: all the text holds)")  # fmt: skip
    p.add_argument("--batch-tokens", type=int, default=4096, metavar="N",
                   help="tokens per forward pass; chunks run together (4096)")  # fmt: skip
    add_model_arguments(p, adapter=False, quantize=False)
    p.add_argument("--json", action="store_true",
                   help='print {"output", "chunks", "tokens", "entries", ...} instead of text')  # fmt: skip
    p.epilog = (
        "Each chunk starts with <bos> in place of its first token and every token counts, as in "
        "llama-imatrix; the text must hold at least two chunks."
    )


def run(args) -> int:
    from gemmakit.evaluation.imatrix import compute_imatrix
    from gemmakit.evaluation.perplexity import DEFAULT_TEXT
    from gemmakit.formats.imatrix import write_imatrix
    from gemmakit.loading import load

    if args.model_path and args.model:
        raise GemmakitError("give the model once: as MODEL or as --model, not both")
    if args.ctx < 2:
        raise GemmakitError(f"--ctx must be at least 2, got {args.ctx}")
    if args.chunks is not None and args.chunks < 1:
        raise GemmakitError(f"--chunks must be positive, got {args.chunks}")
    if args.batch_tokens < 1:
        raise GemmakitError(f"--batch-tokens must be >= 1, got {args.batch_tokens}")
    text_path = Path(args.text) if args.text else DEFAULT_TEXT
    # As llama-imatrix reads -f (common/arg.cpp): the bytes as they are, one final \n dropped.
    text = read_text_file(text_path, keep_newlines=True)
    text = text[:-1] if text.endswith("\n") else text
    output = Path(args.output)
    if output.is_dir():
        raise GemmakitError(f"{output}: is a folder; -o takes a file name")

    loaded = load(args.model_path or args.model, dtype=args.dtype, device=args.device)
    tok = loaded.tokenizer
    # As llama-imatrix: one <bos>, then the whole text. (It leaves control-token strings in the
    # text as plain text; gemmakit's tokenizer reads them as the tokens. Calibration text
    # rarely holds any.)
    ids = tok.encode(text, add_bos=True)
    start = time.perf_counter()
    stats, chunks = compute_imatrix(
        loaded.model, ids, tok.bos_id, args.ctx, args.chunks, progress=not args.json,
        batch_tokens=args.batch_tokens,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    sums, counts = stats.numpy()
    dataset = args.text if args.text else str(DEFAULT_TEXT)  # llama-imatrix stores -f as given
    write_imatrix(output, sums, counts, [dataset], chunk_count=chunks, chunk_size=args.ctx)
    tokens = chunks * args.ctx
    summary = {
        "model": str(loaded.source.path), "text": str(text_path), "output": str(output),
        "ctx": args.ctx, "chunks": chunks, "text_tokens": len(ids), "tokens": tokens,
        "entries": len(sums), "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
    }  # fmt: skip
    if args.json:
        print_json(summary)
        return 0
    print(
        f"{text_path.name}: {len(ids)} tokens -> {chunks} chunks of {args.ctx} "
        f"({tokens} tokens, {tokens / max(seconds, 1e-9):.0f} tokens/s, {seconds:.1f} s)",
        file=sys.stderr,
    )
    print(f"wrote {len(sums)} importance matrix entries to {output}")
    return 0

"""The `gemmakit` command line: a dispatcher from subcommand names to modules.

Each subcommand lives in `gemmakit/commands/<name>.py` with `add_arguments(parser)` and
`run(args) -> int`, and is imported only when used, so `gemmakit --help` stays instant.
User mistakes (`GemmakitError`) print one line and exit 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gemmakit import __version__

# name -> (module, one-line help)
COMMANDS = {
    "generate": ("generate", "generate text from prompts (vLLM-style sampling, timings, tokens/s)"),
    "chat": ("chat", "interactive streaming chat with Gemma's chat template"),
    "inspect": ("inspect", "parameter counts, architecture and memory needs of models"),
    "serve": ("serve", "OpenAI-compatible HTTP server with a chat page"),
    "quantize": ("quantize", "size and quality table of each quantization of a model"),
    "export": ("export", "write a model (with an adapter merged) as GGUF or a Hugging Face folder"),
    "verify": ("verify", "check that model B is a faithful copy of model A"),
    "eval": ("eval", "perplexity and multiple-choice evaluation with the method stated"),
    "finetune": ("finetune", "LoRA / QLoRA / full fine-tuning (a QLoRA recipe by default)"),
    "merge": ("merge", "merge a LoRA adapter into its base model and save the result"),
    "imatrix": ("imatrix", "importance matrix over a text, as llama-imatrix computes and writes it"),
    "cache": ("cache", "list or clear the model caches (dequantized GGUFs, quantized models)"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; subcommand arguments are loaded for `only` (or for all when None)."""
    parser = argparse.ArgumentParser(
        prog="gemmakit",
        description="Run, inspect, quantize, fine-tune, evaluate, serve and export Gemma models. "
        "Every command uses the bundled Gemma 3 270M when --model is not given.",
    )
    parser.add_argument("--version", action="version", version=f"gemmakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            _module(module).add_arguments(p)
    return parser


def _module(name: str):
    return importlib.import_module(f"gemmakit.commands.{name}")


def _check_shared_flags(args) -> None:
    """Checks the flags several subcommands share, so none of them fails on one deep inside."""
    from gemmakit.commands.common import check_device, check_seed

    if getattr(args, "device", None):
        check_device(args.device)
    if getattr(args, "seed", None) is not None:
        check_seed(args.seed)


def main(argv: list[str] | None = None) -> int:
    from gemmakit.errors import GemmakitError

    argv = sys.argv[1:] if argv is None else argv
    # Only the chosen subcommand's module is imported: the others may pull heavy deps.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=chosen or "")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        _check_shared_flags(args)
        return _module(COMMANDS[args.command][0]).run(args) or 0
    except GemmakitError as e:
        print(f"gemmakit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gemmakit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

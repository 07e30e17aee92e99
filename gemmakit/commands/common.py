"""Arguments and helpers shared by the subcommands that load a model."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

QUANTIZATIONS = ("nf4", "int8", "int4", "gptq", "awq")


def add_model_arguments(parser: argparse.ArgumentParser, adapter: bool = True, quantize: bool = True):
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model", "-m", default=None,
        help="a Hugging Face model folder (config.json + safetensors), a .gguf file, or "
        "omitted for the bundled Gemma 3 270M",
    )  # fmt: skip
    g.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and activations dtype (auto: float32 on CPU, bfloat16 on CUDA); "
        "float16 is refused for Gemma 2/3, whose activations overflow it",
    )  # fmt: skip
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    if quantize:
        g.add_argument(
            "--quantize", choices=QUANTIZATIONS, default=None,
            help="quantize after loading: int8 per-channel "
            "(linear layers + embedding/lm_head) or int4 group-32 (embedding/lm_head int8), "
            "weight-only; nf4 = bitsandbytes NF4 (double quantization) on the linear layers; "
            "gptq / awq = GPTQ / AWQ 4-bit group-128 calibrated on the shipped wiki text (cached)",
        )  # fmt: skip
    if adapter:
        g.add_argument("--adapter", default=None, help="a LoRA adapter folder (PEFT format) to apply")


def check_device(device: str) -> None:
    """Refuses a --device that torch cannot use here, before anything is loaded."""
    import re

    from gemmakit.errors import GemmakitError

    m = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", device)
    if m is None or (m.group(1) == "cpu" and m.group(2)):
        raise GemmakitError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    kind, index = m.group(1), int(m.group(2) or 0)
    if kind == "cpu":  # always there: no torch import (the torch-free generate path)
        return
    import torch

    if kind == "mps" and not torch.backends.mps.is_available():
        raise GemmakitError("--device mps: no Apple GPU is available to this torch")
    if kind != "cuda":
        return
    if torch.version.cuda is None and torch.version.hip is None:
        raise GemmakitError(
            f"--device {device}: this torch ({torch.__version__}) is built without CUDA; "
            "use --device cpu or install a CUDA build of torch"
        )
    count = torch.cuda.device_count()
    if count == 0:
        raise GemmakitError(
            f"--device {device}: no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)"
        )
    if index >= count:
        raise GemmakitError(
            f"--device {device}: there are {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )


def check_seed(seed: int) -> None:
    """Refuses a --seed outside 64 bits (signed or not), as SamplingParams does."""
    from gemmakit.errors import GemmakitError

    if not -(2**63) <= seed < 2**64:
        raise GemmakitError(f"--seed must fit in 64 bits, got {seed}")


def load_llm(args):
    """An `LLM` for the model options parsed by `add_model_arguments`."""
    from gemmakit.inference.api import LLM

    return LLM(
        model=args.model, dtype=args.dtype, device=args.device,
        quantization=getattr(args, "quantize", None), adapter=getattr(args, "adapter", None),
        draft_model=getattr(args, "draft_model", None),
    )  # fmt: skip


def print_json(obj):
    json.dump(obj, sys.stdout, ensure_ascii=False, indent=2)
    sys.stdout.write("\n")


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def read_text_file(path, flag: str = "--text", keep_newlines: bool = False) -> str:
    """A UTF-8 text file's content (with `keep_newlines`, its line ends as they are, not
    translated to \n); a missing, unreadable, non-UTF-8 or empty file is one GemmakitError
    naming it."""
    from pathlib import Path

    from gemmakit.errors import GemmakitError

    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="" if keep_newlines else None) as f:
            text = f.read()
    except FileNotFoundError:
        raise GemmakitError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GemmakitError(f"{path}: is a folder; {flag} takes a text file") from None
    except OSError as e:
        raise GemmakitError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise GemmakitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise GemmakitError(f"{path}: the text is empty")
    return text

"""Exporting any model gemmakit loads (HF folder, GGUF, with an adapter merged) to GGUF or HF.

    from gemmakit.export import export
    export(to="gguf", output="gemma.q8_0.gguf", qtype="q8_0")            # the bundled model
    export(model="ckpt/", adapter="out/adapter", to="hf", output="merged/")

The writers live in `gemmakit.formats.gguf_writer` (GGUF) and `gemmakit.formats.hf_folder`
(HF folder); this module loads the source, merges an adapter, gathers what the writers need
from the source (its GGUF vocabulary arrays, its chat template, its tokenizer files) and
dispatches.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gemmakit.errors import GemmakitError
from gemmakit.loading import Loaded, load

TARGETS = ("gguf", "hf")


def apply_adapter(loaded: Loaded, adapter: str | Path) -> Loaded:
    """Loads a PEFT LoRA adapter into the model and merges it (gemmakit.lora)."""
    from gemmakit import lora

    lora.load_adapter(loaded.model, adapter)
    merged = lora.merge(loaded.model)
    if isinstance(merged, torch.nn.Module):
        loaded.model = merged
    return loaded


def float_state(loaded: Loaded) -> dict[str, torch.Tensor]:
    """The model's float weights under gemmakit's names, quantized layers dequantized.

    Raises if anything other than the model's own tensors is left (an unmerged adapter).
    """
    from gemmakit.model.families import build_empty
    from gemmakit.quant import dequantized_state_dict

    state = dequantized_state_dict(loaded.model)
    expected = build_empty(loaded.model.config).state_dict()
    extra = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if extra or missing:
        raise GemmakitError(
            "the model's weights do not match its config"
            + (f"; unexpected {extra[0]}" if extra else "")
            + (f"; missing {missing[0]}" if missing else "")
        )
    return {k: state[k] for k in expected}


def source_metadata(loaded: Loaded) -> dict | None:
    """The GGUF source's metadata (vocabulary arrays, chat template, name), or None for a folder."""
    if loaded.source.kind != "gguf":
        return None
    from gemmakit.formats.gguf import GGUFFile

    return GGUFFile(loaded.source.path).metadata


def source_chat_template(loaded: Loaded, metadata: dict | None = None) -> str | None:
    """The source's own chat template (its default one), as the tokenizer read it from the GGUF
    metadata or the HF folder's files; None when the source has none."""
    template = loaded.tokenizer.chat_template
    if template is not None:
        return template.text
    if metadata and isinstance(metadata.get("tokenizer.chat_template"), str):
        return metadata["tokenizer.chat_template"]
    return None


def export_gguf(
    loaded: Loaded, output: str | Path, qtype: str = "f16", embedding_type: str | None = None,
    progress: bool = True, imatrix: str | Path | dict | None = None,
) -> dict:  # fmt: skip
    """Writes `loaded` as a GGUF file (see `gemmakit.formats.gguf_writer.write_gguf`), with an
    importance matrix if given: a file (llama.cpp's GGUF or .dat format) or what
    `gemmakit.formats.imatrix.read_imatrix` returns."""
    from gemmakit.formats.gguf_writer import write_gguf

    importance = _read_importance(imatrix)
    md = source_metadata(loaded)
    return write_gguf(
        output, float_state(loaded), loaded.model.config, loaded.tokenizer, qtype=qtype,
        embedding_type=embedding_type, source_metadata=md,
        chat_template=source_chat_template(loaded, md), name=_display_name(loaded, md),
        progress=progress, imatrix=importance,
    )  # fmt: skip


def _read_importance(imatrix: str | Path | dict | None) -> dict | None:
    if imatrix is None or isinstance(imatrix, dict):
        return imatrix
    from gemmakit.formats.imatrix import read_imatrix

    return read_imatrix(imatrix)


def export_hf(
    loaded: Loaded, output: str | Path, dtype: str = "f32", force: bool = False, progress: bool = True
) -> dict:
    """Writes `loaded` as a Hugging Face model folder (see `gemmakit.formats.hf_folder.write_hf`)."""
    from gemmakit.formats.hf_folder import HF_DTYPES, write_hf

    if dtype not in HF_DTYPES:
        raise GemmakitError(f"--type {dtype} is not a Hugging Face dtype; use {', '.join(HF_DTYPES)}")
    md = source_metadata(loaded)
    return write_hf(
        output, float_state(loaded), loaded.model.config, loaded.tokenizer, dtype=HF_DTYPES[dtype],
        source_folder=loaded.source.path if loaded.source.kind == "hf" else None,
        chat_template=source_chat_template(loaded, md), stop_ids=loaded.stop_ids,
        force=force, progress=progress,
    )  # fmt: skip


def _display_name(loaded: Loaded, md: dict | None) -> str:
    if md and isinstance(md.get("general.name"), str):
        return md["general.name"]
    return loaded.source.name


def default_type(to: str, loaded: Loaded) -> str:
    """--type auto: f16 for GGUF (llama.cpp's converter default), the model's dtype for HF."""
    if to == "gguf":
        return "f16"
    dtype = loaded.model.model.norm.weight.dtype
    return {torch.bfloat16: "bf16", torch.float16: "f16"}.get(dtype, "f32")


def export(
    model: str | None = None,
    adapter: str | None = None,
    to: str = "gguf",
    output: str | Path = "model.gguf",
    qtype: str = "auto",
    embedding_type: str | None = None,
    dtype: str = "float32",
    force: bool = False,
    progress: bool = True,
    loaded: Loaded | None = None,
    imatrix: str | Path | None = None,
) -> dict:
    """Loads a model (and merges an adapter), then writes it as GGUF or an HF folder.

    Args:
        model: a folder, a .gguf file, or None for the bundled model.
        adapter: a PEFT LoRA adapter folder to merge first.
        to: "gguf" or "hf".
        output: the .gguf file or the output folder.
        qtype: GGUF type (f32, f16, bf16, or a llama.cpp mix: q4_k_m, q6_k, q8_0, q4_0, ...)
            or HF dtype (f32, bf16, f16); "auto" picks f16 for GGUF and the model's dtype for HF.
        embedding_type: GGUF type of the token embedding (default: see gguf_writer).
        dtype: the dtype the model is loaded in (float32 keeps dequantized GGUF weights exact).
        force: overwrite a non-empty output folder (HF).
        loaded: an already loaded model to export instead of `model`.
        imatrix: an importance matrix file for the GGUF mixes (llama-imatrix's or gemmakit's).
    """
    if to not in TARGETS:
        raise GemmakitError(f"unknown export target {to!r}; use gguf or hf")
    if imatrix is not None and to != "gguf":
        raise GemmakitError("--imatrix applies to GGUF export only")
    importance = _read_importance(imatrix)  # before the model: a bad file fails fast
    if loaded is None:
        loaded = load(model, dtype=dtype, device="cpu")
    if adapter:
        loaded = apply_adapter(loaded, adapter)
    if qtype == "auto":
        qtype = default_type(to, loaded)
    if to == "gguf":
        result = export_gguf(loaded, output, qtype, embedding_type, progress, importance)
    else:
        result = export_hf(loaded, output, qtype, force, progress)
    result.update(
        source=str(loaded.source.path), adapter=str(adapter) if adapter else None, to=to, type=qtype
    )
    return result

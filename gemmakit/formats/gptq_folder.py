"""GPTQ checkpoint folders: the `quantization_config` transformers, optimum and vLLM read.

A GPTQ folder is an HF folder (`hf_folder.write_hf`) whose block linears are stored as
`<module>.qweight`, `.qzeros`, `.scales`, `.g_idx` (layout: `quant.packed4`) and whose
config.json carries `quantization_config` with `quant_method: gptq`. transformers 5 loads it
through gptqmodel (its `GptqHfQuantizer`), vLLM through its `gptq` / `gptq_marlin` method;
both read `checkpoint_format: gptq` as the v1 layout (zeros stored minus one). The older
compressed-tensors format (llmcompressor's `pack-quantized`) is what llmcompressor writes
today, but GPTQ's own layout is the one every GPTQ-aware tool reads, gptqmodel included, so it
is the one gemmakit writes and reads. AWQ folders (`quant_method: awq`, `version: gemm`,
AutoAWQ's layout, which transformers and vLLM also read) are written and read too; gemmakit
converts them to GPTQ's layout in memory (an AWQ zero point of 0, which v1 GPTQ cannot hold,
is refused).
"""

from __future__ import annotations

import json
from pathlib import Path

from gemmakit.errors import GemmakitError, ModelFileError

PACKED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


def gptq_config(group_size: int, desc_act: bool, bits: int = 4, settings=None) -> dict:
    """config.json's quantization_config for gemmakit's GPTQ weights (v1 layout); `settings`
    (a `quant.gptq.GPTQSettings`) records how they were rounded, as gptqmodel's config does."""
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": bool(settings and settings.sym),
        "checkpoint_format": "gptq",
        "damp_percent": settings.damp_percent if settings else 0.01,
        "true_sequential": bool(settings and settings.true_sequential),
        "static_groups": bool(settings and settings.static_groups),
        "mse": 2.4 if settings and settings.mse else 0.0,  # gptqmodel's field: the search's norm
        "quantizer": ["gemmakit"],
    }


def awq_config(group_size: int) -> dict:
    """config.json's quantization_config for AWQ weights in AutoAWQ's GEMM layout."""
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}


def read_quantization_config(folder: Path) -> dict | None:
    """The folder's GPTQ or AWQ quantization_config, None for an unquantized folder; a clear error
    for a quantization gemmakit does not read."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    q = config.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method not in ("gptq", "awq"):
        raise ModelFileError(f"{folder}: quant_method {method!r} is not read by gemmakit (GPTQ and AWQ are)")
    if q.get("bits", q.get("w_bit")) != 4:
        raise ModelFileError(f"{folder}: {method} with {q.get('bits')} bits; gemmakit reads 4-bit only")
    if method == "awq":
        q = dict(q, group_size=q.get("group_size", q.get("q_group_size")))
        if str(q.get("version", "gemm")).lower() != "gemm" or not q.get("zero_point", True):
            raise ModelFileError(
                f"{folder}: AWQ version {q.get('version')!r}; gemmakit reads GEMM with zero points"
            )
    elif q.get("checkpoint_format", "gptq") != "gptq":
        raise ModelFileError(
            f"{folder}: GPTQ checkpoint_format {q['checkpoint_format']!r}; gemmakit reads the 'gptq' (v1) layout"
        )
    if not isinstance(q.get("group_size"), int) or q["group_size"] <= 0:
        raise ModelFileError(f"{folder}: GPTQ group_size {q.get('group_size')!r}; per-group 4-bit only")
    return q


def write_gptq_folder(folder, state: dict, config, tokenizer, quantization: dict, dtype, **kwargs) -> dict:
    """Writes a GPTQ (or AWQ) folder from a state dict holding packed tensors in that layout."""
    from gemmakit.formats.hf_folder import write_hf

    if not any(k.endswith(".qweight") for k in state):
        raise GemmakitError("the model holds no packed 4-bit weights to write")
    return write_hf(folder, state, config, tokenizer, dtype=dtype, quantization_config=quantization, **kwargs)

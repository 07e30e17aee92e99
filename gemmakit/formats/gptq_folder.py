"""GPTQ checkpoint folders: the `quantization_config` transformers, optimum and vLLM read.

A GPTQ folder is an HF folder (`hf_folder.write_hf`) whose block linears are stored as
`<module>.qweight`, `.qzeros`, `.scales`, `.g_idx` (layout: `quant.packed4`) and whose
config.json carries `quantization_config` with `quant_method: gptq`. transformers 5 loads it
through gptqmodel (its `GptqHfQuantizer`), vLLM through its `gptq` / `gptq_marlin` method;
both read `checkpoint_format: gptq` as the v1 layout (zeros stored minus one). The older
compressed-tensors format (llmcompressor's `pack-quantized`) is what llmcompressor writes
today, but GPTQ's own layout is the one every GPTQ-aware tool reads, gptqmodel included, so it
is the one gemmakit writes and reads.
"""

from __future__ import annotations

import json
from pathlib import Path

from gemmakit.errors import GemmakitError, ModelFileError

PACKED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


def gptq_config(group_size: int, desc_act: bool, bits: int = 4) -> dict:
    """config.json's quantization_config for gemmakit's GPTQ weights (asymmetric, v1 layout)."""
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": False,
        "checkpoint_format": "gptq",
        "damp_percent": 0.01,
        "true_sequential": False,
        "static_groups": False,
        "quantizer": ["gemmakit"],
    }


def read_quantization_config(folder: Path) -> dict | None:
    """The folder's GPTQ quantization_config, None for an unquantized folder; a clear error
    for a quantization gemmakit does not read."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    q = config.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "gptq":
        raise ModelFileError(f"{folder}: quant_method {method!r} is not read by gemmakit (GPTQ folders are)")
    if q.get("bits") != 4:
        raise ModelFileError(f"{folder}: GPTQ with {q.get('bits')} bits; gemmakit reads 4-bit GPTQ only")
    if q.get("checkpoint_format", "gptq") != "gptq":
        raise ModelFileError(
            f"{folder}: GPTQ checkpoint_format {q['checkpoint_format']!r}; gemmakit reads the 'gptq' (v1) layout"
        )
    if not isinstance(q.get("group_size"), int) or q["group_size"] <= 0:
        raise ModelFileError(f"{folder}: GPTQ group_size {q.get('group_size')!r}; per-group 4-bit only")
    return q


def write_gptq_folder(folder, state: dict, config, tokenizer, quantization: dict, dtype, **kwargs) -> dict:
    """Writes a GPTQ folder from a state dict holding GPTQLinear tensors (see module docstring)."""
    from gemmakit.formats.hf_folder import write_hf

    if not any(k.endswith(".qweight") for k in state):
        raise GemmakitError("the model holds no GPTQ weights to write")
    return write_hf(folder, state, config, tokenizer, dtype=dtype, quantization_config=quantization, **kwargs)

"""One tensor's GGUF data in a given type, with llama.cpp's bytes, and the importance matrix
row that llama.cpp's quantizer would use for it.

    data = quantize_tensor(weight, GGMLQuantizationType.Q4_K, imatrix=importance)

The block types go through `gemmakit.ops.gguf_quantize` (the C quantizers, threads over
rows); F32, F16 and BF16 are numpy / torch casts with round-to-nearest-even, as ggml's row
converters do. `imatrix_for` follows llama-quant.cpp `llama_model_quantize_impl`: which
tensors use an entry, a missing entry (quantized without), a wrong size (an error, except for
the token embedding, which is then quantized without), non-finite values (an error).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from gemmakit.errors import GemmakitError
from gemmakit.ops.gguf import gguf_quantize

_TOKEN_EMBEDDINGS = ("token_embd.weight", "per_layer_token_embd.weight")


def quantize_tensor(t: torch.Tensor | np.ndarray, qtype: Q, imatrix: np.ndarray | None = None) -> np.ndarray:
    """The tensor's data as GGUF stores it in `qtype`: float32 / float16 arrays for F32 / F16,
    raw bytes (rows of blocks, uint8) for BF16 and the block types.

    Args:
        t: the tensor (any float dtype; converted to float32 first, as llama.cpp's quantizer
            reads its source as float32).
        qtype: the GGUF type.
        imatrix: per-column importance (ne[0] values, or ne[0] * experts for a 3-D tensor,
            expert after expert), or None.
    """
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(t)
    if qtype == Q.BF16:  # round to nearest even, as ggml_fp32_to_bf16_row_ref and torch do
        return t.detach().to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().view(np.uint8)
    x = t.detach().to(torch.float32).cpu().contiguous().numpy()
    if qtype == Q.F32:
        return x
    if qtype == Q.F16:
        return x.astype(np.float16)
    block = GGML_QUANT_SIZES[qtype][0]
    k = x.shape[-1]
    if k % block:
        raise GemmakitError(f"rows of {k} values are not a whole number of {qtype.name} blocks of {block}")
    if x.ndim <= 2 or imatrix is None:
        rows = x.reshape(-1, k)
        return gguf_quantize(rows, int(qtype), imatrix).reshape(*x.shape[:-1], -1)
    # a 3-D tensor (experts): each expert's rows use its own slice of the importance matrix
    experts = x.reshape(-1, x.shape[-2], k)
    weights = imatrix.reshape(experts.shape[0], k)
    out = [gguf_quantize(e, int(qtype), w) for e, w in zip(experts, weights)]
    return np.stack(out).reshape(*x.shape[:-1], -1)


def imatrix_for(
    name: str, shape: tuple[int, ...], importance: dict[str, np.ndarray] | None
) -> np.ndarray | None:
    """The importance values llama.cpp's quantizer uses for tensor `name` (PyTorch-order
    shape), or None when there are none for it; raises where llama.cpp refuses."""
    if not importance or name not in importance:
        return None
    values = importance[name]
    ne0 = shape[-1]
    experts = shape[0] if len(shape) == 3 else 1
    if values.size != ne0 * experts:
        if name in _TOKEN_EMBEDDINGS:
            return None
        raise GemmakitError(
            f"the importance matrix has {values.size} values for {name}, which has {ne0 * experts} columns"
        )
    return values


def check_importance(importance: dict[str, np.ndarray]) -> None:
    """Raises, as llama.cpp's quantizer does, on an importance matrix with non-finite values."""
    for name, values in importance.items():
        if not np.all(np.isfinite(values)):
            raise GemmakitError(f"the importance matrix has non-finite values for {name}")

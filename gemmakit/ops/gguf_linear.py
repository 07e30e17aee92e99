"""Products with GGUF block-quantized weights (quant/gguf_blocks.py): which kernel runs.

On the CPU with the C kernels (inference: decode, prefill, evaluation), every row count runs llama.cpp's product (kernels/csrc/gguf_act.c, gguf_dot.c): the activations are
rounded to 8-bit blocks (Q8_0 for Q4_0/Q5_0/Q8_0/IQ4_NL weights, Q8_1 for Q4_1/Q5_1, Q8_K for
the K-quants and IQ4_XS, with llama.cpp's x86 roundings) once per call, and integer dots with
the blocks' values are scaled per block in float32. That is the one rounding beyond float32
summation: each product's activation error is at most half a step of its block (|x| max / 254
per value). A row's result does not depend on how many rows the call has.

With `rounded=False` (the forward of a LoRA adapter's GGUF base) the activations keep float32: a few
rows go through the C product that dequantizes each block in registers (or L1), more rows
dequantize tiles of weight rows into float32 for torch's matmul, so a 262k-row matrix never
exists in float32 at once. Elsewhere (another device, no compiler) the `gguf` package
dequantizes on the CPU and the product is plain torch. The float paths multiply the same
dequantized values (the gguf package's, bit for bit) with float32 activations; only the order of
the additions differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gemmakit.kernels import cpu as cpu_kernels

# Weight values dequantized per tile of a many-row product: 16 MB of float32.
TILE_VALUES = 1 << 22


def gguf_supported(ggml_type: int, k: int) -> bool:
    """Whether the C kernels run rows of k values of this ggml type (the loader keeps such
    tensors in their blocks; others are dequantized as before)."""
    return cpu_kernels.gguf_row_bytes(int(ggml_type), k) is not None


def _reference(raw: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """The gguf package's dequantization, on the CPU (float32 (n, k))."""
    # Imported here: only the fallback needs numpy and the gguf package.
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf import quants as gguf_quants

    blocks = np.ascontiguousarray(raw.detach().cpu().numpy())
    return torch.from_numpy(gguf_quants.dequantize(blocks, GGMLQuantizationType(ggml_type)))


def gguf_dequantize(raw: torch.Tensor, ggml_type: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The float weight (n, k) in `dtype` of n rows of blocks (uint8 (n, row bytes))."""
    out = cpu_kernels.gguf_dequantize(raw, ggml_type, k)
    if out is None:
        out = _reference(raw, ggml_type).to(raw.device)
    return out.to(dtype)


def gguf_rows(
    raw: torch.Tensor, ggml_type: int, k: int, ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Rows `ids` (any shape) of the weight as (*ids.shape, k) in `dtype`: an embedding lookup."""
    out = cpu_kernels.gguf_rows(raw, ggml_type, k, ids) if ids.device.type == "cpu" else None
    if out is None:
        flat = ids.reshape(-1)
        out = _reference(raw[flat.to(raw.device)], ggml_type).to(ids.device).view(*ids.shape, k)
    return out.to(dtype)


def gguf_linear(
    x: torch.Tensor, raw: torch.Tensor, ggml_type: int, k: int, rounded: bool = True
) -> torch.Tensor:
    """x W^T for the (n, k) weight held as GGUF blocks `raw`; x (..., k), result (..., n) in
    x's dtype (computed in float32 on the CPU). `rounded`: the activations rounded to 8-bit
    blocks on the CPU (llama.cpp's product); False keeps them float32 (training's forward)."""
    n = raw.shape[0]
    rows = x.numel() // k
    if x.device.type == "cpu" and cpu_kernels.gguf_row_bytes(ggml_type, k) is not None:
        flat = x.reshape(rows, k).float()
        if rounded:
            y = cpu_kernels.gguf_matmul(flat, raw, ggml_type, k)
        elif rows <= cpu_kernels.GGUF_MATMUL_MAX_ROWS:
            y = cpu_kernels.gguf_matmul(flat, raw, ggml_type, k, rounded=False)
        else:
            y = torch.empty((rows, n), dtype=torch.float32)
            step = max(1, TILE_VALUES // k)
            for lo in range(0, n, step):
                tile = cpu_kernels.gguf_dequantize(raw[lo : lo + step], ggml_type, k)
                y[:, lo : lo + step] = flat @ tile.T  # (rows, k) @ (k, tile)
        if y is not None:
            return y.to(x.dtype).view(*x.shape[:-1], n)
    return F.linear(x, gguf_dequantize(raw, ggml_type, k, x.dtype))

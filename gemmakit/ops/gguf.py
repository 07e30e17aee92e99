"""GGUF block quantization: llama.cpp's block bytes from the C quantizer (kernels/csrc/
gguf_quantize.c), or, without a C compiler, the `gguf` package's numpy quantizers for the
types it has (the same bytes for Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 without an importance
matrix); the K-quants and imatrix-weighted types need the C kernel."""

from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from gemmakit.errors import GemmakitError
from gemmakit.kernels import cpu

# the types gguf-py quantizes in numpy
_NUMPY_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)


def gguf_quantize(x: np.ndarray, ggml_type: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """x (n, k) float32 as (n, row bytes) uint8 blocks of ggml type `ggml_type`, with the
    importance matrix's (k,) column weights or None."""
    rows = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    weights = None if imatrix is None else torch.from_numpy(np.ascontiguousarray(imatrix, dtype=np.float32))
    out = cpu.gguf_quantize_rows(rows, ggml_type, weights)
    if out is not None:
        return out.numpy()
    qtype = Q(ggml_type)
    if imatrix is None and qtype in _NUMPY_TYPES:
        return gguf.quants.quantize(x, qtype)
    raise GemmakitError(
        f"writing {qtype.name}{' with an importance matrix' if imatrix is not None else ''} needs "
        "gemmakit's C kernels (a C compiler on Linux; unset GEMMAKIT_NO_C_KERNELS)"
    )

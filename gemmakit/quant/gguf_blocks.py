"""GGUF block-quantized weights kept as the file stores them (llama.cpp's Q4_0 ... Q6_K).

A `GGUFLinear` holds the raw block bytes of an (N, K) matrix (uint8 (N, row bytes), usually
a zero-copy view of the memory-mapped file) and its ggml type id; `forward` multiplies
through `gemmakit.ops.gguf_linear` (C kernels on the CPU, the `gguf` package elsewhere; the
activations rounded to llama.cpp's 8-bit blocks, except while autograd records, where a frozen
base under a LoRA adapter keeps them float32),
`dequantize()` gives the float weight (merging, export, the QLoRA-style backward of
`QuantizedLinear`), `rows()` an embedding lookup on the same bytes. The tied embedding of a
GGUF is a `GGUFEmbedding` (a `QuantizedEmbedding`) over the lm_head's `GGUFLinear`, so the
matrix is stored once, as with gemmakit's own int8/int4 quantization, and every consumer of
quantized models (export's `dequantized_state_dict`, LoRA's frozen base, the C decode step)
takes it as it takes those.

The state dict holds the bytes under `<module>.weight` as uint8: no float consumer can
mistake them for weights (shapes and dtypes differ), and export dequantizes them first.
"""

from __future__ import annotations

import torch

from gemmakit import ops
from gemmakit.quant.linear import FrozenWeightMatmul, QuantizedEmbedding, QuantizedLinear


class _FloatActivationMatmul(FrozenWeightMatmul):
    """The frozen-weight product whose forward keeps the activations float32 (training)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return ops.gguf_linear(x, module.weight, module.ggml_type, module.in_features, rounded=False)


class GGUFLinear(QuantizedLinear):
    """A bias-free linear layer whose (N, K) weight stays in GGUF blocks of one ggml type.

    Buffers: `weight` (uint8 (N, K / block values * block bytes)).
    """

    kind = "gguf"

    def __init__(self, raw: torch.Tensor, ggml_type: int, in_features: int, compute_dtype=torch.float32):
        super().__init__(in_features, raw.shape[0], compute_dtype)
        self.ggml_type = int(ggml_type)
        self.register_buffer("weight", raw)

    @property
    def type_name(self) -> str:
        from gemmakit.formats.ggml_types import GGMLQuantizationType

        return GGMLQuantizationType(self.ggml_type).name

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return ops.gguf_dequantize(self.weight, self.ggml_type, self.in_features, dtype or self.compute_dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return ops.gguf_rows(self.weight, self.ggml_type, self.in_features, ids, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _FloatActivationMatmul.apply(x, self)
        return self._matmul(x)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gguf_linear(x, self.weight, self.ggml_type, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.type_name}"


class GGUFEmbedding(QuantizedEmbedding):
    """The embedding lookup over a `GGUFLinear` (the tied lm_head's matrix, or an untied table
    the caller registers itself): only the gathered rows are dequantized."""

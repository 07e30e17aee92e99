"""The one door from the model, quantization, LoRA and the loss to the kernels.

Each function here computes one op and decides where it runs: a C kernel from
`gemmakit.kernels.cpu` (CPU training paths, the int8 decode product, NF4 dequantization, GGUF block products), a
specific torch kernel (SDPA with a backend list, torch's int8/int4 CPU kernels, its CPU
flash attention) or plain torch. Callers write the maths once and never test devices, dtypes
or grad modes themselves. A fast path gives the plain path's numbers, bit for bit or up to the
roundings its docstring names (torch's int8/int4 kernels round activations to bfloat16).
"""

from gemmakit.ops.cross_entropy import linear_cross_entropy
from gemmakit.ops.dot_product_attention import attention
from gemmakit.ops.gguf_linear import gguf_dequantize, gguf_linear, gguf_rows, gguf_supported
from gemmakit.ops.lora import lora_linear
from gemmakit.ops.pointwise import geglu, rms_norm, rope
from gemmakit.ops.quantized import (
    int4_linear,
    int8_linear,
    int_kernels_vectorized,
    nf4_dequantize,
    nf4_linear,
)
from gemmakit.ops.sampling import top_candidates

__all__ = [
    "attention",
    "geglu",
    "gguf_dequantize",
    "gguf_linear",
    "gguf_rows",
    "gguf_supported",
    "int4_linear",
    "int8_linear",
    "int_kernels_vectorized",
    "linear_cross_entropy",
    "lora_linear",
    "nf4_dequantize",
    "nf4_linear",
    "rms_norm",
    "rope",
    "top_candidates",
]

"""Weight-only quantization of Gemma: NF4 (QLoRA layout), int8 per channel, int4 group-wise,
and GGUF's block types executed as the file stores them.

The codecs (nf4, integer), the quantized modules (linear, gguf_blocks) and the module swap over a whole
model (apply).
"""

from gemmakit.quant.apply import (
    KINDS,
    dequantized_state_dict,
    float_memory,
    is_quantized,
    model_memory,
    quantize_model,
)
from gemmakit.quant.gguf_blocks import GGUFEmbedding, GGUFLinear
from gemmakit.quant.integer import row_chunks, tinygemm_layout
from gemmakit.quant.linear import Int4Linear, Int8Linear, NF4Linear, QuantizedEmbedding, QuantizedLinear

__all__ = [
    "GGUFEmbedding",
    "GGUFLinear",
    "KINDS",
    "Int4Linear",
    "Int8Linear",
    "NF4Linear",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "dequantized_state_dict",
    "float_memory",
    "is_quantized",
    "model_memory",
    "quantize_model",
    "row_chunks",
    "tinygemm_layout",
]

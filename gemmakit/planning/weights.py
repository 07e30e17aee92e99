"""Bytes of a model's weights in each precision: 32/16-bit, bitsandbytes int8 and NF4, GGUF types.

The bitsandbytes formats quantize only the projections inside the blocks; the GGUF types follow
llama.cpp's quantizer tensor by tensor (`gguf_tensor_types`), so on the bundled Q4_K_M file
the estimate matches the file's tensor bytes exactly.
"""

from __future__ import annotations

import math

from gemmakit.planning.architecture import EMBEDDING, OUTPUT, PER_LAYER_EMBEDDING, Architecture, Tensor

# GGML block sizes and bytes per block (llama.cpp gguf-py constants.GGML_QUANT_SIZES).
GGML_BLOCKS = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18),
    "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q4_K": (256, 144),
    "Q5_K": (256, 176), "Q6_K": (256, 210),
}  # fmt: skip
# llama-quantize file type -> the GGML type of most of its matrices.
GGUF_FTYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K"}
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "nf4", "q8_0", "q4_0", "q4_k_m")

# bitsandbytes NF4 with double quantization (QLoRA paper §3, bitsandbytes functional.py):
# 4-bit codes, one 8-bit absmax per 64 weights, one fp32 absmax per 256 of those.
NF4_BLOCK, NF4_DQ_BLOCK = 64, 256
NF4_BITS_PER_WEIGHT = 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_DQ_BLOCK)  # 4.127


def nf4_bytes(numel: int) -> int:
    """Bytes of one NF4+DQ tensor: packed codes, 8-bit block absmax, fp32 second-level absmax."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_DQ_BLOCK)


def int8_bytes(t: Tensor) -> int:
    """LLM.int8 (bitsandbytes Linear8bitLt): int8 weights plus one fp32 scale per output row."""
    return t.numel + 4 * t.shape[0]


def weight_bytes(arch: Architecture, precision: str) -> int:
    """Bytes of the text model's weights in one precision.

    int8 and nf4 follow bitsandbytes through transformers: only the projections inside the
    blocks are quantized; embeddings, lm_head, norms and biases stay 16-bit, and so do Gemma
    3n/4's per-layer embedding table, gates, AltUp/LAuReL/router weights and stacked expert
    weights, as gemmakit's own --quantize leaves them (it swaps the seven projections only). The GGUF types
    follow llama.cpp's quantizer (`gguf_tensor_types`) and count tensor data only.
    """
    tensors = arch.tensors()
    if precision == "fp32":
        return 4 * sum(t.numel for t in tensors)
    if precision in ("bf16", "fp16"):
        return 2 * sum(t.numel for t in tensors)
    if precision in ("int8", "nf4"):
        quant = int8_bytes if precision == "int8" else (lambda t: nf4_bytes(t.numel))
        return sum(quant(t) if t.is_linear else 2 * t.numel for t in tensors)
    if precision in GGUF_FTYPES:
        return sum(gguf_bytes(arch, precision).values())
    raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")


# Tensors llama-quantize leaves in the type the converter wrote, by a piece of their HF name
# (llama.cpp src/llama-quant.cpp tensor_allows_quantization: the router [ffn_gate_inp],
# altup, laurel, per_layer_model_proj); convert_hf_to_gguf.py writes the router and AltUp's
# coefficient matrices in F32 and the others in the file's 16 bits. First match wins.
_KEPT_TYPES = (
    ("router.proj.weight", "F32"),
    ("altup.correction_coefs", "F32"),
    ("altup.prediction_coefs", "F32"),
    ("altup", "F16"),
    ("laurel", "F16"),
    ("per_layer_model_projection", "F16"),
)


def _layer_index(name: str) -> int:
    """i of model.layers.{i}. in an HF tensor name."""
    return int(name.split("model.layers.", 1)[1].split(".", 1)[0])


def gguf_tensor_types(arch: Architecture, ftype: str) -> dict[str, str]:
    """The GGML type llama-quantize gives each tensor for ftype q8_0, q4_0 or q4_k_m.

    The rule, from llama.cpp src/llama-quant.cpp (llama_tensor_get_type), with llama.cpp's
    tensor names in brackets:
      * 1-D tensors (norms, biases, scales) stay F32;
      * lm_head [output] (or, when tied, embed_tokens [token_embd] and Gemma 3n/4's
        per-layer table [per_layer_token_embd], both token embeddings to llama.cpp) becomes
        Q6_K, or Q8_0 if its rows are not a multiple of the base type's block; Q8_0 files keep
        it Q8_0;
      * the router, AltUp, LAuReL and the per-layer projection are not quantized (_KEPT_TYPES);
      * Q4_K_M: Q4_K everywhere, except v_proj [attn_v] (counted over the layers that have
        one) and down_proj [ffn_down], the experts' included [ffn_down_exps] (by layer index),
        on the layers where use_more_bits(i, n) holds (first and last eighth, every third
        between): Q6_K;
      * k-quants need rows that are a multiple of 256: otherwise Q4_K falls back to Q5_0,
        Q5_K to Q5_1, Q6_K to Q8_0 (and anything else to F16).
    """
    if ftype not in GGUF_FTYPES:
        raise ValueError(f"unknown GGUF type {ftype!r}; known: {', '.join(GGUF_FTYPES)}")
    from gemmakit.formats.gguf_mix import use_more_bits  # the writer's rule (imports gguf)

    base = GGUF_FTYPES[ftype]
    tensors = arch.tensors()
    # llama.cpp counts attn_v tensors in order, but takes ffn_down's layer from its index.
    v_seen, v_total = 0, sum(t.kind == "v_proj" for t in tensors)
    out = {}
    for t in tensors:
        kept = next((kind for piece, kind in _KEPT_TYPES if piece in t.name), None)
        if len(t.shape) < 2 or kept:
            out[t.name] = "F32" if len(t.shape) < 2 else kept
            continue
        row = t.shape[-1]  # ggml ne[0]
        new = base
        token_embedding = t.kind in (EMBEDDING, PER_LAYER_EMBEDDING)
        if t.kind == OUTPUT or (token_embedding and arch.tie_word_embeddings):
            if row % GGML_BLOCKS[base][0]:
                new = "Q8_0"
            elif base != "Q8_0":
                new = "Q6_K"
        elif t.kind == "v_proj":
            if ftype == "q4_k_m" and use_more_bits(v_seen, v_total):
                new = "Q6_K"
            v_seen += 1
        elif t.kind == "down_proj" or t.name.endswith("experts.down_proj"):
            if ftype == "q4_k_m" and use_more_bits(_layer_index(t.name), arch.num_layers):
                new = "Q6_K"
        if row % GGML_BLOCKS[new][0]:
            new = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}.get(new, "F16")
            if row % GGML_BLOCKS[new][0]:
                new = "F16"
        out[t.name] = new
    return out


def ggml_nbytes(numel: int, ggml_type: str) -> int:
    block, size = GGML_BLOCKS[ggml_type]
    return numel // block * size


def gguf_bytes(arch: Architecture, ftype: str) -> dict[str, int]:
    """Tensor-data bytes per GGML type of a llama-quantize'd file (see gguf_tensor_types),
    largest first."""
    types = gguf_tensor_types(arch, ftype)
    out: dict[str, int] = {}
    for t in arch.tensors():
        out[types[t.name]] = out.get(types[t.name], 0) + ggml_nbytes(t.numel, types[t.name])
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))

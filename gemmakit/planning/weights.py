"""Bytes of a model's weights in each precision: 32/16-bit, bitsandbytes int8 and NF4, GGUF types.

The bitsandbytes formats quantize only the projections inside the blocks; the GGUF types follow
llama.cpp's quantizer tensor by tensor (`gguf_tensor_types`, the GGUF writer's own plan), so on
the bundled Q4_K_M file the estimate matches the file's tensor bytes exactly.
"""

from __future__ import annotations

import math

from gemmakit.planning.architecture import Architecture, Tensor

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


def _converter_type(t: Tensor) -> str:
    """The type convert_hf_to_gguf.py writes a tensor llama-quantize does not quantize in."""
    if len(t.shape) < 2:
        return "F32"  # norms, biases, scales
    return next((kind for piece, kind in _KEPT_TYPES if piece in t.name), "F32")


def _gguf_shapes(arch: Architecture) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(HF name -> GGUF name, GGUF name -> PyTorch-order shape) of the file the writer makes
    of `arch`: llama.cpp's names (`formats.gguf`), Gemma 3n's AltUp projections stacked into
    one tensor; a tensor without a GGUF name (a Qwen2 bias) keeps its HF name."""
    from gemmakit.formats.gguf import STACKED_NAMES, hf_to_gguf_name

    names, shapes = {}, {}
    for t in arch.tensors():
        stacked = next((g for g, pattern in STACKED_NAMES.items() if _matches(pattern, t.name)), None)
        if stacked is not None:
            count = shapes.get(stacked, (0,))[0]
            names[t.name], shapes[stacked] = stacked, (count + 1, *t.shape)  # (n - 1, D, D)
            continue
        g_name = hf_to_gguf_name(t.name) or t.name
        names[t.name], shapes[g_name] = g_name, t.shape
    return names, shapes


def _matches(pattern: str, name: str) -> bool:
    head, _, tail = pattern.partition("{}")
    return name.startswith(head) and name.endswith(tail) and name[len(head) : -len(tail)].isdigit()


def gguf_tensor_types(arch: Architecture, ftype: str) -> dict[str, str]:
    """The GGML type llama-quantize gives each tensor (by HF name) for a mix such as q8_0,
    q4_0 or q4_k_m: the writer's own plan (`formats.gguf_mix.plan_mix`, llama.cpp's
    llama_tensor_get_type rules and fallbacks) over the GGUF tensors of `arch`, from a float
    file; the tensors llama.cpp never quantizes keep the converter's type (`_converter_type`).
    """
    from gemmakit.formats.gguf_mix import MIXES, ModelShape, allows_quantization, plan_mix

    if ftype not in MIXES:
        raise ValueError(f"unknown GGUF type {ftype!r}; known: {', '.join(MIXES)}")
    names, shapes = _gguf_shapes(arch)
    model = ModelShape(
        n_layer=arch.num_layers,
        n_gqa=arch.num_heads // max(1, arch.layer(0).kv_heads),
        n_expert=arch.num_experts,
    )
    planned = plan_mix(shapes, ftype, model).types
    out = {}
    for t in arch.tensors():
        g_name = names[t.name]
        kept = not allows_quantization(g_name, shapes[g_name])
        out[t.name] = _converter_type(t) if kept else planned[g_name].name
    return out


def ggml_nbytes(numel: int, ggml_type: str) -> int:
    from gemmakit.formats.gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    return numel // block * size


def gguf_bytes(arch: Architecture, ftype: str) -> dict[str, int]:
    """Tensor-data bytes per GGML type of a llama-quantize'd file (see gguf_tensor_types),
    largest first."""
    types = gguf_tensor_types(arch, ftype)
    out: dict[str, int] = {}
    for t in arch.tensors():
        out[types[t.name]] = out.get(types[t.name], 0) + ggml_nbytes(t.numel, types[t.name])
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))

"""llama.cpp's per-tensor type choice for a quantization mix (Q4_K_M, Q3_K_S, Q8_0, ...).

This follows `src/llama-quant.cpp` of the llama.cpp vendored by llama-cpp-python 0.3.36, the
parts that apply to the K-quant, IQ4 and legacy mixes (the 1-3 bit IQ, TQ and MXFP4 mixes are
not written by gemmakit):
- `tensor_allows_quantization`: 2-D+ tensors named `*weight`, never norms, MoE routers
  (`ffn_gate_inp`), Gemma 3n's AltUp / LAuReL / per-layer projection; the rest keep their
  source type (float32 here);
- `llama_tensor_get_type_impl`: the output (or the token embedding when tied) gets Q6_K, or
  Q8_0 when its rows are not a whole number of the mix's blocks; attn_v and ffn_down get more
  bits in the layers `use_more_bits` picks; attn_output more for Q2_K / Q3_K_M / Q3_K_L;
- `tensor_type_fallback`: a type whose block does not divide the row falls back (Q2_K/Q3_K ->
  Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL), then to F16 if that still does not fit;
- `tensor_requires_imatrix`: Q2_K_S's Q2_K tensors need an importance matrix.
The counters that pick layers (`i_attention_wv`, `i_ffn_down`) advance in llama.cpp's tensor
order, by layer number then name (llama-model-loader.h `weight_name_comparer`), which
`llama_order` gives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as Q

from gemmakit.errors import GemmakitError

# --type name -> (file type llama.cpp records, the mix's default tensor type)
# (llama-quant.cpp llama_ftype_get_default_type)
MIXES = {
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "q6_k": (LlamaFileType.MOSTLY_Q6_K, Q.Q6_K),
    "q5_k_m": (LlamaFileType.MOSTLY_Q5_K_M, Q.Q5_K),
    "q5_k_s": (LlamaFileType.MOSTLY_Q5_K_S, Q.Q5_K),
    "q5_1": (LlamaFileType.MOSTLY_Q5_1, Q.Q5_1),
    "q5_0": (LlamaFileType.MOSTLY_Q5_0, Q.Q5_0),
    "q4_k_m": (LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K),
    "q4_k_s": (LlamaFileType.MOSTLY_Q4_K_S, Q.Q4_K),
    "iq4_xs": (LlamaFileType.MOSTLY_IQ4_XS, Q.IQ4_XS),
    "iq4_nl": (LlamaFileType.MOSTLY_IQ4_NL, Q.IQ4_NL),
    "q4_1": (LlamaFileType.MOSTLY_Q4_1, Q.Q4_1),
    "q4_0": (LlamaFileType.MOSTLY_Q4_0, Q.Q4_0),
    "q3_k_l": (LlamaFileType.MOSTLY_Q3_K_L, Q.Q3_K),
    "q3_k_m": (LlamaFileType.MOSTLY_Q3_K_M, Q.Q3_K),
    "q3_k_s": (LlamaFileType.MOSTLY_Q3_K_S, Q.Q3_K),
    "q2_k": (LlamaFileType.MOSTLY_Q2_K, Q.Q2_K),
    "q2_k_s": (LlamaFileType.MOSTLY_Q2_K_S, Q.Q2_K),
}

# tensor_type_fallback: the type a 256-block type falls back to when the row does not fit
_FALLBACK = {
    Q.Q2_K: Q.Q4_0,
    Q.Q3_K: Q.Q4_0,
    Q.Q4_K: Q.Q5_0,
    Q.Q5_K: Q.Q5_1,
    Q.Q6_K: Q.Q8_0,
    Q.IQ4_XS: Q.IQ4_NL,
}

# tensor_allows_quantization: name parts whose tensors are never quantized (of those that can
# occur in a Gemma model)
_KEEP_SOURCE_TYPE = ("_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj")

_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    """What llama.cpp's rules read from the model's hyper-parameters."""

    n_layer: int  # hparams.n_layer_all: n_ffn_down / n_ffn_gate / n_ffn_up
    n_gqa: int  # hparams.n_gqa(): attention heads per KV head, of layer 0
    n_expert: int = 0


@dataclass
class _State:
    """quantize_state_impl: the counters the rules read, advanced tensor by tensor."""

    n_attention_wv: int
    n_ffn_down: int
    has_tied_embeddings: bool
    has_imatrix: bool
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    n_fallback: int = 0
    fallbacks: list[str] = field(default_factory=list)


def _layer_of(name: str) -> int:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def llama_order(names: list[str]) -> list[str]:
    """Tensor names in the order llama.cpp's quantizer visits (and writes) them: by layer
    number (non-layer tensors first), then by name."""
    return sorted(names, key=lambda n: (_layer_of(n), n))


def _category(name: str) -> str:
    """llama-quant.cpp tensor_get_category, with the attn_v-like categories (fused QKV, MLA's
    kv_b: category_is_attn_v) as one: the same rules and counter apply to them."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, category in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"),
                           ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                           ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                           ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):  # fmt: skip
        if part in name:
            return category
    return "other"


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """llama-quant.cpp tensor_allows_quantization (ggml_n_dims counts up to the last dimension
    above 1, in ggml's fastest-first order)."""
    ne = tuple(reversed(shape))
    n_dims = max([i + 1 for i, n in enumerate(ne) if n > 1] or [1])
    if n_dims < 2 or not name.endswith("weight"):
        return False
    return not any(part in name for part in _KEEP_SOURCE_TYPE)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp src/llama-quant.cpp, use_more_bits: the first and last eighth of the layers,
    and every third between, get more bits in the _M mixes."""
    # C integer division; i_layer - n_layers // 8 >= 0 wherever the remainder is taken
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _mix_rule(st: _State, mix: str, new: Q, name: str, ne0: int, shape: ModelShape) -> Q:
    """llama_tensor_get_type_impl for the K-quant and legacy mixes."""
    category = _category(name)
    if category == "output" or (st.has_tied_embeddings and category == "token_embd"):
        if ne0 % GGML_QUANT_SIZES[new][0]:
            return Q.Q8_0
        return Q.Q6_K if new != Q.Q8_0 else new
    if category == "token_embd":
        return new
    if category == "attn_v":
        new = _attn_v_rule(st, mix, new, shape)
        st.i_attention_wv += 1
        return new
    if category == "attn_k":
        return Q.Q8_0 if shape.n_expert == 8 else new
    if category == "ffn_down":
        i_layer, n_layer = st.i_ffn_down, st.n_ffn_down
        if shape.n_expert > 1:
            i_layer = _layer_of(name)
            if not 0 <= i_layer < n_layer:
                raise GemmakitError(f"bad layer {i_layer} for tensor {name}")
        new = _ffn_down_rule(st, mix, new, i_layer, n_layer)
        st.i_ffn_down += 1
        return new
    if category == "attn_output":
        if shape.n_expert == 8:
            return (
                Q.Q5_K if mix in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m", "iq4_nl", "iq4_xs") else new
            )
        return {"q2_k": Q.Q3_K, "q3_k_m": Q.Q4_K, "q3_k_l": Q.Q5_K}.get(mix, new)
    return new


def _attn_v_rule(st: _State, mix: str, new: Q, shape: ModelShape) -> Q:
    i, n = st.i_attention_wv, st.n_attention_wv
    if mix == "q2_k":
        new = Q.Q4_K if shape.n_gqa >= 4 else Q.Q3_K
    elif mix == "q2_k_s" and shape.n_gqa >= 4:
        new = Q.Q4_K
    elif mix == "q3_k_m":
        new = Q.Q5_K if i < 2 else Q.Q4_K
    elif mix == "q3_k_l":
        new = Q.Q5_K
    elif mix in ("iq4_nl", "iq4_xs") and shape.n_gqa >= 4:
        new = Q.Q5_K
    elif mix in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
        new = Q.Q6_K
    elif mix == "q4_k_s" and i < 4:
        new = Q.Q5_K
    if shape.n_expert == 8:
        new = Q.Q8_0
    return new


def _ffn_down_rule(st: _State, mix: str, new: Q, i_layer: int, n_layer: int) -> Q:
    if mix == "q2_k":
        return Q.Q3_K
    if mix == "q2_k_s":
        return Q.Q4_K if i_layer < n_layer // 8 else new
    if mix == "q3_k_m":
        return Q.Q5_K if i_layer < n_layer // 16 else Q.Q4_K  # Q3_K only for Falcon
    if mix == "q3_k_l":
        return Q.Q5_K
    if mix == "q4_k_m":
        return Q.Q6_K if use_more_bits(i_layer, n_layer) else new
    if i_layer < n_layer // 8 and mix in ("iq4_nl", "iq4_xs") and not st.has_imatrix:
        return Q.Q5_K
    if mix == "q5_k_m" and use_more_bits(i_layer, n_layer):
        return Q.Q6_K
    if mix == "q4_k_s" and i_layer < n_layer // 8:
        return Q.Q5_K
    if mix in ("q4_0", "q5_0") and st.has_imatrix and i_layer < n_layer // 8:
        return Q.Q4_1 if mix == "q4_0" else Q.Q5_1
    return new


def _fallback(st: _State, name: str, ne0: int, new: Q) -> Q:
    """tensor_type_fallback: a type whose block does not divide the row's length."""
    block = GGML_QUANT_SIZES[new][0]
    if ne0 % block == 0:
        return new
    st.n_fallback += 1
    fallback = _FALLBACK.get(new, new)
    if ne0 % GGML_QUANT_SIZES[fallback][0]:
        fallback = Q.F16
    st.fallbacks.append(f"{name}: rows of {ne0} do not fit {new.name}, written as {fallback.name}")
    return fallback


@dataclass(frozen=True)
class MixPlan:
    """A mix's choice for every tensor: its type, whether it needs an importance matrix, and
    notes on the fallbacks taken."""

    types: dict[str, Q]
    requires_imatrix: frozenset[str]
    notes: list[str]


def plan_mix(
    tensors: dict[str, tuple[int, ...]],
    mix: str,
    shape: ModelShape,
    has_imatrix: bool = False,
    embedding_type: Q | None = None,
    source_type: Q = Q.F32,
) -> MixPlan:
    """The GGUF type of each tensor (GGUF name -> PyTorch-order shape) under `mix`, as
    llama.cpp's quantizer picks it from a `source_type` file.

    Args:
        embedding_type: llama.cpp's --token-embedding-type: the token embedding's type,
            whatever the mix (then the block fallback to F16 where rows do not fit).
    """
    if mix not in MIXES:
        raise GemmakitError(f"unknown quantization mix {mix!r}; choose one of {', '.join(MIXES)}")
    default = MIXES[mix][1]
    st = _State(
        n_attention_wv=sum(_category(n) == "attn_v" for n in tensors),
        n_ffn_down=shape.n_layer,
        has_tied_embeddings="output.weight" not in tensors,
        has_imatrix=has_imatrix,
    )
    types, needs = {}, set()
    for name in llama_order(list(tensors)):
        ne0 = tensors[name][-1]
        if not allows_quantization(name, tensors[name]):
            types[name] = source_type
            continue
        if embedding_type is not None and _category(name) == "token_embd":
            t = embedding_type
            types[name] = t if ne0 % GGML_QUANT_SIZES[t][0] == 0 else Q.F16
            continue
        t = _fallback(st, name, ne0, _mix_rule(st, mix, default, name, ne0, shape))
        types[name] = t
        if t == Q.Q2_K and mix == "q2_k_s" and _category(name) not in ("token_embd", "output"):
            needs.add(name)
    return MixPlan(types, frozenset(needs), st.fallbacks)

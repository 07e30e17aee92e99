"""Drives the single-sequence decode step in C (csrc/decode_step.c): torch prefills, C decodes.

`decoder(model, cache, batch)` returns a `CDecoder` when the C step can run this model as
the torch model (gemmakit/model/) does: one sequence on the CPU, every matrix float32,
bfloat16, int8 weight-only (gemmakit's int8 quantization) or GGUF blocks of a type
csrc/gguf_blocks.c runs (a GGUF loaded with its own types), no adapters, no training. Else
it returns None and the caller runs the torch model. Activations are float32 in the step; a
float32 model therefore decodes as the torch model does up to the order of additions
(tests/test_c_decode.py), while a bfloat16 model keeps bfloat16 weights and KV cache but is
not rounded to bfloat16 after every operation, as llama.cpp runs its 16-bit files. The C step
reads the model's own weight and KV-cache tensors (no copies) and the cache's slot
bookkeeping stays the cache's (`KVCache.append_dense`), so a generation can switch between
the two paths at any step. The structs handed to C (Mat, Layer, Model, Step) and the weight
type codes are those csrc/gemmakit_kernels.h declares (kernels/bindings.py).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from gemmakit.config import FULL, SLIDING, GemmaConfig
from gemmakit.kernels import bindings
from gemmakit.kernels import cpu as cpu_kernels
from gemmakit.model.cache import KVCache
from gemmakit.model.gemma import Gemma
from gemmakit.model.layers import RMSNorm
from gemmakit.quant.gguf_blocks import GGUFLinear
from gemmakit.quant.linear import Int8Linear, QuantizedEmbedding

GROUPS = (FULL, SLIDING)  # the step's per-group slot and visible count, by index
_DECLARED = bindings.declarations()
_Mat, _Layer, _Model, _Step = (_DECLARED.structs[name] for name in ("Mat", "Layer", "Model", "Step"))
W_F32, W_INT8, W_BF16, W_GGUF_BASE = (
    _DECLARED.constants[name] for name in ("W_F32", "W_INT8", "W_BF16", "W_GGUF_BASE")
)
WEIGHT_TYPES = {torch.float32: W_F32, torch.bfloat16: W_BF16}
_INV_FREQ = dict(_Model._fields_)["inv_freq"]  # one RoPE frequency pointer per group


def _plain(t: torch.Tensor) -> bool:
    """A contiguous CPU tensor of a dtype the C step reads."""
    return t.dtype in WEIGHT_TYPES and t.device.type == "cpu" and t.is_contiguous()


def _matrix(weight_type: int, w: torch.Tensor, scale: torch.Tensor | None = None):
    """A Mat over the (n, k) weight `w` (and for int8 its row scales)."""
    n, k = w.shape
    return _Mat(type=weight_type, w=w.data_ptr(), s=None if scale is None else scale.data_ptr(), n=n, k=k)


def _mat(module: nn.Module, keep: list):
    """The C view of a linear layer's matrix, or None when the C step cannot read it."""
    if isinstance(module, GGUFLinear):  # the file's blocks as they are (csrc/gguf_blocks.c)
        w = module.weight
        if (
            w.device.type != "cpu"
            or not w.is_contiguous()
            or not cpu_kernels.gguf_row_bytes(module.ggml_type, module.in_features)
        ):
            return None
        return _Mat(
            type=W_GGUF_BASE + module.ggml_type,
            w=w.data_ptr(),
            s=None,
            n=module.out_features,
            k=module.in_features,
        )
    if isinstance(module, Int8Linear):
        w, s = module.weight, module.weight_scale.float().contiguous()
        if w.device.type != "cpu" or not w.is_contiguous():
            return None
        keep.append(s)
        return _matrix(W_INT8, w, s)
    if type(module) is nn.Linear and module.bias is None and _plain(module.weight):
        return _matrix(WEIGHT_TYPES[module.weight.dtype], module.weight)
    return None


def _gain(norm: nn.Module, keep: list) -> int | None:
    """Pointer to a norm's 1 + w in float32; 0 for an identity (absent) norm; None if unusable."""
    if isinstance(norm, nn.Identity):
        return 0
    if type(norm) is not RMSNorm:
        return None
    gain = norm.gain().contiguous()
    keep.append(gain)
    return gain.data_ptr()


class CDecoder:
    """Runs decode steps of one sequence in C against `model` and `cache`."""

    def __init__(self, lib, model: Gemma, cache: KVCache, spec: _Model, keep: list):
        # The model, cache and `keep` (derived tensors, the layer array) own the memory `spec`
        # points into: they live as long as the decoder.
        self.lib, self.model, self.cache, self.spec, self._keep = lib, model, cache, spec, keep
        self.logits = torch.empty((1, model.config.vocab_size), dtype=torch.float32)
        self._step = _Step(logits=self.logits.data_ptr())
        self._dense: bool | None = None

    def step(self, token: int) -> torch.Tensor | None:
        """Feeds one token; the logits (1, V) of the next one (a buffer reused each step), or
        None when the C step does not apply to this cache (the caller runs the torch model)."""
        cache = self.cache
        col = cache.length
        if col >= cache.max_length:
            return None
        if self._dense is None:  # after the prefill: does every column so far hold a token?
            self._dense = bool(cache.valid[0, :col].all())
        if not self._dense:  # a left-padded row: the torch step builds the masks
            return None
        st = self._step
        st.token, st.position = token, col
        for kind, (slot, visible) in cache.append_dense().items():
            i = GROUPS.index(kind)
            st.slot[i], st.visible[i] = slot, visible
        if self.lib.decode_step(ctypes.byref(self.spec), ctypes.byref(st), torch.get_num_threads()):
            raise MemoryError("the C decode step could not allocate its buffers")
        return self.logits


def _layer(block: nn.Module, layer_cache, keep: list):
    """The C view of one decoder block and its KV cache, or None when the C step cannot run it."""
    attn, mlp = block.self_attn, block.mlp
    projections = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj}
    projections |= {"gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}
    mats = {name: _mat(module, keep) for name, module in projections.items()}
    norms = {
        "input_norm": _gain(block.input_layernorm, keep),
        "post_attention_norm": _gain(block.post_attention_layernorm, keep),
        "pre_feedforward_norm": _gain(block.pre_feedforward_layernorm, keep),
        "post_feedforward_norm": _gain(block.post_feedforward_layernorm, keep),
        "q_norm": _gain(attn.q_norm, keep),
        "k_norm": _gain(attn.k_norm, keep),
    }
    k, v = layer_cache.k, layer_cache.v
    if None in mats.values() or None in norms.values() or not (_plain(k) and _plain(v)):
        return None
    if not norms["input_norm"] or not norms["pre_feedforward_norm"]:  # the step always applies these
        return None
    return _Layer(
        **mats,
        **norms,
        k_cache=k.data_ptr(),
        v_cache=v.data_ptr(),
        capacity=k.shape[2],
        group=GROUPS.index(block.layer_type),
    )


def _embedding(model: Gemma, keep: list):
    """The C view of the token embedding matrix, or None when the C step cannot read it."""
    embed = model.model.embed_tokens
    if isinstance(embed, QuantizedEmbedding):
        return _mat(embed.source, keep)
    if type(embed) is nn.Embedding and _plain(embed.weight):
        return _matrix(WEIGHT_TYPES[embed.weight.dtype], embed.weight)
    return None


def unsupported_by_c_step(config: GemmaConfig) -> str | None:
    """What in `config` the C step cannot compute, or None when it can run the model.

    The step is Gemma 1-3's block: one head dim and KV-head count for every layer, every
    layer's own K/V, (1 + w) norm gains, full RoPE, a GeGLU MLP of one width, nothing added
    to the residual stream. Gemma 3n/4 decode with the torch step.
    """
    c = config
    per_layer_shapes = any(
        (c.layer_head_dim(i), c.layer_kv_heads(i), c.layer_intermediate_size(i))
        != (c.head_dim, c.num_key_value_heads, c.intermediate_size)
        for i in range(c.num_hidden_layers)
    )
    reasons = {
        "odd head_dim": c.head_dim % 2,
        "head_dim over 512": c.head_dim > 512,
        "per-layer head dims, KV heads or MLP widths": per_layer_shapes,
        "norm gains without the unit offset": not c.norm_unit_offset,
        "v_norm": c.use_v_norm,
        "per-layer embeddings": c.hidden_size_per_layer_input,
        "KV sharing": c.num_kv_shared_layers,
        "K = V": c.attention_k_eq_v,
        "partial RoPE": c.rope_partial_rotary_factor != 1.0,
        "layer scalars": c.use_layer_scalar,
        "mixture of experts": c.num_experts,
        "activation sparsity": any(c.layer_activation_sparsity(i) for i in range(c.num_hidden_layers)),
        "AltUp": c.altup_num_inputs,
        "LAuReL": c.laurel_rank,
    }
    return next((reason for reason, applies in reasons.items() if applies), None)


def decoder(model: Gemma, cache: KVCache, batch: int) -> CDecoder | None:
    """A C decoder for `model` and `cache`, or None when the C step does not apply."""
    if (
        batch != 1
        or model.training
        or torch.is_grad_enabled()
        and any(p.requires_grad for p in model.parameters())
    ):
        return None
    if model.device.type != "cpu" or model.dtype not in WEIGHT_TYPES or cache.dtype != model.dtype:
        return None
    config = model.config
    if unsupported_by_c_step(config) is not None:
        return None
    lib = cpu_kernels.library()
    if lib is None:
        return None
    keep: list = []
    layers = [
        _layer(block, layer_cache, keep) for block, layer_cache in zip(model.model.layers, cache.for_layer)
    ]
    embed, head = _embedding(model, keep), _mat(model.lm_head, keep)
    final_norm = _gain(model.model.norm, keep)
    if None in layers or embed is None or head is None or not final_norm:
        return None
    freqs = [model._inv_freq.get(kind) for kind in GROUPS]  # contiguous, owned by the model
    layer_array = (_Layer * len(layers))(*layers)
    keep.append(layer_array)
    spec = _Model(
        n_layers=len(layers),
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        eps=config.rms_norm_eps,
        attn_scale=config.attention_scale,
        attn_softcap=config.attn_logit_softcapping or 0.0,
        final_softcap=config.final_logit_softcapping or 0.0,
        embed_scale=model._embedding_scale(model.dtype),  # rounded as the reference rounds it
        inv_freq=_INV_FREQ(*[f.data_ptr() if f is not None else None for f in freqs]),
        embed=embed,
        lm_head=head,
        final_norm=final_norm,
        layers=layer_array,
        max_visible=max(cache.groups[kind].capacity for kind in cache.groups),
        cache_bf16=cache.dtype == torch.bfloat16,
    )
    return CDecoder(lib, model, cache, spec, keep)


def batch_decoder(model: Gemma, layer_kv: list[tuple[torch.Tensor, torch.Tensor] | None]):
    """A batched C decoder over a slot cache, or None when the batched C step does not apply.

    `layer_kv[i]` is layer i's (keys, values), each (slots, kv_heads, capacity, head_dim) in the
    model's dtype, or None for a layer that owns no K/V; full-attention layers hold a column per
    position, sliding layers a ring of exactly `sliding_window` slots (column c in slot
    c % capacity). The decoder's `step(tokens, slots, positions)` feeds one token per row into
    its own slot at its own position and returns the logits (rows, vocab). Until the batched
    step exists every batch decodes with the torch model.
    """
    return None

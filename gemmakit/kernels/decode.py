"""The single-sequence decode step in C (csrc/cpu_kernels.c): torch prefills, C decodes.

`decoder(model, cache)` returns a `CDecoder` when the C step can run this model as
gemmakit/model.py does: one sequence on the CPU, every matrix float32, bfloat16 or int8
weight-only (gemmakit's int8 quantization), no adapters, no training. Else it returns None
and the caller runs the torch model. Activations are float32 in the step; a float32 model
therefore decodes as the torch model does up to the order of additions (tests/test_c_decode.py),
while a bfloat16 model keeps bfloat16 weights and KV cache but is not rounded to bfloat16
after every operation, as llama.cpp runs its 16-bit files. The C step reads the model's own
weight and KV-cache tensors (no copies) and the cache's slot bookkeeping stays the cache's
(`KVCache.append_dense`), so a generation can switch between the two paths at any step.

Measured on the 2-core AVX-512 machine (Gemma 3 270M, 512-token prompt): see the README's
benchmark table; the step runs at the speed the weights stream from memory.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from gemmakit.config import FULL, SLIDING
from gemmakit.kernels import cpu as cpu_kernels
from gemmakit.model.cache import KVCache
from gemmakit.model.gemma import Gemma
from gemmakit.model.layers import RMSNorm
from gemmakit.quant.linear import Int8Linear, QuantizedEmbedding

GROUPS = (FULL, SLIDING)  # the step's per-group slot and visible count, by index
W_F32, W_INT8, W_BF16 = 0, 1, 2
WEIGHT_TYPES = {torch.float32: W_F32, torch.bfloat16: W_BF16}


class _Mat(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int64),
        ("w", ctypes.c_void_p),
        ("s", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
    ]


class _Layer(ctypes.Structure):
    _fields_ = (
        [(name, _Mat) for name in ("q", "k", "v", "o", "gate", "up", "down")]
        + [
            (name, ctypes.c_void_p)
            for name in (
                "input_norm",
                "post_attention_norm",
                "pre_feedforward_norm",
                "post_feedforward_norm",
                "q_norm",
                "k_norm",
                "k_cache",
                "v_cache",
            )
        ]
        + [("capacity", ctypes.c_int64), ("group", ctypes.c_int64)]
    )


class _Model(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_int64)
        for name in ("n_layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab")
    ] + [
        ("eps", ctypes.c_double),
        ("attn_scale", ctypes.c_double),
        ("attn_softcap", ctypes.c_double),
        ("final_softcap", ctypes.c_double),
        ("embed_scale", ctypes.c_float),
        ("inv_freq", ctypes.c_void_p * 2),
        ("embed", _Mat),
        ("lm_head", _Mat),
        ("final_norm", ctypes.c_void_p),
        ("layers", ctypes.POINTER(_Layer)),
        ("max_visible", ctypes.c_int64),
        ("cache_bf16", ctypes.c_int64),
    ]


class _Step(ctypes.Structure):
    _fields_ = [
        ("token", ctypes.c_int64),
        ("position", ctypes.c_int64),
        ("slot", ctypes.c_int64 * 2),
        ("visible", ctypes.c_int64 * 2),
        ("logits", ctypes.c_void_p),
    ]


def _library():
    lib = cpu_kernels.library()
    if lib is not None:
        lib.decode_step.restype = ctypes.c_int
        lib.decode_step.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(_Step), ctypes.c_int]
    return lib


def _plain(t: torch.Tensor) -> bool:
    """A contiguous CPU tensor of a dtype the C step reads."""
    return t.dtype in WEIGHT_TYPES and t.device.type == "cpu" and t.is_contiguous()


def _mat(module: nn.Module, keep: list) -> _Mat | None:
    """The C view of a linear layer's matrix, or None when the C step cannot read it."""
    if isinstance(module, Int8Linear):
        w, s = module.weight, module.weight_scale.float().contiguous()
        if w.device.type != "cpu" or not w.is_contiguous():
            return None
        keep.append(s)
        return _Mat(W_INT8, w.data_ptr(), s.data_ptr(), *w.shape)
    if type(module) is nn.Linear and module.bias is None and _plain(module.weight):
        w = module.weight
        return _Mat(WEIGHT_TYPES[w.dtype], w.data_ptr(), None, *w.shape)
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
    if (
        config.head_dim % 2
        or config.head_dim > 512
        or config.num_attention_heads % config.num_key_value_heads
    ):
        return None
    lib = _library()
    if lib is None:
        return None
    keep: list = []
    layers = []
    for block, layer_cache in zip(model.model.layers, cache.layers):
        attn, mlp = block.self_attn, block.mlp
        mats = [_mat(m, keep) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)]
        mats += [_mat(m, keep) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        norms = [
            _gain(n, keep)
            for n in (
                block.input_layernorm,
                block.post_attention_layernorm,
                block.pre_feedforward_layernorm,
                block.post_feedforward_layernorm,
                attn.q_norm,
                attn.k_norm,
            )
        ]
        k, v = layer_cache.k, layer_cache.v
        if None in mats or None in norms or not (_plain(k) and _plain(v)) or norms[0] == 0 or norms[2] == 0:
            return None
        layers.append(
            _Layer(*mats, *norms, k.data_ptr(), v.data_ptr(), k.shape[2], GROUPS.index(block.layer_type))
        )
    embed, head = model.model.embed_tokens, _mat(model.lm_head, keep)
    if isinstance(embed, QuantizedEmbedding):
        embed_mat = _mat(embed.source, keep)
    elif type(embed) is nn.Embedding and _plain(embed.weight):
        w = embed.weight
        embed_mat = _Mat(WEIGHT_TYPES[w.dtype], w.data_ptr(), None, *w.shape)
    else:
        embed_mat = None
    final_norm = _gain(model.model.norm, keep)
    if embed_mat is None or head is None or not final_norm:
        return None
    inv_freq = ctypes.c_void_p * 2
    freqs = [model._inv_freq.get(kind) for kind in GROUPS]  # contiguous, owned by the model
    layer_array = (_Layer * len(layers))(*layers)
    keep.append(layer_array)
    spec = _Model(
        len(layers),
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.intermediate_size,
        config.vocab_size,
        config.rms_norm_eps,
        config.attention_scale,
        config.attn_logit_softcapping or 0.0,
        config.final_logit_softcapping or 0.0,
        model._embedding_scale(model.dtype),  # rounded as the reference rounds it
        inv_freq(*[f.data_ptr() if f is not None else None for f in freqs]),
        embed_mat,
        head,
        final_norm,
        layer_array,
        max(cache.groups[kind].capacity for kind in cache.groups),
        cache.dtype == torch.bfloat16,
    )
    return CDecoder(lib, model, cache, spec, keep)

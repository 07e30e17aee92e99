"""The layers of a Gemma block (1/2/3, and the shared parts of 3n/4), under Hugging Face's state-dict names.

Shape letters used in comments:
    B batch, T new tokens in this call, S key/value slots attended to,
    H query heads, K key/value heads, D head_dim, C hidden_size, V vocab_size.

Numerics follow the reference implementations (gemma_pytorch `gemma/model.py`,
transformers `modeling_gemma{,2,3}.py`); each subtlety cites where it comes from.
The file reads bottom-up: norms and RoPE, attention, MLP, block. Every op goes through
`gemmakit.ops`, which picks the kernel that runs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from gemmakit import ops
from gemmakit.config import GemmaConfig
from gemmakit.rope_frequencies import rope_frequencies

if TYPE_CHECKING:
    from gemmakit.model.cache import LayerCache


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * gain, computed in float32.

    The gain is (1 + w) with zero-centred weights (Gemma 1-3: gemma_pytorch
    RMSNorm(add_unit_offset=True)), w itself with `unit_offset=False` (Gemma 3n/4:
    transformers Gemma3nRMSNorm / Gemma4RMSNorm, weights starting at ones), or absent with
    `with_scale=False` (their v_norm and the MoE router's norm: no weight at all). The product
    with the gain happens before the cast back (transformers GH#29402): casting first, as
    Llama does, drifts in bfloat16.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = True, with_scale: bool = True):
        super().__init__()
        self.dim, self.eps, self.unit_offset = dim, eps, unit_offset
        if with_scale:
            self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        else:
            self.register_parameter("weight", None)
        self._gain, self._gain_of = None, None

    def gain(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The float32 gain; kept between calls while the weight is unchanged and not trained
        (a decode step has 109 norms, and two ops each add up). `device` places the all-ones
        gain of a norm without a weight."""
        w = self.weight
        if w is None:
            key = ("ones", torch.device(device))
            if self._gain_of != key:
                self._gain, self._gain_of = torch.ones(self.dim, device=device), key
            return self._gain
        if w.requires_grad and torch.is_grad_enabled():
            return 1.0 + w.float() if self.unit_offset else w.float()
        key = (w.data_ptr(), w._version, w.device)
        if self._gain_of != key:
            gain = w.detach().float()
            self._gain, self._gain_of = (1.0 + gain if self.unit_offset else gain), key
        return self._gain

    def train(self, mode: bool = True):
        # A fused optimizer step (torch.optim.AdamW(fused=True)) updates the weight without
        # bumping its version, so the cache above would miss it: training loops switch to
        # eval() to evaluate, which starts a fresh cache.
        self._gain, self._gain_of = None, None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.gain(x.device), self.eps)


def config_norm(config: GemmaConfig, dim: int, with_scale: bool = True) -> RMSNorm:
    """An RMSNorm over `dim` with the config's epsilon and gain convention."""
    return RMSNorm(dim, config.rms_norm_eps, config.norm_unit_offset, with_scale)


def rope_inv_freq(head_dim: int, base: float, scale: float, partial: float = 1.0) -> torch.Tensor:
    """The D/2 RoPE frequencies of a head of `head_dim`, float32 (`rope_frequencies`: shared
    with the torch-free generation path, correctly rounded; linear scaling, partial RoPE)."""
    # An explicit device keeps this real when the model is built under torch.device("meta").
    values = rope_frequencies(head_dim, base, scale, partial)
    return torch.tensor(values.tolist(), dtype=torch.float32, device="cpu")


def layer_type_inv_freqs(config: GemmaConfig) -> dict[str, torch.Tensor]:
    """RoPE frequencies per layer type: each type's base, scaling, rotated fraction and head
    dim (Gemma 4's global layers have their own head dim)."""
    first = {t: config.layer_types.index(t) for t in set(config.layer_types)}
    return {
        t: rope_inv_freq(
            config.layer_head_dim(i), config.rope_base(t), config.rope_scale(t), config.rope_partial(t)
        )
        for t, i in first.items()
    }


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, 1, T, D) for integer positions of shape (B, T)."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Rotate-half ("NeoX") layout, which Gemma checkpoints and llama.cpp's gemma use.
    return ops.rope(x, cos, sin)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, optional q/k norms (Gemma 3) and soft-capped
    scores (Gemma 2); keys and values go through the layer's cache when there is one.

    Gemma 3n/4 add, all read off the config for layer `index`: per-layer head dim and KV
    heads, a v_norm without gain, K = V (no v_proj: the values are the raw k_proj output,
    v-normed, without RoPE; transformers Gemma4TextAttention) and KV sharing: a shared layer
    owns no k_proj/v_proj/k_norm/v_norm and attends over the keys and values its source layer
    (`config.kv_source_layers`) produced in the same forward call, handed over in `shared_kv`
    (after the source's cache update, so they cover the same slots as its type's mask).
    """

    def __init__(self, config: GemmaConfig, layer_type: str, index: int = 0):
        super().__init__()
        c = config
        self.index, self.layer_type = index, layer_type
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.layer_kv_heads(index),
            c.layer_head_dim(index),
        )
        self.scale = c.attention_scale
        self.softcap = c.attn_logit_softcapping
        self.kv_source = c.kv_source_layers[index]
        # A layer other layers read their keys and values from hands them on.
        self.shares_kv = self.kv_source == index and index in c.kv_source_layers[index + 1 :]
        owns_kv, kv_width = c.layer_owns_kv(index), self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.num_heads * self.head_dim, bias=False)
        if owns_kv:
            self.k_proj = nn.Linear(c.hidden_size, kv_width, bias=False)
        if c.layer_has_v_proj(index):
            self.v_proj = nn.Linear(c.hidden_size, kv_width, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, c.hidden_size, bias=False)
        norm = lambda: config_norm(c, self.head_dim) if c.use_qk_norm else nn.Identity()  # noqa: E731
        self.q_norm = norm()
        if owns_kv:
            self.k_norm = norm()
        if owns_kv and c.use_v_norm:
            self.v_norm = config_norm(c, self.head_dim, with_scale=False)

    def _own_kv(self, x, rope):
        """This layer's keys and values (B, K, T, D)."""
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        # K = V: the values are the projection before k_norm and RoPE.
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim) if hasattr(self, "v_proj") else k
        if hasattr(self, "v_norm"):
            v = self.v_norm(v)
        k = self.k_norm(k).transpose(1, 2)  # (B, K, T, D)
        return apply_rope(k, *rope), v.transpose(1, 2)

    def forward(self, x, rope, mask, cache: LayerCache | None, shared_kv: dict | None = None):
        B, T, _ = x.shape
        # Gemma 3 normalizes q and k before RoPE (gemma_pytorch model.py, GemmaAttention);
        # over head_dim, so before the transpose, where each head's row is contiguous.
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        q = apply_rope(self.q_norm(q).transpose(1, 2), *rope)  # (B, H, T, D)
        if self.kv_source != self.index:
            k, v = shared_kv[self.kv_source]  # (B, K, S, D), the source's cache view
        else:
            k, v = self._own_kv(x, rope)
            if cache is not None:
                k, v = cache.update(k, v)  # (B, K, S, D)
            if self.shares_kv:
                shared_kv[self.index] = k, v
        out = ops.attention(q, k, v, mask, self.scale, self.softcap)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(out)


class MLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, config: GemmaConfig, index: int = 0):
        super().__init__()
        width = config.layer_intermediate_size(index)  # Gemma 4: double on KV-shared layers
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x):
        # GeGLU with the tanh approximation, whatever Gemma 1's config says (transformers
        # GH#29402, GH#29995).
        return self.down_proj(ops.geglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm attention and MLP with residuals; Gemma 2/3 also norm each output."""

    def __init__(self, config: GemmaConfig, layer_type: str, index: int = 0):
        super().__init__()
        norm = lambda: config_norm(config, config.hidden_size)  # noqa: E731
        optional = norm if config.use_post_norms else nn.Identity
        self.layer_type = layer_type
        self.input_layernorm = norm()
        self.self_attn = Attention(config, layer_type, index)
        self.post_attention_layernorm = optional()
        self.pre_feedforward_layernorm = norm()
        self.mlp = MLP(config, index)
        self.post_feedforward_layernorm = optional()

    def forward(self, x, rope, mask, cache=None, shared_kv=None):
        h = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), rope, mask, cache, shared_kv)
        )
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))

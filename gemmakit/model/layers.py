"""The layers of a Gemma 1/2/3 block, under Hugging Face's state-dict names.

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

if TYPE_CHECKING:
    from gemmakit.model.cache import LayerCache


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + w), computed in float32.

    Gemma's weights are stored zero-centred, and the product with (1 + w) happens before the
    cast back (gemma_pytorch RMSNorm(add_unit_offset=True); transformers GH#29402): casting
    first, as Llama does, drifts in bfloat16.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self._gain, self._gain_of = None, None

    def gain(self) -> torch.Tensor:
        """1 + w in float32; kept between calls while the weight is unchanged and not trained
        (a decode step has 109 norms, and two ops each add up)."""
        w = self.weight
        if w.requires_grad and torch.is_grad_enabled():
            return 1.0 + w.float()
        key = (w.data_ptr(), w._version, w.device)
        if self._gain_of != key:
            self._gain, self._gain_of = (1.0 + w.detach().float()), key
        return self._gain

    def train(self, mode: bool = True):
        # A fused optimizer step (torch.optim.AdamW(fused=True)) updates the weight without
        # bumping its version, so the cache above would miss it: training loops switch to
        # eval() to evaluate, which starts a fresh cache.
        self._gain, self._gain_of = None, None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.gain(), self.eps)


def rope_inv_freq(head_dim: int, base: float, scale: float) -> torch.Tensor:
    # Float32 exponents as in transformers' compute_default_rope_parameters; linear scaling
    # divides the frequencies (positions / factor).
    # An explicit device keeps this real when the model is built under torch.device("meta").
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
    return 1.0 / (base**exponent) / scale


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
    scores (Gemma 2); keys and values go through the layer's cache when there is one."""

    def __init__(self, config: GemmaConfig, layer_type: str):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.layer_type = layer_type
        self.scale = c.attention_scale
        self.softcap = c.attn_logit_softcapping
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        if c.use_qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(self, x, rope, mask, cache: LayerCache | None):
        B, T, _ = x.shape
        # Gemma 3 normalizes q and k before RoPE (gemma_pytorch model.py, GemmaAttention);
        # over head_dim, so before the transpose, where each head's row is contiguous.
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2)  # (B, H|K, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, K, S, D)
        out = ops.attention(q, k, v, mask, self.scale, self.softcap)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(out)


class MLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        # GeGLU with the tanh approximation, whatever Gemma 1's config says (transformers
        # GH#29402, GH#29995).
        return self.down_proj(ops.geglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm attention and MLP with residuals; Gemma 2/3 also norm each output."""

    def __init__(self, config: GemmaConfig, layer_type: str):
        super().__init__()
        norm = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps)  # noqa: E731
        optional = norm if config.use_post_norms else nn.Identity
        self.layer_type = layer_type
        self.input_layernorm = norm()
        self.self_attn = Attention(config, layer_type)
        self.post_attention_layernorm = optional()
        self.pre_feedforward_layernorm = norm()
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = optional()

    def forward(self, x, rope, mask, cache=None):
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))

"""The layers of a Gemma 1/2/3 block, under Hugging Face's state-dict names.

Shape letters used in comments:
    B batch, T new tokens in this call, S key/value slots attended to,
    H query heads, K key/value heads, D head_dim, C hidden_size, V vocab_size.

Numerics follow the reference implementations (gemma_pytorch `gemma/model.py`,
transformers `modeling_gemma{,2,3}.py`); each subtlety cites where it comes from.
The file reads bottom-up: norms and RoPE, attention, MLP, block.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gemmakit.config import GemmaConfig

if TYPE_CHECKING:
    from gemmakit.model.cache import LayerCache
from gemmakit.kernels import cpu as cpu_kernels

# Chunks of at most this many tokens use the grouped matmul attention, longer ones SDPA.
SMALL_CHUNK = 16
# SDPA backends allowed on CUDA: all but cuDNN's. cuDNN builds an execution plan for every new
# (batch, length) shape, and fine-tuning batches and prompts change length all the time:
# measured on an H200 (torch 2.11, Gemma 3 270M + LoRA, batch 4, lengths 97-222), a step
# at a new length took up to 2.7 s with cuDNN and 90-210 ms without it; at repeated lengths
# cuDNN's steps still took 75-300 ms against 90-130 ms.
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
        # F.rms_norm is one fused op, bit-identical here to x * rsqrt(mean(x^2) + eps) * (1 + w)
        # in float32 (checked in tests/test_model.py), at a fraction of the dispatch cost.
        w = self.gain()
        if x.requires_grad and not w.requires_grad and cpu_kernels.handles(x):
            return _RMSNormInputGrad.apply(x, w, self.eps)  # training with a frozen norm
        return F.rms_norm(x.float(), w.shape, w, self.eps).type_as(x)


class _RMSNormInputGrad(torch.autograd.Function):
    """RMSNorm with a frozen gain, forward and input gradient each one C pass
    (cpu_kernels.rms_norm, cpu_kernels.rms_norm_backward): torch's CPU rms_norm is a
    composite of ~6 ops over a float32 copy, and its autograd adds ~12 more (a Gemma 3 270M
    LoRA step has 109 norms)."""

    @staticmethod
    def forward(ctx, x, gain, eps):
        x = x.contiguous()
        y, rstd = cpu_kernels.rms_norm(x, gain, eps)
        ctx.save_for_backward(x, rstd, gain)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, rstd, gain = ctx.saved_tensors
        return cpu_kernels.rms_norm_backward(grad.to(x.dtype), x, rstd, gain), None, None


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
    if x.requires_grad and torch.is_grad_enabled():
        return _RotateHalfRope.apply(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _RotateHalfRope(torch.autograd.Function):
    """apply_rope for training, bit-identical values and gradients in 4 ops each way.

    Autograd of the plain form runs ~12 ops backward (two slice backwards each fill a zero
    tensor). Here the sign moves onto sin: rotate_half(x) * sin == roll(x) * s with
    s = (-sin[:D/2], sin[D/2:]) exactly (negation is exact), and the input gradient is
    g * cos + roll(g * s), roll swapping the halves (its own inverse). The same roundings as
    the plain form's: each product rounded, then their sum.
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        half = x.shape[-1] // 2
        s = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        out = x * cos
        out += torch.cat((x[..., half:], x[..., :half]), dim=-1).mul_(s)
        ctx.save_for_backward(cos, s)
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, s = ctx.saved_tensors
        half = grad.shape[-1] // 2
        gs = grad * s
        out = grad * cos
        out += torch.cat((gs[..., half:], gs[..., :half]), dim=-1)
        return out, None, None


class Attention(nn.Module):
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
        if self.softcap is None and T > SMALL_CHUNK:
            G = self.num_heads // self.num_kv_heads
            if G > 1 and q.requires_grad and q.device.type == "cpu":
                # Training on the CPU: each KV head's G query heads stacked as one head of
                # G*T rows (queries are independent rows; the mask repeats per head). torch's
                # CPU GQA path is ~20% slower forward + backward (Gemma 3 270M, 4 x 128 tokens).
                folded = F.scaled_dot_product_attention(
                    q.reshape(B, self.num_kv_heads, G * T, self.head_dim), k, v,
                    attn_mask=mask.repeat(1, 1, G, 1), scale=self.scale,
                )  # fmt: skip
                out = folded.view(B, self.num_heads, T, self.head_dim)
            else:
                with sdpa_kernel(CUDA_SDPA_BACKENDS) if q.is_cuda else contextlib.nullcontext():
                    out = F.scaled_dot_product_attention(
                        q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=G > 1
                    )
        else:
            out = self._grouped_attention(q, k, v, mask)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(out)

    def _grouped_attention(self, q, k, v, mask):
        """Attention with the query heads of each KV head stacked as rows: no K/V copies.

        Used for decode steps (SDPA's CPU kernel costs ~3x more there in bfloat16) and for
        Gemma 2's soft-capping, which SDPA cannot express: scores -> cap * tanh(scores / cap)
        before the mask (transformers modeling_gemma2.py eager_attention_forward).
        """
        B, H, T, D = q.shape
        K, S = k.shape[1], k.shape[2]
        G = H // K  # query heads per KV head, consecutive as in transformers' repeat_kv
        # One sequence with one KV head (Gemma 2B/270M/1B decoding a single prompt): plain 2-D
        # products, which torch's CPU backend runs 3-4x faster than batched ones in bfloat16.
        flat = B * K == 1
        if flat:
            scores = F.linear(q.reshape(G * T, D), k.reshape(S, D)).view(B, K, G * T, S)
        else:
            scores = torch.matmul(q.reshape(B, K, G * T, D), k.transpose(2, 3))  # (B, K, G*T, S)
        scores = scores * self.scale
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.view(B, K, G, T, S) + mask[:, :, None]  # mask (B, 1, T, S)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if flat:
            return torch.mm(probs.view(G * T, S), v.reshape(S, D)).view(B, H, T, D)
        return torch.matmul(probs.view(B, K, G * T, S), v).view(B, H, T, D)  # (B, K, G*T, D)


class MLP(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        # GeGLU with the tanh approximation, whatever Gemma 1's config says (transformers
        # GH#29402, GH#29995).
        gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.requires_grad and up.dtype == gate.dtype and cpu_kernels.handles(gate):
            return self.down_proj(_GeGLU.apply(gate, up))  # training on the CPU
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class _GeGLU(torch.autograd.Function):
    """gelu_tanh(gate) * up with torch's roundings, forward and backward each one C pass
    (cpu_kernels.geglu, cpu_kernels.geglu_backward) instead of 2 + 3 torch ops; keeps gate
    and up only (autograd of the two ops also keeps gelu(gate))."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return cpu_kernels.geglu(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return cpu_kernels.geglu_backward(grad.contiguous(), gate, up)


class Block(nn.Module):
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

"""Row- and element-wise ops of a Gemma block: RMSNorm, GeGLU, rotary embedding.

Each is the reference formula, plus a training path (a custom autograd function) where that
is faster on the CPU: the C kernels for RMSNorm with a frozen gain and for GeGLU, and a
4-op form of RoPE's backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gemmakit.kernels import cpu as cpu_kernels


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * gain over the last dim, in float32, cast back to x's dtype.

    Args:
        x: (..., C).
        gain: float32 (C,); Gemma's (1 + w).
        eps: added to the mean square.
    """
    if x.requires_grad and not gain.requires_grad and cpu_kernels.handles(x):
        return _RMSNormInputGrad.apply(x, gain, eps)  # training with a frozen norm
    # F.rms_norm is one fused op, bit-identical here to x * rsqrt(mean(x^2) + eps) * gain in
    # float32 (checked in tests/test_model.py), at a fraction of the dispatch cost.
    return F.rms_norm(x.float(), gain.shape, gain, eps).type_as(x)


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


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up (GeGLU with the tanh approximation)."""
    if gate.requires_grad and up.dtype == gate.dtype and cpu_kernels.handles(gate):
        return _GeGLU.apply(gate, up)  # training on the CPU
    return F.gelu(gate, approximate="tanh") * up


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


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin: RoPE in the rotate-half ("NeoX") layout.

    x: (B, H, T, D); cos, sin: (B, 1, T, D).
    """
    if x.requires_grad and torch.is_grad_enabled():
        return _RotateHalfRope.apply(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _RotateHalfRope(torch.autograd.Function):
    """rope for training, bit-identical values and gradients in 4 ops each way.

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

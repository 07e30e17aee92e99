"""A LoRA linear layer's output, base(x) + scaling * B(A(dropout(x))): plain torch, or one
autograd function for training on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.kernels import cpu as cpu_kernels


def lora_linear(
    x: torch.Tensor,
    base: nn.Module,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """base(x) + scaling * dropout(x) A^T B^T.

    Args:
        x: (..., in).
        base: the frozen layer (an nn.Linear or a quantized linear); its output keeps its dtype.
        a, b: the adapter's weights, (r, in) and (out, r), cast to x's dtype unless autocast
            is on.
        scaling: alpha / r (or alpha / sqrt(r)).
        dropout: the probability of dropping an input of the adapter (0 outside training).
    """
    fused = (
        x.device.type == "cpu"
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and (dropout == 0.0 or cpu_kernels.handles(x))
    )
    # A frozen plain linear's product is made inside the function (out None); any other
    # base's output goes in.
    out = None if fused and _plain_frozen_linear(base, x.dtype) else base(x)
    if fused and (out is None or out.dtype == x.dtype):
        seed = int(torch.randint(0, 2**62, ())) if dropout else 0  # from torch's generator: reproducible
        weight = base.weight if out is None else None
        return _LoRAUpdate.apply(x, out, weight, a, b, scaling, dropout, seed)
    if not torch.is_autocast_enabled(x.device.type) and a.dtype != x.dtype:
        a, b = a.to(x.dtype), b.to(x.dtype)
    dropped = F.dropout(x, dropout) if dropout else x
    delta = F.linear(F.linear(dropped, a), b)
    return out + delta.to(out.dtype) * scaling


def _plain_frozen_linear(base: nn.Module, dtype: torch.dtype) -> bool:
    """A bias-free nn.Linear with a frozen weight of the activation dtype: the base product
    can join the adapter's function."""
    return (
        type(base) is nn.Linear
        and base.bias is None
        and not base.weight.requires_grad
        and base.weight.dtype == dtype
    )


class _LoRAUpdate(torch.autograd.Function):
    """base + scaling * dropout(x) A^T B^T, for training on the CPU.

    `base` is either the base layer's output (base_out, any differentiable base such as a
    quantized one) or, for a frozen plain linear, its weight W, in which case the product
    x W^T is made here and the update added onto it in place (one addmm_ instead of a copy
    of the base output plus an addmm), and the backward adds the adapter's input gradient
    onto g W, with no autograd nodes for the base's matmul, views and sum.
    The same values as the plain path, in fewer passes over the activations: the dropout
    mask comes from a seed (gemmakit/kernels/cpu.py `dropout`, 4-9x faster than torch's
    bernoulli_, which drew 126 masks per step of Gemma 3 270M for 0.4-0.5 s), the backward
    rebuilds it instead of keeping the dropped-out copy of x. Saved for the backward: x
    (shared by the adapters that read it, as q/k/v do), the (N, r) projection, the adapter
    weights in x's dtype and W (a parameter, no copy).
    Gradients (with xd = dropout(x), u = xd A^T, s = scaling, g the output gradient):
    dB = s g^T u, dA = s (g B)^T xd, dx = dropout(s (g B) A) (+ g W, or the base's own via
    autograd).
    """

    @staticmethod
    def forward(ctx, x, base_out, weight, a, b, scaling, p, seed):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        a_x, b_x = a.to(x.dtype), b.to(x.dtype)
        xd = cpu_kernels.dropout(x2, p, seed) if p else x2
        u = xd @ a_x.T  # (N, r)
        if weight is not None:
            out = torch.mm(x2, weight.T).addmm_(u, b_x.T, alpha=scaling)
        else:
            out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), u, b_x.T, alpha=scaling)
        ctx.save_for_backward(x2, u, a_x, b_x, weight)
        ctx.scaling, ctx.p, ctx.seed, ctx.x_shape = scaling, p, seed, x.shape
        ctx.weight_dtypes = (a.dtype, b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, u, a_x, b_x, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        gu = torch.mm(g, b_x).mul_(ctx.scaling)  # (N, r)
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[4]:
            grad_b = torch.mm(g.T, u).mul_(ctx.scaling).to(ctx.weight_dtypes[1])
        if ctx.needs_input_grad[3]:
            xd = cpu_kernels.dropout(x2, ctx.p, ctx.seed) if ctx.p else x2
            grad_a = torch.mm(gu.T, xd).to(ctx.weight_dtypes[0])
        if ctx.needs_input_grad[0]:
            if weight is not None and not ctx.p:
                grad_x = torch.mm(g, weight).addmm_(gu, a_x)
            else:
                grad_x = torch.mm(gu, a_x)
                if ctx.p:
                    cpu_kernels.dropout(grad_x, ctx.p, ctx.seed, out=grad_x)
                if weight is not None:
                    grad_x.addmm_(g, weight)
            grad_x = grad_x.view(ctx.x_shape)
        grad_base = grad_out if ctx.needs_input_grad[1] else None
        return grad_x, grad_base, None, grad_a, grad_b, None, None, None

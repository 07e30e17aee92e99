"""The training loss: next-token cross-entropy through the output projection, chunked over
positions so the (tokens x vocabulary) logits never exist at once, forward or backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.kernels import cpu as cpu_kernels
from gemmakit.training import data as sft_data


def default_chunk(vocab_size: int, dtype: torch.dtype = torch.float32) -> int:
    # float32: 64 MB of logits per chunk (64 positions of a 262k vocabulary; the chunked path
    # makes float32 log-probabilities of the same size). bfloat16: 128 MB (256 positions),
    # whose gradient is made in place (cpu_kernels.softmax_xent_); on 2 cores a Gemma 3 270M
    # LoRA step (batch 4 x 128) took 3.61 s with 128 positions, 3.31 s with 256 and 3.44 s
    # with 512 (medians of 6, alternated in one process).
    budget = 1 << 27 if dtype == torch.bfloat16 else 1 << 26
    return max(16, budget // (vocab_size * (2 if dtype == torch.bfloat16 else 4)))


def _fused_ce(h, weight, targets, softcap, chunk, need_h, need_w):
    """(summed loss, dL/dh or None, dL/dW or None), one chunk of logits at a time."""
    w = weight.to(h.dtype)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
    # bfloat16 on the CPU: one C pass turns each chunk's logits into the gradient in place
    # (cpu_kernels.softmax_xent_, ~4x faster than the passes below), every chunk in one
    # buffer: a fresh (chunk x 262k) tensor per chunk is a new mapping whose 32k pages fault
    # in on first touch.
    in_place = (
        softcap is None and need_h and not need_w and w.dtype == torch.bfloat16 and cpu_kernels.handles(w)
    )
    buffer = torch.empty(min(chunk, h.shape[0]), w.shape[0], dtype=w.dtype) if in_place else None
    for s in range(0, h.shape[0], chunk):
        hc, yc = h[s : s + chunk], targets[s : s + chunk]
        if in_place:
            z = torch.mm(hc, w.T, out=buffer[: len(hc)])
            target_logits = z.gather(1, yc[:, None])[:, 0].float()
            total -= (target_logits - cpu_kernels.softmax_xent_(z, yc)).sum()
            torch.mm(z, w, out=grad_h[s : s + chunk])
            continue
        z = hc @ w.T  # (n, V), in the compute dtype
        t = None
        if softcap is not None:
            t = torch.tanh(z.float() / softcap)
            z = t * softcap
        # One fused log-softmax pass in float32 (logsumexp + subtract would be three passes,
        # plus one for the cast), then exp in place.
        logp = torch.log_softmax(z, dim=-1, dtype=torch.float32)  # (n, V)
        del z
        total -= logp.gather(1, yc[:, None]).sum()
        if need_h or need_w:
            g = logp.exp_()  # softmax, in place of the log-probabilities
            g[torch.arange(len(yc), device=g.device), yc] -= 1.0
            if t is not None:
                g.mul_(1.0 - t * t)
            if need_h:
                grad_h[s : s + chunk] = g.to(w.dtype) @ w
            if need_w:
                grad_w.addmm_(g.T, hc.float())
    return total, grad_h, grad_w


def _attention_ce(h, weight, targets):
    """(summed loss, dL/dh) for a float32 head on the CPU, as one attention call, or None.

    softmax(h W^T) W is attention with the vocabulary rows as both keys and values (scale 1),
    so the gradient dL/dh = softmax(h W^T) W - W[y] and the loss sum(logsumexp(h W^T) - h.W[y])
    come from torch's CPU flash-attention kernel, which returns the log-sum-exp with its output.
    It tiles the vocabulary and keeps the running softmax in registers and cache, where the
    chunked path writes and re-reads (chunk x 262k) logits: measured on 512 positions of Gemma
    3 270M's head (2 cores), 2.4 s against 4.4 s, to the same float32 result (log-sum-exp
    within 2e-6). Not used for bfloat16: there the output is rounded to bfloat16 before W[y]
    is subtracted, which loses the gradient where p(y) is near 1.
    """
    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if kernel is None:
        return None
    w = weight[None, None]  # (1, 1, V, C): one "head" of V keys and values
    out, lse = kernel(h[None, None], w, w, 0.0, False, attn_mask=None, scale=1.0)[:2]
    target_rows = weight[targets]  # (N, C)
    loss = (lse[0, 0] - (h * target_rows).sum(-1)).sum()
    return loss, out[0, 0] - target_rows


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(softcap(h_i @ W^T), y_i), chunk by chunk, with the gradient made on the way.

    The gradient of the loss w.r.t. each chunk's logits, softmax - onehot (times the
    soft-cap derivative 1 - tanh^2), is known in the forward; it is turned at once into the
    chunk's gradient w.r.t. h (and W when W is trained), and the logits are dropped. The
    backward only scales these by the incoming gradient. Peak extra memory is one chunk of
    logits, and the logits are computed once (a checkpointed chunk would compute them twice).
    The same idea as Liger-Kernel's fused linear cross-entropy.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, softcap, chunk, need_h, need_w):
        fast = None
        if need_h and not need_w and softcap is None and h.device.type == "cpu":
            if h.dtype == weight.dtype == torch.float32:
                fast = _attention_ce(h.contiguous(), weight, targets)
        if fast is not None:
            (total, grad_h), grad_w = fast, None
        else:
            total, grad_h, grad_w = _fused_ce(h, weight, targets, softcap, chunk, need_h, need_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def _chunk_loss(model, h, y):
    return F.cross_entropy(model.logits(h).float(), y, reduction="sum")


def linear_cross_entropy(model, h: torch.Tensor, targets: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """Summed cross-entropy of `model.logits(h)` against targets, without all logits at once.

    Args:
        h: (N, C) final hidden states of the positions that have a target.
        targets: (N,) token ids.
        chunk: positions per chunk (0: `default_chunk`).

    A plain `lm_head` uses the fused path above. A wrapped head (LoRA on lm_head) is handled
    generically: each chunk's `model.logits` + CE is checkpointed, so the backward recomputes
    one chunk's logits at a time instead of keeping them all.
    """
    # The larger bfloat16 chunk presumes the in-place C gradient, i.e. the CPU.
    chunk = chunk or default_chunk(
        model.config.vocab_size, h.dtype if h.device.type == "cpu" else torch.float32
    )
    head = model.lm_head
    if isinstance(head, nn.Linear) and head.bias is None:
        need_h = torch.is_grad_enabled() and h.requires_grad
        need_w = torch.is_grad_enabled() and head.weight.requires_grad
        cap = model.config.final_logit_softcapping
        with torch.autocast(h.device.type, enabled=False):
            if not (need_h or need_w):
                with torch.no_grad():
                    return _fused_ce(h, head.weight, targets, cap, chunk, False, False)[0]
            return _LinearCrossEntropy.apply(h, head.weight, targets, cap, chunk, need_h, need_w)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        hc, yc = h[s : s + chunk], targets[s : s + chunk]
        if torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(_chunk_loss, model, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_loss(model, hc, yc)
    return total


def batch_loss_sum(model, batch: dict, chunk: int = 0) -> torch.Tensor:
    """Summed next-token loss of a collated batch over its labelled positions."""
    extra = {}
    if "segment_ids" in batch:  # packed rows, kept apart
        extra = {"segment_ids": batch["segment_ids"], "positions": batch["positions"]}
    h = model.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"], **extra)  # (B, T, C)
    labels = batch["labels"][:, 1:]
    keep = labels != sft_data.IGNORE
    return linear_cross_entropy(model, h[:, :-1][keep], labels[keep], chunk)

"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): 4-bit weights that minimise ||W X - Q X||.

Per linear layer, from the Hessian H = 2 X^T X of its calibration inputs X: columns are
quantized one at a time and each one's rounding error is spread over the columns not yet
quantized through the upper Cholesky factor of H^-1 (the paper's Algorithm 1, with its lazy
block updates). Asymmetric 4-bit with a scale and an integer zero per group of input columns,
as AutoGPTQ / gptqmodel quantize (their `Quantizer.find_params`: the range always holds 0).

`gptq_quantize_model` runs the model block by block: each block's inputs are the outputs of
the blocks already quantized, as in the reference `llama_sequential`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gemmakit.config import PROJECTIONS
from gemmakit.errors import GemmakitError

MAXQ = 15  # 4 bits


def group_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale (N,), zero (N,)) of asymmetric 4-bit levels for the columns w (N, g).

    AutoGPTQ's find_params: the range is [min(w, 0), max(w, 0)], zero = round(-min / scale).
    The scale is rounded to fp16 first, as checkpoints store it, so the error GPTQ compensates
    is the one the file will hold; the zero is kept >= 1 because the v1 GPTQ format stores
    zero - 1 (a group with no negative weight loses its lowest level, rare in practice).
    """
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    flat = (hi - lo) == 0
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    scale = ((hi - lo) / MAXQ).half().float().clamp(min=torch.finfo(torch.float16).tiny)
    zero = torch.round(-lo / scale).clamp(1, MAXQ)
    return scale, zero


def quantize_columns(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Levels 0..15 (float) of w (N, ...) with per-row scale and zero."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.clamp(torch.round(w / scale.view(shape)) + zero.view(shape), 0, MAXQ)


def rtn_quantize(weight: torch.Tensor, group_size: int) -> dict:
    """Round-to-nearest with GPTQ's grid: the baseline GPTQ improves on (same layout)."""
    N, K = weight.shape
    w = weight.detach().float().view(N, K // group_size, group_size)
    scales, zeros, levels = [], [], []
    for g in range(K // group_size):
        s, z = group_params(w[:, g])
        scales.append(s), zeros.append(z), levels.append(quantize_columns(w[:, g], s, z))
    return _result(
        torch.cat(levels, 1), torch.stack(scales, 1), torch.stack(zeros, 1), torch.arange(K) // group_size
    )


def _result(levels, scales, zeros, g_idx) -> dict:
    return {
        "levels": levels.to(torch.uint8),
        "scales": scales.half(),
        "zeros": zeros.to(torch.int32),
        "g_idx": g_idx.to(torch.int32),
    }


def dequantize(q: dict) -> torch.Tensor:
    """The float32 weight (N, K) of a `gptq_quantize` / `rtn_quantize` result."""
    g = q["g_idx"].long()
    return (q["levels"].float() - q["zeros"][:, g].float()) * q["scales"][:, g].float()


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int = 128,
    desc_act: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
) -> dict:
    """GPTQ levels (N, K) uint8, scales (N, G) fp16, zeros (N, G) int32, g_idx (K,) of a weight.

    hessian: (K, K) float32, 2 X^T X / n over the layer's calibration inputs (any positive
    multiple works: only its inverse's shape matters). desc_act quantizes columns in
    descending order of the Hessian's diagonal (act-order); groups are then consecutive in
    that order and g_idx maps each input column to its group.
    """
    N, K = weight.shape
    if K % group_size:
        raise GemmakitError(f"gptq: in_features {K} is not a multiple of the group size {group_size}")
    # The column loop is thousands of tiny ops: torch's thread pool only adds synchronisation
    # (measured on a loaded 2-core machine, a 640 x 2048 layer: 57 s on 2 threads, 2.3 s on 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(weight, hessian, group_size, desc_act, damp_percent, block_size)
    finally:
        torch.set_num_threads(threads)


def _gptq(weight, hessian, group_size, desc_act, damp_percent, block_size) -> dict:
    N, K = weight.shape
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0  # columns that never saw a nonzero input: any value is exact
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if desc_act else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    # Dampening: 1% of the mean diagonal (the paper, section 4 "Cholesky reformulation").
    H += damp_percent * torch.mean(torch.diag(H)) * torch.eye(K)
    Hinv = _inverse_cholesky_upper(H)
    block_size = max(group_size, block_size // group_size * group_size)  # groups never straddle blocks
    levels = torch.zeros_like(W)
    scales, zeros = torch.zeros(N, K // group_size), torch.zeros(N, K // group_size)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # the group's grid from its columns as updated so far
                g = col // group_size
                scales[:, g], zeros[:, g] = group_params(W1[:, i : i + group_size])
            g = col // group_size
            w = W1[:, i]
            q = quantize_columns(w, scales[:, g], zeros[:, g])
            levels[:, col] = q
            err = (w - (q - zeros[:, g]) * scales[:, g]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inverse = torch.argsort(perm)
    g_idx = (torch.arange(K) // group_size)[inverse]
    return _result(levels[:, inverse], scales, zeros, g_idx)


def _inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of H^-1, adding dampening until H factors (as gptqmodel)."""
    K = H.shape[0]
    extra = torch.mean(torch.diag(H)) * 0.01
    for _ in range(10):
        L, info = torch.linalg.cholesky_ex(H.double())
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U.float()
        H = H + extra * torch.eye(K)
    raise GemmakitError("gptq: the calibration Hessian is not positive definite")


class HessianCollector:
    """Accumulates H = 2 X^T X / n over the inputs a linear module sees (a forward pre-hook)."""

    def __init__(self, in_features: int):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        t = x.shape[0]
        self.H *= self.n / (self.n + t)
        self.n += t
        x = math.sqrt(2 / self.n) * x
        self.H += x.t() @ x

    def hessian(self) -> torch.Tensor:
        return self.H.float()


def calibration_windows(
    ids: list[int], bos_id: int, window: int = 512, max_windows: int = 8
) -> list[torch.Tensor]:
    """Calibration batches: consecutive windows of the text's ids, each after one <bos>."""
    body = window - 1
    out = [
        torch.tensor([[bos_id] + ids[i : i + body]])
        for i in range(0, len(ids), body)
        if len(ids[i : i + body]) > 16
    ]
    if not out:
        raise GemmakitError("the calibration text is too short (fewer than 16 tokens)")
    return out[:max_windows]


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: m
        for name, m in block.named_modules()
        if isinstance(m, nn.Linear) and name.rpartition(".")[2] in PROJECTIONS
    }


def block_states(model: nn.Module, windows: list[torch.Tensor]) -> list[dict]:
    """What the first block receives for each window, computed as Gemma.hidden_states does."""
    states = []
    for ids in windows:
        positions, masks, _ = model._attention_inputs(ids, None, None, None, None)
        h = model._embed(model.model.embed_tokens, ids, model.config.embedding_scale)
        states.append({"h": h, "ropes": model._ropes(positions, h), "masks": masks, "shared": {}})
    return states


def gptq_quantize_model(
    model: nn.Module,
    windows: list[torch.Tensor],
    group_size: int = 128,
    desc_act: bool = False,
    progress: bool = False,
) -> nn.Module:
    """Quantizes the linear layers of every block with GPTQ in place and returns the model.

    windows: (1, T) id tensors the model runs as calibration. The embedding and lm_head stay
    in float (gptqmodel and AutoGPTQ leave them so too).
    """
    from tqdm import tqdm

    from gemmakit.quant.gptq_linear import GPTQLinear

    model.eval()
    with torch.no_grad():
        states = block_states(model, windows)
        for block in tqdm(model.model.layers, desc="gptq", disable=not progress, leave=False):
            linears = block_linears(block)
            collectors = {name: HessianCollector(m.in_features) for name, m in linears.items()}
            hooks = [m.register_forward_pre_hook(collectors[name]) for name, m in linears.items()]
            try:
                for s in states:
                    block(
                        s["h"], s["ropes"][block.layer_type], s["masks"][block.layer_type], None, s["shared"]
                    )
            finally:
                for hook in hooks:
                    hook.remove()
            for name, m in linears.items():
                q = gptq_quantize(m.weight, collectors[name].hessian(), group_size, desc_act)
                parent_name, _, leaf = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, leaf, GPTQLinear.from_quantized(q, group_size, m.weight.dtype, desc_act))
            for s in states:  # the next block's inputs come from this quantized block
                s["h"] = block(
                    s["h"], s["ropes"][block.layer_type], s["masks"][block.layer_type], None, s["shared"]
                )
    model.quantization = {"kind": "gptq", "group_size": group_size, "desc_act": desc_act, "embeddings": False}
    return model

"""AWQ (Lin et al. 2023, arXiv:2306.00978): activation-aware scaling before 4-bit rounding.

For each group of linear layers that read one input (q/k/v after the input norm, gate/up
after the pre-feed-forward norm, down after up's product), input channel j is scaled by
s_j = mean|x_j|^alpha (normalised by sqrt(max * min)) before round-to-nearest 4-bit group
quantization and the input is divided by s: salient channels then lose less to rounding.
alpha is searched on a grid of 20 points in [0, 1) for the least output error ||X W^T -
(X / s) Q(W s)^T|| over the group (the paper's section 3.2; AutoAWQ `_search_best_scale`).
1 / s is folded into what produces the input, so the float model is unchanged: Gemma's
RMSNorm gain (1 + w, or w) is divided by s, and for down_proj the rows of up_proj are (the
GeGLU product gelu(gate) * up is linear in up). o_proj reads attention heads that share
K/V heads (GQA), so no fold exists for it: it is rounded without scaling.
The rounding grid and the packed layout are GPTQ's (`gptq.group_params`, `GPTQLinear`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from gemmakit.quant.gptq import dequantize, rtn_quantize

GRID = 20  # AutoAWQ's n_grid


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """The per-input-channel scale s (K,) that minimises the group's output error."""
    x = x.float()
    W = torch.cat([w.detach().float() for w in weights])
    ref = x @ W.t()
    x_mean = x.abs().mean(0).clamp(min=1e-8)
    best, best_err = torch.ones_like(x_mean), None
    for i in range(GRID):
        alpha = i / GRID
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        Wq = dequantize(rtn_quantize(W * s, group_size)) / s
        err = (x @ Wq.t() - ref).pow(2).mean()
        if best_err is None or err < best_err:
            best, best_err = s, err
    return best


def _fold_into_norm(norm: nn.Module, s: torch.Tensor):
    with torch.no_grad():
        gain = norm.gain(norm.weight.device) / s
        norm.weight.copy_(gain - 1 if norm.unit_offset else gain)
    norm._gain, norm._gain_of = None, None


class _InputSampler:
    """Keeps the inputs (rows) a linear module sees (a forward pre-hook)."""

    def __init__(self):
        self.rows = []

    def __call__(self, module, args):
        self.rows.append(args[0].detach().reshape(-1, args[0].shape[-1]).float())

    def inputs(self) -> torch.Tensor:
        return torch.cat(self.rows)


# Which sampled input each block linear reads (o_proj is sampled but never scaled).
INPUT_OF = {"q_proj": "q", "k_proj": "q", "v_proj": "q", "o_proj": "o", "gate_proj": "gate", "up_proj": "gate",
            "down_proj": "down"}  # fmt: skip
ROUNDINGS = ("round", "clip", "gptq")


def awq_scale_block(block: nn.Module, run_block, group_size: int) -> dict[str, torch.Tensor]:
    """Searches and folds the AWQ scales of one block in place (float weights, same function).

    Returns, per sampled input ("q", "o", "gate", "down"), the mean square of each channel as
    the scaled linears now read it (x / s): the column weights of the clipping search."""
    attn, mlp = block.self_attn, block.mlp
    linears = {"q": attn.q_proj, "o": attn.o_proj, "gate": mlp.gate_proj, "down": mlp.down_proj}
    samplers = {name: _InputSampler() for name in linears}
    hooks = [m.register_forward_pre_hook(samplers[n]) for n, m in linears.items()]
    try:
        run_block()
    finally:
        for hook in hooks:
            hook.remove()
    groups = [
        ("q", [attn.q_proj, attn.k_proj, attn.v_proj], lambda s: _fold_into_norm(block.input_layernorm, s)),
        ("gate", [mlp.gate_proj, mlp.up_proj], lambda s: _fold_into_norm(block.pre_feedforward_layernorm, s)),
        ("down", [mlp.down_proj], lambda s: mlp.up_proj.weight.data.div_(s[:, None])),
    ]
    power = {name: sampler.inputs().pow(2).mean(0) for name, sampler in samplers.items()}
    for name, group, fold in groups:
        if block.input_layernorm.weight is None and name != "down":
            continue  # a norm without a gain has nothing to fold into
        s = search_scale(samplers[name].inputs(), [m.weight for m in group], group_size)
        fold(s)
        for m in group:
            m.weight.data.mul_(s)
        power[name] = power[name] / s.pow(2)
    return power


def awq_quantize_model(
    model: nn.Module,
    windows: list[torch.Tensor],
    group_size: int = 128,
    progress: bool = False,
    rounding="round",
):
    """AWQ-scales then 4-bit quantizes the block linears in place; returns the model.

    rounding: "round" to nearest on the full range of each group (the paper's scaling alone);
    "clip": each group's range shrunk as `gptq.group_params`' search finds best, its error
    weighed by the mean square of each input channel (in the spirit of AutoAWQ's
    `_search_best_clip`, which searches the clipping by output error); "gptq": GPTQ on the
    scaled weights (`gptq.gptq_quantize_block`, its default settings at this group size)."""
    from tqdm import tqdm

    from gemmakit.quant.gptq import (
        GPTQSettings,
        block_linears,
        block_states,
        gptq_quantize_block,
        replace_linear,
    )
    from gemmakit.quant.gptq_linear import GPTQLinear

    model.eval()
    with torch.no_grad():
        states = block_states(model, windows)

        def run(block):
            return [block(s["h"], s["ropes"][block.layer_type], s["masks"][block.layer_type], None, s["shared"])
                    for s in states]  # fmt: skip

        for block in tqdm(model.model.layers, desc="awq", disable=not progress, leave=False):
            power = awq_scale_block(block, functools.partial(run, block), group_size)
            if rounding == "gptq":
                gptq_quantize_block(block, states, GPTQSettings(group_size))
            else:
                for name, m in block_linears(block).items():
                    weights = power[INPUT_OF[name.rpartition(".")[2]]] if rounding == "clip" else None
                    q = rtn_quantize(m.weight, group_size, mse=rounding == "clip", weights=weights)
                    replace_linear(block, name, GPTQLinear.from_quantized(q, group_size, m.weight.dtype))
            for s, h in zip(states, run(block)):
                s["h"] = h
    model.quantization = {"kind": "awq", "group_size": group_size, "embeddings": False}
    return model

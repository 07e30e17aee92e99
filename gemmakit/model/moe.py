"""Gemma 4's mixture-of-experts block (the 26B-A4B): a router and the experts' fused weights,
under Hugging Face's state-dict names (`router.{proj,scale,per_expert_scale}`,
`experts.{gate_up_proj,down_proj}`).

Shape letters as in `gemmakit/model/layers.py`, plus N tokens (B*T), E experts, I the expert
MLP width, k the experts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from gemmakit import ops
from gemmakit.config import GemmaConfig
from gemmakit.model.layers import config_norm


class Router(nn.Module):
    """Picks each token's top-k experts and their weights (transformers modeling_gemma4.py,
    Gemma4TextRouter): the hidden state is RMS-normed without a gain, scaled by the learned
    `scale` and hidden_size ** -0.5, projected to expert scores whose softmax (float32) gives
    probabilities; the top-k are renormalized to sum to 1, then scaled per expert."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.top_k, self.root_size = config.top_k_experts, config.hidden_size**-0.5
        self.norm = config_norm(config, config.hidden_size, with_scale=False)
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (N, k) float32, expert indices (N, k)) for tokens x (N, C)."""
        scores = self.proj(self.norm(x) * self.scale * self.root_size)  # (N, E)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[index], index


class Experts(nn.Module):
    """E GeGLU MLPs with fused gate/up weights, each run on the tokens routed to it."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        E, C, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * inter, C))  # gate rows, then up rows
        self.down_proj = nn.Parameter(torch.zeros(E, C, inter))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """sum over each token's k experts of weight * expert(x), for x (N, C)."""
        out = torch.zeros_like(x)
        # Experts in ascending order, each adding into `out` (index_add_), as the reference
        # does: the same order of additions per token.
        for expert in torch.unique(index).tolist():
            token, slot = torch.where(index == expert)
            gate, up = nn.functional.linear(x[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = nn.functional.linear(ops.geglu(gate, up), self.down_proj[expert])
            out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
        return out

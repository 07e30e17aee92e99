"""Gemma 4's multi-token-prediction drafter (`gemma4_assistant`), HF state-dict compatible.

The drafter is a few Gemma 4 blocks (model/gemma4.py's sandwich norms and layer scalar, no
per-layer inputs or experts) that own no keys or values: every layer's queries attend over
the keys and values the target model stored in its last full-attention and last sliding
layer. One drafting step reads, for the token at position p, [the target's embedding of it,
the hidden state that predicted it] (2 x the target's width), projects that to the drafter's
width (`pre_projection`), runs the blocks with queries at position p, and returns the logits
of the token after it and `post_projection` of its final hidden state: the stand-in for the
target's hidden state in the next drafting step, whose position stays p (the drafter's
queries never move while it drafts a round). Numerics follow transformers
modeling_gemma4_assistant.py (Gemma4AssistantForCausalLM, Gemma4AssistantMaskedEmbedder) over
modeling_gemma4.py's KV-shared attention; it applies no final logit soft-capping.

Masks (transformers Gemma4AssistantForCausalLM.create_attention_masks): a full-attention layer
attends over every key it is handed; a sliding layer over the last `sliding_window + 1` of
them (its bidirectional sliding mask keeps distances <= window, flipped to look back from the
newest key).

Shape letters as in `gemmakit/model/layers.py`, plus Cb the target's hidden width.
"""

from __future__ import annotations

import torch
from torch import nn

from gemmakit import ops
from gemmakit.config import SLIDING, AssistantConfig, GemmaConfig
from gemmakit.model.gemma import GemmaModel
from gemmakit.model.layers import MLP, apply_rope, config_norm, layer_type_inv_freqs, rope_cos_sin


class AssistantAttention(nn.Module):
    """Queries of the drafter's own (q_proj, q_norm, RoPE), keys and values the target's."""

    def __init__(self, config: GemmaConfig, index: int):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.layer_head_dim(index)
        self.scale = config.attention_scale
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.q_norm = config_norm(config, self.head_dim)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x, rope, k, v):
        """x (B, T, C); k, v (B, K, S, D) the target's keys and values this layer sees."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        q = apply_rope(self.q_norm(q).transpose(1, 2), *rope)  # (B, H, T, D)
        mask = torch.zeros((B, 1, T, k.shape[2]), dtype=q.dtype, device=q.device)
        out = ops.attention(q, k, v, mask, self.scale)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class AssistantBlock(nn.Module):
    """Gemma 4's block without per-layer inputs or experts (transformers Gemma4TextDecoderLayer)."""

    def __init__(self, config: GemmaConfig, layer_type: str, index: int):
        super().__init__()
        norm = lambda: config_norm(config, config.hidden_size)  # noqa: E731
        self.layer_type = layer_type
        self.input_layernorm = norm()
        self.self_attn = AssistantAttention(config, index)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = MLP(config, index)
        self.post_feedforward_layernorm = norm()
        if config.use_layer_scalar:
            self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, x, rope, k, v):
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, k, v))
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h * self.layer_scalar if hasattr(self, "layer_scalar") else h


class MaskedEmbedder(nn.Module):
    """Logits over the tokens of the top centroids only (transformers
    Gemma4AssistantMaskedEmbedder): the hidden state scores `num_centroids` clusters of
    vocab_size / num_centroids tokens each (`token_ordering` lists the tokens cluster by
    cluster); the tokens of the `centroid_intermediate_top_k` best clusters get their dot
    product with the head's rows, every other token the smallest of those minus 1."""

    def __init__(self, config: AssistantConfig):
        super().__init__()
        t = config.text
        self.top_k, self.num_centroids, self.vocab_size = (
            config.centroid_intermediate_top_k,
            config.num_centroids,
            t.vocab_size,
        )
        self.centroids = nn.Linear(t.hidden_size, config.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.zeros(t.vocab_size, dtype=torch.long))

    def forward(self, hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        B, T, C = hidden.shape
        _, clusters = torch.topk(self.centroids(hidden), k=self.top_k, dim=-1)  # (B, T, top_k)
        per_cluster = self.token_ordering.long().view(self.num_centroids, -1)
        tokens = per_cluster[clusters].reshape(B, T, -1)  # (B, T, top_k * tokens per cluster)
        rows = head_weight[tokens.reshape(-1)].view(B, T, tokens.shape[-1], C)
        selected = (hidden.unsqueeze(-2) @ rows.transpose(-1, -2)).squeeze(-2)  # (B, T, top_k * n)
        # One fill value for the whole call, as the reference takes the minimum over everything.
        out = torch.full(
            (B, T, self.vocab_size), selected.min().item() - 1.0, dtype=hidden.dtype, device=hidden.device
        )
        return out.scatter_(-1, tokens, selected)


class Gemma4Assistant(nn.Module):
    """A Gemma 4 MTP drafter (`Gemma4AssistantForCausalLM`)."""

    def __init__(self, config: AssistantConfig):
        super().__init__()
        t = config.text
        self.config = config
        # the drafter's blocks and final norm under HF's `model.` prefix; `embed_tokens` holds
        # the (tied) output embedding only: the drafter's input comes from the target
        self.model = GemmaModel(t, AssistantBlock)
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.pre_projection = nn.Linear(2 * config.backbone_hidden_size, t.hidden_size, bias=False)
        self.post_projection = nn.Linear(t.hidden_size, config.backbone_hidden_size, bias=False)
        if config.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedder(config)
        self.inv_freq = layer_type_inv_freqs(t)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def forward(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        target_kv: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One drafting step.

        Args:
            inputs: (B, T, 2 Cb): the target's (scaled) embedding of each token, then the
                hidden state that predicted it (the target's final-normed one, or the
                previous step's projected one).
            positions: (B, T) the tokens' positions.
            target_kv: per layer type, the keys and values (B, K, S, D) of the target's last
                layer of that type, over the positions before the drafted ones, oldest first.

        Returns:
            (logits (B, T, V), projected hidden states (B, T, Cb)).
        """
        h = self.pre_projection(inputs.to(self.dtype))
        window = self.config.text.sliding_window
        kv = {
            t: (k[:, :, -(window + 1) :], v[:, :, -(window + 1) :]) if t == SLIDING else (k, v)
            for t, (k, v) in target_kv.items()
        }
        ropes = {t: rope_cos_sin(f.to(h.device), positions, h.dtype) for t, f in self.inv_freq.items()}
        for block in self.model.layers:
            h = block(h, ropes[block.layer_type], *kv[block.layer_type])
        h = self.model.norm(h)
        if hasattr(self, "masked_embedding"):
            logits = self.masked_embedding(h, self.lm_head.weight)
        else:
            logits = self.lm_head(h)
        return logits, self.post_projection(h)

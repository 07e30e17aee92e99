"""The Gemma 4 causal language model (`gemma4_text`), HF state-dict compatible.

Gemma 4's block is Gemma 3's (model/layers.py: norms with gain w, v_norm, per-layer head
dims and KV heads, K = V, KV sharing, proportional RoPE, all read off the config) plus, in
this file: per-layer embeddings (PLE) added after the MLP, the mixture-of-experts branch
beside the dense MLP (model/moe.py) and the per-layer output scalar. Numerics follow
transformers modeling_gemma4.py (Gemma4TextModel, Gemma4TextDecoderLayer).

Shape letters as in `gemmakit/model/layers.py`, plus L layers and P the per-layer input width.
"""

from __future__ import annotations

import torch
from torch import nn

from gemmakit import ops
from gemmakit.config import GemmaConfig
from gemmakit.model.cache import KVCache
from gemmakit.model.gemma import Gemma
from gemmakit.model.layers import Block, config_norm, layer_type_inv_freqs
from gemmakit.model.moe import Experts, Router


class Gemma4Block(Block):
    """Gemma 3's sandwich-normed block, plus the experts, PLE and layer scalar of Gemma 4."""

    def __init__(self, config: GemmaConfig, layer_type: str, index: int):
        super().__init__(config, layer_type, index)
        C, P = config.hidden_size, config.hidden_size_per_layer_input
        if P:
            self.per_layer_input_gate = nn.Linear(C, P, bias=False)
            self.per_layer_projection = nn.Linear(P, C, bias=False)
            self.post_per_layer_input_norm = config_norm(config, C)
        if config.num_experts:
            self.router = Router(config)
            self.experts = Experts(config)
            self.post_feedforward_layernorm_1 = config_norm(config, C)
            self.post_feedforward_layernorm_2 = config_norm(config, C)
            self.pre_feedforward_layernorm_2 = config_norm(config, C)
        if config.use_layer_scalar:
            self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, x, rope, mask, cache=None, shared_kv=None, per_layer_input=None):
        h = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), rope, mask, cache, shared_kv)
        )
        out = self.mlp(self.pre_feedforward_layernorm(h))
        if hasattr(self, "experts"):
            # The router and the experts read the block's residual h, not the dense MLP's input.
            flat = h.reshape(-1, h.shape[-1])  # (B*T, C)
            moe = self.experts(self.pre_feedforward_layernorm_2(flat), *self.router(flat)).view(h.shape)
            out = self.post_feedforward_layernorm_1(out) + self.post_feedforward_layernorm_2(moe)
        h = h + self.post_feedforward_layernorm(out)
        if per_layer_input is not None:
            # gelu_tanh(gate(h)) * this layer's PLE slice, projected back to C.
            gated = ops.geglu(self.per_layer_input_gate(h), per_layer_input)  # (B, T, P)
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(gated))
        if hasattr(self, "layer_scalar"):
            h = h * self.layer_scalar
        return h


class Gemma4Model(nn.Module):
    """Embeddings (token and per-layer), blocks and final norm: HF's `model.` prefix."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        C, P, L = config.hidden_size, config.hidden_size_per_layer_input, config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, C, config.pad_token_id)
        if P:
            self.embed_tokens_per_layer = nn.Embedding(
                config.vocab_size_per_layer_input, L * P, config.pad_token_id
            )
            self.per_layer_model_projection = nn.Linear(C, L * P, bias=False)
            self.per_layer_projection_norm = config_norm(config, P)
        self.layers = nn.ModuleList(Gemma4Block(config, t, i) for i, t in enumerate(config.layer_types))
        self.norm = config_norm(config, C)


class Gemma4(Gemma):
    """A Gemma 4 causal language model (`Gemma4ForCausalLM`, or the text tower of
    `Gemma4ForConditionalGeneration`), with Gemma's interface."""

    def __init__(self, config: GemmaConfig):
        nn.Module.__init__(self)
        self.config = config
        self.model = Gemma4Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.inv_freq = layer_type_inv_freqs(config)

    def per_layer_inputs(self, input_ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Each layer's PLE input (B, T, L, P): the token's own per-layer embedding and a
        normed projection of its (scaled) token embedding `h`, averaged by 1/sqrt(2)
        (transformers Gemma4TextModel.get_per_layer_inputs and project_per_layer_inputs)."""
        c = self.config
        shape = (*input_ids.shape, c.num_hidden_layers, c.hidden_size_per_layer_input)
        # The table's sqrt(P) scale is rounded to the activation dtype, as the token embedding's.
        own = self.embed(self.model.embed_tokens_per_layer, input_ids, c.hidden_size_per_layer_input**0.5)
        projected = self.model.per_layer_model_projection(h) * c.hidden_size**-0.5
        projected = self.model.per_layer_projection_norm(projected.reshape(shape))
        return (projected + own.reshape(shape)) * 2.0**-0.5

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, C); the arguments are Gemma.hidden_states'."""
        positions, masks, layer_caches = self.attention_inputs(
            input_ids, attention_mask, positions, cache, segment_ids
        )
        h = self.embed(self.model.embed_tokens, input_ids, self.config.embedding_scale)
        per_layer = self.per_layer_inputs(input_ids, h) if self.config.hidden_size_per_layer_input else None
        ropes = self.ropes(positions, h)
        shared_kv = {}  # a KV-shared layer's source's keys and values, by source layer
        for i, (block, layer_cache) in enumerate(zip(self.model.layers, layer_caches)):
            t = block.layer_type
            extra = None if per_layer is None else per_layer[:, :, i]  # (B, T, P)
            h = block(h, ropes[t], masks[t], layer_cache, shared_kv, extra)
        return self.model.norm(h)

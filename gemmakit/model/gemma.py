"""The Gemma causal language model: embedding, blocks, final norm and head (HF's names).

Shape letters as in `gemmakit/model/layers.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from gemmakit.config import SLIDING, GemmaConfig
from gemmakit.model.cache import KVCache, build_mask
from gemmakit.model.layers import Block, config_norm, layer_type_inv_freqs, rope_cos_sin
from gemmakit.model.slot_cache import SlotCache


class GemmaModel(nn.Module):
    """Embedding, blocks and final norm: HF's `model.` prefix. `block` builds each layer (the
    Gemma 4 MTP drafter's blocks attend over the target's keys and values)."""

    def __init__(self, config: GemmaConfig, block: type[nn.Module] = Block):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(block(config, t, i) for i, t in enumerate(config.layer_types))
        self.norm = config_norm(config, config.hidden_size)


class Gemma(nn.Module):
    """A Gemma causal language model (Gemma 1, 2 or 3 text), HF state-dict compatible."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.model = GemmaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.inv_freq = layer_type_inv_freqs(config)

    def rounded_embedding_scale(self, dtype: torch.dtype) -> float:
        """sqrt(hidden) rounded to `dtype`, as the reference rounds it (what the C step takes)."""
        # A Python float holding the dtype-rounded value: multiplying by it equals
        # multiplying by torch.tensor(sqrt(C), dtype=dtype), without a tensor per call.
        return float(torch.tensor(self.config.embedding_scale, dtype=dtype))

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (read off the final norm, which is never quantized)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def make_cache(self, batch: int, max_length: int, ring_slack: int = 0) -> KVCache:
        return KVCache(self.config, batch, max_length, self.dtype, self.device, ring_slack)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, C).

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) booleans, False on (left) padding. Default: all real.
            positions: (B, T) RoPE positions. Default: counted from the first real token.
            cache: continues from and extends this cache; without one, the call sees only
                its own tokens. A `SlotCache` needs `positions` and its `row_slots` set: row
                b feeds positions[b] of slot row_slots[b].
            segment_ids: (B, T) ids of the packed examples tokens belong to (training on
                packed rows): a token attends only within its segment. Pass `positions`
                counted per segment with it. Not with a cache.
        """
        positions, masks, layer_caches = self.attention_inputs(
            input_ids, attention_mask, positions, cache, segment_ids
        )
        h = self.embed(self.model.embed_tokens, input_ids, self.config.embedding_scale)
        ropes = self.ropes(positions, h)
        shared_kv = {}  # a KV-shared layer's source's keys and values, by source layer
        for block, layer_cache in zip(self.model.layers, layer_caches):
            h = block(h, ropes[block.layer_type], masks[block.layer_type], layer_cache, shared_kv)
        return self.model.norm(h)

    def attention_inputs(self, input_ids, attention_mask, positions, cache, segment_ids):
        """(positions (B, T), the additive mask of each layer type, each layer's cache or None)."""
        B, T = input_ids.shape
        if isinstance(cache, SlotCache):  # rows at their own positions: `cache.advance`'s masks
            if positions is None:
                raise ValueError("a slot cache needs each row's positions")
            return positions, cache.advance(cache.row_slots, positions), cache.for_layer
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        before = 0 if cache is None else cache.valid[:, : cache.length].sum(1, keepdim=True)
        if positions is None:  # (B, T)
            positions = (before + attention_mask.long().cumsum(1) - 1).clamp(min=0)
        if cache is None:  # the call's own tokens only: no slots to manage
            cols = torch.arange(T, device=input_ids.device)
            windows = {t: self.config.sliding_window if t == SLIDING else None for t in self.inv_freq}
            same = None if segment_ids is None else segment_ids[:, :, None] == segment_ids[:, None, :]
            masks = {
                t: build_mask(cols, cols, attention_mask, w, self.dtype, same) for t, w in windows.items()
            }
            return positions, masks, [None] * len(self.model.layers)
        if segment_ids is not None:
            raise ValueError("segment_ids are for cache-free (training) calls")
        return positions, cache.advance(attention_mask), cache.for_layer

    def embed(self, table: nn.Module, input_ids: torch.Tensor, scale: float) -> torch.Tensor:
        """table(input_ids) in the activation dtype, times `scale` rounded to that dtype first,
        as the reference does (bf16: sqrt(3072) -> 55.5; transformers GH#29402, gemma_pytorch
        GH#67)."""
        h = table(input_ids).to(self.dtype)
        # A Python float holding the dtype-rounded value: multiplying by it equals
        # multiplying by torch.tensor(scale, dtype=dtype), without a tensor per call.
        return h * float(torch.tensor(scale, dtype=h.dtype))

    def ropes(self, positions: torch.Tensor, h: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """RoPE's (cos, sin) for each layer type at `positions`."""
        return {t: rope_cos_sin(f.to(h.device), positions, h.dtype) for t, f in self.inv_freq.items()}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:  # Gemma 2 (transformers modeling_gemma2.py)
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, input_ids, attention_mask=None, positions=None, cache=None):
        """Logits (B, T, V)."""
        return self.logits(self.hidden_states(input_ids, attention_mask, positions, cache))

"""Bytes of the KV cache for a context and batch: only the layers that own keys and values,
each at its own KV heads and head dim, sliding-window layers capped at their window."""

from __future__ import annotations

from dataclasses import dataclass

from gemmakit.config import SLIDING
from gemmakit.planning.architecture import Architecture

# Bytes per cached value; q8_0 and q4_0 are llama.cpp's quantized caches (34 and 18 bytes per
# block of 32).
KV_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


@dataclass(frozen=True)
class KVCacheSize:
    dtype: str
    context: int
    batch: int
    # Sum over the KV-owning layers of 2 (K and V) * kv_heads * head_dim * bytes: a token in
    # every such layer. KV-shared layers (Gemma 3n/4) read an earlier layer's cache and add
    # nothing.
    bytes_per_token: float
    # With sliding layers capped at their window (a ring buffer, as gemmakit's cache does).
    total: int
    # Every layer holding the whole context (what a cache unaware of windows allocates).
    total_no_window: int
    # Layers that own a cache, and those that read another layer's (KV sharing).
    cached_layers: int = 0
    shared_layers: int = 0


def layer_kv_values_per_token(arch: Architecture, i: int) -> int:
    """Values layer i adds to the cache per token: 0 for a KV-shared layer, else K and V of
    kv_heads * head_dim each.

    K = V layers (Gemma 4's attention_k_eq_v) cache two tensors too: their values are k_proj's
    output under a weightless v_norm, their keys the same output under k_norm and RoPE
    (transformers modeling_gemma4.py, Gemma4TextAttention.forward), so the two differ; gemmakit's
    cache (gemmakit/model/cache.py) keeps a keys and a values tensor per KV-owning layer.
    """
    s = arch.layer(i)
    return 2 * s.kv_heads * s.head_dim if s.owns_kv else 0


def kv_cache(arch: Architecture, context: int, batch: int = 1, dtype: str = "bf16") -> KVCacheSize:
    per_token = [layer_kv_values_per_token(arch, i) * KV_BYTES[dtype] for i in range(arch.num_layers)]
    slots = [
        min(context, arch.sliding_window) if t == SLIDING and arch.sliding_window else context
        for t in arch.layer_types
    ]
    cached = sum(p > 0 for p in per_token)
    return KVCacheSize(
        dtype=dtype,
        context=context,
        batch=batch,
        bytes_per_token=sum(per_token),
        total=round(batch * sum(s * p for s, p in zip(slots, per_token))),
        total_no_window=round(batch * context * sum(per_token)),
        cached_layers=cached,
        shared_layers=arch.num_layers - cached,
    )

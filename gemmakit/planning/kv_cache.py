"""Bytes of the KV cache for a context and batch, sliding-window layers capped at their window."""

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
    # 2 (K and V) * layers * kv_heads * head_dim * bytes: a token in every layer.
    bytes_per_token: float
    # With sliding layers capped at their window (a ring buffer, as gemmakit's cache does).
    total: int
    # Every layer holding the whole context (what a cache unaware of windows allocates).
    total_no_window: int


def kv_cache(arch: Architecture, context: int, batch: int = 1, dtype: str = "bf16") -> KVCacheSize:
    per_layer_token = 2 * arch.num_kv_heads * arch.head_dim * KV_BYTES[dtype]
    slots = sum(min(context, arch.sliding_window) if t == SLIDING and arch.sliding_window else context
                for t in arch.layer_types)  # fmt: skip
    return KVCacheSize(
        dtype=dtype,
        context=context,
        batch=batch,
        bytes_per_token=per_layer_token * arch.num_layers,
        total=round(batch * slots * per_layer_token),
        total_no_window=round(batch * context * arch.num_layers * per_layer_token),
    )

"""Memory of one fine-tuning step, item by item: full, 8-bit-optimizer, LoRA and QLoRA."""

from __future__ import annotations

import math
from typing import Any

from gemmakit.config import PROJECTIONS
from gemmakit.planning.activations import (
    DTYPE_BYTES,
    activation_bytes_per_token_layer,
    eager_attention_bytes_per_token_layer,
    family_extra_bytes_per_token_layer,
    logits_bytes_per_token,
)
from gemmakit.planning.architecture import Architecture
from gemmakit.planning.weights import weight_bytes

TRAINING_METHODS = {
    # key: (label, weights trained, base weights stored as, optimizer)
    "full": ("full fine-tune, AdamW", "all", None, "adamw"),
    "full_8bit": ("full fine-tune, 8-bit AdamW", "all", None, "adamw8bit"),
    "lora": ("LoRA, AdamW", "lora", None, "adamw"),
    "qlora": ("QLoRA (NF4), paged 8-bit AdamW", "lora", "nf4", "adamw8bit"),
}
# The projections LoRA and QLoRA adapt: all seven, as gemmakit's LoRA does by default.
LORA_TARGETS = PROJECTIONS
# bitsandbytes 8-bit optimizers: two uint8 states with one fp32 absmax per 256-value block;
# tensors under 4096 values keep 32-bit states (Optimizer8bit min_8bit_size).
ADAM8_BLOCK, ADAM8_MIN_SIZE = 256, 4096


def _adam_bytes(sizes: list[int], optimizer: str) -> int:
    if optimizer == "adamw":
        return 8 * sum(sizes)
    return sum(2 * n + 8 * math.ceil(n / ADAM8_BLOCK) if n >= ADAM8_MIN_SIZE else 8 * n for n in sizes)


def training_memory(
    arch: Architecture,
    method: str,
    batch: int = 4,
    seq_len: int = 512,
    dtype: str = "bf16",
    lora_rank: int = 16,
    lora_dropout: float = 0.05,
    ce_chunk: int = 256,
    cpu_kernels: bool = False,
) -> dict[str, Any]:
    """Memory of one training step of the text model, item by item (bytes).

    `cpu_kernels` models gemmakit's own LoRA trainer on the CPU (see
    `activation_bytes_per_token_layer`; its loss keeps no float32 logits: a float32 head's
    loss is one attention call, a bfloat16 chunk's gradient is made in place); the default is
    the generic plain-PyTorch step.

    * weights: full fine-tuning keeps all weights in `dtype` (no fp32 master copy); LoRA keeps
      the frozen base in `dtype`, QLoRA in NF4+DQ with embeddings and norms in 16-bit, and
      both add fp32 adapters (rank `lora_rank` on q/k/v/o/gate/up/down);
    * gradients: one per trained weight, in its dtype;
    * optimizer: AdamW keeps two fp32 states per trained weight (8 B); 8-bit AdamW two uint8
      states plus an fp32 absmax per 256 values (tensors under 4096 values stay 32-bit);
    * activations: see `activation_bytes_per_token_layer` (and, for Gemma 3n/4's extra
      modules, `family_extra_bytes_per_token_layer`), summed over the blocks with each
      block's own shapes, times batch * seq_len; with gradient checkpointing only each
      block's input is kept (a B per channel, per AltUp stream), plus the largest block's
      activations while it is recomputed;
    * logits: `logits_bytes_per_token` times batch * seq_len tokens, or times `ce_chunk`
      tokens for a chunked cross-entropy that never builds the whole (B, T, V) tensor.
    """
    if method not in TRAINING_METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(TRAINING_METHODS)}")
    label, trained, base_format, optimizer = TRAINING_METHODS[method]
    a = DTYPE_BYTES[dtype]
    tensors = arch.tensors()
    n_tokens = batch * seq_len
    if trained == "all":
        # Buffers (Gemma 4's layer_scalar) are stored but not trained.
        sizes = [t.numel for t in tensors if t.is_parameter]
        trainable = sum(sizes)
        weights = a * sum(t.numel for t in tensors)
        grads = a * trainable
        lora = None
    else:
        sizes = [
            lora_rank * d
            for t in tensors
            if t.kind in LORA_TARGETS and t.is_linear
            for d in (t.shape[1], t.shape[0])  # A: (r, in), B: (out, r)
        ]
        trainable = sum(sizes)
        base = weight_bytes(arch, "nf4") if base_format == "nf4" else a * sum(t.numel for t in tensors)
        weights = base + 4 * trainable
        grads = 4 * trainable
        lora = {"rank": lora_rank, "dropout": lora_dropout, "targets": LORA_TARGETS}
    opt = _adam_bytes(sizes, optimizer)
    cpu_kernels = cpu_kernels and lora is not None
    per_layer = _per_layer_activations(arch, a, trained == "all", lora, cpu_kernels, seq_len)
    # Outside the blocks: the scaled embedding output, the final norm's float32 input, and
    # Gemma 3n/4's per-layer inputs, made once for every block (the projection's output and
    # its norm's input), and Gemma 3n's AltUp streams projected in (one per extra stream).
    outside = n_tokens * (a * arch.hidden_size + 4 * arch.hidden_size)
    outside += n_tokens * 2 * a * arch.num_layers * arch.per_layer_input_size
    outside += n_tokens * a * max(arch.altup_num_inputs - 1, 0) * arch.hidden_size
    streams = max(arch.altup_num_inputs, 1)
    activations = round(n_tokens * sum(per_layer) + outside)
    checkpointed = round(
        n_tokens * (a * streams * arch.hidden_size * arch.num_layers + max(per_layer)) + outside
    )
    per_token_logits = logits_bytes_per_token(arch, a)
    if cpu_kernels and arch.final_logit_softcapping is None:
        # float32: the attention call's output and the target rows, (N, C) each; bfloat16:
        # the chunk's logits, overwritten by their gradient.
        per_token_logits = 8 * arch.hidden_size if a == 4 else a * arch.vocab_size
    logits_full = n_tokens * per_token_logits
    logits_chunked = min(n_tokens, ce_chunk) * per_token_logits
    fixed = weights + grads + opt
    return {
        "label": label,
        "optimizer": optimizer,
        "trainable_params": trainable,
        "weights": weights,
        "gradients": grads,
        "optimizer_states": opt,
        "activations": activations,
        "activations_checkpointed": checkpointed,
        "logits": logits_full,
        "logits_chunked": logits_chunked,
        "total": fixed + activations + logits_full,
        "total_checkpointed_chunked": fixed + checkpointed + logits_chunked,
    }


def _per_layer_activations(
    arch: Architecture, a: int, full: bool, lora, cpu_kernels: bool, seq_len: int
) -> list:
    """Bytes per token each block keeps for backward, each with its own shapes."""
    blocks = [arch.layer_view(i) for i in range(arch.num_layers)] if arch.varies_by_layer else [arch]
    norm_bytes = 8 if full else (a if cpu_kernels else 4)
    per_block = [
        activation_bytes_per_token_layer(b, a, full, lora, cpu_kernels)
        + eager_attention_bytes_per_token_layer(b, a, seq_len)
        + family_extra_bytes_per_token_layer(b, a, norm_bytes, full)
        for b in blocks
    ]
    return per_block if arch.varies_by_layer else per_block * arch.num_layers

"""Exact parameter counts of an `Architecture`: total, embedding, per-layer embedding, effective,
active per token, vision, LoRA."""

from __future__ import annotations

from dataclasses import dataclass

from gemmakit.config import PROJECTIONS
from gemmakit.planning.architecture import EXPERTS, PER_LAYER_EMBEDDING, Architecture


@dataclass(frozen=True)
class ParamCounts:
    # Text model: every parameter, tied embeddings once (buffers such as Gemma 4's layer_scalar
    # are not parameters: transformers' numel does not count them).
    text: int
    # Input embedding, plus the output projection when it is not tied.
    embedding: int
    # Everything but the token embedding(s) and the per-layer embedding table.
    non_embedding: int
    # Vision tower and projector of a multimodal checkpoint (0 for text models).
    vision: int = 0
    # What the Gemma 1/2 reports print for the embedding (padded vocabulary), if different.
    report_embedding: int | None = None
    # Gemma 3n/4's per-layer embedding (PLE) table: one row per token, looked up, never
    # multiplied, and kept off the accelerator by Google's runtimes.
    per_layer_embedding: int = 0
    # The routed experts' weights a token does not use: (num_experts - top_k) experts per
    # MoE layer.
    inactive_experts: int = 0
    # Audio tower and projector of a multimodal checkpoint (Gemma 4 E2B/E4B).
    audio: int = 0

    @property
    def total(self) -> int:
        return self.text + self.vision + self.audio

    @property
    def effective(self) -> int:
        """The text model without the PLE table: the "E" in Gemma 3n/4's E2B and E4B."""
        return self.text - self.per_layer_embedding

    @property
    def active(self) -> int:
        """Parameters one token runs through: the effective count less the experts the
        router does not pick (the "A" in Gemma 4's 26B-A4B)."""
        return self.effective - self.inactive_experts


def count_params(arch: Architecture) -> ParamCounts:
    tensors = [t for t in arch.tensors() if t.is_parameter]
    text = sum(t.numel for t in tensors)
    embedding = sum(t.numel for t in tensors if t.is_embedding)
    per_layer = sum(t.numel for t in tensors if t.kind == PER_LAYER_EMBEDDING)
    experts = sum(t.numel for t in tensors if t.kind == EXPERTS)
    inactive = (
        experts * (arch.num_experts - arch.top_k_experts) // arch.num_experts if arch.num_experts else 0
    )
    report = None
    if arch.report_vocab_size and arch.report_vocab_size != arch.vocab_size:
        copies = 1 if arch.tie_word_embeddings else 2
        report = copies * arch.report_vocab_size * arch.hidden_size
    return ParamCounts(
        text=text,
        embedding=embedding,
        non_embedding=text - embedding - per_layer,
        vision=arch.vision_params,
        report_embedding=report,
        per_layer_embedding=per_layer,
        inactive_experts=inactive,
        audio=arch.audio_params,
    )


def lora_params(arch: Architecture, rank: int, targets: tuple[str, ...] = PROJECTIONS) -> int:
    """Adapter parameters: rank * (in + out) per adapted projection (the routed experts'
    stacked weights are not projections and are not adapted)."""
    return sum(rank * (t.shape[0] + t.shape[1]) for t in arch.tensors() if t.kind in targets and t.is_linear)

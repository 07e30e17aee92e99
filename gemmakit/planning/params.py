"""Exact parameter counts of an `Architecture`: total, embedding, non-embedding, vision, LoRA."""

from __future__ import annotations

from dataclasses import dataclass

from gemmakit.config import PROJECTIONS
from gemmakit.planning.architecture import Architecture


@dataclass(frozen=True)
class ParamCounts:
    # Text model: every tensor, tied embeddings once.
    text: int
    # Input embedding, plus the output projection when it is not tied.
    embedding: int
    non_embedding: int
    # Vision tower and projector of a multimodal checkpoint (0 for text models).
    vision: int = 0
    # What the Gemma 1/2 reports print for the embedding (padded vocabulary), if different.
    report_embedding: int | None = None

    @property
    def total(self) -> int:
        return self.text + self.vision


def count_params(arch: Architecture) -> ParamCounts:
    tensors = arch.tensors()
    text = sum(t.numel for t in tensors)
    embedding = sum(t.numel for t in tensors if t.is_embedding)
    report = None
    if arch.report_vocab_size and arch.report_vocab_size != arch.vocab_size:
        copies = 1 if arch.tie_word_embeddings else 2
        report = copies * arch.report_vocab_size * arch.hidden_size
    return ParamCounts(text, embedding, text - embedding, arch.vision_params, report)


def lora_params(arch: Architecture, rank: int, targets: tuple[str, ...] = PROJECTIONS) -> int:
    """Adapter parameters: rank * (in + out) per adapted projection."""
    return sum(rank * (t.shape[0] + t.shape[1]) for t in arch.tensors() if t.kind in targets and t.is_linear)

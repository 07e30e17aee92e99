"""Sampling: the request's parameters, small filters chained in `sample`, per-request seeding.

Filters apply in vLLM's order (temperature, top-k, top-p, min-p) and each one is a function
from logits to logits with the dropped tokens at -inf, as mlx-lm's `sample_utils.py` chains them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from gemmakit.errors import GemmakitError


@dataclass
class SamplingParams:
    """What vLLM's `SamplingParams` means, for the fields it shares.

    temperature 0 is greedy; top_k <= 0 and top_p = 1 disable those filters; `seed` makes
    a request reproducible on its own, independent of the batch it runs in; generated text
    stops before the first `stop` string, which is not included.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.temperature < 0:
            raise GemmakitError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GemmakitError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise GemmakitError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise GemmakitError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.n != 1:
            raise GemmakitError("n > 1 is not supported; send the prompt several times")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keeps the smallest set of tokens whose probability reaches p (the top one always)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    if p <= 0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < p * probs.max(-1, keepdim=True).values, float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from a row of logits (V,).

    The filters work on the candidates only: top-k takes k of the 262k logits before the
    top-p sort, so a sampled step costs about what a greedy one does.
    """
    logits = logits.float()
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        values, ids = torch.topk(logits, params.top_k)  # sorted, descending
    elif params.top_p < 1.0 or params.min_p > 0.0:
        values, ids = torch.sort(logits, descending=True)
    else:
        return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
    values = apply_min_p(apply_top_p(values, params.top_p), params.min_p)
    choice = torch.multinomial(values.softmax(-1), 1, generator=generator)
    return int(ids[choice])


def request_generator(params: SamplingParams, seeds: torch.Generator | None) -> torch.Generator:
    """The random generator a request samples with, so its tokens do not depend on its batch.

    Seeded by `params.seed` when the request gives one; otherwise by a seed drawn from `seeds`
    (an `LLM`'s `seed`, as vLLM's engine seed works), or a random one when `seeds` is None
    (a server request without a seed).
    """
    if params.seed is not None:
        seed = params.seed
    elif seeds is not None:
        seed = int(torch.randint(2**62, (1,), generator=seeds))
    else:
        seed = secrets.randbits(62)
    return torch.Generator().manual_seed(seed)

"""Sampling the engine's rows: `sample_many` / `sample` over torch logits, per-request seeding.

The request's parameters are `sampling_params.SamplingParams`; the filters (vLLM's order:
temperature, top-k, top-p, min-p) and the draw are `sampler.py`'s, torch-free and shared with
the torch-free generation path, each row drawn with its own `random.Random`. This module
finds the rows' candidates in one pass (`ops.top_candidates`) and hands each row to them.
"""

from __future__ import annotations

import numpy as np
import torch

from gemmakit.inference import sampler
from gemmakit.inference.sampler import request_generator  # noqa: F401 (the API)
from gemmakit.inference.sampling_params import (  # noqa: F401 (the API)
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_PENALTY,
    MIN_TEMPERATURE,
    SPECULATIVE_MODES,
    SamplingParams,
)
from gemmakit.ops import top_candidates


def _row(logits: torch.Tensor) -> np.ndarray:
    """A row of logits as float32 numpy (a view on the CPU)."""
    return logits.detach().float().cpu().contiguous().numpy()


def _temperatures(params: list[SamplingParams]) -> torch.Tensor:
    return torch.tensor([p.temperature for p in params], dtype=torch.float32)


def _found(logits: torch.Tensor, params: list[SamplingParams]) -> list:
    """`ops.top_candidates` of every row of logits (R, V) that `sampler.first_count` gives a
    count, in one call per distinct count: per row (values, ids, lse) as numpy, or None."""
    vocab = logits.shape[-1]
    counts = [None if p.greedy else sampler.first_count(p, vocab) for p in params]
    found: list = [None] * len(params)
    for count in {c for c in counts if c is not None}:
        rows = [r for r, c in enumerate(counts) if c == count]
        # Every row (the common case): the logits as they are, no (rows, V) copy.
        picked = logits if len(rows) == len(params) else logits.index_select(0, torch.tensor(rows))
        values, ids, lse = (
            t.cpu().numpy() for t in top_candidates(picked, _temperatures([params[r] for r in rows]), count)
        )
        for j, r in enumerate(rows):
            found[r] = (values[j], ids[j], lse[j])
    return found


def _more(logits: torch.Tensor, params: SamplingParams):
    """More candidates of one row, for `sampler.kept`'s second try."""

    def more(count: int):
        found = top_candidates(logits[None], _temperatures([params]), count)
        return tuple(t[0].cpu().numpy() for t in found)

    return more


def _draw(logits: torch.Tensor, params: SamplingParams, generator, found) -> int:
    """One token from a row of raw float32 logits (V,), given its `_found` entry."""
    if params.greedy:
        return int(logits.argmax())
    return sampler.choose(_row(logits), params, generator, found, _more(logits, params))


def sample_many(
    logits: torch.Tensor, params: list[SamplingParams], generators: list
) -> list[int | Exception]:
    """`sample` for every row r of logits (R, V) with params[r] and generators[r] (a
    `random.Random`, `sampler.generator`): the token, or the exception that row's sampling
    raised (NaN logits: the other rows go on).

    The pass over each whole row (its best candidates and log-sum-exp, `ops.top_candidates`)
    runs for all rows in one call; what follows works on a row's few candidates and its own
    generator (`sampler.choose`, which the torch-free path uses too). `sample` is this
    function on one row, so a row gets the same token alone or among others for the same
    generator state.
    """
    logits = logits.float()
    found = _found(logits, params)
    chosen: list[int | Exception] = []
    for row, p, generator, f in zip(logits, params, generators, found):
        try:
            chosen.append(_draw(row, p, generator, f))
        except Exception as e:  # noqa: BLE001 - this row's logits or parameters, not the batch's
            chosen.append(e)
    return chosen


def sample(logits: torch.Tensor, params: SamplingParams, generator) -> int:
    """One token id from a row of logits (V,), drawn with `generator` (a `random.Random`).

    The filters work on the candidates only (`sampler.kept`): top-k takes k of the 262k
    logits before the top-p sort, so a sampled step costs about what a greedy one does.
    """
    (token,) = sample_many(logits[None], [params], [generator])
    if isinstance(token, Exception):
        raise token
    return token


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution (V,) float32 that `sample` draws a token from, for a row of logits
    (V,), on the logits' device: one-hot on the argmax when greedy, else the softmax over
    what the filters keep (`sampler.probabilities`)."""
    logits = logits.float()
    (found,) = [None] if params.greedy else _found(logits[None], [params])
    probs = sampler.probabilities(_row(logits), params, found, _more(logits, params))
    return torch.from_numpy(probs).to(device=logits.device, dtype=torch.float32)

"""Sampling: the request's parameters, small filters chained in `sample`, per-request seeding.

Filters apply in vLLM's order (temperature, top-k, top-p, min-p) and each one is a function
from logits to logits with the dropped tokens at -inf, as mlx-lm's `sample_utils.py` chains them.
"""

from __future__ import annotations

import secrets

import torch

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


# Candidates taken, in turn, before a full sort is tried, when top-p runs without top-k: on the
# 2-core CPU, sorting Gemma's 262,144 logits took 21 ms a row, torch's topk of 1,024 1.0 ms
# and of 16,384 ~2.5 ms (ops.top_candidates' C pass: well under that); the top 1,024 tokens
# nearly always hold the top-p mass, and a row too flat for that (a high temperature) is
# caught by the second try.
TOP_P_CANDIDATES = (1024, 16384)


def _first_count(params: SamplingParams, vocab: int) -> int | None:
    """How many best candidates of a row `sample` looks at first; None: the whole row (no
    filter, or a filter whose candidates are not a top slice of useful size)."""
    if 0 < params.top_k < vocab:
        return params.top_k
    if params.top_p < 1.0 and TOP_P_CANDIDATES[0] < vocab:
        return TOP_P_CANDIDATES[0]
    return None


def _kept(
    logits: torch.Tensor,
    params: SamplingParams,
    found: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The tokens the filters keep for a row of raw logits (V,): (temperature-scaled logits,
    ids) with -inf where a filter drops one, or None when no filter applies (the whole row).

    `found` is `ops.top_candidates`' (values, ids, lse) of the row for `_first_count` (None
    when that is None). Without top-k, top-p is decided on the best TOP_P_CANDIDATES tokens
    when they already hold p of the probability, measured against the whole row's softmax
    (the lse), which is exactly the set a full sort would keep (up to ties at the boundary);
    else the whole row is sorted."""
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        values, ids, _ = found
        return apply_min_p(apply_top_p(values, params.top_p), params.min_p), ids
    if params.top_p < 1.0 or params.min_p > 0.0:
        counts = [c for c in TOP_P_CANDIDATES if c < vocab] if params.top_p < 1.0 else []
        for i, count in enumerate(counts):
            if i > 0:  # the first try did not hold p: take more
                found = tuple(t[0] for t in top_candidates(logits[None], _temperatures([params]), count))
            values, ids, lse = found
            probs = (values - lse).exp()
            if float(probs.sum()) >= params.top_p:
                cum = probs.cumsum(-1)
                values = values.masked_fill(cum - probs >= params.top_p, float("-inf"))
                return apply_min_p(values, params.min_p), ids
        values, ids = torch.sort(logits / params.temperature, descending=True, stable=True)
        return apply_min_p(apply_top_p(values, params.top_p), params.min_p), ids
    return None


def _temperatures(params: list[SamplingParams]) -> torch.Tensor:
    return torch.tensor([p.temperature for p in params], dtype=torch.float32)


def _found(logits: torch.Tensor, params: list[SamplingParams]) -> list:
    """`ops.top_candidates` of every row of logits (R, V) that `_first_count` gives a count,
    in one call per distinct count: per row (values, ids, lse), or None."""
    vocab = logits.shape[-1]
    counts = [None if p.greedy else _first_count(p, vocab) for p in params]
    found: list = [None] * len(params)
    for count in {c for c in counts if c is not None}:
        rows = [r for r, c in enumerate(counts) if c == count]
        # Every row (the common case): the logits as they are, no (rows, V) copy.
        picked = logits if len(rows) == len(params) else logits.index_select(0, torch.tensor(rows))
        values, ids, lse = top_candidates(picked, _temperatures([params[r] for r in rows]), count)
        for j, r in enumerate(rows):
            found[r] = (values[j], ids[j], lse[j])
    return found


def _draw(logits: torch.Tensor, params: SamplingParams, generator, found) -> int:
    """One token from a row of raw float32 logits (V,), given its `_found` entry."""
    if params.greedy:
        return int(logits.argmax())
    kept = _kept(logits, params, found)
    if kept is None:
        return int(torch.multinomial((logits / params.temperature).softmax(-1), 1, generator=generator))
    values, ids = kept
    choice = torch.multinomial(values.softmax(-1), 1, generator=generator)
    return int(ids[choice])


def sample_many(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int | Exception]:
    """`sample` for every row r of logits (R, V) with params[r] and generators[r]: the token,
    or the exception that row's sampling raised (NaN logits: the other rows go on).

    The pass over each whole row (its best candidates and log-sum-exp, `ops.top_candidates`)
    runs for all rows in one call; what follows works on a row's few candidates and its own
    generator. `sample` is this function on one row, so a row gets the same token alone or
    among others for the same generator state.
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


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from a row of logits (V,).

    The filters work on the candidates only (`_kept`): top-k takes k of the 262k logits
    before the top-p sort, so a sampled step costs about what a greedy one does.
    """
    (token,) = sample_many(logits[None], [params], [generator])
    if isinstance(token, Exception):
        raise token
    return token


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution (V,) float32 that `sample` draws a token from, for a row of logits
    (V,): one-hot on the argmax when greedy, else the softmax over what the filters keep."""
    logits = logits.float()
    probs = torch.zeros_like(logits)
    if params.greedy:
        probs[logits.argmax()] = 1.0
        return probs
    (found,) = _found(logits[None], [params])
    kept = _kept(logits, params, found)
    if kept is None:
        return (logits / params.temperature).softmax(-1)
    values, ids = kept
    return probs.scatter_(0, ids, values.softmax(-1))


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

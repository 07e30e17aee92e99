"""The one sampler, torch-free: which candidates a row's filters keep, and the draw.

`inference/sampling.py` (the engine's rows, speculative decoding, the proposers) and the
torch-free generation path (`inference/lean.py`) both choose tokens here, from the same
candidates (csrc/sample.c's `sample_candidates`: a row's best logits / temperature, ties to
the lower id, and its log-sum-exp), with the same arithmetic (numpy, float64 after the
candidates) and the same random numbers (`random.Random`, whose stream for an integer seed
Python keeps stable across versions). A seeded request therefore gets the same tokens on
either path, and its tokens do not depend on torch's version or device.

Filters apply in vLLM's order (temperature, top-k, top-p, min-p); dropped candidates are -inf.
"""

from __future__ import annotations

import random
import secrets

import numpy as np

# Candidates taken, in turn, before a full sort is tried, when top-p runs without top-k: on the
# 2-core CPU, sorting Gemma's 262,144 logits took 21 ms a row, torch's topk of 1,024 1.0 ms
# and of 16,384 ~2.5 ms (csrc/sample.c's pass: well under that); the top 1,024 tokens
# nearly always hold the top-p mass, and a row too flat for that (a high temperature) is
# caught by the second try.
TOP_P_CANDIDATES = (1024, 16384)


# The draws of a request given no generator (a test's or a caller's bare `Request`).
_UNSEEDED = random.Random()


def generator(seed: int | None) -> random.Random:
    """A request's random numbers: from `seed` (taken modulo 2^64: Python seeds with |seed|,
    so -5 and 5 would draw alike), or from the OS when None."""
    return random.Random(secrets.randbits(62) if seed is None else seed % 2**64)


def child_seed(rng: random.Random) -> int:
    """A seed drawn from `rng` (an `LLM`'s seed for its requests, a request's for its n rows)."""
    return rng.getrandbits(62)


def request_generator(params, seeds: random.Random | None) -> random.Random:
    """The random generator a request samples with, so its tokens do not depend on its batch.

    Seeded by `params.seed` when the request gives one; otherwise by a seed drawn from `seeds`
    (an `LLM`'s `seed`, as vLLM's engine seed works), or a random one when `seeds` is None
    (a server request without a seed). The same draws on every device and torch version, and
    on the torch-free path.
    """
    if params.seed is not None:
        return generator(params.seed)
    return generator(None if seeds is None else child_seed(seeds))


def first_count(params, vocab: int) -> int | None:
    """How many best candidates of a row the filters look at first; None: the whole row (no
    filter, or a filter whose candidates are not a top slice of useful size)."""
    if 0 < params.top_k < vocab:
        return params.top_k
    if params.top_p < 1.0 and TOP_P_CANDIDATES[0] < vocab:
        return TOP_P_CANDIDATES[0]
    return None


def _probabilities(values: np.ndarray) -> np.ndarray:
    """softmax of float32 values (-inf allowed, one finite at least), float64."""
    v = values.astype(np.float64)
    w = np.exp(v - v.max())
    return w / w.sum()


def apply_top_p(values: np.ndarray, p: float) -> np.ndarray:
    """Values sorted best first with those after the smallest prefix whose probability
    reaches p at -inf (the top one always stays)."""
    if p >= 1.0:
        return values
    probs = _probabilities(values)
    cum = np.cumsum(probs)
    return np.where(cum - probs >= p, np.float32(-np.inf), values)  # the mass before reaches p


def apply_min_p(values: np.ndarray, p: float) -> np.ndarray:
    """Values with those whose probability is under p times the best one's at -inf."""
    if p <= 0:
        return values
    probs = _probabilities(values)
    return np.where(probs < p * probs.max(), np.float32(-np.inf), values)


def kept(logits: np.ndarray, params, found, more) -> tuple[np.ndarray, np.ndarray | None]:
    """The candidates the filters keep for a row of raw float32 logits (V,): (values, ids),
    values = logit / temperature with -inf where a filter drops one, ids None for the whole
    row in vocabulary order (no filter).

    `found` is the row's (values, ids, lse) for `first_count` candidates (None when that is
    None); `more(count)` gives them for another count. Without top-k, top-p is decided on the
    best TOP_P_CANDIDATES tokens once they hold p of the probability, measured against the
    whole row's softmax (the lse), which is the set a full sort keeps (up to ties at the
    boundary); else the whole row is sorted."""
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        values, ids, _ = found
        return apply_min_p(apply_top_p(values, params.top_p), params.min_p), ids
    if params.top_p < 1.0 or params.min_p > 0.0:
        counts = [c for c in TOP_P_CANDIDATES if c < vocab] if params.top_p < 1.0 else []
        for i, count in enumerate(counts):
            values, ids, lse = found if i == 0 else more(count)
            probs = np.exp(values.astype(np.float64) - float(lse))
            if probs.sum() >= params.top_p:
                cum = np.cumsum(probs)
                values = np.where(cum - probs >= params.top_p, np.float32(-np.inf), values)
                return apply_min_p(values, params.min_p), ids
        scaled_row = logits / np.float32(params.temperature)
        ids = np.argsort(-scaled_row, kind="stable")  # best first, ties to the lower id
        values = scaled_row[ids]
        return apply_min_p(apply_top_p(values, params.top_p), params.min_p), ids
    return logits / np.float32(params.temperature), None


def uniform(rng: random.Random | None) -> float:
    """One number in [0, 1) from `rng` (None: a process-wide generator). A `torch.Generator`
    (a caller's from before the one sampler) still draws, from torch: deterministic for its
    state, but not the tokens a `random.Random` of the same seed gives."""
    if rng is None:
        return _UNSEEDED.random()
    if not hasattr(rng, "random"):
        import torch  # imported already by whoever made the generator

        return float(torch.rand((), generator=rng, dtype=torch.float64))
    return rng.random()


def draw_index(weights: np.ndarray, rng: random.Random | None) -> int:
    """An index drawn with probability proportional to `weights` (>= 0, one positive at
    least): the inverse of the cumulative sum (float64) at one uniform number."""
    cum = np.cumsum(weights, dtype=np.float64)
    if not cum[-1] > 0:
        raise ValueError("no token to sample: every probability is 0 or NaN")
    u = uniform(rng) * cum[-1]  # in [0, total): never past the last positive weight
    return int(np.searchsorted(cum, u, side="right"))


def categorical(values: np.ndarray, rng: random.Random | None) -> int:
    """An index drawn from softmax(values) (float32, -inf for dropped entries)."""
    v = values.astype(np.float64)
    if not np.isfinite(v.max()):
        raise ValueError("no token to sample: every logit is -inf or NaN")
    return draw_index(np.exp(v - v.max()), rng)


def choose(logits: np.ndarray, params, rng: random.Random | None, found, more) -> int:
    """The token for a row of raw float32 logits (V,): its argmax when greedy (the lowest id
    of a tie), else a draw from the candidates `kept` keeps."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    values, ids = kept(logits, params, found, more)
    index = categorical(values, rng)
    return index if ids is None else int(ids[index])


def probabilities(logits: np.ndarray, params, found, more) -> np.ndarray:
    """The distribution (V,) float64 that `choose` draws a token from: one-hot on the argmax
    when greedy, else the softmax over what the filters keep."""
    probs = np.zeros(logits.shape[-1], dtype=np.float64)
    if params.temperature == 0:
        probs[int(np.argmax(logits))] = 1.0
        return probs
    values, ids = kept(logits, params, found, more)
    if ids is None:
        return _probabilities(values)
    probs[ids] = _probabilities(values)
    return probs

"""Sampling and the decode loop.

`generate_steps` is a generator over token ids: it prefills a left-padded batch, then yields
one new token per unfinished row per step. `stream_text` turns those ids into text deltas
with stop strings applied. The CLI, the Python API and the server only consume these.
Samplers are small functions chained in `sample` (vLLM's order: temperature, top-k, top-p).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from gemmakit.errors import GemmakitError
from gemmakit.kernels import decode as c_decode


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


# --- samplers ------------------------------------------------------------------------------


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


# --- the decode loop -----------------------------------------------------------------------


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: tuple[int, ...] = ()
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


def check_length(prompt_len: int, max_tokens: int | None, context: int) -> int:
    """The number of tokens that may be generated; errors when the prompt alone is too long."""
    if prompt_len >= context:
        raise GemmakitError(
            f"the prompt has {prompt_len} tokens; the model's context is {context} tokens "
            "(prompt plus at least one generated token must fit)"
        )
    room = context - prompt_len
    return room if max_tokens is None else min(max_tokens, room)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = True
    return ids, mask


@torch.inference_mode()
def generate_steps(model, requests: list[Request], pad_id: int = 0) -> Iterator[list[tuple[int, int]]]:
    """Runs a batch to completion, yielding [(row, token_id), ...] for each step.

    Rows are left-padded into one batch; a finished row keeps a slot but is no longer
    sampled. Each request's limits are checked against the model's context first.
    """
    context = model.config.max_position_embeddings
    limits = [check_length(len(r.prompt_ids), r.params.max_tokens, context) for r in requests]
    ids, mask = left_pad([r.prompt_ids for r in requests], pad_id)
    device = model.device
    ids, mask = ids.to(device), mask.to(device)
    cache = model.make_cache(len(requests), ids.shape[1] + max(limits))
    # One sequence on the CPU decodes in C when the model allows it (gemmakit/c_decode.py).
    fast = c_decode.decoder(model, cache, len(requests))
    hidden = model.hidden_states(ids, mask, cache=cache)
    logits = model.logits(hidden[:, -1])  # (B, V)
    live = list(range(len(requests)))
    while live:
        step, next_ids = [], torch.full((len(requests), 1), pad_id, dtype=torch.long)
        for row in live:
            req = requests[row]
            token = sample(logits[row], req.params, req.generator)
            req.output_ids.append(token)
            next_ids[row, 0] = token
            step.append((row, token))
            stops = req.params.stop_token_ids + ([] if req.params.ignore_eos else list(req.stop_ids))
            if token in stops:
                req.finish_reason = "stop"
            elif len(req.output_ids) >= limits[row]:
                req.finish_reason = "length"
        yield step
        live = [row for row in live if requests[row].finish_reason is None]
        if not live:
            break
        logits = fast.step(int(next_ids[0, 0])) if fast is not None else None
        if logits is None:
            step_mask = torch.zeros((len(requests), 1), dtype=torch.bool)
            step_mask[live] = True
            logits = model(next_ids.to(device), step_mask.to(device), cache=cache)[:, -1]


class TextStream:
    """Incremental detokenization with stop strings for one request.

    Text is re-decoded from the ids each step (so multi-byte characters split across
    tokens come out whole), and text that could be the start of a stop string is held
    back until it is known not to be one.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.stopped = False

    def push(self, token: int, final: bool = False) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = text.find(s)
            if at != -1:
                text, self.stopped, final = text[:at], True, True
        self.text = text
        if text.endswith("\ufffd") and not final:  # an incomplete UTF-8 sequence
            return ""
        safe = len(text) if final else len(text) - self._held_back(text)
        delta, self.sent = text[self.sent : safe], max(self.sent, safe)
        return delta

    def flush(self) -> str:
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

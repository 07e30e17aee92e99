"""The batched decode loop: requests in, one sampled token per unfinished row per step out.

`generate_steps` left-pads a batch of prompts, `prefill`s them, then `decode_n_tokens` runs
`decode_one_token` until every row has finished, yielding each step's new tokens; the step
names follow gpt-fast's `generate.py`. A single sequence on the CPU prefills and decodes in
C when the model allows it (`gemmakit.inference.c_decode`). Text, stop strings and finish reasons on top of
these ids are `gemmakit.inference.text`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from gemmakit.inference import c_decode
from gemmakit.inference.sampling import SamplingParams, sample, sample_many
from gemmakit.inference.sampling_params import check_length, finish_reason
from gemmakit.lora import multi


@dataclass
class TokenLogprob:
    """The log-probability of a generated token under the model (log-softmax of its raw
    logits, before any sampling filter or logits processor, as OpenAI and vLLM report it),
    and the `top` most likely tokens of that step as (token id, log-probability), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SpeculationStats:
    """What speculative decoding did for one request (gemmakit.inference.speculative):
    `steps` target forward passes after the prefill, `proposed` tokens offered to them,
    `accepted` of those kept, `generated` tokens produced by those steps."""

    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    generated: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.generated / self.steps if self.steps else 0.0

    def as_dict(self) -> dict:
        return {
            "steps": self.steps, "proposed": self.proposed, "accepted": self.accepted,
            "generated": self.generated, "acceptance_rate": round(self.acceptance_rate, 4),
            "tokens_per_step": round(self.tokens_per_step, 4),
        }  # fmt: skip


@dataclass
class Request:
    """One row of a batch: its prompt, how to sample it, and what it has generated so far.

    `stop_ids` are the model's end-of-turn ids (ignored with `params.ignore_eos`);
    `finish_reason` is None while the row runs, then "stop" or "length" (or a caller's own
    reason, such as the server's "abort").

    `logits_processor(output_ids, logits) -> logits` reshapes a row's next-token logits (V,)
    before sampling (penalties, logit bias, a grammar's mask); `logprobs` None records no
    log-probabilities, k >= 0 records each token's and the top k of each step into
    `output_logprobs`; `adapter` names the LoRA adapter the row runs with (None: the base);
    `speculation` counts what speculative decoding did when the request ran with it.
    """

    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: tuple[int, ...] = ()
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None
    logprobs: int | None = None
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    adapter: str | None = None
    speculation: SpeculationStats | None = None


def left_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows as one batch, padded on the left so that every row ends at the last column.

    Returns (ids, mask), both (B, T) on `device` (the CPU when None); mask is True on real tokens.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = True
    return ids.to(device), mask.to(device)


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
    """Runs the prompts (B, T) into the cache; returns the logits of each row's next token (B, V)."""
    hidden = model.hidden_states(ids, mask, cache=cache)
    return model.logits(hidden[:, -1])


def decode_one_token(model, next_ids: torch.Tensor, live: list[int], cache, fast) -> torch.Tensor:
    """Feeds one token per row (B, 1); returns the logits of the token after it (B, V).

    Rows outside `live` have finished: they keep their slot in the batch, masked out. `fast`
    is the C decoder for this batch or None; it may also decline a step (returns None).
    """
    logits = fast.step(int(next_ids[0, 0])) if fast is not None else None
    if logits is None:
        step_mask = torch.zeros((len(next_ids), 1), dtype=torch.bool)
        step_mask[live] = True
        logits = model(next_ids.to(model.device), step_mask.to(model.device), cache=cache)[:, -1]
    return logits


def sample_row(logits: torch.Tensor, request: Request) -> int:
    """Samples the next token of `request` from its row of logits (V,), appends it to
    `output_ids` and, when the request asks for them, its log-probabilities to
    `output_logprobs`. The one place a row's token is chosen: every engine path calls it (a
    speculative step that accepts or resamples a proposal calls its two halves,
    `processed_logits` and `record_token`, around its own choice)."""
    token = sample(processed_logits(logits, request), request.params, request.generator)
    record_token(logits, request, token)
    return token


def sample_rows(logits: torch.Tensor, requests: list[Request]) -> list[int | Exception]:
    """`sample_row` for each request r on its row logits[r] (rows, V): the chosen token, or
    the exception that row's sampling raised (the other rows go on).

    The rows with no logits processor and no log-probabilities are sampled by one
    `sampling.sample_rows` call, which gives each the token `sample` would for the same
    generator state; the others go through `sample_row` one by one."""
    chosen: list[int | Exception | None] = [None] * len(requests)
    plain = [i for i, r in enumerate(requests) if r.logits_processor is None and r.logprobs is None]
    if plain:
        index = torch.tensor(plain) if len(plain) < len(requests) else None
        rows = logits if index is None else logits.index_select(0, index)
        tokens = sample_many(
            rows, [requests[i].params for i in plain], [requests[i].generator for i in plain]
        )
        for i, token in zip(plain, tokens):
            if not isinstance(token, Exception):
                record_token(logits[i], requests[i], token)
            chosen[i] = token
    for i, req in enumerate(requests):
        if chosen[i] is None:
            try:
                chosen[i] = sample_row(logits[i], req)
            except Exception as e:  # noqa: BLE001 - this row's parameters or logits, not the batch's
                chosen[i] = e
    return chosen


def processed_logits(logits: torch.Tensor, request: Request) -> torch.Tensor:
    """A row's logits (V,) after the request's logits processor (given its output so far)."""
    if request.logits_processor is None:
        return logits
    return request.logits_processor(request.output_ids, logits)


def record_token(raw: torch.Tensor, request: Request, token: int):
    """Appends the chosen `token` to the request's output, with its log-probabilities from
    the row's raw logits (V,) when the request asks for them."""
    if request.logprobs is not None:
        log_probs = torch.log_softmax(raw.float(), dim=-1)
        top = []
        if request.logprobs > 0:
            values, ids = torch.topk(log_probs, request.logprobs)
            top = [(int(i), float(v)) for i, v in zip(ids, values)]
        request.output_logprobs.append(TokenLogprob(token, float(log_probs[token]), top))
    request.output_ids.append(token)


def request_finish_reason(request: Request, token: int, limit: int) -> str | None:
    """ "stop" when token ends the request, "length" when it used its last allowed token."""
    return finish_reason(request.params, request.stop_ids, token, len(request.output_ids), limit)


def sample_live_rows(
    logits: torch.Tensor, requests: list[Request], live: list[int], limits: list[int], pad_id: int
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Samples one token for each live row and marks the rows it finishes.

    Returns the step [(row, token_id), ...] and the tokens as the next input (B, 1), pad_id
    in the rows that are not live.
    """
    step, next_ids = [], torch.full((len(requests), 1), pad_id, dtype=torch.long)
    for row in live:
        req = requests[row]
        token = sample_row(logits[row], req)
        next_ids[row, 0] = token
        step.append((row, token))
        req.finish_reason = request_finish_reason(req, token, limits[row])
    return step, next_ids


def decode_n_tokens(
    model, requests: list[Request], logits: torch.Tensor, cache, fast, limits: list[int], pad_id: int
) -> Iterator[list[tuple[int, int]]]:
    """Samples from `logits` and decodes until every row has finished, yielding each step.

    A caller may set a row's `finish_reason` between two steps (a cancelled request): the next
    step neither samples it nor reports it.
    """
    live = list(range(len(requests)))
    while live:
        step, next_ids = sample_live_rows(logits, requests, live, limits, pad_id)
        yield step
        live = [row for row in live if requests[row].finish_reason is None]
        if live:
            logits = decode_one_token(model, next_ids, live, cache, fast)


@torch.inference_mode()
def generate_steps(model, requests: list[Request], pad_id: int = 0) -> Iterator[list[tuple[int, int]]]:
    """Runs a batch to completion, yielding [(row, token_id), ...] for each step.

    Rows are left-padded into one batch; a finished row keeps a slot but is no longer
    sampled. Each request's limits are checked against the model's context first. Each row
    runs with its request's LoRA adapter (`Request.adapter`, attached by `lora.multi.attach`).
    """
    context = model.config.max_position_embeddings
    limits = [check_length(len(r.prompt_ids), r.params.max_tokens, context) for r in requests]
    ids, mask = left_pad([r.prompt_ids for r in requests], pad_id, model.device)
    cache = model.make_cache(len(requests), ids.shape[1] + max(limits))
    # The rows keep their places for the whole batch, so one selection serves every step.
    multi.select_rows(model, [r.adapter for r in requests])
    fast = None if multi.has_adapters(model) else c_decode.decoder(model, cache, len(requests))
    # One sequence on the C step over GGUF blocks prefills there too, as the serving engine's
    # C step does (c_decode.block_weights): the same keys, values and tokens alone as in the
    # engine's batches, and faster than the torch prefill (bundled Q4_K_M, 512 tokens on one
    # thread: 511-521 tok/s of CPU time against torch's 358-472, loaded machine).
    logits = fast.prefill(requests[0].prompt_ids) if fast is not None and fast.block_weights else None
    if logits is None:
        logits = prefill(model, ids, mask, cache)  # (B, V)
    yield from decode_n_tokens(model, requests, logits, cache, fast, limits, pad_id)

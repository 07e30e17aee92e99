"""Per-request logits processing: penalties, logit bias and a grammar's mask, as one callable.

A request's `SamplingParams` become one `Request.logits_processor(output_ids, logits) ->
logits` (`prepare`), so every engine path (the static batch, the serving engine, speculative
verification) applies them through `engine.sample_row` without knowing them. The order is
vLLM's for the penalties (vllm/model_executor/layers/utils.py `apply_penalties`: repetition,
then frequency and presence), then the bias, then the grammar's mask last so that nothing
re-opens a token the grammar forbids.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gemmakit.inference.engine import Request
from gemmakit.inference.sampling import SamplingParams

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's / vLLM's multiplicative penalty on the tokens in `seen` (ids, any order).

    A positive logit is divided by `penalty`, a negative one multiplied, so a penalty above 1
    always makes a seen token less likely (transformers RepetitionPenaltyLogitsProcessor).
    """
    picked = logits[seen]
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def apply_count_penalties(
    logits: torch.Tensor, output_ids: list[int], frequency: float, presence: float
) -> torch.Tensor:
    """OpenAI's penalties: logit - count * frequency - (count > 0) * presence, counting the
    generated tokens only (OpenAI's "Parameter details", vLLM's output_tokens)."""
    if not output_ids:
        return logits
    counts = torch.bincount(torch.tensor(output_ids), minlength=logits.shape[-1])[: logits.shape[-1]]
    counts = counts.to(logits.dtype)
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


class RequestLogitsProcessor:
    """The processor of one request: its penalties, bias and optional grammar, in that order."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], grammar=None):
        self.params = params
        self.prompt_ids = torch.tensor(sorted(set(prompt_ids)), dtype=torch.long)
        self.grammar = grammar
        bias = params.logit_bias or {}
        self.bias_ids = torch.tensor(list(bias), dtype=torch.long)
        self.bias_values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        # A copy: the caller keeps the raw row for the log-probabilities it reports.
        logits = logits.float().clone()
        vocab = logits.shape[-1]
        if p.repetition_penalty != 1.0:
            seen = torch.cat([self.prompt_ids, torch.tensor(output_ids, dtype=torch.long)]).unique()
            apply_repetition_penalty(logits, seen[seen < vocab], p.repetition_penalty)
        if p.frequency_penalty or p.presence_penalty:
            logits = apply_count_penalties(logits, output_ids, p.frequency_penalty, p.presence_penalty)
        if len(self.bias_ids):
            inside = self.bias_ids < vocab  # a bias on an id past the vocabulary changes nothing
            logits[self.bias_ids[inside]] += self.bias_values[inside]
        if self.grammar is not None:
            logits = self.grammar(output_ids, logits)
        return logits


def needs_processor(params: SamplingParams) -> bool:
    return bool(
        params.repetition_penalty != 1.0
        or params.frequency_penalty
        or params.presence_penalty
        or params.logit_bias
        or params.json_schema is not None
    )


def prepare(request: Request, tokenizer=None) -> Request:
    """Sets `request.logits_processor` and `request.logprobs` from its `params`.

    `tokenizer` is needed only for a `json_schema` (the grammar maps token ids to text).
    Returns the request, for chaining.
    """
    params = request.params
    request.logprobs = params.logprobs
    if not needs_processor(params):
        return request
    grammar = None
    if params.json_schema is not None:
        from gemmakit.inference.grammar import JsonSchemaConstraint

        stops = params.stop_token_ids + ([] if params.ignore_eos else list(request.stop_ids))
        grammar = JsonSchemaConstraint(tokenizer, params.json_schema, stops)
    request.logits_processor = RequestLogitsProcessor(params, request.prompt_ids, grammar)
    return request

"""Speculative decoding: cheap proposals, checked k at a time by one forward pass of the model.

A step feeds the last chosen token and k proposed ones (`gemmakit.inference.proposers`) to
the model as 1 + k rows over one KV cache; row i's logits choose the token after row i
exactly as a plain step would, so proposal i + 1 is kept when it is the token chosen there.
At the first rejection the chosen token replaces it, and the cache is rolled back past the
rejected rows (`KVCache.rollback`; the sliding rings keep `RING_SLACK` spare slots for it).
When all k are kept, the last row gives one more token. Decode is memory-bound, so the
1 + k rows cost little more than one.

Greedy requests keep a proposal when it is the argmax: the output is plain greedy's, token
for token. Sampled requests use speculative sampling (Leviathan et al. 2023, "Fast Inference
from Transformers via Speculative Decoding", arXiv:2211.17192, algorithm 1): proposal d drawn
from q is kept with probability min(1, p(d) / q(d)), else the token is drawn from the residual
max(0, p - q) renormalized, which makes each token's distribution exactly p. Here p is the
distribution plain sampling draws from (`sampling.probabilities`: temperature, top-k, top-p,
min-p) of the request's logits after its logits processor, which sees the tokens kept so far,
as in a plain step; an n-gram proposal has a one-hot q, a draft model's q is its own filtered
distribution (no logits processor). The random draws differ from a plain run's, so a seeded
request gives different (equally distributed) text with and without speculation.
Log-probabilities are recorded from each row's raw logits, as `engine.sample_row` records them.

Two drivers. `generate_one` / `generate_steps` decode one sequence at a time over a KVCache
(a batch's requests one after another), the 1 + k rows in the batched C step
(`c_decode.batch_decoder`, the cache as its one slot; each weight matrix read once for all
rows) where it applies, else in the torch model. `EngineSpeculation` runs speculation per
request inside the continuous-batching engine (`batching.Engine`, under `LLM.generate` and
the server): a speculating row's 1 + k rows join the other rows' step in its own slot.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from gemmakit.errors import GemmakitError
from gemmakit.inference import sampler
from gemmakit.inference.engine import (
    Request,
    SpeculationStats,
    check_length,
    prefill,
    processed_logits,
    record_token,
    request_finish_reason,
    sample_row,
)
from gemmakit.inference.proposers import (
    Backoff,
    DraftProposer,
    MtpProposer,
    NgramProposer,
    cache_rows,
    feed,
    kv_cache_reader,
    slot_cache_reader,
)
from gemmakit.inference.sampling import probabilities, sample
from gemmakit.model.cache import RING_SLACK
from gemmakit.model.gemma4_assistant import Gemma4Assistant


def speculative_choice(p: torch.Tensor, proposal: int, q: torch.Tensor | None, generator) -> tuple[int, bool]:
    """(token, kept): the proposal kept with probability min(1, p(d) / q(d)), else a token
    drawn from max(0, p - q) renormalized. `q` None is one-hot on the proposal (n-gram).
    `generator` is the request's `random.Random`; the draws are `sampler.py`'s."""
    q_d = 1.0 if q is None else float(q[proposal])
    u = sampler.uniform(generator)
    if u * q_d < float(p[proposal]):  # u < p/q without dividing by a tiny q
        return proposal, True
    if q is None:
        residual = p.clone()
        residual[proposal] = 0.0
    else:
        residual = (p - q).clamp_(min=0.0)
    if not float(residual.sum()) > 0:  # p <= q everywhere means p == q: kept above, barring rounding
        residual = p
    return sampler.draw_index(residual.double().cpu().numpy(), generator), False


def choose(logits: torch.Tensor, request: Request, proposal: int, q: torch.Tensor | None) -> tuple[int, bool]:
    """Chooses the request's next token from its row of logits (V,) given a proposal, and
    records it as `engine.sample_row` does. Returns (token, whether it is the proposal)."""
    processed = processed_logits(logits, request)
    params = request.params
    if params.greedy:
        token = sample(processed, params, request.generator)
        kept = token == proposal
    else:
        token, kept = speculative_choice(probabilities(processed, params), proposal, q, request.generator)
    record_token(logits, request, token)
    return token, kept


def _proposer(request: Request, draft, max_length: int, model, cache):
    mode = request.params.speculative
    if mode == "ngram":
        return NgramProposer()
    if mode in ("draft", "mtp") and draft is None:
        flag = "LLM(draft_model=...), --draft-model"
        what = "a draft model" if mode == "draft" else "a Gemma 4 assistant model"
        raise GemmakitError(f"speculative={mode!r} needs {what} ({flag})")
    if mode == "draft":
        if isinstance(draft, Gemma4Assistant):
            raise GemmakitError("a Gemma 4 assistant drafts with speculative='mtp', not 'draft'")
        return DraftProposer(draft, max_length)
    if mode == "mtp":
        return MtpProposer(model, draft, kv_cache_reader(cache))
    return None


def _forward(model, cache, rows_step, tokens: list[int], proposer) -> torch.Tensor:
    """`feed`'s logits (len(tokens), V); a proposer that reads the target's hidden states
    (MTP) is handed them, which the torch model computes (the C step gives logits only)."""
    if not getattr(proposer, "needs_hidden", False):
        return feed(model, cache, rows_step, tokens)
    hidden = model.hidden_states(torch.tensor([tokens], dtype=torch.long, device=model.device), cache=cache)
    proposer.observe(hidden[0])
    return model.logits(hidden[0])


def generate_one(model, request: Request, limit: int, draft=None) -> Iterator[int]:
    """Generates one request with speculation, yielding each token once it is chosen (and
    `finish_reason` set). A caller may set `finish_reason` between two tokens: generation
    then stops. `request.speculation` counts the steps when the request speculates."""
    prompt = request.prompt_ids
    speculates = request.params.speculative is not None
    # MTP reads the window + 1 sliding keys before a step's first row after a rollback of up
    # to RING_SLACK rows: one spare slot more than verification itself needs.
    slack = (RING_SLACK + (request.params.speculative == "mtp")) if speculates else 0
    # No row past `limit` is fed: at most limit - 1 tokens follow the prompt's.
    cache = model.make_cache(1, len(prompt) + limit, ring_slack=slack)
    proposer = _proposer(request, draft, len(prompt) + limit, model, cache)
    stats = SpeculationStats()
    request.speculation = stats if proposer is not None else None
    backoff = Backoff(request.params.num_speculative_tokens)
    rows_step = cache_rows(model, cache)
    ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
    if getattr(proposer, "needs_hidden", False):
        hidden = model.hidden_states(ids, cache=cache)
        proposer.observe(hidden[0, -1:])
        first = model.logits(hidden[0, -1])
    elif rows_step is not None:  # in C, as plain generation prefills (the same first token)
        first = rows_step.prefill(prompt, 0)[0]
        for _ in prompt:  # the cache's bookkeeping of the columns the step wrote
            cache.append_dense()
    else:
        first = prefill(model, ids, torch.ones_like(ids, dtype=torch.bool), cache)[0]
    token = sample_row(first, request)

    def finish(token: int):
        """Sets the request's finish reason after `token` (None while it runs)."""
        request.finish_reason = request_finish_reason(request, token, limit)
        stats.generated = len(request.output_ids) - 1  # the prefill's token is no step's

    finish(token)
    yield token
    while request.finish_reason is None:  # a caller may have finished it between yields
        k = min(backoff.budget() if proposer else 0, limit - len(request.output_ids) - 1)
        proposals, q = proposer.propose(request, k) if k > 0 else ([], None)
        logits = _forward(model, cache, rows_step, [token] + proposals, proposer)
        stats.steps, stats.proposed = stats.steps + 1, stats.proposed + len(proposals)
        kept = 0
        for i, proposal in enumerate(proposals):
            token, accepted = choose(logits[i], request, proposal, None if q is None else q[i])
            stats.accepted += accepted
            finish(token)
            yield token
            if request.finish_reason is not None:  # finished, or by the caller
                return
            if not accepted:
                break
            kept += 1
        else:
            token = sample_row(logits[len(proposals)], request)
            finish(token)
            yield token
        cache.rollback(len(proposals) - kept)
        if proposer is not None:
            proposer.update(kept, len(proposals))
            backoff.update(kept, len(proposals))


@torch.inference_mode()
def generate_steps(model, requests: list[Request], draft=None) -> Iterator[list[tuple[int, int]]]:
    """`engine.generate_steps` with speculation: [(row, token_id)] per step, the requests
    run one after another. Every request's limits are checked against the context first."""
    context = model.config.max_position_embeddings
    limits = [check_length(len(r.prompt_ids), r.params.max_tokens, context) for r in requests]
    for row, (request, limit) in enumerate(zip(requests, limits)):
        for token in generate_one(model, request, limit, draft):
            yield [(row, token)]


# --- per-request speculation inside the continuous-batching engine -------------------------


@dataclass
class RowSpeculation(SpeculationStats):
    """A request's speculation in `batching.Engine`: its counts (what `request.speculation`
    reports), its proposer and back-off, the distributions of this step's proposals, and
    `written`: one past the last position its slot was written at (rejected rows included)."""

    proposer: object = field(default=None, repr=False, compare=False)
    backoff: Backoff | None = field(default=None, repr=False, compare=False)
    q: torch.Tensor | None = field(default=None, repr=False, compare=False)
    written: int = 0


class EngineSpeculation:
    """Speculation per request in the engine's batched step.

    A speculating row feeds its last token and k proposals as 1 + k rows of its own slot at
    consecutive positions, in the same step as the other rows (the batched C step and the
    slot cache let rows of one slot see each other causally); each row's logits choose the
    token after it as `generate_one` does, and the row's `held` advances past the kept
    tokens only. The rejected positions need no rollback: a later row attends by position,
    and the ring's RING_SLACK spare slots keep the window of every kept position intact.
    `totals` sums every request's counts (the server's /metrics).

    Proposers: "ngram", "draft" (`draft`, a smaller model) and "mtp" (`draft`, a Gemma 4
    assistant), which reads the row's final hidden states (`observe` after its prompt,
    `settle` after each step: the engine then runs the torch step, whose hidden states it
    keeps, see `needs_hidden`) and its slot's keys and values. An MTP row proposes at most
    RING_SLACK - 1 tokens: the drafter reads window + 1 sliding keys before the row's next
    position, one more than a rolled-back verification of RING_SLACK rows leaves in the ring.
    """

    def __init__(self, model, cache, draft=None):
        self.model, self.cache, self.draft = model, cache, draft
        self.totals = SpeculationStats()

    def feed(self, seq) -> list[int]:
        """The tokens a decoding row feeds this step: its last token, then its proposals."""
        request = seq.request
        last = request.output_ids[-1]
        if not request.params.speculative:
            return [last]
        state = self._state(seq)
        k = min(state.backoff.budget(), seq.limit - len(request.output_ids) - 1)
        if request.params.speculative == "mtp":
            k = min(k, RING_SLACK - 1)
        proposals, state.q = state.proposer.propose(request, k) if k > 0 else ([], None)
        state.written = max(state.written, seq.held + 1 + len(proposals))
        return [last] + proposals

    def needs_hidden(self, rows) -> bool:
        """Whether a row of this step drafts from the target's hidden states (MTP)."""
        return any(r.request.params.speculative == "mtp" for r in rows)

    def observe(self, seq, hidden: torch.Tensor):
        """A row's final hidden state (1, C) after its prompt: an MTP row's first round reads it."""
        if seq.request.params.speculative == "mtp":
            self._state(seq).proposer.observe(hidden)

    def _state(self, seq) -> RowSpeculation:
        request = seq.request
        if not isinstance(request.speculation, RowSpeculation):
            request.speculation = self._start(request, seq)
        return request.speculation

    def _start(self, request: Request, seq) -> RowSpeculation:
        mode, draft = request.params.speculative, self.draft
        is_assistant = isinstance(draft, Gemma4Assistant)
        if mode == "ngram":
            proposer = NgramProposer()
        elif mode == "draft" and draft is not None and not is_assistant:
            proposer = DraftProposer(draft, len(request.prompt_ids) + seq.limit)
        elif mode == "mtp" and is_assistant:
            proposer = MtpProposer(self.model, draft, slot_cache_reader(self.cache, seq.slot))
        else:
            what = {"draft": "a draft model", "mtp": "a Gemma 4 assistant"}.get(mode, "nothing")
            raise GemmakitError(f"speculative={mode!r} needs {what} (LLM(draft_model=...), --draft-model)")
        return RowSpeculation(proposer=proposer, backoff=Backoff(request.params.num_speculative_tokens))

    def settle(self, seq, logits: torch.Tensor, fed: list[int], sample, hidden=None) -> list:
        """Chooses a row's tokens from the logits (len(fed), V) of what it fed, through the
        engine's `sample(seq, logits_row, chooser)` (which records, counts and finishes the
        token); returns its events, one per chosen token. `hidden`: the rows' final hidden
        states (len(fed), C), when the step kept them."""
        request, proposals = seq.request, fed[1:]
        state = request.speculation if isinstance(request.speculation, RowSpeculation) else None
        if state is not None and getattr(state.proposer, "needs_hidden", False):
            state.proposer.observe(hidden)
        events, kept = [], 0
        for i, row in enumerate(logits):
            seq.held += 1  # fed[i] is now a held position: its row chose the token after it
            if i < len(proposals):
                q = None if state.q is None else state.q[i]
                event = sample(seq, row, lambda lg, req, d=proposals[i], q=q: choose(lg, req, d, q)[0])
            else:
                event = sample(seq, row, sample_row)
            events.append(event)
            if i == len(proposals) or event[1] != proposals[i] or request.finish_reason is not None:
                break
            kept += 1
        if state is not None and request.params.speculative:
            self._count(state, len(proposals), kept, len(events))
        return events

    def _count(self, state: RowSpeculation, proposed: int, kept: int, generated: int):
        for stats in (state, self.totals):
            stats.steps += 1
            stats.proposed += proposed
            stats.accepted += kept
            stats.generated += generated
        state.proposer.update(kept, proposed)
        state.backoff.update(kept, proposed)


def cached_tokens(seq) -> list[int]:
    """What a slot offers the prefix cache: the tokens it holds, then -1 (no token) up to the
    last position a speculating row wrote, so the engine's ring bound counts the rejected
    positions written past the held ones."""
    tokens = seq.tokens()
    state = seq.request.speculation
    if isinstance(state, RowSpeculation) and state.written > len(tokens):
        tokens = tokens + [-1] * (state.written - len(tokens))
    return tokens

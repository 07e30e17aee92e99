"""The continuous-batching engine: requests join and leave the running batch between steps.

Each request runs in a slot of a `SlotCache` (gemmakit/model/slot_cache.py), at its own
positions, so a request admitted while others decode needs no re-alignment of theirs. One
`Engine.step()`:

1. frees the slots of rows a caller finished (a cancelled request: `finish_reason` set),
2. admits waiting requests into free slots, reusing the longest cached prefix it can,
3. prefills admitted prompts, at most `prefill_chunk` prompt tokens per step (so a long
   prompt neither stalls the running rows nor holds memory beyond one chunk's activations,
   and a cancelled one stops between chunks), sampling a row's first token when its prompt
   is done,
4. decodes one token for every running row together (the batched C step when
   `c_decode.batch_decoder` gives one, else the torch model over the slot cache),
5. frees the slots of rows that finished, at once.

Every token is chosen by `engine.sample_row`; a row whose sampling fails (NaN logits, a
logits processor that raises) ends with finish reason "error" and its exception on its
`Sequence`, while the other rows go on.

Prefix reuse: a finished row's slot keeps its keys and values as a cached prefix until the
slot is needed again (least recently used first). A new prompt starting with those tokens
takes that slot and prefills only the rest; one that starts with what a running row holds (a
shared system prompt, the n completions of one prompt) gets a copy of those keys and values. Sliding-window layers keep a ring of
window + RING_SLACK positions, so the keys of a prefix cut at m are still in the ring only
when the cached sequence went at most RING_SLACK + 1 positions past m (`_reusable`); a
shorter match there would need keys the ring has overwritten, and is not reused.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import torch

from gemmakit.config import SLIDING
from gemmakit.inference import c_decode, speculative
from gemmakit.inference.engine import Request, check_length, sample_row
from gemmakit.lora import multi
from gemmakit.model.slot_cache import RING_SLACK, SlotCache

ERROR = "error"  # the finish reason of a row whose own sampling or forward pass failed


@dataclass
class Sequence:
    """A request in the engine: its slot, how far its prompt is prefilled, and its limits.

    `held` counts the tokens whose keys and values are in the slot (prompt, then fed output
    tokens); `reused` the prompt tokens a cached prefix saved; `error` the exception that
    ended the row (finish reason "error").
    """

    request: Request
    limit: int
    slot: int | None = None
    held: int = 0
    reused: int = 0
    error: Exception | None = None
    admitted_at: float | None = None
    first_token_at: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.held < len(self.request.prompt_ids)

    def tokens(self) -> list[int]:
        """The tokens whose keys and values the slot holds, in position order."""
        ids = self.request.prompt_ids + self.request.output_ids
        return ids[: self.held]


@dataclass
class EngineCounters:
    """What the engine has done since it started (the server's stats read these)."""

    steps: int = 0  # decode steps run
    step_rows: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))
    max_rows: int = 0  # rows decoded together at most
    admitted: int = 0
    prompt_tokens: int = 0
    prefix_hit_tokens: int = 0
    generated_tokens: int = 0


class Engine:
    """Continuous batching over `slots` sequences of at most `capacity` tokens each.

    Args:
        model: a gemmakit model (any family; `model/`), in eval mode.
        slots: sequences decoded together at most (vLLM's max_num_seqs).
        capacity: tokens (prompt + generated) one sequence may hold (vLLM's max_model_len);
            at most the model's context.
        prefill_chunk: prompt tokens prefilled per step at most.
        prefix_cache: keep finished rows' keys and values for prompts that start with them.
        draft: the draft model of requests with `speculative="draft"` (or, for "mtp", a
            Gemma 4 assistant)
            (`speculative.EngineSpeculation`: a speculating row verifies its proposals as
            rows of its own slot in the same step as the others).
    """

    def __init__(self, model, slots: int = 16, capacity: int | None = None, prefill_chunk: int = 256,
                 prefix_cache: bool = True, draft=None):  # fmt: skip
        context = model.config.max_position_embeddings
        capacity = context if capacity is None else capacity
        if slots < 1 or prefill_chunk < 1 or not 2 <= capacity <= context:
            raise ValueError(f"need slots >= 1, prefill_chunk >= 1 and 2 <= capacity <= {context}")
        self.model, self.capacity, self.prefill_chunk = model, capacity, prefill_chunk
        self.prefix_cache = prefix_cache
        self.cache = SlotCache(model.config, slots, capacity, model.dtype, model.device)
        with torch.inference_mode():  # as every step runs: the C step declines autograd
            self.fast = c_decode.batch_decoder(model, self.cache.layer_kv())
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order
        # Free slots, least recently used first, each with the LoRA adapter its cache was
        # computed under and the tokens it still holds (keys and values depend on both).
        self._free: collections.OrderedDict[int, tuple[str | None, list[int]]] = collections.OrderedDict(
            (s, (None, [])) for s in range(slots)
        )
        self.counters = EngineCounters()
        self.speculation = speculative.EngineSpeculation(model, self.cache, draft)

    @property
    def slots(self) -> int:
        return self.cache.slots

    @property
    def free_slots(self) -> int:
        return len(self._free) - len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> Sequence:
        """Queues a request; it joins the batch at the next step with a free slot.

        Raises:
            ContextLengthError: the prompt leaves no room in a sequence's capacity.
        """
        limit = check_length(len(request.prompt_ids), request.params.max_tokens, self.capacity)
        seq = Sequence(request, limit)
        self.waiting.append(seq)
        return seq

    # --- one step ------------------------------------------------------------------------

    def abort(self, requests: list[Request], reason: str = "abort") -> None:
        """Ends the unfinished ones of `requests` (waiting or running) and frees their slots."""
        for req in requests:
            if req.finish_reason is None:
                req.finish_reason = reason
        self._release()

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, int | None]]:
        """Runs one step; returns its [(request, token)], token None for a row that failed."""
        self._release()
        self._admit()
        events = self._prefill()
        # A row whose first token came from this step's prefill decodes from the next step:
        # one token per row per step, so each event's log-probabilities are its own.
        events += self._decode(skip={id(req) for req, _ in events})
        self._release()
        return events

    def _release(self) -> None:
        """Frees the slots of finished rows (their cache stays as a prefix) and drops finished
        waiting rows."""
        if any(s.request.finish_reason is not None for s in self.waiting):
            self.waiting = collections.deque(s for s in self.waiting if s.request.finish_reason is None)
        kept = []
        for seq in self.running:
            if seq.request.finish_reason is None:
                kept.append(seq)
                continue
            self._free[seq.slot] = (
                seq.request.adapter,
                speculative.cached_tokens(seq) if self.prefix_cache else [],
            )
            self._free.move_to_end(seq.slot)
        self.running = kept

    def _admit(self) -> None:
        while self.waiting and self._free:
            seq = self.waiting.popleft()
            slot, reused = self._pick_slot(seq.request)
            source, shared = self._running_prefix(seq.request)
            if shared > reused:  # a running row holds more of the prompt: copy its keys and values
                slot, reused = next(iter(self._free)), shared
                self.cache.copy_prefix(source, slot, shared)
            del self._free[slot]
            seq.slot, seq.held, seq.reused = slot, reused, reused
            seq.admitted_at = time.perf_counter()
            self.running.append(seq)
            c = self.counters
            c.admitted += 1
            c.prompt_tokens += len(seq.request.prompt_ids)
            c.prefix_hit_tokens += reused

    def _pick_slot(self, request: Request) -> tuple[int, int]:
        """The free slot to run `request` in and how many of its prompt's first tokens that
        slot's cache already holds: the longest reusable prefix computed under the same adapter,
        else the least recently used slot."""
        best_slot, best = next(iter(self._free)), 0
        if self.prefix_cache:
            for slot, (adapter, held) in self._free.items():
                if adapter != request.adapter:
                    continue
                m = self._reusable(held, request.prompt_ids)
                if m > best:
                    best_slot, best = slot, m
        return best_slot, best

    def _running_prefix(self, request: Request) -> tuple[int | None, int]:
        """The slot of the running row (same adapter) that holds the longest reusable prefix of
        `request`'s prompt, and its length (a shared system prompt, the n completions of one
        prompt)."""
        best_slot, best = None, 0
        if self.prefix_cache:
            for seq in self.running:
                if seq.request.adapter != request.adapter:
                    continue
                m = self._reusable(speculative.cached_tokens(seq), request.prompt_ids)
                if m > best:
                    best_slot, best = seq.slot, m
        return best_slot, best

    def _reusable(self, held: list[int], prompt: list[int]) -> int:
        """How many first tokens of `prompt` a slot holding `held` can skip (0: none).

        The last prompt token is always prefilled (its logits give the first new token). A
        sliding layer's ring of cap positions, filled up to len(held) - 1, still holds the
        window before m only if len(held) - 1 - cap < m - window + 1 (else the keys at
        m - window + 1 were overwritten); the same bound keeps the positions written past m
        outside every later row's window (slot_cache.py's masks).
        """
        m, most = 0, min(len(held), len(prompt) - 1)
        while m < most and held[m] == prompt[m]:
            m += 1
        for plan in self.cache.plans.values():
            if plan.window is not None and len(held) - 1 - plan.capacity >= m - plan.window + 1:
                return 0
        return m

    def _prefill(self) -> list[tuple[Request, int | None]]:
        """Prefills up to `prefill_chunk` prompt tokens, oldest admitted rows first."""
        events, budget = [], self.prefill_chunk
        for seq in [s for s in self.running if s.prefilling]:
            if budget == 0:
                break
            prompt = seq.request.prompt_ids
            n = min(budget, len(prompt) - seq.held)
            budget -= n
            try:
                hidden = self._forward(prompt[seq.held : seq.held + n], seq)
                if seq.held + n == len(prompt):  # an MTP row's first proposals read this state
                    self.speculation.observe(seq, hidden[0, -1:])
            except Exception as e:  # noqa: BLE001 - this row's forward pass failed, not the batch's
                events.append(self._fail(seq, e))
                continue
            seq.held += n
            if not seq.prefilling:
                logits = self.model.logits(hidden[:, -1])
                events.append(self._sample(seq, logits[0]))
        return events

    def _decode(self, skip: set[int]) -> list[tuple[Request, int | None]]:
        """Feeds every running row's last token (one step for all) and samples the next; rows
        whose request is in `skip` (by id) wait for the next step."""
        rows = [
            s
            for s in self.running
            if not s.prefilling and s.request.finish_reason is None and id(s.request) not in skip
        ]
        if not rows:
            return []
        events, feeds = [], []
        for seq in list(rows):  # a speculating row feeds its proposals too, in its own slot
            try:
                feeds.append(self.speculation.feed(seq))
            except Exception as e:  # noqa: BLE001 - this row's proposer failed, not the batch's
                events.append(self._fail(seq, e))
                rows.remove(seq)
        if not rows:
            return events
        tokens = [t for fed in feeds for t in fed]
        slots = [s.slot for s, fed in zip(rows, feeds) for _ in fed]
        positions = [s.held + i for s, fed in zip(rows, feeds) for i in range(len(fed))]
        c = self.counters
        c.steps += 1
        c.step_rows.append(len(rows))
        c.max_rows = max(c.max_rows, len(rows))
        try:
            # An MTP row reads the rows' hidden states, which only the torch step keeps.
            fast = self.fast if not self.speculation.needs_hidden(rows) else None
            logits = fast.step(tokens, slots, positions) if fast is not None else None
            hidden = None
            if logits is None:
                ids = torch.tensor(tokens, dtype=torch.long, device=self.model.device)[:, None]
                adapters = [s.request.adapter for s, fed in zip(rows, feeds) for _ in fed]
                hidden = self._forward_rows(ids, slots, positions, adapters)[:, -1]
                logits = self.model.logits(hidden)
        except Exception as e:  # noqa: BLE001 - reported to every row of the step
            return events + [self._fail(s, e) for s in rows]
        at = 0
        for seq, fed in zip(rows, feeds):
            row_hidden = None if hidden is None else hidden[at : at + len(fed)]
            events += self.speculation.settle(seq, logits[at : at + len(fed)], fed, self._sample, row_hidden)
            at += len(fed)
        return events

    # --- pieces --------------------------------------------------------------------------

    def _forward(self, tokens: list[int], seq: Sequence) -> torch.Tensor:
        """Hidden states (1, T, C) of a row's next prompt tokens, from the position it holds."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.model.device)[None]
        return self._forward_rows(ids, [seq.slot], [seq.held], [seq.request.adapter])

    def _forward_rows(self, ids, slots: list[int], starts: list[int], adapters: list[str | None]):
        """Hidden states (B, T, C): row b feeds ids[b] at starts[b]... of slot slots[b], with
        LoRA adapter adapters[b] (`lora.multi`; None: the base)."""
        multi.select_rows(self.model, adapters)
        B, T = ids.shape
        device = self.model.device
        offsets = torch.arange(T, device=device)[None]
        positions = torch.tensor(starts, dtype=torch.long, device=device)[:, None] + offsets  # (B, T)
        self.cache.row_slots = torch.tensor(slots, dtype=torch.long, device=device)
        return self.model.hidden_states(ids, positions=positions, cache=self.cache)

    def _sample(self, seq: Sequence, logits: torch.Tensor, choose=sample_row) -> tuple[Request, int | None]:
        """Chooses the row's token with `choose(logits, request)` (a speculating row's chooser
        keeps or replaces a proposal), then counts it and finishes the row when it ends it."""
        req = seq.request
        try:
            token = choose(logits, req)
        except Exception as e:  # noqa: BLE001 - this row's parameters or logits, not the batch's
            return self._fail(seq, e)
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        self.counters.generated_tokens += 1
        stops = req.params.stop_token_ids + ([] if req.params.ignore_eos else list(req.stop_ids))
        if token in stops:
            req.finish_reason = "stop"
        elif len(req.output_ids) >= seq.limit:
            req.finish_reason = "length"
        return req, token

    def _fail(self, seq: Sequence, error: Exception) -> tuple[Request, None]:
        seq.error, seq.request.finish_reason = error, ERROR
        return seq.request, None


# --- sizing --------------------------------------------------------------------------------


def slot_bytes(config, dtype, capacity: int) -> int:
    """Bytes of keys and values one slot of `capacity` positions takes (sliding layers: their
    ring of window + RING_SLACK positions)."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for i, kind in enumerate(config.layer_types):
        if config.layer_owns_kv(i):
            cap = min(capacity, config.sliding_window + RING_SLACK) if kind == SLIDING else capacity
            total += 2 * config.layer_kv_heads(i) * config.layer_head_dim(i) * cap * size
    return total


def available_memory() -> int | None:
    """Bytes the OS says can be allocated without swapping (Linux MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fitting_capacity(config, dtype, slots: int, share: float = 0.5, granule: int = 256) -> int:
    """The longest sequence `slots` slots can hold within `share` of the available memory
    (a multiple of `granule`, at least one granule), capped by the model's context."""
    context = config.max_position_embeddings
    free = available_memory()
    if free is None:
        return context
    budget = share * free / slots
    lo, hi = 1, context
    while lo < hi:  # the largest capacity whose slot fits the budget
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if slot_bytes(config, dtype, mid) <= budget else (lo, mid - 1)
    return min(context, max(granule, lo // granule * granule))

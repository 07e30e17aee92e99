"""The continuous-batching engine: requests join and leave the running batch between steps.

Each request runs in a slot of a `SlotCache` (gemmakit/model/slot_cache.py), at its own
positions, so a request admitted while others decode needs no re-alignment of theirs. One
`Engine.step()`:

1. frees the slots of rows a caller finished (a cancelled request: `finish_reason` set),
2. admits waiting requests into free slots, reusing the longest cached prefix it can,
3. picks this step's prompt chunks, at most `prefill_chunk` prompt tokens in all (so a long
   prompt neither stalls the running rows nor holds memory beyond one chunk's activations,
   and a cancelled one stops between chunks), oldest prompts first,
4. runs them and one token of every running row (its proposals too, when it speculates) as
   the rows of one call of the batched C step when `c_decode.batch_decoder` gives one
   (`_step_c`: prompts of any lengths side by side, only the rows that need logits through
   the output head), else through the torch model over the slot cache (`_prefill`: the
   chunks of one length of several rows in one forward pass; `_decode`: the running rows),
   sampling a row's first token when its prompt is done,
5. frees the slots of rows that finished, at once.

Every token is chosen by `engine.sample_rows` (`engine.sample_row`'s choice, the rows that
need nothing of their own sampled in one call); a row whose sampling fails (NaN logits, a
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
from gemmakit.inference.engine import Request, check_length, sample_row, sample_rows
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
        # Prompt chunks go into the C step beside the decoding rows over GGUF blocks; over
        # plain weights torch's matmuls prefill faster (c_decode.block_weights)
        self.prompts_in_c = self.fast is not None and self.fast.block_weights
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
        if self.fast is not None and self.prompts_in_c and not self.speculation.needs_hidden(self.running):
            events = self._step_c()
        else:
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
        """Prefills up to `prefill_chunk` prompt tokens: the oldest admitted row's next chunk,
        then the whole remaining prompts of later rows that fit.

        The chunks of one length of several rows run as one forward pass (`_groups`), each
        row at its own slot and positions, reading the weights once for all. A row whose
        forward pass fails ends alone: a failing group is run again row by row. The rows
        whose prompt is done go through the output head and sample their first token
        together. A prompt is cut into the same chunks whatever runs beside it.
        """
        # A later row joins only with the rest of its prompt: a few tokens cut off to fill
        # the budget would cost a pass of their own and give no first token.
        chunks = self._chunks(whole_after_first=True)
        events, done = [], []  # done: (row, hidden state of its last prompt token)
        for group in self._groups(chunks):
            try:
                done += self._prefill_group(group)
            except Exception as e:  # noqa: BLE001 - this group's forward pass failed, not the batch's
                if len(group) == 1:
                    events.append(self._fail(group[0][0], e))
                    continue
                for chunk in group:  # again one by one, so that only the failing row ends
                    try:
                        done += self._prefill_group([chunk])
                    except Exception as e:  # noqa: BLE001
                        events.append(self._fail(chunk[0], e))
        if done:
            seqs = [seq for seq, _ in done]
            try:
                # The rows whose prompt ended go through the output head together: the GGUF
                # head's product (8-bit activations, ops/gguf_linear.py) gives each row what
                # it gives that row alone, and 16 rows cost 65 ms of one thread's CPU against
                # 144 ms one by one (bundled model, loaded machine).
                multi.select_rows(self.model, [seq.request.adapter for seq in seqs])
                logits = self.model.logits(torch.stack([h for _, h in done]))
            except Exception as e:  # noqa: BLE001 - reported to the rows whose prompt ended
                return events + [self._fail(seq, e) for seq in seqs]
            events += self._sample(seqs, logits)
        return events

    def _chunks(self, whole_after_first: bool) -> list[tuple[Sequence, int]]:
        """This step's prompt chunks [(row, tokens)], at most `prefill_chunk` tokens in all,
        the rows in admission order: the oldest takes what the budget allows, and so does
        each later one, or (`whole_after_first`) only when the rest of its prompt fits."""
        chunks, budget = [], self.prefill_chunk
        for seq in [s for s in self.running if s.prefilling]:
            left = len(seq.request.prompt_ids) - seq.held
            if whole_after_first and chunks and left > budget:
                continue
            n = min(budget, left)
            budget -= n
            chunks.append((seq, n))
            if budget == 0:
                break
        return chunks

    def _groups(self, chunks: list[tuple[Sequence, int]]) -> list[list[tuple[Sequence, int]]]:
        """The (row, tokens) chunks of a step cut into forward passes: the chunks of one length
        share a pass (B, T), longest first.

        Chunks of other lengths are not padded into one pass: a row's hidden states must not
        depend on the pass it ran in, and with the GGUF products' 8-bit activations
        (ops/gguf_linear.py) the last-bit differences of another width (attention's kernel
        and its blocking change with T) grow through the layers into other logits (bundled
        model, 15 tokens alone against the same 15 padded to 20: logits 0.9 apart, another
        argmax). Rows of one width in one pass get what they get alone.
        """
        groups: dict[int, list[tuple[Sequence, int]]] = {}
        for seq, n in sorted(chunks, key=lambda c: -c[1]):
            groups.setdefault(n, []).append((seq, n))
        return list(groups.values())

    def _prefill_group(self, group: list[tuple[Sequence, int]]) -> list[tuple[Sequence, torch.Tensor]]:
        """One forward pass over the group's chunks; returns (row, hidden state of its last
        prompt token) for the rows whose prompt it finished."""
        width = group[0][1]
        rows = [seq.request.prompt_ids[seq.held : seq.held + width] for seq, _ in group]
        ids = torch.tensor(rows, dtype=torch.long, device=self.model.device)
        slots, starts = [seq.slot for seq, _ in group], [seq.held for seq, _ in group]
        hidden = self._forward_rows(ids, slots, starts, [seq.request.adapter for seq, _ in group])
        done = []
        for b, (seq, n) in enumerate(group):
            seq.held += n
            if not seq.prefilling:
                self.speculation.observe(seq, hidden[b, n - 1 : n])  # an MTP row's first proposals read it
                done.append((seq, hidden[b, n - 1]))
        return done

    def _decode(self, skip: set[int]) -> list[tuple[Request, int | None]]:
        """Feeds every running row's last token (one step for all) and samples the next; rows
        whose request is in `skip` (by id) wait for the next step."""
        events, rows, feeds = self._feeds(skip)
        if not rows:
            return events
        tokens = [t for fed in feeds for t in fed]
        slots = [s.slot for s, fed in zip(rows, feeds) for _ in fed]
        positions = [s.held + i for s, fed in zip(rows, feeds) for i in range(len(fed))]
        self._count_step(len(rows))
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
        offsets = [sum(len(fed) for fed in feeds[:i]) for i in range(len(feeds))]
        return events + self._settle(rows, feeds, logits, offsets, hidden)

    def _feeds(self, skip: set[int] = frozenset()) -> tuple[list, list[Sequence], list[list[int]]]:
        """The decoding rows of this step (running, prompt done, request not in `skip` by id)
        and the tokens each feeds: its last token, then its proposals when it speculates.
        Returns (events of rows whose proposer failed, rows, feeds)."""
        rows = [
            s
            for s in self.running
            if not s.prefilling and s.request.finish_reason is None and id(s.request) not in skip
        ]
        events, feeds = [], []
        for seq in list(rows):  # a speculating row feeds its proposals too, in its own slot
            try:
                feeds.append(self.speculation.feed(seq))
            except Exception as e:  # noqa: BLE001 - this row's proposer failed, not the batch's
                events.append(self._fail(seq, e))
                rows.remove(seq)
        return events, rows, feeds

    def _count_step(self, rows: int) -> None:
        c = self.counters
        c.steps += 1
        c.step_rows.append(rows)
        c.max_rows = max(c.max_rows, rows)

    def _settle(self, rows: list[Sequence], feeds: list[list[int]], logits: torch.Tensor, offsets: list[int],
                hidden=None, prompted: tuple[list[Sequence], list[int]] = ((), ())):  # fmt: skip
        """Chooses the tokens of decoding rows, rows[i] from the logits rows offsets[i]... of
        what it fed (a speculating row keeps or replaces its proposals, `speculation.settle`),
        and the first tokens of `prompted` rows, whose prompt ended, from their last prompt
        row's logits (by index). The plain rows and the prompted ones are sampled in one call,
        from a view of `logits` when their rows are consecutive (no copy of 262k floats a row)."""
        events, plain, at_rows = [], list(prompted[0]), list(prompted[1])
        for seq, fed, at in zip(rows, feeds, offsets):
            if seq.request.params.speculative:
                row_hidden = None if hidden is None else hidden[at : at + len(fed)]
                events += self.speculation.settle(
                    seq, logits[at : at + len(fed)], fed, self._sample_one, row_hidden
                )
            else:  # one token fed: sampled with the other plain rows in one call
                seq.held += 1
                plain.append(seq)
                at_rows.append(at)
        if plain:
            first = at_rows[0]
            if at_rows == list(range(first, first + len(at_rows))):
                chosen = logits[first : first + len(at_rows)]
            else:
                chosen = logits.index_select(0, torch.tensor(at_rows, device=logits.device))
            events += self._sample(plain, chosen)
        return events

    def _step_c(self) -> list[tuple[Request, int | None]]:
        """One step on the batched C step (csrc/decode_batch.c): one call for every decoding
        row (its last token and any proposals) and this step's prompt chunks, whatever their
        lengths. Only the decoding rows and the last row of a prompt that ends go through the
        output head. Then the decoding rows and the rows whose prompt ended are sampled.

        A prompt row that ends its prompt samples its first token; the row decodes from the
        next step, one token per row per step. A row's logits are the same whatever else is
        in the step (decode_batch.c), so the chunks may be cut to fill the budget and the
        rows ordered freely: the plain decoding rows, then the prompts that end, then the
        others, so that the rows sampled together are consecutive logits rows. When the step
        fails, each part runs again alone, so that only the failing row ends."""
        events, rows, feeds = self._feeds()
        if rows:
            self._count_step(len(rows))
        chunks = [(seq, seq.request.prompt_ids[seq.held : seq.held + n]) for seq, n in self._chunks(False)]
        ending = [(seq, fed) for seq, fed in chunks if seq.held + len(fed) == len(seq.request.prompt_ids)]
        going_on = [(seq, fed) for seq, fed in chunks if seq.held + len(fed) < len(seq.request.prompt_ids)]
        speculating = [(seq, fed) for seq, fed in zip(rows, feeds) if seq.request.params.speculative]
        plain = [(seq, fed) for seq, fed in zip(rows, feeds) if not seq.request.params.speculative]
        parts = plain + ending + speculating + going_on
        if not parts:
            return events
        logits, spans = self._run_c(parts)
        decoded, decoded_feeds, offsets, prompted, prompted_rows = [], [], [], [], []
        for (seq, fed), span in zip(parts, spans):
            if isinstance(span, Exception):
                events.append(self._fail(seq, span))
            elif seq.prefilling:
                seq.held += len(fed)
                if not seq.prefilling:
                    prompted.append(seq)
                    prompted_rows.append(span[0])
            else:
                decoded.append(seq)
                decoded_feeds.append(fed)
                offsets.append(span[0])
        return events + self._settle(decoded, decoded_feeds, logits, offsets, None, (prompted, prompted_rows))

    def _run_c(self, parts: list[tuple[Sequence, list[int]]]) -> tuple[torch.Tensor, list]:
        """Runs [(row, tokens fed)] as one C step; returns the logits of the rows that want
        them (a decoding row: every row it fed; a prompt chunk: its last row when it ends the
        prompt) and per part the (first, end) of its logits rows, or the exception its step
        raised. A failing step runs each part again alone (its keys and values rewritten, the
        same), so that only the failing part fails."""
        tokens, slots, positions, wanted, spans = [], [], [], [], []
        for seq, fed in parts:
            start, first = len(tokens), len(wanted)
            tokens += fed
            slots += [seq.slot] * len(fed)
            positions += range(seq.held, seq.held + len(fed))
            if not seq.prefilling:
                wanted += range(start, len(tokens))
            elif seq.held + len(fed) == len(seq.request.prompt_ids):  # the prompt's last row
                wanted.append(len(tokens) - 1)
            spans.append((first, len(wanted)))
        try:
            return self.fast.step(tokens, slots, positions, wanted), spans
        except Exception as e:  # noqa: BLE001 - reported to the parts below, one by one
            if len(parts) == 1:
                return torch.empty(0), [e]
        kept, spans, at = [], [], 0
        for part in parts:  # each a view of the buffer the next call reuses: copied at once
            logits, (span,) = self._run_c([part])
            if isinstance(span, Exception):
                spans.append(span)
                continue
            kept.append(logits.clone())
            spans.append((at, at + len(logits)))
            at += len(logits)
        return (torch.cat(kept) if kept else torch.empty(0)), spans

    # --- pieces --------------------------------------------------------------------------

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

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[Request, int | None]]:
        """Chooses each row's next token from its row of `logits` (rows, V) (`engine.sample_rows`:
        one batched call for the rows that need nothing of their own); a row whose sampling
        fails ends alone."""
        chosen = sample_rows(logits, [seq.request for seq in seqs])
        return [
            self._fail(s, t) if isinstance(t, Exception) else self._took(s, t) for s, t in zip(seqs, chosen)
        ]

    def _sample_one(
        self, seq: Sequence, logits: torch.Tensor, choose=sample_row
    ) -> tuple[Request, int | None]:
        """Chooses one row's token with `choose(logits, request)` (a speculating row's chooser
        keeps or replaces a proposal)."""
        try:
            token = choose(logits, seq.request)
        except Exception as e:  # noqa: BLE001 - this row's parameters or logits, not the batch's
            return self._fail(seq, e)
        return self._took(seq, token)

    def _took(self, seq: Sequence, token: int) -> tuple[Request, int]:
        """Counts a row's chosen token and finishes the row when the token ends it."""
        req = seq.request
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

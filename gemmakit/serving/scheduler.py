"""The server's side of the engine: one worker thread owns the model and a continuous-batching
`Engine` (gemmakit/inference/batching.py).

HTTP handlers run on an asyncio event loop and must never block it, while a forward pass holds
a CPU for tens of milliseconds. So handlers only `submit()` prompts and read a `Ticket`: an
asyncio queue that the worker thread fills with `StreamEvent`s (text deltas and finish reasons,
made by `gemmakit.inference.text.finish_step` as for the Python API). Between two engine steps
the worker moves waiting rows into free slots (continuous batching: a request that arrives
while others generate starts at the next step), so at most `max_batch` rows run at once and
the others wait, bounded by `max_queue`.

Cancelling (a client that went away) finishes the row between two steps: its slot is freed at
the next step, even in the middle of a long prompt's prefill (prefill runs in chunks); a row
cancelled while still queued never runs. A row whose own sampling fails ends alone with its
error; the other rows go on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from gemmakit.errors import ContextLengthError
from gemmakit.inference import logits_processing
from gemmakit.inference.batching import Engine
from gemmakit.inference.batching import Sequence as EngineSequence
from gemmakit.inference.engine import Request
from gemmakit.inference.sampling import SamplingParams, request_generator
from gemmakit.inference.text import StreamEvent, TextStream, finish_step

ABORT = "abort"  # the finish_reason of a cancelled row (vLLM's name)


class QueueFullError(Exception):
    """More rows are waiting than `max_queue` allows (HTTP 429)."""


class ShuttingDownError(Exception):
    """The scheduler is closing or closed and takes no new work (HTTP 503)."""


@dataclass
class SchedulerStats:
    """Counters since start; `batch_sizes` keeps the sizes of the last 1000 batches."""

    batches: int = 0
    rows: int = 0
    max_batch_seen: int = 0
    generated_tokens: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0  # prompt tokens of the rows that started
    prefix_hit_tokens: int = 0  # of those, tokens whose keys and values were reused, not prefilled
    # seconds from submit to each row's first token, for the last 1000 rows
    time_to_first_token: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))
    batch_sizes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))
    # (finish_reason, generated tokens) of the last 1000 rows that finished
    finished: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))


class _Row:
    """One prompt of a ticket, as the worker sees it."""

    def __init__(self, ticket: Ticket, index: int, request: Request, stream: TextStream):
        self.ticket, self.index, self.request, self.stream = ticket, index, request, stream
        self.tokens = 0
        self.submitted = time.perf_counter()
        self.sequence: EngineSequence | None = None  # the engine's handle, once the row has a slot


class Ticket:
    """The rows of one HTTP request (one per prompt) and the stream of their events.

    Iterate with `async for event in ticket` in the event loop that submitted it: every row
    ends with an event whose `finish_reason` is set ("stop", "length", or "abort" when it was
    cancelled). An exception from the worker is raised by the iteration.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt_tokens: list[int]):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._on_cancel = None  # set by the scheduler: drops the ticket's queued rows at once
        self.prompt_tokens = prompt_tokens
        self.requests: list[Request] = []  # the rows' requests, in order (their counts for usage)

    def __len__(self) -> int:
        return len(self.prompt_tokens)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stops generating for every row; safe to call from any thread, more than once."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel()

    def _put(self, item) -> None:
        # Called by the worker thread: hand the item to the ticket's event loop.
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel()

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        remaining = len(self)
        while remaining:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                remaining -= 1
            yield item


class Scheduler:
    """Owns the model in one worker thread and runs submitted prompts on a continuous-batching
    engine.

    Args:
        model, tokenizer: what `gemmakit.load()` returns (`LLM.model`, `LLM.tokenizer`).
        stop_ids: token ids that end a row (`LLM.loaded.stop_ids`).
        max_batch: rows decoded together at most: the engine's slots (vLLM's max_num_seqs).
        max_queue: rows allowed to wait for a slot; `submit` raises `QueueFullError` beyond.
        batch_window_s: when the engine is idle, the worker waits until no new row has
            arrived for this long (at most 10 times this in all) before the first step, so
            that requests sent at the same moment start in the same step.
        max_model_len: tokens (prompt + generated) of one row at most: each slot's capacity
            (default: the model's context). Callers check prompts against it before `submit`.
        prefill_chunk: prompt tokens prefilled per step at most (between decode steps).
        draft: the draft model (or Gemma 4 assistant) of requests that speculate with one.
    """

    def __init__(
        self,
        model,
        tokenizer,
        stop_ids: Sequence[int],
        max_batch: int = 8,
        max_queue: int = 64,
        batch_window_s: float = 0.01,
        max_model_len: int | None = None,
        prefill_chunk: int = 256,
        draft=None,
    ):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, tuple(stop_ids)
        self.max_batch, self.max_queue, self.batch_window_s = max_batch, max_queue, batch_window_s
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.prefill_chunk, self.draft = prefill_chunk, draft
        self.stats = SchedulerStats()
        self.engine: Engine | None = None  # made by the worker: its cache is allocated there
        self._waiting: collections.deque[_Row] = collections.deque()
        self._running: dict[int, _Row] = {}  # id(request) -> row, for the rows in the engine
        self._cond = threading.Condition()
        self._closing = False
        self._holds = 0
        self._thread: threading.Thread | None = None

    # --- control ------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the worker thread (idempotent)."""
        with self._cond:
            if self._closing:
                raise ShuttingDownError("the scheduler is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="gemmakit-scheduler", daemon=True)
                self._thread.start()

    def close(self, timeout: float | None = 10.0) -> None:
        """Refuses new work; waiting and running rows end with `ShuttingDownError`."""
        with self._cond:
            self._closing = True
            rows = list(self._waiting) + list(self._running.values())
            self._waiting.clear()
            self._cond.notify_all()
        for ticket in {id(r.ticket): r.ticket for r in rows}.values():
            ticket._put(ShuttingDownError("the server is shutting down"))
            ticket.cancel()  # running rows end at the next step
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def waiting(self) -> int:
        """Rows waiting for a slot."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Rows in the engine (prefilling or decoding)."""
        return len(self._running)

    @contextlib.contextmanager
    def paused(self):
        """No new row starts inside this block (running rows go on); rows still queue.

        Used to line requests up before they run, e.g. to drain a server or in tests that need
        several requests to start in the same step.
        """
        with self._cond:
            self._holds += 1
        try:
            yield self
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify_all()

    # --- submitting ---------------------------------------------------------------------

    def submit(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        loop: asyncio.AbstractEventLoop | None = None,
        adapter: str | None = None,
    ) -> Ticket:
        """Queues prompts (token ids, limits already checked) and returns their `Ticket`.

        A row's seed (`params.seed`, or a fresh random one) seeds its own generator, so its
        tokens do not depend on which other rows run beside it (`request_generator`).
        `adapter` names the LoRA adapter the rows run with (`lora.multi.attach`; None: the base).

        Raises:
            QueueFullError: the waiting rows would exceed `max_queue`.
            ShuttingDownError: the scheduler is closing, or its worker has stopped.
        """
        if not prompts:
            raise ValueError("no prompts")
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        loop = loop or asyncio.get_running_loop()
        ticket = Ticket(loop, [len(p) for p in prompts])
        ticket._on_cancel = self._forget_cancelled
        rows = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            gen = request_generator(p, seeds=None)
            # Penalties, logit bias, a grammar and log-probabilities, from the params (openai part).
            request = Request(list(prompt), p, self.stop_ids, gen, adapter=adapter)
            request = logits_processing.prepare(request, self.tokenizer)
            rows.append(_Row(ticket, i, request, TextStream(self.tokenizer, p.stop)))
        ticket.requests = [row.request for row in rows]
        self.start()
        with self._cond:
            if self._closing or not self._thread.is_alive():
                raise ShuttingDownError("the server is shutting down")
            if len(self._waiting) + len(rows) > self.max_queue:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are waiting (at most {self.max_queue}); retry later"
                )
            self._waiting.extend(rows)
            self._cond.notify_all()
        return ticket

    # --- the worker ---------------------------------------------------------------------

    def _work(self) -> None:
        try:
            self.engine = Engine(
                self.model, self.max_batch, self.max_model_len, self.prefill_chunk, prefix_cache=True,
                draft=self.draft,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - e.g. no memory for the cache: every request learns why
            self._fail_all(e)
            return
        while self._admit():
            self._step()
        self._abort_running()

    def _admit(self) -> bool:
        """Blocks until there is work, then moves waiting rows into free slots; False when closing."""
        engine = self.engine
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._closing:
                    return False
                if self._running or engine.has_work():
                    break
                if not self._waiting or self._holds:
                    self._cond.wait()
                    continue
                self._wait_for_burst()
                if self._waiting and not self._holds:
                    break
            while self._waiting and not self._holds and engine.free_slots > 0:
                row = self._waiting.popleft()
                try:
                    row.sequence = engine.add(row.request)
                except ContextLengthError as e:  # callers check first; a direct caller may not
                    row.request.finish_reason = "error"
                    row.ticket._put(e)
                    continue
                self._running[id(row.request)] = row
                self.stats.rows += 1
            return True

    def _wait_for_burst(self) -> None:
        """Lets requests sent at the same moment start together (lock held): waits while they
        keep arriving (gaps under the window), for at most 10 windows."""
        start = time.monotonic()
        last_count, last_arrival = len(self._waiting), start
        while len(self._waiting) < self.max_batch and not self._closing:
            now = time.monotonic()
            if len(self._waiting) != last_count:
                last_count, last_arrival = len(self._waiting), now
            left = min(last_arrival + self.batch_window_s, start + 10 * self.batch_window_s) - now
            if left <= 0:
                break
            self._cond.wait(left)
        self._drop_cancelled()

    def _step(self) -> None:
        """One engine step: cancelled rows end first, then each new token goes to its ticket."""
        engine, s = self.engine, self.stats
        for row in list(self._running.values()):
            if row.ticket.cancelled and row.request.finish_reason is None:
                self._finish(row, ABORT)
        steps_before = engine.counters.steps
        try:
            events = engine.step()
        except Exception as e:  # noqa: BLE001 - reported to the rows, the worker lives on
            self._abort_running(e)
            return
        c = engine.counters
        if c.steps != steps_before:
            s.batches, s.max_batch_seen = c.steps, max(s.max_batch_seen, c.step_rows[-1])
            s.batch_sizes.append(c.step_rows[-1])
        s.prompt_tokens, s.prefix_hit_tokens = c.prompt_tokens, c.prefix_hit_tokens
        for request, token in events:
            row = self._running.get(id(request))
            if row is not None:
                self._deliver(row, token)
        with self._cond:
            for key in [k for k, row in self._running.items() if row.request.finish_reason is not None]:
                del self._running[key]

    def _deliver(self, row: _Row, token: int | None) -> None:
        """Hands a row's new token (as text) to its ticket; None: the row failed alone."""
        if token is None:
            row.ticket._put(row.sequence.error)
            self.stats.finished.append((row.request.finish_reason, row.tokens))
            return
        if row.tokens == 0:
            self.stats.time_to_first_token.append(time.perf_counter() - row.submitted)
        # No event for a speculating row's token past a stop string met earlier in the step.
        for event in finish_step([(0, token)], [row.request], [row.stream]):
            self._emit(row, event)

    def _abort_running(self, error: Exception | None = None) -> None:
        """Ends every running row: with `error` when given, else as cancelled."""
        rows = list(self._running.values())
        for row in rows:
            if row.request.finish_reason is None:
                if error is None:
                    self._finish(row, ABORT)
                else:
                    row.request.finish_reason = "error"
                    row.ticket._put(error)
        if self.engine is not None:
            self.engine.abort([row.request for row in rows])
        with self._cond:
            self._running.clear()

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            self._closing = True
            rows, self._waiting = list(self._waiting), collections.deque()
        for row in rows:
            row.ticket._put(error)

    def _forget_cancelled(self) -> None:
        # A queued row of a cancelled ticket frees its place in the queue at once; a running
        # one is finished by the worker between two steps.
        with self._cond:
            self._drop_cancelled()
            self._cond.notify_all()

    def _drop_cancelled(self) -> None:
        """Removes cancelled rows from the queue (lock held); they never run."""
        if not any(r.ticket.cancelled for r in self._waiting):
            return
        kept = collections.deque()
        for row in self._waiting:
            if row.ticket.cancelled:
                self._finish(row, ABORT)
            else:
                kept.append(row)
        self._waiting = kept

    def _finish(self, row: _Row, reason: str) -> None:
        row.request.finish_reason = reason
        if reason == ABORT:
            self.stats.cancelled += 1
        self.stats.finished.append((reason, row.tokens))
        row.ticket._put(StreamEvent(row.index, "", None, reason))

    def _emit(self, row: _Row, event: StreamEvent) -> None:
        """Counts a row's event and hands it to its ticket, indexed within the ticket."""
        row.tokens += 1
        self.stats.generated_tokens += 1
        if event.finish_reason is not None:
            self.stats.finished.append((event.finish_reason, row.tokens))
        row.ticket._put(dataclasses.replace(event, index=row.index))

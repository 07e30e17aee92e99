"""The server's batching engine: one worker thread owns the model and decodes requests in batches.

HTTP handlers run on an asyncio event loop and must never block it, while a forward pass holds
a CPU for tens of milliseconds. So handlers only `submit()` prompts and read a `Ticket`: an
asyncio queue that the worker thread fills with `StreamEvent`s (text deltas and finish reasons
from `gemmakit.inference.text.stream_text`, as the Python API gets them). The worker takes up
to `max_batch` waiting rows at a time and runs them as one left-padded batch; whatever arrives
meanwhile waits, bounded by `max_queue`, and starts together in the next batch.

Why not continuous batching (admitting rows into the running batch between decode steps)?
The KV cache shares one column index across the batch, and sliding-window layers count the
window in columns. A row spliced into a running batch would have to be re-aligned inside the
cache's private slot layout, or have other rows' columns inside its window; neither keeps "same
tokens alone or batched" true without reaching into the cache's internals. Static batches keep
that guarantee with the public `generate_steps` only.

Cancelling (a client that went away) marks the row finished between two decode steps, so the
batch stops sampling it (its slot rides along, masked, until the batch ends, as
`generate_steps` keeps slots); a row cancelled while still queued never runs.
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

from gemmakit.inference import logits_processing
from gemmakit.inference.engine import Request
from gemmakit.inference.sampling import SamplingParams, request_generator
from gemmakit.inference.text import StreamEvent, stream_text

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

    def __init__(self, ticket: Ticket, index: int, request: Request):
        self.ticket, self.index, self.request = ticket, index, request
        self.tokens = 0


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
    """Owns the model in one worker thread and runs submitted prompts in batches.

    Args:
        model, tokenizer: what `gemmakit.load()` returns (`LLM.model`, `LLM.tokenizer`).
        stop_ids: token ids that end a row (`LLM.loaded.stop_ids`).
        max_batch: rows decoded together at most.
        max_queue: rows allowed to wait for a batch; `submit` raises `QueueFullError` beyond.
        batch_window_s: before starting a batch that is not full, the worker waits until no
            new row has arrived for this long (at most 10 times this in all), so that requests
            sent at the same moment share a batch.
    """

    def __init__(
        self,
        model,
        tokenizer,
        stop_ids: Sequence[int],
        max_batch: int = 8,
        max_queue: int = 64,
        batch_window_s: float = 0.01,
    ):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, tuple(stop_ids)
        self.max_batch, self.max_queue, self.batch_window_s = max_batch, max_queue, batch_window_s
        self.stats = SchedulerStats()
        self._waiting: collections.deque[_Row] = collections.deque()
        self._running: list[_Row] = []
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
            rows = list(self._waiting) + self._running
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
        """Rows waiting for a batch."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Rows in the batch being decoded."""
        return len(self._running)

    @contextlib.contextmanager
    def paused(self):
        """No new batch starts inside this block (the running one finishes); rows still queue.

        Used to line requests up before they run, e.g. to drain a server or in tests that need
        several requests in one batch.
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
        tokens do not depend on which other rows share its batch (`request_generator`).
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
            rows.append(_Row(ticket, i, request))
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
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Row] | None:
        """Blocks until rows can run and takes up to `max_batch` of them; None when closing."""
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._closing:
                    return None
                if not self._waiting or self._holds:
                    self._cond.wait()
                    continue
                # Give a burst of requests the chance to share this batch: wait while they keep
                # arriving (gaps under the window), for at most 10 windows. A request that slips
                # ahead of the burst alone would make all the others wait its whole generation.
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
                if self._closing or not self._waiting or self._holds:
                    continue
                n = min(self.max_batch, len(self._waiting))
                self._running = [self._waiting.popleft() for _ in range(n)]
                return self._running

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

    def _run(self, batch: list[_Row]) -> None:
        s = self.stats
        s.batches += 1
        s.rows += len(batch)
        s.max_batch_seen = max(s.max_batch_seen, len(batch))
        s.batch_sizes.append(len(batch))
        requests = [row.request for row in batch]
        try:
            for events in stream_text(self.model, self.tokenizer, requests):
                for event in events:
                    self._emit(batch[event.index], event)
                # Between two steps the generation is suspended, so finishing a row here is
                # safe: the next step neither samples it nor reports it.
                for row in batch:
                    if row.ticket.cancelled and row.request.finish_reason is None:
                        self._finish(row, ABORT)
        except Exception as e:  # noqa: BLE001 - reported to the requests, the worker lives on
            for row in batch:
                if row.request.finish_reason is None:
                    row.request.finish_reason = "error"
                    row.ticket._put(e)
        finally:
            with self._cond:
                self._running = []

    def _emit(self, row: _Row, event: StreamEvent) -> None:
        """Counts a batch row's event and hands it to its ticket, indexed within the ticket."""
        row.tokens += 1
        self.stats.generated_tokens += 1
        if event.finish_reason is not None:
            self.stats.finished.append((event.finish_reason, row.tokens))
        row.ticket._put(dataclasses.replace(event, index=row.index))

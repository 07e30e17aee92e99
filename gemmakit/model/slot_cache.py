"""The slot KV cache of the serving engine: one sequence per slot, each row at its own position.

`KVCache` (cache.py) shares one column index across a left-padded batch, so a sequence cannot
join a batch that is already running. Here every slot is a sequence of its own: a forward
pass runs rows that each name a slot and their own positions (a decode step: one token per
row at different positions; a prefill chunk: T tokens of one slot), and position alone
decides what a row attends, so no padding mask is kept.

Layout (the contract the batched C step reads through `layer_kv()`): for each layer that owns
K/V, `k` and `v` of shape (slots, kv_heads, cap_layer, head_dim), contiguous. Full-attention
layers: cap_layer = capacity, position p at index p. Sliding layers: a ring of cap_layer =
min(capacity, window + RING_SLACK), position p at index p % cap_layer.
"""

from __future__ import annotations

import math
import mmap

import numpy as np
import torch

from gemmakit.config import FULL, SLIDING, GemmaConfig

# Ring slots beyond the sliding window. Writing the rows of one step before attending is safe
# when a step writes at most RING_SLACK + 1 consecutive positions of one slot: the keys it
# overwrites (positions <= last - cap) are then all outside the window of its first row
# (first - window). The slack also lets a sequence roll back up to RING_SLACK positions
# (speculative decoding) without losing keys its window still needs.
RING_SLACK = 16


class _TypePlan:
    """How the rows of the current forward pass write and read one attention type's layers.

    Shared by every layer of the type (their caches have the same capacity), computed once per
    forward by `SlotCache.advance`.
    """

    def __init__(self, capacity: int, window: int | None):
        self.capacity, self.window = capacity, window
        self.slots: torch.Tensor | None = None  # (B,) slot of each row
        self.single: int | None = None  # the slot when the pass has one row (read a view)
        self.write_index: torch.Tensor | None = None  # (B, T) cache index of each new key
        self.write_from = 0  # write only new keys [write_from:] (a chunk longer than the ring)
        self.contiguous: int | None = None  # first index when a single row writes a plain range
        self.read_length = 0  # indices [0, read_length) hold the keys attended to
        self.concat = False  # attend over (the cache before the write) + the new keys


class SlotLayerCache:
    """One layer's keys and values: (slots, kv_heads, cap_layer, head_dim)."""

    def __init__(self, plan: _TypePlan, slots: int, kv_heads: int, head_dim: int, dtype, device):
        self.plan = plan
        shape = (slots, kv_heads, plan.capacity, head_dim)
        self.k, self.v = lazy_zeros(shape, dtype, device), lazy_zeros(shape, dtype, device)

    def _read(self, store: torch.Tensor) -> torch.Tensor:
        """The keys (or values) the rows attend over: (B, K, read_length, D)."""
        p = self.plan
        head = store[:, :, : p.read_length]
        if p.single is not None:  # one row: a view, no copy
            return head[p.single : p.single + 1]
        return head.index_select(0, p.slots)

    def _write(self, store: torch.Tensor, new: torch.Tensor) -> None:
        p = self.plan
        new = new[:, :, p.write_from :]
        if p.contiguous is not None:
            store[p.single, :, p.contiguous : p.contiguous + new.shape[2]] = new[0]
        else:  # advanced indices on dims 0 and 2 put (B, T) first: (B, T, K, D)
            store[p.slots[:, None], :, p.write_index] = new.transpose(1, 2)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the new keys and values (B, K, T, D); returns those attended to (B, K, S, D)."""
        if self.plan.concat:  # read before the write overwrites keys earlier rows still need
            keys, values = torch.cat((self._read(self.k), k), 2), torch.cat((self._read(self.v), v), 2)
            self._write(self.k, k)
            self._write(self.v, v)
            return keys, values
        self._write(self.k, k)
        self._write(self.v, v)
        return self._read(self.k), self._read(self.v)


class SlotCache:
    """Keys and values of `slots` sequences of at most `capacity` positions each.

    `for_layer[i]` is layer i's `SlotLayerCache`, or None for a KV-shared layer (Gemma 3n/4).
    Which positions of a slot hold its sequence is the caller's bookkeeping: a row at position
    p must have had positions [0, p) (or, sliding layers, the window before p) written before.
    """

    def __init__(self, config: GemmaConfig, slots: int, capacity: int, dtype, device):
        if slots < 1 or capacity < 1:
            raise ValueError("a slot cache needs at least one slot of at least one position")
        self.config, self.slots, self.capacity = config, slots, capacity
        self.dtype, self.device = dtype, device
        self.plans = {FULL: _TypePlan(capacity, None)}
        if SLIDING in config.layer_types:
            window = config.sliding_window
            self.plans[SLIDING] = _TypePlan(min(capacity, window + RING_SLACK), window)
        self.for_layer: list[SlotLayerCache | None] = [
            SlotLayerCache(
                self.plans[t], slots, config.layer_kv_heads(i), config.layer_head_dim(i), dtype, device
            )
            if config.layer_owns_kv(i)
            else None
            for i, t in enumerate(config.layer_types)
        ]
        # (B,) the slot of each row of the next forward pass: the model reads it (with the
        # pass's positions) to call `advance`.
        self.row_slots: torch.Tensor | None = None

    def layer_kv(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Each model layer's (keys, values), None for a layer that owns none."""
        return [None if c is None else (c.k, c.v) for c in self.for_layer]

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Copies what slot `source` holds for positions [0, length) into slot `target`: the
        first min(length, capacity) indices of every layer, so the whole ring of a sliding
        layer only once it has wrapped (which positions of it a later row may attend is the
        caller's bound, as for reusing a slot in place). Not more: copying whole rings cost
        ~0.1 s a request into fresh slots (the bundled Gemma 3 270M's 15 rings of 528
        positions, 16 chat requests sharing prompts, loaded machine)."""
        for layer in self.for_layer:
            if layer is not None:
                n = min(length, layer.plan.capacity)
                layer.k[target, :, :n] = layer.k[source, :, :n]
                layer.v[target, :, :n] = layer.v[source, :, :n]

    def advance(self, slots: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Plans a forward pass whose row b feeds positions[b] (consecutive) of slot slots[b],
        and returns each attention type's additive mask (B, 1, T, S)."""
        B, T = positions.shape
        first, last = positions[:, 0], positions[:, -1]
        if int(last.max()) >= self.capacity:
            raise ValueError(f"a slot holds {self.capacity} positions; position {int(last.max())} requested")
        slots = slots.to(self.device)
        single = int(slots[0]) if B == 1 else None
        masks = {}
        for kind, plan in self.plans.items():
            plan.slots, plan.single = slots, single
            masks[kind] = self._plan(plan, positions, first, last, T)
        return masks

    def _plan(self, plan: _TypePlan, positions, first, last, T) -> torch.Tensor:
        cap, window = plan.capacity, plan.window
        q = positions[:, :, None]  # (B, T, 1)
        plan.write_index = positions % cap
        plan.write_from = max(0, T - cap)
        plan.write_index = plan.write_index[:, plan.write_from :]
        written_from = int(first[0]) + plan.write_from
        plan.contiguous = None
        if plan.single is not None and written_from % cap + T - plan.write_from <= cap:
            plan.contiguous = written_from % cap
        if window is None:  # full attention: index j holds position j
            plan.concat, plan.read_length = False, int(last.max()) + 1
            key_pos = torch.arange(plan.read_length, device=q.device)[None, None, :]
            allowed = key_pos <= q
            return _additive(allowed, self.dtype)
        # A ring: index j holds the latest position written to it, the largest P <= `upto`
        # with P = j (mod cap); P < 0 means never written by this sequence.
        plan.concat = T > cap - window + 1 and int(last.max()) >= cap
        plan.read_length = min(cap, int(last.max()) + 1)
        index = torch.arange(plan.read_length, device=q.device)[None, :]
        upto = (first - 1 if plan.concat else last)[:, None]  # (B, 1)
        held = (upto - (upto - index) % cap)[:, None, :]  # (B, 1, S)
        allowed = (held >= 0) & (held <= q) & (q - held < window)
        if plan.concat:  # + the new keys of this pass, at positions[b]
            new = positions[:, None, :]  # (B, 1, T)
            allowed = torch.cat((allowed, (new <= q) & (q - new < window)), 2)
        return _additive(allowed, self.dtype)


def lazy_zeros(shape: tuple[int, ...], dtype, device) -> torch.Tensor:
    """torch.zeros, whose memory on the CPU is committed only as it is written.

    An anonymous memory map is zero pages the OS maps on demand, 4 KiB at a time, while
    torch.zeros writes every byte: a cache sized for long sequences then costs the memory its
    sequences use (issue 19 item 8: memory linear in the prompt), not its capacity. Not
    numpy's zeros (calloc): numpy asks for transparent huge pages on large arrays, so the
    first key written into a fresh slot zeroed 2 MiB per layer, ~60 ms of CPU a slot for the
    bundled Gemma 3 270M (loaded machine), paid in a new request's time to first token.
    """
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    pages = mmap.mmap(-1, nbytes)  # page-aligned, so 64-byte aligned as SIMD loads like
    # the numpy array keeps the map alive as long as any tensor viewing it
    return torch.from_numpy(np.frombuffer(pages, dtype=np.uint8)).view(dtype).view(shape)


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """(B, T, S) booleans -> additive mask (B, 1, T, S): 0 where allowed, -inf elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, float("-inf"))[:, None]

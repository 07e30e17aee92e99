"""The KV cache: preallocated per-layer keys and values, sliding layers as rings, and the
additive attention masks (see `KVCache`)."""

from __future__ import annotations

import torch

from gemmakit.config import FULL, SLIDING, GemmaConfig

# Extra ring slots of a sliding layer beyond its window in a cache that can roll back: a step
# of up to RING_SLACK + 1 columns (a speculative verification of RING_SLACK proposals) then
# never overwrites a key the window of any column still held needs, so dropping the step's
# rejected columns leaves every kept column's window intact. The same constant sizes the
# serving engine's slot rings (gemmakit/model/slot_cache.py).
RING_SLACK = 16


class LayerCache:
    """Preallocated keys and values of one layer: (B, K, capacity, D).

    Full-attention layers keep a slot per column. Sliding layers keep a ring of
    `min(window + ring slack, length)` slots: column c lives in slot c % capacity, and the
    shared `GroupState` says which column each slot holds (-1: none).
    """

    def __init__(self, group: GroupState, batch, kv_heads, head_dim, dtype, device):
        self.group = group
        shape = (batch, kv_heads, group.capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, k, v):
        g = self.group
        if g.concat:  # a chunk that wraps the ring: attend over old slots + the new keys
            keys, values = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
            self.k[:, :, g.write_slots] = k[:, :, -len(g.write_slots) :]
            self.v[:, :, g.write_slots] = v[:, :, -len(g.write_slots) :]
            return keys, values
        self.k[:, :, g.write_slots] = k
        self.v[:, :, g.write_slots] = v
        return self.k[:, :, : g.visible], self.v[:, :, : g.visible]


class GroupState:
    """Slot bookkeeping shared by all layers of one attention type."""

    def __init__(self, capacity: int, window: int | None, device):
        self.capacity, self.window = capacity, window
        self.slot_cols = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.concat, self.write_slots, self.visible = False, None, 0

    def plan(self, cols: torch.Tensor, start: int):
        """Decides where the columns `cols` go and returns the key columns attended to."""
        T, cap = len(cols), self.capacity
        wraps = start + T > cap
        # Writing before attending is safe unless the chunk overwrites a slot an earlier
        # query of the same chunk still needs: only a multi-token chunk that wraps does.
        self.concat = wraps and T > 1
        if self.concat:
            kept = cols[-cap:]
            old_cols = self.slot_cols.clone()
            self.write_slots = kept % cap
            self.slot_cols[self.write_slots] = kept
            return torch.cat((old_cols, cols))
        self.write_slots = cols % cap
        self.slot_cols[self.write_slots] = cols
        self.visible = min(start + T, cap)
        return self.slot_cols[: self.visible]

    def drop(self, cols: range):
        """Forgets columns `cols` (the last ones written): their slots hold nothing now."""
        for col in cols:
            slot = col % self.capacity
            if int(self.slot_cols[slot]) == col:
                self.slot_cols[slot] = -1

    def place(self, col: int) -> tuple[int, int]:
        """plan() for the single column `col`, in plain ints: (slot written, slots visible)."""
        slot = col % self.capacity
        self.slot_cols[slot] = col
        return slot, min(col + 1, self.capacity)


class KVCache:
    """The whole model's cache for a batch of B rows and at most `max_length` columns.

    `for_layer[i]` is layer i's LayerCache, or None for a KV-shared layer (it owns none);
    `layers` lists the caches that exist. Rows are left-padded to a common length, so a column index is shared by the batch;
    `valid` marks which (row, column) pairs hold real tokens.

    `ring_slack` (0, or `RING_SLACK` for speculative decoding) gives each sliding ring that
    many slots beyond the window, so that `rollback` can drop up to `ring_slack + 1` columns.
    """

    def __init__(self, config: GemmaConfig, batch: int, max_length: int, dtype, device, ring_slack: int = 0):
        self.max_length, self.length, self.dtype = max_length, 0, dtype
        self.ring_slack = ring_slack
        self.valid = torch.zeros((batch, max_length), dtype=torch.bool, device=device)
        self.groups = {FULL: GroupState(max_length, None, device)}
        if SLIDING in config.layer_types:
            window = config.sliding_window
            self.groups[SLIDING] = GroupState(min(window + ring_slack, max_length), window, device)
        # Only layers that produce keys and values hold a cache, each in its own shape (Gemma 4's
        # global layers: their own KV heads and head dim); a KV-shared layer reads its source's.
        self.for_layer: list[LayerCache | None] = [
            LayerCache(
                self.groups[t], batch, config.layer_kv_heads(i), config.layer_head_dim(i), dtype, device
            )
            if config.layer_owns_kv(i)
            else None
            for i, t in enumerate(config.layer_types)
        ]
        # The caches that exist, in layer order (every layer's for Gemma 1-3).
        self.layers = [c for c in self.for_layer if c is not None]

    def advance(self, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Registers T new columns and returns each group's additive mask (B, 1, T, S)."""
        B, T = attention_mask.shape
        start = self.length
        if start + T > self.max_length:
            raise ValueError(f"cache holds {self.max_length} tokens; {start + T} requested")
        cols = torch.arange(start, start + T, device=self.valid.device)
        self.valid[:, start : start + T] = attention_mask
        self.length += T
        masks = {}
        for kind, group in self.groups.items():
            key_cols = group.plan(cols, start)
            key_valid = self.valid[:, key_cols.clamp(min=0)] & (key_cols >= 0)  # (B, S)
            masks[kind] = build_mask(cols, key_cols, key_valid, group.window, self.dtype)
        return masks

    def append_dense(self) -> dict[str, tuple[int, int]]:
        """Registers one real token of a one-row cache whose every column holds a token, and
        returns each group's (slot written, slots visible), building no masks: the C decode
        step finds column c at c % capacity of each group and attends within the window by
        position, as the masks `advance` would build them."""
        col = self.length
        if col >= self.max_length:
            raise ValueError(f"cache holds {self.max_length} tokens; {col + 1} requested")
        self.valid[0, col] = True
        self.length = col + 1
        return {kind: group.place(col) for kind, group in self.groups.items()}

    def rollback(self, count: int):
        """Drops the last `count` columns, as if they had never been written.

        A sliding ring keeps every kept column's window when the dropped columns overwrote
        only keys older than the window of the new last column: when the ring never wrapped
        over them, or `count <= ring_slack + 1` (the dropped column c overwrote column
        c - capacity, and c - capacity < new length - window + 1 exactly then).

        Raises:
            ValueError: `count` is more than the cache holds, or more than a ring can restore.
        """
        if not 0 <= count <= self.length:
            raise ValueError(f"cannot roll back {count} of {self.length} columns")
        start = self.length - count
        for group in self.groups.values():
            wrapped = self.length > group.capacity
            if group.window is not None and wrapped and count > group.capacity - group.window + 1:
                raise ValueError(
                    f"a sliding ring of {group.capacity} slots for a window of {group.window} "
                    f"can roll back at most {group.capacity - group.window + 1} columns, not {count}"
                )
            group.drop(range(start, self.length))
        self.valid[:, start : self.length] = False
        self.length = start


def build_mask(q_cols, key_cols, key_valid, window, dtype=torch.float32, same_segment=None):
    """Additive mask (B, 1, T, S): 0 where the key column <= the query column, lies inside
    the window and holds a real token (of the query's segment, when `same_segment` (B, T, S)
    is given); -inf elsewhere.

    A query always sees itself, so padding rows never have an empty softmax (which would
    put NaN into the shared matmul).
    """
    diff = q_cols[:, None] - key_cols[None, :]  # (T, S)
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    allowed = allowed[None] & key_valid[:, None, :]  # (B, T, S)
    if same_segment is not None:
        allowed &= same_segment
    allowed |= (diff == 0)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, float("-inf"))[:, None]

"""The order in which a run visits its training rows, reproducible from the seed and a position."""

from __future__ import annotations

import torch


class RowOrder:
    """Global row order: a fresh seeded permutation per epoch; a position is a row count.

    A run's data position is one integer (rows consumed so far, over all processes), so a
    checkpoint stores that integer and a resumed run takes the same rows as an uninterrupted one.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._cache = n, seed, {}

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._cache[epoch]

    def take(self, start: int, count: int) -> list[int]:
        """The row indices at positions start .. start + count - 1."""
        return [self._permutation(pos // self.n)[pos % self.n] for pos in range(start, start + count)]

"""csrc/sample.c's candidate pass over numpy arrays, torch-free: what `kernels/cpu.py`'s torch
wrapper and the torch-free generation path (`inference/lean.py`) both call."""

from __future__ import annotations

import numpy as np


def sample_candidates(lib, logits: np.ndarray, temperature: np.ndarray, count: int, threads: int = 1):
    """Each row's `count` largest of logits (R, V) float32 C-contiguous divided by temperature
    (R,) float32: values (R, count) float32 and ids (R, count) int64, by logit descending with
    ties to the lower id, and each row's log-sum-exp of logits / temperature (R,)."""
    rows, vocab = logits.shape
    values = np.empty((rows, count), dtype=np.float32)
    ids = np.empty((rows, count), dtype=np.int64)
    lse = np.empty(rows, dtype=np.float32)
    scratch = np.empty(threads * lib.sample_scratch_words(vocab), dtype=np.int32)
    lib.sample_candidates_mt(logits.ctypes.data, temperature.ctypes.data, vocab, count, values.ctypes.data,
                             ids.ctypes.data, lse.ctypes.data, scratch.ctypes.data, rows, threads)  # fmt: skip
    return values, ids, lse

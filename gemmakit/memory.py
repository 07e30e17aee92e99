"""Returning the heap Python and torch freed to the operating system (a leaf: standard library
only). glibc keeps freed memory in its arenas; a load that reads weights chunk by chunk would
otherwise hold its peak long after the chunks are gone."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


def release_freed_memory():
    """Returns memory freed by Python/torch to the OS (glibc's malloc_trim), where available."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None

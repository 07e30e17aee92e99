"""Where gemmakit keeps things: its cache and the files shipped inside the package.

A leaf module (standard library and `errors` only), so any layer can ask for a path without
importing the layers above it.

The model caches (`converted/`: GGUFs dequantized into HF folders; `quantized/`: quantized
tensors; `tokenizers/`: SentencePiece models built from GGUF vocabularies, a few MB each) hold
one folder per entry, each up to a model's float32 size, so they are bounded: a
write that takes the total past `cache_limit()` removes the entries used least recently first
(`evict`). An entry's last use is the modification time of its `LAST_USED` file, touched on
every read (`mark_used`); atime is unreliable (noatime, relatime mounts).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from gemmakit.errors import GemmakitError

PACKAGE = Path(__file__).parent
# Shipped text, fine-tuning and task samples (`gemmakit/data/`).
DATA = PACKAGE / "data"
# The chat page the server serves.
STATIC = PACKAGE / "static"


def cache_dir() -> Path:
    """`$GEMMAKIT_CACHE`, else `$XDG_CACHE_HOME/gemmakit`, else `~/.cache/gemmakit`."""
    root = os.environ.get("GEMMAKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gemmakit"
    )
    return Path(root)


def kernel_cache_dir() -> Path:
    """Where the compiled C kernels are kept (`kernels/build.py`): `$GEMMAKIT_KERNEL_CACHE`,
    else `cache_dir() / "kernels"`. A build is keyed by its sources, compiler and flags and takes
    ~30 s, so the test suite keeps its builds across sessions in a folder of its own while
    every other cache it writes lives and dies with the session (`tests/conftest.py`)."""
    root = os.environ.get("GEMMAKIT_KERNEL_CACHE")
    return Path(root) if root else cache_dir() / "kernels"


# --- the model caches -------------------------------------------------------------------------
CACHE_KINDS = ("converted", "quantized", "tokenizers")
LAST_USED = ".last-used"
# Written by the cache's writer: {"source": the model it was made from}, for `gemmakit cache list`.
SOURCE_FILE = "cache-source.json"
DEFAULT_CACHE_LIMIT = 8 * 2**30  # room for a few 270M-1B float32 copies
# An entry used this recently may be being opened by another process (found complete, not yet
# memory-mapped), so eviction leaves it; once mapped, removing its files is harmless on POSIX.
IN_USE_SECONDS = 60.0


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    kind: str  # one of CACHE_KINDS
    bytes: int
    last_used: float  # seconds since the epoch


def cache_limit() -> int:
    """`$GEMMAKIT_CACHE_MAX_BYTES` (a byte count; 0 keeps only the entry in use), else
    `DEFAULT_CACHE_LIMIT`."""
    text = os.environ.get("GEMMAKIT_CACHE_MAX_BYTES", "").strip()
    if not text:
        return DEFAULT_CACHE_LIMIT
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise GemmakitError(f"GEMMAKIT_CACHE_MAX_BYTES={text!r} is not a byte count (a whole number >= 0)")
    return value


def _folder_bytes(folder: Path) -> int:
    total = 0
    for f in folder.rglob("*"):
        try:
            if f.is_file() and not f.is_symlink():
                total += f.stat().st_size
        except OSError:
            pass  # removed meanwhile
    return total


def cache_entries() -> list[CacheEntry]:
    """The model cache's entries, least recently used first (temporaries are not entries)."""
    entries = []
    for kind in CACHE_KINDS:
        root = cache_dir() / kind
        if not root.is_dir():
            continue
        for folder in root.iterdir():
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            try:
                stamp = folder / LAST_USED
                used = stamp.stat().st_mtime if stamp.exists() else folder.stat().st_mtime
            except OSError:
                continue
            entries.append(CacheEntry(folder, kind, _folder_bytes(folder), used))
    return sorted(entries, key=lambda e: e.last_used)


def mark_used(folder: Path) -> None:
    """Records that the cache entry `folder` was just used; best effort (a read-only cache
    only loses the order)."""
    try:
        (folder / LAST_USED).touch()
    except OSError:
        pass


def evict(
    limit: int | None = None, keep: Path | None = None, grace: float = IN_USE_SECONDS
) -> list[CacheEntry]:
    """Removes least recently used entries until the cache holds at most `limit` bytes
    (default `cache_limit()`), never `keep` (the entry just written or read) nor one used in
    the last `grace` seconds; returns them."""
    limit = cache_limit() if limit is None else limit
    entries = cache_entries()
    recent = time.time() - grace
    total = sum(e.bytes for e in entries)
    removed = []
    for entry in entries:
        if total <= limit:
            break
        if entry.last_used > recent or (keep is not None and entry.path.resolve() == Path(keep).resolve()):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        total -= entry.bytes
        removed.append(entry)
    return removed


def clear_cache(kinds: tuple[str, ...] = CACHE_KINDS) -> list[CacheEntry]:
    """Removes every entry of `kinds`; returns them."""
    removed = [e for e in cache_entries() if e.kind in kinds]
    for entry in removed:
        shutil.rmtree(entry.path, ignore_errors=True)
    return removed


def age(seconds_since_epoch: float) -> str:
    """'3 min ago'-style text of a time in the past."""
    s = max(0, time.time() - seconds_since_epoch)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{int(s // size)} {unit} ago"
    return f"{int(s)} s ago"

"""The SentencePiece model built from a GGUF vocabulary, kept in gemmakit's cache by content.

Building Gemma 3's model proto from its 262k GGUF pieces costs ~0.35 s of a 0.7 s load
(profiled on the bundled file), every load; reading the built proto back costs ~0.05 s. An
entry is a folder `tokenizers/sp-<key>/` in the cache (`paths.cache_dir`) holding
`tokenizer.model` (the serialized proto, a file SentencePiece itself loads) and
`paths.SOURCE_FILE` (the GGUF it was first built from, for `gemmakit cache list`, and the
proto's sha256, so a damaged file is rebuilt rather than trusted). The key is the sha256 of the
file's `tokenizer.ggml.*` values as stored (pieces, scores, types, merges, the pre-tokenizer
and special-token settings: `GGUFMetadata.digest`) and `BUILD_VERSION`, never its path: a
renamed or copied GGUF finds its entry, a changed vocabulary misses it. Entries are counted,
listed and evicted with the other caches (`paths.CACHE_KINDS`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from gemmakit.files import atomic_folder
from gemmakit.paths import SOURCE_FILE, cache_dir, evict, mark_used

KIND = "tokenizers"
# Bump when `tokenizer._sentencepiece_proto` changes what it builds from the same vocabulary.
BUILD_VERSION = 1
MODEL_FILE = "tokenizer.model"
# The GGUF keys whose values the built model depends on.
VOCABULARY_PREFIX = "tokenizer.ggml."
# Smaller vocabularies build in milliseconds: an entry would cost more than it saves.
MIN_CACHED_PIECES = 1024


def entry_folder(metadata) -> Path | None:
    """The cache folder for this GGUF vocabulary, or None when caching is off
    (`$GEMMAKIT_NO_CACHE`), `metadata` is a plain dict (nothing to key it by cheaply) or the
    vocabulary is small (`MIN_CACHED_PIECES`)."""
    if os.environ.get("GEMMAKIT_NO_CACHE") or not hasattr(metadata, "digest"):
        return None
    if metadata.array_length(VOCABULARY_PREFIX + "tokens") < MIN_CACHED_PIECES:
        return None
    key = f"{metadata.digest(VOCABULARY_PREFIX)}|v{BUILD_VERSION}"
    return cache_dir() / KIND / f"sp-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def read_model(folder: Path | None) -> bytes | None:
    """The cached proto, or None when there is none or it is not the one written (damaged)."""
    if folder is None:
        return None
    try:
        data = (folder / MODEL_FILE).read_bytes()
        expected = json.loads((folder / SOURCE_FILE).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if hashlib.sha256(data).hexdigest() != expected:
        return None
    mark_used(folder)
    return data


def write_model(folder: Path | None, proto: bytes, source: str):
    """Stores `proto` as the entry `folder` (replacing a damaged one), atomically; best effort:
    a read-only or full cache only costs the next load its rebuild."""
    if folder is None:
        return
    stamp = {"source": source, "sha256": hashlib.sha256(proto).hexdigest()}
    try:
        with atomic_folder(folder, replace=True) as tmp:
            (tmp / MODEL_FILE).write_bytes(proto)
            (tmp / SOURCE_FILE).write_text(json.dumps(stamp))
    except OSError:
        return
    evict(keep=folder)


# --- the indexes of formats/sentencepiece_bpe.py -------------------------------------------
INDEX_FILE = "bpe_index.npy"
# The Python backend's entries' name prefix (`sentencepiece_bpe.index`); csrc/bpe.c's
# (`kernels/bpe.Vocabulary.index`) name theirs with its index version (`kernels/bpe.cache_prefix`).
PYTHON_INDEX = "bpe"


def _index_folder(metadata, prefix: str = PYTHON_INDEX) -> Path | None:
    """The entry of a vocabulary's BPE index: beside its SentencePiece model's, same key."""
    folder = entry_folder(metadata)
    return None if folder is None else folder.with_name(prefix + folder.name.removeprefix("sp"))


def read_index(metadata, shape: tuple[int, ...], prefix: str = PYTHON_INDEX, mapped: bool = False):
    """The cached uint32 index of this vocabulary under `prefix`, or None (none, or not of
    `shape`: it is rebuilt). Read, or with `mapped` memory-mapped read-only (no copy: the
    entry is replaced by a rename, never rewritten in place, so a mapping keeps its file)."""
    import numpy as np

    folder = _index_folder(metadata, prefix)
    if folder is None:
        return None
    try:
        table = np.load(folder / INDEX_FILE, mmap_mode="r" if mapped else None)
    except (OSError, ValueError):
        return None
    if table.shape != shape or table.dtype != np.uint32:
        return None
    mark_used(folder)
    return table


def write_index(metadata, table, source: str, prefix: str = PYTHON_INDEX) -> None:
    """Stores a vocabulary's index under `prefix`, atomically, naming the GGUF it was built
    from (`source`, for `gemmakit cache list`); best effort, as `write_model`."""
    import numpy as np

    folder = _index_folder(metadata, prefix)
    if folder is None:
        return
    try:
        with atomic_folder(folder, replace=True) as tmp:
            np.save(tmp / INDEX_FILE, table)
            (tmp / SOURCE_FILE).write_text(json.dumps({"source": source}))
    except OSError:
        return
    evict(keep=folder)

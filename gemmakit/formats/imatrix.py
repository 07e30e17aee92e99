"""Importance matrices in llama.cpp's two file formats: GGUF (what `llama-imatrix` writes
today) and the legacy binary `.dat`.

An importance matrix holds, for each weight matrix a quantizer will see, the sum over the
calibration tokens of the squared input activation of every input column (`in_sum2`) and how
many tokens were summed (`counts`); a mixture-of-experts tensor has one row of sums and one
count per expert. What a quantizer weights its rounding error by is the mean, sum / count
(llama.cpp tools/quantize/quantize.cpp `load_imatrix`): `read_imatrix` gives exactly those
float32 values, so an exporter that uses them quantizes as llama.cpp does.

GGUF layout, as tools/imatrix/imatrix.cpp `save_imatrix` writes it: metadata `general.type` =
"imatrix", `imatrix.datasets` (string array), `imatrix.chunk_count` and `imatrix.chunk_size`
(uint32); per matrix, in name order, `NAME.in_sum2` (F32, ne = [columns, matrices]) and
`NAME.counts` (F32, ne = [1, matrices]). ggml writes a tensor with its trailing size-1
dimensions dropped (gguf.cpp writes `ggml_n_dims`), so a dense matrix's two tensors are 1-D.

Legacy `.dat` (common/imatrix-loader.cpp `common_imatrix_load_legacy`): int32 entry count;
per entry int32 name length, the name, int32 `ncall` (chunks), int32 value count, the float32
values stored as mean * ncall; then, optionally, int32 chunk count, int32 length and the
dataset name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from gemmakit.errors import GemmakitError, ModelFileError
from gemmakit.files import atomic_write
from gemmakit.formats.gguf import GGUFFile

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
GGUF_MAGIC = b"GGUF"
# ggml's default (GGUF_DEFAULT_ALIGNMENT); llama-imatrix sets no general.alignment.
ALIGNMENT = 32
# GGUF value and tensor type ids (ggml gguf.h / ggml.h).
_GGUF_UINT32, _GGUF_STRING, _GGUF_ARRAY = 4, 8, 9
_GGML_F32 = 0


@dataclass
class ImatrixFile:
    """An importance matrix as stored: raw sums and counts per matrix, and the metadata.

    `sums[name]` has shape (matrices, columns) and `counts[name]` shape (matrices,), int64
    (a dense matrix has one). For a legacy file, `sums` holds what the file stores (mean *
    ncall) and `counts` the ncall, as llama.cpp's loader keeps them.
    """

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    is_legacy: bool = False

    def importance(self) -> dict[str, np.ndarray]:
        """Per-column importance as llama.cpp's quantizer uses it (quantize.cpp `load_imatrix`).

        GGUF: sum / count per matrix in float32, and 1 for every column of a matrix (an
        expert) that saw no token. Legacy: the stored value / ncall, or the stored value when
        ncall is 0. Each value is flat (matrices * columns,), expert after expert, as the
        quantizer indexes it.
        """
        out = {}
        for name, sums in self.sums.items():
            counts = self.counts[name]
            if self.is_legacy:
                ncall = counts[0] if counts.size else 0
                # float / int64 in C++ converts the count to float: a float32 division.
                values = sums / np.float32(ncall) if ncall > 0 else sums.copy()
            else:
                count = counts.astype(np.float32)[:, None]  # (matrices, 1)
                with np.errstate(divide="ignore", invalid="ignore"):
                    values = np.where(count > 0, sums / np.where(count > 0, count, 1), np.float32(1))
            out[name] = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        return out


def read_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 per-input-column importance, as llama.cpp's quantizer
    reads it from either format (see `ImatrixFile.importance`)."""
    return load_imatrix(path).importance()


def load_imatrix(path: str | Path) -> ImatrixFile:
    """Reads an importance matrix in GGUF or legacy `.dat` format.

    Like llama.cpp's loader, a file that is not GGUF is read as legacy; what llama.cpp's
    quantizer refuses (no entries, a GGUF without the imatrix metadata, sums without counts,
    non-F32 tensors, a truncated file) is a one-line ModelFileError naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read ({e.strerror or e})") from None
    if magic == GGUF_MAGIC:
        return _load_gguf(path)
    return _load_legacy(path)


def _load_gguf(path: Path) -> ImatrixFile:
    g = GGUFFile(path)
    if not g.tensors:
        raise ModelFileError(f"{path}: no importance matrix entries")
    md = g.metadata
    if not all(k in md for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE)):
        # quantize.cpp refuses such a file ("missing imatrix metadata").
        raise ModelFileError(f"{path}: not an importance matrix (no {KEY_DATASETS} / chunk metadata)")
    pairs: dict[str, list] = {}
    for name in g.tensors:
        for slot, suffix in enumerate((SUMS_SUFFIX, COUNTS_SUFFIX)):
            if name.endswith(suffix) and len(name) > len(suffix):
                pairs.setdefault(name[: -len(suffix)], [None, None])[slot] = name
    sums, counts = {}, {}
    for base, (sums_name, counts_name) in sorted(pairs.items()):
        if sums_name is None or counts_name is None:
            raise ModelFileError(f"{path}: {base} has sums without counts or counts without sums")
        infos = g.tensors[sums_name], g.tensors[counts_name]
        if any(t.ggml_type != GGMLQuantizationType.F32 for t in infos):
            raise ModelFileError(f"{path}: sums and counts of {base} must be F32")
        n_counts = int(np.prod(infos[1].shape))
        values = np.array(g.raw(sums_name), dtype=np.float32).reshape(-1)
        if values.size % n_counts:
            raise ModelFileError(f"{path}: {base} has {values.size} sums for {n_counts} counts")
        sums[base] = values.reshape(n_counts, -1)  # (matrices, columns)
        stored = np.array(g.raw(counts_name), dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(stored)) or np.any(np.abs(stored) > 2**62):
            raise ModelFileError(f"{path}: {base} has impossible counts")
        # llama.cpp rounds the stored float counts to integers, halves away from zero (std::lround).
        counts[base] = (np.sign(stored) * np.floor(np.abs(stored) + 0.5)).astype(np.int64)
    datasets = md[KEY_DATASETS]
    try:
        chunk_count, chunk_size = int(md[KEY_CHUNK_COUNT]), int(md[KEY_CHUNK_SIZE])
    except (TypeError, ValueError):
        raise ModelFileError(f"{path}: {KEY_CHUNK_COUNT} and {KEY_CHUNK_SIZE} must be integers") from None
    return ImatrixFile(
        sums,
        counts,
        datasets=[str(d) for d in datasets] if isinstance(datasets, list) else [],
        chunk_count=chunk_count,
        chunk_size=chunk_size,
    )


def _load_legacy(path: Path) -> ImatrixFile:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ModelFileError(f"{path}: truncated importance matrix (ends at byte {len(data)})")
        values = struct.unpack_from(fmt, data, pos)
        pos += size
        return values

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ModelFileError(f"{path}: not an importance matrix (neither GGUF nor llama.cpp's .dat)")
    sums, counts = {}, {}
    for i in range(n_entries):
        (name_len,) = take("<i")
        if name_len < 0 or name_len > len(data) - pos:
            raise ModelFileError(f"{path}: entry {i + 1} has a bad name length {name_len}")
        name = data[pos : pos + name_len].split(b"\0", 1)[0].decode("utf-8", "replace")
        pos += name_len
        ncall, nval = take("<ii")
        if nval < 1 or nval * 4 > len(data) - pos:
            raise ModelFileError(f"{path}: entry {name!r} has a bad value count {nval}")
        sums[name] = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)[None, :]
        pos += nval * 4
        counts[name] = np.array([ncall], dtype=np.int64)
    chunk_count, datasets = 0, []
    # The trailer (chunk count, dataset name) is optional (common_imatrix_load_legacy).
    if pos + 4 <= len(data):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if 0 < length <= len(data) - pos:
                datasets.append(data[pos : pos + length].split(b"\0", 1)[0].decode("utf-8", "replace"))
    return ImatrixFile(sums, counts, datasets=datasets, chunk_count=chunk_count, is_legacy=True)


def write_imatrix(
    path: str | Path,
    sums: dict[str, np.ndarray],
    counts: dict[str, np.ndarray | int],
    datasets: list[str],
    chunk_count: int,
    chunk_size: int,
) -> Path:
    """Writes llama.cpp's GGUF imatrix format (atomically), byte for byte as llama-imatrix does.

    `sums[name]`: the summed squared activations, shape (columns,) or (matrices, columns);
    `counts[name]`: the tokens summed, an int or shape (matrices,). Entries are written in
    name order, as `save_imatrix` sorts them.
    """
    path = Path(path)
    entries = []
    for name in sorted(sums):
        s = np.asarray(sums[name], dtype=np.float32)
        c = np.atleast_1d(np.asarray(counts[name], dtype=np.float32)).reshape(-1)
        if s.ndim == 1:
            s = s[None, :]
        if s.ndim != 2 or s.shape[0] != c.size:
            raise GemmakitError(f"imatrix entry {name}: sums of shape {s.shape} do not match {c.size} counts")
        if s.size == 0:
            continue  # llama-imatrix stores only entries with values
        entries.append((name + SUMS_SUFFIX, s))
        entries.append((name + COUNTS_SUFFIX, c[:, None]))  # (matrices, 1)
    if not entries:
        raise GemmakitError("no importance matrix entries to write")
    header = _gguf_header(entries, datasets, chunk_count, chunk_size)

    def write(tmp: Path):
        with open(tmp, "wb") as f:
            f.write(header)
            for _, values in entries:
                raw = np.ascontiguousarray(values, dtype="<f4").tobytes()
                f.write(raw + b"\0" * (-len(raw) % ALIGNMENT))

    try:
        atomic_write(path, write)
    except OSError as e:
        raise GemmakitError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def _gguf_header(entries, datasets: list[str], chunk_count: int, chunk_size: int) -> bytes:
    """Magic, version 3, the four metadata values and the tensor infos, padded to ALIGNMENT."""

    def string(s: str) -> bytes:
        raw = s.encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw

    kv = [
        string(KEY_TYPE) + struct.pack("<I", _GGUF_STRING) + string("imatrix"),
        string(KEY_DATASETS)
        + struct.pack("<IIQ", _GGUF_ARRAY, _GGUF_STRING, len(datasets))
        + b"".join(string(d) for d in datasets),
        string(KEY_CHUNK_COUNT) + struct.pack("<II", _GGUF_UINT32, chunk_count),
        string(KEY_CHUNK_SIZE) + struct.pack("<II", _GGUF_UINT32, chunk_size),
    ]
    infos, offset = [], 0
    for name, values in entries:
        ne = list(reversed(values.shape))  # ggml order: fastest dimension first
        while len(ne) > 1 and ne[-1] == 1:  # ggml_n_dims drops trailing 1s
            ne.pop()
        infos.append(
            string(name)
            + struct.pack("<I", len(ne))
            + struct.pack(f"<{len(ne)}Q", *ne)
            + struct.pack("<IQ", _GGML_F32, offset)
        )
        offset += -(-values.size * 4 // ALIGNMENT) * ALIGNMENT
    head = GGUF_MAGIC + struct.pack("<IQQ", 3, len(entries), len(kv)) + b"".join(kv) + b"".join(infos)
    return head + b"\0" * (-len(head) % ALIGNMENT)

"""Hugging Face model folders: config.json + safetensors (single file or sharded index).

Loading is an identity copy of HF names, with the exceptions written out here: Gemma 1's
pre-MLP norm is called `post_attention_layernorm` in HF (a Llama-ism; our blocks name it by
what it does, `pre_feedforward_layernorm`); multimodal checkpoints (Gemma 3, 3n, 4) prefix the
text weights with `language_model`, and their vision and audio towers are left out
(`split_towers`); the k/v weights some Gemma 3n/4 files carry for KV-shared layers, which
compute none, are dropped as transformers drops them (Gemma4TextModel's
_keys_to_ignore_on_load_unexpected).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from gemmakit.config import GemmaConfig
from gemmakit.errors import ModelFileError
from gemmakit.files import atomic_write

_MULTIMODAL_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")
# What a KV-shared layer's attention owns no weights for.
_KV_WEIGHTS = ("k_proj", "v_proj", "k_norm", "v_norm")


def safetensors_files(folder: Path) -> list[Path]:
    """The folder's weight files, refusing pickled formats."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelFileError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ModelFileError(f"{index}: shard(s) missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ModelFileError(
            f"{folder}: only pickled weights ({', '.join(pickled)}); gemmakit refuses them because "
            "unpickling can run arbitrary code. Convert them to safetensors first."
        )
    raise ModelFileError(f"{folder}: no *.safetensors weights found")


def _check_safetensors(path: Path):
    """One-line errors for truncated or corrupt files (safetensors' own are opaque)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path}: truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ModelFileError(f"{path}: corrupt or truncated safetensors header")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ModelFileError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = 0
    for name, info in header.items():
        if name != "__metadata__":
            end = max(end, _check_entry(path, name, info))
    if 8 + n + end > size:
        raise ModelFileError(f"{path}: truncated: data needs {8 + n + end:,} bytes, file has {size:,}")
    return n, header


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(path: Path, name: str, info) -> int:
    """The end offset of one header entry, after checking its fields agree with each other."""
    bad = f"{path}: corrupt safetensors header entry {name!r}"
    if not isinstance(info, dict):
        raise ModelFileError(bad)
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
        raise ModelFileError(f"{path}: {name} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ModelFileError(f"{bad} (shape {shape!r})")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise ModelFileError(f"{bad} (data_offsets {offsets!r})")
    count = 1
    for d in shape:
        count *= d
    if offsets[1] - offsets[0] != count * _SAFETENSORS_DTYPES[dtype].itemsize:
        raise ModelFileError(f"{bad} (data_offsets {offsets} do not match shape {shape} of {dtype})")
    return offsets[1]


def read_safetensors(files: list[Path], names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of `files`, or only those in `names` (the others are never read)."""
    # The package is imported where it is used: a GGUF load never needs it (0.8 MiB resident).
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    wanted = None if names is None else set(names)
    tensors = {}
    for f in files:
        _check_safetensors(f)
        try:
            if wanted is None:
                tensors.update(load_file(f))
                continue
            with safe_open(f, "pt") as handle:
                tensors.update({k: handle.get_tensor(k) for k in handle.keys() if k in wanted})
        except (SafetensorError, OSError) as e:
            raise ModelFileError(f"{f}: cannot read safetensors ({e})") from None
    return tensors


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class SafetensorsReader:
    """Reads tensors of safetensors files one at a time with plain file reads, no mmap.

    `load_file` maps whole files, and every page it touches counts in the process's resident
    memory until the map closes: reading a 1 GB float32 file into bfloat16 peaks at 1.5 GB.
    Here only the tensor being read is in memory, and `rows` reads a slice of rows, so a
    262144 x 640 embedding can be quantized chunk by chunk.
    """

    def __init__(self, files: list[Path]):
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]] = {}
        for path in files:
            n, header = _check_safetensors(path)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                offset = 8 + n + info["data_offsets"][0]
                self.entries[name] = (path, _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), offset)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def nbytes(self, name: str) -> int:
        _, dtype, shape, _ = self.entries[name]
        return math.prod(shape) * torch.empty((), dtype=dtype).element_size()

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (the first dimension), cast to `dtype`."""
        path, stored, shape, offset = self.entries[name]
        row = 1
        for d in shape[1:]:
            row *= d
        itemsize = torch.empty((), dtype=stored).element_size()
        count = (stop - start) * row if shape else 1
        buf = bytearray(count * itemsize)
        with open(path, "rb") as f:
            f.seek(offset + start * row * itemsize)
            if f.readinto(buf) != len(buf):
                raise ModelFileError(f"{path}: truncated while reading {name}")
        t = torch.frombuffer(buf, dtype=stored) if buf else torch.empty(0, dtype=stored)
        t = t.view((stop - start, *shape[1:]) if shape else ())
        return t if dtype is None or dtype == stored else t.to(dtype)

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        shape = self.shape(name)
        return self.rows(name, 0, shape[0] if shape else 1, dtype)


def split_towers(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """(the text model's names, the other towers' names) of a checkpoint's tensors.

    In a multimodal checkpoint (one with `language_model` names) everything outside the
    language model but the head belongs to a vision or audio tower (`model.vision_tower.`,
    `model.audio_tower.`, `model.embed_vision.`, `multi_modal_projector.`, ...)."""
    names = list(names)
    if not any(n.startswith(_MULTIMODAL_PREFIXES) for n in names):
        return names, []
    text = [n for n in names if n.startswith((*_MULTIMODAL_PREFIXES, "lm_head."))]
    kept = set(text)
    return text, [n for n in names if n not in kept]


def _shared_kv_weight(name: str, config: GemmaConfig) -> bool:
    """A k/v weight of a layer that reads another layer's keys and values."""
    parts = name.split(".")  # model.layers.N.self_attn.k_proj.weight
    return (
        len(parts) > 4
        and parts[:2] == ["model", "layers"]
        and parts[3] == "self_attn"
        and parts[4] in _KV_WEIGHTS
        and not config.layer_owns_kv(int(parts[2]))
    )


def hf_to_native(tensors: dict[str, torch.Tensor], config: GemmaConfig) -> dict[str, torch.Tensor]:
    """Renames an HF state dict to this project's module names (see module docstring)."""
    out = {}
    text, _ = split_towers(tensors)
    for name in text:
        t = tensors[name]
        for prefix in _MULTIMODAL_PREFIXES:
            if name.startswith(prefix):
                name = "model." + name[len(prefix) :] if not name.startswith("lm_head") else name
                break
        if not config.use_post_norms and name.endswith("post_attention_layernorm.weight"):
            name = name.replace("post_attention_layernorm", "pre_feedforward_layernorm")
        if config.num_kv_shared_layers and _shared_kv_weight(name, config):
            continue
        out[name] = t
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def assistant_to_native(
    tensors: dict[str, torch.Tensor], tie_word_embeddings: bool
) -> dict[str, torch.Tensor]:
    """A Gemma 4 assistant's HF state dict under the native names (the same ones), less what
    the drafter has no module for: every layer reads the target's keys and values, so any
    k/v weights a checkpoint carries are dropped, as transformers ignores them on load."""
    out = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and len(parts) > 4 and parts[4] in _KV_WEIGHTS:
            continue
        out[name] = t
    if tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def native_to_hf(state: dict[str, torch.Tensor], config: GemmaConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if not config.use_post_norms and name.endswith("pre_feedforward_layernorm.weight"):
            name = name.replace("pre_feedforward_layernorm", "post_attention_layernorm")
        out[name] = t
    return out


def check_shapes(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], source: str):
    """Errors naming the source when a tensor the model needs is missing, extra or misshapen."""
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[0]}")
        raise ModelFileError(f"{source}: weights do not match the config: " + "; ".join(parts))
    for name, shape in shapes.items():
        if tuple(shape) != tuple(expected[name].shape):
            raise ModelFileError(
                f"{source}: {name} has shape {tuple(shape)}, config needs {tuple(expected[name].shape)}"
            )


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str):
    """Copies `state` into `model`, naming the source when a tensor is missing or misshapen."""
    check_shapes(model, {k: tuple(t.shape) for k, t in state.items()}, source)
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None):
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"}))

"""Hugging Face model folders: config.json + safetensors (single file or sharded index).

Loading is an identity copy of HF names, with two exceptions written out here: Gemma 1's
pre-MLP norm is called `post_attention_layernorm` in HF (a Llama-ism; our blocks name it by
what it does, `pre_feedforward_layernorm`), and multimodal Gemma 3 checkpoints prefix the
text weights with `language_model`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gemmakit.config import GemmaConfig
from gemmakit.errors import ModelFileError

_MULTIMODAL_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.")  # fmt: skip


def safetensors_files(folder: Path) -> list[Path]:
    """The folder's weight files, refusing pickled formats."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
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
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelFileError(f"{path}: corrupt safetensors header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ModelFileError(f"{path}: truncated: data needs {8 + n + end:,} bytes, file has {size:,}")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in files:
        _check_safetensors(f)
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError) as e:
            raise ModelFileError(f"{f}: cannot read safetensors ({e})") from None
    return tensors


def hf_to_native(tensors: dict[str, torch.Tensor], config: GemmaConfig) -> dict[str, torch.Tensor]:
    """Renames an HF state dict to this project's module names (see module docstring)."""
    out = {}
    for name, t in tensors.items():
        if name.startswith(_VISION_PREFIXES):
            continue
        for prefix in _MULTIMODAL_PREFIXES:
            if name.startswith(prefix):
                name = "model." + name[len(prefix) :] if not name.startswith("lm_head") else name
                break
        if not config.use_post_norms and name.endswith("post_attention_layernorm.weight"):
            name = name.replace("post_attention_layernorm", "pre_feedforward_layernorm")
        out[name] = t
    if config.tie_word_embeddings:
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


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str):
    """Copies `state` into `model`, naming the source when a tensor is missing or misshapen."""
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[0]}")
        raise ModelFileError(f"{source}: weights do not match the config: " + "; ".join(parts))
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ModelFileError(
                f"{source}: {name} has shape {tuple(t.shape)}, config needs {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def atomic_write(path: Path, write):
    """Calls write(tmp_path) and renames into place, so a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None):
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"}))

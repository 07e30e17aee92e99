"""Training checkpoints: `OUTPUT/checkpoints/step-NNNNNN/`, each enough to resume a run bit-exactly.

A checkpoint holds the trained weights (the LoRA adapter in PEFT format, or the full weights
as `model.safetensors`) and `trainer_state.pt`: optimizer and scheduler state, the step, the
data position and every process's RNG states. Each one is written into a temporary folder and
renamed into place, so a listed checkpoint is always complete.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch

from gemmakit import lora
from gemmakit.errors import GemmakitError
from gemmakit.files import atomic_folder
from gemmakit.training.config import TrainConfig

STATE_FILE = "trainer_state.pt"
FULL_WEIGHTS = "model.safetensors"


def rng_state(device: str) -> dict:
    """The random generators' states: torch's, Python's, and the device's on CUDA."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def set_rng_state(state: dict, device: str):
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints (a temporary folder is never named step-*), oldest first."""
    root = output / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists())


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(output: Path, step: int, model, state: dict, cfg: TrainConfig, base_name: str) -> Path:
    """Writes checkpoints/step-N atomically, then removes all but the newest `keep_checkpoints`."""
    from gemmakit.formats.safetensors import save_safetensors

    final = output / "checkpoints" / f"step-{step:06d}"
    with atomic_folder(final, replace=True) as tmp:
        if cfg.method == "full":
            weights = {k: v.contiguous().cpu() for k, v in _trainable_state(model).items()}
            save_safetensors(weights, tmp / FULL_WEIGHTS)
        else:
            lora.save_adapter(model, tmp / "adapter", base_name)
        torch.save(state, tmp / STATE_FILE)
    if cfg.keep_checkpoints:
        for old in checkpoints(output)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, cfg: TrainConfig) -> dict:
    """Loads the checkpoint's weights into `model`; returns its trainer state."""
    from gemmakit.formats.safetensors import read_safetensors

    state = read_state(path)  # first: a damaged state fails before the model is touched
    if cfg.method == "full":
        tensors = read_safetensors([path / FULL_WEIGHTS])
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v)
    else:
        _, tensors = lora.read_adapter(path / "adapter")
        lora.load_adapter_state(model, {lora.PEFT_PREFIX + k: v for k, v in tensors.items()})
    return state


# What `Trainer.checkpoint` writes into every trainer state; a file without them is not one.
STATE_KEYS = ("step", "consumed", "optimizer", "scheduler", "rng")


def read_state(path: Path) -> dict:
    """The trainer state of checkpoint `path`, or a GemmakitError naming the file.

    Checkpoints are renamed into place only when complete, so a damaged state file was
    damaged after it was written (a disk fault, a copy cut short, an edit).
    """
    file = path / STATE_FILE
    hint = f"remove {path} to resume from the checkpoint before it"
    try:
        # On the CPU: both generators take their state as a CPU byte tensor (the CUDA one
        # too), and optimizer.load_state_dict moves each state tensor to its parameter's device.
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for damage
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GemmakitError(f"{file}: corrupt or truncated trainer state ({reason}); {hint}") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise GemmakitError(f"{file}: not a gemmakit trainer state (no {', '.join(missing)}); {hint}")
    return state

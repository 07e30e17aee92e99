"""Fine-tuning: recipes, the training loop, a memory-lean loss, checkpoints, data parallelism.

Recipes are `TrainConfig` presets; the default, "qlora-article", is the article's QLoRA run
(NF4 base with double quantization, LoRA r=16/alpha=16/dropout 0.05 on the seven projections,
paged 8-bit AdamW, lr 2e-5 with 30 linear warm-up steps, batch 4, 300 steps, eval and
checkpoint every 50, max length 512). Every field can be overridden by a YAML/JSON file and by
command-line flags (flags win); the effective config is saved as `OUTPUT/config.json`.

The loop:
- computes the loss from `model.hidden_states` with a fused linear + cross-entropy over
  chunks of positions, so the (tokens x 262k) logits never exist at once, in the forward or
  the backward (`linear_cross_entropy`);
- normalizes by the number of target tokens of the whole optimizer step (all micro-batches
  of gradient accumulation, all data-parallel ranks), so 2 processes x batch b take the same
  step as 1 process x batch 2b;
- writes atomic checkpoints (adapter or weights, optimizer, scheduler, RNG states, data
  position) that `resume=True` continues bit-exactly, and saves one on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from gemmakit import lora
from gemmakit.config import PROJECTIONS
from gemmakit.errors import ConfigError, GemmakitError
from gemmakit.training import data as sft_data
from gemmakit.training.loss import batch_loss_sum, supports_segments

METHODS = ("qlora", "lora", "full")


@dataclass
class TrainConfig:
    """Every setting of a fine-tuning run. Field comments are the `--help` texts."""

    # model folder, .gguf file, or omitted for the bundled Gemma 3 270M
    model: str | None = None
    # training data: a .jsonl/.json file or a Hugging Face dataset name (name or name:split)
    data: str | None = None
    # evaluation data (same forms); default: a held-out fraction of --data
    eval_data: str | None = None
    # fraction of --data held out for evaluation when --eval-data is not given
    eval_fraction: float = 0.1
    # evaluate on at most this many rows (0: all)
    eval_max_rows: int = 200
    # run folder: config.json, metrics.jsonl, loss.png, checkpoints/, adapter/
    output: str | None = None
    # the named preset these settings started from
    recipe: str = "qlora-article"
    # qlora (quantized base + LoRA), lora, or full (every weight trained)
    method: str = "qlora"
    # base quantization for qlora: nf4 (double quantization, QLoRA layout), int8 or int4
    quantization: str | None = "nf4"
    # LoRA rank
    lora_r: int = 16
    # LoRA alpha (updates are scaled by alpha / r)
    lora_alpha: float = 16.0
    # dropout on the LoRA input
    lora_dropout: float = 0.05
    # modules that get adapters, comma-separated (PEFT target_modules)
    lora_targets: tuple[str, ...] = PROJECTIONS
    # scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r
    use_rslora: bool = False
    # paged_adamw_8bit (bitsandbytes, CUDA only; falls back to adamw) or adamw
    optimizer: str = "paged_adamw_8bit"
    # peak learning rate
    lr: float = 2e-5
    # AdamW weight decay
    weight_decay: float = 0.0
    # linear, cosine or constant (after warm-up)
    lr_scheduler: str = "linear"
    # steps of linear warm-up from 0
    warmup_steps: int = 30
    # clip the gradient norm to this (0: no clipping)
    max_grad_norm: float = 1.0
    # sequences per micro-batch per process
    batch_size: int = 4
    # micro-batches per optimizer step
    grad_accum: int = 1
    # optimizer steps
    max_steps: int = 300
    # evaluate every N steps (and before the first)
    eval_every: int = 50
    # checkpoint every N steps
    save_every: int = 50
    # checkpoints kept (oldest removed first; 0 keeps all)
    keep_checkpoints: int = 2
    # tokens per sequence (longer rows are truncated)
    max_length: int = 512
    # convert rows to Gemma's chat template (<start_of_turn>user/model) instead of guanaco text
    chat_template: bool = False
    # loss on response tokens only (prompt tokens get no gradient)
    train_on_responses_only: bool = False
    # pack several examples per row (no padding; attention crosses examples)
    packing: bool = False
    # recompute each block's activations in the backward (less memory, ~30% more time)
    gradient_checkpointing: bool = False
    # compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16
    dtype: str = "auto"
    # bfloat16 via autocast over float32 weights (default for full fine-tuning) instead of
    # bfloat16 weights (default for LoRA: frozen weights need no float32 copy)
    autocast: bool | None = None
    # cpu, cuda or cuda:N (default: cuda if present)
    device: str | None = None
    # seed of LoRA init, data order and dropout
    seed: int = 42
    # positions per cross-entropy chunk (0: auto, about 16M logits per chunk)
    ce_chunk: int = 0
    # log the training loss every N steps
    log_every: int = 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


# Recipes: overrides of the TrainConfig defaults (which are the article's QLoRA run).
RECIPES: dict[str, dict] = {
    "qlora-article": {},
    "lora": {"method": "lora", "quantization": None, "optimizer": "adamw", "lr": 2e-4},
    "full": {"method": "full", "quantization": None, "optimizer": "adamw", "lr": 2e-5, "keep_checkpoints": 1},
}
RECIPE_NOTES = {
    "qlora-article": "the article's QLoRA: NF4 base, LoRA r16/a16/d0.05 on 7 projections, paged 8-bit AdamW, "
    "lr 2e-5, 30 warm-up, batch 4, 300 steps, eval/save every 50, max length 512",
    "lora": "the same on a float base, AdamW, lr 2e-4",
    "full": "every weight trained, AdamW, lr 2e-5 (bf16 via autocast over float32 master weights)",
}
FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))


def _field_type(name: str):
    return {f.name: f.type for f in fields(TrainConfig)}[name]


def coerce(name: str, value):
    """Parses a config value (from a file or a flag) into the field's type."""
    if name not in FIELD_NAMES:
        raise ConfigError(f"unknown setting {name!r}")
    kind = _field_type(name)
    if value is None:
        return None
    try:
        if "tuple" in kind:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(v).strip() for v in items if str(v).strip())
        if kind.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a valid {kind}") from None


def read_config_file(path: str | Path) -> dict:
    """Settings from a YAML or JSON file (keys are field names; dashes allowed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as e:  # yaml and json raise their own error types
        raise ConfigError(f"{path}: cannot parse ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELD_NAMES:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        out[name] = coerce(name, value)
    return out


def make_config(recipe: str | None = None, *layers: dict) -> TrainConfig:
    """recipe defaults < each layer in order (a config file, then flags). None values are unset."""
    values: dict = {}
    for layer in layers:
        values.update({k: v for k, v in layer.items() if v is not None})
    recipe = values.get("recipe") or recipe or "qlora-article"
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    merged = {**RECIPES[recipe], **values, "recipe": recipe}
    cfg = TrainConfig(**{k: coerce(k, v) if v is not None else None for k, v in merged.items()})
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig):
    if cfg.method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    if cfg.method == "qlora" and cfg.quantization not in ("nf4", "int8", "int4"):
        raise ConfigError("method qlora needs quantization nf4, int8 or int4")
    for name in ("lora_r", "batch_size", "grad_accum", "max_steps", "eval_every", "save_every", "max_length"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.max_length < 4:
        raise ConfigError("max_length must be at least 4")
    if cfg.lr <= 0:
        raise ConfigError(f"lr must be positive, got {cfg.lr}")
    if cfg.lr_scheduler not in ("linear", "cosine", "constant"):
        raise ConfigError(f"lr_scheduler must be linear, cosine or constant, got {cfg.lr_scheduler!r}")
    if cfg.optimizer not in ("paged_adamw_8bit", "adamw_8bit", "adamw"):
        raise ConfigError(f"optimizer must be paged_adamw_8bit, adamw_8bit or adamw, got {cfg.optimizer!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "fp32", "bf16"):
        raise ConfigError(f"dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")


# --- model set-up -----------------------------------------------------------------------------


def enable_gradient_checkpointing(model: nn.Module):
    """Recomputes each block in the backward (torch.utils.checkpoint, non-reentrant).

    The block's forward is wrapped on the instance, so module names and the state dict do
    not change. RNG state is preserved, so LoRA dropout draws the same mask twice.
    """
    for block in model.model.layers:
        if "forward" in block.__dict__:
            continue
        block.forward = functools.partial(_checkpointed, type(block).forward.__get__(block))


def _checkpointed(fn, *args, **kwargs):
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def resolve_device(cfg: TrainConfig) -> str:
    local = os.environ.get("LOCAL_RANK")
    if cfg.device:
        dev = cfg.device
        if dev == "cuda" and local is not None:
            dev = f"cuda:{local}"
        return dev
    if torch.cuda.is_available():
        return f"cuda:{local}" if local is not None else "cuda"
    return "cpu"


def resolve_dtype(cfg: TrainConfig, device: str) -> torch.dtype:
    if cfg.dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return torch.bfloat16 if cfg.dtype in ("bfloat16", "bf16") else torch.float32


def use_autocast(cfg: TrainConfig, dtype: torch.dtype) -> bool:
    if dtype == torch.float32:
        return False
    if cfg.autocast is not None:
        return cfg.autocast
    # Full fine-tuning needs float32 master weights (bf16 has 8 bits of mantissa: lr 2e-5
    # updates would round away); frozen LoRA bases do not.
    return cfg.method == "full"


def load_for_training(cfg: TrainConfig, device: str, weights_dtype: torch.dtype):
    """Model and tokenizer, with the weights in `weights_dtype`.

    A GGUF is dequantized tensor by tensor straight into `weights_dtype`
    (`gguf.state_dict_from_gguf`), bypassing the float32 converted cache, so a bfloat16 run
    never holds a float32 copy of the whole model (1.07 GB for the 270M); other sources go
    through `gemmakit.loading.load`.
    """
    from gemmakit import loading

    source = loading.resolve(cfg.model)
    if source.kind != "gguf" or weights_dtype == torch.float32:
        return loading.load(cfg.model, dtype=weights_dtype, device=device)
    from gemmakit.formats.gguf import GGUFFile, config_from_gguf, state_dict_from_gguf
    from gemmakit.formats.safetensors import load_into
    from gemmakit.formats.tokenizer import generation_stop_ids
    from gemmakit.model.gemma import Gemma

    start = time.perf_counter()
    g = GGUFFile(source.path)
    config = config_from_gguf(g)
    loading.check_dtype(config, weights_dtype)
    state = state_dict_from_gguf(g, weights_dtype)  # lean: chunked, straight to weights_dtype
    with torch.device("meta"):
        model = Gemma(config)
    load_into(model, {k: v.to(device) for k, v in state.items()}, str(source.path))
    del state
    tokenizer = loading.load_tokenizer(source, g)
    stop_ids = generation_stop_ids(tokenizer, {}, config.eos_token_ids)
    return loading.Loaded(model.eval(), tokenizer, source, stop_ids, time.perf_counter() - start)


def limit_heap_fragmentation():
    """Pins glibc's mmap threshold at 4 MiB (M_MMAP_THRESHOLD).

    Unpinned, glibc raises the threshold (up to 32 MiB) each time a large mmapped block is
    freed, after which a step's activation tensors come from the heap and fragment it
    (measured on an earlier version of this trainer: float32 peak 2.9 -> 4.1 GB over 6 steps).
    Pinned low, every tensor above the threshold is a fresh mapping whose pages fault in on
    first touch: at 128 KiB a LoRA step of the 270M (batch 4 x 128) took 365k page faults in
    bfloat16 and 526k in float32, ~20% of its time. At 4 MiB: 90k / 28k faults, bfloat16 steps
    2.8 -> 2.2 s and float32 4.9 -> 3.9 s, peak RSS 1.58 -> 1.65 GB and 2.10 -> 2.29 GB, and
    the resident set flat from the fourth step on (9 steps each). A no-op off glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD (malloc.h)
    except (OSError, AttributeError):
        pass


def prepare_model(model: nn.Module, cfg: TrainConfig, log=print) -> dict:
    """Quantizes (qlora), adds adapters (qlora/lora) or unfreezes (full); returns notes."""
    notes = {"quantization_used": None}
    if cfg.method == "qlora":
        try:
            from gemmakit.quant import quantize_model
        except ImportError:
            log("note: gemmakit.quant is not available; training plain LoRA on a float base")
        else:
            quantize_model(model, cfg.quantization)
            notes["quantization_used"] = cfg.quantization
    if cfg.method in ("qlora", "lora"):
        settings = lora.apply_lora(
            model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.use_rslora
        )
        notes["lora_modules"] = len(settings.wrapped)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        # The tied embedding is trained as one matrix; nothing to untie.
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    notes.update(trainable_parameters=trainable, total_parameters=total)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return notes


def make_optimizer(params: list, cfg: TrainConfig, device: str):
    """(optimizer, description). Paged 8-bit AdamW needs CUDA and bitsandbytes."""
    if cfg.optimizer in ("paged_adamw_8bit", "adamw_8bit") and device.startswith("cuda"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            pass
        else:
            cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
            return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay), f"bitsandbytes {cls.__name__}"
    # torch's fused kernel: one op per step instead of ~10 per tensor (LoRA on Gemma 3 270M
    # has 252 small tensors: 5 ms against 17 ms per step on the CPU); the same update.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    why = "" if cfg.optimizer == "adamw" else f" ({cfg.optimizer} needs CUDA and bitsandbytes)"
    return opt, "torch.optim.AdamW" + (" (fused)" if fused else "") + why


def lr_lambda(step: int, cfg: TrainConfig) -> float:
    """transformers' schedules: warm-up from 0, then linear/cosine decay to 0 or constant."""
    warm, total = cfg.warmup_steps, cfg.max_steps
    if step < warm:
        return step / max(1, warm)
    if cfg.lr_scheduler == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    if cfg.lr_scheduler == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, (total - step) / max(1, total - warm))


# --- data -------------------------------------------------------------------------------------


class Sampler:
    """Global row order: a fresh seeded permutation per epoch; a position is a row count."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._cache = n, seed, {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._cache[epoch]

    def take(self, start: int, count: int) -> list[int]:
        out = []
        for pos in range(start, start + count):
            out.append(self._order(pos // self.n)[pos % self.n])
        return out


def load_data(cfg: TrainConfig, tokenizer, log=print):
    """(train examples, eval examples, notes)."""
    rows = sft_data.read_rows(cfg.data)
    if cfg.eval_data:
        train_rows, eval_rows = rows, sft_data.read_rows(cfg.eval_data, split="test")
    else:
        train_rows, eval_rows = sft_data.split_rows(rows, cfg.eval_fraction, cfg.seed)
    if cfg.eval_max_rows and len(eval_rows) > cfg.eval_max_rows:
        eval_rows = eval_rows[: cfg.eval_max_rows]
    kw = dict(chat_template=cfg.chat_template, responses_only=cfg.train_on_responses_only)
    train, dropped = sft_data.build_examples(train_rows, tokenizer, cfg.max_length, **kw)
    evals, dropped_eval = sft_data.build_examples(eval_rows, tokenizer, cfg.max_length, **kw)
    if not train:
        raise GemmakitError(f"{cfg.data}: no usable training rows")
    notes = {"train_rows": len(train), "eval_rows": len(evals), "dropped_rows": dropped + dropped_eval}
    if cfg.packing:
        train = sft_data.pack(train, cfg.max_length)
        notes["packed_rows"] = len(train)
    return train, evals, notes


# --- distributed ------------------------------------------------------------------------------


class Dist:
    """Rank, world size and the collectives the loop needs; a no-op on one process."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            self.rank = dist.get_rank()
            self.dist = dist

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            self.dist.all_reduce(t)
        return t

    def sum_grads(self, params: list[nn.Parameter]):
        """All-reduces the gradients (one flat buffer). Losses were divided by the global
        token count, so the sum is the gradient of the global mean loss."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        self.dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
            offset += n

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        self.dist.all_reduce(t)
        return bool(t.item() > 0)

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world > 1:
            self.dist.barrier()


# --- checkpoints ------------------------------------------------------------------------------

STATE_FILE = "trainer_state.pt"
FULL_WEIGHTS = "model.safetensors"


def rng_state(device: str) -> dict:
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
    """Complete checkpoints (a temp dir is never named step-*), oldest first."""
    root = output / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists())


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(output: Path, step: int, model, state: dict, cfg: TrainConfig, base_name: str):
    """Writes checkpoints/step-N atomically: into a temp dir, then one rename."""
    from gemmakit.formats.safetensors import save_safetensors

    root = output / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if cfg.method == "full":
            weights = {k: v.contiguous().cpu() for k, v in _trainable_state(model).items()}
            save_safetensors(weights, tmp / FULL_WEIGHTS)
        else:
            lora.save_adapter(model, tmp / "adapter", base_name)
        torch.save(state, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if cfg.keep_checkpoints:
        for old in checkpoints(output)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, cfg: TrainConfig, device: str) -> dict:
    from gemmakit.formats.safetensors import read_safetensors

    if cfg.method == "full":
        tensors = read_safetensors([path / FULL_WEIGHTS])
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v)
    else:
        _, tensors = lora.read_adapter(path / "adapter")
        lora.load_adapter_state(model, {lora.PEFT_PREFIX + k: v for k, v in tensors.items()})
    # On the CPU: both generators take their state as a CPU byte tensor (the CUDA one too),
    # and optimizer.load_state_dict moves each state tensor to its parameter's device itself.
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


# --- logging ----------------------------------------------------------------------------------


class Metrics:
    """metrics.jsonl: one JSON object per line, `step` plus `loss` or `eval_loss`."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int):
        """Drops lines an interrupted run wrote past the checkpoint it resumes from."""
        if not self.enabled or not self.path.exists():
            return
        from gemmakit.files import atomic_write

        keep = [
            ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step
        ]
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in keep)))

    def write(self, record: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


def plot_losses(records: list[dict], path: Path, title: str = ""):
    """Training and eval loss against step, as a PNG (matplotlib, Agg). False if unavailable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from gemmakit.files import atomic_write

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1, alpha=0.8)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return True


# --- the loop ---------------------------------------------------------------------------------


@dataclass
class TrainResult:
    output: Path
    step: int
    interrupted: bool = False
    checkpoint: Path | None = None
    adapter: Path | None = None
    first_eval_loss: float | None = None
    last_eval_loss: float | None = None
    last_loss: float | None = None
    optimizer: str = ""
    notes: dict = field(default_factory=dict)
    seconds: float = 0.0
    tokens_per_second: float = 0.0


class _StopFlag:
    """The first SIGINT asks the loop to stop at the next step boundary (after a checkpoint);
    a second one interrupts at once, as Python does by default."""

    def __init__(self, log):
        self.requested, self.log, self._old = False, log, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        self.log("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)")
        signal.signal(signal.SIGINT, self._old or signal.default_int_handler)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _err(msg):
    print(msg, file=sys.stderr, flush=True)


def train(
    cfg: TrainConfig,
    resume: bool = False,
    callbacks: list[Callable[[dict], None]] | None = None,
    loaded=None,
    log: Callable[[str], None] = _err,
    progress: bool = True,
) -> TrainResult:
    """Runs (or resumes) a fine-tuning run described by `cfg`; see the module docstring.

    Args:
        resume: continue from the latest checkpoint in `cfg.output`.
        callbacks: called after every optimizer step with a dict (step, loss, lr, ...); a
            callback that raises KeyboardInterrupt stops the run after a checkpoint.
        loaded: an already loaded `gemmakit.loading.Loaded` (tests); it is modified in place.
        log: where messages go (rank 0 only).

    Returns:
        A `TrainResult`; `interrupted` is True when stopped by Ctrl-C or a callback.
    """
    validate(cfg)
    if not cfg.data:
        raise ConfigError("no training data: pass --data FILE")
    if not cfg.output:
        raise ConfigError("no output folder: pass --output DIR")
    start_time = time.perf_counter()
    limit_heap_fragmentation()
    output = Path(cfg.output)
    device = resolve_device(cfg)
    dd = Dist(device)
    log = log if dd.main else (lambda *_: None)
    metrics = Metrics(output / "metrics.jsonl", dd.main)
    ckpts = checkpoints(output)
    if resume and not ckpts:
        raise GemmakitError(f"{output}: no checkpoint to resume from")
    if not resume and (ckpts or metrics.path.exists()):
        raise GemmakitError(
            f"{output} already holds a run; pass --resume to continue it or choose another --output"
        )
    dtype = resolve_dtype(cfg, device)
    autocast = use_autocast(cfg, dtype)
    weights_dtype = torch.float32 if autocast else dtype

    torch.manual_seed(cfg.seed)  # the same LoRA init on every rank
    random.seed(cfg.seed)
    if loaded is None:
        loaded = load_for_training(cfg, device, weights_dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    base_name = str(loaded.source.path) if loaded.source else (cfg.model or "")
    notes = prepare_model(model, cfg, log)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, opt_name = make_optimizer(params, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_lambda, cfg=cfg))
    train_ex, eval_ex, data_notes = load_data(cfg, tokenizer, log)
    notes.update(data_notes)
    if dd.world > 1:  # different dropout masks per rank from here on
        torch.manual_seed(cfg.seed + 1_000_003 * dd.rank)
    notes.update(
        optimizer=opt_name, device=device, dtype=str(dtype).replace("torch.", ""), autocast=autocast,
        world_size=dd.world, model_source=base_name,
        packing=(
            ("block-diagonal attention, positions per example" if supports_segments(model)
             else "concatenated; attention crosses examples") if cfg.packing else None
        ),
    )  # fmt: skip

    step, consumed = 0, 0
    if resume:
        state = load_checkpoint(ckpts[-1], model, cfg, device)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, consumed = state["step"], state["consumed"]
        rngs = state["rng"]
        set_rng_state(rngs[dd.rank] if dd.rank < len(rngs) else rngs[0], device)
        if len(rngs) != dd.world:
            log(f"note: checkpoint from {len(rngs)} process(es), resuming on {dd.world}: not bit-exact")
        metrics.truncate_after(step)
        log(f"resuming from {ckpts[-1]} (step {step})")
    if dd.main:
        output.mkdir(parents=True, exist_ok=True)
        from gemmakit.files import atomic_write

        saved = {**cfg.to_dict(), "effective": notes}
        atomic_write(
            output / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(saved, indent=2) + "\n")
        )
    log(
        f"{cfg.method} on {base_name} [{notes['dtype']}{' autocast' if autocast else ''}, {device}, "
        f"{dd.world} process(es)]: {notes['trainable_parameters']:,} trainable of "
        f"{notes['total_parameters']:,} parameters; {notes['train_rows']} train / {notes['eval_rows']} eval rows; "
        f"optimizer {opt_name}"
    )

    chunk = cfg.ce_chunk
    pad_id = tokenizer.pad_id
    sampler = Sampler(len(train_ex), cfg.seed)
    per_step = cfg.batch_size * cfg.grad_accum * dd.world

    def amp():  # a fresh context each time: autocast objects keep state between enter and exit
        return torch.autocast(device.split(":")[0], dtype=dtype) if autocast else contextlib.nullcontext()

    def evaluate() -> float | None:
        if not eval_ex:
            return None
        model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            mine = eval_ex[dd.rank :: dd.world]
            for i in range(0, len(mine), cfg.batch_size):
                batch = {
                    k: v.to(device) for k, v in sft_data.collate(mine[i : i + cfg.batch_size], pad_id).items()
                }
                with amp():
                    s = batch_loss_sum(model, batch, chunk)
                total += torch.tensor([float(s), sft_data.target_count(batch["labels"])], dtype=torch.float64)
        model.train()
        dd.sum(total)
        return float(total[0] / max(total[1], 1))

    result = TrainResult(output, step, optimizer=opt_name, notes=notes)
    records = metrics.read() if dd.main else []
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    result.first_eval_loss = evals[0] if evals else None
    if step == 0:
        loss0 = evaluate()
        if loss0 is not None:
            metrics.write({"step": 0, "eval_loss": loss0})
            result.first_eval_loss = result.last_eval_loss = loss0
            log(f"step 0: eval loss {loss0:.4f}")
    elif evals:
        result.last_eval_loss = evals[-1]

    def checkpoint_now() -> Path | None:
        st = {
            "step": step, "consumed": consumed, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": dd.gather(rng_state(device)), "world_size": dd.world,
        }  # fmt: skip
        path = save_checkpoint(output, step, model, st, cfg, base_name) if dd.main else None
        dd.barrier()
        return path

    bar = None
    if progress and dd.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="finetune", unit="step", dynamic_ncols=True)
    model.train()
    tokens_seen, train_seconds = 0, 0.0
    with _StopFlag(log) as stop:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            rows = sampler.take(consumed, per_step)
            b = cfg.batch_size
            micro = [
                rows[(a * dd.world + dd.rank) * b : (a * dd.world + dd.rank + 1) * b]
                for a in range(cfg.grad_accum)
            ]
            batches = [
                {k: v.to(device) for k, v in sft_data.collate([train_ex[i] for i in m], pad_id).items()}
                for m in micro
            ]
            counts = torch.tensor(
                [sum(sft_data.target_count(bt["labels"]) for bt in batches), sum(int(bt["attention_mask"].sum()) for bt in batches)],
                dtype=torch.float64,
            )  # fmt: skip
            dd.sum(counts)
            n_targets = max(float(counts[0]), 1.0)
            loss_sum = torch.zeros((), dtype=torch.float64)
            for bt in batches:
                with amp():
                    s = batch_loss_sum(model, bt, chunk)
                (s / n_targets).backward()
                loss_sum += float(s.detach())
            dd.sum_grads(params)
            loss_sum = dd.sum(loss_sum.reshape(1))[0]
            grad_norm = None
            if cfg.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            consumed += per_step
            dt = time.perf_counter() - t0
            tokens_seen += int(counts[1])
            train_seconds += dt
            loss = float(loss_sum) / n_targets
            result.last_loss = loss
            event = {
                "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(counts[1]),
                "tokens_per_s": int(counts[1]) / dt, "epoch": consumed / len(train_ex),
            }  # fmt: skip
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                metrics.write({k: (round(v, 6) if isinstance(v, float) else v) for k, v in event.items()})
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{event['tokens_per_s']:.0f}")
                bar.update(1)
            interrupted = False
            try:
                for cb in callbacks or ():
                    cb(event)
            except KeyboardInterrupt:
                interrupted = True
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                ev = evaluate()
                if ev is not None:
                    metrics.write({"step": step, "eval_loss": ev})
                    result.last_eval_loss = ev
                    if result.first_eval_loss is None:
                        result.first_eval_loss = ev
                    if bar is not None:
                        bar.write(f"step {step}: eval loss {ev:.4f}", file=sys.stderr)
            stop_now = dd.any(interrupted or stop.requested)
            if step % cfg.save_every == 0 or stop_now or step == cfg.max_steps:
                result.checkpoint = checkpoint_now()
                if dd.main and step < cfg.max_steps:  # the curve so far, with each checkpoint
                    plot_losses(metrics.read(), output / "loss.png", f"{cfg.recipe}: {base_name}")
            if stop_now:
                result.interrupted = True
                break
    if bar is not None:
        bar.close()
    result.step = step
    result.seconds = time.perf_counter() - start_time
    result.tokens_per_second = tokens_seen / train_seconds if train_seconds else 0.0
    if dd.main:
        plot_losses(metrics.read(), output / "loss.png", f"{cfg.recipe}: {base_name}")
        if not result.interrupted:
            result.adapter = save_final(model, tokenizer, cfg, output, base_name, loaded.source)
        if result.checkpoint is None and checkpoints(output):
            result.checkpoint = checkpoints(output)[-1]
    dd.barrier()
    return result


def save_final(model, tokenizer, cfg: TrainConfig, output: Path, base_name: str, source=None) -> Path:
    """OUTPUT/adapter (PEFT) for LoRA runs; OUTPUT/model (an HF folder) for full runs."""
    target = output / ("model" if cfg.method == "full" else "adapter")
    tmp = output / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if cfg.method == "full":
            save_hf_folder(model, tokenizer, tmp, source)
        else:
            lora.save_adapter(model, tmp, base_name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- whole-model folders ----------------------------------------------------------------------


def save_hf_folder(model, tokenizer, folder: str | Path, source=None):
    """Writes a Hugging Face model folder: config.json, model.safetensors,
    generation_config.json and the tokenizer (tokenizer.model when the tokenizer is
    SentencePiece, as one built from a GGUF is; else the source folder's tokenizer files).

    The weights are saved in the model's dtype; a tied model saves the embedding once.
    """
    from gemmakit.files import atomic_write
    from gemmakit.formats.safetensors import native_to_hf, save_safetensors

    if lora.lora_modules(model):
        raise GemmakitError("merge the adapters before saving the model")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = native_to_hf({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, config)
    save_safetensors(state, folder / "model.safetensors", metadata={"format": "pt"})
    hf_cfg = config.to_hf_config()
    hf_cfg["torch_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")

    def write_json(name, obj):
        atomic_write(folder / name, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))

    write_json("config.json", hf_cfg)
    eos = list(config.eos_token_ids)
    write_json(
        "generation_config.json",
        {"bos_token_id": config.bos_token_id, "eos_token_id": eos if len(eos) > 1 else eos[0],
         "pad_token_id": config.pad_token_id},
    )  # fmt: skip
    write_tokenizer(tokenizer, folder, source)


def write_tokenizer(tokenizer, folder: Path, source=None):
    from gemmakit.files import atomic_write

    backend = getattr(tokenizer, "_backend", None)
    copied = False
    if source is not None and getattr(source, "kind", None) == "hf":
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (source.path / name).exists():
                shutil.copyfile(source.path / name, folder / name)
                copied = True
    if not copied and hasattr(backend, "serialized_model_proto"):
        proto = backend.serialized_model_proto()
        atomic_write(folder / "tokenizer.model", lambda tmp: Path(tmp).write_bytes(proto))
        copied = True
    elif not copied and hasattr(backend, "to_str"):  # a tokenizers.Tokenizer
        text = backend.to_str()
        atomic_write(folder / "tokenizer.json", lambda tmp: Path(tmp).write_text(text))
        copied = True
    if copied and not (folder / "tokenizer_config.json").exists():
        tc = {
            "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
            "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
            "padding_side": "left",
        }  # fmt: skip
        atomic_write(
            folder / "tokenizer_config.json", lambda tmp: Path(tmp).write_text(json.dumps(tc, indent=2))
        )
    return copied


def field_help() -> dict[str, str]:
    """The comment above each TrainConfig field (the `--help` text of its flag)."""
    import inspect

    try:
        lines = inspect.getsource(TrainConfig).splitlines()
    except (OSError, TypeError):
        return {}
    out, comment = {}, []
    for line in lines:
        s = line.strip()
        if s.startswith("# "):
            comment.append(s[2:])
        elif ":" in s and not s.startswith(("def ", "class ", '"""', "return")) and comment:
            out[s.split(":")[0].strip()] = " ".join(comment)
            comment = []
        else:
            comment = []
    return out

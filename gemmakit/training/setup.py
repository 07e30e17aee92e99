"""What a fine-tuning run sets up before its first step: device and dtype, the model (loaded,
quantized, adapted), the optimizer and learning-rate schedule, the data, and the allocator."""

from __future__ import annotations

import functools
import math
import os
import time

import torch
from torch import nn

from gemmakit import lora
from gemmakit.errors import GemmakitError
from gemmakit.training import data as sft_data
from gemmakit.training.config import TrainConfig

# --- device and dtype -------------------------------------------------------------------------


def resolve_device(cfg: TrainConfig) -> str:
    """cfg.device, or cuda when present; under torchrun each process takes cuda:LOCAL_RANK."""
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


def limit_heap_fragmentation():
    """Pins glibc's mmap threshold at 4 MiB (M_MMAP_THRESHOLD).

    Unpinned, glibc raises the threshold (up to 32 MiB) each time a large mmapped block is
    freed, after which a step's activation tensors come from the heap and fragment it
    (measured: float32 peak RSS 2.9 -> 4.1 GB over 6 LoRA steps of the 270M). Pinned low,
    every tensor above the threshold is a fresh mapping whose pages fault in on first touch:
    at 128 KiB a LoRA step of the 270M (batch 4 x 128) took 365k page faults in bfloat16 and
    526k in float32; at 4 MiB, 90k and 28k, with the resident set flat from the fourth step on.
    A no-op off glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD (malloc.h)
    except (OSError, AttributeError):
        pass


# --- the model --------------------------------------------------------------------------------


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
    from gemmakit.model.families import build_empty

    start = time.perf_counter()
    g = GGUFFile(source.path)
    config = config_from_gguf(g)
    loading.check_dtype(config, weights_dtype)
    state = state_dict_from_gguf(g, weights_dtype)  # lean: chunked, straight to weights_dtype
    model = build_empty(config)
    load_into(model, {k: v.to(device) for k, v in state.items()}, str(source.path))
    del state
    tokenizer = loading.load_tokenizer(source, g)
    stop_ids = generation_stop_ids(tokenizer, {}, config.eos_token_ids)
    return loading.Loaded(model.eval(), tokenizer, source, stop_ids, time.perf_counter() - start)


def enable_activation_recomputation(model: nn.Module):
    """Recomputes each block's activations in the backward instead of keeping them
    (`--gradient-checkpointing`; torch.utils.checkpoint, non-reentrant).

    The block's forward is wrapped on the instance, so module names and the state dict do
    not change. RNG state is preserved, so LoRA dropout draws the same mask twice.
    """
    for block in model.model.layers:
        if "forward" in block.__dict__:
            continue
        block.forward = functools.partial(_recomputed, type(block).forward.__get__(block))


def _recomputed(fn, *args, **kwargs):
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def prepare_model(model: nn.Module, cfg: TrainConfig) -> dict:
    """Quantizes (qlora), adds adapters (qlora/lora) or unfreezes (full); returns notes."""
    notes = {"quantization_used": None}
    if cfg.method == "qlora":
        from gemmakit.quant import quantize_model

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
        enable_activation_recomputation(model)
    return notes


# --- optimizer and schedule -------------------------------------------------------------------


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


def make_scheduler(optimizer, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_lambda, cfg=cfg))


# --- data -------------------------------------------------------------------------------------


def load_data(cfg: TrainConfig, tokenizer):
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

"""The settings of a fine-tuning run: `TrainConfig`, its recipes, and reading it from files and flags.

Recipes are `TrainConfig` presets. The default, "qlora-guanaco", is QLoRA (Dettmers et al.
2023, arXiv:2305.14314: NF4 base with double quantization, paged 8-bit AdamW) on guanaco-format
chat data: LoRA r=16/alpha=16/dropout 0.05 on the seven projections, lr 2e-5 with 30 linear
warm-up steps, batch 4, 300 steps, eval and checkpoint every 50, max length 512. Every field can be overridden by a YAML/JSON file and by command-line flags
(flags win); the effective config is saved as `OUTPUT/config.json`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path

from gemmakit.config import PROJECTIONS
from gemmakit.errors import ConfigError
from gemmakit.options import comma_list, option
from gemmakit.training.data import SAMPLE_NAME

METHODS = ("qlora", "lora", "full")
DEFAULT_RECIPE = "qlora-guanaco"

# Recipes: overrides of the TrainConfig defaults (which are the qlora-guanaco recipe).
RECIPES: dict[str, dict] = {
    "qlora-guanaco": {},
    "lora": {"method": "lora", "quantization": None, "optimizer": "adamw", "lr": 2e-4},
    "full": {"method": "full", "quantization": None, "optimizer": "adamw", "lr": 2e-5, "keep_checkpoints": 1},
}
# Other names a recipe is accepted under; runs saved with them resume under the recipe's name.
RECIPE_ALIASES = {"qlora-article": "qlora-guanaco"}
RECIPE_NOTES = {
    "qlora-guanaco": "QLoRA for guanaco-format chat data: NF4 base, LoRA r16/a16/d0.05 on 7 projections, "
    "paged 8-bit AdamW, lr 2e-5, 30 warm-up, batch 4, 300 steps, eval/save every 50, max length 512",
    "lora": "the same on a float base, AdamW, lr 2e-4",
    "full": "every weight trained, AdamW, lr 2e-5 (bf16 via autocast over float32 master weights)",
}


@dataclass
class TrainConfig:
    """Every setting of a fine-tuning run; each field is a `gemmakit finetune` flag."""

    model: str | None = option(
        None, "model folder, .gguf file, or omitted for the bundled Gemma 3 270M", aliases=("-m",)
    )
    data: str | None = option(
        None,
        "training data: a .jsonl/.json file or a Hugging Face dataset name (name or name:split); "
        f"'{SAMPLE_NAME}' is the small guanaco-format set shipped with gemmakit",
    )
    eval_data: str | None = option(
        None, "evaluation data (same forms); default: a held-out fraction of --data"
    )
    eval_fraction: float = option(
        0.1, "fraction of --data held out for evaluation when --eval-data is not given"
    )
    eval_max_rows: int = option(200, "evaluate on at most this many rows (0: all)")
    output: str | None = option(
        None, "run folder: config.json, metrics.jsonl, loss.png, checkpoints/, adapter/", aliases=("-o",)
    )
    recipe: str = option(
        DEFAULT_RECIPE,
        "the preset the other settings start from; "
        + "; ".join(f"{k}: {v}" for k, v in RECIPE_NOTES.items()),
        metavar="{" + ",".join(RECIPES) + "}",
        choices=(*RECIPES, *RECIPE_ALIASES),
    )
    method: str = option("qlora", "qlora (quantized base + LoRA), lora, or full (every weight trained)")
    quantization: str | None = option(
        "nf4", "base quantization for qlora: nf4 (double quantization, QLoRA layout), int8 or int4"
    )
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: float = option(16.0, "LoRA alpha (updates are scaled by alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input")
    lora_targets: tuple[str, ...] = option(
        PROJECTIONS, "modules that get adapters, comma-separated (PEFT target_modules)"
    )
    use_rslora: bool = option(False, "scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r")
    optimizer: str = option(
        "paged_adamw_8bit", "paged_adamw_8bit (bitsandbytes, CUDA only; falls back to adamw) or adamw"
    )
    lr: float = option(2e-5, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    lr_scheduler: str = option("linear", "linear, cosine or constant (after warm-up)")
    warmup_steps: int = option(30, "steps of linear warm-up from 0")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    batch_size: int = option(4, "sequences per micro-batch per process")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_steps: int = option(300, "optimizer steps")
    eval_every: int = option(50, "evaluate every N steps (and before the first)")
    save_every: int = option(50, "checkpoint every N steps")
    keep_checkpoints: int = option(2, "checkpoints kept (oldest removed first; 0 keeps all)")
    max_length: int = option(512, "tokens per sequence (longer rows are truncated)")
    chat_template: bool = option(
        False,
        "format rows with the model's own chat template (Gemma's <start_of_turn> format when it "
        "has none) instead of guanaco text",
    )
    train_on_responses_only: bool = option(
        False, "loss on response tokens only (prompt tokens get no gradient)"
    )
    packing: bool = option(
        False,
        "pack several examples per row (no padding; attention stays within each example and "
        "positions restart at each)",
    )
    gradient_checkpointing: bool = option(
        False, "recompute each block's activations in the backward (less memory, ~30% more time)"
    )
    dtype: str = option("auto", "compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16")
    autocast: bool | None = option(
        None,
        "bfloat16 via autocast over float32 weights (default for full fine-tuning) instead of "
        "bfloat16 weights (default for LoRA: frozen weights need no float32 copy)",
    )
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda if present)")
    seed: int = option(42, "seed of LoRA init, data order and dropout")
    ce_chunk: int = option(0, "positions per cross-entropy chunk (0: auto, about 16M logits per chunk)")
    log_every: int = option(1, "log the training loss every N steps")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))
_FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}  # annotations as text ("int | None")


def canonical_recipe(name: str | None) -> str | None:
    """The recipe's own name for a name or an alias (unknown names pass through)."""
    return RECIPE_ALIASES.get(name, name)


def coerce(name: str, value):
    """Parses a config value (from a file or a flag) into the field's type."""
    if name not in FIELD_NAMES:
        raise ConfigError(f"unknown setting {name!r}")
    kind = _FIELD_TYPES[name]
    if value is None:
        return None
    try:
        if "tuple" in kind:  # "q_proj, v_proj" from a flag or a file, or a YAML/JSON list
            return comma_list(value if isinstance(value, str) else ",".join(map(str, value)))
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
    recipe = canonical_recipe(values.get("recipe") or recipe or DEFAULT_RECIPE)
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    merged = {**RECIPES[recipe], **values, "recipe": recipe}
    cfg = TrainConfig(**{k: coerce(k, v) if v is not None else None for k, v in merged.items()})
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig):
    """Raises ConfigError on a setting no run can use."""
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

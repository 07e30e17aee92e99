"""`gemmakit finetune`: LoRA / QLoRA / full supervised fine-tuning (the qlora-guanaco recipe by default).

Every `TrainConfig` field is a flag (`lora_r` -> `--lora-r`); precedence is recipe < `--config`
file < flags. `--resume` continues the run in `--output` from its latest checkpoint with the
saved settings (flags given again override them); a run killed before its first checkpoint
starts over from step 0. Ctrl-C saves a checkpoint and exits 130.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Flag groups of `--help`; the other TrainConfig fields are listed under "training".
GROUPS = {
    "run": ("model", "data", "eval_data", "output", "recipe", "method", "eval_fraction", "eval_max_rows"),
    "LoRA / QLoRA": ("quantization", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "use_rslora"),
}


def add_arguments(p):
    from gemmakit.options import add_options
    from gemmakit.training.config import FIELD_NAMES, TrainConfig

    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings (field names as keys)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --output from its latest checkpoint"
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.add_argument("--show-config", action="store_true", help="print the effective settings and exit")
    placed = {n for names in GROUPS.values() for n in names}
    groups = {**GROUPS, "training": tuple(n for n in FIELD_NAMES if n not in placed)}
    for title, names in groups.items():
        # unset_default: an absent flag is None, so it does not override the recipe or --config.
        add_options(p.add_argument_group(title), TrainConfig, names, unset_default=True)


def effective_config(args):
    """The TrainConfig for parsed args: recipe < (saved config on --resume) < --config < flags."""
    from gemmakit.errors import ConfigError
    from gemmakit.training import config as train_config
    from gemmakit.training.data import SAMPLE_NAME, shipped_dataset

    flags = {n: getattr(args, n) for n in train_config.FIELD_NAMES if getattr(args, n, None) is not None}
    flags = {n: train_config.coerce(n, v) for n, v in flags.items()}
    file_values = train_config.read_config_file(args.config) if args.config else {}
    layers = [file_values, flags]
    output = flags.get("output") or file_values.get("output")
    saved_path = Path(output) / "config.json" if output else None
    changed = []
    if args.resume and saved_path is not None and saved_path.exists():
        try:
            saved = json.loads(saved_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ConfigError(f"{saved_path}: not the JSON a run writes ({e})") from None
        if not isinstance(saved, dict):
            raise ConfigError(f"{saved_path}: not the settings of a run (a JSON object)")
        saved = {k: v for k, v in saved.items() if k in train_config.FIELD_NAMES}
        new_recipe = train_config.canonical_recipe(flags.get("recipe") or file_values.get("recipe"))
        if new_recipe and new_recipe != train_config.canonical_recipe(saved.get("recipe")):
            raise ConfigError(
                f"the run in {output} used recipe {saved.get('recipe')}; a resume cannot change it"
            )
        base = train_config.make_config(saved.get("recipe"), saved)
        cfg = train_config.make_config(saved.get("recipe"), saved, *layers)
        changed = [n for n in train_config.FIELD_NAMES if getattr(cfg, n) != getattr(base, n)]
    else:
        cfg = train_config.make_config(None, *layers)
    if cfg.data == SAMPLE_NAME or cfg.eval_data == SAMPLE_NAME:
        sample = str(shipped_dataset())
        cfg.data = sample if cfg.data == SAMPLE_NAME else cfg.data
        cfg.eval_data = sample if cfg.eval_data == SAMPLE_NAME else cfg.eval_data
    return cfg, changed


def run(args) -> int:
    from gemmakit.commands.common import print_json
    from gemmakit.training.trainer import train

    cfg, changed = effective_config(args)
    if args.show_config:
        print_json(cfg.to_dict())
        return 0
    if changed:
        print(
            f"note: resuming with changed settings ({', '.join(changed)}); the result will differ from an "
            "uninterrupted run",
            file=sys.stderr,
        )
    result = train(cfg, resume=args.resume)
    summary = {
        "output": str(result.output), "step": result.step, "interrupted": result.interrupted,
        "first_eval_loss": result.first_eval_loss, "last_eval_loss": result.last_eval_loss,
        "last_loss": result.last_loss, "adapter": str(result.adapter) if result.adapter else None,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None, "optimizer": result.optimizer,
        "seconds": round(result.seconds, 2), "train_tokens_per_second": round(result.tokens_per_second, 1),
        "quantization": result.notes.get("quantization_used"),
    }  # fmt: skip
    if args.json:
        print_json(summary)
    else:
        ev = ""
        if result.first_eval_loss is not None and result.last_eval_loss is not None:
            ev = f"eval loss {result.first_eval_loss:.4f} -> {result.last_eval_loss:.4f}; "
        print(
            f"{ev}{result.step} steps in {result.seconds:.0f} s ({result.tokens_per_second:.0f} train tokens/s)"
        )
        if result.interrupted:
            print(
                f"interrupted: checkpoint {result.checkpoint}; continue with the same command plus --resume"
            )
        elif result.adapter is not None:
            what = "model" if cfg.method == "full" else "adapter"
            print(f"{what}: {result.adapter}")
            if what == "adapter":
                model = f" --model {cfg.model}" if cfg.model else ""
                print(f"try it: gemmakit chat{model} --adapter {result.adapter}")
    return 130 if result.interrupted else 0

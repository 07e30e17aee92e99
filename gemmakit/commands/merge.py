"""`gemmakit merge`: fold a LoRA adapter (PEFT format) into its base model and save the result
as a Hugging Face model folder (config.json, model.safetensors, generation_config.json,
tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

from gemmakit.commands.common import add_model_arguments


def add_arguments(p):
    p.add_argument("--adapter", "-a", required=True, help="a LoRA adapter folder (PEFT format)")
    p.add_argument("--output", "-o", required=True, help="folder to write the merged model to")
    p.add_argument("--force", action="store_true", help="replace --output if it exists")
    add_model_arguments(p, adapter=False, quantize=False)
    p.epilog = (
        "--model defaults to the adapter's base_model_name_or_path when that path exists here, else the "
        "bundled model. A QLoRA adapter is merged into the float base weights."
    )


def base_model_of(adapter: str | Path) -> str | None:
    """The adapter's base_model_name_or_path when it is a local path, else None."""
    cfg = Path(adapter) / "adapter_config.json"
    try:
        base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError):
        return None
    return base if base and Path(base).exists() else None


def merge_to_folder(model, adapter, output, dtype="auto", device=None, force=False):
    """Loads `model`, applies and merges `adapter`, writes an HF folder at `output` in the
    model's dtype (`gemmakit.export.export_hf`: tokenizer files, chat template, generation
    config). Returns the merged `Loaded`."""
    from gemmakit import lora
    from gemmakit.errors import GemmakitError
    from gemmakit.export import export_hf
    from gemmakit.loading import load

    output = Path(output)
    if output.exists() and any(output.iterdir()) and not force:
        raise GemmakitError(f"{output} exists and is not empty; pass --force to replace it")
    loaded = load(model or base_model_of(adapter), dtype=dtype, device=device or "cpu")
    lora.load_adapter(loaded.model, adapter)
    lora.merge(loaded.model)
    weights_dtype = next(loaded.model.parameters()).dtype
    name = {"torch.float32": "f32", "torch.bfloat16": "bf16", "torch.float16": "f16"}[str(weights_dtype)]
    export_hf(loaded, output, dtype=name, force=force, progress=False)
    return loaded


def run(args) -> int:
    loaded = merge_to_folder(args.model, args.adapter, args.output, args.dtype, args.device, args.force)
    files = sorted(p.name for p in Path(args.output).iterdir())
    print(f"merged {args.adapter} into {loaded.source.path} -> {args.output} ({', '.join(files)})")
    return 0

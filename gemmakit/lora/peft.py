"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module>.lora_A.weight`, so `peft.PeftModel.from_pretrained` loads what
gemmakit saves onto the transformers model, and gemmakit loads PEFT adapters trained elsewhere.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from gemmakit.errors import GemmakitError, ModelFileError
from gemmakit.files import atomic_write
from gemmakit.formats.safetensors import read_safetensors, save_safetensors, split_towers
from gemmakit.lora.apply import (
    LoraSettings,
    is_linear_like,
    lora_modules,
    set_module,
    target_matches,
    wrapped_names,
)
from gemmakit.lora.layers import LoRAEmbedding, LoRALinear, LoRAParameters

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Multimodal Gemma 3 checkpoints nest the text model; their adapters name it this way.
_MULTIMODAL = (("model.language_model.", "model."), ("language_model.model.", "model."))


def _parameter_wrapper_name(module: str, names: tuple[str, ...], index: int) -> str:
    """PEFT's module name for the adapter of parameter `names[index]` of `module`.

    PEFT wraps a module once per targeted parameter, in the module's registration order, each
    wrapper around the previous one (peft tuners_utils.py, BaseTuner._inject_parameters): the
    first parameter's adapter sits deepest, `<module>.base_layer...`, the last's at `<module>`.
    """
    return module + ".base_layer" * (len(names) - 1 - index)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names (`base_model.model.<module>.lora_A.weight`)."""
    return {k: p.detach() for k, p in adapter_parameters(model).items()}


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]):
    """Copies tensors named as `adapter_state_dict` names them into the model's adapters."""
    params = adapter_parameters(model)
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise ModelFileError(f"adapter lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    with torch.no_grad():
        for key, p in params.items():
            t = tensors[key]
            if tuple(t.shape) != tuple(p.shape):
                raise ModelFileError(
                    f"adapter tensor {key} has shape {tuple(t.shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(t)


def adapter_parameters(model) -> dict[str, nn.Parameter]:
    """The adapter parameters themselves (trainable, with their gradients) under PEFT's names."""
    out = {}
    for name, m in lora_modules(model).items():
        if isinstance(m, LoRAEmbedding):
            out[f"{PEFT_PREFIX}{name}.lora_embedding_A"] = m.lora_embedding_A
            out[f"{PEFT_PREFIX}{name}.lora_embedding_B"] = m.lora_embedding_B
        elif isinstance(m, LoRAParameters):
            for i, p in enumerate(m.names):
                peft_name = _parameter_wrapper_name(name, m.names, i)
                out[f"{PEFT_PREFIX}{peft_name}.lora_A.weight"] = m.lora_A[p].weight
                out[f"{PEFT_PREFIX}{peft_name}.lora_B.weight"] = m.lora_B[p].weight
        else:
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
    return out


def peft_config(settings: LoraSettings) -> dict:
    """adapter_config.json as PEFT's LoraConfig writes it (the keys it needs to load).

    `target_parameters` (peft >= 0.17) is written only when parameters were targeted, so
    older peft versions still read an adapter of linear layers.
    """
    extra = {"target_parameters": list(settings.target_parameters)} if settings.target_parameters else {}
    return extra | {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": settings.base_model_name_or_path,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": sorted(set(settings.target_modules)),
        "use_rslora": settings.use_rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None):
    """Writes `folder/adapter_config.json` and `folder/adapter_model.safetensors` (PEFT).

    Each file is written atomically; the adapter tensors are saved in float32.
    """
    settings = getattr(model, "lora_settings", None)
    if settings is None or not lora_modules(model):
        raise GemmakitError("the model has no LoRA adapters to save")
    if base_model_name_or_path is not None:
        settings.base_model_name_or_path = base_model_name_or_path
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float().cpu() for k, v in adapter_state_dict(model).items()}
    save_safetensors(tensors, folder / ADAPTER_WEIGHTS)
    text = json.dumps(peft_config(settings), indent=2) + "\n"
    atomic_write(folder / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(text))


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config dict, tensors with our module names) of a PEFT LoRA folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: no such adapter folder")
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.exists():
        raise ModelFileError(f"{folder}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{cfg_path}: not valid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelFileError(
            f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; gemmakit loads LORA adapters only"
        )
    if cfg.get("use_dora"):
        raise ModelFileError(f"{cfg_path}: DoRA adapters are not supported")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.exists():
        if (folder / "adapter_model.bin").exists():
            raise ModelFileError(
                f"{folder}: adapter_model.bin is pickled; gemmakit refuses pickles (they can run code). "
                "Re-save it with safetensors (PEFT's save_pretrained does by default)."
            )
        raise ModelFileError(f"{folder}: no {ADAPTER_WEIGHTS}")
    raw = read_safetensors([weights])
    for key in raw:
        if not key.startswith(PEFT_PREFIX):
            raise ModelFileError(f"{weights}: unexpected tensor {key!r} (not a LoRA tensor of a causal LM)")
    # An adapter trained on a multimodal model may adapt its vision/audio towers too.
    _, towers = split_towers(k[len(PEFT_PREFIX) :] for k in raw)
    if towers:
        log.warning(
            f"{weights}: skipped {len(towers)} LoRA tensors of the vision/audio towers; "
            "gemmakit runs the text model only"
        )
    towers = set(towers)
    tensors = {}
    for key, t in raw.items():
        name = key[len(PEFT_PREFIX) :]
        if name in towers:
            continue
        for old, new in _MULTIMODAL:
            if name.startswith(old):
                name = new + name[len(old) :]
        # Adapters saved with an adapter name keep it in the key (`lora_A.default.weight`).
        name = re.sub(r"\.(lora_A|lora_B)\.[^.]+\.weight$", r".\1.weight", name)
        name = re.sub(r"\.(lora_embedding_[AB])\.[^.]+$", r".\1", name)
        if not re.search(r"\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$", name):
            raise ModelFileError(
                f"{weights}: tensor {key!r} is not a LoRA factor (modules_to_save is unsupported)"
            )
        tensors[name] = t
    return cfg, tensors


def pattern_value(patterns: dict, name: str, default):
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default


def load_adapter(model: nn.Module, folder: str | Path) -> LoraSettings:
    """Applies a PEFT LoRA adapter folder to `model` (unmerged; `merge(model)` folds it in).

    The adapter is attached as trained: rank from the tensors, `lora_alpha` (and PEFT's
    `alpha_pattern`), rsLoRA if the config says so; dropout is off (inference).
    """
    cfg, tensors = read_adapter(folder)
    modules = {}
    for key in tensors:
        module = key.rsplit(".lora_", 1)[0]
        modules.setdefault(module, {})[key[len(module) + 1 :]] = tensors[key]
    if lora_modules(model):
        raise GemmakitError("the model already has LoRA adapters; merge them first")
    names = dict(model.named_modules())
    alpha, use_rslora = float(cfg.get("lora_alpha", cfg.get("r", 8))), bool(cfg.get("use_rslora", False))
    held = {}  # module -> {wrapper depth: factors} for adapters of parameters (experts)
    unused = [m for m in modules if m not in names and unused_projection(model, m)]
    if unused:
        log.warning(
            f"{folder}: skipped the adapters of {len(unused)} k/v projections of layers that read another "
            "layer's keys and values (transformers drops those weights too)"
        )
    for module_name, parts in modules.items():
        base_name = module_name.replace(".base_layer", "")
        base = names.get(base_name)
        if module_name in unused:
            continue
        if base is None:
            raise ModelFileError(f"{folder}: adapter targets {module_name}, which this model does not have")
        if base_name != module_name or not (is_linear_like(base) or isinstance(base, nn.Embedding)):
            held.setdefault(base_name, {})[module_name.count(".base_layer")] = parts
            continue
        a_alpha = float(pattern_value(cfg.get("alpha_pattern"), module_name, alpha))
        set_module(model, module_name, _module_wrapper(folder, module_name, base, parts, a_alpha, use_rslora))
    for base_name, depths in held.items():
        a_alpha = float(pattern_value(cfg.get("alpha_pattern"), base_name, alpha))
        wrapper = _parameters_wrapper(folder, cfg, base_name, names[base_name], depths, a_alpha, use_rslora)
        set_module(model, base_name, wrapper)
    settings = LoraSettings(
        r=int(cfg.get("r", 8)), alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0)),
        target_modules=_names(cfg.get("target_modules")), use_rslora=use_rslora,
        wrapped=wrapped_names(model), base_model_name_or_path=cfg.get("base_model_name_or_path"),
        target_parameters=_names(cfg.get("target_parameters")),
    )  # fmt: skip
    model.lora_settings = settings
    # Factors of a parameter adapter are copied as stored: PEFT's layout is LoRAParameters'.
    load_adapter_state(
        model, {PEFT_PREFIX + k: v for k, v in tensors.items() if k.rsplit(".lora_", 1)[0] not in unused}
    )
    for m in lora_modules(model).values():
        m.requires_grad_(False)
        m.eval()
    return settings


def _names(value) -> tuple[str, ...]:
    """PEFT's target list: names, or one regular expression as a string."""
    return (value,) if isinstance(value, str) else tuple(value or ())


def unused_projection(model: nn.Module, name: str) -> bool:
    """A k_proj/v_proj adapter of a layer without that projection: a KV-shared layer (Gemma 3n
    files and older transformers carried k/v weights there, which the computation never used)
    or a K = V layer's v_proj."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj)", name)
    config = getattr(model, "config", None)
    if m is None or config is None or int(m[1]) >= config.num_hidden_layers:
        return False
    i = int(m[1])
    return not config.layer_owns_kv(i) or (m[2] == "v_proj" and not config.layer_has_v_proj(i))


def _module_wrapper(folder, module_name: str, base: nn.Module, parts: dict, alpha: float, use_rslora: bool):
    """The LoRALinear or LoRAEmbedding a linear layer's or embedding's factors fit."""
    if "lora_A.weight" in parts:
        a, b = parts["lora_A.weight"], parts.get("lora_B.weight")
        if b is None or not is_linear_like(base):
            raise ModelFileError(f"{folder}: incomplete or misplaced LoRA pair for {module_name}")
        wrapper = LoRALinear(base, a.shape[0], alpha, 0.0, use_rslora)
        if tuple(a.shape) != tuple(wrapper.lora_A.weight.shape) or tuple(b.shape) != tuple(
            wrapper.lora_B.weight.shape
        ):
            raise ModelFileError(
                f"{folder}: {module_name} adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit "
                f"a {wrapper.in_features}->{wrapper.out_features} layer (another base model?)"
            )
        return wrapper
    a, b = parts.get("lora_embedding_A"), parts.get("lora_embedding_B")
    if a is None or b is None or not isinstance(base, nn.Embedding):
        raise ModelFileError(f"{folder}: incomplete or misplaced LoRA embedding pair for {module_name}")
    return LoRAEmbedding(base, a.shape[0], alpha, use_rslora)


def _parameters_wrapper(folder, cfg: dict, name: str, base: nn.Module, depths: dict, alpha, use_rslora):
    """The LoRAParameters for the adapters PEFT nested on `name` (its target_parameters)."""
    targets = tuple(cfg.get("target_parameters") or ())
    params = [p for p, _ in base.named_parameters(recurse=False) if target_matches(f"{name}.{p}", targets)]
    if sorted(depths) != list(range(len(params))) or any("lora_A.weight" not in d for d in depths.values()):
        raise ModelFileError(
            f"{folder}: adapters nested {len(depths)} deep on {name}, but its target_parameters "
            f"({', '.join(targets) or 'none'}) name {len(params)} of its parameters"
        )
    first = getattr(base, params[0])
    experts = first.shape[0] if first.dim() == 3 else 1
    wrapper = LoRAParameters(
        base, params, depths[len(params) - 1]["lora_A.weight"].shape[0] // experts, alpha, use_rslora
    )
    for i, p in enumerate(wrapper.names):
        a, b = depths[len(params) - 1 - i]["lora_A.weight"], depths[len(params) - 1 - i].get("lora_B.weight")
        want = (tuple(wrapper.lora_A[p].weight.shape), tuple(wrapper.lora_B[p].weight.shape))
        if b is None or (tuple(a.shape), tuple(b.shape)) != want:
            raise ModelFileError(
                f"{folder}: {name}.{p} adapter shapes do not fit {want} (another base model?)"
            )
    return wrapper

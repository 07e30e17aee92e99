"""Putting LoRA adapters on a model and folding them back in.

`apply_lora(model, r, alpha, dropout, targets)` freezes the model and swaps each targeted
`nn.Linear` (or a quantized linear from `gemmakit.quant`, for QLoRA) for a `LoRALinear`, and
a targeted `nn.Embedding` for a `LoRAEmbedding`, walking the modules as PEFT matches
`target_modules`. Weights held as parameters rather than linear layers (Gemma 4's MoE experts)
are targeted by parameter name, as PEFT's `target_parameters`, and wrapped in a
`LoRAParameters`. `merge(model)` folds every adapter into its base weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from gemmakit.config import PROJECTIONS
from gemmakit.errors import GemmakitError
from gemmakit.lora.layers import LORA_TYPES, LoRAEmbedding, LoRALinear, LoRAParameters


@dataclass
class LoraSettings:
    """What `apply_lora` did; written to adapter_config.json by `save_adapter`."""

    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = PROJECTIONS
    use_rslora: bool = False
    # Modules that were actually wrapped (full names), filled by apply_lora; a targeted
    # parameter appears under its full name ("model.layers.0.experts.gate_up_proj").
    wrapped: list[str] = field(default_factory=list)
    base_model_name_or_path: str | None = None
    # Parameters targeted by name (PEFT's target_parameters), e.g. "experts.gate_up_proj".
    target_parameters: tuple[str, ...] = ()


def target_matches(name: str, targets) -> bool:
    # PEFT's rule for a list of names: the full module name, or its last components.
    return any(name == t or name.endswith("." + t) for t in targets)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or callable(getattr(module, "dequantize", None))


def set_module(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> LoRALinear/LoRAEmbedding/LoRAParameters, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LORA_TYPES)}


def wrapped_names(model: nn.Module) -> list[str]:
    """What carries an adapter: module names, and a targeted parameter's full name."""
    out = []
    for name, m in lora_modules(model).items():
        out += [f"{name}.{p}" for p in m.names] if isinstance(m, LoRAParameters) else [name]
    return out


def _weight_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Module name -> names of the 2-D/3-D parameters it holds itself, for modules that are
    not linear layers or embeddings (whose weights are targeted as modules)."""
    out = {}
    for name, module in model.named_modules():
        if not name or is_linear_like(module) or isinstance(module, nn.Embedding):
            continue
        own = [n for n, p in module.named_parameters(recurse=False) if p.dim() in (2, 3)]
        if own:
            out[name] = own
    return out


def split_targets(
    model: nn.Module, targets, target_parameters=()
) -> tuple[tuple, tuple, dict[str, list[str]]]:
    """(module targets, parameter targets, {module name: its targeted parameters}).

    A target that names no module but a weight parameter ("experts.gate_up_proj", or just
    "gate_up_proj") is taken as a parameter target, as if given in PEFT's `target_parameters`;
    PEFT matches those by the same rule (the full name or its trailing components).
    """
    modules = [n for n, _ in model.named_modules() if n]
    held = _weight_parameters(model)
    as_params = [t for t in targets if not any(target_matches(n, [t]) for n in modules)]
    as_params = [
        t for t in as_params if any(target_matches(f"{m}.{p}", [t]) for m, ps in held.items() for p in ps)
    ]
    module_targets = tuple(t for t in targets if t not in as_params)
    param_targets = tuple(dict.fromkeys((*target_parameters, *as_params)))
    chosen = {}
    for m, ps in held.items():
        names = [p for p in ps if target_matches(f"{m}.{p}", param_targets)]
        if names:
            chosen[m] = names
    return module_targets, param_targets, chosen


def apply_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 16.0,
    dropout: float = 0.05,
    targets=PROJECTIONS,
    use_rslora: bool = False,
    freeze: bool = True,
    target_parameters=(),
) -> LoraSettings:
    """Freezes `model` and wraps every module named in `targets` with a LoRA adapter.

    Args:
        targets: module names matched as PEFT matches `target_modules` (a full name or its
            trailing components: "q_proj", "mlp.down_proj", "lm_head", "embed_tokens"). Any
            linear layer can be named: Gemma 3n/4's per_layer_input_gate, per_layer_projection,
            laurel.linear_left, router.proj. A name that matches no module but a weight
            parameter is a parameter target (see `target_parameters`).
        target_parameters: weight parameters matched by the same rule, as PEFT's
            `target_parameters`: "experts.gate_up_proj" and "experts.down_proj", the fused
            expert weights of Gemma 4's MoE block, which are 3-D parameters, not linear
            layers. These take no dropout (PEFT refuses it for them too).
        freeze: set requires_grad False on every existing parameter first.

    Returns:
        The settings, also kept as `model.lora_settings` for `save_adapter`.
    """
    if lora_modules(model):
        raise GemmakitError("the model already has LoRA adapters; merge them first")
    targets, param_targets, held = split_targets(model, tuple(targets), tuple(target_parameters))
    if held and dropout > 0:
        raise GemmakitError(
            f"LoRA on parameters ({', '.join(sorted({p for ps in held.values() for p in ps}))}) takes no "
            "dropout: the input cannot be factored out of W + BA (peft refuses it too); set lora_dropout to 0"
        )
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if not name or not target_matches(name, targets):
            continue
        if isinstance(module, nn.Embedding):
            wrapper = LoRAEmbedding(module, r, alpha, use_rslora)
        elif is_linear_like(module):
            wrapper = LoRALinear(module, r, alpha, dropout, use_rslora)
        else:
            raise GemmakitError(_not_a_target(name, module))
        set_module(model, name, wrapper.train(module.training))  # dropout only in training mode
    for name, params in held.items():
        set_module(model, name, LoRAParameters(model.get_submodule(name), params, r, alpha, use_rslora))
    wrapped = wrapped_names(model)
    if not wrapped:
        raise GemmakitError(f"no module matches the LoRA targets {', '.join(targets)}")
    settings = LoraSettings(r, alpha, dropout, targets, use_rslora, wrapped, target_parameters=param_targets)
    model.lora_settings = settings
    return settings


def _not_a_target(name: str, module: nn.Module) -> str:
    """Why a matched module cannot take an adapter, and what to name instead."""
    params = [n for n, p in module.named_parameters(recurse=False) if p.dim() in (2, 3)]
    hint = ""
    if params:
        short = name.rsplit(".", 1)[-1]
        hint = "; its weights are parameters: target " + ", ".join(f"{short}.{p}" for p in params)
    return f"LoRA target {name} is a {type(module).__name__}, not a linear or embedding{hint}"


def _untie_if_needed(model: nn.Module, names: list[str]):
    """A tied model whose embedding or head carries an adapter gets two matrices.

    Unmerged, the adapter changes only its own side (PEFT wraps one module); merged into a
    shared matrix it would change both (peft GH#2018), so the head gets its own copy and the
    config says the weights are untied.
    """
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return
    if not any(n == "lm_head" or n.endswith("embed_tokens") for n in names):
        return
    head = model.lm_head.base if isinstance(model.lm_head, LoRALinear) else model.lm_head
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config = config.replace(tie_word_embeddings=False)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weight and restores plain modules, in place.

    A quantized base is dequantized first, so the result is a float model (the dtype of the
    dequantized weight). Returns the model.
    """
    modules = lora_modules(model)
    _untie_if_needed(model, list(modules))
    for name, m in modules.items():
        base = m.base
        if isinstance(m, LoRAParameters):
            for p in m.names:
                w = getattr(base, p)
                w.copy_((w.float() + m.delta_weight(p).to(w.device)).to(w.dtype))
            set_module(model, name, base)
            continue
        if isinstance(m, LoRAEmbedding):
            base.weight.copy_((base.weight.float() + m.delta_weight()).to(base.weight.dtype))
            set_module(model, name, base)
            continue
        if isinstance(base, nn.Linear):
            w = base.weight
            merged = (w.float() + m.delta_weight().to(w.device)).to(w.dtype)
            base.weight = nn.Parameter(merged, requires_grad=False)
            set_module(model, name, base)
        else:
            w = base.dequantize()
            linear = nn.Linear(m.in_features, m.out_features, bias=False, device=w.device, dtype=w.dtype)
            linear.weight = nn.Parameter((w.float() + m.delta_weight().to(w.device)).to(w.dtype), False)
            if getattr(base, "bias", None) is not None:
                linear.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
            set_module(model, name, linear)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model

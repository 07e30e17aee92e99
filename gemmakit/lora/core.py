"""LoRA: low-rank adapters on a frozen base, merged back, saved and loaded in PEFT's format.

`apply_lora(model, r, alpha, dropout, targets)` freezes the model and swaps each targeted
`nn.Linear` (or a quantized linear from `gemmakit.quant.core`, for QLoRA) for a
`LoRALinear`, and a targeted `nn.Embedding` for a `LoRAEmbedding`. The output is

    y = base(x) + B(A(dropout(x))) * alpha / r        (alpha / sqrt(r) with rsLoRA)

with A Kaiming-uniform and B zero, so training starts from the base model exactly (Hu et al.
2021, arXiv 2106.09685 §4.1; PEFT `LoraLayer.reset_lora_parameters`).

The wrapped module keeps its state-dict names: `q_proj.weight` stays `q_proj.weight` (not
`q_proj.base.weight`), so base checkpoints load into a LoRA model unchanged (torchtune
`modules/peft/lora.py`). Adapters are saved as PEFT saves them
(`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module>.lora_A.weight`), so `peft.PeftModel.from_pretrained` loads them
onto the transformers model and gemmakit loads PEFT adapters trained elsewhere.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.config import PROJECTIONS
from gemmakit.errors import GemmakitError, ModelFileError
from gemmakit.kernels import cpu as cpu_kernels

# The article's targets: every projection of attention and MLP.
DEFAULT_TARGETS = PROJECTIONS
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Multimodal Gemma 3 checkpoints nest the text model; their adapters name it this way.
_MULTIMODAL = (("model.language_model.", "model."), ("language_model.model.", "model."))


@dataclass
class LoraSettings:
    """What `apply_lora` did; written to adapter_config.json by `save_adapter`."""

    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False
    # Modules that were actually wrapped (full names), filled by apply_lora.
    wrapped: list[str] = field(default_factory=list)
    base_model_name_or_path: str | None = None


def _scaling(r: int, alpha: float, use_rslora: bool) -> float:
    # rsLoRA (Kalajdzievski 2023, arXiv 2312.03732) scales by alpha / sqrt(r), as PEFT's
    # use_rslora does.
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _base_shape(base: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or a quantized linear."""
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return int(base.out_features), int(base.in_features)
    w = base.dequantize()
    return int(w.shape[0]), int(w.shape[1])


def _base_device(base: nn.Module) -> torch.device:
    for t in list(base.parameters()) + list(base.buffers()):
        return t.device
    return torch.device("cpu")


class _KeepBaseNames:
    """State-dict hooks that hide the `base.` level of a wrapper."""

    def _install_name_hooks(self):
        self._register_state_dict_hook(_drop_base_prefix)
        self._register_load_state_dict_pre_hook(_add_base_prefix, with_module=True)


def _drop_base_prefix(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + "base.")]:
        state_dict[prefix + key[len(prefix) + 5 :]] = state_dict.pop(key)
    return state_dict


def _add_base_prefix(module, state_dict, prefix, *args):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if not rest.startswith(("base.", "lora_")):
            state_dict[prefix + "base." + rest] = state_dict.pop(key)


class LoRALinear(nn.Module, _KeepBaseNames):
    """A frozen linear layer plus a trainable low-rank update.

    Args:
        base: an `nn.Linear` or a quantized linear whose `forward(x)` is differentiable in x
            and whose `dequantize()` returns the float weight (out, in).
        r: rank of the update.
        alpha: the update is scaled by alpha / r (alpha / sqrt(r) with `use_rslora`).
        dropout: dropout on the adapter's input only, as in PEFT.

    The adapter weights are float32 whatever the base dtype: in a bfloat16 model they are
    cast to the activation dtype in the forward, and their gradients land on the float32
    copies, which the optimizer updates (mixed precision without float32 copies of the frozen
    base).
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora=False):
        super().__init__()
        if r <= 0:
            raise GemmakitError(f"LoRA rank must be positive, got {r}")
        self.base = base
        out_f, in_f = _base_shape(base)
        self.in_features, self.out_features = in_f, out_f
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = _scaling(r, alpha, use_rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = _base_device(base)
        self.lora_A = nn.Linear(in_f, r, bias=False, device=device, dtype=torch.float32)  # (r, in)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=device, dtype=torch.float32)  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self._install_name_hooks()

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (nn.Linear) or its dequantized float copy."""
        return self.base.weight if isinstance(self.base, nn.Linear) else self.base.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A.weight, self.lora_B.weight
        p = self.lora_dropout.p if self.training and isinstance(self.lora_dropout, nn.Dropout) else 0.0
        fused = (
            x.device.type == "cpu"
            and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and (p == 0.0 or cpu_kernels.handles(x))
        )
        base = self.base
        # A frozen plain linear's product is made inside the function (out None); any other
        # base's output goes in.
        out = None if fused and _plain_frozen_linear(base, x.dtype) else base(x)
        if fused and (out is None or out.dtype == x.dtype):
            seed = int(torch.randint(0, 2**62, ())) if p else 0  # from torch's generator: reproducible
            weight = base.weight if out is None else None
            return _LoRAUpdate.apply(x, out, weight, a, b, self.scaling, p, seed)
        if not torch.is_autocast_enabled(x.device.type) and a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        delta = F.linear(F.linear(self.lora_dropout(x), a), b)
        return out + delta.to(out.dtype) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling, float32, (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


def _plain_frozen_linear(base: nn.Module, dtype: torch.dtype) -> bool:
    """A bias-free nn.Linear with a frozen weight of the activation dtype: the base product
    can join the adapter's function."""
    return (
        type(base) is nn.Linear
        and base.bias is None
        and not base.weight.requires_grad
        and base.weight.dtype == dtype
    )


class _LoRAUpdate(torch.autograd.Function):
    """base + scaling * dropout(x) A^T B^T, for training on the CPU.

    `base` is either the base layer's output (base_out, any differentiable base such as a
    quantized one) or, for a frozen plain linear, its weight W, in which case the product
    x W^T is made here and the update added onto it in place (one addmm_ instead of a copy
    of the base output plus an addmm), and the backward adds the adapter's input gradient
    onto g W, with no autograd nodes for the base's matmul, views and sum.
    The same values as the module's plain path, in fewer passes over the activations: the
    dropout mask comes from a seed (gemmakit/cpu_kernels.py `dropout`, 4-9x faster than
    torch's bernoulli_, which drew 126 masks per step of Gemma 3 270M for 0.4-0.5 s), the
    backward rebuilds it instead of keeping the dropped-out copy of x. Saved for the
    backward: x (shared by the adapters that read it, as q/k/v do), the (N, r) projection,
    the adapter weights in x's dtype and W (a parameter, no copy).
    Gradients (with xd = dropout(x), u = xd A^T, s = scaling, g the output gradient):
    dB = s g^T u, dA = s (g B)^T xd, dx = dropout(s (g B) A) (+ g W, or the base's own via
    autograd).
    """

    @staticmethod
    def forward(ctx, x, base_out, weight, a, b, scaling, p, seed):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        a_x, b_x = a.to(x.dtype), b.to(x.dtype)
        xd = cpu_kernels.dropout(x2, p, seed) if p else x2
        u = xd @ a_x.T  # (N, r)
        if weight is not None:
            out = torch.mm(x2, weight.T).addmm_(u, b_x.T, alpha=scaling)
        else:
            out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), u, b_x.T, alpha=scaling)
        ctx.save_for_backward(x2, u, a_x, b_x, weight)
        ctx.scaling, ctx.p, ctx.seed, ctx.x_shape = scaling, p, seed, x.shape
        ctx.weight_dtypes = (a.dtype, b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, u, a_x, b_x, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        gu = torch.mm(g, b_x).mul_(ctx.scaling)  # (N, r)
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[4]:
            grad_b = torch.mm(g.T, u).mul_(ctx.scaling).to(ctx.weight_dtypes[1])
        if ctx.needs_input_grad[3]:
            xd = cpu_kernels.dropout(x2, ctx.p, ctx.seed) if ctx.p else x2
            grad_a = torch.mm(gu.T, xd).to(ctx.weight_dtypes[0])
        if ctx.needs_input_grad[0]:
            if weight is not None and not ctx.p:
                grad_x = torch.mm(g, weight).addmm_(gu, a_x)
            else:
                grad_x = torch.mm(gu, a_x)
                if ctx.p:
                    cpu_kernels.dropout(grad_x, ctx.p, ctx.seed, out=grad_x)
                if weight is not None:
                    grad_x.addmm_(g, weight)
            grad_x = grad_x.view(ctx.x_shape)
        grad_base = grad_out if ctx.needs_input_grad[1] else None
        return grad_x, grad_base, None, grad_a, grad_b, None, None, None


class LoRAEmbedding(nn.Module, _KeepBaseNames):
    """A frozen embedding plus a low-rank update of its rows (PEFT's LoRA `Embedding`).

    PEFT names the factors `lora_embedding_A` (r, vocab) and `lora_embedding_B` (dim, r) and
    initializes A to zero and B normal; there is no dropout on token ids.
    """

    def __init__(self, base: nn.Embedding, r: int, alpha: float, use_rslora=False):
        super().__init__()
        self.base = base
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = _scaling(r, alpha, use_rslora)
        device = base.weight.device
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, base.num_embeddings, device=device))
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, r, device=device))
        self._install_name_hooks()

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def padding_idx(self):
        return self.base.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        after_a = F.embedding(ids, self.lora_embedding_A.T)  # (..., r)
        delta = after_a @ self.lora_embedding_B.T  # (..., dim)
        return out + (delta * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(vocab, dim) float32."""
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling


LORA_TYPES = (LoRALinear, LoRAEmbedding)


# --- applying ---------------------------------------------------------------------------------


def _matches(name: str, targets) -> bool:
    # PEFT's rule for a list of names: the full module name, or its last components.
    return any(name == t or name.endswith("." + t) for t in targets)


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or callable(getattr(module, "dequantize", None))


def _set_module(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> LoRALinear/LoRAEmbedding, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LORA_TYPES)}


def apply_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 16.0,
    dropout: float = 0.05,
    targets=DEFAULT_TARGETS,
    use_rslora: bool = False,
    freeze: bool = True,
) -> LoraSettings:
    """Freezes `model` and wraps every module named in `targets` with a LoRA adapter.

    Args:
        targets: module names matched as PEFT matches `target_modules` (a full name or its
            trailing components: "q_proj", "mlp.down_proj", "lm_head", "embed_tokens").
        freeze: set requires_grad False on every existing parameter first.

    Returns:
        The settings, also kept as `model.lora_settings` for `save_adapter`.
    """
    if lora_modules(model):
        raise GemmakitError("the model already has LoRA adapters; merge them first")
    targets = tuple(targets)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if not name or not _matches(name, targets):
            continue
        if isinstance(module, nn.Embedding):
            wrapper = LoRAEmbedding(module, r, alpha, use_rslora)
        elif _is_linear_like(module):
            wrapper = LoRALinear(module, r, alpha, dropout, use_rslora)
        else:
            raise GemmakitError(f"LoRA target {name} is a {type(module).__name__}, not a linear or embedding")
        _set_module(model, name, wrapper.train(module.training))  # dropout only in training mode
        wrapped.append(name)
    if not wrapped:
        raise GemmakitError(f"no module matches the LoRA targets {', '.join(targets)}")
    settings = LoraSettings(r, alpha, dropout, targets, use_rslora, wrapped)
    model.lora_settings = settings
    return settings


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# --- merging ----------------------------------------------------------------------------------


def _untie_if_needed(model: nn.Module, names: list[str]):
    """A tied model whose embedding or head carries an adapter gets two matrices.

    Unmerged, the adapter changes only its own side (PEFT wraps one module); merged into a
    shared matrix it would change both (peft GH#2018), so the head gets its own copy and the
    config says the weights are untied (field notes §2.14).
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
        if isinstance(m, LoRAEmbedding):
            base.weight.copy_((base.weight.float() + m.delta_weight()).to(base.weight.dtype))
            _set_module(model, name, base)
            continue
        if isinstance(base, nn.Linear):
            w = base.weight
            merged = (w.float() + m.delta_weight().to(w.device)).to(w.dtype)
            base.weight = nn.Parameter(merged, requires_grad=False)
            _set_module(model, name, base)
        else:
            w = base.dequantize()
            linear = nn.Linear(m.in_features, m.out_features, bias=False, device=w.device, dtype=w.dtype)
            linear.weight = nn.Parameter((w.float() + m.delta_weight().to(w.device)).to(w.dtype), False)
            if getattr(base, "bias", None) is not None:
                linear.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
            _set_module(model, name, linear)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


# --- PEFT format ------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names (`base_model.model.<module>.lora_A.weight`)."""
    out = {}
    for name, m in lora_modules(model).items():
        if isinstance(m, LoRAEmbedding):
            out[f"{PEFT_PREFIX}{name}.lora_embedding_A"] = m.lora_embedding_A.detach()
            out[f"{PEFT_PREFIX}{name}.lora_embedding_B"] = m.lora_embedding_B.detach()
        else:
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]):
    """Copies tensors named as `adapter_state_dict` names them into the model's adapters."""
    params = _adapter_params(model)
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


def _adapter_params(model) -> dict[str, nn.Parameter]:
    out = {}
    for name, m in lora_modules(model).items():
        if isinstance(m, LoRAEmbedding):
            out[f"{PEFT_PREFIX}{name}.lora_embedding_A"] = m.lora_embedding_A
            out[f"{PEFT_PREFIX}{name}.lora_embedding_B"] = m.lora_embedding_B
        else:
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
    return out


def peft_config(settings: LoraSettings) -> dict:
    """adapter_config.json as PEFT's LoraConfig writes it (the keys it needs to load)."""
    return {
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
    from gemmakit.files import atomic_write
    from gemmakit.formats.safetensors import save_safetensors

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
    from gemmakit.formats.safetensors import read_safetensors

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
    tensors = {}
    for key, t in raw.items():
        if not key.startswith(PEFT_PREFIX):
            raise ModelFileError(f"{weights}: unexpected tensor {key!r} (not a LoRA tensor of a causal LM)")
        name = key[len(PEFT_PREFIX) :]
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


def _pattern_value(patterns: dict, name: str, default):
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
    for module_name, parts in modules.items():
        base = names.get(module_name)
        if base is None:
            raise ModelFileError(f"{folder}: adapter targets {module_name}, which this model does not have")
        a_alpha = float(_pattern_value(cfg.get("alpha_pattern"), module_name, alpha))
        if "lora_A.weight" in parts:
            a, b = parts["lora_A.weight"], parts.get("lora_B.weight")
            if b is None or not _is_linear_like(base):
                raise ModelFileError(f"{folder}: incomplete or misplaced LoRA pair for {module_name}")
            wrapper = LoRALinear(base, a.shape[0], a_alpha, 0.0, use_rslora)
            if tuple(a.shape) != tuple(wrapper.lora_A.weight.shape) or tuple(b.shape) != tuple(
                wrapper.lora_B.weight.shape
            ):
                raise ModelFileError(
                    f"{folder}: {module_name} adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit "
                    f"a {wrapper.in_features}->{wrapper.out_features} layer (another base model?)"
                )
        else:
            a, b = parts.get("lora_embedding_A"), parts.get("lora_embedding_B")
            if a is None or b is None or not isinstance(base, nn.Embedding):
                raise ModelFileError(
                    f"{folder}: incomplete or misplaced LoRA embedding pair for {module_name}"
                )
            wrapper = LoRAEmbedding(base, a.shape[0], a_alpha, use_rslora)
        _set_module(model, module_name, wrapper)
    settings = LoraSettings(
        r=int(cfg.get("r", 8)), alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0)),
        target_modules=tuple(cfg.get("target_modules") or ()), use_rslora=use_rslora,
        wrapped=list(modules), base_model_name_or_path=cfg.get("base_model_name_or_path"),
    )  # fmt: skip
    model.lora_settings = settings
    load_adapter_state(model, {PEFT_PREFIX + k: v for k, v in tensors.items()})
    for m in lora_modules(model).values():
        m.requires_grad_(False)
        m.eval()
    return settings


def settings_dict(settings: LoraSettings) -> dict:
    return asdict(settings)

"""Several LoRA adapters on one model at once, chosen per batch row (multi-adapter serving).

    multi.attach(model, "sql", "adapters/sql")      # PEFT folders, any ranks and targets
    multi.attach(model, "chat", "adapters/chat")
    multi.select_rows(model, ["sql", None, "chat"])  # before a forward pass of 3 rows
    logits = model(ids)                              # row 0 as with "sql" alone, row 1 base, ...

`attach` swaps each module an adapter targets for a `MultiLoRALinear` / `MultiLoRAEmbedding`
that keeps the frozen base and a table of named (A, B, scaling) factors; the base weights are
never changed, so every adapter (and the base) stays exact. `select_rows` sets which adapter
each row of the next forward passes uses (None: the base alone).

A mixed batch is computed by grouping rows per adapter: the base product runs once for all
rows, then each adapter's low-rank update runs on its own rows only (`index_select`, two
small matmuls, `index_add`). The alternative, one gathered `bmm` over per-row stacked
factors, pads every row to the largest rank and copies the factors per row each step;
grouping does no work for base rows and reads each adapter's factors once per step, as
S-LoRA's and vLLM's CPU fallbacks (punica's "sgmv" grouping) do. Each row's update is the
same arithmetic, in the same order, as `LoRALinear`'s unfused path (`ops.lora_linear`), so a
row's output equals that adapter loaded alone.

Adapters of weight parameters (PEFT `target_parameters`: Gemma 4's MoE experts) are refused:
their experts run on the flattened tokens of the whole batch, where a row is no longer a unit
(merge such an adapter into the model instead).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.errors import GemmakitError, ModelFileError
from gemmakit.lora.apply import is_linear_like, lora_modules, set_module
from gemmakit.lora.layers import EmbeddingView, KeepBaseNames, lora_scaling
from gemmakit.lora.peft import pattern_value, read_adapter, unused_projection

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}")


@dataclass
class RowSelection:
    """Which adapter each row of the coming forward passes uses; shared by all the layers.

    `groups` maps an adapter name to its rows (a LongTensor), or to None when it covers the
    whole batch (the common case of a batch with one adapter: no gather needed).
    """

    adapters: dict[str, Path] = field(default_factory=dict)  # attached name -> its folder
    rows: int = 0
    groups: dict[str, torch.Tensor | None] = field(default_factory=dict)

    def set(self, names: list[str | None], device) -> None:
        unknown = sorted({n for n in names if n is not None and n not in self.adapters})
        if unknown:
            raise GemmakitError(
                f"no LoRA adapter named {unknown[0]!r}; attached: {', '.join(self.adapters) or 'none'}"
            )
        self.rows = len(names)
        wanted = [n for n in dict.fromkeys(names) if n is not None]
        if len(wanted) == 1 and None not in names:
            self.groups = {wanted[0]: None}
            return
        self.groups = {
            n: torch.tensor([i for i, m in enumerate(names) if m == n], dtype=torch.long, device=device)
            for n in wanted
        }

    def updates(self, adapters: dict, batch: int):
        """(factors, rows) for each selected adapter this layer holds; rows None = all rows.

        An input of k * rows leading entries is a row-major flatten of (rows, k, ...): Gemma
        4's MoE router sees the tokens as (B*T, C) (`model/gemma4.py`), row r's tokens at
        r*k .. r*k+k-1.
        """
        for name, rows in self.groups.items():
            factors = adapters.get(name)
            if factors is None:
                continue
            if rows is not None and batch != self.rows:
                if self.rows == 0 or batch % self.rows:
                    raise GemmakitError(
                        f"a batch of {batch} rows, but select_rows named adapters for {self.rows} rows"
                    )
                k = batch // self.rows
                rows = (rows[:, None] * k + torch.arange(k, device=rows.device)).flatten()
            yield factors, rows


class MultiLoRALinear(nn.Module, KeepBaseNames):
    """A frozen linear layer (or quantized linear) plus named low-rank updates, per row.

    `adapters[name] = (A (r, in) float32, B (out, r) float32, scaling)`. The input's first
    dimension is the batch row (B, ..., in), or rows flattened with their tokens (B*T, in).
    """

    def __init__(self, base: nn.Module, selection: RowSelection):
        super().__init__()
        self.base, self.selection = base, selection
        if hasattr(base, "in_features") and hasattr(base, "out_features"):
            self.out_features, self.in_features = int(base.out_features), int(base.in_features)
        else:
            self.out_features, self.in_features = base.dequantize().shape
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self._install_name_hooks()

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight if isinstance(self.base, nn.Linear) else self.base.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for (a, b, scaling), rows in self.selection.updates(self.adapters, x.shape[0]):
            # The order of ops.lora_linear's plain path: the row equals the adapter alone.
            xs = x if rows is None else x.index_select(0, rows)
            delta = F.linear(F.linear(xs, a.to(x.dtype)), b.to(x.dtype)).to(out.dtype) * scaling
            out = out + delta if rows is None else out.index_add(0, rows, delta)
        return out

    def fits(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        r = a.shape[0]
        return tuple(a.shape) == (r, self.in_features) and tuple(b.shape) == (self.out_features, r)

    def extra_repr(self) -> str:
        return "adapters=" + ",".join(f"{n}(r={a.shape[0]})" for n, (a, _, _) in self.adapters.items())


class MultiLoRAEmbedding(EmbeddingView, nn.Module, KeepBaseNames):
    """A frozen embedding plus named low-rank updates of its rows, per batch row.

    `adapters[name] = (lora_embedding_A (r, vocab), lora_embedding_B (dim, r), scaling)`, as
    PEFT's LoRA `Embedding` stores them (`LoRAEmbedding`).
    """

    def __init__(self, base: nn.Embedding, selection: RowSelection):
        super().__init__()
        self.base, self.selection = base, selection
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self._install_name_hooks()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        for (a, b, scaling), rows in self.selection.updates(self.adapters, ids.shape[0]):
            sel = ids if rows is None else ids.index_select(0, rows)
            # LoRAEmbedding.forward's arithmetic.
            delta = (F.embedding(sel, a.T, self.base.padding_idx) @ b.T * scaling).to(out.dtype)
            out = out + delta if rows is None else out.index_add(0, rows, delta)
        return out

    def fits(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        r = a.shape[0]
        return tuple(a.shape) == (r, self.base.num_embeddings) and tuple(b.shape) == (
            self.base.embedding_dim,
            r,
        )


MULTI_TYPES = (MultiLoRALinear, MultiLoRAEmbedding)


def _selection(model: nn.Module) -> RowSelection | None:
    return getattr(model, "_lora_rows", None)


def adapter_names(model: nn.Module) -> list[str]:
    """The names attached with `attach`, in attaching order."""
    sel = _selection(model)
    return list(sel.adapters) if sel is not None else []


def has_adapters(model: nn.Module) -> bool:
    """Whether `attach` has put any adapter on the model (the C decode steps decline it)."""
    return bool(adapter_names(model))


def select_rows(model: nn.Module, names: list[str | None]) -> None:
    """Sets which adapter each row of the following forward passes uses (None: the base).

    Call it before each forward pass whose rows change; it holds until the next call. A model
    without attached adapters accepts only Nones.

    Raises:
        GemmakitError: a name that is not attached.
    """
    sel = _selection(model)
    if sel is None:
        if any(n is not None for n in names):
            raise GemmakitError(f"no LoRA adapter named {next(n for n in names if n)!r}; none is attached")
        return
    sel.set(list(names), getattr(model, "device", None))


def _factor_groups(folder, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Module name -> {"lora_A.weight": ..., "lora_B.weight": ...} (or the embedding pair)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module = key.rsplit(".lora_", 1)[0]
        if ".base_layer" in module:
            raise GemmakitError(
                f"{folder}: adapts weight parameters ({module.replace('.base_layer', '')}, PEFT "
                "target_parameters); serving several adapters supports linear layers and embeddings "
                "only: load this one with --adapter"
            )
        modules.setdefault(module, {})[key[len(module) + 1 :]] = t
    return modules


def _pair(folder, name: str, parts: dict, wrapper) -> tuple[torch.Tensor, torch.Tensor]:
    keys = ("lora_A.weight", "lora_B.weight")
    if isinstance(wrapper, MultiLoRAEmbedding):
        keys = ("lora_embedding_A", "lora_embedding_B")
    a, b = parts.get(keys[0]), parts.get(keys[1])
    if a is None or b is None or set(parts) != set(keys):
        raise ModelFileError(f"{folder}: incomplete or misplaced LoRA pair for {name}")
    if not wrapper.fits(a, b):
        raise ModelFileError(
            f"{folder}: {name} adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit this model "
            "(another base model?)"
        )
    return a, b


@torch.no_grad()
def attach(model: nn.Module, name: str, adapter_dir: str | Path) -> list[str]:
    """Loads the PEFT LoRA adapter in `adapter_dir` under `name`, beside those already attached.

    The base weights are untouched; adapters may differ in rank, alpha and targets. Rows use
    an adapter only once `select_rows` names it.

    Returns:
        The module names the adapter adapts.

    Raises:
        GemmakitError: a bad or taken name, a model with a single-adapter LoRA (`apply_lora`,
            `load_adapter`), or an adapter of weight parameters (MoE experts).
        ModelFileError: the folder is not a LoRA adapter for this model.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise GemmakitError(
            f"LoRA adapter name {name!r}: use letters, digits and . _ : / + - (at most 128 characters)"
        )
    sel = _selection(model)
    if sel is not None and name in sel.adapters:
        raise GemmakitError(f"a LoRA adapter named {name!r} is attached already")
    if lora_modules(model):
        raise GemmakitError(
            "the model carries a trainable or loaded LoRA adapter; merge it before attaching more"
        )
    cfg, tensors = read_adapter(adapter_dir)
    modules = _factor_groups(adapter_dir, tensors)
    alpha = float(cfg.get("lora_alpha", cfg.get("r", 8)))
    use_rslora = bool(cfg.get("use_rslora", False))
    named = dict(model.named_modules())
    if sel is None:
        sel = RowSelection()
    plan = []  # checked in full before the model is changed, so a bad adapter leaves no trace
    for module_name, parts in modules.items():
        if module_name not in named and unused_projection(model, module_name):
            continue
        target = named.get(module_name)
        if target is None:
            raise ModelFileError(
                f"{adapter_dir}: adapter targets {module_name}, which this model does not have"
            )
        wrapper = (
            target if isinstance(target, MULTI_TYPES) else _new_wrapper(adapter_dir, module_name, target, sel)
        )
        a, b = _pair(adapter_dir, module_name, parts, wrapper)
        a_alpha = float(pattern_value(cfg.get("alpha_pattern"), module_name, alpha))
        plan.append((module_name, target, wrapper, a, b, lora_scaling(a.shape[0], a_alpha, use_rslora)))
    if not plan:
        raise ModelFileError(f"{adapter_dir}: the adapter adapts no module of this model")
    device = getattr(model, "device", None)
    for module_name, target, wrapper, a, b, scaling in plan:
        wrapper.adapters[name] = (a.float().to(device), b.float().to(device), scaling)
        if wrapper is not target:
            set_module(model, module_name, wrapper)
    sel.adapters[name] = Path(adapter_dir)
    model._lora_rows = sel
    return [p[0] for p in plan]


def _new_wrapper(folder, module_name: str, target: nn.Module, sel: RowSelection):
    if isinstance(target, nn.Embedding):
        return MultiLoRAEmbedding(target, sel)
    if is_linear_like(target):
        return MultiLoRALinear(target, sel)
    raise GemmakitError(
        f"{folder}: adapter targets {module_name}, a {type(target).__name__}; serving several adapters "
        "supports linear layers and embeddings only"
    )

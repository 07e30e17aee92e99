"""LoRA's layers: a frozen linear layer, embedding or module's own weight parameters (the MoE
experts) plus a trainable low-rank update.

    y = base(x) + B(A(dropout(x))) * alpha / r        (alpha / sqrt(r) with rsLoRA)

with A Kaiming-uniform and B zero, so training starts from the base model exactly (Hu et al.
2021, arXiv 2106.09685 §4.1; PEFT `LoraLayer.reset_lora_parameters`). The product itself is
`gemmakit.ops.lora_linear`.

A wrapper keeps its base's state-dict names: `q_proj.weight` stays `q_proj.weight` (not
`q_proj.base.weight`), so base checkpoints load into a LoRA model unchanged (torchtune
`modules/peft/lora.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit import ops
from gemmakit.errors import GemmakitError


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
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


class KeepBaseNames:
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


class LoRALinear(nn.Module, KeepBaseNames):
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
        self.scaling = lora_scaling(r, alpha, use_rslora)
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
        p = self.lora_dropout.p if self.training and isinstance(self.lora_dropout, nn.Dropout) else 0.0
        return ops.lora_linear(x, self.base, self.lora_A.weight, self.lora_B.weight, self.scaling, p)

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling, float32, (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


class EmbeddingView:
    """What callers read of an embedding wrapped as `self.base` (an adapter over a table):
    its weight, padding row and shape."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def padding_idx(self):
        return self.base.padding_idx

    @property
    def num_embeddings(self) -> int:
        # Read by models that clip ids to the table (Gemma 3n's per-layer embedding).
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim


class LoRAEmbedding(EmbeddingView, nn.Module, KeepBaseNames):
    """A frozen embedding plus a low-rank update of its rows (PEFT's LoRA `Embedding`).

    PEFT names the factors `lora_embedding_A` (r, vocab) and `lora_embedding_B` (dim, r) and
    initializes A to zero and B normal; there is no dropout on token ids.
    """

    def __init__(self, base: nn.Embedding, r: int, alpha: float, use_rslora=False):
        super().__init__()
        self.base = base
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        device = base.weight.device
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, base.num_embeddings, device=device))
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, r, device=device))
        self._install_name_hooks()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        # The padding row gets no gradient, as in the base table and in PEFT's Embedding._embed.
        after_a = F.embedding(ids, self.lora_embedding_A.T, self.base.padding_idx)  # (..., r)
        delta = after_a @ self.lora_embedding_B.T  # (..., dim)
        return out + (delta * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(vocab, dim) float32."""
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling


class LoRAParameters(nn.Module, KeepBaseNames):
    """Low-rank updates of weights a module holds as its own parameters rather than as
    linear layers: Gemma 4's MoE experts, `gate_up_proj` (E, 2I, C) and `down_proj` (E, C, I)
    (PEFT's `target_parameters`, its `ParamWrapper`).

    A 3-D weight (E, out, in) gets one rank-r update per expert; its factors are stored as PEFT
    stores them, so an adapter file is a plain copy: `lora_A` (E*r, in) holds expert e's A in
    rows e*r .. e*r+r-1, `lora_B` (out, r*E) its B in columns k*E + e, k < r (peft
    tuners/lora/layer.py, ParamWrapper.get_delta_weight). A 2-D weight (out, in) is the E = 1 case.
    The module runs with W + B A * scaling in place of each W (`torch.func.functional_call`),
    so gradients reach the factors only. PEFT refuses dropout here (the input cannot be
    factored out of W + BA), and so does `apply_lora`.

    Args:
        base: the module holding the parameters (e.g. `model.moe.Experts`).
        names: which of its parameters get updates.
    """

    def __init__(self, base: nn.Module, names, r: int, alpha: float, use_rslora=False):
        super().__init__()
        if r <= 0:
            raise GemmakitError(f"LoRA rank must be positive, got {r}")
        self.base = base
        # Registration order: the order PEFT nests its wrappers, which names the adapter's keys.
        self.names = tuple(n for n, _ in base.named_parameters(recurse=False) if n in set(names))
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_A, self.lora_B, self.num_experts = nn.ModuleDict(), nn.ModuleDict(), {}
        for name in self.names:
            w = getattr(base, name)
            if w.dim() not in (2, 3):
                raise GemmakitError(
                    f"LoRA parameter {name} is {w.dim()}-D; only 2-D and 3-D weights take LoRA"
                )
            E, out_f, in_f = (1, *w.shape) if w.dim() == 2 else w.shape
            self.num_experts[name] = E
            self.lora_A[name] = nn.Linear(in_f, r * E, bias=False, device=w.device, dtype=torch.float32)
            self.lora_B[name] = nn.Linear(r * E, out_f, bias=False, device=w.device, dtype=torch.float32)
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)
        self._install_name_hooks()

    def delta_weight(self, name: str) -> torch.Tensor:
        """B A * scaling for parameter `name`, float32, shaped as the parameter."""
        E, a, b = self.num_experts[name], self.lora_A[name].weight, self.lora_B[name].weight
        a = a.float().reshape(E, self.r, a.shape[-1])  # (E, r, in)
        b = b.float().reshape(b.shape[0], self.r, E).permute(2, 0, 1)  # (E, out, r)
        delta = (b @ a) * self.scaling  # (E, out, in)
        return delta[0] if getattr(self.base, name).dim() == 2 else delta

    def forward(self, *args, **kwargs):
        weights = {}
        for name in self.names:
            w = getattr(self.base, name)
            weights[name] = w + self.delta_weight(name).to(w.dtype)
        return torch.func.functional_call(self.base, weights, args, kwargs)

    def extra_repr(self) -> str:
        return f"parameters={','.join(self.names)}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


LORA_TYPES = (LoRALinear, LoRAEmbedding, LoRAParameters)

"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): 4-bit weights that minimise ||W X - Q X||.

Per linear layer, from the Hessian H = 2 X^T X of its calibration inputs X: columns are
quantized one at a time and each one's rounding error is spread over the columns not yet
quantized through the upper Cholesky factor of H^-1 (the paper's Algorithm 1, with its lazy
block updates). Asymmetric 4-bit with a scale and an integer zero per group of input columns,
as AutoGPTQ / gptqmodel quantize (their `Quantizer.find_params`: the range always holds 0).

`gptq_quantize_model` runs the model block by block: each block's inputs are the outputs of
the blocks already quantized, as in the reference `llama_sequential`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gemmakit.config import PROJECTIONS
from gemmakit.errors import GemmakitError

MAXQ = 15  # 4 bits
# AutoGPTQ quantizer.py Quantizer.configure defaults for mse=True: grid, maxshrink, norm.
MSE_GRID, MSE_STEPS, MSE_NORM = 100, 80, 2.4


def group_params(
    w: torch.Tensor, sym: bool = False, mse: bool = False, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale (N,), zero (N,)) of 4-bit levels for the columns w (N, g).

    AutoGPTQ's find_params: the range is [min(w, 0), max(w, 0)], zero = round(-min / scale);
    `sym` centres it on 0 (|range| = max |w|, zero 8). The scale is rounded to fp16 first, as
    checkpoints store it, so the error GPTQ compensates is the one the file will hold; the zero
    is kept >= 1 because the v1 GPTQ format stores zero - 1 (a group with no negative weight
    loses its lowest level, rare in practice). `mse` shrinks the range by the factor of a grid
    that gives the least sum of |error|^2.4 per row (AutoGPTQ / gptqmodel `Quantizer` with
    mse=True: grid 100, maxshrink 0.8, norm 2.4); `weights` (g,) weighs each column's error
    (the Hessian's diagonal: the output error a column's rounding causes, to first order).
    """
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    flat = (hi - lo) == 0
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    if not mse:
        return _grid(lo, hi, sym)
    shrink = 1 - torch.arange(MSE_STEPS, dtype=w.dtype) / MSE_GRID  # (S,)
    scale, zero = _grid(lo[:, None] * shrink, hi[:, None] * shrink, sym)  # (N, S)
    q = torch.clamp(torch.round(w[:, None, :] / scale[..., None]) + zero[..., None], 0, MAXQ)
    err = ((q - zero[..., None]) * scale[..., None] - w[:, None, :]).abs().pow(MSE_NORM)
    if weights is not None:
        err = err * weights
    best = err.sum(-1).argmin(dim=1, keepdim=True)  # (N, 1)
    return scale.gather(1, best)[:, 0], zero.gather(1, best)[:, 0]


def _grid(lo: torch.Tensor, hi: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale = ((hi - lo) / MAXQ).half().float().clamp(min=torch.finfo(torch.float16).tiny)
    if sym:  # AutoGPTQ: zero (maxq + 1) / 2
        return scale, torch.full_like(scale, (MAXQ + 1) // 2)
    return scale, torch.round(-lo / scale).clamp(1, MAXQ)


def quantize_columns(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Levels 0..15 (float) of w (N, ...) with per-row scale and zero."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.clamp(torch.round(w / scale.view(shape)) + zero.view(shape), 0, MAXQ)


def rtn_quantize(
    weight: torch.Tensor,
    group_size: int,
    sym: bool = False,
    mse: bool = False,
    weights: torch.Tensor | None = None,
) -> dict:
    """Round-to-nearest with GPTQ's grid: the baseline GPTQ improves on (same layout).
    `mse`/`weights` (K,): `group_params`' range search, each column's error weighed."""
    N, K = weight.shape
    w = weight.detach().float().view(N, K // group_size, group_size)
    scales, zeros, levels = [], [], []
    for g in range(K // group_size):
        cols = None if weights is None else weights[g * group_size : (g + 1) * group_size]
        s, z = group_params(w[:, g], sym, mse, cols)
        scales.append(s), zeros.append(z), levels.append(quantize_columns(w[:, g], s, z))
    return _result(
        torch.cat(levels, 1), torch.stack(scales, 1), torch.stack(zeros, 1), torch.arange(K) // group_size
    )


def _result(levels, scales, zeros, g_idx) -> dict:
    return {
        "levels": levels.to(torch.uint8),
        "scales": scales.half(),
        "zeros": zeros.to(torch.int32),
        "g_idx": g_idx.to(torch.int32),
    }


def dequantize(q: dict) -> torch.Tensor:
    """The float32 weight (N, K) of a `gptq_quantize` / `rtn_quantize` result."""
    g = q["g_idx"].long()
    return (q["levels"].float() - q["zeros"][:, g].float()) * q["scales"][:, g].float()


@dataclass(frozen=True)
class GPTQSettings:
    """How GPTQ rounds; the defaults are what measured best on the bundled model (README table).

    desc_act: columns in descending order of the Hessian's diagonal (act-order);
    static_groups: with desc_act, each group's grid is fixed up front over its columns in
    file order, so g_idx stays k // group_size (AutoGPTQ `static_groups`); damp_percent: the
    fraction of the mean diagonal added to H; sym: a grid centred on 0; mse: the range-shrink
    search of `group_params`; true_sequential: within a block, each linear's inputs come from
    the block with the linears before it already quantized (q/k/v, o, gate/up, down);
    float_target: GPTAQ's alpha (Li et al. 2025, arXiv:2504.02692, gptqmodel's `v2` option):
    aim at the float model's outputs W X rather than W X~ (X~: a linear's inputs in the
    quantized model, X: in the float one); 0 is plain GPTQ (README ablation table).
    """

    group_size: int = 128
    desc_act: bool = True
    static_groups: bool = False
    damp_percent: float = 0.05  # 0.01 (the paper's) gave +8.07% at group 32, 0.05 +6.32%
    sym: bool = False
    mse: bool = True
    true_sequential: bool = True
    mse_weighted: bool = True  # the mse search weighs columns by the Hessian's diagonal
    float_target: float = 0.1  # GPTAQ's alpha: 0.1 measured best at groups 32 and 128


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int = 128,
    desc_act: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    settings: GPTQSettings | None = None,
    cross: torch.Tensor | None = None,
) -> dict:
    """GPTQ levels (N, K) uint8, scales (N, G) fp16, zeros (N, G) int32, g_idx (K,) of a weight.

    hessian: (K, K) float32, 2 X^T X / n over the layer's calibration inputs (any positive
    multiple works: only its inverse's shape matters). desc_act quantizes columns in
    descending order of the Hessian's diagonal (act-order); groups are then consecutive in
    that order and g_idx maps each input column to its group. `settings`, when given, sets
    group_size, desc_act and damp_percent and the rest of the rounding options. cross: (K, K)
    (X - X~)^T X~ at the Hessian's scale (`HessianCollector.cross`), the float inputs X against
    the quantized ones X~; with `settings.float_target` > 0 the rounding then aims at the float
    model's outputs (GPTAQ).
    """
    settings = settings or GPTQSettings(group_size, desc_act, damp_percent=damp_percent, mse=False)
    N, K = weight.shape
    if K % settings.group_size:
        raise GemmakitError(
            f"gptq: in_features {K} is not a multiple of the group size {settings.group_size}"
        )
    # The column loop is thousands of tiny ops: torch's thread pool only adds synchronisation
    # (measured on a loaded 2-core machine, a 640 x 2048 layer: 57 s on 2 threads, 2.3 s on 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(weight, hessian, settings, block_size, cross)
    finally:
        torch.set_num_threads(threads)


def _gptq(weight, hessian, settings: GPTQSettings, block_size, cross=None) -> dict:
    N, K = weight.shape
    group_size, sym, mse = settings.group_size, settings.sym, settings.mse
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0  # columns that never saw a nonzero input: any value is exact
    H[dead, dead] = 1
    W[:, dead] = 0
    G = K // group_size
    scales, zeros = torch.zeros(N, G), torch.zeros(N, G)
    file_groups = torch.arange(K) // group_size
    if settings.static_groups:  # AutoGPTQ static_groups: grids from the unchanged weight
        diag = torch.diag(H).view(G, group_size)
        for g in range(G):
            cols = W[:, g * group_size : (g + 1) * group_size]
            scales[:, g], zeros[:, g] = group_params(
                cols, sym, mse, diag[g] if settings.mse_weighted else None
            )
    perm = torch.argsort(torch.diag(H), descending=True) if settings.desc_act else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    if cross is not None and settings.float_target:
        cross = cross.detach().float().clone()
        cross[:, dead], cross[dead, :] = 0, 0
        cross = cross[perm][:, perm]
    else:
        cross = None
    col_group = file_groups[perm] if settings.static_groups else file_groups
    # Dampening: a fraction of the mean diagonal (the paper, section 4 "Cholesky reformulation").
    H += settings.damp_percent * torch.mean(torch.diag(H)) * torch.eye(K)
    Hinv = _inverse_cholesky_upper(H)
    drift = None if cross is None else _float_drift(cross, Hinv, settings.float_target)
    diag = torch.diag(H)
    block_size = max(group_size, block_size // group_size * group_size)  # groups never straddle blocks
    levels = torch.zeros_like(W)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        Before1 = torch.zeros_like(W1)  # each column as it stood when it was rounded
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0 and not settings.static_groups:
                # the group's grid from its columns as updated so far
                scales[:, col // group_size], zeros[:, col // group_size] = group_params(
                    W1[:, i : i + group_size],
                    sym,
                    mse,
                    diag[col : col + group_size] if settings.mse_weighted else None,
                )
            g = int(col_group[col])
            w = W1[:, i]
            q = quantize_columns(w, scales[:, g], zeros[:, g])
            levels[:, col] = q
            Before1[:, i] = w  # a view of W1: copied before the update below changes it
            err = (w - (q - zeros[:, g]) * scales[:, g]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
            if drift is not None:
                W1[:, i + 1 :] += Before1[:, i, None] * drift[col, col + 1 : i2][None, :]
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        if drift is not None:
            W[:, i2:] += Before1 @ drift[i1:i2, i2:]
    inverse = torch.argsort(perm)
    return _result(levels[:, inverse], scales, zeros, col_group[inverse])


def _float_drift(cross: torch.Tensor, Hinv_upper: torch.Tensor, alpha: float) -> torch.Tensor:
    """GPTAQ's P (arXiv:2504.02692, scaled by its alpha): column i's weight times row i of P
    is what the columns after i must move by so that their outputs on the quantized inputs
    follow the float model's (W X = W X~ + W (X - X~)); strictly upper triangular, so a
    column's own target is unchanged."""
    return alpha * torch.triu(cross @ Hinv_upper.t(), diagonal=1) @ Hinv_upper


def _inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of H^-1, adding dampening until H factors (as gptqmodel)."""
    K = H.shape[0]
    extra = torch.mean(torch.diag(H)) * 0.01
    for _ in range(10):
        L, info = torch.linalg.cholesky_ex(H.double())
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U.float()
        H = H + extra * torch.eye(K)
    raise GemmakitError("gptq: the calibration Hessian is not positive definite")


class HessianCollector:
    """Accumulates H = 2 X~^T X~ / n over the inputs X~ a linear module sees (a forward pre-hook).

    With `float_inputs` (the same windows' inputs in the float model, one (T, K) tensor per
    call, in call order) it also accumulates GPTAQ's cross term 2 (X - X~)^T X~ / n (`cross`).
    """

    def __init__(self, in_features: int, float_inputs: list[torch.Tensor] | None = None):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.D = None if float_inputs is None else torch.zeros_like(self.H)
        self.float_inputs = float_inputs
        self.n = 0

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        t = x.shape[0]
        self.H *= self.n / (self.n + t)
        if self.D is not None:
            self.D *= self.n / (self.n + t)
            x_float = self.float_inputs.pop(0).reshape(-1, x.shape[-1]).double()
        self.n += t
        x = math.sqrt(2 / self.n) * x
        self.H += x.t() @ x
        if self.D is not None:
            self.D += (math.sqrt(2 / self.n) * x_float - x).t() @ x

    def hessian(self) -> torch.Tensor:
        return self.H.float()

    def cross(self) -> torch.Tensor | None:
        return None if self.D is None else self.D.float()


class _StageDone(Exception):
    """Raised by `_StageInputs` once a window has given every linear of the stage its input."""


class _StageInputs:
    """Forward pre-hooks that feed one `HessianCollector` per distinct input of a stage.

    Linears that read the same tensor (q/k/v, gate/up) share one collector: one X^T X instead
    of three. Once each linear of the stage has been reached the window's forward stops: the
    rest of the block is not needed for this stage's statistics."""

    def __init__(self, stage: dict[str, nn.Module], float_inputs: dict[str, list] | None):
        self.stage, self.float_inputs = stage, float_inputs
        self.collectors: dict[str, HessianCollector] = {}
        self.owner: dict[str, str] = {}  # linear -> the linear whose collector holds its input
        self.seen: dict[str, torch.Tensor] = {}

    def hook(self, name: str):
        def pre_hook(module, args):
            x = args[0]
            same = next((other for other, t in self.seen.items() if t is x), None)
            if same is not None:
                self.owner[name] = self.owner[same]
            else:
                self.owner[name] = name
                if name not in self.collectors:
                    inputs = None if self.float_inputs is None else list(self.float_inputs[name])
                    self.collectors[name] = HessianCollector(module.in_features, inputs)
                self.collectors[name](module, args)
            self.seen[name] = x
            if len(self.seen) == len(self.stage):
                raise _StageDone

        return pre_hook

    def run(self, block, states):
        hooks = [m.register_forward_pre_hook(self.hook(name)) for name, m in self.stage.items()]
        try:
            for s in states:
                self.seen = {}
                try:
                    block(
                        s["h"], s["ropes"][block.layer_type], s["masks"][block.layer_type], None, s["shared"]
                    )
                except _StageDone:
                    pass
        finally:
            for hook in hooks:
                hook.remove()
            self.seen = {}

    def collector(self, name: str) -> HessianCollector:
        return self.collectors[self.owner[name]]


class _FloatInputs:
    """Forward pre-hooks that keep each linear's inputs, window by window (GPTAQ's X)."""

    def __init__(self, linears: dict[str, nn.Module]):
        self.linears = linears
        self.inputs: dict[str, list[torch.Tensor]] = {name: [] for name in linears}

    def run(self, block, states):
        def keep(name):
            return lambda module, args: self.inputs[name].append(args[0].detach().clone())

        hooks = [m.register_forward_pre_hook(keep(name)) for name, m in self.linears.items()]
        try:
            _run_block(block, states, update=True)
        finally:
            for hook in hooks:
                hook.remove()


# Bumped when a change to the algorithm or its defaults changes the weights it writes: part of
# the key of loading's cache of `--quantize gptq|awq` models.
REVISION = 5  # 3: the tied head kept in bfloat16; 4: damp_percent 0.05; 5: GPTAQ alpha 0.1
CALIBRATION_FILES = ("eval_text_wiki.txt", "guanaco_sample.jsonl")  # in gemmakit/data


def default_calibration_text() -> str:
    """The shipped calibration text: the wiki text, then the guanaco sample's conversations
    (about 9k tokens; neither is the evaluation text the quality table scores). Measured on
    the bundled model, adding the guanaco sample to the wiki text took GPTQ group-32 from
    +9.8% to +9.4% perplexity (README quality table)."""
    import json

    from gemmakit.paths import DATA

    wiki, guanaco = (DATA / name for name in CALIBRATION_FILES)
    rows = [
        json.loads(line)["text"] for line in guanaco.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    return "\n\n".join([wiki.read_text(encoding="utf-8"), *rows])


def calibration_windows(
    ids: list[int], bos_id: int, window: int = 512, max_windows: int = 64
) -> list[torch.Tensor]:
    """Calibration batches: consecutive windows of the text's ids, each after one <bos>."""
    body = window - 1
    out = [
        torch.tensor([[bos_id] + ids[i : i + body]])
        for i in range(0, len(ids), body)
        if len(ids[i : i + body]) > 16
    ]
    if not out:
        raise GemmakitError("the calibration text is too short (fewer than 16 tokens)")
    return out[:max_windows]


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: m
        for name, m in block.named_modules()
        if isinstance(m, nn.Linear) and name.rpartition(".")[2] in PROJECTIONS
    }


def block_states(model: nn.Module, windows: list[torch.Tensor]) -> list[dict]:
    """What the first block receives for each window, computed as Gemma.hidden_states does."""
    states = []
    for ids in windows:
        positions, masks, _ = model.attention_inputs(ids, None, None, None, None)
        h = model.embed(model.model.embed_tokens, ids, model.config.embedding_scale)
        states.append({"h": h, "ropes": model.ropes(positions, h), "masks": masks, "shared": {}})
    return states


# The order in which true-sequential quantization takes a block's linears (gptqmodel's
# `layer_modules` for Gemma: the attention inputs, its output, the MLP's inputs, its output).
SEQUENTIAL_STAGES = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def _stages(linears: dict, true_sequential: bool) -> list[dict]:
    if not true_sequential:
        return [linears]
    stages = [
        {n: m for n, m in linears.items() if n.rpartition(".")[2] in leaves} for leaves in SEQUENTIAL_STAGES
    ]
    return [stage for stage in stages if stage]


def _run_block(block, states, update: bool = False):
    for s in states:
        h = block(s["h"], s["ropes"][block.layer_type], s["masks"][block.layer_type], None, s["shared"])
        if update:
            s["h"] = h


def gptq_quantize_block(
    block: nn.Module, states: list[dict], settings: GPTQSettings, float_inputs: dict | None = None
):
    """Swaps the block's linears for GPTQ-quantized ones, calibrated on `states` (its inputs).

    float_inputs: per linear, its inputs window by window in the float model (`_FloatInputs`),
    which GPTAQ's target needs (`settings.float_target`)."""
    from gemmakit.quant.gptq_linear import GPTQLinear

    for stage in _stages(block_linears(block), settings.true_sequential):
        inputs = _StageInputs(stage, float_inputs if settings.float_target else None)
        inputs.run(block, states)
        for name, m in stage.items():
            collector = inputs.collector(name)
            q = gptq_quantize(m.weight, collector.hessian(), settings=settings, cross=collector.cross())
            replace_linear(block, name, GPTQLinear.from_quantized(q, settings.group_size, m.weight.dtype))


def replace_linear(block: nn.Module, name: str, module: nn.Module):
    parent_name, _, leaf = name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, leaf, module)


def gptq_quantize_model(
    model: nn.Module,
    windows: list[torch.Tensor],
    group_size: int = 128,
    desc_act: bool = True,
    progress: bool = False,
    settings: GPTQSettings | None = None,
) -> nn.Module:
    """Quantizes the linear layers of every block with GPTQ in place and returns the model.

    windows: (1, T) id tensors the model runs as calibration. The embedding and lm_head stay
    in float (gptqmodel and AutoGPTQ leave them so too). `settings` overrides group_size and
    desc_act; without it the defaults of `GPTQSettings` apply with those two.
    """
    from tqdm import tqdm

    settings = settings or GPTQSettings(group_size, desc_act)
    model.eval()
    with torch.no_grad():
        states = block_states(model, windows)
        # GPTAQ: the float model's own states, run alongside (the same ropes and masks)
        float_states = [dict(s, shared={}) for s in states] if settings.float_target else None
        for block in tqdm(model.model.layers, desc="gptq", disable=not progress, leave=False):
            float_inputs = None
            if float_states is not None:  # before the block is quantized: its float inputs
                recorder = _FloatInputs(block_linears(block))
                recorder.run(block, float_states)
                float_inputs = recorder.inputs
            gptq_quantize_block(block, states, settings, float_inputs)
            _run_block(block, states, update=True)  # the next block's inputs: this block quantized
    model.quantization = {
        "kind": "gptq", "group_size": settings.group_size, "desc_act": settings.desc_act and not settings.static_groups,
        "embeddings": False,
    }  # fmt: skip
    return model

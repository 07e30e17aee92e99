"""The importance matrix: per input column, the summed squared activation a weight matrix sees.

The statistic and the token selection are llama.cpp's `llama-imatrix`
(tools/imatrix/imatrix.cpp `compute_imatrix`, `IMatrixCollector::collect_imatrix`):

- the whole text is tokenized once with `<bos>` in front, then cut into chunks of `ctx`
  tokens (what is left over is dropped; at least two chunks are required); the first token
  of every chunk is replaced by `<bos>`, and each chunk runs on its own (positions from 0);
- every token of every chunk counts: for each weight matrix of a block (GGUF name `blk.*`),
  the input row x of each token adds x_j^2 to column j's sum (float32), and the count grows
  by one per token;
- a mixture-of-experts weight keeps one row of sums and one count per expert, fed by the
  tokens routed to that expert (`GGML_OP_MUL_MAT_ID`), so an expert that saw no token keeps
  a count of 0 (the quantizer then uses 1s for it);
- the output layer is not collected (llama-imatrix skips it without `--process-output`, and
  Gemma's is the tied token embedding anyway).

One deviation by design: llama-imatrix ignores a matrix product over fewer than 16 tokens
(its micro-batches are 512 tokens), which can drop a short tail of a chunk when `ctx` is not
a multiple of 16 or exceeds 2048; here every token counts.

Activations are taken with forward pre-hooks on the modules whose weights have a `blk.` GGUF
name (the rename table in `gemmakit.formats.gguf`), so float, quantized and LoRA-wrapped
linears are all seen as the model runs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from gemmakit import ops
from gemmakit.errors import GemmakitError
from gemmakit.evaluation.logprobs import BATCH_TOKENS, progress_bar
from gemmakit.formats.gguf import hf_to_gguf_name
from gemmakit.model.moe import Experts

DEFAULT_CONTEXT = 512


@dataclass
class ImatrixStats:
    """Summed squared input activations per matrix: `sums[name]` (matrices, columns) float32,
    `counts[name]` (matrices,) int64, under GGUF tensor names."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, x: torch.Tensor, matrices: int = 1, index: int = 0):
        """Adds rows x (N, columns) to matrix `index` of entry `name`."""
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (N, columns)
        if name not in self.sums:
            self.sums[name] = torch.zeros(matrices, x.shape[-1], dtype=torch.float32, device=x.device)
            self.counts[name] = torch.zeros(matrices, dtype=torch.int64)
        self.sums[name][index] += x.square().sum(0)
        self.counts[name][index] += x.shape[0]

    def numpy(self) -> tuple[dict, dict]:
        """(sums, counts) as numpy arrays, for `gemmakit.formats.imatrix.write_imatrix`."""
        sums = {n: s.cpu().numpy() for n, s in self.sums.items()}
        return sums, {n: c.numpy() for n, c in self.counts.items()}


def collected_modules(model: nn.Module) -> dict[str, nn.Module]:
    """GGUF weight name -> the module whose input feeds it: every module whose `weight` has a
    block tensor's GGUF name (`blk.N.*`), and the mixture-of-experts modules (key: the
    module's path; their two fused weights are named in `_hook_experts`)."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, Experts):
            out[path] = module
            continue
        gguf_name = hf_to_gguf_name(f"{path}.weight")
        # Every norm's GGUF name holds "norm" (Gemma 4's pre_ffw_norm_2 too, whose HF name
        # does not end in "norm.weight"); no matrix's does.
        if gguf_name is not None and gguf_name.startswith("blk.") and "norm" not in gguf_name:
            out[gguf_name] = module
    return out


def _hook_experts(stats: ImatrixStats, path: str, module: Experts):
    """The experts' two products, per expert, as llama.cpp's MUL_MAT_ID collection sees them:
    `ffn_gate_up_exps` reads each routed token's x, `ffn_down_exps` the GeGLU of its gate and
    up projections (recomputed here from x: the forward does not expose it)."""
    gate_up = hf_to_gguf_name(f"{path}.gate_up_proj")
    down = hf_to_gguf_name(f"{path}.down_proj")
    n_experts = module.gate_up_proj.shape[0]

    def hook(_module, args):
        x, _weights, index = args  # x (N, C), index (N, k)
        for expert in range(n_experts):
            token, _slot = torch.where(index == expert)
            if token.numel() == 0:
                stats.add(gate_up, x[:0], n_experts, expert)  # creates the entry; count stays 0
                stats.add(down, x.new_zeros(0, module.down_proj.shape[-1]), n_experts, expert)
                continue
            rows = x[token]
            g, u = nn.functional.linear(rows, module.gate_up_proj[expert]).chunk(2, dim=-1)
            stats.add(gate_up, rows, n_experts, expert)
            stats.add(down, ops.geglu(g, u), n_experts, expert)

    return module.register_forward_pre_hook(hook)


class ImatrixCollector:
    """Accumulates `ImatrixStats` from every forward pass while installed (a context manager)."""

    def __init__(self, model: nn.Module):
        self.model, self.stats, self._handles = model, ImatrixStats(), []

    def __enter__(self) -> ImatrixStats:
        for name, module in collected_modules(self.model).items():
            if isinstance(module, Experts):
                self._handles.append(_hook_experts(self.stats, name, module))
            else:
                self._handles.append(module.register_forward_pre_hook(self._dense_hook(name)))
        if not self._handles:
            raise GemmakitError("the model has no block weight matrices to collect statistics for")
        return self.stats

    def _dense_hook(self, name: str):
        def hook(_module, args):
            self.stats.add(name, args[0])

        return hook

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()


def imatrix_chunks(ids: Sequence[int], bos_id: int, ctx: int, chunks: int | None = None) -> list[list[int]]:
    """The chunks llama-imatrix runs: `ids` (the text's tokens, `<bos>` first) cut into
    `ctx`-token pieces, each with its first token replaced by `<bos>`, at most `chunks`."""
    if ctx < 2:
        raise GemmakitError(f"--ctx must be at least 2, got {ctx}")
    if len(ids) < 2 * ctx:
        # llama-imatrix refuses the same ("you need at least 2*ctx tokens").
        raise GemmakitError(
            f"the text has {len(ids)} tokens; --ctx {ctx} needs at least {2 * ctx} (two chunks)"
        )
    n = len(ids) // ctx
    if chunks is not None:
        if chunks < 1:
            raise GemmakitError(f"--chunks must be positive, got {chunks}")
        n = min(n, chunks)
    return [[bos_id, *ids[i * ctx + 1 : (i + 1) * ctx]] for i in range(n)]


@torch.inference_mode()
def compute_imatrix(
    model, ids: Sequence[int], bos_id: int, ctx: int = DEFAULT_CONTEXT, chunks: int | None = None,
    progress: bool = False, batch_tokens: int = BATCH_TOKENS,
) -> tuple[ImatrixStats, int]:  # fmt: skip
    """(the statistics, the chunks run) of `model` over token ids (see the module docstring).

    Args:
        model: a gemmakit model (`hidden_states` runs the blocks without the output layer).
        ids: the text's token ids with `<bos>` first (a missing one is added).
        ctx: tokens per chunk, the `<bos>` included.
        chunks: at most this many chunks (default: all the text holds).
        batch_tokens: chunks run together, up to this many tokens per forward pass.
    """
    ids = list(ids)
    if not ids or ids[0] != bos_id:
        ids.insert(0, bos_id)
    limit = model.config.max_position_embeddings
    if ctx > limit:
        raise GemmakitError(f"--ctx {ctx} exceeds the model's {limit} positions")
    pieces = imatrix_chunks(ids, bos_id, ctx, chunks)
    rows = max(1, batch_tokens // ctx)
    bar = progress_bar(len(pieces), "imatrix", "chunk", progress)
    with ImatrixCollector(model) as stats:
        for i in range(0, len(pieces), rows):
            batch = torch.tensor(pieces[i : i + rows], device=model.device)  # (B, ctx)
            model.hidden_states(batch)
            bar.update(batch.shape[0])
    bar.close()
    return stats, len(pieces)
